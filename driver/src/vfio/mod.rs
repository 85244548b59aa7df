//! The VFIO backend: takes a PCI device bound to `vfio-pci` and gives the rest of the
//! driver a mapped BAR0 ([`MmioRegion`]), DMA memory mapped at IOVAs the driver
//! chooses ([`DmaBuffer`]), MSI-X interrupts as eventfds ([`EventFd`]) and reset.
//!
//! Built directly on the kernel ABI (`include/uapi/linux/vfio.h`, type-1 IOMMU): the
//! structures come from `vfio-bindings`, the ioctls are our own thin wrappers in
//! [`ioctl`] (see `docs/vfio.md` for why not `vfio-ioctls`).
//!
//! [`VfioDevice::open`] walks, in order: sysfs pre-flight (device, IOMMU group,
//! driver, group viability), container (`/dev/vfio/vfio`, API version, type-1 IOMMU),
//! group (`/dev/vfio/<N>`, viability, attach, set IOMMU), IOVA aperture, device fd,
//! device/region info, BAR0 mmap, config-space ID check and Memory Space + Bus Master
//! enable. Each step fails with a [`DriverError`] that says what to do.

pub mod container;
pub mod ioctl;
pub mod irq;
pub mod pagemap;
pub mod sysfs;

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_PCI_BAR0_REGION_INDEX,
    VFIO_PCI_BAR5_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
};

use self::container::{Container, Group};
pub use self::irq::EventFd;
pub use self::sysfs::{DeviceSysfsInfo, PciAddress, Sysfs};
use crate::error::{DriverError, Result};
use crate::iova::{Iova, IovaAllocator, IovaRange};
use crate::mmio::{DmaMemory, HugePages, MmioRegion};

/// PCI config space: vendor ID offset.
pub const PCI_VENDOR_ID: u16 = 0x00;
/// PCI config space: device ID offset.
pub const PCI_DEVICE_ID: u16 = 0x02;
/// PCI config space: command register offset.
pub const PCI_COMMAND: u16 = 0x04;
/// Command register: Memory Space Enable (bit 1).
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: Bus Master Enable (bit 2). Without it the device's DMA and MSI-X
/// writes are dropped silently.
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// How to open a device.
#[derive(Debug, Clone)]
pub struct VfioOptions {
    /// Root of sysfs (`/` in production; `root/sys/bus/pci/...` is read).
    pub sysfs_root: PathBuf,
    /// Directory of the VFIO nodes (`/dev/vfio`).
    pub vfio_dir: PathBuf,
    /// Refuse the device unless config space shows this (vendor, device) pair.
    pub expected_ids: Option<(u16, u16)>,
    /// Hugepage policy for [`VfioDevice::dma_alloc`].
    pub huge_pages: HugePages,
    /// The VFIO region index of the BAR that holds the device's registers (0..=5).
    /// The CTO-1 device has them in BAR0 (the default). The QEMU guest test sets 2:
    /// there the register image is the shared memory of an `ivshmem` device, which
    /// QEMU exposes as BAR2 (BAR0 holds ivshmem's own registers, BAR1 its MSI-X table);
    /// see `docs/vfio.md`, "QEMU guest test".
    pub register_bar: u32,
    /// How DMA buffers get their IOVA.
    pub iova_mode: IovaMode,
    /// What kind of memory the register BAR is (W1C emulation for shared memory).
    pub bar_kind: BarKind,
    /// Set Bus Master Enable at open and after reset (default true). `false` exists
    /// only for the guest test's negative case, which proves that a device without
    /// BME does not deliver MSI-X; a driver must never use it.
    pub bus_master: bool,
}

