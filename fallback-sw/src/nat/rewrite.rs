//! Rewriting packets of translated connections, and the routing step (MAC rewrite,
//! TTL decrement, ICMP time exceeded).
//!
//! [`rewrite`] makes a packet look like the inverse of the other direction's tuple
//! (Linux `nf_nat_packet`): an ORIGINAL-direction packet gets its source rewritten when
//! `SRC_NAT` is set and its destination when `DST_NAT` is set; a REPLY-direction packet
//! uses the crossed bits (destination ⇐ `SRC_NAT`, source ⇐ `DST_NAT`). Checksums are
//! updated incrementally (RFC 1624): the IPv4 header checksum for each address, the
//! TCP/UDP/DCCP/UDP-Lite checksum for the pseudo-header address and the port, the ICMP
//! checksum for the echo identifier (no pseudo-header), SCTP's CRC32c recomputed. A UDP
//! checksum of 0 stays 0; an updated UDP checksum of 0 is written as `0xFFFF`.
//!
//! ICMP errors go to [`super::icmp::translate_error`], which translates the quoted
//! packet as well. The established packet path first tries
//! `rewrite_one_endpoint_at` (IPv4 UDP/TCP translated at one endpoint, from the
//! entry's packed tuple: the same bytes in fewer instructions).

use core::net::Ipv4Addr;

use super::alloc::Manip;
use crate::checksum::{self, finish, udp_finish, update16};
use crate::table::{Status, Translated};
use crate::tuple::{Dir, PackedV4, Tuple, proto};
use crate::wire::{L3, L4, ParsedPacket, V4Layout};

/// Why a packet could not be rewritten (the caller drops it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The frame is shorter than a field to rewrite.
    #[error("frame truncated: field at {offset} needs {needed} bytes, frame has {len}")]
    Truncated {
        /// Offset of the field.
        offset: usize,
        /// Bytes needed from that offset.
        needed: usize,
        /// Frame length.
        len: usize,
    },
    /// NAT bits on an IPv6 connection (IPv6 is not translated in this version).
    #[error("ipv6 nat is not supported")]
    Ipv6Nat,
    /// The packet is not IP.
    #[error("not an ip packet")]
    NotIp,
    /// An ICMP error with a bad ICMP checksum (Linux drops it before translating).
    #[error("icmp error has a bad checksum")]
    BadIcmpChecksum,
    /// An ICMP redirect about a translated connection (Linux drops it).
    #[error("icmp redirect about a translated connection")]
    RedirectWithNat,
    /// The quoted packet of an ICMP error could not be read.
    #[error("icmp error quote unreadable")]
    BadQuote(#[source] crate::wire::ParseError),
}

/// How much of the L4 header a manip touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum L4Mode {
    /// A whole packet: ports / id and the L4 checksum.
    Full,
    /// A packet quoted in an ICMP error: ports / id; the TCP checksum only if the whole
    /// 20-byte header is there, the UDP checksum only if nonzero, no SCTP CRC.
    Quoted,
    /// Addresses only (the outer header of an ICMP error).
    None,
}

/// Where an IPv4 packet sits in a frame.
#[derive(Debug, Clone, Copy)]
pub(crate) struct V4At {
    pub(crate) l3: usize,
    pub(crate) l4: usize,
    /// End of the L4 bytes present.
    pub(crate) end: usize,
    pub(crate) proto: u8,
    /// False for a non-first fragment: no L4 header.
    pub(crate) has_l4: bool,
}

