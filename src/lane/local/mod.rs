//! The `local` lane: each volume is `<data-dir>/volumes/<dir>/` holding `volume.json` and the
//! volume's `data/` directory, on the node where the plugin runs.
//!
//! Rules this lane enforces (with [`VolumeDirs`]: whole-or-nothing creates and deletes,
//! idempotent by name, leftovers of a killed call cleaned at start):
//! - delete touches only the volume's own directory and refuses while it is still mounted;
//! - capacity is enforced where the filesystem allows: on btrfs with quotas, `data/` is a
//!   subvolume whose quota group is limited to the capacity; on XFS with `prjquota`, `data/`
//!   has a project with a hard block limit; elsewhere it is recorded and reported only.

use std::path::{Path, PathBuf};

pub mod access;
pub mod controller;
pub mod node;

use super::quota::{Enforcement, Quota};
use super::snapshot::{SnapshotId, SnapshotMeta, Source};
use super::volumes::{Removed, VolumeDirs, check_compatible, now_unix};
use super::{CreateParams, Error, Range, Result, VolumeId, VolumeMeta};
use crate::mount::{MountEntry, Origin};

/// The lane's name in volume IDs and profiles.
pub const LANE: &str = "local";
/// The topology key whose value is the node that holds a local volume.
pub const TOPOLOGY_KEY: &str = "topology.lanes.csi.dev/node";
const DATA: &str = "data";

/// Settings of the local lane.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// Size of a volume whose request names none.
    pub default_capacity: u64,
    /// Largest volume; `None` means the size of the filesystem under the base.
    pub max_capacity: Option<u64>,
}

/// A volume creation request, already validated at the edge.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub name: String,
    pub range: Range,
    pub params: CreateParams,
    /// The pinned dataset the volume starts with (from `params.dataset`, resolved).
    pub dataset: Option<String>,
    /// The snapshot or volume the new volume starts as a copy of.
    pub source: Option<crate::lane::snapshot::Source>,
}

/// The local lane on one node.
#[derive(Debug)]
pub struct LocalLane {
    volumes: VolumeDirs,
    snapshots: VolumeDirs<SnapshotMeta>,
    node_id: String,
    settings: LocalSettings,
    enforcement: Enforcement,
}

/// What the local lane offers on this node now, found without creating anything.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Probe {
    pub available: bool,
    /// Why not, when not available.
    pub reason: Option<String>,
    pub backend: String,
    pub capacity_enforced: bool,
    /// How capacity is enforced, or why it is not.
    pub enforcement: String,
    pub free_bytes: Option<u64>,
}

/// Looks at where the local lane of `data_dir` keeps volumes (or would: the nearest existing
/// directory on the way), creating nothing.
pub fn probe(data_dir: &Path) -> Probe {
    let base = data_dir.join("volumes");
    let Some(existing) = base.ancestors().find(|p| p.exists()) else {
        return Probe {
            available: false,
            reason: Some(format!("no part of {} exists", base.display())),
            backend: format!("a directory per volume under {}", base.display()),
            capacity_enforced: false,
            enforcement: "unknown".into(),
            free_bytes: None,
        };
    };
    let fs = nix::sys::statfs::statfs(existing)
        .map(|s| fs_name(s.filesystem_type().0))
        .unwrap_or("unknown filesystem");
    let free = nix::sys::statvfs::statvfs(existing)
        .map(|s| s.blocks_available().saturating_mul(s.fragment_size()))
        .ok();
    let writable = nix::unistd::access(existing, nix::unistd::AccessFlags::W_OK).is_ok();
    let enforcement = Enforcement::detect(existing);
    let (capacity_enforced, how) = match &enforcement {
        Enforcement::Xfs(_) => (true, "XFS project quota per volume".to_owned()),
        Enforcement::Btrfs => (true, "btrfs quota group per volume".to_owned()),
        Enforcement::NotEnforced(why) => (false, why.clone()),
    };
    let reason = if !writable {
        Some(format!("{} is not writable here", existing.display()))
    } else if free == Some(0) {
        Some(format!("no space left under {}", existing.display()))
    } else {
        None
    };
    Probe {
        available: reason.is_none(),
        reason,
        backend: format!("a directory per volume under {} ({fs})", base.display()),
        capacity_enforced,
        enforcement: how,
        free_bytes: free,
    }
}

