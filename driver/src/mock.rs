//! A failure-injecting [`DeviceIo`] double (feature `test-utils`).
//!
//! [`MockIo`] is a small in-process device: a register file with the side effects the
//! engine relies on (self-clearing soft reset, W1C, enable validation, doorbells), a
//! flow table good enough to produce every completion status, counter/table dumps, RX
//! injection and TX capture. By default it executes commands synchronously when the
//! CMD doorbell is written; [`MockHandle`] (shared with the test) holds it back, drops
//! completions, forces statuses, raises fatal errors, resets it spontaneously, fails
//! MMIO accesses, and sets counters.

use std::collections::VecDeque;
use std::fmt;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use ctoffload_hw_regs::regs::{self, Ctrl, IntCause, RegOffset, RingMaxLog2, Status};
use ctoffload_hw_regs::{
    CommandDescriptor, CommandFlags, Completion, CompletionStatus, CounterRecord, FlowAction,
    FlowCounters, FlowId, FlowKey, Opcode, RxDescriptor, TableDumpRecord, TxDescriptor,
    bucket_index, key_hash,
};

use crate::error::{DriverError, Result};
use crate::io::{DeviceIo, DmaRegion, MmioCounters, MmioStats};
use crate::iova::Iova;
use crate::mmio::DmaMemory;
use crate::vfio::EventFd;

/// Capabilities of a [`MockIo`].
#[derive(Debug, Clone, Copy)]
pub struct MockConfig {
    /// `BUCKETS_LOG2`.
    pub buckets_log2: u32,
    /// `FLOW_LIMIT`.
    pub flow_limit: u32,
    /// `NUM_PORTS`.
    pub num_ports: u32,
    /// `RING_MAX_LOG2`.
    pub ring_max: RingMaxLog2,
    /// `MAX_FRAME_LEN`.
    pub max_frame_len: u32,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            buckets_log2: 4,
            flow_limit: 128,
            num_ports: 2,
            ring_max: RingMaxLog2 {
                cmd: 3,
                cpl: 3,
                rx: 3,
                tx: 3,
            },
            max_frame_len: 1536,
        }
    }
}

/// DMA memory of the double: a memfd mapped twice (driver view here, device view
/// inside the mock).
#[derive(Debug)]
pub struct MockDma {
    mem: DmaMemory,
    iova: Iova,
}

impl DmaRegion for MockDma {
    fn iova(&self) -> Iova {
        self.iova
    }
    fn memory(&self) -> &DmaMemory {
        &self.mem
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    entry: Option<([u8; 48], FlowAction)>,
    generation: u8,
    counters: FlowCounters,
}

/// The mock device's state.
struct MockDevice {
    cfg: MockConfig,
    regs: Vec<u32>,
    mems: Vec<(u64, u64, DmaMemory)>,
    irqs: Vec<Arc<EventFd>>,
    slots: Vec<Slot>,
    flow_count: u32,
    // Latched doorbells and device indices.
    cmd_tail: u32,
    cmd_head: u32,
    cpl_head: u32,
    cpl_tail: u32,
    cpl_phase: bool,
    rx_tail: u32,
    rx_head: u32,
    tx_tail: u32,
    tx_head: u32,
    // Fault injection.
    hold: bool,
    drop_completions: u32,
    forced: VecDeque<CompletionStatus>,
    fail_reads: u32,
    fail_writes: u32,
    hang_reset: bool,
    // Observations.
    sent: Vec<(u8, Vec<u8>)>,
    doorbells_cmd: u64,
    timestamp: u64,
}

impl MockDevice {
    fn new(cfg: MockConfig, irqs: Vec<Arc<EventFd>>) -> Self {
        let cap = (1usize << cfg.buckets_log2) * 8;
        let mut d = Self {
            cfg,
            regs: vec![0; 0x1_0000 / 4],
            mems: Vec::new(),
            irqs,
            slots: vec![Slot::default(); cap],
            flow_count: 0,
            cmd_tail: 0,
            cmd_head: 0,
            cpl_head: 0,
            cpl_tail: 0,
            cpl_phase: true,
            rx_tail: 0,
            rx_head: 0,
            tx_tail: 0,
            tx_head: 0,
            hold: false,
            drop_completions: 0,
            forced: VecDeque::new(),
            fail_reads: 0,
            fail_writes: 0,
            hang_reset: false,
            sent: Vec::new(),
            doorbells_cmd: 0,
            timestamp: 1,
        };
        let caps = u32::try_from(cap).unwrap_or(0);
        d.set(regs::MAGIC, regs::MAGIC_VALUE);
        d.set(regs::SPEC_VERSION, regs::SPEC_VERSION_VALUE);
        d.set(regs::IMPL_ID, 0x4D4F_434B);
        d.set(regs::FEATURES, 0x1FF);
        d.set(regs::FLOW_CAPACITY, caps);
        d.set(regs::BUCKETS_LOG2, cfg.buckets_log2);
        d.set(regs::WAYS, 8);
        d.set(regs::FLOW_LIMIT, cfg.flow_limit);
        d.set(regs::COUNTER_COUNT, caps);
        d.set(regs::NUM_PORTS, cfg.num_ports);
        d.set(regs::RING_MAX_LOG2, cfg.ring_max.to_raw());
        d.set(regs::TIMESTAMP_FREQ, 1_000_000_000);
        d.set(regs::MAX_FRAME_LEN, cfg.max_frame_len);
        d.reset_regs();
        d
    }

