//! The conntrack pipeline of one worker: a frame in, a verdict out.
//!
//! Follows Linux `nf_conntrack_in` (see `../shared/reference/conntrack-semantics.md` §0):
//! parse, ICMP errors first (RELATED), build the tuple, look it up, run the protocol
//! handler (TCP state machine and window tracking, UDP, ICMP, generic), create the
//! connection on a valid first packet, refresh timeouts, set SEEN_REPLY after a reply,
//! count packets and bytes per direction.
//!
//! Differences from Linux, on purpose:
//! - There is no IP defragmentation: a first fragment is tracked by its ports; a later
//!   fragment is reported as [`Untracked::Fragment`] and the caller applies its policy.
//! - Creation and confirmation happen in the same call (there is no unconfirmed entry
//!   seen by anyone else), so "confirm-time clash" is an insert clash here.
//!
//! NAT (see `docs/nat.md`): the instance owns a [`NatEngine`]. A new connection's REPLY
//! tuple comes from [`NatEngine::decide`] (with no rule and no translated connection in
//! the table, the plain inverse, as before); [`Conntrack::process_mut`] and
//! [`Conntrack::process_batch_mut`] also rewrite the frame in place (both directions and
//! RELATED ICMP errors); every connection with a NAT bit that leaves the table, for any
//! reason, is handed to [`NatEngine::released`].

use crate::nat::rewrite::{self, RewriteError};
use crate::nat::rules::RuleId;
use crate::nat::{Candidates, CandidatesV4, DecisionV4, NatEngine, NatError, PacketMeta};
use crate::table::side::SlotStore;
use crate::table::{ConnTable, FoundV4, InsertError, Memory, RemoveReason, Slot, Status};
use crate::tcp::{
    ConnStatus, TcpConfig, TcpConn, TcpFlags, TcpInvalid, TcpOutcome, TcpSegment, TcpState,
    TcpTimeouts,
};
use crate::tuple::{Addr, Dir, Family, PackedV4, Tuple, icmpv4_is_request, icmpv6_is_request};
use crate::wire::{
    self, DropReason, Fragment, L3, L4, ParseOptions, ParsedPacket, PlainV4, TcpInfo, V4Layout,
};

const NS: u64 = 1_000_000_000;
/// UDP: a reply seen this long after the first packet makes the entry a stream.
const UDP_STREAM_DELAY_NS: u64 = 2 * NS;

/// Timeouts of the protocols without a state machine, in seconds (Linux sysctls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OtherTimeouts {
    /// `nf_conntrack_udp_timeout`: unreplied UDP. Default 30 s.
    pub udp: u32,
    /// `nf_conntrack_udp_timeout_stream`: replied UDP. Default 120 s.
    pub udp_stream: u32,
    /// `nf_conntrack_icmp(v6)_timeout`. Default 30 s.
    pub icmp: u32,
    /// `nf_conntrack_generic_timeout`. Default 600 s.
    pub generic: u32,
}

impl Default for OtherTimeouts {
    fn default() -> Self {
        Self {
            udp: 30,
            udp_stream: 120,
            icmp: 30,
            generic: 600,
        }
    }
}

/// Configuration of one conntrack instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// TCP options and timeouts.
    pub tcp: TcpConfig,
    /// UDP, ICMP and generic timeouts.
    pub timeouts: OtherTimeouts,
    /// Maximum number of connections (`nf_conntrack_max`) of this instance.
    pub max_connections: usize,
    /// Checksums verified on input (`nf_conntrack_checksum`).
    pub parse: ParseOptions,
    /// Seed of the table's keyed hash.
    pub hash_seed: u64,
    /// Undrained events kept before new ones are counted as lost.
    pub event_capacity: usize,
    /// Whether the table's index asks for transparent huge pages (default on; see
    /// [`crate::table::pages`]): at a million connections a lookup then walks no page
    /// tables. Off: plain allocator memory.
    pub huge_pages: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            tcp: TcpConfig::default(),
            timeouts: OtherTimeouts::default(),
            max_connections: 65_536,
            parse: ParseOptions::VERIFY_ALL,
            hash_seed: 0x6374_6f66_666c_6f61,
            event_capacity: 4096,
            huge_pages: true,
        }
    }
}

/// The TCP part kept in a connection's entry: its state. The window tracking
/// ([`TcpConn`]) lives beside the table (see [`Conntrack::tcp`]), so that entries of
/// other protocols do not carry its 60 bytes. Only this crate creates one: a TCP entry
/// always has its window state stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSummary {
    state: TcpState,
}

impl TcpSummary {
    /// The state of the TCP state machine.
    #[inline]
    #[must_use]
    pub fn state(&self) -> TcpState {
        self.state
    }
}

/// Per-protocol state kept in each connection.
#[derive(Debug, Clone, Copy)]
pub enum L4State {
    /// TCP: the state machine's state (window tracking: [`Conntrack::tcp`]).
    Tcp(TcpSummary),
    /// UDP: when a reply makes the entry a stream.
    Udp {
        /// Absolute time after which a replied entry becomes a stream (ASSURED).
        stream_at: u64,
    },
    /// ICMP / ICMPv6 queries.
    Icmp,
    /// Any other protocol.
    Generic,
}

/// Linux `ctinfo`: how a tracked packet relates to its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CtInfo {
    /// Original direction, no reply seen yet (includes the first packet).
    New,
    /// Original direction after a reply was seen.
    Established,
    /// Reply direction.
    EstablishedReply,
    /// ICMP error about the connection, travelling in its original direction.
    Related,
    /// ICMP error about the connection, travelling in its reply direction.
    RelatedReply,
}

impl CtInfo {
    /// The `ctinfo` of a packet of an existing connection travelling in `dir`, when the
    /// connection has (`seen_reply`) or has not seen a reply before it.
    #[inline]
    fn of(dir: Dir, seen_reply: bool) -> Self {
        match (dir, seen_reply) {
            (Dir::Reply, _) => Self::EstablishedReply,
            (Dir::Original, true) => Self::Established,
            (Dir::Original, false) => Self::New,
        }
    }
}

