//! ICMP for IPv4 (RFC 792).

use super::{Layer, ParseError, be16, need, put16};
use crate::checksum;

mod field {
    pub(super) const TYPE: usize = 0;
    pub(super) const CODE: usize = 1;
    pub(super) const CHECKSUM: usize = 2;
    pub(super) const IDENT: usize = 4;
    pub(super) const SEQ: usize = 6;
}

/// Length of the ICMP header (type, code, checksum and the 4-byte rest of header).
pub const HEADER_LEN: usize = 8;

/// ICMP message types.
pub mod msg_type {
    /// Echo reply.
    pub const ECHO_REPLY: u8 = 0;
    /// Destination unreachable.
    pub const DEST_UNREACHABLE: u8 = 3;
    /// Source quench.
    pub const SOURCE_QUENCH: u8 = 4;
    /// Redirect.
    pub const REDIRECT: u8 = 5;
    /// Echo request.
    pub const ECHO_REQUEST: u8 = 8;
    /// Time exceeded.
    pub const TIME_EXCEEDED: u8 = 11;
    /// Parameter problem.
    pub const PARAM_PROBLEM: u8 = 12;
    /// Timestamp request.
    pub const TIMESTAMP: u8 = 13;
    /// Timestamp reply.
    pub const TIMESTAMP_REPLY: u8 = 14;
    /// Information request.
    pub const INFO_REQUEST: u8 = 15;
    /// Information reply.
    pub const INFO_REPLY: u8 = 16;
    /// Address mask request.
    pub const ADDR_MASK_REQUEST: u8 = 17;
    /// Address mask reply.
    pub const ADDR_MASK_REPLY: u8 = 18;
}

/// Whether `t` is an error that quotes the offending packet (3, 4, 5, 11, 12), the
/// types Linux conntrack treats as possibly RELATED.
#[inline]
#[must_use]
pub const fn is_error(t: u8) -> bool {
    matches!(t, 3 | 4 | 5 | 11 | 12)
}

/// Whether `t` is a query or its reply, carrying an identifier (0, 8, 13..=18).
#[inline]
#[must_use]
pub const fn is_query(t: u8) -> bool {
    matches!(t, 0 | 8 | 13..=18)
}

/// A view of an ICMP message.
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
        need(Layer::Icmp, buffer.as_ref(), HEADER_LEN)?;
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

    /// Identifier of a query/reply (meaningful when [`is_query`]).
    #[inline]
    #[must_use]
    pub fn ident(&self) -> u16 {
        be16(self.buffer.as_ref(), field::IDENT)
    }

    /// Sequence number of a query/reply.
    #[inline]
    #[must_use]
    pub fn seq(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SEQ)
    }

    /// Whether the checksum over the whole message verifies.
    #[inline]
    #[must_use]
    pub fn verify_checksum(&self) -> bool {
        checksum::verifies(checksum::sum(self.buffer.as_ref()))
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

    /// Computes and stores the checksum over the whole message.
    #[inline]
    pub fn fill_checksum(&mut self) {
        self.set_checksum(0);
        let c = checksum::checksum(self.buffer.as_ref());
        self.set_checksum(c);
    }

    /// Bytes after the header, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ping` echo request, id 0x1c46, seq 1, 8 bytes of data, valid checksum.
    pub(crate) const ECHO: [u8; 16] = [
        0x08, 0x00, 0x00, 0x00, 0x1c, 0x46, 0x00, 0x01, //
        0x61, 0x62, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    ];

    #[test]
    fn echo() {
        let mut m = ECHO;
        let mut p = Packet::new_checked(&mut m[..]).expect("valid");
        p.fill_checksum();
        assert!(p.verify_checksum());
        assert_eq!(p.msg_type(), msg_type::ECHO_REQUEST);
        assert_eq!(p.code(), 0);
        assert_eq!((p.ident(), p.seq()), (0x1c46, 1));
        assert!(p.quoted().is_none());
        let e = etherparse::Icmpv4Slice::from_slice(&m).expect("etherparse");
        let want = e.icmp_type().calc_checksum(e.payload());
        assert_eq!(Packet::new_unchecked(&m[..]).checksum(), want);
        for len in 0..HEADER_LEN {
            assert!(Packet::new_checked(&m[..len]).is_err());
        }
        let mut p = Packet::new_unchecked(&mut m[..]);
        p.set_type_code(3, 3);
        p.set_ident(0);
        p.set_seq(0);
        assert_eq!(p.quoted().map(<[u8]>::len), Some(8));
        p.payload_mut()[0] = 0x45;
        assert!(!p.verify_checksum());
    }

    #[test]
    fn classes() {
        for t in 0..=255u8 {
            assert!(!(is_error(t) && is_query(t)));
        }
        assert!(is_query(msg_type::ECHO_REPLY) && is_query(msg_type::ADDR_MASK_REPLY));
        assert!(is_error(msg_type::TIME_EXCEEDED) && !is_error(msg_type::ECHO_REQUEST));
    }
}
