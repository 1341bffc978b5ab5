//! Walks a tree without ever following a symbolic link, into a flat, parent-first list.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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

/// A path that could not be read, and why.
#[derive(Debug, Clone)]
pub struct Failure {
    pub path: PathBuf,
    pub error: String,
}

/// Walks `root` (a directory): parents come before their children. Unreadable entries are
/// reported and skipped; special files (sockets, FIFOs, devices) are skipped silently.
pub fn walk(root: &Path) -> (Vec<Entry>, Vec<Failure>) {
    let mut entries = Vec::new();
    let mut failures = Vec::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(dir) = pending.pop() {
        let listing = match std::fs::read_dir(root.join(&dir)) {
            Ok(listing) => listing,
            Err(e) => {
                failures.push(Failure {
                    path: root.join(&dir),
                    error: e.to_string(),
                });
                continue;
            }
        };
        let mut names: Vec<_> = listing.flatten().map(|e| e.file_name()).collect();
        names.sort();
        for name in names {
            let rel = dir.join(&name);
            let path = root.join(&rel);
            let meta = match std::fs::symlink_metadata(&path) {
                Ok(meta) => meta,
                Err(e) => {
                    failures.push(Failure {
                        path,
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let kind = if meta.file_type().is_symlink() {
                match std::fs::read_link(&path) {
                    Ok(target) => Kind::Symlink(target),
                    Err(e) => {
                        failures.push(Failure {
                            path,
                            error: e.to_string(),
                        });
                        continue;
                    }
                }
            } else if meta.is_dir() {
                pending.push(rel.clone());
                Kind::Dir
            } else if meta.is_file() {
                let link = (meta.nlink() > 1).then(|| (meta.dev(), meta.ino()));
                Kind::File {
                    size: meta.len(),
                    link,
                }
            } else {
                continue;
            };
            entries.push(Entry {
                rel,
                kind,
                mode: meta.mode() & 0o7777,
                mtime: (meta.mtime(), meta.mtime_nsec()),
            });
        }
    }
    (entries, failures)
}
