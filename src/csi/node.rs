//! The CSI Node service for the local lane: stage = bind the volume's data directory at the
//! staging path; publish = bind the staging path at the target with the requested flags.
//!
//! Rules enforced here (CSI spec, "Node Service RPC"):
//! - required fields are checked before anything is touched; request paths are confined
//!   ([`crate::mount::safe`]: absolute, no symlink component, not inside or above what Lanes
//!   owns) and every mount, `mkdir` and `rmdir` goes through descriptors opened without
//!   following links;
//! - one call per volume at a time (ABORTED for the other);
//! - every call reads the mount table first; work already done answers OK (fixing ro/rw and
//!   other flags in place), something else mounted there is an error that says what;
//! - what was asked is recorded in the node ledger before mounting: a repeat with other
//!   flags at a live mount is ALREADY_EXISTS, single-writer access modes hold across
//!   targets (FAILED_PRECONDITION), a crash between any two steps is repaired by the retry;
//! - unpublish and unstage of a path with nothing of ours mounted succeed; unpublish removes
//!   the target directory only when a publish of this volume recorded it, only when empty;
//! - publish of a volume that is not staged is FAILED_PRECONDITION.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::{missing, require};
use super::{Plugin, caps, datasets};
use crate::lane::{VolumeId, VolumeMeta};
use crate::mount::ledger::{Publication, Staging, VolumeRecord};
use crate::mount::safe::{Removed, RequestPath};
use crate::mount::{self, MountEntry, MountFlags, Origin, mountinfo};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{Rpc, rpc};
use crate::proto::*;
use crate::text::Shown;

/// Node service over the shared plugin state.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Plugin>);

impl NodeService {
    /// Checks a path named by the request (see [`crate::mount::safe`]).
    pub(super) fn request_path(
        &self,
        field: &'static str,
        text: &str,
    ) -> Result<RequestPath, Status> {
        let path = self.0.confinement.check(field, text)?;
        path.refuse_links()?;
        Ok(path)
    }

    /// The volume's record; unknown volumes are NOT_FOUND.
    async fn meta(&self, id: &VolumeId) -> Result<VolumeMeta, Status> {
        let lookup = id.clone();
        self.0.lane_op(move |lane| lane.get(&lookup)).await
    }

    /// The mount-table entries at or above each of `paths`.
    pub(super) async fn table(&self, paths: Vec<PathBuf>) -> Result<Vec<MountEntry>, Status> {
        let first = paths.first().cloned().unwrap_or_default();
        self.mount_op("read mount table", &first, move |m| {
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            m.table_for(&refs)
        })
        .await
    }

