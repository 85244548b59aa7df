//! NAT rules: what to match, what to do, and validation.
//!
//! A [`NatRuleSet`] is an ordered list; the first matching rule of the right kind wins
//! ([`NatRuleSet::lookup`]). Destination-manip rules ([`NatAction::Dnat`],
//! [`NatAction::Vip`], [`NatAction::FullNat`]) run at the PREROUTING hook on the
//! original tuple; source-manip rules ([`NatAction::Snat`], [`NatAction::Masquerade`])
//! run at the POSTROUTING hook on the tuple as it looks after destination NAT, so a
//! source rule sees the translated destination (as in Linux). A [`NatAction::FullNat`]
//! rule applies its source part to exactly the connections whose destination it
//! translated; it is never looked up at POSTROUTING on its own.
//!
//! [`NatRuleSet::add`] rejects bad rules with a [`RuleError`] that names the rule, the
//! field and the problem. This version translates IPv4 only; IPv6 rules are rejected.

use core::fmt;

use super::alloc::SnatV4Range;
use crate::conntrack::Prefix;
use crate::tuple::{Addr, Family, PackedV4, Tuple, proto};

/// A rule's identifier, chosen by the operator; unique within a [`NatRuleSet`].
pub type RuleId = u32;

/// An inclusive range of ports (or ICMP identifiers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// Lowest port.
    pub min: u16,
    /// Highest port (inclusive).
    pub max: u16,
}

impl PortRange {
    /// The range `min..=max`.
    #[must_use]
    pub const fn new(min: u16, max: u16) -> Self {
        Self { min, max }
    }

    /// One port.
    #[must_use]
    pub const fn single(port: u16) -> Self {
        Self {
            min: port,
            max: port,
        }
    }

    /// Whether `port` lies in the range.
    #[inline]
    #[must_use]
    pub const fn contains(&self, port: u16) -> bool {
        self.min <= port && port <= self.max
    }

    /// Number of ports (0 if reversed).
    #[inline]
    #[must_use]
    pub const fn size(&self) -> u32 {
        if self.min > self.max {
            0
        } else {
            self.max as u32 - self.min as u32 + 1
        }
    }

    fn overlaps(&self, other: &Self) -> bool {
        self.min <= other.max && other.min <= self.max
    }
}

/// An inclusive range of IPv4 addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrRange {
    /// Address family of both ends (only [`Family::V4`] is accepted).
    pub family: Family,
    /// Lowest address.
    pub min: Addr,
    /// Highest address (inclusive).
    pub max: Addr,
}

impl AddrRange {
    /// The IPv4 range `min..=max`.
    #[must_use]
    pub fn v4(min: [u8; 4], max: [u8; 4]) -> Self {
        Self {
            family: Family::V4,
            min: Addr::v4(min),
            max: Addr::v4(max),
        }
    }

    /// One IPv4 address.
    #[must_use]
    pub fn single_v4(a: [u8; 4]) -> Self {
        Self::v4(a, a)
    }

    /// One address of either family.
    #[must_use]
    pub fn single(family: Family, a: Addr) -> Self {
        Self {
            family,
            min: a,
            max: a,
        }
    }

    /// Whether `a` (IPv4) lies in the range.
    #[inline]
    #[must_use]
    pub fn contains_v4(&self, a: &Addr) -> bool {
        let v = u32::from_be_bytes(a.as_v4());
        u32::from_be_bytes(self.min.as_v4()) <= v && v <= u32::from_be_bytes(self.max.as_v4())
    }

    fn bounds_v4(&self) -> (u32, u32) {
        (
            u32::from_be_bytes(self.min.as_v4()),
            u32::from_be_bytes(self.max.as_v4()),
        )
    }
}

/// Options of a source-NAT port choice (Linux `NF_NAT_RANGE_*` flags).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct NatFlags {
    /// Always search from a random offset; never keep the original port and never reuse
    /// an existing mapping of the same source (`PROTO_RANDOM_FULLY`).
    pub random_fully: bool,
    /// Choose the address by the source alone, so that one client always gets the same
    /// address whatever the destination (`PERSISTENT`).
    pub persistent: bool,
}

