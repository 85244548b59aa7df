//! The register engine: bring-up, the command/completion rings, bulk counters, table
//! dump, the exception RX and host TX rings, fault detection and recovery.
//!
//! It follows docs/device.md section 18 for bring-up and sections 5–7, 13, 14 and 17
//! for the rings and faults, over any [`DeviceIo`].
//!
//! # Ordering of flow commands
//!
//! Commands go through one ring and the device executes and completes them in ring
//! order, so a delete never overtakes the insert it undoes. [`Device::submit`] accepts
//! a *prefix* of the batch when the ring is nearly full; the caller must resubmit the
//! rest before anything newer, and must never reorder commands for the same key.
//!
//! # Hot path
//!
//! [`Device::submit`] writes descriptors into host memory and rings the CMD `TAIL`
//! doorbell once per batch; [`Device::reap`] finds completions by their phase bit in
//! host memory and rings the CPL `HEAD` doorbell once per reaped batch. Neither reads
//! a register.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

use ctoffload_hw_regs::limits::{CMD_MAX_NS, CMD_TIMEOUT_NS, DUMP_NS_PER_RECORD, RESET_TIMEOUT_NS};
use ctoffload_hw_regs::pci::MSIX_VECTOR_EVENT;
use ctoffload_hw_regs::regs::{
    self, Ctrl, Features, IntCause, RegOffset, RingMaxLog2, RingRegOffsets, SpecVersion, Status,
};
use ctoffload_hw_regs::{
    CommandDescriptor, Completion, CompletionStatus, FlowAction, FlowCounters, FlowId, FlowKey,
    Opcode, RxDescriptor, RxReason, RxStatus, TableDumpRecord, TxDescriptor, TxError, TxStatus,
};

use crate::counters::{CounterDump, CounterSample};
use crate::error::{DriverError, Result};
use crate::io::{DeviceIo, DmaRegion, MmioStats};
use crate::rings::RingGeom;

/// A clock in nanoseconds, passed in (tests drive it by hand).
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Clock")
    }
}

impl Clock {
    /// Monotonic wall time since the clock was made.
    pub fn monotonic() -> Self {
        let t0 = Instant::now();
        Self(Arc::new(move || {
            u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX)
        }))
    }

    /// A clock that reads `now` (set it with `store`).
    pub fn manual(now: Arc<AtomicU64>) -> Self {
        Self(Arc::new(move || now.load(Ordering::Relaxed)))
    }

    /// Now, in ns.
    pub fn now_ns(&self) -> u64 {
        (self.0)()
    }
}

/// Engine configuration. Ring sizes are clamped to the device's `RING_MAX_LOG2`.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Requested CMD ring `SIZE_LOG2` (CPL uses the same, at least).
    pub cmd_ring_log2: u8,
    /// Requested RX ring `SIZE_LOG2`.
    pub rx_ring_log2: u8,
    /// Requested TX ring `SIZE_LOG2`.
    pub tx_ring_log2: u8,
    /// A command outstanding longer than this is a [`DeviceEvent::CommandTimeout`].
    pub cmd_timeout_ns: u64,
    /// Bring-up: wait for `READY` after reset.
    pub ready_timeout: Duration,
    /// Bring-up: wait for `ENABLED`.
    pub enable_timeout: Duration,
    /// Reset with the backend's function reset (FLR) instead of `CTRL.SOFT_RESET`.
    pub use_flr: bool,
    /// Records per dump command (the dump buffer holds this many table records).
    pub dump_chunk: u32,
    /// Clock for command timeouts.
    pub clock: Clock,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            cmd_ring_log2: 10,
            rx_ring_log2: 8,
            tx_ring_log2: 8,
            cmd_timeout_ns: CMD_TIMEOUT_NS,
            ready_timeout: Duration::from_nanos(RESET_TIMEOUT_NS),
            enable_timeout: Duration::from_millis(10),
            use_flr: false,
            dump_chunk: 4096,
            clock: Clock::monotonic(),
        }
    }
}

impl DeviceConfig {
    /// For a software model of the device sharing busy cores with the agent: rings of
    /// 4096 and timeouts of seconds (a slow poll of the model is not a lost
    /// completion or a dead device).
    #[must_use]
    pub fn for_simulator(clock: Clock) -> Self {
        Self {
            cmd_ring_log2: 12,
            rx_ring_log2: 12,
            tx_ring_log2: 12,
            clock,
            cmd_timeout_ns: 1_000_000_000,
            ready_timeout: Duration::from_secs(2),
            enable_timeout: Duration::from_secs(2),
            ..Self::default()
        }
    }
}

/// The capability registers, read at bring-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `SPEC_VERSION`.
    pub spec: SpecVersion,
    /// `IMPL_ID`.
    pub impl_id: u32,
    /// `FEATURES`.
    pub features: Features,
    /// `FLOW_CAPACITY`.
    pub flow_capacity: u32,
    /// `BUCKETS_LOG2`.
    pub buckets_log2: u32,
    /// `WAYS`.
    pub ways: u32,
    /// `FLOW_LIMIT`.
    pub flow_limit: u32,
    /// `NUM_PORTS`.
    pub num_ports: u32,
    /// `RING_MAX_LOG2`.
    pub ring_max: RingMaxLog2,
    /// `TIMESTAMP_FREQ`.
    pub timestamp_freq: u32,
    /// `MAX_FRAME_LEN`.
    pub max_frame_len: u32,
}

/// A flow command. Every command gets a cookie ([`Token`]) echoed in its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowCommand {
    /// `FLOW_INSERT`.
    Insert {
        /// Key.
        key: FlowKey,
        /// Action.
        action: FlowAction,
    },
    /// `FLOW_DELETE` by slot; the slot must still hold `key`.
    Delete {
        /// Slot from the insert's completion.
        flow_id: FlowId,
        /// Key.
        key: FlowKey,
    },
    /// `FLOW_DELETE` with `BY_KEY`.
    DeleteByKey {
        /// Key.
        key: FlowKey,
    },
    /// `FLOW_MODIFY`.
    Modify {
        /// Slot.
        flow_id: FlowId,
        /// Key the slot must hold.
        key: FlowKey,
        /// New action.
        action: FlowAction,
    },
    /// `FLOW_QUERY`.
    Query {
        /// Key.
        key: FlowKey,
    },
    /// `NOP` (ping/barrier).
    Nop,
    /// A raw descriptor, sent as is except for the cookie (tests, new opcodes).
    Raw(CommandDescriptor),
}

impl FlowCommand {
    fn descriptor(&self, cookie: u32) -> CommandDescriptor {
        match self {
            Self::Insert { key, action } => CommandDescriptor::flow_insert(cookie, key, action),
            Self::Delete { flow_id, key } => CommandDescriptor::flow_delete(cookie, *flow_id, key),
            Self::DeleteByKey { key } => CommandDescriptor::flow_delete_by_key(cookie, key),
            Self::Modify {
                flow_id,
                key,
                action,
            } => CommandDescriptor::flow_modify(cookie, *flow_id, key, action),
            Self::Query { key } => CommandDescriptor::flow_query(cookie, key),
            Self::Nop => CommandDescriptor::nop(cookie),
            Self::Raw(d) => {
                let mut d = *d;
                d.cookie = ctoffload_hw_regs::Le32::new(cookie);
                d
            }
        }
    }
}

impl FlowCommand {
    /// The 128-byte descriptor image and its opcode byte. Inserts (the hot path) are
    /// encoded straight into the image (header, key image, action image); the other
    /// commands go through [`CommandDescriptor`]. Both give the same bytes (tested).
    fn encode(&self, cookie: u32) -> ([u8; CommandDescriptor::SIZE], u8) {
        match self {
            Self::Insert { key, action } => {
                let opcode = Opcode::FlowInsert.raw();
                let mut b = [0u8; CommandDescriptor::SIZE];
                b[0] = opcode;
                b[4..8].copy_from_slice(&cookie.to_le_bytes());
                b[16..64].copy_from_slice(&key.to_bytes());
                b[64..128].copy_from_slice(&action.to_bytes());
                (b, opcode)
            }
            _ => {
                let d = self.descriptor(cookie);
                (d.to_bytes(), d.opcode)
            }
        }
    }
}

/// Identifies a submitted command: its cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Token(u32);

impl Token {
    /// The cookie written in the descriptor.
    pub fn cookie(self) -> u32 {
        self.0
    }
}

/// The tokens of the accepted prefix of a batch (consecutive cookies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Submitted {
    first: u32,
    accepted: usize,
}

impl Submitted {
    /// How many commands of the batch were accepted (a prefix; 0 = ring full).
    pub fn accepted(&self) -> usize {
        self.accepted
    }

    /// The token of the `i`-th accepted command.
    pub fn token(&self, i: usize) -> Option<Token> {
        (i < self.accepted).then(|| Token(self.first.wrapping_add(u32::try_from(i).unwrap_or(0))))
    }

    /// All tokens, in submission order.
    pub fn tokens(&self) -> impl Iterator<Item = Token> + '_ {
        (0..self.accepted).filter_map(|i| self.token(i))
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The device completed it with this status.
    Status(CompletionStatus),
    /// The device completed it with an undefined status value.
    UnknownStatus(u8),
    /// It never completed: the device failed or was reset, or it timed out. Its effect
    /// is unknown until recovery, after which nothing is installed.
    Aborted,
}

/// The result of one command, matched to its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandResult {
    /// The command's token (cookie).
    pub token: Token,
    /// The opcode byte submitted.
    pub opcode: u8,
    /// The outcome.
    pub outcome: Outcome,
    /// Slot for insert `OK`/`EXISTS` and delete/modify/query `OK`.
    pub flow_id: Option<FlowId>,
    /// Slot generation where defined.
    pub generation: u8,
    /// Counters of a query or delete `OK`.
    pub counters: FlowCounters,
    /// `count` field (dumps: records written).
    pub count: u32,
}

impl CommandResult {
    /// `Outcome::Status(CompletionStatus::Ok)`.
    pub fn is_ok(&self) -> bool {
        self.outcome == Outcome::Status(CompletionStatus::Ok)
    }

    fn aborted(token: Token, opcode: u8) -> Self {
        Self {
            token,
            opcode,
            outcome: Outcome::Aborted,
            flow_id: None,
            generation: 0,
            counters: FlowCounters::default(),
            count: 0,
        }
    }
}

