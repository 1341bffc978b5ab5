//! The CSI Controller service: the gRPC edge of every controller lane. Handlers read as:
//! check the request, take the volume's guard, pick the lane (by the volume ID's lane part, or
//! for CreateVolume and GetCapacity by the profile's lane), call it, map its error.
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
use super::{Plugin, caps};
use crate::access::Ownership;
use crate::lane::controller::{ControllerLane, Segments};
use crate::lane::dataset::DATASET_KEY;
use crate::lane::local::CreateRequest;
use crate::lane::snapshot::{SnapshotId, SnapshotMeta, Source};
use crate::lane::{CreateParams, Range, VolumeId, VolumeMeta, to_wire};
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{Rpc, rpc};
use crate::proto::*;
use crate::text::Shown;

/// The PVC annotation that asks for a dataset (like the StorageClass parameter `dataset`).
pub const PVC_DATASET_ANNOTATION: &str = "lanes.csi.dev/dataset";

/// Marks ListVolumes tokens as ours.
const TOKEN_PREFIX: &str = "after:";

/// What a PVC's annotations ask of the volume made for it.
#[derive(Debug, Default)]
struct Claim {
    dataset: Option<String>,
    ownership: Option<Ownership>,
}

/// Controller service over the shared plugin state.
#[derive(Debug, Clone)]
pub struct ControllerService(pub Arc<Plugin>);

impl ControllerService {
    fn volume(lane: &dyn ControllerLane, meta: &VolumeMeta) -> Volume {
        Volume {
            capacity_bytes: to_wire(meta.capacity_bytes),
            volume_id: meta.id.clone(),
            volume_context: meta
                .dataset
                .iter()
                .map(|pin| (DATASET_KEY.to_owned(), pin.clone()))
                .chain(meta.params.ownership.iter().flat_map(Ownership::context))
                .collect(),
            content_source: meta.content_source.as_deref().and_then(content_source),
            // No segments: reachable from every node (the spec's empty list).
            accessible_topology: Some(lane.topology(meta))
                .filter(|segments| !segments.is_empty())
                .map(|segments| Topology {
                    segments: segments.into_iter().collect(),
                })
                .into_iter()
                .collect(),
        }
    }

    /// The snapshot or volume a new volume on `lane` is to copy; it must be on the same lane.
    fn source(
        lane: &dyn ControllerLane,
        wire: Option<&VolumeContentSource>,
    ) -> Result<Option<Source>, Status> {
        use volume_content_source::Type;
        let source = match wire.and_then(|s| s.r#type.as_ref()) {
            None => return Ok(None),
            Some(Type::Snapshot(s)) => Source::Snapshot(SnapshotId::parse(&s.snapshot_id)?),
            Some(Type::Volume(v)) => Source::Volume(VolumeId::parse(&v.volume_id)?),
        };
        if source.lane() != lane.kind() {
            return Err(Status::invalid_argument(format!(
                "volume_content_source {source} is on lane {}; a volume on lane {} can only be \
                 made from that lane's snapshots and volumes",
                source.lane(),
                lane.kind()
            )));
        }
        Ok(Some(source))
    }

    /// GetCapacity of a profile Longhorn serves: the most one schedulable Longhorn disk can
    /// take now (UNAVAILABLE when the Kubernetes API or Longhorn cannot be read).
    async fn longhorn_capacity(
        &self,
        backend: &crate::lane::longhorn::LonghornBackend,
    ) -> Result<GetCapacityResponse, Status> {
        let client = self.0.kube.client().await.map_err(Status::unavailable)?;
        let health = crate::lane::longhorn::health(client, backend)
            .await
            .map_err(Status::unavailable)?;
        Ok(GetCapacityResponse {
            available_capacity: to_wire(health.largest_free),
            maximum_volume_size: Some(to_wire(health.largest_free)),
            minimum_volume_size: None,
        })
    }

