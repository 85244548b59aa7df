//! Software conntrack across cores: established-flow packets per second, and new
//! connections per second, of 1, 2, 4 ... workers running at the same time, each pinned
//! to its own core with its own table.
//!
//! The design runs one conntrack table per worker, and the NIC's flow hash (symmetric,
//! so both directions of a flow reach the same worker) splits the connections between
//! them: without NAT the workers share nothing but the machine's last-level cache and
//! memory. (The agent runs one worker today.) Here worker `k` gets connections
//! `k * n .. (k + 1) * n` (distinct addresses) and runs the `conntrack` bench's
//! workloads on them: `est`, 64-byte UDP frames in both directions of its live
//! connections, each parsed with its IPv4 and UDP checksums verified and looked up, in
//! batches of 32 through `Conntrack::process_batch`, cycling through the connections in
//! a random order; `new`, the first packet of each of its connections into an empty
//! table (made before the repeat starts). All workers start each repeat together (a
//! barrier) and the aggregate rate is every worker's packets over the wall time from
//! the first start to the last finish; the per-worker rate is by that thread's CPU
//! time. Scaling is the aggregate rate over `N` times the one-worker aggregate of the
//! same run.
//!
//! `cargo bench -p ctoffload-fallback-sw --bench scaling`. Environment:
//! `CT_SCALE_PARTS=est,new` (default both), `CT_SCALE_THREADS=1,2,4` (default: powers
//! of two up to the cores this process may run on, and that number),
//! `CT_SCALE_CONNS=n` connections per worker (default 1 000 000), `CT_BENCH_REPEATS=n`
//! (default 5). Without `--bench` (as `cargo test --all-targets` runs it) or with
//! `CT_BENCH_QUICK=1`: a small smoke run. The last line printed is a JSON object with
//! every figure.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Barrier;
use std::time::Instant;

use common::{Clocks, NS, Rng, Summary, conntrack, run, summary, udp_trace_from};

/// The CPUs this process may run on.
fn cores() -> Vec<usize> {
    match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU)
            .filter(|&c| set.is_set(c))
            .collect(),
        Err(_) => (0..std::thread::available_parallelism().map_or(1, usize::from)).collect(),
    }
}

/// Pins the calling thread to `cpu`; a failure is reported, not fatal (the figures
/// then say less).
fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("could not pin a worker to CPU {cpu}: {e}");
    }
}

/// One worker count's figures.
struct Row {
    part: Part,
    workers: usize,
    /// Packets (or new connections)/s of all workers together, by wall clock, over the
    /// repeats.
    aggregate: Summary,
    /// Each worker's packets/s by its CPU time, over every worker and repeat.
    per_worker: Summary,
}

/// One worker's repeat.
struct Run {
    began: Instant,
    ended: Instant,
    packets: usize,
    /// The worker thread's CPU seconds.
    cpu: f64,
}

/// What the workers run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Established traffic on `n` live connections each.
    Established,
    /// `n` new connections each (the originals of the same trace) into an empty table.
    New,
}

impl Part {
    fn name(self) -> &'static str {
        match self {
            Part::Established => "est",
            Part::New => "new",
        }
    }
}

/// The timed part of one repeat, between the two barriers.
fn timed(start: &Barrier, end: &Barrier, work: impl FnOnce() -> usize) -> Run {
    start.wait();
    let began = Instant::now();
    let clocks = Clocks::start();
    let packets = work();
    let (_, cpu) = clocks.elapsed();
    let ended = Instant::now();
    end.wait();
    Run {
        began,
        ended,
        packets,
        cpu,
    }
}

/// Worker `k` of an established run: its connections set up, then `repeats` timed
/// passes over them.
fn established(
    k: usize,
    n: usize,
    repeats: usize,
    min_packets: usize,
    (start, end): (&Barrier, &Barrier),
) -> Vec<Run> {
    let mut rng = Rng(0x5eed ^ (u64::try_from(k).unwrap() << 32));
    let (orig, both) = udp_trace_from(k * n, n, &mut rng);
    drop(orig);
    let frames = both.frames();
    let mut ct = conntrack(n);
    let now = 10 * NS;
    // Establish (not timed): originals create, replies set SEEN_REPLY.
    assert_eq!(run(&mut ct, &frames, now), 2 * n, "all tracked");
    assert_eq!(ct.table().len(), n);
    let passes = min_packets.div_ceil(frames.len()).max(1);
    let runs = (0..repeats)
        .map(|r| {
            let now = now + u64::try_from(r + 1).unwrap() * NS;
            let x = timed(start, end, || {
                (0..passes).map(|_| run(&mut ct, &frames, now)).sum()
            });
            assert_eq!(x.packets, passes * frames.len(), "every packet tracked");
            x
        })
        .collect();
    assert_eq!(ct.table().len(), n, "nothing expired or evicted");
    runs
}

/// Worker `k` of a new-connection run: per repeat a fresh table (made before the
/// start), then its `n` connections' first packets.
fn new_connections(
    k: usize,
    n: usize,
    repeats: usize,
    (start, end): (&Barrier, &Barrier),
) -> Vec<Run> {
    let mut rng = Rng(0x5eed ^ (u64::try_from(k).unwrap() << 32));
    let (orig, _) = udp_trace_from(k * n, n, &mut rng);
    let frames = orig.frames();
    (0..repeats)
        .map(|_| {
            let mut ct = conntrack(n);
            let x = timed(start, end, || run(&mut ct, &frames, 10 * NS));
            assert_eq!(x.packets, n, "every connection created");
            assert_eq!(ct.table().len(), n);
            x
        })
        .collect()
}

