//! Protobuf <-> core conversions: `TryFrom` for requests (validating, with the field
//! path in every error), `From` for responses.

use std::net::IpAddr;

use ctoffload_fallback_sw::conntrack::{Filter, OtherTimeouts, Prefix};
use ctoffload_fallback_sw::table::{Counter, RemoveReason, Status};
use ctoffload_fallback_sw::tcp::{TcpState, TcpTimeouts};
use ctoffload_fallback_sw::tuple::{Addr, Family, Tuple, proto as ipproto};
use ctoffload_proto::v1 as pb;

use super::error::ApiError;
use super::model::{
    AddrRange, ConnFilter, ConnInfo, ConnKey, DeviceStatus, Event, EventKind, GapCause, Health,
    HwTable, JournalInfo, Limits, LimitsUpdate, MAX_TIMEOUT_S, NatKind, NatRule, OffloadPolicy,
    Record, StatsSnapshot, Timeouts, TimeoutsUpdate,
};

type Result<T> = std::result::Result<T, ApiError>;

fn u8_field(v: u32, field: &str) -> Result<u8> {
    u8::try_from(v).map_err(|_| ApiError::invalid(field, format!("{v} is above 255")))
}

fn u16_field(v: u32, field: &str) -> Result<u16> {
    u16::try_from(v).map_err(|_| ApiError::invalid(field, format!("{v} is above 65535")))
}

/// Parse an address.
pub fn parse_ip(s: &str, field: &str) -> Result<IpAddr> {
    s.trim()
        .parse::<IpAddr>()
        .map_err(|_| ApiError::invalid(field, format!("{s:?} is not an IPv4 or IPv6 address")))
}

fn family_of(ip: IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// Parse a CIDR prefix (`10.0.0.0/8`; a bare address is a host prefix). Host bits
/// below the prefix length are ignored. An empty string is `None`.
pub fn parse_prefix(s: &str, field: &str) -> Result<Option<Prefix>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip = addr
        .parse::<IpAddr>()
        .map_err(|_| ApiError::invalid(field, format!("{s:?} is not a CIDR prefix")))?;
    let (addr, family) = Addr::from_ip(ip);
    let max: u8 = match family {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    let len = match len {
        None => max,
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
            ApiError::invalid(field, format!("prefix length {l:?} is not in 0..={max}"))
        })?,
    };
    Ok(Some(Prefix { family, addr, len }))
}

fn prefix_string(p: &Prefix) -> String {
    format!("{}/{}", p.addr.to_ip(p.family), p.len)
}

fn is_icmp(proto: u8, family: Family) -> bool {
    matches!(
        (proto, family),
        (ipproto::ICMP, Family::V4) | (ipproto::ICMPV6, Family::V6)
    )
}

/// A request tuple (both types are foreign, hence a function and not `TryFrom`).
pub fn tuple_from_pb(t: &pb::Tuple) -> Result<Tuple> {
    let src = parse_ip(&t.src, "src")?;
    let dst = parse_ip(&t.dst, "dst")?;
    let family = family_of(src);
    if family_of(dst) != family {
        return Err(ApiError::invalid(
            "dst",
            format!(
                "address family {} does not match src ({})",
                family_name(family_of(dst)),
                family_name(family)
            ),
        ));
    }
    let proto = u8_field(t.protocol, "protocol")?;
    let (src_l4, dst_l4) = if is_icmp(proto, family) {
        let ty = u8_field(t.icmp_type, "icmp_type")?;
        let code = u8_field(t.icmp_code, "icmp_code")?;
        (
            u16_field(t.src_port, "src_port")?,
            u16::from_be_bytes([ty, code]),
        )
    } else {
        (
            u16_field(t.src_port, "src_port")?,
            u16_field(t.dst_port, "dst_port")?,
        )
    };
    Ok(Tuple {
        src: Addr::from_ip(src).0,
        dst: Addr::from_ip(dst).0,
        src_l4,
        dst_l4,
        proto,
        family,
        zone: u16_field(t.zone, "zone")?,
    })
}

