//! The device's frame classifier and NAT/L2 rewrite.
//!
//! [`classify`] parses exactly what the device parses: Ethernet II with at most one
//! 802.1Q tag, IPv4 without options or IPv6 without extension headers, and TCP, UDP,
//! ICMP echo or ICMPv6 echo. Anything else gets a [`PuntReason`] and goes to the host.
//! [`rewrite`] then changes MACs, TTL/hop limit, addresses and ports (ICMP echo ids) of
//! the classified frame in place, updating every checksum incrementally (RFC 1624).
//!
//! Both run per packet at tens of Mpps: no allocation, no panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ETH_HDR_LEN: usize = 14;
const VLAN_TAG_LEN: usize = 4;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const IPV4_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
const TCP_HDR_LEN: usize = 20;
const UDP_HDR_LEN: usize = 8;
const ICMP_ECHO_LEN: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// IPv6 extension headers the device recognises (device.md section 15.2), except
/// Fragment (44) and the experimental 254. ESP (50) is not among them: the device
/// treats it as an unsupported L4 protocol.
const IPV6_EXT_HEADERS: [u8; 8] = [0, 43, 51, 60, 135, 139, 140, 253];
const IPV6_FRAGMENT: u8 = 44;
const IPV6_EXPERIMENTAL_EXT: u8 = 254;

/// Why the device hands a frame to the host instead of processing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PuntReason {
    /// Not IPv4 or IPv6 (ARP, LLDP, stacked VLAN tags, 802.3 length field, ...).
    NonIp,
    /// Too short for its headers, or a header field is inconsistent.
    Malformed,
    /// An IPv4 fragment or an IPv6 Fragment header.
    Fragment,
    /// IPv4 with options (IHL > 5).
    IpOptions,
    /// IPv6 with extension headers.
    Ipv6ExtHeaders,
    /// Not TCP, UDP, ICMP echo or ICMPv6 echo (ICMP errors included).
    UnsupportedL4,
}

/// Layer-4 key fields of a classified frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum L4 {
    /// TCP.
    Tcp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
        /// The flags byte (CWR..FIN; bit 0 is FIN).
        flags: u8,
    },
    /// UDP.
    Udp {
        /// Source port.
        src_port: u16,
        /// Destination port.
        dst_port: u16,
    },
    /// ICMP echo (IPv4) or ICMPv6 echo (IPv6).
    IcmpEcho {
        /// The echo identifier.
        id: u16,
        /// Echo reply rather than request.
        reply: bool,
    },
}

/// A frame the device can process: header offsets and key fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedFrame {
    vlan_tci: Option<u16>,
    l3_offset: usize,
    l4_offset: usize,
    l4_len: usize,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    l4: L4,
}

impl ParsedFrame {
    /// The 802.1Q tag control information, if the frame is tagged.
    pub fn vlan_tci(&self) -> Option<u16> {
        self.vlan_tci
    }
    /// Offset of the IP header.
    pub fn l3_offset(&self) -> usize {
        self.l3_offset
    }
    /// Offset of the L4 header.
    pub fn l4_offset(&self) -> usize {
        self.l4_offset
    }
    /// Length of L4 header plus payload, from the IP header (excludes Ethernet padding).
    pub fn l4_len(&self) -> usize {
        self.l4_len
    }
    /// Offset just past the IP packet (Ethernet padding may follow).
    pub fn ip_end(&self) -> usize {
        self.l4_offset + self.l4_len
    }
    /// Source address.
    pub fn src(&self) -> IpAddr {
        self.src
    }
    /// Destination address.
    pub fn dst(&self) -> IpAddr {
        self.dst
    }
    /// IPv4 TTL or IPv6 hop limit.
    pub fn ttl(&self) -> u8 {
        self.ttl
    }
    /// L4 key fields.
    pub fn l4(&self) -> L4 {
        self.l4
    }
    /// Whether the frame is IPv6.
    pub fn is_ipv6(&self) -> bool {
        self.src.is_ipv6()
    }
}

/// Result of [`classify`].
pub type Classify = Result<ParsedFrame, PuntReason>;

#[inline]
fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

#[inline]
fn array<const N: usize>(b: &[u8], at: usize) -> Option<[u8; N]> {
    b.get(at..at + N)?.try_into().ok()
}