/// How [`VfioDevice::dma_alloc`] chooses the IOVA of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IovaMode {
    /// IOVAs come from the driver's allocator over the IOMMU's aperture (production).
    #[default]
    Allocated,
    /// IOVA = the buffer's physical address, read from `/proc/self/pagemap` (DPDK's
    /// "IOVA as PA"). The buffer is still mapped with `VFIO_IOMMU_MAP_DMA` at that
    /// IOVA, so the IOMMU translation is the identity for it. For a device model that
    /// cannot walk the IOMMU's tables (the QEMU guest test, where the model runs on the
    /// host and reads guest RAM by guest-physical address). Needs root and physically
    /// contiguous buffers (2 MiB hugepages).
    PhysAddr,
}

/// What the register BAR is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BarKind {
    /// Real device registers: a W1C clear is a plain write of the bits (section 2).
    #[default]
    Device,
    /// Plain shared memory polled by a device model (docs/device.md section 19.1, e.g.
    /// behind `ivshmem`): a W1C clear is an atomic `fetch_and`, as the model expects.
    SharedMemory,
}

impl Default for VfioOptions {
    fn default() -> Self {
        Self {
            sysfs_root: PathBuf::from("/"),
            vfio_dir: PathBuf::from("/dev/vfio"),
            expected_ids: None,
            huge_pages: HugePages::Prefer,
            register_bar: VFIO_PCI_BAR0_REGION_INDEX,
            iova_mode: IovaMode::Allocated,
            bar_kind: BarKind::Device,
            bus_master: true,
        }
    }
}

/// A VFIO region's geometry as `VFIO_DEVICE_GET_REGION_INFO` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index.
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes.
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
}

impl RegionInfo {
    fn has(&self, flag: u32) -> bool {
        self.flags & flag != 0
    }
}

/// The IOMMU side shared by the device and its DMA buffers: buffers keep the group
/// attached and the container alive until they are unmapped.
#[derive(Debug)]
struct IommuCtx {
    allocator: Mutex<IovaAllocator>,
    /// Smallest IOMMU page size (lowest bit of `iova_pgsizes`), at least 4 KiB.
    min_pgsize: u64,
    // Field order is drop order: detach the group, then close the container.
    group: Group,
    container: Container,
}

