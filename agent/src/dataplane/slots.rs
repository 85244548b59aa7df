//! Per device slot: which connection direction owns it, and the counter baseline of the
//! last pull. Two flat arrays indexed by flow id:
//!
//! - the *seen* array (24 bytes a slot): generation, raw packets and bytes at the last
//!   pull, and the raw hardware last-hit. The reconciler's sweep reads it in slot order
//!   next to the counter records, so a slot whose counters did not move costs one
//!   sequential read and no write;
//! - the *owner* array: the connection direction, when its rule went in, the L2 header
//!   length, the partner slot, the next conntrack keep-alive. Read only for slots whose
//!   counters moved or that may be idle.
//!
//! Deltas are wrap-safe as device.md section 11.2 requires: `(new − old) mod 2^32` for
//! packets and `mod 2^48` for bytes while the slot keeps its generation; the first value
//! seen for a generation is the delta since insert (counters are cleared by insert).

use ctoffload_driver::CounterSample;
use ctoffload_fallback_sw::tuple::Dir;
use ctoffload_hw_regs::limits::BYTE_COUNTER_MASK;
use ctoffload_hw_regs::{FlowCounters, FlowId};

use super::state::ConnHandle;

/// No partner slot.
const NONE: u32 = u32::MAX;
/// `Seen::flags`: a rule of ours is installed in the slot.
const OWNED: u8 = 1;
/// `Seen::flags`: a baseline exists for this generation.
const PULLED: u8 = 2;

/// The hot part of a slot: what the last pull saw.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    packets: u32,
    generation: u8,
    flags: u8,
    bytes: u64,
    last_hit: u64,
}

const _: () = assert!(size_of::<Seen>() == 24);

/// The cold part of a slot: who owns it.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    /// The connection.
    pub conn: ConnHandle,
    /// The direction whose rule is installed here.
    pub dir: Dir,
    /// When the rule was installed (agent time).
    pub since: u64,
    /// L2 header length of this direction (device bytes → L3 bytes).
    pub l2_len: u8,
    /// Agent time from which a counter move refreshes the conntrack timeout again.
    keepalive_at: u64,
    /// The slot of the connection's other direction.
    partner: u32,
}

impl Owner {
    /// The partner slot, if both directions are installed.
    #[must_use]
    pub fn partner(&self) -> Option<FlowId> {
        (self.partner != NONE)
            .then(|| FlowId::new(self.partner))
            .flatten()
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

/// What a counter record says about a slot, against the baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Not one of our rules (empty, or another generation than the one we installed).
    NotOurs,
    /// Our rule; its counters did not move. The raw last-hit of the slot.
    Unchanged {
        /// Device time of the last hit (0 = never).
        last_hit: u64,
    },
    /// Our rule; its counters moved by this much (the baseline is updated).
    Moved(Delta),
}

impl Seen {
    fn owned(&self) -> bool {
        self.flags & OWNED != 0
    }

    fn pulled(&self) -> bool {
        self.flags & PULLED != 0
    }

    /// The delta to `c` and the new baseline.
    fn update(&mut self, c: &FlowCounters) -> Delta {
        let bytes = c.bytes & BYTE_COUNTER_MASK;
        let d = if self.pulled() {
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
        self.flags |= PULLED;
        self.packets = c.packets;
        self.bytes = bytes;
        self.last_hit = c.last_hit;
        d
    }
}

/// The slot table.
#[derive(Debug, Clone, Default)]
pub struct Slots {
    seen: Vec<Seen>,
    owners: Vec<Option<Owner>>,
}

fn idx(id: FlowId) -> usize {
    usize::try_from(id.get()).unwrap_or(usize::MAX)
}

impl Slots {
    /// `n` empty slots.
    #[must_use]
    pub fn new(n: usize) -> Self {
        Self {
            seen: vec![Seen::default(); n],
            owners: vec![None; n],
        }
    }

    /// The owner record of a slot.
    #[must_use]
    pub fn get(&self, id: FlowId) -> Option<&Owner> {
        self.owners.get(idx(id)).and_then(Option::as_ref)
    }

    /// The owner of a slot.
    #[must_use]
    pub fn owner(&self, id: FlowId) -> Option<(ConnHandle, Dir)> {
        self.get(id).map(|o| (o.conn, o.dir))
    }

    /// The raw device last-hit of a slot at the last pull (0 = never, or not ours).
    #[must_use]
    pub fn last_hit(&self, id: FlowId) -> u64 {
        self.seen
            .get(idx(id))
            .filter(|s| s.owned())
            .map_or(0, |s| s.last_hit)
    }

    /// Whether slot number `i` holds one of our rules (the sweep skips the records of
    /// the others without reading them).
    #[must_use]
    pub fn owned_at(&self, i: usize) -> bool {
        self.seen.get(i).is_some_and(Seen::owned)
    }

    /// Compares a counter record with the slot's baseline: the sweep's per-slot step.
    /// Reads only the seen array; writes it only when the counters moved.
    pub fn observe(&mut self, s: &CounterSample) -> Observed {
        let Some(seen) = self.seen.get_mut(idx(s.flow_id)) else {
            return Observed::NotOurs;
        };
        if !seen.owned() || !s.valid || s.generation != seen.generation {
            return Observed::NotOurs;
        }
        let c = &s.counters;
        if seen.pulled() && seen.packets == c.packets && seen.bytes == c.bytes & BYTE_COUNTER_MASK {
            return Observed::Unchanged {
                last_hit: seen.last_hit,
            };
        }
        Observed::Moved(seen.update(c))
    }

