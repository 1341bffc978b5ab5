//! Volumes that are a directory bound into place (the local and shared-rwx lanes): stage binds
//! the volume's directory at the staging path, publish binds the staging path at the target
//! with the requested flags.
//!
//! A mount is recognised as the volume's by device and root (or, for an overlay, by its upper
//! layer being the volume's directory), read from the kernel on every call ([`Origin`]); the
//! rules of [`NodeContext`] (ledger first, repeats, foreign mounts) hold for every such lane.

use std::path::{Path, PathBuf};

use super::capability::{Access, AccessType, Capability};
use super::ledger::{Publication, Staging, VolumeRecord};
use super::node::{NodeContext, NodeError, Publish, Result, apply_mount_group};
use crate::mount::safe::{Pinned, RequestPath};
use crate::mount::{Atime, MountEntry, MountFlags, Origin, mountinfo};
use crate::text::Shown;

/// Which capabilities a shared directory lane serves: mount access in every access mode, with
/// no fs_type or one of `fs_types`. `lane` and `backend` word the refusals.
pub fn shared_access(
    capability: &Capability,
    lane: &str,
    backend: &str,
    fs_types: &[&str],
) -> std::result::Result<Access, String> {
    let AccessType::Mount {
        fs_type,
        flags,
        mount_group,
    } = &capability.access_type
    else {
        return Err(format!(
            "block access is not supported: {lane} volumes are directories of {backend}"
        ));
    };
    if !fs_type.is_empty() && !fs_types.contains(&fs_type.as_str()) {
        return Err(format!(
            "fs_type {} cannot be honoured: {lane} volumes are directories of {backend}; leave \
             fsType unset",
            Shown(fs_type)
        ));
    }
    Access::for_mount(capability.mode, flags, mount_group)
}

fn show(path: &Path) -> String {
    Shown(&path.to_string_lossy()).to_string()
}

/// The mount table at `paths` and at `data`, and where `data` lies in it.
pub async fn located(
    ctx: &NodeContext,
    data: &Path,
    mut paths: Vec<PathBuf>,
) -> Result<(Vec<MountEntry>, Origin)> {
    paths.push(data.to_owned());
    let table = ctx.table(paths).await?;
    let origin = Origin::of(&table, data);
    Ok((table, origin))
}

/// Checks and records a stage of `data` at `staging`. The pinned staging directory when a
/// mount must still be made there; `None` when the volume is already staged at it.
pub async fn prepare_stage(
    ctx: &NodeContext,
    volume_id: &str,
    staging: &RequestPath,
    capability: &Capability,
    data: &Path,
) -> Result<Option<Pinned>> {
    let staging_dir = staging.open_dir()?.ok_or_else(|| {
        NodeError::Invalid(format!(
            "staging_target_path {} does not exist; the CO must create it",
            show(staging.as_path())
        ))
    })?;
    let (table, origin) = located(ctx, data, vec![staging.as_path().to_owned()]).await?;
    let stack = mountinfo::at(&table, staging.as_path());
    let asked = capability.asked(false);
    let mut record = ctx.ledger.load(volume_id)?;
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
    ctx.ledger.store(&record)?;
    Ok(stack.is_empty().then_some(staging_dir))
}

/// Binds `data` onto the pinned staging directory.
pub async fn bind_staging(
    ctx: &NodeContext,
    data: &Path,
    staging: &RequestPath,
    staging_dir: Pinned,
) -> Result<()> {
    let data = data.to_owned();
    ctx.mount_op("bind mount", staging.as_path(), move |m| {
        m.bind(&data, &staging_dir.proc_path())
    })
    .await?;
    ctx.failpoint.hit("stage.after-bind");
    Ok(())
}

/// NodeUnstageVolume: unmounts the volume at `staging` (refusing anything else mounted
/// there) and forgets the staging path.
pub async fn unstage(
    ctx: &NodeContext,
    volume_id: &str,
    staging: &RequestPath,
    data: &Path,
) -> Result<()> {
    let (table, origin) = located(ctx, data, vec![staging.as_path().to_owned()]).await?;
    let what = format!("volume {}", Shown(volume_id));
    ctx.unmount_ours(&what, staging, &table, |e| origin.matches(e))
        .await?;
    let mut record = ctx.ledger.load(volume_id)?;
    if record.staging(staging.as_path()).is_some() {
        record.staged.retain(|s| s.path != staging.as_path());
        ctx.ledger.store(&record)?;
    }
    Ok(())
}

/// NodePublishVolume: binds the staging path at the target with the flags `access` asks for.
pub async fn publish(
    ctx: &NodeContext,
    request: Publish<'_>,
    access: Access,
    data: &Path,
) -> Result<()> {
    let Publish {
        volume_id,
        target,
        staging,
        capability,
        readonly,
        ..
    } = request;
    let staging = staging.ok_or_else(|| {
        NodeError::Invalid(
            "staging_target_path is required: Lanes stages every volume (STAGE_UNSTAGE_VOLUME)"
                .into(),
        )
    })?;
    let mut record = ctx.ledger.load(volume_id)?;
    let mut paths = vec![staging.as_path().to_owned(), target.as_path().to_owned()];
    paths.extend(record.published.iter().map(|p| p.target.clone()));
    let (table, origin) = located(ctx, data, paths).await?;
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
    ctx.admit(&mut record, publication, target, live)?;
    let (target_dir, _) = target.make_dir()?;
    ctx.failpoint.hit("publish.after-mkdir");
    if let Some(gid) = access.mount_group {
        apply_mount_group(data, gid)?;
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
            ctx.mount_op("bind mount", target.as_path(), move |m| {
                m.bind(&staging_dir.proc_path(), &target_dir.proc_path())
            })
            .await?;
            ctx.failpoint.hit("publish.after-bind");
            if flags.is_plain() {
                return Ok(());
            }
        }
    }
    ctx.remount(target, flags).await
}

