//! The software backend's forwarding loop: frames from [`PacketPort`]s through the
//! [`Gateway`] (ARP, own addresses, TTL, routing), `fallback-sw`'s conntrack with NAT
//! (`Conntrack::process_mut`; masquerade translates to the egress port's primary
//! address), and out on the egress port. Run to completion on one thread, no tokio:
//! [`SoftwareForwarder::poll`] does one round over every port, [`SoftwareForwarder::run`]
//! loops until told to stop.
//!
//! Per received IPv4 frame:
//! 1. [`Gateway::ingress`]: L2 filter, ARP, header checks; for packets to be forwarded,
//!    the route of the original destination, TTL expiry (ICMP time exceeded) and no
//!    route (ICMP net unreachable), answered from the ingress port's address;
//! 2. optionally the TCP/UDP checksum filled in (see [`ForwarderConfig::fill_checksums`]);
//! 3. conntrack + NAT, with `PacketMeta` { ingress port, routed egress port, its
//!    address }; invalid packets and NAT refusals are dropped and counted;
//! 4. [`Gateway::egress`] on the translated packet: own address (echo answered, the rest
//!    dropped and counted) or route, TTL decrement, MAC rewrite, ARP resolution;
//! 5. one `send_batch` per port per poll.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ctoffload_fallback_sw::conntrack::{Conntrack, NatOutcome, Verdict};
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::tuple::Addr;

use super::{Egress, Gateway, Ingress, wire};
use crate::port::{FrameBatch, PacketPort, PortError};

/// Forwarding loop settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwarderConfig {
    /// Frames taken from one port per poll.
    pub rx_batch: usize,
    /// Recompute TCP/UDP checksums of received IPv4 packets before conntrack. Needed on
    /// veth and other virtual interfaces, whose senders leave checksums to offload
    /// (the packet socket gives no per-frame status to tell); hides corrupted packets
    /// from conntrack's checksum check, so leave it off on physical NICs.
    pub fill_checksums: bool,
    /// Connections conntrack GC looks at per poll.
    pub gc_budget: usize,
    /// Sleep when a poll found nothing to do (`run` only).
    pub idle_sleep: Duration,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            rx_batch: 32,
            fill_checksums: false,
            gc_budget: 64,
            idle_sleep: Duration::from_micros(200),
        }
    }
}

/// Forwarding loop counters (the gateway's and conntrack's have their own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwarderStats {
    /// Frames received from all ports.
    pub rx: u64,
    /// Frames handed to ports for sending.
    pub tx: u64,
    /// Packets conntrack found invalid, dropped.
    pub drop_invalid: u64,
    /// Packets NAT could not rewrite, dropped.
    pub drop_nat: u64,
    /// Frames that did not fit a TX batch, dropped.
    pub drop_tx_full: u64,
}

/// The loop: ports, gateway, conntrack.
#[derive(Debug)]
pub struct SoftwareForwarder<P: PacketPort> {
    cfg: ForwarderConfig,
    ports: Vec<P>,
    gw: Gateway,
    ct: Conntrack,
    rx: FrameBatch,
    tx: Vec<FrameBatch>,
    generated: Vec<(usize, Vec<u8>)>,
    stats: ForwarderStats,
}

impl<P: PacketPort> SoftwareForwarder<P> {
    /// A loop over `ports` (index i is the gateway's port i), with NAT rules already in
    /// `ct`.
    #[must_use]
    pub fn new(cfg: ForwarderConfig, ports: Vec<P>, gw: Gateway, ct: Conntrack) -> Self {
        let cap = cfg.rx_batch.max(1);
        let tx = (0..ports.len())
            .map(|_| FrameBatch::new(cap.saturating_mul(ports.len()).saturating_add(cap)))
            .collect();
        Self {
            cfg,
            ports,
            gw,
            ct,
            rx: FrameBatch::new(cap),
            tx,
            generated: Vec::new(),
            stats: ForwarderStats::default(),
        }
    }

    /// The gateway (neighbours, counters).
    #[must_use]
    pub fn gateway(&self) -> &Gateway {
        &self.gw
    }