/// Why a packet is invalid (it continues with no conntrack; callers usually drop it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// The frame did not parse.
    #[error("malformed packet: {0}")]
    Malformed(#[source] wire::ParseError),
    /// The TCP handler refused the segment.
    #[error("TCP: {0}")]
    Tcp(#[source] TcpInvalid),
    /// A new ICMP entry needs a request type; this type has no reply counterpart.
    #[error("ICMP type {icmp_type} cannot start a connection")]
    IcmpNotRequest {
        /// The ICMP or ICMPv6 type.
        icmp_type: u8,
    },
    /// An ICMP error whose quoted packet belongs to no connection.
    #[error("ICMP error quotes an untracked packet")]
    IcmpErrorNoMatch,
    /// An ICMP error whose outer destination is not the connection's endpoint.
    #[error("ICMP error destination does not match the connection (spoofed?)")]
    IcmpErrorSpoofed,
    /// The quoted packet of an ICMP error could not be read.
    #[error("ICMP error quote unreadable: {0}")]
    IcmpErrorQuote(#[source] wire::ParseError),
    /// The table is full and early drop found nothing to evict.
    #[error("connection table full")]
    TableFull,
    /// The new connection's tuple is already owned by another connection.
    #[error("tuple clash on insert")]
    InsertClash,
    /// NAT found no free tuple for the new connection (Linux drops it at confirm and
    /// counts `insert_failed`: its kind is [`InvalidKind::InsertClash`]). Also counted
    /// in [`Stats::nat_exhausted`] and the engine's and rule's counters.
    #[error("nat rule {rule:?}: no free tuple")]
    NatExhausted {
        /// The rule whose range is full; `None` for a null binding.
        rule: Option<RuleId>,
    },
    /// A masquerade rule matched but the egress has no IPv4 address (Linux drops in
    /// the target). Its kind is [`InvalidKind::InsertClash`]; also counted in
    /// [`Stats::nat_no_address`].
    #[error("nat rule {rule}: no egress address to masquerade to")]
    NatNoAddress {
        /// The masquerade rule.
        rule: RuleId,
    },
}

impl Invalid {
    /// A compact reason for per-reason counters.
    #[must_use]
    pub fn kind(&self) -> InvalidKind {
        match self {
            Invalid::Malformed(_) => InvalidKind::Malformed,
            Invalid::Tcp(_) => InvalidKind::Tcp,
            Invalid::IcmpNotRequest { .. } => InvalidKind::IcmpNotRequest,
            Invalid::IcmpErrorNoMatch => InvalidKind::IcmpErrorNoMatch,
            Invalid::IcmpErrorSpoofed => InvalidKind::IcmpErrorSpoofed,
            Invalid::IcmpErrorQuote(_) => InvalidKind::IcmpErrorQuote,
            Invalid::TableFull => InvalidKind::TableFull,
            Invalid::InsertClash | Invalid::NatExhausted { .. } | Invalid::NatNoAddress { .. } => {
                InvalidKind::InsertClash
            }
        }
    }
}

/// [`Invalid`] without its details: an index into counter arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InvalidKind {
    /// See [`Invalid::Malformed`].
    Malformed,
    /// See [`Invalid::Tcp`].
    Tcp,
    /// See [`Invalid::IcmpNotRequest`].
    IcmpNotRequest,
    /// See [`Invalid::IcmpErrorNoMatch`].
    IcmpErrorNoMatch,
    /// See [`Invalid::IcmpErrorSpoofed`].
    IcmpErrorSpoofed,
    /// See [`Invalid::IcmpErrorQuote`].
    IcmpErrorQuote,
    /// See [`Invalid::TableFull`].
    TableFull,
    /// See [`Invalid::InsertClash`].
    InsertClash,
}

impl InvalidKind {
    /// Number of kinds.
    pub const COUNT: usize = 8;

    /// Index in `0..COUNT`.
    #[must_use]
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Packets conntrack does not track (Linux: untracked or not its business).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Untracked {
    /// Not IPv4/IPv6 (ARP, LLDP, ...).
    NotIp {
        /// The ethertype.
        ethertype: u16,
    },
    /// A non-first IP fragment (no reassembly here).
    Fragment,
    /// ICMPv6 neighbour discovery, MLD or MRD: never tracked (Linux marks them so).
    NeighbourDiscovery,
}

/// The outcome for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The packet belongs to a connection.
    Tracked {
        /// Where the connection is.
        slot: Slot,
        /// The packet's direction.
        dir: Dir,
        /// How it relates to the connection.
        info: CtInfo,
        /// The connection was created by this packet.
        created: bool,
    },
    /// The packet is invalid.
    Invalid(Invalid),
    /// The packet is not tracked.
    Untracked(Untracked),
}

/// Instance counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Packets processed.
    pub packets: u64,
    /// Packets that created a connection.
    pub created: u64,
    /// Packets of tracked connections (including the creating ones).
    pub tracked: u64,
    /// RELATED ICMP errors.
    pub related: u64,
    /// Packets ignored by TCP tracking (accepted, no state change).
    pub tcp_ignored: u64,
    /// Invalid packets per [`InvalidKind`].
    pub invalid: [u64; InvalidKind::COUNT],
    /// Malformed packets per parser [`DropReason`].
    pub malformed: [u64; DropReason::COUNT],
    /// Untracked packets.
    pub untracked: u64,
    /// New connections dropped because NAT found no free tuple.
    pub nat_exhausted: u64,
    /// New connections dropped because masquerade had no egress address.
    pub nat_no_address: u64,
    /// Frames rewritten by NAT ([`Conntrack::process_mut`] and the batch form).
    pub nat_rewritten: u64,
    /// Frames of translated connections that could not be rewritten (to be dropped).
    pub nat_rewrite_failed: u64,
}

/// What NAT did to a frame given to [`Conntrack::process_mut`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatOutcome {
    /// Not touched: its connection is not translated, or the packet is not tracked.
    Unchanged,
    /// Rewritten in place (addresses, ports or ICMP ids, checksums; for an ICMP error
    /// the quoted packet too).
    Rewritten,
    /// The connection is translated but the frame could not be rewritten: drop it.
    Drop(RewriteError),
}

/// The result of [`Conntrack::process_mut`]: the conntrack verdict and the NAT outcome.
/// Forward the frame only when [`NatVerdict::forward`] says so (or per the caller's
/// policy for untracked and invalid packets, which NAT never touches).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NatVerdict {
    /// The conntrack verdict, as [`Conntrack::process`] gives it.
    pub verdict: Verdict,
    /// What NAT did to the frame.
    pub nat: NatOutcome,
}

impl NatVerdict {
    /// Tracked and not refused by NAT.
    #[must_use]
    pub fn forward(&self) -> bool {
        matches!(self.verdict, Verdict::Tracked { .. }) && !matches!(self.nat, NatOutcome::Drop(_))
    }
}

/// One conntrack instance (one per worker).
#[derive(Debug)]
pub struct Conntrack {
    cfg: Config,
    table: ConnTable<L4State>,
    /// Window tracking of the TCP entries, by slot.
    tcp: SlotStore<TcpConn>,
    stats: Stats,
    nat: NatEngine,
    /// Connections in the table with `SRC_NAT` or `DST_NAT`: while there are none and
    /// there is no rule, a new connection's reply is the plain inverse (a null binding
    /// cannot clash with anything), without asking the engine.
    nat_live: usize,
    /// A translated connection that the current packet closed (TCP RST, reopen): the
    /// rewrite still needs its tuples.
    closed: Option<([Tuple; 2], Status)>,
}

