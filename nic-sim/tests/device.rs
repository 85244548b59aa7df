//! Bring-up, registers, interrupts, resets and fault injection.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ctoffload_hw_regs::regs::{self, Ctrl, IntCause, Status};
use ctoffload_hw_regs::{
    CommandDescriptor, CompletionStatus as S, FatalCode, FatalUnit, FlowAction,
};
use ctoffload_nic_sim::{SharedRegion, SimClock, SimConfig, Simulator};
use std::time::Duration;

#[test]
fn reset_values_and_capabilities() {
    let h = Host::small();
    assert_eq!(h.rd(regs::MAGIC), 0x4354_4F31);
    assert_eq!(h.rd(regs::SPEC_VERSION), 0x0001_0001);
    assert_eq!(h.rd(regs::IMPL_ID), 0x5349_4D31);
    assert_eq!(h.rd(regs::FEATURES), 0x7FF);
    assert_eq!(h.rd(regs::FLOW_CAPACITY), 128);
    assert_eq!(h.rd(regs::BUCKETS_LOG2), 4);
    assert_eq!(h.rd(regs::WAYS), 8);
    assert_eq!(h.rd(regs::COUNTER_COUNT), 128);
    assert_eq!(h.rd(regs::NUM_PORTS), 2);
    assert_eq!(h.rd(regs::RING_MAX_LOG2), 0x0C0C_1010);
    assert_eq!(h.rd(regs::TIMESTAMP_FREQ), 1_000_000_000);
    assert_eq!(h.rd(regs::MAX_FRAME_LEN), 2048);
    assert_eq!(h.rd(regs::STATUS), Status::READY.bits());
    assert_eq!(h.rd(regs::CTRL), 0);
    assert_eq!(h.rd(regs::INT_MASK), 7);
    assert_eq!(h.rd(regs::INT_CAUSE), 0);
    assert_eq!(h.rd(regs::RESET_COUNT), 0);
    let d = Simulator::new(SimConfig::default()).unwrap();
    let bar = d.bar();
    assert_eq!(bar.read_u32(0x14).unwrap(), 1 << 20);
    assert_eq!(bar.read_u32(0x18).unwrap(), 17);
}

#[test]
fn timestamp_is_one_64_bit_word_and_ro_writes_are_ignored() {
    let mut h = Host::small();
    h.now = (5u64 << 32) + 10;
    h.poll();
    assert_eq!(h.bar.load_u64_acquire(0x70).unwrap(), (5u64 << 32) + 110);
    h.wr(regs::MAGIC, 0);
    h.wr(regs::STATUS, 0xFF);
    h.wr(regs::FLOW_COUNT, 9);
    h.poll();
    assert_eq!(h.rd(regs::MAGIC), 0x4354_4F31);
    assert_eq!(h.rd(regs::STATUS), 1);
    assert_eq!(h.rd(regs::FLOW_COUNT), 0);
}

#[test]
fn ring_validation_failures_name_the_ring() {
    for (ring, unit) in [
        (regs::CMD_RING, FatalUnit::CmdRing),
        (regs::CPL_RING, FatalUnit::CplRing),
        (regs::RX_RING, FatalUnit::RxRing),
        (regs::TX_RING, FatalUnit::TxRing),
    ] {
        for breakage in 0..3 {
            let mut h = Host::small();
            h.program_rings();
            match breakage {
                0 => h.wr(ring.size_log2, 1),
                1 => h.wr(ring.base_lo, h.rd(ring.base_lo) + 64),
                _ => h.wr(ring.size_log2, 17),
            }
            h.wr(regs::CTRL, Ctrl::ENABLE.bits());
            h.poll();
            assert!(h.status().contains(Status::FATAL), "{unit:?} {breakage}");
            assert_eq!(h.rd(regs::FATAL_CODE), FatalCode::RingConfig.raw());
            assert_eq!(h.rd(regs::FATAL_UNIT), unit.raw(), "breakage {breakage}");
        }
    }
    // CPL smaller than CMD.
    let mut h = Host::small();
    h.sizes.cpl = 3;
    h.program_rings();
    h.wr(regs::CTRL, 1);
    h.poll();
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::CplRing.raw());
    // Unprogrammed rings.
    let mut h = Host::small();
    h.wr(regs::CTRL, 1);
    h.poll();
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::CmdRing.raw());
    // A soft reset recovers.
    h.wr(regs::CTRL, Ctrl::SOFT_RESET.bits());
    h.poll();
    assert_eq!(h.rd(regs::STATUS), Status::READY.bits());
    assert_eq!(h.rd(regs::CTRL), 0, "SOFT_RESET self-clears");
    assert_eq!(h.rd(regs::RESET_COUNT), 1);
    assert_eq!(h.rd(regs::FATAL_CODE), 0);
}

