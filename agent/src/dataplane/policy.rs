//! The offload policy: which connections go to hardware, and when.
//!
//! - TCP once ESTABLISHED and ASSURED, i.e. after the handshake's final ACK went
//!   through the slow path (conntrack's eligibility, Linux `nft_flow_offload`).
//! - UDP once a reply has been seen (the slow path learnt both directions' ports and
//!   L2 path), and never a NAT-clash entry.
//! - A configurable minimum number of packets, and a switch per protocol.
//!
//! Every connection not in hardware carries a [`NotOffloaded`] reason. Insert failures
//! (table full, bucket collision, device error) leave the flow in software, are counted,
//! and are retried after an exponential [`Backoff`].

use ctoffload_fallback_sw::conntrack::{Conntrack, NotOffloadable};
use ctoffload_fallback_sw::table::{Slot, Status};
use ctoffload_fallback_sw::tuple::proto;

use super::hw_rule::RuleError;

const NS: u64 = 1_000_000_000;

/// Offload policy configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadPolicy {
    /// Offload TCP connections.
    pub tcp: bool,
    /// Offload UDP connections.
    pub udp: bool,
    /// Packets (both directions) the slow path must have seen first.
    pub min_packets: u64,
    /// A TCP flow idle this long in hardware leaves it (Linux
    /// `nf_flowtable_tcp_timeout`, 30 s).
    pub tcp_idle_ns: u64,
    /// A UDP flow idle this long in hardware leaves it (`nf_flowtable_udp_timeout`).
    pub udp_idle_ns: u64,
    /// First retry delay after a failed insert; doubles per failure.
    pub retry_base_ns: u64,
    /// Cap of the retry delay.
    pub retry_max_ns: u64,
    /// When the table is full, evict the offloaded flow idle the longest to make room.
    pub displace_coldest: bool,
}

impl Default for OffloadPolicy {
    fn default() -> Self {
        Self {
            tcp: true,
            udp: true,
            min_packets: 0,
            tcp_idle_ns: 30 * NS,
            udp_idle_ns: 30 * NS,
            retry_base_ns: NS,
            retry_max_ns: 60 * NS,
            displace_coldest: false,
        }
    }
}

/// Why the policy waits before offloading (the connection may qualify later).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// TCP is not ESTABLISHED and ASSURED yet.
    TcpNotEstablished,
    /// UDP has seen no reply yet.
    UdpNotReplied,
    /// Fewer packets than the configured minimum.
    TooFewPackets {
        /// Packets seen.
        seen: u64,
        /// Packets needed.
        need: u64,
    },
    /// A UDP entry created by clash resolution (never offloaded).
    NatClash,
}

/// Why a connection is not in hardware.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NotOffloaded {
    /// The policy does not offload it yet.
    #[error("policy: {0:?}")]
    Policy(Wait),
    /// Offload is switched off for its protocol.
    #[error("offload disabled for protocol {proto}")]
    Disabled {
        /// IP protocol number.
        proto: u8,
    },
    /// The protocol cannot be offloaded.
    #[error("protocol {proto} not offloadable")]
    Protocol {
        /// IP protocol number.
        proto: u8,
    },
    /// No device rule can express it.
    #[error("no hardware rule: {0}")]
    NoRule(#[source] RuleError),
    /// The device table is full (`TABLE_FULL`).
    #[error("hardware table full")]
    TableFull,
    /// Its key's bucket is full, or the key is already installed (`BUCKET_FULL`, `EXISTS`).
    #[error("hardware bucket collision")]
    Collision,
    /// An insert failed inside the device (`DEVICE_ERROR`, unknown status).
    #[error("device error on insert")]
    DeviceError,
    /// The device is down (fault, reset, recovery pending).
    #[error("device down")]
    DeviceDown,
    /// It left hardware after being idle there.
    #[error("idle in hardware")]
    Idle,
    /// It left hardware because the connection is closing (FIN/RST seen).
    #[error("connection closing")]
    Closing,
    /// It was displaced to make room for another flow.
    #[error("displaced by a newer flow")]
    Displaced,
    /// An operator drained the hardware table.
    #[error("drained by the operator")]
    Drained,
}

impl NotOffloaded {
    /// Whether this reason is an insert failure that is retried with backoff.
    #[must_use]
    pub fn is_retryable_failure(self) -> bool {
        matches!(self, Self::TableFull | Self::Collision | Self::DeviceError)
    }
}

/// Whether the connection in `slot` should go to hardware now.
///
/// # Errors
/// The reason it should not.
pub fn decide(policy: &OffloadPolicy, ct: &Conntrack, slot: Slot) -> Result<(), NotOffloaded> {
    let Some(conn) = ct.table().get(slot) else {
        return Err(NotOffloaded::Protocol { proto: 0 });
    };
    let p = conn.tuples[0].proto;
    let enabled = match p {
        proto::TCP => policy.tcp,
        proto::UDP => policy.udp,
        _ => return Err(NotOffloaded::Protocol { proto: p }),
    };
    if !enabled {
        return Err(NotOffloaded::Disabled { proto: p });
    }
    match ct.offload_check(slot) {
        Ok(()) | Err(NotOffloadable::AlreadyOffloaded) => {}
        Err(NotOffloadable::TcpNotEstablished { .. }) => {
            return Err(NotOffloaded::Policy(Wait::TcpNotEstablished));
        }
        Err(NotOffloadable::NatClash) => return Err(NotOffloaded::Policy(Wait::NatClash)),
        Err(NotOffloadable::Protocol { proto }) => return Err(NotOffloaded::Protocol { proto }),
        Err(NotOffloadable::Gone) => return Err(NotOffloaded::Protocol { proto: p }),
    }
    if p == proto::UDP && !conn.status.contains(Status::SEEN_REPLY) {
        return Err(NotOffloaded::Policy(Wait::UdpNotReplied));
    }
    let seen = conn.counters[0]
        .packets
        .saturating_add(conn.counters[1].packets);
    if seen < policy.min_packets {
        return Err(NotOffloaded::Policy(Wait::TooFewPackets {
            seen,
            need: policy.min_packets,
        }));
    }
    Ok(())
}

