//! The software forwarder's XDP flow offload (`[backend.af_xdp] flow_offload = true`):
//! established connections go into the AF_XDP ports' flow table
//! ([`crate::port::af_xdp::FlowTable`]), where the XDP program NATs and forwards their
//! packets without the forwarding loop; the connection stays in conntrack, which this
//! module keeps in step with the table. It is the software backend's "hardware", and
//! keeps the design's invariants the way the device offload does:
//!
//! - **Eligibility** (after each batch, for the connections its packets touched): the
//!   hardware policy's rules ([`crate::dataplane::policy::decide`]): TCP ESTABLISHED and
//!   ASSURED, UDP with a reply, no NAT clash ([`Conntrack::offload_check`]); IPv4, zone
//!   0; both directions routed through the gateway (not to its own addresses). A
//!   direction whose next hop's MAC is not resolved yet stays in software until a later
//!   packet of it finds it resolved. The connection is marked with
//!   [`Conntrack::mark_offloaded`] and `HW_OFFLOAD`.
//! - **Entries** ([`flow_entries`], pure): per direction, the key the packet carries on
//!   the wire (arriving on the port that routes to its source: symmetric routing, as the
//!   device rule assumes) and the rewrite that makes it leave as the inverse of the other
//!   direction's tuple, with the RFC 1624 deltas of that rewrite and the TTL decrement.
//! - **Teardown seen** (invariant 4): the program hands TCP SYN/FIN/RST to the slow
//!   path; a TCP connection that has left ESTABLISHED after a batch loses its entries and
//!   is returned ([`Teardown::Returned`]: the state machine saw the packet).
//! - **Sync** (every poll round, a bounded number of flows; one pass over all of them
//!   per [`XdpOffloadConfig::sync_interval_ns`]): the entries' packet and byte counters are
//!   added to conntrack as deltas ([`Conntrack::add_external_counts`]: each packet
//!   counted once, invariant 3); a flow whose `last_seen` moved is kept alive
//!   ([`Conntrack::keep_alive`], invariant 1); one idle for
//!   [`XdpOffloadConfig::idle_ns`] (30 s, as Linux flowtable) loses its entries and is
//!   returned ([`Teardown::Idle`]: its timeout becomes what software would have left).
//! - **Delete before free** (invariant 2): an offloaded connection's timeout is a day
//!   ahead and kept there while it is active, so GC does not free it; entries are deleted
//!   (synchronously, `bpf(2)`) before the connection is returned, taken out with their
//!   last counters in the same call ([`FlowTable::take`]), so no forwarded packet goes
//!   uncounted. The API's delete, drain and flush release the connection first
//!   ([`SharedXdpOffload`] as its [`FlowCarrier`], under the table's lock like the
//!   loop). A connection deleted from the table some other way loses its entries at the
//!   start of the next batch ([`XdpFlowOffload::before_batch`]), before a packet of that
//!   batch can create a connection that reuses its NAT port. A delete that fails keeps
//!   the connection offloaded (so not freed) and is retried at each sync; a gone
//!   connection's entries are retried before every batch.
//! - **Optional** (invariant 5): a full table or any `bpf(2)` error leaves the flow in
//!   software, counted ([`XdpOffloadStats`]) and logged at most once per
//!   [`LOG_INTERVAL_NS`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use ctoffload_fallback_sw::conntrack::{Conntrack, L4State, NotOffloadable, Teardown};
use ctoffload_fallback_sw::table::{Counter, Slot, Status};
use ctoffload_fallback_sw::tcp::TcpState;
use ctoffload_fallback_sw::tuple::{Dir, Family, Tuple, proto};

use super::Gateway;
use crate::api::model::ReturnReason;
use crate::api::software::{CarrierEvent, FlowCarrier};
use crate::port::af_xdp::flow_prog::{
    FlowEntry, FlowKey, csum_add, csum_delta, ttl_decrement_delta,
};
use crate::port::af_xdp::{AnyPort, FlowTable};

/// Errors are logged at most once per this many ns (the table's clock).
pub const LOG_INTERVAL_NS: u64 = 10_000_000_000;

/// Timing of the offload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpOffloadConfig {
    /// A flow with no packet in the XDP table for this long goes back to software
    /// (Linux flowtable: 30 s); its conntrack timeout is then what software would have
    /// left of it ([`Teardown::Idle`]), so a flow idle beyond its state's timeout
    /// expires at once.
    pub idle_ns: u64,
    /// Each flow's counters are read once per this interval (one pass over every
    /// flow, spread over the poll rounds: two `bpf(2)` reads per flow).
    pub sync_interval_ns: u64,
    /// Flows synced per poll round at most (bounds the pause a pass adds to a round).
    pub sync_budget: usize,
}

impl Default for XdpOffloadConfig {
    fn default() -> Self {
        Self {
            idle_ns: 30_000_000_000,
            sync_interval_ns: 5_000_000_000,
            sync_budget: 64,
        }
    }
}

/// What the offload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpOffloadStats {
    /// Connections put into the table.
    pub offloaded: u64,
    /// Directions inserted (a connection has one or two).
    pub entries_inserted: u64,
    /// Inserts refused (table full or another `bpf(2)` error): flow left in software.
    pub insert_failed: u64,
    /// Connections returned because TCP left ESTABLISHED (FIN/RST seen).
    pub returned_closing: u64,
    /// Connections returned after being idle in the table.
    pub returned_idle: u64,
    /// Connections whose entries were removed because conntrack had dropped or
    /// replaced them (or returned them itself).
    pub removed_stale: u64,
    /// Connections taken back by someone else (the API's delete or drain),
    /// [`XdpFlowOffload::release`].
    pub released: u64,
    /// Failed reads or deletes.
    pub bpf_errors: u64,
    /// Entries whose delete failed and is being retried: of connections gone, and
    /// connections kept offloaded until theirs are deleted (invariant 2).
    pub pending_deletes: u64,
    /// Connections in the table now.
    pub active: u64,
}

