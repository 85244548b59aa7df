//! Listening and serving.
//!
//! Security model: by default the API listens on a Unix socket created with mode
//! 0600 (owner only; the socket is bound under a temporary name, chmod-ed, then
//! renamed into place, so it is never reachable with looser permissions). TCP is
//! served only with TLS and client certificates verified against a configured CA
//! (mutual TLS); a TCP configuration without TLS is refused at startup.
//!
//! Resource limits ([`ApiLimits`], defaults in its constants, `docs/reliability.md`):
//! request and response message sizes per service, HTTP/2 streams per connection, a
//! per-request deadline, and a cap on concurrent `WatchEvents` subscribers (one over
//! it is answered `RESOURCE_EXHAUSTED` at once).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use ctoffload_proto::v1::conntrack_service_server::ConntrackServiceServer;
use ctoffload_proto::v1::device_service_server::DeviceServiceServer;
use ctoffload_proto::v1::event_service_server::EventServiceServer;
use ctoffload_proto::v1::nat_service_server::NatServiceServer;
use ctoffload_proto::v1::offload_service_server::OffloadServiceServer;
use ctoffload_proto::v1::settings_service_server::SettingsServiceServer;
use ctoffload_proto::v1::stats_service_server::StatsServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

use super::control::ControlPlane;
use super::error::ServeError;
use super::layer::{RpcLogLayer, RpcMetrics};
use super::service::Api;

/// Mode of the Unix socket unless configured otherwise.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Largest request message a service decodes: every request is small (filters, keys,
/// one NAT rule), so 1 MiB leaves a wide margin.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest response message a service encodes: a listing batch of 4096 connections is
/// about 2 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 16 << 20;
/// HTTP/2 streams open at once on one client connection (calls beyond it wait).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 128;
/// `WatchEvents` streams open at once, all connections together.
pub const DEFAULT_MAX_EVENT_SUBSCRIBERS: usize = 64;
/// Deadline of a call until its response starts (a stream's messages are not bounded);
/// a shorter `grpc-timeout` from the client wins.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Resource limits of the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Largest request message decoded; a larger one is refused with `OUT_OF_RANGE`.
    pub max_request_bytes: usize,
    /// Largest response message encoded; a larger one ends the call with `OUT_OF_RANGE`.
    pub max_response_bytes: usize,
    /// HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS` per client connection.
    pub max_concurrent_streams: u32,
    /// Concurrent `WatchEvents` subscribers; one more is refused with
    /// `RESOURCE_EXHAUSTED`.
    pub max_event_subscribers: usize,
    /// Per-call deadline until the response starts (`CANCELLED` past it).
    pub request_timeout: Duration,
}

impl Default for ApiLimits {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_event_subscribers: DEFAULT_MAX_EVENT_SUBSCRIBERS,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

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
    limits: ApiLimits,
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

/// A generated service server over `api` with the message size limits.
macro_rules! limited {
    ($server:ident, $api:expr, $limits:expr) => {
        $server::new($api.clone())
            .max_decoding_message_size($limits.max_request_bytes)
            .max_encoding_message_size($limits.max_response_bytes)
    };
}

/// Caps the concurrent calls of one streaming method of a service: a call over the cap
/// is answered `RESOURCE_EXHAUSTED` without reaching the handler; an admitted call holds
/// its permit until its response body is dropped (the stream ended or the client went
/// away).
#[derive(Debug, Clone)]
struct SubscriberCap<S> {
    inner: S,
    path: Arc<str>,
    method: &'static str,
    permits: Arc<Semaphore>,
    max: usize,
}

impl<S: NamedService> SubscriberCap<S> {
    fn new(inner: S, method: &'static str, max: usize) -> Self {
        Self {
            inner,
            path: format!("/{}/{method}", S::NAME).into(),
            method,
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S: NamedService> NamedService for SubscriberCap<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

impl<S> tower::Service<http::Request<Body>> for SubscriberCap<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != &*self.path {
            return Box::pin(self.inner.call(req));
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            let status = tonic::Status::resource_exhausted(format!(
                "{} already has {} subscribers, the most allowed",
                self.method, self.max
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        };
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = call.await?;
            Ok(resp.map(|body| {
                Body::new(Permitted {
                    body,
                    _permit: permit,
                })
            }))
        })
    }
}

/// A response body holding a subscriber permit.
struct Permitted {
    body: Body,
    _permit: OwnedSemaphorePermit,
}

impl http_body::Body for Permitted {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
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
            limits: ApiLimits::default(),
        })
    }

    /// Serve with these limits instead of [`ApiLimits::default`].
    #[must_use]
    pub fn with_limits(mut self, limits: ApiLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The limits it will serve with.
    #[must_use]
    pub fn limits(&self) -> ApiLimits {
        self.limits
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

        let limits = self.limits;
        let mut builder = Server::builder()
            .max_concurrent_streams(limits.max_concurrent_streams)
            .timeout(limits.request_timeout);
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
            .add_service(limited!(ConntrackServiceServer, api, limits))
            .add_service(SubscriberCap::new(
                limited!(EventServiceServer, api, limits),
                "WatchEvents",
                limits.max_event_subscribers,
            ))
            .add_service(limited!(StatsServiceServer, api, limits))
            .add_service(limited!(NatServiceServer, api, limits))
            .add_service(limited!(OffloadServiceServer, api, limits))
            .add_service(limited!(DeviceServiceServer, api, limits))
            .add_service(limited!(SettingsServiceServer, api, limits));
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
