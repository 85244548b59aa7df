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
//! - moves the connection's hardware last-hit forward, refreshes its conntrack timeout
//!   (`keep_alive`), and only when the flow has been idle in *both* directions for its
//!   protocol's idle timeout starts its removal (invariant 1): delete in hardware,
//!   wait for the completion, then return it to software with the idle time
//!   subtracted from its conntrack timeout (invariant 2 and Linux flowtable teardown).
//!
//! Work per tick is bounded by the slot budget plus the GC budget; a full sweep of the
//! table takes `capacity / counter_slots_per_tick` ticks and must stay under 25 s.
//!
//! Slots whose counters did not move cost an array read: no hash lookup, no conntrack
//! access, unless the slot table says the flow may be idle.

use ctoffload_driver::io::DeviceIo;

use super::worker::Worker;

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
            self.pull_counters(now);
        }
        self.reap(now);
        self.ct.gc(now, self.cfg.gc_budget);
        self.drain_ct_events(now);
        self.flush(now);
    }

    /// Pulls the whole table's counters in one go (every chunk), e.g. before reading
    /// totals, or in a benchmark.
    pub fn reconcile_full_sweep(&mut self, now: u64) {
        let cap = self.dev.capabilities().flow_capacity;
        let per = self.cfg.counter_slots_per_tick.max(1);
        let ticks = cap.div_ceil(per);
        self.cursor = 0;
        for _ in 0..ticks {
            if !self.device_up {
                break;
            }
            self.pull_counters(now);
        }
        self.reap(now);
        self.flush(now);
    }

    fn pull_counters(&mut self, now: u64) {
        let cap = self.dev.capabilities().flow_capacity;
        if cap == 0 {
            return;
        }
        if self.cursor >= cap {
            self.cursor = 0;
        }
        let n = self
            .cfg
            .counter_slots_per_tick
            .max(1)
            .min(cap - self.cursor);
        let mut samples = std::mem::take(&mut self.samples);
        samples.clear();
        if self
            .dev
            .dump_counters(self.cursor, n, &mut samples)
            .is_err()
        {
            self.samples = samples;
            self.device_fault(now);
            return;
        }
        self.cursor += n;
        // Candidates for the idle check are found in the slot table alone: the newest
        // activity it knows of must be older than the shortest idle timeout
        // (check_idle then decides with the software last-seen too).
        let min_idle = self.cfg.policy.tcp_idle_ns.min(self.cfg.policy.udp_idle_ns);
        for s in &samples {
            self.stats.counter_records += 1;
            let Some(rec) = self.slots.get_mut(s.flow_id) else {
                continue;
            };
            let Some((h, dir)) = rec.owner else {
                continue;
            };
            if !s.valid || s.generation != rec.generation {
                continue;
            }
            let changed = rec.changed(&s.counters);
            let d = changed.then(|| rec.update(&s.counters));
            if !changed {
                rec.last_hit = s.counters.last_hit;
            }
            let last = rec.last_hit;
            let since = rec.since;
            let l2 = rec.l2_len;
            let partner = rec.partner();
            if let Some(d) = d {
                self.fold_counts(h, dir, &d, l2);
                self.ct.keep_alive(h.slot, now);
            }
            // This direction moved recently: the connection is not idle. Otherwise the
            // check runs at the later of the connection's two slots in sweep order, so
            // both directions' last hits are fresh when it decides; the partner's slot
            // (a random access) is read only for such candidates.
            let own = if last == 0 { 0 } else { self.agent_time(last) }.max(since);
            if now.saturating_sub(own) <= min_idle {
                continue;
            }
            if let Some(p) = partner {
                if p > s.flow_id {
                    continue;
                }
                let pl = self.slots.get(p).map_or(0, |o| o.last_hit);
                let other = if pl == 0 { 0 } else { self.agent_time(pl) };
                if now.saturating_sub(other) <= min_idle {
                    continue;
                }
            }
            self.check_idle(h, now);
        }
        self.samples = samples;
    }
}
