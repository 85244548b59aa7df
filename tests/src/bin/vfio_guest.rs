//! The guest half of the QEMU VFIO test (`tests/tests/vfio_guest.rs`, `docs/vfio.md`
//! "QEMU guest test"): runs as root inside a QEMU q35 guest with an emulated Intel
//! IOMMU, against an `ivshmem-doorbell` function bound to `vfio-pci`, whose BAR2 is the
//! register image of a `ctoffload-nic-sim` process on the host and whose 3 MSI-X vectors
//! are that simulator's interrupt eventfds.
//!
//! It uses the driver's VFIO backend unchanged (container, group, device, region info,
//! BAR mmap, `VFIO_IOMMU_MAP_DMA`, Bus Master, MSI-X eventfds, `VFIO_DEVICE_RESET`) and
//! its register engine (`Device` over `VfioIo`), and prints what it observed as
//! `CTO|tag|text` lines on the console (see `ctoffload_tests::qemu::proto`).
//!
//! Usage: `vfio_guest <pci-address>` (e.g. `0000:01:00.0`).
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use ctoffload_driver::device::{Clock, Device, DeviceConfig, DeviceEvent};
use ctoffload_driver::io::{DeviceIo, VfioIo};
use ctoffload_driver::mmio::HugePages;
use ctoffload_driver::vfio::{
    BarKind, EventFd, IovaMode, PCI_COMMAND, PCI_COMMAND_MASTER, PciAddress, VfioDevice,
    VfioOptions,
};
use ctoffload_hw_regs::regs;
use ctoffload_tests::qemu::proto::{
    BATCH, COUNTED_SPORT, FRAME_LEN, INJECT_FRAMES, IVSHMEM_IDS, PREFIX, insert,
};

/// How long an interrupt may take to arrive (TCG guest, host model polling).
const IRQ_WAIT: Duration = Duration::from_secs(10);
/// How long the negative case waits for an interrupt that must not come.
const NO_IRQ_WAIT: Duration = Duration::from_secs(2);
/// Command batches and dumps (the guest is emulated: generous).
const CMD_WAIT: Duration = Duration::from_secs(20);

type Res<T> = Result<T, String>;

fn say(tag: &str, text: &str) {
    println!("{PREFIX}{tag}|{text}");
}

fn err<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

fn opts(bus_master: bool) -> VfioOptions {
    VfioOptions {
        expected_ids: Some(IVSHMEM_IDS),
        huge_pages: HugePages::Require,
        register_bar: 2,
        iova_mode: IovaMode::PhysAddr,
        bar_kind: BarKind::SharedMemory,
        bus_master,
        ..VfioOptions::default()
    }
}

fn dev_config() -> DeviceConfig {
    DeviceConfig {
        cmd_ring_log2: 7,
        rx_ring_log2: 4,
        tx_ring_log2: 4,
        // The guest CPU is emulated (TCG) and the model polls from another process.
        cmd_timeout_ns: 10_000_000_000,
        ready_timeout: Duration::from_secs(20),
        enable_timeout: Duration::from_secs(20),
        use_flr: false,
        dump_chunk: 64,
        clock: Clock::monotonic(),
    }
}

/// Drains an eventfd (non-blocking).
fn drain(fd: &EventFd) -> Res<u64> {
    Ok(fd.read().map_err(err("eventfd read"))?.unwrap_or(0))
}