/// Whether the ones'-complement sum of an IPv4 header (checksum field included) is
/// `0xFFFF`, i.e. its header checksum is right.
#[inline]
fn ipv4_header_checksum_ok(header: &[u8]) -> bool {
    let mut sum: u32 = header
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Parses `frame` as the device does.
pub fn classify(frame: &[u8]) -> Classify {
    use PuntReason::{Fragment, IpOptions, Ipv6ExtHeaders, Malformed, NonIp, UnsupportedL4};
    if frame.len() < ETH_HDR_LEN {
        return Err(Malformed);
    }
    let mut ethertype = be16(frame, 12).ok_or(Malformed)?;
    let mut l3 = ETH_HDR_LEN;
    let mut vlan_tci = None;
    if ethertype == ETHERTYPE_VLAN {
        vlan_tci = Some(be16(frame, 14).ok_or(Malformed)?);
        ethertype = be16(frame, 16).ok_or(Malformed)?;
        l3 += VLAN_TAG_LEN;
    }
    let (src, dst, ttl, proto, l4_off, l4_len) = match ethertype {
        ETHERTYPE_IPV4 => {
            let h: [u8; IPV4_HDR_LEN] = array(frame, l3).ok_or(Malformed)?;
            if h[0] >> 4 != 4 {
                return Err(Malformed);
            }
            let ihl = usize::from(h[0] & 0x0f) * 4;
            if ihl < IPV4_HDR_LEN {
                return Err(Malformed);
            }
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if total < ihl || frame.len() - l3 < total {
                return Err(Malformed);
            }
            // A wrong header checksum is malformed (checked before fragment/options).
            if !ipv4_header_checksum_ok(frame.get(l3..l3 + ihl).ok_or(Malformed)?) {
                return Err(Malformed);
            }
            if ihl > IPV4_HDR_LEN {
                return Err(IpOptions);
            }
            // MF set or a non-zero fragment offset.
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return Err(Fragment);
            }
            let src = Ipv4Addr::new(h[12], h[13], h[14], h[15]);
            let dst = Ipv4Addr::new(h[16], h[17], h[18], h[19]);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                h[8],
                h[9],
                l3 + IPV4_HDR_LEN,
                total - IPV4_HDR_LEN,
            )
        }
        ETHERTYPE_IPV6 => {
            let h: [u8; IPV6_HDR_LEN] = array(frame, l3).ok_or(Malformed)?;
            if h[0] >> 4 != 6 {
                return Err(Malformed);
            }
            let payload = usize::from(u16::from_be_bytes([h[4], h[5]]));
            if frame.len() - l3 - IPV6_HDR_LEN < payload {
                return Err(Malformed);
            }
            let next = h[6];
            if next == IPV6_FRAGMENT {
                return Err(Fragment);
            }
            if IPV6_EXT_HEADERS.contains(&next) || next == IPV6_EXPERIMENTAL_EXT {
                return Err(Ipv6ExtHeaders);
            }
            let src: [u8; 16] = array(&h, 8).ok_or(Malformed)?;
            let dst: [u8; 16] = array(&h, 24).ok_or(Malformed)?;
            (
                IpAddr::V6(Ipv6Addr::from(src)),
                IpAddr::V6(Ipv6Addr::from(dst)),
                h[7],
                next,
                l3 + IPV6_HDR_LEN,
                payload,
            )
        }
        _ => return Err(NonIp),
    };
    let l4_bytes = frame.get(l4_off..l4_off + l4_len).ok_or(Malformed)?;
    let v6 = src.is_ipv6();
    let l4 = match proto {
        PROTO_TCP => {
            let h: [u8; TCP_HDR_LEN] = array(l4_bytes, 0).ok_or(Malformed)?;
            let data_off = usize::from(h[12] >> 4) * 4;
            if data_off < TCP_HDR_LEN || data_off > l4_len {
                return Err(Malformed);
            }
            L4::Tcp {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
                flags: h[13],
            }
        }
        PROTO_UDP => {
            let h: [u8; UDP_HDR_LEN] = array(l4_bytes, 0).ok_or(Malformed)?;
            let len = usize::from(u16::from_be_bytes([h[4], h[5]]));
            if len < UDP_HDR_LEN || len > l4_len {
                return Err(Malformed);
            }
            // IPv6 makes the UDP checksum mandatory: 0 is malformed.
            if v6 && h[6] == 0 && h[7] == 0 {
                return Err(Malformed);
            }
            L4::Udp {
                src_port: u16::from_be_bytes([h[0], h[1]]),
                dst_port: u16::from_be_bytes([h[2], h[3]]),
            }
        }
        PROTO_ICMP | PROTO_ICMPV6 if (proto == PROTO_ICMPV6) == v6 => {
            let h: [u8; ICMP_ECHO_LEN] = array(l4_bytes, 0).ok_or(Malformed)?;
            let (request, reply) = if v6 {
                (ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY)
            } else {
                (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
            };
            if (h[0] != request && h[0] != reply) || h[1] != 0 {
                return Err(UnsupportedL4);
            }
            L4::IcmpEcho {
                id: u16::from_be_bytes([h[4], h[5]]),
                reply: h[0] == reply,
            }
        }
        _ => return Err(UnsupportedL4),
    };
    Ok(ParsedFrame {
        vlan_tci,
        l3_offset: l3,
        l4_offset: l4_off,
        l4_len,
        src,
        dst,
        ttl,
        l4,
    })
}