#[test]
fn ring_register_write_while_enabled_and_bad_doorbell() {
    let mut h = Host::up(SimConfig::small());
    let lo = h.rd(regs::TX_BASE_LO);
    h.wr(regs::TX_BASE_LO, lo + 0x1000);
    h.poll();
    assert_eq!(h.rd(regs::FATAL_CODE), FatalCode::RingConfig.raw());
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::TxRing.raw());
    assert_eq!(h.rd(regs::TX_BASE_LO), lo, "the write had no effect");

    let mut h = Host::up(SimConfig::small());
    h.wr(regs::CMD_TAIL, 16);
    h.poll();
    assert_eq!(h.rd(regs::FATAL_CODE), FatalCode::BadDoorbell.raw());
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::CmdRing.raw());

    let mut h = Host::up(SimConfig::small());
    h.wr(regs::CPL_HEAD, 1);
    h.poll();
    assert_eq!(
        h.rd(regs::FATAL_CODE),
        FatalCode::BadDoorbell.raw(),
        "CPL HEAD past TAIL"
    );
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::CplRing.raw());
    // Fatal: writes other than SOFT_RESET are ignored.
    h.wr(regs::INT_MASK, 0x1F);
    h.wr(regs::CTRL, 0);
    h.poll();
    assert_eq!(h.rd(regs::INT_MASK), 0);
    assert_eq!(h.rd(regs::CTRL), 1);
}

#[test]
fn enable_is_sticky() {
    let mut h = Host::up(SimConfig::small());
    h.wr(regs::CTRL, 0);
    h.poll();
    assert!(h.status().contains(Status::ENABLED));
    assert_eq!(h.rd(regs::CTRL), 1);
}

#[test]
fn interrupts_vectors_masking_and_w1c() {
    let mut h = Host::up(SimConfig::small());
    h.drain_irqs();
    h.cmd(CommandDescriptor::nop(1));
    assert_eq!(h.irq(0), Some(1), "CMD_CPL on vector 0");
    assert_eq!(h.rd(regs::INT_CAUSE) & 1, 1);
    // Cause still set: no second message.
    h.cmd(CommandDescriptor::nop(2));
    assert_eq!(h.irq(0), None);
    // Clear (W1C via fetch_and), next completion signals again.
    h.w1c(regs::INT_CAUSE, IntCause::CMD_CPL.bits());
    assert_eq!(h.rd(regs::INT_CAUSE) & 1, 0);
    h.cmd(CommandDescriptor::nop(3));
    assert_eq!(h.irq(0), Some(1));
    // Masked: cause set, no message; unmasking with the cause set sends one.
    h.w1c(regs::INT_CAUSE, 0x1F);
    h.wr(regs::INT_MASK, IntCause::CMD_CPL.bits());
    h.poll();
    h.cmd(CommandDescriptor::nop(4));
    assert_eq!(h.irq(0), None, "masked");
    assert_eq!(h.rd(regs::INT_CAUSE) & 1, 1, "cause set regardless of mask");
    h.wr(regs::INT_MASK, 0);
    h.poll();
    assert_eq!(
        h.irq(0),
        Some(1),
        "unmask of a pending cause sends a message"
    );
    assert_eq!(h.irq(1), None);
    assert_eq!(h.irq(2), None);
}

