//! The run-to-completion worker: it owns one [`Conntrack`] and one [`Device`], and each
//! [`Worker::poll`] moves exception packets from the device's RX ring through conntrack
//! (and NAT) back out of its TX ring, decides offloads, queues flow commands in
//! batches, and reaps their completions. [`Worker::reconcile`] (reconciler.rs) runs
//! the periodic counter pull. No async, no locks, no wall clock: `now` (ns) is passed
//! in, so tests are deterministic.

use std::collections::{HashMap, VecDeque};

use ctoffload_driver::device::{CommandResult, Device, DeviceEvent, FlowCommand, RxMeta, TxFrame};
use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::conntrack::{
    Config, Conntrack, L4State, NatOutcome, OtherTimeouts, Teardown, Verdict,
};
use ctoffload_fallback_sw::nat::NatEngine;
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::table::{Counter, Event};
use ctoffload_fallback_sw::tcp::{TcpState, TcpTimeouts};
use ctoffload_fallback_sw::tuple::{Addr, Dir, Tuple};
use ctoffload_hw_regs::RxReason;

use super::hw_rule::Routing;
use super::policy::{self, NotOffloaded, OffloadPolicy};
use super::slots::Slots;
use super::state::{AfterDelete, ConnHandle, HwConn, HwState, Tagged, add};

/// Worker configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The software conntrack.
    pub conntrack: Config,
    /// Offload policy.
    pub policy: OffloadPolicy,
    /// Ports and L2 rewrite.
    pub routing: Routing,
    /// Frames taken from the RX ring per poll.
    pub rx_batch: usize,
    /// Commands per submitted batch (one doorbell each).
    pub cmd_batch: usize,
    /// Counter slots pulled per reconcile tick; a full sweep must take under 25 s
    /// (device.md section 11.2).
    pub counter_slots_per_tick: u32,
    /// Conntrack GC budget per reconcile tick.
    pub gc_budget: usize,
    /// Agent time = device `TIMESTAMP` + this offset (0 when `now` is device time).
    pub device_time_offset_ns: i64,
    /// Wait between failed recovery attempts.
    pub recover_retry_ns: u64,
    /// IPv4 address of each port (what masquerade translates to); `None`: none.
    pub port_addrs: Vec<Option<[u8; 4]>>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            conntrack: Config::default(),
            policy: OffloadPolicy::default(),
            routing: Routing::two_port(),
            rx_batch: 64,
            cmd_batch: 64,
            counter_slots_per_tick: 8192,
            gc_budget: 4096,
            device_time_offset_ns: 0,
            recover_retry_ns: 1_000_000_000,
            port_addrs: Vec::new(),
        }
    }
}

/// What the worker has done.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Frames received from the exception path.
    pub rx: u64,
    /// Frames sent back through the TX ring.
    pub tx: u64,
    /// Frames dropped: invalid in conntrack.
    pub drop_invalid: u64,
    /// Frames dropped: no route, NAT rewrite failure, TTL expired.
    pub drop_other: u64,
    /// Frames dropped: TX ring full or device down.
    pub drop_tx: u64,
    /// Punts with reason `TCP_CTRL`.
    pub punt_tcp_ctrl: u64,
    /// Connections that reached `Offloaded`.
    pub offloaded: u64,
    /// Insert failures: table full.
    pub insert_table_full: u64,
    /// Insert failures: bucket full or key exists.
    pub insert_collision: u64,
    /// Insert failures: device error or unexpected status.
    pub insert_error: u64,
    /// Flows returned to software, all causes.
    pub returned: u64,
    /// Flows displaced to make room.
    pub displaced: u64,
    /// Deletes retried after `DEVICE_ERROR`.
    pub delete_retries: u64,
    /// Deletes that found no entry (lost to a reset).
    pub delete_not_found: u64,
    /// Hardware packets pulled from the device (each counted once; folded into the
    /// connections' conntrack counters when pulled or later, see reconciler.rs).
    pub hw_packets: u64,
    /// Hardware bytes pulled (L2, as the device counts them).
    pub hw_bytes_l2: u64,
    /// Device faults seen (fatal, reset, command timeout, driver error).
    pub faults: u64,
    /// Successful recoveries (reinit).
    pub recoveries: u64,
    /// Failed recovery attempts.
    pub recover_failures: u64,
    /// Flows whose hardware state was lost to a fault.
    pub flows_lost_to_fault: u64,
    /// Connections freed by software while a rule was still in hardware. Must stay 0
    /// (invariant 2); counted, never assumed.
    pub freed_while_in_hw: u64,
    /// Reconcile ticks.
    pub reconcile_ticks: u64,
    /// Counter records pulled.
    pub counter_records: u64,
    /// Slots covered by the counter dumps collected (as many as records for full
    /// dumps; a `CHANGED` dump covers its range with records of the moved slots only).
    pub counter_slots: u64,
}

