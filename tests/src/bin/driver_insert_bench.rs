//! Flow-insert rate of the driver against the simulator (running on its own thread,
//! monotonic clock): insert N distinct flows in batches, keeping the command ring full
//! (submit a batch whenever the ring has room for all of it; when it has not, reap
//! everything that has completed, in bulk; never wait for a particular batch: many
//! batches in flight), then delete them (not timed); repeat. Then the same on one
//! thread, polling the model inline (CPU cost). Prints tables and, last, one JSON line.
//!
//! MMIO reads and writes are counted by the driver's backend (`SimIo`: every register
//! access goes through it; the simulator polls a shared-memory BAR and cannot see
//! reads). Doorbells per batch are the MMIO writes made inside `submit` (the CMD `TAIL`
//! doorbell) per submitted batch; the simulator's own count of CMD `TAIL` changes it
//! observed is printed next to it (it polls, so back-to-back doorbells merge: ≤ 1).
//!
//! Environment: `INSERT_BENCH_BATCHES=1,32` picks batch sizes (default 1,8,32,128);
//! `INSERT_BENCH_REPEATS=n` (default 15); `INSERT_BENCH_FLOWS=n` (default 16384);
//! `INSERT_BENCH_RING_LOG2=n` (CMD ring of 2^n entries, default 10);
//! `INSERT_BENCH_REAP_EAGERLY=1` reaps after every batch instead of when the ring is full.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use ctoffload_agent::cli::sim::driver_io;
use ctoffload_driver::device::{CommandResult, Device, DeviceConfig, FlowCommand};
use ctoffload_hw_regs::{FlowAction, FlowId, FlowKey, L4Proto};
use ctoffload_nic_sim::{SimClock, SimConfig, Simulator};

