//! BAR0 register map (device.md sections 3 and 4).
//!
//! Two views of the same map:
//!
//! - offsets as [`RegOffset`] constants, for code that accesses BAR0 through
//!   `read32`/`write32(offset)` calls (the driver's `DeviceIo`, the simulator), and that
//!   can `match` on them;
//! - the [`Bar0`] struct of `volatile_register` cells, whose field offsets equal the
//!   constants (pinned by tests). Forming a reference to a `Bar0` over a mapping is the
//!   business of the one access module that owns the mapping; this crate never does.
//!
//! All registers are 32 bits wide and must be accessed with aligned 32-bit accesses only.

use core::fmt;

use bitflags::bitflags;
use volatile_register::{RO, RW, WO};

/// Byte offset of a 32-bit register in BAR0.
///
/// A newtype without arithmetic operators; the only way to a register is a named
/// constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RegOffset(pub u32);

impl RegOffset {
    /// The offset in bytes.
    #[must_use]
    pub const fn get(self) -> u32 {
        self.0
    }
}

// ---- identification -------------------------------------------------------------------

/// `MAGIC` (RO): always [`MAGIC_VALUE`].
pub const MAGIC: RegOffset = RegOffset(0x0000);
/// `SPEC_VERSION` (RO): `major << 16 | minor`, see [`SpecVersion`].
pub const SPEC_VERSION: RegOffset = RegOffset(0x0004);
/// `IMPL_ID` (RO): build identifier, informational.
pub const IMPL_ID: RegOffset = RegOffset(0x0008);

// ---- capabilities ---------------------------------------------------------------------

/// `FEATURES` (RO): [`Features`].
pub const FEATURES: RegOffset = RegOffset(0x0010);
/// `FLOW_CAPACITY` (RO): flow-table slots, `2^BUCKETS_LOG2 × WAYS`.
pub const FLOW_CAPACITY: RegOffset = RegOffset(0x0014);
/// `BUCKETS_LOG2` (RO): log2 of the bucket count.
pub const BUCKETS_LOG2: RegOffset = RegOffset(0x0018);
/// `WAYS` (RO): slots per bucket (8).
pub const WAYS: RegOffset = RegOffset(0x001C);
/// `FLOW_LIMIT` (RO): maximum installed entries.
pub const FLOW_LIMIT: RegOffset = RegOffset(0x0020);
/// `COUNTER_COUNT` (RO): counter sets, equal to `FLOW_CAPACITY`.
pub const COUNTER_COUNT: RegOffset = RegOffset(0x0024);
/// `NUM_PORTS` (RO): network ports, 1 to 8.
pub const NUM_PORTS: RegOffset = RegOffset(0x0028);
/// `RING_MAX_LOG2` (RO): per-ring maximum `SIZE_LOG2`, see [`RingMaxLog2`].
pub const RING_MAX_LOG2: RegOffset = RegOffset(0x002C);
/// `TIMESTAMP_FREQ` (RO): `TIMESTAMP` frequency in Hz (1 GHz).
pub const TIMESTAMP_FREQ: RegOffset = RegOffset(0x0030);
/// `MAX_FRAME_LEN` (RO): largest frame in bytes, without FCS.
pub const MAX_FRAME_LEN: RegOffset = RegOffset(0x0034);

// ---- control and status ---------------------------------------------------------------

/// `CTRL` (RW): [`Ctrl`].
pub const CTRL: RegOffset = RegOffset(0x0040);
/// `STATUS` (RO): [`Status`].
pub const STATUS: RegOffset = RegOffset(0x0044);
/// `FATAL_CODE` (RO): [`crate::FatalCode`].
pub const FATAL_CODE: RegOffset = RegOffset(0x0048);
/// `FATAL_UNIT` (RO): [`crate::FatalUnit`].
pub const FATAL_UNIT: RegOffset = RegOffset(0x004C);
/// `FATAL_ADDR_LO` (RO): faulting IOVA bits 31:0.
pub const FATAL_ADDR_LO: RegOffset = RegOffset(0x0050);
/// `FATAL_ADDR_HI` (RO): faulting IOVA bits 63:32.
pub const FATAL_ADDR_HI: RegOffset = RegOffset(0x0054);
/// `RESET_COUNT` (RO): completed resets since power-on; survives resets.
pub const RESET_COUNT: RegOffset = RegOffset(0x0058);
/// `FLOW_COUNT` (RO): installed entries.
pub const FLOW_COUNT: RegOffset = RegOffset(0x005C);
/// `INT_CAUSE` (W1C): [`IntCause`].
pub const INT_CAUSE: RegOffset = RegOffset(0x0060);
/// `INT_MASK` (RW): [`IntCause`] bits, 1 = masked.
pub const INT_MASK: RegOffset = RegOffset(0x0064);

// ---- time -----------------------------------------------------------------------------

