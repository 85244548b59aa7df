//! The hardware rule of a connection: a pure function from the connection's two tuples
//! (and where its packets enter and leave) to the two device flow entries, one per
//! direction (device.md sections 8 and 9).
//!
//! NAT comes from the tuples alone, as in Linux: a packet of one direction must leave
//! looking like the inverse of the other direction's tuple. So the original direction's
//! entry rewrites its source to the reply tuple's destination (SNAT) and its
//! destination to the reply tuple's source (DNAT), each only where they differ, and the
//! reply direction's entry does the converse. Without NAT both entries only forward.
//!
//! This module knows nothing of the connection's hardware state, of the device or of
//! time; [`build_rules`] is deterministic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ctoffload_fallback_sw::tuple::{Addr, Dir, Family, Tuple, proto};
use ctoffload_hw_regs::{FlowAction, FlowKey, Le16};

/// The highest VLAN ID a key can hold (its zone field).
pub const MAX_ZONE: u16 = 4095;

/// L2 rewrite for frames leaving on one port: the gateway's own MAC as source and the
/// next hop's MAC as destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortL2 {
    /// Source MAC written into frames leaving on this port.
    pub mac: [u8; 6],
    /// Destination MAC written into frames leaving on this port.
    pub next_hop: [u8; 6],
}

/// Where frames go: the egress port of each ingress port, and the L2 rewrite per
/// egress port (`None`: frames keep their MAC addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routing {
    /// `egress[p]` is the port a frame received on port `p` leaves on.
    pub egress: Vec<u8>,
    /// `l2[p]` is the rewrite applied to frames leaving on port `p`.
    pub l2: Vec<Option<PortL2>>,
    /// Decrement TTL / hop limit in hardware (and in the slow path, to match).
    pub dec_ttl: bool,
}

impl Routing {
    /// Two ports forwarding to each other, no L2 rewrite, no TTL decrement.
    #[must_use]
    pub fn two_port() -> Self {
        Self {
            egress: vec![1, 0],
            l2: vec![None, None],
            dec_ttl: false,
        }
    }

    /// The egress port of frames received on `port`, if routed.
    #[must_use]
    pub fn egress_of(&self, port: u8) -> Option<u8> {
        self.egress.get(usize::from(port)).copied()
    }

    /// The L2 rewrite of frames leaving on `port`.
    #[must_use]
    pub fn l2_of(&self, port: u8) -> Option<PortL2> {
        self.l2.get(usize::from(port)).copied().flatten()
    }
}

/// Where one direction of a connection enters and leaves, and its L2 rewrite: what a
/// router's per-destination lookup (route + neighbour) decided for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    /// The port packets of this direction arrive on (the key's port).
    pub in_port: u8,
    /// The port they leave on.
    pub out_port: u8,
    /// Source and destination MACs written on the way out (`None`: kept).
    pub l2: Option<PortL2>,
}

/// One device flow entry: the key a packet of one direction carries on the wire, and
/// what the device does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HwRule {
    /// Match.
    pub key: FlowKey,
    /// Action.
    pub action: FlowAction,
}

/// Why a connection has no hardware rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// Only TCP and UDP are offloaded.
    #[error("protocol {proto} has no hardware rule")]
    Protocol {
        /// IP protocol number.
        proto: u8,
    },
    /// The zone does not fit the key's 12-bit VLAN field.
    #[error("zone {zone} is above {MAX_ZONE}")]
    Zone {
        /// The zone.
        zone: u16,
    },
    /// No route out of this ingress port.
    #[error("no egress port for ingress port {port}")]
    NoRoute {
        /// The ingress port.
        port: u8,
    },
    /// The two tuples disagree on protocol, family or zone.
    #[error("original and reply tuples disagree on protocol, family or zone")]
    Inconsistent,
    /// No route to where one direction goes.
    #[error("no route to {addr}")]
    NoRouteTo {
        /// The (translated) destination.
        addr: IpAddr,
    },
    /// The next hop's MAC address is not known yet (ARP resolution pending).
    #[error("next hop {next_hop} on port {port} not resolved")]
    NextHopUnresolved {
        /// The egress port.
        port: u8,
        /// The neighbour's address.
        next_hop: IpAddr,
    },
    /// One direction ends at the gateway itself (no hardware forwarding).
    #[error("{addr} is the gateway's own address")]
    LocalDestination {
        /// The gateway's address.
        addr: IpAddr,
    },
}

fn ip(family: Family, a: &Addr) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(a.as_v4())),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(a.0)),
    }
}

/// The key of a packet carrying `t` on the wire, arriving on `port`.
pub fn key_of(t: &Tuple, port: u8) -> FlowKey {
    let mut src = t.src.0;
    let mut dst = t.dst.0;
    if t.family == Family::V4 {
        // IPv4 keys use bytes 0–3 only; the tuple guarantees zeros, enforce it anyway.
        src[4..].fill(0);
        dst[4..].fill(0);
    }
    FlowKey {
        kind: match t.family {
            Family::V4 => 1,
            Family::V6 => 2,
        },
        port,
        proto: t.proto,
        flags: 0,
        zone: Le16::new(t.zone),
        src_port: Le16::new(t.src_l4),
        dst_port: Le16::new(t.dst_l4),
        reserved: [0; 6],
        src_addr: src,
        dst_addr: dst,
    }
}

