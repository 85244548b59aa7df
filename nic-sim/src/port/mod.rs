//! The datapath's network ports: where frames enter and leave the simulated device.
//!
//! Back-ends are batch oriented and allocate nothing per frame: frames move through a
//! reusable [`FrameBatch`] of fixed [`FRAME_BUF_SIZE`]-byte buffers.

use std::fmt;

use crate::error::{Error, Result};

pub mod af_packet;
pub mod mem_queue;
pub mod tpacket;

pub use af_packet::{AfPacketConfig, AfPacketIo, AfPacketPort};
pub use mem_queue::MemPort;
pub use tpacket::RingConfig;

/// Size of one frame buffer; longer frames are dropped (and counted) on receive and
/// refused on send.
pub const FRAME_BUF_SIZE: usize = 2048;

/// A reusable batch of frames: `capacity` buffers of [`FRAME_BUF_SIZE`] bytes, of which
/// the first [`FrameBatch::len`] hold frames.
pub struct FrameBatch {
    bufs: Box<[[u8; FRAME_BUF_SIZE]]>,
    lens: Box<[usize]>,
    count: usize,
}

impl fmt::Debug for FrameBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrameBatch")
            .field("capacity", &self.bufs.len())
            .field("lens", &&self.lens[..self.count])
            .finish()
    }
}

impl FrameBatch {
    /// An empty batch with room for `capacity` frames (allocated once, here).
    pub fn new(capacity: usize) -> Self {
        Self {
            bufs: vec![[0u8; FRAME_BUF_SIZE]; capacity].into_boxed_slice(),
            lens: vec![0; capacity].into_boxed_slice(),
            count: 0,
        }
    }

    /// How many frames the batch can hold.
    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// How many frames it holds.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether it holds no frame.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many more frames fit.
    pub fn spare(&self) -> usize {
        self.bufs.len() - self.count
    }

    /// Forgets all frames (keeps the buffers).
    pub fn clear(&mut self) {
        self.count = 0;
    }

    /// Keeps only the first `len` frames.
    pub fn truncate(&mut self, len: usize) {
        self.count = self.count.min(len);
    }

    /// Frame `i`.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        if i >= self.count {
            return None;
        }
        Some(&self.bufs[i][..self.lens[i]])
    }

    /// Frame `i`, for rewriting in place.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        if i >= self.count {
            return None;
        }
        Some(&mut self.bufs[i][..self.lens[i]])
    }

    /// Iterates over the frames.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u8]> + Clone + '_ {
        self.bufs[..self.count]
            .iter()
            .zip(&self.lens[..self.count])
            .map(|(b, &l)| &b[..l])
    }

    /// Appends a copy of `frame`.
    pub fn push(&mut self, frame: &[u8]) -> Result<()> {
        let len = frame.len();
        if len > FRAME_BUF_SIZE {
            return Err(Error::FrameTooLong {
                len,
                max: FRAME_BUF_SIZE,
            });
        }
        let Some(buf) = self.bufs.get_mut(self.count) else {
            return Err(Error::BatchFull {
                capacity: self.bufs.len(),
            });
        };
        buf[..len].copy_from_slice(frame);
        self.lens[self.count] = len;
        self.count += 1;
        Ok(())
    }

    /// The free buffers and their length slots, for a back-end to fill in place before
    /// [`FrameBatch::commit`].
    pub(crate) fn spare_mut(&mut self) -> (&mut [[u8; FRAME_BUF_SIZE]], &mut [usize]) {
        (&mut self.bufs[self.count..], &mut self.lens[self.count..])
    }

    /// Takes the first `n` spare buffers, whose lengths the back-end has set, as frames.
    pub(crate) fn commit(&mut self, n: usize) {
        debug_assert!(n <= self.spare());
        self.count = (self.count + n).min(self.bufs.len());
    }
}

/// Per-port counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Frames lost on receive (queue full, or longer than a frame buffer).
    pub rx_dropped: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Frames lost on send (peer queue or socket buffer full).
    pub tx_dropped: u64,
}

/// A port back-end: a source and sink of Ethernet frames.
///
/// Like a wire, a port may drop under load: such drops count in [`PortStats`] and are
/// not errors. Errors mean a bad frame or a broken back-end.
pub trait PortBackend: Send + fmt::Debug {
    /// Appends up to `max` received frames to `batch` (fewer if it has less room or
    /// fewer are waiting) without blocking; returns how many.
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize>;

    /// Sends one frame (at most [`FRAME_BUF_SIZE`] bytes).
    fn send(&mut self, frame: &[u8]) -> Result<()>;

    /// Sends every frame of `batch`.
    fn send_batch(&mut self, batch: &FrameBatch) -> Result<()> {
        for frame in batch.iter() {
            self.send(frame)?;
        }
        Ok(())
    }

    /// The port's counters.
    fn stats(&self) -> PortStats;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_push_get_and_limits() {
        let mut b = FrameBatch::new(2);
        assert!(b.is_empty());
        b.push(b"one").expect("push");
        b.push(&[7u8; FRAME_BUF_SIZE]).expect("push");
        assert!(matches!(
            b.push(b"x"),
            Err(Error::BatchFull { capacity: 2 })
        ));
        assert_eq!(b.len(), 2);
        assert_eq!(b.get(0), Some(&b"one"[..]));
        assert_eq!(b.get(1).map(<[u8]>::len), Some(FRAME_BUF_SIZE));
        assert_eq!(b.get(2), None);
        b.get_mut(0).expect("frame")[0] = b'O';
        assert_eq!(b.iter().next(), Some(&b"One"[..]));
        b.truncate(1);
        assert_eq!(b.iter().len(), 1);
        b.clear();
        assert!(matches!(
            b.push(&[0u8; FRAME_BUF_SIZE + 1]),
            Err(Error::FrameTooLong {
                len: 2049,
                max: 2048
            })
        ));
        assert_eq!(b.spare(), 2);
    }
}
