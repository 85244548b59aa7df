//! The same inside / gw / outside topology ([`Topology`]) with three gateways, side by
//! side: the gateway namespace's kernel (forwarding with nftables masquerade), the
//! `ctoffload agent` with `[backend] kind = "software"`, and the agent with the
//! simulated NIC attached to the interfaces (`kind = "sim"` with `interfaces`; `n/a`
//! when the agent cannot attach the simulator to interfaces).
//!
//! Per gateway, `--repeats` times (default 3): iperf3 TCP (Gbit/s at the receiver),
//! iperf3 UDP with 64-byte payloads at full speed (packets per second delivered at the
//! receiver), and short TCP connections one after the other (connections per second).
//! Prints min and median, the ratio of each median to the kernel's, a table, and as the
//! last line one JSON object. The whole run is bounded (`--budget`, default 170 s):
//! measurements that would start after it are skipped (`n/a`).
//!
//! Needs root, `ip`, `nft`, `iperf3`, and the `ctoffload` binary next to this one
//! (`cargo build --release -p ctoffload-agent -p ctoffload-tests --bin ctoffload --bin
//! e2e_compare`) or in `$CTOFFLOAD_BIN`.
#![forbid(unsafe_code)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ctoffload_tests::netns::skip_reason;
use ctoffload_tests::topology::{
    AgentProcess, OUT_HOST, Topology, agent_binary, agent_config, iperf3, ping, short_connections,
};
use serde_json::{Value, json};

/// Seconds per iperf3 run and per connection burst.
const SECS: u32 = 2;
/// Connections per burst at most.
const MAX_CONNS: usize = 5000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gateway {
    Kernel,
    Software,
    Sim,
}

impl Gateway {
    const ALL: [Self; 3] = [Self::Kernel, Self::Software, Self::Sim];

    fn key(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Software => "software",
            Self::Sim => "sim",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Self::Kernel => "kernel nft",
            Self::Software => "agent software",
            Self::Sim => "agent sim",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Kernel => "xk",
            Self::Software => "xw",
            Self::Sim => "xm",
        }
    }
}

/// The three figures.
const METRICS: [(&str, &str); 3] = [
    ("tcp_gbps", "TCP Gbit/s"),
    ("udp64_pps", "UDP 64 B pkt/s"),
    ("tcp_conns_per_s", "TCP conn/s"),
];

/// One gateway's samples per metric, or why it has none.
#[derive(Debug, Default)]
struct Samples {
    values: [Vec<f64>; 3],
    unavailable: Option<String>,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(s[n / 2]),
        _ => Some(f64::midpoint(s[n / 2 - 1], s[n / 2])),
    }
}

fn min(v: &[f64]) -> Option<f64> {
    v.iter().copied().min_by(f64::total_cmp)
}

/// One measurement of each metric.
fn measure(t: &Topology, port: u16) -> Result<[f64; 3], String> {
    let tcp = iperf3(t, SECS, &[])?;
    let gbps = tcp["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 TCP: no receiver rate")?
        / 1e9;
    let udp = iperf3(t, SECS, &["-u", "-b", "0", "-l", "64"])?;
    let sum = &udp["end"]["sum"];
    let (packets, lost, secs) = (
        sum["packets"].as_f64().ok_or("iperf3 UDP: no packets")?,
        sum["lost_packets"].as_f64().unwrap_or(0.0),
        sum["seconds"].as_f64().unwrap_or(f64::from(SECS)),
    );
    let pps = (packets - lost).max(0.0) / secs.max(0.001);
    let (peers, took) =
        short_connections(t, port, MAX_CONNS, Duration::from_secs(u64::from(SECS)))?;
    let conns = peers.len() as f64 / took.as_secs_f64().max(0.001);
    Ok([gbps, pps, conns])
}

