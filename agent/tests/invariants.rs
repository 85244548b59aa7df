//! The design's invariants, end to end: the agent's worker over the driver over the
//! simulated NIC (nic-sim in a thread), with scripted traffic injected on the
//! simulator's in-memory ports and the clock advanced by hand.
//!
//! The device clock (simulator `TIMESTAMP`, driver command timeouts) is a shared
//! `AtomicU64` moved only by the test; the worker's `now` is passed explicitly, so
//! nothing depends on how fast the machine is. Waiting for the simulator thread is
//! bounded (a few seconds of wall time) and only ever a precondition, never the thing
//! asserted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ctoffload_agent::cli::sim::driver_io;
use ctoffload_agent::dataplane::state::Entry;
use ctoffload_agent::dataplane::{
    ConnHandle, HwState, NotOffloaded, OffloadPolicy, Worker, WorkerConfig,
};
use ctoffload_driver::device::{Clock, Device, DeviceConfig};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_fallback_sw::conntrack::L4State;
use ctoffload_fallback_sw::table::{Conn, Counter};
use ctoffload_fallback_sw::tcp::TcpState;
use ctoffload_fallback_sw::tuple::{Tuple, proto};
use ctoffload_hw_regs::{FatalCode, FatalUnit, FlowId, regs};
use ctoffload_nic_sim::port::{MemPort, PortBackend};
use ctoffload_nic_sim::{FaultHandle, SimClock, SimConfig, SimThread, Simulator};
use etherparse::PacketBuilder;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const DAY: u64 = 86_400 * S;
/// Wall-clock bound on waiting for the simulator thread (not an assertion on speed).
const WAIT: Duration = Duration::from_secs(10);

const CLIENT: [u8; 4] = [192, 168, 1, 10];
const SERVER: [u8; 4] = [198, 51, 100, 7];
/// UDP payload: frames of 74 bytes, above the 60-byte minimum (no padding).
const PAYLOAD: [u8; 32] = [0x5A; 32];
const UDP_L3: u64 = 20 + 8 + 32;

struct Rig {
    w: Worker<SimIo>,
    sim: SimGuard,
    faults: FaultHandle,
    wire: Vec<MemPort>,
    clock: Arc<AtomicU64>,
}

/// Stops the simulator thread when the test ends.
struct SimGuard(Option<SimThread>);

impl Drop for SimGuard {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            drop(s.stop());
        }
    }
}

/// The IOVA ranges a `SimIo` mapped, so that a test can unmap them when that driver
/// instance goes away (what closing its VFIO container does on real hardware).
type Mapped = Arc<std::sync::Mutex<Vec<(u64, u64)>>>;

/// A driver backend on `sim`; its mappings are recorded in the returned list.
fn sim_io(sim: &Simulator) -> (SimIo, Mapped) {
    let mapped: Mapped = Arc::default();
    let log = Arc::clone(&mapped);
    let io = driver_io(sim, move |iova, len| {
        log.lock().expect("mapping log").push((iova, len));
    })
    .expect("sim io");
    (io, mapped)
}

fn device_config(clock: &Arc<AtomicU64>) -> DeviceConfig {
    DeviceConfig {
        cmd_ring_log2: 6,
        rx_ring_log2: 6,
        tx_ring_log2: 6,
        cmd_timeout_ns: 100 * MS,
        clock: Clock::manual(Arc::clone(clock)),
        dump_chunk: 64,
        // The model is a thread on a shared machine: allow scheduling delays.
        ready_timeout: Duration::from_secs(2),
        enable_timeout: Duration::from_secs(2),
        ..DeviceConfig::default()
    }
}

fn rig_with(sim_cfg: SimConfig, wcfg: WorkerConfig) -> Rig {
    rig_with_spare(sim_cfg, wcfg).0
}

/// A rig, plus a second driver backend on the same simulator (for a second agent)
/// and the simulator's IOMMU with the first backend's mappings.
fn rig_with_spare(
    sim_cfg: SimConfig,
    wcfg: WorkerConfig,
) -> (Rig, SimIo, ctoffload_nic_sim::SimIommu, Mapped) {
    let clock = Arc::new(AtomicU64::new(S));
    let mut sim = Simulator::new(sim_cfg).expect("simulator");
    let mut wire = Vec::new();
    for p in 0..2u8 {
        let (dev_end, host_end) = MemPort::pair(256);
        sim.attach_port(p, Box::new(dev_end)).expect("port");
        wire.push(host_end);
    }
    let (io, mapped) = sim_io(&sim);
    let (spare, _) = sim_io(&sim);
    let iommu = sim.iommu();
    let sim = sim.spawn(SimClock::Manual(Arc::clone(&clock)));
    let faults = sim.faults();
    let dev = Device::new(io, device_config(&clock)).expect("bring-up");
    let rig = Rig {
        w: Worker::new(wcfg, dev),
        sim: SimGuard(Some(sim)),
        faults,
        wire,
        clock,
    };
    (rig, spare, iommu, mapped)
}

/// Per direction (packets, bytes).
fn pairs(c: [Counter; 2]) -> [(u64, u64); 2] {
    [(c[0].packets, c[0].bytes), (c[1].packets, c[1].bytes)]
}

fn rig() -> Rig {
    rig_with(SimConfig::small(), WorkerConfig::default())
}

fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, &PAYLOAD)
        .expect("build");
    v
}

#[allow(clippy::too_many_arguments)]
fn tcp(
    src: [u8; 4],
    sp: u16,
    dst: [u8; 4],
    dp: u16,
    seq: u32,
    ack: Option<u32>,
    flags: &str,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 65535);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('R') {
        b = b.rst();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    b.write(&mut v, &[0x11; 16]).expect("build");
    v
}

fn tuple(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, p: u8) -> Tuple {
    Tuple::v4(src, sp, dst, dp, p)
}

impl Rig {
    /// Waits until the simulator thread took every fault armed so far, so the next
    /// command meets them (a fault armed while a poll is past its fault step would
    /// otherwise miss a command posted right after).
    fn faults_applied(&self) {
        assert!(
            self.faults.wait_applied(Duration::from_secs(10)),
            "the simulator did not apply the armed faults"
        );
    }

    fn now(&self) -> u64 {
        self.clock.load(Ordering::Acquire)
    }

    /// Moves the clock on; the worker must have nothing in flight (or an in-flight
    /// command would look timed out).
    fn advance(&mut self, ns: u64) {
        self.settle();
        let t = self.clock.fetch_add(ns, Ordering::AcqRel) + ns;
        self.sim_at(t);
    }

    /// Waits until the simulator has polled at model time `t` (its `TIMESTAMP`
    /// register), so that the next injected frame is stamped `t`.
    fn sim_at(&mut self, t: u64) {
        self.pump_until("simulator clock", |r| {
            let d = r.w.device_mut();
            let lo = d.read_register(regs::TIMESTAMP_LO).unwrap_or(0);
            let hi = d.read_register(regs::TIMESTAMP_HI).unwrap_or(0);
            (u64::from(hi) << 32 | u64::from(lo)) >= t
        });
    }

    fn sim_stats(&self) -> ctoffload_nic_sim::SimStats {
        self.sim
            .0
            .as_ref()
            .map(SimThread::stats)
            .unwrap_or_default()
    }

    fn poll(&mut self) {
        let now = self.now();
        self.w.poll(now);
    }

