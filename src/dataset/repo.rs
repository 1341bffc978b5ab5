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

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use super::manifest::{Entry, EntryKind, FORMAT, Manifest};
use super::reference::{Selector, check_part};
use super::scan::{ReadBody, ScanError, hex, read_body, walk_tree};
use super::store::{self, Blob, ObjectStore};
use crate::copy::progress::Progress;
use crate::error::Kind;

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
            Error::Corrupt(_) => Kind::Internal,
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
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub version: String,
    pub committed: bool,
    pub files: usize,
    pub bytes: u64,
    pub bodies_uploaded: usize,
    pub bytes_uploaded: u64,
}

/// What a pull did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PullReport {
    pub version: String,
    pub files: usize,
    pub downloaded: usize,
    pub bytes_downloaded: u64,
    pub skipped: usize,
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
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The object key of a body.
pub fn blob_key(sha256: &str) -> String {
    format!("blobs/sha256/{}/{sha256}", &sha256[..2])
}

fn version_number(version: &str) -> Option<u64> {
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
        }
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

    async fn load_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        match self.store.get(key).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{}/{key} is not valid: {e}", self.bucket))),
        }
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

    /// Pushes `dir` as a new version of `name`, uploading only bodies the bucket lacks.
    pub async fn push(
        &self,
        dir: &Path,
        name: &str,
        message: &str,
        tag: Option<&str>,
        commit: bool,
    ) -> Result<PushReport> {
        self.writable()?;
        self.info(name).await?;
        if let Some(tag) = tag {
            check_tag(tag)?;
            if !commit {
                return Err(Error::Invalid(
                    "only committed versions can be tagged; drop --no-commit or tag later".into(),
                ));
            }
        }
        let root = dir.to_owned();
        let mut entries = tokio::task::spawn_blocking(move || walk_tree(&root))
            .await
            .map_err(|e| Error::Invalid(e.to_string()))??;
        let parent = self.resolve(name, &Selector::Latest).await.ok();
        // Bodies of the parent version are in the bucket already (bodies are never removed
        // while a version names them).
        let known: HashSet<String> = parent
            .iter()
            .flat_map(|p| p.entries.iter().filter_map(|e| e.sha256.clone()))
            .collect();
        let sent = self.send_bodies(dir, &entries, known).await?;
        for (index, read) in sent.hashed {
            entries[index].size = read.size;
            entries[index].sha256 = Some(hex(&read.sha256));
        }
        let (uploaded, bytes_uploaded) = (sent.uploaded, sent.bytes_uploaded);
        // Nothing changed since the latest version: that version is the answer (every body
        // was known, so nothing was sent).
        if commit
            && tag.is_none()
            && let Some(parent) = parent.as_ref().filter(|p| p.entries == entries)
        {
            return Ok(PushReport {
                version: parent.version.clone(),
                committed: true,
                files: parent.files(),
                bytes: parent.size(),
                bodies_uploaded: 0,
                bytes_uploaded: 0,
            });
        }
        let parent = parent.map(|m| m.version);
        let mut manifest = Manifest {
            format: FORMAT,
            dataset: name.to_owned(),
            version: String::new(),
            parent,
            message: message.to_owned(),
            created_unix: now(),
            committed: commit,
            entries,
        };
        // Claim the next version number; a concurrent pusher that got there first makes us
        // take the one after.
        let mut next = self
            .version_ids(name)
            .await?
            .last()
            .and_then(|v| version_number(v))
            .unwrap_or(0)
            + 1;
        loop {
            manifest.version = format!("v{next}");
            let body = serde_json::to_vec_pretty(&manifest).expect("serializable");
            if self
                .store
                .put_if_absent(&format!("datasets/{name}/versions/v{next}.json"), body)
                .await?
            {
                break;
            }
            next += 1;
        }
        if let Some(tag) = tag {
            self.tag(name, &Selector::Named(manifest.version.clone()), tag)
                .await?;
        }
        Ok(PushReport {
            version: manifest.version.clone(),
            committed: commit,
            files: manifest.files(),
            bytes: manifest.size(),
            bodies_uploaded: uploaded,
            bytes_uploaded,
        })
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

    /// Downloads a version into `dir`, verifying every body; identical files already there
    /// are skipped. A body whose hash does not match is never placed.
    pub async fn pull(&self, name: &str, selector: &Selector, dir: &Path) -> Result<PullReport> {
        let manifest = self.resolve(name, selector).await?;
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let root = dir
            .canonicalize()
            .map_err(io(format!("resolve {}", dir.display())))?;
        for entry in manifest.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
            let path = root.join(&entry.path);
            crate::copy::file::real_dir(&path).map_err(io(format!("create {}", path.display())))?;
        }
        let mut report = PullReport {
            version: manifest.version.clone(),
            files: manifest.files(),
            ..Default::default()
        };
        let limit = Arc::new(Semaphore::new(self.jobs));
        let mut tasks = tokio::task::JoinSet::new();
        let progress = self.progress.clone();
        progress.start(manifest.files() as u64, manifest.size());
        let _finish = Finish(&progress);
        for entry in manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .cloned()
        {
            let (store, limit, target, progress) = (
                self.store.clone(),
                limit.clone(),
                root.join(&entry.path),
                progress.clone(),
            );
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let _advance = Advance(&progress, entry.size);
                let expected = entry.sha256.clone().unwrap_or_default();
                let check = target.clone();
                let expected_for_check = expected.clone();
                let identical =
                    tokio::task::spawn_blocking(move || same_body(&check, &expected_for_check))
                        .await
                        .unwrap_or(false);
                if identical {
                    return Ok::<_, Error>(None);
                }
                let temp = temp_beside(&target);
                let Some(digest) = store.get_to_file(&blob_key(&expected), &temp).await? else {
                    return Err(Error::Corrupt(format!(
                        "body {expected} of {} is missing from the bucket",
                        entry.path
                    )));
                };
                if hex(&digest) != expected {
                    let _ = std::fs::remove_file(&temp);
                    return Err(Error::Corrupt(format!(
                        "body of {} does not match its SHA-256 ({} != {expected}); not placed",
                        entry.path,
                        hex(&digest)
                    )));
                }
                let (place_temp, place_target, mode) = (temp.clone(), target.clone(), entry.mode);
                tokio::task::spawn_blocking(move || place(&place_temp, &place_target, mode))
                    .await
                    .map_err(|e| Error::Invalid(e.to_string()))?
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&temp);
                    })?;
                Ok(Some(entry.size))
            });
        }
        while let Some(done) = tasks.join_next().await {
            match done.map_err(|e| Error::Invalid(e.to_string()))?? {
                Some(bytes) => {
                    report.downloaded += 1;
                    report.bytes_downloaded += bytes;
                }
                None => report.skipped += 1,
            }
        }
        for entry in manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
        {
            let target = entry.target.as_deref().unwrap_or_default();
            let path = root.join(&entry.path);
            if std::fs::read_link(&path).is_ok_and(|t| t == Path::new(target)) {
                continue;
            }
            let temp = temp_beside(&path);
            std::os::unix::fs::symlink(target, &temp)
                .map_err(io(format!("link {}", path.display())))?;
            std::fs::rename(&temp, &path).map_err(io(format!("place {}", path.display())))?;
        }
        Ok(report)
    }
}

