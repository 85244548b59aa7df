//! [`ControlPlane`] over the dataplane: a run-to-completion worker thread that owns
//! its [`Worker`] (conntrack, NAT, the device) and polls it; the API talks to it
//! through a bounded command channel serviced between polls.
//!
//! The worker thread is plain `std::thread` (no tokio): each loop polls the device,
//! runs up to [`JOBS_PER_POLL`] control-plane jobs, runs the reconciler tick when due,
//! moves the worker's observed events into the journal and feeds the metrics. A job is
//! a closure run on the worker's state with the loop's `now`; the caller waits for its
//! answer for at most [`ANSWER_TIMEOUT`]. Listing is paged like the software table.
//!
//! NAT rules, timeouts and limits are a [`Settings`] owned by the worker thread
//! ([`Core`]): a change is a job, applied to the worker's engine between two polls
//! (see [`super::settings`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ctoffload_driver::device::Clock;
use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::conntrack::{Conntrack, Filter, L4State};
use ctoffload_fallback_sw::nat::rules::{NatRule as EngineRule, NatRuleSet};
use ctoffload_fallback_sw::table::{Conn, Status};

use super::control::ControlPlane;
use super::error::ApiError;
use super::journal::EventJournal;
use super::model::{
    Configured, ConnFilter, ConnInfo, ConnKey, DeviceStatus, Event, Health, HwTable, Limits,
    LimitsUpdate, ListCursor, ListPage, NatRule, OffloadPolicy, ReturnReason, StatsSnapshot,
    Timeouts, TimeoutsUpdate,
};
use super::settings::{Engine, Settings};
use super::software::tcp_state;
use crate::dataplane::{self, ConnHandle, HwState, NotOffloaded, Observed, Worker};
use crate::metrics::MetricsHandle;

/// Control-plane jobs the worker runs per loop at most.
pub const JOBS_PER_POLL: usize = 16;
/// Jobs waiting at most (the channel's bound).
pub const QUEUE_BOUND: usize = 256;
/// How long a caller waits for the worker's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconciler tick period.
const RECONCILE_NS: u64 = 50_000_000;

/// What a job sees: the worker and the control plane's own state.
#[derive(Debug)]
pub struct Core<Io: DeviceIo> {
    /// The worker.
    pub worker: Worker<Io>,
    /// Offload counters for the demo and stats: connections offloaded so far.
    pub offloads: u64,
    /// Sum of time-to-offload samples and their values (ns), for percentiles.
    pub offload_latencies_ns: Vec<u64>,
    /// Connections destroyed so far, by reason name.
    pub destroyed: HashMap<&'static str, u64>,
    /// The hardware part of the counters of destroyed connections (packets).
    pub destroyed_hw_packets: u64,
    policy: OffloadPolicy,
    settings: Settings,
}

type Job<Io> = Box<dyn FnOnce(&mut Core<Io>, u64) + Send>;

impl<Io: DeviceIo> Engine for Worker<Io> {
    fn conntrack(&self) -> &Conntrack {
        Worker::conntrack(self)
    }
    fn nat_rules_mut(&mut self) -> &mut NatRuleSet {
        self.nat_mut().rules_mut()
    }
    fn set_timeouts(&mut self, t: &Timeouts) {
        Worker::set_timeouts(self, t.tcp, t.other);
    }
    fn set_max_connections(&mut self, max: usize) -> usize {
        Worker::set_max_connections(self, max)
    }
}

/// Static facts about the device, read at start.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    /// Backend name (`sim`, `vfio`).
    pub backend: String,
    /// Identity.
    pub identity: String,
}

/// See the module documentation.
pub struct DataplaneControl<Io: DeviceIo> {
    tx: SyncSender<Job<Io>>,
    journal: Arc<EventJournal>,
    facts: DeviceFacts,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<Worker<Io>>>>,
}

