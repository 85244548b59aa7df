//! 64-byte UDP forwarding through a gateway namespace, three ways in one run: the
//! kernel (`ip_forward=1` + nftables masquerade), the software backend's forwarding
//! loop over `AF_PACKET` ports, and the same loop over AF_XDP ports; at 1 and 100k
//! flows. For each: the best lossless-ish rate (at most 0.5 % lost, found by bisection
//! of the offered rate) and the rate under overload (the sender at full speed).
//!
//! ```text
//!  sender ns ─veth─ gw ns (kernel or the forwarding loop) ─veth─ receiver ns
//!  raw AF_PACKET sendmmsg, 60-byte frames        receiver: nftables drops at prerouting,
//!  (+4 FCS = 64), UDP to 198.51.100.2            frames counted by its veth's rx counter
//!  offered = the sender veth's tx counter
//! ```
//!
//! CPU placement (2 cores): the sender thread on CPU 0, the forwarding loop on CPU 1;
//! for the kernel, RPS steers the gateway's receive processing to CPU 1. The veth's
//! receive side (native XDP and the copy into the UMEM, or the packet socket's copy) runs
//! on the sender's CPU in all agent modes. The receiver's drop costs the forwarding CPU.
//!
//! Run as root: `cargo run --release -p ctoffload-tests --bin xdp_forward_bench`.
//! Settings (environment): `XDP_BENCH_REPEATS` (3), `XDP_BENCH_TRIAL_MS` (300),
//! `XDP_BENCH_FLOWS` (`1,100000`), `XDP_BENCH_METHODS` (`kernel,af_packet,af_xdp`).
//! Prints a table, then one JSON line with the same figures.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ctoffload_agent::gateway::forward::{ForwarderConfig, SoftwareForwarder};
use ctoffload_agent::gateway::{Gateway, GatewayConfig, PortConfig};
use ctoffload_agent::port::af_xdp::{AfXdpConfig, IoChosen, IoRequest, open_ports};
use ctoffload_agent::port::{AfPacket, FrameBatch, PacketPort};
use ctoffload_fallback_sw::conntrack::{Config, Conntrack};
use ctoffload_fallback_sw::nat::rules::{NatAction, NatFlags, NatRule, RuleMatch};
use ctoffload_tests::netns::{NetNs, is_root, unique_name};

const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0x79, 1, 2];
const GW_IN_MAC: [u8; 6] = [0x02, 0, 0, 0x79, 1, 1];
const GW_OUT_MAC: [u8; 6] = [0x02, 0, 0, 0x79, 2, 1];
const SRC: [u8; 4] = [10, 79, 0, 2];
const DST: [u8; 4] = [198, 51, 100, 2];
/// Flows per destination port (the rest of a flow's identity is its source port).
const PORTS_PER_DST: usize = 50_000;
/// Largest share of offered frames that may be lost in a "lossless" trial.
const MAX_LOSS: f64 = 0.005;
const BISECT_STEPS: usize = 6;
const SEND_BATCH: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Kernel,
    AfPacket,
    AfXdp,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::AfPacket => "af_packet",
            Self::AfXdp => "af_xdp",
        }
    }
}

struct Settings {
    repeats: usize,
    trial: Duration,
    flows: Vec<usize>,
    methods: Vec<Method>,
}

fn env_or<T: std::str::FromStr>(key: &str, default: T) -> Result<T, String> {
    std::env::var(key).map_or(Ok(default), |v| {
        v.parse().map_err(|_| format!("{key}={v}: not a number"))
    })
}

