//! UDP headers (RFC 768).

use super::{Layer, ParseError, be16, need, put16};

mod field {
    pub(super) const SRC_PORT: usize = 0;
    pub(super) const DST_PORT: usize = 2;
    pub(super) const LENGTH: usize = 4;
    pub(super) const CHECKSUM: usize = 6;
}

/// Length of a UDP header.
pub const HEADER_LEN: usize = 8;

/// A view of a UDP datagram.
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

    /// Wraps a datagram after checking that the header is whole and that the length
    /// field is at least 8 and at most the buffer (a longer buffer is fine, as Linux
    /// accepts: the datagram ends at the length field).
    ///
    /// # Errors
    /// [`ParseError::Truncated`], [`ParseError::BadUdpLength`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        need(Layer::Udp, buffer.as_ref(), HEADER_LEN)?;
        let p = Self { buffer };
        let length = p.len();
        let available = p.buffer.as_ref().len();
        if usize::from(length) < HEADER_LEN || usize::from(length) > available {
            return Err(ParseError::BadUdpLength { length, available });
        }
        Ok(p)
    }

    /// Gives the buffer back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Source port.
    #[inline]
    #[must_use]
    pub fn src_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::SRC_PORT)
    }

    /// Destination port.
    #[inline]
    #[must_use]
    pub fn dst_port(&self) -> u16 {
        be16(self.buffer.as_ref(), field::DST_PORT)
    }

    /// Length field (header included).
    #[inline]
    #[must_use]
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u16 {
        be16(self.buffer.as_ref(), field::LENGTH)
    }

    /// Checksum field (0: none, IPv4 only).
    #[inline]
    #[must_use]
    pub fn checksum(&self) -> u16 {
        be16(self.buffer.as_ref(), field::CHECKSUM)
    }

    /// The datagram as the length field bounds it (header included).
    #[inline]
    #[must_use]
    pub fn datagram(&self) -> &[u8] {
        let b = self.buffer.as_ref();
        &b[..usize::from(self.len()).min(b.len())]
    }

    /// The payload (bounded by the length field).
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        let d = self.datagram();
        d.get(HEADER_LEN..).unwrap_or_default()
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the source port.
    #[inline]
    pub fn set_src_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::SRC_PORT, p);
    }

    /// Sets the destination port.
    #[inline]
    pub fn set_dst_port(&mut self, p: u16) {
        put16(self.buffer.as_mut(), field::DST_PORT, p);
    }

    /// Sets the length field.
    #[inline]
    pub fn set_len(&mut self, l: u16) {
        put16(self.buffer.as_mut(), field::LENGTH, l);
    }

    /// Sets the checksum field.
    #[inline]
    pub fn set_checksum(&mut self, c: u16) {
        put16(self.buffer.as_mut(), field::CHECKSUM, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DNS query for example.com, A, from port 53000 (checksum left 0).
    pub(crate) const DNS_QUERY: [u8; 37] = [
        0xcf, 0x08, 0x00, 0x35, 0x00, 0x25, 0x00, 0x00, // header, length 37
        0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // DNS hdr
        0x07, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0x03, b'c', b'o', b'm', 0x00, 0x00, 0x01,
        0x00, 0x01,
    ];

    #[test]
    fn fields() {
        let p = Packet::new_checked(&DNS_QUERY[..]).expect("valid");
        assert_eq!(p.src_port(), 53000);
        assert_eq!(p.dst_port(), 53);
        assert_eq!(p.len(), 37);
        assert_eq!(p.checksum(), 0);
        assert_eq!(p.payload().len(), 29);
        for len in 0..DNS_QUERY.len() {
            assert!(
                Packet::new_checked(&DNS_QUERY[..len]).is_err(),
                "prefix {len}"
            );
        }
        // Trailing bytes beyond the length field are not payload.
        let mut long = DNS_QUERY.to_vec();
        long.extend_from_slice(&[0; 6]);
        let p = Packet::new_checked(&long[..]).expect("valid");
        assert_eq!(p.payload().len(), 29);
    }

    #[test]
    fn bad_length() {
        let mut d = DNS_QUERY;
        d[4..6].copy_from_slice(&[0, 7]);
        assert_eq!(
            Packet::new_checked(&d[..]),
            Err(ParseError::BadUdpLength {
                length: 7,
                available: 37
            })
        );
        let mut p = Packet::new_unchecked(&mut d[..]);
        p.set_len(38);
        p.set_src_port(1);
        p.set_dst_port(2);
        p.set_checksum(3);
        assert!(Packet::new_checked(&d[..]).is_err());
        let e = etherparse::UdpHeaderSlice::from_slice(&d).expect("etherparse");
        assert_eq!(
            (
                e.source_port(),
                e.destination_port(),
                e.length(),
                e.checksum()
            ),
            (1, 2, 38, 3)
        );
    }
}
