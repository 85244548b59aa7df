//! How the CLI prints what the agent answers: `conntrack`-like lines, tables, JSON.

use ctoffload_proto::v1 as pb;
use serde_json::{Value, json};

/// A protocol's name (`tcp`), or its number.
#[must_use]
pub fn proto_name(p: u32) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        other => format!("unknown({other})"),
    }
}

fn is_icmp(p: u32) -> bool {
    p == 1 || p == 58
}

/// A TCP state's conntrack name (`ESTABLISHED`), or `None` when unspecified.
#[must_use]
pub fn state_name(v: i32) -> Option<&'static str> {
    Some(match pb::TcpState::try_from(v).ok()? {
        pb::TcpState::Unspecified => return None,
        pb::TcpState::SynSent => "SYN_SENT",
        pb::TcpState::SynRecv => "SYN_RECV",
        pb::TcpState::Established => "ESTABLISHED",
        pb::TcpState::FinWait => "FIN_WAIT",
        pb::TcpState::CloseWait => "CLOSE_WAIT",
        pb::TcpState::LastAck => "LAST_ACK",
        pb::TcpState::TimeWait => "TIME_WAIT",
        pb::TcpState::Close => "CLOSE",
        pb::TcpState::SynSent2 => "SYN_SENT2",
        pb::TcpState::None => "NONE",
    })
}

/// `src=.. dst=.. sport=.. dport=..` (or `type= code= id=` for ICMP).
fn tuple_text(t: &pb::Tuple) -> String {
    if is_icmp(t.protocol) {
        format!(
            "src={} dst={} type={} code={} id={}",
            t.src, t.dst, t.icmp_type, t.icmp_code, t.src_port
        )
    } else if matches!(t.protocol, 6 | 17 | 33 | 132 | 136) {
        format!(
            "src={} dst={} sport={} dport={}",
            t.src, t.dst, t.src_port, t.dst_port
        )
    } else {
        format!("src={} dst={}", t.src, t.dst)
    }
}

fn counters_text(c: Option<&pb::DirectionCounters>) -> String {
    let c = c.copied().unwrap_or_default();
    format!("packets={} bytes={}", c.packets, c.bytes)
}

/// One connection as `conntrack -L` prints it (with `id=` and offload flags).
#[must_use]
pub fn conn_line(c: &pb::Connection) -> String {
    let default = pb::Tuple::default();
    let orig = c.original.as_ref().unwrap_or(&default);
    let reply = c.reply.as_ref().unwrap_or(&default);
    let mut s = format!(
        "{:<8} {} {} ",
        proto_name(orig.protocol),
        orig.protocol,
        c.timeout_remaining_ms / 1000
    );
    if let Some(st) = state_name(c.tcp_state) {
        s.push_str(st);
        s.push(' ');
    }
    s.push_str(&tuple_text(orig));
    s.push(' ');
    s.push_str(&counters_text(c.original_counters.as_ref()));
    if !c.seen_reply {
        s.push_str(" [UNREPLIED]");
    }
    s.push(' ');
    s.push_str(&tuple_text(reply));
    s.push(' ');
    s.push_str(&counters_text(c.reply_counters.as_ref()));
    if c.assured {
        s.push_str(" [ASSURED]");
    }
    if c.offloaded {
        s.push_str(" [OFFLOAD]");
    }
    if c.hw_offloaded {
        s.push_str(" [HW_OFFLOAD]");
    } else if !c.not_offloaded_reason.is_empty() {
        s.push_str(&format!(" sw_reason=\"{}\"", c.not_offloaded_reason));
    }
    if orig.zone != 0 {
        s.push_str(&format!(" zone={}", orig.zone));
    }
    s.push_str(&format!(" id={}", c.id));
    s
}

fn tuple_json(t: Option<&pb::Tuple>) -> Value {
    let t = t.cloned().unwrap_or_default();
    let mut v = json!({
        "src": t.src,
        "dst": t.dst,
        "protocol": t.protocol,
        "protocol_name": proto_name(t.protocol),
        "zone": t.zone,
    });
    if is_icmp(t.protocol) {
        v["icmp_type"] = json!(t.icmp_type);
        v["icmp_code"] = json!(t.icmp_code);
        v["icmp_id"] = json!(t.src_port);
    } else {
        v["src_port"] = json!(t.src_port);
        v["dst_port"] = json!(t.dst_port);
    }
    v
}

