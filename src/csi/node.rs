//! The CSI Node service for the local lane: stage = bind the volume's data directory at the
//! staging path; publish = bind the staging path at the target with the requested flags.
//!
//! Rules enforced here (CSI spec, "Node Service RPC"):
//! - every call reads the mount table first; work already done answers OK (fixing ro/rw and
//!   other flags in place), something else mounted there is an error that says what;
//! - unpublish and unstage of a path with nothing mounted succeed; unpublish removes the
//!   target directory it created (only when empty) and never anything else;
//! - publish of a volume that is not staged is FAILED_PRECONDITION;
//! - a crash between any two steps is repaired by the retry: no step is ever done twice.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::{busy, missing};
use super::{Plugin, caps, datasets};
use crate::lane::{VolumeId, VolumeMeta};
use crate::mount::{self, MountEntry, MountFlags, Origin, mountinfo};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{Rpc, rpc};
use crate::proto::*;

/// Node service over the shared plugin state.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Plugin>);

impl NodeService {
    /// Parses the ID and loads the volume; unknown volumes are NOT_FOUND.
    async fn volume(&self, volume_id: &str) -> Result<VolumeId, Status> {
        self.volume_meta(volume_id).await.map(|(id, _)| id)
    }

    /// [`Self::volume`], with what the volume's record says.
    async fn volume_meta(&self, volume_id: &str) -> Result<(VolumeId, VolumeMeta), Status> {
        if volume_id.is_empty() {
            return Err(missing("volume_id"));
        }
        let id = VolumeId::parse(volume_id)?;
        let lookup = id.clone();
        let meta = self.0.lane_op(move |lane| lane.get(&lookup)).await?;
        Ok((id, meta))
    }

