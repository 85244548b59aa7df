//! Driver for the ctoffload flow-offload engine.
//!
//! Brings the device up (over VFIO or the simulator's shared memory), programs flows
//! through the command ring, pulls counters in bulk and moves exception-path packets.
//! It must not know what a TCP state is, and it does not depend on the simulator:
//! [`sim_io::SimIo`] is built from the file descriptors and callbacks the simulator
//! hands out.
//!
//! - [`io`]: the [`io::DeviceIo`] trait in front of the hardware, and [`io::VfioIo`].
//! - [`sim_io`]: [`sim_io::SimIo`], the simulator backend.
//! - [`sim_process`]: [`sim_process::SimProcess`], the client of a simulator running as
//!   its own process (`ctoffload-nic-sim`), which builds a [`sim_io::SimIo`].
//! - [`device`]: the register engine ([`device::Device`]).
//! - [`counters`]: counter records and wrap-safe deltas.
//! - `mock` (feature `test-utils`): a failure-injecting [`io::DeviceIo`] double.
#![deny(missing_docs, missing_debug_implementations)]

pub mod counters;
pub mod device;
pub mod error;
pub mod io;
pub mod iova;
pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod rings;
pub mod sim_io;
pub mod sim_process;
pub mod vfio;

pub use counters::{CounterDelta, CounterDump, CounterSample, CounterTracker};
pub use device::{
    Capabilities, Clock, CommandResult, Device, DeviceConfig, DeviceEvent, FlowCommand, Outcome,
    RxMeta, Submitted, TableEntry, Token, TxCompletions, TxFrame,
};
pub use error::{DriverError, Result};
pub use io::{DeviceIo, DmaRegion, MmioStats, VfioIo};
pub use sim_io::SimIo;
