//! The reconciler: the periodic, incremental counter pull that keeps software's view
//! of offloaded flows true.
//!
//! Each [`Worker::reconcile`] tick pulls the counters of the next
//! `counter_slots_per_tick` device slots with `COUNTER_DUMP` (one DMA per chunk, no
//! per-flow register reads) and, for every slot that holds one of our rules:
//!
//! - turns the raw counters into a wrap-safe delta (the slot table, [`super::slots`],
//!   per slot and generation) and adds it to the connection's conntrack counters exactly once
//!   (invariant 3); the final delta comes with the delete's completion;
//! - moves the connection's hardware last-hit forward (in the slot table), and only when the flow has been idle in *both* directions for its
//!   protocol's idle timeout starts its removal (invariant 1): delete in hardware,
//!   wait for the completion, then return it to software with the idle time
//!   subtracted from its conntrack timeout (invariant 2 and Linux flowtable teardown).
//!
//! Work per tick is bounded by the slot budget plus the GC budget, and a tick never waits
//! for the device: it collects the chunk whose `COUNTER_DUMP` the previous tick started
//! (decoded in place from the dump buffer, no copy), then starts the next one. A full
//! sweep of the table takes `capacity / counter_slots_per_tick` ticks and must stay
//! under 25 s.
//!
//! Slots whose counters did not move cost one sequential read of the slot table's seen
//! array: no hash lookup, no conntrack access, unless the slot may be idle. A slot whose
//! counters moved costs the fold into its connection (invariant 3); the conntrack
//! timeout of an offloaded connection is held far ahead (Linux `nf_ct_offload_timeout`:
//! a day, extended once less than 5 minutes remain), so a counter move refreshes it at
//! most once per [`KEEPALIVE_EVERY_NS`] per slot, well inside those 5 minutes: GC can
//! never expire a flow that is carrying traffic in hardware (invariant 1).

use ctoffload_driver::CounterDump;
use ctoffload_driver::io::DeviceIo;
use ctoffload_hw_regs::FlowId;

use super::slots::{Delta, Observed, Slots};
use super::worker::Worker;

/// How often a counter move of one slot refreshes its connection's conntrack timeout.
/// Conntrack extends an offloaded connection once less than 5 minutes remain; with a
/// sweep every ≤ 25 s, a refresh every minute keeps that margin by far.
pub const KEEPALIVE_EVERY_NS: u64 = 60_000_000_000;

/// Reusable lists the sweep fills from one chunk (no allocation per tick).
#[derive(Debug, Default)]
pub struct SweepScratch {
    moved: Vec<(FlowId, Delta)>,
    idle: Vec<(FlowId, u64)>,
}

/// Where one chunk's records leave work: the slots whose counters moved, and the slots
/// whose newest hit (agent time) is older than `min_idle`.
struct Scan {
    now: u64,
    min_idle: u64,
    time_offset_ns: i64,
}

impl Scan {
    /// The sequential part of the sweep: the record of every slot we own against the
    /// slot table's seen array, nothing else (records of other slots are not read).
    fn run(&self, dump: &CounterDump<'_>, slots: &mut Slots, out: &mut SweepScratch) -> u64 {
        let first = usize::try_from(dump.first()).unwrap_or(usize::MAX);
        for i in 0..dump.len() {
            if !slots.owned_at(first.saturating_add(i)) {
                continue;
            }
            let Some(s) = dump.get(i) else {
                continue;
            };
            match slots.observe(&s) {
                Observed::NotOurs => {}
                Observed::Moved(d) => out.moved.push((s.flow_id, d)),
                Observed::Unchanged { last_hit } => {
                    let hw = if last_hit == 0 {
                        0
                    } else {
                        last_hit.saturating_add_signed(self.time_offset_ns)
                    };
                    if self.now.saturating_sub(hw) > self.min_idle {
                        out.idle.push((s.flow_id, hw));
                    }
                }
            }
        }
        u64::try_from(dump.len()).unwrap_or(u64::MAX)
    }
}

