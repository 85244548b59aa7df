//! Process mode: the control socket of the `ctoffload-nic-sim` binary (device.md
//! section 19.4).
//!
//! The model runs in its own process, polled by a [`crate::SimThread`]; a driver in
//! another process attaches to the same regions through a Unix `SOCK_SEQPACKET` socket.
//! Each packet on the socket is one JSON message; file descriptors travel beside it as
//! `SCM_RIGHTS` ancillary data:
//!
//! - `hello` answers with the BAR0 memfd and the three MSI-X eventfds;
//! - `dma_map` carries the memfd of the driver's DMA memory (`VFIO_IOMMU_MAP_DMA`),
//!   `dma_unmap` removes mappings;
//! - `flr`, `stats`, `fault`, `set_time`, `port_inject`, `port_drain`, `shutdown`.
//!
//! Every request gets exactly one reply carrying the request's `id`; a request that
//! cannot be parsed or carries the wrong descriptors gets an `error` reply, and the
//! connection stays usable. Nothing a client sends can panic the server. This module
//! holds no `unsafe`: descriptors move through `rustix`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ctoffload_hw_regs::regs::{self, Status};
use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::device::{BAR_SIZE, SimStats, Simulator};
use crate::error::{Error, Result};
use crate::fault::FaultHandle;
use crate::iommu::SimIommu;
use crate::mem::SharedRegion;
use crate::port::mem_queue::MemPort;
use crate::port::{FRAME_BUF_SIZE, PortBackend};
use crate::thread::{SimClock, SimThread};

/// Version of the control protocol; `hello` must name it.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message (bytes of JSON) either side sends or accepts. Below the default
/// socket send buffer (`net.core.wmem_default`, 208 KiB), which bounds a
/// `SOCK_SEQPACKET` message; [`MAX_FRAMES`] full-size frames fit.
pub const MAX_MESSAGE: usize = 160 * 1024;
/// Most descriptors one message carries (`hello`'s reply: BAR + 3 eventfds).
pub const MAX_FDS: usize = 4;
/// Most frames one `port_inject` or `port_drain` moves (16 × 2048 bytes as JSON
/// numbers, up to 4 bytes each, fit in [`MAX_MESSAGE`]).
pub const MAX_FRAMES: usize = 16;
/// How long the server waits for the model to take over an FLR.
const FLR_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a reply may wait for room in a client's receive buffer.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often blocked loops look at the stop flag.
const TICK: Duration = Duration::from_millis(50);

/// A request, as sent by a client: `{"id": 1, "op": "hello", "version": 1}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Chosen by the client, echoed in the reply (0 in a reply to a message whose `id`
    /// could not be read).
    #[serde(default)]
    pub id: u64,
    /// The message.
    #[serde(flatten)]
    pub body: T,
}

