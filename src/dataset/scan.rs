//! Turns a local directory into manifest entries: the tree walked without following links,
//! every file hashed (in parallel) with SHA-256.
//!
//! Rule: a tree that a manifest could not describe safely is refused whole, naming the path:
//! non-UTF-8 names, symlinks that leave the tree, unreadable entries.

use std::path::{Path, PathBuf};

use super::manifest::{Entry, EntryKind, link_stays_inside};
use crate::copy::walk::{self, Kind};

/// A file of the scanned tree whose body may need uploading.
#[derive(Debug, Clone)]
pub struct Body {
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}

/// Why a directory cannot be pushed.
#[derive(Debug, thiserror::Error)]
#[error("cannot push {path}: {reason}")]
pub struct ScanError {
    pub path: PathBuf,
    pub reason: String,
}

/// Scans `root`: manifest entries (sorted by path) and the file bodies with their hashes.
pub fn scan(root: &Path, jobs: usize) -> Result<(Vec<Entry>, Vec<Body>), ScanError> {
    if !root.is_dir() {
        return Err(ScanError {
            path: root.to_owned(),
            reason: "not a directory".into(),
        });
    }
    let (walked, failures) = walk::walk(root);
    if let Some(failure) = failures.into_iter().next() {
        return Err(ScanError {
            path: failure.path,
            reason: failure.error,
        });
    }
    let hashes = crate::copy::parallel(&walked, jobs, |entry| match entry.kind {
        Kind::File { .. } => crate::copy::file::open_source(&root.join(&entry.rel))
            .and_then(crate::copy::file::sha256)
            .map(|digest| Some(hex(&digest))),
        _ => Ok(None),
    });
    let mut entries = Vec::with_capacity(walked.len());
    let mut bodies = Vec::new();
    for (entry, hash) in walked.iter().zip(hashes) {
        let fail = |reason: String| ScanError {
            path: root.join(&entry.rel),
            reason,
        };
        let path = entry
            .rel
            .to_str()
            .ok_or_else(|| fail("the name is not UTF-8".into()))?
            .to_owned();
        let hash = hash.map_err(|e| fail(e.to_string()))?;
        let (kind, size, target) = match &entry.kind {
            Kind::Dir => (EntryKind::Dir, 0, None),
            Kind::File { size, .. } => (EntryKind::File, *size, None),
            Kind::Symlink(target) => {
                let target = target
                    .to_str()
                    .ok_or_else(|| fail("the link target is not UTF-8".into()))?;
                if !link_stays_inside(&path, target) {
                    return Err(fail(format!(
                        "the symlink points outside the tree ({target:?})"
                    )));
                }
                (EntryKind::Symlink, 0, Some(target.to_owned()))
            }
        };
        if let Some(sha256) = &hash {
            bodies.push(Body {
                path: root.join(&entry.rel),
                sha256: sha256.clone(),
                size,
            });
        }
        entries.push(Entry {
            path,
            kind,
            size,
            mode: entry.mode,
            sha256: hash,
            target,
        });
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok((entries, bodies))
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::manifest::{FORMAT, Manifest};

    #[test]
    fn scans_a_tree_into_a_valid_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/empty")).unwrap();
        std::fs::write(root.join("a/x"), b"test").unwrap();
        std::fs::write(root.join("top"), b"").unwrap();
        std::os::unix::fs::symlink("a/x", root.join("link")).unwrap();
        let (entries, bodies) = scan(root, 4).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["a", "a/empty", "a/x", "link", "top"]);
        let x = entries.iter().find(|e| e.path == "a/x").unwrap();
        assert_eq!(
            x.sha256.as_deref(),
            Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
        );
        assert_eq!(bodies.len(), 2);
        let manifest = Manifest {
            format: FORMAT,
            dataset: "d".into(),
            version: "v1".into(),
            parent: None,
            message: String::new(),
            created_unix: 0,
            committed: false,
            entries,
        };
        manifest.validate().unwrap();
    }

    #[test]
    fn refuses_links_out_of_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("../../etc/passwd", dir.path().join("evil")).unwrap();
        let err = scan(dir.path(), 2).unwrap_err();
        assert!(err.to_string().contains("outside the tree"), "{err}");
        assert!(scan(&dir.path().join("missing"), 2).is_err());
    }
}
