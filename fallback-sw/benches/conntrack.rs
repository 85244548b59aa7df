//! Software conntrack throughput on one core, from an in-memory trace.
//!
//! The workload of Open vSwitch's userspace conntrack reference measurement: distinct
//! UDP connections, traffic in both directions, 64-byte Ethernet frames that each go
//! through the whole pipeline (parse, IPv4 and UDP checksums verified, tuple built,
//! looked up, state updated), in batches of 32 cycling through the connections. Plus
//! new UDP connections per second, full TCP handshakes (SYN, SYN-ACK, ACK) per second,
//! and memory per live connection (every allocation of the table and its side stores):
//! IPv4 UDP and TCP from those runs, IPv6 UDP and SNATed IPv4 UDP from tables filled
//! directly.
//!
//! NAT rows: the same established workload with SNAT applied to every packet (every
//! frame copied into a work buffer and rewritten in place by
//! [`Conntrack::process_batch_mut`]), next to the same path with no rule, measured in
//! alternation in the same run; and new SNAT connections per second when 90 % of the
//! rule's port range towards each remote endpoint is already in use (the allocator
//! searches from a random offset, like Linux), next to the same connections created in
//! a table filled the same way with no rule.
//!
//! The trace visits the connections in a random order (originals, then replies, each
//! pass a fresh permutation fixed at build time), so table accesses are not sequential.
//!
//! `cargo bench -p ctoffload-fallback-sw --bench conntrack`; `CT_BENCH_QUICK=1` (or a run
//! without `--bench`, as `cargo test --all-targets` does) runs a small, single-repeat
//! version (a smoke test). The last line printed is a JSON object with every figure.
//! Rates are given by wall clock and by the thread's CPU time (which other processes on
//! a shared core do not inflate). The header line says whether the tables got
//! transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` where THP is
//! `madvise`): the 1M-connection figures depend on it.
#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;

use ctoffload_fallback_sw::checksum;
use ctoffload_fallback_sw::conntrack::{
    Conntrack, L4State, NatOutcome, NatVerdict, Prefix, Untracked, Verdict,
};
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::nat::rules::{
    AddrRange, NatAction, NatFlags, NatRule, PortRange, RuleMatch,
};
use ctoffload_fallback_sw::table::Status;
use ctoffload_fallback_sw::tuple::{Addr, Family, Tuple};

use common::{
    BATCH, Clocks, FRAME, NS, Rng, Summary, Trace, conntrack, endpoints, eth_ipv4, run, summary,
    udp_frame, udp_trace,
};

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

/// Established-flow packets per second with `n` live connections: by wall clock, and
/// by this thread's CPU time (which other processes on a shared core do not inflate).
fn established(n: usize, repeats: usize, min_packets: usize, rng: &mut Rng) -> (Summary, Summary) {
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
    let mut cpu_rates = Vec::new();
    for r in 0..repeats {
        let now = now + u64::try_from(r + 1).unwrap() * NS;
        let t0 = Clocks::start();
        let mut tracked = 0;
        for _ in 0..passes {
            tracked += run(&mut ct, &frames, now);
        }
        let (dt, cpu) = t0.elapsed();
        assert_eq!(tracked, passes * frames.len(), "every packet tracked");
        rates.push((passes * frames.len()) as f64 / dt);
        cpu_rates.push((passes * frames.len()) as f64 / cpu);
    }
    assert_eq!(ct.table().len(), n, "nothing expired or evicted");
    (summary(rates), summary(cpu_rates))
}

/// New UDP connections per second, by wall clock and by this thread's CPU time: `n`
/// fresh flows into an empty table sized for them.
fn new_udp(n: usize, repeats: usize, rng: &mut Rng) -> (Summary, Summary, f64) {
    let (orig, _) = udp_trace(n, rng);
    let frames = orig.frames();
    let mut rates = Vec::new();
    let mut cpu_rates = Vec::new();
    let mut bytes = 0.0;
    for _ in 0..repeats {
        let mut ct = conntrack(n);
        let t0 = Clocks::start();
        let tracked = run(&mut ct, &frames, 10 * NS);
        let (dt, cpu) = t0.elapsed();
        assert_eq!(tracked, n);
        assert_eq!(ct.table().len(), n);
        rates.push(n as f64 / dt);
        cpu_rates.push(n as f64 / cpu);
        bytes = ct.bytes_per_connection() as f64;
    }
    (summary(rates), summary(cpu_rates), bytes)
}