fn counters_json(c: Option<&pb::DirectionCounters>) -> Value {
    let c = c.copied().unwrap_or_default();
    json!({"packets": c.packets, "bytes": c.bytes, "hw_packets": c.hw_packets, "hw_bytes": c.hw_bytes})
}

/// One connection as JSON.
#[must_use]
pub fn conn_json(c: &pb::Connection) -> Value {
    json!({
        "id": c.id,
        "original": tuple_json(c.original.as_ref()),
        "reply": tuple_json(c.reply.as_ref()),
        "tcp_state": state_name(c.tcp_state),
        "status_bits": c.status_bits,
        "seen_reply": c.seen_reply,
        "assured": c.assured,
        "offloaded": c.offloaded,
        "hw_offloaded": c.hw_offloaded,
        "timeout_remaining_ms": c.timeout_remaining_ms,
        "original_counters": counters_json(c.original_counters.as_ref()),
        "reply_counters": counters_json(c.reply_counters.as_ref()),
        "not_offloaded_reason": c.not_offloaded_reason,
    })
}

fn end_reason(v: i32) -> &'static str {
    match pb::EndReason::try_from(v) {
        Ok(pb::EndReason::Expired) => "expired",
        Ok(pb::EndReason::EarlyDrop) => "early-drop",
        Ok(pb::EndReason::Closed) => "closed",
        Ok(pb::EndReason::Deleted) => "deleted",
        Ok(pb::EndReason::Unspecified) | Err(_) => "unknown",
    }
}

fn gap_cause(v: i32) -> &'static str {
    match pb::GapCause::try_from(v) {
        Ok(pb::GapCause::JournalOverflow) => "journal-overflow",
        Ok(pb::GapCause::SourceOverflow) => "source-overflow",
        Ok(pb::GapCause::Unspecified) | Err(_) => "unknown",
    }
}

fn head(t: Option<&pb::Tuple>) -> String {
    let p = t.map_or(0, |t| t.protocol);
    format!("{:<8} {p}", proto_name(p))
}

/// One event as `conntrack -E` prints it, prefixed with its journal sequence.
#[must_use]
pub fn event_line(r: &pb::EventRecord) -> String {
    use pb::event_record::Event;
    let body = match &r.event {
        Some(Event::New(n)) => format!(
            "    [NEW] {} {} [UNREPLIED] {} id={}",
            head(n.original.as_ref()),
            tuple_text(n.original.as_ref().unwrap_or(&pb::Tuple::default())),
            tuple_text(n.reply.as_ref().unwrap_or(&pb::Tuple::default())),
            n.id
        ),
        Some(Event::StateChange(c)) => format!(
            " [UPDATE] {} {} {} (from {}) id={}",
            head(c.original.as_ref()),
            state_name(c.new_state).unwrap_or("?"),
            tuple_text(c.original.as_ref().unwrap_or(&pb::Tuple::default())),
            state_name(c.old_state).unwrap_or("?"),
            c.id
        ),
        Some(Event::Offloaded(o)) => format!(
            " [UPDATE] {} {} [{}] id={}",
            head(o.original.as_ref()),
            tuple_text(o.original.as_ref().unwrap_or(&pb::Tuple::default())),
            if o.hardware { "HW_OFFLOAD" } else { "OFFLOAD" },
            o.id
        ),
        Some(Event::ReturnedToSoftware(o)) => format!(
            " [UPDATE] {} {} [SOFTWARE] reason={} id={}",
            head(o.original.as_ref()),
            tuple_text(o.original.as_ref().unwrap_or(&pb::Tuple::default())),
            o.reason,
            o.id
        ),
        Some(Event::EndOfFlow(e)) => format!(
            "[DESTROY] {} {} {} {} {}{} reason={} id={}",
            head(e.original.as_ref()),
            tuple_text(e.original.as_ref().unwrap_or(&pb::Tuple::default())),
            counters_text(e.original_counters.as_ref()),
            tuple_text(e.reply.as_ref().unwrap_or(&pb::Tuple::default())),
            counters_text(e.reply_counters.as_ref()),
            if e.assured { " [ASSURED]" } else { "" },
            end_reason(e.reason),
            e.id
        ),
        Some(Event::Gap(g)) => format!(
            "    [GAP] cause={} lost={} first={} last={}{}",
            gap_cause(g.cause),
            g.lost_records,
            g.first_missing,
            g.last_missing,
            g.lost_end_of_flow
                .map(|n| format!(" lost_end_of_flow={n}"))
                .unwrap_or_default()
        ),
        None => "      [?] unknown event".into(),
    };
    format!("[{}] {body}", r.sequence)
}