/// `TIMESTAMP_LO` (RO): bits 31:0; reading it latches `TIMESTAMP_HI`. Read it first.
pub const TIMESTAMP_LO: RegOffset = RegOffset(0x0070);
/// `TIMESTAMP_HI` (RO): bits 63:32 latched by the last `TIMESTAMP_LO` read.
pub const TIMESTAMP_HI: RegOffset = RegOffset(0x0074);

// ---- statistics (RO, 32-bit, wrapping, cleared by reset) -------------------------------

/// `STAT_WIRE_RX`: frames accepted from all ports.
pub const STAT_WIRE_RX: RegOffset = RegOffset(0x0080);
/// `STAT_HIT`: frames that hit a flow (forwarded or dropped by `DROP`).
pub const STAT_HIT: RegOffset = RegOffset(0x0084);
/// `STAT_PUNT`: frames written to the exception RX ring.
pub const STAT_PUNT: RegOffset = RegOffset(0x0088);
/// `STAT_RX_NO_BUF`: punts dropped for lack of a posted RX buffer.
pub const STAT_RX_NO_BUF: RegOffset = RegOffset(0x008C);
/// `STAT_RX_TOO_BIG`: punts dropped because the frame exceeded the buffer.
pub const STAT_RX_TOO_BIG: RegOffset = RegOffset(0x0090);
/// `STAT_DISABLED_DROP`: frames dropped while not enabled or fatal.
pub const STAT_DISABLED_DROP: RegOffset = RegOffset(0x0094);
/// `STAT_RX_LEN_ERR`: frames dropped by the MAC (FCS or length).
pub const STAT_RX_LEN_ERR: RegOffset = RegOffset(0x0098);
/// `STAT_TX`: frames sent from the TX ring.
pub const STAT_TX: RegOffset = RegOffset(0x009C);
/// `STAT_TX_ERR`: TX descriptors completed with an error.
pub const STAT_TX_ERR: RegOffset = RegOffset(0x00A0);

// ---- rings ----------------------------------------------------------------------------

/// Size of one ring register set.
pub const RING_REGS_STRIDE: u32 = 0x40;

/// Command ring `BASE_LO` (RW).
pub const CMD_BASE_LO: RegOffset = RegOffset(0x0100);
/// Command ring `BASE_HI` (RW).
pub const CMD_BASE_HI: RegOffset = RegOffset(0x0104);
/// Command ring `SIZE_LOG2` (RW).
pub const CMD_SIZE_LOG2: RegOffset = RegOffset(0x0108);
/// Command ring `HEAD` (RO): device consumer index.
pub const CMD_HEAD: RegOffset = RegOffset(0x010C);
/// Command ring `TAIL` (WO doorbell): host producer index.
pub const CMD_TAIL: RegOffset = RegOffset(0x0110);

/// Completion ring `BASE_LO` (RW).
pub const CPL_BASE_LO: RegOffset = RegOffset(0x0140);
/// Completion ring `BASE_HI` (RW).
pub const CPL_BASE_HI: RegOffset = RegOffset(0x0144);
/// Completion ring `SIZE_LOG2` (RW).
pub const CPL_SIZE_LOG2: RegOffset = RegOffset(0x0148);
/// Completion ring `HEAD` (WO doorbell): host consumer index.
pub const CPL_HEAD: RegOffset = RegOffset(0x014C);
/// Completion ring `TAIL` (RO): device producer index.
pub const CPL_TAIL: RegOffset = RegOffset(0x0150);

/// Exception RX ring `BASE_LO` (RW).
pub const RX_BASE_LO: RegOffset = RegOffset(0x0180);
/// Exception RX ring `BASE_HI` (RW).
pub const RX_BASE_HI: RegOffset = RegOffset(0x0184);
/// Exception RX ring `SIZE_LOG2` (RW).
pub const RX_SIZE_LOG2: RegOffset = RegOffset(0x0188);
/// Exception RX ring `HEAD` (RO): device consumer index.
pub const RX_HEAD: RegOffset = RegOffset(0x018C);
/// Exception RX ring `TAIL` (WO doorbell): host producer index (posted buffers).
pub const RX_TAIL: RegOffset = RegOffset(0x0190);

/// TX ring `BASE_LO` (RW).
pub const TX_BASE_LO: RegOffset = RegOffset(0x01C0);
/// TX ring `BASE_HI` (RW).
pub const TX_BASE_HI: RegOffset = RegOffset(0x01C4);
/// TX ring `SIZE_LOG2` (RW).
pub const TX_SIZE_LOG2: RegOffset = RegOffset(0x01C8);
/// TX ring `HEAD` (RO): device consumer index.
pub const TX_HEAD: RegOffset = RegOffset(0x01CC);
/// TX ring `TAIL` (WO doorbell): host producer index.
pub const TX_TAIL: RegOffset = RegOffset(0x01D0);

