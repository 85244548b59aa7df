//! The agent's configuration file (TOML): what `ctoffload agent --config FILE` reads
//! at start and again on SIGHUP.
//!
//! Two layers: [`ConfigFile`] is the file as written (serde, `deny_unknown_fields`,
//! addresses still strings), [`AgentConfig`] the validated, typed result of
//! [`ConfigFile::validate`]. Every error names the key it is about, as a dotted path
//! with indices (`nat.rules[2].to_ports: range 2000-1000 is empty`).
//!
//! [`apply`] pushes the run-time settings of a configuration (timeouts, limits,
//! offload policy, every NAT rule) into a running [`ControlPlane`], which applies
//! them to its engine, without touching its connections. `docs/config.md` documents the
//! file for operators.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use ctoffload_fallback_sw::conntrack::{OtherTimeouts, Prefix};
use ctoffload_fallback_sw::nat::rules::{
    Backend as EngineBackend, NatAction, NatFlags, NatRule as EngineRule, NatRuleSet, PortRange,
    RuleError, RuleMatch, Selection,
};
use ctoffload_fallback_sw::tcp::TcpTimeouts;
use ctoffload_fallback_sw::tuple::{Family, proto as ipproto};
use ctoffload_proto::v1 as pb;
use serde::Deserialize;

use crate::api::control::ControlPlane;
use crate::api::convert::{MAX_CONNECTIONS, parse_ip, parse_prefix, rule_name};
use crate::api::error::ApiError;
use crate::api::model::{
    AddrRange, Limits, LimitsUpdate, MAX_TIMEOUT_S, NatKind, NatRule, OffloadPolicy, Timeouts,
    TimeoutsUpdate,
};
use crate::api::nat::{NatRules, engine_addr, engine_range, to_engine};
use crate::port::af_xdp::{AfXdpConfig, BusyPoll, NapiDeferral};

/// Where the agent listens and the CLI connects unless told otherwise.
pub const DEFAULT_SOCKET_PATH: &str = "/run/ctoffload/api.sock";
/// Where the agent reads its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ctoffload/ctoffload.toml";
/// Smallest and largest event journal capacity.
pub const JOURNAL_CAPACITY: std::ops::RangeInclusive<u64> = 16..=16_777_216;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the schema (unknown key, wrong type).
    #[error("{key}: {message}{}", line.map(|l| format!(" (line {l})")).unwrap_or_default())]
    Syntax {
        /// Dotted path of the key (`.` for the whole file).
        key: String,
        /// The parser's message.
        message: String,
        /// 1-based line, when known.
        line: Option<usize>,
    },
    /// A value is well-formed but not acceptable.
    #[error("{key}: {reason}")]
    Invalid {
        /// Dotted path of the key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// The key the error is about (`nat.rules[2].to_ports`), if any.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { key, .. } | Self::Invalid { key, .. } => Some(key),
        }
    }

    /// An API conversion error for a field below `parent`, as a config error.
    fn from_api(e: ApiError, parent: &str) -> Self {
        let e = if parent.is_empty() {
            e
        } else {
            e.within(parent)
        };
        match e {
            ApiError::InvalidArgument { field, reason }
            | ApiError::OutOfRange { field, reason }
            | ApiError::AlreadyExists { field, reason } => Self::Invalid { key: field, reason },
            other @ (ApiError::NotFound { .. }
            | ApiError::FailedPrecondition { .. }
            | ApiError::ResourceExhausted { .. }
            | ApiError::Delete { .. }
            | ApiError::ShuttingDown
            | ApiError::Poisoned { .. }) => Self::invalid(parent, other.to_string()),
        }
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

// ───────────────────────────── the file ─────────────────────────────

/// The configuration file as written. Every section is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[backend]`: where packets come from.
    #[serde(default)]
    pub backend: BackendSection,
    /// `[[ports]]`: the gateway's ports.
    #[serde(default)]
    pub ports: Vec<PortSection>,
    /// `[[routes]]`.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// `[nat]`.
    #[serde(default)]
    pub nat: NatSection,
    /// `[timeouts]`.
    #[serde(default)]
    pub timeouts: TimeoutsSection,
    /// `[limits]`.
    #[serde(default)]
    pub limits: LimitsSection,
    /// `[offload]`.
    #[serde(default)]
    pub offload: OffloadSection,
    /// `[api]`.
    #[serde(default)]
    pub api: ApiSection,
    /// `[metrics]`.
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// `[backend]`, chosen by `kind`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum BackendSection {
    /// The built-in device simulator.
    Sim {
        /// Hardware flow-table entries of the simulated device.
        #[serde(default)]
        table_size: Option<u32>,
        /// Host interfaces the simulated ports are wired to: `interfaces[i]` is port i
        /// (`[[ports]]` entry i); empty: in-memory ports.
        #[serde(default)]
        interfaces: Vec<String>,
        /// Control socket of a running `ctoffload-nic-sim` process to attach to,
        /// instead of running the model on a thread of the agent (device.md 19.4).
        #[serde(default)]
        sim_socket: Option<PathBuf>,
    },
    /// A real device through VFIO.
    Vfio {
        /// PCI address, `DDDD:BB:DD.F`.
        pci: String,
    },
    /// No device: everything in software.
    Software {
        /// Host interfaces to serve.
        #[serde(default)]
        interfaces: Vec<String>,
        /// How packets move between the interfaces and the agent.
        #[serde(default)]
        io: PacketIo,
        /// AF_XDP port options (with `io = "af_xdp"`).
        #[serde(default)]
        af_xdp: AfXdpSection,
    },
}

/// `[backend.af_xdp]`: options of the AF_XDP ports (`docs/af_xdp.md`). Every one is
/// off by default, which is what measured best on veth (copy mode).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AfXdpSection {
    /// `SO_BUSY_POLL` in µs with `SO_PREFER_BUSY_POLL` (0: no busy polling). Works
    /// with zero-copy sockets only (Linux 6.13 and later).
    #[serde(default)]
    pub busy_poll_us: u32,
    /// `SO_BUSY_POLL_BUDGET`: frames per busy poll (0: 64).
    #[serde(default)]
    pub busy_poll_budget: u32,
    /// The NAPIs' `defer_hard_irqs` while the ports are open (0: left alone).
    #[serde(default)]
    pub napi_defer_hard_irqs: u32,
    /// The NAPIs' `gro_flush_timeout` in µs while the ports are open (0: left alone;
    /// needs `napi_defer_hard_irqs`).
    #[serde(default)]
    pub gro_flush_timeout_us: u32,
    /// Established TCP/UDP flows NATed and forwarded by the XDP program itself, from a
    /// BPF flow table the forwarder fills (docs/af_xdp.md, "XDP flow table"). Off by
    /// default: frames from local stacks on veth carry partial checksums that XDP
    /// cannot see, so their senders must compute them in full.
    #[serde(default)]
    pub flow_offload: bool,
    /// Entries of that table (0: [`DEFAULT_FLOW_TABLE_ENTRIES`]; needs `flow_offload`).
    #[serde(default)]
    pub flow_table_entries: u32,
}

/// `backend.af_xdp.flow_table_entries` when not given.
pub const DEFAULT_FLOW_TABLE_ENTRIES: u32 = 131_072;

