//! The three-namespace gateway topology of the end-to-end tests and the comparison
//! benchmark, and the real clients and servers that run over it.
//!
//! ```text
//!  inside ns                     gw ns                                  outside ns
//!  10.77.0.2/24, 10.77.0.3/24    port 0: 10.77.0.1/24  port 1: 192.0.2.1/24   192.0.2.2/24
//!  default via 10.77.0.1  ─veth─ [ the gateway under test ]      ─veth─ (no route back)
//! ```
//!
//! The gateway namespace gets its two veth ends up, with the MACs the gateway's ports
//! use, no IPv4 address and `ip_forward=0`: whatever forwards there (a forwarder over
//! AF_PACKET, the agent binary, or the kernel once [`Topology::kernel_gateway`] gave it
//! addresses) is the gateway. The outside host has no route to the inside prefix, so
//! nothing works without SNAT. Every helper is bounded in time; the namespaces (and so
//! the veths) are deleted when the [`Topology`] drops.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ctoffload_agent::gateway::forward::{ForwarderConfig, SoftwareForwarder};
use ctoffload_agent::gateway::{Gateway, GatewayConfig, PortConfig};
use ctoffload_agent::port::PacketPort;
use ctoffload_fallback_sw::conntrack::{Config as ConntrackConfig, Conntrack};
use ctoffload_fallback_sw::nat::rules::NatRule;

use crate::netns::{COMMAND_TIMEOUT, CommandError, NetNs, run_bounded, unique_name};

/// The inside host's MAC.
pub const IN_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 1, 2];
/// The gateway's inside port MAC.
pub const GW_IN_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 1, 1];
/// The gateway's outside port MAC.
pub const GW_OUT_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 2, 1];
/// The outside host's MAC.
pub const OUT_HOST_MAC: [u8; 6] = [0x02, 0, 0, 0x77, 2, 2];
/// The inside host's first address.
pub const IN_A: [u8; 4] = [10, 77, 0, 2];
/// The inside host's second address.
pub const IN_B: [u8; 4] = [10, 77, 0, 3];
/// The gateway's inside address.
pub const GW_IN: [u8; 4] = [10, 77, 0, 1];
/// The gateway's outside address.
pub const GW_OUT: [u8; 4] = [192, 0, 2, 1];
/// The outside host.
pub const OUT_HOST: [u8; 4] = [192, 0, 2, 2];
/// An address no route covers.
pub const NO_ROUTE: [u8; 4] = [203, 0, 113, 9];
/// How long a client or server waits for its peer.
pub const WAIT: Duration = Duration::from_secs(5);

/// A monotonic clock in nanoseconds for a forwarding loop, starting at one second
/// (so that "never seen" timestamps of zero are in the past).
pub fn forwarder_clock() -> impl Fn() -> u64 + Send + Sync {
    let start = std::time::Instant::now();
    move || u64::try_from(start.elapsed().as_nanos()).map_or(u64::MAX, |t| t + 1_000_000_000)
}

/// `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The standard library's form of `a`.
#[must_use]
pub fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

/// The three namespaces and the two veth pairs between them.
#[derive(Debug)]
pub struct Topology {
    /// The inside host (10.77.0.2 and .3, default route via the gateway).
    pub inside: NetNs,
    /// The gateway's namespace.
    pub gw: NetNs,
    /// The outside host (192.0.2.2).
    pub outside: NetNs,
    /// The gateway's inside interface (port 0).
    pub gw_in: String,
    /// The gateway's outside interface (port 1).
    pub gw_out: String,
    /// The inside host's interface.
    pub host_in: String,
    /// The outside host's interface.
    pub host_out: String,
}

impl Topology {
    /// Creates the namespaces (names from `tag`, at most 3 characters, and this
    /// process) and links; nothing forwards yet.
    ///
    /// # Errors
    /// A namespace or link could not be set up (the namespaces made so far are deleted).
    pub fn new(tag: &str) -> Result<Self, CommandError> {
        let t = Self {
            inside: NetNs::new(&unique_name(&format!("{tag}i")))?,
            gw: NetNs::new(&unique_name(&format!("{tag}g")))?,
            outside: NetNs::new(&unique_name(&format!("{tag}o")))?,
            gw_in: unique_name(&format!("{tag}b")),
            gw_out: unique_name(&format!("{tag}c")),
            host_in: unique_name(&format!("{tag}a")),
            host_out: unique_name(&format!("{tag}d")),
        };
        t.links(&t.host_in, &t.host_out)?;
        Ok(t)
    }