    fn idx(reg: RegOffset) -> usize {
        usize::try_from(reg.get() / 4).unwrap_or(0)
    }
    fn get(&self, reg: RegOffset) -> u32 {
        self.regs[Self::idx(reg)]
    }
    fn set(&mut self, reg: RegOffset, v: u32) {
        self.regs[Self::idx(reg)] = v;
    }

    fn reset_regs(&mut self) {
        for r in [
            regs::CTRL,
            regs::FATAL_CODE,
            regs::FATAL_UNIT,
            regs::FATAL_ADDR_LO,
            regs::FATAL_ADDR_HI,
            regs::FLOW_COUNT,
        ] {
            self.set(r, 0);
        }
        for ring in [regs::CMD_RING, regs::CPL_RING, regs::RX_RING, regs::TX_RING] {
            self.set(ring.base_lo, 0);
            self.set(ring.base_hi, 0);
            self.set(ring.size_log2, 0);
        }
        self.set(regs::STATUS, Status::READY.bits());
        self.set(regs::INT_MASK, regs::INT_MASK_RESET);
        self.slots.iter_mut().for_each(|s| *s = Slot::default());
        self.flow_count = 0;
        self.cmd_tail = 0;
        self.cmd_head = 0;
        self.cpl_head = 0;
        self.cpl_tail = 0;
        self.cpl_phase = true;
        self.rx_tail = 0;
        self.rx_head = 0;
        self.tx_tail = 0;
        self.tx_head = 0;
    }

    fn do_reset(&mut self) {
        if self.hang_reset {
            self.set(regs::STATUS, Status::RESETTING.bits());
            self.set(regs::CTRL, Ctrl::SOFT_RESET.bits());
            return;
        }
        self.reset_regs();
        let c = self.get(regs::RESET_COUNT).wrapping_add(1);
        self.set(regs::RESET_COUNT, c);
        self.set(regs::INT_CAUSE, IntCause::RESET_DONE.bits());
        self.signal(IntCause::RESET_DONE);
    }

    fn signal(&self, cause: IntCause) {
        let masked = IntCause::from_bits_retain(self.get(regs::INT_MASK));
        if masked.contains(cause) {
            return;
        }
        if let Some(v) = cause.vector() {
            if let Some(fd) = self.irqs.get(usize::from(v)) {
                let _ = fd.write(1);
            }
        }
    }

    fn raise(&mut self, cause: IntCause) {
        let old = IntCause::from_bits_retain(self.get(regs::INT_CAUSE));
        self.set(regs::INT_CAUSE, (old | cause).bits());
        if !old.contains(cause) {
            self.signal(cause);
        }
    }

    fn fatal(&mut self, code: u32, unit: u32, addr: u64) {
        if self.status().contains(Status::FATAL) {
            return;
        }
        self.set(regs::FATAL_CODE, code);
        self.set(regs::FATAL_UNIT, unit);
        self.set(
            regs::FATAL_ADDR_LO,
            u32::try_from(addr & 0xFFFF_FFFF).unwrap_or(0),
        );
        self.set(regs::FATAL_ADDR_HI, u32::try_from(addr >> 32).unwrap_or(0));
        let s = (self.status() | Status::FATAL) - Status::ENABLED;
        self.set(regs::STATUS, s.bits());
        self.raise(IntCause::FATAL);
    }

