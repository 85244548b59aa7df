//! `ctoffload demo`: the agent on the built-in simulated NIC with a traffic generator.
//!
//! The generator plays both sides of a masquerading gateway. Inside hosts
//! (10.0.0.0/24, port 0) open long-lived TCP flows carrying data, short TCP
//! connections (handshake, request, response, FIN teardown), UDP request/response
//! flows and ICMP echoes towards outside servers (198.51.100.0/24, port 1). Four hosts
//! walk the same ephemeral port sequence (the others start at random points), and the
//! server follows from the port, so those hosts collide on a source port and the
//! masquerade (to 203.0.113.1) must choose another. The outside servers answer the
//! frames the simulator emits on the outside port (SYN-ACK from the translated
//! destination, data, FIN-ACK, UDP replies, echo replies), so NAT is real: replies
//! only reach inside hosts if the device or the slow path translates them back.
//!
//! Progress once per second, a summary at the end (or on Ctrl-C). The gRPC API serves
//! the running dataplane on the Unix socket meanwhile. Deterministic with `--seed`
//! (the traffic's choices; timing follows the machine).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use ctoffload_fallback_sw::tuple::proto;
use ctoffload_nic_sim::port::{MemPort, PortBackend as _};
use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use tokio_util::sync::CancellationToken;

use super::agent::{Agent, AgentControl};
use super::sim;
use crate::config;

/// `println!` that ignores a closed stdout (`demo | head` must not panic).
macro_rules! out {
    () => {{
        let _ = writeln!(std::io::stdout());
    }};
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// Options of `ctoffload demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long to run, seconds.
    #[arg(long, default_value_t = 20, value_name = "SECONDS")]
    pub duration: u64,
    /// Seed of the traffic's random choices.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub seed: u64,
    /// Traffic scale: new short connections and UDP flows per second (each).
    #[arg(long, default_value_t = 100, value_name = "N")]
    pub rate: u32,
    /// Long-lived TCP flows.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub long_flows: u32,
}

const GW_IN_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const GW_OUT_MAC: [u8; 6] = [2, 0, 0, 0, 1, 1];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x10];
const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 1, 0x10];
const PUBLIC: [u8; 4] = [203, 0, 113, 1];
const HOSTS: u8 = 32;
const SERVERS: u8 = 8;
/// Hosts whose ephemeral ports start at the same value.
const CLONES: u8 = 4;
const SPORT_FIRST: u16 = 40_000;
const SPORT_SPAN: u16 = 16_384;
/// Hardware idle timeout of the demo (ns).
const HW_IDLE_NS: u64 = 5_000_000_000;

const CONFIG: &str = r#"
[backend]
kind = "sim"
table_size = 65536

[[ports]]
name = "inside"
mac = "02:00:00:00:00:01"
addresses = ["10.0.0.1/24"]

[[ports]]
name = "outside"
mac = "02:00:00:00:01:01"
addresses = ["203.0.113.1/24"]

[[routes]]
prefix = "0.0.0.0/0"
port = "outside"

[[nat.rules]]
name = "masq"
kind = "masquerade"
out_port = "outside"

[timeouts]
udp = 3
udp_stream = 5
icmp = 3
tcp_time_wait = 2
tcp_close = 2

[offload]
enabled = true
min_packets = 2
"#;

/// xorshift64*: the demo's deterministic choices.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn u32(&mut self) -> u32 {
        u32::try_from(self.next() >> 32).unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Long,
    Short,
    Udp,
    Icmp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CState {
    SynSent,
    Established,
    FinWait,
}

/// One inside host's end of a connection.
#[derive(Debug)]
struct Client {
    kind: Kind,
    server: [u8; 4],
    dport: u16,
    seq: u32,
    ack: u32,
    state: CState,
    /// Exchanges left (UDP, ICMP) or data segments left (long flows).
    left: u32,
    /// When to send next (ms since start; `u64::MAX`: waiting for the peer).
    next_at: u64,
}

/// One outside server's end of a connection, keyed by the translated tuple.
#[derive(Debug)]
struct Server {
    seq: u32,
    ack: u32,
    closing: bool,
}

