//! The ring walks over a stand-in ring (an anonymous mapping laid out the way the
//! kernel lays out its rings), and the header layouts they rely on.

use std::mem::{offset_of, size_of};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;

use super::map::RingMap;
use super::rx::RxRing;
use super::tx::TxRing;
use super::*;
use crate::port::{FrameBatch, PortStats};

const BLOCK: usize = 4096;
const FIRST: usize = 48;
const BLOCK_STATUS: usize = 8;
const NUM_PKTS: usize = 12;
const OFFSET_TO_FIRST_PKT: usize = 16;

#[test]
fn kernel_header_layouts_are_pinned() {
    use libc::{tpacket_block_desc, tpacket_hdr_v1, tpacket_hdr_variant1, tpacket3_hdr};
    assert_eq!(size_of::<tpacket_block_desc>(), 48);
    assert_eq!(offset_of!(tpacket_block_desc, hdr), 8);
    assert_eq!(offset_of!(tpacket_hdr_v1, block_status), 0);
    assert_eq!(offset_of!(tpacket_hdr_v1, num_pkts), 4);
    assert_eq!(offset_of!(tpacket_hdr_v1, offset_to_first_pkt), 8);
    assert_eq!(size_of::<tpacket3_hdr>(), 48);
    assert_eq!(offset_of!(tpacket3_hdr, tp_next_offset), 0);
    assert_eq!(offset_of!(tpacket3_hdr, tp_snaplen), 12);
    assert_eq!(offset_of!(tpacket3_hdr, tp_len), 16);
    assert_eq!(offset_of!(tpacket3_hdr, tp_status), 20);
    assert_eq!(offset_of!(tpacket3_hdr, tp_mac), 24);
    assert_eq!(offset_of!(tpacket3_hdr, hv1), 28);
    assert_eq!(offset_of!(tpacket_hdr_variant1, tp_vlan_tci), 4);
    assert_eq!(offset_of!(tpacket_hdr_variant1, tp_vlan_tpid), 8);
    // Transmit data follows the aligned header.
    assert_eq!(libc::TPACKET3_HDRLEN - size_of::<libc::sockaddr_ll>(), 48);
    assert_eq!(TX_FRAME_SIZE, 2096);
}

/// One frame written by the stand-in kernel.
struct Fake<'a> {
    data: &'a [u8],
    /// `tp_len` when it differs from the captured length (a truncated frame).
    wire_len: Option<u32>,
    vlan: Option<(Option<u16>, u16)>,
}

impl<'a> Fake<'a> {
    /// An untagged, whole frame.
    fn plain(data: &'a [u8]) -> Self {
        Self {
            data,
            wire_len: None,
            vlan: None,
        }
    }
}

