//! The controller half of the local lane: volumes live on this node, so they get this node's
//! topology, and a delete first reads the mount table (a volume still mounted anywhere is
//! refused, FAILED_PRECONDITION).

use std::sync::Arc;
use std::time::Duration;

use super::{CreateRequest, LANE, LocalLane, Space, access, elsewhere, node_segments, place_on};
use crate::lane::capability::{Access, Capability};
use crate::lane::controller::{ControllerLane, OffRuntime, Segments};
use crate::lane::snapshot::{SnapshotId, SnapshotMeta};
use crate::lane::{Error, Range, Result, VolumeId, VolumeMeta};
use crate::mount::Mounter;

/// The local lane as the controller sees it.
pub struct LocalController {
    work: OffRuntime<LocalLane>,
    mounter: Arc<dyn Mounter>,
}

impl std::fmt::Debug for LocalController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalController")
            .field("node", &self.work.lane.node_id())
            .finish_non_exhaustive()
    }
}

impl LocalController {
    pub fn new(lane: Arc<LocalLane>, mounter: Arc<dyn Mounter>, deadline: Duration) -> Self {
        LocalController {
            work: OffRuntime::new(lane, deadline),
            mounter,
        }
    }
}

#[async_trait::async_trait]
impl ControllerLane for LocalController {
    fn kind(&self) -> &'static str {
        LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access::access(capability)
    }

    fn place(&self, requisite: &[Segments]) -> Option<Segments> {
        place_on(self.work.lane.node_id(), requisite)
    }

    fn topology(&self, meta: &VolumeMeta) -> Segments {
        node_segments(&meta.node_id)
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
        let (id, mounter) = (id.clone(), self.mounter.clone());
        self.work
            .run("delete", move |lane| {
                let data = lane.data_path(&id);
                let table = mounter.binds_of(&data).map_err(|e| Error::Io {
                    context: "read the mount table".into(),
                    source: std::io::Error::other(e),
                })?;
                lane.delete(&id, &table)
            })
            .await
    }

    async fn expand(&self, id: &VolumeId, range: Range) -> Result<(u64, bool)> {
        let id = id.clone();
        // A directory volume has no filesystem of its own to grow: the limit is all there is.
        self.work
            .run("expand", move |lane| {
                lane.expand(&id, range).map(|c| (c, false))
            })
            .await
    }

    async fn capacity(&self, _profile: &str, segments: Option<&Segments>) -> Result<Option<Space>> {
        if elsewhere(segments, self.work.lane.node_id()) {
            return Ok(None);
        }
        self.work
            .run("capacity", |lane| lane.space().map(Some))
            .await
    }

    async fn condition(&self, id: &VolumeId) -> Result<Option<String>> {
        let id = id.clone();
        self.work
            .run("condition", move |lane| Ok(lane.condition(&id)))
            .await
    }

    async fn snapshot(&self, name: &str, source: &VolumeId) -> Result<SnapshotMeta> {
        let (name, source) = (name.to_owned(), source.clone());
        self.work
            .run("snapshot", move |lane| lane.snapshot(&name, &source))
            .await
    }

    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let id = id.clone();
        self.work
            .run("delete snapshot", move |lane| lane.delete_snapshot(&id))
            .await
    }

    async fn list_snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        self.work
            .run("list snapshots", |lane| lane.list_snapshots())
            .await
    }
}
