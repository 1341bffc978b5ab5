//! Turns a local directory into manifest entries: the tree walked without following links,
//! every file hashed (in parallel) with SHA-256.
//!
//! Rule: a tree that a manifest could not describe safely is refused whole, naming the path:
//! non-UTF-8 names, symlinks that leave the tree, unreadable entries.

use std::path::{Path, PathBuf};

use super::manifest::{Digest, Entry, EntryKind, link_stays_inside};
use super::spool::{Spool, SpoolWriter};
use crate::copy::exclude::Exclude;
use crate::copy::walk::{self, Kind};

/// Why a directory cannot be pushed.
#[derive(Debug, thiserror::Error)]
#[error("cannot push {path}: {reason}")]
pub struct ScanError {
    pub path: PathBuf,
    pub reason: String,
}

/// Walks `root` in tree order into `visit`, reading no file: files have no SHA-256 yet.
/// Everything a manifest could not describe safely is refused here, before any body is read
/// or sent.
fn walk_in_order(
    root: &Path,
    exclude: &Exclude,
    mut visit: impl FnMut(Entry) -> Result<(), ScanError>,
) -> Result<(), ScanError> {
    let refuse = |reason: String| ScanError {
        path: root.to_owned(),
        reason,
    };
    match std::fs::metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err(refuse("not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse("it does not exist".into()));
        }
        Err(e) => return Err(refuse(e.to_string())),
    }
    let dir = crate::fsutil::Dir::open(root).map_err(|e| refuse(e.to_string()))?;
    let mut refused = None;
    let failures = walk::walk_in_order(&dir, root, exclude, |entry| {
        if refused.is_some() {
            return false;
        }
        if let Err(e) = manifest_entry(root, entry).and_then(&mut visit) {
            refused = Some(e);
        }
        refused.is_none()
    });
    if let Some(failure) = failures.into_iter().next() {
        return Err(ScanError {
            path: failure.path,
            reason: failure.error,
        });
    }
    refused.map_or(Ok(()), Err)
}

/// Walks `root` (see [`walk_in_order`]) into a spool under `spool_dir`: a tree of any size
/// is held on disk, in tree order, not in memory.
pub fn walk_tree(root: &Path, exclude: &Exclude, spool_dir: &Path) -> Result<Spool, ScanError> {
    let spooling = |e: std::io::Error| ScanError {
        path: root.to_owned(),
        reason: format!("spool its entries in {}: {e}", spool_dir.display()),
    };
    let mut spool = SpoolWriter::unchecked(spool_dir).map_err(spooling)?;
    walk_in_order(root, exclude, |entry| {
        spool.push(&entry).map_err(|e| ScanError {
            path: root.to_owned(),
            reason: e.to_string(),
        })
    })?;
    spool.finish().map_err(spooling)
}

/// The manifest entry of one walked entry, or why the tree cannot be pushed.
fn manifest_entry(root: &Path, entry: walk::Entry) -> Result<Entry, ScanError> {
    let fail = |reason: String| ScanError {
        path: root.join(&entry.rel),
        reason,
    };
    let path = entry
        .rel
        .to_str()
        .ok_or_else(|| fail("the name is not UTF-8".into()))?
        .to_owned();
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
    Ok(Entry {
        path,
        kind,
        size,
        mode: entry.mode,
        sha256: None,
        target,
    })
}

/// A file's body as read for a push.
#[derive(Debug)]
pub struct ReadBody {
    pub sha256: [u8; 32],
    /// Bytes read (the file may have changed since it was walked).
    pub size: u64,
    /// The bytes, when the file is at most the `keep` limit given to [`read_body`].
    pub bytes: Option<Vec<u8>>,
}

/// Reads and hashes one file without following a symlink put in its place. A file of at
/// most `keep` bytes is kept in memory, so it can be sent without being read again.
pub fn read_body(path: &Path, size: u64, keep: u64) -> std::io::Result<ReadBody> {
    use sha2::{Digest as _, Sha256};
    use std::io::Read;
    let mut file = crate::copy::file::open_source(path)?;
    if size > keep {
        let mut counted = Counted(&mut file, 0);
        let sha256 = crate::copy::file::sha256(&mut counted)?;
        let size = counted.1;
        return Ok(ReadBody {
            sha256,
            size,
            bytes: None,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize + 1);
    file.read_to_end(&mut bytes)?;
    Ok(ReadBody {
        sha256: Sha256::digest(&bytes).into(),
        size: bytes.len() as u64,
        bytes: Some(bytes),
    })
}

/// A reader that counts what it hands out.
struct Counted<R>(R, u64);

impl<R: std::io::Read> std::io::Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        self.1 += n as u64;
        Ok(n)
    }
}

/// Scans `root`: manifest entries in tree order, every file hashed, on `jobs` threads.
pub fn scan(root: &Path, jobs: usize) -> Result<Vec<Entry>, ScanError> {
    let mut entries = Vec::new();
    walk_in_order(root, &Exclude::default(), |entry| {
        entries.push(entry);
        Ok(())
    })?;
    let hashes = crate::copy::parallel(&entries, jobs, |entry| match entry.kind {
        EntryKind::File => read_body(&root.join(&entry.path), entry.size, 0).map(Some),
        _ => Ok(None),
    });
    for (entry, read) in entries.iter_mut().zip(hashes) {
        let read = read.map_err(|e| ScanError {
            path: root.join(&entry.path),
            reason: e.to_string(),
        })?;
        if let Some(read) = read {
            entry.size = read.size;
            entry.sha256 = Some(Digest(read.sha256));
        }
    }
    Ok(entries)
}

/// Lowercase hex of a digest.
pub fn hex(digest: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    digest
        .iter()
        .flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::manifest::Checker;

    #[test]
    fn scans_a_tree_into_a_valid_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/empty")).unwrap();
        std::fs::write(root.join("a/x"), b"test").unwrap();
        std::fs::write(root.join("top"), b"").unwrap();
        std::os::unix::fs::symlink("a/x", root.join("link")).unwrap();
        let entries = scan(root, 4).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["a", "a/empty", "a/x", "link", "top"]);
        let x = entries.iter().find(|e| e.path == "a/x").unwrap();
        assert_eq!(
            x.sha256.map(|d| d.to_string()).as_deref(),
            Some("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08")
        );
        assert_eq!(entries.iter().filter(|e| e.sha256.is_some()).count(), 2);
        let mut checker = Checker::default();
        entries.iter().for_each(|e| checker.check(e).unwrap());
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
