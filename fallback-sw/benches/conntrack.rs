//! Software conntrack throughput on one core, from an in-memory trace.
//!
//! The workload of Open vSwitch's userspace conntrack reference measurement: distinct
//! UDP connections, traffic in both directions, 64-byte Ethernet frames that each go
//! through the whole pipeline (parse, IPv4 and UDP checksums verified, tuple built,
//! looked up, state updated), in batches of 32 cycling through the connections. Plus
//! new UDP connections per second, full TCP handshakes (SYN, SYN-ACK, ACK) per second,
//! and table memory per connection.
//!
//! The trace visits the connections in a random order (originals, then replies, each
//! pass a fresh permutation fixed at build time), so table accesses are not sequential.
//!
//! `cargo bench -p ctoffload-fallback-sw --bench conntrack`; `CT_BENCH_QUICK=1` runs a
//! small, single-repeat version (a smoke test). The last line printed is a JSON object
//! with every figure.
#![allow(clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Instant;

use ctoffload_fallback_sw::checksum;
use ctoffload_fallback_sw::conntrack::{Config, Conntrack, Verdict};

const NS: u64 = 1_000_000_000;
const BATCH: usize = 32;
const FRAME: usize = 64;

/// Frames stored back to back, `FRAME` bytes each.
struct Trace {
    bytes: Vec<u8>,
}

impl Trace {
    fn with_capacity(n: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(n * FRAME),
        }
    }
    fn len(&self) -> usize {
        self.bytes.len() / FRAME
    }
    fn frames(&self) -> Vec<&[u8]> {
        self.bytes.chunks_exact(FRAME).collect()
    }
}

/// A small deterministic generator (splitmix64) for the permutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = usize::try_from(self.next() % (i as u64 + 1)).unwrap();
            v.swap(i, j);
        }
    }
}

/// Endpoints of connection `i`: distinct (client address, client port) pairs towards a
/// few servers.
fn endpoints(i: usize) -> ([u8; 4], u16, [u8; 4], u16) {
    let i = u32::try_from(i).unwrap();
    let c = (10u32 << 24) | (i >> 4);
    let sport = 1024 + u16::try_from(i & 0xF).unwrap() * 3001;
    let s = [192, 168, 1, u8::try_from(1 + i % 7).unwrap()];
    (c.to_be_bytes(), sport, s, 5000)
}

