//! A hashed timer wheel for connection expiry, with lazy rescheduling.
//!
//! Every connection sits in exactly one wheel slot, at or before its real expiry. A
//! packet that pushes the timeout later does not touch the wheel (that would cost a
//! relink per packet); only a timeout made *sooner* relinks. When a slot fires, each of
//! its entries is either expired (reported) or moved to the slot of its current timeout.
//! A connection is therefore looked at about once per timeout period, and a GC call
//! costs time proportional to the entries it visits, which the caller bounds.
//!
//! Slots are `2^SLOT_SHIFT` ns (about 1.07 s) wide and the wheel has `WHEEL_SLOTS`
//! positions (about 73 minutes); longer timeouts (TCP ESTABLISHED: 5 days) simply
//! wait through a few laps. The links live beside the table's entries, indexed by slot,
//! so the wheel allocates nothing after creation.

const SLOT_SHIFT: u32 = 30;
const WHEEL_SLOTS: usize = 4096;
const WHEEL_MASK: u64 = 4095;
const NIL: u32 = u32::MAX;
/// [`SlotLinks::sched`] of an entry in no list.
const UNLINKED: u32 = u32::MAX;
/// The last slot number: about 146 years of nanoseconds. Later times share it (an entry
/// there is looked at once per lap and kept until its real timeout passes).
const LAST_SLOT: u64 = 0xFFFF_FFFE;

/// Wheel links of one table entry.
#[derive(Debug, Clone, Copy)]
pub struct SlotLinks {
    prev: u32,
    next: u32,
    /// Absolute slot number the entry is scheduled in ([`slot_of`]); `UNLINKED` when
    /// unlinked.
    sched: u32,
}

impl SlotLinks {
    /// The links of a table slot that holds no entry. Such a slot is in no wheel list
    /// (so [`TimerWheel::unlink`] leaves it alone), and its links keep what the table
    /// needs of a free slot instead: the next free slot and the slot's generation.
    #[must_use]
    pub fn parked(next_free: u32, generation: u32) -> Self {
        Self {
            prev: generation,
            next: next_free,
            sched: UNLINKED,
        }
    }

    /// `(next_free, generation)` of links made by [`SlotLinks::parked`]; `None` when
    /// the slot is scheduled in the wheel.
    #[must_use]
    pub fn parked_parts(&self) -> Option<(u32, u32)> {
        (self.sched == UNLINKED).then_some((self.next, self.prev))
    }
}

impl Default for SlotLinks {
    fn default() -> Self {
        Self {
            prev: NIL,
            next: NIL,
            sched: UNLINKED,
        }
    }
}

#[inline]
fn slot_of(t: u64) -> u64 {
    (t >> SLOT_SHIFT).min(LAST_SLOT)
}

/// A slot number as stored in the links (every slot number fits: see [`LAST_SLOT`]).
#[inline]
fn stored(slot: u64) -> u32 {
    u32::try_from(slot.min(LAST_SLOT)).unwrap_or(UNLINKED - 1)
}

#[inline]
fn pos_of(slot: u64) -> usize {
    // Masked to 12 bits: always fits.
    usize::try_from(slot & WHEEL_MASK).unwrap_or(0)
}

/// A 32-bit slot number as an index (saturating: never panics on a 16-bit target).
#[inline]
pub(crate) fn ix(i: u32) -> usize {
    usize::try_from(i).unwrap_or(usize::MAX)
}

/// The wheel: list heads per position and the next slot number to process.
#[derive(Debug)]
pub struct TimerWheel {
    heads: Vec<u32>,
    cursor: u64,
}

impl Default for TimerWheel {
    fn default() -> Self {
        Self::new()
    }
}

impl TimerWheel {
    /// An empty wheel.
    #[must_use]
    pub fn new() -> Self {
        Self {
            heads: vec![NIL; WHEEL_SLOTS],
            cursor: 0,
        }
    }

