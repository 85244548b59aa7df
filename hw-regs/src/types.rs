//! Newtypes for hardware flow ids and I/O virtual addresses.

use core::fmt;

/// A flow-table slot number, `bucket × WAYS + way` (device.md section 10.1).
///
/// It has no arithmetic operators; the only derived values are checked.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId(u32);

impl FlowId {
    /// The raw value `0xFFFF_FFFF` that the device writes where no flow id applies.
    pub const NONE_RAW: u32 = 0xFFFF_FFFF;

    /// Wraps a raw slot number. Returns `None` for [`FlowId::NONE_RAW`].
    #[must_use]
    pub const fn new(raw: u32) -> Option<Self> {
        if raw == Self::NONE_RAW {
            None
        } else {
            Some(Self(raw))
        }
    }

    /// The slot of `way` in `bucket` for a table with `ways` ways per bucket, or `None`
    /// on overflow or `way >= ways`.
    #[must_use]
    pub const fn from_bucket_way(bucket: u32, way: u32, ways: u32) -> Option<Self> {
        if way >= ways {
            return None;
        }
        match bucket.checked_mul(ways) {
            Some(base) => match base.checked_add(way) {
                Some(raw) => Self::new(raw),
                None => None,
            },
            None => None,
        }
    }

    /// The raw slot number.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }

    /// The raw encoding of an optional id: the id, or [`FlowId::NONE_RAW`].
    #[must_use]
    pub const fn raw_or_none(id: Option<Self>) -> u32 {
        match id {
            Some(id) => id.0,
            None => Self::NONE_RAW,
        }
    }
}

impl fmt::Debug for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FlowId({})", self.0)
    }
}

impl fmt::Display for FlowId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// An I/O virtual address: the address the device uses for DMA.
///
/// No arithmetic operators; offsets are added with [`Iova::checked_add`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Iova(u64);

impl Iova {
    /// Wraps a raw address.
    #[must_use]
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw address.
    #[must_use]
    pub const fn get(self) -> u64 {
        self.0
    }

    /// `self + offset`, or `None` on overflow.
    #[must_use]
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// Whether the address is a multiple of `align` (`align` a power of two).
    #[must_use]
    pub const fn is_aligned(self, align: u64) -> bool {
        align.is_power_of_two() && self.0 & (align - 1) == 0
    }

    /// Bits 31:0, the value of a `_LO` register.
    #[must_use]
    pub const fn lo(self) -> u32 {
        let b = self.0.to_le_bytes();
        u32::from_le_bytes([b[0], b[1], b[2], b[3]])
    }

    /// Bits 63:32, the value of a `_HI` register.
    #[must_use]
    pub const fn hi(self) -> u32 {
        let b = self.0.to_le_bytes();
        u32::from_le_bytes([b[4], b[5], b[6], b[7]])
    }

    /// Joins a `_LO`/`_HI` register pair.
    #[must_use]
    pub const fn from_lo_hi(lo: u32, hi: u32) -> Self {
        let l = lo.to_le_bytes();
        let h = hi.to_le_bytes();
        Self(u64::from_le_bytes([
            l[0], l[1], l[2], l[3], h[0], h[1], h[2], h[3],
        ]))
    }
}

impl fmt::Debug for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Iova({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_id_encoding() {
        assert_eq!(FlowId::new(FlowId::NONE_RAW), None);
        assert_eq!(FlowId::from_bucket_way(3, 5, 8).map(FlowId::get), Some(29));
        assert_eq!(FlowId::from_bucket_way(3, 8, 8), None);
        assert_eq!(FlowId::from_bucket_way(u32::MAX, 0, 8), None);
        assert_eq!(FlowId::raw_or_none(None), 0xFFFF_FFFF);
        assert_eq!(FlowId::raw_or_none(FlowId::new(7)), 7);
    }

    #[test]
    fn iova_split_and_checks() {
        let a = Iova::new(0x1234_5678_9ABC_D000);
        assert_eq!(a.lo(), 0x9ABC_D000);
        assert_eq!(a.hi(), 0x1234_5678);
        assert_eq!(Iova::from_lo_hi(a.lo(), a.hi()), a);
        assert!(a.is_aligned(4096));
        assert!(!a.is_aligned(8192 * 4));
        assert!(!a.is_aligned(3));
        assert_eq!(Iova::new(u64::MAX).checked_add(1), None);
        assert_eq!(Iova::new(1).checked_add(1), Some(Iova::new(2)));
    }
}