fn fs_name(magic: i64) -> &'static str {
    match magic {
        0xef53 => "ext4",
        0x5846_5342 => "xfs",
        super::btrfs::BTRFS_SUPER_MAGIC => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794c_7630 => "overlayfs",
        _ => "other filesystem",
    }
}

/// The topology of a volume on `node`.
pub fn node_segments(node: &str) -> crate::lane::controller::Segments {
    [(TOPOLOGY_KEY.to_owned(), node.to_owned())].into()
}

/// Where a node-local lane on `node` puts a new volume: this node, when the CO's requisite
/// topologies (empty: anywhere) allow it.
pub fn place_on(
    node: &str,
    requisite: &[crate::lane::controller::Segments],
) -> Option<crate::lane::controller::Segments> {
    let ours = node_segments(node);
    let fits = |wanted: &crate::lane::controller::Segments| {
        wanted.iter().all(|(k, v)| ours.get(k) == Some(v))
    };
    (requisite.is_empty() || requisite.iter().any(fits)).then_some(ours)
}

/// True when GetCapacity asks about another node than `node`.
pub fn elsewhere(segments: Option<&crate::lane::controller::Segments>, node: &str) -> bool {
    segments.is_some_and(|s| s.get(TOPOLOGY_KEY).is_some_and(|n| n != node))
}

/// Space figures of the lane's backing filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

impl LocalLane {
    /// Opens (creating if needed) the lane under `data_dir`. The controller role then calls
    /// [`LocalLane::recover`].
    pub fn open(data_dir: &Path, node_id: &str, settings: LocalSettings) -> Result<LocalLane> {
        let volumes = VolumeDirs::open(LANE, &data_dir.join("volumes"), data_dir.join("retained"))?;
        let enforcement = Enforcement::detect(volumes.base());
        Ok(LocalLane {
            snapshots: VolumeDirs::open(
                LANE,
                &data_dir.join("snapshots").join(LANE),
                data_dir.join("retained"),
            )?,
            volumes,
            node_id: node_id.to_owned(),
            settings,
            enforcement,
        })
    }

    /// Why capacity is not enforced, or `None` when it is.
    pub fn enforcement_gap(&self) -> Option<&str> {
        match &self.enforcement {
            Enforcement::Xfs(_) | Enforcement::Btrfs => None,
            Enforcement::NotEnforced(why) => Some(why),
        }
    }