type ClientKey = ([u8; 4], u16, u8);
type ServerKey = ([u8; 4], u16, [u8; 4], u16);

/// Counters of what the generator did.
#[derive(Debug, Default)]
struct Gen {
    started: [u64; 4],
    torn_down: u64,
    udp_done: u64,
    pings_answered: u64,
    frames_in: u64,
    frames_out: u64,
    send_drops: u64,
}

struct Traffic {
    rng: Rng,
    clients: HashMap<ClientKey, Client>,
    servers: HashMap<ServerKey, Server>,
    next_sport: [u16; HOSTS as usize],
    icmp_id: u16,
    inside: MemPort,
    outside: MemPort,
    tally: Gen,
}

fn host(i: u8) -> [u8; 4] {
    [10, 0, 0, 10 + i]
}

fn send(port: &mut MemPort, frame: &[u8], tally: &mut Gen) {
    if port.send(frame).is_ok() {
        tally.frames_in += 1;
    } else {
        tally.send_drops += 1;
    }
}

#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    sp: u16,
    dst: [u8; 4],
    dp: u16,
    seq: u32,
    ack: Option<u32>,
    flags: &str,
    payload: usize,
) -> Vec<u8> {
    let mut b = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, 64)
        .tcp(sp, dp, seq, 64_240);
    if flags.contains('S') {
        b = b.syn();
    }
    if flags.contains('F') {
        b = b.fin();
    }
    if flags.contains('P') {
        b = b.psh();
    }
    if let Some(a) = ack {
        b = b.ack(a);
    }
    let data = vec![0x61u8; payload];
    let mut v = Vec::with_capacity(64 + payload);
    let _ = b.write(&mut v, &data);
    pad(v)
}

/// Ethernet minimum frame (without FCS): shorter frames are runts the NIC drops.
fn pad(mut v: Vec<u8>) -> Vec<u8> {
    if v.len() < 60 {
        v.resize(60, 0);
    }
    v
}

fn udp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    sp: u16,
    dst: [u8; 4],
    dp: u16,
    len: usize,
) -> Vec<u8> {
    let mut v = Vec::new();
    let _ = PacketBuilder::ethernet2(macs.0, macs.1)
        .ipv4(src, dst, 64)
        .udp(sp, dp)
        .write(&mut v, &vec![0x44u8; len]);
    v
}

fn icmp_frame(
    macs: ([u8; 6], [u8; 6]),
    src: [u8; 4],
    dst: [u8; 4],
    id: u16,
    seq: u16,
    reply: bool,
) -> Vec<u8> {
    let mut v = Vec::new();
    let b = PacketBuilder::ethernet2(macs.0, macs.1).ipv4(src, dst, 64);
    let b = if reply {
        b.icmpv4_echo_reply(id, seq)
    } else {
        b.icmpv4_echo_request(id, seq)
    };
    let _ = b.write(&mut v, &[0x50u8; 32]);
    v
}

const TO_GW: ([u8; 6], [u8; 6]) = (HOST_MAC, GW_IN_MAC);
const FROM_PEER: ([u8; 6], [u8; 6]) = (PEER_MAC, GW_OUT_MAC);

impl Traffic {
    fn new(seed: u64, inside: MemPort, outside: MemPort) -> Self {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        // Ephemeral ports start at random points of the range, except for the first
        // hosts (clones of one image, say), which start at the same port and so keep
        // colliding after masquerade.
        let mut next_sport = [SPORT_FIRST; HOSTS as usize];
        for p in next_sport.iter_mut().skip(usize::from(CLONES)) {
            *p = SPORT_FIRST + u16::try_from(rng.below(u64::from(SPORT_SPAN))).unwrap_or(0);
        }
        Self {
            rng,
            clients: HashMap::new(),
            servers: HashMap::new(),
            next_sport,
            icmp_id: 1,
            inside,
            outside,
            tally: Gen::default(),
        }
    }