impl<Io: DeviceIo> Worker<Io> {
    /// One reconcile tick at `now`: device health, recovery if down, one chunk of the
    /// counter sweep with idle checks, completions, conntrack GC, queued commands.
    pub fn reconcile(&mut self, now: u64) {
        self.stats.reconcile_ticks += 1;
        self.hold_in_flight(now);
        self.check_events(now);
        self.check_health(now);
        if !self.device_up {
            self.try_recover(now);
        }
        if self.device_up {
            self.collect_counters(now, false);
        }
        if self.device_up {
            self.start_counter_pull(now);
        }
        self.reap(now);
        self.ct.gc(now, self.cfg.gc_budget);
        self.drain_ct_events(now);
        self.flush(now);
    }

    /// Pulls the whole table's counters in one go (every chunk, from slot 0, waiting
    /// for each dump without spinning), e.g. before reading totals, or in a benchmark.
    pub fn reconcile_full_sweep(&mut self, now: u64) {
        let cap = self.dev.capabilities().flow_capacity;
        if self.device_up {
            // A chunk a tick started is folded first: its records are not lost.
            self.collect_counters(now, true);
        }
        self.cursor = 0;
        while self.device_up && self.cursor < cap {
            self.start_counter_pull(now);
            self.collect_counters(now, true);
        }
        self.reap(now);
        self.flush(now);
    }

    /// Starts the `COUNTER_DUMP` of the next chunk unless one is in flight.
    fn start_counter_pull(&mut self, now: u64) {
        let cap = self.dev.capabilities().flow_capacity;
        if cap == 0 || self.dev.counter_dump_pending() {
            return;
        }
        if self.cursor >= cap {
            self.cursor = 0;
        }
        let n = self
            .cfg
            .counter_slots_per_tick
            .max(1)
            .min(self.dev.counter_dump_chunk())
            .min(cap - self.cursor);
        match self.dev.start_counter_dump(self.cursor, n) {
            Ok(true) => self.cursor += n,
            // Ring full: the next tick tries again.
            Ok(false) => {}
            Err(_) => self.device_fault(now),
        }
    }

    /// Folds the chunk in flight once the device has written it (`wait`: wait for it).
    fn collect_counters(&mut self, now: u64, wait: bool) {
        if !self.dev.counter_dump_pending() {
            return;
        }
        let scan = Scan {
            now,
            min_idle: self.cfg.policy.tcp_idle_ns.min(self.cfg.policy.udp_idle_ns),
            time_offset_ns: self.cfg.device_time_offset_ns,
        };
        let mut out = std::mem::take(&mut self.sweep);
        out.moved.clear();
        out.idle.clear();
        let dump = if wait {
            self.dev.wait_counter_dump().map(Some)
        } else {
            self.dev.poll_counter_dump()
        };
        let records = match dump {
            Ok(Some(dump)) => scan.run(&dump, &mut self.slots, &mut out),
            Ok(None) => 0,
            Err(_) => {
                self.sweep = out;
                self.device_fault(now);
                return;
            }
        };
        self.stats.counter_records += records;
        self.fold_moved(&out.moved, now);
        self.check_idle_candidates(&out.idle, scan.min_idle, now);
        self.sweep = out;
    }

    /// Invariant 3: each moved slot's delta into its connection, once.
    fn fold_moved(&mut self, moved: &[(FlowId, Delta)], now: u64) {
        for &(id, d) in moved {
            let Some(o) = self.slots.get(id) else {
                continue;
            };
            let (h, dir, l2) = (o.conn, o.dir, o.l2_len);
            self.fold_counts(h, dir, &d, l2);
            if self.slots.keepalive_due(id, now, KEEPALIVE_EVERY_NS) {
                self.ct.keep_alive(h.slot, now);
            }
        }
    }

    /// Slots whose own newest hit is old: the check runs at the later of the
    /// connection's two slots in sweep order, so both directions' last hits are fresh
    /// when it decides; the partner's slot is read only for such candidates.
    fn check_idle_candidates(&mut self, idle: &[(FlowId, u64)], min_idle: u64, now: u64) {
        for &(id, hw) in idle {
            let Some(o) = self.slots.get(id) else {
                continue;
            };
            let (h, since, partner) = (o.conn, o.since, o.partner());
            if now.saturating_sub(hw.max(since)) <= min_idle {
                continue;
            }
            if let Some(p) = partner {
                if p > id {
                    continue;
                }
                let pl = self.slots.last_hit(p);
                let other = if pl == 0 { 0 } else { self.agent_time(pl) };
                if now.saturating_sub(other) <= min_idle {
                    continue;
                }
            }
            self.check_idle(h, now);
        }
    }
}