/// The idle timeout in hardware for a protocol.
#[must_use]
pub fn idle_timeout(policy: &OffloadPolicy, proto_num: u8) -> u64 {
    if proto_num == proto::TCP {
        policy.tcp_idle_ns
    } else {
        policy.udp_idle_ns
    }
}

/// Exponential retry backoff for failed inserts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Backoff {
    /// Consecutive failures.
    pub failures: u32,
    /// Not before this time (ns).
    pub retry_at: u64,
}

impl Backoff {
    /// Records a failure at `now`.
    pub fn fail(&mut self, policy: &OffloadPolicy, now: u64) {
        let shift = self.failures.min(32);
        let delay = policy
            .retry_base_ns
            .saturating_mul(1u64 << shift)
            .min(policy.retry_max_ns);
        self.failures = self.failures.saturating_add(1);
        self.retry_at = now.saturating_add(delay);
    }

    /// Clears the failure count (after a success).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// Whether a retry is allowed at `now`.
    #[must_use]
    pub fn ready(&self, now: u64) -> bool {
        now >= self.retry_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctoffload_fallback_sw::conntrack::{Config, Verdict};
    use etherparse::PacketBuilder;

    fn udp(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .udp(sp, dp)
            .write(&mut v, b"x")
            .expect("build");
        v
    }

    fn tcp(
        src: [u8; 4],
        dst: [u8; 4],
        sp: u16,
        dp: u16,
        seq: u32,
        ack: Option<u32>,
        syn: bool,
    ) -> Vec<u8> {
        let mut b = PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4(src, dst, 64)
            .tcp(sp, dp, seq, 65535);
        if syn {
            b = b.syn();
        }
        if let Some(a) = ack {
            b = b.ack(a);
        }
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("build");
        v
    }

    fn slot(v: Verdict) -> Slot {
        match v {
            Verdict::Tracked { slot, .. } => slot,
            other => panic!("{other:?}"),
        }
    }

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 1, 1];

    #[test]
    fn udp_waits_for_a_reply_and_the_minimum() {
        let mut ct = Conntrack::new(Config::default());
        let p = OffloadPolicy {
            min_packets: 3,
            ..OffloadPolicy::default()
        };
        let s = slot(ct.process(&udp(A, B, 1, 2), 0, 0));
        assert_eq!(
            decide(&p, &ct, s),
            Err(NotOffloaded::Policy(Wait::UdpNotReplied))
        );
        ct.process(&udp(B, A, 2, 1), 0, 1);
        assert_eq!(
            decide(&p, &ct, s),
            Err(NotOffloaded::Policy(Wait::TooFewPackets {
                seen: 2,
                need: 3
            }))
        );
        ct.process(&udp(A, B, 1, 2), 0, 2);
        assert_eq!(decide(&p, &ct, s), Ok(()));
        let off = OffloadPolicy {
            udp: false,
            ..OffloadPolicy::default()
        };
        assert_eq!(
            decide(&off, &ct, s),
            Err(NotOffloaded::Disabled { proto: 17 })
        );
    }

    #[test]
    fn tcp_after_the_final_ack_of_the_handshake() {
        let mut ct = Conntrack::new(Config::default());
        let p = OffloadPolicy::default();
        let s = slot(ct.process(&tcp(A, B, 1000, 80, 100, None, true), 0, 0));
        assert_eq!(
            decide(&p, &ct, s),
            Err(NotOffloaded::Policy(Wait::TcpNotEstablished))
        );
        ct.process(&tcp(B, A, 80, 1000, 500, Some(101), true), 0, 1);
        assert_eq!(
            decide(&p, &ct, s),
            Err(NotOffloaded::Policy(Wait::TcpNotEstablished))
        );
        ct.process(&tcp(A, B, 1000, 80, 101, Some(501), false), 0, 2);
        assert_eq!(decide(&p, &ct, s), Ok(()));
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let p = OffloadPolicy {
            retry_base_ns: 10,
            retry_max_ns: 35,
            ..OffloadPolicy::default()
        };
        let mut b = Backoff::default();
        assert!(b.ready(0));
        b.fail(&p, 100);
        assert_eq!(b.retry_at, 110);
        assert!(!b.ready(109));
        b.fail(&p, 100);
        assert_eq!(b.retry_at, 120);
        b.fail(&p, 100);
        assert_eq!(b.retry_at, 135);
        for _ in 0..100 {
            b.fail(&p, 100);
        }
        assert_eq!(b.retry_at, 135);
        b.reset();
        assert!(b.ready(0));
    }
}