fn settings() -> Result<Settings, String> {
    let flows = std::env::var("XDP_BENCH_FLOWS").unwrap_or_else(|_| "1,100000".into());
    let flows = flows
        .split(',')
        .map(|f| {
            f.trim()
                .parse::<usize>()
                .ok()
                .filter(|&n| (1..=10 * PORTS_PER_DST).contains(&n))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or("XDP_BENCH_FLOWS: comma-separated counts, 1 to 500000")?;
    let methods =
        std::env::var("XDP_BENCH_METHODS").unwrap_or_else(|_| "kernel,af_packet,af_xdp".into());
    let methods = methods
        .split(',')
        .map(|m| match m.trim() {
            "kernel" => Ok(Method::Kernel),
            "af_packet" => Ok(Method::AfPacket),
            "af_xdp" => Ok(Method::AfXdp),
            other => Err(format!("XDP_BENCH_METHODS: unknown method {other:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Settings {
        repeats: env_or("XDP_BENCH_REPEATS", 3usize)?.max(1),
        trial: Duration::from_millis(env_or("XDP_BENCH_TRIAL_MS", 300u64)?.max(50)),
        flows,
        methods,
    })
}

fn mac_str(m: [u8; 6]) -> String {
    m.map(|b| format!("{b:02x}")).join(":")
}

/// 60-byte Ethernet/IPv4/UDP frames of `flows` flows (UDP checksum 0: none).
fn frames(flows: usize) -> Vec<[u8; 60]> {
    (0..flows)
        .map(|i| {
            let mut f = [0u8; 60];
            f[0..6].copy_from_slice(&GW_IN_MAC);
            f[6..12].copy_from_slice(&SENDER_MAC);
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip = &mut f[14..34];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&46u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&SRC);
            ip[16..20].copy_from_slice(&DST);
            let sum = ip
                .chunks(2)
                .fold(0u32, |s, c| s + u32::from(u16::from_be_bytes([c[0], c[1]])));
            let sum = (sum & 0xffff) + (sum >> 16);
            let sum = (sum & 0xffff) + (sum >> 16);
            ip[10..12].copy_from_slice(&(!u16::try_from(sum).unwrap_or(0)).to_be_bytes());
            let sport = u16::try_from(1024 + i % PORTS_PER_DST).unwrap_or(0);
            let dport = u16::try_from(9000 + i / PORTS_PER_DST).unwrap_or(0);
            f[34..36].copy_from_slice(&sport.to_be_bytes());
            f[36..38].copy_from_slice(&dport.to_be_bytes());
            f[38..40].copy_from_slice(&26u16.to_be_bytes());
            f
        })
        .collect()
}

/// The three namespaces and their interfaces.
struct Bed {
    sender: NetNs,
    gw: NetNs,
    receiver: NetNs,
    s_if: String,
    g_if: [String; 2],
    r_if: String,
}

fn cmd(r: Result<String, ctoffload_tests::netns::CommandError>) -> Result<String, String> {
    r.map_err(|e| e.to_string())
}

fn bed(method: Method) -> Result<Bed, String> {
    let sender = NetNs::new(&unique_name("bs")).map_err(|e| e.to_string())?;
    let gw = NetNs::new(&unique_name("bg")).map_err(|e| e.to_string())?;
    let receiver = NetNs::new(&unique_name("br")).map_err(|e| e.to_string())?;
    let [s_if, g0, g1, r_if] = ["bs", "bg0", "bg1", "br"].map(unique_name);
    let host = |args: &[&str]| {
        ctoffload_tests::netns::run_bounded("ip", args, ctoffload_tests::netns::COMMAND_TIMEOUT)
            .map(drop)
            .map_err(|e| e.to_string())
    };
    host(&[
        "link",
        "add",
        &s_if,
        "address",
        &mac_str(SENDER_MAC),
        "netns",
        sender.name(),
        "type",
        "veth",
        "peer",
        "name",
        &g0,
        "address",
        &mac_str(GW_IN_MAC),
        "netns",
        gw.name(),
    ])?;
    host(&[
        "link",
        "add",
        &r_if,
        "netns",
        receiver.name(),
        "type",
        "veth",
        "peer",
        "name",
        &g1,
        "address",
        &mac_str(GW_OUT_MAC),
        "netns",
        gw.name(),
    ])?;
    cmd(sender.ip(&["link", "set", &s_if, "up"]))?;
    cmd(receiver.ip(&["addr", "add", "198.51.100.2/24", "dev", &r_if]))?;
    cmd(receiver.ip(&["link", "set", &r_if, "up"]))?;
    // Counted by the veth, then dropped before any routing or socket lookup.
    let drop_all = "add table ip sink\nadd chain ip sink pre { type filter hook prerouting priority -300; policy drop; }\n";
    nft(&receiver, drop_all)?;
    for dev in [&g0, &g1] {
        cmd(gw.ip(&["link", "set", dev, "up"]))?;
    }
    if method == Method::Kernel {
        cmd(gw.ip(&["addr", "add", "10.79.0.1/24", "dev", &g0]))?;
        cmd(gw.ip(&["addr", "add", "198.51.100.1/24", "dev", &g1]))?;
        gw.sysctl(&["net.ipv4.ip_forward=1"])
            .map_err(|e| e.to_string())?;
        nft(
            &gw,
            &format!(
                "add table ip nat\nadd chain ip nat post {{ type nat hook postrouting priority 100; }}\nadd rule ip nat post oifname \"{g1}\" masquerade\n"
            ),
        )?;
        // The gateway's receive processing (forwarding, NAT) on CPU 1.
        cmd(gw.exec(
            "sh",
            &[
                "-c",
                &format!("echo 2 > /sys/class/net/{g0}/queues/rx-0/rps_cpus"),
            ],
        ))?;
    } else {
        gw.sysctl(&["net.ipv4.ip_forward=0"])
            .map_err(|e| e.to_string())?;
    }
    Ok(Bed {
        sender,
        gw,
        receiver,
        s_if,
        g_if: [g0, g1],
        r_if,
    })
}

/// Loads an nftables ruleset in `ns` from a script file.
fn nft(ns: &NetNs, script: &str) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("{}.nft", unique_name("xb")));
    std::fs::write(&path, script).map_err(|e| e.to_string())?;
    let r = cmd(ns.exec("nft", &["-f", &path.to_string_lossy()]));
    let _ = std::fs::remove_file(&path);
    r.map(drop)
}

/// A packet counter of interface `dev` in `ns` (`dir`: `rx` or `tx`).
fn counter(ns: &NetNs, dev: &str, dir: &str) -> Result<u64, String> {
    let out = cmd(ns.ip(&["-s", "-j", "link", "show", "dev", dev]))?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    v.pointer(&format!("/0/stats64/{dir}/packets"))
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| format!("no {dir} counter in {out}"))
}

