//! Interrupts: a small `eventfd` wrapper and the builder of the
//! `struct vfio_irq_set` buffer for `VFIO_DEVICE_SET_IRQS`.
//!
//! ```text
//! struct vfio_irq_set {          // native endian
//!     __u32 argsz;               // 0   total size: 20 + data
//!     __u32 flags;               // 4   VFIO_IRQ_SET_DATA_* | VFIO_IRQ_SET_ACTION_*
//!     __u32 index;               // 8   VFIO_PCI_MSIX_IRQ_INDEX etc.
//!     __u32 start;               // 12  first vector
//!     __u32 count;               // 16  number of vectors
//!     __u8  data[];              // 20  DATA_EVENTFD: count x __s32 fd
//! };
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{DriverError, Result};

/// Size of the fixed part of `struct vfio_irq_set`.
pub const IRQ_SET_HEADER: usize = 20;

/// A Linux `eventfd` (non-blocking, close-on-exec): the kernel signals one per MSI-X
/// vector; read it (or poll it, e.g. with tokio's `AsyncFd`) to consume interrupts.
#[derive(Debug)]
pub struct EventFd {
    file: File,
}

impl EventFd {
    /// Creates a non-blocking eventfd with counter 0.
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd takes no pointers; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(DriverError::EventFd {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self {
            file: File::from(owned),
        })
    }

    /// Wraps an eventfd created elsewhere (e.g. the simulator's interrupt fds) and
    /// makes it non-blocking so that [`read`](Self::read) never blocks.
    pub fn from_owned(fd: OwnedFd) -> Result<Self> {
        // SAFETY: F_GETFL on a descriptor we own; no pointers are passed.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 {
            return Err(DriverError::EventFd {
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: F_SETFL on a descriptor we own; no pointers are passed.
        let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if rc < 0 {
            return Err(DriverError::EventFd {
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file: File::from(fd),
        })
    }

    /// Reads and resets the counter: `Ok(Some(n))` = `n` interrupts since the last
    /// read, `Ok(None)` = none pending.
    pub fn read(&self) -> Result<Option<u64>> {
        let mut b = [0u8; 8];
        match (&self.file).read(&mut b) {
            Ok(8) => Ok(Some(u64::from_ne_bytes(b))),
            Ok(_) => Err(DriverError::EventFd {
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "short eventfd read"),
            }),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(source) => Err(DriverError::EventFd { source }),
        }
    }

    /// Adds `n` to the counter (for tests and loopback: wakes a reader).
    pub fn write(&self, n: u64) -> Result<()> {
        (&self.file)
            .write_all(&n.to_ne_bytes())
            .map_err(|source| DriverError::EventFd { source })
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Builds the `VFIO_DEVICE_SET_IRQS` buffer: the 20-byte header followed by `data`
/// (already encoded). `argsz` covers exactly the header plus `data`.
pub fn build_irq_set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    let total = IRQ_SET_HEADER + data.len();
    let argsz = u32::try_from(total).unwrap_or(u32::MAX);
    let mut buf = Vec::with_capacity(total);
    for v in [argsz, flags, index, start, count] {
        buf.extend_from_slice(&v.to_ne_bytes());
    }
    buf.extend_from_slice(data);
    buf
}

/// The buffer that routes vectors `0..fds.len()` of IRQ `index` to `fds`
/// (`DATA_EVENTFD | ACTION_TRIGGER`).
pub fn irq_set_eventfds(index: u32, fds: &[RawFd]) -> Vec<u8> {
    use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD};
    let data: Vec<u8> = fds.iter().flat_map(|fd| fd.to_ne_bytes()).collect();
    let count = u32::try_from(fds.len()).unwrap_or(u32::MAX);
    build_irq_set(
        VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        count,
        &data,
    )
}

/// The buffer that disables every vector of IRQ `index` (`DATA_NONE |
/// ACTION_TRIGGER`, count 0).
pub fn irq_set_disable(index: u32) -> Vec<u8> {
    use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_NONE};
    build_irq_set(
        VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
        index,
        0,
        0,
        &[],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use vfio_bindings::bindings::vfio::{VFIO_PCI_MSIX_IRQ_INDEX, vfio_irq_set};

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes(b[off..off + 4].try_into().expect("4 bytes"))
    }

    #[test]
    fn header_matches_kernel_struct() {
        assert_eq!(std::mem::size_of::<vfio_irq_set>(), IRQ_SET_HEADER);
        assert_eq!(offset_of!(vfio_irq_set, argsz), 0);
        assert_eq!(offset_of!(vfio_irq_set, flags), 4);
        assert_eq!(offset_of!(vfio_irq_set, index), 8);
        assert_eq!(offset_of!(vfio_irq_set, start), 12);
        assert_eq!(offset_of!(vfio_irq_set, count), 16);
        assert_eq!(offset_of!(vfio_irq_set, data), 20);
    }

    #[test]
    fn eventfd_buffer_layout() {
        let b = irq_set_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, &[10, 11, 0x7fff_0001]);
        assert_eq!(b.len(), 20 + 3 * 4);
        assert_eq!(u32_at(&b, 0), 32, "argsz");
        assert_eq!(u32_at(&b, 4), 4 | 32, "DATA_EVENTFD | ACTION_TRIGGER");
        assert_eq!(u32_at(&b, 8), 2, "MSI-X index");
        assert_eq!(u32_at(&b, 12), 0, "start");
        assert_eq!(u32_at(&b, 16), 3, "count");
        assert_eq!(u32_at(&b, 20), 10);
        assert_eq!(u32_at(&b, 24), 11);
        assert_eq!(u32_at(&b, 28), 0x7fff_0001);
        // Exact bytes on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(
                &b[..24],
                &[
                    32, 0, 0, 0, 36, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 10, 0, 0, 0
                ]
            );
        }
    }

    #[test]
    fn disable_buffer_layout() {
        let b = irq_set_disable(VFIO_PCI_MSIX_IRQ_INDEX);
        assert_eq!(b.len(), 20);
        assert_eq!(u32_at(&b, 0), 20);
        assert_eq!(u32_at(&b, 4), 1 | 32, "DATA_NONE | ACTION_TRIGGER");
        assert_eq!(u32_at(&b, 8), 2);
        assert_eq!(u32_at(&b, 12), 0);
        assert_eq!(u32_at(&b, 16), 0);
    }

    #[test]
    fn eventfd_counts() {
        let e = EventFd::new().expect("eventfd");
        assert_eq!(e.read().expect("read"), None);
        e.write(2).expect("write");
        e.write(3).expect("write");
        assert_eq!(e.read().expect("read"), Some(5));
        assert_eq!(e.read().expect("read"), None);
        assert!(e.as_raw_fd() >= 0);
    }
}