impl AfXdpSection {
    /// The port settings; an error names the field.
    fn validate(&self) -> Result<AfXdpConfig> {
        let key = |f: &str| format!("backend.af_xdp.{f}");
        if self.busy_poll_us == 0 && self.busy_poll_budget != 0 {
            return Err(ConfigError::invalid(
                key("busy_poll_budget"),
                "needs busy_poll_us (busy polling is off)",
            ));
        }
        if (self.napi_defer_hard_irqs == 0) != (self.gro_flush_timeout_us == 0) {
            // The one missing.
            let field = if self.napi_defer_hard_irqs == 0 {
                "napi_defer_hard_irqs"
            } else {
                "gro_flush_timeout_us"
            };
            return Err(ConfigError::invalid(
                key(field),
                "napi_defer_hard_irqs and gro_flush_timeout_us go together (both 0: off)",
            ));
        }
        if i32::try_from(self.napi_defer_hard_irqs).is_err() {
            return Err(ConfigError::invalid(
                key("napi_defer_hard_irqs"),
                "at most 2147483647",
            ));
        }
        if i32::try_from(self.busy_poll_us).is_err()
            || i32::try_from(self.busy_poll_budget).is_err()
        {
            return Err(ConfigError::invalid(
                key("busy_poll_us"),
                "busy_poll_us and busy_poll_budget: at most 2147483647",
            ));
        }
        if !self.flow_offload && self.flow_table_entries != 0 {
            return Err(ConfigError::invalid(
                key("flow_table_entries"),
                "needs flow_offload = true",
            ));
        }
        Ok(AfXdpConfig {
            flow_table_entries: match (self.flow_offload, self.flow_table_entries) {
                (false, _) => 0,
                (true, 0) => DEFAULT_FLOW_TABLE_ENTRIES,
                (true, n) => n,
            },
            busy_poll: (self.busy_poll_us > 0).then_some(BusyPoll {
                usecs: self.busy_poll_us,
                budget: if self.busy_poll_budget == 0 {
                    64
                } else {
                    self.busy_poll_budget
                },
            }),
            napi_deferral: (self.napi_defer_hard_irqs > 0).then_some(NapiDeferral {
                defer_hard_irqs: self.napi_defer_hard_irqs,
                gro_flush_timeout: std::time::Duration::from_micros(u64::from(
                    self.gro_flush_timeout_us,
                )),
            }),
            ..AfXdpConfig::default()
        })
    }
}

/// `backend.io` of the software backend.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PacketIo {
    /// `AF_PACKET` sockets (batch `recvmmsg`/`sendmmsg`).
    #[default]
    AfPacket,
    /// AF_XDP sockets (native XDP, else generic), falling back to `AF_PACKET` with the
    /// reason logged when XDP cannot attach (`docs/af_xdp.md`).
    AfXdp,
}

impl Default for BackendSection {
    /// The built-in simulated NIC: `ctoffload agent` with no configuration runs the
    /// dataplane over it.
    fn default() -> Self {
        Self::Sim {
            table_size: None,
            interfaces: Vec::new(),
            sim_socket: None,
        }
    }
}

/// `[[ports]]`: one gateway port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSection {
    /// Name, unique (referred to by routes and NAT rules).
    pub name: String,
    /// MAC address (`02:00:00:00:00:01`).
    pub mac: String,
    /// Addresses with prefix length (`192.0.2.1/24`, `2001:db8::1/64`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// `[[routes]]`: one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Destination prefix (`0.0.0.0/0`).
    pub prefix: String,
    /// Next hop; absent for a directly connected prefix.
    #[serde(default)]
    pub via: Option<String>,
    /// Egress port name.
    pub port: String,
}

/// `[nat]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// `[[nat.rules]]`, in order: the first matching rule of a hook wins.
    #[serde(default)]
    pub rules: Vec<NatRuleSection>,
}

/// What a NAT rule does.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NatRuleKind {
    /// Source NAT to `to_addresses` (and `to_ports`).
    Snat,
    /// Source NAT to the egress port's address.
    Masquerade,
    /// Destination NAT to `to_address` (and `to_port`).
    Dnat,
    /// Destination NAT and source NAT of the same connection.
    Fullnat,
    /// A virtual IP balanced over `backends`.
    Vip,
}

impl NatRuleKind {
    fn name(self) -> &'static str {
        match self {
            Self::Snat => "snat",
            Self::Masquerade => "masquerade",
            Self::Dnat => "dnat",
            Self::Fullnat => "fullnat",
            Self::Vip => "vip",
        }
    }
}

/// A protocol by name (`tcp`) or number (`6`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum ProtocolSpec {
    /// IP protocol number.
    Number(u8),
    /// `tcp`, `udp`, `icmp`, `icmpv6`, `sctp`, `dccp`, `udplite`.
    Name(String),
}

/// How a VIP chooses a backend.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum SelectionName {
    /// Weighted rendezvous hashing of the client's tuple.
    #[default]
    ConsistentHash,
    /// Smooth weighted round robin.
    RoundRobin,
}

/// One VIP backend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    /// Backend address.
    pub address: String,
    /// Backend port; absent keeps the destination port.
    #[serde(default)]
    pub port: Option<u16>,
    /// Relative weight, at least 1.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// `[[nat.rules]]`: one NAT rule. Which fields apply depends on `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatRuleSection {
    /// Unique name, 1 to 64 of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// What the rule does.
    pub kind: NatRuleKind,
    /// Match: protocol.
    #[serde(default)]
    pub protocol: Option<ProtocolSpec>,
    /// Match: original source prefix.
    #[serde(default)]
    pub src: Option<String>,
    /// Match: destination prefix.
    #[serde(default)]
    pub dst: Option<String>,
    /// Match: destination ports (`80` or `8000-8080`).
    #[serde(default)]
    pub dport: Option<String>,
    /// Match: ingress port name.
    #[serde(default)]
    pub in_port: Option<String>,
    /// Match: egress port name (source rules only).
    #[serde(default)]
    pub out_port: Option<String>,
    /// Match: conntrack zone.
    #[serde(default)]
    pub zone: Option<u16>,
    /// snat, fullnat: source addresses (`192.0.2.1` or `192.0.2.1-192.0.2.4`).
    #[serde(default)]
    pub to_addresses: Option<String>,
    /// snat, masquerade, fullnat: source ports (`1024-65535`).
    #[serde(default)]
    pub to_ports: Option<String>,
    /// dnat, fullnat: the internal address.
    #[serde(default)]
    pub to_address: Option<String>,
    /// dnat, fullnat: the internal port (absent keeps it).
    #[serde(default)]
    pub to_port: Option<u16>,
    /// snat, masquerade, fullnat: random port choice (`random-fully`).
    #[serde(default)]
    pub random_fully: bool,
    /// snat, masquerade, fullnat: one address per client (`persistent`).
    #[serde(default)]
    pub persistent: bool,
    /// vip: the backends.
    #[serde(default)]
    pub backends: Vec<BackendEntry>,
    /// vip: backend selection.
    #[serde(default)]
    pub selection: Option<SelectionName>,
}

/// `[timeouts]`, seconds, Linux sysctl names and defaults.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
#[allow(missing_docs)]
pub struct TimeoutsSection {
    pub tcp_syn_sent: u32,
    pub tcp_syn_recv: u32,
    pub tcp_established: u32,
    pub tcp_fin_wait: u32,
    pub tcp_close_wait: u32,
    pub tcp_last_ack: u32,
    pub tcp_time_wait: u32,
    pub tcp_close: u32,
    pub tcp_syn_sent2: u32,
    pub tcp_max_retrans: u32,
    pub tcp_unacknowledged: u32,
    pub udp: u32,
    pub udp_stream: u32,
    pub icmp: u32,
    pub generic: u32,
}