/// Frames the sender's veth sent and the receiver's veth took in so far.
fn counters(b: &Bed) -> Result<(u64, u64), String> {
    Ok((
        counter(&b.sender, &b.s_if, "tx")?,
        counter(&b.receiver, &b.r_if, "rx")?,
    ))
}

fn pin_to(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("warning: cannot pin to CPU {cpu}: {e}");
    }
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// One sending trial: `rate` frames/s (`None`: as fast as possible) for `dur`.
struct Trial {
    rate: Option<f64>,
    dur: Duration,
    reply: mpsc::Sender<Result<u64, String>>,
}

/// The sender thread: an `AF_PACKET` socket in the sender namespace, cycling over the
/// flows' frames, batches of 32 per `sendmmsg`. Returns frames handed to the socket per
/// trial (what left is counted at the sender's veth).
fn start_sender(
    b: &Bed,
    flows: usize,
) -> Result<(mpsc::Sender<Trial>, JoinHandle<std::io::Result<()>>), String> {
    let (tx, rx) = mpsc::channel::<Trial>();
    let s_if = b.s_if.clone();
    let h = b
        .sender
        .spawn_inside(move || {
            if cpus() > 1 {
                pin_to(0);
            }
            let frames = frames(flows);
            let mut port = match AfPacket::open(&s_if) {
                Ok(p) => p,
                Err(e) => {
                    for t in rx {
                        let _ = t.reply.send(Err(e.to_string()));
                    }
                    return;
                }
            };
            let mut batch = FrameBatch::new(SEND_BATCH);
            let mut next = 0usize;
            for t in rx {
                let start = Instant::now();
                let mut sent = 0u64;
                let mut result = Ok(());
                while start.elapsed() < t.dur {
                    if let Some(rate) = t.rate {
                        // Paced: the next batch is due when the rate says so.
                        #[allow(clippy::cast_precision_loss)]
                        let due = Duration::from_secs_f64(sent as f64 / rate);
                        let now = start.elapsed();
                        if due > now {
                            if due - now > Duration::from_micros(200) {
                                thread::sleep(due - now - Duration::from_micros(100));
                            }
                            continue;
                        }
                    }
                    batch.clear();
                    for _ in 0..SEND_BATCH {
                        let _ = batch.push(&frames[next]);
                        next = (next + 1) % frames.len();
                    }
                    if let Err(e) = port.send_batch(&batch) {
                        result = Err(e.to_string());
                        break;
                    }
                    sent += SEND_BATCH as u64;
                }
                let _ = t.reply.send(result.map(|()| sent));
            }
        })
        .map_err(|e| e.to_string())?;
    // The thread returns `()`; its namespace entry result is the handle's.
    let h = thread::spawn(move || {
        h.join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sender panicked")))
    });
    Ok((tx, h))
}

