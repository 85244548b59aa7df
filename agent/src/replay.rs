//! `ctoffload replay`: run a capture through the software pipeline, deterministically.
//!
//! Input is a pcapng (or a classic pcap) file. Each interface of the capture is a gateway
//! port: an interface description block names the port (its `if_name` option, else
//! `port<N>`), and each packet block says which port the packet arrived on. The packet's
//! timestamp is the pipeline's clock, so a replay always gives the same answer.
//!
//! For every input packet the replay writes one [`Record`] (JSON Lines) and, when the
//! gateway emits the packet, writes it to an output pcapng on its egress port.
//!
//! Until routing exists, the gateway is a two-port bridge with conntrack and NAT:
//! - Ports are paired in the order the capture declares them: 0 with 1, 2 with 3, and so
//!   on. A packet leaves by the other port of its pair; a port without a partner (the
//!   only interface of a classic pcap, or the last of an odd number) sends it back out of
//!   itself.
//! - Tracked and untracked packets are forwarded; invalid ones are dropped, or forwarded
//!   with [`InvalidPolicy::Pass`] (`ct state invalid drop` is the default).
//! - Emitted packets are the input bytes, translated by the configuration's NAT rules
//!   (`[[nat.rules]]`, the agent's syntax) when their connection has a binding; the
//!   record then shows the packet's tuple before and after.
//!
//! The capture's clock never runs backwards for conntrack: a packet stamped earlier than
//! the one before it is processed at the earlier packet's time (its record keeps its own
//! timestamp). GC runs with that clock before every packet.

use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ctoffload_fallback_sw::conntrack::{
    Config, Conntrack, CtInfo, L4State, NatOutcome, NatVerdict, OtherTimeouts, Untracked, Verdict,
};
use ctoffload_fallback_sw::nat::PacketMeta;
use ctoffload_fallback_sw::nat::rules::NatRuleSet;
use ctoffload_fallback_sw::table::{Conn, Event, RemoveReason, Status};
use ctoffload_fallback_sw::tcp::{TcpConfig, TcpTimeouts};
use ctoffload_fallback_sw::tuple::{Addr, Tuple};
use ctoffload_fallback_sw::wire::{self, L4, ParseOptions};
use pcap_file::DataLink;
use pcap_file::pcap::PcapReader;
use pcap_file::pcapng::blocks::enhanced_packet::EnhancedPacketBlock;
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::{Block, PcapNgReader, PcapNgWriter};
use pcap_file::{Endianness, PcapError};
use serde::{Deserialize, Serialize};

use crate::config::{self as agent_config, ConfigError, NatSection, PortSection};

const NS_PER_SEC: u64 = 1_000_000_000;
/// Timers GC may visit before each packet. A replay is not latency-bound: large enough
/// that everything expired is gone before the next packet in any realistic capture.
const GC_BUDGET: usize = 1 << 20;
/// `if_tsresol` written to the output: nanoseconds.
const OUT_TSRESOL: u8 = 9;
/// pcapng section header block type, as it starts a pcapng file.
const PCAPNG_MAGIC: [u8; 4] = [0x0A, 0x0D, 0x0D, 0x0A];
/// Classic pcap magics (micro- and nanosecond, both byte orders).
const PCAP_MAGICS: [[u8; 4]; 4] = [
    [0xD4, 0xC3, 0xB2, 0xA1],
    [0xA1, 0xB2, 0xC3, 0xD4],
    [0x4D, 0x3C, 0xB2, 0xA1],
    [0xA1, 0xB2, 0x3C, 0x4D],
];

/// Everything that can stop a replay. Malformed packets inside a readable capture are
/// not errors: they get a record with verdict `invalid`.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A file could not be opened or created.
    #[error("{path}: cannot open")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The input does not start like a pcap or pcapng file.
    #[error("{path}: not a pcap or pcapng file (magic {magic:02x?})")]
    NotACapture {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        magic: Vec<u8>,
    },
    /// The capture could not be read (truncated or corrupt block, I/O error).
    #[error("{path}: corrupt capture after {packets} packets")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Packets read successfully before the problem.
        packets: u64,
        /// The cause.
        #[source]
        source: PcapError,
    },
    /// An interface has a link type the pipeline cannot parse (only Ethernet).
    #[error("{path}: interface {interface} has link type {linktype}, only ETHERNET is supported")]
    UnsupportedLinkType {
        /// The file.
        path: PathBuf,
        /// Interface index in the capture.
        interface: usize,
        /// The link type, as the pcap-file crate names it.
        linktype: String,
    },
    /// A packet names an interface the capture did not describe.
    #[error("{path}: packet {index} refers to undeclared interface {interface}")]
    UnknownInterface {
        /// The file.
        path: PathBuf,
        /// Index of the packet.
        index: u64,
        /// The interface id in the packet block.
        interface: u32,
    },
    /// A second pcapng section; interfaces would be renumbered.
    #[error("{path}: a second pcapng section starts after {packets} packets (not supported)")]
    MultipleSections {
        /// The file.
        path: PathBuf,
        /// Packets read before it.
        packets: u64,
    },
    /// The capture's timestamps cannot be represented in nanoseconds since 1970.
    #[error("{path}: packet {index} has a timestamp out of range")]
    Timestamp {
        /// The file.
        path: PathBuf,
        /// Index of the packet.
        index: u64,
    },
    /// The configuration file is not valid TOML for [`ConfigFile`]; the message names the
    /// key and its line.
    #[error("{path}: invalid configuration")]
    Config {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The `[[ports]]` or `[nat]` part of the configuration file is invalid (checked by
    /// the agent's configuration code; the message names the key).
    #[error("{path}: invalid NAT configuration")]
    NatConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: ConfigError,
    },
    /// A configuration value is out of range.
    #[error("{path}: `{key}` {problem}")]
    ConfigValue {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// Writing an output failed.
    #[error("{path}: write failed")]
    Write {
        /// The file (`-` for standard output).
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the output pcapng failed.
    #[error("{path}: write failed")]
    WritePcap {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: PcapError,
    },
}

/// What the gateway does with invalid packets (`ct state invalid drop` or accept).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum InvalidPolicy {
    /// Forward them (their conntrack state is still "invalid").
    Pass,
    /// Drop them.
    #[default]
    Drop,
}

/// Replay settings.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// Conntrack configuration.
    pub conntrack: Config,
    /// What happens to invalid packets.
    pub invalid: InvalidPolicy,
    /// Add the whole connection table to every record.
    pub dump_table: bool,
    /// NAT rules and the ports they name.
    pub nat: ReplayNat,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self {
            conntrack: default_conntrack_config(),
            invalid: InvalidPolicy::Drop,
            dump_table: false,
            nat: ReplayNat::default(),
        }
    }
}

