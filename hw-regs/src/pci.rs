//! PCI identity of the device (device.md section 1).

/// Vendor ID. **A placeholder, not assigned by the PCI-SIG.**
pub const VENDOR_ID: u16 = 0x1DEC;
/// Device ID of the "CTO-1 flow offload engine".
pub const DEVICE_ID: u16 = 0xC701;
/// Revision ID.
pub const REVISION_ID: u8 = 0x01;
/// Class code: network controller, Ethernet, prog-if 0.
pub const CLASS_CODE: u32 = 0x02_0000;
/// Subsystem vendor ID (placeholder, as [`VENDOR_ID`]).
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x1DEC;
/// Subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x0001;

/// Index of the register BAR. No other BAR is implemented.
pub const REG_BAR: u8 = 0;
/// Size of BAR0 in bytes (64 KiB, 32-bit non-prefetchable memory).
pub const BAR0_SIZE: u32 = 0x1_0000;

/// Number of MSI-X vectors.
pub const MSIX_VECTORS: u16 = 3;
/// MSI-X vector of command completions (`INT_CAUSE.CMD_CPL`).
pub const MSIX_VECTOR_CMD: u16 = 0;
/// MSI-X vector of packet I/O (`INT_CAUSE.RX` and `INT_CAUSE.TX_DONE`).
pub const MSIX_VECTOR_PKT: u16 = 1;
/// MSI-X vector of device events (`INT_CAUSE.FATAL` and `INT_CAUSE.RESET_DONE`).
pub const MSIX_VECTOR_EVENT: u16 = 2;
/// Offset of the MSI-X table in BAR0.
pub const MSIX_TABLE_OFFSET: u32 = 0x8000;
/// Offset of the MSI-X pending-bit array in BAR0.
pub const MSIX_PBA_OFFSET: u32 = 0x9000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_identity() {
        assert_eq!(VENDOR_ID, 0x1DEC);
        assert_eq!(DEVICE_ID, 0xC701);
        assert_eq!(REVISION_ID, 0x01);
        assert_eq!(CLASS_CODE, 0x020000);
        assert_eq!((SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID), (0x1DEC, 0x0001));
        assert_eq!(REG_BAR, 0);
        assert_eq!(BAR0_SIZE, 65536);
        assert_eq!(MSIX_VECTORS, 3);
        assert_eq!(
            (MSIX_VECTOR_CMD, MSIX_VECTOR_PKT, MSIX_VECTOR_EVENT),
            (0, 1, 2)
        );
        assert_eq!((MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET), (0x8000, 0x9000));
    }
}
