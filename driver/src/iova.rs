//! I/O virtual addresses: the `Iova` newtype, the IOMMU aperture reported by
//! `VFIO_IOMMU_GET_INFO`, and an allocator that hands out aligned, non-overlapping
//! IOVA ranges inside it.
//!
//! No `+`/`-` on [`Iova`]: every offset is added with [`Iova::checked_add`] or
//! [`Iova::try_add`], so an overflow is an error, never a wrapped address.
//!
//! Pure code, no I/O, no `unsafe`.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{DriverError, Result};

/// An I/O virtual address: the address the device uses for DMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Iova(u64);

impl Iova {
    /// Wraps a raw IOVA.
    pub const fn new(raw: u64) -> Self {
        Self(raw)
    }

    /// The raw value, as written into descriptors and registers.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + offset`, or `None` on overflow.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// `self + offset`, or [`DriverError::IovaOverflow`].
    pub fn try_add(self, offset: u64) -> Result<Self> {
        self.checked_add(offset)
            .ok_or(DriverError::IovaOverflow { base: self, offset })
    }

    /// The distance from `base` up to `self`, or `None` if `self < base`.
    pub const fn checked_offset_from(self, base: Iova) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Whether `self` is a multiple of `align` (a power of two).
    pub const fn is_aligned(self, align: u64) -> bool {
        align.is_power_of_two() && self.0 & (align - 1) == 0
    }
}

impl fmt::Display for Iova {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// An inclusive IOVA range `[start, last]`, as the kernel reports apertures.
///
/// Inclusive so that a range ending at `u64::MAX` needs no overflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IovaRange {
    /// First address.
    pub start: Iova,
    /// Last address (inclusive).
    pub last: Iova,
}

impl IovaRange {
    /// The range `[start, start + len - 1]`; `None` if `len == 0` or it overflows.
    pub fn from_start_len(start: Iova, len: u64) -> Option<Self> {
        let last = start.checked_add(len.checked_sub(1)?)?;
        Some(Self { start, last })
    }

    /// Number of bytes, saturating at `u64::MAX` for the full 64-bit space.
    pub fn len(&self) -> u64 {
        (self.last.0 - self.start.0).saturating_add(1)
    }

    /// Always false: a range has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether `other` lies entirely inside `self`.
    pub fn contains_range(&self, other: &IovaRange) -> bool {
        self.start <= other.start && other.last <= self.last
    }

    /// Whether the two ranges share at least one address.
    pub fn overlaps(&self, other: &IovaRange) -> bool {
        self.start <= other.last && other.start <= self.last
    }
}

impl fmt::Display for IovaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}..={}]", self.start, self.last)
    }
}

// ---------------------------------------------------------------------------
// VFIO_IOMMU_GET_INFO buffer parsing
// ---------------------------------------------------------------------------

/// `struct vfio_iommu_type1_info` flag: `iova_pgsizes` is valid.
pub const VFIO_IOMMU_INFO_PGSIZES: u32 = 1 << 0;
/// `struct vfio_iommu_type1_info` flag: `cap_offset` is valid.
pub const VFIO_IOMMU_INFO_CAPS: u32 = 1 << 1;
/// Capability id of `struct vfio_iommu_type1_info_cap_iova_range`.
pub const VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: u16 = 1;

/// Size of `struct vfio_iommu_type1_info` (argsz, flags, iova_pgsizes, cap_offset, pad).
pub const IOMMU_INFO_SIZE: usize = 24;
const CAP_HEADER_SIZE: usize = 8;
const IOVA_RANGE_CAP_FIXED: usize = 16;
const IOVA_RANGE_ENTRY: usize = 16;

/// What `VFIO_IOMMU_GET_INFO` told us, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Raw `flags`.
    pub flags: u32,
    /// Bitmap of supported IOMMU page sizes (valid if `flags` has PGSIZES).
    pub iova_pgsizes: u64,
    /// The valid IOVA ranges, if the kernel reported the IOVA_RANGE capability
    /// (Linux 5.4+). `None` means: not reported, assume a conservative default.
    pub iova_ranges: Option<Vec<IovaRange>>,
}

