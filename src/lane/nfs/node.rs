//! The node half of the `legacy-rwx` lane: stage binds the volume's directory — in the
//! export's one mount on this node, or the volume's own mount ([`super::mount`]) — at the
//! staging path, publish binds the staging path at the target.
//!
//! Rules, beyond those of every bind lane ([`crate::lane::bind`]):
//! - a volume is staged only with this node's marker in its `staged/` directory on the
//!   export (written over the userspace client first, removed at the last unstage), so the
//!   controller can refuse to delete it;
//! - a mount that no longer answers (a restarted server's ESTALE, ENOTCONN, EIO, a hang) is
//!   found on the next call and by a periodic check ([`NfsNode::watch`]): it is mounted again
//!   and every staging and target path the ledger holds on it is bound again with the flags
//!   it had, so pods recover without a restart;
//! - unpublish and unstage never need the server: they work from the mount table, and a
//!   stale mount the ledger says is ours is detached rather than waited on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::config::Scope;
use super::mount::NodeExport;
use super::{DATA, Export, LANE};
use crate::lane::bind;
use crate::lane::capability::{Access, Capability};
use crate::lane::ledger::VolumeRecord;
use crate::lane::node::{
    NodeContext, NodeError, NodeLane, Publish, Result, Stage, Stats, Unpublished,
};
use crate::lane::{Error, Profiles, VolumeId};
use crate::mount::health::{Probe, detach, probe};
use crate::mount::mountinfo;
use crate::mount::safe::RequestPath;

/// Which capabilities the lane serves: mount access in every access mode.
pub fn access(capability: &Capability) -> std::result::Result<Access, String> {
    bind::shared_access(capability, LANE, "an NFS export", &["nfs", "nfs4"])
}

/// The `legacy-rwx` lane on this node: one [`NodeExport`] per profile.
#[derive(Debug)]
pub struct NfsNode {
    ctx: Arc<NodeContext>,
    exports: BTreeMap<String, Arc<NodeExport>>,
    /// This node's name in the volumes' `staged/` markers.
    marker: String,
}

impl NfsNode {
    pub fn new(ctx: Arc<NodeContext>, profiles: &Profiles, node_id: &str) -> NfsNode {
        let exports = profiles
            .iter()
            .filter_map(|p| {
                let export = Export::new(&p.name, p.nfs.clone()?, ctx.mount_timeout);
                let export = NodeExport::new(&ctx.data_dir, Arc::new(export));
                Some((p.name.clone(), Arc::new(export)))
            })
            .collect();
        // Node IDs are host names in practice; anything else gets the hashed safe form.
        let marker = VolumeId::for_name(LANE, node_id)
            .map(|id| id.dir().to_owned())
            .unwrap_or_else(|_| "node".into());
        NfsNode {
            ctx,
            exports,
            marker,
        }
    }

    /// Whether any profile uses this lane.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }

    fn export(&self, id: &VolumeId) -> Result<Arc<NodeExport>> {
        let profile = id.fs().unwrap_or_default();
        self.exports.get(profile).cloned().ok_or_else(|| {
            Error::UnknownVolume(format!(
                "{LANE}/{profile}: no legacy-rwx profile of that name here"
            ))
            .into()
        })
    }

    /// Runs blocking work off the runtime; bounded by the mount deadline plus the probes'.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&NodeContext) -> Result<T> + Send + 'static,
    {
        let ctx = self.ctx.clone();
        let deadline = self.ctx.mount_timeout + 2 * crate::mount::health::PROBE_DEADLINE;
        self.ctx
            .blocking_within("the legacy-rwx lane", deadline, move || f(&ctx))
            .await
    }

    /// The volume's mount there and answering, stale binds of the volume (or, after a remount
    /// of the export, of every volume of it) replaced: the volume's directory, which must
    /// exist.
    /// `staging`: the call is a stage, which may make the volume's own mount (`mount:
    /// volume`); other calls only bring back one that died.
    async fn prepare(&self, volume_id: &str, staging: bool) -> Result<(VolumeId, PathBuf)> {
        let id = VolumeId::parse(volume_id)?;
        let export = self.export(&id)?;
        let deadline = self.ctx.mount_timeout;
        let lookup = id.clone();
        let data = self
            .blocking(move |ctx| {
                let make = staging || export.scope() == Scope::Export;
                let remounted = export.ensure_mounted(&lookup, make, deadline)?;
                let records = match (remounted, export.scope()) {
                    (true, Scope::Export) => ctx.ledger.all()?,
                    _ => vec![ctx.ledger.load(&lookup.to_string())?],
                };
                rebind(ctx, &export, &records);
                let data = export.data_path(&lookup);
                if export.scope() == Scope::Volume {
                    // The volume's own mount, or (not staged here) nothing: the bind checks
                    // that follow say which.
                    return Ok(data);
                }
                match std::fs::symlink_metadata(&data) {
                    Ok(meta) if meta.is_dir() => Ok(data),
                    Ok(_) => Err(Error::UnknownVolume(lookup.to_string()).into()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        Err(Error::UnknownVolume(lookup.to_string()).into())
                    }
                    Err(e) => Err(Error::Backend {
                        what: export.what().to_owned(),
                        said: format!("{}: {e}", data.display()),
                    }
                    .into()),
                }
            })
            .await?;
        Ok((id, data))
    }

