//! Connection tuples: what identifies one direction of a connection.
//!
//! A tuple is `src{addr, l4 "manip" part} + dst{addr, l4 part} + l3 family + l4 protocol`,
//! plus the zone (multi-tenant separation). Following Linux (`nf_conntrack_tuple.h`):
//!
//! | protocol | `src_l4` | `dst_l4` |
//! | --- | --- | --- |
//! | TCP, UDP, UDPLite, SCTP, DCCP | source port | destination port |
//! | ICMP / ICMPv6 | echo identifier | `type << 8 \| code` |
//! | anything else | 0 | 0 |
//!
//! The reply tuple of a connection without NAT is [`Tuple::invert`] of the original.

use core::fmt;
use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use core::num::NonZeroU64;

/// IP protocol numbers the tracker knows by name.
pub mod proto {
    /// ICMP (IPv4).
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// DCCP.
    pub const DCCP: u8 = 33;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// UDP-Lite.
    pub const UDPLITE: u8 = 136;
}

/// Layer-3 family of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Family {
    /// IPv4: the address occupies the first 4 bytes of [`Addr`], the rest is zero.
    V4 = 4,
    /// IPv6.
    V6 = 6,
}

/// An IPv4 or IPv6 address stored in 16 bytes (IPv4 in the first four, network order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    /// An IPv4 address.
    #[inline]
    #[must_use]
    pub fn v4(a: [u8; 4]) -> Self {
        // As one 128-bit value (the four bytes, then zeros): stored in one piece, so a
        // later copy's wide load is forwarded from that store instead of waiting for
        // several narrow ones to retire.
        Self(u128::from(u32::from_le_bytes(a)).to_le_bytes())
    }

    /// An IPv6 address.
    #[inline]
    #[must_use]
    pub const fn v6(a: [u8; 16]) -> Self {
        Self(a)
    }

    /// The IPv4 address in the first four bytes.
    #[inline]
    #[must_use]
    pub fn as_v4(&self) -> [u8; 4] {
        [self.0[0], self.0[1], self.0[2], self.0[3]]
    }

    /// The address as a standard library value, for the given family.
    #[must_use]
    pub fn to_ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::from(self.as_v4())),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(self.0)),
        }
    }

    /// The address of a standard library value, and its family.
    #[must_use]
    pub fn from_ip(ip: IpAddr) -> (Self, Family) {
        match ip {
            IpAddr::V4(a) => (Self::v4(a.octets()), Family::V4),
            IpAddr::V6(a) => (Self::v6(a.octets()), Family::V6),
        }
    }

    #[inline]
    fn words(&self) -> (u64, u64) {
        let mut lo = [0u8; 8];
        let mut hi = [0u8; 8];
        lo.copy_from_slice(&self.0[..8]);
        hi.copy_from_slice(&self.0[8..]);
        (u64::from_ne_bytes(lo), u64::from_ne_bytes(hi))
    }
}

/// Direction of a packet relative to its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(u8)]
pub enum Dir {
    /// The direction of the connection's first packet.
    #[default]
    Original = 0,
    /// The other direction.
    Reply = 1,
}

impl Dir {
    /// The opposite direction.
    #[inline]
    #[must_use]
    pub const fn opposite(self) -> Self {
        match self {
            Dir::Original => Dir::Reply,
            Dir::Reply => Dir::Original,
        }
    }

    /// 0 for original, 1 for reply: an index into per-direction arrays.
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// One direction of a connection. Equality covers every field, zone included.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tuple {
    /// Source address.
    pub src: Addr,
    /// Destination address.
    pub dst: Addr,
    /// Source port, or ICMP echo identifier.
    pub src_l4: u16,
    /// Destination port, or ICMP `type << 8 | code`.
    pub dst_l4: u16,
    /// IP protocol number.
    pub proto: u8,
    /// Address family.
    pub family: Family,
    /// Conntrack zone.
    pub zone: u16,
}

impl fmt::Debug for Tuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Tuple {
    /// `conntrack -L` style: `proto=6 src=10.0.0.1 dst=10.0.0.2 sport=1 dport=2 zone=0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "proto={} src={} dst={} ",
            self.proto,
            self.src.to_ip(self.family),
            self.dst.to_ip(self.family)
        )?;
        if self.is_icmp() {
            let [ty, code] = self.dst_l4.to_be_bytes();
            write!(f, "type={ty} code={code} id={}", self.src_l4)?;
        } else {
            write!(f, "sport={} dport={}", self.src_l4, self.dst_l4)?;
        }
        if self.zone != 0 {
            write!(f, " zone={}", self.zone)?;
        }
        Ok(())
    }
}

