//! Ethernet II frames and 802.1Q / 802.1ad VLAN tags.

use super::{Layer, ParseError, be16, need, put16};

/// Ethertype values the parsers know.
pub mod ethertype {
    /// IPv4.
    pub const IPV4: u16 = 0x0800;
    /// ARP.
    pub const ARP: u16 = 0x0806;
    /// 802.1Q VLAN tag (C-tag).
    pub const VLAN: u16 = 0x8100;
    /// IPv6.
    pub const IPV6: u16 = 0x86DD;
    /// 802.1ad QinQ service tag (S-tag).
    pub const QINQ: u16 = 0x88A8;

    /// Whether `t` introduces a VLAN tag (802.1Q or 802.1ad).
    #[inline]
    #[must_use]
    pub const fn is_vlan(t: u16) -> bool {
        t == VLAN || t == QINQ
    }
}

mod field {
    use core::ops::Range;
    pub(super) const DST: Range<usize> = 0..6;
    pub(super) const SRC: Range<usize> = 6..12;
    pub(super) const ETHERTYPE: usize = 12;
    pub(super) const PAYLOAD: usize = 14;

    pub(super) const TCI: usize = 0;
    pub(super) const INNER_ETHERTYPE: usize = 2;
}

/// Length of an Ethernet II header.
pub const HEADER_LEN: usize = field::PAYLOAD;
/// Length of one VLAN tag.
pub const VLAN_TAG_LEN: usize = 4;
/// Most VLAN tags a frame may carry (QinQ).
pub const MAX_VLAN_TAGS: usize = 2;

/// A view of an Ethernet II frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// Wraps a buffer without checking it; accessors may panic on a short one.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking that it holds a full header.
    ///
    /// # Errors
    /// [`ParseError::Truncated`] if it is shorter than [`HEADER_LEN`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        need(Layer::Ethernet, buffer.as_ref(), HEADER_LEN)?;
        Ok(Self { buffer })
    }

    /// Gives the buffer back.
    #[inline]
    pub fn into_inner(self) -> T {
        self.buffer
    }

    /// Destination MAC address.
    #[inline]
    #[must_use]
    pub fn dst_addr(&self) -> [u8; 6] {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::DST]);
        a
    }

    /// Source MAC address.
    #[inline]
    #[must_use]
    pub fn src_addr(&self) -> [u8; 6] {
        let mut a = [0; 6];
        a.copy_from_slice(&self.buffer.as_ref()[field::SRC]);
        a
    }

    /// The ethertype (or VLAN TPID).
    #[inline]
    #[must_use]
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::ETHERTYPE)
    }

    /// Everything after the header.
    #[inline]
    #[must_use]
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets the destination MAC address.
    #[inline]
    pub fn set_dst_addr(&mut self, a: [u8; 6]) {
        self.buffer.as_mut()[field::DST].copy_from_slice(&a);
    }

    /// Sets the source MAC address.
    #[inline]
    pub fn set_src_addr(&mut self, a: [u8; 6]) {
        self.buffer.as_mut()[field::SRC].copy_from_slice(&a);
    }

    /// Sets the ethertype.
    #[inline]
    pub fn set_ethertype(&mut self, t: u16) {
        put16(self.buffer.as_mut(), field::ETHERTYPE, t);
    }

    /// Everything after the header, writable.
    #[inline]
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

/// A view of one VLAN tag: the 4 bytes after a TPID of 0x8100 or 0x88A8 (TCI, then the
/// ethertype of what follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VlanTag<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> VlanTag<T> {
    /// Wraps a buffer without checking it.
    #[inline]
    pub const fn new_unchecked(buffer: T) -> Self {
        Self { buffer }
    }

    /// Wraps a buffer after checking that it holds a full tag.
    ///
    /// # Errors
    /// [`ParseError::Truncated`] if it is shorter than [`VLAN_TAG_LEN`].
    #[inline]
    pub fn new_checked(buffer: T) -> Result<Self, ParseError> {
        need(Layer::Vlan, buffer.as_ref(), VLAN_TAG_LEN)?;
        Ok(Self { buffer })
    }

    /// Tag control information (PCP, DEI, VID).
    #[inline]
    #[must_use]
    pub fn tci(&self) -> u16 {
        be16(self.buffer.as_ref(), field::TCI)
    }

    /// VLAN identifier (12 bits).
    #[inline]
    #[must_use]
    pub fn vid(&self) -> u16 {
        self.tci() & 0x0FFF
    }

    /// Priority code point (3 bits).
    #[inline]
    #[must_use]
    pub fn pcp(&self) -> u8 {
        self.buffer.as_ref()[field::TCI] >> 5
    }

    /// Drop-eligible indicator.
    #[inline]
    #[must_use]
    pub fn dei(&self) -> bool {
        self.buffer.as_ref()[field::TCI] & 0x10 != 0
    }

    /// The ethertype of what follows the tag.
    #[inline]
    #[must_use]
    pub fn ethertype(&self) -> u16 {
        be16(self.buffer.as_ref(), field::INNER_ETHERTYPE)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VlanTag<T> {
    /// Sets the VLAN identifier, keeping PCP and DEI.
    #[inline]
    pub fn set_vid(&mut self, vid: u16) {
        let tci = (self.tci() & 0xF000) | (vid & 0x0FFF);
        put16(self.buffer.as_mut(), field::TCI, tci);
    }

    /// Sets the ethertype of what follows the tag.
    #[inline]
    pub fn set_ethertype(&mut self, t: u16) {
        put16(self.buffer.as_mut(), field::INNER_ETHERTYPE, t);
    }
}

/// What the L2 walk found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Info {
    /// VLAN ids, outermost first; `[None, None]` when untagged.
    pub vlans: [Option<u16>; MAX_VLAN_TAGS],
    /// The ethertype after all tags.
    pub ethertype: u16,
    /// Offset of the L3 header in the frame.
    pub l3_offset: usize,
}

