//! The dataset lane: CSI ephemeral inline volumes (`volumeAttributes: {dataset: REF}`),
//! mounted from the node cache at publish time, and the staging of persistent volumes made
//! with a dataset ([`stage_overlay`]).
//!
//! Read-only volumes are a read-only bind of the cached tree; writable ones an overlay whose
//! lower layer is the tree and whose upper layer is the volume's own directory under
//! `<data-dir>/ephemeral/<volume>/`, so writes stay private to the volume and cost nothing up
//! front. Rules: the reference is resolved once and pinned in the node ledger before anything
//! is mounted, so every retry mounts the same version; a publish waits at most
//! `cache.publish_timeout_seconds` and otherwise answers UNAVAILABLE with the download's
//! progress; dataset mounts are always `nosuid,nodev`; a volume's own directory goes only when
//! none of its publications remains and no mount uses its upper layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::capability::{Access, Capability};
use super::ledger::{InlineDataset, Publication, VolumeRecord};
use super::node::{
    NodeContext, NodeError, NodeLane, Publish, Result, Stage, Stats, Unpublished, apply_mount_group,
};
use crate::cache::Cache;
use crate::dataset::pin::Pin;
use crate::dataset::scan::hex;
use crate::mount::safe::{Pinned, RequestPath};
use crate::mount::{MountEntry, MountFlags, Origin, Overlay, mountinfo, upper_of};
use crate::text::Shown;

/// The lane's name.
pub const LANE: &str = "dataset";
/// The volume attribute that names the dataset.
pub const DATASET_KEY: &str = "dataset";
/// Set by kubelet on the publish of an ephemeral inline volume.
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// True when a publish with this volume context (and no staging path when `unstaged`) is
/// for an ephemeral inline dataset volume.
pub fn is_inline(context: &HashMap<String, String>, unstaged: bool) -> bool {
    context.get(EPHEMERAL_KEY).map(String::as_str) == Some("true")
        || (unstaged && context.contains_key(DATASET_KEY))
}

/// The directory name of an inline volume: its ID when that is a safe name, else a hash.
fn volume_dir(volume_id: &str) -> String {
    let safe = !volume_id.is_empty()
        && volume_id.len() <= 128
        && !volume_id.starts_with('.')
        && volume_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if safe {
        volume_id.to_owned()
    } else {
        format!("_{}", &hex(&Sha256::digest(volume_id.as_bytes()))[..40])
    }
}

/// Checks the attributes of an inline volume: `dataset` is required; the only others allowed
/// are the `csi.storage.k8s.io/` ones kubelet adds.
fn dataset_attribute(context: &HashMap<String, String>) -> Result<&str> {
    if let Some(unknown) = context
        .keys()
        .find(|k| *k != DATASET_KEY && !k.starts_with("csi.storage.k8s.io/"))
    {
        return Err(NodeError::Invalid(format!(
            "volume attribute {} is not supported; an inline Lanes volume takes \
             `dataset: [bucket/]name[:version|:tag]` or `dataset: git+URL[@ref]`",
            Shown(unknown)
        )));
    }
    match context.get(DATASET_KEY) {
        Some(reference) if !reference.is_empty() => Ok(reference),
        _ => Err(NodeError::Invalid(
            "an inline Lanes volume needs volumeAttributes.dataset (the dataset to mount)".into(),
        )),
    }
}

fn show(path: &Path) -> String {
    Shown(&path.to_string_lossy()).to_string()
}

/// True when `entry` is a dataset mount made for the volume whose own directory is `dir`: a
/// bind of something in the cache (a tree, or a tree set aside as damaged while mounted) or an
/// overlay whose upper layer is the volume's.
fn is_dataset_mount(cache_origin: &Origin, dir: &Path, entry: &MountEntry) -> bool {
    upper_of(entry) == Some(dir.join("upper").as_path())
        || (entry.fs_type != "overlay"
            && cache_origin.device == Some((entry.major, entry.minor))
            && entry.root.starts_with(&cache_origin.root))
}