    /// The hosts compute their TCP/UDP checksums in full instead of leaving a partial
    /// one to a NIC (`ethtool -K DEV tx off`), as frames on a real wire carry them: a
    /// gateway that only adjusts checksums (a NIC flow table) needs that.
    ///
    /// # Errors
    /// `ethtool` failed or is missing.
    pub fn full_checksums(&self) -> Result<(), CommandError> {
        for (ns, dev) in [
            (&self.inside, &self.host_in),
            (&self.outside, &self.host_out),
        ] {
            ns.exec("ethtool", &["-K", dev, "tx", "off"])?;
        }
        Ok(())
    }

    /// GRO on the hosts' veths (`ethtool -K DEV gro on`): a veth takes frames an XDP
    /// program redirects into its peer (`ndo_xdp_xmit`) only while it has a NAPI, which
    /// it has with GRO on or an XDP program attached; the gateway's XDP flow table
    /// redirects into the gateway's ports, whose peers are these.
    ///
    /// # Errors
    /// `ethtool` failed or is missing.
    pub fn gro_on_hosts(&self) -> Result<(), CommandError> {
        for (ns, dev) in [
            (&self.inside, &self.host_in),
            (&self.outside, &self.host_out),
        ] {
            ns.exec("ethtool", &["-K", dev, "gro", "on"])?;
        }
        Ok(())
    }

    fn links(&self, host_in: &str, host_out: &str) -> Result<(), CommandError> {
        let veth = |a: &str, ma: [u8; 6], na: &NetNs, b: &str, mb: [u8; 6], nb: &NetNs| {
            run_bounded(
                "ip",
                &[
                    "link",
                    "add",
                    a,
                    "address",
                    &mac_str(ma),
                    "netns",
                    na.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    b,
                    "address",
                    &mac_str(mb),
                    "netns",
                    nb.name(),
                ],
                COMMAND_TIMEOUT,
            )
        };
        veth(
            host_in,
            IN_HOST_MAC,
            &self.inside,
            &self.gw_in,
            GW_IN_MAC,
            &self.gw,
        )?;
        veth(
            &self.gw_out,
            GW_OUT_MAC,
            &self.gw,
            host_out,
            OUT_HOST_MAC,
            &self.outside,
        )?;
        // The hosts' veths hand the peer whole GSO super-packets (up to 64 KiB) unless
        // told to build one segment per packet; the gateway's ports take frames of at
        // most 2048 bytes, like a wire with a 1500-byte MTU (no ethtool needed).
        for (ns, dev) in [(&self.inside, host_in), (&self.outside, host_out)] {
            ns.ip(&[
                "link",
                "set",
                "dev",
                dev,
                "gso_max_segs",
                "1",
                "gso_max_size",
                "1500",
            ])?;
        }
        let i = &self.inside;
        i.ip(&["addr", "add", "10.77.0.2/24", "dev", host_in])?;
        i.ip(&["addr", "add", "10.77.0.3/24", "dev", host_in])?;
        i.ip(&["link", "set", host_in, "up"])?;
        i.ip(&["link", "set", "lo", "up"])?;
        i.ip(&["route", "add", "default", "via", "10.77.0.1"])?;
        self.gw.ip(&["link", "set", &self.gw_in, "up"])?;
        self.gw.ip(&["link", "set", &self.gw_out, "up"])?;
        self.gw.ip(&["link", "set", "lo", "up"])?;
        self.gw.sysctl(&["net.ipv4.ip_forward=0"])?;
        let o = &self.outside;
        o.ip(&["addr", "add", "192.0.2.2/24", "dev", host_out])?;
        o.ip(&["link", "set", host_out, "up"])?;
        o.ip(&["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Makes the gateway namespace's kernel the gateway: the ports' addresses,
    /// `ip_forward=1` and nftables masquerade out of the outside port (the Linux
    /// baseline of the comparison benchmark).
    ///
    /// # Errors
    /// A command failed.
    pub fn kernel_gateway(&self) -> Result<(), CommandError> {
        let g = &self.gw;
        g.ip(&["addr", "add", "10.77.0.1/24", "dev", &self.gw_in])?;
        g.ip(&["addr", "add", "192.0.2.1/24", "dev", &self.gw_out])?;
        g.sysctl(&["net.ipv4.ip_forward=1"])?;
        g.exec("nft", &["add table ip ctbench"])?;
        g.exec(
            "nft",
            &["add chain ip ctbench post { type nat hook postrouting priority srcnat ; }"],
        )?;
        let rule = format!(
            "add rule ip ctbench post oifname \"{}\" masquerade",
            self.gw_out
        );
        g.exec("nft", &[&rule]).map(drop)
    }

    /// Starts `program` in `ns` (`ip netns exec`), stdout and stderr to `log`.
    ///
    /// # Errors
    /// The log file or the process could not be created.
    pub fn spawn(
        ns: &NetNs,
        program: &str,
        args: &[&str],
        log: &std::path::Path,
    ) -> std::io::Result<Background> {
        let out = File::create(log)?;
        let err = out.try_clone()?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()?;
        Ok(Background {
            child: Some(child),
            what: format!("{program} in {}", ns.name()),
        })
    }
}

/// The software gateway of this topology over `ports` (port 0 the inside veth, port 1
/// the outside one, named `names`): the gateway's MACs and addresses, and `conntrack`
/// with masquerade out of port 1, as the agent's software backend runs it.
///
/// # Errors
/// The gateway or the NAT rule was refused (the message says why).
pub fn masquerade_forwarder<P: PacketPort>(
    cfg: ForwarderConfig,
    ports: Vec<P>,
    names: [String; 2],
    conntrack: ConntrackConfig,
) -> Result<SoftwareForwarder<P>, String> {
    let gateway = masquerade_gateway(names)?;
    let mut ct = Conntrack::new(conntrack);
    ct.nat_mut()
        .rules_mut()
        .add(NatRule::masquerade_out(1, 1))
        .map_err(|e| e.to_string())?;
    Ok(SoftwareForwarder::new(cfg, ports, gateway, ct))
}

/// The gateway of [`masquerade_forwarder`]: port 0 `names[0]` (10.77.0.1/24), port 1
/// `names[1]` (192.0.2.1/24), the topology's MACs, no neighbours known yet.
///
/// # Errors
/// The configuration is refused (it is not).
pub fn masquerade_gateway(names: [String; 2]) -> Result<Gateway, String> {
    let [n_in, n_out] = names;
    Gateway::new(GatewayConfig {
        ports: vec![
            PortConfig {
                name: n_in,
                mac: GW_IN_MAC,
                addrs: vec![(GW_IN, 24)],
            },
            PortConfig {
                name: n_out,
                mac: GW_OUT_MAC,
                addrs: vec![(GW_OUT, 24)],
            },
        ],
        ..GatewayConfig::default()
    })
    .map_err(|e| e.to_string())
}

/// What a forwarding thread hands back when it ends: the forwarder, or why it failed.
type ForwarderResult<P> = std::io::Result<Result<SoftwareForwarder<P>, String>>;

/// A software forwarding loop on its own thread inside a namespace, with
/// [`forwarder_clock`]; stopped and joined when dropped (also on a failed assertion,
/// before the namespaces' guards drop).
#[derive(Debug)]
pub struct ForwarderThread<P: PacketPort + 'static> {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<ForwarderResult<P>>>,
}

impl<P: PacketPort + 'static> ForwarderThread<P> {
    /// Runs `build` on a new thread inside `ns` (it opens the ports there, and may pin
    /// or report on the thread), then the forwarder it returns until stopped.
    ///
    /// # Errors
    /// The namespace file cannot be opened.
    pub fn start(
        ns: &NetNs,
        build: impl FnOnce() -> Result<SoftwareForwarder<P>, String> + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let handle = ns.spawn_inside(move || {
            let mut fwd = build()?;
            fwd.run(&stop2, &forwarder_clock())
                .map_err(|e| e.to_string())?;
            Ok(fwd)
        })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops the loop and returns the forwarder (its ports, counters and tables).
    ///
    /// # Errors
    /// The loop or `build` failed, or the thread could not enter the namespace.
    pub fn finish(mut self) -> Result<SoftwareForwarder<P>, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            Some(Ok(Ok(r))) => r.map_err(|e| format!("forwarding loop: {e}")),
            Some(Ok(Err(e))) => Err(format!("cannot enter the gateway namespace: {e}")),
            Some(Err(_)) => Err("forwarding loop panicked".into()),
            None => Err("forwarding loop already finished".into()),
        }
    }
}

