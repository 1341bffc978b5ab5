//! The `shared-rwx` lane: each volume is a subdirectory of a shared JuiceFS file system,
//! `/<prefix>/<dir>/data`, limited by a JuiceFS directory quota of the volume's capacity.
//!
//! Rules this lane enforces:
//! - the quota is set on the volume's directory before the volume exists (it is built under
//!   `.tmp-*` and renamed into place; a JuiceFS quota follows its directory);
//! - a delete touches that one directory only: renamed out of the volumes (to `.trash-*`,
//!   or aside for `retain` / `archive`), then removed with `juicefs rmr`;
//! - one FUSE mount per file system per process ([`FileSystem`]), in a cgroup of its own so a
//!   restart of the plugin's container does not take it down; volumes are binds of it;
//! - secrets (the metadata password, object storage keys) come from the environment variables
//!   the profile names and reach `juicefs` only through its environment, never its argv.

pub mod config;
pub mod controller;
pub mod fs;
pub mod node;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use config::{JuiceFs, RawJuiceFs};
pub use fs::FileSystem;

use super::local::{CreateRequest, LocalSettings, Space};
use super::volumes::{Removed, VolumeDirs, check_compatible};
use super::{Error, Profiles, Range, Result, VolumeId, VolumeMeta};

/// The lane's name in volume IDs and profiles.
pub const LANE: &str = "shared-rwx";
/// The directory inside a volume's directory that pods see.
const DATA: &str = "data";
const MIB: u64 = 1 << 20;

/// The `shared-rwx` lane: one [`FileSystem`] per profile.
#[derive(Debug)]
pub struct JuiceFsLane {
    filesystems: BTreeMap<String, Arc<FileSystem>>,
    settings: LocalSettings,
    failpoint: crate::failpoint::Failpoint,
}

impl JuiceFsLane {
    /// The lane for every `shared-rwx` profile; nothing is mounted until a volume needs it.
    pub fn new(
        data_dir: &Path,
        profiles: &Profiles,
        settings: LocalSettings,
        controller_only: bool,
    ) -> JuiceFsLane {
        let filesystems = profiles
            .iter()
            .filter_map(|p| {
                let config = p.juicefs.clone()?;
                let fs = FileSystem::for_role(data_dir, &p.name, config, controller_only);
                Some((p.name.clone(), Arc::new(fs)))
            })
            .collect();
        JuiceFsLane {
            filesystems,
            settings,
            failpoint: crate::failpoint::Failpoint::from_env(),
        }
    }

    /// Whether any profile uses this lane.
    pub fn is_empty(&self) -> bool {
        self.filesystems.is_empty()
    }

    /// Every file system of the lane.
    pub fn filesystems(&self) -> impl Iterator<Item = &Arc<FileSystem>> {
        self.filesystems.values()
    }

    /// The file system a volume ID (or a profile name) names.
    pub fn fs(&self, profile: &str) -> Result<&Arc<FileSystem>> {
        self.filesystems.get(profile).ok_or_else(|| {
            Error::UnknownVolume(format!(
                "{LANE}/{profile}: no shared-rwx profile of that name here"
            ))
        })
    }

    pub fn fs_of(&self, id: &VolumeId) -> Result<&Arc<FileSystem>> {
        self.fs(id.fs().unwrap_or_default())
    }

