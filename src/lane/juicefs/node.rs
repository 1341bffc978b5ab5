//! The node half of the `shared-rwx` lane: stage binds the volume's directory of the file
//! system's one mount at the staging path, publish binds the staging path at the target.
//!
//! Rules, beyond those of every bind lane ([`crate::lane::bind`]):
//! - a stage waits (bounded by the heartbeat) until the mount enforces the volume's quota: a
//!   running mount loads quotas set after it started only on its heartbeat;
//! - when the FUSE process dies every bind of it answers ENOTCONN: each call and a periodic
//!   check ([`JuiceFsNode::watch`]) mount the file system again and re-bind every staging
//!   and target path the ledger holds, with the flags each had, so pods (that mount with
//!   `HostToContainer` propagation) recover without being restarted.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::fs::FileSystem;
use super::{JuiceFsLane, LANE};
use crate::lane::bind;
use crate::lane::capability::{Access, Capability};
use crate::lane::ledger::VolumeRecord;
use crate::lane::node::{
    NodeContext, NodeError, NodeLane, Publish, Result, Stage, Stats, Unpublished,
};
use crate::lane::{VolumeId, VolumeMeta};
use crate::mount::health::{Probe, Probed, probe, split};
use crate::mount::mountinfo;
use crate::mount::safe::RequestPath;
use crate::text::Shown;

/// Which capabilities the lane serves: mount access in every access mode.
pub fn access(capability: &Capability) -> std::result::Result<Access, String> {
    bind::shared_access(capability, LANE, "a JuiceFS file system", &["juicefs"])
}

/// The `shared-rwx` lane on this node.
#[derive(Debug)]
pub struct JuiceFsNode {
    ctx: Arc<NodeContext>,
    lane: Arc<JuiceFsLane>,
}

impl JuiceFsNode {
    pub fn new(ctx: Arc<NodeContext>, lane: Arc<JuiceFsLane>) -> JuiceFsNode {
        JuiceFsNode { ctx, lane }
    }

    /// Runs blocking lane work off the runtime under the deadline.
    async fn lane<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&JuiceFsLane, &NodeContext) -> Result<T> + Send + 'static,
    {
        let (lane, ctx) = (self.lane.clone(), self.ctx.clone());
        self.ctx
            .blocking("the shared-rwx lane", move || f(&lane, &ctx))
            .await
    }

    /// The volume's directory in a mount that answers ([`prepare`]).
    async fn mounted(&self, volume_id: &str) -> Result<(VolumeId, PathBuf)> {
        let id = VolumeId::parse(volume_id)?;
        let lookup = id.clone();
        let data = self
            .lane(move |lane, ctx| prepare(lane, ctx, &lookup))
            .await?;
        Ok((id, data))
    }

    /// [`JuiceFsNode::mounted`], for a volume that must exist: its record too.
    async fn ready(&self, volume_id: &str) -> Result<(VolumeId, VolumeMeta, PathBuf)> {
        let id = VolumeId::parse(volume_id)?;
        let lookup = id.clone();
        let (meta, data) = self
            .lane(move |lane, ctx| {
                let data = prepare(lane, ctx, &lookup)?;
                Ok((lane.get_mounted(&lookup)?, data))
            })
            .await?;
        Ok((id, meta, data))
    }

    /// Every `interval`, mounts again each file system whose mount died while volumes of it
    /// are staged here, and re-binds their paths.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            let checked = self
                .lane(|lane, ctx| {
                    let records = ctx.ledger.all()?;
                    for fs in lane.filesystems() {
                        let prefix = format!("{LANE}/{}/", fs.profile);
                        let ours: Vec<VolumeRecord> = records
                            .iter()
                            .filter(|r| r.volume_id.starts_with(&prefix))
                            .cloned()
                            .collect();
                        if ours.is_empty() {
                            continue;
                        }
                        match fs.ensure_mounted() {
                            Ok((device, _)) => rebind(lane, ctx, fs, device, &ours),
                            Err(e) => {
                                tracing::warn!(profile = %fs.profile, error = %e, "JuiceFS mount check failed")
                            }
                        }
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = checked {
                tracing::warn!(error = %e, "JuiceFS mount check failed");
            }
        }
    }
}

/// Mounts the volume's file system if it is not answering and re-binds what a dead mount left
/// stale: every volume of the file system after a remount, else this one's paths. The
/// volume's directory in the mount.
fn prepare(lane: &JuiceFsLane, ctx: &NodeContext, id: &VolumeId) -> Result<PathBuf> {
    let fs = lane.fs_of(id)?;
    let (device, remounted) = fs.ensure_mounted()?;
    let records = match remounted {
        true => ctx.ledger.all()?,
        false => vec![ctx.ledger.load(&id.to_string())?],
    };
    rebind(lane, ctx, fs, device, &records);
    Ok(lane.data_path(id)?)
}

