//! The software backend's forwarding loop: frames from [`PacketPort`]s through the
//! [`Gateway`] (ARP, own addresses, TTL, routing), `fallback-sw`'s conntrack with NAT
//! (`Conntrack::process_mut`; masquerade translates to the egress port's primary
//! address), and out on the egress port. Run to completion on one thread, no tokio:
//! [`SoftwareForwarder::poll`] does one round over every port, [`SoftwareForwarder::run`]
//! loops until told to stop.
//!
//! A round receives up to `rx_batch` frames from every port without touching the
//! connection table, then takes the table once ([`ConnTable::batch`]: for the agent,
//! one lock of the table the API serves, see [`super::backend`]) for the whole batch:
//! gateway timers, a bounded conntrack GC step, and per received IPv4 frame:
//! 1. [`Gateway::ingress`]: L2 filter, ARP, header checks; for packets to be forwarded,
//!    the route of the original destination, TTL expiry (ICMP time exceeded) and no
//!    route (ICMP net unreachable), answered from the ingress port's address;
//! 2. optionally the TCP/UDP checksum filled in (see [`ForwarderConfig::fill_checksums`]);
//! 3. conntrack + NAT, with `PacketMeta` { ingress port, routed egress port, its
//!    address }; invalid packets and NAT refusals are dropped and counted;
//! 4. [`Gateway::egress`] on the translated packet: own address (echo answered, the rest
//!    dropped and counted) or route, TTL decrement, MAC rewrite, ARP resolution.
//!
//! The table is released before sending: one `send_batch` per port per round.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ctoffload_fallback_sw::conntrack::{Conntrack, NatOutcome, Verdict};
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::table::Slot;
use ctoffload_fallback_sw::tuple::Addr;

use super::xdp_offload::{SharedXdpOffload, XdpFlowOffload};
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
    /// The longest wait when a round found nothing to do (`run` only): `poll(2)` on
    /// the ports' sockets, which a frame ends at once; a plain sleep when a port has no
    /// descriptor. Bounds how late timers (ARP retries) run on an idle gateway.
    pub idle_wait: Duration,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            rx_batch: 32,
            fill_checksums: false,
            gc_budget: 64,
            idle_wait: Duration::from_millis(1),
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

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// A port's socket failed.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The connection table could not be used.
    #[error("connection table")]
    Table(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The loop's thread panicked.
    #[error("the forwarding thread panicked")]
    Panicked,
}

/// Where the loop's connections live: a [`Conntrack`] it owns, or one shared with
/// the API ([`super::backend`]).
pub trait ConnTable: Send {
    /// Runs `f` on the table for one batch of packets; `f` pushes the slot of every
    /// packet it tracked to `tracked` (cleared first).
    ///
    /// # Errors
    /// The table cannot be used (a poisoned lock).
    fn batch<T>(
        &mut self,
        tracked: &mut Vec<Slot>,
        f: impl FnOnce(&mut Conntrack, &mut Vec<Slot>) -> T,
    ) -> Result<T, ForwardError>;
}

impl ConnTable for Conntrack {
    fn batch<T>(
        &mut self,
        tracked: &mut Vec<Slot>,
        f: impl FnOnce(&mut Conntrack, &mut Vec<Slot>) -> T,
    ) -> Result<T, ForwardError> {
        tracked.clear();
        Ok(f(self, tracked))
    }
}

/// The loop: ports, gateway, connection table.
#[derive(Debug)]
pub struct SoftwareForwarder<P: PacketPort, T: ConnTable = Conntrack> {
    ports: Vec<P>,
    table: T,
    /// One receive batch per port.
    rx: Vec<FrameBatch>,
    tracked: Vec<Slot>,
    stage: Stage,
}

/// Everything a frame passes through, besides the table.
#[derive(Debug)]
struct Stage {
    cfg: ForwarderConfig,
    gw: Gateway,
    tx: Vec<FrameBatch>,
    generated: Vec<(usize, Vec<u8>)>,
    stats: ForwarderStats,
    /// Established flows in the AF_XDP ports' XDP flow table, if enabled.
    xdp: Option<SharedXdpOffload>,
}

