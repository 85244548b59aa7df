//! The device model: register image, rings, command processor, datapath, resets and
//! faults (device.md sections 3–17, with the polling rules of section 19).
//!
//! The model reaches the driver only through two kinds of shared memory: the BAR image
//! ([`SharedRegion`]) and host DMA memory (through [`SimIommu`]). It polls the BAR: every
//! side effect is designed so that polling loses nothing (doorbells are indices, W1C
//! clears are atomic `fetch_and`s, RW/SC bits are cleared by the model).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use ctoffload_hw_regs::limits;
use ctoffload_hw_regs::regs::{self, Ctrl, Features, IntCause, RegOffset, RingRegOffsets, Status};
use ctoffload_hw_regs::{
    ActionFlags, CommandDescriptor, CommandFlags, Completion, CompletionFlags, CompletionStatus,
    CounterRecord, FatalCode, FatalUnit, FlowAction, FlowId, FlowKey, KeyKind, L4Proto, Opcode,
    RxDescriptor, RxReason, RxStatus, TableDumpRecord, TxDescriptor, TxError, TxStatus,
};

use crate::dma::{DmaSpace, Iova};
use crate::event::EventFd;
use crate::fault::FaultHandle;
use crate::iommu::SimIommu;
use crate::mem::SharedRegion;
use crate::port::{FRAME_BUF_SIZE, FrameBatch, PortBackend};
use crate::rewrite::{self, L4, PuntReason};
use crate::table::{Entry, FlowTable, HashedKey, InsertOutcome, WAYS};
use crate::{Error, Result};

/// Size of the BAR image.
pub const BAR_SIZE: u64 = 0x1_0000;
/// The model's `MAX_FRAME_LEN`: the size of a port frame buffer (device.md section 19).
pub const SIM_MAX_FRAME_LEN: u32 = 2048;
/// Frames taken from each port per poll.
const RX_BURST: usize = 64;
/// Commands processed per poll at most (bounds the poll's latency).
const CMD_BURST: usize = 1024;
/// Command descriptors fetched (and their table buckets warmed) together.
const CMD_GROUP: usize = 16;
/// TX descriptors processed per poll at most.
const TX_BURST: usize = 256;
/// Number of MSI-X vectors.
const VECTORS: usize = 3;
/// TCP FIN, SYN, RST.
const TCP_CTRL_FLAGS: u8 = 0x01 | 0x02 | 0x04;

const _: () = assert!(SIM_MAX_FRAME_LEN as usize == FRAME_BUF_SIZE);

/// Geometry and limits of a simulated device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// log2 of the bucket count (`BUCKETS_LOG2`), 0 to 20.
    pub buckets_log2: u8,
    /// Ways per bucket; must be 8.
    pub ways: u8,
    /// `FLOW_LIMIT`, `1 ..= capacity`.
    pub flow_limit: u32,
    /// `NUM_PORTS`, 1 to 8.
    pub num_ports: u8,
    /// Maximum `SIZE_LOG2` of the CMD and CPL rings, 2 to 16.
    pub cmd_ring_max_log2: u8,
    /// Maximum `SIZE_LOG2` of the RX and TX rings, 2 to 16.
    pub rx_ring_max_log2: u8,
    /// Model time a reset takes (at most 10 ms); 0 completes it within the poll.
    pub reset_delay_ns: u64,
    /// Create the BAR as `/dev/shm/<name>` instead of a sealed memfd.
    pub shm_name: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            buckets_log2: 17,
            ways: 8,
            flow_limit: limits::DEFAULT_FLOW_CAPACITY,
            num_ports: 2,
            cmd_ring_max_log2: 16,
            rx_ring_max_log2: 12,
            reset_delay_ns: 0,
            shm_name: None,
        }
    }
}

impl SimConfig {
    /// A small table for tests: 2^4 buckets × 8 ways (128 slots), everything else default.
    pub fn small() -> Self {
        Self {
            buckets_log2: 4,
            flow_limit: 128,
            ..Self::default()
        }
    }

    fn capacity(&self) -> u32 {
        (1u32 << self.buckets_log2) * u32::from(self.ways)
    }

    fn validate(&self) -> Result<()> {
        let bad = |reason: &'static str| Err(Error::BadConfig { reason });
        if self.buckets_log2 > 20 {
            return bad("buckets_log2 must be at most 20");
        }
        if u32::from(self.ways) != WAYS {
            return bad("ways must be 8");
        }
        if self.flow_limit == 0 || self.flow_limit > self.capacity() {
            return bad("flow_limit must be in 1..=capacity");
        }
        if self.num_ports == 0 || u32::from(self.num_ports) > limits::MAX_PORTS {
            return bad("num_ports must be in 1..=8");
        }
        let rings = [self.cmd_ring_max_log2, self.rx_ring_max_log2];
        if rings.iter().any(|&m| !(2..=16).contains(&m)) {
            return bad("ring maxima must be in 2..=16");
        }
        if self.reset_delay_ns > limits::RESET_MAX_NS {
            return bad("reset_delay_ns must be at most 10 ms");
        }
        Ok(())
    }
}

/// What the model has done since it was created (not reset by device resets).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Polls that found work to do.
    pub busy_polls: u64,
    /// CMD `TAIL` doorbell updates observed (a rewrite of the same value is invisible).
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
    /// Flow-table hits forwarded or dropped by a `DROP` action.
    pub hits: u64,
    /// Frames written to the RX ring.
    pub punts: u64,
    /// Frames dropped for any other reason (no buffer, too big, disabled, bad length,
    /// resetting, egress port without a back-end).
    pub drops: u64,
    /// Frames sent from the host TX ring.
    pub tx_frames: u64,
    /// Interrupt messages sent (eventfd signals).
    pub interrupts: u64,
    /// Resets completed (soft, FLR, spontaneous).
    pub resets: u64,
    /// Faults applied (each armed fault counts once when it takes effect).
    pub faults_fired: u64,
}

/// Ring indices in `RingRegOffsets` order: CMD, CPL, RX, TX.
const CMD: usize = 0;
const CPL: usize = 1;
const RX: usize = 2;
const TX: usize = 3;
const RINGS: [RingRegOffsets; 4] = [regs::CMD_RING, regs::CPL_RING, regs::RX_RING, regs::TX_RING];
const RING_UNITS: [FatalUnit; 4] = [
    FatalUnit::CmdRing,
    FatalUnit::CplRing,
    FatalUnit::RxRing,
    FatalUnit::TxRing,
];

/// A ring as latched at `ENABLE`.
#[derive(Debug, Clone, Copy, Default)]
struct Ring {
    base: u64,
    log2: u32,
    /// Device-side index: consumer for CMD/RX/TX, producer for CPL.
    dev: u32,
    /// Host-side index (last doorbell value seen).
    host: u32,
}

