//! The driver's register engine against the simulator (nic-sim), end to end through
//! shared memory: bring-up, every completion status, counters and wrap, table dump,
//! exception RX/TX through `MemPort`, and every injected fault reported and recovered.

use std::time::{Duration, Instant};

use ctoffload_agent::cli::sim::driver_io;
use ctoffload_driver::DriverError;
use ctoffload_driver::counters::CounterTracker;
use ctoffload_driver::device::{
    Clock, CommandResult, Device, DeviceConfig, DeviceEvent, FlowCommand, Outcome, TxFrame,
};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_hw_regs::regs::RingMaxLog2;
use ctoffload_hw_regs::{
    CommandDescriptor, CompletionStatus, FatalCode, FatalUnit, FlowAction, FlowKey, L4Proto, Le16,
    RxReason, bucket_index, key_hash,
};
use ctoffload_nic_sim::port::{MemPort, PortBackend};
use ctoffload_nic_sim::{SimClock, SimConfig, SimThread, Simulator};

const T: Duration = Duration::from_secs(2);

struct Rig {
    dev: Device<SimIo>,
    sim: SimThread,
    wire: Vec<MemPort>,
}

fn rig(cfg: SimConfig) -> Rig {
    let mut sim = Simulator::new(cfg).expect("sim");
    let mut wire = Vec::new();
    for p in 0..2u8 {
        let (dev_end, host_end) = MemPort::pair(64);
        sim.attach_port(p, Box::new(dev_end)).expect("port");
        wire.push(host_end);
    }
    let io = driver_io(&sim, |_, _| ()).expect("sim io");
    let sim = sim.spawn(SimClock::Monotonic);
    let dcfg = DeviceConfig {
        cmd_ring_log2: 6,
        rx_ring_log2: 5,
        tx_ring_log2: 5,
        cmd_timeout_ns: 50_000_000,
        clock: Clock::monotonic(),
        dump_chunk: 64,
        // The model is a thread on a shared 2-core machine: allow scheduling delays
        // beyond the hardware's 10 ms / 100 ms bounds.
        ready_timeout: Duration::from_secs(1),
        enable_timeout: Duration::from_secs(1),
        ..DeviceConfig::default()
    };
    let dev = Device::new(io, dcfg).expect("bring-up");
    Rig { dev, sim, wire }
}

fn key(sport: u16) -> FlowKey {
    FlowKey::ipv4(
        0,
        L4Proto::Tcp,
        0,
        [10, 0, 0, 1].into(),
        sport,
        [10, 0, 0, 2].into(),
        80,
    )
}

fn ins(k: FlowKey) -> FlowCommand {
    FlowCommand::Insert {
        key: k,
        action: FlowAction::forward(1),
    }
}

fn st(r: &CommandResult) -> CompletionStatus {
    match r.outcome {
        Outcome::Status(s) => s,
        o => panic!("no completion: {o:?}"),
    }
}

/// Ethernet + IPv4 (valid header checksum) + TCP, 64 bytes, matching `key(sport)`.
fn tcp_frame(sport: u16, tcp_flags: u8) -> Vec<u8> {
    let mut f = vec![0u8; 64];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let csum = !u16::try_from(sum).expect("folded");
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = tcp_flags;
    f
}

