//! `TcpConn`: the per-connection TCP state and `nf_conntrack_tcp_packet`.

use super::seq::before;
use super::state::{FlagIndex, TcpState, Transition, transition};
use super::timeouts::secs_to_ns;
use super::window::{DirFlags, TcpDirState, WindowVerdict};
use super::{
    ConnStatus, Dir, TcpAccept, TcpConfig, TcpIgnore, TcpInvalid, TcpOutcome, TcpSegment,
    flags_valid,
};

/// Remaining lifetime below which an invalid FIN/RST does not shrink the timeout.
const HANDLE_INVALID_MIN_NS: u64 = 120 * super::timeouts::NS_PER_SEC;

/// Per-connection TCP tracking state (`struct ip_ct_tcp`). Lives in every TCP entry, so it
/// is kept to 60 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpConn {
    /// Window state per direction, indexed by [`Dir::index`].
    pub(super) seen: [TcpDirState; 2],
    /// Sequence number of the last recorded packet.
    pub(super) last_seq: u32,
    /// Ack of the last recorded packet.
    pub(super) last_ack: u32,
    /// `seq + len` of the last recorded packet.
    pub(super) last_end: u32,
    /// Raw window of the last recorded packet.
    pub(super) last_win: u16,
    /// Current state.
    pub(super) state: TcpState,
    /// Direction of the last recorded packet.
    pub(super) last_dir: Dir,
    /// Flag index of the last recorded packet.
    pub(super) last_index: FlagIndex,
    /// Identical ACK-index packets seen in a row.
    pub(super) retrans: u8,
    /// Window scale of an ignored ORIGINAL SYN.
    pub(super) last_wscale: u8,
    /// Options of an ignored ORIGINAL SYN, plus challenge-ACK and simultaneous-open bits.
    pub(super) last_flags: DirFlags,
}

/// What the IG handling decided.
enum IgnoreResult {
    /// A SYN/ACK answering an ignored SYN: continue as SYN_SENT → SYN_RECV.
    Resync,
    /// Accept without change.
    Ignored,
}

impl TcpConn {
    /// An all-zero connection in state NONE (the `memset` of `tcp_new`).
    pub(super) fn zeroed() -> TcpConn {
        TcpConn {
            seen: [TcpDirState::default(); 2],
            last_seq: 0,
            last_ack: 0,
            last_end: 0,
            last_win: 0,
            state: TcpState::None,
            last_dir: Dir::Original,
            last_index: FlagIndex::None,
            retrans: 0,
            last_wscale: 0,
            last_flags: DirFlags::empty(),
        }
    }

    /// First packet of a connection (`tcp_error` flag check, `tcp_new`, then the same
    /// processing as every packet, in the ORIGINAL direction with no status bits).
    ///
    /// A SYN starts SYN_SENT; any ACK-index packet is a mid-stream pickup (when
    /// `cfg.loose`), which makes both directions liberal. Anything else is invalid and
    /// no entry must be created.
    ///
    /// # Errors
    /// The reason the packet is invalid as a first packet.
    #[inline]
    pub fn new(seg: &TcpSegment, cfg: &TcpConfig) -> Result<(TcpConn, TcpAccept), TcpInvalid> {
        if !flags_valid(seg.flags) {
            return Err(TcpInvalid::BadFlags { flags: seg.flags });
        }
        let index = FlagIndex::from_flags(seg.flags);
        let mut conn = TcpConn::zeroed();
        match transition(Dir::Original, index, TcpState::None) {
            Transition::To(TcpState::SynSent) => {
                let s = &mut conn.seen[0];
                s.end = seg.end();
                s.maxwin = u32::from(seg.window).max(1);
                s.maxend = s.end;
                s.parse_options(seg);
                // What `process` does with this SYN, without its general checks: no
                // special case of the state table applies (NONE to SYN_SENT), and
                // `tcp_in_window` accepts it (seq is below the sender's right edge
                // `end`, the receiver is unset, so its implied ack 0 passes the ack
                // bounds) with one change: the receiver may send up to the SYN's
                // window (at least 1). The window is not scaled on a SYN, the ack is
                // not recorded (no ACK flag) and no retransmission is counted (not an
                // ACK). `new_matches_the_general_path` checks this against `process`.
                conn.seen[1].maxend = u32::from(seg.window).max(1);
                let accept = conn.accepted(
                    Dir::Original,
                    index,
                    TcpState::None,
                    TcpState::SynSent,
                    ConnStatus::default(),
                    cfg,
                );
                Ok((conn, accept))
            }
            Transition::To(_) if !cfg.loose => Err(TcpInvalid::PickupDisabled),
            Transition::To(_) => conn.pickup(seg, index, cfg),
            Transition::Invalid | Transition::Ignore => Err(TcpInvalid::InvalidNew { index }),
        }
    }

