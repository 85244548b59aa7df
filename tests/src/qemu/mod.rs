//! The QEMU guest test of the VFIO backend (`tests/tests/vfio_guest.rs`; what it proves
//! is in `docs/vfio.md`, "QEMU guest test").
//!
//! The pieces, each cleaned up by `Drop` (also on panic):
//!
//! - [`Packages`]: QEMU 7.2, SeaBIOS, a Debian kernel and busybox, unpacked in a cache
//!   folder by `tests/qemu/setup.sh` (never installed system-wide).
//! - [`Initramfs`]: a newc cpio with busybox, the VFIO modules, the guest test binary
//!   and the shared libraries it needs, and an `/init` that binds the ivshmem function
//!   to `vfio-pci` and runs the binary.
//! - [`SimGuard`]: the `ctoffload-nic-sim` process, whose BAR0 memfd and interrupt
//!   eventfds the harness hands to QEMU.
//! - [`IvshmemServer`]: the host side of QEMU's ivshmem server protocol
//!   (`docs/specs/ivshmem-spec.rst` in QEMU), so that `ivshmem-doorbell`'s BAR2 is the
//!   simulator's register image and its MSI-X vectors 0..3 are the simulator's
//!   eventfds.
//! - [`QemuGuard`]: the QEMU process (TCG, q35, intel-iommu), its console as lines.

pub mod proto;

use std::fs::File;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

/// Guest RAM size in MiB (all of it below 4 GiB on q35, identity-mapped from 0).
pub const GUEST_MEM_MIB: u64 = 512;
/// The kernel modules the guest loads, in order.
pub const MODULES: [&str; 6] = [
    "virt/lib/irqbypass.ko",
    "drivers/vfio/vfio_virqfd.ko",
    "drivers/vfio/vfio.ko",
    "drivers/vfio/vfio_iommu_type1.ko",
    "drivers/vfio/pci/vfio-pci-core.ko",
    "drivers/vfio/pci/vfio-pci.ko",
];

/// The unpacked packages.
#[derive(Debug, Clone)]
pub struct Packages {
    /// The cache folder.
    pub cache: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// Firmware folders for `-L`.
    pub firmware: Vec<PathBuf>,
    /// The kernel image.
    pub kernel: PathBuf,
    /// `lib/modules/<version>/kernel`.
    pub modules: PathBuf,
    /// Static busybox.
    pub busybox: PathBuf,
}

impl Packages {
    /// The cache folder: `$CTOFFLOAD_QEMU_CACHE`, else `~/.cache/ctoffload-qemu`.
    pub fn cache_dir() -> PathBuf {
        if let Some(p) = std::env::var_os("CTOFFLOAD_QEMU_CACHE") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/ctoffload-qemu")
    }

    /// Finds the packages in `cache`, without fetching.
    pub fn find(cache: &Path) -> Result<Self, String> {
        let root = cache.join("root");
        let qemu = root.join("usr/bin/qemu-system-x86_64");
        let busybox = root.join("bin/busybox");
        let boot = root.join("boot");
        let kernel = std::fs::read_dir(&boot)
            .map_err(|e| format!("{}: {e}", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
            .ok_or_else(|| format!("no vmlinuz-* in {}", boot.display()))?;
        let version = kernel
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_start_matches("vmlinuz-")
                    .to_string()
            })
            .unwrap_or_default();
        let modules = root.join("lib/modules").join(&version).join("kernel");
        for p in [&qemu, &busybox, &modules] {
            if !p.exists() {
                return Err(format!("missing {}", p.display()));
            }
        }
        for m in MODULES {
            if !modules.join(m).exists() {
                return Err(format!("missing module {m} in {}", modules.display()));
            }
        }
        let out = Command::new(&qemu)
            .arg("--version")
            .output()
            .map_err(|e| format!("{}: {e}", qemu.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} --version fails (missing libraries? run tests/qemu/setup.sh): {}",
                qemu.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self {
            cache: cache.to_path_buf(),
            qemu,
            firmware: vec![root.join("usr/share/qemu"), root.join("usr/share/seabios")],
            kernel,
            modules,
            busybox,
        })
    }

