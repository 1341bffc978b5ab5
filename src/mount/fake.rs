//! An in-memory [`Mounter`] for unit tests of node logic. Integration tests use the real one.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{MountEntry, MountFlags, Mounter, Overlay, Result};

/// Records mounts in a table shaped like mountinfo. Every source is reported as device 0:1.
#[derive(Debug, Default)]
pub struct FakeMounter {
    table: Mutex<Vec<MountEntry>>,
}

impl FakeMounter {
    fn options(flags: MountFlags) -> Vec<String> {
        let mut options = vec![if flags.read_only { "ro" } else { "rw" }.to_owned()];
        for (set, name) in [
            (flags.nosuid, "nosuid"),
            (flags.nodev, "nodev"),
            (flags.noexec, "noexec"),
        ] {
            if set {
                options.push(name.to_owned());
            }
        }
        options
    }

    /// Resolves `/proc/self/fd/N[/rest]` the way the kernel does (to the open directory's
    /// path), so callers that mount through descriptors see real paths in the table.
    fn real(path: &Path) -> PathBuf {
        let Ok(rest) = path.strip_prefix("/proc/self/fd") else {
            return path.to_owned();
        };
        let mut parts = rest.components();
        let Some(fd) = parts.next() else {
            return path.to_owned();
        };
        match std::fs::read_link(Path::new("/proc/self/fd").join(fd)) {
            Ok(base) => base.join(parts.as_path()),
            Err(_) => path.to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<MountEntry>> {
        self.table
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl Mounter for FakeMounter {
    fn bind(&self, source: &Path, target: &Path) -> Result<()> {
        let (source, target) = (Self::real(source), Self::real(target));
        // A bind of a path that is itself a mount point binds what is mounted there.
        let root = self
            .lock()
            .iter()
            .rev()
            .find(|e| e.mount_point == source)
            .map_or(source.clone(), |e| e.root.clone());
        self.lock().push(MountEntry {
            major: 0,
            minor: 1,
            root,
            mount_point: target,
            options: Self::options(MountFlags::default()),
            fs_type: "fake".into(),
            source: "fake".into(),
            super_options: vec![],
        });
        Ok(())
    }

    fn overlay(&self, layers: &Overlay, target: &Path, flags: MountFlags) -> Result<()> {
        let data = layers
            .data()
            .map_err(|e| super::Error::io("overlay mount", target, e))?;
        self.lock().push(MountEntry {
            major: 0,
            minor: 2,
            root: "/".into(),
            mount_point: Self::real(target),
            options: Self::options(flags),
            fs_type: "overlay".into(),
            source: "overlay".into(),
            super_options: data.split(',').map(str::to_owned).collect(),
        });
        Ok(())
    }

    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<()> {
        self.lock().push(MountEntry {
            major: 7,
            minor: 0,
            root: "/".into(),
            mount_point: Self::real(target),
            options: Self::options(flags),
            fs_type: fs_type.into(),
            source: device.display().to_string(),
            super_options: data.split(',').map(str::to_owned).collect(),
        });
        Ok(())
    }

    fn remount(&self, target: &Path, flags: MountFlags) -> Result<()> {
        let target = Self::real(target);
        let mut table = self.lock();
        if let Some(entry) = table.iter_mut().rev().find(|e| e.mount_point == target) {
            entry.options = Self::options(flags);
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        let target = Self::real(target);
        let mut table = self.lock();
        match table.iter().rposition(|e| e.mount_point == target) {
            Some(index) => {
                table.remove(index);
                Ok(())
            }
            None => Err(super::Error::io(
                "unmount",
                &target,
                std::io::Error::from_raw_os_error(nix::libc::EINVAL),
            )),
        }
    }

    fn table(&self) -> Result<Vec<MountEntry>> {
        Ok(self.lock().clone())
    }
}

impl FakeMounter {
    /// The mount points currently recorded, for assertions.
    pub fn mount_points(&self) -> Vec<PathBuf> {
        self.lock().iter().map(|e| e.mount_point.clone()).collect()
    }
}
