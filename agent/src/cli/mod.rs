//! The `ctoffload` command line: the agent itself (`ctoffload agent`), the offline
//! replay, and gRPC client subcommands shaped like `conntrack` from conntrack-tools
//! (`flows` ~ `-L/-G/-D/-F`, `events` ~ `-E`, `stats` ~ `-S`).
//!
//! Client subcommands connect to the agent's Unix socket (`--socket`, default
//! [`DEFAULT_SOCKET_PATH`]) or to its TCP endpoint with mutual TLS (`--tcp` with
//! `--ca/--cert/--key`). Errors are one line on standard error: the agent's gRPC code
//! and message (which names the offending field), or how to start an absent agent.
//! Exit status: 0 success, 1 failure, 2 bad usage (including a bad configuration).

pub mod agent;
pub mod client;
pub mod demo;
pub mod output;
pub mod sim;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use ctoffload_proto::v1 as pb;
use ctoffload_proto::v1::conntrack_service_client::ConntrackServiceClient;
use ctoffload_proto::v1::device_service_client::DeviceServiceClient;
use ctoffload_proto::v1::event_service_client::EventServiceClient;
use ctoffload_proto::v1::nat_service_client::NatServiceClient;
use ctoffload_proto::v1::offload_service_client::OffloadServiceClient;
use ctoffload_proto::v1::settings_service_client::SettingsServiceClient;
use ctoffload_proto::v1::stats_service_client::StatsServiceClient;
use tonic::transport::Channel;

use crate::config::{DEFAULT_SOCKET_PATH, protocol_number};
use crate::replay::{self, InvalidPolicy, ReplayFiles, ReplayOptions};
use client::{CliError, Target};

/// Connection tracking and NAT, offloaded to a flow-table NIC when one is present.
#[derive(Debug, Parser)]
#[command(name = "ctoffload", version)]
pub struct Cli {
    #[command(flatten)]
    conn: ConnArgs,
    #[command(subcommand)]
    command: Command,
}

/// How client subcommands reach the agent.
#[derive(Debug, Args)]
struct ConnArgs {
    /// The agent's Unix socket [default: /run/ctoffload/api.sock]. For `agent`, it
    /// overrides `api.socket` of the configuration.
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Connect over TCP with mutual TLS instead (needs --ca, --cert, --key).
    #[arg(long, value_name = "ADDR", requires_all = ["ca", "cert", "key"])]
    tcp: Option<String>,
    /// CA certificate (PEM) the agent's certificate must chain to.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Name the agent's certificate must carry.
    #[arg(long, value_name = "NAME", default_value = "localhost")]
    server_name: String,
}

