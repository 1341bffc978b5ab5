//! Datasets in a bucket: content-addressed bodies, immutable versions, tags.
//!
//! Layout under the bucket's root:
//! - `blobs/sha256/<first two hex digits>/<hex>`: file bodies, stored once per bucket;
//! - `datasets/<name>/dataset.json`: the dataset's description;
//! - `datasets/<name>/versions/v<N>.json`: manifests, created with `put_if_absent`, so a
//!   second writer can never overwrite a version (it takes `v<N+1>` instead);
//! - `datasets/<name>/tags/<tag>`: the version a tag names. `latest` is never stored: it is
//!   the newest committed version.
//!
//! Rules: committed versions are immutable (no rewrite, no removal); a read-only bucket
//! refuses every write; every body is verified against its SHA-256 before it is placed.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::manifest::{Digest, Manifest};
use super::reference::{Selector, check_part};
use super::scan::ScanError;
use super::store::{self, ObjectStore};
use crate::copy::progress::Progress;
use crate::error::Kind;

mod gc;
mod pull;

pub use gc::GcReport;
mod push;

/// Failures of dataset operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("bucket {0:?} is read-only; writes are refused")]
    ReadOnly(String),
    #[error("{0}")]
    Immutable(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Corrupt(String),
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error(transparent)]
    Scan(#[from] ScanError),
    #[error(transparent)]
    Refused(#[from] super::gitpolicy::Refused),
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
            Error::NotFound(_) => Kind::NotFound,
            Error::AlreadyExists(_) => Kind::AlreadyExists,
            Error::ReadOnly(_) | Error::Immutable(_) => Kind::FailedPrecondition,
            Error::Invalid(_) | Error::Scan(_) => Kind::InvalidArgument,
            Error::Corrupt(_) => Kind::DataLoss,
            Error::Refused(e) => e.kind(),
            Error::Store(e) => e.kind(),
            Error::Io { source, .. } => crate::error::io_kind(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// A dataset's description.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetInfo {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub created_unix: u64,
}

/// One row of `lanes dataset versions`.
#[derive(Debug, Clone, Serialize)]
pub struct VersionRow {
    pub version: String,
    pub created_unix: u64,
    pub files: usize,
    pub bytes: u64,
    pub committed: bool,
    pub tags: Vec<String>,
    pub message: String,
}

/// What a push did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushReport {
    pub version: String,
    pub committed: bool,
    pub files: usize,
    pub bytes: u64,
    pub bodies_uploaded: usize,
    pub bytes_uploaded: u64,
    /// The tree was the latest version's: no version was made, `version` is that one.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
    /// With `unchanged`: the push's message, which no version records (the existing
    /// version keeps its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_not_recorded: Option<String>,
    /// With `unchanged`: the message the existing version has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_message: Option<String>,
}

/// What a pull did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PullReport {
    pub version: String,
    pub files: usize,
    pub downloaded: usize,
    pub bytes_downloaded: u64,
    pub skipped: usize,
    /// Paths in the directory that the version does not have, left in place.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<String>,
    /// Such paths, removed (`--delete`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
}

/// The datasets of one bucket.
#[derive(Debug, Clone)]
pub struct Repo<S> {
    store: S,
    bucket: String,
    writable: bool,
    jobs: usize,
    /// Where push and pull report how far they are (quiet unless set).
    progress: Progress,
    /// Where push remembers the hashes of the files it read (none: it remembers nothing).
    hash_cache: Option<std::path::PathBuf>,
    /// Paths a push leaves out.
    exclude: crate::copy::exclude::Exclude,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The object key of a body.
pub fn blob_key(sha256: &Digest) -> String {
    let hex = sha256.to_string();
    format!("blobs/sha256/{}/{hex}", &hex[..2])
}

/// The number of a version ID (`v<N>`); `None` for anything else (tags can never look like
/// one).
pub fn version_number(version: &str) -> Option<u64> {
    version.strip_prefix('v')?.parse().ok()
}

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    pub fn new(store: S, bucket: &str, writable: bool, jobs: usize) -> Repo<S> {
        Repo {
            store,
            bucket: bucket.to_owned(),
            writable,
            jobs: jobs.max(1),
            progress: Progress::new(true),
            hash_cache: None,
            exclude: Default::default(),
        }
    }