/// Why a tuple cannot be inverted (Linux: no entry is created, the packet is invalid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ICMP type {icmp_type} has no reply type")]
pub struct NotInvertible {
    /// The ICMP or ICMPv6 type that has no request/reply counterpart.
    pub icmp_type: u8,
}

/// The reply type of an ICMPv4 query type (Linux `invmap` in `nf_conntrack_proto_icmp.c`).
#[must_use]
pub fn icmpv4_reply_type(ty: u8) -> Option<u8> {
    match ty {
        8 => Some(0),
        0 => Some(8),
        13 => Some(14),
        14 => Some(13),
        15 => Some(16),
        16 => Some(15),
        17 => Some(18),
        18 => Some(17),
        _ => None,
    }
}

/// The reply type of an ICMPv6 query type (Linux `nf_conntrack_proto_icmpv6.c`).
#[must_use]
pub fn icmpv6_reply_type(ty: u8) -> Option<u8> {
    match ty {
        128 => Some(129),
        129 => Some(128),
        139 => Some(140),
        140 => Some(139),
        _ => None,
    }
}

/// Whether an ICMPv4 type may start a new connection (a request).
#[must_use]
pub fn icmpv4_is_request(ty: u8) -> bool {
    matches!(ty, 8 | 13 | 15 | 17)
}

/// Whether an ICMPv6 type may start a new connection (a request).
#[must_use]
pub fn icmpv6_is_request(ty: u8) -> bool {
    matches!(ty, 128 | 139)
}

impl Tuple {
    /// An IPv4 tuple of zone 0: `src`:`src_l4` to `dst`:`dst_l4` (ports; for ICMP the
    /// id and the type/code word, as [`Tuple`] stores them), protocol `proto`.
    #[must_use]
    pub fn v4(src: [u8; 4], src_l4: u16, dst: [u8; 4], dst_l4: u16, proto: u8) -> Self {
        Self {
            src: Addr::v4(src),
            dst: Addr::v4(dst),
            src_l4,
            dst_l4,
            proto,
            family: Family::V4,
            zone: 0,
        }
    }

    /// An IPv6 tuple of zone 0, as [`Tuple::v4`].
    #[must_use]
    pub fn v6(src: [u8; 16], src_l4: u16, dst: [u8; 16], dst_l4: u16, proto: u8) -> Self {
        Self {
            src: Addr::v6(src),
            dst: Addr::v6(dst),
            src_l4,
            dst_l4,
            proto,
            family: Family::V6,
            zone: 0,
        }
    }

    /// Whether this is an ICMP or ICMPv6 tuple (id/type/code rather than ports).
    #[inline]
    #[must_use]
    pub fn is_icmp(&self) -> bool {
        matches!(
            (self.family, self.proto),
            (Family::V4, proto::ICMP) | (Family::V6, proto::ICMPV6)
        )
    }

    /// The ICMP type, for ICMP tuples.
    #[inline]
    #[must_use]
    pub fn icmp_type(&self) -> u8 {
        self.dst_l4.to_be_bytes()[0]
    }

    /// The ICMP code, for ICMP tuples.
    #[inline]
    #[must_use]
    pub fn icmp_code(&self) -> u8 {
        self.dst_l4.to_be_bytes()[1]
    }

    /// The reply type of an ICMP tuple's type (`None`: the type has no reply).
    #[inline]
    fn icmp_reply_type(&self) -> Option<u8> {
        let ty = self.icmp_type();
        match self.family {
            Family::V4 => icmpv4_reply_type(ty),
            Family::V6 => icmpv6_reply_type(ty),
        }
    }

    /// Whether [`Tuple::invert`] succeeds (every tuple but an ICMP one whose type has
    /// no reply), without building the inverse.
    ///
    /// # Errors
    /// [`NotInvertible`], as [`Tuple::invert`].
    #[inline]
    pub fn invertible(&self) -> Result<(), NotInvertible> {
        if !self.is_icmp() || self.icmp_reply_type().is_some() {
            return Ok(());
        }
        Err(NotInvertible {
            icmp_type: self.icmp_type(),
        })
    }

