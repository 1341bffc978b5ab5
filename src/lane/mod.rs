//! Lanes: where a volume's bytes live. This build has the `local` lane (a directory per volume
//! under `<data-dir>/volumes`), with XFS project quotas where the base allows.
//!
//! Nothing here knows gRPC: errors are [`Error`], mapped to CSI codes in `csi::status`.

pub mod bind;
pub mod block;
pub mod btrfs;
pub mod capability;
pub mod capacity;
pub mod controller;
pub mod dataset;
pub mod id;
pub mod juicefs;
pub mod ledger;
pub mod local;
pub mod longhorn;
pub mod meta;
pub mod nfs;
pub mod node;
pub mod params;
pub mod profile;
pub mod quota;
pub mod snapshot;
pub mod volumes;

use std::path::PathBuf;

pub use capacity::{Range, to_wire};
pub use id::VolumeId;
pub use local::LocalLane;
pub use meta::VolumeMeta;
pub use params::CreateParams;
pub use profile::{BlockBackend, FsType, LaneKind, Profile, Profiles, Provisioning};

use crate::error::Kind;

/// Failures of lane operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("volume name {name} is invalid: {reason}")]
    InvalidName { name: String, reason: String },
    #[error("volume ID {id} is invalid: {reason}")]
    InvalidVolumeId { id: String, reason: String },
    #[error("volume {0:?} does not exist")]
    UnknownVolume(String),
    #[error("StorageClass parameter {0} is not known (known: profile, onDelete, dataset)")]
    UnknownParameter(String),
    #[error("StorageClass parameter {key:?}: {reason}")]
    InvalidParameter { key: String, reason: String },
    #[error("capacity: {0}")]
    Capacity(String),
    #[error(
        "capacity of {requested} bytes cannot be satisfied: the largest volume this lane can hold \
         is {max} bytes"
    )]
    CapacityOutOfRange { requested: u64, max: u64 },
    #[error("volume {name} already exists and is incompatible: {reason}")]
    Incompatible { name: String, reason: String },
    #[error("snapshot {name} already exists and is incompatible: {reason}")]
    SnapshotExists { name: String, reason: String },
    #[error(
        "capacity of {requested} bytes is smaller than the {source_bytes} bytes of the snapshot \
         or volume it is made from"
    )]
    SmallerThanSource { requested: u64, source_bytes: u64 },
    #[error("volume {id} is still mounted at {path}; unpublish it first")]
    InUse { id: String, path: PathBuf },
    #[error(
        "volume {id} is still staged on node(s) {nodes}; unstage it there first (if a node is \
         gone for good, remove its marker {marker})"
    )]
    StagedOn {
        id: String,
        nodes: String,
        marker: String,
    },
    #[error("volume {id} is still attached on this node as {device}; unstage it first")]
    Attached { id: String, device: PathBuf },
    #[error("quota: {0}")]
    Quota(String),
    #[error("{0}")]
    Unsupported(String),
    /// The storage behind a lane (a JuiceFS metadata engine, an NFS server) failed or did not
    /// answer: retryable.
    #[error("{what}: {said}")]
    Backend { what: String, said: String },
    #[error("{op} did not finish within {seconds}s; the lane's storage may be hung")]
    Timeout { op: &'static str, seconds: u64 },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The CSI-level kind of this failure.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Missing(_)
            | Error::InvalidName { .. }
            | Error::InvalidVolumeId { .. }
            | Error::UnknownParameter(_)
            | Error::InvalidParameter { .. }
            | Error::Capacity(_)
            | Error::Unsupported(_) => Kind::InvalidArgument,
            Error::UnknownVolume(_) => Kind::NotFound,
            Error::CapacityOutOfRange { .. } | Error::SmallerThanSource { .. } => Kind::OutOfRange,
            Error::Incompatible { .. } | Error::SnapshotExists { .. } => Kind::AlreadyExists,
            Error::InUse { .. } | Error::Attached { .. } | Error::StagedOn { .. } => {
                Kind::FailedPrecondition
            }
            Error::Quota(_) => Kind::Internal,
            Error::Timeout { .. } => Kind::DeadlineExceeded,
            Error::Backend { .. } => Kind::Unavailable,
            Error::Io { source, .. } => crate::error::io_kind(source),
        }
    }

    /// Wraps an I/O error with what was being done and to which path.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The controller lanes of this process, looked up by a volume ID's lane part or a
/// profile's lane.
#[derive(Default, Clone)]
pub struct ControllerLanes {
    lanes: std::collections::BTreeMap<&'static str, std::sync::Arc<dyn controller::ControllerLane>>,
}

impl std::fmt::Debug for ControllerLanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lanes.keys()).finish()
    }
}

impl ControllerLanes {
    /// A registry of `lanes`, each under its own kind.
    pub fn new(
        lanes: impl IntoIterator<Item = std::sync::Arc<dyn controller::ControllerLane>>,
    ) -> Self {
        ControllerLanes {
            lanes: lanes.into_iter().map(|lane| (lane.kind(), lane)).collect(),
        }
    }

    /// The lanes of `scope` only.
    pub fn only(mut self, scope: profile::LaneScope) -> Self {
        self.lanes.retain(|kind, _| {
            profile::LaneKind::from_name(kind).is_none_or(|lane| scope.serves(lane))
        });
        self
    }

    /// The controller lane called `kind`.
    pub fn get(&self, kind: &str) -> Option<&dyn controller::ControllerLane> {
        self.lanes.get(kind).map(|lane| lane.as_ref())
    }

    /// Every controller lane.
    pub fn all(&self) -> Vec<&dyn controller::ControllerLane> {
        self.lanes.values().map(|lane| lane.as_ref()).collect()
    }
}

/// The node lanes of this process, looked up by the lane part of a volume ID (or, for inline
/// volumes, by what the request or the ledger says they are).
#[derive(Clone)]
pub struct NodeLanes {
    /// What every node lane shares (the ledger, the mounter, deadlines).
    pub ctx: std::sync::Arc<node::NodeContext>,
    lanes: std::collections::BTreeMap<&'static str, std::sync::Arc<dyn node::NodeLane>>,
}

impl std::fmt::Debug for NodeLanes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.lanes.keys()).finish()
    }
}

impl NodeLanes {
    /// A registry of `lanes`, each under its own kind, sharing `ctx`.
    pub fn new(
        ctx: std::sync::Arc<node::NodeContext>,
        lanes: impl IntoIterator<Item = std::sync::Arc<dyn node::NodeLane>>,
    ) -> Self {
        NodeLanes {
            ctx,
            lanes: lanes.into_iter().map(|lane| (lane.kind(), lane)).collect(),
        }
    }

    /// The node lane called `kind`.
    pub fn get(&self, kind: &str) -> Option<&dyn node::NodeLane> {
        self.lanes.get(kind).map(|lane| lane.as_ref())
    }

    /// The lane of inline (ephemeral) volumes, when this node has one.
    pub fn inline(&self) -> Option<&dyn node::NodeLane> {
        self.get(dataset::LANE)
    }
}
