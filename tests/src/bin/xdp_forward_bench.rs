//! 64-byte UDP forwarding through a gateway namespace, three ways in one run: the
//! kernel (`ip_forward=1` + nftables masquerade), the software backend's forwarding
//! loop over `AF_PACKET` ports, and the same loop over AF_XDP ports; at 1 and 100k
//! flows. For each: the best lossless-ish rate (at most 0.5 % lost, found by bisection
//! of the offered rate) and the rate under overload (the sender at full speed).
//!
//! ```text
//!  inside ns (sender) ─veth─ gw ns (kernel or the forwarding loop) ─veth─ outside ns
//!  AF_XDP TX ring (copy mode) or AF_PACKET     receiver: nftables drops UDP at its
//!  sendmmsg, 60-byte frames (+4 FCS = 64)      veth's ingress hook; frames counted by
//!  offered = sender veth tx + tx_dropped       that veth's rx counter
//! ```
//!
//! The topology is `ctoffload_tests::topology` (the end-to-end tests'), the gateway
//! the same masquerade forwarder as `e2e_af_xdp`. CPU placement (2 cores): the sender
//! thread on CPU 0, everything the gateway does on CPU 1: the forwarding loop, and the
//! kernel's receive work for the gateway's inside veth (RPS for the kernel and
//! `AF_PACKET`; for AF_XDP the veth's NAPI, which runs XDP and the copy into the UMEM,
//! made threaded and its thread pinned to CPU 1). The sender, the forwarding loop, the
//! NAPI thread and `ksoftirqd` of both CPUs run at nice -20 while measured (restored
//! after), the bench in a scheduler autogroup of its own at nice -20, so that other
//! work on a shared machine takes little from them. On CPU 1 the NAPI thread and
//! `ksoftirqd/1` are `SCHED_FIFO` 50 (they run at once, as the kernel's softirq does
//! for its own forwarding) and the forwarding loop `SCHED_FIFO` 60 (above the NAPI
//! thread, which under overload would otherwise starve it; the loop sleeps in `poll`
//! when its rings are empty); policies restored after. The receiver's
//! drop runs on CPU 1 too (where the gateway transmits), for every method alike.
//!
//! Method `sink` measures the sender alone: the gateway's inside veth drops everything
//! at its ingress hook (its rx counter counts), nothing forwards.
//!
//! Run as root: `cargo run --release -p ctoffload-tests --bin xdp_forward_bench`.
//! Settings (environment): `XDP_BENCH_REPEATS` (3), `XDP_BENCH_TRIAL_MS` (300),
//! `XDP_BENCH_FLOWS` (`1,100000`), `XDP_BENCH_METHODS` (`sink,kernel,af_packet,af_xdp,af_xdp_flow`;
//! `af_xdp_flow` is AF_XDP with the XDP flow table, the flows given a reply by the
//! outside host during the warm-up and then NATed and forwarded by the XDP program; the
//! outside host's veth has GRO on, to take the redirected frames; for every method, so
//! that all gateways send to the same receiver),
//! `XDP_BENCH_SENDER` (`af_xdp` or `af_packet`), `XDP_BENCH_BUSY_POLL_US` (0: the
//! AF_XDP forwarder's busy polling, off) and `XDP_BENCH_BUSY_POLL_BUDGET` (64),
//! `XDP_BENCH_DEFER_IRQS` and `XDP_BENCH_GRO_FLUSH_US` (the forwarder's NAPI deferral,
//! `AfXdpConfig::napi_deferral`; 0 / 50: off), `XDP_BENCH_NAPI` (where the gateway's
//! inside veth runs its NAPI: `thread`, the default, a kernel thread pinned to the
//! gateway CPU; `softirq`, softirq on the gateway CPU paced by a deferral that never
//! runs out; `sender`, where the kernel runs it, on the sender's CPU, also
//! `XDP_BENCH_NO_THREADED_NAPI=1`), `XDP_BENCH_NAPI_FIFO` (50: `SCHED_FIFO` priority of the NAPI thread and
//! `ksoftirqd/1`, 0: nice -20 only), `XDP_BENCH_FORWARDER_FIFO` (60: the forwarding
//! loop's, 0: nice -20 only), `XDP_BENCH_XSK_RING` (the forwarder's XSK ring entries,
//! `AfXdpConfig`'s default), `XDP_BENCH_VERBOSE=1`.
//! Prints a table, then one JSON line with the same figures.

use std::process::ExitCode;
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use ctoffload_agent::gateway::forward::ForwarderConfig;
use ctoffload_agent::gateway::xdp_offload::{XdpFlowOffload, XdpOffloadConfig};
use ctoffload_agent::port::af_xdp::{
    AfXdpConfig, AnyPort, BusyPoll, IoChosen, IoRequest, NapiDeferral, open_ports,
};
use ctoffload_agent::port::{AfPacket, FrameBatch, PacketPort};
use ctoffload_fallback_sw::conntrack::Config;
use ctoffload_tests::netns::{CommandError, NetNs, is_root, unique_name};
use ctoffload_tests::topology::{
    ForwarderThread, GW_IN_MAC, IN_A, IN_HOST_MAC, OUT_HOST, Topology, masquerade_forwarder,
};