/// One worker: a conntrack instance, the device, and the side table of hardware state.
#[derive(Debug)]
pub struct Worker<Io: DeviceIo> {
    pub(super) cfg: WorkerConfig,
    pub(super) ct: Conntrack,
    pub(super) dev: Device<Io>,
    /// Hardware state per connection id.
    pub(super) side: HashMap<u64, HwConn>,
    /// Per device slot: owner and counter baseline.
    pub(super) slots: Slots,
    pub(super) queue: VecDeque<Tagged>,
    pub(super) inflight: HashMap<u32, Tagged>,
    pub(super) device_up: bool,
    pub(super) recover_at: u64,
    pub(super) cursor: u32,
    pub(super) pending_free: Vec<ConnHandle>,
    pub(super) stats: WorkerStats,
    // Scratch, reused across polls (no allocation per packet).
    pub(super) rx_buf: Vec<u8>,
    rx_meta: Vec<(RxMeta, usize, usize)>,
    pub(super) tx_buf: Vec<u8>,
    pub(super) tx_meta: Vec<(u8, usize, usize)>,
    pub(super) results: Vec<CommandResult>,
    pub(super) events: Vec<DeviceEvent>,
    pub(super) sweep: super::reconciler::SweepScratch,
    pub(super) cmds: Vec<FlowCommand>,
    pub(super) held_scratch: Vec<ConnHandle>,
    gone_scratch: Vec<u64>,
    /// What the control plane is told (`None`: nobody listens; see control.rs).
    pub(super) observer: Option<super::control::Observer>,
    /// The gateway, when the worker routes between real hosts (router.rs).
    pub(super) router: Option<super::router::Router>,
}

impl<Io: DeviceIo> Worker<Io> {
    /// A worker over a device that is already up.
    pub fn new(cfg: WorkerConfig, dev: Device<Io>) -> Self {
        let cap = usize::try_from(dev.capabilities().flow_capacity).unwrap_or(0);
        // The side table follows conntrack's Destroy events, drained after every poll
        // and GC run: make room for a GC run plus two polls' worth of New events, so
        // none is lost.
        let mut ct_cfg = cfg.conntrack;
        ct_cfg.event_capacity = ct_cfg.event_capacity.max(
            cfg.gc_budget
                .saturating_add(cfg.rx_batch.saturating_mul(2))
                .saturating_add(1024),
        );
        Self {
            ct: Conntrack::new(ct_cfg),
            device_up: dev.is_up(),
            dev,
            side: HashMap::new(),
            slots: Slots::new(cap),
            queue: VecDeque::new(),
            inflight: HashMap::new(),
            recover_at: 0,
            cursor: 0,
            pending_free: Vec::new(),
            stats: WorkerStats::default(),
            rx_buf: Vec::new(),
            rx_meta: Vec::new(),
            tx_buf: Vec::new(),
            tx_meta: Vec::new(),
            results: Vec::new(),
            events: Vec::new(),
            sweep: super::reconciler::SweepScratch::default(),
            cmds: Vec::new(),
            held_scratch: Vec::new(),
            gone_scratch: Vec::new(),
            observer: None,
            router: None,
            cfg,
        }
    }

    /// The software conntrack.
    pub fn conntrack(&self) -> &Conntrack {
        &self.ct
    }

    /// The NAT engine (set rules here; existing connections keep their translation).
    pub fn nat_mut(&mut self) -> &mut NatEngine {
        self.ct.nat_mut()
    }

