//! `lanes copy`: the fast-stage copy engine.
//!
//! Rules this module enforces:
//! - nothing outside SRC is read and nothing outside DST is written, whatever links the trees
//!   hold: symlinks are copied as links and never followed, and a symlink found in DST where a
//!   directory belongs is replaced, not written through;
//! - every file lands under a temporary name and is renamed into place when complete, so a
//!   reader never sees half a file; a killed run leaves only temporaries, removed by the next;
//! - bad input (SRC missing, nested trees, not enough space) is refused before anything is
//!   written;
//! - a file that cannot be read is reported by path and the rest is still copied.

pub(crate) mod file;
pub(crate) mod progress;
pub(crate) mod walk;

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

pub use progress::Progress;
pub use walk::Failure;
use walk::{Entry, Kind};

/// When a destination file counts as already done, and how copies are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Checksum {
    /// Same size and modification time → skipped; copies are checked by size.
    SizeMtime,
    /// Same SHA-256 → skipped; every copy is verified by hashing what was written.
    Sha256,
    /// Copy everything; check nothing.
    None,
}

/// How a copy runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub checksum: Checksum,
    pub delete: bool,
    pub jobs: usize,
    pub dry_run: bool,
}

/// The outcome of a run, printed as JSON with `--json`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub files_total: u64,
    pub bytes_total: u64,
    pub files_copied: u64,
    pub bytes_copied: u64,
    pub files_skipped: u64,
    pub links_copied: u64,
    pub deleted: u64,
    pub failed: u64,
    pub verified: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
    pub checksum: Option<Checksum>,
    pub dry_run: bool,
    pub failures: Vec<FailureReport>,
}

/// A path that could not be copied, for the summary.
#[derive(Debug, Clone, Serialize)]
pub struct FailureReport {
    pub path: PathBuf,
    pub error: String,
}

/// Why a copy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("source {0} does not exist")]
    SourceMissing(PathBuf),
    #[error("source {0} is not a directory")]
    SourceNotDir(PathBuf),
    #[error("{dst} and {src} overlap (one is inside the other); choose separate trees")]
    Nested { src: PathBuf, dst: PathBuf },
    #[error(
        "not enough space at {dst}: {need} bytes must be copied, {available} are free; free \
         space or use a larger destination"
    )]
    NoSpace {
        dst: PathBuf,
        need: u64,
        available: u64,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// The default number of parallel workers: enough to keep several I/Os in flight per core.
pub fn default_jobs() -> usize {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    (cores * 4).clamp(4, 64)
}

/// Resolves `path` even when its last components do not exist yet (for DST).
fn resolve(path: &Path) -> std::io::Result<PathBuf> {
    let mut existing = path.to_path_buf();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                rest.push(name.to_owned());
                existing = parent.to_path_buf();
            }
            _ => break,
        }
    }
    let mut resolved = if existing.as_os_str().is_empty() {
        std::env::current_dir()?
    } else {
        existing.canonicalize()?
    };
    resolved.extend(rest.iter().rev());
    Ok(resolved)
}

/// What the compare phase decided for a file.
enum Plan {
    Skip,
    Copy,
}

