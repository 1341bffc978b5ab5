//! The node half of the `fast-rwo` lane.
//!
//! - mount access: stage = attach the image's loop device, format it once, mount it at the
//!   staging path; publish = bind the staging path at the target with the requested flags.
//! - block access: stage = attach the loop device; publish = bind the device node onto a file
//!   at the target.
//!
//! Unstage detaches the device once nothing of the volume is staged or published on this
//! node. A mount is recognised as this volume's by the device it shows: the loop device's
//! number (a filesystem on it), or the device node's place in `/dev` (a raw bind), read from
//! the kernel on every call.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::format::{self, Formatted};
use super::loopdev::{self, LoopDevice};
use super::{BlockLane, access};
use crate::lane::capability::{Access, AccessType, Capability};
use crate::lane::ledger::{Publication, Staging, VolumeRecord};
use crate::lane::node::{
    NodeContext, NodeError, NodeLane, Publish, Result, Stage, Stats, Unpublished, Usage,
    apply_mount_group,
};
use crate::lane::{FsType, VolumeId, VolumeMeta};
use crate::mount::safe::RequestPath;
use crate::mount::{MountEntry, MountFlags, Origin, mountinfo};
use crate::text::Shown;

/// The `fast-rwo` lane on this node.
#[derive(Debug)]
pub struct BlockNode {
    ctx: Arc<NodeContext>,
    lane: Arc<BlockLane>,
}

fn show(path: &Path) -> String {
    Shown(&path.to_string_lossy()).to_string()
}

/// Where a volume's device shows in a mount table.
struct Mounts {
    table: Vec<MountEntry>,
    device: Option<LoopDevice>,
    node: Option<Origin>,
}

impl Mounts {
    /// True when `entry` is this volume: its filesystem, or a bind of its device node.
    fn ours(&self, entry: &MountEntry) -> bool {
        let Some(device) = &self.device else {
            return false;
        };
        (entry.major, entry.minor) == device.number
            || self.node.as_ref().is_some_and(|node| node.matches(entry))
    }

    fn at(&self, path: &Path) -> Vec<&MountEntry> {
        mountinfo::at(&self.table, path)
    }

    fn live(&self, path: &Path) -> bool {
        self.at(path).iter().any(|e| self.ours(e))
    }
}

fn format_error(e: format::Error) -> NodeError {
    match e {
        format::Error::OtherFs { .. } => NodeError::Invalid(e.to_string()),
        format::Error::HasData => NodeError::Precondition(e.to_string()),
        format::Error::Io(e) => NodeError::Internal(e.to_string()),
        format::Error::Tool { .. } => NodeError::Internal(e.to_string()),
    }
}

impl BlockNode {
    pub fn new(ctx: Arc<NodeContext>, lane: Arc<BlockLane>) -> BlockNode {
        BlockNode { ctx, lane }
    }

