//! IPv6 fixed header (RFC 8200) and the extension-header walk.

use core::net::Ipv6Addr;

use super::{Layer, ParseError, be16, be32, ip_proto, need, put16};

mod field {
    use core::ops::Range;
    pub(super) const VER_TC_FLOW: usize = 0;
    pub(super) const LENGTH: usize = 4;
    pub(super) const NXT_HDR: usize = 6;
    pub(super) const HOP_LIMIT: usize = 7;
    pub(super) const SRC: Range<usize> = 8..24;
    pub(super) const DST: Range<usize> = 24..40;
}

/// Length of the fixed IPv6 header.
pub const HEADER_LEN: usize = 40;

/// Most extension headers [`walk_ext_headers`] follows before giving up.
pub const MAX_EXT_HEADERS: usize = 8;

/// A view of an IPv6 packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short one.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a received packet after checking the version and that the header and
    /// `payload_len` bytes are in the buffer (which may be longer: link padding).
    ///
    /// Jumbograms (payload length 0 with a Jumbo Payload option) are not supported: the
    /// payload is then taken to be empty.
    ///
    /// # Errors
    /// [`ParseError::Truncated`], [`ParseError::BadIpVersion`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let p = Self::new_checked_header(buffer)?;
        need(Layer::Ipv6, p.buffer.as_ref(), p.total_len())?;
        Ok(p)
    }

    /// Like [`Packet::new_checked`] but lets the buffer end before the payload does (a
    /// packet quoted in an ICMPv6 error).
    ///
    /// # Errors
    /// [`ParseError::Truncated`] for a short fixed header, [`ParseError::BadIpVersion`].
    #[inline]
    pub fn new_checked_header(buffer: T) -> Result<Self, ParseError> {
        need(Layer::Ipv6, buffer.as_ref(), HEADER_LEN)?;
        let p = Self { buffer };
        let version = p.version();
        if version != 6 {
            return Err(ParseError::BadIpVersion {
                expected: 6,
                found: version,
            });
        }
        Ok(p)
    }

    /// Gives the buffer back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Version nibble.
    #[inline]
    #[must_use]
    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VER_TC_FLOW] >> 4
    }

    /// Traffic class.
    #[inline]
    #[must_use]
    pub fn traffic_class(&self) -> u8 {
        let b = self.buffer.as_ref();
        (b[0] << 4) | (b[1] >> 4)
    }

    /// Flow label (20 bits).
    #[inline]
    #[must_use]
    pub fn flow_label(&self) -> u32 {
        be32(self.buffer.as_ref(), field::VER_TC_FLOW) & 0x000F_FFFF
    }

    /// Payload length field.
    #[inline]
    #[must_use]
    pub fn payload_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Fixed header plus payload length.
    #[inline]
    #[must_use]
    pub fn total_len(&self) -> usize {
        HEADER_LEN + usize::from(self.payload_len())
    }

    /// Next header of the fixed header.
    #[inline]
    #[must_use]
    pub fn next_header(&self) -> u8 {
        self.buffer.as_ref()[field::NXT_HDR]
    }

    /// Hop limit.
    #[inline]
    #[must_use]
    pub fn hop_limit(&self) -> u8 {
        self.buffer.as_ref()[field::HOP_LIMIT]
    }

    /// Source address.
    #[inline]
    #[must_use]
    pub fn src_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.src_octets())
    }

    /// Destination address.
    #[inline]
    #[must_use]
    pub fn dst_addr(&self) -> Ipv6Addr {
        Ipv6Addr::from(self.dst_octets())
    }

    /// Source address bytes.
    #[inline]
    #[must_use]
    pub fn src_octets(&self) -> [u8; 16] {
        let mut a = [0; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        a
    }

    /// Destination address bytes.
    #[inline]
    #[must_use]
    pub fn dst_octets(&self) -> [u8; 16] {
        let mut a = [0; 16];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        a
    }

    /// Everything after the fixed header, up to the payload length or the end of the
    /// buffer, whichever comes first.
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[HEADER_LEN..self.total_len().min(b.len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 6, traffic class 0 and flow label 0.
    #[inline]
    pub fn set_version_default(&mut self) {
        self.buffer.as_mut()[..4].copy_from_slice(&[0x60, 0, 0, 0]);
    }

    /// Sets the payload length.
    #[inline]
    pub fn set_payload_len(&mut self, len: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, len);
    }

    /// Sets the next header of the fixed header.
    #[inline]
    pub fn set_next_header(&mut self, nh: u8) {
        self.buffer.as_mut()[field::NXT_HDR] = nh;
    }

    /// Sets the hop limit.
    #[inline]
    pub fn set_hop_limit(&mut self, h: u8) {
        self.buffer.as_mut()[field::HOP_LIMIT] = h;
    }

    /// Sets the source address.
    #[inline]
    pub fn set_src_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    /// Sets the destination address.
    #[inline]
    pub fn set_dst_addr(&mut self, a: Ipv6Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }
}

/// The fragment header found by [`walk_ext_headers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FragmentHeader {
    /// Fragment offset in bytes.
    pub offset: u16,
    /// More Fragments flag.
    pub more: bool,
    /// Identification.
    pub ident: u32,
}

