//! [`ControlPlane`] over one software conntrack table: the agent without hardware,
//! and the reference the dataplane's implementation is tested against.
//!
//! The "fast path" here is software (Linux flowtable without hardware offload): an
//! offloaded connection has OFFLOAD set, and HW_OFFLOAD only when the AF_XDP
//! forwarder's XDP flow table carries it (`gateway::xdp_offload`, which marks its
//! flows itself and returns them when they close or idle). The policy offloads
//! eligible flows as their packets pass [`SoftwareControl::process`]; a TCP flow
//! that leaves ESTABLISHED is returned to the slow path.
//!
//! NAT rules, timeouts and limits are a [`Settings`] kept under the same lock as the
//! table and applied to it as they change (see [`super::settings`]).
//!
//! Events come from the table's queue (`drain_events`) after every operation that
//! can produce them, plus the state-change, offload and return events this type
//! produces itself, all appended to the journal under the table lock so that their
//! order is the order things happened.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ctoffload_fallback_sw::conntrack::{Config, Conntrack, L4State, Teardown, Verdict};
use ctoffload_fallback_sw::table::{Conn, Counter, Event as CtEvent, Slot, Status};
use ctoffload_fallback_sw::tcp::TcpState;
use ctoffload_fallback_sw::tuple::{Tuple, proto as ipproto};

use ctoffload_fallback_sw::nat::rules::NatRule as EngineRule;

use super::control::ControlPlane;
use super::convert::MAX_CONNECTIONS;
use super::error::ApiError;
use super::journal::EventJournal;
use super::model::{
    Configured, ConnFilter, ConnInfo, ConnKey, DeviceStatus, Event, GapCause, Health, HwTable,
    Limits, LimitsUpdate, ListCursor, ListPage, NatRule, OffloadPolicy, ReturnReason,
    StatsSnapshot, Timeouts, TimeoutsUpdate,
};
use super::settings::Settings;

/// The clock: nanoseconds on a monotonic scale.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Default journal capacity.
pub const DEFAULT_JOURNAL_CAPACITY: usize = 65_536;

/// What the software control plane tracks per live connection.
#[derive(Debug, Clone, Copy)]
struct Meta {
    tcp_state: Option<TcpState>,
}

#[derive(Debug)]
struct State {
    ct: Conntrack,
    meta: HashMap<u64, Meta>,
    source_lost_seen: u64,
    offloaded: u64,
    settings: Settings,
    policy: OffloadPolicy,
    pending: Vec<Event>,
    carrier: Option<Arc<dyn FlowCarrier>>,
}

/// Something outside the table that carries offloaded connections' packets and counts
/// them (the AF_XDP forwarder's XDP flow table, `gateway::xdp_offload`). The control
/// plane hands a connection back to it before returning or deleting one, under the
/// table lock.
pub trait FlowCarrier: Send + Sync + std::fmt::Debug {
    /// `slot`'s connection is being taken back (deleted, drained): stop carrying it
    /// and add what was counted for it since the last sync to `ct`, so that the
    /// connection's counters, as reported and in its end-of-flow event, count every
    /// packet. A slot the carrier does not hold is left alone. `false` when it cannot
    /// let go of the connection now (its packets may still be rewritten and forwarded):
    /// the connection is then not returned, so it is not freed either (invariant 2).
    fn release(&self, ct: &mut Conntrack, slot: Slot, now: u64) -> bool;

    /// Moves what the carrier did on its own since the last call (connections it took
    /// and gave back) to `out`, in order; the control plane journals them.
    fn drain_events(&self, out: &mut Vec<CarrierEvent>);
}

/// What a [`FlowCarrier`] did on its own, for the event journal (a release the control
/// plane asked for is not one: the control plane journals that return itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CarrierEvent {
    /// It took a connection: its packets go through the carrier now.
    Carried {
        /// The connection's id.
        id: u64,
        /// Its original tuple.
        original: Tuple,
        /// The carrier set `OFFLOAD` itself (the connection was not on the control
        /// plane's fast path yet): it now counts against `max_offloaded`, as the
        /// connection's return or end will be counted off.
        marked: bool,
    },
    /// It gave one back to the table's slow path, taking `OFFLOAD` off.
    Returned {
        /// The connection's id.
        id: u64,
        /// Its original tuple.
        original: Tuple,
        /// Why.
        reason: ReturnReason,
    },
}

