//! Building one tree: fetch (or find) every body, verify it, link it into a scratch tree, and
//! rename the finished tree into place.
//!
//! Stored versions fetch their bodies from the bucket in parallel; Git commits are fetched
//! shallowly, hashed, and their files moved into the blob store, so both end as the same kind
//! of tree and share bodies with each other.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::fill::Progress;
use super::{Cache, Error, RECORD_FORMAT, Record, Result, now_ns, remove_any};
use crate::dataset::gitpolicy::Admitted;
use crate::dataset::manifest::{Digest, Entry, EntryKind};
use crate::dataset::pin::Pin;
use crate::dataset::repo::{Repo, blob_key};
use crate::dataset::spool::{Spool, SpoolWriter};
use crate::dataset::store::{BucketStore, DOWNLOAD_BATCH, ObjectStore};
use crate::dataset::{Selector, git, scan};
use crate::error::Kind;

/// The permission bits a cached file gets: the manifest's rwx bits, never set-id or sticky
/// (the tree is owned by root; a dataset must not smuggle a set-uid binary into a pod).
pub(super) fn file_mode(mode: u32) -> u32 {
    mode & 0o777
}

/// Bodies downloaded by this process (for the `cache.fill.downloaded:N` failpoint).
static DOWNLOADED: AtomicU64 = AtomicU64::new(0);
static SCRATCH: AtomicU64 = AtomicU64::new(0);

fn io(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    move |err| Error::io(context, err)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::internal(format!("cache task failed: {e}")))?
}

impl Cache {
    fn blob_path(&self, sha256: &Digest, mode: u32) -> PathBuf {
        let hex = sha256.to_string();
        self.root
            .join("blobs")
            .join(&hex[..2])
            .join(format!("{hex}.{:03o}", file_mode(mode)))
    }

