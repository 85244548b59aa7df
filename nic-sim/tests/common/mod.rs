//! A raw "host" for tests: it drives the simulator only through the BAR image, DMA
//! memory and eventfds, writing descriptors with the hw-regs encoders. It is not the
//! driver: it is deliberately minimal and trusts nothing but the device's memory.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use ctoffload_hw_regs::regs::{self, Ctrl, RegOffset, Status};
use ctoffload_hw_regs::{
    CommandDescriptor, Completion, FlowAction, FlowKey, Iova, L4Proto, RxDescriptor, TxDescriptor,
};
use ctoffload_nic_sim::event::EventFd;
use ctoffload_nic_sim::port::MemPort;
use ctoffload_nic_sim::{SharedRegion, SimConfig, Simulator};

/// IOVA of the DMA region.
pub const DMA_IOVA: u64 = 0x10_0000;
pub const DMA_SIZE: u64 = 0x10_0000;
pub const CMD_OFF: u64 = 0x0000;
pub const CPL_OFF: u64 = 0x8000;
pub const RX_OFF: u64 = 0xA000;
pub const TX_OFF: u64 = 0xC000;
pub const RXBUF_OFF: u64 = 0x1_0000;
pub const TXBUF_OFF: u64 = 0x3_0000;
pub const DUMP_OFF: u64 = 0x5_0000;
pub const BUF_LEN: u64 = 2048;

/// Ring sizes used by the raw host (log2).
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub cmd: u32,
    pub cpl: u32,
    pub rx: u32,
    pub tx: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            cmd: 4,
            cpl: 4,
            rx: 4,
            tx: 4,
        }
    }
}

pub struct Host {
    pub sim: Simulator,
    pub bar: Arc<SharedRegion>,
    pub dma: SharedRegion,
    pub irqs: Vec<EventFd>,
    pub wires: Vec<MemPort>,
    pub now: u64,
    pub sizes: Sizes,
    pub cmd_tail: u32,
    pub cpl_head: u32,
    pub cpl_phase: bool,
    pub rx_tail: u32,
    pub rx_head: u32,
    pub tx_tail: u32,
    pub tx_head: u32,
    pub cookie: u32,
}

impl Host {
    /// A simulator with two MemPort ports, DMA memory mapped, not yet enabled.
    pub fn new(cfg: SimConfig) -> Self {
        let mut sim = Simulator::new(cfg).unwrap();
        let ports = sim.config().num_ports;
        let mut wires = Vec::new();
        for p in 0..ports {
            let (dev, wire) = MemPort::pair(1024);
            sim.attach_port(p, Box::new(dev)).unwrap();
            wires.push(wire);
        }
        let dma = SharedRegion::create_memfd("test-dma", DMA_SIZE).unwrap();
        sim.iommu().map(DMA_IOVA, dma.as_fd(), 0, DMA_SIZE).unwrap();
        let irqs = sim
            .irq_fds()
            .unwrap()
            .into_iter()
            .map(EventFd::from_owned_fd)
            .collect();
        let bar = sim.bar();
        Self {
            sim,
            bar,
            dma,
            irqs,
            wires,
            now: 1000,
            sizes: Sizes::default(),
            cmd_tail: 0,
            cpl_head: 0,
            cpl_phase: true,
            rx_tail: 0,
            rx_head: 0,
            tx_tail: 0,
            tx_head: 0,
            cookie: 0,
        }
    }

    pub fn small() -> Self {
        Self::new(SimConfig::small())
    }

    /// `new` + `bring_up`.
    pub fn up(cfg: SimConfig) -> Self {
        let mut h = Self::new(cfg);
        h.bring_up();
        h
    }

    pub fn rd(&self, reg: RegOffset) -> u32 {
        self.bar.load_u32_acquire(u64::from(reg.get())).unwrap()
    }

    pub fn wr(&self, reg: RegOffset, v: u32) {
        self.bar.store_u32_release(u64::from(reg.get()), v).unwrap();
    }

    /// W1C on a shared-memory BAR: fetch_and(!bits).
    pub fn w1c(&self, reg: RegOffset, bits: u32) {
        self.bar.fetch_and_u32(u64::from(reg.get()), !bits).unwrap();
    }

    pub fn status(&self) -> Status {
        Status::from_bits_retain(self.rd(regs::STATUS))
    }

    pub fn poll(&mut self) -> usize {
        self.now += 100;
        self.sim.poll(self.now)
    }

    pub fn poll_n(&mut self, n: usize) {
        for _ in 0..n {
            self.poll();
        }
    }

