//! The XDP flow table program (`ctoffload_agent::port::af_xdp::flow_prog`) on real
//! veths: entries built by the agent's `gateway::xdp_offload::flow_entries` for a
//! masqueraded UDP and TCP connection are inserted into the gateway's flow table, real
//! frames are sent from the inside host's veth, and what the outside host's veth
//! receives is compared byte for byte with frames built independently by etherparse
//! (checksums computed in full there); the entries' counters and last-seen follow. A
//! miss, a TCP FIN, a SYN and a TTL-1 packet of an offloaded flow reach the gateway's
//! AF_XDP socket unchanged instead.
//!
//! ```text
//!  inside ns (AF_PACKET sender) ─veth─ gw ns: AfXdp ports, flow table ─veth─ outside ns
//!                                                                 (AF_PACKET receiver,
//!                                                                  GRO on: a NAPI to
//!                                                                  take redirected frames)
//! ```
//!
//! Needs root, `ip` and `ethtool`; skipped with a message otherwise (a failure under
//! `CI`).

use std::time::{Duration, Instant};

use ctoffload_agent::gateway::Gateway;
use ctoffload_agent::gateway::xdp_offload::flow_entries;
use ctoffload_agent::port::af_xdp::{AfXdp, AfXdpConfig, XdpMode};
use ctoffload_agent::port::{AfPacket, FrameBatch, PacketPort};
use ctoffload_fallback_sw::tuple::{Tuple, proto};
use ctoffload_tests::netns::{is_root, skip_reason};
use ctoffload_tests::topology::{
    GW_IN_MAC, GW_OUT, GW_OUT_MAC, IN_A, IN_HOST_MAC, OUT_HOST, OUT_HOST_MAC, Topology,
    masquerade_gateway,
};
use etherparse::PacketBuilder;

fn skip_or_fail(why: &str) {
    assert!(
        !(is_root() && std::env::var_os("CI").is_some()),
        "xdp_flow cannot run under CI: {why}"
    );
    eprintln!("skipping xdp_flow: {why}");
}

fn tuple(src: ([u8; 4], u16), dst: ([u8; 4], u16), p: u8) -> Tuple {
    Tuple::v4(src.0, src.1, dst.0, dst.1, p)
}

/// The masquerade gateway of the topology, with both hosts' MACs known.
fn gateway(names: [String; 2]) -> Gateway {
    let mut gw = masquerade_gateway(names).expect("gateway");
    gw.learn_neighbour(0, IN_A, IN_HOST_MAC, 0);
    gw.learn_neighbour(1, OUT_HOST, OUT_HOST_MAC, 0);
    gw
}

#[derive(Clone, Copy)]
enum L4 {
    Udp { zero_csum: bool },
    Tcp { flags: u8 },
}

/// A frame built by etherparse (checksums in full); `macs` is (source, destination).
fn frame(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    ttl: u8,
    l4: L4,
    payload: &[u8],
) -> Vec<u8> {
    let ip = PacketBuilder::ethernet2(macs.0, macs.1).ipv4(src.0, dst.0, ttl);
    let mut out = Vec::new();
    match l4 {
        L4::Udp { zero_csum } => {
            ip.udp(src.1, dst.1)
                .write(&mut out, payload)
                .expect("udp frame");
            if zero_csum {
                out[40..42].fill(0);
            }
        }
        L4::Tcp { flags } => {
            let mut b = ip.tcp(src.1, dst.1, 1000, 64000).ack(77);
            if flags & 0x01 != 0 {
                b = b.fin();
            }
            if flags & 0x02 != 0 {
                b = b.syn();
            }
            b.write(&mut out, payload).expect("tcp frame");
        }
    }
    out
}

fn send(port: &mut AfPacket, frames: &[Vec<u8>]) {
    let mut b = FrameBatch::new(frames.len());
    for f in frames {
        b.push(f).expect("fits");
    }
    port.send_batch(&b).expect("send");
}