/// The five registers of one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingRegOffsets {
    /// `BASE_LO` (RW).
    pub base_lo: RegOffset,
    /// `BASE_HI` (RW).
    pub base_hi: RegOffset,
    /// `SIZE_LOG2` (RW).
    pub size_log2: RegOffset,
    /// `HEAD`: RO device consumer index (CMD, RX, TX); WO host doorbell (CPL).
    pub head: RegOffset,
    /// `TAIL`: WO host doorbell (CMD, RX, TX); RO device producer index (CPL).
    pub tail: RegOffset,
}

/// Command ring registers.
pub const CMD_RING: RingRegOffsets = RingRegOffsets {
    base_lo: CMD_BASE_LO,
    base_hi: CMD_BASE_HI,
    size_log2: CMD_SIZE_LOG2,
    head: CMD_HEAD,
    tail: CMD_TAIL,
};
/// Completion ring registers.
pub const CPL_RING: RingRegOffsets = RingRegOffsets {
    base_lo: CPL_BASE_LO,
    base_hi: CPL_BASE_HI,
    size_log2: CPL_SIZE_LOG2,
    head: CPL_HEAD,
    tail: CPL_TAIL,
};
/// Exception RX ring registers.
pub const RX_RING: RingRegOffsets = RingRegOffsets {
    base_lo: RX_BASE_LO,
    base_hi: RX_BASE_HI,
    size_log2: RX_SIZE_LOG2,
    head: RX_HEAD,
    tail: RX_TAIL,
};
/// TX ring registers.
pub const TX_RING: RingRegOffsets = RingRegOffsets {
    base_lo: TX_BASE_LO,
    base_hi: TX_BASE_HI,
    size_log2: TX_SIZE_LOG2,
    head: TX_HEAD,
    tail: TX_TAIL,
};

/// Mask of the valid bits of `SIZE_LOG2` (bits 4:0).
pub const SIZE_LOG2_MASK: u32 = 0x1F;

// ---- MSI-X (owned by the OS) ----------------------------------------------------------

/// First byte of the MSI-X table (3 entries × 16 bytes).
pub const MSIX_TABLE: RegOffset = RegOffset(0x8000);
/// First byte of the MSI-X pending-bit array (one 64-bit word).
pub const MSIX_PBA: RegOffset = RegOffset(0x9000);

// ---- fixed values and reset values ----------------------------------------------------

/// Value of `MAGIC`: "CTO1".
pub const MAGIC_VALUE: u32 = 0x4354_4F31;
/// Value of `SPEC_VERSION` for this crate's specification (1.0).
pub const SPEC_VERSION_VALUE: u32 = SpecVersion::V1_1.to_raw();
/// `IMPL_ID` returned by the simulator: "SIM1".
pub const IMPL_ID_SIMULATOR: u32 = 0x5349_4D31;
/// `STATUS` after a completed reset: [`Status::READY`].
pub const STATUS_RESET: u32 = Status::READY.bits();
/// `INT_MASK` after any reset: data-path causes masked, device events unmasked.
pub const INT_MASK_RESET: u32 = IntCause::CMD_CPL
    .union(IntCause::RX)
    .union(IntCause::TX_DONE)
    .bits();
/// `RING_MAX_LOG2` of the full-size device.
pub const RING_MAX_LOG2_DEFAULT: u32 = 0x0C0C_1010;

/// `SPEC_VERSION` decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpecVersion {
    /// Bits 31:16. Drivers accept only their own major.
    pub major: u16,
    /// Bits 15:0. Drivers accept every minor.
    pub minor: u16,
}

impl SpecVersion {
    /// Version 1.0.
    pub const V1_0: Self = Self { major: 1, minor: 0 };
    /// Version 1.1 (detach/attach without reset), described by this crate.
    pub const V1_1: Self = Self { major: 1, minor: 1 };

    /// Decodes the register value.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Self {
        let b = raw.to_le_bytes();
        Self {
            major: u16::from_le_bytes([b[2], b[3]]),
            minor: u16::from_le_bytes([b[0], b[1]]),
        }
    }

    /// Encodes the register value.
    #[must_use]
    pub const fn to_raw(self) -> u32 {
        let major = self.major.to_le_bytes();
        let minor = self.minor.to_le_bytes();
        u32::from_le_bytes([minor[0], minor[1], major[0], major[1]])
    }
}

/// `RING_MAX_LOG2` decoded: the largest `SIZE_LOG2` of each ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RingMaxLog2 {
    /// Bits 7:0, command ring.
    pub cmd: u8,
    /// Bits 15:8, completion ring.
    pub cpl: u8,
    /// Bits 23:16, exception RX ring.
    pub rx: u8,
    /// Bits 31:24, TX ring.
    pub tx: u8,
}

