//! The controller half of the `shared-rwx` lane: volumes are reachable from every node (no
//! topology), IDs name the profile's file system, and every call runs under the deadline.

use std::sync::Arc;
use std::time::Duration;

use super::{JuiceFsLane, LANE, node::access};
use crate::lane::capability::{Access, Capability};
use crate::lane::controller::{ControllerLane, OffRuntime, Segments};
use crate::lane::local::{CreateRequest, Space};
use crate::lane::{Range, Result, VolumeId, VolumeMeta};

/// The `shared-rwx` lane as the controller sees it.
#[derive(Debug)]
pub struct JuiceFsController {
    work: OffRuntime<JuiceFsLane>,
}

impl JuiceFsController {
    pub fn new(lane: Arc<JuiceFsLane>, deadline: Duration) -> Self {
        JuiceFsController {
            work: OffRuntime::new(lane, deadline),
        }
    }
}

#[async_trait::async_trait]
impl ControllerLane for JuiceFsController {
    fn kind(&self) -> &'static str {
        LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access(capability)
    }

    fn place(&self, _requisite: &[Segments]) -> Option<Segments> {
        // Every node reaches the file system: any requisite topology is met.
        Some(Segments::new())
    }

    fn topology(&self, _meta: &VolumeMeta) -> Segments {
        Segments::new()
    }

    fn volume_id(&self, profile: &str, name: &str) -> Result<VolumeId> {
        VolumeId::in_fs(LANE, profile, name)
    }

    async fn create(&self, request: CreateRequest) -> Result<VolumeMeta> {
        self.work
            .run("create", move |lane| lane.create(&request))
            .await
    }

    async fn get(&self, id: &VolumeId) -> Result<VolumeMeta> {
        let id = id.clone();
        self.work.run("get", move |lane| lane.get(&id)).await
    }

    async fn list(&self) -> Result<Vec<VolumeMeta>> {
        self.work.run("list", |lane| lane.list()).await
    }

    async fn delete(&self, id: &VolumeId) -> Result<()> {
        let id = id.clone();
        self.work.run("delete", move |lane| lane.delete(&id)).await
    }

    async fn expand(&self, id: &VolumeId, range: Range) -> Result<(u64, bool)> {
        let id = id.clone();
        // The quota is raised here; each node's NodeExpandVolume waits until its mount
        // enforces the new limit (mounts reload quotas on their heartbeat).
        self.work
            .run("expand", move |lane| {
                lane.expand(&id, range).map(|c| (c, true))
            })
            .await
    }

    async fn capacity(&self, profile: &str, _segments: Option<&Segments>) -> Result<Option<Space>> {
        let profile = profile.to_owned();
        self.work
            .run("capacity", move |lane| lane.space(Some(&profile)))
            .await
    }

    async fn condition(&self, id: &VolumeId) -> Result<Option<String>> {
        let id = id.clone();
        self.work
            .run("condition", move |lane| lane.condition(&id))
            .await
    }
}