    /// [`Tuple::invert`] of a tuple that [`Tuple::invertible`] accepts, without the
    /// `Result`; an ICMP tuple whose type has no reply keeps its type.
    #[inline]
    #[must_use]
    pub fn inverse(&self) -> Tuple {
        let (src_l4, dst_l4) = if self.is_icmp() {
            let ty = self.icmp_reply_type().unwrap_or(self.icmp_type());
            (self.src_l4, u16::from_be_bytes([ty, self.icmp_code()]))
        } else {
            (self.dst_l4, self.src_l4)
        };
        Tuple {
            src: self.dst,
            dst: self.src,
            src_l4,
            dst_l4,
            proto: self.proto,
            family: self.family,
            zone: self.zone,
        }
    }

    /// The tuple of the other direction when no NAT applies: addresses swapped, ports
    /// swapped, ICMP id and code kept and the type mapped request <-> reply.
    #[inline]
    pub fn invert(&self) -> Result<Tuple, NotInvertible> {
        self.invertible()?;
        Ok(self.inverse())
    }
}

/// An IPv4 tuple packed into two 64-bit words, for compact storage and for comparing
/// tuples as two word compares. Only a tuple whose addresses are plain IPv4 (the other
/// 12 bytes zero, as [`Addr::v4`] makes them) has one ([`Tuple::pack_v4`]). The second
/// word always has its top byte set: it is never zero, so `Option<PackedV4>` is two
/// words too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedV4 {
    /// Source address in the low 32 bits, destination in the high, each in memory
    /// (network) byte order.
    addrs: u64,
    /// `src_l4 | dst_l4 << 16 | zone << 32 | proto << 48 | 1 << 56`.
    rest: NonZeroU64,
}

/// The marker in the top byte of [`PackedV4::rest`].
const PACKED_MARK: u64 = 1 << 56;
/// The top byte of [`PackedV4::rest`], where the marker is.
const PACKED_MARK_BYTE: u64 = 0xFF << 56;
/// [`PACKED_MARK`], which is not zero.
const PACKED_MARK_NZ: NonZeroU64 = NonZeroU64::new(PACKED_MARK).expect("the marker is not zero");

impl PackedV4 {
    /// The tuple these words hold.
    #[inline]
    pub(crate) fn unpack(self) -> Tuple {
        let [sp0, sp1, dp0, dp1, z0, z1, proto, _] = self.rest.get().to_le_bytes();
        // Each address as one 128-bit value (see `Addr::v4`): the low word's bytes are
        // the source's, the high word's the destination's.
        Tuple {
            src: Addr(u128::from(self.addrs & 0xFFFF_FFFF).to_le_bytes()),
            dst: Addr(u128::from(self.addrs >> 32).to_le_bytes()),
            src_l4: u16::from_le_bytes([sp0, sp1]),
            dst_l4: u16::from_le_bytes([dp0, dp1]),
            proto,
            family: Family::V4,
            zone: u16::from_le_bytes([z0, z1]),
        }
    }

    /// The packed IPv4 tuple with these parts: `addrs` is the source then the
    /// destination address, as they are in an IPv4 header (network byte order).
    #[inline]
    pub(crate) fn new(addrs: [u8; 8], src_l4: u16, dst_l4: u16, proto: u8, zone: u16) -> Self {
        Self {
            addrs: u64::from_le_bytes(addrs),
            rest: PACKED_MARK_NZ
                | u64::from(src_l4)
                | (u64::from(dst_l4) << 16)
                | (u64::from(zone) << 32)
                | (u64::from(proto) << 48),
        }
    }

    /// The two words: addresses, then ports, zone and protocol in the low 7 bytes of
    /// the second (its top byte is the marker, which [`PackedV4::from_words`] sets).
    #[inline]
    pub(crate) fn words(self) -> (u64, u64) {
        (self.addrs, self.rest.get() & !PACKED_MARK_BYTE)
    }

    /// The inverse of [`PackedV4::words`] (the second word's top byte is ignored).
    #[inline]
    pub(crate) fn from_words(addrs: u64, rest: u64) -> Self {
        Self {
            addrs,
            rest: PACKED_MARK_NZ | (rest & !PACKED_MARK_BYTE),
        }
    }

