//! `ctoffload agent`: run the dataplane and the gRPC API over it, the Prometheus
//! endpoint, and reload the configuration on SIGHUP. SIGTERM and SIGINT shut down
//! gracefully.
//!
//! `backend = "sim"` (the default) starts the built-in simulated NIC and the worker
//! thread ([`sim`](super::sim)) and serves [`DataplaneControl`]; `backend = "software"`
//! opens the configured interfaces and runs the software forwarder on its own thread
//! ([`SoftwareBackend`]) over the [`SoftwareControl`] table the API serves (GC every
//! second); `vfio` is not wired into the runner yet.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use ctoffload_fallback_sw::conntrack::Config as CtConfig;
use ctoffload_fallback_sw::nat::rules::NatRule as EngineRule;
use ctoffload_fallback_sw::tcp::TcpConfig;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use ctoffload_driver::sim_io::SimIo;

use super::sim::{SimDataplane, SimError};
use crate::api::error::ApiError;
use crate::api::journal::EventJournal;
use crate::api::model::{
    Configured, ConnFilter, ConnInfo, ConnKey, DeviceStatus, Limits, LimitsUpdate, ListCursor,
    ListPage, NatRule, OffloadPolicy, StatsSnapshot, Timeouts, TimeoutsUpdate,
};
use crate::api::{
    ApiServer, ControlPlane, DataplaneControl, Listen, ServeError, ServerConfig, SoftwareControl,
    TlsConfig,
};
use crate::config::Backend;
use crate::config::{self, AgentConfig, ApplyReport, ConfigError, DEFAULT_CONFIG_PATH};
use crate::gateway::backend::{BackendError, SoftwareBackend};
use crate::gateway::forward::ForwardError;
use crate::metrics;

