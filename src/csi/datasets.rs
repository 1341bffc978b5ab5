//! Dataset volumes on the node: CSI ephemeral inline volumes (`volumeAttributes: {dataset:
//! REF}`), mounted from the node cache at publish time, and the staging of persistent volumes
//! created with a dataset.
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

use sha2::{Digest, Sha256};
use tonic::Status;

use super::caps;
use super::guard::Guard;
use super::node::{NodeService, apply_mount_group, publish_flags};
use super::status::code;
use crate::cache::Cache;
use crate::dataset::pin::Pin;
use crate::dataset::scan::hex;
use crate::mount::ledger::{InlineDataset, Publication, VolumeRecord};
use crate::mount::safe::{Pinned, RequestPath};
use crate::mount::{MountEntry, MountFlags, Origin, Overlay, mountinfo, upper_of};
use crate::proto::{
    NodeGetVolumeStatsResponse, NodePublishVolumeRequest, VolumeCapability, VolumeCondition,
};
use crate::text::Shown;

/// The volume attribute that names the dataset.
pub const DATASET_KEY: &str = "dataset";
/// Set by kubelet on the publish of an ephemeral inline volume.
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

impl From<crate::cache::Error> for Status {
    fn from(err: crate::cache::Error) -> Status {
        Status::new(code(err.kind), err.message)
    }
}

/// True when a publish request is for an ephemeral inline dataset volume.
pub fn is_ephemeral(req: &NodePublishVolumeRequest) -> bool {
    req.volume_context.get(EPHEMERAL_KEY).map(String::as_str) == Some("true")
        || (req.staging_target_path.is_empty() && req.volume_context.contains_key(DATASET_KEY))
}

/// The directory name of an ephemeral volume: its ID when that is a safe name, else a hash.
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
fn dataset_attribute(context: &HashMap<String, String>) -> Result<&str, Status> {
    if let Some(unknown) = context
        .keys()
        .find(|k| *k != DATASET_KEY && !k.starts_with("csi.storage.k8s.io/"))
    {
        return Err(Status::invalid_argument(format!(
            "volume attribute {} is not supported; an inline Lanes volume takes \
             `dataset: [bucket/]name[:version|:tag]` or `dataset: git+URL[@ref]`",
            Shown(unknown)
        )));
    }
    match context.get(DATASET_KEY) {
        Some(reference) if !reference.is_empty() => Ok(reference),
        _ => Err(Status::invalid_argument(
            "an inline Lanes volume needs volumeAttributes.dataset (the dataset to mount)",
        )),
    }
}

