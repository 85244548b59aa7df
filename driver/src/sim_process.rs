//! The simulator as a separate process: a client of the `ctoffload-nic-sim` control
//! socket (device.md section 19.4) that builds a [`SimIo`].
//!
//! The socket is a Unix `SOCK_SEQPACKET` connection; each packet is one JSON message,
//! and file descriptors travel as `SCM_RIGHTS`. [`SimProcess::attach`] says `hello`,
//! receives the BAR0 memfd and the MSI-X eventfds, and returns a [`SimIo`] whose DMA
//! registration sends each DMA memfd to the simulator (`dma_map`) and whose function
//! reset is the `flr` request. [`crate::device::Device`] runs on it unchanged.
//!
//! If the simulator process dies, a watcher thread sees its end of the socket close
//! and marks the connection gone: register accesses through the [`SimIo`] and every
//! later request fail with [`DriverError::SimGone`]; a request in flight fails the same
//! way (or with a [`DriverError::SimControl`] timeout if the process hangs). Nothing
//! blocks for longer than the request timeout.
//!
//! The driver does not depend on `nic-sim`: the message types here are the client's
//! half of the protocol the simulator documents; the integration tests in
//! `nic-sim/tests/process_mode.rs` run both halves against each other.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::error::{DriverError, Result};
use crate::sim_io::SimIo;

/// The protocol version this client speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message either side sends.
const MAX_MESSAGE: usize = 160 * 1024;
/// Most descriptors in one message.
const MAX_FDS: usize = 4;
/// How often the watcher looks at its stop flag.
const WATCH_TICK: Duration = Duration::from_millis(50);
/// Default time to wait for a reply.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A fault to arm in the simulator (device.md section 19.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimFault {
    /// The next `n` completions are never written (command timeout).
    DropCompletions {
        /// Commands.
        n: u32,
    },
    /// The next `n` commands complete `DEVICE_ERROR`.
    DeviceErrorNext {
        /// Commands.
        n: u32,
    },
    /// Inserts return `TABLE_FULL` once the table holds `fill` entries.
    TableFullAt {
        /// Fill level.
        fill: u32,
    },
    /// Enters the fatal state with this raw code and unit.
    Fatal {
        /// `FATAL_CODE`.
        code: u32,
        /// `FATAL_UNIT`.
        unit: u32,
    },
    /// A device-internal reset (table lost).
    SpontaneousReset,
    /// Sets a flow's counters so that they wrap within a packet.
    CounterWrapSoon {
        /// Slot.
        flow_id: u32,
    },
    /// Sets a flow's counters.
    PreloadCounters {
        /// Slot.
        flow_id: u32,
        /// Packets.
        packets: u32,
        /// Bytes.
        bytes: u64,
    },
    /// Each command takes `delay_ns` of model time.
    SlowCommands {
        /// Nanoseconds.
        delay_ns: u64,
    },
    /// Disarms every fault.
    Clear,
}

#[derive(Debug, Serialize)]
struct Envelope<T> {
    id: u64,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request<'a> {
    Hello { version: u32 },
    DmaMap { iova: u64, offset: u64, len: u64 },
    DmaUnmap { iova: u64, len: u64 },
    Flr,
    Stats,
    Fault { fault: SimFault },
    SetTime { now_ns: u64 },
    PortInject { port: u8, frames: &'a [&'a [u8]] },
    PortDrain { port: u8, max: u32 },
    Shutdown,
}

impl Request<'_> {
    fn op(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::DmaMap { .. } => "dma_map",
            Self::DmaUnmap { .. } => "dma_unmap",
            Self::Flr => "flr",
            Self::Stats => "stats",
            Self::Fault { .. } => "fault",
            Self::SetTime { .. } => "set_time",
            Self::PortInject { .. } => "port_inject",
            Self::PortDrain { .. } => "port_drain",
            Self::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Deserialize)]
