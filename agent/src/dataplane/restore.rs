//! Restart: rebuild the worker's connections from what the device still holds.
//!
//! [`Worker::restore`] reads the device table (`TABLE_DUMP`) and pairs its entries into
//! connections: an entry's reply partner is the entry whose key is the inverse of the
//! packets the first one sends out (after its NAT), arriving on its egress port. A pair
//! is adopted only if [`build_rules`](super::hw_rule::build_rules) gives back exactly the
//! same two keys and actions under the current routing; the connection is then
//! re-created in conntrack as an offloaded, assured connection (TCP picked up mid-stream
//! as ESTABLISHED, liberal window tracking, like Linux `nf_conntrack_tcp_loose`) and its
//! record is `Offloaded`. Everything else (unpaired entries, entries the current
//! configuration would not build, tuples already tracked) is deleted from the device.
//!
//! A routed worker (a gateway on host interfaces, [`super::router`]) starts with an
//! empty neighbour table: each entry's next hop MAC is taken into it where the current
//! route leads out of the entry's port (`Router::learn_next_hops`), and the pair must
//! then equal what the router builds from routes and neighbours, as above.
//!
//! Which entry of a pair is the original direction is not recorded in the device: the
//! one with `SNAT` if only one has it, else the one arriving on the lower port. Hardware
//! counts since the original insert are folded in by the first counter pull.
//!
//! Adopted connections' NAT bindings are registered with the NAT engine again
//! (`NatEngine::restored`). Over the same device instance this serves a worker restart
//! ([`Worker::restart`]); across an agent process restart the new driver instance
//! attaches without a reset (`Device::attach`, device.md section 17.5), after the old
//! one detached (`Device::detach`) or died.

use std::collections::HashMap;

use ctoffload_driver::device::{Device, FlowCommand, TableEntry};
use ctoffload_driver::error::DriverError;
use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::conntrack::L4State;
use ctoffload_fallback_sw::table::{Slot, Status};
use ctoffload_fallback_sw::tcp::{TcpConn, TcpFlags, TcpSegment};
use ctoffload_fallback_sw::tuple::{Addr, Dir, Family, Tuple, proto};
use ctoffload_hw_regs::{ActionFlags, FlowKey};

use super::hw_rule::{HwRule, key_of};
use super::router::rules_for;
use super::state::{CmdKind, ConnHandle, Entry, HwConn, HwState, Tagged};
use super::worker::Worker;

/// Held like `mark_offloaded` does: a day.
const OFFLOADED_TIMEOUT_NS: u64 = 86_400 * 1_000_000_000;

/// What [`Worker::restore`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Device entries read.
    pub entries: usize,
    /// Connections adopted (two entries each).
    pub adopted: usize,
    /// Entries queued for deletion.
    pub deleted: usize,
}

fn tuple_of(key: &FlowKey) -> Option<Tuple> {
    let family = match key.kind {
        1 => Family::V4,
        2 => Family::V6,
        _ => return None,
    };
    Some(Tuple {
        src: Addr(key.src_addr),
        dst: Addr(key.dst_addr),
        src_l4: key.src_port.get(),
        dst_l4: key.dst_port.get(),
        proto: key.proto,
        family,
        zone: key.zone.get(),
    })
}

/// The key of the packets answering what `e` sends out.
fn partner_key(e: &TableEntry) -> Option<FlowKey> {
    let t = tuple_of(&e.key)?;
    let f = e.action.flags();
    let (mut src, mut sp, mut dst, mut dp) = (t.src, t.src_l4, t.dst, t.dst_l4);
    if f.contains(ActionFlags::SNAT) {
        src = Addr(e.action.new_src_addr);
        sp = e.action.new_src_port.get();
    }
    if f.contains(ActionFlags::DNAT) {
        dst = Addr(e.action.new_dst_addr);
        dp = e.action.new_dst_port.get();
    }
    let back = Tuple {
        src: dst,
        dst: src,
        src_l4: dp,
        dst_l4: sp,
        ..t
    };
    Some(key_of(&back, e.action.out_port))
}

impl<Io: DeviceIo> Worker<Io> {
    /// Gives the device back (a worker restart keeps the device up).
    pub fn into_device(self) -> Device<Io> {
        self.dev
    }

    /// A restart of this worker: all software state is dropped, a new worker takes the
    /// device and rebuilds its connections with [`Worker::restore`].
    ///
    /// # Errors
    /// The table dump failed; the new worker is returned with the error.
    pub fn restart(self, now: u64) -> (Self, Result<RestoreReport, DriverError>) {
        let cfg = self.cfg.clone();
        let mut w = Worker::new(cfg, self.dev);
        let r = w.restore(now);
        (w, r)
    }

