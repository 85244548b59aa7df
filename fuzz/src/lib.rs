//! Helpers shared by the fuzz targets: an RFC 1071 checksum that shares no code with the
//! crates under test, a checksum fixer (so that mutated frames still get past checksum
//! verification and reach the state machines), a checksum auditor (which checksums of a
//! frame are right), and a tiny Ethernet/IPv4 frame builder.
//!
//! Everything here works on untrusted bytes and never panics: every access is checked.

/// Offsets of one IPv4 packet inside a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct V4At {
    /// Offset of the IPv4 header.
    pub l3: usize,
    /// IPv4 header length in bytes.
    pub ihl: usize,
    /// End of the IP packet (min of total length and the buffer).
    pub end: usize,
    /// The whole IP packet (per its total length) is in the buffer.
    pub whole: bool,
    /// A fragment (MF set or non-zero offset): the L4 checksum covers bytes not here.
    pub fragment: bool,
    /// IP protocol.
    pub proto: u8,
}

/// RFC 1071 ones'-complement sum of `data` added to `acc` (not folded).
#[must_use]
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut it = data.chunks_exact(2);
    for w in &mut it {
        acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [b] = it.remainder() {
        acc += u64::from(u16::from_be_bytes([*b, 0]));
    }
    acc
}

/// Folds and complements: 0 when the data (with its checksum field) verifies.
#[must_use]
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xFFFF {
        acc = (acc & 0xFFFF) + (acc >> 16);
    }
    !u16::try_from(acc).unwrap_or(0xFFFF)
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([
        *b.get(at)?,
        *b.get(at.checked_add(1)?)?,
    ]))
}

/// The offset of the L3 header and the ethertype, after up to two VLAN tags.
#[must_use]
pub fn l3_of(frame: &[u8]) -> Option<(usize, u16)> {
    let mut at = 12;
    let mut et = be16(frame, at)?;
    let mut tags = 0;
    while (et == 0x8100 || et == 0x88A8) && tags < 2 {
        at += 4;
        et = be16(frame, at)?;
        tags += 1;
    }
    Some((at + 2, et))
}

/// Locates an IPv4 packet starting at `l3` in `buf`.
#[must_use]
pub fn v4_at(buf: &[u8], l3: usize) -> Option<V4At> {
    let vihl = *buf.get(l3)?;
    if vihl >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(vihl & 0x0F) * 4;
    if ihl < 20 || buf.len() < l3 + ihl {
        return None;
    }
    let total = usize::from(be16(buf, l3 + 2)?);
    if total < ihl {
        return None;
    }
    let frag = be16(buf, l3 + 6)?;
    Some(V4At {
        l3,
        ihl,
        end: buf.len().min(l3 + total),
        whole: l3 + total <= buf.len(),
        fragment: frag & 0x3FFF != 0,
        proto: *buf.get(l3 + 9)?,
    })
}

fn pseudo_v4(buf: &[u8], ip: &V4At, len: usize) -> u64 {
    let addrs = buf.get(ip.l3 + 12..ip.l3 + 20).unwrap_or_default();
    sum(addrs, u64::from(ip.proto) + u64::try_from(len).unwrap_or(0))
}

/// Offset of the checksum field inside an L4 header of `proto`.
fn l4_csum_at(proto: u8) -> Option<usize> {
    match proto {
        6 => Some(16),
        17 => Some(6),
        1 | 58 => Some(2),
        _ => None,
    }
}

/// Which checksums of a frame are right; `None` where a checksum does not apply or
/// cannot be judged (fragment, truncated quote).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Audit {
    /// Outer IPv4 header checksum.
    pub ip: Option<bool>,
    /// Outer TCP/UDP/ICMP checksum (a zero UDP checksum counts as right).
    pub l4: Option<bool>,
    /// The outer UDP checksum field is zero ("no checksum").
    pub udp_zero: bool,
    /// Quoted (ICMP error) IPv4 header checksum.
    pub inner_ip: Option<bool>,
    /// Quoted TCP/UDP/ICMP checksum, when the whole quoted packet is there.
    pub inner_l4: Option<bool>,
}

fn l4_ok(buf: &[u8], ip: &V4At) -> Option<(bool, bool)> {
    if ip.fragment || !ip.whole {
        return None;
    }
    let l4 = buf.get(ip.l3 + ip.ihl..ip.end)?;
    let at = l4_csum_at(ip.proto)?;
    if l4.len() < at + 2 {
        return None;
    }
    let ok = match ip.proto {
        1 => fold(sum(l4, 0)) == 0,
        6 => fold(sum(l4, pseudo_v4(buf, ip, l4.len()))) == 0,
        17 => {
            if l4[6] == 0 && l4[7] == 0 {
                return Some((true, true));
            }
            // The checksum covers the datagram's own length (RFC 768), not bytes the IP
            // packet carries after it: Linux trims to it before checking. A length
            // outside 8..=payload is not a datagram (the parser rejects it).
            let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
            let datagram = l4.get(..ulen).filter(|_| ulen >= 8)?;
            fold(sum(datagram, pseudo_v4(buf, ip, ulen))) == 0
        }
        _ => return None,
    };
    Some((ok, false))
}