    /// [`TcpConn::new`] of an ACK-index packet (mid-stream pickup), `self` zeroed: the
    /// general `process`. Out of line: the first SYN, the common case, stays small.
    #[inline(never)]
    fn pickup(
        mut self,
        seg: &TcpSegment,
        index: FlagIndex,
        cfg: &TcpConfig,
    ) -> Result<(TcpConn, TcpAccept), TcpInvalid> {
        let s = &mut self.seen[0];
        s.end = seg.end();
        s.maxwin = u32::from(seg.window).max(1);
        s.maxend = s.end.wrapping_add(s.maxwin);
        // Assume SACK and liberal window checking to cope with unknown scaling.
        let f = DirFlags::SACK_PERM.union(DirFlags::BE_LIBERAL);
        self.seen[0].flags = f;
        self.seen[1].flags = f;
        self.last_index = FlagIndex::None;
        match self.process(Dir::Original, seg, ConnStatus::default(), cfg) {
            TcpOutcome::Accept(a) => Ok((self, a)),
            TcpOutcome::Invalid { reason, .. } => Err(reason),
            // Not reachable for a (liberal) pickup from NONE; refuse rather than create
            // an entry without a timeout.
            TcpOutcome::Ignore(_) | TcpOutcome::Reopen => Err(TcpInvalid::InvalidNew { index }),
        }
    }

    /// Every later packet of the connection (`nf_conntrack_tcp_packet`), `dir` relative to
    /// the original tuple, `status` as the caller holds it before this packet.
    #[must_use]
    pub fn packet(
        &mut self,
        dir: Dir,
        seg: &TcpSegment,
        status: ConnStatus,
        cfg: &TcpConfig,
    ) -> TcpOutcome {
        if !flags_valid(seg.flags) {
            return TcpOutcome::Invalid {
                reason: TcpInvalid::BadFlags { flags: seg.flags },
                shrink_timeout_ns: None,
            };
        }
        self.process(dir, seg, status, cfg)
    }

    /// Current state.
    #[must_use]
    pub fn state(&self) -> TcpState {
        self.state
    }

    /// Window state of one direction.
    #[must_use]
    pub fn dir_state(&self, dir: Dir) -> &TcpDirState {
        &self.seen[dir.index()]
    }

    /// Identical ACK packets counted in a row (`retrans`).
    #[must_use]
    pub fn retrans(&self) -> u8 {
        self.retrans
    }

    /// Flowtable offload: both directions become BE_LIBERAL, for the rest of the
    /// connection's life.
    pub fn set_be_liberal(&mut self) {
        for s in &mut self.seen {
            s.flags.insert(DirFlags::BE_LIBERAL);
        }
    }

    /// Flowtable teardown fixup (`flow_offload_fixup_tcp`). With `closing` (the flow saw a
    /// FIN or RST) the state becomes CLOSE with CLOSE_INIT on the original direction, so a
    /// SYN reopens; the caller sets the CLOSE timeout. Always: `maxwin := 0` and
    /// MAXACK_SET cleared both ways, so the next slow-path packet re-initialises the
    /// window as in a pickup.
    pub fn flowtable_teardown(&mut self, closing: bool) {
        if closing {
            self.state = TcpState::Close;
        }
        if self.state == TcpState::Close {
            self.seen[0].flags.insert(DirFlags::CLOSE_INIT);
        }
        for s in &mut self.seen {
            s.maxwin = 0;
            s.flags.remove(DirFlags::MAXACK_SET);
        }
    }

