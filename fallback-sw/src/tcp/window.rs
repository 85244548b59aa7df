//! Per-direction window state and `tcp_in_window`.

use core::fmt;

use super::seq::{after, before};
use super::tracker::TcpConn;
use super::{Dir, FlagIndex, TcpConfig, TcpFlags, TcpIgnore, TcpInvalid, TcpSegment, TcpState};

/// Maximum window-scale shift (RFC 7323, `TCP_MAX_WSCALE`).
pub const MAX_WSCALE: u8 = 14;

/// `MAXACKWINCONST`: the floor of the bound-IV ack window.
const MAX_ACK_WIN_CONST: u32 = 66_000;

/// Per-direction flags (`IP_CT_TCP_FLAG_*`), same bit values as Linux.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct DirFlags(u8);

impl DirFlags {
    /// Sender sent the window-scale option.
    pub const WINDOW_SCALE: DirFlags = DirFlags(0x01);
    /// Sender sent SACK-permitted.
    pub const SACK_PERM: DirFlags = DirFlags(0x02);
    /// This side closed first (entered FIN_WAIT).
    pub const CLOSE_INIT: DirFlags = DirFlags(0x04);
    /// Window failures are accepted for this sender.
    pub const BE_LIBERAL: DirFlags = DirFlags(0x08);
    /// This side sent data not yet acknowledged.
    pub const DATA_UNACK: DirFlags = DirFlags(0x10);
    /// `maxack` holds a value.
    pub const MAXACK_SET: DirFlags = DirFlags(0x20);
    /// (In `last_flags` only) an RFC 5961 challenge ACK may follow an ignored SYN.
    pub const EXP_CHALLENGE_ACK: DirFlags = DirFlags(0x40);
    /// (In `last_flags` only) simultaneous open seen.
    pub const SIMULTANEOUS_OPEN: DirFlags = DirFlags(0x80);

    /// No flag.
    #[must_use]
    pub const fn empty() -> DirFlags {
        DirFlags(0)
    }

    /// Raw bits.
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every flag in `other` is set.
    #[must_use]
    pub const fn contains(self, other: DirFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether any flag in `other` is set.
    #[must_use]
    pub const fn intersects(self, other: DirFlags) -> bool {
        self.0 & other.0 != 0
    }

    pub(super) fn insert(&mut self, other: DirFlags) {
        self.0 |= other.0;
    }

    pub(super) fn remove(&mut self, other: DirFlags) {
        self.0 &= !other.0;
    }

    /// Keep only the flags in `other`.
    pub(super) fn retain(&mut self, other: DirFlags) {
        self.0 &= other.0;
    }

    pub(super) const fn union(self, other: DirFlags) -> DirFlags {
        DirFlags(self.0 | other.0)
    }
}

impl fmt::Debug for DirFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 8] = [
            "WINDOW_SCALE",
            "SACK_PERM",
            "CLOSE_INIT",
            "BE_LIBERAL",
            "DATA_UNACK",
            "MAXACK_SET",
            "EXP_CHALLENGE_ACK",
            "SIMULTANEOUS_OPEN",
        ];
        let mut set = f.debug_set();
        for (bit, name) in NAMES.iter().enumerate() {
            if self.0 & (1 << bit) != 0 {
                set.entry(&format_args!("{name}"));
            }
        }
        set.finish()
    }
}

/// One direction's window-tracking state (`struct ip_ct_tcp_state`). "Sender" below is the
/// side that sends in this direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpDirState {
    /// Highest `seq + len` sent.
    pub end: u32,
    /// Right edge the sender may send up to (highest `ack + window` of the peer).
    pub maxend: u32,
    /// Largest scaled window advertised plus the sack−ack slack; 0 = not initialised.
    pub maxwin: u32,
    /// Highest ack sent (valid when MAXACK_SET).
    pub maxack: u32,
    /// Window-scale shift of this sender's windows.
    pub scale: u8,
    /// Flags.
    pub flags: DirFlags,
}

impl TcpDirState {
    /// `nf_ct_tcp_state_reset`: zero everything but keep BE_LIBERAL.
    pub(super) fn reset(&mut self) {
        self.end = 0;
        self.maxend = 0;
        self.maxwin = 0;
        self.maxack = 0;
        self.scale = 0;
        self.flags.retain(DirFlags::BE_LIBERAL);
    }

