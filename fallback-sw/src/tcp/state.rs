//! TCP conntrack states, the flag index and the v6.18 transition tables.

use core::fmt;

use super::Dir;

/// A conntrack TCP state, in Linux's numeric order (`enum tcp_conntrack`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum TcpState {
    /// `NONE`: initial state, never stored after the first packet.
    None = 0,
    /// `SYN_SENT`: SYN seen in the original direction.
    SynSent = 1,
    /// `SYN_RECV`: SYN/ACK seen.
    SynRecv = 2,
    /// `ESTABLISHED`: handshake ACK (or a picked-up ACK) seen.
    Established = 3,
    /// `FIN_WAIT`: first FIN seen.
    FinWait = 4,
    /// `CLOSE_WAIT`: the first FIN was acknowledged.
    CloseWait = 5,
    /// `LAST_ACK`: FINs seen both ways, waiting for the last ACK.
    LastAck = 6,
    /// `TIME_WAIT`: last ACK seen.
    TimeWait = 7,
    /// `CLOSE`: closed by RST.
    Close = 8,
    /// `SYN_SENT2`: SYN seen from the reply direction (simultaneous open).
    SynSent2 = 9,
}

impl TcpState {
    /// All states in numeric order.
    pub const ALL: [TcpState; 10] = [
        TcpState::None,
        TcpState::SynSent,
        TcpState::SynRecv,
        TcpState::Established,
        TcpState::FinWait,
        TcpState::CloseWait,
        TcpState::LastAck,
        TcpState::TimeWait,
        TcpState::Close,
        TcpState::SynSent2,
    ];