    fn status(&self) -> Status {
        Status::from_bits_retain(self.get(regs::STATUS))
    }

    fn enabled(&self) -> bool {
        self.status().contains(Status::ENABLED)
    }

    fn ring_n(&self, ring: &regs::RingRegOffsets) -> u32 {
        1u32 << (self.get(ring.size_log2) & 0x1F)
    }

    fn ring_base(&self, ring: &regs::RingRegOffsets) -> u64 {
        u64::from(self.get(ring.base_hi)) << 32 | u64::from(self.get(ring.base_lo))
    }

    /// Translates an IOVA range to (memory index, offset).
    fn dma(&self, iova: u64, len: usize) -> Option<(usize, usize)> {
        let len = u64::try_from(len).ok()?;
        self.mems
            .iter()
            .position(|(s, l, _)| iova >= *s && iova + len <= s + l)
            .map(|i| {
                let off = usize::try_from(iova - self.mems[i].0).unwrap_or(0);
                (i, off)
            })
    }

    fn dma_read(&self, iova: u64, out: &mut [u8]) -> bool {
        match self.dma(iova, out.len()) {
            Some((i, off)) => self.mems[i].2.read_bytes(off, out).is_ok(),
            None => false,
        }
    }

    fn dma_write(&self, iova: u64, data: &[u8]) -> bool {
        match self.dma(iova, data.len()) {
            Some((i, off)) => self.mems[i].2.write_bytes(off, data).is_ok(),
            None => false,
        }
    }

    /// Writes the body, then the ownership word with release ordering.
    fn dma_write_owned(&self, iova: u64, data: &[u8], word_off: usize) -> bool {
        let Some((i, off)) = self.dma(iova, data.len()) else {
            return false;
        };
        let m = &self.mems[i].2;
        let mut w = [0u8; 4];
        w.copy_from_slice(&data[word_off..word_off + 4]);
        m.write_bytes(off, &data[..word_off]).is_ok()
            && m.write_bytes(off + word_off + 4, &data[word_off + 4..])
                .is_ok()
            && m.store32_release(off + word_off, u32::from_le_bytes(w))
                .is_ok()
    }

    fn write_reg(&mut self, reg: RegOffset, v: u32) {
        let st = self.status();
        if st.contains(Status::RESETTING) {
            return;
        }
        if reg == regs::CTRL {
            let c = Ctrl::from_bits_retain(v);
            if c.contains(Ctrl::SOFT_RESET) {
                self.do_reset();
            } else if c.contains(Ctrl::ENABLE) && !st.contains(Status::FATAL) {
                self.enable();
            }
            return;
        }
        if st.contains(Status::FATAL) {
            return;
        }
        match reg {
            r if r == regs::INT_MASK => {
                self.set(r, v & 0x1F);
                let pend = IntCause::from_bits_retain(self.get(regs::INT_CAUSE));
                for c in [
                    IntCause::CMD_CPL,
                    IntCause::RX,
                    IntCause::TX_DONE,
                    IntCause::FATAL,
                    IntCause::RESET_DONE,
                ] {
                    if pend.contains(c) {
                        self.signal(c);
                    }
                }
            }
            r if r == regs::CMD_TAIL => {
                self.doorbells_cmd += 1;
                self.cmd_tail = v;
                if self.enabled() && v >= self.ring_n(&regs::CMD_RING) {
                    self.fatal(3, 1, 0);
                } else if self.enabled() && !self.hold {
                    self.process();
                }
            }
            r if r == regs::CPL_HEAD => {
                self.cpl_head = v;
                if self.enabled() && !self.hold {
                    self.process();
                }
            }
            r if r == regs::RX_TAIL => self.rx_tail = v,
            r if r == regs::TX_TAIL => {
                self.tx_tail = v;
                if self.enabled() {
                    self.process_tx();
                }
            }
            r if [regs::CMD_RING, regs::CPL_RING, regs::RX_RING, regs::TX_RING]
                .iter()
                .any(|g| r == g.base_lo || r == g.base_hi || r == g.size_log2) =>
            {
                if self.enabled() {
                    self.fatal(2, 0, 0);
                } else {
                    self.set(r, v);
                }
            }
            _ => {}
        }
    }