fn rd_u16(buf: &[u8], off: usize) -> Option<u16> {
    let b = buf.get(off..off.checked_add(2)?)?;
    Some(u16::from_ne_bytes([b[0], b[1]]))
}

fn rd_u32(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off.checked_add(4)?)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn rd_u64(buf: &[u8], off: usize) -> Option<u64> {
    let b: [u8; 8] = buf.get(off..off.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_ne_bytes(b))
}

fn chain_err(offset: usize, reason: &'static str) -> DriverError {
    DriverError::CapabilityChain { offset, reason }
}

/// Parses the buffer filled by `VFIO_IOMMU_GET_INFO` (native endian, as the kernel
/// wrote it): the fixed `vfio_iommu_type1_info` header and, when `VFIO_IOMMU_INFO_CAPS`
/// is set, the capability chain, picking out `VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE`.
///
/// Defends against a hostile or truncated buffer: every offset is bounds-checked, the
/// chain must move forward (no loops), and range entries must have `start <= end`.
pub fn parse_iommu_info(buf: &[u8]) -> Result<IommuInfo> {
    if buf.len() < IOMMU_INFO_SIZE {
        return Err(chain_err(0, "buffer shorter than vfio_iommu_type1_info"));
    }
    let flags = rd_u32(buf, 4).ok_or_else(|| chain_err(4, "truncated flags"))?;
    let iova_pgsizes = rd_u64(buf, 8).ok_or_else(|| chain_err(8, "truncated pgsizes"))?;
    let cap_offset = rd_u32(buf, 16).ok_or_else(|| chain_err(16, "truncated cap_offset"))?;

    let mut iova_ranges = None;
    if flags & VFIO_IOMMU_INFO_CAPS != 0 && cap_offset != 0 {
        let mut off = usize::try_from(cap_offset).map_err(|_| chain_err(16, "cap_offset"))?;
        if off < IOMMU_INFO_SIZE {
            return Err(chain_err(off, "capability overlaps the info header"));
        }
        loop {
            let id = rd_u16(buf, off)
                .ok_or_else(|| chain_err(off, "capability header out of bounds"))?;
            let next = rd_u32(buf, off + 4)
                .ok_or_else(|| chain_err(off, "capability header out of bounds"))?;
            if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE && iova_ranges.is_none() {
                iova_ranges = Some(parse_iova_range_cap(buf, off)?);
            }
            if next == 0 {
                break;
            }
            let next = usize::try_from(next).map_err(|_| chain_err(off, "next offset"))?;
            if next < off + CAP_HEADER_SIZE {
                return Err(chain_err(off, "capability chain does not move forward"));
            }
            off = next;
        }
    }
    Ok(IommuInfo {
        flags,
        iova_pgsizes,
        iova_ranges,
    })
}

