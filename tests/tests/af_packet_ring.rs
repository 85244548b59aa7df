//! `AF_PACKET` ports over memory-mapped rings on a real veth pair in a namespace of its
//! own: VLAN-tagged frames keep their tags, and a burst larger than one receive block
//! (so the walk crosses blocks and hands them back) arrives complete, with every ring
//! mode (both rings; receive ring + `sendmmsg`) and the agent's default port.
//!
//! Needs root (namespaces, `AF_PACKET`) and `ip`; skipped with a message otherwise,
//! except under `CI`. Every wait is bounded; the namespace (and the veths in it) is
//! deleted also when an assertion fails.

use std::time::{Duration, Instant};

use ctoffload_agent::port::{AfPacket, AfPacketIo, PacketPort};
use ctoffload_nic_sim::port::{AfPacketConfig, AfPacketPort, FrameBatch, PortBackend, RingConfig};
use ctoffload_tests::netns::{NetNs, skip_reason, unique_name};

/// Generous bounds: the machine is shared with parallel builds.
const LINK_UP_TIMEOUT: Duration = Duration::from_secs(10);
const ARRIVAL_TIMEOUT: Duration = Duration::from_secs(20);
const RESEND_EVERY: Duration = Duration::from_millis(500);
/// A small receive block, so that the burst spans many of them.
const BLOCK: u32 = 16 * 1024;
/// Frames in the burst: about 1.3 MB on the ring, 80 blocks of [`BLOCK`].
const BURST: usize = 3000;

fn skip() -> bool {
    if let Some(why) = skip_reason(&["ip"]) {
        assert!(std::env::var_os("CI").is_none(), "under CI: {why}");
        eprintln!("skipping: {why}");
        return true;
    }
    false
}