    /// The body of `nf_conntrack_tcp_packet` after `tcp_error`/`tcp_new`.
    #[inline]
    pub(super) fn process(
        &mut self,
        dir: Dir,
        seg: &TcpSegment,
        status: ConnStatus,
        cfg: &TcpConfig,
    ) -> TcpOutcome {
        let mut old_state = self.state;
        let index = FlagIndex::from_flags(seg.flags);
        let mut skip_window = false;

        let mut new_state = match transition(dir, index, old_state) {
            Transition::Invalid => {
                return TcpOutcome::Invalid {
                    reason: TcpInvalid::Transition {
                        state: old_state,
                        dir,
                        index,
                    },
                    shrink_timeout_ns: None,
                };
            }
            Transition::To(TcpState::SynSent) if old_state >= TcpState::TimeWait => {
                // RFC 1122 reopen from TIME_WAIT/CLOSE, or an aborted connection.
                let closed = self.seen[0]
                    .flags
                    .union(self.seen[1].flags)
                    .contains(DirFlags::CLOSE_INIT);
                if closed || (self.last_dir == dir && self.last_index == FlagIndex::Rst) {
                    return TcpOutcome::Reopen;
                }
                match self.ignore(dir, index, seg, old_state) {
                    IgnoreResult::Resync => {
                        old_state = TcpState::SynSent;
                        TcpState::SynRecv
                    }
                    IgnoreResult::Ignored => return self.ignored(old_state, index),
                }
            }
            Transition::Ignore => match self.ignore(dir, index, seg, old_state) {
                IgnoreResult::Resync => {
                    old_state = TcpState::SynSent;
                    TcpState::SynRecv
                }
                IgnoreResult::Ignored => return self.ignored(old_state, index),
            },
            Transition::To(s) => s,
        };

        match new_state {
            // RFC 5961 challenge ACK answering an ignored SYN is not the last ACK.
            TcpState::TimeWait
                if old_state == TcpState::LastAck
                    && index == FlagIndex::Ack
                    && self.last_dir != dir
                    && self.last_index == FlagIndex::Syn
                    && self.last_flags.contains(DirFlags::EXP_CHALLENGE_ACK) =>
            {
                self.last_flags.remove(DirFlags::EXP_CHALLENGE_ACK);
                return TcpOutcome::Ignore(TcpIgnore::ChallengeAck);
            }
            TcpState::SynSent2 => {
                // The table cannot express simultaneous open on its own.
                self.last_flags.insert(DirFlags::SIMULTANEOUS_OPEN);
            }
            TcpState::SynRecv
                if dir == Dir::Reply
                    && index == FlagIndex::Ack
                    && self.last_flags.contains(DirFlags::SIMULTANEOUS_OPEN) =>
            {
                new_state = TcpState::Established;
            }
            TcpState::Close if index == FlagIndex::Rst => {
                match self.check_rst(dir, seg, status, cfg, old_state) {
                    RstCheck::Invalid(reason) => {
                        return TcpOutcome::Invalid {
                            reason,
                            shrink_timeout_ns: None,
                        };
                    }
                    RstCheck::Window => {}
                    RstCheck::WindowKeepState => new_state = old_state,
                    RstCheck::SkipWindow => skip_window = true,
                    RstCheck::SkipWindowKeepState => {
                        new_state = old_state;
                        skip_window = true;
                    }
                }
            }
            _ => {}
        }

        if !skip_window {
            match self.in_window(dir, index, seg, cfg) {
                WindowVerdict::Accept => {}
                WindowVerdict::Ignore(why) => return TcpOutcome::Ignore(why),
                WindowVerdict::Invalid(reason) => {
                    let shrink_timeout_ns = self.handle_invalid(dir, index, status, cfg);
                    return TcpOutcome::Invalid {
                        reason,
                        shrink_timeout_ns,
                    };
                }
            }
        }

        TcpOutcome::Accept(self.accepted(dir, index, old_state, new_state, status, cfg))
    }