    /// Conntrack (connections, NAT bindings).
    #[must_use]
    pub fn conntrack(&self) -> &Conntrack {
        &self.ct
    }

    /// Conntrack, for NAT rule changes.
    pub fn conntrack_mut(&mut self) -> &mut Conntrack {
        &mut self.ct
    }

    /// The ports.
    #[must_use]
    pub fn ports(&self) -> &[P] {
        &self.ports
    }

    /// The loop's counters.
    #[must_use]
    pub fn stats(&self) -> ForwarderStats {
        self.stats
    }

    /// One round: timers, up to `rx_batch` frames from each port, then the TX batches.
    /// Returns the frames received.
    ///
    /// # Errors
    /// A port's socket failed.
    pub fn poll(&mut self, now: u64) -> Result<usize, PortError> {
        self.gw.poll(now, &mut self.generated);
        self.ct.gc(now, self.cfg.gc_budget);
        let mut got = 0;
        for in_port in 0..self.ports.len() {
            self.rx.clear();
            let n = self.ports[in_port].recv_batch(&mut self.rx, self.cfg.rx_batch)?;
            got += n;
            for i in 0..n {
                self.frame(in_port, i, now);
            }
        }
        for (port, f) in std::mem::take(&mut self.generated) {
            self.queue_tx(port, &f);
        }
        for (port, batch) in self.ports.iter_mut().zip(&mut self.tx) {
            if !batch.is_empty() {
                self.stats.tx += u64::try_from(batch.len()).unwrap_or(u64::MAX);
                let r = port.send_batch(batch);
                batch.clear();
                r?;
            }
        }
        Ok(got)
    }

    fn queue_tx(&mut self, port: usize, frame: &[u8]) {
        let ok = self.tx.get_mut(port).is_some_and(|b| b.push(frame).is_ok());
        if !ok {
            self.stats.drop_tx_full += 1;
        }
    }

    fn frame(&mut self, in_port: usize, i: usize, now: u64) {
        self.stats.rx += 1;
        let Some(frame) = self.rx.get_mut(i) else {
            return;
        };
        let route = match self.gw.ingress(in_port, frame, now, &mut self.generated) {
            Ingress::Consumed => return,
            Ingress::Ipv4 { route } => route,
        };
        if self.cfg.fill_checksums {
            wire::fill_l4_checksum(frame);
        }
        let out_port = route.map(|h| h.port);
        let meta = PacketMeta {
            in_port: u32::try_from(in_port).unwrap_or(u32::MAX),
            out_port: out_port.and_then(|p| u32::try_from(p).ok()),
            out_addr: out_port.and_then(|p| self.gw.primary_addr(p)).map(Addr::v4),
        };
        let v = self.ct.process_mut(frame, 0, &meta, now);
        match v.verdict {
            Verdict::Invalid(_) => {
                self.stats.drop_invalid += 1;
                return;
            }
            Verdict::Tracked { .. } if matches!(v.nat, NatOutcome::Drop(_)) => {
                self.stats.drop_nat += 1;
                return;
            }
            Verdict::Tracked { .. } | Verdict::Untracked(_) => {}
        }
        if let Egress::Send(port) = self.gw.egress(in_port, frame, now, &mut self.generated) {
            let ok = self.tx.get_mut(port).is_some_and(|b| b.push(frame).is_ok());
            if !ok {
                self.stats.drop_tx_full += 1;
            }
        }
    }

    /// Polls until `stop` is set, with `now` from a monotonic clock started here
    /// (ns since the loop started, plus `epoch_ns`); sleeps `idle_sleep` when a round
    /// found nothing.
    ///
    /// # Errors
    /// A port's socket failed.
    pub fn run(&mut self, stop: &AtomicBool, epoch_ns: u64) -> Result<(), PortError> {
        let start = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let now = epoch_ns
                .saturating_add(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX));
            if self.poll(now)? == 0 {
                std::thread::sleep(self.cfg.idle_sleep);
            }
        }
        Ok(())
    }
}
