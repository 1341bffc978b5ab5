//! Volume directories: how every node-local lane keeps its volumes on disk.
//!
//! Each volume is `<base>/<dir>/` holding `volume.json` and whatever the lane puts beside it
//! (a data directory, a disk image). Rules kept here for every lane that uses it:
//! - a volume appears whole or not at all: it is built under `.tmp-*` and renamed into place;
//!   a delete renames it to `.trash-*` (or into `retained/`) first, and the rename is synced;
//! - create is idempotent by name: a compatible existing volume is returned, an incompatible
//!   one is `Incompatible` (ALREADY_EXISTS);
//! - leftovers of a killed create or delete are found by [`VolumeDirs::leftovers`] and removed
//!   by the lane that made them (only it knows what they hold).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use super::params::OnDelete;
use super::{Error, Result, VolumeId, VolumeMeta};

const TEMP_PREFIX: &str = ".tmp-";
const TRASH_PREFIX: &str = ".trash-";

/// What a directory's record is: a volume's `volume.json`, a snapshot's `snapshot.json`.
pub trait Record: Sized {
    /// Reads the record in directory `dir`.
    fn load(dir: &Path) -> Result<Self>;
    /// The record's file name in its directory.
    const FILE: &'static str;
}

impl Record for VolumeMeta {
    fn load(dir: &Path) -> Result<Self> {
        VolumeMeta::load(dir)
    }
    const FILE: &'static str = super::meta::FILE;
}

impl Record for super::snapshot::SnapshotMeta {
    fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let bytes = std::fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            context: format!("parse {}", path.display()),
            source: std::io::Error::other(e),
        })
    }
    const FILE: &'static str = "snapshot.json";
}

/// The volume (or snapshot) directories of one lane.
#[derive(Debug)]
pub struct VolumeDirs<R = VolumeMeta> {
    record: std::marker::PhantomData<fn() -> R>,
    lane: &'static str,
    /// The file system (profile) of the volumes, on lanes whose IDs name one.
    fs: Option<String>,
    base: PathBuf,
    retained: PathBuf,
    /// Concurrent creates and deletes share one sync of `base`.
    syncer: crate::fsutil::DirSyncer,
}

/// What a delete did with a volume's directory.
#[derive(Debug)]
pub enum Removed {
    /// Moved to `.trash-*` in the base: the lane empties it and calls [`VolumeDirs::purge`].
    Trashed(PathBuf),
    /// Moved under `retained/` for an admin.
    Retained(PathBuf),
}

