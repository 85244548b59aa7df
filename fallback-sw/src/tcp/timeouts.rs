//! TCP timeouts (`net.netfilter.nf_conntrack_tcp_timeout_*`), Linux defaults.

use super::TcpState;

/// Nanoseconds per second.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Per-state TCP timeouts in whole seconds, like the Linux sysctls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TcpTimeouts {
    /// SYN_SENT (and NONE, which Linux aliases to SYN_SENT). Default 120 s.
    pub syn_sent: u32,
    /// SYN_RECV. Default 60 s.
    pub syn_recv: u32,
    /// ESTABLISHED. Default 432000 s (5 days).
    pub established: u32,
    /// FIN_WAIT. Default 120 s.
    pub fin_wait: u32,
    /// CLOSE_WAIT. Default 60 s.
    pub close_wait: u32,
    /// LAST_ACK. Default 30 s.
    pub last_ack: u32,
    /// TIME_WAIT. Default 120 s.
    pub time_wait: u32,
    /// CLOSE. Default 10 s.
    pub close: u32,
    /// SYN_SENT2 (no sysctl in Linux). Default 120 s.
    pub syn_sent2: u32,
    /// `…_max_retrans` (TCP_CONNTRACK_RETRANS): used after `max_retrans`
    /// retransmissions and for a zero last window. Default 300 s.
    pub max_retrans: u32,
    /// `…_unacknowledged` (TCP_CONNTRACK_UNACK): used while data is unacknowledged.
    /// Default 300 s.
    pub unacknowledged: u32,
}

impl Default for TcpTimeouts {
    fn default() -> Self {
        TcpTimeouts {
            syn_sent: 120,
            syn_recv: 60,
            established: 5 * 24 * 3600,
            fin_wait: 120,
            close_wait: 60,
            last_ack: 30,
            time_wait: 120,
            close: 10,
            syn_sent2: 120,
            max_retrans: 300,
            unacknowledged: 300,
        }
    }
}

impl TcpTimeouts {
    /// `timeouts[state]` in seconds.
    #[must_use]
    pub const fn for_state(&self, state: TcpState) -> u32 {
        match state {
            TcpState::None | TcpState::SynSent => self.syn_sent,
            TcpState::SynRecv => self.syn_recv,
            TcpState::Established => self.established,
            TcpState::FinWait => self.fin_wait,
            TcpState::CloseWait => self.close_wait,
            TcpState::LastAck => self.last_ack,
            TcpState::TimeWait => self.time_wait,
            TcpState::Close => self.close,
            TcpState::SynSent2 => self.syn_sent2,
        }
    }
}

/// Seconds to nanoseconds (cannot overflow: `u32::MAX` s is far below `u64::MAX` ns).
#[inline]
#[must_use]
pub fn secs_to_ns(secs: u32) -> u64 {
    u64::from(secs) * NS_PER_SEC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linux_defaults() {
        let t = TcpTimeouts::default();
        let expect = [
            (TcpState::SynSent, 120),
            (TcpState::SynRecv, 60),
            (TcpState::Established, 432_000),
            (TcpState::FinWait, 120),
            (TcpState::CloseWait, 60),
            (TcpState::LastAck, 30),
            (TcpState::TimeWait, 120),
            (TcpState::Close, 10),
            (TcpState::SynSent2, 120),
        ];
        for (s, secs) in expect {
            assert_eq!(t.for_state(s), secs, "{s}");
        }
        assert_eq!(t.max_retrans, 300);
        assert_eq!(t.unacknowledged, 300);
        assert_eq!(secs_to_ns(10), 10_000_000_000);
        assert_eq!(secs_to_ns(u32::MAX), u64::from(u32::MAX) * NS_PER_SEC);
    }
}