    pub(super) async fn mount_op<T, F>(
        &self,
        op: &'static str,
        path: &Path,
        f: F,
    ) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn mount::Mounter) -> mount::Result<T> + Send + 'static,
    {
        let mounter = self.0.mounter.clone();
        mount::blocking(op, path, self.0.mount_timeout, move || f(mounter.as_ref()))
            .await
            .map_err(Status::from)
    }

    /// Bytes and inodes of the filesystem at `path` (statvfs; never a walk of the tree).
    pub(super) async fn usage(&self, path: &RequestPath) -> Result<Vec<VolumeUsage>, Status> {
        let pinned = path.open_dir()?.ok_or_else(|| {
            Status::not_found(format!(
                "volume_path {} does not exist",
                Shown(&path.as_path().to_string_lossy())
            ))
        })?;
        let stat = mount::blocking("statvfs", path.as_path(), self.0.mount_timeout, move || {
            let proc_path = pinned.proc_path();
            nix::sys::statvfs::statvfs(&proc_path)
                .map_err(|e| mount::Error::io("statvfs", &proc_path, e.into()))
        })
        .await?;
        let block = stat.fragment_size();
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let usage = |total: u64, free: u64, available: u64, unit: volume_usage::Unit| VolumeUsage {
            total: clamp(total),
            available: clamp(available),
            used: clamp(total.saturating_sub(free)),
            unit: unit as i32,
        };
        let bytes = usage(
            stat.blocks().saturating_mul(block),
            stat.blocks_free().saturating_mul(block),
            stat.blocks_available().saturating_mul(block),
            volume_usage::Unit::Bytes,
        );
        let inodes = usage(
            stat.files(),
            stat.files_free(),
            stat.files_available(),
            volume_usage::Unit::Inodes,
        );
        Ok(vec![bytes, inodes])
    }

    /// Unmounts every mount stacked at `path` (as `table` shows them) when all of them are
    /// `ours`; refuses to touch anything else. `what` names the volume in the error. Each
    /// unmount goes through a descriptor of the path opened without following links.
    pub(super) async fn unmount_ours(
        &self,
        what: &str,
        path: &RequestPath,
        table: &[MountEntry],
        ours: impl Fn(&MountEntry) -> bool,
    ) -> Result<(), Status> {
        let stack = mountinfo::at(table, path.as_path());
        if let Some(foreign) = stack.iter().find(|entry| !ours(entry)) {
            return Err(Status::failed_precondition(format!(
                "{} has a mount of {} ({}) that is not {what}; refusing to unmount it",
                Shown(&path.as_path().to_string_lossy()),
                Shown(&foreign.source),
                Shown(&foreign.root.to_string_lossy()),
            )));
        }
        for _ in 0..stack.len() {
            let (parent, through) = path.through_parent()?;
            self.mount_op("unmount", path.as_path(), move |m| {
                let unmounted = m.unmount(&through);
                drop(parent);
                unmounted
            })
            .await?;
        }
        Ok(())
    }

    /// Checks publication `new` against the volume's record and records it, before anything
    /// is mounted. `live` says whether a path still carries a mount of this volume. Stale
    /// entries (nothing mounted any more) are dropped.
    pub(super) fn admit(
        &self,
        record: &mut VolumeRecord,
        mut new: Publication,
        target: &RequestPath,
        live: impl Fn(&Path) -> bool,
    ) -> Result<(), Status> {
        record
            .published
            .retain(|p| p.target == new.target || live(&p.target));
        if let Some(existing) = record.publication(&new.target) {
            if (existing.asked != new.asked || existing.staging != new.staging) && live(&new.target)
            {
                return Err(Status::already_exists(format!(
                    "volume {} is already published at {} with another capability, readonly \
                     flag or staging path; unpublish it there first",
                    Shown(&record.volume_id),
                    Shown(&new.target.to_string_lossy())
                )));
            }
            new.created_target |= existing.created_target;
        }
        for other in record.published.iter().filter(|p| p.target != new.target) {
            if let Some(why) = crate::mount::ledger::conflict(other, &new) {
                return Err(Status::failed_precondition(format!(
                    "volume {} cannot be published at {}: {why}",
                    Shown(&record.volume_id),
                    Shown(&new.target.to_string_lossy())
                )));
            }
        }
        new.created_target |= !target.exists()?;
        record.set_publication(new);
        self.0.ledger.store(record)?;
        Ok(())
    }

    /// Removes an unpublished target directory when a publish of this volume recorded it:
    /// only when it is empty (a missing one is fine). Then forgets the publication.
    pub(super) fn release_target(
        &self,
        record: &mut VolumeRecord,
        target: &RequestPath,
    ) -> Result<(), Status> {
        let Some(publication) = record.publication(target.as_path()) else {
            return Ok(());
        };
        if publication.created_target && target.remove_dir()? == Removed::Kept {
            return Err(Status::failed_precondition(format!(
                "unmounted, but {} could not be removed: it is not an empty directory, so Lanes \
                 leaves it alone",
                Shown(&target.as_path().to_string_lossy())
            )));
        }
        record.published.retain(|p| p.target != target.as_path());
        self.0.ledger.store(record)?;
        Ok(())
    }
}

/// Gives the volume's root to `gid` with the setgid bit, so new files inherit the group.
pub(super) fn apply_mount_group(data: &Path, gid: u32) -> Result<(), Status> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::chown(data, None, Some(nix::unistd::Gid::from_raw(gid)))
        .map_err(|e| Status::internal(format!("chown {} to group {gid}: {e}", data.display())))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o2775))
        .map_err(|e| Status::internal(format!("chmod {}: {e}", data.display())))
}