fn stamp() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Seconds since the epoch, for a new volume's record.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl<R: Record> VolumeDirs<R> {
    /// Opens (creating if needed) `base` for `lane`'s volumes; retained volumes go to
    /// `retained`.
    pub fn open(lane: &'static str, base: &Path, retained: PathBuf) -> Result<VolumeDirs<R>> {
        std::fs::create_dir_all(base).map_err(Error::io(format!("create {}", base.display())))?;
        let base = base
            .canonicalize()
            .map_err(Error::io(format!("resolve {}", base.display())))?;
        Ok(VolumeDirs {
            record: std::marker::PhantomData,
            lane,
            fs: None,
            base,
            retained,
            syncer: Default::default(),
        })
    }

    /// Opens `base` for the volumes of file system `fs` of `lane` (IDs `<lane>/<fs>/<dir>`).
    pub fn open_in(
        lane: &'static str,
        fs: &str,
        base: &Path,
        retained: PathBuf,
    ) -> Result<VolumeDirs<R>> {
        let mut dirs = Self::open(lane, base, retained)?;
        dirs.fs = Some(fs.to_owned());
        Ok(dirs)
    }

    /// The ID the volume called `name` has here.
    fn id_for(&self, name: &str) -> Result<VolumeId> {
        match &self.fs {
            Some(fs) => VolumeId::in_fs(self.lane, fs, name),
            None => VolumeId::for_name(self.lane, name),
        }
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The directory of a volume.
    pub fn dir(&self, id: &VolumeId) -> PathBuf {
        self.base.join(id.dir())
    }

    /// Makes the last rename in the base durable (one sync shared by concurrent callers).
    fn synced(&self) -> Result<()> {
        self.syncer
            .sync(&self.base)
            .map_err(Error::io(format!("sync {}", self.base.display())))
    }

    /// The volume with this ID, or `None`.
    pub fn find(&self, id: &VolumeId) -> Result<Option<R>> {
        let dir = self.dir(id);
        if !dir.join(R::FILE).exists() {
            return Ok(None);
        }
        R::load(&dir).map(Some)
    }

    /// The volume with this ID, or `UnknownVolume`.
    pub fn get(&self, id: &VolumeId) -> Result<R> {
        self.find(id)?
            .ok_or_else(|| Error::UnknownVolume(id.to_string()))
    }

    /// All volumes, ordered by ID.
    pub fn list(&self) -> Result<Vec<R>> {
        let entries = std::fs::read_dir(&self.base)
            .map_err(Error::io(format!("list {}", self.base.display())))?;
        let mut names: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .collect();
        names.sort();
        let mut volumes = Vec::with_capacity(names.len());
        for name in names {
            let id = match &self.fs {
                Some(fs) => format!("{}/{fs}/{name}", self.lane),
                None => format!("{}/{name}", self.lane),
            };
            if let Ok(id) = VolumeId::parse(&id)
                && let Some(meta) = self.find(&id)?
            {
                volumes.push(meta);
            }
        }
        Ok(volumes)
    }

    /// Creates the volume `name` by calling `build` on a fresh temporary directory and
    /// renaming it into place; an existing volume of that name is returned when `compatible`
    /// accepts it. `build` writes the record ([`VolumeMeta::store`]) and returns it.
    pub fn create(
        &self,
        name: &str,
        compatible: impl Fn(R) -> Result<R>,
        build: impl FnOnce(&Path, &VolumeId) -> Result<R>,
    ) -> Result<R> {
        let id = self.id_for(name)?;
        if let Some(existing) = self.find(&id)? {
            return compatible(existing);
        }
        let temp = self
            .base
            .join(format!("{TEMP_PREFIX}{}-{}", id.dir(), stamp()));
        std::fs::create_dir(&temp).map_err(Error::io(format!("create {}", temp.display())))?;
        let meta = match build(&temp, &id) {
            Ok(meta) => meta,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&temp);
                return Err(e);
            }
        };
        match std::fs::rename(&temp, self.dir(&id)) {
            Ok(()) => {
                self.synced()?;
                Ok(meta)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&temp);
                // Someone else finished the same create first: answer as a repeat would.
                match self.find(&id)? {
                    Some(existing) => compatible(existing),
                    None => Err(Error::io(format!("rename into {id}"))(e)),
                }
            }
        }
    }

    /// Moves the volume's directory out of the base: aside under `retained/` or to a
    /// `.trash-*` directory the lane then empties.
    pub fn remove(&self, id: &VolumeId, on_delete: OnDelete) -> Result<Removed> {
        let dir = self.dir(id);
        match on_delete {
            OnDelete::Retain | OnDelete::Archive => {
                std::fs::create_dir_all(&self.retained)
                    .map_err(Error::io(format!("create {}", self.retained.display())))?;
                let kind = match on_delete {
                    OnDelete::Archive => "archived-",
                    _ => "",
                };
                let kept = self
                    .retained
                    .join(format!("{kind}{}-{}", id.dir(), stamp()));
                std::fs::rename(&dir, &kept)
                    .map_err(Error::io(format!("move {id} to {}", kept.display())))?;
                Ok(Removed::Retained(kept))
            }
            OnDelete::Delete => {
                let trash = self
                    .base
                    .join(format!("{TRASH_PREFIX}{}-{}", id.dir(), stamp()));
                std::fs::rename(&dir, &trash).map_err(Error::io(format!("delete {id}")))?;
                self.synced()?;
                Ok(Removed::Trashed(trash))
            }
        }
    }

    /// Space on the filesystem that holds the directories.
    pub fn space(&self) -> Result<super::local::Space> {
        let stat = nix::sys::statvfs::statvfs(&self.base)
            .map_err(|e| Error::io(format!("statvfs {}", self.base.display()))(e.into()))?;
        let fragment = stat.fragment_size();
        Ok(super::local::Space {
            total_bytes: stat.blocks().saturating_mul(fragment),
            available_bytes: stat.blocks_available().saturating_mul(fragment),
        })
    }

    /// The largest volume: `configured`, or the size of the filesystem under the base.
    pub fn max_capacity(&self, configured: Option<u64>) -> Result<u64> {
        match configured {
            Some(max) => Ok(max),
            None => Ok(self.space()?.total_bytes),
        }
    }

    /// Deletes the directory of `id` (an unknown one is fine): renamed to `.trash-*` and
    /// synced, then emptied by `destroy` (which knows what the lane put in it).
    pub fn delete(&self, id: &VolumeId, destroy: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        if self.find(id)?.is_none() {
            return Ok(());
        }
        match self.remove(id, OnDelete::Delete)? {
            Removed::Trashed(dir) | Removed::Retained(dir) => destroy(&dir),
        }
    }

    /// The lane whose directories these are.
    pub fn lane(&self) -> &'static str {
        self.lane
    }

    /// Directories a killed create or delete left in the base (`.tmp-*`, `.trash-*`).
    pub fn leftovers(&self) -> Result<Vec<PathBuf>> {
        let entries = std::fs::read_dir(&self.base)
            .map_err(Error::io(format!("list {}", self.base.display())))?;
        Ok(entries
            .flatten()
            .filter(|entry| {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                name.starts_with(TEMP_PREFIX) || name.starts_with(TRASH_PREFIX)
            })
            .map(|entry| entry.path())
            .collect())
    }
}

impl VolumeDirs<VolumeMeta> {
    /// Rewrites the record of an existing volume.
    pub fn store(&self, meta: &VolumeMeta, id: &VolumeId) -> Result<()> {
        meta.store(&self.dir(id))
    }
}

/// The rule for a repeated create: the same name, a capacity inside the requested range and
/// the same parameters; anything else is `Incompatible`.
pub fn check_compatible(
    existing: VolumeMeta,
    name: &str,
    range: super::Range,
    params: &super::CreateParams,
) -> Result<VolumeMeta> {
    let incompatible = |reason: String| Error::Incompatible {
        name: super::id::printable(name),
        reason,
    };
    if existing.name != name {
        return Err(incompatible(format!(
            "its directory belongs to another name ({:?})",
            existing.name
        )));
    }
    if !range.admits(existing.capacity_bytes)? {
        return Err(incompatible(format!(
            "it has {} bytes, outside the requested range",
            existing.capacity_bytes
        )));
    }
    if existing.params != *params {
        return Err(incompatible("it was created with other parameters".into()));
    }
    Ok(existing)
}