/// One VIP backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Backend address (IPv4).
    pub addr: Addr,
    /// Backend port; `None` keeps the client's destination port.
    pub port: Option<u16>,
    /// Relative weight, at least 1.
    pub weight: u32,
}

/// How a VIP picks the backend of a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Selection {
    /// Weighted rendezvous (highest random weight) hashing of the client's original
    /// tuple: the same tuple gets the same backend while the backend set is unchanged,
    /// and removing a backend moves only the connections that hashed to it.
    ConsistentHash,
    /// Smooth weighted round robin (as nginx): the exact weight ratio over every
    /// `sum(weights)` connections, no stickiness.
    WeightedRoundRobin,
}

/// What a matching rule does to a new connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatAction {
    /// Source NAT to an address range, optionally with a port range.
    Snat {
        /// Addresses to map the source to.
        addrs: AddrRange,
        /// Ports (ICMP: identifiers) to map to; `None` keeps the port when it is free and
        /// otherwise searches 1–511, 600–1023 or 1024–65535 by the original port.
        ports: Option<PortRange>,
        /// Port-choice options.
        flags: NatFlags,
    },
    /// Source NAT to the egress port's address ([`super::PacketMeta::out_addr`]).
    Masquerade {
        /// As for [`NatAction::Snat`].
        ports: Option<PortRange>,
        /// Port-choice options.
        flags: NatFlags,
    },
    /// Destination NAT (port forward) to one address and optionally one port.
    Dnat {
        /// Internal address.
        to_addr: Addr,
        /// Internal port; `None` keeps the destination port.
        to_port: Option<u16>,
    },
    /// Destination NAT and source NAT of the same connection.
    FullNat {
        /// Internal address.
        to_addr: Addr,
        /// Internal port; `None` keeps the destination port.
        to_port: Option<u16>,
        /// Source addresses.
        snat_addrs: AddrRange,
        /// Source ports.
        snat_ports: Option<PortRange>,
        /// Source port-choice options.
        flags: NatFlags,
    },
    /// A virtual IP balanced over backends (destination NAT per connection).
    Vip {
        /// The backends; at least one.
        backends: Vec<Backend>,
        /// Backend selection.
        selection: Selection,
    },
}

impl NatAction {
    /// Whether the action rewrites the destination (PREROUTING rule).
    #[must_use]
    pub fn is_dst(&self) -> bool {
        matches!(
            self,
            Self::Dnat { .. } | Self::FullNat { .. } | Self::Vip { .. }
        )
    }

    /// Whether the action is a pure source rule (POSTROUTING rule).
    #[must_use]
    pub fn is_src(&self) -> bool {
        matches!(self, Self::Snat { .. } | Self::Masquerade { .. })
    }

    /// The static source pool, for overlap checks.
    fn snat_pool(&self) -> Option<(AddrRange, Option<PortRange>)> {
        match self {
            Self::Snat { addrs, ports, .. } => Some((*addrs, *ports)),
            Self::FullNat {
                snat_addrs,
                snat_ports,
                ..
            } => Some((*snat_addrs, *snat_ports)),
            Self::Masquerade { .. } | Self::Dnat { .. } | Self::Vip { .. } => None,
        }
    }
}

/// Which packets a rule applies to; every field that is set must match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleMatch {
    /// Ingress port (the agent's port index).
    pub in_port: Option<u32>,
    /// Egress port; only for source rules (the egress is unknown before routing).
    pub out_port: Option<u32>,
    /// Source prefix of the original tuple.
    pub src: Option<Prefix>,
    /// Destination prefix of the tuple at the hook (after DNAT for source rules).
    pub dst: Option<Prefix>,
    /// IP protocol number.
    pub proto: Option<u8>,
    /// Destination port range (port protocols only).
    pub dport: Option<PortRange>,
    /// Conntrack zone.
    pub zone: Option<u16>,
}

