//! The `fast-rwo` lane: each volume is a disk image `<data-dir>/block/<dir>/disk.img` on the
//! node that holds it, attached as a loop device with direct I/O when staged, formatted (xfs
//! or ext4) at its first stage, or handed to the pod as a raw block device.
//!
//! Rules this lane enforces (volume directories as [`VolumeDirs`] keeps them):
//! - a thick image is allocated whole at creation (the space is the volume's); a thin one is
//!   sparse;
//! - a volume's loop device is found from its image, never remembered ([`loopdev`]);
//! - delete refuses while the image is attached (staged somewhere on this node);
//! - expansion grows the image; the node then grows the device and the filesystem.

use std::path::{Path, PathBuf};

pub mod access;
pub mod controller;
pub mod format;
pub mod image;
pub mod loopdev;
pub mod node;

use super::local::{CreateRequest, LocalSettings, Space};
use super::snapshot::{SnapshotId, SnapshotMeta, Source};
use super::volumes::{Removed, VolumeDirs, check_compatible, now_unix};
use super::{BlockBackend, Error, Profiles, Range, Result, VolumeId, VolumeMeta};

/// The lane's name in volume IDs and profiles.
pub const LANE: &str = "fast-rwo";
const IMAGE: &str = "disk.img";

/// The `fast-rwo` lane's volumes on one node.
#[derive(Debug)]
pub struct BlockLane {
    volumes: VolumeDirs,
    snapshots: VolumeDirs<SnapshotMeta>,
    failpoint: crate::failpoint::Failpoint,
    node_id: String,
    settings: LocalSettings,
    profiles: Profiles,
}

/// What the lane offers on this node now, found without creating anything.
pub fn probe(data_dir: &Path) -> super::local::Probe {
    let mut probe = super::local::probe(data_dir);
    let loops = Path::new("/dev/loop-control").exists();
    if probe.available && !loops {
        probe.available = false;
        probe.reason = Some("/dev/loop-control is missing: this node has no loop devices".into());
    }
    probe.backend = format!(
        "a disk image per volume under {}, attached as a loop device",
        data_dir.join("block").display()
    );
    probe.capacity_enforced = true;
    probe.enforcement = "the volume is its own filesystem of its capacity".into();
    probe
}

