//! What the guest test binary (`src/bin/vfio_guest.rs`) and the host harness
//! (`tests/vfio_guest.rs`) agree on: the console line format, the flows the guest
//! installs and the frames the host injects for them.
//!
//! Every line the guest prints for the harness starts with [`PREFIX`] and is
//! `CTO|<tag>|<text>`. `CTO|RESULT|PASS` ends a good run, `CTO|RESULT|FAIL|<why>` a bad
//! one; `CTO|INJECT|<n>` asks the host to send `n` frames of [`tcp_frame`]`(`
//! [`COUNTED_SPORT`]`)` into the device's port 0 and is answered by nothing but the
//! counters moving.

use ctoffload_driver::device::FlowCommand;
use ctoffload_hw_regs::{FlowAction, FlowKey, L4Proto};

/// Start of every line meant for the harness.
pub const PREFIX: &str = "CTO|";
/// PCI vendor and device ID of QEMU's ivshmem (Red Hat, Inc.).
pub const IVSHMEM_IDS: (u16, u16) = (0x1af4, 0x1110);
/// Flows in the batch the guest inserts.
pub const BATCH: u16 = 64;
/// Source port of the flow whose counters the host's frames move.
pub const COUNTED_SPORT: u16 = 1007;
/// Frames the host injects for it.
pub const INJECT_FRAMES: u32 = 3;
/// Length of each injected frame.
pub const FRAME_LEN: usize = 64;

/// The key of batch flow `sport` (TCP 10.0.0.1:sport -> 10.0.0.2:80, zone 0).
pub fn key(sport: u16) -> FlowKey {
    FlowKey::ipv4(
        0,
        L4Proto::Tcp,
        0,
        [10, 0, 0, 1].into(),
        sport,
        [10, 0, 0, 2].into(),
        80,
    )
}

/// Insert of [`key`]`(sport)`, forwarding to port 1.
pub fn insert(sport: u16) -> FlowCommand {
    FlowCommand::Insert {
        key: key(sport),
        action: FlowAction::forward(1),
    }
}

/// Ethernet + IPv4 (valid header checksum) + TCP ACK, [`FRAME_LEN`] bytes, matching
/// [`key`]`(sport)`.
pub fn tcp_frame(sport: u16) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let mut sum = 0u32;
    for c in ip.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let csum = !u16::try_from(sum).unwrap_or(0);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = 0x10;
    f
}

/// A parsed harness line: `(tag, rest)`.
pub fn parse_line(line: &str) -> Option<(&str, &str)> {
    let rest = line.trim_end_matches(['\r', '\n']);
    let at = rest.find(PREFIX)?;
    let rest = &rest[at + PREFIX.len()..];
    Some(match rest.split_once('|') {
        Some((tag, text)) => (tag, text),
        None => (rest, ""),
    })
}