    pub fn iova(off: u64) -> u64 {
        DMA_IOVA + off
    }

    /// Programs the rings (sizes in `self.sizes`), posts N-1 RX buffers, clears causes,
    /// unmasks all, enables.
    pub fn program_rings(&mut self) {
        let s = self.sizes;
        for (ring, off, log2) in [
            (regs::CMD_RING, CMD_OFF, s.cmd),
            (regs::CPL_RING, CPL_OFF, s.cpl),
            (regs::RX_RING, RX_OFF, s.rx),
            (regs::TX_RING, TX_OFF, s.tx),
        ] {
            let iova = Iova::new(Self::iova(off));
            self.wr(ring.base_lo, iova.lo());
            self.wr(ring.base_hi, iova.hi());
            self.wr(ring.size_log2, log2);
        }
        self.dma.fill(CPL_OFF, 0x2000, 0).unwrap();
        self.dma.fill(RX_OFF, 0x2000, 0).unwrap();
        self.dma.fill(TX_OFF, 0x2000, 0).unwrap();
    }

    pub fn bring_up(&mut self) {
        self.program_rings();
        let n = 1u32 << self.sizes.rx;
        self.post_rx(n - 1, u16::try_from(BUF_LEN).unwrap());
        self.w1c(regs::INT_CAUSE, 0x1F);
        self.wr(regs::INT_MASK, 0);
        self.wr(regs::CTRL, Ctrl::ENABLE.bits());
        self.poll();
        assert!(
            self.status().contains(Status::ENABLED),
            "not enabled: status {:?} fatal {} unit {}",
            self.status(),
            self.rd(regs::FATAL_CODE),
            self.rd(regs::FATAL_UNIT)
        );
    }

    // ---- commands ----

    pub fn next_cookie(&mut self) -> u32 {
        self.cookie += 1;
        self.cookie
    }

    /// Writes descriptors at the CMD tail, then one TAIL doorbell.
    pub fn submit(&mut self, descs: &[CommandDescriptor]) {
        let n = 1u32 << self.sizes.cmd;
        for d in descs {
            let off = CMD_OFF + u64::from(self.cmd_tail) * 128;
            self.dma.write_bytes(off, &d.to_bytes()).unwrap();
            self.cmd_tail = (self.cmd_tail + 1) % n;
        }
        self.wr(regs::CMD_TAIL, self.cmd_tail);
    }

    /// Reaps every new completion (phase protocol), then rings CPL HEAD.
    pub fn reap(&mut self) -> Vec<Completion> {
        let n = 1u32 << self.sizes.cpl;
        let mut out = Vec::new();
        loop {
            let off = CPL_OFF + u64::from(self.cpl_head) * 32;
            let own = self.dma.load_u32_acquire(off + 28).unwrap();
            let phase = own >> 24 & 1 == 1;
            if phase != self.cpl_phase {
                break;
            }
            let mut b = [0u8; 32];
            self.dma.read_bytes(off, &mut b).unwrap();
            out.push(Completion::from_bytes(&b));
            self.cpl_head = (self.cpl_head + 1) % n;
            if self.cpl_head == 0 {
                self.cpl_phase = !self.cpl_phase;
            }
        }
        if !out.is_empty() {
            self.wr(regs::CPL_HEAD, self.cpl_head);
        }
        out
    }

    /// Submits one command, polls, returns its completion.
    pub fn cmd(&mut self, d: CommandDescriptor) -> Completion {
        self.submit(&[d]);
        self.poll();
        let mut c = self.reap();
        assert_eq!(c.len(), 1, "expected one completion for {d:?}");
        c.remove(0)
    }

    pub fn insert(&mut self, key: &FlowKey, action: &FlowAction) -> Completion {
        let c = self.next_cookie();
        self.cmd(CommandDescriptor::flow_insert(c, key, action))
    }

    // ---- RX ----

    pub fn post_rx(&mut self, count: u32, len: u16) {
        let n = 1u32 << self.sizes.rx;
        for _ in 0..count {
            let slot = self.rx_tail;
            let buf = Iova::new(Self::iova(RXBUF_OFF + u64::from(slot) * BUF_LEN));
            let d = RxDescriptor::posted(buf, len);
            self.dma
                .write_bytes(RX_OFF + u64::from(slot) * 32, &d.to_bytes())
                .unwrap();
            self.rx_tail = (self.rx_tail + 1) % n;
        }
        self.wr(regs::RX_TAIL, self.rx_tail);
    }

