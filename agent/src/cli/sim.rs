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

use std::sync::Arc;
use std::time::Duration;

use ctoffload_driver::device::{Clock, Device, DeviceConfig};
use ctoffload_driver::sim_io::SimIo;
use ctoffload_hw_regs::limits::MIN_WIRE_FRAME_LEN;
use ctoffload_nic_sim::port::{AfPacketPort, FrameBatch, MemPort, PortBackend, PortStats};
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
    /// The worker thread could not be spawned.
    #[error("worker thread")]
    Thread(#[source] std::io::Error),
}

/// The running simulated dataplane.
#[derive(Debug)]
pub struct SimDataplane {
    /// The control plane over the worker thread.
    pub control: Arc<DataplaneControl<SimIo>>,
    /// The far end of each simulator port (index = port number); empty when the ports
    /// are on host interfaces.
    pub wire: Vec<MemPort>,
    /// The clock shared by the driver, the worker and the simulator.
    pub clock: Clock,
    sim: Option<SimThread>,
}

impl SimDataplane {
    /// The simulator's datapath counters (hits = packets the table forwarded).
    #[must_use]
    pub fn sim_stats(&self) -> Option<SimStats> {
        self.sim.as_ref().map(SimThread::stats)
    }

    /// Stop the worker, then the simulator.
    pub fn stop(&mut self) {
        self.control.shutdown();
        if let Some(s) = self.sim.take() {
            drop(s.stop());
        }
    }
}

impl Drop for SimDataplane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A host interface as a simulated port, as a wire would deliver its frames: the
/// sending host's MAC pads frames to the Ethernet minimum (60 bytes without FCS), but
/// a packet socket hands them up unpadded (a 42-byte ARP request), and the device drops
/// runts. Received frames are padded here; sent ones go out as they are.
#[derive(Debug)]
struct WirePort {
    port: AfPacketPort,
    scratch: FrameBatch,
}

impl WirePort {
    fn new(port: AfPacketPort) -> Self {
        Self {
            port,
            scratch: FrameBatch::new(64),
        }
    }
}

impl PortBackend for WirePort {
    fn recv_batch(
        &mut self,
        batch: &mut FrameBatch,
        max: usize,
    ) -> ctoffload_nic_sim::Result<usize> {
        self.scratch.clear();
        let want = max.min(batch.spare()).min(self.scratch.capacity());
        let n = self.port.recv_batch(&mut self.scratch, want)?;
        let min = usize::try_from(MIN_WIRE_FRAME_LEN).unwrap_or(60);
        let mut padded = [0u8; 64];
        for f in self.scratch.iter() {
            if f.len() < min && min <= padded.len() {
                padded[..f.len()].copy_from_slice(f);
                padded[f.len()..min].fill(0);
                batch.push(&padded[..min])?;
            } else {
                batch.push(f)?;
            }
        }
        Ok(n)
    }

    fn send(&mut self, frame: &[u8]) -> ctoffload_nic_sim::Result<()> {
        self.port.send(frame)
    }

    fn send_batch(&mut self, batch: &FrameBatch) -> ctoffload_nic_sim::Result<()> {
        self.port.send_batch(batch)
    }

    fn stats(&self) -> PortStats {
        self.port.stats()
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
    let (table_size, interfaces) = match &cfg.backend {
        Backend::Sim {
            table_size,
            interfaces,
        } => (*table_size, interfaces.as_slice()),
        Backend::Vfio { .. } | Backend::Software { .. } => (None, &[][..]),
    };
    let gateway = if interfaces.is_empty() {
        None
    } else {
        Some(crate::gateway::from_config::gateway(cfg).map_err(SimError::Gateway)?)
    };
    let mut wcfg = worker_config(cfg);
    tweak(&mut wcfg);
    let nports = wcfg.routing.egress.len().max(interfaces.len());
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
        sim.attach_port(u8::try_from(p).unwrap_or(0), Box::new(WirePort::new(port)))
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
    let iommu = sim.iommu();
    let irqs = sim.irq_fds().map_err(|e| sim_err(e.to_string()))?;
    let io = SimIo::new(
        sim.bar_fd(),
        Box::new(move |iova, fd, off, len| {
            iommu.map(iova, fd, off, len).map_err(|e| e.to_string())
        }),
        irqs,
    )
    .map_err(SimError::Driver)?;
    let sim = sim.spawn(SimClock::Monotonic);
    let clock = Clock::monotonic();
    let dev = match Device::new(
        io,
        DeviceConfig {
            cmd_ring_log2: 12,
            rx_ring_log2: 12,
            tx_ring_log2: 12,
            clock: clock.clone(),
            // The simulator shares the machine with everything else.
            cmd_timeout_ns: 1_000_000_000,
            ready_timeout: Duration::from_secs(2),
            enable_timeout: Duration::from_secs(2),
            ..DeviceConfig::default()
        },
    ) {
        Ok(d) => d,
        Err(e) => {
            drop(sim.stop());
            return Err(SimError::Driver(e));
        }
    };
    // NAT rules are installed by `config::apply` through the control plane, as on
    // SIGHUP, so that the API's rule store and the engine hold the same rules.
    let mut worker = Worker::new(wcfg, dev);
    if let Some(gw) = gateway {
        // veth and other virtual interfaces leave TCP/UDP checksums to offload.
        worker.set_gateway(gw, true);
    }
    let journal = usize::try_from(cfg.limits.event_journal_capacity).unwrap_or(usize::MAX);
    let control = DataplaneControl::start(
        worker,
        cfg.offload.policy,
        clock.clone(),
        DeviceFacts {
            backend: "sim".into(),
            identity: if interfaces.is_empty() {
                "nic-sim CTO-1 model (in-process)".into()
            } else {
                format!(
                    "nic-sim CTO-1 model (in-process) on {}",
                    interfaces.join(", ")
                )
            },
        },
        journal,
        metrics,
    );
    let control = match control {
        Ok(c) => Arc::new(c),
        Err(e) => {
            drop(sim.stop());
            return Err(SimError::Thread(e));
        }
    };
    Ok(SimDataplane {
        control,
        wire,
        clock,
        sim: Some(sim),
    })
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