/// Control requests (`op`). Descriptors: `dma_map` carries exactly one (the memfd),
/// every other request none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Opens the session; the reply carries the BAR fd and the MSI-X eventfds.
    Hello {
        /// Must be [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Maps `len` bytes of the attached memfd, from `offset`, at `iova`.
    DmaMap {
        /// Device address.
        iova: u64,
        /// Offset in the memfd.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Removes the whole mappings inside `[iova, iova + len)`.
    DmaUnmap {
        /// Device address.
        iova: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Function-level reset; answered once the model has started it.
    Flr,
    /// The model's [`SimStats`].
    Stats,
    /// Arms a fault ([`FaultHandle`]).
    Fault {
        /// Which one.
        fault: Fault,
    },
    /// Sets model time (only with `--clock manual`).
    SetTime {
        /// Nanoseconds.
        now_ns: u64,
    },
    /// Puts frames on the wire side of a memory port (the device receives them).
    PortInject {
        /// Port number.
        port: u8,
        /// Frames, each at most 2048 bytes.
        frames: Vec<Vec<u8>>,
    },
    /// Takes up to `max` frames the device sent out of a memory port.
    PortDrain {
        /// Port number.
        port: u8,
        /// Most frames to return (at most [`MAX_FRAMES`]).
        max: u32,
    },
    /// Stops the model and exits the process after replying.
    Shutdown,
}

/// A fault to arm (`kind`), one per [`FaultHandle`] method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// [`FaultHandle::drop_completions`].
    DropCompletions {
        /// Commands.
        n: u32,
    },
    /// [`FaultHandle::device_error_next`].
    DeviceErrorNext {
        /// Commands.
        n: u32,
    },
    /// [`FaultHandle::table_full_at`].
    TableFullAt {
        /// Fill level.
        fill: u32,
    },
    /// [`FaultHandle::fatal_raw`].
    Fatal {
        /// `FATAL_CODE`.
        code: u32,
        /// `FATAL_UNIT`.
        unit: u32,
    },
    /// [`FaultHandle::spontaneous_reset`].
    SpontaneousReset,
    /// [`FaultHandle::counter_wrap_soon`].
    CounterWrapSoon {
        /// Slot.
        flow_id: u32,
    },
    /// [`FaultHandle::preload_counters`].
    PreloadCounters {
        /// Slot.
        flow_id: u32,
        /// Packet counter.
        packets: u32,
        /// Byte counter.
        bytes: u64,
    },
    /// [`FaultHandle::slow_commands`].
    SlowCommands {
        /// Model time per command.
        delay_ns: u64,
    },
    /// [`FaultHandle::clear`].
    Clear,
}

/// Replies (`reply`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// To `hello`; carries `1 + vectors` descriptors: BAR0 (a memfd or `/dev/shm` file
    /// of `bar_size` bytes), then one eventfd per MSI-X vector.
    Hello {
        /// [`PROTOCOL_VERSION`].
        version: u32,
        /// Size of the BAR file.
        bar_size: u64,
        /// MSI-X vectors (eventfds that follow the BAR fd).
        vectors: u32,
        /// `NUM_PORTS`.
        num_ports: u8,
        /// Ports whose wire side is reachable with `port_inject`/`port_drain`.
        mem_ports: Vec<u8>,
        /// Whether model time is set with `set_time`.
        manual_clock: bool,
    },
    /// The request was carried out.
    Ok,
    /// To `stats`.
    Stats {
        /// The counters.
        stats: WireStats,
    },
    /// To `port_drain`.
    Frames {
        /// Frames, oldest first.
        frames: Vec<Vec<u8>>,
    },
    /// The request was refused or failed; nothing was done unless `kind` is `failed`
    /// and the message says otherwise.
    Error {
        /// Class of the failure.
        kind: ErrorKind,
        /// What went wrong, for people.
        message: String,
    },
}

/// Classes of error replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Not valid JSON, an unknown `op`, a missing or mistyped field, or too long.
    BadMessage,
    /// The wrong number of descriptors for the request.
    BadFds,
    /// Valid, but not available in this configuration (e.g. `set_time` with a
    /// monotonic clock, a port without a memory back-end, another protocol version).
    Unsupported,
    /// Valid, but the model refused it (e.g. an overlapping DMA mapping).
    Failed,
}

/// [`SimStats`] on the wire (field by field; see [`SimStats`] for the exact meaning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireStats {
    /// Polls that found work to do.
    pub busy_polls: u64,
    /// CMD `TAIL` doorbell updates observed.
    pub cmd_doorbells: u64,
    /// CPL `HEAD` doorbell updates observed.
    pub cpl_doorbells: u64,
    /// RX `TAIL` doorbell updates observed.
    pub rx_doorbells: u64,
    /// TX `TAIL` doorbell updates observed.
    pub tx_doorbells: u64,
    /// Command descriptors consumed.
    pub commands: u64,
    /// Completions written.
    pub completions: u64,
    /// Frames received from ports.
    pub rx_frames: u64,
    /// Frames that hit a flow.
    pub hits: u64,
    /// Frames punted to the RX ring.
    pub punts: u64,
    /// Frames dropped.
    pub drops: u64,
    /// Frames sent to ports.
    pub tx_frames: u64,
    /// Interrupt messages (eventfd signals) sent.
    pub interrupts: u64,
    /// Resets completed.
    pub resets: u64,
    /// Injected faults that took effect.
    pub faults_fired: u64,
}