/// Options of `ctoffload agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Configuration file (TOML, see docs/config.md).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Check the configuration and exit (status 0 if valid, 2 if not).
    #[arg(long)]
    pub check: bool,
    /// Track the frames of a pcap capture at start (zone 0): for demos and tests,
    /// until the dataplane feeds the table.
    #[arg(long, value_name = "PCAP")]
    pub preload: Option<PathBuf>,
}

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration is unusable.
    #[error("{path}")]
    Config {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
    /// A TLS file named by the configuration could not be read.
    #[error("{key}: cannot read {path}")]
    TlsFile {
        /// The key (`api.tls.cert`).
        key: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API server could not start or failed.
    #[error("API server")]
    Serve(#[source] ServeError),
    /// The metrics endpoint could not listen.
    #[error("metrics.listen: cannot listen on {addr}")]
    Metrics {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The preload capture could not be read.
    #[error("--preload {path}")]
    Preload {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: pcap_file::PcapError,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The simulated dataplane could not start.
    #[error("backend sim")]
    Sim(#[source] SimError),
    /// The software backend could not start.
    #[error("backend software")]
    Software(#[source] BackendError),
    /// The software backend's forwarding thread stopped on an error.
    #[error("backend software: forwarding stopped")]
    Forwarding(#[source] ForwardError),
    /// The configured backend is not available in this build of the runner.
    #[error("backend {backend}: not supported by the agent runner yet")]
    Unsupported {
        /// The backend.
        backend: &'static str,
    },
}

/// The control plane the agent serves: the dataplane's, or the software table's.
#[derive(Debug, Clone)]
pub enum AgentControl {
    /// One software table (`backend = "software"`).
    Software(Arc<SoftwareControl>),
    /// The dataplane's worker thread over a device.
    Dataplane(Arc<DataplaneControl<SimIo>>),
}

macro_rules! delegate {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            AgentControl::Software($c) => $e,
            AgentControl::Dataplane($c) => $e,
        }
    };
}

impl ControlPlane for AgentControl {
    fn list(&self, f: &ConnFilter, cur: ListCursor, max: usize) -> Result<ListPage, ApiError> {
        delegate!(self, c => c.list(f, cur, max))
    }
    fn get(&self, key: &ConnKey) -> Result<ConnInfo, ApiError> {
        delegate!(self, c => c.get(key))
    }
    fn delete(&self, key: &ConnKey) -> Result<ConnInfo, ApiError> {
        delegate!(self, c => c.delete(key))
    }
    fn delete_matching(&self, f: &ConnFilter) -> Result<u64, ApiError> {
        delegate!(self, c => c.delete_matching(f))
    }
    fn flush(&self) -> Result<u64, ApiError> {
        delegate!(self, c => c.flush())
    }
    fn journal(&self) -> &EventJournal {
        delegate!(self, c => c.journal())
    }
    fn stats(&self) -> Result<StatsSnapshot, ApiError> {
        delegate!(self, c => c.stats())
    }
    fn nat_rules(&self) -> Result<Vec<NatRule>, ApiError> {
        delegate!(self, c => c.nat_rules())
    }
    fn add_nat_rule(&self, rule: NatRule) -> Result<NatRule, ApiError> {
        delegate!(self, c => c.add_nat_rule(rule))
    }
    fn add_engine_nat_rule(
        &self,
        name: String,
        rule: EngineRule,
        api: Option<NatRule>,
    ) -> Result<(), ApiError> {
        delegate!(self, c => c.add_engine_nat_rule(name, rule, api))
    }
    fn remove_nat_rule(&self, name: &str) -> Result<(), ApiError> {
        delegate!(self, c => c.remove_nat_rule(name))
    }
    fn offload_policy(&self) -> Result<OffloadPolicy, ApiError> {
        delegate!(self, c => c.offload_policy())
    }
    fn set_offload_policy(&self, p: OffloadPolicy) -> Result<OffloadPolicy, ApiError> {
        delegate!(self, c => c.set_offload_policy(p))
    }
    fn drain_offload(&self, disable: bool) -> Result<u64, ApiError> {
        delegate!(self, c => c.drain_offload(disable))
    }
    fn device_status(&self) -> Result<DeviceStatus, ApiError> {
        delegate!(self, c => c.device_status())
    }
    fn timeouts(&self) -> Result<Configured<Timeouts>, ApiError> {
        delegate!(self, c => c.timeouts())
    }
    fn set_timeouts(&self, u: TimeoutsUpdate) -> Result<Configured<Timeouts>, ApiError> {
        delegate!(self, c => c.set_timeouts(u))
    }
    fn limits(&self) -> Result<Configured<Limits>, ApiError> {
        delegate!(self, c => c.limits())
    }
    fn set_limits(&self, u: LimitsUpdate) -> Result<Configured<Limits>, ApiError> {
        delegate!(self, c => c.set_limits(u))
    }
}

/// The running agent: its control plane and the configuration it runs with.
#[derive(Debug)]
pub struct Agent {
    path: PathBuf,
    control: Arc<AgentControl>,
    sim: Mutex<Option<SimDataplane>>,
    software: Mutex<Option<SoftwareBackend>>,
    config: Mutex<AgentConfig>,
    metrics: metrics::MetricsHandle,
    socket_override: Option<PathBuf>,
}

/// The software conntrack configuration of `cfg`.
pub fn conntrack_config(cfg: &AgentConfig) -> CtConfig {
    CtConfig {
        tcp: TcpConfig {
            timeouts: cfg.timeouts.tcp,
            ..TcpConfig::default()
        },
        timeouts: cfg.timeouts.other,
        max_connections: usize::try_from(cfg.limits.max_connections).unwrap_or(usize::MAX),
        ..CtConfig::default()
    }
}

fn log_report(what: &str, r: &ApplyReport) {
    tracing::info!(applied = ?r.applied, "{what}");
    if !r.restart_required.is_empty() {
        tracing::warn!(keys = ?r.restart_required, "these settings take effect only after a restart");
    }
    for (key, e) in &r.failed {
        tracing::error!(key = %key, error = %e, "setting not applied");
    }
}

/// Starts the simulated dataplane from a thread that has first dropped every
/// capability but what opening its ports needs (none with in-memory ports or a
/// simulator process, which opens its own; CAP_NET_RAW and CAP_NET_ADMIN for AF_PACKET
/// on host interfaces), so that the simulator's and the worker's threads, which it
/// spawns, never hold more: capabilities are per thread and inherited at spawn. The
/// main thread drops its own after setup ([`crate::privileges::drop_after_setup`]).
fn start_sim_unprivileged(
    cfg: &AgentConfig,
    opens_interfaces: bool,
    m: &metrics::MetricsHandle,
) -> Result<SimDataplane, AgentError> {
    use crate::privileges::{CAP_NET_ADMIN, CAP_NET_RAW, drop_this_thread};
    let keep: &[u32] = if opens_interfaces {
        &[CAP_NET_RAW, CAP_NET_ADMIN]
    } else {
        &[]
    };
    std::thread::scope(|s| {
        let spawner = std::thread::Builder::new()
            .name("sim-start".into())
            .spawn_scoped(s, || {
                if let Err(e) = drop_this_thread(keep) {
                    tracing::warn!(error = %e, "sim backend: cannot drop privileges before start");
                }
                super::sim::start(cfg, m.clone())
            })
            .map_err(|e| AgentError::Sim(SimError::Thread(e)))?;
        let started = spawner.join().map_err(|_| {
            AgentError::Sim(SimError::Thread(std::io::Error::other(
                "the sim start thread panicked",
            )))
        })?;
        started.map_err(AgentError::Sim)
    })
}

impl Agent {
    /// A software control plane built from `cfg` (read from `path`), with its settings
    /// applied, whatever the backend (tests; [`Agent::start`] runs the backend).
    #[must_use]
    pub fn new(path: PathBuf, cfg: AgentConfig) -> Self {
        let journal = usize::try_from(cfg.limits.event_journal_capacity).unwrap_or(usize::MAX);
        let control = AgentControl::Software(Arc::new(SoftwareControl::new(
            conntrack_config(&cfg),
            journal,
        )));
        Self::with_control(path, cfg, control, None, metrics::MetricsHandle::default())
    }

    /// The agent over the configured backend: `sim` starts the simulated NIC and the
    /// worker thread; `software` the software table.
    pub fn start(path: PathBuf, cfg: AgentConfig) -> Result<Self, AgentError> {
        match &cfg.backend {
            Backend::Sim {
                interfaces,
                sim_socket,
                ..
            } => {
                let m = metrics::MetricsHandle::default();
                let opens = sim_socket.is_none() && !interfaces.is_empty();
                let sim = start_sim_unprivileged(&cfg, opens, &m)?;
                tracing::info!(
                    ports = sim.wire.len(),
                    "backend sim: simulated NIC and dataplane worker started"
                );
                let control = AgentControl::Dataplane(Arc::clone(&sim.control));
                Ok(Self::with_control(path, cfg, control, Some(sim), m))
            }
            Backend::Software { interfaces, io, .. } => {
                let (interfaces, io) = (interfaces.clone(), *io);
                Self::start_software(path, cfg, &interfaces, io)
            }
            Backend::Vfio { .. } => Err(AgentError::Unsupported { backend: "vfio" }),
        }
    }

    /// The agent over a running dataplane (the demo starts its own).
    #[must_use]
    pub fn with_control(
        path: PathBuf,
        cfg: AgentConfig,
        control: AgentControl,
        sim: Option<SimDataplane>,
        metrics: metrics::MetricsHandle,
    ) -> Self {
        let control = Arc::new(control);
        let report = config::apply(&*control, None, &cfg);
        log_report("configuration applied", &report);
        Self {
            path,
            control,
            sim: Mutex::new(sim),
            software: Mutex::new(None),
            config: Mutex::new(cfg),
            metrics,
            socket_override: None,
        }
    }

    /// Stop the dataplane (worker thread, simulator), if any.
    pub fn stop_dataplane(&self) {
        let sim = self.sim.lock().ok().and_then(|mut s| s.take());
        if let Some(mut s) = sim {
            s.stop();
        }
        self.stop_software();
    }

    /// Listen on `socket` instead of the configuration's `api.socket`, now and after
    /// every reload.
    #[must_use]
    pub fn with_socket(mut self, socket: Option<PathBuf>) -> Self {
        if let Some(s) = &socket {
            self.config
                .get_mut()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .api
                .socket
                .clone_from(s);
        }
        self.socket_override = socket;
        self
    }

    /// The control plane.
    #[must_use]
    pub fn control(&self) -> &Arc<AgentControl> {
        &self.control
    }

    /// Where the dataplane feeds the time-to-offload histogram and the offload-queue
    /// gauge of the metrics endpoint.
    #[must_use]
    pub fn metrics(&self) -> &metrics::MetricsHandle {
        &self.metrics
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> AgentConfig {
        self.config
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Re-read the file, validate it and apply what changed. An invalid file changes
    /// nothing and is returned as the error.
    pub fn reload(&self) -> Result<ApplyReport, ConfigError> {
        let mut new = config::load(&self.path)?;
        if let Some(s) = &self.socket_override {
            new.api.socket.clone_from(s);
        }
        let mut cur = self
            .config
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let report = config::apply(&*self.control, Some(&cur), &new);
        *cur = new;
        Ok(report)
    }

    fn reload_logged(&self) {
        match self.reload() {
            Ok(r) => log_report("configuration reloaded", &r),
            Err(e) => tracing::error!(
                path = %self.path.display(),
                error = %crate::cli::error_chain(&e),
                "configuration reload rejected; the running configuration stays"
            ),
        }
    }

    /// Track the frames of a pcap capture.
    pub fn preload(&self, path: &Path) -> Result<u64, AgentError> {
        let err = |source| AgentError::Preload {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(|e| err(pcap_file::PcapError::IoError(e)))?;
        let mut reader = pcap_file::pcap::PcapReader::new(file).map_err(err)?;
        let mut n = 0;
        let mut sim = self
            .sim
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(pkt) = reader.next_packet() {
            let pkt = pkt.map_err(err)?;
            match (&*self.control, sim.as_mut()) {
                (AgentControl::Software(c), _) => {
                    if let Err(e) = c.process(&pkt.data, 0) {
                        tracing::warn!(error = %e, "preload: frame not tracked");
                    }
                }
                // Into the simulator's first port, as if it came from the wire.
                (AgentControl::Dataplane(_), Some(s)) => {
                    use ctoffload_nic_sim::port::PortBackend as _;
                    if let Some(port) = s.wire.first_mut()
                        && let Err(e) = port.send(&pkt.data)
                    {
                        tracing::warn!(error = %e, "preload: frame not injected");
                    }
                }
                (AgentControl::Dataplane(_), None) => {}
            }
            n += 1;
        }
        Ok(n)
    }
}

impl Agent {
    /// `backend = "software"`: the table the API serves, with the forwarder over the
    /// configured interfaces feeding it.
    fn start_software(
        path: PathBuf,
        cfg: AgentConfig,
        interfaces: &[String],
        io: config::PacketIo,
    ) -> Result<Self, AgentError> {
        let journal = usize::try_from(cfg.limits.event_journal_capacity).unwrap_or(usize::MAX);
        let control = Arc::new(SoftwareControl::new(conntrack_config(&cfg), journal));
        // The configuration (NAT rules included) is applied to the table before the
        // forwarder sees its first frame, so no connection is created untranslated.
        let agent = Self::with_control(
            path,
            cfg.clone(),
            AgentControl::Software(Arc::clone(&control)),
            None,
            metrics::MetricsHandle::default(),
        );
        let backend = if interfaces.is_empty() {
            tracing::warn!(
                "backend software: no interfaces configured; serving the table without \
                 packet I/O"
            );
            None
        } else {
            let b = SoftwareBackend::start(&cfg, interfaces, io, control)
                .map_err(AgentError::Software)?;
            Some(b)
        };
        *agent
            .software
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = backend;
        Ok(agent)
    }

    /// Stop the software forwarder, if any; its error, if it failed.
    fn stop_software(&self) -> Option<ForwardError> {
        let fwd = self.software.lock().ok().and_then(|mut s| s.take());
        fwd.and_then(|mut f| f.stop().err())
    }

    /// Whether the software forwarder has stopped on its own.
    fn software_stopped(&self) -> bool {
        self.software
            .lock()
            .ok()
            .is_some_and(|s| s.as_ref().is_some_and(SoftwareBackend::finished))
    }
}

/// The software backend's periodic work: table GC every second, and an end to the
/// agent when the forwarding thread has failed.
async fn software_housekeeping(
    agent: Arc<Agent>,
    control: Arc<SoftwareControl>,
    token: CancellationToken,
) -> Result<(), AgentError> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = token.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if let Err(e) = control.gc(4096) {
                    tracing::error!(error = %e, "gc failed");
                }
                if agent.software_stopped()
                    && let Some(e) = agent.stop_software()
                {
                    return Err(AgentError::Forwarding(e));
                }
            }
        }
    }
}

fn read_tls(key: &'static str, path: &Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|source| AgentError::TlsFile {
        key,
        path: path.display().to_string(),
        source,
    })
}

/// Serve until SIGTERM/SIGINT or `shutdown`; reload on SIGHUP.
pub async fn serve(agent: Arc<Agent>, shutdown: CancellationToken) -> Result<(), AgentError> {
    let cfg = agent.config();
    // Everything that can fail is done before the Unix socket is bound, so that a
    // failed start leaves no socket behind.
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;
    let tls = match &cfg.api.tcp {
        Some((addr, tls)) => Some((
            *addr,
            TlsConfig {
                cert_pem: read_tls("api.tls.cert", &tls.cert)?,
                key_pem: read_tls("api.tls.key", &tls.key)?,
                client_ca_pem: read_tls("api.tls.client_ca", &tls.client_ca)?,
            },
        )),
        None => None,
    };
    let metrics_listener = match cfg.metrics {
        Some(addr) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| AgentError::Metrics {
                        addr: addr.to_string(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let mut servers = Vec::new();
    if let Some((addr, tls)) = tls {
        servers.push(
            ApiServer::bind(&ServerConfig {
                listen: Listen::Tcp {
                    addr,
                    tls: Some(tls),
                },
            })
            .await
            .map_err(AgentError::Serve)?,
        );
    }
    servers.push(
        ApiServer::bind(&ServerConfig {
            listen: Listen::unix(&cfg.api.socket),
        })
        .await
        .map_err(AgentError::Serve)?,
    );
    let rpc = servers.iter().map(ApiServer::metrics).collect();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listener) = metrics_listener {
        let local = listener
            .local_addr()
            .map_err(|source| AgentError::Metrics {
                addr: cfg.metrics.map(|a| a.to_string()).unwrap_or_default(),
                source,
            })?;
        let reg = metrics::registry_with(Arc::clone(agent.control()), rpc, agent.metrics());
        tracing::info!(addr = %local, "metrics listening on http://{local}/metrics");
        let token = shutdown.clone();
        tasks.spawn(async move {
            metrics::serve(listener, Arc::new(reg), token).await;
            Ok(())
        });
    }
    for s in servers {
        match s.local_addr() {
            Some(a) => tracing::info!(addr = %a, "API listening on TCP with mutual TLS"),
            None => tracing::info!(socket = %cfg.api.socket.display(), "API listening"),
        }
        let control = Arc::clone(agent.control());
        let token = shutdown.clone();
        tasks.spawn(async move { s.serve(control, token).await.map_err(AgentError::Serve) });
    }
    if let AgentControl::Software(control) = &**agent.control() {
        tasks.spawn(software_housekeeping(
            Arc::clone(&agent),
            Arc::clone(control),
            shutdown.clone(),
        ));
    }
    crate::privileges::drop_after_setup(&cfg.backend).await;
    tracing::info!(config = %agent.path.display(), "agent ready");
    let mut result = Ok(());
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => agent.reload_logged(),
            () = shutdown.cancelled() => break,
            Some(done) = tasks.join_next() => {
                // A server stopped on its own: that is an error; stop the rest.
                if let Ok(Err(e)) = done {
                    result = Err(e);
                }
                break;
            }
        }
    }
    shutdown.cancel();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                tracing::error!(error = %crate::cli::error_chain(&e), "while stopping");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("shutdown took over 10 s; leaving the rest");
    }
    agent.stop_dataplane();
    tracing::info!("agent stopped");
    result
}

fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr, at `RUST_LOG` or else `default` level.
pub fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// `ctoffload agent`; `socket` (the global `--socket`) overrides `api.socket`.
#[must_use]
pub fn main(args: &AgentArgs, socket: Option<&Path>) -> ExitCode {
    let cfg = match config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "ctoffload agent: {}: {}",
                args.config.display(),
                crate::cli::error_chain(&e)
            );
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: configuration OK", args.config.display());
        return ExitCode::SUCCESS;
    }
    init_logging();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ctoffload agent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let agent = match Agent::start(args.config.clone(), cfg) {
        Ok(a) => Arc::new(a.with_socket(socket.map(Path::to_path_buf))),
        Err(e) => {
            eprintln!("ctoffload agent: {}", crate::cli::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if let Some(p) = &args.preload {
        match agent.preload(p) {
            Ok(n) => tracing::info!(frames = n, file = %p.display(), "preloaded"),
            Err(e) => {
                eprintln!("ctoffload agent: {}", crate::cli::error_chain(&e));
                return ExitCode::from(2);
            }
        }
    }
    match rt.block_on(serve(agent, CancellationToken::new())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ctoffload agent: {}", crate::cli::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
