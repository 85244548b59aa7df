//! `ctoffload`: the connection-tracking and NAT agent and its command-line interface.
//!
//! The agent is not written yet. Today this binary knows its subcommands and says,
//! truthfully, which parts of the system exist; the demo grows as the crates land.
//! `replay` runs a capture through the software pipeline (see `docs/replay.md`).
#![forbid(unsafe_code)]

use std::error::Error as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ctoffload_agent::replay::{self, InvalidPolicy, ReplayFiles, ReplayOptions};

/// Connection tracking and NAT, offloaded to a flow-table NIC when one is present.
#[derive(Debug, Parser)]
#[command(name = "ctoffload", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent on the built-in simulated NIC with a traffic generator.
    Demo,
    /// Run a pcapng (or pcap) through the software pipeline, deterministically.
    ///
    /// Each capture interface is a gateway port (ports 0<->1, 2<->3, ... forward to each
    /// other). Writes the emitted packets to a pcapng and one JSON line per input packet.
    /// Exit status 2 when a file is missing, corrupt or unsupported.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// Input capture (pcapng, or pcap with one port).
    input: PathBuf,
    /// Output pcapng of the packets the gateway emits (interface = egress port).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// JSON Lines records, one per input packet (`-`: standard output).
    #[arg(short, long, default_value = "-")]
    records: PathBuf,
    /// Conntrack settings (TOML; see docs/replay.md). Defaults are Linux's.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// What to do with packets conntrack finds invalid.
    #[arg(long, value_enum, default_value_t = InvalidPolicy::Drop)]
    invalid: InvalidPolicy,
    /// Add the whole connection table to every record.
    #[arg(long)]
    dump_table: bool,
}

fn run_replay(args: &ReplayArgs) -> Result<replay::Summary, replay::ReplayError> {
    let conntrack = match &args.config {
        Some(path) => replay::load_config(path)?,
        None => replay::default_conntrack_config(),
    };
    let opts = ReplayOptions {
        conntrack,
        invalid: args.invalid,
        dump_table: args.dump_table,
    };
    let files = ReplayFiles {
        input: args.input.clone(),
        output: args.output.clone(),
        records: Some(args.records.clone()),
    };
    replay::replay_files(&files, &opts)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            println!("ctoffload demo: the agent is not built yet.");
            println!("What exists today: the device contract (docs/device.md, hw-regs).");
            println!("Missing before the demo can run: nic-sim, driver, fallback-sw, agent.");
            ExitCode::FAILURE
        }
        Command::Replay(args) => match run_replay(&args) {
            Ok(s) => {
                eprintln!(
                    "ctoffload replay: {} packets, {} emitted, {} dropped",
                    s.packets, s.emitted, s.dropped
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                let mut msg = format!("ctoffload replay: error: {e}");
                let mut cause = e.source();
                while let Some(c) = cause {
                    msg.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                eprintln!("{msg}");
                ExitCode::from(2)
            }
        },
    }
}
