//! The simulated IOMMU handle given to the driver side: `VFIO_IOMMU_MAP_DMA` for the
//! model.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, PoisonError, RwLock};

use crate::Result;
use crate::dma::{DmaSpace, Iova};
use crate::mem::SharedRegion;

/// The device's IOVA space, shared between the device and whoever maps DMA memory.
/// Cloning gives another handle on the same space.
#[derive(Debug, Clone, Default)]
pub struct SimIommu {
    space: Arc<RwLock<DmaSpace>>,
}

impl SimIommu {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Maps `len` bytes of the memfd `fd`, from `offset`, at `iova`. The fd is
    /// duplicated; the memfd must be sealed against shrinking (as
    /// [`SharedRegion::create_memfd`] makes it), so that the device can never fault on
    /// a truncated mapping. `iova`, `offset` and `len` must be 4 KiB multiples and the
    /// range must not overlap an existing mapping.
    pub fn map(&self, iova: u64, fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<()> {
        let owned = fd.try_clone_to_owned().map_err(|e| crate::Error::Io {
            op: "dup DMA memfd",
            source: e,
        })?;
        let region = Arc::new(SharedRegion::from_memfd(owned)?);
        self.map_region(iova, region, offset, len)
    }

    /// Maps `len` bytes of an already mapped region, from `offset`, at `iova`.
    pub fn map_region(
        &self,
        iova: u64,
        region: Arc<SharedRegion>,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        self.write().map(Iova::new(iova), region, offset, len)
    }

    /// Removes the mappings inside `[iova, iova + len)` (whole mappings only).
    pub fn unmap(&self, iova: u64, len: u64) -> Result<()> {
        self.write().unmap(Iova::new(iova), len).map(|_| ())
    }

    /// Runs `f` on the IOVA space (device side).
    pub(crate) fn with<T>(&self, f: impl FnOnce(&DmaSpace) -> Result<T>) -> Result<T> {
        let space = self.space.read().unwrap_or_else(PoisonError::into_inner);
        f(&space)
    }

    /// Holds the IOVA space for a burst of accesses (one lock instead of one per
    /// access). Do not call [`with`](Self::with) while holding it.
    pub(crate) fn read(&self) -> std::sync::RwLockReadGuard<'_, DmaSpace> {
        self.space.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, DmaSpace> {
        self.space.write().unwrap_or_else(PoisonError::into_inner)
    }
}