impl BlockLane {
    /// Opens (creating if needed) the lane under `data_dir`; the controller role then calls
    /// [`BlockLane::recover`].
    pub fn open(
        data_dir: &Path,
        node_id: &str,
        settings: LocalSettings,
        profiles: Profiles,
    ) -> Result<BlockLane> {
        Ok(BlockLane {
            failpoint: crate::failpoint::Failpoint::from_env(),
            volumes: VolumeDirs::open(LANE, &data_dir.join("block"), data_dir.join("retained"))?,
            snapshots: VolumeDirs::open(
                LANE,
                &data_dir.join("snapshots").join(LANE),
                data_dir.join("retained"),
            )?,
            node_id: node_id.to_owned(),
            settings,
            profiles,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The directory of a volume (its record, image and format record).
    pub fn volume_dir(&self, id: &VolumeId) -> PathBuf {
        self.volumes.dir(id)
    }

    /// The volume's disk image.
    pub fn image_path(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir(id).join(IMAGE)
    }

    /// Creates the volume, or returns the existing one with that name if it is compatible.
    pub fn create(&self, request: &CreateRequest) -> Result<VolumeMeta> {
        let backend = self
            .profiles
            .get(&request.params.profile)
            .ok()
            .and_then(|p| p.block)
            .unwrap_or_default();
        let wanted = request.source.as_ref().map(ToString::to_string);
        let compatible = |existing: VolumeMeta| {
            if existing.content_source != wanted {
                return Err(Error::Incompatible {
                    name: super::id::printable(&request.name),
                    reason: "it was created from another source".into(),
                });
            }
            check_compatible(existing, &request.name, request.range, &request.params)
        };
        self.volumes.create(&request.name, compatible, |temp, id| {
            if request.dataset.is_some() {
                return Err(Error::InvalidParameter {
                    key: "dataset".into(),
                    reason: "fast-rwo volumes cannot start with a dataset yet; use a local or \
                             dataset volume"
                        .into(),
                });
            }
            let (capacity, content_source) = match &request.source {
                None => {
                    let capacity = request
                        .range
                        .resolve(self.settings.default_capacity, self.max_capacity()?)?;
                    image::make(&temp.join(IMAGE), capacity, backend.provisioning)?;
                    (capacity, None)
                }
                Some(source) => {
                    let capacity = self.copy_source(source, request, temp)?;
                    self.failpoint.hit("create.after-copy");
                    image::grow(&temp.join(IMAGE), capacity, backend.provisioning)?;
                    (capacity, Some(source.to_string()))
                }
            };
            let meta = VolumeMeta {
                name: request.name.clone(),
                id: id.to_string(),
                capacity_bytes: capacity,
                params: request.params.clone(),
                node_id: self.node_id.clone(),
                created_unix: now_unix(),
                project_id: None,
                dataset: None,
                block: Some(backend),
                content_source,
            };
            meta.store(temp)?;
            Ok(meta)
        })
    }

    /// The volume with this ID, or `UnknownVolume`.
    pub fn get(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.volumes.get(id)
    }

    /// All volumes, ordered by ID.
    pub fn list(&self) -> Result<Vec<VolumeMeta>> {
        self.volumes.list()
    }

    /// Copies the source's image (and its filesystem record) into `temp`; the capacity the
    /// new volume gets: the request's, which must hold the source, or the source's size.
    fn copy_source(&self, source: &Source, request: &CreateRequest, temp: &Path) -> Result<u64> {
        let (dir, size) = match source {
            Source::Snapshot(id) => {
                let snapshot = self.snapshots.get(&id.as_volume_id())?;
                (self.snapshots.dir(&id.as_volume_id()), snapshot.size_bytes)
            }
            Source::Volume(id) => {
                let volume = self.volumes.get(id)?;
                self.flush(id);
                (self.volume_dir(id), volume.capacity_bytes)
            }
        };
        let capacity = super::snapshot::capacity_from(request.range, size, self.max_capacity()?)?;
        image::copy(&dir.join(IMAGE), &temp.join(IMAGE))?;
        copy_format_record(&dir, temp)?;
        Ok(capacity)
    }

    /// Writes what a mounted filesystem of the volume holds in memory to its image, where
    /// this process can see the mount (best effort: a snapshot is crash-consistent anyway).
    fn flush(&self, id: &VolumeId) {
        let image = self.image_path(id);
        let Ok(Some(device)) = loopdev::find(&image) else {
            return;
        };
        let Ok(table) = crate::mount::mountinfo::read() else {
            return;
        };
        if let Some(mount) = table.iter().find(|e| (e.major, e.minor) == device.number)
            && let Ok(dir) = std::fs::File::open(&mount.mount_point)
        {
            let _ = nix::unistd::syncfs(&dir);
        }
    }

    /// Takes snapshot `name` of `source`: a copy of its image (reflink where the filesystem
    /// allows), independent of the volume from then on.
    pub fn snapshot(&self, name: &str, source: &VolumeId) -> Result<SnapshotMeta> {
        let compatible = super::snapshot::same_source(name, source);
        self.snapshots.create(name, compatible, |temp, _| {
            let volume = self.volumes.get(source)?;
            self.flush(source);
            let dir = self.volume_dir(source);
            let method = image::copy(&dir.join(IMAGE), &temp.join(IMAGE))?;
            self.failpoint.hit("snapshot.after-copy");
            copy_format_record(&dir, temp)?;
            let meta = SnapshotMeta {
                name: name.to_owned(),
                id: SnapshotId::for_name(LANE, name)?.to_string(),
                source_volume_id: source.to_string(),
                size_bytes: volume.capacity_bytes,
                created_unix: now_unix(),
                method: method.as_str().to_owned(),
            };
            super::snapshot::store(&meta, temp)?;
            Ok(meta)
        })
    }

    /// Deletes a snapshot; an unknown one is fine. Volumes restored from it keep their data.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.snapshots.delete(&id.as_volume_id(), |trash| {
            std::fs::remove_dir_all(trash).map_err(Error::io(format!("remove {}", trash.display())))
        })
    }

