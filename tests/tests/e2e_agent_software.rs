//! End to end: the real `ctoffload agent` binary as the gateway between real Linux
//! network stacks ([`Topology`]: inside / gw / outside, the gateway namespace's kernel
//! does not forward), once with `[backend] kind = "software"` and once with the
//! simulated NIC on the same interfaces (`kind = "sim"`, `interfaces`; the hosts send
//! full checksums, `ethtool -K tx off`). The same scenario runs against both; the sim
//! backend's offload itself (hardware counters, slow path seeing only handshake and
//! teardown, hardware-kept-alive flows) is checked by `e2e_agent_sim.rs`.
//!
//! The agent runs in the gateway namespace with a TOML configuration: masquerade out of
//! the outside port to ports 20000-29999, a DNAT port forward (outside 192.0.2.1:8080 to
//! 10.77.0.2:8080), short UDP timeouts, and its API on a Unix socket that the `ctoffload`
//! CLI queries. Traffic: ping, TCP and UDP request/response, UDP to a closed port (the
//! ICMP error translated back), DNAT from outside, 200 short TCP connections, iperf3
//! TCP and UDP streams, idle UDP ageing, and an agent restart (SIGTERM, start again)
//! under an established TCP connection.
//!
//! Restart: the new agent picks the connection up mid-stream (conntrack `loose`), and
//! masquerade maps it as before because the client's port lies inside the NAT range and
//! is free, which NAT keeps (Linux `get_unique_tuple`: an in-range, unused tuple is
//! left alone). A client port outside the range would get a new, random port from the
//! new agent, and the server would answer it with a reset, as after a Linux reboot of
//! a NAT box.
//!
//! Needs root, `ip` and `iperf3` (and `ethtool` for the sim run); skipped with a message otherwise, except under `CI`.
//! Every wait is bounded; the agent is killed and the namespaces deleted also when an
//! assertion fails.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use ctoffload_tests::netns::{is_root, skip_reason};
use ctoffload_tests::topology::{
    AgentProcess, GW_OUT, IN_A, OUT_HOST, Topology, agent_config, built_agent_binary, connect_from,
    ip, iperf3, ping, request, short_connections, tcp_exchange, udp_exchange, udp_refused,
};
use serde_json::Value;

/// The masquerade port range.
const NAT_PORTS: std::ops::RangeInclusive<u16> = 20_000..=29_999;
/// How long the agent may take to come up (it shares 2 cores with compilers).
const START: Duration = Duration::from_secs(30);
/// The gateway's outside address as the CLI prints it.
const GW_OUT_STR: &str = "192.0.2.1";
/// Short TCP connections.
const SHORT_CONNS: usize = 200;

/// The gateway under test: the software backend, or the simulated NIC on the same
/// interfaces (established flows carried by its flow table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Software,
    /// The software backend with `io = "af_xdp"`.
    SoftwareXdp,
    /// The same with `flow_offload = true`: established flows in the XDP flow table
    /// (the hosts send full checksums, and have GRO on to take redirected frames).
    SoftwareXdpFlow,
    Sim,
}

fn config(kind: Kind, socket: &Path, interfaces: [&str; 2]) -> String {
    let (name, io, offload) = match kind {
        // The software backend has no fast path to offload to.
        Kind::Software => ("software", "", "\n\n[offload]\nenabled = false"),
        Kind::SoftwareXdp => (
            "software",
            "\nio = \"af_xdp\"",
            "\n\n[offload]\nenabled = false",
        ),
        Kind::SoftwareXdpFlow => (
            "software",
            "\nio = \"af_xdp\"\n\n[backend.af_xdp]\nflow_offload = true",
            "\n\n[offload]\nenabled = false",
        ),
        Kind::Sim => ("sim", "", ""),
    };
    agent_config(
        &format!(
            "kind = \"{name}\"\ninterfaces = [\"{}\", \"{}\"]{io}",
            interfaces[0], interfaces[1]
        ),
        (*NAT_PORTS.start(), *NAT_PORTS.end()),
        &format!("[timeouts]\nudp = 2\nudp_stream = 3\nicmp = 2{offload}"),
        socket,
    )
}

