//! The built-in simulated NIC (`backend = "sim"`): nic-sim on its own thread with
//! in-memory ports, the driver over it, and the dataplane's worker thread serving the
//! API ([`DataplaneControl`]).
//!
//! The far ends of the simulator's ports ([`MemPort`]) stay with the caller: the demo's
//! traffic generator sends frames into them and reads what the device emits; the agent
//! uses them only for `--preload`.
//!
//! With `backend.interfaces`, port i is wired to host interface i instead
//! ([`AfPacketPort`]) and the worker becomes a router between real hosts: the gateway
//! of `[[ports]]` and `[[routes]]` (ARP, routes, TTL, ICMP errors; see
//! `dataplane::router`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ctoffload_driver::device::{Clock, Device, DeviceConfig};
use ctoffload_driver::io::DeviceIo as _;
use ctoffload_driver::sim_io::SimIo;
use ctoffload_driver::sim_process::SimProcess;
use ctoffload_nic_sim::port::{AfPacketPort, MemPort};
use ctoffload_nic_sim::wire_pad::RuntPadded;
use ctoffload_nic_sim::{SimClock, SimConfig, SimStats, SimThread, Simulator};

use crate::api::DataplaneControl;
use crate::api::dataplane::DeviceFacts;
use crate::config::{AgentConfig, Backend, Displacement};
use crate::dataplane::{OffloadPolicy, PortL2, Routing, Worker, WorkerConfig};
use crate::metrics::MetricsHandle;

/// Frames each in-memory link holds per direction.
pub const PORT_QUEUE: usize = 8192;

