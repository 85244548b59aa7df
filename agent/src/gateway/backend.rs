//! The agent's software backend (`[backend] kind = "software"`): the configured
//! interfaces through [`AfPacket`] ports, the [`Gateway`] built from `[[ports]]` and
//! `[[routes]]`, and the [`SoftwareForwarder`] on a thread of its own, over the same
//! connection table the API serves ([`SoftwareControl`]).
//!
//! Sharing the table: the forwarder takes the control plane's lock once per round
//! ([`SoftwareControl::track_batch`]) for every frame received in that round (up to
//! `rx_batch` per port), never per packet; receiving and sending happen outside the
//! lock. The API's reads (`flows`, `stats`) wait at most one round.
//!
//! `backend.interfaces[i]` is the Linux interface of `ports[i]`. Only IPv4 is routed;
//! IPv6 addresses and routes are ignored (with a warning).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use ctoffload_fallback_sw::conntrack::Conntrack;
use ctoffload_fallback_sw::table::Slot;
use ctoffload_fallback_sw::tuple::Family;

use super::forward::{ConnTable, ForwardError, ForwarderConfig, SoftwareForwarder};
use super::xdp_offload::{SharedXdpOffload, XdpFlowOffload, XdpOffloadConfig};
use super::{Gateway, GatewayConfig, PortConfig, Prefix, StaticRoute};
use crate::api::SoftwareControl;
use crate::api::software::FlowCarrier;
use crate::config::AgentConfig;
use crate::config::{Backend, PacketIo};
use crate::port::af_xdp::{self, AfXdpConfig, AnyPort, IoRequest};
use crate::port::{AfPacket, AfPacketOptions, PortError};

/// Frames taken from one port per round.
pub const RX_BATCH: usize = 64;

/// Why the software backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `backend.interfaces` and `[[ports]]` do not pair up.
    #[error(
        "backend.interfaces: {interfaces} interfaces for {ports} [[ports]] (interfaces[i] carries ports[i])"
    )]
    PortCount {
        /// Interfaces configured.
        interfaces: usize,
        /// Ports configured.
        ports: usize,
    },
    /// An interface cannot be opened (missing, or no `CAP_NET_RAW`).
    #[error("backend.interfaces[{index}]: cannot open {name:?}")]
    Interface {
        /// Position in `backend.interfaces`.
        index: usize,
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: PortError,
    },
    /// The ports and routes do not make a gateway.
    #[error("routes")]
    Routes(#[source] super::ConfigError),
    /// The forwarding thread could not be spawned.
    #[error("forwarding thread")]
    Thread(#[source] std::io::Error),
}

impl ConnTable for Arc<SoftwareControl> {
    fn batch<T>(
        &mut self,
        tracked: &mut Vec<Slot>,
        f: impl FnOnce(&mut Conntrack, &mut Vec<Slot>) -> T,
    ) -> Result<T, ForwardError> {
        self.track_batch(tracked, f)
            .map_err(|e| ForwardError::Table(Box::new(e)))
    }
}

/// The gateway of `cfg`: `ports[i]` on `interfaces[i]`, IPv4 addresses and routes.
///
/// # Errors
/// A route whose next hop is on no port's prefix.
pub fn gateway_config(
    cfg: &AgentConfig,
    interfaces: &[String],
) -> Result<GatewayConfig, BackendError> {
    if interfaces.len() != cfg.ports.len() {
        return Err(BackendError::PortCount {
            interfaces: interfaces.len(),
            ports: cfg.ports.len(),
        });
    }
    let v4 = |a: std::net::IpAddr| match a {
        std::net::IpAddr::V4(a) => Some(a.octets()),
        std::net::IpAddr::V6(_) => None,
    };
    let ports = cfg
        .ports
        .iter()
        .zip(interfaces)
        .map(|(p, ifname)| {
            if p.addresses.iter().any(|(a, _)| a.is_ipv6()) {
                tracing::warn!(port = %p.name, "IPv6 addresses ignored: the software backend routes IPv4 only");
            }
            PortConfig {
                name: ifname.clone(),
                mac: p.mac,
                addrs: p
                    .addresses
                    .iter()
                    .filter_map(|&(a, len)| v4(a).map(|a| (a, len)))
                    .collect(),
            }
        })
        .collect();
    let mut routes = Vec::new();
    for r in &cfg.routes {
        if r.prefix.family != Family::V4 {
            tracing::warn!(prefix = ?r.prefix, "IPv6 route ignored: the software backend routes IPv4 only");
            continue;
        }
        routes.push(StaticRoute {
            prefix: Prefix {
                addr: r.prefix.addr.as_v4(),
                len: r.prefix.len,
            },
            via: r.via.and_then(v4),
            port: Some(r.port),
        });
    }
    Ok(GatewayConfig {
        ports,
        routes,
        ..GatewayConfig::default()
    })
}

/// Whether received TCP/UDP checksums must be filled in on `ifname`: on virtual
/// interfaces (veth, tun, bridges: no `device` link in sysfs), whose senders leave
/// checksums to offload; also when sysfs does not say.
fn needs_checksum_fill(ifname: &str) -> bool {
    let dir = Path::new("/sys/class/net").join(ifname);
    !dir.exists() || !dir.join("device").exists()
}

/// The ports over `interfaces` with the requested packet I/O. `AF_PACKET` opens each
/// interface on its own (an error names `backend.interfaces[i]`), with memory-mapped
/// rings where they can be set up (see [`AfPacket::open`]); AF_XDP opens them
/// together (one UMEM) after the same per-interface check, and falls back to
/// `AF_PACKET` with the reason logged when XDP cannot attach.
fn open_ports(
    interfaces: &[String],
    io: PacketIo,
    xdp: AfXdpConfig,
) -> Result<Vec<AnyPort>, BackendError> {
    let missing = |index: usize, name: &String, source: PortError| BackendError::Interface {
        index,
        name: name.clone(),
        source,
    };
    match io {
        PacketIo::AfPacket => interfaces
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let port = AfPacket::open(name).map_err(|e| missing(i, name, e))?;
                tracing::info!(port = %name, io = %port.io(), "backend software: AF_PACKET packet I/O");
                Ok(AnyPort::AfPacket(port))
            })
            .collect(),
        PacketIo::AfXdp => {
            // Each interface must exist and be usable: the same check (and error) as
            // AF_PACKET, before the group is opened; a plain socket, no rings to map
            // only to unmap them.
            let check = AfPacketOptions {
                ring: None,
                ..AfPacketOptions::default()
            };
            for (i, name) in interfaces.iter().enumerate() {
                drop(AfPacket::open_with(name, &check).map_err(|e| missing(i, name, e))?);
            }
            let names: Vec<&str> = interfaces.iter().map(String::as_str).collect();
            let (ports, chosen) =
                af_xdp::open_ports(&names, IoRequest::AfXdp(xdp))
                    .map_err(|e| missing(0, &interfaces.join(","), e))?;
            tracing::info!(?chosen, "backend software: packet I/O");
            Ok(ports)
        }
    }
}

