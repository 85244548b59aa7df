//! Access to device memory (a mapped BAR) and DMA memory (host memory the device reads
//! and writes).
//!
//! This is one of the two places in the crate with `unsafe` (the other is the VFIO
//! ioctl layer). The rule it enforces: **no Rust reference (`&`/`&mut`) to device or
//! DMA memory ever exists.** A reference would let the compiler read or write that
//! memory on its own (spurious or merged loads, which on MMIO have side effects, and on
//! DMA memory race with the device). All access is by `ptr::read_volatile` /
//! `ptr::write_volatile` on a raw pointer, after a bounds and alignment check, through
//! safe width-named methods (`read32`, `write32`, ...).
//!
//! A private `Mapping` owns an `mmap`ed range and unmaps it on drop; [`MmioRegion`] and
//! [`DmaMemory`] are built on it.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::error::{DriverError, Result};

/// 4 KiB, the base page size on every platform this driver supports.
pub const PAGE_SIZE_4K: usize = 4096;
/// 2 MiB, the x86-64/aarch64 (4K granule) hugepage size used for DMA memory.
pub const PAGE_SIZE_2M: usize = 2 * 1024 * 1024;

/// An owned `mmap`ed range, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: `Mapping` is an owned address range; nothing about it is tied to the thread
// that created it, and all access goes through raw-pointer volatile operations.
unsafe impl Send for Mapping {}
// SAFETY: shared access only performs volatile reads/writes through raw pointers, which
// are the same operations the device itself performs concurrently; no `&` to the memory
// is ever formed, so there is no aliasing for the compiler to exploit.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Takes ownership of a mapping.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be a live mapping created by `mmap` that nothing else will
    /// `munmap`, and no Rust reference to it may exist or be created afterwards.
    unsafe fn from_raw(ptr: *mut u8, len: usize) -> Result<Self> {
        let addr = ptr.addr();
        let bad = |reason| DriverError::BadMapping { addr, len, reason };
        let ptr = NonNull::new(ptr).ok_or_else(|| bad("null pointer"))?;
        if len == 0 {
            return Err(bad("zero length"));
        }
        if addr % PAGE_SIZE_4K != 0 {
            return Err(bad("not page aligned"));
        }
        if addr.checked_add(len).is_none() {
            return Err(bad("wraps the address space"));
        }
        Ok(Self { ptr, len })
    }

    /// An anonymous private mapping of `len` bytes with extra `flags`.
    fn anonymous(len: usize, extra_flags: libc::c_int, what: &'static str) -> Result<Self> {
        // SAFETY: anonymous mapping at an address the kernel picks; no existing memory
        // is affected. The result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DriverError::Mmap {
                what,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `p` is a fresh mapping of `len` bytes that only this `Mapping` owns.
        unsafe { Self::from_raw(p.cast(), len) }
    }

    /// Checks that `[offset, offset + width)` is inside the mapping and `offset` is
    /// `width`-aligned, and returns the pointer to it.
    fn ptr_at(&self, offset: usize, width: usize) -> Result<*mut u8> {
        if offset % width != 0 {
            return Err(DriverError::Misaligned { offset, width });
        }
        match offset.checked_add(width) {
            Some(end) if end <= self.len => Ok(self.ptr.as_ptr().wrapping_add(offset)),
            _ => Err(DriverError::OutOfBounds {
                offset,
                width,
                len: self.len,
            }),
        }
    }

    /// Checks that `[offset, offset + n)` is inside the mapping.
    fn range_at(&self, offset: usize, n: usize) -> Result<*mut u8> {
        match offset.checked_add(n) {
            Some(end) if end <= self.len => Ok(self.ptr.as_ptr().wrapping_add(offset)),
            _ => Err(DriverError::OutOfBounds {
                offset,
                width: n,
                len: self.len,
            }),
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is a mapping this value owns (see `from_raw`); no
        // reference into it exists, so unmapping cannot leave a dangling reference.
        let _ = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

macro_rules! volatile_rw {
    ($read:ident, $write:ident, $t:ty, $w:literal) => {
        #[doc = concat!("Volatile ", stringify!($w), "-byte read at `offset` (must be ", stringify!($w), "-byte aligned and in bounds).")]
        pub fn $read(&self, offset: usize) -> Result<$t> {
            let p = self.map.ptr_at(offset, $w)?;
            // SAFETY: `ptr_at` checked that `p..p+width` lies inside the live mapping
            // and is aligned for the type; volatile access through a raw pointer forms
            // no reference.
            Ok(unsafe { std::ptr::read_volatile(p.cast::<$t>()) })
        }

        #[doc = concat!("Volatile ", stringify!($w), "-byte write at `offset` (must be ", stringify!($w), "-byte aligned and in bounds).")]
        pub fn $write(&self, offset: usize, value: $t) -> Result<()> {
            let p = self.map.ptr_at(offset, $w)?;
            // SAFETY: as in the read: in bounds, aligned, raw-pointer volatile access.
            unsafe { std::ptr::write_volatile(p.cast::<$t>(), value) };
            Ok(())
        }
    };
}

/// A mapped device MMIO region (a PCI BAR), accessed only through bounds- and
/// alignment-checked volatile 32-bit reads and writes.
///
/// Values are in host byte order, i.e. the CPU's little-endian view of the
/// little-endian PCI register, as the hardware presents it.
#[derive(Debug)]
pub struct MmioRegion {
    map: Mapping,
}

impl MmioRegion {
    /// Wraps a mapping of device memory.
    ///
    /// # Safety
    ///
    /// `ptr..ptr+len` must be a live `mmap` of device (or other) memory that the
    /// returned value alone will `munmap`, and no Rust reference to any of it may
    /// exist or be created for as long as the returned value lives.
    pub unsafe fn from_raw_mapping(ptr: *mut u8, len: usize) -> Result<Self> {
        // SAFETY: the caller guarantees what `Mapping::from_raw` requires.
        let map = unsafe { Mapping::from_raw(ptr, len)? };
        Ok(Self { map })
    }

    /// An MMIO-like region backed by anonymous zeroed memory: for tests and for a
    /// simulator that wants the same access type as real hardware.
    pub fn anonymous(len: usize) -> Result<Self> {
        Ok(Self {
            map: Mapping::anonymous(len, 0, "anonymous MMIO region")?,
        })
    }

    /// Length of the region in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false: a region is at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    volatile_rw!(read32, write32, u32, 4);

    /// Atomically clears `bits` of the 32-bit word at `offset` (W1C emulation) and
    /// returns the old value. Only for a region that is plain shared memory polled by
    /// a device model (a VFIO BAR backed by `ivshmem` in the QEMU guest test,
    /// [`crate::vfio::BarKind::SharedMemory`]); never for a real device BAR, where a
    /// locked read-modify-write has no defined meaning.
    pub fn fetch_and32_shared_memory(&self, offset: usize, bits_to_clear: u32) -> Result<u32> {
        Ok(self
            .map
            .atomic32(offset)?
            .fetch_and(!bits_to_clear, Ordering::AcqRel))
    }
}

/// Whether DMA memory may or must come from 2 MiB hugepages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Try 2 MiB hugepages, fall back to 4 KiB pages when none are reserved.
    #[default]
    Prefer,
    /// Only 2 MiB hugepages; fail if none are available.
    Require,
    /// Only 4 KiB pages.
    Never,
}

/// Host memory for DMA: page-aligned, zeroed, locked (never swapped or migrated while
/// the device might use it), accessed only through bounds-checked volatile methods.
///
/// This type does not map the memory into the IOMMU; `vfio::DmaBuffer` does that.
#[derive(Debug)]
pub struct DmaMemory {
    map: Mapping,
    page_size: usize,
}

impl DmaMemory {
    /// Allocates at least `len` bytes (rounded up to the page size used) of locked DMA
    /// memory, using 2 MiB hugepages as `huge` says.
    pub fn alloc(len: usize, huge: HugePages) -> Result<Self> {
        Self::alloc_with(len, huge, |n| {
            Mapping::anonymous(
                n,
                libc::MAP_HUGETLB | libc::MAP_HUGE_2MB | libc::MAP_POPULATE,
                "DMA memory (2 MiB hugepages)",
            )
        })
    }

    /// `alloc` with the hugepage attempt injectable, so the fallback path is testable on
    /// machines with and without hugepages.
    fn alloc_with(
        len: usize,
        huge: HugePages,
        try_huge: impl FnOnce(usize) -> Result<Mapping>,
    ) -> Result<Self> {
        if len == 0 {
            return Err(DriverError::BadMapping {
                addr: 0,
                len,
                reason: "zero-length DMA allocation",
            });
        }
        let round = |page: usize| {
            len.checked_next_multiple_of(page)
                .ok_or(DriverError::BadMapping {
                    addr: 0,
                    len,
                    reason: "length overflows when rounded to pages",
                })
        };
        let (map, page_size) = match huge {
            HugePages::Never => (Self::small(round(PAGE_SIZE_4K)?)?, PAGE_SIZE_4K),
            HugePages::Require | HugePages::Prefer => {
                let n = round(PAGE_SIZE_2M)?;
                match try_huge(n) {
                    Ok(m) => (m, PAGE_SIZE_2M),
                    Err(DriverError::Mmap { source, .. }) if huge == HugePages::Require => {
                        return Err(DriverError::NoHugepages { len, source });
                    }
                    Err(e) if huge == HugePages::Require => return Err(e),
                    Err(_) => (Self::small(round(PAGE_SIZE_4K)?)?, PAGE_SIZE_4K),
                }
            }
        };
        // SAFETY: `map` is a live mapping we own; mlock only changes its paging state.
        let rc = unsafe { libc::mlock(map.ptr.as_ptr().cast(), map.len) };
        if rc != 0 {
            return Err(DriverError::DmaLock {
                len: map.len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self { map, page_size })
    }

    fn small(n: usize) -> Result<Mapping> {
        Mapping::anonymous(n, libc::MAP_POPULATE, "DMA memory (4 KiB pages)")
    }

    /// Length in bytes (a multiple of [`page_size`](Self::page_size)).
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false: an allocation is at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The page size backing this memory: [`PAGE_SIZE_2M`] or [`PAGE_SIZE_4K`].
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The process virtual address of the first byte, for `VFIO_IOMMU_MAP_DMA` and
    /// `/proc/self/pagemap` look-ups. Dereferencing it is the job of this module only.
    pub(crate) fn as_mut_ptr(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }

    volatile_rw!(read8, write8, u8, 1);
    volatile_rw!(read16, write16, u16, 2);
    volatile_rw!(read32, write32, u32, 4);
    volatile_rw!(read64, write64, u64, 8);

    /// Copies `dst.len()` bytes starting at `offset` out of DMA memory (byte-wise
    /// volatile: the device may be writing concurrently).
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let p = self.map.range_at(offset, dst.len())?;
        for (i, d) in dst.iter_mut().enumerate() {
            // SAFETY: `range_at` checked `p..p+dst.len()` is inside the mapping; `i` is
            // below `dst.len()`; u8 needs no alignment.
            *d = unsafe { std::ptr::read_volatile(p.add(i)) };
        }
        Ok(())
    }

    /// Copies `src` into DMA memory at `offset` (byte-wise volatile).
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
        let p = self.map.range_at(offset, src.len())?;
        for (i, s) in src.iter().enumerate() {
            // SAFETY: as in `read_bytes`.
            unsafe { std::ptr::write_volatile(p.add(i), *s) };
        }
        Ok(())
    }
}

// ---- shared-memory access (simulator BAR, sealed memfd DMA memory) --------------------

impl Mapping {
    /// A `MAP_SHARED` read/write mapping of `len` bytes of `fd` at offset 0.
    fn shared_fd(fd: BorrowedFd<'_>, len: usize, what: &'static str) -> Result<Self> {
        // SAFETY: maps `len` bytes of a file the caller passes; the kernel picks the
        // address, so no existing mapping is affected. The result is checked against
        // MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DriverError::Mmap {
                what,
                len,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `p` is a fresh mapping of `len` bytes that only this `Mapping` owns.
        unsafe { Self::from_raw(p.cast(), len) }
    }

    /// An atomic view of the aligned 32-bit word at `offset`.
    ///
    /// This is the one place that forms a reference into shared memory: an
    /// `&AtomicU32` is sound there because every party (this process, the device
    /// model in another thread or process) accesses the word only atomically, and a
    /// spurious atomic load the compiler might add has no side effect on plain shared
    /// memory. It is never used on a real device BAR (the one VFIO BAR it is used on,
    /// through [`MmioRegion::fetch_and32_shared_memory`], is `ivshmem` shared memory in
    /// the QEMU guest test, whose other accesses are aligned 32-bit volatile ones).
    fn atomic32(&self, offset: usize) -> Result<&AtomicU32> {
        let p = self.ptr_at(offset, 4)?;
        // SAFETY: `ptr_at` checked bounds and 4-byte alignment inside the live mapping,
        // which outlives the returned reference (it borrows `self`); all accesses to
        // this memory by anyone are atomic (see above).
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) })
    }

    /// An atomic view of the aligned 64-bit word at `offset` (see [`Self::atomic32`]).
    fn atomic64(&self, offset: usize) -> Result<&AtomicU64> {
        let p = self.ptr_at(offset, 8)?;
        // SAFETY: as in `atomic32`, with 8-byte alignment checked.
        Ok(unsafe { AtomicU64::from_ptr(p.cast()) })
    }
}

