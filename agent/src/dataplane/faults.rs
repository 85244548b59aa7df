//! Invariant 5: hardware is optional at every moment.
//!
//! A fatal error, a device reset (asked for or spontaneous), a command timeout or any
//! driver error takes the device down. Every connection with hardware state then
//! returns to software at once, keeping its conntrack state (a `Returned` teardown;
//! an idle removal in progress keeps its idle fix-up), and traffic continues through
//! the slow path. Counters the device held since the last pull are lost with its
//! table (the device keeps nothing across a reset). Operator deletes that were waiting
//! for a hardware delete are completed only after the device is known empty again.
//! Recovery is the driver's bring-up (`reinit`), retried with a delay; offload resumes
//! with the next packet of each connection. Nothing here panics.

use ctoffload_driver::device::DeviceEvent;
use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::conntrack::Teardown;

use super::policy::NotOffloaded;
use super::state::{AfterDelete, ConnHandle, Entry, HwState};
use super::worker::Worker;

impl<Io: DeviceIo> Worker<Io> {
    /// Reads device events without touching registers on the quiet path.
    pub(super) fn check_events(&mut self, now: u64) {
        if !self.device_up {
            return;
        }
        let mut ev = std::mem::take(&mut self.events);
        ev.clear();
        let failed = self.dev.poll_events(&mut ev).is_err();
        self.after_events(&ev, failed, now);
        self.events = ev;
    }

    /// Reads `STATUS`/`RESET_COUNT` (device.md 17.4: with each counter pull).
    pub(super) fn check_health(&mut self, now: u64) {
        if !self.device_up {
            return;
        }
        let mut ev = std::mem::take(&mut self.events);
        ev.clear();
        let failed = self.dev.check_health(&mut ev).is_err();
        self.after_events(&ev, failed, now);
        self.events = ev;
    }

    fn after_events(&mut self, ev: &[DeviceEvent], failed: bool, now: u64) {
        let fault = failed
            || ev.iter().any(|e| {
                matches!(
                    e,
                    DeviceEvent::Fatal { .. }
                        | DeviceEvent::Reset { .. }
                        | DeviceEvent::CommandTimeout { .. }
                )
            })
            || !self.dev.is_up();
        if fault {
            self.device_fault(now);
        }
    }

    /// The device is down: return everything to software, then try to recover.
    pub(super) fn device_fault(&mut self, now: u64) {
        self.stats.faults += 1;
        self.device_up = false;
        self.lose_hardware_state(now);
        self.recover_at = now;
        self.try_recover(now);
    }

    fn lose_hardware_state(&mut self, now: u64) {
        self.queue.clear();
        self.inflight.clear();
        let cap = usize::try_from(self.dev.capabilities().flow_capacity).unwrap_or(0);
        // Invariant 3: counts pulled but not folded go to their connections first.
        self.fold_all_slots();
        self.slots.reset(cap);
        let held: Vec<(u64, HwState)> = self
            .side
            .iter()
            .filter(|(_, r)| !matches!(r.state, HwState::None | HwState::Dead))
            .map(|(id, r)| (*id, r.state))
            .collect();
        for (id, state) in held {
            let Some(rec) = self.side.get_mut(&id) else {
                continue;
            };
            let h = ConnHandle { slot: rec.slot, id };
            let how = match state {
                HwState::Dying(AfterDelete::Return(Teardown::Idle { .. }, _)) => Teardown::Idle {
                    idle_ns: now.saturating_sub(rec.last_active()),
                },
                _ => Teardown::Returned,
            };
            rec.state = HwState::None;
            rec.entries = [Entry::Absent; 2];
            rec.rules = None;
            rec.reason = Some(NotOffloaded::DeviceDown);
            rec.backoff.reset();
            rec.abort = false;
            let free = rec.free_requested || state == HwState::Dying(AfterDelete::Free);
            rec.free_requested = false;
            self.stats.flows_lost_to_fault += 1;
            self.ct.teardown(h.slot, how, now);
            if free {
                self.pending_free.push(h);
            }
        }
    }

    /// Brings the device back (reset, bring-up), at most once per `recover_retry_ns`.
    pub(super) fn try_recover(&mut self, now: u64) {
        if self.device_up || now < self.recover_at {
            return;
        }
        match self.dev.reinit() {
            Ok(()) => {
                self.device_up = true;
                self.stats.recoveries += 1;
                let cap = usize::try_from(self.dev.capabilities().flow_capacity).unwrap_or(0);
                self.slots.reset(cap);
                // Stale results of the old rings come back as aborted: drop them.
                self.results.clear();
                let _ = self.dev.reap(&mut self.results);
                self.results.clear();
                // The table is empty now: operator deletes can complete.
                for h in std::mem::take(&mut self.pending_free) {
                    self.side.remove(&h.id);
                    let _ = self.ct.delete(h.slot);
                }
            }
            Err(_) => {
                self.stats.recover_failures += 1;
                self.recover_at = now.saturating_add(self.cfg.recover_retry_ns);
            }
        }
    }
}