    /// Leaves the paths `exclude` names out of pushed versions.
    pub fn with_exclude(mut self, exclude: crate::copy::exclude::Exclude) -> Repo<S> {
        self.exclude = exclude;
        self
    }

    /// Lets push remember file hashes under `dir` (see [`super::hashcache`]), so a re-push
    /// reads only what changed; `None` hashes every file every time.
    pub fn with_hash_cache(mut self, dir: Option<std::path::PathBuf>) -> Repo<S> {
        self.hash_cache = dir;
        self
    }

    /// Reports push and pull progress through `progress` (a bar on a terminal).
    pub fn with_progress(mut self, progress: Progress) -> Repo<S> {
        self.progress = progress;
        self
    }

    /// The store the bucket's objects live in.
    pub fn store(&self) -> &S {
        &self.store
    }

    fn writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::ReadOnly(self.bucket.clone()))
        }
    }

    fn name_ok(name: &str) -> Result<()> {
        check_part(name, "the dataset name").map_err(Error::Invalid)
    }

    /// Reads a JSON document, parsed as it streams in: a manifest of a million entries is
    /// never held as text and as entries at once.
    async fn load_json<T: for<'de> Deserialize<'de> + Send + 'static>(
        &self,
        key: &str,
    ) -> Result<Option<T>> {
        let Some(reader) = self.store.reader(key).await? else {
            return Ok(None);
        };
        let bridge = tokio_util::io::SyncIoBridge::new(reader);
        let parsed = tokio::task::spawn_blocking(move || {
            serde_json::from_reader(std::io::BufReader::with_capacity(1 << 16, bridge))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?;
        parsed.map(Some).map_err(|e| match e.is_io() {
            true => Error::Io {
                context: format!("read {}/{key}", self.bucket),
                source: e.into(),
            },
            false => Error::Corrupt(format!("{}/{key} is not valid: {e}", self.bucket)),
        })
    }

    /// Creates a dataset; an existing one is `AlreadyExists`.
    pub async fn create(&self, name: &str, description: &str) -> Result<DatasetInfo> {
        Self::name_ok(name)?;
        self.writable()?;
        let info = DatasetInfo {
            name: name.to_owned(),
            description: description.to_owned(),
            created_unix: now(),
        };
        let body = serde_json::to_vec_pretty(&info).expect("serializable");
        if !self
            .store
            .put_if_absent(&format!("datasets/{name}/dataset.json"), body)
            .await?
        {
            return Err(Error::AlreadyExists(format!(
                "dataset {}/{name} already exists",
                self.bucket
            )));
        }
        Ok(info)
    }

    /// The dataset's description, or `NotFound`.
    pub async fn info(&self, name: &str) -> Result<DatasetInfo> {
        Self::name_ok(name)?;
        self.load_json(&format!("datasets/{name}/dataset.json"))
            .await?
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "dataset {}/{name} does not exist (create it with `lanes dataset create`)",
                    self.bucket
                ))
            })
    }

    /// Every dataset of the bucket, by name.
    pub async fn datasets(&self) -> Result<Vec<DatasetInfo>> {
        let mut names: Vec<String> = self
            .store
            .list("datasets/")
            .await?
            .into_iter()
            .filter_map(|key| {
                let name = key
                    .strip_prefix("datasets/")?
                    .strip_suffix("/dataset.json")?;
                (!name.contains('/')).then(|| name.to_owned())
            })
            .collect();
        names.sort();
        let mut all = Vec::with_capacity(names.len());
        for name in names {
            all.push(self.info(&name).await?);
        }
        Ok(all)
    }

    /// All version IDs of a dataset, oldest first.
    pub async fn version_ids(&self, name: &str) -> Result<Vec<String>> {
        let prefix = format!("datasets/{name}/versions/");
        let mut ids: Vec<(u64, String)> = self
            .store
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|key| {
                let id = key.strip_prefix(&prefix)?.strip_suffix(".json")?.to_owned();
                Some((version_number(&id)?, id))
            })
            .collect();
        ids.sort();
        Ok(ids.into_iter().map(|(_, id)| id).collect())
    }

    async fn manifest(&self, name: &str, version: &str) -> Result<Option<Manifest>> {
        let manifest: Option<Manifest> = self
            .load_json(&format!("datasets/{name}/versions/{version}.json"))
            .await?;
        if let Some(manifest) = &manifest {
            manifest
                .validate()
                .map_err(|e| Error::Corrupt(e.to_string()))?;
        }
        Ok(manifest)
    }

    async fn tags(&self, name: &str) -> Result<Vec<(String, String)>> {
        let prefix = format!("datasets/{name}/tags/");
        let mut tags = Vec::new();
        for key in self.store.list(&prefix).await? {
            if let (Some(tag), Some(body)) =
                (key.strip_prefix(&prefix), self.store.get(&key).await?)
            {
                tags.push((
                    tag.to_owned(),
                    String::from_utf8_lossy(&body).trim().to_owned(),
                ));
            }
        }
        Ok(tags)
    }

    /// The manifest a selector names: `latest` = newest committed; otherwise a version ID,
    /// then a tag.
    pub async fn resolve(&self, name: &str, selector: &Selector) -> Result<Manifest> {
        self.info(name).await?;
        let missing =
            |what: String| Error::NotFound(format!("dataset {}/{name} has no {what}", self.bucket));
        match selector {
            Selector::Latest => {
                for version in self.version_ids(name).await?.iter().rev() {
                    if let Some(manifest) = self.manifest(name, version).await?
                        && manifest.committed
                    {
                        return Ok(manifest);
                    }
                }
                Err(missing("committed version yet".into()))
            }
            Selector::Named(named) => {
                if version_number(named).is_some()
                    && let Some(manifest) = self.manifest(name, named).await?
                {
                    return Ok(manifest);
                }
                let tag = self
                    .store
                    .get(&format!("datasets/{name}/tags/{named}"))
                    .await?;
                let Some(tag) = tag else {
                    return Err(missing(format!("version or tag {named:?}")));
                };
                let version = String::from_utf8_lossy(&tag).trim().to_owned();
                self.manifest(name, &version).await?.ok_or_else(|| {
                    Error::Corrupt(format!("tag {named:?} names missing version {version:?}"))
                })
            }
        }
    }

    /// Commits an uncommitted version; committing a committed one is a no-op.
    pub async fn commit(&self, name: &str, selector: &Selector) -> Result<Manifest> {
        self.writable()?;
        let mut manifest = self.resolve(name, selector).await?;
        if manifest.committed {
            return Ok(manifest);
        }
        manifest.committed = true;
        let body = serde_json::to_vec_pretty(&manifest).expect("serializable");
        self.store
            .put(
                &format!("datasets/{name}/versions/{}.json", manifest.version),
                body,
            )
            .await?;
        Ok(manifest)
    }

    /// Points `tag` at the version `selector` names (committed only). A tag that already
    /// names another version is refused: tags do not move.
    pub async fn tag(&self, name: &str, selector: &Selector, tag: &str) -> Result<String> {
        self.writable()?;
        check_tag(tag)?;
        let manifest = self.resolve(name, selector).await?;
        if !manifest.committed {
            return Err(Error::Invalid(format!(
                "version {} is not committed; commit it before tagging",
                manifest.version
            )));
        }
        let key = format!("datasets/{name}/tags/{tag}");
        if !self
            .store
            .put_if_absent(&key, manifest.version.clone().into_bytes())
            .await?
        {
            let current = self
                .store
                .get(&key)
                .await?
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
            if current.as_deref() != Some(manifest.version.as_str()) {
                return Err(Error::AlreadyExists(format!(
                    "tag {tag:?} already names {}",
                    current.unwrap_or_default()
                )));
            }
        }
        Ok(manifest.version)
    }

    /// Versions with their tags, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionRow>> {
        self.info(name).await?;
        let tags = self.tags(name).await?;
        let mut rows = Vec::new();
        for version in self.version_ids(name).await? {
            if let Some(m) = self.manifest(name, &version).await? {
                rows.push(VersionRow {
                    tags: tags
                        .iter()
                        .filter(|(_, v)| *v == version)
                        .map(|(t, _)| t.clone())
                        .collect(),
                    files: m.files(),
                    bytes: m.size(),
                    version,
                    created_unix: m.created_unix,
                    committed: m.committed,
                    message: m.message,
                });
            }
        }
        Ok(rows)
    }

    /// Removes an uncommitted version. Committed versions are immutable.
    pub async fn remove(&self, name: &str, selector: &Selector) -> Result<String> {
        self.writable()?;
        let manifest = self.resolve(name, selector).await?;
        if manifest.committed {
            return Err(Error::Immutable(format!(
                "version {} of {name} is committed and immutable; only uncommitted versions can be removed",
                manifest.version
            )));
        }
        self.store
            .delete(&format!(
                "datasets/{name}/versions/{}.json",
                manifest.version
            ))
            .await?;
        Ok(manifest.version)
    }
}

