//! The 64-byte action block (device.md section 9).

use core::mem::offset_of;
use core::net::IpAddr;

use bitflags::bitflags;

use crate::key::addr_bytes;
use crate::le::{Le16, Le32, put, take};

bitflags! {
    /// Action flags, action bytes 0–3.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct ActionFlags: u32 {
        /// Ethernet source address := `new_src_mac`.
        const REWRITE_SRC_MAC = 1 << 0;
        /// Ethernet destination address := `new_dst_mac`.
        const REWRITE_DST_MAC = 1 << 1;
        /// Decrement IPv4 TTL / IPv6 hop limit; TTL ≤ 1 is punted as `TTL_EXPIRED`.
        const DEC_TTL = 1 << 2;
        /// Source address and port (ICMP echo identifier) := `new_src_addr`/`new_src_port`.
        const SNAT = 1 << 3;
        /// Destination address and port (ICMP echo identifier) := `new_dst_addr`/`new_dst_port`.
        const DNAT = 1 << 4;
        /// Count, then discard.
        const DROP = 1 << 5;
        /// Punt TCP segments with SYN, FIN or RST as `TCP_CTRL`.
        const PUNT_TCP_CTRL = 1 << 6;
    }
}

/// What the device does to a packet that hits an entry (64 bytes).
///
/// Fields whose flag is clear must be zero; the builder methods keep that true.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct FlowAction {
    /// Bytes 0–3: [`ActionFlags`].
    pub flags: Le32,
    /// Byte 4: egress port.
    pub out_port: u8,
    /// Byte 5: reserved, zero.
    pub reserved0: u8,
    /// Bytes 6–11: new Ethernet source address.
    pub new_src_mac: [u8; 6],
    /// Bytes 12–17: new Ethernet destination address.
    pub new_dst_mac: [u8; 6],
    /// Bytes 18–19: new source port / echo identifier (`SNAT`).
    pub new_src_port: Le16,
    /// Bytes 20–21: new destination port / echo identifier (`DNAT`).
    pub new_dst_port: Le16,
    /// Bytes 22–31: reserved, zero.
    pub reserved1: [u8; 10],
    /// Bytes 32–47: new source address (`SNAT`), IPv4 in bytes 0–3.
    pub new_src_addr: [u8; 16],
    /// Bytes 48–63: new destination address (`DNAT`), IPv4 in bytes 0–3.
    pub new_dst_addr: [u8; 16],
}

const _: () = assert!(size_of::<FlowAction>() == 64);

impl FlowAction {
    /// Size in bytes.
    pub const SIZE: usize = 64;

    /// Forward unchanged (counted) on `out_port`.
    #[must_use]
    pub fn forward(out_port: u8) -> Self {
        Self {
            out_port,
            ..Self::default()
        }
    }

    /// Count and discard (`DROP`, `out_port` 0).
    #[must_use]
    pub fn discard() -> Self {
        Self::default().with_flags(ActionFlags::DROP)
    }

    fn with_flags(mut self, flags: ActionFlags) -> Self {
        self.flags = Le32::new(self.flags().union(flags).bits());
        self
    }

    /// Adds `REWRITE_SRC_MAC`.
    #[must_use]
    pub fn with_src_mac(mut self, mac: [u8; 6]) -> Self {
        self.new_src_mac = mac;
        self.with_flags(ActionFlags::REWRITE_SRC_MAC)
    }

    /// Adds `REWRITE_DST_MAC`.
    #[must_use]
    pub fn with_dst_mac(mut self, mac: [u8; 6]) -> Self {
        self.new_dst_mac = mac;
        self.with_flags(ActionFlags::REWRITE_DST_MAC)
    }

    /// Adds `DEC_TTL`.
    #[must_use]
    pub fn with_dec_ttl(self) -> Self {
        self.with_flags(ActionFlags::DEC_TTL)
    }

    /// Adds `SNAT` to `addr`, `port` (echo identifier for ICMP).
    #[must_use]
    pub fn with_snat(mut self, addr: IpAddr, port: u16) -> Self {
        self.new_src_addr = addr_bytes(addr);
        self.new_src_port = Le16::new(port);
        self.with_flags(ActionFlags::SNAT)
    }

    /// Adds `DNAT` to `addr`, `port` (echo identifier for ICMP).
    #[must_use]
    pub fn with_dnat(mut self, addr: IpAddr, port: u16) -> Self {
        self.new_dst_addr = addr_bytes(addr);
        self.new_dst_port = Le16::new(port);
        self.with_flags(ActionFlags::DNAT)
    }

    /// Adds `PUNT_TCP_CTRL`.
    #[must_use]
    pub fn with_punt_tcp_ctrl(self) -> Self {
        self.with_flags(ActionFlags::PUNT_TCP_CTRL)
    }

    /// The flags, including any reserved bits that are set.
    #[must_use]
    pub fn flags(&self) -> ActionFlags {
        ActionFlags::from_bits_retain(self.flags.get())
    }