    /// The volume's directory in this node's mount, without touching the server: for the
    /// calls that must work while it is down. A stale mount the ledger holds at `path` is
    /// detached first.
    async fn offline(&self, volume_id: &str, path: &Path) -> Result<PathBuf> {
        let id = VolumeId::parse(volume_id)?;
        let export = self.export(&id)?;
        let path = path.to_owned();
        let volume = volume_id.to_owned();
        self.blocking(move |ctx| {
            let record = ctx.ledger.load(&volume)?;
            let ours = record.staging(&path).is_some() || record.publication(&path).is_some();
            if ours && let Err(Probe::Failed(why)) = probe(&path) {
                let table =
                    mountinfo::read_for(&[&path]).map_err(Error::io("read the mount table"))?;
                for _ in mountinfo::at(&table, &path) {
                    detach(&path).map_err(Error::io(format!("detach {}", path.display())))?;
                }
                tracing::info!(volume, path = %path.display(), %why, "detached a mount that no longer answers");
            }
            Ok(export.data_path(&id))
        })
        .await
    }

    /// Writes this node's marker into the volume's `staged/` on the export (over the
    /// userspace client: it works whatever this node mounts, and never makes the volume's
    /// own directory, so a volume deleted meanwhile stays gone: NOT_FOUND).
    async fn mark(&self, volume_id: &str) -> Result<()> {
        let id = VolumeId::parse(volume_id)?;
        let export = self.export(&id)?;
        let (export, client) = (&export.export, &export.export.client);
        if client
            .stat(&format!("{}/{DATA}", export.volume(&id)))
            .await?
            != Some(true)
        {
            return Err(Error::UnknownVolume(id.to_string()).into());
        }
        client.mkdir(&export.staged(&id), 0o755).await?;
        let marker = export.marker(&id, &self.marker);
        let body = format!("{}\n", crate::lane::volumes::now_unix());
        client.write(&marker, body.as_bytes()).await?;
        Ok(())
    }

    /// Removes this node's marker of a volume it no longer stages, within the probe deadline.
    /// Best effort: unstage must not wait on a dead server; a marker left behind makes the
    /// controller refuse the delete, saying which node and which file.
    async fn unmark(&self, export: &NodeExport, id: &VolumeId) {
        let marker = export.export.marker(id, &self.marker);
        let removed = tokio::time::timeout(
            crate::mount::health::PROBE_DEADLINE,
            export.export.client.remove(&marker, false),
        )
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(volume = %id, marker, error = %e, "could not remove this node's staged marker")
            }
            Err(_) => {
                tracing::warn!(volume = %id, marker, "the export did not answer; this node's staged marker stays")
            }
        }
    }

    /// Every `interval`, mounts again each export whose mount stopped answering while
    /// volumes of it are staged here, and re-binds their paths.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            let exports: Vec<Arc<NodeExport>> = self.exports.values().cloned().collect();
            let deadline = self.ctx.mount_timeout;
            let checked = self
                .blocking(move |ctx| {
                    let records = ctx.ledger.all()?;
                    for export in exports {
                        let prefix = format!("{LANE}/{}/", export.profile());
                        let ours: Vec<VolumeRecord> = records
                            .iter()
                            .filter(|r| r.volume_id.starts_with(&prefix) && !r.staged.is_empty())
                            .cloned()
                            .collect();
                        // Each mount the staged volumes use, once.
                        let mut checked = std::collections::BTreeSet::new();
                        for record in &ours {
                            let Ok(id) = VolumeId::parse(&record.volume_id) else {
                                continue;
                            };
                            if !checked.insert(export.unit(&id).point) {
                                continue;
                            }
                            if let Err(e) = export.ensure_mounted(&id, true, deadline) {
                                tracing::warn!(server = %export.what(), error = %e, "NFS mount check failed");
                            }
                        }
                        rebind(ctx, &export, &ours);
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = checked {
                tracing::warn!(error = %e, "NFS mount check failed");
            }
        }
    }
}

/// Re-binds the staging and target paths of `records` (volumes of `export`) whose mount no
/// longer answers. Probes run side by side, so many hung paths cost one probe deadline.
/// Failures are logged: the next call or check retries.
fn rebind(ctx: &NodeContext, export: &NodeExport, records: &[VolumeRecord]) {
    let binds = bind::recorded_binds(records, |id| {
        (id.lane() == LANE && id.fs() == Some(export.profile())).then(|| export.data_path(id))
    });
    let stale: std::collections::HashSet<&Path> = std::thread::scope(|scope| {
        let probes: Vec<_> = binds
            .iter()
            .map(|b| {
                scope
                    .spawn(move || matches!(probe(b.path), Err(Probe::Failed(_))).then_some(b.path))
            })
            .collect();
        probes
            .into_iter()
            .filter_map(|p| p.join().ok().flatten())
            .collect()
    });
    if stale.is_empty() {
        return;
    }
    let paths: Vec<&Path> = binds.iter().map(|b| b.path).collect();
    let Ok(table) = mountinfo::read_for(&paths) else {
        return;
    };
    bind::rebind_stale(ctx, &table, &binds, |path| {
        stale.contains(path) && !mountinfo::at(&table, path).is_empty()
    });
}

