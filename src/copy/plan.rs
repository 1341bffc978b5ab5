//! The compare phase: what must be copied, decided before anything is written, so a copy
//! that cannot fit is refused early.
//!
//! Work is grouped by directory: a unit opens its source and destination directories once
//! (beneath the two roots, never through a link), lists the destination directory once
//! (removing the temporaries a killed run left there) and compares its files. Directories of
//! many files or many bytes are cut into several units so they spread over the workers.

use std::collections::HashMap;
use std::path::Path;

use super::Checksum;
use super::file;
use super::walk::{Entry, Kind};
use crate::fsutil::{self, Dir};

/// Files per unit: enough to amortise opening two directories, few enough to spread a
/// directory of many files over every worker.
const UNIT_FILES: usize = 128;
/// Bytes per unit: large files each get a unit of their own, so they are copied (and hashed)
/// in parallel.
const UNIT_BYTES: u64 = 16 << 20;

/// The files of one directory (or of a slice of it).
#[derive(Debug)]
pub(super) struct Unit<'a> {
    pub dir: &'a Path,
    pub files: Vec<&'a Entry>,
    /// The compare phase found none of `files` in the destination: nothing can be in the
    /// way of their copies, so copying them checks nothing there first.
    pub fresh: bool,
}

/// What the compare phase decided for a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    Skip,
    /// Replace what is at the name in the destination.
    Copy,
    /// Nothing is at the name in the destination.
    Create,
}

/// Units covering every directory of the tree (the root and directories without files
/// included, so every destination directory gets its temporaries cleaned).
pub(super) fn units<'a>(entries: &'a [Entry], files: &[&'a Entry]) -> Vec<Unit<'a>> {
    let mut by_dir: HashMap<&Path, Vec<&Entry>> = HashMap::new();
    for &entry in files {
        by_dir.entry(entry.split().0).or_default().push(entry);
    }
    let dirs = std::iter::once(Path::new("")).chain(
        entries
            .iter()
            .filter(|e| e.kind == Kind::Dir)
            .map(|e| e.rel.as_path()),
    );
    let mut units = Vec::new();
    for dir in dirs {
        let files = by_dir.remove(dir).unwrap_or_default();
        if files.is_empty() {
            units.push(Unit {
                dir,
                files,
                fresh: false,
            });
            continue;
        }
        let mut unit = Unit {
            dir,
            files: Vec::new(),
            fresh: false,
        };
        let mut bytes = 0;
        for entry in files {
            let size = match entry.kind {
                Kind::File { size, .. } => size,
                _ => 0,
            };
            let full = unit.files.len() >= UNIT_FILES || bytes + size > UNIT_BYTES;
            if full && !unit.files.is_empty() {
                units.push(std::mem::replace(
                    &mut unit,
                    Unit {
                        dir,
                        files: Vec::new(),
                        fresh: false,
                    },
                ));
                bytes = 0;
            }
            unit.files.push(entry);
            bytes += size;
        }
        units.push(unit);
    }
    units
}

/// Compares the files of `unit`, cleaning temporaries in its destination directory first
/// when `clean`. One result per file, in order.
pub(super) fn compare(
    src: &Dir,
    dst: Option<&Dir>,
    unit: &Unit,
    checksum: Checksum,
    clean: bool,
) -> Vec<Result<Plan, String>> {
    let dst_dir = dst.and_then(|root| root.walk(unit.dir).ok());
    if clean && let Some(dir) = &dst_dir {
        remove_temporaries(dir);
    }
    if unit.files.is_empty() {
        return Vec::new();
    }
    let src_dir = match src.walk(unit.dir) {
        Ok(dir) => dir,
        Err(e) => return unit.files.iter().map(|_| Err(e.to_string())).collect(),
    };
    unit.files
        .iter()
        .map(|entry| compare_file(&src_dir, dst_dir.as_ref(), entry, checksum))
        .collect()
}

/// Removes the temporaries a killed run left in `dir` (files and links only).
fn remove_temporaries(dir: &Dir) {
    for (name, kind) in dir.entries().unwrap_or_default() {
        if file::is_temp(&name) && kind != Some(fsutil::Kind::Dir) {
            let _ = dir.remove_file(&name);
        }
    }
}

fn compare_file(
    src: &Dir,
    dst: Option<&Dir>,
    entry: &Entry,
    checksum: Checksum,
) -> Result<Plan, String> {
    let Kind::File { size, .. } = entry.kind else {
        return Ok(Plan::Copy);
    };
    let name = entry.split().1;
    let Some(dst) = dst else {
        return Ok(Plan::Create);
    };
    let existing = match dst.stat(&name) {
        Ok(Some(stat)) if fsutil::Kind::of(&stat) == fsutil::Kind::File => stat,
        Ok(None) => return Ok(Plan::Create),
        _ => return Ok(Plan::Copy),
    };
    let same_size = existing.st_size as u64 == size;
    let same = match checksum {
        Checksum::None => false,
        Checksum::SizeMtime => {
            same_size && (existing.st_mtime, existing.st_mtime_nsec) == entry.mtime
        }
        Checksum::Sha256 => {
            same_size && {
                let ours = || src.open_file(&name).and_then(file::sha256);
                let theirs = || dst.open_file(&name).and_then(file::sha256).ok();
                // A large file's two hashes run on two cores at once: the file takes as long
                // as one hash, not two.
                let (ours, theirs) = if size >= file::PARALLEL_HASH {
                    std::thread::scope(|scope| {
                        let theirs = scope.spawn(theirs);
                        (ours(), theirs.join().ok().flatten())
                    })
                } else {
                    (ours(), theirs())
                };
                theirs == Some(ours.map_err(|e| e.to_string())?)
            }
        }
    };
    Ok(if same { Plan::Skip } else { Plan::Copy })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(rel: &str, size: u64) -> Entry {
        Entry {
            rel: rel.into(),
            kind: Kind::File { size, link: None },
            mode: 0o644,
            mtime: (0, 0),
        }
    }

    #[test]
    fn units_are_bounded_by_files_and_by_bytes() {
        let mut entries = vec![Entry {
            rel: "big".into(),
            kind: Kind::Dir,
            mode: 0o755,
            mtime: (0, 0),
        }];
        entries.extend((0..8).map(|i| file(&format!("big/f{i}"), 256 << 20)));
        entries.extend((0..300).map(|i| file(&format!("small{i}"), 100)));
        let files: Vec<&Entry> = entries.iter().filter(|e| e.kind != Kind::Dir).collect();
        let units = units(&entries, &files);
        let big: Vec<_> = units.iter().filter(|u| u.dir == Path::new("big")).collect();
        assert_eq!(big.len(), 8, "every large file in a unit of its own");
        let small: Vec<_> = units.iter().filter(|u| u.dir == Path::new("")).collect();
        assert_eq!(
            small.iter().map(|u| u.files.len()).collect::<Vec<_>>(),
            vec![128, 128, 44]
        );
        let covered: usize = units.iter().map(|u| u.files.len()).sum();
        assert_eq!(covered, files.len());
    }
}