fn wait_event(dev: &mut Device<SimIo>) -> Vec<DeviceEvent> {
    let t0 = Instant::now();
    let mut ev = Vec::new();
    while ev.is_empty() && t0.elapsed() < T {
        dev.poll_events(&mut ev).expect("poll");
        if ev.is_empty() {
            dev.check_health(&mut ev).expect("health");
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    ev
}

#[test]
fn bring_up_reads_capabilities() {
    let r = rig(SimConfig::small());
    let c = r.dev.capabilities();
    assert_eq!(c.flow_capacity, 128);
    assert_eq!(c.buckets_log2, 4);
    assert_eq!(c.ways, 8);
    assert_eq!(c.impl_id, ctoffload_hw_regs::regs::IMPL_ID_SIMULATOR);
    assert_eq!(c.spec.major, 1);
    assert!(r.dev.is_up());
    let _ = RingMaxLog2::from_raw(0);
    drop(r.sim.stop());
}

#[test]
fn batch_commands_and_every_completion_code() {
    let mut r = rig(SimConfig {
        flow_limit: 20,
        ..SimConfig::small()
    });
    let d = &mut r.dev;
    // OK, EXISTS, query, modify, delete, NOT_FOUND in one batch each.
    let res = d
        .execute(
            &[ins(key(1)), ins(key(1)), FlowCommand::Query { key: key(1) }],
            T,
        )
        .expect("batch");
    assert_eq!(st(&res[0]), CompletionStatus::Ok);
    assert_eq!(st(&res[1]), CompletionStatus::Exists);
    assert_eq!(res[1].flow_id, res[0].flow_id);
    assert_eq!(st(&res[2]), CompletionStatus::Ok);
    let id = res[0].flow_id.expect("id");
    let res = d
        .execute(
            &[
                FlowCommand::Modify {
                    flow_id: id,
                    key: key(1),
                    action: FlowAction::forward(0),
                },
                FlowCommand::Delete {
                    flow_id: id,
                    key: key(1),
                },
                FlowCommand::Delete {
                    flow_id: id,
                    key: key(1),
                },
                FlowCommand::Query { key: key(1) },
                FlowCommand::DeleteByKey { key: key(2) },
            ],
            T,
        )
        .expect("batch");
    let s: Vec<_> = res.iter().map(st).collect();
    assert_eq!(
        s,
        [
            CompletionStatus::Ok,
            CompletionStatus::Ok,
            CompletionStatus::NotFound,
            CompletionStatus::NotFound,
            CompletionStatus::NotFound
        ]
    );
    // BAD_DESCRIPTOR: out_port beyond NUM_PORTS, and an unknown opcode.
    let mut raw = CommandDescriptor::nop(0);
    raw.opcode = 99;
    let res = d
        .execute(
            &[
                FlowCommand::Insert {
                    key: key(3),
                    action: FlowAction::forward(7),
                },
                FlowCommand::Raw(raw),
            ],
            T,
        )
        .expect("bad");
    assert!(res.iter().all(|x| st(x) == CompletionStatus::BadDescriptor));
    // BUCKET_FULL: nine keys of one bucket.
    let b0 = bucket_index(key_hash(&key(1000)), 4);
    let same: Vec<_> = (1000..u16::MAX)
        .map(key)
        .filter(|k| bucket_index(key_hash(k), 4) == b0)
        .take(9)
        .collect();
    let cmds: Vec<_> = same.iter().copied().map(ins).collect();
    let res = d.execute(&cmds, T).expect("bucket");
    assert!(res[..8].iter().all(|x| st(x) == CompletionStatus::Ok));
    assert_eq!(st(&res[8]), CompletionStatus::BucketFull);
    // TABLE_FULL: flow_limit 20, 8 installed.
    let cmds: Vec<_> = (2000..2013).map(|p| ins(key(p))).collect();
    let res = d.execute(&cmds, T).expect("full");
    let full = res
        .iter()
        .filter(|x| st(x) == CompletionStatus::TableFull)
        .count();
    let ok = res.iter().filter(|x| st(x) == CompletionStatus::Ok).count();
    assert_eq!(ok + full, 13);
    assert!(full >= 1, "{res:?}");
    // DEVICE_ERROR by fault injection; no effect, retry works.
    r.sim.faults().device_error_next(1);
    let res = r
        .dev
        .execute(
            &[
                FlowCommand::DeleteByKey { key: same[0] },
                FlowCommand::DeleteByKey { key: same[0] },
            ],
            T,
        )
        .expect("err");
    assert_eq!(st(&res[0]), CompletionStatus::DeviceError);
    assert_eq!(st(&res[1]), CompletionStatus::Ok);
    // One doorbell per batch: the simulator saw at most as many CMD doorbells as batches.
    let stats = r.sim.stats();
    assert!(stats.cmd_doorbells <= 7, "{stats:?}");
    drop(r.sim.stop());
}

#[test]
fn counters_with_wrap_and_table_dump() {
    let mut r = rig(SimConfig::small());
    let res = r.dev.execute(&[ins(key(7)), ins(key(8))], T).expect("ins");
    let id = res[0].flow_id.expect("id");
    let mut tr = CounterTracker::new();
    let mut s = Vec::new();
    r.dev.dump_all_counters(&mut s).expect("dump");
    assert_eq!(s.len(), 128);
    assert_eq!(s.iter().filter_map(|x| tr.update(x)).count(), 2);
    // Preload near wrap, pull, send 3 packets, pull: delta 3 across the wrap.
    r.sim.faults().counter_wrap_soon(id.get());
    std::thread::sleep(Duration::from_millis(5));
    s.clear();
    r.dev.dump_counters(id.get(), 1, &mut s).expect("dump");
    tr.update(&s[0]);
    for _ in 0..3 {
        r.wire[0].send(&tcp_frame(7, 0x10)).expect("send");
    }
    let t0 = Instant::now();
    let mut delta = None;
    while t0.elapsed() < T {
        s.clear();
        r.dev.dump_counters(id.get(), 1, &mut s).expect("dump");
        // 2^32 − 1 + 3 packets wraps to 2: take the delta from the final sample only.
        if s[0].counters.packets == 2 {
            delta = tr.update(&s[0]);
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let d = delta.expect("delta");
    assert_eq!(d.packets, 3);
    assert_eq!(d.bytes, 3 * 64);
    assert!(!d.since_insert);
    let t0 = Instant::now();
    let mut fwd = 0;
    while fwd < 3 && t0.elapsed() < T {
        fwd += r.wire[1].drain_vecs().len();
    }
    assert_eq!(fwd, 3, "forwarded to port 1");
    // Table dump reads back both entries.
    let t = r.dev.dump_table().expect("table");
    assert_eq!(t.len(), 2);
    assert!(t.iter().any(|e| e.key == key(8) && e.generation == 1));
    drop(r.sim.stop());
}

/// One `CHANGED` counter dump of slots `[0, 128)`: the slots and packet counts of its
/// packed records, and the range it covered.
fn changed_dump(dev: &mut Device<SimIo>) -> (Vec<(u32, u32)>, usize) {
    assert!(dev.start_changed_counter_dump(0, 64).expect("start"));
    let dump = dev.wait_counter_dump().expect("done");
    assert!(dump.is_packed());
    let records = dump
        .iter()
        .map(|s| {
            assert!(s.valid);
            (s.flow_id.get(), s.counters.packets)
        })
        .collect();
    (records, dump.range_len())
}

#[test]
fn changed_counter_dump_decodes_only_hit_slots() {
    let mut r = rig(SimConfig::small());
    assert!(r.dev.supports_changed_counter_dump());
    // Two entries in the first 64 slots (the dump chunk).
    let mut ids = Vec::new();
    for sport in 7..200u16 {
        let res = r.dev.execute(&[ins(key(sport))], T).expect("ins");
        let id = res[0].flow_id.expect("id");
        if id.get() < 64 && ids.len() < 2 {
            ids.push((sport, id));
        } else {
            r.dev
                .execute(
                    &[FlowCommand::Delete {
                        flow_id: id,
                        key: key(sport),
                    }],
                    T,
                )
                .expect("del");
        }
        if ids.len() == 2 {
            break;
        }
    }
    assert_eq!(ids.len(), 2, "two entries in the first chunk");
    let (records, range) = changed_dump(&mut r.dev);
    assert_eq!((records.len(), range), (0, 64), "nothing hit yet");
    let (sport, id) = ids[1];
    for _ in 0..3 {
        r.wire[0].send(&tcp_frame(sport, 0x10)).expect("send");
    }
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while seen.iter().map(|&(_, p)| p).sum::<u32>() < 3 && t0.elapsed() < T {
        let (records, _) = changed_dump(&mut r.dev);
        for rec in records {
            assert_eq!(rec.0, id.get(), "only the slot that was hit");
            seen.retain(|&(s, _)| s != rec.0);
            seen.push(rec);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(seen, [(id.get(), 3)]);
    let (records, _) = changed_dump(&mut r.dev);
    assert!(records.is_empty(), "reported once");
    drop(r.sim.stop());
}

#[test]
fn exception_rx_and_tx() {
    let mut r = rig(SimConfig::small());
    for i in 0..5u16 {
        r.wire[0].send(&tcp_frame(500 + i, 0x02)).expect("send");
    }
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < 5 && t0.elapsed() < T {
        r.dev
            .rx_poll(16, |m, b| {
                got.push((
                    m.port,
                    m.reason,
                    b.len(),
                    u16::from_be_bytes([b[34], b[35]]),
                ))
            })
            .expect("rx");
    }
    assert_eq!(got.len(), 5);
    assert!(
        got.iter()
            .all(|g| g.0 == 0 && g.1 == Ok(RxReason::Miss) && g.2 == 64)
    );
    assert_eq!(got[4].3, 504);
    // More frames than RX buffers over several polls: buffers are recycled.
    for round in 0..3 {
        // The model latches doorbells at the start of a poll: let it see the
        // reposted RX TAIL before the next burst arrives.
        std::thread::sleep(Duration::from_millis(2));
        for i in 0..20u16 {
            r.wire[0].send(&tcp_frame(i, 0x02)).expect("send");
        }
        let mut n = 0;
        let t0 = Instant::now();
        while n < 20 && t0.elapsed() < T {
            n += r.dev.rx_poll(64, |_, _| {}).expect("rx");
        }
        let regs_ = ctoffload_hw_regs::regs::STAT_RX_NO_BUF;
        assert_eq!(
            n,
            20,
            "round {round}: no_buf {} too_big {} punt {} head {} stats {:?}",
            r.dev.read_register(regs_).expect("r"),
            r.dev
                .read_register(ctoffload_hw_regs::regs::STAT_RX_TOO_BIG)
                .expect("r"),
            r.dev
                .read_register(ctoffload_hw_regs::regs::STAT_PUNT)
                .expect("r"),
            r.dev
                .read_register(ctoffload_hw_regs::regs::RX_HEAD)
                .expect("r"),
            r.sim.stats()
        );
    }
    let frame = tcp_frame(9, 0x10);
    let frames = [
        TxFrame {
            port: 1,
            data: &frame,
        },
        TxFrame {
            port: 0,
            data: &frame[..40],
        },
    ];
    assert_eq!(r.dev.tx_send(&frames).expect("tx"), 2);
    let t0 = Instant::now();
    while r.dev.tx_reap().expect("reap").sent < 2 && t0.elapsed() < T {}
    assert_eq!(r.dev.tx_reap().expect("reap").sent, 2);
    assert_eq!(r.wire[1].recv_vec().expect("port 1"), frame);
    assert_eq!(r.wire[0].recv_vec().expect("port 0").len(), 60, "padded");
    drop(r.sim.stop());
}

fn recovers(r: &mut Rig) {
    r.sim.faults().clear();
    r.dev.reinit().expect("reinit");
    assert!(r.dev.is_up());
    let res = r.dev.execute(&[ins(key(42))], T).expect("after");
    assert!(res[0].is_ok());
}

#[test]
fn fatal_is_reported_and_recovered() {
    let mut r = rig(SimConfig::small());
    r.dev.execute(&[ins(key(1))], T).expect("ins");
    r.sim
        .faults()
        .fatal(FatalCode::Parity, FatalUnit::FlowTable);
    let ev = wait_event(&mut r.dev);
    assert_eq!(
        ev,
        [DeviceEvent::Fatal {
            code: FatalCode::Parity.raw(),
            unit: FatalUnit::FlowTable.raw(),
            addr: 0
        }]
    );
    assert!(!r.dev.is_up());
    recovers(&mut r);
    assert_eq!(r.dev.dump_table().expect("dump").len(), 1, "old flow gone");
    drop(r.sim.stop());
}

#[test]
fn spontaneous_reset_fails_inflight_and_recovers() {
    let mut r = rig(SimConfig::small());
    let before = r.dev.saved_reset_count();
    r.sim.faults().slow_commands(5_000_000);
    let cmds: Vec<_> = (0..20).map(|p| ins(key(p))).collect();
    let s = r.dev.submit(&cmds).expect("submit");
    assert_eq!(s.accepted(), 20);
    r.sim.faults().spontaneous_reset();
    let ev = wait_event(&mut r.dev);
    // RESET_COUNT counts completed resets (docs/device.md 4.7): the driver may see the
    // reset while it is still running (ENABLED = 0, count not yet incremented) or after.
    assert!(
        matches!(ev[..], [DeviceEvent::Reset { count }]
            if count == before || count == before.wrapping_add(1)),
        "{ev:?}"
    );
    let mut out = Vec::new();
    r.dev.reap(&mut out).expect("reap");
    assert!(out.iter().any(|x| x.outcome == Outcome::Aborted), "{out:?}");
    assert_eq!(out.len(), 20, "every command comes back exactly once");
    recovers(&mut r);
    drop(r.sim.stop());
}

#[test]
fn lost_completion_and_command_timeout() {
    let mut r = rig(SimConfig::small());
    r.sim.faults().drop_completions(1);
    let s = r.dev.submit(&[ins(key(1))]).expect("submit");
    let ev = wait_event(&mut r.dev);
    assert_eq!(
        ev,
        [DeviceEvent::CommandTimeout {
            cookie: s.token(0).expect("t").cookie()
        }]
    );
    let mut out = Vec::new();
    r.dev.reap(&mut out).expect("reap");
    assert_eq!(out[0].outcome, Outcome::Aborted);
    recovers(&mut r);
    // A lost completion followed by another command's: the lost insert took effect
    // unseen, so the device goes down and a reset clears the table.
    r.sim.faults().drop_completions(1);
    assert!(r.sim.faults().wait_applied(T));
    let err = r.dev.execute(&[ins(key(2)), ins(key(3))], T);
    assert!(
        matches!(err, Err(DriverError::CompletionLost { .. })),
        "{err:?}"
    );
    assert!(!r.dev.is_up());
    recovers(&mut r);
    let res = r.dev.execute(&[ins(key(2))], T).expect("exec");
    assert!(
        res[0].is_ok(),
        "key 2 was cleared by the reset: {:?}",
        res[0]
    );
    drop(r.sim.stop());
}

#[test]
fn command_hang_becomes_fatal() {
    let mut r = rig(SimConfig::small());
    r.sim.faults().slow_commands(60_000_000);
    r.dev.submit(&[ins(key(1))]).expect("submit");
    let ev = wait_event(&mut r.dev);
    assert!(
        ev.iter().any(
            |e| matches!(e, DeviceEvent::Fatal { code, .. } if *code == FatalCode::CmdHang.raw())
                || matches!(e, DeviceEvent::CommandTimeout { .. })
        ),
        "{ev:?}"
    );
    let mut out = Vec::new();
    r.dev.reap(&mut out).expect("reap");
    assert_eq!(out[0].outcome, Outcome::Aborted);
    recovers(&mut r);
    drop(r.sim.stop());
}

#[test]
fn flr_bring_up() {
    let mut sim = Simulator::new(SimConfig::small()).expect("sim");
    let io = driver_io(&sim, |_, _| ()).expect("io");
    sim.poll(0);
    let th = sim.spawn(SimClock::Monotonic);
    let dev = Device::new(io, DeviceConfig::default()).expect("bring-up");
    assert!(dev.is_up());
    let _ = Le16::new(0);
    drop(th.stop());
}