/// Entries of the flow table of method `af_xdp_flow` (100k flows, two directions of
/// some).
const FLOW_TABLE_ENTRIES: u32 = 262_144;
/// Frames per second offered while the outside host replies (`af_xdp_flow` warm-up).
const REFLECT_RATE: f64 = 30_000.0;

/// Flows per destination port (the rest of a flow's identity is its source port).
const PORTS_PER_DST: usize = 50_000;
/// Largest share of offered frames that may be lost in a "lossless" trial.
const MAX_LOSS: f64 = 0.005;
const BISECT_STEPS: usize = 6;
const SEND_BATCH: usize = 32;
const SENDER_CPU: usize = 0;
const GATEWAY_CPU: usize = 1;
/// The sender socket's send buffer: room for about 64k skbs of 64-byte frames in
/// flight, more than the gateway's queues hold (two backlogs of 1000 on its CPU, the
/// veth's 256-entry XDP ring).
const SENDER_SNDBUF: usize = 64 << 20;
/// Nice value of the threads measured (and of the kernel threads that serve them).
const BOOST_NICE: i32 = -20;
/// `SCHED_FIFO` priority of the gateway veth's NAPI thread (and of `ksoftirqd` on the
/// gateway CPU): it preempts ordinary work there as soon as the veth has frames, as
/// the kernel's softirq does for the kernel's own forwarding.
const NAPI_FIFO_PRIORITY: u8 = 50;
/// `SCHED_FIFO` priority of the forwarding loop: above the NAPI thread, so that under
/// overload the NAPI thread (which would run without end) cannot starve it; the loop
/// sleeps in `poll` whenever its receive rings are empty, and the NAPI thread runs.
const FORWARDER_FIFO_PRIORITY: u8 = 60;
/// The largest `defer_hard_irqs` (`S32_MAX`): the NAPI timer never hands the NAPI back
/// to the device.
const NEVER_UNDEFER: u32 = 0x7fff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    /// No gateway: the sender into a drop at the gateway's inside veth.
    Sink,
    Kernel,
    AfPacket,
    AfXdp,
    /// AF_XDP with the XDP flow table: the established flows NATed and forwarded by
    /// the XDP program (`[backend.af_xdp] flow_offload`).
    AfXdpFlow,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Sink => "sink",
            Self::Kernel => "kernel",
            Self::AfPacket => "af_packet",
            Self::AfXdp => "af_xdp",
            Self::AfXdpFlow => "af_xdp_flow",
        }
    }
}

struct Settings {
    repeats: usize,
    trial: Duration,
    flows: Vec<usize>,
    methods: Vec<Method>,
    /// The sender's I/O.
    sender: IoRequest,
    /// The AF_XDP forwarder's settings (busy polling or not, ring sizes).
    xdp: AfXdpConfig,
    /// `SCHED_FIFO` priority of the gateway veth's NAPI thread (AF_XDP) and of
    /// `ksoftirqd` on the gateway CPU, 0: they stay `SCHED_OTHER` at nice -20.
    napi_fifo: u8,
    /// `SCHED_FIFO` priority of the forwarding loop (`af_packet`, `af_xdp`), 0: stays
    /// `SCHED_OTHER` at nice -20.
    forwarder_fifo: u8,
    /// Where the gateway's inside veth runs its NAPI (AF_XDP).
    napi: NapiPlace,
}