/// What [`Repo::send_bodies`] did: each file's hash (by entry index) and what was uploaded.
struct Sent {
    hashed: Vec<(usize, ReadBody)>,
    uploaded: usize,
    bytes_uploaded: u64,
}

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    /// Hashes every file of `entries` (under `dir`) and uploads each body that is neither in
    /// `known` nor already sent by this push, as soon as it is hashed: reading, hashing and
    /// sending overlap. A body of at most [`SMALL_BODY`] bytes is read once, hashed and sent
    /// from memory with one conditional PUT; a larger one is streamed from its file after a
    /// HEAD says the bucket lacks it. At most `jobs` bodies are in flight, and hashing uses
    /// at most one thread per core.
    async fn send_bodies(
        &self,
        dir: &Path,
        entries: &[Entry],
        known: HashSet<String>,
    ) -> Result<Sent> {
        let files: Vec<(usize, PathBuf, u64)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.kind == EntryKind::File)
            .map(|(index, e)| (index, dir.join(&e.path), e.size))
            .collect();
        let progress = self.progress.clone();
        progress.start(files.len() as u64, files.iter().map(|f| f.2).sum());
        let _finish = Finish(&progress);
        let in_flight = Arc::new(Semaphore::new(self.jobs));
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hashing = Arc::new(Semaphore::new(cores));
        let claimed = Arc::new(Mutex::new(known));
        let mut tasks = tokio::task::JoinSet::new();
        for (index, path, size) in files {
            let (store, progress) = (self.store.clone(), progress.clone());
            let (in_flight, hashing, claimed) =
                (in_flight.clone(), hashing.clone(), claimed.clone());
            tasks.spawn(async move {
                let _slot = in_flight.acquire_owned().await;
                let mut read = {
                    let _core = hashing.acquire_owned().await;
                    let file = path.clone();
                    tokio::task::spawn_blocking(move || read_body(&file, size, SMALL_BODY))
                        .await
                        .map_err(|e| Error::Invalid(e.to_string()))?
                        .map_err(|e| ScanError {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?
                };
                let sha256 = hex(&read.sha256);
                let fresh = claimed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(sha256.clone());
                let key = blob_key(&sha256);
                // Small bodies: one conditional PUT (the server refuses it if the body is
                // there). Large ones: ask first, so an existing body is never sent again.
                let created = match (read.bytes.take(), fresh) {
                    (_, false) => false,
                    (Some(bytes), true) => {
                        let body = Blob::Memory(bytes);
                        store.put_blob(&key, body, &read.sha256, true).await?
                    }
                    (None, true) => {
                        !store.exists(&key).await?
                            && store
                                .put_blob(&key, Blob::File(path), &read.sha256, false)
                                .await?
                    }
                };
                progress.advance(read.size);
                Ok::<_, Error>((index, read, created))
            });
        }
        let mut sent = Sent {
            hashed: Vec::new(),
            uploaded: 0,
            bytes_uploaded: 0,
        };
        // Test hook: `LANES_FAILPOINT=dataset.push.uploaded:N` dies after N uploads, before
        // the manifest is written.
        let kill_at = crate::failpoint::count("dataset.push.uploaded");
        while let Some(done) = tasks.join_next().await {
            let (index, read, created) = done.map_err(|e| Error::Invalid(e.to_string()))??;
            if created {
                sent.uploaded += 1;
                sent.bytes_uploaded += read.size;
                if kill_at == Some(sent.uploaded as u64) {
                    crate::failpoint::kill("dataset.push.uploaded");
                }
            }
            sent.hashed.push((index, read));
        }
        Ok(sent)
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

/// Bodies up to this size are uploaded with one conditional PUT instead of HEAD + PUT.
const SMALL_BODY: u64 = 8 << 20;

fn check_tag(tag: &str) -> Result<()> {
    check_part(tag, "the tag").map_err(Error::Invalid)?;
    if tag == "latest" || version_number(tag).is_some() {
        return Err(Error::Invalid(format!(
            "{tag:?} cannot be a tag: it reads as a version (latest, v<N>)"
        )));
    }
    Ok(())
}

fn temp_beside(path: &Path) -> PathBuf {
    crate::copy::file::temp_path(path.parent().unwrap_or(Path::new(".")))
}

/// True when `path` is a regular file whose SHA-256 is `sha256`.
fn same_body(path: &Path, sha256: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
        && std::fs::File::open(path)
            .and_then(crate::copy::file::sha256)
            .is_ok_and(|d| hex(&d) == sha256)
}

/// Sets the mode of a verified temporary and renames it into place.
fn place(temp: &Path, target: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(io(format!("chmod {}", temp.display())))?;
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(target).map_err(io(format!("replace {}", target.display())))?;
    }
    std::fs::rename(temp, target).map_err(io(format!("place {}", target.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::scan::scan;
    use crate::dataset::store::fs::FsStore;
    use rand::{Rng, SeedableRng};
    use sha2::{Digest as _, Sha256};

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
        let (left, _) = scan(a, 4).unwrap();
        let (right, _) = scan(b, 4).unwrap();
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
        let hash = hex(&Sha256::digest(b"genuine"));
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
