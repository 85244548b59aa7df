//! The packet socket's ring mapping: the only place that touches the memory the kernel
//! shares with us.
//!
//! The kernel writes frames and header words into this memory while we read other
//! parts of it, so it is treated like device memory (see `docs/` and the crate's
//! `mem` module): no Rust reference to it is ever formed outside this module, header
//! words are read and written with volatile or atomic accesses, ownership words
//! (`block_status`, `tp_status`) with `Acquire`/`Release` atomics, and payload is copied
//! in and out in bulk only while we own the block or frame that holds it. Every access
//! is bounds-checked; a kernel (or a bug) that hands us a bad offset gets an error,
//! never an out-of-bounds access.
//!
//! Header words are in the host's byte order (they are the kernel's own structures).

use std::fmt;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

/// A `MAP_SHARED` read-write mapping of a packet socket's rings (RX ring first, then
/// the TX ring, as the kernel lays them out). Unmapped on drop (by `MmapRaw`).
pub struct RingMap {
    map: MmapRaw,
    len: usize,
}

impl fmt::Debug for RingMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RingMap")
            .field("base", &self.map.as_ptr())
            .field("len", &self.len)
            .finish()
    }
}

// `RingMap` is `Send`: it holds the base pointer of a mapping that lives as long as the
// value, and all access goes through `&self`/`&mut self` methods that make volatile,
// atomic or bulk copies (no reference escapes). `MmapRaw` is `Send + Sync` already;
// this keeps the property from regressing silently.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<RingMap>();
};