impl<P: PacketPort, T: ConnTable> SoftwareForwarder<P, T> {
    /// A loop over `ports` (index i is the gateway's port i), with NAT rules already in
    /// `table`.
    #[must_use]
    pub fn new(cfg: ForwarderConfig, ports: Vec<P>, gw: Gateway, table: T) -> Self {
        let cap = cfg.rx_batch.max(1);
        let tx = (0..ports.len())
            .map(|_| FrameBatch::new(cap.saturating_mul(ports.len()).saturating_add(cap)))
            .collect();
        Self {
            rx: (0..ports.len()).map(|_| FrameBatch::new(cap)).collect(),
            ports,
            table,
            tracked: Vec::with_capacity(cap),
            stage: Stage {
                cfg,
                gw,
                tx,
                generated: Vec::new(),
                stats: ForwarderStats::default(),
                xdp: None,
            },
        }
    }

    /// The loop with established flows offloaded to its ports' XDP flow table.
    #[must_use]
    pub fn with_xdp_offload(mut self, offload: XdpFlowOffload) -> Self {
        self.stage.xdp = Some(SharedXdpOffload::new(offload));
        self
    }

    /// The XDP flow offload, if enabled (shared: the control plane releases the
    /// connections it deletes through it).
    #[must_use]
    pub fn xdp_offload(&self) -> Option<&SharedXdpOffload> {
        self.stage.xdp.as_ref()
    }

    /// Takes every flow out of the XDP flow table (back to software, counters folded
    /// in); the loop does so itself when [`SoftwareForwarder::run`] ends.
    ///
    /// # Errors
    /// The table cannot be used.
    pub fn clear_xdp_offload(&mut self, now: u64) -> Result<(), ForwardError> {
        let Some(x) = self.stage.xdp.as_ref() else {
            return Ok(());
        };
        self.table
            .batch(&mut self.tracked, |ct, _| x.lock().clear(ct, now))
    }

    /// The gateway (neighbours, counters).
    #[must_use]
    pub fn gateway(&self) -> &Gateway {
        &self.stage.gw
    }

    /// The connection table.
    #[must_use]
    pub fn table(&self) -> &T {
        &self.table
    }

    /// The connection table, for NAT rule changes.
    pub fn table_mut(&mut self) -> &mut T {
        &mut self.table
    }

    /// The ports.
    #[must_use]
    pub fn ports(&self) -> &[P] {
        &self.ports
    }

    /// The loop's counters.
    #[must_use]
    pub fn stats(&self) -> ForwarderStats {
        self.stage.stats
    }

    /// One round at time `now` (ns, the table's clock): up to `rx_batch` frames from
    /// each port, then the table once for timers, GC and every frame, then the TX
    /// batches. Returns the frames received.
    ///
    /// # Errors
    /// A port's socket failed, or the table cannot be used.
    pub fn poll(&mut self, now: u64) -> Result<usize, ForwardError> {
        let cap = self.stage.cfg.rx_batch;
        let mut got = 0;
        for (port, rx) in self.ports.iter_mut().zip(&mut self.rx) {
            rx.clear();
            got += port.recv_batch(rx, cap)?;
        }
        let (stage, rx) = (&mut self.stage, &mut self.rx);
        self.table.batch(&mut self.tracked, |ct, tracked| {
            // Held for the round, inside the table's lock (the lock order of
            // `SharedXdpOffload`).
            let shared = stage.xdp.clone();
            let mut xdp = shared.as_ref().map(SharedXdpOffload::lock);
            if let Some(x) = xdp.as_mut() {
                x.before_batch(ct, now);
            }
            stage.gw.poll(now, &mut stage.generated);
            ct.gc(now, stage.cfg.gc_budget);
            for (in_port, batch) in rx.iter_mut().enumerate() {
                for i in 0..batch.len() {
                    if let Some(frame) = batch.get_mut(i) {
                        stage.frame(ct, tracked, in_port, frame, now);
                    }
                }
            }
            if let Some(x) = xdp.as_mut() {
                x.after_batch(ct, tracked, &stage.gw, now);
                x.sync(ct, now);
            }
        })?;
        let stage = &mut self.stage;
        // Taken out and put back so its capacity is reused.
        let mut generated = std::mem::take(&mut stage.generated);
        for (port, f) in generated.drain(..) {
            stage.queue_tx(port, &f);
        }
        stage.generated = generated;
        for (port, batch) in self.ports.iter_mut().zip(&mut stage.tx) {
            if !batch.is_empty() {
                stage.stats.tx += u64::try_from(batch.len()).unwrap_or(u64::MAX);
                let r = port.send_batch(batch);
                batch.clear();
                r?;
            }
        }
        Ok(got)
    }

