//! A host interface as a wire delivers its frames: the sending host's MAC pads frames
//! to the Ethernet minimum (60 bytes without FCS), but a packet socket hands them up
//! unpadded (a 42-byte ARP request from a veth peer), and the device drops runts
//! (`MIN_WIRE_FRAME_LEN`). [`RuntPadded`] pads what it receives; what it sends goes out
//! as it is. Used for `af-packet` ports by the `ctoffload-nic-sim` binary and by the
//! agent's in-process simulator.

use ctoffload_hw_regs::limits::MIN_WIRE_FRAME_LEN;

use crate::Result;
use crate::port::{FrameBatch, PortBackend, PortStats};

/// Frames taken from the inner port per receive call at most.
const SCRATCH_FRAMES: usize = 64;

/// `P` with received frames shorter than the wire minimum padded with zeros.
#[derive(Debug)]
pub struct RuntPadded<P> {
    inner: P,
    scratch: FrameBatch,
}

impl<P: PortBackend> RuntPadded<P> {
    /// Wraps `inner`.
    pub fn new(inner: P) -> Self {
        Self {
            inner,
            scratch: FrameBatch::new(SCRATCH_FRAMES),
        }
    }
}

impl<P: PortBackend> PortBackend for RuntPadded<P> {
    fn recv_batch(&mut self, batch: &mut FrameBatch, max: usize) -> Result<usize> {
        self.scratch.clear();
        let want = max.min(batch.spare()).min(self.scratch.capacity());
        let n = self.inner.recv_batch(&mut self.scratch, want)?;
        let min = usize::try_from(MIN_WIRE_FRAME_LEN).unwrap_or(60);
        let mut padded = [0u8; 64];
        for f in self.scratch.iter() {
            if f.len() < min && min <= padded.len() {
                padded[..f.len()].copy_from_slice(f);
                padded[f.len()..min].fill(0);
                batch.push(&padded[..min])?;
            } else {
                batch.push(f)?;
            }
        }
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> Result<()> {
        self.inner.send(frame)
    }

    fn send_batch(&mut self, batch: &FrameBatch) -> Result<()> {
        self.inner.send_batch(batch)
    }

    fn stats(&self) -> PortStats {
        self.inner.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::port::MemPort;

    #[test]
    fn runts_are_padded_and_full_frames_kept() {
        let (dev_end, mut wire) = MemPort::pair(8);
        let mut port = RuntPadded::new(dev_end);
        let arp = [0xabu8; 42];
        let full = [0x11u8; 100];
        wire.send(&arp).expect("send");
        wire.send(&full).expect("send");
        let mut batch = FrameBatch::new(8);
        assert_eq!(port.recv_batch(&mut batch, 8).expect("recv"), 2);
        let got: Vec<&[u8]> = batch.iter().collect();
        assert_eq!(got[0].len(), 60);
        assert_eq!(&got[0][..42], &arp[..]);
        assert!(got[0][42..].iter().all(|&b| b == 0));
        assert_eq!(got[1], &full[..]);
        // Sent frames are not touched.
        port.send(&arp).expect("send");
        assert_eq!(wire.recv_vec().expect("frame").len(), 42);
    }
}
