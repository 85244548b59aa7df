//! In-memory ports for tests and benchmarks.
//!
//! [`MemPort::pair`] makes two connected ends: what one sends, the other receives. Give
//! one end to the device and keep the other to inject frames and collect what the
//! device sent. Each direction is a bounded queue of preallocated frame buffers; a send
//! into a full queue drops the frame and counts it (`tx_dropped` at the sender,
//! `rx_dropped` at the receiver), as a NIC's full receive ring would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{FRAME_BUF_SIZE, FrameBatch, PortBackend, PortStats};
use crate::error::{Error, Result};

/// A bounded FIFO of frames in fixed buffers.
#[derive(Debug)]
struct Ring {
    slots: Box<[[u8; FRAME_BUF_SIZE]]>,
    lens: Box<[usize]>,
    head: usize,
    count: usize,
}

impl Ring {
    fn new(capacity: usize) -> Self {
        Self {
            slots: vec![[0u8; FRAME_BUF_SIZE]; capacity].into_boxed_slice(),
            lens: vec![0; capacity].into_boxed_slice(),
            head: 0,
            count: 0,
        }
    }

    /// Appends a frame (at most `FRAME_BUF_SIZE` bytes); `false` when full.
    fn push(&mut self, frame: &[u8]) -> bool {
        let cap = self.slots.len();
        if self.count == cap {
            return false;
        }
        let tail = (self.head + self.count) % cap;
        self.slots[tail][..frame.len()].copy_from_slice(frame);
        self.lens[tail] = frame.len();
        self.count += 1;
        true
    }

    /// The oldest frame, without removing it.
    fn front(&self) -> Option<&[u8]> {
        (self.count > 0).then(|| &self.slots[self.head][..self.lens[self.head]])
    }

    fn pop(&mut self) {
        if self.count > 0 {
            self.head = (self.head + 1) % self.slots.len();
            self.count -= 1;
        }
    }
}

/// One direction between two ends.
#[derive(Debug)]
struct Queue {
    ring: Mutex<Ring>,
    dropped: AtomicU64,
}