/// Waits up to `wait` for `fd` to be signalled; returns the count, or 0.
fn wait_irq(fd: &EventFd, wait: Duration) -> Res<u64> {
    let t0 = Instant::now();
    loop {
        let n = drain(fd)?;
        if n > 0 || t0.elapsed() >= wait {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn irq(dev: &Device<VfioIo>, v: u16) -> Res<&EventFd> {
    dev.io()
        .irq(v)
        .ok_or_else(|| format!("no eventfd for MSI-X vector {v}"))
}

fn insert_batch(dev: &mut Device<VfioIo>, from: u16, n: u16) -> Res<Vec<u32>> {
    let cmds: Vec<_> = (from..from + n).map(insert).collect();
    let res = dev.execute(&cmds, CMD_WAIT).map_err(err("execute"))?;
    let mut ids = Vec::new();
    for r in &res {
        if !r.is_ok() {
            return Err(format!("insert failed: {r:?}"));
        }
        ids.push(r.flow_id.map(|f| f.get()).ok_or("insert without flow id")?);
    }
    if ids.len() != usize::from(n) {
        return Err(format!("{} completions for {n} inserts", ids.len()));
    }
    Ok(ids)
}

/// Negative case: the driver is told not to set Bus Master. The rings still work (the
/// host model's DMA bypasses QEMU), but QEMU drops the MSI-X message of a device
/// without BME, exactly as PCI requires: no interrupt may arrive.
fn bus_master_negative(addr: &PciAddress) -> Res<()> {
    let vd = VfioDevice::open(addr, &opts(false)).map_err(err("open without BME"))?;
    let cmd = vd.config_read16(PCI_COMMAND).map_err(err("config read"))?;
    say(
        "BME_NEG",
        &format!("opened with bus_master=false: PCI_COMMAND={cmd:#06x}"),
    );
    if cmd & PCI_COMMAND_MASTER != 0 {
        return Err("Bus Master set although the driver was told not to".into());
    }
    let io = VfioIo::new(vd).map_err(err("VfioIo without BME"))?;
    let mut dev = Device::new(io, dev_config()).map_err(err("bring-up without BME"))?;
    let v0 = irq(&dev, 0)?;
    drain(v0)?;
    insert_batch(&mut dev, 1, 1)?;
    let n = wait_irq(irq(&dev, 0)?, NO_IRQ_WAIT)?;
    say(
        "BME_NEG",
        &format!("without Bus Master: CMD_CPL completed, MSI-X vector 0 eventfd count {n}"),
    );
    if n != 0 {
        return Err("an interrupt arrived although Bus Master was clear".into());
    }
    say(
        "BME_NEG",
        "OK: no MSI-X without Bus Master (the device is mute)",
    );
    let io = dev.shutdown().map_err(err("shutdown"))?;
    drop(io);
    Ok(())
}

fn run(addr: &PciAddress) -> Res<()> {
    bus_master_negative(addr)?;

    // Bring-up through the VFIO backend, as the driver does it.
    let vd = VfioDevice::open(addr, &opts(true)).map_err(err("VfioDevice::open"))?;
    let drv = std::fs::read_link(format!("/sys/bus/pci/devices/{addr}/driver"))
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    say(
        "BOUND",
        &format!(
            "{addr} driver={drv} iommu_group={} regions={} irqs={} msix_vectors={} reset={}",
            vd.iommu_group(),
            vd.num_regions(),
            vd.num_irqs(),
            vd.msix_vectors(),
            vd.supports_reset()
        ),
    );
    let bar = vd.bar0_info();
    say(
        "BAR",
        &format!(
            "register BAR = VFIO region {} size={:#x} flags={:#x} mmapped",
            bar.index, bar.size, bar.flags
        ),
    );
    let cmd = vd.config_read16(PCI_COMMAND).map_err(err("config read"))?;
    say(
        "BME",
        &format!(
            "PCI_COMMAND={cmd:#06x} bus_master={}",
            cmd & PCI_COMMAND_MASTER != 0
        ),
    );
    if cmd & PCI_COMMAND_MASTER == 0 {
        return Err("driver did not set Bus Master".into());
    }
    say("APERTURE", &format!("{:x?}", vd.iova_aperture()));
    let mut io = VfioIo::new(vd).map_err(err("VfioIo::new"))?;

    // Registers through the mmapped BAR.
    let magic = io.read32(regs::MAGIC).map_err(err("read MAGIC"))?;
    io.write32(regs::INT_MASK, 0x5)
        .map_err(err("write INT_MASK"))?;
    let back = io.read32(regs::INT_MASK).map_err(err("read INT_MASK"))?;
    say(
        "REGS",
        &format!("MAGIC={magic:#010x} INT_MASK write 0x5 read back {back:#x}"),
    );
    if magic != regs::MAGIC_VALUE || back != 0x5 {
        return Err("register read/write through the BAR failed".into());
    }

    // A DMA buffer: IOVA = guest-physical address, mapped with VFIO_IOMMU_MAP_DMA.
    let buf = io.dma_alloc(4096).map_err(err("dma_alloc"))?;
    say(
        "DMA",
        &format!(
            "dma_alloc: {} bytes at IOVA {:#x} (= guest PA, VFIO_IOMMU_MAP_DMA)",
            buf.len(),
            buf.iova().raw()
        ),
    );
    drop(buf);

    let mut dev = Device::new(io, dev_config()).map_err(err("Device::new"))?;
    let c = *dev.capabilities();
    say(
        "UP",
        &format!(
            "device up: spec {}.{} capacity={} reset_count={}",
            c.spec.major,
            c.spec.minor,
            c.flow_capacity,
            dev.saved_reset_count()
        ),
    );

    // A batch of flows through the CMD/CPL rings in DMA memory, and its interrupt.
    drain(irq(&dev, 0)?)?;
    let t0 = Instant::now();
    let ids = insert_batch(&mut dev, 1000, BATCH)?;
    say(
        "FLOWS",
        &format!(
            "{} inserts submitted in one batch, {} completions OK in {:?}",
            BATCH,
            ids.len(),
            t0.elapsed()
        ),
    );
    let n = wait_irq(irq(&dev, 0)?, IRQ_WAIT)?;
    say(
        "IRQ",
        &format!("MSI-X vector 0 (CMD_CPL) eventfd count {n}"),
    );
    if n == 0 {
        return Err("no completion interrupt".into());
    }
    let table = dev.dump_table().map_err(err("dump_table"))?;
    say("TABLE", &format!("table dump: {} entries", table.len()));
    if table.len() != usize::from(BATCH) {
        return Err("table dump does not show the batch".into());
    }

    // Counters: the host injects frames for one flow; a dump lands in DMA memory.
    let counted = ids[usize::from(COUNTED_SPORT - 1000)];
    say("INJECT", &INJECT_FRAMES.to_string());
    let t0 = Instant::now();
    let mut last = None;
    let mut samples = Vec::new();
    while t0.elapsed() < CMD_WAIT {
        samples.clear();
        dev.dump_all_counters(&mut samples)
            .map_err(err("dump_all_counters"))?;
        let s = samples.iter().find(|s| s.flow_id.get() == counted).copied();
        last = s;
        if s.is_some_and(|s| s.counters.packets >= INJECT_FRAMES) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let valid = samples.iter().filter(|s| s.valid).count();
    let s = last.ok_or("counted flow missing from the dump")?;
    say(
        "COUNTERS",
        &format!(
            "counter dump: {} records, {} valid; flow {} packets={} bytes={} last_hit={}",
            samples.len(),
            valid,
            counted,
            s.counters.packets,
            s.counters.bytes,
            s.counters.last_hit
        ),
    );
    let want_bytes = u64::from(INJECT_FRAMES) * u64::try_from(FRAME_LEN).unwrap_or(0);
    if s.counters.packets != INJECT_FRAMES || s.counters.bytes != want_bytes {
        return Err("counters did not count the injected frames".into());
    }

    // A device reset the driver did not ask for (the host injects a spontaneous reset
    // into the model): RESET_DONE on MSI-X vector 2, reported as a reset, recovered by
    // re-initialisation (device.md section 17.4).
    let before = dev.saved_reset_count();
    drain(irq(&dev, 2)?)?;
    say("FAULT", "spontaneous_reset");
    let n2 = wait_irq(irq(&dev, 2)?, CMD_WAIT)?;
    let mut ev = Vec::new();
    dev.check_health(&mut ev).map_err(err("check_health"))?;
    let up_before = dev.is_up();
    dev.reinit().map_err(err("reinit"))?;
    let after_table = dev.dump_table().map_err(err("dump_table"))?.len();
    let again = insert_batch(&mut dev, 1000, 4)?;
    say(
        "RESET",
        &format!(
            "device reset: RESET_DONE on MSI-X vector 2 eventfd count {n2}, events {ev:?}, up={up_before}; reinit: RESET_COUNT {before} -> {}, table {after_table} entries, re-insert {} OK",
            dev.saved_reset_count(),
            again.len()
        ),
    );
    let reported = ev
        .iter()
        .any(|e| matches!(e, DeviceEvent::Reset { count } if *count != before));
    if n2 == 0 || !reported || up_before || after_table != 0 || !dev.is_up() {
        return Err("device reset not signalled or not recovered".into());
    }

    // VFIO_DEVICE_RESET through the kernel (QEMU performs the PCI reset), then a fresh
    // bring-up; Bus Master and MSI-X must work again.
    let mut io = dev.shutdown().map_err(err("shutdown"))?;
    if io.device().supports_reset() {
        io.function_reset().map_err(err("VFIO_DEVICE_RESET"))?;
        let cmd = io
            .device()
            .config_read16(PCI_COMMAND)
            .map_err(err("config read"))?;
        let mut dev = Device::new(io, dev_config()).map_err(err("bring-up after FLR"))?;
        drain(irq(&dev, 0)?)?;
        let ids = insert_batch(&mut dev, 2000, 8)?;
        let n = wait_irq(irq(&dev, 0)?, IRQ_WAIT)?;
        say(
            "VFIO_RESET",
            &format!(
                "VFIO_DEVICE_RESET ok: PCI_COMMAND={cmd:#06x} after, bring-up again, {} inserts OK, MSI-X vector 0 count {n}",
                ids.len()
            ),
        );
        if cmd & PCI_COMMAND_MASTER == 0 || n == 0 {
            return Err("not recovered after VFIO_DEVICE_RESET".into());
        }
        dev.shutdown().map_err(err("shutdown"))?;
    } else {
        say("VFIO_RESET", "SKIPPED: device reports no VFIO_DEVICE_RESET");
    }
    Ok(())
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let result = PciAddress::parse(&arg)
        .map_err(|e| format!("bad PCI address {arg:?}: {e}"))
        .and_then(|a| run(&a));
    match result {
        Ok(()) => say("RESULT", "PASS"),
        Err(e) => say("RESULT", &format!("FAIL|{e}")),
    }
}