    /// Change the conntrack timeouts at run time (existing connections take them at
    /// their next packet, as with Linux's sysctls).
    pub fn set_timeouts(&mut self, tcp: TcpTimeouts, other: OtherTimeouts) {
        self.ct.set_timeouts(tcp, other);
    }

    /// Change the number of connections admitted (`nf_conntrack_max`) within the
    /// table's allocation; returns the limit now in force.
    pub fn set_max_connections(&mut self, max: usize) -> usize {
        self.ct.set_max_connections(max)
    }

    /// The device (diagnostics, tests).
    pub fn device_mut(&mut self) -> &mut Device<Io> {
        &mut self.dev
    }

    /// Whether the worker considers the device usable.
    pub fn device_up(&self) -> bool {
        self.device_up
    }

    /// Counters.
    pub fn stats(&self) -> WorkerStats {
        self.stats
    }

    /// Commands queued or in flight (the reconciler's counter dump included until the
    /// device has completed it).
    pub fn commands_outstanding(&self) -> usize {
        self.queue.len() + self.inflight.len().max(self.dev.outstanding())
    }

    /// The connection owning `tuple` (either direction), if live at `now`.
    pub fn find(&mut self, tuple: &Tuple, now: u64) -> Option<ConnHandle> {
        let (slot, _) = self.ct.lookup(tuple, now)?;
        let id = self.ct.table().get(slot)?.id;
        Some(ConnHandle { slot, id })
    }

    /// Hardware state and not-offloaded reason of a connection.
    pub fn hw_state(&self, h: ConnHandle) -> Option<(HwState, Option<NotOffloaded>)> {
        self.side.get(&h.id).map(|r| (r.state, r.reason))
    }

    /// The newest hardware hit of a connection known to the agent (agent time; 0 =
    /// none): the record's, or its rules' as last pulled.
    pub fn hw_last_hit(&self, h: ConnHandle) -> u64 {
        self.side
            .get(&h.id)
            .map_or(0, |r| r.hw_last_hit.max(self.slot_last_hit(r)))
    }

    /// The side-table record of a connection. Its `hw_counters` are the folded part
    /// only: [`Worker::hw_counters`] adds what the slots have not folded yet.
    pub fn hw_record(&self, h: ConnHandle) -> Option<&HwConn> {
        self.side.get(&h.id)
    }

    /// A live connection's counters per direction (L3 bytes): software plus hardware,
    /// each packet once (invariant 3), the hardware counts the reconciler pulled but
    /// has not folded into conntrack yet included.
    pub fn counters(&self, h: ConnHandle) -> Option<[Counter; 2]> {
        let c = self.ct.table().get_checked(h.slot, h.id)?.counters;
        let hw = self
            .side
            .get(&h.id)
            .map_or([Counter::default(); 2], |r| self.unfolded_of(h, r));
        Some([add(c[0], hw[0]), add(c[1], hw[1])])
    }

    /// The hardware part of a connection's counters per direction (L3 bytes): folded
    /// plus pulled but not folded yet.
    pub fn hw_counters(&self, h: ConnHandle) -> [Counter; 2] {
        self.side.get(&h.id).map_or([Counter::default(); 2], |r| {
            let u = self.unfolded_of(h, r);
            [add(r.hw_counters[0], u[0]), add(r.hw_counters[1], u[1])]
        })
    }

    /// Connections in each hardware state: `[none, pending, offloaded, dying]`.
    pub fn state_counts(&self) -> [usize; 4] {
        let mut n = [0; 4];
        for r in self.side.values() {
            let i = match r.state {
                HwState::None | HwState::Dead => 0,
                HwState::Pending => 1,
                HwState::Offloaded => 2,
                HwState::Dying(_) => 3,
            };
            n[i] += 1;
        }
        n
    }

    /// One run-to-completion step: device events, completions, up to `rx_batch`
    /// exception frames, offload decisions, and one command batch.
    pub fn poll(&mut self, now: u64) -> usize {
        self.hold_in_flight(now);
        self.check_events(now);
        self.reap(now);
        let n = self.rx(now);
        self.flush(now);
        self.drain_ct_events(now);
        n
    }