/// A device fault, for the agent to fall back to software and later recover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceEvent {
    /// `STATUS.FATAL`: raw `FATAL_CODE`/`FATAL_UNIT` (decode with
    /// `ctoffload_hw_regs::FatalCode::try_from`) and `FATAL_ADDR`.
    Fatal {
        /// `FATAL_CODE`.
        code: u32,
        /// `FATAL_UNIT`.
        unit: u32,
        /// `FATAL_ADDR` (DMA errors).
        addr: u64,
    },
    /// The device was reset (the table is gone); `count` is the new `RESET_COUNT`.
    Reset {
        /// `RESET_COUNT`.
        count: u32,
    },
    /// The oldest outstanding command has not completed within the timeout.
    CommandTimeout {
        /// Its cookie.
        cookie: u32,
    },
}

/// Metadata of one exception-path frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxMeta {
    /// Ingress port.
    pub port: u8,
    /// Punt reason (`Err(raw)` for an undefined value).
    pub reason: std::result::Result<RxReason, u8>,
    /// Matched entry for `TCP_CTRL`/`TTL_EXPIRED`.
    pub flow_id: Option<FlowId>,
    /// Device `TIMESTAMP` at reception.
    pub timestamp: u64,
    /// The frame carries an 802.1Q tag.
    pub vlan: bool,
}

/// One frame to transmit.
#[derive(Debug, Clone, Copy)]
pub struct TxFrame<'a> {
    /// Egress port.
    pub port: u8,
    /// The frame without FCS.
    pub data: &'a [u8],
}

/// Counts of completed TX descriptors.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxCompletions {
    /// Sent.
    pub sent: u64,
    /// Completed with `ERR`, by the last error code seen.
    pub errors: u64,
    /// The last error code.
    pub last_error: Option<std::result::Result<TxError, u8>>,
}

/// One installed entry read back by [`Device::dump_table`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableEntry {
    /// Slot.
    pub flow_id: FlowId,
    /// Generation.
    pub generation: u8,
    /// Key.
    pub key: FlowKey,
    /// Action.
    pub action: FlowAction,
}

#[derive(Debug, Clone, Copy)]
struct Inflight {
    cookie: u32,
    opcode: u8,
    submitted_ns: u64,
    internal: bool,
}

#[derive(Debug)]
struct Rings<D> {
    cmd_geom: RingGeom,
    cpl_geom: RingGeom,
    rx_geom: RingGeom,
    tx_geom: RingGeom,
    buf_size: usize,
    cmd: D,
    cpl: D,
    rx: D,
    rx_bufs: D,
    tx: D,
    tx_bufs: D,
    dump: D,
    dump_records: u32,
}

/// The asynchronous `COUNTER_DUMP` in flight (at most one: it owns the dump buffer).
#[derive(Debug, Clone, Copy)]
struct PendingDump {
    cookie: u32,
    first: u32,
    count: u32,
    /// A `CHANGED` dump: packed records of the entries hit since the last one.
    changed: bool,
    /// Its completion, once reaped.
    done: Option<Completion>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Up,
    Down,
}

/// A CTO-1 device behind a [`DeviceIo`].
pub struct Device<Io: DeviceIo> {
    io: Io,
    cfg: DeviceConfig,
    caps: Capabilities,
    rings: Rings<Io::Dma>,
    state: State,
    reset_count: u32,
    // CMD ring producer (slot) and cookies.
    cmd_tail: u32,
    next_cookie: u32,
    inflight: VecDeque<Inflight>,
    timeout_reported: Option<u32>,
    // CPL consumer and expected phase.
    cpl_head: u32,
    cpl_phase: bool,
    stash: VecDeque<CommandResult>,
    internal_done: Vec<(u32, Completion)>,
    counter_dump: Option<PendingDump>,
    // RX: next slot to check; producer index.
    rx_next: u32,
    rx_tail: u32,
    rx_scratch: Vec<u8>,
    // TX: producer, oldest not yet done, outstanding.
    tx_tail: u32,
    tx_clean: u32,
    tx_outstanding: u32,
    tx_done: TxCompletions,
    events: Vec<DeviceEvent>,
}

impl<Io: DeviceIo> fmt::Debug for Device<Io> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("caps", &self.caps)
            .field("state", &self.state)
            .field("inflight", &self.inflight.len())
            .field("reset_count", &self.reset_count)
            .finish_non_exhaustive()
    }
}

fn poll_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<bool> {
    let t0 = Instant::now();
    loop {
        if f()? {
            return Ok(true);
        }
        if t0.elapsed() >= timeout {
            return Ok(false);
        }
        std::thread::yield_now();
    }
}

/// How long a driver waiting for a dump sleeps between completion polls.
const DUMP_POLL_INTERVAL: Duration = Duration::from_micros(20);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn clamp_log2(want: u8, max: u8) -> u8 {
    want.clamp(2, max.max(2))
}

impl<Io: DeviceIo> Device<Io> {
    /// Brings the device up (device.md section 18) and returns the engine.
    pub fn new(mut io: Io, cfg: DeviceConfig) -> Result<Self> {
        let caps = reset_and_identify(&mut io, &cfg)?;
        let rings = alloc_rings(&mut io, &cfg, &caps)?;
        Self::with_rings(io, cfg, caps, rings)
    }

    /// Steps 6–10 of bring-up over a device that is ready and not enabled.
    fn with_rings(
        io: Io,
        cfg: DeviceConfig,
        caps: Capabilities,
        rings: Rings<Io::Dma>,
    ) -> Result<Self> {
        let scratch = vec![0u8; rings.buf_size];
        let mut dev = Self {
            io,
            cfg,
            caps,
            rings,
            state: State::Down,
            reset_count: 0,
            cmd_tail: 0,
            next_cookie: 1,
            inflight: VecDeque::new(),
            timeout_reported: None,
            cpl_head: 0,
            cpl_phase: true,
            stash: VecDeque::new(),
            internal_done: Vec::new(),
            counter_dump: None,
            rx_next: 0,
            rx_tail: 0,
            rx_scratch: scratch,
            tx_tail: 0,
            tx_clean: 0,
            tx_outstanding: 0,
            tx_done: TxCompletions::default(),
            events: Vec::new(),
        };
        dev.program_and_enable()?;
        Ok(dev)
    }

    /// Attaches to a device another driver instance left running (an agent restart),
    /// **without** resetting it: the flow table, its counters and generations survive
    /// and the datapath keeps forwarding (device.md section 17.5). A device still
    /// enabled (its previous driver died without detaching) is detached first; then
    /// new rings are programmed and the device is enabled again (section 18, steps
    /// 4–10 without the reset). Read the table back with
    /// [`dump_table`](Self::dump_table).
    ///
    /// # Errors
    /// [`DriverError::NotAttachable`] if the device is fatal, resetting, not ready or
    /// has no `FEATURES.DETACH` (use [`Device::new`]); register and bring-up errors as
    /// for `new`.
    pub fn attach(mut io: Io, cfg: DeviceConfig) -> Result<Self> {
        let status = io.read32(regs::STATUS)?;
        let s = Status::from_bits_retain(status);
        if s.contains(Status::FATAL) {
            return Err(read_fatal_error(&io)?);
        }
        if s.contains(Status::RESETTING) || !s.contains(Status::READY) {
            return Err(DriverError::NotAttachable {
                why: "resetting or not ready",
                status,
            });
        }
        let caps = identify(&io)?;
        if !caps.features.contains(Features::DETACH) {
            return Err(DriverError::NotAttachable {
                why: "no FEATURES.DETACH",
                status,
            });
        }
        if s.contains(Status::ENABLED) {
            detach_rings(&io, &cfg)?;
        }
        let rings = alloc_rings(&mut io, &cfg, &caps)?;
        Self::with_rings(io, cfg, caps, rings)
    }

    /// Leaves the device running without a reset (device.md section 17.5): the rings
    /// stop (outstanding commands are failed back and never complete), the device
    /// stops all DMA to host memory, and the flow table keeps forwarding until the
    /// next driver [`attach`](Self::attach)es. Returns the backend.
    ///
    /// # Errors
    /// The device did not report `DETACHED` in time, or has no `FEATURES.DETACH`.
    pub fn detach(mut self) -> Result<Io> {
        if !self.caps.features.contains(Features::DETACH) {
            return Err(DriverError::InvalidArgument {
                what: "device has no FEATURES.DETACH",
            });
        }
        self.go_down();
        detach_rings(&self.io, &self.cfg)?;
        Ok(self.io)
    }

    /// Runs bring-up again after a fault or reset: every outstanding command is failed
    /// back (as [`Outcome::Aborted`] from [`reap`](Self::reap)), the device is reset,
    /// checked, reprogrammed and enabled. The flow table is empty afterwards.
    pub fn reinit(&mut self) -> Result<()> {
        self.go_down();
        let caps = reset_and_identify(&mut self.io, &self.cfg)?;
        if caps != self.caps {
            self.rings = alloc_rings(&mut self.io, &self.cfg, &caps)?;
            self.rx_scratch = vec![0u8; self.rings.buf_size];
            self.caps = caps;
        }
        self.program_and_enable()
    }

    /// Stops the device (soft reset, waiting for `READY`) so that it does no more DMA,
    /// and returns the backend.
    pub fn shutdown(mut self) -> Result<Io> {
        self.go_down();
        self.io.write32(regs::CTRL, Ctrl::SOFT_RESET.bits())?;
        let io_ref = &self.io;
        let _ = poll_until(self.cfg.ready_timeout, || reset_done(io_ref))?;
        Ok(self.io)
    }

    /// The capabilities read at bring-up.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The backend.
    pub fn io(&self) -> &Io {
        &self.io
    }

    /// MMIO accesses so far (from the backend).
    pub fn mmio_stats(&self) -> MmioStats {
        self.io.mmio_stats()
    }

    /// Whether the device is up (false after a fault until [`reinit`](Self::reinit)).
    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// `RESET_COUNT` saved at bring-up.
    pub fn saved_reset_count(&self) -> u32 {
        self.reset_count
    }

    /// Commands submitted and not yet reaped.
    pub fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// Free command slots (`N − 1` minus outstanding).
    pub fn free_slots(&self) -> usize {
        let cap = usize::try_from(self.rings.cmd_geom.capacity()).unwrap_or(0);
        cap.saturating_sub(self.inflight.len())
    }

    /// Reads a register (diagnostics; not for the hot path).
    pub fn read_register(&self, reg: RegOffset) -> Result<u32> {
        self.io.read32(reg)
    }