/// The flow whose original tuple is `src -> dst` (protocol by name).
fn find_flow<'a>(
    flows: &'a [Value],
    proto: &str,
    src: SocketAddr,
    dst: SocketAddr,
) -> Option<&'a Value> {
    flows.iter().find(|f| {
        let o = &f["original"];
        o["protocol_name"] == proto
            && o["src"] == src.ip().to_string()
            && o["src_port"] == src.port()
            && o["dst"] == dst.ip().to_string()
            && o["dst_port"] == dst.port()
    })
}

fn assert_translated(peer: SocketAddr, what: &str) {
    assert_eq!(peer.ip(), ip(GW_OUT), "{what}: translated source address");
    assert!(
        NAT_PORTS.contains(&peer.port()),
        "{what}: source port {} not in {NAT_PORTS:?}",
        peer.port()
    );
}

/// A TCP server on the outside host that serves one connection: answers `requests`
/// requests of `n` bytes; returns the peer it saw.
fn long_lived_server(
    t: &Topology,
    port: u16,
    requests: usize,
    n: usize,
) -> thread::JoinHandle<SocketAddr> {
    let l = t
        .outside
        .run_inside(move || TcpListener::bind((ip(OUT_HOST), port)))
        .expect("enter outside")
        .expect("listen");
    thread::spawn(move || {
        l.set_nonblocking(true).expect("nonblocking");
        let until = Instant::now() + Duration::from_secs(10);
        let (mut s, peer) = loop {
            match l.accept() {
                Ok(x) => break x,
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < until => {
                    thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).expect("blocking");
        // Long enough for an agent restart between two requests.
        s.set_read_timeout(Some(Duration::from_secs(240)))
            .expect("timeout");
        let mut req = vec![0u8; n];
        for _ in 0..requests {
            s.read_exact(&mut req).expect("long-lived server: request");
            let resp: Vec<u8> = req.iter().map(|b| b.wrapping_add(1)).collect();
            s.write_all(&resp).expect("long-lived server: answer");
        }
        peer
    })
}

/// With the XDP flow table: a UDP flow that the table carries is deleted through the
/// CLI right after a burst the program forwarded (well within the 5 s sync interval);
/// the deleted connection's reported counters count every packet (the API releases it
/// from the table with its last counts first).
fn xdp_flow_deleted_with_its_counts(t: &Topology, agent: &AgentProcess) {
    let bind = |ns: &ctoffload_tests::netns::NetNs, addr: SocketAddr| {
        let s = ns
            .run_inside(move || UdpSocket::bind(addr))
            .expect("enter namespace")
            .expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        s
    };
    let dst = SocketAddr::from((ip(OUT_HOST), 5010));
    let server = bind(&t.outside, dst);
    let client = bind(&t.inside, SocketAddr::from((ip(IN_A), 0)));
    let src = client.local_addr().expect("address");
    let mut buf = [0u8; 64];
    let mut sent = 0u64;
    // Until the flow is in the table: each round one packet each way (the loop
    // offloads a connection after a batch that touched it, once it has a reply).
    let until = Instant::now() + Duration::from_secs(15);
    let id = loop {
        assert!(
            Instant::now() < until,
            "the UDP flow never went into the XDP table"
        );
        client.send_to(b"ping", dst).expect("send");
        sent += 1;
        if let Ok((_, peer)) = server.recv_from(&mut buf) {
            server.send_to(b"pong", peer).expect("answer");
            let _ = client.recv_from(&mut buf);
        }
        let flows = agent.flows().expect("flows");
        if let Some(f) = find_flow(&flows, "udp", src, dst)
            && f["hw_offloaded"] == true
        {
            break f["id"].as_u64().expect("id");
        }
        thread::sleep(Duration::from_millis(200));
    };
    for _ in 0..20 {
        client.send_to(b"data", dst).expect("send");
        sent += 1;
        server
            .recv_from(&mut buf)
            .expect("forwarded by the XDP table");
    }
    let out = agent
        .cli(&["flows", "delete", "--id", &id.to_string()])
        .expect("delete");
    let packets: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("packets="))
        .filter_map(|n| n.parse().ok())
        .collect();
    assert_eq!(
        packets.first().copied(),
        Some(sent),
        "the deleted flow counts every packet the client sent: {out}"
    );
    let flows = agent.flows().expect("flows");
    assert!(find_flow(&flows, "udp", src, dst).is_none(), "deleted");
}

#[test]
fn agent_software_backend_forwards_real_traffic() {
    scenario(Kind::Software);
}

/// The same scenario with AF_XDP packet I/O (native XDP on veth here; the agent logs
/// which mode it got, checked below).
#[test]
fn agent_software_backend_over_af_xdp_forwards_real_traffic() {
    scenario(Kind::SoftwareXdp);
}

/// The same scenario with the XDP flow table: established TCP and replied UDP flows
/// are NATed and forwarded by the XDP program; the counters the API reports add the
/// program's, the idle UDP flow still ages, and teardown still reaches conntrack.
#[test]
fn agent_software_backend_with_xdp_flow_table_forwards_real_traffic() {
    scenario(Kind::SoftwareXdpFlow);
}

/// The same scenario with the simulated NIC on the gateway's interfaces: the hosts send
/// full checksums (the NIC's NAT adjusts them, as a NIC does).
#[test]
fn agent_sim_backend_on_interfaces_forwards_real_traffic() {
    scenario(Kind::Sim);
}

/// One scenario at a time: each runs iperf3 at full speed and times its waits, and the
/// machine may have only 2 cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[allow(clippy::too_many_lines)] // one scenario, step by step
fn scenario(kind: Kind) {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let needs: &[&str] = match kind {
        Kind::Software | Kind::SoftwareXdp => &["ip", "iperf3"],
        Kind::Sim | Kind::SoftwareXdpFlow => &["ip", "iperf3", "ethtool"],
    };
    if let Some(why) = skip_reason(needs) {
        if is_root() && std::env::var_os("CI").is_some() {
            panic!("e2e_agent_software ({kind:?}) cannot run under CI: {why}");
        }
        eprintln!("skipping e2e_agent_software ({kind:?}): {why}");
        return;
    }
    let tag = match kind {
        Kind::Software => "a",
        Kind::SoftwareXdp => "x",
        Kind::SoftwareXdpFlow => "f",
        Kind::Sim => "s",
    };
    let t = Topology::new(tag).expect("topology");
    if matches!(kind, Kind::Sim | Kind::SoftwareXdpFlow) {
        t.full_checksums().expect("ethtool");
    }
    if kind == Kind::SoftwareXdpFlow {
        t.gro_on_hosts().expect("ethtool");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bin = built_agent_binary().expect("build the ctoffload binary");
    let socket = dir.path().join("api.sock");

    // A missing interface is a startup error that names the key.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, config(kind, &socket, [&t.gw_in, "nosuchif0"])).expect("write");
    let mut failed = Topology::spawn(
        &t.gw,
        &bin.display().to_string(),
        &["agent", "--config", &bad.display().to_string()],
        &dir.path().join("bad.log"),
    )
    .expect("start");
    let st = failed.wait(START).expect("the agent exits");
    let log = std::fs::read_to_string(dir.path().join("bad.log")).unwrap_or_default();
    assert!(!st.success(), "started without its interface: {log}");
    assert!(
        log.contains("backend.interfaces[1]") && log.contains("nosuchif0"),
        "the error names the key: {log}"
    );

    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, config(kind, &socket, [&t.gw_in, &t.gw_out])).expect("write");
    let mut agent = AgentProcess::new(bin, cfg, socket, dir.path().join("agent.log"));
    agent.start(&t, START).expect("agent start");

    let answer = t
        .inside
        .run_inside(|| ping(OUT_HOST, 0x4801, 64))
        .expect("enter inside")
        .expect("ping inside -> outside");
    assert_eq!((answer.from, answer.icmp_type), (OUT_HOST, 0), "echo reply");

    let out_srv = SocketAddr::from((ip(OUT_HOST), 5001));
    let peer = tcp_exchange(
        &t.outside,
        out_srv,
        &t.inside,
        SocketAddr::from((ip(IN_A), 0)),
        out_srv,
        64 * 1024,
    )
    .expect("TCP through the agent");
    assert_translated(peer, "TCP");

    let udp_peer = udp_exchange(&t, 5002).expect("UDP through the agent");
    assert_translated(udp_peer, "UDP");
    udp_refused(&t, 5003).expect("ICMP port unreachable translated back to the inside");

    // DNAT: the outside host reaches the inside server through the gateway's address,
    // and the server sees the real client (no SNAT on the way in).
    let inside_srv = SocketAddr::from((ip(IN_A), 8080));
    let peer = tcp_exchange(
        &t.inside,
        inside_srv,
        &t.outside,
        SocketAddr::from((ip(OUT_HOST), 0)),
        SocketAddr::from((ip(GW_OUT), 8080)),
        4096,
    )
    .expect("DNAT port forward outside -> inside");
    assert_eq!(peer.ip(), ip(OUT_HOST), "DNAT keeps the client's address");

    // The long-lived connection, from a port inside the NAT range (see the module
    // docs), with one request now.
    let client_port = 25_000;
    let (long_src, long_dst) = (
        SocketAddr::from((ip(IN_A), client_port)),
        SocketAddr::from((ip(OUT_HOST), 5005)),
    );
    let server = long_lived_server(&t, 5005, 2, 1000);
    let mut long = t
        .inside
        .run_inside(move || connect_from(long_src, long_dst))
        .expect("enter inside")
        .expect("long-lived connection");
    request(&mut long, 1000).expect("first request");

    // The API serves the forwarder's table: NAT tuples and counters (software plus
    // hardware packets; the hardware share arrives with the reconciler's next pull).
    let total =
        |c: &Value| c["packets"].as_u64().unwrap_or(0) + c["hw_packets"].as_u64().unwrap_or(0);
    let until = Instant::now() + Duration::from_secs(15);
    let flows = loop {
        let flows = agent.flows().expect("flows");
        let long_flow = find_flow(&flows, "tcp", long_src, long_dst)
            .unwrap_or_else(|| panic!("the long-lived connection in flows: {flows:#?}"));
        assert_eq!(long_flow["tcp_state"], "ESTABLISHED", "{long_flow}");
        assert_eq!(long_flow["reply"]["dst"], GW_OUT_STR, "{long_flow}");
        assert_eq!(long_flow["reply"]["dst_port"], client_port, "{long_flow}");
        // With the XDP flow table (when the ports are AF_XDP) the established
        // connection goes into it, and its counters still add up (synced from the map).
        let in_table = kind != Kind::SoftwareXdpFlow
            || long_flow["hw_offloaded"] == true
            || !agent.log_text().contains("AfXdp(");
        if in_table
            && total(&long_flow["original_counters"]) >= 3
            && total(&long_flow["reply_counters"]) >= 2
        {
            break flows;
        }
        assert!(Instant::now() < until, "counters: {long_flow}");
        thread::sleep(Duration::from_millis(300));
    };
    if kind == Kind::SoftwareXdpFlow && agent.log_text().contains("AfXdp(") {
        xdp_flow_deleted_with_its_counts(&t, &agent);
    }
    let udp_flow = flows
        .iter()
        .find(|f| {
            f["original"]["protocol_name"] == "udp"
                && f["original"]["dst_port"] == 5002
                && f["reply"]["dst"] == GW_OUT_STR
                && f["reply"]["dst_port"] == udp_peer.port()
        })
        .unwrap_or_else(|| panic!("the UDP flow with its NAT port in flows: {flows:#?}"));
    let udp_src_port = udp_flow["original"]["src_port"].clone();

    // Many short connections, each its own NAT binding.
    let (peers, took) = short_connections(&t, 5006, SHORT_CONNS, Duration::from_secs(120))
        .expect("short connections");
    assert_eq!(peers.len(), SHORT_CONNS, "short connections within 120 s");
    eprintln!("{SHORT_CONNS} short TCP connections in {took:?}");
    for p in &peers {
        assert_translated(*p, "short connection");
    }
    let mut ports: Vec<u16> = peers.iter().map(SocketAddr::port).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(
        ports.len(),
        SHORT_CONNS,
        "every connection its own NAT port"
    );

    // iperf3 streams, a few seconds each.
    let tcp = iperf3(&t, 3, &[]).expect("iperf3 TCP");
    let tcp_bytes = tcp["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "iperf3 TCP: {:.3} Gbit/s",
        tcp["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap_or(0.0)
            / 1e9
    );
    assert!(tcp_bytes > 1_000_000, "iperf3 TCP moved {tcp_bytes} bytes");
    let udp = iperf3(&t, 3, &["-u", "-b", "20M", "-l", "64"]).expect("iperf3 UDP");
    let sum = &udp["end"]["sum"];
    let (sent, lost) = (
        sum["packets"].as_u64().unwrap_or(0),
        sum["lost_packets"].as_u64().unwrap_or(0),
    );
    eprintln!("iperf3 UDP 64-byte: {sent} sent, {lost} lost");
    assert!(
        sent > 1000 && lost < sent,
        "iperf3 UDP delivered packets: {sum}"
    );

    // The idle UDP request/response flow ages out (udp = 2 s, GC every second).
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let flows = agent.flows().expect("flows");
        let still = flows.iter().any(|f| {
            f["original"]["protocol_name"] == "udp"
                && f["original"]["dst_port"] == 5002
                && f["original"]["src_port"] == udp_src_port
        });
        if !still {
            break;
        }
        assert!(Instant::now() < until, "idle UDP flow never expired");
        thread::sleep(Duration::from_millis(500));
    }

    // Restart: SIGTERM, start again; the established connection carries on.
    agent.stop().expect("SIGTERM stops the agent");
    agent.start(&t, START).expect("agent restart");
    request(&mut long, 1000).expect("request after the agent restart");
    let flows = agent.flows().expect("flows");
    let picked = find_flow(&flows, "tcp", long_src, long_dst)
        .unwrap_or_else(|| panic!("the picked-up connection in flows: {flows:#?}"));
    assert_eq!(picked["reply"]["dst_port"], client_port, "{picked}");
    let peer = server.join().expect("long-lived server");
    assert_eq!(peer, SocketAddr::from((ip(GW_OUT), client_port)));
    drop(long);

    let stats = agent.cli(&["stats", "-o", "json"]).expect("stats");
    let stats: Value = serde_json::from_str(&stats).expect("stats JSON");
    assert!(
        stats["connections"].as_u64() >= Some(1)
            && stats["packets"].as_u64() >= Some(if kind == Kind::Sim { 2 } else { 3 }),
        "the restarted agent's table counts what it forwarded: {stats}"
    );
    agent.stop().expect("SIGTERM stops the agent");
    let log = agent.log_text();
    if kind != Kind::Sim {
        assert!(
            log.contains("forwarding thread stopped"),
            "graceful stop: {log}"
        );
    }
    if matches!(kind, Kind::SoftwareXdp | Kind::SoftwareXdpFlow) {
        // Under CI the ports must be AF_XDP, not the AF_PACKET fallback.
        assert!(
            log.contains("AfXdp(") || std::env::var_os("CI").is_none(),
            "AF_XDP packet I/O: {log}"
        );
    }
    eprintln!("agent log after the restart:\n{log}");
}
