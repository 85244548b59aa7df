//! Exception RX: an `RX.TAIL` doorbell written while the model is in the middle of a
//! poll (after its register scan, before a frame is punted) posts buffers the frame
//! must be able to use (device.md section 13.3: `NO_BUF` only when `HEAD == TAIL`).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{BUF_LEN, Host, RX_OFF, RXBUF_OFF};
use ctoffload_hw_regs::regs::{self, Ctrl, Status};
use ctoffload_hw_regs::{Iova, RxDescriptor, RxReason};
use ctoffload_nic_sim::SharedRegion;
use ctoffload_nic_sim::port::{FrameBatch, PortBackend, PortStats};

/// A port that behaves like a driver on another CPU: when the model asks it for frames
/// (the datapath phase of a poll), it first writes `RX.TAIL` (buffers already
/// written), then delivers one frame.
#[derive(Debug)]
struct PostsWhileReceiving {
    bar: Arc<SharedRegion>,
    tail: u32,
    frame: Option<Vec<u8>>,
}

impl PortBackend for PostsWhileReceiving {
    fn recv_batch(
        &mut self,
        batch: &mut FrameBatch,
        _max: usize,
    ) -> ctoffload_nic_sim::Result<usize> {
        let Some(f) = self.frame.take() else {
            return Ok(0);
        };
        self.bar
            .store_u32_release(u64::from(regs::RX_TAIL.get()), self.tail)?;
        batch.push(&f)?;
        Ok(1)
    }
    fn send(&mut self, _frame: &[u8]) -> ctoffload_nic_sim::Result<()> {
        Ok(())
    }
    fn stats(&self) -> PortStats {
        PortStats::default()
    }
}

fn non_ip_frame() -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.resize(64, 0x5a);
    f
}

#[test]
fn tail_written_during_a_poll_is_seen_before_no_buf() {
    let mut h = Host::small();
    h.program_rings();
    h.w1c(regs::INT_CAUSE, 0x1F);
    h.wr(regs::CTRL, Ctrl::ENABLE.bits());
    h.poll();
    assert!(h.status().contains(Status::ENABLED));

    // The "driver" has written descriptor 0 but not yet rung the doorbell.
    let buf = Iova::new(Host::iova(RXBUF_OFF));
    let d = RxDescriptor::posted(buf, u16::try_from(BUF_LEN).unwrap());
    h.dma.write_bytes(RX_OFF, &d.to_bytes()).unwrap();
    let frame = non_ip_frame();
    let port = PostsWhileReceiving {
        bar: Arc::clone(&h.bar),
        tail: 1,
        frame: Some(frame.clone()),
    };
    h.sim.attach_port(0, Box::new(port)).unwrap();

    h.poll();
    assert_eq!(
        h.rd(regs::STAT_RX_NO_BUF),
        0,
        "dropped with a buffer posted"
    );
    let got = h.reap_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0.reason().unwrap(), RxReason::NonIp);
    assert_eq!(got[0].1, frame);
    assert_eq!(h.sim.stats().rx_doorbells, 1, "the doorbell counts once");
}

#[test]
fn empty_ring_still_drops_with_no_buf() {
    let mut h = Host::small();
    h.program_rings();
    h.wr(regs::CTRL, Ctrl::ENABLE.bits());
    h.poll();
    h.inject(0, &non_ip_frame());
    h.poll();
    assert_eq!(h.rd(regs::STAT_RX_NO_BUF), 1);
    assert!(h.reap_rx().is_empty());
}
