//! Values kept beside the table for some of its entries, indexed by the entry's slot.
//!
//! Most entries do not need them (the window state of TCP connections, both tuples of an
//! IPv6 connection or of one translated at both endpoints, the generation of a
//! translated IPv4 connection), so they are not in every entry.
//! A [`SlotStore`] allocates its values in chunks of `CHUNK` slots, the first time an
//! entry of the chunk stores one (on the create path, never on a packet of an existing
//! connection). A table that stores none allocates none; one that stores values in
//! slots spread over every chunk holds one value per slot, as if it were in the entry.
//!
//! Nothing is freed when an entry leaves the table: the slot's value is overwritten by
//! the next entry that stores one there, and is read only while the entry in the slot
//! says it has one.

use super::Slot;

/// Slots per chunk.
pub(crate) const CHUNK: usize = 4096;

/// Values by table slot. See the module documentation.
#[derive(Debug)]
pub struct SlotStore<T> {
    chunks: Vec<Option<Box<[T]>>>,
}

#[inline]
fn split(slot: Slot) -> (usize, usize) {
    let i = slot.idx();
    (i / CHUNK, i % CHUNK)
}

/// A chunk holding `value` in every slot (meaningful only in the slot it was stored
/// for): out of line, as it runs once per chunk.
#[cold]
#[inline(never)]
fn new_chunk<T: Copy>(value: T) -> Box<[T]> {
    vec![value; CHUNK].into_boxed_slice()
}

impl<T: Copy> SlotStore<T> {
    /// A store for a table of `slots` slots; allocates only the chunk directory.
    #[must_use]
    pub fn new(slots: usize) -> Self {
        let mut chunks = Vec::new();
        chunks.resize_with(slots.div_ceil(CHUNK), || None);
        Self { chunks }
    }

    /// Store the value of the entry in `slot` (ignored for a slot beyond the table).
    #[inline]
    pub fn put(&mut self, slot: Slot, value: T) {
        let (c, i) = split(slot);
        match self.chunks.get_mut(c) {
            Some(Some(chunk)) => {
                if let Some(v) = chunk.get_mut(i) {
                    *v = value;
                }
            }
            Some(chunk @ None) => *chunk = Some(new_chunk(value)),
            None => {}
        }
    }

    /// The value stored for `slot` (meaningful only while its entry has one).
    #[inline]
    #[must_use]
    pub fn get(&self, slot: Slot) -> Option<&T> {
        let (c, i) = split(slot);
        self.chunks.get(c)?.as_ref()?.get(i)
    }

    /// The value stored for `slot`, mutable.
    #[inline]
    pub fn get_mut(&mut self, slot: Slot) -> Option<&mut T> {
        let (c, i) = split(slot);
        self.chunks.get_mut(c)?.as_mut()?.get_mut(i)
    }

    /// Bytes of heap held: the chunk directory and every allocated chunk.
    #[must_use]
    pub fn heap_bytes(&self) -> usize {
        let chunks = self.chunks.iter().flatten().count();
        self.chunks.capacity() * size_of::<Option<Box<[T]>>>() + chunks * CHUNK * size_of::<T>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(i: usize) -> Slot {
        Slot(u32::try_from(i).expect("small"))
    }

    #[test]
    fn chunks_are_allocated_on_first_use_only() {
        let mut s: SlotStore<[u64; 4]> = SlotStore::new(3 * CHUNK + 1);
        let empty = s.heap_bytes();
        assert_eq!(empty, 4 * size_of::<Option<Box<[[u64; 4]]>>>());
        assert!(
            s.get(slot(5)).is_none(),
            "nothing stored, nothing allocated"
        );
        s.put(slot(5), [1; 4]);
        s.put(slot(6), [2; 4]);
        assert_eq!(s.heap_bytes(), empty + CHUNK * 32);
        s.put(slot(3 * CHUNK), [3; 4]);
        assert_eq!(s.heap_bytes(), empty + 2 * CHUNK * 32);
        assert_eq!(s.get(slot(5)), Some(&[1; 4]));
        assert_eq!(s.get(slot(6)), Some(&[2; 4]));
        assert_eq!(s.get(slot(3 * CHUNK)), Some(&[3; 4]));
        assert!(s.get(slot(CHUNK)).is_none(), "chunk 1 never used");
    }

    #[test]
    fn slots_beyond_the_table_are_ignored_and_values_change_in_place() {
        let mut s: SlotStore<u32> = SlotStore::new(10);
        s.put(slot(CHUNK), 1);
        assert!(s.get(slot(CHUNK)).is_none());
        assert!(s.get_mut(slot(CHUNK)).is_none());
        s.put(slot(9), 1);
        if let Some(v) = s.get_mut(slot(9)) {
            *v += 41;
        }
        assert_eq!(s.get(slot(9)), Some(&42));
    }
}