    fn snapshot(meta: &SnapshotMeta) -> Snapshot {
        Snapshot {
            size_bytes: to_wire(meta.size_bytes),
            snapshot_id: meta.id.clone(),
            source_volume_id: meta.source_volume_id.clone(),
            creation_time: Some(prost_types::Timestamp {
                seconds: meta.created_unix.min(i64::MAX as u64) as i64,
                nanos: 0,
            }),
            ready_to_use: true,
            group_snapshot_id: String::new(),
        }
    }

    async fn condition(
        lane: &dyn ControllerLane,
        id: &VolumeId,
    ) -> Result<VolumeCondition, Status> {
        Ok(match lane.condition(id).await? {
            None => VolumeCondition {
                abnormal: false,
                message: "volume directory is present".into(),
            },
            Some(problem) => VolumeCondition {
                abnormal: true,
                message: problem,
            },
        })
    }

    /// The controller lane of a parsed volume ID.
    fn lane(&self, id: &VolumeId) -> Result<&dyn ControllerLane, Status> {
        self.0.controllers.get(id.lane()).ok_or_else(|| {
            Status::not_found(format!(
                "volume {} is on no lane of this controller",
                Shown(&id.to_string())
            ))
        })
    }

    /// Checks capabilities against the lane's rules; the first one it cannot serve says why.
    fn check(lane: &dyn ControllerLane, capabilities: &[VolumeCapability]) -> Result<(), String> {
        if capabilities.is_empty() {
            return Err("volume_capabilities is required".into());
        }
        capabilities
            .iter()
            .try_for_each(|c| lane.access(&caps::capability(c)?).map(drop))
    }