/// See the module documentation.
pub struct SoftwareControl {
    state: Mutex<State>,
    journal: EventJournal,
    clock: Clock,
}

impl std::fmt::Debug for SoftwareControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareControl")
            .field("journal", &self.journal)
            .finish_non_exhaustive()
    }
}

/// The TCP state of a connection (none for other protocols); both control planes use it.
pub(super) fn tcp_state(c: &Conn<L4State>) -> Option<TcpState> {
    match c.proto {
        L4State::Tcp(t) => Some(t.state()),
        L4State::Udp { .. } | L4State::Icmp | L4State::Generic => None,
    }
}

fn info(c: &Conn<L4State>, now: u64) -> ConnInfo {
    ConnInfo {
        id: c.id,
        tuples: c.tuples,
        tcp_state: tcp_state(c),
        status: c.status,
        remaining_ns: c.remaining(now),
        counters: c.counters,
        hw_counters: [Counter::default(); 2],
        // The XDP flow table (`gateway::xdp_offload`) is this backend's hardware.
        not_offloaded: (!c.status.contains(Status::HW_OFFLOAD))
            .then(|| "software backend: not in the XDP flow table".into()),
    }
}

impl State {
    /// Move the table's events (and any loss) into `pending`.
    fn collect(&mut self) {
        if let Some(carrier) = &self.carrier {
            let mut carried = Vec::new();
            carrier.drain_events(&mut carried);
            for e in &carried {
                match e {
                    CarrierEvent::Carried { marked: true, .. } => self.offloaded += 1,
                    CarrierEvent::Carried { marked: false, .. } => {}
                    CarrierEvent::Returned { .. } => {
                        self.offloaded = self.offloaded.saturating_sub(1);
                    }
                }
            }
            self.pending.extend(carried.into_iter().map(|e| match e {
                CarrierEvent::Carried { id, original, .. } => Event::Offloaded {
                    id,
                    original,
                    hardware: true,
                },
                CarrierEvent::Returned {
                    id,
                    original,
                    reason,
                } => Event::Returned {
                    id,
                    original,
                    reason,
                },
            }));
        }
        let lost = self.ct.table().stats().events_lost;
        if lost > self.source_lost_seen {
            self.pending.push(Event::Gap {
                cause: GapCause::SourceOverflow,
                first_missing: 0,
                last_missing: 0,
                lost_records: lost - self.source_lost_seen,
                lost_end_of_flow: None,
            });
            self.source_lost_seen = lost;
        }
        let events: Vec<CtEvent> = self.ct.table_mut().drain_events().collect();
        for ev in events {
            match ev {
                CtEvent::New { id, tuples } => self.pending.push(Event::New { id, tuples }),
                CtEvent::Destroy {
                    id,
                    tuples,
                    counters,
                    reason,
                    status,
                } => {
                    self.meta.remove(&id);
                    if status.contains(Status::OFFLOAD) {
                        self.offloaded = self.offloaded.saturating_sub(1);
                    }
                    self.pending.push(Event::EndOfFlow {
                        id,
                        tuples,
                        counters,
                        hw_counters: [Counter::default(); 2],
                        reason,
                        status,
                    });
                }
            }
        }
    }