/// Seed of the NAT engine that [`Conntrack::new`] creates, mixed with the hash seed.
const NAT_SEED: u64 = 0x6e61_745f_7365_6564;

fn tuple_parts(l4: &L4) -> (u16, u16) {
    match *l4 {
        L4::Tcp(TcpInfo {
            src_port, dst_port, ..
        })
        | L4::Udp { src_port, dst_port }
        | L4::Ports { src_port, dst_port } => (src_port, dst_port),
        L4::IcmpQuery {
            id,
            icmp_type,
            code,
        } => (id, u16::from_be_bytes([icmp_type, code])),
        L4::None | L4::IcmpError { .. } | L4::IcmpOther { .. } | L4::Generic => (0, 0),
    }
}

fn family_of(l3: L3) -> Option<Family> {
    match l3 {
        L3::Ipv4 => Some(Family::V4),
        L3::Ipv6 => Some(Family::V6),
        L3::Other { .. } => None,
    }
}

fn tuple_of(
    family: Family,
    src: core::net::IpAddr,
    dst: core::net::IpAddr,
    protocol: u8,
    l4: &L4,
    zone: u16,
) -> Tuple {
    let (src_l4, dst_l4) = tuple_parts(l4);
    Tuple {
        src: Addr::from_ip(src).0,
        dst: Addr::from_ip(dst).0,
        src_l4,
        dst_l4,
        proto: protocol,
        family,
        zone,
    }
}

fn segment_of(t: &TcpInfo) -> TcpSegment {
    TcpSegment {
        flags: TcpFlags::from_bits(t.flags.bits().to_le_bytes()[0]),
        seq: t.seq,
        ack: t.ack,
        window: t.window,
        payload_len: u32::from(t.payload_len),
        has_options: t.header_len > 20,
        wscale: t.wscale,
        sack_permitted: t.sack_permitted,
        highest_sack_edge: t.sack_highest,
    }
}

/// The original tuple of a connection being created: as a [`Tuple`], or packed
/// (a plain IPv4 TCP or UDP frame of the established path, [`Conntrack::track_v4`]),
/// unpacked only where a [`Tuple`] is needed.
#[derive(Debug, Clone, Copy)]
enum NewOrig {
    Tuple(Tuple),
    V4(PackedV4),
}

impl NewOrig {
    #[inline]
    fn family(&self) -> Family {
        match self {
            NewOrig::Tuple(t) => t.family,
            NewOrig::V4(_) => Family::V4,
        }
    }

    #[inline]
    fn tuple(self) -> Tuple {
        match self {
            NewOrig::Tuple(t) => t,
            NewOrig::V4(k) => k.unpack(),
        }
    }
}

/// ICMPv6 types that Linux marks untracked: ND, MLD and MRD (not redirect, 137).
fn icmpv6_untracked(ty: u8) -> bool {
    matches!(ty, 130..=136 | 143 | 151 | 152)
}

impl Conntrack {
    /// A new instance; allocates its whole table now.
    #[must_use]
    pub fn new(cfg: Config) -> Self {
        Self::with_nat(cfg, NatEngine::new(cfg.hash_seed ^ NAT_SEED))
    }

    /// A new instance with a NAT engine (its rules already set, or set later through
    /// [`Conntrack::nat_mut`]).
    #[must_use]
    pub fn with_nat(cfg: Config, nat: NatEngine) -> Self {
        Self {
            table: ConnTable::with_memory(
                cfg.max_connections,
                cfg.hash_seed,
                cfg.event_capacity,
                if cfg.huge_pages {
                    Memory::HugePages
                } else {
                    Memory::Plain
                },
            ),
            tcp: SlotStore::new(cfg.max_connections.max(1)),
            cfg,
            stats: Stats::default(),
            nat,
            nat_live: 0,
            closed: None,
        }
    }

    /// The NAT engine (rules, counters, by-source index).
    #[must_use]
    pub fn nat(&self) -> &NatEngine {
        &self.nat
    }

    /// The NAT engine, mutable: change rules here. Existing connections keep their
    /// translation.
    pub fn nat_mut(&mut self) -> &mut NatEngine {
        &mut self.nat
    }

    /// Connections in the table whose status has `SRC_NAT` or `DST_NAT`.
    #[must_use]
    pub fn nat_connections(&self) -> usize {
        self.nat_live
    }

