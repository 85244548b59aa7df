//! [`AfXdp`]: a Linux interface through AF_XDP sockets, the fast packet I/O of the
//! software backend on plain NICs (and veth).
//!
//! ## Shape
//! - One UMEM (a page-aligned anonymous mapping cut into 2 KiB frames) is shared by all
//!   the ports opened together with [`AfXdp::open_group`] (the ports of one forwarder):
//!   one registration, one mapping; each (interface, queue) socket has its own fill and
//!   completion rings (`XDP_SHARED_UMEM` across devices) and owns a disjoint slice of
//!   the frames: half on its fill ring, half on its TX free list.
//! - One socket per receive queue (`AfXdpConfig::queues`, queue 0 up; a veth has one
//!   unless created with `numrxqueues`), bound in copy mode with need_wakeup: the
//!   kernel is woken (fill: `poll`, TX: `sendto`) only when it asks. Optional busy
//!   polling (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`, `SO_BUSY_POLL_BUDGET`; zero-copy
//!   sockets only since Linux 6.13) and NAPI deferral (module `napi`, file
//!   `af_xdp_napi.rs`: `netdev` netlink, set while the port is open).
//! - Batch RX: descriptors read from the RX ring, each frame copied into the caller's
//!   [`FrameBatch`], its frame straight back to the fill ring. Batch TX: completions
//!   reaped, each frame copied into a free frame, descriptors posted, the kernel kicked.
//!   The copies are the price of [`PacketPort`]'s owned batches: forwarding that moves
//!   descriptors from one port's RX ring to another's TX ring, as a shared UMEM allows,
//!   needs a port API that lends frames in place (see docs/af_xdp.md).
//! - The XDP program ([`prog`]) redirects IPv4, ARP and VLAN frames to the socket of
//!   their receive queue and passes everything else to the kernel. It is attached with
//!   a BPF link (`BPF_LINK_CREATE`, attach type `BPF_XDP`): the kernel detaches it when
//!   the link's descriptor closes, also when the process dies, so a crash leaves no
//!   program behind and the next start attaches cleanly. Native (driver) mode first,
//!   generic (`skb`) mode as fallback ([`open_ports`] also falls back to `AF_PACKET`,
//!   logging why).
//!
//! ## Why `xdpilone` and hand-built eBPF
//! `xsk-rs` 0.11 wraps libxdp/libbpf, which it builds from C sources: clang, libelf and
//! zlib on every build machine and minutes of CI time on 2 cores, and libxdp's program
//! loader (dispatcher, netlink attach) does not go away when the process dies.
//! `xdpilone` is pure Rust (only `libc` and `spin` below it), maps the rings and handles
//! shared UMEMs, and leaves the program to the caller: here 17 eBPF instructions built
//! in Rust and loaded with four `bpf(2)` commands, so no compiler, no ELF loader (aya
//! would need a BPF-target build of the program) and the crash-safe BPF link.
//!
//! ## Unsafe
//! This crate is otherwise `unsafe`-free: the UMEM mapping and its frame copies, the
//! `bpf(2)` and `setsockopt` calls live in the private `sys` module (file
//! `af_xdp_sys.rs`), the only module allowed `unsafe`, each block with its `SAFETY`
//! note, as the workspace does for device DMA memory and ioctls.

#[path = "af_xdp_napi.rs"]
mod napi;
pub use napi::NapiSettings;
#[path = "af_xdp_flow_prog.rs"]
pub mod flow_prog;
#[path = "af_xdp_flow_table.rs"]
mod flow_table;
pub use flow_table::FlowTable;
#[path = "af_xdp_prog.rs"]
pub mod prog;
/// For tests that need BPF maps: whether creating one failed for want of privilege
/// (`EPERM`, as when run without root), in which case the test skips, saying so. Under
/// CI (root) a refusal fails the test instead, so that a skip cannot hide it.
#[cfg(test)]
pub(crate) fn bpf_refused_outside_ci(e: &io::Error) -> bool {
    if e.raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "BPF map refused under CI: {e}"
    );
    eprintln!("skipping: a BPF map needs CAP_BPF: {e}");
    true
}