/// Writes `frames` into block `block` and hands it to user space.
fn fill_block(map: &RingMap, block: usize, frames: &[Fake<'_>]) {
    let base = block * BLOCK;
    let mac = 82u16; // where the kernel puts an Ethernet header on a SOCK_RAW ring
    let mut at = FIRST;
    for (i, f) in frames.iter().enumerate() {
        let len = u32::try_from(f.data.len()).expect("len");
        let size = (usize::from(mac) + f.data.len()).next_multiple_of(16);
        let next = if i + 1 == frames.len() { 0 } else { size };
        let h = base + at;
        map.write_u32(h, u32::try_from(next).expect("next"))
            .expect("w");
        map.write_u32(h + 12, len).expect("w");
        map.write_u32(h + 16, f.wire_len.unwrap_or(len)).expect("w");
        let mut status = libc::TP_STATUS_USER;
        if let Some((tpid, tci)) = f.vlan {
            status |= libc::TP_STATUS_VLAN_VALID;
            map.write_u32(h + 32, u32::from(tci)).expect("w");
            if let Some(tpid) = tpid {
                status |= libc::TP_STATUS_VLAN_TPID_VALID;
                map.write_u16(h + 36, tpid).expect("w");
            }
        }
        map.write_u32(h + 20, status).expect("w");
        map.write_u16(h + 24, mac).expect("w");
        map.copy_in(h + usize::from(mac), f.data).expect("data");
        at += size;
    }
    let n = u32::try_from(frames.len()).expect("n");
    map.write_u32(base + NUM_PKTS, n).expect("w");
    map.write_u32(
        base + OFFSET_TO_FIRST_PKT,
        u32::try_from(FIRST).expect("first"),
    )
    .expect("w");
    map.store_u32_release(base + BLOCK_STATUS, libc::TP_STATUS_USER)
        .expect("w");
}

fn frame(marker: u8, len: usize) -> Vec<u8> {
    let mut f = vec![marker; len];
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    f
}

fn block_status(map: &RingMap, block: usize) -> u32 {
    map.load_u32_acquire(block * BLOCK + BLOCK_STATUS)
        .expect("status")
}

#[test]
fn rx_walk_takes_frames_in_order_restores_vlan_and_returns_blocks() {
    let map = RingMap::anonymous(2 * BLOCK).expect("map");
    let mut rx = RxRing::new(0, BLOCK, 2);
    let mut stats = PortStats::default();
    let mut batch = FrameBatch::new(2);
    assert_eq!(
        rx.recv(&map, &mut batch, 2, &mut stats),
        0,
        "kernel owns all"
    );

    let (a, b, c, d) = (frame(1, 60), frame(2, 60), frame(3, 100), frame(4, 70));
    fill_block(
        &map,
        0,
        &[
            Fake::plain(&a),
            Fake {
                data: &b,
                wire_len: None,
                vlan: Some((Some(0x88a8), 0x2123)),
            },
            Fake {
                data: &c,
                wire_len: Some(1500),
                vlan: None,
            },
            Fake {
                data: &d,
                wire_len: None,
                vlan: Some((None, 7)),
            },
        ],
    );
    // A batch of 2 ends inside the block: the block stays ours.
    assert_eq!(rx.recv(&map, &mut batch, 8, &mut stats), 2);
    assert_eq!(batch.get(0), Some(&a[..]));
    let mut tagged = b[..12].to_vec();
    tagged.extend_from_slice(&[0x88, 0xa8, 0x21, 0x23]);
    tagged.extend_from_slice(&b[12..]);
    assert_eq!(batch.get(1), Some(&tagged[..]));
    assert_eq!(block_status(&map, 0), libc::TP_STATUS_USER);

    // The rest: the truncated frame is dropped, the last one gets an 802.1Q tag, and
    // the block goes back to the kernel.
    batch.clear();
    assert_eq!(rx.recv(&map, &mut batch, 8, &mut stats), 1);
    let mut tagged = d[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&d[12..]);
    assert_eq!(batch.get(0), Some(&tagged[..]));
    assert_eq!(block_status(&map, 0), libc::TP_STATUS_KERNEL);
    assert_eq!(stats.rx_frames, 3);
    assert_eq!(stats.rx_dropped, 1);
    assert_eq!(stats.rx_bytes, 60 + 64 + 74);

    // Block 1, then around to block 0 again.
    fill_block(&map, 1, &[Fake::plain(&a)]);
    fill_block(&map, 0, &[Fake::plain(&c)]);
    batch.clear();
    assert_eq!(rx.recv(&map, &mut batch, 8, &mut stats), 2);
    assert_eq!(batch.get(0), Some(&a[..]));
    assert_eq!(batch.get(1), Some(&c[..]));
    assert_eq!(block_status(&map, 0), libc::TP_STATUS_KERNEL);
    assert_eq!(block_status(&map, 1), libc::TP_STATUS_KERNEL);
}

#[test]
fn rx_walk_survives_headers_that_point_outside_the_block() {
    let map = RingMap::anonymous(2 * BLOCK).expect("map");
    let mut rx = RxRing::new(0, BLOCK, 2);
    let mut stats = PortStats::default();
    let mut batch = FrameBatch::new(8);
    let a = frame(1, 60);
    fill_block(
        &map,
        0,
        &[Fake::plain(&a), Fake::plain(&a), Fake::plain(&a)],
    );
    // The second frame's header claims data past the block's end; the first frame's
    // next_offset is fine, the third is reached through the second's.
    let second = FIRST + (82 + 60usize).next_multiple_of(16);
    map.write_u16(second + 24, u16::MAX).expect("w");
    assert_eq!(rx.recv(&map, &mut batch, 8, &mut stats), 2);
    assert_eq!(stats.rx_dropped, 1);
    assert_eq!(block_status(&map, 0), libc::TP_STATUS_KERNEL);

    // A block whose first frame lies past its end: every frame of it is lost.
    fill_block(&map, 1, &[Fake::plain(&a)]);
    map.write_u32(BLOCK + NUM_PKTS, 5).expect("w");
    map.write_u32(BLOCK + OFFSET_TO_FIRST_PKT, 4090).expect("w");
    batch.clear();
    assert_eq!(rx.recv(&map, &mut batch, 8, &mut stats), 0);
    assert_eq!(stats.rx_dropped, 6);
    assert_eq!(block_status(&map, 1), libc::TP_STATUS_KERNEL);
}

#[test]
fn rx_walk_reports_kernel_drops() {
    let map = RingMap::anonymous(BLOCK).expect("map");
    let mut rx = RxRing::new(0, BLOCK, 1);
    let mut stats = PortStats::default();
    let a = frame(1, 60);
    fill_block(&map, 0, &[Fake::plain(&a)]);
    map.store_u32_release(BLOCK_STATUS, libc::TP_STATUS_USER | libc::TP_STATUS_LOSING)
        .expect("w");
    let mut batch = FrameBatch::new(4);
    assert_eq!(rx.recv(&map, &mut batch, 4, &mut stats), 1);
    assert!(rx.losing);
}

#[test]
fn tx_ring_fills_frames_in_order_and_drops_when_full() {
    // Two blocks of two 2096-byte frames, after 4096 bytes of (unused) receive ring.
    let map = RingMap::anonymous(3 * 8192).expect("map");
    let mut tx = TxRing::new(8192, 8192, 2096, 2, 4);
    let (sock, _peer) = UnixDatagram::pair().expect("socketpair");
    let mut stats = PortStats::default();
    let frames: Vec<Vec<u8>> = (0..5u8).map(|i| frame(i, 60 + usize::from(i))).collect();
    tx.send(
        &map,
        sock.as_fd(),
        frames.iter().map(Vec::as_slice),
        &mut stats,
    )
    .expect("send");
    // The stand-in kernel sends nothing: four frames requested, the fifth dropped.
    assert_eq!(stats.tx_frames, 4);
    assert_eq!(stats.tx_dropped, 1);
    for (i, f) in frames.iter().take(4).enumerate() {
        let at = 8192 + (i / 2) * 8192 + (i % 2) * 2096;
        assert_eq!(
            map.load_u32_acquire(at + 20).expect("status"),
            libc::TP_STATUS_SEND_REQUEST
        );
        assert_eq!(
            map.read_u32(at + 16).expect("len"),
            u32::try_from(f.len()).expect("len")
        );
        assert_eq!(map.read_u32(at).expect("next"), 0);
        let mut out = vec![0u8; f.len()];
        map.copy_out(at + 48, &mut out).expect("data");
        assert_eq!(&out, f);
    }
    // The kernel sent frame 0 (available again): the next frame goes there.
    map.store_u32_release(8192 + 20, libc::TP_STATUS_AVAILABLE)
        .expect("w");
    tx.send(
        &map,
        sock.as_fd(),
        std::iter::once(&frames[4][..]),
        &mut stats,
    )
    .expect("send");
    assert_eq!(stats.tx_frames, 5);
    let mut out = vec![0u8; frames[4].len()];
    map.copy_out(8192 + 48, &mut out).expect("data");
    assert_eq!(out, frames[4]);
    // Too long for a frame: refused.
    assert!(matches!(
        tx.send(
            &map,
            sock.as_fd(),
            std::iter::once(&[0u8; 2049][..]),
            &mut stats
        ),
        Err(Error::FrameTooLong {
            len: 2049,
            max: 2048
        })
    ));
}

#[test]
fn bad_ring_settings_are_refused() {
    for (cfg, what) in [
        (
            RingConfig {
                block_size: 1000,
                ..RingConfig::default()
            },
            "block_size",
        ),
        (
            RingConfig {
                block_size: 0,
                ..RingConfig::default()
            },
            "block_size",
        ),
        (
            RingConfig {
                blocks: 0,
                ..RingConfig::default()
            },
            "blocks",
        ),
        (
            RingConfig {
                tx_frames: 1 << 20,
                ..RingConfig::default()
            },
            "tx_frames",
        ),
    ] {
        match cfg.validate() {
            Err(Error::BadRingConfig { reason }) => assert!(reason.starts_with(what), "{reason}"),
            other => panic!("{cfg:?}: {other:?}"),
        }
    }
    assert!(RingConfig::default().validate().is_ok());
}
