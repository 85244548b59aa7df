//! Data-plane benchmark: the agent's worker over the driver over nic-sim (simulator on
//! its own thread, monotonic clock, MemPort ports).
//!
//! 1. TCP connections through the slow path, offload and teardown, in waves: SYN,
//!    SYN-ACK, final ACK (the connection offloads), FIN (punted by the rule, the flow
//!    leaves hardware). Reports time to offload (final ACK injected → both rules
//!    installed and their completions applied) and connections per second.
//! 2. CPU time of one reconcile pass (a full counter sweep) and of one incremental tick
//!    with `FLOWS` offloaded UDP connections (two device entries each), measured on the
//!    agent thread (`CLOCK_THREAD_CPUTIME_ID`); also one pass run the way the
//!    agent runs it, as reconcile ticks (each collects the chunk the previous one
//!    started), the device's DMA between ticks not counted as the agent's CPU. Both
//!    with no counter moved and with every connection's counters moved (one packet per
//!    connection through the device before the pass); the full sweep also folds every
//!    connection's hardware counts into conntrack, the ticks leave them unfolded
//!    (lazy folding, see the agent's reconciler). The ticks pull `CHANGED` counter
//!    dumps where the device has them (only the records of moved slots, device.md
//!    6.2); the full sweep pulls every record.
//!
//! `cargo run --release -p ctoffload-agent --bin dataplane_bench [-- CONNS FLOWS]`
//! (defaults 20000 and 1000000). Prints a table, then one JSON line.
//!
//! `DATAPLANE_BENCH_TICKS_ONLY=N`: only the reconcile passes as ticks, `N` of each
//! (every flow moved, none moved), no TCP phase, no full sweep: for profiling the
//! ticks (`perf record`) and for quick comparisons; the skipped rows print as 0.
#![forbid(unsafe_code)]

use std::error::Error;
use std::time::{Duration, Instant};

use ctoffload_agent::dataplane::{HwState, OffloadPolicy, Worker, WorkerConfig};
use ctoffload_driver::device::{Clock, Device, DeviceConfig};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_fallback_sw::conntrack::Config;
use ctoffload_fallback_sw::tuple::{Tuple, proto};
use ctoffload_nic_sim::port::{MemPort, PortBackend};
use ctoffload_nic_sim::{SimClock, SimConfig, SimThread, Simulator};
use etherparse::PacketBuilder;

const WAVE: usize = 1024;
const SERVER: [u8; 4] = [198, 51, 100, 7];

struct Rig {
    w: Worker<SimIo>,
    wire: Vec<MemPort>,
    clock: Clock,
    _sim: SimThread,
}

fn rig(buckets_log2: u8, max_conns: usize) -> Result<Rig, Box<dyn Error>> {
    let mut sim = Simulator::new(SimConfig {
        buckets_log2,
        flow_limit: (1u32 << buckets_log2) * 8,
        rx_ring_max_log2: 12,
        ..SimConfig::default()
    })?;
    let mut wire = Vec::new();
    for p in 0..2u8 {
        let (dev_end, host_end) = MemPort::pair(4 * WAVE);
        sim.attach_port(p, Box::new(dev_end))?;
        wire.push(host_end);
    }
    let iommu = sim.iommu();
    let io = SimIo::new(
        sim.bar_fd(),
        Box::new(move |iova, fd, off, len| {
            iommu.map(iova, fd, off, len).map_err(|e| e.to_string())
        }),
        sim.irq_fds()?,
    )?;
    let sim = sim.spawn(SimClock::Monotonic);
    let clock = Clock::monotonic();
    let dev = Device::new(io, DeviceConfig::for_simulator(clock.clone()))?;
    let hour = 3_600_000_000_000;
    let cfg = WorkerConfig {
        conntrack: Config {
            max_connections: max_conns,
            ..Config::default()
        },
        policy: OffloadPolicy {
            tcp_idle_ns: hour,
            udp_idle_ns: hour,
            ..OffloadPolicy::default()
        },
        rx_batch: 256,
        cmd_batch: 256,
        ..WorkerConfig::default()
    };
    Ok(Rig {
        w: Worker::new(cfg, dev),
        wire,
        clock,
        _sim: sim,
    })
}