/// What to change in a frame. `None`/`false` leaves a field alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RewriteParams {
    /// New source MAC.
    pub src_mac: Option<[u8; 6]>,
    /// New destination MAC.
    pub dst_mac: Option<[u8; 6]>,
    /// Decrement the IPv4 TTL / IPv6 hop limit (a router hop).
    pub dec_ttl: bool,
    /// New source address and port (SNAT). For ICMP echo the port is the echo id.
    pub new_src: Option<(IpAddr, u16)>,
    /// New destination address and port (DNAT). For ICMP echo the port is the echo id,
    /// used only when `new_src` is `None` (an echo has one id).
    pub new_dst: Option<(IpAddr, u16)>,
}

/// Why [`rewrite`] left a frame unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum RewriteError {
    /// `dec_ttl` was asked and the TTL/hop limit is 0 or 1.
    #[error("TTL expired")]
    TtlExpired,
    /// A new address is of the other IP version than the frame.
    #[error("address family differs from the frame's")]
    FamilyMismatch,
    /// The frame is shorter than its [`ParsedFrame`] says (not the frame it was parsed
    /// from).
    #[error("frame does not match its parse")]
    FrameMismatch,
}

/// Sum of RFC 1624 terms `~m + m'` for the 16-bit words of `old` -> `new`.
#[inline]
fn delta_words(old: &[u8], new: &[u8]) -> u32 {
    old.chunks_exact(2)
        .zip(new.chunks_exact(2))
        .map(|(o, n)| {
            u32::from(!u16::from_be_bytes([o[0], o[1]]))
                + u32::from(u16::from_be_bytes([n[0], n[1]]))
        })
        .sum()
}

