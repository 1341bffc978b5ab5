//! Dataset volumes on the node: CSI ephemeral inline volumes (`volumeAttributes: {dataset:
//! REF}`), mounted from the node cache at publish time.
//!
//! Read-only volumes are a read-only bind of the cached tree; writable ones an overlay whose
//! lower layer is the tree and whose upper layer is the volume's own directory under
//! `<data-dir>/ephemeral/<volume>/`, so writes stay private to the volume and cost nothing up
//! front. Rules: the reference is resolved once and pinned in the volume's record, so every
//! retry mounts the same version; a publish waits at most `cache.publish_timeout_seconds`
//! and otherwise answers UNAVAILABLE with the download's progress; dataset mounts are always
//! `nosuid,nodev`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

use super::caps;
use super::node::{NodeService, apply_mount_group, prepare_target, remove_target};
use super::status::{code, missing};
use crate::cache::Cache;
use crate::dataset::pin::Pin;
use crate::dataset::scan::hex;
use crate::mount::{MountEntry, MountFlags, Origin, Overlay, mountinfo, upper_of};
use crate::proto::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};

/// The volume attribute that names the dataset.
pub const DATASET_KEY: &str = "dataset";
/// Set by kubelet on the publish of an ephemeral inline volume.
const EPHEMERAL_KEY: &str = "csi.storage.k8s.io/ephemeral";

