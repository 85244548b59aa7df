//! Command ring, completion ring and flow-table behaviour, driven through raw memory.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use ctoffload_hw_regs::regs;
use ctoffload_hw_regs::{
    CommandDescriptor, CompletionStatus as S, CounterRecord, FatalCode, FatalUnit, FlowAction,
    FlowId, FlowKey, Iova, L4Proto, Opcode, TableDumpRecord,
};
use ctoffload_nic_sim::SimConfig;

fn fid(v: u32) -> FlowId {
    FlowId::new(v).unwrap()
}

#[test]
fn nop_and_cookie_echo() {
    let mut h = Host::up(SimConfig::small());
    let c = h.cmd(CommandDescriptor::nop(0xDEAD_BEEF));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.cookie.get(), 0xDEAD_BEEF);
    assert_eq!(c.opcode, 0);
    assert_eq!(c.flow_id(), None);
    assert!(c.phase());
}

#[test]
fn insert_exists_query_modify_delete() {
    let mut h = Host::up(SimConfig::small());
    let k = udp4(1000, 2000);
    let a = FlowAction::forward(1);
    let c = h.insert(&k, &a);
    assert_eq!(c.status().unwrap(), S::Ok);
    let id = c.flow_id().unwrap();
    assert_eq!(c.generation, 1);
    let bucket = ctoffload_hw_regs::bucket_index(ctoffload_hw_regs::key_hash(&k), 4);
    assert_eq!(id.get(), bucket * 8, "lowest way of the key's bucket");
    assert_eq!(h.rd(regs::FLOW_COUNT), 1);

    let c = h.insert(&k, &FlowAction::forward(0));
    assert_eq!(c.status().unwrap(), S::Exists);
    assert_eq!(c.flow_id(), Some(id));
    assert_eq!(c.generation, 1);

    let c = h.cmd(CommandDescriptor::flow_query(9, &k));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.flow_id(), Some(id));
    assert_eq!(c.count.get(), 0);

    let c = h.cmd(CommandDescriptor::flow_modify(
        10,
        id,
        &k,
        &FlowAction::discard(),
    ));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.generation, 1);

    // Modify/delete by id with another key: NOT_FOUND.
    let other = udp4(1, 2);
    let c = h.cmd(CommandDescriptor::flow_modify(11, id, &other, &a));
    assert_eq!(c.status().unwrap(), S::NotFound);
    assert_eq!(c.flow_id(), None);
    let c = h.cmd(CommandDescriptor::flow_delete(12, id, &other));
    assert_eq!(c.status().unwrap(), S::NotFound);

    let c = h.cmd(CommandDescriptor::flow_delete(13, id, &k));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.flow_id(), Some(id));
    assert_eq!(h.rd(regs::FLOW_COUNT), 0);
    let c = h.cmd(CommandDescriptor::flow_query(14, &k));
    assert_eq!(c.status().unwrap(), S::NotFound);
    let c = h.cmd(CommandDescriptor::flow_delete_by_key(15, &k));
    assert_eq!(c.status().unwrap(), S::NotFound);

    // Reinsert: same slot, generation 2. Delete by key.
    let c = h.insert(&k, &a);
    assert_eq!((c.flow_id(), c.generation), (Some(id), 2));
    let c = h.cmd(CommandDescriptor::flow_delete_by_key(16, &k));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.generation, 2);
}

#[test]
fn bucket_full_and_table_full() {
    let mut h = Host::up(SimConfig::small());
    let keys = colliding_keys(4, 5, 9);
    for (i, k) in keys.iter().take(8).enumerate() {
        let c = h.insert(k, &FlowAction::forward(0));
        assert_eq!(c.status().unwrap(), S::Ok);
        assert_eq!(
            c.flow_id().unwrap().get(),
            5 * 8 + u32::try_from(i).unwrap()
        );
    }
    let c = h.insert(&keys[8], &FlowAction::forward(0));
    assert_eq!(c.status().unwrap(), S::BucketFull);
    assert_eq!(c.flow_id(), None);

    // FLOW_LIMIT = 10: TABLE_FULL checked before BUCKET_FULL.
    let mut h = Host::up(SimConfig {
        flow_limit: 10,
        ..SimConfig::small()
    });
    assert_eq!(h.rd(regs::FLOW_LIMIT), 10);
    let mut installed = 0;
    let mut sport = 1;
    while installed < 10 {
        let c = h.insert(&udp4(sport, 7), &FlowAction::forward(0));
        sport += 1;
        if c.status().unwrap() == S::Ok {
            installed += 1;
        }
    }
    let c = h.insert(&udp4(sport, 7), &FlowAction::forward(0));
    assert_eq!(c.status().unwrap(), S::TableFull);
    // Full capacity of a 2^0-bucket table: 8 slots.
    let mut h = Host::up(SimConfig {
        buckets_log2: 0,
        flow_limit: 8,
        ..SimConfig::small()
    });
    assert_eq!(h.rd(regs::FLOW_CAPACITY), 8);
    for p in 0..8 {
        assert_eq!(
            h.insert(&udp4(p, 1), &FlowAction::forward(0))
                .status()
                .unwrap(),
            S::Ok
        );
    }
    let c = h.insert(&udp4(99, 1), &FlowAction::forward(0));
    assert_eq!(c.status().unwrap(), S::TableFull);
}