/// IPv4 frames `port` receives until `want` arrived or `limit` passed.
fn receive<P: PacketPort>(port: &mut P, want: usize, limit: Duration) -> Vec<Vec<u8>> {
    let end = Instant::now() + limit;
    let mut got = Vec::new();
    let mut b = FrameBatch::new(64);
    while got.len() < want && Instant::now() < end {
        b.clear();
        if port.recv_batch(&mut b, 64).expect("recv") == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        got.extend(
            b.iter()
                .filter(|f| f.get(12..14) == Some(&[0x08, 0x00][..]))
                .map(<[u8]>::to_vec),
        );
    }
    got
}

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

#[test]
fn established_flows_are_natted_in_xdp_and_the_rest_reaches_the_socket() {
    if let Some(why) = skip_reason(&["ip", "ethtool"]) {
        skip_or_fail(&why);
        return;
    }
    let t = Topology::new("xf").expect("topology");
    t.gro_on_hosts().expect("GRO on the hosts' veths");
    let names = [t.gw_in.clone(), t.gw_out.clone()];
    let cfg = AfXdpConfig {
        flow_table_entries: 64,
        ..AfXdpConfig::default()
    };
    let n = names.clone();
    let opened =
        t.gw.run_inside(move || {
            AfXdp::open_group(&[n[0].as_str(), n[1].as_str()], XdpMode::Native, &cfg)
        })
        .expect("enter the gateway namespace");
    let mut ports = match opened {
        Ok(p) => p,
        Err(e) => {
            skip_or_fail(&format!("native XDP does not attach here: {e}"));
            return;
        }
    };
    let table = std::sync::Arc::clone(ports[0].flow_table().expect("a flow table"));
    let ifindex = vec![ports[0].ifindex(), ports[1].ifindex()];
    let gw = gateway(names);

    // Masquerade: the inside host's flows leave from the gateway's outside address.
    let (udp_nat, tcp_nat) = (40_001, 40_002);
    let udp = [
        tuple((IN_A, 1234), (OUT_HOST, 9000), proto::UDP),
        tuple((OUT_HOST, 9000), (GW_OUT, udp_nat), proto::UDP),
    ];
    let tcp = [
        tuple((IN_A, 5555), (OUT_HOST, 80), proto::TCP),
        tuple((OUT_HOST, 80), (GW_OUT, tcp_nat), proto::TCP),
    ];
    let mut keys = Vec::new();
    for tuples in [&udp, &tcp] {
        for r in flow_entries(tuples, &gw, &ifindex, 1) {
            let (key, entry) = r.expect("both directions routed and resolved");
            table.insert(&key, &entry).expect("insert");
            keys.push(key);
        }
    }
    let (udp_orig, tcp_orig) = (keys[0], keys[2]);

    let host_in = t.host_in.clone();
    let mut sender = t
        .inside
        .run_inside(move || AfPacket::open(&host_in))
        .expect("enter inside")
        .expect("sender socket");
    let host_out = t.host_out.clone();
    let mut receiver = t
        .outside
        .run_inside(move || AfPacket::open(&host_out))
        .expect("enter outside")
        .expect("receiver socket");

    // (source, destination)
    let to_gw = (IN_HOST_MAC, GW_IN_MAC);
    let to_host = (GW_OUT_MAC, OUT_HOST_MAC);
    let cases = [
        (
            L4::Udp { zero_csum: false },
            (1234, 9000),
            udp_nat,
            &b"query one"[..],
        ),
        (
            L4::Udp { zero_csum: true },
            (1234, 9000),
            udp_nat,
            &b"no checksum"[..],
        ),
        (
            L4::Tcp { flags: 0 },
            (5555, 80),
            tcp_nat,
            &b"GET / HTTP/1.0\r\n"[..],
        ),
        (L4::Tcp { flags: 0 }, (5555, 80), tcp_nat, &b""[..]),
    ];
    let sent: Vec<Vec<u8>> = cases
        .iter()
        .map(|&(l4, ports, _, payload)| {
            frame(to_gw, (IN_A, ports.0), (OUT_HOST, ports.1), 64, l4, payload)
        })
        .collect();
    let expected: Vec<Vec<u8>> = cases
        .iter()
        .map(|&(l4, ports, nat, payload)| {
            frame(to_host, (GW_OUT, nat), (OUT_HOST, ports.1), 63, l4, payload)
        })
        .collect();
    let before = monotonic_ns();
    send(&mut sender, &sent);
    let got = receive(&mut receiver, sent.len(), Duration::from_secs(5));
    assert_eq!(
        got.len(),
        sent.len(),
        "every frame forwarded by the program"
    );
    for (g, e) in got.iter().zip(&expected) {
        assert_eq!(g, e, "byte for byte as built in full by etherparse");
    }
    // Checked once more by etherparse's own parser (checksums of what arrived).
    for g in &got {
        let p = etherparse::SlicedPacket::from_ethernet(g).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = p.net else {
            panic!("IPv4")
        };
        let h = ip.header().to_header();
        assert_eq!(h.header_checksum, h.calc_header_checksum());
    }

    let u = table.read(&udp_orig).expect("read").expect("udp entry");
    let ip_len = |f: &Vec<u8>| u64::from(u16::from_be_bytes([f[16], f[17]]));
    assert_eq!(
        (u.packets, u.bytes),
        (2, ip_len(&sent[0]) + ip_len(&sent[1]))
    );
    let c = table.read(&tcp_orig).expect("read").expect("tcp entry");
    assert_eq!(
        (c.packets, c.bytes),
        (2, ip_len(&sent[2]) + ip_len(&sent[3]))
    );
    let after = monotonic_ns();
    for e in [u, c] {
        assert!(
            (before..=after).contains(&e.last_seen_ns),
            "last seen {} within {before}..{after}",
            e.last_seen_ns
        );
    }

    // What the program must not fast-path goes to the gateway's socket as it was.
    let slow = vec![
        // A miss: another flow.
        frame(
            to_gw,
            (IN_A, 1235),
            (OUT_HOST, 9000),
            64,
            L4::Udp { zero_csum: false },
            b"new",
        ),
        // Teardown and setup of the offloaded TCP flow.
        frame(
            to_gw,
            (IN_A, 5555),
            (OUT_HOST, 80),
            64,
            L4::Tcp { flags: 0x01 },
            b"",
        ),
        frame(
            to_gw,
            (IN_A, 5555),
            (OUT_HOST, 80),
            64,
            L4::Tcp { flags: 0x02 },
            b"",
        ),
        // TTL 1: the slow path answers with ICMP time exceeded.
        frame(
            to_gw,
            (IN_A, 1234),
            (OUT_HOST, 9000),
            1,
            L4::Udp { zero_csum: false },
            b"ttl",
        ),
    ];
    send(&mut sender, &slow);
    let got = receive(&mut ports[0], slow.len(), Duration::from_secs(5));
    assert_eq!(got, slow, "at the gateway's AF_XDP socket, unchanged");
    assert!(
        receive(&mut receiver, 1, Duration::from_millis(300)).is_empty(),
        "nothing of them reached the outside host"
    );
    let u2 = table.read(&udp_orig).expect("read").expect("udp entry");
    let c2 = table.read(&tcp_orig).expect("read").expect("tcp entry");
    assert_eq!(
        (u2.packets, c2.packets),
        (2, 2),
        "not counted by the program"
    );

    // A deleted entry is not used any more: the next packet goes to the socket.
    assert!(table.remove(&udp_orig).expect("delete"));
    send(&mut sender, &sent[..1]);
    let got = receive(&mut ports[0], 1, Duration::from_secs(5));
    assert_eq!(got, sent[..1].to_vec());
}

