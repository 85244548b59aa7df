//! IPv4 headers (RFC 791).

use core::net::Ipv4Addr;

use super::{Layer, ParseError, be16, need, put16};
use crate::checksum;

mod field {
    use core::ops::Range;
    pub(super) const VER_IHL: usize = 0;
    pub(super) const DSCP_ECN: usize = 1;
    pub(super) const LENGTH: usize = 2;
    pub(super) const IDENT: usize = 4;
    pub(super) const FLG_OFF: usize = 6;
    pub(super) const TTL: usize = 8;
    pub(super) const PROTOCOL: usize = 9;
    pub(super) const CHECKSUM: usize = 10;
    pub(super) const SRC: Range<usize> = 12..16;
    pub(super) const DST: Range<usize> = 16..20;
}

/// Length of an IPv4 header without options.
pub const HEADER_LEN: usize = 20;

const FLAG_DF: u16 = 0x4000;
const FLAG_MF: u16 = 0x2000;
const OFFSET_MASK: u16 = 0x1FFF;

/// A view of an IPv4 packet.
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

    /// Wraps a received packet after checking version, IHL and total length: the whole
    /// header and `total_len` bytes are in the buffer (which may be longer: link padding).
    ///
    /// # Errors
    /// [`ParseError::Truncated`], [`ParseError::BadIpVersion`], [`ParseError::BadIhl`],
    /// [`ParseError::BadTotalLength`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        let p = Self::new_checked_header(buffer)?;
        let total = usize::from(p.total_len());
        need(Layer::Ipv4, p.buffer.as_ref(), total)?;
        Ok(p)
    }

    /// Like [`Packet::new_checked`] but lets the buffer end before `total_len` (a packet
    /// quoted in an ICMP error). The header itself must be whole. [`Packet::payload`]
    /// then returns what is there.
    ///
    /// # Errors
    /// As [`Packet::new_checked`], except that a buffer shorter than `total_len` is fine.
    #[inline]
    pub fn new_checked_header(buffer: T) -> Result<Self, ParseError> {
        let b = buffer.as_ref();
        need(Layer::Ipv4, b, HEADER_LEN)?;
        let p = Self { buffer };
        let version = p.version();
        if version != 4 {
            return Err(ParseError::BadIpVersion {
                expected: 4,
                found: version,
            });
        }
        let ihl = p.ihl();
        if ihl < 5 {
            return Err(ParseError::BadIhl { ihl });
        }
        let header_len = p.header_len();
        need(Layer::Ipv4, p.buffer.as_ref(), header_len)?;
        if usize::from(p.total_len()) < header_len {
            return Err(ParseError::BadTotalLength {
                total_len: p.total_len(),
                header_len,
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
        self.buffer.as_ref()[field::VER_IHL] >> 4
    }

    /// IHL field (32-bit words).
    #[inline]
    #[must_use]
    pub fn ihl(&self) -> u8 {
        self.buffer.as_ref()[field::VER_IHL] & 0x0F
    }

    /// Header length in bytes, options included.
    #[inline]
    #[must_use]
    pub fn header_len(&self) -> usize {
        usize::from(self.ihl()) * 4
    }

    /// Whether the header carries options (IHL > 5).
    #[inline]
    #[must_use]
    pub fn has_options(&self) -> bool {
        self.ihl() > 5
    }

    /// The options bytes (empty without options).
    #[inline]
    #[must_use]
    pub fn options(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..self.header_len()]
    }

    /// DSCP (6 bits).
    #[inline]
    #[must_use]
    pub fn dscp(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] >> 2
    }

    /// ECN (2 bits).
    #[inline]
    #[must_use]
    pub fn ecn(&self) -> u8 {
        self.buffer.as_ref()[field::DSCP_ECN] & 0x03
    }

    /// Total length field.
    #[inline]
    #[must_use]
    pub fn total_len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Identification.
    #[inline]
    #[must_use]
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Don't Fragment flag.
    #[inline]
    #[must_use]
    pub fn dont_frag(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_DF != 0
    }

    /// More Fragments flag.
    #[inline]
    #[must_use]
    pub fn more_frags(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & FLAG_MF != 0
    }

    /// Fragment offset in bytes (the field times 8).
    #[inline]
    #[must_use]
    pub fn frag_offset(&self) -> u16 {
        (be16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK) << 3
    }

    /// Whether this is a fragment (MF set or a non-zero offset).
    #[inline]
    #[must_use]
    pub fn is_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & (FLAG_MF | OFFSET_MASK) != 0
    }

    /// Whether this packet starts at offset 0 (a first fragment or not a fragment).
    #[inline]
    #[must_use]
    pub fn is_first_fragment(&self) -> bool {
        be16(self.buffer.as_ref(), field::FLG_OFF) & OFFSET_MASK == 0
    }

    /// Time to live.
    #[inline]
    #[must_use]
    pub fn ttl(&self) -> u8 {
        self.buffer.as_ref()[field::TTL]
    }

    /// Protocol of the payload.
    #[inline]
    #[must_use]
    pub fn protocol(&self) -> u8 {
        self.buffer.as_ref()[field::PROTOCOL]
    }

    /// Header checksum field.
    #[inline]
    #[must_use]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Source address.
    #[inline]
    #[must_use]
    pub fn src_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::SRC];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Destination address.
    #[inline]
    #[must_use]
    pub fn dst_addr(&self) -> Ipv4Addr {
        let b = &self.buffer.as_ref()[field::DST];
        Ipv4Addr::new(b[0], b[1], b[2], b[3])
    }

    /// Whether the header checksum verifies.
    #[inline]
    #[must_use]
    pub fn verify_checksum(&self) -> bool {
        checksum::verifies(checksum::sum(&self.buffer.as_ref()[..self.header_len()]))
    }

    /// The payload: from the end of the header to `total_len`, or to the end of the
    /// buffer if that comes first.
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        let end = usize::from(self.total_len()).min(b.len());
        &b[self.header_len()..end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets version 4 and the IHL.
    #[inline]
    pub fn set_version_ihl(&mut self, ihl: u8) {
        self.buffer.as_mut()[field::VER_IHL] = 0x40 | (ihl & 0x0F);
    }

    /// Sets the total length.
    #[inline]
    pub fn set_total_len(&mut self, len: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, len);
    }

    /// Sets the identification.
    #[inline]
    pub fn set_ident(&mut self, id: u16) {
        put16(self.buffer.as_mut(), field::IDENT, id);
    }

    /// Sets the time to live.
    #[inline]
    pub fn set_ttl(&mut self, ttl: u8) {
        self.buffer.as_mut()[field::TTL] = ttl;
    }

    /// Sets the protocol.
    #[inline]
    pub fn set_protocol(&mut self, p: u8) {
        self.buffer.as_mut()[field::PROTOCOL] = p;
    }

    /// Sets the header checksum field.
    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Sets the source address (the checksum is not touched).
    #[inline]
    pub fn set_src_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a.octets());
    }

    /// Sets the destination address (the checksum is not touched).
    #[inline]
    pub fn set_dst_addr(&mut self, a: Ipv4Addr) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a.octets());
    }

    /// Computes and stores the header checksum.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(&self.buffer.as_ref()[..self.header_len()]);
        self.set_checksum(c);
    }

    /// The payload, writable (bounded like [`Packet::payload`]).
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let start = self.header_len();
        let end = usize::from(self.total_len()).min(self.buffer.as_ref().len());
        &mut self.buffer.as_mut()[start..end]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 192.168.0.1 -> 192.168.0.199, UDP, 115 bytes, DF, checksum b861.
    const HDR: [u8; 20] = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];

    #[test]
    fn fields() {
        let mut buf = [0u8; 0x73];
        buf[..20].copy_from_slice(&HDR);
        let p = Packet::new_checked(&buf[..]).expect("valid");
        assert_eq!(p.version(), 4);
        assert_eq!(p.header_len(), 20);
        assert!(!p.has_options());
        assert_eq!(p.total_len(), 0x73);
        assert!(p.dont_frag());
        assert!(!p.more_frags());
        assert!(!p.is_fragment());
        assert!(p.is_first_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), 17);
        assert_eq!(p.src_addr(), Ipv4Addr::new(192, 168, 0, 1));
        assert_eq!(p.dst_addr(), Ipv4Addr::new(192, 168, 0, 199));
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 0x73 - 20);
        for len in 0..buf.len() {
            assert!(Packet::new_checked(&buf[..len]).is_err(), "prefix {len}");
        }
        assert!(Packet::new_checked_header(&buf[..20]).is_ok());
    }

    #[test]
    fn bad_fields() {
        let mut h = HDR;
        h[0] = 0x65;
        assert_eq!(
            Packet::new_checked(&h[..]),
            Err(ParseError::BadIpVersion {
                expected: 4,
                found: 6
            })
        );
        h[0] = 0x44;
        assert_eq!(
            Packet::new_checked(&h[..]),
            Err(ParseError::BadIhl { ihl: 4 })
        );
        h[0] = 0x45;
        h[2..4].copy_from_slice(&[0, 19]);
        assert!(matches!(
            Packet::new_checked(&h[..]),
            Err(ParseError::BadTotalLength { total_len: 19, .. })
        ));
    }

    #[test]
    fn fragments_and_options() {
        let mut buf = [0u8; 28];
        buf[..20].copy_from_slice(&HDR);
        buf[0] = 0x46; // one word of options
        buf[2..4].copy_from_slice(&[0, 28]);
        buf[20..24].copy_from_slice(&[0x94, 0x04, 0x00, 0x00]); // router alert
        let mut p = Packet::new_checked(&mut buf[..]).expect("valid");
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert!(p.has_options());
        assert_eq!(p.options(), &[0x94, 0x04, 0, 0]);
        assert_eq!(p.payload().len(), 4);
        buf[6..8].copy_from_slice(&[0x20, 0x00]); // MF, offset 0
        let p = Packet::new_checked(&buf[..]).expect("valid");
        assert!(p.is_fragment() && p.is_first_fragment());
        buf[6..8].copy_from_slice(&[0x00, 0xb9]); // last fragment at 1480
        let p = Packet::new_checked(&buf[..]).expect("valid");
        assert!(p.is_fragment() && !p.is_first_fragment());
        assert_eq!(p.frag_offset(), 1480);
    }

    #[test]
    fn setters_keep_checksum_consistent() {
        let mut h = HDR;
        let mut p = Packet::new_unchecked(&mut h[..]);
        let old = p.src_addr();
        let new = Ipv4Addr::new(10, 1, 2, 3);
        p.set_src_addr(new);
        let c = crate::checksum::update32(p.checksum(), old.to_bits(), new.to_bits());
        p.set_checksum(c);
        assert!(p.verify_checksum());
        p.set_ttl(63);
        p.set_ident(7);
        p.set_protocol(6);
        p.set_dst_addr(Ipv4Addr::LOCALHOST);
        p.set_total_len(20);
        p.fill_checksum();
        assert!(p.verify_checksum());
        let e = etherparse::Ipv4HeaderSlice::from_slice(&h).expect("etherparse");
        assert_eq!(e.header_checksum(), e.to_header().calc_header_checksum());
        assert_eq!(e.ttl(), 63);
        assert_eq!(e.destination_addr(), Ipv4Addr::LOCALHOST);
    }
}
