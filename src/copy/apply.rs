//! The write phase: directories, file bodies, hard links, symlinks, removal of extras and
//! directory metadata, every one of them relative to the destination root's descriptor.
//!
//! Rules: a directory is made real where it belongs (a link or file in the way is replaced,
//! never followed); links are recreated as links; `--delete` removes the outermost extras
//! only; directory modes and times are set last, deepest first, so copying into a directory
//! does not undo them.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::FailureReport;
use super::file;
use super::walk::{self, Entry, Kind};
use crate::fsutil::{self, Dir};

fn failure(dst: &Path, rel: &Path, error: impl ToString) -> FailureReport {
    FailureReport {
        path: dst.join(rel),
        error: error.to_string(),
    }
}

/// Makes every directory of the tree real under `dst` (owner-only until its final mode is
/// set), parents first.
pub(super) fn make_dirs(dst: &Dir, shown: &Path, entries: &[Entry]) -> Vec<FailureReport> {
    let mut failures = Vec::new();
    for entry in entries.iter().filter(|e| e.kind == Kind::Dir) {
        let (parent, name) = entry.split();
        let made = dst
            .walk(parent)
            .and_then(|parent| parent.make_dir(&name, 0o700));
        if let Err(e) = made {
            failures.push(failure(shown, &entry.rel, e));
        }
    }
    failures
}

/// Makes `follower` a hard link of `leader` (both relative to `dst`); `false` when it
/// already is one.
pub(super) fn hard_link(dst: &Dir, leader: &Path, follower: &Entry) -> std::io::Result<bool> {
    let (leader_dir, leader_name) = (
        dst.walk(leader.parent().unwrap_or(Path::new("")))?,
        leader.file_name().unwrap_or_default(),
    );
    let (parent, name) = follower.split();
    let dir = dst.walk(parent)?;
    let leader_stat = leader_dir
        .stat(leader_name)?
        .ok_or_else(|| std::io::Error::other("the first copy of the file is missing"))?;
    if let Some(stat) = dir.stat(&name)?
        && (stat.st_dev, stat.st_ino) == (leader_stat.st_dev, leader_stat.st_ino)
    {
        return Ok(false);
    }
    if dir
        .stat(&name)?
        .is_some_and(|s| fsutil::Kind::of(&s) == fsutil::Kind::Dir)
    {
        dir.remove_tree(&name)?;
    }
    let temp = file::temp_name();
    leader_dir.hard_link(leader_name, &dir, &temp)?;
    dir.rename(&temp, &dir, &name).inspect_err(|_| {
        let _ = dir.remove_file(&temp);
    })?;
    Ok(true)
}

/// Makes `entry`'s path a symlink holding `target`; `false` when it already is one.
pub(super) fn symlink(dst: &Dir, entry: &Entry, target: &Path) -> std::io::Result<bool> {
    let (parent, name) = entry.split();
    let dir = dst.walk(parent)?;
    if dir
        .read_link(&name)
        .is_ok_and(|existing| existing == target)
    {
        return Ok(false);
    }
    if dir
        .stat(&name)?
        .is_some_and(|s| fsutil::Kind::of(&s) == fsutil::Kind::Dir)
    {
        dir.remove_tree(&name)?;
    }
    let temp = file::temp_name();
    dir.symlink(target, &temp)?;
    dir.rename(&temp, &dir, &name).inspect_err(|_| {
        let _ = dir.remove_file(&temp);
    })?;
    Ok(true)
}

/// Destination entries that the source does not have, outermost only (their contents go with
/// them). Temporaries are not counted: the compare phase removes them.
pub(super) fn extras(
    entries: &[Entry],
    dst: &Dir,
    shown: &Path,
    exclude: &super::exclude::Exclude,
) -> Vec<PathBuf> {
    let wanted: HashSet<&Path> = entries.iter().map(|e| e.rel.as_path()).collect();
    beyond(&wanted, dst, shown, exclude)
}

/// What `dst` holds beyond the `wanted` paths, outermost only, links never followed,
/// temporaries not counted; `shown` is how `dst` appears in messages.
pub(crate) fn beyond(
    wanted: &HashSet<&Path>,
    dst: &Dir,
    shown: &Path,
    exclude: &super::exclude::Exclude,
) -> Vec<PathBuf> {
    // Excluded paths are not walked, so never deleted; an extra directory is not entered
    // (it goes whole), and nothing is gathered but the extras.
    let mut extra: Vec<PathBuf> = Vec::new();
    walk::walk_each(dst, shown, exclude, |entry| {
        if wanted.contains(entry.rel.as_path()) {
            return true;
        }
        if !entry.rel.file_name().is_some_and(file::is_temp) {
            extra.push(entry.rel);
        }
        false
    });
    extra
}

/// Removes one extra (a file, a link, or a whole directory), through `dst`'s descriptor.
pub(crate) fn remove(dst: &Dir, rel: &Path) -> std::io::Result<()> {
    let parent = dst.walk(rel.parent().unwrap_or(Path::new("")))?;
    parent.remove_tree(rel.file_name().unwrap_or(OsStr::new(".")))
}

/// Sets the mode and times of directory `rel` (the root when empty).
pub(super) fn set_dir_metadata(
    dst: &Dir,
    rel: &Path,
    mode: u32,
    mtime: (i64, i64),
) -> std::io::Result<()> {
    let dir = dst.walk(rel)?;
    dir.set_mode(mode)?;
    let time = file::to_system_time(mtime);
    dir.set_times(
        std::fs::FileTimes::new()
            .set_modified(time)
            .set_accessed(time),
    )
}