/// A namespace holding the veth pair `ra0`–`rb0`, both up (bounded wait).
fn bed(tag: &str) -> NetNs {
    let ns = NetNs::new(&unique_name(tag)).expect("namespace");
    ns.ip(&["link", "add", "ra0", "type", "veth", "peer", "name", "rb0"])
        .expect("veth");
    ns.sysctl(&[
        "net.ipv6.conf.all.disable_ipv6=1",
        "net.ipv6.conf.default.disable_ipv6=1",
    ])
    .expect("sysctl");
    for i in ["ra0", "rb0"] {
        ns.ip(&["link", "set", i, "up"]).expect("link up");
    }
    let deadline = Instant::now() + LINK_UP_TIMEOUT;
    while Instant::now() < deadline {
        let up = ["ra0", "rb0"].iter().all(|i| {
            ns.ip(&["-o", "link", "show", i])
                .is_ok_and(|s| s.contains("state UP"))
        });
        if up {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ns
}

/// Frame `i` of the burst: 60 to 1000 bytes, every third one VLAN-tagged (802.1Q, or
/// 802.1ad for every sixth) with a TCI that names it.
fn test_frame(i: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    let tag = u16::try_from(i % 4096).expect("tci");
    if i % 3 == 0 {
        let tpid: u16 = if i % 6 == 0 { 0x88a8 } else { 0x8100 };
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(0x2000 | tag).to_be_bytes());
    }
    f.extend_from_slice(&0x88b5u16.to_be_bytes()); // local experimental EtherType
    f.extend_from_slice(&u32::try_from(i).expect("marker").to_be_bytes());
    f.extend_from_slice(&std::process::id().to_be_bytes());
    let len = 60 + (i * 37) % 941;
    f.resize(len, u8::try_from(i % 251).expect("fill"));
    f
}

/// Which burst frame `f` is, if it is one of ours (intact).
fn burst_index(f: &[u8], frames: &[Vec<u8>]) -> Option<usize> {
    let off = if f.get(12..14) == Some(&0x88b5u16.to_be_bytes()) {
        14
    } else {
        18
    };
    let i = usize::try_from(u32::from_be_bytes(f.get(off..off + 4)?.try_into().ok()?)).ok()?;
    (frames.get(i).map(Vec::as_slice) == Some(f)).then_some(i)
}

/// Sends the burst from `tx` in batches of 64 and receives on `rx` until every frame
/// arrived intact (frames lost on the way are resent, bounded); returns how many were
/// resent.
fn burst_arrives(
    send: &mut dyn FnMut(&FrameBatch),
    recv: &mut dyn FnMut(&mut FrameBatch) -> usize,
) -> Result<usize, String> {
    let frames: Vec<Vec<u8>> = (0..BURST).map(test_frame).collect();
    let total: usize = frames.iter().map(Vec::len).sum();
    assert!(total > 10 * BLOCK as usize, "the burst must span blocks");
    let mut seen = vec![false; BURST];
    let mut rx = FrameBatch::new(256);
    let mut batch = FrameBatch::new(64);
    let mut resent = 0;
    let mut first = true;
    let deadline = Instant::now() + ARRIVAL_TIMEOUT;
    while Instant::now() < deadline {
        let missing: Vec<usize> = (0..BURST).filter(|&i| !seen[i]).collect();
        if missing.is_empty() {
            return Ok(resent);
        }
        if !first {
            resent += missing.len();
        }
        first = false;
        for chunk in missing.chunks(64) {
            batch.clear();
            for &i in chunk {
                batch.push(&frames[i]).map_err(|e| e.to_string())?;
            }
            send(&batch);
        }
        let until = Instant::now() + RESEND_EVERY;
        while Instant::now() < until {
            rx.clear();
            if recv(&mut rx) == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            for f in rx.iter() {
                if let Some(i) = burst_index(f, &frames) {
                    seen[i] = true;
                }
            }
        }
    }
    let missing = seen.iter().filter(|s| !**s).count();
    Err(format!("{missing} of {BURST} frames never arrived"))
}

fn ring(tx_frames: u32) -> AfPacketConfig {
    AfPacketConfig {
        ring: Some(RingConfig {
            block_size: BLOCK,
            blocks: 128,
            block_timeout_ms: 1,
            tx_frames,
        }),
        qdisc_bypass: false,
    }
}

#[test]
fn vlan_frames_and_a_burst_over_many_blocks_cross_the_rings() {
    if skip() {
        return;
    }
    let ns = bed("rg1");
    let modes = [
        ("both rings", ring(256), AfPacketIo::Rings),
        ("rx ring + sendmmsg", ring(0), AfPacketIo::RxRing),
    ];
    for (what, cfg, io) in modes {
        let res = ns
            .run_inside(move || -> Result<(usize, String), String> {
                let mut a = AfPacketPort::open_with("ra0", &cfg).map_err(|e| e.to_string())?;
                let mut b = AfPacketPort::open_with("rb0", &cfg).map_err(|e| e.to_string())?;
                if a.io() != io || b.io() != io {
                    return Err(format!("got {} / {}", a.io(), b.io()));
                }
                let resent =
                    burst_arrives(&mut |batch| a.send_batch(batch).expect("send"), &mut |rx| {
                        b.recv_batch(rx, 256).expect("recv")
                    })?;
                // The sender never sees its own frames.
                let mut own = FrameBatch::new(256);
                let mut looped = 0;
                for _ in 0..20 {
                    own.clear();
                    looped += a.recv_batch(&mut own, 256).expect("recv");
                    std::thread::sleep(Duration::from_millis(5));
                }
                if looped != 0 {
                    return Err(format!("sender received {looped} frames"));
                }
                Ok((resent, format!("a {:?}, b {:?}", a.stats(), b.stats())))
            })
            .expect("enter namespace");
        match res {
            Ok((resent, stats)) => {
                eprintln!("{what}: all {BURST} arrived ({resent} resent); {stats}")
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[test]
fn agent_port_uses_both_rings_by_default() {
    if skip() {
        return;
    }
    let ns = bed("rg2");
    let res = ns
        .run_inside(|| -> Result<(), String> {
            let mut a = AfPacket::open("ra0").map_err(|e| e.to_string())?;
            let mut b = AfPacket::open("rb0").map_err(|e| e.to_string())?;
            for p in [&a, &b] {
                if p.io() != AfPacketIo::Rings || p.fallback().is_some() {
                    return Err(format!("{}: {} ({:?})", p.name(), p.io(), p.fallback()));
                }
            }
            burst_arrives(&mut |batch| a.send_batch(batch).expect("send"), &mut |rx| {
                b.recv_batch(rx, 256).expect("recv")
            })
            .map(drop)
        })
        .expect("enter namespace");
    if let Err(e) = res {
        panic!("{e}");
    }
}