    /// What the PVC's annotations ask of its volume: a dataset (`lanes.csi.dev/dataset`) and
    /// an owner (`lanes.csi.dev/owner` or `lanes.csi.dev/group`). csi-provisioner names the
    /// PVC in the parameters when run with `--extra-create-metadata`; without those
    /// parameters, or without a Kubernetes API, the PVC asks nothing.
    async fn claim(&self, parameters: &HashMap<String, String>) -> Result<Claim, Status> {
        let (Some(name), Some(namespace)) = (
            parameters.get("csi.storage.k8s.io/pvc/name"),
            parameters.get("csi.storage.k8s.io/pvc/namespace"),
        ) else {
            return Ok(Claim::default());
        };
        let Some(client) = self.0.kube().await else {
            return Ok(Claim::default());
        };
        let api: kube::Api<PersistentVolumeClaim> = kube::Api::namespaced(client, namespace);
        let pvc = match api.get_opt(name).await {
            Ok(pvc) => pvc,
            Err(kube::Error::Api(status)) if status.code == 404 => None,
            Err(e) => {
                return Err(Status::unavailable(format!(
                    "reading PVC {namespace}/{name} for its lanes.csi.dev annotations: {e}"
                )));
            }
        };
        let annotations = pvc.and_then(|p| p.metadata.annotations).unwrap_or_default();
        let invalid = |e: String| Status::invalid_argument(format!("PVC {namespace}/{name}: {e}"));
        let dataset = annotations.get(PVC_DATASET_ANNOTATION).cloned();
        if let Some(reference) = &dataset {
            crate::dataset::Reference::parse(reference)
                .map_err(|e| invalid(format!("annotation {PVC_DATASET_ANNOTATION}: {e}")))?;
        }
        let ownership = Ownership::from_annotations(&annotations, format!("{namespace}/{name}"))
            .map_err(invalid)?;
        Ok(Claim { dataset, ownership })
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

    async fn lookup(
        &self,
        volume_id: &str,
    ) -> Result<(&dyn ControllerLane, VolumeId, VolumeMeta), Status> {
        let id = VolumeId::parse(volume_id)?;
        let lane = self.lane(&id)?;
        let meta = lane.get(&id).await?;
        Ok((lane, id, meta))
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    #[tracing::instrument(skip_all, fields(volume.name = %Shown(&request.get_ref().name), lane = tracing::field::Empty))]
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("CreateVolume", async {
                crate::lane::id::validate_name(&req.name)?;
                let mut params = CreateParams::parse(&req.parameters, &self.0.profiles)?;
                let profile = self.0.profiles.get(&params.profile).map_err(Status::invalid_argument)?;
                if let Some(longhorn) = &profile.longhorn {
                    return Err(Status::invalid_argument(format!(
                        "profile {} is served by Longhorn's own driver: create the PVC with \
                         StorageClass {}",
                        profile.name, longhorn.storage_class
                    )));
                }
                let kind = profile.lane;
                let lane = self.0.controllers.get(kind.as_str()).ok_or_else(|| {
                    let provisioner = if kind.node_local() {
                        "each node's plugin provisions it: name the node-local driver \
                         (`lanes node --local-driver-name`, default local.lanes.csi.dev) as \
                         its StorageClass's provisioner"
                    } else {
                        "the controller Deployment provisions it: name the shared driver \
                         (default lanes.csi.dev) as its StorageClass's provisioner"
                    };
                    Status::invalid_argument(format!(
                        "profile {} is on lane {}, which driver {} does not provision here; {}",
                        params.profile,
                        kind.as_str(),
                        self.0.driver_name,
                        provisioner
                    ))
                })?;
                tracing::Span::current().record("lane", lane.kind());
                let id = lane.volume_id(&params.profile, &req.name)?;
                Self::check(lane, &req.volume_capabilities).map_err(Status::invalid_argument)?;
                let source = Self::source(lane, req.volume_content_source.as_ref())?;
                if !req.mutable_parameters.is_empty() {
                    return Err(Status::invalid_argument(
                        "mutable_parameters are not supported (no MODIFY_VOLUME capability)",
                    ));
                }
                let claim = Box::pin(self.claim(&req.parameters)).await?;
                if params.dataset.is_none() {
                    params.dataset = claim.dataset;
                }
                params.ownership = claim.ownership;
                let requisite: Vec<Segments> = req
                    .accessibility_requirements
                    .iter()
                    .flat_map(|r| r.requisite.iter())
                    .map(|t| t.segments.clone().into_iter().collect())
                    .collect();
                if lane.place(&requisite).is_none() {
                    return Err(Status::resource_exhausted(format!(
                        "the {} lane here (node {}) cannot satisfy the requisite topology",
                        lane.kind(),
                        Shown(&self.0.node_id)
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
                // A repeat keeps the version pinned the first time (the volume exists already).
                let dataset = match &params.dataset {
                    Some(reference) if lane.get(&id).await.is_err() => {
                        Some(Box::pin(self.pin(reference)).await?)
                    }
                    _ => None,
                };
                let create = CreateRequest {
                    name: req.name.clone(),
                    range,
                    params,
                    dataset,
                    source,
                };
                let meta = lane.create(create).await?;
                tracing::info!(volume.id = %meta.id, capacity = meta.capacity_bytes, "volume ready");
                Ok(CreateVolumeResponse {
                    volume: Some(Self::volume(lane, &meta)),
                })
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
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
                let lane = self.lane(&id)?;
                let guard = self.0.guard(&req.volume_id)?;
                lane.delete(&id).await?;
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
                let (lane, _, meta) = self.lookup(&req.volume_id).await?;
                let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
                    confirmed: None,
                    message,
                };
                if let Err(reason) = Self::check(lane, &req.volume_capabilities) {
                    return Ok(unconfirmed(reason));
                }
                if req.volume_context != Self::volume(lane, &meta).volume_context {
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
                let mut volumes = Vec::new();
                for lane in self.0.controllers.all() {
                    volumes.extend(lane.list().await?.into_iter().map(|meta| (lane, meta)));
                }
                volumes.sort_by(|a, b| a.1.id.cmp(&b.1.id));
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
                        volumes.partition_point(|(_, meta)| meta.id.as_str() <= after)
                    }
                };
                let take = match req.max_entries {
                    0 => volumes.len(),
                    n => n as usize,
                };
                let end = start.saturating_add(take).min(volumes.len());
                let mut entries = Vec::with_capacity(end - start);
                for (lane, meta) in &volumes[start..end] {
                    let condition = match VolumeId::parse(&meta.id) {
                        Ok(id) => Some(Self::condition(*lane, &id).await?),
                        Err(_) => None,
                    };
                    entries.push(list_volumes_response::Entry {
                        volume: Some(Self::volume(*lane, meta)),
                        status: Some(list_volumes_response::VolumeStatus {
                            published_node_ids: vec![],
                            volume_condition: condition,
                        }),
                    });
                }
                let next_token = match volumes[..end].last() {
                    Some((_, last)) if end < volumes.len() => format!("{TOKEN_PREFIX}{}", last.id),
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
                // Capacity per profile: the lane of the profile the parameters name.
                let params = CreateParams::parse(&req.parameters, &self.0.profiles)?;
                let profile = self
                    .0
                    .profiles
                    .get(&params.profile)
                    .map_err(Status::invalid_argument)?;
                if let Some(longhorn) = &profile.longhorn {
                    return self.longhorn_capacity(longhorn).await;
                }
                let kind = profile.lane;
                let Some(lane) = self.0.controllers.get(kind.as_str()) else {
                    return Ok(GetCapacityResponse::default());
                };
                let supported = req
                    .volume_capabilities
                    .iter()
                    .all(|c| caps::capability(c).is_ok_and(|c| lane.access(&c).is_ok()));
                if !supported {
                    return Ok(GetCapacityResponse::default());
                }
                let segments: Option<Segments> = req
                    .accessible_topology
                    .as_ref()
                    .map(|t| t.segments.clone().into_iter().collect());
                let Some(space) = lane.capacity(&profile.name, segments.as_ref()).await? else {
                    return Ok(GetCapacityResponse::default());
                };
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
                // Where the node grows its volumes itself, the resizer is told there is no
                // controller step (it then only records the new size and leaves the rest to
                // kubelet's NodeExpandVolume).
                let expand = (!self.0.expand_at_node).then_some(rpc::Type::ExpandVolume);
                let capabilities = [
                    rpc::Type::CreateDeleteVolume,
                    rpc::Type::ListVolumes,
                    rpc::Type::GetCapacity,
                    rpc::Type::VolumeCondition,
                    rpc::Type::GetVolume,
                    rpc::Type::SingleNodeMultiWriter,
                    rpc::Type::CreateDeleteSnapshot,
                    rpc::Type::ListSnapshots,
                    rpc::Type::CloneVolume,
                ]
                .into_iter()
                .chain(expand)
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

    #[tracing::instrument(skip_all, fields(snapshot.name = %Shown(&request.get_ref().name)))]
    async fn create_snapshot(
        &self,
        request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("CreateSnapshot", async {
                crate::lane::id::validate_name(&req.name)?;
                if req.source_volume_id.is_empty() {
                    return Err(missing("source_volume_id"));
                }
                let source = VolumeId::parse(&req.source_volume_id)?;
                let lane = self.lane(&source)?;
                let id = SnapshotId::for_name(lane.kind(), &req.name)?;
                let _guard = self.0.guard(&id.to_string())?;
                let meta = lane.snapshot(&req.name, &source).await?;
                tracing::info!(snapshot.id = %meta.id, method = %meta.method, "snapshot ready");
                Ok(CreateSnapshotResponse {
                    snapshot: Some(Self::snapshot(&meta)),
                })
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(snapshot.id = %Shown(&request.get_ref().snapshot_id)))]
    async fn delete_snapshot(
        &self,
        request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("DeleteSnapshot", async {
                let id = match SnapshotId::parse(&req.snapshot_id) {
                    Ok(id) => id,
                    Err(crate::lane::Error::UnknownVolume(_)) => {
                        return Ok(DeleteSnapshotResponse {});
                    }
                    Err(e) => return Err(e.into()),
                };
                let Some(lane) = self.0.controllers.get(id.lane()) else {
                    return Ok(DeleteSnapshotResponse {});
                };
                let _guard = self.0.guard(&id.to_string())?;
                lane.delete_snapshot(&id).await?;
                Ok(DeleteSnapshotResponse {})
            })
            .await
    }

    async fn list_snapshots(
        &self,
        request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        self.0
            .call("ListSnapshots", async {
                if req.max_entries < 0 {
                    return Err(Status::invalid_argument("max_entries must not be negative"));
                }
                let mut snapshots = Vec::new();
                for lane in self.0.controllers.all() {
                    snapshots.extend(lane.list_snapshots().await?);
                }
                snapshots.retain(|s| {
                    (req.snapshot_id.is_empty() || s.id == req.snapshot_id)
                        && (req.source_volume_id.is_empty()
                            || s.source_volume_id == req.source_volume_id)
                });
                snapshots.sort_by(|a, b| a.id.cmp(&b.id));
                let start = match req.starting_token.as_str() {
                    "" => 0,
                    token => {
                        let after = token
                            .strip_prefix(TOKEN_PREFIX)
                            .filter(|id| SnapshotId::parse(id).is_ok())
                            .ok_or_else(|| {
                                Status::aborted(format!(
                                    "starting_token {token:?} is not a token this plugin issued; \
                                     list again from the start"
                                ))
                            })?;
                        snapshots.partition_point(|s| s.id.as_str() <= after)
                    }
                };
                let take = match req.max_entries {
                    0 => snapshots.len(),
                    n => n as usize,
                };
                let end = start.saturating_add(take).min(snapshots.len());
                let next_token = match snapshots[..end].last() {
                    Some(last) if end < snapshots.len() => format!("{TOKEN_PREFIX}{}", last.id),
                    _ => String::new(),
                };
                Ok(ListSnapshotsResponse {
                    entries: snapshots[start..end]
                        .iter()
                        .map(|meta| list_snapshots_response::Entry {
                            snapshot: Some(Self::snapshot(meta)),
                        })
                        .collect(),
                    next_token,
                })
            })
            .await
    }

    #[tracing::instrument(skip_all, fields(volume.id = %Shown(&request.get_ref().volume_id)))]
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
                let id = VolumeId::parse(&req.volume_id)?;
                let lane = self.lane(&id)?;
                if let Some(capability) = &req.volume_capability {
                    Self::check(lane, std::slice::from_ref(capability))
                        .map_err(Status::invalid_argument)?;
                }
                let _guard = self.0.guard(&req.volume_id)?;
                let range = Range {
                    required: range.required_bytes,
                    limit: range.limit_bytes,
                };
                let (capacity, node_expansion_required) = lane.expand(&id, range).await?;
                Ok(ControllerExpandVolumeResponse {
                    capacity_bytes: to_wire(capacity),
                    node_expansion_required,
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
                let (lane, id, meta) = self.lookup(&req.volume_id).await?;
                Ok(ControllerGetVolumeResponse {
                    volume: Some(Self::volume(lane, &meta)),
                    status: Some(controller_get_volume_response::VolumeStatus {
                        published_node_ids: vec![],
                        volume_condition: Some(Self::condition(lane, &id).await?),
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

/// The wire form of a volume's recorded content source (`snapshot:<id>` or `volume:<id>`).
fn content_source(recorded: &str) -> Option<VolumeContentSource> {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let r#type = match recorded.split_once(':')? {
        ("snapshot", id) => Type::Snapshot(SnapshotSource {
            snapshot_id: id.to_owned(),
        }),
        ("volume", id) => Type::Volume(VolumeSource {
            volume_id: id.to_owned(),
        }),
        _ => return None,
    };
    Some(VolumeContentSource {
        r#type: Some(r#type),
    })
}
