//! `ctoffload`: the connection-tracking and NAT agent and its command-line interface.
//!
//! The agent is not written yet. Today this binary knows its subcommands and says,
//! truthfully, which parts of the system exist; the demo grows as the crates land.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    }
}
