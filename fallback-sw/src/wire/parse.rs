//! The one-shot classifier of the hot path: L2 → L3 → L4 in one walk, no allocation.
//!
//! [`parse`] returns a [`ParsedPacket`]: offsets, VLAN ids, addresses, the L4 protocol,
//! the L4 parts of a conntrack tuple (ports; ICMP id/type/code; or, for an ICMP error,
//! where the quoted packet starts), TCP segment details, and fragment information.
//! [`parse_inner`] reads the packet quoted inside an ICMP or ICMPv6 error.
//!
//! Not errors: a non-IP ethertype ([`L3::Other`]), an unknown L4 protocol
//! ([`L4::Generic`]), a non-first fragment ([`L4::None`], [`Fragment::NonFirst`]).

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::ethernet::{self, ethertype};
use super::tcp::{OptionSummary, TcpFlags};
use super::{Layer, ParseError, icmp, icmpv6, ip_proto, ipv4, ipv6, need, tcp, udp};
use crate::checksum;

/// Which checksums [`parse`] verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParseOptions {
    /// Verify the IPv4 header checksum.
    pub verify_ipv4_checksum: bool,
    /// Verify TCP, UDP, ICMP and ICMPv6 checksums (pseudo-headers included) of packets
    /// that are not fragments. A UDP checksum of 0 means "none" over IPv4 and is an
    /// error over IPv6.
    pub verify_l4_checksum: bool,
}

impl ParseOptions {
    /// Verify every checksum (like Linux with `nf_conntrack_checksum=1`, the default).
    pub const VERIFY_ALL: Self = Self {
        verify_ipv4_checksum: true,
        verify_l4_checksum: true,
    };
    /// Verify nothing (the NIC did, or the packet was generated locally).
    pub const VERIFY_NONE: Self = Self {
        verify_ipv4_checksum: false,
        verify_l4_checksum: false,
    };
}

impl Default for ParseOptions {
    fn default() -> Self {
        Self::VERIFY_ALL
    }
}

/// The network layer of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L3 {
    /// IPv4.
    Ipv4,
    /// IPv6.
    Ipv6,
    /// Not IP (ARP, LLDP, ...): nothing past L2 was parsed.
    Other {
        /// The ethertype after any VLAN tags.
        ethertype: u16,
    },
}

/// Fragment status of an IP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fragment {
    /// A whole packet (including an IPv6 atomic fragment: offset 0 and no M flag).
    Whole,
    /// The first fragment of several: the L4 header is here, the payload is partial.
    First,
    /// A later fragment: no L4 header.
    NonFirst,
}

/// TCP segment details.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpInfo {
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// Control bits.
    pub flags: TcpFlags,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgment number.
    pub ack: u32,
    /// Window field (unscaled).
    pub window: u16,
    /// Header length in bytes (20 to 60).
    pub header_len: u8,
    /// Payload bytes in this packet (partial for a first fragment).
    pub payload_len: u16,
    /// MSS option.
    pub mss: Option<u16>,
    /// Window scale option, as sent (conntrack clamps it to 14).
    pub wscale: Option<u8>,
    /// SACK-permitted option seen.
    pub sack_permitted: bool,
    /// The highest right edge of the SACK blocks, in sequence space.
    pub sack_highest: Option<u32>,
    /// A malformed option stopped the option walk (the fields hold what came before).
    pub options_malformed: bool,
}

/// The transport layer, reduced to what conntrack needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4 {
    /// No L4 header: not IP, or a non-first fragment.
    None,
    /// TCP.
    Tcp(TcpInfo),
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// A port protocol of which only the ports were read: SCTP, DCCP, UDP-Lite, and TCP
    /// or UDP quoted in an ICMP error.
    Ports {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP/ICMPv6 query or reply with an identifier (echo and the like).
    IcmpQuery {
        /// Identifier.
        id: u16,
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
    },
    /// ICMP/ICMPv6 error quoting the packet that caused it.
    IcmpError {
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
        /// Offset of the quoted IP header in the frame (read it with [`parse_inner`]).
        inner_offset: u16,
    },
    /// Any other ICMP/ICMPv6 message (router advertisement, neighbour discovery, ...).
    IcmpOther {
        /// Type.
        icmp_type: u8,
        /// Code.
        code: u8,
    },
    /// A protocol without ports: the tuple is addresses and protocol.
    Generic,
}

impl L4 {
    /// `(source, destination)` ports of a port protocol.
    #[inline]
    #[must_use]
    pub const fn ports(&self) -> Option<(u16, u16)> {
        match *self {
            Self::Tcp(TcpInfo {
                src_port, dst_port, ..
            })
            | Self::Udp { src_port, dst_port }
            | Self::Ports { src_port, dst_port } => Some((src_port, dst_port)),
            _ => None,
        }
    }
}

/// One frame, classified. Offsets are from the start of the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedPacket {
    /// VLAN ids, outermost first.
    pub vlans: [Option<u16>; ethernet::MAX_VLAN_TAGS],
    /// Network layer.
    pub l3: L3,
    /// Offset of the IP header.
    pub l3_offset: u16,
    /// IP packet length: IPv4 total length, or 40 + IPv6 payload length; 0 if not IP.
    /// Bytes past it (link padding) belong to no layer.
    pub l3_len: u32,
    /// Offset of the L4 header (of the fragment data for a non-first fragment).
    pub l4_offset: u16,
    /// Offset of the L4 payload; equals `l4_offset` where no L4 header was read.
    pub payload_offset: u16,
    /// L4 payload length (bounded by the UDP length field for UDP).
    pub payload_len: u16,
    /// Source address (unspecified if not IP).
    pub src: IpAddr,
    /// Destination address (unspecified if not IP).
    pub dst: IpAddr,
    /// The L4 protocol number (for IPv6, after extension headers); 0 if not IP.
    pub protocol: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// Fragment status.
    pub fragment: Fragment,
    /// The IPv4 header has options.
    pub has_ipv4_options: bool,
    /// Transport layer.
    pub l4: L4,
}

impl ParsedPacket {
    /// Offset just past the IP packet.
    #[inline]
    #[must_use]
    pub fn l3_end(&self) -> usize {
        usize::from(self.l3_offset) + usize_of(self.l3_len)
    }

    /// Length of the L4 segment (header and payload, up to the end of the IP packet).
    #[inline]
    #[must_use]
    pub fn l4_len(&self) -> usize {
        self.l3_end().saturating_sub(usize::from(self.l4_offset))
    }

    /// Whether the packet is IPv4 or IPv6.
    #[inline]
    #[must_use]
    pub const fn is_ip(&self) -> bool {
        matches!(self.l3, L3::Ipv4 | L3::Ipv6)
    }
}

/// The packet quoted inside an ICMP or ICMPv6 error. Offsets are from the start of the
/// frame; the quote may be truncated anywhere after the L4 bytes the tuple needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPacket {
    /// [`L3::Ipv4`] or [`L3::Ipv6`], the same as the outer packet.
    pub l3: L3,
    /// Offset of the quoted IP header.
    pub l3_offset: u16,
    /// Offset of the quoted L4 header.
    pub l4_offset: u16,
    /// Quoted L4 bytes present (a NAT fixes an inner TCP checksum only if 20 are).
    pub l4_available: u16,
    /// Source address of the quoted packet.
    pub src: IpAddr,
    /// Destination address of the quoted packet.
    pub dst: IpAddr,
    /// L4 protocol of the quoted packet.
    pub protocol: u8,
    /// Fragment status of the quoted packet (conntrack rejects [`Fragment::NonFirst`]).
    pub fragment: Fragment,
    /// L4 tuple parts: [`L4::Ports`] for TCP, UDP and the other port protocols (see
    /// `protocol`), [`L4::IcmpQuery`], [`L4::IcmpOther`] (also for a quoted ICMP error),
    /// [`L4::Generic`], or [`L4::None`] for a non-first fragment.
    pub l4: L4,
}

/// Addresses for the pseudo-header.
#[derive(Clone, Copy)]
enum Addrs {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Addrs {
    #[inline]
    fn pseudo(&self, protocol: u8, len: usize) -> u64 {
        match self {
            // IPv4 segments are < 64 KiB (total length is 16 bits).
            Self::V4(s, d) => checksum::pseudo_header_v4(*s, *d, protocol, sat16(len)),
            Self::V6(s, d) => {
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                checksum::pseudo_header_v6(s, d, protocol, len)
            }
        }
    }