    fn return_to_software(&mut self, slot: Slot, reason: ReturnReason, now: u64) {
        if let Some(carrier) = &self.carrier
            && !carrier.release(&mut self.ct, slot, now)
        {
            return; // still offloaded: a delete is refused
        }
        let Some(c) = self.ct.table().get(slot) else {
            return;
        };
        if !c.status.contains(Status::OFFLOAD) {
            return;
        }
        let (id, original) = (c.id, c.tuples[0]);
        let how = match reason {
            ReturnReason::Teardown => Teardown::Closing,
            ReturnReason::Drain
            | ReturnReason::Delete
            | ReturnReason::Idle
            | ReturnReason::DeviceError => Teardown::Returned,
        };
        self.ct.teardown(slot, how, now);
        self.offloaded = self.offloaded.saturating_sub(1);
        self.pending.push(Event::Returned {
            id,
            original,
            reason,
        });
    }

    /// After a tracked packet: state change, then the policy.
    fn after_packet(&mut self, slot: Slot, now: u64) {
        let Some(c) = self.ct.table().get(slot) else {
            return;
        };
        let (id, original, state) = (c.id, c.tuples[0], tcp_state(&c));
        let offloaded = c.status.contains(Status::OFFLOAD);
        let packets = c.counters[0].packets + c.counters[1].packets;
        let old = self.meta.insert(id, Meta { tcp_state: state });
        if let (
            Some(Meta {
                tcp_state: Some(old),
                ..
            }),
            Some(new),
        ) = (old, state)
            && old != new
        {
            self.pending.push(Event::StateChange {
                id,
                original,
                old,
                new,
            });
        }
        if offloaded {
            // A fast path hands FIN/RST to the slow path, which moves the state on;
            // a TCP flow that left ESTABLISHED goes back to software.
            if state.is_some_and(|s| s != TcpState::Established) {
                self.return_to_software(slot, ReturnReason::Teardown, now);
            }
            return;
        }
        let p = self.policy;
        let proto_ok = match original.proto {
            ipproto::TCP => p.tcp,
            ipproto::UDP => p.udp,
            _ => false,
        };
        if p.enabled
            && proto_ok
            && packets >= p.min_packets
            && self.offloaded < self.settings.limits().max_offloaded
            && self.ct.mark_offloaded(slot, now).is_ok()
        {
            self.offloaded += 1;
            self.pending.push(Event::Offloaded {
                id,
                original,
                hardware: false,
            });
        }
    }

    fn find(&mut self, key: &ConnKey, now: u64) -> Option<Slot> {
        match key {
            ConnKey::Tuple(t) => self.ct.lookup(t, now).map(|(slot, _)| slot),
            ConnKey::Id(id) => self.ct.table().find_id(*id),
        }
        .filter(|slot| self.ct.table().get(*slot).is_some_and(|c| !c.expired(now)))
    }

    fn delete_slot(&mut self, slot: Slot, now: u64) -> Result<Option<ConnInfo>, ApiError> {
        self.return_to_software(slot, ReturnReason::Delete, now);
        let Some(snapshot) = self.ct.table().get(slot).map(|c| info(&c, now)) else {
            return Ok(None);
        };
        match self.ct.delete(slot) {
            Ok(true) => Ok(Some(snapshot)),
            Ok(false) => Ok(None),
            Err(source) => Err(ApiError::Delete {
                id: snapshot.id,
                source,
            }),
        }
    }