/// Where the gateway's inside veth runs its NAPI (the XDP program and the copy into
/// the UMEM) for the AF_XDP method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NapiPlace {
    /// A kernel thread (`/sys/class/net/DEV/threaded`) pinned to the gateway CPU.
    Thread,
    /// Softirq on the gateway CPU, polled from the NAPI deferral timer: threaded (so
    /// pinned to the gateway CPU) during the warm-up, then not, the timer re-armed on
    /// that CPU by every poll; needs a deferral that never runs out (the sender's CPU
    /// would schedule the NAPI again).
    Softirq,
    /// Where the kernel runs it: veth schedules it on the sender's CPU (two cores).
    Sender,
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
    let methods = std::env::var("XDP_BENCH_METHODS")
        .unwrap_or_else(|_| "sink,kernel,af_packet,af_xdp,af_xdp_flow".into());
    let methods = methods
        .split(',')
        .map(|m| match m.trim() {
            "sink" => Ok(Method::Sink),
            "kernel" => Ok(Method::Kernel),
            "af_packet" => Ok(Method::AfPacket),
            "af_xdp" => Ok(Method::AfXdp),
            "af_xdp_flow" => Ok(Method::AfXdpFlow),
            other => Err(format!("XDP_BENCH_METHODS: unknown method {other:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sender = match std::env::var("XDP_BENCH_SENDER").as_deref() {
        // Many frames in flight (see `SENDER_SNDBUF`): copy mode sends a frame only
        // while the completion ring has room for it, and completes it when its skb is
        // freed.
        Err(_) | Ok("af_xdp") => IoRequest::AfXdp(AfXdpConfig {
            frames_per_queue: 32_768,
            ring_size: 16_384,
            ..AfXdpConfig::default()
        }),
        Ok("af_packet") => IoRequest::AfPacket,
        Ok(other) => {
            return Err(format!(
                "XDP_BENCH_SENDER: af_xdp or af_packet, not {other:?}"
            ));
        }
    };
    let busy_usecs = env_or("XDP_BENCH_BUSY_POLL_US", 0u32)?;
    let busy_budget = env_or("XDP_BENCH_BUSY_POLL_BUDGET", 64u32)?;
    let napi = match std::env::var("XDP_BENCH_NAPI").as_deref() {
        Ok("thread") => NapiPlace::Thread,
        Ok("softirq") => NapiPlace::Softirq,
        Ok("sender") => NapiPlace::Sender,
        Err(_) if std::env::var_os("XDP_BENCH_NO_THREADED_NAPI").is_some() => NapiPlace::Sender,
        Err(_) => NapiPlace::Thread,
        Ok(other) => {
            return Err(format!(
                "XDP_BENCH_NAPI: thread, softirq or sender, not {other:?}"
            ));
        }
    };
    // In softirq placement the deferral must never run out (see `NapiPlace`).
    let defer_default = if napi == NapiPlace::Softirq {
        NEVER_UNDEFER
    } else {
        0
    };
    let defer_irqs = env_or("XDP_BENCH_DEFER_IRQS", defer_default)?;
    let gro_flush_us = env_or("XDP_BENCH_GRO_FLUSH_US", 50u64)?;
    let defaults = AfXdpConfig::default();
    let ring_size = env_or("XDP_BENCH_XSK_RING", defaults.ring_size)?;
    let xdp = AfXdpConfig {
        busy_poll: (busy_usecs > 0).then_some(BusyPoll {
            usecs: busy_usecs,
            budget: busy_budget,
        }),
        napi_deferral: (defer_irqs > 0 && gro_flush_us > 0).then_some(NapiDeferral {
            defer_hard_irqs: defer_irqs,
            gro_flush_timeout: Duration::from_micros(gro_flush_us),
        }),
        ring_size,
        // Half the frames go on the fill ring: enough to fill it.
        frames_per_queue: defaults.frames_per_queue.max(ring_size.saturating_mul(2)),
        ..defaults
    };
    let napi_fifo = env_or("XDP_BENCH_NAPI_FIFO", NAPI_FIFO_PRIORITY)?;
    let forwarder_fifo = env_or("XDP_BENCH_FORWARDER_FIFO", FORWARDER_FIFO_PRIORITY)?;
    if napi_fifo > 99 || forwarder_fifo > 99 {
        return Err("XDP_BENCH_*_FIFO: a SCHED_FIFO priority, 1 to 99 (0: off)".into());
    }
    Ok(Settings {
        xdp,
        napi_fifo,
        forwarder_fifo,
        napi,
        repeats: env_or("XDP_BENCH_REPEATS", 3usize)?.max(1),
        trial: Duration::from_millis(env_or("XDP_BENCH_TRIAL_MS", 300u64)?.max(50)),
        flows,
        methods,
        sender,
    })
}

/// 60-byte Ethernet/IPv4/UDP frames of `flows` flows from the inside host to the
/// outside host (UDP checksum 0: none).
fn frames(flows: usize) -> Vec<[u8; 60]> {
    (0..flows)
        .map(|i| {
            let mut f = [0u8; 60];
            f[0..6].copy_from_slice(&GW_IN_MAC);
            f[6..12].copy_from_slice(&IN_HOST_MAC);
            f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
            let ip = &mut f[14..34];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&46u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 17;
            ip[12..16].copy_from_slice(&IN_A);
            ip[16..20].copy_from_slice(&OUT_HOST);
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

fn cmd<T>(r: Result<T, CommandError>) -> Result<T, String> {
    r.map_err(|e| e.to_string())
}

/// The topology, and where delivered frames are counted.
struct Bed {
    t: Topology,
    /// The drop sink is the gateway's inside veth (method `sink`), not the outside
    /// host's veth.
    sink_in_gw: bool,
}

impl Bed {
    /// The namespace and interface whose rx counter counts delivered frames.
    fn sink(&self) -> (&NetNs, &str) {
        if self.sink_in_gw {
            (&self.t.gw, &self.t.gw_in)
        } else {
            (&self.t.outside, &self.t.host_out)
        }
    }
}

/// Builds the topology for `method`: the kernel gateway or none, the drop sink, RPS.
fn bed(method: Method) -> Result<Bed, String> {
    let t = cmd(Topology::new("xb"))?;
    // Counted by the veth, then dropped at its ingress hook, before any IP processing
    // (UDP only: ARP still answers, so the gateway can resolve the outside host).
    let b = Bed {
        t,
        sink_in_gw: method == Method::Sink,
    };
    let (sink_ns, sink_if) = b.sink();
    nft(
        sink_ns,
        &format!(
            "add table netdev sink\nadd chain netdev sink in {{ type filter hook ingress device \"{sink_if}\" priority -500; }}\nadd rule netdev sink in ip protocol udp drop\n"
        ),
    )?;
    let t = &b.t;
    if method == Method::Kernel {
        cmd(t.kernel_gateway())?;
    }
    // The flow table redirects into the gateway's outside veth: its peer needs a NAPI
    // to take XDP frames (GRO on; an XDP program would do too). Every method gets the
    // same receiver, so that the comparison is of the gateways alone.
    cmd(t.outside.exec("ethtool", &["-K", &t.host_out, "gro", "on"]))?;
    if matches!(method, Method::Sink | Method::Kernel | Method::AfPacket) {
        // The gateway's receive processing (forwarding and NAT, or the packet
        // socket's copy) on CPU 1.
        cmd(t.gw.exec(
            "sh",
            &[
                "-c",
                &format!(
                    "echo {:x} > /sys/class/net/{}/queues/rx-0/rps_cpus",
                    1u32 << GATEWAY_CPU,
                    t.gw_in
                ),
            ],
        ))?;
    }
    Ok(b)
}

/// Loads an nftables ruleset in `ns` from a script file.
fn nft(ns: &NetNs, script: &str) -> Result<(), String> {
    let path = std::env::temp_dir().join(format!("{}.nft", unique_name("xb")));
    std::fs::write(&path, script).map_err(|e| e.to_string())?;
    let r = cmd(ns.exec("nft", &["-f", &path.to_string_lossy()]));
    let _ = std::fs::remove_file(&path);
    r.map(drop)
}

/// A packet counter of interface `dev` in `ns` (`key`: `rx/packets`, `tx/dropped`, ..).
fn counter(ns: &NetNs, dev: &str, keys: &[&str]) -> Result<u64, String> {
    let out = cmd(ns.ip(&["-s", "-j", "link", "show", "dev", dev]))?;
    let v: serde_json::Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    keys.iter().try_fold(0u64, |sum, key| {
        v.pointer(&format!("/0/stats64/{key}"))
            .and_then(serde_json::Value::as_u64)
            .map(|n| sum + n)
            .ok_or_else(|| format!("no {key} counter in {out}"))
    })
}

/// Frames the sender's veth sent or dropped (offered), and the sink's veth took in.
fn counters(b: &Bed) -> Result<(u64, u64), String> {
    let (ns, dev) = b.sink();
    Ok((
        counter(&b.t.inside, &b.t.host_in, &["tx/packets", "tx/dropped"])?,
        counter(ns, dev, &["rx/packets"])?,
    ))
}

fn cpus() -> usize {
    thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// Pins the calling thread to `cpu` (when there is more than one) and raises its
/// priority to [`BOOST_NICE`].
fn pin_and_boost(cpu: usize) {
    if cpus() > 1 {
        let mut set = rustix::thread::CpuSet::new();
        set.set(cpu);
        if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
            eprintln!("warning: cannot pin to CPU {cpu}: {e}");
        }
    }
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), BOOST_NICE) {
        eprintln!("warning: cannot set nice {BOOST_NICE}: {e}");
    }
}

/// Kernel threads whose name is `name` or starts with `prefix`, by process id.
fn kernel_threads(matches: impl Fn(&str) -> bool) -> Vec<rustix::process::Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| {
            let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            matches(comm.trim_end())
                .then(|| rustix::process::Pid::from_raw(pid))
                .flatten()
        })
        .collect()
}

/// Raised priority (and, for some, a CPU or a real-time policy) of kernel threads
/// while measuring; the previous nice values and policies come back when dropped.
struct Boosted {
    saved: Vec<(rustix::process::Pid, i32)>,
    saved_policy: Vec<(rustix::process::Pid, SchedPolicy)>,
}

impl Boosted {
    fn new() -> Self {
        Self {
            saved: Vec::new(),
            saved_policy: Vec::new(),
        }
    }

    /// Puts `pids` under `SCHED_FIFO` at `priority` (with `chrt`: the tests crate has
    /// no `unsafe` for `sched_setscheduler`).
    fn realtime(&mut self, pids: &[rustix::process::Pid], priority: u8) {
        for &pid in pids {
            let Some(old) = SchedPolicy::of(pid) else {
                eprintln!("warning: cannot read the scheduling policy of thread {pid:?}");
                continue;
            };
            match SchedPolicy::fifo(priority).apply(pid) {
                Ok(()) => self.saved_policy.push((pid, old)),
                Err(e) => eprintln!("warning: cannot make thread {pid:?} SCHED_FIFO: {e}"),
            }
        }
    }

    /// Raises `pids` to [`BOOST_NICE`], pinned to `cpu` if given.
    fn add(&mut self, pids: &[rustix::process::Pid], cpu: Option<usize>) {
        for &pid in pids {
            if let Some(cpu) = cpu.filter(|_| cpus() > 1) {
                let mut set = rustix::thread::CpuSet::new();
                set.set(cpu);
                if let Err(e) = rustix::thread::sched_setaffinity(Some(pid), &set) {
                    eprintln!("warning: cannot pin thread {pid:?} to CPU {cpu}: {e}");
                }
            }
            if let Ok(old) = rustix::process::getpriority_process(Some(pid)) {
                if rustix::process::setpriority_process(Some(pid), BOOST_NICE).is_ok() {
                    self.saved.push((pid, old));
                }
            }
        }
    }
}

impl Drop for Boosted {
    fn drop(&mut self) {
        for (pid, policy) in &self.saved_policy {
            // A thread that is gone (its veth removed) has nothing to restore.
            let _ = policy.apply(*pid);
        }
        for &(pid, nice) in &self.saved {
            let _ = rustix::process::setpriority_process(Some(pid), nice);
        }
    }
}

/// A thread's scheduling policy as `chrt` sets it: its option and priority.
#[derive(Debug, Clone, Copy)]
struct SchedPolicy {
    flag: &'static str,
    priority: u32,
}

impl SchedPolicy {
    fn fifo(priority: u8) -> Self {
        Self {
            flag: "-f",
            priority: u32::from(priority),
        }
    }

    /// The policy of `pid`, from `chrt -p` ("...policy: SCHED_OTHER", "...priority: 0").
    fn of(pid: rustix::process::Pid) -> Option<Self> {
        let out = std::process::Command::new("chrt")
            .args(["-p", &pid.as_raw_pid().to_string()])
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        let text = String::from_utf8_lossy(&out.stdout);
        let value = |key: &str| {
            text.lines()
                .find(|l| l.contains(key))
                .and_then(|l| l.rsplit(": ").next())
                .map(str::trim)
        };
        // "SCHED_OTHER|SCHED_RESET_ON_FORK": the flag is not restored.
        let name = value("scheduling policy")?.split('|').next()?;
        let flag = match name {
            "SCHED_OTHER" => "-o",
            "SCHED_FIFO" => "-f",
            "SCHED_RR" => "-r",
            "SCHED_BATCH" => "-b",
            "SCHED_IDLE" => "-i",
            _ => return None,
        };
        let priority = value("scheduling priority")?.parse().ok()?;
        Some(Self { flag, priority })
    }

    fn apply(self, pid: rustix::process::Pid) -> Result<(), String> {
        let out = std::process::Command::new("chrt")
            .args([
                self.flag,
                "-p",
                &self.priority.to_string(),
                &pid.as_raw_pid().to_string(),
            ])
            .output()
            .map_err(|e| format!("chrt: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

/// The scheduler's autogroup of this process at [`BOOST_NICE`]: with autogroups on,
/// a thread's nice value only counts against threads of its own session, so the bench
/// first makes a session of its own (when it can) and raises that group; the group's
/// previous nice value comes back when dropped.
struct SessionBoost {
    restore: Option<String>,
}

impl SessionBoost {
    fn new() -> Self {
        // Fails when this process already leads a process group; then the caller's
        // session is raised and restored.
        let own_session = rustix::process::setsid().is_ok();
        let path = "/proc/self/autogroup";
        let old = std::fs::read_to_string(path).ok().and_then(|s| {
            s.split_whitespace()
                .skip_while(|w| *w != "nice")
                .nth(1)
                .map(str::to_owned)
        });
        if let Err(e) = std::fs::write(path, BOOST_NICE.to_string()) {
            eprintln!("warning: cannot raise the scheduler autogroup: {e}");
            return Self { restore: None };
        }
        Self {
            restore: old.filter(|_| !own_session),
        }
    }
}

impl Drop for SessionBoost {
    fn drop(&mut self) {
        if let Some(nice) = &self.restore {
            let _ = std::fs::write("/proc/self/autogroup", nice);
        }
    }
}

/// One sending trial: `rate` frames/s (`None`: as fast as possible) for `dur`.
struct Trial {
    rate: Option<f64>,
    dur: Duration,
    reply: mpsc::Sender<Result<u64, String>>,
}

/// The sender thread in the inside namespace, on CPU 0: a port on the inside host's
/// veth (AF_XDP TX ring in copy mode, or `AF_PACKET`), cycling over the flows' frames,
/// batches of 32. Returns frames handed to the port per trial (what left is counted at
/// the veth) and the I/O it got.
fn start_sender(
    b: &Bed,
    flows: usize,
    io: IoRequest,
) -> Result<(mpsc::Sender<Trial>, JoinHandle<()>, String), String> {
    let (tx, rx) = mpsc::channel::<Trial>();
    let (opened_tx, opened) = mpsc::channel();
    let dev = b.t.host_in.clone();
    let h =
        b.t.inside
            .spawn_inside(move || {
                pin_and_boost(SENDER_CPU);
                let frames = frames(flows);
                let mut port = match open_ports(&[dev.as_str()], io) {
                    Ok((mut ports, chosen)) => match ports.pop() {
                        Some(p) => {
                            let _ = opened_tx.send(Ok(io_name(&chosen, std::slice::from_ref(&p))));
                            p
                        }
                        None => return,
                    },
                    Err(e) => {
                        let _ = opened_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // A copy-mode AF_XDP or packet socket sends only while its skbs in flight
                // fit its send buffer (about 270 at the default 208 KiB); they are freed
                // only after the gateway and the receiver's drop (veth keeps the socket's
                // reference across namespaces), so a busy gateway's queues would throttle
                // the sender instead of dropping frames.
                if let Some(fd) = port.poll_fd() {
                    if let Err(e) =
                        rustix::net::sockopt::set_socket_send_buffer_size_force(fd, SENDER_SNDBUF)
                    {
                        eprintln!("warning: sender SO_SNDBUFFORCE: {e}");
                    }
                }
                send_trials(&mut port, &frames, &rx);
            })
            .map_err(|e| e.to_string())?;
    let h = thread::spawn(move || {
        if let Err(e) = h.join().unwrap_or(Ok(())) {
            eprintln!("sender: cannot enter the inside namespace: {e}");
        }
    });
    match opened.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(name)) => Ok((tx, h, name)),
        Ok(Err(e)) => Err(format!("sender: {e}")),
        Err(_) => Err("the sender did not open its port".into()),
    }
}

/// The sender's loop: one trial per request, paced or at full speed.
fn send_trials(port: &mut AnyPort, frames: &[[u8; 60]], trials: &mpsc::Receiver<Trial>) {
    let mut batch = FrameBatch::new(SEND_BATCH);
    let mut next = 0usize;
    for t in trials {
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
}

/// What I/O the ports got (an `AF_PACKET` port says whether its rings were set up).
fn io_name(chosen: &IoChosen, ports: &[AnyPort]) -> String {
    let af_packet = ports
        .iter()
        .find_map(|p| match p {
            AnyPort::AfPacket(a) => Some(a.io().to_string()),
            AnyPort::AfXdp(_) => None,
        })
        .unwrap_or_default();
    let deferred = ports
        .iter()
        .filter(|p| matches!(p, AnyPort::AfXdp(x) if !x.deferred_napis().is_empty()))
        .count();
    match chosen {
        IoChosen::AfXdp(mode) if deferred > 0 => {
            format!("AF_XDP, {mode} XDP, copy mode, NAPI deferred on {deferred} ports")
        }
        IoChosen::AfXdp(mode) => format!("AF_XDP, {mode} XDP, copy mode"),
        IoChosen::AfPacket { fallback: None } => format!("AF_PACKET {af_packet}"),
        IoChosen::AfPacket {
            fallback: Some(why),
        } => format!("AF_PACKET {af_packet} (AF_XDP failed: {why})"),
    }
}

/// The outside host answering every UDP frame it receives (its veth's packet tap sees
/// them before the ingress hook drops them): addresses, ports and MACs swapped, the
/// IPv4 checksum unchanged by the swap, UDP checksum 0. The `af_xdp_flow` warm-up uses
/// it to give each flow the reply that makes it offloadable.
struct Reflector {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<std::io::Result<Result<u64, String>>>,
}

impl Reflector {
    fn start(b: &Bed) -> Result<Self, String> {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = std::sync::Arc::clone(&stop);
        let dev = b.t.host_out.clone();
        let handle =
            b.t.outside
                .spawn_inside(move || -> Result<u64, String> {
                    let mut port = AfPacket::open(&dev).map_err(|e| e.to_string())?;
                    let (mut rx, mut tx) = (FrameBatch::new(64), FrameBatch::new(64));
                    let mut replies = 0u64;
                    while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                        rx.clear();
                        if port.recv_batch(&mut rx, 64).map_err(|e| e.to_string())? == 0 {
                            thread::sleep(Duration::from_micros(200));
                            continue;
                        }
                        tx.clear();
                        for f in rx.iter() {
                            if let Some(r) = reflection(f) {
                                let _ = tx.push(&r);
                            }
                        }
                        if !tx.is_empty() {
                            replies += u64::try_from(tx.len()).unwrap_or(0);
                            port.send_batch(&tx).map_err(|e| e.to_string())?;
                        }
                    }
                    Ok(replies)
                })
                .map_err(|e| e.to_string())?;
        Ok(Self { stop, handle })
    }

    /// Stops it; the replies it sent.
    fn stop(self) -> Result<u64, String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        match self.handle.join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(format!("reflector: {e}")),
            Err(_) => Err("reflector panicked".into()),
        }
    }
}

/// The reply to a UDP frame for the outside host, if `f` is one.
fn reflection(f: &[u8]) -> Option<Vec<u8>> {
    let is_udp_to_us = f.len() >= 42
        && f[12..14] == [0x08, 0x00]
        && f[14] == 0x45
        && f[23] == 17
        && f[30..34] == OUT_HOST;
    if !is_udp_to_us {
        return None;
    }
    let mut r = f.to_vec();
    r[0..6].copy_from_slice(&f[6..12]);
    r[6..12].copy_from_slice(&f[0..6]);
    r[26..30].copy_from_slice(&f[30..34]);
    r[30..34].copy_from_slice(&f[26..30]);
    r[34..36].copy_from_slice(&f[36..38]);
    r[36..38].copy_from_slice(&f[34..36]);
    r[40..42].fill(0);
    Some(r)
}

/// The agent's forwarding loop in the gateway namespace, on CPU 1, at nice -20 and, with
/// `fifo` > 0, `SCHED_FIFO` at that priority.
fn start_agent(
    b: &Bed,
    request: IoRequest,
    fifo: u8,
    flow_offload: bool,
) -> Result<(ForwarderThread<AnyPort>, String), String> {
    let (tx, rx) = mpsc::channel();
    let names = [b.t.gw_in.clone(), b.t.gw_out.clone()];
    let fwd = ForwarderThread::start(&b.t.gw, move || {
        pin_and_boost(GATEWAY_CPU);
        if fifo > 0 {
            if let Err(e) = SchedPolicy::fifo(fifo).apply(rustix::thread::gettid()) {
                eprintln!("warning: cannot make the forwarding loop SCHED_FIFO: {e}");
            }
        }
        let (ports, chosen) = match open_ports(&[names[0].as_str(), names[1].as_str()], request) {
            Ok(x) => x,
            Err(e) => {
                let _ = tx.send(Err(e.to_string()));
                return Err(e.to_string());
            }
        };
        let _ = tx.send(Ok(io_name(&chosen, &ports)));
        let ct = Config {
            max_connections: 262_144,
            ..Config::default()
        };
        let offload = if flow_offload {
            Some(
                XdpFlowOffload::for_ports(&ports, XdpOffloadConfig::default())
                    .ok_or("af_xdp_flow: the ports have no XDP flow table")?,
            )
        } else {
            None
        };
        let fwd = masquerade_forwarder(ForwarderConfig::default(), ports, names, ct)?;
        Ok(match offload {
            Some(o) => fwd.with_xdp_offload(o),
            None => fwd,
        })
    })
    .map_err(|e| e.to_string())?;
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(io)) => Ok((fwd, io)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!(
            "the forwarding loop did not open its ports: {:?}",
            fwd.finish().err()
        )),
    }
}

/// The veth's NAPI (present while XDP is attached) made a kernel thread, so that its
/// receive work (XDP, the copy into the UMEM) can be placed on the gateway's CPU.
fn threaded_napi(ns: &NetNs, dev: &str) -> Result<Vec<rustix::process::Pid>, String> {
    cmd(ns.exec(
        "sh",
        &["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")],
    ))?;
    let prefix = format!("napi/{dev}-");
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = kernel_threads(|c| c.starts_with(&prefix));
        if !pids.is_empty() {
            return Ok(pids);
        }
        if Instant::now() > until {
            return Err(format!("no NAPI thread for {dev}"));
        }
        thread::sleep(Duration::from_millis(20));
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
    let handed = answer.recv().map_err(|_| "sender gone")??;
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
        eprintln!(
            "trial {rate:?}: handed to the port {handed}, offered {sent}, delivered {got}: {r:?}"
        );
    }
    Ok(r)
}