    /// Runs `setup` (tests/qemu/setup.sh) for `cache` unless the packages are there,
    /// then finds them.
    pub fn ensure(setup: &Path, cache: &Path) -> Result<Self, String> {
        if let Ok(p) = Self::find(cache) {
            return Ok(p);
        }
        let st = Command::new("bash")
            .arg(setup)
            .arg(cache)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("{}: {e}", setup.display()))?;
        if !st.success() {
            return Err(format!("{} failed: {st}", setup.display()));
        }
        Self::find(cache)
    }
}

/// A newc ("070701") cpio archive being written, as the kernel unpacks an initramfs.
#[derive(Debug, Default)]
pub struct Initramfs {
    buf: Vec<u8>,
    ino: u32,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let name = name.trim_start_matches('/');
        let namesize = name.len() + 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            u32::try_from(data.len()).unwrap_or(u32::MAX),
            0,
            0,
            rdev.0,
            rdev.1,
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0,
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[], (0, 0));
    }

    /// A regular file with `mode` permission bits.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, data, (0, 0));
    }

    /// A character device node.
    pub fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, &[], (major, minor));
    }

    /// Copies the host file `src` (and the parent folders of `name`).
    pub fn copy(&mut self, name: &str, src: &Path, perm: u32) -> Result<(), String> {
        let data = std::fs::read(src).map_err(|e| format!("{}: {e}", src.display()))?;
        let mut at = String::new();
        let parts: Vec<&str> = name.trim_start_matches('/').split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            at.push('/');
            at.push_str(p);
            self.dir(&at);
        }
        self.file(name, perm, &data);
        Ok(())
    }

    /// The finished archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        self.buf
    }
}

/// The guest's `/init`: mounts, loads the VFIO modules, binds the first ivshmem
/// function to `vfio-pci` with `driver_override`, runs the test binary, powers off.
pub const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t hugetlbfs none /dev/hugepages 2>/dev/null || { mkdir -p /dev/hugepages; mount -t hugetlbfs none /dev/hugepages; }
fail() { echo "CTO|RESULT|FAIL|$*"; dmesg | grep -i -e vfio -e dmar -e iommu | tail -n 20; poweroff -f; }
for m in MODULE_LIST; do
  insmod /lib/modules/$m.ko || fail "insmod $m"
done
echo "CTO|BOOT|kernel $(uname -r), modules loaded, $(grep HugePages_Total /proc/meminfo)"
dev=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x1110 ]; then dev=$(basename $d); break; fi
done
[ -n "$dev" ] || fail "no ivshmem function"
[ -e /sys/bus/pci/devices/$dev/iommu_group ] || fail "no IOMMU group for $dev (IOMMU off?)"
echo vfio-pci > /sys/bus/pci/devices/$dev/driver_override
[ -e /sys/bus/pci/devices/$dev/driver ] && echo $dev > /sys/bus/pci/devices/$dev/driver/unbind
echo $dev > /sys/bus/pci/drivers_probe
group=$(basename $(readlink /sys/bus/pci/devices/$dev/iommu_group))
echo "CTO|BIND|$dev -> $(basename $(readlink /sys/bus/pci/devices/$dev/driver)), iommu group $group, /dev/vfio: $(ls /dev/vfio | tr '\n' ' ')"
/vfio_guest $dev
dmesg | grep -i -e "vfio" -e "DMAR: Intel" -e "remapping" | tail -n 8
poweroff -f
"#;

/// Builds the initramfs: busybox, modules, `/init`, the guest binary at `/vfio_guest`
/// and the shared libraries `ldd` lists for it (so a normal, dynamically linked test
/// build works; a static one needs none).
pub fn build_initramfs(pk: &Packages, guest_bin: &Path) -> Result<Vec<u8>, String> {
    let mut a = Initramfs::new();
    for d in [
        "/bin",
        "/dev",
        "/proc",
        "/sys",
        "/tmp",
        "/lib",
        "/lib/modules",
    ] {
        a.dir(d);
    }
    a.chardev("/dev/console", 5, 1);
    a.chardev("/dev/null", 1, 3);
    a.copy("/bin/busybox", &pk.busybox, 0o755)?;
    let names: Vec<String> = MODULES
        .iter()
        .map(|m| {
            let f = m.rsplit('/').next().unwrap_or(m);
            f.trim_end_matches(".ko").to_string()
        })
        .collect();
    for (m, n) in MODULES.iter().zip(&names) {
        a.copy(&format!("/lib/modules/{n}.ko"), &pk.modules.join(m), 0o644)?;
    }
    a.file(
        "/init",
        0o755,
        INIT_SCRIPT
            .replace("MODULE_LIST", &names.join(" "))
            .as_bytes(),
    );
    a.copy("/vfio_guest", guest_bin, 0o755)?;
    for lib in shared_libs(guest_bin)? {
        let name = lib.display().to_string();
        a.copy(&name, &lib, 0o755)?;
    }
    Ok(a.finish())
}