    /// Open one connection of `kind` from a random host.
    fn open(&mut self, kind: Kind, now_ms: u64) {
        let h = u8::try_from(self.rng.below(u64::from(HOSTS))).unwrap_or(0);
        let src = host(h);
        let (sport, proto_num) = if kind == Kind::Icmp {
            self.icmp_id = self.icmp_id.wrapping_add(1).max(1);
            (self.icmp_id, proto::ICMP)
        } else {
            let p = &mut self.next_sport[usize::from(h)];
            *p = if *p >= SPORT_FIRST + SPORT_SPAN - 1 {
                SPORT_FIRST
            } else {
                *p + 1
            };
            (
                *p,
                if kind == Kind::Udp {
                    proto::UDP
                } else {
                    proto::TCP
                },
            )
        };
        let key = (src, sport, proto_num);
        if self.clients.contains_key(&key) {
            return;
        }
        // The server follows from the port: hosts on the same port meet at the same
        // server, so their masqueraded tuples would clash.
        let server = [
            198,
            51,
            100,
            10 + u8::try_from(sport % u16::from(SERVERS)).unwrap_or(0),
        ];
        let dport = match kind {
            Kind::Long => 443,
            Kind::Short => 80,
            Kind::Udp => 53,
            Kind::Icmp => 0,
        };
        let isn = self.rng.u32();
        let mut c = Client {
            kind,
            server,
            dport,
            seq: isn,
            ack: 0,
            state: CState::SynSent,
            left: 0,
            next_at: u64::MAX,
        };
        match kind {
            Kind::Long | Kind::Short => {
                let f = tcp_frame(TO_GW, src, sport, server, dport, isn, None, "S", 0);
                c.seq = isn.wrapping_add(1);
                c.left = if kind == Kind::Long { u32::MAX } else { 0 };
                send(&mut self.inside, &f, &mut self.tally);
            }
            Kind::Udp => {
                c.left = 2 + u32::try_from(self.rng.below(5)).unwrap_or(0);
                c.next_at = now_ms;
            }
            Kind::Icmp => {
                c.left = 1 + u32::try_from(self.rng.below(3)).unwrap_or(0);
                c.next_at = now_ms;
            }
        }
        self.tally.started[kind as usize] += 1;
        self.clients.insert(key, c);
    }

    /// Clients whose turn it is send.
    fn tick(&mut self, now_ms: u64) {
        let mut out = Vec::new();
        for (&(src, sport, _), c) in &mut self.clients {
            if c.next_at > now_ms {
                continue;
            }
            match c.kind {
                Kind::Long if c.state == CState::Established => {
                    out.push(tcp_frame(
                        TO_GW,
                        src,
                        sport,
                        c.server,
                        c.dport,
                        c.seq,
                        Some(c.ack),
                        "P",
                        512,
                    ));
                    c.seq = c.seq.wrapping_add(512);
                    c.next_at = now_ms + 10;
                }
                Kind::Udp if c.left > 0 => {
                    out.push(udp_frame(TO_GW, src, sport, c.server, c.dport, 40));
                    c.left -= 1;
                    c.next_at = u64::MAX;
                }
                Kind::Icmp if c.left > 0 => {
                    let seq = u16::try_from(c.left).unwrap_or(0);
                    out.push(icmp_frame(TO_GW, src, c.server, sport, seq, false));
                    c.left -= 1;
                    c.next_at = u64::MAX;
                }
                _ => c.next_at = u64::MAX,
            }
        }
        for f in out {
            send(&mut self.inside, &f, &mut self.tally);
        }
    }

