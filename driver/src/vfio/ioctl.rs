//! The VFIO ioctl layer: request numbers (pinned by golden tests against
//! `include/uapi/linux/vfio.h`) and thin wrappers around `libc::ioctl`.
//!
//! Structures and flag values come from `vfio-bindings` (bindgen output of the kernel
//! header). Every wrapper is safe to call except [`iommu_map_dma`], whose caller must
//! keep the mapped memory alive until it is unmapped.
//!
//! VFIO ioctls are `_IO(VFIO_TYPE, VFIO_BASE + n)`: no size or direction bits, so the
//! number is just `(';' << 8) | (100 + n)`.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap,
    vfio_irq_info, vfio_region_info,
};

use crate::iova::IOMMU_INFO_SIZE;

/// `VFIO_TYPE`, the ioctl type byte (`';'`).
pub const VFIO_TYPE: u32 = b';' as u32;
/// `VFIO_BASE`, the first VFIO ioctl number.
pub const VFIO_BASE: u32 = 100;

const fn io(nr: u32) -> u32 {
    // _IO(type, nr): dir = _IOC_NONE (0), size = 0.
    (VFIO_TYPE << 8) | (VFIO_BASE + nr)
}

/// `VFIO_GET_API_VERSION`.
pub const VFIO_GET_API_VERSION: u32 = io(0);
/// `VFIO_CHECK_EXTENSION`.
pub const VFIO_CHECK_EXTENSION: u32 = io(1);
/// `VFIO_SET_IOMMU`.
pub const VFIO_SET_IOMMU: u32 = io(2);
/// `VFIO_GROUP_GET_STATUS`.
pub const VFIO_GROUP_GET_STATUS: u32 = io(3);
/// `VFIO_GROUP_SET_CONTAINER`.
pub const VFIO_GROUP_SET_CONTAINER: u32 = io(4);
/// `VFIO_GROUP_UNSET_CONTAINER`.
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = io(5);
/// `VFIO_GROUP_GET_DEVICE_FD`.
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = io(6);
/// `VFIO_DEVICE_GET_INFO`.
pub const VFIO_DEVICE_GET_INFO: u32 = io(7);
/// `VFIO_DEVICE_GET_REGION_INFO`.
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = io(8);
/// `VFIO_DEVICE_GET_IRQ_INFO`.
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = io(9);
/// `VFIO_DEVICE_SET_IRQS`.
pub const VFIO_DEVICE_SET_IRQS: u32 = io(10);
/// `VFIO_DEVICE_RESET`.
pub const VFIO_DEVICE_RESET: u32 = io(11);
/// `VFIO_IOMMU_GET_INFO`.
pub const VFIO_IOMMU_GET_INFO: u32 = io(12);
/// `VFIO_IOMMU_MAP_DMA`.
pub const VFIO_IOMMU_MAP_DMA: u32 = io(13);
/// `VFIO_IOMMU_UNMAP_DMA`.
pub const VFIO_IOMMU_UNMAP_DMA: u32 = io(14);

#[cfg(not(target_env = "musl"))]
fn req(nr: u32) -> libc::Ioctl {
    libc::Ioctl::from(nr)
}