    /// Polls until `cond` holds; panics if the simulator never gets there.
    fn pump_until(&mut self, what: &str, mut cond: impl FnMut(&mut Rig) -> bool) {
        let t0 = Instant::now();
        loop {
            self.poll();
            if cond(self) {
                return;
            }
            assert!(t0.elapsed() < WAIT, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Polls until no command is queued or in flight.
    fn settle(&mut self) {
        self.pump_until("commands to complete", |r| r.w.commands_outstanding() == 0);
    }

    /// Injects `frame` on `port` and waits until `n` frames are waiting on `out`
    /// (forwarded by the device, or sent by the slow path); returns them.
    fn send_expect(&mut self, port: usize, frame: &[u8], out: usize, n: usize) -> Vec<Vec<u8>> {
        self.wire[port].send(frame).expect("inject");
        self.pump_until("frames on the egress port", |r| r.wire[out].pending() >= n);
        self.settle();
        self.wire[out].drain_vecs()
    }

    fn handle(&mut self, t: &Tuple) -> ConnHandle {
        let now = self.now();
        self.w.find(t, now).expect("connection exists")
    }

    /// The live connection `h` (a copy), if it is still in the table.
    fn conn(&self, h: ConnHandle) -> Option<Conn<L4State>> {
        self.w.conntrack().table().get_checked(h.slot, h.id)
    }

    fn state(&self, h: ConnHandle) -> (HwState, Option<NotOffloaded>) {
        self.w.hw_state(h).expect("side record")
    }

    fn counters(&self, h: ConnHandle) -> [(u64, u64); 2] {
        let c = self.conn(h).expect("live").counters;
        [(c[0].packets, c[0].bytes), (c[1].packets, c[1].bytes)]
    }

    /// The worker's view of a connection's counters (software plus hardware, pulled
    /// but unfolded counts included): what the API reports.
    fn read_counters(&self, h: ConnHandle) -> [(u64, u64); 2] {
        pairs(self.w.counters(h).expect("live"))
    }

    /// Reconcile ticks, the device's work in between, until every slot's counters
    /// were pulled by a dump started after the call (two table's worth of slots).
    fn reconcile_pass(&mut self) {
        let cap = u64::from(self.w.device_mut().capabilities().flow_capacity);
        let start = self.w.stats().counter_slots;
        let t0 = Instant::now();
        while self.w.stats().counter_slots - start < 2 * cap {
            let now = self.now();
            self.w.reconcile(now);
            self.settle();
            assert!(t0.elapsed() < WAIT, "reconcile pass did not complete");
        }
    }

    fn flow_ids(&self, h: ConnHandle) -> [FlowId; 2] {
        let rec = self.w.hw_record(h).expect("record");
        let id = |e: Entry| match e {
            Entry::Installed { flow_id, .. } => flow_id,
            other => panic!("not installed: {other:?}"),
        };
        [id(rec.entries[0]), id(rec.entries[1])]
    }

    /// Request + reply through the slow path: a replied UDP flow, then offloaded.
    fn udp_flow(&mut self, sp: u16) -> ConnHandle {
        let out = self.send_expect(0, &udp(CLIENT, sp, SERVER, 53), 1, 1);
        assert_eq!(out.len(), 1);
        let t = tuple(CLIENT, sp, SERVER, 53, proto::UDP);
        let h = self.handle(&t);
        assert_eq!(
            self.state(h),
            (
                HwState::None,
                Some(NotOffloaded::Policy(
                    ctoffload_agent::dataplane::Wait::UdpNotReplied
                ))
            )
        );
        let out = self.send_expect(1, &udp(SERVER, 53, CLIENT, sp), 0, 1);
        assert_eq!(out.len(), 1);
        h
    }

    /// Request + reply of UDP flow `sp` through the slow path, without waiting for the
    /// offload's commands (they may be held by a fault).
    fn udp_exchange_unsettled(&mut self, sp: u16) {
        self.wire[0]
            .send(&udp(CLIENT, sp, SERVER, 53))
            .expect("inject");
        self.pump_until("request", |r| r.wire[1].pending() >= 1);
        self.wire[1].drain_vecs();
        self.wire[1]
            .send(&udp(SERVER, 53, CLIENT, sp))
            .expect("inject");
        self.pump_until("reply", |r| r.wire[0].pending() >= 1);
        self.wire[0].drain_vecs();
    }

    /// `n` packets of a flow in one direction, all expected to be forwarded by the
    /// device (the worker sees none of them).
    fn hw_burst(&mut self, port: usize, frame: &[u8], n: usize) {
        let rx_before = self.w.stats().rx;
        for _ in 0..n {
            self.wire[port].send(frame).expect("inject");
        }
        let out = 1 - port;
        self.pump_until("hardware forwarding", |r| r.wire[out].pending() >= n);
        assert_eq!(self.wire[out].drain_vecs().len(), n);
        assert_eq!(self.w.stats().rx, rx_before, "no packet took the slow path");
    }
}

#[test]
fn udp_offloads_once_replied_and_hardware_forwards() {
    let mut r = rig();
    let h = r.udp_flow(1000);
    assert_eq!(r.state(h), (HwState::Offloaded, None));
    let conn = r.w.conntrack().table().get(h.slot).expect("live");
    assert!(
        conn.status
            .contains(ctoffload_fallback_sw::table::Status::HW_OFFLOAD)
    );
    // Both directions now go through the device only.
    r.hw_burst(0, &udp(CLIENT, 1000, SERVER, 53), 3);
    r.hw_burst(1, &udp(SERVER, 53, CLIENT, 1000), 2);
    // The device table holds exactly its two rules.
    let table = r.w.device_mut().dump_table().expect("dump");
    assert_eq!(table.len(), 2);
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Invariant 1: traffic carried only by hardware keeps the connection alive far past
/// every software timeout; its liveness is the hardware last-hit.
#[test]
fn invariant1_long_lived_hardware_flow_is_not_expired() {
    let mut r = rig();
    let h = r.udp_flow(2000);
    let frame = udp(CLIENT, 2000, SERVER, 53);
    // 300 s of traffic seen only by the device: far past the UDP stream timeout
    // (120 s) and the hardware idle timeout (30 s); one packet every 10 s.
    let mut last_hit = 0;
    for _ in 0..30 {
        r.advance(10 * S);
        r.hw_burst(0, &frame, 1);
        last_hit = r.now();
        // A tick starts the counter dump and the next one folds it (a tick never
        // waits for the device): two ticks, the device's work in between.
        let now = r.now();
        r.w.reconcile(now);
        r.settle();
        r.w.reconcile(now);
        r.settle();
        assert_eq!(r.state(h).0, HwState::Offloaded, "still in hardware");
        assert!(r.conn(h).is_some());
    }
    assert_eq!(
        r.w.hw_last_hit(h),
        last_hit,
        "liveness follows the device last-hit"
    );
    // Idle for longer than the hardware idle timeout: it leaves hardware, and its
    // conntrack timeout is the UDP stream timeout counted from the last hardware hit.
    r.advance(31 * S);
    let now = r.now();
    r.w.reconcile(now);
    r.pump_until("idle removal", |r| r.state(h).0 == HwState::None);
    assert_eq!(r.state(h).1, Some(NotOffloaded::Idle));
    let conn = r.conn(h).expect("back in software");
    assert_eq!(conn.timeout, last_hit + 120 * S);
    assert!(r.w.device_mut().dump_table().expect("dump").is_empty());
    // Software GC frees it then, and not before.
    r.advance(120 * S - 31 * S - 1);
    let now = r.now();
    r.w.gc(now);
    assert!(r.conn(h).is_some());
    r.advance(1);
    let now = r.now();
    r.w.gc(now);
    assert!(r.conn(h).is_none());
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Invariant 1, the slow-path side: a packet that missed in hardware while the flow's
/// inserts were in flight, and reaches the worker only after they completed, goes
/// through conntrack as usual (which re-arms its timeout with the UDP timeout, seconds);
/// the worker then holds the timeout again, so software GC cannot expire a connection
/// that hardware carries (the reconciler's own keep-alive runs about once a day).
#[test]
fn invariant1_slow_path_packet_of_an_offloaded_flow_keeps_its_timeout_held() {
    let mut r = rig();
    // Commands take 10 ms of model time: the inserts stay in flight until the clock
    // moves (far below the 50 ms hang watchdog).
    r.faults.slow_commands(10 * MS);
    r.faults_applied();
    r.udp_exchange_unsettled(2500);
    let request = udp(CLIENT, 2500, SERVER, 53);
    let h = r.handle(&tuple(CLIENT, 2500, SERVER, 53, proto::UDP));
    assert_eq!(r.state(h).0, HwState::Pending, "inserts in flight");
    // A request misses in hardware (no rule yet) and waits in the exception ring while
    // the worker is not polled.
    let base = r.sim_stats();
    r.wire[0].send(&request).expect("inject");
    let t0 = Instant::now();
    while r.sim_stats().punts == base.punts {
        assert!(t0.elapsed() < WAIT, "the simulator did not punt the frame");
        std::thread::sleep(Duration::from_micros(50));
    }
    // The device completes both inserts; the next poll reaps them before it reads the
    // exception ring, so the worker sees the packet of an offloaded connection.
    r.faults.clear();
    r.clock.fetch_add(20 * MS, Ordering::AcqRel);
    let t0 = Instant::now();
    while r.sim_stats().completions < base.completions + 2 {
        assert!(
            t0.elapsed() < WAIT,
            "the simulator did not complete the inserts"
        );
        std::thread::sleep(Duration::from_micros(50));
    }
    let rx = r.w.stats().rx;
    r.pump_until("the punted request", |r| r.wire[1].pending() >= 1);
    assert_eq!(r.wire[1].drain_vecs().len(), 1);
    assert_eq!(r.w.stats().rx, rx + 1, "the slow path carried it");
    assert_eq!(r.state(h), (HwState::Offloaded, None));
    let now = r.now();
    let conn = r.conn(h).expect("live");
    assert!(
        conn.remaining(now) > DAY / 2,
        "timeout held while offloaded, not re-armed with the UDP timeout: {} s left",
        conn.remaining(now) / S
    );
    // Ten minutes of hardware-only traffic with GC running: still there, still offloaded.
    let frame = udp(CLIENT, 2500, SERVER, 53);
    for _ in 0..20 {
        r.advance(30 * S);
        r.hw_burst(0, &frame, 1);
        let now = r.now();
        r.w.reconcile(now);
        r.settle();
        r.w.gc(now);
        assert_eq!(r.state(h).0, HwState::Offloaded, "still in hardware");
        assert!(r.conn(h).is_some());
    }
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Invariant 2: the software entry (and with it the NAT binding) outlives the
/// hardware rule: a delete that the device has not completed holds the connection,
/// however late software time gets; the same tuple cannot start a new connection.
#[test]
fn invariant2_hardware_delete_completes_before_software_frees() {
    let mut r = rig();
    let h = r.udp_flow(3000);
    // The device takes 40 ms of model time per command, and model time is frozen: the
    // delete cannot complete until the test moves the clock.
    // The simulator's statistics lag its work by one poll: wait until they show the
    // two inserts, then take them as the base.
    r.pump_until("simulator statistics", |r| {
        let s = r.sim_stats();
        s.completions >= 2 && s.cmd_doorbells >= 1
    });
    r.faults.slow_commands(40 * MS);
    r.faults_applied();
    let base = r.sim_stats();
    let now = r.now();
    assert!(r.w.delete_connection(h, now));
    // The device has seen the deletes (model time is still frozen).
    r.pump_until("delete doorbell", |r| {
        r.sim_stats().cmd_doorbells > base.cmd_doorbells
    });
    assert!(matches!(r.state(h).0, HwState::Dying(_)));
    // Two days later in software time, GC and lookups still find it.
    let later = r.now() + 86_400 * S * 2;
    r.w.gc(later);
    r.w.poll(later);
    assert!(r.conn(h).is_some());
    let t = tuple(CLIENT, 3000, SERVER, 53, proto::UDP);
    assert_eq!(r.w.find(&t, later), Some(h), "tuple not reusable yet");
    // The device completes the first delete (40 ms each, under the 100 ms command
    // timeout): one rule is still installed, so the connection stays.
    r.clock.fetch_add(41 * MS, Ordering::AcqRel);
    r.pump_until("first delete", |r| {
        r.sim_stats().completions > base.completions
    });
    r.w.gc(later);
    assert!(matches!(r.state(h).0, HwState::Dying(_)));
    assert!(r.conn(h).is_some());
    // The second completes; only then is the connection freed.
    r.clock.fetch_add(41 * MS, Ordering::AcqRel);
    r.pump_until("delete completion", |r| r.w.hw_state(h).is_none());
    r.faults.clear();
    r.faults_applied();
    let now = r.now();
    assert!(r.conn(h).is_none());
    assert!(r.w.find(&t, now).is_none());
    assert!(r.w.device_mut().dump_table().expect("dump").is_empty());
    // The tuple starts a new connection, which offloads again into the freed keys.
    let h2 = r.udp_flow(3000);
    assert_ne!(h2.id, h.id);
    assert_eq!(r.state(h2), (HwState::Offloaded, None));
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Invariant 3: software packets + hardware packets = packets sent, per direction,
/// bytes included, with the final counters of the delete folded in exactly once.
#[test]
fn invariant3_counters_add_up_exactly() {
    let mut r = rig();
    let h = r.udp_flow(4000);
    let fwd = udp(CLIENT, 4000, SERVER, 53);
    let rev = udp(SERVER, 53, CLIENT, 4000);
    r.hw_burst(0, &fwd, 10);
    r.hw_burst(1, &rev, 7);
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    assert_eq!(r.counters(h), [(11, 11 * UDP_L3), (8, 8 * UDP_L3)]);
    // A second pull adds nothing.
    r.w.reconcile_full_sweep(now);
    assert_eq!(r.counters(h), [(11, 11 * UDP_L3), (8, 8 * UDP_L3)]);
    // More traffic, then removal: the delete's final counters bring the rest.
    r.hw_burst(0, &fwd, 5);
    r.advance(31 * S);
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    r.pump_until("idle removal", |r| r.state(h).0 == HwState::None);
    assert_eq!(r.counters(h), [(16, 16 * UDP_L3), (8, 8 * UDP_L3)]);
    // Back in software: one more packet each way is counted by software.
    r.send_expect(0, &fwd, 1, 1);
    assert_eq!(r.counters(h)[0], (17, 17 * UDP_L3));
    assert_eq!(r.w.stats().hw_packets, 22);
}

/// Invariant 3 with counter wrap: 32-bit packets and 48-bit bytes wrap between pulls.
#[test]
fn invariant3_counter_wrap_is_handled() {
    let mut r = rig();
    let h = r.udp_flow(4100);
    let [orig, _] = r.flow_ids(h);
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    // As if 2^32 - 3 packets and 2^48 - 100 bytes had hit the entry.
    let pre_p = u32::MAX - 2;
    let pre_b = (1u64 << 48) - 100;
    r.faults.preload_counters(orig.get(), pre_p, pre_b);
    r.faults_applied();
    r.w.reconcile_full_sweep(now);
    let after_preload = r.counters(h)[0];
    assert_eq!(after_preload.0, 1 + u64::from(pre_p));
    // Five more packets wrap both counters.
    r.hw_burst(0, &udp(CLIENT, 4100, SERVER, 53), 5);
    r.w.reconcile_full_sweep(now);
    let c = r.counters(h)[0];
    assert_eq!(c.0, 1 + u64::from(pre_p) + 5);
    assert_eq!(c.1, after_preload.1 + 5 * UDP_L3);
}

/// Invariants 1 and 3 through the ticks' `CHANGED` counter dumps: a pass reports only
/// the slots the traffic hit, counters add up exactly, a quiet pass pulls no record
/// and still keeps a flow that hardware carries, and the idle check (which then reads
/// the slot table, not the records) removes it once idle, with exact final counts.
#[test]
fn ticks_pull_only_moved_slots_and_counters_add_up() {
    let mut r = rig();
    assert!(r.w.device_mut().supports_changed_counter_dump());
    let h = r.udp_flow(4200);
    let quiet = r.udp_flow(4201);
    let fwd = udp(CLIENT, 4200, SERVER, 53);
    let rev = udp(SERVER, 53, CLIENT, 4200);
    r.hw_burst(0, &fwd, 10);
    r.hw_burst(1, &rev, 7);
    let before = r.w.stats().counter_records;
    r.reconcile_pass();
    // Only the two slots of `h` moved: at most their two records per dump pass.
    let records = r.w.stats().counter_records - before;
    assert!((2..=4).contains(&records), "{records} records");
    assert_eq!(r.read_counters(h), [(11, 11 * UDP_L3), (8, 8 * UDP_L3)]);
    assert_eq!(r.read_counters(quiet), [(1, UDP_L3), (1, UDP_L3)]);
    // A quiet pass pulls nothing and adds nothing.
    let before = r.w.stats().counter_records;
    r.reconcile_pass();
    assert_eq!(r.w.stats().counter_records, before);
    assert_eq!(r.read_counters(h), [(11, 11 * UDP_L3), (8, 8 * UDP_L3)]);
    // Hardware-only traffic every 20 s for 100 s (past the 30 s hardware idle
    // timeout): `h` stays, `quiet` leaves hardware idle.
    for _ in 0..5 {
        r.advance(20 * S);
        r.hw_burst(0, &fwd, 1);
        r.reconcile_pass();
        assert_eq!(r.state(h).0, HwState::Offloaded, "carried by hardware");
    }
    r.pump_until("quiet flow idle", |r| r.state(quiet).0 == HwState::None);
    assert_eq!(r.state(quiet).1, Some(NotOffloaded::Idle));
    assert_eq!(r.read_counters(quiet), [(1, UDP_L3), (1, UDP_L3)]);
    assert_eq!(r.read_counters(h), [(16, 16 * UDP_L3), (8, 8 * UDP_L3)]);
    // Idle: it leaves hardware; the delete's final counters add nothing twice.
    r.hw_burst(1, &rev, 2);
    r.advance(31 * S);
    r.reconcile_pass();
    r.pump_until("idle removal", |r| r.state(h).0 == HwState::None);
    assert_eq!(r.read_counters(h), [(16, 16 * UDP_L3), (10, 10 * UDP_L3)]);
    assert_eq!(r.w.stats().hw_packets, 15 + 9);
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Invariant 4: a FIN hits the hardware rule, is punted, software advances the TCP
/// state, and the flow leaves hardware with its counters and timeout fixed up.
#[test]
fn invariant4_fin_and_rst_tear_down() {
    for (i, flag) in ["F", "R"].into_iter().enumerate() {
        let mut r = rig();
        let sp = 5000 + u16::try_from(i).expect("small");
        r.send_expect(0, &tcp(CLIENT, sp, SERVER, 80, 100, None, "S"), 1, 1);
        r.send_expect(1, &tcp(SERVER, 80, CLIENT, sp, 500, Some(101), "S"), 0, 1);
        let t = tuple(CLIENT, sp, SERVER, 80, proto::TCP);
        let h = r.handle(&t);
        assert_eq!(r.state(h).0, HwState::None, "handshake not complete");
        r.send_expect(0, &tcp(CLIENT, sp, SERVER, 80, 101, Some(501), ""), 1, 1);
        assert_eq!(r.state(h), (HwState::Offloaded, None));
        // Data both ways through the device.
        r.hw_burst(0, &tcp(CLIENT, sp, SERVER, 80, 117, Some(501), ""), 4);
        r.hw_burst(1, &tcp(SERVER, 80, CLIENT, sp, 501, Some(181), ""), 3);
        let punts = r.w.stats().punt_tcp_ctrl;
        // Teardown packet: punted by the rule, forwarded by the slow path.
        let out = r.send_expect(1, &tcp(SERVER, 80, CLIENT, sp, 517, Some(181), flag), 0, 1);
        assert_eq!(out.len(), 1);
        assert_eq!(r.w.stats().punt_tcp_ctrl, punts + 1);
        r.pump_until("teardown", |r| r.state(h).0 == HwState::None);
        assert_eq!(r.state(h).1, Some(NotOffloaded::Closing));
        assert!(r.w.device_mut().dump_table().expect("dump").is_empty());
        let now = r.now();
        let conn = r.conn(h).expect("live");
        let L4State::Tcp(tcp_state) = conn.proto else {
            panic!("tcp")
        };
        let (state, limit) = if flag == "F" {
            (TcpState::FinWait, 120 * S)
        } else {
            (TcpState::Close, 10 * S)
        };
        assert_eq!(tcp_state.state(), state);
        assert!(
            conn.remaining(now) <= limit && conn.remaining(now) > 0,
            "timeout fixed up to the new state: {}",
            conn.remaining(now)
        );
        // Counters: 3 + 4 sent by the client, 1 + 3 + 1 by the server; each once.
        let c = r.counters(h);
        assert_eq!((c[0].0, c[1].0), (6, 5));
    }
}

/// Table full: the flow stays in software with the reason visible, is counted, and is
/// retried with backoff; it offloads once there is room.
#[test]
fn table_full_falls_back_to_software_and_retries() {
    // Five entries: two flows fit, the third's reply-direction insert fails.
    let mut r = rig_with(
        SimConfig {
            flow_limit: 5,
            ..SimConfig::small()
        },
        WorkerConfig::default(),
    );
    let a = r.udp_flow(6000);
    let b = r.udp_flow(6001);
    let c = r.udp_flow(6002);
    assert_eq!(r.state(a).0, HwState::Offloaded);
    assert_eq!(r.state(b).0, HwState::Offloaded);
    assert_eq!(r.state(c), (HwState::None, Some(NotOffloaded::TableFull)));
    assert!(r.w.stats().insert_table_full >= 1);
    // The half-installed rule was taken back.
    assert_eq!(r.w.device_mut().dump_table().expect("dump").len(), 4);
    // Traffic of the third flow keeps flowing, through software.
    let before = r.w.stats().rx;
    r.send_expect(0, &udp(CLIENT, 6002, SERVER, 53), 1, 1);
    assert_eq!(r.w.stats().rx, before + 1);
    assert_eq!(r.state(c).0, HwState::None, "backoff: no retry yet");
    // Room appears; after the backoff the next packet offloads it.
    let now = r.now();
    assert!(r.w.delete_connection(a, now));
    r.settle();
    r.advance(2 * S);
    r.send_expect(0, &udp(CLIENT, 6002, SERVER, 53), 1, 1);
    assert_eq!(r.state(c), (HwState::Offloaded, None));
}

#[test]
fn table_full_displaces_the_coldest_flow_when_enabled() {
    let mut r = rig_with(
        SimConfig {
            flow_limit: 4,
            ..SimConfig::small()
        },
        WorkerConfig {
            policy: OffloadPolicy {
                displace_coldest: true,
                ..OffloadPolicy::default()
            },
            ..WorkerConfig::default()
        },
    );
    let a = r.udp_flow(7000);
    r.advance(S);
    let b = r.udp_flow(7001);
    r.advance(S);
    r.hw_burst(0, &udp(CLIENT, 7001, SERVER, 53), 1);
    let c = r.udp_flow(7002);
    assert_eq!(r.state(c).1, Some(NotOffloaded::TableFull));
    // The coldest (a) was displaced; the next packet of c gets its room.
    r.settle();
    assert_eq!(r.state(a), (HwState::None, Some(NotOffloaded::Displaced)));
    assert_eq!(r.state(b).0, HwState::Offloaded);
    r.send_expect(0, &udp(CLIENT, 7002, SERVER, 53), 1, 1);
    assert_eq!(r.state(c), (HwState::Offloaded, None));
    assert_eq!(r.w.stats().displaced, 1);
}

/// Invariant 5, shared script: a flow offloaded, the fault, then: every flow back in
/// software with its state, traffic through the slow path, offload again after
/// recovery.
fn fault_script(arm: impl FnOnce(&mut Rig), trigger_insert: bool) {
    let mut r = rig();
    let h = r.udp_flow(8000);
    let faults_before = r.w.stats().faults;
    arm(&mut r);
    r.faults_applied();
    if trigger_insert {
        // A new flow's inserts run into the fault.
        r.udp_exchange_unsettled(8001);
        // Model time moves past the command timeout / watchdog.
        for _ in 0..3 {
            r.clock.fetch_add(60 * MS, Ordering::AcqRel);
            for _ in 0..50 {
                r.poll();
            }
        }
    }
    r.pump_until("fault detected", |r| {
        let now = r.now();
        if r.w.stats().faults == faults_before {
            r.w.reconcile(now);
        }
        r.w.stats().faults > faults_before
    });
    r.faults.clear();
    r.faults_applied();
    // Back in software, state intact.
    assert_eq!(r.state(h), (HwState::None, Some(NotOffloaded::DeviceDown)));
    let conn = r.conn(h).expect("kept");
    assert!(
        conn.status
            .contains(ctoffload_fallback_sw::table::Status::SEEN_REPLY)
    );
    assert!(
        !conn
            .status
            .contains(ctoffload_fallback_sw::table::Status::OFFLOAD)
    );
    let counted = r.counters(h);
    // Recovery (reinit) and traffic: first through the slow path, which offloads it again.
    r.pump_until("recovery", |r| {
        if !r.w.device_up() {
            r.clock.fetch_add(2 * S, Ordering::AcqRel);
            let now = r.now();
            r.w.reconcile(now);
        }
        r.w.device_up()
    });
    assert!(r.w.stats().recoveries >= 1);
    r.settle();
    let rx = r.w.stats().rx;
    r.send_expect(0, &udp(CLIENT, 8000, SERVER, 53), 1, 1);
    assert_eq!(r.w.stats().rx, rx + 1, "slow path carried it");
    assert_eq!(r.counters(h)[0].0, counted[0].0 + 1);
    assert_eq!(r.state(h), (HwState::Offloaded, None));
    r.hw_burst(0, &udp(CLIENT, 8000, SERVER, 53), 2);
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

#[test]
fn invariant5_command_timeout() {
    fault_script(|r| r.faults.drop_completions(2), true);
}

#[test]
fn invariant5_fatal_error() {
    fault_script(
        |r| r.faults.fatal(FatalCode::Parity, FatalUnit::None),
        false,
    );
}

#[test]
fn invariant5_spontaneous_reset() {
    fault_script(|r| r.faults.spontaneous_reset(), false);
}

#[test]
fn invariant5_command_hang_watchdog() {
    fault_script(|r| r.faults.slow_commands(60 * MS), true);
}

#[test]
fn invariant5_device_error_leaves_flow_in_software_and_retries() {
    let mut r = rig();
    r.faults.device_error_next(1);
    r.faults_applied();
    let h = r.udp_flow(9000);
    assert_eq!(r.state(h), (HwState::None, Some(NotOffloaded::DeviceError)));
    assert!(r.w.stats().insert_error >= 1);
    assert_eq!(
        r.w.stats().faults,
        0,
        "a DEVICE_ERROR is not a device fault"
    );
    // The flow keeps working in software; after the backoff it offloads.
    r.advance(2 * S);
    r.send_expect(0, &udp(CLIENT, 9000, SERVER, 53), 1, 1);
    assert_eq!(r.state(h), (HwState::Offloaded, None));
}

/// Restart: a new worker over the device that stayed up rebuilds its connections from
/// the table dump; stale entries are deleted; adopted flows keep forwarding in
/// hardware and their counts continue.
#[test]
fn restart_rebuilds_connections_from_the_device_table() {
    let mut r = rig();
    let a = r.udp_flow(10_000);
    r.send_expect(0, &tcp(CLIENT, 10_001, SERVER, 80, 100, None, "S"), 1, 1);
    r.send_expect(
        1,
        &tcp(SERVER, 80, CLIENT, 10_001, 500, Some(101), "S"),
        0,
        1,
    );
    r.send_expect(
        0,
        &tcp(CLIENT, 10_001, SERVER, 80, 101, Some(501), ""),
        1,
        1,
    );
    let tt = tuple(CLIENT, 10_001, SERVER, 80, proto::TCP);
    let b = r.handle(&tt);
    assert_eq!(r.state(a).0, HwState::Offloaded);
    assert_eq!(r.state(b).0, HwState::Offloaded);
    // A stale entry with no partner (as if left by a crashed worker).
    let stale = ctoffload_hw_regs::FlowKey::ipv4(
        0,
        ctoffload_hw_regs::L4Proto::Udp,
        0,
        [10, 9, 9, 9].into(),
        1,
        [10, 9, 9, 8].into(),
        2,
    );
    let res =
        r.w.device_mut()
            .execute(
                &[ctoffload_driver::device::FlowCommand::Insert {
                    key: stale,
                    action: ctoffload_hw_regs::FlowAction::forward(1),
                }],
                WAIT,
            )
            .expect("insert");
    assert!(res[0].is_ok());
    r.hw_burst(0, &udp(CLIENT, 10_000, SERVER, 53), 3);
    // Restart.
    let Rig {
        w,
        sim,
        faults,
        wire,
        clock,
    } = r;
    let now = clock.load(Ordering::Acquire);
    let (w, report) = w.restart(now);
    let mut r = Rig {
        w,
        sim,
        faults,
        wire,
        clock,
    };
    let report = report.expect("restore");
    assert_eq!(report.entries, 5);
    assert_eq!(report.adopted, 2);
    assert_eq!(report.deleted, 1);
    r.settle();
    assert_eq!(r.w.device_mut().dump_table().expect("dump").len(), 4);
    let ut = tuple(CLIENT, 10_000, SERVER, 53, proto::UDP);
    let a2 = r.handle(&ut);
    let b2 = r.handle(&tt);
    assert_eq!(r.state(a2), (HwState::Offloaded, None));
    assert_eq!(r.state(b2), (HwState::Offloaded, None));
    let conn = r.w.conntrack().table().get(b2.slot).expect("tcp");
    let L4State::Tcp(t) = conn.proto else {
        panic!("tcp")
    };
    assert_eq!(t.state(), TcpState::Established);
    // Hardware keeps forwarding; the first pull brings the counts since insert.
    r.hw_burst(0, &udp(CLIENT, 10_000, SERVER, 53), 2);
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    assert_eq!(r.counters(a2)[0], (5, 5 * UDP_L3));
    // Teardown still works on an adopted TCP connection.
    r.send_expect(
        1,
        &tcp(SERVER, 80, CLIENT, 10_001, 501, Some(101), "F"),
        0,
        1,
    );
    r.pump_until("teardown", |r| r.state(b2).0 == HwState::None);
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Software backend equivalence: the same traffic through the slow path only (offload
/// switched off) and through the simulated NIC (offloaded after the handshake / first
/// reply) leaves byte-identical frames, with MAC rewrite and TTL decrement done by
/// software in one case and by the device's rules in the other, and ends in the same
/// conntrack states and counters.
#[test]
fn software_and_hardware_paths_are_equivalent() {
    let routing = ctoffload_agent::dataplane::Routing {
        egress: vec![1, 0],
        l2: vec![
            Some(ctoffload_agent::dataplane::PortL2 {
                mac: [2, 0xaa, 0, 0, 0, 0],
                next_hop: [2, 0xbb, 0, 0, 0, 0],
            }),
            Some(ctoffload_agent::dataplane::PortL2 {
                mac: [2, 0xaa, 0, 0, 0, 1],
                next_hop: [2, 0xbb, 0, 0, 0, 1],
            }),
        ],
        dec_ttl: true,
    };
    let script = equivalence_script();
    let run = |offload: bool| {
        let mut r = rig_with(
            SimConfig::small(),
            WorkerConfig {
                routing: routing.clone(),
                policy: OffloadPolicy {
                    tcp: offload,
                    udp: offload,
                    ..OffloadPolicy::default()
                },
                ..WorkerConfig::default()
            },
        );
        let mut out = Vec::new();
        for (port, f) in &script {
            let got = r.send_expect(*port, f, 1 - port, 1);
            assert_eq!(got.len(), 1);
            out.push(got.into_iter().next().expect("frame"));
        }
        let now = r.now();
        r.w.reconcile_full_sweep(now);
        r.settle();
        let mut states = Vec::new();
        for (t, p) in [
            (20_000u16, proto::UDP),
            (20_001, proto::UDP),
            (20_002, proto::TCP),
        ] {
            let dp = if p == proto::TCP { 80 } else { 53 };
            let h = r.handle(&tuple(CLIENT, t, SERVER, dp, p));
            let conn = r.conn(h).expect("live");
            let tcp_state = match conn.proto {
                L4State::Tcp(t) => Some(t.state()),
                _ => None,
            };
            let status = conn.status
                - (ctoffload_fallback_sw::table::Status::OFFLOAD
                    | ctoffload_fallback_sw::table::Status::HW_OFFLOAD);
            states.push((tcp_state, status, r.counters(h)));
        }
        (out, states, r.w.stats())
    };
    let (sw_out, sw_states, sw_stats) = run(false);
    let (hw_out, hw_states, hw_stats) = run(true);
    assert_eq!(sw_stats.hw_packets, 0);
    assert!(hw_stats.hw_packets > 0, "the device carried part of it");
    assert_eq!(sw_out.len(), hw_out.len());
    for (i, (a, b)) in sw_out.iter().zip(&hw_out).enumerate() {
        assert_eq!(a, b, "frame {i} differs");
    }
    assert_eq!(sw_states, hw_states);
}

/// Invariant 2 for an operator delete that arrives while the inserts are in flight:
/// the connection is freed only after the inserts completed and their rules were
/// deleted again.
#[test]
fn invariant2_delete_while_pending_frees_after_the_rules_are_gone() {
    let mut r = rig();
    r.send_expect(0, &udp(CLIENT, 11_000, SERVER, 53), 1, 1);
    let h = r.handle(&tuple(CLIENT, 11_000, SERVER, 53, proto::UDP));
    // Inserts take 40 ms of (frozen) model time each.
    r.faults.slow_commands(40 * MS);
    r.faults_applied();
    r.wire[1]
        .send(&udp(SERVER, 53, CLIENT, 11_000))
        .expect("inject");
    r.pump_until("inserts submitted", |r| r.sim_stats().cmd_doorbells >= 1);
    assert_eq!(r.state(h).0, HwState::Pending);
    let now = r.now();
    assert!(r.w.delete_connection(h, now));
    let t = r.now();
    // Model time moves 41 ms at a time: insert, insert (then the deletes are queued
    // and the simulator must see them before time moves on), delete, delete. The
    // worker's outstanding commands after each step: 1, 2, 1, 0.
    for (step, outstanding) in [(1u64, 1usize), (2, 2), (3, 1), (4, 0)] {
        r.clock.fetch_add(41 * MS, Ordering::AcqRel);
        r.sim_at(t + step * 41 * MS);
        r.pump_until("a command", |r| r.w.commands_outstanding() == outstanding);
        if step == 2 {
            r.pump_until("delete doorbell", |r| r.sim_stats().cmd_doorbells >= 2);
        }
        if step < 4 {
            assert!(
                r.conn(h).is_some(),
                "freed before its rules were gone (step {step})"
            );
        }
    }
    r.pump_until("freed", |r| r.w.hw_state(h).is_none());
    r.faults.clear();
    r.faults_applied();
    assert!(r.conn(h).is_none());
    assert!(r.w.device_mut().dump_table().expect("dump").is_empty());
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Two UDP flows and a TCP connection with data both ways and FINs: (port, frame).
fn equivalence_script() -> Vec<(usize, Vec<u8>)> {
    let mut script: Vec<(usize, Vec<u8>)> = Vec::new();
    for sp in [20_000u16, 20_001] {
        script.push((0, udp(CLIENT, sp, SERVER, 53)));
        script.push((1, udp(SERVER, 53, CLIENT, sp)));
        for _ in 0..3 {
            script.push((0, udp(CLIENT, sp, SERVER, 53)));
            script.push((1, udp(SERVER, 53, CLIENT, sp)));
        }
    }
    let sp = 20_002;
    script.push((0, tcp(CLIENT, sp, SERVER, 80, 100, None, "S")));
    script.push((1, tcp(SERVER, 80, CLIENT, sp, 500, Some(101), "S")));
    script.push((0, tcp(CLIENT, sp, SERVER, 80, 101, Some(501), "")));
    let mut seq_c = 101;
    let mut seq_s = 501;
    for _ in 0..3 {
        script.push((0, tcp(CLIENT, sp, SERVER, 80, seq_c, Some(seq_s), "")));
        seq_c += 16;
        script.push((1, tcp(SERVER, 80, CLIENT, sp, seq_s, Some(seq_c), "")));
        seq_s += 16;
    }
    script.push((0, tcp(CLIENT, sp, SERVER, 80, seq_c, Some(seq_s), "F")));
    script.push((1, tcp(SERVER, 80, CLIENT, sp, seq_s, Some(seq_c + 17), "F")));

    script
}

/// Final state of every connection: (original tuple, TCP state, status bits without
/// the offload bits, per-direction packets and bytes), sorted.
#[allow(clippy::type_complexity)]
fn final_states(
    ct: &ctoffload_fallback_sw::conntrack::Conntrack,
    now: u64,
) -> Vec<(Tuple, Option<TcpState>, u16, [(u64, u64); 2])> {
    let mut v: Vec<_> = ct
        .table()
        .iter(now)
        .map(|(_, c)| {
            let tcp_state = match c.proto {
                L4State::Tcp(t) => Some(t.state()),
                _ => None,
            };
            let status = c.status
                - (ctoffload_fallback_sw::table::Status::OFFLOAD
                    | ctoffload_fallback_sw::table::Status::HW_OFFLOAD);
            (
                c.tuples[0],
                tcp_state,
                status.bits(),
                [
                    (c.counters[0].packets, c.counters[0].bytes),
                    (c.counters[1].packets, c.counters[1].bytes),
                ],
            )
        })
        .collect();
    v.sort_by_key(|e| e.0);
    v
}

/// The software backend (the replay tool's pipeline, `ctoffload replay`) and the
/// simulated NIC with offload give the same frames out of the same ports, in the same
/// order, byte for byte, and the same final connection states and counters.
#[test]
fn replay_backend_and_simulated_nic_are_equivalent() {
    let script = equivalence_script();
    // Software only: the replay pipeline (a two-port bridge with conntrack).
    let mut rp =
        ctoffload_agent::replay::Replayer::new(&ctoffload_agent::replay::ReplayOptions::default());
    rp.add_port("p0");
    rp.add_port("p1");
    let ts = S;
    let mut sw_out = Vec::new();
    for (port, f) in &script {
        let o = rp.packet(*port, ts, f);
        if let Some(e) = o.egress {
            sw_out.push((e, f.clone()));
        }
    }
    // Hardware: the worker over nic-sim, offloading what the policy allows.
    let mut r = rig();
    let mut hw_out = Vec::new();
    for (port, f) in &script {
        let out = 1 - port;
        let got = r.send_expect(*port, f, out, 1);
        assert_eq!(got.len(), 1);
        hw_out.extend(got.into_iter().map(|g| (out, g)));
    }
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    r.settle();
    assert!(r.w.stats().hw_packets > 0, "the device carried part of it");
    assert_eq!(sw_out.len(), script.len());
    assert_eq!(sw_out, hw_out);
    let sw = final_states(rp.conntrack(), ts);
    let hw = final_states(r.w.conntrack(), now);
    assert_eq!(sw.len(), 3);
    assert_eq!(sw, hw);
}

/// Every connection not in hardware says why: protocol, policy (minimum packets), and
/// the per-protocol switch.
#[test]
fn not_offloaded_reasons_are_visible() {
    let mut r = rig_with(
        SimConfig::small(),
        WorkerConfig {
            policy: OffloadPolicy {
                min_packets: 4,
                tcp: false,
                ..OffloadPolicy::default()
            },
            ..WorkerConfig::default()
        },
    );
    // ICMP echo: tracked, forwarded by software, never offloaded.
    let mut ping = Vec::new();
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(CLIENT, SERVER, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut ping, &PAYLOAD)
        .expect("build");
    r.send_expect(0, &ping, 1, 1);
    let icmp = Tuple {
        src_l4: 7,
        dst_l4: 0x0800,
        ..tuple(CLIENT, 0, SERVER, 0, proto::ICMP)
    };
    let h = r.handle(&icmp);
    assert_eq!(
        r.state(h),
        (HwState::None, Some(NotOffloaded::Protocol { proto: 1 }))
    );
    // UDP: replied, but below the minimum until the fourth packet.
    r.send_expect(0, &udp(CLIENT, 12_000, SERVER, 53), 1, 1);
    r.send_expect(1, &udp(SERVER, 53, CLIENT, 12_000), 0, 1);
    let u = r.handle(&tuple(CLIENT, 12_000, SERVER, 53, proto::UDP));
    assert_eq!(
        r.state(u),
        (
            HwState::None,
            Some(NotOffloaded::Policy(
                ctoffload_agent::dataplane::Wait::TooFewPackets { seen: 2, need: 4 }
            ))
        )
    );
    r.send_expect(0, &udp(CLIENT, 12_000, SERVER, 53), 1, 1);
    r.send_expect(1, &udp(SERVER, 53, CLIENT, 12_000), 0, 1);
    assert_eq!(r.state(u), (HwState::Offloaded, None));
    // TCP switched off.
    r.send_expect(0, &tcp(CLIENT, 12_001, SERVER, 80, 100, None, "S"), 1, 1);
    r.send_expect(
        1,
        &tcp(SERVER, 80, CLIENT, 12_001, 500, Some(101), "S"),
        0,
        1,
    );
    r.send_expect(
        0,
        &tcp(CLIENT, 12_001, SERVER, 80, 101, Some(501), ""),
        1,
        1,
    );
    let t = r.handle(&tuple(CLIENT, 12_001, SERVER, 80, proto::TCP));
    assert_eq!(
        r.state(t),
        (HwState::None, Some(NotOffloaded::Disabled { proto: 6 }))
    );
}

/// NAT (masquerade on the egress port) through the slow path and then through the
/// device: the hardware rules built from the connection's tuples rewrite exactly as
/// software did (byte-identical frames, checksums included), and the NAT binding is
/// released only after the rules are gone (invariant 2).
#[test]
fn nat_in_hardware_matches_software_and_binding_outlives_the_rules() {
    let mut r = rig_with(
        SimConfig::small(),
        WorkerConfig {
            port_addrs: vec![None, Some(GW)],
            ..WorkerConfig::default()
        },
    );
    masquerade_on_port_1(&mut r.w);
    let req = udp(CLIENT, 13_000, SERVER, 53);
    let sw_req = r.send_expect(0, &req, 1, 1).remove(0);
    assert_eq!(&sw_req[26..30], &GW, "source translated by software");
    let nat_port = u16::from_be_bytes([sw_req[34], sw_req[35]]);
    let reply = udp(SERVER, 53, GW, nat_port);
    let sw_rep = r.send_expect(1, &reply, 0, 1).remove(0);
    assert_eq!(&sw_rep[30..34], &CLIENT, "destination restored by software");
    assert_eq!(&sw_rep[36..38], &13_000u16.to_be_bytes());
    let h = r.handle(&tuple(CLIENT, 13_000, SERVER, 53, proto::UDP));
    assert_eq!(r.state(h), (HwState::Offloaded, None));
    assert_eq!(r.w.conntrack().nat_connections(), 1);
    // The device now does the same, without the worker.
    let rx = r.w.stats().rx;
    r.wire[0].send(&req).expect("inject");
    r.pump_until("hardware SNAT", |r| r.wire[1].pending() >= 1);
    assert_eq!(r.wire[1].recv_vec().expect("frame"), sw_req);
    r.wire[1].send(&reply).expect("inject");
    r.pump_until("hardware DNAT", |r| r.wire[0].pending() >= 1);
    assert_eq!(r.wire[0].recv_vec().expect("frame"), sw_rep);
    assert_eq!(r.w.stats().rx, rx, "both went through the device only");
    // Delete: the binding goes with the connection, after the rules.
    let now = r.now();
    assert!(r.w.delete_connection(h, now));
    assert_eq!(r.w.conntrack().nat_connections(), 1, "rules not gone yet");
    r.pump_until("freed", |r| r.w.hw_state(h).is_none());
    assert_eq!(r.w.conntrack().nat_connections(), 0);
    assert!(r.w.device_mut().dump_table().expect("dump").is_empty());
}

/// The gateway address of port 1 in the NAT scenarios.
const GW: [u8; 4] = [203, 0, 113, 1];

fn masquerade_on_port_1(w: &mut Worker<SimIo>) {
    use ctoffload_fallback_sw::nat::rules::NatRule;
    w.nat_mut()
        .rules_mut()
        .add(NatRule::masquerade_out(1, 1))
        .expect("rule");
}

/// The source port of a frame leaving by the NAT port (IPv4, no options).
fn src_port(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[34], frame[35]])
}

/// Agent restart with the NIC running (device.md section 17.5): agent 1 offloads a
/// source-NATed UDP flow and TCP connection and goes away without a reset, either
/// detaching (an upgrade) or dying with the device still enabled (a crash); agent 2
/// attaches with a new driver instance, reads the table back and restores. The
/// device kept its table and counters, the connections are ESTABLISHED/ASSURED with
/// their NAT tuples, the NAT engine holds their bindings again, and a new connection
/// does not get a restored port.
#[test]
fn agent_restart_attaches_without_reset_and_keeps_flows_and_nat() {
    for crash in [false, true] {
        restart_with_the_nic_running(crash);
    }
}

fn restart_with_the_nic_running(crash: bool) {
    let wcfg = WorkerConfig {
        port_addrs: vec![None, Some(GW)],
        ..WorkerConfig::default()
    };
    let (mut r, spare, iommu, mapped) = rig_with_spare(SimConfig::small(), wcfg.clone());
    masquerade_on_port_1(&mut r.w);
    // A UDP flow and a TCP connection, both source-NATed, both offloaded.
    let req = udp(CLIENT, 14_000, SERVER, 53);
    let uport = src_port(&r.send_expect(0, &req, 1, 1).remove(0));
    r.send_expect(1, &udp(SERVER, 53, GW, uport), 0, 1);
    let syn = tcp(CLIENT, 14_001, SERVER, 80, 100, None, "S");
    let tport = src_port(&r.send_expect(0, &syn, 1, 1).remove(0));
    r.send_expect(1, &tcp(SERVER, 80, GW, tport, 500, Some(101), "S"), 0, 1);
    r.send_expect(
        0,
        &tcp(CLIENT, 14_001, SERVER, 80, 101, Some(501), ""),
        1,
        1,
    );
    let ut = tuple(CLIENT, 14_000, SERVER, 53, proto::UDP);
    let tt = tuple(CLIENT, 14_001, SERVER, 80, proto::TCP);
    let (hu, ht) = (r.handle(&ut), r.handle(&tt));
    assert_eq!(r.state(hu), (HwState::Offloaded, None));
    assert_eq!(r.state(ht), (HwState::Offloaded, None));
    r.hw_burst(0, &req, 3);
    let tuples_before = [hu, ht].map(|h| r.conn(h).expect("live").tuples);
    let nat = r.w.conntrack().nat();
    let (by_source, busy) = (nat.by_source().len(), nat.busy_ports().len());
    assert_eq!(
        (by_source, busy),
        (2, 2),
        "one binding per source and endpoint"
    );
    let resets =
        r.w.device_mut()
            .read_register(regs::RESET_COUNT)
            .expect("reg");

    // Agent 1 goes away without resetting the device.
    let Rig {
        w,
        sim,
        faults,
        mut wire,
        clock,
    } = r;
    let dev = w.into_device();
    let unmap = || {
        for (iova, len) in mapped.lock().expect("log").drain(..) {
            iommu.unmap(iova, len).expect("unmap");
        }
    };
    let mut hw_packets = 3;
    let dev = if crash {
        // Dies: the device is still enabled, its rings in the dead agent's memory,
        // which goes away with the process (its mappings with it).
        drop(dev);
        unmap();
        Device::attach(spare, device_config(&clock)).expect("attach")
    } else {
        drop(dev.detach().expect("detach"));
        unmap();
        // No agent at all: the table keeps forwarding and counting.
        wire[0].send(&req).expect("inject");
        let t0 = Instant::now();
        while wire[1].pending() < 1 {
            assert!(t0.elapsed() < WAIT, "forwarding while detached");
            std::thread::sleep(Duration::from_micros(50));
        }
        wire[1].drain_vecs();
        hw_packets += 1;
        Device::attach(spare, device_config(&clock)).expect("attach")
    };
    assert_eq!(
        dev.read_register(regs::RESET_COUNT).expect("reg"),
        resets,
        "attached without a reset"
    );
    let now = clock.load(Ordering::Acquire);
    let mut w = Worker::new(wcfg, dev);
    masquerade_on_port_1(&mut w);
    let report = w.restore(now).expect("restore");
    assert_eq!((report.entries, report.adopted, report.deleted), (4, 2, 0));
    let mut r = Rig {
        w,
        sim,
        faults,
        wire,
        clock,
    };
    r.settle();
    let (hu, ht) = (r.handle(&ut), r.handle(&tt));
    for (h, tuples) in [(hu, tuples_before[0]), (ht, tuples_before[1])] {
        assert_eq!(r.state(h), (HwState::Offloaded, None));
        let c = r.w.conntrack().table().get(h.slot).expect("restored");
        assert_eq!(c.tuples, tuples, "same NAT tuples");
        use ctoffload_fallback_sw::table::Status;
        assert!(c.status.contains(Status::ASSURED | Status::SRC_NAT));
    }
    let c = r.w.conntrack().table().get(ht.slot).expect("tcp");
    let L4State::Tcp(t) = c.proto else {
        panic!("tcp")
    };
    assert_eq!(t.state(), TcpState::Established);
    let nat = r.w.conntrack().nat();
    assert_eq!(
        (nat.by_source().len(), nat.busy_ports().len()),
        (by_source, busy),
        "bindings registered again"
    );
    // The device's counters kept running: everything since the original insert.
    r.hw_burst(0, &req, 2);
    hw_packets += 2;
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    assert_eq!(r.counters(hu)[0], (hw_packets, hw_packets * UDP_L3));
    // New connections towards the same server never get a restored port: from the
    // same inside host, and from another host whose own port is a restored one.
    let fresh = src_port(
        &r.send_expect(0, &udp(CLIENT, 14_002, SERVER, 53), 1, 1)
            .remove(0),
    );
    assert!(fresh != uport && fresh != tport);
    let other = [192, 168, 1, 11];
    let clash = src_port(
        &r.send_expect(0, &udp(other, uport, SERVER, 53), 1, 1)
            .remove(0),
    );
    assert_ne!(clash, uport, "a restored port is held");
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}

/// Invariant 3 with lazy folding: the reconciler's ticks keep the hardware counts in
/// the slot table without touching the connection, yet a connection's counters read
/// at any time (the API's view) equal what was sent; a full sweep folds them into
/// conntrack once, and the delete's completion brings the rest.
#[test]
fn invariant3_counters_read_mid_flight_equal_sent() {
    let mut r = rig();
    let h = r.udp_flow(4200);
    let fwd = udp(CLIENT, 4200, SERVER, 53);
    let rev = udp(SERVER, 53, CLIENT, 4200);
    let sent = |o: u64, p: u64| [(o, o * UDP_L3), (p, p * UDP_L3)];
    r.hw_burst(0, &fwd, 6);
    r.hw_burst(1, &rev, 4);
    r.reconcile_pass();
    assert_eq!(r.read_counters(h), sent(7, 5));
    assert_eq!(pairs(r.w.hw_counters(h)), sent(6, 4));
    assert_eq!(r.counters(h), sent(1, 1), "not folded by the ticks");
    assert_eq!(r.w.stats().hw_packets, 10, "counted when pulled");
    r.hw_burst(0, &fwd, 3);
    r.reconcile_pass();
    assert_eq!(r.read_counters(h), sent(10, 5));
    // A full sweep folds into conntrack, once; the read view does not change.
    let now = r.now();
    r.w.reconcile_full_sweep(now);
    assert_eq!(r.counters(h), sent(10, 5));
    assert_eq!(r.read_counters(h), sent(10, 5));
    r.w.reconcile_full_sweep(now);
    r.reconcile_pass();
    assert_eq!(r.counters(h), sent(10, 5));
    assert_eq!(r.read_counters(h), sent(10, 5));
    // Pulled and unfolded, then more not pulled at all: the idle removal's delete
    // completions bring both into conntrack.
    r.hw_burst(1, &rev, 2);
    r.reconcile_pass();
    r.hw_burst(1, &rev, 1);
    assert_eq!(
        r.read_counters(h),
        sent(10, 7),
        "the last packet is not pulled yet"
    );
    r.advance(31 * S);
    r.reconcile_pass();
    r.pump_until("idle removal", |r| r.state(h).0 == HwState::None);
    assert_eq!(r.counters(h), sent(10, 8));
    assert_eq!(r.read_counters(h), sent(10, 8));
    assert_eq!(pairs(r.w.hw_counters(h)), sent(9, 7));
    assert_eq!(r.w.stats().hw_packets, 16);
}

/// Invariant 3 across a device fault: counts pulled but not folded are folded into
/// conntrack before the slot table is reset.
#[test]
fn invariant3_unfolded_counts_survive_a_fault() {
    let mut r = rig();
    let h = r.udp_flow(4300);
    r.hw_burst(0, &udp(CLIENT, 4300, SERVER, 53), 5);
    r.reconcile_pass();
    assert_eq!(r.counters(h)[0], (1, UDP_L3), "not folded by the ticks");
    let faults = r.w.stats().faults;
    r.faults.fatal(FatalCode::Parity, FatalUnit::None);
    r.faults_applied();
    r.pump_until("fault detected", |r| {
        let now = r.now();
        r.w.reconcile(now);
        r.w.stats().faults > faults
    });
    r.faults.clear();
    r.faults_applied();
    assert_eq!(r.state(h), (HwState::None, Some(NotOffloaded::DeviceDown)));
    assert_eq!(r.counters(h)[0], (6, 6 * UDP_L3));
    assert_eq!(r.read_counters(h)[0], (6, 6 * UDP_L3));
}

/// Invariant 1 past the held conntrack timeout: an offloaded connection's timeout is
/// held a day ahead, and the reconciler's keep-alive schedule extends it while the
/// connection stays in hardware (no idle check and no counter move does it here: the
/// idle timeouts are longer than the test).
#[test]
fn invariant1_offloaded_connection_outlives_the_held_timeout() {
    let mut r = rig_with(
        SimConfig::small(),
        WorkerConfig {
            policy: OffloadPolicy {
                tcp_idle_ns: 4 * DAY,
                udp_idle_ns: 4 * DAY,
                ..OffloadPolicy::default()
            },
            ..WorkerConfig::default()
        },
    );
    let h = r.udp_flow(2100);
    // 26 hours in 3-minute steps (under the keep-alive's lead on the timeout), one
    // reconcile tick (keep-alive, then GC) each.
    for _ in 0..(26 * 20) {
        r.advance(180 * S);
        let now = r.now();
        r.w.reconcile(now);
        r.settle();
        assert_eq!(r.state(h).0, HwState::Offloaded);
        let conn = r.conn(h);
        assert!(
            conn.is_some_and(|c| c.remaining(now) > 0),
            "held while offloaded"
        );
    }
    assert_eq!(r.w.stats().freed_while_in_hw, 0);
}
