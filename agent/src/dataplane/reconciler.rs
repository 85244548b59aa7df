//! The reconciler: the periodic, incremental counter pull that keeps software's view
//! of offloaded flows true.
//!
//! Each [`Worker::reconcile`] tick pulls the counters of the next
//! `counter_slots_per_tick` device slots with `COUNTER_DUMP` (one DMA per chunk, no
//! per-flow register reads) and, for every slot that holds one of our rules:
//!
//! - turns the raw counters into a wrap-safe delta and keeps it in the slot table
//!   ([`super::slots`]) as *unfolded* counts, without touching the connection (lazy
//!   folding). A connection's hardware counts are its folded counts plus its slots'
//!   unfolded ones ([`Worker::counters`] adds them on read); the unfolded counts are
//!   folded into conntrack exactly once (invariant 3): when the slot leaves (the
//!   delete's completion brings the final counters; a fault; a lost entry), when they
//!   would overflow, or when [`Worker::reconcile_full_sweep`] folds every slot;
//! - moves the slot's hardware last-hit forward, and only when the flow has been idle
//!   in *both* directions for its protocol's idle timeout starts its removal
//!   (invariant 1): delete in hardware, wait for the completion, then return it to
//!   software with the idle time subtracted from its conntrack timeout (invariant 2
//!   and Linux flowtable teardown).
//!
//! Work per tick is bounded by the slot budget plus the GC budget, and a tick never waits
//! for the device: it collects the chunk whose `COUNTER_DUMP` the previous tick started
//! (decoded in place from the dump buffer, no copy), then starts the next one. A full
//! sweep of the table takes `capacity / counter_slots_per_tick` ticks and must stay
//! under 25 s.
//!
//! Where the device supports it (`FEATURES.COUNTER_DUMP_CHANGED`), the ticks ask for
//! `CHANGED` dumps: the device writes records only for the entries hit since its
//! previous such dump of the slot (packed, in slot order), so a tick's work follows the
//! traffic, not the table size: the records of moved slots against the seen array,
//! then the idle check over the chunk's 8-byte last-hits ([`Slots::idle_candidates`]),
//! read only in the groups of 64 slots whose idle floor is below the idle limit.
//! A slot the device does not report has not moved since it was last reported, and
//! the agent's baseline for it is at least that new (an earlier full dump may have
//! moved it further; a reported slot without a move is then simply unchanged). After a
//! restore the next pass is a full one: adopted slots get their first baseline (their
//! counts since the original insert) whether or not they are hit.
//!
//! Per slot the sweep reads the slot table's seen array in slot order, and writes it
//! when the counters moved: no hash lookup and no conntrack access, unless the slot
//! may be idle. The conntrack timeout of an offloaded connection is held far ahead
//! (Linux `nf_ct_offload_timeout`: a day, extended once less than 5 minutes remain);
//! it is kept alive on a schedule, not by counter moves: each offloaded connection
//! once a day, [`KEEPALIVE_LEAD_NS`] before its timeout, so GC can never expire a
//! flow that is in hardware (invariant 1); the idle check decides when it leaves.

use ctoffload_driver::io::DeviceIo;
use ctoffload_driver::{CounterDump, CounterSample};
use ctoffload_hw_regs::FlowId;

use super::slots::{Counts, Observed, Slots, Taken};
use super::worker::Worker;

/// How long before an offloaded connection's conntrack timeout the reconciler keeps
/// it alive: inside the 5 minutes in which conntrack extends it, and far more than a
/// sweep (≤ 25 s) or a late tick.
pub const KEEPALIVE_LEAD_NS: u64 = 240 * 1_000_000_000;
/// When a keep-alive did not move the timeout past the lead (a state conntrack does
/// not extend), the next try.
pub const KEEPALIVE_RETRY_NS: u64 = 60 * 1_000_000_000;

/// Reusable lists the sweep fills from one chunk (no allocation per tick).
#[derive(Debug, Default)]
pub struct SweepScratch {
    idle: Vec<(FlowId, u64)>,
    fold_now: Vec<(FlowId, Counts)>,
    taken: Vec<Taken>,
    /// The ticks pull full dumps until the cursor next wraps (after a restore).
    full_pass: bool,
}

/// Where one chunk's records leave work: the slots whose unfolded counts must be
/// folded now, and the slots whose newest hit (agent time) is older than `min_idle`.
struct Scan {
    now: u64,
    min_idle: u64,
    time_offset_ns: i64,
    /// Take every visited slot's unfolded counts out to be folded (full sweep).
    fold_all: bool,
}