impl IommuCtx {
    fn allocator(&self) -> MutexGuard<'_, IovaAllocator> {
        // A panic while holding the lock cannot leave the allocator half-updated in a
        // way that breaks memory safety; keep going rather than propagate the poison.
        self.allocator.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An open VFIO PCI device, ready for MMIO, DMA and interrupts.
#[derive(Debug)]
pub struct VfioDevice {
    addr: PciAddress,
    sysfs: DeviceSysfsInfo,
    device: File,
    flags: u32,
    num_regions: u32,
    num_irqs: u32,
    config: RegionInfo,
    bar0_info: RegionInfo,
    bar0: Arc<MmioRegion>,
    msix_count: u32,
    msix_enabled: u32,
    huge_pages: HugePages,
    iova_mode: IovaMode,
    bar_kind: BarKind,
    bus_master: bool,
    iommu: Arc<IommuCtx>,
}

impl VfioDevice {
    /// Opens `addr` through VFIO (see the module docs for the steps).
    pub fn open(addr: &PciAddress, opts: &VfioOptions) -> Result<Self> {
        let container_path = opts.vfio_dir.join("vfio");
        // 1. The VFIO driver must be loaded at all.
        if !container_path.exists() {
            return Err(DriverError::VfioNotLoaded {
                path: container_path,
            });
        }
        // 2. sysfs pre-flight: device, IOMMU group, vfio-pci binding, viability.
        let sysfs = Sysfs::new(&opts.sysfs_root);
        let info = sysfs.check_device(addr)?;
        let group_path = opts.vfio_dir.join(info.iommu_group.to_string());
        if !group_path.exists() {
            return Err(DriverError::GroupNodeMissing {
                group: info.iommu_group,
                path: group_path,
            });
        }
        // 3. Container: API version and IOMMU type.
        let container = Container::open(&container_path)?;
        let iommu_type = container.pick_iommu_type()?;
        // 4. Group: viable, attach, set the IOMMU.
        let group = Group::open(&opts.vfio_dir, info.iommu_group)?;
        if !group.is_viable()? {
            return Err(DriverError::GroupNotViable {
                group: group.id(),
                offenders: sysfs.group_offenders(group.id()).unwrap_or_default(),
            });
        }
        group.set_container(&container)?;
        container.set_iommu(iommu_type)?;
        // 5. IOVA aperture.
        let iommu_info = container.iommu_info()?;
        let allocator = IovaAllocator::from_info(&iommu_info);
        let min_pgsize = min_page_size(iommu_info.iova_pgsizes);
        // 6. Device fd and info.
        let device = group.device_fd(&addr.to_string())?;
        let dinfo = ioctl::device_get_info(&device).map_err(ioctl_err("VFIO_DEVICE_GET_INFO"))?;
        if dinfo.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(DriverError::NotPci {
                addr: addr.to_string(),
            });
        }
        let region_err = |index, reason| DriverError::Region {
            addr: addr.to_string(),
            index,
            reason,
        };
        if dinfo.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX {
            return Err(region_err(
                VFIO_PCI_CONFIG_REGION_INDEX,
                "device reports too few regions",
            ));
        }
        if opts.register_bar > VFIO_PCI_BAR5_REGION_INDEX {
            return Err(region_err(
                opts.register_bar,
                "register BAR index is not 0..=5",
            ));
        }
        let bar0_info = region_info(&device, opts.register_bar)?;
        let config = region_info(&device, VFIO_PCI_CONFIG_REGION_INDEX)?;
        if config.size < 0x40 || !config.has(VFIO_REGION_INFO_FLAG_READ) {
            return Err(region_err(
                VFIO_PCI_CONFIG_REGION_INDEX,
                "config space is not readable",
            ));
        }
        // 7. Register BAR (BAR0 unless `opts.register_bar` says otherwise) mmap.
        let bar0 = Arc::new(map_bar(&device, &bar0_info).map_err(|e| match e {
            MapBarError::Region(reason) => region_err(opts.register_bar, reason),
            MapBarError::Driver(e) => e,
        })?);
        let msix_count = if dinfo.num_irqs > VFIO_PCI_MSIX_IRQ_INDEX {
            ioctl::device_get_irq_info(&device, VFIO_PCI_MSIX_IRQ_INDEX)
                .map_err(ioctl_err("VFIO_DEVICE_GET_IRQ_INFO"))?
                .count
        } else {
            0
        };
        let dev = Self {
            addr: *addr,
            sysfs: info,
            device,
            flags: dinfo.flags,
            num_regions: dinfo.num_regions,
            num_irqs: dinfo.num_irqs,
            config,
            bar0_info,
            bar0,
            msix_count,
            msix_enabled: 0,
            huge_pages: opts.huge_pages,
            iova_mode: opts.iova_mode,
            bar_kind: opts.bar_kind,
            bus_master: opts.bus_master,
            iommu: Arc::new(IommuCtx {
                allocator: Mutex::new(allocator),
                min_pgsize,
                group,
                container,
            }),
        };
        // 8. Identity: config space must agree with sysfs and with what the caller wants.
        let vendor = dev.config_read16(PCI_VENDOR_ID)?;
        let device_id = dev.config_read16(PCI_DEVICE_ID)?;
        let (ev, ed) = opts
            .expected_ids
            .unwrap_or((dev.sysfs.vendor, dev.sysfs.device));
        if (vendor, device_id) != (ev, ed) {
            return Err(DriverError::IdMismatch {
                addr: addr.to_string(),
                vendor,
                device: device_id,
                expected_vendor: ev,
                expected_device: ed,
            });
        }
        // 9. Memory Space + Bus Master Enable (BME skipped only when a test asks).
        dev.enable_memory_and_bus_master()?;
        Ok(dev)
    }

    /// The device's PCI address.
    pub fn addr(&self) -> PciAddress {
        self.addr
    }

    /// The IOMMU group number.
    pub fn iommu_group(&self) -> u32 {
        self.iommu.group.id()
    }