impl From<SimStats> for WireStats {
    fn from(s: SimStats) -> Self {
        Self {
            busy_polls: s.busy_polls,
            cmd_doorbells: s.cmd_doorbells,
            cpl_doorbells: s.cpl_doorbells,
            rx_doorbells: s.rx_doorbells,
            tx_doorbells: s.tx_doorbells,
            commands: s.commands,
            completions: s.completions,
            rx_frames: s.rx_frames,
            hits: s.hits,
            punts: s.punts,
            drops: s.drops,
            tx_frames: s.tx_frames,
            interrupts: s.interrupts,
            resets: s.resets,
            faults_fired: s.faults_fired,
        }
    }
}

// ---- framing ---------------------------------------------------------------------

fn sock_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> Error {
    move |e| Error::io(op, e.into())
}

/// Sends one message with `fds` attached (`MSG_NOSIGNAL`: a closed peer is an
/// `EPIPE` error, not a signal).
pub fn send_message(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
        return Err(Error::BadControlMessage {
            reason: "message too long or too many descriptors",
        });
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::BadControlMessage {
            reason: "descriptors do not fit the control buffer",
        });
    }
    let sent = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(sock_err("send control message"))?;
    if sent != bytes.len() {
        return Err(Error::BadControlMessage {
            reason: "control message sent partially",
        });
    }
    Ok(())
}

/// One received message.
#[derive(Debug)]
pub struct Received {
    /// The bytes (empty at end of stream).
    pub bytes: Vec<u8>,
    /// The descriptors that came with it (close-on-exec).
    pub fds: Vec<OwnedFd>,
    /// The message was longer than [`MAX_MESSAGE`] and was cut.
    pub truncated: bool,
    /// More descriptors came than [`MAX_FDS`]; the kernel closed the excess.
    pub fds_truncated: bool,
}

/// Receives one message (blocking), with up to [`MAX_FDS`] descriptors.
pub fn recv_message(sock: BorrowedFd<'_>) -> Result<Received> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(sock_err("receive control message"))?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    buf.truncate(msg.bytes.min(MAX_MESSAGE));
    Ok(Received {
        bytes: buf,
        fds,
        truncated: msg.flags.contains(ReturnFlags::TRUNC),
        fds_truncated: msg.flags.contains(ReturnFlags::CTRUNC),
    })
}

/// Waits up to `timeout` for `sock` to become readable (or hung up); true if it is.
pub fn wait_readable(sock: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    });
    let mut pfd = [PollFd::new(&sock, PollFlags::IN)];
    match rustix::event::poll(&mut pfd, Some(&ts)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(Error::io("poll control socket", e.into())),
    }
}

/// A new `SOCK_SEQPACKET` Unix socket (close-on-exec).
fn seqpacket() -> Result<OwnedFd> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(sock_err("create control socket"))
}

/// Connects to a server's control socket at `path`.
pub fn connect(path: &Path) -> Result<OwnedFd> {
    let sock = seqpacket()?;
    let addr = SocketAddrUnix::new(path).map_err(sock_err("control socket path"))?;
    rustix::net::connect(&sock, &addr).map_err(sock_err("connect control socket"))?;
    Ok(sock)
}

// ---- server ----------------------------------------------------------------------

/// How the server behaves towards its clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerOptions {
    /// Stop the model and exit when a client that sent `hello` disconnects.
    pub exit_with_client: bool,
}

/// What a served model exposes to its clients.
#[derive(Debug)]
struct Shared {
    sim: SimThread,
    bar: Arc<SharedRegion>,
    iommu: SimIommu,
    irqs: Vec<OwnedFd>,
    faults: FaultHandle,
    clock: Option<Arc<AtomicU64>>,
    wires: Vec<Option<Mutex<MemPort>>>,
    num_ports: u8,
    stop: AtomicBool,
    opts: ServerOptions,
}

/// The control-socket server: a running model and a listening socket.
#[derive(Debug)]
pub struct Server {
    listener: OwnedFd,
    path: PathBuf,
    shared: Arc<Shared>,
}