impl<Io: DeviceIo> std::fmt::Debug for DataplaneControl<Io> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataplaneControl")
            .field("facts", &self.facts)
            .finish_non_exhaustive()
    }
}

fn info<Io: DeviceIo>(
    w: &Worker<Io>,
    c: &Conn<L4State>,
    slot: ctoffload_fallback_sw::table::Slot,
    now: u64,
) -> ConnInfo {
    // Software plus hardware, the counts the reconciler pulled but did not fold into
    // conntrack yet included.
    let h = ConnHandle { slot, id: c.id };
    let hw = w.hw_counters(h);
    ConnInfo {
        id: c.id,
        tuples: c.tuples,
        tcp_state: tcp_state(c),
        status: c.status,
        remaining_ns: c.remaining(now),
        counters: w.counters(h).unwrap_or(c.counters),
        hw_counters: hw,
        not_offloaded: not_offloaded_reason(w.hw_state(ConnHandle { slot, id: c.id })),
    }
}

/// The API's name for why a flow left hardware.
fn return_reason(r: NotOffloaded) -> ReturnReason {
    match r {
        NotOffloaded::Closing => ReturnReason::Teardown,
        NotOffloaded::Drained => ReturnReason::Drain,
        NotOffloaded::DeviceDown | NotOffloaded::DeviceError => ReturnReason::DeviceError,
        NotOffloaded::Idle
        | NotOffloaded::Displaced
        | NotOffloaded::Policy(_)
        | NotOffloaded::Disabled { .. }
        | NotOffloaded::Protocol { .. }
        | NotOffloaded::NoRule(_)
        | NotOffloaded::TableFull
        | NotOffloaded::Collision => ReturnReason::Idle,
    }
}

/// The dataplane policy that carries out the API's.
fn worker_policy(base: dataplane::OffloadPolicy, p: OffloadPolicy) -> dataplane::OffloadPolicy {
    dataplane::OffloadPolicy {
        tcp: p.enabled && p.tcp,
        udp: p.enabled && p.udp,
        min_packets: p.min_packets,
        ..base
    }
}

/// Why a connection is not in hardware, in words (`None` when it is).
#[must_use]
pub fn not_offloaded_reason(state: Option<(HwState, Option<NotOffloaded>)>) -> Option<String> {
    match state {
        Some((HwState::Offloaded, _)) => None,
        Some((HwState::Pending, _)) => Some("insert pending".into()),
        Some((HwState::Dying(_), _)) => Some("leaving hardware".into()),
        Some((HwState::None | HwState::Dead, Some(r))) => Some(r.to_string()),
        Some((HwState::None | HwState::Dead, None)) | None => {
            Some("not seen by the policy yet".into())
        }
    }
}

impl<Io: DeviceIo> Core<Io> {
    /// Move the worker's observed events into the journal and the metrics.
    fn publish(
        &mut self,
        scratch: &mut Vec<Observed>,
        journal: &EventJournal,
        metrics: &MetricsHandle,
        now: u64,
    ) {
        scratch.clear();
        self.worker.take_observed(scratch);
        if scratch.is_empty() {
            return;
        }
        let mut events = Vec::with_capacity(scratch.len());
        for o in scratch.drain(..) {
            events.push(match o {
                Observed::New { id, tuples } => Event::New { id, tuples },
                Observed::StateChange {
                    id,
                    original,
                    old,
                    new,
                } => Event::StateChange {
                    id,
                    original,
                    old,
                    new,
                },
                Observed::Offloaded {
                    id,
                    original,
                    latency_ns,
                } => {
                    self.offloads += 1;
                    if self.offload_latencies_ns.len() < 1 << 20 {
                        self.offload_latencies_ns.push(latency_ns);
                    }
                    metrics.observe_time_to_offload(Duration::from_nanos(latency_ns));
                    Event::Offloaded {
                        id,
                        original,
                        hardware: true,
                    }
                }
                Observed::Returned {
                    id,
                    original,
                    reason,
                } => Event::Returned {
                    id,
                    original,
                    reason: return_reason(reason),
                },
                Observed::Destroyed {
                    id,
                    tuples,
                    counters,
                    hw_counters,
                    reason,
                    status,
                } => {
                    *self.destroyed.entry(reason_name(reason)).or_default() += 1;
                    self.destroyed_hw_packets += hw_counters[0].packets + hw_counters[1].packets;
                    Event::EndOfFlow {
                        id,
                        tuples,
                        counters,
                        hw_counters,
                        reason,
                        status,
                    }
                }
            });
        }
        if let Err(e) = journal.append(now, events) {
            tracing::error!(error = %e, "journal append failed");
        }
    }
}