/// The agent's forwarding loop in the gateway namespace, on CPU 1.
struct Agent {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<std::io::Result<Result<(), String>>>>,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn start_agent(b: &Bed, request: IoRequest) -> Result<(Agent, IoChosen), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let (names, stop2) = (b.g_if.clone(), Arc::clone(&stop));
    let handle =
        b.gw.spawn_inside(move || -> Result<(), String> {
            if cpus() > 1 {
                pin_to(1);
            }
            let (ports, chosen) = match open_ports(&[names[0].as_str(), names[1].as_str()], request)
            {
                Ok(x) => x,
                Err(e) => {
                    let _ = tx.send(Err(e.to_string()));
                    return Ok(());
                }
            };
            let _ = tx.send(Ok(chosen));
            let [n0, n1] = names;
            let gateway = Gateway::new(GatewayConfig {
                ports: vec![
                    PortConfig {
                        name: n0,
                        mac: GW_IN_MAC,
                        addrs: vec![([10, 79, 0, 1], 24)],
                    },
                    PortConfig {
                        name: n1,
                        mac: GW_OUT_MAC,
                        addrs: vec![([198, 51, 100, 1], 24)],
                    },
                ],
                ..GatewayConfig::default()
            })
            .map_err(|e| e.to_string())?;
            let mut ct = Conntrack::new(Config {
                max_connections: 262_144,
                ..Config::default()
            });
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
            let mut fwd = SoftwareForwarder::new(ForwarderConfig::default(), ports, gateway, ct);
            fwd.run(&stop2, &ctoffload_tests::topology::forwarder_clock())
                .map_err(|e| e.to_string())
        })
        .map_err(|e| e.to_string())?;
    let agent = Agent {
        stop,
        handle: Some(handle),
    };
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(chosen)) => Ok((agent, chosen)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err("the forwarding loop did not open its ports".into()),
    }
}

/// Offered and delivered frames/s of one trial.
#[derive(Debug, Clone, Copy)]
struct Rates {
    offered: f64,
    delivered: f64,
}

fn trial(
    b: &Bed,
    sender: &mpsc::Sender<Trial>,
    rate: Option<f64>,
    dur: Duration,
) -> Result<Rates, String> {
    let (tx0, rx0) = counters(b)?;
    let (reply, answer) = mpsc::channel();
    sender
        .send(Trial { rate, dur, reply })
        .map_err(|_| "sender gone")?;
    answer.recv().map_err(|_| "sender gone")??;
    // In-flight frames drain from the rings.
    thread::sleep(Duration::from_millis(100));
    let (tx1, rx1) = counters(b)?;
    let (sent, got) = (tx1.saturating_sub(tx0), rx1.saturating_sub(rx0));
    let secs = dur.as_secs_f64();
    #[allow(clippy::cast_precision_loss)]
    let r = Rates {
        offered: sent as f64 / secs,
        delivered: got.min(sent) as f64 / secs,
    };
    if std::env::var_os("XDP_BENCH_VERBOSE").is_some() {
        eprintln!("trial {rate:?}: sent {sent}, received {got}: {r:?}");
    }
    Ok(r)
}

/// One repeat: the rate under overload, then the best rate with at most [`MAX_LOSS`]
/// lost, bisecting the offered rate between 0 and the sender's full speed.
/// Returns (lossless, overload) delivered rates and the sender's full-speed rate.
fn measure(b: &Bed, sender: &mpsc::Sender<Trial>, dur: Duration) -> Result<(f64, Rates), String> {
    let full = trial(b, sender, None, dur)?;
    let (mut lo, mut hi, mut best) = (0.0f64, full.offered, 0.0f64);
    if full.delivered >= full.offered * (1.0 - MAX_LOSS) {
        // Not overloaded: the sender is the limit.
        return Ok((full.delivered, full));
    }
    for _ in 0..BISECT_STEPS {
        let mid = f64::midpoint(lo, hi);
        let r = trial(b, sender, Some(mid), dur)?;
        if r.delivered >= r.offered * (1.0 - MAX_LOSS) {
            lo = mid;
            best = best.max(r.delivered);
        } else {
            hi = mid;
        }
    }
    Ok((best, full))
}