    #[inline]
    const fn is_v6(&self) -> bool {
        matches!(self, Self::V6(..))
    }
}

/// Offsets and lengths here are bounded far below 64 KiB (L2 ≤ 22 bytes, IP header ≤ 60
/// or 40 + 8 extension headers of ≤ 2 KiB, L4 header ≤ 60; lengths by 16-bit length
/// fields), so this never saturates on a packet that parsed.
#[inline]
fn sat16(v: usize) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}

#[inline]
fn usize_of(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

#[inline]
fn sub(buf: &[u8], start: usize, end: usize) -> &[u8] {
    buf.get(start..end).unwrap_or_default()
}

/// Parses an Ethernet II frame.
///
/// # Errors
/// Any [`ParseError`] except [`ParseError::NotIcmpError`]; see [`ParseError::reason`].
#[inline]
pub fn parse(frame: &[u8], opts: ParseOptions) -> Result<ParsedPacket, ParseError> {
    match plain_v4(frame, opts) {
        Some(result) => result.map(|p| p.packet()),
        None => parse_walk(frame, opts),
    }
}

/// Where an IPv4 packet lies in its frame: the offsets of the IP header, of the L4
/// header, and of the IP packet's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct V4Layout {
    /// Offset of the IPv4 header.
    pub(crate) l3: usize,
    /// Offset of the TCP/UDP header.
    pub(crate) l4: usize,
    /// End of the IP packet (its header offset plus total length).
    pub(crate) end: usize,
}

impl V4Layout {
    /// The layout of a parsed packet (its IP header's; meaningful for IPv4).
    #[inline(always)]
    pub(crate) fn of(pkt: &ParsedPacket) -> Self {
        Self {
            l3: usize::from(pkt.l3_offset),
            l4: usize::from(pkt.l4_offset),
            end: pkt.l3_end(),
        }
    }

    /// The layout of a frame that [`plain_v4`] read, whose IP total length is
    /// `l3_len`.
    #[inline(always)]
    pub(crate) fn plain(l3_len: u16) -> Self {
        Self {
            l3: PlainV4::L3,
            l4: PlainV4::L4,
            end: PlainV4::L3 + usize::from(l3_len),
        }
    }
}

/// The common frame, read in one step by [`plain_v4`]: untagged Ethernet, a whole (not
/// fragmented) IPv4 packet without options. What [`PlainV4::packet`] needs to give the
/// [`ParsedPacket`] that [`parse`] returns, and what the established path reads without
/// it: the addresses as they are in the frame, the protocol and the L4 part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlainV4 {
    /// Source then destination address, the frame's bytes 26..34 (network order).
    pub(crate) addrs: [u8; 8],
    /// IPv4 total length.
    pub(crate) l3_len: u16,
    /// IP protocol.
    pub(crate) protocol: u8,
    /// TTL.
    pub(crate) ttl: u8,
    /// L4 header length (0 where [`parse_l4`] reads none).
    pub(crate) l4_header: u8,
    /// L4 payload length.
    pub(crate) payload_len: u16,
    /// Transport layer, as in [`ParsedPacket::l4`].
    pub(crate) l4: L4,
}

impl PlainV4 {
    /// Offset of the IPv4 header.
    const L3: usize = ethernet::HEADER_LEN;
    /// Offset of the L4 header.
    const L4: usize = Self::L3 + ipv4::HEADER_LEN;

    /// Where the packet lies in the frame.
    #[inline(always)]
    pub(crate) fn layout(&self) -> V4Layout {
        V4Layout::plain(self.l3_len)
    }

    /// What [`plain_v4`] returns for a UDP datagram with these addresses (as in the
    /// frame), ports, IP total length, TTL and UDP payload length: the established
    /// path keeps only these (see `Pre::Udp` in the batch) and rebuilds the rest when
    /// it needs it.
    #[inline]
    pub(crate) fn udp(
        addrs: [u8; 8],
        (src_port, dst_port): (u16, u16),
        l3_len: u16,
        ttl: u8,
        payload_len: u16,
    ) -> Self {
        Self {
            addrs,
            l3_len,
            protocol: ip_proto::UDP,
            ttl,
            // At most 8.
            l4_header: u8::try_from(udp::HEADER_LEN).unwrap_or(u8::MAX),
            payload_len,
            l4: L4::Udp { src_port, dst_port },
        }
    }

    /// The frame as [`parse`] returns it.
    #[inline]
    pub(crate) fn packet(&self) -> ParsedPacket {
        let [s0, s1, s2, s3, d0, d1, d2, d3] = self.addrs;
        ParsedPacket {
            vlans: [None; ethernet::MAX_VLAN_TAGS],
            l3: L3::Ipv4,
            l3_offset: sat16(Self::L3),
            l3_len: u32::from(self.l3_len),
            l4_offset: sat16(Self::L4),
            payload_offset: sat16(Self::L4 + usize::from(self.l4_header)),
            payload_len: self.payload_len,
            src: IpAddr::V4(Ipv4Addr::new(s0, s1, s2, s3)),
            dst: IpAddr::V4(Ipv4Addr::new(d0, d1, d2, d3)),
            protocol: self.protocol,
            ttl: self.ttl,
            fragment: Fragment::Whole,
            has_ipv4_options: false,
            l4: self.l4,
        }
    }
}

/// The common frame in one step: untagged Ethernet, a whole (not fragmented) IPv4
/// packet without options, all of it in the frame. Its fixed 34 bytes are bounds-checked
/// once and read at fixed offsets; the L4 part is [`parse_l4`] as on the general path.
/// Any other frame, valid or not, gives `None` and takes [`parse_walk`]. For the frames
/// it takes, [`PlainV4::packet`] of the result is exactly [`parse_walk`]'s (a test
/// compares them).
#[inline]
pub(crate) fn plain_v4(frame: &[u8], opts: ParseOptions) -> Option<Result<PlainV4, ParseError>> {
    const L3: usize = PlainV4::L3;
    const L4: usize = PlainV4::L4;
    let h: &[u8; L4] = frame.get(..L4)?.try_into().ok()?;
    // IPv4 ethertype, version 4 with IHL 5, no MF flag and offset 0.
    if h[12..14] != [0x08, 0x00] || h[L3] != 0x45 || h[L3 + 6] & 0x3F != 0 || h[L3 + 7] != 0 {
        return None;
    }
    let total = u16::from_be_bytes([h[L3 + 2], h[L3 + 3]]);
    let end = L3 + usize::from(total);
    let seg = frame.get(L4..end)?;
    let ip_header: &[u8; ipv4::HEADER_LEN] = h[L3..].try_into().ok()?;
    if opts.verify_ipv4_checksum && !checksum::data_verifies(ip_header, 0) {
        return Some(Err(ParseError::BadChecksum { layer: Layer::Ipv4 }));
    }
    let [s0, s1, s2, s3, d0, d1, d2, d3] = *h[L3 + 12..].first_chunk::<8>()?;
    let src = Ipv4Addr::new(s0, s1, s2, s3);
    let dst = Ipv4Addr::new(d0, d1, d2, d3);
    let protocol = h[L3 + 9];
    let addrs = Addrs::V4(src, dst);
    let l4 = match protocol {
        // A UDP datagram that reads cleanly (the rest is [`parse_l4`]'s to report).
        ip_proto::UDP => plain_udp(frame, end, opts.verify_l4_checksum).map(Ok),
        ip_proto::TCP => plain_tcp(frame, end, opts.verify_l4_checksum).map(Ok),
        _ => None,
    };
    Some(
        l4.unwrap_or_else(|| parse_l4(seg, protocol, addrs, opts.verify_l4_checksum, L4))
            .map(|(l4, hdr, payload_len)| PlainV4 {
                addrs: [s0, s1, s2, s3, d0, d1, d2, d3],
                l3_len: total,
                protocol,
                ttl: h[L3 + 8],
                // At most 60 (a TCP header) or 8.
                l4_header: u8::try_from(hdr).unwrap_or(u8::MAX),
                payload_len: sat16(payload_len),
                l4,
            }),
    )
}