fn need(frame: &[u8], offset: usize, needed: usize) -> Result<(), RewriteError> {
    if offset.checked_add(needed).is_none_or(|e| e > frame.len()) {
        Err(RewriteError::Truncated {
            offset,
            needed,
            len: frame.len(),
        })
    } else {
        Ok(())
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The `(src addr, dst addr, src l4, dst l4)` a packet must carry to look like the
/// inverse of `other` (the ICMP id stays in the source slot; the type is not touched).
#[inline]
pub(crate) fn inverse_fields(other: &Tuple) -> ([u8; 4], [u8; 4], u16, u16) {
    let (sl4, dl4) = if other.is_icmp() {
        (other.src_l4, other.dst_l4)
    } else {
        (other.dst_l4, other.src_l4)
    };
    (other.dst.as_v4(), other.src.as_v4(), sl4, dl4)
}

/// The RFC 1624 terms of a 32-bit field changing from `old` to `new`: `~m + m'` for
/// both 16-bit halves, to add to `~HC`.
#[inline]
fn delta32(old: u32, new: u32) -> u64 {
    let (o, n) = (old.to_be_bytes(), new.to_be_bytes());
    u64::from(!u16::from_be_bytes([o[0], o[1]]))
        + u64::from(!u16::from_be_bytes([o[2], o[3]]))
        + u64::from(u16::from_be_bytes([n[0], n[1]]))
        + u64::from(u16::from_be_bytes([n[2], n[3]]))
}

/// Linux `nf_nat_ipv4_manip_pkt`: sets the `manip` address to `addr` and the port (or,
/// for an ICMP query, the id) to `l4`, fixing checksums per `mode`.
///
/// The address's checksum terms are computed once and serve the IPv4 header checksum
/// and the pseudo-header of the L4 checksum; the L4 checksum takes the address and the
/// port in one RFC 1624 update (`~(~HC + ~a + a' + ~p + p')`, equal to the two updates
/// one after the other: both fold the same nonzero sum). Inlined into [`rewrite`], whose
/// per-packet cost it is.
#[inline(always)]
pub(crate) fn manip_v4(
    frame: &mut [u8],
    at: &V4At,
    manip: Manip,
    addr: [u8; 4],
    l4: u16,
    mode: L4Mode,
) -> Result<(), RewriteError> {
    need(frame, at.l3, 20)?;
    let a_off = at.l3 + if manip == Manip::Src { 12 } else { 16 };
    let old = be32(frame, a_off);
    let new = u32::from_be_bytes(addr);
    let addr_terms = delta32(old, new);
    if old != new {
        frame[a_off..a_off + 4].copy_from_slice(&addr);
        let c = be16(frame, at.l3 + 10);
        put16(frame, at.l3 + 10, finish(u64::from(!c) + addr_terms));
    }
    if mode == L4Mode::None || !at.has_l4 {
        return Ok(());
    }
    let avail = at.end.saturating_sub(at.l4);
    match at.proto {
        proto::TCP | proto::UDP | proto::DCCP | proto::UDPLITE | proto::SCTP => {
            need(frame, at.l4, 4)?;
            let p_off = at.l4 + if manip == Manip::Src { 0 } else { 2 };
            let old_p = be16(frame, p_off);
            put16(frame, p_off, l4);
            let csum_at = match at.proto {
                proto::TCP => 16,
                proto::SCTP => 8,
                _ => 6,
            };
            let whole = match (mode, at.proto) {
                (L4Mode::Quoted, proto::TCP) => avail >= 20,
                (L4Mode::Quoted, proto::SCTP) => false,
                _ => avail >= csum_at + 2,
            };
            if !whole {
                return Ok(());
            }
            need(frame, at.l4, csum_at + 2)?;
            let c_off = at.l4 + csum_at;
            let c = be16(frame, c_off);
            let upd =
                |c: u16| finish(u64::from(!c) + addr_terms + u64::from(!old_p) + u64::from(l4));
            let v = match at.proto {
                // An absent UDP checksum (0) stays absent; an updated 0 is sent as 0xFFFF
                // (`checksum::udp_adjust`, written out so that it inlines here).
                proto::UDP if c == 0 => 0,
                proto::UDP => udp_finish(upd(c)),
                proto::SCTP => {
                    let end = at.end.min(frame.len());
                    frame[c_off..c_off + 4].copy_from_slice(&[0; 4]);
                    let crc = crc32c(&frame[at.l4..end]);
                    frame[c_off..c_off + 4].copy_from_slice(&crc.to_le_bytes());
                    return Ok(());
                }
                _ => upd(c),
            };
            put16(frame, c_off, v);
        }
        proto::ICMP => {
            need(frame, at.l4, 8)?;
            if !crate::wire::icmp::is_query(frame[at.l4]) {
                return Ok(());
            }
            let old_id = be16(frame, at.l4 + 4);
            if old_id == l4 {
                // Nothing the checksum covers changes: leave it alone (an update with
                // a null delta turns a 0xFFFF checksum into 0x0000).
                return Ok(());
            }
            put16(frame, at.l4 + 4, l4);
            let c = be16(frame, at.l4 + 2);
            let mut v = update16(c, old_id, l4);
            // RFC 1624 eqn. 3 never yields 0xFFFF, but an ICMP message (no pseudo-header)
            // whose other words are all zero needs exactly that: its sum is +0, and a
            // 0x0000 checksum would not verify. (0xFFFF also verifies whenever 0x0000
            // does, so only the rare all-zero case is looked at.)
            if v == 0 && mode == L4Mode::Full {
                let end = at.end.min(frame.len());
                let msg = frame.get(at.l4..end).unwrap_or_default();
                if msg
                    .iter()
                    .enumerate()
                    .all(|(i, b)| *b == 0 || i == 2 || i == 3)
                {
                    v = 0xFFFF;
                }
            }
            put16(frame, at.l4 + 2, v);
        }
        _ => {}
    }
    Ok(())
}

/// The manips a packet of direction `dir` gets under `status`:
/// `(source manip, destination manip)`.
#[inline]
#[must_use]
pub fn manips(status: Status, dir: Dir) -> (bool, bool) {
    let s = status.contains(Status::SRC_NAT);
    let d = status.contains(Status::DST_NAT);
    match dir {
        Dir::Original => (s, d),
        Dir::Reply => (d, s),
    }
}

/// Rewrites a packet of a tracked connection (`tuples` = `[original, reply]`, `dir`
/// its direction; for an ICMP error, the direction of the RELATED match) so that it
/// looks like the inverse of the other direction's tuple. A no-op when the status has
/// no NAT bit.
///
/// # Errors
/// [`RewriteError`]; the caller drops the packet.
pub fn rewrite(
    frame: &mut [u8],
    pkt: &ParsedPacket,
    tuples: &[Tuple; 2],
    status: Status,
    dir: Dir,
) -> Result<(), RewriteError> {
    if let L4::IcmpError { .. } = pkt.l4 {
        return super::icmp::translate_error(frame, pkt, tuples, status, dir);
    }
    rewrite_to_inverse(frame, pkt, &tuples[dir.opposite().index()], status, dir)
}

/// [`rewrite`] for a packet that is not an ICMP error (the packet path of an
/// established connection), given only the tuple of the other direction, `other`: the
/// packet is made to look like its inverse. An ICMP error is left alone (it needs both
/// tuples: use [`rewrite`]).
///
/// # Errors
/// [`RewriteError`]; the caller drops the packet.
#[inline]
pub fn rewrite_to_inverse(
    frame: &mut [u8],
    pkt: &ParsedPacket,
    other: &Tuple,
    status: Status,
    dir: Dir,
) -> Result<(), RewriteError> {
    if let L4::IcmpError { .. } = pkt.l4 {
        return Ok(());
    }
    let (src_m, dst_m) = manips(status, dir);
    if !src_m && !dst_m {
        return Ok(());
    }
    let at = match pkt.l3 {
        L3::Ipv4 => v4_at(pkt),
        L3::Ipv6 => return Err(RewriteError::Ipv6Nat),
        L3::Other { .. } => return Err(RewriteError::NotIp),
    };
    let (sa, da, sl4, dl4) = inverse_fields(other);
    if src_m {
        manip_v4(frame, &at, Manip::Src, sa, sl4, L4Mode::Full)?;
    }
    if dst_m {
        let l4 = if other.is_icmp() { sl4 } else { dl4 };
        manip_v4(frame, &at, Manip::Dst, da, l4, L4Mode::Full)?;
    }
    Ok(())
}

/// [`rewrite_one_endpoint_at`] of a parsed packet (how the tests call it).
#[cfg(test)]
pub(crate) fn rewrite_one_endpoint_v4(
    frame: &mut [u8],
    pkt: &ParsedPacket,
    other: PackedV4,
    status: Status,
    dir: Dir,
) -> bool {
    pkt.l3 == L3::Ipv4
        && rewrite_one_endpoint_at(frame, &pkt.l4, V4Layout::of(pkt), other, status, dir)
}

/// The common case of [`rewrite_to_inverse`], without building a [`Tuple`]: an IPv4
/// TCP or UDP packet whose L4 header up to its checksum lies inside the IP packet, of
/// a connection translated at one endpoint (SNAT, masquerade, DNAT, a VIP backend:
/// one manip for either direction). `other` is the other direction's tuple, packed.
/// Returns `true` when it rewrote the packet; `false`, having written nothing, for
/// every other packet (the caller then takes [`rewrite_to_inverse`], which also
/// reports the errors).
///
/// The bytes written are those of [`manip_v4`] in `Full` mode: the same RFC 1624 sums
/// (`~HC + ~a + a'` for the header, `~HC + ~a + a' + ~p + p'` for TCP/UDP, a UDP
/// checksum of 0 left alone and an updated 0 sent as `0xFFFF`), taken over the frame's
/// words read little-endian and added with end-around carry in a different order
/// (the address's terms as 32-bit words first). None of it changes the result: a
/// folded sum is the one value in `1..=0xFFFF` of the sum's residue modulo `0xFFFF`,
/// or 0 when every term is 0; swapping the bytes of every term multiplies the residue
/// by 256 and swaps the folded value (RFC 1071 §2(B)); a 32-bit word has the residue of
/// its two halves; and each end-around-carry addition keeps the residue, and gives 0
/// only from two zeros. (The property test `fast_rewrite_is_the_generic_one` checks it
/// against [`rewrite_to_inverse`].)
///
/// The packet is IPv4, at `at` in `frame`, with transport layer `l4` (the established
/// path has these without a [`ParsedPacket`]).
#[inline(always)]
pub(crate) fn rewrite_one_endpoint_at(
    frame: &mut [u8],
    l4: &L4,
    at: V4Layout,
    other: PackedV4,
    status: Status,
    dir: Dir,
) -> bool {
    let (src_m, dst_m) = manips(status, dir);
    if src_m == dst_m {
        return false;
    }
    // The packet becomes the inverse of `other`: its source is `other`'s destination
    // (address in the high half of the packed word, port in bits 16..32), its
    // destination `other`'s source (low half, bits 0..16). The address as the
    // little-endian word of its bytes, as the frame holds it.
    let (addrs, rest) = other.words();
    let (new_a, new_p) = if src_m {
        (addrs >> 32, rest >> 16 & 0xFFFF)
    } else {
        (addrs & 0xFFFF_FFFF, rest & 0xFFFF)
    };
    let (Ok(addr), Ok(port)) = (u32::try_from(new_a), u16::try_from(new_p)) else {
        return false;
    };
    rewrite_endpoint_at(
        frame,
        l4,
        at,
        Translated {
            src: src_m,
            addr,
            port,
        },
    )
}

/// [`rewrite_one_endpoint_at`] with the endpoint to write already known (the
/// established path reads it from the entry's key: [`crate::table::Entry`]'s
/// `translated`, without the other direction's tuple).
#[inline(always)]
pub(crate) fn rewrite_endpoint_at(frame: &mut [u8], l4: &L4, at: V4Layout, to: Translated) -> bool {
    match l4 {
        L4::Udp { .. } => rewrite_one_endpoint::<true>(frame, at, to),
        L4::Tcp(_) => rewrite_one_endpoint::<false>(frame, at, to),
        _ => false,
    }
}

/// [`rewrite_endpoint_at`] for UDP (`UDP`) or TCP.
#[inline(always)]
fn rewrite_one_endpoint<const UDP: bool>(frame: &mut [u8], at: V4Layout, to: Translated) -> bool {
    let csum_at = if UDP { 6 } else { 16 };
    let V4Layout { l3, l4, end } = at;
    // The L4 header up to its checksum inside the IP packet (as `manip_v4` reads the
    // packet: its length decides what is rewritten), and in the frame: the bytes
    // written, cut to their end so that the views below need no further checks (for
    // the plain frame's constant offsets, one compare of the frame's length).
    let seg_end = l4 + csum_at + 2;
    if l3 + 20 > l4 || seg_end > end {
        return false;
    }
    let Some(frame) = frame.get_mut(..seg_end) else {
        return false;
    };
    let (head, seg) = frame.split_at_mut(l4);
    let Some(ip) = head.get_mut(l3..).and_then(|h| h.first_chunk_mut::<20>()) else {
        return false;
    };
    let Some(seg) = seg.get_mut(..csum_at + 2) else {
        return false;
    };
    let Translated {
        src,
        addr: new_a,
        port: new_p,
    } = to;
    let (a_at, p_at) = if src { (12, 0) } else { (16, 2) };
    let le16 = |b: &[u8], at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
    let old_a = u32::from_le_bytes([ip[a_at], ip[a_at + 1], ip[a_at + 2], ip[a_at + 3]]);
    // The address's terms `~a + a'`, reduced once to 16 bits for both checksums.
    let a32 = ones_add32(!old_a, new_a);
    let [t0, t1, t2, t3] = a32.to_le_bytes();
    let addr_terms = ones_add(u16::from_le_bytes([t0, t1]), u16::from_le_bytes([t2, t3]));
    if old_a != new_a {
        let c = le16(ip, 10);
        ip[a_at..a_at + 4].copy_from_slice(&new_a.to_le_bytes());
        ip[10..12].copy_from_slice(&(!ones_add(!c, addr_terms)).to_le_bytes());
    }
    let new_p = new_p.to_be_bytes();
    let old_p = le16(seg, p_at);
    seg[p_at..p_at + 2].copy_from_slice(&new_p);
    let c = le16(seg, csum_at);
    if UDP && c == 0 {
        return true;
    }
    let port_terms = ones_add(!old_p, u16::from_le_bytes(new_p));
    let v = !ones_add(ones_add(!c, addr_terms), port_terms);
    let v = if UDP { udp_finish(v) } else { v };
    seg[csum_at..csum_at + 2].copy_from_slice(&v.to_le_bytes());
    true
}

/// One's-complement addition of two 16-bit words (end-around carry): the value
/// [`checksum::fold`] gives for their sum (0 only when both are 0).
#[inline(always)]
fn ones_add(a: u16, b: u16) -> u16 {
    let (s, carry) = a.overflowing_add(b);
    // With a carry, `s` is at most 0xFFFE: adding it back does not overflow.
    s.wrapping_add(u16::from(carry))
}

/// [`ones_add`] on 32-bit words: its halves have the residue of the 16-bit sum of
/// the four halves, and it is 0 only when both inputs are.
#[inline(always)]
fn ones_add32(a: u32, b: u32) -> u32 {
    let (s, carry) = a.overflowing_add(b);
    s.wrapping_add(u32::from(carry))
}

pub(crate) fn v4_at(pkt: &ParsedPacket) -> V4At {
    V4At {
        l3: usize::from(pkt.l3_offset),
        l4: usize::from(pkt.l4_offset),
        end: pkt.l3_end(),
        proto: pkt.protocol,
        has_l4: !matches!(pkt.l4, L4::None),
    }
}

/// CRC32c (Castagnoli), bitwise: SCTP's checksum. Only used when NAT changes an SCTP
/// port, which is rare enough not to need a table.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0x82F6_3B78 & mask);
        }
    }
    !crc
}

