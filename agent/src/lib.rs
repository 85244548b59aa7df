//! The ctoffload agent's library: what the `ctoffload` binary runs.
//!
//! The gRPC API over a control plane ([`api`]), the configuration file ([`config`]),
//! Prometheus metrics ([`metrics`]), the command line and the agent runner ([`cli`]),
//! and the offline replay of captures through the software pipeline ([`replay`]).
//! The dataplane (workers, offload policy, reconciler) lands here as it is written.
//! This crate does no unsafe work (hardware access belongs to `driver`, packet
//! semantics to `fallback-sw`) except in one module: the AF_XDP port's UMEM mapping
//! and `bpf(2)` calls (`port/af_xdp_sys.rs`, the only `#[allow(unsafe_code)]`).
#![deny(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod api;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod gateway;
pub mod metrics;
pub mod port;
pub mod privileges;
pub mod replay;