    /// Whether a counter move of slot `id` at `now` should refresh the connection's
    /// conntrack timeout; if so, the next refresh is due `every` ns later. At most one
    /// random access into conntrack per slot and `every`.
    pub fn keepalive_due(&mut self, id: FlowId, now: u64, every: u64) -> bool {
        let Some(Some(o)) = self.owners.get_mut(idx(id)) else {
            return false;
        };
        if now < o.keepalive_at {
            return false;
        }
        o.keepalive_at = now.saturating_add(every);
        true
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
        let i = idx(id);
        if let (Some(s), Some(o)) = (self.seen.get_mut(i), self.owners.get_mut(i)) {
            *s = Seen {
                generation,
                flags: OWNED,
                ..Seen::default()
            };
            *o = Some(Owner {
                conn: owner.0,
                dir: owner.1,
                since,
                l2_len,
                keepalive_at: 0,
                partner: NONE,
            });
        }
    }

    /// Links the two directions' slots of one connection.
    pub fn pair(&mut self, a: FlowId, b: FlowId) {
        if let Some(Some(o)) = self.owners.get_mut(idx(a)) {
            o.partner = b.get();
        }
        if let Some(Some(o)) = self.owners.get_mut(idx(b)) {
            o.partner = a.get();
        }
    }

    /// The final delta of a deleted entry (counters from its delete completion); the
    /// slot is freed.
    pub fn finish(&mut self, id: FlowId, generation: u8, c: &FlowCounters) -> Delta {
        let Some(s) = self.seen.get_mut(idx(id)) else {
            return Delta {
                packets: 0,
                bytes: 0,
                last_hit: 0,
            };
        };
        if s.generation != generation {
            s.flags &= !PULLED;
        }
        let d = s.update(c);
        self.clear(id);
        d
    }

    /// Frees a slot.
    pub fn clear(&mut self, id: FlowId) {
        let i = idx(id);
        if let Some(s) = self.seen.get_mut(i) {
            *s = Seen::default();
        }
        if let Some(o) = self.owners.get_mut(i) {
            *o = None;
        }
    }

    /// Frees a slot only if `owner` still owns it.
    pub fn clear_if(&mut self, id: FlowId, owner: ConnHandle) {
        if self.get(id).is_some_and(|o| o.conn == owner) {
            self.clear(id);
        }
    }

    /// Frees every slot (the device table is gone).
    pub fn reset(&mut self, n: usize) {
        self.seen.clear();
        self.seen.resize(n, Seen::default());
        self.owners.clear();
        self.owners.resize(n, None);
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

    fn sample(id: FlowId, generation: u8, counters: FlowCounters) -> CounterSample {
        CounterSample {
            flow_id: id,
            valid: true,
            generation,
            counters,
        }
    }

    fn moved(o: Observed) -> Delta {
        match o {
            Observed::Moved(d) => d,
            other => panic!("expected a move, got {other:?}"),
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
        // First pull: everything since insert, even zero.
        assert_eq!(moved(t.observe(&sample(id, 5, c(0, 0, 0)))).packets, 0);
        assert_eq!(moved(t.observe(&sample(id, 5, c(10, 1000, 9)))).packets, 10);
        assert_eq!(
            t.observe(&sample(id, 5, c(10, 1000, 9))),
            Observed::Unchanged { last_hit: 9 }
        );
        assert_eq!(t.last_hit(id), 9);
        // Another generation or an empty slot is not ours.
        assert_eq!(t.observe(&sample(id, 6, c(1, 1, 1))), Observed::NotOurs);
        let mut empty = sample(id, 5, c(1, 1, 1));
        empty.valid = false;
        assert_eq!(t.observe(&empty), Observed::NotOurs);
        // Wrap of both counters.
        t.observe(&sample(id, 5, c(u32::MAX - 1, BYTE_COUNTER_MASK - 9, 10)));
        let d = moved(t.observe(&sample(id, 5, c(3, 20, 11))));
        assert_eq!((d.packets, d.bytes, d.last_hit), (5, 30, 11));
        let d = t.finish(id, 5, &c(4, 25, 12));
        assert_eq!((d.packets, d.bytes), (1, 5));
        assert!(t.owner(id).is_none());
        assert_eq!(t.observe(&sample(id, 5, c(9, 9, 9))), Observed::NotOurs);
        // A finish for a generation never pulled: everything since insert.
        t.install(id, (h, Dir::Original), 6, 0, 14);
        assert_eq!(t.finish(id, 6, &c(2, 200, 1)).packets, 2);
    }

    #[test]
    fn partners_keepalive_and_conditional_clear() {
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
        assert_eq!(t.get(a).and_then(Owner::partner), Some(b));
        assert!(t.keepalive_due(a, 100, 50));
        assert!(!t.keepalive_due(a, 149, 50));
        assert!(t.keepalive_due(a, 150, 50));
        t.clear_if(a, other);
        assert!(t.owner(a).is_some());
        t.clear_if(a, h);
        assert!(t.owner(a).is_none());
        assert!(!t.keepalive_due(a, 1000, 50));
        assert!(t.get(FlowId::new(100).expect("id")).is_none());
    }
}
