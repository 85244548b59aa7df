//! The worker as a router between real hosts (the sim backend on host interfaces):
//! every exception frame goes through the [`Gateway`] shared with the software backend
//! (ARP answers and resolution with a bounded queue, own addresses, TTL and ICMP
//! errors, routes), conntrack + NAT, and the gateway's egress stage (route of the
//! translated destination, TTL decrement, MAC rewrite from the neighbour table).
//!
//! Hardware rules follow the same decision: each direction leaves on the port of the
//! route to its translated destination with the resolved next hop's MAC, so a
//! connection is not offloaded until both next hops are resolved
//! ([`RuleError::NextHopUnresolved`], visible as its not-offloaded reason). The rules
//! decrement TTL when the device has `FEATURES.DEC_TTL`; a packet whose TTL runs out
//! there is punted (`TTL_EXPIRED`) and answered here with ICMP time exceeded.

use ctoffload_driver::device::RxMeta;
use ctoffload_driver::io::DeviceIo;
use ctoffload_fallback_sw::conntrack::{NatOutcome, Verdict};
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::tuple::{Addr, Dir, Family, Tuple};
use ctoffload_hw_regs::ActionFlags;
use ctoffload_hw_regs::regs::Features;
use std::net::{IpAddr, Ipv4Addr};

use super::hw_rule::{HwRule, Path, PortL2, Routing, RuleError, build_rules, build_rules_on};
use super::worker::Worker;
use crate::gateway::{Egress, Gateway, GatewayStats, Ingress, wire};

/// How often the neighbour table's timers (request retries, give-ups) run.
const TIMER_NS: u64 = 10_000_000;

/// The gateway of a worker and the frames it originates.
#[derive(Debug)]
pub struct Router {
    gw: Gateway,
    fill_checksums: bool,
    hw_dec_ttl: bool,
    /// Frames the gateway originated (ARP, ICMP, released after resolution).
    out: Vec<(usize, Vec<u8>)>,
    next_timers: u64,
}

impl Router {
    /// A router over `gw`; see [`Worker::set_gateway`]. `hw_dec_ttl`: the hardware
    /// rules decrement TTL.
    #[must_use]
    pub fn new(gw: Gateway, fill_checksums: bool, hw_dec_ttl: bool) -> Self {
        Self {
            gw,
            fill_checksums,
            hw_dec_ttl,
            out: Vec::new(),
            next_timers: 0,
        }
    }

    /// The hardware rules of a connection routed by the gateway: the original direction
    /// arrives on `orig_in`; each direction leaves towards its translated destination.
    ///
    /// # Errors
    /// [`RuleError`] when it cannot be offloaded (yet).
    pub fn rules(
        &self,
        tuples: &[Tuple; 2],
        orig_in: u8,
        now: u64,
    ) -> Result<[HwRule; 2], RuleError> {
        let (o, r) = (&tuples[Dir::Original.index()], &tuples[Dir::Reply.index()]);
        // Original packets leave towards the reply's source, replies towards the
        // original source.
        let orig_out = self.hop(r, now)?;
        let reply_out = self.hop(o, now)?;
        let paths = [
            Path {
                in_port: orig_in,
                out_port: orig_out.0,
                l2: Some(orig_out.1),
            },
            Path {
                in_port: orig_out.0,
                out_port: reply_out.0,
                l2: Some(reply_out.1),
            },
        ];
        build_rules_on(tuples, &paths, self.hw_dec_ttl)
    }

    /// Before the rules `found` of a connection read back from the device after a
    /// restart are checked against [`Router::rules`]: each entry's next hop MAC is
    /// taken into the (new, empty) neighbour table, as it was resolved when the rule
    /// was built, wherever the current route towards that direction's destination
    /// leaves by the entry's port with the port's MAC as source. Entries that no longer
    /// agree with the routes teach nothing and then fail the comparison.
    pub(super) fn learn_next_hops(&mut self, tuples: &[Tuple; 2], found: &[HwRule; 2], now: u64) {
        // Original packets go towards the reply's source, replies towards the
        // original source.
        let towards = [&tuples[Dir::Reply.index()], &tuples[Dir::Original.index()]];
        for (t, rule) in towards.into_iter().zip(found) {
            if t.family != Family::V4 {
                continue;
            }
            let Some(hop) = self.gw.route(t.src.as_v4()) else {
                continue;
            };
            let a = &rule.action;
            let port_mac = self.gw.ports().get(hop.port).map(|p| p.mac);
            let rewrites = a
                .flags()
                .contains(ActionFlags::REWRITE_SRC_MAC | ActionFlags::REWRITE_DST_MAC);
            if rewrites && usize::from(a.out_port) == hop.port && port_mac == Some(a.new_src_mac) {
                self.gw
                    .learn_neighbour(hop.port, hop.next_hop, a.new_dst_mac, now);
            }
        }
    }