/// A response tuple.
#[must_use]
pub fn tuple_to_pb(t: &Tuple) -> pb::Tuple {
    let icmp = is_icmp(t.proto, t.family);
    let [ty, code] = t.dst_l4.to_be_bytes();
    pb::Tuple {
        src: t.src.to_ip(t.family).to_string(),
        dst: t.dst.to_ip(t.family).to_string(),
        protocol: u32::from(t.proto),
        src_port: u32::from(t.src_l4),
        dst_port: if icmp { 0 } else { u32::from(t.dst_l4) },
        icmp_type: if icmp { u32::from(ty) } else { 0 },
        icmp_code: if icmp { u32::from(code) } else { 0 },
        zone: u32::from(t.zone),
    }
}

/// The wire value of a TCP state.
#[must_use]
pub fn tcp_state_to_pb(s: TcpState) -> pb::TcpState {
    match s {
        TcpState::None => pb::TcpState::None,
        TcpState::SynSent => pb::TcpState::SynSent,
        TcpState::SynRecv => pb::TcpState::SynRecv,
        TcpState::Established => pb::TcpState::Established,
        TcpState::FinWait => pb::TcpState::FinWait,
        TcpState::CloseWait => pb::TcpState::CloseWait,
        TcpState::LastAck => pb::TcpState::LastAck,
        TcpState::TimeWait => pb::TcpState::TimeWait,
        TcpState::Close => pb::TcpState::Close,
        TcpState::SynSent2 => pb::TcpState::SynSent2,
    }
}

fn tcp_state_from_pb(v: i32, field: &str) -> Result<Option<TcpState>> {
    let s = pb::TcpState::try_from(v)
        .map_err(|_| ApiError::invalid(field, format!("{v} is not a TcpState")))?;
    Ok(match s {
        pb::TcpState::Unspecified => None,
        pb::TcpState::None => Some(TcpState::None),
        pb::TcpState::SynSent => Some(TcpState::SynSent),
        pb::TcpState::SynRecv => Some(TcpState::SynRecv),
        pb::TcpState::Established => Some(TcpState::Established),
        pb::TcpState::FinWait => Some(TcpState::FinWait),
        pb::TcpState::CloseWait => Some(TcpState::CloseWait),
        pb::TcpState::LastAck => Some(TcpState::LastAck),
        pb::TcpState::TimeWait => Some(TcpState::TimeWait),
        pb::TcpState::Close => Some(TcpState::Close),
        pb::TcpState::SynSent2 => Some(TcpState::SynSent2),
    })
}

impl TryFrom<&pb::ConnectionFilter> for ConnFilter {
    type Error = ApiError;

    fn try_from(f: &pb::ConnectionFilter) -> Result<ConnFilter> {
        let src = parse_prefix(&f.src_prefix, "src_prefix")?;
        let dst = parse_prefix(&f.dst_prefix, "dst_prefix")?;
        if let (Some(s), Some(d)) = (src, dst)
            && s.family != d.family
        {
            return Err(ApiError::invalid(
                "dst_prefix",
                format!(
                    "address family {} does not match src_prefix ({})",
                    family_name(d.family),
                    family_name(s.family)
                ),
            ));
        }
        Ok(ConnFilter(Filter {
            proto: f.protocol.map(|p| u8_field(p, "protocol")).transpose()?,
            src,
            dst,
            sport: f.src_port.map(|p| u16_field(p, "src_port")).transpose()?,
            dport: f.dst_port.map(|p| u16_field(p, "dst_port")).transpose()?,
            tcp_state: tcp_state_from_pb(f.tcp_state, "tcp_state")?,
            zone: f.zone.map(|z| u16_field(z, "zone")).transpose()?,
            offloaded: f.offloaded,
        }))
    }
}

