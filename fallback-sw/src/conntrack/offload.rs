//! What the offload policy and the reconciler ask of conntrack, with Linux flowtable
//! semantics (`conntrack-semantics.md` §8): eligibility, marking a connection
//! offloaded, keeping it alive while a fast path carries it, adding counts made
//! elsewhere, and the teardown fix-up when it returns to the slow path.
//!
//! While a connection is offloaded its conntrack timeout is held far in the future
//! (Linux: one day), so software GC cannot expire it: the owner of the fast path
//! decides when the flow is idle, removes it from the fast path first, and only then
//! calls [`Conntrack::teardown`], which shortens the timeout as Linux does. This is
//! how invariants 1 (no early death) and 2 (hardware before software) reach this
//! crate without it knowing that hardware exists.

use super::{Conntrack, L4State, NS};
use crate::table::{Counter, Slot, Status};
use crate::tcp::TcpState;
use crate::tuple::Dir;

/// Linux sets the conntrack timeout of an offloaded connection to one day.
const OFFLOADED_CT_TIMEOUT_NS: u64 = 86_400 * NS;
/// Live offloaded flows are extended once less than this remains (Linux GC: 5 min).
const EXTEND_BELOW_NS: u64 = 300 * NS;

/// Why a connection cannot be offloaded (Linux `nft_flow_offload` eligibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotOffloadable {
    /// No such connection.
    #[error("no such connection")]
    Gone,
    /// Already offloaded.
    #[error("already offloaded")]
    AlreadyOffloaded,
    /// TCP must be ESTABLISHED and ASSURED.
    #[error("TCP connection is {state} (assured: {assured}), needs ESTABLISHED and ASSURED")]
    TcpNotEstablished {
        /// Its state.
        state: TcpState,
        /// Whether it is assured.
        assured: bool,
    },
    /// UDP entries created by clash resolution stay in software.
    #[error("UDP entry created by clash resolution")]
    NatClash,
    /// Only TCP and UDP are offloaded.
    #[error("protocol {proto} is not offloadable")]
    Protocol {
        /// IP protocol number.
        proto: u8,
    },
}

/// How an offloaded connection comes back to the slow path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// The fast path saw no traffic for its flow timeout; `idle_ns` is how long the
    /// flow has been idle (Linux subtracts it from the fresh state timeout).
    Idle {
        /// Time since the flow's last packet, in ns.
        idle_ns: u64,
    },
    /// The connection is closing and the state machine did not see it (TCP CLOSING
    /// in Linux flowtable terms): the state becomes CLOSE, timeout 10 s.
    Closing,
    /// Taken off the fast path for another reason (the slow path saw a FIN or RST and
    /// advanced the state itself, a device fault, an operator drain): keep the state.
    Returned,
}

impl Conntrack {
    /// Whether Linux would offload this connection now (TCP ESTABLISHED + ASSURED,
    /// any confirmed UDP entry without NAT_CLASH; nothing else).
    pub fn offload_check(&self, slot: Slot) -> Result<(), NotOffloadable> {
        let conn = self.table.entry(slot).ok_or(NotOffloadable::Gone)?;
        if conn.status.contains(Status::OFFLOAD) {
            return Err(NotOffloadable::AlreadyOffloaded);
        }
        match conn.proto {
            L4State::Tcp(tcp) => {
                let assured = conn.status.contains(Status::ASSURED);
                if tcp.state() == TcpState::Established && assured {
                    Ok(())
                } else {
                    Err(NotOffloadable::TcpNotEstablished {
                        state: tcp.state(),
                        assured,
                    })
                }
            }
            L4State::Udp { .. } if conn.status.contains(Status::NAT_CLASH) => {
                Err(NotOffloadable::NatClash)
            }
            L4State::Udp { .. } => Ok(()),
            L4State::Icmp | L4State::Generic => Err(NotOffloadable::Protocol {
                proto: self.table.tuple(slot, Dir::Original).map_or(0, |t| t.proto),
            }),
        }
    }

    /// Mark the connection offloaded (Linux `flow_offload_add`): set OFFLOAD, make TCP
    /// window tracking liberal both ways for life, and hold the timeout one day ahead.
    pub fn mark_offloaded(&mut self, slot: Slot, now: u64) -> Result<(), NotOffloadable> {
        self.offload_check(slot)?;
        let conn = self.table.get_mut(slot).ok_or(NotOffloadable::Gone)?;
        conn.status.insert(Status::OFFLOAD);
        if let (L4State::Tcp(_), Some(tcp)) = (conn.proto, self.tcp.get_mut(slot)) {
            tcp.set_be_liberal();
        }
        self.table
            .set_timeout(slot, now.saturating_add(OFFLOADED_CT_TIMEOUT_NS));
        Ok(())
    }

    /// Set or clear HW_OFFLOAD (the flow is in the hardware table) on an offloaded
    /// connection.
    pub fn set_hw_offloaded(&mut self, slot: Slot, in_hw: bool) {
        if let Some(conn) = self.table.get_mut(slot) {
            conn.status.set(Status::HW_OFFLOAD, in_hw);
        }
    }