impl ConnArgs {
    fn target(&self) -> Target {
        match (&self.tcp, &self.ca, &self.cert, &self.key) {
            (Some(addr), Some(ca), Some(cert), Some(key)) => Target::Tcp {
                addr: addr.clone(),
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.server_name.clone(),
            },
            _ => Target::Unix(
                self.socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH)),
            ),
        }
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
enum Format {
    /// Human-readable (`conntrack`-like lines, tables).
    #[default]
    Text,
    /// JSON (one document; one object per line for `events`).
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent: the gRPC API over the control plane, metrics, SIGHUP reload.
    #[command(alias = "run")]
    Agent(agent::AgentArgs),
    /// List connections (like `conntrack -L`); subcommands get, delete, flush.
    Flows(FlowsArgs),
    /// Watch connection events (like `conntrack -E`).
    Events(EventsArgs),
    /// Show statistics.
    Stats(FormatArg),
    /// NAT rules.
    #[command(subcommand)]
    Nat(NatCmd),
    /// Show the offload device's status.
    Device(FormatArg),
    /// The offload policy.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Conntrack timeouts (seconds, Linux sysctl names).
    #[command(subcommand)]
    Timeouts(TimeoutsCmd),
    /// Print a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Run the agent on the built-in simulated NIC with a traffic generator.
    Demo(demo::DemoArgs),
    /// Run a pcapng (or pcap) through the software pipeline, deterministically.
    ///
    /// Each capture interface is a gateway port (ports 0<->1, 2<->3, ... forward to each
    /// other). Writes the emitted packets to a pcapng and one JSON line per input packet.
    /// Exit status 2 when a file is missing, corrupt or unsupported.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
struct FormatArg {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

/// Which connections (every option given must match; addresses are the original
/// direction's).
#[derive(Debug, Args, Default, Clone)]
struct FilterArgs {
    /// Protocol: tcp, udp, icmp, icmpv6, sctp, ... or a number.
    #[arg(short = 'p', long = "proto", value_name = "PROTO")]
    proto: Option<String>,
    /// Source address or prefix (10.0.0.0/8).
    #[arg(short = 's', long, value_name = "ADDR[/LEN]")]
    src: Option<String>,
    /// Destination address or prefix.
    #[arg(short = 'd', long, value_name = "ADDR[/LEN]")]
    dst: Option<String>,
    /// Source port.
    #[arg(long)]
    sport: Option<u16>,
    /// Destination port.
    #[arg(long)]
    dport: Option<u16>,
    /// TCP state (ESTABLISHED, SYN_SENT, TIME_WAIT, ...).
    #[arg(long)]
    state: Option<String>,
    /// Conntrack zone.
    #[arg(short = 'w', long)]
    zone: Option<u16>,
    /// Only connections on a fast path.
    #[arg(long, conflicts_with = "software")]
    offloaded: bool,
    /// Only connections in software.
    #[arg(long)]
    software: bool,
}

fn parse_state(s: &str) -> Result<pb::TcpState, CliError> {
    let norm = s.to_ascii_uppercase().replace('-', "_");
    pb::TcpState::from_str_name(&format!("TCP_STATE_{norm}"))
        .filter(|s| *s != pb::TcpState::Unspecified)
        .ok_or_else(|| {
            CliError::usage(
                "--state",
                format!(
                    "{s:?} is not a TCP state (SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2)"
                ),
            )
        })
}

fn parse_proto(s: &str, arg: &str) -> Result<u32, CliError> {
    protocol_number(s)
        .map(u32::from)
        .ok_or_else(|| CliError::usage(arg, format!("{s:?} is not a protocol name or number")))
}

impl FilterArgs {
    fn to_pb(&self) -> Result<pb::ConnectionFilter, CliError> {
        Ok(pb::ConnectionFilter {
            protocol: self
                .proto
                .as_deref()
                .map(|p| parse_proto(p, "--proto"))
                .transpose()?,
            src_prefix: self.src.clone().unwrap_or_default(),
            dst_prefix: self.dst.clone().unwrap_or_default(),
            src_port: self.sport.map(u32::from),
            dst_port: self.dport.map(u32::from),
            tcp_state: self
                .state
                .as_deref()
                .map(parse_state)
                .transpose()?
                .unwrap_or(pb::TcpState::Unspecified)
                .into(),
            zone: self.zone.map(u32::from),
            offloaded: if self.offloaded {
                Some(true)
            } else if self.software {
                Some(false)
            } else {
                None
            },
        })
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
struct FlowsArgs {
    #[command(subcommand)]
    cmd: Option<FlowsCmd>,
    #[command(flatten)]
    list: ListArgs,
}

#[derive(Debug, Args, Default)]
struct ListArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Stop after this many connections.
    #[arg(long)]
    limit: Option<u64>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

/// One connection: by id, or by a tuple of either direction.
#[derive(Debug, Args)]
struct KeyArgs {
    /// Connection id.
    #[arg(long, conflicts_with_all = ["proto", "src", "dst", "sport", "dport"])]
    id: Option<u64>,
    /// Protocol.
    #[arg(short = 'p', long = "proto")]
    proto: Option<String>,
    /// Source address.
    #[arg(short = 's', long)]
    src: Option<String>,
    /// Destination address.
    #[arg(short = 'd', long)]
    dst: Option<String>,
    /// Source port (ICMP: the echo id).
    #[arg(long)]
    sport: Option<u16>,
    /// Destination port.
    #[arg(long)]
    dport: Option<u16>,
    /// ICMP type.
    #[arg(long)]
    icmp_type: Option<u8>,
    /// ICMP code.
    #[arg(long)]
    icmp_code: Option<u8>,
    /// Zone.
    #[arg(short = 'w', long)]
    zone: Option<u16>,
}

impl KeyArgs {
    fn to_pb(&self) -> Result<pb::ConnectionKey, CliError> {
        use pb::connection_key::Key;
        if let Some(id) = self.id {
            return Ok(pb::ConnectionKey {
                key: Some(Key::Id(id)),
            });
        }
        let proto = self.proto.as_deref().ok_or_else(|| {
            CliError::usage(
                "--id",
                "give --id, or a tuple: -p PROTO -s SRC -d DST [--sport --dport]",
            )
        })?;
        Ok(pb::ConnectionKey {
            key: Some(Key::Tuple(pb::Tuple {
                src: self.src.clone().unwrap_or_default(),
                dst: self.dst.clone().unwrap_or_default(),
                protocol: parse_proto(proto, "--proto")?,
                src_port: self.sport.map_or(0, u32::from),
                dst_port: self.dport.map_or(0, u32::from),
                icmp_type: self.icmp_type.map_or(0, u32::from),
                icmp_code: self.icmp_code.map_or(0, u32::from),
                zone: self.zone.map_or(0, u32::from),
            })),
        })
    }
}

#[derive(Debug, Subcommand)]
enum FlowsCmd {
    /// List connections (the default).
    List(ListArgs),
    /// Show one connection (like `conntrack -G`).
    Get {
        #[command(flatten)]
        key: KeyArgs,
        /// Output format.
        #[arg(short, long, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete one connection by --id, or every connection the filter selects (like
    /// `conntrack -D`).
    Delete {
        /// Connection id.
        #[arg(long, conflicts_with = "FilterArgs")]
        id: Option<u64>,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Delete every connection (like `conntrack -F`).
    Flush,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum EventKindArg {
    New,
    StateChange,
    Offloaded,
    Returned,
    EndOfFlow,
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Only these kinds (repeat or comma-separate); gaps are always shown.
    #[arg(short = 'e', long = "kind", value_enum, value_delimiter = ',')]
    kinds: Vec<EventKindArg>,
    /// Replay the journal from this sequence, then go on live.
    #[arg(long, value_name = "SEQ")]
    from: Option<u64>,
    /// Exit after this many events.
    #[arg(short = 'c', long)]
    count: Option<u64>,
    /// Output format (json: one object per line).
    #[arg(short, long, value_enum, default_value_t)]
    output: Format,
}

#[derive(Debug, Subcommand)]
enum NatCmd {
    /// List NAT rules.
    List(FormatArg),
    /// Add a rule.
    Add {
        /// Unique name.
        name: String,
        /// snat or dnat.
        #[arg(long, value_parser = ["snat", "dnat"])]
        kind: String,
        /// Match: protocol.
        #[arg(short = 'p', long = "proto")]
        proto: Option<String>,
        /// Match: original source prefix.
        #[arg(short = 's', long)]
        src: Option<String>,
        /// Match: original destination prefix.
        #[arg(short = 'd', long)]
        dst: Option<String>,
        /// Match: zone.
        #[arg(short = 'w', long)]
        zone: Option<u32>,
        /// Translate to ADDR or FIRST-LAST.
        #[arg(long, value_name = "ADDR[-ADDR]")]
        to: String,
        /// Translate ports to PORT or FIRST-LAST.
        #[arg(long, value_name = "PORT[-PORT]")]
        to_ports: Option<String>,
    },
    /// Remove a rule.
    Remove {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Show the policy.
    Get(FormatArg),
    /// Change the policy (options not given keep their value).
    Set {
        /// Offload at all.
        #[arg(long)]
        enabled: Option<bool>,
        /// Offload TCP.
        #[arg(long)]
        tcp: Option<bool>,
        /// Offload UDP.
        #[arg(long)]
        udp: Option<bool>,
        /// Packets a flow must have seen first.
        #[arg(long)]
        min_packets: Option<u64>,
    },
    /// Take every flow off the fast path.
    Drain {
        /// Also disable the policy.
        #[arg(long)]
        disable: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TimeoutsCmd {
    /// Show the timeouts.
    Get(FormatArg),
    /// Set timeouts: NAME=SECONDS ... (tcp_established=300 udp=45).
    Set {
        /// NAME=SECONDS pairs.
        #[arg(required = true, value_name = "NAME=SECONDS")]
        values: Vec<String>,
    },
}

#[derive(Debug, Args)]
struct ReplayArgs {
    /// Input capture (pcapng, or pcap with one port).
    input: PathBuf,
    /// Output pcapng of the packets the gateway emits (interface = egress port).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// JSON Lines records, one per input packet (`-`: standard output).
    #[arg(short, long, default_value = "-")]
    records: PathBuf,
    /// Conntrack and NAT settings (TOML; see docs/replay.md). Defaults are Linux's.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// What to do with packets conntrack finds invalid.
    #[arg(long, value_enum, default_value_t = InvalidPolicy::Drop)]
    invalid: InvalidPolicy,
    /// Add the whole connection table to every record.
    #[arg(long)]
    dump_table: bool,
}

fn run_replay(args: &ReplayArgs) -> ExitCode {
    let settings = match &args.config {
        Some(path) => replay::load_settings(path),
        None => Ok(replay::ReplaySettings::default()),
    };
    let result = settings.and_then(|settings| {
        let opts = ReplayOptions {
            conntrack: settings.conntrack,
            nat: settings.nat,
            invalid: args.invalid,
            dump_table: args.dump_table,
        };
        let files = ReplayFiles {
            input: args.input.clone(),
            output: args.output.clone(),
            records: Some(args.records.clone()),
        };
        replay::replay_files(&files, &opts)
    });
    match result {
        Ok(s) => {
            eprintln!(
                "ctoffload replay: {} packets, {} emitted, {} dropped",
                s.packets, s.emitted, s.dropped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ctoffload replay: error: {}", error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes on one line.
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    ctoffload_nic_sim::control::chain(e)
}

/// The `ctoffload` binary.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => demo::main(&args, cli.conn.socket.as_deref()),
        Command::Replay(args) => run_replay(&args),
        Command::Agent(args) => agent::main(&args, cli.conn.socket.as_deref()),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "ctoffload", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        command => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("ctoffload: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let target = cli.conn.target();
            match rt.block_on(client_command(&target, command)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ctoffload: {}", error_chain(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}

fn out(text: &str) -> Result<(), CliError> {
    let mut so = std::io::stdout().lock();
    so.write_all(text.as_bytes())
        .and_then(|()| so.flush())
        .map_err(CliError::Output)
}

fn out_json(v: &serde_json::Value) -> Result<(), CliError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| CliError::Other(e.to_string()))?;
    out(&format!("{text}\n"))
}

/// Check what can be checked locally, so that a usage error is reported as such even
/// when the agent is not running.
fn precheck(command: &Command) -> Result<(), CliError> {
    match command {
        Command::Flows(f) => match &f.cmd {
            None => f.list.filter.to_pb().map(drop),
            Some(FlowsCmd::List(l)) => l.filter.to_pb().map(drop),
            Some(FlowsCmd::Delete { filter, .. }) => filter.to_pb().map(drop),
            Some(FlowsCmd::Get { key, .. }) => key.to_pb().map(drop),
            Some(FlowsCmd::Flush) => Ok(()),
        },
        Command::Nat(NatCmd::Add { proto: Some(p), .. }) => parse_proto(p, "--proto").map(drop),
        Command::Timeouts(TimeoutsCmd::Set { values }) => timeouts_of(values).map(drop),
        _ => Ok(()),
    }
}

async fn client_command(target: &Target, command: Command) -> Result<(), CliError> {
    precheck(&command)?;
    let ch = match &command {
        Command::Agent(_) | Command::Completions { .. } | Command::Demo(_) | Command::Replay(_) => {
            return Ok(());
        }
        _ => client::connect(target).await?,
    };
    match command {
        Command::Flows(f) => flows(ch, f).await,
        Command::Events(e) => events(ch, e).await,
        Command::Stats(f) => {
            let s = StatsServiceClient::new(ch)
                .get_stats(pb::GetStatsRequest {})
                .await?
                .into_inner();
            match f.output {
                Format::Json => out_json(&output::stats_json(&s)),
                Format::Text => out(&output::stats_text(&s)),
            }
        }
        Command::Nat(n) => nat(ch, n).await,
        Command::Device(f) => {
            let d = DeviceServiceClient::new(ch)
                .get_device_status(pb::GetDeviceStatusRequest {})
                .await?
                .into_inner();
            match f.output {
                Format::Json => out_json(&output::device_json(&d)),
                Format::Text => {
                    let t = d.table.unwrap_or_default();
                    out(&output::kv(&[
                        ("backend".into(), d.backend.clone()),
                        ("identity".into(), d.identity.clone()),
                        ("spec_version".into(), or_none(&d.spec_version)),
                        ("capabilities".into(), d.capabilities.join(", ")),
                        ("health".into(), output::health_name(d.health).into()),
                        ("resets".into(), d.resets.to_string()),
                        ("errors".into(), d.errors.to_string()),
                        ("last_error".into(), or_none(&d.last_error)),
                        (
                            "table".into(),
                            format!(
                                "{} / {} (insert failures {})",
                                t.used, t.capacity, t.insert_failures
                            ),
                        ),
                    ]))
                }
            }
        }
        Command::Policy(p) => policy(ch, p).await,
        Command::Timeouts(t) => timeouts(ch, t).await,
        Command::Agent(_) | Command::Completions { .. } | Command::Demo(_) | Command::Replay(_) => {
            Ok(())
        }
    }
}

fn or_none(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

async fn flows(ch: Channel, f: FlowsArgs) -> Result<(), CliError> {
    let mut ct = ConntrackServiceClient::new(ch);
    match f.cmd.unwrap_or(FlowsCmd::List(f.list)) {
        FlowsCmd::List(l) => {
            let mut stream = ct
                .list_connections(pb::ListConnectionsRequest {
                    filter: Some(l.filter.to_pb()?),
                    batch_size: 0,
                    limit: l.limit.unwrap_or(0),
                })
                .await?
                .into_inner();
            let mut n = 0u64;
            let mut all = Vec::new();
            while let Some(batch) = stream.message().await? {
                for c in &batch.connections {
                    n += 1;
                    match l.output {
                        Format::Text => out(&format!("{}\n", output::conn_line(c)))?,
                        Format::Json => all.push(output::conn_json(c)),
                    }
                }
            }
            match l.output {
                Format::Json => out_json(&serde_json::Value::Array(all)),
                Format::Text => {
                    eprintln!("ctoffload: {n} flow entries have been shown.");
                    Ok(())
                }
            }
        }
        FlowsCmd::Get { key, output: fmt } => {
            let c = ct
                .get_connection(pb::GetConnectionRequest {
                    key: Some(key.to_pb()?),
                })
                .await?
                .into_inner();
            match fmt {
                Format::Json => out_json(&output::conn_json(&c)),
                Format::Text => out(&format!("{}\n", output::conn_line(&c))),
            }
        }
        FlowsCmd::Delete { id: Some(id), .. } => {
            let r = ct
                .delete_connection(pb::DeleteConnectionRequest {
                    key: Some(pb::ConnectionKey {
                        key: Some(pb::connection_key::Key::Id(id)),
                    }),
                })
                .await?
                .into_inner();
            if let Some(c) = r.connection {
                out(&format!("{}\n", output::conn_line(&c)))?;
            }
            eprintln!("ctoffload: 1 flow entries have been deleted.");
            Ok(())
        }
        FlowsCmd::Delete { id: None, filter } => {
            let r = ct
                .delete_connections(pb::DeleteConnectionsRequest {
                    filter: Some(filter.to_pb()?),
                })
                .await?
                .into_inner();
            eprintln!("ctoffload: {} flow entries have been deleted.", r.deleted);
            Ok(())
        }
        FlowsCmd::Flush => {
            let r = ct.flush(pb::FlushRequest {}).await?.into_inner();
            eprintln!(
                "ctoffload: connection tracking table has been emptied ({} deleted).",
                r.deleted
            );
            Ok(())
        }
    }
}

async fn events(ch: Channel, e: EventsArgs) -> Result<(), CliError> {
    let kinds = e
        .kinds
        .iter()
        .map(|k| {
            match k {
                EventKindArg::New => pb::EventKind::New,
                EventKindArg::StateChange => pb::EventKind::StateChange,
                EventKindArg::Offloaded => pb::EventKind::Offloaded,
                EventKindArg::Returned => pb::EventKind::ReturnedToSoftware,
                EventKindArg::EndOfFlow => pb::EventKind::EndOfFlow,
            }
            .into()
        })
        .collect();
    let mut stream = EventServiceClient::new(ch)
        .watch_events(pb::WatchEventsRequest {
            from_sequence: e.from,
            kinds,
        })
        .await?
        .into_inner();
    let mut n = 0u64;
    if e.count == Some(0) {
        return Ok(());
    }
    while let Some(r) = stream.message().await? {
        match e.output {
            Format::Text => out(&format!("{}\n", output::event_line(&r)))?,
            Format::Json => out(&format!("{}\n", output::event_json(&r)))?,
        }
        n += 1;
        if e.count.is_some_and(|c| n >= c) {
            break;
        }
    }
    Ok(())
}

fn split_range(s: &str) -> (&str, &str) {
    match s.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (s.trim(), s.trim()),
    }
}

async fn nat(ch: Channel, n: NatCmd) -> Result<(), CliError> {
    let mut c = NatServiceClient::new(ch);
    match n {
        NatCmd::List(f) => {
            let rules = c
                .list_nat_rules(pb::ListNatRulesRequest {})
                .await?
                .into_inner()
                .rules;
            match f.output {
                Format::Json => out_json(&serde_json::Value::Array(
                    rules.iter().map(output::nat_json).collect(),
                )),
                Format::Text => out(&output::nat_table(&rules)),
            }
        }
        NatCmd::Add {
            name,
            kind,
            proto,
            src,
            dst,
            zone,
            to,
            to_ports,
        } => {
            let (first, last) = split_range(&to);
            let to_ports = to_ports
                .as_deref()
                .map(|p| {
                    let (a, b) = split_range(p);
                    let num = |x: &str| {
                        x.parse::<u32>().map_err(|_| {
                            CliError::usage("--to-ports", format!("{x:?} is not a port number"))
                        })
                    };
                    Ok::<_, CliError>(pb::PortRange {
                        first: num(a)?,
                        last: num(b)?,
                    })
                })
                .transpose()?;
            let rule = pb::NatRule {
                name,
                kind: if kind == "dnat" {
                    pb::NatKind::Dnat
                } else {
                    pb::NatKind::Snat
                }
                .into(),
                protocol: proto
                    .as_deref()
                    .map(|p| parse_proto(p, "--proto"))
                    .transpose()?
                    .unwrap_or(0),
                src_prefix: src.unwrap_or_default(),
                dst_prefix: dst.unwrap_or_default(),
                zone,
                to_addresses: Some(pb::AddressRange {
                    first: first.to_owned(),
                    last: last.to_owned(),
                }),
                to_ports,
            };
            let r = c
                .add_nat_rule(pb::AddNatRuleRequest { rule: Some(rule) })
                .await?
                .into_inner();
            out(&output::nat_table(std::slice::from_ref(&r)))
        }
        NatCmd::Remove { name } => {
            c.remove_nat_rule(pb::RemoveNatRuleRequest { name: name.clone() })
                .await?;
            eprintln!("ctoffload: NAT rule {name:?} removed.");
            Ok(())
        }
    }
}

fn policy_text(p: &pb::OffloadPolicy) -> String {
    output::kv(&[
        ("enabled".into(), p.enabled.to_string()),
        ("tcp".into(), p.tcp.to_string()),
        ("udp".into(), p.udp.to_string()),
        ("min_packets".into(), p.min_packets.to_string()),
    ])
}

async fn policy(ch: Channel, p: PolicyCmd) -> Result<(), CliError> {
    let mut c = OffloadServiceClient::new(ch);
    match p {
        PolicyCmd::Get(f) => {
            let p = c
                .get_offload_policy(pb::GetOffloadPolicyRequest {})
                .await?
                .into_inner();
            match f.output {
                Format::Json => out_json(&output::policy_json(&p)),
                Format::Text => out(&policy_text(&p)),
            }
        }
        PolicyCmd::Set {
            enabled,
            tcp,
            udp,
            min_packets,
        } => {
            let mut p = c
                .get_offload_policy(pb::GetOffloadPolicyRequest {})
                .await?
                .into_inner();
            p.enabled = enabled.unwrap_or(p.enabled);
            p.tcp = tcp.unwrap_or(p.tcp);
            p.udp = udp.unwrap_or(p.udp);
            p.min_packets = min_packets.unwrap_or(p.min_packets);
            let p = c
                .set_offload_policy(pb::SetOffloadPolicyRequest { policy: Some(p) })
                .await?
                .into_inner();
            out(&policy_text(&p))
        }
        PolicyCmd::Drain { disable } => {
            let r = c
                .drain_offload(pb::DrainOffloadRequest { disable })
                .await?
                .into_inner();
            eprintln!("ctoffload: {} flows returned to software.", r.drained);
            Ok(())
        }
    }
}

fn timeouts_text(r: &pb::TimeoutsResponse) -> String {
    let t = r.timeouts.unwrap_or_default();
    let mut rows: Vec<(String, String)> = output::timeouts_rows(&t)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_string()))
        .collect();
    if r.restart_required {
        rows.push((
            "restart_required".into(),
            "true (the running engine could not take every value; see the agent's log)".into(),
        ));
    }
    output::kv(&rows)
}

async fn timeouts(ch: Channel, t: TimeoutsCmd) -> Result<(), CliError> {
    let mut c = SettingsServiceClient::new(ch);
    match t {
        TimeoutsCmd::Get(f) => {
            let r = c
                .get_timeouts(pb::GetTimeoutsRequest {})
                .await?
                .into_inner();
            match f.output {
                Format::Json => {
                    let t = r.timeouts.unwrap_or_default();
                    let mut m: serde_json::Map<String, serde_json::Value> =
                        output::timeouts_rows(&t)
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.into()))
                            .collect();
                    m.insert("restart_required".into(), r.restart_required.into());
                    out_json(&serde_json::Value::Object(m))
                }
                Format::Text => out(&timeouts_text(&r)),
            }
        }
        TimeoutsCmd::Set { values } => {
            let t = timeouts_of(&values)?;
            let r = c
                .set_timeouts(pb::SetTimeoutsRequest { timeouts: Some(t) })
                .await?
                .into_inner();
            out(&timeouts_text(&r))
        }
    }
}

/// `NAME=SECONDS` pairs as a timeouts update.
fn timeouts_of(values: &[String]) -> Result<pb::Timeouts, CliError> {
    let mut t = pb::Timeouts::default();
    for v in values {
        let (name, secs) = v
            .split_once('=')
            .ok_or_else(|| CliError::usage(v.clone(), "expected NAME=SECONDS (udp=45)"))?;
        let field = output::timeout_field(&mut t, name.trim()).ok_or_else(|| {
            CliError::usage(
                name.to_owned(),
                format!("not a timeout; one of {}", output::TIMEOUT_NAMES.join(", ")),
            )
        })?;
        *field = secs.trim().parse().map_err(|_| {
            CliError::usage(
                name.to_owned(),
                format!("{secs:?} is not a number of seconds"),
            )
        })?;
    }
    Ok(t)
}