    /// Number of VFIO regions.
    pub fn num_regions(&self) -> u32 {
        self.num_regions
    }

    /// Number of VFIO IRQ indexes.
    pub fn num_irqs(&self) -> u32 {
        self.num_irqs
    }

    /// Whether the device supports `VFIO_DEVICE_RESET`.
    pub fn supports_reset(&self) -> bool {
        self.flags & VFIO_DEVICE_FLAGS_RESET != 0
    }

    /// How many MSI-X vectors the device has.
    pub fn msix_vectors(&self) -> u32 {
        self.msix_count
    }

    /// How DMA buffers get their IOVA.
    pub fn iova_mode(&self) -> IovaMode {
        self.iova_mode
    }

    /// What the register BAR is made of.
    pub fn bar_kind(&self) -> BarKind {
        self.bar_kind
    }

    /// The register BAR's region info (BAR0 unless [`VfioOptions::register_bar`]).
    pub fn bar0_info(&self) -> RegionInfo {
        self.bar0_info
    }

    /// The config-space region info.
    pub fn config_info(&self) -> RegionInfo {
        self.config
    }

    /// The mapped register BAR (BAR0 unless [`VfioOptions::register_bar`]), shared (the mapping lives as long as any handle).
    pub fn bar0(&self) -> Arc<MmioRegion> {
        Arc::clone(&self.bar0)
    }

    /// The IOVA ranges DMA buffers are allocated from.
    pub fn iova_aperture(&self) -> Vec<IovaRange> {
        self.iommu.allocator().aperture().to_vec()
    }