struct ReplyEnvelope {
    #[serde(default)]
    id: u64,
    #[serde(flatten)]
    body: Reply,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
enum Reply {
    Hello {
        version: u32,
        bar_size: u64,
        vectors: u32,
        num_ports: u8,
        mem_ports: Vec<u8>,
        manual_clock: bool,
    },
    Ok,
    Stats {
        stats: BTreeMap<String, u64>,
    },
    Frames {
        frames: Vec<Vec<u8>>,
    },
    Error {
        kind: String,
        message: String,
    },
}

/// What the simulator said in answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimInfo {
    /// Protocol version.
    pub version: u32,
    /// Size of the BAR file.
    pub bar_size: u64,
    /// MSI-X vectors.
    pub vectors: u32,
    /// `NUM_PORTS`.
    pub num_ports: u8,
    /// Ports reachable with [`SimProcess::port_inject`] / [`SimProcess::port_drain`].
    pub mem_ports: Vec<u8>,
    /// Whether model time is set with [`SimProcess::set_time`].
    pub manual_clock: bool,
}

struct Inner {
    sock: Mutex<OwnedFd>,
    path: String,
    next_id: AtomicU64,
    gone: Arc<AtomicBool>,
    timeout: Duration,
    stop: Arc<AtomicBool>,
    watcher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let h = self
            .watcher
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

/// A connection to a `ctoffload-nic-sim` process. Cheap to clone (one connection).
#[derive(Clone)]
pub struct SimProcess {
    inner: Arc<Inner>,
}

impl fmt::Debug for SimProcess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimProcess")
            .field("socket", &self.inner.path)
            .field("gone", &self.is_gone())
            .finish_non_exhaustive()
    }
}

/// Polls `fd` for `events` up to `timeout`; the returned flags are empty on timeout.
fn poll_one(
    fd: BorrowedFd<'_>,
    events: PollFlags,
    timeout: Duration,
) -> rustix::io::Result<PollFlags> {
    let ts = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    });
    let mut pfd = [PollFd::new(&fd, events)];
    match rustix::event::poll(&mut pfd, Some(&ts)) {
        Ok(0) | Err(rustix::io::Errno::INTR) => Ok(PollFlags::empty()),
        Ok(_) => Ok(pfd[0].revents()),
        Err(e) => Err(e),
    }
}