/// The forwarding loop with the XDP flow offload: a replied UDP flow goes into the
/// table and then carries traffic only there, for twice its conntrack timeout; GC does
/// not expire it (invariant 1: the sync keeps it alive) and, once folded in, its
/// counters count every packet once (invariant 3).
#[test]
fn a_flow_carried_by_the_xdp_table_stays_alive_and_is_counted_once() {
    use ctoffload_agent::gateway::forward::ForwarderConfig;
    use ctoffload_agent::gateway::xdp_offload::{XdpFlowOffload, XdpOffloadConfig};
    use ctoffload_agent::port::af_xdp::AnyPort;
    use ctoffload_fallback_sw::conntrack::Config;
    use ctoffload_tests::topology::{ForwarderThread, ip, masquerade_forwarder};
    use std::net::{SocketAddr, UdpSocket};

    if let Some(why) = skip_reason(&["ip", "ethtool"]) {
        skip_or_fail(&why);
        return;
    }
    let t = Topology::new("xg").expect("topology");
    t.full_checksums().expect("ethtool");
    t.gro_on_hosts().expect("ethtool");
    let names = [t.gw_in.clone(), t.gw_out.clone()];
    let fwd = ForwarderThread::start(&t.gw, move || {
        let cfg = AfXdpConfig {
            flow_table_entries: 64,
            ..AfXdpConfig::default()
        };
        let ports = AfXdp::open_group(
            &[names[0].as_str(), names[1].as_str()],
            XdpMode::Native,
            &cfg,
        )
        .map_err(|e| e.to_string())?;
        let ports: Vec<AnyPort> = ports.into_iter().map(AnyPort::AfXdp).collect();
        let offload = XdpFlowOffload::for_ports(
            &ports,
            XdpOffloadConfig {
                sync_interval_ns: 200_000_000,
                ..XdpOffloadConfig::default()
            },
        )
        .ok_or("no flow table")?;
        let mut ct = Config::default();
        ct.timeouts.udp = 1;
        ct.timeouts.udp_stream = 2;
        let fwd_cfg = ForwarderConfig {
            fill_checksums: true,
            ..ForwarderConfig::default()
        };
        Ok(masquerade_forwarder(fwd_cfg, ports, names, ct)?.with_xdp_offload(offload))
    })
    .expect("forwarder");

    let server = t
        .outside
        .run_inside(|| UdpSocket::bind((ip(OUT_HOST), 7000)))
        .expect("enter outside")
        .expect("bind");
    server
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let client = t
        .inside
        .run_inside(|| UdpSocket::bind((ip(IN_A), 0)))
        .expect("enter inside")
        .expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let sport = client.local_addr().expect("addr").port();
    let to = SocketAddr::from((ip(OUT_HOST), 7000));
    let mut buf = [0u8; 64];
    // The first packet creates the connection, the reply makes it offloadable (the
    // loop may need a moment for ARP: the client resends until answered).
    let end = Instant::now() + Duration::from_secs(10);
    let mut sent = 0u64;
    let peer = loop {
        assert!(Instant::now() < end, "no first exchange");
        client.send_to(b"hello", to).expect("send");
        sent += 1;
        if let Ok((_, peer)) = server.recv_from(&mut buf) {
            break peer;
        }
    };
    server.send_to(b"reply", peer).expect("reply");
    client.recv_from(&mut buf).expect("the reply");
    // Then 4 s of traffic (twice udp_stream): through the XDP table.
    let mut received = 0u64;
    for _ in 0..40 {
        client.send_to(b"data", to).expect("send");
        sent += 1;
        if server.recv_from(&mut buf).is_ok() {
            received += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(received, 40, "every packet delivered with a valid checksum");

    let mut fwd = fwd.finish().expect("forwarder");
    let stats = fwd.xdp_offload().expect("offload").stats();
    assert_eq!(stats.offloaded, 1, "{stats:?}");
    assert_eq!(stats.returned_idle, 0, "{stats:?}");
    assert!(
        fwd.stats().rx < sent / 2,
        "the loop saw {} frames of {sent}: the table carried the flow",
        fwd.stats().rx
    );
    let orig = tuple((IN_A, sport), (OUT_HOST, 7000), proto::UDP);
    let ct = fwd.table_mut();
    let (slot, _) = ct
        .lookup(&orig, 0)
        .expect("not expired by GC although idle in software for 4 s");
    let conn = ct.table().get(slot).expect("connection");
    assert_eq!(conn.counters[0].packets, sent, "each packet counted once");
    assert_eq!(conn.counters[1].packets, 1);
}