/// The dataset lane on this node.
#[derive(Debug)]
pub struct DatasetNode {
    ctx: Arc<NodeContext>,
}

impl DatasetNode {
    pub fn new(ctx: Arc<NodeContext>) -> DatasetNode {
        DatasetNode { ctx }
    }

    fn volume_dir(&self, volume_id: &str) -> PathBuf {
        self.ctx
            .data_dir
            .join("ephemeral")
            .join(volume_dir(volume_id))
    }

    /// The mount-table entries at or above `paths` and the cache, and where the cache lies.
    async fn table(
        &self,
        mut paths: Vec<PathBuf>,
        cache: &Cache,
    ) -> Result<(Vec<MountEntry>, Origin)> {
        let cache_root = cache.root().to_owned();
        paths.push(cache_root.clone());
        let table = self.ctx.table(paths).await?;
        let origin = Origin::of(&table, &cache_root);
        Ok((table, origin))
    }

    /// The volume's dataset: the pin chosen by an earlier attempt, or the reference resolved
    /// now and recorded before anything is mounted.
    async fn pinned(
        &self,
        record: &mut VolumeRecord,
        reference: &str,
        cache: &Cache,
    ) -> Result<InlineDataset> {
        if let Some(inline) = &record.dataset {
            if inline.reference != reference {
                return Err(NodeError::DatasetChanged {
                    volume: Shown(&record.volume_id).to_string(),
                    was: Shown(&inline.reference).to_string(),
                    asked: Shown(reference).to_string(),
                });
            }
            return Ok(inline.clone());
        }
        let wait = cache.settings().publish_timeout;
        let resolved = async {
            match cache.cached_pin(reference) {
                Some(pin) => Ok(pin),
                None => cache.sources().pin_for_volume(reference).await,
            }
        };
        let pin = match tokio::time::timeout(wait, resolved).await {
            Ok(Ok(pin)) => pin,
            Ok(Err(e)) => {
                return Err(crate::cache::Error::new(
                    e.kind(),
                    format!("dataset {}: {e}", Shown(reference)),
                )
                .into());
            }
            Err(_) => {
                return Err(NodeError::Unavailable(format!(
                    "dataset {}: the bucket did not answer within {}s; retry",
                    Shown(reference),
                    wait.as_secs()
                )));
            }
        };
        let inline = InlineDataset {
            reference: reference.to_owned(),
            pin: pin.to_string(),
        };
        record.dataset = Some(inline.clone());
        self.ctx.ledger.store(record)?;
        Ok(inline)
    }

    /// Removes an inline volume's directory and record once no mount uses its upper layer.
    async fn forget(&self, record: &VolumeRecord, dir: &Path) -> Result<Unpublished> {
        let upper = dir.join("upper");
        let probe = upper.clone();
        let in_use = self
            .ctx
            .mount_op("read mount table", &upper, move |m| m.binds_of(&probe))
            .await?
            .iter()
            .any(|e| upper_of(e) == Some(upper.as_path()));
        if in_use {
            tracing::warn!(volume.id = %Shown(&record.volume_id), "an overlay still uses the volume's upper layer; keeping it");
            return Ok(Unpublished::Kept);
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(NodeError::Internal(format!(
                    "remove {}: {e}",
                    dir.display()
                )));
            }
            _ => {}
        }
        self.ctx.ledger.remove(&record.volume_id)?;
        Ok(Unpublished::Forgotten)
    }
}

