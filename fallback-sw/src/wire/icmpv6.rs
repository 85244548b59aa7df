//! ICMPv6 (RFC 4443). The layout of the first 8 bytes is the same as ICMP's; the
//! checksum also covers the IPv6 pseudo-header.

use core::net::Ipv6Addr;

use super::{Layer, ParseError, be16, ip_proto, need, put16};
use crate::checksum;

pub use super::icmp::HEADER_LEN;

mod field {
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: usize = 2;
    pub(super) const IDENT: usize = 4;
    pub(super) const SEQ: usize = 6;
}

/// ICMPv6 message types.
pub mod msg_type {
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 1;
    /// Packet too big.
    pub const PACKET_TOO_BIG: u8 = 2;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 3;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 4;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 128;
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 129;
    /// Redirect.
    pub const REDIRECT: u8 = 137;
    /// Node information query.
    pub const NI_QUERY: u8 = 139;
    /// Node information reply.
    pub const NI_REPLY: u8 = 140;
}

/// Whether `t` is an error message (types below 128), which quotes the offending packet.
#[inline]
#[must_use]
pub const fn is_error(t: u8) -> bool {
    t < 128
}

/// Whether `t` is a query or reply with an identifier in bytes 4..6 (echo 128/129,
/// node information 139/140), the types Linux conntrack tracks.
#[inline]
#[must_use]
pub const fn is_query(t: u8) -> bool {
    matches!(t, 128 | 129 | 139 | 140)
}

/// A view of an ICMPv6 message.
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

    /// Wraps a message after checking that its 8-byte header is whole.
    ///
    /// # Errors
    /// [`ParseError::Truncated`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        need(Layer::Icmpv6, buffer.as_ref(), HEADER_LEN)?;
        Ok(Self { buffer })
    }

    /// Gives the buffer back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Message type.
    #[inline]
    #[must_use]
    pub fn msg_type(&self) -> u8 {
        self.buffer.as_ref()[field::TYPE]
    }

    /// Code.
    #[inline]
    #[must_use]
    pub fn code(&self) -> u8 {
        self.buffer.as_ref()[field::CODE]
    }

    /// Checksum field.
    #[inline]
    #[must_use]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// Identifier of a query/reply.
    #[inline]
    #[must_use]
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Sequence number of an echo.
    #[inline]
    #[must_use]
    pub fn seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SEQ)
    }

    /// Whether the checksum (pseudo-header included) verifies.
    #[inline]
    #[must_use]
    pub fn verify_checksum(&self, src: &Ipv6Addr, dst: &Ipv6Addr) -> bool {
        let b = self.buffer.as_ref();
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        checksum::verifies(
            checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, len) + checksum::sum(b),
        )
    }

    /// Bytes after the 8-byte header: for an error, the quoted packet.
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }

    /// The quoted packet of an error message, `None` for other types.
    #[inline]
    #[must_use]
    pub fn quoted(&self) -> Option<&[u8]> {
        is_error(self.msg_type()).then(|| self.payload())
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets type and code.
    #[inline]
    pub fn set_type_code(&mut self, t: u8, code: u8) {
        let b = self.buffer.as_mut();
        b[field::TYPE] = t;
        b[field::CODE] = code;
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }

    /// Sets the identifier.
    #[inline]
    pub fn set_ident(&mut self, id: u16) {
        put16(self.buffer.as_mut(), field::IDENT, id);
    }

    /// Sets the sequence number.
    #[inline]
    pub fn set_seq(&mut self, s: u16) {
        put16(self.buffer.as_mut(), field::SEQ, s);
    }

    /// Computes and stores the checksum, pseudo-header included.
    #[inline]
    pub fn fill_checksum(&mut self, src: &Ipv6Addr, dst: &Ipv6Addr) {
        self.set_checksum(0);
        let b = self.buffer.as_ref();
        let len = u32::try_from(b.len()).unwrap_or(u32::MAX);
        let c = checksum::finish(
            checksum::pseudo_header_v6(src, dst, ip_proto::ICMPV6, len) + checksum::sum(b),
        );
        self.set_checksum(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_checksum_matches_etherparse() {
        let src: Ipv6Addr = "fe80::1".parse().expect("addr");
        let dst: Ipv6Addr = "fe80::2".parse().expect("addr");
        let mut m = [0x80, 0, 0, 0, 0x12, 0x34, 0x00, 0x07, 1, 2, 3, 4, 5];
        let mut p = Packet::new_checked(&mut m[..]).expect("valid");
        p.fill_checksum(&src, &dst);
        assert!(p.verify_checksum(&src, &dst));
        assert_eq!(
            (p.msg_type(), p.code(), p.ident(), p.seq()),
            (128, 0, 0x1234, 7)
        );
        assert!(p.quoted().is_none());
        let e = etherparse::Icmpv6Slice::from_slice(&m).expect("etherparse");
        let want = e
            .icmp_type()
            .calc_checksum(src.octets(), dst.octets(), e.payload())
            .expect("small");
        assert_eq!(Packet::new_unchecked(&m[..]).checksum(), want);
        let mut p = Packet::new_unchecked(&mut m[..]);
        p.set_type_code(1, 4);
        p.set_ident(0);
        p.set_seq(0);
        assert_eq!(p.quoted().map(<[u8]>::len), Some(5));
        assert!(!p.verify_checksum(&src, &dst));
        assert!(Packet::new_checked(&m[..7]).is_err());
    }
}
