//! The node side of every lane: the [`NodeLane`] trait the gRPC edge calls, the
//! [`NodeContext`] lanes share (mounter, ledger, deadlines), and the rules all of them follow.
//!
//! Rules (CSI "Node Service RPC"), enforced here once for every lane:
//! - mount state is read from the kernel on every call; work already done answers OK, and
//!   something else mounted at a path is an error that says what, never covered or unmounted;
//! - a publication is recorded in the ledger before its mount is made ([`NodeContext::admit`]):
//!   a repeat with other flags at a live mount is ALREADY_EXISTS, access modes hold across
//!   targets, a crash between any two steps is repaired by the retry;
//! - unpublish removes the target directory only when a publish of the volume made it
//!   ([`NodeContext::release_target`]);
//! - every blocking call runs off the async runtime under the mount deadline.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::capability::{Access, Capability};
use super::ledger::{self, Ledger, Publication, VolumeRecord};
use crate::error::Kind;
use crate::failpoint::Failpoint;
use crate::mount::safe::{PathError, Removed, RequestPath};
use crate::mount::{self, MountEntry, MountFlags, Mounter, mountinfo};
use crate::text::Shown;

/// Failures of node-side lane operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Ledger(#[from] ledger::Error),
    #[error(transparent)]
    Mount(#[from] mount::Error),
    #[error(transparent)]
    Lane(#[from] super::Error),
    #[error("{}", .0.message)]
    Cache(#[from] crate::cache::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("volume {volume} is not staged at {staging}; call NodeStageVolume first")]
    NotStaged { volume: String, staging: String },
    #[error("{path} already has another mount ({fs_type} from {mounted})")]
    Occupied {
        path: String,
        fs_type: String,
        mounted: String,
    },
    #[error("{path} has a mount of {mounted} ({root}) that is not {what}; refusing to unmount it")]
    Foreign {
        path: String,
        mounted: String,
        root: String,
        what: String,
    },
    #[error(
        "volume {volume} is already {how} at {path} with another capability, readonly flag or staging path; undo that first"
    )]
    Repeated {
        volume: String,
        how: &'static str,
        path: String,
    },
    #[error("volume {volume} is already published with dataset {was}, not {asked}")]
    DatasetChanged {
        volume: String,
        was: String,
        asked: String,
    },
    #[error("volume {volume} cannot be published at {target}: {why}")]
    Conflict {
        volume: String,
        target: String,
        why: String,
    },
    #[error("volume {volume} is not mounted at {path}")]
    NotMounted { volume: String, path: String },
    #[error(
        "unmounted, but {0} could not be removed: it is not empty (or not what a publish made), so Lanes leaves it alone"
    )]
    TargetNotEmpty(String),
    #[error("{0}")]
    Unavailable(String),
    /// The call cannot succeed in the volume's present state; the message says what to do.
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Internal(String),
}

impl NodeError {
    /// The CSI-level kind of this failure.
    pub fn kind(&self) -> Kind {
        match self {
            NodeError::Path(e) => e.kind(),
            NodeError::Ledger(e) => e.kind(),
            NodeError::Mount(e) => e.kind(),
            NodeError::Lane(e) => e.kind(),
            NodeError::Cache(e) => e.kind,
            NodeError::Invalid(_) => Kind::InvalidArgument,
            NodeError::NotStaged { .. }
            | NodeError::Foreign { .. }
            | NodeError::Conflict { .. }
            | NodeError::TargetNotEmpty(_)
            | NodeError::Precondition(_) => Kind::FailedPrecondition,
            NodeError::Occupied { .. }
            | NodeError::Repeated { .. }
            | NodeError::DatasetChanged { .. } => Kind::AlreadyExists,
            NodeError::NotMounted { .. } => Kind::NotFound,
            NodeError::Unavailable(_) => Kind::Unavailable,
            NodeError::Internal(_) => Kind::Internal,
        }
    }
}

pub type Result<T, E = NodeError> = std::result::Result<T, E>;

/// A checked NodeStageVolume.
#[derive(Debug)]
pub struct Stage<'a> {
    pub volume_id: &'a str,
    pub staging: &'a RequestPath,
    pub capability: &'a Capability,
}

/// A checked NodePublishVolume.
#[derive(Debug)]
pub struct Publish<'a> {
    pub volume_id: &'a str,
    pub target: &'a RequestPath,
    /// Required by lanes that stage (STAGE_UNSTAGE_VOLUME); none for inline volumes.
    pub staging: Option<&'a RequestPath>,
    pub capability: &'a Capability,
    pub readonly: bool,
    pub context: &'a std::collections::HashMap<String, String>,
}