#[test]
fn soft_reset_flr_and_spontaneous_reset_lose_the_table() {
    let mut h = Host::up(SimConfig::small());
    h.insert(&udp4(1, 2), &FlowAction::forward(1));
    h.drain_irqs();
    h.wr(regs::CTRL, Ctrl::SOFT_RESET.bits());
    h.poll();
    assert_eq!(h.rd(regs::RESET_COUNT), 1);
    assert_eq!(h.rd(regs::FLOW_COUNT), 0);
    assert_eq!(h.rd(regs::INT_CAUSE), IntCause::RESET_DONE.bits());
    assert_eq!(h.rd(regs::INT_MASK), 7);
    assert_eq!(h.rd(regs::CMD_BASE_LO), 0, "rings unconfigured");
    assert_eq!(h.irq(2), Some(1), "RESET_DONE on vector 2");

    // Bring up again, install, FLR.
    let mut h2 = Host::up(SimConfig::small());
    h2.insert(&udp4(1, 2), &FlowAction::forward(1));
    h2.sim.flr(h2.now);
    assert_eq!(h2.rd(regs::RESET_COUNT), 1);
    assert_eq!(h2.rd(regs::STATUS), Status::READY.bits());
    assert_eq!(h2.rd(regs::FLOW_COUNT), 0);

    // Spontaneous reset with a delay: RESETTING, frames dropped, then READY.
    let mut h3 = Host::up(SimConfig {
        reset_delay_ns: 1_000_000,
        ..SimConfig::small()
    });
    h3.insert(&udp4(1, 2), &FlowAction::forward(1));
    h3.drain_irqs();
    h3.sim.faults().spontaneous_reset();
    h3.poll();
    assert_eq!(h3.rd(regs::STATUS), Status::RESETTING.bits());
    h3.inject(0, &[0u8; 64]);
    h3.poll();
    assert_eq!(
        h3.rd(regs::STAT_WIRE_RX),
        0,
        "frames while resetting are not counted"
    );
    h3.now += 2_000_000;
    h3.poll();
    assert_eq!(h3.rd(regs::STATUS), Status::READY.bits());
    assert_eq!(h3.rd(regs::RESET_COUNT), 1);
    assert_eq!(h3.rd(regs::FLOW_COUNT), 0);
    assert_eq!(h3.irq(2), Some(1));
    // The host re-runs bring-up: the table is empty, the phase restarts at 1.
    h3.cmd_tail = 0;
    h3.cpl_head = 0;
    h3.cpl_phase = true;
    h3.rx_tail = 0;
    h3.rx_head = 0;
    h3.tx_tail = 0;
    h3.tx_head = 0;
    h3.bring_up();
    let c = h3.cmd(CommandDescriptor::flow_query(1, &udp4(1, 2)));
    assert_eq!(c.status().unwrap(), S::NotFound);
    assert!(c.phase());
}

#[test]
fn fault_drop_completions_and_device_error() {
    let mut h = Host::up(SimConfig::small());
    h.sim.faults().drop_completions(1);
    h.submit(&[CommandDescriptor::flow_insert(
        1,
        &udp4(1, 2),
        &FlowAction::forward(0),
    )]);
    h.poll_n(3);
    assert!(h.reap().is_empty(), "command timeout: no completion");
    assert_eq!(h.rd(regs::CMD_HEAD), 1, "consumed");
    let c = h.cmd(CommandDescriptor::nop(2));
    assert_eq!(c.cookie.get(), 2);

    h.sim.faults().device_error_next(2);
    let k = udp4(3, 4);
    let c = h.insert(&k, &FlowAction::forward(0));
    assert_eq!(c.status().unwrap(), S::DeviceError);
    assert_eq!(c.flow_id(), None);
    let c = h.cmd(CommandDescriptor::flow_query(5, &k));
    assert_eq!(c.status().unwrap(), S::DeviceError);
    let c = h.cmd(CommandDescriptor::flow_query(6, &k));
    assert_eq!(
        c.status().unwrap(),
        S::NotFound,
        "DEVICE_ERROR had no effect"
    );
}