fn parse_iova_range_cap(buf: &[u8], off: usize) -> Result<Vec<IovaRange>> {
    let nr = rd_u32(buf, off + CAP_HEADER_SIZE)
        .ok_or_else(|| chain_err(off, "IOVA range capability truncated"))?;
    let nr = usize::try_from(nr).map_err(|_| chain_err(off, "nr_iovas"))?;
    let entries = off + IOVA_RANGE_CAP_FIXED;
    let end = nr
        .checked_mul(IOVA_RANGE_ENTRY)
        .and_then(|n| n.checked_add(entries))
        .ok_or_else(|| chain_err(off, "nr_iovas overflows"))?;
    if end > buf.len() {
        return Err(chain_err(off, "IOVA ranges run past the end of the buffer"));
    }
    let mut out = Vec::with_capacity(nr);
    for i in 0..nr {
        let e = entries + i * IOVA_RANGE_ENTRY;
        let (Some(start), Some(last)) = (rd_u64(buf, e), rd_u64(buf, e + 8)) else {
            return Err(chain_err(e, "IOVA range entry truncated"));
        };
        if start > last {
            return Err(chain_err(e, "IOVA range with start > end"));
        }
        out.push(IovaRange {
            start: Iova(start),
            last: Iova(last),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Allocator
// ---------------------------------------------------------------------------

/// Lowest IOVA the allocator hands out by default: IOVA 0 and the first MiB stay
/// unmapped so that a zeroed descriptor address faults in the IOMMU instead of
/// silently hitting memory.
pub const DEFAULT_MIN_IOVA: u64 = 0x10_0000;

/// Aperture assumed when the kernel does not report IOVA ranges (pre-5.4): 39 bits,
/// the smallest address width of current Intel/AMD IOMMUs.
pub const DEFAULT_APERTURE_LAST: u64 = (1 << 39) - 1;

/// Hands out aligned, non-overlapping IOVA ranges inside a set of valid ranges, with
/// free and reuse (first fit, neighbours coalesced on free).
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    /// Free ranges keyed by start; values are inclusive last addresses.
    free: BTreeMap<u64, u64>,
    /// Allocated ranges keyed by start; values are inclusive last addresses.
    used: BTreeMap<u64, u64>,
    aperture: Vec<IovaRange>,
}

impl IovaAllocator {
    /// An allocator over `ranges`, ignoring addresses below `min_iova`. Overlapping or
    /// adjacent input ranges are merged.
    pub fn new(ranges: &[IovaRange], min_iova: Iova) -> Self {
        let mut sorted: Vec<IovaRange> = ranges
            .iter()
            .filter(|r| r.last >= min_iova)
            .map(|r| IovaRange {
                start: r.start.max(min_iova),
                last: r.last,
            })
            .collect();
        sorted.sort_by_key(|r| r.start);
        let mut merged: Vec<IovaRange> = Vec::new();
        for r in sorted {
            match merged.last_mut() {
                Some(prev) if prev.last.0.saturating_add(1) >= r.start.0 => {
                    prev.last = prev.last.max(r.last);
                }
                _ => merged.push(r),
            }
        }
        let free = merged.iter().map(|r| (r.start.0, r.last.0)).collect();
        Self {
            free,
            used: BTreeMap::new(),
            aperture: merged,
        }
    }

    /// An allocator over what `VFIO_IOMMU_GET_INFO` reported, or the default aperture
    /// `[DEFAULT_MIN_IOVA, DEFAULT_APERTURE_LAST]` when it reported no ranges.
    pub fn from_info(info: &IommuInfo) -> Self {
        let default = [IovaRange {
            start: Iova(0),
            last: Iova(DEFAULT_APERTURE_LAST),
        }];
        let ranges = info.iova_ranges.as_deref().unwrap_or(&default);
        Self::new(ranges, Iova(DEFAULT_MIN_IOVA))
    }

    /// The (merged) ranges this allocator serves.
    pub fn aperture(&self) -> &[IovaRange] {
        &self.aperture
    }

    /// Allocates `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<IovaRange> {
        if len == 0 || !align.is_power_of_two() {
            return Err(DriverError::IovaRequest { len, align });
        }
        let mut found = None;
        for (&start, &last) in &self.free {
            let Some(aligned) = align_up(start, align) else {
                continue;
            };
            let Some(alloc_last) = aligned.checked_add(len - 1) else {
                continue;
            };
            if aligned >= start && alloc_last <= last {
                found = Some((start, last, aligned, alloc_last));
                break;
            }
        }
        let Some((start, last, aligned, alloc_last)) = found else {
            return Err(DriverError::IovaExhausted { len, align });
        };
        self.free.remove(&start);
        if aligned > start {
            self.free.insert(start, aligned - 1);
        }
        if alloc_last < last {
            self.free.insert(alloc_last + 1, last);
        }
        self.used.insert(aligned, alloc_last);
        Ok(IovaRange {
            start: Iova(aligned),
            last: Iova(alloc_last),
        })
    }

    /// Returns the range starting at `start` to the free pool.
    pub fn free(&mut self, start: Iova) -> Result<()> {
        let last = self
            .used
            .remove(&start.0)
            .ok_or(DriverError::IovaNotAllocated { iova: start })?;
        let mut new_start = start.0;
        let mut new_last = last;
        // Coalesce with the free range just below, if adjacent.
        if let Some((&ps, &pl)) = self.free.range(..start.0).next_back() {
            if pl.checked_add(1) == Some(start.0) {
                self.free.remove(&ps);
                new_start = ps;
            }
        }
        // And with the one just above.
        if let Some(next) = last.checked_add(1) {
            if let Some(nl) = self.free.remove(&next) {
                new_last = nl;
            }
        }
        self.free.insert(new_start, new_last);
        Ok(())
    }

    /// Ranges currently allocated, in address order.
    pub fn allocated(&self) -> impl Iterator<Item = IovaRange> + '_ {
        self.used.iter().map(|(&s, &l)| IovaRange {
            start: Iova(s),
            last: Iova(l),
        })
    }
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    Some(v.checked_add(align - 1)? & !(align - 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn info_header(flags: u32, pgsizes: u64, cap_offset: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0u32.to_ne_bytes()); // argsz, patched by callers
        b.extend_from_slice(&flags.to_ne_bytes());
        b.extend_from_slice(&pgsizes.to_ne_bytes());
        b.extend_from_slice(&cap_offset.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        b
    }

    fn cap_header(b: &mut Vec<u8>, id: u16, version: u16, next: u32) {
        b.extend_from_slice(&id.to_ne_bytes());
        b.extend_from_slice(&version.to_ne_bytes());
        b.extend_from_slice(&next.to_ne_bytes());
    }

    fn iova_range_cap(b: &mut Vec<u8>, next: u32, ranges: &[(u64, u64)]) {
        cap_header(b, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, next);
        b.extend_from_slice(&u32::try_from(ranges.len()).unwrap_or(0).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        for &(s, e) in ranges {
            b.extend_from_slice(&s.to_ne_bytes());
            b.extend_from_slice(&e.to_ne_bytes());
        }
    }

    #[test]
    fn iova_checked_arith() {
        let a = Iova::new(0x1000);
        assert_eq!(a.checked_add(0x10), Some(Iova::new(0x1010)));
        assert_eq!(Iova::new(u64::MAX).checked_add(1), None);
        assert!(matches!(
            Iova::new(u64::MAX).try_add(1),
            Err(DriverError::IovaOverflow { .. })
        ));
        assert_eq!(Iova::new(0x1010).checked_offset_from(a), Some(0x10));
        assert_eq!(a.checked_offset_from(Iova::new(0x1010)), None);
        assert!(a.is_aligned(0x1000));
        assert!(!a.is_aligned(0x2000));
        assert_eq!(a.to_string(), "0x1000");
    }

    #[test]
    fn info_without_caps() {
        let b = info_header(VFIO_IOMMU_INFO_PGSIZES, 0x4020_1000, 0);
        let info = parse_iommu_info(&b).expect("parse");
        assert_eq!(info.iova_pgsizes, 0x4020_1000);
        assert_eq!(info.iova_ranges, None);
    }

    #[test]
    fn info_with_iova_range_cap_typical_intel() {
        // Typical x86: everything except the MSI window 0xfee00000-0xfeefffff.
        let mut b = info_header(
            VFIO_IOMMU_INFO_PGSIZES | VFIO_IOMMU_INFO_CAPS,
            0x4020_1000,
            24,
        );
        iova_range_cap(
            &mut b,
            0,
            &[(0, 0xfedf_ffff), (0xfef0_0000, 0x00ff_ffff_ffff)],
        );
        let info = parse_iommu_info(&b).expect("parse");
        let r = info.iova_ranges.expect("ranges");
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].start, Iova::new(0));
        assert_eq!(r[0].last, Iova::new(0xfedf_ffff));
        assert_eq!(r[1].start, Iova::new(0xfef0_0000));
        assert_eq!(r[1].last, Iova::new(0x00ff_ffff_ffff));
    }

    #[test]
    fn info_chain_skips_unknown_caps() {
        // Unknown cap (id 3, DMA_AVAIL: header + u32 avail + pad) first, then IOVA range.
        let mut b = info_header(VFIO_IOMMU_INFO_CAPS, 0, 24);
        cap_header(&mut b, 3, 1, 40);
        b.extend_from_slice(&65535u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        assert_eq!(b.len(), 40);
        iova_range_cap(&mut b, 0, &[(0x1000, 0xffff_ffff)]);
        let info = parse_iommu_info(&b).expect("parse");
        assert_eq!(
            info.iova_ranges,
            Some(vec![IovaRange {
                start: Iova::new(0x1000),
                last: Iova::new(0xffff_ffff)
            }])
        );
    }

    #[test]
    fn info_caps_flag_clear_ignores_offset() {
        let mut b = info_header(0, 0, 24);
        iova_range_cap(&mut b, 0, &[(0, 1)]);
        assert_eq!(parse_iommu_info(&b).expect("parse").iova_ranges, None);
    }

    #[test]
    fn info_malformed_buffers_are_errors() {
        // Too short.
        assert!(parse_iommu_info(&[0u8; 10]).is_err());
        // cap_offset past the end.
        let b = info_header(VFIO_IOMMU_INFO_CAPS, 0, 200);
        assert!(parse_iommu_info(&b).is_err());
        // cap_offset inside the header.
        let b = info_header(VFIO_IOMMU_INFO_CAPS, 0, 8);
        assert!(parse_iommu_info(&b).is_err());
        // Loop: next points to itself.
        let mut b = info_header(VFIO_IOMMU_INFO_CAPS, 0, 24);
        cap_header(&mut b, 9, 1, 24);
        assert!(matches!(
            parse_iommu_info(&b),
            Err(DriverError::CapabilityChain { .. })
        ));
        // nr_iovas larger than the buffer.
        let mut b = info_header(VFIO_IOMMU_INFO_CAPS, 0, 24);
        cap_header(&mut b, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 1, 0);
        b.extend_from_slice(&1000u32.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        assert!(parse_iommu_info(&b).is_err());
        // start > end.
        let mut b = info_header(VFIO_IOMMU_INFO_CAPS, 0, 24);
        iova_range_cap(&mut b, 0, &[(0x2000, 0x1000)]);
        assert!(parse_iommu_info(&b).is_err());
    }

    #[test]
    fn allocator_skips_low_iovas_and_holes() {
        let ranges = [
            IovaRange {
                start: Iova::new(0),
                last: Iova::new(0xfedf_ffff),
            },
            IovaRange {
                start: Iova::new(0xfef0_0000),
                last: Iova::new(0xffff_ffff_ffff),
            },
        ];
        let mut a = IovaAllocator::new(&ranges, Iova::new(DEFAULT_MIN_IOVA));
        let r = a.alloc(0x1000, 0x1000).expect("alloc");
        assert_eq!(r.start, Iova::new(DEFAULT_MIN_IOVA));
        // A 2 MiB-aligned 2 MiB block after it.
        let h = a.alloc(0x20_0000, 0x20_0000).expect("alloc huge");
        assert!(h.start.is_aligned(0x20_0000));
        assert!(!h.overlaps(&r));
        // Never inside the MSI hole.
        let hole = IovaRange {
            start: Iova::new(0xfee0_0000),
            last: Iova::new(0xfeef_ffff),
        };
        let big = a.alloc(0xf000_0000, 0x1000).expect("alloc big");
        assert!(!big.overlaps(&hole));
    }

    #[test]
    fn allocator_free_and_reuse_and_errors() {
        let ranges = [IovaRange::from_start_len(Iova::new(0x10_0000), 0x4000).expect("range")];
        let mut a = IovaAllocator::new(&ranges, Iova::new(0));
        let x = a.alloc(0x1000, 0x1000).expect("x");
        let y = a.alloc(0x1000, 0x1000).expect("y");
        let z = a.alloc(0x2000, 0x1000).expect("z");
        assert!(matches!(
            a.alloc(0x1000, 0x1000),
            Err(DriverError::IovaExhausted { .. })
        ));
        a.free(y.start).expect("free y");
        assert!(matches!(
            a.free(y.start),
            Err(DriverError::IovaNotAllocated { .. })
        ));
        assert_eq!(a.alloc(0x1000, 0x1000).expect("reuse").start, y.start);
        a.free(x.start).expect("free x");
        a.free(y.start).expect("free y again");
        a.free(z.start).expect("free z");
        // Fully coalesced: one allocation of everything fits again.
        assert_eq!(a.alloc(0x4000, 0x1000).expect("all").start, x.start);
        assert!(matches!(
            a.alloc(0, 1),
            Err(DriverError::IovaRequest { .. })
        ));
        assert!(matches!(
            a.alloc(1, 3),
            Err(DriverError::IovaRequest { .. })
        ));
    }

    #[test]
    fn allocator_top_of_address_space() {
        let ranges = [IovaRange {
            start: Iova::new(u64::MAX - 0xfff),
            last: Iova::new(u64::MAX),
        }];
        let mut a = IovaAllocator::new(&ranges, Iova::new(0));
        let r = a.alloc(0x1000, 0x1000).expect("alloc");
        assert_eq!(r.last, Iova::new(u64::MAX));
        assert_eq!(r.len(), 0x1000);
        a.free(r.start).expect("free");
        assert!(a.alloc(0x1000, 0x1000).is_ok());
    }

    #[test]
    fn allocator_merges_overlapping_and_adjacent_ranges() {
        let r = |s: u64, l: u64| IovaRange {
            start: Iova::new(s),
            last: Iova::new(l),
        };
        let a = IovaAllocator::new(
            &[
                r(0x3000, 0x3fff),
                r(0x1000, 0x1fff),
                r(0x2000, 0x27ff),
                r(0x2400, 0x2fff),
            ],
            Iova::new(0x1800),
        );
        assert_eq!(a.aperture(), &[r(0x1800, 0x3fff)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc { len: u64, align_shift: u8 },
        Free { idx: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u64..0x4_0000, 0u8..22).prop_map(|(len, align_shift)| Op::Alloc { len, align_shift }),
            any::<usize>().prop_map(|idx| Op::Free { idx }),
        ]
    }

    proptest! {
        #[test]
        fn allocations_never_overlap_are_aligned_and_in_range(
            raw_ranges in proptest::collection::vec((0u64..0x100_0000, 1u64..0x40_0000), 1..4),
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let ranges: Vec<IovaRange> = raw_ranges
                .iter()
                .filter_map(|&(s, l)| IovaRange::from_start_len(Iova::new(s), l))
                .collect();
            let mut a = IovaAllocator::new(&ranges, Iova::new(0x1000));
            let mut live: Vec<IovaRange> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc { len, align_shift } => {
                        let align = 1u64 << align_shift;
                        if let Ok(r) = a.alloc(len, align) {
                            prop_assert!(r.start.is_aligned(align));
                            prop_assert_eq!(r.len(), len);
                            prop_assert!(r.start >= Iova::new(0x1000));
                            // Inside one merged aperture range (input ranges that
                            // overlap or touch are merged, so a block may span them).
                            prop_assert!(a.aperture().iter().any(|ap| ap.contains_range(&r)));
                            // And each end inside some input range.
                            prop_assert!(ranges.iter().any(|i| i.start <= r.start && r.start <= i.last));
                            prop_assert!(ranges.iter().any(|i| i.start <= r.last && r.last <= i.last));
                            for l in &live {
                                prop_assert!(!l.overlaps(&r), "{} overlaps {}", l, r);
                            }
                            live.push(r);
                        }
                    }
                    Op::Free { idx } => {
                        if !live.is_empty() {
                            let r = live.swap_remove(idx % live.len());
                            prop_assert!(a.free(r.start).is_ok());
                        }
                    }
                }
            }
            // Free everything: the pool returns to the merged aperture.
            for r in live.drain(..) {
                prop_assert!(a.free(r.start).is_ok());
            }
            let free: Vec<(u64, u64)> = a.free.iter().map(|(&s, &l)| (s, l)).collect();
            let ap: Vec<(u64, u64)> = a.aperture().iter().map(|r| (r.start.raw(), r.last.raw())).collect();
            prop_assert_eq!(free, ap);
        }
    }
}