/// NodeUnpublishVolume: unmounts the volume at `target` and removes the target when a
/// publish made it.
pub async fn unpublish(
    ctx: &NodeContext,
    record: &mut VolumeRecord,
    target: &RequestPath,
    data: &Path,
) -> Result<()> {
    let (table, origin) = located(ctx, data, vec![target.as_path().to_owned()]).await?;
    let what = format!("volume {}", Shown(&record.volume_id));
    ctx.unmount_ours(&what, target, &table, |e| origin.matches(e))
        .await?;
    ctx.failpoint.hit("unpublish.after-unmount");
    ctx.release_target(record, target)
}

/// Fails with NOT_FOUND unless the volume is mounted at `path`.
pub async fn require_mounted(
    ctx: &NodeContext,
    volume_id: &str,
    path: &RequestPath,
    data: &Path,
) -> Result<()> {
    let (table, origin) = located(ctx, data, vec![path.as_path().to_owned()]).await?;
    if mountinfo::at(&table, path.as_path())
        .iter()
        .any(|e| origin.matches(e))
    {
        return Ok(());
    }
    Err(NodeError::NotMounted {
        volume: Shown(volume_id).to_string(),
        path: show(path.as_path()),
    })
}

/// A bind mount the node ledger holds: what is bound, where, and for which volume.
#[derive(Debug)]
pub struct RecordedBind<'a> {
    pub source: PathBuf,
    pub path: &'a Path,
    pub volume: &'a str,
}

/// The binds the ledger holds for `records`: each staging path (a bind of the volume's
/// directory, `data_of`; `None` skips the record) and each target (a bind of its staging
/// path), a volume's staging paths before its targets, which are bound from them.
pub fn recorded_binds<'a>(
    records: &'a [VolumeRecord],
    data_of: impl Fn(&super::VolumeId) -> Option<PathBuf>,
) -> Vec<RecordedBind<'a>> {
    let mut binds = Vec::new();
    for record in records {
        let Some(data) = super::VolumeId::parse(&record.volume_id)
            .ok()
            .and_then(|id| data_of(&id))
        else {
            continue;
        };
        let volume = record.volume_id.as_str();
        for staged in &record.staged {
            let (source, path) = (data.clone(), staged.path.as_path());
            binds.push(RecordedBind {
                source,
                path,
                volume,
            });
        }
        for published in &record.published {
            if let Some(staging) = &published.staging {
                binds.push(RecordedBind {
                    source: staging.clone(),
                    path: &published.target,
                    volume,
                });
            }
        }
    }
    binds
}

/// Binds again each of `binds` that `stale` picks ([`replace`]), logging each outcome: a
/// failure is retried by the next call or check.
pub fn rebind_stale(
    ctx: &NodeContext,
    table: &[MountEntry],
    binds: &[RecordedBind],
    stale: impl Fn(&Path) -> bool,
) {
    for bind in binds.iter().filter(|b| stale(b.path)) {
        let (volume, path) = (bind.volume, bind.path.display());
        match replace(ctx, table, &bind.source, bind.path) {
            Ok(()) => tracing::info!(volume, %path, "re-bound to the file system's new mount"),
            Err(e) => {
                tracing::warn!(volume, %path, error = %e, "re-binding failed; the next check retries")
            }
        }
    }
}

/// Detaches the stale mounts at `path` (whose filesystem no longer answers: a dead FUSE
/// process, a restarted NFS server) and binds `source` there with the flags the top one had.
pub fn replace(
    ctx: &NodeContext,
    table: &[MountEntry],
    source: &Path,
    path: &Path,
) -> std::result::Result<(), String> {
    let stack = mountinfo::at(table, path);
    let flags = stack.last().map(|top| flags_of(top)).unwrap_or_default();
    for _ in &stack {
        crate::mount::health::detach(path).map_err(|e| e.to_string())?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        _ => return Err(format!("{} is no longer a directory", path.display())),
    }
    ctx.mounter.bind(source, path).map_err(|e| e.to_string())?;
    if !flags.is_plain() {
        ctx.mounter
            .remount(path, flags)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The per-mount flags a mount-table entry shows.
fn flags_of(entry: &MountEntry) -> MountFlags {
    let has = |flag: &str| entry.options.iter().any(|o| o == flag);
    MountFlags {
        read_only: has("ro"),
        nosuid: has("nosuid"),
        nodev: has("nodev"),
        noexec: has("noexec"),
        atime: if has("noatime") {
            Atime::NoAtime
        } else {
            Atime::Inherit
        },
    }
}