/// A port of the configuration file (`[[ports]]`): what NAT rules need to know of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatPort {
    /// Name; a capture interface of the same name is this port.
    pub name: String,
    /// Its first IPv4 address (masquerade's address), if any.
    pub ipv4: Option<Addr>,
}

/// The NAT part of a replay's configuration: the rules in order, and the ports of
/// `[[ports]]`. A rule's `in_port` / `out_port` is an index into `ports`.
#[derive(Debug, Clone, Default)]
pub struct ReplayNat {
    /// The rules (already validated).
    pub rules: NatRuleSet,
    /// The declared ports, by index.
    pub ports: Vec<NatPort>,
}

impl ReplayNat {
    /// Rules and ports from the agent's configuration sections (`[[ports]]` and `[nat]`),
    /// validated by the agent's own code: the same rule syntax, the same errors.
    ///
    /// # Errors
    /// The agent's [`ConfigError`], naming the key (`nat.rules[0].to_ports`).
    pub fn from_sections(
        ports: &[ReplayPortSection],
        nat: &NatSection,
    ) -> Result<Self, ConfigError> {
        let file = agent_config::ConfigFile {
            ports: ports
                .iter()
                .map(|p| PortSection {
                    name: p.name.clone(),
                    // The replay does not rewrite MACs; a MAC, when given, is still
                    // checked like the agent's.
                    mac: p
                        .mac
                        .clone()
                        .unwrap_or_else(|| "02:00:00:00:00:00".to_owned()),
                    addresses: p.addresses.clone(),
                })
                .collect(),
            nat: nat.clone(),
            ..agent_config::ConfigFile::default()
        };
        let cfg = file.validate()?;
        let mut rules = NatRuleSet::default();
        for r in &cfg.nat_rules {
            // Validation added each rule to a set of its own: this cannot fail.
            rules
                .add(r.engine.clone())
                .map_err(|e| ConfigError::Invalid {
                    key: "nat.rules".to_owned(),
                    reason: e.to_string(),
                })?;
        }
        let ports = cfg
            .ports
            .iter()
            .map(|p| NatPort {
                name: p.name.clone(),
                ipv4: p.addresses.iter().find_map(|(a, _)| match a {
                    IpAddr::V4(v4) => Some(Addr::v4(v4.octets())),
                    IpAddr::V6(_) => None,
                }),
            })
            .collect();
        Ok(Self { rules, ports })
    }
}

/// The conntrack configuration a replay uses without a configuration file: Linux
/// defaults (table size aside).
#[must_use]
pub fn default_conntrack_config() -> Config {
    Config {
        max_connections: 65_536,
        ..Config::default()
    }
}

/// The `--config` file: every key optional, defaults are Linux's.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `nf_conntrack_max` of the replayed table.
    pub max_connections: Option<usize>,
    /// `nf_conntrack_checksum`: verify IPv4, TCP, UDP and ICMP checksums.
    pub checksum: Option<bool>,
    /// TCP settings.
    pub tcp: Option<TcpSection>,
    /// Timeouts of UDP, ICMP and other protocols, in seconds.
    pub timeouts: Option<OtherTimeoutsSection>,
    /// `[[ports]]`: gateway ports that NAT rules name (`in_port`, `out_port`) or
    /// masquerade to; matched to the capture's interfaces by name.
    #[serde(default)]
    pub ports: Vec<ReplayPortSection>,
    /// `[nat]` with `[[nat.rules]]`, exactly the agent's syntax.
    #[serde(default)]
    pub nat: NatSection,
}

/// `[[ports]]` of the configuration file: the agent's port section with the MAC optional
/// (the replay does not route).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayPortSection {
    /// Name: the capture interface of this name is this port.
    pub name: String,
    /// MAC address (checked, unused).
    pub mac: Option<String>,
    /// Addresses with prefix length; the first IPv4 one is masquerade's.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// Everything a configuration file sets.
#[derive(Debug, Clone)]
pub struct ReplaySettings {
    /// Conntrack.
    pub conntrack: Config,
    /// NAT.
    pub nat: ReplayNat,
}

impl Default for ReplaySettings {
    fn default() -> Self {
        Self {
            conntrack: default_conntrack_config(),
            nat: ReplayNat::default(),
        }
    }
}