impl SimProcess {
    /// Connects to the control socket at `path`, retrying for up to `timeout` while the
    /// socket does not exist yet or refuses (the process is starting), and starts the
    /// watcher. Requests wait [`DEFAULT_REQUEST_TIMEOUT`] for their reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        Self::connect_with(path, timeout, DEFAULT_REQUEST_TIMEOUT)
    }

    /// [`SimProcess::connect`] with a request timeout.
    pub fn connect_with(path: &Path, timeout: Duration, request_timeout: Duration) -> Result<Self> {
        let name = path.display().to_string();
        let sock_err = |op| {
            let socket = name.clone();
            move |e: rustix::io::Errno| DriverError::SimSocket {
                socket,
                op,
                source: e.into(),
            }
        };
        let addr = SocketAddrUnix::new(path).map_err(sock_err("socket path"))?;
        let t0 = Instant::now();
        let sock = loop {
            let sock = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )
            .map_err(sock_err("socket"))?;
            match rustix::net::connect(&sock, &addr) {
                Ok(()) => break sock,
                // Not listening yet: the process is starting.
                Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED)
                    if t0.elapsed() < timeout =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(sock_err("connect")(e)),
            }
        };
        // A simulator that stops reading must not block a request for ever.
        rustix::net::sockopt::set_socket_timeout(
            &sock,
            rustix::net::sockopt::Timeout::Send,
            Some(request_timeout.max(Duration::from_millis(1))),
        )
        .map_err(sock_err("set send timeout"))?;
        let watch_fd = sock.try_clone().map_err(|e| DriverError::SimSocket {
            socket: name.clone(),
            op: "dup",
            source: e,
        })?;
        let gone = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let watcher = {
            let (gone, stop) = (Arc::clone(&gone), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("nic-sim-watch".into())
                .spawn(move || watch(&watch_fd, &gone, &stop))
                .map_err(|e| DriverError::SimSocket {
                    socket: name.clone(),
                    op: "spawn watcher thread",
                    source: e,
                })?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                sock: Mutex::new(sock),
                path: name,
                next_id: AtomicU64::new(1),
                gone,
                timeout: request_timeout,
                stop,
                watcher: Mutex::new(Some(watcher)),
            }),
        })
    }

    /// Whether the simulator process is known to be gone.
    pub fn is_gone(&self) -> bool {
        self.inner.gone.load(Ordering::Acquire)
    }

    /// The control socket's path.
    pub fn socket_path(&self) -> &str {
        &self.inner.path
    }

    /// Says `hello` and returns the simulator's description, the BAR0 fd and the
    /// MSI-X eventfds (index = vector).
    pub fn hello(&self) -> Result<(SimInfo, OwnedFd, Vec<OwnedFd>)> {
        let req = Request::Hello {
            version: PROTOCOL_VERSION,
        };
        let (reply, fds) = self.request(&req, &[])?;
        let Reply::Hello {
            version,
            bar_size,
            vectors,
            num_ports,
            mem_ports,
            manual_clock,
        } = reply
        else {
            return Err(unexpected("hello", &reply));
        };
        let want = usize::try_from(vectors)
            .unwrap_or(usize::MAX)
            .saturating_add(1);
        if fds.len() != want {
            return Err(DriverError::SimControl {
                op: "hello",
                reason: format!("{} descriptors received, expected {want}", fds.len()),
            });
        }
        let mut fds = fds.into_iter();
        let bar = fds.next().ok_or_else(|| DriverError::SimControl {
            op: "hello",
            reason: "no BAR descriptor".into(),
        })?;
        let info = SimInfo {
            version,
            bar_size,
            vectors,
            num_ports,
            mem_ports,
            manual_clock,
        };
        Ok((info, bar, fds.collect()))
    }

    /// Says `hello` and builds a [`SimIo`] on what comes back: DMA registration and
    /// function reset go over this connection, and register accesses fail with
    /// [`DriverError::SimGone`] once the process is gone.
    pub fn attach(&self) -> Result<SimIo> {
        let (_, bar, irqs) = self.hello()?;
        let mapper = self.clone();
        let resetter = self.clone();
        let io = SimIo::new(
            bar.as_fd(),
            Box::new(move |iova, fd, offset, len| {
                mapper.dma_map(iova, fd, offset, len).map_err(|e| chain(&e))
            }),
            irqs,
        )?
        .with_reset(Box::new(move || resetter.flr().map_err(|e| chain(&e))))
        .with_liveness(Arc::clone(&self.inner.gone), &self.inner.path);
        Ok(io)
    }

    /// Maps `len` bytes of the memfd `fd`, from `offset`, at `iova` in the simulator's
    /// IOMMU (the memfd must be sealed against shrinking).
    pub fn dma_map(&self, iova: u64, fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
        self.ok(&Request::DmaMap { iova, offset, len }, &[fd])
    }

    /// Removes the whole mappings inside `[iova, iova + len)`.
    pub fn dma_unmap(&self, iova: u64, len: u64) -> Result<()> {
        self.ok(&Request::DmaUnmap { iova, len }, &[])
    }

    /// Function-level reset; returns once the simulator has started it.
    pub fn flr(&self) -> Result<()> {
        self.ok(&Request::Flr, &[])
    }

    /// The simulator's statistics (`SimStats` field names).
    pub fn stats(&self) -> Result<BTreeMap<String, u64>> {
        match self.request(&Request::Stats, &[])? {
            (Reply::Stats { stats }, _) => Ok(stats),
            (r, _) => Err(unexpected("stats", &r)),
        }
    }

    /// Arms a fault.
    pub fn inject_fault(&self, fault: SimFault) -> Result<()> {
        self.ok(&Request::Fault { fault }, &[])
    }

    /// Sets model time (simulator started with `--clock manual`).
    pub fn set_time(&self, now_ns: u64) -> Result<()> {
        self.ok(&Request::SetTime { now_ns }, &[])
    }

    /// Puts frames on the wire side of memory port `port` (the device receives them).
    pub fn port_inject(&self, port: u8, frames: &[&[u8]]) -> Result<()> {
        self.ok(&Request::PortInject { port, frames }, &[])
    }

    /// Takes up to `max` frames the device sent out of memory port `port`.
    pub fn port_drain(&self, port: u8, max: u32) -> Result<Vec<Vec<u8>>> {
        match self.request(&Request::PortDrain { port, max }, &[])? {
            (Reply::Frames { frames }, _) => Ok(frames),
            (r, _) => Err(unexpected("port_drain", &r)),
        }
    }

    /// Asks the simulator process to stop and exit.
    pub fn shutdown(&self) -> Result<()> {
        self.ok(&Request::Shutdown, &[])
    }

    fn ok(&self, req: &Request<'_>, fds: &[BorrowedFd<'_>]) -> Result<()> {
        match self.request(req, fds)? {
            (Reply::Ok, _) => Ok(()),
            (r, _) => Err(unexpected(req.op(), &r)),
        }
    }

    fn gone_err(&self) -> DriverError {
        DriverError::SimGone {
            socket: self.inner.path.clone(),
        }
    }

    /// Sends `req` and waits for the reply with its id (replies to earlier requests
    /// that timed out are dropped).
    fn request(&self, req: &Request<'_>, fds: &[BorrowedFd<'_>]) -> Result<(Reply, Vec<OwnedFd>)> {
        let op = req.op();
        if self.is_gone() {
            return Err(self.gone_err());
        }
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = serde_json::to_vec(&Envelope { id, body: req }).map_err(|e| {
            DriverError::SimControl {
                op,
                reason: format!("cannot encode: {e}"),
            }
        })?;
        if bytes.len() > MAX_MESSAGE || fds.len() > MAX_FDS {
            return Err(DriverError::SimControl {
                op,
                reason: format!("request of {} bytes is too long", bytes.len()),
            });
        }
        let sock = self
            .inner
            .sock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let sock_err = |what, e: rustix::io::Errno| {
            if matches!(e, rustix::io::Errno::PIPE | rustix::io::Errno::CONNRESET) {
                self.inner.gone.store(true, Ordering::Release);
                return self.gone_err();
            }
            DriverError::SimSocket {
                socket: self.inner.path.clone(),
                op: what,
                source: e.into(),
            }
        };
        send(sock.as_fd(), &bytes, fds).map_err(|e| sock_err("send", e))?;
        let t0 = Instant::now();
        loop {
            let left = self.inner.timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                return Err(DriverError::SimControl {
                    op,
                    reason: format!("no reply within {} ms", self.inner.timeout.as_millis()),
                });
            }
            let ready = poll_one(sock.as_fd(), PollFlags::IN, left.min(WATCH_TICK))
                .map_err(|e| sock_err("poll", e))?;
            if ready.is_empty() {
                continue;
            }
            let (buf, fds_in, truncated) =
                recv(sock.as_fd()).map_err(|e| sock_err("receive", e))?;
            if buf.is_empty() && fds_in.is_empty() {
                // End of stream: the simulator closed the connection or died.
                self.inner.gone.store(true, Ordering::Release);
                return Err(self.gone_err());
            }
            if truncated {
                return Err(DriverError::SimControl {
                    op,
                    reason: "reply truncated".into(),
                });
            }
            let reply: ReplyEnvelope =
                serde_json::from_slice(&buf).map_err(|e| DriverError::SimControl {
                    op,
                    reason: format!("malformed reply: {e}"),
                })?;
            if reply.id == id {
                if let Reply::Error { kind, message } = reply.body {
                    return Err(DriverError::SimControl {
                        op,
                        reason: format!("{kind}: {message}"),
                    });
                }
                return Ok((reply.body, fds_in));
            }
            // A late reply to an earlier request that timed out: drop it (and its fds).
        }
    }
}

