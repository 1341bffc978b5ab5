//! Pushing a directory as a new version: walk and check, then read, hash and send each body
//! once, many at a time, and only then claim the next version number.
//!
//! Rules: nothing is read or sent when the tree has a path or link a manifest cannot hold; a
//! body the parent version names, or one this push sent, is not sent again (past
//! [`CLAIMED`] bodies sent, the bucket's put-if-absent stops a second copy); no version
//! exists until every body it names is in the bucket.
//!
//! Memory does not grow with the tree: the walk is spooled on disk in tree order, each
//! file's hash and stamp go to a fixed-size record of a side file as it is hashed, and one
//! ordered pass over both writes the manifest's entries and the next hash cache.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use super::{
    Error, Finish, PushReport, Repo, Result, Version, blob_key, check_tag, now, version_number,
};
use crate::dataset::bodies::Bodies;
use crate::dataset::hashcache::{CacheWriter, HashCache, Remembered, Stamp, now_ns};
use crate::dataset::manifest::{Digest, EntryKind, FORMAT, Head};
use crate::dataset::reference::Selector;
use crate::dataset::scan::{ReadBody, ScanError, read_body, walk_tree};
use crate::dataset::spool::{self, Problem, Spool, SpoolWriter};
use crate::dataset::store::{Blob, ObjectStore};

/// Bodies up to this size are read into memory, hashed, and sent with one conditional PUT;
/// larger ones are streamed from their file after a HEAD says the bucket lacks them.
const SMALL_BODY: u64 = 8 << 20;

/// Bodies sent by this push that are remembered, so a body found twice is sent once.
pub const CLAIMED: usize = 32 << 10;

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
        // while a version names them): kept as a sorted set, the version's entries dropped.
        let spool_dir = self.spool_dir.clone();
        let (parent, known) = match self.resolve(name, &Selector::Latest).await.ok() {
            Some(latest) => {
                let at = spool_dir.clone();
                let (parent, known) = blocking(move || Parent::of(latest, &at)).await?;
                (Some(parent), known)
            }
            None => (None, Bodies::default()),
        };
        let (root, exclude, at) = (dir.to_owned(), self.exclude.clone(), spool_dir.clone());
        let walked = Arc::new(blocking(move || Ok(walk_tree(&root, &exclude, &at)?)).await?);
        let cache = match &self.hash_cache {
            Some(cache_dir) => HashCache::open(cache_dir, dir),
            None => HashCache::disabled(),
        };
        let sent = self
            .send_bodies(dir, walked.clone(), Arc::new(known), &cache)
            .await?;
        // One ordered pass: the manifest's entries, and the hashes as facts about the files
        // whatever happens to this push next.
        let (remembered, results, at) = (cache.writer(), sent.results, spool_dir.clone());
        let entries =
            blocking(move || hashed_entries(&walked, results.as_file(), remembered, &at)).await?;
        // Nothing changed since the latest version: that version is the answer (every body
        // was known, so nothing was sent).
        if commit
            && tag.is_none()
            && let Some(parent) = parent.as_ref().filter(|p| p.sha256 == entries.sha256)
        {
            return Ok(PushReport {
                version: parent.head.version.clone(),
                committed: true,
                files: parent.head.files as usize,
                bytes: parent.head.bytes,
                bodies_uploaded: 0,
                bytes_uploaded: 0,
                unchanged: true,
                message_not_recorded: (!message.is_empty() && message != parent.head.message)
                    .then(|| message.to_owned()),
                kept_message: Some(parent.head.message.clone()),
            });
        }
        let head = Head {
            format: FORMAT,
            dataset: name.to_owned(),
            version: String::new(),
            parent: parent.map(|p| p.head.version),
            message: message.to_owned(),
            created_unix: now(),
            committed: commit,
            files: entries.files,
            bytes: entries.bytes,
        };
        let head = self.claim_version(name, Version { head, entries }).await?;
        if let Some(tag) = tag {
            self.tag(name, &Selector::Named(head.version.clone()), tag)
                .await?;
        }
        Ok(PushReport {
            version: head.version,
            committed: commit,
            files: head.files as usize,
            bytes: head.bytes,
            bodies_uploaded: sent.uploaded,
            bytes_uploaded: sent.bytes_uploaded,
            ..Default::default()
        })
    }

    /// Writes `version` as the dataset's next version. The store's put-if-absent makes the
    /// number a claim: a concurrent pusher that got there first makes this one take the next.
    async fn claim_version(&self, name: &str, mut version: Version) -> Result<Head> {
        let mut next = self
            .version_ids(name)
            .await?
            .last()
            .and_then(|v| version_number(v))
            .unwrap_or(0)
            + 1;
        loop {
            version.head.version = format!("v{next}");
            let key = Self::manifest_key(name, &version.head.version);
            let (written, file, sha256) = self.write_manifest(version).await?;
            let body = Blob::File(file.path().to_owned());
            if self.store.put_blob(&key, body, &sha256, true).await? {
                return Ok(written.head);
            }
            (version, next) = (written, next + 1);
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(e.to_string()))?
}