impl Default for TimeoutsSection {
    fn default() -> Self {
        let t = TcpTimeouts::default();
        let o = OtherTimeouts::default();
        Self {
            tcp_syn_sent: t.syn_sent,
            tcp_syn_recv: t.syn_recv,
            tcp_established: t.established,
            tcp_fin_wait: t.fin_wait,
            tcp_close_wait: t.close_wait,
            tcp_last_ack: t.last_ack,
            tcp_time_wait: t.time_wait,
            tcp_close: t.close,
            tcp_syn_sent2: t.syn_sent2,
            tcp_max_retrans: t.max_retrans,
            tcp_unacknowledged: t.unacknowledged,
            udp: o.udp,
            udp_stream: o.udp_stream,
            icmp: o.icmp,
            generic: o.generic,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Connections per table (`nf_conntrack_max`).
    pub max_connections: u64,
    /// Flows on the fast path at once.
    pub max_offloaded: u64,
    /// NAT rules.
    pub max_nat_rules: u64,
    /// Records kept by the event journal.
    pub event_journal_capacity: u64,
}

impl Default for LimitsSection {
    fn default() -> Self {
        Self {
            max_connections: 65_536,
            max_offloaded: 65_536,
            max_nat_rules: 1024,
            event_journal_capacity: 65_536,
        }
    }
}

/// What to do when an eligible flow finds the hardware table full.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Displacement {
    /// Keep the new flow in software.
    #[default]
    Never,
    /// Evict the offloaded flow idle the longest, if idle at least
    /// `displacement_min_idle_secs`.
    Idlest,
}

/// `[offload]`: the offload policy.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OffloadSection {
    /// Offload at all.
    pub enabled: bool,
    /// Offload TCP flows (once ESTABLISHED).
    pub tcp: bool,
    /// Offload UDP flows (once replied).
    pub udp: bool,
    /// Packets (both directions) a flow must have seen first.
    pub min_packets: u64,
    /// Table-full behaviour.
    pub displacement: Displacement,
    /// Idle time that makes a flow displaceable.
    pub displacement_min_idle_secs: u32,
}

impl Default for OffloadSection {
    fn default() -> Self {
        let p = OffloadPolicy::default();
        Self {
            enabled: true,
            tcp: p.tcp,
            udp: p.udp,
            min_packets: p.min_packets,
            displacement: Displacement::Never,
            displacement_min_idle_secs: 10,
        }
    }
}

/// `[api]`: where the gRPC API listens.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Unix socket (mode 0600).
    pub socket: PathBuf,
    /// Optional TCP address, served only with mutual TLS.
    pub tcp: Option<String>,
    /// TLS files, required with `tcp`.
    pub tls: Option<TlsSection>,
}

impl Default for ApiSection {
    fn default() -> Self {
        Self {
            socket: PathBuf::from(DEFAULT_SOCKET_PATH),
            tcp: None,
            tls: None,
        }
    }
}

/// `[api.tls]`: PEM files.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA that client certificates must chain to.
    pub client_ca: PathBuf,
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Address of the Prometheus endpoint (`GET /metrics`); absent: none.
    #[serde(default)]
    pub listen: Option<String>,
}

// ───────────────────────────── the validated result ─────────────────────────────

/// The validated backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// The simulator.
    Sim {
        /// Table entries.
        table_size: Option<u32>,
        /// Host interface of each port (index = port number).
        interfaces: Vec<String>,
        /// An external simulator process's control socket (`None`: in-process model).
        sim_socket: Option<PathBuf>,
    },
    /// VFIO.
    Vfio {
        /// PCI address.
        pci: String,
    },
    /// Software only.
    Software {
        /// Interfaces.
        interfaces: Vec<String>,
        /// Packet I/O.
        io: PacketIo,
        /// AF_XDP port settings (used with [`PacketIo::AfXdp`]).
        af_xdp: AfXdpConfig,
    },
}

/// A validated port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    /// Name.
    pub name: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// Addresses with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
}

/// A validated route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub prefix: Prefix,
    /// Next hop.
    pub via: Option<IpAddr>,
    /// Index of the egress port in [`AgentConfig::ports`].
    pub port: usize,
}

/// A validated NAT rule: the engine's form, and the API's when it can express it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfiguredNatRule {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: NatRuleKind,
    /// The NAT engine's rule (id = position + 1 in the file; the control plane
    /// installs it under an id of its own).
    pub engine: EngineRule,
    /// The API's view (`NatService`), for SNAT/DNAT rules that match only on
    /// protocol, prefixes and zone.
    pub api: Option<NatRule>,
}

impl ConfiguredNatRule {
    /// The same rule, wherever it is in the file (the engine id is the position).
    #[must_use]
    pub fn same_rule(&self, other: &Self) -> bool {
        let action_and_match = |r: &Self| (r.engine.r#match, r.engine.action.clone());
        self.name == other.name
            && self.kind == other.kind
            && self.api == other.api
            && action_and_match(self) == action_and_match(other)
    }
}

/// The validated TLS files (read at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate.
    pub cert: PathBuf,
    /// Key.
    pub key: PathBuf,
    /// Client CA.
    pub client_ca: PathBuf,
}

/// The validated API listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiListen {
    /// Unix socket.
    pub socket: PathBuf,
    /// TCP with its TLS files.
    pub tcp: Option<(SocketAddr, TlsFiles)>,
}

/// The offload settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OffloadConfig {
    /// The policy the API shows.
    pub policy: OffloadPolicy,
    /// Table-full behaviour (used by the hardware dataplane).
    pub displacement: Displacement,
    /// Idle time that makes a flow displaceable.
    pub displacement_min_idle_secs: u32,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// Backend.
    pub backend: Backend,
    /// Ports, in file order (a port's index is its number).
    pub ports: Vec<Port>,
    /// Routes.
    pub routes: Vec<Route>,
    /// NAT rules in order.
    pub nat_rules: Vec<ConfiguredNatRule>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Limits.
    pub limits: Limits,
    /// Offload.
    pub offload: OffloadConfig,
    /// API.
    pub api: ApiListen,
    /// Prometheus endpoint.
    pub metrics: Option<SocketAddr>,
}

/// Parse and validate a configuration text.
pub fn parse(text: &str) -> Result<AgentConfig> {
    parse_file(text)?.validate()
}

/// Parse without validating.
pub fn parse_file(text: &str) -> Result<ConfigFile> {
    let de = toml::Deserializer::parse(text).map_err(|e| syntax(".".into(), &e, text))?;
    serde_path_to_error::deserialize::<_, ConfigFile>(de).map_err(|e| {
        let key = e.path().to_string();
        syntax(key, e.inner(), text)
    })
}

fn syntax(key: String, e: &toml::de::Error, text: &str) -> ConfigError {
    let line = e
        .span()
        .map(|s| text.get(..s.start).map_or(0, |t| t.matches('\n').count()) + 1);
    ConfigError::Syntax {
        key,
        message: e.message().trim().to_owned(),
        line,
    }
}