/// One NAT rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    /// Identifier, unique in the set.
    pub id: RuleId,
    /// Which new connections it applies to.
    pub r#match: RuleMatch,
    /// What it does.
    pub action: NatAction,
}

/// The ingress/egress context of a connection's first packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketMeta {
    /// Ingress port.
    pub in_port: u32,
    /// Egress port, as routed for the destination after DNAT; `None` if not known.
    pub out_port: Option<u32>,
    /// The egress port's IPv4 address (masquerade); `None` if it has none.
    pub out_addr: Option<Addr>,
}

/// The NAT hook a lookup is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    /// PREROUTING: destination manip.
    Dst,
    /// POSTROUTING: source manip.
    Src,
}

/// Why a rule was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    /// A rule with this id exists already.
    #[error("rule {id}: duplicate rule id")]
    DuplicateId {
        /// The id.
        id: RuleId,
    },
    /// No rule has this id.
    #[error("rule {id}: no such rule")]
    NoSuchRule {
        /// The id.
        id: RuleId,
    },
    /// A range whose minimum is above its maximum.
    #[error("rule {rule}: {field} range is reversed ({min} > {max})")]
    ReversedRange {
        /// The rule.
        rule: RuleId,
        /// The field.
        field: &'static str,
        /// The minimum given.
        min: String,
        /// The maximum given.
        max: String,
    },
    /// A range with no usable member (only port 0, or only 0.0.0.0).
    #[error("rule {rule}: {field} range is empty: it holds no usable {what}")]
    EmptyRange {
        /// The rule.
        rule: RuleId,
        /// The field.
        field: &'static str,
        /// "port" or "address".
        what: &'static str,
    },
    /// An address of another family than the rest of the rule.
    #[error("rule {rule}: {field} is {found:?}, the rule is {expected:?}")]
    FamilyMismatch {
        /// The rule.
        rule: RuleId,
        /// The field.
        field: &'static str,
        /// The rule's family.
        expected: Family,
        /// The field's family.
        found: Family,
    },
    /// IPv6 NAT is not supported in this version (IPv6 is tracked without NAT).
    #[error("rule {rule}: {field} is IPv6; IPv6 NAT is not supported")]
    Ipv6Unsupported {
        /// The rule.
        rule: RuleId,
        /// The field.
        field: &'static str,
    },
    /// A port field without a port protocol in the match.
    #[error("rule {rule}: {field} needs a port protocol (tcp, udp, sctp, dccp, udplite){icmp}")]
    PortsNeedProtocol {
        /// The rule.
        rule: RuleId,
        /// The field.
        field: &'static str,
        /// Text saying whether ICMP would also do.
        icmp: &'static str,
    },
    /// A destination rule that matches on the egress port.
    #[error("rule {rule}: out_port cannot be matched by a destination-NAT rule")]
    OutPortOnDstRule {
        /// The rule.
        rule: RuleId,
    },
    /// Two rules' source pools share addresses and ports.
    #[error("rule {rule}: snat pool overlaps the pool of rule {other}")]
    OverlappingPool {
        /// The rule being added.
        rule: RuleId,
        /// The rule it overlaps.
        other: RuleId,
    },
    /// A VIP without backends.
    #[error("rule {rule}: vip has no backends")]
    NoBackends {
        /// The rule.
        rule: RuleId,
    },
    /// A VIP backend with weight 0.
    #[error("rule {rule}: backend {index} has weight 0")]
    ZeroWeight {
        /// The rule.
        rule: RuleId,
        /// Index of the backend.
        index: usize,
    },
    /// The same backend twice.
    #[error("rule {rule}: backend {index} duplicates backend {first}")]
    DuplicateBackend {
        /// The rule.
        rule: RuleId,
        /// Index of the second occurrence.
        index: usize,
        /// Index of the first occurrence.
        first: usize,
    },
    /// A rule that is not a VIP where one was required.
    #[error("rule {rule}: not a vip rule")]
    NotVip {
        /// The rule.
        rule: RuleId,
    },
}

