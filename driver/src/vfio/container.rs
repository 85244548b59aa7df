//! The VFIO container (`/dev/vfio/vfio`: one IOMMU address space) and group
//! (`/dev/vfio/<N>`: the unit of isolation the device belongs to).

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    VFIO_API_VERSION, VFIO_GROUP_FLAGS_VIABLE, VFIO_TYPE1_IOMMU, VFIO_TYPE1v2_IOMMU,
};

use super::ioctl;
use crate::error::{DriverError, Result};
use crate::iova::{IommuInfo, parse_iommu_info};

/// Maps the `io::Error` of opening a VFIO node to the error a user can act on.
pub(crate) fn map_open_error(path: &Path, group: Option<u32>, e: io::Error) -> DriverError {
    let path = path.to_path_buf();
    match (e.kind(), group) {
        (io::ErrorKind::NotFound, None) => DriverError::VfioNotLoaded { path },
        (io::ErrorKind::NotFound, Some(group)) => DriverError::GroupNodeMissing { group, path },
        (io::ErrorKind::PermissionDenied, _) => DriverError::PermissionDenied { path, source: e },
        (_, Some(group)) if e.raw_os_error() == Some(libc::EBUSY) => {
            DriverError::GroupBusy { group, path }
        }
        _ => DriverError::Open { path, source: e },
    }
}

fn open_rw(path: &Path, group: Option<u32>) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| map_open_error(path, group, e))
}

fn ioctl_err(op: &'static str) -> impl FnOnce(io::Error) -> DriverError {
    move |source| DriverError::Ioctl { op, source }
}

/// An open VFIO container.
#[derive(Debug)]
pub(crate) struct Container {
    file: File,
}

impl Container {
    /// Opens the container node and checks the API version.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = open_rw(path, None)?;
        let got = ioctl::get_api_version(&file).map_err(ioctl_err("VFIO_GET_API_VERSION"))?;
        if u32::try_from(got).ok() != Some(VFIO_API_VERSION) {
            return Err(DriverError::ApiVersion { got });
        }
        Ok(Self { file })
    }

    /// The best supported type-1 IOMMU backend: v2 if available, else v1.
    pub(crate) fn pick_iommu_type(&self) -> Result<u32> {
        for t in [VFIO_TYPE1v2_IOMMU, VFIO_TYPE1_IOMMU] {
            if ioctl::check_extension(&self.file, t).map_err(ioctl_err("VFIO_CHECK_EXTENSION"))? {
                return Ok(t);
            }
        }
        Err(DriverError::NoType1Iommu)
    }

    /// `VFIO_SET_IOMMU` (after a group has been attached).
    pub(crate) fn set_iommu(&self, iommu_type: u32) -> Result<()> {
        ioctl::set_iommu(&self.file, iommu_type).map_err(ioctl_err("VFIO_SET_IOMMU"))
    }

    /// `VFIO_IOMMU_GET_INFO`, decoded (page sizes, valid IOVA ranges).
    pub(crate) fn iommu_info(&self) -> Result<IommuInfo> {
        let buf = ioctl::iommu_get_info(&self.file).map_err(ioctl_err("VFIO_IOMMU_GET_INFO"))?;
        parse_iommu_info(&buf)
    }

    /// The container file, for the ioctl layer.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

/// An open VFIO group.
#[derive(Debug)]
pub(crate) struct Group {
    file: File,
    id: u32,
}

impl Group {
    /// Opens `/dev/vfio/<id>` (under `vfio_dir`).
    pub(crate) fn open(vfio_dir: &Path, id: u32) -> Result<Self> {
        let path = vfio_dir.join(id.to_string());
        let file = open_rw(&path, Some(id))?;
        Ok(Self { file, id })
    }

    /// Whether every device in the group is bound to a VFIO-safe driver.
    pub(crate) fn is_viable(&self) -> Result<bool> {
        let flags =
            ioctl::group_get_status(&self.file).map_err(ioctl_err("VFIO_GROUP_GET_STATUS"))?;
        Ok(flags & VFIO_GROUP_FLAGS_VIABLE != 0)
    }

    /// Attaches the group to `container`.
    pub(crate) fn set_container(&self, container: &Container) -> Result<()> {
        ioctl::group_set_container(&self.file, container.file())
            .map_err(ioctl_err("VFIO_GROUP_SET_CONTAINER"))
    }

    /// Gets the device fd for the device called `name` (its PCI address).
    pub(crate) fn device_fd(&self, name: &str) -> Result<File> {
        ioctl::group_get_device_fd(&self.file, name).map_err(ioctl_err("VFIO_GROUP_GET_DEVICE_FD"))
    }

    /// The group number.
    pub(crate) fn id(&self) -> u32 {
        self.id
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        // Closing the fd would detach too; doing it explicitly keeps the order clear
        // (the container's IOMMU mappings are torn down when its last group leaves).
        let _ = ioctl::group_unset_container(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_errors_map_to_actionable_variants() {
        let p = Path::new("/dev/vfio/vfio");
        let e = map_open_error(p, None, io::Error::from_raw_os_error(libc::ENOENT));
        assert!(matches!(e, DriverError::VfioNotLoaded { .. }));
        assert!(e.to_string().contains("modprobe vfio-pci"), "{e}");

        let g = Path::new("/dev/vfio/12");
        let e = map_open_error(g, Some(12), io::Error::from_raw_os_error(libc::ENOENT));
        assert!(matches!(e, DriverError::GroupNodeMissing { group: 12, .. }));
        assert!(e.to_string().contains("/dev/vfio/12"), "{e}");

        let e = map_open_error(g, Some(12), io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(e, DriverError::PermissionDenied { .. }));
        let msg = e.to_string();
        assert!(msg.contains("root") && msg.contains("ulimit -l"), "{msg}");

        let e = map_open_error(g, Some(12), io::Error::from_raw_os_error(libc::EBUSY));
        assert!(matches!(e, DriverError::GroupBusy { group: 12, .. }));

        let e = map_open_error(g, Some(12), io::Error::from_raw_os_error(libc::EIO));
        assert!(matches!(e, DriverError::Open { .. }));
    }

    #[test]
    fn container_on_a_regular_file_fails_at_api_version() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("vfio");
        std::fs::write(&p, b"").expect("write");
        let e = Container::open(&p).expect_err("not a VFIO container");
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
}
