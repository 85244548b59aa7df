//! Register map and in-memory formats of the ctoffload flow-offload engine.
//!
//! Everything here mirrors `docs/device.md`: the BAR0 register block, the command and
//! completion descriptors, the flow-table entry, the counter record and the packet
//! descriptors. This crate holds types, encoding and decoding only: no logic, no I/O.
#![no_std]
#![deny(missing_docs, missing_debug_implementations)]
