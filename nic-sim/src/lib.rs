//! A software model of the ctoffload flow-offload engine.
//!
//! It implements exactly what `docs/device.md` specifies, behind the memory regions a
//! real device exposes (BAR0 and host DMA memory). It must never offer the driver a
//! shortcut that real hardware would not: there is no Rust-level channel between driver
//! and model, only the BAR image, DMA memory and interrupt eventfds.
//!
//! - [`Simulator`]: the device; [`Simulator::poll`] advances it one step, or
//!   [`Simulator::spawn`] runs it in a thread.
//! - [`SimIommu`]: where the driver maps DMA memory (the model's `VFIO_IOMMU_MAP_DMA`).
//! - [`FaultHandle`]: fault injection for tests.
//! - [`control`]: process mode, the control socket of the `ctoffload-nic-sim` binary.
//! - [`wire_pad::RuntPadded`]: a host interface port that pads runts as a wire does.
#![deny(missing_docs, missing_debug_implementations)]

pub mod control;
pub mod device;
pub mod dma;
pub mod error;
pub mod event;
pub mod fault;
pub mod iommu;
pub mod mem;
pub mod port;
pub mod rewrite;
pub mod table;
pub mod thread;
pub mod wire_pad;

pub use device::{BAR_SIZE, SIM_MAX_FRAME_LEN, SimConfig, SimStats, Simulator};
pub use error::{Error, Result};
pub use fault::FaultHandle;
pub use iommu::SimIommu;
pub use mem::SharedRegion;
pub use thread::{SimClock, SimThread};
