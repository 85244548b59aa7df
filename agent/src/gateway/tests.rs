//! Byte-level tests of the gateway: ARP, routing, TTL, ICMP errors, own addresses.

use super::wire::{self, ETH_LEN};
use super::*;

const IN_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const OUT_MAC: [u8; 6] = [2, 0, 0, 0, 2, 1];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 1, 2];
const ROUTER_MAC: [u8; 6] = [2, 0, 0, 0, 2, 2];
const GW_IN: [u8; 4] = [10, 0, 0, 1];
const GW_OUT: [u8; 4] = [192, 0, 2, 1];
const HOST: [u8; 4] = [10, 0, 0, 2];
const ROUTER: [u8; 4] = [192, 0, 2, 2];
const FAR: [u8; 4] = [198, 51, 100, 7];

fn gw() -> Gateway {
    Gateway::new(GatewayConfig {
        ports: vec![
            PortConfig {
                name: "in".into(),
                mac: IN_MAC,
                addrs: vec![(GW_IN, 24)],
            },
            PortConfig {
                name: "out".into(),
                mac: OUT_MAC,
                addrs: vec![(GW_OUT, 24)],
            },
        ],
        routes: vec![StaticRoute {
            prefix: Prefix {
                addr: [0; 4],
                len: 0,
            },
            via: Some(ROUTER),
            port: None,
        }],
        arp: ArpConfig::default(),
    })
    .expect("config")
}

/// A UDP packet from HOST (at HOST_MAC) to `dst` via the gateway's inside MAC.
fn udp(dst: [u8; 4], ttl: u8) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&IN_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&28u16.to_be_bytes());
    ip[8] = ttl;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&HOST);
    ip[16..20].copy_from_slice(&dst);
    let c = wire::csum_finish(wire::csum_add(0, &ip));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0x00, 0x08, 0x00, 0x00]);
    f
}

#[test]
fn longest_prefix_match_and_bad_next_hop() {
    let g = gw();
    assert_eq!(
        g.route(HOST),
        Some(Hop {
            port: 0,
            next_hop: HOST
        })
    );
    assert_eq!(
        g.route(FAR),
        Some(Hop {
            port: 1,
            next_hop: ROUTER
        })
    );
    let bad = Gateway::new(GatewayConfig {
        routes: vec![StaticRoute {
            prefix: Prefix {
                addr: [0; 4],
                len: 0,
            },
            via: Some(ROUTER),
            port: None,
        }],
        ..GatewayConfig::default()
    });
    assert!(matches!(bad, Err(ConfigError::NextHopNotConnected { .. })));
    // An on-link route on an explicit port.
    let mut cfg = GatewayConfig {
        ports: g.ports().to_vec(),
        ..GatewayConfig::default()
    };
    cfg.routes.push(StaticRoute {
        prefix: Prefix {
            addr: [172, 16, 0, 0],
            len: 12,
        },
        via: None,
        port: Some(1),
    });
    let g2 = Gateway::new(cfg.clone()).expect("config");
    assert_eq!(
        g2.route([172, 16, 5, 5]),
        Some(Hop {
            port: 1,
            next_hop: [172, 16, 5, 5]
        })
    );
    cfg.routes[0].port = Some(7);
    assert!(matches!(
        Gateway::new(cfg),
        Err(ConfigError::NoEgress { .. })
    ));
}

#[test]
fn arp_request_for_us_is_answered_and_learned() {
    let mut g = gw();
    let mut out = Vec::new();
    let req = wire::arp_frame(wire::BROADCAST, 1, HOST_MAC, HOST, [0; 6], GW_IN);
    assert_eq!(g.ingress(0, &req, 0, &mut out), Ingress::Consumed);
    assert_eq!(out.len(), 1);
    let (port, reply) = &out[0];
    assert_eq!(*port, 0);
    assert_eq!(&reply[0..6], &HOST_MAC);
    let a = wire::arp(reply).expect("arp");
    assert_eq!((a.op, a.sha, a.spa, a.tpa), (2, IN_MAC, GW_IN, HOST));
    assert_eq!(g.neighbours().lookup(0, HOST, 1), Some(HOST_MAC));
    // A request for someone else is neither answered nor learned from.
    out.clear();
    let other = wire::arp_frame(
        wire::BROADCAST,
        1,
        ROUTER_MAC,
        ROUTER,
        [0; 6],
        [192, 0, 2, 9],
    );
    g.ingress(1, &other, 0, &mut out);
    assert!(out.is_empty());
    assert_eq!(g.neighbours().lookup(1, ROUTER, 1), None);
}