    /// The 64-byte memory image.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut b = [0u8; 64];
        put(&mut b, offset_of!(Self, flags), &self.flags.to_le_bytes());
        b[offset_of!(Self, out_port)] = self.out_port;
        b[offset_of!(Self, reserved0)] = self.reserved0;
        put(&mut b, offset_of!(Self, new_src_mac), &self.new_src_mac);
        put(&mut b, offset_of!(Self, new_dst_mac), &self.new_dst_mac);
        put(
            &mut b,
            offset_of!(Self, new_src_port),
            &self.new_src_port.to_le_bytes(),
        );
        put(
            &mut b,
            offset_of!(Self, new_dst_port),
            &self.new_dst_port.to_le_bytes(),
        );
        put(&mut b, offset_of!(Self, reserved1), &self.reserved1);
        put(&mut b, offset_of!(Self, new_src_addr), &self.new_src_addr);
        put(&mut b, offset_of!(Self, new_dst_addr), &self.new_dst_addr);
        b
    }

    /// Decodes a 64-byte memory image (any bit pattern).
    #[must_use]
    pub fn from_bytes(b: &[u8; 64]) -> Self {
        Self {
            flags: Le32::from_le_bytes(take(b, offset_of!(Self, flags))),
            out_port: b[offset_of!(Self, out_port)],
            reserved0: b[offset_of!(Self, reserved0)],
            new_src_mac: take(b, offset_of!(Self, new_src_mac)),
            new_dst_mac: take(b, offset_of!(Self, new_dst_mac)),
            new_src_port: Le16::from_le_bytes(take(b, offset_of!(Self, new_src_port))),
            new_dst_port: Le16::from_le_bytes(take(b, offset_of!(Self, new_dst_port))),
            reserved1: take(b, offset_of!(Self, reserved1)),
            new_src_addr: take(b, offset_of!(Self, new_src_addr)),
            new_dst_addr: take(b, offset_of!(Self, new_dst_addr)),
        }
    }
}

#[cfg(test)]
mod tests {
    use core::mem::offset_of;
    use core::net::Ipv4Addr;

    use super::*;

    #[test]
    fn golden_layout() {
        assert_eq!(size_of::<FlowAction>(), 64);
        assert_eq!(FlowAction::SIZE, 64);
        assert_eq!(offset_of!(FlowAction, flags), 0);
        assert_eq!(offset_of!(FlowAction, out_port), 4);
        assert_eq!(offset_of!(FlowAction, reserved0), 5);
        assert_eq!(offset_of!(FlowAction, new_src_mac), 6);
        assert_eq!(offset_of!(FlowAction, new_dst_mac), 12);
        assert_eq!(offset_of!(FlowAction, new_src_port), 18);
        assert_eq!(offset_of!(FlowAction, new_dst_port), 20);
        assert_eq!(offset_of!(FlowAction, reserved1), 22);
        assert_eq!(offset_of!(FlowAction, new_src_addr), 32);
        assert_eq!(offset_of!(FlowAction, new_dst_addr), 48);
    }

    #[test]
    fn golden_flags() {
        assert_eq!(ActionFlags::REWRITE_SRC_MAC.bits(), 0x01);
        assert_eq!(ActionFlags::REWRITE_DST_MAC.bits(), 0x02);
        assert_eq!(ActionFlags::DEC_TTL.bits(), 0x04);
        assert_eq!(ActionFlags::SNAT.bits(), 0x08);
        assert_eq!(ActionFlags::DNAT.bits(), 0x10);
        assert_eq!(ActionFlags::DROP.bits(), 0x20);
        assert_eq!(ActionFlags::PUNT_TCP_CTRL.bits(), 0x40);
        assert_eq!(ActionFlags::all().bits(), 0x7F);
    }

    #[test]
    fn builder_encodes_fields() {
        let a = FlowAction::forward(1)
            .with_src_mac([2, 0, 0, 0, 0, 1])
            .with_dst_mac([2, 0, 0, 0, 0, 2])
            .with_dec_ttl()
            .with_snat(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 61000)
            .with_punt_tcp_ctrl();
        let b = a.to_bytes();
        assert_eq!(&b[0..4], &[0x4F, 0, 0, 0]);
        assert_eq!(b[4], 1);
        assert_eq!(&b[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&b[12..18], &[2, 0, 0, 0, 0, 2]);
        assert_eq!(&b[18..20], &61000u16.to_le_bytes());
        assert_eq!(&b[20..22], &[0, 0]);
        assert_eq!(&b[32..36], &[203, 0, 113, 9]);
        assert!(b[36..64].iter().all(|&x| x == 0));
        assert_eq!(FlowAction::from_bytes(&b), a);

        let d = FlowAction::discard();
        assert_eq!(d.flags(), ActionFlags::DROP);
        assert_eq!(d.out_port, 0);
        let n = FlowAction::forward(0).with_dnat(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 5)), 8080);
        assert_eq!(n.flags(), ActionFlags::DNAT);
        assert_eq!(&n.to_bytes()[48..52], &[10, 0, 0, 5]);
        assert_eq!(n.new_dst_port.get(), 8080);
    }

    #[test]
    fn arbitrary_bytes_round_trip() {
        let mut b = [0u8; 64];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = u8::try_from(255 - i).expect("small");
        }
        let a = FlowAction::from_bytes(&b);
        assert_eq!(a.to_bytes(), b);
        assert_eq!(a.flags().bits(), u32::from_le_bytes([255, 254, 253, 252]));
    }
}
