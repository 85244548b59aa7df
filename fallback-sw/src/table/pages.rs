//! Large arrays of plain values, backed by transparent huge pages when the kernel gives
//! them.
//!
//! A table of a million connections reads its index (16 MiB) at random: with 4 KiB
//! pages nearly every lookup also misses the TLB and walks the page tables. A
//! [`PageArray`] of at least one huge page (2 MiB) is an anonymous mapping of whole
//! huge pages advised `MADV_HUGEPAGE` (through `memmap2`, no `unsafe` here; the bytes
//! are viewed as `[T]` by `zerocopy`, so `T` is a plain type that any bytes are a
//! valid value of). Linux aligns an anonymous mapping whose length is a multiple of
//! 2 MiB to 2 MiB, so every page of it can be huge. When the mapping or the advice
//! fails (no THP in the kernel), or the array is smaller, or the caller asks for plain
//! memory, it is an ordinary `Vec`. With THP set to `never` the advised mapping is
//! ordinary 4 KiB pages: the same as the `Vec`. Either way the memory is allocated and
//! written once, here.

use core::ops::{Deref, DerefMut};

use memmap2::{Advice, MmapMut, MmapOptions};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The size of an x86-64 (and arm64 4K-granule) huge page.
pub const HUGE_PAGE: usize = 2 << 20;

/// Where a table's large arrays live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Memory {
    /// Huge pages when the kernel gives them (arrays of 2 MiB and more), else plain.
    #[default]
    HugePages,
    /// The global allocator's memory.
    Plain,
}

/// A fixed-length array of `T`. Dereferences to `[T]`.
#[derive(Debug)]
pub struct PageArray<T> {
    mem: Mem<T>,
    len: usize,
}

#[derive(Debug)]
enum Mem<T> {
    /// An advised anonymous mapping of whole huge pages; the array is its prefix.
    Mapped(MmapMut),
    Plain(Vec<T>),
}

impl<T> PageArray<T>
where
    T: FromBytes + IntoBytes + Immutable + KnownLayout + Copy,
{
    /// `len` copies of `fill`, in the memory `memory` asks for (see the module
    /// documentation for when huge pages are used).
    #[must_use]
    pub fn new(len: usize, fill: T, memory: Memory) -> Self {
        let mapped = match memory {
            Memory::HugePages => Self::mapped(len, fill),
            Memory::Plain => None,
        };
        let mem = mapped.map_or_else(|| Mem::Plain(vec![fill; len]), Mem::Mapped);
        Self { mem, len }
    }

    /// The huge-page mapping of `len` copies of `fill`, when the array is at least one
    /// huge page and the kernel maps and advises it.
    fn mapped(len: usize, fill: T) -> Option<MmapMut> {
        let bytes = len.checked_mul(size_of::<T>())?;
        if bytes < HUGE_PAGE {
            return None;
        }
        let mut map = MmapOptions::new()
            .len(bytes.checked_next_multiple_of(HUGE_PAGE)?)
            .map_anon()
            .ok()?;
        map.advise(Advice::HugePage).ok()?;
        let (cells, _) = <[T]>::mut_from_prefix_with_elems(&mut map, len).ok()?;
        cells.fill(fill);
        Some(map)
    }

    /// Whether the array is in an advised huge-page mapping (whether the kernel backs
    /// it with huge pages is its choice: see `AnonHugePages` in `/proc/self/smaps`).
    #[must_use]
    pub fn is_mapped(&self) -> bool {
        matches!(self.mem, Mem::Mapped(_))
    }

    /// Bytes of memory the array holds (a mapping: whole huge pages).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        match &self.mem {
            Mem::Mapped(map) => map.len(),
            Mem::Plain(v) => v.capacity() * size_of::<T>(),
        }
    }
}

impl<T> Deref for PageArray<T>
where
    T: FromBytes + IntoBytes + Immutable + KnownLayout,
{
    type Target = [T];

    #[inline]
    fn deref(&self) -> &[T] {
        match &self.mem {
            Mem::Plain(v) => v,
            // The mapping was checked to hold `len` elements when it was made: this
            // cannot fail, and would only show an empty array if it did.
            Mem::Mapped(map) => {
                <[T]>::ref_from_prefix_with_elems(map, self.len).map_or(&[], |(cells, _)| cells)
            }
        }
    }
}

impl<T> DerefMut for PageArray<T>
where
    T: FromBytes + IntoBytes + Immutable + KnownLayout,
{
    #[inline]
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.mem {
            Mem::Plain(v) => v,
            Mem::Mapped(map) => {
                <[T]>::mut_from_prefix_with_elems(map, self.len).map_or(&mut [], |(cells, _)| cells)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_arrays_are_plain() {
        let a = PageArray::new(1000, 7u32, Memory::HugePages);
        assert!(!a.is_mapped());
        assert_eq!(a.len(), 1000);
        assert!(a.iter().all(|&v| v == 7));
    }

    #[test]
    fn plain_memory_is_never_mapped() {
        let a = PageArray::new(HUGE_PAGE, u32::MAX, Memory::Plain);
        assert!(!a.is_mapped());
        assert_eq!(a.len(), HUGE_PAGE);
        assert_eq!(a.heap_bytes(), 4 * HUGE_PAGE);
    }

    #[test]
    fn a_large_array_is_a_filled_writable_mapping_of_whole_huge_pages() {
        // 2 MiB and one element more: two huge pages.
        let len = HUGE_PAGE / 4 + 1;
        let mut a = PageArray::new(len, u32::MAX, Memory::HugePages);
        // A Linux kernel with THP maps and advises it.
        if cfg!(target_os = "linux") {
            assert!(a.is_mapped());
            assert_eq!(a.heap_bytes(), 2 * HUGE_PAGE);
        }
        assert_eq!(a.len(), len);
        assert!(a.iter().all(|&v| v == u32::MAX));
        a[0] = 1;
        a[len - 1] = 2;
        assert_eq!(
            (a[0], a[1], a[len - 2], a[len - 1]),
            (1, u32::MAX, u32::MAX, 2)
        );
        assert_eq!(a.get(len), None);
    }
}
