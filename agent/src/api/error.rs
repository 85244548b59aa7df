//! The API's errors and their one conversion to gRPC [`Status`].

use ctoffload_fallback_sw::conntrack::DeleteError;
use tonic::{Code, Status};

/// What went wrong with an API request. Converted to a gRPC status by the one
/// [`From`] impl below; every message that concerns a request field starts with the
/// field's path (`filter.src_prefix: ...`).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A request field is missing or malformed.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// Path of the field in the request (`rule.to_ports.first`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A value is well-formed but outside what the server can serve now (a journal
    /// sequence from the future).
    #[error("{field}: {reason}")]
    OutOfRange {
        /// Path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The named object does not exist.
    #[error("{what} not found")]
    NotFound {
        /// The object (`connection id 42`, `NAT rule "x"`).
        what: String,
    },
    /// An object with this name exists already.
    #[error("{field}: {reason}")]
    AlreadyExists {
        /// Path of the field holding the name.
        field: String,
        /// Which object holds it.
        reason: String,
    },
    /// The system is not in a state that allows the request.
    #[error("{reason}")]
    FailedPrecondition {
        /// What has to change first.
        reason: String,
    },
    /// A configured limit is reached.
    #[error("{resource}: limit of {limit} reached")]
    ResourceExhausted {
        /// The limit's name (`limits.max_nat_rules`).
        resource: String,
        /// Its value.
        limit: u64,
    },
    /// The software table refused to delete a connection that a fast path holds.
    #[error("connection {id} cannot be deleted now")]
    Delete {
        /// The connection.
        id: u64,
        /// Why.
        #[source]
        source: DeleteError,
    },
    /// The server is shutting down.
    #[error("server is shutting down")]
    ShuttingDown,
    /// A lock was poisoned by a panic elsewhere; the state may be inconsistent.
    #[error("internal state unavailable: {what} lock poisoned")]
    Poisoned {
        /// Which state.
        what: &'static str,
    },
}

impl ApiError {
    /// An [`ApiError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Prefix the field path with the name of the enclosing message field, so that a
    /// conversion that knows only `src_prefix` reports `filter.src_prefix`.
    #[must_use]
    pub fn within(self, parent: &str) -> Self {
        let join = |field: String| {
            if field.is_empty() {
                parent.to_owned()
            } else {
                format!("{parent}.{field}")
            }
        };
        match self {
            Self::InvalidArgument { field, reason } => Self::InvalidArgument {
                field: join(field),
                reason,
            },
            Self::OutOfRange { field, reason } => Self::OutOfRange {
                field: join(field),
                reason,
            },
            Self::AlreadyExists { field, reason } => Self::AlreadyExists {
                field: join(field),
                reason,
            },
            other @ (Self::NotFound { .. }
            | Self::FailedPrecondition { .. }
            | Self::ResourceExhausted { .. }
            | Self::Delete { .. }
            | Self::ShuttingDown
            | Self::Poisoned { .. }) => other,
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = match &e {
            ApiError::InvalidArgument { .. } => Code::InvalidArgument,
            ApiError::OutOfRange { .. } => Code::OutOfRange,
            ApiError::NotFound { .. } => Code::NotFound,
            ApiError::AlreadyExists { .. } => Code::AlreadyExists,
            ApiError::FailedPrecondition { .. } => Code::FailedPrecondition,
            ApiError::ResourceExhausted { .. } => Code::ResourceExhausted,
            ApiError::Delete { source, .. } => match source {
                DeleteError::Offloaded => Code::FailedPrecondition,
            },
            ApiError::ShuttingDown => Code::Unavailable,
            ApiError::Poisoned { .. } => Code::Internal,
        };
        // The message carries the cause chain once (thiserror messages do not repeat
        // their source).
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        Status::new(code, msg)
    }
}

/// Why the API server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// TCP was configured without TLS; the API is only served over TCP with mutual TLS.
    #[error(
        "{field}: TCP listening requires TLS with client certificates; set it or use a Unix socket"
    )]
    TlsRequired {
        /// The missing configuration field.
        field: &'static str,
    },
    /// A TLS setting is unusable.
    #[error("{field}: {reason}")]
    TlsConfig {
        /// The configuration field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The socket path exists and is not a socket we may replace.
    #[error("{path}: exists and is not a socket")]
    PathInUse {
        /// The path.
        path: String,
    },
    /// Binding or preparing the listener failed.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address or path.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The transport failed while serving.
    #[error("gRPC transport failed")]
    Transport(#[source] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_nest_and_codes_map() {
        let e = ApiError::invalid("first", "not an address")
            .within("to_ports")
            .within("rule");
        let s = Status::from(e);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "rule.to_ports.first: not an address");
        let s = Status::from(ApiError::Delete {
            id: 3,
            source: DeleteError::Offloaded,
        });
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("offloaded"), "{}", s.message());
    }
}