impl Server {
    /// Binds `path` (which must not exist), then starts `sim` in a background thread
    /// with `clock`. `wires[p]` is the host end of a [`MemPort`] pair whose device end
    /// is attached to port `p`, reachable with `port_inject`/`port_drain`.
    pub fn new(
        sim: Simulator,
        clock: SimClock,
        wires: Vec<Option<MemPort>>,
        path: &Path,
        opts: ServerOptions,
    ) -> Result<Self> {
        let listener = seqpacket()?;
        let addr = SocketAddrUnix::new(path).map_err(sock_err("control socket path"))?;
        rustix::net::bind(&listener, &addr).map_err(sock_err("bind control socket"))?;
        let path = path.to_owned();
        // From here on the socket file is ours to remove.
        let guard = RemoveGuard(Some(path.clone()));
        rustix::net::listen(&listener, 8).map_err(sock_err("listen on control socket"))?;
        let bar = sim.bar();
        let iommu = sim.iommu();
        let irqs = sim.irq_fds()?;
        let faults = sim.faults();
        let num_ports = sim.config().num_ports;
        let manual = match &clock {
            SimClock::Manual(t) => Some(Arc::clone(t)),
            SimClock::Monotonic => None,
        };
        let wires = wires.into_iter().map(|w| w.map(Mutex::new)).collect();
        let sim = sim.spawn(clock);
        guard.disarm();
        Ok(Self {
            listener,
            path,
            shared: Arc::new(Shared {
                sim,
                bar,
                iommu,
                irqs,
                faults,
                clock: manual,
                wires,
                num_ports,
                stop: AtomicBool::new(false),
                opts,
            }),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves clients (one thread each) until a `shutdown` request, or until a client
    /// disconnects when [`ServerOptions::exit_with_client`] is set; then stops the
    /// model, removes the socket file and returns the model.
    pub fn run(self) -> Result<Simulator> {
        let result = self.accept_loop();
        self.shared.stop.store(true, Ordering::Release);
        let _ = std::fs::remove_file(&self.path);
        result?;
        let shared = Arc::into_inner(self.shared);
        // Client threads hold clones of `shared` until they notice `stop` (within a
        // tick); wait for them so that the model can be handed back.
        let shared = match shared {
            Some(s) => s,
            None => {
                return Err(Error::io(
                    "stop control threads",
                    std::io::Error::other("a client thread still holds the model"),
                ));
            }
        };
        Ok(shared.sim.stop())
    }

    fn accept_loop(&self) -> Result<()> {
        let mut clients = Vec::new();
        while !self.shared.stop.load(Ordering::Acquire) {
            if !wait_readable(self.listener.as_fd(), TICK)? {
                continue;
            }
            let conn = match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(c) => c,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN) => continue,
                Err(e) => return Err(Error::io("accept control connection", e.into())),
            };
            // A client that stops reading its replies must not block its thread (and
            // so shutdown) for ever: a reply that cannot be sent within the timeout
            // ends that connection.
            let _ = rustix::net::sockopt::set_socket_timeout(
                &conn,
                rustix::net::sockopt::Timeout::Send,
                Some(SEND_TIMEOUT),
            );
            let shared = Arc::clone(&self.shared);
            let spawned = std::thread::Builder::new()
                .name("nic-sim-control".into())
                .spawn(move || serve_client(&shared, &conn));
            match spawned {
                Ok(h) => clients.push(h),
                Err(e) => return Err(Error::io("spawn control thread", e)),
            }
            clients.retain(|h| !h.is_finished());
        }
        for h in clients {
            let _ = h.join();
        }
        Ok(())
    }
}

struct RemoveGuard(Option<PathBuf>);

impl RemoveGuard {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The DMA mappings one client made (`(iova, len)`), removed when it disconnects: a
/// client's memory goes away with it, as a VFIO container's mappings do when it closes.
#[derive(Debug, Default)]
struct ClientMappings(Vec<(u64, u64)>);

impl ClientMappings {
    /// What `req` will change in the IOVA space: (mapped, iova, len).
    fn change_of(req: &Request) -> Option<(bool, u64, u64)> {
        match *req {
            Request::DmaMap { iova, len, .. } => Some((true, iova, len)),
            Request::DmaUnmap { iova, len } => Some((false, iova, len)),
            _ => None,
        }
    }