/// How a chunk is collected.
#[derive(Debug, Clone, Copy)]
enum Pull {
    /// If the device has written it (a tick).
    Poll,
    /// Waiting for it; `fold_all`: folding every visited slot (full sweep).
    Wait { fold_all: bool },
}

/// What one chunk's records added up to.
#[derive(Debug, Default)]
struct ScanTotals {
    records: u64,
    slots: u64,
    moved: Counts,
}

impl Scan {
    /// One record against the slot table: what it moved (kept unfolded), and the
    /// folds and idle candidates it leaves in `out`.
    fn observe(
        &self,
        s: &CounterSample,
        packed: bool,
        slots: &mut Slots,
        out: &mut SweepScratch,
    ) -> Counts {
        let observed = slots.observe(s);
        if self.fold_all {
            // After the observation: its move is folded too.
            let unfolded = slots.take_unfolded(s.flow_id);
            if !unfolded.is_zero() {
                out.fold_now.push((s.flow_id, unfolded));
            }
        }
        match observed {
            Observed::NotOurs => Counts::default(),
            // A packed dump's idle slots come from the slot table, not its records.
            Observed::Unchanged { .. } if packed => Counts::default(),
            Observed::Moved(d) => d,
            Observed::MovedFoldNow { delta, unfolded } => {
                out.fold_now.push((s.flow_id, unfolded));
                delta
            }
            Observed::Unchanged { last_hit } => {
                let hw = if last_hit == 0 {
                    0
                } else {
                    last_hit.saturating_add_signed(self.time_offset_ns)
                };
                if self.now.saturating_sub(hw) > self.min_idle {
                    out.idle.push((s.flow_id, hw));
                }
                Counts::default()
            }
        }
    }