#[test]
fn wait_applied_reports_when_the_device_took_the_faults() {
    let mut h = Host::up(SimConfig::small());
    let f = h.sim.faults();
    assert!(f.wait_applied(Duration::ZERO), "nothing armed");
    f.device_error_next(1);
    assert!(
        !f.wait_applied(Duration::from_millis(1)),
        "no poll has run: not applied"
    );
    h.poll();
    assert!(f.wait_applied(Duration::ZERO));
    let c = h.insert(&udp4(7, 8), &FlowAction::forward(0));
    assert_eq!(c.status().unwrap(), S::DeviceError);
}

#[test]
fn fault_table_full_at_fill() {
    let mut h = Host::up(SimConfig::small());
    h.sim.faults().table_full_at(3);
    let mut ok = 0;
    let mut sport = 1;
    while ok < 3 {
        if h.insert(&udp4(sport, 1), &FlowAction::forward(0))
            .status()
            .unwrap()
            == S::Ok
        {
            ok += 1;
        }
        sport += 1;
    }
    assert_eq!(
        h.insert(&udp4(500, 1), &FlowAction::forward(0))
            .status()
            .unwrap(),
        S::TableFull
    );
    assert_eq!(h.rd(regs::FLOW_LIMIT), 128, "register unchanged");
    h.sim.faults().clear();
    assert_eq!(
        h.insert(&udp4(500, 1), &FlowAction::forward(0))
            .status()
            .unwrap(),
        S::Ok
    );
}

#[test]
fn fault_fatal_and_frames_dropped() {
    let mut h = Host::up(SimConfig::small());
    h.drain_irqs();
    h.sim
        .faults()
        .fatal(FatalCode::Parity, FatalUnit::FlowTable);
    h.poll();
    assert!(h.status().contains(Status::FATAL));
    assert_eq!(h.rd(regs::FATAL_CODE), 4);
    assert_eq!(h.rd(regs::FATAL_UNIT), 8);
    assert_eq!(h.irq(2), Some(1));
    h.inject(0, &[0u8; 64]);
    h.poll();
    assert_eq!(h.rd(regs::STAT_DISABLED_DROP), 1);
    // The first fatal error is kept.
    h.sim.faults().fatal(FatalCode::Internal, FatalUnit::None);
    h.poll();
    assert_eq!(h.rd(regs::FATAL_CODE), 4);
}

#[test]
fn fault_slow_commands_and_watchdog() {
    let mut h = Host::up(SimConfig::small());
    h.sim.faults().slow_commands(10_000);
    h.poll();
    h.submit(&[CommandDescriptor::nop(1), CommandDescriptor::nop(2)]);
    h.poll();
    assert!(h.reap().is_empty(), "still busy");
    h.now += 10_000;
    h.poll();
    assert_eq!(h.reap().len(), 1, "one command per delay");
    h.now += 10_000;
    h.poll();
    assert_eq!(h.reap().len(), 1);

    h.sim.faults().slow_commands(60_000_000);
    h.poll();
    h.submit(&[CommandDescriptor::nop(3)]);
    h.poll();
    h.now += 50_000_000;
    h.poll();
    assert_eq!(h.rd(regs::FATAL_CODE), FatalCode::CmdHang.raw());
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::CmdProcessor.raw());
    assert!(h.reap().is_empty());
    assert!(h.sim.stats().faults_fired >= 1);
}