impl RingMaxLog2 {
    /// Decodes the register value.
    #[must_use]
    pub const fn from_raw(raw: u32) -> Self {
        let [cmd, cpl, rx, tx] = raw.to_le_bytes();
        Self { cmd, cpl, rx, tx }
    }

    /// Encodes the register value.
    #[must_use]
    pub const fn to_raw(self) -> u32 {
        u32::from_le_bytes([self.cmd, self.cpl, self.rx, self.tx])
    }
}

bitflags! {
    /// `CTRL` register (device.md section 4.4).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Ctrl: u32 {
        /// Validate the rings and start the device. Sticky until reset.
        const ENABLE = 1 << 0;
        /// Start a soft reset. Self-clearing when the reset completes.
        const SOFT_RESET = 1 << 1;
        /// Detach the driver without a reset (spec 1.1, `FEATURES.DETACH`): the rings
        /// stop, the flow table keeps forwarding. Self-clearing.
        const DETACH = 1 << 2;
    }
}

bitflags! {
    /// `STATUS` register (device.md section 4.5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Status: u32 {
        /// Out of reset, accepts register programming.
        const READY = 1 << 0;
        /// Rings live and datapath forwarding: `CTRL.ENABLE ∧ READY ∧ ¬FATAL`.
        const ENABLED = 1 << 1;
        /// Fatal error; only a reset clears it.
        const FATAL = 1 << 2;
        /// Reset in progress.
        const RESETTING = 1 << 3;
        /// Detached (spec 1.1): no rings, the flow table forwards, punts are dropped.
        const DETACHED = 1 << 4;
    }
}

bitflags! {
    /// `INT_CAUSE` (W1C) and `INT_MASK` (RW, 1 = masked) (device.md section 16).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct IntCause: u32 {
        /// A completion was written. MSI-X vector 0.
        const CMD_CPL = 1 << 0;
        /// An RX descriptor was written back. MSI-X vector 1.
        const RX = 1 << 1;
        /// A TX descriptor was written back. MSI-X vector 1.
        const TX_DONE = 1 << 2;
        /// The device entered the fatal state. MSI-X vector 2.
        const FATAL = 1 << 3;
        /// A reset completed. MSI-X vector 2.
        const RESET_DONE = 1 << 4;
    }
}

impl IntCause {
    /// The MSI-X vector that signals this cause (for a single-bit value), or `None` if
    /// the value is not exactly one defined cause.
    #[must_use]
    pub fn vector(self) -> Option<u16> {
        if self == Self::CMD_CPL {
            Some(crate::pci::MSIX_VECTOR_CMD)
        } else if self == Self::RX || self == Self::TX_DONE {
            Some(crate::pci::MSIX_VECTOR_PKT)
        } else if self == Self::FATAL || self == Self::RESET_DONE {
            Some(crate::pci::MSIX_VECTOR_EVENT)
        } else {
            None
        }
    }
}

bitflags! {
    /// `FEATURES` register (device.md section 4.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u32 {
        /// IPv4 keys.
        const IPV4 = 1 << 0;
        /// IPv6 keys.
        const IPV6 = 1 << 1;
        /// `SNAT` and `DNAT` actions.
        const NAT = 1 << 2;
        /// `DEC_TTL` action.
        const DEC_TTL = 1 << 3;
        /// Non-zero key zones (802.1Q VLAN ID).
        const ZONES = 1 << 4;
        /// `COUNTER_DUMP` command.
        const COUNTER_DUMP = 1 << 5;
        /// `TABLE_DUMP` command.
        const TABLE_DUMP = 1 << 6;
        /// MSI-X interrupts.
        const MSIX = 1 << 7;
        /// One 802.1Q tag parsed.
        const VLAN = 1 << 8;
        /// `CTRL.DETACH` and `STATUS.DETACHED` (spec 1.1): a driver can leave and a new
        /// one attach without resetting the device.
        const DETACH = 1 << 9;
        /// `COUNTER_DUMP` with the `CHANGED` flag (spec 1.2): only the entries hit since
        /// the last such dump of their slot, as packed records.
        const COUNTER_DUMP_CHANGED = 1 << 10;
    }
}

// ---- register block -------------------------------------------------------------------

/// Register set of a host-produced ring (CMD, RX, TX): 64 bytes.
#[repr(C)]
pub struct HostRingRegs {
    /// `BASE_LO` (RW).
    pub base_lo: RW<u32>,
    /// `BASE_HI` (RW).
    pub base_hi: RW<u32>,
    /// `SIZE_LOG2` (RW).
    pub size_log2: RW<u32>,
    /// `HEAD` (RO): device consumer index, diagnostics only.
    pub head: RO<u32>,
    /// `TAIL` (WO): doorbell, host producer index.
    pub tail: WO<u32>,
    _reserved: [u32; 11],
}

