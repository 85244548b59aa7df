//! The AF_XDP port's `unsafe` layer, and the only module of this crate allowed to hold
//! `unsafe` code: like a device driver's DMA module, it owns memory the kernel writes
//! behind the compiler's back (the UMEM) and the raw system calls that have no safe
//! wrapper in `rustix` or `xdpilone` (`bpf(2)`, busy-poll socket options).
//!
//! - [`UmemArea`]: the anonymous, page-aligned mapping registered as the UMEM. No Rust
//!   reference to its bytes is ever formed: frames are copied in and out with raw
//!   pointer copies, bounds-checked against the mapping. Which frame belongs to whom
//!   (kernel through the fill/RX/TX/completion rings, or one queue's free list) is the
//!   safe caller's bookkeeping; a mistake there garbles frame bytes but cannot read or
//!   write outside the mapping.
//! - `bpf(2)`: create the XSKMAP, load the redirect program, insert a socket, attach the
//!   program to an interface with a BPF link (detached by the kernel when the link's
//!   descriptor closes, so also when the process dies).
//! - `setsockopt` for busy polling and borrowing a descriptor `xdpilone` owns.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use super::prog::BpfInsn;

/// The anonymous mapping behind a UMEM (see the module docs).
#[derive(Debug)]
pub(super) struct UmemArea {
    /// Keeps the mapping alive; never dereferenced through a Rust reference after
    /// [`UmemArea::new`].
    _map: memmap2::MmapMut,
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the area is plain memory; every access goes through raw pointer copies whose
// ranges the callers own by the frame bookkeeping (one owner per frame), so sharing the
// pointer between threads adds no aliasing the single-threaded use would not have.
unsafe impl Send for UmemArea {}
// SAFETY: as for `Send`: `&UmemArea` only allows bounds-checked raw copies.
unsafe impl Sync for UmemArea {}

impl UmemArea {
    /// Maps `len` bytes of zeroed, page-aligned anonymous memory.
    pub(super) fn new(len: usize) -> io::Result<Self> {
        let mut map = memmap2::MmapOptions::new().len(len).map_anon()?;
        let base = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| io::Error::other("anonymous mapping at address 0"))?;
        Ok(Self {
            _map: map,
            base,
            len,
        })
    }

    /// The mapping's size in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Registers the area as a UMEM with the kernel.
    pub(super) fn register(&self, config: xdpilone::UmemConfig) -> Result<xdpilone::Umem, i32> {
        let area = NonNull::slice_from_raw_parts(self.base, self.len);
        // SAFETY: `area` is exactly the page-aligned mapping this value owns (memmap2
        // maps anonymous memory page-aligned); the caller keeps the `UmemArea` (in an
        // `Arc`) alive as long as any socket bound to the UMEM, which is what
        // `Umem::new` requires; the length fits `isize` because it was mapped.
        unsafe { xdpilone::Umem::new(config, area) }.map_err(|e| e.get_raw())
    }

    /// The in-bounds range `offset..offset + len`, if any.
    fn range(&self, offset: u64, len: usize) -> Option<usize> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.len).then_some(start)
    }

    /// Copies `dst.len()` bytes at `offset` out of the area; `false` (nothing copied)
    /// when the range is outside the mapping.
    pub(super) fn copy_out(&self, offset: u64, dst: &mut [u8]) -> bool {
        let Some(start) = self.range(offset, dst.len()) else {
            return false;
        };
        // SAFETY: `start..start + dst.len()` lies inside the live mapping (checked
        // above); `dst` is a distinct Rust buffer, so the ranges do not overlap; the
        // frame is owned by user space (taken from the RX ring, not yet back in the fill
        // ring), so the kernel does not write it during the copy.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(start),
                dst.as_mut_ptr(),
                dst.len(),
            );
        }
        true
    }

    /// Copies `src` into the area at `offset`; `false` (nothing copied) when the range
    /// is outside the mapping.
    pub(super) fn copy_in(&self, offset: u64, src: &[u8]) -> bool {
        let Some(start) = self.range(offset, src.len()) else {
            return false;
        };
        // SAFETY: in bounds of the live, writable mapping (checked above); `src` is a
        // distinct Rust buffer; the frame is on the caller's free list, so neither the
        // kernel nor another queue uses it.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.base.as_ptr().add(start), src.len());
        }
        true
    }
}

