//! Packet I/O for the software backend: a [`PacketPort`] is a non-blocking source and
//! sink of Ethernet frames in batches.
//!
//! [`AfPacket`] is a Linux interface through an `AF_PACKET` socket: bound to
//! `ETH_P_ALL` on one interface, promiscuous, `PACKET_IGNORE_OUTGOING` (it never sees
//! its own transmissions). By default ([`AfPacketOptions::default`]) it receives from a
//! `TPACKET_V3` memory-mapped ring (blocks of frames handed over by the kernel, VLAN
//! tags restored from the frame headers) and sends through a transmit ring with one
//! `send()` per batch. When the rings cannot be set up it falls back, logging why, to
//! the receive ring with `sendmmsg`, then to `recvmmsg`/`sendmmsg` (VLAN tags from
//! `PACKET_AUXDATA`); [`AfPacket::io`] says what a port got. The socket and ring code is
//! `nic-sim`'s port (its I/O layer is where the workspace allows the `unsafe` system
//! calls and the ring mapping); this crate stays `#![forbid(unsafe_code)]`.
//!
//! [`MemPort`] is an in-memory port for tests.

pub mod af_xdp;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd};

use ctoffload_nic_sim::control::chain;
use ctoffload_nic_sim::port::{AfPacketConfig, AfPacketPort, MemPort as SimMemPort, PortBackend};
pub use ctoffload_nic_sim::port::{AfPacketIo, FRAME_BUF_SIZE, FrameBatch, PortStats, RingConfig};

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

/// How [`AfPacket`] ports are opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfPacketOptions {
    /// Memory-mapped rings to try first (`tx_frames: 0`: receive ring only); `None`:
    /// `recvmmsg`/`sendmmsg` only.
    pub ring: Option<RingConfig>,
    /// `PACKET_QDISC_BYPASS`: sent frames skip the interface's queueing discipline.
    pub qdisc_bypass: bool,
}

impl Default for AfPacketOptions {
    /// Both rings with the default [`RingConfig`], through the qdisc.
    fn default() -> Self {
        Self {
            ring: Some(RingConfig::default()),
            qdisc_bypass: false,
        }
    }
}

impl AfPacketOptions {
    /// What to try, best first: both rings, the receive ring with `sendmmsg`, then
    /// `recvmmsg`/`sendmmsg`.
    fn attempts(&self) -> Vec<AfPacketConfig> {
        let plain = AfPacketConfig {
            ring: None,
            qdisc_bypass: self.qdisc_bypass,
        };
        let Some(ring) = self.ring else {
            return vec![plain];
        };
        let mut v = vec![AfPacketConfig {
            ring: Some(ring),
            ..plain
        }];
        if ring.tx_frames > 0 {
            v.push(AfPacketConfig {
                ring: Some(RingConfig {
                    tx_frames: 0,
                    ..ring
                }),
                ..plain
            });
        }
        v.push(plain);
        v
    }
}

/// A Linux interface through an `AF_PACKET` socket (see the module docs).
#[derive(Debug)]
pub struct AfPacket {
    name: String,
    inner: AfPacketPort,
    fallback: Option<String>,
}

impl AfPacket {
    /// Opens the interface `ifname` (in the calling thread's network namespace) with
    /// the default options: memory-mapped rings, falling back as the module docs say.
    ///
    /// # Errors
    /// No such interface, or no socket can be set up (needs `CAP_NET_RAW`).
    pub fn open(ifname: &str) -> Result<Self, PortError> {
        Self::open_with(ifname, &AfPacketOptions::default())
    }

    /// Opens the interface `ifname` with `opts`: the best I/O that can be set up, each
    /// fallback logged with its reason (and kept, see [`AfPacket::fallback`]).
    ///
    /// # Errors
    /// No such interface, or not even `recvmmsg`/`sendmmsg` can be set up.
    pub fn open_with(ifname: &str, opts: &AfPacketOptions) -> Result<Self, PortError> {
        let mut reasons = Vec::new();
        let mut last = None;
        for cfg in opts.attempts() {
            match AfPacketPort::open_with(ifname, &cfg) {
                Ok(inner) => {
                    let fallback = (!reasons.is_empty()).then(|| reasons.join("; "));
                    if let Some(why) = &fallback {
                        tracing::warn!(port = ifname, io = %inner.io(), reason = %why, "AF_PACKET rings unavailable, falling back");
                    }
                    return Ok(Self {
                        name: ifname.to_owned(),
                        inner,
                        fallback,
                    });
                }
                Err(e @ ctoffload_nic_sim::Error::NoSuchInterface { .. }) => {
                    return Err(err(ifname, "open", e));
                }
                Err(e) => {
                    let tried = match cfg.ring {
                        Some(RingConfig { tx_frames: 0, .. }) => AfPacketIo::RxRing,
                        Some(_) => AfPacketIo::Rings,
                        None => AfPacketIo::Mmsg,
                    };
                    reasons.push(format!("{tried}: {}", chain(&e)));
                    last = Some(e);
                }
            }
        }
        Err(err(
            ifname,
            "open",
            last.unwrap_or(ctoffload_nic_sim::Error::NoSuchInterface {
                name: ifname.to_owned(),
            }),
        ))
    }

    /// The packet I/O the port got.
    #[must_use]
    pub fn io(&self) -> AfPacketIo {
        self.inner.io()
    }

    /// Why better I/O than [`AfPacket::io`] was not used, if it was asked for.
    #[must_use]
    pub fn fallback(&self) -> Option<&str> {
        self.fallback.as_deref()
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