/// `[tcp]` of the configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSection {
    /// `nf_conntrack_tcp_be_liberal`.
    pub be_liberal: Option<bool>,
    /// `nf_conntrack_tcp_loose`.
    pub loose: Option<bool>,
    /// `nf_conntrack_tcp_max_retrans`.
    pub max_retrans: Option<u8>,
    /// `nf_conntrack_tcp_ignore_invalid_rst`.
    pub ignore_invalid_rst: Option<bool>,
    /// `[tcp.timeouts]`, seconds per state.
    pub timeouts: Option<TcpTimeoutsSection>,
}

/// `[tcp.timeouts]` of the configuration file, in seconds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(missing_docs)]
pub struct TcpTimeoutsSection {
    pub syn_sent: Option<u32>,
    pub syn_recv: Option<u32>,
    pub established: Option<u32>,
    pub fin_wait: Option<u32>,
    pub close_wait: Option<u32>,
    pub last_ack: Option<u32>,
    pub time_wait: Option<u32>,
    pub close: Option<u32>,
    pub syn_sent2: Option<u32>,
    pub max_retrans: Option<u32>,
    pub unacknowledged: Option<u32>,
}

/// `[timeouts]` of the configuration file, in seconds.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtherTimeoutsSection {
    /// Unreplied UDP.
    pub udp: Option<u32>,
    /// Replied UDP.
    pub udp_stream: Option<u32>,
    /// ICMP and ICMPv6.
    pub icmp: Option<u32>,
    /// Other protocols.
    pub generic: Option<u32>,
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

impl ConfigFile {
    /// The conntrack configuration: these settings over [`default_conntrack_config`].
    ///
    /// # Errors
    /// A value out of range, naming its key (`path` is only used in the message).
    pub fn to_config(&self, path: &Path) -> Result<Config, ReplayError> {
        let mut cfg = default_conntrack_config();
        if let Some(max) = self.max_connections {
            if max == 0 || max > (1 << 30) {
                return Err(ReplayError::ConfigValue {
                    path: path.to_owned(),
                    key: "max_connections",
                    problem: "must be between 1 and 2^30",
                });
            }
            cfg.max_connections = max;
        }
        if let Some(check) = self.checksum {
            cfg.parse = if check {
                ParseOptions::VERIFY_ALL
            } else {
                ParseOptions::VERIFY_NONE
            };
        }
        if let Some(tcp) = &self.tcp {
            let t: &mut TcpConfig = &mut cfg.tcp;
            set(&mut t.be_liberal, tcp.be_liberal);
            set(&mut t.loose, tcp.loose);
            set(&mut t.max_retrans, tcp.max_retrans);
            set(&mut t.ignore_invalid_rst, tcp.ignore_invalid_rst);
            if let Some(s) = &tcp.timeouts {
                let to: &mut TcpTimeouts = &mut t.timeouts;
                set(&mut to.syn_sent, s.syn_sent);
                set(&mut to.syn_recv, s.syn_recv);
                set(&mut to.established, s.established);
                set(&mut to.fin_wait, s.fin_wait);
                set(&mut to.close_wait, s.close_wait);
                set(&mut to.last_ack, s.last_ack);
                set(&mut to.time_wait, s.time_wait);
                set(&mut to.close, s.close);
                set(&mut to.syn_sent2, s.syn_sent2);
                set(&mut to.max_retrans, s.max_retrans);
                set(&mut to.unacknowledged, s.unacknowledged);
            }
        }
        if let Some(s) = &self.timeouts {
            let to: &mut OtherTimeouts = &mut cfg.timeouts;
            set(&mut to.udp, s.udp);
            set(&mut to.udp_stream, s.udp_stream);
            set(&mut to.icmp, s.icmp);
            set(&mut to.generic, s.generic);
        }
        Ok(cfg)
    }
}

/// Parse a configuration file's text (`path` names it in errors).
///
/// # Errors
/// Invalid TOML, an unknown key or a value out of range; the error names the key.
pub fn parse_config(text: &str, path: &Path) -> Result<Config, ReplayError> {
    parse_settings(text, path).map(|s| s.conntrack)
}

/// Parse a configuration file's text: conntrack settings and NAT (`path` names it in
/// errors).
///
/// # Errors
/// Invalid TOML, an unknown key, a value out of range or an invalid NAT rule; the error
/// names the key.
pub fn parse_settings(text: &str, path: &Path) -> Result<ReplaySettings, ReplayError> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| ReplayError::Config {
        path: path.to_owned(),
        source: Box::new(e),
    })?;
    let conntrack = file.to_config(path)?;
    let nat = ReplayNat::from_sections(&file.ports, &file.nat).map_err(|source| {
        ReplayError::NatConfig {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(ReplaySettings { conntrack, nat })
}

/// Read and parse a configuration file.
///
/// # Errors
/// See [`parse_config`]; also an unreadable file.
pub fn load_config(path: &Path) -> Result<Config, ReplayError> {
    load_settings(path).map(|s| s.conntrack)
}

/// Read and parse a configuration file: conntrack settings and NAT.
///
/// # Errors
/// See [`parse_settings`]; also an unreadable file.
pub fn load_settings(path: &Path) -> Result<ReplaySettings, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Open {
        path: path.to_owned(),
        source,
    })?;
    parse_settings(&text, path)
}