/// Borrows a descriptor that `owner` keeps open.
pub(super) fn borrow_fd<T>(fd: RawFd, _owner: &T) -> BorrowedFd<'_> {
    // SAFETY: the descriptor belongs to `owner` (an `xdpilone` ring holding its socket
    // in an `Arc`), which the returned lifetime borrows, so it stays open meanwhile.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

const BPF_MAP_CREATE: i32 = 0;
const BPF_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_MAP_UPDATE_ELEM: i32 = 2;
const BPF_MAP_DELETE_ELEM: i32 = 3;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: i32 = 21;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_LOAD: i32 = 5;
const BPF_LINK_CREATE: i32 = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
/// `enum bpf_attach_type`'s `BPF_XDP`.
const BPF_XDP: u32 = 37;

/// `union bpf_attr` for `BPF_MAP_CREATE` (the leading fields; the kernel zero-fills
/// the rest of a shorter attribute).
#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

/// `union bpf_attr` for `BPF_MAP_UPDATE_ELEM`.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr` for `BPF_PROG_LOAD` (up to `expected_attach_type`).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` (the common part).
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

/// `bpf(cmd, attr, sizeof attr)`, returning the new descriptor for commands that make
/// one.
///
/// # Safety
/// `attr` must be the attribute layout the kernel expects for `cmd`, and every pointer
/// stored in it valid for the kernel's access for the duration of the call.
unsafe fn sys_bpf<A>(cmd: i32, attr: &mut A) -> io::Result<i64> {
    let size =
        u32::try_from(size_of::<A>()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    // SAFETY: `attr` is a live, writable buffer of `size` bytes; the caller vouches for
    // its layout and the pointers inside it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr).cast::<c_void>(),
            size,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: i64) -> io::Result<OwnedFd> {
    let raw = RawFd::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `raw` was just returned by a `bpf(2)` command that creates a descriptor,
    // so this process owns it and nothing else will close it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn name16(name: &str) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (o, b) in out.iter_mut().take(15).zip(name.bytes()) {
        *o = b;
    }
    out
}

/// Creates an XSKMAP (`u32` queue index to AF_XDP socket) with `entries` slots.
pub(super) fn xskmap_create(entries: u32) -> io::Result<OwnedFd> {
    let mut attr = MapCreateAttr {
        map_type: BPF_MAP_TYPE_XSKMAP,
        key_size: 4,
        value_size: 4,
        max_entries: entries,
        map_name: name16("ctoff_xsks"),
        ..MapCreateAttr::default()
    };
    // SAFETY: `MapCreateAttr` is the `BPF_MAP_CREATE` layout; it holds no pointers.
    owned(unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }?)
}

