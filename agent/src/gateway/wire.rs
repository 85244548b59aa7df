//! Byte-level helpers for the gateway: Ethernet/ARP/IPv4 offsets, the Internet
//! checksum (full and RFC 1624 incremental), and builders for the frames the gateway
//! originates (ARP, ICMP errors, echo replies).
//!
//! Every function checks lengths and returns `None`/`false` rather than panicking on a
//! short or malformed frame.

/// Ethernet header length (no VLAN tag).
pub const ETH_LEN: usize = 14;
/// EtherType IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// EtherType IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86DD;
/// The broadcast MAC.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// ARP packet length for IPv4 over Ethernet.
pub const ARP_LEN: usize = 28;
/// Minimum Ethernet frame length without FCS.
const MIN_FRAME: usize = 60;
/// The most of the offending datagram an ICMP error quotes (RFC 1812 4.3.2.3: as
/// much as fits in 576 bytes).
const ICMP_ERR_MAX: usize = 576;
/// TTL of the packets the gateway originates.
pub const OWN_TTL: u8 = 64;

/// The EtherType of `frame`, if it has an Ethernet header.
#[must_use]
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]))
}

/// `frame[at..at + 6]` as a MAC.
#[must_use]
pub fn mac_at(frame: &[u8], at: usize) -> Option<[u8; 6]> {
    frame.get(at..at + 6)?.try_into().ok()
}

/// `frame[at..at + 4]` as an IPv4 address.
#[must_use]
pub fn ip_at(frame: &[u8], at: usize) -> Option<[u8; 4]> {
    frame.get(at..at + 4)?.try_into().ok()
}

/// Adds `data` as big-endian 16-bit words to `sum` (an odd last byte is padded).
#[must_use]
pub fn csum_add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([c[0], c[1]])));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [b] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*b) << 8);
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum
}

/// The one's-complement of the folded sum: the checksum field's value.
#[must_use]
pub fn csum_finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // `sum` is at most 0xffff here.
    !u16::try_from(sum).unwrap_or(0xffff)
}

/// RFC 1624 eqn. 3: the checksum after one 16-bit word changed from `old` to `new`.
#[must_use]
pub fn csum_update(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    csum_finish(sum)
}

/// Offsets of a validated IPv4 header in an Ethernet frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Hdr {
    /// Header length in bytes.
    pub ihl: usize,
    /// Total length (from the header, at most the frame's length after L2).
    pub total: usize,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// TTL.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Fragment offset (in 8-byte units) is non-zero.
    pub later_fragment: bool,
}

/// Why an IPv4 header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv4Error {
    /// Shorter than its header or its total length.
    Truncated,
    /// Version not 4 or IHL below 5.
    BadHeader,
    /// Header checksum wrong.
    BadChecksum,
}

/// Parses and checks the IPv4 header after the Ethernet header.
///
/// # Errors
/// See [`Ipv4Error`].
pub fn ipv4(frame: &[u8]) -> Result<Ipv4Hdr, Ipv4Error> {
    let ip = frame.get(ETH_LEN..).ok_or(Ipv4Error::Truncated)?;
    let first = *ip.first().ok_or(Ipv4Error::Truncated)?;
    if first >> 4 != 4 || first & 0x0f < 5 {
        return Err(Ipv4Error::BadHeader);
    }
    let ihl = usize::from(first & 0x0f) * 4;
    let hdr = ip.get(..ihl).ok_or(Ipv4Error::Truncated)?;
    let total = usize::from(u16::from_be_bytes([hdr[2], hdr[3]]));
    if total < ihl || total > ip.len() {
        return Err(Ipv4Error::Truncated);
    }
    if csum_finish(csum_add(0, hdr)) != 0 {
        return Err(Ipv4Error::BadChecksum);
    }
    let frag = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    Ok(Ipv4Hdr {
        ihl,
        total,
        src: [hdr[12], hdr[13], hdr[14], hdr[15]],
        dst: [hdr[16], hdr[17], hdr[18], hdr[19]],
        ttl: hdr[8],
        proto: hdr[9],
        later_fragment: frag != 0,
    })
}

