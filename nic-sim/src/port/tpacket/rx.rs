//! The `TPACKET_V3` receive ring: the kernel fills blocks of variable-sized frames and
//! hands a block over by setting `TP_STATUS_USER` in its `block_status` (when the block
//! is full or its retire timeout expires); we copy the block's frames out in order and
//! give it back with `TP_STATUS_KERNEL`.
//!
//! ```text
//!  block i (tp_block_size bytes, at i * tp_block_size)
//!  ┌ tpacket_block_desc: block_status, num_pkts, offset_to_first_pkt ...
//!  ├ tpacket3_hdr ─ tp_next_offset ─> tpacket3_hdr ─> ... (num_pkts frames)
//!  │   frame bytes at hdr + tp_mac, tp_snaplen long; VLAN tag in hv1 when
//!  │   TP_STATUS_VLAN_VALID
//! ```
//!
//! A batch may end in the middle of a block: the walk keeps its place and returns the
//! block only once every frame in it was taken.

use std::mem::offset_of;

use super::map::RingMap;
use crate::port::af_packet::{ETHERTYPE_OFFSET, TPID_8021Q, VLAN_TAG_LEN, insert_vlan_tag};
use crate::port::{FRAME_BUF_SIZE, FrameBatch, PortStats};

/// Offsets of the header words the walk reads (from the `libc` definitions of the
/// kernel's structures; pinned by a test).
mod field {
    use super::offset_of;
    use libc::{tpacket_block_desc, tpacket_hdr_v1, tpacket_hdr_variant1, tpacket3_hdr};

    /// `tpacket_block_desc.hdr.bh1` (the union's only member, at its start).
    const BH1: usize = offset_of!(tpacket_block_desc, hdr);
    pub const BLOCK_STATUS: usize = BH1 + offset_of!(tpacket_hdr_v1, block_status);
    pub const NUM_PKTS: usize = BH1 + offset_of!(tpacket_hdr_v1, num_pkts);
    pub const OFFSET_TO_FIRST_PKT: usize = BH1 + offset_of!(tpacket_hdr_v1, offset_to_first_pkt);
    pub const BLOCK_DESC_LEN: usize = std::mem::size_of::<tpacket_block_desc>();

    pub const NEXT_OFFSET: usize = offset_of!(tpacket3_hdr, tp_next_offset);
    pub const SNAPLEN: usize = offset_of!(tpacket3_hdr, tp_snaplen);
    pub const LEN: usize = offset_of!(tpacket3_hdr, tp_len);
    pub const STATUS: usize = offset_of!(tpacket3_hdr, tp_status);
    pub const MAC: usize = offset_of!(tpacket3_hdr, tp_mac);
    const HV1: usize = offset_of!(tpacket3_hdr, hv1);
    pub const VLAN_TCI: usize = HV1 + offset_of!(tpacket_hdr_variant1, tp_vlan_tci);
    pub const VLAN_TPID: usize = HV1 + offset_of!(tpacket_hdr_variant1, tp_vlan_tpid);
    pub const FRAME_HDR_LEN: usize = std::mem::size_of::<tpacket3_hdr>();
}

/// Where the walk is inside the block it holds.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Frames of the block not taken yet.
    left: u32,
    /// Offset of the next frame's header from the block's start.
    offset: usize,
}

/// What one frame header says.
#[derive(Debug, Clone, Copy)]
struct FrameHeader {
    next_offset: usize,
    snaplen: usize,
    len: usize,
    status: u32,
    mac: usize,
    vlan_tci: u16,
    vlan_tpid: u16,
}

/// The receive side of a `TPACKET_V3` ring: `blocks` blocks of `block_size` bytes at
/// `base` in the mapping.
#[derive(Debug)]
pub(crate) struct RxRing {
    base: usize,
    block_size: usize,
    blocks: usize,
    /// The block the walk reads next (or holds, when `cursor` is set).
    current: usize,
    /// Set while we hold `current` (its status said `TP_STATUS_USER`).
    cursor: Option<Cursor>,
    /// A block carried `TP_STATUS_LOSING`: the kernel dropped frames for want of a free
    /// block since the socket's statistics were last read.
    pub(crate) losing: bool,
}

impl RxRing {
    /// A ring of `blocks` blocks of `block_size` bytes starting at `base`.
    pub(crate) fn new(base: usize, block_size: usize, blocks: usize) -> Self {
        Self {
            base,
            block_size,
            blocks,
            current: 0,
            cursor: None,
            losing: false,
        }
    }

    fn block_start(&self) -> usize {
        self.base + self.current * self.block_size
    }