    /// Reaps done RX descriptors (frame copied out); does not repost.
    pub fn reap_rx(&mut self) -> Vec<(RxDescriptor, Vec<u8>)> {
        let n = 1u32 << self.sizes.rx;
        let mut out = Vec::new();
        loop {
            let off = RX_OFF + u64::from(self.rx_head) * 32;
            let st = self.dma.load_u32_acquire(off + 28).unwrap();
            if st & 1 == 0 {
                break;
            }
            let mut b = [0u8; 32];
            self.dma.read_bytes(off, &mut b).unwrap();
            let d = RxDescriptor::from_bytes(&b);
            let mut frame = vec![0u8; usize::from(d.pkt_len.get())];
            let buf_off = d.buf_addr.get() - DMA_IOVA;
            self.dma.read_bytes(buf_off, &mut frame).unwrap();
            // Clear for the next pass.
            self.dma.write_u32(off + 28, 0).unwrap();
            out.push((d, frame));
            self.rx_head = (self.rx_head + 1) % n;
        }
        out
    }

    // ---- TX ----

    /// Queues frames on the TX ring (one doorbell).
    pub fn tx(&mut self, frames: &[(&[u8], u8)]) {
        let n = 1u32 << self.sizes.tx;
        for (frame, port) in frames {
            let slot = self.tx_tail;
            let buf_off = TXBUF_OFF + u64::from(slot) * BUF_LEN;
            self.dma.write_bytes(buf_off, frame).unwrap();
            let d = TxDescriptor::new(
                Iova::new(Self::iova(buf_off)),
                u16::try_from(frame.len()).unwrap(),
                *port,
            );
            self.dma
                .write_bytes(TX_OFF + u64::from(slot) * 16, &d.to_bytes())
                .unwrap();
            self.tx_tail = (self.tx_tail + 1) % n;
        }
        self.wr(regs::TX_TAIL, self.tx_tail);
    }

    pub fn tx_raw(&mut self, d: TxDescriptor) {
        let n = 1u32 << self.sizes.tx;
        self.dma
            .write_bytes(TX_OFF + u64::from(self.tx_tail) * 16, &d.to_bytes())
            .unwrap();
        self.tx_tail = (self.tx_tail + 1) % n;
        self.wr(regs::TX_TAIL, self.tx_tail);
    }

    /// Reaps TX writebacks: (status, error) per descriptor.
    pub fn reap_tx(&mut self) -> Vec<(u8, u8)> {
        let n = 1u32 << self.sizes.tx;
        let mut out = Vec::new();
        loop {
            let off = TX_OFF + u64::from(self.tx_head) * 16;
            let own = self.dma.load_u32_acquire(off + 12).unwrap();
            if own & 1 == 0 {
                break;
            }
            self.dma.write_u32(off + 12, 0).unwrap();
            let [st, err, ..] = own.to_le_bytes();
            out.push((st, err));
            self.tx_head = (self.tx_head + 1) % n;
        }
        out
    }

    // ---- ports ----

    pub fn inject(&mut self, port: u8, frame: &[u8]) {
        use ctoffload_nic_sim::port::PortBackend;
        self.wires[usize::from(port)].send(frame).unwrap();
    }

    pub fn out(&mut self, port: u8) -> Vec<Vec<u8>> {
        self.wires[usize::from(port)].drain_vecs()
    }

    pub fn irq(&self, v: usize) -> Option<u64> {
        self.irqs[v].try_read().unwrap()
    }

    pub fn drain_irqs(&self) {
        for e in &self.irqs {
            let _ = e.try_read().unwrap();
        }
    }
}

/// A UDP/IPv4 key on port 0.
pub fn udp4(sport: u16, dport: u16) -> FlowKey {
    FlowKey::ipv4(
        0,
        L4Proto::Udp,
        0,
        [10, 0, 0, 1].into(),
        sport,
        [10, 0, 0, 2].into(),
        dport,
    )
}

/// Keys that all hash into `bucket` of a table of `2^buckets_log2` buckets.
pub fn colliding_keys(buckets_log2: u32, bucket: u32, count: usize) -> Vec<FlowKey> {
    let mut out = Vec::new();
    let mut sport = 1u16;
    while out.len() < count {
        let k = udp4(sport, 53);
        if ctoffload_hw_regs::bucket_index(ctoffload_hw_regs::key_hash(&k), buckets_log2) == bucket
        {
            out.push(k);
        }
        sport += 1;
    }
    out
}

pub fn owned(fd: OwnedFd) -> EventFd {
    EventFd::from_owned_fd(fd)
}
