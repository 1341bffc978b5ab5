//! The node half of the local lane: stage = bind the volume's data directory at the staging
//! path (an overlay on the cached tree for a volume made with a dataset); publish = bind the
//! staging path at the target with the requested flags.
//!
//! A mount is recognised as this volume's by device and root (or, for an overlay, by its upper
//! layer being the volume's data), read from the kernel on every call ([`Origin`]).

use std::path::Path;
use std::sync::Arc;

use super::{LocalLane, access};
use crate::lane::capability::{Access, Capability};
use crate::lane::ledger::{Publication, Staging, VolumeRecord};
use crate::lane::node::{
    NodeContext, NodeError, NodeLane, Publish, Result, Stage, Stats, Unpublished, Usage,
    apply_mount_group,
};
use crate::lane::{VolumeId, VolumeMeta};
use crate::mount::safe::RequestPath;
use crate::mount::{MountEntry, Origin, mountinfo};
use crate::text::Shown;

/// The local lane on this node.
#[derive(Debug)]
pub struct LocalNode {
    ctx: Arc<NodeContext>,
    lane: Arc<LocalLane>,
}

fn show(path: &Path) -> String {
    Shown(&path.to_string_lossy()).to_string()
}

impl LocalNode {
    pub fn new(ctx: Arc<NodeContext>, lane: Arc<LocalLane>) -> LocalNode {
        LocalNode { ctx, lane }
    }

    /// Runs blocking lane work off the runtime under the deadline.
    async fn lane<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&LocalLane) -> crate::lane::Result<T> + Send + 'static,
    {
        let lane = self.lane.clone();
        self.ctx
            .blocking("the local lane", move || Ok(f(&lane)?))
            .await
    }

    fn id(volume_id: &str) -> Result<VolumeId> {
        Ok(VolumeId::parse(volume_id)?)
    }

    async fn meta(&self, id: &VolumeId) -> Result<VolumeMeta> {
        let lookup = id.clone();
        self.lane(move |lane| lane.get(&lookup)).await
    }

    /// The mount table at `paths` and the volume's data, and where the data lies in it.
    async fn located(
        &self,
        id: &VolumeId,
        mut paths: Vec<std::path::PathBuf>,
    ) -> Result<(Vec<MountEntry>, Origin)> {
        let data = self.lane.data_path(id);
        paths.push(data.clone());
        let table = self.ctx.table(paths).await?;
        let origin = Origin::of(&table, &data);
        Ok((table, origin))
    }
}