/// What a push keeps of the latest version: its head and the digest of its entries (to
/// answer for an unchanged tree), and the set of its bodies — not its entries.
struct Parent {
    head: Head,
    sha256: [u8; 32],
}

impl Parent {
    fn of(version: Version, spool_dir: &Path) -> Result<(Parent, Bodies)> {
        let io = |e: std::io::Error| Error::Io {
            context: format!("read the entries of {}", version.head.version),
            source: e,
        };
        let digests = version
            .entries
            .read()
            .map_err(io)?
            .filter_map(|entry| entry.map(|e| e.sha256).transpose());
        let known = Bodies::collect(digests, spool_dir).map_err(io)?;
        let parent = Parent {
            sha256: version.entries.sha256,
            head: version.head,
        };
        Ok((parent, known))
    }
}

/// The bodies this push sent, up to [`CLAIMED`]; past that the set starts over.
#[derive(Default)]
struct Claimed(HashSet<Digest>);

impl Claimed {
    /// True when `body` was not sent by this push as far as it remembers: the caller sends it.
    fn claim(&mut self, body: Digest) -> bool {
        if self.0.len() >= CLAIMED {
            self.0.clear();
        }
        self.0.insert(body)
    }
}

/// One file's record in the side file: size, SHA-256, stamp, and when the stamp was taken.
const RECORD: usize = 8 + 32 + Stamp::BYTES + 8;

fn record_bytes(read: &ReadBody, stamp: &Stamp, seen: i64) -> [u8; RECORD] {
    let mut record = [0u8; RECORD];
    record[..8].copy_from_slice(&read.size.to_le_bytes());
    record[8..40].copy_from_slice(&read.sha256);
    record[40..40 + Stamp::BYTES].copy_from_slice(&stamp.to_bytes());
    record[40 + Stamp::BYTES..].copy_from_slice(&seen.to_le_bytes());
    record
}

