//! End to end: an agent restart with the NIC still running keeps offloaded connections
//! (issue 7, "agent restart with hardware flows kept").
//!
//! ```text
//!  inside ns            gw ns (ip_forward=0)                                outside ns
//!  10.77.0.2, .3 ─veth─ port 0 [ ctoffload-nic-sim process ] port 1 ─veth─ 192.0.2.2
//!                                  ^ control socket, BAR + DMA memory
//!                       ctoffload agent (backend sim, sim_socket): stopped, started
//! ```
//!
//! The simulated NIC runs as its own process (`ctoffload-nic-sim`, its ports on the
//! gateway's veths), like a NIC that outlives the agent; the agent attaches to it
//! through `backend.sim_socket` and routes with masquerade (ports 20000-29999). A long
//! TCP connection and a UDP flow from the inside host are offloaded; then the agent is
//! stopped with SIGTERM (it detaches the device: no reset) while the TCP client keeps
//! exchanging messages, and started again. Checked: the connection never fails (no
//! reset, every message answered) and messages went through while no agent ran (the
//! table kept forwarding); the new agent lists both flows offloaded with the same NAT
//! tuples, the TCP one ESTABLISHED and ASSURED, its hardware counters at least where
//! they were and then advancing; a new connection from the same inside host, bound to
//! the restored connection's NAT port as its own source port, gets another NAT port
//! (the binding was registered again).
//!
//! Needs root, `ip` and `ethtool` (skipped with a message otherwise, failed under `CI`);
//! builds the `ctoffload` and `ctoffload-nic-sim` binaries first
//! (`topology::built_agent_binary`, `built_nic_sim_binary`; or `CTOFFLOAD_BIN`,
//! `CTOFFLOAD_NIC_SIM_BIN`). Every wait is bounded; processes are killed and the namespaces deleted
//! also when an assertion fails.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use ctoffload_tests::netns::skip_reason;
use ctoffload_tests::topology::{
    AgentProcess, GW_OUT, IN_A, IN_B, OUT_HOST, Topology, agent_config, built_agent_binary,
    built_nic_sim_binary, connect_from, ip, wait_for,
};
use serde_json::Value;

/// The masquerade port range.
const NAT_PORTS: (u16, u16) = (20_000, 29_999);
/// How long a process may take to come up (it shares 2 cores with compilers).
const START: Duration = Duration::from_secs(30);
/// Generous bound for anything that crosses the gateway.
const WAIT: Duration = Duration::from_secs(30);
/// The TCP server's port on the outside host.
const TCP_PORT: u16 = 5101;
/// The UDP server's port on the outside host.
const UDP_PORT: u16 = 5153;

/// A TCP server on the outside host: each accepted connection (at most `conns`) is
/// served on its own thread, answering every byte with the byte plus one until the
/// client closes (bounded by a read timeout).
fn echo_server(t: &Topology, conns: usize) -> thread::JoinHandle<Vec<SocketAddr>> {
    let listener = t
        .outside
        .run_inside(|| TcpListener::bind((ip(OUT_HOST), TCP_PORT)))
        .expect("enter outside")
        .expect("listen");
    listener.set_nonblocking(true).expect("nonblocking");
    thread::spawn(move || {
        let mut peers = Vec::new();
        let until = Instant::now() + Duration::from_secs(600);
        while peers.len() < conns && Instant::now() < until {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    peers.push(peer);
                    thread::spawn(move || -> std::io::Result<()> {
                        s.set_nonblocking(false)?;
                        s.set_read_timeout(Some(Duration::from_secs(300)))?;
                        let mut b = [0u8; 256];
                        loop {
                            let n = s.read(&mut b)?;
                            if n == 0 {
                                return Ok(());
                            }
                            let out: Vec<u8> = b[..n].iter().map(|x| x.wrapping_add(1)).collect();
                            s.write_all(&out)?;
                        }
                    });
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    thread::sleep(Duration::from_millis(10));
                }
                Err(_) => break,
            }
        }
        peers
    })
}

