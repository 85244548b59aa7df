//! Interrupts as eventfds, one per MSI-X vector, as VFIO delivers them.
//!
//! The simulated device signals the eventfd; the driver polls or waits on its fd.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{Error, Result};

/// A non-blocking, close-on-exec eventfd.
#[derive(Debug)]
pub struct EventFd {
    // A `File` so that reads and writes go through std's safe wrappers.
    file: File,
}

impl EventFd {
    /// Creates an eventfd with counter 0 (`EFD_NONBLOCK | EFD_CLOEXEC`).
    pub fn new() -> Result<Self> {
        // SAFETY: eventfd takes an initial value and flags and touches no memory of ours.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(Error::last_os("eventfd"));
        }
        // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Self::from_owned_fd(fd))
    }

    /// Wraps an eventfd received from elsewhere (another process, or a clone). It should
    /// be non-blocking, or [`EventFd::try_read`] blocks while the counter is zero.
    pub fn from_owned_fd(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
        }
    }

    /// A second handle on the same eventfd (`dup`), e.g. one for the device, one for the
    /// driver.
    pub fn try_clone(&self) -> Result<Self> {
        let file = self
            .file
            .try_clone()
            .map_err(|e| Error::io("dup eventfd", e))?;
        Ok(Self { file })
    }

    /// Adds 1 to the counter, waking any waiter. A counter already at its maximum stays
    /// signalled, so that case is not an error.
    pub fn signal(&self) -> Result<()> {
        match (&self.file).write(&1u64.to_ne_bytes()) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(Error::io("signal eventfd", e)),
        }
    }

    /// Reads and resets the counter: `Some(count)` if it was signalled, `None` if not.
    pub fn try_read(&self) -> Result<Option<u64>> {
        let mut buf = [0u8; 8];
        loop {
            match (&self.file).read(&mut buf) {
                Ok(8) => return Ok(Some(u64::from_ne_bytes(buf))),
                Ok(n) => {
                    return Err(Error::io(
                        "read eventfd",
                        std::io::Error::new(ErrorKind::UnexpectedEof, format!("{n}-byte read")),
                    ));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("read eventfd", e)),
            }
        }
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(e: EventFd) -> Self {
        e.file.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_reads_none() {
        let e = EventFd::new().expect("eventfd");
        assert_eq!(e.try_read().expect("read"), None);
    }

    #[test]
    fn signals_accumulate_and_reset() {
        let e = EventFd::new().expect("eventfd");
        e.signal().expect("signal");
        e.signal().expect("signal");
        assert_eq!(e.try_read().expect("read"), Some(2));
        assert_eq!(e.try_read().expect("read"), None);
    }

    #[test]
    fn clone_shares_the_counter() {
        let device = EventFd::new().expect("eventfd");
        let driver = device.try_clone().expect("clone");
        assert_ne!(device.as_raw_fd(), driver.as_raw_fd());
        device.signal().expect("signal");
        assert_eq!(driver.try_read().expect("read"), Some(1));
        assert_eq!(device.try_read().expect("read"), None);
    }

    #[test]
    fn wakes_poll() {
        let e = EventFd::new().expect("eventfd");
        let mut pfd = libc::pollfd {
            fd: e.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call; nfds is 1.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 0);
        e.signal().expect("signal");
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut pfd, 1, 0) }, 1);
    }
}