/// The filter of a request, or the empty filter when absent.
pub fn filter_of(f: Option<&pb::ConnectionFilter>) -> Result<ConnFilter> {
    f.map_or(Ok(ConnFilter::default()), |f| {
        ConnFilter::try_from(f).map_err(|e| e.within("filter"))
    })
}

impl TryFrom<Option<&pb::ConnectionKey>> for ConnKey {
    type Error = ApiError;

    fn try_from(k: Option<&pb::ConnectionKey>) -> Result<ConnKey> {
        match k.and_then(|k| k.key.as_ref()) {
            None => Err(ApiError::invalid("key", "set id or tuple")),
            Some(pb::connection_key::Key::Id(0)) => {
                Err(ApiError::invalid("key.id", "connection ids start at 1"))
            }
            Some(pb::connection_key::Key::Id(id)) => Ok(ConnKey::Id(*id)),
            Some(pb::connection_key::Key::Tuple(t)) => tuple_from_pb(t)
                .map(ConnKey::Tuple)
                .map_err(|e| e.within("key.tuple")),
        }
    }
}

fn dir_counters(total: Counter, hw: Counter) -> pb::DirectionCounters {
    pb::DirectionCounters {
        packets: total.packets,
        bytes: total.bytes,
        hw_packets: hw.packets,
        hw_bytes: hw.bytes,
    }
}

impl From<&ConnInfo> for pb::Connection {
    fn from(c: &ConnInfo) -> Self {
        pb::Connection {
            id: c.id,
            original: Some(tuple_to_pb(&c.tuples[0])),
            reply: Some(tuple_to_pb(&c.tuples[1])),
            tcp_state: c
                .tcp_state
                .map_or(pb::TcpState::Unspecified, tcp_state_to_pb)
                .into(),
            status_bits: u32::from(c.status.bits()),
            seen_reply: c.status.contains(Status::SEEN_REPLY),
            assured: c.status.contains(Status::ASSURED),
            offloaded: c.status.contains(Status::OFFLOAD),
            hw_offloaded: c.status.contains(Status::HW_OFFLOAD),
            timeout_remaining_ms: c.remaining_ns / 1_000_000,
            original_counters: Some(dir_counters(c.counters[0], c.hw_counters[0])),
            reply_counters: Some(dir_counters(c.counters[1], c.hw_counters[1])),
            not_offloaded_reason: c.not_offloaded.clone().unwrap_or_default(),
        }
    }
}