/// Read and validate a configuration file.
pub fn load(path: &Path) -> Result<AgentConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

fn parse_mac(s: &str, key: &str) -> Result<[u8; 6]> {
    let bad = || {
        ConfigError::invalid(
            key,
            format!("{s:?} is not a MAC address (02:00:00:00:00:01)"),
        )
    };
    let mut mac = [0u8; 6];
    let mut n = 0;
    for part in s.split(':') {
        let slot = mac.get_mut(n).ok_or_else(bad)?;
        if part.len() != 2 {
            return Err(bad());
        }
        *slot = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        n += 1;
    }
    if n != 6 {
        return Err(bad());
    }
    Ok(mac)
}

fn parse_cidr(s: &str, key: &str) -> Result<(IpAddr, u8)> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| ConfigError::invalid(key, format!("{s:?} needs a prefix length (/24)")))?;
    let ip = parse_ip(a, key).map_err(|e| ConfigError::from_api(e, ""))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = l.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| {
        ConfigError::invalid(key, format!("prefix length {l:?} is not in 0..={max}"))
    })?;
    Ok((ip, len))
}

fn prefix(s: &str, key: &str) -> Result<Prefix> {
    parse_prefix(s, key)
        .map_err(|e| ConfigError::from_api(e, ""))?
        .ok_or_else(|| ConfigError::invalid(key, "empty"))
}

fn ip(s: &str, key: &str) -> Result<IpAddr> {
    parse_ip(s, key).map_err(|e| ConfigError::from_api(e, ""))
}

/// `a-b` or `a` as an inclusive port range.
fn port_range(s: &str, key: &str) -> Result<PortRange> {
    let num = |p: &str| {
        p.trim()
            .parse::<u16>()
            .map_err(|_| ConfigError::invalid(key, format!("{p:?} is not a port (0-65535)")))
    };
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let p = num(s)?;
            (p, p)
        }
    };
    if a > b {
        return Err(ConfigError::invalid(key, format!("range {a}-{b} is empty")));
    }
    if a == 0 {
        return Err(ConfigError::invalid(key, "port 0 is not usable"));
    }
    Ok(PortRange::new(a, b))
}

/// `a-b` or `a` as an inclusive address range.
fn addr_range(s: &str, key: &str) -> Result<(IpAddr, IpAddr)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (ip(a, key)?, ip(b, key)?),
        None => {
            let a = ip(s, key)?;
            (a, a)
        }
    };
    if a.is_ipv4() != b.is_ipv4() {
        return Err(ConfigError::invalid(
            key,
            format!("{a} and {b} are of different address families"),
        ));
    }
    let r = AddrRange { first: a, last: b };
    if r.is_empty() {
        return Err(ConfigError::invalid(key, format!("range {a}-{b} is empty")));
    }
    Ok((a, b))
}

fn protocol(p: &ProtocolSpec, key: &str) -> Result<u8> {
    match p {
        ProtocolSpec::Number(n) => Ok(*n),
        ProtocolSpec::Name(n) => protocol_number(n).ok_or_else(|| {
            ConfigError::invalid(
                key,
                format!("{n:?} is not tcp, udp, icmp, icmpv6, sctp, dccp, udplite or a number"),
            )
        }),
    }
}

/// A protocol name or number (`tcp`, `6`).
#[must_use]
pub fn protocol_number(name: &str) -> Option<u8> {
    Some(match name.to_ascii_lowercase().as_str() {
        "tcp" => ipproto::TCP,
        "udp" => ipproto::UDP,
        "icmp" => ipproto::ICMP,
        "icmpv6" | "ipv6-icmp" => ipproto::ICMPV6,
        "sctp" => ipproto::SCTP,
        "dccp" => ipproto::DCCP,
        "udplite" => ipproto::UDPLITE,
        other => return other.parse().ok(),
    })
}

fn valid_pci(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 12
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b':',
            10 => *c == b'.',
            11 => (b'0'..=b'7').contains(c),
            _ => c.is_ascii_hexdigit(),
        })
}

/// `backend.interfaces`: interface names, each once.
fn validate_interfaces(interfaces: &[String]) -> Result<()> {
    let mut seen = HashSet::new();
    for (i, name) in interfaces.iter().enumerate() {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
            return Err(ConfigError::invalid(
                format!("backend.interfaces[{i}]"),
                format!("{name:?} is not an interface name (1 to 15 characters, no '/' or space)"),
            ));
        }
        if !seen.insert(name) {
            return Err(ConfigError::invalid(
                format!("backend.interfaces[{i}]"),
                format!("{name:?} is listed twice"),
            ));
        }
    }
    Ok(())
}

