//! IOVA-as-PA mode: find the physical address of locked memory through
//! `/proc/self/pagemap`.
//!
//! For setups without an IOMMU translation of our own (a QEMU guest test with an
//! emulated device and no vIOMMU, or `vfio-pci` with `enable_unsafe_noiommu_mode`), the
//! device must be given physical addresses. Each pagemap entry is a little 64-bit
//! word per virtual page (Documentation/admin-guide/mm/pagemap.rst):
//!
//! * bit 63: page present
//! * bit 62: page swapped
//! * bits 0-54: page frame number (zero unless the reader has `CAP_SYS_ADMIN`)

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{DriverError, Result};
use crate::iova::Iova;
use crate::mmio::DmaMemory;

const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const PFN_MASK: u64 = (1 << 55) - 1;

/// A decoded pagemap entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// The page is in RAM.
    pub present: bool,
    /// The page is swapped out.
    pub swapped: bool,
    /// Page frame number (0 if hidden from an unprivileged reader).
    pub pfn: u64,
}

/// Decodes one 64-bit pagemap entry.
pub fn parse_pagemap_entry(raw: u64) -> PagemapEntry {
    let present = raw & PRESENT != 0;
    PagemapEntry {
        present,
        swapped: raw & SWAPPED != 0,
        // When swapped, bits 0-54 hold swap type/offset, not a PFN.
        pfn: if present { raw & PFN_MASK } else { 0 },
    }
}

/// The physical address of virtual address `vaddr` in this process, read from the
/// pagemap file at `pagemap` (normally `/proc/self/pagemap`). `page_size` is the base
/// page size (pagemap has one entry per base page even for hugepages).
pub fn virt_to_phys_in(pagemap: &Path, vaddr: usize, page_size: usize) -> Result<u64> {
    let err = |reason, source| DriverError::Pagemap {
        vaddr,
        reason,
        source,
    };
    if page_size == 0 || !page_size.is_power_of_two() {
        return Err(err("page size is not a power of two", None));
    }
    let f = File::open(pagemap).map_err(|e| err("cannot open pagemap", Some(e)))?;
    let index = u64::try_from(vaddr / page_size).map_err(|_| err("address too large", None))?;
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, index * 8)
        .map_err(|e| err("cannot read pagemap entry", Some(e)))?;
    let e = parse_pagemap_entry(u64::from_ne_bytes(b));
    if !e.present {
        return Err(err("page not present (not locked/populated?)", None));
    }
    if e.pfn == 0 {
        return Err(err(
            "PFN hidden: reading physical addresses needs CAP_SYS_ADMIN (run as root)",
            None,
        ));
    }
    let page = u64::try_from(page_size).map_err(|_| err("page size too large", None))?;
    let in_page = u64::try_from(vaddr % page_size).map_err(|_| err("offset", None))?;
    e.pfn
        .checked_mul(page)
        .and_then(|p| p.checked_add(in_page))
        .ok_or_else(|| err("physical address overflows", None))
}

fn base_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096)
}

/// IOVA-as-PA: the physical address of the start of `mem`, as the device must see it
/// when no IOMMU translates for us. Fails unless all of `mem` is physically contiguous
/// (true within one 2 MiB hugepage; not in general for 4 KiB pages).
pub fn dma_memory_phys(mem: &DmaMemory) -> Result<Iova> {
    let path = Path::new("/proc/self/pagemap");
    let page = base_page_size();
    let base_va = mem.as_mut_ptr().addr();
    let base_pa = virt_to_phys_in(path, base_va, page)?;
    let mut off = page;
    while off < mem.len() {
        let pa = virt_to_phys_in(path, base_va + off, page)?;
        let expected = u64::try_from(off).ok().and_then(|o| base_pa.checked_add(o));
        if Some(pa) != expected {
            return Err(DriverError::Pagemap {
                vaddr: base_va + off,
                reason: "memory is not physically contiguous; use 2 MiB hugepages for IOVA-as-PA",
                source: None,
            });
        }
        off += page;
    }
    Ok(Iova::new(base_pa))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_entries() {
        let e = parse_pagemap_entry(PRESENT | 0x12345);
        assert!(e.present);
        assert!(!e.swapped);
        assert_eq!(e.pfn, 0x12345);
        // Bits 55-61 are flags (soft-dirty, exclusive, ...), not PFN.
        let e = parse_pagemap_entry(PRESENT | (1 << 55) | (1 << 61) | PFN_MASK);
        assert_eq!(e.pfn, PFN_MASK);
        let e = parse_pagemap_entry(SWAPPED | 0xabc);
        assert!(!e.present);
        assert!(e.swapped);
        assert_eq!(e.pfn, 0);
        assert_eq!(parse_pagemap_entry(0).pfn, 0);
    }

    #[test]
    fn virt_to_phys_from_fake_pagemap() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("pagemap");
        let mut data = vec![0u8; 8 * 4];
        data[8..16].copy_from_slice(&(PRESENT | 0x1000).to_ne_bytes());
        data[16..24].copy_from_slice(&PRESENT.to_ne_bytes()); // present, PFN hidden
        std::fs::write(&p, &data).expect("write");
        assert_eq!(
            virt_to_phys_in(&p, 4096 + 0x123, 4096).expect("pa"),
            0x1000 * 4096 + 0x123
        );
        let e = virt_to_phys_in(&p, 0, 4096).expect_err("not present");
        assert!(e.to_string().contains("not present"), "{e}");
        let e = virt_to_phys_in(&p, 2 * 4096, 4096).expect_err("hidden");
        assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
        assert!(virt_to_phys_in(&p, 100 * 4096, 4096).is_err());
    }

    #[test]
    fn real_pagemap_on_locked_page() {
        let m = DmaMemory::alloc(4096, crate::mmio::HugePages::Never).expect("alloc");
        match dma_memory_phys(&m) {
            // Root with CAP_SYS_ADMIN: a real, page-aligned physical address.
            Ok(pa) => assert!(pa.is_aligned(4096)),
            // Unprivileged or no procfs: a clear error, not a panic.
            Err(DriverError::Pagemap { .. }) => {}
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
}