#[inline]
fn delta16(old: u16, new: u16) -> u32 {
    u32::from(!old) + u32::from(new)
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + sum(~m + m'))`.
#[inline]
fn apply(checksum: u16, delta: u32) -> u16 {
    let mut s = u32::from(!checksum) + delta;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    let [lo, hi, ..] = s.to_le_bytes();
    !u16::from_le_bytes([lo, hi])
}

#[inline]
fn get16(frame: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([frame[at], frame[at + 1]])
}

#[inline]
fn put16(frame: &mut [u8], at: usize, v: u16) {
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Sets a 16-bit field and returns its checksum delta.
#[inline]
fn set16(frame: &mut [u8], at: usize, v: u16) -> u32 {
    let old = get16(frame, at);
    put16(frame, at, v);
    delta16(old, v)
}

/// Sets an address field and returns its checksum delta.
#[inline]
fn set_addr<const N: usize>(frame: &mut [u8], at: usize, new: [u8; N]) -> u32 {
    let field = &mut frame[at..at + N];
    let d = delta_words(field, &new);
    field.copy_from_slice(&new);
    d
}

/// Rewrites `frame` in place as `params` says. `parsed` must be `classify(frame)`.
///
/// Either the whole rewrite happens or, on error, none of it.
pub fn rewrite(
    frame: &mut [u8],
    parsed: &ParsedFrame,
    params: &RewriteParams,
) -> Result<(), RewriteError> {
    let (l3, l4) = (parsed.l3_offset, parsed.l4_offset);
    let v6 = parsed.is_ipv6();
    let l4_min = match parsed.l4 {
        L4::Tcp { .. } => TCP_HDR_LEN,
        L4::Udp { .. } => UDP_HDR_LEN,
        L4::IcmpEcho { .. } => ICMP_ECHO_LEN,
    };
    let ip_hdr = if v6 { IPV6_HDR_LEN } else { IPV4_HDR_LEN };
    if l4 != l3 + ip_hdr || l3 < ETH_HDR_LEN || frame.len() < l4 + l4_min {
        return Err(RewriteError::FrameMismatch);
    }
    let family_ok = |a: &Option<(IpAddr, u16)>| a.is_none_or(|(ip, _)| ip.is_ipv6() == v6);
    if !family_ok(&params.new_src) || !family_ok(&params.new_dst) {
        return Err(RewriteError::FamilyMismatch);
    }
    let ttl_at = l3 + if v6 { 7 } else { 8 };
    if params.dec_ttl && frame[ttl_at] <= 1 {
        return Err(RewriteError::TtlExpired);
    }

    // Nothing fails from here on.
    if let Some(mac) = params.dst_mac {
        frame[0..6].copy_from_slice(&mac);
    }
    if let Some(mac) = params.src_mac {
        frame[6..12].copy_from_slice(&mac);
    }
    let mut ip_delta = 0u32; // IPv4 header checksum
    let mut pseudo_delta = 0u32; // pseudo-header part of the L4 checksum
    if params.dec_ttl {
        if v6 {
            frame[ttl_at] -= 1;
        } else {
            // TTL shares its checksum word with the protocol.
            let old = get16(frame, ttl_at);
            frame[ttl_at] -= 1;
            ip_delta += delta16(old, get16(frame, ttl_at));
        }
    }
    for (addr, at) in [
        (params.new_src.map(|a| a.0), l3 + if v6 { 8 } else { 12 }),
        (params.new_dst.map(|a| a.0), l3 + if v6 { 24 } else { 16 }),
    ] {
        match addr {
            Some(IpAddr::V4(a)) => pseudo_delta += set_addr(frame, at, a.octets()),
            Some(IpAddr::V6(a)) => pseudo_delta += set_addr(frame, at, a.octets()),
            None => {}
        }
    }
    if !v6 {
        ip_delta += pseudo_delta;
        let old = get16(frame, l3 + 10);
        put16(frame, l3 + 10, apply(old, ip_delta));
    }
    match parsed.l4 {
        L4::Tcp { .. } | L4::Udp { .. } => {
            let mut d = pseudo_delta;
            if let Some((_, port)) = params.new_src {
                d += set16(frame, l4, port);
            }
            if let Some((_, port)) = params.new_dst {
                d += set16(frame, l4 + 2, port);
            }
            if matches!(parsed.l4, L4::Tcp { .. }) {
                let old = get16(frame, l4 + 16);
                put16(frame, l4 + 16, apply(old, d));
            } else {
                let old = get16(frame, l4 + 6);
                // 0 means "no checksum" (IPv4) and stays so; a computed 0 is sent as
                // 0xffff (RFC 768).
                if old != 0 {
                    let new = apply(old, d);
                    put16(frame, l4 + 6, if new == 0 { 0xffff } else { new });
                }
            }
        }
        L4::IcmpEcho { .. } => {
            // ICMPv4 has no pseudo-header; ICMPv6 does.
            let mut d = if v6 { pseudo_delta } else { 0 };
            if let Some((_, id)) = params.new_src.or(params.new_dst) {
                d += set16(frame, l4 + 4, id);
            }
            let old = get16(frame, l4 + 2);
            put16(frame, l4 + 2, apply(old, d));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use etherparse::PacketBuilder;
    use proptest::prelude::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Proto {
        Tcp,
        Udp,
        EchoRequest,
        EchoReply,
    }

    /// Everything that goes into a test frame.
    #[derive(Clone, Debug)]
    struct Spec {
        smac: [u8; 6],
        dmac: [u8; 6],
        vlan: Option<u16>,
        src: IpAddr,
        dst: IpAddr,
        ttl: u8,
        proto: Proto,
        /// Source port or echo id.
        sport: u16,
        dport: u16,
        seq: u32,
        payload: Vec<u8>,
    }

    macro_rules! l4_and_write {
        ($ip:expr, $s:expr, $out:expr) => {
            match $s.proto {
                Proto::Tcp => $ip
                    .tcp($s.sport, $s.dport, $s.seq, 4096)
                    .write($out, &$s.payload)
                    .expect("tcp"),
                Proto::Udp => $ip
                    .udp($s.sport, $s.dport)
                    .write($out, &$s.payload)
                    .expect("udp"),
                Proto::EchoRequest if $s.src.is_ipv6() => $ip
                    .icmpv6_echo_request($s.sport, 7)
                    .write($out, &$s.payload)
                    .expect("icmpv6"),
                Proto::EchoReply if $s.src.is_ipv6() => $ip
                    .icmpv6_echo_reply($s.sport, 7)
                    .write($out, &$s.payload)
                    .expect("icmpv6"),
                Proto::EchoRequest => $ip
                    .icmpv4_echo_request($s.sport, 7)
                    .write($out, &$s.payload)
                    .expect("icmp"),
                Proto::EchoReply => $ip
                    .icmpv4_echo_reply($s.sport, 7)
                    .write($out, &$s.payload)
                    .expect("icmp"),
            }
        };
    }

    macro_rules! ip_and_rest {
        ($eth:expr, $s:expr, $out:expr) => {
            match ($s.src, $s.dst) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    l4_and_write!($eth.ipv4(a.octets(), b.octets(), $s.ttl), $s, $out)
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => {
                    l4_and_write!($eth.ipv6(a.octets(), b.octets(), $s.ttl), $s, $out)
                }
                _ => panic!("mixed families"),
            }
        };
    }

    /// Builds the frame with etherparse, which computes every checksum from scratch.
    fn build(s: &Spec) -> Vec<u8> {
        let mut out = Vec::new();
        let eth = PacketBuilder::ethernet2(s.smac, s.dmac);
        match s.vlan {
            Some(vid) => {
                let tagged = eth.single_vlan(vid.try_into().expect("vid"));
                ip_and_rest!(tagged, s, &mut out)
            }
            None => ip_and_rest!(eth, s, &mut out),
        }
        out
    }

    /// The spec the device should turn `s` into under `p`.
    fn expected(s: &Spec, p: &RewriteParams) -> Spec {
        let mut e = s.clone();
        e.smac = p.src_mac.unwrap_or(s.smac);
        e.dmac = p.dst_mac.unwrap_or(s.dmac);
        if p.dec_ttl {
            e.ttl -= 1;
        }
        if let Some((a, _)) = p.new_src {
            e.src = a;
        }
        if let Some((a, _)) = p.new_dst {
            e.dst = a;
        }
        match s.proto {
            Proto::Tcp | Proto::Udp => {
                if let Some((_, port)) = p.new_src {
                    e.sport = port;
                }
                if let Some((_, port)) = p.new_dst {
                    e.dport = port;
                }
            }
            Proto::EchoRequest | Proto::EchoReply => {
                if let Some((_, id)) = p.new_src.or(p.new_dst) {
                    e.sport = id;
                }
            }
        }
        e
    }

    fn v4(a: [u8; 4]) -> IpAddr {
        IpAddr::from(a)
    }

    fn base_tcp4() -> Spec {
        Spec {
            smac: [2, 0, 0, 0, 0, 1],
            dmac: [2, 0, 0, 0, 0, 2],
            vlan: None,
            src: v4([10, 0, 0, 1]),
            dst: v4([192, 0, 2, 80]),
            ttl: 64,
            proto: Proto::Tcp,
            sport: 40000,
            dport: 80,
            seq: 12345,
            payload: b"GET / HTTP/1.1\r\n".to_vec(),
        }
    }

    fn snat() -> RewriteParams {
        RewriteParams {
            src_mac: Some([2, 0, 0, 0, 0, 0xaa]),
            dst_mac: Some([2, 0, 0, 0, 0, 0xbb]),
            dec_ttl: true,
            new_src: Some((v4([203, 0, 113, 7]), 61000)),
            new_dst: None,
        }
    }

    fn check(s: &Spec, p: &RewriteParams) {
        let mut frame = build(s);
        let parsed = classify(&frame).expect("classify");
        rewrite(&mut frame, &parsed, p).expect("rewrite");
        assert_eq!(frame, build(&expected(s, p)), "{s:?} {p:?}");
    }

    #[test]
    fn tcp4_snat_matches_fixed_bytes() {
        let s = base_tcp4();
        let mut frame = build(&s);
        let parsed = classify(&frame).expect("classify");
        rewrite(&mut frame, &parsed, &snat()).expect("rewrite");
        // Golden bytes of the headers (checksums from etherparse's full computation).
        let want: [u8; 54] = [
            2, 0, 0, 0, 0, 0xbb, 2, 0, 0, 0, 0, 0xaa, 0x08, 0x00, // Ethernet
            0x45, 0, 0, 56, 0, 0, 0x40, 0, 63, 6, 0, 0, 203, 0, 113, 7, 192, 0, 2, 80, // IPv4
            0xee, 0x48, 0, 80, 0, 0, 0x30, 0x39, 0, 0, 0, 0, 0x50, 0, 0x10, 0, 0, 0, 0,
            0, // TCP
        ];
        let mut want = want.to_vec();
        let e = build(&expected(&s, &snat()));
        // Fill in the two checksums from the independent build, then compare everything.
        want[24..26].copy_from_slice(&e[24..26]);
        want[50..52].copy_from_slice(&e[50..52]);
        assert_eq!(&frame[..54], &want[..]);
        assert_eq!(&frame[54..], &s.payload[..]);
        assert_eq!(frame, e);
        assert_ne!(&frame[24..26], &[0, 0]);
    }

    #[test]
    fn each_protocol_and_family_matches_etherparse() {
        let v6a: IpAddr = "2001:db8::1".parse().expect("addr");
        let v6b: IpAddr = "2001:db8:ffff::42".parse().expect("addr");
        let v6n: IpAddr = "2001:db8:1::7".parse().expect("addr");
        for proto in [Proto::Tcp, Proto::Udp, Proto::EchoRequest, Proto::EchoReply] {
            for vlan in [None, Some(100)] {
                let mut s = base_tcp4();
                s.proto = proto;
                s.vlan = vlan;
                check(&s, &snat());
                let dnat = RewriteParams {
                    new_dst: Some((v4([10, 1, 1, 1]), 8080)),
                    ..RewriteParams::default()
                };
                check(&s, &dnat);
                s.src = v6a;
                s.dst = v6b;
                check(
                    &s,
                    &RewriteParams {
                        dec_ttl: true,
                        new_src: Some((v6n, 1)),
                        new_dst: Some((v6a, 2)),
                        ..RewriteParams::default()
                    },
                );
            }
        }
    }

    #[test]
    fn ttl_expiry_and_family_mismatch_leave_frame_alone() {
        let mut s = base_tcp4();
        s.ttl = 1;
        let mut frame = build(&s);
        let orig = frame.clone();
        let parsed = classify(&frame).expect("classify");
        assert_eq!(
            rewrite(&mut frame, &parsed, &snat()),
            Err(RewriteError::TtlExpired)
        );
        let v6 = RewriteParams {
            new_dst: Some(("::1".parse().expect("addr"), 1)),
            ..snat()
        };
        s.ttl = 5;
        let mut frame = build(&s);
        let parsed = classify(&frame).expect("classify");
        let before = frame.clone();
        assert_eq!(
            rewrite(&mut frame, &parsed, &v6),
            Err(RewriteError::FamilyMismatch)
        );
        assert_eq!(frame, before);
        let mut short = orig[..40].to_vec();
        assert_eq!(
            rewrite(&mut short, &parsed, &snat()),
            Err(RewriteError::FrameMismatch)
        );
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut s = base_tcp4();
        s.proto = Proto::Udp;
        let mut frame = build(&s);
        frame[40..42].copy_from_slice(&[0, 0]);
        let parsed = classify(&frame).expect("classify");
        rewrite(&mut frame, &parsed, &snat()).expect("rewrite");
        assert_eq!(&frame[40..42], &[0, 0]);
        let mut e = build(&expected(&s, &snat()));
        e[40..42].copy_from_slice(&[0, 0]);
        assert_eq!(frame, e);
    }

    #[test]
    fn udp_computed_zero_is_sent_as_ffff() {
        // Checksum 0x1234 with source port 0 -> 0x1234: ~(0xedcb + 0xffff + 0x1234) = 0.
        let mut s = base_tcp4();
        s.proto = Proto::Udp;
        s.sport = 0;
        let mut frame = build(&s);
        frame[40..42].copy_from_slice(&0x1234u16.to_be_bytes());
        let parsed = classify(&frame).expect("classify");
        let p = RewriteParams {
            new_src: Some((s.src, 0x1234)),
            ..RewriteParams::default()
        };
        rewrite(&mut frame, &parsed, &p).expect("rewrite");
        assert_eq!(&frame[40..42], &[0xff, 0xff]);
    }

    #[test]
    fn classify_reports_fields() {
        let mut s = base_tcp4();
        s.vlan = Some(0x123);
        let frame = build(&s);
        let p = classify(&frame).expect("classify");
        assert_eq!(p.vlan_tci(), Some(0x123));
        assert_eq!((p.l3_offset(), p.l4_offset()), (18, 38));
        assert_eq!(p.l4_len(), 20 + s.payload.len());
        assert_eq!(p.ip_end(), frame.len());
        assert_eq!((p.src(), p.dst(), p.ttl()), (s.src, s.dst, 64));
        assert_eq!(
            p.l4(),
            L4::Tcp {
                src_port: 40000,
                dst_port: 80,
                flags: 0
            }
        );
        assert!(!p.is_ipv6());
        s.proto = Proto::EchoReply;
        s.src = "fe80::1".parse().expect("addr");
        s.dst = "fe80::2".parse().expect("addr");
        let p = classify(&build(&s)).expect("classify");
        assert_eq!(
            p.l4(),
            L4::IcmpEcho {
                id: 40000,
                reply: true
            }
        );
        assert!(p.is_ipv6());
    }

    #[test]
    fn classify_punts() {
        use PuntReason::*;
        let tcp4 = build(&base_tcp4());
        let mut v6spec = base_tcp4();
        v6spec.src = "2001:db8::1".parse().expect("addr");
        v6spec.dst = "2001:db8::2".parse().expect("addr");
        let tcp6 = build(&v6spec);
        // Patches bytes; a patch of an IPv4 header gets a correct header checksum, so
        // that the case tests the field, not the checksum.
        let with = |base: &[u8], at: usize, bytes: &[u8]| {
            let mut f = base.to_vec();
            f[at..at + bytes.len()].copy_from_slice(bytes);
            let ihl = usize::from(f[14] & 0x0f) * 4;
            if f[12..14] == [0x08, 0x00] && (14..34).contains(&at) && ihl >= 20 {
                f[24] = 0;
                f[25] = 0;
                let mut sum: u32 = f[14..14 + ihl]
                    .chunks_exact(2)
                    .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
                    .sum();
                while sum > 0xffff {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                let c = !u16::try_from(sum).expect("folded");
                f[24..26].copy_from_slice(&c.to_be_bytes());
            }
            classify(&f)
        };
        let mut bad_csum = tcp4.clone();
        bad_csum[24] ^= 1;
        assert_eq!(classify(&bad_csum), Err(Malformed)); // header checksum
        let mut frag_bad_csum = tcp4.clone();
        frag_bad_csum[20] = 0x20;
        assert_eq!(classify(&frag_bad_csum), Err(Malformed)); // checked before MF
        assert_eq!(with(&tcp6, 20, &[50]), Err(UnsupportedL4)); // ESP
        assert_eq!(with(&tcp4, 12, &[0x08, 0x06]), Err(NonIp)); // ARP
        assert_eq!(with(&tcp4, 12, &[0x00, 0x40]), Err(NonIp)); // 802.3 length
        assert_eq!(with(&tcp4, 20, &[0x20, 0x00]), Err(Fragment)); // MF
        assert_eq!(with(&tcp4, 20, &[0x00, 0x10]), Err(Fragment)); // offset
        assert!(with(&tcp4, 20, &[0x40, 0x00]).is_ok()); // DF only
        assert_eq!(with(&tcp4, 14, &[0x46]), Err(IpOptions));
        assert_eq!(with(&tcp4, 14, &[0x44]), Err(Malformed));
        assert_eq!(with(&tcp4, 14, &[0x65]), Err(Malformed));
        assert_eq!(with(&tcp4, 16, &[0xff, 0xff]), Err(Malformed)); // total > frame
        assert_eq!(with(&tcp4, 23, &[47]), Err(UnsupportedL4)); // GRE
        assert_eq!(with(&tcp4, 23, &[58]), Err(UnsupportedL4)); // ICMPv6 in IPv4
        assert_eq!(with(&tcp4, 46, &[0x40]), Err(Malformed)); // TCP data offset 4
        assert_eq!(with(&tcp4, 46, &[0xf0]), Err(Malformed)); // beyond segment
        assert_eq!(with(&tcp6, 20, &[44]), Err(Fragment));
        assert_eq!(with(&tcp6, 20, &[0]), Err(Ipv6ExtHeaders));
        assert_eq!(with(&tcp6, 20, &[60]), Err(Ipv6ExtHeaders));
        assert_eq!(with(&tcp6, 20, &[1]), Err(UnsupportedL4)); // ICMPv4 in IPv6
        assert_eq!(with(&tcp6, 20, &[59]), Err(UnsupportedL4)); // no next header
        let mut icmp = base_tcp4();
        icmp.proto = Proto::EchoRequest;
        let icmp = build(&icmp);
        assert_eq!(with(&icmp, 34, &[3]), Err(UnsupportedL4)); // destination unreachable
        assert_eq!(with(&icmp, 35, &[1]), Err(UnsupportedL4)); // non-zero code
        let mut udp = base_tcp4();
        udp.proto = Proto::Udp;
        let udp = build(&udp);
        assert_eq!(with(&udp, 38, &[0, 7]), Err(Malformed));
        assert_eq!(with(&udp, 38, &[0xff, 0]), Err(Malformed));
        // Double tag.
        let mut qinq = tcp4[..12].to_vec();
        qinq.extend_from_slice(&[0x81, 0, 0, 1, 0x81, 0, 0, 2]);
        qinq.extend_from_slice(&tcp4[12..]);
        assert_eq!(classify(&qinq), Err(NonIp));
    }

    #[test]
    fn every_truncation_is_malformed_and_padding_is_fine() {
        for f in [build(&base_tcp4()), {
            let mut s = base_tcp4();
            s.vlan = Some(5);
            s.proto = Proto::Udp;
            s.src = "::1".parse().expect("addr");
            s.dst = "::2".parse().expect("addr");
            build(&s)
        }] {
            for n in 0..f.len() {
                assert_eq!(classify(&f[..n]), Err(PuntReason::Malformed), "prefix {n}");
            }
            let mut padded = f.clone();
            padded.resize(f.len() + 30, 0);
            let p = classify(&padded).expect("padded");
            assert_eq!(p.ip_end(), f.len());
        }
    }

    fn arb_spec() -> impl Strategy<Value = Spec> {
        (
            any::<bool>(),
            prop_oneof![
                Just(Proto::Tcp),
                Just(Proto::Udp),
                Just(Proto::EchoRequest),
                Just(Proto::EchoReply)
            ],
            proptest::option::of(0u16..4096),
            any::<[u8; 16]>(),
            any::<[u8; 16]>(),
            any::<(u8, u16, u16, u32)>(),
            proptest::collection::vec(any::<u8>(), 0..80),
            any::<([u8; 6], [u8; 6])>(),
        )
            .prop_map(
                |(v6, proto, vlan, a, b, (ttl, sport, dport, seq), payload, (smac, dmac))| {
                    let (src, dst) = if v6 {
                        (IpAddr::from(a), IpAddr::from(b))
                    } else {
                        (
                            IpAddr::from([a[0], a[1], a[2], a[3]]),
                            IpAddr::from([b[0], b[1], b[2], b[3]]),
                        )
                    };
                    Spec {
                        smac,
                        dmac,
                        vlan,
                        src,
                        dst,
                        ttl,
                        proto,
                        sport,
                        dport,
                        seq,
                        payload,
                    }
                },
            )
    }

    fn arb_params(v6: bool) -> impl Strategy<Value = RewriteParams> {
        let addr = move |raw: [u8; 16]| {
            if v6 {
                IpAddr::from(raw)
            } else {
                IpAddr::from([raw[0], raw[1], raw[2], raw[3]])
            }
        };
        (
            proptest::option::of(any::<[u8; 6]>()),
            proptest::option::of(any::<[u8; 6]>()),
            any::<bool>(),
            proptest::option::of(any::<([u8; 16], u16)>()),
            proptest::option::of(any::<([u8; 16], u16)>()),
        )
            .prop_map(move |(src_mac, dst_mac, dec_ttl, s, d)| RewriteParams {
                src_mac,
                dst_mac,
                dec_ttl,
                new_src: s.map(|(a, p)| (addr(a), p)),
                new_dst: d.map(|(a, p)| (addr(a), p)),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Rewriting in place gives byte for byte the frame etherparse builds from the
        /// requested fields, checksums computed from scratch included.
        #[test]
        fn rewrite_equals_rebuild(
            (s, p) in arb_spec().prop_flat_map(|s| {
                let v6 = s.src.is_ipv6();
                (Just(s), arb_params(v6))
            })
        ) {
            let mut frame = build(&s);
            let parsed = classify(&frame).expect("etherparse frames classify");
            prop_assert_eq!(parsed.src(), s.src);
            prop_assert_eq!(parsed.dst(), s.dst);
            prop_assert_eq!(parsed.vlan_tci(), s.vlan);
            let before = frame.clone();
            match rewrite(&mut frame, &parsed, &p) {
                Err(RewriteError::TtlExpired) => {
                    prop_assert!(p.dec_ttl && s.ttl <= 1);
                    prop_assert_eq!(frame, before);
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
                Ok(()) => {
                    prop_assert!(!p.dec_ttl || s.ttl > 1);
                    prop_assert_eq!(&frame, &build(&expected(&s, &p)));
                    let again = classify(&frame).expect("still classifies");
                    if let Some((a, _)) = p.new_src { prop_assert_eq!(again.src(), a); }
                    if let Some((a, _)) = p.new_dst { prop_assert_eq!(again.dst(), a); }
                }
            }
        }

        /// Corrupted valid frames never make the classifier or the rewrite panic, and a
        /// rewrite that succeeds keeps the frame classifiable.
        #[test]
        fn corrupted_frames_never_panic(
            (s, p) in arb_spec().prop_flat_map(|s| {
                let v6 = s.src.is_ipv6();
                (Just(s), arb_params(v6))
            }),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut frame = build(&s);
            for (at, byte) in flips {
                let i = at.index(frame.len());
                frame[i] = byte;
            }
            frame.truncate(cut.index(frame.len() + 1).max(frame.len() / 2));
            if let Ok(parsed) = classify(&frame) {
                if rewrite(&mut frame, &parsed, &p).is_ok() {
                    prop_assert!(classify(&frame).is_ok());
                }
            }
        }

        /// No input makes the classifier panic.
        #[test]
        fn classify_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&bytes);
        }
    }
}