    /// Keep a live offloaded connection from expiring (Linux flowtable GC): when less
    /// than 5 minutes remain, extend UDP and ESTABLISHED TCP to a day, TCP in FIN_WAIT,
    /// CLOSE_WAIT, LAST_ACK or TIME_WAIT to 5 minutes, and nothing else.
    pub fn keep_alive(&mut self, slot: Slot, now: u64) {
        let Some(conn) = self.table.entry(slot) else {
            return;
        };
        if !conn.status.contains(Status::OFFLOAD) || conn.remaining(now) >= EXTEND_BELOW_NS {
            return;
        }
        let extend = match conn.proto {
            L4State::Udp { .. } => Some(OFFLOADED_CT_TIMEOUT_NS),
            L4State::Tcp(tcp) => match tcp.state() {
                TcpState::Established => Some(OFFLOADED_CT_TIMEOUT_NS),
                TcpState::FinWait
                | TcpState::CloseWait
                | TcpState::LastAck
                | TcpState::TimeWait => Some(EXTEND_BELOW_NS),
                TcpState::None
                | TcpState::SynSent
                | TcpState::SynRecv
                | TcpState::Close
                | TcpState::SynSent2 => None,
            },
            L4State::Icmp | L4State::Generic => None,
        };
        if let Some(ns) = extend {
            self.table.set_timeout(slot, now.saturating_add(ns));
        }
    }

    /// Add packets and bytes counted outside this crate (a fast path) to one direction
    /// of a connection, so that reported totals count every packet once.
    pub fn add_external_counts(&mut self, slot: Slot, dir: Dir, delta: Counter) {
        self.table.count(slot, dir, delta.packets, delta.bytes);
    }

    /// The connection left the fast path (Linux `flow_offload_teardown` fix-up): clear
    /// OFFLOAD and HW_OFFLOAD and fix the timeout as if the slow path had seen every
    /// packet. TCP window state is reset so the next packet re-initialises it.
    pub fn teardown(&mut self, slot: Slot, how: Teardown, now: u64) {
        let tcp_t = self.cfg.tcp.timeouts;
        let t = self.cfg.timeouts;
        let Some(conn) = self.table.get_mut(slot) else {
            return;
        };
        if !conn.status.contains(Status::OFFLOAD) {
            return; // idempotent
        }
        conn.status.remove(Status::OFFLOAD | Status::HW_OFFLOAD);
        let seen_reply = conn.status.contains(Status::SEEN_REPLY);
        let remaining = conn.remaining(now);
        let closing = how == Teardown::Closing;
        let state_timeout_ns = match &mut conn.proto {
            L4State::Tcp(summary) => {
                if let Some(tcp) = self.tcp.get_mut(slot) {
                    tcp.flowtable_teardown(closing);
                    summary.state = tcp.state();
                }
                u64::from(tcp_t.for_state(summary.state())) * NS
            }
            L4State::Udp { .. } if seen_reply => u64::from(t.udp_stream) * NS,
            L4State::Udp { .. } => u64::from(t.udp) * NS,
            L4State::Icmp => u64::from(t.icmp) * NS,
            L4State::Generic => u64::from(t.generic) * NS,
        };
        let new_timeout = if closing {
            // Unconditionally the CLOSE timeout.
            Some(u64::from(tcp_t.close) * NS)
        } else {
            let t = match how {
                Teardown::Idle { idle_ns } => state_timeout_ns.saturating_sub(idle_ns),
                Teardown::Closing | Teardown::Returned => state_timeout_ns,
            };
            // Only if that shortens it.
            (t < remaining).then_some(t)
        };
        if let Some(ns) = new_timeout {
            self.table.set_timeout(slot, now.saturating_add(ns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Verdict};
    use super::*;
    use etherparse::PacketBuilder;

    const S: u64 = NS;

    fn tcp(
        src: [u8; 4],
        dst: [u8; 4],
        sp: u16,
        dp: u16,
        seq: u32,
        ack: Option<u32>,
        f: &str,
    ) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sp, dp, seq, 65535);
        if f.contains('S') {
            b = b.syn();
        }
        if f.contains('F') {
            b = b.fin();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        v
    }

    fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .udp(sp, dp)
            .write(&mut v, b"x")
            .expect("build");
        v
    }

    fn slot_of(v: Verdict) -> Slot {
        match v {
            Verdict::Tracked { slot, .. } => slot,
            other => panic!("not tracked: {other:?}"),
        }
    }

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 1, 1];

    fn established(ct: &mut Conntrack) -> Slot {
        let s = slot_of(ct.process(&tcp(A, B, 1000, 80, 100, None, "S"), 0, 0));
        assert!(ct.offload_check(s).is_err(), "SYN_SENT is not offloadable");
        slot_of(ct.process(&tcp(B, A, 80, 1000, 500, Some(101), "S"), 0, 0));
        slot_of(ct.process(&tcp(A, B, 1000, 80, 101, Some(501), ""), 0, 0));
        s
    }