#[cfg(target_env = "musl")]
fn req(nr: u32) -> libc::Ioctl {
    // Every VFIO request number is below 0x4000, so it fits musl's `c_int`.
    libc::Ioctl::try_from(nr).unwrap_or(libc::Ioctl::MAX)
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// An ioctl whose argument is a plain integer (or none) that the kernel does not
/// dereference.
fn ioctl_val(fd: &File, nr: u32, arg: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: for the requests used with this helper (GET_API_VERSION, CHECK_EXTENSION,
    // SET_IOMMU, DEVICE_RESET) the argument is an integer, never a pointer, so the
    // kernel reads and writes no user memory; `fd` is a valid open descriptor.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req(nr), arg) })
}

/// An ioctl that reads and/or writes `*arg`.
///
/// # Safety
///
/// `arg` must point to a live, writable buffer that is at least as large as the
/// request's structure *and* as the `argsz` field at its start says (the kernel trusts
/// `argsz` for how much it copies).
unsafe fn ioctl_ptr<T>(fd: &File, nr: u32, arg: *mut T) -> io::Result<libc::c_int> {
    // SAFETY: the caller guarantees `arg` is valid for the size the kernel will access.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), req(nr), arg) })
}

fn argsz<T>() -> u32 {
    u32::try_from(std::mem::size_of::<T>()).unwrap_or(u32::MAX)
}

/// `VFIO_GET_API_VERSION` on the container.
pub fn get_api_version(container: &File) -> io::Result<i32> {
    ioctl_val(container, VFIO_GET_API_VERSION, 0)
}

/// `VFIO_CHECK_EXTENSION` on the container: `true` if `ext` is supported.
pub fn check_extension(container: &File, ext: u32) -> io::Result<bool> {
    Ok(ioctl_val(container, VFIO_CHECK_EXTENSION, libc::c_ulong::from(ext))? > 0)
}

/// `VFIO_SET_IOMMU` on the container.
pub fn set_iommu(container: &File, iommu_type: u32) -> io::Result<()> {
    ioctl_val(container, VFIO_SET_IOMMU, libc::c_ulong::from(iommu_type)).map(drop)
}

/// `VFIO_GROUP_GET_STATUS`: the group's flags (`VFIO_GROUP_FLAGS_*`).
pub fn group_get_status(group: &File) -> io::Result<u32> {
    let mut st = vfio_group_status {
        argsz: argsz::<vfio_group_status>(),
        flags: 0,
    };
    // SAFETY: `st` is a live vfio_group_status whose argsz is its own size.
    unsafe { ioctl_ptr(group, VFIO_GROUP_GET_STATUS, &raw mut st)? };
    Ok(st.flags)
}

/// `VFIO_GROUP_SET_CONTAINER`: attaches the group to the container.
pub fn group_set_container(group: &File, container: &File) -> io::Result<()> {
    let mut fd: RawFd = container.as_raw_fd();
    // SAFETY: the kernel reads one `int` (the container fd) from the pointer.
    unsafe { ioctl_ptr(group, VFIO_GROUP_SET_CONTAINER, &raw mut fd)? };
    Ok(())
}

/// `VFIO_GROUP_UNSET_CONTAINER`.
pub fn group_unset_container(group: &File) -> io::Result<()> {
    // SAFETY: no argument is read for this request.
    check(unsafe { libc::ioctl(group.as_raw_fd(), req(VFIO_GROUP_UNSET_CONTAINER)) }).map(drop)
}

/// `VFIO_GROUP_GET_DEVICE_FD` for the device named `name` (its PCI address).
pub fn group_get_device_fd(group: &File, name: &str) -> io::Result<File> {
    let cname = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in device name"))?;
    // SAFETY: the kernel reads a NUL-terminated string from the pointer; `cname` lives
    // for the duration of the call and is never written.
    let fd = unsafe {
        check(libc::ioctl(
            group.as_raw_fd(),
            req(VFIO_GROUP_GET_DEVICE_FD),
            cname.as_ptr(),
        ))?
    };
    // SAFETY: on success the ioctl returns a new file descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// `VFIO_DEVICE_GET_INFO`.
pub fn device_get_info(device: &File) -> io::Result<vfio_device_info> {
    let mut info = vfio_device_info {
        argsz: argsz::<vfio_device_info>(),
        ..Default::default()
    };
    // SAFETY: `info` is live and as large as its argsz.
    unsafe { ioctl_ptr(device, VFIO_DEVICE_GET_INFO, &raw mut info)? };
    Ok(info)
}

/// `VFIO_DEVICE_GET_REGION_INFO` for region `index` (fixed part only; capabilities are
/// not requested).
pub fn device_get_region_info(device: &File, index: u32) -> io::Result<vfio_region_info> {
    let mut info = vfio_region_info {
        argsz: argsz::<vfio_region_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is live and as large as its argsz; the kernel only copies back
    // argsz bytes, reporting a larger needed size in argsz if caps do not fit.
    unsafe { ioctl_ptr(device, VFIO_DEVICE_GET_REGION_INFO, &raw mut info)? };
    Ok(info)
}

/// `VFIO_DEVICE_GET_IRQ_INFO` for IRQ index `index`.
pub fn device_get_irq_info(device: &File, index: u32) -> io::Result<vfio_irq_info> {
    let mut info = vfio_irq_info {
        argsz: argsz::<vfio_irq_info>(),
        index,
        ..Default::default()
    };
    // SAFETY: `info` is live and as large as its argsz.
    unsafe { ioctl_ptr(device, VFIO_DEVICE_GET_IRQ_INFO, &raw mut info)? };
    Ok(info)
}

/// `VFIO_DEVICE_SET_IRQS` with a buffer built by `irq::build_irq_set`.
pub fn device_set_irqs(device: &File, buf: &[u8]) -> io::Result<()> {
    let declared = buf
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_ne_bytes);
    let fits = declared
        .and_then(|a| usize::try_from(a).ok())
        .is_some_and(|a| a >= 20 && a <= buf.len());
    if !fits {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "vfio_irq_set argsz does not match the buffer",
        ));
    }
    // SAFETY: checked above that the buffer holds at least the fixed 20-byte header and
    // `argsz` bytes; for SET_IRQS the kernel only reads (copy_from_user) argsz bytes, so
    // the const pointer is never written through.
    unsafe { ioctl_ptr(device, VFIO_DEVICE_SET_IRQS, buf.as_ptr().cast_mut())? };
    Ok(())
}

/// `VFIO_DEVICE_RESET`.
pub fn device_reset(device: &File) -> io::Result<()> {
    ioctl_val(device, VFIO_DEVICE_RESET, 0).map(drop)
}

/// `VFIO_IOMMU_GET_INFO`, returning the whole buffer (header plus capability chain) as
/// bytes for `iova::parse_iommu_info`. Asks twice: once for the header, which tells the
/// size needed for the capabilities, then with a buffer that large.
pub fn iommu_get_info(container: &File) -> io::Result<Vec<u8>> {
    let mut size = IOMMU_INFO_SIZE;
    for _ in 0..3 {
        // u64 elements: the kernel struct needs 8-byte alignment.
        let mut buf = vec![0u64; size.div_ceil(8)];
        let bytes = buf.len() * 8;
        let sz = u32::try_from(bytes)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "info too large"))?;
        // argsz is the first u32 of the buffer, in host byte order.
        let mut first = buf[0].to_ne_bytes();
        first[0..4].copy_from_slice(&sz.to_ne_bytes());
        buf[0] = u64::from_ne_bytes(first);
        // SAFETY: `buf` is live, 8-byte aligned and `bytes` long, which is what argsz
        // says; the kernel writes at most argsz bytes.
        unsafe { ioctl_ptr(container, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr())? };
        let out: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let needed = out
            .get(0..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0);
        if needed <= bytes {
            return Ok(out);
        }
        size = needed;
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        "VFIO_IOMMU_GET_INFO kept growing argsz",
    ))
}