    /// The end of `nf_conntrack_tcp_packet` for a packet in window (or let through
    /// without the window check): record it, move to `new_state`, and pick the
    /// timeout and the ASSURED decision.
    #[inline]
    fn accepted(
        &mut self,
        dir: Dir,
        index: FlagIndex,
        old_state: TcpState,
        new_state: TcpState,
        status: ConnStatus,
        cfg: &TcpConfig,
    ) -> TcpAccept {
        self.last_index = index;
        self.last_dir = dir;
        self.state = new_state;
        if old_state != new_state && new_state == TcpState::FinWait {
            self.seen[dir.index()].flags.insert(DirFlags::CLOSE_INIT);
        }

        let t = &cfg.timeouts;
        let t_new = t.for_state(new_state);
        let unacked = self.seen[0]
            .flags
            .union(self.seen[1].flags)
            .contains(DirFlags::DATA_UNACK);
        let mut timeout = if self.retrans >= cfg.max_retrans && t_new > t.max_retrans {
            t.max_retrans
        } else if index == FlagIndex::Rst {
            t.close
        } else if unacked && t_new > t.unacknowledged {
            t.unacknowledged
        } else if self.last_win == 0 && t_new > t.max_retrans {
            t.max_retrans
        } else {
            t_new
        };

        let mut accept = TcpAccept {
            old_state,
            new_state,
            timeout_ns: None,
            set_assured: false,
            delete_now: false,
        };
        if !status.seen_reply {
            if index == FlagIndex::Rst {
                // Only answer is a RST: no connection, delete at once.
                accept.delete_now = true;
                return accept;
            }
            if index == FlagIndex::Syn && old_state == TcpState::SynSent {
                // Do not renew the timeout on SYN retransmits (port reuse keeps it alive).
                return accept;
            }
            if new_state == TcpState::Established && timeout > t.unacknowledged {
                // Pickup without a reply: avoid the long ESTABLISHED timeout.
                timeout = t.unacknowledged;
            }
        } else if !status.assured
            && matches!(old_state, TcpState::SynRecv | TcpState::Established)
            && new_state == TcpState::Established
        {
            accept.set_assured = true;
        }
        accept.timeout_ns = Some(secs_to_ns(timeout));
        accept
    }

    fn ignored(&self, state: TcpState, index: FlagIndex) -> TcpOutcome {
        TcpOutcome::Ignore(TcpIgnore::Transition { state, index })
    }

    /// The IG case: resync on a SYN/ACK answering an ignored SYN, else record the packet.
    fn ignore(
        &mut self,
        dir: Dir,
        index: FlagIndex,
        seg: &TcpSegment,
        old_state: TcpState,
    ) -> IgnoreResult {
        if index == FlagIndex::SynAck
            && self.last_index == FlagIndex::Syn
            && self.last_dir != dir
            && seg.ack == self.last_end
        {
            // Client and server are in sync, we are not: restore the ignored SYN.
            let last_dir = self.last_dir.index();
            let s = &mut self.seen[last_dir];
            s.end = self.last_end;
            s.maxend = self.last_end;
            s.maxwin = u32::from(self.last_win).max(1);
            s.scale = self.last_wscale;
            self.last_flags.remove(DirFlags::EXP_CHALLENGE_ACK);
            s.flags = self.last_flags;
            self.seen[dir.index()].reset();
            return IgnoreResult::Resync;
        }
        self.last_index = index;
        self.last_dir = dir;
        self.last_seq = seg.seq;
        self.last_end = seg.end();
        self.last_win = seg.window;

        if index == FlagIndex::Syn && dir == Dir::Original {
            // Remember the SYN's options in case the server answers it.
            let mut opts = TcpDirState::default();
            opts.parse_options(seg);
            self.last_flags = DirFlags::empty();
            self.last_wscale = 0;
            if opts.flags.contains(DirFlags::WINDOW_SCALE) {
                self.last_flags.insert(DirFlags::WINDOW_SCALE);
                self.last_wscale = opts.scale;
            }
            if opts.flags.contains(DirFlags::SACK_PERM) {
                self.last_flags.insert(DirFlags::SACK_PERM);
            }
            if old_state == TcpState::LastAck {
                // An ACK now may be an RFC 5961 challenge ACK, not the last ACK.
                self.last_flags.insert(DirFlags::EXP_CHALLENGE_ACK);
            }
        }

        if old_state == TcpState::SynSent && index == FlagIndex::Ack && dir == Dir::Reply {
            // Possible challenge ACK answering the SYN.
            self.last_ack = seg.ack;
        }
        IgnoreResult::Ignored
    }