    /// The mount-table location of a volume's data directory, and the table entries at or
    /// above the data directory and each of `paths`.
    async fn origin(
        &self,
        id: &VolumeId,
        paths: &[&Path],
    ) -> Result<(PathBuf, Origin, Vec<MountEntry>), Status> {
        let data = self.0.lane.data_path(id);
        let mut wanted: Vec<PathBuf> = paths.iter().map(|p| p.to_path_buf()).collect();
        wanted.push(data.clone());
        let table = self
            .mount_op("read mount table", &data, move |m| {
                let refs: Vec<&Path> = wanted.iter().map(PathBuf::as_path).collect();
                m.table_for(&refs)
            })
            .await?;
        let origin = Origin::of(&table, &data);
        Ok((data, origin, table))
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

    fn guard(&self, id: &VolumeId, path: &Path) -> Result<super::guard::Guard, Status> {
        self.guard_key(&format!("{id}@{}", path.display()))
    }

    /// Holds `key` for this call; a concurrent call on the same key is ABORTED.
    pub(super) fn guard_key(&self, key: &str) -> Result<super::guard::Guard, Status> {
        self.0
            .inflight
            .try_lock(key.to_owned())
            .ok_or_else(|| busy(key))
    }

    /// Bytes and inodes of the filesystem at `path` (statvfs; never a walk of the tree).
    async fn usage(&self, path: &Path) -> Result<Vec<VolumeUsage>, Status> {
        let stat_path = path.to_owned();
        let stat = mount::blocking("statvfs", path, self.0.mount_timeout, move || {
            nix::sys::statvfs::statvfs(&stat_path)
                .map_err(|e| mount::Error::io("statvfs", &stat_path, e.into()))
        })
        .await?;
        let block = stat.fragment_size();
        let usage = |total: u64, free: u64, available: u64, unit: volume_usage::Unit| VolumeUsage {
            total: total as i64,
            available: available as i64,
            used: total.saturating_sub(free) as i64,
            unit: unit as i32,
        };
        let bytes = usage(
            stat.blocks() * block,
            stat.blocks_free() * block,
            stat.blocks_available() * block,
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
    /// `ours`; refuses to touch anything else. `what` names the volume in the error.
    pub(super) async fn unmount_ours(
        &self,
        what: &str,
        path: &Path,
        table: &[MountEntry],
        ours: impl Fn(&MountEntry) -> bool,
    ) -> Result<(), Status> {
        let stack = mountinfo::at(table, path);
        if let Some(foreign) = stack.iter().find(|entry| !ours(entry)) {
            return Err(Status::failed_precondition(format!(
                "{} has a mount of {} ({}) that is not {what}; refusing to unmount it",
                path.display(),
                foreign.source,
                foreign.root.display()
            )));
        }
        for _ in 0..stack.len() {
            let target = path.to_owned();
            self.mount_op("unmount", path, move |m| m.unmount(&target))
                .await?;
        }
        Ok(())
    }
}

/// Resolves an existing directory given by the CO to its canonical path.
fn existing_dir(path: &str, field: &str) -> Result<PathBuf, Status> {
    let path = Path::new(path);
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => path
            .canonicalize()
            .map_err(|e| Status::internal(format!("resolve {}: {e}", path.display()))),
        Ok(_) => Err(Status::invalid_argument(format!(
            "{field} {} exists and is not a directory",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(Status::invalid_argument(format!(
                "{field} {} does not exist; the CO must create it",
                path.display()
            )))
        }
        Err(e) => Err(Status::internal(format!("stat {}: {e}", path.display()))),
    }
}

/// Makes sure the publish target is a directory (creating it when its parent exists; never
/// through a symlink) and returns its canonical path.
pub(super) fn prepare_target(
    target: &Path,
    failpoint: &super::Failpoint,
) -> Result<PathBuf, Status> {
    match std::fs::symlink_metadata(target) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(Status::invalid_argument(format!(
                "target_path {} exists and is not a directory",
                target.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(target).map_err(|e| {
                Status::invalid_argument(format!(
                    "cannot create target_path {} (its parent must exist): {e}",
                    target.display()
                ))
            })?;
            failpoint.hit("publish.after-mkdir");
        }
        Err(e) => return Err(Status::internal(format!("stat {}: {e}", target.display()))),
    }
    target
        .canonicalize()
        .map_err(|e| Status::internal(format!("resolve {}: {e}", target.display())))
}

/// Removes an unpublished target directory: only when it is empty, and a missing one is
/// fine.
pub(super) fn remove_target(target: &Path) -> Result<(), Status> {
    match std::fs::remove_dir(target) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Status::failed_precondition(format!(
                "unmounted, but {} could not be removed ({e}); it is not an empty directory, \
                 so Lanes leaves it alone",
                target.display()
            )))
        }
        _ => Ok(()),
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

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(volume.id = %request.get_ref().volume_id, lane = "local"))]
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeStageVolume", async {
                if req.staging_target_path.is_empty() {
                    return Err(missing("staging_target_path"));
                }
                let capability = req
                    .volume_capability
                    .as_ref()
                    .ok_or_else(|| missing("volume_capability"))?;
                caps::check(capability).map_err(Status::invalid_argument)?;
                let (id, meta) = self.volume_meta(&req.volume_id).await?;
                let staging = existing_dir(&req.staging_target_path, "staging_target_path")?;
                let _guard = self.guard(&id, &staging)?;
                let (data, origin, table) = self.origin(&id, &[&staging]).await?;
                if let Some(top) = mountinfo::at(&table, &staging).last() {
                    if origin.matches(top) {
                        return Ok(NodeStageVolumeResponse {});
                    }
                    return Err(Status::already_exists(format!(
                        "staging path {} already has another mount ({} from {})",
                        staging.display(),
                        top.fs_type,
                        top.source
                    )));
                }
                if let Some(pin) = &meta.dataset {
                    Box::pin(self.stage_dataset(pin, &data, &staging)).await?;
                    return Ok(NodeStageVolumeResponse {});
                }
                let target = staging.clone();
                self.mount_op("bind mount", &staging, move |m| m.bind(&data, &target))
                    .await?;
                self.0.failpoint.hit("stage.after-bind");
                Ok(NodeStageVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %request.get_ref().volume_id, lane = "local"))]
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeUnstageVolume", async {
                if req.volume_id.is_empty() {
                    return Err(missing("volume_id"));
                }
                if req.staging_target_path.is_empty() {
                    return Err(missing("staging_target_path"));
                }
                let id = VolumeId::parse(&req.volume_id)?;
                let staging = Path::new(&req.staging_target_path);
                let Ok(staging) = staging.canonicalize() else {
                    return Ok(NodeUnstageVolumeResponse {});
                };
                let _guard = self.guard(&id, &staging)?;
                let (_, origin, table) = self.origin(&id, &[&staging]).await?;
                self.unmount_ours(&format!("volume {id}"), &staging, &table, |e| {
                    origin.matches(e)
                })
                .await?;
                Ok(NodeUnstageVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %request.get_ref().volume_id, lane = "local"))]
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodePublishVolume", async {
                if req.target_path.is_empty() {
                    return Err(missing("target_path"));
                }
                if req.volume_id.is_empty() {
                    return Err(missing("volume_id"));
                }
                if datasets::is_ephemeral(&req) {
                    Box::pin(self.publish_dataset(&req)).await?;
                    return Ok(NodePublishVolumeResponse {});
                }
                let capability = req.volume_capability.as_ref().ok_or_else(|| missing("volume_capability"))?;
                let access = caps::check(capability).map_err(Status::invalid_argument)?;
                if req.staging_target_path.is_empty() {
                    return Err(Status::invalid_argument(
                        "staging_target_path is required: Lanes stages every volume (STAGE_UNSTAGE_VOLUME)",
                    ));
                }
                let id = self.volume(&req.volume_id).await?;
                let target = PathBuf::from(&req.target_path);
                let _guard = self.guard(&id, &target)?;
                self.0.failpoint.delay("publish").await;
                let staging = Path::new(&req.staging_target_path).canonicalize().ok();
                let target_now = target.canonicalize().ok();
                let paths: Vec<&Path> = staging.iter().chain(target_now.iter()).map(PathBuf::as_path).collect();
                let (data, origin, table) = self.origin(&id, &paths).await?;
                let staged = staging
                    .filter(|staging| mountinfo::at(&table, staging).iter().any(|e| origin.matches(e)));
                let Some(staging) = staged else {
                    return Err(Status::failed_precondition(format!(
                        "volume {id} is not staged at {}; call NodeStageVolume first",
                        req.staging_target_path
                    )));
                };
                let flags = MountFlags {
                    read_only: req.readonly || access.read_only,
                    ..access.flags
                };
                let target = prepare_target(&target, &self.0.failpoint)?;
                if let Some(gid) = access.mount_group {
                    apply_mount_group(&data, gid)?;
                }
                match mountinfo::at(&table, &target).last() {
                    Some(top) if origin.matches(top) && flags.satisfied_by(top) => {
                        return Ok(NodePublishVolumeResponse {});
                    }
                    Some(top) if origin.matches(top) => {}
                    Some(top) => {
                        return Err(Status::already_exists(format!(
                            "target_path {} already has another mount ({} from {})",
                            target.display(),
                            top.fs_type,
                            top.source
                        )));
                    }
                    None => {
                        let path = target.clone();
                        self.mount_op("bind mount", &target, move |m| m.bind(&staging, &path))
                            .await?;
                        self.0.failpoint.hit("publish.after-bind");
                        if flags.is_plain() {
                            return Ok(NodePublishVolumeResponse {});
                        }
                    }
                }
                let path = target.clone();
                self.mount_op("remount", &target, move |m| m.remount(&path, flags)).await?;
                Ok(NodePublishVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %request.get_ref().volume_id, lane = "local"))]
    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeUnpublishVolume", async {
                if req.volume_id.is_empty() {
                    return Err(missing("volume_id"));
                }
                if req.target_path.is_empty() {
                    return Err(missing("target_path"));
                }
                let id = match VolumeId::parse(&req.volume_id) {
                    Ok(id) if !self.dataset_volume_at(&req.volume_id) => id,
                    _ => {
                        Box::pin(self.unpublish_dataset(&req)).await?;
                        return Ok(NodeUnpublishVolumeResponse {});
                    }
                };
                let Ok(target) = Path::new(&req.target_path).canonicalize() else {
                    return Ok(NodeUnpublishVolumeResponse {});
                };
                let _guard = self.guard(&id, &target)?;
                let (_, origin, table) = self.origin(&id, &[&target]).await?;
                self.unmount_ours(&format!("volume {id}"), &target, &table, |e| {
                    origin.matches(e)
                })
                .await?;
                self.0.failpoint.hit("unpublish.after-unmount");
                remove_target(&target)?;
                Ok(NodeUnpublishVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %request.get_ref().volume_id, lane = "local"))]
    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeGetVolumeStats", async {
                if req.volume_path.is_empty() {
                    return Err(missing("volume_path"));
                }
                let path = Path::new(&req.volume_path).canonicalize().map_err(|_| {
                    Status::not_found(format!("volume_path {} does not exist", req.volume_path))
                })?;
                if self.dataset_volume_at(&req.volume_id) {
                    return Ok(NodeGetVolumeStatsResponse {
                        usage: self.usage(&path).await?,
                        volume_condition: Some(VolumeCondition {
                            abnormal: false,
                            message: "dataset volume is mounted from the node cache".into(),
                        }),
                    });
                }
                let id = self.volume(&req.volume_id).await?;
                let (_, origin, table) = self.origin(&id, &[&path]).await?;
                if !mountinfo::at(&table, &path)
                    .iter()
                    .any(|e| origin.matches(e))
                {
                    return Err(Status::not_found(format!(
                        "volume {id} is not mounted at {}",
                        path.display()
                    )));
                }
                let usage = self.usage(&path).await?;
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

    #[tracing::instrument(skip_all, fields(volume.id = %request.get_ref().volume_id, lane = "local"))]
    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeExpandVolume", async {
                if req.volume_path.is_empty() {
                    return Err(missing("volume_path"));
                }
                if let Some(capability) = &req.volume_capability {
                    caps::check(capability).map_err(Status::invalid_argument)?;
                }
                let id = self.volume(&req.volume_id).await?;
                if !Path::new(&req.volume_path).exists() {
                    return Err(Status::not_found(format!(
                        "volume_path {} does not exist",
                        req.volume_path
                    )));
                }
                // The quota was already grown by ControllerExpandVolume; a directory volume has
                // no filesystem of its own to grow, so the node only reports the capacity.
                let meta = self.0.lane_op(move |lane| lane.get(&id)).await?;
                Ok(NodeExpandVolumeResponse {
                    capacity_bytes: meta.capacity_bytes as i64,
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