impl Queue {
    fn new(capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            ring: Mutex::new(Ring::new(capacity)),
            dropped: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panicking peer cannot leave the ring inconsistent (every mutation completes
        // before the guard drops), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One end of an in-memory link.
#[derive(Debug)]
pub struct MemPort {
    rx: Arc<Queue>,
    tx: Arc<Queue>,
    stats: PortStats,
}

impl MemPort {
    /// Two connected ends, each direction holding up to `capacity` frames.
    pub fn pair(capacity: usize) -> (MemPort, MemPort) {
        let (a_to_b, b_to_a) = (Queue::new(capacity), Queue::new(capacity));
        let a = MemPort {
            rx: Arc::clone(&b_to_a),
            tx: Arc::clone(&a_to_b),
            stats: PortStats::default(),
        };
        let b = MemPort {
            rx: a_to_b,
            tx: b_to_a,
            stats: PortStats::default(),
        };
        (a, b)
    }

    /// Frames waiting to be received at this end.
    pub fn pending(&self) -> usize {
        self.rx.lock().count
    }

    /// Receives one frame into a new `Vec` (allocates: for tests).
    pub fn recv_vec(&mut self) -> Option<Vec<u8>> {
        let mut ring = self.rx.lock();
        let frame = ring.front()?.to_vec();
        ring.pop();
        drop(ring);
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += len_u64(frame.len());
        Some(frame)
    }

    /// Receives every waiting frame into `Vec`s (allocates: for tests).
    pub fn drain_vecs(&mut self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.recv_vec()).collect()
    }
}

impl PortBackend for MemPort {
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize> {
        let mut ring = self.rx.lock();
        let (bufs, lens) = batch.spare_mut();
        let n = max.min(bufs.len()).min(ring.count);
        let mut bytes = 0;
        for (buf, len) in bufs.iter_mut().zip(lens.iter_mut()).take(n) {
            let Some(frame) = ring.front() else { break };
            buf[..frame.len()].copy_from_slice(frame);
            *len = frame.len();
            bytes += frame.len();
            ring.pop();
        }
        drop(ring);
        batch.commit(n);
        self.stats.rx_frames += len_u64(n);
        self.stats.rx_bytes += len_u64(bytes);
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> Result<()> {
        if frame.len() > FRAME_BUF_SIZE {
            return Err(Error::FrameTooLong {
                len: frame.len(),
                max: FRAME_BUF_SIZE,
            });
        }
        if self.tx.lock().push(frame) {
            self.stats.tx_frames += 1;
            self.stats.tx_bytes += len_u64(frame.len());
        } else {
            self.tx.dropped.fetch_add(1, Ordering::Relaxed);
            self.stats.tx_dropped += 1;
        }
        Ok(())
    }

    fn send_batch(&mut self, batch: &FrameBatch) -> Result<()> {
        // One lock for the whole batch.
        if let Some(len) = batch.iter().map(<[u8]>::len).find(|&l| l > FRAME_BUF_SIZE) {
            return Err(Error::FrameTooLong {
                len,
                max: FRAME_BUF_SIZE,
            });
        }
        let mut ring = self.tx.lock();
        for frame in batch.iter() {
            if ring.push(frame) {
                self.stats.tx_frames += 1;
                self.stats.tx_bytes += len_u64(frame.len());
            } else {
                self.tx.dropped.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_dropped += 1;
            }
        }
        Ok(())
    }

    fn stats(&self) -> PortStats {
        PortStats {
            rx_dropped: self.rx.dropped.load(Ordering::Relaxed),
            ..self.stats
        }
    }
}

#[inline]
fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_in_order_both_ways() {
        let (mut dev, mut test) = MemPort::pair(8);
        test.send(b"first").expect("send");
        test.send(b"second").expect("send");
        let mut batch = FrameBatch::new(4);
        assert_eq!(dev.recv_batch(&mut batch, 16).expect("recv"), 2);
        assert_eq!(batch.get(0), Some(&b"first"[..]));
        assert_eq!(batch.get(1), Some(&b"second"[..]));
        assert_eq!(dev.recv_batch(&mut batch, 16).expect("recv"), 0);
        dev.send_batch(&batch).expect("send");
        assert_eq!(
            test.drain_vecs(),
            vec![b"first".to_vec(), b"second".to_vec()]
        );
        let s = dev.stats();
        assert_eq!(
            (s.rx_frames, s.rx_bytes, s.tx_frames, s.tx_bytes),
            (2, 11, 2, 11)
        );
    }

    #[test]
    fn full_queue_drops_and_counts() {
        let (mut dev, mut test) = MemPort::pair(2);
        for i in 0..5u8 {
            test.send(&[i]).expect("send");
        }
        assert_eq!(test.stats().tx_dropped, 3);
        assert_eq!(dev.stats().rx_dropped, 3);
        assert_eq!(dev.pending(), 2);
        assert_eq!(dev.drain_vecs(), vec![vec![0], vec![1]]);
        // Wrap-around after draining.
        for i in 5..7u8 {
            test.send(&[i]).expect("send");
        }
        assert_eq!(dev.drain_vecs(), vec![vec![5], vec![6]]);
    }

    #[test]
    fn recv_respects_max_and_batch_room() {
        let (mut dev, mut test) = MemPort::pair(16);
        for i in 0..10u8 {
            test.send(&[i; 60]).expect("send");
        }
        let mut batch = FrameBatch::new(4);
        batch.push(b"already here").expect("push");
        assert_eq!(dev.recv_batch(&mut batch, 2).expect("recv"), 2);
        assert_eq!(dev.recv_batch(&mut batch, 10).expect("recv"), 1);
        assert_eq!(batch.len(), 4);
        assert_eq!(batch.get(3), Some(&[2u8; 60][..]));
        assert_eq!(dev.pending(), 7);
    }

    #[test]
    fn oversize_frame_is_refused() {
        let (_dev, mut test) = MemPort::pair(2);
        assert!(matches!(
            test.send(&[0; FRAME_BUF_SIZE + 1]),
            Err(Error::FrameTooLong { .. })
        ));
    }

    #[test]
    fn ends_work_across_threads() {
        let (mut dev, mut test) = MemPort::pair(64);
        let echo = std::thread::spawn(move || {
            let mut batch = FrameBatch::new(8);
            let mut echoed = 0;
            while echoed < 100 {
                batch.clear();
                echoed += dev.recv_batch(&mut batch, 8).expect("recv");
                dev.send_batch(&batch).expect("send");
                std::thread::yield_now();
            }
        });
        let mut got = Vec::new();
        for i in 0..100u8 {
            test.send(&[i]).expect("send");
            let frame = loop {
                if let Some(f) = test.recv_vec() {
                    break f;
                }
                std::thread::yield_now();
            };
            got.push(frame[0]);
        }
        echo.join().expect("echo");
        assert_eq!(got, (0..100).collect::<Vec<u8>>());
    }
}
