//! The driver crate's one error type.
//!
//! Every variant carries the context a user needs (the PCI address, the path, the IOVA)
//! in fields, keeps the underlying cause in `#[source]` (never repeated in the message),
//! and says in its message what to do about it. Other layers of the driver add their
//! own variants here.

use std::io;
use std::path::PathBuf;

use crate::iova::Iova;

/// A device that shares an IOMMU group with the device being opened.
///
/// Used to name the devices that make a group non-viable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// PCI address as sysfs spells it (`0000:03:00.1`).
    pub addr: String,
    /// The driver the device is bound to, `None` when unbound.
    pub driver: Option<String>,
}

fn list_members(members: &[GroupMember]) -> String {
    let mut out = String::new();
    for (i, m) in members.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        out.push_str(&m.addr);
        out.push_str(" (bound to ");
        out.push_str(m.driver.as_deref().unwrap_or("no driver"));
        out.push(')');
    }
    out
}

/// Everything that can go wrong in the driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The PCI address string does not parse.
    #[error(
        "invalid PCI address {input:?}: bad {part} ({reason}); expected DDDD:BB:DD.F or BB:DD.F, e.g. 0000:03:00.0"
    )]
    InvalidPciAddress {
        /// What the user gave.
        input: String,
        /// Which part is wrong: `domain`, `bus`, `device`, `function` or `format`.
        part: &'static str,
        /// Why it is wrong.
        reason: &'static str,
    },

    /// No such PCI device in sysfs.
    #[error(
        "PCI device {addr} not found ({path} does not exist); check the address with `lspci -D`"
    )]
    DeviceNotFound {
        /// The device.
        addr: String,
        /// The sysfs directory that was looked for.
        path: PathBuf,
    },

    /// The device has no IOMMU group: the IOMMU is off.
    #[error(
        "PCI device {addr} has no IOMMU group ({path} missing): the IOMMU is disabled; enable VT-d/AMD-Vi in the BIOS and boot with intel_iommu=on iommu=pt (Intel) or amd_iommu=on (AMD)"
    )]
    NoIommuGroup {
        /// The device.
        addr: String,
        /// The missing `iommu_group` link.
        path: PathBuf,
    },

    /// The device is bound to a host driver instead of vfio-pci.
    #[error(
        "PCI device {addr} is bound to driver {driver:?}, not vfio-pci; rebind it: `modprobe vfio-pci; echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override; echo {addr} > /sys/bus/pci/devices/{addr}/driver/unbind; echo {addr} > /sys/bus/pci/drivers_probe`"
    )]
    BoundToOtherDriver {
        /// The device.
        addr: String,
        /// The driver it is bound to.
        driver: String,
    },

    /// The device is bound to no driver at all.
    #[error(
        "PCI device {addr} is not bound to any driver; bind it to vfio-pci: `modprobe vfio-pci; echo vfio-pci > /sys/bus/pci/devices/{addr}/driver_override; echo {addr} > /sys/bus/pci/drivers_probe`"
    )]
    NotBound {
        /// The device.
        addr: String,
    },

    /// A sysfs file or link could not be read.
    #[error("cannot read {path}")]
    Sysfs {
        /// The file or link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// A sysfs file had content that does not parse.
    #[error("unexpected content in {path}: {content:?}")]
    SysfsParse {
        /// The file or link.
        path: PathBuf,
        /// What was read.
        content: String,
    },

    /// `/dev/vfio/vfio` does not exist.
    #[error(
        "no {path}: the VFIO driver is not loaded; run `modprobe vfio-pci` (and check the kernel has CONFIG_VFIO)"
    )]
    VfioNotLoaded {
        /// The container node that was looked for.
        path: PathBuf,
    },

    /// `/dev/vfio/<group>` does not exist.
    #[error(
        "no {path} for IOMMU group {group}: vfio-pci is not loaded or the device is not bound to it; run `modprobe vfio-pci` and bind the device (see docs/vfio.md)"
    )]
    GroupNodeMissing {
        /// The IOMMU group.
        group: u32,
        /// The group node.
        path: PathBuf,
    },

    /// Opening a VFIO node was refused.
    #[error(
        "permission denied opening {path}: run as root, or give your user the group node (`chown $USER {path}`) and a large enough locked-memory limit (`ulimit -l`)"
    )]
    PermissionDenied {
        /// The node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The group node is already open elsewhere.
    #[error(
        "{path} is busy: another process (QEMU, DPDK, another agent) holds IOMMU group {group}; stop it first"
    )]
    GroupBusy {
        /// The IOMMU group.
        group: u32,
        /// The group node.
        path: PathBuf,
    },

    /// Any other failure to open a node.
    #[error("cannot open {path}")]
    Open {
        /// The node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The IOMMU group holds devices bound to host drivers.
    #[error(
        "IOMMU group {group} is not viable: every device in it must be bound to vfio-pci (or pci-stub, or unbound); offenders: {}; rebind or unbind them, or move the card to a slot with its own group",
        list_members(.offenders)
    )]
    GroupNotViable {
        /// The IOMMU group.
        group: u32,
        /// Devices in the group bound to host drivers (may be empty when the kernel
        /// reports non-viable but sysfs shows no culprit).
        offenders: Vec<GroupMember>,
    },

    /// The kernel speaks another VFIO API.
    #[error("VFIO API version {got} from /dev/vfio/vfio, expected 0; the kernel is unsupported")]
    ApiVersion {
        /// What `VFIO_GET_API_VERSION` returned.
        got: i32,
    },

    /// Neither type-1 IOMMU backend is available.
    #[error(
        "the VFIO container supports neither VFIO_TYPE1v2_IOMMU nor VFIO_TYPE1_IOMMU; load vfio_iommu_type1"
    )]
    NoType1Iommu,

    /// A VFIO ioctl failed.
    #[error("{op} failed")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// The VFIO device is not a PCI device.
    #[error("VFIO device {addr} is not a PCI device (VFIO_DEVICE_FLAGS_PCI not set)")]
    NotPci {
        /// The device.
        addr: String,
    },

    /// A region the driver needs is absent or unusable.
    #[error("region {index} of {addr} is unusable: {reason}")]
    Region {
        /// The device.
        addr: String,
        /// VFIO region index.
        index: u32,
        /// Why.
        reason: &'static str,
    },

    /// mmap of a device region or of DMA memory failed.
    #[error("mmap of {len} bytes for {what} failed")]
    Mmap {
        /// What was being mapped.
        what: &'static str,
        /// Requested length.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// The device IDs in config space are not the expected ones.
    #[error(
        "PCI device {addr} is {vendor:04x}:{device:04x}, expected {expected_vendor:04x}:{expected_device:04x}; wrong address?"
    )]
    IdMismatch {
        /// The device.
        addr: String,
        /// Vendor ID read.
        vendor: u16,
        /// Device ID read.
        device: u16,
        /// Vendor ID expected.
        expected_vendor: u16,
        /// Device ID expected.
        expected_device: u16,
    },

    /// A config-space access failed or was out of range.
    #[error("PCI config space access at offset {offset:#x} failed")]
    Config {
        /// Offset in config space.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Bus Master Enable did not stick.
    #[error(
        "Bus Master Enable did not stick on {addr} (command register {command:#06x}); DMA and MSI-X would fail silently"
    )]
    BusMasterNotEnabled {
        /// The device.
        addr: String,
        /// The command register read back.
        command: u16,
    },

    /// An MMIO or DMA access past the end of the region.
    #[error("access of {width} bytes at offset {offset:#x} is outside the {len:#x}-byte region")]
    OutOfBounds {
        /// Offset of the access.
        offset: usize,
        /// Width of the access in bytes.
        width: usize,
        /// Region length.
        len: usize,
    },

    /// An MMIO or DMA access not aligned to its width.
    #[error("access of {width} bytes at offset {offset:#x} is not {width}-byte aligned")]
    Misaligned {
        /// Offset of the access.
        offset: usize,
        /// Width of the access in bytes.
        width: usize,
    },

    /// A region handed to the MMIO module is unusable.
    #[error("cannot use mapping of {len} bytes at {addr:#x} as a device region: {reason}")]
    BadMapping {
        /// Start address.
        addr: usize,
        /// Length.
        len: usize,
        /// Why.
        reason: &'static str,
    },

    /// Locking DMA memory failed.
    #[error(
        "cannot lock {len} bytes of DMA memory: raise the locked-memory limit (`ulimit -l unlimited`, LimitMEMLOCK=infinity in systemd) or run as root"
    )]
    DmaLock {
        /// Length.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// Hugepages were required but none could be had.
    #[error(
        "no 2 MiB hugepage for {len} bytes of DMA memory: reserve some (`echo 512 > /proc/sys/vm/nr_hugepages`) or allow 4 KiB pages"
    )]
    NoHugepages {
        /// Length.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// VFIO_IOMMU_MAP_DMA failed.
    #[error(
        "VFIO_IOMMU_MAP_DMA of {len:#x} bytes at IOVA {iova} failed; if ENOMEM, raise the locked-memory limit (`ulimit -l`), VFIO pins the pages against it"
    )]
    DmaMap {
        /// IOVA.
        iova: Iova,
        /// Length.
        len: u64,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// IOVA arithmetic overflowed.
    #[error("IOVA {base} + {offset:#x} overflows")]
    IovaOverflow {
        /// Base.
        base: Iova,
        /// Offset added.
        offset: u64,
    },

    /// An IOVA allocation request is malformed.
    #[error(
        "invalid IOVA allocation of {len:#x} bytes aligned to {align:#x}: length must be > 0 and alignment a power of two"
    )]
    IovaRequest {
        /// Length.
        len: u64,
        /// Alignment.
        align: u64,
    },

    /// No free IOVA range is large enough.
    #[error("no free IOVA range of {len:#x} bytes aligned to {align:#x} in the IOMMU aperture")]
    IovaExhausted {
        /// Length.
        len: u64,
        /// Alignment.
        align: u64,
    },

    /// Freeing an IOVA that was not allocated.
    #[error("IOVA {iova} was not allocated (double free?)")]
    IovaNotAllocated {
        /// IOVA.
        iova: Iova,
    },

    /// A VFIO capability chain is malformed.
    #[error("malformed VFIO capability chain at byte {offset}: {reason}")]
    CapabilityChain {
        /// Byte offset in the info buffer.
        offset: usize,
        /// Why.
        reason: &'static str,
    },

    /// The device has fewer MSI-X vectors than asked for.
    #[error("device {addr} has {available} MSI-X vectors, {requested} requested")]
    MsixVectors {
        /// The device.
        addr: String,
        /// Vectors the device has.
        available: u32,
        /// Vectors asked for.
        requested: u32,
    },

    /// eventfd creation or access failed.
    #[error("eventfd operation failed")]
    EventFd {
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// The device cannot be reset through VFIO.
    #[error("device {addr} does not support VFIO_DEVICE_RESET (no FLR, PM or bus reset available)")]
    ResetUnsupported {
        /// The device.
        addr: String,
    },

    /// /proc/self/pagemap could not be used.
    #[error("cannot translate virtual address {vaddr:#x} via /proc/self/pagemap: {reason}")]
    Pagemap {
        /// The virtual address.
        vaddr: usize,
        /// Why.
        reason: &'static str,
        /// The I/O error, if any.
        #[source]
        source: Option<io::Error>,
    },

    /// A memfd for simulator DMA memory could not be created, sized or sealed.
    #[error("cannot create a sealed memfd of {len} bytes for DMA memory")]
    Memfd {
        /// Requested length.
        len: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },

    /// The simulator's IOMMU refused a DMA mapping.
    #[error("simulator DMA map of {len:#x} bytes at IOVA {iova:#x} failed: {reason}")]
    SimDmaMap {
        /// The IOVA.
        iova: u64,
        /// The length.
        len: u64,
        /// What the simulator said.
        reason: String,
    },

    /// The device did not reach a state in time.
    #[error("device did not become {what} within {timeout_ms} ms (STATUS = {status:#x})")]
    DeviceTimeout {
        /// The awaited state.
        what: &'static str,
        /// The timeout.
        timeout_ms: u64,
        /// The last STATUS read.
        status: u32,
    },

    /// `MAGIC` is wrong (0xFFFFFFFF: the device fell off the bus).
    #[error(
        "MAGIC register reads {found:#010x}, expected 0x43544f31 (\"CTO1\"); not a CTO-1 device or it fell off the bus"
    )]
    BadMagic {
        /// What was read.
        found: u32,
    },

    /// [`Device::attach`](crate::Device::attach) found a device it cannot attach to
    /// without a reset (bring it up with `Device::new` instead, which empties its table).
    #[error("device cannot be attached without a reset: {why} (STATUS {status:#010x})")]
    NotAttachable {
        /// Why.
        why: &'static str,
        /// `STATUS` as read.
        status: u32,
    },

    /// `SPEC_VERSION` has a major version this driver does not implement.
    #[error(
        "device implements specification {major}.{minor}; this driver supports major version 1 only"
    )]
    UnsupportedSpecVersion {
        /// Major.
        major: u16,
        /// Minor.
        minor: u16,
    },

    /// The device is in the fatal state (bring-up or enable failed).
    #[error("device is fatal: FATAL_CODE {code}, FATAL_UNIT {unit}, FATAL_ADDR {addr:#x}")]
    DeviceFatal {
        /// Raw `FATAL_CODE`.
        code: u32,
        /// Raw `FATAL_UNIT`.
        unit: u32,
        /// `FATAL_ADDR`.
        addr: u64,
    },

    /// The device is down (fatal, reset or timed out) until `reinit` succeeds.
    #[error("device is down after a fault; call reinit()")]
    DeviceDown,

    /// A capability register holds a value this driver cannot work with.
    #[error("capability {what} = {value:#x} is out of range")]
    BadCapability {
        /// The register.
        what: &'static str,
        /// Its value.
        value: u32,
    },

    /// A bulk command (dump) failed on the device.
    #[error("{what} completed with status {status}")]
    CommandFailed {
        /// The command.
        what: &'static str,
        /// Raw completion status, or 0xFF when it was aborted.
        status: u8,
    },

    /// A waited-for command did not complete in time.
    #[error("command with cookie {cookie:#x} did not complete within {timeout_ms} ms")]
    CommandTimeout {
        /// Its cookie.
        cookie: u32,
        /// The timeout.
        timeout_ms: u64,
    },

    /// The completion ring returned a cookie that is not the oldest outstanding one.
    #[error(
        "completion cookie {found:#x} does not match the oldest outstanding command {expected:#x}"
    )]
    CookieMismatch {
        /// The cookie the driver expected.
        expected: u32,
        /// The cookie the device wrote.
        found: u32,
    },

    /// The completion of an older command never came (the device completed a later
    /// one): its outcome is unknown, it may have taken effect. Handled as a command
    /// timeout (device.md section 18): the device is down until `reinit` resets it.
    #[error("the completion of command {cookie:#x} was lost (the device completed {found:#x})")]
    CompletionLost {
        /// The oldest outstanding command, whose completion is missing.
        cookie: u32,
        /// The later command the device completed.
        found: u32,
    },

    /// A request argument is invalid (e.g. a frame larger than a TX buffer).
    #[error("invalid argument: {what}")]
    InvalidArgument {
        /// What is wrong.
        what: &'static str,
    },

    /// A failure injected by a test double.
    #[error("injected failure: {what}")]
    Injected {
        /// What failed.
        what: &'static str,
    },

    /// A simulator control-socket operation failed locally (socket, send, receive).
    #[error("simulator control socket {socket}: {op} failed")]
    SimSocket {
        /// The socket path.
        socket: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// The simulator answered a control request with an error, or with nonsense.
    #[error("simulator control request {op} failed: {reason}")]
    SimControl {
        /// The request (`op` of the protocol).
        op: &'static str,
        /// The simulator's error kind and message, or what was wrong with its reply.
        reason: String,
    },

    /// The simulator process is gone: its control socket was closed.
    #[error("simulator process behind {socket} is gone (control socket closed)")]
    SimGone {
        /// The socket path.
        socket: String,
    },
}

/// The driver's result type.
pub type Result<T, E = DriverError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_viable_message_lists_offenders() {
        let e = DriverError::GroupNotViable {
            group: 7,
            offenders: vec![
                GroupMember {
                    addr: "0000:03:00.1".into(),
                    driver: Some("ixgbe".into()),
                },
                GroupMember {
                    addr: "0000:03:00.2".into(),
                    driver: Some("snd_hda_intel".into()),
                },
            ],
        };
        let msg = e.to_string();
        assert!(msg.contains("group 7"), "{msg}");
        assert!(msg.contains("0000:03:00.1 (bound to ixgbe)"), "{msg}");
        assert!(
            msg.contains("0000:03:00.2 (bound to snd_hda_intel)"),
            "{msg}"
        );
    }
}