impl ConfigFile {
    /// Check every value; the first problem is returned, naming its key.
    pub fn validate(&self) -> Result<AgentConfig> {
        let backend = match &self.backend {
            BackendSection::Sim {
                table_size,
                interfaces,
                sim_socket,
            } => {
                if sim_socket.is_some() && table_size.is_some() {
                    return Err(ConfigError::invalid(
                        "backend.table_size",
                        "set by the simulator process (--buckets-log2) when \
                         backend.sim_socket is given",
                    ));
                }
                if sim_socket
                    .as_ref()
                    .is_some_and(|p| p.as_os_str().is_empty())
                {
                    return Err(ConfigError::invalid("backend.sim_socket", "empty path"));
                }
                if *table_size == Some(0) {
                    return Err(ConfigError::invalid(
                        "backend.table_size",
                        "must be at least 1",
                    ));
                }
                validate_interfaces(interfaces)?;
                if !interfaces.is_empty() && interfaces.len() != self.ports.len() {
                    return Err(ConfigError::invalid(
                        "backend.interfaces",
                        format!(
                            "{} interfaces for {} [[ports]]: one interface per port",
                            interfaces.len(),
                            self.ports.len()
                        ),
                    ));
                }
                Backend::Sim {
                    table_size: *table_size,
                    interfaces: interfaces.clone(),
                    sim_socket: sim_socket.clone(),
                }
            }
            BackendSection::Vfio { pci } => {
                if !valid_pci(pci) {
                    return Err(ConfigError::invalid(
                        "backend.pci",
                        format!("{pci:?} is not a PCI address (0000:03:00.0)"),
                    ));
                }
                Backend::Vfio { pci: pci.clone() }
            }
            BackendSection::Software {
                interfaces,
                io,
                af_xdp,
            } => {
                validate_interfaces(interfaces)?;
                Backend::Software {
                    interfaces: interfaces.clone(),
                    io: *io,
                    af_xdp: af_xdp.validate()?,
                }
            }
        };

        let mut ports = Vec::with_capacity(self.ports.len());
        let mut port_index = HashMap::new();
        for (i, p) in self.ports.iter().enumerate() {
            let key = format!("ports[{i}]");
            rule_name(&p.name, "name").map_err(|e| ConfigError::from_api(e, &key))?;
            if port_index.insert(p.name.clone(), i).is_some() {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("a port named {:?} exists", p.name),
                ));
            }
            let mac = parse_mac(&p.mac, &format!("{key}.mac"))?;
            let addresses = p
                .addresses
                .iter()
                .enumerate()
                .map(|(j, a)| parse_cidr(a, &format!("{key}.addresses[{j}]")))
                .collect::<Result<Vec<_>>>()?;
            ports.push(Port {
                name: p.name.clone(),
                mac,
                addresses,
            });
        }
        let port_of = |name: &str, key: String| {
            port_index.get(name).copied().ok_or_else(|| {
                ConfigError::invalid(key, format!("no port named {name:?} in [[ports]]"))
            })
        };

        let mut routes = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            let key = format!("routes[{i}]");
            let pfx = prefix(&r.prefix, &format!("{key}.prefix"))?;
            let via = r
                .via
                .as_deref()
                .map(|v| ip(v, &format!("{key}.via")))
                .transpose()?;
            if let Some(v) = via
                && (v.is_ipv4() != (pfx.family == Family::V4))
            {
                return Err(ConfigError::invalid(
                    format!("{key}.via"),
                    format!("{v} is not of the prefix's address family"),
                ));
            }
            routes.push(Route {
                prefix: pfx,
                via,
                port: port_of(&r.port, format!("{key}.port"))?,
            });
        }

        let timeouts = self.timeouts.validate()?;
        let limits = self.limits.validate()?;
        let offload = self.offload.validate()?;
        let nat_rules = self.validate_nat(&port_of, limits.max_nat_rules)?;
        let api = self.api.validate()?;
        let metrics = self
            .metrics
            .listen
            .as_deref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    ConfigError::invalid("metrics.listen", format!("{a:?} is not an address:port"))
                })
            })
            .transpose()?;
        Ok(AgentConfig {
            backend,
            ports,
            routes,
            nat_rules,
            timeouts,
            limits,
            offload,
            api,
            metrics,
        })
    }

    fn validate_nat(
        &self,
        port_of: &dyn Fn(&str, String) -> Result<usize>,
        max_rules: u64,
    ) -> Result<Vec<ConfiguredNatRule>> {
        if self.nat.rules.len() as u64 > max_rules {
            return Err(ConfigError::invalid(
                "nat.rules",
                format!(
                    "{} rules, more than limits.max_nat_rules ({max_rules})",
                    self.nat.rules.len()
                ),
            ));
        }
        let mut engine = NatRuleSet::default();
        let mut api_store = NatRules::default();
        let mut scratch = NatRuleSet::default();
        let mut names = HashSet::new();
        let mut out = Vec::with_capacity(self.nat.rules.len());
        for (i, r) in self.nat.rules.iter().enumerate() {
            let key = format!("nat.rules[{i}]");
            let rule = r.validate(&key, i, port_of)?;
            if !names.insert(rule.name.clone()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("a NAT rule named {:?} exists", rule.name),
                ));
            }
            engine
                .add(rule.engine.clone())
                .map_err(|e| engine_error(&e, &key, &self.nat.rules))?;
            // The API's checks (pool overlaps among the rules it shows), on a scratch
            // engine: `engine` above has checked the engine's.
            if let Some(api) = &rule.api {
                api_store
                    .install(
                        rule.name.clone(),
                        Some(api.clone()),
                        rule.engine.clone(),
                        u64::MAX,
                        &mut scratch,
                    )
                    .map_err(|e| ConfigError::from_api(e, &key))?;
            }
            out.push(rule);
        }
        Ok(out)
    }
}

/// An engine rule error as a config error on the key it concerns.
fn engine_error(e: &RuleError, key: &str, rules: &[NatRuleSection]) -> ConfigError {
    let field = match e {
        RuleError::ReversedRange { field, .. }
        | RuleError::EmptyRange { field, .. }
        | RuleError::FamilyMismatch { field, .. }
        | RuleError::Ipv6Unsupported { field, .. }
        | RuleError::PortsNeedProtocol { field, .. } => Some(*field),
        RuleError::OutPortOnDstRule { .. } => Some("match.out_port"),
        RuleError::OverlappingPool { .. } => Some("action.addrs"),
        RuleError::NoBackends { .. }
        | RuleError::ZeroWeight { .. }
        | RuleError::DuplicateBackend { .. } => Some("action.backends"),
        RuleError::DuplicateId { .. } | RuleError::NoSuchRule { .. } | RuleError::NotVip { .. } => {
            None
        }
    };
    let ours = field.map(|f| match f {
        "match.src" => "src",
        "match.dst" => "dst",
        "match.dport" => "dport",
        "match.out_port" => "out_port",
        "action.addrs" | "action.snat_addrs" => "to_addresses",
        "action.ports" | "action.snat_ports" => "to_ports",
        "action.to_addr" => "to_address",
        "action.to_port" => "to_port",
        _ => "backends",
    });
    let mut reason = e.to_string();
    if let Some((_, rest)) = reason.split_once(": ") {
        reason = rest.to_owned();
    }
    if let (Some(f), Some(o)) = (field, ours) {
        reason = reason.replace(f, o);
    }
    let key = match ours {
        Some(f) => format!("{key}.{f}"),
        None => key.to_owned(),
    };
    if let RuleError::OverlappingPool { other, .. } = e {
        let idx = usize::try_from(*other).unwrap_or(0).saturating_sub(1);
        let name = rules.get(idx).map_or("?", |r| r.name.as_str());
        reason = format!("source pool overlaps the pool of nat.rules[{idx}] ({name:?})");
    }
    ConfigError::invalid(key, reason)
}

