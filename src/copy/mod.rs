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

pub(crate) mod apply;
pub mod exclude;
pub(crate) mod file;
mod plan;
pub(crate) mod progress;
pub(crate) mod walk;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::Serialize;

use plan::{Plan, Unit};
pub use progress::Progress;
pub use walk::Failure;
use walk::Kind;

use crate::fsutil::Dir;

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
    /// Paths left out on both sides: not copied, and never deleted from DST.
    pub exclude: exclude::Exclude,
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
    /// With `--dry-run`: the files that would be copied, relative to SRC.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_copy: Vec<PathBuf>,
    /// With `--dry-run --delete`: what would be removed from DST, relative to it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub would_delete: Vec<PathBuf>,
}

impl Summary {
    /// Records a path that could not be copied.
    fn fail(&mut self, path: PathBuf, error: impl ToString) {
        self.failed += 1;
        self.failures.push(FailureReport {
            path,
            error: error.to_string(),
        });
    }
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

/// Copies SRC to DST. See the module rules. `Err` only when nothing was started; per-file
/// failures are in the summary (`failed`, `failures`).
pub fn run(
    src: &Path,
    dst: &Path,
    options: &Options,
    progress: &Progress,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let (src, dst) = trees(src, dst)?;
    let src_root = Dir::open(&src).map_err(io(format!("open {}", src.display())))?;
    let (entries, walk_failures) = walk::walk_dir(&src_root, &src, &options.exclude);
    let mut summary = Summary {
        checksum: Some(options.checksum),
        dry_run: options.dry_run,
        ..Summary::default()
    };
    for failure in walk_failures {
        summary.fail(failure.path, failure.error);
    }
    let (files, followers) = split_hard_links(&entries, &mut summary);
    let existing_dst = open_existing(&dst)?;
    let units = plan::units(&entries, &files);
    let plans = parallel(&units, options.jobs, |unit| {
        plan::compare(
            &src_root,
            existing_dst.as_ref(),
            unit,
            options.checksum,
            !options.dry_run,
        )
    });
    let (copy_units, need) = to_copy(&units, plans, &src, &mut summary);
    let files_to_copy: u64 = copy_units.iter().map(|u| u.files.len() as u64).sum();
    if options.dry_run {
        summary.files_copied = files_to_copy;
        summary.bytes_copied = need;
        summary.would_copy = copy_units
            .iter()
            .flat_map(|u| u.files.iter().map(|e| e.rel.clone()))
            .collect();
        summary.would_copy.sort();
        if options.delete
            && let Some(dst_root) = &existing_dst
        {
            summary.would_delete = apply::extras(&entries, dst_root, &dst, &options.exclude);
            summary.deleted = summary.would_delete.len() as u64;
        }
        return Ok(finish(summary, started));
    }
    check_space(&dst, need)?;

    std::fs::create_dir_all(&dst).map_err(io(format!("create {}", dst.display())))?;
    let dst_root = Dir::open(&dst).map_err(io(format!("open {}", dst.display())))?;
    for failure in apply::make_dirs(&dst_root, &dst, &entries) {
        summary.fail(failure.path, failure.error);
    }
    progress.start(files_to_copy, need);
    copy_files(
        &src_root,
        &dst_root,
        &src,
        &copy_units,
        options,
        progress,
        &mut summary,
    );
    progress.finish();
    finish_tree(
        &dst_root,
        &dst,
        &src,
        &entries,
        followers,
        options,
        &mut summary,
    );
    Ok(finish(summary, started))
}

/// SRC (an existing directory) and DST, resolved, refused when one is inside the other.
fn trees(src: &Path, dst: &Path) -> Result<(PathBuf, PathBuf), Error> {
    let src_meta = std::fs::metadata(src).map_err(|_| Error::SourceMissing(src.to_owned()))?;
    if !src_meta.is_dir() {
        return Err(Error::SourceNotDir(src.to_owned()));
    }
    let src = src
        .canonicalize()
        .map_err(io(format!("resolve {}", src.display())))?;
    let dst = resolve(dst).map_err(io(format!("resolve {}", dst.display())))?;
    if dst.starts_with(&src) || src.starts_with(&dst) {
        return Err(Error::Nested { src, dst });
    }
    Ok((src, dst))
}

/// The files to copy (the first path of each inode) and the hard links to make to them;
/// counts every file in the summary.
fn split_hard_links<'a>(
    entries: &'a [walk::Entry],
    summary: &mut Summary,
) -> (Vec<&'a walk::Entry>, Vec<(&'a walk::Entry, PathBuf)>) {
    let mut leaders: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut files = Vec::new();
    let mut followers = Vec::new();
    for entry in entries {
        if let Kind::File { size, link } = &entry.kind {
            summary.files_total += 1;
            summary.bytes_total += size;
            match link.and_then(|key| leaders.get(&key).cloned()) {
                Some(leader) => followers.push((entry, leader)),
                None => {
                    if let Some(key) = link {
                        leaders.insert(*key, entry.rel.clone());
                    }
                    files.push(entry);
                }
            }
        }
    }
    (files, followers)
}

/// DST open, when it exists (it must then be a directory).
fn open_existing(dst: &Path) -> Result<Option<Dir>, Error> {
    match std::fs::metadata(dst) {
        Ok(meta) if meta.is_dir() => Ok(Some(
            Dir::open(dst).map_err(io(format!("open {}", dst.display())))?,
        )),
        Ok(_) => Err(Error::Io {
            context: format!("destination {}", dst.display()),
            source: std::io::Error::other("it exists and is not a directory"),
        }),
        Err(_) => Ok(None),
    }
}

