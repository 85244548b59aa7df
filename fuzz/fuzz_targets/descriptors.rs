//! The device's in-memory formats from raw bytes: every hw-regs descriptor, completion
//! and record decoder (`from_bytes` and each accessor that validates a code), with the
//! round trip `to_bytes(from_bytes(b)) == b`; then the simulator's datapath fed a raw
//! flow key and action as a command carries them: the flow table (insert, lookup,
//! modify, remove) and the frame rewrite (`classify` then `rewrite` with the decoded
//! action) on a raw frame. Checks: no panic, round trips exact, a rewrite error leaves
//! the frame untouched (the device rewrites all or nothing).
#![no_main]

use ctoffload_hw_regs::command::{DumpOperand, FlowOperand};
use ctoffload_hw_regs::{
    CommandDescriptor, Completion, CounterRecord, FlowAction, FlowKey, KeyKind, RxDescriptor,
    TableDumpRecord, TxDescriptor,
};
use ctoffload_nic_sim::rewrite::{classify, rewrite};
use ctoffload_nic_sim::table::{Entry, FlowTable, InsertOutcome, key_image};
use libfuzzer_sys::fuzz_target;

fn arr<const N: usize>(data: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    let n = data.len().min(N);
    a[..n].copy_from_slice(&data[..n]);
    a
}

fuzz_target!(|data: &[u8]| {
    // Decoders: every layout reads the same (zero-padded) bytes.
    let b128: [u8; 128] = arr(data);
    let cmd = CommandDescriptor::from_bytes(&b128);
    assert_eq!(cmd.to_bytes(), b128);
    let _ = (cmd.opcode(), cmd.flags());
    let fo = cmd.flow_operand();
    let _ = (
        fo.key.kind(),
        fo.key.proto(),
        fo.key.src_ip(),
        fo.key.dst_ip(),
    );
    let _ = fo.action.flags();
    let _ = cmd.dump_operand();
    let b112: [u8; 112] = arr(data);
    assert_eq!(FlowOperand::from_bytes(&b112).to_bytes(), b112);
    assert_eq!(DumpOperand::from_bytes(&b112).to_bytes(), b112);
    let b32: [u8; 32] = arr(data);
    let cpl = Completion::from_bytes(&b32);
    assert_eq!(cpl.to_bytes(), b32);
    let _ = (
        cpl.phase(),
        cpl.flags(),
        cpl.status(),
        cpl.opcode(),
        cpl.flow_id(),
        cpl.counters(),
        cpl.ownership_word(),
    );
    let rx = RxDescriptor::from_bytes(&b32);
    assert_eq!(rx.to_bytes(), b32);
    let _ = (rx.buf(), rx.status(), rx.done(), rx.reason(), rx.flow_id());
    let b16: [u8; 16] = arr(data);
    let tx = TxDescriptor::from_bytes(&b16);
    assert_eq!(tx.to_bytes(), b16);
    let _ = (
        tx.buf(),
        tx.status(),
        tx.done(),
        tx.error(),
        tx.ownership_word(),
    );
    let rec = CounterRecord::from_bytes(&b32);
    assert_eq!(rec.to_bytes(), b32);
    let _ = (rec.valid(), rec.generation(), rec.counters());
    let dump = TableDumpRecord::from_bytes(&b128);
    assert_eq!(dump.to_bytes(), b128);
    let _ = (dump.valid(), dump.generation());
    let b48: [u8; 48] = arr(data);
    let key = FlowKey::from_bytes(&b48);
    assert_eq!(key.to_bytes(), b48);
    let b64: [u8; 64] = arr(data.get(48..).unwrap_or_default());
    let action = FlowAction::from_bytes(&b64);
    assert_eq!(action.to_bytes(), b64);

    // The simulator's flow table with the raw key and action.
    let kind = key.kind().unwrap_or(KeyKind::Ipv4);
    let entry = Entry::decode(action, kind);
    let mut table = FlowTable::new(2);
    let image = key_image(&key);
    let limit = u32::from(data.get(112).copied().unwrap_or(0) % 40);
    match table.insert(&image, entry.clone(), limit) {
        InsertOutcome::Installed { slot, .. } => {
            assert_eq!(table.lookup(&image), Some(slot));
            assert!(table.holds(slot, &image));
            table.modify(slot, entry.clone());
            let _ = table.counters(slot);
            let _ = table.remove(slot);
            assert_eq!(table.lookup(&image), None);
            assert_eq!(table.count(), 0);
        }
        _ => assert_eq!(table.lookup(&image), None),
    }

    // The datapath rewrite of a raw frame with the decoded action.
    let mut frame = data.get(113..).unwrap_or_default().to_vec();
    if let Ok(parsed) = classify(&frame) {
        let before = frame.clone();
        if rewrite(&mut frame, &parsed, &entry.params).is_err() {
            assert_eq!(frame, before, "failed rewrite changed the frame");
        }
    }
});
