//! The table's free slots, kept in the timer links of the slots themselves.
//!
//! A slot that holds no entry is in no timer wheel list, so its links
//! ([`SlotLinks::parked`]) carry the next free slot and the slot's generation (how many
//! connections it has held, which makes a connection's id, see
//! [`super::ConnTable`]). The list costs no memory beyond its head. Slots are handed
//! out last freed first, and in ascending order from a new table.

use crate::timer::{SlotLinks, ix};

use super::Slot;

/// End of the list.
const NIL: u32 = u32::MAX;

/// The free-slot list: its head; the links live in the table's timer links.
#[derive(Debug)]
pub struct FreeSlots {
    head: u32,
}

impl FreeSlots {
    /// Every slot of `links` free, generation 0, handed out in ascending order.
    #[must_use]
    pub fn all(links: &mut [SlotLinks]) -> Self {
        let n = links.len();
        for (i, l) in links.iter_mut().enumerate() {
            let next = if i + 1 < n {
                u32::try_from(i + 1).unwrap_or(NIL)
            } else {
                NIL
            };
            *l = SlotLinks::parked(next, 0);
        }
        Self {
            head: if n == 0 { NIL } else { 0 },
        }
    }

    /// Take a free slot: the slot and the generation it was freed with (`None` when
    /// every slot is taken).
    #[inline]
    pub fn pop(&mut self, links: &[SlotLinks]) -> Option<(Slot, u32)> {
        if self.head == NIL {
            return None;
        }
        let slot = self.head;
        let (next, generation) = links.get(ix(slot))?.parked_parts()?;
        self.head = next;
        Some((Slot(slot), generation))
    }

    /// Give `slot` back (its links must be out of the wheel), remembering `generation`.
    #[inline]
    pub fn push(&mut self, links: &mut [SlotLinks], slot: Slot, generation: u32) {
        if let Some(l) = links.get_mut(slot.idx()) {
            debug_assert!(l.parked_parts().is_some(), "a free slot is not scheduled");
            *l = SlotLinks::parked(self.head, generation);
            self.head = slot.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_come_out_ascending_then_last_freed_first_with_their_generation() {
        let mut links = vec![SlotLinks::default(); 3];
        let mut free = FreeSlots::all(&mut links);
        assert_eq!(free.pop(&links), Some((Slot(0), 0)));
        assert_eq!(free.pop(&links), Some((Slot(1), 0)));
        free.push(&mut links, Slot(0), 7);
        assert_eq!(free.pop(&links), Some((Slot(0), 7)));
        assert_eq!(free.pop(&links), Some((Slot(2), 0)));
        assert_eq!(free.pop(&links), None);
        free.push(&mut links, Slot(2), 1);
        free.push(&mut links, Slot(1), 9);
        assert_eq!(free.pop(&links), Some((Slot(1), 9)));
        assert_eq!(free.pop(&links), Some((Slot(2), 1)));
        assert_eq!(free.pop(&links), None);
    }
}