#[async_trait::async_trait]
impl NodeLane for LocalNode {
    fn kind(&self) -> &'static str {
        super::LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        access::access(capability)
    }

    async fn stage(&self, request: Stage<'_>) -> Result<()> {
        let Stage {
            volume_id,
            staging,
            capability,
        } = request;
        let id = Self::id(volume_id)?;
        let meta = self.meta(&id).await?;
        let staging_dir = staging.open_dir()?.ok_or_else(|| {
            NodeError::Invalid(format!(
                "staging_target_path {} does not exist; the CO must create it",
                show(staging.as_path())
            ))
        })?;
        let (table, origin) = self
            .located(&id, vec![staging.as_path().to_owned()])
            .await?;
        let stack = mountinfo::at(&table, staging.as_path());
        let asked = capability.asked(false);
        let mut record = self.ctx.ledger.load(volume_id)?;
        if let Some(existing) = record.staging(staging.as_path())
            && existing.asked != asked
            && stack.iter().any(|e| origin.matches(e))
        {
            return Err(NodeError::Repeated {
                volume: Shown(volume_id).to_string(),
                how: "staged",
                path: show(staging.as_path()),
            });
        }
        if let Some(top) = stack.last()
            && !origin.matches(top)
        {
            return Err(NodeError::Occupied {
                path: show(staging.as_path()),
                fs_type: Shown(&top.fs_type).to_string(),
                mounted: Shown(&top.source).to_string(),
            });
        }
        record.set_staging(Staging {
            path: staging.as_path().to_owned(),
            asked,
        });
        self.ctx.ledger.store(&record)?;
        if !stack.is_empty() {
            return Ok(());
        }
        let data = self.lane.data_path(&id);
        if let Some(pin) = &meta.dataset {
            return crate::lane::dataset::stage_overlay(
                &self.ctx,
                pin,
                &data,
                staging,
                staging_dir,
            )
            .await;
        }
        self.ctx
            .mount_op("bind mount", staging.as_path(), move |m| {
                m.bind(&data, &staging_dir.proc_path())
            })
            .await?;
        self.ctx.failpoint.hit("stage.after-bind");
        Ok(())
    }

    async fn unstage(&self, volume_id: &str, staging: &RequestPath) -> Result<()> {
        let id = Self::id(volume_id)?;
        let (table, origin) = self
            .located(&id, vec![staging.as_path().to_owned()])
            .await?;
        let what = format!("volume {}", Shown(volume_id));
        self.ctx
            .unmount_ours(&what, staging, &table, |e| origin.matches(e))
            .await?;
        let mut record = self.ctx.ledger.load(volume_id)?;
        if record.staging(staging.as_path()).is_some() {
            record.staged.retain(|s| s.path != staging.as_path());
            self.ctx.ledger.store(&record)?;
        }
        Ok(())
    }

    async fn publish(&self, request: Publish<'_>) -> Result<()> {
        let Publish {
            volume_id,
            target,
            staging,
            capability,
            readonly,
            ..
        } = request;
        let access = access::access(capability).map_err(NodeError::Invalid)?;
        let staging = staging.ok_or_else(|| {
            NodeError::Invalid(
                "staging_target_path is required: Lanes stages every volume (STAGE_UNSTAGE_VOLUME)"
                    .into(),
            )
        })?;
        let id = Self::id(volume_id)?;
        self.ctx.failpoint.delay("publish").await;
        self.meta(&id).await?;
        let mut record = self.ctx.ledger.load(volume_id)?;
        let mut paths = vec![staging.as_path().to_owned(), target.as_path().to_owned()];
        paths.extend(record.published.iter().map(|p| p.target.clone()));
        let (table, origin) = self.located(&id, paths).await?;
        let live = |path: &Path| {
            mountinfo::at(&table, path)
                .iter()
                .any(|e| origin.matches(e))
        };
        let not_staged = || NodeError::NotStaged {
            volume: Shown(volume_id).to_string(),
            staging: show(staging.as_path()),
        };
        if !live(staging.as_path()) {
            return Err(not_staged());
        }
        let staging_dir = staging.open_dir()?.ok_or_else(not_staged)?;
        let flags = access.publish_flags(readonly);
        let publication = Publication {
            target: target.as_path().to_owned(),
            staging: Some(staging.as_path().to_owned()),
            asked: capability.asked(readonly),
            writer: !flags.read_only,
            created_target: false,
        };
        self.ctx.admit(&mut record, publication, target, live)?;
        let (target_dir, _) = target.make_dir()?;
        self.ctx.failpoint.hit("publish.after-mkdir");
        if let Some(gid) = access.mount_group {
            apply_mount_group(&self.lane.data_path(&id), gid)?;
        }
        match mountinfo::at(&table, target.as_path()).last() {
            Some(top) if origin.matches(top) && flags.satisfied_by(top) => return Ok(()),
            Some(top) if origin.matches(top) => {}
            Some(top) => {
                return Err(NodeError::Occupied {
                    path: show(target.as_path()),
                    fs_type: Shown(&top.fs_type).to_string(),
                    mounted: Shown(&top.source).to_string(),
                });
            }
            None => {
                self.ctx
                    .mount_op("bind mount", target.as_path(), move |m| {
                        m.bind(&staging_dir.proc_path(), &target_dir.proc_path())
                    })
                    .await?;
                self.ctx.failpoint.hit("publish.after-bind");
                if flags.is_plain() {
                    return Ok(());
                }
            }
        }
        self.ctx.remount(target, flags).await
    }

    async fn unpublish(
        &self,
        mut record: VolumeRecord,
        target: &RequestPath,
    ) -> Result<Unpublished> {
        let id = match VolumeId::parse(&record.volume_id) {
            Ok(id) => id,
            // Not a volume of ours: nothing of it can be mounted here.
            Err(crate::lane::Error::UnknownVolume(_)) => return Ok(Unpublished::Kept),
            Err(e) => return Err(e.into()),
        };
        let (table, origin) = self.located(&id, vec![target.as_path().to_owned()]).await?;
        let what = format!("volume {}", Shown(&record.volume_id));
        self.ctx
            .unmount_ours(&what, target, &table, |e| origin.matches(e))
            .await?;
        self.ctx.failpoint.hit("unpublish.after-unmount");
        self.ctx.release_target(&mut record, target)?;
        Ok(Unpublished::Kept)
    }

    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats> {
        let id = Self::id(&record.volume_id)?;
        self.meta(&id).await?;
        let (table, origin) = self.located(&id, vec![path.as_path().to_owned()]).await?;
        if !mountinfo::at(&table, path.as_path())
            .iter()
            .any(|e| origin.matches(e))
        {
            return Err(NodeError::NotMounted {
                volume: Shown(&record.volume_id).to_string(),
                path: show(path.as_path()),
            });
        }
        let mut usage = self.ctx.usage(path).await?;
        let lookup = id.clone();
        if let Some((used, limit)) = self.lane(move |lane| lane.usage(&lookup)).await? {
            // The volume's own bytes and limit (its quota group), not the filesystem's.
            usage.retain(|u| u.inodes);
            usage.insert(
                0,
                Usage {
                    inodes: false,
                    total: limit,
                    used,
                    available: limit.saturating_sub(used),
                },
            );
        }
        let lookup = id.clone();
        let abnormal = self.lane(move |lane| Ok(lane.condition(&lookup))).await?;
        Ok(Stats {
            usage,
            message: abnormal
                .clone()
                .unwrap_or_else(|| "volume is mounted and its directory is present".into()),
            abnormal,
        })
    }

    async fn expand(&self, volume_id: &str, path: &RequestPath) -> Result<u64> {
        let id = Self::id(volume_id)?;
        let meta = self.meta(&id).await?;
        let (table, origin) = self.located(&id, vec![path.as_path().to_owned()]).await?;
        if !mountinfo::at(&table, path.as_path())
            .iter()
            .any(|e| origin.matches(e))
        {
            return Err(NodeError::NotMounted {
                volume: Shown(volume_id).to_string(),
                path: show(path.as_path()),
            });
        }
        // The quota was already grown by ControllerExpandVolume; a directory volume has no
        // filesystem of its own to grow, so the node only reports the capacity.
        Ok(meta.capacity_bytes)
    }
}
