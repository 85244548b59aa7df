//! Packet I/O for the software backend: a [`PacketPort`] is a non-blocking source and
//! sink of Ethernet frames in batches.
//!
//! [`AfPacket`] is a Linux interface through an `AF_PACKET` socket: bound to
//! `ETH_P_ALL` on one interface, promiscuous, `PACKET_IGNORE_OUTGOING` (it never sees
//! its own transmissions), VLAN tags restored from `PACKET_AUXDATA`, batch receive
//! with `recvmmsg` and batch send with `sendmmsg` (up to 32 frames per system call).
//! The socket code is `nic-sim`'s port (its I/O layer is where the workspace allows the
//! `unsafe` system calls); this crate stays `#![forbid(unsafe_code)]`. A TPACKET_V3
//! memory-mapped ring (no copy per frame, block retire timeout) needs an `mmap` of the
//! ring and is left for a crate allowed to hold that `unsafe`.
//!
//! [`MemPort`] is an in-memory port for tests.

pub mod af_xdp;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};

use ctoffload_nic_sim::port::{AfPacketPort, MemPort as SimMemPort, PortBackend};
pub use ctoffload_nic_sim::port::{FRAME_BUF_SIZE, FrameBatch, PortStats};

/// A port I/O failure.
#[derive(Debug, thiserror::Error)]
#[error("port {port}: {op}")]
pub struct PortError {
    /// The port's name.
    pub port: String,
    /// What failed.
    pub op: &'static str,
    /// The cause.
    #[source]
    pub source: ctoffload_nic_sim::Error,
}

/// A batch-oriented, non-blocking frame port a worker polls.
pub trait PacketPort: Send + fmt::Debug {
    /// The port's name.
    fn name(&self) -> &str;
    /// Appends up to `max` received frames to `batch` without blocking; returns how many.
    ///
    /// # Errors
    /// The socket failed (drops under load are counted, not errors).
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize, PortError>;
    /// Sends every frame of `batch`.
    ///
    /// # Errors
    /// The socket failed or a frame is too long.
    fn send_batch(&mut self, batch: &FrameBatch) -> Result<(), PortError>;
    /// The port's counters.
    fn stats(&self) -> PortStats;
    /// A descriptor that polls readable when frames wait, if the port has one.
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

/// A Linux interface through an `AF_PACKET` socket (see the module docs).
#[derive(Debug)]
pub struct AfPacket {
    name: String,
    inner: AfPacketPort,
}

impl AfPacket {
    /// Opens the interface `ifname` (in the calling thread's network namespace).
    ///
    /// # Errors
    /// No such interface, or the socket cannot be set up (needs `CAP_NET_RAW`).
    pub fn open(ifname: &str) -> Result<Self, PortError> {
        let inner = AfPacketPort::open(ifname).map_err(|source| PortError {
            port: ifname.to_owned(),
            op: "open",
            source,
        })?;
        Ok(Self {
            name: ifname.to_owned(),
            inner,
        })
    }
}

fn err(name: &str, op: &'static str, source: ctoffload_nic_sim::Error) -> PortError {
    PortError {
        port: name.to_owned(),
        op,
        source,
    }
}

impl PacketPort for AfPacket {
    fn name(&self) -> &str {
        &self.name
    }
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize, PortError> {
        self.inner
            .recv_batch(batch, max)
            .map_err(|e| err(&self.name, "recvmmsg", e))
    }
    fn send_batch(&mut self, batch: &FrameBatch) -> Result<(), PortError> {
        self.inner
            .send_batch(batch)
            .map_err(|e| err(&self.name, "sendmmsg", e))
    }
    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.inner.as_fd())
    }
}

/// An in-memory port (for tests): what is sent on one end of a pair is received on
/// the other.
#[derive(Debug)]
pub struct MemPort {
    name: String,
    inner: SimMemPort,
}

impl MemPort {
    /// Two connected ports, each buffering up to `depth` frames.
    #[must_use]
    pub fn pair(a: &str, b: &str, depth: usize) -> (Self, Self) {
        let (x, y) = SimMemPort::pair(depth);
        (
            Self {
                name: a.to_owned(),
                inner: x,
            },
            Self {
                name: b.to_owned(),
                inner: y,
            },
        )
    }
}

impl PacketPort for MemPort {
    fn name(&self) -> &str {
        &self.name
    }
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize, PortError> {
        self.inner
            .recv_batch(batch, max)
            .map_err(|e| err(&self.name, "receive", e))
    }
    fn send_batch(&mut self, batch: &FrameBatch) -> Result<(), PortError> {
        self.inner
            .send_batch(batch)
            .map_err(|e| err(&self.name, "send", e))
    }
    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
}