    /// Hands connections with NAT bits that left the table (for any reason, including
    /// removals made through [`Conntrack::table_mut`]) to [`NatEngine::released`].
    /// Every call that can remove entries runs it; calling it more is harmless.
    pub fn release_nat(&mut self) {
        if !self.table.has_nat_released() {
            return;
        }
        let Self {
            table,
            nat,
            nat_live,
            ..
        } = self;
        table.take_nat_released(|tuples, status| {
            *nat_live = nat_live.saturating_sub(1);
            nat.released(tuples, status);
        });
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Change the timeouts at run time, like writing the `nf_conntrack_*_timeout*`
    /// sysctls: a connection keeps the expiry it has and takes the new value at its
    /// next packet (or state change); new connections start with it.
    pub fn set_timeouts(&mut self, tcp: TcpTimeouts, other: OtherTimeouts) {
        self.cfg.tcp.timeouts = tcp;
        self.cfg.timeouts = other;
    }

    /// Change the number of connections admitted (`nf_conntrack_max`) at run time,
    /// within the table's allocation; returns the limit now in force (see
    /// [`ConnTable::set_limit`]). [`Config::max_connections`] stays the allocated size.
    pub fn set_max_connections(&mut self, max: usize) -> usize {
        self.table.set_limit(max)
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The connection table.
    #[must_use]
    pub fn table(&self) -> &ConnTable<L4State> {
        &self.table
    }

    /// The connection table, mutable (for the offload policy and the API).
    pub fn table_mut(&mut self) -> &mut ConnTable<L4State> {
        &mut self.table
    }

    /// The window-tracking state of the TCP connection in `slot` (`None` when the slot
    /// holds no TCP connection).
    #[must_use]
    pub fn tcp(&self, slot: Slot) -> Option<&TcpConn> {
        match self.table.entry(slot)?.proto {
            L4State::Tcp(_) => self.tcp.get(slot),
            L4State::Udp { .. } | L4State::Icmp | L4State::Generic => None,
        }
    }

    /// Insert a TCP connection built outside the packet path (the agent restoring an
    /// offloaded flow after a restart), with its window state: [`ConnTable::insert`]
    /// for TCP, whose entries keep their window state beside the table.
    ///
    /// # Errors
    /// As [`ConnTable::insert`].
    pub fn insert_tcp(
        &mut self,
        orig: Tuple,
        reply: Tuple,
        status: Status,
        timeout: u64,
        tcp: TcpConn,
        now: u64,
    ) -> Result<Slot, InsertError> {
        let summary = L4State::Tcp(TcpSummary { state: tcp.state() });
        let slot = self
            .table
            .insert(orig, reply, status, timeout, summary, now)?;
        self.tcp.put(slot, tcp);
        self.release_nat();
        Ok(slot)
    }

    /// Bytes of memory held for connections: every allocation of the table (see
    /// [`ConnTable::heap_bytes`]) and of the TCP window store beside it.
    #[must_use]
    pub fn memory_bytes(&self) -> usize {
        self.table.heap_bytes() + self.tcp.heap_bytes()
    }

    /// [`Conntrack::memory_bytes`] divided by the live connections (by 1 when empty),
    /// rounded up.
    #[must_use]
    pub fn bytes_per_connection(&self) -> usize {
        self.memory_bytes().div_ceil(self.table.len().max(1))
    }

    /// Reap expired connections, visiting at most `budget` timers.
    pub fn gc(&mut self, now: u64, budget: usize) -> usize {
        let n = self.table.gc(now, budget);
        self.release_nat();
        n
    }

    /// Parse and track one Ethernet frame that arrived in `zone` at `now` (ns).
    pub fn process(&mut self, frame: &[u8], zone: u16, now: u64) -> Verdict {
        self.stats.packets += 1;
        match wire::parse(frame, self.cfg.parse) {
            Ok(pkt) => self.track_parsed(&pkt, frame, zone, now),
            Err(e) => {
                self.stats.malformed[e.reason().index()] += 1;
                self.invalid(Invalid::Malformed(e))
            }
        }
    }

    fn invalid(&mut self, why: Invalid) -> Verdict {
        self.stats.invalid[why.kind().index()] += 1;
        Verdict::Invalid(why)
    }

    /// Track an already parsed frame (`frame` is needed to read ICMP error quotes).
    ///
    /// NAT bindings of new connections are decided as in
    /// [`Conntrack::track_parsed_meta`] with a default [`PacketMeta`] (ingress port 0, no
    /// egress: masquerade rules fail); the frame is not rewritten.
    pub fn track_parsed(
        &mut self,
        pkt: &ParsedPacket,
        frame: &[u8],
        zone: u16,
        now: u64,
    ) -> Verdict {
        self.track_parsed_meta(pkt, frame, zone, &PacketMeta::default(), now)
    }

    /// [`Conntrack::track_parsed`] with the ingress/egress context NAT rules match on
    /// (used only when the packet creates a connection). The frame is not rewritten:
    /// see [`Conntrack::track_parsed_mut`].
    pub fn track_parsed_meta(
        &mut self,
        pkt: &ParsedPacket,
        frame: &[u8],
        zone: u16,
        meta: &PacketMeta,
        now: u64,
    ) -> Verdict {
        let Some(family) = family_of(pkt.l3) else {
            self.stats.untracked += 1;
            let ethertype = match pkt.l3 {
                L3::Other { ethertype } => ethertype,
                L3::Ipv4 | L3::Ipv6 => 0,
            };
            return Verdict::Untracked(Untracked::NotIp { ethertype });
        };
        if pkt.fragment == Fragment::NonFirst {
            self.stats.untracked += 1;
            return Verdict::Untracked(Untracked::Fragment);
        }
        match pkt.l4 {
            L4::IcmpError { .. } => return self.related(pkt, frame, zone, family, now),
            L4::IcmpOther { icmp_type, .. }
                if family == Family::V6 && icmpv6_untracked(icmp_type) =>
            {
                self.stats.untracked += 1;
                return Verdict::Untracked(Untracked::NeighbourDiscovery);
            }
            _ => {}
        }
        let tuple = tuple_of(family, pkt.src, pkt.dst, pkt.protocol, &pkt.l4, zone);
        let hash = self.table.hash(&tuple);
        self.track_tuple(&tuple, hash, pkt, meta, now)
    }

    /// The common path after classification: look `tuple` (hashed to `hash` by the
    /// table) up, run the protocol handler or create the connection.
    #[inline]
    fn track_tuple(
        &mut self,
        tuple: &Tuple,
        hash: u64,
        pkt: &ParsedPacket,
        meta: &PacketMeta,
        now: u64,
    ) -> Verdict {
        let bytes = u64::from(pkt.l3_len);
        // At most two rounds: a TCP reopen deletes the old entry and starts over.
        for _ in 0..2 {
            let verdict = match self.table.lookup_hashed(tuple, hash, now) {
                Some((slot, dir)) => self.existing(slot, dir, &pkt.l4, bytes, now),
                None => self.create(NewOrig::Tuple(*tuple), hash, &pkt.l4, meta, bytes, now),
            };
            self.release_nat();
            if let Ok(v) = verdict {
                return self.count_tracked(v);
            }
        }
        // A second reopen in a row cannot happen (the fresh entry is SYN_SENT), but
        // never loop on hostile input.
        self.invalid(Invalid::InsertClash)
    }

    /// The established path of a plain IPv4 TCP or UDP frame ([`wire::plain_v4`]):
    /// `key` is its tuple in `zone` (hashed to `hash`), looked up as two words; a live
    /// connection with a plain key gets the protocol handler straight away, and a key
    /// that no connection has creates one. Anything else (an expired or translated
    /// connection, a TCP reopen) goes on to the general path with the
    /// [`ParsedPacket`] and [`Tuple`] that [`wire::parse()`] and the tuple building
    /// would have given. The result is in every way what [`Conntrack::track_parsed`]
    /// gives for the frame (with NAT, `meta` for a connection it creates: what
    /// [`Conntrack::track_tuple`] gives; a translated IPv4 connection is found as
    /// words too).
    #[inline]
    fn track_v4(
        &mut self,
        plain: &PlainV4,
        key: PackedV4,
        hash: u64,
        meta: &PacketMeta,
        now: u64,
    ) -> Verdict {
        let found = self.table.find_v4(key, hash, now);
        self.track_v4_found(found, plain, key, hash, meta, now)
    }

    /// [`Conntrack::track_v4`] after its lookup found `found`.
    #[inline(always)]
    fn track_v4_found(
        &mut self,
        found: FoundV4,
        plain: &PlainV4,
        key: PackedV4,
        hash: u64,
        meta: &PacketMeta,
        now: u64,
    ) -> Verdict {
        let bytes = u64::from(plain.l3_len);
        let round = match found {
            FoundV4::Live(slot, dir) => self.existing(slot, dir, &plain.l4, bytes, now),
            FoundV4::Absent => self.create(NewOrig::V4(key), hash, &plain.l4, meta, bytes, now),
            FoundV4::Unsure => {
                return self.track_tuple(&key.unpack(), hash, &plain.packet(), meta, now);
            }
        };
        // As after each round of `track_tuple`.
        self.release_nat();
        match round {
            Ok(v) => self.count_tracked(v),
            // A reopen removed the old entry: the packet is looked up again, as in
            // `track_tuple`'s next round.
            Err(Reopen) => self.track_tuple(&key.unpack(), hash, &plain.packet(), meta, now),
        }
    }

    /// Counts a verdict of the common path in [`Stats::tracked`].
    #[inline]
    fn count_tracked(&mut self, v: Verdict) -> Verdict {
        if matches!(v, Verdict::Tracked { .. }) {
            self.stats.tracked += 1;
        }
        v
    }

    #[inline(never)]
    fn create(
        &mut self,
        orig: NewOrig,
        hash: u64,
        l4: &L4,
        meta: &PacketMeta,
        bytes: u64,
        now: u64,
    ) -> Result<Verdict, Reopen> {
        let mut tcp = None;
        let (state, timeout_ns) = match *l4 {
            L4::Tcp(ref t) => match TcpConn::new(&segment_of(t), &self.cfg.tcp) {
                Ok((conn, accept)) => (
                    L4State::Tcp(TcpSummary {
                        state: tcp.insert(conn).state(),
                    }),
                    accept
                        .timeout_ns
                        .unwrap_or(u64::from(self.cfg.tcp.timeouts.syn_sent) * NS),
                ),
                Err(e) => return Ok(self.invalid(Invalid::Tcp(e))),
            },
            L4::Udp { .. } => (
                L4State::Udp {
                    stream_at: now.saturating_add(UDP_STREAM_DELAY_NS),
                },
                u64::from(self.cfg.timeouts.udp) * NS,
            ),
            L4::IcmpQuery { icmp_type, .. } | L4::IcmpOther { icmp_type, .. } => {
                let request = match orig.family() {
                    Family::V4 => icmpv4_is_request(icmp_type),
                    Family::V6 => icmpv6_is_request(icmp_type),
                };
                if !request {
                    return Ok(self.invalid(Invalid::IcmpNotRequest { icmp_type }));
                }
                (L4State::Icmp, u64::from(self.cfg.timeouts.icmp) * NS)
            }
            L4::Ports { .. } | L4::Generic | L4::None | L4::IcmpError { .. } => {
                (L4State::Generic, u64::from(self.cfg.timeouts.generic) * NS)
            }
        };
        let plain = self.nat_live == 0 && self.nat.rules().is_empty();
        let timeout = now.saturating_add(timeout_ns);
        // Without NAT, a packed IPv4 original that `ConnTable::find_v4` reported absent:
        // the reply is its inverse, checked for a clash and stored as words.
        if let (true, NewOrig::V4(key)) = (plain, orig)
            && let Some(reply) = key.invert()
        {
            return Ok(
                match self
                    .table
                    .insert_v4_after_miss(key, reply, hash, timeout, state, now)
                {
                    Ok(slot) => self.created(slot, Status::empty(), tcp, bytes),
                    Err(e) => self.insert_refused(e),
                },
            );
        }
        if !plain {
            // The common case of an IPv4 original on packed values from the decision
            // to the entry's key (`NatEngine::decide_v4`); any other the general way.
            let packed = match orig {
                NewOrig::V4(key) => Some(key),
                NewOrig::Tuple(t) => t.pack_v4(),
            };
            if let Some(key) = packed
                && let Some(decided) = self.nat_decide_v4(key, meta, now)
            {
                return Ok(match decided {
                    Ok((d, reply_hash)) => self.create_v4_decided(
                        key, hash, d, reply_hash, timeout, state, tcp, bytes, now,
                    ),
                    Err(why) => self.invalid(why),
                });
            }
            let tuple = orig.tuple();
            return Ok(match self.nat_decide(&tuple, meta, now) {
                Ok((reply, status, reply_hash)) => self.create_translated(
                    tuple, hash, reply, reply_hash, status, timeout, state, tcp, bytes, now,
                ),
                Err(why) => self.invalid(why),
            });
        }
        let tuple = orig.tuple();
        let reply = match tuple.invert() {
            Ok(r) => r,
            Err(e) => {
                return Ok(self.invalid(Invalid::IcmpNotRequest {
                    icmp_type: e.icmp_type,
                }));
            }
        };
        // Without NAT the original just missed its lookup in `track_tuple`, with
        // nothing inserted since: only the reply needs the clash check. The index hash
        // is the same for a tuple and its inverse.
        match self.table.insert_after_miss(
            tuple,
            hash,
            reply,
            hash,
            Status::empty(),
            timeout,
            state,
            now,
        ) {
            Ok(slot) => Ok(self.created(slot, Status::empty(), tcp, bytes)),
            Err(e) => Ok(self.insert_refused(e)),
        }
    }

    /// The rest of [`Conntrack::create`] after a NAT decision gave the connection of
    /// ORIGINAL tuple `tuple` (index hash `hash`) its `reply` tuple (hash `reply_hash`
    /// when the decision's [`Candidates::chosen`] computed it) and NAT bits `status`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn create_translated(
        &mut self,
        tuple: Tuple,
        hash: u64,
        reply: Tuple,
        reply_hash: Option<u64>,
        status: Status,
        timeout: u64,
        state: L4State,
        tcp: Option<TcpConn>,
        bytes: u64,
        now: u64,
    ) -> Verdict {
        // After a NAT decision both tuples are known free: the original just missed
        // its lookup and `decide` reported the reply free, with nothing inserted since.
        let reply_hash = reply_hash.unwrap_or_else(|| self.table.hash(&reply));
        let inserted = self.table.insert_hashed_unchecked_both(
            tuple, hash, reply, reply_hash, status, timeout, state, now,
        );
        match inserted {
            Ok(slot) => self.created(slot, status, tcp, bytes),
            Err(e) => {
                // The decision holds a by-source reference: give it back.
                self.nat.released(&[tuple, reply], status);
                self.insert_refused(e)
            }
        }
    }

    /// [`Conntrack::create_translated`] after [`NatEngine::decide_v4`] gave the
    /// connection of packed ORIGINAL tuple `key` (index hash `hash`) its decision `d`
    /// (the reply's hash `reply_hash` when [`CandidatesV4::chosen_v4`] computed it).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn create_v4_decided(
        &mut self,
        key: PackedV4,
        hash: u64,
        d: DecisionV4,
        reply_hash: Option<u64>,
        timeout: u64,
        state: L4State,
        tcp: Option<TcpConn>,
        bytes: u64,
        now: u64,
    ) -> Verdict {
        // As in `create_translated`: both tuples are known free.
        let reply_hash = reply_hash.unwrap_or_else(|| self.table.hasher().pair_hash_v4(d.reply));
        let inserted = self.table.insert_v4_unchecked(
            key, hash, d.reply, reply_hash, d.status, timeout, state, now,
        );
        match inserted {
            Ok(slot) => self.created(slot, d.status, tcp, bytes),
            Err(e) => {
                self.nat
                    .released(&[key.unpack(), d.reply.unpack()], d.status);
                self.insert_refused(e)
            }
        }
    }