fn client(i: usize) -> ([u8; 4], u16) {
    let b = u32::try_from(i).unwrap_or(0).to_be_bytes();
    ([10, b[1], b[2], b[3]], 1024 + u16::from(b[3]))
}

fn tcp(
    src: [u8; 4],
    sp: u16,
    dst: [u8; 4],
    dp: u16,
    seq: u32,
    ack: Option<u32>,
    f: &str,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 65535);
    if f.contains('S') {
        b = b.syn();
    }
    if f.contains('F') {
        b = b.fin();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let mut v = Vec::new();
    let _ = b.write(&mut v, &[0u8; 6]);
    v
}

fn udp(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, &[0u8; 18]);
    v
}

fn tuple(src: [u8; 4], sp: u16, dp: u16, p: u8) -> Tuple {
    Tuple::v4(src, sp, SERVER, dp, p)
}

impl Rig {
    fn now(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Injects frames on `port` and polls until `n` frames came out of the other port.
    fn wave(&mut self, port: usize, frames: &[Vec<u8>]) -> Result<(), Box<dyn Error>> {
        for f in frames {
            self.wire[port].send(f)?;
        }
        let out = 1 - port;
        let mut got = 0;
        let t0 = Instant::now();
        while got < frames.len() {
            let now = self.now();
            self.w.poll(now);
            while self.wire[out].recv_vec().is_some() {
                got += 1;
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "wave stuck: {got}/{} frames; {:?}",
                    frames.len(),
                    self.w.stats()
                )
                .into());
            }
        }
        self.settle()
    }

    fn settle(&mut self) -> Result<(), Box<dyn Error>> {
        let t0 = Instant::now();
        while self.w.commands_outstanding() > 0 {
            let now = self.now();
            self.w.poll(now);
            if t0.elapsed() > Duration::from_secs(30) {
                return Err("commands stuck".into());
            }
        }
        Ok(())
    }
}

/// CPU time of this thread in ns (`CLOCK_THREAD_CPUTIME_ID`: the kernel brings the
/// running thread's runtime up to date on each read, unlike `/proc/thread-self/schedstat`,
/// which for a running thread moves only at a scheduler tick or switch).
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    u64::try_from(t.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(t.tv_nsec).unwrap_or(0))
}

/// The `permille`-th per-mille value of `v` (sorted in place).
fn pct(v: &mut [f64], permille: usize) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) * permille / 1000).min(v.len() - 1)]
}

