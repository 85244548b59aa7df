//! End to end: the real `ctoffload agent` on the sim backend, its simulated NIC's
//! ports wired to the gateway namespace's veths, as a router with masquerade between
//! real Linux network stacks.
//!
//! ```text
//!  inside ns                gw ns (ip_forward=0, no addresses)           outside ns
//!  10.78.0.2/24  ─veth─ port 0 [ ctoffload agent, backend sim ] port 1 ─veth─ 192.0.2.2/24
//!  default via 10.78.0.1     10.78.0.1/24                 192.0.2.1/24 (masquerade)
//! ```
//!
//! Checks: ping through the gateway and TTL expiry (ICMP time exceeded from the
//! gateway); TCP and UDP reach the outside host from the gateway's address; established
//! connections are carried by the simulated NIC (hardware counters advance while the
//! slow path's counts stay put during bulk transfer; TTL decremented by the NIC) and
//! `ctoffload flows` shows them offloaded; echo to the gateway is answered and other
//! packets for it are counted as dropped; a connection kept alive only by hardware traffic outlives its software
//! timeout; an idle one ages out of both tables.
//!
//! Needs root, `ip`, `ethtool` and the `ctoffload` binary next to the test's directory
//! (`cargo build -p ctoffload-agent --bin ctoffload`; or `CTOFFLOAD_BIN`); skipped with a
//! message otherwise, failed under `CI`. Every wait is bounded; the agent is killed and
//! the namespaces deleted also when an assertion fails.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use ctoffload_tests::netns::{COMMAND_TIMEOUT, NetNs, run_bounded, skip_reason, unique_name};
use serde_json::Value;

const GW_IN_MAC: &str = "02:00:00:78:01:01";
const GW_OUT_MAC: &str = "02:00:00:78:02:01";
const INSIDE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const GW_IN: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const GW_OUT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Generous bound for anything that crosses the gateway (the machine is shared).
const WAIT: Duration = Duration::from_secs(20);
/// Software timeouts of the test configuration (seconds).
const TCP_ESTABLISHED_S: u64 = 6;
const UDP_S: u64 = 3;

/// The `ctoffload` binary: `CTOFFLOAD_BIN`, else next to the test's `deps/` directory.
fn binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CTOFFLOAD_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("ctoffload");
    p.is_file().then_some(p)
}