/// Which connections [`memory_aside`] fills the table with.
#[derive(Clone, Copy)]
enum Aside {
    /// IPv6 UDP (the endpoints of [`endpoints`] mapped into 2001:db8::/96).
    Ipv6,
    /// IPv4 UDP whose reply tuple SNAT rewrote (distinct translated address and port).
    Snat,
}

/// Memory per connection of a table filled with `n` connections that keep something
/// in a side store (IPv6: both tuples; SNAT: the spilled generation), inserted directly
/// (not timed).
fn memory_aside(n: usize, kind: Aside) -> f64 {
    let mut ct = conntrack(n);
    for i in 0..n {
        let (c, cp, s, sp) = endpoints(i);
        let mut orig = Tuple {
            src: Addr::v4(c),
            dst: Addr::v4(s),
            src_l4: cp,
            dst_l4: sp,
            proto: 17,
            family: Family::V4,
            zone: 0,
        };
        let status = match kind {
            Aside::Ipv6 => {
                let v6 = |a: [u8; 4]| {
                    let mut b = [0u8; 16];
                    b[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
                    b[12..].copy_from_slice(&a);
                    Addr::v6(b)
                };
                orig.family = Family::V6;
                orig.src = v6(c);
                orig.dst = v6(s);
                Status::empty()
            }
            Aside::Snat => Status::SRC_NAT | Status::SRC_NAT_DONE,
        };
        let mut reply = orig.invert().unwrap();
        if let Aside::Snat = kind {
            let i = u32::try_from(i).unwrap();
            reply.dst = Addr::v4([100, 64, u8::try_from(i >> 16).unwrap(), 1]);
            reply.dst_l4 = u16::try_from(i & 0xFFFF).unwrap();
        }
        let state = L4State::Udp { stream_at: 0 };
        ct.table_mut()
            .insert(orig, reply, status, 30 * NS, state, 0)
            .unwrap();
    }
    assert_eq!(ct.table().len(), n);
    ct.bytes_per_connection() as f64
}

/// Full TCP handshakes per second (SYN, SYN-ACK, ACK each a frame through conntrack),
/// and the memory per connection of the full table.
fn tcp_handshakes(n: usize, repeats: usize) -> (Summary, Summary, f64) {
    let trace = tcp_trace(n);
    let frames = trace.frames();
    assert_eq!(trace.len(), 3 * n);
    let mut rates = Vec::new();
    let mut cpu_rates = Vec::new();
    let mut bytes = 0.0;
    for _ in 0..repeats {
        let mut ct = conntrack(n);
        let t0 = Clocks::start();
        let tracked = run(&mut ct, &frames, 10 * NS);
        let (dt, cpu) = t0.elapsed();
        assert_eq!(tracked, 3 * n, "every handshake frame tracked");
        assert_eq!(ct.table().len(), n);
        rates.push(n as f64 / dt);
        cpu_rates.push(n as f64 / cpu);
        bytes = ct.bytes_per_connection() as f64;
    }
    (summary(rates), summary(cpu_rates), bytes)
}

// ------------------------------------------------------------------------- NAT

/// SNAT of everything from 10.0.0.0/8 leaving port 2, to `addrs` and `ports`.
fn snat(addrs: AddrRange, ports: Option<PortRange>) -> NatRule {
    NatRule {
        id: 1,
        r#match: RuleMatch {
            src: Some(Prefix {
                family: Family::V4,
                addr: Addr::v4([10, 0, 0, 0]),
                len: 8,
            }),
            out_port: Some(2),
            proto: Some(17),
            ..RuleMatch::default()
        },
        action: NatAction::Snat {
            addrs,
            ports,
            flags: NatFlags::default(),
        },
    }
}

const OUT: PacketMeta = PacketMeta {
    in_port: 1,
    out_port: Some(2),
    out_addr: None,
};

const NO_VERDICT: NatVerdict = NatVerdict {
    verdict: Verdict::Untracked(Untracked::Fragment),
    nat: NatOutcome::Unchanged,
};

fn nat_conntrack(max: usize, rule: Option<NatRule>) -> Conntrack {
    let mut ct = conntrack(max);
    if let Some(r) = rule {
        ct.nat_mut().rules_mut().add(r).unwrap();
    }
    ct
}