    /// The verdict of a new connection's packet whose insert the table refused.
    fn insert_refused(&mut self, e: InsertError) -> Verdict {
        self.invalid(match e {
            InsertError::TableFull { .. } => Invalid::TableFull,
            InsertError::Clash { .. } => Invalid::InsertClash,
        })
    }

    /// The rest of [`Conntrack::create`] once the connection is in `slot` with NAT bits
    /// `status`: its TCP window state, the first packet's counters, the verdict.
    #[inline]
    fn created(&mut self, slot: Slot, status: Status, tcp: Option<TcpConn>, bytes: u64) -> Verdict {
        if status.intersects(Status::SRC_NAT | Status::DST_NAT) {
            self.nat_live += 1;
        }
        if let Some(tcp) = tcp {
            self.tcp.put(slot, tcp);
        }
        // The first packet's counts, on the entry in hand (as `existing` does).
        if !self
            .table
            .get_mut(slot)
            .is_some_and(|e| e.count_low(Dir::Original, 1, bytes))
        {
            self.table.count(slot, Dir::Original, 1, bytes);
        }
        self.stats.created += 1;
        Verdict::Tracked {
            slot,
            dir: Dir::Original,
            info: CtInfo::New,
            created: true,
        }
    }

    /// [`Conntrack::nat_decide`] on packed values ([`NatEngine::decide_v4`]): `None`
    /// when the decision is not the common case (nothing changed).
    #[inline]
    fn nat_decide_v4(
        &mut self,
        key: PackedV4,
        meta: &PacketMeta,
        now: u64,
    ) -> Option<Result<(DecisionV4, Option<u64>), Invalid>> {
        let Self { nat, table, .. } = self;
        let live = (!table.has_nat_released()).then(|| table.len());
        let mut candidates = NatCandidates {
            table,
            now,
            chosen: None,
        };
        let decided = nat.decide_v4(key, meta, live, &mut candidates)?;
        let chosen = candidates.chosen;
        Some(match decided {
            Ok(d) => Ok((d, chosen)),
            Err(e) => Err(self.nat_refused(e)),
        })
    }

