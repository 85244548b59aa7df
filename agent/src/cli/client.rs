//! Connecting the CLI to a running agent, and the CLI's errors.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};

/// Where and how to reach the agent.
#[derive(Debug, Clone)]
pub enum Target {
    /// The Unix socket.
    Unix(PathBuf),
    /// TCP with mutual TLS.
    Tcp {
        /// `host:port`.
        addr: String,
        /// CA that the server certificate must chain to.
        ca: PathBuf,
        /// Client certificate.
        cert: PathBuf,
        /// Client key.
        key: PathBuf,
        /// Name the server certificate must carry.
        server_name: String,
    },
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Unix(p) => write!(f, "{}", p.display()),
            Target::Tcp { addr, .. } => write!(f, "{addr} (mTLS)"),
        }
    }
}

/// What went wrong in a CLI command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The agent's socket is absent or refuses connections.
    #[error(
        "cannot connect to the agent at {target}: {reason}. Is it running? Start it with `ctoffload agent --config /etc/ctoffload/ctoffload.toml`, or pass --socket PATH"
    )]
    NotRunning {
        /// Where we tried.
        target: String,
        /// The OS's words.
        reason: String,
    },
    /// The socket exists but we may not use it.
    #[error(
        "cannot connect to the agent at {target}: permission denied (the socket is mode 0600: run as the agent's user, usually root)"
    )]
    PermissionDenied {
        /// Where we tried.
        target: String,
    },
    /// TCP/TLS connection failed (refused, handshake rejected).
    #[error("cannot connect to the agent at {target}: {reason}")]
    Connect {
        /// Where we tried.
        target: String,
        /// Why, with causes.
        reason: String,
    },
    /// A TLS file could not be read.
    #[error("{flag} {path}: cannot read")]
    TlsFile {
        /// The option (`--ca`).
        flag: &'static str,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The agent answered with an error status.
    #[error("{code}: {message}")]
    Status {
        /// The gRPC code's name (`INVALID_ARGUMENT`).
        code: &'static str,
        /// The agent's message (names the field).
        message: String,
    },
    /// A command-line value is unusable.
    #[error("{arg}: {reason}")]
    Usage {
        /// The option.
        arg: String,
        /// What is wrong.
        reason: String,
    },
    /// Writing the output failed.
    #[error("cannot write output")]
    Output(#[source] std::io::Error),
    /// A local file (completions, config) could not be used.
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// A usage error.
    pub fn usage(arg: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Usage {
            arg: arg.into(),
            reason: reason.into(),
        }
    }

    /// The process exit status for this error: 2 for usage, 1 otherwise.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage { .. } => 2,
            Self::NotRunning { .. }
            | Self::PermissionDenied { .. }
            | Self::Connect { .. }
            | Self::TlsFile { .. }
            | Self::Status { .. }
            | Self::Output(_)
            | Self::Other(_) => 1,
        }
    }
}

/// The canonical name of a gRPC code.
#[must_use]
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        Self::Status {
            code: code_name(s.code()),
            message: s.message().to_owned(),
        }
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|source| CliError::TlsFile {
        flag,
        path: path.display().to_string(),
        source,
    })
}

/// Connect to the agent. The connection is made now, so that an absent agent is
/// reported before any request.
pub async fn connect(target: &Target) -> Result<Channel, CliError> {
    match target {
        Target::Unix(path) => {
            // Probe first: the OS error says whether the agent is absent or we lack
            // permission, which the transport error would bury.
            if let Err(e) = UnixStream::connect(path).await {
                return Err(match e.kind() {
                    std::io::ErrorKind::PermissionDenied => CliError::PermissionDenied {
                        target: target.to_string(),
                    },
                    _ => CliError::NotRunning {
                        target: target.to_string(),
                        reason: match e.kind() {
                            std::io::ErrorKind::NotFound => "no such socket".into(),
                            std::io::ErrorKind::ConnectionRefused => {
                                "connection refused (stale socket)".into()
                            }
                            _ => e.to_string(),
                        },
                    },
                });
            }
            let path = path.clone();
            Endpoint::from_static("http://localhost")
                .connect_with_connector(tower::service_fn(move |_: Uri| {
                    let p = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?))
                    }
                }))
                .await
                .map_err(|e| CliError::Connect {
                    target: target.to_string(),
                    reason: chain(&e),
                })
        }
        Target::Tcp {
            addr,
            ca,
            cert,
            key,
            server_name,
        } => {
            let tls = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read("--ca", ca)?))
                .identity(Identity::from_pem(
                    read("--cert", cert)?,
                    read("--key", key)?,
                ))
                .domain_name(server_name.clone());
            let endpoint = Endpoint::from_shared(format!("https://{addr}"))
                .map_err(|e| CliError::usage("--tcp", format!("{addr:?}: {e}")))?
                .tls_config(tls)
                .map_err(|e| CliError::Connect {
                    target: target.to_string(),
                    reason: chain(&e),
                })?;
            endpoint.connect().await.map_err(|e| CliError::Connect {
                target: target.to_string(),
                reason: chain(&e),
            })
        }
    }
}