    /// [`Tuple::invert`] in packed form: addresses and ports swapped, or for ICMP the
    /// id and code kept and the type mapped (`None` for a type without a reply type).
    #[inline]
    pub(crate) fn invert(self) -> Option<Self> {
        let addrs = self.addrs.rotate_left(32);
        let rest = self.rest.get();
        let high = rest & !0xFFFF_FFFF;
        // dst_l4 = type << 8 | code, so its little-endian bytes are [code, type].
        let [sp0, sp1, code, ty, _, _, proto, _] = rest.to_le_bytes();
        let low = if proto == proto::ICMP {
            // src_l4 (the id) and the code stay; the type is mapped.
            let inv = icmpv4_reply_type(ty)?;
            u64::from_le_bytes([sp0, sp1, code, inv, 0, 0, 0, 0])
        } else {
            ((rest & 0xFFFF) << 16) | ((rest >> 16) & 0xFFFF)
        };
        Some(Self {
            addrs,
            // `high` keeps the marker byte.
            rest: NonZeroU64::new(high | low)?,
        })
    }
}

impl PackedV4 {
    /// [`PackedV4::invert`] of a tuple that is not ICMP (which always inverts):
    /// addresses and ports swapped.
    #[inline]
    pub(crate) fn invert_ports(self) -> Self {
        let (addrs, rest) = self.words();
        let ports = (rest & 0xFFFF) << 16 | (rest >> 16) & 0xFFFF;
        Self::from_words(addrs.rotate_left(32), rest & !0xFFFF_FFFF | ports)
    }
}

impl Tuple {
    /// This tuple packed into two words, when it is IPv4 with plain IPv4 addresses.
    #[inline]
    pub(crate) fn pack_v4(&self) -> Option<PackedV4> {
        let s = u128::from_le_bytes(self.src.0);
        let d = u128::from_le_bytes(self.dst.0);
        // The upper 12 bytes of both addresses must be zero.
        if self.family != Family::V4 || (s | d) >> 32 != 0 {
            return None;
        }
        Some(PackedV4 {
            addrs: u64::try_from(s | (d << 32)).ok()?,
            rest: NonZeroU64::new(
                u64::from(self.src_l4)
                    | (u64::from(self.dst_l4) << 16)
                    | (u64::from(self.zone) << 32)
                    | (u64::from(self.proto) << 48)
                    | PACKED_MARK,
            )?,
        })
    }
}

/// A keyed hash of tuples, seeded per table so that remote peers cannot aim collisions.
#[derive(Debug, Clone, Copy)]
pub struct TupleHasher {
    k0: u64,
    k1: u64,
}

const MUL0: u64 = 0x9E37_79B9_7F4A_7C15;
const MUL1: u64 = 0xBF58_476D_1CE4_E5B9;

/// Folded multiply: the xor of both halves of the 128-bit product.
#[inline]
fn mix(a: u64, b: u64) -> u64 {
    let r = (u128::from(a) * u128::from(b)).to_le_bytes();
    let (lo, hi) = r.split_at(8);
    let mut l = [0u8; 8];
    let mut h = [0u8; 8];
    l.copy_from_slice(lo);
    h.copy_from_slice(hi);
    u64::from_le_bytes(l) ^ u64::from_le_bytes(h)
}

