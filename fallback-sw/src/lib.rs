//! Software connection tracking and NAT with Linux conntrack semantics.
//!
//! Pure and synchronous: packets in, verdicts and rewritten packets out. The clock is
//! passed in. This crate must not know that hardware exists.
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod checksum;
pub mod conntrack;
pub mod nat;
mod prefetch;
pub mod table;
pub mod tcp;
pub mod timer;
pub mod tuple;
pub mod wire;