impl Ring {
    fn n(&self) -> u32 {
        1 << self.log2
    }
    fn next(&self, i: u32) -> u32 {
        (i + 1) & (self.n() - 1)
    }
    fn slot(&self, i: u32, entry: u64) -> Iova {
        Iova::new(self.base.wrapping_add(u64::from(i) * entry))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Out of reset, not enabled.
    Ready,
    Enabled,
    /// `CTRL.DETACH` stopped the rings: the table forwards, nothing reaches the host.
    Detached,
    Fatal,
    /// Reset in progress, completes at this model time.
    Resetting(u64),
}

/// Registers the model keeps itself (RO values, shadows of RW registers).
#[derive(Debug, Clone, Default)]
struct DevRegs {
    fatal_code: u32,
    fatal_unit: u32,
    fatal_addr: u64,
    reset_count: u32,
    /// `STAT_*` in register order.
    stats: [u32; 9],
    /// Last accepted `INT_MASK`.
    int_mask: u32,
    /// `CTRL` to restore while writes are ignored.
    ctrl: u32,
    /// Ring registers (`BASE_LO`, `BASE_HI`, `SIZE_LOG2`) to restore while ignored.
    ring_regs: [[u32; 3]; 4],
    /// Last doorbell register values seen (for counting and latching).
    doorbells: [u32; 4],
}

const ST_WIRE_RX: usize = 0;
const ST_HIT: usize = 1;
const ST_PUNT: usize = 2;
const ST_NO_BUF: usize = 3;
const ST_TOO_BIG: usize = 4;
const ST_DISABLED: usize = 5;
const ST_LEN_ERR: usize = 6;
const ST_TX: usize = 7;
const ST_TX_ERR: usize = 8;

/// Faults armed in the device.
#[derive(Debug, Clone, Copy, Default)]
struct Active {
    drop_completions: u32,
    device_error: u32,
    table_full_at: Option<u32>,
    slow_ns: u64,
}

/// The simulated device.
pub struct Simulator {
    cfg: SimConfig,
    bar: Arc<SharedRegion>,
    iommu: SimIommu,
    irqs: Vec<EventFd>,
    ports: Vec<Option<Box<dyn PortBackend>>>,
    faults: FaultHandle,
    stats: SimStats,
    mode: Mode,
    regs: DevRegs,
    rings: [Ring; 4],
    cpl_phase: bool,
    table: FlowTable,
    /// Per slot, `generation << 32 | packets` as the last `CHANGED` counter dump of the
    /// slot reported (or found) it; empty until the first such dump.
    changed_marks: Vec<u64>,
    active: Active,
    /// When the command at CMD `HEAD` started (slow-command fault and watchdog).
    cmd_started: Option<u64>,
    rx_batch: FrameBatch,
    /// Per frame of the batch being processed: classification and flow-table slot,
    /// computed for the whole batch before any frame is acted on.
    rx_pre: Vec<Pre>,
    tx_batches: Vec<FrameBatch>,
    now: u64,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("cfg", &self.cfg)
            .field("mode", &self.mode)
            .field("flows", &self.table.count())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Why a DMA failed: the unit and the first IOVA of the access.
#[derive(Debug, Clone, Copy)]
struct DmaFail {
    unit: FatalUnit,
    addr: u64,
}

type Dma<T> = std::result::Result<T, DmaFail>;

/// Why a command burst stopped early with a fatal error (applied after the burst).
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// The slow-command watchdog fired.
    Hang,
    /// A DMA failed.
    Dma(DmaFail),
}

fn fail(unit: FatalUnit, addr: Iova) -> impl FnOnce(Error) -> DmaFail {
    move |_| DmaFail {
        unit,
        addr: addr.raw(),
    }
}

impl Simulator {
    /// A powered-on device: the BAR is a sealed memfd (or `/dev/shm/<shm_name>`) holding
    /// the reset values.
    pub fn new(cfg: SimConfig) -> Result<Self> {
        cfg.validate()?;
        let bar = match &cfg.shm_name {
            Some(name) => SharedRegion::create_shm(name, BAR_SIZE)?,
            None => SharedRegion::create_memfd("ctoffload-bar0", BAR_SIZE)?,
        };
        let irqs = (0..VECTORS)
            .map(|_| EventFd::new())
            .collect::<Result<Vec<_>>>()?;
        let ports = (0..cfg.num_ports).map(|_| None).collect();
        let tx_batches = (0..cfg.num_ports)
            .map(|_| FrameBatch::new(RX_BURST * usize::from(cfg.num_ports)))
            .collect();
        let mut sim = Self {
            table: FlowTable::new(cfg.buckets_log2),
            changed_marks: Vec::new(),
            cfg,
            bar: Arc::new(bar),
            iommu: SimIommu::new(),
            irqs,
            ports,
            faults: FaultHandle::new(),
            stats: SimStats::default(),
            mode: Mode::Ready,
            regs: DevRegs::default(),
            rings: [Ring::default(); 4],
            cpl_phase: true,
            active: Active::default(),
            cmd_started: None,
            rx_batch: FrameBatch::new(RX_BURST),
            rx_pre: Vec::with_capacity(RX_BURST),
            tx_batches,
            now: 0,
        };
        sim.write_reset_image(false);
        Ok(sim)
    }

    /// The BAR's file descriptor: the driver maps 64 KiB of it, `MAP_SHARED`.
    pub fn bar_fd(&self) -> BorrowedFd<'_> {
        self.bar.as_fd()
    }

    /// The BAR image.
    pub fn bar(&self) -> Arc<SharedRegion> {
        Arc::clone(&self.bar)
    }

    /// The simulated IOMMU, where the driver maps its DMA memory.
    pub fn iommu(&self) -> SimIommu {
        self.iommu.clone()
    }

    /// Duplicates of the interrupt eventfds; index = MSI-X vector.
    pub fn irq_fds(&self) -> Result<Vec<OwnedFd>> {
        self.irqs
            .iter()
            .map(|e| e.try_clone().map(OwnedFd::from))
            .collect()
    }

    /// Connects a back-end to port `port` (replacing any previous one).
    pub fn attach_port(&mut self, port: u8, backend: Box<dyn PortBackend>) -> Result<()> {
        let slot = self
            .ports
            .get_mut(usize::from(port))
            .ok_or(Error::BadPort { port })?;
        *slot = Some(backend);
        Ok(())
    }

    /// The fault-injection handle.
    pub fn faults(&self) -> FaultHandle {
        self.faults.clone()
    }

