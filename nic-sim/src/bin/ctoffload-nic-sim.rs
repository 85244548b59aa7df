//! `ctoffload-nic-sim`: the CTO-1 model as its own process (device.md section 19.4).
//!
//! Creates the device (BAR0 as a sealed memfd, or `/dev/shm/<name>`), attaches the
//! requested ports, and serves the control socket until a `shutdown` request (or, with
//! `--exit-with-client`, until its client disconnects). Prints `listening on <path>`
//! on stdout once clients can connect.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use clap::{Parser, ValueEnum};
use ctoffload_nic_sim::control::{Server, ServerOptions, chain};
use ctoffload_nic_sim::port::{AfPacketPort, MemPort};
use ctoffload_nic_sim::wire_pad::RuntPadded;
use ctoffload_nic_sim::{SimClock, SimConfig, Simulator};

/// Frames each direction of a memory port holds.
const MEM_PORT_FRAMES: usize = 256;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ClockMode {
    /// Nanoseconds since start (monotonic clock).
    Monotonic,
    /// Starts at 0; clients set it with `set_time`.
    Manual,
}

/// A port back-end: `P=mem` or `P=af-packet:IFNAME`.
#[derive(Debug, Clone)]
struct PortSpec {
    port: u8,
    kind: PortKind,
}

#[derive(Debug, Clone)]
enum PortKind {
    Mem,
    AfPacket(String),
}

fn parse_port(s: &str) -> Result<PortSpec, String> {
    let (p, kind) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected PORT=mem or PORT=af-packet:IFNAME"))?;
    let port = p
        .parse::<u8>()
        .map_err(|e| format!("{s:?}: port number: {e}"))?;
    let kind = match kind.split_once(':') {
        None if kind == "mem" => PortKind::Mem,
        Some(("af-packet", ifname)) if !ifname.is_empty() => PortKind::AfPacket(ifname.into()),
        _ => return Err(format!("{s:?}: expected PORT=mem or PORT=af-packet:IFNAME")),
    };
    Ok(PortSpec { port, kind })
}

/// The CTO-1 flow-offload engine model, served over a Unix control socket.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Path of the control socket (SOCK_SEQPACKET) to create; must not exist.
    #[arg(long)]
    socket: PathBuf,
    /// log2 of the bucket count (`BUCKETS_LOG2`), 0 to 20.
    #[arg(long, default_value_t = SimConfig::default().buckets_log2)]
    buckets_log2: u8,
    /// `FLOW_LIMIT` (default: the whole capacity, 2^buckets_log2 × 8, capped at the
    /// default device's limit).
    #[arg(long)]
    flow_limit: Option<u32>,
    /// `NUM_PORTS`, 1 to 8.
    #[arg(long, default_value_t = SimConfig::default().num_ports)]
    num_ports: u8,
    /// Largest CMD/CPL ring `SIZE_LOG2`, 2 to 16.
    #[arg(long, default_value_t = SimConfig::default().cmd_ring_max_log2)]
    cmd_ring_max_log2: u8,
    /// Largest RX/TX ring `SIZE_LOG2`, 2 to 16.
    #[arg(long, default_value_t = SimConfig::default().rx_ring_max_log2)]
    rx_ring_max_log2: u8,
    /// Model time a reset takes, at most 10 ms.
    #[arg(long, default_value_t = 0)]
    reset_delay_ns: u64,
    /// Create BAR0 as `/dev/shm/<NAME>` instead of a sealed memfd.
    #[arg(long, value_name = "NAME")]
    bar_shm: Option<String>,
    /// Where model time comes from.
    #[arg(long, value_enum, default_value_t = ClockMode::Monotonic)]
    clock: ClockMode,
    /// A port back-end, `PORT=mem` (frames reachable with port_inject/port_drain) or
    /// `PORT=af-packet:IFNAME`; repeatable. Ports without one drop what they send.
    #[arg(long = "port", value_parser = parse_port)]
    ports: Vec<PortSpec>,
    /// Stop and exit when the client that sent `hello` disconnects.
    #[arg(long)]
    exit_with_client: bool,
}

fn run(args: Args) -> Result<(), String> {
    let default = SimConfig::default();
    let capacity = (1u64 << args.buckets_log2.min(20)) * 8;
    let flow_limit = args.flow_limit.unwrap_or_else(|| {
        u32::try_from(capacity.min(u64::from(default.flow_limit))).unwrap_or(default.flow_limit)
    });
    let cfg = SimConfig {
        buckets_log2: args.buckets_log2,
        flow_limit,
        num_ports: args.num_ports,
        cmd_ring_max_log2: args.cmd_ring_max_log2,
        rx_ring_max_log2: args.rx_ring_max_log2,
        reset_delay_ns: args.reset_delay_ns,
        shm_name: args.bar_shm,
        ..default
    };
    let mut sim =
        Simulator::new(cfg).map_err(|e| format!("cannot create the model: {}", chain(&e)))?;
    let mut wires: Vec<Option<MemPort>> = (0..args.num_ports).map(|_| None).collect();
    for spec in args.ports {
        let slot = wires.get_mut(usize::from(spec.port)).ok_or_else(|| {
            format!(
                "port {} is not below --num-ports {}",
                spec.port, args.num_ports
            )
        })?;
        match spec.kind {
            PortKind::Mem => {
                let (dev_end, wire_end) = MemPort::pair(MEM_PORT_FRAMES);
                sim.attach_port(spec.port, Box::new(dev_end))
                    .map_err(|e| chain(&e))?;
                *slot = Some(wire_end);
            }
            PortKind::AfPacket(ifname) => {
                let p = AfPacketPort::open(&ifname)
                    .map_err(|e| format!("port {}: {}", spec.port, chain(&e)))?;
                // Frames a host sent shorter than the wire minimum arrive padded.
                sim.attach_port(spec.port, Box::new(RuntPadded::new(p)))
                    .map_err(|e| chain(&e))?;
                *slot = None;
            }
        }
    }
    let clock = match args.clock {
        ClockMode::Monotonic => SimClock::Monotonic,
        ClockMode::Manual => SimClock::Manual(Arc::new(AtomicU64::new(0))),
    };
    let opts = ServerOptions {
        exit_with_client: args.exit_with_client,
    };
    let server = Server::new(sim, clock, wires, &args.socket, opts).map_err(|e| {
        format!(
            "cannot serve the control socket {}: {}",
            args.socket.display(),
            chain(&e)
        )
    })?;
    println!("listening on {}", server.path().display());
    server.run().map_err(|e| chain(&e))?;
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctoffload-nic-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_specs_parse() {
        let p = parse_port("1=mem").expect("mem");
        assert_eq!(p.port, 1);
        assert!(matches!(p.kind, PortKind::Mem));
        let p = parse_port("0=af-packet:veth0").expect("af-packet");
        assert!(matches!(p.kind, PortKind::AfPacket(ref n) if n == "veth0"));
        for bad in [
            "mem",
            "x=mem",
            "0=disk",
            "0=af-packet:",
            "300=mem",
            "0=mem:x",
        ] {
            assert!(parse_port(bad).is_err(), "{bad}");
        }
    }
}
