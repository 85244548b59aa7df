//! End to end: the software backend's forwarding loop over AF_XDP ports
//! (`ctoffload_agent::port::af_xdp`) as a gateway between real Linux network stacks.
//!
//! ```text
//!  inside ns                 gw ns (ip_forward=0)                     outside ns
//!  10.77.0.2/24              port 0: 10.77.0.1/24  port 1: 192.0.2.1/24   192.0.2.2/24
//!  fe80::2 ─veth─ [ SoftwareForwarder over AfXdp, XDP on both veths ] ─veth─
//!                 fe80::1 (the gateway kernel's own, IPv6 passes to it)
//! ```
//!
//! The topology of `e2e_software.rs` (`ctoffload_tests::topology`: masquerade on port
//! 1, the outside host has no route back), with AF_XDP in place of AF_PACKET: ping, TCP
//! and UDP through SNAT; IPv6 to the gateway's kernel still arrives (the XDP program
//! passes what the dataplane does not own); the program is gone once the ports are
//! dropped, and also after the process holding them is killed (the BPF link dies with
//! its descriptor); the port's NAPI deferral is set while it is open and undone after.
//!
//! Needs root and `ip`; skipped with a message otherwise, or when XDP cannot attach
//! here (then the ports fall back to AF_PACKET); under `CI` both are failures.

use std::io::{BufRead, BufReader};
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ctoffload_agent::gateway::forward::{ForwarderConfig, SoftwareForwarder};
use ctoffload_agent::port::af_xdp::{
    AfXdp, AfXdpConfig, AnyPort, IoChosen, IoRequest, NapiDeferral, XdpMode, napi_settings,
    open_ports,
};
use ctoffload_fallback_sw::conntrack::Config;
use ctoffload_tests::netns::{NetNs, is_root, skip_reason, unique_name};
use ctoffload_tests::topology::{
    ForwarderThread, GW_IN, GW_OUT, IN_A, OUT_HOST, Topology, WAIT, ip, masquerade_forwarder, ping,
    tcp_exchange, udp_exchange,
};

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

