//! Pushing a directory as a new version: walk and check, then read, hash and send each body
//! once, many at a time, and only then claim the next version number.
//!
//! Rules: nothing is read or sent when the tree has a path or link a manifest cannot hold; a
//! body the bucket already has (the parent version's, or one this push sent) is never sent
//! again; no version exists until every body it names is in the bucket.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::{Error, Finish, PushReport, Repo, Result, blob_key, check_tag, now, version_number};
use crate::dataset::hashcache::{CacheWriter, HashCache, Stamp, now_ns};
use crate::dataset::manifest::{Digest, Entry, EntryKind, FORMAT, Manifest};
use crate::dataset::reference::Selector;
use crate::dataset::scan::{ReadBody, ScanError, read_body, walk_tree};
use crate::dataset::store::{Blob, ObjectStore};

/// Bodies up to this size are read into memory, hashed, and sent with one conditional PUT;
/// larger ones are streamed from their file after a HEAD says the bucket lacks them.
const SMALL_BODY: u64 = 8 << 20;

impl<S: ObjectStore + Clone + 'static> Repo<S> {
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
        // Bodies of the parent version are in the bucket already (bodies are never removed
        // while a version names them). Only they and a digest of its entries are kept, and
        // the version is read before the tree is walked, so its entries are gone by then.
        let (parent, known) = match self.resolve(name, &Selector::Latest).await.ok() {
            Some(latest) => {
                let known = Bodies::of(&latest.entries);
                (Some(Parent::of(latest)), known)
            }
            None => (None, Bodies::default()),
        };
        let (root, exclude) = (dir.to_owned(), self.exclude.clone());
        let mut entries = tokio::task::spawn_blocking(move || walk_tree(&root, &exclude))
            .await
            .map_err(|e| Error::Invalid(e.to_string()))??;
        let cache = Arc::new(match &self.hash_cache {
            Some(cache_dir) => HashCache::open(cache_dir, dir),
            None => HashCache::disabled(),
        });
        let sent = self
            .send_bodies(dir, &mut entries, Arc::new(known), cache)
            .await?;
        // The hashes are facts about the files whatever happens to this push next.
        if let Some(remembered) = sent.remembered {
            tokio::task::spawn_blocking(move || remembered.finish())
                .await
                .map_err(|e| Error::Invalid(e.to_string()))?;
        }
        let (uploaded, bytes_uploaded) = (sent.uploaded, sent.bytes_uploaded);
        // Nothing changed since the latest version: that version is the answer (every body
        // was known, so nothing was sent).
        if commit
            && tag.is_none()
            && let Some(parent) = parent
                .as_ref()
                .filter(|p| p.entries_sha256 == entries_sha256(&entries))
        {
            return Ok(PushReport {
                version: parent.version.clone(),
                committed: true,
                files: parent.files,
                bytes: parent.bytes,
                bodies_uploaded: 0,
                bytes_uploaded: 0,
                unchanged: true,
                message_not_recorded: (!message.is_empty() && message != parent.message)
                    .then(|| message.to_owned()),
                kept_message: Some(parent.message.clone()),
            });
        }
        let parent = parent.map(|m| m.version);
        let manifest = Manifest {
            format: FORMAT,
            dataset: name.to_owned(),
            version: String::new(),
            parent,
            message: message.to_owned(),
            created_unix: now(),
            committed: commit,
            entries,
        };
        let manifest = self.claim_version(name, manifest).await?;
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
            ..Default::default()
        })
    }

    /// Writes `manifest` as the dataset's next version. The store's put-if-absent makes the
    /// number a claim: a concurrent pusher that got there first makes this one take the next.
    async fn claim_version(&self, name: &str, mut manifest: Manifest) -> Result<Manifest> {
        let mut next = self
            .version_ids(name)
            .await?
            .last()
            .and_then(|v| version_number(v))
            .unwrap_or(0)
            + 1;
        loop {
            manifest.version = format!("v{next}");
            let written = tokio::task::spawn_blocking(move || {
                let written = write_manifest(&manifest);
                (manifest, written)
            })
            .await
            .map_err(|e| Error::Invalid(e.to_string()))?;
            manifest = written.0;
            let (file, sha256) = written.1?;
            let key = format!("datasets/{name}/versions/v{next}.json");
            let body = Blob::File(file.path().to_owned());
            if self.store.put_blob(&key, body, &sha256, true).await? {
                return Ok(manifest);
            }
            next += 1;
        }
    }
}