    /// Builds the tree of `pin` (see the module doc) and returns its path.
    pub(super) async fn build(
        self: &Arc<Self>,
        pin: &Pin,
        progress: &Arc<Progress>,
    ) -> Result<PathBuf> {
        let scratch = self.root.join("tmp").join(format!(
            "build-{}-{}-{}",
            pin.key(),
            std::process::id(),
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&scratch).map_err(io(scratch.display()))?;
        if crate::failpoint::configured().as_deref() == Some("delay:cache.fill") {
            // Test hook: a download slower than the publish timeout.
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        let result = self.build_in(pin, &scratch, progress).await;
        let leftover = scratch.clone();
        let _ = tokio::task::spawn_blocking(move || remove_any(&leftover)).await;
        result
    }

    async fn build_in(
        self: &Arc<Self>,
        pin: &Pin,
        scratch: &Path,
        progress: &Arc<Progress>,
    ) -> Result<PathBuf> {
        let (entries, repo) = self.entries_of(pin, scratch).await?;
        let entries = Arc::new(entries);
        progress.files_total.store(entries.files, Ordering::Relaxed);
        progress.bytes_total.store(entries.bytes, Ordering::Relaxed);
        // The files in (body, mode) order, each run of one body and mode one fetch and many
        // links: sorted on disk, and written out once more while counting what must come in.
        let (this, all, at) = (self.clone(), entries.clone(), scratch.to_owned());
        let (by_body, incoming) = blocking(move || this.order_by_body(&all, &at)).await?;
        let (this, room_pin) = (self.clone(), pin.clone());
        blocking(move || this.make_room(incoming, &room_pin)).await?;

        let tree = scratch.join("tree");
        let (tree_for_dirs, all) = (tree.clone(), entries.clone());
        blocking(move || {
            std::fs::create_dir_all(&tree_for_dirs).map_err(io(tree_for_dirs.display()))?;
            for entry in all.read().map_err(io("the tree's entries"))? {
                let entry = entry.map_err(io("the tree's entries"))?;
                if entry.kind == EntryKind::Dir {
                    let path = tree_for_dirs.join(&entry.path);
                    std::fs::create_dir_all(&path).map_err(io(path.display()))?;
                }
            }
            Ok(())
        })
        .await?;

        // At most `jobs` chunks at once, and only that many tasks exist: a task is spawned
        // when one finishes (a task per body up front costs memory per file). The chunks of
        // one body share its fetch.
        let jobs = self.settings().jobs.max(1);
        let mut tasks = tokio::task::JoinSet::new();
        let failed = |e: tokio::task::JoinError| Error::internal(format!("cache task failed: {e}"));
        let reading = by_body.read().map_err(io("the tree's bodies"))?;
        let mut batches = crate::dataset::spool::batches(reading, 256);
        let mut body: Option<((Digest, u32), Fetch)> = None;
        let mut chunk: Vec<Entry> = Vec::new();
        let spawn =
            |tasks: &mut tokio::task::JoinSet<Result<()>>, chunk: Vec<Entry>, fetch: &Fetch| {
                let (this, fetch, tree) = (self.clone(), fetch.clone(), tree.clone());
                tasks.spawn(async move { this.link_chunk(fetch, chunk, &tree).await });
            };
        while let Some(batch) = batches.recv().await {
            for entry in batch.map_err(io("the tree's bodies"))? {
                let key = body_key(&entry);
                let same = body.as_ref().is_some_and(|(k, _)| *k == key);
                if !chunk.is_empty() && (!same || chunk.len() >= CHUNK) {
                    if tasks.len() >= jobs
                        && let Some(done) = tasks.join_next().await
                    {
                        done.map_err(failed)??;
                    }
                    let (_, fetch) = body.as_ref().expect("a chunk has its body");
                    spawn(&mut tasks, std::mem::take(&mut chunk), fetch);
                }
                if !same {
                    let source = Source {
                        repo: repo.clone(),
                        sha: digest_of(&entry),
                        mode: entry.mode,
                        size: entry.size,
                        scratch: scratch.to_owned(),
                        progress: progress.clone(),
                    };
                    body = Some((key, self.fetch(source)));
                }
                chunk.push(entry);
            }
        }
        if let Some((_, fetch)) = body.as_ref().filter(|_| !chunk.is_empty()) {
            spawn(&mut tasks, chunk, fetch);
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(failed)??;
        }
        let (this, pin) = (self.clone(), pin.clone());
        blocking(move || this.finish_tree(pin, &entries, &tree)).await
    }

    /// The files of `entries` in (body, mode) order, spooled under `scratch`, and the bytes of
    /// the bodies the cache lacks.
    fn order_by_body(&self, entries: &Spool, scratch: &Path) -> Result<(Spool, u64)> {
        let failed = io("order the tree's files by body");
        let run = |e: crate::dataset::spool::Problem| Error::internal(e.to_string());
        let sorted = entries
            .sorted(|e| e.kind == EntryKind::File, body_key, scratch)
            .map_err(io("order the tree's files by body"))?;
        let mut out = SpoolWriter::unchecked(scratch).map_err(io(scratch.display()))?;
        let (mut incoming, mut last) = (0, None);
        for entry in sorted {
            let entry = entry.map_err(io("order the tree's files by body"))?;
            let key = body_key(&entry);
            if last != Some(key) {
                if !self.blob_path(&key.0, entry.mode).exists() {
                    incoming += entry.size;
                }
                last = Some(key);
            }
            out.push(&entry).map_err(run)?;
        }
        Ok((out.finish().map_err(failed)?, incoming))
    }

    /// The entries a pin names, spooled under `scratch`: a committed stored version's (and
    /// the repository to fetch its bodies from), or a Git commit's, imported into `scratch`.
    async fn entries_of(
        self: &Arc<Self>,
        pin: &Pin,
        scratch: &Path,
    ) -> Result<(Spool, Option<Repo<BucketStore>>)> {
        match pin {
            Pin::Stored {
                bucket,
                name,
                version,
            } => {
                let repo = self.sources().repo(Some(bucket)).await?;
                let read = repo
                    .resolve_in(name, &Selector::Named(version.clone()), scratch)
                    .await?;
                if read.head.version != *version || !read.head.committed {
                    return Err(Error::new(
                        Kind::FailedPrecondition,
                        format!("{pin} is not a committed version of {bucket}/{name}"),
                    ));
                }
                Ok((read.entries, Some(repo)))
            }
            Pin::Git { url, commit } => {
                // Checked again at fetch time: the policy or the host's address may have
                // changed since the volume was pinned.
                let admitted = self.sources().admit_git(url).await?;
                let this = self.clone();
                let (url, commit, scratch) = (url.clone(), commit.clone(), scratch.to_owned());
                let entries = blocking(move || {
                    let entries = this.import_git(&url, &commit, &scratch, &admitted)?;
                    Spool::collect(&scratch, entries.into_iter().map(Ok::<_, String>))
                        .map_err(|e| Error::internal(format!("spool the commit's entries: {e}")))
                })
                .await?;
                Ok((entries, None))
            }
        }
    }

    /// A fetch of one body, shared by every chunk of files that names it.
    fn fetch(self: &Arc<Self>, source: Source) -> Fetch {
        let this = self.clone();
        async move {
            let blob = this.ensure_blob(&source).await?;
            Ok((blob, source))
        }
        .boxed()
        .shared()
    }

    /// Hard-links the body `fetch` brings at every path of `chunk`, which all name that body
    /// with the same mode.
    async fn link_chunk(
        self: Arc<Self>,
        fetch: Fetch,
        chunk: Vec<Entry>,
        tree: &Path,
    ) -> Result<()> {
        let (mut blob, source) = fetch.await?;
        // The body is what its hash says; the manifest must also say its true size (a tree
        // whose sizes lie would fail every later check of the tree).
        let actual = std::fs::metadata(&blob)
            .map(|m| m.len())
            .unwrap_or(u64::MAX);
        if let Some(liar) = chunk.iter().find(|e| e.size != actual) {
            tracing::warn!(path = %liar.path, body = %source.sha, "the manifest's size for a file differs from its body");
            return Err(damaged(format!(
                "the manifest says {} is {} bytes, but its body {} has {actual}",
                liar.path, liar.size, source.sha
            )));
        }
        for entry in &chunk {
            let target = tree.join(&entry.path);
            match link(&blob, &target) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // The body was collected between fetch and link: fetch it again.
                    blob = self.ensure_blob(&source).await?;
                    link(&blob, &target).map_err(io(target.display()))?;
                }
                other => other.map_err(io(target.display()))?,
            }
            source.progress.file_done(entry.size);
        }
        Ok(())
    }