/// The TTL (hop limit) was 0 or 1: the packet must not be forwarded; send an ICMP time
/// exceeded ([`icmp_time_exceeded`]) and drop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ttl {ttl} expired in transit")]
pub struct TtlExpired {
    /// The TTL or hop limit the packet arrived with.
    pub ttl: u8,
}

/// The routing step of a forwarded packet: Ethernet addresses rewritten, TTL (hop limit)
/// decremented with the IPv4 header checksum updated. Independent of [`rewrite`] (the
/// order does not matter), but on `Err` build the ICMP error from the frame before any
/// NAT rewrite, so that the sender sees its own packet quoted. The frame is unchanged
/// on error.
///
/// # Errors
/// [`TtlExpired`] when the TTL is 0 or 1. Non-IP frames only get the MAC rewrite.
pub fn route_rewrite(
    frame: &mut [u8],
    pkt: &ParsedPacket,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> Result<(), TtlExpired> {
    let l3 = usize::from(pkt.l3_offset);
    if pkt.is_ip() {
        let ttl = pkt.ttl;
        if ttl <= 1 {
            return Err(TtlExpired { ttl });
        }
        match pkt.l3 {
            L3::Ipv4 if frame.len() >= l3 + 20 => {
                let old = be16(frame, l3 + 8);
                frame[l3 + 8] = ttl - 1;
                let new = be16(frame, l3 + 8);
                let c = be16(frame, l3 + 10);
                put16(frame, l3 + 10, update16(c, old, new));
            }
            L3::Ipv6 if frame.len() >= l3 + 40 => frame[l3 + 7] = ttl - 1,
            _ => {}
        }
    }
    if frame.len() >= 12 {
        frame[0..6].copy_from_slice(&dst_mac);
        frame[6..12].copy_from_slice(&src_mac);
    }
    Ok(())
}

/// Builds the ICMP time exceeded (type 11, code 0) a router sends for the IPv4 packet
/// `pkt` in `frame` whose TTL ran out (RFC 792, RFC 1812 §4.3.2.3, §5.3.1): into `out`,
/// the Ethernet header with the addresses swapped (VLAN tags kept), an IPv4 header from
/// `gateway_addr` to the packet's source (TOS 0xC0, TTL 64), and the ICMP message
/// quoting the packet's IP header and the first 8 bytes of its payload.
///
/// Returns the frame length, or 0 when no error may be sent (RFC 1812 §4.3.2.7: the
/// packet is an ICMP error, a non-first fragment, or from or to a broadcast, multicast
/// or unspecified address; or it is not IPv4) or `out` is too small.
#[must_use]
pub fn icmp_time_exceeded(
    frame: &[u8],
    pkt: &ParsedPacket,
    gateway_addr: Ipv4Addr,
    out: &mut [u8],
) -> usize {
    let (core::net::IpAddr::V4(src), core::net::IpAddr::V4(dst)) = (pkt.src, pkt.dst) else {
        return 0;
    };
    if pkt.l3 != L3::Ipv4
        || matches!(pkt.l4, L4::IcmpError { .. } | L4::None)
        || src.is_multicast()
        || src.is_broadcast()
        || src.is_unspecified()
        || dst.is_multicast()
        || dst.is_broadcast()
    {
        return 0;
    }
    let l3 = usize::from(pkt.l3_offset);
    let l4 = usize::from(pkt.l4_offset);
    let quote_end = (l4 + 8).min(pkt.l3_end()).min(frame.len());
    let quote = quote_end.saturating_sub(l3);
    let ip_len = 20 + 8 + quote;
    let total = l3 + ip_len;
    let Ok(ip_len16) = u16::try_from(ip_len) else {
        return 0;
    };
    if out.len() < total || frame.len() < l3 {
        return 0;
    }
    out[..l3].copy_from_slice(&frame[..l3]);
    out[0..6].copy_from_slice(&frame[6..12]);
    out[6..12].copy_from_slice(&frame[0..6]);
    let ip = &mut out[l3..total];
    ip[..20].copy_from_slice(&[
        0x45,
        0xC0,
        0,
        0,
        0,
        0,
        0,
        0,
        64,
        proto::ICMP,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    put16(ip, 2, ip_len16);
    ip[12..16].copy_from_slice(&gateway_addr.octets());
    ip[16..20].copy_from_slice(&src.octets());
    let c = checksum::checksum(&ip[..20]);
    put16(ip, 10, c);
    let icmp = &mut ip[20..];
    icmp[..8].copy_from_slice(&[11, 0, 0, 0, 0, 0, 0, 0]);
    icmp[8..].copy_from_slice(&frame[l3..quote_end]);
    let c = checksum::checksum(icmp);
    put16(icmp, 2, c);
    total
}

#[cfg(test)]
mod tests {
    use super::crc32c;
    use crate::conntrack::{Config, Conntrack, NatOutcome};
    use crate::nat::NatEngine;
    use crate::nat::tests::{C, MAC_C, MAC_G, N, S, in_meta, out_meta, snat_rule};
    use crate::wire::{self, ParseOptions};

    fn echo_zero(src: [u8; 4], dst: [u8; 4], request: bool) -> Vec<u8> {
        let mut v = Vec::new();
        let b = etherparse::PacketBuilder::ethernet2(MAC_C, MAC_G).ipv4(src, dst, 64);
        let b = if request {
            b.icmpv4_echo_request(0, 0)
        } else {
            b.icmpv4_echo_reply(0, 0)
        };
        b.write(&mut v, b"").expect("write");
        v
    }

    /// Found by the `pipeline` fuzz target: an all-zero ICMP echo reply (checksum
    /// 0xFFFF) translated without an id change came out with checksum 0x0000, which
    /// does not verify (the parser then rejects the frame NAT emitted).
    #[test]
    fn all_zero_icmp_echo_keeps_a_valid_checksum() {
        let mut nat = NatEngine::new(1);
        nat.rules_mut().add(snat_rule(1, None)).expect("rule");
        let mut ct = Conntrack::with_nat(Config::default(), nat);
        let mut req = echo_zero(C, S, true);
        let v = ct.process_mut(&mut req, 0, &out_meta(), 1);
        assert_eq!(v.nat, NatOutcome::Rewritten);
        assert_eq!(&req[38..40], &[0, 0], "id kept");
        let mut reply = echo_zero(S, N, false);
        assert_eq!(&reply[36..38], &[0xFF, 0xFF], "all-zero message");
        let v = ct.process_mut(&mut reply, 0, &in_meta(), 2);
        assert_eq!(v.nat, NatOutcome::Rewritten);
        assert_eq!(&reply[30..34], &C, "translated back");
        assert_eq!(&reply[36..38], &[0xFF, 0xFF]);
        assert!(wire::parse(&reply, ParseOptions::VERIFY_ALL).is_ok());
    }

    /// A frame for the property test: Ethernet (with a VLAN tag when `vlan`), IPv4
    /// with `opt_words` 4-byte words of NOP options, then a UDP, TCP or ICMP echo
    /// header and `payload`; every checksum field holds `csum` as it is (the rewrite
    /// must not care whether it verifies).
    #[allow(clippy::too_many_arguments)]
    fn fast_case_frame(
        vlan: bool,
        opt_words: u8,
        proto: u8,
        addrs: [u8; 8],
        ports: [u16; 2],
        ip_csum: u16,
        csum: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
        if vlan {
            f.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        }
        f.extend_from_slice(&[0x08, 0x00]);
        let l4_len = match proto {
            super::proto::TCP => 20,
            _ => 8,
        } + payload.len();
        let ip_len = 20 + 4 * usize::from(opt_words) + l4_len;
        let ip_len = u16::try_from(ip_len).expect("small");
        f.extend_from_slice(&[0x45 + opt_words, 0]);
        f.extend_from_slice(&ip_len.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto]);
        f.extend_from_slice(&ip_csum.to_be_bytes());
        f.extend_from_slice(&addrs);
        f.extend(std::iter::repeat_n(1u8, 4 * usize::from(opt_words)));
        let [sp, dp] = ports.map(u16::to_be_bytes);
        match proto {
            super::proto::TCP => {
                f.extend_from_slice(&sp);
                f.extend_from_slice(&dp);
                f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0x10, 0]);
                f.extend_from_slice(&csum.to_be_bytes());
                f.extend_from_slice(&[0, 0]);
            }
            super::proto::UDP => {
                f.extend_from_slice(&sp);
                f.extend_from_slice(&dp);
                let len = u16::try_from(l4_len).expect("small");
                f.extend_from_slice(&len.to_be_bytes());
                f.extend_from_slice(&csum.to_be_bytes());
            }
            _ => {
                // Echo request, id = the first port, sequence = the second.
                f.extend_from_slice(&[8, 0]);
                f.extend_from_slice(&csum.to_be_bytes());
                f.extend_from_slice(&sp);
                f.extend_from_slice(&dp);
            }
        }
        f.extend_from_slice(payload);
        f
    }

    proptest::proptest! {
        /// `rewrite_one_endpoint_v4` writes exactly what `rewrite_to_inverse` writes
        /// (checksums included: any value, 0 and 0xFFFF among them), takes every IPv4
        /// UDP/TCP packet with one manip, and leaves any other packet untouched.
        #[test]
        fn fast_rewrite_is_the_generic_one(
            vlan in proptest::bool::ANY,
            opt_words in 0u8..3,
            proto in proptest::sample::select(vec![
                super::proto::UDP, super::proto::TCP, super::proto::ICMP,
            ]),
            addrs in proptest::array::uniform8(proptest::prelude::any::<u8>()),
            ports in proptest::array::uniform2(proptest::prelude::any::<u16>()),
            ip_csum in proptest::prelude::any::<u16>(),
            csum in proptest::prop_oneof![
                proptest::prelude::Just(0u16),
                proptest::prelude::Just(0xFFFFu16),
                proptest::prelude::any::<u16>(),
            ],
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24),
            other_addrs in proptest::array::uniform8(proptest::prelude::any::<u8>()),
            other_ports in proptest::array::uniform2(proptest::prelude::any::<u16>()),
            same_addr in proptest::bool::ANY,
            nat in 0u8..4,
            reply in proptest::bool::ANY,
        ) {
            use crate::table::Status;
            use crate::tuple::{Addr, Dir, Family, Tuple};
            let frame =
                fast_case_frame(vlan, opt_words, proto, addrs, ports, ip_csum, csum, &payload);
            let pkt = wire::parse(&frame, ParseOptions::VERIFY_NONE).expect("parses");
            let mut other = Tuple {
                src: Addr::v4([other_addrs[0], other_addrs[1], other_addrs[2], other_addrs[3]]),
                dst: Addr::v4([other_addrs[4], other_addrs[5], other_addrs[6], other_addrs[7]]),
                src_l4: other_ports[0],
                dst_l4: other_ports[1],
                proto,
                family: Family::V4,
                zone: 0,
            };
            if same_addr {
                // The address kept, only the port translated (and the header checksum
                // untouched).
                other.src = Addr::v4([addrs[4], addrs[5], addrs[6], addrs[7]]);
                other.dst = Addr::v4([addrs[0], addrs[1], addrs[2], addrs[3]]);
            }
            let status = [
                Status::empty(),
                Status::SRC_NAT,
                Status::DST_NAT,
                Status::SRC_NAT | Status::DST_NAT,
            ][usize::from(nat)];
            let dir = if reply { Dir::Reply } else { Dir::Original };
            let packed = other.pack_v4().expect("plain IPv4");
            let mut fast = frame.clone();
            let took = super::rewrite_one_endpoint_v4(&mut fast, &pkt, packed, status, dir);
            let one_manip = nat == 1 || nat == 2;
            proptest::prop_assert_eq!(took, one_manip && proto != super::proto::ICMP);
            let mut generic = frame.clone();
            let r = super::rewrite_to_inverse(&mut generic, &pkt, &other, status, dir);
            if took {
                proptest::prop_assert!(r.is_ok());
                proptest::prop_assert_eq!(&fast, &generic);
                let c_at = usize::from(pkt.l4_offset) + if proto == super::proto::UDP { 6 } else { 16 };
                if proto == super::proto::UDP && csum == 0 {
                    proptest::prop_assert_eq!(&fast[c_at..c_at + 2], &[0, 0], "no UDP checksum stays none");
                }
            } else {
                proptest::prop_assert_eq!(&fast, &frame, "untouched when not taken");
            }
        }
    }

    /// The reply tuple of an SNAT connection 10.0.0.9:4000 -> 192.0.2.80:53 translated
    /// to 203.0.113.5:20001 (the other direction's tuple of its original packets).
    fn snat_reply(proto: u8) -> crate::tuple::Tuple {
        use crate::tuple::{Addr, Family, Tuple};
        Tuple {
            src: Addr::v4([192, 0, 2, 80]),
            dst: Addr::v4([203, 0, 113, 5]),
            src_l4: 53,
            dst_l4: 20_001,
            proto,
            family: Family::V4,
            zone: 0,
        }
    }

    /// A frame cut short of what its IP header claims: the fast rewrite takes it while
    /// the L4 header up to its checksum is in the frame (writing the generic
    /// rewrite's bytes), and declines, writing nothing, once the cut reaches the
    /// checksum (the generic rewrite reports the truncation) or when the IP length
    /// leaves the checksum out.
    #[test]
    fn fast_rewrite_of_a_cut_frame() {
        use crate::table::Status;
        use crate::tuple::Dir;
        for proto in [super::proto::UDP, super::proto::TCP] {
            let other = snat_reply(proto);
            let packed = other.pack_v4().expect("plain IPv4");
            let addrs = [10, 0, 0, 9, 192, 0, 2, 80];
            let whole = fast_case_frame(false, 0, proto, addrs, [4000, 53], 0x1234, 0x5678, b"ab");
            let pkt = wire::parse(&whole, ParseOptions::VERIFY_NONE).expect("parses");
            let csum_end =
                usize::from(pkt.l4_offset) + if proto == super::proto::UDP { 8 } else { 18 };
            for len in csum_end - 3..whole.len() {
                let frame = &whole[..len];
                let mut fast = frame.to_vec();
                let took = super::rewrite_one_endpoint_v4(
                    &mut fast,
                    &pkt,
                    packed,
                    Status::SRC_NAT,
                    Dir::Original,
                );
                let mut generic = frame.to_vec();
                let r = super::rewrite_to_inverse(
                    &mut generic,
                    &pkt,
                    &other,
                    Status::SRC_NAT,
                    Dir::Original,
                );
                assert_eq!(took, len >= csum_end, "proto {proto} cut at {len}");
                if took {
                    assert_eq!(r, Ok(()));
                    assert_eq!(fast, generic, "proto {proto} cut at {len}");
                    assert_ne!(fast, frame, "rewritten");
                } else {
                    assert!(
                        matches!(r, Err(super::RewriteError::Truncated { .. })),
                        "{r:?}"
                    );
                    assert_eq!(fast, frame, "untouched when not taken");
                }
            }
            // The IP length ends inside the L4 header: the checksum is not the
            // packet's to update, so the fast path leaves the packet to the generic one.
            let mut short = whole.clone();
            let ip_len = u16::try_from(csum_end - 1 - usize::from(pkt.l3_offset)).expect("small");
            short[16..18].copy_from_slice(&ip_len.to_be_bytes());
            let mut pkt_short = pkt;
            pkt_short.l3_len = u32::from(ip_len);
            let mut fast = short.clone();
            assert!(!super::rewrite_one_endpoint_v4(
                &mut fast,
                &pkt_short,
                packed,
                Status::SRC_NAT,
                Dir::Original,
            ));
            assert_eq!(fast, short);
        }
    }

    /// Every L4 checksum value, SNAT out and back in: among them the one whose update
    /// folds to 0 (UDP sends it as 0xFFFF, TCP as 0) and UDP's 0 (left alone).
    #[test]
    fn fast_rewrite_is_the_generic_one_for_every_checksum() {
        use crate::table::Status;
        use crate::tuple::Dir;
        for proto in [super::proto::UDP, super::proto::TCP] {
            let addrs = [10, 0, 0, 9, 192, 0, 2, 80];
            let other = snat_reply(proto);
            let mut zero_folds = 0;
            for csum in 0..=u16::MAX {
                let frame =
                    fast_case_frame(false, 0, proto, addrs, [4000, 53], 0x1234, csum, b"ab");
                let pkt = wire::parse(&frame, ParseOptions::VERIFY_NONE).expect("parses");
                let packed = other.pack_v4().expect("plain IPv4");
                let mut fast = frame.clone();
                assert!(super::rewrite_one_endpoint_v4(
                    &mut fast,
                    &pkt,
                    packed,
                    Status::SRC_NAT,
                    Dir::Original
                ));
                let mut generic = frame.clone();
                super::rewrite_to_inverse(
                    &mut generic,
                    &pkt,
                    &other,
                    Status::SRC_NAT,
                    Dir::Original,
                )
                .expect("rewrites");
                assert_eq!(fast, generic, "proto {proto} checksum {csum:#06x}");
                let c_at =
                    usize::from(pkt.l4_offset) + if proto == super::proto::UDP { 6 } else { 16 };
                // An update that folds to 0: 0xFFFF for UDP (never otherwise: an RFC
                // 1624 update does not yield 0xFFFF), 0 for TCP.
                let folded_zero = if proto == super::proto::UDP {
                    [0xFF, 0xFF]
                } else {
                    [0, 0]
                };
                zero_folds += usize::from(csum != 0 && fast[c_at..c_at + 2] == folded_zero);
            }
            assert_eq!(zero_folds, 1, "proto {proto}: one checksum updates to 0");
        }
    }

    #[test]
    fn crc32c_check_value() {
        // The standard check value of CRC-32C over "123456789".
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }
}