    /// The sequential part of the sweep: the record of every slot we own against the
    /// slot table's seen array, nothing else (records of other slots are not read).
    /// A packed (`CHANGED`) dump holds only moved slots: idleness is then read from
    /// the slot table for the whole range instead of from the records.
    fn run(&self, dump: &CounterDump<'_>, slots: &mut Slots, out: &mut SweepScratch) -> ScanTotals {
        let first = usize::try_from(dump.first()).unwrap_or(usize::MAX);
        let range = first..first.saturating_add(dump.range_len());
        let packed = dump.is_packed();
        let mut moved = Counts::default();
        for i in 0..dump.len() {
            if !packed && !slots.owned_at(first.saturating_add(i)) {
                continue;
            }
            let Some(s) = dump.get(i) else {
                continue;
            };
            if packed && !range.contains(&usize::try_from(s.flow_id.get()).unwrap_or(usize::MAX)) {
                // A record outside the range asked for: not believed.
                continue;
            }
            moved = moved.plus(self.observe(&s, packed, slots, out));
        }
        if packed {
            slots.idle_candidates(
                range,
                self.now,
                self.min_idle,
                self.time_offset_ns,
                &mut out.idle,
            );
        }
        ScanTotals {
            records: u64::try_from(dump.len()).unwrap_or(u64::MAX),
            slots: u64::try_from(dump.range_len()).unwrap_or(u64::MAX),
            moved,
        }
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
            self.collect_counters(now, Pull::Poll);
        }
        if self.device_up {
            self.start_counter_pull(now, true);
        }
        self.keep_offloaded_alive(now);
        self.reap(now);
        self.ct.gc(now, self.cfg.gc_budget);
        self.drain_ct_events(now);
        self.flush(now);
    }

    /// Pulls the whole table's counters in one go (every chunk, from slot 0, waiting
    /// for each dump without spinning), then folds every slot's unfolded counts into
    /// its connection: afterwards conntrack's own counters are complete, e.g. before
    /// reading totals from conntrack directly (tests, benchmarks, replay).
    pub fn reconcile_full_sweep(&mut self, now: u64) {
        self.sweep_all(now, true);
    }

    /// Pulls the whole table's counters in one go, as
    /// [`Self::reconcile_full_sweep`] does, but leaves the moves unfolded in the slot
    /// table, as the ticks do.
    pub fn pull_all_counters(&mut self, now: u64) {
        self.sweep_all(now, false);
    }

    /// Every chunk from slot 0, waiting for each dump; `fold_all`: every slot's
    /// unfolded counts are folded on the way (in the scan, no second walk).
    fn sweep_all(&mut self, now: u64, fold_all: bool) {
        let cap = self.dev.capabilities().flow_capacity;
        if self.device_up {
            // A chunk a tick started is collected first: its records are not lost.
            self.collect_counters(now, Pull::Wait { fold_all });
        }
        self.cursor = 0;
        while self.device_up && self.cursor < cap {
            self.start_counter_pull(now, false);
            self.collect_counters(now, Pull::Wait { fold_all });
        }
        self.reap(now);
        self.flush(now);
    }

    /// Folds the unfolded counts of every slot into its connection (invariant 3:
    /// each exactly once; they leave the slot), before the slot table is reset at a
    /// device fault. (The full sweep folds on its way instead.)
    pub(super) fn fold_all_slots(&mut self) {
        let mut taken = std::mem::take(&mut self.sweep.taken);
        taken.clear();
        self.slots.take_all_unfolded(&mut taken);
        for t in &taken {
            self.fold_taken(t);
        }
        taken.clear();
        self.sweep.taken = taken;
    }

    /// Keeps the conntrack timeout of offloaded connections from running out: each
    /// one whose keep-alive is due (at most the GC budget per tick) is extended by
    /// conntrack and rescheduled [`KEEPALIVE_LEAD_NS`] before its new timeout.
    fn keep_offloaded_alive(&mut self, now: u64) {
        for _ in 0..self.cfg.gc_budget.max(1) {
            let Some((id, h)) = self.slots.next_keepalive(now) else {
                return;
            };
            self.ct.keep_alive(h.slot, now);
            let Some(timeout) = self.ct.table().get_checked(h.slot, h.id).map(|c| c.timeout) else {
                continue;
            };
            let due = timeout.saturating_sub(KEEPALIVE_LEAD_NS);
            let next = if due > now {
                due
            } else {
                now.saturating_add(KEEPALIVE_RETRY_NS)
            };
            self.slots.schedule_keepalive(id, next);
        }
    }

    /// The ticks' next pass starts at slot 0 and pulls full dumps (every slot's
    /// record, not only the moved ones): after a restore, so that every adopted slot
    /// gets its baseline.
    pub(super) fn pull_full_pass_next(&mut self) {
        self.cursor = 0;
        self.sweep.full_pass = true;
    }

    /// Starts the `COUNTER_DUMP` of the next chunk unless one is in flight;
    /// `changed_ok`: a `CHANGED` dump (only the entries hit since the previous one)
    /// where the device has it and no full pass is due.
    fn start_counter_pull(&mut self, now: u64, changed_ok: bool) {
        let cap = self.dev.capabilities().flow_capacity;
        if cap == 0 || self.dev.counter_dump_pending() {
            return;
        }
        if self.cursor >= cap {
            self.cursor = 0;
            self.sweep.full_pass = false;
        }
        let n = self
            .cfg
            .counter_slots_per_tick
            .max(1)
            .min(self.dev.counter_dump_chunk())
            .min(cap - self.cursor);
        let changed =
            changed_ok && !self.sweep.full_pass && self.dev.supports_changed_counter_dump();
        let started = if changed {
            self.dev.start_changed_counter_dump(self.cursor, n)
        } else {
            self.dev.start_counter_dump(self.cursor, n)
        };
        match started {
            Ok(true) => self.cursor += n,
            // Ring full: the next tick tries again.
            Ok(false) => {}
            Err(_) => self.device_fault(now),
        }
    }

    /// Collects the chunk in flight once the device has written it (`Pull::Wait`: wait
    /// for it).
    fn collect_counters(&mut self, now: u64, pull: Pull) {
        if !self.dev.counter_dump_pending() {
            return;
        }
        let scan = Scan {
            now,
            min_idle: self.cfg.policy.tcp_idle_ns.min(self.cfg.policy.udp_idle_ns),
            time_offset_ns: self.cfg.device_time_offset_ns,
            fold_all: matches!(pull, Pull::Wait { fold_all: true }),
        };
        let mut out = std::mem::take(&mut self.sweep);
        out.fold_now.clear();
        out.idle.clear();
        let dump = match pull {
            Pull::Wait { .. } => self.dev.wait_counter_dump().map(Some),
            Pull::Poll => self.dev.poll_counter_dump(),
        };
        let totals = match dump {
            Ok(Some(dump)) => scan.run(&dump, &mut self.slots, &mut out),
            Ok(None) => ScanTotals::default(),
            Err(_) => {
                self.sweep = out;
                self.device_fault(now);
                return;
            }
        };
        self.stats.counter_records += totals.records;
        self.stats.counter_slots += totals.slots;
        self.count_hw(totals.moved);
        for &(id, unfolded) in &out.fold_now {
            if let Some(&owner) = self.slots.get(id) {
                self.fold_taken(&Taken { owner, unfolded });
            }
        }
        self.check_idle_candidates(&out.idle, scan.min_idle, now);
        self.sweep = out;
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