/// Sets up `gw` on a fresh topology and measures it `repeats` times.
fn run_gateway(gw: Gateway, repeats: usize, deadline: Instant, dir: &std::path::Path) -> Samples {
    let mut out = Samples::default();
    let t = match Topology::new(gw.tag()) {
        Ok(t) => t,
        Err(e) => {
            out.unavailable = Some(format!("topology: {e}"));
            return out;
        }
    };
    // Full checksums from the hosts for every gateway (the simulated NIC's NAT only
    // adjusts them), so that the three run the same host work.
    if let Err(e) = t.full_checksums() {
        out.unavailable = Some(format!("ethtool: {e}"));
        return out;
    }
    let mut agent = None;
    let setup = match gw {
        Gateway::Kernel => t.kernel_gateway().map_err(|e| e.to_string()),
        Gateway::Software | Gateway::Sim => {
            let kind = if gw == Gateway::Software {
                "software"
            } else {
                "sim"
            };
            let socket = dir.join(format!("{}.sock", gw.key()));
            let cfg = dir.join(format!("{}.toml", gw.key()));
            let backend = format!(
                "kind = \"{kind}\"\ninterfaces = [\"{}\", \"{}\"]",
                t.gw_in, t.gw_out
            );
            let text = agent_config(&backend, (1024, 65535), "", &socket);
            let bin = agent_binary().map_err(|e| e.to_string());
            bin.and_then(|bin| {
                std::fs::write(&cfg, text).map_err(|e| e.to_string())?;
                let mut a =
                    AgentProcess::new(bin, cfg, socket, dir.join(format!("{}.log", gw.key())));
                a.start(&t, Duration::from_secs(20))?;
                agent = Some(a);
                Ok(())
            })
        }
    };
    if let Err(e) = setup {
        let first = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        out.unavailable = Some(first.to_owned());
        return out;
    }
    // ARP on both sides before the clock runs.
    if let Err(e) = t
        .inside
        .run_inside(|| ping(OUT_HOST, 0x5801, 64))
        .map_err(|e| e.to_string())
        .and_then(|r| r)
    {
        out.unavailable = Some(format!("no connectivity: {e}"));
        return out;
    }
    for r in 0..repeats {
        if Instant::now() >= deadline {
            eprintln!("{}: time budget spent after {r} repeats", gw.title());
            break;
        }
        let port = 6000 + u16::try_from(r).unwrap_or(0);
        match measure(&t, port) {
            Ok(v) => {
                eprintln!(
                    "{} #{}: {:.3} Gbit/s, {:.0} pkt/s, {:.0} conn/s",
                    gw.title(),
                    r + 1,
                    v[0],
                    v[1],
                    v[2]
                );
                for (dst, x) in out.values.iter_mut().zip(v) {
                    dst.push(x);
                }
            }
            Err(e) => {
                eprintln!("{} #{}: {e}", gw.title(), r + 1);
            }
        }
    }
    if let Some(mut a) = agent
        && let Err(e) = a.stop()
    {
        eprintln!("{}: {e}", gw.title());
    }
    out
}

fn fmt(x: Option<f64>, metric: usize) -> String {
    match (x, metric) {
        (None, _) => "n/a".into(),
        (Some(v), 0) => format!("{v:.3}"),
        (Some(v), _) => format!("{v:.0}"),
    }
}

fn main() -> ExitCode {
    let mut repeats = 3usize;
    let mut budget = Duration::from_secs(170);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let val = args.next();
        match (a.as_str(), val.as_deref().map(str::parse::<u64>)) {
            ("--repeats", Some(Ok(n))) if n > 0 => repeats = usize::try_from(n).unwrap_or(3),
            ("--budget", Some(Ok(s))) if s > 0 => budget = Duration::from_secs(s),
            _ => {
                eprintln!("usage: e2e_compare [--repeats N] [--budget SECONDS]");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(why) = skip_reason(&["ip", "nft", "iperf3"]) {
        eprintln!("e2e_compare: {why}");
        return ExitCode::from(2);
    }
    let dir = std::env::temp_dir().join(format!("e2e_compare.{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("e2e_compare: {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let deadline = started + budget;
    let results: Vec<(Gateway, Samples)> = Gateway::ALL
        .iter()
        .map(|&g| (g, run_gateway(g, repeats, deadline, &dir)))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);

    let kernel_median: Vec<Option<f64>> = (0..3).map(|m| median(&results[0].1.values[m])).collect();
    println!(
        "e2e_compare: {repeats} repeats of {SECS} s per figure, median (min) and median / kernel"
    );
    print!("{:<16}", "");
    for (g, _) in &results {
        print!("{:>32}", g.title());
    }
    println!();
    let mut json = serde_json::Map::new();
    for (m, (key, title)) in METRICS.iter().enumerate() {
        print!("{title:<16}");
        for (g, s) in &results {
            let (med, lo) = (median(&s.values[m]), min(&s.values[m]));
            let ratio = med.zip(kernel_median[m]).map(|(a, k)| a / k);
            let cell = match (med, ratio) {
                (None, _) => "n/a".to_owned(),
                (Some(_), Some(r)) if *g != Gateway::Kernel => {
                    format!("{} ({}) {r:.2}x", fmt(med, m), fmt(lo, m))
                }
                (Some(_), _) => format!("{} ({})", fmt(med, m), fmt(lo, m)),
            };
            print!("{cell:>32}");
            if let Some(o) = json
                .entry(g.key())
                .or_insert_with(|| json!({}))
                .as_object_mut()
            {
                o.insert(
                    (*key).to_owned(),
                    json!({"median": med, "min": lo, "ratio_to_kernel": ratio}),
                );
            }
        }
        println!();
    }
    for (g, s) in &results {
        if let Some(why) = &s.unavailable {
            println!("{}: n/a: {why}", g.title());
            json.insert(format!("{}_unavailable", g.key()), Value::from(why.clone()));
        }
    }
    json.insert("repeats".into(), json!(repeats));
    json.insert("seconds_per_run".into(), json!(SECS));
    json.insert(
        "total_seconds".into(),
        json!(started.elapsed().as_secs_f64().round()),
    );
    println!("{}", Value::Object(json));
    ExitCode::SUCCESS
}
