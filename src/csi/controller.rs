//! The CSI Controller service for the local lane.
//!
//! Rules enforced here (CSI spec, "Controller Service RPC"): CreateVolume is idempotent by
//! name and answers ALREADY_EXISTS for an incompatible repeat; DeleteVolume of an unknown
//! volume succeeds; unsupported capabilities are reported by ValidateVolumeCapabilities as
//! "not confirmed", not as an error; paging tokens that do not belong to us are ABORTED.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use tonic::{Request, Response, Status};

use super::status::missing;
use super::{Plugin, TOPOLOGY_KEY, caps};
use crate::lane::dataset::DATASET_KEY;
use crate::lane::local::CreateRequest;
use crate::lane::{CreateParams, Range, VolumeId, VolumeMeta, to_wire};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{Rpc, rpc};
use crate::proto::*;
use crate::text::Shown;

/// The PVC annotation that asks for a dataset (like the StorageClass parameter `dataset`).
pub const PVC_DATASET_ANNOTATION: &str = "lanes.csi.dev/dataset";

/// Marks ListVolumes tokens as ours.
const TOKEN_PREFIX: &str = "after:";

/// Controller service over the shared plugin state.
#[derive(Debug, Clone)]
pub struct ControllerService(pub Arc<Plugin>);

impl ControllerService {
    fn volume(&self, meta: &VolumeMeta) -> Volume {
        Volume {
            capacity_bytes: to_wire(meta.capacity_bytes),
            volume_id: meta.id.clone(),
            volume_context: meta
                .dataset
                .iter()
                .map(|pin| (DATASET_KEY.to_owned(), pin.clone()))
                .collect(),
            content_source: None,
            accessible_topology: vec![Topology {
                segments: [(TOPOLOGY_KEY.to_owned(), meta.node_id.clone())].into(),
            }],
        }
    }

    fn condition(&self, id: &VolumeId) -> VolumeCondition {
        match self.0.lane.condition(id) {
            None => VolumeCondition {
                abnormal: false,
                message: "volume directory is present".into(),
            },
            Some(problem) => VolumeCondition {
                abnormal: true,
                message: problem,
            },
        }
    }

    /// True when the requested topology (if any) allows this node.
    fn topology_allows(&self, requirement: Option<&TopologyRequirement>) -> bool {
        let Some(requirement) = requirement else {
            return true;
        };
        let ours = self.0.topology();
        let fits = |t: &Topology| {
            t.segments
                .iter()
                .all(|(key, value)| ours.segments.get(key) == Some(value))
        };
        requirement.requisite.is_empty() || requirement.requisite.iter().any(fits)
    }

    /// True when a volume of this name exists already (its dataset is pinned already).
    async fn exists(&self, name: &str) -> bool {
        let Ok(id) = VolumeId::for_name(crate::lane::local::LANE, name) else {
            return false;
        };
        self.0.lane_op(move |lane| lane.get(&id)).await.is_ok()
    }