/// Runs `frames` through `ct` with NAT, batches of 32: each batch is copied into a
/// work buffer (the trace stays as it is) and rewritten there. Returns (tracked,
/// rewritten).
fn run_mut(ct: &mut Conntrack, frames: &[&[u8]], now: u64) -> (usize, usize) {
    let mut work = [[0u8; FRAME]; BATCH];
    let mut out = [NO_VERDICT; BATCH];
    let (mut tracked, mut rewritten) = (0, 0);
    for chunk in frames.chunks(BATCH) {
        for (w, f) in work.iter_mut().zip(chunk) {
            w.copy_from_slice(f);
        }
        let mut refs = work.each_mut().map(|w| &mut w[..]);
        let out = &mut out[..chunk.len()];
        ct.process_batch_mut(&mut refs[..chunk.len()], 0, &OUT, now, out);
        for v in out.iter() {
            tracked += usize::from(matches!(v.verdict, Verdict::Tracked { .. }));
            rewritten += usize::from(v.nat == NatOutcome::Rewritten);
        }
        black_box(&work);
    }
    (black_box(tracked), rewritten)
}

/// The timed SNAT part of `new_nat`, out of line so that a profile can select it
/// (`valgrind --tool=callgrind --toggle-collect='*timed_snat*'`).
#[inline(never)]
fn timed_snat(ct: &mut Conntrack, frames: &[&[u8]]) -> (usize, usize) {
    run_mut(ct, frames, 10 * NS)
}

/// The timed part of `new_nat`'s baseline (no rule), as [`timed_snat`]
/// (`--toggle-collect='*timed_plain*'`).
#[inline(never)]
fn timed_plain(ct: &mut Conntrack, frames: &[&[u8]]) -> (usize, usize) {
    run_mut(ct, frames, 10 * NS)
}

/// Creates the connections of `frames` (originals) in `ct` (not timed) and returns the
/// reply of each, addressed to what the original became, in a random order.
fn create_and_answer(ct: &mut Conntrack, frames: &[&[u8]], now: u64, rng: &mut Rng) -> Trace {
    let n = frames.len();
    let mut translated = vec![[0u8; FRAME]; n];
    for (chunk, t) in frames.chunks(BATCH).zip(translated.chunks_mut(BATCH)) {
        for (w, f) in t.iter_mut().zip(chunk) {
            w.copy_from_slice(f);
        }
        let mut refs: Vec<&mut [u8]> = t.iter_mut().map(|w| &mut w[..]).collect();
        let mut out = vec![NO_VERDICT; refs.len()];
        ct.process_batch_mut(&mut refs, 0, &OUT, now, &mut out);
        assert!(out.iter().all(NatVerdict::forward), "all created");
    }
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let mut replies = Trace::with_capacity(n);
    for &i in &order {
        let f = &translated[i];
        let src = <[u8; 4]>::try_from(&f[26..30]).unwrap();
        let dst = <[u8; 4]>::try_from(&f[30..34]).unwrap();
        let sp = u16::from_be_bytes([f[34], f[35]]);
        let dp = u16::from_be_bytes([f[36], f[37]]);
        udp_frame(&mut replies, dst, dp, src, sp);
    }
    replies
}

/// Established packets per second with `n` live connections through the NAT path:
/// (no rule, SNAT on every packet), measured alternately in the same run; and the
/// ratio SNAT / no rule of each repeat's pair by CPU time (which other processes on
/// a shared machine do not inflate).
fn established_nat(
    n: usize,
    repeats: usize,
    min_packets: usize,
    rng: &mut Rng,
) -> (Summary, Summary, Summary) {
    let (orig, _) = udp_trace(n, rng);
    let now = 10 * NS;
    // 64 addresses: 7 servers x 64 addresses x 64512 ports hold the 1M connections.
    let rule = snat(AddrRange::v4([203, 0, 113, 1], [203, 0, 113, 64]), None);
    let mut cts = [nat_conntrack(n, None), nat_conntrack(n, Some(rule))];
    let frames = orig.frames();
    let mut both = Vec::new();
    for ct in &mut cts {
        let replies = create_and_answer(ct, &frames, now, rng);
        let mut b = Trace::with_capacity(2 * n);
        b.bytes.extend_from_slice(&orig.bytes);
        b.bytes.extend_from_slice(&replies.bytes);
        assert_eq!(ct.table().len(), n);
        both.push(b);
    }
    assert_eq!(cts[0].nat_connections(), 0);
    assert_eq!(cts[1].nat_connections(), n, "every connection translated");
    let traces = [both[0].frames(), both[1].frames()];
    let passes = min_packets.div_ceil(traces[0].len()).max(1);
    let mut rates = [Vec::new(), Vec::new()];
    let mut ratio_cpu = Vec::new();
    // `CT_BENCH_NAT_SIDE=plain` or `snat`: time only that side (for counting one
    // side's instructions under callgrind); the other prints 0.
    let side = std::env::var("CT_BENCH_NAT_SIDE").unwrap_or_default();
    let skipped = |k: usize| matches!((side.as_str(), k), ("plain", 1) | ("snat", 0));
    for r in 0..repeats {
        let now = now + u64::try_from(r + 1).unwrap() * NS;
        let mut cpu_rates = [0.0; 2];
        // Alternate which side goes first, so that neither always follows the other.
        let order = if r % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            if skipped(k) {
                rates[k].push(0.0);
                continue;
            }
            let ct = &mut cts[k];
            let frames = &traces[k];
            let clocks = Clocks::start();
            let (mut tracked, mut rewritten) = (0, 0);
            for _ in 0..passes {
                let (t, w) = run_mut(ct, frames, now);
                tracked += t;
                rewritten += w;
            }
            let (dt, cpu) = clocks.elapsed();
            let total = passes * frames.len();
            assert_eq!(tracked, total, "every packet tracked");
            assert_eq!(rewritten, if k == 1 { total } else { 0 }, "rewrites");
            rates[k].push(total as f64 / dt);
            cpu_rates[k] = total as f64 / cpu;
        }
        ratio_cpu.push(cpu_rates[1] / cpu_rates[0]);
    }
    assert_eq!(cts[1].table().len(), n, "nothing expired or evicted");
    assert_eq!(cts[1].stats().nat_rewrite_failed, 0);
    let [a, b] = rates;
    (summary(a), summary(b), summary(ratio_cpu))
}