    fn config_check(&self, offset: u16, write: bool) -> Result<u64> {
        let off = u64::from(offset);
        let bad = |msg: &'static str| DriverError::Config {
            offset: off,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, msg),
        };
        if offset % 2 != 0 {
            return Err(bad("offset not 2-byte aligned"));
        }
        if off + 2 > self.config.size {
            return Err(bad("offset beyond config space"));
        }
        if write && !self.config.has(VFIO_REGION_INFO_FLAG_WRITE) {
            return Err(bad("config region is read-only"));
        }
        self.config
            .offset
            .checked_add(off)
            .ok_or_else(|| bad("offset overflows"))
    }

    /// Reads a 16-bit config-space register (pread on the config region).
    pub fn config_read16(&self, offset: u16) -> Result<u16> {
        let at = self.config_check(offset, false)?;
        let mut b = [0u8; 2];
        self.device
            .read_exact_at(&mut b, at)
            .map_err(|source| DriverError::Config {
                offset: u64::from(offset),
                source,
            })?;
        // PCI config space is little-endian.
        Ok(u16::from_le_bytes(b))
    }

    /// Writes a 16-bit config-space register (pwrite on the config region; vfio-pci
    /// virtualizes or filters some fields).
    pub fn config_write16(&self, offset: u16, value: u16) -> Result<()> {
        let at = self.config_check(offset, true)?;
        self.device
            .write_all_at(&value.to_le_bytes(), at)
            .map_err(|source| DriverError::Config {
                offset: u64::from(offset),
                source,
            })
    }

    fn enable_memory_and_bus_master(&self) -> Result<()> {
        let cmd = self.config_read16(PCI_COMMAND)?;
        let master = if self.bus_master {
            PCI_COMMAND_MASTER
        } else {
            0
        };
        let want = cmd | PCI_COMMAND_MEMORY | master;
        if want != cmd {
            self.config_write16(PCI_COMMAND, want)?;
        }
        let back = self.config_read16(PCI_COMMAND)?;
        if self.bus_master && back & PCI_COMMAND_MASTER == 0 {
            return Err(DriverError::BusMasterNotEnabled {
                addr: self.addr.to_string(),
                command: back,
            });
        }
        Ok(())
    }

    /// Reads back the command register: is Bus Master Enable set?
    pub fn bus_master_enabled(&self) -> Result<bool> {
        Ok(self.config_read16(PCI_COMMAND)? & PCI_COMMAND_MASTER != 0)
    }

    /// Allocates at least `len` bytes of locked DMA memory and maps it in the IOMMU
    /// (read + write) at a fresh IOVA aligned to its page size, or, in
    /// [`IovaMode::PhysAddr`], at its physical address.
    pub fn dma_alloc(&self, len: usize) -> Result<DmaBuffer> {
        // Whole IOMMU pages: on hosts whose smallest IOMMU page is above 4 KiB.
        let pg = usize::try_from(self.iommu.min_pgsize).unwrap_or(4096);
        let len = len.checked_next_multiple_of(pg).unwrap_or(len);
        let mem = DmaMemory::alloc(len, self.huge_pages)?;
        let size = u64::try_from(mem.len()).map_err(|_| DriverError::IovaRequest {
            len: u64::MAX,
            align: 0,
        })?;
        if self.iova_mode == IovaMode::PhysAddr {
            return self.dma_map_phys(mem, size);
        }
        let align = u64::try_from(mem.page_size())
            .unwrap_or(4096)
            .max(self.iommu.min_pgsize);
        let range = self.iommu.allocator().alloc(size, align)?;
        if let Err(e) = self.map_dma(&mem, range.start, size) {
            let _ = self.iommu.allocator().free(range.start);
            return Err(e);
        }
        Ok(DmaBuffer {
            mem: ManuallyDrop::new(mem),
            iova: range.start,
            size,
            from_allocator: true,
            iommu: Arc::clone(&self.iommu),
        })
    }

    /// `VFIO_IOMMU_MAP_DMA` of all of `mem` at `iova`.
    fn map_dma(&self, mem: &DmaMemory, iova: Iova, size: u64) -> Result<()> {
        let vaddr = u64::try_from(mem.as_mut_ptr().addr()).unwrap_or(u64::MAX);
        // SAFETY: `mem` is owned by the `DmaBuffer` the caller builds on success (or is
        // dropped after a failed map, when nothing is mapped); that buffer unmaps the
        // IOVA range before `mem` is unmapped (and leaks `mem` if the unmap fails);
        // `DmaMemory` only ever accesses the memory through raw-pointer volatile
        // operations.
        unsafe { ioctl::iommu_map_dma(self.iommu.container.file(), vaddr, iova.raw(), size) }
            .map_err(|source| DriverError::DmaMap {
                iova,
                len: size,
                source,
            })
    }

    /// IOVA-as-PA: map `mem` at its physical address. Pinning (`MAP_DMA`) may migrate
    /// pages before pinning them (long-term pins leave movable zones), so the address
    /// is read again once pinned; if it moved, the buffer is mapped again at the new
    /// address, which can no longer change.
    fn dma_map_phys(&self, mem: DmaMemory, size: u64) -> Result<DmaBuffer> {
        let pa = pagemap::dma_memory_phys(&mem)?;
        self.check_in_aperture(pa, size)?;
        self.map_dma(&mem, pa, size)?;
        let mut iova = pa;
        let pinned = match pagemap::dma_memory_phys(&mem) {
            Ok(p) => p,
            Err(e) => {
                let _ = ioctl::iommu_unmap_dma(self.iommu.container.file(), pa.raw(), size);
                return Err(e);
            }
        };
        if pinned != pa {
            // The pages moved while being pinned: map again where they are now.
            let unmapped = ioctl::iommu_unmap_dma(self.iommu.container.file(), pa.raw(), size);
            if !unmapped.is_ok_and(|n| n == size) {
                // Cannot prove the device no longer reaches the memory: leak it.
                std::mem::forget(mem);
                return Err(DriverError::Pagemap {
                    vaddr: 0,
                    reason: "pages moved while pinned and the old mapping could not be removed",
                    source: None,
                });
            }
            self.check_in_aperture(pinned, size)?;
            self.map_dma(&mem, pinned, size)?;
            iova = pinned;
        }
        Ok(DmaBuffer {
            mem: ManuallyDrop::new(mem),
            iova,
            size,
            from_allocator: false,
            iommu: Arc::clone(&self.iommu),
        })
    }

    fn check_in_aperture(&self, iova: Iova, size: u64) -> Result<()> {
        let want = IovaRange::from_start_len(iova, size).ok_or(DriverError::IovaRequest {
            len: size,
            align: 0,
        })?;
        if self
            .iommu
            .allocator()
            .aperture()
            .iter()
            .any(|r| r.contains_range(&want))
        {
            Ok(())
        } else {
            Err(DriverError::Pagemap {
                vaddr: 0,
                reason: "physical address of the buffer is outside the IOMMU aperture",
                source: None,
            })
        }
    }

    /// Routes MSI-X vectors `0..n` to fresh eventfds, one per vector (vector `i` signals
    /// `result[i]`). Replaces any previous MSI-X setup. `n == 0` disables MSI-X.
    pub fn enable_msix(&mut self, n: u32) -> Result<Vec<EventFd>> {
        if n == 0 {
            self.disable_msix()?;
            return Ok(Vec::new());
        }
        if n > self.msix_count {
            return Err(DriverError::MsixVectors {
                addr: self.addr.to_string(),
                available: self.msix_count,
                requested: n,
            });
        }
        if self.msix_enabled != 0 {
            self.disable_msix()?;
        }
        let fds = (0..n).map(|_| EventFd::new()).collect::<Result<Vec<_>>>()?;
        let raw: Vec<_> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        ioctl::device_set_irqs(
            &self.device,
            &irq::irq_set_eventfds(VFIO_PCI_MSIX_IRQ_INDEX, &raw),
        )
        .map_err(ioctl_err("VFIO_DEVICE_SET_IRQS"))?;
        self.msix_enabled = n;
        Ok(fds)
    }

    /// Disables MSI-X (count 0, `DATA_NONE | ACTION_TRIGGER`).
    pub fn disable_msix(&mut self) -> Result<()> {
        ioctl::device_set_irqs(&self.device, &irq::irq_set_disable(VFIO_PCI_MSIX_IRQ_INDEX))
            .map_err(ioctl_err("VFIO_DEVICE_SET_IRQS"))?;
        self.msix_enabled = 0;
        Ok(())
    }

    /// Resets the device (`VFIO_DEVICE_RESET`: FLR, PM or bus reset as the kernel
    /// chooses), then makes sure Memory Space and Bus Master are enabled again.
    pub fn reset(&mut self) -> Result<()> {
        if !self.supports_reset() {
            return Err(DriverError::ResetUnsupported {
                addr: self.addr.to_string(),
            });
        }
        ioctl::device_reset(&self.device).map_err(ioctl_err("VFIO_DEVICE_RESET"))?;
        self.enable_memory_and_bus_master()
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        if self.msix_enabled != 0 {
            let _ = self.disable_msix();
        }
    }
}