/// The kinds a watch request asks for (`None`: all).
pub fn kinds_of(kinds: &[i32]) -> Result<Option<Vec<EventKind>>> {
    if kinds.is_empty() {
        return Ok(None);
    }
    kinds
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let field = format!("kinds[{i}]");
            match pb::EventKind::try_from(*k) {
                Ok(pb::EventKind::New) => Ok(EventKind::New),
                Ok(pb::EventKind::StateChange) => Ok(EventKind::StateChange),
                Ok(pb::EventKind::Offloaded) => Ok(EventKind::Offloaded),
                Ok(pb::EventKind::ReturnedToSoftware) => Ok(EventKind::Returned),
                Ok(pb::EventKind::EndOfFlow) => Ok(EventKind::EndOfFlow),
                Ok(pb::EventKind::Unspecified) => Err(ApiError::invalid(
                    field,
                    "EVENT_KIND_UNSPECIFIED is not a kind",
                )),
                Err(_) => Err(ApiError::invalid(field, format!("{k} is not an EventKind"))),
            }
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

fn end_reason(r: RemoveReason) -> pb::EndReason {
    match r {
        RemoveReason::Expired => pb::EndReason::Expired,
        RemoveReason::EarlyDrop => pb::EndReason::EarlyDrop,
        RemoveReason::Closed => pb::EndReason::Closed,
        RemoveReason::Deleted => pb::EndReason::Deleted,
    }
}

impl From<&Record> for pb::EventRecord {
    fn from(r: &Record) -> Self {
        use pb::event_record::Event as E;
        let event = match &r.event {
            Event::New { id, tuples } => E::New(pb::ConnectionNew {
                id: *id,
                original: Some(tuple_to_pb(&tuples[0])),
                reply: Some(tuple_to_pb(&tuples[1])),
            }),
            Event::StateChange {
                id,
                original,
                old,
                new,
            } => E::StateChange(pb::StateChange {
                id: *id,
                original: Some(tuple_to_pb(original)),
                old_state: tcp_state_to_pb(*old).into(),
                new_state: tcp_state_to_pb(*new).into(),
            }),
            Event::Offloaded {
                id,
                original,
                hardware,
            } => E::Offloaded(pb::Offloaded {
                id: *id,
                original: Some(tuple_to_pb(original)),
                hardware: *hardware,
            }),
            Event::Returned {
                id,
                original,
                reason,
            } => E::ReturnedToSoftware(pb::ReturnedToSoftware {
                id: *id,
                original: Some(tuple_to_pb(original)),
                reason: reason.name().to_owned(),
            }),
            Event::EndOfFlow {
                id,
                tuples,
                counters,
                hw_counters,
                reason,
                status,
            } => E::EndOfFlow(pb::EndOfFlow {
                id: *id,
                original: Some(tuple_to_pb(&tuples[0])),
                reply: Some(tuple_to_pb(&tuples[1])),
                original_counters: Some(dir_counters(counters[0], hw_counters[0])),
                reply_counters: Some(dir_counters(counters[1], hw_counters[1])),
                reason: end_reason(*reason).into(),
                status_bits: u32::from(status.bits()),
                assured: status.contains(Status::ASSURED),
            }),
            Event::Gap {
                cause,
                first_missing,
                last_missing,
                lost_records,
                lost_end_of_flow,
            } => E::Gap(pb::Gap {
                cause: match cause {
                    GapCause::JournalOverflow => pb::GapCause::JournalOverflow,
                    GapCause::SourceOverflow => pb::GapCause::SourceOverflow,
                }
                .into(),
                first_missing: *first_missing,
                last_missing: *last_missing,
                lost_records: *lost_records,
                lost_end_of_flow: *lost_end_of_flow,
            }),
        };
        pb::EventRecord {
            sequence: r.seq,
            timestamp_ns: r.timestamp_ns,
            event: Some(event),
        }
    }
}

impl From<&JournalInfo> for pb::JournalInfo {
    fn from(j: &JournalInfo) -> Self {
        pb::JournalInfo {
            first_sequence: j.first_sequence,
            next_sequence: j.next_sequence,
            capacity: j.capacity,
            evicted: j.evicted,
            source_lost: j.source_lost,
        }
    }
}

impl From<&HwTable> for pb::HardwareTable {
    fn from(t: &HwTable) -> Self {
        pb::HardwareTable {
            used: t.used,
            capacity: t.capacity,
            insert_failures: t.insert_failures,
        }
    }
}

impl From<&StatsSnapshot> for pb::Stats {
    fn from(s: &StatsSnapshot) -> Self {
        pb::Stats {
            connections: s.connections,
            max_connections: s.max_connections,
            by_tcp_state: s
                .by_tcp_state
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            by_protocol: s
                .by_protocol
                .iter()
                .map(|(k, v)| (u32::from(*k), *v))
                .collect(),
            offloaded: s.offloaded,
            hw_offloaded: s.hw_offloaded,
            hw_table: Some((&s.hw_table).into()),
            insert_failed_clash: s.insert_failed_clash,
            insert_failed_full: s.insert_failed_full,
            early_drops: s.early_drops,
            expired: s.expired,
            drops_by_reason: s.drops_by_reason.iter().cloned().collect(),
            port_pools: s
                .port_pools
                .iter()
                .map(|p| pb::PortPoolUsage {
                    rule: p.rule.clone(),
                    total: p.total,
                    used: p.used,
                })
                .collect(),
            packets: s.packets,
            created: s.created,
            journal: Some((&s.journal).into()),
        }
    }
}

fn valid_rule_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// Check a NAT rule's name.
pub fn rule_name(name: &str, field: &str) -> Result<String> {
    if valid_rule_name(name) {
        Ok(name.to_owned())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{name:?} is not 1 to 64 of [A-Za-z0-9_.-]"),
        ))
    }
}