/// One table entry's worth of memory (a cache line).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u64; 8]);

/// The memory floor of the established rows at `n` connections: the same random
/// accesses with no packet work at all, by this thread's CPU time (packets/s). Per
/// packet, `lines == 2`: an index cell of an index as large as the table's (4 cells
/// a connection, rounded up to a power of two), then the 64-byte entry it names, as
/// `Conntrack::process_batch` does (batches of 32: prefetch the cells, read them and
/// prefetch the entries, then update each entry); `lines == 1`: only the entry, at
/// the packet's hash (what a table that keeps the entry where its hash points would
/// pay). The packets' hashes are read from a trace of 2n words, as the rows read
/// their frames (a fresh permutation per pass).
fn memory_floor(
    n: usize,
    lines: usize,
    repeats: usize,
    min_packets: usize,
    rng: &mut Rng,
) -> Summary {
    let cells = (n * 4).next_power_of_two();
    let mask = cells - 1;
    let index: Vec<u32> = (0..cells)
        .map(|_| u32::try_from(rng.next() % n as u64).unwrap())
        .collect();
    let mut entries = vec![Line([0; 8]); n];
    let trace: Vec<u64> = (0..2 * n).map(|_| rng.next()).collect();
    let passes = min_packets.div_ceil(trace.len()).max(1);
    let slot = |h: u64, index: &[u32]| -> usize {
        if lines == 2 {
            index[usize::try_from(h).unwrap() & mask] as usize
        } else {
            usize::try_from(h >> 32).unwrap() % n
        }
    };
    let mut rates = Vec::new();
    for _ in 0..repeats {
        let clocks = Clocks::start();
        for _ in 0..passes {
            for batch in trace.chunks(BATCH) {
                if lines == 2 {
                    for &h in batch {
                        prefetch(&index[usize::try_from(h).unwrap() & mask]);
                    }
                }
                for &h in batch {
                    prefetch(&entries[slot(h, &index)]);
                }
                for &h in batch {
                    let e = &mut entries[slot(h, &index)];
                    e.0[1] = e.0[1].wrapping_add(h);
                }
            }
        }
        let (_, cpu) = clocks.elapsed();
        rates.push((passes * trace.len()) as f64 / cpu);
    }
    black_box(&entries);
    summary(rates)
}

/// A cache-line prefetch (a no-op off x86_64).
fn prefetch<T>(r: &T) {
    #[cfg(target_arch = "x86_64")]
    safe_arch::prefetch_t0(r);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = r;
}

/// What [`new_nat`] measured: rates by wall clock and by this thread's CPU time (which
/// other processes on a shared machine do not inflate), SNAT and the no-rule baseline
/// of the same repeat, and the ratio of the two (CPU time) per repeat.
struct NewNat {
    snat: Summary,
    snat_cpu: Summary,
    plain: Summary,
    plain_cpu: Summary,
    ratio_cpu: Summary,
    probes: f64,
    /// Candidates per decision taken as free without a table check (exact index).
    unchecked: f64,
    exhausted: u64,
}

