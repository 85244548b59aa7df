//! Shared memory regions: the simulator's BAR and host DMA memory.
//!
//! This is the crate's memory-access module: every `unsafe` block that touches mapped
//! memory lives here, and no Rust reference (`&`/`&mut`) to mapped memory ever leaves
//! it. Everything else reaches a [`SharedRegion`] through safe, bounds-checked,
//! width-named accessors that take a byte offset.
//!
//! Multi-byte values are stored little-endian, as the device's registers and
//! descriptors are, whatever the host's byte order.
//!
//! # Memory model
//!
//! A region is shared with code the compiler cannot see (another process, or the other
//! side of the simulated PCIe link in this process), so it is treated like device
//! memory: scalar accesses are volatile (never elided, merged or invented), ring
//! indices use acquire/release atomics, and payload is copied in and out in bulk. A
//! peer that breaks the ring protocol can make us read stale or torn values, never
//! invalid ones: every bit pattern is a valid integer or byte.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::{Error, Result};

/// Directory in which named regions live.
pub const SHM_DIR: &str = "/dev/shm";

/// Longest accepted region name (bytes).
const MAX_NAME_LEN: usize = 200;

/// The system page size in bytes.
pub fn page_size() -> u64 {
    static PAGE: OnceLock<u64> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a configuration value; it has no memory effects.
        let raw = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(raw).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

/// How a region's memory is backed.
#[derive(Debug)]
enum Backing {
    /// A file in [`SHM_DIR`]; `owner` regions unlink it on drop.
    Shm { path: PathBuf, owner: bool },
    /// An anonymous, size-sealed memfd.
    Memfd,
}

/// A page-aligned shared memory mapping (`MAP_SHARED`), reachable only through
/// bounds-checked accessors.
///
/// Created as a named file in `/dev/shm` (so that another process can attach with
/// [`SharedRegion::open_shm`]) or as an anonymous memfd whose size is sealed (hand its fd
/// to another process and attach with [`SharedRegion::from_memfd`]).
pub struct SharedRegion {
    map: MmapRaw,
    size: u64,
    file: File,
    backing: Backing,
}

// `SharedRegion` is `Send + Sync`, and must stay so: it only holds the base pointer of a
// mapping that lives as long as the value, and every access through `&self` is a
// volatile or atomic access to memory that is designed to be written concurrently by
// other threads and processes (see the module's memory model). No method hands out a
// reference that could alias such a write. `MmapRaw` is `Send + Sync` for the same
// reason; this assertion keeps the property from regressing silently.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SharedRegion>();
};

impl fmt::Debug for SharedRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedRegion")
            .field("base", &self.map.as_ptr())
            .field("size", &self.size)
            .field("backing", &self.backing)
            .finish()
    }
}