#[path = "af_xdp_sys.rs"]
#[allow(unsafe_code)]
mod sys;

use std::ffi::CString;
use std::fmt;
use std::io;
use std::num::NonZeroU32;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use ctoffload_nic_sim::control::chain;
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

use super::{AfPacket, FRAME_BUF_SIZE, FrameBatch, PacketPort, PortError, PortStats};

/// Size of one UMEM frame (aligned chunk mode). Received frames start after the
/// kernel's 256-byte XDP headroom, so up to 1792 bytes fit: a 1500-byte MTU.
const FRAME_SIZE: u32 = 2048;
/// `XDP_FLAGS_SKB_MODE`.
const XDP_FLAGS_SKB_MODE: u32 = 1 << 1;
/// `XDP_FLAGS_DRV_MODE`.
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
/// Kernel kicks per `send_batch` at most: a copy-mode `sendto` sends up to 32 frames.
const MAX_TX_KICKS: usize = 8;

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): before an skb is built.
    Native,
    /// After the skb is built (`XDP_FLAGS_SKB_MODE`): works on every interface.
    Generic,
}

impl XdpMode {
    fn flags(self) -> u32 {
        match self {
            Self::Native => XDP_FLAGS_DRV_MODE,
            Self::Generic => XDP_FLAGS_SKB_MODE,
        }
    }
}

impl fmt::Display for XdpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Native => "native",
            Self::Generic => "generic",
        })
    }
}

/// Busy-poll socket options (see `SO_BUSY_POLL` in socket(7)): each receive then
/// drives the queue with a non-blocking `recvfrom`. Since Linux 6.13 the kernel finds
/// the NAPI to busy-poll only for zero-copy sockets (at bind, from the driver's queue),
/// so on copy-mode sockets (veth) these options change nothing (docs/af_xdp.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusyPoll {
    /// `SO_BUSY_POLL` (µs; with `SO_PREFER_BUSY_POLL`).
    pub usecs: u32,
    /// `SO_BUSY_POLL_BUDGET`: frames per busy poll of the NAPI.
    pub budget: u32,
}

/// NAPI deferral of the interfaces' receive queues (per NAPI, set through netlink at
/// open, restored at close): after a poll that found frames, the kernel does not let
/// the device (on veth: the sender) schedule the NAPI again, but polls it from a timer
/// after `gro_flush_timeout`, on the CPU where the last poll ran, for up to
/// `defer_hard_irqs` empty polls. With the NAPI on the forwarding loop's CPU, its
/// receive work (the XDP program, the copy into the UMEM) then stays there, in batches
/// of one timer period, without a wake-up per frame burst from the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NapiDeferral {
    /// `defer_hard_irqs`: empty polls after which the device schedules the NAPI again
    /// (at most `i32::MAX`: then never, the timer polls even when idle).
    pub defer_hard_irqs: u32,
    /// `gro_flush_timeout`: the timer's period.
    pub gro_flush_timeout: Duration,
}

/// AF_XDP port settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AfXdpConfig {
    /// Receive queues per interface, one socket each (queues `0..queues`).
    pub queues: u32,
    /// UMEM frames per socket: half on the fill ring, half for TX (a power of two).
    pub frames_per_queue: u32,
    /// Entries of each RX, TX, fill and completion ring (a power of two).
    pub ring_size: u32,
    /// Busy polling, off when `None`.
    pub busy_poll: Option<BusyPoll>,
    /// NAPI deferral, the interfaces' own settings when `None`.
    pub napi_deferral: Option<NapiDeferral>,
    /// Entries of the XDP flow table ([`flow_prog`], one map for all the ports of a
    /// group), 0: none, the plain redirect program.
    pub flow_table_entries: u32,
}

impl Default for AfXdpConfig {
    fn default() -> Self {
        Self {
            queues: 1,
            frames_per_queue: 4096,
            ring_size: 2048,
            busy_poll: None,
            napi_deferral: None,
            flow_table_entries: 0,
        }
    }
}