/// What the compare phase decided: the units of files to copy and their bytes; skipped and
/// unreadable files go into the summary.
fn to_copy<'a>(
    units: &[Unit<'a>],
    plans: Vec<Vec<Result<Plan, String>>>,
    src: &Path,
    summary: &mut Summary,
) -> (Vec<Unit<'a>>, u64) {
    let mut copy_units = Vec::new();
    let mut need: u64 = 0;
    for (unit, plans) in units.iter().zip(plans) {
        let mut files = Vec::new();
        let mut fresh = true;
        for (entry, plan) in unit.files.iter().zip(plans) {
            match plan {
                Ok(Plan::Skip) => summary.files_skipped += 1,
                Ok(plan @ (Plan::Copy | Plan::Create)) => {
                    fresh &= plan == Plan::Create;
                    if let Kind::File { size, .. } = entry.kind {
                        need += size;
                    }
                    files.push(*entry);
                }
                Err(error) => summary.fail(src.join(&entry.rel), error),
            }
        }
        if !files.is_empty() {
            copy_units.push(Unit {
                dir: unit.dir,
                files,
                fresh,
            });
        }
    }
    (copy_units, need)
}

/// Refuses before anything is written when DST has not room for `need` bytes.
fn check_space(dst: &Path, need: u64) -> Result<(), Error> {
    if need == 0 {
        return Ok(());
    }
    let probe = nearest_existing(dst);
    let stat = nix::sys::statvfs::statvfs(&probe)
        .map_err(|e| io(format!("statvfs {}", probe.display()))(e.into()))?;
    let available = stat.blocks_available().saturating_mul(stat.fragment_size());
    if need > available {
        return Err(Error::NoSpace {
            dst: dst.to_owned(),
            need,
            available,
        });
    }
    Ok(())
}

/// The write phase for file bodies, in parallel over units.
fn copy_files(
    src_root: &Dir,
    dst_root: &Dir,
    src: &Path,
    units: &[Unit],
    options: &Options,
    progress: &Progress,
    summary: &mut Summary,
) {
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
    let results = parallel(units, options.jobs, |unit| {
        copy_unit(src_root, dst_root, unit, verify, &before_rename, progress)
    });
    for (unit, results) in units.iter().zip(results) {
        for (entry, result) in unit.files.iter().zip(results) {
            match result {
                Ok(bytes) => {
                    summary.files_copied += 1;
                    summary.bytes_copied += bytes;
                    if verify == file::Verify::Sha256 {
                        summary.verified += 1;
                    }
                }
                Err(error) => summary.fail(src.join(&entry.rel), error),
            }
        }
    }
}

/// Hard links, symlinks, `--delete`, and directory modes and times (last, deepest first, so
/// copying into a directory does not undo them).
fn finish_tree(
    dst_root: &Dir,
    dst: &Path,
    src: &Path,
    entries: &[walk::Entry],
    followers: Vec<(&walk::Entry, PathBuf)>,
    options: &Options,
    summary: &mut Summary,
) {
    for (entry, leader) in followers {
        match apply::hard_link(dst_root, &leader, entry) {
            Ok(true) => summary.files_copied += 1,
            Ok(false) => summary.files_skipped += 1,
            Err(e) => summary.fail(dst.join(&entry.rel), e),
        }
    }
    for entry in entries {
        if let Kind::Symlink(target) = &entry.kind {
            match apply::symlink(dst_root, entry, target) {
                Ok(true) => summary.links_copied += 1,
                Ok(false) => {}
                Err(e) => summary.fail(dst.join(&entry.rel), e),
            }
        }
    }
    if options.delete {
        for extra in apply::extras(entries, dst_root, dst, &options.exclude) {
            match apply::remove(dst_root, &extra) {
                Ok(()) => summary.deleted += 1,
                Err(e) => summary.fail(dst.join(&extra), e),
            }
        }
    }
    for entry in entries.iter().rev().filter(|e| e.kind == Kind::Dir) {
        let _ = apply::set_dir_metadata(dst_root, &entry.rel, entry.mode, entry.mtime);
    }
    if let Ok(meta) = std::fs::metadata(src) {
        let _ = apply::set_dir_metadata(
            dst_root,
            Path::new(""),
            meta.mode() & 0o7777,
            (meta.mtime(), meta.mtime_nsec()),
        );
    }
}

/// Copies the files of one unit: its two directories are opened once, beneath the roots.
fn copy_unit(
    src: &Dir,
    dst: &Dir,
    unit: &Unit,
    verify: file::Verify,
    before_rename: &dyn Fn(),
    progress: &Progress,
) -> Vec<Result<u64, String>> {
    let dirs = src
        .walk(unit.dir)
        .and_then(|s| dst.walk(unit.dir).map(|d| (s, d)));
    let (src_dir, dst_dir) = match dirs {
        Ok(dirs) => dirs,
        Err(e) => return unit.files.iter().map(|_| Err(e.to_string())).collect(),
    };
    unit.files
        .iter()
        .map(|entry| {
            let name = entry.split().1;
            let attributes = file::Attributes {
                mode: entry.mode,
                mtime: entry.mtime,
            };
            let copy = || {
                file::copy(
                    &src_dir,
                    &dst_dir,
                    &name,
                    attributes,
                    verify,
                    unit.fresh,
                    before_rename,
                )
            };
            // One retry for a verification mismatch; then it is reported.
            let outcome = copy().or_else(|first| {
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
        })
        .collect()
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

fn nearest_existing(path: &Path) -> PathBuf {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
        .to_path_buf()
}