fn bad(h: &mut Host, d: CommandDescriptor, what: &str) {
    let c = h.cmd(d);
    assert_eq!(c.status().unwrap(), S::BadDescriptor, "{what}");
    assert_eq!(c.flow_id(), None, "{what}");
}

#[test]
fn bad_descriptor_rules() {
    let mut h = Host::up(SimConfig::small());
    let k = udp4(1, 2);
    let a = FlowAction::forward(0);
    let ins = CommandDescriptor::flow_insert(1, &k, &a);

    let mut d = CommandDescriptor::nop(1);
    d.opcode = 7;
    let c = h.cmd(d);
    assert_eq!(c.status().unwrap(), S::BadDescriptor);
    assert_eq!(c.opcode, 7, "unknown opcode echoed");

    let mut d = ins;
    d.flags = 2;
    bad(&mut h, d, "reserved flag");
    let mut d = ins;
    d.flags = 1;
    bad(&mut h, d, "BY_KEY on insert");
    let mut d = ins;
    d.reserved0 = ctoffload_hw_regs::Le16::new(1);
    bad(&mut h, d, "reserved0");
    let mut d = ins;
    d.flow_id = ctoffload_hw_regs::Le32::new(3);
    bad(&mut h, d, "flow_id on insert");
    let mut d = ins;
    d.count = ctoffload_hw_regs::Le32::new(3);
    bad(&mut h, d, "count on insert");
    let mut d = CommandDescriptor::nop(1);
    d.operand[5] = 1;
    bad(&mut h, d, "NOP operand");

    // Keys.
    let mut kk = k;
    kk.kind = 3;
    bad(&mut h, CommandDescriptor::flow_insert(1, &kk, &a), "kind");
    let mut kk = k;
    kk.port = 2;
    bad(&mut h, CommandDescriptor::flow_insert(1, &kk, &a), "port");
    let mut kk = k;
    kk.proto = 2;
    bad(&mut h, CommandDescriptor::flow_insert(1, &kk, &a), "proto");
    let mut kk = k;
    kk.proto = L4Proto::Icmpv6.raw();
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &kk, &a),
        "ICMPv6 with IPv4",
    );
    let mut kk = k;
    kk.flags = 1;
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &kk, &a),
        "key flags",
    );
    let mut kk = k;
    kk.zone = ctoffload_hw_regs::Le16::new(4096);
    bad(&mut h, CommandDescriptor::flow_insert(1, &kk, &a), "zone");
    let mut kk = k;
    kk.reserved[2] = 1;
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &kk, &a),
        "key reserved",
    );
    let mut kk = k;
    kk.src_addr[7] = 1;
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &kk, &a),
        "IPv4 addr bytes 4-15",
    );
    let icmp = FlowKey::ipv4(
        0,
        L4Proto::Icmp,
        0,
        [1, 1, 1, 1].into(),
        5,
        [2, 2, 2, 2].into(),
        0x0300,
    );
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &icmp, &a),
        "ICMP non-echo",
    );

    // Actions.
    let mut aa = a;
    aa.flags = ctoffload_hw_regs::Le32::new(1 << 7);
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "action reserved flag",
    );
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &FlowAction::forward(2)),
        "out_port",
    );
    let mut aa = a;
    aa.reserved0 = 1;
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "action reserved0",
    );
    let mut aa = a;
    aa.reserved1[9] = 1;
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "action reserved1",
    );
    let mut aa = a;
    aa.new_src_mac = [1; 6];
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "src mac without flag",
    );
    let mut aa = a;
    aa.new_dst_port = ctoffload_hw_regs::Le16::new(5);
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "dnat port without flag",
    );
    let aa = a.with_snat("10::1".parse().unwrap(), 5);
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "IPv6 address for IPv4 key",
    );
    let aa = FlowAction::discard().with_dec_ttl();
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "DROP with DEC_TTL",
    );
    let mut aa = FlowAction::discard();
    aa.out_port = 1;
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &k, &aa),
        "DROP with out_port",
    );
    let icmp = FlowKey::ipv4(
        0,
        L4Proto::Icmp,
        0,
        [1, 1, 1, 1].into(),
        5,
        [2, 2, 2, 2].into(),
        0x0800,
    );
    let aa = a
        .with_snat([3, 3, 3, 3].into(), 6)
        .with_dnat([4, 4, 4, 4].into(), 7);
    bad(
        &mut h,
        CommandDescriptor::flow_insert(1, &icmp, &aa),
        "ICMP two ids",
    );

    // Delete / modify / query field rules.
    let mut d = CommandDescriptor::flow_delete(1, fid(0), &k);
    d.operand[60] = 1;
    bad(&mut h, d, "delete with action");
    bad(
        &mut h,
        CommandDescriptor::flow_delete(1, fid(128), &k),
        "delete id >= capacity",
    );
    bad(
        &mut h,
        CommandDescriptor::flow_modify(1, fid(128), &k, &a),
        "modify id >= capacity",
    );
    let mut d = CommandDescriptor::flow_delete_by_key(1, &k);
    d.flow_id = ctoffload_hw_regs::Le32::new(1);
    bad(&mut h, d, "delete by key with flow_id");
    let mut d = CommandDescriptor::flow_query(1, &k);
    d.flow_id = ctoffload_hw_regs::Le32::new(1);
    bad(&mut h, d, "query with flow_id");

    // Dumps.
    let buf = Iova::new(Host::iova(DUMP_OFF));
    bad(
        &mut h,
        CommandDescriptor::counter_dump(1, fid(0), 0, buf),
        "count 0",
    );
    bad(
        &mut h,
        CommandDescriptor::counter_dump(1, fid(100), 29, buf),
        "range",
    );
    bad(
        &mut h,
        CommandDescriptor::table_dump(1, fid(0), 1, Iova::new(Host::iova(DUMP_OFF + 32))),
        "misaligned",
    );
    let mut d = CommandDescriptor::table_dump(1, fid(0), 1, buf);
    d.operand[20] = 1;
    bad(&mut h, d, "dump reserved");
    let mut d = CommandDescriptor::table_dump(1, fid(0), 1, buf);
    d.count = ctoffload_hw_regs::Le32::new(u32::MAX);
    d.flow_id = ctoffload_hw_regs::Le32::new(2);
    bad(&mut h, d, "overflowing range");
    assert_eq!(h.rd(regs::FLOW_COUNT), 0, "no bad command had an effect");
}