impl NatRuleSection {
    fn validate(
        &self,
        key: &str,
        index: usize,
        port_of: &dyn Fn(&str, String) -> Result<usize>,
    ) -> Result<ConfiguredNatRule> {
        let k = |f: &str| format!("{key}.{f}");
        let name = rule_name(&self.name, "name").map_err(|e| ConfigError::from_api(e, key))?;
        let kind = self.kind;
        let not_for = |field: &str, present: bool| -> Result<()> {
            if present {
                Err(ConfigError::invalid(
                    k(field),
                    format!("not used by a {} rule", kind.name()),
                ))
            } else {
                Ok(())
            }
        };
        let is_src = matches!(kind, NatRuleKind::Snat | NatRuleKind::Masquerade);
        let has_snat = matches!(
            kind,
            NatRuleKind::Snat | NatRuleKind::Masquerade | NatRuleKind::Fullnat
        );
        let has_dnat = matches!(kind, NatRuleKind::Dnat | NatRuleKind::Fullnat);
        not_for(
            "to_addresses",
            self.to_addresses.is_some()
                && !matches!(kind, NatRuleKind::Snat | NatRuleKind::Fullnat),
        )?;
        not_for("to_ports", self.to_ports.is_some() && !has_snat)?;
        not_for("random_fully", self.random_fully && !has_snat)?;
        not_for("persistent", self.persistent && !has_snat)?;
        not_for("to_address", self.to_address.is_some() && !has_dnat)?;
        not_for("to_port", self.to_port.is_some() && !has_dnat)?;
        not_for(
            "backends",
            !self.backends.is_empty() && kind != NatRuleKind::Vip,
        )?;
        not_for(
            "selection",
            self.selection.is_some() && kind != NatRuleKind::Vip,
        )?;
        if self.out_port.is_some() && !is_src {
            return Err(ConfigError::invalid(
                k("out_port"),
                "only source rules (snat, masquerade) can match the egress port",
            ));
        }

        let proto = self
            .protocol
            .as_ref()
            .map(|p| protocol(p, &k("protocol")))
            .transpose()?;
        let src = self
            .src
            .as_deref()
            .map(|s| prefix(s, &k("src")))
            .transpose()?;
        let dst = self
            .dst
            .as_deref()
            .map(|s| prefix(s, &k("dst")))
            .transpose()?;
        let dport = self
            .dport
            .as_deref()
            .map(|s| port_range(s, &k("dport")))
            .transpose()?;
        let in_port = self
            .in_port
            .as_deref()
            .map(|p| port_of(p, k("in_port")))
            .transpose()?;
        let out_port = self
            .out_port
            .as_deref()
            .map(|p| port_of(p, k("out_port")))
            .transpose()?;
        let to_ports = self
            .to_ports
            .as_deref()
            .map(|s| port_range(s, &k("to_ports")))
            .transpose()?;
        let required = |v: Option<&String>, field: &str| -> Result<String> {
            v.cloned().ok_or_else(|| {
                ConfigError::invalid(k(field), format!("required by a {} rule", kind.name()))
            })
        };
        let flags = NatFlags {
            random_fully: self.random_fully,
            persistent: self.persistent,
        };
        let id =
            u32::try_from(index + 1).map_err(|_| ConfigError::invalid(key, "too many rules"))?;
        // SNAT and DNAT rules are the API's rules plus the matches and flags the API
        // lacks: one conversion to the engine's form (`api::nat::to_engine`).
        let base = match kind {
            NatRuleKind::Snat => {
                let (first, last) = addr_range(
                    &required(self.to_addresses.as_ref(), "to_addresses")?,
                    &k("to_addresses"),
                )?;
                Some((NatKind::Snat, AddrRange { first, last }, to_ports))
            }
            NatRuleKind::Dnat => {
                let a = ip(
                    &required(self.to_address.as_ref(), "to_address")?,
                    &k("to_address"),
                )?;
                let port = self.to_port.map(|p| PortRange::new(p, p));
                Some((NatKind::Dnat, AddrRange { first: a, last: a }, port))
            }
            NatRuleKind::Masquerade | NatRuleKind::Fullnat | NatRuleKind::Vip => None,
        };
        let base = base.map(|(nat_kind, to_addrs, ports)| NatRule {
            name: name.clone(),
            kind: nat_kind,
            protocol: proto,
            src,
            dst,
            zone: self.zone,
            to_addrs,
            to_ports: ports.map(|p| (p.min, p.max)),
        });
        let action = match (kind, &base) {
            (NatRuleKind::Snat | NatRuleKind::Dnat, Some(b)) => {
                let mut action = to_engine(b, id)
                    .map_err(|e| ConfigError::from_api(e, key))?
                    .action;
                if let NatAction::Snat { flags: f, .. } = &mut action {
                    *f = flags;
                }
                action
            }
            (NatRuleKind::Masquerade, _) => NatAction::Masquerade {
                ports: to_ports,
                flags,
            },
            (NatRuleKind::Fullnat, _) => {
                let a = ip(
                    &required(self.to_address.as_ref(), "to_address")?,
                    &k("to_address"),
                )?;
                let (first, last) = addr_range(
                    &required(self.to_addresses.as_ref(), "to_addresses")?,
                    &k("to_addresses"),
                )?;
                NatAction::FullNat {
                    to_addr: engine_addr(a),
                    to_port: self.to_port,
                    snat_addrs: engine_range(AddrRange { first, last }),
                    snat_ports: to_ports,
                    flags,
                }
            }
            (NatRuleKind::Vip, _) => {
                if self.backends.is_empty() {
                    return Err(ConfigError::invalid(
                        k("backends"),
                        "a vip rule needs at least one backend",
                    ));
                }
                let backends = self
                    .backends
                    .iter()
                    .enumerate()
                    .map(|(j, b)| {
                        let a = ip(&b.address, &k(&format!("backends[{j}].address")))?;
                        if b.weight == 0 {
                            return Err(ConfigError::invalid(
                                k(&format!("backends[{j}].weight")),
                                "must be at least 1",
                            ));
                        }
                        Ok(EngineBackend {
                            addr: engine_addr(a),
                            port: b.port,
                            weight: b.weight,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                NatAction::Vip {
                    backends,
                    selection: match self.selection.unwrap_or_default() {
                        SelectionName::ConsistentHash => Selection::ConsistentHash,
                        SelectionName::RoundRobin => Selection::WeightedRoundRobin,
                    },
                }
            }
            (NatRuleKind::Snat | NatRuleKind::Dnat, None) => {
                return Err(ConfigError::invalid(key, "internal: no base rule"));
            }
        };
        let engine = EngineRule {
            id,
            r#match: RuleMatch {
                in_port: in_port.map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
                out_port: out_port.map(|p| u32::try_from(p).unwrap_or(u32::MAX)),
                src,
                dst,
                proto,
                dport,
                zone: self.zone,
            },
            action,
        };
        // The API's NatService shows SNAT and DNAT rules that match on protocol,
        // prefixes and zone only; the others exist for the dataplane alone. The API's
        // form is checked as the API would check it (a round trip through protobuf).
        let api = match base {
            Some(b)
                if dport.is_none()
                    && in_port.is_none()
                    && out_port.is_none()
                    && !self.random_fully
                    && !self.persistent =>
            {
                let rule = NatRule::try_from(&pb::NatRule::from(&b)).map_err(|e| {
                    let e = match e {
                        ApiError::InvalidArgument { field, reason }
                            if kind == NatRuleKind::Dnat =>
                        {
                            ApiError::InvalidArgument {
                                field: field
                                    .replace("to_addresses", "to_address")
                                    .replace("to_ports", "to_port"),
                                reason,
                            }
                        }
                        other => other,
                    };
                    ConfigError::from_api(e, key)
                })?;
                Some(rule)
            }
            Some(_) | None => None,
        };
        Ok(ConfiguredNatRule {
            name,
            kind,
            engine,
            api,
        })
    }
}

impl TimeoutsSection {
    fn validate(&self) -> Result<Timeouts> {
        let t = self;
        for (v, name) in [
            (t.tcp_syn_sent, "tcp_syn_sent"),
            (t.tcp_syn_recv, "tcp_syn_recv"),
            (t.tcp_established, "tcp_established"),
            (t.tcp_fin_wait, "tcp_fin_wait"),
            (t.tcp_close_wait, "tcp_close_wait"),
            (t.tcp_last_ack, "tcp_last_ack"),
            (t.tcp_time_wait, "tcp_time_wait"),
            (t.tcp_close, "tcp_close"),
            (t.tcp_syn_sent2, "tcp_syn_sent2"),
            (t.tcp_max_retrans, "tcp_max_retrans"),
            (t.tcp_unacknowledged, "tcp_unacknowledged"),
            (t.udp, "udp"),
            (t.udp_stream, "udp_stream"),
            (t.icmp, "icmp"),
            (t.generic, "generic"),
        ] {
            if !(1..=MAX_TIMEOUT_S).contains(&v) {
                return Err(ConfigError::invalid(
                    format!("timeouts.{name}"),
                    format!("{v} is not in 1..={MAX_TIMEOUT_S} seconds"),
                ));
            }
        }
        Ok(Timeouts {
            tcp: TcpTimeouts {
                syn_sent: t.tcp_syn_sent,
                syn_recv: t.tcp_syn_recv,
                established: t.tcp_established,
                fin_wait: t.tcp_fin_wait,
                close_wait: t.tcp_close_wait,
                last_ack: t.tcp_last_ack,
                time_wait: t.tcp_time_wait,
                close: t.tcp_close,
                syn_sent2: t.tcp_syn_sent2,
                max_retrans: t.tcp_max_retrans,
                unacknowledged: t.tcp_unacknowledged,
            },
            other: OtherTimeouts {
                udp: t.udp,
                udp_stream: t.udp_stream,
                icmp: t.icmp,
                generic: t.generic,
            },
        })
    }
}

impl LimitsSection {
    fn validate(&self) -> Result<Limits> {
        let l = self;
        if !(1..=MAX_CONNECTIONS).contains(&l.max_connections) {
            return Err(ConfigError::invalid(
                "limits.max_connections",
                format!("{} is not in 1..={MAX_CONNECTIONS}", l.max_connections),
            ));
        }
        if l.max_offloaded == 0 {
            return Err(ConfigError::invalid(
                "limits.max_offloaded",
                "must be at least 1",
            ));
        }
        if l.max_nat_rules == 0 {
            return Err(ConfigError::invalid(
                "limits.max_nat_rules",
                "must be at least 1",
            ));
        }
        if !JOURNAL_CAPACITY.contains(&l.event_journal_capacity) {
            return Err(ConfigError::invalid(
                "limits.event_journal_capacity",
                format!(
                    "{} is not in {}..={}",
                    l.event_journal_capacity,
                    JOURNAL_CAPACITY.start(),
                    JOURNAL_CAPACITY.end()
                ),
            ));
        }
        Ok(Limits {
            max_connections: l.max_connections,
            max_offloaded: l.max_offloaded,
            max_nat_rules: l.max_nat_rules,
            event_journal_capacity: l.event_journal_capacity,
        })
    }
}

impl OffloadSection {
    fn validate(&self) -> Result<OffloadConfig> {
        if self.enabled && !self.tcp && !self.udp {
            return Err(ConfigError::invalid(
                "offload.enabled",
                "an enabled policy needs tcp or udp",
            ));
        }
        Ok(OffloadConfig {
            policy: OffloadPolicy {
                enabled: self.enabled,
                tcp: self.tcp,
                udp: self.udp,
                min_packets: self.min_packets,
            },
            displacement: self.displacement,
            displacement_min_idle_secs: self.displacement_min_idle_secs,
        })
    }
}

impl ApiSection {
    fn validate(&self) -> Result<ApiListen> {
        if self.socket.as_os_str().is_empty() {
            return Err(ConfigError::invalid("api.socket", "empty path"));
        }
        let tcp = match (&self.tcp, &self.tls) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "api.tls",
                    "set only together with api.tcp",
                ));
            }
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "api.tls",
                    "required with api.tcp: TCP is served only with mutual TLS",
                ));
            }
            (Some(addr), Some(tls)) => {
                let addr = addr.parse::<SocketAddr>().map_err(|_| {
                    ConfigError::invalid("api.tcp", format!("{addr:?} is not an address:port"))
                })?;
                Some((
                    addr,
                    TlsFiles {
                        cert: tls.cert.clone(),
                        key: tls.key.clone(),
                        client_ca: tls.client_ca.clone(),
                    },
                ))
            }
        };
        Ok(ApiListen {
            socket: self.socket.clone(),
            tcp,
        })
    }
}