/// Copies SRC to DST. See the module rules. `Err` only when nothing was started; per-file
/// failures are in the summary (`failed`, `failures`).
pub fn run(
    src: &Path,
    dst: &Path,
    options: &Options,
    progress: &Progress,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let src_meta = std::fs::metadata(src).map_err(|_| Error::SourceMissing(src.to_owned()))?;
    if !src_meta.is_dir() {
        return Err(Error::SourceNotDir(src.to_owned()));
    }
    let src = src
        .canonicalize()
        .map_err(io(format!("resolve {}", src.display())))?;
    let dst_resolved = resolve(dst).map_err(io(format!("resolve {}", dst.display())))?;
    if dst_resolved.starts_with(&src) || src.starts_with(&dst_resolved) {
        return Err(Error::Nested {
            src,
            dst: dst_resolved,
        });
    }
    let dst = dst_resolved;

    let (entries, walk_failures) = walk::walk(&src);
    let mut summary = Summary {
        checksum: Some(options.checksum),
        dry_run: options.dry_run,
        ..Summary::default()
    };
    summary
        .failures
        .extend(walk_failures.into_iter().map(|f| FailureReport {
            path: f.path,
            error: f.error,
        }));

    // Hard links: the first path of each inode is copied, the others are linked to it.
    let mut leaders: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut files = Vec::new();
    let mut followers = Vec::new();
    for entry in &entries {
        if let Kind::File { size, link } = &entry.kind {
            summary.files_total += 1;
            summary.bytes_total += size;
            match link.and_then(|key| leaders.get(&key).map(|leader| (key, leader.clone()))) {
                Some((_, leader)) => followers.push((entry, leader)),
                None => {
                    if let Some(key) = link {
                        leaders.insert(*key, entry.rel.clone());
                    }
                    files.push(entry);
                }
            }
        }
    }

    if dst.exists() {
        remove_temporaries(&dst);
    }
    let plans = parallel(&files, options.jobs, |entry| {
        compare(&src, &dst, entry, options.checksum)
    });
    let mut to_copy = Vec::new();
    let mut need: u64 = 0;
    for (entry, plan) in files.iter().zip(plans) {
        match plan {
            Ok(Plan::Skip) => summary.files_skipped += 1,
            Ok(Plan::Copy) => {
                if let Kind::File { size, .. } = entry.kind {
                    need += size;
                }
                to_copy.push(*entry);
            }
            Err(error) => {
                summary.failed += 1;
                summary.failures.push(FailureReport {
                    path: src.join(&entry.rel),
                    error,
                });
            }
        }
    }
    if !options.dry_run && need > 0 {
        let probe = nearest_existing(&dst);
        let stat = nix::sys::statvfs::statvfs(&probe)
            .map_err(|e| io(format!("statvfs {}", probe.display()))(e.into()))?;
        let available = stat.blocks_available() * stat.fragment_size();
        if need > available {
            return Err(Error::NoSpace {
                dst,
                need,
                available,
            });
        }
    }
    if options.dry_run {
        summary.files_copied = to_copy.len() as u64;
        summary.bytes_copied = need;
        if options.delete && dst.exists() {
            summary.deleted = extras(&entries, &dst).len() as u64;
        }
        return Ok(finish(summary, started));
    }

    std::fs::create_dir_all(&dst).map_err(io(format!("create {}", dst.display())))?;
    for entry in entries.iter().filter(|e| e.kind == Kind::Dir) {
        if let Err(e) = ensure_dir(&dst.join(&entry.rel)) {
            summary.failed += 1;
            summary.failures.push(FailureReport {
                path: dst.join(&entry.rel),
                error: e.to_string(),
            });
        }
    }

    progress.start(to_copy.len() as u64, need);
    let verify = match options.checksum {
        Checksum::SizeMtime => file::Verify::Size,
        Checksum::Sha256 => file::Verify::Sha256,
        Checksum::None => file::Verify::Nothing,
    };
    // Test hook: `LANES_FAILPOINT=copy.before-rename:N` dies before the N-th rename.
    let kill_at = crate::failpoint::count("copy.before-rename");
    let renamed = AtomicU64::new(0);
    let before_rename = || {
        if kill_at.is_some_and(|n| renamed.fetch_add(1, Ordering::Relaxed) + 1 == n) {
            crate::failpoint::kill("copy.before-rename");
        }
    };
    let results = parallel(&to_copy, options.jobs, |entry| {
        let target = dst.join(&entry.rel);
        let source = src.join(&entry.rel);
        let copy = || {
            file::copy(
                &source,
                &target,
                entry.mode,
                entry.mtime,
                verify,
                &before_rename,
            )
        };
        let outcome = clear_for_file(&target)
            .and_then(|()| copy())
            .or_else(|first| {
                // One retry for a verification mismatch; then it is reported.
                if verify == file::Verify::Sha256 {
                    copy()
                } else {
                    Err(first)
                }
            });
        if let Ok(bytes) = &outcome {
            progress.advance(*bytes);
        }
        outcome.map_err(|e| e.to_string())
    });
    progress.finish();
    for (entry, result) in to_copy.iter().zip(results) {
        match result {
            Ok(bytes) => {
                summary.files_copied += 1;
                summary.bytes_copied += bytes;
                if verify == file::Verify::Sha256 {
                    summary.verified += 1;
                }
            }
            Err(error) => {
                summary.failed += 1;
                summary.failures.push(FailureReport {
                    path: src.join(&entry.rel),
                    error,
                });
            }
        }
    }

    for (entry, leader) in followers {
        match link(&dst.join(&leader), &dst.join(&entry.rel)) {
            Ok(true) => summary.files_copied += 1,
            Ok(false) => summary.files_skipped += 1,
            Err(e) => {
                summary.failed += 1;
                summary.failures.push(FailureReport {
                    path: dst.join(&entry.rel),
                    error: e.to_string(),
                });
            }
        }
    }
    for entry in &entries {
        if let Kind::Symlink(target) = &entry.kind {
            match symlink(target, &dst.join(&entry.rel)) {
                Ok(true) => summary.links_copied += 1,
                Ok(false) => {}
                Err(e) => {
                    summary.failed += 1;
                    summary.failures.push(FailureReport {
                        path: dst.join(&entry.rel),
                        error: e.to_string(),
                    });
                }
            }
        }
    }
    if options.delete {
        for extra in extras(&entries, &dst) {
            let removed = match std::fs::symlink_metadata(&extra) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&extra),
                Ok(_) => std::fs::remove_file(&extra),
                Err(e) => Err(e),
            };
            match removed {
                Ok(()) => summary.deleted += 1,
                Err(e) => {
                    summary.failed += 1;
                    summary.failures.push(FailureReport {
                        path: extra,
                        error: e.to_string(),
                    });
                }
            }
        }
    }
    // Directory modes and times last, deepest first, so copying into them does not undo them.
    for entry in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let _ = set_dir_metadata(&dst.join(&entry.rel), entry);
    }
    if let Ok(meta) = std::fs::metadata(&src) {
        let root = Entry {
            rel: PathBuf::new(),
            kind: Kind::Dir,
            mode: meta.mode() & 0o7777,
            mtime: (meta.mtime(), meta.mtime_nsec()),
        };
        let _ = set_dir_metadata(&dst, &root);
    }
    Ok(finish(summary, started))
}