#[test]
fn batch_per_doorbell_and_phase_wrap() {
    let mut h = Host::up(SimConfig::small());
    let before = h.sim.stats().cmd_doorbells;
    // 40 commands in batches of 10 over a 16-entry ring: the phase flips twice.
    for batch in 0..4u32 {
        let descs: Vec<_> = (0..10)
            .map(|i| CommandDescriptor::nop(batch * 10 + i))
            .collect();
        h.submit(&descs);
        h.poll();
        let c = h.reap();
        assert_eq!(c.len(), 10, "whole batch completed in one poll");
        for (i, c) in c.iter().enumerate() {
            assert_eq!(
                c.cookie.get(),
                batch * 10 + u32::try_from(i).unwrap(),
                "in order"
            );
        }
    }
    assert_eq!(h.sim.stats().cmd_doorbells - before, 4);
    assert_eq!(h.sim.stats().completions, 40);
    assert_eq!(h.rd(regs::CMD_HEAD), 40 % 16);
    assert_eq!(h.rd(regs::CPL_TAIL), 40 % 16);
}

#[test]
fn cpl_ring_full_stalls_until_head_moves() {
    let mut h = Host::new(SimConfig::small());
    h.sizes = Sizes {
        cmd: 4,
        cpl: 4,
        rx: 4,
        tx: 4,
    };
    h.bring_up();
    // 15 commands fill the 16-entry CPL ring (N-1); do not ring CPL HEAD.
    let descs: Vec<_> = (0..15).map(CommandDescriptor::nop).collect();
    h.submit(&descs);
    h.poll();
    assert_eq!(h.rd(regs::CPL_TAIL), 15);
    // Reap without ringing HEAD, then submit 3 more: the device must stall.
    let first = {
        let saved = h.cpl_head;
        let c = h.reap();
        // Undo the HEAD doorbell of reap(): write the old value back.
        h.wr(regs::CPL_HEAD, saved);
        c
    };
    assert_eq!(first.len(), 15);
    h.poll();
    h.submit(&[
        CommandDescriptor::nop(100),
        CommandDescriptor::nop(101),
        CommandDescriptor::nop(102),
    ]);
    h.poll_n(3);
    assert_eq!(h.rd(regs::CPL_TAIL), 15, "stalled on a full CPL ring");
    assert_eq!(h.rd(regs::CMD_HEAD), 15);
    // Release the slots: the three complete.
    h.wr(regs::CPL_HEAD, h.cpl_head);
    h.poll();
    let c = h.reap();
    assert_eq!(
        c.iter().map(|c| c.cookie.get()).collect::<Vec<_>>(),
        [100, 101, 102]
    );
    assert!(!h.status().contains(regs::Status::FATAL));
}