fn unexpected(op: &'static str, r: &Reply) -> DriverError {
    DriverError::SimControl {
        op,
        reason: format!("unexpected reply {r:?}"),
    }
}

/// `e` and its sources, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn send(sock: BorrowedFd<'_>, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> rustix::io::Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(rustix::io::Errno::NOBUFS);
    }
    let n = rustix::net::sendmsg(
        sock,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    if n != bytes.len() {
        return Err(rustix::io::Errno::MSGSIZE);
    }
    Ok(())
}

/// Receives one message: bytes, descriptors (close-on-exec) and whether it was cut.
fn recv(sock: BorrowedFd<'_>) -> rustix::io::Result<(Vec<u8>, Vec<OwnedFd>, bool)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let msg = rustix::net::recvmsg(
        sock,
        &mut [IoSliceMut::new(&mut buf)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    buf.truncate(msg.bytes.min(MAX_MESSAGE));
    let cut = msg
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC);
    Ok((buf, fds, cut))
}

/// Watches the connection for the simulator's end closing; sets `gone` when it does.
fn watch(sock: &OwnedFd, gone: &AtomicBool, stop: &AtomicBool) {
    while !stop.load(Ordering::Acquire) {
        match poll_one(sock.as_fd(), PollFlags::RDHUP, WATCH_TICK) {
            Ok(f) if f.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) => {
                gone.store(true, Ordering::Release);
                return;
            }
            Ok(_) => {}
            Err(_) => {
                gone.store(true, Ordering::Release);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding_matches_the_documented_format() {
        let frames: [&[u8]; 1] = [&[1, 2]];
        let cases = [
            (
                Request::DmaMap {
                    iova: 4096,
                    offset: 0,
                    len: 8192,
                },
                r#"{"id":9,"op":"dma_map","iova":4096,"offset":0,"len":8192}"#,
            ),
            (
                Request::Fault {
                    fault: SimFault::Fatal { code: 1, unit: 2 },
                },
                r#"{"id":9,"op":"fault","fault":{"kind":"fatal","code":1,"unit":2}}"#,
            ),
            (
                Request::PortInject {
                    port: 1,
                    frames: &frames,
                },
                r#"{"id":9,"op":"port_inject","port":1,"frames":[[1,2]]}"#,
            ),
            (Request::Flr, r#"{"id":9,"op":"flr"}"#),
        ];
        for (req, want) in cases {
            let got = serde_json::to_string(&Envelope { id: 9, body: &req }).expect("encode");
            assert_eq!(got, want);
        }
    }

    #[test]
    fn replies_decode() {
        let r: ReplyEnvelope =
            serde_json::from_str(r#"{"id":4,"reply":"error","kind":"bad_fds","message":"m"}"#)
                .expect("decode");
        assert_eq!(r.id, 4);
        assert!(matches!(r.body, Reply::Error { ref kind, .. } if kind == "bad_fds"));
        let r: ReplyEnvelope =
            serde_json::from_str(r#"{"id":1,"reply":"stats","stats":{"hits":3}}"#).expect("decode");
        assert!(matches!(r.body, Reply::Stats { ref stats } if stats.get("hits") == Some(&3)));
    }

    #[test]
    fn connect_to_nothing_fails_after_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t0 = Instant::now();
        let e = SimProcess::connect(&dir.path().join("none"), Duration::from_millis(100))
            .expect_err("nothing listens");
        assert!(
            matches!(e, DriverError::SimSocket { op: "connect", .. }),
            "{e:?}"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