    /// The verdict's reason for a NAT decision that failed, counted.
    fn nat_refused(&mut self, e: NatError) -> Invalid {
        match e {
            NatError::NotInvertible(e) => Invalid::IcmpNotRequest {
                icmp_type: e.icmp_type,
            },
            NatError::Exhausted { rule, .. } => {
                self.stats.nat_exhausted += 1;
                Invalid::NatExhausted { rule }
            }
            NatError::NoMasqueradeAddress { rule } => {
                self.stats.nat_no_address += 1;
                Invalid::NatNoAddress { rule }
            }
        }
    }

    /// [`NatEngine::decide`] for a new connection: its reply tuple and status bits.
    fn nat_decide(
        &mut self,
        tuple: &Tuple,
        meta: &PacketMeta,
        now: u64,
    ) -> Result<(Tuple, Status, Option<u64>), Invalid> {
        let Self { nat, table, .. } = self;
        // With every removal released, the engine may know a candidate free without
        // the table (`NatEngine::decide_in`).
        let live = (!table.has_nat_released()).then(|| table.len());
        let mut candidates = NatCandidates {
            table,
            now,
            chosen: None,
        };
        match nat.decide_in(tuple, meta, live, &mut candidates) {
            // `chosen` is told the reply of a source binding, the one the decision
            // returns (checked in debug builds by the insert).
            Ok(d) => Ok((d.reply, d.status, candidates.chosen)),
            Err(e) => Err(self.nat_refused(e)),
        }
    }

    /// A packet (transport layer `l4`, IP length `bytes`) of the connection in `slot`,
    /// travelling in direction `dir`: the protocol handler, flags, counters, timeout.
    #[inline(always)]
    fn existing(
        &mut self,
        slot: Slot,
        dir: Dir,
        l4: &L4,
        bytes: u64,
        now: u64,
    ) -> Result<Verdict, Reopen> {
        let t = self.cfg.timeouts;
        let Some(conn) = self.table.get_mut(slot) else {
            return Ok(self.invalid(Invalid::InsertClash));
        };
        let seen_reply = conn.status.contains(Status::SEEN_REPLY);
        let info = CtInfo::of(dir, seen_reply);
        // What the protocol handler decided: a new relative timeout (None = keep),
        // whether to set ASSURED, whether to delete the entry after the packet.
        let handled = match (conn.proto, l4) {
            (L4State::Tcp(_), L4::Tcp(segment)) => {
                match self.tcp_handler(slot, dir, segment, now)? {
                    Ok(h) => h,
                    Err(verdict) => return Ok(verdict),
                }
            }
            (L4State::Udp { stream_at }, _) => {
                if seen_reply && now > stream_at {
                    let assure = !conn.status.contains(Status::NAT_CLASH);
                    Handled::refresh(t.udp_stream, assure)
                } else {
                    Handled::refresh(t.udp, false)
                }
            }
            (L4State::Icmp, _) => Handled::refresh(t.icmp, false),
            (L4State::Generic, _) | (L4State::Tcp(_), _) => Handled::refresh(t.generic, false),
        };
        let Some(conn) = self.table.get_mut(slot) else {
            return Ok(self.invalid(Invalid::InsertClash));
        };
        if handled.assure {
            conn.status.insert(Status::ASSURED);
        }
        // SEEN_REPLY is set after the handler ran on a reply-direction packet (the
        // handler saw it clear on the first reply). Ignored TCP packets set it too.
        if dir == Dir::Reply {
            conn.status.insert(Status::SEEN_REPLY);
        }
        let status = conn.status;
        // The common case on the entry in hand: low counters that do not pass 2^32 - 1,
        // a timeout that does not move earlier; the rest through the table.
        let counted = !handled.count || conn.count_low(dir, 1, bytes);
        let fixed = status.contains(Status::FIXED_TIMEOUT);
        let timeout = match (handled.timeout_ns, fixed || handled.delete) {
            // Like Linux, a refresh writes the new timeout only: the timer wheel is
            // touched when the timeout moves earlier (see `ConnTable::set_timeout`).
            (Some(ns), false) => Some(now.saturating_add(ns)).filter(|&t| !conn.extend_timeout(t)),
            _ => None,
        };
        if !counted {
            self.table.count(slot, dir, 1, bytes);
        }
        if handled.delete {
            if status.intersects(Status::SRC_NAT | Status::DST_NAT) {
                self.closed = self.table.tuples(slot).map(|t| (t, status));
            }
            self.table.remove(slot, RemoveReason::Closed);
        } else if let Some(t) = timeout {
            self.table.set_timeout(slot, t);
        }
        Ok(Verdict::Tracked {
            slot,
            dir,
            info,
            created: false,
        })
    }

