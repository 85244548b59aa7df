//! The gateway pieces of the software backend: ports with MAC and IPv4 addresses,
//! routing (longest-prefix match over connected prefixes and static routes), ARP
//! (answers, resolution with a cache and a bounded queue per unresolved next hop), and
//! IPv4 forwarding the way a router does it (TTL decrement, ICMP time exceeded and
//! net unreachable, echo replies for our own addresses; other traffic to our
//! addresses dropped and counted).
//!
//! Pure and synchronous: frames in, frames out, the clock passed in (`now`, ns). The
//! forwarding loop that joins this to packet I/O and to conntrack + NAT is
//! [`forward`]. IPv6 is not routed: IPv6 frames are dropped and counted
//! ([`GatewayStats::ipv6_not_routed`]).

pub mod arp;
pub mod backend;
pub mod forward;
pub mod from_config;
pub mod wire;
pub mod xdp_offload;

use std::collections::VecDeque;

pub use arp::{ArpConfig, ArpTable, Resolve};
use wire::{BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6};

/// An IPv4 prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    /// Network address (host bits are ignored).
    pub addr: [u8; 4],
    /// Prefix length, 0..=32.
    pub len: u8,
}

impl Prefix {
    /// The mask of the prefix, as a host-order integer.
    fn mask(self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.len.min(32)))
        }
    }

    /// Whether `ip` is inside the prefix.
    #[must_use]
    pub fn contains(self, ip: [u8; 4]) -> bool {
        (u32::from_be_bytes(ip) ^ u32::from_be_bytes(self.addr)) & self.mask() == 0
    }

    /// The directed broadcast address of the prefix (for lengths up to 30).
    fn broadcast(self) -> Option<[u8; 4]> {
        (self.len <= 30).then(|| (u32::from_be_bytes(self.addr) | !self.mask()).to_be_bytes())
    }
}

/// One port of the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortConfig {
    /// Name (the Linux interface for the software backend).
    pub name: String,
    /// The port's MAC address (source of everything sent, destination accepted).
    pub mac: [u8; 6],
    /// IPv4 addresses with their connected prefix length; the first one is the port's
    /// primary address (ICMP errors, ARP requests, masquerade).
    pub addrs: Vec<([u8; 4], u8)>,
}

/// A static route (the config file's `[[routes]]`): packets to `prefix` go to the
/// neighbour `via`, or, without `via`, straight to their destination on `port` (an
/// extra connected prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticRoute {
    /// Destination prefix.
    pub prefix: Prefix,
    /// Next hop; `None`: the destination is on-link on `port`.
    pub via: Option<[u8; 4]>,
    /// Egress port; `None`: the port of the connected prefix that holds `via`.
    pub port: Option<usize>,
}

/// Gateway configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Ports, indexed by position.
    pub ports: Vec<PortConfig>,
    /// Static routes (connected prefixes come from the ports' addresses).
    pub routes: Vec<StaticRoute>,
    /// Neighbour table settings.
    pub arp: ArpConfig,
}

/// A configuration the gateway refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A prefix length above 32.
    #[error("prefix length {len} above 32")]
    PrefixLength {
        /// The length.
        len: u8,
    },
    /// A static route's next hop is not on any connected prefix.
    #[error("next hop {via:?} of route {prefix:?} is not on a connected prefix")]
    NextHopNotConnected {
        /// The route's prefix.
        prefix: Prefix,
        /// The next hop.
        via: [u8; 4],
    },
    /// A static route with neither next hop nor port, or with a port that does not
    /// exist.
    #[error("route {prefix:?} names no next hop and no existing port")]
    NoEgress {
        /// The route's prefix.
        prefix: Prefix,
    },
}

/// Where a packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// Egress port index.
    pub port: usize,
    /// The neighbour to send to (the destination itself on a connected prefix).
    pub next_hop: [u8; 4],
}

/// One entry of the routing table.
#[derive(Debug, Clone, Copy)]
struct RouteEntry {
    prefix: Prefix,
    port: usize,
    via: Option<[u8; 4]>,
}