/// Decrements the TTL of the IPv4 packet in `frame` and updates the header checksum
/// incrementally. `false` (frame unchanged) when the TTL is 0 or the frame is short.
pub fn dec_ttl(frame: &mut [u8]) -> bool {
    let Some(h) = frame.get_mut(ETH_LEN..ETH_LEN + 20) else {
        return false;
    };
    if h[8] == 0 {
        return false;
    }
    let old = u16::from_be_bytes([h[8], h[9]]);
    h[8] -= 1;
    let new = u16::from_be_bytes([h[8], h[9]]);
    let check = csum_update(u16::from_be_bytes([h[10], h[11]]), old, new);
    h[10..12].copy_from_slice(&check.to_be_bytes());
    true
}

/// Recomputes the TCP or UDP checksum of an unfragmented IPv4 packet from scratch.
/// Returns whether it did (other protocols, fragments and short frames: untouched).
///
/// Virtual interfaces (veth) hand packet sockets frames whose checksum the sender
/// left to offload (`CHECKSUM_PARTIAL`: only the pseudo-header sum is filled in); a
/// socket without per-frame status cannot tell those from complete ones.
pub fn fill_l4_checksum(frame: &mut [u8]) -> bool {
    let Ok(h) = ipv4(frame) else { return false };
    let mf = frame.get(ETH_LEN + 6).is_some_and(|b| b & 0x20 != 0);
    if h.later_fragment || mf {
        return false;
    }
    let l4_start = ETH_LEN + h.ihl;
    let l4_end = ETH_LEN + h.total;
    let field = match h.proto {
        6 => 16,
        17 => 6,
        _ => return false,
    };
    let Some(l4) = frame.get_mut(l4_start..l4_end) else {
        return false;
    };
    if l4.len() < field + 2 || (h.proto == 17 && l4.len() < 8) {
        return false;
    }
    let Ok(l4_len) = u16::try_from(l4.len()) else {
        return false;
    };
    l4[field..field + 2].fill(0);
    let mut sum = csum_add(0, &h.src);
    sum = csum_add(sum, &h.dst);
    sum = csum_add(sum, &[0, h.proto]);
    sum = csum_add(sum, &l4_len.to_be_bytes());
    sum = csum_add(sum, l4);
    let mut c = csum_finish(sum);
    if h.proto == 17 && c == 0 {
        c = 0xffff;
    }
    l4[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// Appends an Ethernet header to `out`.
fn push_eth(out: &mut Vec<u8>, dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    out.extend_from_slice(&ethertype.to_be_bytes());
}

/// Pads `out` to the minimum Ethernet frame length.
fn pad(out: &mut Vec<u8>) {
    if out.len() < MIN_FRAME {
        out.resize(MIN_FRAME, 0);
    }
}

/// An ARP packet (Ethernet/IPv4) in a frame: `op` 1 request, 2 reply.
#[must_use]
pub fn arp_frame(
    eth_dst: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(MIN_FRAME);
    push_eth(&mut out, eth_dst, sha, ETHERTYPE_ARP);
    out.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&sha);
    out.extend_from_slice(&spa);
    out.extend_from_slice(&tha);
    out.extend_from_slice(&tpa);
    pad(&mut out);
    out
}

/// A parsed ARP packet (Ethernet/IPv4 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    /// Operation: 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: [u8; 6],
    /// Sender protocol address.
    pub spa: [u8; 4],
    /// Target protocol address.
    pub tpa: [u8; 4],
}

/// Parses the ARP packet of `frame`; `None` if it is not Ethernet/IPv4 ARP.
#[must_use]
pub fn arp(frame: &[u8]) -> Option<Arp> {
    let a = frame.get(ETH_LEN..ETH_LEN + ARP_LEN)?;
    if a[0..6] != [0, 1, 0x08, 0x00, 6, 4] {
        return None;
    }
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sha: mac_at(a, 8)?,
        spa: ip_at(a, 14)?,
        tpa: ip_at(a, 24)?,
    })
}

