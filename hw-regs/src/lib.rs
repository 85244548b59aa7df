//! Register map and in-memory formats of the ctoffload flow-offload engine.
//!
//! Everything here mirrors `docs/device.md`: the BAR0 register block, the command and
//! completion descriptors, the flow-table entry, the counter record and the packet
//! descriptors. This crate holds types, encoding and decoding only: no logic, no I/O.
//!
//! It must not grow behaviour. Validation rules, table management and ring protocols
//! live in `nic-sim` (the device side) and `driver` (the host side); both take their
//! numbers from here so that the two sides cannot disagree on a layout.
//!
//! Layout of the crate:
//!
//! - [`pci`]: PCI identity, BAR0 size, MSI-X vectors.
//! - [`regs`]: register offsets ([`regs::RegOffset`]), the [`regs::Bar0`] register block,
//!   and the bit layouts of the control/status/interrupt/feature registers.
//! - [`limits`]: the fixed numbers of the specification (alignments, minimum sizes,
//!   timeouts, default capabilities).
//! - [`codes`]: the enumerated codes (opcode, completion status, fatal code, punt
//!   reason, ...) with `TryFrom` decoding.
//! - [`key`], [`action`], [`command`], [`record`], [`packet`]: the in-memory formats, as
//!   `#[repr(C)]` structs of little-endian fields ([`le`]) with byte-exact
//!   `to_bytes`/`from_bytes`.
//!
//! Registers are 32-bit little-endian device words; [`regs::Bar0`] holds them as native
//! `u32` cells, so MMIO through it assumes a little-endian host (x86-64, AArch64). The
//! in-memory formats are endian-correct on any host.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod action;
pub mod codes;
pub mod command;
mod crc32c;
mod error;
pub mod key;
pub mod le;
pub mod limits;
pub mod packet;
pub mod pci;
pub mod record;
pub mod regs;
mod types;

pub use action::{ActionFlags, FlowAction};
pub use codes::{
    CompletionStatus, FatalCode, FatalUnit, KeyKind, L4Proto, Opcode, RxReason, TxError,
};
pub use command::{
    CommandDescriptor, CommandFlags, Completion, CompletionFlags, DumpOperand, FlowOperand,
};
pub use crc32c::crc32c;
pub use error::Error;
pub use key::{FlowKey, bucket_index, key_hash};
pub use le::{Le16, Le32, Le64};
pub use packet::{RxDescriptor, RxStatus, TxDescriptor, TxStatus};
pub use record::{CounterRecord, FlowCounters, RecordFlags, TableDumpRecord};
pub use types::{FlowId, Iova};