fn tcp_phase(conns: usize) -> Result<(f64, f64, f64, u64), Box<dyn Error>> {
    let mut r = rig(16, conns + 1024)?;
    let mut lat_us = Vec::with_capacity(conns);
    let t0 = Instant::now();
    let mut start = 0;
    while start < conns {
        let end = (start + WAVE).min(conns);
        let ids: Vec<usize> = (start..end).collect();
        let syn: Vec<_> = ids
            .iter()
            .map(|&i| {
                let (a, p) = client(i);
                tcp(a, p, SERVER, 80, 100, None, "S")
            })
            .collect();
        let synack: Vec<_> = ids
            .iter()
            .map(|&i| {
                let (a, p) = client(i);
                tcp(SERVER, 80, a, p, 500, Some(101), "S")
            })
            .collect();
        let ack: Vec<_> = ids
            .iter()
            .map(|&i| {
                let (a, p) = client(i);
                tcp(a, p, SERVER, 80, 101, Some(501), "")
            })
            .collect();
        let fin: Vec<_> = ids
            .iter()
            .map(|&i| {
                let (a, p) = client(i);
                tcp(a, p, SERVER, 80, 107, Some(501), "F")
            })
            .collect();
        r.wave(0, &syn)?;
        r.wave(1, &synack)?;
        // Final ACK → offloaded: per-connection latency until its state is Offloaded.
        let now = r.now();
        let handles: Vec<_> = ids
            .iter()
            .filter_map(|&i| {
                let (a, p) = client(i);
                r.w.find(&tuple(a, p, 80, proto::TCP), now)
            })
            .collect();
        let sent = Instant::now();
        for f in &ack {
            r.wire[0].send(f)?;
        }
        let mut live = vec![false; handles.len()];
        let mut seen_offloaded = r.w.stats().offloaded;
        let mut left = handles.len();
        let mut out = 0;
        while left > 0 || out < ack.len() {
            if sent.elapsed() > Duration::from_secs(30) {
                return Err(format!("offload stuck: {left} left").into());
            }
            let now = r.now();
            r.w.poll(now);
            while r.wire[1].recv_vec().is_some() {
                out += 1;
            }
            let offl = r.w.stats().offloaded;
            if offl == seen_offloaded {
                continue;
            }
            seen_offloaded = offl;
            for (k, h) in handles.iter().enumerate() {
                if !live[k] && r.w.hw_state(*h).map(|s| s.0) == Some(HwState::Offloaded) {
                    live[k] = true;
                    left -= 1;
                    lat_us.push(sent.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        r.wave(0, &fin)?;
        start = end;
    }
    let secs = t0.elapsed().as_secs_f64();
    let offloaded = r.w.stats().offloaded;
    let p50 = pct(&mut lat_us, 500);
    let p99 = pct(&mut lat_us, 990);
    Ok((
        f64::from(u32::try_from(conns).unwrap_or(0)) / secs,
        p50,
        p99,
        offloaded,
    ))
}

/// One connection at a time: final ACK injected → its rules installed and their
/// completions applied (no queueing behind other connections).
fn single_offload_latency(n: usize) -> Result<Vec<f64>, Box<dyn Error>> {
    let mut r = rig(12, n + 1024)?;
    let mut lat_us = Vec::with_capacity(n);
    for i in 0..n {
        let (a, p) = client(i);
        r.wave(0, &[tcp(a, p, SERVER, 80, 100, None, "S")])?;
        r.wave(1, &[tcp(SERVER, 80, a, p, 500, Some(101), "S")])?;
        let now = r.now();
        let h =
            r.w.find(&tuple(a, p, 80, proto::TCP), now)
                .ok_or("connection missing")?;
        let ack = tcp(a, p, SERVER, 80, 101, Some(501), "");
        let sent = Instant::now();
        r.wire[0].send(&ack)?;
        loop {
            let now = r.now();
            r.w.poll(now);
            match r.w.hw_state(h) {
                Some((HwState::Offloaded, _)) => {
                    lat_us.push(sent.elapsed().as_secs_f64() * 1e6);
                    break;
                }
                // A bucket collision keeps it in software: not a sample.
                Some((HwState::None, Some(reason))) if reason.is_retryable_failure() => break,
                _ => {}
            }
            if sent.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "single offload stuck at {i}: {:?} {:?}",
                    r.w.hw_state(h),
                    r.w.stats()
                )
                .into());
            }
        }
        while r.wire[1].recv_vec().is_none() {
            let now = r.now();
            r.w.poll(now);
            if sent.elapsed() > Duration::from_secs(30) {
                return Err("final ACK not forwarded".into());
            }
        }
    }
    Ok(lat_us)
}

struct Reconcile {
    offloaded: usize,
    build_s: f64,
    full_cpu_ms: Vec<f64>,
    full_wall_ms: Vec<f64>,
    tick_cpu_ms: Vec<f64>,
    dump_cpu_ms: Vec<f64>,
    active_cpu_ms: Vec<f64>,
    ticks_cpu_ms: Vec<f64>,
    ticks_active_cpu_ms: Vec<f64>,
    /// Counter records and hardware packets one moved pass as ticks pulled.
    ticks_active_pulled: (u64, u64),
    ticks_per_pass: u32,
    slots: u32,
    /// The ticks pull changed-only (`CHANGED`) counter dumps.
    changed_dumps: bool,
}

/// One reconcile pass as the agent runs it: ticks until every chunk of the table was
/// started and collected. Returns the agent-thread CPU of the ticks alone; between
/// ticks the device writes the next chunk (the worker is polled to reap it, unmeasured).
fn pass_as_ticks(r: &mut Rig, ticks: u32) -> Result<f64, Box<dyn Error>> {
    let mut cpu = 0;
    for _ in 0..ticks {
        let now = r.now();
        let c0 = thread_cpu_ns();
        r.w.reconcile(now);
        cpu += thread_cpu_ns().saturating_sub(c0);
        let t = Instant::now();
        while r.w.commands_outstanding() > 0 {
            std::thread::sleep(Duration::from_micros(20));
            let now = r.now();
            r.w.poll(now);
            if t.elapsed() > Duration::from_secs(30) {
                return Err("counter dump stuck".into());
            }
        }
    }
    Ok(cpu as f64 / 1e6)
}

/// `DATAPLANE_BENCH_TICKS_ONLY`: the number of tick passes of each kind, when only
/// they run.
fn ticks_only() -> Option<usize> {
    std::env::var("DATAPLANE_BENCH_TICKS_ONLY")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
}

fn reconcile_phase(flows: usize) -> Result<Reconcile, Box<dyn Error>> {
    // Two entries per connection; 8-way buckets at ≤ 50 % load.
    let need = (flows * 4).max(1 << 12);
    let log2 = u8::try_from(need.next_power_of_two().trailing_zeros().saturating_sub(3))
        .unwrap_or(20)
        .min(20);
    let mut r = rig(log2, flows + 1024)?;
    let t0 = Instant::now();
    let mut start = 0;
    while start < flows {
        let end = (start + WAVE).min(flows);
        let req: Vec<_> = (start..end)
            .map(|i| {
                let (a, p) = client(i);
                udp(a, p, SERVER, 53)
            })
            .collect();
        let rep: Vec<_> = (start..end)
            .map(|i| {
                let (a, p) = client(i);
                udp(SERVER, 53, a, p)
            })
            .collect();
        r.wave(0, &req)?;
        r.wave(1, &rep)?;
        start = end;
    }
    let build_s = t0.elapsed().as_secs_f64();
    let hits: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            let (a, p) = client(i);
            udp(a, p, SERVER, 53)
        })
        .collect();
    let offloaded = r.w.state_counts()[2];
    let mut full_cpu_ms = Vec::new();
    let mut full_wall_ms = Vec::new();
    let mut tick_cpu_ms = Vec::new();
    let mut dump_cpu_ms = Vec::new();
    let slots = r.w.device_mut().capabilities().flow_capacity;
    let changed_dumps = r.w.device_mut().supports_changed_counter_dump();
    let mut samples = Vec::with_capacity(usize::try_from(slots).unwrap_or(0));
    let per_tick = r.w.config().counter_slots_per_tick.max(1);
    // The first tick only starts a dump: one more than the chunks.
    let ticks_per_pass = slots.div_ceil(per_tick) + 1;
    // Every flow active: one packet each through the device before each pass.
    let mut active_cpu_ms = Vec::new();
    let mut ticks_active_cpu_ms = Vec::new();
    let mut ticks_active_pulled = (0, 0);
    let only = ticks_only();
    // A first pass so that every slot has a baseline before the measured ones.
    if only.is_some() {
        r.w.pull_all_counters(r.now());
    }
    for _ in 0..only.unwrap_or(3) {
        if only.is_none() {
            forward_once(&mut r, &hits)?;
            let now = r.now();
            let c0 = thread_cpu_ns();
            r.w.reconcile_full_sweep(now);
            active_cpu_ms.push(thread_cpu_ns().saturating_sub(c0) as f64 / 1e6);
        }
        forward_once(&mut r, &hits)?;
        let before = r.w.stats();
        ticks_active_cpu_ms.push(pass_as_ticks(&mut r, ticks_per_pass)?);
        let after = r.w.stats();
        ticks_active_pulled = (
            after.counter_records - before.counter_records,
            after.hw_packets - before.hw_packets,
        );
    }
    let mut ticks_cpu_ms = Vec::new();
    for _ in 0..only.unwrap_or(3) {
        ticks_cpu_ms.push(pass_as_ticks(&mut r, ticks_per_pass)?);
    }
    for _ in 0..if only.is_some() { 0 } else { 5 } {
        samples.clear();
        let c0 = thread_cpu_ns();
        r.w.device_mut().dump_counters(0, slots, &mut samples)?;
        dump_cpu_ms.push(thread_cpu_ns().saturating_sub(c0) as f64 / 1e6);
        let now = r.now();
        let c0 = thread_cpu_ns();
        let w0 = Instant::now();
        r.w.reconcile_full_sweep(now);
        full_wall_ms.push(w0.elapsed().as_secs_f64() * 1e3);
        full_cpu_ms.push(thread_cpu_ns().saturating_sub(c0) as f64 / 1e6);
        let now = r.now();
        let c0 = thread_cpu_ns();
        r.w.reconcile(now);
        tick_cpu_ms.push(thread_cpu_ns().saturating_sub(c0) as f64 / 1e6);
    }
    Ok(Reconcile {
        offloaded,
        build_s,
        full_cpu_ms,
        full_wall_ms,
        tick_cpu_ms,
        dump_cpu_ms,
        active_cpu_ms,
        ticks_cpu_ms,
        ticks_active_cpu_ms,
        ticks_active_pulled,
        ticks_per_pass,
        slots,
        changed_dumps,
    })
}