    /// The egress port and L2 rewrite towards `t`'s source.
    fn hop(&self, t: &Tuple, now: u64) -> Result<(u8, PortL2), RuleError> {
        if t.family != Family::V4 {
            return Err(RuleError::NoRouteTo {
                addr: IpAddr::from(t.src.0),
            });
        }
        let dst = t.src.as_v4();
        let addr = IpAddr::V4(Ipv4Addr::from(dst));
        if self.gw.is_own(dst) {
            return Err(RuleError::LocalDestination { addr });
        }
        let hop = self.gw.route(dst).ok_or(RuleError::NoRouteTo { addr })?;
        let port = u8::try_from(hop.port).map_err(|_| RuleError::NoRouteTo { addr })?;
        let unresolved = RuleError::NextHopUnresolved {
            port,
            next_hop: IpAddr::V4(Ipv4Addr::from(hop.next_hop)),
        };
        let next_hop = self
            .gw
            .neighbours()
            .lookup(hop.port, hop.next_hop, now)
            .ok_or(unresolved)?;
        let mac = self.gw.ports().get(hop.port).ok_or(unresolved)?.mac;
        Ok((port, PortL2 { mac, next_hop }))
    }
}

/// The gateway's drops by reason, as `ctoffload stats` lists them (`gateway/...`).
#[must_use]
pub fn gateway_drops(s: &GatewayStats) -> [(&'static str, u64); 8] {
    [
        ("gateway/not-for-us", s.not_for_us),
        ("gateway/local", s.local_dropped),
        ("gateway/no-route", s.no_route),
        ("gateway/ttl-exceeded", s.ttl_exceeded),
        ("gateway/arp-unresolved", s.arp_dropped),
        ("gateway/bad-ipv4", s.bad_ipv4),
        ("gateway/ipv6-not-routed", s.ipv6_not_routed),
        ("gateway/other-ethertype", s.other_ethertype),
    ]
}

/// The hardware rules of a connection: from the router when the worker has one, else
/// from the fixed port pairing.
pub(super) fn rules_for(
    router: Option<&Router>,
    routing: &Routing,
    tuples: &[Tuple; 2],
    orig_in: u8,
    now: u64,
) -> Result<[HwRule; 2], RuleError> {
    match router {
        Some(r) => r.rules(tuples, orig_in, now),
        None => build_rules(tuples, orig_in, routing),
    }
}

impl<Io: DeviceIo> Worker<Io> {
    /// Makes this worker a router: exception frames go through `gw` (port i of the
    /// gateway is device port i). `fill_checksums`: recompute TCP/UDP checksums of
    /// received IPv4 packets before conntrack (veth peers leave them to offload).
    pub fn set_gateway(&mut self, gw: Gateway, fill_checksums: bool) {
        let hw_dec_ttl = self.dev.capabilities().features.contains(Features::DEC_TTL);
        self.router = Some(Router::new(gw, fill_checksums, hw_dec_ttl));
    }

    /// The gateway's counters (`None`: not a router).
    pub fn gateway_stats(&self) -> Option<GatewayStats> {
        self.router.as_ref().map(|r| r.gw.stats())
    }

    /// The gateway (`None`: not a router).
    pub fn gateway(&self) -> Option<&Gateway> {
        self.router.as_ref().map(|r| &r.gw)
    }

    /// One exception frame through the gateway, conntrack and NAT; queued for TX on
    /// the port the gateway chose. False: not a router (the caller forwards it).
    pub(super) fn routed_frame(&mut self, m: &RxMeta, at: usize, len: usize, now: u64) -> bool {
        let Some(router) = self.router.as_mut() else {
            return false;
        };
        let start = self.tx_buf.len();
        self.tx_buf.extend_from_slice(&self.rx_buf[at..at + len]);
        let frame = &mut self.tx_buf[start..];
        let in_port = usize::from(m.port);
        let route = match router.gw.ingress(in_port, frame, now, &mut router.out) {
            Ingress::Consumed => {
                self.tx_buf.truncate(start);
                return true;
            }
            Ingress::Ipv4 { route } => route,
        };
        if router.fill_checksums {
            wire::fill_l4_checksum(frame);
        }
        let out_port = route.map(|h| h.port);
        let meta = PacketMeta {
            in_port: u32::from(m.port),
            out_port: out_port.and_then(|p| u32::try_from(p).ok()),
            out_addr: out_port
                .and_then(|p| router.gw.primary_addr(p))
                .map(Addr::v4),
        };
        let v = self.ct.process_mut(frame, 0, &meta, now);
        let tracked = match v.verdict {
            Verdict::Invalid(_) => {
                self.stats.drop_invalid += 1;
                self.tx_buf.truncate(start);
                return true;
            }
            Verdict::Tracked { .. } if matches!(v.nat, NatOutcome::Drop(_)) => {
                self.stats.drop_other += 1;
                self.tx_buf.truncate(start);
                return true;
            }
            Verdict::Tracked { slot, dir, .. } => Some((slot, dir)),
            Verdict::Untracked(_) => None,
        };
        // Egress first: a packet that resolves a next hop lets its connection offload.
        match router.gw.egress(in_port, frame, now, &mut router.out) {
            Egress::Send(p) => {
                let p = u8::try_from(p).unwrap_or(u8::MAX);
                self.tx_meta.push((p, start, len));
            }
            Egress::Consumed => self.tx_buf.truncate(start),
        }
        if let Some((slot, dir)) = tracked {
            self.tracked(slot, dir, m, now);
        }
        true
    }

    /// The gateway's timers (at most every [`TIMER_NS`]) and the frames it originated,
    /// queued for TX.
    pub(super) fn routed_output(&mut self, now: u64) {
        let Some(router) = self.router.as_mut() else {
            return;
        };
        if now >= router.next_timers {
            router.gw.poll(now, &mut router.out);
            router.next_timers = now.saturating_add(TIMER_NS);
        }
        for (port, f) in router.out.drain(..) {
            let start = self.tx_buf.len();
            self.tx_buf.extend_from_slice(&f);
            self.tx_meta
                .push((u8::try_from(port).unwrap_or(u8::MAX), start, f.len()));
        }
    }
}

#[cfg(test)]
mod tests {
    use ctoffload_fallback_sw::tuple::proto;
    use ctoffload_hw_regs::ActionFlags;

    use super::*;
    use crate::gateway::wire::{BROADCAST, arp_frame};
    use crate::gateway::{GatewayConfig, PortConfig};

    const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
    const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
    const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
    const GW_IN: [u8; 4] = [10, 0, 0, 1];
    const HOST: [u8; 4] = [10, 0, 0, 2];
    const GW_OUT: [u8; 4] = [192, 0, 2, 1];
    const SERVER: [u8; 4] = [192, 0, 2, 2];

    fn router(hw_dec_ttl: bool) -> Router {
        let port = |name: &str, mac, addr| PortConfig {
            name: name.into(),
            mac,
            addrs: vec![(addr, 24)],
        };
        let gw = Gateway::new(GatewayConfig {
            ports: vec![
                port("in", GW_IN_MAC, GW_IN),
                port("out", GW_OUT_MAC, GW_OUT),
            ],
            ..GatewayConfig::default()
        })
        .expect("gateway");
        Router::new(gw, false, hw_dec_ttl)
    }

    /// `host` at `mac` on `port` asks for the gateway's address `gw` (learned).
    fn arp_from(r: &mut Router, port: usize, host: [u8; 4], mac: [u8; 6], gw: [u8; 4]) {
        let req = arp_frame(BROADCAST, 1, mac, host, [0; 6], gw);
        let mut out = Vec::new();
        assert_eq!(r.gw.ingress(port, &req, 1, &mut out), Ingress::Consumed);
        assert_eq!(out.len(), 1, "answered");
    }

    fn tuple(src: [u8; 4], sp: u16, dst: [u8; 4], dp: u16) -> Tuple {
        Tuple::v4(src, sp, dst, dp, proto::TCP)
    }

    #[test]
    fn masqueraded_connection_waits_for_both_next_hops_then_carries_their_macs() {
        let mut r = router(true);
        let tuples = [
            tuple(HOST, 40000, SERVER, 80),
            tuple(SERVER, 80, GW_OUT, 61000),
        ];
        assert_eq!(
            r.rules(&tuples, 0, 2),
            Err(RuleError::NextHopUnresolved {
                port: 1,
                next_hop: IpAddr::from(SERVER),
            })
        );
        arp_from(&mut r, 1, SERVER, SERVER_MAC, GW_OUT);
        assert_eq!(
            r.rules(&tuples, 0, 2),
            Err(RuleError::NextHopUnresolved {
                port: 0,
                next_hop: IpAddr::from(HOST),
            })
        );
        arp_from(&mut r, 0, HOST, HOST_MAC, GW_IN);
        let [fwd, rev] = r.rules(&tuples, 0, 2).expect("rules");
        assert_eq!((fwd.key.port, fwd.action.out_port), (0, 1));
        assert_eq!(
            (fwd.action.new_src_mac, fwd.action.new_dst_mac),
            (GW_OUT_MAC, SERVER_MAC)
        );
        assert!(fwd.action.flags().contains(
            ActionFlags::SNAT
                | ActionFlags::DEC_TTL
                | ActionFlags::REWRITE_SRC_MAC
                | ActionFlags::REWRITE_DST_MAC
        ));
        assert_eq!(&fwd.action.new_src_addr[..4], &GW_OUT);
        assert_eq!((rev.key.port, rev.action.out_port), (1, 0));
        assert_eq!(&rev.key.dst_addr[..4], &GW_OUT);
        assert_eq!(
            (rev.action.new_src_mac, rev.action.new_dst_mac),
            (GW_IN_MAC, HOST_MAC)
        );
        assert!(rev.action.flags().contains(ActionFlags::DNAT));
        // Without the device feature, no TTL decrement in hardware.
        let mut plain = router(false);
        arp_from(&mut plain, 1, SERVER, SERVER_MAC, GW_OUT);
        arp_from(&mut plain, 0, HOST, HOST_MAC, GW_IN);
        let [fwd, _] = plain.rules(&tuples, 0, 2).expect("rules");
        assert!(!fwd.action.flags().contains(ActionFlags::DEC_TTL));
    }

    #[test]
    fn rules_read_back_after_a_restart_teach_their_next_hops() {
        let tuples = [
            tuple(HOST, 40000, SERVER, 80),
            tuple(SERVER, 80, GW_OUT, 61000),
        ];
        let mut before = router(true);
        arp_from(&mut before, 1, SERVER, SERVER_MAC, GW_OUT);
        arp_from(&mut before, 0, HOST, HOST_MAC, GW_IN);
        let found = before.rules(&tuples, 0, 2).expect("rules");
        // A new router (empty neighbour table) learns both next hops from the
        // entries and builds the same rules.
        let mut after = router(true);
        after.learn_next_hops(&tuples, &found, 10);
        assert_eq!(
            after.gw.neighbours().lookup(1, SERVER, 10),
            Some(SERVER_MAC)
        );
        assert_eq!(after.gw.neighbours().lookup(0, HOST, 10), Some(HOST_MAC));
        assert_eq!(after.rules(&tuples, 0, 10), Ok(found));
        // An entry that leaves by another port than the route, or with another source
        // MAC than the port's, teaches nothing.
        let mut wrong = found;
        wrong[0].action.out_port = 0;
        wrong[1].action.new_src_mac = GW_OUT_MAC;
        let mut other = router(true);
        other.learn_next_hops(&tuples, &wrong, 10);
        assert_eq!(other.gw.neighbours().entries().count(), 0);
        assert!(other.rules(&tuples, 0, 10).is_err());
    }

    #[test]
    fn connections_to_the_gateway_or_off_route_stay_in_software() {
        let mut r = router(true);
        arp_from(&mut r, 0, HOST, HOST_MAC, GW_IN);
        let local = [tuple(HOST, 40000, GW_IN, 22), tuple(GW_IN, 22, HOST, 40000)];
        assert_eq!(
            r.rules(&local, 0, 2),
            Err(RuleError::LocalDestination {
                addr: IpAddr::from(GW_IN),
            })
        );
        let far = [198, 51, 100, 7];
        let off = [tuple(HOST, 40000, far, 80), tuple(far, 80, HOST, 40000)];
        assert_eq!(
            r.rules(&off, 0, 2),
            Err(RuleError::NoRouteTo {
                addr: IpAddr::from(far),
            })
        );
    }
}
