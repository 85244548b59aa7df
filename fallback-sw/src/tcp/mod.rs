//! TCP connection tracking: the state machine and window tracking of Linux v6.18
//! `net/netfilter/nf_conntrack_proto_tcp.c`.
//!
//! This module knows nothing about packet parsing: the caller fills a [`TcpSegment`]
//! from the parsed header. It owns nothing but the per-connection [`TcpConn`]; the
//! connection's status bits (SEEN_REPLY, ASSURED, FIXED_TIMEOUT) and its timer belong to
//! the caller, which passes them in as [`ConnStatus`] and applies the decision returned in
//! a [`TcpOutcome`].
//!
//! Out of scope, as in the rest of the crate: NAT sequence adjustment by helpers (the
//! offset is always 0) and synproxy (its SYN_SENT keep-alive exception never applies).

use core::fmt;
use core::ops::{BitAnd, BitOr, BitOrAssign};

pub mod seq;
pub mod state;
pub mod timeouts;
mod tracker;
mod window;

#[cfg(test)]
pub(crate) mod tests;

pub use state::{FlagIndex, TcpState, Transition, transition};
pub use timeouts::TcpTimeouts;
pub use tracker::TcpConn;
pub use window::{DirFlags, TcpDirState};

/// The TCP header flag byte (byte 13 of the header).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TcpFlags(u8);

impl TcpFlags {
    /// FIN.
    pub const FIN: TcpFlags = TcpFlags(0x01);
    /// SYN.
    pub const SYN: TcpFlags = TcpFlags(0x02);
    /// RST.
    pub const RST: TcpFlags = TcpFlags(0x04);
    /// PSH.
    pub const PSH: TcpFlags = TcpFlags(0x08);
    /// ACK.
    pub const ACK: TcpFlags = TcpFlags(0x10);
    /// URG.
    pub const URG: TcpFlags = TcpFlags(0x20);
    /// ECE.
    pub const ECE: TcpFlags = TcpFlags(0x40);
    /// CWR.
    pub const CWR: TcpFlags = TcpFlags(0x80);

    /// No flag set.
    #[must_use]
    pub const fn empty() -> TcpFlags {
        TcpFlags(0)
    }

    /// From the raw header byte; every value is accepted.
    #[must_use]
    pub const fn from_bits(bits: u8) -> TcpFlags {
        TcpFlags(bits)
    }

    /// The raw header byte.
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag in `other` is set.
    #[must_use]
    pub const fn contains(self, other: TcpFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for TcpFlags {
    type Output = TcpFlags;
    fn bitor(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 | rhs.0)
    }
}

impl BitOrAssign for TcpFlags {
    fn bitor_assign(&mut self, rhs: TcpFlags) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for TcpFlags {
    type Output = TcpFlags;
    fn bitand(self, rhs: TcpFlags) -> TcpFlags {
        TcpFlags(self.0 & rhs.0)
    }
}

impl fmt::Debug for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        let mut first = true;
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("(none)")?;
        }
        Ok(())
    }
}

/// The flag check of `tcp_error`: ignoring PSH, ECE and CWR, only SYN, SYN+URG, SYN+ACK,
/// RST, RST+ACK, FIN+ACK, FIN+ACK+URG, ACK and ACK+URG are allowed.
#[must_use]
pub fn flags_valid(flags: TcpFlags) -> bool {
    const FIN: u8 = TcpFlags::FIN.0;
    const SYN: u8 = TcpFlags::SYN.0;
    const RST: u8 = TcpFlags::RST.0;
    const ACK: u8 = TcpFlags::ACK.0;
    const URG: u8 = TcpFlags::URG.0;
    const VALID: [u8; 9] = [
        SYN,
        SYN | URG,
        SYN | ACK,
        RST,
        RST | ACK,
        FIN | ACK,
        FIN | ACK | URG,
        ACK,
        ACK | URG,
    ];
    // The allowed combinations as a bit set: the masked flags are below 64.
    const VALID_SET: u64 = {
        let mut set = 0u64;
        let mut i = 0;
        while i < VALID.len() {
            set |= 1 << VALID[i];
            i += 1;
        }
        set
    };
    let masked = flags.0 & !(TcpFlags::PSH.0 | TcpFlags::ECE.0 | TcpFlags::CWR.0);
    (VALID_SET >> masked) & 1 == 1
}

/// What the state machine needs from one TCP segment. The parser fills it; header length
/// and checksum have already been checked there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpSegment {
    /// Header flags.
    pub flags: TcpFlags,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (meaningful only with ACK).
    pub ack: u32,
    /// Raw, unscaled window field.
    pub window: u16,
    /// Payload bytes after the TCP header.
    pub payload_len: u32,
    /// The header has any option bytes (`doff > 5`). Linux resets the sender's window
    /// scale and option flags on a SYN only when options are present; `wscale` or
    /// `sack_permitted` imply this.
    pub has_options: bool,
    /// Window-scale option value (uncapped; capped at 14 here).
    pub wscale: Option<u8>,
    /// SACK-permitted option present.
    pub sack_permitted: bool,
    /// Highest right edge of the blocks of the first SACK option, highest as Linux
    /// `tcp_sack` finds it (each edge replaces the running value when `after()` it).
    /// Used only when the receiver has SACK_PERM, and only if it is after `ack`.
    pub highest_sack_edge: Option<u32>,
}

impl TcpSegment {
    /// `seq + payload + SYN + FIN` (`segment_seq_plus_len`), modulo 2^32.
    #[must_use]
    pub fn end(&self) -> u32 {
        let mut end = self.seq.wrapping_add(self.payload_len);
        if self.flags.contains(TcpFlags::SYN) {
            end = end.wrapping_add(1);
        }
        if self.flags.contains(TcpFlags::FIN) {
            end = end.wrapping_add(1);
        }
        end
    }

