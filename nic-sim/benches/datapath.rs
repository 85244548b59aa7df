//! The simulator's own datapath rate: 64-byte UDP frames that all hit installed flows,
//! fed through an in-memory port, one core calling `poll()`.
//!
//! `cargo bench -p ctoffload-nic-sim --bench datapath` prints a table and, last, one
//! JSON line. Run without `--bench` (as `cargo test --all-targets` runs a
//! `harness = false` bench) it does a quick smoke configuration (small table, few
//! packets, one repeat) so that CI finishes in well under a second; the full run takes
//! `DATAPATH_REPEATS` (default 5) repeats.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Host, udp4};
use ctoffload_hw_regs::{CommandDescriptor, CompletionStatus, FlowAction, FlowKey};
use ctoffload_nic_sim::SimConfig;
use ctoffload_nic_sim::port::PortBackend;

const CHUNK: usize = 1024;

/// What one invocation measures.
struct Plan {
    quick: bool,
    repeats: usize,
    packets: usize,
    flows: Vec<(u32, &'static str)>,
}

impl Plan {
    fn from_env() -> Self {
        // `cargo bench` passes `--bench`; `cargo test` runs the binary without it.
        let quick = !std::env::args().any(|a| a == "--bench");
        if quick {
            return Self {
                quick,
                repeats: 1,
                packets: 4 * CHUNK,
                flows: vec![(1_000, "flows_1k_mpps")],
            };
        }
        let repeats = std::env::var("DATAPATH_REPEATS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(5);
        Self {
            quick,
            repeats,
            packets: 1_000_000,
            flows: vec![(1_000, "flows_1k_mpps"), (100_000, "flows_100k_mpps")],
        }
    }
}

fn frame_for(k: &FlowKey) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&50u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&k.src_addr[..4]);
    ip[16..20].copy_from_slice(&k.dst_addr[..4]);
    let mut sum: u32 = ip
        .chunks_exact(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!u16::try_from(sum).unwrap()).to_be_bytes());
    f[34..36].copy_from_slice(&k.src_port.get().to_be_bytes());
    f[36..38].copy_from_slice(&k.dst_port.get().to_be_bytes());
    f[38..40].copy_from_slice(&30u16.to_be_bytes());
    f[40..42].copy_from_slice(&0x1234u16.to_be_bytes());
    f
}

fn key(i: u32) -> FlowKey {
    let mut k = udp4(u16::try_from(i % 60_000).unwrap() + 1, 53);
    k.src_addr[2..4].copy_from_slice(&u16::try_from(i / 60_000).unwrap().to_be_bytes());
    k
}

fn run(plan: &Plan, flows: u32) -> Vec<f64> {
    let mut h = Host::up(SimConfig::default());
    let action = FlowAction::forward(1)
        .with_dst_mac([2, 0, 0, 0, 0, 9])
        .with_dec_ttl()
        .with_snat([192, 0, 2, 1].into(), 40000);
    let mut frames = Vec::new();
    let mut i = 0;
    while frames.len() < usize::try_from(flows).unwrap() {
        let k = key(i);
        i += 1;
        let descs: Vec<_> = (0..1)
            .map(|_| CommandDescriptor::flow_insert(i, &k, &action))
            .collect();
        h.submit(&descs);
        h.poll();
        let c = h.reap();
        if c[0].status().unwrap() == CompletionStatus::Ok {
            frames.push(frame_for(&k));
        }
    }
    let mut secs = Vec::new();
    for _ in 0..plan.repeats {
        let mut elapsed = 0.0;
        let mut sent = 0;
        let mut next = 0;
        while sent < plan.packets {
            for _ in 0..CHUNK {
                h.wires[0].send(&frames[next]).unwrap();
                next = (next + 1) % frames.len();
            }
            let t = Instant::now();
            while h.sim.poll(h.now) > 0 {}
            elapsed += t.elapsed().as_secs_f64();
            sent += CHUNK;
            let out = h.wires[1].pending();
            assert_eq!(out, CHUNK, "every frame forwarded");
            let mut b = ctoffload_nic_sim::port::FrameBatch::new(CHUNK);
            h.wires[1].recv_batch(&mut b, CHUNK).unwrap();
        }
        secs.push(elapsed);
    }
    secs
}

fn main() {
    let plan = Plan::from_env();
    println!(
        "nic-sim datapath: 64-byte UDP hits (MAC rewrite + DEC_TTL + SNAT), 1 core{}",
        if plan.quick {
            " (quick smoke run: no --bench)"
        } else {
            ""
        }
    );
    println!(
        "{:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "flows", "packets", "min s", "med s", "Mpps(med)", "Mpps(best)"
    );
    let mut json = Vec::new();
    for &(flows, label) in &plan.flows {
        let mut s = run(&plan, flows);
        s.sort_by(f64::total_cmp);
        let (min, med) = (s[0], s[s.len() / 2]);
        let packets = plan.packets as f64;
        let (mpps, best) = (packets / med / 1e6, packets / min / 1e6);
        println!(
            "{flows:>8} {:>10} {min:>10.4} {med:>10.4} {mpps:>10.2} {best:>10.2}",
            plan.packets
        );
        json.push(format!("\"{label}\":{mpps:.2}"));
        json.push(format!("\"{label}_best\":{best:.2}"));
    }
    println!(
        "{{\"bench\":\"nic_sim_datapath\",\"quick\":{},\"repeats\":{},{}}}",
        plan.quick,
        plan.repeats,
        json.join(",")
    );
}