/// Register set of the completion ring: 64 bytes. `HEAD` and `TAIL` swap roles
/// compared with [`HostRingRegs`] because the device produces.
#[repr(C)]
pub struct CplRingRegs {
    /// `BASE_LO` (RW).
    pub base_lo: RW<u32>,
    /// `BASE_HI` (RW).
    pub base_hi: RW<u32>,
    /// `SIZE_LOG2` (RW).
    pub size_log2: RW<u32>,
    /// `HEAD` (WO): doorbell, host consumer index.
    pub head: WO<u32>,
    /// `TAIL` (RO): device producer index, diagnostics only.
    pub tail: RO<u32>,
    _reserved: [u32; 11],
}

/// One MSI-X table entry (PCI layout). Owned by the OS; drivers do not touch it.
#[repr(C)]
pub struct MsixEntry {
    /// Message address bits 31:0.
    pub addr_lo: RW<u32>,
    /// Message address bits 63:32.
    pub addr_hi: RW<u32>,
    /// Message data.
    pub data: RW<u32>,
    /// Vector control (bit 0: mask).
    pub vector_ctrl: RW<u32>,
}

/// The whole 64 KiB of BAR0 as volatile register cells.
///
/// Field offsets equal the [`RegOffset`] constants of this module. `INT_CAUSE` is
/// write-1-to-clear, which `volatile_register` has no type for: it is an [`RW`] cell,
/// and writing a bit clears it. Reserved space is private padding that must not be
/// accessed.
#[repr(C)]
pub struct Bar0 {
    /// `0x0000` `MAGIC`.
    pub magic: RO<u32>,
    /// `0x0004` `SPEC_VERSION`.
    pub spec_version: RO<u32>,
    /// `0x0008` `IMPL_ID`.
    pub impl_id: RO<u32>,
    _reserved_000c: u32,
    /// `0x0010` `FEATURES`.
    pub features: RO<u32>,
    /// `0x0014` `FLOW_CAPACITY`.
    pub flow_capacity: RO<u32>,
    /// `0x0018` `BUCKETS_LOG2`.
    pub buckets_log2: RO<u32>,
    /// `0x001C` `WAYS`.
    pub ways: RO<u32>,
    /// `0x0020` `FLOW_LIMIT`.
    pub flow_limit: RO<u32>,
    /// `0x0024` `COUNTER_COUNT`.
    pub counter_count: RO<u32>,
    /// `0x0028` `NUM_PORTS`.
    pub num_ports: RO<u32>,
    /// `0x002C` `RING_MAX_LOG2`.
    pub ring_max_log2: RO<u32>,
    /// `0x0030` `TIMESTAMP_FREQ`.
    pub timestamp_freq: RO<u32>,
    /// `0x0034` `MAX_FRAME_LEN`.
    pub max_frame_len: RO<u32>,
    _reserved_0038: [u32; 2],
    /// `0x0040` `CTRL`.
    pub ctrl: RW<u32>,
    /// `0x0044` `STATUS`.
    pub status: RO<u32>,
    /// `0x0048` `FATAL_CODE`.
    pub fatal_code: RO<u32>,
    /// `0x004C` `FATAL_UNIT`.
    pub fatal_unit: RO<u32>,
    /// `0x0050` `FATAL_ADDR_LO`.
    pub fatal_addr_lo: RO<u32>,
    /// `0x0054` `FATAL_ADDR_HI`.
    pub fatal_addr_hi: RO<u32>,
    /// `0x0058` `RESET_COUNT`.
    pub reset_count: RO<u32>,
    /// `0x005C` `FLOW_COUNT`.
    pub flow_count: RO<u32>,
    /// `0x0060` `INT_CAUSE` (W1C).
    pub int_cause: RW<u32>,
    /// `0x0064` `INT_MASK`.
    pub int_mask: RW<u32>,
    _reserved_0068: [u32; 2],
    /// `0x0070` `TIMESTAMP_LO` (reading latches `TIMESTAMP_HI`).
    pub timestamp_lo: RO<u32>,
    /// `0x0074` `TIMESTAMP_HI`.
    pub timestamp_hi: RO<u32>,
    _reserved_0078: [u32; 2],
    /// `0x0080` `STAT_WIRE_RX`.
    pub stat_wire_rx: RO<u32>,
    /// `0x0084` `STAT_HIT`.
    pub stat_hit: RO<u32>,
    /// `0x0088` `STAT_PUNT`.
    pub stat_punt: RO<u32>,
    /// `0x008C` `STAT_RX_NO_BUF`.
    pub stat_rx_no_buf: RO<u32>,
    /// `0x0090` `STAT_RX_TOO_BIG`.
    pub stat_rx_too_big: RO<u32>,
    /// `0x0094` `STAT_DISABLED_DROP`.
    pub stat_disabled_drop: RO<u32>,
    /// `0x0098` `STAT_RX_LEN_ERR`.
    pub stat_rx_len_err: RO<u32>,
    /// `0x009C` `STAT_TX`.
    pub stat_tx: RO<u32>,
    /// `0x00A0` `STAT_TX_ERR`.
    pub stat_tx_err: RO<u32>,
    _reserved_00a4: [u32; 23],
    /// `0x0100` command ring.
    pub cmd: HostRingRegs,
    /// `0x0140` completion ring.
    pub cpl: CplRingRegs,
    /// `0x0180` exception RX ring.
    pub rx: HostRingRegs,
    /// `0x01C0` TX ring.
    pub tx: HostRingRegs,
    _reserved_0200: [u32; 8064],
    /// `0x8000` MSI-X table (OS-owned).
    pub msix_table: [MsixEntry; 3],
    _reserved_8030: [u32; 1012],
    /// `0x9000` MSI-X pending-bit array, bits 31:0 then 63:32 (OS-owned).
    pub msix_pba: [RO<u32>; 2],
    _reserved_9008: [u32; 7166],
}