    /// How capacity is enforced, in a few words (for logs and `lanes profiles`).
    pub fn enforcement(&self) -> &'static str {
        match &self.enforcement {
            Enforcement::Xfs(_) => "XFS project quota",
            Enforcement::Btrfs => "btrfs quota group",
            Enforcement::NotEnforced(_) => "not enforced",
        }
    }

    /// The volume's own usage and limit in bytes, where the filesystem keeps them per volume
    /// (btrfs quota groups); `None` where `statvfs` of the mount says it (XFS project quotas)
    /// or nothing does.
    pub fn usage(&self, id: &VolumeId) -> Result<Option<(u64, u64)>> {
        let Enforcement::Btrfs = self.enforcement else {
            return Ok(None);
        };
        let data = self.data_path(id);
        if !super::btrfs::is_subvolume(&data) {
            return Ok(None);
        }
        let used = super::btrfs::usage(&data)
            .map_err(Error::io(format!("read the quota group of {id}")))?;
        Ok(Some((used, self.get(id)?.capacity_bytes)))
    }

    fn quota(&self) -> Option<&Quota> {
        match &self.enforcement {
            Enforcement::Xfs(quota) => Some(quota),
            Enforcement::Btrfs | Enforcement::NotEnforced(_) => None,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    fn volume_dir(&self, id: &VolumeId) -> PathBuf {
        self.volumes.dir(id)
    }

    /// The directory holding a volume's data: what gets staged and published.
    pub fn data_path(&self, id: &VolumeId) -> PathBuf {
        self.volume_dir(id).join(DATA)
    }

    /// Creates the volume, or returns the existing one with that name if it is compatible.
    pub fn create(&self, request: &CreateRequest) -> Result<VolumeMeta> {
        let compatible =
            |existing| check_compatible(existing, &request.name, request.range, &request.params);
        self.volumes.create(&request.name, compatible, |temp, id| {
            if let Some(source) = &request.source {
                return self.build_from(temp, id, request, source);
            }
            let capacity = request
                .range
                .resolve(self.settings.default_capacity, self.max_capacity()?)?;
            self.build(temp, id, request, capacity)
        })
    }

    /// Why this lane cannot snapshot or clone here, or `None` on btrfs with quotas.
    fn no_snapshots(&self) -> Option<Error> {
        match self.enforcement {
            Enforcement::Btrfs => None,
            _ => Some(Error::Unsupported(
                "local volumes can be snapshotted and cloned only where <data-dir>/volumes is on \
                 btrfs with quotas; use a fast-rwo profile"
                    .into(),
            )),
        }
    }

    /// A volume whose data is a writable btrfs snapshot of a snapshot's or a volume's data,
    /// limited to its capacity (at least the source's).
    fn build_from(
        &self,
        temp: &Path,
        id: &VolumeId,
        request: &CreateRequest,
        source: &Source,
    ) -> Result<VolumeMeta> {
        if let Some(why) = self.no_snapshots() {
            return Err(why);
        }
        let (data, size) = match source {
            Source::Snapshot(snapshot) => {
                let key = snapshot.as_volume_id();
                let meta = self.snapshots.get(&key)?;
                (self.snapshots.dir(&key).join(DATA), meta.size_bytes)
            }
            Source::Volume(volume) => (self.data_path(volume), self.get(volume)?.capacity_bytes),
        };
        let capacity = super::snapshot::capacity_from(request.range, size, self.max_capacity()?)?;
        super::btrfs::snapshot_subvolume(&data, temp, DATA.as_ref(), false)
            .map_err(Error::io(format!("snapshot {source} into {id}")))?;
        super::btrfs::set_limit(&temp.join(DATA), capacity)
            .map_err(Error::io(format!("limit the quota group of {id}")))?;
        let meta = VolumeMeta {
            name: request.name.clone(),
            id: id.to_string(),
            capacity_bytes: capacity,
            params: request.params.clone(),
            node_id: self.node_id.clone(),
            created_unix: now_unix(),
            project_id: None,
            dataset: None,
            block: None,
            content_source: Some(source.to_string()),
        };
        meta.store(temp)?;
        Ok(meta)
    }

    /// Takes snapshot `name` of `source`: a read-only btrfs snapshot of its data (O(1)).
    pub fn snapshot(&self, name: &str, source: &VolumeId) -> Result<SnapshotMeta> {
        self.get(source)?;
        if let Some(why) = self.no_snapshots() {
            return Err(why);
        }
        let compatible = super::snapshot::same_source(name, source);
        self.snapshots.create(name, compatible, |temp, _| {
            let volume = self.get(source)?;
            super::btrfs::snapshot_subvolume(&self.data_path(source), temp, DATA.as_ref(), true)
                .map_err(Error::io(format!("snapshot {source}")))?;
            let meta = SnapshotMeta {
                name: name.to_owned(),
                id: SnapshotId::for_name(LANE, name)?.to_string(),
                source_volume_id: source.to_string(),
                size_bytes: volume.capacity_bytes,
                created_unix: now_unix(),
                method: "btrfs snapshot".into(),
            };
            super::snapshot::store(&meta, temp)?;
            Ok(meta)
        })
    }

    /// Deletes a snapshot; an unknown one is fine.
    pub fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.snapshots.delete(&id.as_volume_id(), remove_volume_dir)
    }

    /// Every snapshot, ordered by ID.
    pub fn list_snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        self.snapshots.list()
    }

    fn build(
        &self,
        temp: &Path,
        id: &VolumeId,
        request: &CreateRequest,
        capacity: u64,
    ) -> Result<VolumeMeta> {
        let data = temp.join(DATA);
        if let Enforcement::Btrfs = self.enforcement {
            super::btrfs::create_subvolume(temp, DATA.as_ref())
                .map_err(Error::io(format!("create the subvolume of {id}")))?;
            super::btrfs::set_limit(&data, capacity)
                .map_err(Error::io(format!("limit the quota group of {id}")))?;
        } else {
            std::fs::create_dir_all(&data)
                .map_err(Error::io(format!("create {}", data.display())))?;
        }
        // World-writable like a fresh hostPath volume, so pods without fsGroup can write;
        // fsGroup / volume_mount_group narrow this at publish.
        set_mode(&data, 0o777)?;
        let project_id = match self.quota() {
            Some(quota) => {
                let project = quota.assign(&data, id.dir())?;
                quota.set_limit(project, capacity)?;
                Some(project)
            }
            None => None,
        };
        let meta = VolumeMeta {
            name: request.name.clone(),
            id: id.to_string(),
            capacity_bytes: capacity,
            params: request.params.clone(),
            node_id: self.node_id.clone(),
            created_unix: now_unix(),
            project_id,
            dataset: request.dataset.clone(),
            block: None,
            content_source: None,
        };
        meta.store(temp)?;
        Ok(meta)
    }

    /// The volume with this ID, or `None`.
    pub fn find(&self, id: &VolumeId) -> Result<Option<VolumeMeta>> {
        self.volumes.find(id)
    }

    /// The volume with this ID, or `UnknownVolume`.
    pub fn get(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.volumes.get(id)
    }

    /// All volumes, ordered by ID.
    pub fn list(&self) -> Result<Vec<VolumeMeta>> {
        self.volumes.list()
    }

    /// Deletes the volume. Deleting a volume that does not exist succeeds. Refuses with
    /// `InUse` while any mount in `table` shows the volume's data.
    pub fn delete(&self, id: &VolumeId, table: &[MountEntry]) -> Result<()> {
        let dir = self.volume_dir(id);
        let Some(meta) = self.find(id)? else {
            return Ok(());
        };
        let origin = Origin::of(table, &dir.join(DATA));
        if let Some(mount) = table.iter().find(|entry| origin.matches(entry)) {
            return Err(Error::InUse {
                id: id.to_string(),
                path: mount.mount_point.clone(),
            });
        }
        match self.volumes.remove(id, meta.params.on_delete)? {
            Removed::Retained(_) => self.release(&meta),
            Removed::Trashed(trash) => {
                self.release(&meta)?;
                remove_volume_dir(&trash)
            }
        }
    }

    fn release(&self, meta: &VolumeMeta) -> Result<()> {
        match (self.quota(), meta.project_id) {
            (Some(quota), Some(project)) => quota.release(project),
            _ => Ok(()),
        }
    }

    /// Grows the volume to satisfy `range`; never shrinks. Returns the new capacity.
    pub fn expand(&self, id: &VolumeId, range: Range) -> Result<u64> {
        let mut meta = self.get(id)?;
        let Some(capacity) = range.grown(meta.capacity_bytes, || self.max_capacity())? else {
            return Ok(meta.capacity_bytes);
        };
        if let (Some(quota), Some(project)) = (self.quota(), meta.project_id) {
            quota.set_limit(project, capacity)?;
        }
        let data = self.data_path(id);
        if let Enforcement::Btrfs = self.enforcement
            && super::btrfs::is_subvolume(&data)
        {
            super::btrfs::set_limit(&data, capacity)
                .map_err(Error::io(format!("raise the quota group limit of {id}")))?;
        }
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

    /// Why the volume is unhealthy, or `None`: its data directory must exist and be a directory.
    pub fn condition(&self, id: &VolumeId) -> Option<String> {
        let data = self.data_path(id);
        match std::fs::symlink_metadata(&data) {
            Ok(meta) if meta.is_dir() => None,
            Ok(_) => Some(format!("{} is not a directory", data.display())),
            Err(e) => Some(format!("{} is unreadable: {e}", data.display())),
        }
    }

    /// Finishes or undoes whatever a killed create or delete left behind (`.tmp-*` and
    /// `.trash-*`). Only the role that creates and deletes may call it.
    pub fn recover(&self) -> Result<()> {
        let mut leftovers = self.volumes.leftovers()?;
        leftovers.extend(self.snapshots.leftovers()?);
        for leftover in leftovers {
            tracing::info!(path = %leftover.display(), "removing leftover of an interrupted call");
            if let Ok(meta) = VolumeMeta::load(&leftover) {
                self.release(&meta)?;
            }
            remove_volume_dir(&leftover)?;
        }
        if let Some(quota) = self.quota() {
            for project in quota.orphans(self.volumes.base()) {
                quota.release(project)?;
            }
        }
        Ok(())
    }
}