/// What [`Repo::send_bodies`] did: the side file of records (one per file, in walk order),
/// and what was uploaded.
struct Sent {
    results: tempfile::NamedTempFile,
    uploaded: usize,
    bytes_uploaded: u64,
}

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    /// Hashes every file of `walked` (under `dir`), recording each file's size, hash and
    /// stamp in the side file, and uploads each body that is neither `known` nor already sent
    /// by this push, as soon as it is hashed: reading, hashing and sending overlap. A file
    /// `cache` remembers, whose body is `known`, is not read at all. A body of at most
    /// [`SMALL_BODY`] bytes is read once, hashed and sent from memory with one conditional
    /// PUT; a larger one is streamed from its file after a HEAD says the bucket lacks it. At
    /// most `jobs` bodies are in flight, and hashing uses at most one thread per core.
    async fn send_bodies(
        &self,
        dir: &Path,
        walked: Arc<Spool>,
        known: Arc<Bodies>,
        cache: &HashCache,
    ) -> Result<Sent> {
        let progress = self.progress.clone();
        progress.start(walked.files, walked.bytes);
        let _finish = Finish(&progress);
        let results = tempfile::Builder::new()
            .prefix(".lanes-hashed-")
            .tempfile_in(&self.spool_dir)
            .map_err(|e| Error::Io {
                context: format!("create a temporary file in {}", self.spool_dir.display()),
                source: e,
            })?;
        let side = Arc::new(results.reopen().map_err(|e| Error::Io {
            context: "reopen the push's side file".into(),
            source: e,
        })?);
        // At most `jobs` bodies in flight, and only that many tasks exist: a task is spawned
        // when one finishes (a task per file up front costs memory per file).
        let jobs = self.jobs.max(1);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let hashing = Arc::new(Semaphore::new(cores));
        let claimed = Arc::new(Mutex::new(Claimed::default()));
        let mut tasks = tokio::task::JoinSet::new();
        let mut sent = Sent {
            results,
            uploaded: 0,
            bytes_uploaded: 0,
        };
        // Test hook: `LANES_FAILPOINT=dataset.push.uploaded:N` dies after N uploads, before
        // the manifest is written.
        let kill_at = crate::failpoint::count("dataset.push.uploaded");
        let record =
            |sent: &mut Sent, done: Result<Result<(u64, bool)>, tokio::task::JoinError>| {
                let (size, created) = done.map_err(|e| Error::Invalid(e.to_string()))??;
                if created {
                    sent.uploaded += 1;
                    sent.bytes_uploaded += size;
                    if kill_at == Some(sent.uploaded as u64) {
                        crate::failpoint::kill("dataset.push.uploaded");
                    }
                }
                Ok::<_, Error>(())
            };
        // The walk's files, each with what the cache remembers of it, read alongside.
        let mut hints = cache.hints();
        let files = walked
            .read()
            .map_err(|e| Error::Io {
                context: "read the walked tree back".into(),
                source: e,
            })?
            .filter(|entry| entry.as_ref().map_or(true, |e| e.kind == EntryKind::File))
            .map(move |entry| {
                entry.map(|entry| {
                    let remembered = hints.get(&entry.path);
                    (entry.path, entry.size, remembered)
                })
            });
        let mut batches = spool::batches(files, 256);
        let mut index: u64 = 0;
        while let Some(batch) = batches.recv().await {
            let batch = batch.map_err(|e| Error::Io {
                context: "read the walked tree back".into(),
                source: e,
            })?;
            for (rel, size, remembered) in batch {
                if tasks.len() >= jobs
                    && let Some(done) = tasks.join_next().await
                {
                    record(&mut sent, done)?;
                }
                let path = dir.join(&rel);
                let (store, progress, side) = (self.store.clone(), progress.clone(), side.clone());
                let (hashing, claimed, known) = (hashing.clone(), claimed.clone(), known.clone());
                let budget = self.budget.clone();
                let at = index * RECORD as u64;
                index += 1;
                tasks.spawn(async move {
                    // A small body is in memory from its read until it is sent.
                    let _held = budget.hold(size.min(SMALL_BODY)).await;
                    let mut read = {
                        let _core = hashing.acquire_owned().await;
                        let (file, bucket_has) = (path.clone(), known.clone());
                        tokio::task::spawn_blocking(move || {
                            let (read, stamp, seen) =
                                recall_or_read(&file, remembered, &bucket_has)?;
                            side.write_all_at(&record_bytes(&read, &stamp, seen), at)?;
                            Ok::<_, std::io::Error>(read)
                        })
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
                            .claim(sha256);
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
                    Ok::<_, Error>((read.size, created))
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            record(&mut sent, done)?;
        }
        Ok(sent)
    }
}

/// The pushed version's entries: the walk's, in order, each file given the size and hash its
/// record holds; each file's hash is also remembered for the next push.
fn hashed_entries(
    walked: &Spool,
    results: &std::fs::File,
    mut remembered: Option<CacheWriter>,
    spool_dir: &Path,
) -> Result<Spool> {
    let io = |e: std::io::Error| Error::Io {
        context: format!("write the pushed entries in {}", spool_dir.display()),
        source: e,
    };
    let mut records = std::io::BufReader::with_capacity(1 << 16, results);
    let mut out = SpoolWriter::checked(spool_dir).map_err(io)?;
    for entry in walked.read().map_err(io)? {
        let mut entry = entry.map_err(io)?;
        if entry.kind == EntryKind::File {
            let mut record = [0u8; RECORD];
            records.read_exact(&mut record).map_err(io)?;
            let size = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
            let sha256: [u8; 32] = record[8..40].try_into().expect("32 bytes");
            let stamp = Stamp::from_bytes(&record[40..40 + Stamp::BYTES]);
            let seen = i64::from_le_bytes(record[40 + Stamp::BYTES..].try_into().expect("8"));
            (entry.size, entry.sha256) = (size, Some(Digest(sha256)));
            if let Some(remembered) = remembered.as_mut() {
                remembered.remember(&entry.path, stamp, sha256, seen);
            }
        }
        out.push(&entry).map_err(|e| match e {
            Problem::Io(e) => io(e),
            Problem::Invalid(reason) => Error::Invalid(reason),
        })?;
    }
    if let Some(remembered) = remembered {
        remembered.finish();
    }
    out.finish().map_err(io)
}

/// Looks at one file: when the cache remembers its hash for the file as it is now and the
/// bucket has that body, nothing is read; otherwise the file is read and hashed. Also returns
/// the file's stamp and when it was taken (before the stat, so a write racing the read makes
/// the entry racy).
fn recall_or_read(
    path: &Path,
    remembered: Option<Remembered>,
    known: &Bodies,
) -> std::io::Result<(ReadBody, Stamp, i64)> {
    let seen = now_ns();
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("no longer a regular file"));
    }
    let stamp = Stamp::of(&meta);
    if let Some(sha256) = remembered.and_then(|r| r.hash_for(&stamp))
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