/// The running forwarder thread.
#[derive(Debug)]
pub struct SoftwareBackend {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), ForwardError>>>,
}

impl SoftwareBackend {
    /// Opens `interfaces` (`ports[i]` on `interfaces[i]`) and starts the forwarding
    /// thread over `control`'s table. The configuration's NAT rules are installed in
    /// that table by `config::apply` (before this is called), like every later change.
    ///
    /// # Errors
    /// See [`BackendError`]; nothing is left running.
    pub fn start(
        cfg: &AgentConfig,
        interfaces: &[String],
        io: PacketIo,
        control: Arc<SoftwareControl>,
    ) -> Result<Self, BackendError> {
        let gw = Gateway::new(gateway_config(cfg, interfaces)?).map_err(BackendError::Routes)?;
        let xdp = match &cfg.backend {
            Backend::Software { af_xdp, .. } => *af_xdp,
            Backend::Sim { .. } | Backend::Vfio { .. } => AfXdpConfig::default(),
        };
        let ports = open_ports(interfaces, io, xdp)?;
        let fwd_cfg = ForwarderConfig {
            rx_batch: RX_BATCH,
            fill_checksums: interfaces.iter().any(|i| needs_checksum_fill(i)),
            gc_budget: 256,
            ..ForwarderConfig::default()
        };
        tracing::info!(
            interfaces = ?interfaces,
            fill_checksums = fwd_cfg.fill_checksums,
            nat_rules = cfg.nat_rules.len(),
            io = ?io,
            "backend software: forwarding"
        );
        let offload = if xdp.flow_table_entries > 0 && io == PacketIo::AfXdp {
            let o = XdpFlowOffload::for_ports(&ports, XdpOffloadConfig::default());
            match &o {
                Some(o) => tracing::info!(
                    entries = o.table().capacity(),
                    "backend software: established flows in the XDP flow table (senders on virtual interfaces must send full checksums)"
                ),
                None => tracing::warn!(
                    "backend software: no XDP flow table (the ports are not AF_XDP): flow_offload off"
                ),
            }
            o
        } else {
            None
        };
        let clock = control.clock();
        let mut fwd = SoftwareForwarder::new(fwd_cfg, ports, gw, control);
        if let Some(o) = offload {
            fwd = fwd.with_xdp_offload(o);
        }
        // The control plane releases the XDP table's connections it deletes or drains
        // (their last counts folded in first); unset again when the loop stops.
        if let Some(x) = fwd.xdp_offload() {
            x.lock().report_events();
            let carrier: Arc<dyn FlowCarrier> = Arc::new(x.clone());
            if let Err(e) = fwd.table().set_flow_carrier(Some(carrier)) {
                tracing::error!(error = %e, "backend software: XDP flow offload not released by the API");
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("ctoffload-fwd".into())
            .spawn(move || {
                let r = fwd.run(&stop2, &*clock);
                if fwd.xdp_offload().is_some()
                    && let Err(e) = fwd.table().set_flow_carrier(None)
                {
                    tracing::error!(error = %e, "backend software: XDP flow offload still set in the API");
                }
                let s = fwd.stats();
                tracing::info!(
                    rx = s.rx,
                    tx = s.tx,
                    drop_invalid = s.drop_invalid,
                    drop_nat = s.drop_nat,
                    drop_tx_full = s.drop_tx_full,
                    gateway = ?fwd.gateway().stats(),
                    xdp_offload = ?fwd.xdp_offload().map(SharedXdpOffload::stats),
                    "forwarding thread stopped"
                );
                r
            })
            .map_err(BackendError::Thread)?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the forwarding thread has ended (it ends only when stopped or on an
    /// error).
    #[must_use]
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread and waits for it; returns how it ended.
    ///
    /// # Errors
    /// The loop failed (a port's socket, the table) or panicked.
    pub fn stop(&mut self) -> Result<(), ForwardError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(e),
            Some(Err(_)) => Err(ForwardError::Panicked),
        }
    }
}

impl Drop for SoftwareBackend {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::error!(error = %e, "forwarding thread");
        }
    }
}