    /// Runs blocking work off the runtime under the node's deadline.
    async fn run<T, F>(&self, what: &'static str, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&BlockLane) -> Result<T> + Send + 'static,
    {
        let lane = self.lane.clone();
        self.ctx.blocking(what, move || f(&lane)).await
    }

    async fn volume(&self, volume_id: &str) -> Result<(VolumeId, VolumeMeta)> {
        let id = VolumeId::parse(volume_id)?;
        let lookup = id.clone();
        let meta = self
            .run("read the volume", move |lane| Ok(lane.get(&lookup)?))
            .await?;
        Ok((id, meta))
    }

    /// The volume's loop device if attached.
    async fn device(&self, id: &VolumeId) -> Result<Option<LoopDevice>> {
        let image = self.lane.image_path(id);
        self.run("find the loop device", move |_| {
            if !image.exists() {
                return Ok(None);
            }
            loopdev::find(&image).map_err(|e| NodeError::Internal(e.to_string()))
        })
        .await
    }

    /// The mount table at `paths`, and how this volume shows in it.
    async fn mounts(&self, id: &VolumeId, mut paths: Vec<PathBuf>) -> Result<Mounts> {
        let device = self.device(id).await?;
        if let Some(device) = &device {
            paths.push(device.path.clone());
        }
        let table = self.ctx.table(paths).await?;
        let node = device.as_ref().map(|d| Origin::of(&table, &d.path));
        Ok(Mounts {
            table,
            device,
            node,
        })
    }

    /// Mounts the volume's filesystem at the staging path: formats it first if it never was,
    /// and grows it to the device when the volume grew while it was not mounted.
    async fn mount_staging(
        &self,
        id: &VolumeId,
        meta: &VolumeMeta,
        device: LoopDevice,
        capability: &Capability,
        staging: &RequestPath,
    ) -> Result<()> {
        let staging_dir = staging
            .open_dir()?
            .ok_or_else(|| self.no_staging(staging))?;
        let asked = access::asked_fs(capability);
        let fs = asked.unwrap_or(super::backend(meta).fs_type);
        let (dir, dev) = (self.lane.volume_dir(id), device.clone());
        let formatted = self
            .run("format the volume", move |_| {
                let bytes = dev.size().map_err(|e| NodeError::Internal(e.to_string()))?;
                let done = format::ensure(&dir, &dev.path, bytes, fs, asked.is_some())
                    .map_err(format_error)?;
                if done.fs_type == FsType::Ext4 && done.bytes < bytes {
                    format::grow_ext4_offline(&dev.path).map_err(format_error)?;
                    format::record(&dir, Formatted { bytes, ..done }).map_err(format_error)?;
                }
                Ok(done)
            })
            .await?;
        self.ctx.failpoint.hit("stage.after-format");
        let device_path = device.path.clone();
        let fs_name = formatted.fs_type.as_str();
        self.ctx
            .mount_op("mount", staging.as_path(), move |m| {
                m.mount_device(
                    &device_path,
                    &staging_dir.proc_path(),
                    fs_name,
                    MountFlags::default(),
                    format::mount_data(formatted.fs_type),
                )
            })
            .await?;
        self.ctx.failpoint.hit("stage.after-mount");
        if formatted.fs_type == FsType::Xfs {
            self.grow_mounted(id, &device, staging.as_path(), formatted)
                .await?;
        }
        Ok(())
    }

    /// Grows a mounted xfs to its device when the device is larger than the record says.
    async fn grow_mounted(
        &self,
        id: &VolumeId,
        device: &LoopDevice,
        mount_point: &Path,
        formatted: Formatted,
    ) -> Result<u64> {
        let (dir, dev, at) = (
            self.lane.volume_dir(id),
            device.clone(),
            mount_point.to_owned(),
        );
        self.run("grow the filesystem", move |_| {
            let bytes = dev.size().map_err(|e| NodeError::Internal(e.to_string()))?;
            if formatted.bytes >= bytes {
                return Ok(formatted.bytes);
            }
            match formatted.fs_type {
                FsType::Xfs => format::grow_xfs(&at).map_err(format_error)?,
                FsType::Ext4 => format::grow_ext4_online(&dev.path).map_err(|e| {
                    NodeError::Precondition(format!(
                        "ext4 cannot grow while mounted on this node ({e}); the volume grows \
                         to {bytes} bytes at its next stage: unpublish and unstage it, then \
                         stage it again"
                    ))
                })?,
            }
            format::record(&dir, Formatted { bytes, ..formatted }).map_err(format_error)?;
            Ok(bytes)
        })
        .await
    }

    fn no_staging(&self, staging: &RequestPath) -> NodeError {
        NodeError::Invalid(format!(
            "staging_target_path {} does not exist; the CO must create it",
            show(staging.as_path())
        ))
    }

    /// Detaches the volume's device when nothing of it is staged or published here.
    async fn detach_if_idle(&self, id: &VolumeId, record: &VolumeRecord) -> Result<()> {
        if !record.staged.is_empty() || !record.published.is_empty() {
            return Ok(());
        }
        let Some(device) = self.device(id).await? else {
            return Ok(());
        };
        self.run("detach the loop device", move |_| {
            device
                .detach()
                .map_err(|e| NodeError::Internal(e.to_string()))
        })
        .await
    }
}

#[async_trait::async_trait]
impl NodeLane for BlockNode {
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
        let (id, meta) = self.volume(volume_id).await?;
        if staging.open_dir()?.is_none() {
            return Err(self.no_staging(staging));
        }
        let asked = capability.asked(false);
        let mut record = self.ctx.ledger.load(volume_id)?;
        let mounts = self.mounts(&id, vec![staging.as_path().to_owned()]).await?;
        let stack = mounts.at(staging.as_path());
        if let Some(existing) = record.staging(staging.as_path())
            && existing.asked != asked
            && (mounts.live(staging.as_path()) || existing.asked.block)
        {
            return Err(NodeError::Repeated {
                volume: Shown(volume_id).to_string(),
                how: "staged",
                path: show(staging.as_path()),
            });
        }
        if let Some(top) = stack.last()
            && !mounts.ours(top)
        {
            return Err(NodeError::Occupied {
                path: show(staging.as_path()),
                fs_type: Shown(&top.fs_type).to_string(),
                mounted: Shown(&top.source).to_string(),
            });
        }
        if let Some(fs) = access::asked_fs(capability) {
            let dir = self.lane.volume_dir(&id);
            let recorded = self
                .run("read the format record", move |_| {
                    format::formatted(&dir).map_err(format_error)
                })
                .await?;
            if let Some(done) = recorded.filter(|done| done.fs_type != fs) {
                return Err(format_error(format::Error::OtherFs {
                    has: done.fs_type.as_str(),
                    asked: fs.as_str(),
                }));
            }
        }
        record.set_staging(Staging {
            path: staging.as_path().to_owned(),
            asked,
        });
        self.ctx.ledger.store(&record)?;
        let image = self.lane.image_path(&id);
        let device = self
            .run("attach the loop device", move |_| {
                loopdev::attach(&image).map_err(|e| NodeError::Internal(e.to_string()))
            })
            .await?;
        self.ctx.failpoint.hit("stage.after-attach");
        if !stack.is_empty() || capability.access_type == AccessType::Block {
            return Ok(());
        }
        self.mount_staging(&id, &meta, device, capability, staging)
            .await
    }

