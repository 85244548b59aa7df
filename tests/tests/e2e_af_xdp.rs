//! End to end: the software backend's forwarding loop over AF_XDP ports
//! (`ctoffload_agent::port::af_xdp`) as a gateway between real Linux network stacks.
//!
//! ```text
//!  inside ns                 gw ns (ip_forward=0)                     outside ns
//!  10.78.0.2/24              port 0: 10.78.0.1/24  port 1: 192.0.2.1/24   192.0.2.2/24
//!  fe80::2 ─veth─ [ SoftwareForwarder over AfXdp, XDP on both veths ] ─veth─
//!                 fe80::1 (the gateway kernel's own, IPv6 passes to it)
//! ```
//!
//! The same shape as `e2e_software.rs` (masquerade on port 1, the outside host has no
//! route back), with AF_XDP in place of AF_PACKET: ping, TCP and UDP through SNAT; IPv6
//! to the gateway's kernel still arrives (the XDP program passes what the dataplane
//! does not own); the program is gone once the ports are dropped, and also after the
//! process holding them is killed (the BPF link dies with its descriptor).
//!
//! Needs root and `ip`; skipped with a message otherwise, or when XDP cannot attach
//! here (then the ports fall back to AF_PACKET); under `CI` both are failures.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream, UdpSocket,
};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ctoffload_agent::gateway::forward::{ForwarderConfig, SoftwareForwarder};
use ctoffload_agent::gateway::{Gateway, GatewayConfig, PortConfig};
use ctoffload_agent::port::af_xdp::{
    AfXdp, AfXdpConfig, AnyPort, IoChosen, IoRequest, XdpMode, open_ports,
};
use ctoffload_fallback_sw::conntrack::{Config, Conntrack};
use ctoffload_fallback_sw::nat::rules::{NatAction, NatFlags, NatRule, RuleMatch};
use ctoffload_tests::netns::{NetNs, is_root, skip_reason, unique_name};

const GW_IN_MAC: [u8; 6] = [0x02, 0, 0, 0x78, 1, 1];
const GW_OUT_MAC: [u8; 6] = [0x02, 0, 0, 0x78, 2, 1];
const GW_IN: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const GW_OUT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const OUT_HOST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const WAIT: Duration = Duration::from_secs(5);
const TCP_BYTES: usize = 256 * 1024;
/// Set in the environment of the child process of `killed_holder_leaves_no_program`.
const CHILD_ENV: &str = "CTOFFLOAD_E2E_XDP_CHILD";

type Fwd = SoftwareForwarder<AnyPort>;

/// Whether the test may skip (outside CI) or must fail (under CI) for `why`.
fn skip_or_fail(why: &str) {
    assert!(
        !(is_root() && std::env::var_os("CI").is_some()),
        "e2e_af_xdp cannot run under CI: {why}"
    );
    eprintln!("skipping e2e_af_xdp: {why}");
}