    /// The outside servers answer what the gateway emitted on the outside port.
    fn serve_outside(&mut self) {
        let mut replies = Vec::new();
        while let Some(f) = self.outside.recv_vec() {
            self.tally.frames_out += 1;
            let Ok(p) = SlicedPacket::from_ethernet(&f) else {
                continue;
            };
            let Some(NetSlice::Ipv4(ip)) = &p.net else {
                continue;
            };
            let (src, dst) = (ip.header().source(), ip.header().destination());
            match &p.transport {
                Some(TransportSlice::Tcp(t)) => {
                    let key = (src, t.source_port(), dst, t.destination_port());
                    let len = u32::try_from(t.payload().len()).unwrap_or(0);
                    let (sp, dp) = (t.destination_port(), t.source_port());
                    if t.rst() {
                        self.servers.remove(&key);
                    } else if t.syn() && !t.ack() {
                        let isn = self.rng.u32();
                        let ack = t.sequence_number().wrapping_add(1);
                        self.servers.insert(
                            key,
                            Server {
                                seq: isn.wrapping_add(1),
                                ack,
                                closing: false,
                            },
                        );
                        replies.push(tcp_frame(
                            FROM_PEER,
                            dst,
                            sp,
                            src,
                            dp,
                            isn,
                            Some(ack),
                            "S",
                            0,
                        ));
                    } else if let Some(s) = self.servers.get_mut(&key) {
                        if len > 0 {
                            s.ack = t.sequence_number().wrapping_add(len);
                            // Long flows get a bigger answer than short requests.
                            let answer = if t.destination_port() == 443 {
                                1024
                            } else {
                                300
                            };
                            replies.push(tcp_frame(
                                FROM_PEER,
                                dst,
                                sp,
                                src,
                                dp,
                                s.seq,
                                Some(s.ack),
                                "P",
                                answer,
                            ));
                            s.seq = s.seq.wrapping_add(u32::try_from(answer).unwrap_or(0));
                        }
                        if t.fin() {
                            s.ack = t.sequence_number().wrapping_add(len).wrapping_add(1);
                            replies.push(tcp_frame(
                                FROM_PEER,
                                dst,
                                sp,
                                src,
                                dp,
                                s.seq,
                                Some(s.ack),
                                "F",
                                0,
                            ));
                            s.seq = s.seq.wrapping_add(1);
                            s.closing = true;
                        } else if len == 0 && s.closing && t.acknowledgment_number() == s.seq {
                            self.servers.remove(&key);
                        }
                    }
                }
                Some(TransportSlice::Udp(u)) => {
                    replies.push(udp_frame(
                        FROM_PEER,
                        dst,
                        u.destination_port(),
                        src,
                        u.source_port(),
                        120,
                    ));
                }
                Some(TransportSlice::Icmpv4(i)) => {
                    if let etherparse::Icmpv4Type::EchoRequest(e) = i.icmp_type() {
                        replies.push(icmp_frame(FROM_PEER, dst, src, e.id, e.seq, true));
                    }
                }
                _ => {}
            }
        }
        for f in replies {
            send(&mut self.outside, &f, &mut self.tally);
        }
    }