    /// [`Conntrack::existing`] of a UDP datagram when the connection in `slot` is a
    /// UDP one (the established path's common case), with only what UDP does: the
    /// stream check, the flags, the low counters and the timeout, reading just the two
    /// UDP timeouts. `None` (nothing changed) for any other entry or none: then
    /// [`Conntrack::existing`] decides, as before.
    #[inline(always)]
    fn existing_udp(&mut self, slot: Slot, dir: Dir, bytes: u64, now: u64) -> Option<Verdict> {
        let (udp, udp_stream) = (self.cfg.timeouts.udp, self.cfg.timeouts.udp_stream);
        let conn = self.table.get_mut(slot)?;
        let L4State::Udp { stream_at } = conn.proto else {
            return None;
        };
        let seen_reply = conn.status.contains(Status::SEEN_REPLY);
        let info = CtInfo::of(dir, seen_reply);
        // As `existing` with `Handled::refresh`: counted, never deleted.
        let secs = if seen_reply && now > stream_at {
            if !conn.status.contains(Status::NAT_CLASH) {
                conn.status.insert(Status::ASSURED);
            }
            udp_stream
        } else {
            udp
        };
        if dir == Dir::Reply {
            conn.status.insert(Status::SEEN_REPLY);
        }
        let counted = conn.count_low(dir, 1, bytes);
        let timeout = if conn.status.contains(Status::FIXED_TIMEOUT) {
            None
        } else {
            Some(now.saturating_add(u64::from(secs) * NS)).filter(|&t| !conn.extend_timeout(t))
        };
        if !counted {
            self.table.count(slot, dir, 1, bytes);
        }
        if let Some(t) = timeout {
            self.table.set_timeout(slot, t);
        }
        Some(Verdict::Tracked {
            slot,
            dir,
            info,
            created: false,
        })
    }

    /// The TCP handler of an existing TCP connection (state machine and window
    /// tracking): what to do with the entry, or the packet's verdict when it is
    /// invalid, or [`Reopen`]. Out of line: the UDP path stays small.
    #[inline(never)]
    fn tcp_handler(
        &mut self,
        slot: Slot,
        dir: Dir,
        segment: &TcpInfo,
        now: u64,
    ) -> Result<Result<Handled, Verdict>, Reopen> {
        let Self {
            cfg, table, tcp, ..
        } = self;
        let Some(conn) = table.get_mut(slot) else {
            return Ok(Err(self.invalid(Invalid::InsertClash)));
        };
        let status = ConnStatus {
            seen_reply: conn.status.contains(Status::SEEN_REPLY),
            assured: conn.status.contains(Status::ASSURED),
            fixed_timeout: conn.status.contains(Status::FIXED_TIMEOUT),
            remaining_ns: conn.remaining(now),
        };
        // Every TCP entry has its state stored (only this crate makes a
        // `TcpSummary`); a missing one is refused, never guessed.
        let Some(window) = tcp.get_mut(slot) else {
            return Ok(Err(self.invalid(Invalid::InsertClash)));
        };
        let outcome = window.packet(dir, &segment_of(segment), status, &cfg.tcp);
        conn.proto = L4State::Tcp(TcpSummary {
            state: window.state(),
        });
        Ok(Ok(match outcome {
            TcpOutcome::Accept(a) => Handled {
                timeout_ns: a.timeout_ns,
                assure: a.set_assured,
                delete: a.delete_now,
                count: true,
            },
            TcpOutcome::Ignore(_) => {
                self.stats.tcp_ignored += 1;
                Handled {
                    timeout_ns: None,
                    assure: false,
                    delete: false,
                    count: false,
                }
            }
            TcpOutcome::Invalid {
                reason,
                shrink_timeout_ns,
            } => {
                if let Some(ns) = shrink_timeout_ns {
                    self.table.set_timeout(slot, now.saturating_add(ns));
                }
                return Ok(Err(self.invalid(Invalid::Tcp(reason))));
            }
            TcpOutcome::Reopen => {
                // The packet is tracked again and belongs to the new entry.
                self.table.remove(slot, RemoveReason::Closed);
                return Err(Reopen);
            }
        }))
    }

    /// ICMP error: find the connection of the quoted packet (§6).
    fn related(
        &mut self,
        pkt: &ParsedPacket,
        frame: &[u8],
        zone: u16,
        family: Family,
        now: u64,
    ) -> Verdict {
        let inner = match wire::parse_inner(frame, pkt) {
            Ok(i) => i,
            Err(e) => return self.invalid(Invalid::IcmpErrorQuote(e)),
        };
        if inner.fragment == Fragment::NonFirst {
            return self.invalid(Invalid::IcmpErrorNoMatch);
        }
        let quoted = tuple_of(
            family,
            inner.src,
            inner.dst,
            inner.protocol,
            &inner.l4,
            zone,
        );
        let Ok(wanted) = quoted.invert() else {
            return self.invalid(Invalid::IcmpErrorNoMatch);
        };
        // RELATED packets change nothing in the entry: no refresh, no state, no counters.
        let found = self.table.lookup(&wanted, now);
        self.release_nat();
        let Some((slot, dir)) = found else {
            return self.invalid(Invalid::IcmpErrorNoMatch);
        };
        let Some(tuple) = self.table.tuple(slot, dir) else {
            return self.invalid(Invalid::IcmpErrorNoMatch);
        };
        let outer_dst = Addr::from_ip(pkt.dst).0;
        if tuple.dst != outer_dst {
            return self.invalid(Invalid::IcmpErrorSpoofed);
        }
        self.stats.related += 1;
        Verdict::Tracked {
            slot,
            dir,
            info: if dir == Dir::Reply {
                CtInfo::RelatedReply
            } else {
                CtInfo::Related
            },
            created: false,
        }
    }
}

/// The TCP handler asked to delete the entry and look the packet up again.
struct Reopen;

/// The table as a NAT decision sees it ([`NatEngine::decide_in`]).
struct NatCandidates<'a> {
    table: &'a mut ConnTable<L4State>,
    now: u64,
    /// The index hash of the reply [`Candidates::chosen`] was told.
    chosen: Option<u64>,
}

impl Candidates for NatCandidates<'_> {
    fn is_taken(&mut self, reply: &Tuple) -> bool {
        self.table.lookup(reply, self.now).is_some()
    }

    /// The chosen reply's index cell, prefetched while the engine records the
    /// binding: the insert probes from it.
    fn chosen(&mut self, reply: &Tuple) {
        let hash = self.table.hash(reply);
        self.table.prefetch_index(hash);
        self.chosen = Some(hash);
    }
}

impl CandidatesV4 for NatCandidates<'_> {
    fn is_taken_v4(&mut self, reply: PackedV4) -> bool {
        self.table.lookup(&reply.unpack(), self.now).is_some()
    }

    /// [`Candidates::chosen`], hashing the packed reply.
    fn chosen_v4(&mut self, reply: PackedV4) {
        let hash = self.table.hasher().pair_hash_v4(reply);
        self.table.prefetch_index(hash);
        self.chosen = Some(hash);
    }
}