    /// Every snapshot, ordered by ID.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        self.snapshots.list()
    }

    /// Deletes the volume (an unknown one is fine); refuses while its image is attached.
    pub fn delete(&self, id: &VolumeId) -> Result<()> {
        let Some(meta) = self.volumes.find(id)? else {
            return Ok(());
        };
        let image = self.image_path(id);
        if image.exists()
            && let Some(device) =
                loopdev::find(&image).map_err(Error::io(format!("look for the device of {id}")))?
        {
            return Err(Error::Attached {
                id: id.to_string(),
                device: device.path,
            });
        }
        match self.volumes.remove(id, meta.params.on_delete)? {
            Removed::Retained(_) => Ok(()),
            Removed::Trashed(trash) => std::fs::remove_dir_all(&trash)
                .map_err(Error::io(format!("remove {}", trash.display()))),
        }
    }

    /// Grows the image to satisfy `range` (never shrinks); the new capacity. The node grows
    /// the device and the filesystem on it.
    pub fn expand(&self, id: &VolumeId, range: Range) -> Result<u64> {
        let mut meta = self.get(id)?;
        let Some(capacity) = range.grown(meta.capacity_bytes, || self.max_capacity())? else {
            return Ok(meta.capacity_bytes);
        };
        let provisioning = meta.block.unwrap_or_default().provisioning;
        image::grow(&self.image_path(id), capacity, provisioning)?;
        meta.capacity_bytes = capacity;
        self.volumes.store(&meta, id)?;
        Ok(capacity)
    }

    /// Space on the filesystem that holds the volumes.
    pub fn space(&self) -> Result<Space> {
        self.volumes.space()
    }

    fn max_capacity(&self) -> Result<u64> {
        self.volumes.max_capacity(self.settings.max_capacity)
    }

    /// Why the volume is unhealthy, or `None`: its image must be a file of its capacity.
    pub fn condition(&self, id: &VolumeId) -> Option<String> {
        let image = self.image_path(id);
        let capacity = self.get(id).ok()?.capacity_bytes;
        match std::fs::symlink_metadata(&image) {
            Ok(meta) if meta.is_file() && meta.len() >= capacity => None,
            Ok(meta) if meta.is_file() => Some(format!(
                "{} holds {} bytes, less than the volume's {capacity}",
                image.display(),
                meta.len()
            )),
            Ok(_) => Some(format!("{} is not a regular file", image.display())),
            Err(e) => Some(format!("{} is unreadable: {e}", image.display())),
        }
    }

    /// Removes what killed creates and deletes left behind. Only the role that creates and
    /// deletes may call it.
    pub fn recover(&self) -> Result<()> {
        let mut leftovers = self.volumes.leftovers()?;
        leftovers.extend(self.snapshots.leftovers()?);
        for leftover in leftovers {
            tracing::info!(path = %leftover.display(), "removing leftover of an interrupted call");
            std::fs::remove_dir_all(&leftover)
                .map_err(Error::io(format!("remove {}", leftover.display())))?;
        }
        Ok(())
    }
}

/// Copies a volume's filesystem record, so a copy of a formatted image is never formatted.
fn copy_format_record(from: &Path, to: &Path) -> Result<()> {
    if let Some(formatted) = format::formatted(from).map_err(|e| Error::Io {
        context: format!("read the format record in {}", from.display()),
        source: std::io::Error::other(e.to_string()),
    })? {
        format::record(to, formatted).map_err(|e| Error::Io {
            context: format!("write the format record in {}", to.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

/// The settings a `fast-rwo` volume was made with (older records: the defaults).
pub fn backend(meta: &VolumeMeta) -> BlockBackend {
    meta.block.unwrap_or_default()
}
