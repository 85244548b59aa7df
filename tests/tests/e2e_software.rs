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

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ctoffload_agent::gateway::forward::{ForwarderConfig, SoftwareForwarder};
use ctoffload_agent::gateway::{Gateway, GatewayConfig, PortConfig};
use ctoffload_agent::port::AfPacket;
use ctoffload_fallback_sw::conntrack::{Config, Conntrack};
use ctoffload_fallback_sw::nat::rules::{NatAction, NatFlags, NatRule, RuleMatch};
use ctoffload_tests::netns::{NetNs, is_root, skip_reason, unique_name};

const IN_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 1, 2];
const GW_IN_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 1, 1];
const GW_OUT_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 2, 1];
const OUT_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 2, 2];
const IN_A: [u8; 4] = [10, 77, 0, 2];
const IN_B: [u8; 4] = [10, 77, 0, 3];
const GW_IN: [u8; 4] = [10, 77, 0, 1];
const GW_OUT: [u8; 4] = [192, 0, 2, 1];
const OUT_HOST: [u8; 4] = [192, 0, 2, 2];
const NO_ROUTE: [u8; 4] = [203, 0, 113, 9];
const WAIT: Duration = Duration::from_secs(5);
/// Bytes each way over TCP: many full-sized segments.
const TCP_BYTES: usize = 256 * 1024;

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

type Fwd = SoftwareForwarder<AfPacket>;

/// Stops the forwarding loop and joins it when dropped (also on a failed assertion),
/// before the namespaces' guards drop.
struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<std::io::Result<Result<Fwd, String>>>>,
}

impl Running {
    fn finish(mut self) -> Fwd {
        self.stop.store(true, Ordering::Relaxed);
        let h = self.handle.take().expect("running");
        match h.join() {
            Ok(Ok(Ok(fwd))) => fwd,
            Ok(Ok(Err(e))) => panic!("forwarding loop failed: {e}"),
            Ok(Err(e)) => panic!("cannot enter the gateway namespace: {e}"),
            Err(_) => panic!("forwarding loop panicked"),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn start_gateway(gw: &NetNs, if_in: &str, if_out: &str) -> Running {
    let stop = Arc::new(AtomicBool::new(false));
    let (if_in, if_out, stop2) = (if_in.to_owned(), if_out.to_owned(), Arc::clone(&stop));
    let handle = gw
        .spawn_inside(move || -> Result<Fwd, String> {
            let ports = vec![
                AfPacket::open(&if_in).map_err(|e| e.to_string())?,
                AfPacket::open(&if_out).map_err(|e| e.to_string())?,
            ];
            let gateway = Gateway::new(GatewayConfig {
                ports: vec![
                    PortConfig {
                        name: if_in,
                        mac: GW_IN_MAC,
                        addrs: vec![(GW_IN, 24)],
                    },
                    PortConfig {
                        name: if_out,
                        mac: GW_OUT_MAC,
                        addrs: vec![(GW_OUT, 24)],
                    },
                ],
                ..GatewayConfig::default()
            })
            .map_err(|e| e.to_string())?;
            let mut ct = Conntrack::new(Config::default());
            ct.nat_mut()
                .rules_mut()
                .add(NatRule {
                    id: 1,
                    r#match: RuleMatch {
                        out_port: Some(1),
                        ..RuleMatch::default()
                    },
                    action: NatAction::Masquerade {
                        ports: None,
                        flags: NatFlags::default(),
                    },
                })
                .map_err(|e| e.to_string())?;
            let cfg = ForwarderConfig {
                // veth senders leave TCP/UDP checksums to offload.
                fill_checksums: true,
                ..ForwarderConfig::default()
            };
            let mut fwd = SoftwareForwarder::new(cfg, ports, gateway, ct);
            fwd.run(&stop2, 1_000_000_000).map_err(|e| e.to_string())?;
            Ok(fwd)
        })
        .expect("gateway namespace");
    Running {
        stop,
        handle: Some(handle),
    }
}

/// What answered an echo request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct IcmpAnswer {
    /// Who sent the answer.
    from: [u8; 4],
    /// ICMP type (0 echo reply, 3 unreachable, 11 time exceeded).
    icmp_type: u8,
    /// ICMP code.
    code: u8,
}

/// Echo requests to `dst` (with IP TTL `ttl`) from the calling thread's namespace over a
/// raw socket, until an echo reply with our identifier or an ICMP error quoting one of
/// our requests arrives.
fn ping(dst: [u8; 4], ident: u16, ttl: u32) -> Result<IcmpAnswer, String> {
    use rustix::net::{
        AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, recv, sendto, sockopt,
    };
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
        .map_err(|e| format!("raw socket: {e}"))?;
    sockopt::set_socket_timeout(
        &fd,
        sockopt::Timeout::Recv,
        Some(Duration::from_millis(300)),
    )
    .map_err(|e| e.to_string())?;
    sockopt::set_ip_ttl(&fd, ttl).map_err(|e| e.to_string())?;
    for seq in 1u16..=5 {
        let mut echo = [8u8, 0, 0, 0, 0, 0, 0, 0, b'c', b't', b'o', b'f'];
        echo[4..6].copy_from_slice(&ident.to_be_bytes());
        echo[6..8].copy_from_slice(&seq.to_be_bytes());
        let mut sum: u32 = echo
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        let c = !u16::try_from(sum).unwrap_or(0);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        sendto(
            &fd,
            &echo,
            SendFlags::empty(),
            &SocketAddrV4::new(ip(dst), 0),
        )
        .map_err(|e| format!("sendto: {e}"))?;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            let mut buf = [0u8; 1500];
            let Ok((n, _)) = recv(&fd, &mut buf, RecvFlags::empty()) else {
                continue;
            };
            let pkt = &buf[..n];
            let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
            if pkt.len() < ihl + 8 || ihl < 20 {
                continue;
            }
            let from: [u8; 4] = pkt[12..16].try_into().unwrap_or_default();
            let (icmp_type, code) = (pkt[ihl], pkt[ihl + 1]);
            let ours = match icmp_type {
                0 => from == dst && pkt[ihl + 4..ihl + 6] == ident.to_be_bytes(),
                3 | 11 => {
                    // The quoted datagram: its header, then our echo request.
                    let q = &pkt[ihl + 8..];
                    let qihl = usize::from(q.first().copied().unwrap_or(0) & 0x0f) * 4;
                    q.len() >= qihl + 8
                        && q[16..20] == dst
                        && q[qihl] == 8
                        && q[qihl + 4..qihl + 6] == ident.to_be_bytes()
                }
                _ => false,
            };
            if ours {
                return Ok(IcmpAnswer {
                    from,
                    icmp_type,
                    code,
                });
            }
        }
    }
    Err(format!("no ICMP answer about {}", ip(dst)))
}

