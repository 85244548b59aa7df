//! What the control plane needs from a worker, serviced between polls: observing
//! what happens to connections (for the event journal and metrics), changing the
//! policy, and returning every flow to software (drain). Nothing here runs unless
//! the control plane asks: a worker without an observer does no extra work.

use std::collections::HashMap;

use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::table::{Counter, Event, RemoveReason, Status};
use ctoffload_fallback_sw::tcp::TcpState;
use ctoffload_fallback_sw::tuple::Tuple;

use super::policy::{NotOffloaded, OffloadPolicy};
use super::state::{AfterDelete, ConnHandle, HwState};
use super::worker::Worker;
use ctoffload_fallback_sw::conntrack::Teardown;

/// One thing that happened to a connection, in the order it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// Conntrack created it.
    New {
        /// Connection id.
        id: u64,
        /// Its tuples.
        tuples: [Tuple; 2],
    },
    /// The slow path saw its TCP state change.
    StateChange {
        /// Connection id.
        id: u64,
        /// Its original tuple.
        original: Tuple,
        /// The state before.
        old: TcpState,
        /// The state now.
        new: TcpState,
    },
    /// Both of its rules are live in hardware.
    Offloaded {
        /// Connection id.
        id: u64,
        /// Its original tuple.
        original: Tuple,
        /// From the inserts being queued to both completions applied (ns).
        latency_ns: u64,
    },
    /// It left hardware and continues in software.
    Returned {
        /// Connection id.
        id: u64,
        /// Its original tuple.
        original: Tuple,
        /// Why.
        reason: NotOffloaded,
    },
    /// Conntrack removed it.
    Destroyed {
        /// Connection id.
        id: u64,
        /// Its tuples.
        tuples: [Tuple; 2],
        /// Final counters per direction (software plus hardware).
        counters: [Counter; 2],
        /// The part hardware counted.
        hw_counters: [Counter; 2],
        /// Why it left.
        reason: RemoveReason,
        /// Status bits at the end.
        status: Status,
    },
}

/// The worker's record of [`Observed`] events, until the control plane takes them.
#[derive(Debug, Default)]
pub struct Observer {
    out: Vec<Observed>,
    /// Hardware counters of connections freed before their Destroy event.
    hw: HashMap<u64, [Counter; 2]>,
}

impl Observer {
    pub(super) fn state_change(&mut self, id: u64, original: Tuple, old: TcpState, new: TcpState) {
        self.out.push(Observed::StateChange {
            id,
            original,
            old,
            new,
        });
    }

    pub(super) fn conntrack_event(&mut self, ev: Event) {
        match ev {
            Event::New { id, tuples } => self.out.push(Observed::New { id, tuples }),
            Event::Destroy {
                id,
                tuples,
                counters,
                reason,
                status,
            } => {
                let hw_counters = self.hw.remove(&id).unwrap_or_default();
                self.out.push(Observed::Destroyed {
                    id,
                    tuples,
                    counters,
                    hw_counters,
                    reason,
                    status,
                });
            }
        }
    }

    /// The side-table record of `id` went away with these hardware counters.
    pub(super) fn hw_final(&mut self, id: u64, hw: [Counter; 2]) {
        let found = self.out.iter_mut().rev().find_map(|o| match o {
            Observed::Destroyed {
                id: d, hw_counters, ..
            } if *d == id => Some(hw_counters),
            _ => None,
        });
        match found {
            Some(h) => *h = hw,
            None => {
                self.hw.insert(id, hw);
            }
        }
    }
}

impl<Io: DeviceIo> Worker<Io> {
    /// Start (or stop) recording [`Observed`] events.
    pub fn set_observing(&mut self, on: bool) {
        self.observer = on.then(Observer::default);
    }

    /// Move the recorded events into `out`.
    pub fn take_observed(&mut self, out: &mut Vec<Observed>) {
        if let Some(o) = self.observer.as_mut() {
            out.append(&mut o.out);
            // Counters of connections freed long ago whose Destroy never came.
            if o.hw.len() > 65_536 {
                o.hw.clear();
            }
        }
    }

    pub(super) fn observe_offloaded(&mut self, h: ConnHandle, latency_ns: u64) {
        if let Some(o) = self.observer.as_mut()
            && let Some(c) = self.ct.table().get(h.slot)
        {
            o.out.push(Observed::Offloaded {
                id: h.id,
                original: c.tuples[0],
                latency_ns,
            });
        }
    }

    pub(super) fn observe_returned(&mut self, h: ConnHandle, reason: NotOffloaded) {
        if let Some(o) = self.observer.as_mut()
            && let Some(c) = self.ct.table().get(h.slot)
        {
            o.out.push(Observed::Returned {
                id: h.id,
                original: c.tuples[0],
                reason,
            });
        }
    }

    pub(super) fn observe_freed(&mut self, id: u64, hw: [Counter; 2]) {
        if let Some(o) = self.observer.as_mut() {
            o.hw_final(id, hw);
        }
    }

    /// The offload policy in force.
    pub fn policy(&self) -> OffloadPolicy {
        self.cfg.policy
    }

    /// Replace the offload policy; connections already in hardware stay there.
    pub fn set_policy(&mut self, policy: OffloadPolicy) {
        self.cfg.policy = policy;
    }

    /// The worker's configuration.
    pub fn config(&self) -> &super::worker::WorkerConfig {
        &self.cfg
    }

    /// Connections queued for hardware or waiting for their completions.
    pub fn pending_offloads(&self) -> usize {
        self.side
            .values()
            .filter(|r| r.state == HwState::Pending)
            .count()
    }

    /// Return every offloaded connection to software (operator drain): their rules
    /// are deleted and, once confirmed gone, they continue in software with reason
    /// [`NotOffloaded::Drained`]. Returns how many were offloaded.
    pub fn drain(&mut self, now: u64) -> u64 {
        let handles: Vec<ConnHandle> = self
            .side
            .iter()
            .filter(|(_, r)| r.state == HwState::Offloaded)
            .map(|(&id, r)| ConnHandle { slot: r.slot, id })
            .collect();
        for &h in &handles {
            self.begin_delete(
                h,
                AfterDelete::Return(Teardown::Returned, NotOffloaded::Drained),
                now,
            );
        }
        self.flush(now);
        handles.len() as u64
    }
}
