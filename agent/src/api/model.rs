//! The core-side values the API exchanges with the [`ControlPlane`](super::ControlPlane):
//! validated, typed, free of protobuf. `convert` turns requests into these with
//! `TryFrom` and these back into responses with `From`.

use std::net::IpAddr;

use ctoffload_fallback_sw::conntrack::{Filter, OtherTimeouts, Prefix};
use ctoffload_fallback_sw::table::{Counter, RemoveReason, Status};
use ctoffload_fallback_sw::tcp::{TcpState, TcpTimeouts};
use ctoffload_fallback_sw::tuple::{Family, Tuple};

/// A validated connection filter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnFilter(pub Filter);

impl ConnFilter {
    /// Whether no field is set (selects everything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0 == Filter::default()
    }
}

/// Names one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnKey {
    /// By id.
    Id(u64),
    /// By the tuple of either direction.
    Tuple(Tuple),
}

/// Where a paged listing goes on; opaque to callers. `ListCursor::START` begins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ListCursor(pub u64);

impl ListCursor {
    /// The beginning of a listing.
    pub const START: ListCursor = ListCursor(0);
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct ListPage {
    /// The connections of this page.
    pub conns: Vec<ConnInfo>,
    /// Where the next page starts; `None` when the walk is complete.
    pub next: Option<ListCursor>,
}

/// A snapshot of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// Unique id.
    pub id: u64,
    /// Original and reply tuples.
    pub tuples: [Tuple; 2],
    /// TCP state, for TCP connections.
    pub tcp_state: Option<TcpState>,
    /// Status bits.
    pub status: Status,
    /// Nanoseconds before expiry.
    pub remaining_ns: u64,
    /// Total counters per direction (software plus hardware).
    pub counters: [Counter; 2],
    /// The part of `counters` counted by hardware.
    pub hw_counters: [Counter; 2],
    /// Why the connection is not in hardware (`None` when it is).
    pub not_offloaded: Option<String>,
}

/// Why a flow returned from the fast path to software.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnReason {
    /// An operator drain.
    Drain,
    /// Taken off to be deleted.
    Delete,
    /// The flow was idle on the fast path.
    Idle,
    /// The connection is closing (FIN/RST seen).
    Teardown,
    /// A device error or reset.
    DeviceError,
}

impl ReturnReason {
    /// Its name on the wire.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            ReturnReason::Drain => "drain",
            ReturnReason::Delete => "delete",
            ReturnReason::Idle => "idle",
            ReturnReason::Teardown => "teardown",
            ReturnReason::DeviceError => "device-error",
        }
    }
}

/// Why records are missing from an event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    /// The journal dropped records before the client read them.
    JournalOverflow,
    /// Events were lost before they reached the journal.
    SourceOverflow,
}

/// The kinds of events a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// [`Event::New`].
    New,
    /// [`Event::StateChange`].
    StateChange,
    /// [`Event::Offloaded`].
    Offloaded,
    /// [`Event::Returned`].
    Returned,
    /// [`Event::EndOfFlow`].
    EndOfFlow,
}

/// One journaled event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A connection was created.
    New {
        /// Its id.
        id: u64,
        /// Its tuples.
        tuples: [Tuple; 2],
    },
    /// A TCP connection changed state.
    StateChange {
        /// Its id.
        id: u64,
        /// Original tuple.
        original: Tuple,
        /// Previous state.
        old: TcpState,
        /// New state.
        new: TcpState,
    },
    /// A flow went onto the fast path.
    Offloaded {
        /// Its id.
        id: u64,
        /// Original tuple.
        original: Tuple,
        /// In the hardware table (false: a software fast path).
        hardware: bool,
    },
    /// A flow came back from the fast path.
    Returned {
        /// Its id.
        id: u64,
        /// Original tuple.
        original: Tuple,
        /// Why.
        reason: ReturnReason,
    },
    /// A connection was destroyed: its one end-of-flow record.
    EndOfFlow {
        /// Its id.
        id: u64,
        /// Its tuples.
        tuples: [Tuple; 2],
        /// Final total counters per direction.
        counters: [Counter; 2],
        /// The part counted by hardware.
        hw_counters: [Counter; 2],
        /// Why it ended.
        reason: RemoveReason,
        /// Final status bits.
        status: Status,
    },
    /// Records are missing (see [`GapCause`]).
    Gap {
        /// Why.
        cause: GapCause,
        /// First missing sequence (journal overflow), 0 otherwise.
        first_missing: u64,
        /// Last missing sequence (journal overflow), 0 otherwise.
        last_missing: u64,
        /// Number of records lost.
        lost_records: u64,
        /// End-of-flow records among them, when known.
        lost_end_of_flow: Option<u64>,
    },
}

