//! Fixed numbers of the specification and the default capabilities.
//!
//! The `DEFAULT_*` values are what the full-size device reports in its capability
//! registers; an instance (notably the simulator) may report smaller ones, and software
//! must use the registers, not these constants, to size things.

/// Ways (slots) per bucket. Fixed at 8 in specification 1.x.
pub const WAYS: u32 = 8;
/// Default log2 of the bucket count.
pub const DEFAULT_BUCKETS_LOG2: u32 = 17;
/// Default flow-table capacity, `2^17 × 8`.
pub const DEFAULT_FLOW_CAPACITY: u32 = 1 << 20;
/// Default `FLOW_LIMIT` (equal to the capacity).
pub const DEFAULT_FLOW_LIMIT: u32 = DEFAULT_FLOW_CAPACITY;
/// Default number of network ports.
pub const DEFAULT_NUM_PORTS: u32 = 2;
/// Largest number of ports any instance has.
pub const MAX_PORTS: u32 = 8;
/// `TIMESTAMP` frequency: 1 GHz, one tick per nanosecond.
pub const TIMESTAMP_FREQ_HZ: u32 = 1_000_000_000;
/// Default `MAX_FRAME_LEN` in bytes (without FCS).
pub const DEFAULT_MAX_FRAME_LEN: u32 = 9216;
/// Smallest frame the MAC accepts from the wire, without FCS.
pub const MIN_WIRE_FRAME_LEN: u32 = 60;
/// Smallest TX descriptor `len` (an Ethernet header).
pub const MIN_TX_LEN: u32 = 14;
/// TX frames shorter than this are zero-padded to it by the device.
pub const TX_PAD_LEN: u32 = 60;

/// Smallest `SIZE_LOG2` of any ring.
pub const MIN_RING_SIZE_LOG2: u32 = 2;
/// Default largest `SIZE_LOG2` of the command ring.
pub const DEFAULT_CMD_RING_MAX_LOG2: u32 = 16;
/// Default largest `SIZE_LOG2` of the completion ring.
pub const DEFAULT_CPL_RING_MAX_LOG2: u32 = 16;
/// Default largest `SIZE_LOG2` of the exception RX ring.
pub const DEFAULT_RX_RING_MAX_LOG2: u32 = 12;
/// Default largest `SIZE_LOG2` of the TX ring.
pub const DEFAULT_TX_RING_MAX_LOG2: u32 = 12;
/// Required alignment of every ring base IOVA.
pub const RING_BASE_ALIGN: u64 = 4096;
/// Required alignment of a dump command's `dma_addr`.
pub const DUMP_ADDR_ALIGN: u64 = 64;

/// Largest VLAN ID, hence largest key `zone`.
pub const MAX_ZONE: u16 = 4095;
/// Width of the per-flow packet counter in bits.
pub const PACKET_COUNTER_BITS: u32 = 32;
/// Width of the per-flow byte counter in bits.
pub const BYTE_COUNTER_BITS: u32 = 48;
/// Mask of the valid bits of the byte counter.
pub const BYTE_COUNTER_MASK: u64 = (1 << 48) - 1;
/// Longest interval between two counter pulls that keeps deltas unambiguous at line
/// rate (section 11.2), in nanoseconds.
pub const MAX_COUNTER_PULL_INTERVAL_NS: u64 = 25_000_000_000;

/// Upper bound on the duration of a reset, in nanoseconds (10 ms).
pub const RESET_MAX_NS: u64 = 10_000_000;
/// Recommended driver timeout while waiting for `STATUS.READY` (100 ms).
pub const RESET_TIMEOUT_NS: u64 = 100_000_000;
/// Upper bound from `CTRL.ENABLE` to `STATUS.ENABLED` (1 µs); drivers wait 10 ms.
pub const ENABLE_MAX_NS: u64 = 1_000;
/// Upper bound on a non-dump command once the device reaches it (1 ms).
pub const CMD_MAX_NS: u64 = 1_000_000;
/// Extra time a dump may take per record (100 ns).
pub const DUMP_NS_PER_RECORD: u64 = 100;
/// The command-processor watchdog (50 ms): a command stuck longer is a fatal `CMD_HANG`.
pub const CMD_WATCHDOG_NS: u64 = 50_000_000;
/// Recommended driver timeout for the oldest outstanding command (100 ms, plus the dump
/// allowance).
pub const CMD_TIMEOUT_NS: u64 = 100_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_limits() {
        assert_eq!(WAYS, 8);
        assert_eq!(DEFAULT_FLOW_CAPACITY, (1 << DEFAULT_BUCKETS_LOG2) * WAYS);
        assert_eq!(DEFAULT_FLOW_CAPACITY, 1_048_576);
        assert_eq!(TIMESTAMP_FREQ_HZ, 1_000_000_000);
        assert_eq!(DEFAULT_MAX_FRAME_LEN, 9216);
        assert_eq!(BYTE_COUNTER_MASK, 0xFFFF_FFFF_FFFF);
        assert_eq!(RING_BASE_ALIGN, 4096);
        assert_eq!(DUMP_ADDR_ALIGN, 64);
        assert_eq!(MIN_RING_SIZE_LOG2, 2);
        // 2^32 packets at 150 Mpps take longer than the pull interval.
        let wrap_ns = (1u64 << PACKET_COUNTER_BITS) * 1_000 / 150;
        assert!(wrap_ns > MAX_COUNTER_PULL_INTERVAL_NS);
        assert_eq!(RESET_MAX_NS, 10_000_000);
        assert_eq!(CMD_WATCHDOG_NS, 50_000_000);
    }
}