fn finish(mut summary: Summary, started: Instant) -> Summary {
    summary.seconds = started.elapsed().as_secs_f64();
    summary.bytes_per_second = if summary.seconds > 0.0 {
        summary.bytes_copied as f64 / summary.seconds
    } else {
        0.0
    };
    summary
}

/// Runs `work` over `items` on `jobs` threads; results come back in the items' order.
pub(crate) fn parallel<T: Sync, R: Send>(
    items: &[T],
    jobs: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicU64::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, items.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some(item) = items.get(index) else { break };
                    let result = work(item);
                    results.lock().unwrap_or_else(|p| p.into_inner())[index] = Some(result);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item was processed"))
        .collect()
}

/// Decides whether a file must be copied.
fn compare(src: &Path, dst: &Path, entry: &Entry, checksum: Checksum) -> Result<Plan, String> {
    let Kind::File { size, .. } = entry.kind else {
        return Ok(Plan::Copy);
    };
    let existing = match std::fs::symlink_metadata(dst.join(&entry.rel)) {
        Ok(meta) if meta.is_file() => meta,
        _ => return Ok(Plan::Copy),
    };
    let same = match checksum {
        Checksum::None => false,
        Checksum::SizeMtime => {
            existing.len() == size && (existing.mtime(), existing.mtime_nsec()) == entry.mtime
        }
        Checksum::Sha256 => {
            existing.len() == size && {
                let ours = file::open_source(&src.join(&entry.rel))
                    .and_then(file::sha256)
                    .map_err(|e| e.to_string())?;
                let theirs = std::fs::File::open(dst.join(&entry.rel))
                    .and_then(file::sha256)
                    .ok();
                theirs == Some(ours)
            }
        }
    };
    Ok(if same { Plan::Skip } else { Plan::Copy })
}

fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}

/// Makes `path` a real directory, owner-only until its final mode is set at the end.
fn ensure_dir(path: &Path) -> std::io::Result<()> {
    if file::real_dir(path)? {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Removes a directory (or anything not a regular file) standing where a file must go.
fn clear_for_file(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(path),
        Ok(meta) if !meta.is_file() => std::fs::remove_file(path),
        _ => Ok(()),
    }
}

/// Makes `path` a hard link of `leader`; `false` when it already is.
fn link(leader: &Path, path: &Path) -> std::io::Result<bool> {
    let leader_meta = std::fs::symlink_metadata(leader)?;
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.ino() == leader_meta.ino()
        && meta.dev() == leader_meta.dev()
    {
        return Ok(false);
    }
    clear_for_file(path)?;
    let temp = file::temp_path(path.parent().unwrap_or(Path::new(".")));
    std::fs::hard_link(leader, &temp)?;
    std::fs::rename(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })?;
    Ok(true)
}

/// Makes `path` a symlink holding `target`; `false` when it already is one.
fn symlink(target: &Path, path: &Path) -> std::io::Result<bool> {
    if std::fs::read_link(path).is_ok_and(|existing| existing == target) {
        return Ok(false);
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(path)?;
    }
    let temp = file::temp_path(path.parent().unwrap_or(Path::new(".")));
    std::os::unix::fs::symlink(target, &temp)?;
    std::fs::rename(&temp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temp);
    })?;
    Ok(true)
}

fn set_dir_metadata(path: &Path, entry: &Entry) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(entry.mode))?;
    let time = file::to_system_time(entry.mtime);
    let dir = std::fs::File::open(path)?;
    dir.set_times(
        std::fs::FileTimes::new()
            .set_modified(time)
            .set_accessed(time),
    )
}

/// Destination entries that the source does not have, outermost only (their contents go with
/// them). Temporaries are not counted: they are removed at the start of every run.
fn extras(entries: &[Entry], dst: &Path) -> Vec<PathBuf> {
    let wanted: HashSet<&Path> = entries.iter().map(|e| e.rel.as_path()).collect();
    let (present, _) = walk::walk(dst);
    let mut extra: Vec<PathBuf> = Vec::new();
    for entry in present {
        if wanted.contains(entry.rel.as_path()) || extra.iter().any(|e| entry.rel.starts_with(e)) {
            continue;
        }
        extra.push(entry.rel);
    }
    extra.into_iter().map(|rel| dst.join(rel)).collect()
}

/// Removes temporaries a killed run left anywhere under `dst`.
fn remove_temporaries(dst: &Path) {
    let (present, _) = walk::walk(dst);
    for entry in present {
        let is_temp = entry
            .rel
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(file::TEMP_PREFIX));
        if is_temp && !matches!(entry.kind, Kind::Dir) {
            let _ = std::fs::remove_file(dst.join(&entry.rel));
        }
    }
}