    async fn unstage(&self, volume_id: &str, staging: &RequestPath) -> Result<()> {
        let id = VolumeId::parse(volume_id)?;
        let mut record = self.ctx.ledger.load(volume_id)?;
        let mut paths = vec![staging.as_path().to_owned()];
        paths.extend(record.published.iter().map(|p| p.target.clone()));
        let mounts = self.mounts(&id, paths).await?;
        let what = format!("volume {}", Shown(volume_id));
        self.ctx
            .unmount_ours(&what, staging, &mounts.table, |e| mounts.ours(e))
            .await?;
        self.ctx.failpoint.hit("unstage.after-unmount");
        // Publications still mounted keep the device attached (the CO unpublishes first).
        record.published.retain(|p| mounts.live(&p.target));
        if record.staging(staging.as_path()).is_some() {
            record.staged.retain(|s| s.path != staging.as_path());
            self.ctx.ledger.store(&record)?;
        }
        self.detach_if_idle(&id, &record).await
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
        let (id, _) = self.volume(volume_id).await?;
        let block = capability.access_type == AccessType::Block;
        let mut record = self.ctx.ledger.load(volume_id)?;
        let mut paths = vec![staging.as_path().to_owned(), target.as_path().to_owned()];
        paths.extend(record.published.iter().map(|p| p.target.clone()));
        let mounts = self.mounts(&id, paths).await?;
        let not_staged = || NodeError::NotStaged {
            volume: Shown(volume_id).to_string(),
            staging: show(staging.as_path()),
        };
        let staged = match block {
            true => {
                mounts.device.is_some()
                    && record
                        .staging(staging.as_path())
                        .is_some_and(|s| s.asked.block)
            }
            false => mounts.live(staging.as_path()),
        };
        if !staged {
            return Err(not_staged());
        }
        let flags = access.publish_flags(readonly);
        let publication = Publication {
            target: target.as_path().to_owned(),
            staging: Some(staging.as_path().to_owned()),
            asked: capability.asked(readonly),
            writer: !flags.read_only,
            created_target: false,
        };
        self.ctx
            .admit(&mut record, publication, target, |p| mounts.live(p))?;
        let (target_pin, _) = match block {
            true => target.make_file()?,
            false => target.make_dir()?,
        };
        self.ctx.failpoint.hit("publish.after-mkdir");
        if let (Some(gid), false) = (access.mount_group, block) {
            let root = staging.open_dir()?.ok_or_else(not_staged)?;
            apply_mount_group(&root.proc_path(), gid)?;
        }
        match mounts.at(target.as_path()).last() {
            Some(top) if mounts.ours(top) && flags.satisfied_by(top) => return Ok(()),
            Some(top) if mounts.ours(top) => {}
            Some(top) => {
                return Err(NodeError::Occupied {
                    path: show(target.as_path()),
                    fs_type: Shown(&top.fs_type).to_string(),
                    mounted: Shown(&top.source).to_string(),
                });
            }
            None => {
                // The staging pin (a filesystem volume's source) lives until the bind is made.
                let source_pin = match block {
                    true => None,
                    false => Some(staging.open_dir()?.ok_or_else(not_staged)?),
                };
                let source = match (&source_pin, &mounts.device) {
                    (Some(pin), _) => pin.proc_path(),
                    (None, Some(device)) => device.path.clone(),
                    (None, None) => return Err(not_staged()),
                };
                self.ctx
                    .mount_op("bind mount", target.as_path(), move |m| {
                        let bound = m.bind(&source, &target_pin.proc_path());
                        drop(source_pin);
                        bound
                    })
                    .await?;
                self.ctx.failpoint.hit("publish.after-bind");
                if flags.is_plain() {
                    return Ok(());
                }
            }
        }
        if block {
            let pinned = target.make_file()?.0;
            return self
                .ctx
                .mount_op("remount", target.as_path(), move |m| {
                    m.remount(&pinned.proc_path(), flags)
                })
                .await;
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
            Err(crate::lane::Error::UnknownVolume(_)) => return Ok(Unpublished::Kept),
            Err(e) => return Err(e.into()),
        };
        let mounts = self.mounts(&id, vec![target.as_path().to_owned()]).await?;
        let what = format!("volume {}", Shown(&record.volume_id));
        self.ctx
            .unmount_ours(&what, target, &mounts.table, |e| mounts.ours(e))
            .await?;
        self.ctx.failpoint.hit("unpublish.after-unmount");
        self.ctx.release_target(&mut record, target)?;
        // The last user of a device left staged-less (unstaged while still published).
        self.detach_if_idle(&id, &record).await?;
        Ok(Unpublished::Kept)
    }

    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats> {
        let (id, meta) = self.volume(&record.volume_id).await?;
        let mounts = self.mounts(&id, vec![path.as_path().to_owned()]).await?;
        let Some(top) = mounts
            .at(path.as_path())
            .into_iter()
            .rfind(|e| mounts.ours(e))
        else {
            return Err(NodeError::NotMounted {
                volume: Shown(&record.volume_id).to_string(),
                path: show(path.as_path()),
            });
        };
        let raw = mounts.node.as_ref().is_some_and(|node| node.matches(top));
        let usage = if raw {
            // A raw device: its size is all there is to say (CSI: total only).
            let bytes = match &mounts.device {
                Some(device) => device.size().unwrap_or(meta.capacity_bytes),
                None => meta.capacity_bytes,
            };
            vec![Usage {
                inodes: false,
                total: bytes,
                used: 0,
                available: 0,
            }]
        } else {
            self.ctx.usage(path).await?
        };
        let lookup = id.clone();
        let abnormal = self
            .run("check the volume", move |lane| Ok(lane.condition(&lookup)))
            .await?;
        Ok(Stats {
            usage,
            message: abnormal
                .clone()
                .unwrap_or_else(|| "volume is attached and mounted".into()),
            abnormal,
        })
    }

    async fn expand(&self, volume_id: &str, path: &RequestPath) -> Result<u64> {
        let (id, meta) = self.volume(volume_id).await?;
        let mounts = self.mounts(&id, vec![path.as_path().to_owned()]).await?;
        let (Some(device), true) = (mounts.device.clone(), mounts.live(path.as_path())) else {
            return Err(NodeError::NotMounted {
                volume: Shown(volume_id).to_string(),
                path: show(path.as_path()),
            });
        };
        let dev = device.clone();
        self.run("resize the loop device", move |_| {
            dev.refresh_capacity()
                .map_err(|e| NodeError::Internal(e.to_string()))
        })
        .await?;
        let dir = self.lane.volume_dir(&id);
        let recorded = self
            .run("read the format record", move |_| {
                format::formatted(&dir).map_err(format_error)
            })
            .await?;
        let raw = mounts
            .at(path.as_path())
            .iter()
            .any(|e| mounts.node.as_ref().is_some_and(|node| node.matches(e)));
        match recorded {
            Some(formatted) if !raw => {
                self.grow_mounted(&id, &device, path.as_path(), formatted)
                    .await
            }
            _ => Ok(meta.capacity_bytes),
        }
    }
}
