//! PCI addresses and the sysfs checks done before touching `/dev/vfio`.
//!
//! All paths are relative to a configurable root ([`Sysfs::new`]) so tests build a fake
//! tree in a temporary directory. Every failure a user meets here maps to a
//! [`DriverError`] that says what to do.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{DriverError, GroupMember, Result};

/// A PCI address: domain, bus, device, function (`0000:03:00.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// PCI segment (domain). Usually 0; VMD domains go past 0xffff.
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, below 32.
    pub device: u8,
    /// Function number, below 8.
    pub function: u8,
}

impl PciAddress {
    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0). Hex, case-insensitive.
    pub fn parse(input: &str) -> Result<Self> {
        let bad = |part: &'static str, reason: &'static str| DriverError::InvalidPciAddress {
            input: input.to_owned(),
            part,
            reason,
        };
        let s = input.trim();
        let parts: Vec<&str> = s.split(':').collect();
        let (domain, bus, devfn) = match parts.as_slice() {
            [d, b, df] => (Some(*d), *b, *df),
            [b, df] => (None, *b, *df),
            _ => return Err(bad("format", "expected 1 or 2 ':' separators")),
        };
        let hex = |txt: &str, part: &'static str, max_digits: usize| -> Result<u32> {
            if txt.is_empty() {
                return Err(bad(part, "empty"));
            }
            if txt.len() > max_digits {
                return Err(bad(part, "too many digits"));
            }
            if !txt.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(part, "not hexadecimal"));
            }
            u32::from_str_radix(txt, 16).map_err(|_| bad(part, "not hexadecimal"))
        };
        let domain = match domain {
            Some(d) => hex(d, "domain", 8)?,
            None => 0,
        };
        let bus = u8::try_from(hex(bus, "bus", 2)?).map_err(|_| bad("bus", "above ff"))?;
        let Some((dev, func)) = devfn.split_once('.') else {
            return Err(bad("format", "missing '.' between device and function"));
        };
        let device = hex(dev, "device", 2)?;
        if device > 0x1f {
            return Err(bad("device", "above 1f"));
        }
        let function = hex(func, "function", 1)?;
        if function > 7 {
            return Err(bad("function", "above 7"));
        }
        Ok(Self {
            domain,
            bus,
            device: u8::try_from(device).map_err(|_| bad("device", "above 1f"))?,
            function: u8::try_from(function).map_err(|_| bad("function", "above 7"))?,
        })
    }
}

impl FromStr for PciAddress {
    type Err = DriverError;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl fmt::Display for PciAddress {
    /// The canonical sysfs spelling, `0000:03:00.0`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// Whether `driver` is vfio-pci or a vendor variant of it (`mlx5_vfio_pci`, ...).
pub fn is_vfio_pci_driver(driver: &str) -> bool {
    driver == "vfio-pci" || driver.ends_with("vfio_pci") || driver.ends_with("vfio-pci")
}

/// Drivers a device in the same IOMMU group may be bound to without making the group
/// non-viable: VFIO drivers, `pci-stub`, and `pcieport` (a bridge driver that declares
/// `driver_managed_dma`, Linux 5.19+), or no driver.
pub fn driver_is_vfio_safe(driver: Option<&str>) -> bool {
    match driver {
        None => true,
        Some(d) => d.contains("vfio") || d == "pci-stub" || d == "pcieport",
    }
}

/// What sysfs says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSysfsInfo {
    /// The device.
    pub addr: PciAddress,
    /// Its IOMMU group.
    pub iommu_group: u32,
    /// The driver it is bound to, if any.
    pub driver: Option<String>,
    /// PCI vendor ID.
    pub vendor: u16,
    /// PCI device ID.
    pub device: u16,
}

/// sysfs (and procfs/devfs) under a root directory: `/` in production, a temporary
/// directory in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Self::new("/")
    }
}

fn sysfs_err(path: &Path) -> impl FnOnce(io::Error) -> DriverError + '_ {
    move |source| DriverError::Sysfs {
        path: path.to_owned(),
        source,
    }
}