    /// `tcp_options` on a SYN: when the header has options, reset scale and all flags but
    /// BE_LIBERAL, then record SACK-permitted and window scale (capped at 14).
    pub(super) fn parse_options(&mut self, seg: &TcpSegment) {
        if !seg.options_present() {
            return;
        }
        self.scale = 0;
        self.flags.retain(DirFlags::BE_LIBERAL);
        if seg.sack_permitted {
            self.flags.insert(DirFlags::SACK_PERM);
        }
        if let Some(ws) = seg.wscale {
            self.scale = ws.min(MAX_WSCALE);
            self.flags.insert(DirFlags::WINDOW_SCALE);
        }
    }
}

/// `tcp_init_sender`: (re)initialise the sender from a SYN or SYN/ACK.
fn init_sender(
    sender: &mut TcpDirState,
    receiver: &mut TcpDirState,
    seg: &TcpSegment,
    end: u32,
    win: u32,
    dir: Dir,
) {
    sender.end = end;
    sender.maxend = end;
    sender.maxwin = win.max(1);
    sender.parse_options(seg);
    // RFC 1323: both sides must send window scale to enable it either way.
    if dir == Dir::Reply
        && !(sender.flags.contains(DirFlags::WINDOW_SCALE)
            && receiver.flags.contains(DirFlags::WINDOW_SCALE))
    {
        sender.scale = 0;
        receiver.scale = 0;
    }
}

/// Result of `tcp_in_window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WindowVerdict {
    /// In window (or liberal).
    Accept,
    /// Accept the packet without any state or timeout change.
    Ignore(TcpIgnore),
    /// Out of window.
    Invalid(TcpInvalid),
}

