//! Counter records and wrap-safe deltas (device.md section 11).

use std::collections::HashMap;

use ctoffload_hw_regs::limits::BYTE_COUNTER_MASK;
use ctoffload_hw_regs::{CounterRecord, FlowCounters, FlowId, Le32, Le64};

use crate::mmio::DmaMemory;

/// One decoded counter record of a `COUNTER_DUMP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterSample {
    /// The slot.
    pub flow_id: FlowId,
    /// An entry is installed.
    pub valid: bool,
    /// The slot generation (also when not valid).
    pub generation: u8,
    /// Raw counters: packets (32-bit), bytes (48-bit), last hit.
    pub counters: FlowCounters,
}

impl CounterSample {
    /// Decodes a record; `None` for the reserved flow id `0xFFFF_FFFF`.
    #[inline]
    pub fn from_record(rec: &CounterRecord) -> Option<Self> {
        Some(Self {
            flow_id: FlowId::new(rec.flow_id.get())?,
            valid: rec.valid(),
            generation: rec.generation(),
            counters: rec.counters(),
        })
    }
}

/// The records of one completed `COUNTER_DUMP`, decoded in place from the dump buffer
/// (no copy of the chunk): record `i` describes slot `first + i` (device.md 11.3), or,
/// for a `CHANGED` dump ([`Self::is_packed`]), the slot it names (the entries of the
/// range hit since the last such dump, in slot order).
///
/// The view borrows the device, so the buffer cannot be reused by another dump while
/// it is read.
#[derive(Debug, Clone, Copy)]
pub struct CounterDump<'a> {
    mem: &'a DmaMemory,
    first: u32,
    count: u32,
    /// Slots the dump covers (`count` unless packed).
    range: u32,
    packed: bool,
}

impl<'a> CounterDump<'a> {
    /// A view of `count` records at the start of `mem` for slots from `first`. The
    /// caller checked that `mem` holds them.
    pub(crate) fn new(mem: &'a DmaMemory, first: u32, count: u32) -> Self {
        Self {
            mem,
            first,
            count,
            range: count,
            packed: false,
        }
    }

    /// A view of the `count` packed records of a `CHANGED` dump of the `range` slots
    /// from `first` (each record names its slot). The caller checked that `mem` holds
    /// them.
    pub(crate) fn packed(mem: &'a DmaMemory, first: u32, range: u32, count: u32) -> Self {
        Self {
            mem,
            first,
            count,
            range,
            packed: true,
        }
    }

    /// Whether the records are packed (a `CHANGED` dump): record `i` is not slot
    /// `first + i` but the slot its `flow_id` names.
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// The first slot of the range.
    pub fn first(&self) -> u32 {
        self.first
    }

    /// Slots the dump covers, from [`Self::first`] (the number of records unless
    /// packed).
    pub fn range_len(&self) -> usize {
        usize::try_from(self.range).unwrap_or(0)
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        usize::try_from(self.count).unwrap_or(0)
    }

    /// Whether there is no record.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Record `i` (four volatile 8-byte loads), or `None` past the end or for the
    /// reserved flow id.
    #[inline]
    pub fn get(&self, i: usize) -> Option<CounterSample> {
        if i >= self.len() {
            return None;
        }
        let [w0, w1, w2, w3] = self
            .mem
            .read_u64s::<4>(i.checked_mul(CounterRecord::SIZE)?)
            .ok()?
            .map(u64::from_le);
        let lo = |w: u64| u32::try_from(w & 0xFFFF_FFFF).unwrap_or(0);
        let rec = CounterRecord {
            flow_id: Le32::new(lo(w0)),
            flags: Le32::new(lo(w0 >> 32)),
            packets: Le32::new(lo(w1)),
            reserved: Le32::new(lo(w1 >> 32)),
            bytes: Le64::new(w2),
            last_hit: Le64::new(w3),
        };
        CounterSample::from_record(&rec)
    }

    /// Every record, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = CounterSample> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

/// Traffic of one flow since the previous pull.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CounterDelta {
    /// The slot.
    pub flow_id: FlowId,
    /// The entry's generation.
    pub generation: u8,
    /// Packets since the previous pull (or since insert).
    pub packets: u64,
    /// Bytes since the previous pull (or since insert).
    pub bytes: u64,
    /// The device's last-hit timestamp (0 = never hit).
    pub last_hit: u64,
    /// True when there was no previous value for this entry (first pull, new
    /// generation): the delta is everything since insert.
    pub since_insert: bool,
}

#[derive(Debug, Clone, Copy)]
struct Prev {
    generation: u8,
    packets: u32,
    bytes: u64,
}

/// Keeps the previous raw counter values per slot and generation and turns each new
/// pull into wrap-safe deltas: `(new − old) mod 2^32` for packets, `mod 2^48` for bytes.
/// A changed generation (the slot was reused) or a slot seen for the first time gives
/// the raw value as the delta since insert. Pull at least every 25 s (section 11.2).
#[derive(Debug, Default, Clone)]
pub struct CounterTracker {
    prev: HashMap<u32, Prev>,
}