/// Writes `manifest` to a temporary file, hashing it as it goes out: the manifest of a large
/// tree is streamed from there, never held as one buffer beside its entries.
fn write_manifest(manifest: &Manifest) -> Result<(tempfile::NamedTempFile, [u8; 32])> {
    use sha2::Digest as _;
    let failed = |e: std::io::Error| Error::Io {
        context: format!(
            "write the manifest of {} to a temporary file",
            manifest.dataset
        ),
        source: e,
    };
    let mut file = tempfile::NamedTempFile::new().map_err(failed)?;
    let hashed = Hashed {
        out: file.as_file_mut(),
        hasher: sha2::Sha256::new(),
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 16, hashed);
    serde_json::to_writer(&mut out, manifest).map_err(|e| failed(e.into()))?;
    let hashed = out.into_inner().map_err(|e| failed(e.into_error()))?;
    let sha256 = hashed.hasher.finalize().into();
    Ok((file, sha256))
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

/// What a push keeps of the latest version: enough to answer for an unchanged tree, not the
/// version's entries (a push of N files would otherwise hold two manifests of N entries).
struct Parent {
    version: String,
    message: String,
    files: usize,
    bytes: u64,
    entries_sha256: [u8; 32],
}

impl Parent {
    fn of(manifest: Manifest) -> Parent {
        Parent {
            files: manifest.files(),
            bytes: manifest.size(),
            entries_sha256: entries_sha256(&manifest.entries),
            version: manifest.version,
            message: manifest.message,
        }
    }
}

/// SHA-256 over `entries`, each as its JSON: equal for equal lists of entries.
fn entries_sha256(entries: &[Entry]) -> [u8; 32] {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for entry in entries {
        serde_json::to_writer(&mut hasher, entry).expect("hashing does not fail");
    }
    hasher.finalize().into()
}

/// The bodies a version names, sorted: 32 bytes each, looked up by binary search.
#[derive(Debug, Default)]
struct Bodies(Vec<Digest>);

impl Bodies {
    fn of(entries: &[Entry]) -> Bodies {
        let mut bodies: Vec<Digest> = entries.iter().filter_map(|e| e.sha256).collect();
        bodies.sort_unstable();
        bodies.dedup();
        Bodies(bodies)
    }

    fn contains(&self, body: &Digest) -> bool {
        self.0.binary_search(body).is_ok()
    }
}

/// What one body's task found: its entry's index, the read, the file's stamp and when it was
/// taken, and whether this push uploaded the body.
type Done = (usize, ReadBody, Stamp, i64, bool);

/// What [`Repo::send_bodies`] did: the next hash cache, written as files were hashed (to be
/// finished); what was uploaded.
struct Sent {
    remembered: Option<CacheWriter>,
    uploaded: usize,
    bytes_uploaded: u64,
}

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    /// Hashes every file of `entries` (under `dir`), recording each file's size and hash in
    /// its entry, and uploads each body that is neither in
    /// `known` nor already sent by this push, as soon as it is hashed: reading, hashing and
    /// sending overlap. A file `cache` remembers, whose body is `known`, is not read at all.
    /// A body of at most [`SMALL_BODY`] bytes is read once, hashed and sent from memory with
    /// one conditional PUT; a larger one is streamed from its file after a HEAD says the
    /// bucket lacks it. At most `jobs` bodies are in flight, and hashing uses at most one
    /// thread per core.
    async fn send_bodies(
        &self,
        dir: &Path,
        entries: &mut [Entry],
        known: Arc<Bodies>,
        cache: Arc<HashCache>,
    ) -> Result<Sent> {
        // Indices, not copies of the paths: a tree of a million files is held once.
        let files: Vec<u32> = (0..entries.len() as u32)
            .filter(|&i| entries[i as usize].kind == EntryKind::File)
            .collect();
        let total = entries.iter().filter(|e| e.kind == EntryKind::File);
        let progress = self.progress.clone();
        progress.start(files.len() as u64, total.map(|e| e.size).sum());
        let _finish = Finish(&progress);
        // At most `jobs` bodies in flight, and only that many tasks exist: a task is spawned
        // when one finishes (a task per file up front costs memory per file).
        let jobs = self.jobs.max(1);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hashing = Arc::new(Semaphore::new(cores));
        let claimed = Arc::new(Mutex::new(HashSet::new()));
        let mut tasks = tokio::task::JoinSet::new();
        let mut sent = Sent {
            remembered: cache.writer(),
            uploaded: 0,
            bytes_uploaded: 0,
        };
        // Test hook: `LANES_FAILPOINT=dataset.push.uploaded:N` dies after N uploads, before
        // the manifest is written.
        let kill_at = crate::failpoint::count("dataset.push.uploaded");
        let record = |sent: &mut Sent,
                      entries: &mut [Entry],
                      done: Result<Result<Done>, tokio::task::JoinError>| {
            let (index, read, stamp, seen, created) =
                done.map_err(|e| Error::Invalid(e.to_string()))??;
            entries[index].size = read.size;
            entries[index].sha256 = Some(Digest(read.sha256));
            if created {
                sent.uploaded += 1;
                sent.bytes_uploaded += read.size;
                if kill_at == Some(sent.uploaded as u64) {
                    crate::failpoint::kill("dataset.push.uploaded");
                }
            }
            if let Some(remembered) = sent.remembered.as_mut() {
                remembered.remember(&entries[index].path, stamp, read.sha256, seen);
            }
            Ok::<_, Error>(())
        };
        for index in files {
            let index = index as usize;
            let path = dir.join(&entries[index].path);
            if tasks.len() >= jobs
                && let Some(done) = tasks.join_next().await
            {
                record(&mut sent, entries, done)?;
            }
            let (store, progress) = (self.store.clone(), progress.clone());
            let (hashing, claimed) = (hashing.clone(), claimed.clone());
            let (known, cache) = (known.clone(), cache.clone());
            tasks.spawn(async move {
                let (mut read, stamp, seen) = {
                    let _core = hashing.acquire_owned().await;
                    let (file, bucket_has) = (path.clone(), known.clone());
                    tokio::task::spawn_blocking(move || recall_or_read(&file, &cache, &bucket_has))
                        .await
                        .map_err(|e| Error::Invalid(e.to_string()))?
                        .map_err(|e| ScanError {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?
                };
                let sha256 = Digest(read.sha256);
                let fresh = !known.contains(&sha256)
                    && claimed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(sha256);
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
                Ok::<_, Error>((index, read, stamp, seen, created))
            });
        }
        while let Some(done) = tasks.join_next().await {
            record(&mut sent, entries, done)?;
        }
        Ok(sent)
    }
}

/// Looks at one file: when `cache` remembers its hash and the bucket has that body, nothing is
/// read; otherwise the file is read and hashed. Also returns the file's stamp and when it was
/// taken (before the stat, so a write racing the read makes the entry racy).
fn recall_or_read(
    path: &Path,
    cache: &HashCache,
    known: &Bodies,
) -> std::io::Result<(ReadBody, Stamp, i64)> {
    let seen = now_ns();
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("no longer a regular file"));
    }
    let stamp = Stamp::of(&meta);
    if let Some(sha256) = cache.lookup(&stamp)
        && known.contains(&Digest(sha256))
    {
        let size = meta.len();
        let read = ReadBody {
            sha256,
            size,
            bytes: None,
        };
        return Ok((read, stamp, seen));
    }
    Ok((read_body(path, meta.len(), SMALL_BODY)?, stamp, seen))
}