macro_rules! opaque_debug {
    ($($name:ident),+) => {
        $(
            // Debug must not read device memory: it prints the type only.
            impl fmt::Debug for $name {
                fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.debug_struct(stringify!($name)).finish_non_exhaustive()
                }
            }
        )+
    };
}

opaque_debug!(HostRingRegs, CplRingRegs, MsixEntry, Bar0);

const _: () = assert!(size_of::<HostRingRegs>() == RING_REGS_STRIDE as usize);
const _: () = assert!(size_of::<CplRingRegs>() == RING_REGS_STRIDE as usize);
const _: () = assert!(size_of::<MsixEntry>() == 16);
const _: () = assert!(size_of::<Bar0>() == crate::pci::BAR0_SIZE as usize);

#[cfg(test)]
mod tests {
    use core::mem::{offset_of, size_of};

    use super::*;

    fn off(reg: RegOffset) -> usize {
        usize::try_from(reg.get()).expect("u32 fits usize")
    }

    #[test]
    fn golden_register_offsets() {
        let golden: &[(RegOffset, u32)] = &[
            (MAGIC, 0x0000),
            (SPEC_VERSION, 0x0004),
            (IMPL_ID, 0x0008),
            (FEATURES, 0x0010),
            (FLOW_CAPACITY, 0x0014),
            (BUCKETS_LOG2, 0x0018),
            (WAYS, 0x001C),
            (FLOW_LIMIT, 0x0020),
            (COUNTER_COUNT, 0x0024),
            (NUM_PORTS, 0x0028),
            (RING_MAX_LOG2, 0x002C),
            (TIMESTAMP_FREQ, 0x0030),
            (MAX_FRAME_LEN, 0x0034),
            (CTRL, 0x0040),
            (STATUS, 0x0044),
            (FATAL_CODE, 0x0048),
            (FATAL_UNIT, 0x004C),
            (FATAL_ADDR_LO, 0x0050),
            (FATAL_ADDR_HI, 0x0054),
            (RESET_COUNT, 0x0058),
            (FLOW_COUNT, 0x005C),
            (INT_CAUSE, 0x0060),
            (INT_MASK, 0x0064),
            (TIMESTAMP_LO, 0x0070),
            (TIMESTAMP_HI, 0x0074),
            (STAT_WIRE_RX, 0x0080),
            (STAT_HIT, 0x0084),
            (STAT_PUNT, 0x0088),
            (STAT_RX_NO_BUF, 0x008C),
            (STAT_RX_TOO_BIG, 0x0090),
            (STAT_DISABLED_DROP, 0x0094),
            (STAT_RX_LEN_ERR, 0x0098),
            (STAT_TX, 0x009C),
            (STAT_TX_ERR, 0x00A0),
            (CMD_BASE_LO, 0x0100),
            (CMD_BASE_HI, 0x0104),
            (CMD_SIZE_LOG2, 0x0108),
            (CMD_HEAD, 0x010C),
            (CMD_TAIL, 0x0110),
            (CPL_BASE_LO, 0x0140),
            (CPL_BASE_HI, 0x0144),
            (CPL_SIZE_LOG2, 0x0148),
            (CPL_HEAD, 0x014C),
            (CPL_TAIL, 0x0150),
            (RX_BASE_LO, 0x0180),
            (RX_BASE_HI, 0x0184),
            (RX_SIZE_LOG2, 0x0188),
            (RX_HEAD, 0x018C),
            (RX_TAIL, 0x0190),
            (TX_BASE_LO, 0x01C0),
            (TX_BASE_HI, 0x01C4),
            (TX_SIZE_LOG2, 0x01C8),
            (TX_HEAD, 0x01CC),
            (TX_TAIL, 0x01D0),
            (MSIX_TABLE, 0x8000),
            (MSIX_PBA, 0x9000),
        ];
        for &(reg, value) in golden {
            assert_eq!(reg.get(), value, "{reg:?}");
            assert_eq!(reg.get() % 4, 0, "{reg:?} is not 32-bit aligned");
            assert!(reg.get() < crate::pci::BAR0_SIZE);
        }
        // No two registers share an offset.
        for (i, (a, _)) in golden.iter().enumerate() {
            for (b, _) in &golden[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn ring_register_sets_are_strided() {
        for (i, ring) in [CMD_RING, CPL_RING, RX_RING, TX_RING].iter().enumerate() {
            let base = 0x100 + RING_REGS_STRIDE * u32::try_from(i).expect("small");
            assert_eq!(ring.base_lo.get(), base);
            assert_eq!(ring.base_hi.get(), base + 4);
            assert_eq!(ring.size_log2.get(), base + 8);
            assert_eq!(ring.head.get(), base + 0xC);
            assert_eq!(ring.tail.get(), base + 0x10);
        }
    }

    #[test]
    fn bar0_struct_matches_offsets() {
        assert_eq!(size_of::<Bar0>(), 0x1_0000);
        assert_eq!(size_of::<HostRingRegs>(), 0x40);
        assert_eq!(size_of::<CplRingRegs>(), 0x40);
        let fields: &[(usize, RegOffset)] = &[
            (offset_of!(Bar0, magic), MAGIC),
            (offset_of!(Bar0, spec_version), SPEC_VERSION),
            (offset_of!(Bar0, impl_id), IMPL_ID),
            (offset_of!(Bar0, features), FEATURES),
            (offset_of!(Bar0, flow_capacity), FLOW_CAPACITY),
            (offset_of!(Bar0, buckets_log2), BUCKETS_LOG2),
            (offset_of!(Bar0, ways), WAYS),
            (offset_of!(Bar0, flow_limit), FLOW_LIMIT),
            (offset_of!(Bar0, counter_count), COUNTER_COUNT),
            (offset_of!(Bar0, num_ports), NUM_PORTS),
            (offset_of!(Bar0, ring_max_log2), RING_MAX_LOG2),
            (offset_of!(Bar0, timestamp_freq), TIMESTAMP_FREQ),
            (offset_of!(Bar0, max_frame_len), MAX_FRAME_LEN),
            (offset_of!(Bar0, ctrl), CTRL),
            (offset_of!(Bar0, status), STATUS),
            (offset_of!(Bar0, fatal_code), FATAL_CODE),
            (offset_of!(Bar0, fatal_unit), FATAL_UNIT),
            (offset_of!(Bar0, fatal_addr_lo), FATAL_ADDR_LO),
            (offset_of!(Bar0, fatal_addr_hi), FATAL_ADDR_HI),
            (offset_of!(Bar0, reset_count), RESET_COUNT),
            (offset_of!(Bar0, flow_count), FLOW_COUNT),
            (offset_of!(Bar0, int_cause), INT_CAUSE),
            (offset_of!(Bar0, int_mask), INT_MASK),
            (offset_of!(Bar0, timestamp_lo), TIMESTAMP_LO),
            (offset_of!(Bar0, timestamp_hi), TIMESTAMP_HI),
            (offset_of!(Bar0, stat_wire_rx), STAT_WIRE_RX),
            (offset_of!(Bar0, stat_hit), STAT_HIT),
            (offset_of!(Bar0, stat_punt), STAT_PUNT),
            (offset_of!(Bar0, stat_rx_no_buf), STAT_RX_NO_BUF),
            (offset_of!(Bar0, stat_rx_too_big), STAT_RX_TOO_BIG),
            (offset_of!(Bar0, stat_disabled_drop), STAT_DISABLED_DROP),
            (offset_of!(Bar0, stat_rx_len_err), STAT_RX_LEN_ERR),
            (offset_of!(Bar0, stat_tx), STAT_TX),
            (offset_of!(Bar0, stat_tx_err), STAT_TX_ERR),
            (offset_of!(Bar0, cmd), CMD_BASE_LO),
            (offset_of!(Bar0, cpl), CPL_BASE_LO),
            (offset_of!(Bar0, rx), RX_BASE_LO),
            (offset_of!(Bar0, tx), TX_BASE_LO),
            (offset_of!(Bar0, msix_table), MSIX_TABLE),
            (offset_of!(Bar0, msix_pba), MSIX_PBA),
        ];
        for &(field, reg) in fields {
            assert_eq!(field, off(reg), "{reg:?}");
        }
        // Inside a ring set, relative to its base.
        let host: [(usize, RegOffset); 5] = [
            (offset_of!(HostRingRegs, base_lo), CMD_BASE_LO),
            (offset_of!(HostRingRegs, base_hi), CMD_BASE_HI),
            (offset_of!(HostRingRegs, size_log2), CMD_SIZE_LOG2),
            (offset_of!(HostRingRegs, head), CMD_HEAD),
            (offset_of!(HostRingRegs, tail), CMD_TAIL),
        ];
        for (field, reg) in host {
            assert_eq!(off(CMD_BASE_LO) + field, off(reg));
        }
        let cpl: [(usize, RegOffset); 5] = [
            (offset_of!(CplRingRegs, base_lo), CPL_BASE_LO),
            (offset_of!(CplRingRegs, base_hi), CPL_BASE_HI),
            (offset_of!(CplRingRegs, size_log2), CPL_SIZE_LOG2),
            (offset_of!(CplRingRegs, head), CPL_HEAD),
            (offset_of!(CplRingRegs, tail), CPL_TAIL),
        ];
        for (field, reg) in cpl {
            assert_eq!(off(CPL_BASE_LO) + field, off(reg));
        }
        assert_eq!(offset_of!(MsixEntry, addr_lo), 0);
        assert_eq!(offset_of!(MsixEntry, addr_hi), 4);
        assert_eq!(offset_of!(MsixEntry, data), 8);
        assert_eq!(offset_of!(MsixEntry, vector_ctrl), 12);
    }

    #[test]
    fn golden_values() {
        assert_eq!(MAGIC_VALUE, 0x4354_4F31);
        assert_eq!(&MAGIC_VALUE.to_be_bytes(), b"CTO1");
        assert_eq!(SPEC_VERSION_VALUE, 0x0001_0001);
        assert_eq!(SpecVersion::from_raw(0x0001_0000), SpecVersion::V1_0);
        assert_eq!(
            SpecVersion::from_raw(0x0002_0003),
            SpecVersion { major: 2, minor: 3 }
        );
        assert_eq!(SpecVersion { major: 2, minor: 3 }.to_raw(), 0x0002_0003);
        assert_eq!(&IMPL_ID_SIMULATOR.to_be_bytes(), b"SIM1");
        assert_eq!(STATUS_RESET, 0x1);
        assert_eq!(INT_MASK_RESET, 0x7);
        let max = RingMaxLog2::from_raw(RING_MAX_LOG2_DEFAULT);
        assert_eq!(
            max,
            RingMaxLog2 {
                cmd: 16,
                cpl: 16,
                rx: 12,
                tx: 12
            }
        );
        assert_eq!(max.to_raw(), RING_MAX_LOG2_DEFAULT);
    }

    #[test]
    fn golden_bits() {
        assert_eq!(Ctrl::ENABLE.bits(), 0x1);
        assert_eq!(Ctrl::SOFT_RESET.bits(), 0x2);
        assert_eq!(Ctrl::DETACH.bits(), 0x4);
        assert_eq!(Status::READY.bits(), 0x1);
        assert_eq!(Status::ENABLED.bits(), 0x2);
        assert_eq!(Status::FATAL.bits(), 0x4);
        assert_eq!(Status::RESETTING.bits(), 0x8);
        assert_eq!(Status::DETACHED.bits(), 0x10);
        assert_eq!(IntCause::CMD_CPL.bits(), 0x01);
        assert_eq!(IntCause::RX.bits(), 0x02);
        assert_eq!(IntCause::TX_DONE.bits(), 0x04);
        assert_eq!(IntCause::FATAL.bits(), 0x08);
        assert_eq!(IntCause::RESET_DONE.bits(), 0x10);
        assert_eq!(IntCause::all().bits(), 0x1F);
        assert_eq!(Features::all().bits(), 0x7FF);
        assert_eq!(Features::COUNTER_DUMP_CHANGED.bits(), 1 << 10);
        assert_eq!(Features::DETACH.bits(), 1 << 9);
        assert_eq!(Features::IPV4.bits(), 1 << 0);
        assert_eq!(Features::IPV6.bits(), 1 << 1);
        assert_eq!(Features::NAT.bits(), 1 << 2);
        assert_eq!(Features::DEC_TTL.bits(), 1 << 3);
        assert_eq!(Features::ZONES.bits(), 1 << 4);
        assert_eq!(Features::COUNTER_DUMP.bits(), 1 << 5);
        assert_eq!(Features::TABLE_DUMP.bits(), 1 << 6);
        assert_eq!(Features::MSIX.bits(), 1 << 7);
        assert_eq!(Features::VLAN.bits(), 1 << 8);
    }

    #[test]
    fn cause_vectors() {
        assert_eq!(IntCause::CMD_CPL.vector(), Some(0));
        assert_eq!(IntCause::RX.vector(), Some(1));
        assert_eq!(IntCause::TX_DONE.vector(), Some(1));
        assert_eq!(IntCause::FATAL.vector(), Some(2));
        assert_eq!(IntCause::RESET_DONE.vector(), Some(2));
        assert_eq!(IntCause::all().vector(), None);
        assert_eq!(IntCause::empty().vector(), None);
    }
}
