//! The window-tracking state of TCP connections, kept beside the table rather than in
//! every entry.
//!
//! A [`TcpConn`] is 60 bytes; only TCP connections need one, and the established path
//! of the other protocols never reads it. The entry keeps the TCP state (one byte, see
//! [`super::TcpSummary`]) and the rest lives here, indexed by the entry's table slot, in
//! chunks of `CHUNK` slots allocated the first time a TCP connection takes a slot of
//! the chunk (on the create path, never on a packet of an existing connection). A table
//! that holds no TCP connection allocates none; one whose TCP connections are spread over
//! every chunk holds 60 bytes for each slot, as the entry itself did before.
//!
//! Nothing is freed when a connection leaves the table: the slot's state is overwritten
//! by the next TCP connection created in it, and read only while the entry in the slot
//! is TCP.

use crate::table::Slot;
use crate::tcp::TcpConn;

/// Slots per chunk.
const CHUNK: usize = 4096;

/// TCP window state by table slot. See the module documentation.
#[derive(Debug)]
pub(crate) struct TcpStore {
    chunks: Vec<Option<Box<[TcpConn]>>>,
}

#[inline]
fn split(slot: Slot) -> (usize, usize) {
    // u32 always fits in usize on the 32/64-bit targets this crate supports.
    let i = usize::try_from(slot.0).unwrap_or(usize::MAX);
    (i / CHUNK, i % CHUNK)
}

impl TcpStore {
    /// A store for a table of `slots` slots; allocates only the chunk directory.
    pub(crate) fn new(slots: usize) -> Self {
        let mut chunks = Vec::new();
        chunks.resize_with(slots.div_ceil(CHUNK), || None);
        Self { chunks }
    }

    /// Store the state of the TCP connection just created in `slot`.
    pub(crate) fn put(&mut self, slot: Slot, conn: TcpConn) {
        let (c, i) = split(slot);
        if let Some(chunk) = self.chunks.get_mut(c) {
            let chunk = chunk.get_or_insert_with(|| vec![conn; CHUNK].into_boxed_slice());
            chunk[i] = conn;
        }
    }

    /// The state stored for `slot` (meaningful only while its entry is TCP).
    #[inline]
    pub(crate) fn get(&self, slot: Slot) -> Option<&TcpConn> {
        let (c, i) = split(slot);
        self.chunks.get(c)?.as_ref()?.get(i)
    }

    /// The state stored for `slot`, mutable.
    #[inline]
    pub(crate) fn get_mut(&mut self, slot: Slot) -> Option<&mut TcpConn> {
        let (c, i) = split(slot);
        self.chunks.get_mut(c)?.as_mut()?.get_mut(i)
    }

    /// Bytes of heap held: the chunk directory and every allocated chunk.
    pub(crate) fn heap_bytes(&self) -> usize {
        let chunks = self.chunks.iter().flatten().count();
        self.chunks.capacity() * size_of::<Option<Box<[TcpConn]>>>()
            + chunks * CHUNK * size_of::<TcpConn>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tcp::{TcpConfig, TcpFlags, TcpSegment, TcpState};

    fn syn(seq: u32) -> TcpConn {
        let seg = TcpSegment {
            flags: TcpFlags::SYN,
            seq,
            ack: 0,
            window: 1000,
            payload_len: 0,
            has_options: false,
            wscale: None,
            sack_permitted: false,
            highest_sack_edge: None,
        };
        TcpConn::new(&seg, &TcpConfig::default())
            .expect("a SYN opens")
            .0
    }

    #[test]
    fn chunks_are_allocated_on_first_use_only() {
        let mut s = TcpStore::new(3 * CHUNK + 1);
        let empty = s.heap_bytes();
        assert_eq!(empty, 4 * size_of::<Option<Box<[TcpConn]>>>());
        assert!(
            s.get(Slot(5)).is_none(),
            "nothing stored, nothing allocated"
        );
        s.put(Slot(5), syn(1));
        s.put(Slot(6), syn(2));
        assert_eq!(s.heap_bytes(), empty + CHUNK * size_of::<TcpConn>());
        s.put(Slot(u32::try_from(3 * CHUNK).expect("small")), syn(3));
        assert_eq!(s.heap_bytes(), empty + 2 * CHUNK * size_of::<TcpConn>());
        assert_eq!(s.get(Slot(5)), Some(&syn(1)));
        assert_eq!(s.get(Slot(6)), Some(&syn(2)));
        assert_eq!(s.get(Slot(6)).map(TcpConn::state), Some(TcpState::SynSent));
    }

    #[test]
    fn slots_beyond_the_table_are_ignored() {
        let mut s = TcpStore::new(10);
        let far = Slot(u32::try_from(CHUNK).expect("small"));
        s.put(far, syn(1));
        assert!(s.get(far).is_none());
        assert!(s.get_mut(far).is_none());
        s.put(Slot(9), syn(1));
        if let Some(c) = s.get_mut(Slot(9)) {
            c.set_be_liberal();
        }
        assert_ne!(s.get(Slot(9)), Some(&syn(1)), "changed in place");
    }
}