impl Event {
    /// The kind, or `None` for gaps (always delivered).
    #[must_use]
    pub fn kind(&self) -> Option<EventKind> {
        match self {
            Event::New { .. } => Some(EventKind::New),
            Event::StateChange { .. } => Some(EventKind::StateChange),
            Event::Offloaded { .. } => Some(EventKind::Offloaded),
            Event::Returned { .. } => Some(EventKind::Returned),
            Event::EndOfFlow { .. } => Some(EventKind::EndOfFlow),
            Event::Gap { .. } => None,
        }
    }
}

/// An event with its journal position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Sequence number (1, 2, ...).
    pub seq: u64,
    /// Agent clock when journaled, ns.
    pub timestamp_ns: u64,
    /// The event.
    pub event: Event,
}

/// Journal bounds and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JournalInfo {
    /// Oldest sequence held.
    pub first_sequence: u64,
    /// Next sequence to be given.
    pub next_sequence: u64,
    /// Records held at most.
    pub capacity: u64,
    /// Records evicted since start.
    pub evicted: u64,
    /// Events lost before the journal since start.
    pub source_lost: u64,
}

/// Usage of one NAT rule's port pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortPool {
    /// The rule.
    pub rule: String,
    /// Address × port pairs in the pool.
    pub total: u64,
    /// Pairs bound to connections now.
    pub used: u64,
}

/// Hardware table occupancy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HwTable {
    /// Entries in use.
    pub used: u64,
    /// Entries available (0: no hardware).
    pub capacity: u64,
    /// Inserts the device refused.
    pub insert_failures: u64,
}

/// Statistics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Live connections.
    pub connections: u64,
    /// Table capacity.
    pub max_connections: u64,
    /// Per TCP state name.
    pub by_tcp_state: Vec<(&'static str, u64)>,
    /// Per IP protocol.
    pub by_protocol: Vec<(u8, u64)>,
    /// On a fast path.
    pub offloaded: u64,
    /// In hardware.
    pub hw_offloaded: u64,
    /// Hardware table.
    pub hw_table: HwTable,
    /// Inserts refused by a clash.
    pub insert_failed_clash: u64,
    /// Inserts refused by a full table.
    pub insert_failed_full: u64,
    /// Early drops.
    pub early_drops: u64,
    /// Expired entries.
    pub expired: u64,
    /// Drops per reason.
    pub drops_by_reason: Vec<(String, u64)>,
    /// Port pools.
    pub port_pools: Vec<PortPool>,
    /// Packets processed.
    pub packets: u64,
    /// Connections created.
    pub created: u64,
    /// Journal.
    pub journal: JournalInfo,
}

/// Kind of NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Source NAT.
    Snat,
    /// Destination NAT.
    Dnat,
}

/// An inclusive address range of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrRange {
    /// First address.
    pub first: IpAddr,
    /// Last address (not below `first`, same family).
    pub last: IpAddr,
}

impl AddrRange {
    /// The family.
    #[must_use]
    pub fn family(&self) -> Family {
        match self.first {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// Numeric bounds (IPv4 in the low 32 bits).
    #[must_use]
    pub fn bounds(&self) -> (u128, u128) {
        (ip_num(self.first), ip_num(self.last))
    }

    /// Number of addresses, saturating.
    #[must_use]
    pub fn len(&self) -> u64 {
        let (a, b) = self.bounds();
        u64::try_from(b.saturating_sub(a).saturating_add(1)).unwrap_or(u64::MAX)
    }

    /// Never empty once validated; present for clippy's `len_without_is_empty`.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        let (a, b) = self.bounds();
        a > b
    }
}

/// An address as a number.
#[must_use]
pub fn ip_num(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// A validated NAT rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRule {
    /// Unique name.
    pub name: String,
    /// SNAT or DNAT.
    pub kind: NatKind,
    /// Protocol matched (`None`: any).
    pub protocol: Option<u8>,
    /// Original source prefix matched.
    pub src: Option<Prefix>,
    /// Original destination prefix matched.
    pub dst: Option<Prefix>,
    /// Zone matched.
    pub zone: Option<u16>,
    /// Translation addresses.
    pub to_addrs: AddrRange,
    /// Translation ports (`None`: keep).
    pub to_ports: Option<(u16, u16)>,
}

impl NatRule {
    /// Address × port pairs in the pool, saturating.
    #[must_use]
    pub fn pool_size(&self) -> u64 {
        let ports = self
            .to_ports
            .map_or(1, |(a, b)| u64::from(b.saturating_sub(a)) + 1);
        self.to_addrs.len().saturating_mul(ports)
    }
}

/// The offload policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadPolicy {
    /// Offload at all.
    pub enabled: bool,
    /// Offload TCP.
    pub tcp: bool,
    /// Offload UDP.
    pub udp: bool,
    /// Packets a flow must have seen first.
    pub min_packets: u64,
}