    /// Symlinks and directory modes (each directory once its subtree is done, so a read-only
    /// parent is set last), then the tree moves to its place and its record is written: the
    /// tree exists only once whole.
    fn finish_tree(&self, pin: Pin, entries: &Spool, tree: &Path) -> Result<PathBuf> {
        let set_mode = |(dir, mode): (String, u32)| {
            let path = tree.join(dir);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file_mode(mode)))
                .map_err(io(path.display()))
        };
        // The directories open on the way down: a directory's mode is set when the walk
        // leaves it.
        let mut open: Vec<(String, u32)> = Vec::new();
        for entry in entries.read().map_err(io("the tree's entries"))? {
            let entry = entry.map_err(io("the tree's entries"))?;
            while let Some((dir, _)) = open.last() {
                let inside = entry.path.strip_prefix(dir.as_str());
                if inside.is_some_and(|rest| rest.starts_with('/')) {
                    break;
                }
                set_mode(open.pop().expect("not empty"))?;
            }
            match entry.kind {
                EntryKind::Symlink => {
                    let path = tree.join(&entry.path);
                    std::os::unix::fs::symlink(entry.target.as_deref().unwrap_or_default(), &path)
                        .map_err(io(path.display()))?;
                }
                EntryKind::Dir => open.push((entry.path, entry.mode)),
                EntryKind::File => {}
            }
        }
        while let Some(dir) = open.pop() {
            set_mode(dir)?;
        }
        let key = pin.key();
        let record = Record {
            format: RECORD_FORMAT,
            files: entries.files as usize,
            bytes: entries.bytes,
            built_ns: now_ns(),
            pin,
        };
        let place = self.trees().join(&key);
        if self.record(&key).is_some() {
            // Another process finished the same tree first; theirs is as good.
            return Ok(place);
        }
        remove_any(&place);
        std::fs::rename(tree, &place).map_err(io(place.display()))?;
        // Streamed out: the record's head, then the entries' lines.
        let record_path = self.record_path(&key);
        crate::fsutil::atomic_write_with(&record_path, crate::fsutil::Durability::Synced, |out| {
            serde_json::to_writer(&mut *out, &record).map_err(std::io::Error::other)?;
            out.write_all(b"\n")?;
            std::io::copy(&mut entries.lines()?, out).map(drop)
        })
        .map_err(io(record_path.display()))?;
        Ok(place)
    }

    /// The verified blob of a body with its mode: already cached (re-hashed), copied from the
    /// same body with another mode, or downloaded (hashed while written). A body that does
    /// not match its hash is fetched once more, then refused.
    async fn ensure_blob(self: &Arc<Self>, source: &Source) -> Result<PathBuf> {
        let Source {
            repo,
            sha: sha256,
            mode,
            size,
            scratch,
            progress,
        } = source;
        let (sha256, mode, size) = (sha256, *mode, *size);
        let blob = self.blob_path(sha256, mode);
        let temp = scratch.join(format!(
            "blob-{sha256}-{mode:o}-{}",
            SCRATCH.fetch_add(1, Ordering::Relaxed)
        ));
        let (check_blob, check_temp, sha) = (blob.clone(), temp.clone(), *sha256);
        let local = blocking(move || Ok(local_copy(&check_blob, &check_temp, &sha))).await?;
        if local {
            return place_blob(&temp, &blob, mode).map(|()| blob);
        }
        let Some(repo) = repo.as_ref() else {
            return Err(Error::internal(format!(
                "body {sha256} vanished from the node cache while the tree was built; retry"
            )));
        };
        let _held = repo.budget().hold(size.min(DOWNLOAD_BATCH as u64)).await;
        for attempt in 0..2 {
            let _ = std::fs::remove_file(&temp);
            let digest = repo
                .store()
                .get_to_file(&blob_key(sha256), &temp)
                .await
                .map_err(crate::dataset::repo::Error::from)?;
            let Some(digest) = digest else {
                tracing::warn!(object = %blob_key(sha256), "a body the manifest names is missing from the bucket");
                return Err(damaged(format!("body {sha256} is missing from the bucket")));
            };
            if digest[..] == sha256.0[..] {
                place_blob(&temp, &blob, mode)?;
                progress.bytes_downloaded.fetch_add(size, Ordering::Relaxed);
                let n = DOWNLOADED.fetch_add(1, Ordering::Relaxed) + 1;
                if crate::failpoint::count("cache.fill.downloaded") == Some(n) {
                    crate::failpoint::kill("cache.fill.downloaded");
                }
                return Ok(blob);
            }
            tracing::warn!(
                body = %sha256,
                attempt,
                "downloaded body does not match its SHA-256; fetching again"
            );
        }
        let _ = std::fs::remove_file(&temp);
        tracing::warn!(object = %blob_key(sha256), "a body in the bucket does not match its SHA-256");
        Err(damaged(format!(
            "body {sha256} from the bucket does not match its SHA-256 (fetched twice); not used"
        )))
    }

    /// Fetches commit `commit` of `url`, hashes its files and moves them into the blob store;
    /// returns the manifest entries of the commit.
    fn import_git(
        &self,
        url: &str,
        commit: &str,
        scratch: &Path,
        admitted: &Admitted,
    ) -> Result<Vec<Entry>> {
        let checkout = scratch.join("git");
        git::fetch(url, commit, commit, &checkout, admitted)?;
        let entries = scan::scan(&checkout, self.settings().jobs.clamp(1, 8))
            .map_err(crate::dataset::repo::Error::from)?;
        for entry in entries.iter().filter(|e| e.kind == EntryKind::File) {
            let blob = self.blob_path(&digest_of(entry), entry.mode);
            if !blob.exists() {
                place_blob(&checkout.join(&entry.path), &blob, entry.mode)?;
            }
        }
        Ok(entries)
    }
}