/// Why a direction has no entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// Not IPv4 TCP/UDP in zone 0.
    #[error("not an IPv4 TCP/UDP connection of zone 0")]
    Unsupported,
    /// The destination (or the source) is not routed, or is the gateway itself.
    #[error("no route through the gateway for {addr:?}")]
    NoRoute {
        /// The address.
        addr: [u8; 4],
    },
    /// The next hop's MAC is not known (yet).
    #[error("next hop {next_hop:?} on port {port} not resolved")]
    Unresolved {
        /// Egress port.
        port: usize,
        /// The neighbour.
        next_hop: [u8; 4],
    },
    /// A port without an interface index.
    #[error("port {port} has no interface")]
    NoInterface {
        /// The port.
        port: usize,
    },
}

/// Where a packet carrying `t` on the wire arrives: the port routing to its source.
fn ingress_of(gw: &Gateway, t: &Tuple) -> Result<usize, EntryError> {
    let src = t.src.as_v4();
    match gw.route(src) {
        Some(h) if !gw.is_own(src) => Ok(h.port),
        _ => Err(EntryError::NoRoute { addr: src }),
    }
}

/// The entry of the direction whose packets carry `this` on the wire and must leave as
/// the inverse of `other`, with the gateway's routes and neighbours at `now`;
/// `ifindex[p]` is port p's interface.
///
/// # Errors
/// [`EntryError`] when the direction cannot be fast-pathed now.
pub fn flow_entry(
    this: &Tuple,
    other: &Tuple,
    gw: &Gateway,
    ifindex: &[u32],
    now: u64,
) -> Result<(FlowKey, FlowEntry), EntryError> {
    if this.family != Family::V4
        || !matches!(this.proto, proto::TCP | proto::UDP)
        || this.zone != 0
        || other.proto != this.proto
    {
        return Err(EntryError::Unsupported);
    }
    let in_port = ingress_of(gw, this)?;
    let (new_src, new_dst) = (other.dst.as_v4(), other.src.as_v4());
    let hop = match gw.route(new_dst) {
        Some(h) if !gw.is_own(new_dst) => h,
        _ => return Err(EntryError::NoRoute { addr: new_dst }),
    };
    let dst_mac =
        gw.neighbours()
            .lookup(hop.port, hop.next_hop, now)
            .ok_or(EntryError::Unresolved {
                port: hop.port,
                next_hop: hop.next_hop,
            })?;
    let src_mac = gw
        .ports()
        .get(hop.port)
        .map(|p| p.mac)
        .ok_or(EntryError::NoInterface { port: hop.port })?;
    let index = |port: usize| {
        ifindex
            .get(port)
            .copied()
            .ok_or(EntryError::NoInterface { port })
    };
    let key = FlowKey {
        ifindex: index(in_port)?,
        src: this.src.as_v4(),
        dst: this.dst.as_v4(),
        sport: this.src_l4.to_be_bytes(),
        dport: this.dst_l4.to_be_bytes(),
        proto: this.proto,
        pad: [0; 3],
    };
    let (new_sport, new_dport) = (other.dst_l4.to_be_bytes(), other.src_l4.to_be_bytes());
    let old_addrs = [key.src, key.dst].concat();
    let new_addrs = [new_src, new_dst].concat();
    let addr_delta = csum_delta(&old_addrs, &new_addrs);
    let port_delta = csum_delta(
        &[key.sport, key.dport].concat(),
        &[new_sport, new_dport].concat(),
    );
    let entry = FlowEntry {
        new_src,
        new_dst,
        new_sport,
        new_dport,
        ip_delta: csum_add(addr_delta, ttl_decrement_delta()),
        l4_delta: csum_add(addr_delta, port_delta),
        out_ifindex: index(hop.port)?,
        dst_mac,
        src_mac,
        ..FlowEntry::default()
    };
    Ok((key, entry))
}

/// The entries of both directions of a connection with `tuples` (indexed by
/// [`Dir::index`]).
pub fn flow_entries(
    tuples: &[Tuple; 2],
    gw: &Gateway,
    ifindex: &[u32],
    now: u64,
) -> [Result<(FlowKey, FlowEntry), EntryError>; 2] {
    [
        flow_entry(&tuples[0], &tuples[1], gw, ifindex, now),
        flow_entry(&tuples[1], &tuples[0], gw, ifindex, now),
    ]
}

/// One direction in the table, with the counters already added to conntrack.
#[derive(Debug, Clone, Copy)]
struct InTable {
    key: FlowKey,
    packets: u64,
    bytes: u64,
    last_seen_ns: u64,
}

impl InTable {
    /// Adds what the program counted in `e` since the last read to `slot`'s `dir` in
    /// conntrack and remembers `e`; whether `last_seen` moved.
    fn fold(&mut self, e: &FlowEntry, ct: &mut Conntrack, slot: Slot, dir: Dir) -> bool {
        let delta = Counter {
            packets: e.packets.saturating_sub(self.packets),
            bytes: e.bytes.saturating_sub(self.bytes),
        };
        if delta.packets > 0 || delta.bytes > 0 {
            ct.add_external_counts(slot, dir, delta);
        }
        let moved = e.last_seen_ns != self.last_seen_ns;
        (self.packets, self.bytes, self.last_seen_ns) = (e.packets, e.bytes, e.last_seen_ns);
        moved
    }
}

