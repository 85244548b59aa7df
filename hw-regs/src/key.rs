//! The 48-byte flow key and the bucket hash (device.md sections 8 and 10.2).

use core::mem::offset_of;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::le::{Le16, put, take};
use crate::{Error, KeyKind, L4Proto, crc32c};

/// `dst_port` of an ICMPv4 echo request key (type 8, code 0).
pub const ICMPV4_ECHO_REQUEST: u16 = icmp_type_code(8, 0);
/// `dst_port` of an ICMPv4 echo reply key (type 0, code 0).
pub const ICMPV4_ECHO_REPLY: u16 = icmp_type_code(0, 0);
/// `dst_port` of an ICMPv6 echo request key (type 128, code 0).
pub const ICMPV6_ECHO_REQUEST: u16 = icmp_type_code(128, 0);
/// `dst_port` of an ICMPv6 echo reply key (type 129, code 0).
pub const ICMPV6_ECHO_REPLY: u16 = icmp_type_code(129, 0);

/// The `dst_port` value of an ICMP/ICMPv6 key: `type << 8 | code`.
#[must_use]
pub const fn icmp_type_code(icmp_type: u8, code: u8) -> u16 {
    u16::from_be_bytes([icmp_type, code])
}

/// A flow key: the exact-match lookup key of one direction of a flow (48 bytes).
///
/// Ports and zone are little-endian integers; addresses are byte strings in network
/// order, IPv4 in bytes 0–3 with bytes 4–15 zero. Reserved bytes must be zero.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Byte 0: [`KeyKind`] (1 IPv4, 2 IPv6).
    pub kind: u8,
    /// Byte 1: ingress port.
    pub port: u8,
    /// Byte 2: [`L4Proto`] (IP protocol number).
    pub proto: u8,
    /// Byte 3: reserved, zero.
    pub flags: u8,
    /// Bytes 4–5: zone (802.1Q VLAN ID, 0 untagged).
    pub zone: Le16,
    /// Bytes 6–7: TCP/UDP source port, or ICMP echo identifier.
    pub src_port: Le16,
    /// Bytes 8–9: TCP/UDP destination port, or ICMP `type << 8 | code`.
    pub dst_port: Le16,
    /// Bytes 10–15: reserved, zero.
    pub reserved: [u8; 6],
    /// Bytes 16–31: source address.
    pub src_addr: [u8; 16],
    /// Bytes 32–47: destination address.
    pub dst_addr: [u8; 16],
}

const _: () = assert!(size_of::<FlowKey>() == 48);

/// The 16-byte address field encoding of an IP address (IPv4 in bytes 0–3).
#[must_use]
pub fn addr_bytes(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&v4.octets());
            out
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn addr_from_bytes(kind: KeyKind, bytes: [u8; 16]) -> IpAddr {
    match kind {
        KeyKind::Ipv4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        KeyKind::Ipv6 => IpAddr::V6(Ipv6Addr::from(bytes)),
    }
}

impl FlowKey {
    /// Size in bytes.
    pub const SIZE: usize = 48;

    /// An IPv4 key. For ICMP, `src_port` is the echo identifier and `dst_port` the
    /// [`icmp_type_code`].
    #[must_use]
    pub fn ipv4(
        port: u8,
        proto: L4Proto,
        zone: u16,
        src: Ipv4Addr,
        src_port: u16,
        dst: Ipv4Addr,
        dst_port: u16,
    ) -> Self {
        Self {
            kind: KeyKind::Ipv4.raw(),
            port,
            proto: proto.raw(),
            flags: 0,
            zone: Le16::new(zone),
            src_port: Le16::new(src_port),
            dst_port: Le16::new(dst_port),
            reserved: [0; 6],
            src_addr: addr_bytes(IpAddr::V4(src)),
            dst_addr: addr_bytes(IpAddr::V4(dst)),
        }
    }

    /// An IPv6 key. For ICMPv6, `src_port` is the echo identifier and `dst_port` the
    /// [`icmp_type_code`].
    #[must_use]
    pub fn ipv6(
        port: u8,
        proto: L4Proto,
        zone: u16,
        src: Ipv6Addr,
        src_port: u16,
        dst: Ipv6Addr,
        dst_port: u16,
    ) -> Self {
        Self {
            kind: KeyKind::Ipv6.raw(),
            port,
            proto: proto.raw(),
            flags: 0,
            zone: Le16::new(zone),
            src_port: Le16::new(src_port),
            dst_port: Le16::new(dst_port),
            reserved: [0; 6],
            src_addr: src.octets(),
            dst_addr: dst.octets(),
        }
    }