/// A dataset version whose stored content fails its own checks: retrying will not help until
/// the bucket is repaired (DATA_LOSS).
fn damaged(what: String) -> Error {
    Error::new(
        Kind::DataLoss,
        format!("the dataset version is damaged: {what}; re-push it or fix the bucket"),
    )
}

/// Hard-links `blob` at `target`; a body linked too often (EMLINK) is copied instead.
fn link(blob: &Path, target: &Path) -> std::io::Result<()> {
    match std::fs::hard_link(blob, target) {
        Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => {
            std::fs::copy(blob, target).map(drop)
        }
        other => other,
    }
}

/// True when a verified copy of body `sha256` is ready: `blob` itself (re-hashed; a damaged
/// one is removed), or a copy at `temp` of the same body cached with another mode.
fn local_copy(blob: &Path, temp: &Path, sha256: &Digest) -> bool {
    let verified = |path: &Path| {
        std::fs::File::open(path)
            .and_then(crate::copy::file::sha256)
            .is_ok_and(|d| d[..] == sha256.0[..])
    };
    if blob.exists() {
        if verified(blob) {
            return true;
        }
        tracing::warn!(body = %sha256, "cached body is damaged; fetching it again");
        let _ = std::fs::remove_file(blob);
    }
    let Some(shard) = blob.parent() else {
        return false;
    };
    let hex = sha256.to_string();
    let siblings = std::fs::read_dir(shard).into_iter().flatten().flatten();
    for sibling in siblings {
        let path = sibling.path();
        let same_body = sibling
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&hex) && path != blob);
        if same_body && std::fs::copy(&path, temp).is_ok() {
            if verified(temp) {
                return true;
            }
            let _ = std::fs::remove_file(temp);
        }
    }
    false
}