/// A register image in shared memory (the simulator's BAR0): every access is an
/// aligned atomic, as the model expects (docs/device.md section 19).
#[derive(Debug)]
pub struct SharedRegs {
    map: Mapping,
}

impl SharedRegs {
    /// Maps `len` bytes of the register file `fd` (`MAP_SHARED`).
    pub fn map_fd(fd: BorrowedFd<'_>, len: usize) -> Result<Self> {
        Ok(Self {
            map: Mapping::shared_fd(fd, len, "shared-memory BAR")?,
        })
    }

    /// An anonymous register image, for tests.
    pub fn anonymous(len: usize) -> Result<Self> {
        Ok(Self {
            map: Mapping::anonymous(len, 0, "anonymous register image")?,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// 32-bit load with acquire ordering.
    pub fn load32(&self, offset: usize) -> Result<u32> {
        Ok(self.map.atomic32(offset)?.load(Ordering::Acquire))
    }

    /// 32-bit store with release ordering: every earlier memory write (descriptors)
    /// is visible to the model before it sees the register value.
    pub fn store32(&self, offset: usize, value: u32) -> Result<()> {
        self.map.atomic32(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Atomically clears `bits` (W1C emulation on a shared-memory register image).
    pub fn fetch_and32(&self, offset: usize, bits_to_clear: u32) -> Result<u32> {
        Ok(self
            .map
            .atomic32(offset)?
            .fetch_and(!bits_to_clear, Ordering::AcqRel))
    }

    /// One aligned 64-bit load with acquire ordering (`TIMESTAMP` on a shared BAR).
    pub fn load64(&self, offset: usize) -> Result<u64> {
        Ok(self.map.atomic64(offset)?.load(Ordering::Acquire))
    }
}

impl DmaMemory {
    /// Allocates `len` bytes (rounded up to 4 KiB) as a sealed memfd (it can neither
    /// shrink nor grow), mapped `MAP_SHARED` here; the fd is returned so that the
    /// device model can map the same pages (the simulator's IOMMU).
    pub fn memfd(len: usize, name: &str) -> Result<(Self, OwnedFd)> {
        let bad = |reason| DriverError::BadMapping {
            addr: 0,
            len,
            reason,
        };
        if len == 0 {
            return Err(bad("zero-length DMA allocation"));
        }
        let len = len
            .checked_next_multiple_of(PAGE_SIZE_4K)
            .ok_or(bad("length overflows when rounded to pages"))?;
        let cname = std::ffi::CString::new(name).map_err(|_| bad("memfd name has a NUL"))?;
        let memfd_err = |source| DriverError::Memfd { len, source };
        // SAFETY: `cname` is a valid NUL-terminated string; the result is checked.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(memfd_err(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len).map_err(|_| bad("length too large"))?;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(memfd_err(io::Error::last_os_error()));
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain syscall on a descriptor we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(memfd_err(io::Error::last_os_error()));
        }
        let map = Mapping::shared_fd(fd.as_fd(), len, "memfd DMA memory")?;
        Ok((
            Self {
                map,
                page_size: PAGE_SIZE_4K,
            },
            fd,
        ))
    }

    /// Maps the whole of an existing DMA memfd a second time (the device side of a
    /// test double).
    pub fn map_memfd(fd: BorrowedFd<'_>, len: usize) -> Result<Self> {
        Ok(Self {
            map: Mapping::shared_fd(fd, len, "memfd DMA memory (second view)")?,
            page_size: PAGE_SIZE_4K,
        })
    }

    /// 32-bit load with acquire ordering: reads an ownership word (CPL phase, RX/TX
    /// `DD`) so that the entry body read after it is the one the device wrote before.
    pub fn load32_acquire(&self, offset: usize) -> Result<u32> {
        Ok(self.map.atomic32(offset)?.load(Ordering::Acquire))
    }

    /// 32-bit store with release ordering (the device side of an ownership word).
    pub fn store32_release(&self, offset: usize, value: u32) -> Result<()> {
        self.map.atomic32(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Copies `src` into DMA memory at `offset` with 8-byte volatile stores where the
    /// destination is 8-byte aligned (descriptors), byte stores otherwise.
    pub fn write_block(&self, offset: usize, src: &[u8]) -> Result<()> {
        if offset % 8 != 0 || src.len() % 8 != 0 {
            return self.write_bytes(offset, src);
        }
        let p = self.map.range_at(offset, src.len())?;
        for (i, chunk) in src.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            // SAFETY: `range_at` checked `p..p+src.len()` is in the mapping; `p` is
            // 8-aligned (offset and the page-aligned base are), `i * 8 + 8 <= len`.
            unsafe { std::ptr::write_volatile(p.add(i * 8).cast::<u64>(), u64::from_ne_bytes(w)) };
        }
        Ok(())
    }

    /// Copies out of DMA memory at `offset` with 8-byte volatile loads where aligned.
    pub fn read_block(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        if offset % 8 != 0 || dst.len() % 8 != 0 {
            return self.read_bytes(offset, dst);
        }
        let p = self.map.range_at(offset, dst.len())?;
        for (i, chunk) in dst.chunks_exact_mut(8).enumerate() {
            // SAFETY: as in `write_block`.
            let w = unsafe { std::ptr::read_volatile(p.add(i * 8).cast::<u64>()) };
            chunk.copy_from_slice(&w.to_ne_bytes());
        }
        Ok(())
    }

    /// `N` consecutive volatile 8-byte loads starting at `offset` (8-byte aligned),
    /// with one bounds check for all of them: decodes a device-written record in place
    /// (a counter record is 4 words) without copying it into a byte buffer first.
    /// Words are in host order, i.e. little-endian on the hosts this driver supports
    /// (callers decode with `u64::from_le`).
    pub fn read_u64s<const N: usize>(&self, offset: usize) -> Result<[u64; N]> {
        if offset % 8 != 0 {
            return Err(DriverError::Misaligned { offset, width: 8 });
        }
        let p = self.map.range_at(offset, N * 8)?;
        let mut out = [0u64; N];
        for (i, w) in out.iter_mut().enumerate() {
            // SAFETY: `range_at` checked `p..p+N*8` is inside the mapping; `p` is
            // 8-aligned (the offset is, and the mapping starts on a page); `i < N`.
            // Volatile loads through a raw pointer form no reference.
            *w = unsafe { std::ptr::read_volatile(p.add(i * 8).cast::<u64>()) };
        }
        Ok(out)
    }

    /// Fills `[offset, offset + n)` with zero bytes.
    pub fn zero(&self, offset: usize, n: usize) -> Result<()> {
        let p = self.map.range_at(offset, n)?;
        for i in 0..n {
            // SAFETY: `range_at` checked the range; u8 needs no alignment.
            unsafe { std::ptr::write_volatile(p.add(i), 0) };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_memory_w1c_clears_only_the_given_bits() {
        let r = MmioRegion::anonymous(4096).expect("region");
        r.write32(0x60, 0x1F).expect("write");
        assert_eq!(
            r.fetch_and32_shared_memory(0x60, 0x11).expect("clear"),
            0x1F
        );
        assert_eq!(r.read32(0x60).expect("read"), 0x0E);
        assert!(r.fetch_and32_shared_memory(0x62, 1).is_err(), "unaligned");
        assert!(
            r.fetch_and32_shared_memory(4096, 1).is_err(),
            "out of bounds"
        );
    }

    #[test]
    fn mmio_read_write_roundtrip() {
        let r = MmioRegion::anonymous(PAGE_SIZE_4K).expect("anon");
        assert_eq!(r.len(), PAGE_SIZE_4K);
        assert_eq!(r.read32(0).expect("read"), 0);
        r.write32(0x10, 0xdead_beef).expect("write");
        assert_eq!(r.read32(0x10).expect("read"), 0xdead_beef);
        r.write32(PAGE_SIZE_4K - 4, 7).expect("last word");
        assert_eq!(r.read32(PAGE_SIZE_4K - 4).expect("read last"), 7);
    }

    #[test]
    fn mmio_bounds_and_alignment_errors() {
        let r = MmioRegion::anonymous(PAGE_SIZE_4K).expect("anon");
        assert!(matches!(
            r.read32(PAGE_SIZE_4K),
            Err(DriverError::OutOfBounds {
                offset: 4096,
                width: 4,
                len: 4096
            })
        ));
        assert!(matches!(
            r.write32(usize::MAX - 3, 0),
            Err(DriverError::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.read32(2),
            Err(DriverError::Misaligned {
                offset: 2,
                width: 4
            })
        ));
        assert!(matches!(
            r.write32(0x13, 1),
            Err(DriverError::Misaligned { .. })
        ));
    }

    #[test]
    fn from_raw_mapping_rejects_bad_input() {
        // SAFETY: a null pointer is rejected before anything is touched or owned.
        let e = unsafe { MmioRegion::from_raw_mapping(std::ptr::null_mut(), 4096) };
        assert!(matches!(e, Err(DriverError::BadMapping { .. })));
    }

    #[test]
    fn read_u64s_checks_once_and_reads_in_order() {
        let m = DmaMemory::alloc(100, HugePages::Never).expect("alloc");
        for i in 0..4u64 {
            m.write64(64 + usize::try_from(i).expect("i") * 8, 10 + i)
                .expect("w");
        }
        assert_eq!(m.read_u64s::<4>(64).expect("r"), [10, 11, 12, 13]);
        assert!(matches!(
            m.read_u64s::<4>(60),
            Err(DriverError::Misaligned { .. })
        ));
        assert!(matches!(
            m.read_u64s::<4>(PAGE_SIZE_4K - 24),
            Err(DriverError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn dma_small_pages() {
        let m = DmaMemory::alloc(100, HugePages::Never).expect("alloc");
        assert_eq!(m.len(), PAGE_SIZE_4K);
        assert_eq!(m.page_size(), PAGE_SIZE_4K);
        assert_eq!(m.as_mut_ptr().addr() % PAGE_SIZE_4K, 0);
        m.write64(8, 0x0102_0304_0506_0708).expect("w64");
        assert_eq!(m.read64(8).expect("r64"), 0x0102_0304_0506_0708);
        assert_eq!(m.read32(8).expect("r32"), 0x0506_0708);
        m.write_bytes(100, b"hello").expect("wb");
        let mut b = [0u8; 5];
        m.read_bytes(100, &mut b).expect("rb");
        assert_eq!(&b, b"hello");
        assert!(m.read_bytes(PAGE_SIZE_4K - 2, &mut b).is_err());
        assert!(m.read64(4).is_err());
        assert!(DmaMemory::alloc(0, HugePages::Never).is_err());
    }

    #[test]
    fn dma_prefer_falls_back_to_small_pages() {
        let m = DmaMemory::alloc_with(3 * PAGE_SIZE_4K, HugePages::Prefer, |n| {
            Err(DriverError::Mmap {
                what: "test",
                len: n,
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            })
        })
        .expect("fallback");
        assert_eq!(m.page_size(), PAGE_SIZE_4K);
        assert_eq!(m.len(), 3 * PAGE_SIZE_4K);
        m.write32(0, 1).expect("usable");
    }

    #[test]
    fn dma_require_reports_missing_hugepages() {
        let e = DmaMemory::alloc_with(PAGE_SIZE_4K, HugePages::Require, |n| {
            Err(DriverError::Mmap {
                what: "test",
                len: n,
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            })
        });
        let e = e.expect_err("must fail");
        assert!(matches!(e, DriverError::NoHugepages { .. }));
        assert!(e.to_string().contains("nr_hugepages"));
    }

    #[test]
    fn dma_real_prefer_works_on_this_machine() {
        // Hugepages or not, Prefer must give usable memory.
        let m = DmaMemory::alloc(PAGE_SIZE_4K, HugePages::Prefer).expect("alloc");
        assert!(m.page_size() == PAGE_SIZE_4K || m.page_size() == PAGE_SIZE_2M);
        assert_eq!(m.len() % m.page_size(), 0);
        m.write32(m.len() - 4, 42).expect("write");
        assert_eq!(m.read32(m.len() - 4).expect("read"), 42);
    }
}