/// How a packet relates to conntrack, as `ct state` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictClass {
    /// First packet(s) of a connection, before any reply.
    New,
    /// A packet of a connection that has seen a reply (or any reply-direction packet).
    Established,
    /// An ICMP error about a tracked connection.
    Related,
    /// Conntrack refused the packet.
    Invalid,
    /// Conntrack does not track the packet.
    Untracked,
}

/// One tuple in a table dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TupleRecord {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (port protocols).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    /// Destination port (port protocols).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// ICMP type.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "type")]
    pub icmp_type: Option<u8>,
    /// ICMP code.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "code")]
    pub icmp_code: Option<u8>,
    /// ICMP identifier.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "id")]
    pub icmp_id: Option<u16>,
    /// Conntrack zone, when not 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub zone: u16,
}

fn is_zero(z: &u16) -> bool {
    *z == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl TupleRecord {
    fn of(t: &Tuple) -> Self {
        let ports = !t.is_icmp() && (t.src_l4 != 0 || t.dst_l4 != 0);
        Self {
            proto: t.proto,
            src: t.src.to_ip(t.family),
            dst: t.dst.to_ip(t.family),
            sport: ports.then_some(t.src_l4),
            dport: ports.then_some(t.dst_l4),
            icmp_type: t.is_icmp().then(|| t.icmp_type()),
            icmp_code: t.is_icmp().then(|| t.icmp_code()),
            icmp_id: t.is_icmp().then_some(t.src_l4),
            zone: t.zone,
        }
    }
}

/// Packets and bytes of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterRecord {
    /// Packets.
    pub packets: u64,
    /// Bytes (IP length).
    pub bytes: u64,
}

/// Per-direction counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountersRecord {
    /// Original direction.
    pub orig: CounterRecord,
    /// Reply direction.
    pub reply: CounterRecord,
}

/// One connection in a table dump.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnRecord {
    /// Connection id.
    pub id: u64,
    /// Original tuple.
    pub orig: TupleRecord,
    /// Reply tuple.
    pub reply: TupleRecord,
    /// TCP state (Linux name); `null` for other protocols.
    pub state: Option<String>,
    /// Status bits (Linux names).
    pub status: Vec<String>,
    /// Whole seconds left before expiry, like `conntrack -L`.
    pub timeout_remaining_s: u64,
    /// Packets and bytes.
    pub counters: CountersRecord,
}

/// The JSON Lines record of one input packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Index of the packet in the input, from 0.
    pub index: u64,
    /// Its timestamp, nanoseconds since 1970.
    pub ts_ns: u64,
    /// The port it arrived on.
    pub in_port: String,
    /// Its conntrack verdict.
    pub verdict: VerdictClass,
    /// Linux ctinfo (`NEW`, `ESTABLISHED`, `ESTABLISHED_REPLY`, `RELATED`,
    /// `RELATED_REPLY`); `null` for invalid and untracked packets.
    pub ctinfo: Option<String>,
    /// Why the packet is invalid or untracked; `null` otherwise.
    pub reason: Option<String>,
    /// The connection the packet belongs to.
    pub conn_id: Option<u64>,
    /// The connection's TCP state after the packet; `null` for other protocols or when
    /// the packet removed the connection.
    pub state: Option<String>,
    /// The connection's status bits after the packet (empty without a connection).
    pub status: Vec<String>,
    /// The packet removed its connection (a TCP RST before any reply).
    #[serde(default, skip_serializing_if = "is_false")]
    pub destroyed: bool,
    /// The port the gateway sent the packet out of; `null` when dropped.
    pub egress_port: Option<String>,
    /// When NAT rewrote the packet: its addresses and ports before and after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatRecord>,
    /// With `--dump-table`: every live connection after the packet, by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<Vec<ConnRecord>>,
}

/// How NAT changed a packet: the outer header's tuple as it arrived and as it left (for
/// an ICMP error, the quoted packet was translated too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatRecord {
    /// As it arrived.
    pub before: TupleRecord,
    /// As it left.
    pub after: TupleRecord,
}

/// What the gateway did with one packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The record.
    pub record: Record,
    /// Egress port index, `None` when dropped.
    pub egress: Option<usize>,
    /// The emitted bytes when NAT rewrote the packet; `None`: the input bytes.
    pub rewritten: Option<Vec<u8>>,
}

/// The tuple of a frame's outer header (addresses, protocol, ports or ICMP type, code
/// and id), for [`NatRecord`]; `None` if it is not IP or not parseable.
fn frame_tuple(frame: &[u8]) -> Option<TupleRecord> {
    let p = wire::parse(frame, ParseOptions::VERIFY_NONE).ok()?;
    if matches!(p.l3, wire::L3::Other { .. }) {
        return None;
    }
    let mut t = TupleRecord {
        proto: p.protocol,
        src: p.src,
        dst: p.dst,
        sport: None,
        dport: None,
        icmp_type: None,
        icmp_code: None,
        icmp_id: None,
        zone: 0,
    };
    match p.l4 {
        L4::Tcp(tcp) => (t.sport, t.dport) = (Some(tcp.src_port), Some(tcp.dst_port)),
        L4::Udp { src_port, dst_port } | L4::Ports { src_port, dst_port } => {
            (t.sport, t.dport) = (Some(src_port), Some(dst_port));
        }
        L4::IcmpQuery {
            id,
            icmp_type,
            code,
        } => {
            (t.icmp_type, t.icmp_code, t.icmp_id) = (Some(icmp_type), Some(code), Some(id));
        }
        L4::IcmpError {
            icmp_type, code, ..
        }
        | L4::IcmpOther {
            icmp_type, code, ..
        } => (t.icmp_type, t.icmp_code) = (Some(icmp_type), Some(code)),
        L4::None | L4::Generic => {}
    }
    Some(t)
}