/// A connection in the table.
#[derive(Debug, Clone, Copy)]
struct Offloaded {
    id: u64,
    dirs: [Option<InTable>; 2],
    /// Table-clock time of the last activity seen (insert, or `last_seen` moving).
    active_at: u64,
    /// Being returned, as this says, but an entry could not be deleted yet: the
    /// connection stays offloaded (GC and the API's delete leave it alone, its NAT
    /// binding held: invariant 2) and the delete is retried at each sync.
    leaving: Option<(Teardown, ReturnReason)>,
}

/// The offload (see the module docs).
#[derive(Debug)]
pub struct XdpFlowOffload {
    table: Arc<FlowTable>,
    ifindex: Vec<u32>,
    cfg: XdpOffloadConfig,
    flows: HashMap<Slot, Offloaded>,
    /// The slots of the current sync pass, and the next to visit.
    pass: Vec<Slot>,
    cursor: usize,
    /// When the next pass may start.
    next_pass_at: u64,
    stats: XdpOffloadStats,
    logged_at: Option<u64>,
    unlogged: u64,
    /// Connections deleted from the table outside GC and early drop (the API), as last
    /// seen by [`XdpFlowOffload::before_batch`].
    deleted_seen: u64,
    /// Entries of connections already gone whose delete failed: retried before every
    /// batch.
    undeleted: Vec<FlowKey>,
    /// Connections taken and given back, for the API's journal; `None` (nothing kept)
    /// until [`XdpFlowOffload::report_events`].
    events: Option<Vec<CarrierEvent>>,
}

const DIRS: [Dir; 2] = [Dir::Original, Dir::Reply];

impl XdpFlowOffload {
    /// An offload into `table`, `ifindex[p]` the interface of gateway port p.
    #[must_use]
    pub fn new(table: Arc<FlowTable>, ifindex: Vec<u32>, cfg: XdpOffloadConfig) -> Self {
        Self {
            table,
            ifindex,
            cfg,
            flows: HashMap::new(),
            pass: Vec::new(),
            cursor: 0,
            next_pass_at: 0,
            stats: XdpOffloadStats::default(),
            logged_at: None,
            unlogged: 0,
            deleted_seen: 0,
            undeleted: Vec::new(),
            events: None,
        }
    }

    /// From now on keeps a record of the connections it takes and gives back, for
    /// [`FlowCarrier::drain_events`] (who reports must drain: the record grows until
    /// then).
    pub fn report_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    fn event(&mut self, e: CarrierEvent) {
        if let Some(events) = self.events.as_mut() {
            events.push(e);
        }
    }

    /// The offload over `ports` (gateway port i is `ports[i]`): `None` unless every
    /// port is AF_XDP with the same flow table ([`crate::port::af_xdp::AfXdpConfig`]'s
    /// `flow_table_entries`).
    #[must_use]
    pub fn for_ports(ports: &[AnyPort], cfg: XdpOffloadConfig) -> Option<Self> {
        let table = Arc::clone(ports.first()?.flow_table()?);
        let mut ifindex = Vec::with_capacity(ports.len());
        for p in ports {
            match p {
                AnyPort::AfXdp(x) if x.flow_table().is_some_and(|t| Arc::ptr_eq(t, &table)) => {
                    ifindex.push(x.ifindex());
                }
                _ => return None,
            }
        }
        Some(Self::new(table, ifindex, cfg))
    }