/// The smallest page size in an IOMMU page-size bitmap, at least 4 KiB (also when the
/// kernel reported none).
fn min_page_size(pgsizes: u64) -> u64 {
    let lowest = pgsizes & pgsizes.wrapping_neg();
    lowest.max(4096)
}

fn ioctl_err(op: &'static str) -> impl FnOnce(std::io::Error) -> DriverError {
    move |source| DriverError::Ioctl { op, source }
}

fn region_info(device: &File, index: u32) -> Result<RegionInfo> {
    let r = ioctl::device_get_region_info(device, index)
        .map_err(ioctl_err("VFIO_DEVICE_GET_REGION_INFO"))?;
    Ok(RegionInfo {
        index,
        flags: r.flags,
        size: r.size,
        offset: r.offset,
    })
}

enum MapBarError {
    Region(&'static str),
    Driver(DriverError),
}

/// `mmap(MAP_SHARED)` of a BAR region on the device fd.
fn map_bar(device: &File, info: &RegionInfo) -> std::result::Result<MmioRegion, MapBarError> {
    if info.size == 0 {
        return Err(MapBarError::Region(
            "the register BAR is not implemented (size 0)",
        ));
    }
    if !info.has(VFIO_REGION_INFO_FLAG_MMAP) {
        return Err(MapBarError::Region(
            "the register BAR cannot be mmapped (I/O BAR, or not page-sized)",
        ));
    }
    if !info.has(VFIO_REGION_INFO_FLAG_READ) || !info.has(VFIO_REGION_INFO_FLAG_WRITE) {
        return Err(MapBarError::Region("the register BAR is not read/write"));
    }
    let len = usize::try_from(info.size)
        .map_err(|_| MapBarError::Region("the register BAR is too large"))?;
    let off = libc::off_t::try_from(info.offset)
        .map_err(|_| MapBarError::Region("the register BAR offset is too large"))?;
    // SAFETY: maps `len` bytes of the device fd at the region offset the kernel gave us;
    // the kernel picks the address, so no existing mapping is touched. The result is
    // checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            device.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(MapBarError::Driver(DriverError::Mmap {
            what: "register BAR",
            len,
            source: std::io::Error::last_os_error(),
        }));
    }
    // SAFETY: `p` is a fresh mapping of `len` bytes owned only by the returned region,
    // and nothing in this crate forms a reference to it.
    unsafe { MmioRegion::from_raw_mapping(p.cast(), len) }.map_err(MapBarError::Driver)
}