    // ---- bring-up ----------------------------------------------------------------

    fn program_and_enable(&mut self) -> Result<()> {
        let io = &self.io;
        let r = &self.rings;
        // Step 5 (end): save RESET_COUNT.
        self.reset_count = io.read32(regs::RESET_COUNT)?;
        // Step 6: zero the rings (CPL phase bits 0, RX/TX status words 0).
        for d in [&r.cmd, &r.cpl, &r.rx, &r.tx] {
            d.memory().zero(0, d.memory().len())?;
        }
        // Step 7: ring registers.
        program_ring(io, &regs::CMD_RING, &r.cmd, r.cmd_geom)?;
        program_ring(io, &regs::CPL_RING, &r.cpl, r.cpl_geom)?;
        program_ring(io, &regs::RX_RING, &r.rx, r.rx_geom)?;
        program_ring(io, &regs::TX_RING, &r.tx, r.tx_geom)?;
        // Step 8: post N − 1 RX buffers; slot i always uses buffer i.
        let buf_len = u16::try_from(r.buf_size).unwrap_or(u16::MAX);
        let posted = r.rx_geom.capacity();
        for slot in 0..posted {
            let buf = rx_buf_iova(r, slot)?;
            let d = RxDescriptor::posted(buf, buf_len);
            r.rx.memory()
                .write_block(r.rx_geom.offset(slot), &d.to_bytes())?;
        }
        // Release: the posted descriptors are visible before the RX TAIL doorbell.
        fence(Ordering::Release);
        io.write32(regs::RX_TAIL, posted)?;
        // Step 9: clear stale causes, unmask everything.
        io.clear_bits32(regs::INT_CAUSE, IntCause::all().bits())?;
        io.write32(regs::INT_MASK, 0)?;
        // Step 10: enable, wait for ENABLED (or FATAL).
        io.write32(regs::CTRL, Ctrl::ENABLE.bits())?;
        let mut last = 0;
        let ok = poll_until(self.cfg.enable_timeout, || {
            last = io.read32(regs::STATUS)?;
            let s = Status::from_bits_retain(last);
            Ok(s.contains(Status::ENABLED) || s.contains(Status::FATAL))
        })?;
        if Status::from_bits_retain(last).contains(Status::FATAL) {
            return Err(read_fatal_error(io)?);
        }
        if !ok {
            return Err(DriverError::DeviceTimeout {
                what: "ENABLED",
                timeout_ms: ms(self.cfg.enable_timeout),
                status: last,
            });
        }
        // Our own reset raised RESET_DONE (vector 2): drain it so it is not reported.
        if let Some(fd) = self.io.irq(MSIX_VECTOR_EVENT) {
            let _ = fd.read()?;
        }
        self.cmd_tail = 0;
        self.cpl_head = 0;
        self.cpl_phase = true;
        self.rx_next = 0;
        self.rx_tail = posted;
        self.tx_tail = 0;
        self.tx_clean = 0;
        self.tx_outstanding = 0;
        self.timeout_reported = None;
        self.state = State::Up;
        Ok(())
    }

    /// Marks the device down and fails every outstanding command back to the caller.
    fn go_down(&mut self) {
        self.state = State::Down;
        // Internal commands die with the rings: a dump in flight never completes.
        self.counter_dump = None;
        self.internal_done.clear();
        for f in self.inflight.drain(..) {
            if !f.internal {
                self.stash
                    .push_back(CommandResult::aborted(Token(f.cookie), f.opcode));
            }
        }
        self.tx_outstanding = 0;
    }

    // ---- commands ----------------------------------------------------------------

    /// Queues a batch of commands: writes as many descriptors as there are free slots
    /// (a prefix of `cmds`), then **one** CMD `TAIL` doorbell. A full ring is
    /// back-pressure (`accepted() < cmds.len()`, possibly 0), not an error.
    pub fn submit(&mut self, cmds: &[FlowCommand]) -> Result<Submitted> {
        if self.state != State::Up {
            return Err(DriverError::DeviceDown);
        }
        let n = cmds.len().min(self.free_slots());
        let first = self.next_cookie;
        if n == 0 {
            return Ok(Submitted { first, accepted: 0 });
        }
        let now = self.cfg.clock.now_ns();
        let geom = self.rings.cmd_geom;
        self.inflight.reserve(n);
        for c in &cmds[..n] {
            let cookie = self.next_cookie;
            self.next_cookie = self.next_cookie.wrapping_add(1);
            let (image, opcode) = c.encode(cookie);
            self.rings
                .cmd
                .memory()
                .write_block(geom.offset(self.cmd_tail), &image)?;
            self.cmd_tail = geom.next(self.cmd_tail);
            self.inflight.push_back(Inflight {
                cookie,
                opcode,
                submitted_ns: now,
                internal: false,
            });
        }
        // Release: every descriptor written above is visible to the device before it
        // sees the new TAIL (device.md section 5.2).
        fence(Ordering::Release);
        self.io.write32(regs::CMD_TAIL, self.cmd_tail)?;
        Ok(Submitted { first, accepted: n })
    }