/// The L4 part of a TCP segment of `len` bytes (up to the end of the IP packet) whose
/// header length has been checked: the info, the header length and the payload length.
#[inline]
fn tcp_l4(t: &tcp::Packet<&[u8]>, len: usize) -> (L4, usize, usize) {
    let hl = t.header_len();
    let o = if hl > tcp::HEADER_LEN {
        OptionSummary::parse(t.option_bytes())
    } else {
        OptionSummary::default()
    };
    let payload_len = len - hl;
    let info = TcpInfo {
        src_port: t.src_port(),
        dst_port: t.dst_port(),
        flags: t.flags(),
        seq: t.seq(),
        ack: t.ack(),
        window: t.window(),
        header_len: t.data_offset() * 4,
        payload_len: sat16(payload_len),
        mss: o.mss,
        wscale: o.wscale,
        sack_permitted: o.sack_permitted,
        sack_highest: o.sack_highest,
        options_malformed: o.malformed,
    };
    (L4::Tcp(info), hl, payload_len)
}

/// Whether the TCP or UDP checksum of a frame that [`plain_v4`] read verifies, for the
/// `len` bytes of L4 data it covers: the pseudo-header's addresses are summed in
/// place, right before the L4 header in the frame (bytes 26..34), in one sum with it.
#[inline(always)]
fn plain_l4_verifies(frame: &[u8], protocol: u8, len: u16) -> bool {
    const ADDRS: usize = PlainV4::L3 + 12;
    frame
        .get(ADDRS..PlainV4::L4 + usize::from(len))
        .is_some_and(|covered| {
            let pseudo = u64::from(protocol) + u64::from(len);
            checksum::data_verifies(covered, pseudo)
        })
}

/// The TCP segment of a frame that [`plain_v4`] read (the IP packet ends at `end`),
/// as [`parse_l4`] gives it when it is valid; `None` when it is not (truncated, bad
/// data offset or checksum), and then [`parse_l4`] says why. Out of line: the UDP
/// path stays small.
#[inline(never)]
fn plain_tcp(frame: &[u8], end: usize, verify: bool) -> Option<(L4, usize, usize)> {
    let seg = frame.get(PlainV4::L4..end)?;
    let t = tcp::Packet::new_checked(seg).ok()?;
    if verify && !plain_l4_verifies(frame, ip_proto::TCP, u16::try_from(seg.len()).ok()?) {
        return None;
    }
    Some(tcp_l4(&t, seg.len()))
}

/// The UDP datagram of a frame that [`plain_v4`] read (the IP packet ends at `end`),
/// as [`parse_l4`] gives it when it is valid; `None` when it is not (truncated, bad
/// length field or checksum), and then [`parse_l4`] says why. Cheaper than the general
/// reader: see [`plain_l4_verifies`].
#[inline(always)]
fn plain_udp(frame: &[u8], end: usize, verify: bool) -> Option<(L4, usize, usize)> {
    let ((src_port, dst_port), payload_len) = udp_fields(frame, end, verify)?;
    let l4 = L4::Udp { src_port, dst_port };
    Some((l4, udp::HEADER_LEN, payload_len))
}

/// [`plain_udp`]'s checks and fields: the ports and the payload length.
#[inline(always)]
fn udp_fields(frame: &[u8], end: usize, verify: bool) -> Option<((u16, u16), usize)> {
    let seg = frame.get(PlainV4::L4..end)?;
    let h: &[u8; udp::HEADER_LEN] = seg.first_chunk()?;
    let len = u16::from_be_bytes([h[4], h[5]]);
    let n = usize::from(len);
    if n < udp::HEADER_LEN || n > seg.len() {
        return None;
    }
    // Over IPv4 a zero checksum means none.
    if verify && h[6..8] != [0, 0] && !plain_l4_verifies(frame, ip_proto::UDP, len) {
        return None;
    }
    let ports = (
        u16::from_be_bytes([h[0], h[1]]),
        u16::from_be_bytes([h[2], h[3]]),
    );
    Some((ports, n - udp::HEADER_LEN))
}

/// A frame that [`plain_udp_v4`] read: the fields of its [`PlainV4`] that the
/// established path keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlainUdp {
    /// Source then destination address, as in [`PlainV4::addrs`].
    pub(crate) addrs: [u8; 8],
    /// Source and destination port.
    pub(crate) ports: (u16, u16),
    /// IPv4 total length.
    pub(crate) l3_len: u16,
    /// TTL.
    pub(crate) ttl: u8,
    /// UDP payload length.
    pub(crate) payload_len: u16,
}

#[cfg(test)]
impl PlainUdp {
    /// What [`plain_v4`] returns for the frame.
    pub(crate) fn plain(&self) -> PlainV4 {
        PlainV4::udp(
            self.addrs,
            self.ports,
            self.l3_len,
            self.ttl,
            self.payload_len,
        )
    }
}

/// The most common frame of all, a valid UDP datagram in the frame [`plain_v4`] takes,
/// read straight into the few fields the established path keeps (no [`PlainV4`] and no
/// `Option<Result<..>>` built and copied through the stack). `Some` exactly when
/// [`plain_v4`] gives `Some(Ok(p))` with a UDP `p` read by its UDP step, and then
/// [`PlainUdp::plain`] is that `p` (a test compares them); anything else, valid or
/// not, gives `None` and takes [`plain_v4`].
#[inline(always)]
pub(crate) fn plain_udp_v4(frame: &[u8], opts: ParseOptions) -> Option<PlainUdp> {
    const L3: usize = PlainV4::L3;
    const L4: usize = PlainV4::L4;
    let h: &[u8; L4] = frame.get(..L4)?.try_into().ok()?;
    // IPv4 ethertype, version 4 with IHL 5, no MF flag and offset 0, UDP.
    if h[12..14] != [0x08, 0x00]
        || h[L3] != 0x45
        || h[L3 + 6] & 0x3F != 0
        || h[L3 + 7] != 0
        || h[L3 + 9] != ip_proto::UDP
    {
        return None;
    }
    let total = u16::from_be_bytes([h[L3 + 2], h[L3 + 3]]);
    let ip_header: &[u8; ipv4::HEADER_LEN] = h[L3..].try_into().ok()?;
    if opts.verify_ipv4_checksum && !checksum::data_verifies(ip_header, 0) {
        return None;
    }
    let (ports, payload_len) = udp_fields(frame, L3 + usize::from(total), opts.verify_l4_checksum)?;
    Some(PlainUdp {
        addrs: *h[L3 + 12..].first_chunk::<8>()?,
        ports,
        l3_len: total,
        ttl: h[L3 + 8],
        payload_len: sat16(payload_len),
    })
}

/// [`parse`] layer by layer: any frame (the batch calls it for a frame that
/// [`plain_v4`] did not take).
#[inline]
pub(crate) fn parse_walk(frame: &[u8], opts: ParseOptions) -> Result<ParsedPacket, ParseError> {
    let l2 = ethernet::walk(frame)?;
    let l3 = l2.l3_offset;
    let mut p = match l2.ethertype {
        ethertype::IPV4 => parse_v4(frame, l3, opts)?,
        ethertype::IPV6 => parse_v6(frame, l3, opts)?,
        other => ParsedPacket {
            vlans: [None; ethernet::MAX_VLAN_TAGS],
            l3: L3::Other { ethertype: other },
            l3_offset: sat16(l3),
            l3_len: 0,
            l4_offset: sat16(l3),
            payload_offset: sat16(l3),
            payload_len: 0,
            src: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            dst: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            protocol: 0,
            ttl: 0,
            fragment: Fragment::Whole,
            has_ipv4_options: false,
            l4: L4::None,
        },
    };
    p.vlans = l2.vlans;
    Ok(p)
}

#[inline]
fn parse_v4(frame: &[u8], l3: usize, opts: ParseOptions) -> Result<ParsedPacket, ParseError> {
    let ip = ipv4::Packet::new_checked(sub(frame, l3, frame.len()))?;
    if opts.verify_ipv4_checksum && !ip.verify_checksum() {
        return Err(ParseError::BadChecksum { layer: Layer::Ipv4 });
    }
    let total = usize::from(ip.total_len());
    let l4 = l3 + ip.header_len();
    let end = l3 + total;
    let fragment = if !ip.is_fragment() {
        Fragment::Whole
    } else if ip.is_first_fragment() {
        Fragment::First
    } else {
        Fragment::NonFirst
    };
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let protocol = ip.protocol();
    let seg = sub(frame, l4, end);
    let verify = opts.verify_l4_checksum && fragment == Fragment::Whole;
    let (l4_info, hdr, payload_len) = if fragment == Fragment::NonFirst {
        (L4::None, 0, seg.len())
    } else {
        parse_l4(seg, protocol, Addrs::V4(src, dst), verify, l4)?
    };
    Ok(ParsedPacket {
        vlans: [None; ethernet::MAX_VLAN_TAGS],
        l3: L3::Ipv4,
        l3_offset: sat16(l3),
        l3_len: u32::from(ip.total_len()),
        l4_offset: sat16(l4),
        payload_offset: sat16(l4 + hdr),
        payload_len: sat16(payload_len),
        src: IpAddr::V4(src),
        dst: IpAddr::V4(dst),
        protocol,
        ttl: ip.ttl(),
        fragment,
        has_ipv4_options: ip.has_options(),
        l4: l4_info,
    })
}