/// DMA memory mapped in the device's IOMMU at [`iova`](Self::iova). The device may
/// read and write it at any time; access it only through the volatile methods.
///
/// Dropping it unmaps the IOVA range, frees it for reuse, and then frees the memory. If
/// the unmap fails the memory is deliberately leaked (the device might still write it).
#[derive(Debug)]
pub struct DmaBuffer {
    mem: ManuallyDrop<DmaMemory>,
    iova: Iova,
    size: u64,
    /// The IOVA range came from the allocator (not [`IovaMode::PhysAddr`]).
    from_allocator: bool,
    iommu: Arc<IommuCtx>,
}

impl DmaBuffer {
    /// The IOVA of byte 0, to write into descriptors and registers.
    pub fn iova(&self) -> Iova {
        self.iova
    }

    /// The IOVA of byte `offset`, bounds-checked.
    pub fn iova_at(&self, offset: u64) -> Result<Iova> {
        if offset >= self.size {
            return Err(DriverError::OutOfBounds {
                offset: usize::try_from(offset).unwrap_or(usize::MAX),
                width: 1,
                len: self.mem.len(),
            });
        }
        self.iova.try_add(offset)
    }

    /// Length in bytes (rounded up to the page size).
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memory, for its volatile accessors (`read32`, `write64`, `read_bytes`, ...).
    pub fn memory(&self) -> &DmaMemory {
        &self.mem
    }

    /// Volatile 32-bit read at `offset`.
    pub fn read32(&self, offset: usize) -> Result<u32> {
        self.mem.read32(offset)
    }

    /// Volatile 32-bit write at `offset`.
    pub fn write32(&self, offset: usize, value: u32) -> Result<()> {
        self.mem.write32(offset, value)
    }

    /// Volatile 64-bit read at `offset`.
    pub fn read64(&self, offset: usize) -> Result<u64> {
        self.mem.read64(offset)
    }

    /// Volatile 64-bit write at `offset`.
    pub fn write64(&self, offset: usize, value: u64) -> Result<()> {
        self.mem.write64(offset, value)
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        let unmapped =
            ioctl::iommu_unmap_dma(self.iommu.container.file(), self.iova.raw(), self.size);
        if unmapped.is_ok_and(|n| n == self.size) {
            if self.from_allocator {
                let _ = self.iommu.allocator().free(self.iova);
            }
            // SAFETY: the IOMMU no longer maps the memory, so the device cannot reach
            // it; `mem` is not used again after this.
            unsafe { ManuallyDrop::drop(&mut self.mem) };
        }
        // Otherwise: leak both the IOVA range and the memory, as documented.
    }
}

