//! Walks a tree into a flat, parent-first list, through directory descriptors and never
//! following a symbolic link.
//!
//! Each directory is listed from its own descriptor, entries are examined with `fstatat`
//! (no follow), and subdirectories are opened beneath the root with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: a directory swapped for a link while the
//! walk runs is reported as a failure, never entered.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::exclude::Exclude;
use crate::fsutil::{self, Dir};

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Dir,
    /// A regular file; `link` is its (device, inode) when it has other hard links.
    File {
        size: u64,
        link: Option<(u64, u64)>,
    },
    /// A symbolic link and the text it holds (never resolved).
    Symlink(PathBuf),
}

/// One entry of a tree, relative to its root.
#[derive(Debug, Clone)]
pub struct Entry {
    pub rel: PathBuf,
    pub kind: Kind,
    /// Permission bits (with setuid/setgid/sticky).
    pub mode: u32,
    /// Modification time: seconds and nanoseconds since the epoch.
    pub mtime: (i64, i64),
}

impl Entry {
    /// The directory holding this entry (relative to the root) and its own name.
    pub fn split(&self) -> (&Path, OsString) {
        (
            self.rel.parent().unwrap_or(Path::new("")),
            self.rel.file_name().unwrap_or_default().to_owned(),
        )
    }
}

/// A path that could not be read, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub path: PathBuf,
    pub error: String,
}

/// Walks the open directory `root` (see the module docs); `shown` is how its paths appear in
/// failures. Unreadable entries are reported and skipped; special files (sockets, FIFOs,
/// devices) are skipped silently. What `exclude` names is left out (an excluded directory is
/// not entered).
///
/// The subtrees of the top-level directories are walked in parallel (reading directories and
/// inodes is mostly waiting on the disk or the server); the list keeps every parent before
/// its children.
pub fn walk_dir(root: &Dir, shown: &Path, exclude: &Exclude) -> (Vec<Entry>, Vec<Failure>) {
    let mut entries = Vec::new();
    let mut failures = walk_from(root, shown, exclude, PathBuf::new(), |entry| {
        entries.push(entry);
        false
    });
    let top: Vec<&Path> = entries
        .iter()
        .filter(|e| e.kind == Kind::Dir)
        .map(|e| e.rel.as_path())
        .collect();
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    let subtrees = super::parallel(&top, jobs, |dir| {
        let mut below = Vec::new();
        let failures = walk_from(root, shown, exclude, dir.to_path_buf(), |entry| {
            below.push(entry);
            true
        });
        (below, failures)
    });
    for (below, more) in subtrees {
        entries.extend(below);
        failures.extend(more);
    }
    (entries, failures)
}

/// [`walk_dir`] handing each entry to `visit` instead of gathering them (memory stays
/// bounded by the tree's depth and widest directory); a directory is entered only when
/// `visit` returns true for it.
pub fn walk_each(
    root: &Dir,
    shown: &Path,
    exclude: &Exclude,
    visit: impl FnMut(Entry) -> bool,
) -> Vec<Failure> {
    walk_from(root, shown, exclude, PathBuf::new(), visit)
}

/// [`walk_each`] of the directory `start` (relative to `root`): its entries and below.
fn walk_from(
    root: &Dir,
    shown: &Path,
    exclude: &Exclude,
    start: PathBuf,
    mut visit: impl FnMut(Entry) -> bool,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    let mut pending = vec![start];
    while let Some(rel) = pending.pop() {
        let fail = |path: PathBuf, e: std::io::Error| Failure {
            path: shown.join(path),
            error: e.to_string(),
        };
        let listed = root
            .walk(&rel)
            .and_then(|dir| dir.entries().map(|names| (dir, names)));
        let (dir, mut names) = match listed {
            Ok(listed) => listed,
            Err(e) => {
                failures.push(fail(rel, e));
                continue;
            }
        };
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, _) in names {
            let path = rel.join(&name);
            if exclude.excludes(&path) {
                continue;
            }
            let Some(entry) = examine(&dir, &name, path, shown, &mut failures) else {
                continue;
            };
            let dir = (entry.kind == Kind::Dir).then(|| entry.rel.clone());
            let descend = visit(entry);
            if let Some(dir) = dir.filter(|_| descend) {
                pending.push(dir);
            }
        }
    }
    failures
}