#[inline]
fn frag_of(f: Option<ipv6::FragmentHeader>) -> Fragment {
    match f {
        None => Fragment::Whole,
        Some(f) if f.is_first() && !f.more => Fragment::Whole,
        Some(f) if f.is_first() => Fragment::First,
        Some(_) => Fragment::NonFirst,
    }
}

#[inline]
fn parse_v6(frame: &[u8], l3: usize, opts: ParseOptions) -> Result<ParsedPacket, ParseError> {
    let ip = ipv6::Packet::new_checked(sub(frame, l3, frame.len()))?;
    let end = l3 + ip.total_len();
    let packet = sub(frame, 0, end);
    let w = ipv6::walk_ext_headers(packet, l3 + ipv6::HEADER_LEN, ip.next_header())?;
    let fragment = frag_of(w.fragment);
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let seg = sub(packet, w.offset, end);
    let verify = opts.verify_l4_checksum && fragment == Fragment::Whole;
    let (l4_info, hdr, payload_len) = if fragment == Fragment::NonFirst {
        (L4::None, 0, seg.len())
    } else {
        parse_l4(seg, w.protocol, Addrs::V6(src, dst), verify, w.offset)?
    };
    Ok(ParsedPacket {
        vlans: [None; ethernet::MAX_VLAN_TAGS],
        l3: L3::Ipv6,
        l3_offset: sat16(l3),
        l3_len: u32::from(ip.payload_len()) + 40,
        l4_offset: sat16(w.offset),
        payload_offset: sat16(w.offset + hdr),
        payload_len: sat16(payload_len),
        src: IpAddr::V6(src),
        dst: IpAddr::V6(dst),
        protocol: w.protocol,
        ttl: ip.hop_limit(),
        fragment,
        has_ipv4_options: false,
        l4: l4_info,
    })
}

/// Parses the L4 header at `seg` (which ends with the IP packet). Returns the L4 info,
/// the header length and the payload length.
#[inline]
fn parse_l4(
    seg: &[u8],
    protocol: u8,
    addrs: Addrs,
    verify: bool,
    l4_offset: usize,
) -> Result<(L4, usize, usize), ParseError> {
    match protocol {
        ip_proto::TCP => {
            let t = tcp::Packet::new_checked(seg)?;
            if verify
                && !checksum::verifies(addrs.pseudo(ip_proto::TCP, seg.len()) + checksum::sum(seg))
            {
                return Err(ParseError::BadChecksum { layer: Layer::Tcp });
            }
            Ok(tcp_l4(&t, seg.len()))
        }
        ip_proto::UDP => {
            let u = udp::Packet::new_checked(seg)?;
            if verify {
                let c = u.checksum();
                let ok = if c == 0 {
                    !addrs.is_v6()
                } else {
                    let d = u.datagram();
                    checksum::verifies(addrs.pseudo(ip_proto::UDP, d.len()) + checksum::sum(d))
                };
                if !ok {
                    return Err(ParseError::BadChecksum { layer: Layer::Udp });
                }
            }
            let l4 = L4::Udp {
                src_port: u.src_port(),
                dst_port: u.dst_port(),
            };
            Ok((l4, udp::HEADER_LEN, u.payload().len()))
        }
        ip_proto::SCTP | ip_proto::DCCP | ip_proto::UDPLITE => {
            need(Layer::Ports, seg, 4)?;
            let l4 = L4::Ports {
                src_port: super::be16(seg, 0),
                dst_port: super::be16(seg, 2),
            };
            Ok((l4, 0, seg.len()))
        }
        ip_proto::ICMP if !addrs.is_v6() => {
            let m = icmp::Packet::new_checked(seg)?;
            if verify && !m.verify_checksum() {
                return Err(ParseError::BadChecksum { layer: Layer::Icmp });
            }
            let (t, code) = (m.msg_type(), m.code());
            let l4 = if icmp::is_query(t) {
                L4::IcmpQuery {
                    id: m.ident(),
                    icmp_type: t,
                    code,
                }
            } else if icmp::is_error(t) {
                L4::IcmpError {
                    icmp_type: t,
                    code,
                    inner_offset: sat16(l4_offset + icmp::HEADER_LEN),
                }
            } else {
                L4::IcmpOther { icmp_type: t, code }
            };
            Ok((l4, icmp::HEADER_LEN, seg.len() - icmp::HEADER_LEN))
        }
        ip_proto::ICMPV6 if addrs.is_v6() => {
            let m = icmpv6::Packet::new_checked(seg)?;
            if verify
                && !checksum::verifies(
                    addrs.pseudo(ip_proto::ICMPV6, seg.len()) + checksum::sum(seg),
                )
            {
                return Err(ParseError::BadChecksum {
                    layer: Layer::Icmpv6,
                });
            }
            let (t, code) = (m.msg_type(), m.code());
            let l4 = if icmpv6::is_query(t) {
                L4::IcmpQuery {
                    id: m.ident(),
                    icmp_type: t,
                    code,
                }
            } else if icmpv6::is_error(t) {
                L4::IcmpError {
                    icmp_type: t,
                    code,
                    inner_offset: sat16(l4_offset + icmpv6::HEADER_LEN),
                }
            } else {
                L4::IcmpOther { icmp_type: t, code }
            };
            Ok((l4, icmpv6::HEADER_LEN, seg.len() - icmpv6::HEADER_LEN))
        }
        _ => Ok((L4::Generic, 0, seg.len())),
    }
}

/// Parses the packet quoted in the ICMP/ICMPv6 error `outer` (parsed from `frame`).
///
/// Needs the whole quoted IP header (IPv6: and its extension headers) and the L4 bytes
/// the tuple needs, as Linux does: 4 for a port protocol, 8 for ICMP. The quote may be
/// truncated anywhere after that. Checksums of the quote are not verified.
///
/// # Errors
/// [`ParseError::NotIcmpError`] if `outer.l4` is not [`L4::IcmpError`];
/// [`ParseError::Truncated`], [`ParseError::BadIpVersion`] (the quote is not of the
/// outer family), [`ParseError::BadIhl`], [`ParseError::BadTotalLength`],
/// [`ParseError::TooManyExtHeaders`].
#[inline]
pub fn parse_inner(frame: &[u8], outer: &ParsedPacket) -> Result<InnerPacket, ParseError> {
    let L4::IcmpError { inner_offset, .. } = outer.l4 else {
        return Err(ParseError::NotIcmpError);
    };
    let start = usize::from(inner_offset);
    let end = outer.l3_end().min(frame.len());
    let quote_end = |total: usize| end.min(start + total);
    match outer.l3 {
        L3::Ipv4 => {
            let ip = ipv4::Packet::new_checked_header(sub(frame, start, end))?;
            let l4 = start + ip.header_len();
            let stop = quote_end(usize::from(ip.total_len()));
            let fragment = if !ip.is_fragment() {
                Fragment::Whole
            } else if ip.is_first_fragment() {
                Fragment::First
            } else {
                Fragment::NonFirst
            };
            let seg = sub(frame, l4, stop);
            let l4_info = if fragment == Fragment::NonFirst {
                L4::None
            } else {
                inner_l4(seg, ip.protocol(), false)?
            };
            Ok(InnerPacket {
                l3: L3::Ipv4,
                l3_offset: sat16(start),
                l4_offset: sat16(l4),
                l4_available: sat16(seg.len()),
                src: IpAddr::V4(ip.src_addr()),
                dst: IpAddr::V4(ip.dst_addr()),
                protocol: ip.protocol(),
                fragment,
                l4: l4_info,
            })
        }
        L3::Ipv6 => {
            let ip = ipv6::Packet::new_checked_header(sub(frame, start, end))?;
            let stop = quote_end(ip.total_len());
            let quote = sub(frame, 0, stop);
            let w = ipv6::walk_ext_headers(quote, start + ipv6::HEADER_LEN, ip.next_header())?;
            let fragment = frag_of(w.fragment);
            let seg = sub(quote, w.offset, stop);
            let l4_info = if fragment == Fragment::NonFirst {
                L4::None
            } else {
                inner_l4(seg, w.protocol, true)?
            };
            Ok(InnerPacket {
                l3: L3::Ipv6,
                l3_offset: sat16(start),
                l4_offset: sat16(w.offset),
                l4_available: sat16(seg.len()),
                src: IpAddr::V6(ip.src_addr()),
                dst: IpAddr::V6(ip.dst_addr()),
                protocol: w.protocol,
                fragment,
                l4: l4_info,
            })
        }
        L3::Other { .. } => Err(ParseError::NotIcmpError),
    }
}

