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

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::manifest::{Digest, FORMAT, FORMAT_1, Head, InvalidManifest, read_framed};
use super::reference::{Selector, check_part};
use super::scan::ScanError;
use super::spool::{Problem, Spool};
use super::store::{self, Blob, ObjectStore};
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
    /// Where versions' entries are spooled while they are used (see [`super::spool`]).
    spool_dir: std::path::PathBuf,
    /// Bodies held in memory at once (shared with every repository of the process).
    budget: super::budget::Budget,
}

/// A version as read from its bucket: its head, and its entries, checked and spooled on disk
/// in tree order (never held in memory).
#[derive(Debug)]
pub struct Version {
    pub head: Head,
    pub entries: Spool,
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
            spool_dir: std::env::temp_dir(),
            budget: Default::default(),
        }
    }

    /// Holds bodies in memory within `budget` (the process's `cache.max_memory`).
    pub fn with_budget(mut self, budget: super::budget::Budget) -> Repo<S> {
        self.budget = budget;
        self
    }

    /// The budget this repository's transfers hold bodies within.
    pub fn budget(&self) -> &super::budget::Budget {
        &self.budget
    }

    /// Spools the entries of the versions this repository reads and writes under `dir`
    /// (the system's temporary directory otherwise).
    pub fn with_spool_dir(mut self, dir: std::path::PathBuf) -> Repo<S> {
        self.spool_dir = dir;
        self
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

    fn manifest_key(name: &str, version: &str) -> String {
        format!("datasets/{name}/versions/{version}.json")
    }

    /// A version, its entries checked as they stream in and spooled under `dir`.
    async fn manifest(&self, name: &str, version: &str, dir: &Path) -> Result<Option<Version>> {
        let key = Self::manifest_key(name, version);
        let Some(reader) = self.store.reader(&key).await? else {
            return Ok(None);
        };
        let bridge = tokio_util::io::SyncIoBridge::new(reader);
        let (dir, shown) = (dir.to_owned(), format!("{}/{key}", self.bucket));
        tokio::task::spawn_blocking(move || {
            read_version(
                std::io::BufReader::with_capacity(1 << 16, bridge),
                &dir,
                &shown,
            )
            .map(Some)
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?
    }

    /// Only the head of a version: its first line (a format 1 manifest is read whole).
    async fn head(&self, name: &str, version: &str) -> Result<Option<Head>> {
        let key = Self::manifest_key(name, version);
        let Some(reader) = self.store.reader(&key).await? else {
            return Ok(None);
        };
        let bridge = tokio_util::io::SyncIoBridge::new(reader);
        let shown = format!("{}/{key}", self.bucket);
        tokio::task::spawn_blocking(move || {
            let reader = std::io::BufReader::with_capacity(1 << 16, bridge);
            let (mut head, entries) =
                read_framed::<Head, _>(reader).map_err(|e| unreadable(&shown, e))?;
            check_format(&head, &shown)?;
            if let super::manifest::Entries::Held(held) = entries {
                let files = held.filter(|e| e.kind == super::EntryKind::File);
                (head.files, head.bytes) = files.fold((0, 0), |(n, b), e| (n + 1, b + e.size));
            }
            Ok(Some(head))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?
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

    /// The version a selector names: `latest` = newest committed; otherwise a version ID,
    /// then a tag. Its entries are spooled in the repository's spool directory.
    pub async fn resolve(&self, name: &str, selector: &Selector) -> Result<Version> {
        self.resolve_in(name, selector, &self.spool_dir.clone())
            .await
    }

    /// [`Repo::resolve`], spooling the entries under `dir`.
    pub async fn resolve_in(&self, name: &str, selector: &Selector, dir: &Path) -> Result<Version> {
        let head = self.resolve_head(name, selector).await?;
        self.manifest(name, &head.version, dir)
            .await?
            .ok_or_else(|| Error::NotFound(format!("version {} of {name} is gone", head.version)))
    }

    /// The head of the version a selector names (see [`Repo::resolve`]); no entry is read.
    pub async fn resolve_head(&self, name: &str, selector: &Selector) -> Result<Head> {
        self.info(name).await?;
        let missing =
            |what: String| Error::NotFound(format!("dataset {}/{name} has no {what}", self.bucket));
        match selector {
            Selector::Latest => {
                for version in self.version_ids(name).await?.iter().rev() {
                    if let Some(head) = self.head(name, version).await?
                        && head.committed
                    {
                        return Ok(head);
                    }
                }
                Err(missing("committed version yet".into()))
            }
            Selector::Named(named) => {
                if version_number(named).is_some()
                    && let Some(head) = self.head(name, named).await?
                {
                    return Ok(head);
                }
                let tag = self
                    .store
                    .get(&format!("datasets/{name}/tags/{named}"))
                    .await?;
                let Some(tag) = tag else {
                    return Err(missing(format!("version or tag {named:?}")));
                };
                let version = String::from_utf8_lossy(&tag).trim().to_owned();
                self.head(name, &version).await?.ok_or_else(|| {
                    Error::Corrupt(format!("tag {named:?} names missing version {version:?}"))
                })
            }
        }
    }

    /// Commits an uncommitted version; committing a committed one is a no-op.
    pub async fn commit(&self, name: &str, selector: &Selector) -> Result<Head> {
        self.writable()?;
        let head = self.resolve_head(name, selector).await?;
        if head.committed {
            return Ok(head);
        }
        let mut version = self.resolve(name, &Selector::Named(head.version)).await?;
        version.head.committed = true;
        let key = Self::manifest_key(name, &version.head.version);
        let (version, file, sha256) = self.write_manifest(version).await?;
        let body = Blob::File(file.path().to_owned());
        self.store.put_blob(&key, body, &sha256, false).await?;
        Ok(version.head)
    }

    /// Writes `version` as a format 2 manifest to a temporary file, hashing it as it goes
    /// out; the version comes back with the file and its SHA-256.
    async fn write_manifest(
        &self,
        version: Version,
    ) -> Result<(Version, tempfile::NamedTempFile, [u8; 32])> {
        let dir = self.spool_dir.clone();
        tokio::task::spawn_blocking(move || {
            let (file, sha256) = write_manifest(&version.head, &version.entries, &dir)?;
            Ok((version, file, sha256))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?
    }

    /// Points `tag` at the version `selector` names (committed only). A tag that already
    /// names another version is refused: tags do not move.
    pub async fn tag(&self, name: &str, selector: &Selector, tag: &str) -> Result<String> {
        self.writable()?;
        check_tag(tag)?;
        let head = self.resolve_head(name, selector).await?;
        if !head.committed {
            return Err(Error::Invalid(format!(
                "version {} is not committed; commit it before tagging",
                head.version
            )));
        }
        let key = format!("datasets/{name}/tags/{tag}");
        if !self
            .store
            .put_if_absent(&key, head.version.clone().into_bytes())
            .await?
        {
            let current = self
                .store
                .get(&key)
                .await?
                .map(|b| String::from_utf8_lossy(&b).trim().to_owned());
            if current.as_deref() != Some(head.version.as_str()) {
                return Err(Error::AlreadyExists(format!(
                    "tag {tag:?} already names {}",
                    current.unwrap_or_default()
                )));
            }
        }
        Ok(head.version)
    }

    /// Versions with their tags, oldest first.
    pub async fn versions(&self, name: &str) -> Result<Vec<VersionRow>> {
        self.info(name).await?;
        let tags = self.tags(name).await?;
        let mut rows = Vec::new();
        for version in self.version_ids(name).await? {
            if let Some(m) = self.head(name, &version).await? {
                rows.push(VersionRow {
                    tags: tags
                        .iter()
                        .filter(|(_, v)| *v == version)
                        .map(|(t, _)| t.clone())
                        .collect(),
                    files: m.files as usize,
                    bytes: m.bytes,
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
        let head = self.resolve_head(name, selector).await?;
        if head.committed {
            return Err(Error::Immutable(format!(
                "version {} of {name} is committed and immutable; only uncommitted versions can be removed",
                head.version
            )));
        }
        self.store
            .delete(&Self::manifest_key(name, &head.version))
            .await?;
        Ok(head.version)
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

/// A manifest that cannot be parsed: damaged (or, mid-stream, unreadable).
fn unreadable(shown: &str, e: serde_json::Error) -> Error {
    match e.is_io() {
        true => Error::Io {
            context: format!("read {shown}"),
            source: e.into(),
        },
        false => Error::Corrupt(format!("{shown} is not valid: {e}")),
    }
}

fn check_format(head: &Head, shown: &str) -> Result<()> {
    if head.format == FORMAT || head.format == FORMAT_1 {
        return Ok(());
    }
    Err(Error::Corrupt(format!(
        "{shown}: manifest format {} is not supported (this build reads {FORMAT_1} and {FORMAT})",
        head.format
    )))
}

/// Reads a manifest: the head, then every entry checked and spooled under `dir` as it comes.
/// A format 2 head must count what its entries hold.
fn read_version(reader: impl std::io::Read, dir: &Path, shown: &str) -> Result<Version> {
    let (mut head, entries) = read_framed::<Head, _>(reader).map_err(|e| unreadable(shown, e))?;
    check_format(&head, shown)?;
    let entries = entries.map(|entry| {
        entry.map_err(|e| match e.is_io() {
            true => Problem::Io(e.into()),
            false => Problem::Invalid(format!("{shown} is not valid: {e}")),
        })
    });
    let spool = Spool::collect(dir, entries).map_err(|problem| match problem {
        Problem::Invalid(reason) => Error::Corrupt(
            InvalidManifest {
                dataset: head.dataset.clone(),
                version: head.version.clone(),
                reason,
            }
            .to_string(),
        ),
        Problem::Io(source) => Error::Io {
            context: format!("read {shown}"),
            source,
        },
    })?;
    if head.format == FORMAT_1 {
        (head.files, head.bytes) = (spool.files, spool.bytes);
    } else if (head.files, head.bytes) != (spool.files, spool.bytes) {
        return Err(Error::Corrupt(format!(
            "{shown}: its head counts {} files of {} bytes, its entries {} of {}",
            head.files, head.bytes, spool.files, spool.bytes
        )));
    }
    Ok(Version {
        head,
        entries: spool,
    })
}

/// Writes a format 2 manifest — `head`, then the spooled entries' lines — to a temporary file
/// in `dir`, hashing it as it is written.
fn write_manifest(
    head: &Head,
    entries: &Spool,
    dir: &Path,
) -> Result<(tempfile::NamedTempFile, [u8; 32])> {
    use sha2::Digest as _;
    use std::io::Write;
    let failed = |e: std::io::Error| Error::Io {
        context: format!("write the manifest of {} to a temporary file", head.dataset),
        source: e,
    };
    let mut file = tempfile::Builder::new()
        .prefix(".lanes-manifest-")
        .tempfile_in(dir)
        .map_err(failed)?;
    let hashed = Hashed {
        out: file.as_file_mut(),
        hasher: sha2::Sha256::new(),
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 16, hashed);
    serde_json::to_writer(
        &mut out,
        &Head {
            format: FORMAT,
            ..head.clone()
        },
    )
    .map_err(|e| failed(e.into()))?;
    out.write_all(b"\n").map_err(failed)?;
    std::io::copy(&mut entries.lines().map_err(failed)?, &mut out).map_err(failed)?;
    let Hashed { hasher, .. } = out.into_inner().map_err(|e| failed(e.into_error()))?;
    Ok((file, hasher.finalize().into()))
}

/// A writer that hashes what it passes on.
struct Hashed<W> {
    out: W,
    hasher: sha2::Sha256,
}

impl<W: std::io::Write> std::io::Write for Hashed<W> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        use sha2::Digest as _;
        let n = self.out.write(bytes)?;
        self.hasher.update(&bytes[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
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
                .head
                .version,
            "v2",
            "latest ignores uncommitted"
        );
        assert_eq!(
            repo.resolve("imagenet", &Selector::Named("gold".into()))
                .await
                .unwrap()
                .head
                .version,
            "v1"
        );
        assert_eq!(
            repo.resolve("imagenet", &Selector::Latest)
                .await
                .unwrap()
                .head
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
                .head
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
    async fn trees_beyond_the_in_memory_limits_round_trip() {
        // More bodies than a push holds in memory: the parent's bodies are looked up on disk,
        // and the hash cache is read alongside the walk.
        let dir = tempfile::tempdir().unwrap();
        let repo = repo(dir.path()).with_hash_cache(Some(dir.path().join("hashes")));
        let src = dir.path().join("src");
        let count = crate::dataset::bodies::HELD + 300;
        for i in 0..count {
            let sub = src.join(format!("d{:03}", i % 97));
            if i < 97 {
                std::fs::create_dir_all(&sub).unwrap();
            }
            std::fs::write(sub.join(format!("f{i}")), i.to_le_bytes()).unwrap();
        }
        // Files written within the last two seconds are never remembered (racy).
        tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
        repo.create("many", "").await.unwrap();
        let first = repo.push(&src, "many", "", None, true).await.unwrap();
        assert_eq!((first.files, first.bodies_uploaded), (count, count));
        let again = repo.push(&src, "many", "", None, true).await.unwrap();
        assert!(again.unchanged && again.bodies_uploaded == 0, "{again:?}");

        std::fs::write(src.join("d000/f0"), b"changed").unwrap();
        let second = repo.push(&src, "many", "", None, true).await.unwrap();
        assert_eq!((second.version.as_str(), second.bodies_uploaded), ("v2", 1));

        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("d050")).unwrap();
        std::fs::write(out.join("d050/zz-extra"), b"x").unwrap();
        std::fs::write(out.join("a-extra"), b"x").unwrap();
        let pulled = repo.pull("many", &Selector::Latest, &out).await.unwrap();
        assert_eq!((pulled.files, pulled.downloaded), (count, count));
        assert_eq!(pulled.extra, vec!["a-extra", "d050/zz-extra"]);
        std::fs::remove_file(out.join("a-extra")).unwrap();
        std::fs::remove_file(out.join("d050/zz-extra")).unwrap();
        same_tree(&src, &out);
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
