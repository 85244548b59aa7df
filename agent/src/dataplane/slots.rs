//! Per device slot: which connection direction owns it, and the counter baseline of the
//! last pull. A flat array indexed by flow id, so the reconciler's sweep touches one
//! cache line per slot and no hash table for slots whose counters did not move.
//!
//! Deltas are wrap-safe as device.md section 11.2 requires: `(new − old) mod 2^32` for
//! packets and `mod 2^48` for bytes while the slot keeps its generation; the first value
//! seen for a generation is the delta since insert (counters are cleared by insert).

use ctoffload_fallback_sw::tuple::Dir;
use ctoffload_hw_regs::limits::BYTE_COUNTER_MASK;
use ctoffload_hw_regs::{FlowCounters, FlowId};

use super::state::ConnHandle;

/// No partner slot.
const NONE: u32 = u32::MAX;

/// One slot's owner and baseline.
#[derive(Debug, Clone, Copy)]
pub struct SlotRec {
    /// The connection direction whose rule is installed here.
    pub owner: Option<(ConnHandle, Dir)>,
    /// Generation of the owner's entry.
    pub generation: u8,
    /// A baseline exists for this generation.
    pub pulled: bool,
    /// Raw packets at the last pull.
    pub packets: u32,
    /// Raw bytes at the last pull.
    pub bytes: u64,
    /// Raw last-hit at the last pull (device time, 0 = never).
    pub last_hit: u64,
    /// When the rule was installed (agent time).
    pub since: u64,
    /// L2 header length of this direction (device bytes → L3 bytes).
    pub l2_len: u8,
    /// The slot of the connection's other direction ([`SlotRec::partner`]).
    partner: u32,
}

impl Default for SlotRec {
    fn default() -> Self {
        Self {
            owner: None,
            generation: 0,
            pulled: false,
            packets: 0,
            bytes: 0,
            last_hit: 0,
            since: 0,
            l2_len: 14,
            partner: NONE,
        }
    }
}

/// A delta since the previous pull (or since insert).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    /// Packets.
    pub packets: u64,
    /// Bytes (L2, as the device counts them).
    pub bytes: u64,
    /// Device last-hit (0 = never).
    pub last_hit: u64,
}

impl SlotRec {
    /// The partner slot, if both directions are installed.
    #[must_use]
    pub fn partner(&self) -> Option<FlowId> {
        (self.partner != NONE)
            .then(|| FlowId::new(self.partner))
            .flatten()
    }

    /// Whether `c` differs from the baseline (or there is none).
    #[must_use]
    pub fn changed(&self, c: &FlowCounters) -> bool {
        !self.pulled || self.packets != c.packets || self.bytes != c.bytes & BYTE_COUNTER_MASK
    }

    /// The delta to `c` and the new baseline.
    pub fn update(&mut self, c: &FlowCounters) -> Delta {
        let bytes = c.bytes & BYTE_COUNTER_MASK;
        let d = if self.pulled {
            Delta {
                packets: u64::from(c.packets.wrapping_sub(self.packets)),
                bytes: bytes.wrapping_sub(self.bytes) & BYTE_COUNTER_MASK,
                last_hit: c.last_hit,
            }
        } else {
            Delta {
                packets: u64::from(c.packets),
                bytes,
                last_hit: c.last_hit,
            }
        };
        self.pulled = true;
        self.packets = c.packets;
        self.bytes = bytes;
        self.last_hit = c.last_hit;
        d
    }
}

/// The slot table.
#[derive(Debug, Clone, Default)]
pub struct Slots(Vec<SlotRec>);

fn idx(id: FlowId) -> usize {
    usize::try_from(id.get()).unwrap_or(usize::MAX)
}

impl Slots {
    /// `n` empty slots.
    #[must_use]
    pub fn new(n: usize) -> Self {
        Self(vec![SlotRec::default(); n])
    }

    /// One slot.
    #[must_use]
    pub fn get(&self, id: FlowId) -> Option<&SlotRec> {
        self.0.get(idx(id))
    }

    /// One slot, mutable.
    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut SlotRec> {
        self.0.get_mut(idx(id))
    }

    /// The owner of a slot.
    #[must_use]
    pub fn owner(&self, id: FlowId) -> Option<(ConnHandle, Dir)> {
        self.get(id).and_then(|s| s.owner)
    }

