//! The table's bounded queue of [`Event`]s for the agent's event stream.
//!
//! The event of a new untranslated IPv4 connection (the common create path) is queued
//! as its two tuples packed ([`PackedV4`], 16 bytes each) and built into an
//! [`Event::New`] with full [`Tuple`](crate::tuple::Tuple)s only when the queue is drained: the create path
//! does not build them. What a drain yields is the same either way.

use super::Event;
use crate::tuple::PackedV4;

/// An event as it waits in the queue.
#[derive(Debug, Clone, Copy)]
enum Queued {
    /// Any event, built.
    Built(Event),
    /// [`Event::New`] of the connection `id` with these original and reply tuples.
    NewV4 { id: u64, tuples: [PackedV4; 2] },
}

impl Queued {
    #[inline]
    fn event(self) -> Event {
        match self {
            Queued::Built(ev) => ev,
            Queued::NewV4 { id, tuples } => Event::New {
                id,
                tuples: tuples.map(PackedV4::unpack),
            },
        }
    }
}

/// Events in order, at most `cap` undrained; allocated once.
#[derive(Debug)]
pub(super) struct EventQueue {
    queued: Vec<Queued>,
    cap: usize,
}

impl EventQueue {
    /// A queue for at most `cap` undrained events.
    pub(super) fn new(cap: usize) -> Self {
        Self {
            queued: Vec::with_capacity(cap),
            cap,
        }
    }

    #[inline]
    fn push(&mut self, q: Queued) -> bool {
        let room = self.queued.len() < self.cap;
        if room {
            self.queued.push(q);
        }
        room
    }

    /// Queue `ev`; false (and nothing queued) when the queue is full.
    #[inline]
    pub(super) fn push_event(&mut self, ev: Event) -> bool {
        self.push(Queued::Built(ev))
    }

    /// Queue [`Event::New`] of connection `id` whose original and reply tuples are
    /// `tuples`, packed; false (and nothing queued) when the queue is full.
    #[inline]
    pub(super) fn push_new_v4(&mut self, id: u64, tuples: [PackedV4; 2]) -> bool {
        self.push(Queued::NewV4 { id, tuples })
    }

    /// Take the queued events, in order.
    pub(super) fn drain(
        &mut self,
    ) -> impl DoubleEndedIterator<Item = Event> + ExactSizeIterator + '_ {
        self.queued.drain(..).map(Queued::event)
    }

    /// Bytes of heap held.
    pub(super) fn heap_bytes(&self) -> usize {
        self.queued.capacity() * size_of::<Queued>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Counter, RemoveReason, Status};
    use crate::tuple::{Tuple, proto};

    fn tuple(port: u16) -> Tuple {
        Tuple {
            zone: 7,
            ..Tuple::v4([10, 0, 0, 1], port, [10, 0, 0, 2], 80, proto::TCP)
        }
    }

    #[test]
    fn packed_new_events_drain_as_built_ones_in_order_and_the_cap_holds() {
        let (a, b) = (tuple(1000), tuple(2000));
        let (ra, rb) = (a.invert().expect("tcp"), b.invert().expect("tcp"));
        let pa = a.pack_v4().expect("v4");
        let pra = ra.pack_v4().expect("v4");
        let mut q = EventQueue::new(3);
        assert!(q.push_new_v4(5, [pa, pra]));
        let destroy = Event::Destroy {
            id: 5,
            tuples: [a, ra],
            counters: [Counter::default(); 2],
            reason: RemoveReason::Closed,
            status: Status::DYING,
        };
        assert!(q.push_event(destroy));
        assert!(q.push_event(Event::New {
            id: 6,
            tuples: [b, rb],
        }));
        assert!(!q.push_new_v4(7, [pa, pra]), "full: refused");
        let drained: Vec<Event> = q.drain().collect();
        assert_eq!(
            drained,
            vec![
                Event::New {
                    id: 5,
                    tuples: [a, ra]
                },
                destroy,
                Event::New {
                    id: 6,
                    tuples: [b, rb]
                },
            ]
        );
        assert_eq!(q.drain().len(), 0);
        assert!(q.push_new_v4(8, [pa, pra]), "room again after the drain");
    }
}
