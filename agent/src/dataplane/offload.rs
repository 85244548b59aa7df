//! Driving a connection through its hardware states: queueing inserts and deletes,
//! applying their completions, and the after-delete actions (return to software with
//! the conntrack fix-up, or free). Everything here runs inside the worker.

use ctoffload_driver::device::{CommandResult, FlowCommand, Outcome};
use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::conntrack::Teardown;
use ctoffload_fallback_sw::table::Counter;
use ctoffload_fallback_sw::tuple::Dir;
use ctoffload_hw_regs::limits::BYTE_COUNTER_MASK;
use ctoffload_hw_regs::{CompletionStatus, FlowId};

use super::policy::{NotOffloaded, idle_timeout};
use super::router::rules_for;
use super::slots::{Counts, Delta, Finished, Owner, Taken};
use super::state::{AfterDelete, CmdKind, ConnHandle, Entry, HwConn, HwState, Tagged, add};
use super::worker::Worker;

const DIRS: [Dir; 2] = [Dir::Original, Dir::Reply];
/// Hold a connection with outstanding commands this far ahead...
const HOLD_NS: u64 = 86_400 * 1_000_000_000;
/// ...whenever less than this remains.
const HOLD_MIN_NS: u64 = 300 * 1_000_000_000;

impl<Io: DeviceIo> Worker<Io> {
    /// Builds the rules and queues both inserts; the connection becomes `Pending` and
    /// is marked offloaded in conntrack (its timeout is held, so software GC cannot
    /// free it while a rule may exist).
    pub(super) fn start_offload(&mut self, h: ConnHandle, now: u64) {
        let Some(conn) = self.ct.table().get(h.slot) else {
            return;
        };
        let tuples = conn.tuples;
        let Some(rec) = self.side.get_mut(&h.id) else {
            return;
        };
        let Some(orig_in) = rec.orig_in else {
            return;
        };
        let rules = match rules_for(
            self.router.as_ref(),
            &self.cfg.routing,
            &tuples,
            orig_in,
            now,
        ) {
            Ok(r) => r,
            Err(e) => {
                rec.reason = Some(NotOffloaded::NoRule(e));
                return;
            }
        };
        if self.ct.mark_offloaded(h.slot, now).is_err() {
            return;
        }
        rec.rules = Some(rules);
        rec.queued_at = now;
        rec.entries = [Entry::Inserting; 2];
        rec.state = HwState::Pending;
        rec.abort = false;
        for d in DIRS {
            let r = rules[d.index()];
            self.queue.push_back(Tagged {
                cmd: FlowCommand::Insert {
                    key: r.key,
                    action: r.action,
                },
                conn: h,
                dir: d,
                kind: CmdKind::Insert,
            });
        }
    }

    /// Queues the deletes of every installed rule; the connection becomes `Dying` and
    /// `after` runs once all are confirmed gone.
    pub(super) fn begin_delete(&mut self, h: ConnHandle, after: AfterDelete, now: u64) {
        let Some(rec) = self.side.get_mut(&h.id) else {
            return;
        };
        rec.state = HwState::Dying(after);
        let Some(rules) = rec.rules else {
            self.settle(h, now);
            return;
        };
        for d in DIRS {
            if let Entry::Installed {
                flow_id,
                generation,
            } = rec.entries[d.index()]
            {
                rec.entries[d.index()] = Entry::Deleting {
                    flow_id,
                    generation,
                };
                self.queue.push_back(Tagged {
                    cmd: FlowCommand::Delete {
                        flow_id,
                        key: rules[d.index()].key,
                    },
                    conn: h,
                    dir: d,
                    kind: CmdKind::Delete,
                });
            }
        }
        self.settle(h, now);
    }

    /// Deletes the installed rules of a record that no connection owns any more.
    pub(super) fn orphan_entries(&mut self, h: ConnHandle, rec: &HwConn) {
        let Some(rules) = rec.rules else { return };
        for d in DIRS {
            if let Entry::Installed { flow_id, .. } | Entry::Deleting { flow_id, .. } =
                rec.entries[d.index()]
            {
                self.queue.push_back(Tagged {
                    cmd: FlowCommand::Delete {
                        flow_id,
                        key: rules[d.index()].key,
                    },
                    conn: h,
                    dir: d,
                    kind: CmdKind::Orphan,
                });
            }
        }
    }