/// Walks the Ethernet header and up to [`MAX_VLAN_TAGS`] VLAN tags.
///
/// # Errors
/// [`ParseError::Truncated`] for a short header or tag, [`ParseError::TooManyVlanTags`]
/// for a third tag.
#[inline]
pub fn walk(frame: &[u8]) -> Result<L2Info, ParseError> {
    let eth = Frame::new_checked(frame)?;
    let mut info = L2Info {
        vlans: [None; MAX_VLAN_TAGS],
        ethertype: eth.ethertype(),
        l3_offset: HEADER_LEN,
    };
    let mut n = 0;
    while ethertype::is_vlan(info.ethertype) {
        if n == MAX_VLAN_TAGS {
            return Err(ParseError::TooManyVlanTags {
                limit: MAX_VLAN_TAGS,
            });
        }
        let rest = frame.get(info.l3_offset..).unwrap_or_default();
        let tag = VlanTag::new_checked(rest)?;
        info.vlans[n] = Some(tag.vid());
        info.ethertype = tag.ethertype();
        info.l3_offset += VLAN_TAG_LEN;
        n += 1;
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QinQ frame: S-tag 100, C-tag 200, then IPv4.
    const QINQ_FRAME: [u8; 22] = [
        0x02, 0, 0, 0, 0, 0x01, // dst
        0x02, 0, 0, 0, 0, 0x02, // src
        0x88, 0xa8, 0x00, 0x64, // S-tag vid 100
        0x81, 0x00, 0xa0, 0xc8, // C-tag pcp 5 vid 200
        0x08, 0x00, // IPv4
    ];

    #[test]
    fn qinq_walk() {
        let info = walk(&QINQ_FRAME).expect("valid");
        assert_eq!(info.vlans, [Some(100), Some(200)]);
        assert_eq!(info.ethertype, ethertype::IPV4);
        assert_eq!(info.l3_offset, 22);
        let f = Frame::new_checked(&QINQ_FRAME[..]).expect("valid");
        assert_eq!(f.dst_addr(), [2, 0, 0, 0, 0, 1]);
        assert_eq!(f.src_addr(), [2, 0, 0, 0, 0, 2]);
        let tag = VlanTag::new_checked(&QINQ_FRAME[18..]).expect("valid");
        assert_eq!(tag.pcp(), 5);
        assert!(!tag.dei());
        for len in 0..QINQ_FRAME.len() {
            assert!(walk(&QINQ_FRAME[..len]).is_err(), "prefix {len}");
        }
    }

    #[test]
    fn third_tag_rejected() {
        let mut f = QINQ_FRAME.to_vec();
        f[20..22].copy_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00]);
        assert_eq!(walk(&f), Err(ParseError::TooManyVlanTags { limit: 2 }));
    }

    #[test]
    fn setters_round_trip() {
        let mut buf = QINQ_FRAME;
        let mut f = Frame::new_checked(&mut buf[..]).expect("valid");
        f.set_dst_addr([1, 2, 3, 4, 5, 6]);
        f.set_src_addr([7, 8, 9, 10, 11, 12]);
        f.set_ethertype(ethertype::VLAN);
        assert_eq!(f.ethertype(), ethertype::VLAN);
        let mut tag = VlanTag::new_checked(&mut buf[18..]).expect("valid");
        tag.set_vid(0xFFF);
        tag.set_ethertype(ethertype::IPV6);
        assert_eq!(tag.vid(), 0xFFF);
        assert_eq!(tag.pcp(), 5);
        let info = walk(&buf).expect("valid");
        assert_eq!(info.vlans, [Some(100), Some(0xFFF)]);
        assert_eq!(info.ethertype, ethertype::IPV6);
    }
}