    /// The Linux numeric value (`TCP_CONNTRACK_*`), also the table column.
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name Linux prints in `/proc/net/nf_conntrack` and `conntrack -L`.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            TcpState::None => "NONE",
            TcpState::SynSent => "SYN_SENT",
            TcpState::SynRecv => "SYN_RECV",
            TcpState::Established => "ESTABLISHED",
            TcpState::FinWait => "FIN_WAIT",
            TcpState::CloseWait => "CLOSE_WAIT",
            TcpState::LastAck => "LAST_ACK",
            TcpState::TimeWait => "TIME_WAIT",
            TcpState::Close => "CLOSE",
            TcpState::SynSent2 => "SYN_SENT2",
        }
    }

    /// States in which Linux allows early drop of the entry (`tcp_can_early_drop`):
    /// FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT and CLOSE.
    #[must_use]
    pub const fn can_early_drop(self) -> bool {
        matches!(
            self,
            TcpState::FinWait
                | TcpState::CloseWait
                | TcpState::LastAck
                | TcpState::TimeWait
                | TcpState::Close
        )
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which row of the transition table a segment uses (`enum tcp_bit_set`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FlagIndex {
    /// SYN without ACK.
    Syn = 0,
    /// SYN with ACK.
    SynAck = 1,
    /// FIN (no SYN, no RST).
    Fin = 2,
    /// ACK (no SYN, FIN or RST).
    Ack = 3,
    /// RST (wins over every other flag).
    Rst = 4,
    /// None of RST, SYN, FIN, ACK.
    None = 5,
}

impl FlagIndex {
    /// All rows in table order.
    pub const ALL: [FlagIndex; 6] = [
        FlagIndex::Syn,
        FlagIndex::SynAck,
        FlagIndex::Fin,
        FlagIndex::Ack,
        FlagIndex::Rst,
        FlagIndex::None,
    ];

    /// `get_conntrack_index`: RST, then SYN (SYN/ACK if ACK), then FIN, then ACK.
    #[must_use]
    pub const fn from_flags(flags: super::TcpFlags) -> FlagIndex {
        if flags.contains(super::TcpFlags::RST) {
            FlagIndex::Rst
        } else if flags.contains(super::TcpFlags::SYN) {
            if flags.contains(super::TcpFlags::ACK) {
                FlagIndex::SynAck
            } else {
                FlagIndex::Syn
            }
        } else if flags.contains(super::TcpFlags::FIN) {
            FlagIndex::Fin
        } else if flags.contains(super::TcpFlags::ACK) {
            FlagIndex::Ack
        } else {
            FlagIndex::None
        }
    }

    /// The table row.
    #[inline]
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// One cell of the transition table: a state, or the pseudo-results IV / IG.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transition {
    /// Move to (or stay in) this state, subject to the overrides.
    To(TcpState),
    /// `sIV`: the packet is invalid.
    Invalid,
    /// `sIG`: accept the packet without touching state, window or timeout.
    Ignore,
}

const NO: Transition = Transition::To(TcpState::None);
const SS: Transition = Transition::To(TcpState::SynSent);
const SR: Transition = Transition::To(TcpState::SynRecv);
const ES: Transition = Transition::To(TcpState::Established);
const FW: Transition = Transition::To(TcpState::FinWait);
const CW: Transition = Transition::To(TcpState::CloseWait);
const LA: Transition = Transition::To(TcpState::LastAck);
const TW: Transition = Transition::To(TcpState::TimeWait);
const CL: Transition = Transition::To(TcpState::Close);
const S2: Transition = Transition::To(TcpState::SynSent2);
const IV: Transition = Transition::Invalid;
const IG: Transition = Transition::Ignore;

// `NO` is never a table result; keep the name for symmetry with the Linux macros.
const _: Transition = NO;

/// `tcp_conntracks[dir][index][old_state]` as in Linux v6.18.
#[rustfmt::skip]
static TCP_CONNTRACKS: [[[Transition; 10]; 6]; 2] = [
    // ORIGINAL
    [
        //            NO  SS  SR  ES  FW  CW  LA  TW  CL  S2
        /* syn    */ [SS, SS, IG, IG, IG, IG, IG, SS, SS, S2],
        /* synack */ [IV, IV, SR, IV, IV, IV, IV, IV, IV, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [ES, IV, ES, ES, CW, CW, TW, TW, CL, IV],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
    // REPLY
    [
        //            NO  SS  SR  ES  FW  CW  LA  TW  CL  S2
        /* syn    */ [IV, S2, IV, IV, IV, IV, IV, SS, IV, S2],
        /* synack */ [IV, SR, IG, IG, IG, IG, IG, IG, IG, SR],
        /* fin    */ [IV, IV, FW, FW, LA, LA, LA, TW, CL, IV],
        /* ack    */ [IV, IG, SR, ES, CW, CW, TW, TW, CL, IG],
        /* rst    */ [IV, CL, CL, CL, CL, CL, CL, CL, CL, CL],
        /* none   */ [IV, IV, IV, IV, IV, IV, IV, IV, IV, IV],
    ],
];

/// Looks up the raw table value `tcp_conntracks[dir][index][old]`, before any override.
#[inline]
#[must_use]
pub fn transition(dir: Dir, index: FlagIndex, old: TcpState) -> Transition {
    TCP_CONNTRACKS[dir.index()][index.index()][old.index()]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Transcribed independently from `conntrack-semantics.md` §2, as strings.
    const ORIGINAL: [[&str; 10]; 6] = [
        ["SS", "SS", "IG", "IG", "IG", "IG", "IG", "SS", "SS", "S2"],
        ["IV", "IV", "SR", "IV", "IV", "IV", "IV", "IV", "IV", "SR"],
        ["IV", "IV", "FW", "FW", "LA", "LA", "LA", "TW", "CL", "IV"],
        ["ES", "IV", "ES", "ES", "CW", "CW", "TW", "TW", "CL", "IV"],
        ["IV", "CL", "CL", "CL", "CL", "CL", "CL", "CL", "CL", "CL"],
        ["IV", "IV", "IV", "IV", "IV", "IV", "IV", "IV", "IV", "IV"],
    ];
    const REPLY: [[&str; 10]; 6] = [
        ["IV", "S2", "IV", "IV", "IV", "IV", "IV", "SS", "IV", "S2"],
        ["IV", "SR", "IG", "IG", "IG", "IG", "IG", "IG", "IG", "SR"],
        ["IV", "IV", "FW", "FW", "LA", "LA", "LA", "TW", "CL", "IV"],
        ["IV", "IG", "SR", "ES", "CW", "CW", "TW", "TW", "CL", "IG"],
        ["IV", "CL", "CL", "CL", "CL", "CL", "CL", "CL", "CL", "CL"],
        ["IV", "IV", "IV", "IV", "IV", "IV", "IV", "IV", "IV", "IV"],
    ];

    fn short(t: Transition) -> &'static str {
        match t {
            Transition::Invalid => "IV",
            Transition::Ignore => "IG",
            Transition::To(s) => match s {
                TcpState::None => "NO",
                TcpState::SynSent => "SS",
                TcpState::SynRecv => "SR",
                TcpState::Established => "ES",
                TcpState::FinWait => "FW",
                TcpState::CloseWait => "CW",
                TcpState::LastAck => "LA",
                TcpState::TimeWait => "TW",
                TcpState::Close => "CL",
                TcpState::SynSent2 => "S2",
            },
        }
    }

    #[test]
    fn every_cell_matches_digest() {
        let mut checked = 0;
        for (dir, expected) in [(Dir::Original, &ORIGINAL), (Dir::Reply, &REPLY)] {
            for (row, index) in FlagIndex::ALL.into_iter().enumerate() {
                for (col, old) in TcpState::ALL.into_iter().enumerate() {
                    assert_eq!(
                        short(transition(dir, index, old)),
                        expected[row][col],
                        "{dir:?} {index:?} {old}"
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 2 * 6 * 10);
    }

    #[test]
    fn numeric_order_and_names() {
        for (i, s) in TcpState::ALL.into_iter().enumerate() {
            assert_eq!(s.index(), i);
        }
        assert_eq!(TcpState::SynSent.to_string(), "SYN_SENT");
        assert_eq!(TcpState::Established.to_string(), "ESTABLISHED");
        assert_eq!(TcpState::SynSent2.to_string(), "SYN_SENT2");
        assert_eq!(TcpState::CloseWait.to_string(), "CLOSE_WAIT");
    }

    #[test]
    fn flag_index_priority() {
        use super::super::TcpFlags as F;
        assert_eq!(
            FlagIndex::from_flags(F::RST | F::SYN | F::ACK),
            FlagIndex::Rst
        );
        assert_eq!(
            FlagIndex::from_flags(F::SYN | F::ACK | F::FIN),
            FlagIndex::SynAck
        );
        assert_eq!(FlagIndex::from_flags(F::SYN | F::FIN), FlagIndex::Syn);
        assert_eq!(FlagIndex::from_flags(F::FIN | F::ACK), FlagIndex::Fin);
        assert_eq!(FlagIndex::from_flags(F::ACK | F::PSH), FlagIndex::Ack);
        assert_eq!(FlagIndex::from_flags(F::PSH), FlagIndex::None);
    }
}