#[test]
fn background_thread_and_process_style_second_mapping() {
    let name = format!("ctoffload-sim-test-{}", std::process::id());
    let sim = Simulator::new(SimConfig {
        shm_name: Some(name.clone()),
        ..SimConfig::small()
    })
    .unwrap();
    // A second, independent mapping of the same /dev/shm file (what another process does).
    let other = SharedRegion::open_shm(&name).unwrap();
    assert_eq!(other.read_u32(0).unwrap(), 0x4354_4F31);
    let t = sim.spawn(SimClock::Monotonic);
    other
        .store_u32_release(0x40, Ctrl::SOFT_RESET.bits())
        .unwrap();
    let start = std::time::Instant::now();
    while other.load_u32_acquire(0x58).unwrap() != 1 {
        assert!(
            start.elapsed().as_secs() < 5,
            "reset seen through the second mapping"
        );
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    // TIMESTAMP advances (the thread updates it each poll; on a busy machine a poll
    // can come late, so wait for it, bounded).
    let ts1 = other.load_u64_acquire(0x70).unwrap();
    while other.load_u64_acquire(0x70).unwrap() <= ts1 {
        assert!(start.elapsed().as_secs() < 5, "TIMESTAMP advances");
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    t.request_flr();
    while other.load_u32_acquire(0x58).unwrap() != 2 {
        assert!(start.elapsed().as_secs() < 5);
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    // The thread publishes its statistics after the poll that completed the reset, so
    // they may lag the register by one poll.
    while t.stats().resets < 2 {
        assert!(
            start.elapsed().as_secs() < 5,
            "reset counted in the statistics"
        );
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    let sim = t.stop();
    assert_eq!(sim.stats().resets, 2);
}

/// A UDP frame matching `udp4(1, 2)` on port 0.
fn hit_frame() -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
        .udp(1, 2)
        .write(&mut v, &[0u8; 32])
        .unwrap();
    v
}

/// Section 17.5: `CTRL.DETACH` stops the rings and forgets them, keeps the table and
/// its counters forwarding (punts are dropped), and a new bring-up without reset
/// enables the device again with the table intact.
#[test]
fn detach_keeps_the_table_forwarding_and_reattach_finds_it() {
    let mut h = Host::up(SimConfig::small());
    let slot = h
        .insert(&udp4(1, 2), &FlowAction::forward(1))
        .flow_id()
        .unwrap();
    // DETACH while not enabled does nothing.
    let mut idle = Host::small();
    idle.wr(regs::CTRL, Ctrl::DETACH.bits());
    idle.poll();
    assert_eq!(idle.status(), Status::READY);

    h.wr(regs::CTRL, Ctrl::DETACH.bits());
    h.poll();
    assert_eq!(h.status(), Status::READY | Status::DETACHED);
    assert_eq!(h.rd(regs::CTRL), 0, "DETACH self-clears, ENABLE is cleared");
    assert_eq!(h.rd(regs::CMD_BASE_LO), 0, "rings forgotten");
    assert_eq!(h.rd(regs::RESET_COUNT), 0, "no reset");
    assert_eq!(h.rd(regs::FLOW_COUNT), 1);
    // Hits are forwarded and counted; what would be punted is dropped.
    h.inject(0, &hit_frame());
    h.inject(0, &[0u8; 64]);
    h.poll();
    assert_eq!(h.out(1).len(), 1);
    assert_eq!(h.rd(regs::STAT_HIT), 1);
    assert_eq!(h.rd(regs::STAT_DISABLED_DROP), 1);
    // A new driver: rings programmed from scratch, enabled, no reset.
    h.cmd_tail = 0;
    h.cpl_head = 0;
    h.cpl_phase = true;
    h.rx_tail = 0;
    h.rx_head = 0;
    h.tx_tail = 0;
    h.tx_head = 0;
    h.bring_up();
    assert_eq!(h.status(), Status::READY | Status::ENABLED);
    let c = h.cmd(CommandDescriptor::flow_query(1, &udp4(1, 2)));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.flow_id(), Some(slot));
    assert_eq!(c.counters().packets, 1, "counters kept across the detach");
    assert!(c.phase(), "the CPL phase restarted at 1");
}