    /// Rebuilds connections from the device table; see the module documentation.
    ///
    /// # Errors
    /// The table dump failed (the device is then treated as faulted).
    pub fn restore(&mut self, now: u64) -> Result<RestoreReport, DriverError> {
        let entries = match self.dev.dump_table() {
            Ok(e) => e,
            Err(e) => {
                self.device_fault(now);
                return Err(e);
            }
        };
        let mut report = RestoreReport {
            entries: entries.len(),
            ..RestoreReport::default()
        };
        let index: HashMap<FlowKey, usize> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key, i))
            .collect();
        let mut used = vec![false; entries.len()];
        for i in 0..entries.len() {
            if used[i] {
                continue;
            }
            used[i] = true;
            let partner = partner_key(&entries[i])
                .and_then(|k| index.get(&k).copied())
                .filter(|&j| j != i && !used[j]);
            let Some(j) = partner else {
                self.orphan_entry(&entries[i]);
                report.deleted += 1;
                continue;
            };
            used[j] = true;
            let snat = |k: usize| entries[k].action.flags().contains(ActionFlags::SNAT);
            let (o, r) = match (snat(i), snat(j)) {
                (true, false) => (i, j),
                (false, true) => (j, i),
                _ if entries[j].key.port < entries[i].key.port => (j, i),
                _ => (i, j),
            };
            if self.adopt(&entries[o], &entries[r], now) {
                report.adopted += 1;
            } else {
                self.orphan_entry(&entries[o]);
                self.orphan_entry(&entries[r]);
                report.deleted += 2;
            }
        }
        if report.adopted > 0 {
            self.pull_full_pass_next();
        }
        self.flush(now);
        Ok(report)
    }

    fn orphan_entry(&mut self, e: &TableEntry) {
        self.queue.push_back(Tagged {
            cmd: FlowCommand::Delete {
                flow_id: e.flow_id,
                key: e.key,
            },
            conn: ConnHandle {
                slot: Slot(u32::MAX),
                id: u64::MAX,
            },
            dir: Dir::Original,
            kind: CmdKind::Orphan,
        });
    }

    /// Re-creates one connection from its two entries; false if they do not match
    /// what the current configuration (ports, routes, NAT) builds, or the tuple is
    /// already tracked.
    fn adopt(&mut self, o: &TableEntry, r: &TableEntry, now: u64) -> bool {
        let (Some(ot), Some(rt)) = (tuple_of(&o.key), tuple_of(&r.key)) else {
            return false;
        };
        let tuples = [ot, rt];
        let found = [
            HwRule {
                key: o.key,
                action: o.action,
            },
            HwRule {
                key: r.key,
                action: r.action,
            },
        ];
        if let Some(router) = self.router.as_mut() {
            router.learn_next_hops(&tuples, &found, now);
        }
        let Ok(rules) = rules_for(
            self.router.as_ref(),
            &self.cfg.routing,
            &tuples,
            o.key.port,
            now,
        ) else {
            return false;
        };
        if rules != found {
            return false;
        }
        let tcp = match ot.proto {
            proto::TCP => {
                // A mid-stream pickup: ESTABLISHED, liberal windows.
                let seg = TcpSegment {
                    flags: TcpFlags::ACK,
                    seq: 0,
                    ack: 0,
                    window: u16::MAX,
                    payload_len: 0,
                    has_options: false,
                    wscale: None,
                    sack_permitted: false,
                    highest_sack_edge: None,
                };
                let Ok((mut tcp, _)) = TcpConn::new(&seg, &self.cfg.conntrack.tcp) else {
                    return false;
                };
                tcp.set_be_liberal();
                Some(tcp)
            }
            _ => None,
        };
        let mut status = Status::CONFIRMED
            | Status::SEEN_REPLY
            | Status::ASSURED
            | Status::SRC_NAT_DONE
            | Status::DST_NAT_DONE
            | Status::OFFLOAD
            | Status::HW_OFFLOAD;
        if rt.dst != ot.src || rt.dst_l4 != ot.src_l4 {
            status |= Status::SRC_NAT;
        }
        if rt.src != ot.dst || rt.src_l4 != ot.dst_l4 {
            status |= Status::DST_NAT;
        }
        let timeout = now.saturating_add(OFFLOADED_TIMEOUT_NS);
        let inserted = match tcp {
            Some(tcp) => self.ct.insert_tcp(ot, rt, status, timeout, tcp, now),
            None => self.ct.table_mut().insert(
                ot,
                rt,
                status,
                timeout,
                L4State::Udp { stream_at: now },
                now,
            ),
        };
        let Ok(slot) = inserted else {
            return false;
        };
        let Some(id) = self.ct.table().get(slot).map(|c| c.id) else {
            return false;
        };
        // The NAT engine learns the binding as if it had decided it: a new connection
        // never gets this port towards the same endpoint, the same source keeps its
        // mapping, and the release at destroy gives back exactly this.
        self.ct.nat_mut().restored(&tuples, status);
        let h = ConnHandle { slot, id };
        let mut rec = HwConn::new(slot, now);
        rec.state = HwState::Offloaded;
        rec.orig_in = Some(o.key.port);
        rec.rules = Some(rules);
        rec.offloaded_at = now;
        for (d, e) in [(Dir::Original, o), (Dir::Reply, r)] {
            rec.entries[d.index()] = Entry::Installed {
                flow_id: e.flow_id,
                generation: e.generation,
            };
            self.slots.install(e.flow_id, (h, d), e.generation, now, 14);
        }
        self.slots.pair(o.flow_id, r.flow_id);
        self.side.insert(id, rec);
        true
    }
}
