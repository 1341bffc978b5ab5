//! The controller side of every lane: the [`ControllerLane`] trait the gRPC edge calls.
//!
//! A lane owns everything that differs between backends on this side: which capabilities and
//! access modes it serves, where a new volume goes (its topology), how a volume is created,
//! grown and deleted, and how much room is left. Rules every lane keeps: create is idempotent
//! by name (a compatible repeat returns the volume, an incompatible one is ALREADY_EXISTS);
//! delete of an unknown volume succeeds; expansion never shrinks; every call returns within
//! the lane's deadline (DEADLINE_EXCEEDED otherwise), so a stuck backend cannot hang the
//! plugin.

use std::collections::BTreeMap;
use std::time::Duration;

use super::capability::{Access, Capability};
use super::local::{CreateRequest, Space};
use super::snapshot::{SnapshotId, SnapshotMeta};
use super::{Error, Range, Result, VolumeId, VolumeMeta};

/// A topology: segment key → value.
pub type Segments = BTreeMap<String, String>;

/// The controller half of a lane.
#[async_trait::async_trait]
pub trait ControllerLane: Send + Sync {
    /// The lane's name (the first part of its volume IDs).
    fn kind(&self) -> &'static str;
    /// What the lane makes of a capability, or why it cannot serve it.
    fn access(&self, capability: &Capability) -> std::result::Result<Access, String>;
    /// Where a new volume would go, given the CO's requisite topologies (empty: anywhere);
    /// `None` when none of them can be met by this lane here.
    fn place(&self, requisite: &[Segments]) -> Option<Segments>;
    /// The topology of an existing volume.
    fn topology(&self, meta: &VolumeMeta) -> Segments;
    /// The ID a volume called `name` gets under `profile` (the same for every repeat).
    fn volume_id(&self, profile: &str, name: &str) -> Result<VolumeId> {
        let _ = profile;
        VolumeId::for_name(self.kind(), name)
    }
    async fn create(&self, request: CreateRequest) -> Result<VolumeMeta>;
    /// The volume, or `UnknownVolume`.
    async fn get(&self, id: &VolumeId) -> Result<VolumeMeta>;
    /// Every volume of the lane, ordered by ID.
    async fn list(&self) -> Result<Vec<VolumeMeta>>;
    /// Deletes the volume; refuses while it is in use; an unknown volume is fine.
    async fn delete(&self, id: &VolumeId) -> Result<()>;
    /// Grows the volume to satisfy `range` (never shrinks); the new capacity and whether the
    /// node must finish the job.
    async fn expand(&self, id: &VolumeId, range: Range) -> Result<(u64, bool)>;
    /// Room for new volumes of `profile` in `segments` (any of the lane's when `None`); `None`
    /// when the lane has nothing there.
    async fn capacity(&self, profile: &str, segments: Option<&Segments>) -> Result<Option<Space>>;
    /// Why the volume is unhealthy, or `None`.
    async fn condition(&self, id: &VolumeId) -> Result<Option<String>>;
    /// Takes snapshot `name` of volume `source` (idempotent by name; another source under
    /// the same name is `Incompatible`).
    async fn snapshot(&self, name: &str, source: &VolumeId) -> Result<SnapshotMeta> {
        let _ = (name, source);
        Err(Error::Unsupported(format!(
            "the {} lane cannot take snapshots; use a fast-rwo profile",
            self.kind()
        )))
    }
    /// Deletes a snapshot; an unknown one is fine.
    async fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        let _ = id;
        Ok(())
    }
    /// Every snapshot of the lane, ordered by ID.
    async fn list_snapshots(&self) -> Result<Vec<SnapshotMeta>> {
        Ok(Vec::new())
    }
}

/// A lane's blocking work, run off the async runtime under a deadline: what every
/// controller lane holds its lane in.
#[derive(Debug)]
pub struct OffRuntime<L> {
    pub lane: std::sync::Arc<L>,
    pub deadline: Duration,
}

impl<L: Send + Sync + 'static> OffRuntime<L> {
    pub fn new(lane: std::sync::Arc<L>, deadline: Duration) -> Self {
        OffRuntime { lane, deadline }
    }

    /// Runs `f` on the lane under the deadline (DEADLINE_EXCEEDED past it).
    pub async fn run<T, F>(&self, op: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&L) -> Result<T> + Send + 'static,
    {
        self.run_within(op, self.deadline, f).await
    }

    /// [`OffRuntime::run`] under another deadline.
    pub async fn run_within<T, F>(&self, op: &'static str, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&L) -> Result<T> + Send + 'static,
    {
        let lane = self.lane.clone();
        blocking(op, deadline, move || f(&lane)).await
    }
}

/// Runs blocking lane work off the async runtime within `deadline`.
pub async fn blocking<T, F>(op: &'static str, deadline: Duration, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) => Err(Error::Io {
            context: format!("{op} task"),
            source: std::io::Error::other(e.to_string()),
        }),
        Err(_) => Err(Error::Timeout {
            op,
            seconds: deadline.as_secs(),
        }),
    }
}