    /// Conntrack GC at `now` (at most `gc_budget` timers), then the side table follows
    /// the removals. Also run by [`Worker::reconcile`].
    pub fn gc(&mut self, now: u64) -> usize {
        self.hold_in_flight(now);
        let n = self.ct.gc(now, self.cfg.gc_budget);
        self.drain_ct_events(now);
        n
    }

    /// Converts a device timestamp to agent time.
    pub(super) fn agent_time(&self, device_ts: u64) -> u64 {
        device_ts.saturating_add_signed(self.cfg.device_time_offset_ns)
    }

    // ---- exception path ------------------------------------------------------------

    fn rx(&mut self, now: u64) -> usize {
        if !self.device_up {
            return 0;
        }
        self.rx_buf.clear();
        self.rx_meta.clear();
        let (buf, meta) = (&mut self.rx_buf, &mut self.rx_meta);
        let got = self.dev.rx_poll(self.cfg.rx_batch, |m, f| {
            let at = buf.len();
            buf.extend_from_slice(f);
            meta.push((*m, at, f.len()));
        });
        if got.is_err() {
            self.device_fault(now);
            return 0;
        }
        self.tx_buf.clear();
        self.tx_meta.clear();
        for i in 0..self.rx_meta.len() {
            let (m, at, len) = self.rx_meta[i];
            self.stats.rx += 1;
            self.exception_frame(&m, at, len, now);
        }
        self.routed_output(now);
        self.transmit(now);
        self.rx_meta.len()
    }

    /// One punted frame: conntrack, offload decision, rewrite, queue for TX.
    fn exception_frame(&mut self, m: &RxMeta, at: usize, len: usize, now: u64) {
        if m.reason == Ok(RxReason::TcpCtrl) {
            self.stats.punt_tcp_ctrl += 1;
            if let Some(id) = m.flow_id {
                self.tcp_ctrl_punt(id, now);
            }
        }
        if self.routed_frame(m, at, len, now) {
            return;
        }
        let frame = &self.rx_buf[at..at + len];
        let zone = if m.vlan && frame.len() >= 16 {
            u16::from_be_bytes([frame[14], frame[15]]) & 0x0FFF
        } else {
            0
        };
        let Some(egress) = self.cfg.routing.egress_of(m.port) else {
            self.stats.drop_other += 1;
            return;
        };
        // Conntrack and NAT on the copy that will be sent: NAT rewrites it in place,
        // exactly as the connection's hardware rule will once it is offloaded.
        let start = self.tx_buf.len();
        self.tx_buf.extend_from_slice(&self.rx_buf[at..at + len]);
        let meta = PacketMeta {
            in_port: u32::from(m.port),
            out_port: Some(u32::from(egress)),
            out_addr: self
                .cfg
                .port_addrs
                .get(usize::from(egress))
                .copied()
                .flatten()
                .map(Addr::v4),
        };
        let v = self
            .ct
            .process_mut(&mut self.tx_buf[start..], zone, &meta, now);
        let ok = match v.verdict {
            Verdict::Tracked { slot, dir, .. } => {
                self.tracked(slot, dir, m, now);
                !matches!(v.nat, NatOutcome::Drop(_))
            }
            Verdict::Invalid(_) => {
                self.stats.drop_invalid += 1;
                self.tx_buf.truncate(start);
                return;
            }
            Verdict::Untracked(_) => true,
        };
        if !ok || !self.rewrite_l2(start, egress) {
            self.stats.drop_other += 1;
            self.tx_buf.truncate(start);
            return;
        }
        self.tx_meta.push((egress, start, len));
    }

