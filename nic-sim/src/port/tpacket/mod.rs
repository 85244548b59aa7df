//! Memory-mapped packet rings for [`super::AfPacketPort`]: a `TPACKET_V3` receive ring
//! (blocks of frames the kernel fills and hands over a block at a time, no system call
//! per batch) and, optionally, a transmit ring (fixed-size frames queued in shared
//! memory and sent with one `send()` per batch).
//!
//! Both rings live in one mapping of the socket, the receive ring first, as the kernel
//! lays them out (`Documentation/networking/packet_mmap.rst`). [`map`] is the only code
//! that touches that memory; [`rx`] and [`tx`] walk it through its checked accessors.

pub(crate) mod map;
pub(crate) mod rx;
pub(crate) mod tx;

use std::os::fd::OwnedFd;

use self::map::RingMap;
use self::rx::RxRing;
use self::tx::TxRing;
use super::FRAME_BUF_SIZE;
use super::af_packet::setsockopt;
use crate::error::{Error, Result};

/// The receive ring's nominal frame size (`TPACKET_V3` packs frames of any size into a
/// block; the kernel only checks `tp_frame_nr` against it).
const RX_FRAME_SIZE: u32 = 2048;
/// A transmit frame: the header, then a whole frame buffer (16-byte aligned).
const TX_FRAME_SIZE: u32 = {
    let data = libc::TPACKET3_HDRLEN - std::mem::size_of::<libc::sockaddr_ll>();
    let len = data + FRAME_BUF_SIZE;
    let aligned = (len + libc::TPACKET_ALIGNMENT - 1) & !(libc::TPACKET_ALIGNMENT - 1);
    assert!(aligned <= u32::MAX as usize);
    #[allow(clippy::cast_possible_truncation)] // checked just above
    let size = aligned as u32;
    size
};
/// A transmit block: page-aligned, holds `TX_BLOCK_SIZE / TX_FRAME_SIZE` frames.
const TX_BLOCK_SIZE: u32 = 64 * 1024;
/// Bounds on the ring settings, to refuse nonsense before the kernel sees it.
const MAX_BLOCK_SIZE: u32 = 16 << 20;
const MAX_BLOCKS: u32 = 4096;
const MAX_TX_FRAMES: u32 = 1 << 16;

/// Ring settings of an [`super::AfPacketPort`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingConfig {
    /// Bytes per receive block: a multiple of the page size, at most 16 MiB.
    pub block_size: u32,
    /// Receive blocks (1 to 4096).
    pub blocks: u32,
    /// How long (ms) the kernel fills a block before handing it over anyway
    /// (`tp_retire_blk_tov`; 0: the kernel derives one from the link speed). Bounds the
    /// delay a frame sees on a quiet link.
    pub block_timeout_ms: u32,
    /// Transmit ring frames (up to 65536, rounded up to whole blocks); 0: no transmit
    /// ring, frames go out with `sendmmsg`.
    pub tx_frames: u32,
}

impl Default for RingConfig {
    /// 32 blocks of 128 KiB (about 28 000 minimum-size frames), 1 ms block timeout,
    /// 256 transmit frames.
    fn default() -> Self {
        Self {
            block_size: 128 * 1024,
            blocks: 32,
            block_timeout_ms: 1,
            tx_frames: 256,
        }
    }
}

impl RingConfig {
    fn validate(&self) -> Result<()> {
        let page = crate::mem::page_size();
        let bad = |reason| Err(Error::BadRingConfig { reason });
        if self.block_size == 0
            || u64::from(self.block_size) % page != 0
            || self.block_size > MAX_BLOCK_SIZE
        {
            return bad("block_size must be a non-zero multiple of the page size, at most 16 MiB");
        }
        if self.blocks == 0 || self.blocks > MAX_BLOCKS {
            return bad("blocks must be 1 to 4096");
        }
        if self.tx_frames > MAX_TX_FRAMES {
            return bad("tx_frames must be at most 65536");
        }
        Ok(())
    }
}

/// The rings of one socket and their mapping.
#[derive(Debug)]
pub(crate) struct Rings {
    pub(crate) map: RingMap,
    pub(crate) rx: RxRing,
    pub(crate) tx: Option<TxRing>,
}

fn usize_of(v: u32) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// Sets `fd` (an unbound `AF_PACKET` socket) to `TPACKET_V3`, sets up its rings and
/// maps them.
pub(crate) fn setup(fd: &OwnedFd, cfg: &RingConfig) -> Result<Rings> {
    cfg.validate()?;
    let version = libc::c_int::try_from(libc::tpacket_versions::TPACKET_V3 as u32).unwrap_or(2);
    setsockopt(
        fd,
        libc::SOL_PACKET,
        libc::PACKET_VERSION,
        &version,
        "set PACKET_VERSION TPACKET_V3",
    )?;
    if cfg.tx_frames > 0 {
        // A transmit frame the kernel refuses is skipped instead of stopping the ring.
        // Like the version, this must be set before any ring exists (EBUSY after).
        let one: libc::c_int = 1;
        setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_LOSS,
            &one,
            "set PACKET_LOSS",
        )?;
    }
    let rx_req = libc::tpacket_req3 {
        tp_block_size: cfg.block_size,
        tp_block_nr: cfg.blocks,
        tp_frame_size: RX_FRAME_SIZE,
        tp_frame_nr: (cfg.block_size / RX_FRAME_SIZE) * cfg.blocks,
        tp_retire_blk_tov: cfg.block_timeout_ms,
        tp_sizeof_priv: 0,
        tp_feature_req_word: 0,
    };
    setsockopt(
        fd,
        libc::SOL_PACKET,
        libc::PACKET_RX_RING,
        &rx_req,
        "set PACKET_RX_RING",
    )?;
    let rx_len = usize_of(cfg.block_size) * usize_of(cfg.blocks);
    let mut tx_geometry = None;
    if cfg.tx_frames > 0 {
        let per_block = TX_BLOCK_SIZE / TX_FRAME_SIZE;
        let blocks = cfg.tx_frames.div_ceil(per_block);
        // Block transmit is not a thing: the TPACKET_V3 extras must be zero.
        let tx_req = libc::tpacket_req3 {
            tp_block_size: TX_BLOCK_SIZE,
            tp_block_nr: blocks,
            tp_frame_size: TX_FRAME_SIZE,
            tp_frame_nr: per_block * blocks,
            tp_retire_blk_tov: 0,
            tp_sizeof_priv: 0,
            tp_feature_req_word: 0,
        };
        setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_TX_RING,
            &tx_req,
            "set PACKET_TX_RING",
        )?;
        tx_geometry = Some((per_block, blocks));
    }
    let tx_len = tx_geometry.map_or(0, |(_, blocks)| usize_of(TX_BLOCK_SIZE) * usize_of(blocks));
    let map = RingMap::map_socket(fd, rx_len + tx_len)?;
    let rx = RxRing::new(0, usize_of(cfg.block_size), usize_of(cfg.blocks));
    let tx = tx_geometry.map(|(per_block, blocks)| {
        TxRing::new(
            rx_len,
            usize_of(TX_BLOCK_SIZE),
            usize_of(TX_FRAME_SIZE),
            usize_of(per_block),
            usize_of(per_block * blocks),
        )
    });
    Ok(Rings { map, rx, tx })
}

#[cfg(test)]
mod tests;
