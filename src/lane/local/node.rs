//! The node half of the local lane: stage = bind the volume's data directory at the staging
//! path (an overlay on the cached tree for a volume made with a dataset); publish = bind the
//! staging path at the target with the requested flags.
//!
//! The bind rules are [`crate::lane::bind`]'s.

use std::sync::Arc;

use super::{LocalLane, access};
use crate::lane::bind;
use crate::lane::capability::{Access, Capability};
use crate::lane::ledger::VolumeRecord;
use crate::lane::node::{
    NodeContext, NodeError, NodeLane, Publish, Result, Stage, Stats, Unpublished, Usage,
};
use crate::lane::{VolumeId, VolumeMeta};
use crate::mount::safe::RequestPath;

/// The local lane on this node.
#[derive(Debug)]
pub struct LocalNode {
    ctx: Arc<NodeContext>,
    lane: Arc<LocalLane>,
}

impl LocalNode {
    pub fn new(ctx: Arc<NodeContext>, lane: Arc<LocalLane>) -> LocalNode {
        LocalNode { ctx, lane }
    }

    /// Runs blocking lane work off the runtime under the deadline.
    async fn lane<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&LocalLane) -> crate::lane::Result<T> + Send + 'static,
    {
        let lane = self.lane.clone();
        self.ctx
            .blocking("the local lane", move || Ok(f(&lane)?))
            .await
    }

    fn id(volume_id: &str) -> Result<VolumeId> {
        Ok(VolumeId::parse(volume_id)?)
    }

    async fn meta(&self, id: &VolumeId) -> Result<VolumeMeta> {
        let lookup = id.clone();
        self.lane(move |lane| lane.get(&lookup)).await
    }
}

#[async_trait::async_trait]
impl NodeLane for LocalNode {
    fn kind(&self) -> &'static str {
        super::LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access::access(capability)
    }

    async fn stage(&self, request: Stage<'_>) -> Result<()> {
        let Stage {
            volume_id,
            staging,
            capability,
        } = request;
        let id = Self::id(volume_id)?;
        let meta = self.meta(&id).await?;
        let data = self.lane.data_path(&id);
        let Some(staging_dir) =
            bind::prepare_stage(&self.ctx, volume_id, staging, capability, &data).await?
        else {
            return Ok(());
        };
        if let Some(pin) = &meta.dataset {
            return crate::lane::dataset::stage_overlay(
                &self.ctx,
                pin,
                &data,
                staging,
                staging_dir,
            )
            .await;
        }
        bind::bind_staging(&self.ctx, &data, staging, staging_dir).await
    }

    async fn unstage(&self, volume_id: &str, staging: &RequestPath) -> Result<()> {
        let id = Self::id(volume_id)?;
        bind::unstage(&self.ctx, volume_id, staging, &self.lane.data_path(&id)).await
    }

    async fn publish(&self, request: Publish<'_>) -> Result<()> {
        let access = access::access(request.capability).map_err(NodeError::Invalid)?;
        let id = Self::id(request.volume_id)?;
        self.ctx.failpoint.delay("publish").await;
        self.meta(&id).await?;
        bind::publish(&self.ctx, request, access, &self.lane.data_path(&id)).await
    }

    async fn unpublish(
        &self,
        mut record: VolumeRecord,
        target: &RequestPath,
    ) -> Result<Unpublished> {
        let id = match VolumeId::parse(&record.volume_id) {
            Ok(id) => id,
            // Not a volume of ours: nothing of it can be mounted here.
            Err(crate::lane::Error::UnknownVolume(_)) => return Ok(Unpublished::Kept),
            Err(e) => return Err(e.into()),
        };
        bind::unpublish(&self.ctx, &mut record, target, &self.lane.data_path(&id)).await?;
        Ok(Unpublished::Kept)
    }

    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats> {
        let id = Self::id(&record.volume_id)?;
        self.meta(&id).await?;
        let data = self.lane.data_path(&id);
        bind::require_mounted(&self.ctx, &record.volume_id, path, &data).await?;
        let mut usage = self.ctx.usage(path).await?;
        let lookup = id.clone();
        if let Some((used, limit)) = self.lane(move |lane| lane.usage(&lookup)).await? {
            // The volume's own bytes and limit (its quota group), not the filesystem's.
            usage.retain(|u| u.inodes);
            usage.insert(
                0,
                Usage {
                    inodes: false,
                    total: limit,
                    used,
                    available: limit.saturating_sub(used),
                },
            );
        }
        let lookup = id.clone();
        let abnormal = self.lane(move |lane| Ok(lane.condition(&lookup))).await?;
        Ok(Stats {
            usage,
            message: abnormal
                .clone()
                .unwrap_or_else(|| "volume is mounted and its directory is present".into()),
            abnormal,
        })
    }

    async fn expand(&self, volume_id: &str, path: &RequestPath) -> Result<u64> {
        let id = Self::id(volume_id)?;
        let meta = self.meta(&id).await?;
        bind::require_mounted(&self.ctx, volume_id, path, &self.lane.data_path(&id)).await?;
        // The quota was already grown by ControllerExpandVolume; a directory volume has no
        // filesystem of its own to grow, so the node only reports the capacity.
        Ok(meta.capacity_bytes)
    }
}
