//! The event journal: a bounded, sequenced log of connection events that clients
//! read from any position still held.
//!
//! - Every record gets the next sequence number (1, 2, 3, ...); sequences have no
//!   holes, so a client that saw record `n` and resumes at `n + 1` receives every
//!   later record exactly once, in order.
//! - The journal holds at most `capacity` records and drops the oldest first. A
//!   reader whose position has been dropped gets a synthesized
//!   [`GapCause::JournalOverflow`] record naming the missing range (and how many
//!   end-of-flow records were in it, as long as the journal still remembers) before
//!   the records that follow: loss is always explicit, never silent.
//! - Events lost before they reach the journal (a worker's bounded event queue
//!   overflowed) are journaled as a [`GapCause::SourceOverflow`] record with their
//!   count, in the position where they were lost.
//! - Appending wakes readers through a [`watch`] channel that carries the next
//!   sequence number; readers never block appenders (the lock is held for copies of
//!   at most one batch).

use std::collections::VecDeque;
use std::sync::Mutex;

use tokio::sync::watch;

use super::error::ApiError;
use super::model::{Event, GapCause, JournalInfo, Record};

/// How many evicted sequences the journal remembers end-of-flow counts for, as a
/// multiple of its capacity (8 bytes each).
const EOF_MEMORY_FACTOR: usize = 16;

#[derive(Debug)]
struct Inner {
    records: VecDeque<Record>,
    next_seq: u64,
    capacity: usize,
    evicted: u64,
    source_lost: u64,
    /// End-of-flow records journaled before `records[0]`.
    eof_before_first: u64,
    /// For the most recently evicted sequences, oldest first: the number of
    /// end-of-flow records up to and including that sequence. Its last element is
    /// for `first_seq - 1`.
    evicted_eof_cum: VecDeque<u64>,
}

impl Inner {
    fn first_seq(&self) -> u64 {
        self.next_seq - self.records.len() as u64
    }

    fn evict_one(&mut self) {
        if let Some(r) = self.records.pop_front() {
            self.evicted += 1;
            if matches!(r.event, Event::EndOfFlow { .. }) {
                self.eof_before_first += 1;
            }
            if self.evicted_eof_cum.len() >= self.capacity.saturating_mul(EOF_MEMORY_FACTOR) {
                self.evicted_eof_cum.pop_front();
            }
            self.evicted_eof_cum.push_back(self.eof_before_first);
        }
    }

    /// End-of-flow records with sequence `<= seq`, for an evicted `seq` (or 0).
    fn eof_cum(&self, seq: u64) -> Option<u64> {
        if seq == 0 {
            return Some(0);
        }
        let last_evicted = self.first_seq().checked_sub(1)?;
        let back = usize::try_from(last_evicted.checked_sub(seq)?).ok()?;
        let idx = self.evicted_eof_cum.len().checked_sub(back + 1)?;
        self.evicted_eof_cum.get(idx).copied()
    }
}

/// What one read returns.
#[derive(Debug, Clone, Default)]
pub struct ReadOutcome {
    /// Records in order, a synthesized gap first when the position was evicted.
    pub records: Vec<Record>,
    /// The position to read from next.
    pub next: u64,
}

/// The journal. See the module documentation.
#[derive(Debug)]
pub struct EventJournal {
    inner: Mutex<Inner>,
    head: watch::Sender<u64>,
}

impl EventJournal {
    /// An empty journal holding at most `capacity` records (at least 1).
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            inner: Mutex::new(Inner {
                records: VecDeque::with_capacity(capacity.min(1 << 16)),
                next_seq: 1,
                capacity,
                evicted: 0,
                source_lost: 0,
                eof_before_first: 0,
                evicted_eof_cum: VecDeque::new(),
            }),
            head: watch::Sender::new(1),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, ApiError> {
        self.inner
            .lock()
            .map_err(|_| ApiError::Poisoned { what: "journal" })
    }

    /// Append events (one lock, one wake-up). Returns the next sequence number.
    pub fn append(
        &self,
        timestamp_ns: u64,
        events: impl IntoIterator<Item = Event>,
    ) -> Result<u64, ApiError> {
        let next = {
            let mut j = self.lock()?;
            for event in events {
                if let Event::Gap {
                    cause: GapCause::SourceOverflow,
                    lost_records,
                    ..
                } = event
                {
                    j.source_lost = j.source_lost.saturating_add(lost_records);
                }
                while j.records.len() >= j.capacity {
                    j.evict_one();
                }
                let seq = j.next_seq;
                j.next_seq += 1;
                j.records.push_back(Record {
                    seq,
                    timestamp_ns,
                    event,
                });
            }
            j.next_seq
        };
        self.head.send_if_modified(|h| {
            let changed = *h != next;
            *h = next;
            changed
        });
        Ok(next)
    }