    /// Notes a mapping change that succeeded.
    fn record(&mut self, (mapped, iova, len): (bool, u64, u64)) {
        if mapped {
            self.0.push((iova, len));
        } else {
            let end = iova.saturating_add(len);
            self.0
                .retain(|&(i, l)| !(i >= iova && i.saturating_add(l) <= end));
        }
    }

    /// Removes every mapping left; the device faults on a later access to them.
    fn release(&mut self, iommu: &SimIommu) {
        for (iova, len) in self.0.drain(..) {
            // Only whole mappings of this client are named, so this cannot split one;
            // one already unmapped (by another client) is simply gone.
            let _ = iommu.unmap(iova, len);
        }
    }
}

fn serve_client(shared: &Shared, conn: &OwnedFd) {
    let mut attached = false;
    let mut mappings = ClientMappings::default();
    while !shared.stop.load(Ordering::Acquire) {
        match wait_readable(conn.as_fd(), TICK) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => break,
        }
        let Ok(msg) = recv_message(conn.as_fd()) else {
            break;
        };
        if msg.bytes.is_empty() && msg.fds.is_empty() && !msg.truncated {
            // End of stream (a zero-length SEQPACKET message reads the same; it is not
            // a request either way).
            break;
        }
        let (id, reply, fds) = shared.handle(&msg, &mut mappings);
        attached |= matches!(reply, Reply::Hello { .. });
        let bytes = encode(id, &reply);
        if send_message(conn.as_fd(), &bytes, &fds).is_err() {
            break;
        }
    }
    mappings.release(&shared.iommu);
    if attached && shared.opts.exit_with_client {
        shared.stop.store(true, Ordering::Release);
    }
}

/// Encodes a reply; serialising these types cannot fail, but if it did the client
/// would still get an error reply.
fn encode(id: u64, reply: &Reply) -> Vec<u8> {
    let env = Envelope { id, body: reply };
    serde_json::to_vec(&env).unwrap_or_else(|_| {
        format!(r#"{{"id":{id},"reply":"error","kind":"failed","message":"cannot encode reply"}}"#)
            .into_bytes()
    })
}

fn error(kind: ErrorKind, message: impl Into<String>) -> Reply {
    Reply::Error {
        kind,
        message: message.into(),
    }
}

/// `e` and its sources, `: `-separated (for error replies and messages).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Only the `id` of a message whose body did not parse.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: u64,
}

impl Shared {
    fn handle<'a>(
        &'a self,
        msg: &Received,
        mappings: &mut ClientMappings,
    ) -> (u64, Reply, Vec<BorrowedFd<'a>>) {
        let id = serde_json::from_slice::<IdOnly>(&msg.bytes).map_or(0, |i| i.id);
        if msg.truncated {
            let m = format!("message longer than {MAX_MESSAGE} bytes");
            return (id, error(ErrorKind::BadMessage, m), Vec::new());
        }
        if msg.fds_truncated {
            let m = format!("more than {MAX_FDS} descriptors");
            return (id, error(ErrorKind::BadFds, m), Vec::new());
        }
        let req = match serde_json::from_slice::<Envelope<Request>>(&msg.bytes) {
            Ok(r) => r.body,
            Err(e) => return (id, error(ErrorKind::BadMessage, e.to_string()), Vec::new()),
        };
        let want_fds = usize::from(matches!(req, Request::DmaMap { .. }));
        if msg.fds.len() != want_fds {
            let m = format!(
                "{} descriptors attached, this request takes {want_fds}",
                msg.fds.len()
            );
            return (id, error(ErrorKind::BadFds, m), Vec::new());
        }
        let change = ClientMappings::change_of(&req);
        let (reply, fds) = self.dispatch(req, &msg.fds);
        if let (Some(c), Reply::Ok) = (change, &reply) {
            mappings.record(c);
        }
        (id, reply, fds)
    }