/// Gives a verified body its mode and moves it to its blob path (no-op when already there).
fn place_blob(temp: &Path, blob: &Path, mode: u32) -> Result<()> {
    if !temp.exists() && blob.exists() {
        return Ok(());
    }
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(file_mode(mode)))
        .map_err(io(temp.display()))?;
    if let Some(shard) = blob.parent() {
        std::fs::create_dir_all(shard).map_err(io(shard.display()))?;
    }
    std::fs::rename(temp, blob).map_err(io(blob.display()))
}

/// One body to fetch: its hash, mode and size, where it comes from, where to download it,
/// and where to report progress.
#[derive(Clone)]
struct Source {
    repo: Option<Repo<BucketStore>>,
    sha: Digest,
    mode: u32,
    size: u64,
    scratch: PathBuf,
    progress: Arc<Progress>,
}

/// A body's fetch, shared by the chunks of files that name it.
type Fetch = Shared<BoxFuture<'static, Result<(PathBuf, Source)>>>;

/// Files linked by one task (a body named by more files is linked by several).
const CHUNK: usize = 1024;

/// The order files are fetched in: by body, then by the mode the cached body has.
fn body_key(entry: &Entry) -> (Digest, u32) {
    (digest_of(entry), file_mode(entry.mode))
}

/// The body a file entry names (a validated manifest gives every file one).
fn digest_of(entry: &Entry) -> Digest {
    entry.sha256.unwrap_or(Digest([0; 32]))
}