#[async_trait::async_trait]
impl NodeLane for NfsNode {
    fn kind(&self) -> &'static str {
        LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access(capability)
    }

    async fn stage(&self, request: Stage<'_>) -> Result<()> {
        let Stage {
            volume_id,
            staging,
            capability,
        } = request;
        self.mark(volume_id).await?;
        let staged = async {
            let (_, data) = self.prepare(volume_id, true).await?;
            let Some(staging_dir) =
                bind::prepare_stage(&self.ctx, volume_id, staging, capability, &data).await?
            else {
                return Ok(());
            };
            bind::bind_staging(&self.ctx, &data, staging, staging_dir).await
        }
        .await;
        // A stage that failed leaves no marker unless the volume is staged here elsewhere.
        if staged.is_err() {
            let id = VolumeId::parse(volume_id)?;
            let record = self.ctx.ledger.load(volume_id)?;
            let paths: Vec<PathBuf> = record.staged.iter().map(|s| s.path.clone()).collect();
            let live = !paths.is_empty()
                && match self.ctx.table(paths.clone()).await {
                    Ok(table) => paths.iter().any(|p| !mountinfo::at(&table, p).is_empty()),
                    Err(_) => true,
                };
            if !live {
                self.unmark(self.export(&id)?.as_ref(), &id).await;
            }
        }
        staged
    }

    async fn unstage(&self, volume_id: &str, staging: &RequestPath) -> Result<()> {
        let data = match self.offline(volume_id, staging.as_path()).await {
            Ok(data) => data,
            // Not a volume of ours: nothing of it can be mounted here.
            Err(NodeError::Lane(Error::UnknownVolume(_))) => return Ok(()),
            Err(e) => return Err(e),
        };
        bind::unstage(&self.ctx, volume_id, staging, &data).await?;
        let id = VolumeId::parse(volume_id)?;
        let export = self.export(&id)?;
        let volume = volume_id.to_owned();
        let (release, unused) = (export.clone(), id.clone());
        let unused = self
            .blocking(move |ctx| {
                let record = ctx.ledger.load(&volume)?;
                // Publications are binds of staging paths: a CO unstaging out of order keeps
                // the volume's own mount for them.
                if record.staged.is_empty() && record.published.is_empty() {
                    release.release(&unused)?;
                }
                Ok(record.staged.is_empty())
            })
            .await?;
        if unused {
            self.unmark(&export, &id).await;
        }
        Ok(())
    }

    async fn publish(&self, request: Publish<'_>) -> Result<()> {
        let access = access(request.capability).map_err(NodeError::Invalid)?;
        self.ctx.failpoint.delay("publish").await;
        let (_, data) = self.prepare(request.volume_id, false).await?;
        bind::publish(&self.ctx, request, access, &data).await
    }

    async fn unpublish(
        &self,
        mut record: VolumeRecord,
        target: &RequestPath,
    ) -> Result<Unpublished> {
        let data = match self.offline(&record.volume_id, target.as_path()).await {
            Ok(data) => data,
            Err(NodeError::Lane(Error::UnknownVolume(_))) => return Ok(Unpublished::Kept),
            Err(e) => return Err(e),
        };
        bind::unpublish(&self.ctx, &mut record, target, &data).await?;
        Ok(Unpublished::Kept)
    }

    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats> {
        let (_, data) = self.prepare(&record.volume_id, false).await?;
        bind::require_mounted(&self.ctx, &record.volume_id, path, &data).await?;
        // statvfs under the mount deadline; never a walk. NFS reports the export's space.
        let usage = self.ctx.usage(path).await?;
        Ok(Stats {
            usage,
            message: "volume is mounted and its NFS export answers; sizes are the export's \
                      (NFS enforces no per-volume capacity)"
                .into(),
            abnormal: None,
        })
    }

    async fn expand(&self, volume_id: &str, path: &RequestPath) -> Result<u64> {
        let (_, data) = self.prepare(volume_id, false).await?;
        bind::require_mounted(&self.ctx, volume_id, path, &data).await?;
        // Nothing to grow: the controller recorded the capacity, NFS enforces none.
        let id = VolumeId::parse(volume_id)?;
        let meta = self.export(&id)?.export.load(&id).await?;
        let meta = meta.ok_or_else(|| Error::UnknownVolume(id.to_string()))?;
        Ok(meta.capacity_bytes)
    }
}