/// The end-to-end topology with IPv6 link-local addresses on the inside link (the
/// gateway namespace's kernel owns fe80::1).
fn topology() -> Topology {
    let t = Topology::new("x").expect("topology");
    t.inside
        .ip(&[
            "-6",
            "addr",
            "add",
            "fe80::2/64",
            "dev",
            &t.host_in,
            "nodad",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    t.gw.ip(&["-6", "addr", "add", "fe80::1/64", "dev", &t.gw_in, "nodad"])
        .unwrap_or_else(|e| panic!("{e}"));
    t
}

/// Opens the ports with AF_XDP inside the gateway namespace and runs the loop; returns
/// what I/O the ports got.
fn start_gateway(t: &Topology) -> (ForwarderThread<AnyPort>, IoChosen) {
    let (tx, rx) = mpsc::channel();
    let names = [t.gw_in.clone(), t.gw_out.clone()];
    let running = ForwarderThread::start(&t.gw, move || -> Result<Fwd, String> {
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
        let cfg = ForwarderConfig {
            // veth senders leave TCP/UDP checksums to offload.
            fill_checksums: true,
            ..ForwarderConfig::default()
        };
        masquerade_forwarder(cfg, ports, names, Config::default())
    })
    .expect("gateway namespace");
    let Ok(Some(chosen)) = rx.recv_timeout(Duration::from_secs(30)) else {
        let why = running.finish().err();
        panic!("the gateway thread did not open its ports: {why:?}");
    };
    (running, chosen)
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
    let in_if = t.host_in.clone();
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
    let gw_ifs = [t.gw_in.clone(), t.gw_out.clone()];
    for dev in &gw_ifs {
        assert!(xdp_attached(&t.gw, dev), "program attached to {dev}");
    }
    let in_ping = |dst: [u8; 4]| {
        t.inside
            .run_inside(move || ping(dst, 0x7801, 64))
            .expect("enter inside")
            .map(|a| (a.from, a.icmp_type))
    };
    assert_eq!(
        in_ping(GW_IN),
        Ok((GW_IN, 0)),
        "ping the gateway's inside address"
    );
    assert_eq!(
        in_ping(OUT_HOST),
        Ok((OUT_HOST, 0)),
        "ping through masquerade"
    );
    let server = SocketAddr::from((ip(OUT_HOST), 5001));
    let tcp_peer = tcp_exchange(
        &t.outside,
        server,
        &t.inside,
        SocketAddr::from((ip(IN_A), 0)),
        server,
        TCP_BYTES,
    );
    assert_eq!(
        tcp_peer.map(|a| a.ip()),
        Ok(ip(GW_OUT).into()),
        "outside saw the translated TCP source"
    );
    assert_eq!(
        udp_exchange(&t, 5002).map(|a| a.ip()),
        Ok(ip(GW_OUT).into()),
        "outside saw the translated UDP source"
    );
    assert!(
        ipv6_to_gateway_kernel(&t),
        "IPv6 reached the gateway's own kernel stack"
    );

    let fwd = running.finish().unwrap_or_else(|e| panic!("{e}"));
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
    for dev in &gw_ifs {
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

/// `AfXdpConfig::napi_deferral` is set on the interface's NAPI while the port is open
/// (as the kernel reports it) and the previous settings come back when it closes.
#[test]
fn napi_deferral_is_set_while_open_and_restored() {
    if let Some(why) = skip_reason(&["ip", "ethtool"]) {
        return skip_or_fail(&why);
    }
    let ns = NetNs::new(&unique_name("xn")).expect("namespace");
    let (dev, peer) = (unique_name("xn"), unique_name("xo"));
    ns.ip(&["link", "add", &dev, "type", "veth", "peer", "name", &peer])
        .unwrap_or_else(|e| panic!("{e}"));
    for d in [&dev, &peer] {
        ns.ip(&["link", "set", d, "up"])
            .unwrap_or_else(|e| panic!("{e}"));
    }
    // With GRO on, a veth keeps its NAPI without XDP, so the restore is visible.
    ns.exec("ethtool", &["-K", &dev, "gro", "on"])
        .unwrap_or_else(|e| panic!("{e}"));
    let deferral = NapiDeferral {
        defer_hard_irqs: 7,
        gro_flush_timeout: Duration::from_micros(30),
    };
    let cfg = AfXdpConfig {
        napi_deferral: Some(deferral),
        ..AfXdpConfig::default()
    };
    let outcome = ns
        .run_inside(move || {
            let before = napi_settings(&dev).map_err(|e| e.to_string())?;
            let port = AfXdp::open(&dev, XdpMode::Native, &cfg).map_err(|e| e.to_string())?;
            let during = napi_settings(&dev).map_err(|e| e.to_string())?;
            let deferred = port.deferred_napis();
            drop(port);
            let after = napi_settings(&dev).map_err(|e| e.to_string())?;
            Ok::<_, String>((before, deferred, during, after))
        })
        .expect("enter namespace");
    let (before, deferred, during, after) = match outcome {
        Ok(x) => x,
        Err(e) => return skip_or_fail(&format!("NAPI settings or AF_XDP unavailable: {e}")),
    };
    assert!(!before.is_empty(), "veth with GRO has a NAPI: {before:?}");
    assert!(
        before
            .iter()
            .all(|n| (n.defer_hard_irqs, n.gro_flush_timeout_ns) != (7, 30_000)),
        "not deferred before: {before:?}"
    );
    let mut ids: Vec<u32> = during.iter().map(|n| n.id).collect();
    ids.sort_unstable();
    assert_eq!(deferred, ids, "every NAPI of the interface was deferred");
    for n in &during {
        assert_eq!(
            (n.defer_hard_irqs, n.gro_flush_timeout_ns),
            (7, 30_000),
            "{during:?}"
        );
    }
    assert_eq!(after, before, "the previous settings are back");
}