/// One repeat: the rate under overload, then the best rate with at most [`MAX_LOSS`]
/// lost, bisecting the offered rate between 0 and the sender's full speed.
/// Returns the lossless delivered rate and the full-speed trial.
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
    sender: String,
    flows: usize,
    lossless: Vec<f64>,
    overload: Vec<f64>,
    offered: Vec<f64>,
}

impl Row {
    /// What limited the rate under overload: the sender when the gateway delivered
    /// (nearly) all it was offered, else the forwarder.
    fn bound(&self) -> &'static str {
        let (_, overload) = min_median(&self.overload);
        let (_, offered) = min_median(&self.offered);
        if self.method == Method::Sink {
            "sender alone"
        } else if overload >= offered * (1.0 - 4.0 * MAX_LOSS) {
            "sender"
        } else {
            "forwarder"
        }
    }
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
        let mut boosted = Boosted::new();
        boosted.add(
            &kernel_threads(|c| c == "ksoftirqd/0" || c == "ksoftirqd/1"),
            None,
        );
        if cfg.napi_fifo > 0 {
            // The gateway CPU's deferred softirq work (the kernel's forwarding when
            // it runs long, the receiver's drop) gets what the NAPI thread gets.
            let ksoftirqd = format!("ksoftirqd/{GATEWAY_CPU}");
            boosted.realtime(&kernel_threads(|c| c == ksoftirqd), cfg.napi_fifo);
        }
        let (agent, io) = match method {
            Method::Sink => (None, "drop at the gateway's ingress".to_owned()),
            Method::Kernel => (None, "ip_forward + nft masquerade".to_owned()),
            Method::AfPacket | Method::AfXdp | Method::AfXdpFlow => {
                let request = match method {
                    Method::AfXdp => IoRequest::AfXdp(cfg.xdp),
                    Method::AfXdpFlow => IoRequest::AfXdp(AfXdpConfig {
                        flow_table_entries: FLOW_TABLE_ENTRIES,
                        ..cfg.xdp
                    }),
                    Method::Sink | Method::Kernel | Method::AfPacket => IoRequest::AfPacket,
                };
                let flow_offload = method == Method::AfXdpFlow;
                let (a, mut io) = start_agent(&b, request, cfg.forwarder_fifo, flow_offload)?;
                if flow_offload {
                    io.push_str(", XDP flow table");
                }
                if matches!(method, Method::AfXdp | Method::AfXdpFlow)
                    && cfg.napi != NapiPlace::Sender
                {
                    let napi = threaded_napi(&b.t.gw, &b.t.gw_in)?;
                    boosted.add(&napi, Some(GATEWAY_CPU));
                    if cfg.napi_fifo > 0 {
                        boosted.realtime(&napi, cfg.napi_fifo);
                    }
                }
                (Some(a), io)
            }
        };
        let (sender, sender_thread, sender_io) = start_sender(&b, flows, cfg.sender)?;
        // Warm-up: ARP, and every flow's connection created before measuring.
        trial(&b, &sender, None, cfg.trial.max(Duration::from_millis(500)))?;
        if method == Method::AfXdpFlow {
            // The flows become offloadable with a reply (UDP, as for the hardware
            // policy): the outside host answers every frame for a while, paced so that
            // its packet socket keeps up, about three frames per flow.
            let reflector = Reflector::start(&b)?;
            #[allow(clippy::cast_precision_loss)]
            let secs = (3.0 * flows as f64 / REFLECT_RATE).max(1.0);
            trial(
                &b,
                &sender,
                Some(REFLECT_RATE),
                Duration::from_secs_f64(secs),
            )?;
            let reflected = reflector.stop()?;
            eprintln!("af_xdp_flow {flows} flows: {reflected} replies in the warm-up");
            // The last replies' batches, and the offload after them.
            thread::sleep(Duration::from_millis(300));
        }
        if method == Method::AfXdp && cfg.napi == NapiPlace::Softirq {
            // The NAPI has polled on the gateway CPU (its thread is pinned there) and
            // armed its timer there: from now on the timer polls it in softirq there.
            cmd(b.t.gw.exec(
                "sh",
                &[
                    "-c",
                    &format!("echo 0 > /sys/class/net/{}/threaded", b.t.gw_in),
                ],
            ))?;
        }
        let mut row = Row {
            method,
            io,
            sender: sender_io,
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
        if let Some(a) = agent {
            let fwd = a.finish()?;
            if let Some(x) = fwd.xdp_offload() {
                eprintln!("XDP flow offload: {:?}", x.stats());
            }
            if std::env::var_os("XDP_BENCH_VERBOSE").is_some() {
                let ports: Vec<_> = fwd.ports().iter().map(PacketPort::stats).collect();
                eprintln!("forwarder {:?}\nports {ports:?}", fwd.stats());
            }
        }
        eprintln!(
            "{} {flows} flows: {:?} / {:?} (offered {:?})",
            method.name(),
            row.lossless,
            row.overload,
            row.offered
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
    let _boost = SessionBoost::new();
    let mut rows = Vec::new();
    for &m in &cfg.methods {
        if let Err(e) = run_method(m, &cfg, &mut rows) {
            eprintln!("xdp_forward_bench: {}: {e}", m.name());
            return ExitCode::FAILURE;
        }
    }
    let sender = rows.first().map_or("-", |r| r.sender.as_str());
    println!(
        "64-byte UDP through the gateway, sender on CPU {SENDER_CPU} ({sender}), gateway on CPU {GATEWAY_CPU}; Mpps, min / median of {} repeats ({} ms trials, lossless = at most {} % lost; offered = median sender full speed; bound: what limited the overload rate)",
        cfg.repeats,
        cfg.trial.as_millis(),
        MAX_LOSS * 100.0
    );
    println!(
        "{:<10} {:>7} {:>20} {:>20} {:>8}  {:<12} I/O",
        "method", "flows", "lossless min/med", "overload min/med", "offered", "bound"
    );
    let mut json = Vec::new();
    for r in &rows {
        let (lmin, lmed) = min_median(&r.lossless);
        let (omin, omed) = min_median(&r.overload);
        let (_, offered) = min_median(&r.offered);
        println!(
            "{:<10} {:>7} {:>9.3} / {:<8.3} {:>9.3} / {:<8.3} {:>8.3}  {:<12} {}",
            r.method.name(),
            r.flows,
            lmin / 1e6,
            lmed / 1e6,
            omin / 1e6,
            omed / 1e6,
            offered / 1e6,
            r.bound(),
            r.io
        );
        json.push(serde_json::json!({
            "method": r.method.name(), "flows": r.flows, "io": r.io, "sender": r.sender,
            "bound": r.bound(),
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
            "trial_ms": cfg.trial.as_millis(), "max_loss": MAX_LOSS,
            "sender_cpu": SENDER_CPU, "gateway_cpu": GATEWAY_CPU, "rows": json,
        })
    );
    ExitCode::SUCCESS
}