    fn submit_internal(&mut self, d: CommandDescriptor) -> Result<Option<u32>> {
        if self.free_slots() == 0 {
            return Ok(None);
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let mut d = d;
        d.cookie = ctoffload_hw_regs::Le32::new(cookie);
        let geom = self.rings.cmd_geom;
        self.rings
            .cmd
            .memory()
            .write_block(geom.offset(self.cmd_tail), &d.to_bytes())?;
        self.cmd_tail = geom.next(self.cmd_tail);
        self.inflight.push_back(Inflight {
            cookie,
            opcode: d.opcode,
            submitted_ns: self.cfg.clock.now_ns(),
            internal: true,
        });
        // Release: the descriptor is visible before the doorbell.
        fence(Ordering::Release);
        self.io.write32(regs::CMD_TAIL, self.cmd_tail)?;
        Ok(Some(cookie))
    }

    /// Appends the results of completed commands to `out` (in submission order) and
    /// returns how many. Reads completions from host memory by their phase bit and
    /// writes the CPL `HEAD` doorbell once if any were consumed. Never waits. After a
    /// fault, the outstanding commands come back here as [`Outcome::Aborted`].
    pub fn reap(&mut self, out: &mut Vec<CommandResult>) -> Result<usize> {
        let before = out.len();
        if !self.stash.is_empty() {
            out.extend(self.stash.drain(..));
        }
        if self.state == State::Up {
            self.reap_ring(out)?;
        }
        Ok(out.len() - before)
    }

    fn reap_ring(&mut self, out: &mut Vec<CommandResult>) -> Result<()> {
        let geom = self.rings.cpl_geom;
        let mut consumed = false;
        let mut buf = [0u8; Completion::SIZE];
        loop {
            let off = geom.offset(self.cpl_head);
            let mem = self.rings.cpl.memory();
            // Acquire: pairs with the device's ownership-word write (last, after the
            // body); if the phase says "new", the body read below is complete.
            let word = mem.load32_acquire(off + Completion::OWNERSHIP_WORD_OFFSET)?;
            let phase = (word >> 24) & 1 == 1;
            if phase != self.cpl_phase {
                break;
            }
            mem.read_block(off, &mut buf)?;
            let cpl = Completion::from_bytes(&buf);
            self.cpl_head = geom.next(self.cpl_head);
            if self.cpl_head == 0 {
                self.cpl_phase = !self.cpl_phase;
            }
            consumed = true;
            let Some(f) = self.inflight.pop_front() else {
                self.go_down();
                return Err(DriverError::CookieMismatch {
                    expected: 0,
                    found: cpl.cookie.get(),
                });
            };
            if cpl.cookie.get() != f.cookie {
                // A completion was lost (the device completed a later command): the
                // skipped commands' outcome is unknown, an insert among them may be
                // in the table. Section 18: a command timeout, remedied by a reset;
                // every outstanding command comes back aborted from the next reap.
                // A cookie we never issued is a protocol error.
                let found = cpl.cookie.get();
                let expected = f.cookie;
                let issued = self.inflight.iter().any(|x| x.cookie == found);
                self.inflight.push_front(f);
                self.go_down();
                if issued {
                    return Err(DriverError::CompletionLost {
                        cookie: expected,
                        found,
                    });
                }
                return Err(DriverError::CookieMismatch { expected, found });
            }
            if f.internal {
                self.internal_done.push((f.cookie, cpl));
                continue;
            }
            out.push(CommandResult {
                token: Token(f.cookie),
                opcode: f.opcode,
                outcome: match cpl.status() {
                    Ok(s) => Outcome::Status(s),
                    Err(_) => Outcome::UnknownStatus(cpl.status),
                },
                flow_id: cpl.flow_id(),
                generation: cpl.generation,
                counters: cpl.counters(),
                count: cpl.count.get(),
            });
        }
        if consumed {
            // One CPL HEAD doorbell per reaped batch returns the slots to the device.
            self.io.write32(regs::CPL_HEAD, self.cpl_head)?;
            if self.timeout_reported.is_some()
                && self.inflight.front().map(|f| f.cookie) != self.timeout_reported
            {
                self.timeout_reported = None;
            }
        }
        Ok(())
    }

    /// Waits (spinning, with `yield`) for one command's result, stashing the others
    /// for the next [`reap`](Self::reap). For simple callers and tests.
    pub fn wait_for(&mut self, token: Token, timeout: Duration) -> Result<CommandResult> {
        let t0 = Instant::now();
        loop {
            if let Some(i) = self.stash.iter().position(|r| r.token == token) {
                if let Some(r) = self.stash.remove(i) {
                    return Ok(r);
                }
            }
            if self.state == State::Up {
                let mut tmp = Vec::new();
                self.reap_ring(&mut tmp)?;
                self.stash.extend(tmp);
                if self.stash.iter().any(|r| r.token == token) {
                    continue;
                }
            } else if !self.inflight.iter().any(|f| f.cookie == token.0) {
                return Err(DriverError::DeviceDown);
            }
            if t0.elapsed() >= timeout {
                return Err(DriverError::CommandTimeout {
                    cookie: token.0,
                    timeout_ms: ms(timeout),
                });
            }
            std::thread::yield_now();
        }
    }

    /// Submits `cmds` (waiting for ring space) and waits for all their results.
    pub fn execute(
        &mut self,
        cmds: &[FlowCommand],
        timeout: Duration,
    ) -> Result<Vec<CommandResult>> {
        let t0 = Instant::now();
        let mut tokens = Vec::with_capacity(cmds.len());
        let mut rest = cmds;
        while !rest.is_empty() {
            let s = self.submit(rest)?;
            tokens.extend(s.tokens());
            rest = &rest[s.accepted()..];
            if !rest.is_empty() {
                let mut tmp = Vec::new();
                self.reap_ring(&mut tmp)?;
                self.stash.extend(tmp);
                if t0.elapsed() >= timeout {
                    return Err(DriverError::CommandTimeout {
                        cookie: self.next_cookie,
                        timeout_ms: ms(timeout),
                    });
                }
                std::thread::yield_now();
            }
        }
        let left = timeout.saturating_sub(t0.elapsed());
        tokens.into_iter().map(|t| self.wait_for(t, left)).collect()
    }

    // ---- dumps -------------------------------------------------------------------

    /// The timeout of a dump of `count` records: the command timeout plus the spec's
    /// dump allowance (section 18).
    fn dump_timeout(&self, count: u32) -> Duration {
        let allowance = CMD_MAX_NS + DUMP_NS_PER_RECORD * u64::from(count);
        Duration::from_nanos(self.cfg.cmd_timeout_ns.saturating_add(allowance))
    }

    /// Reaps the ring (flow results go to the stash for [`reap`](Self::reap)) and takes
    /// the completion of internal command `cookie` if it has come.
    fn take_internal(&mut self, cookie: u32) -> Result<Option<Completion>> {
        let mut tmp = Vec::new();
        self.reap_ring(&mut tmp)?;
        self.stash.extend(tmp);
        Ok(self
            .internal_done
            .iter()
            .position(|(c, _)| *c == cookie)
            .map(|i| self.internal_done.swap_remove(i).1))
    }

    /// Waits for internal command `cookie`, sleeping briefly between polls: the device
    /// is moving data by DMA meanwhile, and a spinning driver would only burn the CPU
    /// the agent's thread reports as its own.
    fn wait_internal(&mut self, cookie: u32, timeout: Duration) -> Result<Completion> {
        let t0 = Instant::now();
        loop {
            if let Some(cpl) = self.take_internal(cookie)? {
                return Ok(cpl);
            }
            if self.state != State::Up {
                return Err(DriverError::DeviceDown);
            }
            if t0.elapsed() >= timeout {
                return Err(DriverError::CommandTimeout {
                    cookie,
                    timeout_ms: ms(timeout),
                });
            }
            std::thread::sleep(DUMP_POLL_INTERVAL);
        }
    }

    /// Submits one internal command, reaping while the ring is full.
    fn submit_internal_waiting(&mut self, d: CommandDescriptor, timeout: Duration) -> Result<u32> {
        self.with_ring_space(timeout, |dev| dev.submit_internal(d))
    }

    /// Calls `attempt` until it finds room in the command ring (`Some`), reaping
    /// completions meanwhile (kept for [`reap`](Self::reap)).
    fn with_ring_space<T>(
        &mut self,
        timeout: Duration,
        mut attempt: impl FnMut(&mut Self) -> Result<Option<T>>,
    ) -> Result<T> {
        let t0 = Instant::now();
        loop {
            if let Some(v) = attempt(self)? {
                return Ok(v);
            }
            let mut tmp = Vec::new();
            self.reap_ring(&mut tmp)?;
            self.stash.extend(tmp);
            if t0.elapsed() >= timeout {
                return Err(DriverError::CommandTimeout {
                    cookie: 0,
                    timeout_ms: ms(timeout),
                });
            }
            std::thread::yield_now();
        }
    }

    /// Runs one synchronous dump command and waits for it. A counter dump started with
    /// [`start_counter_dump`](Self::start_counter_dump) is waited for first and its
    /// records are discarded (the buffer is about to be overwritten).
    fn run_dump(
        &mut self,
        mk: impl Fn(ctoffload_hw_regs::Iova) -> CommandDescriptor,
        count: u32,
    ) -> Result<()> {
        if self.state != State::Up {
            return Err(DriverError::DeviceDown);
        }
        if let Some(p) = self.counter_dump.take() {
            if p.done.is_none() {
                let t = self.dump_timeout(p.count);
                self.wait_internal(p.cookie, t)?;
            }
        }
        let buf = ctoffload_hw_regs::Iova::new(self.rings.dump.iova().raw());
        let timeout = self.dump_timeout(count);
        let cookie = self.submit_internal_waiting(mk(buf), timeout)?;
        let cpl = self.wait_internal(cookie, timeout)?;
        match cpl.status() {
            Ok(CompletionStatus::Ok) => Ok(()),
            _ => Err(DriverError::CommandFailed {
                what: "dump",
                status: cpl.status,
            }),
        }
    }

    fn check_range(&self, first: u32, count: u32) -> Result<()> {
        let end = first.checked_add(count);
        if count == 0 || end.is_none_or(|e| e > self.caps.flow_capacity) {
            return Err(DriverError::InvalidArgument {
                what: "slot range outside FLOW_CAPACITY",
            });
        }
        Ok(())
    }

    /// Records one `COUNTER_DUMP` can return (the dump buffer's size in 32-byte
    /// records).
    pub fn counter_dump_chunk(&self) -> u32 {
        self.rings.dump_records.saturating_mul(4)
    }

    /// Whether a counter dump started with [`start_counter_dump`](Self::start_counter_dump)
    /// has not been collected yet.
    pub fn counter_dump_pending(&self) -> bool {
        self.counter_dump.is_some()
    }

    /// Starts a `COUNTER_DUMP` of slots `[first, first + count)` (`count` at most
    /// [`counter_dump_chunk`](Self::counter_dump_chunk)) and returns without waiting:
    /// collect it with [`poll_counter_dump`](Self::poll_counter_dump). `Ok(false)`: the
    /// command ring is full, nothing was started. One dump at a time.
    pub fn start_counter_dump(&mut self, first: u32, count: u32) -> Result<bool> {
        self.start_counter_dump_as(first, count, false)
    }

    /// Whether the device reports only changed entries on request
    /// (`FEATURES.COUNTER_DUMP_CHANGED`, see
    /// [`start_changed_counter_dump`](Self::start_changed_counter_dump)).
    pub fn supports_changed_counter_dump(&self) -> bool {
        self.caps.features.contains(Features::COUNTER_DUMP_CHANGED)
    }

    /// As [`start_counter_dump`](Self::start_counter_dump), with the `CHANGED` flag:
    /// the dump holds one packed record per entry of the range hit since the last
    /// `CHANGED` dump of its slot (device.md 6.2), in slot order; each record names its
    /// slot ([`CounterDump::is_packed`]).
    pub fn start_changed_counter_dump(&mut self, first: u32, count: u32) -> Result<bool> {
        if !self.supports_changed_counter_dump() {
            return Err(DriverError::InvalidArgument {
                what: "device has no COUNTER_DUMP_CHANGED",
            });
        }
        self.start_counter_dump_as(first, count, true)
    }

    fn start_counter_dump_as(&mut self, first: u32, count: u32, changed: bool) -> Result<bool> {
        self.check_range(first, count)?;
        if !self.caps.features.contains(Features::COUNTER_DUMP) {
            return Err(DriverError::InvalidArgument {
                what: "device has no COUNTER_DUMP",
            });
        }
        if count > self.counter_dump_chunk() {
            return Err(DriverError::InvalidArgument {
                what: "counter dump larger than the dump buffer",
            });
        }
        if self.counter_dump.is_some() {
            return Err(DriverError::InvalidArgument {
                what: "a counter dump is already in flight",
            });
        }
        if self.state != State::Up {
            return Err(DriverError::DeviceDown);
        }
        let id = FlowId::new(first).ok_or(DriverError::InvalidArgument { what: "flow id" })?;
        let buf = ctoffload_hw_regs::Iova::new(self.rings.dump.iova().raw());
        let d = if changed {
            CommandDescriptor::counter_dump_changed(0, id, count, buf)
        } else {
            CommandDescriptor::counter_dump(0, id, count, buf)
        };
        let Some(cookie) = self.submit_internal(d)? else {
            return Ok(false);
        };
        self.counter_dump = Some(PendingDump {
            cookie,
            first,
            count,
            changed,
            done: None,
        });
        Ok(true)
    }

    /// Reaps completions (flow results are kept for [`reap`](Self::reap)) and tells
    /// whether the pending counter dump has completed.
    fn counter_dump_done(&mut self) -> Result<bool> {
        let Some(p) = self.counter_dump else {
            return Ok(false);
        };
        if p.done.is_some() {
            return Ok(true);
        }
        if self.state != State::Up {
            self.counter_dump = None;
            return Err(DriverError::DeviceDown);
        }
        let cpl = self.take_internal(p.cookie)?;
        if let (Some(cpl), Some(p)) = (cpl, self.counter_dump.as_mut()) {
            p.done = Some(cpl);
            return Ok(true);
        }
        Ok(false)
    }

    /// The records of the pending counter dump once it has completed (read in place
    /// from the dump buffer, valid until the next dump), `None` while it runs or when
    /// none was started. Never waits.
    pub fn poll_counter_dump(&mut self) -> Result<Option<CounterDump<'_>>> {
        if !self.counter_dump_done()? {
            return Ok(None);
        }
        self.take_counter_dump().map(Some)
    }