/// Stores the AF_XDP socket `xsk` at `queue` in the XSKMAP `map`.
pub(super) fn xskmap_insert(
    map: BorrowedFd<'_>,
    queue: u32,
    xsk: BorrowedFd<'_>,
) -> io::Result<()> {
    let key = queue;
    let value =
        u32::try_from(xsk.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    let mut attr = MapElemAttr {
        map_fd: u32::try_from(map.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        key: std::ptr::from_ref(&key) as u64,
        value: std::ptr::from_ref(&value) as u64,
        flags: 0, // BPF_ANY
        ..MapElemAttr::default()
    };
    // SAFETY: `MapElemAttr` is the `BPF_MAP_UPDATE_ELEM` layout; `key` and `value`
    // point to live 4-byte locals, the map's key and value sizes.
    unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
}

/// A BPF hash map whose keys and values are byte strings of fixed sizes: every call
/// checks the caller's buffers against those sizes, the lengths the kernel copies.
#[derive(Debug)]
pub(super) struct HashMap {
    fd: OwnedFd,
    key_size: usize,
    value_size: usize,
}

impl HashMap {
    /// Creates a preallocated hash map of `entries` entries.
    pub(super) fn create(
        key_size: usize,
        value_size: usize,
        entries: u32,
        name: &str,
    ) -> io::Result<Self> {
        let size =
            |v: usize| u32::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG));
        let mut attr = MapCreateAttr {
            map_type: BPF_MAP_TYPE_HASH,
            key_size: size(key_size)?,
            value_size: size(value_size)?,
            max_entries: entries,
            map_name: name16(name),
            ..MapCreateAttr::default()
        };
        // SAFETY: `MapCreateAttr` is the `BPF_MAP_CREATE` layout; it holds no pointers.
        let fd = owned(unsafe { sys_bpf(BPF_MAP_CREATE, &mut attr) }?)?;
        Ok(Self {
            fd,
            key_size,
            value_size,
        })
    }

    /// The map's descriptor.
    pub(super) fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    fn check(&self, key: &[u8], value: Option<usize>) -> io::Result<u32> {
        if key.len() != self.key_size || value.is_some_and(|v| v != self.value_size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        u32::try_from(self.fd.as_raw_fd()).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))
    }

    /// Inserts or replaces `key` (`BPF_ANY`); `E2BIG` when the map is full.
    pub(super) fn update(&self, key: &[u8], value: &[u8]) -> io::Result<()> {
        let mut attr = MapElemAttr {
            map_fd: self.check(key, Some(value.len()))?,
            key: key.as_ptr() as u64,
            value: value.as_ptr() as u64,
            flags: 0,
            ..MapElemAttr::default()
        };
        // SAFETY: `MapElemAttr` is the `BPF_MAP_UPDATE_ELEM` layout; `key` and `value`
        // are live buffers of exactly the map's key and value sizes (checked), which
        // the kernel only reads.
        unsafe { sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) }.map(drop)
    }

    /// Copies the value of `key` into `value`; `false` when there is none.
    pub(super) fn lookup(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        self.read_elem(BPF_MAP_LOOKUP_ELEM, key, value)
    }

    /// Copies the value of `key` into `value` and deletes it in one step (a program
    /// run cannot update the entry in between); `false` when there was none. Hash maps
    /// support it since Linux 5.14.
    pub(super) fn take(&self, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        self.read_elem(BPF_MAP_LOOKUP_AND_DELETE_ELEM, key, value)
    }

    /// `cmd` (`BPF_MAP_LOOKUP_ELEM` or `BPF_MAP_LOOKUP_AND_DELETE_ELEM`) on `key`,
    /// the value copied into `value`; `false` when there is none.
    fn read_elem(&self, cmd: i32, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
        let mut attr = MapElemAttr {
            map_fd: self.check(key, Some(value.len()))?,
            key: key.as_ptr() as u64,
            value: value.as_mut_ptr() as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: `MapElemAttr` is the layout of both commands; `key` is a live buffer
        // of the key size the kernel reads, `value` a live, exclusively borrowed buffer
        // of the value size (both checked) that the kernel writes.
        match unsafe { sys_bpf(cmd, &mut attr) } {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes `key`; `false` when it was not there. Synchronous: once it returns, no
    /// program run that starts later finds the entry.
    pub(super) fn delete(&self, key: &[u8]) -> io::Result<bool> {
        let mut attr = MapElemAttr {
            map_fd: self.check(key, None)?,
            key: key.as_ptr() as u64,
            ..MapElemAttr::default()
        };
        // SAFETY: `MapElemAttr` is the `BPF_MAP_DELETE_ELEM` layout; `key` is a live
        // buffer of the map's key size (checked), which the kernel only reads.
        match unsafe { sys_bpf(BPF_MAP_DELETE_ELEM, &mut attr) } {
            Ok(_) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Loads an XDP program; on failure the verifier's log is in the error.
pub(super) fn xdp_prog_load(insns: &[BpfInsn], name: &str) -> io::Result<OwnedFd> {
    const LICENSE: &[u8] = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: u32::try_from(insns.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 1,
        log_size: u32::try_from(log.len()).unwrap_or(u32::MAX),
        log_buf: log.as_mut_ptr() as u64,
        prog_name: name16(name),
        expected_attach_type: BPF_XDP,
        ..ProgLoadAttr::default()
    };
    // SAFETY: `ProgLoadAttr` is the `BPF_PROG_LOAD` layout; `insns` (with `insn_cnt`
    // 8-byte `#[repr(C)]` instructions), the NUL-terminated license and the log buffer
    // of `log_size` writable bytes all outlive the call.
    match unsafe { sys_bpf(BPF_PROG_LOAD, &mut attr) } {
        Ok(fd) => owned(fd),
        Err(e) => {
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            Err(io::Error::new(
                e.kind(),
                format!("{e}; verifier log: {}", text.trim()),
            ))
        }
    }
}

/// Attaches XDP program `prog` to interface `ifindex` with a BPF link (`flags`:
/// `XDP_FLAGS_DRV_MODE` or `XDP_FLAGS_SKB_MODE`). The program stays attached while the
/// returned descriptor is open.
pub(super) fn xdp_link_create(
    prog: BorrowedFd<'_>,
    ifindex: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = LinkCreateAttr {
        prog_fd: u32::try_from(prog.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags,
    };
    // SAFETY: `LinkCreateAttr` is the `BPF_LINK_CREATE` layout; it holds no pointers.
    owned(unsafe { sys_bpf(BPF_LINK_CREATE, &mut attr) }?)
}

/// Sets `SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL` (µs) and `SO_BUSY_POLL_BUDGET` on `fd`.
pub(super) fn set_busy_poll(fd: BorrowedFd<'_>, usecs: u32, budget: u32) -> io::Result<()> {
    let set = |opt: i32, value: u32| -> io::Result<()> {
        let v =
            libc::c_int::try_from(value).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: `v` is a live `c_int` and the length says so; `fd` is an open socket.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&v).cast::<c_void>(),
                libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    set(libc::SO_PREFER_BUSY_POLL, 1)?;
    set(libc::SO_BUSY_POLL, usecs)?;
    set(libc::SO_BUSY_POLL_BUDGET, budget)
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use super::*;

    #[test]
    fn bpf_attr_layouts_match_the_kernel() {
        assert_eq!(size_of::<MapCreateAttr>(), 44);
        assert_eq!(std::mem::offset_of!(MapCreateAttr, map_name), 28);
        assert_eq!(size_of::<MapElemAttr>(), 32);
        assert_eq!(std::mem::offset_of!(MapElemAttr, key), 8);
        assert_eq!(std::mem::offset_of!(MapElemAttr, value), 16);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, insns), 8);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, log_buf), 32);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, prog_name), 48);
        assert_eq!(std::mem::offset_of!(ProgLoadAttr, expected_attach_type), 68);
        assert_eq!(size_of::<LinkCreateAttr>(), 16);
    }

    #[test]
    fn the_redirect_program_passes_the_verifier() {
        let map = match xskmap_create(4) {
            Ok(m) => m,
            Err(e) if super::super::bpf_refused_outside_ci(&e) => return,
            Err(e) => panic!("creating an XSKMAP: {e}"),
        };
        let insns = super::super::prog::redirect_program(map.as_raw_fd());
        let prog = xdp_prog_load(&insns, "ctoff_test").expect("verifier accepts the program");
        assert!(prog.as_raw_fd() >= 0);
        // Inserting a descriptor that is not an AF_XDP socket is refused by the kernel.
        let e = xskmap_insert(map.as_fd(), 0, prog.as_fd()).expect_err("not a socket");
        assert!(e.raw_os_error().is_some(), "{e}");
    }

    #[test]
    fn the_flow_program_passes_the_verifier_and_its_map_works() {
        use super::super::flow_prog::{ENTRY_SIZE, KEY_SIZE, flow_program};
        let flows = match HashMap::create(KEY_SIZE, ENTRY_SIZE, 16, "ctoff_test") {
            Ok(m) => m,
            Err(e) if super::super::bpf_refused_outside_ci(&e) => return,
            Err(e) => panic!("creating the flow map: {e}"),
        };
        let xsks = xskmap_create(4).expect("XSKMAP");
        let insns = flow_program(flows.fd().as_raw_fd(), xsks.as_raw_fd());
        let prog = xdp_prog_load(&insns, "ctoff_test").expect("verifier accepts the program");
        assert!(prog.as_raw_fd() >= 0);
        let key = [7u8; KEY_SIZE];
        let mut value = [0u8; ENTRY_SIZE];
        assert!(!flows.lookup(&key, &mut value).expect("lookup"));
        flows.update(&key, &[3u8; ENTRY_SIZE]).expect("insert");
        assert!(flows.lookup(&key, &mut value).expect("lookup"));
        assert_eq!(value, [3u8; ENTRY_SIZE]);
        assert!(flows.delete(&key).expect("delete"));
        assert!(!flows.delete(&key).expect("delete"));
        // Buffers of the wrong size never reach the kernel.
        assert!(flows.update(&key[..4], &value).is_err());
        assert!(flows.lookup(&key, &mut value[..8]).is_err());
    }

    #[test]
    fn umem_copies_stay_in_bounds() {
        let area = UmemArea::new(4096).expect("anonymous mapping");
        assert!(area.copy_in(100, b"frame"));
        let mut out = [0u8; 5];
        assert!(area.copy_out(100, &mut out));
        assert_eq!(&out, b"frame");
        assert!(!area.copy_in(4094, b"abc"));
        assert!(!area.copy_out(u64::MAX, &mut out));
        assert!(area.copy_out(4091, &mut out));
    }
}