/// Per-rule counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// New connections the rule was applied to.
    pub matched: u64,
    /// New connections dropped because the rule's range had no free tuple.
    pub exhausted: u64,
}

/// A rule with its run-time state.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) rule: NatRule,
    pub(crate) stats: RuleStats,
    /// The rule's match at POSTROUTING for packed IPv4 tuples.
    src_v4: SrcMatchV4,
    /// The source range of a [`NatAction::Snat`] rule, for the packed decision (when
    /// it covers the range).
    pub(crate) snat_v4: Option<SnatV4Range>,
    /// Smooth weighted round robin: current weights, one per backend.
    wrr: Vec<i64>,
    /// Rendezvous hashing: a hash per backend (of address and port), so that a backend
    /// keeps its scores when others come and go.
    backend_keys: Vec<u64>,
}

/// An ordered set of NAT rules.
#[derive(Debug, Clone, Default)]
pub struct NatRuleSet {
    entries: Vec<Entry>,
    /// Rules that apply at PREROUTING (destination manip).
    dst_rules: usize,
}

fn is_port_proto(p: u8) -> bool {
    matches!(
        p,
        proto::TCP | proto::UDP | proto::SCTP | proto::DCCP | proto::UDPLITE
    )
}

fn fmt_addr(family: Family, a: &Addr) -> String {
    a.to_ip(family).to_string()
}

fn check_family(rule: RuleId, field: &'static str, family: Family) -> Result<(), RuleError> {
    match family {
        Family::V4 => Ok(()),
        Family::V6 => Err(RuleError::Ipv6Unsupported { rule, field }),
    }
}

fn check_ports(rule: RuleId, field: &'static str, r: &PortRange) -> Result<(), RuleError> {
    if r.min > r.max {
        return Err(RuleError::ReversedRange {
            rule,
            field,
            min: r.min.to_string(),
            max: r.max.to_string(),
        });
    }
    Ok(())
}

fn check_addrs(rule: RuleId, field: &'static str, r: &AddrRange) -> Result<(), RuleError> {
    check_family(rule, field, r.family)?;
    let (min, max) = r.bounds_v4();
    if min > max {
        return Err(RuleError::ReversedRange {
            rule,
            field,
            min: fmt_addr(r.family, &r.min),
            max: fmt_addr(r.family, &r.max),
        });
    }
    if max == 0 {
        return Err(RuleError::EmptyRange {
            rule,
            field,
            what: "address",
        });
    }
    Ok(())
}

/// The rule's port fields need `proto` to be a port protocol (or ICMP for SNAT ids).
fn check_proto_for(
    rule: RuleId,
    field: &'static str,
    proto: Option<u8>,
    icmp_ok: bool,
) -> Result<(), RuleError> {
    let ok = proto.is_some_and(|p| is_port_proto(p) || (icmp_ok && p == proto::ICMP));
    if ok {
        Ok(())
    } else {
        Err(RuleError::PortsNeedProtocol {
            rule,
            field,
            icmp: if icmp_ok { " or icmp" } else { "" },
        })
    }
}

