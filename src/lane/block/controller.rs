//! The controller half of the `fast-rwo` lane: volumes live on this node (its topology), and
//! a volume whose image is attached is still in use here and cannot be deleted.

use std::sync::Arc;
use std::time::Duration;

use super::{BlockLane, LANE, access};
use crate::lane::capability::{Access, Capability};
use crate::lane::controller::{ControllerLane, OffRuntime, Segments};
use crate::lane::local::{CreateRequest, Space, elsewhere, node_segments, place_on};
use crate::lane::snapshot::{SnapshotId, SnapshotMeta};
use crate::lane::{Range, Result, VolumeId, VolumeMeta};

/// How long a snapshot or a volume made from one may take: without reflink it copies every
/// written extent of the image (the CO's sidecars wait up to their `--timeout`, then retry,
/// and a retry while the copy runs is ABORTED by the volume's guard).
const COPY_DEADLINE: Duration = Duration::from_secs(600);

/// The `fast-rwo` lane as the controller sees it.
pub struct BlockController {
    work: OffRuntime<BlockLane>,
}

impl std::fmt::Debug for BlockController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockController")
            .field("node", &self.work.lane.node_id())
            .finish_non_exhaustive()
    }
}

impl BlockController {
    pub fn new(lane: Arc<BlockLane>, deadline: Duration) -> Self {
        BlockController {
            work: OffRuntime::new(lane, deadline),
        }
    }
}

#[async_trait::async_trait]
impl ControllerLane for BlockController {
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
        let deadline = match request.source {
            Some(_) => COPY_DEADLINE,
            None => self.work.deadline,
        };
        self.work
            .run_within("create", deadline, move |lane| lane.create(&request))
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
        // The device and the filesystem on it grow on the node.
        self.work
            .run("expand", move |lane| {
                lane.expand(&id, range).map(|c| (c, true))
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
            .run_within("snapshot", COPY_DEADLINE, move |lane| {
                lane.snapshot(&name, &source)
            })
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