impl TcpConn {
    /// `tcp_in_window`. `self.state` is the stored state (not the override-adjusted one).
    pub(super) fn in_window(
        &mut self,
        dir: Dir,
        index: FlagIndex,
        seg: &TcpSegment,
        cfg: &TcpConfig,
    ) -> WindowVerdict {
        let state = self.state;
        let [orig, reply] = &mut self.seen;
        let (sender, receiver) = match dir {
            Dir::Original => (orig, reply),
            Dir::Reply => (reply, orig),
        };
        let syn = seg.flags.contains(TcpFlags::SYN);
        let has_ack = seg.flags.contains(TcpFlags::ACK);
        let rst = seg.flags.contains(TcpFlags::RST);

        let mut seq = seg.seq;
        let mut ack = seg.ack;
        let mut sack = ack;
        let win_raw = seg.window;
        let mut win = u32::from(win_raw);
        let mut end = seg.end();

        if receiver.flags.contains(DirFlags::SACK_PERM) {
            match seg.highest_sack_edge {
                Some(edge) if after(edge, sack) => sack = edge,
                _ => {}
            }
        }
        // NAT sequence adjustment (helpers) is out of scope: the offset is 0.

        if sender.maxwin == 0 {
            if syn {
                init_sender(sender, receiver, seg, end, win, dir);
                if !has_ack {
                    // Simultaneous open.
                    return WindowVerdict::Accept;
                }
            } else {
                // Mid-stream: history lost, use the packet's values.
                sender.end = end;
                let swin = win << u32::from(sender.scale.min(MAX_WSCALE));
                sender.maxwin = swin.max(1);
                sender.maxend = end.wrapping_add(sender.maxwin);
                if receiver.maxwin == 0 {
                    receiver.end = sack;
                    receiver.maxend = sack;
                } else if sack == receiver.end.wrapping_add(1) {
                    // Likely a reply to a keepalive.
                    receiver.end = receiver.end.wrapping_add(1);
                }
            }
        } else if syn
            && after(end, sender.end)
            && matches!(state, TcpState::SynSent | TcpState::SynRecv)
        {
            // New ISN: re-initialise like a first SYN(/ACK).
            init_sender(sender, receiver, seg, end, win, dir);
            if dir == Dir::Reply && !has_ack {
                return WindowVerdict::Accept;
            }
        }

        if !has_ack || (rst && ack == 0) {
            // No ACK: pretend it acks everything. Broken stacks send RST+ACK with ack 0.
            ack = receiver.end;
            sack = receiver.end;
        }

        if rst && seq == 0 && state == TcpState::SynSent {
            // RST answering a SYN.
            seq = sender.end;
            end = sender.end;
        }

        let liberal = cfg.be_liberal || sender.flags.contains(DirFlags::BE_LIBERAL);
        let fail = |v: WindowVerdict| {
            if liberal { WindowVerdict::Accept } else { v }
        };
        let max_ack_win = sender.maxwin.max(MAX_ACK_WIN_CONST);
        let ack_lower = receiver.end.wrapping_sub(max_ack_win).wrapping_sub(1);

        // Bound I: seq ≤ sender.maxend.
        if !before(seq, sender.maxend.wrapping_add(1)) {
            let overshot = end.wrapping_sub(sender.maxend).wrapping_add(1);
            let ack_ok = after(sack, ack_lower);
            let in_recv_win = receiver.maxwin != 0
                && after(
                    end,
                    sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
                );
            if in_recv_win
                && ack_ok
                && overshot <= receiver.maxwin
                && before(sack, receiver.end.wrapping_add(1))
            {
                // Peer sent more than the window allows; track it so its ack passes III.
                sender.end = end;
                sender.flags.insert(DirFlags::DATA_UNACK);
                return fail(WindowVerdict::Ignore(TcpIgnore::Overshoot));
            }
            return fail(WindowVerdict::Invalid(TcpInvalid::SeqOverUpperBound {
                seq,
                maxend: sender.maxend,
            }));
        }

        // Bound III: sack ≤ receiver.end.
        if !before(sack, receiver.end.wrapping_add(1)) {
            return fail(WindowVerdict::Invalid(TcpInvalid::AckOverUpperBound {
                sack,
                end: receiver.end,
            }));
        }

        // Bound II: end ≥ sender.end − receiver.maxwin (if the receiver has a window).
        let in_recv_win = receiver.maxwin == 0
            || after(
                end,
                sender.end.wrapping_sub(receiver.maxwin).wrapping_sub(1),
            );
        if !in_recv_win {
            return fail(WindowVerdict::Ignore(TcpIgnore::Retransmission));
        }

        // Bound IV: sack ≥ receiver.end − max(sender.maxwin, 66000).
        if !after(sack, ack_lower) {
            return fail(WindowVerdict::Ignore(TcpIgnore::StaleAck));
        }

        // 1. Window scaling (RFC 7323), not on SYNs.
        if !syn {
            win <<= u32::from(sender.scale.min(MAX_WSCALE));
        }

        // 2-4. Sender.
        let swin = win.wrapping_add(sack.wrapping_sub(ack));
        if sender.maxwin < swin {
            sender.maxwin = swin;
        }
        if after(end, sender.end) {
            sender.end = end;
            sender.flags.insert(DirFlags::DATA_UNACK);
        }
        if has_ack {
            if !sender.flags.contains(DirFlags::MAXACK_SET) {
                sender.maxack = ack;
                sender.flags.insert(DirFlags::MAXACK_SET);
            } else if after(ack, sender.maxack) {
                sender.maxack = ack;
            }
        }

        // 5-7. Receiver.
        if receiver.maxwin != 0 && after(end, sender.maxend) {
            receiver.maxwin = receiver
                .maxwin
                .wrapping_add(end.wrapping_sub(sender.maxend));
        }
        if after(sack.wrapping_add(win), receiver.maxend.wrapping_sub(1)) {
            receiver.maxend = sack.wrapping_add(win);
            if win == 0 {
                receiver.maxend = receiver.maxend.wrapping_add(1);
            }
        }
        if ack == receiver.end {
            receiver.flags.remove(DirFlags::DATA_UNACK);
        }

        // 8. Retransmission counter.
        if index == FlagIndex::Ack {
            if self.last_dir == dir
                && self.last_seq == seq
                && self.last_ack == ack
                && self.last_end == end
                && self.last_win == win_raw
            {
                self.retrans = self.retrans.wrapping_add(1);
            } else {
                self.last_dir = dir;
                self.last_seq = seq;
                self.last_ack = ack;
                self.last_end = end;
                self.last_win = win_raw;
                self.retrans = 0;
            }
        }

        WindowVerdict::Accept
    }
}