/// Why the simulated dataplane could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The simulator refused its configuration or a port.
    #[error("simulator: {what}")]
    Sim {
        /// What failed.
        what: String,
    },
    /// A host interface could not be opened as a simulator port.
    #[error("{key}: interface {interface:?}: {what}")]
    Interface {
        /// The configuration key (`backend.interfaces[1]`).
        key: String,
        /// The interface.
        interface: String,
        /// What failed.
        what: String,
    },
    /// The gateway refused the ports or routes.
    #[error("gateway")]
    Gateway(#[source] crate::gateway::from_config::GatewayConfigError),
    /// The driver could not bring the device up.
    #[error("driver bring-up")]
    Driver(#[source] ctoffload_driver::DriverError),
    /// The simulator process on `backend.sim_socket` could not be reached or attached.
    #[error("backend.sim_socket: simulator process at {socket}")]
    Process {
        /// The control socket.
        socket: String,
        /// Why.
        #[source]
        source: ctoffload_driver::DriverError,
    },
    /// The worker thread could not be spawned.
    #[error("worker thread")]
    Thread(#[source] std::io::Error),
}

/// Where the device model runs.
#[derive(Debug)]
enum Model {
    /// On a thread of this process; stopped with the agent.
    Thread(SimThread),
    /// A `ctoffload-nic-sim` process that outlives the agent, like a NIC: the agent
    /// detaches from it when it stops.
    Process(SimProcess),
}

/// The running simulated dataplane.
#[derive(Debug)]
pub struct SimDataplane {
    /// The control plane over the worker thread.
    pub control: Arc<DataplaneControl<SimIo>>,
    /// The far end of each simulator port (index = port number); empty when the ports
    /// are on host interfaces or in a simulator process.
    pub wire: Vec<MemPort>,
    /// The clock shared by the driver, the worker and the simulator.
    pub clock: Clock,
    sim: Option<Model>,
}

impl SimDataplane {
    /// The in-process simulator's datapath counters (hits = packets the table
    /// forwarded); `None` for a simulator process.
    #[must_use]
    pub fn sim_stats(&self) -> Option<SimStats> {
        match self.sim.as_ref()? {
            Model::Thread(t) => Some(t.stats()),
            Model::Process(_) => None,
        }
    }

    /// Stop the worker, then the simulator thread; a simulator process is left
    /// running with its table forwarding: the device is detached (device.md 17.5) and
    /// the connection closed, which removes the agent's DMA mappings.
    pub fn stop(&mut self) {
        let worker = self.control.shutdown();
        match self.sim.take() {
            Some(Model::Thread(s)) => {
                drop(worker);
                drop(s.stop());
            }
            Some(Model::Process(p)) => {
                match worker.map(|w| w.into_device().detach()) {
                    Some(Ok(_)) => tracing::info!(
                        socket = p.socket_path(),
                        "device detached; the simulator process keeps forwarding its table"
                    ),
                    Some(Err(e)) => tracing::warn!(
                        socket = p.socket_path(),
                        error = %super::error_chain(&e),
                        "cannot detach the device; the next agent resets it"
                    ),
                    None => tracing::warn!("the worker thread was gone; device not detached"),
                }
                drop(p);
            }
            None => drop(worker),
        }
    }
}

impl Drop for SimDataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The device table geometry for `table_size` entries (default 64 Ki): 8-way buckets.
fn geometry(table_size: Option<u32>) -> (u8, u32) {
    let want = table_size.unwrap_or(1 << 16).clamp(1 << 7, 1 << 20);
    let buckets = (want / 8).next_power_of_two();
    let log2 = u8::try_from(buckets.trailing_zeros()).unwrap_or(13);
    (log2, want)
}

/// The worker configuration for `cfg`: ports (two when none is configured), L2
/// rewrite from the ports' MACs, masquerade address per port, policy, and NAT rules.
#[must_use]
pub fn worker_config(cfg: &AgentConfig) -> WorkerConfig {
    let nports = cfg.ports.len().max(2);
    // Frames leave on the port of the first route whose egress differs, else the
    // other port of a pair.
    let egress: Vec<u8> = (0..nports)
        .map(|p| {
            let other = if p % 2 == 0 { p + 1 } else { p - 1 };
            u8::try_from(other.min(nports - 1)).unwrap_or(0)
        })
        .collect();
    let l2 = (0..nports)
        .map(|p| {
            cfg.ports.get(p).map(|port| PortL2 {
                mac: port.mac,
                // No neighbour resolution yet: frames go to the broadcast address.
                next_hop: [0xff; 6],
            })
        })
        .collect();
    let port_addrs = (0..nports)
        .map(|p| {
            cfg.ports.get(p).and_then(|port| {
                port.addresses.iter().find_map(|(a, _)| match a {
                    std::net::IpAddr::V4(v4) => Some(v4.octets()),
                    std::net::IpAddr::V6(_) => None,
                })
            })
        })
        .collect();
    let second = 1_000_000_000;
    WorkerConfig {
        conntrack: super::agent::conntrack_config(cfg),
        policy: hw_policy(cfg),
        routing: Routing {
            egress,
            l2,
            dec_ttl: false,
        },
        rx_batch: 256,
        cmd_batch: 256,
        recover_retry_ns: second,
        port_addrs,
        ..WorkerConfig::default()
    }
}

/// The offload policy of `cfg`. A flow leaves hardware after being idle there for its
/// protocol's idle time (Linux flowtable: 30 s) or, when shorter, the software timeout
/// of an established TCP connection / a UDP stream: hardware never keeps a connection
/// software would have expired.
fn hw_policy(cfg: &AgentConfig) -> OffloadPolicy {
    let d = OffloadPolicy::default();
    let secs = |s: u32| u64::from(s).saturating_mul(1_000_000_000);
    OffloadPolicy {
        displace_coldest: cfg.offload.displacement == Displacement::Idlest,
        tcp_idle_ns: d.tcp_idle_ns.min(secs(cfg.timeouts.tcp.established)),
        udp_idle_ns: d.udp_idle_ns.min(secs(cfg.timeouts.other.udp_stream)),
        ..d
    }
}

/// Start the simulator, bring the device up over it and start the worker thread
/// (without NAT rules: [`crate::config::apply`] installs them).
pub fn start(cfg: &AgentConfig, metrics: MetricsHandle) -> Result<SimDataplane, SimError> {
    start_with(cfg, metrics, |_| {})
}

/// [`start`], with the worker configuration adjusted by `tweak` first (the demo
/// shortens the hardware idle timeouts).
pub fn start_with(
    cfg: &AgentConfig,
    metrics: MetricsHandle,
    tweak: impl FnOnce(&mut WorkerConfig),
) -> Result<SimDataplane, SimError> {
    let (table_size, interfaces, sim_socket) = match &cfg.backend {
        Backend::Sim {
            table_size,
            interfaces,
            sim_socket,
        } => (*table_size, interfaces.as_slice(), sim_socket.as_deref()),
        Backend::Vfio { .. } | Backend::Software { .. } => (None, &[][..], None),
    };
    let gateway = if interfaces.is_empty() {
        None
    } else {
        Some(crate::gateway::from_config::gateway(cfg).map_err(SimError::Gateway)?)
    };
    let mut wcfg = worker_config(cfg);
    tweak(&mut wcfg);
    let clock = Clock::monotonic();
    // The simulator shares the machine with everything else.
    let dcfg = DeviceConfig::for_simulator(clock.clone());
    let (dev, model, wire, attached) = match sim_socket {
        None => {
            let nports = wcfg.routing.egress.len().max(interfaces.len());
            let (dev, sim, wire) = in_process(table_size, interfaces, nports, dcfg)?;
            (dev, Model::Thread(sim), wire, false)
        }
        Some(path) => {
            let (dev, proc, attached) = external(path, dcfg)?;
            (dev, Model::Process(proc), Vec::new(), attached)
        }
    };
    let stop_model = |m: Model| {
        if let Model::Thread(s) = m {
            drop(s.stop());
        }
    };
    // The worker's clock and the device's TIMESTAMP (last-hit times) start at
    // different moments when the device was running before this agent.
    let dev_now = match dev.io().read_timestamp() {
        Ok(t) => t,
        Err(e) => {
            stop_model(model);
            return Err(SimError::Driver(e));
        }
    };
    wcfg.device_time_offset_ns =
        i64::try_from(i128::from(clock.now_ns()) - i128::from(dev_now)).unwrap_or(0);
    // NAT rules are installed by `config::apply` through the control plane, as on
    // SIGHUP, so that the API's rule store and the engine hold the same rules.
    let mut worker = Worker::new(wcfg, dev);
    if let Some(gw) = gateway {
        // veth and other virtual interfaces leave TCP/UDP checksums to offload.
        worker.set_gateway(gw, true);
    }
    if attached {
        match worker.restore(clock.now_ns()) {
            Ok(r) => tracing::info!(
                entries = r.entries,
                adopted = r.adopted,
                deleted = r.deleted,
                "device table read back: connections adopted"
            ),
            Err(e) => tracing::warn!(
                error = %super::error_chain(&e),
                "device table not read back; the device is recovered with an empty table"
            ),
        }
    }
    let journal = usize::try_from(cfg.limits.event_journal_capacity).unwrap_or(usize::MAX);
    let place = match sim_socket {
        Some(p) => format!("process at {}", p.display()),
        None => "in-process".into(),
    };
    let control = DataplaneControl::start(
        worker,
        cfg.offload.policy,
        clock.clone(),
        DeviceFacts {
            backend: "sim".into(),
            identity: if interfaces.is_empty() {
                format!("nic-sim CTO-1 model ({place})")
            } else {
                format!("nic-sim CTO-1 model ({place}) on {}", interfaces.join(", "))
            },
        },
        journal,
        metrics,
    );
    let control = match control {
        Ok(c) => Arc::new(c),
        Err(e) => {
            stop_model(model);
            return Err(SimError::Thread(e));
        }
    };
    Ok(SimDataplane {
        control,
        wire,
        clock,
        sim: Some(model),
    })
}

/// The model on a thread of this process, its ports on `interfaces` (or in memory:
/// the far ends are returned), and the device brought up over it (with a reset).
fn in_process(
    table_size: Option<u32>,
    interfaces: &[String],
    nports: usize,
    dcfg: DeviceConfig,
) -> Result<(Device<SimIo>, SimThread, Vec<MemPort>), SimError> {
    let (buckets_log2, flow_limit) = geometry(table_size);
    let sim_err = |what: String| SimError::Sim { what };
    let mut sim = Simulator::new(SimConfig {
        buckets_log2,
        flow_limit,
        num_ports: u8::try_from(nports).unwrap_or(2),
        rx_ring_max_log2: 12,
        ..SimConfig::default()
    })
    .map_err(|e| sim_err(e.to_string()))?;
    let mut wire = Vec::with_capacity(nports);
    for (p, name) in interfaces.iter().enumerate() {
        let port = AfPacketPort::open(name).map_err(|e| SimError::Interface {
            key: format!("backend.interfaces[{p}]"),
            interface: name.clone(),
            what: e.to_string(),
        })?;
        sim.attach_port(
            u8::try_from(p).unwrap_or(0),
            Box::new(RuntPadded::new(port)),
        )
        .map_err(|e| sim_err(format!("port {p}: {e}")))?;
    }
    if interfaces.is_empty() {
        for p in 0..nports {
            let (dev_end, host_end) = MemPort::pair(PORT_QUEUE);
            sim.attach_port(u8::try_from(p).unwrap_or(0), Box::new(dev_end))
                .map_err(|e| sim_err(format!("port {p}: {e}")))?;
            wire.push(host_end);
        }
    }
    let io = driver_io(&sim, |_, _| ())?;
    let sim = sim.spawn(SimClock::Monotonic);
    match Device::new(io, dcfg) {
        Ok(d) => Ok((d, sim, wire)),
        Err(e) => {
            drop(sim.stop());
            Err(SimError::Driver(e))
        }
    }
}

/// The driver's backend on the in-process simulator `sim`: its register file, its
/// interrupt eventfds, and its IOMMU, into which every DMA mapping the driver makes
/// goes; `on_map(iova, len)` hears of each one that succeeded (a test that plays a
/// second driver instance unmaps them later, as closing a VFIO container does).
///
/// # Errors
/// The simulator's interrupt eventfds could not be duplicated, or the driver could not
/// map the register file.
pub fn driver_io(
    sim: &Simulator,
    mut on_map: impl FnMut(u64, u64) + Send + 'static,
) -> Result<SimIo, SimError> {
    let iommu = sim.iommu();
    let irqs = sim.irq_fds().map_err(|e| SimError::Sim {
        what: e.to_string(),
    })?;
    SimIo::new(
        sim.bar_fd(),
        Box::new(move |iova, fd, off, len| {
            iommu.map(iova, fd, off, len).map_err(|e| e.to_string())?;
            on_map(iova, len);
            Ok(())
        }),
        irqs,
    )
    .map_err(SimError::Driver)
}

/// The device of the `ctoffload-nic-sim` process at `path`: attached without a reset
/// when it can be (its table kept, `true`), else brought up with one (a fresh start,
/// or a device left fatal by an agent that died attached).
fn external(
    path: &Path,
    dcfg: DeviceConfig,
) -> Result<(Device<SimIo>, SimProcess, bool), SimError> {
    let err = |source| SimError::Process {
        socket: path.display().to_string(),
        source,
    };
    let proc = SimProcess::connect(path, Duration::from_secs(5)).map_err(err)?;
    let io = proc.attach().map_err(err)?;
    match Device::attach(io, dcfg.clone()) {
        Ok(d) => return Ok((d, proc, true)),
        Err(e) if proc.is_gone() => return Err(err(e)),
        Err(e) => tracing::warn!(
            socket = %path.display(),
            error = %super::error_chain(&e),
            "cannot attach to the running device; resetting it (its table is lost)"
        ),
    }
    let io = proc.attach().map_err(err)?;
    let dev = Device::new(io, dcfg).map_err(err)?;
    Ok((dev, proc, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interface_that_cannot_be_opened_is_named_by_its_key() {
        let cfg = crate::config::parse(
            r#"
[backend]
kind = "sim"
interfaces = ["ctoffload-no0"]

[[ports]]
name = "only"
mac = "02:00:00:00:00:01"
addresses = ["10.0.0.1/24"]
"#,
        )
        .expect("valid configuration");
        match start(&cfg, MetricsHandle::default()) {
            Err(SimError::Interface { key, interface, .. }) => {
                assert_eq!(key, "backend.interfaces[0]");
                assert_eq!(interface, "ctoffload-no0");
            }
            other => panic!("expected an interface error, got {other:?}"),
        }
    }
}