fn reason_name(r: ctoffload_fallback_sw::table::RemoveReason) -> &'static str {
    use ctoffload_fallback_sw::table::RemoveReason as R;
    match r {
        R::Expired => "expired",
        R::Deleted => "deleted",
        R::EarlyDrop => "early-drop",
        R::Closed => "closed",
    }
}

/// The worker thread's loop. Ends when `stop` is set or every sender is gone, and
/// gives the worker back (its device can then be detached).
fn run<Io: DeviceIo>(
    mut core: Core<Io>,
    rx: Receiver<Job<Io>>,
    clock: Clock,
    stop: Arc<AtomicBool>,
    journal: Arc<EventJournal>,
    metrics: MetricsHandle,
) -> Worker<Io> {
    let mut next_reconcile = 0;
    let mut next_gauge = 0;
    let mut scratch = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = clock.now_ns();
        let n = core.worker.poll(now);
        let mut jobs = 0;
        loop {
            if jobs == JOBS_PER_POLL {
                break;
            }
            match rx.try_recv() {
                Ok(job) => {
                    job(&mut core, now);
                    jobs += 1;
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return core.worker,
            }
        }
        if now >= next_reconcile {
            core.worker.reconcile(now);
            next_reconcile = now + RECONCILE_NS;
        }
        core.publish(&mut scratch, &journal, &metrics, now);
        if now >= next_gauge {
            metrics.set_offload_queue_depth(
                u64::try_from(core.worker.commands_outstanding()).unwrap_or(u64::MAX),
            );
            next_gauge = now + 100_000_000;
        }
        if n == 0 && jobs == 0 {
            if core.worker.commands_outstanding() > 0 {
                // Waiting for completions: let the simulator's thread run.
                std::thread::yield_now();
            } else {
                // Idle: no frames, no commands. A real worker would busy-poll or wait
                // on the RX interrupt; the simulator shares the machine with us.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
    core.worker
}

impl<Io: DeviceIo + Send + 'static> DataplaneControl<Io> {
    /// Start the worker thread over `worker` (observing is switched on here).
    /// `policy` is the API's view of the offload policy the worker starts with.
    pub fn start(
        mut worker: Worker<Io>,
        policy: OffloadPolicy,
        clock: Clock,
        facts: DeviceFacts,
        journal_capacity: usize,
        metrics: MetricsHandle,
    ) -> std::io::Result<Self> {
        worker.set_observing(true);
        let base = worker.policy();
        worker.set_policy(worker_policy(base, policy));
        let settings = Settings::of(worker.conntrack(), journal_capacity);
        let journal = Arc::new(EventJournal::new(journal_capacity));
        let (tx, rx) = mpsc::sync_channel(QUEUE_BOUND);
        let stop = Arc::new(AtomicBool::new(false));
        let core = Core {
            worker,
            offloads: 0,
            offload_latencies_ns: Vec::new(),
            destroyed: HashMap::new(),
            destroyed_hw_packets: 0,
            policy,
            settings,
        };
        let thread = {
            let (stop, journal) = (Arc::clone(&stop), Arc::clone(&journal));
            std::thread::Builder::new()
                .name("ctoffload-worker".into())
                .spawn(move || run(core, rx, clock, stop, journal, metrics))?
        };
        Ok(Self {
            tx,
            journal,
            facts,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Run `f` on the worker between two polls and wait for its answer.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core<Io>, u64) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (atx, arx) = mpsc::sync_channel(1);
        let job: Job<Io> = Box::new(move |core, now| {
            let _ = atx.send(f(core, now));
        });
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(ApiError::ResourceExhausted {
                    resource: "dataplane command queue".into(),
                    limit: QUEUE_BOUND as u64,
                });
            }
            Err(TrySendError::Disconnected(_)) => return Err(ApiError::ShuttingDown),
        }
        match arx.recv_timeout(ANSWER_TIMEOUT) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(ApiError::FailedPrecondition {
                reason: format!(
                    "the dataplane worker did not answer within {} s",
                    ANSWER_TIMEOUT.as_secs()
                ),
            }),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(ApiError::ShuttingDown),
        }
    }

    /// Stop the worker thread and wait for it; the worker, the first time (`None` if
    /// it was already stopped or its thread panicked).
    pub fn shutdown(&self) -> Option<Worker<Io>> {
        self.stop.store(true, Ordering::Relaxed);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        handle.and_then(|h| h.join().ok())
    }

    fn delete_where(&self, filter: Filter) -> Result<u64, ApiError> {
        self.call(move |core, now| {
            let handles: Vec<ConnHandle> = core
                .worker
                .conntrack()
                .select(&filter, now)
                .map(|(slot, c)| ConnHandle { slot, id: c.id })
                .collect();
            let mut n = 0;
            for h in handles {
                if core.worker.delete_connection(h, now) {
                    n += 1;
                }
            }
            Ok(n)
        })
    }
}