    /// Waits for the pending counter dump (sleeping between polls, see
    /// `DUMP_POLL_INTERVAL`) and returns its records.
    pub fn wait_counter_dump(&mut self) -> Result<CounterDump<'_>> {
        let Some(p) = self.counter_dump else {
            return Err(DriverError::InvalidArgument {
                what: "no counter dump in flight",
            });
        };
        let timeout = self.dump_timeout(p.count);
        let t0 = Instant::now();
        while !self.counter_dump_done()? {
            if t0.elapsed() >= timeout {
                return Err(DriverError::CommandTimeout {
                    cookie: p.cookie,
                    timeout_ms: ms(timeout),
                });
            }
            std::thread::sleep(DUMP_POLL_INTERVAL);
        }
        self.take_counter_dump()
    }

    fn take_counter_dump(&mut self) -> Result<CounterDump<'_>> {
        let Some(PendingDump {
            first,
            count,
            changed,
            done: Some(cpl),
            ..
        }) = self.counter_dump.take()
        else {
            return Err(DriverError::InvalidArgument {
                what: "no completed counter dump",
            });
        };
        match cpl.status() {
            Ok(CompletionStatus::Ok) if !changed => {
                Ok(CounterDump::new(self.rings.dump.memory(), first, count))
            }
            // Packed: as many records as the device says it wrote, never more than
            // the range (a device that claims more is not believed).
            Ok(CompletionStatus::Ok) if cpl.count.get() <= count => Ok(CounterDump::packed(
                self.rings.dump.memory(),
                first,
                count,
                cpl.count.get(),
            )),
            Ok(CompletionStatus::Ok) => Err(DriverError::CommandFailed {
                what: "changed counter dump with more records than slots",
                status: cpl.status,
            }),
            _ => Err(DriverError::CommandFailed {
                what: "counter dump",
                status: cpl.status,
            }),
        }
    }

    /// Pulls the counters of slots `[first, first + count)` with `COUNTER_DUMP`
    /// commands (one DMA per chunk), appending one sample per slot to `out`. A
    /// synchronous convenience over [`start_counter_dump`](Self::start_counter_dump)
    /// and [`wait_counter_dump`](Self::wait_counter_dump); a counter dump already in
    /// flight is waited for and discarded first.
    pub fn dump_counters(
        &mut self,
        first: u32,
        count: u32,
        out: &mut Vec<CounterSample>,
    ) -> Result<()> {
        self.check_range(first, count)?;
        if self.counter_dump.is_some() {
            self.wait_counter_dump()?;
        }
        let chunk_max = self.counter_dump_chunk();
        let mut at = first;
        let end = first + count;
        while at < end {
            let n = (end - at).min(chunk_max);
            let timeout = self.dump_timeout(n);
            self.with_ring_space(timeout, |dev| {
                Ok(dev.start_counter_dump(at, n)?.then_some(()))
            })?;
            out.extend(self.wait_counter_dump()?.iter());
            at += n;
        }
        Ok(())
    }

    /// Pulls every slot's counters.
    pub fn dump_all_counters(&mut self, out: &mut Vec<CounterSample>) -> Result<()> {
        let cap = self.caps.flow_capacity;
        self.dump_counters(0, cap, out)
    }

    /// Reads back every installed entry with `TABLE_DUMP` (for an agent restart).
    pub fn dump_table(&mut self) -> Result<Vec<TableEntry>> {
        if !self.caps.features.contains(Features::TABLE_DUMP) {
            return Err(DriverError::InvalidArgument {
                what: "device has no TABLE_DUMP",
            });
        }
        let mut out = Vec::new();
        let end = self.caps.flow_capacity;
        let mut at = 0;
        while at < end {
            let n = (end - at).min(self.rings.dump_records);
            let id = FlowId::new(at).ok_or(DriverError::InvalidArgument { what: "flow id" })?;
            self.run_dump(|b| CommandDescriptor::table_dump(0, id, n, b), n)?;
            let mem = self.rings.dump.memory();
            let mut rec = [0u8; TableDumpRecord::SIZE];
            for i in 0..usize::try_from(n).unwrap_or(0) {
                mem.read_block(i * TableDumpRecord::SIZE, &mut rec)?;
                let r = TableDumpRecord::from_bytes(&rec);
                if r.valid() {
                    if let Some(flow_id) = FlowId::new(r.flow_id.get()) {
                        out.push(TableEntry {
                            flow_id,
                            generation: r.generation(),
                            key: r.key,
                            action: r.action,
                        });
                    }
                }
            }
            at += n;
        }
        Ok(out)
    }

    // ---- exception RX / host TX ------------------------------------------------------

    /// Receives up to `max` punted frames: for each, calls `f` with its metadata and
    /// bytes (copied into a buffer reused across calls: no allocation per packet),
    /// then reposts the buffer. One RX `TAIL` doorbell per call.
    pub fn rx_poll(&mut self, max: usize, mut f: impl FnMut(&RxMeta, &[u8])) -> Result<usize> {
        if self.state != State::Up {
            return Ok(0);
        }
        let g = self.rings.rx_geom;
        let buf_len = u16::try_from(self.rings.buf_size).unwrap_or(u16::MAX);
        let mut n = 0;
        let mut raw = [0u8; RxDescriptor::SIZE];
        while n < max {
            let off = g.offset(self.rx_next);
            let mem = self.rings.rx.memory();
            // Acquire: pairs with the device's status write (last); DD set means the
            // frame and descriptor fields are complete.
            let status = mem.load32_acquire(off + RxDescriptor::STATUS_OFFSET)?;
            if !RxStatus::from_bits_retain(status).contains(RxStatus::DD) {
                break;
            }
            mem.read_block(off, &mut raw)?;
            let d = RxDescriptor::from_bytes(&raw);
            let len = usize::from(d.pkt_len.get()).min(self.rx_scratch.len());
            let boff = usize::try_from(self.rx_next).unwrap_or(0) * self.rings.buf_size;
            self.rings
                .rx_bufs
                .memory()
                .read_block(boff, &mut self.rx_scratch[..len])?;
            let meta = RxMeta {
                port: d.port,
                reason: RxReason::try_from(d.reason).map_err(|_| d.reason),
                flow_id: d.flow_id(),
                timestamp: d.timestamp.get(),
                vlan: RxStatus::from_bits_retain(status).contains(RxStatus::VLAN),
            };
            f(&meta, &self.rx_scratch[..len]);
            // Repost: the slot at the producer index gets its own buffer back.
            let slot = self.rx_tail;
            let post = RxDescriptor::posted(rx_buf_iova(&self.rings, slot)?, buf_len);
            self.rings
                .rx
                .memory()
                .write_block(g.offset(slot), &post.to_bytes())?;
            self.rx_tail = g.next(self.rx_tail);
            self.rx_next = g.next(self.rx_next);
            n += 1;
        }
        if n > 0 {
            // Release: the reposted descriptors are visible before the doorbell.
            fence(Ordering::Release);
            self.io.write32(regs::RX_TAIL, self.rx_tail)?;
        }
        Ok(n)
    }

    /// Collects finished TX descriptors (DD) and returns the running totals.
    pub fn tx_reap(&mut self) -> Result<TxCompletions> {
        let g = self.rings.tx_geom;
        while self.tx_outstanding > 0 {
            let off = g.offset(self.tx_clean);
            // Acquire: pairs with the device's ownership-word write.
            let w = self
                .rings
                .tx
                .memory()
                .load32_acquire(off + TxDescriptor::OWNERSHIP_WORD_OFFSET)?;
            let [status, error, _, _] = w.to_le_bytes();
            let st = TxStatus::from_bits_retain(status);
            if !st.contains(TxStatus::DD) {
                break;
            }
            if st.contains(TxStatus::ERR) {
                self.tx_done.errors += 1;
                self.tx_done.last_error = Some(TxError::try_from(error).map_err(|_| error));
            } else {
                self.tx_done.sent += 1;
            }
            self.tx_clean = g.next(self.tx_clean);
            self.tx_outstanding -= 1;
        }
        Ok(self.tx_done)
    }

    /// Queues frames for transmission (copied into pre-allocated DMA buffers) with one
    /// TX `TAIL` doorbell; returns how many were accepted (a prefix; 0 = ring full).
    pub fn tx_send(&mut self, frames: &[TxFrame<'_>]) -> Result<usize> {
        if self.state != State::Up {
            return Err(DriverError::DeviceDown);
        }
        self.tx_reap()?;
        let g = self.rings.tx_geom;
        let free = g.capacity() - self.tx_outstanding;
        let n = frames.len().min(usize::try_from(free).unwrap_or(0));
        for fr in &frames[..n] {
            if fr.data.len() > self.rings.buf_size {
                return Err(DriverError::InvalidArgument {
                    what: "TX frame longer than MAX_FRAME_LEN",
                });
            }
            let slot = self.tx_tail;
            let boff = usize::try_from(slot).unwrap_or(0) * self.rings.buf_size;
            self.rings.tx_bufs.memory().write_bytes(boff, fr.data)?;
            let iova = self
                .rings
                .tx_bufs
                .iova()
                .try_add(u64::try_from(boff).unwrap_or(0))?;
            let len = u16::try_from(fr.data.len()).unwrap_or(u16::MAX);
            let d = TxDescriptor::new(ctoffload_hw_regs::Iova::new(iova.raw()), len, fr.port);
            self.rings
                .tx
                .memory()
                .write_block(g.offset(slot), &d.to_bytes())?;
            self.tx_tail = g.next(slot);
            self.tx_outstanding += 1;
        }
        if n > 0 {
            // Release: frames and descriptors are visible before the doorbell.
            fence(Ordering::Release);
            self.io.write32(regs::TX_TAIL, self.tx_tail)?;
        }
        Ok(n)
    }

    // ---- faults --------------------------------------------------------------------

    /// Detects faults without touching registers on the quiet path: reads the event
    /// eventfd (vector 2) and checks the oldest command's age. When either says
    /// something may be wrong, reads `STATUS`, `RESET_COUNT` and `INT_CAUSE`
    /// ([`check_health`](Self::check_health)). Events are appended to `out`; after a
    /// `Fatal` or `Reset` the device is down and in-flight commands are failed back.
    pub fn poll_events(&mut self, out: &mut Vec<DeviceEvent>) -> Result<()> {
        let mut check = false;
        if let Some(fd) = self.io.irq(MSIX_VECTOR_EVENT) {
            check |= fd.read()?.is_some();
        }
        if self.state == State::Up && self.oldest_overdue() {
            // A completion already in host memory is not a timeout: the caller may
            // simply not have reaped for a while (e.g. a counter dump collected on the
            // next reconcile tick). Reap, then judge the oldest command still waiting.
            let mut tmp = Vec::new();
            self.reap_ring(&mut tmp)?;
            self.stash.extend(tmp);
        }
        if let Some(f) = self.inflight.front().copied() {
            if self.oldest_overdue() && self.timeout_reported != Some(f.cookie) {
                self.timeout_reported = Some(f.cookie);
                out.push(DeviceEvent::CommandTimeout { cookie: f.cookie });
                check = true;
                // Section 18: after a timeout, recover whether or not the device
                // admits a fault (reinit resets it).
                self.go_down();
            }
        }
        if check {
            self.check_health(out)?;
        }
        out.append(&mut self.events);
        Ok(())
    }

    /// Whether the oldest outstanding command is past its timeout by the clock.
    fn oldest_overdue(&self) -> bool {
        self.inflight.front().is_some_and(|f| {
            let extra = if f.internal {
                CMD_MAX_NS + DUMP_NS_PER_RECORD * u64::from(self.rings.dump_records) * 4
            } else {
                0
            };
            let limit = self.cfg.cmd_timeout_ns.saturating_add(extra);
            self.cfg.clock.now_ns().saturating_sub(f.submitted_ns) > limit
        })
    }

    /// Reads `STATUS`, `RESET_COUNT` and `INT_CAUSE` and reports a fatal error or a
    /// reset (section 17.4). Call it periodically (e.g. with each counter pull) as well.
    pub fn check_health(&mut self, out: &mut Vec<DeviceEvent>) -> Result<()> {
        let status = Status::from_bits_retain(self.io.read32(regs::STATUS)?);
        let count = self.io.read32(regs::RESET_COUNT)?;
        let cause = IntCause::from_bits_retain(self.io.read32(regs::INT_CAUSE)?);
        let events = IntCause::FATAL | IntCause::RESET_DONE;
        if cause.intersects(events) {
            self.io
                .clear_bits32(regs::INT_CAUSE, (cause & events).bits())?;
        }
        let was_up = self.state == State::Up;
        if status.contains(Status::FATAL) {
            let (code, unit, addr) = read_fatal(&self.io)?;
            out.push(DeviceEvent::Fatal { code, unit, addr });
            self.go_down();
        } else if count != self.reset_count || (was_up && !status.contains(Status::ENABLED)) {
            self.reset_count = count;
            out.push(DeviceEvent::Reset { count });
            self.go_down();
        }
        Ok(())
    }
}