impl TupleHasher {
    /// A hasher with the given seed (take it from a random source or a test's seed).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            k0: mix(seed ^ MUL0, MUL1),
            k1: mix(seed.rotate_left(32) ^ MUL1, MUL0) | 1,
        }
    }

    /// Hash of one tuple (direction-sensitive).
    #[inline]
    #[must_use]
    pub fn hash(&self, t: &Tuple) -> u64 {
        let (s0, s1) = t.src.words();
        let (d0, d1) = t.dst.words();
        let rest = u64::from(t.src_l4)
            | (u64::from(t.dst_l4) << 16)
            | (u64::from(t.proto) << 32)
            | (u64::from(t.family as u8) << 40)
            | (u64::from(t.zone) << 48);
        self.finish(s0, s1, d0, d1, rest)
    }

    /// Hash that is the same for a tuple and its inverse (without NAT): steers both
    /// directions of a flow to the same worker.
    #[inline]
    #[must_use]
    pub fn symmetric_hash(&self, t: &Tuple) -> u64 {
        let a = (t.src, t.src_l4);
        let b = (t.dst, t.dst_l4);
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let (s0, s1) = lo.0.words();
        let (d0, d1) = hi.0.words();
        let rest = if t.is_icmp() {
            // The type differs between request and reply; only the id is symmetric.
            u64::from(t.src_l4)
        } else {
            u64::from(lo.1) | (u64::from(hi.1) << 16)
        } | (u64::from(t.proto) << 32)
            | (u64::from(t.family as u8) << 40)
            | (u64::from(t.zone) << 48);
        self.finish(s0, s1, d0, d1, rest)
    }

    /// The connection table's index hash: the same for a tuple and its inverse
    /// (without NAT), like [`TupleHasher::symmetric_hash`], and cheaper. Each endpoint
    /// (address and port; for ICMP the id, which both directions carry) is hashed on its
    /// own and the two are added, so swapping them changes nothing; both index cells of
    /// a connection without NAT then start their probe at the same place.
    #[inline]
    #[must_use]
    pub fn pair_hash(&self, t: &Tuple) -> u64 {
        let (s0, s1) = t.src.words();
        let (d0, d1) = t.dst.words();
        let (sp, dp) = if t.is_icmp() {
            (t.src_l4, t.src_l4)
        } else {
            (t.src_l4, t.dst_l4)
        };
        self.pair([s0, s1, d0, d1], sp, dp, t.proto, t.family, t.zone)
    }

    /// [`TupleHasher::pair_hash`] of [`PackedV4::unpack`] of `key`, from the packed
    /// words (the established path hashes the tuple it read from the frame this way).
    /// Always inlined, with [`TupleHasher::pair`]'s body (a call cost a third of the
    /// hash in moving its arguments through the stack; the zero address words fold).
    #[inline(always)]
    #[must_use]
    pub(crate) fn pair_hash_v4(&self, key: PackedV4) -> u64 {
        let (addrs, rest) = key.words();
        let [s0, s1, s2, s3, d0, d1, d2, d3] = addrs.to_le_bytes();
        // `Addr::words` of an IPv4 address: its 4 bytes then zeros, native order.
        let s = u64::from_ne_bytes([s0, s1, s2, s3, 0, 0, 0, 0]);
        let d = u64::from_ne_bytes([d0, d1, d2, d3, 0, 0, 0, 0]);
        let [sp0, sp1, dp0, dp1, z0, z1, proto, _] = rest.to_le_bytes();
        let sp = u16::from_le_bytes([sp0, sp1]);
        let dp = if proto == proto::ICMP {
            sp
        } else {
            u16::from_le_bytes([dp0, dp1])
        };
        let zone = u16::from_le_bytes([z0, z1]);
        self.pair_inline([s, 0, d, 0], sp, dp, proto, Family::V4, zone)
    }

    /// [`TupleHasher::pair_hash`] of the address words `[src0, src1, dst0, dst1]` and
    /// the endpoints' L4 parts.
    #[inline]
    fn pair(&self, w: [u64; 4], sp: u16, dp: u16, proto: u8, family: Family, zone: u16) -> u64 {
        self.pair_inline(w, sp, dp, proto, family, zone)
    }

    /// [`TupleHasher::pair`], always inlined.
    #[inline(always)]
    fn pair_inline(
        &self,
        w: [u64; 4],
        sp: u16,
        dp: u16,
        proto: u8,
        family: Family,
        zone: u16,
    ) -> u64 {
        let [s0, s1, d0, d1] = w;
        let a = mix(s0 ^ (u64::from(sp) << 32) ^ self.k0, s1 ^ self.k1);
        let b = mix(d0 ^ (u64::from(dp) << 32) ^ self.k0, d1 ^ self.k1);
        let rest = u64::from(proto) | (u64::from(family as u8) << 8) | (u64::from(zone) << 16);
        mix(a.wrapping_add(b) ^ rest ^ MUL1, MUL0 ^ self.k1)
    }

    #[inline]
    fn finish(&self, s0: u64, s1: u64, d0: u64, d1: u64, rest: u64) -> u64 {
        let a = mix(s0 ^ self.k0, d0 ^ MUL0);
        let b = mix(s1 ^ self.k1, d1 ^ MUL1);
        let c = mix(rest ^ self.k0, self.k1);
        mix(a ^ b.rotate_left(23) ^ c, MUL0 ^ self.k1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, proto: u8) -> Tuple {
        Tuple::v4(src, sp, dst, dp, proto)
    }

    #[test]
    fn pair_hash_is_the_same_for_a_tuple_and_its_inverse() {
        let h = TupleHasher::new(7);
        let six = |a: u8, sp: u16, b: u8, dp: u16, proto| Tuple {
            zone: 3,
            ..Tuple::v6(
                [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, a],
                sp,
                [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b],
                dp,
                proto,
            )
        };
        let tuples = [
            v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, proto::TCP),
            v4([10, 0, 0, 1], 5353, [192, 0, 2, 1], 53, proto::UDP),
            v4([10, 0, 0, 1], 0x1234, [10, 0, 0, 2], 8 << 8, proto::ICMP),
            v4([10, 0, 0, 1], 0, [10, 0, 0, 2], 0, 47),
            six(1, 40000, 2, 443, proto::TCP),
            six(1, 0x77, 2, 128 << 8, proto::ICMPV6),
        ];
        for t in tuples {
            let r = t.invert().expect("inverts");
            assert_ne!(t, r);
            assert_eq!(h.pair_hash(&t), h.pair_hash(&r), "{t}");
        }
        // Different connections, different hashes (ports swapped between the ends,
        // other port, other zone, other key).
        let a = v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, proto::TCP);
        let swapped = v4([10, 0, 0, 1], 80, [192, 0, 2, 1], 40000, proto::TCP);
        let other_port = v4([10, 0, 0, 1], 40001, [192, 0, 2, 1], 80, proto::TCP);
        let other_zone = Tuple { zone: 1, ..a };
        for b in [swapped, other_port, other_zone] {
            assert_ne!(h.pair_hash(&a), h.pair_hash(&b), "{b}");
        }
        assert_ne!(h.pair_hash(&a), TupleHasher::new(8).pair_hash(&a));
    }

    #[test]
    fn invert_ports_swaps_everything() {
        let t = v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, proto::TCP);
        let r = t.invert().expect("tcp inverts");
        assert_eq!(r, v4([192, 0, 2, 1], 80, [10, 0, 0, 1], 40000, proto::TCP));
        assert_eq!(r.invert().expect("inverts back"), t);
    }

    #[test]
    fn invert_icmp_maps_type_keeps_id_and_code() {
        let req = v4([10, 0, 0, 1], 0x1234, [10, 0, 0, 2], 8 << 8, proto::ICMP);
        let rep = req.invert().expect("echo request inverts");
        assert_eq!(rep.src_l4, 0x1234);
        assert_eq!(rep.icmp_type(), 0);
        assert_eq!(rep.src, req.dst);
        for (a, b) in [(13u8, 14u8), (15, 16), (17, 18)] {
            let t = v4(
                [1, 1, 1, 1],
                7,
                [2, 2, 2, 2],
                u16::from(a) << 8,
                proto::ICMP,
            );
            assert_eq!(t.invert().expect("query").icmp_type(), b);
        }
        let unreachable = v4([1, 1, 1, 1], 0, [2, 2, 2, 2], 3 << 8, proto::ICMP);
        assert_eq!(
            unreachable.invert(),
            Err(NotInvertible { icmp_type: 3 }),
            "error types have no reply type"
        );
    }

    #[test]
    fn invert_icmpv6() {
        let mut t = v4([0; 4], 9, [0; 4], 128 << 8, proto::ICMPV6);
        t.family = Family::V6;
        t.src = Addr::v6([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(t.invert().expect("echo").icmp_type(), 129);
        t.dst_l4 = 135 << 8; // neighbour solicitation
        assert!(t.invert().is_err());
    }

    #[test]
    fn zone_separates_tuples_and_hashes() {
        let h = TupleHasher::new(7);
        let a = v4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, proto::UDP);
        let mut b = a;
        b.zone = 5;
        assert_ne!(a, b);
        assert_ne!(h.hash(&a), h.hash(&b));
    }

    #[test]
    fn symmetric_hash_matches_both_directions() {
        let h = TupleHasher::new(0xdead_beef);
        let t = v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 53, proto::UDP);
        let r = t.invert().expect("udp");
        assert_eq!(h.symmetric_hash(&t), h.symmetric_hash(&r));
        assert_ne!(h.hash(&t), h.hash(&r));
        let echo = v4([10, 0, 0, 1], 77, [192, 0, 2, 1], 8 << 8, proto::ICMP);
        let echo_r = echo.invert().expect("echo");
        assert_eq!(h.symmetric_hash(&echo), h.symmetric_hash(&echo_r));
    }

    #[test]
    fn seeds_change_the_hash() {
        let t = v4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, proto::UDP);
        assert_ne!(TupleHasher::new(1).hash(&t), TupleHasher::new(2).hash(&t));
    }

    #[test]
    fn display_like_conntrack() {
        let t = v4([10, 0, 0, 1], 40000, [192, 0, 2, 1], 80, proto::TCP);
        assert_eq!(
            t.to_string(),
            "proto=6 src=10.0.0.1 dst=192.0.2.1 sport=40000 dport=80"
        );
    }

    #[test]
    fn only_plain_ipv4_tuples_pack() {
        let t = v4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, proto::UDP);
        assert!(t.pack_v4().is_some());
        let mut v6 = t;
        v6.family = Family::V6;
        assert_eq!(v6.pack_v4(), None);
        let mut wide = t;
        wide.dst.0[15] = 1;
        assert_eq!(wide.pack_v4(), None);
        let mut wide = t;
        wide.src.0[4] = 1;
        assert_eq!(wide.pack_v4(), None);
        assert_eq!(size_of::<Option<PackedV4>>(), 16);
    }

    proptest::proptest! {
        #[test]
        fn packed_v4_round_trips_and_inverts_like_the_tuple(
            src in proptest::prelude::any::<[u8; 4]>(),
            dst in proptest::prelude::any::<[u8; 4]>(),
            sp in proptest::prelude::any::<u16>(),
            ty in proptest::prelude::prop_oneof![
                proptest::prelude::Just(8u8), proptest::prelude::Just(0u8),
                proptest::prelude::Just(13u8), proptest::prelude::Just(3u8),
                proptest::prelude::any::<u8>()],
            code in proptest::prelude::any::<u8>(),
            dp in proptest::prelude::any::<u16>(),
            proto in proptest::prelude::prop_oneof![
                proptest::prelude::Just(proto::ICMP), proptest::prelude::Just(proto::UDP),
                proptest::prelude::Just(proto::TCP), proptest::prelude::any::<u8>()],
            zone in proptest::prelude::any::<u16>(),
        ) {
            let dst_l4 = if proto == proto::ICMP { u16::from_be_bytes([ty, code]) } else { dp };
            let t = Tuple { zone, ..v4(src, sp, dst, dst_l4, proto) };
            let p = t.pack_v4().expect("plain IPv4 packs");
            proptest::prop_assert_eq!(p.unpack(), t);
            let inv = t.invert().ok();
            // The inverse, field by field (IPv4 and the same tuple as IPv6): endpoints
            // swapped, the rest kept; ports swapped, or an ICMP id kept with its code.
            let mut t6 = t;
            t6.family = Family::V6;
            for t in [t, t6] {
                let Ok(r) = t.invert() else {
                    proptest::prop_assert!(t.is_icmp());
                    continue;
                };
                proptest::prop_assert_eq!(t.invertible(), Ok(()));
                proptest::prop_assert_eq!(
                    (r.src, r.dst, r.proto, r.family, r.zone),
                    (t.dst, t.src, t.proto, t.family, t.zone)
                );
                if t.is_icmp() {
                    proptest::prop_assert_eq!((r.src_l4, r.icmp_code()), (t.src_l4, t.icmp_code()));
                } else {
                    proptest::prop_assert_eq!((r.src_l4, r.dst_l4), (t.dst_l4, t.src_l4));
                }
            }
            proptest::prop_assert_eq!(p.invert(), inv.and_then(|r| r.pack_v4()));
            proptest::prop_assert_eq!(p.invert().map(PackedV4::unpack), inv);
            if !t.is_icmp() {
                proptest::prop_assert_eq!(Some(p.invert_ports()), p.invert());
            }
            // An involution where it is defined (`ConnTable::find_v4` relies on it).
            if let Some(r) = p.invert() {
                proptest::prop_assert_eq!(r.invert(), Some(p));
            }
            // Built from the frame's bytes, it is the same key with the same index hash.
            let mut addrs = [0u8; 8];
            addrs[..4].copy_from_slice(&src);
            addrs[4..].copy_from_slice(&dst);
            proptest::prop_assert_eq!(PackedV4::new(addrs, sp, dst_l4, proto, zone), p);
            let h = TupleHasher::new(u64::from(sp) << 17 ^ u64::from(zone));
            proptest::prop_assert_eq!(h.pair_hash_v4(p), h.pair_hash(&t));
        }
    }
}