/// Gateway counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatewayStats {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames for another MAC (seen in promiscuous mode), multicast or too short.
    pub not_for_us: u64,
    /// ARP requests for our addresses answered.
    pub arp_replies_sent: u64,
    /// ARP requests sent (first tries and retries).
    pub arp_requests_sent: u64,
    /// ARP packets ignored (other targets, malformed).
    pub arp_ignored: u64,
    /// Packets dropped because their next hop could not be resolved (queue full or no
    /// answer).
    pub arp_dropped: u64,
    /// IPv6 frames dropped: IPv6 is not routed.
    pub ipv6_not_routed: u64,
    /// Frames of other EtherTypes (VLAN-tagged included) dropped.
    pub other_ethertype: u64,
    /// IPv4 packets with a bad header (truncated, version, checksum) dropped.
    pub bad_ipv4: u64,
    /// Packets whose TTL ran out (ICMP time exceeded sent where allowed).
    pub ttl_exceeded: u64,
    /// Packets without a route (ICMP net unreachable sent where allowed).
    pub no_route: u64,
    /// ICMP errors sent (time exceeded, unreachable).
    pub icmp_errors_sent: u64,
    /// Echo requests to our addresses answered.
    pub echo_replies: u64,
    /// Other packets to our addresses (or broadcast/multicast IPv4) dropped.
    pub local_dropped: u64,
    /// Packets forwarded (sent or queued for ARP).
    pub forwarded: u64,
}

/// What [`Gateway::ingress`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ingress {
    /// An IPv4 packet for conntrack: routed to `route` before NAT (`None`: addressed to
    /// the gateway, e.g. a reply to a masqueraded connection).
    Ipv4 {
        /// The pre-NAT route.
        route: Option<Hop>,
    },
    /// Handled here (answered, dropped or counted).
    Consumed,
}

/// What [`Gateway::egress`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Egress {
    /// Send the (rewritten) frame on this port.
    Send(usize),
    /// Handled here (answered, queued for ARP, dropped).
    Consumed,
}

/// The gateway: ports, routes, neighbours, counters.
#[derive(Debug)]
pub struct Gateway {
    ports: Vec<PortConfig>,
    routes: Vec<RouteEntry>,
    arp: ArpTable,
    stats: GatewayStats,
}