impl RingMap {
    /// Maps `len` bytes of the rings of the packet socket `fd` (rings already set up
    /// with `PACKET_RX_RING`/`PACKET_TX_RING`).
    pub(crate) fn map_socket(fd: &impl AsRawFd, len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::BadRingConfig {
                reason: "empty ring",
            });
        }
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(fd)
            .map_err(|e| Error::io("mmap packet ring", e))?;
        Ok(Self { map, len })
    }

    /// An anonymous mapping of `len` zeroed bytes, standing in for a kernel ring in
    /// unit tests of the ring walk.
    #[cfg(test)]
    pub(crate) fn anonymous(len: usize) -> Result<Self> {
        let map = MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|e| Error::io("mmap anonymous", e))?;
        Ok(Self {
            map: MmapRaw::from(map),
            len,
        })
    }

    /// A pointer to `len` bytes at `offset`, after checking that they lie inside the
    /// mapping and that `offset` is a multiple of `align` (the mapping is page-aligned,
    /// so the pointer is then aligned too).
    #[inline]
    fn ptr_at(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8> {
        let in_bounds = offset.checked_add(len).is_some_and(|end| end <= self.len);
        if !in_bounds {
            return Err(Error::OutOfBounds {
                offset: u64::try_from(offset).unwrap_or(u64::MAX),
                len: u64::try_from(len).unwrap_or(u64::MAX),
                size: u64::try_from(self.len).unwrap_or(u64::MAX),
            });
        }
        if offset % align != 0 {
            return Err(Error::Misaligned {
                offset: u64::try_from(offset).unwrap_or(u64::MAX),
                align: u64::try_from(align).unwrap_or(u64::MAX),
            });
        }
        // `offset + len <= self.len`, the mapping's length: stays inside the mapping.
        Ok(self.map.as_mut_ptr().wrapping_add(offset))
    }

    /// The `u32` at `offset` as an atomic, for one operation.
    #[inline]
    fn atomic_u32(&self, offset: usize) -> Result<&AtomicU32> {
        let p = self.ptr_at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: `p` is 4-byte aligned and 4 bytes inside the live mapping (checked by
        // `ptr_at`), which lives as long as `&self`, the lifetime of the result. The
        // kernel accesses ownership words with single aligned 32-bit loads and stores
        // (READ_ONCE/WRITE_ONCE with barriers), which do not race with an atomic access
        // at the hardware level. The `&AtomicU32` wraps an `UnsafeCell`, so it does not
        // claim the memory is unchanging, and it never leaves this module.
        Ok(unsafe { AtomicU32::from_ptr(p) })
    }

    /// Loads the ownership word at `offset` with `Acquire`: the reads of the block or
    /// frame it hands over happen after it.
    #[inline]
    pub(crate) fn load_u32_acquire(&self, offset: usize) -> Result<u32> {
        Ok(self.atomic_u32(offset)?.load(Ordering::Acquire))
    }

    /// Stores the ownership word at `offset` with `Release`: every read and write of the
    /// block or frame before it is done before the kernel can see the new owner.
    #[inline]
    pub(crate) fn store_u32_release(&self, offset: usize, value: u32) -> Result<()> {
        self.atomic_u32(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Reads the `u32` header word at `offset` (volatile, 4-byte aligned).
    #[inline]
    pub(crate) fn read_u32(&self, offset: usize) -> Result<u32> {
        let p = self.ptr_at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: in bounds of the live mapping and aligned (checked by `ptr_at`); every
        // bit pattern is a valid `u32`; volatile because the kernel writes this memory
        // behind the compiler's back; no reference is formed.
        Ok(unsafe { p.read_volatile() })
    }

    /// Reads the `u16` header word at `offset` (volatile, 2-byte aligned).
    #[inline]
    pub(crate) fn read_u16(&self, offset: usize) -> Result<u16> {
        let p = self.ptr_at(offset, 2, 2)?.cast::<u16>();
        // SAFETY: as in `read_u32`, with 2-byte alignment checked by `ptr_at`.
        Ok(unsafe { p.read_volatile() })
    }

    /// Writes the `u32` header word at `offset` (volatile, 4-byte aligned).
    #[inline]
    pub(crate) fn write_u32(&self, offset: usize, value: u32) -> Result<()> {
        let p = self.ptr_at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: in bounds of the live, writable (MAP_SHARED, read-write) mapping and
        // aligned (checked by `ptr_at`); no reference to the memory exists.
        unsafe { p.write_volatile(value) };
        Ok(())
    }

    /// Copies `dst.len()` bytes at `offset` out of the mapping. The caller owns the
    /// block or frame (its ownership word was acquired), so the kernel does not write
    /// these bytes meanwhile.
    #[inline]
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let p = self.ptr_at(offset, dst.len(), 1)?;
        // SAFETY: `dst.len()` bytes at `p` lie inside the live mapping (checked by
        // `ptr_at`); `dst` is a distinct Rust buffer, so the ranges do not overlap; u8
        // has no alignment requirement; no reference to the mapping is formed.
        unsafe { std::ptr::copy_nonoverlapping(p.cast_const(), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the mapping at `offset` (a frame the caller owns: its status
    /// says available, and it is handed to the kernel only afterwards, with `Release`).
    #[inline]
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) -> Result<()> {
        let p = self.ptr_at(offset, src.len(), 1)?;
        // SAFETY: `src.len()` bytes at `p` lie inside the live, writable mapping
        // (checked by `ptr_at`); `src` is a distinct Rust buffer; no reference to the
        // mapping is formed.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// Writes `value` at `offset` in a test's stand-in ring.
    #[cfg(test)]
    pub(crate) fn write_u16(&self, offset: usize, value: u16) -> Result<()> {
        let p = self.ptr_at(offset, 2, 2)?.cast::<u16>();
        // SAFETY: in bounds of the live, writable mapping and aligned (checked by
        // `ptr_at`); no reference to the memory exists.
        unsafe { p.write_volatile(value) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_and_alignment_checked() {
        let m = RingMap::anonymous(4096).expect("map");
        m.write_u32(4092, 7).expect("last word");
        assert_eq!(m.read_u32(4092).expect("read"), 7);
        assert!(matches!(m.read_u32(4090), Err(Error::Misaligned { .. })));
        assert!(matches!(m.read_u32(4096), Err(Error::OutOfBounds { .. })));
        assert!(matches!(
            m.copy_out(4000, &mut [0u8; 97]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            m.load_u32_acquire(usize::MAX - 1),
            Err(Error::OutOfBounds { .. })
        ));
        m.copy_in(10, b"abc").expect("copy in");
        let mut out = [0u8; 3];
        m.copy_out(10, &mut out).expect("copy out");
        assert_eq!(&out, b"abc");
        m.store_u32_release(8, 1).expect("store");
        assert_eq!(m.load_u32_acquire(8).expect("load"), 1);
    }
}
