//! End to end: the real `ctoffload agent` on the sim backend, its simulated NIC's
//! ports wired to the gateway namespace's veths, as a router with masquerade between
//! real Linux network stacks.
//!
//! ```text
//!  inside ns                gw ns (ip_forward=0, no addresses)           outside ns
//!  10.77.0.2/24  ─veth─ port 0 [ ctoffload agent, backend sim ] port 1 ─veth─ 192.0.2.2/24
//!  default via 10.77.0.1     10.77.0.1/24                 192.0.2.1/24 (masquerade)
//! ```
//!
//! The namespaces, links, configuration and agent process are `tests/src/topology.rs`'s
//! ([`Topology`], [`AgentProcess`], [`agent_config`]), shared with the other end-to-end
//! tests.
//!
//! Checks: ping through the gateway and TTL expiry (ICMP time exceeded from the
//! gateway); TCP and UDP reach the outside host from the gateway's address; established
//! connections are carried by the simulated NIC (hardware counters advance while the
//! slow path's counts stay put during bulk transfer; TTL decremented by the NIC) and
//! `ctoffload flows` shows them offloaded; echo to the gateway is answered and other
//! packets for it are counted as dropped; a connection kept alive only by hardware traffic outlives its software
//! timeout; an idle one ages out of both tables.
//!
//! Needs root, `ip` and `ethtool` (skipped with a message otherwise, failed under `CI`);
//! builds the `ctoffload` binary first (`topology::built_agent_binary`; or
//! `CTOFFLOAD_BIN`). Every wait is bounded; the agent is killed and
//! the namespaces deleted also when an assertion fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ctoffload_tests::netns::{NetNs, skip_reason};
use ctoffload_tests::topology::{
    AgentProcess, GW_IN, GW_OUT, IN_A, OUT_HOST, Topology, agent_config, built_agent_binary, ip,
    ping, wait_for,
};
use serde_json::Value;

const INSIDE: Ipv4Addr = Ipv4Addr::new(IN_A[0], IN_A[1], IN_A[2], IN_A[3]);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(OUT_HOST[0], OUT_HOST[1], OUT_HOST[2], OUT_HOST[3]);
/// Generous bound for anything that crosses the gateway (the machine is shared).
const WAIT: Duration = Duration::from_secs(20);
/// Software timeouts of the test configuration (seconds).
const TCP_ESTABLISHED_S: u64 = 6;
const UDP_S: u64 = 3;

/// The agent's configuration: the sim backend on the gateway's interfaces, the
/// topology's ports and NAT rules (masquerade out of port 1), short timeouts.
fn config(t: &Topology, socket: &Path) -> String {
    agent_config(
        &format!(
            "kind = \"sim\"\ntable_size = 4096\ninterfaces = [\"{}\", \"{}\"]",
            t.gw_in, t.gw_out
        ),
        (20_000, 29_999),
        &format!(
            "[timeouts]\ntcp_established = {TCP_ESTABLISHED_S}\ntcp_fin_wait = 2\n\
             tcp_close_wait = 2\ntcp_last_ack = 2\ntcp_time_wait = 2\ntcp_close = 2\n\
             udp = {UDP_S}\nudp_stream = {UDP_S}"
        ),
        socket,
    )
}

/// `ctoffload ARGS -o json` against `a`.
fn cli(a: &AgentProcess, args: &[&str]) -> Result<Value, String> {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["-o", "json"]);
    let out = a.cli(&all)?;
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

/// The connections whose original direction has `proto` and source port `sport`.
fn flows(a: &AgentProcess, proto: &str, sport: u16) -> Vec<Value> {
    a.flows()
        .unwrap_or_else(|e| panic!("flows: {e}"))
        .into_iter()
        .filter(|c| {
            c["original"]["protocol_name"] == proto && c["original"]["src_port"] == u64::from(sport)
        })
        .collect()
}

/// (software, hardware) packets of both directions of a connection.
fn packets(c: &Value) -> (u64, u64) {
    let mut sw = 0;
    let mut hw = 0;
    for d in ["original_counters", "reply_counters"] {
        let total = c[d]["packets"].as_u64().unwrap_or(0);
        let h = c[d]["hw_packets"].as_u64().unwrap_or(0);
        sw += total.saturating_sub(h);
        hw += h;
    }
    (sw, hw)
}

/// A TCP server on the outside host: echoes what it reads in chunks, and for each byte
/// `b'B'` received sends back `BULK` bytes. Returns the peer it saw when the client
/// closes.
const BULK: usize = 1 << 20;