/// Stops a progress reporter when dropped (also on an early error return).
struct Finish<'a>(&'a Progress);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Counts one file of `bytes` as done when dropped.
struct Advance<'a>(&'a Progress, u64);

impl Drop for Advance<'_> {
    fn drop(&mut self) {
        self.0.advance(self.1);
    }
}

fn check_tag(tag: &str) -> Result<()> {
    check_part(tag, "the tag").map_err(Error::Invalid)?;
    if tag == "latest" || version_number(tag).is_some() {
        return Err(Error::Invalid(format!(
            "{tag:?} cannot be a tag: it reads as a version (latest, v<N>)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::scan::scan;
    use crate::dataset::store::fs::FsStore;
    use rand::{Rng, SeedableRng};
    use sha2::{Digest as _, Sha256};
    use std::path::Path;

    fn repo(dir: &Path) -> Repo<FsStore> {
        Repo::new(FsStore::new(dir.join("bucket")), "local", true, 8)
    }

    /// 100 files of seeded random bytes in nested dirs, an empty dir, an empty file, a link.
    fn tree(root: &Path, seed: u64) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for i in 0..100 {
            let dir = root.join(format!("d{}/e{}", i % 7, i % 3));
            std::fs::create_dir_all(&dir).unwrap();
            let mut bytes = vec![0u8; rng.random_range(0..20_000)];
            rng.fill(&mut bytes[..]);
            std::fs::write(dir.join(format!("f{i}")), bytes).unwrap();
        }
        std::fs::create_dir_all(root.join("empty")).unwrap();
        std::fs::write(root.join("zero"), b"").unwrap();
        std::os::unix::fs::symlink("d0/e0/f0", root.join("link")).unwrap();
    }

    fn same_tree(a: &Path, b: &Path) {
        let left = scan(a, 4).unwrap();
        let right = scan(b, 4).unwrap();
        assert_eq!(left, right);
    }

    #[tokio::test]
    async fn push_pull_round_trip_dedup_tags_and_latest() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let src = dir.path().join("src");
        tree(&src, 1);
        repo.create("imagenet", "test data").await.unwrap();
        let err = repo.create("imagenet", "").await.unwrap_err();
        assert_eq!(err.kind(), Kind::AlreadyExists);

        let v1 = repo
            .push(&src, "imagenet", "first", Some("gold"), true)
            .await
            .unwrap();
        assert_eq!((v1.version.as_str(), v1.files), ("v1", 101));
        assert_eq!(v1.bodies_uploaded, 101);
        let out = dir.path().join("out");
        let pulled = repo
            .pull("imagenet", &Selector::Latest, &out)
            .await
            .unwrap();
        assert_eq!(pulled.downloaded, 101);
        same_tree(&src, &out);
        let again = repo
            .pull("imagenet", &Selector::Named("gold".into()), &out)
            .await
            .unwrap();
        assert_eq!(
            (again.downloaded, again.skipped),
            (0, 101),
            "identical files are skipped"
        );

        // One of 100 files changes: exactly one body is uploaded.
        std::fs::write(src.join("d0/e0/f0"), b"changed").unwrap();
        let v2 = repo
            .push(&src, "imagenet", "second", None, true)
            .await
            .unwrap();
        assert_eq!((v2.version.as_str(), v2.bodies_uploaded), ("v2", 1));
        let same = repo
            .push(&src, "imagenet", "again", None, true)
            .await
            .unwrap();
        assert_eq!(
            (same.version.as_str(), same.bodies_uploaded),
            ("v2", 0),
            "an unchanged push is the latest version"
        );
        let unchanged = repo
            .push(&src, "imagenet", "same", None, false)
            .await
            .unwrap();
        assert_eq!(
            (
                unchanged.version.as_str(),
                unchanged.bodies_uploaded,
                unchanged.committed
            ),
            ("v3", 0, false)
        );

        assert_eq!(
            repo.resolve("imagenet", &Selector::Latest)
                .await
                .unwrap()
                .version,
            "v2",
            "latest ignores uncommitted"
        );
        assert_eq!(
            repo.resolve("imagenet", &Selector::Named("gold".into()))
                .await
                .unwrap()
                .version,
            "v1"
        );
        assert_eq!(
            repo.resolve("imagenet", &Selector::Latest)
                .await
                .unwrap()
                .parent
                .as_deref(),
            Some("v1")
        );
        let rows = repo.versions("imagenet").await.unwrap();
        assert_eq!(
            rows.iter().map(|r| r.version.as_str()).collect::<Vec<_>>(),
            vec!["v1", "v2", "v3"]
        );
        assert_eq!(rows[0].tags, vec!["gold"]);

        // Tags do not move; latest and v<N> are not tags.
        assert_eq!(
            repo.tag("imagenet", &Selector::Named("v2".into()), "gold")
                .await
                .unwrap_err()
                .kind(),
            Kind::AlreadyExists
        );
        repo.tag("imagenet", &Selector::Named("v1".into()), "gold")
            .await
            .unwrap();
        assert_eq!(
            repo.tag("imagenet", &Selector::Latest, "latest")
                .await
                .unwrap_err()
                .kind(),
            Kind::InvalidArgument
        );
        assert_eq!(
            repo.tag("imagenet", &Selector::Named("v3".into()), "beta")
                .await
                .unwrap_err()
                .kind(),
            Kind::InvalidArgument
        );

        // Committed versions are immutable; uncommitted ones can be removed or committed.
        assert_eq!(
            repo.remove("imagenet", &Selector::Named("v1".into()))
                .await
                .unwrap_err()
                .kind(),
            Kind::FailedPrecondition
        );
        repo.commit("imagenet", &Selector::Named("v3".into()))
            .await
            .unwrap();
        assert_eq!(
            repo.resolve("imagenet", &Selector::Latest)
                .await
                .unwrap()
                .version,
            "v3"
        );
        let v4 = repo
            .push(&src, "imagenet", "draft", None, false)
            .await
            .unwrap();
        assert_eq!(
            repo.remove("imagenet", &Selector::Named(v4.version))
                .await
                .unwrap(),
            "v4"
        );

        for missing in ["v9", "nope"] {
            let err = repo
                .resolve("imagenet", &Selector::Named(missing.into()))
                .await
                .unwrap_err();
            assert_eq!(err.kind(), Kind::NotFound, "{missing}");
            assert!(err.to_string().contains(missing), "{err}");
        }
        assert_eq!(
            repo.resolve("other", &Selector::Latest)
                .await
                .unwrap_err()
                .kind(),
            Kind::NotFound
        );
    }

    #[tokio::test]
    async fn a_corrupt_body_is_never_placed() {
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path());
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("data"), b"genuine").unwrap();
        repo.create("ds", "").await.unwrap();
        repo.push(&src, "ds", "", None, true).await.unwrap();
        let hash = Digest(Sha256::digest(b"genuine").into());
        std::fs::write(dir.path().join("bucket").join(blob_key(&hash)), b"tampered").unwrap();
        let out = dir.path().join("out");
        let err = repo.pull("ds", &Selector::Latest, &out).await.unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!out.join("data").exists());
        let leftovers: Vec<_> = std::fs::read_dir(&out).unwrap().flatten().collect();
        assert!(leftovers.is_empty(), "no temporaries left: {leftovers:?}");
    }

    #[tokio::test]
    async fn read_only_buckets_and_bad_trees_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let writer = repo(dir.path());
        writer.create("ds", "").await.unwrap();
        let reader = Repo::new(FsStore::new(dir.path().join("bucket")), "archive", false, 2);
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        for err in [
            reader.create("new", "").await.unwrap_err(),
            reader.push(&src, "ds", "", None, true).await.unwrap_err(),
            reader.tag("ds", &Selector::Latest, "x").await.unwrap_err(),
        ] {
            assert!(err.to_string().contains("read-only"), "{err}");
        }
        std::os::unix::fs::symlink("../outside", src.join("evil")).unwrap();
        let err = writer.push(&src, "ds", "", None, true).await.unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument, "{err}");
        assert!(
            writer.version_ids("ds").await.unwrap().is_empty(),
            "nothing was written"
        );
        assert_eq!(
            writer.create("../x", "").await.unwrap_err().kind(),
            Kind::InvalidArgument
        );
    }
}
