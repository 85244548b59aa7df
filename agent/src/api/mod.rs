//! The gRPC management API (`ctoffload.v1`).
//!
//! - [`ControlPlane`] is the boundary to the agent's core; [`SoftwareControl`]
//!   implements it over one software conntrack table, [`DataplaneControl`] over the
//!   dataplane's worker thread (command channel serviced between polls).
//! - [`service`] holds the tonic handlers: validate, convert the request with
//!   `TryFrom` ([`convert`]), call the control plane, convert the answer back.
//!   Every failure is an [`ApiError`], turned into a gRPC status in one place.
//! - [`settings`] holds the NAT rules, timeouts and limits both control planes
//!   apply to their running engine; [`nat`] converts API rules to engine rules.
//! - [`journal`] is the sequenced event log behind `WatchEvents`.
//! - [`server`] listens (Unix socket 0600 by default, TCP only with mutual TLS),
//!   adds the standard health service and the [`layer`] that logs and counts RPCs,
//!   and shuts down gracefully on a cancellation token.
//!
//! `docs/api.md` describes the API for its users.

pub mod control;
pub mod convert;
pub mod dataplane;
pub mod error;
pub mod journal;
pub mod layer;
pub mod model;
pub mod nat;
pub mod server;
pub mod service;
pub mod settings;
pub mod software;

pub use control::ControlPlane;
pub use dataplane::DataplaneControl;
pub use error::{ApiError, ServeError};
pub use journal::EventJournal;
pub use layer::{RpcLogLayer, RpcMetrics};
pub use server::{ApiServer, Listen, ServerConfig, TlsConfig};
pub use software::SoftwareControl;

use ctoffload_fallback_sw::conntrack::InvalidKind;

/// Every [`InvalidKind`] with its counter name.
#[must_use]
pub fn invalid_kinds() -> [(InvalidKind, &'static str); InvalidKind::COUNT] {
    [
        (InvalidKind::Malformed, "malformed"),
        (InvalidKind::Tcp, "tcp_invalid"),
        (InvalidKind::IcmpNotRequest, "icmp_not_request"),
        (InvalidKind::IcmpErrorNoMatch, "icmp_error_no_match"),
        (InvalidKind::IcmpErrorSpoofed, "icmp_error_spoofed"),
        (InvalidKind::IcmpErrorQuote, "icmp_error_quote"),
        (InvalidKind::TableFull, "table_full"),
        (InvalidKind::InsertClash, "insert_clash"),
    ]
}
