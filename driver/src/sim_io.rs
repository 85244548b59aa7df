//! [`DeviceIo`] over the simulator's shared memory.
//!
//! The driver does not depend on `nic-sim`: a [`SimIo`] is built from what the
//! simulator hands out — the BAR0 register file (an fd to `mmap`), a DMA-map callback
//! (the simulator's IOMMU) and the MSI-X eventfds — so the same register engine runs
//! against the model and against hardware.
//!
//! Register semantics on a shared-memory BAR (device.md section 19): host writes are
//! 32-bit release stores, reads are acquire loads, W1C is an atomic `fetch_and`, and
//! `TIMESTAMP` is one aligned 64-bit atomic load. DMA memory is sealed memfds mapped
//! `MAP_SHARED`, registered with the simulator at IOVAs from an [`IovaAllocator`].
//!
//! When the simulator runs as its own process ([`crate::sim_process`]), a liveness flag
//! ([`SimIo::with_liveness`]) turns every register access after the process is gone
//! into [`DriverError::SimGone`] instead of reads of a register image nobody updates.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ctoffload_hw_regs::pci::BAR0_SIZE;
use ctoffload_hw_regs::regs::{self, RegOffset};

use crate::error::{DriverError, Result};
use crate::io::{DeviceIo, DmaRegion, MmioCounters, MmioStats};
use crate::iova::{DEFAULT_APERTURE_LAST, DEFAULT_MIN_IOVA, Iova, IovaAllocator, IovaRange};
use crate::mmio::{DmaMemory, PAGE_SIZE_4K, SharedRegs};
use crate::vfio::EventFd;

/// The simulator's IOMMU map operation: `(iova, fd, offset, len)`.
pub type DmaMapFn =
    Box<dyn FnMut(u64, BorrowedFd<'_>, u64, u64) -> std::result::Result<(), String> + Send>;

/// A function-level reset of the simulated function.
pub type ResetFn = Box<dyn FnMut() -> std::result::Result<(), String> + Send>;

/// DMA memory shared with the simulator: a sealed memfd mapped here and in the model.
///
/// The IOVA range is not returned to the allocator on drop: the simulator keeps its
/// mapping (there is no unmap callback), and a reused IOVA would overlap it.
#[derive(Debug)]
pub struct SimDma {
    mem: DmaMemory,
    iova: Iova,
    _fd: OwnedFd,
}

impl DmaRegion for SimDma {
    fn iova(&self) -> Iova {
        self.iova
    }
    fn memory(&self) -> &DmaMemory {
        &self.mem
    }
}

/// [`DeviceIo`] over the simulator.
pub struct SimIo {
    bar: SharedRegs,
    map: DmaMapFn,
    reset: Option<ResetFn>,
    irqs: Vec<EventFd>,
    iovas: IovaAllocator,
    counters: MmioCounters,
    liveness: Option<Liveness>,
}

/// Set when the simulator process is gone; `what` names it in the error.
#[derive(Debug, Clone)]
struct Liveness {
    gone: Arc<AtomicBool>,
    what: Arc<str>,
}

impl fmt::Debug for SimIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimIo")
            .field("irqs", &self.irqs.len())
            .field("mmio", &self.counters.snapshot())
            .finish_non_exhaustive()
    }
}

impl SimIo {
    /// Maps the simulator's 64 KiB register file `bar_fd`, takes its IOMMU `map`
    /// callback and its interrupt eventfds (index = MSI-X vector).
    pub fn new(bar_fd: BorrowedFd<'_>, map: DmaMapFn, irq_fds: Vec<OwnedFd>) -> Result<Self> {
        let len = usize::try_from(BAR0_SIZE).unwrap_or(usize::MAX);
        let bar = SharedRegs::map_fd(bar_fd, len)?;
        let irqs = irq_fds
            .into_iter()
            .map(EventFd::from_owned)
            .collect::<Result<Vec<_>>>()?;
        let aperture = IovaRange {
            start: Iova::new(0),
            last: Iova::new(DEFAULT_APERTURE_LAST),
        };
        Ok(Self {
            bar,
            map,
            reset: None,
            irqs,
            iovas: IovaAllocator::new(&[aperture], Iova::new(DEFAULT_MIN_IOVA)),
            counters: MmioCounters::default(),
            liveness: None,
        })
    }

    /// Fails every register access with [`DriverError::SimGone`] (naming `what`, e.g.
    /// the control socket) once `gone` is set, e.g. by a watcher of the simulator
    /// process. Costs one relaxed load per access.
    #[must_use]
    pub fn with_liveness(mut self, gone: Arc<AtomicBool>, what: &str) -> Self {
        self.liveness = Some(Liveness {
            gone,
            what: what.into(),
        });
        self
    }

    fn alive(&self) -> Result<()> {
        match &self.liveness {
            Some(l) if l.gone.load(Ordering::Relaxed) => Err(DriverError::SimGone {
                socket: l.what.to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// Sets the function-level reset operation (e.g. one that calls the simulator's
    /// `flr`). Without it, [`DeviceIo::function_reset`] fails and bring-up uses the
    /// soft reset.
    #[must_use]
    pub fn with_reset(mut self, reset: ResetFn) -> Self {
        self.reset = Some(reset);
        self
    }
}

fn off(reg: RegOffset) -> usize {
    usize::try_from(reg.get()).unwrap_or(usize::MAX)
}

impl DeviceIo for SimIo {
    type Dma = SimDma;

    fn read32(&self, reg: RegOffset) -> Result<u32> {
        self.alive()?;
        self.counters.read(1);
        self.bar.load32(off(reg))
    }

    fn write32(&self, reg: RegOffset, value: u32) -> Result<()> {
        self.alive()?;
        self.counters.write();
        self.bar.store32(off(reg), value)
    }

    fn clear_bits32(&self, reg: RegOffset, bits: u32) -> Result<()> {
        self.alive()?;
        self.counters.write();
        self.bar.fetch_and32(off(reg), bits).map(drop)
    }

    fn read_timestamp(&self) -> Result<u64> {
        // The model stores TIMESTAMP as one aligned 64-bit value: one atomic load.
        self.alive()?;
        self.counters.read(1);
        self.bar.load64(off(regs::TIMESTAMP_LO))
    }

    fn dma_alloc(&mut self, len: usize) -> Result<SimDma> {
        let (mem, fd) = DmaMemory::memfd(len, "ctoffload-dma")?;
        let size = u64::try_from(mem.len()).map_err(|_| DriverError::IovaRequest {
            len: u64::MAX,
            align: 0,
        })?;
        let page = u64::try_from(PAGE_SIZE_4K).unwrap_or(4096);
        let range = self.iovas.alloc(size, page)?;
        if let Err(reason) = (self.map)(range.start.raw(), fd.as_fd(), 0, size) {
            let _ = self.iovas.free(range.start);
            return Err(DriverError::SimDmaMap {
                iova: range.start.raw(),
                len: size,
                reason,
            });
        }
        Ok(SimDma {
            mem,
            iova: range.start,
            _fd: fd,
        })
    }

    fn irq(&self, vector: u16) -> Option<&EventFd> {
        self.irqs.get(usize::from(vector))
    }

    fn function_reset(&mut self) -> Result<()> {
        match &mut self.reset {
            Some(f) => f().map_err(|reason| DriverError::SimControl { op: "flr", reason }),
            None => Err(DriverError::ResetUnsupported {
                addr: "simulator".into(),
            }),
        }
    }

    fn mmio_stats(&self) -> MmioStats {
        self.counters.snapshot()
    }
}
