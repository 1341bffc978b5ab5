//! Building one tree: fetch (or find) every body, verify it, link it into a scratch tree, and
//! rename the finished tree into place.
//!
//! Stored versions fetch their bodies from the bucket in parallel; Git commits are fetched
//! shallowly, hashed, and their files moved into the blob store, so both end as the same kind
//! of tree and share bodies with each other.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::fill::Progress;
use super::{Cache, Error, Record, Result, now_ns, remove_any};
use crate::dataset::gitpolicy::Admitted;
use crate::dataset::manifest::{Digest, Entry, EntryKind};
use crate::dataset::pin::Pin;
use crate::dataset::repo::{Repo, blob_key};
use crate::dataset::store::{BucketStore, ObjectStore};
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
        let (order, groups) = bodies_of(&entries);
        progress
            .files_total
            .store(order.len() as u64, Ordering::Relaxed);
        progress.bytes_total.store(
            order.iter().map(|&i| entries[i as usize].size).sum(),
            Ordering::Relaxed,
        );
        let first = |group: &std::ops::Range<usize>| &entries[order[group.start] as usize];
        let incoming: u64 = groups
            .iter()
            .map(first)
            .filter(|e| !self.blob_path(&digest_of(e), e.mode).exists())
            .map(|e| e.size)
            .sum();
        let (this, room_pin) = (self.clone(), pin.clone());
        blocking(move || this.make_room(incoming, &room_pin)).await?;

        let tree = scratch.join("tree");
        let dirs: Vec<Entry> = entries
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .cloned()
            .collect();
        let (tree_for_dirs, dirs_for_mkdir) = (tree.clone(), dirs.clone());
        blocking(move || {
            std::fs::create_dir_all(&tree_for_dirs).map_err(io(tree_for_dirs.display()))?;
            for dir in &dirs_for_mkdir {
                let path = tree_for_dirs.join(&dir.path);
                std::fs::create_dir_all(&path).map_err(io(path.display()))?;
            }
            Ok(())
        })
        .await?;

        // At most `jobs` bodies at once, and only that many tasks exist: a task is spawned
        // when one finishes (a task per body up front costs memory per file).
        let jobs = self.settings().jobs.max(1);
        let mut tasks = tokio::task::JoinSet::new();
        let failed = |e: tokio::task::JoinError| Error::internal(format!("cache task failed: {e}"));
        let (entries, order) = (Arc::new(entries), Arc::new(order));
        for group in groups {
            if tasks.len() >= jobs
                && let Some(done) = tasks.join_next().await
            {
                done.map_err(failed)??;
            }
            let (this, repo, tree, scratch, progress) = (
                self.clone(),
                repo.clone(),
                tree.clone(),
                scratch.to_owned(),
                progress.clone(),
            );
            let (entries, order) = (entries.clone(), order.clone());
            tasks.spawn(async move {
                let group: Vec<&Entry> =
                    order[group].iter().map(|&i| &entries[i as usize]).collect();
                let body = Body {
                    repo: repo.as_ref(),
                    sha: &digest_of(group[0]),
                    mode: group[0].mode,
                    scratch: &scratch,
                    progress: &progress,
                };
                this.link_group(body, &group, &tree).await
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.map_err(failed)??;
        }
        drop(order);
        let entries = Arc::try_unwrap(entries)
            .map_err(|_| Error::internal("a cache task outlived the fill"))?;

        let (this, pin) = (self.clone(), pin.clone());
        blocking(move || this.finish_tree(pin, entries, dirs, &tree)).await
    }

    /// The entries a pin names: a committed stored version's manifest (and the repository to
    /// fetch its bodies from), or a Git commit imported into `scratch`.
    async fn entries_of(
        self: &Arc<Self>,
        pin: &Pin,
        scratch: &Path,
    ) -> Result<(Vec<Entry>, Option<Repo<BucketStore>>)> {
        match pin {
            Pin::Stored {
                bucket,
                name,
                version,
            } => {
                let repo = self.sources().repo(Some(bucket)).await?;
                let manifest = repo
                    .resolve(name, &Selector::Named(version.clone()))
                    .await?;
                if manifest.version != *version || !manifest.committed {
                    return Err(Error::new(
                        Kind::FailedPrecondition,
                        format!("{pin} is not a committed version of {bucket}/{name}"),
                    ));
                }
                Ok((manifest.entries, Some(repo)))
            }
            Pin::Git { url, commit } => {
                // Checked again at fetch time: the policy or the host's address may have
                // changed since the volume was pinned.
                let admitted = self.sources().admit_git(url).await?;
                let this = self.clone();
                let (url, commit, scratch) = (url.clone(), commit.clone(), scratch.to_owned());
                let entries =
                    blocking(move || this.import_git(&url, &commit, &scratch, &admitted)).await?;
                Ok((entries, None))
            }
        }
    }

    /// Fetches (or finds) one body and hard-links it at every path of `group`, which all name
    /// that body with the same mode.
    async fn link_group(
        self: &Arc<Self>,
        body: Body<'_>,
        group: &[&Entry],
        tree: &Path,
    ) -> Result<()> {
        let mut blob = self.ensure_blob_for(&body, group[0].size).await?;
        // The body is what its hash says; the manifest must also say its true size (a tree
        // whose sizes lie would fail every later check of the tree).
        let actual = std::fs::metadata(&blob)
            .map(|m| m.len())
            .unwrap_or(u64::MAX);
        if let Some(liar) = group.iter().find(|e| e.size != actual) {
            tracing::warn!(path = %liar.path, body = %body.sha, "the manifest's size for a file differs from its body");
            return Err(damaged(format!(
                "the manifest says {} is {} bytes, but its body {} has {actual}",
                liar.path, liar.size, body.sha
            )));
        }
        for &entry in group {
            let target = tree.join(&entry.path);
            match link(&blob, &target) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // The body was collected between fetch and link: fetch it again.
                    blob = self.ensure_blob_for(&body, entry.size).await?;
                    link(&blob, &target).map_err(io(target.display()))?;
                }
                other => other.map_err(io(target.display()))?,
            }
            body.progress.file_done(entry.size);
        }
        Ok(())
    }

    /// [`Self::ensure_blob`] for one body of a group, at `size` bytes.
    async fn ensure_blob_for(self: &Arc<Self>, body: &Body<'_>, size: u64) -> Result<PathBuf> {
        self.ensure_blob(
            body.repo,
            body.sha,
            body.mode,
            size,
            body.scratch,
            body.progress,
        )
        .await
    }

    /// Symlinks and directory modes (deepest first, so a read-only parent is set last), then
    /// the tree moves to its place and its record is written: the tree exists only once whole.
    fn finish_tree(
        &self,
        pin: Pin,
        entries: Vec<Entry>,
        mut dirs: Vec<Entry>,
        tree: &Path,
    ) -> Result<PathBuf> {
        for entry in entries.iter().filter(|e| e.kind == EntryKind::Symlink) {
            let path = tree.join(&entry.path);
            std::os::unix::fs::symlink(entry.target.as_deref().unwrap_or_default(), &path)
                .map_err(io(path.display()))?;
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.path.matches('/').count()));
        for dir in &dirs {
            let path = tree.join(&dir.path);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file_mode(dir.mode)))
                .map_err(io(path.display()))?;
        }
        let key = pin.key();
        let record = Record {
            files: entries.iter().filter(|e| e.kind == EntryKind::File).count(),
            bytes: entries.iter().map(|e| e.size).sum(),
            built_ns: now_ns(),
            pin,
            entries,
        };
        let place = self.trees().join(&key);
        if self.record(&key).is_some() {
            // Another process finished the same tree first; theirs is as good.
            return Ok(place);
        }
        remove_any(&place);
        std::fs::rename(tree, &place).map_err(io(place.display()))?;
        // Streamed out: the record of a large tree is never held as text beside its entries.
        let record_path = self.record_path(&key);
        crate::fsutil::atomic_write_with(&record_path, crate::fsutil::Durability::Synced, |out| {
            serde_json::to_writer(out, &record).map_err(std::io::Error::other)
        })
        .map_err(io(record_path.display()))?;
        Ok(place)
    }

    /// The verified blob of `sha256` with `mode`: already cached (re-hashed), copied from the
    /// same body with another mode, or downloaded (hashed while written). A body that does
    /// not match its hash is fetched once more, then refused.
    async fn ensure_blob(
        self: &Arc<Self>,
        repo: Option<&Repo<BucketStore>>,
        sha256: &Digest,
        mode: u32,
        size: u64,
        scratch: &Path,
        progress: &Progress,
    ) -> Result<PathBuf> {
        let blob = self.blob_path(sha256, mode);
        let temp = scratch.join(format!("blob-{sha256}-{mode:o}"));
        let (check_blob, check_temp, sha) = (blob.clone(), temp.clone(), *sha256);
        let local = blocking(move || Ok(local_copy(&check_blob, &check_temp, &sha))).await?;
        if local {
            return place_blob(&temp, &blob, mode).map(|()| blob);
        }
        let Some(repo) = repo else {
            return Err(Error::internal(format!(
                "body {sha256} vanished from the node cache while the tree was built; retry"
            )));
        };
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

/// One body to fetch: its hash and mode, where it comes from, and where to report progress.
struct Body<'a> {
    repo: Option<&'a Repo<BucketStore>>,
    sha: &'a Digest,
    mode: u32,
    scratch: &'a Path,
    progress: &'a Progress,
}

/// The body a file entry names (a validated manifest gives every file one).
fn digest_of(entry: &Entry) -> Digest {
    entry.sha256.unwrap_or(Digest([0; 32]))
}

/// The files of a tree as indices into `entries`, ordered by (body, mode), and the runs of
/// that order that share one body and mode: each run is one fetch and many links. Nothing of
/// an entry is copied (a tree of a million files is held once).
fn bodies_of(entries: &[Entry]) -> (Vec<u32>, Vec<std::ops::Range<usize>>) {
    let key = |i: &u32| {
        let entry = &entries[*i as usize];
        (digest_of(entry), file_mode(entry.mode))
    };
    let mut order: Vec<u32> = (0..entries.len() as u32)
        .filter(|&i| entries[i as usize].kind == EntryKind::File)
        .collect();
    order.sort_unstable_by_key(key);
    let mut groups = Vec::new();
    let mut start = 0;
    for end in 1..=order.len() {
        if end == order.len() || key(&order[end]) != key(&order[start]) {
            groups.push(start..end);
            start = end;
        }
    }
    (order, groups)
}