    fn delete_where(&mut self, filter: &ConnFilter, now: u64) -> Result<u64, ApiError> {
        let slots: Vec<Slot> = self.ct.select(&filter.0, now).map(|(s, _)| s).collect();
        let mut n = 0;
        for slot in slots {
            if self.delete_slot(slot, now)?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl SoftwareControl {
    /// A control plane over a new table, with a monotonic clock that starts at 0.
    #[must_use]
    pub fn new(cfg: Config, journal_capacity: usize) -> Self {
        let start = Instant::now();
        let clock: Clock =
            Arc::new(move || u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
        Self::with_clock(cfg, journal_capacity, clock)
    }

    /// The same with a given clock (tests pass a manual one).
    #[must_use]
    pub fn with_clock(cfg: Config, journal_capacity: usize, clock: Clock) -> Self {
        let ct = Conntrack::new(cfg);
        Self {
            state: Mutex::new(State {
                settings: Settings::of(&ct, journal_capacity),
                ct,
                meta: HashMap::new(),
                source_lost_seen: 0,
                offloaded: 0,
                policy: OffloadPolicy::default(),
                pending: Vec::new(),
                carrier: None,
            }),
            journal: EventJournal::new(journal_capacity),
            clock,
        }
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, ApiError> {
        self.state
            .lock()
            .map_err(|_| ApiError::Poisoned { what: "conntrack" })
    }

    /// Run `f` on the state, then journal what it produced (under the same lock, so
    /// records are in the order things happened).
    fn with_state<T>(
        &self,
        f: impl FnOnce(&mut State, u64) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let now = self.now();
        let mut st = self.lock()?;
        let out = f(&mut st, now);
        st.collect();
        if !st.pending.is_empty() {
            let events = std::mem::take(&mut st.pending);
            self.journal.append(now, events)?;
        }
        out
    }

    /// Sets (or with `None` removes) what carries offloaded connections outside the
    /// table; see [`FlowCarrier`].
    ///
    /// # Errors
    /// The table's lock is poisoned.
    pub fn set_flow_carrier(&self, carrier: Option<Arc<dyn FlowCarrier>>) -> Result<(), ApiError> {
        self.lock()?.carrier = carrier;
        Ok(())
    }

    /// Track one frame that arrived in `zone` now.
    pub fn process(&self, frame: &[u8], zone: u16) -> Result<Verdict, ApiError> {
        self.with_state(|st, now| {
            let v = st.ct.process(frame, zone, now);
            st.collect();
            if let Verdict::Tracked { slot, .. } = v {
                st.after_packet(slot, now);
            }
            Ok(v)
        })
    }

    /// Reap expired connections, visiting at most `budget` timers.
    pub fn gc(&self, budget: usize) -> Result<usize, ApiError> {
        self.with_state(|st, now| Ok(st.ct.gc(now, budget)))
    }

    /// One batch of the software forwarder under one lock: `f` runs on the table and
    /// pushes the slot of every packet it tracked to `tracked`; each of those then gets
    /// the state-change events and offload policy of [`SoftwareControl::process`], and
    /// what happened is journaled.
    pub fn track_batch<T>(
        &self,
        tracked: &mut Vec<Slot>,
        f: impl FnOnce(&mut Conntrack, &mut Vec<Slot>) -> T,
    ) -> Result<T, ApiError> {
        self.with_state(|st, now| {
            tracked.clear();
            let out = f(&mut st.ct, tracked);
            st.collect();
            tracked.dedup();
            for &slot in tracked.iter() {
                st.after_packet(slot, now);
            }
            Ok(out)
        })
    }

    /// The clock the table runs on (the forwarder reads time from it too).
    #[must_use]
    pub fn clock(&self) -> Clock {
        Arc::clone(&self.clock)
    }
}

impl ControlPlane for SoftwareControl {
    fn list(
        &self,
        filter: &ConnFilter,
        cursor: ListCursor,
        max: usize,
    ) -> Result<ListPage, ApiError> {
        let now = self.now();
        let st = self.lock()?;
        let start = u32::try_from(cursor.0).unwrap_or(u32::MAX);
        let mut conns = Vec::with_capacity(max.min(4096));
        let mut next = None;
        for (slot, c) in st.ct.select(&filter.0, now).filter(|(s, _)| s.0 >= start) {
            if conns.len() == max {
                next = Some(ListCursor(u64::from(slot.0)));
                break;
            }
            conns.push(info(&c, now));
        }
        Ok(ListPage { conns, next })
    }

    fn get(&self, key: &ConnKey) -> Result<ConnInfo, ApiError> {
        self.with_state(|st, now| {
            st.find(key, now)
                .and_then(|slot| st.ct.table().get(slot))
                .map(|c| info(&c, now))
                .ok_or_else(|| not_found(key))
        })
    }

    fn delete(&self, key: &ConnKey) -> Result<ConnInfo, ApiError> {
        self.with_state(|st, now| {
            let slot = st.find(key, now).ok_or_else(|| not_found(key))?;
            st.delete_slot(slot, now)?.ok_or_else(|| not_found(key))
        })
    }

    fn delete_matching(&self, filter: &ConnFilter) -> Result<u64, ApiError> {
        self.with_state(|st, now| st.delete_where(filter, now))
    }

    fn flush(&self) -> Result<u64, ApiError> {
        self.with_state(|st, now| st.delete_where(&ConnFilter::default(), now))
    }

    fn journal(&self) -> &EventJournal {
        &self.journal
    }

    fn stats(&self) -> Result<StatsSnapshot, ApiError> {
        let now = self.now();
        let st = self.lock()?;
        let mut by_state: HashMap<&'static str, u64> = HashMap::new();
        let mut by_proto: HashMap<u8, u64> = HashMap::new();
        let (mut connections, mut offloaded, mut hw) = (0u64, 0u64, 0u64);
        for (_, c) in st.ct.table().iter(now) {
            connections += 1;
            *by_proto.entry(c.tuples[0].proto).or_default() += 1;
            if let Some(s) = tcp_state(&c) {
                *by_state.entry(s.name()).or_default() += 1;
            }
            offloaded += u64::from(c.status.contains(Status::OFFLOAD));
            hw += u64::from(c.status.contains(Status::HW_OFFLOAD));
        }
        let ts = st.ct.table().stats();
        let cs = st.ct.stats();
        let mut drops = Vec::new();
        for (kind, name) in super::invalid_kinds() {
            if name != "malformed" {
                drops.push((name.to_owned(), cs.invalid[kind.index()]));
            }
        }
        for r in ctoffload_fallback_sw::wire::DropReason::ALL {
            drops.push((format!("malformed/{}", r.name()), cs.malformed[r.index()]));
        }
        let mut by_tcp_state: Vec<_> = by_state.into_iter().collect();
        by_tcp_state.sort_unstable();
        let mut by_protocol: Vec<_> = by_proto.into_iter().collect();
        by_protocol.sort_unstable();
        Ok(StatsSnapshot {
            connections,
            max_connections: st.ct.table().limit() as u64,
            by_tcp_state,
            by_protocol,
            offloaded,
            hw_offloaded: hw,
            hw_table: HwTable::default(),
            insert_failed_clash: ts.insert_clash,
            insert_failed_full: ts.insert_full,
            early_drops: ts.early_drop,
            expired: ts.expired,
            drops_by_reason: drops,
            port_pools: st.settings.port_pools(&st.ct, now),
            packets: cs.packets,
            created: cs.created,
            journal: self.journal.info()?,
        })
    }

    fn nat_rules(&self) -> Result<Vec<NatRule>, ApiError> {
        Ok(self.lock()?.settings.nat_rules())
    }

    fn add_nat_rule(&self, rule: NatRule) -> Result<NatRule, ApiError> {
        let st = &mut *self.lock()?;
        st.settings.add_nat_rule(&mut st.ct, rule)
    }

    fn add_engine_nat_rule(
        &self,
        name: String,
        rule: EngineRule,
        api: Option<NatRule>,
    ) -> Result<(), ApiError> {
        let st = &mut *self.lock()?;
        st.settings.add_engine_rule(&mut st.ct, name, rule, api)
    }

    fn remove_nat_rule(&self, name: &str) -> Result<(), ApiError> {
        let st = &mut *self.lock()?;
        st.settings.remove_nat_rule(&mut st.ct, name)
    }

    fn offload_policy(&self) -> Result<OffloadPolicy, ApiError> {
        Ok(self.lock()?.policy)
    }

    fn set_offload_policy(&self, policy: OffloadPolicy) -> Result<OffloadPolicy, ApiError> {
        self.lock()?.policy = policy;
        Ok(policy)
    }

    fn drain_offload(&self, disable: bool) -> Result<u64, ApiError> {
        self.with_state(|st, now| {
            if disable {
                st.policy.enabled = false;
            }
            let filter = ctoffload_fallback_sw::conntrack::Filter {
                offloaded: Some(true),
                ..Default::default()
            };
            let slots: Vec<Slot> = st.ct.select(&filter, now).map(|(s, _)| s).collect();
            for &slot in &slots {
                st.return_to_software(slot, ReturnReason::Drain, now);
            }
            Ok(slots.len() as u64)
        })
    }

    fn device_status(&self) -> Result<DeviceStatus, ApiError> {
        Ok(DeviceStatus {
            backend: "software".into(),
            identity: "fallback-sw conntrack (no offload device)".into(),
            spec_version: String::new(),
            capabilities: vec!["conntrack".into(), "software-fast-path".into()],
            health: Health::Ok,
            resets: 0,
            errors: 0,
            last_error: String::new(),
            table: HwTable::default(),
        })
    }

    fn timeouts(&self) -> Result<Configured<Timeouts>, ApiError> {
        let st = self.lock()?;
        Ok(st.settings.timeouts(&st.ct))
    }

    fn set_timeouts(&self, update: TimeoutsUpdate) -> Result<Configured<Timeouts>, ApiError> {
        let st = &mut *self.lock()?;
        Ok(st.settings.set_timeouts(&mut st.ct, update))
    }

    fn limits(&self) -> Result<Configured<Limits>, ApiError> {
        let st = self.lock()?;
        Ok(st.settings.configured_limits(&st.ct))
    }

    fn set_limits(&self, update: LimitsUpdate) -> Result<Configured<Limits>, ApiError> {
        let st = &mut *self.lock()?;
        let new = st.settings.check_limits(update, Some(st.offloaded))?;
        debug_assert!(new.max_connections <= MAX_CONNECTIONS);
        self.journal
            .set_capacity(usize::try_from(new.event_journal_capacity).unwrap_or(usize::MAX))?;
        Ok(st.settings.set_limits(&mut st.ct, new))
    }
}

fn not_found(key: &ConnKey) -> ApiError {
    ApiError::NotFound {
        what: match key {
            ConnKey::Id(id) => format!("connection id {id}"),
            ConnKey::Tuple(t) => format!("connection {t}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use ctoffload_fallback_sw::tuple::{Dir, Tuple};
    use etherparse::PacketBuilder;

    use super::*;

    /// A carrier that has counted `extra` packets (of 100 bytes) in the original
    /// direction of every connection it is asked to release, and records the slots.
    #[derive(Debug)]
    struct Counting {
        extra: u64,
        released: Mutex<Vec<Slot>>,
        /// Cannot let go (its deletes fail).
        refuse: bool,
        /// What it reports it did.
        events: Mutex<Vec<CarrierEvent>>,
    }

    impl FlowCarrier for Counting {
        fn release(&self, ct: &mut Conntrack, slot: Slot, _now: u64) -> bool {
            if self.refuse {
                return false;
            }
            let delta = Counter {
                packets: self.extra,
                bytes: 100 * self.extra,
            };
            ct.add_external_counts(slot, Dir::Original, delta);
            self.released
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(slot);
            true
        }

        fn drain_events(&self, out: &mut Vec<CarrierEvent>) {
            out.extend(
                self.events
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .drain(..),
            );
        }
    }

    fn udp(sport: u16) -> Vec<u8> {
        let mut v = Vec::new();
        PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(sport, 53)
            .write(&mut v, b"payload")
            .expect("frame");
        v
    }

    fn key(sport: u16) -> ConnKey {
        ConnKey::Tuple(tuple(sport))
    }

    fn tuple(sport: u16) -> Tuple {
        Tuple::v4([10, 0, 0, 1], sport, [10, 0, 0, 2], 53, ipproto::UDP)
    }

    /// What a carrier counted is in the deleted connection's reported counters and in
    /// its end-of-flow event; a flush releases every connection.
    #[test]
    fn a_delete_releases_the_connection_from_its_carrier_first() {
        let control = SoftwareControl::new(Config::default(), 64);
        let carrier = Arc::new(Counting {
            extra: 5,
            released: Mutex::new(Vec::new()),
            refuse: false,
            events: Mutex::new(Vec::new()),
        });
        let dyn_carrier: Arc<dyn FlowCarrier> = Arc::clone(&carrier) as Arc<dyn FlowCarrier>;
        control
            .set_flow_carrier(Some(dyn_carrier))
            .expect("set carrier");
        for sport in [1000, 1001, 1002] {
            control.process(&udp(sport), 0).expect("process");
        }
        let info = control.delete(&key(1000)).expect("delete");
        assert_eq!(info.counters[0].packets, 1 + 5, "software 1 + carried 5");
        assert_eq!(info.counters[0].bytes, 35 + 500);
        let records = control.journal().read(0, 64).expect("journal").records;
        let eof = records
            .iter()
            .find_map(|r| match r.event {
                Event::EndOfFlow { id, counters, .. } if id == info.id => Some(counters),
                _ => None,
            })
            .expect("end of flow");
        assert_eq!(eof[0].packets, 6);
        assert_eq!(control.flush().expect("flush"), 2);
        let released = carrier
            .released
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len();
        assert_eq!(released, 3, "one release per deleted connection");
        // What the carrier reports it did is journaled as offload events.
        let original = tuple(1001);
        carrier
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend([7, 8].map(|id| CarrierEvent::Carried {
                id,
                original,
                marked: true,
            }));
        control.gc(1).expect("gc");
        // It marked both connections itself: they count against max_offloaded.
        let max_offloaded = |n| {
            LimitsUpdate(Limits {
                max_offloaded: n,
                max_connections: 0,
                max_nat_rules: 0,
                event_journal_capacity: 0,
            })
        };
        assert!(control.set_limits(max_offloaded(1)).is_err(), "2 offloaded");
        assert!(control.set_limits(max_offloaded(2)).is_ok());
        // One given back: counted off.
        carrier
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(CarrierEvent::Returned {
                id: 8,
                original,
                reason: ReturnReason::Idle,
            });
        control.gc(1).expect("gc");
        assert!(control.set_limits(max_offloaded(1)).is_ok(), "1 offloaded");
        let records = control.journal().read(0, 64).expect("journal").records;
        assert!(records.iter().any(|r| r.event
            == Event::Offloaded {
                id: 7,
                original,
                hardware: true
            }));
        // Without a carrier, nothing is added.
        control.set_flow_carrier(None).expect("unset");
        control.process(&udp(2000), 0).expect("process");
        let info = control.delete(&key(2000)).expect("delete");
        assert_eq!(info.counters[0].packets, 1);
    }

    /// A carrier that cannot let go of an offloaded connection: the API's delete is
    /// refused and the connection stays, offloaded (invariant 2).
    #[test]
    fn a_connection_its_carrier_cannot_release_is_not_deleted() {
        let control = SoftwareControl::new(Config::default(), 64);
        control
            .set_offload_policy(OffloadPolicy {
                enabled: true,
                min_packets: 1,
                ..OffloadPolicy::default()
            })
            .expect("policy");
        let refusing: Arc<dyn FlowCarrier> = Arc::new(Counting {
            extra: 0,
            released: Mutex::new(Vec::new()),
            refuse: true,
            events: Mutex::new(Vec::new()),
        });
        control
            .set_flow_carrier(Some(refusing))
            .expect("set carrier");
        let mut reply = Vec::new();
        PacketBuilder::ethernet2([4; 6], [2; 6])
            .ipv4([10, 0, 0, 2], [10, 0, 0, 1], 64)
            .udp(53, 1000)
            .write(&mut reply, b"answer")
            .expect("frame");
        control.process(&udp(1000), 0).expect("process");
        control.process(&reply, 0).expect("process");
        let info = control.get(&key(1000)).expect("get");
        assert!(info.status.contains(Status::OFFLOAD), "{info:?}");
        assert!(control.delete(&key(1000)).is_err(), "refused");
        let info = control.get(&key(1000)).expect("still there");
        assert!(info.status.contains(Status::OFFLOAD));
    }
}