#[async_trait::async_trait]
impl NodeLane for DatasetNode {
    fn kind(&self) -> &'static str {
        LANE
    }

    fn access(&self, capability: &Capability) -> std::result::Result<Access, String> {
        super::local::access::access(capability)
    }

    async fn stage(&self, _request: Stage<'_>) -> Result<()> {
        Err(NodeError::Invalid(
            "an inline dataset volume is not staged; it is published directly".into(),
        ))
    }

    async fn unstage(&self, _volume_id: &str, _staging: &RequestPath) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, request: Publish<'_>) -> Result<()> {
        let reference = dataset_attribute(request.context)?;
        let access = self
            .access(request.capability)
            .map_err(NodeError::Invalid)?;
        let flags = MountFlags {
            nosuid: true,
            nodev: true,
            ..access.publish_flags(request.readonly)
        };
        let target = request.target;
        let cache = self.ctx.cache()?.clone();
        let mut record = self.ctx.ledger.load(request.volume_id)?;
        let inline = self.pinned(&mut record, reference, &cache).await?;
        let pin = Pin::parse(&inline.pin).map_err(|e| {
            NodeError::Internal(format!("the node ledger records an unusable dataset: {e}"))
        })?;
        let dir = self.volume_dir(request.volume_id);
        let mut paths = vec![target.as_path().to_owned()];
        paths.extend(record.published.iter().map(|p| p.target.clone()));
        let (table, cache_origin) = self.table(paths, &cache).await?;
        let ours = |entry: &MountEntry| is_dataset_mount(&cache_origin, &dir, entry);
        let live = |path: &Path| mountinfo::at(&table, path).into_iter().any(ours);
        let publication = Publication {
            target: target.as_path().to_owned(),
            staging: None,
            asked: request.capability.asked(request.readonly),
            writer: !flags.read_only,
            created_target: false,
        };
        self.ctx.admit(&mut record, publication, target, live)?;
        let (target_dir, _) = target.make_dir()?;
        self.ctx.failpoint.hit("publish.after-mkdir");

        if let Some(top) = mountinfo::at(&table, target.as_path()).last() {
            if !ours(top) {
                return Err(NodeError::Occupied {
                    path: show(target.as_path()),
                    fs_type: Shown(&top.fs_type).to_string(),
                    mounted: Shown(&top.source).to_string(),
                });
            }
            if flags.satisfied_by(top) {
                return Ok(());
            }
            return self.ctx.remount(target, flags).await;
        }

        let tree = cache
            .tree(&pin, cache.settings().publish_timeout)
            .await
            .map_err(|e| {
                crate::cache::Error::new(
                    e.kind,
                    format!("dataset {}: {}", Shown(reference), e.message),
                )
            })?;
        if flags.read_only {
            self.ctx
                .mount_op("bind mount", target.as_path(), move |m| {
                    m.bind(&tree, &target_dir.proc_path())
                })
                .await?;
            self.ctx.failpoint.hit("publish.after-bind");
            return self.ctx.remount(target, flags).await;
        }
        let layers = Overlay {
            lower: tree.clone(),
            upper: dir.join("upper"),
            work: dir.join("work"),
        };
        for layer in [&layers.upper, &layers.work] {
            std::fs::create_dir_all(layer)
                .map_err(|e| NodeError::Internal(format!("create {}: {e}", layer.display())))?;
        }
        if let Ok(meta) = std::fs::metadata(&tree) {
            let _ = std::fs::set_permissions(&layers.upper, meta.permissions());
        }
        if let Some(gid) = access.mount_group {
            apply_mount_group(&layers.upper, gid)?;
        }
        self.ctx
            .mount_op("overlay mount", target.as_path(), move |m| {
                m.overlay(&layers, &target_dir.proc_path(), flags)
            })
            .await
    }

    async fn unpublish(
        &self,
        mut record: VolumeRecord,
        target: &RequestPath,
    ) -> Result<Unpublished> {
        let cache = self.ctx.cache()?.clone();
        let dir = self.volume_dir(&record.volume_id);
        if record.publication(target.as_path()).is_some() {
            let (table, cache_origin) = self
                .table(vec![target.as_path().to_owned()], &cache)
                .await?;
            let what = format!("dataset volume {}", Shown(&record.volume_id));
            self.ctx
                .unmount_ours(&what, target, &table, |e| {
                    is_dataset_mount(&cache_origin, &dir, e)
                })
                .await?;
            self.ctx.failpoint.hit("unpublish.after-unmount");
            self.ctx.release_target(&mut record, target)?;
        }
        let outcome = if record.published.is_empty() {
            self.forget(&record, &dir).await?
        } else {
            Unpublished::Kept
        };
        let _ = tokio::task::spawn_blocking(move || cache.sweep_set_aside()).await;
        Ok(outcome)
    }

    async fn stats(&self, record: &VolumeRecord, path: &RequestPath) -> Result<Stats> {
        let cache = self.ctx.cache()?.clone();
        let dir = self.volume_dir(&record.volume_id);
        let (table, cache_origin) = self.table(vec![path.as_path().to_owned()], &cache).await?;
        let mounted = record.publication(path.as_path()).is_some()
            && mountinfo::at(&table, path.as_path())
                .into_iter()
                .any(|e| is_dataset_mount(&cache_origin, &dir, e));
        if !mounted {
            return Err(NodeError::NotMounted {
                volume: format!("(dataset volume) {}", Shown(&record.volume_id)),
                path: show(path.as_path()),
            });
        }
        Ok(Stats {
            usage: self.ctx.usage(path).await?,
            abnormal: None,
            message: "dataset volume is mounted from the node cache".into(),
        })
    }

    async fn expand(&self, volume_id: &str, _path: &RequestPath) -> Result<u64> {
        Err(NodeError::Invalid(format!(
            "{} is an inline dataset volume; it has no capacity to expand",
            Shown(volume_id)
        )))
    }
}