#[derive(Debug)]
struct Row {
    method: Method,
    io: String,
    flows: usize,
    lossless: Vec<f64>,
    overload: Vec<f64>,
    offered: Vec<f64>,
}

fn min_median(v: &[f64]) -> (f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (
        s.first().copied().unwrap_or(0.0),
        s.get(s.len() / 2).copied().unwrap_or(0.0),
    )
}

fn run_method(method: Method, cfg: &Settings, rows: &mut Vec<Row>) -> Result<(), String> {
    for &flows in &cfg.flows {
        let b = bed(method)?;
        let (_agent, io) = match method {
            Method::Kernel => (None, "ip_forward + nft masquerade".to_owned()),
            Method::AfPacket => {
                let (a, _) = start_agent(&b, IoRequest::AfPacket)?;
                (Some(a), "AF_PACKET recvmmsg/sendmmsg".to_owned())
            }
            Method::AfXdp => {
                let (a, chosen) = start_agent(&b, IoRequest::AfXdp(AfXdpConfig::default()))?;
                let io = match chosen {
                    IoChosen::AfXdp(mode) => format!("AF_XDP, {mode} XDP, copy mode"),
                    IoChosen::AfPacket { fallback } => {
                        format!("AF_PACKET (AF_XDP failed: {fallback:?})")
                    }
                };
                (Some(a), io)
            }
        };
        let (sender, sender_thread) = start_sender(&b, flows)?;
        // Warm-up: ARP, and every flow's connection created before measuring.
        trial(&b, &sender, None, cfg.trial.max(Duration::from_millis(500)))?;
        let mut row = Row {
            method,
            io,
            flows,
            lossless: Vec::new(),
            overload: Vec::new(),
            offered: Vec::new(),
        };
        for _ in 0..cfg.repeats {
            let (lossless, overload) = measure(&b, &sender, cfg.trial)?;
            row.lossless.push(lossless);
            row.overload.push(overload.delivered);
            row.offered.push(overload.offered);
        }
        drop(sender);
        let _ = sender_thread.join();
        eprintln!(
            "{} {flows} flows: {:?} / {:?}",
            method.name(),
            row.lossless,
            row.overload
        );
        rows.push(row);
    }
    Ok(())
}

fn main() -> ExitCode {
    if !is_root() {
        eprintln!("xdp_forward_bench: needs root (network namespaces)");
        return ExitCode::FAILURE;
    }
    let cfg = match settings() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("xdp_forward_bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let mut rows = Vec::new();
    for &m in &cfg.methods {
        if let Err(e) = run_method(m, &cfg, &mut rows) {
            eprintln!("xdp_forward_bench: {}: {e}", m.name());
            return ExitCode::FAILURE;
        }
    }
    println!(
        "64-byte UDP through the gateway, forwarding on one core; Mpps, min / median of {} repeats ({} ms trials, lossless = at most {} % lost; offered = median sender full speed: a rate equal to it is sender-bound)",
        cfg.repeats,
        cfg.trial.as_millis(),
        MAX_LOSS * 100.0
    );
    println!(
        "{:<10} {:>7} {:>20} {:>20} {:>8}  I/O",
        "method", "flows", "lossless min/med", "overload min/med", "offered"
    );
    let mut json = Vec::new();
    for r in &rows {
        let (lmin, lmed) = min_median(&r.lossless);
        let (omin, omed) = min_median(&r.overload);
        let (_, offered) = min_median(&r.offered);
        println!(
            "{:<10} {:>7} {:>9.3} / {:<8.3} {:>9.3} / {:<8.3} {:>8.3}  {}",
            r.method.name(),
            r.flows,
            lmin / 1e6,
            lmed / 1e6,
            omin / 1e6,
            omed / 1e6,
            offered / 1e6,
            r.io
        );
        json.push(serde_json::json!({
            "method": r.method.name(), "flows": r.flows, "io": r.io,
            "lossless_mpps_min": lmin / 1e6, "lossless_mpps_median": lmed / 1e6,
            "overload_mpps_min": omin / 1e6, "overload_mpps_median": omed / 1e6,
            "offered_mpps_median": offered / 1e6,
        }));
    }
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "{}",
        serde_json::json!({
            "bench": "xdp_forward", "frame_bytes": 64, "repeats": cfg.repeats,
            "trial_ms": cfg.trial.as_millis(), "max_loss": MAX_LOSS, "rows": json,
        })
    );
    ExitCode::SUCCESS
}