    /// Side-table bookkeeping for a tracked packet, teardown and offload decisions.
    pub(super) fn tracked(
        &mut self,
        slot: ctoffload_fallback_sw::table::Slot,
        dir: Dir,
        m: &RxMeta,
        now: u64,
    ) {
        let Some(conn) = self.ct.table().get(slot) else {
            return;
        };
        let h = ConnHandle { slot, id: conn.id };
        let tcp = match conn.proto {
            L4State::Tcp(t) => Some(t.state()),
            _ => None,
        };
        let closing = tcp.is_some_and(|s| s != TcpState::Established);
        let original = conn.tuples[0];
        let egress = self.cfg.routing.egress_of(m.port);
        let rec = self
            .side
            .entry(h.id)
            .or_insert_with(|| HwConn::new(slot, now));
        rec.sw_last_seen = now;
        if let Some(new) = tcp {
            if let (Some(old), Some(o)) = (rec.tcp_state, self.observer.as_mut())
                && old != new
            {
                o.state_change(h.id, original, old, new);
            }
            rec.tcp_state = Some(new);
        }
        rec.l2_len[dir.index()] = if m.vlan { 18 } else { 14 };
        if rec.orig_in.is_none() {
            rec.orig_in = match dir {
                Dir::Original => Some(m.port),
                // First seen in reply direction: the original arrives where replies go.
                Dir::Reply => egress,
            };
        }
        let (state, ready) = (rec.state, rec.backoff.ready(now));
        match state {
            HwState::Offloaded if closing => {
                // Invariant 4: FIN/RST punted; software advanced the state; the flow
                // leaves hardware and returns with the state software now holds.
                self.begin_delete(
                    h,
                    AfterDelete::Return(Teardown::Returned, NotOffloaded::Closing),
                    now,
                );
            }
            HwState::Pending if closing => rec.abort = true,
            HwState::None if !self.device_up => rec.reason = Some(NotOffloaded::DeviceDown),
            HwState::None if ready => match policy::decide(&self.cfg.policy, &self.ct, slot) {
                Ok(()) => self.start_offload(h, now),
                Err(r) => {
                    if let Some(rec) = self.side.get_mut(&h.id) {
                        rec.reason = Some(r);
                    }
                }
            },
            // Invariant 1: a packet of an offloaded connection through the slow path
            // re-armed its conntrack timeout with its state's (seconds, with short
            // timeouts); hold it again while the rules live (Linux refreshes offloaded
            // entries in its flowtable GC; the reconciler's keep-alive is daily).
            HwState::Offloaded | HwState::Pending => self.ct.keep_alive(slot, now),
            _ => {}
        }
    }

    /// MAC rewrite and TTL decrement for frames leaving on `egress`, the same as the
    /// hardware action built by `hw_rule::build_rules`.
    fn rewrite_l2(&mut self, start: usize, egress: u8) -> bool {
        let frame = &mut self.tx_buf[start..];
        if frame.len() < 14 {
            return false;
        }
        if let Some(l2) = self.cfg.routing.l2_of(egress) {
            frame[0..6].copy_from_slice(&l2.next_hop);
            frame[6..12].copy_from_slice(&l2.mac);
        }
        if self.cfg.routing.dec_ttl {
            return dec_ttl(frame);
        }
        true
    }