    /// The RST checks done before the window check when the table says CLOSE.
    fn check_rst(
        &self,
        dir: Dir,
        seg: &TcpSegment,
        status: ConnStatus,
        cfg: &TcpConfig,
        old_state: TcpState,
    ) -> RstCheck {
        // Closing: the tuple may already be reused; skip validation.
        if self.state.can_early_drop() {
            return RstCheck::SkipWindow;
        }
        let peer = &self.seen[dir.opposite().index()];
        let established = self.state == TcpState::Established && status.assured;
        let mut result = RstCheck::Window;
        let mut check_skips = true;
        // maxack may be stale if a SYN was let through earlier.
        if peer.flags.contains(DirFlags::MAXACK_SET) && self.last_index != FlagIndex::Syn {
            let seq = seg.seq;
            if seq == 0 && !established {
                // Most likely answering a SYN we let through.
                check_skips = false;
            } else if before(seq, peer.maxack) && !cfg.ignore_invalid_rst {
                return RstCheck::Invalid(TcpInvalid::InvalidRst {
                    seq,
                    maxack: peer.maxack,
                });
            } else if !established
                || seq == peer.maxack
                || (self.last_index == FlagIndex::Ack
                    && self.last_dir == dir
                    && seq == self.last_end)
            {
                // Exact, or part of a RST train following our data.
                check_skips = false;
            } else {
                // Inexact RST: keep the state so a challenge ACK can follow.
                result = RstCheck::WindowKeepState;
            }
        }
        if check_skips {
            if ((status.seen_reply && self.last_index == FlagIndex::Syn)
                || (!status.assured && self.last_index == FlagIndex::Ack))
                && seg.ack == self.last_end
            {
                // RST answering a SYN or ACK we let through: may ack what we ignored.
                return match result {
                    RstCheck::WindowKeepState => RstCheck::SkipWindowKeepState,
                    _ => RstCheck::SkipWindow,
                };
            }
            if old_state == TcpState::SynSent
                && self.last_index == FlagIndex::Ack
                && self.last_dir == Dir::Reply
                && seg.seq == self.last_ack
            {
                // RST answering a challenge ACK we let through.
                return match result {
                    RstCheck::WindowKeepState => RstCheck::SkipWindowKeepState,
                    _ => RstCheck::SkipWindow,
                };
            }
        }
        result
    }

    /// `nf_tcp_handle_invalid`: an out-of-window FIN/RST answering one from the other side
    /// shrinks a long timeout of an ASSURED entry to UNACK.
    fn handle_invalid(
        &mut self,
        dir: Dir,
        index: FlagIndex,
        status: ConnStatus,
        cfg: &TcpConfig,
    ) -> Option<u64> {
        if !status.assured || status.fixed_timeout {
            return None;
        }
        if !matches!(index, FlagIndex::Rst | FlagIndex::Fin) {
            return None;
        }
        if self.last_dir != dir && matches!(self.last_index, FlagIndex::Fin | FlagIndex::Rst) {
            if status.remaining_ns < HANDLE_INVALID_MIN_NS {
                return None;
            }
            let unack = secs_to_ns(cfg.timeouts.unacknowledged);
            (status.remaining_ns > unack).then_some(unack)
        } else {
            self.last_index = index;
            self.last_dir = dir;
            None
        }
    }
}

/// Outcome of the RST pre-checks.
enum RstCheck {
    /// Invalid RST.
    Invalid(TcpInvalid),
    /// Go to the window check, then CLOSE.
    Window,
    /// Go to the window check but keep the old state.
    WindowKeepState,
    /// Skip the window check, then CLOSE.
    SkipWindow,
    /// Skip the window check and keep the old state.
    SkipWindowKeepState,
}