    /// Read up to `max` records from sequence `from`. A `from` that was evicted yields
    /// a [`GapCause::JournalOverflow`] record first (its `seq` is the last missing
    /// sequence, so resuming after it is correct). A `from` beyond the next sequence
    /// is an error.
    pub fn read(&self, from: u64, max: usize) -> Result<ReadOutcome, ApiError> {
        let j = self.lock()?;
        let first = j.first_seq();
        if from > j.next_seq {
            return Err(ApiError::OutOfRange {
                field: "from_sequence".into(),
                reason: format!(
                    "{from} is beyond the next sequence {}; the journal restarted or the \
                     value is wrong",
                    j.next_seq
                ),
            });
        }
        let mut records = Vec::new();
        let mut pos = from.max(1);
        if pos < first {
            let last_missing = first - 1;
            let lost_eof = j
                .eof_cum(pos - 1)
                .map(|before| j.eof_before_first.saturating_sub(before));
            records.push(Record {
                seq: last_missing,
                timestamp_ns: j.records.front().map_or(0, |r| r.timestamp_ns),
                event: Event::Gap {
                    cause: GapCause::JournalOverflow,
                    first_missing: pos,
                    last_missing,
                    lost_records: first - pos,
                    lost_end_of_flow: lost_eof,
                },
            });
            pos = first;
        }
        let skip = usize::try_from(pos - first).unwrap_or(usize::MAX);
        records.extend(j.records.iter().skip(skip).take(max).copied());
        let next = records.last().map_or(pos, |r| r.seq + 1);
        Ok(ReadOutcome { records, next })
    }

    /// A receiver that changes whenever records are appended (value: next sequence).
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    /// Bounds and counters.
    pub fn info(&self) -> Result<JournalInfo, ApiError> {
        let j = self.lock()?;
        Ok(JournalInfo {
            first_sequence: j.first_seq(),
            next_sequence: j.next_seq,
            capacity: j.capacity as u64,
            evicted: j.evicted,
            source_lost: j.source_lost,
        })
    }

    /// Change the capacity, evicting the oldest records if it shrinks.
    pub fn set_capacity(&self, capacity: usize) -> Result<(), ApiError> {
        let mut j = self.lock()?;
        j.capacity = capacity.max(1);
        while j.records.len() > j.capacity {
            j.evict_one();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctoffload_fallback_sw::table::{Counter, RemoveReason, Status};
    use ctoffload_fallback_sw::tuple::Tuple;

    fn tuple() -> Tuple {
        Tuple::v4([10, 0, 0, 1], 1, [10, 0, 0, 2], 2, 17)
    }

    fn new(id: u64) -> Event {
        Event::New {
            id,
            tuples: [tuple(); 2],
        }
    }

    fn eof(id: u64) -> Event {
        Event::EndOfFlow {
            id,
            tuples: [tuple(); 2],
            counters: [Counter::default(); 2],
            hw_counters: [Counter::default(); 2],
            reason: RemoveReason::Expired,
            status: Status::empty(),
        }
    }

    #[test]
    fn reads_resume_exactly_and_overflow_is_a_counted_gap() {
        let j = EventJournal::new(4);
        j.append(0, [new(1), eof(1), new(2)]).expect("append");
        let r = j.read(1, 2).expect("read");
        assert_eq!(r.records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(r.next, 3);
        // Four more: 1..=3 are evicted (capacity 4 holds 4..=7).
        j.append(1, [eof(2), new(3), eof(3), new(4)])
            .expect("append");
        let r = j.read(3, 10).expect("read");
        match r.records[0].event {
            Event::Gap {
                cause: GapCause::JournalOverflow,
                first_missing: 3,
                last_missing: 3,
                lost_records: 1,
                lost_end_of_flow: Some(0),
            } => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(r.records[0].seq, 3);
        assert_eq!(
            r.records[1..].iter().map(|r| r.seq).collect::<Vec<_>>(),
            [4, 5, 6, 7]
        );
        // From the very start: two of the three lost records were end-of-flow? No:
        // 1 = new, 2 = eof, 3 = new.
        match j.read(1, 10).expect("read").records[0].event {
            Event::Gap {
                lost_records: 3,
                lost_end_of_flow: Some(1),
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        assert!(j.read(9, 1).is_err(), "the future is out of range");
        assert_eq!(j.read(8, 1).expect("read").records.len(), 0);
        let info = j.info().expect("info");
        assert_eq!(
            (info.first_sequence, info.next_sequence, info.evicted),
            (4, 8, 3)
        );
    }
}