    /// Applies one completion.
    pub(super) fn completed(&mut self, t: Tagged, r: &CommandResult, now: u64) {
        match t.kind {
            CmdKind::Insert => self.insert_done(t, r, now),
            CmdKind::Delete => self.delete_done(t, r, now),
            CmdKind::Orphan => {
                // Only a successful delete frees the slot (NOT_FOUND: someone else's).
                // Its counts have nobody to go to (they were counted in the
                // statistics when pulled).
                if let (true, Some(id)) = (r.is_ok(), r.flow_id) {
                    self.slots.release(id);
                }
            }
        }
    }

    fn insert_done(&mut self, t: Tagged, r: &CommandResult, now: u64) {
        let Some(rec) = self.side.get(&t.conn.id) else {
            // The connection is gone: a rule installed for it must not stay.
            if r.is_ok() {
                if let (Some(flow_id), FlowCommand::Insert { key, .. }) = (r.flow_id, t.cmd) {
                    self.queue.push_back(Tagged {
                        cmd: FlowCommand::Delete { flow_id, key },
                        kind: CmdKind::Orphan,
                        ..t
                    });
                }
            }
            return;
        };
        if rec.entries[t.dir.index()] != Entry::Inserting {
            return;
        }
        let l2 = rec.l2_len[t.dir.index()];
        let entry = match (r.outcome, r.flow_id) {
            (Outcome::Status(CompletionStatus::Ok), Some(flow_id)) => {
                // A slot the device hands out again: whatever its previous owner had
                // not folded goes to that owner first.
                if let Some(prev) = self.slots.release(flow_id) {
                    self.fold_taken(&prev);
                }
                self.slots
                    .install(flow_id, (t.conn, t.dir), r.generation, now, l2);
                Entry::Installed {
                    flow_id,
                    generation: r.generation,
                }
            }
            (Outcome::Status(CompletionStatus::TableFull), _) => {
                self.stats.insert_table_full += 1;
                Entry::Failed(NotOffloaded::TableFull)
            }
            (Outcome::Status(CompletionStatus::BucketFull | CompletionStatus::Exists), _) => {
                self.stats.insert_collision += 1;
                Entry::Failed(NotOffloaded::Collision)
            }
            (Outcome::Aborted, _) => Entry::Failed(NotOffloaded::DeviceDown),
            _ => {
                self.stats.insert_error += 1;
                Entry::Failed(NotOffloaded::DeviceError)
            }
        };
        if let Some(rec) = self.side.get_mut(&t.conn.id) {
            rec.entries[t.dir.index()] = entry;
        }
        self.settle(t.conn, now);
    }

    fn delete_done(&mut self, t: Tagged, r: &CommandResult, now: u64) {
        let Some(rec) = self.side.get(&t.conn.id) else {
            return;
        };
        let Entry::Deleting {
            flow_id,
            generation,
        } = rec.entries[t.dir.index()]
        else {
            return;
        };
        let l2_len = rec.l2_len[t.dir.index()];
        match r.outcome {
            Outcome::Status(CompletionStatus::Ok) => {
                self.set_entry(t, Entry::Absent);
                // Invariant 3: what the pulls left unfolded plus the final counters
                // since the last pull, exactly once.
                let f = self
                    .slots
                    .finish(flow_id, generation, &r.counters)
                    .unwrap_or_else(|| {
                        // Not in the slot table: the counters are all since insert.
                        let counts = Counts {
                            packets: u64::from(r.counters.packets),
                            bytes: r.counters.bytes & BYTE_COUNTER_MASK,
                        };
                        Finished {
                            taken: Taken {
                                owner: Owner::new((t.conn, t.dir), 0, l2_len),
                                unfolded: counts,
                            },
                            last: Delta {
                                counts,
                                last_hit: r.counters.last_hit,
                            },
                        }
                    });
                self.count_hw(f.last.counts);
                self.fold_taken(&f.taken);
                if f.last.last_hit != 0 {
                    let hit = self.agent_time(f.last.last_hit);
                    if let Some(rec) = self.side.get_mut(&t.conn.id) {
                        rec.hw_last_hit = rec.hw_last_hit.max(hit);
                    }
                }
            }
            Outcome::Status(CompletionStatus::NotFound) => {
                self.stats.delete_not_found += 1;
                self.set_entry(t, Entry::Absent);
                self.release_slot_of(flow_id, t.conn);
            }
            Outcome::Aborted => return, // the fault handler owns it now
            _ => {
                // DEVICE_ERROR had no effect: retry, still in order behind nothing.
                self.stats.delete_retries += 1;
                self.queue.push_back(t);
                return;
            }
        }
        self.release_slot_of(flow_id, t.conn);
        self.settle(t.conn, now);
    }

