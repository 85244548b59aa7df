//! `ctoffload`: the connection-tracking and NAT agent and its command-line interface.
//!
//! `ctoffload agent` runs the agent; the other subcommands are gRPC clients of a
//! running agent (see `docs/api.md`), plus the offline `replay` (`docs/replay.md`).
//! Everything lives in the library ([`ctoffload_agent::cli`]).
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    ctoffload_agent::cli::main()
}