/// Validates a rule on its own (not against the others).
fn validate(rule: &NatRule) -> Result<(), RuleError> {
    let id = rule.id;
    let m = &rule.r#match;
    if let Some(p) = &m.src {
        check_family(id, "match.src", p.family)?;
    }
    if let Some(p) = &m.dst {
        check_family(id, "match.dst", p.family)?;
    }
    if let Some(r) = &m.dport {
        check_ports(id, "match.dport", r)?;
        check_proto_for(id, "match.dport", m.proto, false)?;
    }
    if rule.action.is_dst() && m.out_port.is_some() {
        return Err(RuleError::OutPortOnDstRule { rule: id });
    }
    let snat_ports = |field, ports: &Option<PortRange>| -> Result<(), RuleError> {
        if let Some(r) = ports {
            check_ports(id, field, r)?;
            if r.max == 0 && m.proto != Some(proto::ICMP) {
                return Err(RuleError::EmptyRange {
                    rule: id,
                    field,
                    what: "port",
                });
            }
            check_proto_for(id, field, m.proto, true)?;
        }
        Ok(())
    };
    let to_port = |field, port: &Option<u16>| -> Result<(), RuleError> {
        if let Some(p) = port {
            if *p == 0 {
                return Err(RuleError::EmptyRange {
                    rule: id,
                    field,
                    what: "port",
                });
            }
            check_proto_for(id, field, m.proto, false)?;
        }
        Ok(())
    };
    match &rule.action {
        NatAction::Snat { addrs, ports, .. } => {
            check_addrs(id, "action.addrs", addrs)?;
            snat_ports("action.ports", ports)?;
        }
        NatAction::Masquerade { ports, .. } => snat_ports("action.ports", ports)?,
        NatAction::Dnat {
            to_addr,
            to_port: p,
        } => {
            if *to_addr == Addr::default() {
                return Err(RuleError::EmptyRange {
                    rule: id,
                    field: "action.to_addr",
                    what: "address",
                });
            }
            to_port("action.to_port", p)?;
        }
        NatAction::FullNat {
            to_addr,
            to_port: p,
            snat_addrs,
            snat_ports: sp,
            ..
        } => {
            if *to_addr == Addr::default() {
                return Err(RuleError::EmptyRange {
                    rule: id,
                    field: "action.to_addr",
                    what: "address",
                });
            }
            to_port("action.to_port", p)?;
            check_addrs(id, "action.snat_addrs", snat_addrs)?;
            snat_ports("action.snat_ports", sp)?;
        }
        NatAction::Vip { backends, .. } => validate_backends(id, backends, m.proto)?,
    }
    Ok(())
}

fn validate_backends(id: RuleId, backends: &[Backend], proto: Option<u8>) -> Result<(), RuleError> {
    if backends.is_empty() {
        return Err(RuleError::NoBackends { rule: id });
    }
    for (i, b) in backends.iter().enumerate() {
        if b.weight == 0 {
            return Err(RuleError::ZeroWeight { rule: id, index: i });
        }
        if b.addr == Addr::default() {
            return Err(RuleError::EmptyRange {
                rule: id,
                field: "action.backends.addr",
                what: "address",
            });
        }
        if let Some(p) = b.port {
            if p == 0 {
                return Err(RuleError::EmptyRange {
                    rule: id,
                    field: "action.backends.port",
                    what: "port",
                });
            }
            check_proto_for(id, "action.backends.port", proto, false)?;
        }
        if let Some(first) = backends[..i]
            .iter()
            .position(|o| o.addr == b.addr && o.port == b.port)
        {
            return Err(RuleError::DuplicateBackend {
                rule: id,
                index: i,
                first,
            });
        }
    }
    Ok(())
}

fn pools_overlap(a: &(AddrRange, Option<PortRange>), b: &(AddrRange, Option<PortRange>)) -> bool {
    let (amin, amax) = a.0.bounds_v4();
    let (bmin, bmax) = b.0.bounds_v4();
    let all = PortRange::new(0, u16::MAX);
    amin <= bmax && bmin <= amax && a.1.unwrap_or(all).overlaps(&b.1.unwrap_or(all))
}

/// A 64-bit mixer (the splitmix64 finaliser).
#[inline]
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn backend_key(b: &Backend) -> u64 {
    let a = u32::from_be_bytes(b.addr.as_v4());
    mix64((u64::from(a) << 24) ^ u64::from(b.port.unwrap_or(0)) ^ 0x5bd1_e995_0000_0000)
}

impl Entry {
    fn new(rule: NatRule) -> Self {
        let snat_v4 = match &rule.action {
            NatAction::Snat {
                addrs,
                ports,
                flags,
            } => SnatV4Range::new(&addrs.min, &addrs.max, *ports, *flags),
            _ => None,
        };
        let mut e = Self {
            src_v4: SrcMatchV4::of(&rule),
            snat_v4,
            rule,
            stats: RuleStats::default(),
            wrr: Vec::new(),
            backend_keys: Vec::new(),
        };
        e.reset_backends();
        e
    }