impl CounterTracker {
    /// An empty tracker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of slots tracked.
    pub fn len(&self) -> usize {
        self.prev.len()
    }

    /// Whether no slot is tracked.
    pub fn is_empty(&self) -> bool {
        self.prev.is_empty()
    }

    /// Feeds one sample. Returns the delta for an installed entry, `None` for an
    /// empty slot (whose previous value is forgotten).
    pub fn update(&mut self, s: &CounterSample) -> Option<CounterDelta> {
        if !s.valid {
            self.prev.remove(&s.flow_id.get());
            return None;
        }
        let c = s.counters;
        let bytes_now = c.bytes & BYTE_COUNTER_MASK;
        let new = Prev {
            generation: s.generation,
            packets: c.packets,
            bytes: bytes_now,
        };
        let delta = match self.prev.insert(s.flow_id.get(), new) {
            Some(p) if p.generation == s.generation => CounterDelta {
                flow_id: s.flow_id,
                generation: s.generation,
                packets: u64::from(c.packets.wrapping_sub(p.packets)),
                bytes: bytes_now.wrapping_sub(p.bytes) & BYTE_COUNTER_MASK,
                last_hit: c.last_hit,
                since_insert: false,
            },
            _ => CounterDelta {
                flow_id: s.flow_id,
                generation: s.generation,
                packets: u64::from(c.packets),
                bytes: bytes_now,
                last_hit: c.last_hit,
                since_insert: true,
            },
        };
        Some(delta)
    }

    /// The final delta of an entry from the counters in its `FLOW_DELETE` completion,
    /// and forgets the slot.
    pub fn finish(
        &mut self,
        flow_id: FlowId,
        generation: u8,
        counters: FlowCounters,
    ) -> CounterDelta {
        let d = self
            .update(&CounterSample {
                flow_id,
                valid: true,
                generation,
                counters,
            })
            .unwrap_or(CounterDelta {
                flow_id,
                generation,
                packets: 0,
                bytes: 0,
                last_hit: 0,
                since_insert: true,
            });
        self.prev.remove(&flow_id.get());
        d
    }

    /// Forgets one slot.
    pub fn forget(&mut self, flow_id: FlowId) {
        self.prev.remove(&flow_id.get());
    }

    /// Forgets everything (after a device reset: every counter restarted at 0).
    pub fn clear(&mut self) {
        self.prev.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: u32, valid: bool, generation: u8, packets: u32, bytes: u64) -> CounterSample {
        CounterSample {
            flow_id: FlowId::new(id).expect("id"),
            valid,
            generation,
            counters: FlowCounters {
                packets,
                bytes,
                last_hit: 7,
            },
        }
    }

    #[test]
    fn first_pull_is_since_insert() {
        let mut t = CounterTracker::new();
        let d = t.update(&s(3, true, 1, 10, 1000)).expect("delta");
        assert!(d.since_insert);
        assert_eq!((d.packets, d.bytes), (10, 1000));
        let d = t.update(&s(3, true, 1, 15, 1600)).expect("delta");
        assert!(!d.since_insert);
        assert_eq!((d.packets, d.bytes, d.last_hit), (5, 600, 7));
    }

    #[test]
    fn packet_and_byte_counters_wrap() {
        let mut t = CounterTracker::new();
        t.update(&s(1, true, 4, u32::MAX - 2, BYTE_COUNTER_MASK - 9));
        let d = t.update(&s(1, true, 4, 5, 20)).expect("delta");
        assert_eq!(d.packets, 8);
        assert_eq!(d.bytes, 30);
    }

    #[test]
    fn generation_change_restarts_from_insert() {
        let mut t = CounterTracker::new();
        t.update(&s(1, true, 1, 100, 10_000));
        let d = t.update(&s(1, true, 2, 3, 300)).expect("delta");
        assert!(d.since_insert);
        assert_eq!((d.packets, d.bytes, d.generation), (3, 300, 2));
    }

    #[test]
    fn empty_slot_forgets_previous() {
        let mut t = CounterTracker::new();
        t.update(&s(1, true, 1, 100, 10_000));
        assert!(t.update(&s(1, false, 1, 0, 0)).is_none());
        assert!(t.is_empty());
        // Same generation reinstalled cannot happen without a generation bump, but a
        // forgotten slot always restarts from insert.
        assert!(t.update(&s(1, true, 1, 4, 40)).expect("d").since_insert);
    }

    #[test]
    fn finish_gives_final_delta_and_forgets() {
        let mut t = CounterTracker::new();
        t.update(&s(9, true, 1, 10, 100));
        let d = t.finish(
            FlowId::new(9).expect("id"),
            1,
            FlowCounters {
                packets: 12,
                bytes: 150,
                last_hit: 9,
            },
        );
        assert_eq!((d.packets, d.bytes), (2, 50));
        assert!(t.is_empty());
    }
}