// ───────────────────────────── applying ─────────────────────────────

/// What [`apply`] did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Settings changed in the control plane (`timeouts`, `limits`, `offload`,
    /// `nat.rules[NAME]`).
    pub applied: Vec<String>,
    /// Keys whose new value takes effect only after a restart.
    pub restart_required: Vec<&'static str>,
    /// Settings the control plane refused, with why.
    pub failed: Vec<(String, ApiError)>,
}

/// Push the run-time settings of `new` into `control`, given the configuration it
/// runs with now (`old`; `None` at start). Connections are untouched. Everything here
/// applies to the running engine (see [`crate::api::settings`]): timeouts (existing
/// connections at their next packet), limits, the offload policy, and every NAT rule
/// of the file, managed by name: rules `old` had and `new` lacks or changes are
/// removed (their connections keep their binding), new or changed ones added after
/// the rules already installed; rules added through the API are left alone.
pub fn apply<C: ControlPlane + ?Sized>(
    control: &C,
    old: Option<&AgentConfig>,
    new: &AgentConfig,
) -> ApplyReport {
    let mut report = ApplyReport::default();
    if old.is_none_or(|o| o.timeouts != new.timeouts) {
        match control.set_timeouts(TimeoutsUpdate(new.timeouts)) {
            Ok(c) => {
                report.applied.push("timeouts".into());
                if c.restart_required {
                    report.restart_required.push("timeouts");
                }
            }
            Err(e) => report.failed.push(("timeouts".into(), e)),
        }
    }
    if old.is_none_or(|o| o.offload.policy != new.offload.policy) {
        match control.set_offload_policy(new.offload.policy) {
            Ok(_) => report.applied.push("offload".into()),
            Err(e) => report.failed.push(("offload".into(), e)),
        }
    }
    let old_rules = old.map_or(&[][..], |o| o.nat_rules.as_slice());
    let kept =
        |r: &ConfiguredNatRule, among: &[ConfiguredNatRule]| among.iter().any(|o| o.same_rule(r));
    for r in old_rules.iter().filter(|r| !kept(r, &new.nat_rules)) {
        match control.remove_nat_rule(&r.name) {
            Ok(()) => report
                .applied
                .push(format!("nat.rules[{}] removed", r.name)),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => report.failed.push((format!("nat.rules[{}]", r.name), e)),
        }
    }
    // Limits after removals (a lower max_nat_rules may need them) and before
    // additions.
    if old.is_none_or(|o| o.limits != new.limits) {
        match control.set_limits(LimitsUpdate(new.limits)) {
            Ok(c) => {
                report.applied.push("limits".into());
                if c.restart_required {
                    report
                        .restart_required
                        .push("limits.max_connections (above the table's allocated size)");
                }
            }
            Err(e) => report.failed.push(("limits".into(), e)),
        }
    }
    let added: Vec<&ConfiguredNatRule> = new
        .nat_rules
        .iter()
        .filter(|r| !kept(r, old_rules))
        .collect();
    for r in &added {
        match control.add_engine_nat_rule(r.name.clone(), r.engine.clone(), r.api.clone()) {
            Ok(()) => report.applied.push(format!("nat.rules[{}] added", r.name)),
            Err(e) => report.failed.push((format!("nat.rules[{}]", r.name), e)),
        }
    }
    // Rules match in order; added rules go after the kept ones. A file whose order
    // differs from that gets it only at a restart.
    let running = old_rules
        .iter()
        .filter(|r| kept(r, &new.nat_rules))
        .chain(added.iter().copied())
        .map(|r| r.name.as_str());
    if !running.eq(new.nat_rules.iter().map(|r| r.name.as_str())) {
        report
            .restart_required
            .push("nat.rules (order: reloaded rules match after the others)");
    }
    if let Some(o) = old {
        for (changed, key) in [
            (o.backend != new.backend, "backend"),
            (o.ports != new.ports, "ports"),
            (o.routes != new.routes, "routes"),
            (o.api != new.api, "api"),
            (o.metrics != new.metrics, "metrics"),
            (
                o.offload.displacement != new.offload.displacement
                    || o.offload.displacement_min_idle_secs
                        != new.offload.displacement_min_idle_secs,
                "offload.displacement",
            ),
        ] {
            if changed {
                report.restart_required.push(key);
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_linux_defaults() {
        let c = parse("").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.timeouts.tcp.established, 432_000);
        assert_eq!(c.timeouts.other.udp, 30);
        assert_eq!(c.api.socket, PathBuf::from(DEFAULT_SOCKET_PATH));
        assert!(c.metrics.is_none());
    }

    #[test]
    fn sim_socket_names_an_external_simulator_process() {
        let c = parse("[backend]\nkind = \"sim\"\nsim_socket = \"/run/ctoffload/nic-sim.sock\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            c.backend,
            Backend::Sim {
                table_size: None,
                interfaces: Vec::new(),
                sim_socket: Some(PathBuf::from("/run/ctoffload/nic-sim.sock")),
            }
        );
        let e = parse("[backend]\nkind = \"sim\"\nsim_socket = \"/s\"\ntable_size = 4096\n")
            .expect_err("the process sizes its table");
        assert_eq!(e.key(), Some("backend.table_size"));
        let e = parse("[backend]\nkind = \"sim\"\nsim_socket = \"\"\n").expect_err("empty");
        assert_eq!(e.key(), Some("backend.sim_socket"));
    }

    #[test]
    fn flow_offload_sizes_the_xdp_flow_table() {
        let get = |extra: &str| {
            parse(&format!(
                "[backend]\nkind = \"software\"\nio = \"af_xdp\"\n[backend.af_xdp]\n{extra}"
            ))
            .map(|c| match c.backend {
                Backend::Software { af_xdp, .. } => af_xdp.flow_table_entries,
                Backend::Sim { .. } | Backend::Vfio { .. } => u32::MAX,
            })
        };
        assert_eq!(get("").expect("valid"), 0);
        assert_eq!(
            get("flow_offload = true").expect("valid"),
            DEFAULT_FLOW_TABLE_ENTRIES
        );
        assert_eq!(
            get("flow_offload = true\nflow_table_entries = 1024").expect("valid"),
            1024
        );
        let e = get("flow_table_entries = 1024").expect_err("needs flow_offload");
        assert!(
            e.to_string().contains("backend.af_xdp.flow_table_entries"),
            "{e}"
        );
    }

    #[test]
    fn af_xdp_options_become_port_settings() {
        let c = parse(
            "[backend]\nkind = \"software\"\ninterfaces = [\"eth0\"]\nio = \"af_xdp\"\n\
             [backend.af_xdp]\nbusy_poll_us = 50\nnapi_defer_hard_irqs = 10\n\
             gro_flush_timeout_us = 200\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let Backend::Software { io, af_xdp, .. } = c.backend else {
            panic!("software backend: {:?}", c.backend);
        };
        assert_eq!(io, PacketIo::AfXdp);
        assert_eq!(
            af_xdp.busy_poll,
            Some(BusyPoll {
                usecs: 50,
                budget: 64
            })
        );
        assert_eq!(
            af_xdp.napi_deferral,
            Some(NapiDeferral {
                defer_hard_irqs: 10,
                gro_flush_timeout: std::time::Duration::from_micros(200),
            })
        );
        // Without the table: the port's defaults (everything off).
        let c = parse("[backend]\nkind = \"software\"\nio = \"af_xdp\"\n")
            .unwrap_or_else(|e| panic!("{e}"));
        let Backend::Software { af_xdp, .. } = c.backend else {
            panic!("software backend");
        };
        assert_eq!(af_xdp, AfXdpConfig::default());
        for (table, key) in [
            (
                "napi_defer_hard_irqs = 4",
                "backend.af_xdp.gro_flush_timeout_us",
            ),
            (
                "gro_flush_timeout_us = 20",
                "backend.af_xdp.napi_defer_hard_irqs",
            ),
            ("busy_poll_budget = 8", "backend.af_xdp.busy_poll_budget"),
            (
                "napi_defer_hard_irqs = 4294967295\ngro_flush_timeout_us = 20",
                "backend.af_xdp.napi_defer_hard_irqs",
            ),
        ] {
            let e = parse(&format!(
                "[backend]\nkind = \"software\"\n[backend.af_xdp]\n{table}\n"
            ))
            .expect_err(table);
            assert_eq!(e.key(), Some(key), "{table}: {e}");
        }
    }

    fn snat(name: &str, addr: &str) -> String {
        format!("[[nat.rules]]\nname = {name:?}\nkind = \"snat\"\nto_addresses = {addr:?}\n")
    }

    #[test]
    fn apply_manages_its_own_rules_and_reports() {
        use crate::api::SoftwareControl;
        let control = SoftwareControl::new(Default::default(), 1024);
        let a = parse(&format!(
            "{}{}",
            snat("a", "192.0.2.1"),
            snat("b", "192.0.2.2")
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let r = apply(&control, None, &a);
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        // A rule added through the API is not the file's to remove.
        let api_rule = parse(&snat("api", "198.51.100.1"))
            .unwrap_or_else(|e| panic!("{e}"))
            .nat_rules
            .remove(0)
            .api
            .unwrap_or_else(|| panic!("snat is API-visible"));
        control
            .add_nat_rule(api_rule)
            .unwrap_or_else(|e| panic!("{e}"));
        let b = parse(&format!(
            "[timeouts]\nudp = 45\n[offload]\nenabled = false\n{}",
            snat("b", "192.0.2.2")
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let r = apply(&control, Some(&a), &b);
        assert!(r.failed.is_empty(), "{:?}", r.failed);
        assert!(
            r.applied.contains(&"timeouts".to_owned()),
            "{:?}",
            r.applied
        );
        assert!(r.applied.contains(&"offload".to_owned()));
        assert!(!r.applied.contains(&"limits".to_owned()), "unchanged");
        assert!(r.restart_required.is_empty(), "{:?}", r.restart_required);
        assert!(
            control.timeouts().is_ok_and(|t| !t.restart_required),
            "timeouts run in the table"
        );
        let names: Vec<String> = control
            .nat_rules()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["b", "api"]);
        assert_eq!(control.timeouts().map(|t| t.value.other.udp).ok(), Some(45));
        assert!(!control.offload_policy().is_ok_and(|p| p.enabled));
        // A limit the control plane refuses is reported, not fatal.
        let c = parse(&format!(
            "[limits]\nmax_nat_rules = 1\n{}",
            snat("b", "192.0.2.2")
        ))
        .unwrap_or_else(|e| panic!("{e}"));
        let r = apply(&control, Some(&b), &c);
        assert_eq!(r.failed.len(), 1, "{:?}", r.failed);
        assert!(
            r.failed[0]
                .1
                .to_string()
                .starts_with("limits.max_nat_rules: ")
        );
    }

    #[test]
    fn ranges_and_macs() {
        assert!(port_range("2000-1000", "k").is_err());
        assert_eq!(port_range("80", "k").ok(), Some(PortRange::new(80, 80)));
        assert!(parse_mac("02:00:00:00:00:0g", "k").is_err());
        assert!(parse_mac("02:00:00:00:00", "k").is_err());
        assert_eq!(
            parse_mac("02:00:00:00:00:ff", "k").ok(),
            Some([2, 0, 0, 0, 0, 255])
        );
        assert!(valid_pci("0000:03:00.0"));
        assert!(!valid_pci("0000:03:00.8"));
    }
}