    fn dispatch<'a>(&'a self, req: Request, fds: &[OwnedFd]) -> (Reply, Vec<BorrowedFd<'a>>) {
        let done = |r: Result<()>| match r {
            Ok(()) => Reply::Ok,
            Err(e) => error(ErrorKind::Failed, chain(&e)),
        };
        let reply = match req {
            Request::Hello { version } => {
                if version != PROTOCOL_VERSION {
                    let m = format!("protocol version {version}, server speaks {PROTOCOL_VERSION}");
                    return (error(ErrorKind::Unsupported, m), Vec::new());
                }
                let mut out = vec![self.bar.as_fd()];
                out.extend(self.irqs.iter().map(AsFd::as_fd));
                let reply = Reply::Hello {
                    version: PROTOCOL_VERSION,
                    bar_size: BAR_SIZE,
                    vectors: u32::try_from(self.irqs.len()).unwrap_or(0),
                    num_ports: self.num_ports,
                    mem_ports: (0..self.num_ports)
                        .filter(|&p| self.wire(p).is_some())
                        .collect(),
                    manual_clock: self.clock.is_some(),
                };
                return (reply, out);
            }
            Request::DmaMap { iova, offset, len } => match fds.first() {
                Some(fd) => done(self.iommu.map(iova, fd.as_fd(), offset, len)),
                None => error(ErrorKind::BadFds, "dma_map needs the memfd"),
            },
            Request::DmaUnmap { iova, len } => done(self.iommu.unmap(iova, len)),
            Request::Flr => self.flr(),
            Request::Stats => Reply::Stats {
                stats: self.sim.stats().into(),
            },
            Request::Fault { fault } => {
                self.arm(fault);
                Reply::Ok
            }
            Request::SetTime { now_ns } => match &self.clock {
                Some(t) => {
                    t.store(now_ns, Ordering::Release);
                    Reply::Ok
                }
                None => error(
                    ErrorKind::Unsupported,
                    "the model runs on a monotonic clock",
                ),
            },
            Request::PortInject { port, frames } => self.inject(port, &frames),
            Request::PortDrain { port, max } => self.drain(port, max),
            Request::Shutdown => {
                self.stop.store(true, Ordering::Release);
                Reply::Ok
            }
        };
        (reply, Vec::new())
    }

    fn wire(&self, port: u8) -> Option<&Mutex<MemPort>> {
        self.wires.get(usize::from(port)).and_then(Option::as_ref)
    }

    fn arm(&self, fault: Fault) {
        let f = &self.faults;
        match fault {
            Fault::DropCompletions { n } => f.drop_completions(n),
            Fault::DeviceErrorNext { n } => f.device_error_next(n),
            Fault::TableFullAt { fill } => f.table_full_at(fill),
            Fault::Fatal { code, unit } => f.fatal_raw(code, unit),
            Fault::SpontaneousReset => f.spontaneous_reset(),
            Fault::CounterWrapSoon { flow_id } => f.counter_wrap_soon(flow_id),
            Fault::PreloadCounters {
                flow_id,
                packets,
                bytes,
            } => f.preload_counters(flow_id, packets, bytes),
            Fault::SlowCommands { delay_ns } => f.slow_commands(delay_ns),
            Fault::Clear => f.clear(),
        }
    }

    /// Requests an FLR and waits until the model has taken it over (`RESET_COUNT`
    /// moved, or `STATUS.RESETTING`), so that a driver polling for `READY` afterwards
    /// cannot see the state from before the reset.
    fn flr(&self) -> Reply {
        let reg = |r: regs::RegOffset| self.bar.load_u32_acquire(u64::from(r.get())).unwrap_or(0);
        let before = reg(regs::RESET_COUNT);
        self.sim.request_flr();
        let t0 = Instant::now();
        loop {
            let resetting = Status::from_bits_retain(reg(regs::STATUS)).contains(Status::RESETTING);
            if reg(regs::RESET_COUNT) != before || resetting {
                return Reply::Ok;
            }
            if t0.elapsed() >= FLR_TIMEOUT {
                let m = format!(
                    "the model did not start the FLR within {} ms",
                    FLR_TIMEOUT.as_millis()
                );
                return error(ErrorKind::Failed, m);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    fn inject(&self, port: u8, frames: &[Vec<u8>]) -> Reply {
        let Some(wire) = self.wire(port) else {
            return error(
                ErrorKind::Unsupported,
                format!("port {port} has no memory back-end"),
            );
        };
        if frames.len() > MAX_FRAMES {
            return error(
                ErrorKind::BadMessage,
                format!("more than {MAX_FRAMES} frames"),
            );
        }
        // All or nothing: check every frame before the first goes out.
        if let Some(i) = frames.iter().position(|f| f.len() > FRAME_BUF_SIZE) {
            let m = format!("frame {i} is longer than {FRAME_BUF_SIZE} bytes");
            return error(ErrorKind::Failed, m);
        }
        let mut wire = wire.lock().unwrap_or_else(PoisonError::into_inner);
        for (i, f) in frames.iter().enumerate() {
            if let Err(e) = wire.send(f) {
                return error(ErrorKind::Failed, format!("frame {i}: {}", chain(&e)));
            }
        }
        Reply::Ok
    }

    fn drain(&self, port: u8, max: u32) -> Reply {
        let Some(wire) = self.wire(port) else {
            return error(
                ErrorKind::Unsupported,
                format!("port {port} has no memory back-end"),
            );
        };
        let max = usize::try_from(max).unwrap_or(MAX_FRAMES).min(MAX_FRAMES);
        let mut wire = wire.lock().unwrap_or_else(PoisonError::into_inner);
        let frames = std::iter::from_fn(|| wire.recv_vec()).take(max).collect();
        Reply::Frames { frames }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format_is_pinned() {
        let r = Envelope {
            id: 7,
            body: Request::DmaMap {
                iova: 4096,
                offset: 0,
                len: 8192,
            },
        };
        let s = serde_json::to_string(&r).expect("encode");
        assert_eq!(
            s,
            r#"{"id":7,"op":"dma_map","iova":4096,"offset":0,"len":8192}"#
        );
        let f = Envelope {
            id: 1,
            body: Request::Fault {
                fault: Fault::DropCompletions { n: 2 },
            },
        };
        assert_eq!(
            serde_json::to_string(&f).expect("encode"),
            r#"{"id":1,"op":"fault","fault":{"kind":"drop_completions","n":2}}"#
        );
        let back: Envelope<Request> =
            serde_json::from_str(r#"{"op":"flr","id":3}"#).expect("decode");
        assert_eq!(back.id, 3);
        assert_eq!(back.body, Request::Flr);
    }

    #[test]
    fn reply_wire_format_is_pinned() {
        assert_eq!(
            String::from_utf8(encode(5, &Reply::Ok)).expect("utf8"),
            r#"{"id":5,"reply":"ok"}"#
        );
        let e = encode(0, &error(ErrorKind::BadFds, "x"));
        assert_eq!(
            String::from_utf8(e).expect("utf8"),
            r#"{"id":0,"reply":"error","kind":"bad_fds","message":"x"}"#
        );
    }

    #[test]
    fn garbage_does_not_parse() {
        for bad in [
            &b"not json"[..],
            br#"{"id":1}"#,
            br#"{"id":1,"op":"no_such_op"}"#,
            br#"{"id":1,"op":"dma_map","iova":-1,"offset":0,"len":1}"#,
            br#"{"id":1,"op":"port_drain","port":300,"max":1}"#,
        ] {
            assert!(serde_json::from_slice::<Envelope<Request>>(bad).is_err());
        }
    }

    #[test]
    fn framing_carries_descriptors() {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .expect("socketpair");
        let region = SharedRegion::create_memfd("t", 4096).expect("memfd");
        send_message(a.as_fd(), b"hi", &[region.as_fd()]).expect("send");
        assert!(wait_readable(b.as_fd(), Duration::from_secs(1)).expect("poll"));
        let m = recv_message(b.as_fd()).expect("recv");
        assert_eq!(m.bytes, b"hi");
        assert_eq!(m.fds.len(), 1);
        assert!(!m.truncated && !m.fds_truncated);
        let back = SharedRegion::from_memfd(m.fds.into_iter().next().expect("fd")).expect("map");
        region.write_u32(0, 0xfeed).expect("write");
        assert_eq!(back.read_u32(0).expect("read"), 0xfeed);
        drop(a);
        let eof = recv_message(b.as_fd()).expect("recv");
        assert!(eof.bytes.is_empty() && eof.fds.is_empty());
    }
}