    fn reset_backends(&mut self) {
        if let NatAction::Vip { backends, .. } = &self.rule.action {
            self.wrr = vec![0; backends.len()];
            self.backend_keys = backends.iter().map(backend_key).collect();
        }
    }

    /// The backend of a new connection with original tuple `orig`.
    pub(crate) fn select_backend(&mut self, orig: &Tuple, seed: u64) -> Option<Backend> {
        let NatAction::Vip {
            backends,
            selection,
        } = &self.rule.action
        else {
            return None;
        };
        let i = match selection {
            Selection::ConsistentHash => {
                let h = hash_client(orig, seed);
                rendezvous(h, backends, &self.backend_keys)
            }
            Selection::WeightedRoundRobin => {
                let total: i64 = backends.iter().map(|b| i64::from(b.weight)).sum();
                let mut best = 0;
                for (i, b) in backends.iter().enumerate() {
                    self.wrr[i] += i64::from(b.weight);
                    if self.wrr[i] > self.wrr[best] {
                        best = i;
                    }
                }
                self.wrr[best] -= total;
                best
            }
        };
        backends.get(i).copied()
    }
}

/// Hash of a client's original tuple, for consistent hashing.
fn hash_client(t: &Tuple, seed: u64) -> u64 {
    let mut h = mix64(seed ^ u64::from(u32::from_be_bytes(t.src.as_v4())));
    h = mix64(h ^ u64::from(u32::from_be_bytes(t.dst.as_v4())).rotate_left(32));
    mix64(
        h ^ (u64::from(t.src_l4)
            | (u64::from(t.dst_l4) << 16)
            | (u64::from(t.proto) << 32)
            | (u64::from(t.zone) << 40)),
    )
}

/// Weighted rendezvous hashing: the backend with the highest `w / -ln(u)`, `u` uniform
/// in (0, 1] from the client and backend hashes. Each backend wins with probability
/// `w / sum(w)`.
fn rendezvous(client: u64, backends: &[Backend], keys: &[u64]) -> usize {
    let mut best = 0;
    let mut best_score = f64::NEG_INFINITY;
    for (i, (b, k)) in backends.iter().zip(keys).enumerate() {
        let h = mix64(client ^ k);
        // 53 random bits as a float in (0, 1]; exact, so no precision is lost.
        let u = ((h >> 11) + 1) as f64 / (1u64 << 53) as f64;
        let score = f64::from(b.weight) / -u.ln();
        if score > best_score {
            best_score = score;
            best = i;
        }
    }
    best
}

impl NatRule {
    /// Masquerade of every new connection leaving by `out_port` (nftables `oif X
    /// masquerade`): source NAT to the port's address, ports from the default range.
    #[must_use]
    pub fn masquerade_out(id: RuleId, out_port: u32) -> Self {
        Self {
            id,
            r#match: RuleMatch {
                out_port: Some(out_port),
                ..RuleMatch::default()
            },
            action: NatAction::Masquerade {
                ports: None,
                flags: NatFlags::default(),
            },
        }
    }

    /// Whether the rule applies at `hook` to a new connection whose tuple at that hook
    /// is `t` (the original tuple for [`Hook::Dst`], the tuple after DNAT for
    /// [`Hook::Src`]).
    #[must_use]
    pub fn matches(&self, hook: Hook, t: &Tuple, meta: &PacketMeta) -> bool {
        let kind = match hook {
            Hook::Dst => self.action.is_dst(),
            Hook::Src => self.action.is_src(),
        };
        let m = &self.r#match;
        kind && t.family == Family::V4
            && m.in_port.is_none_or(|p| p == meta.in_port)
            && m.out_port.is_none_or(|p| Some(p) == meta.out_port)
            && m.src.is_none_or(|p| p.contains(t.family, &t.src))
            && m.dst.is_none_or(|p| p.contains(t.family, &t.dst))
            && m.proto.is_none_or(|p| p == t.proto)
            && m.dport
                .is_none_or(|r| is_port_proto(t.proto) && r.contains(t.dst_l4))
            && m.zone.is_none_or(|z| z == t.zone)
    }
}