/// The action for packets carrying `this` that must leave looking like the inverse
/// of `other`, along `path`.
fn action_of(this: &Tuple, other: &Tuple, path: &Path, dec_ttl: bool) -> FlowAction {
    let mut a = FlowAction::forward(path.out_port);
    if let Some(l2) = path.l2 {
        a = a.with_src_mac(l2.mac).with_dst_mac(l2.next_hop);
    }
    if dec_ttl {
        a = a.with_dec_ttl();
    }
    // Leaving as the inverse of `other`: source := other.dst, destination := other.src.
    if this.src != other.dst || this.src_l4 != other.dst_l4 {
        a = a.with_snat(ip(this.family, &other.dst), other.dst_l4);
    }
    if this.dst != other.src || this.dst_l4 != other.src_l4 {
        a = a.with_dnat(ip(this.family, &other.src), other.src_l4);
    }
    if this.proto == proto::TCP {
        // FIN/RST/SYN go to the slow path so that software sees teardown (invariant 4).
        a = a.with_punt_tcp_ctrl();
    }
    a
}

/// Builds the two device entries of a connection, indexed by [`Dir::index`]:
/// `tuples` are its original and reply tuples, `orig_in` the port its original
/// direction arrives on. The original direction leaves on `routing.egress_of(orig_in)`,
/// and the reply direction is expected to arrive there and leave on `orig_in`.
///
/// # Errors
/// [`RuleError`] when the connection cannot be expressed as device entries.
pub fn build_rules(
    tuples: &[Tuple; 2],
    orig_in: u8,
    routing: &Routing,
) -> Result<[HwRule; 2], RuleError> {
    let reply_in = routing
        .egress_of(orig_in)
        .ok_or(RuleError::NoRoute { port: orig_in })?;
    let paths = [
        Path {
            in_port: orig_in,
            out_port: reply_in,
            l2: routing.l2_of(reply_in),
        },
        Path {
            in_port: reply_in,
            out_port: orig_in,
            l2: routing.l2_of(orig_in),
        },
    ];
    build_rules_on(tuples, &paths, routing.dec_ttl)
}

