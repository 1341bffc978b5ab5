//! Lanes: where a volume's bytes live. This build has the `local` lane (a directory per volume
//! under `<data-dir>/volumes`), with XFS project quotas where the base allows.
//!
//! Nothing here knows gRPC: errors are [`Error`], mapped to CSI codes in `csi::status`.

pub mod btrfs;
pub mod capability;
pub mod capacity;
pub mod controller;
pub mod dataset;
pub mod id;
pub mod ledger;
pub mod local;
pub mod meta;
pub mod node;
pub mod params;
pub mod profile;
pub mod quota;

use std::path::PathBuf;

pub use capacity::{Range, to_wire};
pub use id::VolumeId;
pub use local::LocalLane;
pub use meta::VolumeMeta;
pub use params::CreateParams;
pub use profile::{LaneKind, Profile, Profiles};

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
    #[error("volume {id} is still mounted at {path}; unpublish it first")]
    InUse { id: String, path: PathBuf },
    #[error("quota: {0}")]
    Quota(String),
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
            | Error::Capacity(_) => Kind::InvalidArgument,
            Error::UnknownVolume(_) => Kind::NotFound,
            Error::CapacityOutOfRange { .. } => Kind::OutOfRange,
            Error::Incompatible { .. } => Kind::AlreadyExists,
            Error::InUse { .. } => Kind::FailedPrecondition,
            Error::Quota(_) => Kind::Internal,
            Error::Timeout { .. } => Kind::DeadlineExceeded,
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
#[derive(Debug)]
pub struct ControllerLanes {
    pub local: local::controller::LocalController,
}

impl ControllerLanes {
    /// The controller lane called `kind`.
    pub fn get(&self, kind: &str) -> Option<&dyn controller::ControllerLane> {
        match kind {
            local::LANE => Some(&self.local),
            _ => None,
        }
    }

    /// Every controller lane.
    pub fn all(&self) -> Vec<&dyn controller::ControllerLane> {
        vec![&self.local]
    }
}

/// The node lanes of this process, looked up by the lane part of a volume ID (or, for inline
/// volumes, by what the request or the ledger says they are).
#[derive(Debug)]
pub struct NodeLanes {
    /// What every node lane shares (the ledger, the mounter, deadlines).
    pub ctx: std::sync::Arc<node::NodeContext>,
    pub local: local::node::LocalNode,
    pub dataset: dataset::DatasetNode,
}

impl NodeLanes {
    /// The node lane called `kind`.
    pub fn get(&self, kind: &str) -> Option<&dyn node::NodeLane> {
        match kind {
            local::LANE => Some(&self.local),
            dataset::LANE => Some(&self.dataset),
            _ => None,
        }
    }
}