    /// Appends up to `want` frames to `batch` (bounded by its spare room); returns how
    /// many. Frames that do not fit a frame buffer or arrived truncated are counted as
    /// dropped; a header that points outside its block ends that block (its remaining
    /// frames counted as dropped).
    pub(crate) fn recv(
        &mut self,
        map: &RingMap,
        batch: &mut FrameBatch,
        want: usize,
        stats: &mut PortStats,
    ) -> usize {
        let (bufs, lens) = batch.spare_mut();
        let want = want.min(bufs.len());
        let mut taken = 0;
        while taken < want {
            let Some(mut cur) = self.cursor.or_else(|| self.acquire(map)) else {
                break; // the kernel holds the next block: nothing more waiting
            };
            while cur.left > 0 && taken < want {
                let at = cur.offset;
                let Some(hdr) = self.frame_header(map, at) else {
                    stats.rx_dropped += u64::from(cur.left);
                    cur.left = 0;
                    break;
                };
                cur.left -= 1;
                if cur.left > 0 {
                    if hdr.next_offset == 0 {
                        // A chain that does not move: the rest of the block is lost.
                        stats.rx_dropped += u64::from(cur.left);
                        cur.left = 0;
                    }
                    cur.offset = at.saturating_add(hdr.next_offset);
                }
                match self.copy_frame(map, &hdr, at, &mut bufs[taken]) {
                    Some(len) => {
                        lens[taken] = len;
                        stats.rx_frames += 1;
                        stats.rx_bytes += u64::try_from(len).unwrap_or(0);
                        taken += 1;
                    }
                    None => stats.rx_dropped += 1,
                }
            }
            if cur.left == 0 {
                self.release(map);
            } else {
                self.cursor = Some(cur);
            }
        }
        batch.commit(taken);
        taken
    }

    /// Takes the current block if the kernel handed it over.
    fn acquire(&mut self, map: &RingMap) -> Option<Cursor> {
        let start = self.block_start();
        // Acquire: the kernel fills the block's frames and header words, then publishes
        // it by setting TP_STATUS_USER (after a write barrier); our reads of them below
        // happen after this load.
        let status = map.load_u32_acquire(start + field::BLOCK_STATUS).ok()?;
        if status & libc::TP_STATUS_USER == 0 {
            return None;
        }
        if status & libc::TP_STATUS_LOSING != 0 {
            self.losing = true;
        }
        let left = map.read_u32(start + field::NUM_PKTS).ok()?;
        let first = map.read_u32(start + field::OFFSET_TO_FIRST_PKT).ok()?;
        let cur = Cursor {
            left,
            offset: usize::try_from(first).unwrap_or(usize::MAX),
        };
        self.cursor = Some(cur);
        Some(cur)
    }

    /// Gives the current block back to the kernel and moves to the next one.
    fn release(&mut self, map: &RingMap) {
        let start = self.block_start();
        // Release: every read of the block's frames above is done before the kernel can
        // see the block as its own again and overwrite it.
        let _ = map.store_u32_release(start + field::BLOCK_STATUS, libc::TP_STATUS_KERNEL);
        self.cursor = None;
        self.current = (self.current + 1) % self.blocks;
    }

    /// Reads the frame header at `offset` in the current block, if it lies inside it.
    fn frame_header(&self, map: &RingMap, offset: usize) -> Option<FrameHeader> {
        if offset < field::BLOCK_DESC_LEN
            || offset.checked_add(field::FRAME_HDR_LEN)? > self.block_size
        {
            return None;
        }
        let at = self.block_start() + offset;
        let u = |off: usize| {
            map.read_u32(at + off)
                .ok()
                .and_then(|v| usize::try_from(v).ok())
        };
        let status = map.read_u32(at + field::STATUS).ok()?;
        let tci = map.read_u32(at + field::VLAN_TCI).ok()?;
        Some(FrameHeader {
            next_offset: u(field::NEXT_OFFSET)?,
            snaplen: u(field::SNAPLEN)?,
            len: u(field::LEN)?,
            status,
            mac: usize::from(map.read_u16(at + field::MAC).ok()?),
            vlan_tci: u16::try_from(tci & 0xffff).unwrap_or(0),
            vlan_tpid: map.read_u16(at + field::VLAN_TPID).ok()?,
        })
    }

    /// Copies the frame whose header is at `hdr_offset` (block-relative) into `buf`,
    /// putting the VLAN tag the kernel took out back in; returns its length, or `None`
    /// when it is dropped.
    fn copy_frame(
        &self,
        map: &RingMap,
        hdr: &FrameHeader,
        hdr_offset: usize,
        buf: &mut [u8; FRAME_BUF_SIZE],
    ) -> Option<usize> {
        let vlan = (hdr.status & libc::TP_STATUS_VLAN_VALID != 0).then(|| {
            let tpid = if hdr.status & libc::TP_STATUS_VLAN_TPID_VALID != 0 {
                hdr.vlan_tpid
            } else {
                TPID_8021Q
            };
            (tpid, hdr.vlan_tci)
        });
        let extra = if vlan.is_some() { VLAN_TAG_LEN } else { 0 };
        let full_len = hdr.snaplen.checked_add(extra)?;
        if hdr.snaplen != hdr.len || full_len > FRAME_BUF_SIZE || hdr.snaplen < ETHERTYPE_OFFSET {
            return None;
        }
        let data = hdr_offset.checked_add(hdr.mac)?;
        if data.checked_add(hdr.snaplen)? > self.block_size {
            return None;
        }
        map.copy_out(self.block_start() + data, &mut buf[..hdr.snaplen])
            .ok()?;
        if let Some((tpid, tci)) = vlan {
            insert_vlan_tag(buf, hdr.snaplen, tpid, tci);
        }
        Some(full_len)
    }
}