fn mac_str(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// The three namespaces and the gateway's two veth names; removed when dropped.
struct Topology {
    inside: NetNs,
    gw: NetNs,
    outside: NetNs,
    gw_if: [String; 2],
    in_if: String,
}

fn topology() -> Topology {
    let inside = NetNs::new(&unique_name("xi")).expect("inside namespace");
    let gw = NetNs::new(&unique_name("xg")).expect("gateway namespace");
    let outside = NetNs::new(&unique_name("xo")).expect("outside namespace");
    let [a, b, c, d] = ["xa", "xb", "xc", "xd"].map(unique_name);
    let ip = |args: &[&str]| {
        ctoffload_tests::netns::run_bounded("ip", args, ctoffload_tests::netns::COMMAND_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}"));
    };
    let (m_in, m_out) = (mac_str(GW_IN_MAC), mac_str(GW_OUT_MAC));
    for (host_ns, host_if, gw_if, gw_mac) in [(&inside, &a, &b, &m_in), (&outside, &d, &c, &m_out)]
    {
        ip(&[
            "link",
            "add",
            host_if,
            "netns",
            host_ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            gw_if,
            "address",
            gw_mac,
            "netns",
            gw.name(),
        ]);
    }
    let run = |ns: &NetNs, args: &[&str]| {
        ns.ip(args).unwrap_or_else(|e| panic!("{e}"));
    };
    // One segment per packet from the hosts (the gateway's frames are at most 2 KiB).
    for (ns, dev) in [(&inside, &a), (&outside, &d)] {
        run(
            ns,
            &[
                "link",
                "set",
                "dev",
                dev,
                "gso_max_segs",
                "1",
                "gso_max_size",
                "1500",
            ],
        );
        run(ns, &["link", "set", dev, "up"]);
        run(ns, &["link", "set", "lo", "up"]);
    }
    run(&inside, &["addr", "add", "10.78.0.2/24", "dev", &a]);
    run(
        &inside,
        &["-6", "addr", "add", "fe80::2/64", "dev", &a, "nodad"],
    );
    run(&inside, &["route", "add", "default", "via", "10.78.0.1"]);
    run(&outside, &["addr", "add", "192.0.2.2/24", "dev", &d]);
    for dev in [&b, &c] {
        run(&gw, &["link", "set", dev, "up"]);
    }
    run(
        &gw,
        &["-6", "addr", "add", "fe80::1/64", "dev", &b, "nodad"],
    );
    gw.sysctl(&["net.ipv4.ip_forward=0"])
        .unwrap_or_else(|e| panic!("{e}"));
    Topology {
        inside,
        gw,
        outside,
        gw_if: [b, c],
        in_if: a,
    }
}

/// Stops the forwarding loop and joins it when dropped (also on a failed assertion).
struct Running {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<std::io::Result<Result<Fwd, String>>>>,
}

impl Running {
    fn finish(mut self) -> Fwd {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(Ok(Ok(fwd)))) => fwd,
            Some(Ok(Ok(Err(e)))) => panic!("forwarding loop failed: {e}"),
            other => panic!("forwarding loop thread: {other:?}"),
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

/// Opens the ports with AF_XDP inside the gateway namespace and runs the loop; returns
/// what I/O the ports got.
fn start_gateway(t: &Topology) -> (Running, IoChosen) {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (names, stop2) = (t.gw_if.clone(), Arc::clone(&stop));
    let handle =
        t.gw.spawn_inside(move || -> Result<Fwd, String> {
            let opened = open_ports(
                &[names[0].as_str(), names[1].as_str()],
                IoRequest::AfXdp(AfXdpConfig::default()),
            );
            let (ports, chosen) = match opened {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(None);
                    return Err(e.to_string());
                }
            };
            let _ = tx.send(Some(chosen));
            let [n0, n1] = names;
            let gateway = Gateway::new(GatewayConfig {
                ports: vec![
                    PortConfig {
                        name: n0,
                        mac: GW_IN_MAC,
                        addrs: vec![(GW_IN.octets(), 24)],
                    },
                    PortConfig {
                        name: n1,
                        mac: GW_OUT_MAC,
                        addrs: vec![(GW_OUT.octets(), 24)],
                    },
                ],
                ..GatewayConfig::default()
            })
            .map_err(|e| e.to_string())?;
            let mut ct = Conntrack::new(Config::default());
            let masquerade = NatRule {
                id: 1,
                r#match: RuleMatch {
                    out_port: Some(1),
                    ..RuleMatch::default()
                },
                action: NatAction::Masquerade {
                    ports: None,
                    flags: NatFlags::default(),
                },
            };
            ct.nat_mut()
                .rules_mut()
                .add(masquerade)
                .map_err(|e| e.to_string())?;
            let cfg = ForwarderConfig {
                fill_checksums: true,
                ..ForwarderConfig::default()
            };
            let mut fwd = SoftwareForwarder::new(cfg, ports, gateway, ct);
            fwd.run(&stop2, &ctoffload_tests::topology::forwarder_clock())
                .map_err(|e| e.to_string())?;
            Ok(fwd)
        })
        .expect("gateway namespace");
    let running = Running {
        stop,
        handle: Some(handle),
    };
    let Ok(Some(chosen)) = rx.recv_timeout(Duration::from_secs(30)) else {
        drop(running.finish());
        panic!("the gateway thread did not open its ports");
    };
    (running, chosen)
}