    fn enable(&mut self) {
        let max = self.cfg.ring_max;
        let checks = [
            (regs::CMD_RING, max.cmd, self.cmd_tail, 1),
            (regs::CPL_RING, max.cpl, 0, 2),
            (regs::RX_RING, max.rx, self.rx_tail, 3),
            (regs::TX_RING, max.tx, self.tx_tail, 4),
        ];
        for (ring, m, db, unit) in checks {
            let l = self.get(ring.size_log2);
            if l < 2 || l > u32::from(m) || self.ring_base(&ring) % 4096 != 0 || db >= (1 << l) {
                self.fatal(2, unit, 0);
                return;
            }
        }
        if self.get(regs::CPL_SIZE_LOG2) < self.get(regs::CMD_SIZE_LOG2) {
            self.fatal(2, 2, 0);
            return;
        }
        self.set(regs::CTRL, Ctrl::ENABLE.bits());
        self.set(regs::STATUS, (Status::READY | Status::ENABLED).bits());
        if !self.hold {
            self.process();
        }
    }

    /// Executes commands from HEAD to the latched TAIL while the CPL ring has room.
    fn process(&mut self) {
        let n = self.ring_n(&regs::CMD_RING);
        let ncpl = self.ring_n(&regs::CPL_RING);
        while self.enabled() && self.cmd_head != self.cmd_tail {
            if (self.cpl_tail + 1) % ncpl == self.cpl_head {
                return; // CPL full: stall until HEAD moves.
            }
            let mut raw = [0u8; CommandDescriptor::SIZE];
            let at = self.ring_base(&regs::CMD_RING) + u64::from(self.cmd_head) * 128;
            if !self.dma_read(at, &mut raw) {
                self.fatal(1, 1, at);
                return;
            }
            self.cmd_head = (self.cmd_head + 1) % n;
            let d = CommandDescriptor::from_bytes(&raw);
            if self.drop_completions > 0 {
                self.drop_completions -= 1;
                continue;
            }
            let Some(mut c) = self.execute(&d) else {
                return;
            };
            if let Some(s) = self.forced.pop_front() {
                c = Completion::new(d.cookie.get(), d.opcode, s, false);
            }
            c.flags = u8::from(self.cpl_phase);
            let at = self.ring_base(&regs::CPL_RING) + u64::from(self.cpl_tail) * 32;
            if !self.dma_write_owned(at, &c.to_bytes(), Completion::OWNERSHIP_WORD_OFFSET) {
                self.fatal(1, 2, at);
                return;
            }
            self.cpl_tail = (self.cpl_tail + 1) % ncpl;
            if self.cpl_tail == 0 {
                self.cpl_phase = !self.cpl_phase;
            }
            self.raise(IntCause::CMD_CPL);
        }
    }

    fn bucket(&self, key: &FlowKey) -> usize {
        usize::try_from(bucket_index(key_hash(key), self.cfg.buckets_log2)).unwrap_or(0)
    }

    fn find(&self, key: &FlowKey) -> Option<usize> {
        let b = self.bucket(key) * 8;
        let kb = key.to_bytes();
        (b..b + 8).find(|&i| self.slots[i].entry.is_some_and(|(k, _)| k == kb))
    }

