//! Driver for the ctoffload flow-offload engine.
//!
//! Brings the device up (over VFIO or the simulator's shared memory), programs flows
//! through the command ring, pulls counters in bulk and moves exception-path packets.
//! It must not know what a TCP state is.
#![deny(missing_docs, missing_debug_implementations)]

pub mod error;
pub mod iova;
pub mod mmio;
pub mod vfio;