    /// Inside hosts react to what the gateway delivered on the inside port.
    fn serve_inside(&mut self, now_ms: u64) {
        let mut out = Vec::new();
        while let Some(f) = self.inside.recv_vec() {
            self.tally.frames_out += 1;
            let Ok(p) = SlicedPacket::from_ethernet(&f) else {
                continue;
            };
            let Some(NetSlice::Ipv4(ip)) = &p.net else {
                continue;
            };
            let (src, dst) = (ip.header().source(), ip.header().destination());
            match &p.transport {
                Some(TransportSlice::Tcp(t)) => {
                    let key = (dst, t.destination_port(), proto::TCP);
                    let Some(c) = self.clients.get_mut(&key) else {
                        continue;
                    };
                    let sport = t.destination_port();
                    let len = u32::try_from(t.payload().len()).unwrap_or(0);
                    if t.rst() {
                        self.clients.remove(&key);
                        continue;
                    }
                    if t.syn() && t.ack() && c.state == CState::SynSent {
                        c.ack = t.sequence_number().wrapping_add(1);
                        c.state = CState::Established;
                        out.push(tcp_frame(
                            TO_GW,
                            dst,
                            sport,
                            src,
                            c.dport,
                            c.seq,
                            Some(c.ack),
                            "",
                            0,
                        ));
                        if c.kind == Kind::Short {
                            out.push(tcp_frame(
                                TO_GW,
                                dst,
                                sport,
                                src,
                                c.dport,
                                c.seq,
                                Some(c.ack),
                                "P",
                                120,
                            ));
                            c.seq = c.seq.wrapping_add(120);
                        } else {
                            c.next_at = now_ms + 5;
                        }
                        continue;
                    }
                    if len > 0 {
                        c.ack = t.sequence_number().wrapping_add(len);
                        if c.kind == Kind::Short && c.state == CState::Established {
                            // Response received: close.
                            out.push(tcp_frame(
                                TO_GW,
                                dst,
                                sport,
                                src,
                                c.dport,
                                c.seq,
                                Some(c.ack),
                                "F",
                                0,
                            ));
                            c.seq = c.seq.wrapping_add(1);
                            c.state = CState::FinWait;
                        }
                    }
                    if t.fin() {
                        c.ack = t.sequence_number().wrapping_add(len).wrapping_add(1);
                        out.push(tcp_frame(
                            TO_GW,
                            dst,
                            sport,
                            src,
                            c.dport,
                            c.seq,
                            Some(c.ack),
                            "",
                            0,
                        ));
                        self.clients.remove(&key);
                        self.tally.torn_down += 1;
                    }
                }
                Some(TransportSlice::Udp(u)) => {
                    let key = (dst, u.destination_port(), proto::UDP);
                    if let Some(c) = self.clients.get_mut(&key) {
                        if c.left == 0 {
                            self.clients.remove(&key);
                            self.tally.udp_done += 1;
                        } else {
                            c.next_at = now_ms + 20;
                        }
                    }
                }
                Some(TransportSlice::Icmpv4(i)) => {
                    if let etherparse::Icmpv4Type::EchoReply(e) = i.icmp_type() {
                        let key = (dst, e.id, proto::ICMP);
                        self.tally.pings_answered += 1;
                        if let Some(c) = self.clients.get_mut(&key) {
                            if c.left == 0 {
                                self.clients.remove(&key);
                            } else {
                                c.next_at = now_ms + 100;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        for f in out {
            send(&mut self.inside, &f, &mut self.tally);
        }
    }
}

/// What the dataplane reports once a second.
#[derive(Debug, Default, Clone)]
struct Snapshot {
    in_software: usize,
    in_hardware: usize,
    created: u64,
    offloads: u64,
    expired: u64,
    destroyed: u64,
    remapped: Vec<u64>,
    p50_us: f64,
    p99_us: f64,
    samples: usize,
    slow_path_rx: u64,
    returned: u64,
    insert_failures: u64,
    dropped_invalid: u64,
    dropped_other: u64,
}

fn snapshot(control: &AgentControl) -> Option<Snapshot> {
    let AgentControl::Dataplane(c) = control else {
        return None;
    };
    c.call(|core, now| {
        let counts = core.worker.state_counts();
        let mut remapped = Vec::new();
        let mut live = 0;
        for (_, conn) in core.worker.conntrack().table().iter(now) {
            live += 1;
            let [o, r] = conn.tuples;
            // Masquerade picked another source port than the host's.
            if o.proto != proto::ICMP && r.dst_l4 != o.src_l4 {
                remapped.push(conn.id);
            }
        }
        let mut lat = core.offload_latencies_ns.clone();
        lat.sort_unstable();
        let pct = |p: usize| -> f64 {
            if lat.is_empty() {
                return 0.0;
            }
            let i = ((lat.len() - 1) * p / 100).min(lat.len() - 1);
            lat[i] as f64 / 1e3
        };
        let s = core.worker.stats();
        Ok(Snapshot {
            in_software: live - counts[2].min(live),
            in_hardware: counts[2],
            created: core.worker.conntrack().stats().created,
            offloads: core.offloads,
            expired: core.destroyed.get("expired").copied().unwrap_or(0),
            destroyed: core.destroyed.values().sum(),
            remapped,
            p50_us: pct(50),
            p99_us: pct(99),
            samples: lat.len(),
            slow_path_rx: s.rx,
            returned: s.returned,
            insert_failures: s.insert_table_full + s.insert_collision + s.insert_error,
            dropped_invalid: s.drop_invalid,
            dropped_other: s.drop_other + s.drop_tx,
        })
    })
    .ok()
}

/// The socket the demo serves on: `--socket`, else the default when its folder can be
/// made, else one in the temporary folder.
fn demo_socket(socket: Option<&Path>) -> PathBuf {
    if let Some(s) = socket {
        return s.to_path_buf();
    }
    let default = PathBuf::from(config::DEFAULT_SOCKET_PATH);
    let dir_ok = default.parent().is_some_and(|d| {
        std::fs::create_dir_all(d).is_ok()
            && !std::fs::metadata(d).is_ok_and(|m| m.permissions().readonly())
    });
    let writable = dir_ok
        && default.parent().is_some_and(|d| {
            let probe = d.join(".ctoffload-demo-probe");
            let ok = std::fs::write(&probe, b"").is_ok();
            let _ = std::fs::remove_file(&probe);
            ok
        });
    if writable {
        default
    } else {
        std::env::temp_dir().join("ctoffload-demo.sock")
    }
}

/// `ctoffload demo`.
#[must_use]
pub fn main(args: &DemoArgs, socket: Option<&Path>) -> ExitCode {
    super::agent::init_logging_with("warn");
    let mut cfg = match config::parse(CONFIG) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "ctoffload demo: built-in configuration: {}",
                super::error_chain(&e)
            );
            return ExitCode::FAILURE;
        }
    };
    let sock = demo_socket(socket);
    cfg.api.socket.clone_from(&sock);
    let metrics = crate::metrics::MetricsHandle::default();
    // Idle flows leave hardware after 5 s instead of Linux's 30 s, so that a short run
    // shows them aging out of the NIC as well.
    let mut dp = match sim::start_with(&cfg, metrics.clone(), |w| {
        w.policy.tcp_idle_ns = HW_IDLE_NS;
        w.policy.udp_idle_ns = HW_IDLE_NS;
    }) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("ctoffload demo: {}", super::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let mut wire = std::mem::take(&mut dp.wire);
    let (Some(outside), Some(inside)) = (wire.pop(), wire.pop()) else {
        eprintln!("ctoffload demo: the simulator has fewer than two ports");
        return ExitCode::FAILURE;
    };
    let control = AgentControl::Dataplane(Arc::clone(&dp.control));
    let agent = Arc::new(Agent::with_control(
        PathBuf::from("<built-in demo configuration>"),
        cfg,
        control.clone(),
        None,
        metrics,
    ));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ctoffload demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = CancellationToken::new();
    let server = rt.spawn(super::agent::serve(Arc::clone(&agent), token.clone()));

    out!("ctoffload demo: the agent on the simulated NIC (nic-sim CTO-1 model, in-process)");
    out!(
        "  inside 10.0.0.0/24 (port 0) --masquerade to {}--> outside (port 1); {} hosts, {} servers",
        std::net::Ipv4Addr::from(PUBLIC),
        HOSTS,
        SERVERS
    );
    out!(
        "  traffic: {} long-lived TCP flows, {} short TCP connections/s, {} UDP flows/s, ICMP echo; seed {}",
        args.long_flows,
        args.rate,
        args.rate,
        args.seed
    );
    out!(
        "  the API is live while it runs; from another terminal:\n    ctoffload --socket {} flows\n",
        sock.display()
    );
    let _ = std::io::stdout().flush();

    let mut t = Traffic::new(args.seed, inside, outside);
    let start = Instant::now();
    let duration = Duration::from_secs(args.duration);
    let mut next_report = 1;
    let mut remapped: HashSet<u64> = HashSet::new();
    let mut last_offloads = 0;
    let (mut short_due, mut udp_due, mut icmp_due) = (0.0f64, 0.0f64, 0.0f64);
    let mut last_ms = 0u64;
    let rate = f64::from(args.rate);
    let mut interrupted = false;
    let mut last = Snapshot::default();
    while start.elapsed() < duration {
        if server.is_finished() {
            // SIGINT/SIGTERM (the server's signal handlers) or a server failure.
            interrupted = true;
            break;
        }
        let now_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
        // Long flows open in the first second, staggered.
        let long_open = t.tally.started[Kind::Long as usize];
        let long_due =
            (u64::from(args.long_flows) * (now_ms + 1) / 1000).min(u64::from(args.long_flows));
        for _ in long_open..long_due {
            t.open(Kind::Long, now_ms);
        }
        let dt = (now_ms - last_ms) as f64 / 1000.0;
        last_ms = now_ms;
        short_due += rate * dt;
        udp_due += rate * dt;
        icmp_due += rate / 10.0 * dt;
        while short_due >= 1.0 {
            t.open(Kind::Short, now_ms);
            short_due -= 1.0;
        }
        while udp_due >= 1.0 {
            t.open(Kind::Udp, now_ms);
            udp_due -= 1.0;
        }
        while icmp_due >= 1.0 {
            t.open(Kind::Icmp, now_ms);
            icmp_due -= 1.0;
        }
        t.tick(now_ms);
        t.serve_outside();
        t.serve_inside(now_ms);
        if now_ms >= next_report * 1000 {
            if let Some(s) = snapshot(&control) {
                remapped.extend(s.remapped.iter().copied());
                let hw = dp.sim_stats().map_or(0, |x| x.hits);
                out!(
                    "[{:>3}s] flows: {:>5} in software, {:>5} in hardware | offloads/s {:>5} | aged {:>5} | packets: {:>8} hardware, {:>7} slow path | NAT port collisions resolved {:>4}",
                    next_report,
                    s.in_software,
                    s.in_hardware,
                    s.offloads - last_offloads,
                    s.expired,
                    hw,
                    s.slow_path_rx,
                    remapped.len()
                );
                last_offloads = s.offloads;
                last = s;
            }
            let _ = std::io::stdout().flush();
            next_report += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last answers through before the summary.
    let settle = Instant::now();
    while !interrupted && settle.elapsed() < Duration::from_millis(200) {
        t.serve_outside();
        t.serve_inside(u64::MAX / 2);
        std::thread::sleep(Duration::from_millis(2));
    }
    let s = snapshot(&control).unwrap_or(last);
    remapped.extend(s.remapped.iter().copied());
    let sim_stats = dp.sim_stats();
    token.cancel();
    let served = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), server).await });
    let mut status = ExitCode::SUCCESS;
    if let Ok(Ok(Err(e))) = served {
        eprintln!("ctoffload demo: {}", super::error_chain(&e));
        status = ExitCode::FAILURE;
    }
    dp.stop();
    let (hits, punts) = sim_stats.map_or((0, 0), |x| (x.hits, x.punts));
    let g = &t.tally;
    out!();
    out!(
        "summary ({:.1} s{}):",
        elapsed,
        if interrupted { ", interrupted" } else { "" }
    );
    out!("| measure | value |");
    out!("| --- | --- |");
    out!(
        "| connections tracked | {} (long TCP {}, short TCP {}, UDP {}, ICMP {}) |",
        s.created,
        g.started[Kind::Long as usize],
        g.started[Kind::Short as usize],
        g.started[Kind::Udp as usize],
        g.started[Kind::Icmp as usize]
    );
    out!("| offloaded to hardware | {} |", s.offloads);
    out!("| returned to software | {} |", s.returned);
    out!("| hardware insert failures | {} |", s.insert_failures);
    out!("| TCP connections torn down (FIN) | {} |", g.torn_down);
    out!("| expired | {} |", s.expired);
    out!("| destroyed (all reasons) | {} |", s.destroyed);
    out!("| NAT port collisions resolved | {} |", remapped.len());
    out!(
        "| slow-path drops: invalid / other | {} / {} |",
        s.dropped_invalid,
        s.dropped_other
    );
    out!("| packets in hardware | {hits} |");
    out!("| packets in software (slow path) | {punts} |");
    out!(
        "| time to offload p50 / p99 | {:.1} / {:.1} µs ({} samples) |",
        s.p50_us,
        s.p99_us,
        s.samples
    );
    out!(
        "| frames injected / delivered | {} / {} ({} not injected: port queue full) |",
        g.frames_in,
        g.frames_out,
        g.send_drops
    );
    out!(
        "| UDP flows answered / ICMP echoes answered | {} / {} |",
        g.udp_done,
        g.pings_answered
    );
    let _ = std::io::stdout().flush();
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_frames_parse_and_are_not_runts() {
        let f = tcp_frame(
            TO_GW,
            host(1),
            40_001,
            [198, 51, 100, 10],
            80,
            7,
            None,
            "S",
            0,
        );
        assert_eq!(f.len(), 60);
        let p = SlicedPacket::from_ethernet(&f).map_err(|e| e.to_string());
        assert!(
            matches!(
                p.as_ref().map(|p| &p.transport),
                Ok(Some(TransportSlice::Tcp(_)))
            ),
            "{} {:?}",
            f.len(),
            p.err()
        );
    }
}
