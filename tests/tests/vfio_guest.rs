//! Hardware truth for the VFIO backend: the driver's guest test binary
//! (`src/bin/vfio_guest.rs`) runs inside a QEMU q35 guest with an emulated Intel IOMMU
//! against the real kernel VFIO ABI (Debian's vfio / vfio_iommu_type1 / vfio-pci), on
//! an `ivshmem-doorbell` function whose BAR2 is the register image of a
//! `ctoffload-nic-sim` process on this host, whose MSI-X vectors are that simulator's
//! interrupt eventfds, and whose DMA lands in guest RAM shared with the simulator
//! (IOVA = guest-physical address). See `docs/vfio.md`, "QEMU guest test".
//!
//! Runs as root; skips with a message otherwise. Under CI (`CI` set) a missing
//! prerequisite is a failure (`.ci/run` runs `tests/qemu/setup.sh`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ctoffload_driver::sim_process::SimFault;
use ctoffload_tests::qemu::proto::{COUNTED_SPORT, parse_line, tcp_frame};
use ctoffload_tests::qemu::{
    ChildGuard, GUEST_MEM_MIB, IvshmemServer, Packages, SimGuard, build_initramfs, line_reader,
    open_guest_ram, qemu_command, write_file,
};

/// Whole run, boot to result.
const RUN_TIMEOUT: Duration = Duration::from_secs(150);

fn skip_or_fail(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("vfio_guest: prerequisite missing under CI: {why}");
    }
    eprintln!("SKIPPED vfio_guest: {why}");
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `target/<profile>/` of this test binary (where cargo put `ctoffload-nic-sim`).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/vfio_guest-<hash>
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