    fn execute(&mut self, d: &CommandDescriptor) -> Option<Completion> {
        use CompletionStatus as S;
        let cookie = d.cookie.get();
        let done = |s| Completion::new(cookie, d.opcode, s, false);
        let Ok(op) = d.opcode() else {
            return Some(done(S::BadDescriptor));
        };
        let flags = d.flags();
        let by_key = flags.contains(CommandFlags::BY_KEY);
        if flags.bits() & !CommandFlags::BY_KEY.bits() != 0 || (by_key && op != Opcode::FlowDelete)
        {
            return Some(done(S::BadDescriptor));
        }
        let operand = d.flow_operand();
        let key = operand.key;
        let key_ok = matches!(key.kind, 1 | 2) && u32::from(key.port) < self.cfg.num_ports;
        let cap = self.slots.len();
        let id = usize::try_from(d.flow_id.get()).unwrap_or(usize::MAX);
        let fid = |i: usize| {
            FlowId::new(u32::try_from(i).unwrap_or(0)).expect("a slot index is a flow id")
        };
        Some(match op {
            Opcode::Nop => done(S::Ok),
            Opcode::FlowInsert => {
                if !key_ok || u32::from(operand.action.out_port) >= self.cfg.num_ports {
                    return Some(done(S::BadDescriptor));
                }
                if let Some(i) = self.find(&key) {
                    return Some(done(S::Exists).with_flow(fid(i), self.slots[i].generation));
                }
                if self.flow_count >= self.cfg.flow_limit {
                    return Some(done(S::TableFull));
                }
                let b = self.bucket(&key) * 8;
                let Some(i) = (b..b + 8).find(|&i| self.slots[i].entry.is_none()) else {
                    return Some(done(S::BucketFull));
                };
                let s = &mut self.slots[i];
                s.entry = Some((key.to_bytes(), operand.action));
                s.generation = s.generation.wrapping_add(1);
                s.counters = FlowCounters::default();
                self.flow_count += 1;
                done(S::Ok).with_flow(fid(i), s.generation)
            }
            Opcode::FlowDelete | Opcode::FlowModify => {
                if !key_ok || (!by_key && id >= cap) {
                    return Some(done(S::BadDescriptor));
                }
                let slot = if by_key {
                    self.find(&key)
                } else {
                    self.slots[id]
                        .entry
                        .is_some_and(|(k, _)| k == key.to_bytes())
                        .then_some(id)
                };
                let Some(i) = slot else {
                    return Some(done(S::NotFound));
                };
                let s = &mut self.slots[i];
                let c = done(S::Ok).with_flow(fid(i), s.generation);
                if op == Opcode::FlowDelete {
                    s.entry = None;
                    self.flow_count -= 1;
                    c.with_counters(s.counters)
                } else {
                    s.entry = Some((key.to_bytes(), operand.action));
                    c
                }
            }
            Opcode::FlowQuery => {
                if !key_ok {
                    return Some(done(S::BadDescriptor));
                }
                match self.find(&key) {
                    Some(i) => done(S::Ok)
                        .with_flow(fid(i), self.slots[i].generation)
                        .with_counters(self.slots[i].counters),
                    None => done(S::NotFound),
                }
            }
            Opcode::TableDump | Opcode::CounterDump => {
                let count = usize::try_from(d.count.get()).unwrap_or(0);
                if count == 0 || id.checked_add(count).is_none_or(|e| e > cap) {
                    return Some(done(S::BadDescriptor));
                }
                let buf = d.dump_operand().dma_addr.get();
                for k in 0..count {
                    let i = id + k;
                    let s = self.slots[i];
                    let ok = if op == Opcode::CounterDump {
                        let r =
                            CounterRecord::new(fid(i), s.entry.is_some(), s.generation, s.counters);
                        self.dma_write(buf + u64::try_from(k * 32).unwrap_or(0), &r.to_bytes())
                    } else {
                        let e = s.entry.map(|(k, a)| (FlowKey::from_bytes(&k), a));
                        let r = TableDumpRecord::new(fid(i), s.generation, e);
                        self.dma_write(buf + u64::try_from(k * 128).unwrap_or(0), &r.to_bytes())
                    };
                    if !ok {
                        self.fatal(1, 5, buf);
                        return None;
                    }
                }
                done(S::Ok).with_flow(fid(id), 0).with_count(d.count.get())
            }
        })
    }

    fn process_tx(&mut self) {
        let n = self.ring_n(&regs::TX_RING);
        while self.tx_head != self.tx_tail {
            let at = self.ring_base(&regs::TX_RING) + u64::from(self.tx_head) * 16;
            let mut raw = [0u8; TxDescriptor::SIZE];
            if !self.dma_read(at, &mut raw) {
                self.fatal(1, 4, at);
                return;
            }
            let mut d = TxDescriptor::from_bytes(&raw);
            let len = usize::from(d.len.get());
            let (status, error) =
                if len < 14 || len > usize::try_from(self.cfg.max_frame_len).unwrap_or(0) {
                    (3u8, 1u8)
                } else if u32::from(d.port) >= self.cfg.num_ports {
                    (3, 2)
                } else {
                    let mut frame = vec![0u8; len];
                    if !self.dma_read(d.buf_addr.get(), &mut frame) {
                        self.fatal(1, 7, d.buf_addr.get());
                        return;
                    }
                    self.sent.push((d.port, frame));
                    (1, 0)
                };
            d.status = status;
            d.error = error;
            if !self.dma_write_owned(at, &d.to_bytes(), TxDescriptor::OWNERSHIP_WORD_OFFSET) {
                return;
            }
            self.tx_head = (self.tx_head + 1) % n;
            self.raise(IntCause::TX_DONE);
        }
    }