/// Counts of a finished replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// Input packets.
    pub packets: u64,
    /// Packets written to the output.
    pub emitted: u64,
    /// Packets dropped.
    pub dropped: u64,
}

fn status_names(s: Status) -> Vec<String> {
    s.iter_names().map(|(n, _)| n.to_owned()).collect()
}

fn tcp_state_name(c: &Conn<L4State>) -> Option<String> {
    match c.proto {
        L4State::Tcp(t) => Some(t.state().name().to_owned()),
        L4State::Udp { .. } | L4State::Icmp | L4State::Generic => None,
    }
}

fn ctinfo_name(i: CtInfo) -> &'static str {
    match i {
        CtInfo::New => "NEW",
        CtInfo::Established => "ESTABLISHED",
        CtInfo::EstablishedReply => "ESTABLISHED_REPLY",
        CtInfo::Related => "RELATED",
        CtInfo::RelatedReply => "RELATED_REPLY",
    }
}

fn untracked_reason(u: Untracked) -> String {
    match u {
        Untracked::NotIp { ethertype } => format!("not IP (ethertype {ethertype:#06x})"),
        Untracked::Fragment => "non-first IP fragment".to_owned(),
        Untracked::NeighbourDiscovery => "ICMPv6 neighbour discovery / MLD".to_owned(),
    }
}

/// The pipeline of a replay: conntrack, the port rule and the invalid policy, one packet
/// at a time. The file-level [`replay`] drives it; tests can drive it directly.
#[derive(Debug)]
pub struct Replayer {
    ct: Conntrack,
    invalid: InvalidPolicy,
    dump_table: bool,
    ports: Vec<String>,
    /// The configuration's ports (NAT rules name them by index).
    nat_ports: Vec<NatPort>,
    clock: u64,
    index: u64,
}

impl Replayer {
    /// A gateway with no ports yet.
    #[must_use]
    pub fn new(opts: &ReplayOptions) -> Self {
        let mut ct = Conntrack::new(opts.conntrack);
        *ct.nat_mut().rules_mut() = opts.nat.rules.clone();
        Self {
            ct,
            invalid: opts.invalid,
            dump_table: opts.dump_table,
            ports: Vec::new(),
            nat_ports: opts.nat.ports.clone(),
            clock: 0,
            index: 0,
        }
    }

    /// What NAT rules see of a packet from `port` leaving by `egress`: the ports'
    /// indices in the configuration's `[[ports]]` (matched by name; an undeclared port
    /// matches no rule that names a port) and the egress port's IPv4 address.
    fn nat_meta(&self, port: usize, egress: usize) -> PacketMeta {
        let declared = |p: usize| {
            let name = self.ports.get(p)?;
            self.nat_ports.iter().position(|n| &n.name == name)
        };
        let out = declared(egress);
        PacketMeta {
            in_port: declared(port)
                .and_then(|i| u32::try_from(i).ok())
                .unwrap_or(u32::MAX),
            out_port: out.and_then(|i| u32::try_from(i).ok()),
            out_addr: out.and_then(|i| self.nat_ports[i].ipv4),
        }
    }

    /// Declare the next port; returns its index.
    pub fn add_port(&mut self, name: impl Into<String>) -> usize {
        self.ports.push(name.into());
        self.ports.len() - 1
    }

    /// The port names, by index.
    #[must_use]
    pub fn ports(&self) -> &[String] {
        &self.ports
    }

    /// The conntrack instance.
    #[must_use]
    pub fn conntrack(&self) -> &Conntrack {
        &self.ct
    }

    /// The egress port for a packet that came in on `port` (see the module docs).
    #[must_use]
    pub fn egress_of(&self, port: usize) -> usize {
        let partner = port ^ 1;
        if partner < self.ports.len() {
            partner
        } else {
            port
        }
    }