/// The agent process, killed and reaped on drop (before the namespaces go).
struct Agent {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    bin: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    fn start(bin: &Path, gw: &NetNs, dir: &Path, ifs: [&str; 2]) -> Agent {
        let sock = dir.join("api.sock");
        let config = dir.join("agent.toml");
        let text = format!(
            r#"[backend]
kind = "sim"
table_size = 4096
interfaces = ["{}", "{}"]

[[ports]]
name = "inside"
mac = "{GW_IN_MAC}"
addresses = ["{GW_IN}/24"]

[[ports]]
name = "outside"
mac = "{GW_OUT_MAC}"
addresses = ["{GW_OUT}/24"]

[[nat.rules]]
name = "masq"
kind = "masquerade"
out_port = "outside"

[timeouts]
tcp_established = {TCP_ESTABLISHED_S}
tcp_fin_wait = 2
tcp_close_wait = 2
tcp_last_ack = 2
tcp_time_wait = 2
tcp_close = 2
udp = {UDP_S}
udp_stream = {UDP_S}

[api]
socket = {:?}
"#,
            ifs[0],
            ifs[1],
            sock.display().to_string()
        );
        std::fs::write(&config, text).expect("write config");
        let log = dir.join("agent.log");
        let logf = std::fs::File::create(&log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", gw.name()])
            .arg(bin)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .expect("start the agent");
        let agent = Agent {
            child,
            sock,
            log,
            bin: bin.to_owned(),
        };
        let until = Instant::now() + WAIT;
        while agent.cli(&["device"]).is_err() {
            assert!(
                Instant::now() < until,
                "agent did not come up: {}",
                agent.log_text()
            );
            thread::sleep(Duration::from_millis(200));
        }
        agent
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctoffload ARGS -o json` against this agent.
    fn cli(&self, args: &[&str]) -> Result<Value, String> {
        let sock = self.sock.display().to_string();
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json", "--socket", &sock]);
        let bin = self.bin.display().to_string();
        let out = run_bounded(&bin, &all, COMMAND_TIMEOUT).map_err(|e| e.to_string())?;
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    /// The connections whose original direction has `proto` and source port `sport`.
    fn flows(&self, proto: &str, sport: u16) -> Vec<Value> {
        let all = self
            .cli(&["flows"])
            .unwrap_or_else(|e| panic!("flows: {e}"));
        all.as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| {
                c["original"]["protocol_name"] == proto
                    && c["original"]["src_port"] == u64::from(sport)
            })
            .collect()
    }
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

fn setup(inside: &NetNs, gw: &NetNs, outside: &NetNs, names: &[String; 4]) {
    let [a, b, c, d] = names;
    let ip = |args: &[&str]| {
        run_bounded("ip", args, COMMAND_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    };
    ip(&[
        "link",
        "add",
        a,
        "netns",
        inside.name(),
        "type",
        "veth",
        "peer",
        "name",
        b,
        "address",
        GW_IN_MAC,
        "netns",
        gw.name(),
    ]);
    ip(&[
        "link",
        "add",
        c,
        "address",
        GW_OUT_MAC,
        "netns",
        gw.name(),
        "type",
        "veth",
        "peer",
        "name",
        d,
        "netns",
        outside.name(),
    ]);
    let ok = |r: Result<String, ctoffload_tests::netns::CommandError>| {
        r.unwrap_or_else(|e| panic!("{e}"));
    };
    // One wire-sized segment per packet (the simulator takes frames up to its MTU), with
    // its TCP/UDP checksum computed by the host, as a NIC would put it on the wire (a
    // veth peer otherwise gets a partial checksum, which the simulated NIC's NAT only
    // adjusts).
    for (ns, dev, addr) in [(inside, a, "10.78.0.2/24"), (outside, d, "192.0.2.2/24")] {
        ok(ns.exec("ethtool", &["-K", dev, "tx", "off"]));
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
        ok(ns.ip(&["addr", "add", addr, "dev", dev]));
        ok(ns.ip(&["link", "set", dev, "up"]));
        ok(ns.ip(&["link", "set", "lo", "up"]));
    }
    ok(inside.ip(&["route", "add", "default", "via", "10.78.0.1"]));
    ok(gw.ip(&["link", "set", b, "up"]));
    ok(gw.ip(&["link", "set", c, "up"]));
    gw.sysctl(&["net.ipv4.ip_forward=0"])
        .unwrap_or_else(|e| panic!("{e}"));
}

/// An echo request to `dst` with IP TTL `ttl` from the calling thread's namespace;
/// returns (who answered, ICMP type) of the first answer about it.
fn ping(dst: Ipv4Addr, ttl: u32) -> Result<(Ipv4Addr, u8), String> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, sockopt};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
        .map_err(|e| format!("raw socket: {e}"))?;
    sockopt::set_socket_timeout(
        &fd,
        sockopt::Timeout::Recv,
        Some(Duration::from_millis(300)),
    )
    .map_err(|e| e.to_string())?;
    sockopt::set_ip_ttl(&fd, ttl).map_err(|e| e.to_string())?;
    let ident: u16 = 0x7878;
    let until = Instant::now() + WAIT;
    let mut seq = 0u16;
    while Instant::now() < until {
        seq += 1;
        let mut echo = [8u8, 0, 0, 0, 0x78, 0x78, 0, 0, b'c', b't', b'o', b'f'];
        echo[6..8].copy_from_slice(&seq.to_be_bytes());
        let sum: u32 = echo
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        let c = !u16::try_from((folded & 0xffff) + (folded >> 16)).unwrap_or(0);
        echo[2..4].copy_from_slice(&c.to_be_bytes());
        rustix::net::sendto(&fd, &echo, SendFlags::empty(), &SocketAddrV4::new(dst, 0))
            .map_err(|e| format!("sendto: {e}"))?;
        let mut buf = [0u8; 1500];
        while let Ok((n, _)) = rustix::net::recv(&fd, &mut buf, RecvFlags::empty()) {
            let p = &buf[..n];
            let ihl = usize::from(p.first().copied().unwrap_or(0) & 0x0f) * 4;
            if ihl < 20 || p.len() < ihl + 8 {
                continue;
            }
            let from = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
            let about_ours = match p[ihl] {
                0 => p.get(ihl + 4..ihl + 6) == Some(&ident.to_be_bytes()[..]),
                11 => p.get(ihl + 8 + 20 + 4..ihl + 8 + 20 + 6) == Some(&ident.to_be_bytes()[..]),
                _ => false,
            };
            if about_ours {
                return Ok((from, p[ihl]));
            }
        }
    }
    Err(format!("no ICMP answer about {dst}"))
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

/// Waits until `f` gives `Some`, at most `limit`.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(250));
    }
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
    let Some(bin) = binary() else {
        let why = "no ctoffload binary (cargo build -p ctoffload-agent --bin ctoffload)";
        assert!(!ci, "{why}");
        eprintln!("skipped: {why}");
        return;
    };
    let inside = NetNs::new(&unique_name("si")).expect("inside ns");
    let gw = NetNs::new(&unique_name("sg")).expect("gw ns");
    let outside = NetNs::new(&unique_name("so")).expect("outside ns");
    let names = ["ia", "gi", "go", "oa"].map(unique_name);
    setup(&inside, &gw, &outside, &names);
    let dir = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(&bin, &gw, dir.path(), [&names[1], &names[2]]);

    // ICMP through the slow path: echo answered by the outside host, TTL 1 answered by
    // the gateway (time exceeded from its inside address).
    let echo = inside.run_inside(|| ping(OUTSIDE, 64)).expect("enter");
    assert_eq!(echo, Ok((OUTSIDE, 0)), "echo reply from the outside host");
    let expired = inside.run_inside(|| ping(OUTSIDE, 1)).expect("enter");
    assert_eq!(expired, Ok((GW_IN, 11)), "time exceeded from the gateway");
    // Echo to the gateway is answered; other packets for its addresses are dropped
    // and counted.
    let own = inside.run_inside(|| ping(GW_IN, 64)).expect("enter");
    assert_eq!(own, Ok((GW_IN, 0)), "the gateway answers echo");
    let local = |a: &Agent| {
        a.cli(&["stats"]).expect("stats")["drops_by_reason"]["gateway/local"]
            .as_u64()
            .expect("gateway/local counter")
    };
    let before = local(&agent);
    inside
        .run_inside(|| {
            let s = UdpSocket::bind((INSIDE, 0))?;
            s.send_to(b"to the gateway", (GW_IN, 9))
        })
        .expect("enter")
        .expect("send");
    wait_for(WAIT, "the packet for the gateway counted", || {
        (local(&agent) > before).then_some(())
    });

    // TCP: handshake and a few round trips in software, offload, then bulk data.
    let server = tcp_server(&outside, 5001);
    let mut client = inside
        .run_inside(|| TcpStream::connect_timeout(&SocketAddr::from((OUTSIDE, 5001)), WAIT))
        .expect("enter")
        .expect("connect through the gateway");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    let sport = client.local_addr().expect("addr").port();
    ping_pong(&mut client);
    let conn = wait_for(WAIT, "the TCP connection offloaded", || {
        ping_pong(&mut client);
        agent
            .flows("tcp", sport)
            .into_iter()
            .find(|c| c["hw_offloaded"] == true)
    });
    assert_eq!(conn["reply"]["dst"], GW_OUT.to_string(), "masqueraded");
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
        let c = agent.flows("tcp", sport).into_iter().next()?;
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
    let conn = agent.flows("tcp", sport);
    assert_eq!(conn.len(), 1, "lived past tcp_established");
    assert_eq!(conn[0]["hw_offloaded"], true);
    let (sw_late, _) = packets(&conn[0]);
    assert!(sw_late <= sw_after + 2, "keep-alive traffic in software");
    drop(client);
    let peer = server.join().expect("server").expect("server io");
    assert_eq!(peer.ip(), GW_OUT, "outside host saw the gateway's address");

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
        agent
            .flows("udp", uport)
            .into_iter()
            .find(|c| c["hw_offloaded"] == true)
    });
    assert_eq!(
        seen_from.map(|a| a.ip()),
        Some(GW_OUT.into()),
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
        let c = agent.flows("udp", uport).into_iter().next()?;
        (packets(&c).1 >= hw0 + 40).then_some(())
    });
    // Forwarded by the NIC with the TTL decremented, as the slow path does.
    let mut ttls = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok((n, _)) = rustix::net::recv(&sniff, &mut buf, rustix::net::RecvFlags::empty()) {
        let p = &buf[..n];
        if n >= 24 && p[12..16] == GW_OUT.octets() && p[22..24] == 5353u16.to_be_bytes() {
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
        || agent.flows("udp", uport).is_empty().then_some(()),
    );
    wait_for(
        Duration::from_secs(TCP_ESTABLISHED_S * 4 + 30),
        "both tables empty",
        || {
            let s = agent.cli(&["stats"]).ok()?;
            let left = agent.cli(&["flows"]).ok()?;
            let live = left.as_array().map_or(0, |a| {
                a.iter()
                    .filter(|c| c["original"]["protocol_name"] != "icmp")
                    .count()
            });
            (s["hw_table"]["used"] == 0 && live == 0).then_some(())
        },
    );
    drop(agent);
}