/// One event as JSON.
#[must_use]
pub fn event_json(r: &pb::EventRecord) -> Value {
    use pb::event_record::Event;
    let (kind, detail) = match &r.event {
        Some(Event::New(n)) => (
            "new",
            json!({"id": n.id, "original": tuple_json(n.original.as_ref()), "reply": tuple_json(n.reply.as_ref())}),
        ),
        Some(Event::StateChange(c)) => (
            "state_change",
            json!({"id": c.id, "original": tuple_json(c.original.as_ref()),
                   "old_state": state_name(c.old_state), "new_state": state_name(c.new_state)}),
        ),
        Some(Event::Offloaded(o)) => (
            "offloaded",
            json!({"id": o.id, "original": tuple_json(o.original.as_ref()), "hardware": o.hardware}),
        ),
        Some(Event::ReturnedToSoftware(o)) => (
            "returned_to_software",
            json!({"id": o.id, "original": tuple_json(o.original.as_ref()), "reason": o.reason}),
        ),
        Some(Event::EndOfFlow(e)) => (
            "end_of_flow",
            json!({"id": e.id, "original": tuple_json(e.original.as_ref()), "reply": tuple_json(e.reply.as_ref()),
                   "original_counters": counters_json(e.original_counters.as_ref()),
                   "reply_counters": counters_json(e.reply_counters.as_ref()),
                   "reason": end_reason(e.reason), "status_bits": e.status_bits, "assured": e.assured}),
        ),
        Some(Event::Gap(g)) => (
            "gap",
            json!({"cause": gap_cause(g.cause), "first_missing": g.first_missing, "last_missing": g.last_missing,
                   "lost_records": g.lost_records, "lost_end_of_flow": g.lost_end_of_flow}),
        ),
        None => ("unknown", Value::Null),
    };
    json!({"sequence": r.sequence, "timestamp_ns": r.timestamp_ns, "kind": kind, "event": detail})
}

/// Statistics as JSON.
#[must_use]
pub fn stats_json(s: &pb::Stats) -> Value {
    let hw = s.hw_table.unwrap_or_default();
    let j = s.journal.unwrap_or_default();
    let mut by_state: Vec<_> = s.by_tcp_state.iter().collect();
    by_state.sort();
    let mut by_proto: Vec<_> = s.by_protocol.iter().collect();
    by_proto.sort();
    let mut drops: Vec<_> = s.drops_by_reason.iter().collect();
    drops.sort();
    json!({
        "connections": s.connections,
        "max_connections": s.max_connections,
        "by_tcp_state": by_state.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "by_protocol": by_proto.into_iter().map(|(k, v)| (proto_name(*k), json!(v))).collect::<serde_json::Map<_, _>>(),
        "offloaded": s.offloaded,
        "hw_offloaded": s.hw_offloaded,
        "hw_table": {"used": hw.used, "capacity": hw.capacity, "insert_failures": hw.insert_failures},
        "insert_failed_clash": s.insert_failed_clash,
        "insert_failed_full": s.insert_failed_full,
        "early_drops": s.early_drops,
        "expired": s.expired,
        "drops_by_reason": drops.into_iter().map(|(k, v)| (k.clone(), json!(v))).collect::<serde_json::Map<_, _>>(),
        "port_pools": s.port_pools.iter().map(|p| json!({"rule": p.rule, "total": p.total, "used": p.used})).collect::<Vec<_>>(),
        "packets": s.packets,
        "created": s.created,
        "journal": journal_json(&j),
    })
}