/// `VFIO_IOMMU_MAP_DMA` (READ | WRITE) of `size` bytes at `vaddr` to `iova`.
///
/// # Safety
///
/// `vaddr..vaddr+size` must stay mapped in this process, and must be accessed only
/// through raw-pointer volatile operations (never through a Rust reference), until the
/// range is unmapped with [`iommu_unmap_dma`] (or the container is closed): from now on
/// the device may read and write it at any time.
pub unsafe fn iommu_map_dma(container: &File, vaddr: u64, iova: u64, size: u64) -> io::Result<()> {
    use vfio_bindings::bindings::vfio::{VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE};
    let mut map = vfio_iommu_type1_dma_map {
        argsz: argsz::<vfio_iommu_type1_dma_map>(),
        flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
        vaddr,
        iova,
        size,
    };
    // SAFETY: `map` is live and as large as its argsz; the caller upholds the lifetime
    // contract on the memory it describes.
    unsafe { ioctl_ptr(container, VFIO_IOMMU_MAP_DMA, &raw mut map)? };
    Ok(())
}

/// `VFIO_IOMMU_UNMAP_DMA` of `size` bytes at `iova`; returns the number of bytes the
/// kernel reports unmapped.
pub fn iommu_unmap_dma(container: &File, iova: u64, size: u64) -> io::Result<u64> {
    let mut unmap = vfio_iommu_type1_dma_unmap {
        argsz: argsz::<vfio_iommu_type1_dma_unmap>(),
        flags: 0,
        iova,
        size,
        ..Default::default()
    };
    // SAFETY: `unmap` is live and as large as its argsz (flags = 0: no bitmap follows).
    unsafe { ioctl_ptr(container, VFIO_IOMMU_UNMAP_DMA, &raw mut unmap)? };
    Ok(unmap.size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};
    use vfio_bindings::bindings::vfio as b;

    #[test]
    fn ioctl_numbers_match_kernel_header() {
        assert_eq!(VFIO_GET_API_VERSION, 0x3B64);
        assert_eq!(VFIO_CHECK_EXTENSION, 0x3B65);
        assert_eq!(VFIO_SET_IOMMU, 0x3B66);
        assert_eq!(VFIO_GROUP_GET_STATUS, 0x3B67);
        assert_eq!(VFIO_GROUP_SET_CONTAINER, 0x3B68);
        assert_eq!(VFIO_GROUP_UNSET_CONTAINER, 0x3B69);
        assert_eq!(VFIO_GROUP_GET_DEVICE_FD, 0x3B6A);
        assert_eq!(VFIO_DEVICE_GET_INFO, 0x3B6B);
        assert_eq!(VFIO_DEVICE_GET_REGION_INFO, 0x3B6C);
        assert_eq!(VFIO_DEVICE_GET_IRQ_INFO, 0x3B6D);
        assert_eq!(VFIO_DEVICE_SET_IRQS, 0x3B6E);
        assert_eq!(VFIO_DEVICE_RESET, 0x3B6F);
        assert_eq!(VFIO_IOMMU_GET_INFO, 0x3B70);
        assert_eq!(VFIO_IOMMU_MAP_DMA, 0x3B71);
        assert_eq!(VFIO_IOMMU_UNMAP_DMA, 0x3B72);
        assert_eq!(u32::from(b::VFIO_TYPE), VFIO_TYPE);
    }

    #[test]
    fn uapi_constants_and_layouts() {
        assert_eq!(b::VFIO_API_VERSION, 0);
        assert_eq!(b::VFIO_TYPE1_IOMMU, 1);
        assert_eq!(b::VFIO_TYPE1v2_IOMMU, 3);
        assert_eq!(b::VFIO_GROUP_FLAGS_VIABLE, 1);
        assert_eq!(b::VFIO_DEVICE_FLAGS_RESET, 1);
        assert_eq!(b::VFIO_DEVICE_FLAGS_PCI, 2);
        assert_eq!(b::VFIO_PCI_BAR0_REGION_INDEX, 0);
        assert_eq!(b::VFIO_PCI_CONFIG_REGION_INDEX, 7);
        assert_eq!(b::VFIO_PCI_MSIX_IRQ_INDEX, 2);
        assert_eq!(b::VFIO_IRQ_SET_DATA_NONE, 1);
        assert_eq!(b::VFIO_IRQ_SET_DATA_EVENTFD, 4);
        assert_eq!(b::VFIO_IRQ_SET_ACTION_TRIGGER, 32);
        assert_eq!(size_of::<vfio_group_status>(), 8);
        assert_eq!(size_of::<vfio_device_info>(), 24);
        assert_eq!(size_of::<vfio_region_info>(), 32);
        assert_eq!(offset_of!(vfio_region_info, size), 16);
        assert_eq!(offset_of!(vfio_region_info, offset), 24);
        assert_eq!(size_of::<vfio_irq_info>(), 16);
        assert_eq!(size_of::<b::vfio_irq_set>(), 20);
        assert_eq!(size_of::<b::vfio_iommu_type1_info>(), IOMMU_INFO_SIZE);
        assert_eq!(size_of::<vfio_iommu_type1_dma_map>(), 32);
        assert_eq!(size_of::<vfio_iommu_type1_dma_unmap>(), 24);
        assert_eq!(
            u16::try_from(b::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE).ok(),
            Some(crate::iova::VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)
        );
        assert_eq!(b::VFIO_IOMMU_INFO_CAPS, crate::iova::VFIO_IOMMU_INFO_CAPS);
    }

    #[test]
    fn ioctls_on_a_non_vfio_fd_fail_cleanly() {
        let f = tempfile::tempfile().expect("tempfile");
        assert!(get_api_version(&f).is_err());
        assert!(device_get_info(&f).is_err());
        assert!(device_set_irqs(&f, &[0u8; 4]).is_err());
    }
}