/// The shared libraries of `bin` (absolute paths from `ldd`), none for a static binary.
fn shared_libs(bin: &Path) -> Result<Vec<PathBuf>, String> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .map_err(|e| format!("ldd: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux... (0x..)"
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            let p = PathBuf::from(p);
            // The guest needs both the name ldd prints and the file it resolves to.
            libs.push(p);
        }
    }
    Ok(libs)
}

/// Kills a child process on drop (SIGKILL, then reaps it).
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    what: &'static str,
}

impl ChildGuard {
    /// Guards `child`.
    pub fn new(child: Child, what: &'static str) -> Self {
        Self {
            child: Some(child),
            what,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it has exited (and how).
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for it to exit by itself; kills it otherwise.
    pub fn finish(&mut self, timeout: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.try_wait().is_some() {
                self.child = None;
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if c.try_wait().ok().flatten().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.child.is_some() {
            eprintln!("qemu harness: stopping {} (pid {})", self.what, self.id());
        }
        self.kill();
    }
}

/// Lines of a child's stdout, read by a thread.
pub fn line_reader(out: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if tx.send(String::from_utf8_lossy(&buf).into_owned()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// The host side of QEMU's ivshmem server protocol for one client (QEMU's
/// `ivshmem-doorbell`): on connect it sends, as 8-byte little-endian messages, the
/// protocol version 0, the client's peer id, `-1` with the shared-memory fd, and then
/// the client's own id once per interrupt vector, each with that vector's eventfd.
/// QEMU raises MSI-X vector `i` whenever eventfd `i` is signalled, so handing it the
/// simulator's eventfds makes the simulator's interrupts the guest's MSI-X messages.
#[derive(Debug)]
pub struct IvshmemServer {
    path: PathBuf,
    thread: Option<JoinHandle<Result<UnixStream, String>>>,
    conn: Option<UnixStream>,
}

/// The peer id the guest's QEMU gets.
const IVSHMEM_PEER_ID: i64 = 1;

impl IvshmemServer {
    /// Listens on `path` and serves one client in a thread (until `timeout`).
    pub fn start(
        path: &Path,
        shm: OwnedFd,
        vectors: Vec<OwnedFd>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let listener =
            UnixListener::bind(path).map_err(|e| format!("bind {}: {e}", path.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("nonblocking: {e}"))?;
        let thread = std::thread::Builder::new()
            .name("ivshmem-server".into())
            .spawn(move || {
                let t0 = Instant::now();
                let stream = loop {
                    match listener.accept() {
                        Ok((s, _)) => break s,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            if t0.elapsed() > timeout {
                                return Err("QEMU never connected to the ivshmem socket".into());
                            }
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => return Err(format!("accept: {e}")),
                    }
                };
                stream
                    .set_nonblocking(false)
                    .map_err(|e| format!("blocking: {e}"))?;
                send_msg(&stream, 0, None)?;
                send_msg(&stream, IVSHMEM_PEER_ID, None)?;
                send_msg(&stream, -1, Some(shm.as_fd()))?;
                for v in &vectors {
                    send_msg(&stream, IVSHMEM_PEER_ID, Some(v.as_fd()))?;
                }
                Ok(stream)
            })
            .map_err(|e| format!("spawn: {e}"))?;
        Ok(Self {
            path: path.to_path_buf(),
            thread: Some(thread),
            conn: None,
        })
    }

    /// Waits for the set-up messages to have been sent (the connection stays open).
    pub fn wait_served(&mut self) -> Result<(), String> {
        if let Some(t) = self.thread.take() {
            let s = t.join().map_err(|_| "ivshmem server thread panicked")??;
            self.conn = Some(s);
        }
        Ok(())
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        drop(self.conn.take());
        let _ = std::fs::remove_file(&self.path);
    }
}

fn send_msg(s: &UnixStream, value: i64, fd: Option<BorrowedFd<'_>>) -> Result<(), String> {
    let bytes = value.to_le_bytes();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err("no room for SCM_RIGHTS".into());
        }
    }
    let n = rustix::net::sendmsg(
        s,
        &[IoSlice::new(&bytes)],
        &mut control,
        SendFlags::NOSIGNAL,
    )
    .map_err(|e| format!("ivshmem sendmsg: {e}"))?;
    if n != bytes.len() {
        return Err("ivshmem sendmsg: short write".into());
    }
    Ok(())
}

/// Opens QEMU's guest-RAM memfd (`memory-backend-memfd`) through `/proc/<pid>/fd`,
/// waiting up to `timeout` for QEMU to create it.
pub fn open_guest_ram(qemu_pid: u32, timeout: Duration) -> Result<File, String> {
    let dir = PathBuf::from(format!("/proc/{qemu_pid}/fd"));
    let t0 = Instant::now();
    loop {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                if target
                    .to_string_lossy()
                    .starts_with("/memfd:memory-backend-memfd")
                {
                    return File::options()
                        .read(true)
                        .write(true)
                        .open(e.path())
                        .map_err(|err| format!("open {}: {err}", e.path().display()));
                }
            }
        }
        if t0.elapsed() > timeout {
            return Err(format!("no guest-RAM memfd in {}", dir.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The QEMU command line for the test: TCG, q35 with an emulated Intel IOMMU
/// (interrupt remapping on), guest RAM as a shared memfd, and an `ivshmem-doorbell`
/// function with 3 MSI-X vectors behind a PCIe root port (so that a secondary-bus
/// reset can serve `VFIO_DEVICE_RESET`).
pub fn qemu_command(pk: &Packages, initrd: &Path, ivshmem_sock: &Path) -> Command {
    let mut c = Command::new(&pk.qemu);
    for f in &pk.firmware {
        c.arg("-L").arg(f);
    }
    c.args([
        "-accel",
        "tcg",
        "-smp",
        "1",
        "-m",
        &format!("{GUEST_MEM_MIB}M"),
    ])
    .arg("-object")
    .arg(format!(
        "memory-backend-memfd,id=mem,size={GUEST_MEM_MIB}M,share=on"
    ))
    .args(["-machine", "q35,memory-backend=mem"])
    .args(["-device", "intel-iommu,intremap=on"])
    .args([
        "-device",
        "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
    ])
    .arg("-chardev")
    .arg(format!("socket,id=ivs,path={}", ivshmem_sock.display()))
    .args(["-device", "ivshmem-doorbell,chardev=ivs,vectors=3,bus=rp1"])
    .args(["-display", "none", "-vga", "none", "-nic", "none"])
    .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
    .arg("-kernel")
    .arg(&pk.kernel)
    .arg("-initrd")
    .arg(initrd)
    .args([
        "-append",
        "console=ttyS0 intel_iommu=on hugepages=32 panic=-1 loglevel=4 rdinit=/init",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    c
}

/// Writes `data` to `path` (for the initramfs).
pub fn write_file(path: &Path, data: &[u8]) -> Result<(), String> {
    let mut f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(data)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The `ctoffload-nic-sim` process (killed on drop) and a control connection to it.
#[derive(Debug)]
pub struct SimGuard {
    /// The control client.
    pub ctl: ctoffload_driver::sim_process::SimProcess,
    child: ChildGuard,
    socket: PathBuf,
}

impl SimGuard {
    /// Starts `bin` on `socket` with a small table (128 flows) and in-memory ports 0
    /// and 1, and connects.
    pub fn start(bin: &Path, socket: &Path) -> Result<Self, String> {
        let mut child = Command::new(bin)
            .arg("--socket")
            .arg(socket)
            .args(["--buckets-log2", "4", "--flow-limit", "128"])
            .args(["--port", "0=mem", "--port", "1=mem"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let out = child.stdout.take();
        let child = ChildGuard::new(child, "ctoffload-nic-sim");
        let lines = line_reader(out.ok_or("no simulator stdout")?);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(l) if l.starts_with("listening on") => break,
                Ok(_) => {}
                Err(_) => return Err("ctoffload-nic-sim did not start listening".into()),
            }
        }
        let ctl =
            ctoffload_driver::sim_process::SimProcess::connect(socket, Duration::from_secs(5))
                .map_err(|e| format!("connect to the simulator: {e}"))?;
        Ok(Self {
            ctl,
            child,
            socket: socket.to_path_buf(),
        })
    }
}

impl Drop for SimGuard {
    fn drop(&mut self) {
        let _ = self.ctl.shutdown();
        self.child.finish(Duration::from_secs(2));
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[cfg(test)]
mod tests {
    use super::proto::{FRAME_LEN, parse_line, tcp_frame};
    use super::*;

    fn field(entry: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&entry[6 + 8 * i..14 + 8 * i]).expect("hex");
        u32::from_str_radix(s, 16).expect("hex")
    }

    #[test]
    fn newc_archive_layout() {
        let mut a = Initramfs::new();
        a.dir("/bin");
        a.file("/init", 0o755, b"#!x\n");
        a.chardev("/dev/console", 5, 1);
        let buf = a.finish();
        assert_eq!(buf.len() % 4, 0);
        // First entry: directory "bin" (leading slash dropped), 110-byte header.
        assert_eq!(&buf[..6], b"070701");
        assert_eq!(field(&buf, 1), 0o040_755);
        assert_eq!(field(&buf, 11), 4, "namesize includes the NUL");
        assert_eq!(&buf[110..113], b"bin");
        // Second entry starts 4-aligned after "bin\0" (110 + 4 = 114 -> 116).
        let e2 = &buf[116..];
        assert_eq!(&e2[..6], b"070701");
        assert_eq!(field(e2, 1), 0o100_755);
        assert_eq!(field(e2, 6), 4, "file size");
        let name_end = 110 + 5;
        assert_eq!(&e2[110..name_end - 1], b"init");
        let data_at = name_end.next_multiple_of(4);
        assert_eq!(&e2[data_at..data_at + 4], b"#!x\n");
        // The device node carries its rdev, and the archive ends with the trailer.
        let e3 = &e2[data_at + 4..];
        assert_eq!(field(e3, 1), 0o020_600);
        assert_eq!((field(e3, 9), field(e3, 10)), (5, 1));
        let tail = String::from_utf8_lossy(&buf[buf.len() - 16..]).into_owned();
        assert!(tail.contains("TRAILER!!!"), "{tail}");
    }

    #[test]
    fn init_script_loads_every_module_and_binds_with_driver_override() {
        assert!(INIT_SCRIPT.contains("MODULE_LIST"));
        assert!(INIT_SCRIPT.contains("driver_override"));
        assert!(INIT_SCRIPT.contains("drivers_probe"));
        assert!(INIT_SCRIPT.contains("/vfio_guest $dev"));
    }

    #[test]
    fn console_lines_parse() {
        assert_eq!(parse_line("CTO|RESULT|PASS\r\n"), Some(("RESULT", "PASS")));
        assert_eq!(
            parse_line("[  1.2] CTO|RESULT|FAIL|no irq"),
            Some(("RESULT", "FAIL|no irq"))
        );
        assert_eq!(parse_line("CTO|INJECT|3"), Some(("INJECT", "3")));
        assert_eq!(parse_line("random kernel line"), None);
    }

    #[test]
    fn injected_frame_is_valid_ipv4() {
        let f = tcp_frame(1007);
        assert_eq!(f.len(), FRAME_LEN);
        let ip = &f[14..34];
        let mut sum = 0u32;
        for c in ip.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while sum > 0xFFFF {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        assert_eq!(sum, 0xFFFF, "header checksum verifies");
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 1007);
    }

    #[test]
    fn qemu_command_line_has_the_pieces_the_test_relies_on() {
        let pk = Packages {
            cache: PathBuf::from("/c"),
            qemu: PathBuf::from("/c/qemu"),
            firmware: vec![PathBuf::from("/c/fw")],
            kernel: PathBuf::from("/c/vmlinuz"),
            modules: PathBuf::from("/c/mods"),
            busybox: PathBuf::from("/c/busybox"),
        };
        let c = qemu_command(&pk, Path::new("/t/initrd"), Path::new("/t/ivs.sock"));
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        for want in [
            "-accel tcg",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "q35,memory-backend=mem",
            "intel-iommu,intremap=on",
            "ivshmem-doorbell,chardev=ivs,vectors=3,bus=rp1",
            "socket,id=ivs,path=/t/ivs.sock",
            "intel_iommu=on",
        ] {
            assert!(line.contains(want), "{want} missing from {line}");
        }
    }
}