    /// The volume directories of `fs`, mounting it when needed.
    fn volumes<'a>(&self, fs: &'a FileSystem) -> Result<&'a VolumeDirs> {
        fs.ensure_mounted()?;
        self.dirs(fs)
    }

    /// The volume directories of `fs`, which the caller has just found mounted.
    fn dirs<'a>(&self, fs: &'a FileSystem) -> Result<&'a VolumeDirs> {
        let volumes = fs.volume_dirs(|| {
            VolumeDirs::open_in(LANE, &fs.profile, &fs.volumes_dir(), fs.retained_dir())
        })?;
        fs.recover_once(|| self.recover(fs, volumes))?;
        Ok(volumes)
    }

    /// The volume with this ID in its file system, which the caller has just found mounted.
    pub fn get_mounted(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.dirs(self.fs_of(id)?)?.get(id)
    }

    /// The directory pods see, in this process's mount of the volume's file system.
    pub fn data_path(&self, id: &VolumeId) -> Result<PathBuf> {
        Ok(self.fs_of(id)?.volumes_dir().join(id.dir()).join(DATA))
    }

    /// Creates the volume (a directory with its quota), or returns the existing one of that
    /// name if it is compatible.
    pub fn create(&self, request: &CreateRequest) -> Result<VolumeMeta> {
        let fs = self.fs(&request.params.profile)?;
        if request.source.is_some() {
            return Err(Error::Unsupported(
                "shared-rwx volumes cannot be made from snapshots or volumes".into(),
            ));
        }
        if request.dataset.is_some() {
            return Err(Error::InvalidParameter {
                key: "dataset".into(),
                reason: "shared-rwx volumes cannot start with a dataset yet; use a local or \
                         dataset volume"
                    .into(),
            });
        }
        let volumes = self.volumes(fs)?;
        let compatible =
            |existing| check_compatible(existing, &request.name, request.range, &request.params);
        volumes.create(&request.name, compatible, |temp, id| {
            let capacity = round_mib(
                request
                    .range
                    .resolve(self.settings.default_capacity, self.max_capacity(volumes)?)?,
                request.range,
            )?;
            let data = temp.join(DATA);
            std::fs::create_dir(&data).map_err(Error::io(format!("create {}", data.display())))?;
            fs.set_quota(&data, capacity)?;
            self.failpoint.hit("create.after-quota");
            let meta = VolumeMeta::plain(
                &request.name,
                id.to_string(),
                capacity,
                request.params.clone(),
            );
            meta.store(temp)?;
            Ok(meta)
        })
    }

    /// The volume with this ID, or `UnknownVolume`.
    pub fn get(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.volumes(self.fs_of(id)?)?.get(id)
    }

    /// Every volume of every file system, ordered by ID.
    pub fn list(&self) -> Result<Vec<VolumeMeta>> {
        let mut all = Vec::new();
        for fs in self.filesystems.values() {
            all.extend(self.volumes(fs)?.list()?);
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// Deletes the volume as its `onDelete` says (an unknown one is fine); its quota goes
    /// with it.
    pub fn delete(&self, id: &VolumeId) -> Result<()> {
        let fs = self.fs_of(id)?;
        let (device, _) = fs.ensure_mounted()?;
        let volumes = self.dirs(fs)?;
        let Some(meta) = volumes.find(id)? else {
            return Ok(());
        };
        // Mounts elsewhere are the CO's to know; binds of this process's mount are refused.
        let root = fs.inside(&volumes.dir(id).join(DATA))?;
        let table = crate::mount::mountinfo::read().map_err(Error::io("read the mount table"))?;
        if let Some(bind) = table
            .iter()
            .find(|e| (e.major, e.minor) == device && e.root == root)
        {
            return Err(Error::InUse {
                id: id.to_string(),
                path: bind.mount_point.clone(),
            });
        }
        match volumes.remove(id, meta.params.on_delete)? {
            Removed::Retained(kept) => fs.delete_quota(&kept.join(DATA)),
            Removed::Trashed(trash) => self.destroy(fs, &trash),
        }
    }

    /// Removes a volume directory that is already out of the volumes (a `.trash-*` or a
    /// `.tmp-*` left by a killed create), quota first.
    fn destroy(&self, fs: &FileSystem, dir: &Path) -> Result<()> {
        if dir.join(DATA).exists() {
            fs.delete_quota(&dir.join(DATA))?;
        }
        fs.remove_tree(dir)
    }

    /// Raises the quota to satisfy `range` (never lowers it); the new capacity.
    pub fn expand(&self, id: &VolumeId, range: Range) -> Result<u64> {
        let fs = self.fs_of(id)?;
        let volumes = self.volumes(fs)?;
        let mut meta = volumes.get(id)?;
        let Some(grown) = range.grown(meta.capacity_bytes, || self.max_capacity(volumes))? else {
            return Ok(meta.capacity_bytes);
        };
        let capacity = round_mib(grown, range)?;
        fs.set_quota(&volumes.dir(id).join(DATA), capacity)?;
        meta.capacity_bytes = capacity;
        volumes.store(&meta, id)?;
        Ok(capacity)
    }

    /// What the file system of `profile` (every one when `None`) says it has.
    pub fn space(&self, profile: Option<&str>) -> Result<Option<Space>> {
        let mut total = Space {
            total_bytes: 0,
            available_bytes: 0,
        };
        let mut any = false;
        for (name, fs) in &self.filesystems {
            if profile.is_some_and(|p| p != name) {
                continue;
            }
            let space = self.volumes(fs)?.space()?;
            total.total_bytes = total.total_bytes.saturating_add(space.total_bytes);
            total.available_bytes = total.available_bytes.max(space.available_bytes);
            any = true;
        }
        Ok(any.then_some(total))
    }

    fn max_capacity(&self, volumes: &VolumeDirs) -> Result<u64> {
        volumes.max_capacity(self.settings.max_capacity)
    }

    /// Why the volume is unhealthy, or `None`: its data directory must be there.
    pub fn condition(&self, id: &VolumeId) -> Result<Option<String>> {
        let data = self.data_path(id)?;
        Ok(match std::fs::symlink_metadata(&data) {
            Ok(meta) if meta.is_dir() => None,
            Ok(_) => Some(format!("{} is not a directory", data.display())),
            Err(e) => Some(format!("{} is unreadable: {e}", data.display())),
        })
    }

    /// Removes what killed creates and deletes left in `fs`'s volumes.
    fn recover(&self, fs: &FileSystem, volumes: &VolumeDirs) -> Result<()> {
        for leftover in volumes.leftovers()? {
            tracing::info!(path = %leftover.display(), "removing leftover of an interrupted call");
            self.destroy(fs, &leftover)?;
        }
        Ok(())
    }
}

/// What a `shared-rwx` profile offers now: whether its metadata engine answers, whether this
/// node's mount of it is alive, and its used and free space.
pub fn probe(data_dir: &Path, profile: &str, config: &JuiceFs) -> super::local::Probe {
    let fs = FileSystem::new(data_dir, profile, config.clone());
    let mount = match fs.state() {
        Ok(fs::MountState::Alive(_)) => "mounted on this node, answering".to_owned(),
        Ok(fs::MountState::Missing) => "not mounted on this node yet".to_owned(),
        Ok(fs::MountState::Dead(why)) => format!("mount DEAD on this node ({why})"),
        Err(e) => e.to_string(),
    };
    let status = fs.status();
    let (reason, free) = match &status {
        Ok((_, available)) => (None, Some(*available)),
        Err(e) => (Some(format!("metadata engine unreachable: {e}")), None),
    };
    let used = status
        .map(|(used, _)| format!(", {} used", crate::units::human(used)))
        .unwrap_or_default();
    super::local::Probe {
        available: reason.is_none(),
        reason,
        backend: format!("JuiceFS {}/{} ({mount}{used})", config.name, config.prefix),
        capacity_enforced: true,
        enforcement: "JuiceFS directory quota per volume".into(),
        free_bytes: free,
    }
}

/// `bytes` rounded up to whole MiB (JuiceFS quotas count in 4 KiB blocks; whole MiB keep the
/// reported size exact), still within the range's limit.
fn round_mib(bytes: u64, range: Range) -> Result<u64> {
    let rounded = bytes.div_ceil(MIB).saturating_mul(MIB);
    if range.limit > 0 && rounded > range.limit as u64 {
        return Err(Error::Capacity(format!(
            "shared-rwx volumes come in whole MiB; no whole MiB lies between {} and {} bytes",
            range.required.max(0),
            range.limit
        )));
    }
    Ok(rounded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_round_up_to_mib() {
        let any = Range::default();
        assert_eq!(round_mib(1, any).unwrap(), MIB);
        assert_eq!(round_mib(MIB, any).unwrap(), MIB);
        assert_eq!(round_mib(MIB + 1, any).unwrap(), 2 * MIB);
        let tight = Range {
            required: (MIB + 1) as i64,
            limit: (MIB + 100) as i64,
        };
        assert!(round_mib(MIB + 1, tight).is_err());
    }
}
