//! The CSI Node service: the gRPC edge of every node lane.
//!
//! Each handler reads as: check the required fields, the request paths
//! ([`crate::mount::safe`]: absolute, no symlink component, not inside or above what Lanes
//! owns) and the capability's shape; take the volume's guard (one call per volume at a time,
//! ABORTED for the other); pick the lane (by the volume ID's lane part, or for inline volumes
//! by what the request or the node ledger says); call it; map its error to a gRPC code
//! ([`super::status`]). The rules of mounting live in [`crate::lane::node`] and the lanes.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::Plugin;
use super::caps;
use super::status::require;
use crate::lane::VolumeId;
use crate::lane::node::{NodeLane, Publish, Stage, Stats, Unpublished};
use crate::mount::safe::RequestPath;
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{Rpc, rpc};
use crate::proto::*;
use crate::text::Shown;

/// Node service over the shared plugin state.
#[derive(Debug, Clone)]
pub struct NodeService(pub Arc<Plugin>);

impl NodeService {
    /// Applies personal and group permissions to a publish: refuses (PERMISSION_DENIED, or
    /// UNAVAILABLE when it cannot know), or answers whether the mount must be read-only
    /// whatever the pod asked. Unowned volumes pass as before.
    async fn admit(&self, context: &HashMap<String, String>) -> Result<bool, Status> {
        use crate::access::{Decision, Ownership, directory::PodRef};
        let Some(ownership) = Ownership::from_context(context).map_err(Status::invalid_argument)?
        else {
            return Ok(false);
        };
        let metrics = &self.0.metrics;
        let Some(pod) = PodRef::from_context(context) else {
            metrics.access_decision("denied");
            return Err(Status::permission_denied(format!(
                "{} is owned, and the CO named no pod to decide for: the CSIDriver must set \
                 podInfoOnMount: true",
                ownership.describe()
            )));
        };
        let decision = self.0.access.decide(&ownership, &pod).await.map_err(|e| {
            metrics.access_decision("unavailable");
            Status::unavailable(e.to_string())
        })?;
        metrics.access_decision(decision.outcome());
        match decision {
            Decision::AsAsked => Ok(false),
            Decision::ReadOnly => {
                tracing::info!(pod.namespace = %pod.namespace, pod.name = %pod.name, volume = %ownership.describe(), "read access only: mounting read-only");
                Ok(true)
            }
            Decision::Denied(message) => Err(Status::permission_denied(message)),
        }
    }

    /// On the node-local driver's socket, the controller half of an expansion (a bigger disk
    /// image, a higher quota) runs here, before the node half: no ControllerExpandVolume
    /// comes (see ControllerGetCapabilities). Growing is idempotent and never shrinks, so a
    /// repeat, or a call without a capacity range, leaves the volume as it is.
    async fn grow_here(&self, volume_id: &str, range: Option<CapacityRange>) -> Result<(), Status> {
        let Some(range) = range.filter(|_| self.0.expand_at_node) else {
            return Ok(());
        };
        let id = VolumeId::parse(volume_id)?;
        let Some(controller) = self.0.controllers.get(id.lane()) else {
            return Ok(());
        };
        let range = crate::lane::Range {
            required: range.required_bytes,
            limit: range.limit_bytes,
        };
        controller.expand(&id, range).await?;
        Ok(())
    }

    /// Checks a path named by the request (see [`crate::mount::safe`]), links refused up front.
    fn request_path(&self, field: &'static str, text: &str) -> Result<RequestPath, Status> {
        let path = self.0.confinement.check(field, text)?;
        path.refuse_links()?;
        Ok(path)
    }

    /// The node lane of a volume ID; IDs of other drivers are NOT_FOUND.
    fn lane(&self, volume_id: &str) -> Result<&dyn NodeLane, Status> {
        let id = VolumeId::parse(volume_id)?;
        self.0.lanes.get(id.lane()).ok_or_else(|| {
            Status::not_found(format!(
                "volume {} is on no lane of this node",
                Shown(volume_id)
            ))
        })
    }