fn key(i: usize) -> FlowKey {
    let b = u32::try_from(i).unwrap_or(0).to_be_bytes();
    FlowKey::ipv4(
        0,
        L4Proto::Udp,
        0,
        [10, b[1], b[2], b[3]].into(),
        4000,
        [192, 0, 2, 1].into(),
        53,
    )
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

#[derive(Default)]
struct Totals {
    writes: u64,
    reads: u64,
    submit_writes: u64,
    sim_doorbells: u64,
    batches: u64,
    inserts: u64,
    failed: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let flows = env_usize("INSERT_BENCH_FLOWS", 16384);
    let ring_log2 = u8::try_from(env_usize("INSERT_BENCH_RING_LOG2", 10)).unwrap_or(10);
    let reap_eagerly = std::env::var_os("INSERT_BENCH_REAP_EAGERLY").is_some();
    let repeats = env_usize("INSERT_BENCH_REPEATS", 15);
    let batches: Vec<usize> = std::env::var("INSERT_BENCH_BATCHES")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<usize>| !v.is_empty() && v.iter().all(|&b| b > 0))
        .unwrap_or_else(|| vec![1, 8, 32, 128]);
    let sim = Simulator::new(SimConfig {
        buckets_log2: 15,
        flow_limit: 1 << 18,
        ..SimConfig::default()
    })?;
    let io = driver_io(&sim, |_, _| ())?;
    let th = sim.spawn(SimClock::Monotonic);
    let mut dev = Device::new(
        io,
        DeviceConfig {
            cmd_ring_log2: ring_log2,
            // The model's thread shares two busy cores with everything else on this
            // machine: give bring-up more than the 100 ms a real device gets (a
            // starved model thread made Device::new time out, before and after this
            // work alike).
            ready_timeout: Duration::from_secs(2),
            enable_timeout: Duration::from_secs(2),
            ..DeviceConfig::default()
        },
    )?;
    let keys: Vec<FlowKey> = (0..flows).map(key).collect();
    let action = FlowAction::forward(1);
    // The commands exist before the clock starts: the caller has them anyway.
    let cmds: Vec<FlowCommand> = keys
        .iter()
        .map(|&k| FlowCommand::Insert { key: k, action })
        .collect();
    let flows_u64 = u64::try_from(flows).unwrap_or(0);
    let mut json = vec![r#""bench":"driver_insert""#.to_string()];
    json.push(format!(r#""flows":{flows},"repeats":{repeats}"#));
    println!(
        "{flows} flows per repeat, {repeats} repeats, driver + nic-sim thread (CMD ring {})",
        1u32 << ring_log2
    );
    println!(
        "batch | inserts/s min | inserts/s median | mmio writes/insert | mmio reads/insert | doorbells/batch | sim-seen doorbells/batch | failed"
    );
    let mut out: Vec<CommandResult> = Vec::with_capacity(flows);
    let mut installed: Vec<(FlowId, FlowKey)> = Vec::with_capacity(flows);
    for &batch in &batches {
        let mut rates = Vec::new();
        let mut t = Totals::default();
        for _ in 0..repeats {
            installed.clear();
            let m0 = dev.mmio_stats();
            let s0 = th.stats();
            let mut submit_writes = 0u64;
            let mut done = 0usize;
            let mut failed = 0u64;
            let mut nb = 0u64;
            let mut stalls = 0u64;
            let t0 = Instant::now();
            let mut at = 0;
            while done < flows {
                // Submit only whole batches: with the ring nearly full, reap first
                // (a batch split over free slots would cost extra doorbells).
                if at < flows && dev.free_slots() >= batch.min(flows - at) {
                    let end = (at + batch).min(flows);
                    let w0 = dev.mmio_stats().writes;
                    let s = dev.submit(&cmds[at..end])?;
                    submit_writes += dev.mmio_stats().writes - w0;
                    if s.accepted() > 0 {
                        nb += 1;
                    }
                    at += s.accepted();
                    if !reap_eagerly {
                        continue;
                    }
                }
                // Reap in bulk: only when the ring has no room for the next batch (or
                // everything is submitted). Polling the completion the model is
                // writing right now, after every batch, makes the model and the driver
                // trade that cache line back and forth.
                out.clear();
                if dev.reap(&mut out)? == 0 {
                    stalls += 1;
                    if stalls % 64 == 0 {
                        // Nothing for a while: the model's thread is behind or not
                        // running (on a loaded machine it may share this core).
                        std::thread::yield_now();
                    } else {
                        for _ in 0..16 {
                            std::hint::spin_loop();
                        }
                    }
                }
                // Results come back in submission order: the i-th is keys[i]'s.
                for r in &out {
                    match r.flow_id {
                        Some(id) if r.is_ok() => installed.push((id, keys[done])),
                        _ => failed += 1,
                    }
                    done += 1;
                }
            }
            let dt = t0.elapsed().as_secs_f64();
            let m1 = dev.mmio_stats();
            // Let the simulator publish the statistics of its last polls.
            std::thread::sleep(Duration::from_millis(2));
            let s1 = th.stats();
            rates.push(flows as f64 / dt);
            t.writes += m1.writes - m0.writes;
            t.reads += m1.reads - m0.reads;
            t.submit_writes += submit_writes;
            t.sim_doorbells += s1.cmd_doorbells - s0.cmd_doorbells;
            t.batches += nb;
            t.inserts += flows_u64;
            t.failed += failed;
            // Delete them all (not timed).
            let dels: Vec<FlowCommand> = installed
                .iter()
                .map(|&(flow_id, key)| FlowCommand::Delete { flow_id, key })
                .collect();
            let res = dev.execute(&dels, Duration::from_secs(10))?;
            assert!(res.iter().all(CommandResult::is_ok), "delete failed");
        }
        rates.sort_by(f64::total_cmp);
        let (min, med) = (rates[0], rates[rates.len() / 2]);
        let f = |a: u64, b: u64| a as f64 / b.max(1) as f64;
        let (wpi, rpi) = (f(t.writes, t.inserts), f(t.reads, t.inserts));
        let (dpb, spb) = (f(t.submit_writes, t.batches), f(t.sim_doorbells, t.batches));
        println!(
            "{batch:5} | {min:13.0} | {med:16.0} | {wpi:18.3} | {rpi:17.3} | {dpb:15.3} | {spb:24.3} | {}",
            t.failed
        );
        json.push(format!(r#""batch_{batch}_inserts_per_s":{med:.0}"#));
        json.push(format!(r#""batch_{batch}_inserts_per_s_min":{min:.0}"#));
        json.push(format!(
            r#""batch_{batch}_mmio_writes_per_insert":{wpi:.3}"#
        ));
        json.push(format!(r#""batch_{batch}_mmio_reads_per_insert":{rpi:.3}"#));
        json.push(format!(r#""batch_{batch}_doorbells_per_batch":{dpb:.3}"#));
        json.push(format!(
            r#""batch_{batch}_sim_seen_doorbells_per_batch":{spb:.3}"#
        ));
        json.push(format!(r#""batch_{batch}_failed":{}"#, t.failed));
        if batch == 32 {
            json.push(format!(r#""batch32_mips":{:.3}"#, med / 1e6));
        }
    }
    // The same work on one thread, the model polled inline after each submit: the CPU
    // cost of an insert (driver + model) without cross-core traffic or scheduling.
    let mut sim = th.stop();
    let t_start = Instant::now();
    let now = || u64::try_from(t_start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    println!("one thread, model polled inline (CPU cost, driver + model):");
    println!(
        "batch | inserts/s min | inserts/s median | inserts/s max | ns/insert (median) | ns/insert (best)"
    );
    for &batch in &batches {
        let mut rates = Vec::new();
        for _ in 0..repeats {
            installed.clear();
            let mut done = 0usize;
            let t0 = Instant::now();
            let mut at = 0;
            while done < flows {
                if at < flows && dev.free_slots() >= batch.min(flows - at) {
                    let end = (at + batch).min(flows);
                    at += dev.submit(&cmds[at..end])?.accepted();
                }
                sim.poll(now());
                out.clear();
                dev.reap(&mut out)?;
                for r in &out {
                    if let (Some(id), true) = (r.flow_id, r.is_ok()) {
                        installed.push((id, keys[done]));
                    }
                    done += 1;
                }
            }
            rates.push(flows as f64 / t0.elapsed().as_secs_f64());
            let dels: Vec<FlowCommand> = installed
                .iter()
                .map(|&(flow_id, key)| FlowCommand::Delete { flow_id, key })
                .collect();
            let (mut at, mut done) = (0, 0);
            while done < dels.len() {
                let end = (at + 256).min(dels.len());
                at += dev.submit(&dels[at..end])?.accepted();
                sim.poll(now());
                out.clear();
                done += dev.reap(&mut out)?;
                assert!(out.iter().all(CommandResult::is_ok), "delete failed");
            }
        }
        rates.sort_by(f64::total_cmp);
        let (min, med, max) = (rates[0], rates[rates.len() / 2], rates[rates.len() - 1]);
        println!(
            "{batch:5} | {min:13.0} | {med:16.0} | {max:13.0} | {:18.0} | {:14.0}",
            1e9 / med,
            1e9 / max
        );
        json.push(format!(r#""inline_batch_{batch}_inserts_per_s":{med:.0}"#));
    }
    println!("{{{}}}", json.join(","));
    Ok(())
}