/// Journal info as JSON.
#[must_use]
pub fn journal_json(j: &pb::JournalInfo) -> Value {
    json!({"first_sequence": j.first_sequence, "next_sequence": j.next_sequence,
           "capacity": j.capacity, "evicted": j.evicted, "source_lost": j.source_lost})
}

/// `key: value` lines, keys aligned.
#[must_use]
pub fn kv(rows: &[(String, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(k, v)| format!("{k:<w$}  {v}\n"))
        .collect()
}

/// Statistics as `key: value` lines.
#[must_use]
pub fn stats_text(s: &pb::Stats) -> String {
    let hw = s.hw_table.unwrap_or_default();
    let j = s.journal.unwrap_or_default();
    let mut rows = vec![
        (
            "connections".to_owned(),
            format!("{} / {}", s.connections, s.max_connections),
        ),
        ("offloaded".into(), s.offloaded.to_string()),
        ("hw_offloaded".into(), s.hw_offloaded.to_string()),
        (
            "hw_table".into(),
            format!(
                "{} / {} (insert failures {})",
                hw.used, hw.capacity, hw.insert_failures
            ),
        ),
        ("created".into(), s.created.to_string()),
        ("expired".into(), s.expired.to_string()),
        ("early_drops".into(), s.early_drops.to_string()),
        (
            "insert_failed_clash".into(),
            s.insert_failed_clash.to_string(),
        ),
        (
            "insert_failed_full".into(),
            s.insert_failed_full.to_string(),
        ),
        ("packets".into(), s.packets.to_string()),
    ];
    let mut by_proto: Vec<_> = s.by_protocol.iter().collect();
    by_proto.sort();
    for (p, n) in by_proto {
        rows.push((format!("protocol.{}", proto_name(*p)), n.to_string()));
    }
    let mut by_state: Vec<_> = s.by_tcp_state.iter().collect();
    by_state.sort();
    for (st, n) in by_state {
        rows.push((format!("tcp_state.{st}"), n.to_string()));
    }
    let mut drops: Vec<_> = s.drops_by_reason.iter().filter(|(_, n)| **n > 0).collect();
    drops.sort();
    for (r, n) in drops {
        rows.push((format!("drops.{r}"), n.to_string()));
    }
    for p in &s.port_pools {
        rows.push((
            format!("nat_pool.{}", p.rule),
            format!("{} / {} used", p.used, p.total),
        ));
    }
    rows.push((
        "journal".into(),
        format!(
            "sequences {}..{} capacity {} evicted {} source_lost {}",
            j.first_sequence, j.next_sequence, j.capacity, j.evicted, j.source_lost
        ),
    ));
    kv(&rows)
}

fn kind_name(v: i32) -> &'static str {
    match pb::NatKind::try_from(v) {
        Ok(pb::NatKind::Snat) => "snat",
        Ok(pb::NatKind::Dnat) => "dnat",
        Ok(pb::NatKind::Unspecified) | Err(_) => "?",
    }
}

fn range_text(r: Option<&pb::AddressRange>) -> String {
    match r {
        Some(r) if r.last.is_empty() || r.first == r.last => r.first.clone(),
        Some(r) => format!("{}-{}", r.first, r.last),
        None => "-".into(),
    }
}

fn ports_text(r: Option<&pb::PortRange>) -> String {
    match r {
        Some(r) if r.first == r.last => r.first.to_string(),
        Some(r) => format!("{}-{}", r.first, r.last),
        None => "-".into(),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

/// NAT rules as a table.
#[must_use]
pub fn nat_table(rules: &[pb::NatRule]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "KIND".into(),
        "PROTO".into(),
        "SRC".into(),
        "DST".into(),
        "ZONE".into(),
        "TO".into(),
        "PORTS".into(),
    ]];
    for r in rules {
        rows.push([
            r.name.clone(),
            kind_name(r.kind).into(),
            if r.protocol == 0 {
                "any".into()
            } else {
                proto_name(r.protocol)
            },
            or_dash(&r.src_prefix).into(),
            or_dash(&r.dst_prefix).into(),
            r.zone.map_or("-".into(), |z| z.to_string()),
            range_text(r.to_addresses.as_ref()),
            ports_text(r.to_ports.as_ref()),
        ]);
    }
    table(&rows)
}

