//! The ctoffload agent's library: what the `ctoffload` binary runs.
//!
//! Today that is the offline replay of captures through the software pipeline
//! ([`replay`]). The daemon (workers, offload policy, reconciler, gRPC server) lands
//! here as it is written. This crate does no unsafe work: hardware access belongs to
//! `driver`, packet semantics to `fallback-sw`.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod api;
pub mod dataplane;
pub mod replay;