impl TryFrom<&pb::NatRule> for NatRule {
    type Error = ApiError;

    /// Checks everything a rule can get wrong on its own; overlaps with other rules
    /// are the rule store's business.
    fn try_from(r: &pb::NatRule) -> Result<NatRule> {
        let name = rule_name(&r.name, "name")?;
        let kind = match pb::NatKind::try_from(r.kind) {
            Ok(pb::NatKind::Snat) => NatKind::Snat,
            Ok(pb::NatKind::Dnat) => NatKind::Dnat,
            Ok(pb::NatKind::Unspecified) => {
                return Err(ApiError::invalid(
                    "kind",
                    "set NAT_KIND_SNAT or NAT_KIND_DNAT",
                ));
            }
            Err(_) => {
                return Err(ApiError::invalid(
                    "kind",
                    format!("{} is not a NatKind", r.kind),
                ));
            }
        };
        let protocol = match u8_field(r.protocol, "protocol")? {
            0 => None,
            p => Some(p),
        };
        let src = parse_prefix(&r.src_prefix, "src_prefix")?;
        let dst = parse_prefix(&r.dst_prefix, "dst_prefix")?;
        let range = r
            .to_addresses
            .as_ref()
            .ok_or_else(|| ApiError::invalid("to_addresses", "required"))?;
        let first = parse_ip(&range.first, "to_addresses.first")?;
        let last = if range.last.trim().is_empty() {
            first
        } else {
            parse_ip(&range.last, "to_addresses.last")?
        };
        let to_addrs = AddrRange { first, last };
        let family = to_addrs.family();
        if family_of(last) != family {
            return Err(ApiError::invalid(
                "to_addresses.last",
                format!(
                    "address family {} does not match to_addresses.first ({})",
                    family_name(family_of(last)),
                    family_name(family)
                ),
            ));
        }
        if to_addrs.is_empty() {
            return Err(ApiError::invalid(
                "to_addresses",
                format!("empty range: {first} is above {last}"),
            ));
        }
        for (p, field) in [(src, "src_prefix"), (dst, "dst_prefix")] {
            if let Some(p) = p
                && p.family != family
            {
                return Err(ApiError::invalid(
                    field,
                    format!(
                        "address family {} does not match to_addresses ({})",
                        family_name(p.family),
                        family_name(family)
                    ),
                ));
            }
        }
        let to_ports = match &r.to_ports {
            None => None,
            Some(p) => {
                let first = u16_field(p.first, "to_ports.first")?;
                let last = u16_field(p.last, "to_ports.last")?;
                if first == 0 {
                    return Err(ApiError::invalid("to_ports.first", "port 0 is not usable"));
                }
                if first > last {
                    return Err(ApiError::invalid(
                        "to_ports",
                        format!("empty range: {first} is above {last}"),
                    ));
                }
                if protocol.is_some_and(|p| p != ipproto::TCP && p != ipproto::UDP) {
                    return Err(ApiError::invalid(
                        "to_ports",
                        "port translation needs protocol 6 (TCP), 17 (UDP) or any",
                    ));
                }
                Some((first, last))
            }
        };
        Ok(NatRule {
            name,
            kind,
            protocol,
            src,
            dst,
            zone: r.zone.map(|z| u16_field(z, "zone")).transpose()?,
            to_addrs,
            to_ports,
        })
    }
}