/// One message of `n` bytes and its answer.
fn round_trip(s: &mut TcpStream, seq: u64, n: usize) -> std::io::Result<()> {
    let msg: Vec<u8> = (0..n)
        .map(|i| u8::try_from((seq + i as u64) % 251).unwrap_or(0))
        .collect();
    s.write_all(&msg)?;
    let mut back = vec![0u8; n];
    s.read_exact(&mut back)?;
    if back.iter().zip(&msg).all(|(b, m)| *b == m.wrapping_add(1)) {
        Ok(())
    } else {
        Err(std::io::Error::other("wrong answer"))
    }
}

/// The flow whose original tuple is `src -> dst` over `proto`.
fn find(flows: &[Value], proto: &str, src: SocketAddr, dst: SocketAddr) -> Option<Value> {
    flows
        .iter()
        .find(|f| {
            let o = &f["original"];
            o["protocol_name"] == proto
                && o["src"] == src.ip().to_string()
                && o["src_port"] == u64::from(src.port())
                && o["dst"] == dst.ip().to_string()
                && o["dst_port"] == u64::from(dst.port())
        })
        .cloned()
}

/// Hardware packets of both directions.
fn hw_packets(c: &Value) -> u64 {
    ["original_counters", "reply_counters"]
        .iter()
        .map(|d| c[d]["hw_packets"].as_u64().unwrap_or(0))
        .sum()
}

/// The NAT address and port of a flow (its reply tuple's destination).
fn nat_of(c: &Value) -> (String, u64) {
    (
        c["reply"]["dst"].as_str().unwrap_or_default().to_owned(),
        c["reply"]["dst_port"].as_u64().unwrap_or(0),
    )
}

/// The TCP client's background loop: one round trip every 50 ms until `stop`,
/// counting successes (and, while `agent_down` is set, those made with no agent) and
/// the first failure.
struct Traffic {
    ok: Arc<AtomicU64>,
    while_down: Arc<AtomicU64>,
    agent_down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Result<TcpStream, String>>,
}