    /// A rule was installed at `since`: new owner, no baseline (the first pull is
    /// since insert).
    pub fn install(
        &mut self,
        id: FlowId,
        owner: (ConnHandle, Dir),
        generation: u8,
        since: u64,
        l2_len: u8,
    ) {
        if let Some(s) = self.get_mut(id) {
            *s = SlotRec {
                owner: Some(owner),
                generation,
                since,
                l2_len,
                ..SlotRec::default()
            };
        }
    }

    /// Links the two directions' slots of one connection.
    pub fn pair(&mut self, a: FlowId, b: FlowId) {
        if let Some(s) = self.get_mut(a) {
            s.partner = b.get();
        }
        if let Some(s) = self.get_mut(b) {
            s.partner = a.get();
        }
    }

    /// The final delta of a deleted entry (counters from its delete completion); the
    /// slot is freed.
    pub fn finish(&mut self, id: FlowId, generation: u8, c: &FlowCounters) -> Delta {
        let Some(s) = self.get_mut(id) else {
            return Delta {
                packets: 0,
                bytes: 0,
                last_hit: 0,
            };
        };
        if s.generation != generation {
            s.pulled = false;
        }
        let d = s.update(c);
        *s = SlotRec::default();
        d
    }

    /// Frees a slot.
    pub fn clear(&mut self, id: FlowId) {
        if let Some(s) = self.get_mut(id) {
            *s = SlotRec::default();
        }
    }

    /// Frees a slot only if `owner` still owns it.
    pub fn clear_if(&mut self, id: FlowId, owner: ConnHandle) {
        if let Some(s) = self.get_mut(id) {
            if s.owner.is_some_and(|(c, _)| c == owner) {
                *s = SlotRec::default();
            }
        }
    }

    /// Frees every slot (the device table is gone).
    pub fn reset(&mut self, n: usize) {
        self.0.clear();
        self.0.resize(n, SlotRec::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctoffload_fallback_sw::table::Slot;

    fn c(packets: u32, bytes: u64, last_hit: u64) -> FlowCounters {
        FlowCounters {
            packets,
            bytes,
            last_hit,
        }
    }

    #[test]
    fn deltas_since_insert_then_wrap_safe() {
        let h = ConnHandle {
            slot: Slot(1),
            id: 7,
        };
        let id = FlowId::new(3).expect("id");
        let mut t = Slots::new(8);
        t.install(id, (h, Dir::Reply), 5, 0, 14);
        let s = t.get_mut(id).expect("slot");
        assert!(s.changed(&c(0, 0, 0)));
        assert_eq!(s.update(&c(10, 1000, 9)).packets, 10);
        assert!(!s.changed(&c(10, 1000, 9)));
        s.packets = u32::MAX - 1;
        s.bytes = BYTE_COUNTER_MASK - 9;
        let d = s.update(&c(3, 20, 11));
        assert_eq!((d.packets, d.bytes, d.last_hit), (5, 30, 11));
        let d = t.finish(id, 5, &c(4, 25, 12));
        assert_eq!((d.packets, d.bytes), (1, 5));
        assert!(t.owner(id).is_none());
        // A finish for a generation never pulled: everything since insert.
        t.install(id, (h, Dir::Original), 6, 0, 14);
        assert_eq!(t.finish(id, 6, &c(2, 200, 1)).packets, 2);
    }

    #[test]
    fn partners_and_conditional_clear() {
        let h = ConnHandle {
            slot: Slot(1),
            id: 7,
        };
        let other = ConnHandle {
            slot: Slot(2),
            id: 8,
        };
        let (a, b) = (FlowId::new(1).expect("a"), FlowId::new(6).expect("b"));
        let mut t = Slots::new(8);
        t.install(a, (h, Dir::Original), 1, 0, 14);
        t.install(b, (h, Dir::Reply), 1, 0, 14);
        t.pair(a, b);
        assert_eq!(t.get(a).and_then(SlotRec::partner), Some(b));
        t.clear_if(a, other);
        assert!(t.owner(a).is_some());
        t.clear_if(a, h);
        assert!(t.owner(a).is_none());
        assert!(t.get(FlowId::new(100).expect("id")).is_none());
    }
}