/// The mount flags a publish asks for.
pub(super) fn publish_flags(access: &caps::Access, readonly: bool) -> MountFlags {
    MountFlags {
        read_only: readonly || access.read_only,
        ..access.flags
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeStageVolume", async {
                require(&req.volume_id, "volume_id")?;
                let staging = self.request_path("staging_target_path", &req.staging_target_path)?;
                let capability = req
                    .volume_capability
                    .as_ref()
                    .ok_or_else(|| missing("volume_capability"))?;
                let access = caps::check(capability).map_err(Status::invalid_argument)?;
                let id = VolumeId::parse(&req.volume_id)?;
                let _guard = self.0.guard(&req.volume_id)?;
                let meta = self.meta(&id).await?;
                let staging_dir = staging.open_dir()?.ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "staging_target_path {} does not exist; the CO must create it",
                        Shown(&req.staging_target_path)
                    ))
                })?;
                let data = self.0.lane.data_path(&id);
                let table = self
                    .table(vec![staging.as_path().to_owned(), data.clone()])
                    .await?;
                let origin = Origin::of(&table, &data);
                let stack = mountinfo::at(&table, staging.as_path());
                let asked = caps::asked(capability, &access, false);
                let mut record = self.0.ledger.load(&req.volume_id)?;
                if let Some(existing) = record.staging(staging.as_path())
                    && existing.asked != asked
                    && stack.iter().any(|e| origin.matches(e))
                {
                    return Err(Status::already_exists(format!(
                        "volume {} is already staged at {} with another capability",
                        Shown(&req.volume_id),
                        Shown(&req.staging_target_path)
                    )));
                }
                if let Some(top) = stack.last()
                    && !origin.matches(top)
                {
                    return Err(Status::already_exists(format!(
                        "staging path {} already has another mount ({} from {})",
                        Shown(&req.staging_target_path),
                        Shown(&top.fs_type),
                        Shown(&top.source)
                    )));
                }
                record.set_staging(Staging {
                    path: staging.as_path().to_owned(),
                    asked,
                });
                self.0.ledger.store(&record)?;
                if !stack.is_empty() {
                    return Ok(NodeStageVolumeResponse {});
                }
                if let Some(pin) = &meta.dataset {
                    Box::pin(self.stage_dataset(pin, &data, &staging, staging_dir)).await?;
                    return Ok(NodeStageVolumeResponse {});
                }
                self.mount_op("bind mount", staging.as_path(), move |m| {
                    m.bind(&data, &staging_dir.proc_path())
                })
                .await?;
                self.0.failpoint.hit("stage.after-bind");
                Ok(NodeStageVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeUnstageVolume", async {
                require(&req.volume_id, "volume_id")?;
                let staging = self.request_path("staging_target_path", &req.staging_target_path)?;
                let id = VolumeId::parse(&req.volume_id)?;
                let _guard = self.0.guard(&req.volume_id)?;
                let data = self.0.lane.data_path(&id);
                let table = self
                    .table(vec![staging.as_path().to_owned(), data.clone()])
                    .await?;
                let origin = Origin::of(&table, &data);
                self.unmount_ours(
                    &format!("volume {}", Shown(&req.volume_id)),
                    &staging,
                    &table,
                    |e| origin.matches(e),
                )
                .await?;
                let mut record = self.0.ledger.load(&req.volume_id)?;
                if record.staging(staging.as_path()).is_some() {
                    record.staged.retain(|s| s.path != staging.as_path());
                    self.0.ledger.store(&record)?;
                }
                Ok(NodeUnstageVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodePublishVolume", async {
                require(&req.volume_id, "volume_id")?;
                let target = self.request_path("target_path", &req.target_path)?;
                let capability = req
                    .volume_capability
                    .as_ref()
                    .ok_or_else(|| missing("volume_capability"))?;
                let access = caps::check(capability).map_err(Status::invalid_argument)?;
                if datasets::is_ephemeral(&req) {
                    Box::pin(self.publish_dataset(&req, &target, capability, &access)).await?;
                    return Ok(NodePublishVolumeResponse {});
                }
                if req.staging_target_path.is_empty() {
                    return Err(Status::invalid_argument(
                        "staging_target_path is required: Lanes stages every volume (STAGE_UNSTAGE_VOLUME)",
                    ));
                }
                let staging = self.request_path("staging_target_path", &req.staging_target_path)?;
                let id = VolumeId::parse(&req.volume_id)?;
                let _guard = self.0.guard(&req.volume_id)?;
                self.0.failpoint.delay("publish").await;
                self.meta(&id).await?;
                let data = self.0.lane.data_path(&id);
                let mut record = self.0.ledger.load(&req.volume_id)?;
                let mut paths = vec![staging.as_path().to_owned(), target.as_path().to_owned(), data.clone()];
                paths.extend(record.published.iter().map(|p| p.target.clone()));
                let table = self.table(paths).await?;
                let origin = Origin::of(&table, &data);
                let live = |path: &Path| mountinfo::at(&table, path).iter().any(|e| origin.matches(e));
                let not_staged = || {
                    Status::failed_precondition(format!(
                        "volume {} is not staged at {}; call NodeStageVolume first",
                        Shown(&req.volume_id),
                        Shown(&req.staging_target_path)
                    ))
                };
                if !live(staging.as_path()) {
                    return Err(not_staged());
                }
                let staging_dir = staging.open_dir()?.ok_or_else(not_staged)?;
                let flags = publish_flags(&access, req.readonly);
                let publication = Publication {
                    target: target.as_path().to_owned(),
                    staging: Some(staging.as_path().to_owned()),
                    asked: caps::asked(capability, &access, req.readonly),
                    writer: !flags.read_only,
                    created_target: false,
                };
                self.admit(&mut record, publication, &target, live)?;
                let (target_dir, _) = target.make_dir()?;
                self.0.failpoint.hit("publish.after-mkdir");
                if let Some(gid) = access.mount_group {
                    apply_mount_group(&data, gid)?;
                }
                match mountinfo::at(&table, target.as_path()).last() {
                    Some(top) if origin.matches(top) && flags.satisfied_by(top) => {
                        return Ok(NodePublishVolumeResponse {});
                    }
                    Some(top) if origin.matches(top) => {}
                    Some(top) => {
                        return Err(Status::already_exists(format!(
                            "target_path {} already has another mount ({} from {})",
                            Shown(&req.target_path),
                            Shown(&top.fs_type),
                            Shown(&top.source)
                        )));
                    }
                    None => {
                        self.mount_op("bind mount", target.as_path(), move |m| {
                            m.bind(&staging_dir.proc_path(), &target_dir.proc_path())
                        })
                        .await?;
                        self.0.failpoint.hit("publish.after-bind");
                        if flags.is_plain() {
                            return Ok(NodePublishVolumeResponse {});
                        }
                    }
                }
                self.remount(&target, flags).await?;
                Ok(NodePublishVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeUnpublishVolume", async {
                require(&req.volume_id, "volume_id")?;
                let target = self.request_path("target_path", &req.target_path)?;
                let guard = self.0.guard(&req.volume_id)?;
                let mut record = self.0.ledger.load(&req.volume_id)?;
                if record.dataset.is_some() {
                    Box::pin(self.unpublish_dataset(record, &target, guard)).await?;
                    return Ok(NodeUnpublishVolumeResponse {});
                }
                let id = match VolumeId::parse(&req.volume_id) {
                    Ok(id) => id,
                    // Not a volume of ours: nothing of it can be mounted here.
                    Err(crate::lane::Error::UnknownVolume(_)) => {
                        return Ok(NodeUnpublishVolumeResponse {});
                    }
                    Err(e) => return Err(e.into()),
                };
                let data = self.0.lane.data_path(&id);
                let table = self
                    .table(vec![target.as_path().to_owned(), data.clone()])
                    .await?;
                let origin = Origin::of(&table, &data);
                self.unmount_ours(
                    &format!("volume {}", Shown(&req.volume_id)),
                    &target,
                    &table,
                    |e| origin.matches(e),
                )
                .await?;
                self.0.failpoint.hit("unpublish.after-unmount");
                self.release_target(&mut record, &target)?;
                Ok(NodeUnpublishVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeGetVolumeStats", async {
                require(&req.volume_id, "volume_id")?;
                let path = self.request_path("volume_path", &req.volume_path)?;
                let record = self.0.ledger.load(&req.volume_id)?;
                if record.dataset.is_some() {
                    return self.dataset_stats(&record, &path).await;
                }
                let id = VolumeId::parse(&req.volume_id)?;
                self.meta(&id).await?;
                let data = self.0.lane.data_path(&id);
                let table = self
                    .table(vec![path.as_path().to_owned(), data.clone()])
                    .await?;
                let origin = Origin::of(&table, &data);
                if !mountinfo::at(&table, path.as_path())
                    .iter()
                    .any(|e| origin.matches(e))
                {
                    return Err(Status::not_found(format!(
                        "volume {} is not mounted at {}",
                        Shown(&req.volume_id),
                        Shown(&req.volume_path)
                    )));
                }
                let mut usage = self.usage(&path).await?;
                let lookup = id.clone();
                if let Some((used, limit)) = self.0.lane_op(move |lane| lane.usage(&lookup)).await?
                {
                    // The volume's own bytes and limit (its quota group), not the filesystem's.
                    let wire = crate::lane::to_wire;
                    usage.retain(|u| u.unit != volume_usage::Unit::Bytes as i32);
                    usage.insert(
                        0,
                        VolumeUsage {
                            total: wire(limit),
                            used: wire(used),
                            available: wire(limit.saturating_sub(used)),
                            unit: volume_usage::Unit::Bytes as i32,
                        },
                    );
                }
                let condition = match self.0.lane.condition(&id) {
                    None => VolumeCondition {
                        abnormal: false,
                        message: "volume is mounted and its directory is present".into(),
                    },
                    Some(problem) => VolumeCondition {
                        abnormal: true,
                        message: problem,
                    },
                };
                Ok(NodeGetVolumeStatsResponse {
                    usage,
                    volume_condition: Some(condition),
                })
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeExpandVolume", async {
                require(&req.volume_id, "volume_id")?;
                let path = self.request_path("volume_path", &req.volume_path)?;
                if let Some(capability) = &req.volume_capability {
                    caps::check(capability).map_err(Status::invalid_argument)?;
                }
                let id = VolumeId::parse(&req.volume_id)?;
                let _guard = self.0.guard(&req.volume_id)?;
                let meta = self.meta(&id).await?;
                let data = self.0.lane.data_path(&id);
                let table = self
                    .table(vec![path.as_path().to_owned(), data.clone()])
                    .await?;
                let origin = Origin::of(&table, &data);
                if !mountinfo::at(&table, path.as_path())
                    .iter()
                    .any(|e| origin.matches(e))
                {
                    return Err(Status::not_found(format!(
                        "volume {} is not mounted at volume_path {}",
                        Shown(&req.volume_id),
                        Shown(&req.volume_path)
                    )));
                }
                // The quota was already grown by ControllerExpandVolume; a directory volume has
                // no filesystem of its own to grow, so the node only reports the capacity.
                Ok(NodeExpandVolumeResponse {
                    capacity_bytes: crate::lane::to_wire(meta.capacity_bytes),
                })
            })
            .await
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        self.0
            .call("NodeGetCapabilities", async {
                let capabilities = [
                    rpc::Type::StageUnstageVolume,
                    rpc::Type::GetVolumeStats,
                    rpc::Type::ExpandVolume,
                    rpc::Type::VolumeCondition,
                    rpc::Type::SingleNodeMultiWriter,
                    rpc::Type::VolumeMountGroup,
                ]
                .into_iter()
                .map(|kind| NodeServiceCapability {
                    r#type: Some(node_service_capability::Type::Rpc(Rpc {
                        r#type: kind as i32,
                    })),
                })
                .collect();
                Ok(NodeGetCapabilitiesResponse { capabilities })
            })
            .await
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        self.0
            .call("NodeGetInfo", async {
                Ok(NodeGetInfoResponse {
                    node_id: self.0.node_id.clone(),
                    max_volumes_per_node: 0,
                    accessible_topology: Some(self.0.topology()),
                })
            })
            .await
    }
}

impl NodeService {
    /// Re-applies `flags` to the mount now at `target`, through a fresh descriptor (the
    /// descriptor opened before mounting still points below the new mount).
    pub(super) async fn remount(
        &self,
        target: &RequestPath,
        flags: MountFlags,
    ) -> Result<(), Status> {
        let pinned = target.open_dir()?.ok_or_else(|| {
            Status::internal(format!(
                "{} vanished while it was being mounted",
                Shown(&target.as_path().to_string_lossy())
            ))
        })?;
        self.mount_op("remount", target.as_path(), move |m| {
            m.remount(&pinned.proc_path(), flags)
        })
        .await
    }
}