fn rx_buf_iova<D: DmaRegion>(r: &Rings<D>, slot: u32) -> Result<ctoffload_hw_regs::Iova> {
    let off = u64::from(slot) * u64::try_from(r.buf_size).unwrap_or(0);
    let iova = r.rx_bufs.iova().try_add(off)?;
    Ok(ctoffload_hw_regs::Iova::new(iova.raw()))
}

fn program_ring<Io: DeviceIo>(
    io: &Io,
    regs_: &RingRegOffsets,
    mem: &Io::Dma,
    geom: RingGeom,
) -> Result<()> {
    let iova = mem.iova().raw();
    io.write32(
        regs_.base_lo,
        u32::try_from(iova & 0xFFFF_FFFF).unwrap_or(0),
    )?;
    io.write32(regs_.base_hi, u32::try_from(iova >> 32).unwrap_or(0))?;
    io.write32(regs_.size_log2, u32::from(geom.log2()))
}

fn read_fatal<Io: DeviceIo>(io: &Io) -> Result<(u32, u32, u64)> {
    let code = io.read32(regs::FATAL_CODE)?;
    let unit = io.read32(regs::FATAL_UNIT)?;
    let lo = io.read32(regs::FATAL_ADDR_LO)?;
    let hi = io.read32(regs::FATAL_ADDR_HI)?;
    Ok((code, unit, u64::from(hi) << 32 | u64::from(lo)))
}

fn read_fatal_error<Io: DeviceIo>(io: &Io) -> Result<DriverError> {
    let (code, unit, addr) = read_fatal(io)?;
    Ok(DriverError::DeviceFatal { code, unit, addr })
}

fn reset_done<Io: DeviceIo>(io: &Io) -> Result<bool> {
    let ctrl = Ctrl::from_bits_retain(io.read32(regs::CTRL)?);
    let s = Status::from_bits_retain(io.read32(regs::STATUS)?);
    Ok(!ctrl.contains(Ctrl::SOFT_RESET)
        && s.contains(Status::READY)
        && !s.contains(Status::RESETTING))
}

/// Steps 2–5 of section 18: reset, wait for READY, identify, read capabilities.
fn reset_and_identify<Io: DeviceIo>(io: &mut Io, cfg: &DeviceConfig) -> Result<Capabilities> {
    // Step 2.
    if cfg.use_flr {
        io.function_reset()?;
    } else {
        io.write32(regs::CTRL, Ctrl::SOFT_RESET.bits())?;
    }
    // Step 3: SOFT_RESET self-clears when the reset is complete; then READY, not
    // RESETTING. FATAL after a reset means the device is unusable.
    let io_ref: &Io = io;
    let ok = poll_until(cfg.ready_timeout, || reset_done(io_ref))?;
    let status = io.read32(regs::STATUS)?;
    if Status::from_bits_retain(status).contains(Status::FATAL) {
        return Err(read_fatal_error(io)?);
    }
    if !ok {
        return Err(DriverError::DeviceTimeout {
            what: "READY after reset",
            timeout_ms: ms(cfg.ready_timeout),
            status,
        });
    }
    identify(io)
}

/// `CTRL.DETACH`, then waits for `STATUS.DETACHED` (section 17.5).
fn detach_rings<Io: DeviceIo>(io: &Io, cfg: &DeviceConfig) -> Result<()> {
    io.write32(regs::CTRL, Ctrl::DETACH.bits())?;
    let mut last = 0;
    let ok = poll_until(cfg.enable_timeout, || {
        last = io.read32(regs::STATUS)?;
        let s = Status::from_bits_retain(last);
        Ok(s.contains(Status::DETACHED) || s.contains(Status::FATAL))
    })?;
    if Status::from_bits_retain(last).contains(Status::FATAL) {
        return Err(read_fatal_error(io)?);
    }
    if !ok {
        return Err(DriverError::DeviceTimeout {
            what: "DETACHED",
            timeout_ms: ms(cfg.enable_timeout),
            status: last,
        });
    }
    Ok(())
}

/// Steps 4–5 of section 18: identify the device and read its capabilities.
fn identify<Io: DeviceIo>(io: &Io) -> Result<Capabilities> {
    // Step 4.
    let magic = io.read32(regs::MAGIC)?;
    if magic != regs::MAGIC_VALUE {
        return Err(DriverError::BadMagic { found: magic });
    }
    let spec = SpecVersion::from_raw(io.read32(regs::SPEC_VERSION)?);
    if spec.major != 1 {
        return Err(DriverError::UnsupportedSpecVersion {
            major: spec.major,
            minor: spec.minor,
        });
    }
    // Step 5.
    let caps = Capabilities {
        spec,
        impl_id: io.read32(regs::IMPL_ID)?,
        features: Features::from_bits_retain(io.read32(regs::FEATURES)?),
        flow_capacity: io.read32(regs::FLOW_CAPACITY)?,
        buckets_log2: io.read32(regs::BUCKETS_LOG2)?,
        ways: io.read32(regs::WAYS)?,
        flow_limit: io.read32(regs::FLOW_LIMIT)?,
        num_ports: io.read32(regs::NUM_PORTS)?,
        ring_max: RingMaxLog2::from_raw(io.read32(regs::RING_MAX_LOG2)?),
        timestamp_freq: io.read32(regs::TIMESTAMP_FREQ)?,
        max_frame_len: io.read32(regs::MAX_FRAME_LEN)?,
    };
    if caps.max_frame_len == 0 || caps.max_frame_len > u32::from(u16::MAX) {
        return Err(DriverError::BadCapability {
            what: "MAX_FRAME_LEN",
            value: caps.max_frame_len,
        });
    }
    if caps.flow_capacity == 0 {
        return Err(DriverError::BadCapability {
            what: "FLOW_CAPACITY",
            value: 0,
        });
    }
    Ok(caps)
}