/// One packet of every flow through the device (forwarded by its rule, counted).
fn forward_once(r: &mut Rig, hits: &[Vec<u8>]) -> Result<(), Box<dyn Error>> {
    for chunk in hits.chunks(WAVE) {
        for f in chunk {
            r.wire[0].send(f)?;
        }
        let mut got = 0;
        let t = Instant::now();
        while got < chunk.len() {
            while r.wire[1].recv_vec().is_some() {
                got += 1;
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("hardware forwarding stuck".into());
            }
        }
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let conns = args.first().copied().unwrap_or(20_000);
    let flows = args.get(1).copied().unwrap_or(1_000_000);

    let mut single = if ticks_only().is_some() {
        Vec::new()
    } else {
        single_offload_latency(300)?
    };
    let n_single = single.len();
    let s50 = pct(&mut single, 500);
    let s99 = pct(&mut single, 990);
    let (cps, p50, p99, offl) = if ticks_only().is_some() {
        (0.0, 0.0, 0.0, 0)
    } else {
        tcp_phase(conns)?
    };
    println!("dataplane bench (worker + driver + nic-sim thread, MemPort, monotonic clock)");
    println!("| measurement | value |");
    println!("| --- | --- |");
    println!(
        "| TCP connections (SYN, SYN-ACK, ACK→offload, FIN→teardown) | {conns} ({offl} offloaded) |"
    );
    println!("| connections/s through slow path + offload + teardown | {cps:.0} |");
    println!(
        "| time to offload, one connection at a time ({}), p50 / p99 | {s50:.1} / {s99:.1} µs |",
        n_single
    );
    println!(
        "| time to offload, final ACK injected → rules live, p50 | {p50:.1} µs (waves of {WAVE}) |"
    );
    println!("| time to offload, p99 | {p99:.1} µs |");

    let mut rc = reconcile_phase(flows)?;
    let fc_min = pct(&mut rc.full_cpu_ms, 0);
    let fc_med = pct(&mut rc.full_cpu_ms, 500);
    let fw_med = pct(&mut rc.full_wall_ms, 500);
    let tk_med = pct(&mut rc.tick_cpu_ms, 500);
    let dump_med = pct(&mut rc.dump_cpu_ms, 500);
    let act_med = pct(&mut rc.active_cpu_ms, 500);
    let ticks_min = pct(&mut rc.ticks_cpu_ms, 0);
    let ticks_med = pct(&mut rc.ticks_cpu_ms, 500);
    let tact_min = pct(&mut rc.ticks_active_cpu_ms, 0);
    let tact_med = pct(&mut rc.ticks_active_cpu_ms, 500);
    let (tact_records, tact_packets) = rc.ticks_active_pulled;
    println!(
        "| offloaded UDP connections for the reconcile pass | {} of {flows} (built in {:.1} s) |",
        rc.offloaded, rc.build_s
    );
    println!(
        "| reconcile full sweep, no counter moved, agent-thread CPU, min / median | {fc_min:.1} / {fc_med:.1} ms |"
    );
    println!("| reconcile full sweep, wall (incl. simulated DMA), median | {fw_med:.1} ms |");
    println!(
        "| reconcile full sweep, every flow's counters moved (folded into conntrack), agent-thread CPU, median | {act_med:.1} ms |"
    );
    println!(
        "| reconcile pass as {} ticks, every flow's counters moved ({tact_records} records, {tact_packets} packets pulled), agent-thread CPU of the ticks, min / median | {tact_min:.1} / {tact_med:.1} ms |",
        rc.ticks_per_pass
    );
    println!(
        "| reconcile pass as {} ticks, no counter moved, agent-thread CPU of the ticks, min / median | {ticks_min:.1} / {ticks_med:.1} ms |",
        rc.ticks_per_pass
    );
    let dump_kind = if rc.changed_dumps { "changed" } else { "full" };
    println!(
        "| reconcile ticks' counter dumps | {dump_kind} ({}) |",
        if rc.changed_dumps {
            "COUNTER_DUMP with CHANGED: records of the slots hit since the last one"
        } else {
            "every slot's record"
        }
    );
    println!("| reconcile tick (8192 slots), agent-thread CPU, median | {tk_med:.2} ms |");
    println!(
        "| the driver's synchronous COUNTER_DUMP of all {} slots into a Vec, CPU, median | {dump_med:.1} ms |",
        rc.slots
    );
    println!(
        "{{\"bench\":\"dataplane\",\"conns\":{conns},\"conns_per_s\":{cps:.0},\"single_offload_p50_us\":{s50:.1},\"single_offload_p99_us\":{s99:.1},\"offload_p50_us\":{p50:.1},\"offload_p99_us\":{p99:.1},\"reconcile_flows\":{},\"reconcile_full_cpu_ms_min\":{fc_min:.2},\"reconcile_full_cpu_ms_median\":{fc_med:.2},\"reconcile_full_wall_ms_median\":{fw_med:.2},\"reconcile_full_active_cpu_ms_median\":{act_med:.2},\"reconcile_tick_cpu_ms_median\":{tk_med:.3},\"reconcile_pass_ticks_cpu_ms_min\":{ticks_min:.2},\"reconcile_pass_ticks_cpu_ms_median\":{ticks_med:.2},\"reconcile_pass_ticks_active_cpu_ms_min\":{tact_min:.2},\"reconcile_pass_ticks_active_cpu_ms_median\":{tact_med:.2},\"reconcile_pass_ticks_active_packets\":{tact_packets},\"driver_dump_cpu_ms_median\":{dump_med:.2},\"reconcile_ticks_dump\":\"{dump_kind}\",\"slots\":{}}}",
        rc.offloaded, rc.slots
    );
    Ok(())
}