fn check_size(size: u64) -> Result<()> {
    let page_size = page_size();
    if size == 0 || size % page_size != 0 || usize::try_from(size).is_err() {
        return Err(Error::BadRegionSize { size, page_size });
    }
    Ok(())
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name.contains(['/', '\0'])
    {
        return Err(Error::BadRegionName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

fn shm_path(name: &str) -> Result<PathBuf> {
    check_name(name)?;
    Ok(Path::new(SHM_DIR).join(name))
}

fn map_file(file: &File, size: u64) -> Result<MmapRaw> {
    let len = usize::try_from(size).map_err(|_| Error::BadRegionSize {
        size,
        page_size: page_size(),
    })?;
    let map = MmapOptions::new()
        .len(len)
        .map_raw(file)
        .map_err(|e| Error::io("mmap", e))?;
    // mmap at file offset 0 returns a page-aligned address; the accessors' alignment
    // reasoning rests on it.
    debug_assert_eq!(map.as_ptr().align_offset(4096), 0);
    Ok(map)
}

impl SharedRegion {
    /// Creates `/dev/shm/<name>` (it must not exist yet) with `size` zeroed bytes and
    /// maps it. The file is removed when this region is dropped; regions that attached
    /// with [`SharedRegion::open_shm`] keep their mapping.
    ///
    /// `size` must be a non-zero multiple of the page size.
    pub fn create_shm(name: &str, size: u64) -> Result<Self> {
        check_size(size)?;
        let path = shm_path(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io("create shared-memory file", e))?;
        // From here on the region owns the file and removes it on drop, also when a
        // later step fails.
        let unlink_on_error = UnlinkGuard(Some(path));
        file.set_len(size)
            .map_err(|e| Error::io("size shared-memory file", e))?;
        let map = map_file(&file, size)?;
        let path = unlink_on_error.disarm();
        Ok(Self {
            map,
            size,
            file,
            backing: Backing::Shm { path, owner: true },
        })
    }

    /// Attaches to an existing `/dev/shm/<name>` created by
    /// [`SharedRegion::create_shm`], typically in another process.
    ///
    /// The creator must not shrink the file while it is mapped: an access past the end
    /// of a shared file mapping raises `SIGBUS`. Use a memfd to rule that out.
    pub fn open_shm(name: &str) -> Result<Self> {
        let path = shm_path(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io("open shared-memory file", e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat shared-memory file", e))?
            .len();
        check_size(size)?;
        let map = map_file(&file, size)?;
        Ok(Self {
            map,
            size,
            file,
            backing: Backing::Shm { path, owner: false },
        })
    }

    /// Creates an anonymous memfd of `size` zeroed bytes, seals its size (no shrink, no
    /// grow, no further seals) and maps it. `name` only labels it in `/proc`.
    pub fn create_memfd(name: &str, size: u64) -> Result<Self> {
        check_size(size)?;
        check_name(name)?;
        let cname = CString::new(name).map_err(|_| Error::BadRegionName {
            name: name.to_owned(),
        })?;
        // SAFETY: `cname` is a valid NUL-terminated string that outlives the call; the
        // flags are valid memfd_create flags.
        let raw = unsafe {
            libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if raw < 0 {
            return Err(Error::last_os("memfd_create"));
        }
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        file.set_len(size).map_err(|e| Error::io("size memfd", e))?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS takes an int argument and only changes the file's seals.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(Error::last_os("seal memfd"));
        }
        let map = map_file(&file, size)?;
        Ok(Self {
            map,
            size,
            file,
            backing: Backing::Memfd,
        })
    }

    /// Maps a memfd received from another process (see [`SharedRegion::as_fd`]). It must
    /// be sealed against shrinking, so that the mapping can never lose its backing.
    pub fn from_memfd(fd: OwnedFd) -> Result<Self> {
        let file = File::from(fd);
        // SAFETY: F_GET_SEALS takes no argument and only reads the file's seals.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 {
            return Err(Error::last_os("read memfd seals"));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(Error::RegionNotSealed);
        }
        let size = file
            .metadata()
            .map_err(|e| Error::io("stat memfd", e))?
            .len();
        check_size(size)?;
        let map = map_file(&file, size)?;
        Ok(Self {
            map,
            size,
            file,
            backing: Backing::Memfd,
        })
    }

    /// Size of the region in bytes (a multiple of the page size).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The `/dev/shm` path of a named region, `None` for a memfd.
    pub fn shm_path(&self) -> Option<&Path> {
        match &self.backing {
            Backing::Shm { path, .. } => Some(path),
            Backing::Memfd => None,
        }
    }

    /// Checks that `len` bytes at `offset` lie inside the region and that `offset` is a
    /// multiple of `align`, and returns a pointer to the first byte.
    ///
    /// The pointer is in bounds of the mapping for `len` bytes and, because the mapping
    /// is page-aligned, aligned to `align` (which must be at most the page size).
    #[inline]
    fn ptr_at(&self, offset: u64, len: u64, align: u64) -> Result<*mut u8> {
        let in_bounds = offset.checked_add(len).is_some_and(|end| end <= self.size);
        if !in_bounds {
            return Err(Error::OutOfBounds {
                offset,
                len,
                size: self.size,
            });
        }
        if offset % align != 0 {
            return Err(Error::Misaligned { offset, align });
        }
        let index = usize::try_from(offset).map_err(|_| Error::OutOfBounds {
            offset,
            len,
            size: self.size,
        })?;
        // `index + len <= size == mapping length`, so this stays inside the mapping.
        Ok(self.map.as_mut_ptr().wrapping_add(index))
    }

    /// Reads the little-endian `u32` at `offset` (volatile, 4-byte aligned).
    #[inline]
    pub fn read_u32(&self, offset: u64) -> Result<u32> {
        let p = self.ptr_at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: `ptr_at` checked that 4 bytes at `p` lie inside the live mapping
        // (owned by `self`, so it outlives this call) and that `p` is 4-byte aligned (the
        // mapping is page-aligned and `offset` is a multiple of 4). Every bit pattern is
        // a valid `u32`. A volatile read is the access for memory that other parties
        // write behind the compiler's back; no reference is formed.
        Ok(u32::from_le(unsafe { p.read_volatile() }))
    }

    /// Writes `value` little-endian at `offset` (volatile, 4-byte aligned).
    #[inline]
    pub fn write_u32(&self, offset: u64, value: u32) -> Result<()> {
        let p = self.ptr_at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: as in `read_u32`: in bounds of the live, writable (MAP_SHARED,
        // read-write) mapping and aligned; no reference to the memory exists.
        unsafe { p.write_volatile(value.to_le()) };
        Ok(())
    }

    /// Reads the little-endian `u64` at `offset` (volatile, 8-byte aligned).
    #[inline]
    pub fn read_u64(&self, offset: u64) -> Result<u64> {
        let p = self.ptr_at(offset, 8, 8)?.cast::<u64>();
        // SAFETY: `ptr_at` checked that 8 bytes at `p` lie inside the live mapping and
        // that `p` is 8-byte aligned; every bit pattern is a valid `u64`; no reference is
        // formed.
        Ok(u64::from_le(unsafe { p.read_volatile() }))
    }

    /// Writes `value` little-endian at `offset` (volatile, 8-byte aligned).
    #[inline]
    pub fn write_u64(&self, offset: u64, value: u64) -> Result<()> {
        let p = self.ptr_at(offset, 8, 8)?.cast::<u64>();
        // SAFETY: in bounds of the live, writable mapping and 8-byte aligned (checked by
        // `ptr_at`); no reference to the memory exists.
        unsafe { p.write_volatile(value.to_le()) };
        Ok(())
    }

    /// Borrows the `u32` at `offset` as an atomic for one operation.
    #[inline]
    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32> {
        let p = self.ptr_at(offset, 4, 4)?.cast::<u32>();
        // SAFETY: `AtomicU32::from_ptr` needs `p` aligned to 4 (the mapping is
        // page-aligned and `ptr_at` checked `offset % 4 == 0`) and valid for reads and
        // writes for the returned lifetime, which is tied to `&self`: the mapping lives
        // as long as `self`. All concurrent accessors of a ring index use atomics
        // (in-process, through this method; cross-process, through the same atomic
        // instructions on the shared page), so there is no non-atomic race on it. The
        // reference is an `&AtomicU32`, whose contents sit in an `UnsafeCell`, so it does
        // not assert that the memory is unchanging; it never leaves this module.
        Ok(unsafe { AtomicU32::from_ptr(p) })
    }

    /// Borrows the `u64` at `offset` as an atomic for one operation.
    #[inline]
    fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64> {
        let p = self.ptr_at(offset, 8, 8)?.cast::<u64>();
        // SAFETY: as in `atomic_u32`, with 8-byte alignment checked by `ptr_at` (the
        // page-aligned base makes the pointer aligned to `align_of::<AtomicU64>()`).
        Ok(unsafe { AtomicU64::from_ptr(p) })
    }

    /// Loads the little-endian `u32` at `offset` with `Acquire` ordering: reads of the
    /// memory it publishes (ring entries) happen after it.
    #[inline]
    pub fn load_u32_acquire(&self, offset: u64) -> Result<u32> {
        Ok(u32::from_le(
            self.atomic_u32(offset)?.load(Ordering::Acquire),
        ))
    }

    /// Stores `value` little-endian at `offset` with `Release` ordering: writes before it
    /// (ring entries) are visible to whoever acquires the new value.
    #[inline]
    pub fn store_u32_release(&self, offset: u64, value: u32) -> Result<()> {
        self.atomic_u32(offset)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }

    /// Atomically ORs `bits` into the little-endian `u32` at `offset` (`AcqRel`) and
    /// returns the previous value: how the model sets `INT_CAUSE` bits, and how a host on
    /// a shared-memory BAR sets `CTRL.SOFT_RESET`.
    #[inline]
    pub fn fetch_or_u32(&self, offset: u64, bits: u32) -> Result<u32> {
        Ok(u32::from_le(
            self.atomic_u32(offset)?
                .fetch_or(bits.to_le(), Ordering::AcqRel),
        ))
    }

    /// Atomically ANDs `bits` into the little-endian `u32` at `offset` (`AcqRel`) and
    /// returns the previous value: a W1C clear on a shared-memory BAR is
    /// `fetch_and_u32(off, !bits)`.
    #[inline]
    pub fn fetch_and_u32(&self, offset: u64, bits: u32) -> Result<u32> {
        Ok(u32::from_le(
            self.atomic_u32(offset)?
                .fetch_and(bits.to_le(), Ordering::AcqRel),
        ))
    }

    /// Loads the little-endian `u64` at `offset` with `Acquire` ordering.
    #[inline]
    pub fn load_u64_acquire(&self, offset: u64) -> Result<u64> {
        Ok(u64::from_le(
            self.atomic_u64(offset)?.load(Ordering::Acquire),
        ))
    }

    /// Stores `value` little-endian at `offset` with `Release` ordering.
    #[inline]
    pub fn store_u64_release(&self, offset: u64, value: u64) -> Result<()> {
        self.atomic_u64(offset)?
            .store(value.to_le(), Ordering::Release);
        Ok(())
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`.
    #[inline]
    pub fn read_bytes(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let len = dst.len();
        let src = self.ptr_at(offset, len_u64(len), 1)?;
        // SAFETY: `ptr_at` checked that `len` bytes at `src` lie inside the live mapping;
        // `dst` is a valid, exclusive buffer of `len` bytes. They cannot overlap: this
        // module never hands out a reference into a mapping, so safe code cannot own a
        // slice inside one. Bulk payload needs no volatile semantics: the bytes are
        // copied once into private memory and all decisions are taken on the copy, so
        // the compiler cannot re-read or cache shared memory; which bytes are current is
        // ordered by the ring's acquire/release index accesses, and a peer that writes
        // during the copy can only make the copy torn, never invalid (any byte is a valid
        // `u8`).
        unsafe { ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), len) };
        Ok(())
    }

    /// Copies `src` into the region starting at `offset`.
    #[inline]
    pub fn write_bytes(&self, offset: u64, src: &[u8]) -> Result<()> {
        let len = src.len();
        let dst = self.ptr_at(offset, len_u64(len), 1)?;
        // SAFETY: in bounds of the live, writable mapping (checked by `ptr_at`); `src` is
        // a valid buffer of `len` bytes that cannot lie inside a mapping (see
        // `read_bytes`). Publication to the peer is ordered by a later release store of a
        // ring index, so the copy itself need not be volatile.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), dst, len) };
        Ok(())
    }

    /// Sets `len` bytes starting at `offset` to `byte`.
    #[inline]
    pub fn fill(&self, offset: u64, len: u64, byte: u8) -> Result<()> {
        let dst = self.ptr_at(offset, len, 1)?;
        let count = usize::try_from(len).map_err(|_| Error::OutOfBounds {
            offset,
            len,
            size: self.size,
        })?;
        // SAFETY: `ptr_at` checked that `len` bytes at `dst` lie inside the live,
        // writable mapping; no reference to them exists; any byte value is valid.
        unsafe { ptr::write_bytes(dst, byte, count) };
        Ok(())
    }
}

impl AsFd for SharedRegion {
    /// The backing file's descriptor, to pass a memfd to another process.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Drop for SharedRegion {
    fn drop(&mut self) {
        if let Backing::Shm { path, owner: true } = &self.backing {
            // Other processes keep their mappings; only the name goes away. Nothing useful
            // can be done about a failure in a destructor.
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `usize` to `u64`, lossless on every target Rust supports with 64-bit `u64`.
#[inline]
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// Removes a freshly created `/dev/shm` file unless disarmed.
struct UnlinkGuard(Option<PathBuf>);

impl UnlinkGuard {
    fn disarm(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for UnlinkGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn unique(tag: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        format!(
            "ctoffload-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    #[test]
    fn memfd_scalar_round_trip_little_endian() {
        let r = SharedRegion::create_memfd("t", page_size()).expect("memfd");
        r.write_u32(8, 0x1122_3344).expect("write");
        assert_eq!(r.read_u32(8).expect("read"), 0x1122_3344);
        let mut b = [0u8; 4];
        r.read_bytes(8, &mut b).expect("bytes");
        assert_eq!(b, [0x44, 0x33, 0x22, 0x11]);
        r.write_u64(16, 0x0102_0304_0506_0708).expect("write");
        assert_eq!(r.read_u64(16).expect("read"), 0x0102_0304_0506_0708);
        r.store_u32_release(24, 7).expect("store");
        assert_eq!(r.load_u32_acquire(24).expect("load"), 7);
        r.store_u64_release(32, u64::MAX - 1).expect("store");
        assert_eq!(r.load_u64_acquire(32).expect("load"), u64::MAX - 1);
    }

    #[test]
    fn bounds_and_alignment_are_errors() {
        let size = page_size();
        let r = SharedRegion::create_memfd("t", size).expect("memfd");
        assert!(matches!(
            r.read_u32(size),
            Err(Error::OutOfBounds { offset, len: 4, .. }) if offset == size
        ));
        assert!(matches!(r.read_u32(size - 4), Ok(0)));
        assert!(matches!(
            r.read_u64(size - 4),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            r.write_u32(2, 0),
            Err(Error::Misaligned {
                offset: 2,
                align: 4
            })
        ));
        assert!(matches!(
            r.load_u64_acquire(4),
            Err(Error::Misaligned {
                offset: 4,
                align: 8
            })
        ));
        assert!(matches!(
            r.read_u32(u64::MAX - 1),
            Err(Error::OutOfBounds { .. })
        ));
        let mut big = vec![0u8; 16];
        assert!(matches!(
            r.read_bytes(size - 8, &mut big),
            Err(Error::OutOfBounds { len: 16, .. })
        ));
        assert!(r.write_bytes(size - 16, &big).is_ok());
        assert!(matches!(r.fill(1, size, 0), Err(Error::OutOfBounds { .. })));
        // Zero-length accesses at the end are fine, past it are not.
        assert!(r.read_bytes(size, &mut []).is_ok());
        assert!(r.read_bytes(size + 1, &mut []).is_err());
    }

    #[test]
    fn bulk_copy_and_fill() {
        let r = SharedRegion::create_memfd("t", page_size()).expect("memfd");
        r.write_bytes(100, b"hello world").expect("write");
        let mut out = [0u8; 11];
        r.read_bytes(100, &mut out).expect("read");
        assert_eq!(&out, b"hello world");
        r.fill(102, 3, 0xAA).expect("fill");
        r.read_bytes(100, &mut out).expect("read");
        assert_eq!(&out, b"he\xAA\xAA\xAA world");
    }

    #[test]
    fn size_and_name_are_checked() {
        assert!(matches!(
            SharedRegion::create_memfd("t", 0),
            Err(Error::BadRegionSize { .. })
        ));
        assert!(matches!(
            SharedRegion::create_memfd("t", page_size() + 1),
            Err(Error::BadRegionSize { .. })
        ));
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(
                matches!(
                    SharedRegion::create_shm(bad, page_size()),
                    Err(Error::BadRegionName { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn named_region_is_shared_and_removed_by_owner() {
        let name = unique("shm");
        let owner = SharedRegion::create_shm(&name, 2 * page_size()).expect("create");
        assert!(matches!(
            SharedRegion::create_shm(&name, page_size()),
            Err(Error::Io { .. })
        ));
        let peer = SharedRegion::open_shm(&name).expect("open");
        assert_eq!(peer.size(), 2 * page_size());
        owner
            .store_u32_release(page_size(), 0xdead_beef)
            .expect("store");
        assert_eq!(
            peer.load_u32_acquire(page_size()).expect("load"),
            0xdead_beef
        );
        let path = owner.shm_path().expect("named").to_owned();
        drop(peer);
        assert!(path.exists());
        drop(owner);
        assert!(!path.exists());
        assert!(SharedRegion::open_shm(&name).is_err());
    }

    #[test]
    fn memfd_can_be_attached_through_its_fd() {
        let a = SharedRegion::create_memfd("t", page_size()).expect("memfd");
        a.write_u64(0, 42).expect("write");
        let fd = a.as_fd().try_clone_to_owned().expect("dup");
        let b = SharedRegion::from_memfd(fd).expect("attach");
        assert_eq!(b.read_u64(0).expect("read"), 42);
        assert!(b.shm_path().is_none());
    }

    #[test]
    fn unsealed_fd_is_refused() {
        let name = unique("unsealed");
        let owner = SharedRegion::create_shm(&name, page_size()).expect("create");
        let fd = owner.as_fd().try_clone_to_owned().expect("dup");
        // A tmpfs file does not support seals at all; either way it is refused.
        assert!(SharedRegion::from_memfd(fd).is_err());
    }

    #[test]
    fn acquire_release_publishes_between_threads() {
        let r = Arc::new(SharedRegion::create_memfd("t", page_size()).expect("memfd"));
        let producer = {
            let r = Arc::clone(&r);
            std::thread::spawn(move || {
                for i in 1..=1000u32 {
                    r.write_u32(64 + 4 * u64::from(i % 16), i).expect("entry");
                    r.store_u32_release(0, i).expect("index");
                    while r.load_u32_acquire(4).expect("ack") != i {
                        std::hint::spin_loop();
                    }
                }
            })
        };
        let mut seen = 0;
        while seen < 1000 {
            let idx = r.load_u32_acquire(0).expect("index");
            if idx != seen {
                assert_eq!(idx, seen + 1);
                assert_eq!(
                    r.read_u32(64 + 4 * u64::from(idx % 16)).expect("entry"),
                    idx
                );
                seen = idx;
                r.store_u32_release(4, idx).expect("ack");
            }
            std::hint::spin_loop();
        }
        producer.join().expect("producer");
    }
}
