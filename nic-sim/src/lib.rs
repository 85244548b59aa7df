//! A software model of the ctoffload flow-offload engine.
//!
//! It implements exactly what `docs/device.md` specifies, behind the memory regions a
//! real device exposes (BAR0 and host DMA memory). It must never offer the driver a
//! shortcut that real hardware would not.
#![deny(missing_docs, missing_debug_implementations)]

pub mod dma;
pub mod error;
pub mod event;
pub mod mem;
pub mod port;
pub mod rewrite;

pub use error::{Error, Result};