/// New SNAT connections per second from a range that is 90 % in use towards each of
/// `endpoints` remote endpoints: the range is filled by the allocator itself (not
/// timed), then `fresh` more connections per endpoint are timed (the range ends at most
/// 5 % fuller). Each repeat measures SNAT and then the baseline.
fn new_nat(endpoints: usize, range: u16, fresh: usize, repeats: usize, rng: &mut Rng) -> NewNat {
    let ports = PortRange::new(20_000, 20_000 + range - 1);
    let fill = usize::from(range) * 9 / 10;
    let endpoint = |k: usize| -> ([u8; 4], u16) {
        let k = u32::try_from(k).unwrap();
        let [_, _, b, c] = k.to_be_bytes();
        ([172, 16 + b, c, 1], 5000)
    };
    // Client j: its own address, a port outside the range (so it is never kept).
    let client = |j: usize| -> ([u8; 4], u16) {
        let [_, b, c, d] = u32::try_from(j).unwrap().to_be_bytes();
        ([10, b, c, d], 40_000)
    };
    let trace = |from: usize, to: usize, rng: &mut Rng| {
        let mut pairs: Vec<(usize, usize)> = (0..endpoints)
            .flat_map(|k| (from..to).map(move |j| (j, k)))
            .collect();
        rng.shuffle(&mut pairs);
        let mut t = Trace::with_capacity(pairs.len());
        for (j, k) in pairs {
            let ((c, cp), (s, sp)) = (client(j), endpoint(k));
            udp_frame(&mut t, c, cp, s, sp);
        }
        t
    };
    let prefill = trace(0, fill, rng);
    let timed = trace(fill, fill + fresh, rng);
    let (pf, tf) = (prefill.frames(), timed.frames());
    let max = endpoints * (fill + fresh);
    let (mut rates, mut rates_cpu) = (Vec::new(), Vec::new());
    let (mut plain, mut plain_cpu, mut ratio_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let (mut probes, mut unchecked) = (0.0, 0.0);
    let mut exhausted = 0;
    for _ in 0..repeats {
        let rule = snat(AddrRange::single_v4([203, 0, 113, 1]), Some(ports));
        let mut ct = nat_conntrack(max, Some(rule));
        // A search gives up only when the range is full for that endpoint (or its
        // table checks run out): dropped connections (the sender retries) are counted,
        // not hidden. Linux's bounded search gave up on a handful here.
        let (t, w) = run_mut(&mut ct, &pf, 10 * NS);
        assert_eq!(t, w, "every tracked connection translated");
        assert!(t + t / 1000 >= pf.len(), "prefill: {t} of {}", pf.len());
        let before = ct.nat().stats();
        let clocks = Clocks::start();
        let (t, w) = timed_snat(&mut ct, &tf);
        let (dt, cpu) = clocks.elapsed();
        assert_eq!(t, w, "every tracked connection translated");
        let after = ct.nat().stats();
        let tried = after.decisions - before.decisions;
        let failed = after.exhausted - before.exhausted;
        assert_eq!(usize::try_from(tried - failed).unwrap(), t);
        assert!(failed * 100 <= tried, "{failed} of {tried} exhausted");
        exhausted += failed;
        probes = (after.probes - before.probes) as f64 / tried as f64;
        unchecked = (after.unchecked - before.unchecked) as f64 / tried as f64;
        rates.push(t as f64 / dt);
        rates_cpu.push(t as f64 / cpu);
        drop(ct);
        // Baseline, same repeat: the same connections without any rule (the table as
        // full, no NAT decision, no port search).
        let mut ct = nat_conntrack(max, None);
        let (t, _) = run_mut(&mut ct, &pf, 10 * NS);
        assert_eq!(t, pf.len());
        let clocks = Clocks::start();
        let (t, _) = timed_plain(&mut ct, &tf);
        let (dt, cpu) = clocks.elapsed();
        assert_eq!(t, tf.len());
        plain.push(t as f64 / dt);
        plain_cpu.push(t as f64 / cpu);
        ratio_cpu.push(rates_cpu[rates_cpu.len() - 1] / plain_cpu[plain_cpu.len() - 1]);
    }
    NewNat {
        snat: summary(rates),
        snat_cpu: summary(rates_cpu),
        plain: summary(plain),
        plain_cpu: summary(plain_cpu),
        ratio_cpu: summary(ratio_cpu),
        probes,
        unchecked,
        exhausted,
    }
}

/// Whether the tables' big allocations get transparent huge pages: (the index, the
/// rest). The index asks for them itself (`Config::huge_pages`, unless
/// `CT_BENCH_PLAIN_MEMORY=1`) and gets them unless THP is `never`; the rest (the
/// entries among them) gets them when THP is `always`, or it is `madvise` and glibc's
/// malloc asks for them (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). The figures at 1M
/// connections depend on it (TLB misses).
fn huge_pages() -> (bool, bool) {
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let tunable = std::env::var("GLIBC_TUNABLES")
        .is_ok_and(|t| t.split(':').any(|kv| kv == "glibc.malloc.hugetlb=1"));
    let asked = std::env::var_os("CT_BENCH_PLAIN_MEMORY").is_none_or(|v| v == "0");
    let rest = mode.contains("[always]") || (mode.contains("[madvise]") && tunable);
    (rest || (asked && mode.contains("[madvise]")), rest)
}

fn row(name: &str, unit: &str, s: Summary, ovs: &str, goal: &str) {
    println!(
        "| {name:<36} | {:>8.2} | {:>8.2} | {:>8.2} | {unit:<6} | {ovs:>12} | {goal:>8} |",
        s.min, s.median, s.max
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary
    // without it: then only the smoke test.
    let quick = std::env::var_os("CT_BENCH_QUICK").is_some_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let (sizes, big, repeats, min_packets) = if quick {
        ([1_000, 10_000, 20_000], 20_000, 1, 10_000)
    } else {
        ([1_000, 100_000, 1_000_000], 1_000_000, 5, 4_000_000)
    };
    // `CT_BENCH_REPEATS=n`: more (or fewer) repeats, e.g. for more same-run pairs.
    let repeats = std::env::var("CT_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(repeats);
    // `CT_BENCH_ONLY=est|new|tcp` runs one part (for profiling); the others print 0.
    let only = std::env::var("CT_BENCH_ONLY").unwrap_or_default();
    let want = |part: &str| only.is_empty() || only == part;
    let zero = Summary {
        min: 0.0,
        median: 0.0,
        max: 0.0,
    };
    let mut rng = Rng(0x5eed);
    // `CT_BENCH_EST_CONNS=1000,1000000`: only these established sizes, with and
    // without NAT (for profiling one of them); the others print 0.
    let est_only: Option<Vec<usize>> = std::env::var("CT_BENCH_EST_CONNS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect());
    let (est, est_cpu): (Vec<Summary>, Vec<Summary>) = sizes
        .iter()
        .map(|&n| {
            if want("est") && est_only.as_ref().is_none_or(|o| o.contains(&n)) {
                established(n, repeats, min_packets, &mut rng)
            } else {
                (zero, zero)
            }
        })
        .unzip();
    // The memory floor of the largest established row (only with it).
    let floor = |lines: usize, rng: &mut Rng| {
        if want("est") && est_only.as_ref().is_none_or(|o| o.contains(&big)) {
            memory_floor(big, lines, repeats, min_packets, rng)
        } else {
            zero
        }
    };
    let (floor2, floor1) = (floor(2, &mut rng), floor(1, &mut rng));
    let (udp_new, udp_new_cpu, bytes) = if want("new") {
        new_udp(big, repeats, &mut rng)
    } else {
        (zero, zero, 0.0)
    };
    let (v6_bytes, snat_bytes) = if want("new") {
        (
            memory_aside(big, Aside::Ipv6),
            memory_aside(big, Aside::Snat),
        )
    } else {
        (0.0, 0.0)
    };
    let (tcp, tcp_cpu, tcp_bytes) = if want("tcp") {
        tcp_handshakes(big, repeats)
    } else {
        (zero, zero, 0.0)
    };
    let est_nat: Vec<(Summary, Summary, Summary)> = sizes
        .iter()
        .map(|&n| {
            if want("nat") && est_only.as_ref().is_none_or(|o| o.contains(&n)) {
                established_nat(n, repeats, min_packets, &mut rng)
            } else {
                (zero, zero, zero)
            }
        })
        .collect();
    // 256 endpoints x 1024 ports, 90 % used: 235 776 connections, then 12 800 timed.
    let (nat_endpoints, nat_range, nat_fresh) = if quick {
        (16, 256, 12)
    } else {
        (256, 1024, 50)
    };
    let natnew = if want("natnew") {
        new_nat(nat_endpoints, nat_range, nat_fresh, repeats, &mut rng)
    } else {
        NewNat {
            snat: zero,
            snat_cpu: zero,
            plain: zero,
            plain_cpu: zero,
            ratio_cpu: zero,
            probes: 0.0,
            unchecked: 0.0,
            exhausted: 0,
        }
    };
    let (nat_new, nat_new_plain) = (natnew.snat, natnew.plain);
    let (nat_probes, nat_exhausted) = (natnew.probes, natnew.exhausted);
    let nat_unchecked = natnew.unchecked;

    let m = |s: Summary| Summary {
        min: s.min / 1e6,
        median: s.median / 1e6,
        max: s.max / 1e6,
    };
    let (thp_index, thp) = huge_pages();
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!(
        "ctoffload-fallback-sw conntrack, one core, 64-byte frames, batches of {BATCH}, \
         {repeats} repeat(s){}; transparent huge pages for the tables' index: {}, \
         entries: {}",
        if quick { " (QUICK: small sizes)" } else { "" },
        yes(thp_index),
        yes(thp)
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
    for i in 0..3 {
        row(
            &format!("est. UDP, {} conns, by CPU time", sizes[i]),
            "Mpps",
            m(est_cpu[i]),
            "-",
            goal[i],
        );
    }
    row(
        &format!("memory floor {big}: cell+entry, CPU"),
        "Mpps",
        m(floor2),
        "-",
        "-",
    );
    row(
        &format!("memory floor {big}: entry only, CPU"),
        "Mpps",
        m(floor1),
        "-",
        "-",
    );
    row(
        &format!("new UDP conns ({big} into empty)"),
        "M/s",
        m(udp_new),
        "1.58",
        "4",
    );
    row(
        "new UDP conns, by CPU time",
        "M/s",
        m(udp_new_cpu),
        "-",
        "4",
    );
    row(
        &format!("TCP handshakes ({big}, 3 frames)"),
        "M/s",
        m(tcp),
        "-",
        "1.5",
    );
    row("TCP handshakes, by CPU time", "M/s", m(tcp_cpu), "-", "1.5");
    // Every allocation of the conntrack instance's table (index, entries, side store
    // of tuples, timer links and wheel, free list, event and release queues) and of the
    // TCP window store beside it, divided by the live connections of the full table.
    for (name, b, ovs, goal) in [
        ("mem/conn IPv4 UDP (all allocs)", bytes, "312-336", "96"),
        ("mem/conn IPv4 TCP (all allocs)", tcp_bytes, "-", "-"),
        ("mem/conn IPv6 UDP (all allocs)", v6_bytes, "-", "-"),
        ("mem/conn IPv4 UDP SNAT (all allocs)", snat_bytes, "-", "-"),
    ] {
        println!(
            "| {name:<36} | {:>8} | {b:>8.1} | {:>8} | {:<6} | {ovs:>12} | {goal:>8} |",
            "", "", "bytes"
        );
    }
    let mut ratios = [0.0; 3];
    for i in 0..3 {
        let (plain, nat, ratio_cpu) = est_nat[i];
        row(
            &format!("est. UDP, NAT path no rule, {}", sizes[i]),
            "Mpps",
            m(plain),
            "-",
            "-",
        );
        ratios[i] = if plain.median > 0.0 {
            nat.median / plain.median
        } else {
            0.0
        };
        row(
            &format!("est. UDP, SNAT every pkt, {}", sizes[i]),
            "Mpps",
            m(nat),
            &format!("x{:.3} of above", ratios[i]),
            ">=x0.9",
        );
        row(
            &format!("est. SNAT / no rule, CPU, {}", sizes[i]),
            "x",
            ratio_cpu,
            "per repeat",
            ">=x0.9",
        );
    }
    row(
        "new conns, same table, no rule",
        "M/s",
        m(nat_new_plain),
        "-",
        "-",
    );
    row(
        "new SNAT conns, range 90% used",
        "M/s",
        m(nat_new),
        &format!("{nat_probes:.1} pr ({nat_unchecked:.1} unchecked), {nat_exhausted} ex"),
        "3",
    );
    row(
        "new conns, no rule, by CPU time",
        "M/s",
        m(natnew.plain_cpu),
        "-",
        "-",
    );
    row(
        "new SNAT conns, 90%, by CPU time",
        "M/s",
        m(natnew.snat_cpu),
        "-",
        "3",
    );
    row(
        "new SNAT / no rule, CPU time ratio",
        "x",
        natnew.ratio_cpu,
        "per repeat",
        "-",
    );
    println!(
        "{{\"bench\":\"ct_established\",\"quick\":{quick},\"repeats\":{repeats},\"thp\":{thp},\"thp_index\":{thp_index},\
         \"conns_1k_mpps\":{:.3},\"conns_100k_mpps\":{:.3},\"conns_1m_mpps\":{:.3},\
         \"conns_1k_mpps_min\":{:.3},\"conns_100k_mpps_min\":{:.3},\"conns_1m_mpps_min\":{:.3},\
         \"conns_1k_cpu_mpps\":{:.3},\"conns_100k_cpu_mpps\":{:.3},\"conns_1m_cpu_mpps\":{:.3},\
         \"conns_1k_cpu_mpps_min\":{:.3},\"conns_100k_cpu_mpps_min\":{:.3},\"conns_1m_cpu_mpps_min\":{:.3},\
         \"floor_1m_cell_entry_cpu_mpps\":{:.3},\"floor_1m_entry_only_cpu_mpps\":{:.3},\
         \"new_udp_per_s\":{:.0},\"new_udp_per_s_min\":{:.0},\
         \"new_udp_cpu_per_s\":{:.0},\"new_udp_cpu_per_s_min\":{:.0},\
         \"tcp_handshakes_per_s\":{:.0},\"tcp_handshakes_per_s_min\":{:.0},\
         \"tcp_handshakes_cpu_per_s\":{:.0},\"tcp_handshakes_cpu_per_s_min\":{:.0},\
         \"bytes_per_conn\":{:.1},\"bytes_per_conn_tcp\":{:.1},\"bytes_per_conn_v6\":{:.1},\"bytes_per_conn_snat\":{:.1},\
         \"nat_plain_1k_mpps\":{:.3},\"nat_plain_100k_mpps\":{:.3},\"nat_plain_1m_mpps\":{:.3},\
         \"snat_1k_mpps\":{:.3},\"snat_100k_mpps\":{:.3},\"snat_1m_mpps\":{:.3},\
         \"snat_1k_mpps_min\":{:.3},\"snat_100k_mpps_min\":{:.3},\"snat_1m_mpps_min\":{:.3},\
         \"snat_ratio_1k\":{:.3},\"snat_ratio_100k\":{:.3},\"snat_ratio_1m\":{:.3},\
         \"snat_cpu_ratio_1k\":{:.3},\"snat_cpu_ratio_100k\":{:.3},\"snat_cpu_ratio_1m\":{:.3},\
         \"snat_cpu_ratio_1k_min\":{:.3},\"snat_cpu_ratio_100k_min\":{:.3},\"snat_cpu_ratio_1m_min\":{:.3},\
         \"new_snat_busy90_per_s\":{:.0},\"new_snat_busy90_per_s_min\":{:.0},\
         \"new_snat_busy90_probes\":{:.2},\"new_snat_busy90_exhausted\":{},\
         \"new_snat_busy90_unchecked\":{:.2},\
         \"new_plain_busy90_per_s\":{:.0},\"new_plain_busy90_per_s_min\":{:.0},\
         \"new_snat_busy90_cpu_per_s\":{:.0},\"new_snat_busy90_cpu_per_s_min\":{:.0},\
         \"new_plain_busy90_cpu_per_s\":{:.0},\"new_plain_busy90_cpu_per_s_min\":{:.0},\
         \"new_snat_busy90_cpu_ratio\":{:.3},\"new_snat_busy90_cpu_ratio_min\":{:.3}}}",
        m(est[0]).median,
        m(est[1]).median,
        m(est[2]).median,
        m(est[0]).min,
        m(est[1]).min,
        m(est[2]).min,
        m(est_cpu[0]).median,
        m(est_cpu[1]).median,
        m(est_cpu[2]).median,
        m(est_cpu[0]).min,
        m(est_cpu[1]).min,
        m(est_cpu[2]).min,
        m(floor2).median,
        m(floor1).median,
        udp_new.median,
        udp_new.min,
        udp_new_cpu.median,
        udp_new_cpu.min,
        tcp.median,
        tcp.min,
        tcp_cpu.median,
        tcp_cpu.min,
        bytes,
        tcp_bytes,
        v6_bytes,
        snat_bytes,
        m(est_nat[0].0).median,
        m(est_nat[1].0).median,
        m(est_nat[2].0).median,
        m(est_nat[0].1).median,
        m(est_nat[1].1).median,
        m(est_nat[2].1).median,
        m(est_nat[0].1).min,
        m(est_nat[1].1).min,
        m(est_nat[2].1).min,
        ratios[0],
        ratios[1],
        ratios[2],
        est_nat[0].2.median,
        est_nat[1].2.median,
        est_nat[2].2.median,
        est_nat[0].2.min,
        est_nat[1].2.min,
        est_nat[2].2.min,
        nat_new.median,
        nat_new.min,
        nat_probes,
        nat_exhausted,
        nat_unchecked,
        nat_new_plain.median,
        nat_new_plain.min,
        natnew.snat_cpu.median,
        natnew.snat_cpu.min,
        natnew.plain_cpu.median,
        natnew.plain_cpu.min,
        natnew.ratio_cpu.median,
        natnew.ratio_cpu.min
    );
}