impl NodeService {
    fn cache(&self) -> Result<&std::sync::Arc<Cache>, Status> {
        self.0.cache.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this plugin does not serve the node role; no dataset cache",
            )
        })
    }

    fn ephemeral_dir(&self, volume_id: &str) -> PathBuf {
        self.0
            .data_dir
            .join("ephemeral")
            .join(volume_dir(volume_id))
    }

    /// True when `entry` is a dataset mount this plugin made for the volume at `dir`: a bind
    /// of something in the cache (a tree, or a tree set aside as damaged while mounted) or an
    /// overlay whose upper layer is the volume's.
    fn is_dataset_mount(&self, cache_origin: &Origin, dir: &Path, entry: &MountEntry) -> bool {
        upper_of(entry) == Some(dir.join("upper").as_path())
            || (entry.fs_type != "overlay"
                && cache_origin.device == Some((entry.major, entry.minor))
                && entry.root.starts_with(&cache_origin.root))
    }

    /// The mount-table entries at or above `paths` and the cache, and where the cache lies.
    async fn dataset_table(
        &self,
        mut paths: Vec<PathBuf>,
        cache: &Cache,
    ) -> Result<(Vec<MountEntry>, Origin), Status> {
        let cache_root = cache.root().to_owned();
        paths.push(cache_root.clone());
        let table = self.table(paths).await?;
        let origin = Origin::of(&table, &cache_root);
        Ok((table, origin))
    }

    /// NodePublishVolume of an ephemeral dataset volume.
    pub(super) async fn publish_dataset(
        &self,
        req: &NodePublishVolumeRequest,
        target: &RequestPath,
        capability: &VolumeCapability,
        access: &caps::Access,
    ) -> Result<(), Status> {
        let reference = dataset_attribute(&req.volume_context)?;
        let flags = MountFlags {
            nosuid: true,
            nodev: true,
            ..publish_flags(access, req.readonly)
        };
        let cache = self.cache()?.clone();
        let _guard = self.0.guard(&req.volume_id)?;
        let mut record = self.0.ledger.load(&req.volume_id)?;
        let inline = self.inline_dataset(&mut record, reference, &cache).await?;
        let pin = Pin::parse(&inline.pin).map_err(|e| {
            Status::internal(format!("the node ledger records an unusable dataset: {e}"))
        })?;
        let dir = self.ephemeral_dir(&req.volume_id);
        let mut paths = vec![target.as_path().to_owned()];
        paths.extend(record.published.iter().map(|p| p.target.clone()));
        let (table, cache_origin) = self.dataset_table(paths, &cache).await?;
        let ours = |entry: &MountEntry| self.is_dataset_mount(&cache_origin, &dir, entry);
        let live = |path: &Path| mountinfo::at(&table, path).into_iter().any(ours);
        let publication = Publication {
            target: target.as_path().to_owned(),
            staging: None,
            asked: caps::asked(capability, access, req.readonly),
            writer: !flags.read_only,
            created_target: false,
        };
        self.admit(&mut record, publication, target, live)?;
        let (target_dir, _) = target.make_dir()?;
        self.0.failpoint.hit("publish.after-mkdir");

        if let Some(top) = mountinfo::at(&table, target.as_path()).last() {
            if !ours(top) {
                return Err(Status::already_exists(format!(
                    "target_path {} already has another mount ({} from {})",
                    Shown(&req.target_path),
                    Shown(&top.fs_type),
                    Shown(&top.source)
                )));
            }
            if flags.satisfied_by(top) {
                return Ok(());
            }
            return self.remount(target, flags).await;
        }

        let tree = cache
            .tree(&pin, cache.settings().publish_timeout)
            .await
            .map_err(|e| {
                Status::new(
                    code(e.kind),
                    format!("dataset {}: {}", Shown(reference), e.message),
                )
            })?;
        if flags.read_only {
            self.mount_op("bind mount", target.as_path(), move |m| {
                m.bind(&tree, &target_dir.proc_path())
            })
            .await?;
            self.0.failpoint.hit("publish.after-bind");
            return self.remount(target, flags).await;
        }
        let layers = Overlay {
            lower: tree.clone(),
            upper: dir.join("upper"),
            work: dir.join("work"),
        };
        for layer in [&layers.upper, &layers.work] {
            std::fs::create_dir_all(layer)
                .map_err(|e| Status::internal(format!("create {}: {e}", layer.display())))?;
        }
        if let Ok(meta) = std::fs::metadata(&tree) {
            let _ = std::fs::set_permissions(&layers.upper, meta.permissions());
        }
        if let Some(gid) = access.mount_group {
            apply_mount_group(&layers.upper, gid)?;
        }
        self.mount_op("overlay mount", target.as_path(), move |m| {
            m.overlay(&layers, &target_dir.proc_path(), flags)
        })
        .await
    }

    /// The volume's dataset: the pin chosen by an earlier attempt, or the reference resolved
    /// now and recorded before anything is mounted.
    async fn inline_dataset(
        &self,
        record: &mut VolumeRecord,
        reference: &str,
        cache: &Cache,
    ) -> Result<InlineDataset, Status> {
        if let Some(inline) = &record.dataset {
            if inline.reference != reference {
                return Err(Status::already_exists(format!(
                    "volume is already published with dataset {}, not {}",
                    Shown(&inline.reference),
                    Shown(reference)
                )));
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
                return Err(Status::new(
                    code(e.kind()),
                    format!("dataset {}: {e}", Shown(reference)),
                ));
            }
            Err(_) => {
                return Err(Status::unavailable(format!(
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
        self.0.ledger.store(record)?;
        Ok(inline)
    }

    /// NodeUnpublishVolume of an ephemeral dataset volume: unmounts what this volume
    /// published at `target`, removes the target, and removes the volume's own directory and
    /// record once no publication of it remains and no mount uses its upper layer. A target
    /// this volume never published is left untouched.
    pub(super) async fn unpublish_dataset(
        &self,
        mut record: VolumeRecord,
        target: &RequestPath,
        guard: Guard,
    ) -> Result<(), Status> {
        let cache = self.cache()?.clone();
        let dir = self.ephemeral_dir(&record.volume_id);
        if record.publication(target.as_path()).is_some() {
            let (table, cache_origin) = self
                .dataset_table(vec![target.as_path().to_owned()], &cache)
                .await?;
            let what = format!("dataset volume {}", Shown(&record.volume_id));
            self.unmount_ours(&what, target, &table, |e| {
                self.is_dataset_mount(&cache_origin, &dir, e)
            })
            .await?;
            self.0.failpoint.hit("unpublish.after-unmount");
            self.release_target(&mut record, target)?;
        }
        if record.published.is_empty() {
            self.forget_inline(&record, &dir, guard).await?;
        }
        let sweep = cache.clone();
        let _ = tokio::task::spawn_blocking(move || sweep.sweep_set_aside()).await;
        Ok(())
    }

    /// Removes an inline volume's directory and record once no mount uses its upper layer.
    async fn forget_inline(
        &self,
        record: &VolumeRecord,
        dir: &Path,
        guard: Guard,
    ) -> Result<(), Status> {
        let upper = dir.join("upper");
        let probe = upper.clone();
        let in_use = self
            .mount_op("read mount table", &upper, move |m| m.binds_of(&probe))
            .await?
            .iter()
            .any(|e| upper_of(e) == Some(upper.as_path()));
        if in_use {
            tracing::warn!(volume.id = %Shown(&record.volume_id), "an overlay still uses the volume's upper layer; keeping it");
            return Ok(());
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(Status::internal(format!("remove {}: {e}", dir.display())));
            }
            _ => {}
        }
        self.0.ledger.remove(&record.volume_id)?;
        guard.retire();
        Ok(())
    }

    /// NodeGetVolumeStats of an inline volume published at `path`.
    pub(super) async fn dataset_stats(
        &self,
        record: &VolumeRecord,
        path: &RequestPath,
    ) -> Result<NodeGetVolumeStatsResponse, Status> {
        let cache = self.cache()?.clone();
        let dir = self.ephemeral_dir(&record.volume_id);
        let (table, cache_origin) = self
            .dataset_table(vec![path.as_path().to_owned()], &cache)
            .await?;
        let mounted = record.publication(path.as_path()).is_some()
            && mountinfo::at(&table, path.as_path())
                .into_iter()
                .any(|e| self.is_dataset_mount(&cache_origin, &dir, e));
        if !mounted {
            return Err(Status::not_found(format!(
                "dataset volume {} is not mounted at {}",
                Shown(&record.volume_id),
                Shown(&path.as_path().to_string_lossy())
            )));
        }
        Ok(NodeGetVolumeStatsResponse {
            usage: self.usage(path).await?,
            volume_condition: Some(VolumeCondition {
                abnormal: false,
                message: "dataset volume is mounted from the node cache".into(),
            }),
        })
    }

    /// NodeStageVolume of a persistent volume created with a dataset: an overlay at the
    /// staging path whose lower layer is the pinned version's cached tree and whose upper
    /// layer is the volume's own data directory (so its changes persist with the volume).
    pub(super) async fn stage_dataset(
        &self,
        pin: &str,
        data: &Path,
        staging: &RequestPath,
        staging_dir: Pinned,
    ) -> Result<(), Status> {
        let pin = Pin::parse(pin).map_err(|e| {
            Status::internal(format!("the volume records an unusable dataset: {e}"))
        })?;
        let cache = self.cache()?.clone();
        let tree = cache
            .tree(&pin, cache.settings().publish_timeout)
            .await
            .map_err(|e| Status::new(code(e.kind), format!("dataset {pin}: {}", e.message)))?;
        let work = data.with_file_name("work");
        std::fs::create_dir_all(&work)
            .map_err(|e| Status::internal(format!("create {}: {e}", work.display())))?;
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
        self.mount_op("overlay mount", staging.as_path(), move |m| {
            m.overlay(&layers, &staging_dir.proc_path(), flags)
        })
        .await?;
        self.0.failpoint.hit("stage.after-bind");
        Ok(())
    }
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
        assert!(
            unknown.message().contains("\"sise\""),
            "{}",
            unknown.message()
        );
        assert!(dataset_attribute(&context(&[])).is_err());
        assert!(dataset_attribute(&context(&[("dataset", "")])).is_err());
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