impl Traffic {
    fn start(mut s: TcpStream, mut seq: u64) -> Self {
        let ok = Arc::new(AtomicU64::new(0));
        let while_down = Arc::new(AtomicU64::new(0));
        let agent_down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (ok, while_down, agent_down, stop) = (
                Arc::clone(&ok),
                Arc::clone(&while_down),
                Arc::clone(&agent_down),
                Arc::clone(&stop),
            );
            thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    seq += 1;
                    let down = agent_down.load(Ordering::Acquire);
                    round_trip(&mut s, seq, 100)
                        .map_err(|e| format!("round trip {seq}: {e} ({:?})", e.kind()))?;
                    ok.fetch_add(1, Ordering::AcqRel);
                    if down && agent_down.load(Ordering::Acquire) {
                        while_down.fetch_add(1, Ordering::AcqRel);
                    }
                    thread::sleep(Duration::from_millis(50));
                }
                Ok(s)
            })
        };
        Self {
            ok,
            while_down,
            agent_down,
            stop,
            handle,
        }
    }

    fn finish(self) -> Result<TcpStream, String> {
        self.stop.store(true, Ordering::Release);
        self.handle
            .join()
            .map_err(|_| "traffic thread panicked".to_owned())?
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, step by step
fn agent_restart_keeps_offloaded_connections_and_nat_bindings() {
    let ci = std::env::var_os("CI").is_some();
    if let Some(why) = skip_reason(&["ip", "ethtool"]) {
        assert!(!ci || why.starts_with("not running as root"), "{why}");
        eprintln!("skipped: {why}");
        return;
    }
    let agent_bin = built_agent_binary().expect("build the ctoffload binary");
    let sim_bin = built_nic_sim_binary().expect("build the ctoffload-nic-sim binary");
    let t = Topology::new("r").expect("topology");
    t.full_checksums().expect("ethtool");
    let dir = tempfile::tempdir().expect("temp dir");
    let sim_socket = dir.path().join("nic-sim.sock");
    let _sim = t
        .start_nic_sim(
            &sim_bin,
            &sim_socket,
            &dir.path().join("nic-sim.log"),
            START,
        )
        .expect("simulator process");

    let api = dir.path().join("api.sock");
    let cfg = dir.path().join("agent.toml");
    let backend = format!(
        "kind = \"sim\"\ninterfaces = [\"{}\", \"{}\"]\nsim_socket = \"{}\"",
        t.gw_in,
        t.gw_out,
        sim_socket.display()
    );
    std::fs::write(
        &cfg,
        agent_config(&backend, NAT_PORTS, "[timeouts]\nudp_stream = 120", &api),
    )
    .expect("write config");
    let log1 = dir.path().join("agent1.log");
    let mut agent = AgentProcess::new(agent_bin, cfg, api, log1.clone());
    agent.start(&t, START).expect("first agent");

    // The long TCP connection, offloaded after its handshake went through software.
    let server = echo_server(&t, 2);
    let srv = SocketAddr::from((ip(OUT_HOST), TCP_PORT));
    let mut client = t
        .inside
        .run_inside(move || connect_from(SocketAddr::from((ip(IN_A), 0)), srv))
        .expect("enter inside")
        .expect("connect through the agent");
    client.set_read_timeout(Some(WAIT)).expect("read timeout");
    let tcp_src = client.local_addr().expect("local address");
    let mut seq = 0;
    let before = wait_for(WAIT, "the TCP connection offloaded", || {
        seq += 1;
        round_trip(&mut client, seq, 100).expect("round trip before the restart");
        let flows = agent.flows().ok()?;
        find(&flows, "tcp", tcp_src, srv).filter(|c| c["hw_offloaded"] == true)
    });
    let tcp_nat = nat_of(&before);
    assert_eq!(tcp_nat.0, ip(GW_OUT).to_string(), "masqueraded: {before}");
    assert!(
        (u64::from(NAT_PORTS.0)..=u64::from(NAT_PORTS.1)).contains(&tcp_nat.1),
        "NAT port in the range: {before}"
    );

    // A UDP flow from the second inside address, offloaded once answered.
    let usrv = t
        .outside
        .run_inside(|| UdpSocket::bind((ip(OUT_HOST), UDP_PORT)))
        .expect("enter outside")
        .expect("bind");
    usrv.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let ucli = t
        .inside
        .run_inside(|| UdpSocket::bind((ip(IN_B), 0)))
        .expect("enter inside")
        .expect("bind");
    ucli.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    ucli.connect((ip(OUT_HOST), UDP_PORT)).expect("connect");
    let udp_src = ucli.local_addr().expect("local address");
    let udp_dst = SocketAddr::from((ip(OUT_HOST), UDP_PORT));
    let udp_round = || -> Option<SocketAddr> {
        ucli.send(b"q").ok()?;
        let mut b = [0u8; 8];
        let (_, from) = usrv.recv_from(&mut b).ok()?;
        usrv.send_to(b"a", from).ok()?;
        ucli.recv(&mut b).ok()?;
        Some(from)
    };
    let udp_before = wait_for(WAIT, "the UDP flow offloaded", || {
        udp_round()?;
        let flows = agent.flows().ok()?;
        find(&flows, "udp", udp_src, udp_dst).filter(|c| c["hw_offloaded"] == true)
    });
    let udp_nat = nat_of(&udp_before);
    let hw_tcp_before = hw_packets(&before);

    // Stop the agent (SIGTERM: it detaches the device) while the client keeps talking,
    // leave it down for a while, start a new one.
    let traffic = Traffic::start(client, seq);
    wait_for(WAIT, "traffic flowing", || {
        (traffic.ok.load(Ordering::Acquire) >= 3).then_some(())
    });
    traffic.agent_down.store(true, Ordering::Release);
    agent.stop().expect("graceful stop");
    let log = std::fs::read_to_string(&log1).unwrap_or_default();
    assert!(log.contains("device detached"), "{log}");
    let down_since = traffic.while_down.load(Ordering::Acquire);
    wait_for(WAIT, "round trips with no agent running", || {
        (traffic.while_down.load(Ordering::Acquire) >= down_since + 5).then_some(())
    });
    assert!(
        udp_round().is_some(),
        "UDP through the table with no agent running"
    );
    agent.log = dir.path().join("agent2.log");
    agent.start(&t, START).expect("second agent");
    traffic.agent_down.store(false, Ordering::Release);
    let log = agent.log_text();
    assert!(
        log.contains("device table read back") && log.contains("adopted=2"),
        "both connections adopted: {log}"
    );
    let ok_at_restart = traffic.ok.load(Ordering::Acquire);
    wait_for(WAIT, "traffic after the restart", || {
        (traffic.ok.load(Ordering::Acquire) >= ok_at_restart + 10).then_some(())
    });
    let while_down = traffic.while_down.load(Ordering::Acquire);
    let mut client = traffic
        .finish()
        .unwrap_or_else(|e| panic!("the connection failed across the restart: {e}"));
    eprintln!("round trips while no agent ran: {while_down}");

    // The new agent lists both, offloaded, with the same tuples and NAT.
    assert!(udp_round().is_some(), "UDP after the restart");
    let flows = agent.flows().expect("flows");
    let after = find(&flows, "tcp", tcp_src, srv).expect("TCP connection adopted");
    assert_eq!(after["hw_offloaded"], true, "{after}");
    assert_eq!(after["tcp_state"], "ESTABLISHED", "{after}");
    assert_eq!(after["assured"], true, "{after}");
    assert_eq!(after["not_offloaded_reason"], "", "{after}");
    assert_eq!(nat_of(&after), tcp_nat, "same NAT tuple: {after}");
    assert_eq!(after["reply"]["src"], before["reply"]["src"]);
    assert_eq!(after["reply"]["src_port"], before["reply"]["src_port"]);
    let udp_after = find(&flows, "udp", udp_src, udp_dst).expect("UDP flow adopted");
    assert_eq!(udp_after["hw_offloaded"], true, "{udp_after}");
    assert_eq!(nat_of(&udp_after), udp_nat, "same UDP NAT: {udp_after}");

    // Hardware counters: at least where they were (read back from the device), then
    // advancing with more traffic.
    let hw_now = wait_for(WAIT, "hardware counters read back", || {
        let flows = agent.flows().ok()?;
        let c = find(&flows, "tcp", tcp_src, srv)?;
        let hw = hw_packets(&c);
        (hw > hw_tcp_before).then_some(hw)
    });
    for i in 0..20 {
        round_trip(&mut client, 10_000 + i, 100).expect("round trip after the restart");
    }
    let hw_later = wait_for(WAIT, "hardware counters advancing", || {
        let flows = agent.flows().ok()?;
        let c = find(&flows, "tcp", tcp_src, srv)?;
        let hw = hw_packets(&c);
        (hw >= hw_now + 40).then_some(hw)
    });
    eprintln!(
        "TCP hardware packets: {hw_tcp_before} before the stop, {hw_now} read back, {hw_later} later"
    );
    assert_eq!(
        find(&agent.flows().expect("flows"), "tcp", tcp_src, srv)
            .map(|c| c["hw_offloaded"] == true),
        Some(true)
    );

    // A new connection from the same inside host, using the restored NAT port as its
    // own source port: NAT must not keep it (the binding is held), so it gets another.
    let nat_port = u16::try_from(tcp_nat.1).expect("port");
    let mut second = t
        .inside
        .run_inside(move || connect_from(SocketAddr::from((ip(IN_A), nat_port)), srv))
        .expect("enter inside")
        .expect("second connection");
    round_trip(&mut second, 1, 10).expect("second connection round trip");
    drop(second);
    drop(client);
    let peers = server.join().expect("server thread");
    assert_eq!(peers.len(), 2, "{peers:?}");
    assert!(peers.iter().all(|p| p.ip() == ip(GW_OUT)), "{peers:?}");
    assert_ne!(
        peers[1].port(),
        nat_port,
        "the new connection got the restored connection's NAT port"
    );
    assert_eq!(u64::from(peers[0].port()), tcp_nat.1);
    agent.stop().expect("final stop");
}