#[test]
fn forwarding_resolves_next_hop_then_rewrites_l2_and_ttl() {
    let mut g = gw();
    let mut out = Vec::new();
    let mut f = udp(FAR, 64);
    assert_eq!(
        g.ingress(0, &f, 0, &mut out),
        Ingress::Ipv4 {
            route: Some(Hop {
                port: 1,
                next_hop: ROUTER
            })
        }
    );
    // Unresolved: queued, ARP request out of the egress port.
    assert_eq!(g.egress(0, &mut f, 0, &mut out), Egress::Consumed);
    assert_eq!(out.len(), 1);
    let (p, req) = out.pop().expect("request");
    assert_eq!(p, 1);
    let a = wire::arp(&req).expect("arp");
    assert_eq!((a.op, a.spa, a.tpa), (1, GW_OUT, ROUTER));
    // The reply releases the queued packet, rewritten.
    let reply = wire::arp_frame(OUT_MAC, 2, ROUTER_MAC, ROUTER, OUT_MAC, GW_OUT);
    g.ingress(1, &reply, 1, &mut out);
    let (p, sent) = out.pop().expect("released");
    assert_eq!(p, 1);
    assert_eq!(&sent[0..6], &ROUTER_MAC);
    assert_eq!(&sent[6..12], &OUT_MAC);
    let h = wire::ipv4(&sent).expect("valid checksum");
    assert_eq!(h.ttl, 63);
    // Resolved now: sent at once.
    let mut f2 = udp(FAR, 64);
    assert_eq!(g.egress(0, &mut f2, 2, &mut out), Egress::Send(1));
    assert_eq!(&f2[0..6], &ROUTER_MAC);
}

#[test]
fn ttl_expiry_and_no_route_send_icmp_errors_from_ingress_address() {
    let mut g = Gateway::new(GatewayConfig {
        ports: gw().ports().to_vec(),
        ..GatewayConfig::default()
    })
    .expect("config");
    let mut out = Vec::new();
    assert_eq!(
        g.ingress(0, &udp([192, 0, 2, 9], 1), 0, &mut out),
        Ingress::Consumed
    );
    assert_eq!(g.ingress(0, &udp(FAR, 64), 0, &mut out), Ingress::Consumed);
    assert_eq!(out.len(), 2);
    for ((p, e), (ty, code)) in out.iter().zip([(11, 0), (3, 0)]) {
        assert_eq!(*p, 0);
        assert_eq!(&e[0..6], &HOST_MAC);
        let h = wire::ipv4(e).expect("valid");
        assert_eq!((h.src, h.dst), (GW_IN, HOST));
        assert_eq!((e[ETH_LEN + 20], e[ETH_LEN + 21]), (ty, code));
    }
    let s = g.stats();
    assert_eq!((s.ttl_exceeded, s.no_route, s.icmp_errors_sent), (1, 1, 2));
}

#[test]
fn own_address_echo_answered_other_traffic_dropped_and_counted() {
    let mut g = gw();
    let mut out = Vec::new();
    let mut f = udp(GW_IN, 64);
    assert_eq!(g.ingress(0, &f, 0, &mut out), Ingress::Ipv4 { route: None });
    assert_eq!(g.egress(0, &mut f, 0, &mut out), Egress::Consumed);
    assert!(out.is_empty());
    assert_eq!(g.stats().local_dropped, 1);
    // Echo request: same frame shape with ICMP type 8.
    let mut e = udp(GW_OUT, 64);
    e[ETH_LEN + 9] = 1;
    e[ETH_LEN + 10..ETH_LEN + 12].fill(0);
    let c = wire::csum_finish(wire::csum_add(0, &e[ETH_LEN..ETH_LEN + 20]));
    e[ETH_LEN + 10..ETH_LEN + 12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut e[ETH_LEN + 20..];
    icmp.copy_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]);
    let c = wire::csum_finish(wire::csum_add(0, icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    assert_eq!(g.egress(0, &mut e, 0, &mut out), Egress::Consumed);
    let (p, r) = out.pop().expect("reply");
    assert_eq!(p, 0);
    let h = wire::ipv4(&r).expect("valid");
    assert_eq!((h.src, h.dst, r[ETH_LEN + 20]), (GW_OUT, HOST, 0));
    // Not for our MAC, IPv6: dropped and counted.
    let mut other = udp(FAR, 64);
    other[0..6].copy_from_slice(&[2, 9, 9, 9, 9, 9]);
    g.ingress(0, &other, 0, &mut out);
    let mut v6 = udp(FAR, 64);
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    g.ingress(0, &v6, 0, &mut out);
    assert_eq!((g.stats().not_for_us, g.stats().ipv6_not_routed), (1, 1));
}