    #[test]
    fn tcp_offload_holds_timeout_and_teardown_restores_it() {
        let mut ct = Conntrack::new(Config::default());
        let s = established(&mut ct);
        ct.offload_check(s).expect("established + assured");
        ct.mark_offloaded(s, S).expect("offload");
        assert_eq!(ct.offload_check(s), Err(NotOffloadable::AlreadyOffloaded));
        let conn = ct.table().get(s).expect("live");
        assert!(conn.status.contains(Status::OFFLOAD));
        assert_eq!(conn.remaining(S), 86_400 * S);
        // Software GC cannot expire it while offloaded, even after days, if kept alive.
        let mut now = S;
        for _ in 0..10 {
            now += 86_200 * S;
            ct.keep_alive(s, now);
            ct.gc(now, 1000);
        }
        assert!(ct.table().get(s).is_some());
        // Idle in the fast path for 40 s: ESTABLISHED (5 days) minus 40 s, which is longer
        // than what remains (< 1 day): unchanged.
        let before = ct.table().get(s).expect("live").timeout;
        ct.teardown(s, Teardown::Idle { idle_ns: 40 * S }, now);
        let conn = ct.table().get(s).expect("live");
        assert!(!conn.status.contains(Status::OFFLOAD));
        assert_eq!(conn.timeout, before, "teardown only shortens");
        // The next packet re-initialises the window (maxwin reset) and is accepted.
        let v = ct.process(&tcp(A, B, 1000, 80, 5_000_101, Some(501), ""), 0, now);
        assert!(matches!(v, Verdict::Tracked { .. }), "{v:?}");
    }

    #[test]
    fn closing_teardown_sets_close_and_ten_seconds() {
        let mut ct = Conntrack::new(Config::default());
        let s = established(&mut ct);
        ct.mark_offloaded(s, 0).expect("offload");
        ct.teardown(s, Teardown::Closing, 5 * S);
        let conn = ct.table().get(s).expect("live");
        assert_eq!(conn.remaining(5 * S), 10 * S);
        match conn.proto {
            L4State::Tcp(t) => assert_eq!(t.state(), TcpState::Close),
            other => panic!("{other:?}"),
        }
        // Teardown is idempotent.
        ct.teardown(s, Teardown::Closing, 7 * S);
        assert_eq!(ct.table().get(s).expect("live").remaining(5 * S), 10 * S);
    }

    #[test]
    fn udp_offload_and_idle_teardown_shortens_to_remaining_unreplied_time() {
        let mut ct = Conntrack::new(Config::default());
        let s = slot_of(ct.process(&udp(A, B, 5000, 53), 0, 0));
        ct.offload_check(s).expect("any confirmed UDP entry");
        ct.mark_offloaded(s, 0).expect("offload");
        // Idle 10 s in the fast path, never replied: 30 s - 10 s = 20 s left.
        ct.teardown(s, Teardown::Idle { idle_ns: 10 * S }, 40 * S);
        assert_eq!(ct.table().get(s).expect("live").remaining(40 * S), 20 * S);
        assert_eq!(ct.gc(61 * S, 100), 1);
    }

    #[test]
    fn keep_alive_extends_only_when_close_to_expiry() {
        let mut ct = Conntrack::new(Config::default());
        let s = slot_of(ct.process(&udp(A, B, 5001, 53), 0, 0));
        ct.keep_alive(s, 0);
        assert_eq!(
            ct.table().get(s).expect("live").remaining(0),
            30 * S,
            "not offloaded: untouched"
        );
        ct.mark_offloaded(s, 0).expect("offload");
        let t0 = ct.table().get(s).expect("live").timeout;
        ct.keep_alive(s, 1000 * S);
        assert_eq!(ct.table().get(s).expect("live").timeout, t0, "plenty left");
        ct.keep_alive(s, 86_200 * S);
        assert_eq!(
            ct.table().get(s).expect("live").remaining(86_200 * S),
            86_400 * S
        );
    }

    #[test]
    fn external_counts_add_to_the_right_direction() {
        let mut ct = Conntrack::new(Config::default());
        let s = slot_of(ct.process(&udp(A, B, 5002, 53), 0, 0));
        ct.add_external_counts(
            s,
            Dir::Reply,
            Counter {
                packets: 10,
                bytes: 1000,
            },
        );
        let c = ct.table().get(s).expect("live").counters;
        assert_eq!(
            c[0],
            Counter {
                packets: 1,
                bytes: 29
            }
        );
        assert_eq!(
            c[1],
            Counter {
                packets: 10,
                bytes: 1000
            }
        );
    }

    #[test]
    fn icmp_is_not_offloadable() {
        let mut ct = Conntrack::new(Config::default());
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(A, B, 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut v, b"p")
            .expect("build");
        let s = slot_of(ct.process(&v, 0, 0));
        assert_eq!(
            ct.offload_check(s),
            Err(NotOffloadable::Protocol { proto: 1 })
        );
    }
}