    /// The flow table.
    #[must_use]
    pub fn table(&self) -> &Arc<FlowTable> {
        &self.table
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> XdpOffloadStats {
        let leaving = self.flows.values().filter(|o| o.leaving.is_some()).count();
        XdpOffloadStats {
            active: u64::try_from(self.flows.len()).unwrap_or(u64::MAX),
            pending_deletes: u64::try_from(self.undeleted.len() + leaving).unwrap_or(u64::MAX),
            ..self.stats
        }
    }

    /// Whether the connection in `slot` has entries in the table.
    #[must_use]
    pub fn contains(&self, slot: Slot) -> bool {
        self.flows.contains_key(&slot)
    }

    fn log(&mut self, what: &str, err: &dyn std::fmt::Display, now: u64) {
        self.unlogged += 1;
        if self
            .logged_at
            .is_none_or(|t| now.saturating_sub(t) >= LOG_INTERVAL_NS)
        {
            tracing::warn!(error = %err, since_last = self.unlogged, "XDP flow offload: {what}");
            self.logged_at = Some(now);
            self.unlogged = 0;
        }
    }

    /// Before a batch's packets: when connections were deleted since the last batch by
    /// someone else (the API's delete or flush: the table's `deleted` count moved; a
    /// protocol close does not count), the entries of every offloaded connection that
    /// is gone are deleted now, before a packet of this batch can create a connection
    /// that reuses its NAT port (invariant 2; O(offloaded flows), only after such
    /// deletes).
    pub fn before_batch(&mut self, ct: &mut Conntrack, now: u64) {
        if !self.undeleted.is_empty() {
            let table = Arc::clone(&self.table);
            self.undeleted.retain(|k| table.remove(k).is_err());
        }
        let deleted = ct.table().stats().deleted;
        if deleted == self.deleted_seen {
            return;
        }
        self.deleted_seen = deleted;
        let gone: Vec<(Slot, Offloaded)> = self
            .flows
            .iter()
            .filter(|(s, o)| ct.table().get_checked(**s, o.id).is_none())
            .map(|(&s, &o)| (s, o))
            .collect();
        for (slot, o) in gone {
            self.drop_entries(slot, &o, now);
            self.stats.removed_stale += 1;
        }
    }

    /// After a batch: offloads the eligible connections among `tracked`, adds missing
    /// directions, and returns the TCP ones that left ESTABLISHED.
    pub fn after_batch(&mut self, ct: &mut Conntrack, tracked: &[Slot], gw: &Gateway, now: u64) {
        for &slot in tracked {
            if let Some(o) = self.flows.get(&slot).copied() {
                let Some(conn) = ct.table().get_checked(slot, o.id) else {
                    self.drop_entries(slot, &o, now);
                    self.stats.removed_stale += 1;
                    continue;
                };
                if o.leaving.is_some() {
                    continue; // the sync retries
                }
                let established = match conn.proto {
                    L4State::Tcp(t) => t.state() == TcpState::Established,
                    _ => true,
                };
                if !established {
                    self.retire(
                        ct,
                        slot,
                        &o,
                        (Teardown::Returned, ReturnReason::Teardown),
                        now,
                    );
                    self.stats.returned_closing += 1;
                } else if o.dirs.iter().any(Option::is_none) {
                    self.insert(ct, slot, gw, now);
                }
                continue;
            }
            self.offload(ct, slot, gw, now);
        }
    }

    fn offload(&mut self, ct: &mut Conntrack, slot: Slot, gw: &Gateway, now: u64) {
        let Some(conn) = ct.table().get(slot) else {
            return;
        };
        match ct.offload_check(slot) {
            Ok(()) | Err(NotOffloadable::AlreadyOffloaded) => {}
            Err(_) => return,
        }
        // Marked offloaded by someone else (the API's policy) does not make a
        // connection that has left ESTABLISHED eligible: its teardown is on the way.
        if let L4State::Tcp(t) = conn.proto
            && t.state() != TcpState::Established
        {
            return;
        }
        if conn.tuples[0].proto == proto::UDP && !conn.status.contains(Status::SEEN_REPLY) {
            return;
        }
        self.flows.insert(
            slot,
            Offloaded {
                id: conn.id,
                dirs: [None, None],
                active_at: now,
                leaving: None,
            },
        );
        if !self.insert(ct, slot, gw, now) {
            self.flows.remove(&slot);
            return;
        }
        if !conn.status.contains(Status::OFFLOAD) && ct.mark_offloaded(slot, now).is_err() {
            if let Some(o) = self.flows.remove(&slot) {
                self.drop_entries(slot, &o, now);
            }
            return;
        }
        ct.set_hw_offloaded(slot, true);
        self.stats.offloaded += 1;
        self.event(CarrierEvent::Carried {
            id: conn.id,
            original: conn.tuples[0],
            marked: !conn.status.contains(Status::OFFLOAD),
        });
    }

    /// Inserts the directions of `slot` not in the table yet; whether it has any now.
    fn insert(&mut self, ct: &Conntrack, slot: Slot, gw: &Gateway, now: u64) -> bool {
        let (Some(tuples), Some(mut o)) = (ct.table().tuples(slot), self.flows.get(&slot).copied())
        else {
            return false;
        };
        let entries = flow_entries(&tuples, gw, &self.ifindex, now);
        for (d, e) in entries.into_iter().enumerate() {
            if o.dirs[d].is_some() {
                continue;
            }
            let Ok((key, entry)) = e else { continue };
            match self.table.insert(&key, &entry) {
                Ok(()) => {
                    o.dirs[d] = Some(InTable {
                        key,
                        packets: 0,
                        bytes: 0,
                        last_seen_ns: 0,
                    });
                    self.stats.entries_inserted += 1;
                }
                Err(e) => {
                    self.stats.insert_failed += 1;
                    self.log("insert failed, the flow stays in software", &e, now);
                }
            }
        }
        self.flows.insert(slot, o);
        o.dirs.iter().any(Option::is_some)
    }

    /// Deletes the entries of `o` from the table and forgets it; an entry whose delete
    /// fails is retried before each batch.
    fn drop_entries(&mut self, slot: Slot, o: &Offloaded, now: u64) {
        for d in o.dirs.iter().flatten() {
            if let Err(e) = self.table.remove(&d.key) {
                self.stats.bpf_errors += 1;
                self.log("delete failed, retried", &e, now);
                self.undeleted.push(d.key);
            }
        }
        self.flows.remove(&slot);
    }

    /// Takes the entries of `slot` (`o`) out of the table, each with its last counters
    /// in the same `bpf(2)` call (`BPF_MAP_LOOKUP_AND_DELETE_ELEM`), adds those to
    /// conntrack, and forgets the flow: every packet the program forwarded is counted
    /// (invariant 3). An entry that cannot be taken is read and deleted instead. Whether
    /// every entry is gone; if not, the flow stays with the entries left.
    fn take_entries(&mut self, ct: &mut Conntrack, slot: Slot, o: &Offloaded, now: u64) -> bool {
        let mut left = *o;
        for (d, dir) in left.dirs.iter_mut().zip(DIRS) {
            let Some(mut entry) = *d else { continue };
            match self.table.take(&entry.key) {
                Ok(Some(e)) => {
                    entry.fold(&e, ct, slot, dir);
                    *d = None;
                }
                Ok(None) => *d = None,
                Err(e) => {
                    self.stats.bpf_errors += 1;
                    self.log("taking an entry failed", &e, now);
                    if let Ok(Some(e)) = self.table.read(&entry.key) {
                        entry.fold(&e, ct, slot, dir);
                    }
                    match self.table.remove(&entry.key) {
                        Ok(_) => *d = None,
                        Err(e) => {
                            self.stats.bpf_errors += 1;
                            self.log("delete failed, retried", &e, now);
                            *d = Some(entry);
                        }
                    }
                }
            }
        }
        if left.dirs.iter().all(Option::is_none) {
            self.flows.remove(&slot);
            true
        } else {
            self.flows.insert(slot, left);
            false
        }
    }

    /// Takes `slot`'s entries out and returns the connection to software as `how`
    /// says; when an entry cannot be deleted, the connection stays offloaded and the
    /// sync retries (invariant 2: its NAT binding is not freed while the program may
    /// still rewrite to it). Whether it was returned.
    fn retire(
        &mut self,
        ct: &mut Conntrack,
        slot: Slot,
        o: &Offloaded,
        how: (Teardown, ReturnReason),
        now: u64,
    ) -> bool {
        if self.take_entries(ct, slot, o, now) {
            // Reported only when this return is what takes OFFLOAD off (the control
            // plane counts the offloaded flows by it).
            let returned = ct
                .table()
                .get(slot)
                .filter(|c| c.status.contains(Status::OFFLOAD))
                .map(|c| c.tuples[0]);
            ct.teardown(slot, how.0, now);
            if let Some(original) = returned {
                self.event(CarrierEvent::Returned {
                    id: o.id,
                    original,
                    reason: how.1,
                });
            }
            return true;
        }
        if let Some(left) = self.flows.get_mut(&slot) {
            left.leaving = Some(how);
        }
        false
    }

    /// Someone else takes `slot`'s connection back from the table (the API deletes or
    /// drains it): its entries leave the table now, their last counts folded into
    /// conntrack first, so that what the API reports of it, and its destroy event,
    /// count every packet; `HW_OFFLOAD` is cleared. The caller returns the connection
    /// (`OFFLOAD`) itself. `false` when an entry could not be deleted: the connection
    /// must stay offloaded then (the sync retries, and returns it once its entries are
    /// gone). Nothing happens for a slot not in the table.
    pub fn release(&mut self, ct: &mut Conntrack, slot: Slot, now: u64) -> bool {
        let Some(o) = self.flows.get(&slot).copied() else {
            return true;
        };
        if ct.table().get_checked(slot, o.id).is_none() {
            self.drop_entries(slot, &o, now);
            self.stats.removed_stale += 1;
            return true;
        }
        if !self.take_entries(ct, slot, &o, now) {
            if let Some(left) = self.flows.get_mut(&slot) {
                left.leaving = Some((Teardown::Returned, ReturnReason::Delete));
            }
            return false;
        }
        ct.set_hw_offloaded(slot, false);
        self.stats.released += 1;
        true
    }

    /// Adds what the program counted since the last read to conntrack; whether the
    /// flow's `last_seen` moved.
    fn fold_counts(&mut self, ct: &mut Conntrack, slot: Slot, now: u64) -> bool {
        let Some(mut o) = self.flows.get(&slot).copied() else {
            return false;
        };
        let mut moved = false;
        for (d, dir) in o.dirs.iter_mut().zip(DIRS) {
            let Some(d) = d else { continue };
            match self.table.read(&d.key) {
                Ok(Some(e)) => moved |= d.fold(&e, ct, slot, dir),
                Ok(None) => {}
                Err(e) => {
                    self.stats.bpf_errors += 1;
                    self.log("reading counters failed", &e, now);
                }
            }
        }
        if moved {
            o.active_at = now;
        }
        self.flows.insert(slot, o);
        moved
    }

    /// Syncs up to the budget of flows due (see the module docs).
    pub fn sync(&mut self, ct: &mut Conntrack, now: u64) {
        if self.cursor >= self.pass.len() {
            // A new pass over every flow, at most once per interval: the pass is
            // O(flows), the rounds in between only visit their budget.
            if now < self.next_pass_at {
                return;
            }
            self.pass.clear();
            self.pass.extend(self.flows.keys().copied());
            self.cursor = 0;
            self.next_pass_at = now.saturating_add(self.cfg.sync_interval_ns);
        }
        let end = self
            .cursor
            .saturating_add(self.cfg.sync_budget)
            .min(self.pass.len());
        for i in self.cursor..end {
            let slot = self.pass[i];
            self.sync_one(ct, slot, now);
        }
        self.cursor = end;
    }

    /// Syncs every flow now (tests, shutdown).
    pub fn sync_all(&mut self, ct: &mut Conntrack, now: u64) {
        let slots: Vec<Slot> = self.flows.keys().copied().collect();
        for slot in slots {
            self.sync_one(ct, slot, now);
        }
    }

    fn sync_one(&mut self, ct: &mut Conntrack, slot: Slot, now: u64) {
        let Some(o) = self.flows.get(&slot).copied() else {
            return;
        };
        if let Some(how) = o.leaving {
            if ct.table().get_checked(slot, o.id).is_some() {
                self.retire(ct, slot, &o, how, now);
            } else {
                self.drop_entries(slot, &o, now);
            }
            return;
        }
        let live = ct
            .table()
            .get_checked(slot, o.id)
            .filter(|c| c.status.contains(Status::OFFLOAD));
        if live.is_none() {
            // Gone, replaced, or returned by someone else (the API): the entries go.
            if ct.table().get_checked(slot, o.id).is_some() {
                self.fold_counts(ct, slot, now);
            }
            self.drop_entries(slot, &o, now);
            self.stats.removed_stale += 1;
            return;
        }
        if self.fold_counts(ct, slot, now) {
            ct.keep_alive(slot, now);
            return;
        }
        let idle = now.saturating_sub(o.active_at);
        if idle >= self.cfg.idle_ns {
            // Taken with their counts: a packet since the read above is not lost (nor
            // is the flow idle then, but it is in software again and stays there).
            let how = (Teardown::Idle { idle_ns: idle }, ReturnReason::Idle);
            self.retire(ct, slot, &o, how, now);
            self.stats.returned_idle += 1;
        } else {
            ct.keep_alive(slot, now);
        }
    }

    /// Removes every entry (the forwarder stops): the flows stay in conntrack,
    /// returned to software (one whose entry cannot be deleted stays offloaded).
    pub fn clear(&mut self, ct: &mut Conntrack, now: u64) {
        let all: Vec<(Slot, Offloaded)> = self.flows.iter().map(|(&s, &o)| (s, o)).collect();
        for (slot, o) in all {
            if ct.table().get_checked(slot, o.id).is_none() {
                self.drop_entries(slot, &o, now);
                self.stats.removed_stale += 1;
                continue;
            }
            self.retire(ct, slot, &o, (Teardown::Returned, ReturnReason::Drain), now);
        }
    }
}

/// An [`XdpFlowOffload`] shared by the forwarding loop (which locks it for each of its
/// rounds, inside the table's lock) and the control plane (which releases a connection
/// through it, [`FlowCarrier`], also under the table's lock: one lock order).
#[derive(Debug, Clone)]
pub struct SharedXdpOffload(Arc<Mutex<XdpFlowOffload>>);

impl SharedXdpOffload {
    /// Shares `offload`.
    #[must_use]
    pub fn new(offload: XdpFlowOffload) -> Self {
        Self(Arc::new(Mutex::new(offload)))
    }