/// Removes a volume directory that is out of use; its data subvolume (btrfs) is destroyed
/// whole rather than emptied file by file.
fn remove_volume_dir(dir: &Path) -> Result<()> {
    if super::btrfs::is_subvolume(&dir.join(DATA)) {
        super::btrfs::destroy_subvolume(dir, DATA.as_ref()).map_err(Error::io(format!(
            "destroy the subvolume {}/{DATA}",
            dir.display()
        )))?;
    }
    std::fs::remove_dir_all(dir).map_err(Error::io(format!("remove {}", dir.display())))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("chmod {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
    use crate::lane::params::OnDelete;

    fn lane(dir: &Path) -> LocalLane {
        let settings = LocalSettings {
            default_capacity: 1 << 20,
            max_capacity: Some(1 << 30),
        };
        let lane = LocalLane::open(dir, "node-a", settings).unwrap();
        lane.recover().unwrap();
        lane
    }

    fn request(name: &str, required: i64) -> CreateRequest {
        CreateRequest {
            name: name.into(),
            range: Range { required, limit: 0 },
            params: CreateParams {
                profile: "local".into(),
                ..Default::default()
            },
            dataset: None,
            source: None,
        }
    }

    #[test]
    fn create_is_idempotent_and_checks_compatibility() {
        let tmp = tempfile::tempdir().unwrap();
        let lane = lane(tmp.path());
        let first = lane.create(&request("pvc-1", 8192)).unwrap();
        let again = lane.create(&request("pvc-1", 8192)).unwrap();
        assert_eq!(first, again);
        let bigger = lane.create(&request("pvc-1", 1 << 25)).unwrap_err();
        assert_eq!(bigger.kind(), Kind::AlreadyExists);
        let mut retained = request("pvc-1", 8192);
        retained.params.on_delete = OnDelete::Retain;
        assert_eq!(
            lane.create(&retained).unwrap_err().kind(),
            Kind::AlreadyExists
        );
        assert!(
            lane.data_path(&VolumeId::parse(&first.id).unwrap())
                .is_dir()
        );
    }

    #[test]
    fn leftovers_of_killed_calls_are_removed_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        drop(lane(tmp.path()));
        let base = tmp.path().join("volumes");
        std::fs::create_dir_all(base.join(".tmp-pvc-2-1/data")).unwrap();
        std::fs::create_dir_all(base.join(".trash-pvc-3-1/data")).unwrap();
        let lane = lane(tmp.path());
        assert!(!base.join(".tmp-pvc-2-1").exists());
        assert!(!base.join(".trash-pvc-3-1").exists());
        assert!(lane.list().unwrap().is_empty());
    }

    #[test]
    fn delete_refuses_while_mounted_and_is_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let lane = lane(tmp.path());
        let meta = lane.create(&request("pvc-4", 0)).unwrap();
        let id = VolumeId::parse(&meta.id).unwrap();
        let mounted = MountEntry {
            major: 0,
            minor: 0,
            root: lane.data_path(&id),
            mount_point: "/somewhere".into(),
            options: vec!["rw".into()],
            fs_type: "x".into(),
            source: "x".into(),
            super_options: vec![],
        };
        let err = lane
            .delete(&id, std::slice::from_ref(&mounted))
            .unwrap_err();
        assert_eq!(err.kind(), Kind::FailedPrecondition);
        lane.delete(&id, &[]).unwrap();
        lane.delete(&id, &[]).unwrap();
        assert!(lane.find(&id).unwrap().is_none());
    }

    #[test]
    fn expand_grows_and_never_shrinks() {
        let tmp = tempfile::tempdir().unwrap();
        let lane = lane(tmp.path());
        let meta = lane.create(&request("pvc-5", 1 << 20)).unwrap();
        let id = VolumeId::parse(&meta.id).unwrap();
        let grown = lane
            .expand(
                &id,
                Range {
                    required: 2 << 20,
                    limit: 0,
                },
            )
            .unwrap();
        assert_eq!(grown, 2 << 20);
        let same = lane
            .expand(
                &id,
                Range {
                    required: 1 << 20,
                    limit: 0,
                },
            )
            .unwrap();
        assert_eq!(same, 2 << 20);
        let err = lane
            .expand(
                &id,
                Range {
                    required: 1 << 40,
                    limit: 0,
                },
            )
            .unwrap_err();
        assert_eq!(err.kind(), Kind::OutOfRange);
        assert_eq!(lane.get(&id).unwrap().capacity_bytes, 2 << 20);
    }
}
