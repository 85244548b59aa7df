//! Listening and serving.
//!
//! Security model: by default the API listens on a Unix socket created with mode
//! 0600 (owner only; the socket is bound under a temporary name, chmod-ed, then
//! renamed into place, so it is never reachable with looser permissions). TCP is
//! served only with TLS and client certificates verified against a configured CA
//! (mutual TLS); a TCP configuration without TLS is refused at startup.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ctoffload_proto::v1::conntrack_service_server::ConntrackServiceServer;
use ctoffload_proto::v1::device_service_server::DeviceServiceServer;
use ctoffload_proto::v1::event_service_server::EventServiceServer;
use ctoffload_proto::v1::nat_service_server::NatServiceServer;
use ctoffload_proto::v1::offload_service_server::OffloadServiceServer;
use ctoffload_proto::v1::settings_service_server::SettingsServiceServer;
use ctoffload_proto::v1::stats_service_server::StatsServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::control::ControlPlane;
use super::error::ServeError;
use super::layer::{RpcLogLayer, RpcMetrics};
use super::service::Api;

/// Mode of the Unix socket unless configured otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// PEM material for mutual TLS.
#[derive(Clone)]
pub struct TlsConfig {
    /// Server certificate chain (`api.tls.cert`).
    pub cert_pem: Vec<u8>,
    /// Server private key (`api.tls.key`).
    pub key_pem: Vec<u8>,
    /// CA that client certificates must chain to (`api.tls.client_ca`).
    pub client_ca_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("cert_pem", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .field("client_ca_pem", &self.client_ca_pem.len())
            .finish()
    }
}

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A Unix socket at `path` with permission bits `mode`.
    Unix {
        /// Socket path.
        path: PathBuf,
        /// Permission bits (0600 by default).
        mode: u32,
    },
    /// TCP; `tls` must be set (mutual TLS).
    Tcp {
        /// Address to bind.
        addr: SocketAddr,
        /// TLS material (`api.tls`).
        tls: Option<TlsConfig>,
    },
}

impl Listen {
    /// A Unix socket with mode 0600.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Listen::Unix {
            path: path.into(),
            mode: DEFAULT_SOCKET_MODE,
        }
    }
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: Listen,
}

enum Bound {
    Unix {
        listener: UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: TcpListener,
        tls: ServerTlsConfig,
    },
}

/// A bound server, ready to serve.
pub struct ApiServer {
    bound: Bound,
    metrics: Arc<RpcMetrics>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("local_addr", &self.local_addr())
            .finish_non_exhaustive()
    }
}

fn bind_err(addr: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> ServeError {
    let addr = addr.to_string();
    move |source| ServeError::Bind { addr, source }
}

fn bind_unix(path: &Path, mode: u32) -> Result<UnixListener, ServeError> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(bind_err(path.display()))?;
        }
        Ok(_) => {
            return Err(ServeError::PathInUse {
                path: path.display().to_string(),
            });
        }
        Err(_) => {}
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(bind_err(tmp.display()))?;
    let prepared = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = prepared {
        let _ = std::fs::remove_file(&tmp);
        return Err(bind_err(path.display())(e));
    }
    Ok(listener)
}

fn tls_config(tls: &TlsConfig) -> Result<ServerTlsConfig, ServeError> {
    for (pem, field) in [
        (&tls.cert_pem, "api.tls.cert"),
        (&tls.key_pem, "api.tls.key"),
        (&tls.client_ca_pem, "api.tls.client_ca"),
    ] {
        if pem.is_empty() {
            return Err(ServeError::TlsConfig {
                field,
                reason: "empty".into(),
            });
        }
        if !pem.windows(10).any(|w| w == b"-----BEGIN") {
            return Err(ServeError::TlsConfig {
                field,
                reason: "not PEM".into(),
            });
        }
    }
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.client_ca_pem))
        .client_auth_optional(false))
}

impl ApiServer {
    /// Check the configuration and bind. Must run inside a tokio runtime.
    pub async fn bind(cfg: &ServerConfig) -> Result<Self, ServeError> {
        let bound = match &cfg.listen {
            Listen::Unix { path, mode } => Bound::Unix {
                listener: bind_unix(path, *mode)?,
                path: path.clone(),
            },
            Listen::Tcp { addr, tls } => {
                let tls = tls
                    .as_ref()
                    .ok_or(ServeError::TlsRequired { field: "api.tls" })?;
                let tls = tls_config(tls)?;
                let listener = TcpListener::bind(addr).await.map_err(bind_err(addr))?;
                Bound::Tcp { listener, tls }
            }
        };
        Ok(Self {
            bound,
            metrics: Arc::new(RpcMetrics::default()),
        })
    }

    /// The bound TCP address (for port 0), if TCP.
    #[must_use]
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.bound {
            Bound::Tcp { listener, .. } => listener.local_addr().ok(),
            Bound::Unix { .. } => None,
        }
    }

    /// The RPC counters of the logging layer.
    #[must_use]
    pub fn metrics(&self) -> Arc<RpcMetrics> {
        Arc::clone(&self.metrics)
    }

    /// Serve `control` until `shutdown` is cancelled, then stop accepting, end open
    /// streams, let running calls finish and return. A Unix socket is removed.
    pub async fn serve<C: ControlPlane>(
        self,
        control: Arc<C>,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let api = Api::new(control, shutdown.clone());
        let (health, health_svc) = tonic_health::server::health_reporter();
        health.set_serving::<ConntrackServiceServer<Api<C>>>().await;
        health.set_serving::<EventServiceServer<Api<C>>>().await;
        health.set_serving::<StatsServiceServer<Api<C>>>().await;
        health.set_serving::<NatServiceServer<Api<C>>>().await;
        health.set_serving::<OffloadServiceServer<Api<C>>>().await;
        health.set_serving::<DeviceServiceServer<Api<C>>>().await;
        health.set_serving::<SettingsServiceServer<Api<C>>>().await;

        let mut builder = Server::builder();
        let unix_path = match &self.bound {
            Bound::Tcp { tls, .. } => {
                builder = builder
                    .tls_config(tls.clone())
                    .map_err(ServeError::Transport)?;
                None
            }
            Bound::Unix { path, .. } => Some(path.clone()),
        };
        let router = builder
            .layer(RpcLogLayer::new(Arc::clone(&self.metrics)))
            .add_service(health_svc)
            .add_service(ConntrackServiceServer::new(api.clone()))
            .add_service(EventServiceServer::new(api.clone()))
            .add_service(StatsServiceServer::new(api.clone()))
            .add_service(NatServiceServer::new(api.clone()))
            .add_service(OffloadServiceServer::new(api.clone()))
            .add_service(DeviceServiceServer::new(api.clone()))
            .add_service(SettingsServiceServer::new(api));
        let signal = {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                health
                    .set_not_serving::<ConntrackServiceServer<Api<C>>>()
                    .await;
                tracing::info!("API server shutting down");
            }
        };
        let served = match self.bound {
            Bound::Unix { listener, .. } => {
                router
                    .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
                    .await
            }
            Bound::Tcp { listener, .. } => {
                router
                    .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
                    .await
            }
        };
        if let Some(path) = unix_path {
            let _ = std::fs::remove_file(path);
        }
        served.map_err(ServeError::Transport)
    }
}