#[test]
fn dumps_write_records() {
    let mut h = Host::up(SimConfig::small());
    let k = udp4(1000, 2000);
    let a = FlowAction::forward(1).with_dst_mac([2, 0, 0, 0, 0, 9]);
    let id = h.insert(&k, &a).flow_id().unwrap();
    let buf = Iova::new(Host::iova(DUMP_OFF));
    h.dma.fill(DUMP_OFF, 128 * 128, 0xAA).unwrap();
    let c = h.cmd(CommandDescriptor::table_dump(5, fid(0), 128, buf));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!((c.flow_id(), c.count.get()), (Some(fid(0)), 128));
    for slot in 0..128u32 {
        let mut b = [0u8; 128];
        h.dma
            .read_bytes(DUMP_OFF + u64::from(slot) * 128, &mut b)
            .unwrap();
        let r = TableDumpRecord::from_bytes(&b);
        assert_eq!(r.flow_id.get(), slot);
        if slot == id.get() {
            assert!(r.valid());
            assert_eq!(r.generation(), 1);
            assert_eq!(r.key, k);
            assert_eq!(r.action, a);
        } else {
            assert!(!r.valid());
            assert_eq!(b[4..], [0u8; 124], "empty slot record is zero");
        }
    }
    h.sim.faults().preload_counters(id.get(), 7, 700);
    h.poll();
    let c = h.cmd(CommandDescriptor::counter_dump(6, id, 2, buf));
    assert_eq!(c.status().unwrap(), S::Ok);
    let mut b = [0u8; 32];
    h.dma.read_bytes(DUMP_OFF, &mut b).unwrap();
    let r = CounterRecord::from_bytes(&b);
    assert_eq!(
        (r.flow_id.get(), r.valid(), r.generation()),
        (id.get(), true, 1)
    );
    assert_eq!(
        (r.packets.get(), r.bytes.get(), r.last_hit.get()),
        (7, 700, 0)
    );
    // A deleted slot keeps its generation, VALID = 0.
    h.cmd(CommandDescriptor::flow_delete(7, id, &k));
    h.cmd(CommandDescriptor::counter_dump(8, id, 1, buf));
    h.dma.read_bytes(DUMP_OFF, &mut b).unwrap();
    let r = CounterRecord::from_bytes(&b);
    assert_eq!((r.valid(), r.generation(), r.packets.get()), (false, 1, 0));
}

#[test]
fn dump_to_unmapped_iova_is_fatal_dma_error() {
    let mut h = Host::up(SimConfig::small());
    let bad_iova = 0x9000_0000u64;
    h.submit(&[CommandDescriptor::counter_dump(
        1,
        fid(0),
        4,
        Iova::new(bad_iova),
    )]);
    h.poll();
    assert!(
        h.reap().is_empty(),
        "no completion for the faulting command"
    );
    assert!(h.status().contains(regs::Status::FATAL));
    assert!(!h.status().contains(regs::Status::ENABLED));
    assert_eq!(h.rd(regs::FATAL_CODE), FatalCode::DmaError.raw());
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::DumpBuffer.raw());
    assert_eq!(h.rd(regs::FATAL_ADDR_LO), 0x9000_0000);
    assert_eq!(h.rd(regs::FATAL_ADDR_HI), 0);
    assert_eq!(h.irq(2), Some(1), "FATAL on vector 2");
    // Further commands are not processed.
    h.submit(&[CommandDescriptor::nop(2)]);
    h.poll();
    assert!(h.reap().is_empty());
}

