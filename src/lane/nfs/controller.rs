//! The controller half of the `legacy-rwx` lane: volumes are reachable from every node (no
//! topology), IDs name the profile's export, and every call runs under the deadline.

use std::sync::Arc;
use std::time::Duration;

use super::{LANE, NfsLane, node::access};
use crate::lane::capability::{Access, Capability};
use crate::lane::controller::{ControllerLane, Segments};
use crate::lane::local::{CreateRequest, Space};
use crate::lane::{Error, Range, Result, VolumeId, VolumeMeta};

/// The `legacy-rwx` lane as the controller sees it.
#[derive(Debug)]
pub struct NfsController {
    lane: Arc<NfsLane>,
    deadline: Duration,
}

impl NfsController {
    pub fn new(lane: Arc<NfsLane>, deadline: Duration) -> Self {
        NfsController { lane, deadline }
    }

    /// Runs `work` under the deadline (DEADLINE_EXCEEDED past it).
    async fn within<T>(
        &self,
        op: &'static str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::time::timeout(self.deadline, work)
            .await
            .map_err(|_| Error::Timeout {
                op,
                seconds: self.deadline.as_secs(),
            })?
    }
}

#[async_trait::async_trait]
impl ControllerLane for NfsController {
    fn kind(&self) -> &'static str {
        LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access(capability)
    }

    fn place(&self, _requisite: &[Segments]) -> Option<Segments> {
        // Every node reaches the export: any requisite topology is met.
        Some(Segments::new())
    }

    fn topology(&self, _meta: &VolumeMeta) -> Segments {
        Segments::new()
    }

    fn volume_id(&self, profile: &str, name: &str) -> Result<VolumeId> {
        VolumeId::in_fs(LANE, profile, name)
    }

    async fn create(&self, request: CreateRequest) -> Result<VolumeMeta> {
        self.within("create", self.lane.create(&request)).await
    }

    async fn get(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.within("get", self.lane.get(id)).await
    }

    async fn list(&self) -> Result<Vec<VolumeMeta>> {
        self.within("list", self.lane.list()).await
    }

    async fn delete(&self, id: &VolumeId) -> Result<()> {
        self.within("delete", self.lane.delete(id)).await
    }

    async fn expand(&self, id: &VolumeId, range: Range) -> Result<(u64, bool)> {
        // Nothing to do on a node: NFS enforces no capacity.
        let grown = self.within("expand", self.lane.expand(id, range)).await?;
        Ok((grown, false))
    }

    async fn capacity(&self, profile: &str, _segments: Option<&Segments>) -> Result<Option<Space>> {
        self.within("capacity", self.lane.space(profile)).await
    }

    async fn condition(&self, id: &VolumeId) -> Result<Option<String>> {
        self.within("condition", self.lane.condition(id)).await
    }
}