/// Audits the IPv4 checksums of an Ethernet frame (IPv6 frames audit to all-`None`).
#[must_use]
pub fn audit(frame: &[u8]) -> Audit {
    let mut a = Audit::default();
    let Some((l3, 0x0800)) = l3_of(frame) else {
        return a;
    };
    let Some(ip) = v4_at(frame, l3) else {
        return a;
    };
    a.ip = frame.get(l3..l3 + ip.ihl).map(|h| fold(sum(h, 0)) == 0);
    if let Some((ok, zero)) = l4_ok(frame, &ip) {
        a.l4 = Some(ok);
        a.udp_zero = zero;
    }
    // ICMP error: the quoted packet starts 8 bytes into the ICMP header.
    let l4 = l3 + ip.ihl;
    let is_err = ip.proto == 1
        && !ip.fragment
        && frame
            .get(l4)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12));
    if is_err {
        let quote = frame.get(..ip.end).unwrap_or_default();
        if let Some(inner) = v4_at(quote, l4 + 8) {
            a.inner_ip = quote
                .get(inner.l3..inner.l3 + inner.ihl)
                .map(|h| fold(sum(h, 0)) == 0);
            a.inner_l4 = l4_ok(quote, &inner).map(|(ok, _)| ok);
        }
    }
    a
}

fn put16(buf: &mut [u8], at: usize, v: u16) {
    if let Some(s) = buf.get_mut(at..at + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn fix_l4(buf: &mut [u8], ip: &V4At) {
    if ip.fragment || !ip.whole {
        return;
    }
    let Some(at) = l4_csum_at(ip.proto) else {
        return;
    };
    let start = ip.l3 + ip.ihl;
    if ip.end < start + at + 2 {
        return;
    }
    put16(buf, start + at, 0);
    let mut l4 = buf.get(start..ip.end).unwrap_or_default();
    if ip.proto == 17 {
        // Over the datagram's own length when it is one (see `l4_ok`).
        let ulen = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
        if ulen >= 8 && ulen <= l4.len() {
            l4 = &l4[..ulen];
        }
    }
    let c = match ip.proto {
        1 => fold(sum(l4, 0)),
        6 | 17 => {
            let c = fold(sum(l4, pseudo_v4(buf, ip, l4.len())));
            if ip.proto == 17 && c == 0 { 0xFFFF } else { c }
        }
        _ => return,
    };
    put16(buf, start + at, c);
}

fn fix_v4(buf: &mut [u8], ip: &V4At) {
    put16(buf, ip.l3 + 10, 0);
    let c = fold(sum(buf.get(ip.l3..ip.l3 + ip.ihl).unwrap_or_default(), 0));
    put16(buf, ip.l3 + 10, c);
}

/// Makes every IPv4 checksum of the frame right: for an ICMP error the quoted packet's
/// first (its L4 when whole, then its IP header), then the outer L4, then the outer IP
/// header. Frames that are not Ethernet + IPv4 are left alone.
pub fn fix_checksums(frame: &mut [u8]) {
    let Some((l3, 0x0800)) = l3_of(frame) else {
        return;
    };
    let Some(ip) = v4_at(frame, l3) else {
        return;
    };
    let l4 = l3 + ip.ihl;
    if ip.proto == 1
        && !ip.fragment
        && frame
            .get(l4)
            .is_some_and(|t| matches!(t, 3 | 4 | 5 | 11 | 12))
    {
        let end = ip.end;
        if let Some(quote) = frame.get_mut(..end) {
            if let Some(inner) = v4_at(quote, l4 + 8) {
                fix_l4(quote, &inner);
                fix_v4(quote, &inner);
            }
        }
    }
    fix_l4(frame, &ip);
    fix_v4(frame, &ip);
}

/// An L4 header for [`build_v4`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L4Spec {
    /// TCP with flags, sequence and acknowledgement numbers, window.
    Tcp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
        /// Flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10).
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgement number.
        ack: u32,
        /// Window.
        window: u16,
    },
    /// UDP.
    Udp {
        /// Source port.
        sport: u16,
        /// Destination port.
        dport: u16,
    },
    /// ICMP query or error header (type, code, then 4 bytes: id and sequence).
    Icmp {
        /// Type.
        ty: u8,
        /// Code.
        code: u8,
        /// Identifier.
        id: u16,
        /// Sequence.
        seq: u16,
    },
}

/// Builds an untagged Ethernet + IPv4 frame with right checksums.
#[must_use]
pub fn build_v4(src: [u8; 4], dst: [u8; 4], l4: L4Spec, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(64 + payload.len());
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x08, 0x00]);
    let (proto, hdr): (u8, Vec<u8>) = match l4 {
        L4Spec::Tcp {
            sport,
            dport,
            flags,
            seq,
            ack,
            window,
        } => {
            let mut h = Vec::with_capacity(20);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&seq.to_be_bytes());
            h.extend_from_slice(&ack.to_be_bytes());
            h.extend_from_slice(&[0x50, flags]);
            h.extend_from_slice(&window.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0]);
            (6, h)
        }
        L4Spec::Udp { sport, dport } => {
            let len = u16::try_from(8 + payload.len()).unwrap_or(u16::MAX);
            let mut h = Vec::with_capacity(8);
            h.extend_from_slice(&sport.to_be_bytes());
            h.extend_from_slice(&dport.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h.extend_from_slice(&[0, 0]);
            (17, h)
        }
        L4Spec::Icmp { ty, code, id, seq } => {
            let mut h = vec![ty, code, 0, 0];
            h.extend_from_slice(&id.to_be_bytes());
            h.extend_from_slice(&seq.to_be_bytes());
            (1, h)
        }
    };
    let total = u16::try_from(20 + hdr.len() + payload.len()).unwrap_or(u16::MAX);
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&hdr);
    f.extend_from_slice(payload);
    fix_checksums(&mut f);
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_audit_clean() {
        let f = build_v4(
            [10, 0, 0, 5],
            [203, 0, 113, 10],
            L4Spec::Tcp {
                sport: 40000,
                dport: 80,
                flags: 0x02,
                seq: 1,
                ack: 0,
                window: 65535,
            },
            b"",
        );
        let a = audit(&f);
        assert_eq!(a.ip, Some(true));
        assert_eq!(a.l4, Some(true));
    }
}