    /// The dataset a PVC asks for in its `lanes.csi.dev/dataset` annotation. csi-provisioner
    /// names the PVC in the parameters when run with `--extra-create-metadata`; without those
    /// parameters, or without a Kubernetes API, there is none.
    async fn pvc_dataset(
        &self,
        parameters: &HashMap<String, String>,
    ) -> Result<Option<String>, Status> {
        let (Some(name), Some(namespace)) = (
            parameters.get("csi.storage.k8s.io/pvc/name"),
            parameters.get("csi.storage.k8s.io/pvc/namespace"),
        ) else {
            return Ok(None);
        };
        let Some(client) = self.0.kube().await else {
            return Ok(None);
        };
        let api: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(client, namespace);
        let pvc = match api.get_opt(name).await {
            Ok(pvc) => pvc,
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "reading PVC {namespace}/{name} for its {PVC_DATASET_ANNOTATION} annotation: {e}"
                )));
            }
        };
        let Some(reference) = pvc
            .and_then(|p| p.metadata.annotations)
            .and_then(|a| a.get(PVC_DATASET_ANNOTATION).cloned())
        else {
            return Ok(None);
        };
        crate::dataset::Reference::parse(&reference).map_err(|e| {
            Status::invalid_argument(format!(
                "PVC {namespace}/{name} annotation {PVC_DATASET_ANNOTATION}: {e}"
            ))
        })?;
        Ok(Some(reference))
    }

    /// Resolves a dataset reference to the version it names now.
    async fn pin(&self, reference: &str) -> Result<String, Status> {
        match self.0.sources.pin_for_volume(reference).await {
            Ok(pin) => Ok(pin.to_string()),
            Err(e) => Err(Status::new(
                super::status::code(e.kind()),
                format!("parameter dataset {reference:?}: {e}"),
            )),
        }
    }

    async fn lookup(&self, volume_id: &str) -> Result<(VolumeId, VolumeMeta), Status> {
        let id = VolumeId::parse(volume_id)?;
        let lookup = id.clone();
        let meta = self.0.lane_op(move |lane| lane.get(&lookup)).await?;
        Ok((id, meta))
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, fields(volume.name = %Shown(&request.get_ref().name), lane = "local"))]
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("CreateVolume", async {
                let id = VolumeId::for_name(crate::lane::local::LANE, &req.name)?;
                caps::check_all(&req.volume_capabilities).map_err(Status::invalid_argument)?;
                if req.volume_content_source.is_some() {
                    return Err(Status::invalid_argument(
                        "volume_content_source is not supported: the local lane cannot clone \
                         volumes or restore snapshots",
                    ));
                }
                if !req.mutable_parameters.is_empty() {
                    return Err(Status::invalid_argument(
                        "mutable_parameters are not supported (no MODIFY_VOLUME capability)",
                    ));
                }
                let mut params = CreateParams::parse(&req.parameters, &self.0.profiles)?;
                if params.dataset.is_none() {
                    params.dataset = Box::pin(self.pvc_dataset(&req.parameters)).await?;
                }
                if !self.topology_allows(req.accessibility_requirements.as_ref()) {
                    return Err(Status::resource_exhausted(format!(
                        "the local lane of node {:?} cannot satisfy the requisite topology",
                        self.0.node_id
                    )));
                }
                let range = req.capacity_range.map_or(Range::default(), |r| Range {
                    required: r.required_bytes,
                    limit: r.limit_bytes,
                });
                // Keyed by the ID the name maps to: a create and a delete of the same volume
                // exclude each other.
                let _guard = self.0.guard(&id.to_string())?;
                self.0.failpoint.delay("create").await;
                let dataset = match &params.dataset {
                    Some(reference) if !self.exists(&req.name).await => {
                        Some(Box::pin(self.pin(reference)).await?)
                    }
                    _ => None,
                };
                let create = CreateRequest {
                    name: req.name.clone(),
                    range,
                    params,
                    dataset,
                };
                let meta = self.0.lane_op(move |lane| lane.create(&create)).await?;
                tracing::info!(volume.id = %meta.id, capacity = meta.capacity_bytes, "volume ready");
                Ok(CreateVolumeResponse {
                    volume: Some(self.volume(&meta)),
                })
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("DeleteVolume", async {
                let id = match VolumeId::parse(&req.volume_id) {
                    Ok(id) => id,
                    Err(crate::lane::Error::UnknownVolume(_)) => {
                        return Ok(DeleteVolumeResponse {});
                    }
                    Err(e) => return Err(e.into()),
                };
                let guard = self.0.guard(&req.volume_id)?;
                let mounter = self.0.mounter.clone();
                self.0
                    .lane_op(move |lane| {
                        let data = lane.data_path(&id);
                        let table =
                            mounter
                                .binds_of(&data)
                                .map_err(|e| crate::lane::Error::Io {
                                    context: "read the mount table".into(),
                                    source: std::io::Error::other(e),
                                })?;
                        lane.delete(&id, &table)
                    })
                    .await?;
                guard.retire();
                Ok(DeleteVolumeResponse {})
            })
            .await
    }

    async fn controller_publish_volume(
        &self,
        _request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerPublishVolume is not offered: local volumes need no attach step",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerUnpublishVolume is not offered: local volumes need no attach step",
        ))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("ValidateVolumeCapabilities", async {
                if req.volume_id.is_empty() {
                    return Err(missing("volume_id"));
                }
                if req.volume_capabilities.is_empty() {
                    return Err(missing("volume_capabilities"));
                }
                let (_, meta) = self.lookup(&req.volume_id).await?;
                let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message,
                };
                if let Err(reason) = caps::check_all(&req.volume_capabilities) {
                    return Ok(unconfirmed(reason));
                }
                if req.volume_context != self.volume(&meta).volume_context {
                    return Ok(unconfirmed(
                        "volume_context does not match the one CreateVolume returned".into(),
                    ));
                }
                if !req.parameters.is_empty() {
                    match CreateParams::parse(&req.parameters, &self.0.profiles) {
                        Ok(params) if params == meta.params => {}
                        Ok(_) => {
                            return Ok(unconfirmed("parameters differ from the volume's".into()));
                        }
                        Err(e) => return Ok(unconfirmed(e.to_string())),
                    }
                }
                if !req.mutable_parameters.is_empty() {
                    return Ok(unconfirmed("mutable_parameters are not supported".into()));
                }
                Ok(ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(validate_volume_capabilities_response::Confirmed {
                        volume_context: req.volume_context,
                        volume_capabilities: req.volume_capabilities,
                        parameters: req.parameters,
                        mutable_parameters: HashMap::new(),
                    }),
                    message: String::new(),
                })
            })
            .await
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("ListVolumes", async {
                if req.max_entries < 0 {
                    return Err(Status::invalid_argument("max_entries must not be negative"));
                }
                let volumes = self.0.lane_op(|lane| lane.list()).await?;
                // The token is a cursor: the last volume ID of the previous page. Volumes are
                // listed in ID order, so a page boundary survives deletes and creates.
                let start = match req.starting_token.as_str() {
                    "" => 0,
                    token => {
                        let after = token
                            .strip_prefix(TOKEN_PREFIX)
                            .filter(|id| VolumeId::parse(id).is_ok())
                            .ok_or_else(|| {
                                Status::aborted(format!(
                                    "starting_token {token:?} is not a token this plugin issued; \
                                     list again from the start"
                                ))
                            })?;
                        volumes.partition_point(|meta| meta.id.as_str() <= after)
                    }
                };
                let take = match req.max_entries {
                    0 => volumes.len(),
                    n => n as usize,
                };
                let end = start.saturating_add(take).min(volumes.len());
                let entries = volumes[start..end]
                    .iter()
                    .map(|meta| {
                        let condition =
                            VolumeId::parse(&meta.id).ok().map(|id| self.condition(&id));
                        list_volumes_response::Entry {
                            volume: Some(self.volume(meta)),
                            status: Some(list_volumes_response::VolumeStatus {
                                published_node_ids: vec![],
                                volume_condition: condition,
                            }),
                        }
                    })
                    .collect();
                let next_token = match volumes[..end].last() {
                    Some(last) if end < volumes.len() => format!("{TOKEN_PREFIX}{}", last.id),
                    _ => String::new(),
                };
                Ok(ListVolumesResponse {
                    entries,
                    next_token,
                })
            })
            .await
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("GetCapacity", async {
                let supported = req
                    .volume_capabilities
                    .iter()
                    .all(|c| caps::check(c).is_ok());
                let here = req.accessible_topology.as_ref().is_none_or(|t| {
                    t.segments
                        .get(TOPOLOGY_KEY)
                        .is_none_or(|node| *node == self.0.node_id)
                });
                if !supported || !here {
                    return Ok(GetCapacityResponse::default());
                }
                if let Err(e) = CreateParams::parse(&req.parameters, &self.0.profiles) {
                    return Err(e.into());
                }
                let space = self.0.lane_op(|lane| lane.space()).await?;
                Ok(GetCapacityResponse {
                    available_capacity: to_wire(space.available_bytes),
                    maximum_volume_size: Some(to_wire(space.total_bytes)),
                    minimum_volume_size: None,
                })
            })
            .await
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        self.0
            .call("ControllerGetCapabilities", async {
                let capabilities = [
                    rpc::Type::CreateDeleteVolume,
                    rpc::Type::ListVolumes,
                    rpc::Type::GetCapacity,
                    rpc::Type::ExpandVolume,
                    rpc::Type::VolumeCondition,
                    rpc::Type::GetVolume,
                    rpc::Type::SingleNodeMultiWriter,
                ]
                .into_iter()
                .map(|kind| ControllerServiceCapability {
                    r#type: Some(controller_service_capability::Type::Rpc(Rpc {
                        r#type: kind as i32,
                    })),
                })
                .collect();
                Ok(ControllerGetCapabilitiesResponse { capabilities })
            })
            .await
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered yet"))
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered yet"))
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots are not offered yet"))
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id), lane = "local"))]
    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("ControllerExpandVolume", async {
                if req.volume_id.is_empty() {
                    return Err(missing("volume_id"));
                }
                let range = req
                    .capacity_range
                    .ok_or_else(|| missing("capacity_range"))?;
                if let Some(capability) = &req.volume_capability {
                    caps::check(capability).map_err(Status::invalid_argument)?;
                }
                let id = VolumeId::parse(&req.volume_id)?;
                let _guard = self.0.guard(&req.volume_id)?;
                let range = Range {
                    required: range.required_bytes,
                    limit: range.limit_bytes,
                };
                let capacity = self.0.lane_op(move |lane| lane.expand(&id, range)).await?;
                Ok(ControllerExpandVolumeResponse {
                    capacity_bytes: to_wire(capacity),
                    node_expansion_required: false,
                })
            })
            .await
    }

    async fn controller_get_volume(
        &self,
        request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("ControllerGetVolume", async {
                let (id, meta) = self.lookup(&req.volume_id).await?;
                Ok(ControllerGetVolumeResponse {
                    volume: Some(self.volume(&meta)),
                    status: Some(controller_get_volume_response::VolumeStatus {
                        published_node_ids: vec![],
                        volume_condition: Some(self.condition(&id)),
                    }),
                })
            })
            .await
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume is not offered",
        ))
    }
}