/// Builds the two device entries of a connection whose directions take `paths`
/// (indexed by [`Dir::index`], as decided by a router), decrementing TTL in both when
/// `dec_ttl`.
///
/// # Errors
/// [`RuleError`] when the connection cannot be expressed as device entries.
pub fn build_rules_on(
    tuples: &[Tuple; 2],
    paths: &[Path; 2],
    dec_ttl: bool,
) -> Result<[HwRule; 2], RuleError> {
    let (o, r) = (&tuples[Dir::Original.index()], &tuples[Dir::Reply.index()]);
    if o.proto != r.proto || o.family != r.family || o.zone != r.zone {
        return Err(RuleError::Inconsistent);
    }
    if o.proto != proto::TCP && o.proto != proto::UDP {
        return Err(RuleError::Protocol { proto: o.proto });
    }
    if o.zone > MAX_ZONE {
        return Err(RuleError::Zone { zone: o.zone });
    }
    let (po, pr) = (&paths[Dir::Original.index()], &paths[Dir::Reply.index()]);
    Ok([
        HwRule {
            key: key_of(o, po.in_port),
            action: action_of(o, r, po, dec_ttl),
        },
        HwRule {
            key: key_of(r, pr.in_port),
            action: action_of(r, o, pr, dec_ttl),
        },
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ctoffload_hw_regs::ActionFlags;

    fn t(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16, p: u8) -> Tuple {
        Tuple::v4(src, sp, dst, dp, p)
    }

    const C: [u8; 4] = [192, 168, 1, 10];
    const S: [u8; 4] = [198, 51, 100, 7];
    const G: [u8; 4] = [203, 0, 113, 1];

    #[test]
    fn plain_tcp_forwards_both_ways_and_punts_control() {
        let o = t(C, 40000, S, 443, proto::TCP);
        let r = t(S, 443, C, 40000, proto::TCP);
        let [fwd, rev] = build_rules(&[o, r], 0, &Routing::two_port()).expect("rules");
        // The key of device.md section 8.1's example layout.
        assert_eq!(fwd.key.port, 0);
        assert_eq!(fwd.key.proto, 6);
        assert_eq!(fwd.key.src_port.get(), 40000);
        assert_eq!(fwd.key.dst_port.get(), 443);
        assert_eq!(&fwd.key.src_addr[..4], &C);
        assert_eq!(&fwd.key.dst_addr[..4], &S);
        assert_eq!(rev.key.port, 1);
        assert_eq!(rev.key.src_port.get(), 443);
        assert_eq!(&rev.key.src_addr[..4], &S);
        assert_eq!(fwd.action.out_port, 1);
        assert_eq!(rev.action.out_port, 0);
        for a in [fwd.action, rev.action] {
            assert_eq!(a.flags(), ActionFlags::PUNT_TCP_CTRL);
        }
    }

    #[test]
    fn source_nat_from_the_reply_tuple() {
        // Masquerade: the server replies to the gateway's address and port 61000.
        let o = t(C, 40000, S, 53, proto::UDP);
        let r = t(S, 53, G, 61000, proto::UDP);
        let [fwd, rev] = build_rules(&[o, r], 0, &Routing::two_port()).expect("rules");
        assert_eq!(fwd.action.flags(), ActionFlags::SNAT);
        assert_eq!(&fwd.action.new_src_addr[..4], &G);
        assert_eq!(fwd.action.new_src_port.get(), 61000);
        assert_eq!(fwd.action.new_dst_addr, [0; 16]);
        // Replies arrive for the gateway and are sent back to the client.
        assert_eq!(&rev.key.dst_addr[..4], &G);
        assert_eq!(rev.key.dst_port.get(), 61000);
        assert_eq!(rev.action.flags(), ActionFlags::DNAT);
        assert_eq!(&rev.action.new_dst_addr[..4], &C);
        assert_eq!(rev.action.new_dst_port.get(), 40000);
    }

    #[test]
    fn destination_nat_and_l2_rewrite() {
        // A load balancer: the client talks to a VIP, a backend answers.
        let vip = [203, 0, 113, 80];
        let backend = [10, 1, 0, 5];
        let o = t(C, 40000, vip, 80, proto::TCP);
        let r = t(backend, 8080, C, 40000, proto::TCP);
        let l2 = PortL2 {
            mac: [2, 0, 0, 0, 0, 1],
            next_hop: [2, 0, 0, 0, 0, 2],
        };
        let routing = Routing {
            egress: vec![1, 0],
            l2: vec![None, Some(l2)],
            dec_ttl: true,
        };
        let [fwd, rev] = build_rules(&[o, r], 0, &routing).expect("rules");
        let f = fwd.action.flags();
        assert!(f.contains(ActionFlags::DNAT | ActionFlags::DEC_TTL));
        assert!(f.contains(ActionFlags::REWRITE_SRC_MAC | ActionFlags::REWRITE_DST_MAC));
        assert!(!f.contains(ActionFlags::SNAT));
        assert_eq!(&fwd.action.new_dst_addr[..4], &backend);
        assert_eq!(fwd.action.new_dst_port.get(), 8080);
        assert_eq!(fwd.action.new_src_mac, l2.mac);
        assert_eq!(fwd.action.new_dst_mac, l2.next_hop);
        // Reply: source back to the VIP, no MAC rewrite towards port 0.
        let f = rev.action.flags();
        assert!(f.contains(ActionFlags::SNAT));
        assert!(!f.contains(ActionFlags::REWRITE_SRC_MAC));
        assert_eq!(&rev.action.new_src_addr[..4], &vip);
        assert_eq!(rev.action.new_src_port.get(), 80);
    }

    #[test]
    fn refuses_what_the_device_cannot_hold() {
        let icmp = t(C, 7, S, 0x0800, proto::ICMP);
        let icmp_r = t(S, 7, C, 0, proto::ICMP);
        assert_eq!(
            build_rules(&[icmp, icmp_r], 0, &Routing::two_port()),
            Err(RuleError::Protocol { proto: 1 })
        );
        let mut o = t(C, 1, S, 2, proto::UDP);
        let mut r = t(S, 2, C, 1, proto::UDP);
        o.zone = 5000;
        r.zone = 5000;
        assert_eq!(
            build_rules(&[o, r], 0, &Routing::two_port()),
            Err(RuleError::Zone { zone: 5000 })
        );
        o.zone = 0;
        r.zone = 0;
        assert_eq!(
            build_rules(&[o, r], 9, &Routing::two_port()),
            Err(RuleError::NoRoute { port: 9 })
        );
        r.proto = proto::TCP;
        assert_eq!(
            build_rules(&[o, r], 0, &Routing::two_port()),
            Err(RuleError::Inconsistent)
        );
    }

    #[test]
    fn ipv6_keys_carry_all_sixteen_bytes() {
        let a = Addr::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let b = Addr::v6([0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let o = Tuple {
            src: a,
            dst: b,
            src_l4: 1,
            dst_l4: 2,
            proto: proto::UDP,
            family: Family::V6,
            zone: 7,
        };
        let r = Tuple {
            src: b,
            dst: a,
            src_l4: 2,
            dst_l4: 1,
            ..o
        };
        let [fwd, rev] = build_rules(&[o, r], 1, &Routing::two_port()).expect("rules");
        assert_eq!(fwd.key.kind, 2);
        assert_eq!(fwd.key.zone.get(), 7);
        assert_eq!(fwd.key.src_addr, a.0);
        assert_eq!(rev.key.port, 0);
        assert_eq!(fwd.action.flags(), ActionFlags::empty());
    }
}