fn setup_links(inside: &NetNs, gw: &NetNs, outside: &NetNs, names: &[String; 4]) {
    let [a, b, c, d] = names;
    let run = |args: &[&str]| {
        ctoffload_tests::netns::run_bounded("ip", args, ctoffload_tests::netns::COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let (m1, m2, m3, m4) = (
        mac_str(IN_HOST_MAC),
        mac_str(GW_IN_MAC),
        mac_str(GW_OUT_MAC),
        mac_str(OUT_HOST_MAC),
    );
    run(&[
        "link",
        "add",
        a,
        "address",
        &m1,
        "netns",
        inside.name(),
        "type",
        "veth",
        "peer",
        "name",
        b,
        "address",
        &m2,
        "netns",
        gw.name(),
    ]);
    run(&[
        "link",
        "add",
        c,
        "address",
        &m3,
        "netns",
        gw.name(),
        "type",
        "veth",
        "peer",
        "name",
        d,
        "address",
        &m4,
        "netns",
        outside.name(),
    ]);
    let ok = |r: Result<String, ctoffload_tests::netns::CommandError>| {
        r.unwrap_or_else(|e| panic!("{e}"));
    };
    // The hosts' veths hand the peer whole GSO super-packets (up to 64 KiB) unless
    // told to build one segment per packet; the gateway's ports take frames of at most
    // 2048 bytes, like a wire with a 1500-byte MTU (no ethtool needed for this).
    for (ns, dev) in [(inside, a), (outside, d)] {
        ok(ns.ip(&[
            "link",
            "set",
            "dev",
            dev,
            "gso_max_segs",
            "1",
            "gso_max_size",
            "1500",
        ]));
    }
    ok(inside.ip(&["addr", "add", "10.77.0.2/24", "dev", a]));
    ok(inside.ip(&["addr", "add", "10.77.0.3/24", "dev", a]));
    ok(inside.ip(&["link", "set", a, "up"]));
    ok(inside.ip(&["link", "set", "lo", "up"]));
    ok(inside.ip(&["route", "add", "default", "via", "10.77.0.1"]));
    ok(gw.ip(&["link", "set", b, "up"]));
    ok(gw.ip(&["link", "set", c, "up"]));
    gw.sysctl(&["net.ipv4.ip_forward=0"])
        .unwrap_or_else(|e| panic!("{e}"));
    ok(outside.ip(&["addr", "add", "192.0.2.2/24", "dev", d]));
    ok(outside.ip(&["link", "set", d, "up"]));
    ok(outside.ip(&["link", "set", "lo", "up"]));
}

/// TCP: [`TCP_BYTES`] each way; returns the source address the outside server saw.
fn tcp_exchange(inside: &NetNs, outside: &NetNs) -> SocketAddr {
    let listener = outside
        .run_inside(|| TcpListener::bind((ip(OUT_HOST), 5001)))
        .expect("enter outside")
        .expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    let server = thread::spawn(move || -> std::io::Result<SocketAddr> {
        let until = Instant::now() + WAIT;
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < until => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(WAIT))?;
        let mut req = vec![0u8; TCP_BYTES];
        s.read_exact(&mut req)?;
        let resp: Vec<u8> = req.iter().map(|b| b.wrapping_add(1)).collect();
        s.write_all(&resp)?;
        Ok(peer)
    });
    let mut client = inside
        .run_inside(|| TcpStream::connect_timeout(&SocketAddr::from((ip(OUT_HOST), 5001)), WAIT))
        .expect("enter inside")
        .expect("TCP connect through the gateway");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    let req: Vec<u8> = (0..u32::try_from(TCP_BYTES).unwrap_or(0))
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    client.write_all(&req).expect("send");
    let mut resp = vec![0u8; TCP_BYTES];
    client
        .read_exact(&mut resp)
        .expect("TCP response through the gateway");
    assert!(
        resp.iter().zip(&req).all(|(r, q)| *r == q.wrapping_add(1)),
        "response bytes"
    );
    server
        .join()
        .expect("server thread")
        .expect("server side of the TCP exchange")
}

/// UDP request/response from the inside's second address; returns the source the
/// outside server saw.
fn udp_exchange(inside: &NetNs, outside: &NetNs) -> SocketAddr {
    let srv = outside
        .run_inside(|| UdpSocket::bind((ip(OUT_HOST), 5002)))
        .expect("enter outside")
        .expect("bind");
    srv.set_read_timeout(Some(WAIT)).expect("timeout");
    let server = thread::spawn(move || -> std::io::Result<SocketAddr> {
        let mut buf = [0u8; 64];
        let (n, from) = srv.recv_from(&mut buf)?;
        let mut resp = b"pong:".to_vec();
        resp.extend_from_slice(&buf[..n]);
        srv.send_to(&resp, from)?;
        Ok(from)
    });
    let cli = inside
        .run_inside(|| UdpSocket::bind((ip(IN_B), 0)))
        .expect("enter inside")
        .expect("bind");
    cli.connect((ip(OUT_HOST), 5002)).expect("connect");
    cli.set_read_timeout(Some(WAIT)).expect("timeout");
    cli.send(b"ping").expect("send");
    let mut buf = [0u8; 64];
    let n = cli
        .recv(&mut buf)
        .expect("UDP response through the gateway");
    assert_eq!(&buf[..n], b"pong:ping");
    server.join().expect("server thread").expect("UDP server")
}

/// UDP to a closed outside port: the outside host's ICMP port unreachable, translated
/// back, makes the inside socket's receive fail with ECONNREFUSED.
fn udp_refused(inside: &NetNs) -> std::io::Error {
    let cli = inside
        .run_inside(|| UdpSocket::bind((ip(IN_B), 0)))
        .expect("enter inside")
        .expect("bind");
    cli.connect((ip(OUT_HOST), 5003)).expect("connect");
    cli.set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let mut last = None;
    for _ in 0..4 {
        let _ = cli.send(b"anyone?");
        let mut buf = [0u8; 16];
        match cli.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return e,
            Err(e) => last = Some(e),
            Ok(n) => panic!("unexpected answer from a closed port: {n} bytes"),
        }
    }
    panic!("no ICMP port unreachable reached the inside socket: {last:?}");
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
    let inside = NetNs::new(&unique_name("si")).expect("inside namespace");
    let gw = NetNs::new(&unique_name("sg")).expect("gateway namespace");
    let outside = NetNs::new(&unique_name("so")).expect("outside namespace");
    let names = [
        unique_name("a"),
        unique_name("b"),
        unique_name("c"),
        unique_name("d"),
    ];
    setup_links(&inside, &gw, &outside, &names);
    let running = start_gateway(&gw, &names[1], &names[2]);

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

    let tcp_peer = tcp_exchange(&inside, &outside);
    assert_eq!(
        tcp_peer.ip(),
        ip(GW_OUT),
        "outside saw the translated TCP source"
    );

    let udp_peer = udp_exchange(&inside, &outside);
    assert_eq!(
        udp_peer.ip(),
        ip(GW_OUT),
        "outside saw the translated UDP source"
    );

    let refused = udp_refused(&inside);
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    let fwd = running.finish();
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
    let ct = fwd.conntrack().stats();
    assert!(ct.created >= 4, "ping, TCP, two UDP flows tracked: {ct:?}");
    eprintln!(
        "gateway {s:?}\nforwarder {:?}\nconntrack {ct:?}",
        fwd.stats()
    );
}