fn tcp_server(outside: &NetNs, port: u16) -> thread::JoinHandle<std::io::Result<SocketAddr>> {
    let listener = outside
        .run_inside(move || TcpListener::bind((OUTSIDE, port)))
        .expect("enter outside")
        .expect("listen");
    thread::spawn(move || {
        listener.set_nonblocking(true)?;
        let until = Instant::now() + WAIT;
        let (mut s, peer) = loop {
            match listener.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > until {
                        return Err(std::io::Error::other("no connection"));
                    }
                    thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let bulk = vec![0x5a; BULK];
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(peer);
            }
            for &b in &buf[..n] {
                if b == b'B' {
                    s.write_all(&bulk)?;
                } else {
                    s.write_all(&[b])?;
                }
            }
        }
    })
}

/// One byte out, its echo back.
fn ping_pong(s: &mut TcpStream) {
    s.write_all(b"p").expect("send");
    let mut b = [0u8; 1];
    s.read_exact(&mut b).expect("echo");
    assert_eq!(&b, b"p");
}

#[test]
#[allow(clippy::too_many_lines)]
fn agent_on_the_simulated_nic_routes_and_offloads_real_traffic() {
    let ci = std::env::var_os("CI").is_some();
    if let Some(why) = skip_reason(&["ip", "ethtool"]) {
        assert!(!ci || why.starts_with("not running as root"), "{why}");
        eprintln!("skipped: {why}");
        return;
    }
    let bin = built_agent_binary().expect("build the ctoffload binary");
    let t = Topology::new("s").expect("topology");
    t.full_checksums().expect("ethtool");
    let (inside, outside) = (&t.inside, &t.outside);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("api.sock");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, config(&t, &socket)).expect("write config");
    let mut agent = AgentProcess::new(bin, cfg, socket, dir.path().join("agent.log"));
    agent.start(&t, WAIT).expect("agent start");

    // ICMP through the slow path: echo answered by the outside host, TTL 1 answered by
    // the gateway (time exceeded from its inside address).
    let answer = |dst: [u8; 4], ttl: u32| {
        inside
            .run_inside(move || ping(dst, 0x7878, ttl).map(|a| (a.from, a.icmp_type)))
            .expect("enter")
    };
    assert_eq!(
        answer(OUT_HOST, 64),
        Ok((OUT_HOST, 0)),
        "echo reply from the outside host"
    );
    assert_eq!(
        answer(OUT_HOST, 1),
        Ok((GW_IN, 11)),
        "time exceeded from the gateway"
    );
    // Echo to the gateway is answered; other packets for its addresses are dropped
    // and counted.
    assert_eq!(
        answer(GW_IN, 64),
        Ok((GW_IN, 0)),
        "the gateway answers echo"
    );
    let local = |a: &AgentProcess| {
        cli(a, &["stats"]).expect("stats")["drops_by_reason"]["gateway/local"]
            .as_u64()
            .expect("gateway/local counter")
    };
    let before = local(&agent);
    inside
        .run_inside(|| {
            let s = UdpSocket::bind((INSIDE, 0))?;
            s.send_to(b"to the gateway", (ip(GW_IN), 9))
        })
        .expect("enter")
        .expect("send");
    wait_for(WAIT, "the packet for the gateway counted", || {
        (local(&agent) > before).then_some(())
    });

    // TCP: handshake and a few round trips in software, offload, then bulk data.
    let server = tcp_server(outside, 5001);
    let mut client = inside
        .run_inside(|| TcpStream::connect_timeout(&SocketAddr::from((OUTSIDE, 5001)), WAIT))
        .expect("enter")
        .expect("connect through the gateway");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    let sport = client.local_addr().expect("addr").port();
    ping_pong(&mut client);
    let conn = wait_for(WAIT, "the TCP connection offloaded", || {
        ping_pong(&mut client);
        flows(&agent, "tcp", sport)
            .into_iter()
            .find(|c| c["hw_offloaded"] == true)
    });
    assert_eq!(conn["reply"]["dst"], ip(GW_OUT).to_string(), "masqueraded");
    assert_eq!(conn["not_offloaded_reason"], "", "{conn}");
    let (sw_before, hw_before) = packets(&conn);
    client.write_all(b"B").expect("ask for bulk");
    let mut got = vec![0u8; BULK];
    client
        .read_exact(&mut got)
        .expect("bulk data through the gateway");
    assert!(got.iter().all(|&b| b == 0x5a));
    // Counters come from the device's periodic pulls: wait for them to cover the bulk.
    let min_segments = (BULK / 1500) as u64;
    let conn = wait_for(WAIT, "hardware counters covering the bulk transfer", || {
        let c = flows(&agent, "tcp", sport).into_iter().next()?;
        (packets(&c).1 >= hw_before + min_segments).then_some(c)
    });
    let (sw_after, hw_after) = packets(&conn);
    eprintln!(
        "TCP bulk ({BULK} bytes): software packets {sw_before} -> {sw_after}, hardware packets {hw_before} -> {hw_after}"
    );
    assert!(
        sw_after <= sw_before + 2,
        "slow path saw bulk packets: software {sw_before} -> {sw_after}, hardware {hw_before} -> {hw_after}"
    );
    assert_eq!(conn["hw_offloaded"], true);

    // Kept alive only by hardware traffic, past its software timeout.
    let until = Instant::now() + Duration::from_secs(TCP_ESTABLISHED_S * 2);
    while Instant::now() < until {
        ping_pong(&mut client);
        thread::sleep(Duration::from_millis(500));
    }
    let conn = flows(&agent, "tcp", sport);
    assert_eq!(conn.len(), 1, "lived past tcp_established");
    assert_eq!(conn[0]["hw_offloaded"], true);
    let (sw_late, _) = packets(&conn[0]);
    assert!(sw_late <= sw_after + 2, "keep-alive traffic in software");
    drop(client);
    let peer = server.join().expect("server").expect("server io");
    assert_eq!(
        peer.ip(),
        ip(GW_OUT),
        "outside host saw the gateway's address"
    );

    // UDP request/response: offloaded once replied; then idle until it ages out.
    let udp_server = outside
        .run_inside(|| UdpSocket::bind((OUTSIDE, 5353)))
        .expect("enter")
        .expect("bind");
    udp_server.set_read_timeout(Some(WAIT)).expect("timeout");
    let udp = inside
        .run_inside(|| UdpSocket::bind((INSIDE, 0)))
        .expect("enter")
        .expect("bind");
    udp.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let uport = udp.local_addr().expect("addr").port();
    let mut seen_from = None;
    let offloaded = wait_for(WAIT, "the UDP flow offloaded", || {
        udp.send_to(b"q", (OUTSIDE, 5353)).ok()?;
        let mut b = [0u8; 16];
        let (_, from) = udp_server.recv_from(&mut b).ok()?;
        seen_from = Some(from);
        udp_server.send_to(b"a", from).ok()?;
        udp.recv_from(&mut b).ok()?;
        flows(&agent, "udp", uport)
            .into_iter()
            .find(|c| c["hw_offloaded"] == true)
    });
    assert_eq!(
        seen_from.map(|a| a.ip()),
        Some(ip(GW_OUT).into()),
        "UDP masqueraded"
    );
    let hw0 = packets(&offloaded).1;
    // The outside host's copy of every UDP packet it receives, to read their TTL.
    let sniff = outside
        .run_inside(|| {
            use rustix::net::{AddressFamily, SocketType, ipproto, sockopt};
            let fd = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::UDP))?;
            sockopt::set_socket_timeout(&fd, sockopt::Timeout::Recv, Some(Duration::from_secs(2)))?;
            Ok::<_, rustix::io::Errno>(fd)
        })
        .expect("enter")
        .expect("raw UDP socket");
    for _ in 0..20 {
        udp.send_to(b"q", (OUTSIDE, 5353)).expect("send");
        let mut b = [0u8; 16];
        let (_, from) = udp_server
            .recv_from(&mut b)
            .expect("request through hardware");
        udp_server.send_to(b"a", from).expect("answer");
        udp.recv_from(&mut b).expect("answer through hardware");
    }
    wait_for(WAIT, "UDP hardware counters", || {
        let c = flows(&agent, "udp", uport).into_iter().next()?;
        (packets(&c).1 >= hw0 + 40).then_some(())
    });
    // Forwarded by the NIC with the TTL decremented, as the slow path does.
    let mut ttls = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok((n, _)) = rustix::net::recv(&sniff, &mut buf, rustix::net::RecvFlags::empty()) {
        let p = &buf[..n];
        if n >= 24 && p[12..16] == GW_OUT && p[22..24] == 5353u16.to_be_bytes() {
            ttls.push(p[8]);
        }
        if ttls.len() == 20 {
            break;
        }
    }
    assert_eq!(
        ttls,
        vec![63; 20],
        "TTL of the requests the outside host got"
    );
    // Idle: out of hardware (idle time = the UDP timeout here), then out of software.
    wait_for(
        Duration::from_secs(UDP_S * 4 + 30),
        "the idle UDP flow gone",
        || flows(&agent, "udp", uport).is_empty().then_some(()),
    );
    wait_for(
        Duration::from_secs(TCP_ESTABLISHED_S * 4 + 30),
        "both tables empty",
        || {
            let s = cli(&agent, &["stats"]).ok()?;
            let left = cli(&agent, &["flows"]).ok()?;
            let live = left.as_array().map_or(0, |a| {
                a.iter()
                    .filter(|c| c["original"]["protocol_name"] != "icmp")
                    .count()
            });
            (s["hw_table"]["used"] == 0 && live == 0).then_some(())
        },
    );
    agent.stop().expect("clean stop");
}