fn sim_binary() -> Result<PathBuf, String> {
    let p = target_profile_dir().join("ctoffload-nic-sim");
    if p.exists() {
        return Ok(p);
    }
    // Not built by this cargo invocation (e.g. `cargo test -p ctoffload-tests`).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = std::process::Command::new(cargo)
        .args([
            "build",
            "-p",
            "ctoffload-nic-sim",
            "--bin",
            "ctoffload-nic-sim",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .map_err(|e| format!("cargo build nic-sim: {e}"))?;
    if st.success() && p.exists() {
        Ok(p)
    } else {
        Err(format!("{} not built", p.display()))
    }
}

#[test]
fn vfio_backend_in_qemu_guest() {
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIPPED vfio_guest: x86_64 only");
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED vfio_guest: needs root (VFIO modules, memfd from /proc/<qemu>/fd)");
        return;
    }
    let setup = Path::new(env!("CARGO_MANIFEST_DIR")).join("qemu/setup.sh");
    let pk = match Packages::ensure(&setup, &Packages::cache_dir()) {
        Ok(p) => p,
        Err(e) => return skip_or_fail(&e),
    };
    let sim_bin = match sim_binary() {
        Ok(p) => p,
        Err(e) => return skip_or_fail(&e),
    };
    let t_start = Instant::now();
    let tmp = tempfile::Builder::new()
        .prefix("ctoffload-qemu-")
        .tempdir()
        .expect("tempdir");

    let initrd = tmp.path().join("initramfs.cpio");
    let cpio =
        build_initramfs(&pk, Path::new(env!("CARGO_BIN_EXE_vfio_guest"))).expect("initramfs");
    write_file(&initrd, &cpio).expect("write initramfs");

    // The simulator: BAR0 memfd + 3 MSI-X eventfds, handed to QEMU as ivshmem server.
    let sim = SimGuard::start(&sim_bin, &tmp.path().join("sim.sock")).expect("simulator");
    let (info, bar, irqs) = sim.ctl.hello().expect("hello");
    assert_eq!(info.vectors, 3);
    let ivs_path = tmp.path().join("ivshmem.sock");
    let mut ivs = IvshmemServer::start(&ivs_path, bar, irqs, Duration::from_secs(30))
        .expect("ivshmem server");

    let mut cmd = qemu_command(&pk, &initrd, &ivs_path);
    let mut child = cmd.spawn().expect("spawn qemu");
    let out = child.stdout.take().expect("stdout");
    let err = child.stderr.take().expect("stderr");
    let mut qemu = ChildGuard::new(child, "qemu-system-x86_64");
    let lines = line_reader(out);
    let errs = line_reader(err);
    let mut log = Vec::new();
    let mut cto = Vec::new();
    let mut result = None;
    let run = (|| -> Result<(), String> {
        ivs.wait_served()?;
        // Guest RAM as the simulator's DMA memory: IOVA = guest-physical address.
        let ram = open_guest_ram(qemu.id(), Duration::from_secs(20))?;
        sim.ctl
            .dma_map(0, std::os::fd::AsFd::as_fd(&ram), 0, GUEST_MEM_MIB << 20)
            .map_err(|e| format!("map guest RAM at IOVA 0: {e}"))?;
        while result.is_none() && t_start.elapsed() < RUN_TIMEOUT {
            let Ok(l) = lines.recv_timeout(Duration::from_millis(200)) else {
                if let Some(st) = qemu.try_wait() {
                    return Err(format!("qemu exited early: {st}"));
                }
                continue;
            };
            log.push(l.trim_end().to_string());
            let Some((tag, text)) = parse_line(&l) else {
                continue;
            };
            cto.push(format!("{tag}|{text}"));
            match tag {
                "INJECT" => {
                    let n: usize = text.trim().parse().map_err(|_| "bad INJECT count")?;
                    let f = tcp_frame(COUNTED_SPORT);
                    let frames: Vec<&[u8]> = (0..n).map(|_| f.as_slice()).collect();
                    sim.ctl
                        .port_inject(0, &frames)
                        .map_err(|e| format!("port_inject: {e}"))?;
                }
                "FAULT" if text.trim() == "spontaneous_reset" => {
                    sim.ctl
                        .inject_fault(SimFault::SpontaneousReset)
                        .map_err(|e| format!("inject spontaneous reset: {e}"))?;
                }
                "RESULT" => result = Some(text.to_string()),
                _ => {}
            }
        }
        Ok(())
    })();
    qemu.finish(Duration::from_secs(5));
    while let Ok(l) = lines.try_recv() {
        log.push(l.trim_end().to_string());
    }
    while let Ok(l) = errs.try_recv() {
        log.push(format!("qemu stderr: {}", l.trim_end()));
    }
    let elapsed = t_start.elapsed();
    eprintln!("---- guest console ({elapsed:?}) ----");
    for l in &log {
        eprintln!("{l}");
    }
    if let Err(e) = run {
        panic!("harness: {e}");
    }
    let result =
        result.unwrap_or_else(|| panic!("no result from the guest within {RUN_TIMEOUT:?}"));
    assert_eq!(result, "PASS", "guest test failed");
    // The guest's own evidence, each item of the "done when".
    for tag in [
        "BIND",
        "BOUND",
        "BAR",
        "BME",
        "REGS",
        "DMA",
        "UP",
        "FLOWS",
        "IRQ",
        "COUNTERS",
        "RESET",
        "VFIO_RESET",
    ] {
        assert!(
            cto.iter().any(|l| l.starts_with(&format!("{tag}|"))),
            "guest printed no {tag} line"
        );
    }
    assert!(
        cto.iter()
            .any(|l| l.starts_with("BME_NEG|OK: no MSI-X without Bus Master")),
        "negative Bus Master case not observed"
    );
    assert!(
        cto.iter()
            .any(|l| l.starts_with("BOUND|") && l.contains("drivers/vfio-pci")),
        "device not bound to vfio-pci"
    );
    let sim_stats = sim.ctl.stats().expect("stats");
    eprintln!("simulator stats: {sim_stats:?}");
    drop(ivs);
    drop(sim);
}