    fn inject_rx(&mut self, port: u8, reason: u8, flow_id: Option<FlowId>, frame: &[u8]) -> bool {
        if !self.enabled() || self.rx_head == self.rx_tail {
            return false;
        }
        let n = self.ring_n(&regs::RX_RING);
        let at = self.ring_base(&regs::RX_RING) + u64::from(self.rx_head) * 32;
        let mut raw = [0u8; RxDescriptor::SIZE];
        if !self.dma_read(at, &mut raw) {
            return false;
        }
        let mut d = RxDescriptor::from_bytes(&raw);
        if frame.len() > usize::from(d.buf_len.get()) || !self.dma_write(d.buf_addr.get(), frame) {
            return false;
        }
        self.timestamp += 1;
        d.pkt_len = ctoffload_hw_regs::Le16::new(u16::try_from(frame.len()).unwrap_or(0));
        d.flow_id = ctoffload_hw_regs::Le32::new(FlowId::raw_or_none(flow_id));
        d.timestamp = ctoffload_hw_regs::Le64::new(self.timestamp);
        d.port = port;
        d.reason = reason;
        d.status = ctoffload_hw_regs::Le32::new(1);
        if !self.dma_write_owned(at, &d.to_bytes(), RxDescriptor::STATUS_OFFSET) {
            return false;
        }
        self.rx_head = (self.rx_head + 1) % n;
        self.raise(IntCause::RX);
        true
    }
}

/// The test's handle on a [`MockIo`]'s device.
#[derive(Clone)]
pub struct MockHandle(Arc<Mutex<MockDevice>>);

impl fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MockHandle")
    }
}

impl MockHandle {
    fn lock(&self) -> MutexGuard<'_, MockDevice> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds commands back (they stay in the ring) until [`release`](Self::release).
    pub fn hold(&self, on: bool) {
        self.lock().hold = on;
    }

    /// Executes the commands held back so far.
    pub fn release(&self) {
        let mut d = self.lock();
        d.hold = false;
        d.process();
    }

    /// The next `n` commands are consumed without a completion.
    pub fn drop_completions(&self, n: u32) {
        self.lock().drop_completions = n;
    }

    /// The next commands complete with these statuses (no effect).
    pub fn force_status(&self, s: &[CompletionStatus]) {
        self.lock().forced.extend(s.iter().copied());
    }

    /// Enters the fatal state.
    pub fn fatal(&self, code: u32, unit: u32, addr: u64) {
        self.lock().fatal(code, unit, addr);
    }

    /// A spontaneous device reset.
    pub fn spontaneous_reset(&self) {
        self.lock().do_reset();
    }

    /// Resets never complete while set.
    pub fn hang_reset(&self, on: bool) {
        self.lock().hang_reset = on;
    }

    /// The next `n` register reads fail.
    pub fn fail_reads(&self, n: u32) {
        self.lock().fail_reads = n;
    }

    /// The next `n` register writes fail.
    pub fn fail_writes(&self, n: u32) {
        self.lock().fail_writes = n;
    }

    /// Overwrites a register (e.g. a bad MAGIC).
    pub fn poke(&self, reg: RegOffset, v: u32) {
        self.lock().set(reg, v);
    }

    /// Sets the counters of a slot.
    pub fn set_counters(&self, flow_id: FlowId, c: FlowCounters) {
        let mut d = self.lock();
        if let Some(s) = d
            .slots
            .get_mut(usize::try_from(flow_id.get()).unwrap_or(usize::MAX))
        {
            s.counters = c;
        }
    }

    /// Punts a frame to the RX ring; false when no buffer is posted.
    pub fn inject_rx(&self, port: u8, reason: u8, flow_id: Option<FlowId>, frame: &[u8]) -> bool {
        self.lock().inject_rx(port, reason, flow_id, frame)
    }

