//! The crate's error type.

/// A raw value read from a register or a descriptor that is not a code the
/// specification defines.
///
/// The enum is `#[non_exhaustive]` so that later minor versions of the specification can
/// add decoders without a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Unknown command opcode (descriptor byte 0, completion byte 29).
    #[error("unknown command opcode {value:#04x}")]
    UnknownOpcode {
        /// The raw byte.
        value: u8,
    },
    /// Unknown completion status (completion byte 28).
    #[error("unknown completion status {value:#04x}")]
    UnknownCompletionStatus {
        /// The raw byte.
        value: u8,
    },
    /// Unknown `FATAL_CODE` register value.
    #[error("unknown fatal code {value:#010x}")]
    UnknownFatalCode {
        /// The raw register value.
        value: u32,
    },
    /// Unknown `FATAL_UNIT` register value.
    #[error("unknown fatal unit {value:#010x}")]
    UnknownFatalUnit {
        /// The raw register value.
        value: u32,
    },
    /// Unknown punt reason (RX descriptor byte 25).
    #[error("unknown RX punt reason {value:#04x}")]
    UnknownRxReason {
        /// The raw byte.
        value: u8,
    },
    /// Unknown flow key kind (key byte 0).
    #[error("unknown flow key kind {value:#04x}")]
    UnknownKeyKind {
        /// The raw byte.
        value: u8,
    },
    /// IP protocol number that a flow key cannot carry (key byte 2).
    #[error("unsupported L4 protocol {value}")]
    UnknownL4Proto {
        /// The raw byte.
        value: u8,
    },
    /// Unknown TX error code (TX descriptor byte 13).
    #[error("unknown TX error code {value:#04x}")]
    UnknownTxError {
        /// The raw byte.
        value: u8,
    },
}