/// Looks at `name` in `dir` (at `path` from the root) without following it: `None` for
/// special files, which are skipped, and for what cannot be read (recorded in `failures`).
fn examine(
    dir: &Dir,
    name: &std::ffi::OsStr,
    path: PathBuf,
    shown: &Path,
    failures: &mut Vec<Failure>,
) -> Option<Entry> {
    let mut fail = |path: &Path, e: std::io::Error| {
        failures.push(Failure {
            path: shown.join(path),
            error: e.to_string(),
        });
    };
    let stat = match dir.stat(name) {
        Ok(Some(stat)) => stat,
        Ok(None) => return None,
        Err(e) => {
            fail(&path, e);
            return None;
        }
    };
    let kind = match fsutil::Kind::of(&stat) {
        fsutil::Kind::Symlink => match dir.read_link(name) {
            Ok(target) => Kind::Symlink(target),
            Err(e) => {
                fail(&path, e);
                return None;
            }
        },
        fsutil::Kind::Dir => Kind::Dir,
        fsutil::Kind::File => Kind::File {
            size: stat.st_size as u64,
            link: (stat.st_nlink > 1).then_some((stat.st_dev, stat.st_ino)),
        },
        fsutil::Kind::Other => return None,
    };
    Some(Entry {
        rel: path,
        kind,
        mode: stat.st_mode & 0o7777,
        mtime: (stat.st_mtime, stat.st_mtime_nsec),
    })
}

/// [`walk_each`] in tree order: depth first, each directory's names sorted by their bytes,
/// so every directory comes right before its own subtree (the order of a dataset manifest,
/// [`crate::dataset::manifest::tree_order`]). Memory: the names of the directories open on
/// the way down.
pub fn walk_in_order(
    root: &Dir,
    shown: &Path,
    exclude: &Exclude,
    mut visit: impl FnMut(Entry) -> bool,
) -> Vec<Failure> {
    let mut failures = Vec::new();
    // Each open directory: its path, its descriptor, and its names yet to visit (reversed).
    let mut open: Vec<(PathBuf, Dir, Vec<OsString>)> = Vec::new();
    let list = |rel: PathBuf, failures: &mut Vec<Failure>| {
        let listed = root
            .walk(&rel)
            .and_then(|dir| dir.entries().map(|names| (dir, names)));
        match listed {
            Ok((dir, names)) => {
                let mut names: Vec<OsString> = names.into_iter().map(|(name, _)| name).collect();
                names.sort_by(|a, b| b.cmp(a));
                Some((rel, dir, names))
            }
            Err(e) => {
                failures.push(Failure {
                    path: shown.join(&rel),
                    error: e.to_string(),
                });
                None
            }
        }
    };
    open.extend(list(PathBuf::new(), &mut failures));
    while let Some((rel, dir, names)) = open.last_mut() {
        let Some(name) = names.pop() else {
            open.pop();
            continue;
        };
        let path = rel.join(&name);
        if exclude.excludes(&path) {
            continue;
        }
        let Some(entry) = examine(dir, &name, path, shown, &mut failures) else {
            continue;
        };
        let dir = (entry.kind == Kind::Dir).then(|| entry.rel.clone());
        let descend = visit(entry);
        if let Some(dir) = dir.filter(|_| descend) {
            open.extend(list(dir, &mut failures));
        }
    }
    failures
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parallel_walk_finds_what_the_sequential_one_does_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for top in ["a", "b", "c"] {
            for sub in ["x", "y"] {
                let deep = root.join(top).join(sub).join("deep");
                std::fs::create_dir_all(&deep).unwrap();
                std::fs::write(deep.join("f"), top).unwrap();
                std::fs::write(root.join(top).join(sub).join("g"), sub).unwrap();
            }
        }
        std::fs::write(root.join("top-file"), b"t").unwrap();
        std::os::unix::fs::symlink("a/x/g", root.join("link")).unwrap();
        let open = Dir::open(root).unwrap();

        let (parallel, failures) = walk_dir(&open, root, &Exclude::default());
        assert!(failures.is_empty());
        let mut sequential = Vec::new();
        walk_each(&open, root, &Exclude::default(), |entry| {
            sequential.push(entry.rel);
            true
        });
        let mut found: Vec<&Path> = parallel.iter().map(|e| e.rel.as_path()).collect();
        found.sort();
        sequential.sort();
        assert_eq!(found, sequential);
        assert_eq!(found.len(), 3 + 3 * 2 * 4 + 2);

        let mut ordered = Vec::new();
        walk_in_order(&open, root, &Exclude::default(), |entry| {
            ordered.push(entry.rel.to_str().unwrap().to_owned());
            true
        });
        let mut expected = ordered.clone();
        expected.sort_by(|a, b| crate::dataset::manifest::tree_order(a, b));
        assert_eq!(ordered, expected, "tree order");
        assert_eq!(ordered.len(), found.len());

        for (at, entry) in parallel.iter().enumerate() {
            if let Some(parent) = entry.rel.parent().filter(|p| !p.as_os_str().is_empty()) {
                let before = parallel[..at].iter().any(|e| e.rel == parent);
                assert!(before, "{} listed before its parent", entry.rel.display());
            }
        }
    }
}