    /// Bytes of heap the wheel holds (its list heads).
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        self.heads.capacity() * size_of::<u32>()
    }

    fn link(&mut self, links: &mut [SlotLinks], i: u32, slot: u64) {
        let pos = pos_of(slot);
        let head = self.heads[pos];
        links[ix(i)] = SlotLinks {
            prev: NIL,
            next: head,
            sched: stored(slot),
        };
        if head != NIL {
            links[ix(head)].prev = i;
        }
        self.heads[pos] = i;
    }

    /// Take entry `i` off its list (no-op when it is not linked).
    pub fn unlink(&mut self, links: &mut [SlotLinks], i: u32) {
        let l = links[ix(i)];
        if l.sched == UNLINKED {
            return;
        }
        if l.prev == NIL {
            self.heads[pos_of(u64::from(l.sched))] = l.next;
        } else {
            links[ix(l.prev)].next = l.next;
        }
        if l.next != NIL {
            links[ix(l.next)].prev = l.prev;
        }
        links[ix(i)] = SlotLinks::default();
    }

    /// Schedule a newly inserted entry at `timeout`.
    #[inline]
    pub fn schedule(&mut self, links: &mut [SlotLinks], i: u32, timeout: u64, _now: u64) {
        self.unlink(links, i);
        let slot = slot_of(timeout).max(self.cursor);
        self.link(links, i, slot);
    }

    /// The entry's timeout changed to `timeout`; relink only if it must fire sooner than
    /// it is scheduled.
    #[inline]
    pub fn reschedule_if_sooner(&mut self, links: &mut [SlotLinks], i: u32, timeout: u64) {
        let sched = links[ix(i)].sched;
        let slot = slot_of(timeout).max(self.cursor);
        if stored(slot) < sched {
            self.unlink(links, i);
            self.link(links, i, slot);
        }
    }

    /// Process slots up to `now`, visiting at most `budget` entries. `timeout_of` gives
    /// an entry's current timeout (`None`: gone); `on_expired` receives each entry whose
    /// timeout is `<= now` (already unlinked).
    pub fn advance(
        &mut self,
        links: &mut [SlotLinks],
        now: u64,
        budget: usize,
        mut timeout_of: impl FnMut(u32) -> Option<u64>,
        mut on_expired: impl FnMut(u32),
    ) {
        let target = slot_of(now);
        let lap = u64::try_from(WHEEL_SLOTS).unwrap_or(u64::MAX) - 1;
        if target.saturating_sub(self.cursor) > lap {
            // Idle for more than a lap: one pass over every position covers everything.
            self.cursor = target - lap;
        }
        let mut visited = 0usize;
        loop {
            let cursor = self.cursor;
            let pos = pos_of(cursor);
            let mut kept = NIL;
            let mut kept_tail = NIL;
            let mut out_of_budget = false;
            loop {
                let head = self.heads[pos];
                if head == NIL {
                    break;
                }
                if visited >= budget {
                    out_of_budget = true;
                    break;
                }
                visited += 1;
                self.unlink(links, head);
                let Some(t) = timeout_of(head) else {
                    continue;
                };
                if t <= now {
                    on_expired(head);
                    continue;
                }
                let slot = slot_of(t).max(cursor);
                if pos_of(slot) == pos {
                    // Stays in this position (later this slot, or a later lap): keep it
                    // aside so this walk ends.
                    links[ix(head)] = SlotLinks {
                        prev: kept_tail,
                        next: NIL,
                        sched: stored(slot),
                    };
                    if kept_tail == NIL {
                        kept = head;
                    } else {
                        links[ix(kept_tail)].next = head;
                    }
                    kept_tail = head;
                } else {
                    self.link(links, head, slot);
                }
            }
            if kept != NIL {
                // Splice the kept run in front of whatever is left in this position.
                let rest = self.heads[pos];
                links[ix(kept_tail)].next = rest;
                if rest != NIL {
                    links[ix(rest)].prev = kept_tail;
                }
                self.heads[pos] = kept;
            }
            if out_of_budget || cursor >= target {
                return;
            }
            self.cursor = cursor + 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1 << SLOT_SHIFT;

    #[test]
    fn fires_each_entry_once_at_its_time() {
        let mut w = TimerWheel::new();
        let mut links = vec![SlotLinks::default(); 4];
        let timeouts = [5 * S, 5 * S + 1, 9 * S, 5000 * S];
        for (i, &t) in timeouts.iter().enumerate() {
            w.schedule(&mut links, u32::try_from(i).expect("small"), t, 0);
        }
        let mut fired = Vec::new();
        for now in [4 * S, 5 * S, 5 * S + 1, 10 * S, 4999 * S, 5000 * S] {
            w.advance(
                &mut links,
                now,
                usize::MAX,
                |i| Some(timeouts[ix(i)]),
                |i| fired.push((i, now)),
            );
        }
        assert_eq!(
            fired,
            vec![(0, 5 * S), (1, 5 * S + 1), (2, 10 * S), (3, 5000 * S)]
        );
    }

    #[test]
    fn links_are_12_bytes_and_far_timeouts_share_the_last_slot() {
        assert_eq!(size_of::<SlotLinks>(), 12);
        let mut w = TimerWheel::new();
        let mut links = vec![SlotLinks::default(); 3];
        let timeouts = [u64::MAX, (LAST_SLOT + 5) << SLOT_SHIFT, 3 * S];
        for (i, &t) in timeouts.iter().enumerate() {
            w.schedule(&mut links, u32::try_from(i).expect("small"), t, 0);
        }
        assert_eq!(links[0].sched, links[1].sched);
        // Unlinking one of the two far entries keeps the other's list intact.
        w.unlink(&mut links, 0);
        let mut fired = Vec::new();
        w.advance(
            &mut links,
            5000 * S,
            usize::MAX,
            |i| Some(timeouts[ix(i)]),
            |i| {
                fired.push(i);
            },
        );
        assert_eq!(fired, vec![2]);
        w.unlink(&mut links, 1);
        assert_eq!(links[1].sched, UNLINKED);
    }

    #[test]
    fn unlink_is_idempotent_and_keeps_lists_consistent() {
        let mut w = TimerWheel::new();
        let mut links = vec![SlotLinks::default(); 3];
        for i in 0..3 {
            w.schedule(&mut links, i, 7 * S, 0);
        }
        w.unlink(&mut links, 1);
        w.unlink(&mut links, 1);
        let mut fired = Vec::new();
        w.advance(&mut links, 8 * S, 10, |_| Some(7 * S), |i| fired.push(i));
        fired.sort_unstable();
        assert_eq!(fired, vec![0, 2]);
    }
}