    fn set_entry(&mut self, t: Tagged, e: Entry) {
        if let Some(rec) = self.side.get_mut(&t.conn.id) {
            rec.entries[t.dir.index()] = e;
        }
    }

    /// Frees slot `id` if `owner` still owns it, folding what it had not folded.
    fn release_slot_of(&mut self, id: FlowId, owner: ConnHandle) {
        if let Some(t) = self.slots.release_if(id, owner) {
            self.fold_taken(&t);
        }
    }

    /// Hardware packets and bytes pulled from the device: the worker's statistics
    /// count them when pulled (folded into the connections then or later).
    pub(super) fn count_hw(&mut self, c: Counts) {
        self.stats.hw_packets += c.packets;
        self.stats.hw_bytes_l2 += c.bytes;
    }

    /// Folds counts taken out of a slot into its connection, once (invariant 3): L2
    /// bytes turned into L3 bytes as conntrack counts them, into conntrack and into
    /// the record's hardware part.
    pub(super) fn fold_taken(&mut self, t: &Taken) {
        if t.unfolded.is_zero() {
            return;
        }
        let h = t.owner.conn;
        let delta = l3(t.unfolded, t.owner.l2_len);
        if self.ct.table().get_checked(h.slot, h.id).is_some() {
            self.ct.add_external_counts(h.slot, t.owner.dir, delta);
        }
        if let Some(rec) = self.side.get_mut(&h.id) {
            let c = &mut rec.hw_counters[t.owner.dir.index()];
            *c = add(*c, delta);
        }
    }

    /// The hardware counts of a connection that its slots have not folded yet, per
    /// direction (L3 bytes).
    pub(super) fn unfolded_of(&self, h: ConnHandle, rec: &HwConn) -> [Counter; 2] {
        let mut out = [Counter::default(); 2];
        for e in rec.entries {
            let (Entry::Installed { flow_id, .. } | Entry::Deleting { flow_id, .. }) = e else {
                continue;
            };
            let Some(o) = self.slots.get(flow_id).filter(|o| o.conn == h) else {
                continue;
            };
            let d = &mut out[o.dir.index()];
            *d = add(*d, l3(self.slots.unfolded(flow_id), o.l2_len));
        }
        out
    }