    /// Decodes `kind`.
    ///
    /// # Errors
    /// [`Error::UnknownKeyKind`] for a value other than 1 or 2.
    pub fn kind(&self) -> Result<KeyKind, Error> {
        KeyKind::try_from(self.kind)
    }

    /// Decodes `proto`.
    ///
    /// # Errors
    /// [`Error::UnknownL4Proto`] for a protocol a key cannot carry.
    pub fn proto(&self) -> Result<L4Proto, Error> {
        L4Proto::try_from(self.proto)
    }

    /// The source address, per `kind`.
    ///
    /// # Errors
    /// [`Error::UnknownKeyKind`] if `kind` is invalid.
    pub fn src_ip(&self) -> Result<IpAddr, Error> {
        Ok(addr_from_bytes(self.kind()?, self.src_addr))
    }

    /// The destination address, per `kind`.
    ///
    /// # Errors
    /// [`Error::UnknownKeyKind`] if `kind` is invalid.
    pub fn dst_ip(&self) -> Result<IpAddr, Error> {
        Ok(addr_from_bytes(self.kind()?, self.dst_addr))
    }

    /// The 48-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[offset_of!(Self, kind)] = self.kind;
        b[offset_of!(Self, port)] = self.port;
        b[offset_of!(Self, proto)] = self.proto;
        b[offset_of!(Self, flags)] = self.flags;
        put(&mut b, offset_of!(Self, zone), &self.zone.to_le_bytes());
        put(
            &mut b,
            offset_of!(Self, src_port),
            &self.src_port.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, dst_port),
            &self.dst_port.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, reserved), &self.reserved);
        put(&mut b, offset_of!(Self, src_addr), &self.src_addr);
        put(&mut b, offset_of!(Self, dst_addr), &self.dst_addr);
        b
    }

    /// Decodes a 48-byte memory image. Every bit pattern is a `FlowKey`; validity is
    /// checked by whoever interprets it.
    #[must_use]
    pub fn from_bytes(b: &[u8; 48]) -> Self {
        Self {
            kind: b[offset_of!(Self, kind)],
            port: b[offset_of!(Self, port)],
            proto: b[offset_of!(Self, proto)],
            flags: b[offset_of!(Self, flags)],
            zone: Le16::from_le_bytes(take(b, offset_of!(Self, zone))),
            src_port: Le16::from_le_bytes(take(b, offset_of!(Self, src_port))),
            dst_port: Le16::from_le_bytes(take(b, offset_of!(Self, dst_port))),
            reserved: take(b, offset_of!(Self, reserved)),
            src_addr: take(b, offset_of!(Self, src_addr)),
            dst_addr: take(b, offset_of!(Self, dst_addr)),
        }
    }
}

/// The bucket hash of a key: CRC-32C of its 48-byte image (device.md section 10.2).
#[must_use]
pub fn key_hash(key: &FlowKey) -> u32 {
    crc32c(&key.to_bytes())
}