/// NodeStageVolume of a persistent volume made with a dataset: an overlay at the staging path
/// whose lower layer is the pinned version's cached tree and whose upper layer is the
/// volume's own data directory (so its changes persist with the volume).
pub async fn stage_overlay(
    ctx: &NodeContext,
    pin: &str,
    data: &Path,
    staging: &RequestPath,
    staging_dir: Pinned,
) -> Result<()> {
    let pin = Pin::parse(pin)
        .map_err(|e| NodeError::Internal(format!("the volume records an unusable dataset: {e}")))?;
    let cache = ctx.cache()?.clone();
    let tree = cache
        .tree(&pin, cache.settings().publish_timeout)
        .await
        .map_err(|e| crate::cache::Error::new(e.kind, format!("dataset {pin}: {}", e.message)))?;
    let work = data.with_file_name("work");
    std::fs::create_dir_all(&work)
        .map_err(|e| NodeError::Internal(format!("create {}: {e}", work.display())))?;
    let layers = Overlay {
        lower: tree,
        upper: data.to_owned(),
        work,
    };
    let flags = MountFlags {
        nosuid: true,
        nodev: true,
        ..Default::default()
    };
    ctx.mount_op("overlay mount", staging.as_path(), move |m| {
        m.overlay(&layers, &staging_dir.proc_path(), flags)
    })
    .await?;
    ctx.failpoint.hit("stage.after-bind");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_attributes_need_a_dataset_and_nothing_unknown() {
        let context = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let ok = context(&[
            ("dataset", "prod/imagenet:v3"),
            ("csi.storage.k8s.io/pod.name", "p"),
        ]);
        assert_eq!(dataset_attribute(&ok).unwrap(), "prod/imagenet:v3");
        let unknown = dataset_attribute(&context(&[("dataset", "a"), ("sise", "1")])).unwrap_err();
        assert!(unknown.to_string().contains("\"sise\""), "{unknown}");
        assert!(dataset_attribute(&context(&[])).is_err());
        assert!(dataset_attribute(&context(&[("dataset", "")])).is_err());
        assert!(is_inline(
            &context(&[("csi.storage.k8s.io/ephemeral", "true")]),
            false
        ));
        assert!(is_inline(&context(&[("dataset", "a")]), true));
        assert!(!is_inline(&context(&[("dataset", "a")]), false));
    }

    #[test]
    fn volume_dirs_are_safe_names() {
        assert_eq!(volume_dir("csi-0a1b"), "csi-0a1b");
        for unsafe_id in ["../x", ".hidden", "a/b", ""] {
            let dir = volume_dir(unsafe_id);
            assert!(
                dir.starts_with('_') && dir.len() == 41,
                "{unsafe_id:?} -> {dir}"
            );
        }
    }
}