impl Default for OffloadPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            tcp: true,
            udp: true,
            min_packets: 2,
        }
    }
}

/// Device health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Working.
    Ok,
    /// Working with reduced function.
    Degraded,
    /// Not usable.
    Failed,
}

/// Device status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// Backend name.
    pub backend: String,
    /// Identity.
    pub identity: String,
    /// Spec version.
    pub spec_version: String,
    /// Capabilities.
    pub capabilities: Vec<String>,
    /// Health.
    pub health: Health,
    /// Resets since start.
    pub resets: u64,
    /// Errors since start.
    pub errors: u64,
    /// Last error message.
    pub last_error: String,
    /// Hardware table.
    pub table: HwTable,
}

/// Largest timeout accepted, seconds (30 days).
pub const MAX_TIMEOUT_S: u32 = 30 * 24 * 3600;

/// Conntrack timeouts, seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// TCP.
    pub tcp: TcpTimeouts,
    /// UDP, ICMP, generic.
    pub other: OtherTimeouts,
}

/// A timeouts update: every `0` keeps the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutsUpdate(pub Timeouts);

impl TimeoutsUpdate {
    /// `current` with the non-zero fields of the update applied.
    #[must_use]
    pub fn apply(&self, current: &Timeouts) -> Timeouts {
        let pick = |new: u32, old: u32| if new == 0 { old } else { new };
        let (n, o) = (&self.0, current);
        Timeouts {
            tcp: TcpTimeouts {
                syn_sent: pick(n.tcp.syn_sent, o.tcp.syn_sent),
                syn_recv: pick(n.tcp.syn_recv, o.tcp.syn_recv),
                established: pick(n.tcp.established, o.tcp.established),
                fin_wait: pick(n.tcp.fin_wait, o.tcp.fin_wait),
                close_wait: pick(n.tcp.close_wait, o.tcp.close_wait),
                last_ack: pick(n.tcp.last_ack, o.tcp.last_ack),
                time_wait: pick(n.tcp.time_wait, o.tcp.time_wait),
                close: pick(n.tcp.close, o.tcp.close),
                syn_sent2: pick(n.tcp.syn_sent2, o.tcp.syn_sent2),
                max_retrans: pick(n.tcp.max_retrans, o.tcp.max_retrans),
                unacknowledged: pick(n.tcp.unacknowledged, o.tcp.unacknowledged),
            },
            other: OtherTimeouts {
                udp: pick(n.other.udp, o.other.udp),
                udp_stream: pick(n.other.udp_stream, o.other.udp_stream),
                icmp: pick(n.other.icmp, o.other.icmp),
                generic: pick(n.other.generic, o.other.generic),
            },
        }
    }
}

/// Limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections per table.
    pub max_connections: u64,
    /// Flows on the fast path at once.
    pub max_offloaded: u64,
    /// NAT rules.
    pub max_nat_rules: u64,
    /// Event journal records.
    pub event_journal_capacity: u64,
}

/// A limits update: every `0` keeps the current value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitsUpdate(pub Limits);

impl LimitsUpdate {
    /// `current` with the non-zero fields applied.
    #[must_use]
    pub fn apply(&self, current: &Limits) -> Limits {
        let pick = |new: u64, old: u64| if new == 0 { old } else { new };
        Limits {
            max_connections: pick(self.0.max_connections, current.max_connections),
            max_offloaded: pick(self.0.max_offloaded, current.max_offloaded),
            max_nat_rules: pick(self.0.max_nat_rules, current.max_nat_rules),
            event_journal_capacity: pick(
                self.0.event_journal_capacity,
                current.event_journal_capacity,
            ),
        }
    }
}

/// A setting as configured, and whether the running tables still use other values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Configured<T> {
    /// The configured value.
    pub value: T,
    /// A restart is needed before it takes full effect.
    pub restart_required: bool,
}