#[test]
fn cmd_ring_unmapped_is_fatal() {
    let mut h = Host::up(SimConfig::small());
    h.sim.iommu().unmap(DMA_IOVA, DMA_SIZE).unwrap();
    h.submit(&[CommandDescriptor::nop(1)]);
    h.poll();
    assert_eq!(h.rd(regs::FATAL_CODE), FatalCode::DmaError.raw());
    assert_eq!(h.rd(regs::FATAL_UNIT), FatalUnit::CmdRing.raw());
    assert_eq!(u64::from(h.rd(regs::FATAL_ADDR_LO)), Host::iova(CMD_OFF));
}

#[test]
fn query_and_delete_return_counters() {
    let mut h = Host::up(SimConfig::small());
    let k = udp4(1, 2);
    let id = h.insert(&k, &FlowAction::forward(1)).flow_id().unwrap();
    h.sim.faults().preload_counters(id.get(), 3, 300);
    h.poll();
    let c = h.cmd(CommandDescriptor::flow_query(1, &k));
    assert_eq!((c.count.get(), c.value0.get(), c.value1.get()), (3, 300, 0));
    let c = h.cmd(CommandDescriptor::flow_delete(2, id, &k));
    assert_eq!((c.count.get(), c.value0.get()), (3, 300));
    assert_eq!(c.opcode, Opcode::FlowDelete.raw());
}

/// The packed records a `CHANGED` counter dump wrote: (slot, generation, packets, bytes).
fn changed_records(h: &mut Host, cookie: u32, first: u32, count: u32) -> Vec<(u32, u8, u32, u64)> {
    let buf = Iova::new(Host::iova(DUMP_OFF));
    h.dma.fill(DUMP_OFF, 128 * 32, 0xAA).unwrap();
    let c = h.cmd(CommandDescriptor::counter_dump_changed(
        cookie,
        fid(first),
        count,
        buf,
    ));
    assert_eq!(c.status().unwrap(), S::Ok);
    assert_eq!(c.flow_id(), Some(fid(first)));
    (0..u64::from(c.count.get()))
        .map(|i| {
            let mut b = [0u8; 32];
            h.dma.read_bytes(DUMP_OFF + i * 32, &mut b).unwrap();
            let r = CounterRecord::from_bytes(&b);
            assert!(r.valid());
            (
                r.flow_id.get(),
                r.generation(),
                r.packets.get(),
                r.bytes.get(),
            )
        })
        .collect()
}

#[test]
fn changed_counter_dump_reports_only_hit_entries_once() {
    let mut h = Host::up(SimConfig::small());
    let a = FlowAction::forward(1);
    let k1 = udp4(1000, 2000);
    let k2 = udp4(1001, 2000);
    let id1 = h.insert(&k1, &a).flow_id().unwrap();
    let id2 = h.insert(&k2, &a).flow_id().unwrap();
    assert!(id1 != id2);
    // Nothing hit since insert: no record.
    assert!(changed_records(&mut h, 1, 0, 128).is_empty());
    h.sim.faults().preload_counters(id2.get(), 5, 500);
    h.poll();
    assert_eq!(changed_records(&mut h, 2, 0, 128), [(id2.get(), 1, 5, 500)]);
    // Reported once: the mark moved with the dump.
    assert!(changed_records(&mut h, 3, 0, 128).is_empty());
    // Both hit: packed, in slot order; a dump of a range sees only its slots, and a
    // full dump in between does not move the marks.
    h.sim.faults().preload_counters(id1.get(), 1, 60);
    h.sim.faults().preload_counters(id2.get(), 9, 900);
    h.poll();
    let buf = Iova::new(Host::iova(DUMP_OFF));
    h.cmd(CommandDescriptor::counter_dump(4, fid(0), 128, buf));
    let lo = id1.min(id2).get();
    assert!(changed_records(&mut h, 5, lo, 1).len() == 1);
    let rest = changed_records(&mut h, 6, 0, 128);
    let hi = id1.max(id2).get();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].0, hi);
    // A new entry in the slot (new generation) counts from insert.
    h.cmd(CommandDescriptor::flow_delete(7, id2, &k2));
    assert!(changed_records(&mut h, 8, 0, 128).is_empty(), "not valid");
    let id3 = h.insert(&k2, &a).flow_id().unwrap();
    assert_eq!(id3, id2, "lowest free way");
    h.sim.faults().preload_counters(id3.get(), 9, 900);
    h.poll();
    assert_eq!(changed_records(&mut h, 9, 0, 128), [(id3.get(), 2, 9, 900)]);
    // CHANGED on another opcode is a bad descriptor.
    let mut d = CommandDescriptor::table_dump(10, fid(0), 1, buf);
    d.flags = ctoffload_hw_regs::CommandFlags::CHANGED.bits();
    assert_eq!(h.cmd(d).status().unwrap(), S::BadDescriptor);
}