/// ICMP echo to `dst` over a raw socket until a reply with `ident` comes back.
fn ping(dst: Ipv4Addr, ident: u16) -> Result<Ipv4Addr, String> {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, ipproto, recv, sendto};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::RAW, Some(ipproto::ICMP))
        .map_err(|e| format!("raw socket: {e}"))?;
    let timeout = Some(Duration::from_millis(300));
    rustix::net::sockopt::set_socket_timeout(&fd, rustix::net::sockopt::Timeout::Recv, timeout)
        .map_err(|e| e.to_string())?;
    let mut echo = [8u8, 0, 0, 0, 0, 0, 0, 1, b'x', b'd', b'p', b'!'];
    echo[4..6].copy_from_slice(&ident.to_be_bytes());
    let sum = echo
        .chunks(2)
        .fold(0u32, |s, c| s + u32::from(u16::from_be_bytes([c[0], c[1]])));
    let sum = (sum & 0xffff) + (sum >> 16);
    echo[2..4].copy_from_slice(&(!u16::try_from(sum).unwrap_or(0)).to_be_bytes());
    let until = Instant::now() + WAIT;
    while Instant::now() < until {
        sendto(&fd, &echo, SendFlags::empty(), &SocketAddrV4::new(dst, 0))
            .map_err(|e| format!("sendto: {e}"))?;
        let mut buf = [0u8; 1500];
        while let Ok((n, _)) = recv(&fd, &mut buf, RecvFlags::empty()) {
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            if n >= ihl + 8 && buf[ihl] == 0 && buf[ihl + 4..ihl + 6] == ident.to_be_bytes() {
                return Ok(Ipv4Addr::new(buf[12], buf[13], buf[14], buf[15]));
            }
        }
    }
    Err(format!("no echo reply from {dst}"))
}

/// TCP from inside to outside, [`TCP_BYTES`] each way; the source the server saw.
fn tcp_exchange(t: &Topology) -> SocketAddr {
    let listener = t
        .outside
        .run_inside(|| TcpListener::bind((OUT_HOST, 5001)))
        .expect("enter outside")
        .expect("listen");
    let server = thread::spawn(move || -> std::io::Result<SocketAddr> {
        listener.set_nonblocking(true)?;
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
        s.write_all(&req.iter().map(|b| b ^ 0x5a).collect::<Vec<_>>())?;
        Ok(peer)
    });
    let mut client = t
        .inside
        .run_inside(|| TcpStream::connect_timeout(&SocketAddr::from((OUT_HOST, 5001)), WAIT))
        .expect("enter inside")
        .expect("TCP connect through the gateway");
    client.set_read_timeout(Some(WAIT)).expect("timeout");
    let req: Vec<u8> = (0..TCP_BYTES)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    client.write_all(&req).expect("send");
    let mut resp = vec![0u8; TCP_BYTES];
    client
        .read_exact(&mut resp)
        .expect("TCP response through the gateway");
    assert!(
        resp.iter().zip(&req).all(|(r, q)| *r == q ^ 0x5a),
        "response bytes"
    );
    server.join().expect("server thread").expect("TCP server")
}

/// UDP request/response from inside to outside; the source the server saw.
fn udp_exchange(t: &Topology) -> SocketAddr {
    let srv = t
        .outside
        .run_inside(|| UdpSocket::bind((OUT_HOST, 5002)))
        .expect("enter outside")
        .expect("bind");
    srv.set_read_timeout(Some(WAIT)).expect("timeout");
    let cli = t
        .inside
        .run_inside(|| UdpSocket::bind(("10.78.0.2", 0)))
        .expect("enter inside")
        .expect("bind");
    cli.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let until = Instant::now() + WAIT;
    let mut buf = [0u8; 64];
    // The first datagram may wait for ARP on the outside: resend until answered.
    while Instant::now() < until {
        cli.send_to(b"ping", (OUT_HOST, 5002)).expect("send");
        if let Ok((n, from)) = srv.recv_from(&mut buf) {
            srv.send_to(&buf[..n], from).expect("reply");
            if cli.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"ping") {
                return from;
            }
        }
    }
    panic!("no UDP exchange through the gateway");
}

/// An IPv6 datagram from the inside host to the gateway's kernel (link-local): it
/// arrives only if the XDP program passes IPv6 to the kernel.
fn ipv6_to_gateway_kernel(t: &Topology) -> bool {
    let srv =
        t.gw.run_inside(|| UdpSocket::bind("[::]:5003"))
            .expect("enter gateway")
            .expect("bind");
    srv.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let in_if = t.in_if.clone();
    let (cli, scope) = t
        .inside
        .run_inside(move || -> std::io::Result<(UdpSocket, u32)> {
            let cli = UdpSocket::bind("[::]:0")?;
            let scope = rustix::net::netdevice::name_to_index(&cli, &in_if)?;
            Ok((cli, scope))
        })
        .expect("enter inside")
        .expect("bind");
    let to = SocketAddrV6::new(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1), 5003, 0, scope);
    let until = Instant::now() + WAIT;
    let mut buf = [0u8; 16];
    while Instant::now() < until {
        let _ = cli.send_to(b"v6", to);
        if srv
            .recv_from(&mut buf)
            .is_ok_and(|(n, _)| &buf[..n] == b"v6")
        {
            return true;
        }
    }
    false
}