/// What unpublishing did to the volume as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unpublished {
    /// The volume is still known to this node.
    Kept,
    /// Nothing of the volume is left on this node (its per-volume state is gone).
    Forgotten,
}

/// Bytes or inodes of a mounted volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub inodes: bool,
    pub total: u64,
    pub used: u64,
    pub available: u64,
}

/// NodeGetVolumeStats of a mounted volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub usage: Vec<Usage>,
    /// Why the volume is unhealthy, or `None`.
    pub abnormal: Option<String>,
    pub message: String,
}

/// The node half of a lane. The edge has checked required fields, request paths and the
/// capability's shape, and holds the volume's guard; the lane does the rest and is
/// idempotent in every method.
#[async_trait::async_trait]
pub trait NodeLane: Send + Sync {
    /// The lane's name.
    fn kind(&self) -> &'static str;
    /// What the lane makes of a capability, or why it cannot serve it.
    fn access(&self, capability: &Capability) -> std::result::Result<Access, String>;
    async fn stage(&self, request: Stage<'_>) -> Result<()>;
    async fn unstage(&self, volume_id: &str, staging: &RequestPath) -> Result<()>;
    async fn publish(&self, request: Publish<'_>) -> Result<()>;
    async fn unpublish(&self, record: VolumeRecord, target: &RequestPath) -> Result<Unpublished>;
    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats>;
    /// NodeExpandVolume: the capacity the volume now has.
    async fn expand(&self, volume_id: &str, path: &RequestPath) -> Result<u64>;
}

/// What every node lane works with.
pub struct NodeContext {
    pub mounter: Arc<dyn Mounter>,
    pub ledger: Ledger,
    pub mount_timeout: Duration,
    pub failpoint: Failpoint,
    /// Lanes keep per-volume state under it.
    pub data_dir: PathBuf,
    /// The node's dataset cache (dataset volumes, and volumes made with a dataset).
    pub cache: Option<Arc<crate::cache::Cache>>,
}

impl std::fmt::Debug for NodeContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeContext")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

fn show(path: &Path) -> String {
    Shown(&path.to_string_lossy()).to_string()
}

impl NodeContext {
    /// The dataset cache, or why there is none.
    pub fn cache(&self) -> Result<&Arc<crate::cache::Cache>> {
        self.cache.as_ref().ok_or_else(|| {
            NodeError::Internal("this plugin does not serve the node role; no dataset cache".into())
        })
    }

    /// Runs blocking mount work off the runtime under the mount deadline.
    pub async fn mount_op<T, F>(&self, op: &'static str, path: &Path, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Mounter) -> mount::Result<T> + Send + 'static,
    {
        let mounter = self.mounter.clone();
        Ok(mount::blocking(op, path, self.mount_timeout, move || f(mounter.as_ref())).await?)
    }

    /// Runs blocking lane work (`what`, for the error) off the runtime under the deadline; a
    /// disk that does not answer in time is UNAVAILABLE.
    pub async fn blocking<T, F>(&self, what: &str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        self.blocking_within(what, self.mount_timeout, f).await
    }

    /// [`NodeContext::blocking`] under another deadline (work that may itself wait out a
    /// mount deadline, then probe).
    pub async fn blocking_within<T, F>(&self, what: &str, deadline: Duration, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T> + Send + 'static,
    {
        match tokio::time::timeout(deadline, tokio::task::spawn_blocking(f)).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(NodeError::Internal(format!("{what} task failed: {e}"))),
            Err(_) => Err(NodeError::Unavailable(format!(
                "{what} did not finish within {}s; the node's disk or a server may be hung",
                deadline.as_secs()
            ))),
        }
    }

    /// The mount-table entries at or above each of `paths`.
    pub async fn table(&self, paths: Vec<PathBuf>) -> Result<Vec<MountEntry>> {
        let first = paths.first().cloned().unwrap_or_default();
        self.mount_op("read mount table", &first, move |m| {
            let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
            m.table_for(&refs)
        })
        .await
    }

    /// Bytes and inodes of the filesystem mounted at `path` (statvfs through a descriptor of
    /// the path; never a walk of the tree).
    pub async fn usage(&self, path: &RequestPath) -> Result<Vec<Usage>> {
        let pinned = path.open_dir()?.ok_or_else(|| PathError::NotFound {
            field: path.field(),
            path: show(path.as_path()),
        })?;
        let stat = self
            .mount_op("statvfs", path.as_path(), move |_| {
                let proc_path = pinned.proc_path();
                nix::sys::statvfs::statvfs(&proc_path)
                    .map_err(|e| mount::Error::io("statvfs", &proc_path, e.into()))
            })
            .await?;
        let block = stat.fragment_size();
        Ok(vec![
            Usage {
                inodes: false,
                total: stat.blocks().saturating_mul(block),
                used: (stat.blocks().saturating_sub(stat.blocks_free())).saturating_mul(block),
                available: stat.blocks_available().saturating_mul(block),
            },
            Usage {
                inodes: true,
                total: stat.files(),
                used: stat.files().saturating_sub(stat.files_free()),
                available: stat.files_available(),
            },
        ])
    }

    /// Unmounts every mount stacked at `path` (as `table` shows them) when all of them are
    /// `ours`; refuses to touch anything else. `what` names the volume in the error. Each
    /// unmount goes through the path's pinned parent with `UMOUNT_NOFOLLOW`.
    pub async fn unmount_ours(
        &self,
        what: &str,
        path: &RequestPath,
        table: &[MountEntry],
        ours: impl Fn(&MountEntry) -> bool,
    ) -> Result<()> {
        let stack = mountinfo::at(table, path.as_path());
        if let Some(foreign) = stack.iter().find(|entry| !ours(entry)) {
            return Err(NodeError::Foreign {
                path: show(path.as_path()),
                mounted: Shown(&foreign.source).to_string(),
                root: show(&foreign.root),
                what: what.to_owned(),
            });
        }
        for _ in 0..stack.len() {
            let (parent, through) = path.through_parent()?;
            self.mount_op("unmount", path.as_path(), move |m| {
                let unmounted = m.unmount(&through);
                drop(parent);
                unmounted
            })
            .await?;
        }
        Ok(())
    }

    /// Checks publication `new` against the volume's record and records it, before anything
    /// is mounted. `live` says whether a path still carries a mount of this volume. Stale
    /// entries (nothing mounted any more) are dropped.
    pub fn admit(
        &self,
        record: &mut VolumeRecord,
        mut new: Publication,
        target: &RequestPath,
        live: impl Fn(&Path) -> bool,
    ) -> Result<()> {
        record
            .published
            .retain(|p| p.target == new.target || live(&p.target));
        if let Some(existing) = record.publication(&new.target) {
            if (existing.asked != new.asked || existing.staging != new.staging) && live(&new.target)
            {
                return Err(NodeError::Repeated {
                    volume: Shown(&record.volume_id).to_string(),
                    how: "published",
                    path: show(&new.target),
                });
            }
            new.created_target |= existing.created_target;
        }
        for other in record.published.iter().filter(|p| p.target != new.target) {
            if let Some(why) = ledger::conflict(other, &new) {
                return Err(NodeError::Conflict {
                    volume: Shown(&record.volume_id).to_string(),
                    target: show(&new.target),
                    why,
                });
            }
        }
        new.created_target |= !target.exists()?;
        record.set_publication(new);
        self.ledger.store(record)?;
        Ok(())
    }

    /// Removes an unpublished target (directory, or raw block file) when a publish of this
    /// volume created it: only when it is empty (a missing one is fine). Then forgets the publication.
    pub fn release_target(&self, record: &mut VolumeRecord, target: &RequestPath) -> Result<()> {
        let Some(publication) = record.publication(target.as_path()) else {
            return Ok(());
        };
        if publication.created_target && target.remove_created()? == Removed::Kept {
            return Err(NodeError::TargetNotEmpty(show(target.as_path())));
        }
        record.published.retain(|p| p.target != target.as_path());
        self.ledger.store(record)?;
        Ok(())
    }

    /// Re-applies `flags` to the mount now at `target`, through a fresh descriptor (one opened
    /// before mounting still points below the new mount).
    pub async fn remount(&self, target: &RequestPath, flags: MountFlags) -> Result<()> {
        let pinned = target.open_dir()?.ok_or_else(|| {
            NodeError::Internal(format!(
                "{} vanished while it was being mounted",
                show(target.as_path())
            ))
        })?;
        self.mount_op("remount", target.as_path(), move |m| {
            m.remount(&pinned.proc_path(), flags)
        })
        .await
    }
}

/// Gives a volume's root to `gid` with the setgid bit, so new files inherit the group.
pub fn apply_mount_group(root: &Path, gid: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    nix::unistd::chown(root, None, Some(nix::unistd::Gid::from_raw(gid))).map_err(|e| {
        NodeError::Internal(format!("chown {} to group {gid}: {e}", root.display()))
    })?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o2775))
        .map_err(|e| NodeError::Internal(format!("chmod {}: {e}", root.display())))
}