#[inline]
fn inner_l4(seg: &[u8], protocol: u8, v6: bool) -> Result<L4, ParseError> {
    let ports = |layer| -> Result<(u16, u16), ParseError> {
        need(layer, seg, 4)?;
        Ok((super::be16(seg, 0), super::be16(seg, 2)))
    };
    Ok(match protocol {
        ip_proto::TCP | ip_proto::UDP | ip_proto::SCTP | ip_proto::DCCP | ip_proto::UDPLITE => {
            let layer = match protocol {
                ip_proto::TCP => Layer::Tcp,
                ip_proto::UDP => Layer::Udp,
                _ => Layer::Ports,
            };
            let (src_port, dst_port) = ports(layer)?;
            L4::Ports { src_port, dst_port }
        }
        ip_proto::ICMP | ip_proto::ICMPV6 if (protocol == ip_proto::ICMPV6) == v6 => {
            let layer = if v6 { Layer::Icmpv6 } else { Layer::Icmp };
            need(layer, seg, icmp::HEADER_LEN)?;
            let m = icmp::Packet::new_unchecked(seg);
            let (t, code) = (m.msg_type(), m.code());
            let query = if v6 {
                icmpv6::is_query(t)
            } else {
                icmp::is_query(t)
            };
            if query {
                L4::IcmpQuery {
                    id: m.ident(),
                    icmp_type: t,
                    code,
                }
            } else {
                L4::IcmpOther { icmp_type: t, code }
            }
        }
        _ => L4::Generic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::DropReason;
    use crate::wire::fixtures::*;
    use etherparse::{LinkExtSlice, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    const ALL: ParseOptions = ParseOptions::VERIFY_ALL;
    const NONE: ParseOptions = ParseOptions::VERIFY_NONE;

    /// Compares a parse result with etherparse's reading of the same bytes.
    fn cross_check(frame: &[u8], p: &ParsedPacket) {
        let s = SlicedPacket::from_ethernet(frame).expect("etherparse parses it");
        let ids: Vec<u16> = s
            .link_exts
            .iter()
            .filter_map(|e| match e {
                LinkExtSlice::Vlan(v) => Some(v.vlan_identifier().value()),
                LinkExtSlice::Macsec(_) => None,
            })
            .collect();
        let ours: Vec<u16> = p.vlans.iter().flatten().copied().collect();
        assert_eq!(ours, ids, "vlans");
        let (src, dst): ([u8; 16], [u8; 16]) = match &s.net {
            Some(NetSlice::Ipv4(ip)) => {
                let h = ip.header();
                assert_eq!(p.l3, L3::Ipv4);
                assert_eq!(p.src, IpAddr::V4(h.source_addr()));
                assert_eq!(p.dst, IpAddr::V4(h.destination_addr()));
                assert_eq!(p.ttl, h.ttl());
                assert_eq!(p.protocol, h.protocol().0);
                assert_eq!(p.l3_len, u32::from(h.total_len()));
                assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum());
                (
                    h.source_addr().to_ipv6_mapped().octets(),
                    h.destination_addr().to_ipv6_mapped().octets(),
                )
            }
            Some(NetSlice::Ipv6(ip)) => {
                let h = ip.header();
                assert_eq!(p.l3, L3::Ipv6);
                assert_eq!(p.src, IpAddr::V6(h.source_addr()));
                assert_eq!(p.dst, IpAddr::V6(h.destination_addr()));
                assert_eq!(p.ttl, h.hop_limit());
                assert_eq!(p.protocol, ip.payload().ip_number.0);
                (h.source_addr().octets(), h.destination_addr().octets())
            }
            _ => {
                assert!(matches!(p.l3, L3::Other { .. }));
                return;
            }
        };
        let v4 = |a: [u8; 16]| [a[12], a[13], a[14], a[15]];
        match (&s.transport, &p.l4) {
            (Some(TransportSlice::Tcp(t)), L4::Tcp(i)) => {
                assert_eq!(
                    (i.src_port, i.dst_port),
                    (t.source_port(), t.destination_port())
                );
                assert_eq!(
                    (i.seq, i.ack),
                    (t.sequence_number(), t.acknowledgment_number())
                );
                assert_eq!(i.window, t.window_size());
                assert_eq!(i.flags.contains(TcpFlags::SYN), t.syn());
                assert_eq!(i.flags.contains(TcpFlags::ACK), t.ack());
                assert_eq!(i.flags.contains(TcpFlags::FIN), t.fin());
                assert_eq!(i.flags.contains(TcpFlags::RST), t.rst());
                assert_eq!(i.flags.contains(TcpFlags::PSH), t.psh());
                assert_eq!(usize::from(i.payload_len), t.payload().len());
                assert_eq!(
                    usize::from(p.payload_offset),
                    usize::from(p.l4_offset) + usize::from(i.header_len)
                );
                let want = if p.l3 == L3::Ipv4 {
                    t.calc_checksum_ipv4(v4(src), v4(dst))
                } else {
                    t.calc_checksum_ipv6(src, dst)
                };
                assert_eq!(want.expect("small"), t.checksum());
                let (mut mss, mut ws, mut sp) = (None, None, false);
                for o in t.options_iterator() {
                    match o.expect("valid options") {
                        etherparse::TcpOptionElement::MaximumSegmentSize(m) => mss = Some(m),
                        etherparse::TcpOptionElement::WindowScale(w) => ws = Some(w),
                        etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted => {
                            sp = true;
                        }
                        _ => {}
                    }
                }
                assert_eq!((i.mss, i.wscale, i.sack_permitted), (mss, ws, sp));
            }
            (Some(TransportSlice::Udp(u)), L4::Udp { src_port, dst_port }) => {
                assert_eq!(
                    (*src_port, *dst_port),
                    (u.source_port(), u.destination_port())
                );
                assert_eq!(usize::from(p.payload_len), u.payload().len());
                if u.checksum() != 0 {
                    let h = u.to_header();
                    let want = if p.l3 == L3::Ipv4 {
                        h.calc_checksum_ipv4_raw(v4(src), v4(dst), u.payload())
                    } else {
                        h.calc_checksum_ipv6_raw(src, dst, u.payload())
                    };
                    assert_eq!(want.expect("small"), u.checksum());
                }
            }
            (Some(TransportSlice::Icmpv4(m)), l4) => {
                assert_eq!(m.icmp_type().calc_checksum(m.payload()), m.checksum());
                check_icmp(l4, m.type_u8(), m.code_u8(), m.bytes5to8());
            }
            (Some(TransportSlice::Icmpv6(m)), l4) => {
                let want = m.icmp_type().calc_checksum(src, dst, m.payload());
                assert_eq!(want.expect("small"), m.checksum());
                check_icmp(l4, m.type_u8(), m.code_u8(), m.bytes5to8());
            }
            (None, l4) => assert!(matches!(l4, L4::Generic | L4::None | L4::Ports { .. })),
            (t, l4) => panic!("etherparse {t:?} vs ours {l4:?}"),
        }
    }

    fn check_icmp(l4: &L4, t: u8, c: u8, rest: [u8; 4]) {
        match *l4 {
            L4::IcmpQuery {
                id,
                icmp_type,
                code,
            } => {
                assert_eq!((icmp_type, code), (t, c));
                assert_eq!(id, u16::from_be_bytes([rest[0], rest[1]]));
            }
            L4::IcmpError {
                icmp_type, code, ..
            }
            | L4::IcmpOther { icmp_type, code } => assert_eq!((icmp_type, code), (t, c)),
            ref other => panic!("not icmp: {other:?}"),
        }
    }

    /// Every proper prefix of a frame fails (no padding in the fixtures), never panics.
    fn all_prefixes_fail(frame: &[u8]) {
        for len in 0..frame.len() {
            assert!(parse(&frame[..len], NONE).is_err(), "prefix {len} parsed");
        }
    }

    /// Flipping a payload byte breaks the L4 checksum, which only verification notices.
    fn corrupt_is_caught(frame: &[u8], layer: Layer) {
        let mut f = frame.to_vec();
        let last = f.len() - 1;
        f[last] ^= 0x5a;
        assert_eq!(parse(&f, ALL), Err(ParseError::BadChecksum { layer }));
        assert!(parse(&f, NONE).is_ok());
    }

    #[test]
    fn tcp_syn() {
        let p = parse(&TCP_SYN, ALL).expect("valid");
        cross_check(&TCP_SYN, &p);
        assert_eq!((p.l3_offset, p.l4_offset, p.payload_offset), (14, 34, 74));
        assert_eq!(p.src, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(p.fragment, Fragment::Whole);
        assert!(!p.has_ipv4_options);
        let L4::Tcp(t) = p.l4 else {
            panic!("not tcp: {:?}", p.l4)
        };
        assert_eq!(t.flags, TcpFlags::SYN);
        assert_eq!(
            (t.seq, t.window, t.header_len, t.payload_len),
            (0x1234_5678, 64240, 40, 0)
        );
        assert_eq!(
            (t.mss, t.wscale, t.sack_permitted),
            (Some(1460), Some(7), true)
        );
        assert_eq!(t.sack_highest, None);
        assert!(!t.options_malformed);
        assert_eq!(p.l4.ports(), Some((40000, 80)));
        all_prefixes_fail(&TCP_SYN);
        corrupt_is_caught(&TCP_SYN, Layer::Tcp);
        // A bad IPv4 header checksum.
        let mut f = TCP_SYN;
        f[22] ^= 1; // TTL
        assert_eq!(
            parse(&f, ALL),
            Err(ParseError::BadChecksum { layer: Layer::Ipv4 })
        );
        assert_eq!(
            parse(&f, ALL).map_err(|e| e.reason()),
            Err(DropReason::BadChecksumL3)
        );
    }

    #[test]
    fn udp_dns_plain_vlan_qinq() {
        for (frame, vlans, l3) in [
            (&UDP_DNS[..], [None, None], 14u16),
            (&VLAN_UDP_DNS[..], [Some(100), None], 18),
            (&QINQ_UDP_DNS[..], [Some(200), Some(100)], 22),
        ] {
            let p = parse(frame, ALL).expect("valid");
            cross_check(frame, &p);
            assert_eq!(p.vlans, vlans);
            assert_eq!(p.l3_offset, l3);
            assert_eq!(p.l4_offset, l3 + 20);
            assert_eq!(p.payload_offset, l3 + 28);
            assert_eq!(p.payload_len, 29);
            assert_eq!(p.dst, IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)));
            assert_eq!(
                p.l4,
                L4::Udp {
                    src_port: 53000,
                    dst_port: 53
                }
            );
            all_prefixes_fail(frame);
            corrupt_is_caught(frame, Layer::Udp);
        }
        // Ethernet padding after the IP packet is ignored.
        let mut padded = UDP_DNS.to_vec();
        padded.extend_from_slice(&[0xee; 9]);
        let p = parse(&padded, ALL).expect("valid");
        assert_eq!((p.l3_end(), p.l4_len()), (71, 37));
        // UDP checksum 0 means "none" over IPv4.
        let mut f = UDP_DNS;
        f[40] = 0;
        f[41] = 0;
        assert!(parse(&f, ALL).is_ok());
    }

    #[test]
    fn icmp_echo() {
        let p = parse(&ICMP_ECHO, ALL).expect("valid");
        cross_check(&ICMP_ECHO, &p);
        assert_eq!(
            p.l4,
            L4::IcmpQuery {
                id: 0x1c46,
                icmp_type: 8,
                code: 0
            }
        );
        assert_eq!(p.payload_offset, 42);
        assert_eq!(p.l4.ports(), None);
        all_prefixes_fail(&ICMP_ECHO);
        corrupt_is_caught(&ICMP_ECHO, Layer::Icmp);
        assert_eq!(parse_inner(&ICMP_ECHO, &p), Err(ParseError::NotIcmpError));
    }

    #[test]
    fn icmp_port_unreachable_quotes_udp() {
        let p = parse(&ICMP_PORT_UNREACH, ALL).expect("valid");
        cross_check(&ICMP_PORT_UNREACH, &p);
        assert_eq!(p.ttl, 57);
        assert_eq!(
            p.l4,
            L4::IcmpError {
                icmp_type: 3,
                code: 3,
                inner_offset: 42
            }
        );
        let i = parse_inner(&ICMP_PORT_UNREACH, &p).expect("valid");
        assert_eq!(i.l3, L3::Ipv4);
        assert_eq!((i.l3_offset, i.l4_offset, i.l4_available), (42, 62, 37));
        assert_eq!(i.src, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(i.dst, IpAddr::V4(Ipv4Addr::new(8, 8, 8, 8)));
        assert_eq!(i.protocol, ip_proto::UDP);
        assert_eq!(i.fragment, Fragment::Whole);
        assert_eq!(i.l4.ports(), Some((53000, 53)));
        all_prefixes_fail(&ICMP_PORT_UNREACH);
        corrupt_is_caught(&ICMP_PORT_UNREACH, Layer::Icmp);
    }

    /// An ICMPv4 error whose quote is cut to `n` bytes (outer lengths fixed up).
    fn cut_quote_v4(n: usize) -> Vec<u8> {
        let mut f = ICMP_PORT_UNREACH[..42 + n].to_vec();
        let total = u16::try_from(f.len() - 14).expect("small");
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f
    }

    #[test]
    fn truncated_quotes() {
        for n in 0..=57 {
            let f = cut_quote_v4(n);
            let p = parse(&f, NONE).expect("outer is fine");
            let r = parse_inner(&f, &p);
            // IPv4 header (20) plus the 4 port bytes is what the tuple needs.
            assert_eq!(r.is_ok(), n >= 24, "quote of {n} bytes: {r:?}");
            if let Ok(i) = r {
                assert_eq!(usize::from(i.l4_available), n - 20);
                assert_eq!(i.l4.ports(), Some((53000, 53)));
            }
        }
        // IPv6: fixed header (40) + 4 port bytes.
        let p = parse(&ICMPV6_PORT_UNREACH, ALL).expect("valid");
        let start = usize::from(p.l3_offset);
        for n in 0..=(ICMPV6_PORT_UNREACH.len() - 62) {
            let mut f = ICMPV6_PORT_UNREACH[..62 + n].to_vec();
            let plen = u16::try_from(f.len() - start - 40).expect("small");
            f[start + 4..start + 6].copy_from_slice(&plen.to_be_bytes());
            let p = parse(&f, NONE).expect("outer is fine");
            let r = parse_inner(&f, &p);
            assert_eq!(r.is_ok(), n >= 44, "quote of {n} bytes: {r:?}");
        }
    }

    #[test]
    fn ipv6_tcp_with_ext_headers() {
        let f = &IPV6_TCP_HBH_FRAG;
        let p = parse(f, ALL).expect("valid");
        cross_check(f, &p);
        assert_eq!(p.l3, L3::Ipv6);
        assert_eq!(p.protocol, ip_proto::TCP);
        assert_eq!(p.fragment, Fragment::Whole); // atomic fragment
        assert_eq!((p.l4_offset, p.payload_offset, p.payload_len), (70, 102, 5));
        let L4::Tcp(t) = p.l4 else {
            panic!("not tcp: {:?}", p.l4)
        };
        assert_eq!(t.flags, TcpFlags::ACK | TcpFlags::PSH);
        assert_eq!((t.seq, t.ack, t.window), (1000, 2000, 500));
        assert_eq!((t.mss, t.wscale), (None, None));
        all_prefixes_fail(f);
        corrupt_is_caught(f, Layer::Tcp);
        // Set M: a first fragment. Ports are read, the checksum is not checked.
        let mut g = *f;
        g[65] |= 1;
        let p = parse(&g, ALL).expect("valid");
        assert_eq!(p.fragment, Fragment::First);
        assert_eq!(p.l4.ports(), Some((443, 51000)));
        g[f.len() - 1] ^= 0xff;
        assert!(parse(&g, ALL).is_ok());
        // Offset 8: a later fragment, no L4 header.
        g[64..66].copy_from_slice(&[0x00, 0x08]);
        let p = parse(&g, ALL).expect("valid");
        assert_eq!(p.fragment, Fragment::NonFirst);
        assert_eq!(p.l4, L4::None);
        assert_eq!(p.protocol, ip_proto::TCP);
        assert_eq!((p.l4_offset, p.payload_offset, p.payload_len), (70, 70, 37));
    }

    #[test]
    fn icmpv6_echo_and_error() {
        let p = parse(&ICMPV6_ECHO, ALL).expect("valid");
        cross_check(&ICMPV6_ECHO, &p);
        assert_eq!(
            p.l4,
            L4::IcmpQuery {
                id: 0x4242,
                icmp_type: 128,
                code: 0
            }
        );
        all_prefixes_fail(&ICMPV6_ECHO);
        corrupt_is_caught(&ICMPV6_ECHO, Layer::Icmpv6);

        let p = parse(&ICMPV6_PORT_UNREACH, ALL).expect("valid");
        cross_check(&ICMPV6_PORT_UNREACH, &p);
        assert_eq!(
            p.l4,
            L4::IcmpError {
                icmp_type: 1,
                code: 4,
                inner_offset: 62
            }
        );
        let i = parse_inner(&ICMPV6_PORT_UNREACH, &p).expect("valid");
        assert_eq!(i.l3, L3::Ipv6);
        assert_eq!((i.l4_offset, i.protocol), (102, ip_proto::UDP));
        assert_eq!(i.l4.ports(), Some((5353, 53)));
        assert_eq!(i.dst, IpAddr::V6("2001:db8::2".parse().expect("addr")));
        all_prefixes_fail(&ICMPV6_PORT_UNREACH);
        corrupt_is_caught(&ICMPV6_PORT_UNREACH, Layer::Icmpv6);
    }

    #[test]
    fn udp_zero_checksum_is_bad_over_ipv6() {
        let mut b = Vec::new();
        PacketBuilder::ethernet2([1; 6], [2; 6])
            .ipv6([1; 16], [2; 16], 9)
            .udp(1, 2)
            .write(&mut b, b"x")
            .expect("write");
        let at = 14 + 40 + 6;
        b[at..at + 2].copy_from_slice(&[0, 0]);
        assert_eq!(
            parse(&b, ALL),
            Err(ParseError::BadChecksum { layer: Layer::Udp })
        );
        assert!(parse(&b, NONE).is_ok());
    }

    #[test]
    fn non_ip_generic_and_fragments() {
        // ARP is reported, not an error.
        let mut arp = [0u8; 42];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let p = parse(&arp, ALL).expect("valid");
        assert_eq!(p.l3, L3::Other { ethertype: 0x0806 });
        assert_eq!(p.l4, L4::None);
        assert!(!p.is_ip());
        // GRE: generic, no ports.
        let mut f = ICMP_ECHO;
        f[23] = ip_proto::GRE;
        let p = parse(&f, NONE).expect("valid");
        assert_eq!((p.l4, p.protocol), (L4::Generic, ip_proto::GRE));
        assert_eq!((p.payload_offset, p.payload_len), (34, 16));
        // SCTP: ports only.
        f[23] = ip_proto::SCTP;
        let p = parse(&f, NONE).expect("valid");
        assert_eq!(
            p.l4.ports(),
            Some((0x0800, u16::from_be_bytes([f[36], f[37]])))
        );
        // IPv4 first fragment: ports; later fragment: nothing past L3.
        let mut f = UDP_DNS;
        f[20] = 0x20; // MF
        ipv4::Packet::new_unchecked(&mut f[14..]).fill_checksum();
        // The UDP checksum covers data not all here: a fragment's is not checked.
        f[70] ^= 0xff;
        let p = parse(&f, ALL).expect("valid");
        assert_eq!(p.fragment, Fragment::First);
        assert_eq!(p.l4.ports(), Some((53000, 53)));
        f[20] = 0x00;
        f[21] = 0x10; // offset 128, last fragment
        let p = parse(&f, NONE).expect("valid");
        assert_eq!(p.fragment, Fragment::NonFirst);
        assert_eq!(p.l4, L4::None);
        assert_eq!(p.payload_len, 37);
    }

    #[test]
    fn ipv4_options_and_bad_headers() {
        let mut b = Vec::new();
        b.extend_from_slice(&UDP_DNS[..14]);
        b.extend_from_slice(&[
            0x46, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 8, 8, 8, 8,
        ]);
        b.extend_from_slice(&[0x94, 0x04, 0, 0]);
        b.extend_from_slice(&UDP_DNS[34..]);
        let total = u16::try_from(b.len() - 14).expect("small");
        b[16..18].copy_from_slice(&total.to_be_bytes());
        let mut ip = ipv4::Packet::new_unchecked(&mut b[14..]);
        ip.fill_checksum();
        let p = parse(&b, ALL).expect("valid");
        assert!(p.has_ipv4_options);
        assert_eq!(p.l4_offset, 38);
        cross_check(&b, &p);

        let mut f = TCP_SYN;
        f[46] = 0x40; // doff 4
        assert_eq!(
            parse(&f, NONE).map_err(|e| e.reason()),
            Err(DropReason::BadTcpDataOffset)
        );
        let mut f = UDP_DNS;
        f[39] = 200; // UDP length past the datagram
        assert_eq!(
            parse(&f, NONE).map_err(|e| e.reason()),
            Err(DropReason::BadUdpLength)
        );
        let mut f = UDP_DNS;
        f[14] = 0x55;
        assert_eq!(
            parse(&f, NONE).map_err(|e| e.reason()),
            Err(DropReason::BadIpVersion)
        );
        let mut f = IPV6_TCP_HBH_FRAG;
        f[14] = 0x40;
        assert_eq!(
            parse(&f, NONE),
            Err(ParseError::BadIpVersion {
                expected: 6,
                found: 4
            })
        );
    }

    #[test]
    fn parsed_packet_is_small() {
        assert!(
            core::mem::size_of::<ParsedPacket>() <= 112,
            "{}",
            core::mem::size_of::<ParsedPacket>()
        );
    }

    #[derive(Debug, Clone)]
    enum Proto {
        Tcp {
            flags: u8,
            seq: u32,
            ack: u32,
            win: u16,
            mss: Option<u16>,
            ws: Option<u8>,
        },
        Udp,
        Echo {
            id: u16,
            seq: u16,
        },
    }

    fn proto() -> impl Strategy<Value = Proto> {
        prop_oneof![
            (
                any::<u8>(),
                any::<u32>(),
                any::<u32>(),
                any::<u16>(),
                any::<Option<u16>>(),
                any::<Option<u8>>()
            )
                .prop_map(|(flags, seq, ack, win, mss, ws)| Proto::Tcp {
                    flags,
                    seq,
                    ack,
                    win,
                    mss,
                    ws
                }),
            Just(Proto::Udp),
            (any::<u16>(), any::<u16>()).prop_map(|(id, seq)| Proto::Echo { id, seq }),
        ]
    }

    /// Builds a frame with etherparse.
    #[allow(clippy::too_many_arguments)] // one argument per proptest input
    fn build(
        vlans: u8,
        vid: u16,
        v6: bool,
        src: [u8; 16],
        dst: [u8; 16],
        ttl: u8,
        proto: &Proto,
        sport: u16,
        dport: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let id = etherparse::VlanId::try_new(vid & 0x0FFF).expect("12 bits");
        let eth = PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]);
        let s4 = [src[0], src[1], src[2], src[3]];
        let d4 = [dst[0], dst[1], dst[2], dst[3]];
        let ip = match (vlans, v6) {
            (0, false) => eth.ipv4(s4, d4, ttl),
            (0, true) => eth.ipv6(src, dst, ttl),
            (1, false) => eth.single_vlan(id).ipv4(s4, d4, ttl),
            (1, true) => eth.single_vlan(id).ipv6(src, dst, ttl),
            (_, false) => eth.double_vlan(id, id).ipv4(s4, d4, ttl),
            (_, true) => eth.double_vlan(id, id).ipv6(src, dst, ttl),
        };
        let mut out = Vec::new();
        match *proto {
            Proto::Tcp {
                flags,
                seq,
                ack,
                win,
                mss,
                ws,
            } => {
                let mut b = ip.tcp(sport, dport, seq, win);
                if flags & 1 != 0 {
                    b = b.fin();
                }
                if flags & 2 != 0 {
                    b = b.syn();
                }
                if flags & 4 != 0 {
                    b = b.rst();
                }
                if flags & 8 != 0 {
                    b = b.psh();
                }
                if flags & 16 != 0 {
                    b = b.ack(ack);
                }
                let mut opts = Vec::new();
                if let Some(m) = mss {
                    opts.push(etherparse::TcpOptionElement::MaximumSegmentSize(m));
                }
                if let Some(w) = ws {
                    opts.push(etherparse::TcpOptionElement::WindowScale(w));
                }
                if flags & 32 != 0 {
                    opts.push(etherparse::TcpOptionElement::SelectiveAcknowledgementPermitted);
                }
                let b = b.options(&opts).expect("fits");
                b.write(&mut out, payload).expect("write");
            }
            Proto::Udp => ip
                .udp(sport, dport)
                .write(&mut out, payload)
                .expect("write"),
            Proto::Echo { id, seq } if v6 => {
                ip.icmpv6_echo_request(id, seq)
                    .write(&mut out, payload)
                    .expect("write");
            }
            Proto::Echo { id, seq } => {
                ip.icmpv4_echo_request(id, seq)
                    .write(&mut out, payload)
                    .expect("write");
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn built_packets_agree_with_etherparse(
            vlans in 0u8..3, vid in any::<u16>(), v6 in any::<bool>(),
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), ttl in any::<u8>(),
            proto in proto(), sport in any::<u16>(), dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..200),
            pad in 0usize..20,
        ) {
            let mut f = build(vlans, vid, v6, src, dst, ttl, &proto, sport, dport, &payload);
            let len = f.len();
            let p = parse(&f, ALL).expect("built packets verify");
            cross_check(&f, &p);
            prop_assert_eq!(p.l3_end(), len);
            prop_assert_eq!(usize::from(p.payload_len), payload.len());
            prop_assert_eq!(
                &f[usize::from(p.payload_offset)..usize::from(p.payload_offset) + payload.len()],
                &payload[..]
            );
            match (&proto, &p.l4) {
                (Proto::Tcp { .. }, L4::Tcp(_)) | (Proto::Udp, L4::Udp { .. }) => {
                    prop_assert_eq!(p.l4.ports(), Some((sport, dport)));
                }
                (Proto::Echo { id, .. }, L4::IcmpQuery { id: got, .. }) => prop_assert_eq!(id, got),
                (want, got) => prop_assert!(false, "{want:?} parsed as {got:?}"),
            }
            // Link padding changes nothing.
            f.extend(core::iter::repeat_n(0u8, pad));
            prop_assert_eq!(parse(&f, ALL), Ok(p));
            // Every truncation fails cleanly.
            for cut in 0..len {
                prop_assert!(parse(&f[..cut], ALL).is_err());
            }
        }

        #[test]
        fn udp_step_reads_a_valid_datagram_as_the_plain_step_does(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), ttl in 1u8..,
            ports in any::<(u16, u16)>(),
            payload in proptest::collection::vec(any::<u8>(), 0..60), pad in 0usize..8,
        ) {
            let mut f = build(0, 0, false, src, dst, ttl, &Proto::Udp, ports.0, ports.1, &payload);
            f.extend(core::iter::repeat_n(0u8, pad));
            for opts in [ALL, NONE] {
                let u = plain_udp_v4(&f, opts);
                prop_assert!(u.is_some());
                let u = u.expect("checked");
                prop_assert_eq!(u.ports, ports);
                prop_assert_eq!(plain_v4(&f, opts), Some(Ok(u.plain())));
            }
            // A flipped payload byte fails the checksum: only the checking read refuses.
            if let Some(last) = payload.len().checked_sub(1) {
                f[14 + 20 + 8 + last] ^= 0x5a;
                prop_assert!(plain_udp_v4(&f, ALL).is_none());
                prop_assert!(plain_udp_v4(&f, NONE).is_some());
            }
        }

        #[test]
        fn plain_v4_step_gives_what_the_walk_gives(
            proto in proto(), src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(),
            payload in proptest::collection::vec(any::<u8>(), 0..60),
            // Bytes overwritten: mostly in the Ethernet and IPv4 headers.
            writes in proptest::collection::vec((0usize..48, any::<u8>()), 0..4),
            cut in any::<proptest::sample::Index>(), do_cut in any::<bool>(), pad in 0usize..8,
        ) {
            let mut f = build(0, 0, false, src, dst, 64, &proto, 1000, 2000, &payload);
            for (at, b) in writes {
                if let Some(x) = f.get_mut(at) {
                    *x = b;
                }
            }
            if do_cut {
                f.truncate(cut.index(f.len() + 1));
            }
            f.extend(core::iter::repeat_n(0u8, pad));
            for opts in [ALL, NONE] {
                prop_assert_eq!(parse(&f, opts), parse_walk(&f, opts));
                // The UDP step takes only what the plain step reads as UDP, the same.
                if let Some(u) = plain_udp_v4(&f, opts) {
                    prop_assert_eq!(plain_v4(&f, opts), Some(Ok(u.plain())));
                }
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            for opts in [ALL, NONE] {
                if let Ok(p) = parse(&data, opts) {
                    let _ = parse_inner(&data, &p);
                }
            }
        }

        #[test]
        fn arbitrary_l3_never_panics(
            v6 in any::<bool>(), vlan in any::<bool>(),
            mut l3 in proptest::collection::vec(any::<u8>(), 0..160),
            proto in prop_oneof![Just(1u8), Just(6), Just(17), Just(58), Just(0), Just(44), Just(43), Just(60), Just(51), Just(132), any::<u8>()],
            lenfix in any::<bool>(),
        ) {
            // Steer random bytes past the first checks so the deeper paths run.
            let mut f = vec![0u8; 12];
            if vlan {
                f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
            }
            f.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
            if let Some(b) = l3.first_mut() {
                *b = if v6 { 0x60 | (*b & 0x0f) } else { 0x45 };
            }
            if lenfix && l3.len() >= 40 {
                if v6 {
                    let n = u16::try_from(l3.len() - 40).expect("small");
                    l3[4..6].copy_from_slice(&n.to_be_bytes());
                    l3[6] = proto;
                } else {
                    let n = u16::try_from(l3.len()).expect("small");
                    l3[2..4].copy_from_slice(&n.to_be_bytes());
                    l3[6] &= 0x40;
                    l3[9] = proto;
                }
            }
            f.extend_from_slice(&l3);
            for opts in [ALL, NONE] {
                if let Ok(p) = parse(&f, opts) {
                    let _ = parse_inner(&f, &p);
                    prop_assert!(p.l3_end() <= f.len());
                    prop_assert!(usize::from(p.payload_offset) <= f.len());
                }
            }
        }

        #[test]
        fn arbitrary_quotes_never_panic(
            quote in proptest::collection::vec(any::<u8>(), 0..120), v6 in any::<bool>(),
        ) {
            // A valid outer ICMP error (checks off) around random quoted bytes.
            let (base, hdr) = if v6 { (&ICMPV6_PORT_UNREACH[..], 62) } else { (&ICMP_PORT_UNREACH[..], 42) };
            let mut f = base[..hdr].to_vec();
            let mut q = quote;
            if let Some(b) = q.first_mut() {
                *b = if v6 { 0x60 } else { 0x45 | (*b & 0x0f) };
            }
            f.extend_from_slice(&q);
            if v6 {
                let n = u16::try_from(f.len() - 54).expect("small");
                f[18..20].copy_from_slice(&n.to_be_bytes());
            } else {
                let n = u16::try_from(f.len() - 14).expect("small");
                f[16..18].copy_from_slice(&n.to_be_bytes());
            }
            let p = parse(&f, NONE).expect("outer is fine");
            if let Ok(i) = parse_inner(&f, &p) {
                prop_assert!(usize::from(i.l4_offset) + usize::from(i.l4_available) <= f.len());
            }
        }
    }
}