/// Why AF_XDP ports could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AfXdpError {
    /// The settings are out of range.
    #[error("invalid AF_XDP settings: {reason}")]
    Config {
        /// What is wrong.
        reason: &'static str,
    },
    /// No such interface (in this thread's network namespace).
    #[error("interface {name:?}")]
    Interface {
        /// The interface.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The XSKMAP or the program could not be made.
    #[error("{op} for {name}")]
    Program {
        /// The interface.
        name: String,
        /// What failed.
        op: &'static str,
        /// The cause (with the verifier log for a load).
        #[source]
        source: io::Error,
    },
    /// The program could not be attached in this mode.
    #[error("attaching XDP in {mode} mode to {name}")]
    Attach {
        /// The interface.
        name: String,
        /// The mode tried.
        mode: XdpMode,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The UMEM could not be mapped or registered.
    #[error("UMEM of {bytes} bytes")]
    Umem {
        /// Its size.
        bytes: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A socket step failed.
    #[error("{op} for {name} queue {queue}")]
    Socket {
        /// The interface.
        name: String,
        /// The queue.
        queue: u32,
        /// What failed.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn errno(e: &xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

/// The program attached to one interface; detached when dropped (the link closes).
struct Attachment {
    _link: OwnedFd,
    _prog: OwnedFd,
    map: OwnedFd,
}

impl Attachment {
    fn new(
        name: &str,
        ifindex: u32,
        queues: u32,
        mode: XdpMode,
        flows: Option<&FlowTable>,
    ) -> Result<Self, AfXdpError> {
        let program = |op, source| AfXdpError::Program {
            name: name.to_owned(),
            op,
            source,
        };
        let map = sys::xskmap_create(queues).map_err(|e| program("creating the XSKMAP", e))?;
        let xsks = std::os::fd::AsRawFd::as_raw_fd(&map);
        let prog_fd = match flows {
            None => sys::xdp_prog_load(&prog::redirect_program(xsks), "ctoff_xsk_redir"),
            Some(f) => {
                sys::xdp_prog_load(&flow_prog::flow_program(f.raw_fd(), xsks), "ctoff_xdp_flow")
            }
        }
        .map_err(|e| program("loading the program", e))?;
        let link =
            sys::xdp_link_create(prog_fd.as_fd(), ifindex, mode.flags()).map_err(|source| {
                AfXdpError::Attach {
                    name: name.to_owned(),
                    mode,
                    source,
                }
            })?;
        Ok(Self {
            _link: link,
            _prog: prog_fd,
            map,
        })
    }
}

/// One AF_XDP socket: a receive queue of an interface, its rings and its frames.
struct QueueSocket {
    queue: u32,
    /// Fill and completion rings of this (interface, queue).
    fcq: DeviceQueue,
    user: User,
    rx: RingRx,
    tx: RingTx,
    /// Frames (UMEM offsets) received and not yet back on the fill ring.
    to_fill: Vec<u64>,
    /// Frames free for transmission.
    tx_free: Vec<u64>,
    /// Descriptors being posted by one `send_batch`.
    tx_descs: Vec<XdpDesc>,
}

impl QueueSocket {
    /// Puts received frames back on the fill ring; wakes the kernel if it waits for them.
    fn refill(&mut self) {
        if !self.to_fill.is_empty() {
            let n = u32::try_from(self.to_fill.len()).unwrap_or(u32::MAX);
            let mut w = self.fcq.fill(n);
            let done = w.insert(self.to_fill.iter().copied());
            w.commit();
            drop(w);
            self.to_fill.drain(
                ..usize::try_from(done)
                    .unwrap_or(usize::MAX)
                    .min(self.to_fill.len()),
            );
        }
        if self.fcq.needs_wakeup() {
            self.fcq.wake();
        }
    }

    /// Takes transmitted frames back from the completion ring.
    fn reap_completions(&mut self) {
        let n = u32::try_from(self.tx_descs.capacity().max(64)).unwrap_or(u32::MAX);
        let mut c = self.fcq.complete(n);
        while let Some(addr) = c.read() {
            self.tx_free.push(addr & !u64::from(FRAME_SIZE - 1));
        }
        c.release();
    }
}

/// A Linux interface through AF_XDP sockets (see the module docs).
pub struct AfXdp {
    name: String,
    ifindex: u32,
    mode: XdpMode,
    area: Arc<sys::UmemArea>,
    queues: Vec<QueueSocket>,
    next_rx: usize,
    busy_poll: bool,
    scratch: Box<[u8; FRAME_BUF_SIZE]>,
    stats: PortStats,
    /// Restores the NAPI settings before the program (and, on veth, the NAPI) goes.
    deferral: Option<napi::DeferralGuard>,
    /// The flow map of the group's programs, if they have one.
    flows: Option<Arc<FlowTable>>,
    _attachment: Attachment,
}

impl fmt::Debug for AfXdp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AfXdp")
            .field("name", &self.name)
            .field("mode", &self.mode)
            .field(
                "queues",
                &self.queues.iter().map(|q| q.queue).collect::<Vec<_>>(),
            )
            .field("umem_bytes", &self.area.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl AfXdp {
    /// Opens one interface (its own UMEM).
    ///
    /// # Errors
    /// As [`AfXdp::open_group`].
    pub fn open(name: &str, mode: XdpMode, cfg: &AfXdpConfig) -> Result<Self, AfXdpError> {
        let mut v = Self::open_group(&[name], mode, cfg)?;
        v.pop().ok_or(AfXdpError::Config { reason: "no port" })
    }

    /// Opens the interfaces `names` (in this thread's network namespace) with one
    /// shared UMEM, the program attached to each in `mode`. Nothing stays attached or
    /// open on failure.
    ///
    /// # Errors
    /// Bad settings, no such interface, the program cannot be loaded or attached in
    /// this mode, or a socket cannot be set up (needs `CAP_NET_ADMIN`, `CAP_NET_RAW`
    /// and, before Linux 5.11, `RLIMIT_MEMLOCK` room).
    pub fn open_group(
        names: &[&str],
        mode: XdpMode,
        cfg: &AfXdpConfig,
    ) -> Result<Vec<Self>, AfXdpError> {
        let pow2 = |v: u32| v.is_power_of_two() && v >= 2;
        if cfg.queues == 0 || !pow2(cfg.frames_per_queue) || !pow2(cfg.ring_size) {
            return Err(AfXdpError::Config {
                reason: "queues must be non-zero, frames_per_queue and ring_size powers of two",
            });
        }
        let sockets = names
            .len()
            .saturating_mul(usize::try_from(cfg.queues).unwrap_or(usize::MAX));
        let bytes = sockets
            .checked_mul(usize::try_from(cfg.frames_per_queue).unwrap_or(usize::MAX))
            .and_then(|f| f.checked_mul(FRAME_SIZE as usize))
            .filter(|&b| b > 0)
            .ok_or(AfXdpError::Config {
                reason: "UMEM size out of range",
            })?;
        let mut infos = Vec::with_capacity(names.len());
        for name in names {
            infos.push((name, if_info(name)?));
        }
        let flows = match cfg.flow_table_entries {
            0 => None,
            n => Some(Arc::new(FlowTable::new(n).map_err(|source| {
                AfXdpError::Program {
                    name: names.join(","),
                    op: "creating the flow table",
                    source,
                }
            })?)),
        };
        let mut attachments = Vec::with_capacity(names.len());
        for (name, info) in &infos {
            attachments.push(Attachment::new(
                name,
                info.ifindex(),
                cfg.queues,
                mode,
                flows.as_deref(),
            )?);
        }
        let area = Arc::new(
            sys::UmemArea::new(bytes).map_err(|source| AfXdpError::Umem { bytes, source })?,
        );
        let umem = area
            .register(UmemConfig {
                fill_size: cfg.ring_size,
                complete_size: cfg.ring_size,
                frame_size: FRAME_SIZE,
                headroom: 0,
                flags: 0,
            })
            .map_err(|e| AfXdpError::Umem {
                bytes,
                source: io::Error::from_raw_os_error(e.abs()),
            })?;
        let mut ports = Vec::with_capacity(names.len());
        let mut next_frame = 0u64;
        for ((name, info), attachment) in infos.into_iter().zip(attachments) {
            // After the attach: veth has its NAPI only while XDP is attached.
            let deferral = cfg
                .napi_deferral
                .and_then(|d| defer_napi(name, info.ifindex(), &d));
            let mut queues = Vec::new();
            for queue in 0..cfg.queues {
                let first = next_frame == 0;
                let q = open_queue(&umem, name, info, queue, first, next_frame, cfg)?;
                next_frame += u64::from(cfg.frames_per_queue);
                let fd = sys::borrow_fd(q.rx.as_raw_fd(), &q.rx);
                sys::xskmap_insert(attachment.map.as_fd(), queue, fd).map_err(|source| {
                    AfXdpError::Socket {
                        name: (*name).to_owned(),
                        queue,
                        op: "inserting the socket into the XSKMAP",
                        source,
                    }
                })?;
                queues.push(q);
            }
            ports.push(Self {
                name: (*name).to_owned(),
                ifindex: info.ifindex(),
                mode,
                area: Arc::clone(&area),
                queues,
                next_rx: 0,
                busy_poll: cfg.busy_poll.is_some(),
                scratch: Box::new([0; FRAME_BUF_SIZE]),
                stats: PortStats::default(),
                deferral,
                flows: flows.clone(),
                _attachment: attachment,
            });
        }
        Ok(ports)
    }

    /// How the program is attached.
    #[must_use]
    pub fn mode(&self) -> XdpMode {
        self.mode
    }

    /// The interface's index.
    #[must_use]
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// The XDP flow table of this port's program (shared by its group), if it has one
    /// ([`AfXdpConfig::flow_table_entries`]).
    #[must_use]
    pub fn flow_table(&self) -> Option<&Arc<FlowTable>> {
        self.flows.as_ref()
    }

    /// The NAPI instances whose deferral this port set (their ids, ascending); empty without
    /// [`AfXdpConfig::napi_deferral`] or when the kernel refused (logged).
    #[must_use]
    pub fn deferred_napis(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .deferral
            .as_ref()
            .map(|d| d.previous().iter().map(|n| n.id).collect())
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    fn io_err(&self, op: &'static str, source: io::Error) -> PortError {
        PortError {
            port: self.name.clone(),
            op,
            source: ctoffload_nic_sim::Error::Io { op, source },
        }
    }
}

/// The NAPI instances of interface `name` (in this thread's network namespace) and
/// their deferral settings, as the kernel reports them (`netdev` netlink `napi-get`).
///
/// # Errors
/// No such interface, or the kernel has no `netdev` netlink family (before 6.5).
pub fn napi_settings(name: &str) -> Result<Vec<NapiSettings>, AfXdpError> {
    let info = if_info(name)?;
    napi::settings(info.ifindex()).map_err(|source| AfXdpError::Interface {
        name: name.to_owned(),
        source,
    })
}

/// Sets NAPI deferral `d` on interface `ifindex`. It is a performance setting: the
/// port works without it, so a failure is logged, not fatal.
fn defer_napi(name: &str, ifindex: u32, d: &NapiDeferral) -> Option<napi::DeferralGuard> {
    match napi::DeferralGuard::apply(ifindex, d.defer_hard_irqs, d.gro_flush_timeout) {
        Ok(g) => Some(g),
        Err(e) => {
            tracing::warn!(port = name, error = %e, "NAPI deferral not set (napi-set needs Linux 6.13; else /sys/class/net/DEV/napi_defer_hard_irqs and gro_flush_timeout)");
            None
        }
    }
}

fn if_info(name: &str) -> Result<IfInfo, AfXdpError> {
    let err = |source| AfXdpError::Interface {
        name: name.to_owned(),
        source,
    };
    let c = CString::new(name).map_err(|_| err(io::Error::from(io::ErrorKind::InvalidInput)))?;
    let mut info = IfInfo::invalid();
    info.from_name(&c).map_err(|e| err(errno(&e)))?;
    Ok(info)
}

/// Creates, configures and binds the socket of `queue`, its frames starting at UMEM
/// frame `first_frame`; the first socket of a UMEM uses the UMEM's own descriptor.
fn open_queue(
    umem: &Umem,
    name: &str,
    mut info: IfInfo,
    queue: u32,
    owns_umem: bool,
    first_frame: u64,
    cfg: &AfXdpConfig,
) -> Result<QueueSocket, AfXdpError> {
    let err = |op: &'static str| {
        move |e: xdpilone::Errno| AfXdpError::Socket {
            name: name.to_owned(),
            queue,
            op,
            source: errno(&e),
        }
    };
    info.set_queue(queue);
    let sock = if owns_umem {
        Socket::with_shared(&info, umem)
    } else {
        Socket::new(&info)
    }
    .map_err(err("creating the socket"))?;
    let fcq = umem
        .fq_cq(&sock)
        .map_err(err("creating fill/completion rings"))?;
    let ring = NonZeroU32::new(cfg.ring_size);
    // Sockets sharing another's UMEM inherit its bind flags (the kernel refuses any).
    let bind_flags = if owns_umem {
        SocketConfig::XDP_BIND_COPY | SocketConfig::XDP_BIND_NEED_WAKEUP
    } else {
        0
    };
    let user = umem
        .rx_tx(
            &sock,
            &SocketConfig {
                rx_size: ring,
                tx_size: ring,
                bind_flags,
            },
        )
        .map_err(err("creating RX/TX rings"))?;
    let rx = user.map_rx().map_err(err("mapping the RX ring"))?;
    let tx = user.map_tx().map_err(err("mapping the TX ring"))?;
    umem.bind(&user).map_err(err("binding"))?;
    if let Some(bp) = cfg.busy_poll {
        sys::set_busy_poll(sys::borrow_fd(rx.as_raw_fd(), &rx), bp.usecs, bp.budget).map_err(
            |source| AfXdpError::Socket {
                name: name.to_owned(),
                queue,
                op: "setting busy-poll options",
                source,
            },
        )?;
    }
    let half = u64::from(cfg.frames_per_queue / 2);
    let frame = |i: u64| (first_frame + i) * u64::from(FRAME_SIZE);
    let fill_count = half.min(u64::from(cfg.ring_size));
    let mut q = QueueSocket {
        queue,
        fcq,
        user,
        rx,
        tx,
        to_fill: (0..fill_count).map(frame).collect(),
        tx_free: (fill_count..u64::from(cfg.frames_per_queue))
            .map(frame)
            .collect(),
        tx_descs: Vec::with_capacity(usize::try_from(cfg.ring_size).unwrap_or(usize::MAX)),
    };
    q.refill();
    if !q.to_fill.is_empty() {
        // The fill ring has at least `fill_count` entries: nothing may be left over.
        return Err(AfXdpError::Socket {
            name: name.to_owned(),
            queue,
            op: "filling the fill ring",
            source: io::Error::from(io::ErrorKind::OutOfMemory),
        });
    }
    Ok(q)
}

impl PacketPort for AfXdp {
    fn name(&self) -> &str {
        &self.name
    }

    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize, PortError> {
        let mut got = 0;
        let nq = self.queues.len();
        for k in 0..nq {
            let want = max.saturating_sub(got).min(batch.spare());
            if want == 0 {
                break;
            }
            let q = &mut self.queues[(self.next_rx + k) % nq];
            if self.busy_poll {
                // Drives the device queue's NAPI from this thread (busy polling).
                let fd = sys::borrow_fd(q.rx.as_raw_fd(), &q.rx);
                match rustix::net::recv(fd, &mut [0u8; 0][..], rustix::net::RecvFlags::DONTWAIT) {
                    Ok(_) | Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                    Err(e) => return Err(self.io_err("recvfrom (busy poll)", e.into())),
                }
            }
            let mut rx = q.rx.receive(u32::try_from(want).unwrap_or(u32::MAX));
            while let Some(desc) = rx.read() {
                q.to_fill.push(desc.addr & !u64::from(FRAME_SIZE - 1));
                let len = usize::try_from(desc.len).unwrap_or(usize::MAX);
                let copied = match self.scratch.get_mut(..len) {
                    Some(buf) => self.area.copy_out(desc.addr, buf) && batch.push(buf).is_ok(),
                    None => false,
                };
                if copied {
                    got += 1;
                    self.stats.rx_frames += 1;
                    self.stats.rx_bytes += u64::from(desc.len);
                } else {
                    self.stats.rx_dropped += 1;
                }
            }
            rx.release();
            drop(rx);
            q.refill();
        }
        self.next_rx = (self.next_rx + 1) % nq.max(1);
        Ok(got)
    }

    fn send_batch(&mut self, batch: &FrameBatch) -> Result<(), PortError> {
        let Some(q) = self.queues.first_mut() else {
            return Ok(());
        };
        q.reap_completions();
        q.tx_descs.clear();
        for frame in batch.iter() {
            let Some(addr) = q.tx_free.pop() else {
                self.stats.tx_dropped += 1;
                continue;
            };
            let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
            if len > FRAME_SIZE || !self.area.copy_in(addr, frame) {
                q.tx_free.push(addr);
                return Err(PortError {
                    port: self.name.clone(),
                    op: "send",
                    source: ctoffload_nic_sim::Error::FrameTooLong {
                        len: frame.len(),
                        max: FRAME_SIZE as usize,
                    },
                });
            }
            q.tx_descs.push(XdpDesc {
                addr,
                len,
                options: 0,
            });
        }
        let n = u32::try_from(q.tx_descs.len()).unwrap_or(u32::MAX);
        let mut w = q.tx.transmit(n);
        let posted = usize::try_from(w.insert(q.tx_descs.iter().copied())).unwrap_or(0);
        w.commit();
        drop(w);
        for d in q.tx_descs.drain(posted..) {
            q.tx_free.push(d.addr);
            self.stats.tx_dropped += 1;
        }
        for d in &q.tx_descs {
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += u64::from(d.len);
        }
        // Copy mode sends from `sendto`, a bounded number of frames per call.
        for _ in 0..MAX_TX_KICKS {
            if q.tx.pending() == 0 || !q.tx.needs_wakeup() {
                break;
            }
            q.tx.wake();
        }
        Ok(())
    }

    fn stats(&self) -> PortStats {
        let mut s = self.stats;
        for q in &self.queues {
            if let Ok(k) = q.user.statistics_v2() {
                s.rx_dropped += k.rx_dropped + k.rx_ring_full + k.rx_invalid_descs;
                s.tx_dropped += k.tx_invalid_descs;
            }
        }
        s
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        let q = self.queues.first()?;
        Some(sys::borrow_fd(q.rx.as_raw_fd(), &q.rx))
    }
}

/// Which packet I/O to open ports with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoRequest {
    /// `AF_PACKET` sockets.
    AfPacket,
    /// AF_XDP sockets, native XDP, else generic XDP, else `AF_PACKET`.
    AfXdp(AfXdpConfig),
}

/// Which packet I/O [`open_ports`] got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoChosen {
    /// AF_XDP with the program attached in this mode.
    AfXdp(XdpMode),
    /// `AF_PACKET`; `fallback` says why AF_XDP was not used when it was asked for.
    AfPacket {
        /// The AF_XDP errors (native, then generic), if AF_XDP was requested.
        fallback: Option<String>,
    },
}

/// A port of either kind, for a forwarder whose I/O is chosen at run time.
#[derive(Debug)]
pub enum AnyPort {
    /// AF_XDP.
    AfXdp(AfXdp),
    /// `AF_PACKET`.
    AfPacket(AfPacket),
}

impl AnyPort {
    /// The XDP flow table of an AF_XDP port that has one.
    #[must_use]
    pub fn flow_table(&self) -> Option<&Arc<FlowTable>> {
        match self {
            Self::AfXdp(p) => p.flow_table(),
            Self::AfPacket(_) => None,
        }
    }
}

impl PacketPort for AnyPort {
    fn name(&self) -> &str {
        match self {
            Self::AfXdp(p) => p.name(),
            Self::AfPacket(p) => p.name(),
        }
    }
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize, PortError> {
        match self {
            Self::AfXdp(p) => p.recv_batch(batch, max),
            Self::AfPacket(p) => p.recv_batch(batch, max),
        }
    }
    fn send_batch(&mut self, batch: &FrameBatch) -> Result<(), PortError> {
        match self {
            Self::AfXdp(p) => p.send_batch(batch),
            Self::AfPacket(p) => p.send_batch(batch),
        }
    }
    fn stats(&self) -> PortStats {
        match self {
            Self::AfXdp(p) => p.stats(),
            Self::AfPacket(p) => p.stats(),
        }
    }
    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        match self {
            Self::AfXdp(p) => p.poll_fd(),
            Self::AfPacket(p) => p.poll_fd(),
        }
    }
}

/// Opens the forwarder's ports `names` (in this thread's network namespace) with the
/// requested I/O: for AF_XDP, native XDP, then generic XDP, then `AF_PACKET`, each
/// fallback logged with its reason. Returns the ports in order and what was chosen.
///
/// # Errors
/// `AF_PACKET` cannot open a port (the last resort failed too).
pub fn open_ports(
    names: &[&str],
    request: IoRequest,
) -> Result<(Vec<AnyPort>, IoChosen), PortError> {
    let mut fallback = None;
    if let IoRequest::AfXdp(cfg) = request {
        let mut reasons = Vec::new();
        for mode in [XdpMode::Native, XdpMode::Generic] {
            match AfXdp::open_group(names, mode, &cfg) {
                Ok(ports) => {
                    if !reasons.is_empty() {
                        tracing::warn!(ports = ?names, reason = %reasons.join("; "), "AF_XDP in generic XDP mode");
                    }
                    return Ok((
                        ports.into_iter().map(AnyPort::AfXdp).collect(),
                        IoChosen::AfXdp(mode),
                    ));
                }
                Err(e) => reasons.push(chain(&e)),
            }
        }
        let reason = reasons.join("; ");
        tracing::warn!(ports = ?names, %reason, "AF_XDP unavailable, falling back to AF_PACKET");
        fallback = Some(reason);
    }
    let ports = names
        .iter()
        .map(|n| AfPacket::open(n).map(AnyPort::AfPacket))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ports, IoChosen::AfPacket { fallback }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_are_refused_before_touching_the_system() {
        for cfg in [
            AfXdpConfig {
                queues: 0,
                ..AfXdpConfig::default()
            },
            AfXdpConfig {
                frames_per_queue: 1000,
                ..AfXdpConfig::default()
            },
            AfXdpConfig {
                ring_size: 3,
                ..AfXdpConfig::default()
            },
        ] {
            let e = AfXdp::open("lo", XdpMode::Generic, &cfg).expect_err("refused");
            assert!(matches!(e, AfXdpError::Config { .. }), "{e}");
        }
    }

    #[test]
    fn a_missing_interface_is_named() {
        let e = AfXdp::open("ctoff-none0", XdpMode::Generic, &AfXdpConfig::default())
            .expect_err("no such interface");
        assert!(
            matches!(&e, AfXdpError::Interface { name, .. } if name == "ctoff-none0"),
            "{e}"
        );
    }

    #[test]
    fn error_chain_lists_causes() {
        let e = AfXdpError::Attach {
            name: "veth0".into(),
            mode: XdpMode::Native,
            source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        };
        let s = chain(&e);
        assert!(
            s.starts_with("attaching XDP in native mode to veth0: "),
            "{s}"
        );
    }
}