    /// Moves a connection on once no command is outstanding for it.
    pub(super) fn settle(&mut self, h: ConnHandle, now: u64) {
        let Some(rec) = self.side.get_mut(&h.id) else {
            return;
        };
        if rec.busy() {
            return;
        }
        let installed = rec
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Installed { .. }))
            .count();
        let failed = rec.entries.iter().find_map(|e| match e {
            Entry::Failed(r) => Some(*r),
            _ => None,
        });
        match rec.state {
            HwState::Pending => {
                let free = rec.free_requested;
                if let Some(reason) = failed {
                    rec.backoff.fail(&self.cfg.policy, now);
                    let after = if free {
                        AfterDelete::Free
                    } else {
                        AfterDelete::Return(Teardown::Returned, reason)
                    };
                    if installed > 0 {
                        self.begin_delete(h, after, now);
                    } else {
                        self.finish_dead(h, after, now);
                    }
                    if !free
                        && reason == NotOffloaded::TableFull
                        && self.cfg.policy.displace_coldest
                    {
                        self.displace_coldest(h, now);
                    }
                } else if rec.abort || free {
                    let after = if free {
                        AfterDelete::Free
                    } else {
                        AfterDelete::Return(Teardown::Returned, NotOffloaded::Closing)
                    };
                    self.begin_delete(h, after, now);
                } else {
                    if let [
                        Entry::Installed { flow_id: a, .. },
                        Entry::Installed { flow_id: b, .. },
                    ] = rec.entries
                    {
                        self.slots.pair(a, b);
                    }
                    rec.state = HwState::Offloaded;
                    rec.reason = None;
                    rec.offloaded_at = now;
                    rec.backoff.reset();
                    self.stats.offloaded += 1;
                    let latency = now.saturating_sub(rec.queued_at);
                    self.ct.set_hw_offloaded(h.slot, true);
                    self.observe_offloaded(h, latency);
                }
            }
            HwState::Dying(after) if installed == 0 => self.finish_dead(h, after, now),
            _ => {}
        }
    }

    /// Every rule is gone (invariant 2): only now return or free the connection.
    fn finish_dead(&mut self, h: ConnHandle, after: AfterDelete, now: u64) {
        let Some(rec) = self.side.get_mut(&h.id) else {
            return;
        };
        rec.state = HwState::Dead;
        rec.entries = [Entry::Absent; 2];
        rec.rules = None;
        if let Some(t) = rec.held_timeout.take() {
            self.ct.table_mut().set_timeout(h.slot, t);
        }
        match after {
            AfterDelete::Return(how, reason) => {
                let how = match how {
                    // The idle time is measured now, from the final counters folded in
                    // by the deletes: a late hit shortens it (invariant 1).
                    Teardown::Idle { .. } => Teardown::Idle {
                        idle_ns: now.saturating_sub(rec.last_active()),
                    },
                    other => other,
                };
                rec.state = HwState::None;
                rec.reason = Some(reason);
                self.stats.returned += 1;
                self.ct.teardown(h.slot, how, now);
                self.observe_returned(h, reason);
            }
            AfterDelete::Free => {
                if let Some(rec) = self.side.remove(&h.id) {
                    self.observe_freed(h.id, rec.hw_counters);
                }
                self.ct.teardown(h.slot, Teardown::Returned, now);
                let _ = self.ct.delete(h.slot);
            }
        }
    }

    /// Table full: take the offloaded flow idle the longest out of hardware so that a
    /// later retry of `for_whom` finds room.
    fn displace_coldest(&mut self, for_whom: ConnHandle, now: u64) {
        let victim = self
            .side
            .iter()
            .filter(|(id, r)| **id != for_whom.id && r.state == HwState::Offloaded)
            .min_by_key(|(_, r)| r.last_active().max(self.slot_last_hit(r)))
            .map(|(id, r)| ConnHandle {
                slot: r.slot,
                id: *id,
            });
        if let Some(v) = victim {
            self.stats.displaced += 1;
            self.begin_delete(
                v,
                AfterDelete::Return(Teardown::Idle { idle_ns: 0 }, NotOffloaded::Displaced),
                now,
            );
            if let Some(rec) = self.side.get_mut(&for_whom.id) {
                rec.backoff.retry_at = now;
            }
        }
    }

    /// Idle check for an offloaded connection (reconciler): past its protocol's idle
    /// timeout it leaves hardware, then returns to software with the idle time
    /// subtracted from its conntrack timeout.
    pub(super) fn check_idle(&mut self, h: ConnHandle, now: u64) {
        let Some(rec) = self.side.get(&h.id) else {
            return;
        };
        if rec.state != HwState::Offloaded {
            return;
        }
        let Some(conn) = self.ct.table().get(h.slot) else {
            return;
        };
        let limit = idle_timeout(&self.cfg.policy, conn.tuples[0].proto);
        let hw = self.slot_last_hit(rec);
        self.ct.keep_alive(h.slot, now);
        let Some(rec) = self.side.get_mut(&h.id) else {
            return;
        };
        rec.hw_last_hit = rec.hw_last_hit.max(hw);
        if now.saturating_sub(rec.last_active()) > limit {
            self.begin_delete(
                h,
                AfterDelete::Return(Teardown::Idle { idle_ns: 0 }, NotOffloaded::Idle),
                now,
            );
        }
    }

    /// The newest hardware hit of a connection's installed rules, as the slot table
    /// last pulled it (agent time; 0 = none).
    pub(super) fn slot_last_hit(&self, rec: &HwConn) -> u64 {
        rec.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Installed { flow_id, .. } | Entry::Deleting { flow_id, .. } => {
                    Some(self.slots.last_hit(*flow_id))
                }
                _ => None,
            })
            .filter(|&t| t != 0)
            .map(|t| self.agent_time(t))
            .max()
            .unwrap_or(0)
    }

    /// Invariant 2 against software time: a connection with a command queued or in
    /// flight is never expired by conntrack (GC or lazy expiry on lookup), however far
    /// `now` runs ahead of the device; its timeout is held and restored when its rules
    /// are dead. Costs O(outstanding commands).
    pub(super) fn hold_in_flight(&mut self, now: u64) {
        let mut held = std::mem::take(&mut self.held_scratch);
        held.clear();
        held.extend(
            self.inflight
                .values()
                .chain(self.queue.iter())
                .filter(|t| t.kind != CmdKind::Orphan)
                .map(|t| t.conn),
        );
        for h in &held {
            let Some(conn) = self.ct.table().get_checked(h.slot, h.id) else {
                continue;
            };
            let timeout = conn.timeout;
            if timeout > now.saturating_add(HOLD_MIN_NS) {
                continue;
            }
            if let Some(rec) = self.side.get_mut(&h.id) {
                rec.held_timeout.get_or_insert(timeout);
                self.ct
                    .table_mut()
                    .set_timeout(h.slot, now.saturating_add(HOLD_NS));
            }
        }
        self.held_scratch = held;
    }

    /// A TCP control packet punted by an offloaded flow's rule: Linux order, the
    /// flowtable teardown fix-up first (window tracking restarts, since software did
    /// not see the segments the device forwarded), then the packet goes through
    /// conntrack; the rules are deleted and the connection stays held until they are.
    pub(super) fn tcp_ctrl_punt(&mut self, flow_id: FlowId, now: u64) {
        let Some((h, _)) = self.slots.owner(flow_id) else {
            return;
        };
        if self.side.get(&h.id).map(|r| r.state) != Some(HwState::Offloaded) {
            return;
        }
        self.ct.teardown(h.slot, Teardown::Returned, now);
        self.begin_delete(
            h,
            AfterDelete::Return(Teardown::Returned, NotOffloaded::Closing),
            now,
        );
        self.hold_in_flight(now);
    }

    /// Operator delete: an offloaded connection leaves hardware first (invariant 2),
    /// then is deleted from software. Returns whether the connection existed.
    pub fn delete_connection(&mut self, h: ConnHandle, now: u64) -> bool {
        if self.ct.table().get_checked(h.slot, h.id).is_none() {
            return false;
        }
        match self.side.get(&h.id).map(|r| r.state) {
            Some(HwState::Offloaded) => self.begin_delete(h, AfterDelete::Free, now),
            Some(HwState::Pending | HwState::Dying(_)) => {
                // Let the outstanding commands finish, then free.
                if let Some(rec) = self.side.get_mut(&h.id) {
                    rec.free_requested = true;
                    if let HwState::Dying(_) = rec.state {
                        rec.state = HwState::Dying(AfterDelete::Free);
                    }
                }
            }
            Some(HwState::None | HwState::Dead) | None => {
                self.side.remove(&h.id);
                let _ = self.ct.delete(h.slot);
            }
        }
        true
    }
}

/// Device counts (L2 bytes) as conntrack counts them (L3 bytes).
fn l3(c: Counts, l2_len: u8) -> Counter {
    Counter {
        packets: c.packets,
        bytes: c
            .bytes
            .saturating_sub(c.packets.saturating_mul(u64::from(l2_len))),
    }
}
