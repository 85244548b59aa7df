//! What the conntrack benches share: the 64-byte frames of the reference workload, a
//! deterministic generator, the batch runner and the clocks.
#![allow(dead_code)]

use std::hint::black_box;
use std::time::Instant;

use ctoffload_fallback_sw::checksum;
use ctoffload_fallback_sw::conntrack::{Config, Conntrack, Verdict};

pub const NS: u64 = 1_000_000_000;
pub const BATCH: usize = 32;
pub const FRAME: usize = 64;

/// Frames stored back to back, `FRAME` bytes each.
pub struct Trace {
    pub bytes: Vec<u8>,
}

impl Trace {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(n * FRAME),
        }
    }
    pub fn len(&self) -> usize {
        self.bytes.len() / FRAME
    }
    pub fn frames(&self) -> Vec<&[u8]> {
        self.bytes.chunks_exact(FRAME).collect()
    }
}

/// A small deterministic generator (splitmix64) for the permutations.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = usize::try_from(self.next() % (i as u64 + 1)).unwrap();
            v.swap(i, j);
        }
    }
}

/// Endpoints of connection `i`: distinct (client address, client port) pairs towards a
/// few servers.
pub fn endpoints(i: usize) -> ([u8; 4], u16, [u8; 4], u16) {
    let i = u32::try_from(i).unwrap();
    let c = (10u32 << 24) | (i >> 4);
    let sport = 1024 + u16::try_from(i & 0xF).unwrap() * 3001;
    let s = [192, 168, 1, u8::try_from(1 + i % 7).unwrap()];
    (c.to_be_bytes(), sport, s, 5000)
}

pub fn eth_ipv4(buf: &mut [u8], src: [u8; 4], dst: [u8; 4], proto: u8, l4_len: usize) {
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
pub fn udp_frame(t: &mut Trace, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) {
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

/// Both directions of `n` UDP connections: all originals in a random order, then all
/// replies in another.
pub fn udp_trace(n: usize, rng: &mut Rng) -> (Trace, Trace) {
    udp_trace_from(0, n, rng)
}

/// [`udp_trace`] of connections `first..first + n` (see [`endpoints`]).
pub fn udp_trace_from(first: usize, n: usize, rng: &mut Rng) -> (Trace, Trace) {
    let mut order: Vec<usize> = (first..first + n).collect();
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

/// Runs `frames` through `ct` in batches of 32; returns how many were tracked.
pub fn run(ct: &mut Conntrack, frames: &[&[u8]], now: u64) -> usize {
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
pub struct Summary {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

pub fn summary(mut v: Vec<f64>) -> Summary {
    v.sort_by(f64::total_cmp);
    Summary {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

/// Wall-clock and this thread's CPU time since a start.
pub struct Clocks {
    wall: Instant,
    cpu: f64,
}

impl Clocks {
    pub fn thread_cpu() -> f64 {
        // `CT_BENCH_WALL_ONLY=1`: no CPU clock (every CPU figure is then infinite or
        // NaN), for running under valgrind, where rustix cannot set up its vDSO calls.
        if std::env::var_os("CT_BENCH_WALL_ONLY").is_some() {
            return 0.0;
        }
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
    }
    pub fn start() -> Self {
        Self {
            wall: Instant::now(),
            cpu: Self::thread_cpu(),
        }
    }
    /// (wall seconds, CPU seconds).
    pub fn elapsed(&self) -> (f64, f64) {
        (
            self.wall.elapsed().as_secs_f64(),
            Self::thread_cpu() - self.cpu,
        )
    }
}

pub fn conntrack(max: usize) -> Conntrack {
    Conntrack::new(Config {
        max_connections: max,
        // `CT_BENCH_PLAIN_MEMORY=1`: the table's index without huge pages (to measure
        // what they give in the same binary).
        huge_pages: std::env::var_os("CT_BENCH_PLAIN_MEMORY").is_none_or(|v| v == "0"),
        ..Config::default()
    })
}
