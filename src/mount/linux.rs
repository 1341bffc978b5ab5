//! The real [`Mounter`]: bind mounts through sys-mount, remounts and unmounts through nix.

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};
use sys_mount::{Mount, MountFlags as SysFlags};

use super::{Atime, Error, MountEntry, MountFlags, Mounter, Overlay, Result, mountinfo};

/// Mounts on the running kernel. Needs CAP_SYS_ADMIN.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinuxMounter;

impl Mounter for LinuxMounter {
    fn bind(&self, source: &Path, target: &Path) -> Result<()> {
        Mount::builder()
            .flags(SysFlags::BIND)
            .mount(source, target)
            .map(drop)
            .map_err(|e| Error::io("bind mount", target, e))
    }

    fn overlay(&self, layers: &Overlay, target: &Path, flags: MountFlags) -> Result<()> {
        let data = layers
            .data()
            .map_err(|e| Error::io("overlay mount", target, e))?;
        let bits = ms_flags(flags, MsFlags::empty());
        nix::mount::mount(
            Some("overlay"),
            target,
            Some("overlay"),
            bits,
            Some(data.as_str()),
        )
        .map_err(|e| Error::io("overlay mount", target, e.into()))
    }

    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<()> {
        let bits = ms_flags(flags, MsFlags::empty());
        nix::mount::mount(Some(device), target, Some(fs_type), bits, Some(data))
            .map_err(|e| Error::io("mount", target, e.into()))
    }

    fn remount(&self, target: &Path, flags: MountFlags) -> Result<()> {
        let bits = ms_flags(flags, MsFlags::MS_BIND | MsFlags::MS_REMOUNT);
        nix::mount::mount(None::<&str>, target, None::<&str>, bits, None::<&str>)
            .map_err(|e| Error::io("remount", target, e.into()))
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        nix::mount::umount2(target, MntFlags::UMOUNT_NOFOLLOW)
            .map_err(|e| Error::io("unmount", target, e.into()))
    }

    fn table(&self) -> Result<Vec<MountEntry>> {
        mountinfo::read().map_err(|e| Error::io("read", Path::new("/proc/self/mountinfo"), e))
    }

    fn binds_of(&self, dir: &Path) -> Result<Vec<MountEntry>> {
        let text = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| Error::io("read", Path::new("/proc/self/mountinfo"), e))?;
        let mut entries = mountinfo::parse_where(&text, super::bind_filter(dir));
        // Overlays whose upper layer is `dir` (dataset-backed volumes).
        let upper = format!("upperdir={}", dir.display());
        let overlays = text
            .lines()
            .filter(|line| line.contains(&upper))
            .flat_map(mountinfo::parse)
            .filter(|e| super::upper_of(e) == Some(dir));
        entries.extend(overlays);
        Ok(entries)
    }

    fn table_for(&self, paths: &[&Path]) -> Result<Vec<MountEntry>> {
        mountinfo::read_for(paths)
            .map_err(|e| Error::io("read", Path::new("/proc/self/mountinfo"), e))
    }
}

/// The kernel flags for `flags`, added to `bits`.
fn ms_flags(flags: MountFlags, mut bits: MsFlags) -> MsFlags {
    bits.set(MsFlags::MS_RDONLY, flags.read_only);
    bits.set(MsFlags::MS_NOSUID, flags.nosuid);
    bits.set(MsFlags::MS_NODEV, flags.nodev);
    bits.set(MsFlags::MS_NOEXEC, flags.noexec);
    match flags.atime {
        Atime::Inherit => {}
        Atime::NoAtime => bits |= MsFlags::MS_NOATIME,
        Atime::NoDirAtime => bits |= MsFlags::MS_NODIRATIME,
        Atime::Relatime => bits |= MsFlags::MS_RELATIME,
        Atime::Strict => bits |= MsFlags::MS_STRICTATIME,
    }
    bits
}