impl<Io: DeviceIo> Drop for DataplaneControl<Io> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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

fn find<Io: DeviceIo>(w: &mut Worker<Io>, key: &ConnKey, now: u64) -> Option<ConnHandle> {
    match key {
        ConnKey::Tuple(t) => w.find(t, now),
        ConnKey::Id(id) => {
            let table = w.conntrack().table();
            let slot = table.find_id(*id)?;
            table
                .get(slot)
                .filter(|c| !c.expired(now))
                .map(|c| ConnHandle { slot, id: c.id })
        }
    }
}

impl<Io: DeviceIo + Send + 'static> ControlPlane for DataplaneControl<Io> {
    fn list(
        &self,
        filter: &ConnFilter,
        cursor: ListCursor,
        max: usize,
    ) -> Result<ListPage, ApiError> {
        let filter = filter.0;
        self.call(move |core, now| {
            let w = &core.worker;
            let start = u32::try_from(cursor.0).unwrap_or(u32::MAX);
            let mut conns = Vec::with_capacity(max.min(4096));
            let mut next = None;
            for (slot, c) in w
                .conntrack()
                .select(&filter, now)
                .filter(|(s, _)| s.0 >= start)
            {
                if conns.len() == max {
                    next = Some(ListCursor(u64::from(slot.0)));
                    break;
                }
                conns.push(info(w, &c, slot, now));
            }
            Ok(ListPage { conns, next })
        })
    }

    fn get(&self, key: &ConnKey) -> Result<ConnInfo, ApiError> {
        let key = *key;
        self.call(move |core, now| {
            let h = find(&mut core.worker, &key, now).ok_or_else(|| not_found(&key))?;
            let w = &core.worker;
            w.conntrack()
                .table()
                .get(h.slot)
                .map(|c| info(w, &c, h.slot, now))
                .ok_or_else(|| not_found(&key))
        })
    }

    fn delete(&self, key: &ConnKey) -> Result<ConnInfo, ApiError> {
        let key = *key;
        self.call(move |core, now| {
            let h = find(&mut core.worker, &key, now).ok_or_else(|| not_found(&key))?;
            let snapshot = {
                let w = &core.worker;
                w.conntrack()
                    .table()
                    .get(h.slot)
                    .map(|c| info(w, &c, h.slot, now))
                    .ok_or_else(|| not_found(&key))?
            };
            // Hardware first, then software (invariant 2): the worker frees the
            // connection once its rules are confirmed gone.
            if core.worker.delete_connection(h, now) {
                Ok(snapshot)
            } else {
                Err(not_found(&key))
            }
        })
    }

    fn delete_matching(&self, filter: &ConnFilter) -> Result<u64, ApiError> {
        self.delete_where(filter.0)
    }

    fn flush(&self) -> Result<u64, ApiError> {
        self.delete_where(Filter::default())
    }

    fn journal(&self) -> &EventJournal {
        &self.journal
    }

    fn stats(&self) -> Result<StatsSnapshot, ApiError> {
        let journal = self.journal.info()?;
        self.call(move |core, now| {
            let hw_table = hw_table(core);
            let w = &core.worker;
            let pools = core.settings.port_pools(w.conntrack(), now);
            let mut by_state: HashMap<&'static str, u64> = HashMap::new();
            let mut by_proto: HashMap<u8, u64> = HashMap::new();
            let (mut connections, mut offloaded, mut hw) = (0u64, 0u64, 0u64);
            for (_, c) in w.conntrack().table().iter(now) {
                connections += 1;
                *by_proto.entry(c.tuples[0].proto).or_default() += 1;
                if let Some(s) = tcp_state(&c) {
                    *by_state.entry(s.name()).or_default() += 1;
                }
                offloaded += u64::from(c.status.contains(Status::OFFLOAD));
                hw += u64::from(c.status.contains(Status::HW_OFFLOAD));
            }
            let ts = w.conntrack().table().stats();
            let cs = w.conntrack().stats();
            let mut drops = Vec::new();
            for (kind, name) in super::invalid_kinds() {
                if name != "malformed" {
                    drops.push((name.to_owned(), cs.invalid[kind.index()]));
                }
            }
            for r in ctoffload_fallback_sw::wire::DropReason::ALL {
                drops.push((format!("malformed/{}", r.name()), cs.malformed[r.index()]));
            }
            if let Some(g) = w.gateway_stats() {
                let named = dataplane::router::gateway_drops(&g);
                drops.extend(named.into_iter().map(|(n, v)| (n.to_owned(), v)));
            }
            let mut by_tcp_state: Vec<_> = by_state.into_iter().collect();
            by_tcp_state.sort_unstable();
            let mut by_protocol: Vec<_> = by_proto.into_iter().collect();
            by_protocol.sort_unstable();
            Ok(StatsSnapshot {
                connections,
                max_connections: w.conntrack().table().limit() as u64,
                by_tcp_state,
                by_protocol,
                offloaded,
                hw_offloaded: hw,
                hw_table,
                insert_failed_clash: ts.insert_clash,
                insert_failed_full: ts.insert_full,
                early_drops: ts.early_drop,
                expired: ts.expired,
                drops_by_reason: drops,
                port_pools: pools,
                packets: cs.packets,
                created: cs.created,
                journal,
            })
        })
    }

    fn nat_rules(&self) -> Result<Vec<NatRule>, ApiError> {
        self.call(|core, _| Ok(core.settings.nat_rules()))
    }

    fn add_nat_rule(&self, rule: NatRule) -> Result<NatRule, ApiError> {
        self.call(move |core, _| core.settings.add_nat_rule(&mut core.worker, rule))
    }

    fn add_engine_nat_rule(
        &self,
        name: String,
        rule: EngineRule,
        api: Option<NatRule>,
    ) -> Result<(), ApiError> {
        self.call(move |core, _| {
            core.settings
                .add_engine_rule(&mut core.worker, name, rule, api)
        })
    }

    fn remove_nat_rule(&self, name: &str) -> Result<(), ApiError> {
        let name = name.to_owned();
        self.call(move |core, _| core.settings.remove_nat_rule(&mut core.worker, &name))
    }

    fn offload_policy(&self) -> Result<OffloadPolicy, ApiError> {
        self.call(|core, _| Ok(core.policy))
    }

    fn set_offload_policy(&self, policy: OffloadPolicy) -> Result<OffloadPolicy, ApiError> {
        self.call(move |core, _| {
            let base = core.worker.policy();
            core.worker.set_policy(worker_policy(base, policy));
            core.policy = policy;
            Ok(policy)
        })
    }

    fn drain_offload(&self, disable: bool) -> Result<u64, ApiError> {
        self.call(move |core, now| {
            if disable {
                core.policy.enabled = false;
                let base = core.worker.policy();
                core.worker.set_policy(worker_policy(base, core.policy));
            }
            Ok(core.worker.drain(now))
        })
    }

    fn device_status(&self) -> Result<DeviceStatus, ApiError> {
        let facts = self.facts.clone();
        self.call(move |core, _| {
            let table = hw_table(core);
            let s = core.worker.stats();
            let w = &mut core.worker;
            let up = w.device_up();
            let caps = *w.device_mut().capabilities();
            let mut capabilities: Vec<String> = caps
                .features
                .iter_names()
                .map(|(n, _)| n.to_ascii_lowercase())
                .collect();
            capabilities.push(format!("flow_capacity={}", caps.flow_capacity));
            capabilities.push(format!("ports={}", caps.num_ports));
            Ok(DeviceStatus {
                backend: facts.backend,
                identity: format!("{} (impl id {:#010x})", facts.identity, caps.impl_id),
                spec_version: format!("{}.{}", caps.spec.major, caps.spec.minor),
                capabilities,
                health: if up { Health::Ok } else { Health::Failed },
                // Resets since the agent started: recoveries (bring-up's own reset is not one).
                resets: s.recoveries,
                errors: s.faults,
                last_error: if s.faults > 0 {
                    format!("{} device faults, {} recoveries", s.faults, s.recoveries)
                } else {
                    String::new()
                },
                table,
            })
        })
    }

    fn timeouts(&self) -> Result<Configured<Timeouts>, ApiError> {
        self.call(|core, _| Ok(core.settings.timeouts(core.worker.conntrack())))
    }

    fn set_timeouts(&self, update: TimeoutsUpdate) -> Result<Configured<Timeouts>, ApiError> {
        self.call(move |core, _| Ok(core.settings.set_timeouts(&mut core.worker, update)))
    }

    fn limits(&self) -> Result<Configured<Limits>, ApiError> {
        self.call(|core, _| Ok(core.settings.configured_limits(core.worker.conntrack())))
    }

    fn set_limits(&self, update: LimitsUpdate) -> Result<Configured<Limits>, ApiError> {
        let journal = Arc::clone(&self.journal);
        self.call(move |core, _| {
            // The dataplane does not enforce max_offloaded (the device table's size
            // bounds it): no check against the flows offloaded now.
            let new = core.settings.check_limits(update, None)?;
            journal
                .set_capacity(usize::try_from(new.event_journal_capacity).unwrap_or(usize::MAX))?;
            Ok(core.settings.set_limits(&mut core.worker, new))
        })
    }
}

fn hw_table<Io: DeviceIo>(core: &mut Core<Io>) -> HwTable {
    let s = core.worker.stats();
    let counts = core.worker.state_counts();
    let cap = core.worker.device_mut().capabilities().flow_capacity;
    HwTable {
        // Two device entries per connection in hardware (pending and dying included).
        used: 2 * (counts[1] + counts[2] + counts[3]) as u64,
        capacity: u64::from(cap),
        insert_failures: s.insert_table_full + s.insert_collision + s.insert_error,
    }
}