    /// Frames sent from the TX ring so far.
    pub fn take_sent(&self) -> Vec<(u8, Vec<u8>)> {
        std::mem::take(&mut self.lock().sent)
    }

    /// CMD TAIL doorbells seen.
    pub fn cmd_doorbells(&self) -> u64 {
        self.lock().doorbells_cmd
    }

    /// Installed entries.
    pub fn flow_count(&self) -> u32 {
        self.lock().flow_count
    }

    /// Current register value.
    pub fn reg(&self, reg: RegOffset) -> u32 {
        self.lock().get(reg)
    }
}

/// The double: implements [`DeviceIo`] over a [`MockHandle`]'s device.
pub struct MockIo {
    dev: MockHandle,
    irqs: Vec<Arc<EventFd>>,
    next_iova: u64,
    counters: MmioCounters,
}

impl fmt::Debug for MockIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockIo")
            .field("mmio", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl MockIo {
    /// A fresh device with `cfg`, and the test's handle on it.
    pub fn new(cfg: MockConfig) -> Result<(Self, MockHandle)> {
        let irqs = (0..3)
            .map(|_| EventFd::new().map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        let dev = MockHandle(Arc::new(Mutex::new(MockDevice::new(cfg, irqs.clone()))));
        Ok((
            Self {
                dev: dev.clone(),
                irqs,
                next_iova: 0x10_0000,
                counters: MmioCounters::default(),
            },
            dev,
        ))
    }
}

impl DeviceIo for MockIo {
    type Dma = MockDma;

    fn read32(&self, reg: RegOffset) -> Result<u32> {
        self.counters.read(1);
        let mut d = self.dev.lock();
        if d.fail_reads > 0 {
            d.fail_reads -= 1;
            return Err(DriverError::Injected { what: "MMIO read" });
        }
        Ok(d.get(reg))
    }

    fn write32(&self, reg: RegOffset, value: u32) -> Result<()> {
        self.counters.write();
        let mut d = self.dev.lock();
        if d.fail_writes > 0 {
            d.fail_writes -= 1;
            return Err(DriverError::Injected { what: "MMIO write" });
        }
        d.write_reg(reg, value);
        Ok(())
    }

    fn clear_bits32(&self, reg: RegOffset, bits: u32) -> Result<()> {
        self.counters.write();
        let mut d = self.dev.lock();
        let v = d.get(reg) & !bits;
        d.set(reg, v);
        Ok(())
    }

    fn read_timestamp(&self) -> Result<u64> {
        self.counters.read(1);
        Ok(self.dev.lock().timestamp)
    }

    fn dma_alloc(&mut self, len: usize) -> Result<MockDma> {
        let (mem, fd) = DmaMemory::memfd(len, "mock-dma")?;
        let dev_view = DmaMemory::map_memfd(fd.as_fd(), mem.len())?;
        let size = u64::try_from(mem.len()).unwrap_or(0);
        let iova = self.next_iova;
        self.next_iova = (iova + size).next_multiple_of(0x1000) + 0x1000;
        self.dev.lock().mems.push((iova, size, dev_view));
        Ok(MockDma {
            mem,
            iova: Iova::new(iova),
        })
    }

    fn irq(&self, vector: u16) -> Option<&EventFd> {
        self.irqs.get(usize::from(vector)).map(|a| &**a)
    }

    fn function_reset(&mut self) -> Result<()> {
        self.dev.lock().do_reset();
        Ok(())
    }

    fn mmio_stats(&self) -> MmioStats {
        self.counters.snapshot()
    }
}

/// A key for tests: IPv4 TCP `10.0.0.1:sport -> 10.0.0.2:80` on port 0.
pub fn test_key(sport: u16) -> FlowKey {
    let mut k = FlowKey {
        kind: 1,
        proto: 6,
        ..FlowKey::default()
    };
    k.src_port = ctoffload_hw_regs::Le16::new(sport);
    k.dst_port = ctoffload_hw_regs::Le16::new(80);
    k.src_addr[..4].copy_from_slice(&[10, 0, 0, 1]);
    k.dst_addr[..4].copy_from_slice(&[10, 0, 0, 2]);
    k
}
