//! The one trait in front of the hardware: [`DeviceIo`].
//!
//! The register engine ([`crate::device`]) talks to a device only through this trait:
//! 32-bit BAR register access, W1C clearing, the 64-bit timestamp, DMA memory with an
//! IOVA, interrupt eventfds and function reset. [`VfioIo`] implements it over a real PCI
//! function ([`crate::vfio::VfioDevice`]); [`crate::sim_io::SimIo`] over the
//! simulator's shared memory; `crate::mock::MockIo` (feature `test-utils`) is a
//! failure-injecting double.
//!
//! Implementations count MMIO reads and writes ([`MmioStats`]) so benchmarks can show
//! that the hot path does none.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ctoffload_hw_regs::regs::{self, RegOffset};

use crate::error::Result;
use crate::iova::Iova;
use crate::mmio::{DmaMemory, MmioRegion};
use crate::vfio::{BarKind, DmaBuffer, EventFd, VfioDevice};

/// DMA memory the device can reach at [`iova`](DmaRegion::iova). Access it only through
/// [`DmaMemory`]'s volatile/atomic methods: no reference to the bytes is ever handed out.
pub trait DmaRegion: Send + fmt::Debug {
    /// The IOVA of byte 0.
    fn iova(&self) -> Iova;
    /// The memory.
    fn memory(&self) -> &DmaMemory;
}

impl DmaRegion for DmaBuffer {
    fn iova(&self) -> Iova {
        DmaBuffer::iova(self)
    }
    fn memory(&self) -> &DmaMemory {
        DmaBuffer::memory(self)
    }
}

/// MMIO accesses performed through a [`DeviceIo`] since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MmioStats {
    /// 32-bit register reads (a 64-bit timestamp read over VFIO counts 2).
    pub reads: u64,
    /// 32-bit register writes (including W1C clears and doorbells).
    pub writes: u64,
}

/// Relaxed counters behind [`MmioStats`].
#[derive(Debug, Default)]
pub struct MmioCounters {
    reads: AtomicU64,
    writes: AtomicU64,
}

impl MmioCounters {
    /// Counts `n` reads.
    pub fn read(&self, n: u64) {
        self.reads.fetch_add(n, Ordering::Relaxed);
    }
    /// Counts one write.
    pub fn write(&self) {
        self.writes.fetch_add(1, Ordering::Relaxed);
    }
    /// A snapshot.
    pub fn snapshot(&self) -> MmioStats {
        MmioStats {
            reads: self.reads.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
        }
    }
}

/// Access to one CTO-1 function: BAR0 registers, DMA memory, interrupts, reset.
pub trait DeviceIo: Send {
    /// The DMA buffer type.
    type Dma: DmaRegion;

    /// Reads a 32-bit register.
    fn read32(&self, reg: RegOffset) -> Result<u32>;
    /// Writes a 32-bit register (doorbells included).
    fn write32(&self, reg: RegOffset, value: u32) -> Result<()>;
    /// Clears `bits` of a W1C register (`INT_CAUSE`).
    fn clear_bits32(&self, reg: RegOffset, bits: u32) -> Result<()>;
    /// Reads the 64-bit `TIMESTAMP` consistently.
    fn read_timestamp(&self) -> Result<u64>;
    /// Allocates at least `len` bytes of zeroed DMA memory, mapped for the device at a
    /// 4 KiB-aligned IOVA.
    fn dma_alloc(&mut self, len: usize) -> Result<Self::Dma>;
    /// The eventfd signalled by MSI-X vector `vector`, if interrupts are set up.
    fn irq(&self, vector: u16) -> Option<&EventFd>;
    /// Function-level reset (FLR), if this backend has one.
    fn function_reset(&mut self) -> Result<()>;
    /// MMIO accesses so far.
    fn mmio_stats(&self) -> MmioStats;
}

/// [`DeviceIo`] over a VFIO-owned PCI function.
pub struct VfioIo {
    dev: VfioDevice,
    bar: Arc<MmioRegion>,
    irqs: Vec<EventFd>,
    counters: MmioCounters,
}

impl fmt::Debug for VfioIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VfioIo")
            .field("addr", &self.dev.addr())
            .field("irqs", &self.irqs.len())
            .field("mmio", &self.counters.snapshot())
            .finish()
    }
}

impl VfioIo {
    /// Takes an opened device and routes its 3 MSI-X vectors to eventfds (when the
    /// device has them; otherwise interrupts are not used).
    pub fn new(mut dev: VfioDevice) -> Result<Self> {
        let n = u32::from(ctoffload_hw_regs::pci::MSIX_VECTORS);
        let irqs = if dev.msix_vectors() >= n {
            dev.enable_msix(n)?
        } else {
            Vec::new()
        };
        Ok(Self {
            bar: dev.bar0(),
            dev,
            irqs,
            counters: MmioCounters::default(),
        })
    }

    /// The underlying device.
    pub fn device(&self) -> &VfioDevice {
        &self.dev
    }
}

fn off(reg: RegOffset) -> usize {
    // u32 -> usize never truncates on the 64-bit hosts this driver supports.
    usize::try_from(reg.get()).unwrap_or(usize::MAX)
}

impl DeviceIo for VfioIo {
    type Dma = DmaBuffer;

    fn read32(&self, reg: RegOffset) -> Result<u32> {
        self.counters.read(1);
        self.bar.read32(off(reg))
    }

    fn write32(&self, reg: RegOffset, value: u32) -> Result<()> {
        self.counters.write();
        self.bar.write32(off(reg), value)
    }

    fn clear_bits32(&self, reg: RegOffset, bits: u32) -> Result<()> {
        match self.dev.bar_kind() {
            // W1C on real hardware: writing the bits clears them.
            BarKind::Device => self.write32(reg, bits),
            // A model polling shared memory behind the BAR (QEMU guest test over
            // ivshmem): clear atomically, as docs/device.md section 19.1 says.
            BarKind::SharedMemory => {
                self.counters.write();
                self.bar.fetch_and32_shared_memory(off(reg), bits).map(drop)
            }
        }
    }

    fn read_timestamp(&self) -> Result<u64> {
        // LO latches HI (device.md section 2): LO first, then HI.
        let lo = self.read32(regs::TIMESTAMP_LO)?;
        let hi = self.read32(regs::TIMESTAMP_HI)?;
        Ok(u64::from(hi) << 32 | u64::from(lo))
    }

    fn dma_alloc(&mut self, len: usize) -> Result<DmaBuffer> {
        self.dev.dma_alloc(len)
    }

    fn irq(&self, vector: u16) -> Option<&EventFd> {
        self.irqs.get(usize::from(vector))
    }

    fn function_reset(&mut self) -> Result<()> {
        self.dev.reset()
    }

    fn mmio_stats(&self) -> MmioStats {
        self.counters.snapshot()
    }
}