impl From<&NatRule> for pb::NatRule {
    fn from(r: &NatRule) -> Self {
        pb::NatRule {
            name: r.name.clone(),
            kind: match r.kind {
                NatKind::Snat => pb::NatKind::Snat,
                NatKind::Dnat => pb::NatKind::Dnat,
            }
            .into(),
            protocol: r.protocol.map_or(0, u32::from),
            src_prefix: r.src.as_ref().map(prefix_string).unwrap_or_default(),
            dst_prefix: r.dst.as_ref().map(prefix_string).unwrap_or_default(),
            zone: r.zone.map(u32::from),
            to_addresses: Some(pb::AddressRange {
                first: r.to_addrs.first.to_string(),
                last: r.to_addrs.last.to_string(),
            }),
            to_ports: r.to_ports.map(|(first, last)| pb::PortRange {
                first: u32::from(first),
                last: u32::from(last),
            }),
        }
    }
}

impl TryFrom<&pb::OffloadPolicy> for OffloadPolicy {
    type Error = ApiError;

    fn try_from(p: &pb::OffloadPolicy) -> Result<OffloadPolicy> {
        if p.enabled && !p.tcp && !p.udp {
            return Err(ApiError::invalid(
                "enabled",
                "an enabled policy must offload tcp, udp or both",
            ));
        }
        Ok(OffloadPolicy {
            enabled: p.enabled,
            tcp: p.tcp,
            udp: p.udp,
            min_packets: p.min_packets,
        })
    }
}

impl From<&OffloadPolicy> for pb::OffloadPolicy {
    fn from(p: &OffloadPolicy) -> Self {
        pb::OffloadPolicy {
            enabled: p.enabled,
            tcp: p.tcp,
            udp: p.udp,
            min_packets: p.min_packets,
        }
    }
}

impl From<&DeviceStatus> for pb::DeviceStatus {
    fn from(d: &DeviceStatus) -> Self {
        pb::DeviceStatus {
            backend: d.backend.clone(),
            identity: d.identity.clone(),
            spec_version: d.spec_version.clone(),
            capabilities: d.capabilities.clone(),
            health: match d.health {
                Health::Ok => pb::DeviceHealth::Ok,
                Health::Degraded => pb::DeviceHealth::Degraded,
                Health::Failed => pb::DeviceHealth::Failed,
            }
            .into(),
            resets: d.resets,
            errors: d.errors,
            last_error: d.last_error.clone(),
            table: Some((&d.table).into()),
        }
    }
}

impl TryFrom<&pb::Timeouts> for TimeoutsUpdate {
    type Error = ApiError;

    fn try_from(t: &pb::Timeouts) -> Result<TimeoutsUpdate> {
        let check = |v: u32, field: &str| {
            if v > MAX_TIMEOUT_S {
                Err(ApiError::invalid(
                    field,
                    format!("{v} s is above the maximum of {MAX_TIMEOUT_S} s"),
                ))
            } else {
                Ok(v)
            }
        };
        Ok(TimeoutsUpdate(Timeouts {
            tcp: TcpTimeouts {
                syn_sent: check(t.tcp_syn_sent, "tcp_syn_sent")?,
                syn_recv: check(t.tcp_syn_recv, "tcp_syn_recv")?,
                established: check(t.tcp_established, "tcp_established")?,
                fin_wait: check(t.tcp_fin_wait, "tcp_fin_wait")?,
                close_wait: check(t.tcp_close_wait, "tcp_close_wait")?,
                last_ack: check(t.tcp_last_ack, "tcp_last_ack")?,
                time_wait: check(t.tcp_time_wait, "tcp_time_wait")?,
                close: check(t.tcp_close, "tcp_close")?,
                syn_sent2: check(t.tcp_syn_sent2, "tcp_syn_sent2")?,
                max_retrans: check(t.tcp_max_retrans, "tcp_max_retrans")?,
                unacknowledged: check(t.tcp_unacknowledged, "tcp_unacknowledged")?,
            },
            other: OtherTimeouts {
                udp: check(t.udp, "udp")?,
                udp_stream: check(t.udp_stream, "udp_stream")?,
                icmp: check(t.icmp, "icmp")?,
                generic: check(t.generic, "generic")?,
            },
        }))
    }
}