impl<P: PacketPort + 'static> Drop for ForwarderThread<P> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// A process started by [`Topology::spawn`], killed (SIGKILL) and reaped on drop
/// unless [`Background::terminate`]d or [`Background::wait`]ed first.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    what: String,
}

impl Background {
    /// The process id.
    #[must_use]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has exited (its status, if so).
    ///
    /// # Errors
    /// `waitpid` failed.
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        match &mut self.child {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Waits for the process to exit, at most `limit`; kills it after that.
    ///
    /// # Errors
    /// It did not exit in time (it is killed), or `waitpid` failed.
    pub fn wait(&mut self, limit: Duration) -> std::io::Result<std::process::ExitStatus> {
        let Some(child) = &mut self.child else {
            return Err(std::io::Error::other(format!("{}: not running", self.what)));
        };
        let until = Instant::now() + limit;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if Instant::now() >= until {
                let _ = child.kill();
                let _ = child.wait();
                self.child = None;
                return Err(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("{}: still running after {limit:?}, killed", self.what),
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit, at most `limit`.
    ///
    /// # Errors
    /// See [`Background::wait`].
    pub fn terminate(&mut self, limit: Duration) -> std::io::Result<std::process::ExitStatus> {
        if let Some(pid) = self
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(rustix::process::Pid::from_raw)
        {
            rustix::process::kill_process(pid, rustix::process::Signal::TERM)?;
        }
        self.wait(limit)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What answered an echo request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpAnswer {
    /// Who sent the answer.
    pub from: [u8; 4],
    /// ICMP type (0 echo reply, 3 unreachable, 11 time exceeded).
    pub icmp_type: u8,
    /// ICMP code.
    pub code: u8,
}

/// Echo requests to `dst` (with IP TTL `ttl`) from the calling thread's namespace over a
/// raw socket, until an echo reply with our identifier or an ICMP error quoting one of
/// our requests arrives (5 tries, 1 s each).
///
/// # Errors
/// The socket failed, or nothing answered.
pub fn ping(dst: [u8; 4], ident: u16, ttl: u32) -> Result<IcmpAnswer, String> {
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
            if let Some(a) = icmp_answer(&buf[..n], dst, ident) {
                return Ok(a);
            }
        }
    }
    Err(format!("no ICMP answer about {}", ip(dst)))
}

/// The answer in `pkt` (an IPv4 packet from a raw ICMP socket) to our echo request
/// with `ident` to `dst`: its echo reply, or an ICMP error quoting it.
fn icmp_answer(pkt: &[u8], dst: [u8; 4], ident: u16) -> Option<IcmpAnswer> {
    let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
    if pkt.len() < ihl + 8 || ihl < 20 {
        return None;
    }
    let from: [u8; 4] = pkt[12..16].try_into().unwrap_or_default();
    let (icmp_type, code) = (pkt[ihl], pkt[ihl + 1]);
    let ours = match icmp_type {
        0 => from == dst && pkt[ihl + 4..ihl + 6] == ident.to_be_bytes(),
        3 | 11 => {
            // The quoted datagram: its header, then our echo request.
            let q = &pkt[ihl + 8..];
            let qihl = usize::from(q.first().copied().unwrap_or(0) & 0x0f) * 4;
            qihl >= 20
                && q.len() >= qihl + 8
                && q[16..20] == dst
                && q[qihl] == 8
                && q[qihl + 4..qihl + 6] == ident.to_be_bytes()
        }
        _ => false,
    };
    ours.then_some(IcmpAnswer {
        from,
        icmp_type,
        code,
    })
}

/// Polls `f` every 250 ms until it gives `Some`, at most `limit`.
///
/// # Panics
/// Nothing came within `limit` (the message names `what`).
pub fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(250));
    }
}

fn io(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A TCP server on `listen` in `server_ns` and a client in `client_ns` (bound to
/// `client_bind`, port 0 for any) that connects to `connect`; `bytes` go each way (the
/// answer is every byte plus one). Returns the client address the server saw.
///
/// # Errors
/// Anything failed or did not arrive within [`WAIT`]; or the answer was wrong.
pub fn tcp_exchange(
    server_ns: &NetNs,
    listen: SocketAddr,
    client_ns: &NetNs,
    client_bind: SocketAddr,
    connect: SocketAddr,
    bytes: usize,
) -> Result<SocketAddr, String> {
    let listener = server_ns
        .run_inside(move || TcpListener::bind(listen))
        .map_err(io("enter server namespace"))?
        .map_err(io("listen"))?;
    listener.set_nonblocking(true).map_err(io("nonblocking"))?;
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
        let mut req = vec![0u8; bytes];
        s.read_exact(&mut req)?;
        let resp: Vec<u8> = req.iter().map(|b| b.wrapping_add(1)).collect();
        s.write_all(&resp)?;
        Ok(peer)
    });
    let client = client_ns
        .run_inside(move || connect_from(client_bind, connect))
        .map_err(io("enter client namespace"))?;
    let result = client.and_then(|mut c| request(&mut c, bytes));
    let peer = server
        .join()
        .map_err(|_| "server thread panicked".to_owned())?
        .map_err(io("server side"));
    result?;
    peer
}

/// A TCP connection from `bind` to `to`, within [`WAIT`], with [`WAIT`] read timeouts.
///
/// # Errors
/// The socket failed or the connection was not made.
pub fn connect_from(bind: SocketAddr, to: SocketAddr) -> Result<TcpStream, String> {
    use rustix::net::{AddressFamily, SocketType, sockopt};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    sockopt::set_socket_reuseaddr(&fd, true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    rustix::net::bind(&fd, &bind).map_err(|e| format!("bind {bind}: {e}"))?;
    let s = TcpStream::from(fd);
    // Connecting in blocking mode is bounded by the kernel's SYN retries (over a
    // minute); a send timeout bounds it to WAIT.
    s.set_write_timeout(Some(WAIT)).map_err(io("timeout"))?;
    rustix::net::connect(&s, &to).map_err(|e| format!("connect {bind} -> {to}: {e}"))?;
    s.set_read_timeout(Some(WAIT)).map_err(io("timeout"))?;
    Ok(s)
}

/// Sends `bytes` numbered bytes on `s` and checks the answer (every byte plus one).
///
/// # Errors
/// The exchange failed or the answer was wrong.
pub fn request(s: &mut TcpStream, bytes: usize) -> Result<(), String> {
    let req: Vec<u8> = (0..bytes)
        .map(|i| u8::try_from(i % 251).unwrap_or(0))
        .collect();
    s.write_all(&req).map_err(io("send"))?;
    let mut resp = vec![0u8; bytes];
    s.read_exact(&mut resp).map_err(io("TCP response"))?;
    if resp.iter().zip(&req).all(|(r, q)| *r == q.wrapping_add(1)) {
        Ok(())
    } else {
        Err("wrong TCP response bytes".into())
    }
}

/// UDP request/response: a server on `OUT_HOST:port` answers `pong:` + the request to
/// a client on the inside host's second address. Returns the source the server saw.
///
/// # Errors
/// Anything failed or did not arrive within [`WAIT`]; or the answer was wrong.
pub fn udp_exchange(t: &Topology, port: u16) -> Result<SocketAddr, String> {
    let srv = t
        .outside
        .run_inside(move || UdpSocket::bind((ip(OUT_HOST), port)))
        .map_err(io("enter outside"))?
        .map_err(io("bind"))?;
    srv.set_read_timeout(Some(WAIT)).map_err(io("timeout"))?;
    let server = thread::spawn(move || -> std::io::Result<SocketAddr> {
        let mut buf = [0u8; 64];
        let (n, from) = srv.recv_from(&mut buf)?;
        let mut resp = b"pong:".to_vec();
        resp.extend_from_slice(&buf[..n]);
        srv.send_to(&resp, from)?;
        Ok(from)
    });
    let cli = udp_client(t, port, WAIT)?;
    cli.send(b"ping").map_err(io("send"))?;
    let mut buf = [0u8; 64];
    let got = cli.recv(&mut buf).map_err(io("UDP response"));
    let peer = server
        .join()
        .map_err(|_| "server thread panicked".to_owned())?
        .map_err(io("UDP server"))?;
    let n = got?;
    if &buf[..n] == b"pong:ping" {
        Ok(peer)
    } else {
        Err(format!("wrong UDP answer {:?}", &buf[..n]))
    }
}

/// A UDP socket on the inside host's second address, connected to the outside host's
/// `port`, with a receive timeout.
fn udp_client(t: &Topology, port: u16, timeout: Duration) -> Result<UdpSocket, String> {
    let cli = t
        .inside
        .run_inside(|| UdpSocket::bind((ip(IN_B), 0)))
        .map_err(io("enter inside"))?
        .map_err(io("bind"))?;
    cli.connect((ip(OUT_HOST), port)).map_err(io("connect"))?;
    cli.set_read_timeout(Some(timeout)).map_err(io("timeout"))?;
    Ok(cli)
}

/// UDP to a closed outside port: the outside host's ICMP port unreachable, translated
/// back, must make the inside socket's receive fail with ECONNREFUSED (4 tries).
///
/// # Errors
/// The socket failed, an answer came, or no port unreachable arrived.
pub fn udp_refused(t: &Topology, port: u16) -> Result<(), String> {
    let cli = udp_client(t, port, Duration::from_secs(1))?;
    let mut last = None;
    for _ in 0..4 {
        let _ = cli.send(b"anyone?");
        let mut buf = [0u8; 16];
        match cli.recv(&mut buf) {
            Err(e) if e.kind() == ErrorKind::ConnectionRefused => return Ok(()),
            Err(e) => last = Some(e),
            Ok(n) => return Err(format!("answer from a closed port: {n} bytes")),
        }
    }
    Err(format!(
        "no ICMP port unreachable reached the inside socket: {last:?}"
    ))
}

/// Up to `count` short TCP connections one after the other (connect, 8 bytes each
/// way, close) from the inside host's first address to a server on the outside host's
/// `port`, stopping early once `within` has passed. Returns the client address the
/// server saw for each connection and the time the connections took.
///
/// # Errors
/// A connection failed, or the server saw a different number of connections.
pub fn short_connections(
    t: &Topology,
    port: u16,
    count: usize,
    within: Duration,
) -> Result<(Vec<SocketAddr>, Duration), String> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let srv = SocketAddr::from((ip(OUT_HOST), port));
    let listener = t
        .outside
        .run_inside(move || TcpListener::bind(srv))
        .map_err(io("enter outside"))?
        .map_err(io("listen"))?;
    listener.set_nonblocking(true).map_err(io("nonblocking"))?;
    let done = Arc::new(AtomicBool::new(false));
    let done2 = Arc::clone(&done);
    let server = thread::spawn(move || -> Result<Vec<SocketAddr>, String> {
        let mut peers = Vec::new();
        let serve = |s: &mut TcpStream| -> std::io::Result<()> {
            s.set_nonblocking(false)?;
            s.set_read_timeout(Some(WAIT))?;
            let mut b = [0u8; 8];
            s.read_exact(&mut b)?;
            s.write_all(&b)
        };
        loop {
            match listener.accept() {
                Ok((mut s, peer)) => {
                    serve(&mut s).map_err(io("short connection, server side"))?;
                    peers.push(peer);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if done2.load(Ordering::Acquire) {
                        return Ok(peers);
                    }
                    thread::sleep(Duration::from_micros(200));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        }
    });
    let started = Instant::now();
    let client = t
        .inside
        .run_inside(move || -> Result<usize, String> {
            let mut made = 0;
            while made < count && started.elapsed() < within {
                let mut s = connect_from(SocketAddr::from((ip(IN_A), 0)), srv)
                    .map_err(|e| format!("connection {made}: {e}"))?;
                let b = u64::try_from(made).unwrap_or(0).to_be_bytes();
                s.write_all(&b)
                    .map_err(|e| format!("connection {made}: {e}"))?;
                let mut r = [0u8; 8];
                s.read_exact(&mut r)
                    .map_err(|e| format!("connection {made}: {e}"))?;
                if r != b {
                    return Err(format!("connection {made}: wrong echo"));
                }
                made += 1;
            }
            Ok(made)
        })
        .map_err(io("enter inside"));
    let took = started.elapsed();
    done.store(true, Ordering::Release);
    let peers = server
        .join()
        .map_err(|_| "server thread panicked".to_owned())??;
    let made = client??;
    if peers.len() == made {
        Ok((peers, took))
    } else {
        Err(format!(
            "{made} connections made, the server saw {}",
            peers.len()
        ))
    }
}

/// iperf3 from the inside host to a one-off server on the outside host (port 5201),
/// for `secs` seconds with `extra` client options; returns the client's JSON report.
///
/// # Errors
/// The server or client failed, or the report is not JSON.
pub fn iperf3(t: &Topology, secs: u32, extra: &[&str]) -> Result<serde_json::Value, String> {
    let log = std::env::temp_dir().join(format!("{}-iperf3.log", t.outside.name()));
    let _server = Topology::spawn(
        &t.outside,
        "iperf3",
        &["-s", "-1", "-B", "192.0.2.2", "-p", "5201"],
        &log,
    )
    .map_err(io("iperf3 server"))?;
    let secs = secs.to_string();
    let mut args = vec![
        "netns",
        "exec",
        t.inside.name(),
        "iperf3",
        "-c",
        "192.0.2.2",
        "-p",
        "5201",
        "-t",
        &secs,
        "-J",
    ];
    args.extend_from_slice(extra);
    let until = Instant::now() + Duration::from_secs(10);
    let result = loop {
        // The server may not listen yet: retry the client.
        let r = run_bounded("ip", &args, Duration::from_secs(60))
            .map_err(|e| e.to_string())
            .and_then(|out| {
                let v: serde_json::Value =
                    serde_json::from_str(&out).map_err(|e| format!("iperf3 JSON: {e}\n{out}"))?;
                match v.get("error") {
                    Some(e) => Err(e.to_string()),
                    None => Ok(v),
                }
            });
        match r {
            Err(_) if Instant::now() < until => thread::sleep(Duration::from_millis(300)),
            r => break r.map_err(|e| format!("iperf3 {extra:?}: {e}")),
        }
    };
    let _ = std::fs::remove_file(&log);
    result
}

/// `ctoffload` next to the running executable's `target/<profile>/` (a test binary
/// lives in `deps/` below it), or `$CTOFFLOAD_BIN`.
///
/// # Errors
/// The running executable's path is unknown.
pub fn agent_binary() -> std::io::Result<PathBuf> {
    workspace_binary("ctoffload", "CTOFFLOAD_BIN")
}

/// `ctoffload-nic-sim` (the simulator in process mode), found like [`agent_binary`],
/// or `$CTOFFLOAD_NIC_SIM_BIN`.
///
/// # Errors
/// The running executable's path is unknown.
pub fn nic_sim_binary() -> std::io::Result<PathBuf> {
    workspace_binary("ctoffload-nic-sim", "CTOFFLOAD_NIC_SIM_BIN")
}

/// [`agent_binary`], built first (`cargo build -p ctoffload-agent --bin ctoffload`
/// into the running test's target directory and profile) unless `$CTOFFLOAD_BIN` names
/// one: end-to-end tests run against the current source, also when run alone.
///
/// # Errors
/// The running executable's path is unknown, or cargo could not be run or failed.
pub fn built_agent_binary() -> std::io::Result<PathBuf> {
    built_workspace_binary("ctoffload-agent", "ctoffload", "CTOFFLOAD_BIN")
}

/// [`nic_sim_binary`], built first like [`built_agent_binary`] unless
/// `$CTOFFLOAD_NIC_SIM_BIN` names one.
///
/// # Errors
/// As [`built_agent_binary`].
pub fn built_nic_sim_binary() -> std::io::Result<PathBuf> {
    built_workspace_binary(
        "ctoffload-nic-sim",
        "ctoffload-nic-sim",
        "CTOFFLOAD_NIC_SIM_BIN",
    )
}

/// Builds binary `name` of `package` next to the running executable (same target
/// directory and profile) and returns its path; `$var` instead when set.
fn built_workspace_binary(package: &str, name: &str, var: &str) -> std::io::Result<PathBuf> {
    let bin = workspace_binary(name, var)?;
    if std::env::var_os(var).is_some() {
        return Ok(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut args = vec!["build", "-q", "-p", package, "--bin", name];
    if bin.parent().is_some_and(|d| d.ends_with("release")) {
        args.push("--release");
    }
    // Into the target directory this test runs from (a relative CARGO_TARGET_DIR
    // would otherwise resolve against the package directory).
    let target_dir = bin.parent().and_then(Path::parent).map(Path::to_path_buf);
    if let Some(d) = target_dir.as_deref().and_then(Path::to_str) {
        args.extend(["--target-dir", d]);
    }
    // Without the variables cargo set for this test: build scripts that watch them
    // (ring's) would rebuild for each invocation.
    let keep = ["CARGO_HOME", "CARGO_INCREMENTAL"];
    let mut cmd = Command::new(cargo);
    for (k, _) in std::env::vars_os() {
        let Some(key) = k.to_str() else { continue };
        let set_by_cargo = key.starts_with("CARGO_")
            && !keep.contains(&key)
            && !key.starts_with("CARGO_BUILD_")
            && !key.starts_with("CARGO_PROFILE_")
            && !key.starts_with("CARGO_TERM_");
        if set_by_cargo || key == "OUT_DIR" {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()?;
    if !status.success() {
        return Err(std::io::Error::other(format!(
            "cargo {} failed: {status}",
            args.join(" ")
        )));
    }
    Ok(bin)
}

/// `$var`, else `name` in the running executable's `target/<profile>/`.
fn workspace_binary(name: &str, var: &str) -> std::io::Result<PathBuf> {
    if let Some(p) = std::env::var_os(var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir.join(name))
}

impl Topology {
    /// Starts `ctoffload-nic-sim` (`bin`) in the gateway namespace with its ports on
    /// the gateway's interfaces (port 0 inside, port 1 outside), a table of 4096
    /// entries and its control socket at `socket`, and waits (at most `limit`) until
    /// it listens. Like a NIC it outlives the agents that attach to it.
    ///
    /// # Errors
    /// It could not start, exited, or did not listen in time (its log is in the error).
    pub fn start_nic_sim(
        &self,
        bin: &Path,
        socket: &Path,
        log: &Path,
        limit: Duration,
    ) -> Result<Background, String> {
        let socket_arg = socket.display().to_string();
        let port0 = format!("0=af-packet:{}", self.gw_in);
        let port1 = format!("1=af-packet:{}", self.gw_out);
        let mut sim = Self::spawn(
            &self.gw,
            &bin.display().to_string(),
            &[
                "--socket",
                &socket_arg,
                "--buckets-log2",
                "9",
                "--num-ports",
                "2",
                "--port",
                &port0,
                "--port",
                &port1,
            ],
            log,
        )
        .map_err(io("start ctoffload-nic-sim"))?;
        let until = Instant::now() + limit;
        let logged = || std::fs::read_to_string(log).unwrap_or_default();
        while !logged().contains("listening on") {
            if let Ok(Some(st)) = sim.try_wait() {
                return Err(format!("ctoffload-nic-sim exited ({st}):\n{}", logged()));
            }
            if Instant::now() >= until {
                return Err(format!(
                    "ctoffload-nic-sim did not listen in {limit:?}:\n{}",
                    logged()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(sim)
    }
}

/// A `ctoffload agent` process in the gateway namespace and its API socket.
#[derive(Debug)]
pub struct AgentProcess {
    /// The `ctoffload` binary.
    pub bin: PathBuf,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its API socket (`api.socket` of the configuration).
    pub socket: PathBuf,
    /// Its stdout and stderr.
    pub log: PathBuf,
    proc: Option<Background>,
}

impl AgentProcess {
    /// An agent (not started) with `config` and `socket`, logging to `log`.
    #[must_use]
    pub fn new(bin: PathBuf, config: PathBuf, socket: PathBuf, log: PathBuf) -> Self {
        Self {
            bin,
            config,
            socket,
            log,
            proc: None,
        }
    }

    /// Starts the agent in `t`'s gateway namespace and waits until its API answers
    /// (at most `limit`).
    ///
    /// # Errors
    /// It did not start, exited, or did not answer in time (the log is in the error).
    pub fn start(&mut self, t: &Topology, limit: Duration) -> Result<(), String> {
        let config = self.config.display().to_string();
        let proc = Topology::spawn(
            &t.gw,
            &self.bin.display().to_string(),
            &["agent", "--config", &config],
            &self.log,
        )
        .map_err(io("start the agent"))?;
        self.proc = Some(proc);
        let until = Instant::now() + limit;
        loop {
            let exited = self.proc.as_mut().map(Background::try_wait);
            if let Some(Ok(Some(st))) = exited {
                self.proc = None;
                return Err(format!("the agent exited ({st}):\n{}", self.log_text()));
            }
            if self.cli(&["stats"]).is_ok() {
                return Ok(());
            }
            if Instant::now() >= until {
                self.proc = None;
                return Err(format!(
                    "the agent did not answer in {limit:?}:\n{}",
                    self.log_text()
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then the exit status (at most 15 s).
    ///
    /// # Errors
    /// Not running, did not stop in time, or exited unsuccessfully.
    pub fn stop(&mut self) -> Result<(), String> {
        let mut p = self.proc.take().ok_or("the agent is not running")?;
        let st = p
            .terminate(Duration::from_secs(15))
            .map_err(io("stop the agent"))?;
        if st.success() {
            Ok(())
        } else {
            Err(format!("agent exit {st}:\n{}", self.log_text()))
        }
    }

    /// What the agent logged so far.
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ctoffload --socket SOCKET args...` (20 s at most); its stdout.
    ///
    /// # Errors
    /// The command failed.
    pub fn cli(&self, args: &[&str]) -> Result<String, String> {
        let socket = self.socket.display().to_string();
        let mut all = vec!["--socket", socket.as_str()];
        all.extend_from_slice(args);
        run_bounded(
            &self.bin.display().to_string(),
            &all,
            Duration::from_secs(20),
        )
        .map_err(|e| e.to_string())
    }

    /// `ctoffload flows -o json`.
    ///
    /// # Errors
    /// The command failed or did not print a JSON array.
    pub fn flows(&self) -> Result<Vec<serde_json::Value>, String> {
        let out = self.cli(&["flows", "-o", "json"])?;
        match serde_json::from_str(&out) {
            Ok(serde_json::Value::Array(v)) => Ok(v),
            _ => Err(format!("ctoffload flows -o json: not an array:\n{out}")),
        }
    }
}

/// An agent configuration for the topology: `backend` (the `[backend]` section's
/// body), ports `in` and `out` with the gateway's addresses and MACs, masquerade out of
/// `out` to `nat_ports` (TCP and UDP; other protocols keep their identifiers), the DNAT port forward 192.0.2.1:8080 -> 10.77.0.2:8080, and
/// `extra` TOML appended (timeouts, offload); API on `socket`.
#[must_use]
pub fn agent_config(backend: &str, nat_ports: (u16, u16), extra: &str, socket: &Path) -> String {
    format!(
        r#"[backend]
{backend}

[[ports]]
name = "in"
mac = "{}"
addresses = ["10.77.0.1/24"]

[[ports]]
name = "out"
mac = "{}"
addresses = ["192.0.2.1/24"]

[[nat.rules]]
name = "web-in"
kind = "dnat"
protocol = "tcp"
dst = "192.0.2.1/32"
dport = "8080"
to_address = "10.77.0.2"
to_port = 8080

[[nat.rules]]
name = "lan-out-tcp"
kind = "masquerade"
protocol = "tcp"
src = "10.77.0.0/24"
out_port = "out"
to_ports = "{lo}-{hi}"

[[nat.rules]]
name = "lan-out-udp"
kind = "masquerade"
protocol = "udp"
src = "10.77.0.0/24"
out_port = "out"
to_ports = "{lo}-{hi}"

[[nat.rules]]
name = "lan-out"
kind = "masquerade"
src = "10.77.0.0/24"
out_port = "out"

{extra}

[api]
socket = "{}"
"#,
        mac_str(GW_IN_MAC),
        mac_str(GW_OUT_MAC),
        socket.display(),
        lo = nat_ports.0,
        hi = nat_ports.1,
    )
}