    /// The lane of a volume the node ledger knows: inline dataset volumes by their record.
    fn lane_of_record(
        &self,
        record: &crate::lane::ledger::VolumeRecord,
    ) -> Result<Option<&dyn NodeLane>, Status> {
        if record.dataset.is_some() {
            return self.inline().map(Some);
        }
        match VolumeId::parse(&record.volume_id) {
            Ok(id) => Ok(self.0.lanes.get(id.lane())),
            Err(crate::lane::Error::UnknownVolume(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The lane of inline (ephemeral) volumes.
    fn inline(&self) -> Result<&dyn NodeLane, Status> {
        self.0.lanes.inline().ok_or_else(|| {
            Status::failed_precondition("this node has no lane for inline dataset volumes")
        })
    }

    /// Checks the capability against the lane's rules.
    fn access(
        lane: &dyn NodeLane,
        capability: &crate::lane::capability::Capability,
    ) -> Result<(), Status> {
        lane.access(capability)
            .map(drop)
            .map_err(Status::invalid_argument)
    }
}

fn stats_response(stats: Stats) -> NodeGetVolumeStatsResponse {
    let wire = crate::lane::to_wire;
    NodeGetVolumeStatsResponse {
        usage: stats
            .usage
            .iter()
            .map(|u| VolumeUsage {
                total: wire(u.total),
                used: wire(u.used),
                available: wire(u.available),
                unit: if u.inodes {
                    volume_usage::Unit::Inodes
                } else {
                    volume_usage::Unit::Bytes
                } as i32,
            })
            .collect(),
        volume_condition: Some(VolumeCondition {
            abnormal: stats.abnormal.is_some(),
            message: stats.message,
        }),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeStageVolume", async {
                require(&req.volume_id, "volume_id")?;
                let staging = self.request_path("staging_target_path", &req.staging_target_path)?;
                let capability = caps::required(req.volume_capability.as_ref())?;
                let lane = self.lane(&req.volume_id)?;
                Self::access(lane, &capability)?;
                let _guard = self.0.guard(&req.volume_id)?;
                lane.stage(Stage {
                    volume_id: &req.volume_id,
                    staging: &staging,
                    capability: &capability,
                })
                .await?;
                Ok(NodeStageVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeUnstageVolume", async {
                require(&req.volume_id, "volume_id")?;
                let staging = self.request_path("staging_target_path", &req.staging_target_path)?;
                let lane = self.lane(&req.volume_id)?;
                let _guard = self.0.guard(&req.volume_id)?;
                lane.unstage(&req.volume_id, &staging).await?;
                Ok(NodeUnstageVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodePublishVolume", async {
                require(&req.volume_id, "volume_id")?;
                let target = self.request_path("target_path", &req.target_path)?;
                let capability = caps::required(req.volume_capability.as_ref())?;
                let inline = crate::lane::dataset::is_inline(
                    &req.volume_context,
                    req.staging_target_path.is_empty(),
                );
                let lane: &dyn NodeLane = if inline {
                    self.inline()?
                } else {
                    self.lane(&req.volume_id)?
                };
                Self::access(lane, &capability)?;
                let staging = match req.staging_target_path.as_str() {
                    "" => None,
                    text => Some(self.request_path("staging_target_path", text)?),
                };
                // Inline volumes are the pod's own: only claims carry an owner.
                let read_only_by_grant = !inline && self.admit(&req.volume_context).await?;
                let _guard = self.0.guard(&req.volume_id)?;
                lane.publish(Publish {
                    volume_id: &req.volume_id,
                    target: &target,
                    staging: staging.as_ref(),
                    capability: &capability,
                    readonly: req.readonly || read_only_by_grant,
                    context: &req.volume_context,
                })
                .await?;
                Ok(NodePublishVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
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
                let record = self.0.lanes.ctx.ledger.load(&req.volume_id)?;
                // A volume no lane of this node knows: nothing of it can be mounted here.
                let Some(lane) = self.lane_of_record(&record)? else {
                    return Ok(NodeUnpublishVolumeResponse {});
                };
                if lane.unpublish(record, &target).await? == Unpublished::Forgotten {
                    guard.retire();
                }
                Ok(NodeUnpublishVolumeResponse {})
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeGetVolumeStats", async {
                require(&req.volume_id, "volume_id")?;
                let path = self.request_path("volume_path", &req.volume_path)?;
                let record = self.0.lanes.ctx.ledger.load(&req.volume_id)?;
                let lane = match self.lane_of_record(&record)? {
                    Some(lane) => lane,
                    None => self.lane(&req.volume_id)?,
                };
                Ok(stats_response(lane.stats(&record, &path).await?))
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("NodeExpandVolume", async {
                require(&req.volume_id, "volume_id")?;
                let path = self.request_path("volume_path", &req.volume_path)?;
                let lane = self.lane(&req.volume_id)?;
                if let Some(capability) = &req.volume_capability {
                    let capability =
                        caps::capability(capability).map_err(Status::invalid_argument)?;
                    Self::access(lane, &capability)?;
                }
                let _guard = self.0.guard(&req.volume_id)?;
                self.grow_here(&req.volume_id, req.capacity_range).await?;
                let capacity = lane.expand(&req.volume_id, &path).await?;
                Ok(NodeExpandVolumeResponse {
                    capacity_bytes: crate::lane::to_wire(capacity),
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