/// `workers` workers, each with `n` connections, on `cores[..workers]`.
fn measure(
    part: Part,
    workers: usize,
    n: usize,
    repeats: usize,
    min_packets: usize,
    cores: &[usize],
) -> Row {
    let start = Barrier::new(workers + 1);
    let end = Barrier::new(workers + 1);
    let runs: Vec<Vec<Run>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|k| {
                let (barriers, cpu) = ((&start, &end), cores[k]);
                s.spawn(move || {
                    pin(cpu);
                    match part {
                        Part::Established => established(k, n, repeats, min_packets, barriers),
                        Part::New => new_connections(k, n, repeats, barriers),
                    }
                })
            })
            .collect();
        for _ in 0..repeats {
            start.wait();
            end.wait();
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // Per repeat: every worker's packets over the time from the first start to the
    // last finish.
    let aggregate: Vec<f64> = (0..repeats)
        .map(|r| {
            let runs = runs.iter().map(|w| &w[r]);
            let began = runs.clone().map(|x| x.began).min().unwrap();
            let ended = runs.clone().map(|x| x.ended).max().unwrap();
            let packets: usize = runs.map(|x| x.packets).sum();
            packets as f64 / (ended - began).as_secs_f64()
        })
        .collect();
    let per_worker = runs
        .iter()
        .flatten()
        .map(|x| x.packets as f64 / x.cpu)
        .collect();
    Row {
        part,
        workers,
        aggregate: summary(aggregate),
        per_worker: summary(per_worker),
    }
}

fn main() {
    let quick = std::env::var_os("CT_BENCH_QUICK").is_some_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let env_num = |name: &str| -> Option<usize> {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| v > 0)
    };
    let (n, repeats, min_packets) = if quick {
        (10_000, 1, 20_000)
    } else {
        (1_000_000, 5, 4_000_000)
    };
    let n = env_num("CT_SCALE_CONNS").unwrap_or(n);
    let repeats = env_num("CT_BENCH_REPEATS").unwrap_or(repeats);
    let cores = cores();
    let counts: Vec<usize> = match std::env::var("CT_SCALE_THREADS") {
        Ok(v) => v
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .filter(|&w| w > 0)
            .collect(),
        Err(_) => {
            let mut c: Vec<usize> = (0..)
                .map(|i| 1 << i)
                .take_while(|&w| w <= cores.len())
                .collect();
            if c.last() != Some(&cores.len()) {
                c.push(cores.len());
            }
            c
        }
    };
    // `CT_SCALE_PARTS=est,new`: which workloads (default both).
    let parts: Vec<Part> = std::env::var("CT_SCALE_PARTS")
        .unwrap_or_else(|_| "est,new".into())
        .split(',')
        .filter_map(|p| match p.trim() {
            "est" => Some(Part::Established),
            "new" => Some(Part::New),
            _ => None,
        })
        .collect();
    let mut rows = Vec::new();
    for &part in &parts {
        for &w in &counts {
            if w > cores.len() {
                eprintln!("{w} workers: only {} cores, skipped", cores.len());
                continue;
            }
            rows.push(measure(part, w, n, repeats, min_packets, &cores));
        }
    }
    // Each row against the one-worker row of its part.
    let scaling = |r: &Row| {
        rows.iter()
            .find(|o| o.part == r.part && o.workers == 1)
            .map_or(0.0, |o| {
                r.aggregate.median / (o.aggregate.median * r.workers as f64)
            })
    };
    println!(
        "conntrack scaling: {n} connections per worker (est: established UDP, 64-byte \
         frames both ways, batches of 32; new: their first packets into an empty table), \
         {repeats} repeats, {} cores available",
        cores.len()
    );
    println!(
        "| part | workers | all, M/s (wall) min | median | per worker, M/s (CPU) min | median | scaling vs 1 worker |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    // Per row: all min, median, per worker min, median (millions a second), scaling.
    let figures = |r: &Row| {
        [
            r.aggregate.min / 1e6,
            r.aggregate.median / 1e6,
            r.per_worker.min / 1e6,
            r.per_worker.median / 1e6,
            scaling(r),
        ]
    };
    for r in &rows {
        let [a0, a1, w0, w1, x] = figures(r);
        println!(
            "| {:>4} | {:>7} | {a0:>8.2} | {a1:>8.2} | {w0:>8.2} | {w1:>8.2} | {x:>6.2} |",
            r.part.name(),
            r.workers,
        );
    }
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            let [a0, a1, w0, w1, x] = figures(r);
            format!(
                "{{\"part\":\"{}\",\"workers\":{},\"mps\":{a1:.3},\"mps_min\":{a0:.3},\"worker_cpu_mps\":{w1:.3},\"worker_cpu_mps_min\":{w0:.3},\"scaling\":{x:.3}}}",
                r.part.name(),
                r.workers,
            )
        })
        .collect();
    println!(
        "{{\"bench\":\"ct_scaling\",\"quick\":{quick},\"conns_per_worker\":{n},\"repeats\":{repeats},\"cores\":{},\"rows\":[{}]}}",
        cores.len(),
        json.join(",")
    );
}