/// Re-binds the staging and target paths of `records` (volumes of `fs`) whose mount is of
/// another FUSE connection than `device` (a dead one). Failures are logged: the next call or
/// check retries.
fn rebind(
    lane: &JuiceFsLane,
    ctx: &NodeContext,
    fs: &FileSystem,
    device: (u32, u32),
    records: &[VolumeRecord],
) {
    let binds = bind::recorded_binds(records, |id| {
        (id.fs() == Some(fs.profile.as_str()))
            .then(|| lane.data_path(id).ok())
            .flatten()
    });
    let paths: Vec<&Path> = binds.iter().map(|b| b.path).collect();
    // A stat per path tells whether any is of another FUSE connection (or of none, ENOTCONN);
    // only then is the mount table read.
    let suspect = |path: &&Path| match probe(path) {
        Ok(Probed { fuse, dev }) => fuse && split(dev) != device,
        Err(Probe::Missing) => false,
        Err(Probe::Failed(_)) => true,
    };
    if !paths.iter().any(suspect) {
        return;
    }
    let Ok(table) = mountinfo::read_for(&paths) else {
        return;
    };
    bind::rebind_stale(ctx, &table, &binds, |path| {
        mountinfo::at(&table, path).last().is_some_and(|top| {
            top.fs_type.starts_with("fuse.juicefs") && (top.major, top.minor) != device
        })
    });
}

/// Waits until this process's mount enforces the quota of the volume at `data`: a statfs of a
/// directory under a quota shows the quota's size. Bounded by the heartbeat.
fn wait_for_quota(fs: &FileSystem, data: &Path, capacity: u64) -> Result<()> {
    let limit = Duration::from_secs(fs.config.heartbeat_seconds + 5);
    let started = Instant::now();
    loop {
        let stat = nix::sys::statvfs::statvfs(data).map_err(|e| {
            NodeError::Unavailable(format!("statfs {}: {e}", Shown(&data.to_string_lossy())))
        })?;
        if stat.blocks().saturating_mul(stat.fragment_size()) == capacity {
            return Ok(());
        }
        if started.elapsed() > limit {
            return Err(NodeError::Unavailable(format!(
                "the JuiceFS mount of profile {} has not loaded the volume's quota within {}s \
                 (mounts reload quotas every {}s); retry",
                fs.profile,
                limit.as_secs(),
                fs.config.heartbeat_seconds
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[async_trait::async_trait]
impl NodeLane for JuiceFsNode {
    fn kind(&self) -> &'static str {
        LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access(capability)
    }

    async fn stage(&self, request: Stage<'_>) -> Result<()> {
        let Stage {
            volume_id,
            staging,
            capability,
        } = request;
        let (id, meta, data) = self.ready(volume_id).await?;
        let quota_data = data.clone();
        self.lane(move |lane, _| {
            wait_for_quota(lane.fs_of(&id)?, &quota_data, meta.capacity_bytes)
        })
        .await?;
        let Some(staging_dir) =
            bind::prepare_stage(&self.ctx, volume_id, staging, capability, &data).await?
        else {
            return Ok(());
        };
        bind::bind_staging(&self.ctx, &data, staging, staging_dir).await
    }

    async fn unstage(&self, volume_id: &str, staging: &RequestPath) -> Result<()> {
        let (_, data) = self.mounted(volume_id).await?;
        bind::unstage(&self.ctx, volume_id, staging, &data).await
    }

    async fn publish(&self, request: Publish<'_>) -> Result<()> {
        let access = access(request.capability).map_err(NodeError::Invalid)?;
        self.ctx.failpoint.delay("publish").await;
        let id = VolumeId::parse(request.volume_id)?;
        // The volume's directory is its existence check: no record read on this path.
        let data = self
            .lane(move |lane, ctx| {
                let data = prepare(lane, ctx, &id)?;
                match data.is_dir() {
                    true => Ok(data),
                    false => Err(crate::lane::Error::UnknownVolume(id.to_string()).into()),
                }
            })
            .await?;
        bind::publish(&self.ctx, request, access, &data).await
    }

    async fn unpublish(
        &self,
        mut record: VolumeRecord,
        target: &RequestPath,
    ) -> Result<Unpublished> {
        let (_, data) = match self.mounted(&record.volume_id).await {
            Ok(ready) => ready,
            // Not a volume of ours: nothing of it can be mounted here.
            Err(NodeError::Lane(crate::lane::Error::UnknownVolume(_))) => {
                return Ok(Unpublished::Kept);
            }
            Err(e) => return Err(e),
        };
        bind::unpublish(&self.ctx, &mut record, target, &data).await?;
        Ok(Unpublished::Kept)
    }

    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats> {
        let (id, _, data) = self.ready(&record.volume_id).await?;
        bind::require_mounted(&self.ctx, &record.volume_id, path, &data).await?;
        // A statfs of a directory under a JuiceFS quota reports the quota's size and use.
        let usage = self.ctx.usage(path).await?;
        let abnormal = self.lane(move |lane, _| Ok(lane.condition(&id)?)).await?;
        Ok(Stats {
            usage,
            message: abnormal
                .clone()
                .unwrap_or_else(|| "volume is mounted and its JuiceFS mount answers".into()),
            abnormal,
        })
    }

    async fn expand(&self, volume_id: &str, path: &RequestPath) -> Result<u64> {
        let (id, meta, data) = self.ready(volume_id).await?;
        bind::require_mounted(&self.ctx, volume_id, path, &data).await?;
        // ControllerExpandVolume raised the quota; done once this node's mount enforces it.
        let capacity = meta.capacity_bytes;
        self.lane(move |lane, _| wait_for_quota(lane.fs_of(&id)?, &data, capacity))
            .await?;
        Ok(capacity)
    }
}