    /// Polls until `stop` is set, with `now` read from `clock` (the table's clock,
    /// ns) every round; waits up to `idle_wait` for a frame when a round found
    /// nothing (see [`ForwarderConfig::idle_wait`]).
    ///
    /// # Errors
    /// A port's socket failed, or the table cannot be used.
    pub fn run(&mut self, stop: &AtomicBool, clock: &dyn Fn() -> u64) -> Result<(), ForwardError> {
        let mut result = Ok(());
        while !stop.load(Ordering::Relaxed) {
            match self.poll(clock()) {
                Ok(0) => self.wait_idle(),
                Ok(_) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        // Also after a failed round: the XDP table's flows go back to software (their
        // entries deleted, their day-long timeouts undone) whatever ended the loop.
        let cleared = self.clear_xdp_offload(clock());
        result.and(cleared)
    }

    /// Waits for a frame on any port, at most `idle_wait`.
    fn wait_idle(&self) {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let wait = self.stage.cfg.idle_wait;
        let fds: Option<Vec<PollFd<'_>>> = self
            .ports
            .iter()
            .map(|p| {
                p.poll_fd()
                    .map(|fd| PollFd::from_borrowed_fd(fd, PollFlags::IN))
            })
            .collect();
        match fds {
            Some(mut fds) if !fds.is_empty() => {
                let timeout = Timespec {
                    tv_sec: i64::try_from(wait.as_secs()).unwrap_or(i64::MAX),
                    tv_nsec: i64::from(wait.subsec_nanos()),
                };
                // An error (EINTR) only ends the wait early.
                let _ = rustix::event::poll(&mut fds, Some(&timeout));
            }
            _ => std::thread::sleep(wait),
        }
    }
}

impl Stage {
    fn queue_tx(&mut self, port: usize, frame: &[u8]) {
        let ok = self.tx.get_mut(port).is_some_and(|b| b.push(frame).is_ok());
        if !ok {
            self.stats.drop_tx_full += 1;
        }
    }

    fn frame(
        &mut self,
        ct: &mut Conntrack,
        tracked: &mut Vec<Slot>,
        in_port: usize,
        frame: &mut [u8],
        now: u64,
    ) {
        self.stats.rx += 1;
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
        let v = ct.process_mut(frame, 0, &meta, now);
        match v.verdict {
            Verdict::Invalid(_) => {
                self.stats.drop_invalid += 1;
                return;
            }
            Verdict::Tracked { .. } if matches!(v.nat, NatOutcome::Drop(_)) => {
                self.stats.drop_nat += 1;
                return;
            }
            Verdict::Tracked { slot, .. } => tracked.push(slot),
            Verdict::Untracked(_) => {}
        }
        if let Egress::Send(port) = self.gw.egress(in_port, frame, now, &mut self.generated) {
            self.queue_tx(port, frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use ctoffload_fallback_sw::conntrack::Config;
    use ctoffload_fallback_sw::nat::rules::NatRule;

    use super::*;
    use crate::gateway::{GatewayConfig, PortConfig};
    use crate::port::MemPort;

    const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
    const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
    const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
    const OUT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
    const GW_IN: [u8; 4] = [10, 0, 0, 1];
    const HOST: [u8; 4] = [10, 0, 0, 2];
    const GW_OUT: [u8; 4] = [192, 0, 2, 1];
    const OUT: [u8; 4] = [192, 0, 2, 2];

    /// An Ethernet/IPv4/UDP frame with valid checksums.
    fn udp(
        macs: ([u8; 6], [u8; 6]),
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        payload: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&macs.0);
        f.extend_from_slice(&macs.1);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = u16::try_from(28 + payload.len()).expect("short");
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&src.0);
        ip[16..20].copy_from_slice(&dst.0);
        let c = wire::csum_finish(wire::csum_add(0, &ip));
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&src.1.to_be_bytes());
        f.extend_from_slice(&dst.1.to_be_bytes());
        f.extend_from_slice(&(total - 20).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        assert!(wire::fill_l4_checksum(&mut f));
        f
    }

    fn send(p: &mut MemPort, frame: &[u8]) {
        let mut b = FrameBatch::new(1);
        b.push(frame).expect("fits");
        p.send_batch(&b).expect("send");
    }

    fn recv(p: &mut MemPort) -> Vec<Vec<u8>> {
        let mut b = FrameBatch::new(16);
        p.recv_batch(&mut b, 16).expect("recv");
        b.iter().map(<[u8]>::to_vec).collect()
    }

    fn udp_ports(f: &[u8]) -> (u16, u16) {
        (
            u16::from_be_bytes([f[34], f[35]]),
            u16::from_be_bytes([f[36], f[37]]),
        )
    }

    #[test]
    fn masqueraded_udp_round_trip_with_arp_on_both_sides() {
        let (gw_in, mut host) = MemPort::pair("in", "host", 16);
        let (gw_out, mut out) = MemPort::pair("out", "server", 16);
        let gw = Gateway::new(GatewayConfig {
            ports: vec![
                PortConfig {
                    name: "in".into(),
                    mac: GW_IN_MAC,
                    addrs: vec![(GW_IN, 24)],
                },
                PortConfig {
                    name: "out".into(),
                    mac: GW_OUT_MAC,
                    addrs: vec![(GW_OUT, 24)],
                },
            ],
            ..GatewayConfig::default()
        })
        .expect("config");
        let mut ct = Conntrack::new(Config::default());
        ct.nat_mut()
            .rules_mut()
            .add(NatRule::masquerade_out(1, 1))
            .expect("rule");
        let mut fwd =
            SoftwareForwarder::new(ForwarderConfig::default(), vec![gw_in, gw_out], gw, ct);

        // Inside -> outside: the gateway asks for the server's MAC first.
        send(
            &mut host,
            &udp((GW_IN_MAC, HOST_MAC), (HOST, 1234), (OUT, 53), b"query"),
        );
        fwd.poll(1_000).expect("poll");
        let got = recv(&mut out);
        assert_eq!(got.len(), 1, "one ARP request");
        let a = wire::arp(&got[0]).expect("arp");
        assert_eq!((a.op, a.sha, a.spa, a.tpa), (1, GW_OUT_MAC, GW_OUT, OUT));
        send(
            &mut out,
            &wire::arp_frame(GW_OUT_MAC, 2, OUT_MAC, OUT, GW_OUT_MAC, GW_OUT),
        );
        fwd.poll(2_000).expect("poll");
        let got = recv(&mut out);
        assert_eq!(got.len(), 1, "the queued packet");
        let f = &got[0];
        assert_eq!((&f[0..6], &f[6..12]), (&OUT_MAC[..], &GW_OUT_MAC[..]));
        let h = wire::ipv4(f).expect("valid IPv4");
        assert_eq!((h.src, h.dst, h.ttl), (GW_OUT, OUT, 63), "masqueraded");
        let mut check = f.clone();
        assert!(wire::fill_l4_checksum(&mut check));
        assert_eq!(&check, f, "UDP checksum was already right");
        let (nat_port, _) = udp_ports(f);

        // The answer comes back to the gateway's address and goes to the host, whose
        // MAC the gateway resolves in turn.
        send(
            &mut out,
            &udp(
                (GW_OUT_MAC, OUT_MAC),
                (OUT, 53),
                (GW_OUT, nat_port),
                b"answer",
            ),
        );
        fwd.poll(3_000).expect("poll");
        let got = recv(&mut host);
        assert_eq!(got.len(), 1);
        let a = wire::arp(&got[0]).expect("arp");
        assert_eq!((a.op, a.spa, a.tpa), (1, GW_IN, HOST));
        send(
            &mut host,
            &wire::arp_frame(GW_IN_MAC, 2, HOST_MAC, HOST, GW_IN_MAC, GW_IN),
        );
        fwd.poll(4_000).expect("poll");
        let got = recv(&mut host);
        assert_eq!(got.len(), 1);
        let f = &got[0];
        assert_eq!((&f[0..6], &f[6..12]), (&HOST_MAC[..], &GW_IN_MAC[..]));
        let h = wire::ipv4(f).expect("valid IPv4");
        assert_eq!((h.src, h.dst, h.ttl), (OUT, HOST, 63), "translated back");
        assert_eq!(udp_ports(f), (53, 1234));
        assert_eq!(&f[42..48], b"answer");
        let s = fwd.stats();
        assert_eq!((s.rx, s.drop_invalid, s.drop_nat), (4, 0, 0));
        assert_eq!(fwd.table().stats().created, 1);
        assert_eq!(fwd.gateway().stats().arp_requests_sent, 2);
    }
}