/// Step 6: allocates the rings, buffers and the dump buffer.
fn alloc_rings<Io: DeviceIo>(
    io: &mut Io,
    cfg: &DeviceConfig,
    caps: &Capabilities,
) -> Result<Rings<Io::Dma>> {
    let m = caps.ring_max;
    let bad = |what, value| DriverError::BadCapability { what, value };
    let cmd_log2 = clamp_log2(cfg.cmd_ring_log2, m.cmd);
    // CPL.SIZE_LOG2 ≥ CMD.SIZE_LOG2 (section 5.3 rule 4).
    let cpl_log2 = clamp_log2(cmd_log2, m.cpl);
    if cpl_log2 < cmd_log2 {
        return Err(bad("RING_MAX_LOG2 (CPL < CMD)", m.to_raw()));
    }
    let geom = |log2, size| RingGeom::new(log2, size).ok_or(bad("RING_MAX_LOG2", m.to_raw()));
    let cmd_geom = geom(cmd_log2, CommandDescriptor::SIZE)?;
    let cpl_geom = geom(cpl_log2, Completion::SIZE)?;
    let rx_geom = geom(clamp_log2(cfg.rx_ring_log2, m.rx), RxDescriptor::SIZE)?;
    let tx_geom = geom(clamp_log2(cfg.tx_ring_log2, m.tx), TxDescriptor::SIZE)?;
    let buf_size = usize::try_from(caps.max_frame_len)
        .unwrap_or(9216)
        .next_multiple_of(64);
    let n = |g: RingGeom| usize::try_from(g.entries()).unwrap_or(0);
    let dump_records = cfg.dump_chunk.clamp(1, caps.flow_capacity);
    let dump_bytes = usize::try_from(dump_records).unwrap_or(1) * TableDumpRecord::SIZE;
    Ok(Rings {
        cmd: io.dma_alloc(cmd_geom.bytes())?,
        cpl: io.dma_alloc(cpl_geom.bytes())?,
        rx: io.dma_alloc(rx_geom.bytes())?,
        rx_bufs: io.dma_alloc(n(rx_geom) * buf_size)?,
        tx: io.dma_alloc(tx_geom.bytes())?,
        tx_bufs: io.dma_alloc(n(tx_geom) * buf_size)?,
        dump: io.dma_alloc(dump_bytes)?,
        dump_records,
        cmd_geom,
        cpl_geom,
        rx_geom,
        tx_geom,
        buf_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{MockConfig, MockHandle, MockIo, test_key};
    use ctoffload_hw_regs::{FatalCode, FatalUnit};

    fn dev_with(cfg: MockConfig) -> (Device<MockIo>, MockHandle, Arc<AtomicU64>) {
        let (io, h) = MockIo::new(cfg).expect("mock");
        let now = Arc::new(AtomicU64::new(0));
        let dc = DeviceConfig {
            cmd_ring_log2: 3,
            rx_ring_log2: 3,
            tx_ring_log2: 3,
            cmd_timeout_ns: 1_000_000,
            clock: Clock::manual(now.clone()),
            dump_chunk: 16,
            ..DeviceConfig::default()
        };
        (Device::new(io, dc).expect("bring-up"), h, now)
    }

    fn dev() -> (Device<MockIo>, MockHandle, Arc<AtomicU64>) {
        dev_with(MockConfig::default())
    }

    fn ins(sport: u16) -> FlowCommand {
        FlowCommand::Insert {
            key: test_key(sport),
            action: FlowAction::forward(1),
        }
    }

    fn status(r: &CommandResult) -> CompletionStatus {
        match r.outcome {
            Outcome::Status(s) => s,
            o => panic!("not completed: {o:?}"),
        }
    }

    #[test]
    fn bring_up_programs_rings_and_enables() {
        let (d, h, _) = dev();
        assert!(d.is_up());
        assert_eq!(d.capabilities().flow_capacity, 128);
        assert_eq!(h.reg(regs::CMD_SIZE_LOG2), 3);
        assert_eq!(h.reg(regs::CPL_SIZE_LOG2), 3);
        assert_eq!(h.reg(regs::INT_MASK), 0);
        assert_eq!(h.reg(regs::RESET_COUNT), 1);
        assert_eq!(d.saved_reset_count(), 1);
        assert!(Status::from_bits_retain(h.reg(regs::STATUS)).contains(Status::ENABLED));
    }

    #[test]
    fn bring_up_rejects_bad_magic_and_version() {
        let (io, h) = MockIo::new(MockConfig::default()).expect("mock");
        h.poke(regs::MAGIC, 0xFFFF_FFFF);
        let e = Device::new(io, DeviceConfig::default()).expect_err("bad magic");
        assert!(
            matches!(e, DriverError::BadMagic { found: 0xFFFF_FFFF }),
            "{e:?}"
        );
        let (io, h) = MockIo::new(MockConfig::default()).expect("mock");
        h.poke(regs::SPEC_VERSION, 0x0002_0001);
        let e = Device::new(io, DeviceConfig::default()).expect_err("bad major");
        assert!(matches!(
            e,
            DriverError::UnsupportedSpecVersion { major: 2, minor: 1 }
        ));
        // Minor revisions are accepted.
        let (io, h) = MockIo::new(MockConfig::default()).expect("mock");
        h.poke(regs::SPEC_VERSION, 0x0001_0007);
        Device::new(io, DeviceConfig::default()).expect("minor ok");
    }

    #[test]
    fn bring_up_times_out_when_reset_hangs() {
        let (io, h) = MockIo::new(MockConfig::default()).expect("mock");
        h.hang_reset(true);
        let cfg = DeviceConfig {
            ready_timeout: Duration::from_millis(5),
            ..DeviceConfig::default()
        };
        let e = Device::new(io, cfg).expect_err("hang");
        assert!(matches!(e, DriverError::DeviceTimeout { .. }), "{e:?}");
    }

    #[test]
    fn enable_failure_reports_ring_config() {
        let cfg = MockConfig {
            ring_max: RingMaxLog2 {
                cmd: 3,
                cpl: 2,
                rx: 3,
                tx: 3,
            },
            ..MockConfig::default()
        };
        let (io, _h) = MockIo::new(cfg).expect("mock");
        let e = Device::new(io, DeviceConfig::default()).expect_err("cpl < cmd");
        assert!(matches!(e, DriverError::BadCapability { .. }), "{e:?}");
    }

    #[test]
    fn every_completion_code_is_decoded() {
        let (mut d, h, _) = dev_with(MockConfig {
            flow_limit: 2,
            ..MockConfig::default()
        });
        let t = Duration::from_secs(1);
        let r = d.execute(&[ins(1), ins(1)], t).expect("ok");
        assert_eq!(status(&r[0]), CompletionStatus::Ok);
        assert_eq!(r[0].generation, 1);
        assert_eq!(status(&r[1]), CompletionStatus::Exists);
        assert_eq!(r[1].flow_id, r[0].flow_id);
        let id = r[0].flow_id.expect("id");
        let r = d
            .execute(
                &[
                    ins(2),
                    ins(3),
                    FlowCommand::Delete {
                        flow_id: id,
                        key: test_key(9),
                    },
                    FlowCommand::Modify {
                        flow_id: id,
                        key: test_key(1),
                        action: FlowAction::forward(0),
                    },
                    FlowCommand::Query { key: test_key(1) },
                    FlowCommand::Insert {
                        key: test_key(4),
                        action: FlowAction::forward(7),
                    },
                ],
                t,
            )
            .expect("batch");
        let st: Vec<_> = r.iter().map(status).collect();
        assert_eq!(
            st,
            [
                CompletionStatus::Ok,
                CompletionStatus::TableFull,
                CompletionStatus::NotFound,
                CompletionStatus::Ok,
                CompletionStatus::Ok,
                CompletionStatus::BadDescriptor,
            ]
        );
        h.force_status(&[CompletionStatus::DeviceError, CompletionStatus::BucketFull]);
        let r = d.execute(&[ins(5), ins(6)], t).expect("forced");
        assert_eq!(status(&r[0]), CompletionStatus::DeviceError);
        assert_eq!(status(&r[1]), CompletionStatus::BucketFull);
        let mut raw = CommandDescriptor::nop(0);
        raw.opcode = 99;
        let r = d.execute(&[FlowCommand::Raw(raw)], t).expect("raw");
        assert_eq!(status(&r[0]), CompletionStatus::BadDescriptor);
        assert_eq!(r[0].opcode, 99);
    }

    #[test]
    fn direct_encoding_matches_the_descriptor() {
        let key = test_key(7);
        let action = FlowAction::forward(1)
            .with_dec_ttl()
            .with_snat(std::net::Ipv4Addr::new(198, 51, 100, 9).into(), 4242);
        let id = FlowId::new(77).expect("id");
        let cmds = [
            FlowCommand::Insert { key, action },
            FlowCommand::Delete { flow_id: id, key },
            FlowCommand::DeleteByKey { key },
            FlowCommand::Modify {
                flow_id: id,
                key,
                action,
            },
            FlowCommand::Query { key },
            FlowCommand::Nop,
        ];
        for c in cmds {
            let d = c.descriptor(0xA5A5_0001);
            assert_eq!(c.encode(0xA5A5_0001), (d.to_bytes(), d.opcode), "{c:?}");
        }
    }

    #[test]
    fn unknown_status_is_reported_raw() {
        let (mut d, h, _) = dev();
        h.hold(true);
        let s = d.submit(&[FlowCommand::Nop]).expect("submit");
        // Write a completion with status 200 by hand at CPL slot 0, phase 1.
        let mut c = Completion::new(
            s.token(0).expect("t").cookie(),
            0,
            CompletionStatus::Ok,
            true,
        );
        c.status = 200;
        d.rings
            .cpl
            .memory()
            .write_block(0, &c.to_bytes())
            .expect("w");
        let mut out = Vec::new();
        d.reap(&mut out).expect("reap");
        assert_eq!(out[0].outcome, Outcome::UnknownStatus(200));
    }

    #[test]
    fn ring_wraps_and_phase_flips_with_one_doorbell_per_batch() {
        let (mut d, h, _) = dev();
        // 8-entry rings: 7 usable. 10 rounds of 5 inserts + 5 deletes cross the end
        // many times and flip the phase.
        let base_db = h.cmd_doorbells();
        let mut out = Vec::new();
        for round in 0..10u16 {
            let cmds: Vec<_> = (0..5).map(|i| ins(round * 10 + i)).collect();
            let s = d.submit(&cmds).expect("submit");
            assert_eq!(s.accepted(), 5);
            out.clear();
            let before = d.mmio_stats();
            d.reap(&mut out).expect("reap");
            let after = d.mmio_stats();
            assert_eq!(after.reads, before.reads, "reap reads no register");
            assert_eq!(after.writes, before.writes + 1, "one CPL HEAD doorbell");
            assert_eq!(out.len(), 5);
            let toks: Vec<_> = s.tokens().collect();
            let dels: Vec<_> = out
                .iter()
                .zip(&toks)
                .map(|(r, t)| {
                    assert_eq!(r.token, *t);
                    assert!(r.is_ok());
                    FlowCommand::Delete {
                        flow_id: r.flow_id.expect("id"),
                        key: test_key(
                            round * 10
                                + u16::try_from(toks.iter().position(|x| x == t).unwrap_or(0))
                                    .unwrap_or(0),
                        ),
                    }
                })
                .collect();
            assert_eq!(d.submit(&dels).expect("del").accepted(), 5);
            out.clear();
            d.reap(&mut out).expect("reap");
            assert!(out.iter().all(CommandResult::is_ok), "{out:?}");
        }
        assert_eq!(h.cmd_doorbells() - base_db, 20);
        assert_eq!(h.flow_count(), 0);
    }

    #[test]
    fn full_ring_is_back_pressure() {
        let (mut d, h, _) = dev();
        h.hold(true);
        let cmds: Vec<_> = (0..10).map(ins).collect();
        let s = d.submit(&cmds).expect("submit");
        assert_eq!(s.accepted(), 7);
        assert_eq!(d.free_slots(), 0);
        assert_eq!(d.submit(&cmds[7..]).expect("full").accepted(), 0);
        h.release();
        let mut out = Vec::new();
        d.reap(&mut out).expect("reap");
        assert_eq!(out.len(), 7);
        assert_eq!(d.submit(&cmds[7..]).expect("again").accepted(), 3);
        out.clear();
        d.reap(&mut out).expect("reap");
        assert_eq!(out.len(), 3);
        assert_eq!(h.flow_count(), 10);
    }

    #[test]
    fn delete_in_same_batch_follows_insert() {
        let (mut d, _h, _) = dev();
        let r = d
            .execute(
                &[ins(1), FlowCommand::DeleteByKey { key: test_key(1) }],
                Duration::from_secs(1),
            )
            .expect("exec");
        assert!(r[0].is_ok() && r[1].is_ok());
        assert_eq!(r[0].flow_id, r[1].flow_id);
    }

    #[test]
    fn lost_completion_is_a_command_timeout() {
        let (mut d, h, _) = dev();
        h.drop_completions(1);
        let s = d.submit(&[ins(1), ins(2)]).expect("submit");
        let (first, second) = (s.token(0).expect("t"), s.token(1).expect("t"));
        let mut out = Vec::new();
        // The first insert took effect without a completion: its outcome is unknown,
        // so the device is down (a reset clears what it may have installed).
        assert!(matches!(
            d.reap(&mut out),
            Err(DriverError::CompletionLost { cookie, found })
                if cookie == first.cookie() && found == second.cookie()
        ));
        assert!(!d.is_up());
        assert!(matches!(d.submit(&[ins(3)]), Err(DriverError::DeviceDown)));
        // Every command comes back exactly once, aborted.
        out.clear();
        d.reap(&mut out).expect("reap");
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].token, out[1].token), (first, second));
        assert!(out.iter().all(|r| r.outcome == Outcome::Aborted));
        assert_eq!(d.outstanding(), 0);
        d.reinit().expect("reinit");
        let r = d.execute(&[ins(1)], Duration::from_secs(1)).expect("after");
        assert!(r[0].is_ok(), "the table was reset: {:?}", r[0]);
    }

    #[test]
    fn command_timeout_is_an_event_and_fails_inflight() {
        let (mut d, h, now) = dev();
        h.hold(true);
        let s = d.submit(&[ins(1), ins(2)]).expect("submit");
        let mut out = Vec::new();
        d.reap(&mut out).expect("reap");
        assert!(out.is_empty());
        let mut ev = Vec::new();
        d.poll_events(&mut ev).expect("poll");
        assert!(ev.is_empty());
        now.store(2_000_000, Ordering::Relaxed);
        d.poll_events(&mut ev).expect("poll");
        assert_eq!(
            ev,
            [DeviceEvent::CommandTimeout {
                cookie: s.token(0).expect("t").cookie()
            }]
        );
        assert!(!d.is_up());
        d.reap(&mut out).expect("reap");
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| r.outcome == Outcome::Aborted));
        assert!(matches!(d.submit(&[ins(3)]), Err(DriverError::DeviceDown)));
        h.hold(false);
        d.reinit().expect("reinit");
        assert!(d.is_up());
        let r = d.execute(&[ins(3)], Duration::from_secs(1)).expect("after");
        assert!(r[0].is_ok());
    }

    #[test]
    fn fatal_is_an_event() {
        let (mut d, h, _) = dev();
        h.hold(true);
        d.submit(&[ins(1)]).expect("submit");
        let mut ev = Vec::new();
        d.poll_events(&mut ev).expect("quiet");
        assert!(ev.is_empty());
        h.fatal(
            FatalCode::Parity.raw(),
            FatalUnit::FlowTable.raw(),
            0x1234_5678_9abc,
        );
        d.poll_events(&mut ev).expect("poll");
        assert_eq!(
            ev,
            [DeviceEvent::Fatal {
                code: 4,
                unit: 8,
                addr: 0x1234_5678_9abc
            }]
        );
        let mut out = Vec::new();
        d.reap(&mut out).expect("reap");
        assert_eq!(out[0].outcome, Outcome::Aborted);
        d.reinit().expect("reinit");
        assert!(d.is_up());
    }

    #[test]
    fn reset_fails_inflight_and_reinit_recovers() {
        let (mut d, h, _) = dev();
        d.execute(&[ins(1)], Duration::from_secs(1)).expect("ins");
        h.hold(true);
        d.submit(&[ins(2), ins(3)]).expect("submit");
        h.spontaneous_reset();
        h.hold(false);
        let mut ev = Vec::new();
        d.poll_events(&mut ev).expect("poll");
        assert_eq!(ev, [DeviceEvent::Reset { count: 2 }]);
        let mut out = Vec::new();
        d.reap(&mut out).expect("reap");
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|r| r.outcome == Outcome::Aborted));
        d.reinit().expect("reinit");
        assert_eq!(d.saved_reset_count(), 3);
        // The table is empty after the reset: the old flow can be inserted anew.
        let r = d.execute(&[ins(1)], Duration::from_secs(1)).expect("ins");
        assert!(r[0].is_ok());
        assert_eq!(d.dump_table().expect("dump").len(), 1);
    }

    #[test]
    fn check_health_sees_reset_without_interrupt() {
        let (mut d, h, _) = dev();
        h.spontaneous_reset();
        // Drain the eventfd so only the register check can see it.
        let _ = d.io().irq(MSIX_VECTOR_EVENT).expect("fd").read();
        let mut ev = Vec::new();
        d.poll_events(&mut ev).expect("poll");
        assert!(ev.is_empty());
        d.check_health(&mut ev).expect("health");
        assert_eq!(ev, [DeviceEvent::Reset { count: 2 }]);
    }

    #[test]
    fn mmio_failures_surface_as_errors() {
        let (mut d, h, _) = dev();
        h.fail_writes(1);
        assert!(matches!(
            d.submit(&[ins(1)]),
            Err(DriverError::Injected { .. })
        ));
        h.fail_reads(1);
        let mut ev = Vec::new();
        assert!(d.check_health(&mut ev).is_err());
    }

    #[test]
    fn counter_dump_and_table_dump() {
        let (mut d, h, _) = dev();
        let r = d
            .execute(&[ins(1), ins(2)], Duration::from_secs(1))
            .expect("ins");
        let id = r[0].flow_id.expect("id");
        h.set_counters(
            id,
            FlowCounters {
                packets: u32::MAX,
                bytes: (1 << 48) - 1,
                last_hit: 5,
            },
        );
        let mut tr = crate::CounterTracker::new();
        let mut s = Vec::new();
        d.dump_all_counters(&mut s).expect("dump");
        assert_eq!(s.len(), 128);
        let deltas: Vec<_> = s.iter().filter_map(|x| tr.update(x)).collect();
        assert_eq!(deltas.len(), 2);
        h.set_counters(
            id,
            FlowCounters {
                packets: 1,
                bytes: 9,
                last_hit: 6,
            },
        );
        s.clear();
        d.dump_counters(id.get(), 1, &mut s).expect("one");
        let dl = tr.update(&s[0]).expect("delta");
        assert_eq!((dl.packets, dl.bytes, dl.last_hit), (2, 10, 6));
        let t = d.dump_table().expect("table");
        assert_eq!(t.len(), 2);
        assert!(t.iter().any(|e| e.key == test_key(2)));
        assert!(d.dump_counters(120, 9, &mut s).is_err());
    }

    #[test]
    fn async_counter_dump_is_read_in_place_and_never_waits() {
        let (mut d, h, _) = dev();
        let r = d.execute(&[ins(1)], Duration::from_secs(1)).expect("ins");
        let id = r[0].flow_id.expect("id");
        h.set_counters(
            id,
            FlowCounters {
                packets: 7,
                bytes: 700,
                last_hit: 3,
            },
        );
        assert!(d.poll_counter_dump().expect("none started").is_none());
        assert!(d.wait_counter_dump().is_err(), "nothing to wait for");
        // The device holds its completions: polling returns at once, without records.
        let cap = d.capabilities().flow_capacity;
        let chunk = d.counter_dump_chunk();
        let n = chunk.min(cap);
        let first = id.get() / n * n;
        h.hold(true);
        assert!(d.start_counter_dump(first, n).expect("start"));
        assert!(d.counter_dump_pending());
        assert!(d.start_counter_dump(0, 1).is_err(), "one dump at a time");
        assert!(d.poll_counter_dump().expect("poll").is_none());
        assert!(d.outstanding() >= 1);
        h.release();
        h.hold(false);
        let dump = d.wait_counter_dump().expect("done");
        assert_eq!(
            (dump.first(), dump.len()),
            (first, usize::try_from(n).expect("n"))
        );
        let s = dump
            .iter()
            .find(|s| s.valid)
            .expect("the installed slot is in the chunk");
        assert_eq!(s.flow_id, id);
        assert_eq!(
            (s.counters.packets, s.counters.bytes, s.counters.last_hit),
            (7, 700, 3)
        );
        assert_eq!(dump.iter().filter(|s| s.valid).count(), 1);
        assert!(dump.get(dump.len()).is_none());
        assert!(!d.counter_dump_pending());
        // Larger than the buffer, or outside the table: refused before anything is sent.
        assert!(d.start_counter_dump(0, chunk + 1).is_err());
        assert!(d.start_counter_dump(cap - 8, 9).is_err());
        // A synchronous dump while one is in flight waits for it and discards it.
        assert!(d.start_counter_dump(0, 16).expect("start"));
        let t = d.dump_table().expect("table");
        assert_eq!(t.len(), 1);
        assert!(!d.counter_dump_pending());
        assert!(d.poll_counter_dump().expect("poll").is_none());
    }

    #[test]
    fn rx_and_tx() {
        let (mut d, h, _) = dev();
        for i in 0..10u8 {
            // 7 buffers posted: the 8th..10th find none until the driver reaps.
            let ok = h.inject_rx(i % 2, 1, None, &[i; 60]);
            assert_eq!(ok, i < 7);
        }
        let mut got = Vec::new();
        let n = d
            .rx_poll(64, |m, b| got.push((m.port, m.reason, b.len(), b[0])))
            .expect("rx");
        assert_eq!(n, 7);
        assert_eq!(got[3], (1, Ok(RxReason::Miss), 60, 3));
        for round in 0..5u8 {
            assert!(h.inject_rx(0, 2, FlowId::new(5), &[round; 100]));
            let mut seen = None;
            d.rx_poll(8, |m, b| seen = Some((m.flow_id, b[99])))
                .expect("rx");
            assert_eq!(seen, Some((FlowId::new(5), round)));
        }
        let frames: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; 64]).collect();
        let tx: Vec<_> = frames
            .iter()
            .map(|f| TxFrame { port: 1, data: f })
            .collect();
        let mut sent = 0;
        while sent < tx.len() {
            sent += d.tx_send(&tx[sent..]).expect("tx");
        }
        let c = d.tx_reap().expect("reap");
        assert_eq!(c.sent, 10);
        let out = h.take_sent();
        assert_eq!(out.len(), 10);
        assert_eq!(out[9], (1, vec![9u8; 64]));
        d.tx_send(&[TxFrame {
            port: 5,
            data: &[0; 64],
        }])
        .expect("bad port");
        let c = d.tx_reap().expect("reap");
        assert_eq!(c.errors, 1);
        assert_eq!(c.last_error, Some(Ok(TxError::BadPort)));
    }

    #[test]
    fn device_is_send() {
        fn is_send<T: Send>() {}
        is_send::<Device<MockIo>>();
        is_send::<Device<crate::SimIo>>();
        is_send::<Device<crate::VfioIo>>();
    }
}
