//! [`FlowTable`]: the BPF hash map the XDP flow program ([`super::flow_prog`]) looks
//! established flows up in, shared by every port of one forwarder. Inserts, deletes and
//! reads are `bpf(2)` calls: synchronous, so a deleted entry is never used by a program
//! run that starts after [`FlowTable::remove`] returns.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::flow_prog::{ENTRY_SIZE, FlowEntry, FlowKey, KEY_SIZE};
use super::sys;

/// The flow map (see the module docs).
#[derive(Debug)]
pub struct FlowTable {
    map: sys::HashMap,
    capacity: u32,
    /// Tests: deletes fail with `EIO`, as a kernel refusing them would.
    #[cfg(test)]
    fail_deletes: std::sync::atomic::AtomicBool,
}

impl FlowTable {
    /// A new, empty table of `capacity` entries (preallocated by the kernel).
    ///
    /// # Errors
    /// The kernel refused the map (no `CAP_BPF`, no memory, `capacity` 0).
    pub fn new(capacity: u32) -> io::Result<Self> {
        Ok(Self {
            map: sys::HashMap::create(KEY_SIZE, ENTRY_SIZE, capacity, "ctoff_flows")?,
            capacity,
            #[cfg(test)]
            fail_deletes: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Entries the table holds at most.
    #[must_use]
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Inserts or replaces the entry of `key`.
    ///
    /// # Errors
    /// `E2BIG` when the table is full, or another `bpf(2)` error.
    pub fn insert(&self, key: &FlowKey, entry: &FlowEntry) -> io::Result<()> {
        self.map.update(&key.to_bytes(), &entry.to_bytes())
    }

    /// Removes the entry of `key`; `false` when there was none.
    ///
    /// # Errors
    /// A `bpf(2)` error.
    pub fn remove(&self, key: &FlowKey) -> io::Result<bool> {
        self.injected_failure()?;
        self.map.delete(&key.to_bytes())
    }

    /// Removes the entry of `key` and returns it with its last counters, in one step:
    /// every packet the program counted in it is in the returned counters.
    ///
    /// # Errors
    /// A `bpf(2)` error (a kernel before 5.14 refuses it for hash maps).
    pub fn take(&self, key: &FlowKey) -> io::Result<Option<FlowEntry>> {
        self.injected_failure()?;
        entry_from(|b| self.map.take(&key.to_bytes(), b))
    }

    /// The entry of `key` with its counters as the program left them.
    ///
    /// # Errors
    /// A `bpf(2)` error.
    pub fn read(&self, key: &FlowKey) -> io::Result<Option<FlowEntry>> {
        entry_from(|b| self.map.lookup(&key.to_bytes(), b))
    }

    /// Tests: from now on deletes fail (`true`) or work again.
    #[cfg(test)]
    pub(crate) fn fail_deletes(&self, fail: bool) {
        self.fail_deletes
            .store(fail, std::sync::atomic::Ordering::Relaxed);
    }

    #[cfg(test)]
    fn injected_failure(&self) -> io::Result<()> {
        if self.fail_deletes.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        Ok(())
    }

    #[cfg(not(test))]
    #[inline]
    #[allow(clippy::unused_self, clippy::unnecessary_wraps)]
    fn injected_failure(&self) -> io::Result<()> {
        Ok(())
    }

    pub(super) fn raw_fd(&self) -> i32 {
        self.fd().as_raw_fd()
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd()
    }
}

/// The entry that `copy` wrote into a buffer, if it found one.
fn entry_from(copy: impl FnOnce(&mut [u8]) -> io::Result<bool>) -> io::Result<Option<FlowEntry>> {
    let mut b = [0u8; ENTRY_SIZE];
    Ok(copy(&mut b)?.then(|| FlowEntry::from_bytes(&b)))
}