impl FragmentHeader {
    /// Whether this fragment starts at offset 0 (and so carries the L4 header).
    #[inline]
    #[must_use]
    pub const fn is_first(&self) -> bool {
        self.offset == 0
    }
}

/// Where the extension-header walk ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtWalk {
    /// The upper-layer protocol (or ESP 50, No Next Header 59, or, for a non-first
    /// fragment, the next header of its fragment header).
    pub protocol: u8,
    /// Offset of the upper-layer header in the buffer given to the walk.
    pub offset: usize,
    /// The fragment header, if one was crossed. A non-first fragment stops the walk: the
    /// bytes at `offset` are then a piece of payload, not an L4 header.
    pub fragment: Option<FragmentHeader>,
    /// How many extension headers were crossed.
    pub count: u8,
}

/// Whether `nh` is an extension header the walk follows.
#[inline]
#[must_use]
pub const fn is_ext_header(nh: u8) -> bool {
    matches!(
        nh,
        ip_proto::HOPOPT
            | ip_proto::IPV6_ROUTE
            | ip_proto::IPV6_FRAG
            | ip_proto::IPV6_OPTS
            | ip_proto::AH
    )
}

/// Walks extension headers in `buf[start..]`, the first of type `next_header`, until an
/// upper-layer protocol, ESP, No Next Header or a non-first fragment.
///
/// `buf` should end where the IPv6 payload ends. At most [`MAX_EXT_HEADERS`] headers are
/// followed, so a hostile chain costs a bounded amount of work.
///
/// # Errors
/// [`ParseError::Truncated`] (layer [`Layer::Ipv6Ext`]) when a header runs past `buf`,
/// [`ParseError::TooManyExtHeaders`].
#[inline]
pub fn walk_ext_headers(buf: &[u8], start: usize, next_header: u8) -> Result<ExtWalk, ParseError> {
    let mut nh = next_header;
    let mut off = start;
    let mut fragment = None;
    let mut count: u8 = 0;
    while is_ext_header(nh) {
        if usize::from(count) == MAX_EXT_HEADERS {
            return Err(ParseError::TooManyExtHeaders {
                limit: MAX_EXT_HEADERS,
            });
        }
        let rest = buf.get(off..).unwrap_or_default();
        need(Layer::Ipv6Ext, rest, 2)?;
        let len = match nh {
            ip_proto::IPV6_FRAG => 8,
            ip_proto::AH => (usize::from(rest[1]) + 2) * 4,
            _ => (usize::from(rest[1]) + 1) * 8,
        };
        need(Layer::Ipv6Ext, rest, len)?;
        count += 1;
        let this = nh;
        nh = rest[0];
        off += len;
        if this == ip_proto::IPV6_FRAG {
            let fo = be16(rest, 2);
            let frag = FragmentHeader {
                offset: fo & 0xFFF8,
                more: fo & 1 != 0,
                ident: be32(rest, 4),
            };
            fragment = Some(frag);
            if !frag.is_first() {
                break;
            }
        }
    }
    Ok(ExtWalk {
        protocol: nh,
        offset: off,
        fragment,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2001:db8::1 -> 2001:db8::2, hop-by-hop (PadN) then a first fragment, then TCP.
    fn chain() -> Vec<u8> {
        let mut p = vec![
            0x60, 0x00, 0x00, 0x00, 0x00, 0x24, 0x00, 0x40, // ver, plen 36, HBH, hlim 64
        ];
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        p.extend_from_slice(&[44, 0, 1, 4, 0, 0, 0, 0]); // HBH -> frag, PadN
        p.extend_from_slice(&[6, 0, 0x00, 0x01, 0xde, 0xad, 0xbe, 0xef]); // frag, off 0, M
        p.extend_from_slice(&[0u8; 20]); // TCP (contents irrelevant here)
        p
    }

    #[test]
    fn walks_hbh_and_fragment() {
        let p = chain();
        let ip = Packet::new_checked(&p[..]).expect("valid");
        assert_eq!(ip.hop_limit(), 64);
        assert_eq!(ip.next_header(), 0);
        assert_eq!(
            ip.src_addr(),
            "2001:db8::1".parse::<Ipv6Addr>().expect("addr")
        );
        let w =
            walk_ext_headers(&p[..ip.total_len()], HEADER_LEN, ip.next_header()).expect("valid");
        assert_eq!(w.protocol, 6);
        assert_eq!(w.offset, 56);
        assert_eq!(w.count, 2);
        assert_eq!(
            w.fragment,
            Some(FragmentHeader {
                offset: 0,
                more: true,
                ident: 0xdead_beef
            })
        );
        for len in 0..p.len() {
            let r = Packet::new_checked(&p[..len]);
            assert!(r.is_err(), "prefix {len}");
        }
        for len in HEADER_LEN..56 {
            assert!(
                walk_ext_headers(&p[..len], HEADER_LEN, 0).is_err(),
                "prefix {len}"
            );
        }
    }

    #[test]
    fn non_first_fragment_stops() {
        let mut p = chain();
        p[50..52].copy_from_slice(&[0x05, 0xa8]); // offset 1448, no M
        let w = walk_ext_headers(&p, HEADER_LEN, 0).expect("valid");
        assert_eq!(w.protocol, 6);
        let f = w.fragment.expect("fragment");
        assert!(!f.is_first());
        assert!(!f.more);
        assert_eq!(f.offset, 1448);
    }

    #[test]
    fn chain_bound() {
        // Nine destination-options headers in a row.
        let mut p = vec![0u8; HEADER_LEN];
        for _ in 0..9 {
            p.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
        }
        assert_eq!(
            walk_ext_headers(&p, HEADER_LEN, 60),
            Err(ParseError::TooManyExtHeaders { limit: 8 })
        );
        // ESP and No Next Header stop the walk; AH length is in 4-byte units.
        let ah = [50, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let w = walk_ext_headers(&ah, 0, 51).expect("valid");
        assert_eq!((w.protocol, w.offset), (50, 12));
        let w = walk_ext_headers(&[], 0, 59).expect("valid");
        assert_eq!((w.protocol, w.offset, w.count), (59, 0, 0));
    }

    #[test]
    fn setters() {
        let mut p = chain();
        let mut ip = Packet::new_unchecked(&mut p[..]);
        ip.set_version_default();
        ip.set_hop_limit(1);
        ip.set_next_header(6);
        ip.set_payload_len(20);
        ip.set_src_addr(Ipv6Addr::LOCALHOST);
        ip.set_dst_addr(Ipv6Addr::UNSPECIFIED);
        assert_eq!(ip.traffic_class(), 0);
        assert_eq!(ip.flow_label(), 0);
        let e = etherparse::Ipv6HeaderSlice::from_slice(&p).expect("etherparse");
        assert_eq!(e.hop_limit(), 1);
        assert_eq!(e.payload_length(), 20);
        assert_eq!(e.source_addr(), Ipv6Addr::LOCALHOST);
    }
}
