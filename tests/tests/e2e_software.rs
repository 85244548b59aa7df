//! End to end: the software backend's forwarding loop as a gateway between real Linux
//! network stacks.
//!
//! ```text
//!  inside ns                     gw ns (ip_forward=0)                   outside ns
//!  10.77.0.2/24, 10.77.0.3/24    port 0: 10.77.0.1/24  port 1: 192.0.2.1/24   192.0.2.2/24
//!  default via 10.77.0.1  ─veth─ [ SoftwareForwarder over AF_PACKET ] ─veth─ (no route back)
//! ```
//!
//! The gateway namespace's kernel has no IPv4 address and does not forward: every
//! packet that crosses is forwarded by the loop, which runs on a thread of this process
//! inside the gateway namespace, with a masquerade rule on port 1. The outside host has
//! no route to the inside prefix, so nothing works without SNAT.
//!
//! Needs root (namespaces, AF_PACKET) and `ip`; skipped with a message otherwise, except
//! that under `CI` a missing program fails the test. Every wait is bounded; namespaces
//! are deleted also when an assertion fails (their guards drop after the loop stops).

use std::net::{SocketAddr, UdpSocket};

use ctoffload_agent::gateway::forward::ForwarderConfig;
use ctoffload_agent::port::AfPacket;
use ctoffload_fallback_sw::conntrack::Config;
use ctoffload_tests::netns::{NetNs, is_root, skip_reason};
use ctoffload_tests::topology::{
    ForwarderThread, GW_IN, GW_OUT, IN_A, IN_B, IN_HOST_MAC, IcmpAnswer, NO_ROUTE, OUT_HOST,
    OUT_HOST_MAC, Topology, ip, masquerade_forwarder, ping, tcp_exchange, udp_exchange,
    udp_refused,
};

/// Bytes each way over TCP: many full-sized segments.
const TCP_BYTES: usize = 256 * 1024;

/// The masquerade gateway of the topology over AF_PACKET on `if_in`/`if_out`, on its
/// own thread inside `gw` (stopped and joined when dropped, also on a failed assertion,
/// before the namespaces' guards drop).
fn start_gateway(gw: &NetNs, if_in: &str, if_out: &str) -> ForwarderThread<AfPacket> {
    let names = [if_in.to_owned(), if_out.to_owned()];
    ForwarderThread::start(gw, move || {
        let ports = vec![
            AfPacket::open(&names[0]).map_err(|e| e.to_string())?,
            AfPacket::open(&names[1]).map_err(|e| e.to_string())?,
        ];
        let cfg = ForwarderConfig {
            // veth senders leave TCP/UDP checksums to offload.
            fill_checksums: true,
            ..ForwarderConfig::default()
        };
        masquerade_forwarder(cfg, ports, names, Config::default())
    })
    .expect("gateway namespace")
}

#[test]
fn software_gateway_forwards_real_traffic_with_snat() {
    if let Some(why) = skip_reason(&["ip"]) {
        if is_root() && std::env::var_os("CI").is_some() {
            panic!("e2e_software cannot run under CI: {why}");
        }
        eprintln!("skipping e2e_software: {why}");
        return;
    }
    let t = Topology::new("s").expect("topology");
    let (inside, gw) = (&t.inside, &t.gw);
    let running = start_gateway(gw, &t.gw_in, &t.gw_out);

    // Ping: the gateway's own inside address, then the outside host through SNAT.
    let in_ping = |dst, ident, ttl| {
        inside
            .run_inside(move || ping(dst, ident, ttl))
            .expect("enter inside")
    };
    let answer = in_ping(GW_IN, 0x4701, 64).expect("ping the gateway's inside address");
    assert_eq!((answer.from, answer.icmp_type), (GW_IN, 0), "echo reply");
    let answer = in_ping(OUT_HOST, 0x4702, 64).expect("ping inside -> outside");
    assert_eq!((answer.from, answer.icmp_type), (OUT_HOST, 0), "echo reply");
    // Router behaviour: TTL 1 expires at the gateway; a destination without a route
    // is net unreachable; both errors come from the ingress port's address.
    let answer = in_ping(OUT_HOST, 0x4703, 1).expect("ping with TTL 1");
    assert_eq!(
        answer,
        IcmpAnswer {
            from: GW_IN,
            icmp_type: 11,
            code: 0
        },
        "time exceeded"
    );
    let answer = in_ping(NO_ROUTE, 0x4704, 64).expect("ping without route");
    assert_eq!(
        answer,
        IcmpAnswer {
            from: GW_IN,
            icmp_type: 3,
            code: 0
        },
        "net unreachable"
    );
    // Traffic to the gateway's own address that it does not serve: dropped, counted.
    inside
        .run_inside(|| {
            let u = UdpSocket::bind((ip(IN_A), 0))?;
            u.send_to(b"x", (ip(GW_IN), 9))
        })
        .expect("enter inside")
        .expect("UDP to the gateway");

    let tcp_peer = tcp_exchange(
        &t.outside,
        SocketAddr::from((ip(OUT_HOST), 5001)),
        inside,
        SocketAddr::from((ip(IN_A), 0)),
        SocketAddr::from((ip(OUT_HOST), 5001)),
        TCP_BYTES,
    )
    .expect("TCP exchange through the gateway");
    assert_eq!(
        tcp_peer.ip(),
        ip(GW_OUT),
        "outside saw the translated TCP source"
    );

    let udp_peer = udp_exchange(&t, 5002).expect("UDP exchange through the gateway");
    assert_eq!(
        udp_peer.ip(),
        ip(GW_OUT),
        "outside saw the translated UDP source"
    );

    udp_refused(&t, 5003).expect("port unreachable translated back");

    let fwd = running.finish().expect("forwarding loop");
    let g = fwd.gateway();
    let neigh: Vec<_> = g.neighbours().entries().collect();
    assert!(
        neigh
            .iter()
            .any(|&(p, a, m)| p == 0 && (a == IN_A || a == IN_B) && m == IN_HOST_MAC),
        "learned the inside host's MAC: {neigh:?}"
    );
    assert!(
        neigh.contains(&(1, OUT_HOST, OUT_HOST_MAC)),
        "resolved the outside host's MAC: {neigh:?}"
    );
    let s = g.stats();
    assert!(
        s.arp_replies_sent >= 1,
        "answered the inside host's ARP: {s:?}"
    );
    assert!(
        s.arp_requests_sent >= 1,
        "resolved a next hop itself: {s:?}"
    );
    assert!(s.echo_replies >= 1, "{s:?}");
    assert_eq!((s.ttl_exceeded, s.no_route), (1, 1), "{s:?}");
    assert!(s.icmp_errors_sent >= 2, "{s:?}");
    assert!(
        s.local_dropped >= 1,
        "UDP to our own address counted: {s:?}"
    );
    assert!(s.forwarded >= 10, "{s:?}");
    let ct = fwd.table().stats();
    assert!(ct.created >= 4, "ping, TCP, two UDP flows tracked: {ct:?}");
    eprintln!(
        "gateway {s:?}\nforwarder {:?}\nconntrack {ct:?}",
        fwd.stats()
    );
}