    /// What the model has done so far.
    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.cfg
    }

    /// One step at model time `now_ns`: registers, faults, commands, the TX ring and one
    /// batch of frames from each port. Returns the units of work done (0 = idle).
    pub fn poll(&mut self, now_ns: u64) -> usize {
        self.now = now_ns;
        let mut work = 0;
        // TIMESTAMP: one aligned 64-bit store; a shared-memory host reads it with one
        // 64-bit load (device.md section 19).
        self.store64(regs::TIMESTAMP_LO, now_ns);
        work += self.apply_faults();
        if let Mode::Resetting(done) = self.mode {
            if now_ns >= done {
                self.complete_reset();
                work += 1;
            } else {
                work += self.drain_ports_while_resetting();
                return self.finish(work);
            }
        }
        work += self.registers();
        if self.mode == Mode::Enabled {
            work += self.commands();
        }
        if self.mode == Mode::Enabled {
            work += self.tx_ring();
        }
        work += self.datapath();
        self.finish(work)
    }

    /// Function-level reset (`VFIO_DEVICE_RESET`): the same effects as a soft reset.
    pub fn flr(&mut self, now_ns: u64) {
        self.now = now_ns;
        self.start_reset();
        if let Mode::Resetting(done) = self.mode {
            if now_ns >= done {
                self.complete_reset();
            }
        }
        self.write_ro_regs();
    }

    fn finish(&mut self, work: usize) -> usize {
        self.write_ro_regs();
        if work > 0 {
            self.stats.busy_polls += 1;
        }
        work
    }

    // ---- register image -------------------------------------------------------------

    fn rd(&self, reg: RegOffset) -> u32 {
        self.bar.load_u32_acquire(u64::from(reg.get())).unwrap_or(0)
    }

    fn wr(&self, reg: RegOffset, value: u32) {
        // In bounds and aligned by construction (hw-regs offsets < 64 KiB).
        let _ = self.bar.store_u32_release(u64::from(reg.get()), value);
    }

    /// Writes an RO register only if the image differs: the same image after the poll
    /// as an unconditional rewrite, without dirtying a cache line the host is reading.
    fn wr_ro(&self, reg: RegOffset, value: u32) {
        if self.rd(reg) != value {
            self.wr(reg, value);
        }
    }

    fn store64(&self, reg: RegOffset, value: u64) {
        let _ = self.bar.store_u64_release(u64::from(reg.get()), value);
    }

    /// Writes every register's power-on/reset value. `keep` keeps `RESET_COUNT`.
    fn write_reset_image(&mut self, keep: bool) {
        let reset_count = if keep { self.regs.reset_count } else { 0 };
        // Zero the register page around RESET_COUNT (a kept count never reads as 0 to a
        // driver polling during the reset) and TIMESTAMP (never reset).
        let count_at = u64::from(regs::RESET_COUNT.get());
        let ts_at = u64::from(regs::TIMESTAMP_LO.get());
        for (from, to) in [(0, count_at), (count_at + 4, ts_at), (ts_at + 8, 0x1000)] {
            let _ = self.bar.fill(from, to - from, 0);
        }
        if !keep {
            self.wr(regs::RESET_COUNT, 0);
        }
        self.regs = DevRegs {
            reset_count,
            int_mask: regs::INT_MASK_RESET,
            ..DevRegs::default()
        };
        self.wr(regs::INT_MASK, regs::INT_MASK_RESET);
        self.mode = Mode::Ready;
        self.rings = [Ring::default(); 4];
        self.cpl_phase = true;
        self.cmd_started = None;
        self.write_ro_regs();
    }

    /// Rewrites the identification and capability registers (RO, constant).
    fn write_caps(&self) {
        let cap = self.cfg.capacity();
        let ring_max = regs::RingMaxLog2 {
            cmd: self.cfg.cmd_ring_max_log2,
            cpl: self.cfg.cmd_ring_max_log2,
            rx: self.cfg.rx_ring_max_log2,
            tx: self.cfg.rx_ring_max_log2,
        };
        for (reg, v) in [
            (regs::MAGIC, regs::MAGIC_VALUE),
            (regs::SPEC_VERSION, regs::SPEC_VERSION_VALUE),
            (regs::IMPL_ID, regs::IMPL_ID_SIMULATOR),
            (regs::FEATURES, Features::all().bits()),
            (regs::FLOW_CAPACITY, cap),
            (regs::BUCKETS_LOG2, u32::from(self.cfg.buckets_log2)),
            (regs::WAYS, WAYS),
            (regs::FLOW_LIMIT, self.cfg.flow_limit),
            (regs::COUNTER_COUNT, cap),
            (regs::NUM_PORTS, u32::from(self.cfg.num_ports)),
            (regs::RING_MAX_LOG2, ring_max.to_raw()),
            (regs::TIMESTAMP_FREQ, limits::TIMESTAMP_FREQ_HZ),
            (regs::MAX_FRAME_LEN, SIM_MAX_FRAME_LEN),
        ] {
            self.wr_ro(reg, v);
        }
    }

    fn status(&self) -> u32 {
        match self.mode {
            Mode::Ready => Status::READY.bits(),
            Mode::Enabled => (Status::READY | Status::ENABLED).bits(),
            Mode::Detached => (Status::READY | Status::DETACHED).bits(),
            Mode::Fatal => (Status::READY | Status::FATAL).bits(),
            Mode::Resetting(_) => Status::RESETTING.bits(),
        }
    }

    /// Rewrites the RO registers from the model's state (a host write to one is thus
    /// ignored).
    fn write_ro_regs(&self) {
        self.write_caps();
        self.wr_ro(regs::STATUS, self.status());
        self.wr_ro(regs::FATAL_CODE, self.regs.fatal_code);
        self.wr_ro(regs::FATAL_UNIT, self.regs.fatal_unit);
        let addr = ctoffload_hw_regs::Iova::new(self.regs.fatal_addr);
        self.wr_ro(regs::FATAL_ADDR_LO, addr.lo());
        self.wr_ro(regs::FATAL_ADDR_HI, addr.hi());
        self.wr_ro(regs::RESET_COUNT, self.regs.reset_count);
        self.wr_ro(regs::FLOW_COUNT, self.table.count());
        for (i, v) in self.regs.stats.iter().enumerate() {
            let off = regs::STAT_WIRE_RX.get() + 4 * u32::try_from(i).unwrap_or(0);
            self.wr_ro(RegOffset(off), *v);
        }
        self.wr_ro(regs::CMD_HEAD, self.rings[CMD].dev);
        self.wr_ro(regs::CPL_TAIL, self.rings[CPL].dev);
        self.wr_ro(regs::RX_HEAD, self.rings[RX].dev);
        self.wr_ro(regs::TX_HEAD, self.rings[TX].dev);
    }

    fn doorbell_reg(ring: usize) -> RegOffset {
        if ring == CPL {
            RINGS[ring].head
        } else {
            RINGS[ring].tail
        }
    }

    fn ring_regs_image(&self, ring: usize) -> [u32; 3] {
        let r = RINGS[ring];
        [self.rd(r.base_lo), self.rd(r.base_hi), self.rd(r.size_log2)]
    }

    fn restore_ring_regs(&self, ring: usize) {
        let r = RINGS[ring];
        let [lo, hi, size] = self.regs.ring_regs[ring];
        self.wr(r.base_lo, lo);
        self.wr(r.base_hi, hi);
        self.wr(r.size_log2, size);
    }

    fn count_doorbell(&mut self, ring: usize) {
        match ring {
            CMD => self.stats.cmd_doorbells += 1,
            CPL => self.stats.cpl_doorbells += 1,
            RX => self.stats.rx_doorbells += 1,
            _ => self.stats.tx_doorbells += 1,
        }
    }

    /// Register side effects: soft reset, enable, mask, ring registers, doorbells.
    fn registers(&mut self) -> usize {
        let mut work = 0;
        let ctrl = self.rd(regs::CTRL);
        if ctrl & Ctrl::SOFT_RESET.bits() != 0 {
            self.start_reset();
            if let Mode::Resetting(done) = self.mode {
                if self.now >= done {
                    self.complete_reset();
                }
            }
            return 1;
        }
        // Doorbells: count every change; range-check while enabled.
        for ring in 0..4 {
            let v = self.rd(Self::doorbell_reg(ring));
            if v != self.regs.doorbells[ring] {
                self.regs.doorbells[ring] = v;
                self.count_doorbell(ring);
                work += 1;
                if self.mode == Mode::Enabled {
                    self.doorbell(ring, v);
                }
            }
        }
        match self.mode {
            Mode::Ready | Mode::Detached => {
                let mask = self.rd(regs::INT_MASK);
                self.update_mask(mask);
                self.regs.ctrl = ctrl;
                if ctrl & Ctrl::ENABLE.bits() != 0 {
                    self.enable();
                    work += 1;
                }
            }
            Mode::Enabled => {
                let mask = self.rd(regs::INT_MASK);
                self.update_mask(mask);
                if ctrl & Ctrl::DETACH.bits() != 0 {
                    self.detach();
                    return work + 1;
                }
                if ctrl & Ctrl::ENABLE.bits() == 0 {
                    // ENABLE is sticky: writing 0 has no effect.
                    self.wr(regs::CTRL, self.regs.ctrl);
                }
                for (ring, unit) in RING_UNITS.iter().enumerate() {
                    if self.ring_regs_image(ring) != self.regs.ring_regs[ring] {
                        self.restore_ring_regs(ring);
                        self.enter_fatal(FatalCode::RingConfig.raw(), unit.raw(), 0);
                        work += 1;
                        break;
                    }
                }
            }
            Mode::Fatal => {
                // Every write except CTRL.SOFT_RESET is ignored.
                if ctrl != self.regs.ctrl {
                    self.wr(regs::CTRL, self.regs.ctrl);
                }
                if self.rd(regs::INT_MASK) != self.regs.int_mask {
                    self.wr(regs::INT_MASK, self.regs.int_mask);
                }
                for ring in 0..4 {
                    if self.ring_regs_image(ring) != self.regs.ring_regs[ring] {
                        self.restore_ring_regs(ring);
                    }
                }
            }
            Mode::Resetting(_) => {}
        }
        work
    }

    fn update_mask(&mut self, mask: u32) {
        if mask == self.regs.int_mask {
            return;
        }
        let unmasked = self.regs.int_mask & !mask;
        self.regs.int_mask = mask;
        let cause = self.rd(regs::INT_CAUSE);
        self.signal_vectors(cause & unmasked);
    }

    /// A doorbell write while enabled.
    fn doorbell(&mut self, ring: usize, v: u32) {
        let r = self.rings[ring];
        if v >= r.n() {
            self.enter_fatal(FatalCode::BadDoorbell.raw(), RING_UNITS[ring].raw(), 0);
            return;
        }
        if ring == CPL {
            let mask = r.n() - 1;
            let moved = v.wrapping_sub(r.host) & mask;
            let room = r.dev.wrapping_sub(r.host) & mask;
            if moved > room {
                self.enter_fatal(FatalCode::BadDoorbell.raw(), FatalUnit::CplRing.raw(), 0);
                return;
            }
        }
        self.rings[ring].host = v;
    }

    /// `CTRL.ENABLE` written 1 while ready: validate the rings (section 5.3) and start.
    fn enable(&mut self) {
        let maxima = [
            self.cfg.cmd_ring_max_log2,
            self.cfg.cmd_ring_max_log2,
            self.cfg.rx_ring_max_log2,
            self.cfg.rx_ring_max_log2,
        ];
        let mut rings = [Ring::default(); 4];
        for ring in 0..4 {
            let image = self.ring_regs_image(ring);
            self.regs.ring_regs[ring] = image;
            let [lo, hi, size] = image;
            let log2 = size & regs::SIZE_LOG2_MASK;
            let base = ctoffload_hw_regs::Iova::from_lo_hi(lo, hi).get();
            let doorbell = self.regs.doorbells[ring];
            let bad = size != log2
                || log2 < limits::MIN_RING_SIZE_LOG2
                || log2 > u32::from(maxima[ring])
                || base % limits::RING_BASE_ALIGN != 0
                || doorbell >= (1 << log2)
                || (ring == CPL && (log2 < rings[CMD].log2 || doorbell != 0));
            if bad {
                self.enter_fatal(FatalCode::RingConfig.raw(), RING_UNITS[ring].raw(), 0);
                return;
            }
            rings[ring] = Ring {
                base,
                log2,
                dev: 0,
                host: doorbell,
            };
        }
        self.rings = rings;
        self.cpl_phase = true;
        self.cmd_started = None;
        self.mode = Mode::Enabled;
    }

    /// `CTRL.DETACH` while enabled (section 17.5): the rings stop and are forgotten
    /// (commands not completed get no completion), the ring registers and doorbells
    /// return to 0, the CPL phase to 1; the flow table, its counters and generations,
    /// `RESET_COUNT` and `INT_MASK` are kept, and the datapath keeps forwarding hits.
    fn detach(&mut self) {
        self.rings = [Ring::default(); 4];
        self.regs.ring_regs = [[0; 3]; 4];
        self.regs.doorbells = [0; 4];
        for ring in 0..4 {
            self.restore_ring_regs(ring);
            self.wr(Self::doorbell_reg(ring), 0);
        }
        self.cpl_phase = true;
        self.cmd_started = None;
        self.regs.ctrl = 0;
        self.wr(regs::CTRL, 0);
        self.mode = Mode::Detached;
        self.write_ro_regs();
    }

    // ---- interrupts -----------------------------------------------------------------

    fn signal_vectors(&mut self, causes: u32) {
        let mut vectors = [false; VECTORS];
        for bit in IntCause::from_bits_truncate(causes).iter() {
            if let Some(v) = bit.vector() {
                vectors[usize::from(v)] = true;
            }
        }
        for (v, fire) in vectors.iter().enumerate() {
            if *fire {
                let _ = self.irqs[v].signal();
                self.stats.interrupts += 1;
            }
        }
    }

    /// Sets cause bits; sends a message for each newly set, unmasked one.
    fn raise(&mut self, cause: IntCause) {
        let old = self
            .bar
            .fetch_or_u32(u64::from(regs::INT_CAUSE.get()), cause.bits())
            .unwrap_or(u32::MAX);
        let newly = cause.bits() & !old & !self.regs.int_mask;
        if newly != 0 {
            self.signal_vectors(newly);
        }
    }

    // ---- reset and fatal ------------------------------------------------------------

    fn start_reset(&mut self) {
        if matches!(self.mode, Mode::Resetting(_)) {
            return;
        }
        self.mode = Mode::Resetting(self.now.saturating_add(self.cfg.reset_delay_ns));
        self.write_ro_regs();
    }

    fn complete_reset(&mut self) {
        self.table.clear();
        self.changed_marks.clear();
        self.regs.reset_count = self.regs.reset_count.wrapping_add(1);
        self.write_reset_image(true);
        self.stats.resets += 1;
        // Only RESET_DONE; INT_MASK is back at 0x7, so RESET_DONE is unmasked.
        self.wr(regs::INT_CAUSE, 0);
        self.raise(IntCause::RESET_DONE);
    }

    fn enter_fatal(&mut self, code: u32, unit: u32, addr: u64) {
        if self.mode == Mode::Fatal || matches!(self.mode, Mode::Resetting(_)) {
            return;
        }
        self.regs.fatal_code = code;
        self.regs.fatal_unit = unit;
        self.regs.fatal_addr = addr;
        if self.mode != Mode::Enabled {
            for ring in 0..4 {
                self.regs.ring_regs[ring] = self.ring_regs_image(ring);
            }
        }
        self.regs.ctrl = self.rd(regs::CTRL) & !Ctrl::SOFT_RESET.bits();
        self.mode = Mode::Fatal;
        self.write_ro_regs();
        self.raise(IntCause::FATAL);
    }

    fn dma_fatal(&mut self, f: DmaFail) {
        self.enter_fatal(FatalCode::DmaError.raw(), f.unit.raw(), f.addr);
    }

    // ---- faults ---------------------------------------------------------------------

    fn apply_faults(&mut self) -> usize {
        let Some(req) = self.faults.take() else {
            return 0;
        };
        if req.clear {
            self.active = Active::default();
        }
        self.active.drop_completions = self
            .active
            .drop_completions
            .saturating_add(req.drop_completions);
        self.active.device_error = self.active.device_error.saturating_add(req.device_error);
        if let Some(fill) = req.table_full_at {
            self.active.table_full_at = fill;
        }
        if let Some(ns) = req.slow_commands {
            self.active.slow_ns = ns;
        }
        for (flow, packets, bytes) in req.preload {
            if self.table.preload(flow, packets, bytes) {
                self.stats.faults_fired += 1;
            }
        }
        if let Some((code, unit)) = req.fatal {
            self.enter_fatal(code, unit, 0);
            self.stats.faults_fired += 1;
        }
        if req.spontaneous_reset {
            self.start_reset();
            self.stats.faults_fired += 1;
        }
        self.faults.mark_applied(req.seq);
        1
    }

    // ---- commands -------------------------------------------------------------------

    fn commands(&mut self) -> usize {
        if self.rings[CMD].dev == self.rings[CMD].host {
            self.cmd_started = None;
            return 0;
        }
        // One IOVA-space lock for the whole burst (not two per command).
        let iommu = self.iommu.clone();
        let space = iommu.read();
        let mut done = 0;
        let mut written = 0;
        let mut stop = None;
        // Descriptors are fetched a group at a time (a device prefetches descriptors
        // too), their keys hashed and their table buckets warmed together, then the
        // group is executed in ring order. Fetching is side-effect free: a group cut
        // short (CPL ring full, fault) is fetched again at the next poll.
        let mut group = [None; CMD_GROUP];
        'burst: while done < CMD_BURST {
            let cmd = self.rings[CMD];
            let avail =
                usize::try_from(cmd.host.wrapping_sub(cmd.dev) & (cmd.n() - 1)).unwrap_or(0);
            if avail == 0 {
                self.cmd_started = None;
                break;
            }
            let size = if self.active.slow_ns > 0 {
                1
            } else {
                CMD_GROUP
            };
            let n = avail.min(size).min(CMD_BURST - done);
            let mut slot = cmd.dev;
            for f in group.iter_mut().take(n) {
                *f = Some(self.fetch_command(&space, cmd.slot(slot, 128)));
                slot = cmd.next(slot);
            }
            for f in group.iter().take(n).flatten() {
                if let Ok((_, Some(key))) = f {
                    self.table.warm_for_command(key);
                }
            }
            for f in group.iter_mut().take(n) {
                let Some(fetched) = f.take() else {
                    break 'burst;
                };
                let cmd = self.rings[CMD];
                let cpl = self.rings[CPL];
                if cpl.next(cpl.dev) == cpl.host {
                    break 'burst; // CPL ring full: stall until HEAD moves.
                }
                if self.active.slow_ns > 0 {
                    let started = *self.cmd_started.get_or_insert(self.now);
                    let elapsed = self.now.saturating_sub(started);
                    if self.active.slow_ns > limits::CMD_WATCHDOG_NS
                        && elapsed >= limits::CMD_WATCHDOG_NS
                    {
                        self.stats.faults_fired += 1;
                        stop = Some(Stop::Hang);
                        break 'burst;
                    }
                    if elapsed < self.active.slow_ns {
                        break 'burst;
                    }
                    self.cmd_started = Some(self.now);
                }
                let (desc, key) = match fetched {
                    Ok(d) => d,
                    Err(f) => {
                        stop = Some(Stop::Dma(f));
                        break 'burst;
                    }
                };
                self.stats.commands += 1;
                let cpl_entry = if self.active.device_error > 0 {
                    self.active.device_error -= 1;
                    self.stats.faults_fired += 1;
                    Ok(Completion::new(
                        desc.cookie.get(),
                        desc.opcode,
                        CompletionStatus::DeviceError,
                        false,
                    ))
                } else {
                    self.execute(&desc, key.as_ref(), &space)
                };
                let entry = match cpl_entry {
                    Ok(e) => e,
                    Err(f) => {
                        stop = Some(Stop::Dma(f));
                        break 'burst;
                    }
                };
                self.rings[CMD].dev = cmd.next(cmd.dev);
                done += 1;
                if self.active.drop_completions > 0 {
                    self.active.drop_completions -= 1;
                    self.stats.faults_fired += 1;
                    continue;
                }
                if let Err(f) = self.write_completion(&space, entry) {
                    stop = Some(Stop::Dma(f));
                    break 'burst;
                }
                written += 1;
            }
        }
        drop(space);
        if written > 0 {
            // One `CMD_CPL` cause update per burst, after every completion of the burst
            // is visible: the bit goes 0 -> 1 (and a message is sent) at most once, as
            // with one update per completion, and never before the entry it announces.
            self.raise(IntCause::CMD_CPL);
        }
        match stop {
            Some(Stop::Hang) => {
                self.enter_fatal(FatalCode::CmdHang.raw(), FatalUnit::CmdProcessor.raw(), 0);
            }
            Some(Stop::Dma(f)) => self.dma_fatal(f),
            None => {}
        }
        done
    }

    /// Reads the command descriptor at `at` and, for a flow command, hashes its key.
    fn fetch_command(
        &self,
        space: &DmaSpace,
        at: Iova,
    ) -> Dma<(CommandDescriptor, Option<HashedKey>)> {
        let mut raw = [0u8; CommandDescriptor::SIZE];
        space
            .read_bytes(at, &mut raw)
            .map_err(fail(FatalUnit::CmdRing, at))?;
        let desc = CommandDescriptor::from_bytes(&raw);
        let flow_op = matches!(
            Opcode::try_from(desc.opcode),
            Ok(Opcode::FlowInsert | Opcode::FlowDelete | Opcode::FlowModify | Opcode::FlowQuery)
        );
        let key = flow_op.then(|| {
            // The operand starts with the key's 48-byte image.
            let mut image = [0u8; KEY_LEN];
            image.copy_from_slice(&desc.operand[..KEY_LEN]);
            self.table.hash(&image)
        });
        Ok((desc, key))
    }

    fn write_completion(&mut self, space: &DmaSpace, mut entry: Completion) -> Dma<()> {
        let cpl = self.rings[CPL];
        entry.flags = if self.cpl_phase {
            CompletionFlags::PHASE.bits()
        } else {
            0
        };
        let bytes = entry.to_bytes();
        let at = cpl.slot(cpl.dev, 32);
        let own = at.checked_add(28).unwrap_or(at);
        space
            .write_bytes(at, &bytes[..28])
            .and_then(|()| {
                // Release: the body above is visible before the ownership word.
                space.store_u32_release(own, entry.ownership_word())
            })
            .map_err(fail(FatalUnit::CplRing, at))?;
        let next = cpl.next(cpl.dev);
        if next == 0 {
            self.cpl_phase = !self.cpl_phase;
        }
        self.rings[CPL].dev = next;
        self.stats.completions += 1;
        Ok(())
    }

    /// Executes one command; `Err` is a DMA failure (dumps), fatal.
    fn execute(
        &mut self,
        d: &CommandDescriptor,
        hashed: Option<&HashedKey>,
        space: &DmaSpace,
    ) -> Dma<Completion> {
        let status = |s| Completion::new(d.cookie.get(), d.opcode, s, false);
        let bad = status(CompletionStatus::BadDescriptor);
        let Ok(op) = Opcode::try_from(d.opcode) else {
            return Ok(bad);
        };
        let Some(flags) = CommandFlags::from_bits(d.flags) else {
            return Ok(bad);
        };
        if d.reserved0.get() != 0 {
            return Ok(bad);
        }
        let by_key = flags.contains(CommandFlags::BY_KEY);
        if by_key && op != Opcode::FlowDelete {
            return Ok(bad);
        }
        let changed = flags.contains(CommandFlags::CHANGED);
        if changed && op != Opcode::CounterDump {
            return Ok(bad);
        }
        let cap = self.table.capacity();
        match op {
            Opcode::Nop => {
                if d.flow_id.get() != 0 || d.count.get() != 0 || !all_zero(&d.operand) {
                    return Ok(bad);
                }
                Ok(status(CompletionStatus::Ok))
            }
            Opcode::TableDump | Opcode::CounterDump => {
                let first = d.flow_id.get();
                let count = d.count.get();
                let dump = d.dump_operand();
                let addr = dump.iova();
                let range_ok = count >= 1 && first.checked_add(count).is_some_and(|end| end <= cap);
                if !range_ok
                    || !addr.is_aligned(limits::DUMP_ADDR_ALIGN)
                    || !all_zero(&dump.reserved)
                {
                    return Ok(bad);
                }
                let addr = Iova::new(addr.get());
                let written = if changed {
                    self.dump_changed_counters(space, first, count, addr)?
                } else {
                    self.dump(space, op, first, count, addr)?;
                    count
                };
                let id = FlowId::new(first).unwrap_or_else(unreachable_flow);
                Ok(status(CompletionStatus::Ok)
                    .with_flow(id, 0)
                    .with_count(written))
            }
            Opcode::FlowInsert | Opcode::FlowDelete | Opcode::FlowModify | Opcode::FlowQuery => {
                let operand = d.flow_operand();
                let key = operand.key;
                let action = operand.action;
                if d.count.get() != 0 || !self.key_valid(&key) {
                    return Ok(bad);
                }
                let flow_id = d.flow_id.get();
                let takes_action = matches!(op, Opcode::FlowInsert | Opcode::FlowModify);
                let takes_id = op == Opcode::FlowModify || (op == Opcode::FlowDelete && !by_key);
                if takes_action {
                    if !self.action_valid(&key, &action) {
                        return Ok(bad);
                    }
                } else if !all_zero(&d.operand[KEY_LEN..]) {
                    // The action block must be all zero (FlowAction::default()).
                    return Ok(bad);
                }
                if takes_id {
                    if flow_id >= cap {
                        return Ok(bad);
                    }
                } else if flow_id != 0 {
                    return Ok(bad);
                }
                // The operand starts with the key's 48-byte image: no re-encoding.
                // `hashed` was made from this descriptor's bytes by `fetch_command`.
                let hashed = match hashed {
                    Some(h) => *h,
                    None => {
                        let mut image = [0u8; KEY_LEN];
                        image.copy_from_slice(&d.operand[..KEY_LEN]);
                        self.table.hash(&image)
                    }
                };
                Ok(self.flow_op(op, by_key, flow_id, &key, &hashed, action, status))
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn flow_op(
        &mut self,
        op: Opcode,
        by_key: bool,
        flow_id: u32,
        key: &FlowKey,
        hashed: &HashedKey,
        action: FlowAction,
        status: impl Fn(CompletionStatus) -> Completion,
    ) -> Completion {
        let kind = key.kind().unwrap_or(KeyKind::Ipv4);
        let image = hashed.image();
        let with = |slot: u32, generation: u8, s: CompletionStatus| {
            let id = FlowId::new(slot).unwrap_or_else(unreachable_flow);
            status(s).with_flow(id, generation)
        };
        match op {
            Opcode::FlowInsert => {
                let limit = self
                    .active
                    .table_full_at
                    .map_or(self.cfg.flow_limit, |f| f.min(self.cfg.flow_limit));
                match self
                    .table
                    .insert_hashed(hashed, Entry::decode(action, kind), limit)
                {
                    InsertOutcome::Installed { slot, generation } => {
                        with(slot, generation, CompletionStatus::Ok)
                    }
                    InsertOutcome::Exists { slot, generation } => {
                        with(slot, generation, CompletionStatus::Exists)
                    }
                    InsertOutcome::TableFull => {
                        if self.active.table_full_at.is_some() {
                            self.stats.faults_fired += 1;
                        }
                        status(CompletionStatus::TableFull)
                    }
                    InsertOutcome::BucketFull => status(CompletionStatus::BucketFull),
                }
            }
            Opcode::FlowDelete | Opcode::FlowModify | Opcode::FlowQuery => {
                let slot = if by_key || op == Opcode::FlowQuery {
                    self.table.lookup_hashed(hashed)
                } else {
                    self.table.holds(flow_id, image).then_some(flow_id)
                };
                let Some(slot) = slot else {
                    return status(CompletionStatus::NotFound);
                };
                let generation = self.table.generation_of(slot);
                match op {
                    Opcode::FlowDelete => {
                        let counters = self.table.remove(slot);
                        with(slot, generation, CompletionStatus::Ok).with_counters(counters)
                    }
                    Opcode::FlowModify => {
                        self.table.modify(slot, Entry::decode(action, kind));
                        with(slot, generation, CompletionStatus::Ok)
                    }
                    _ => with(slot, generation, CompletionStatus::Ok)
                        .with_counters(self.table.counters(slot)),
                }
            }
            _ => status(CompletionStatus::BadDescriptor),
        }
    }

    fn dump(
        &mut self,
        space: &DmaSpace,
        op: Opcode,
        first: u32,
        count: u32,
        addr: Iova,
    ) -> Dma<()> {
        let size: u64 = if op == Opcode::TableDump { 128 } else { 32 };
        for i in 0..count {
            let slot = first + i;
            let at = Iova::new(addr.raw().wrapping_add(u64::from(i) * size));
            let id = FlowId::new(slot).unwrap_or_else(unreachable_flow);
            let valid = self.table.is_valid(slot);
            let generation = self.table.generation_of(slot);
            let res = if op == Opcode::TableDump {
                let entry = self
                    .table
                    .entry(slot)
                    .map(|(k, e)| (FlowKey::from_bytes(k), e.raw));
                let rec = TableDumpRecord::new(id, generation, entry);
                space.write_bytes(at, &rec.to_bytes())
            } else {
                let rec = CounterRecord::new(id, valid, generation, self.table.counters(slot));
                space.write_bytes(at, &rec.to_bytes())
            };
            res.map_err(fail(FatalUnit::DumpBuffer, at))?;
        }
        Ok(())
    }

    /// `COUNTER_DUMP` with `CHANGED` (device.md 6.2): one packed record per valid entry
    /// of `[first, first + count)` whose packet counter differs from what the previous
    /// `CHANGED` dump of its slot found (0 for a generation it did not see: insert
    /// clears the counters), in slot order. Returns the number of records written.
    fn dump_changed_counters(
        &mut self,
        space: &DmaSpace,
        first: u32,
        count: u32,
        addr: Iova,
    ) -> Dma<u32> {
        let cap = usize::try_from(self.table.capacity()).unwrap_or(0);
        if self.changed_marks.len() != cap {
            self.changed_marks = vec![0; cap];
        }
        let mut written = 0u32;
        for slot in first..first + count {
            if !self.table.is_valid(slot) {
                continue;
            }
            let generation = self.table.generation_of(slot);
            let counters = self.table.counters(slot);
            let mark = (u64::from(generation) << 32) | u64::from(counters.packets);
            let i = usize::try_from(slot).unwrap_or(usize::MAX);
            let Some(prev) = self.changed_marks.get_mut(i) else {
                continue;
            };
            let prev_packets = if *prev >> 32 == u64::from(generation) {
                *prev & 0xFFFF_FFFF
            } else {
                0
            };
            *prev = mark;
            if prev_packets == u64::from(counters.packets) {
                continue;
            }
            let at = Iova::new(addr.raw().wrapping_add(u64::from(written) * 32));
            let id = FlowId::new(slot).unwrap_or_else(unreachable_flow);
            let rec = CounterRecord::new(id, true, generation, counters);
            space
                .write_bytes(at, &rec.to_bytes())
                .map_err(fail(FatalUnit::DumpBuffer, at))?;
            written += 1;
        }
        Ok(written)
    }

    fn key_valid(&self, k: &FlowKey) -> bool {
        let Ok(kind) = k.kind() else {
            return false;
        };
        let Ok(proto) = k.proto() else {
            return false;
        };
        let v4 = kind == KeyKind::Ipv4;
        let proto_ok = match proto {
            L4Proto::Tcp | L4Proto::Udp => true,
            L4Proto::Icmp => v4,
            L4Proto::Icmpv6 => !v4,
        };
        let icmp_ok = match proto {
            L4Proto::Icmp => [0x0800, 0x0000].contains(&k.dst_port.get()),
            L4Proto::Icmpv6 => [0x8000, 0x8100].contains(&k.dst_port.get()),
            _ => true,
        };
        let addrs_ok = !v4 || (all_zero(&k.src_addr[4..]) && all_zero(&k.dst_addr[4..]));
        proto_ok
            && icmp_ok
            && addrs_ok
            && k.port < self.cfg.num_ports
            && k.flags == 0
            && k.zone.get() <= limits::MAX_ZONE
            && all_zero(&k.reserved)
    }

    fn action_valid(&self, k: &FlowKey, a: &FlowAction) -> bool {
        let Some(flags) = ActionFlags::from_bits(a.flags.get()) else {
            return false;
        };
        if a.reserved0 != 0 || !all_zero(&a.reserved1) || a.out_port >= self.cfg.num_ports {
            return false;
        }
        let clear_ok = |flag: ActionFlags, zero: bool| flags.contains(flag) || zero;
        let fields_ok = clear_ok(ActionFlags::REWRITE_SRC_MAC, all_zero(&a.new_src_mac))
            && clear_ok(ActionFlags::REWRITE_DST_MAC, all_zero(&a.new_dst_mac))
            && clear_ok(
                ActionFlags::SNAT,
                all_zero(&a.new_src_addr) && a.new_src_port.get() == 0,
            )
            && clear_ok(
                ActionFlags::DNAT,
                all_zero(&a.new_dst_addr) && a.new_dst_port.get() == 0,
            );
        let v4 = k.kind == KeyKind::Ipv4.raw();
        let addrs_ok = !v4 || (all_zero(&a.new_src_addr[4..]) && all_zero(&a.new_dst_addr[4..]));
        let drop_ok = !flags.contains(ActionFlags::DROP)
            || ((flags - ActionFlags::DROP - ActionFlags::PUNT_TCP_CTRL).is_empty()
                && a.out_port == 0);
        let icmp = k.proto == L4Proto::Icmp.raw() || k.proto == L4Proto::Icmpv6.raw();
        let echo_ok = !(icmp
            && flags.contains(ActionFlags::SNAT | ActionFlags::DNAT)
            && a.new_src_port != a.new_dst_port);
        fields_ok && addrs_ok && drop_ok && echo_ok
    }

    // ---- host TX ring ---------------------------------------------------------------

    fn tx_ring(&mut self) -> usize {
        let mut done = 0;
        if self.rings[TX].dev == self.rings[TX].host {
            return 0;
        }
        let mut frame = [0u8; FRAME_BUF_SIZE];
        while done < TX_BURST && self.mode == Mode::Enabled {
            let tx = self.rings[TX];
            if tx.dev == tx.host {
                break;
            }
            let at = tx.slot(tx.dev, 16);
            let mut raw = [0u8; TxDescriptor::SIZE];
            if let Err(f) = self
                .iommu
                .with(|d| d.read_bytes(at, &mut raw))
                .map_err(fail(FatalUnit::TxRing, at))
            {
                self.dma_fatal(f);
                break;
            }
            let desc = TxDescriptor::from_bytes(&raw);
            let len = desc.len.get();
            let error = if u32::from(len) < limits::MIN_TX_LEN || u32::from(len) > SIM_MAX_FRAME_LEN
            {
                TxError::BadLength
            } else if desc.port >= self.cfg.num_ports {
                TxError::BadPort
            } else if desc.flags != 0 || desc.reserved.get() != 0 {
                TxError::BadDescriptor
            } else {
                TxError::None
            };
            if error == TxError::None {
                let n = usize::from(len);
                let buf = Iova::new(desc.buf_addr.get());
                if let Err(f) = self
                    .iommu
                    .with(|d| d.read_bytes(buf, &mut frame[..n]))
                    .map_err(fail(FatalUnit::TxBuffer, buf))
                {
                    self.dma_fatal(f);
                    break;
                }
                let wire = n.max(limits::TX_PAD_LEN as usize);
                frame[n..wire].fill(0);
                self.send(desc.port, &frame[..wire]);
                self.regs.stats[ST_TX] = self.regs.stats[ST_TX].wrapping_add(1);
                self.stats.tx_frames += 1;
            } else {
                self.regs.stats[ST_TX_ERR] = self.regs.stats[ST_TX_ERR].wrapping_add(1);
            }
            let mut status = TxStatus::DD;
            if error != TxError::None {
                status |= TxStatus::ERR;
            }
            let own = u32::from_le_bytes([status.bits(), error.raw(), 0, 0]);
            let own_at = at.checked_add(12).unwrap_or(at);
            if let Err(f) = self
                .iommu
                .with(|d| d.store_u32_release(own_at, own))
                .map_err(fail(FatalUnit::TxRing, at))
            {
                self.dma_fatal(f);
                break;
            }
            self.rings[TX].dev = tx.next(tx.dev);
            self.raise(IntCause::TX_DONE);
            done += 1;
        }
        done
    }

    fn send(&mut self, port: u8, frame: &[u8]) {
        match self
            .ports
            .get_mut(usize::from(port))
            .and_then(Option::as_mut)
        {
            Some(backend) => {
                if backend.send(frame).is_err() {
                    self.stats.drops += 1;
                }
            }
            None => self.stats.drops += 1,
        }
    }

    // ---- datapath -------------------------------------------------------------------

    fn drain_ports_while_resetting(&mut self) -> usize {
        let mut batch = std::mem::replace(&mut self.rx_batch, FrameBatch::new(0));
        let mut n = 0;
        for backend in self.ports.iter_mut().flatten() {
            batch.clear();
            n += backend.recv_batch(&mut batch, RX_BURST).unwrap_or(0);
        }
        self.stats.rx_frames += n as u64;
        self.stats.drops += n as u64;
        self.rx_batch = batch;
        n
    }

    fn datapath(&mut self) -> usize {
        let mut batch = std::mem::replace(&mut self.rx_batch, FrameBatch::new(0));
        let mut total = 0;
        for port in 0..self.cfg.num_ports {
            let Some(backend) = self.ports[usize::from(port)].as_mut() else {
                continue;
            };
            batch.clear();
            let n = backend.recv_batch(&mut batch, RX_BURST).unwrap_or(0);
            total += n;
            self.prepare(port, &batch, n);
            for i in 0..n {
                let pre = self.rx_pre.get(i).copied().unwrap_or(Pre::NONE);
                if let Some(frame) = batch.get_mut(i) {
                    self.frame(port, frame, pre);
                }
            }
        }
        self.rx_batch = batch;
        self.stats.rx_frames += total as u64;
        for port in 0..self.tx_batches.len() {
            if self.tx_batches[port].is_empty() {
                continue;
            }
            let out = &self.tx_batches[port];
            match self.ports[port].as_mut() {
                Some(backend) => {
                    if backend.send_batch(out).is_err() {
                        self.stats.drops += out.len() as u64;
                    }
                }
                None => self.stats.drops += out.len() as u64,
            }
            self.tx_batches[port].clear();
        }
        total
    }

    fn bump(&mut self, stat: usize) {
        self.regs.stats[stat] = self.regs.stats[stat].wrapping_add(1);
    }

    /// Classifies and looks up every frame of a batch, with no side effect: keys are
    /// hashed, then the buckets of all of them are read (their cache misses overlap),
    /// then looked up, then the matched slots' records and actions are read. The frames
    /// are then acted on one by one, in order ([`Self::frame`]), as before.
    fn prepare(&mut self, port: u8, batch: &FrameBatch, n: usize) {
        let mut keys = [None; RX_BURST];
        self.rx_pre.clear();
        for (i, key) in keys.iter_mut().enumerate().take(n) {
            let mut pre = Pre::NONE;
            if let Some(f) = batch.get(i).filter(|f| frame_len_ok(f.len())) {
                let parsed = rewrite::classify(f);
                if let Ok(p) = &parsed {
                    *key = Some(self.table.hash(&build_key(port, f, p)));
                }
                pre.parsed = Some(parsed);
            }
            self.rx_pre.push(pre);
        }
        for k in keys.iter().take(n).flatten() {
            self.table.warm(k);
        }
        for (pre, k) in self.rx_pre.iter_mut().zip(&keys) {
            pre.slot = k.as_ref().and_then(|k| self.table.lookup_hashed(k));
        }
        for pre in &self.rx_pre {
            if let Some(slot) = pre.slot {
                self.table.warm_slot(slot);
            }
        }
    }

    /// One received frame, with its classification and lookup from [`Self::prepare`].
    #[inline]
    fn frame(&mut self, port: u8, frame: &mut [u8], pre: Pre) {
        let len = frame.len();
        if !frame_len_ok(len) {
            self.bump(ST_LEN_ERR);
            self.stats.drops += 1;
            return;
        }
        self.bump(ST_WIRE_RX);
        if !matches!(self.mode, Mode::Enabled | Mode::Detached) {
            self.bump(ST_DISABLED);
            self.stats.drops += 1;
            return;
        }
        let (classified, hit) = match pre.parsed {
            Some(c) => (c, pre.slot),
            None => {
                let c = rewrite::classify(frame);
                let key = c.as_ref().ok().map(|p| build_key(port, frame, p));
                (c, key.and_then(|k| self.table.lookup(&k)))
            }
        };
        let parsed = match classified {
            Ok(p) => p,
            Err(reason) => {
                let reason = match reason {
                    PuntReason::NonIp => RxReason::NonIp,
                    PuntReason::Malformed => RxReason::Malformed,
                    PuntReason::Fragment => RxReason::Fragment,
                    PuntReason::IpOptions => RxReason::IpOptions,
                    PuntReason::Ipv6ExtHeaders => RxReason::Ipv6Ext,
                    PuntReason::UnsupportedL4 => RxReason::UnsupportedL4,
                };
                self.punt(port, frame, reason, FlowId::NONE_RAW);
                return;
            }
        };
        let Some(slot) = hit else {
            self.punt(port, frame, RxReason::Miss, FlowId::NONE_RAW);
            return;
        };
        let Some(entry) = self.table.action(slot) else {
            self.punt(port, frame, RxReason::Miss, FlowId::NONE_RAW);
            return;
        };
        let (flags, out_port, params) = (entry.flags, entry.out_port, entry.params);
        if flags.contains(ActionFlags::PUNT_TCP_CTRL) {
            if let L4::Tcp { flags: tcp, .. } = parsed.l4() {
                if tcp & TCP_CTRL_FLAGS != 0 {
                    self.punt(port, frame, RxReason::TcpCtrl, slot);
                    return;
                }
            }
        }
        if flags.contains(ActionFlags::DROP) {
            self.table.count_hit(slot, len, self.now);
            self.bump(ST_HIT);
            self.stats.hits += 1;
            return;
        }
        if flags.contains(ActionFlags::DEC_TTL) && parsed.ttl() <= 1 {
            self.punt(port, frame, RxReason::TtlExpired, slot);
            return;
        }
        if rewrite::rewrite(frame, &parsed, &params).is_err() {
            // Cannot happen for a validated action and a classified frame; treat the
            // frame as one the table cannot judge.
            self.punt(port, frame, RxReason::Malformed, FlowId::NONE_RAW);
            return;
        }
        self.table.count_hit(slot, len, self.now);
        self.bump(ST_HIT);
        self.stats.hits += 1;
        let out = &mut self.tx_batches[usize::from(out_port)];
        if out.push(frame).is_err() {
            self.stats.drops += 1;
        }
    }

    /// Re-reads `RX.TAIL` when the ring looks empty. The register scan at the start
    /// of a poll took a snapshot; buffers the host posted since then (a doorbell
    /// written while the datapath ran) are posted (section 13.3) and must be used
    /// rather than the frame dropped as `NO_BUF`. Same handling as in the scan.
    fn refresh_rx_doorbell(&mut self) {
        // Acquire (in `rd`): the descriptors written before the doorbell are visible.
        let v = self.rd(Self::doorbell_reg(RX));
        if v != self.regs.doorbells[RX] {
            self.regs.doorbells[RX] = v;
            self.count_doorbell(RX);
            if self.mode == Mode::Enabled {
                self.doorbell(RX, v);
            }
        }
    }

    /// Writes a frame to the RX ring (section 13.3).
    fn punt(&mut self, port: u8, frame: &[u8], reason: RxReason, flow_id: u32) {
        if self.mode == Mode::Detached {
            // No RX ring while detached: what would go to the host is dropped.
            self.bump(ST_DISABLED);
            self.stats.drops += 1;
            return;
        }
        if self.rings[RX].dev == self.rings[RX].host {
            self.refresh_rx_doorbell();
            if self.mode != Mode::Enabled {
                // The new doorbell was out of range: the device is now fatal.
                self.stats.drops += 1;
                return;
            }
        }
        let rx = self.rings[RX];
        if rx.dev == rx.host {
            self.bump(ST_NO_BUF);
            self.stats.drops += 1;
            return;
        }
        let at = rx.slot(rx.dev, 32);
        let mut raw = [0u8; RxDescriptor::SIZE];
        if let Err(f) = self
            .iommu
            .with(|d| d.read_bytes(at, &mut raw))
            .map_err(fail(FatalUnit::RxRing, at))
        {
            self.dma_fatal(f);
            return;
        }
        let desc = RxDescriptor::from_bytes(&raw);
        if usize::from(desc.buf_len.get()) < frame.len() {
            self.bump(ST_TOO_BIG);
            self.stats.drops += 1;
            return;
        }
        let buf = Iova::new(desc.buf_addr.get());
        if let Err(f) = self
            .iommu
            .with(|d| d.write_bytes(buf, frame))
            .map_err(fail(FatalUnit::RxBuffer, buf))
        {
            self.dma_fatal(f);
            return;
        }
        let vlan = frame.get(12..14) == Some(&[0x81, 0x00][..]);
        let mut out = desc;
        out.pkt_len = ctoffload_hw_regs::Le16::new(u16::try_from(frame.len()).unwrap_or(0));
        out.flow_id = ctoffload_hw_regs::Le32::new(flow_id);
        out.timestamp = ctoffload_hw_regs::Le64::new(self.now);
        out.port = port;
        out.reason = reason.raw();
        out.reserved = ctoffload_hw_regs::Le16::new(0);
        let bytes = out.to_bytes();
        let mut status = RxStatus::DD;
        if vlan {
            status |= RxStatus::VLAN;
        }
        let body_at = at.checked_add(10).unwrap_or(at);
        let own_at = at.checked_add(28).unwrap_or(at);
        if let Err(f) = self
            .iommu
            .with(|d| {
                d.write_bytes(body_at, &bytes[10..28])?;
                // Release: frame and descriptor body are visible before DD.
                d.store_u32_release(own_at, status.bits())
            })
            .map_err(fail(FatalUnit::RxRing, at))
        {
            self.dma_fatal(f);
            return;
        }
        self.rings[RX].dev = rx.next(rx.dev);
        self.bump(ST_PUNT);
        self.stats.punts += 1;
        self.raise(IntCause::RX);
    }
}

/// A frame's classification and flow-table slot, computed ahead ([`Simulator::prepare`]).
#[derive(Debug, Clone, Copy)]
struct Pre {
    /// `None` for a frame of bad length (never classified).
    parsed: Option<rewrite::Classify>,
    /// The matching slot, if the frame classified and hit.
    slot: Option<u32>,
}

impl Pre {
    const NONE: Self = Self {
        parsed: None,
        slot: None,
    };
}

/// Section 15.1: a frame shorter or longer than the device accepts is dropped.
#[inline]
fn frame_len_ok(len: usize) -> bool {
    (limits::MIN_WIRE_FRAME_LEN as usize..=SIM_MAX_FRAME_LEN as usize).contains(&len)
}

/// Builds the 48-byte key of a classified frame (section 15.2 step 6).
#[inline]
fn build_key(port: u8, frame: &[u8], p: &rewrite::ParsedFrame) -> [u8; 48] {
    let mut k = [0u8; 48];
    let v6 = p.is_ipv6();
    k[0] = if v6 {
        KeyKind::Ipv6.raw()
    } else {
        KeyKind::Ipv4.raw()
    };
    k[1] = port;
    let zone = p.vlan_tci().map_or(0, |tci| tci & 0x0FFF);
    k[4..6].copy_from_slice(&zone.to_le_bytes());
    let (proto, sp, dp) = match p.l4() {
        L4::Tcp {
            src_port, dst_port, ..
        } => (L4Proto::Tcp, src_port, dst_port),
        L4::Udp { src_port, dst_port } => (L4Proto::Udp, src_port, dst_port),
        L4::IcmpEcho { id, reply } => match (v6, reply) {
            (false, false) => (L4Proto::Icmp, id, 0x0800),
            (false, true) => (L4Proto::Icmp, id, 0x0000),
            (true, false) => (L4Proto::Icmpv6, id, 0x8000),
            (true, true) => (L4Proto::Icmpv6, id, 0x8100),
        },
    };
    k[2] = proto.raw();
    k[6..8].copy_from_slice(&sp.to_le_bytes());
    k[8..10].copy_from_slice(&dp.to_le_bytes());
    let l3 = p.l3_offset();
    if v6 {
        if let Some(a) = frame.get(l3 + 8..l3 + 40) {
            k[16..48].copy_from_slice(a);
        }
    } else if let Some(a) = frame.get(l3 + 12..l3 + 20) {
        k[16..20].copy_from_slice(&a[..4]);
        k[32..36].copy_from_slice(&a[4..]);
    }
    k
}

/// Length of a key image; the flow operand is the key image then the action block.
const KEY_LEN: usize = 48;

/// Whether every byte is 0 (an OR-reduction the compiler vectorises, instead of a
/// `memcmp` call per reserved field).
#[inline]
fn all_zero(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, &x| acc | x) == 0
}

/// Slot numbers are below the capacity (at most 2^23), never `0xFFFF_FFFF`.
#[cold]
fn unreachable_flow() -> FlowId {
    FlowId::new(0).unwrap_or_else(|| unreachable!("0 is a valid flow id"))
}