/// The bucket of a hash in a table of `2^buckets_log2` buckets: the hash masked to the
/// bucket count.
#[must_use]
pub fn bucket_index(hash: u32, buckets_log2: u32) -> u32 {
    let mask = 1u32
        .checked_shl(buckets_log2)
        .map_or(u32::MAX, |buckets| buckets - 1);
    hash & mask
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;

    use super::*;

    /// The example of device.md section 8.1.
    fn example() -> FlowKey {
        FlowKey::ipv4(
            0,
            L4Proto::Tcp,
            0,
            Ipv4Addr::new(192, 0, 2, 1),
            40000,
            Ipv4Addr::new(198, 51, 100, 7),
            443,
        )
    }

    const EXAMPLE_BYTES: [u8; 48] = [
        0x01, 0x00, 0x06, 0x00, 0x00, 0x00, 0x40, 0x9c, 0xbb, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, //
        0xc0, 0x00, 0x02, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, //
        0xc6, 0x33, 0x64, 0x07, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00,
    ];

    #[test]
    fn golden_layout() {
        assert_eq!(size_of::<FlowKey>(), 48);
        assert_eq!(FlowKey::SIZE, 48);
        assert_eq!(offset_of!(FlowKey, kind), 0);
        assert_eq!(offset_of!(FlowKey, port), 1);
        assert_eq!(offset_of!(FlowKey, proto), 2);
        assert_eq!(offset_of!(FlowKey, flags), 3);
        assert_eq!(offset_of!(FlowKey, zone), 4);
        assert_eq!(offset_of!(FlowKey, src_port), 6);
        assert_eq!(offset_of!(FlowKey, dst_port), 8);
        assert_eq!(offset_of!(FlowKey, reserved), 10);
        assert_eq!(offset_of!(FlowKey, src_addr), 16);
        assert_eq!(offset_of!(FlowKey, dst_addr), 32);
    }

    #[test]
    fn documented_example_encodes_exactly() {
        assert_eq!(example().to_bytes(), EXAMPLE_BYTES);
        assert_eq!(FlowKey::from_bytes(&EXAMPLE_BYTES), example());
        assert_eq!(key_hash(&example()), crc32c(&EXAMPLE_BYTES));
        assert_eq!(key_hash(&example()), EXAMPLE_HASH);
        assert_eq!(bucket_index(EXAMPLE_HASH, 17), EXAMPLE_HASH & 0x1_FFFF);
    }

    /// CRC-32C of the documented example key, as stated in device.md section 10.2.
    const EXAMPLE_HASH: u32 = 0xA2C3_4890;

    #[test]
    fn ipv6_and_icmp_keys() {
        let src: Ipv6Addr = "2001:db8::1".parse().expect("literal");
        let dst: Ipv6Addr = "2001:db8::2".parse().expect("literal");
        let key = FlowKey::ipv6(
            3,
            L4Proto::Icmpv6,
            42,
            src,
            0x1234,
            dst,
            ICMPV6_ECHO_REQUEST,
        );
        let b = key.to_bytes();
        assert_eq!(&b[..10], &[2, 3, 58, 0, 42, 0, 0x34, 0x12, 0x00, 0x80]);
        assert_eq!(&b[16..32], &src.octets());
        assert_eq!(&b[32..48], &dst.octets());
        assert_eq!(FlowKey::from_bytes(&b), key);
        assert_eq!(key.kind(), Ok(KeyKind::Ipv6));
        assert_eq!(key.proto(), Ok(L4Proto::Icmpv6));
        assert_eq!(key.src_ip(), Ok(IpAddr::V6(src)));
        assert_eq!(key.dst_ip(), Ok(IpAddr::V6(dst)));
        assert_eq!(
            example().src_ip(),
            Ok(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)))
        );

        assert_eq!(ICMPV4_ECHO_REQUEST, 0x0800);
        assert_eq!(ICMPV4_ECHO_REPLY, 0x0000);
        assert_eq!(ICMPV6_ECHO_REQUEST, 0x8000);
        assert_eq!(ICMPV6_ECHO_REPLY, 0x8100);
    }

    #[test]
    fn invalid_fields_decode_to_errors() {
        let mut key = example();
        key.kind = 3;
        key.proto = 47;
        assert_eq!(key.kind(), Err(Error::UnknownKeyKind { value: 3 }));
        assert_eq!(key.proto(), Err(Error::UnknownL4Proto { value: 47 }));
        assert_eq!(key.src_ip(), Err(Error::UnknownKeyKind { value: 3 }));
    }

    #[test]
    fn arbitrary_bytes_round_trip() {
        let mut b = [0u8; 48];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::try_from((i * 7 + 1) % 256).expect("reduced");
        }
        assert_eq!(FlowKey::from_bytes(&b).to_bytes(), b);
    }

    #[test]
    fn bucket_mask() {
        assert_eq!(bucket_index(0xFFFF_FFFF, 0), 0);
        assert_eq!(bucket_index(0xFFFF_FFFF, 17), 0x1_FFFF);
        assert_eq!(bucket_index(0x1234_5678, 32), 0x1234_5678);
        assert_eq!(bucket_index(0x1234_5678, 40), 0x1234_5678);
    }
}
