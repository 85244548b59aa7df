//! The crate's error type.

use crate::dma::Iova;

/// Everything that can go wrong in the simulator's infrastructure layer.
///
/// Datapath outcomes that are not failures (a frame the device punts, a TTL that
/// expires) are plain values in [`crate::rewrite`], not variants here.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An access of `len` bytes at `offset` does not fit in a region of `size` bytes.
    #[error("access of {len} bytes at offset {offset:#x} exceeds the region size {size:#x}")]
    OutOfBounds {
        /// Byte offset of the access.
        offset: u64,
        /// Length of the access in bytes.
        len: u64,
        /// Size of the region in bytes.
        size: u64,
    },
    /// An access at `offset` is not aligned to `align` bytes.
    #[error("offset {offset:#x} is not aligned to {align} bytes")]
    Misaligned {
        /// Byte offset (or IOVA) of the access.
        offset: u64,
        /// Required alignment in bytes.
        align: u64,
    },
    /// A shared region's size is zero or not a multiple of the page size.
    #[error("region size {size:#x} is not a non-zero multiple of the page size {page_size:#x}")]
    BadRegionSize {
        /// Requested or found size in bytes.
        size: u64,
        /// The system page size.
        page_size: u64,
    },
    /// A shared-memory name is empty, too long, or contains `/` or NUL.
    #[error("invalid shared-memory name {name:?}")]
    BadRegionName {
        /// The rejected name.
        name: String,
    },
    /// A memfd handed to [`crate::mem::SharedRegion::from_memfd`] is not sealed against
    /// shrinking, so another process could truncate it under the mapping.
    #[error("memfd is not sealed against shrinking")]
    RegionNotSealed,
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A DMA of `len` bytes at `iova` touches an unmapped byte or crosses mappings. The
    /// device treats this as a fatal DMA error.
    #[error("DMA fault: {len} bytes at IOVA {iova}")]
    DmaFault {
        /// First IOVA of the access.
        iova: Iova,
        /// Length of the access in bytes.
        len: u64,
    },
    /// A DMA mapping request is not page-aligned, is empty, wraps the IOVA space, or
    /// extends past the end of its region.
    #[error("invalid DMA mapping of {len:#x} bytes at IOVA {iova} from region offset {offset:#x}")]
    DmaBadMapping {
        /// Requested IOVA.
        iova: Iova,
        /// Requested offset in the region.
        offset: u64,
        /// Requested length.
        len: u64,
    },
    /// A DMA mapping request overlaps an existing mapping.
    #[error("DMA mapping of {len:#x} bytes at IOVA {iova} overlaps an existing mapping")]
    DmaOverlap {
        /// Requested IOVA.
        iova: Iova,
        /// Requested length.
        len: u64,
    },
    /// A DMA unmap request would split a mapping (VFIO type1v2 refuses this too).
    #[error("DMA unmap of {len:#x} bytes at IOVA {iova} would split a mapping")]
    DmaPartialUnmap {
        /// Requested IOVA.
        iova: Iova,
        /// Requested length.
        len: u64,
    },
    /// A frame does not fit in a frame buffer.
    #[error("frame of {len} bytes exceeds the {max}-byte frame buffer")]
    FrameTooLong {
        /// Length of the frame.
        len: usize,
        /// Size of a frame buffer.
        max: usize,
    },
    /// A frame batch has no free slot.
    #[error("frame batch is full ({capacity} frames)")]
    BatchFull {
        /// Capacity of the batch.
        capacity: usize,
    },
    /// A [`crate::SimConfig`] is out of range.
    #[error("invalid simulator configuration: {reason}")]
    BadConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// A port number is not below `NUM_PORTS`.
    #[error("no port {port}")]
    BadPort {
        /// The port number.
        port: u8,
    },
    /// A control-socket message is malformed.
    #[error("bad control message: {reason}")]
    BadControlMessage {
        /// What is wrong.
        reason: &'static str,
    },
    /// Packet ring settings the kernel would refuse (or that make no sense).
    #[error("invalid packet ring settings: {reason}")]
    BadRingConfig {
        /// What is wrong.
        reason: &'static str,
    },
    /// No network interface has this name.
    #[error("network interface {name:?} not found")]
    NoSuchInterface {
        /// The interface name.
        name: String,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::Io`] from the calling thread's `errno`.
    pub(crate) fn last_os(op: &'static str) -> Self {
        Self::Io {
            op,
            source: std::io::Error::last_os_error(),
        }
    }

    /// An [`Error::Io`] from an `io::Error`.
    pub(crate) fn io(op: &'static str, source: std::io::Error) -> Self {
        Self::Io { op, source }
    }
}