    /// The live connections at the replay clock, by id.
    #[must_use]
    pub fn table(&self) -> Vec<ConnRecord> {
        let now = self.clock;
        let mut v: Vec<ConnRecord> = self
            .ct
            .table()
            .iter(now)
            .map(|(_, c)| ConnRecord {
                id: c.id,
                orig: TupleRecord::of(&c.tuples[0]),
                reply: TupleRecord::of(&c.tuples[1]),
                state: tcp_state_name(&c),
                status: status_names(c.status),
                timeout_remaining_s: c.remaining(now) / NS_PER_SEC,
                counters: CountersRecord {
                    orig: CounterRecord {
                        packets: c.counters[0].packets,
                        bytes: c.counters[0].bytes,
                    },
                    reply: CounterRecord {
                        packets: c.counters[1].packets,
                        bytes: c.counters[1].bytes,
                    },
                },
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Run one frame that arrived on `port` (an index from [`Replayer::add_port`]; an
    /// unknown index is treated as a port of its own) at `ts_ns`.
    pub fn packet(&mut self, port: usize, ts_ns: u64, frame: &[u8]) -> Outcome {
        self.clock = self.clock.max(ts_ns);
        let now = self.clock;
        self.ct.gc(now, GC_BUDGET);
        // Events of expiries are not reported per packet; start clean.
        self.ct.table_mut().drain_events().for_each(drop);
        let egress_port = self.egress_of(port);
        let meta = self.nat_meta(port, egress_port);
        let mut out = frame.to_vec();
        let NatVerdict { verdict, nat } = self.ct.process_mut(&mut out, 0, &meta, now);
        let closed = self
            .ct
            .table_mut()
            .drain_events()
            .filter_map(|e| match e {
                Event::Destroy {
                    id,
                    reason: RemoveReason::Closed,
                    status,
                    ..
                } => Some((id, status)),
                Event::Destroy { .. } | Event::New { .. } => None,
            })
            .next_back();
        let in_port = self
            .ports
            .get(port)
            .cloned()
            .unwrap_or_else(|| format!("port{port}"));
        let mut record = Record {
            index: self.index,
            ts_ns,
            in_port,
            verdict: VerdictClass::Invalid,
            ctinfo: None,
            reason: None,
            conn_id: None,
            state: None,
            status: Vec::new(),
            destroyed: false,
            egress_port: None,
            nat: None,
            table: None,
        };
        self.index += 1;
        let forward = match verdict {
            Verdict::Tracked { slot, info, .. } => {
                record.verdict = match info {
                    CtInfo::New => VerdictClass::New,
                    CtInfo::Established | CtInfo::EstablishedReply => VerdictClass::Established,
                    CtInfo::Related | CtInfo::RelatedReply => VerdictClass::Related,
                };
                record.ctinfo = Some(ctinfo_name(info).to_owned());
                if let Some(c) = self.ct.table().get(slot) {
                    record.conn_id = Some(c.id);
                    record.state = tcp_state_name(&c);
                    record.status = status_names(c.status);
                } else if let Some((id, status)) = closed {
                    record.conn_id = Some(id);
                    record.status = status_names(status);
                    record.destroyed = true;
                }
                match nat {
                    NatOutcome::Unchanged => true,
                    NatOutcome::Rewritten => {
                        record.nat = frame_tuple(frame)
                            .zip(frame_tuple(&out))
                            .map(|(before, after)| NatRecord { before, after });
                        true
                    }
                    NatOutcome::Drop(e) => {
                        record.reason = Some(format!("NAT rewrite failed: {e}"));
                        false
                    }
                }
            }
            Verdict::Untracked(u) => {
                record.verdict = VerdictClass::Untracked;
                record.reason = Some(untracked_reason(u));
                true
            }
            Verdict::Invalid(why) => {
                record.verdict = VerdictClass::Invalid;
                record.reason = Some(why.to_string());
                self.invalid == InvalidPolicy::Pass
            }
        };
        let egress = forward.then_some(egress_port);
        record.egress_port = egress.map(|e| {
            self.ports
                .get(e)
                .cloned()
                .unwrap_or_else(|| format!("port{e}"))
        });
        if self.dump_table {
            record.table = Some(self.table());
        }
        let rewritten = (nat == NatOutcome::Rewritten && egress.is_some()).then_some(out);
        Outcome {
            record,
            egress,
            rewritten,
        }
    }
}

/// Names of the streams of a replay, for error messages.
#[derive(Debug, Clone)]
pub struct StreamNames {
    /// The input capture.
    pub input: PathBuf,
    /// The output pcapng.
    pub output: PathBuf,
    /// The records (`-` for standard output).
    pub records: PathBuf,
}

/// Nanoseconds from a pcapng timestamp in units of `if_tsresol` (pcap-file 2 hands the
/// raw 64-bit count over as if it were nanoseconds).
fn units_to_ns(raw: u128, tsresol: u8) -> Option<u64> {
    let ns = if tsresol & 0x80 == 0 {
        let exp = u32::from(tsresol);
        if exp <= 9 {
            raw.checked_mul(10u128.checked_pow(9 - exp)?)?
        } else {
            raw / 10u128.checked_pow(exp - 9)?
        }
    } else {
        let shift = u32::from(tsresol & 0x7F);
        if shift >= 64 {
            return None;
        }
        raw.checked_mul(u128::from(NS_PER_SEC))? >> shift
    };
    u64::try_from(ns).ok()
}

fn tsresol_of(idb: &InterfaceDescriptionBlock<'_>) -> u8 {
    idb.options
        .iter()
        .find_map(|o| match o {
            InterfaceDescriptionOption::IfTsResol(r) => Some(*r),
            _ => None,
        })
        .unwrap_or(6)
}

fn name_of(idb: &InterfaceDescriptionBlock<'_>, index: usize) -> String {
    idb.options
        .iter()
        .find_map(|o| match o {
            InterfaceDescriptionOption::IfName(n) => Some(n.to_string()),
            _ => None,
        })
        .unwrap_or_else(|| format!("port{index}"))
}

/// One port of the output, mirroring an input interface.
fn out_interface(name: &str, snaplen: u32) -> InterfaceDescriptionBlock<'static> {
    InterfaceDescriptionBlock {
        linktype: DataLink::ETHERNET,
        snaplen,
        options: vec![
            InterfaceDescriptionOption::IfName(Cow::Owned(name.to_owned())),
            InterfaceDescriptionOption::IfTsResol(OUT_TSRESOL),
        ],
    }
}

struct Sink<'a, W: Write, J: Write> {
    replayer: Replayer,
    pcap: PcapNgWriter<W>,
    records: J,
    names: &'a StreamNames,
    summary: Summary,
}

impl<W: Write, J: Write> Sink<'_, W, J> {
    fn add_port(
        &mut self,
        name: String,
        linktype: DataLink,
        snaplen: u32,
    ) -> Result<(), ReplayError> {
        let interface = self.replayer.ports().len();
        if linktype != DataLink::ETHERNET {
            return Err(ReplayError::UnsupportedLinkType {
                path: self.names.input.clone(),
                interface,
                linktype: format!("{linktype:?}"),
            });
        }
        self.pcap
            .write_pcapng_block(out_interface(&name, snaplen))
            .map_err(|source| ReplayError::WritePcap {
                path: self.names.output.clone(),
                source,
            })?;
        self.replayer.add_port(name);
        Ok(())
    }

    fn packet(
        &mut self,
        port: usize,
        ts_ns: u64,
        original_len: u32,
        data: &[u8],
    ) -> Result<(), ReplayError> {
        let out = self.replayer.packet(port, ts_ns, data);
        self.summary.packets += 1;
        if let Some(egress) = out.egress {
            let block = EnhancedPacketBlock {
                interface_id: u32::try_from(egress).unwrap_or(u32::MAX),
                timestamp: Duration::from_nanos(ts_ns),
                original_len,
                data: Cow::Borrowed(out.rewritten.as_deref().unwrap_or(data)),
                options: Vec::new(),
            };
            self.pcap
                .write_pcapng_block(block)
                .map_err(|source| ReplayError::WritePcap {
                    path: self.names.output.clone(),
                    source,
                })?;
            self.summary.emitted += 1;
        } else {
            self.summary.dropped += 1;
        }
        let write_err = |source| ReplayError::Write {
            path: self.names.records.clone(),
            source,
        };
        serde_json::to_writer(&mut self.records, &out.record)
            .map_err(|e| write_err(io::Error::other(e)))?;
        self.records.write_all(b"\n").map_err(write_err)?;
        Ok(())
    }
}

/// Replay `input` (pcap or pcapng), writing emitted packets to `pcap_out` (pcapng) and
/// one JSON line per input packet to `records`.
///
/// # Errors
/// An unreadable or corrupt capture, an unsupported link type, or a failed write; the
/// error names the file. Malformed packets are records, not errors.
pub fn replay<R: Read, W: Write, J: Write>(
    mut input: R,
    pcap_out: W,
    records: J,
    opts: &ReplayOptions,
    names: &StreamNames,
) -> Result<Summary, ReplayError> {
    let mut magic = Vec::with_capacity(4);
    (&mut input)
        .take(4)
        .read_to_end(&mut magic)
        .map_err(|source| ReplayError::Corrupt {
            path: names.input.clone(),
            packets: 0,
            source: PcapError::IoError(source),
        })?;
    let pcap = PcapNgWriter::with_endianness(pcap_out, Endianness::Little).map_err(|source| {
        ReplayError::WritePcap {
            path: names.output.clone(),
            source,
        }
    })?;
    let mut sink = Sink {
        replayer: Replayer::new(opts),
        pcap,
        records,
        names,
        summary: Summary::default(),
    };
    let stream = io::Cursor::new(magic.clone()).chain(input);
    if magic.as_slice() == PCAPNG_MAGIC {
        replay_pcapng(stream, &mut sink)?;
    } else if PCAP_MAGICS.iter().any(|m| magic.as_slice() == m) {
        replay_pcap(stream, &mut sink)?;
    } else {
        return Err(ReplayError::NotACapture {
            path: names.input.clone(),
            magic,
        });
    }
    sink.records.flush().map_err(|source| ReplayError::Write {
        path: names.records.clone(),
        source,
    })?;
    sink.pcap
        .get_mut()
        .flush()
        .map_err(|source| ReplayError::Write {
            path: names.output.clone(),
            source,
        })?;
    Ok(sink.summary)
}

fn replay_pcap<R: Read, W: Write, J: Write>(
    input: R,
    sink: &mut Sink<'_, W, J>,
) -> Result<(), ReplayError> {
    let corrupt = |packets, source| ReplayError::Corrupt {
        path: sink.names.input.clone(),
        packets,
        source,
    };
    let mut reader = PcapReader::new(input).map_err(|e| corrupt(0, e))?;
    let header = reader.header();
    sink.add_port("port0".to_owned(), header.datalink, header.snaplen)?;
    let mut index = 0u64;
    while let Some(pkt) = reader.next_packet() {
        let pkt = pkt.map_err(|e| ReplayError::Corrupt {
            path: sink.names.input.clone(),
            packets: index,
            source: e,
        })?;
        // PcapReader converts micro- or nanosecond stamps into a Duration.
        let ts_ns =
            u64::try_from(pkt.timestamp.as_nanos()).map_err(|_| ReplayError::Timestamp {
                path: sink.names.input.clone(),
                index,
            })?;
        sink.packet(0, ts_ns, pkt.orig_len, &pkt.data)?;
        index += 1;
    }
    Ok(())
}

fn replay_pcapng<R: Read, W: Write, J: Write>(
    input: R,
    sink: &mut Sink<'_, W, J>,
) -> Result<(), ReplayError> {
    let mut reader = PcapNgReader::new(input).map_err(|source| ReplayError::Corrupt {
        path: sink.names.input.clone(),
        packets: 0,
        source,
    })?;
    // (if_tsresol) per interface, in declaration order.
    let mut tsresol: Vec<u8> = Vec::new();
    let mut index = 0u64;
    let mut last_ts = 0u64;
    while let Some(block) = reader.next_block() {
        let block = block.map_err(|source| ReplayError::Corrupt {
            path: sink.names.input.clone(),
            packets: index,
            source,
        })?;
        let (interface, raw_ts, original_len, data) = match block {
            Block::InterfaceDescription(idb) => {
                let name = name_of(&idb, tsresol.len());
                tsresol.push(tsresol_of(&idb));
                sink.add_port(name, idb.linktype, idb.snaplen)?;
                continue;
            }
            Block::SectionHeader(_) => {
                return Err(ReplayError::MultipleSections {
                    path: sink.names.input.clone(),
                    packets: index,
                });
            }
            Block::EnhancedPacket(p) => (
                p.interface_id,
                Some(p.timestamp.as_nanos()),
                p.original_len,
                p.data,
            ),
            Block::Packet(p) => (
                u32::from(p.interface_id),
                Some(u128::from(p.timestamp)),
                p.original_len,
                p.data,
            ),
            // A simple packet block has neither interface nor timestamp: interface 0,
            // the previous packet's time.
            Block::SimplePacket(p) => (0, None, p.original_len, p.data),
            Block::NameResolution(_)
            | Block::InterfaceStatistics(_)
            | Block::SystemdJournalExport(_)
            | Block::Unknown(_) => continue,
        };
        let Some(&resol) = usize::try_from(interface).ok().and_then(|i| tsresol.get(i)) else {
            return Err(ReplayError::UnknownInterface {
                path: sink.names.input.clone(),
                index,
                interface,
            });
        };
        let ts_ns = match raw_ts {
            Some(raw) => units_to_ns(raw, resol).ok_or_else(|| ReplayError::Timestamp {
                path: sink.names.input.clone(),
                index,
            })?,
            None => last_ts,
        };
        last_ts = ts_ns;
        let port = usize::try_from(interface).unwrap_or(usize::MAX);
        sink.packet(port, ts_ns, original_len, &data)?;
        index += 1;
    }
    Ok(())
}

/// Where `ctoffload replay` reads and writes.
#[derive(Debug, Clone)]
pub struct ReplayFiles {
    /// Input capture.
    pub input: PathBuf,
    /// Output pcapng of the emitted packets; `None` discards them.
    pub output: Option<PathBuf>,
    /// Records file; `None` or `-` is standard output.
    pub records: Option<PathBuf>,
}

/// Replay between files (the CLI).
///
/// # Errors
/// See [`replay`]; also files that cannot be opened or created.
pub fn replay_files(files: &ReplayFiles, opts: &ReplayOptions) -> Result<Summary, ReplayError> {
    let open = |p: &Path| {
        File::open(p).map_err(|source| ReplayError::Open {
            path: p.to_owned(),
            source,
        })
    };
    let create = |p: &Path| {
        File::create(p).map_err(|source| ReplayError::Open {
            path: p.to_owned(),
            source,
        })
    };
    let input = BufReader::new(open(&files.input)?);
    let output: Box<dyn Write> = match &files.output {
        Some(p) => Box::new(BufWriter::new(create(p)?)),
        None => Box::new(io::sink()),
    };
    let records_path = files.records.clone().unwrap_or_else(|| PathBuf::from("-"));
    let records: Box<dyn Write> = if records_path.as_os_str() == "-" {
        Box::new(BufWriter::new(io::stdout().lock()))
    } else {
        Box::new(BufWriter::new(create(&records_path)?))
    };
    let names = StreamNames {
        input: files.input.clone(),
        output: files
            .output
            .clone()
            .unwrap_or_else(|| PathBuf::from("(discarded)")),
        records: records_path,
    };
    replay(input, output, records, opts, &names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_units() {
        assert_eq!(units_to_ns(1_500_000, 6), Some(1_500_000_000));
        assert_eq!(units_to_ns(7, 9), Some(7));
        assert_eq!(units_to_ns(12_345, 12), Some(12));
        assert_eq!(units_to_ns(3, 0x81), Some(1_500_000_000));
        assert_eq!(units_to_ns(u128::MAX, 6), None);
        assert_eq!(units_to_ns(1, 0xC0), None);
    }

    #[test]
    fn config_defaults_and_errors() {
        let p = Path::new("t.toml");
        assert_eq!(parse_config("", p).ok(), Some(default_conntrack_config()));
        let cfg = parse_config(
            "max_connections = 10\n[tcp]\nbe_liberal = true\n[tcp.timeouts]\nestablished = 60\n[timeouts]\nudp = 5\n",
            p,
        )
        .expect("valid");
        assert_eq!(cfg.max_connections, 10);
        assert!(cfg.tcp.be_liberal);
        assert_eq!(cfg.tcp.timeouts.established, 60);
        assert_eq!(cfg.timeouts.udp, 5);
        let e = parse_config("[tcp]\nliberal = true\n", p).expect_err("unknown key");
        let msg = format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default()
        );
        assert!(msg.contains("t.toml") && msg.contains("liberal"), "{msg}");
        let e = parse_config("max_connections = 0\n", p).expect_err("range");
        assert!(e.to_string().contains("max_connections"), "{e}");
        let e = parse_config("checksum = 3\n", p).expect_err("type");
        let msg = std::error::Error::source(&e)
            .map(ToString::to_string)
            .unwrap_or_default();
        assert!(msg.contains("checksum"), "{msg}");
    }

    #[test]
    fn port_pairing() {
        let mut r = Replayer::new(&ReplayOptions::default());
        assert_eq!(r.egress_of(0), 0);
        for n in ["a", "b", "c"] {
            r.add_port(n);
        }
        assert_eq!((r.egress_of(0), r.egress_of(1), r.egress_of(2)), (1, 0, 2));
    }
}