    fn transmit(&mut self, now: u64) {
        if self.tx_meta.is_empty() {
            return;
        }
        let frames: Vec<TxFrame<'_>> = self
            .tx_meta
            .iter()
            .map(|&(port, at, len)| TxFrame {
                port,
                data: &self.tx_buf[at..at + len],
            })
            .collect();
        let mut sent = 0;
        let mut failed = false;
        // A full TX ring is back-pressure: reap and retry a bounded number of times.
        for _ in 0..64 {
            match self.dev.tx_send(&frames[sent..]) {
                Ok(n) => sent += n,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
            if sent == frames.len() {
                break;
            }
            if self.dev.tx_reap().is_err() {
                failed = true;
                break;
            }
            std::thread::yield_now();
        }
        let total = frames.len();
        drop(frames);
        self.stats.tx += u64::try_from(sent).unwrap_or(0);
        self.stats.drop_tx += u64::try_from(total - sent).unwrap_or(0);
        if failed {
            self.device_fault(now);
        }
    }

    // ---- commands --------------------------------------------------------------------

    /// Submits queued commands in batches (one doorbell per batch).
    pub(super) fn flush(&mut self, now: u64) {
        while self.device_up && !self.queue.is_empty() {
            self.cmds.clear();
            self.cmds.extend(
                self.queue
                    .iter()
                    .take(self.cfg.cmd_batch.max(1))
                    .map(|t| t.cmd),
            );
            match self.dev.submit(&self.cmds) {
                Ok(s) if s.accepted() == 0 => break,
                Ok(s) => {
                    for tok in s.tokens() {
                        if let Some(t) = self.queue.pop_front() {
                            self.inflight.insert(tok.cookie(), t);
                        }
                    }
                }
                Err(_) => {
                    self.device_fault(now);
                    break;
                }
            }
        }
    }

    /// Reaps completions and applies them.
    pub(super) fn reap(&mut self, now: u64) {
        self.results.clear();
        let mut results = std::mem::take(&mut self.results);
        if self.dev.reap(&mut results).is_err() {
            self.results = results;
            self.device_fault(now);
            return;
        }
        for r in &results {
            if let Some(t) = self.inflight.remove(&r.token.cookie()) {
                self.completed(t, r, now);
            }
        }
        results.clear();
        self.results = results;
    }

    /// Conntrack removed connections: drop their records. A record still holding a
    /// rule would break invariant 2; it is counted and its rules are deleted.
    pub(super) fn drain_ct_events(&mut self, _now: u64) {
        let mut gone = std::mem::take(&mut self.gone_scratch);
        gone.clear();
        let observer = &mut self.observer;
        for ev in self.ct.table_mut().drain_events() {
            if let Event::Destroy { id, .. } = ev {
                gone.push(id);
            }
            if let Some(o) = observer.as_mut() {
                o.conntrack_event(ev);
            }
        }
        for &id in &gone {
            if let Some(rec) = self.side.remove(&id) {
                let h = ConnHandle { slot: rec.slot, id };
                if self.observer.is_some() {
                    let u = self.unfolded_of(h, &rec);
                    let hw = [add(rec.hw_counters[0], u[0]), add(rec.hw_counters[1], u[1])];
                    if let Some(o) = self.observer.as_mut() {
                        o.hw_final(id, hw);
                    }
                }
                if !matches!(rec.state, HwState::None | HwState::Dead) {
                    self.stats.freed_while_in_hw += 1;
                    self.orphan_entries(h, &rec);
                }
            }
        }
        self.gone_scratch = gone;
    }
}

/// IPv4 TTL / IPv6 hop limit minus one (IPv4 header checksum updated per RFC 1624);
/// false when it would reach 0 or the frame is not IP.
fn dec_ttl(frame: &mut [u8]) -> bool {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([frame[12], frame[13]]);
    if et == 0x8100 && frame.len() >= 18 {
        et = u16::from_be_bytes([frame[16], frame[17]]);
        l3 = 18;
    }
    match et {
        0x0800 if frame.len() >= l3 + 20 => {
            let ttl = frame[l3 + 8];
            if ttl <= 1 {
                return false;
            }
            let old = u16::from_be_bytes([ttl, frame[l3 + 9]]);
            let new = u16::from_be_bytes([ttl - 1, frame[l3 + 9]]);
            frame[l3 + 8] = ttl - 1;
            let hc = u16::from_be_bytes([frame[l3 + 10], frame[l3 + 11]]);
            let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
            while sum > 0xFFFF {
                sum = (sum & 0xFFFF) + (sum >> 16);
            }
            let c = !u16::try_from(sum).unwrap_or(0xFFFF);
            frame[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
            true
        }
        0x86DD if frame.len() >= l3 + 40 => {
            let hl = frame[l3 + 7];
            if hl <= 1 {
                return false;
            }
            frame[l3 + 7] = hl - 1;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::dec_ttl;

    #[test]
    fn ttl_decrement_keeps_the_ipv4_checksum_valid() {
        let mut v = Vec::new();
        etherparse::PacketBuilder::ethernet2([2; 6], [4; 6])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2)
            .write(&mut v, b"payload")
            .expect("build");
        assert!(dec_ttl(&mut v));
        let ip = etherparse::Ipv4HeaderSlice::from_slice(&v[14..]).expect("ip");
        assert_eq!(ip.ttl(), 63);
        assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum());
        v[14 + 8] = 1;
        assert!(!dec_ttl(&mut v));
    }
}
