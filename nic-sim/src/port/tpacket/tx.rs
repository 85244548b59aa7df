//! The transmit ring: fixed-size frames (the `TPACKET_V2` scheme; on a `TPACKET_V3`
//! socket each frame starts with a `tpacket3_hdr` whose `tp_next_offset` must be 0).
//!
//! A frame we own has status `TP_STATUS_AVAILABLE`: we copy the packet in after the
//! header, set `tp_len`, and hand it over with `TP_STATUS_SEND_REQUEST`. One `send()`
//! with no data makes the kernel transmit every requested frame in ring order; it marks
//! each `TP_STATUS_SENDING` while the packet is in flight and `TP_STATUS_AVAILABLE`
//! again once the device is done with it. `PACKET_LOSS` is set on the socket, so a
//! frame the kernel refuses is skipped (made available) instead of stopping the ring.

use std::mem::offset_of;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

use super::map::RingMap;
use crate::error::{Error, Result};
use crate::port::PortStats;

/// Offsets in a transmit frame (pinned by a test).
mod field {
    use super::offset_of;
    use libc::tpacket3_hdr;

    pub const NEXT_OFFSET: usize = offset_of!(tpacket3_hdr, tp_next_offset);
    pub const SNAPLEN: usize = offset_of!(tpacket3_hdr, tp_snaplen);
    pub const LEN: usize = offset_of!(tpacket3_hdr, tp_len);
    pub const STATUS: usize = offset_of!(tpacket3_hdr, tp_status);
    /// Where the packet starts: the kernel reads it at `TPACKET3_HDRLEN -
    /// sizeof(sockaddr_ll)`, the aligned header length, unless `PACKET_TX_HAS_OFF` is
    /// set (it is not).
    pub const DATA: usize = libc::TPACKET3_HDRLEN - std::mem::size_of::<libc::sockaddr_ll>();
}

/// Frames requested before the kernel is told to send them, within one batch: a long
/// batch goes out in pieces instead of filling the ring first.
const KICK_EVERY: usize = 64;

/// The transmit side of a packet ring: `frames` frames of `frame_size` bytes,
/// `frames_per_block` to a block of `block_size` bytes, at `base` in the mapping.
#[derive(Debug)]
pub(crate) struct TxRing {
    base: usize,
    block_size: usize,
    frame_size: usize,
    frames_per_block: usize,
    frames: usize,
    /// The frame the next packet goes into.
    next: usize,
    /// Requested frames the kernel has not taken yet (its last `send()` was refused
    /// for want of socket buffer space): the next batch, or [`TxRing::flush`], asks
    /// again.
    unsent: bool,
}

impl TxRing {
    /// A ring of `frames` frames (`frame_size` bytes, `frames_per_block` to a block of
    /// `block_size` bytes) starting at `base`.
    pub(crate) fn new(
        base: usize,
        block_size: usize,
        frame_size: usize,
        frames_per_block: usize,
        frames: usize,
    ) -> Self {
        Self {
            base,
            block_size,
            frame_size,
            frames_per_block,
            frames,
            next: 0,
            unsent: false,
        }
    }

    /// The largest packet a frame holds.
    pub(crate) fn max_packet(&self) -> usize {
        self.frame_size.saturating_sub(field::DATA)
    }

    fn frame_start(&self, i: usize) -> usize {
        self.base
            + (i / self.frames_per_block) * self.block_size
            + (i % self.frames_per_block) * self.frame_size
    }

    /// Whether the frame at `at` is ours to fill (`TP_STATUS_WRONG_FORMAT` only appears
    /// without `PACKET_LOSS`; such a frame is ours again too).
    fn is_free(map: &RingMap, at: usize) -> Result<bool> {
        // Acquire: the kernel stopped reading the frame's bytes before it made the frame
        // available; our writes to it come after this load.
        let status = map.load_u32_acquire(at + field::STATUS)?;
        Ok(status & (libc::TP_STATUS_SEND_REQUEST | libc::TP_STATUS_SENDING) == 0)
    }

    /// Queues `frames` and has the kernel send them: a `send()` per [`KICK_EVERY`]
    /// frames and one at the end. A frame that finds the ring full, even after the
    /// kernel was asked to drain it, is dropped and counted, as on a congested wire.
    ///
    /// # Errors
    /// A frame longer than a ring frame holds, or `send()` failed for another reason
    /// than a full socket buffer.
    pub(crate) fn send<'a>(
        &mut self,
        map: &RingMap,
        fd: BorrowedFd<'_>,
        frames: impl Iterator<Item = &'a [u8]>,
        stats: &mut PortStats,
    ) -> Result<()> {
        let mut queued = 0;
        for frame in frames {
            if frame.len() > self.max_packet() {
                return Err(Error::FrameTooLong {
                    len: frame.len(),
                    max: self.max_packet(),
                });
            }
            let at = self.frame_start(self.next);
            if !Self::is_free(map, at)? {
                self.kick(fd)?;
                queued = 0;
                if !Self::is_free(map, at)? {
                    stats.tx_dropped += 1;
                    continue;
                }
            }
            let len = u32::try_from(frame.len()).unwrap_or(u32::MAX);
            map.copy_in(at + field::DATA, frame)?;
            map.write_u32(at + field::LEN, len)?;
            map.write_u32(at + field::SNAPLEN, len)?;
            map.write_u32(at + field::NEXT_OFFSET, 0)?;
            // Release: the packet bytes and length above are written before the kernel
            // can see the request and read them.
            map.store_u32_release(at + field::STATUS, libc::TP_STATUS_SEND_REQUEST)?;
            stats.tx_frames += 1;
            stats.tx_bytes += u64::from(len);
            self.next = (self.next + 1) % self.frames;
            queued += 1;
            if queued == KICK_EVERY {
                self.kick(fd)?;
                queued = 0;
            }
        }
        if queued > 0 || self.unsent {
            self.kick(fd)?;
        }
        Ok(())
    }

    /// Asks the kernel again for frames an earlier `send()` left in the ring.
    pub(crate) fn flush(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        if self.unsent {
            self.kick(fd)?;
        }
        Ok(())
    }

    /// One `send()` without data: the kernel transmits the requested frames.
    fn kick(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        loop {
            // SAFETY: a null buffer of length 0 is valid for send(); with a TX ring the
            // kernel takes the packets from the ring mapping, which outlives the call.
            let rc = unsafe { libc::send(fd.as_raw_fd(), ptr::null(), 0, libc::MSG_DONTWAIT) };
            if rc >= 0 {
                self.unsent = false;
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => {}
                Some(libc::EAGAIN | libc::ENOBUFS) => {
                    self.unsent = true;
                    return Ok(());
                }
                _ => return Err(Error::io("send (TX ring)", e)),
            }
        }
    }
}