#[cfg(test)]
mod tests {
    use super::sysfs::tests::FakeSysfs;
    use super::*;

    fn opts_for(f: &FakeSysfs, vfio_dir: PathBuf) -> VfioOptions {
        VfioOptions {
            sysfs_root: f.dir.path().to_path_buf(),
            vfio_dir,
            ..VfioOptions::default()
        }
    }

    #[test]
    fn open_without_vfio_says_load_vfio_pci() {
        // This machine has no /dev/vfio; on one that does, the fake dir below covers it.
        let addr = PciAddress::parse("0000:03:00.0").expect("addr");
        if !std::path::Path::new("/dev/vfio/vfio").exists() {
            let e = VfioDevice::open(&addr, &VfioOptions::default()).expect_err("no vfio");
            assert!(matches!(e, DriverError::VfioNotLoaded { .. }), "{e:?}");
            let msg = e.to_string();
            assert!(msg.contains("/dev/vfio/vfio"), "{msg}");
            assert!(msg.contains("modprobe vfio-pci"), "{msg}");
        }
        let empty = tempfile::tempdir().expect("tmp");
        let opts = VfioOptions {
            vfio_dir: empty.path().to_path_buf(),
            ..VfioOptions::default()
        };
        let e = VfioDevice::open(&addr, &opts).expect_err("no vfio");
        assert!(matches!(e, DriverError::VfioNotLoaded { .. }), "{e:?}");
    }

    #[test]
    fn open_checks_sysfs_before_the_group_node() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(7), Some("ixgbe"));
        let vfio = tempfile::tempdir().expect("tmp");
        std::fs::write(vfio.path().join("vfio"), b"").expect("fake container");
        let addr = PciAddress::parse("03:00.0").expect("addr");
        let e = VfioDevice::open(&addr, &opts_for(&f, vfio.path().to_path_buf()))
            .expect_err("wrong driver");
        assert!(matches!(e, DriverError::BoundToOtherDriver { .. }), "{e:?}");
    }

    #[test]
    fn open_reports_missing_group_node() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(7), Some("vfio-pci"));
        let vfio = tempfile::tempdir().expect("tmp");
        std::fs::write(vfio.path().join("vfio"), b"").expect("fake container");
        let addr = PciAddress::parse("0000:03:00.0").expect("addr");
        let e = VfioDevice::open(&addr, &opts_for(&f, vfio.path().to_path_buf()))
            .expect_err("no group node");
        assert!(
            matches!(e, DriverError::GroupNodeMissing { group: 7, .. }),
            "{e:?}"
        );
        // With the node present, the next step (a real container ioctl) is reached.
        std::fs::write(vfio.path().join("7"), b"").expect("fake group");
        let e = VfioDevice::open(&addr, &opts_for(&f, vfio.path().to_path_buf()))
            .expect_err("not a real container");
        assert!(
            matches!(
                e,
                DriverError::Ioctl {
                    op: "VFIO_GET_API_VERSION",
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn min_page_size_from_bitmap() {
        // Intel VT-d: 4K | 2M | 1G.
        assert_eq!(min_page_size(0x4020_1000), 4096);
        // 64K-granule SMMU.
        assert_eq!(min_page_size(0x2001_0000), 0x1_0000);
        assert_eq!(min_page_size(0), 4096);
        assert_eq!(min_page_size(0x200), 4096);
    }

    #[test]
    fn default_options_are_production() {
        let o = VfioOptions::default();
        assert_eq!(o.register_bar, 0);
        assert_eq!(o.iova_mode, IovaMode::Allocated);
        assert_eq!(o.bar_kind, BarKind::Device);
        assert!(o.bus_master);
    }

    #[test]
    fn command_register_bits() {
        assert_eq!(PCI_COMMAND, 0x04);
        assert_eq!(PCI_COMMAND_MEMORY, 0x2);
        assert_eq!(PCI_COMMAND_MASTER, 0x4);
    }
}