/// Builds an IPv4 packet (header with checksum) carrying `payload`, in a frame.
fn ipv4_frame(
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    payload: &[u8],
) -> Option<Vec<u8>> {
    let total = u16::try_from(20 + payload.len()).ok()?;
    let mut out = Vec::with_capacity(ETH_LEN + usize::from(total));
    push_eth(&mut out, eth_dst, eth_src, ETHERTYPE_IPV4);
    let mut hdr = [0u8; 20];
    hdr[0] = 0x45;
    hdr[2..4].copy_from_slice(&total.to_be_bytes());
    hdr[8] = OWN_TTL;
    hdr[9] = proto;
    hdr[12..16].copy_from_slice(&src);
    hdr[16..20].copy_from_slice(&dst);
    let c = csum_finish(csum_add(0, &hdr));
    hdr[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&hdr);
    out.extend_from_slice(payload);
    pad(&mut out);
    Some(out)
}

/// The ICMP error `icmp_type`/`code` about the IPv4 packet in `offending` (an Ethernet
/// frame), from `src` (an address of the port it arrived on) back to its source, sent
/// to the MAC it came from. Quotes the IP header and as much of the rest as fits in
/// 576 bytes. `None` if the offending frame is not IPv4 or is too short.
#[must_use]
pub fn icmp_error(
    offending: &[u8],
    own_mac: [u8; 6],
    src: [u8; 4],
    icmp_type: u8,
    code: u8,
) -> Option<Vec<u8>> {
    let h = ipv4(offending).ok()?;
    let quoted_len = h.total.min(ICMP_ERR_MAX - 20 - 8);
    let quoted = offending.get(ETH_LEN..ETH_LEN + quoted_len)?;
    let mut icmp = Vec::with_capacity(8 + quoted.len());
    icmp.extend_from_slice(&[icmp_type, code, 0, 0, 0, 0, 0, 0]);
    icmp.extend_from_slice(quoted);
    let c = csum_finish(csum_add(0, &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(mac_at(offending, 6)?, own_mac, src, h.src, 1, &icmp)
}

/// Whether the ICMP packet in `frame` (IPv4 header at [`ETH_LEN`]) is an error message
/// (never answered with another error, RFC 1812 4.3.2.7).
#[must_use]
pub fn is_icmp_error(frame: &[u8], h: &Ipv4Hdr) -> bool {
    h.proto == 1
        && frame
            .get(ETH_LEN + h.ihl)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
}

/// The echo reply to the ICMP echo request in `frame` (addressed to one of ours):
/// addresses swapped, sent back to the MAC it came from. `None` if it is not a valid
/// echo request.
#[must_use]
pub fn echo_reply(frame: &[u8], own_mac: [u8; 6]) -> Option<Vec<u8>> {
    let h = ipv4(frame).ok()?;
    if h.proto != 1 || h.later_fragment {
        return None;
    }
    let icmp = frame.get(ETH_LEN + h.ihl..ETH_LEN + h.total)?;
    if icmp.len() < 8 || icmp[0] != 8 || icmp[1] != 0 || csum_finish(csum_add(0, icmp)) != 0 {
        return None;
    }
    let mut reply = icmp.to_vec();
    reply[0] = 0;
    reply[2..4].fill(0);
    let c = csum_finish(csum_add(0, &reply));
    reply[2..4].copy_from_slice(&c.to_be_bytes());
    ipv4_frame(mac_at(frame, 6)?, own_mac, h.dst, h.src, 1, &reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet frame with a 20-byte IPv4 header (valid checksum) and `payload`.
    pub(crate) fn ip_frame(
        src: [u8; 4],
        dst: [u8; 4],
        ttl: u8,
        proto: u8,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = ipv4_frame(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            src,
            dst,
            proto,
            payload,
        )
        .expect("frame");
        f[ETH_LEN + 8] = ttl;
        f[ETH_LEN + 10..ETH_LEN + 12].fill(0);
        let c = csum_finish(csum_add(0, &f[ETH_LEN..ETH_LEN + 20]));
        f[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
        f
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2 (before folding: 2ddf0).
        let sum = csum_add(0, &[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
        assert_eq!(csum_finish(sum), !0xddf2);
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut f = ip_frame([10, 0, 0, 1], [10, 0, 1, 1], 64, 17, &[0; 8]);
        assert!(dec_ttl(&mut f));
        let h = ipv4(&f).expect("still valid");
        assert_eq!(h.ttl, 63);
        let mut zero = ip_frame([10, 0, 0, 1], [10, 0, 1, 1], 0, 17, &[0; 8]);
        assert!(!dec_ttl(&mut zero));
    }

    #[test]
    fn truncated_and_bad_headers_are_refused() {
        let f = ip_frame([10, 0, 0, 1], [10, 0, 1, 1], 64, 17, &[0; 8]);
        assert_eq!(ipv4(&f[..20]), Err(Ipv4Error::Truncated));
        assert_eq!(ipv4(&f[..ETH_LEN + 27]), Err(Ipv4Error::Truncated));
        let mut bad = f.clone();
        bad[ETH_LEN + 11] ^= 1;
        assert_eq!(ipv4(&bad), Err(Ipv4Error::BadChecksum));
        let mut v6 = f;
        v6[ETH_LEN] = 0x65;
        assert_eq!(ipv4(&v6), Err(Ipv4Error::BadHeader));
        assert_eq!(arp(&[0u8; 20]), None);
    }

    #[test]
    fn udp_checksum_filled_from_partial() {
        // UDP 1234 -> 53, 4 bytes payload, checksum field holding garbage (partial).
        let udp = [0x04, 0xd2, 0x00, 0x35, 0x00, 0x0c, 0x12, 0x34, 1, 2, 3, 4];
        let mut f = ip_frame([10, 0, 0, 1], [10, 0, 1, 1], 64, 17, &udp);
        assert!(fill_l4_checksum(&mut f));
        let l4 = &f[ETH_LEN + 20..ETH_LEN + 32];
        let mut sum = csum_add(0, &[10, 0, 0, 1, 10, 0, 1, 1, 0, 17, 0, 12]);
        sum = csum_add(sum, l4);
        assert_eq!(csum_finish(sum), 0, "verifies");
    }

    #[test]
    fn icmp_error_quotes_offender_and_echo_reply_swaps() {
        let off = ip_frame([10, 0, 0, 1], [10, 9, 9, 9], 1, 17, &[0; 16]);
        let e = icmp_error(&off, [2, 0, 0, 0, 0, 9], [10, 0, 0, 254], 11, 0).expect("err");
        let h = ipv4(&e).expect("valid");
        assert_eq!(
            (h.src, h.dst, h.proto, h.ttl),
            ([10, 0, 0, 254], [10, 0, 0, 1], 1, 64)
        );
        assert_eq!(&e[0..6], &[2, 0, 0, 0, 0, 2], "back to the sender's MAC");
        let icmp = &e[ETH_LEN + 20..ETH_LEN + h.total];
        assert_eq!((icmp[0], icmp[1]), (11, 0));
        assert_eq!(csum_finish(csum_add(0, icmp)), 0);
        assert_eq!(&icmp[8..], &off[ETH_LEN..ETH_LEN + 36]);
        assert!(is_icmp_error(&e, &h));

        let mut echo = [8u8, 0, 0, 0, 0, 7, 0, 1, b'h', b'i'];
        let c = csum_finish(csum_add(0, &echo));
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        let req = ip_frame([10, 0, 0, 1], [10, 0, 0, 254], 64, 1, &echo);
        let r = echo_reply(&req, [2, 0, 0, 0, 0, 9]).expect("reply");
        let h = ipv4(&r).expect("valid");
        assert_eq!((h.src, h.dst), ([10, 0, 0, 254], [10, 0, 0, 1]));
        let icmp = &r[ETH_LEN + 20..ETH_LEN + h.total];
        assert_eq!(icmp[0], 0);
        assert_eq!(&icmp[4..], &echo[4..]);
        assert_eq!(csum_finish(csum_add(0, icmp)), 0);
    }
}