    fn options_present(&self) -> bool {
        self.has_options || self.wscale.is_some() || self.sack_permitted
    }
}

pub use crate::tuple::Dir;

/// The connection's status bits and timer as the caller holds them, read per packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnStatus {
    /// IPS_SEEN_REPLY: a reply-direction packet was processed successfully *before* this
    /// one (the first reply itself sees it clear).
    pub seen_reply: bool,
    /// IPS_ASSURED.
    pub assured: bool,
    /// IPS_FIXED_TIMEOUT (disables the invalid FIN/RST timeout shrink).
    pub fixed_timeout: bool,
    /// Remaining lifetime of the entry in nanoseconds (`expires − now`, 0 if past); used
    /// only by the invalid FIN/RST timeout shrink.
    pub remaining_ns: u64,
}

/// TCP tracking configuration (the `nf_conntrack_tcp_*` sysctls).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpConfig {
    /// `nf_conntrack_tcp_be_liberal`: window failures accept instead. Default off.
    pub be_liberal: bool,
    /// `nf_conntrack_tcp_loose`: pick up connections mid-stream. Default on.
    pub loose: bool,
    /// `nf_conntrack_tcp_max_retrans`. Default 3.
    pub max_retrans: u8,
    /// `nf_conntrack_tcp_ignore_invalid_rst`. Default off.
    pub ignore_invalid_rst: bool,
    /// Per-state timeouts.
    pub timeouts: TcpTimeouts,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            be_liberal: false,
            loose: true,
            max_retrans: 3,
            ignore_invalid_rst: false,
            timeouts: TcpTimeouts::default(),
        }
    }
}

/// Why a segment is invalid (`ct state invalid`: no conntrack attached, entry unchanged
/// except for the bookkeeping Linux does too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TcpInvalid {
    /// Flag combination not allowed (`tcp_error`).
    #[error("invalid TCP flag combination {flags:?}")]
    BadFlags {
        /// The header flags.
        flags: TcpFlags,
    },
    /// First packet is neither SYN nor a pickup ACK (`tcp_new`: "invalid new").
    #[error("invalid first packet ({index:?})")]
    InvalidNew {
        /// The flag index of the packet.
        index: FlagIndex,
    },
    /// First packet would pick up a connection but `loose` is off.
    #[error("mid-stream pickup disabled")]
    PickupDisabled,
    /// The table says IV for this state, direction and flags.
    #[error("{index:?} in {dir:?} direction invalid in state {state}")]
    Transition {
        /// State before the packet.
        state: TcpState,
        /// Packet direction.
        dir: Dir,
        /// Flag index.
        index: FlagIndex,
    },
    /// RST whose sequence number is below the peer's highest ACK.
    #[error("invalid RST: seq {seq} below peer maxack {maxack}")]
    InvalidRst {
        /// RST sequence number.
        seq: u32,
        /// The peer's highest acknowledgement.
        maxack: u32,
    },
    /// Bound I failed: the segment starts beyond the receiver's window.
    #[error("SEQ {seq} is over upper bound {maxend} (over the window of the receiver)")]
    SeqOverUpperBound {
        /// Segment sequence number.
        seq: u32,
        /// The sender's `maxend`.
        maxend: u32,
    },
    /// Bound III failed: the (s)ack acknowledges data not yet seen.
    #[error("ACK {sack} is over upper bound {end} (ACKed data not seen yet)")]
    AckOverUpperBound {
        /// The (s)ack of the segment.
        sack: u32,
        /// The receiver's `end`.
        end: u32,
    },
}

/// Why a segment was accepted without any state, window or timeout change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpIgnore {
    /// The table says IG (or a SYN in TIME_WAIT/CLOSE that does not reopen).
    Transition {
        /// State at the time of the packet.
        state: TcpState,
        /// Flag index.
        index: FlagIndex,
    },
    /// An RFC 5961 challenge ACK in LAST_ACK answering an ignored SYN.
    ChallengeAck,
    /// Bound I failed only by an overshoot the receiver window can absorb.
    Overshoot,
    /// Bound II failed: retransmission of already acknowledged data.
    Retransmission,
    /// Bound IV failed: the ack is far too old.
    StaleAck,
}

/// Decision for an accepted segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpAccept {
    /// State before the packet (Linux's `old_state`, which is SYN_SENT after a SYN/ACK
    /// resync).
    pub old_state: TcpState,
    /// State after the packet.
    pub new_state: TcpState,
    /// New relative timeout to set, in nanoseconds; `None` leaves the timer as it is
    /// (retransmitted SYN without SEEN_REPLY, or a RST that deletes the entry).
    pub timeout_ns: Option<u64>,
    /// Set IPS_ASSURED now.
    pub set_assured: bool,
    /// Delete the entry now (RST before any reply); the packet itself is accepted.
    pub delete_now: bool,
}

/// What the caller must do with a segment of a tracked connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TcpOutcome {
    /// Accepted; apply the decision.
    Accept(TcpAccept),
    /// Accepted with no state, window-state or timeout change.
    Ignore(TcpIgnore),
    /// Invalid: the packet gets no conntrack.
    Invalid {
        /// Why.
        reason: TcpInvalid,
        /// `nf_tcp_handle_invalid`: set the relative timeout to this many ns.
        shrink_timeout_ns: Option<u64>,
    },
    /// SYN reopening a closed connection: delete the entry and look the packet up again,
    /// so it creates a fresh connection (drop it if the entry cannot be deleted).
    Reopen,
}