impl From<&Timeouts> for pb::Timeouts {
    fn from(t: &Timeouts) -> Self {
        pb::Timeouts {
            tcp_syn_sent: t.tcp.syn_sent,
            tcp_syn_recv: t.tcp.syn_recv,
            tcp_established: t.tcp.established,
            tcp_fin_wait: t.tcp.fin_wait,
            tcp_close_wait: t.tcp.close_wait,
            tcp_last_ack: t.tcp.last_ack,
            tcp_time_wait: t.tcp.time_wait,
            tcp_close: t.tcp.close,
            tcp_syn_sent2: t.tcp.syn_sent2,
            tcp_max_retrans: t.tcp.max_retrans,
            tcp_unacknowledged: t.tcp.unacknowledged,
            udp: t.other.udp,
            udp_stream: t.other.udp_stream,
            icmp: t.other.icmp,
            generic: t.other.generic,
        }
    }
}

/// Largest connection table accepted.
pub const MAX_CONNECTIONS: u64 = 1 << 30;
/// Journal capacity bounds.
pub const JOURNAL_CAPACITY: std::ops::RangeInclusive<u64> = 16..=(1 << 24);

impl TryFrom<&pb::Limits> for LimitsUpdate {
    type Error = ApiError;

    fn try_from(l: &pb::Limits) -> Result<LimitsUpdate> {
        if l.max_connections > MAX_CONNECTIONS {
            return Err(ApiError::invalid(
                "max_connections",
                format!("{} is above {MAX_CONNECTIONS}", l.max_connections),
            ));
        }
        if l.event_journal_capacity != 0 && !JOURNAL_CAPACITY.contains(&l.event_journal_capacity) {
            return Err(ApiError::invalid(
                "event_journal_capacity",
                format!(
                    "{} is not in {}..={}",
                    l.event_journal_capacity,
                    JOURNAL_CAPACITY.start(),
                    JOURNAL_CAPACITY.end()
                ),
            ));
        }
        Ok(LimitsUpdate(Limits {
            max_connections: l.max_connections,
            max_offloaded: l.max_offloaded,
            max_nat_rules: l.max_nat_rules,
            event_journal_capacity: l.event_journal_capacity,
        }))
    }
}

impl From<&Limits> for pb::Limits {
    fn from(l: &Limits) -> Self {
        pb::Limits {
            max_connections: l.max_connections,
            max_offloaded: l.max_offloaded,
            max_nat_rules: l.max_nat_rules,
            event_journal_capacity: l.event_journal_capacity,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_name_the_field() {
        let p = parse_prefix("10.1.0.0/16", "f").expect("ok").expect("some");
        assert_eq!((p.family, p.len), (Family::V4, 16));
        assert_eq!(parse_prefix("", "f").expect("ok"), None);
        let host = parse_prefix("2001:db8::1", "f").expect("ok").expect("some");
        assert_eq!(host.len, 128);
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x"] {
            let e = parse_prefix(bad, "filter.src_prefix").expect_err(bad);
            assert!(e.to_string().starts_with("filter.src_prefix: "), "{e}");
        }
    }

    #[test]
    fn icmp_tuples_round_trip() {
        let t = pb::Tuple {
            src: "10.0.0.1".into(),
            dst: "10.0.0.2".into(),
            protocol: 1,
            src_port: 7,
            icmp_type: 8,
            ..Default::default()
        };
        let core = tuple_from_pb(&t).expect("valid");
        assert_eq!(core.dst_l4, 0x0800);
        assert_eq!(tuple_to_pb(&core), t);
    }
}