    /// The offload. A panic while it was held leaves its bookkeeping as the last
    /// completed call left it; the lock is taken anyway (the flows must still be
    /// returned and their entries deleted).
    pub fn lock(&self) -> MutexGuard<'_, XdpFlowOffload> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> XdpOffloadStats {
        self.lock().stats()
    }
}

impl FlowCarrier for SharedXdpOffload {
    fn release(&self, ct: &mut Conntrack, slot: Slot, now: u64) -> bool {
        self.lock().release(ct, slot, now)
    }

    fn drain_events(&self, out: &mut Vec<CarrierEvent>) {
        if let Some(events) = self.lock().events.as_mut() {
            out.append(events);
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::gateway::{GatewayConfig, PortConfig};
    use crate::port::af_xdp::flow_prog::adjust;

    const IN_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
    const OUT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
    const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
    const HOST: [u8; 4] = [10, 0, 0, 2];
    const GW_OUT: [u8; 4] = [192, 0, 2, 1];
    const SERVER: [u8; 4] = [192, 0, 2, 2];

    fn gw() -> Gateway {
        Gateway::new(GatewayConfig {
            ports: vec![
                PortConfig {
                    name: "in".into(),
                    mac: IN_MAC,
                    addrs: vec![([10, 0, 0, 1], 24)],
                },
                PortConfig {
                    name: "out".into(),
                    mac: OUT_MAC,
                    addrs: vec![(GW_OUT, 24)],
                },
            ],
            ..GatewayConfig::default()
        })
        .expect("config")
    }

    fn t(src: ([u8; 4], u16), dst: ([u8; 4], u16), p: u8) -> Tuple {
        Tuple::v4(src.0, src.1, dst.0, dst.1, p)
    }

    fn masqueraded() -> [Tuple; 2] {
        [
            t((HOST, 1234), (SERVER, 53), proto::UDP),
            t((SERVER, 53), (GW_OUT, 40_000), proto::UDP),
        ]
    }

    #[test]
    fn a_masqueraded_connection_gets_both_rewrites() {
        let mut g = gw();
        g.learn_neighbour(0, HOST, HOST_MAC, 0);
        g.learn_neighbour(1, SERVER, SERVER_MAC, 0);
        let [orig, reply] = flow_entries(&masqueraded(), &g, &[11, 12], 1);
        let (k, e) = orig.expect("original direction");
        assert_eq!((k.ifindex, k.src, k.dst, k.proto), (11, HOST, SERVER, 17));
        assert_eq!(
            (k.sport, k.dport),
            (1234u16.to_be_bytes(), 53u16.to_be_bytes())
        );
        assert_eq!((e.new_src, e.new_dst), (GW_OUT, SERVER));
        assert_eq!(
            (e.new_sport, e.new_dport),
            (40_000u16.to_be_bytes(), 53u16.to_be_bytes())
        );
        assert_eq!(
            (e.out_ifindex, e.src_mac, e.dst_mac),
            (12, OUT_MAC, SERVER_MAC)
        );
        let (k, e) = reply.expect("reply direction");
        assert_eq!((k.ifindex, k.src, k.dst), (12, SERVER, GW_OUT));
        assert_eq!(
            (e.new_src, e.new_dst, e.new_dport),
            (SERVER, HOST, 1234u16.to_be_bytes())
        );
        assert_eq!(
            (e.out_ifindex, e.src_mac, e.dst_mac),
            (11, IN_MAC, HOST_MAC)
        );
        // The L4 delta turns a checksum over the old pseudo-header and ports into the
        // one over the new ones (0x1234 stands for the payload's sum).
        let sum = |addrs: [[u8; 4]; 2], ports: [u16; 2]| {
            let mut b = [addrs[0], addrs[1]].concat();
            b.extend_from_slice(&ports[0].to_be_bytes());
            b.extend_from_slice(&ports[1].to_be_bytes());
            let s = b.chunks(2).fold(0x1234u32, |s, c| {
                fold(s + u32::from(u16::from_ne_bytes([c[0], c[1]])))
            });
            !u16::try_from(fold(s)).unwrap_or(0)
        };
        let before = sum([SERVER, GW_OUT], [53, 40_000]);
        let after = sum([SERVER, HOST], [53, 1234]);
        assert_eq!(adjust(before, e.l4_delta), after);
    }

    fn fold(mut s: u32) -> u32 {
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s
    }

    #[test]
    fn unresolved_local_and_unsupported_directions_have_no_entry() {
        let mut g = gw();
        g.learn_neighbour(1, SERVER, SERVER_MAC, 0);
        let [orig, reply] = flow_entries(&masqueraded(), &g, &[11, 12], 1);
        assert!(orig.is_ok(), "the resolved direction");
        assert_eq!(
            reply.map(|_| ()),
            Err(EntryError::Unresolved {
                port: 0,
                next_hop: HOST
            })
        );
        // To the gateway itself: not forwarded.
        let own = [
            t((HOST, 1234), (GW_OUT, 22), proto::TCP),
            t((GW_OUT, 22), (HOST, 1234), proto::TCP),
        ];
        assert_eq!(
            flow_entries(&own, &g, &[11, 12], 1)[0].map(|_| ()),
            Err(EntryError::NoRoute { addr: GW_OUT })
        );
        let mut icmp = masqueraded();
        icmp[0].proto = proto::ICMP;
        icmp[1].proto = proto::ICMP;
        assert_eq!(
            flow_entries(&icmp, &g, &[11, 12], 1)[0].map(|_| ()),
            Err(EntryError::Unsupported)
        );
        assert_eq!(
            flow_entries(&masqueraded(), &g, &[11], 1)[0].map(|_| ()),
            Err(EntryError::NoInterface { port: 1 })
        );
    }

    /// An Ethernet/IPv4/UDP frame.
    fn udp_frame(src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(HOST_MAC, IN_MAC)
            .ipv4(src.0, dst.0, 64)
            .udp(src.1, dst.1)
            .write(&mut f, b"x")
            .expect("frame");
        f
    }

    /// What [`offloaded_udp`] sets up.
    type Fixture = (
        Arc<FlowTable>,
        Conntrack,
        Slot,
        XdpFlowOffload,
        Vec<FlowKey>,
    );

    /// A UDP connection HOST:1234 <-> SERVER:53 (answered) offloaded into a new table:
    /// the table, conntrack, its slot, the offload and the entries' keys; `None` where
    /// BPF maps cannot be created outside CI.
    fn offloaded_udp() -> Option<Fixture> {
        offloaded_udp_reporting(false)
    }

    /// [`offloaded_udp`], the offload reporting events from the start if `report`.
    fn offloaded_udp_reporting(report: bool) -> Option<Fixture> {
        use ctoffload_fallback_sw::conntrack::{Config, Verdict};
        use ctoffload_fallback_sw::nat::PacketMeta;
        let table = match FlowTable::new(16) {
            Ok(t) => Arc::new(t),
            Err(e) if crate::port::af_xdp::bpf_refused_outside_ci(&e) => return None,
            Err(e) => panic!("flow table: {e}"),
        };
        let mut g = gw();
        g.learn_neighbour(0, HOST, HOST_MAC, 0);
        g.learn_neighbour(1, SERVER, SERVER_MAC, 0);
        let mut ct = Conntrack::new(Config::default());
        let meta = |in_port: u32, out_port: u32| PacketMeta {
            in_port,
            out_port: Some(out_port),
            out_addr: None,
        };
        let mut slot = None;
        for (f, m) in [
            (udp_frame((HOST, 1234), (SERVER, 53)), meta(0, 1)),
            (udp_frame((SERVER, 53), (HOST, 1234)), meta(1, 0)),
        ] {
            let mut f = f;
            if let Verdict::Tracked { slot: s, .. } = ct.process_mut(&mut f, 0, &m, 1_000).verdict {
                slot = Some(s);
            }
        }
        let slot = slot.expect("tracked");
        let mut x = XdpFlowOffload::new(
            Arc::clone(&table),
            vec![11, 12],
            XdpOffloadConfig::default(),
        );
        if report {
            x.report_events();
        }
        x.before_batch(&mut ct, 2_000);
        x.after_batch(&mut ct, &[slot], &g, 2_000);
        assert!(x.contains(slot), "{:?}", x.stats());
        let tuples = ct.table().tuples(slot).expect("tuples");
        let keys: Vec<FlowKey> = flow_entries(&tuples, &g, &[11, 12], 2_000)
            .into_iter()
            .map(|e| e.expect("entry").0)
            .collect();
        for k in &keys {
            assert!(table.read(k).expect("read").is_some(), "inserted");
        }
        Some((table, ct, slot, x, keys))
    }

    /// An API delete (return, then delete) between two batches: the next batch's
    /// `before_batch` deletes the entries before any packet is processed.
    #[test]
    fn entries_of_a_connection_deleted_by_the_api_go_before_the_next_batch() {
        let Some((table, mut ct, slot, mut x, keys)) = offloaded_udp() else {
            return;
        };
        // What the API does without releasing: return the connection, then delete it.
        ct.teardown(slot, Teardown::Returned, 3_000);
        assert_eq!(ct.delete(slot), Ok(true));
        x.before_batch(&mut ct, 4_000);
        assert!(!x.contains(slot));
        for k in &keys {
            assert!(
                table.read(k).expect("read").is_none(),
                "deleted before the batch"
            );
        }
        assert_eq!(x.stats().removed_stale, 1);
        // Nothing deleted since: the next batch does not scan.
        x.before_batch(&mut ct, 5_000);
        assert_eq!(x.stats().removed_stale, 1);
    }

    /// A release (the API deleting a connection the table carries) takes the entries
    /// out with what the program counted since the last sync, and those packets are in
    /// the connection's counters before it is returned and freed (invariant 3).
    #[test]
    fn a_released_connection_keeps_the_packets_counted_since_the_last_sync() {
        let Some((table, mut ct, slot, mut x, keys)) = offloaded_udp() else {
            return;
        };
        let before = ct.table().get(slot).expect("connection").counters;
        // The program forwarded 7 packets one way and 3 the other (as it counts them).
        for (k, (packets, bytes)) in keys.iter().zip([(7u64, 700u64), (3, 330)]) {
            let mut e = table.read(k).expect("read").expect("entry");
            (e.packets, e.bytes, e.last_seen_ns) = (packets, bytes, 2_500);
            table.insert(k, &e).expect("write counters");
        }
        x.release(&mut ct, slot, 3_000);
        assert!(!x.contains(slot));
        for k in &keys {
            assert!(table.read(k).expect("read").is_none(), "taken out");
        }
        let c = ct.table().get(slot).expect("still in conntrack");
        assert_eq!(c.counters[0].packets, before[0].packets + 7);
        assert_eq!(c.counters[0].bytes, before[0].bytes + 700);
        assert_eq!(c.counters[1].packets, before[1].packets + 3);
        assert_eq!(c.counters[1].bytes, before[1].bytes + 330);
        assert!(!c.status.contains(Status::HW_OFFLOAD));
        assert_eq!(x.stats().released, 1);
        // Released twice (the API's delete after its drain): nothing more happens.
        x.release(&mut ct, slot, 4_000);
        assert_eq!(x.stats().released, 1);
        assert_eq!(
            ct.table().get(slot).expect("connection").counters[0].packets,
            before[0].packets + 7
        );
    }

    /// Reported: the connection taken, and given back when idle; not a release (the
    /// API reports that itself); nothing kept without `report_events`.
    #[test]
    fn carried_and_returned_connections_are_reported_when_asked() {
        let Some((_table, mut ct, slot, x, _keys)) = offloaded_udp_reporting(true) else {
            return;
        };
        let shared = SharedXdpOffload::new(x);
        let mut events = Vec::new();
        shared.drain_events(&mut events);
        let (id, original) = {
            let c = ct.table().get(slot).expect("connection");
            (c.id, c.tuples[0])
        };
        assert_eq!(
            events,
            vec![CarrierEvent::Carried {
                id,
                original,
                marked: true
            }]
        );
        events.clear();
        shared.drain_events(&mut events);
        assert!(events.is_empty(), "drained");
        let idle = XdpOffloadConfig::default().idle_ns;
        shared.lock().sync_all(&mut ct, 2_000 + idle);
        shared.drain_events(&mut events);
        assert_eq!(
            events,
            vec![CarrierEvent::Returned {
                id,
                original,
                reason: ReturnReason::Idle
            }]
        );
        // Not reporting: nothing kept.
        let Some((_table, mut ct, slot, x, _keys)) = offloaded_udp() else {
            return;
        };
        let shared = SharedXdpOffload::new(x);
        assert!(shared.release(&mut ct, slot, 3_000));
        events.clear();
        shared.drain_events(&mut events);
        assert!(events.is_empty());
    }

    /// Deletes that fail (the kernel refusing them): a release says so and the
    /// connection stays offloaded (not freeable, its entries in place); a closing
    /// connection is not returned either; once deletes work again, the next sync
    /// takes the entries out and returns it (invariant 2). A gone connection's entries
    /// are retried before every batch.
    #[test]
    fn an_entry_that_cannot_be_deleted_keeps_its_connection_offloaded_until_it_is() {
        let Some((table, mut ct, slot, mut x, keys)) = offloaded_udp() else {
            return;
        };
        table.fail_deletes(true);
        assert!(!x.release(&mut ct, slot, 3_000), "not released");
        let c = ct.table().get(slot).expect("connection");
        assert!(
            c.status.contains(Status::OFFLOAD | Status::HW_OFFLOAD),
            "still offloaded"
        );
        assert_eq!(
            ct.delete(slot).map_err(|_| ()),
            Err(()),
            "a delete is refused"
        );
        assert_eq!(x.stats().pending_deletes, 1);
        for k in &keys {
            assert!(table.read(k).expect("read").is_some(), "still in the table");
        }
        // Still failing: the sync retries and keeps it.
        x.sync_all(&mut ct, 4_000);
        assert!(x.contains(slot));
        assert!(
            ct.table()
                .get(slot)
                .expect("connection")
                .status
                .contains(Status::OFFLOAD)
        );
        // Deletes work again: the next sync takes the entries and returns the flow.
        table.fail_deletes(false);
        x.sync_all(&mut ct, 5_000);
        assert!(!x.contains(slot));
        assert_eq!(x.stats().pending_deletes, 0);
        for k in &keys {
            assert!(table.read(k).expect("read").is_none(), "taken out");
        }
        let c = ct.table().get(slot).expect("connection");
        assert!(
            !c.status.intersects(Status::OFFLOAD | Status::HW_OFFLOAD),
            "returned"
        );
        assert_eq!(ct.delete(slot), Ok(true));
    }

    /// A connection gone from conntrack whose entries cannot be deleted: the keys are
    /// kept and deleted before a later batch.
    #[test]
    fn entries_of_a_gone_connection_are_retried_before_each_batch() {
        let Some((table, mut ct, slot, mut x, keys)) = offloaded_udp() else {
            return;
        };
        ct.teardown(slot, Teardown::Returned, 3_000);
        assert_eq!(ct.delete(slot), Ok(true));
        table.fail_deletes(true);
        x.before_batch(&mut ct, 4_000);
        assert!(!x.contains(slot));
        assert_eq!(x.stats().pending_deletes, 2, "both directions");
        x.before_batch(&mut ct, 5_000);
        assert_eq!(x.stats().pending_deletes, 2);
        table.fail_deletes(false);
        x.before_batch(&mut ct, 6_000);
        assert_eq!(x.stats().pending_deletes, 0);
        for k in &keys {
            assert!(table.read(k).expect("read").is_none(), "deleted at last");
        }
    }
}