impl NatRule {
    /// [`NatRule::matches`] at [`Hook::Src`] of the packed IPv4 tuple `p` (the same
    /// answer as for `p.unpack()`; tested), read from its words with the match fields
    /// compiled ([`NatRuleSet::lookup_src_v4`] keeps them compiled per rule).
    #[cfg(test)]
    pub(crate) fn matches_v4_src(&self, p: PackedV4, meta: &PacketMeta) -> bool {
        SrcMatchV4::of(self).matches(p, meta)
    }
}

/// A rule's match fields as [`NatRule::matches`] reads them at [`Hook::Src`] for a
/// packed IPv4 tuple, compiled once per rule: each prefix as a masked 32-bit compare.
#[derive(Debug, Clone, Copy)]
struct SrcMatchV4 {
    /// Whether the rule can match at all (a source action, no prefix that no plain
    /// IPv4 address lies in).
    possible: bool,
    in_port: Option<u32>,
    out_port: Option<u32>,
    /// `(value, mask)` of the source and destination prefixes, on addresses as
    /// numbers (network order); a mask of 0 for none.
    src: (u32, u32),
    dst: (u32, u32),
    proto: Option<u8>,
    dport: Option<PortRange>,
    zone: Option<u16>,
}

/// A match prefix for plain IPv4 addresses ([`Addr::v4`]) as `(value, mask)`; `None`
/// when no such address lies in it (another family, or bits set past the first 32).
fn prefix_v4(p: Option<&Prefix>) -> Option<(u32, u32)> {
    let Some(p) = p else {
        return Some((0, 0));
    };
    if p.family != Family::V4 {
        return None;
    }
    // As `Prefix::contains`: the first `len` bits of the 128-bit big-endian values.
    let bits = u32::from(p.len).min(128);
    let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
    let a = u128::from_be_bytes(p.addr.0) & mask;
    if a & (u128::MAX >> 32) != 0 {
        return None;
    }
    let (a, m) = (a >> 96, mask >> 96);
    Some((u32::try_from(a).unwrap_or(0), u32::try_from(m).unwrap_or(0)))
}

impl SrcMatchV4 {
    fn of(rule: &NatRule) -> Self {
        let m = &rule.r#match;
        let (src, dst) = (prefix_v4(m.src.as_ref()), prefix_v4(m.dst.as_ref()));
        Self {
            possible: rule.action.is_src() && src.is_some() && dst.is_some(),
            in_port: m.in_port,
            out_port: m.out_port,
            src: src.unwrap_or((0, 0)),
            dst: dst.unwrap_or((0, 0)),
            proto: m.proto,
            dport: m.dport,
            zone: m.zone,
        }
    }

    #[inline]
    fn matches(&self, p: PackedV4, meta: &PacketMeta) -> bool {
        let (addrs, rest) = p.words();
        let [s0, s1, s2, s3, d0, d1, d2, d3] = addrs.to_le_bytes();
        let [_, _, dp0, dp1, z0, z1, proto, _] = rest.to_le_bytes();
        let within = |(v, m): (u32, u32), a: [u8; 4]| u32::from_be_bytes(a) & m == v;
        self.possible
            && self.in_port.is_none_or(|p| p == meta.in_port)
            && self.out_port.is_none_or(|p| Some(p) == meta.out_port)
            && within(self.src, [s0, s1, s2, s3])
            && within(self.dst, [d0, d1, d2, d3])
            && self.proto.is_none_or(|p| p == proto)
            && self
                .dport
                .is_none_or(|r| is_port_proto(proto) && r.contains(u16::from_le_bytes([dp0, dp1])))
            && self.zone.is_none_or(|z| z == u16::from_le_bytes([z0, z1]))
    }
}