impl Sysfs {
    /// sysfs rooted at `root` (paths below are `root/sys/...`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `root/sys/bus/pci/devices/<addr>`.
    pub fn device_dir(&self, addr: &PciAddress) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(addr.to_string())
    }

    /// `root/sys/kernel/iommu_groups/<group>/devices`.
    pub fn group_devices_dir(&self, group: u32) -> PathBuf {
        self.root
            .join("sys/kernel/iommu_groups")
            .join(group.to_string())
            .join("devices")
    }

    fn existing_device_dir(&self, addr: &PciAddress) -> Result<PathBuf> {
        let dir = self.device_dir(addr);
        match dir.try_exists() {
            Ok(true) => Ok(dir),
            Ok(false) => Err(DriverError::DeviceNotFound {
                addr: addr.to_string(),
                path: dir,
            }),
            Err(e) => Err(sysfs_err(&dir)(e)),
        }
    }

    /// The device's IOMMU group number (target of the `iommu_group` link).
    pub fn iommu_group(&self, addr: &PciAddress) -> Result<u32> {
        let link = self.existing_device_dir(addr)?.join("iommu_group");
        let target = match std::fs::read_link(&link) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(DriverError::NoIommuGroup {
                    addr: addr.to_string(),
                    path: link,
                });
            }
            Err(e) => return Err(sysfs_err(&link)(e)),
        };
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        name.parse().map_err(|_| DriverError::SysfsParse {
            path: link.clone(),
            content: target.display().to_string(),
        })
    }

    /// The driver the device at `dev_dir` is bound to (name of the `driver` link's
    /// target), `None` when unbound.
    fn driver_of_dir(dev_dir: &Path) -> Result<Option<String>> {
        let link = dev_dir.join("driver");
        match std::fs::read_link(&link) {
            Ok(t) => Ok(t.file_name().and_then(|n| n.to_str()).map(str::to_owned)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(sysfs_err(&link)(e)),
        }
    }

    /// The driver the device is bound to, `None` when unbound.
    pub fn driver(&self, addr: &PciAddress) -> Result<Option<String>> {
        Self::driver_of_dir(&self.existing_device_dir(addr)?)
    }

    fn read_hex_u16(&self, addr: &PciAddress, file: &str) -> Result<u16> {
        let path = self.existing_device_dir(addr)?.join(file);
        let txt = std::fs::read_to_string(&path).map_err(sysfs_err(&path))?;
        let t = txt.trim();
        let digits = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        u16::from_str_radix(digits, 16).map_err(|_| DriverError::SysfsParse {
            path,
            content: txt.clone(),
        })
    }

    /// PCI vendor ID from `vendor`.
    pub fn vendor_id(&self, addr: &PciAddress) -> Result<u16> {
        self.read_hex_u16(addr, "vendor")
    }

    /// PCI device ID from `device`.
    pub fn device_id(&self, addr: &PciAddress) -> Result<u16> {
        self.read_hex_u16(addr, "device")
    }

    /// Every device in IOMMU group `group`, with its driver, sorted by address.
    pub fn group_members(&self, group: u32) -> Result<Vec<GroupMember>> {
        let dir = self.group_devices_dir(group);
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(sysfs_err(&dir))? {
            let entry = entry.map_err(sysfs_err(&dir))?;
            let addr = entry.file_name().to_string_lossy().into_owned();
            let driver = Self::driver_of_dir(&entry.path())?;
            out.push(GroupMember { addr, driver });
        }
        out.sort_by(|a, b| a.addr.cmp(&b.addr));
        Ok(out)
    }

    /// Devices of the group bound to drivers that make it non-viable for VFIO.
    pub fn group_offenders(&self, group: u32) -> Result<Vec<GroupMember>> {
        Ok(self
            .group_members(group)?
            .into_iter()
            .filter(|m| !driver_is_vfio_safe(m.driver.as_deref()))
            .collect())
    }

    /// The whole pre-flight check for opening `addr` with VFIO: the device exists, has
    /// an IOMMU group, is bound to vfio-pci, and every other device in its group is
    /// VFIO-safe. Returns what sysfs says about it.
    pub fn check_device(&self, addr: &PciAddress) -> Result<DeviceSysfsInfo> {
        let group = self.iommu_group(addr)?;
        let driver = self.driver(addr)?;
        match driver.as_deref() {
            Some(d) if is_vfio_pci_driver(d) => {}
            Some(other) => {
                return Err(DriverError::BoundToOtherDriver {
                    addr: addr.to_string(),
                    driver: other.to_owned(),
                });
            }
            None => {
                return Err(DriverError::NotBound {
                    addr: addr.to_string(),
                });
            }
        }
        let offenders = self.group_offenders(group)?;
        if !offenders.is_empty() {
            return Err(DriverError::GroupNotViable { group, offenders });
        }
        Ok(DeviceSysfsInfo {
            addr: *addr,
            iommu_group: group,
            driver,
            vendor: self.vendor_id(addr)?,
            device: self.device_id(addr)?,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn addr(s: &str) -> PciAddress {
        PciAddress::parse(s).expect("valid address")
    }

    #[test]
    fn parse_full_and_short_forms() {
        let a = addr("0000:03:00.0");
        assert_eq!(
            a,
            PciAddress {
                domain: 0,
                bus: 3,
                device: 0,
                function: 0
            }
        );
        assert_eq!(addr("03:00.0"), a);
        assert_eq!(addr("  0000:03:00.0\n"), a);
        let b = addr("10000:AF:1f.7");
        assert_eq!(b.domain, 0x10000);
        assert_eq!(b.bus, 0xaf);
        assert_eq!(b.device, 0x1f);
        assert_eq!(b.function, 7);
        assert_eq!(b.to_string(), "10000:af:1f.7");
        assert_eq!(a.to_string(), "0000:03:00.0");
        assert_eq!(
            "0000:03:00.1".parse::<PciAddress>().expect("ok").function,
            1
        );
    }

    fn part_of(s: &str) -> &'static str {
        match PciAddress::parse(s) {
            Err(DriverError::InvalidPciAddress { part, .. }) => part,
            other => panic!("{s}: expected an error, got {other:?}"),
        }
    }

    #[test]
    fn parse_errors_name_the_bad_part() {
        assert_eq!(part_of(""), "format");
        assert_eq!(part_of("03-00.0"), "format");
        assert_eq!(part_of("0:0:0:0.0"), "format");
        assert_eq!(part_of("0000:03:00"), "format");
        assert_eq!(part_of("zz00:03:00.0"), "domain");
        assert_eq!(part_of("123456789:03:00.0"), "domain");
        assert_eq!(part_of("0000:103:00.0"), "bus");
        assert_eq!(part_of("0000:g3:00.0"), "bus");
        assert_eq!(part_of("0000::00.0"), "bus");
        assert_eq!(part_of("0000:03:20.0"), "device");
        assert_eq!(part_of("0000:03:+1.0"), "device");
        assert_eq!(part_of("0000:03:00.8"), "function");
        assert_eq!(part_of("0000:03:00.10"), "function");
        let msg = PciAddress::parse("0000:03:00.8")
            .expect_err("bad")
            .to_string();
        assert!(msg.contains("function"), "{msg}");
        assert!(msg.contains("0000:03:00.0"), "example in message: {msg}");
    }

    /// Builds a fake sysfs tree.
    pub(crate) struct FakeSysfs {
        pub(crate) dir: tempfile::TempDir,
    }

    impl FakeSysfs {
        pub(crate) fn new() -> Self {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(dir.path().join("sys/bus/pci/devices")).expect("mkdir");
            std::fs::create_dir_all(dir.path().join("sys/kernel/iommu_groups")).expect("mkdir");
            Self { dir }
        }

        pub(crate) fn sysfs(&self) -> Sysfs {
            Sysfs::new(self.dir.path())
        }

        /// Adds a device, optionally in a group and bound to a driver.
        pub(crate) fn add(&self, a: &str, group: Option<u32>, driver: Option<&str>) {
            let root = self.dir.path();
            let dev = root.join("sys/bus/pci/devices").join(a);
            std::fs::create_dir_all(&dev).expect("mkdir dev");
            std::fs::write(dev.join("vendor"), "0x1d0f\n").expect("vendor");
            std::fs::write(dev.join("device"), "0xcafe\n").expect("device");
            if let Some(g) = group {
                let gdir = root.join("sys/kernel/iommu_groups").join(g.to_string());
                std::fs::create_dir_all(gdir.join("devices")).expect("mkdir group");
                symlink(&gdir, dev.join("iommu_group")).expect("link group");
                symlink(&dev, gdir.join("devices").join(a)).expect("link member");
            }
            if let Some(d) = driver {
                let ddir = root.join("sys/bus/pci/drivers").join(d);
                std::fs::create_dir_all(&ddir).expect("mkdir driver");
                symlink(&ddir, dev.join("driver")).expect("link driver");
            }
        }
    }

    #[test]
    fn fake_sysfs_happy_path() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(7), Some("vfio-pci"));
        f.add("0000:00:01.0", Some(7), Some("pcieport"));
        let info = f.sysfs().check_device(&addr("03:00.0")).expect("ok");
        assert_eq!(info.iommu_group, 7);
        assert_eq!(info.driver.as_deref(), Some("vfio-pci"));
        assert_eq!(info.vendor, 0x1d0f);
        assert_eq!(info.device, 0xcafe);
        let members = f.sysfs().group_members(7).expect("members");
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].addr, "0000:00:01.0");
    }

    #[test]
    fn vfio_variant_drivers_are_accepted() {
        assert!(is_vfio_pci_driver("vfio-pci"));
        assert!(is_vfio_pci_driver("mlx5_vfio_pci"));
        assert!(!is_vfio_pci_driver("ixgbe"));
        assert!(driver_is_vfio_safe(Some("pci-stub")));
        assert!(!driver_is_vfio_safe(Some("nvme")));
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(2), Some("mlx5_vfio_pci"));
        assert!(f.sysfs().check_device(&addr("03:00.0")).is_ok());
    }

    #[test]
    fn fake_sysfs_not_found() {
        let f = FakeSysfs::new();
        let e = f
            .sysfs()
            .check_device(&addr("0000:03:00.0"))
            .expect_err("missing");
        assert!(matches!(e, DriverError::DeviceNotFound { .. }), "{e:?}");
        assert!(e.to_string().contains("lspci"), "{e}");
    }

    #[test]
    fn fake_sysfs_no_iommu_group() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", None, Some("vfio-pci"));
        let e = f
            .sysfs()
            .check_device(&addr("0000:03:00.0"))
            .expect_err("no group");
        assert!(matches!(e, DriverError::NoIommuGroup { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(msg.contains("intel_iommu=on"), "{msg}");
        assert!(msg.contains("amd_iommu=on"), "{msg}");
    }

    #[test]
    fn fake_sysfs_bound_to_ixgbe() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(12), Some("ixgbe"));
        let e = f
            .sysfs()
            .check_device(&addr("0000:03:00.0"))
            .expect_err("wrong driver");
        match &e {
            DriverError::BoundToOtherDriver { driver, .. } => assert_eq!(driver, "ixgbe"),
            other => panic!("unexpected {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("\"ixgbe\""), "{msg}");
        assert!(
            msg.contains("echo vfio-pci > /sys/bus/pci/devices/0000:03:00.0/driver_override"),
            "{msg}"
        );
        assert!(
            msg.contains("/sys/bus/pci/devices/0000:03:00.0/driver/unbind"),
            "{msg}"
        );
        assert!(msg.contains("drivers_probe"), "{msg}");
    }

    #[test]
    fn fake_sysfs_unbound() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(12), None);
        let e = f
            .sysfs()
            .check_device(&addr("0000:03:00.0"))
            .expect_err("unbound");
        assert!(matches!(e, DriverError::NotBound { .. }), "{e:?}");
    }

    #[test]
    fn fake_sysfs_group_not_viable_lists_offenders() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(5), Some("vfio-pci"));
        f.add("0000:03:00.1", Some(5), Some("ixgbe"));
        f.add("0000:03:00.2", Some(5), None);
        f.add("0000:03:00.3", Some(5), Some("pci-stub"));
        f.add("0000:04:00.0", Some(5), Some("nvme"));
        let e = f
            .sysfs()
            .check_device(&addr("0000:03:00.0"))
            .expect_err("not viable");
        match &e {
            DriverError::GroupNotViable { group, offenders } => {
                assert_eq!(*group, 5);
                let names: Vec<_> = offenders.iter().map(|m| m.addr.as_str()).collect();
                assert_eq!(names, ["0000:03:00.1", "0000:04:00.0"]);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = e.to_string();
        assert!(msg.contains("0000:03:00.1 (bound to ixgbe)"), "{msg}");
        assert!(msg.contains("0000:04:00.0 (bound to nvme)"), "{msg}");
    }

    #[test]
    fn fake_sysfs_bad_id_file() {
        let f = FakeSysfs::new();
        f.add("0000:03:00.0", Some(1), Some("vfio-pci"));
        std::fs::write(
            f.dir.path().join("sys/bus/pci/devices/0000:03:00.0/vendor"),
            "garbage",
        )
        .expect("write");
        let e = f
            .sysfs()
            .vendor_id(&addr("0000:03:00.0"))
            .expect_err("parse");
        assert!(matches!(e, DriverError::SysfsParse { .. }), "{e:?}");
    }
}