/// What a protocol handler decided for a packet of an existing connection.
#[derive(Clone, Copy)]
struct Handled {
    /// The new relative timeout; `None` keeps the current one.
    timeout_ns: Option<u64>,
    /// Set ASSURED.
    assure: bool,
    /// Delete the entry after the packet.
    delete: bool,
    /// Count the packet in the entry's counters.
    count: bool,
}

impl Handled {
    /// Counted, timeout refreshed to `secs`, ASSURED set when `assure`.
    #[inline]
    fn refresh(secs: u32, assure: bool) -> Self {
        Self {
            timeout_ns: Some(u64::from(secs) * NS),
            assure,
            delete: false,
            count: true,
        }
    }
}

impl Conntrack {
    /// [`Conntrack::process`], then NAT: when the packet's connection is translated,
    /// the frame is rewritten in place to look like the inverse of the other
    /// direction's tuple (a RELATED ICMP error has its quoted packet translated too).
    /// `meta` is what NAT rules match on when the packet creates a connection (the
    /// egress address is what masquerade translates to).
    pub fn process_mut(
        &mut self,
        frame: &mut [u8],
        zone: u16,
        meta: &PacketMeta,
        now: u64,
    ) -> NatVerdict {
        self.stats.packets += 1;
        match wire::parse(frame, self.cfg.parse) {
            Ok(pkt) => self.track_parsed_mut(&pkt, frame, zone, meta, now),
            Err(e) => {
                self.stats.malformed[e.reason().index()] += 1;
                NatVerdict {
                    verdict: self.invalid(Invalid::Malformed(e)),
                    nat: NatOutcome::Unchanged,
                }
            }
        }
    }

    /// [`Conntrack::track_parsed_meta`], then the NAT rewrite of
    /// [`Conntrack::process_mut`]. `pkt` must be the parse of `frame`.
    pub fn track_parsed_mut(
        &mut self,
        pkt: &ParsedPacket,
        frame: &mut [u8],
        zone: u16,
        meta: &PacketMeta,
        now: u64,
    ) -> NatVerdict {
        self.closed = None;
        let verdict = self.track_parsed_meta(pkt, frame, zone, meta, now);
        let nat = self.nat_rewrite(&verdict, pkt, frame);
        NatVerdict { verdict, nat }
    }

    /// The NAT step of an IPv4 packet at `at` in `frame` (transport layer `l4`) when
    /// it needs no [`ParsedPacket`]: `Unchanged` for an untracked or invalid packet and
    /// for a live connection without NAT; `Rewritten` for the common translated packet
    /// (TCP/UDP of a connection translated at one endpoint, rewritten from the entry's
    /// packed tuple, [`rewrite::rewrite_one_endpoint_at`]). `None`, nothing written,
    /// for the rest (a connection the packet closed, tuples aside, an odd header):
    /// then [`Conntrack::nat_rewrite`] decides.
    #[inline(always)]
    pub(crate) fn nat_rewrite_plain(
        &mut self,
        verdict: &Verdict,
        l4: &L4,
        at: V4Layout,
        frame: &mut [u8],
    ) -> Option<NatOutcome> {
        let Verdict::Tracked { slot, dir, .. } = *verdict else {
            return Some(NatOutcome::Unchanged);
        };
        let e = self.table.entry(slot)?;
        if !e.status.intersects(Status::SRC_NAT | Status::DST_NAT) {
            return Some(NatOutcome::Unchanged);
        }
        // The endpoint to write straight from the key; else from the other
        // direction's tuple (the same bytes).
        let written = match e.translated(dir) {
            // A copy of the rewrite for each endpoint: its offsets are then constants.
            Some(to) if to.src => rewrite::rewrite_endpoint_at(frame, l4, at, to.with_src(true)),
            Some(to) => rewrite::rewrite_endpoint_at(frame, l4, at, to.with_src(false)),
            None => {
                let other = e.packed_tuple(dir.opposite())?;
                rewrite::rewrite_one_endpoint_at(frame, l4, at, other, e.status, dir)
            }
        };
        if !written {
            return None;
        }
        self.stats.nat_rewritten += 1;
        Some(NatOutcome::Rewritten)
    }

    /// The NAT step after tracking: rewrite `frame` if its connection is translated.
    #[inline]
    pub(crate) fn nat_rewrite(
        &mut self,
        verdict: &Verdict,
        pkt: &ParsedPacket,
        frame: &mut [u8],
    ) -> NatOutcome {
        if pkt.l3 == L3::Ipv4
            && let Some(nat) = self.nat_rewrite_plain(verdict, &pkt.l4, V4Layout::of(pkt), frame)
        {
            return nat;
        }
        self.nat_rewrite_general(verdict, pkt, frame)
    }

    /// [`Conntrack::nat_rewrite`] past [`Conntrack::nat_rewrite_plain`] (which gave
    /// `None`, or does not apply): ICMP errors, IPv6, tuples aside, a connection the
    /// packet closed.
    pub(crate) fn nat_rewrite_general(
        &mut self,
        verdict: &Verdict,
        pkt: &ParsedPacket,
        frame: &mut [u8],
    ) -> NatOutcome {
        let Verdict::Tracked { slot, dir, .. } = *verdict else {
            return NatOutcome::Unchanged;
        };
        let nat_bits = Status::SRC_NAT | Status::DST_NAT;
        let result = match self.table.entry(slot).map(|e| e.status) {
            // An ICMP error needs both tuples; any other packet only the other
            // direction's (which a translated IPv4 entry holds: no side store read).
            Some(status) if status.intersects(nat_bits) => match pkt.l4 {
                L4::IcmpError { .. } => match self.table.tuples(slot) {
                    Some(tuples) => rewrite::rewrite(frame, pkt, &tuples, status, dir),
                    None => return NatOutcome::Unchanged,
                },
                _ => match self.table.tuple(slot, dir.opposite()) {
                    Some(other) => rewrite::rewrite_to_inverse(frame, pkt, &other, status, dir),
                    None => return NatOutcome::Unchanged,
                },
            },
            Some(_) => return NatOutcome::Unchanged,
            // The packet closed its connection (TCP RST): it still goes out translated.
            None => match self.closed.take() {
                Some((tuples, status)) => rewrite::rewrite(frame, pkt, &tuples, status, dir),
                None => return NatOutcome::Unchanged,
            },
        };
        match result {
            Ok(()) => {
                self.stats.nat_rewritten += 1;
                NatOutcome::Rewritten
            }
            Err(e) => {
                self.stats.nat_rewrite_failed += 1;
                NatOutcome::Drop(e)
            }
        }
    }
}

mod batch;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod nat_tests;

mod offload;
mod query;

pub use offload::{NotOffloadable, Teardown};
pub use query::{DeleteError, Filter, Prefix};