/// What an ephemeral volume is, recorded before anything is mounted.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    reference: String,
    pin: Pin,
}

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
            "volume attribute {unknown:?} is not supported; an inline Lanes volume takes \
             `dataset: [bucket/]name[:version|:tag]` or `dataset: git+URL[@ref]`"
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
    /// of a cached tree or an overlay whose upper layer is the volume's.
    fn is_dataset_mount(&self, cache_origin: &Origin, dir: &Path, entry: &MountEntry) -> bool {
        upper_of(entry) == Some(dir.join("upper").as_path())
            || (cache_origin.device == Some((entry.major, entry.minor))
                && entry.root.starts_with(cache_origin.root.join("trees")))
    }

    /// The mount-table entries at or above `target` and the cache, and where the cache lies.
    async fn dataset_table(
        &self,
        target: &Path,
        cache: &Cache,
    ) -> Result<(Vec<MountEntry>, Origin), Status> {
        let cache_root = cache.root().to_owned();
        let (probe_target, probe_cache) = (target.to_owned(), cache_root.clone());
        let table = self
            .mount_op("read mount table", target, move |m| {
                m.table_for(&[&probe_target, &probe_cache])
            })
            .await?;
        let origin = Origin::of(&table, &cache_root);
        Ok((table, origin))
    }

    /// NodePublishVolume of an ephemeral dataset volume.
    pub(super) async fn publish_dataset(
        &self,
        req: &NodePublishVolumeRequest,
    ) -> Result<(), Status> {
        let reference = dataset_attribute(&req.volume_context)?;
        let capability = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| missing("volume_capability"))?;
        let access = caps::check(capability).map_err(Status::invalid_argument)?;
        let flags = MountFlags {
            read_only: req.readonly || access.read_only,
            nosuid: true,
            nodev: true,
            ..access.flags
        };
        let cache = self.cache()?.clone();
        let dir = self.ephemeral_dir(&req.volume_id);
        let target = PathBuf::from(&req.target_path);
        let _guard = self.guard_key(&format!("{}@{}", req.volume_id, target.display()))?;
        let record = self.dataset_record(&dir, reference, &cache).await?;
        let target = prepare_target(&target, &self.0.failpoint)?;

        let (table, cache_origin) = self.dataset_table(&target, &cache).await?;
        if let Some(top) = mountinfo::at(&table, &target).last() {
            if !self.is_dataset_mount(&cache_origin, &dir, top) {
                return Err(Status::already_exists(format!(
                    "target_path {} already has another mount ({} from {})",
                    target.display(),
                    top.fs_type,
                    top.source
                )));
            }
            if flags.satisfied_by(top) {
                return Ok(());
            }
            let path = target.clone();
            return self
                .mount_op("remount", &target, move |m| m.remount(&path, flags))
                .await;
        }

        let tree = cache
            .tree(&record.pin, cache.settings().publish_timeout)
            .await
            .map_err(|e| {
                Status::new(code(e.kind), format!("dataset {reference}: {}", e.message))
            })?;
        if flags.read_only {
            let (source, path) = (tree.clone(), target.clone());
            self.mount_op("bind mount", &target, move |m| m.bind(&source, &path))
                .await?;
            self.0.failpoint.hit("publish.after-bind");
            let path = target.clone();
            return self
                .mount_op("remount", &target, move |m| m.remount(&path, flags))
                .await;
        }
        let layers = Overlay {
            lower: tree.clone(),
            upper: dir.join("upper"),
            work: dir.join("work"),
        };
        for layer in [&layers.upper, &layers.work] {
            crate::copy::file::real_dir(layer)
                .map_err(|e| Status::internal(format!("create {}: {e}", layer.display())))?;
        }
        let tree_mode = std::fs::metadata(&tree).map(|m| m.permissions());
        if let Ok(mode) = tree_mode {
            let _ = std::fs::set_permissions(&layers.upper, mode);
        }
        if let Some(gid) = access.mount_group {
            apply_mount_group(&layers.upper, gid)?;
        }
        let path = target.clone();
        self.mount_op("overlay mount", &target, move |m| {
            m.overlay(&layers, &path, flags)
        })
        .await
    }

    /// The volume's record: the pin chosen by an earlier attempt, or the reference resolved
    /// now and recorded before anything is mounted.
    async fn dataset_record(
        &self,
        dir: &Path,
        reference: &str,
        cache: &Cache,
    ) -> Result<Record, Status> {
        let path = dir.join("volume.json");
        if let Ok(text) = std::fs::read(&path)
            && let Ok(record) = serde_json::from_slice::<Record>(&text)
        {
            if record.reference != reference {
                return Err(Status::already_exists(format!(
                    "volume is already published with dataset {:?}, not {reference:?}",
                    record.reference
                )));
            }
            return Ok(record);
        }
        let wait = cache.settings().publish_timeout;
        let resolved = async {
            match cache.cached_pin(reference) {
                Some(pin) => Ok(pin),
                None => cache.sources().pin(reference).await,
            }
        };
        let pin = match tokio::time::timeout(wait, resolved).await {
            Ok(Ok(pin)) => pin,
            Ok(Err(e)) => {
                return Err(Status::new(
                    code(e.kind()),
                    format!("dataset {reference}: {e}"),
                ));
            }
            Err(_) => {
                return Err(Status::unavailable(format!(
                    "dataset {reference}: the bucket did not answer within {}s; retry",
                    wait.as_secs()
                )));
            }
        };
        let record = Record {
            reference: reference.to_owned(),
            pin,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| Status::internal(format!("create {}: {e}", dir.display())))?;
        let text = serde_json::to_vec(&record).map_err(|e| Status::internal(e.to_string()))?;
        let temp = dir.join(".volume.json.tmp");
        std::fs::write(&temp, text)
            .and_then(|()| std::fs::rename(&temp, &path))
            .map_err(|e| Status::internal(format!("record {}: {e}", path.display())))?;
        Ok(record)
    }

    /// NodeUnpublishVolume of an ephemeral dataset volume (or of an unknown ID with nothing
    /// of ours mounted): unmounts, then removes the volume's own directories and the target.
    pub(super) async fn unpublish_dataset(
        &self,
        req: &NodeUnpublishVolumeRequest,
    ) -> Result<(), Status> {
        let dir = self.ephemeral_dir(&req.volume_id);
        let Ok(target) = Path::new(&req.target_path).canonicalize() else {
            remove_volume_dir(&dir)?;
            return Ok(());
        };
        let _guard = self.guard_key(&format!("{}@{}", req.volume_id, target.display()))?;
        let (table, cache_origin) = self.dataset_table(&target, self.cache()?).await?;
        let what = format!("dataset volume {}", req.volume_id);
        self.unmount_ours(&what, &target, &table, |e| {
            self.is_dataset_mount(&cache_origin, &dir, e)
        })
        .await?;
        self.0.failpoint.hit("unpublish.after-unmount");
        remove_volume_dir(&dir)?;
        remove_target(&target)
    }

    /// NodeStageVolume of a persistent volume created with a dataset: an overlay at the
    /// staging path whose lower layer is the pinned version's cached tree and whose upper
    /// layer is the volume's own data directory (so its changes persist with the volume).
    pub(super) async fn stage_dataset(
        &self,
        pin: &str,
        data: &Path,
        staging: &Path,
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
        crate::copy::file::real_dir(&work)
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
        let path = staging.to_owned();
        self.mount_op("overlay mount", staging, move |m| {
            m.overlay(&layers, &path, flags)
        })
        .await?;
        self.0.failpoint.hit("stage.after-bind");
        Ok(())
    }

    /// The dataset volume mounted at `path`, if `volume_id` is one (for NodeGetVolumeStats).
    pub(super) fn dataset_volume_at(&self, volume_id: &str) -> bool {
        self.ephemeral_dir(volume_id).join("volume.json").exists()
    }
}

/// Removes an ephemeral volume's directory (its record and its private writes).
fn remove_volume_dir(dir: &Path) -> Result<(), Status> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Status::internal(format!("remove {}: {e}", dir.display())))
        }
        _ => Ok(()),
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