fn xdp_attached(ns: &NetNs, dev: &str) -> bool {
    ns.ip(&["-d", "link", "show", "dev", dev])
        .unwrap_or_else(|e| panic!("{e}"))
        .contains("prog/xdp")
}

#[test]
fn software_gateway_over_af_xdp_forwards_real_traffic_with_snat() {
    if let Some(why) = skip_reason(&["ip"]) {
        return skip_or_fail(&why);
    }
    let t = topology();
    let (running, chosen) = start_gateway(&t);
    let IoChosen::AfXdp(mode) = chosen else {
        return skip_or_fail(&format!("XDP cannot attach here: {chosen:?}"));
    };
    eprintln!("AF_XDP ports, {mode} XDP");
    for dev in &t.gw_if {
        assert!(xdp_attached(&t.gw, dev), "program attached to {dev}");
    }
    let in_ping = |dst| {
        t.inside
            .run_inside(move || ping(dst, 0x7801))
            .expect("enter inside")
    };
    assert_eq!(
        in_ping(GW_IN),
        Ok(GW_IN),
        "ping the gateway's inside address"
    );
    assert_eq!(in_ping(OUT_HOST), Ok(OUT_HOST), "ping through masquerade");
    assert_eq!(
        tcp_exchange(&t).ip(),
        GW_OUT,
        "outside saw the translated TCP source"
    );
    assert_eq!(
        udp_exchange(&t).ip(),
        GW_OUT,
        "outside saw the translated UDP source"
    );
    assert!(
        ipv6_to_gateway_kernel(&t),
        "IPv6 reached the gateway's own kernel stack"
    );

    let fwd = running.finish();
    let s = fwd.gateway().stats();
    assert!(s.arp_replies_sent >= 1 && s.echo_replies >= 1, "{s:?}");
    assert!(s.forwarded >= 2 * (TCP_BYTES / 1500) as u64, "{s:?}");
    let ports: Vec<_> = fwd
        .ports()
        .iter()
        .map(ctoffload_agent::port::PacketPort::stats)
        .collect();
    assert!(
        ports.iter().all(|p| p.rx_frames > 100 && p.tx_frames > 100),
        "{ports:?}"
    );
    eprintln!(
        "gateway {s:?}\nports {ports:?}\nforwarder {:?}",
        fwd.stats()
    );
    drop(fwd);
    for dev in &t.gw_if {
        assert!(
            !xdp_attached(&t.gw, dev),
            "program detached from {dev} with its port"
        );
    }
}

/// A process holding an AF_XDP port is killed: the kernel removes its program.
#[test]
fn killed_holder_leaves_no_program() {
    if let (Ok(ns), Ok(dev)) = (
        std::env::var(format!("{CHILD_ENV}_NS")),
        std::env::var(format!("{CHILD_ENV}_IF")),
    ) {
        // The child: attach, say so, wait to be killed.
        let ns = std::fs::File::open(format!("/var/run/netns/{ns}")).expect("namespace file");
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&ns),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .expect("enter namespace");
        let port =
            AfXdp::open(&dev, XdpMode::Generic, &AfXdpConfig::default()).expect("open AF_XDP port");
        println!("attached {port:?}");
        thread::sleep(Duration::from_secs(60));
        return;
    }
    if let Some(why) = skip_reason(&["ip"]) {
        return skip_or_fail(&why);
    }
    let ns = NetNs::new(&unique_name("xk")).expect("namespace");
    let dev = unique_name("xk");
    ns.ip(&[
        "link",
        "add",
        &dev,
        "type",
        "veth",
        "peer",
        "name",
        &unique_name("xl"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    ns.ip(&["link", "set", &dev, "up"])
        .unwrap_or_else(|e| panic!("{e}"));
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "killed_holder_leaves_no_program",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(format!("{CHILD_ENV}_NS"), ns.name())
        .env(format!("{CHILD_ENV}_IF"), &dev)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the holder");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("attached AfXdp") {
                let _ = tx.send(());
            }
        }
    });
    let attached = rx.recv_timeout(Duration::from_secs(30)).is_ok();
    let was_attached = attached && xdp_attached(&ns, &dev);
    child.kill().expect("kill the holder");
    child.wait().expect("reap the holder");
    if !attached {
        return skip_or_fail("the holder could not attach XDP");
    }
    assert!(was_attached, "program attached while the holder lives");
    // The kernel releases the link with the last descriptor, right at exit.
    let until = Instant::now() + WAIT;
    while xdp_attached(&ns, &dev) && Instant::now() < until {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !xdp_attached(&ns, &dev),
        "program gone after the holder was killed"
    );
}