/// A NAT rule as JSON.
#[must_use]
pub fn nat_json(r: &pb::NatRule) -> Value {
    json!({
        "name": r.name,
        "kind": kind_name(r.kind),
        "protocol": r.protocol,
        "src_prefix": r.src_prefix,
        "dst_prefix": r.dst_prefix,
        "zone": r.zone,
        "to_addresses": r.to_addresses.as_ref().map(|a| json!({"first": a.first, "last": a.last})),
        "to_ports": r.to_ports.map(|p| json!({"first": p.first, "last": p.last})),
    })
}

fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut w = [0usize; N];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(x) = w.get_mut(i) {
                *x = (*x).max(c.len());
            }
        }
    }
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(w.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The offload policy as JSON.
#[must_use]
pub fn policy_json(p: &pb::OffloadPolicy) -> Value {
    json!({"enabled": p.enabled, "tcp": p.tcp, "udp": p.udp, "min_packets": p.min_packets})
}

/// Device status as JSON.
#[must_use]
pub fn device_json(d: &pb::DeviceStatus) -> Value {
    let t = d.table.unwrap_or_default();
    json!({
        "backend": d.backend, "identity": d.identity, "spec_version": d.spec_version,
        "capabilities": d.capabilities, "health": health_name(d.health),
        "resets": d.resets, "errors": d.errors, "last_error": d.last_error,
        "table": {"used": t.used, "capacity": t.capacity, "insert_failures": t.insert_failures},
    })
}

/// A health value's name.
#[must_use]
pub fn health_name(v: i32) -> &'static str {
    match pb::DeviceHealth::try_from(v) {
        Ok(pb::DeviceHealth::Ok) => "ok",
        Ok(pb::DeviceHealth::Degraded) => "degraded",
        Ok(pb::DeviceHealth::Failed) => "failed",
        Ok(pb::DeviceHealth::Unspecified) | Err(_) => "unknown",
    }
}

/// Timeout names in proto order, with accessors.
pub const TIMEOUT_NAMES: [&str; 15] = [
    "tcp_syn_sent",
    "tcp_syn_recv",
    "tcp_established",
    "tcp_fin_wait",
    "tcp_close_wait",
    "tcp_last_ack",
    "tcp_time_wait",
    "tcp_close",
    "tcp_syn_sent2",
    "tcp_max_retrans",
    "tcp_unacknowledged",
    "udp",
    "udp_stream",
    "icmp",
    "generic",
];

/// The timeout named `name`, mutably.
pub fn timeout_field<'a>(t: &'a mut pb::Timeouts, name: &str) -> Option<&'a mut u32> {
    Some(match name {
        "tcp_syn_sent" => &mut t.tcp_syn_sent,
        "tcp_syn_recv" => &mut t.tcp_syn_recv,
        "tcp_established" => &mut t.tcp_established,
        "tcp_fin_wait" => &mut t.tcp_fin_wait,
        "tcp_close_wait" => &mut t.tcp_close_wait,
        "tcp_last_ack" => &mut t.tcp_last_ack,
        "tcp_time_wait" => &mut t.tcp_time_wait,
        "tcp_close" => &mut t.tcp_close,
        "tcp_syn_sent2" => &mut t.tcp_syn_sent2,
        "tcp_max_retrans" => &mut t.tcp_max_retrans,
        "tcp_unacknowledged" => &mut t.tcp_unacknowledged,
        "udp" => &mut t.udp,
        "udp_stream" => &mut t.udp_stream,
        "icmp" => &mut t.icmp,
        "generic" => &mut t.generic,
        _ => return None,
    })
}

/// Timeouts as `(name, seconds)` in proto order.
#[must_use]
pub fn timeouts_rows(t: &pb::Timeouts) -> Vec<(&'static str, u32)> {
    let mut t = *t;
    TIMEOUT_NAMES
        .iter()
        .map(|n| (*n, timeout_field(&mut t, n).map_or(0, |v| *v)))
        .collect()
}
