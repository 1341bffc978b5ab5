//! XFS project quotas: how the local lane enforces a volume's capacity.
//!
//! Each volume's data directory gets its own project ID (with the inherit flag, so everything
//! created below belongs to it) and a hard block limit equal to the volume's capacity. The
//! project is set with the FS_IOC_FSSETXATTR ioctl; the limit with `xfs_quota`, the tool XFS
//! ships for it. IDs are reserved race-free as files under `<base>/.projects/<id>`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Error, Result};
use crate::mount::mountinfo;

const XFS_SUPER_MAGIC: i64 = 0x5846_5342;
const FS_XFLAG_PROJINHERIT: u32 = 0x0000_0200;
const FIRST_PROJECT: u32 = 100_000;
const PROJECT_SPAN: u32 = 1 << 30;

#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

nix::ioctl_read!(fs_get_xattr, b'X', 31, FsXattr);
nix::ioctl_write_ptr!(fs_set_xattr, b'X', 32, FsXattr);

/// Project quota on the filesystem under a lane's base directory.
#[derive(Debug, Clone)]
pub struct Quota {
    mount_point: PathBuf,
    reservations: PathBuf,
}

/// Whether capacity is enforced under a base directory, and why not when it is not.
#[derive(Debug, Clone)]
pub enum Enforcement {
    Xfs(Quota),
    /// btrfs with quota groups on: a subvolume and a qgroup limit per volume.
    Btrfs,
    NotEnforced(String),
}

impl Enforcement {
    /// Looks at the filesystem under `base` (which must exist).
    pub fn detect(base: &Path) -> Enforcement {
        let fs_type = match nix::sys::statfs::statfs(base) {
            Ok(stat) => stat.filesystem_type().0,
            Err(e) => return Enforcement::NotEnforced(format!("statfs {}: {e}", base.display())),
        };
        if fs_type == super::btrfs::BTRFS_SUPER_MAGIC {
            return match super::btrfs::quotas_enabled(base) {
                Ok(true) => Enforcement::Btrfs,
                Ok(false) => Enforcement::NotEnforced(format!(
                    "{} is on btrfs with quotas off; capacity is recorded but not enforced (run \
                     `btrfs quota enable` on its mount point to enforce it)",
                    base.display()
                )),
                Err(e) => Enforcement::NotEnforced(format!(
                    "cannot read the btrfs quota status under {}: {e}; capacity is not enforced",
                    base.display()
                )),
            };
        }
        if fs_type != XFS_SUPER_MAGIC {
            return Enforcement::NotEnforced(format!(
                "{} is on neither XFS with project quotas nor btrfs with quotas; capacity is \
                 recorded but not enforced",
                base.display()
            ));
        }
        let table = mountinfo::read().unwrap_or_default();
        let Some(mount) = mountinfo::containing(&table, base) else {
            return Enforcement::NotEnforced(format!("no mount found for {}", base.display()));
        };
        let prjquota = mount
            .super_options
            .iter()
            .any(|o| o == "prjquota" || o == "pquota" || o == "pqnoenforce");
        if !prjquota {
            return Enforcement::NotEnforced(format!(
                "XFS at {} is not mounted with prjquota; capacity is not enforced",
                mount.mount_point.display()
            ));
        }
        if Command::new("xfs_quota").arg("-V").output().is_err() {
            return Enforcement::NotEnforced(
                "xfs_quota is not installed (package xfsprogs); capacity is not enforced".into(),
            );
        }
        Enforcement::Xfs(Quota {
            mount_point: mount.mount_point.clone(),
            reservations: base.join(".projects"),
        })
    }
}

impl Quota {
    /// Reserves a project ID for volume `dir_name` and tags `data` (a directory) with it.
    pub fn assign(&self, data: &Path, dir_name: &str) -> Result<u32> {
        std::fs::create_dir_all(&self.reservations)
            .map_err(Error::io(format!("create {}", self.reservations.display())))?;
        let mut id = FIRST_PROJECT + fnv1a(dir_name) % PROJECT_SPAN;
        let id = loop {
            let path = self.reservations.join(id.to_string());
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(_) => {
                    std::fs::write(&path, dir_name)
                        .map_err(Error::io(format!("write {}", path.display())))?;
                    break id;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let owner = std::fs::read_to_string(&path).unwrap_or_default();
                    if owner == dir_name {
                        break id;
                    }
                    id = FIRST_PROJECT + (id - FIRST_PROJECT + 1) % PROJECT_SPAN;
                }
                Err(e) => return Err(Error::io(format!("reserve {}", path.display()))(e)),
            }
        };
        set_project(data, id)?;
        Ok(id)
    }

    /// Sets the hard block limit of project `id` to `bytes` (0 removes the limit).
    pub fn set_limit(&self, id: u32, bytes: u64) -> Result<()> {
        let command = format!("limit -p bhard={bytes} {id}");
        let output = Command::new("xfs_quota")
            .args(["-x", "-c", &command])
            .arg(&self.mount_point)
            .output()
            .map_err(Error::io("run xfs_quota"))?;
        if !output.status.success() {
            return Err(Error::Quota(format!(
                "xfs_quota {command:?} on {} failed: {}",
                self.mount_point.display(),
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Lifts project `id`'s limit and frees the ID.
    pub fn release(&self, id: u32) -> Result<()> {
        self.set_limit(id, 0)?;
        match std::fs::remove_file(self.reservations.join(id.to_string())) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io("free project id")(e))
            }
            _ => Ok(()),
        }
    }

    /// Project IDs reserved for volume directories that no longer exist under `base`
    /// (left by a create or delete that was killed half-way).
    pub fn orphans(&self, base: &Path) -> Vec<u32> {
        let Ok(entries) = std::fs::read_dir(&self.reservations) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|entry| {
                let id: u32 = entry.file_name().to_str()?.parse().ok()?;
                let owner = std::fs::read_to_string(entry.path()).ok()?;
                (!base.join(owner.trim()).exists()).then_some(id)
            })
            .collect()
    }
}

fn set_project(dir: &Path, id: u32) -> Result<()> {
    let file = std::fs::File::open(dir).map_err(Error::io(format!("open {}", dir.display())))?;
    let mut attr = FsXattr::default();
    // SAFETY: the fd is open for the call's duration and `attr` is a properly sized,
    // writable `struct fsxattr` as FS_IOC_FSGETXATTR expects.
    unsafe { fs_get_xattr(file.as_raw_fd(), &mut attr) }
        .map_err(|e| Error::io(format!("FS_IOC_FSGETXATTR {}", dir.display()))(e.into()))?;
    attr.projid = id;
    attr.xflags |= FS_XFLAG_PROJINHERIT;
    // SAFETY: as above; FS_IOC_FSSETXATTR only reads `attr`.
    unsafe { fs_set_xattr(file.as_raw_fd(), &attr) }
        .map_err(|e| Error::io(format!("FS_IOC_FSSETXATTR {}", dir.display()))(e.into()))?;
    Ok(())
}

/// A stable, well-spread hash for picking a first project ID to try.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