impl NatRuleSet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of rules.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no rules.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether some rule applies at PREROUTING (destination manip).
    #[must_use]
    pub fn has_dst_rules(&self) -> bool {
        self.dst_rules != 0
    }

    /// Appends a rule (it matches after every rule already present).
    ///
    /// # Errors
    /// A [`RuleError`] naming the problem; the set is unchanged.
    pub fn add(&mut self, rule: NatRule) -> Result<(), RuleError> {
        if self.entries.iter().any(|e| e.rule.id == rule.id) {
            return Err(RuleError::DuplicateId { id: rule.id });
        }
        validate(&rule)?;
        if let Some(pool) = rule.action.snat_pool() {
            for e in &self.entries {
                if let Some(other) = e.rule.action.snat_pool()
                    && pools_overlap(&pool, &other)
                {
                    return Err(RuleError::OverlappingPool {
                        rule: rule.id,
                        other: e.rule.id,
                    });
                }
            }
        }
        self.dst_rules += usize::from(rule.action.is_dst());
        self.entries.push(Entry::new(rule));
        Ok(())
    }

    /// Removes a rule. Connections it created keep their tuples (and so their
    /// translation) until they end.
    pub fn remove(&mut self, id: RuleId) -> Option<NatRule> {
        let i = self.entries.iter().position(|e| e.rule.id == id)?;
        let rule = self.entries.remove(i).rule;
        self.dst_rules -= usize::from(rule.action.is_dst());
        Some(rule)
    }

    /// Replaces a VIP's backends. Existing connections keep the backend they have;
    /// new connections choose among the new set.
    ///
    /// # Errors
    /// [`RuleError::NoSuchRule`], [`RuleError::NotVip`], or a backend problem.
    pub fn set_backends(&mut self, id: RuleId, new: Vec<Backend>) -> Result<(), RuleError> {
        let e = self
            .entries
            .iter_mut()
            .find(|e| e.rule.id == id)
            .ok_or(RuleError::NoSuchRule { id })?;
        let proto = e.rule.r#match.proto;
        let NatAction::Vip { backends, .. } = &mut e.rule.action else {
            return Err(RuleError::NotVip { rule: id });
        };
        validate_backends(id, &new, proto)?;
        *backends = new;
        e.reset_backends();
        Ok(())
    }

    /// The first rule that applies at `hook` (see [`NatRule::matches`]).
    #[must_use]
    pub fn lookup(&self, hook: Hook, t: &Tuple, meta: &PacketMeta) -> Option<&NatRule> {
        self.lookup_index(hook, t, meta)
            .map(|i| &self.entries[i].rule)
    }

    pub(crate) fn lookup_index(&self, hook: Hook, t: &Tuple, meta: &PacketMeta) -> Option<usize> {
        if hook == Hook::Dst && self.dst_rules == 0 {
            return None;
        }
        self.entries
            .iter()
            .position(|e| e.rule.matches(hook, t, meta))
    }

    /// [`NatRuleSet::lookup_index`] at [`Hook::Src`] of a packed IPv4 tuple, with no
    /// [`Tuple`] built (the rules' match fields compiled when they were added).
    #[inline]
    pub(crate) fn lookup_src_v4(&self, p: PackedV4, meta: &PacketMeta) -> Option<usize> {
        self.entries.iter().position(|e| e.src_v4.matches(p, meta))
    }

    pub(crate) fn entry_mut(&mut self, i: usize) -> &mut Entry {
        &mut self.entries[i]
    }

    /// The rules in match order.
    pub fn iter(&self) -> impl Iterator<Item = &NatRule> {
        self.entries.iter().map(|e| &e.rule)
    }

    /// A rule's counters.
    #[must_use]
    pub fn stats(&self, id: RuleId) -> Option<RuleStats> {
        self.entries
            .iter()
            .find(|e| e.rule.id == id)
            .map(|e| e.stats)
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}
