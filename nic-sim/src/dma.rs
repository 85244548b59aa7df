//! The simulated IOMMU: the device's view of host memory, by I/O virtual address.
//!
//! The driver maps ranges of its DMA regions at IOVAs (as `VFIO_IOMMU_MAP_DMA` does for a
//! real device); the device then reaches host memory only through [`DmaSpace`], and any
//! access that touches an unmapped byte or spans two mappings is a [`Error::DmaFault`],
//! which the device treats as a fatal DMA error.

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mem::SharedRegion;

/// Granule of IOVA mappings: IOVA, region offset and length must be multiples of it.
pub const IOMMU_PAGE_SIZE: u64 = 4096;

/// An I/O virtual address. No `+`/`-`: arithmetic is checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(u64);

impl Iova {
    /// Wraps a raw address.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + offset`, or `None` if that wraps.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(raw) => Some(Self(raw)),
            None => None,
        }
    }

    /// `self - base`, or `None` if `base` is above `self`.
    pub const fn checked_offset_from(self, base: Iova) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Whether the address is a multiple of `align` (`align` must be non-zero).
    pub const fn is_aligned(self, align: u64) -> bool {
        align != 0 && self.0 % align == 0
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// One IOVA range backed by a range of a region.
#[derive(Debug)]
struct Mapping {
    /// First IOVA.
    start: u64,
    /// Length in bytes (non-zero; `start + len` does not wrap).
    len: u64,
    region: Arc<SharedRegion>,
    /// Offset of `start` in `region`.
    offset: u64,
}

impl Mapping {
    fn end(&self) -> u64 {
        // Checked when the mapping was made.
        self.start.saturating_add(self.len)
    }
}

/// The device's IOVA space: non-overlapping, page-aligned mappings kept sorted by IOVA,
/// looked up by binary search.
#[derive(Debug, Default)]
pub struct DmaSpace {
    maps: Vec<Mapping>,
}

impl DmaSpace {
    /// An empty space: every access faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of mappings.
    pub fn mapping_count(&self) -> usize {
        self.maps.len()
    }

    /// Maps `len` bytes of `region` starting at `offset` at `iova`.
    ///
    /// `iova`, `offset` and `len` must be multiples of [`IOMMU_PAGE_SIZE`], `len`
    /// non-zero, the range must lie inside `region` and must not overlap a mapping.
    pub fn map(
        &mut self,
        iova: Iova,
        region: Arc<SharedRegion>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let bad = || Error::DmaBadMapping { iova, offset, len };
        let aligned = iova.is_aligned(IOMMU_PAGE_SIZE)
            && offset % IOMMU_PAGE_SIZE == 0
            && len % IOMMU_PAGE_SIZE == 0
            && len != 0;
        if !aligned {
            return Err(bad());
        }
        let end = iova.raw().checked_add(len).ok_or_else(bad)?;
        let fits = offset
            .checked_add(len)
            .is_some_and(|region_end| region_end <= region.size());
        if !fits {
            return Err(bad());
        }
        let idx = self.maps.partition_point(|m| m.start < iova.raw());
        let overlaps_prev = idx
            .checked_sub(1)
            .and_then(|p| self.maps.get(p))
            .is_some_and(|m| m.end() > iova.raw());
        let overlaps_next = self.maps.get(idx).is_some_and(|m| m.start < end);
        if overlaps_prev || overlaps_next {
            return Err(Error::DmaOverlap { iova, len });
        }
        self.maps.insert(
            idx,
            Mapping {
                start: iova.raw(),
                len,
                region,
                offset,
            },
        );
        Ok(())
    }

    /// Removes every mapping inside `[iova, iova + len)` and returns how many bytes were
    /// unmapped (0 if none). Fails without change if a mapping straddles either end of the
    /// range: mappings are removed whole, as with VFIO type1v2.
    pub fn unmap(&mut self, iova: Iova, len: u64) -> Result<u64> {
        let end = iova
            .raw()
            .checked_add(len)
            .ok_or(Error::DmaPartialUnmap { iova, len })?;
        let first = self.maps.partition_point(|m| m.end() <= iova.raw());
        let last = self.maps.partition_point(|m| m.start < end);
        if first >= last {
            return Ok(0);
        }
        let straddles = self.maps[first..last]
            .iter()
            .any(|m| m.start < iova.raw() || m.end() > end);
        if straddles {
            return Err(Error::DmaPartialUnmap { iova, len });
        }
        Ok(self.maps.drain(first..last).map(|m| m.len).sum())
    }

    /// Translates `len` bytes at `iova` into a region and an offset in it. Fails with
    /// [`Error::DmaFault`] unless all of them lie in one mapping (a zero-length access
    /// must still start inside a mapping).
    #[inline]
    pub fn resolve(&self, iova: Iova, len: u64) -> Result<(&Arc<SharedRegion>, u64)> {
        let fault = || Error::DmaFault { iova, len };
        let idx = self.maps.partition_point(|m| m.start <= iova.raw());
        let m = idx
            .checked_sub(1)
            .and_then(|i| self.maps.get(i))
            .ok_or_else(fault)?;
        let rel = iova.raw() - m.start; // m.start <= iova by the partition
        let fits = if len == 0 {
            rel < m.len
        } else {
            rel.checked_add(len).is_some_and(|e| e <= m.len)
        };
        if !fits {
            return Err(fault());
        }
        // `m.offset + rel < m.offset + m.len <= region.size()`, checked by `map`.
        Ok((&m.region, m.offset + rel))
    }

    #[inline]
    fn resolve_aligned(&self, iova: Iova, len: u64) -> Result<(&Arc<SharedRegion>, u64)> {
        if !iova.is_aligned(len) {
            return Err(Error::Misaligned {
                offset: iova.raw(),
                align: len,
            });
        }
        self.resolve(iova, len)
    }

    /// Reads the little-endian `u32` at `iova` (4-byte aligned).
    #[inline]
    pub fn read_u32(&self, iova: Iova) -> Result<u32> {
        let (r, off) = self.resolve_aligned(iova, 4)?;
        r.read_u32(off)
    }

    /// Writes the little-endian `u32` at `iova` (4-byte aligned).
    #[inline]
    pub fn write_u32(&self, iova: Iova, value: u32) -> Result<()> {
        let (r, off) = self.resolve_aligned(iova, 4)?;
        r.write_u32(off, value)
    }

    /// Reads the little-endian `u64` at `iova` (8-byte aligned).
    #[inline]
    pub fn read_u64(&self, iova: Iova) -> Result<u64> {
        let (r, off) = self.resolve_aligned(iova, 8)?;
        r.read_u64(off)
    }

    /// Writes the little-endian `u64` at `iova` (8-byte aligned).
    #[inline]
    pub fn write_u64(&self, iova: Iova, value: u64) -> Result<()> {
        let (r, off) = self.resolve_aligned(iova, 8)?;
        r.write_u64(off, value)
    }

    /// `Acquire` load of the `u32` at `iova` (a ring index in host memory).
    #[inline]
    pub fn load_u32_acquire(&self, iova: Iova) -> Result<u32> {
        let (r, off) = self.resolve_aligned(iova, 4)?;
        r.load_u32_acquire(off)
    }

    /// `Release` store of the `u32` at `iova` (a ring index in host memory).
    #[inline]
    pub fn store_u32_release(&self, iova: Iova, value: u32) -> Result<()> {
        let (r, off) = self.resolve_aligned(iova, 4)?;
        r.store_u32_release(off, value)
    }

    /// `Acquire` load of the `u64` at `iova`.
    #[inline]
    pub fn load_u64_acquire(&self, iova: Iova) -> Result<u64> {
        let (r, off) = self.resolve_aligned(iova, 8)?;
        r.load_u64_acquire(off)
    }

    /// `Release` store of the `u64` at `iova`.
    #[inline]
    pub fn store_u64_release(&self, iova: Iova, value: u64) -> Result<()> {
        let (r, off) = self.resolve_aligned(iova, 8)?;
        r.store_u64_release(off, value)
    }

    /// DMA read: copies `dst.len()` bytes at `iova` into `dst`.
    #[inline]
    pub fn read_bytes(&self, iova: Iova, dst: &mut [u8]) -> Result<()> {
        let (r, off) = self.resolve(iova, len_u64(dst.len()))?;
        r.read_bytes(off, dst)
    }

    /// DMA write: copies `src` to `iova`.
    #[inline]
    pub fn write_bytes(&self, iova: Iova, src: &[u8]) -> Result<()> {
        let (r, off) = self.resolve(iova, len_u64(src.len()))?;
        r.write_bytes(off, src)
    }

    /// DMA write of `len` copies of `byte` at `iova`.
    #[inline]
    pub fn fill(&self, iova: Iova, len: u64, byte: u8) -> Result<()> {
        let (r, off) = self.resolve(iova, len)?;
        r.fill(off, len, byte)
    }
}

#[inline]
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = IOMMU_PAGE_SIZE;

    fn region(pages: u64) -> Arc<SharedRegion> {
        let size = (pages * P).next_multiple_of(crate::mem::page_size());
        Arc::new(SharedRegion::create_memfd("dma", size).expect("memfd"))
    }

    #[test]
    fn iova_arithmetic_is_checked() {
        assert_eq!(Iova::new(10).checked_add(5), Some(Iova::new(15)));
        assert_eq!(Iova::new(u64::MAX).checked_add(1), None);
        assert_eq!(Iova::new(10).checked_offset_from(Iova::new(4)), Some(6));
        assert_eq!(Iova::new(4).checked_offset_from(Iova::new(10)), None);
        assert!(!Iova::new(8).is_aligned(0));
        assert_eq!(Iova::new(0x1000).to_string(), "0x1000");
    }

    #[test]
    fn access_through_mapping_reaches_region() {
        let r = region(4);
        let mut s = DmaSpace::new();
        s.map(Iova::new(0x10_0000), Arc::clone(&r), P, 2 * P)
            .expect("map");
        s.write_u32(Iova::new(0x10_0004), 0xabcd).expect("write");
        assert_eq!(r.read_u32(P + 4).expect("region"), 0xabcd);
        r.write_u64(2 * P + 8, 77).expect("region");
        assert_eq!(s.read_u64(Iova::new(0x10_0000 + P + 8)).expect("read"), 77);
        s.write_bytes(Iova::new(0x10_0010), b"abc").expect("bytes");
        let mut b = [0u8; 3];
        s.read_bytes(Iova::new(0x10_0010), &mut b).expect("bytes");
        assert_eq!(&b, b"abc");
        s.store_u32_release(Iova::new(0x10_0020), 9).expect("store");
        assert_eq!(s.load_u32_acquire(Iova::new(0x10_0020)).expect("load"), 9);
        s.fill(Iova::new(0x10_0010), 3, 0).expect("fill");
        s.read_bytes(Iova::new(0x10_0010), &mut b).expect("bytes");
        assert_eq!(b, [0; 3]);
    }

    #[test]
    fn faults_on_unmapped_and_crossing_accesses() {
        let r = region(4);
        let mut s = DmaSpace::new();
        let base = Iova::new(0x20_0000);
        s.map(base, Arc::clone(&r), 0, P).expect("map a");
        let next = base.checked_add(P).expect("iova");
        s.map(next, Arc::clone(&r), P, P).expect("map b");
        // Before, after, and across the two adjacent mappings.
        assert!(matches!(
            s.read_u32(Iova::new(0x1f_fffc)),
            Err(Error::DmaFault { len: 4, .. })
        ));
        assert!(matches!(
            s.read_u32(Iova::new(0x20_0000 + 2 * P)),
            Err(Error::DmaFault { .. })
        ));
        let mut b = [0u8; 8];
        assert!(matches!(
            s.read_bytes(Iova::new(0x20_0000 + P - 4), &mut b),
            Err(Error::DmaFault { iova, len: 8 }) if iova.raw() == 0x20_0000 + P - 4
        ));
        assert!(s.read_bytes(Iova::new(0x20_0000 + P - 8), &mut b).is_ok());
        assert!(matches!(
            s.read_u64(Iova::new(0x20_0004)),
            Err(Error::Misaligned { align: 8, .. })
        ));
        assert!(matches!(
            s.read_bytes(Iova::new(u64::MAX), &mut b),
            Err(Error::DmaFault { .. })
        ));
        assert!(matches!(
            DmaSpace::new().read_u32(Iova::new(0)),
            Err(Error::DmaFault { .. })
        ));
    }

    #[test]
    fn map_validates_and_refuses_overlap() {
        let r = region(4);
        let mut s = DmaSpace::new();
        let bad = |s: &mut DmaSpace, iova, off, len| {
            matches!(
                s.map(Iova::new(iova), Arc::clone(&r), off, len),
                Err(Error::DmaBadMapping { .. })
            )
        };
        assert!(bad(&mut s, 0x100, 0, P));
        assert!(bad(&mut s, 0, 0x100, P));
        assert!(bad(&mut s, 0, 0, 0x100));
        assert!(bad(&mut s, 0, 0, 0));
        assert!(bad(&mut s, 0, 0, r.size() + P));
        assert!(bad(&mut s, u64::MAX - P + 1, 0, P));
        s.map(Iova::new(4 * P), Arc::clone(&r), 0, 2 * P)
            .expect("map");
        for (iova, len) in [(3 * P, 2 * P), (5 * P, P), (5 * P, 2 * P), (2 * P, 4 * P)] {
            assert!(
                matches!(
                    s.map(Iova::new(iova), Arc::clone(&r), 0, len),
                    Err(Error::DmaOverlap { .. })
                ),
                "{iova:#x}+{len:#x}"
            );
        }
        s.map(Iova::new(2 * P), Arc::clone(&r), 0, 2 * P)
            .expect("adjacent below");
        s.map(Iova::new(6 * P), Arc::clone(&r), 0, P)
            .expect("adjacent above");
        assert_eq!(s.mapping_count(), 3);
    }

    #[test]
    fn unmap_removes_whole_mappings_only() {
        let r = region(4);
        let mut s = DmaSpace::new();
        s.map(Iova::new(0), Arc::clone(&r), 0, 2 * P).expect("a");
        s.map(Iova::new(4 * P), Arc::clone(&r), 0, P).expect("b");
        assert!(matches!(
            s.unmap(Iova::new(P), P),
            Err(Error::DmaPartialUnmap { .. })
        ));
        assert_eq!(s.unmap(Iova::new(10 * P), P).expect("nothing"), 0);
        assert_eq!(s.unmap(Iova::new(0), 8 * P).expect("both"), 3 * P);
        assert_eq!(s.mapping_count(), 0);
        assert!(matches!(
            s.read_u32(Iova::new(0)),
            Err(Error::DmaFault { .. })
        ));
        // The region outlives its mappings.
        assert!(r.read_u32(0).is_ok());
    }
}