fn eth_ipv4(buf: &mut [u8], src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) {
    buf[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    buf[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut buf[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    let total = u16::try_from(20 + l4_len).unwrap();
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[4..6].copy_from_slice(&[0, 1]);
    ip[6..8].copy_from_slice(&[0x40, 0]); // DF
    ip[8] = 64;
    ip[9] = proto;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&src);
    ip[16..20].copy_from_slice(&dst);
    let c = checksum::checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
}

/// A 64-byte UDP frame (22 bytes of payload) with valid IPv4 and UDP checksums.
fn udp_frame(t: &mut Trace, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) {
    let mut f = [0u8; FRAME];
    let l4_len = FRAME - 34;
    eth_ipv4(&mut f, src, dst, 17, l4_len);
    let u = &mut f[34..];
    u[0..2].copy_from_slice(&sport.to_be_bytes());
    u[2..4].copy_from_slice(&dport.to_be_bytes());
    u[4..6].copy_from_slice(&u16::try_from(l4_len).unwrap().to_be_bytes());
    for (k, b) in u[8..].iter_mut().enumerate() {
        *b = u8::try_from(k).unwrap();
    }
    let c = checksum::udp_finish(checksum::l4_checksum_v4(src.into(), dst.into(), 17, u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    t.bytes.extend_from_slice(&f);
}

/// A 64-byte TCP frame (20-byte header, no payload, Ethernet padding) with valid
/// checksums.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    t: &mut Trace,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
) {
    let mut f = [0u8; FRAME];
    eth_ipv4(&mut f, src, dst, 6, 20);
    let h = &mut f[34..54];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&seq.to_be_bytes());
    h[8..12].copy_from_slice(&ack.to_be_bytes());
    h[12] = 5 << 4;
    h[13] = flags;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let c = checksum::l4_checksum_v4(src.into(), dst.into(), 6, h);
    h[16..18].copy_from_slice(&c.to_be_bytes());
    t.bytes.extend_from_slice(&f);
}

/// Both directions of `n` UDP connections: all originals in a random order, then all
/// replies in another.
fn udp_trace(n: usize, rng: &mut Rng) -> (Trace, Trace) {
    let mut order: Vec<usize> = (0..n).collect();
    let mut orig = Trace::with_capacity(n);
    rng.shuffle(&mut order);
    for &i in &order {
        let (c, cp, s, sp) = endpoints(i);
        udp_frame(&mut orig, c, cp, s, sp);
    }
    let mut both = Trace::with_capacity(2 * n);
    both.bytes.extend_from_slice(&orig.bytes);
    rng.shuffle(&mut order);
    for &i in &order {
        let (c, cp, s, sp) = endpoints(i);
        udp_frame(&mut both, s, sp, c, cp);
    }
    (orig, both)
}

/// SYN, SYN-ACK, ACK of `n` TCP connections, each handshake's three frames in a row.
fn tcp_trace(n: usize) -> Trace {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    let mut t = Trace::with_capacity(3 * n);
    for i in 0..n {
        let (c, cp, s, sp) = endpoints(i);
        let (x, y) = (1000u32.wrapping_mul(u32::try_from(i).unwrap()), 77_777u32);
        tcp_frame(&mut t, c, cp, s, sp, x, 0, SYN);
        tcp_frame(&mut t, s, sp, c, cp, y, x.wrapping_add(1), SYN | ACK);
        tcp_frame(
            &mut t,
            c,
            cp,
            s,
            sp,
            x.wrapping_add(1),
            y.wrapping_add(1),
            ACK,
        );
    }
    t
}

fn conntrack(max: usize) -> Conntrack {
    Conntrack::new(Config {
        max_connections: max,
        ..Config::default()
    })
}

/// Runs `frames` through `ct` in batches of 32; returns how many were tracked.
fn run(ct: &mut Conntrack, frames: &[&[u8]], now: u64) -> usize {
    let mut out =
        [Verdict::Untracked(ctoffload_fallback_sw::conntrack::Untracked::Fragment); BATCH];
    let mut tracked = 0;
    for chunk in frames.chunks(BATCH) {
        let out = &mut out[..chunk.len()];
        ct.process_batch(chunk, 0, now, out);
        tracked += out
            .iter()
            .filter(|v| matches!(v, Verdict::Tracked { .. }))
            .count();
    }
    black_box(tracked)
}

#[derive(Clone, Copy)]
struct Summary {
    min: f64,
    median: f64,
    max: f64,
}

fn summary(mut v: Vec<f64>) -> Summary {
    v.sort_by(f64::total_cmp);
    Summary {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

/// Established-flow packets per second with `n` live connections.
fn established(n: usize, repeats: usize, min_packets: usize, rng: &mut Rng) -> Summary {
    let (orig, both) = udp_trace(n, rng);
    let mut ct = conntrack(n);
    let now = 10 * NS;
    // Establish (not timed): originals create, replies set SEEN_REPLY.
    assert_eq!(run(&mut ct, &both.frames(), now), 2 * n, "all tracked");
    assert_eq!(ct.table().len(), n);
    drop(orig);
    let frames = both.frames();
    let passes = min_packets.div_ceil(frames.len()).max(1);
    let mut rates = Vec::new();
    for r in 0..repeats {
        let now = now + u64::try_from(r + 1).unwrap() * NS;
        let t0 = Instant::now();
        let mut tracked = 0;
        for _ in 0..passes {
            tracked += run(&mut ct, &frames, now);
        }
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(tracked, passes * frames.len(), "every packet tracked");
        rates.push((passes * frames.len()) as f64 / dt);
    }
    assert_eq!(ct.table().len(), n, "nothing expired or evicted");
    summary(rates)
}

/// New UDP connections per second: `n` fresh flows into an empty table sized for them.
fn new_udp(n: usize, repeats: usize, rng: &mut Rng) -> (Summary, f64) {
    let (orig, _) = udp_trace(n, rng);
    let frames = orig.frames();
    let mut rates = Vec::new();
    let mut bytes = 0.0;
    for _ in 0..repeats {
        let mut ct = conntrack(n);
        let t0 = Instant::now();
        let tracked = run(&mut ct, &frames, 10 * NS);
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(tracked, n);
        assert_eq!(ct.table().len(), n);
        rates.push(n as f64 / dt);
        bytes = ct.table().bytes_per_connection() as f64;
    }
    (summary(rates), bytes)
}

/// Full TCP handshakes per second (SYN, SYN-ACK, ACK each a frame through conntrack).
fn tcp_handshakes(n: usize, repeats: usize) -> Summary {
    let trace = tcp_trace(n);
    let frames = trace.frames();
    assert_eq!(trace.len(), 3 * n);
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let mut ct = conntrack(n);
        let t0 = Instant::now();
        let tracked = run(&mut ct, &frames, 10 * NS);
        let dt = t0.elapsed().as_secs_f64();
        assert_eq!(tracked, 3 * n, "every handshake frame tracked");
        assert_eq!(ct.table().len(), n);
        rates.push(n as f64 / dt);
    }
    summary(rates)
}

fn row(name: &str, unit: &str, s: Summary, ovs: &str, goal: &str) {
    println!(
        "| {name:<36} | {:>8.2} | {:>8.2} | {:>8.2} | {unit:<6} | {ovs:>12} | {goal:>8} |",
        s.min, s.median, s.max
    );
}

fn main() {
    let quick = std::env::var_os("CT_BENCH_QUICK").is_some_and(|v| v != "0");
    let (sizes, big, repeats, min_packets) = if quick {
        ([1_000, 10_000, 20_000], 20_000, 1, 10_000)
    } else {
        ([1_000, 100_000, 1_000_000], 1_000_000, 5, 4_000_000)
    };
    // `CT_BENCH_ONLY=est|new|tcp` runs one part (for profiling); the others print 0.
    let only = std::env::var("CT_BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only == part;
    let zero = Summary {
        min: 0.0,
        median: 0.0,
        max: 0.0,
    };
    let mut rng = Rng(0x5eed);
    let est: Vec<Summary> = sizes
        .iter()
        .map(|&n| {
            if want("est") {
                established(n, repeats, min_packets, &mut rng)
            } else {
                zero
            }
        })
        .collect();
    let (udp_new, bytes) = if want("new") {
        new_udp(big, repeats, &mut rng)
    } else {
        (zero, 0.0)
    };
    let tcp = if want("tcp") {
        tcp_handshakes(big, repeats)
    } else {
        zero
    };

    let m = |s: Summary| Summary {
        min: s.min / 1e6,
        median: s.median / 1e6,
        max: s.max / 1e6,
    };
    println!(
        "ctoffload-fallback-sw conntrack, one core, 64-byte frames, batches of {BATCH}, \
         {repeats} repeat(s){}",
        if quick { " (QUICK: small sizes)" } else { "" }
    );
    println!(
        "| {:<36} | {:>8} | {:>8} | {:>8} | {:<6} | {:>12} | {:>8} |",
        "measurement", "min", "median", "max", "unit", "OVS ref", "goal"
    );
    println!("|{}|", "-".repeat(106));
    let names = ["1k", "100k", "1M"];
    let ovs = ["11.9", "8.3", "4.3"];
    let goal = ["-", "-", "15"];
    for i in 0..3 {
        row(
            &format!("established UDP, {} conns", sizes[i]),
            "Mpps",
            m(est[i]),
            ovs[i],
            goal[i],
        );
        let _ = names[i];
    }
    row(
        &format!("new UDP conns ({big} into empty)"),
        "M/s",
        m(udp_new),
        "1.58",
        "4",
    );
    row(
        &format!("TCP handshakes ({big}, 3 frames)"),
        "M/s",
        m(tcp),
        "-",
        "1.5",
    );
    println!(
        "| {:<36} | {:>8} | {:>8.1} | {:>8} | {:<6} | {:>12} | {:>8} |",
        "table memory per connection", "", bytes, "", "bytes", "312-336", "96"
    );
    println!(
        "{{\"bench\":\"ct_established\",\"quick\":{quick},\"repeats\":{repeats},\
         \"conns_1k_mpps\":{:.3},\"conns_100k_mpps\":{:.3},\"conns_1m_mpps\":{:.3},\
         \"conns_1k_mpps_min\":{:.3},\"conns_100k_mpps_min\":{:.3},\"conns_1m_mpps_min\":{:.3},\
         \"new_udp_per_s\":{:.0},\"new_udp_per_s_min\":{:.0},\
         \"tcp_handshakes_per_s\":{:.0},\"tcp_handshakes_per_s_min\":{:.0},\
         \"bytes_per_conn\":{:.1}}}",
        m(est[0]).median,
        m(est[1]).median,
        m(est[2]).median,
        m(est[0]).min,
        m(est[1]).min,
        m(est[2]).min,
        udp_new.median,
        udp_new.min,
        tcp.median,
        tcp.min,
        bytes
    );
}