impl Gateway {
    /// A gateway for `cfg`.
    ///
    /// # Errors
    /// A prefix length above 32, or a static route whose next hop is not connected.
    pub fn new(cfg: GatewayConfig) -> Result<Self, ConfigError> {
        let mut routes = Vec::new();
        for (port, p) in cfg.ports.iter().enumerate() {
            for &(addr, len) in &p.addrs {
                if len > 32 {
                    return Err(ConfigError::PrefixLength { len });
                }
                routes.push(RouteEntry {
                    prefix: Prefix { addr, len },
                    port,
                    via: None,
                });
            }
        }
        let connected = routes.clone();
        for r in &cfg.routes {
            if r.prefix.len > 32 {
                return Err(ConfigError::PrefixLength { len: r.prefix.len });
            }
            let port = match (r.port, r.via) {
                (Some(port), _) if port < cfg.ports.len() => port,
                (Some(_), _) | (None, None) => {
                    return Err(ConfigError::NoEgress { prefix: r.prefix });
                }
                (None, Some(via)) => connected
                    .iter()
                    .filter(|c| c.prefix.contains(via))
                    .max_by_key(|c| c.prefix.len)
                    .map(|c| c.port)
                    .ok_or(ConfigError::NextHopNotConnected {
                        prefix: r.prefix,
                        via,
                    })?,
            };
            routes.push(RouteEntry {
                prefix: r.prefix,
                port,
                via: r.via,
            });
        }
        // Longest prefix first; a stable sort keeps connected before static at equal
        // lengths.
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len));
        Ok(Self {
            ports: cfg.ports,
            routes,
            arp: ArpTable::new(cfg.arp),
            stats: GatewayStats::default(),
        })
    }

    /// The ports.
    #[must_use]
    pub fn ports(&self) -> &[PortConfig] {
        &self.ports
    }

    /// The counters.
    #[must_use]
    pub fn stats(&self) -> GatewayStats {
        self.stats
    }

    /// The neighbour table.
    #[must_use]
    pub fn neighbours(&self) -> &ArpTable {
        &self.arp
    }

    /// Takes `ip` on `port` as resolved to `mac` (a neighbour known from elsewhere: a
    /// hardware rule read back after a restart), creating the entry if needed.
    pub fn learn_neighbour(&mut self, port: usize, ip: [u8; 4], mac: [u8; 6], now: u64) {
        let waiting = self.arp.learn(port, ip, mac, true, now);
        // Nothing was queued for it yet on a fresh table; a queue is dropped, as after
        // a give-up (its packets' senders retransmit).
        drop(waiting);
    }

    /// The primary IPv4 address of `port` (what masquerade translates to).
    #[must_use]
    pub fn primary_addr(&self, port: usize) -> Option<[u8; 4]> {
        self.ports.get(port)?.addrs.first().map(|&(a, _)| a)
    }

    /// Longest-prefix match for `dst`.
    #[must_use]
    pub fn route(&self, dst: [u8; 4]) -> Option<Hop> {
        self.routes
            .iter()
            .find(|r| r.prefix.contains(dst))
            .map(|r| Hop {
                port: r.port,
                next_hop: r.via.unwrap_or(dst),
            })
    }

    /// Whether `ip` is one of the gateway's addresses (any port).
    #[must_use]
    pub fn is_own(&self, ip: [u8; 4]) -> bool {
        self.ports
            .iter()
            .any(|p| p.addrs.iter().any(|&(a, _)| a == ip))
    }

    /// Whether `ip` is not a unicast destination a router forwards to: limited or
    /// directed broadcast of a connected prefix, multicast, or 0.0.0.0/8.
    fn is_special(&self, ip: [u8; 4]) -> bool {
        ip == [255; 4]
            || ip[0] == 0
            || (224..=239).contains(&ip[0])
            || self.ports.iter().any(|p| {
                p.addrs
                    .iter()
                    .any(|&(addr, len)| Prefix { addr, len }.broadcast() == Some(ip))
            })
    }

    /// The first stage for a received frame: L2 filter, ARP, IPv4 header checks, TTL
    /// expiry and no-route errors for packets that would be forwarded. Frames the
    /// gateway originates (ARP, ICMP) are appended to `out` as (port, frame).
    pub fn ingress(
        &mut self,
        port: usize,
        frame: &[u8],
        now: u64,
        out: &mut Vec<(usize, Vec<u8>)>,
    ) -> Ingress {
        self.stats.rx_frames += 1;
        let Some(p) = self.ports.get(port) else {
            self.stats.not_for_us += 1;
            return Ingress::Consumed;
        };
        let (Some(dst_mac), Some(ethertype)) = (wire::mac_at(frame, 0), wire::ethertype(frame))
        else {
            self.stats.not_for_us += 1;
            return Ingress::Consumed;
        };
        let broadcast = dst_mac == BROADCAST;
        if dst_mac != p.mac && !(broadcast && ethertype == ETHERTYPE_ARP) {
            self.stats.not_for_us += 1;
            return Ingress::Consumed;
        }
        match ethertype {
            ETHERTYPE_ARP => {
                self.arp_input(port, frame, now, out);
                Ingress::Consumed
            }
            ETHERTYPE_IPV6 => {
                self.stats.ipv6_not_routed += 1;
                Ingress::Consumed
            }
            ETHERTYPE_IPV4 => self.ipv4_ingress(port, frame, out),
            _ => {
                self.stats.other_ethertype += 1;
                Ingress::Consumed
            }
        }
    }

    fn ipv4_ingress(
        &mut self,
        port: usize,
        frame: &[u8],
        out: &mut Vec<(usize, Vec<u8>)>,
    ) -> Ingress {
        let Ok(h) = wire::ipv4(frame) else {
            self.stats.bad_ipv4 += 1;
            return Ingress::Consumed;
        };
        if self.is_own(h.dst) {
            return Ingress::Ipv4 { route: None };
        }
        if self.is_special(h.dst) || self.is_special(h.src) {
            self.stats.local_dropped += 1;
            return Ingress::Consumed;
        }
        let Some(hop) = self.route(h.dst) else {
            self.stats.no_route += 1;
            self.icmp_error(port, frame, &h, 3, 0, out);
            return Ingress::Consumed;
        };
        if h.ttl <= 1 {
            self.stats.ttl_exceeded += 1;
            self.icmp_error(port, frame, &h, 11, 0, out);
            return Ingress::Consumed;
        }
        Ingress::Ipv4 { route: Some(hop) }
    }

    /// An ICMP error about `frame` from `port`'s primary address, unless the offender
    /// is itself an ICMP error or a later fragment (RFC 1812 4.3.2.7).
    fn icmp_error(
        &mut self,
        port: usize,
        frame: &[u8],
        h: &wire::Ipv4Hdr,
        icmp_type: u8,
        code: u8,
        out: &mut Vec<(usize, Vec<u8>)>,
    ) {
        if h.later_fragment || wire::is_icmp_error(frame, h) {
            return;
        }
        let (Some(src), Some(p)) = (self.primary_addr(port), self.ports.get(port)) else {
            return;
        };
        if let Some(e) = wire::icmp_error(frame, p.mac, src, icmp_type, code) {
            self.stats.icmp_errors_sent += 1;
            out.push((port, e));
        }
    }

    fn arp_input(&mut self, port: usize, frame: &[u8], now: u64, out: &mut Vec<(usize, Vec<u8>)>) {
        let Some(a) = wire::arp(frame) else {
            self.stats.arp_ignored += 1;
            return;
        };
        let Some(p) = self.ports.get(port) else {
            return;
        };
        let mac = p.mac;
        let for_us = p.addrs.iter().any(|&(ip, _)| ip == a.tpa);
        if a.spa != [0; 4] && a.sha != BROADCAST && a.sha[0] & 1 == 0 {
            let released = self.arp.learn(port, a.spa, a.sha, for_us, now);
            self.release(port, a.sha, released, out);
        }
        if a.op == 1 && for_us {
            self.stats.arp_replies_sent += 1;
            out.push((port, wire::arp_frame(a.sha, 2, mac, a.tpa, a.sha, a.spa)));
        } else if !for_us {
            self.stats.arp_ignored += 1;
        }
    }

    /// Frames that waited for `mac` go out with it as destination.
    fn release(
        &mut self,
        port: usize,
        mac: [u8; 6],
        frames: VecDeque<Vec<u8>>,
        out: &mut Vec<(usize, Vec<u8>)>,
    ) {
        for mut f in frames {
            if let Some(d) = f.get_mut(0..6) {
                d.copy_from_slice(&mac);
                out.push((port, f));
            }
        }
    }

    fn arp_request(&mut self, port: usize, ip: [u8; 4], out: &mut Vec<(usize, Vec<u8>)>) {
        let Some(p) = self.ports.get(port) else {
            return;
        };
        // Source: the port address on the next hop's prefix, else the primary one.
        let spa = p
            .addrs
            .iter()
            .find(|&&(addr, len)| Prefix { addr, len }.contains(ip))
            .or(p.addrs.first())
            .map_or([0; 4], |&(a, _)| a);
        self.stats.arp_requests_sent += 1;
        out.push((port, wire::arp_frame(BROADCAST, 1, p.mac, spa, [0; 6], ip)));
    }

    /// The second stage, after conntrack and NAT rewrote `frame`: packets (still)
    /// addressed to the gateway are answered (echo) or dropped; others are routed on
    /// their translated destination, TTL decremented, MACs rewritten, and sent or
    /// queued until their next hop is resolved.
    pub fn egress(
        &mut self,
        in_port: usize,
        frame: &mut [u8],
        now: u64,
        out: &mut Vec<(usize, Vec<u8>)>,
    ) -> Egress {
        let Ok(h) = wire::ipv4(frame) else {
            self.stats.bad_ipv4 += 1;
            return Egress::Consumed;
        };
        if self.is_own(h.dst) {
            self.local_input(in_port, frame, &h, out);
            return Egress::Consumed;
        }
        let Some(hop) = self.route(h.dst) else {
            // Only DNAT can get here (ingress routed the original destination).
            self.stats.no_route += 1;
            return Egress::Consumed;
        };
        if h.ttl <= 1 {
            // Only a translated reply can get here (ingress checked the others); an
            // error quoting the translated packet would leak the inside address.
            self.stats.ttl_exceeded += 1;
            return Egress::Consumed;
        }
        let Some(p) = self.ports.get(hop.port) else {
            return Egress::Consumed;
        };
        let mac = p.mac;
        if !wire::dec_ttl(frame) {
            self.stats.bad_ipv4 += 1;
            return Egress::Consumed;
        }
        frame[6..12].copy_from_slice(&mac);
        match self.arp.resolve(hop.port, hop.next_hop, frame, now) {
            Resolve::Mac(m) => {
                frame[0..6].copy_from_slice(&m);
                self.stats.forwarded += 1;
                Egress::Send(hop.port)
            }
            Resolve::QueuedSendRequest => {
                self.stats.forwarded += 1;
                self.arp_request(hop.port, hop.next_hop, out);
                Egress::Consumed
            }
            Resolve::Queued => {
                self.stats.forwarded += 1;
                Egress::Consumed
            }
            Resolve::Dropped => {
                self.stats.arp_dropped += 1;
                Egress::Consumed
            }
        }
    }

    fn local_input(
        &mut self,
        in_port: usize,
        frame: &[u8],
        h: &wire::Ipv4Hdr,
        out: &mut Vec<(usize, Vec<u8>)>,
    ) {
        let Some(p) = self.ports.get(in_port) else {
            return;
        };
        if let Some(r) = wire::echo_reply(frame, p.mac) {
            // Back to the MAC the request came from (symmetric routing assumed).
            self.stats.echo_replies += 1;
            out.push((in_port, r));
        } else {
            let _ = h;
            self.stats.local_dropped += 1;
        }
    }

    /// Timers: ARP retries (requests appended to `out`) and resolution failures.
    pub fn poll(&mut self, now: u64, out: &mut Vec<(usize, Vec<u8>)>) {
        let t = self.arp.poll(now);
        self.stats.arp_dropped += t.failed_packets;
        for (port, ip) in t.retry {
            self.arp_request(port, ip, out);
        }
    }
}

#[cfg(test)]
mod tests;
