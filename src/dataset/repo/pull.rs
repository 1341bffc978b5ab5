//! Pulling a version into a directory: every body verified against its SHA-256 (and its size
//! against the manifest) before it is placed, files already present and identical skipped.
//!
//! Rules: a body that does not match is never placed (its temporary is removed); symlinks are
//! recreated as they are, never followed; and nothing is created, written or removed outside
//! DIR, whatever order the manifest lists directories in and whatever DIR already holds
//! (links, or links swapped in while the pull runs): every directory is made real beneath DIR
//! one component at a time, every file is reached through its directory's descriptor
//! ([`crate::fsutil::Dir`]), and downloads are created exclusively under fresh names.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Advance, Error, Finish, PullReport, Repo, Result, blob_key, io};
use crate::copy::{apply, walk};
use crate::dataset::manifest::{Digest, Entry, EntryKind, tree_order};
use crate::dataset::reference::Selector;
use crate::dataset::scan::hex;
use crate::dataset::spool::{self, Spool};
use crate::dataset::store::{DOWNLOAD_BATCH, ObjectStore};
use crate::fsutil::{Dir, Kind};

static TEMP: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name for a file being placed.
fn temp_name() -> OsString {
    OsString::from(format!(
        "{}{}-{}",
        crate::copy::file::TEMP_PREFIX,
        std::process::id(),
        TEMP.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The directory part and the name of a manifest path.
fn split(path: &str) -> (PathBuf, OsString) {
    let path = Path::new(path);
    (
        path.parent().map(Path::to_owned).unwrap_or_default(),
        path.file_name().unwrap_or_default().to_owned(),
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("pull task failed: {e}")))?
}

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    /// Downloads a version into `dir`, verifying every body; identical files already there
    /// are skipped, and what else `dir` holds is reported and left. See the module rules.
    pub async fn pull(&self, name: &str, selector: &Selector, dir: &Path) -> Result<PullReport> {
        self.pull_with(name, selector, dir, false).await
    }

    /// [`Repo::pull`]; with `delete_extra`, what `dir` holds beyond the version is removed
    /// (links removed, never followed), so `dir` ends as exactly the version.
    pub async fn pull_with(
        &self,
        name: &str,
        selector: &Selector,
        dir: &Path,
        delete_extra: bool,
    ) -> Result<PullReport> {
        let version = Arc::new(self.resolve(name, selector).await?);
        if std::fs::metadata(dir).is_ok_and(|m| !m.is_dir()) {
            return Err(Error::Invalid(format!(
                "{} exists and is not a directory; pull into a directory",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let root = Arc::new(Dir::open(dir).map_err(io(format!("open {}", dir.display())))?);
        let mut report = PullReport {
            version: version.head.version.clone(),
            files: version.head.files as usize,
            ..Default::default()
        };
        // At most `jobs` files at once, and only that many tasks exist (a task per file up
        // front costs memory per file).
        let jobs = self.jobs.max(1);
        let mut tasks = tokio::task::JoinSet::new();
        let progress = self.progress.clone();
        progress.start(version.head.files, version.head.bytes);
        let _finish = Finish(&progress);
        let record = |report: &mut PullReport,
                      done: Result<Result<Option<u64>>, tokio::task::JoinError>|
         -> Result<()> {
            match done.map_err(|e| Error::Invalid(e.to_string()))?? {
                Some(bytes) => {
                    report.downloaded += 1;
                    report.bytes_downloaded += bytes;
                }
                None => report.skipped += 1,
            }
            Ok(())
        };
        // In tree order, a batch at a time: the batch's directories are made and its links
        // placed first, then its files are fetched while the next batch is read.
        let reading = io("read the version's entries back");
        let mut batches = spool::batches(version.entries.read().map_err(reading)?, 256);
        while let Some(batch) = batches.recv().await {
            let batch = batch.map_err(io("read the version's entries back"))?;
            let (made, batch) = (root.clone(), Arc::new(batch));
            let placing = batch.clone();
            blocking(move || {
                for entry in placing.iter() {
                    match entry.kind {
                        EntryKind::Dir => {
                            made.make_dirs(Path::new(&entry.path), 0o755)
                                .map_err(io(format!("create directory {}", entry.path)))?;
                        }
                        EntryKind::Symlink => place_link(&made, entry)?,
                        EntryKind::File => {}
                    }
                }
                Ok(())
            })
            .await?;
            for entry in batch.iter().filter(|e| e.kind == EntryKind::File) {
                if tasks.len() >= jobs
                    && let Some(done) = tasks.join_next().await
                {
                    record(&mut report, done)?;
                }
                let (store, root, progress) = (self.store.clone(), root.clone(), progress.clone());
                let (entry, budget) = (entry.clone(), self.budget.clone());
                tasks.spawn(async move {
                    let _advance = Advance(&progress, entry.size);
                    let _held = budget.hold(entry.size.min(DOWNLOAD_BATCH as u64)).await;
                    pull_file(&store, &root, &entry).await
                });
            }
        }
        while let Some(done) = tasks.join_next().await {
            record(&mut report, done)?;
        }
        let shown = dir.to_owned();
        let (extra, deleted) = blocking(move || {
            let extra = extras(&root, &shown, &version.entries)?;
            if delete_extra {
                for path in &extra {
                    apply::remove(&root, path).map_err(io(format!("remove {}", path.display())))?;
                }
            }
            let extra: Vec<String> = extra.iter().map(|p| p.display().to_string()).collect();
            Ok((extra, delete_extra))
        })
        .await?;
        match deleted {
            true => report.deleted = extra,
            false => report.extra = extra,
        }
        Ok(report)
    }
}

/// What `root` holds beyond `entries`, in tree order: both are walked in that order side by
/// side, so nothing is gathered but the extras. An extra directory is not entered (it is one
/// extra), and temporaries of an interrupted pull are not extras.
fn extras(root: &Dir, shown: &Path, entries: &Spool) -> Result<Vec<PathBuf>> {
    let mut wanted = entries
        .read()
        .map_err(io("read the version's entries back"))?
        .peekable();
    let (mut extra, mut failed) = (Vec::new(), None);
    walk::walk_in_order(root, shown, &Default::default(), |found| {
        let Some(path) = found.rel.to_str() else {
            extra.push(found.rel);
            return false;
        };
        while let Some(next) = wanted.peek() {
            match next {
                Ok(next) if tree_order(&next.path, path).is_lt() => {}
                Ok(_) => break,
                Err(_) => {
                    failed = wanted.next().and_then(Result::err);
                    return false;
                }
            }
            wanted.next();
        }
        if wanted
            .peek()
            .is_some_and(|next| next.as_ref().is_ok_and(|n| n.path == path))
        {
            return true;
        }
        if !found
            .rel
            .file_name()
            .is_some_and(crate::copy::file::is_temp)
        {
            extra.push(found.rel);
        }
        false
    });
    match failed {
        Some(e) => Err(io("read the version's entries back")(e)),
        None => Ok(extra),
    }
}

/// Pulls one file: `None` when an identical file is already there, else the bytes placed.
async fn pull_file<S: ObjectStore>(
    store: &S,
    root: &Arc<Dir>,
    entry: &Entry,
) -> Result<Option<u64>> {
    let expected = entry.sha256.unwrap_or(Digest([0; 32]));
    let (parent_rel, name) = split(&entry.path);
    let (root, shown, check, sha) = (root.clone(), entry.path.clone(), name.clone(), expected);
    let (parent, identical) = blocking(move || {
        let parent = root
            .walk(&parent_rel)
            .map_err(io(format!("open the directory of {shown}")))?;
        let identical = same_body(&parent, &check, &sha);
        Ok((Arc::new(parent), identical))
    })
    .await?;
    if identical {
        return Ok(None);
    }
    let temp = temp_name();
    let fetched = store
        .get_to_file(&blob_key(&expected), &parent.proc_path().join(&temp))
        .await;
    let outcome = match fetched {
        Err(e) => Err(e.into()),
        Ok(None) => Err(Error::Corrupt(format!(
            "body {expected} of {} is missing from the bucket",
            entry.path
        ))),
        Ok(Some(digest)) if digest[..] != expected.0[..] => Err(Error::Corrupt(format!(
            "body of {} does not match its SHA-256 ({} != {expected}); not placed",
            entry.path,
            hex(&digest)
        ))),
        Ok(Some(_)) => Ok(()),
    };
    let (entry, temp_done) = (entry.clone(), temp.clone());
    let placing = parent.clone();
    let placed = blocking(move || {
        outcome?;
        place(&placing, &temp_done, &name, &entry)
    })
    .await;
    if placed.is_err() {
        let _ = parent.remove_file(&temp);
    }
    placed
}

/// True when `name` in `dir` is a regular file whose SHA-256 is `sha256`.
fn same_body(dir: &Dir, name: &OsStr, sha256: &Digest) -> bool {
    dir.open_file(name)
        .and_then(crate::copy::file::sha256)
        .is_ok_and(|d| d[..] == sha256.0[..])
}

/// Checks the verified temporary's size, gives it its mode and renames it into place.
fn place(dir: &Dir, temp: &OsStr, name: &OsStr, entry: &Entry) -> Result<Option<u64>> {
    use std::os::unix::fs::PermissionsExt;
    let file = dir
        .open_file(temp)
        .map_err(io(format!("reopen the download of {}", entry.path)))?;
    let size = file
        .metadata()
        .map_err(io(format!("stat {}", entry.path)))?
        .len();
    if size != entry.size {
        return Err(Error::Corrupt(format!(
            "the manifest says {} is {} bytes, but its body has {size}; not placed",
            entry.path, entry.size
        )));
    }
    file.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o7777))
        .map_err(io(format!("chmod {}", entry.path)))?;
    if dir
        .stat(name)
        .map_err(io(format!("stat {}", entry.path)))?
        .is_some_and(|s| Kind::of(&s) == Kind::Dir)
    {
        dir.remove_tree(name)
            .map_err(io(format!("replace {}", entry.path)))?;
    }
    dir.rename(temp, dir, name)
        .map_err(io(format!("place {}", entry.path)))?;
    Ok(Some(size))
}

/// Recreates a symlink as it is (under a temporary name, renamed into place).
fn place_link(root: &Dir, entry: &Entry) -> Result<()> {
    let target = Path::new(entry.target.as_deref().unwrap_or_default());
    let (parent_rel, name) = split(&entry.path);
    let parent = root
        .walk(&parent_rel)
        .map_err(io(format!("open the directory of {}", entry.path)))?;
    if parent.read_link(&name).is_ok_and(|t| t == target) {
        return Ok(());
    }
    if parent
        .stat(&name)
        .map_err(io(format!("stat {}", entry.path)))?
        .is_some_and(|s| Kind::of(&s) == Kind::Dir)
    {
        parent
            .remove_tree(&name)
            .map_err(io(format!("replace {}", entry.path)))?;
    }
    let temp = temp_name();
    parent
        .symlink(target, &temp)
        .map_err(io(format!("link {}", entry.path)))?;
    parent.rename(&temp, &parent, &name).map_err(|e| {
        let _ = parent.remove_file(&temp);
        io(format!("place {}", entry.path))(e)
    })
}
