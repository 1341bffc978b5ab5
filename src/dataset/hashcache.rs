//! The SHA-256s of files pushed before, so that a re-push of an unchanged tree reads nothing.
//!
//! Rule: a remembered hash is reused only while the kernel's record of the file is unchanged —
//! device, inode, size, modification time and change time. The change time moves with every
//! write and no ordinary process can set it back. A file whose times were within [`RACY_NS`]
//! of the moment it was looked at is not remembered at all: a write in the same clock tick would
//! not have moved them (the rule git applies to its index). The cache is best effort: one that
//! cannot be read is empty, one that cannot be written is skipped, and neither fails a push.
//! (Caches of format 1, a JSON map, are not read: the first push after an upgrade reads
//! every file once.)

use std::fs::Metadata;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::manifest::{Digest, tree_order};
use super::scan::hex;

/// Times closer than this to when a file was looked at make its entry untrustworthy.
const RACY_NS: i64 = 2_000_000_000;
const FORMAT: u32 = 2;

/// What the kernel says of a file, enough to tell that its contents may have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

impl Stamp {
    /// Bytes of [`Stamp::to_bytes`].
    pub const BYTES: usize = 40;

    /// The stamp as fixed-size bytes (a push's side file holds one per file).
    pub fn to_bytes(&self) -> [u8; Self::BYTES] {
        let mut bytes = [0u8; Self::BYTES];
        let fields = [
            self.dev,
            self.ino,
            self.size,
            self.mtime_ns as u64,
            self.ctime_ns as u64,
        ];
        for (out, field) in bytes.chunks_exact_mut(8).zip(fields) {
            out.copy_from_slice(&field.to_le_bytes());
        }
        bytes
    }

    /// The stamp [`Stamp::to_bytes`] wrote (`bytes` holds at least [`Stamp::BYTES`]).
    pub fn from_bytes(bytes: &[u8]) -> Stamp {
        let field = |at: usize| {
            let mut word = [0u8; 8];
            word.copy_from_slice(&bytes[at * 8..at * 8 + 8]);
            u64::from_le_bytes(word)
        };
        Stamp {
            dev: field(0),
            ino: field(1),
            size: field(2),
            mtime_ns: field(3) as i64,
            ctime_ns: field(4) as i64,
        }
    }

    pub fn of(meta: &Metadata) -> Stamp {
        let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// What the cache holds of one file: its hash while the file's stamp is unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub stamp: Stamp,
    pub sha256: Digest,
}

impl Remembered {
    /// The hash, when `stamp` (the file as it is now) is the one remembered.
    pub fn hash_for(&self, stamp: &Stamp) -> Option<[u8; 32]> {
        (self.stamp == *stamp).then_some(self.sha256.0)
    }
}

/// One line of the kept file, after its `{"format": 2}` line: a file, in tree order.
#[derive(Debug, Serialize, Deserialize)]
struct Kept {
    path: String,
    #[serde(flatten)]
    remembered: Remembered,
}

#[derive(Debug, Deserialize)]
struct KeptHead {
    format: u32,
}

/// The remembered hashes of one pushed directory. The kept file lists files in tree order,
/// so a push reads it alongside its own walk ([`Hints`]) and holds one line of it at a time.
#[derive(Debug, Default)]
pub struct HashCache {
    /// Where it is kept; `None`: nothing is remembered or kept.
    path: Option<PathBuf>,
}

impl HashCache {
    /// A cache that remembers nothing (`lanes dataset push --rehash`).
    pub fn disabled() -> HashCache {
        HashCache::default()
    }

    /// The cache for pushes of `root`, kept under `dir`.
    pub fn open(dir: &Path, root: &Path) -> HashCache {
        let root = root.canonicalize().unwrap_or_else(|_| root.to_owned());
        let name = hex(&Sha256::digest(root.as_os_str().as_encoded_bytes()));
        HashCache {
            path: Some(dir.join(format!("{}.lines", &name[..32]))),
        }
    }

    /// What is remembered, to be asked in tree order ([`Hints::get`]).
    pub fn hints(&self) -> Hints {
        let lines = self
            .path
            .as_ref()
            .and_then(|path| std::fs::File::open(path).ok())
            .map(|file| BufReader::with_capacity(1 << 16, file))
            .and_then(|mut lines| {
                let mut head = String::new();
                lines.read_line(&mut head).ok()?;
                let head: KeptHead = serde_json::from_str(&head).ok()?;
                (head.format == FORMAT).then_some(lines)
            });
        Hints {
            lines,
            next: None,
            line: String::new(),
        }
    }

    /// Replaces what is kept with `hashed` (path, stamp, hash, and when the stamp was taken in
    /// nanoseconds since the epoch), leaving out racy entries. Best effort, atomic.
    pub fn save<'a>(&self, hashed: impl IntoIterator<Item = (&'a str, Stamp, [u8; 32], i64)>) {
        if let Some(mut writer) = self.writer() {
            for (rel, stamp, sha256, seen) in hashed {
                writer.remember(rel, stamp, sha256, seen);
            }
            writer.finish();
        }
    }

    /// A writer of the replacement for what is kept, fed a file at a time, in tree order, as
    /// a push records them; `None` when nothing is kept.
    pub fn writer(&self) -> Option<CacheWriter> {
        let path = self.path.as_ref()?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let opened = std::fs::create_dir_all(dir)
            .and_then(|()| tempfile::Builder::new().prefix(".hashes-").tempfile_in(dir))
            .and_then(|file| {
                let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
                writeln!(out, "{{\"format\":{FORMAT}}}")?;
                Ok(out)
            });
        match opened {
            Ok(out) => Some(CacheWriter {
                path: path.clone(),
                out: Some(out),
            }),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "push hash cache not written");
                None
            }
        }
    }
}

/// Reads the kept file alongside a walk in tree order: each file's line is found by moving
/// forward, never back. A line out of order ends what is used of the file.
#[derive(Debug)]
pub struct Hints {
    lines: Option<BufReader<std::fs::File>>,
    next: Option<Kept>,
    line: String,
}

impl Hints {
    /// What is remembered of `path`; paths must be asked in tree order.
    pub fn get(&mut self, path: &str) -> Option<Remembered> {
        loop {
            if self.next.is_none() {
                let lines = self.lines.as_mut()?;
                self.line.clear();
                let kept = match lines.read_line(&mut self.line) {
                    Ok(0) | Err(_) => None,
                    Ok(_) => serde_json::from_str::<Kept>(&self.line).ok(),
                };
                if kept.is_none() {
                    self.lines = None;
                    return None;
                }
                self.next = kept;
            }
            let kept = self.next.as_ref()?;
            match tree_order(&kept.path, path) {
                std::cmp::Ordering::Less => self.next = None,
                std::cmp::Ordering::Equal => return self.next.take().map(|k| k.remembered),
                std::cmp::Ordering::Greater => return None,
            }
        }
    }
}

/// The next cache of a directory being written (see [`HashCache::writer`]). Best effort: the
/// first failure drops it, and it replaces the old cache only at [`CacheWriter::finish`].
pub struct CacheWriter {
    path: PathBuf,
    out: Option<std::io::BufWriter<tempfile::NamedTempFile>>,
}

impl CacheWriter {
    /// Remembers `rel`'s hash, unless its stamp was taken too soon after a write to it.
    pub fn remember(&mut self, rel: &str, stamp: Stamp, sha256: [u8; 32], seen: i64) {
        if stamp.mtime_ns.max(stamp.ctime_ns) >= seen - RACY_NS {
            return;
        }
        let Some(out) = self.out.as_mut() else { return };
        let kept = Kept {
            path: rel.to_owned(),
            remembered: Remembered {
                stamp,
                sha256: Digest(sha256),
            },
        };
        let written = serde_json::to_writer(&mut *out, &kept)
            .map_err(Into::into)
            .and_then(|()| out.write_all(b"\n"));
        if let Err(e) = written {
            self.fail(e);
        }
    }

    /// Puts the new cache in place of the old one.
    pub fn finish(mut self) {
        let Some(out) = self.out.take() else {
            return;
        };
        let placed = out
            .into_inner()
            .map_err(|e| e.into_error())
            // Losing it costs a re-hash, never a wrong answer: no sync needed.
            .and_then(|file| file.persist(&self.path).map(drop).map_err(|e| e.error));
        if let Err(e) = placed {
            self.fail(e);
        }
    }

    fn fail(&mut self, error: std::io::Error) {
        self.out = None;
        tracing::debug!(path = %self.path.display(), %error, "push hash cache not written");
    }
}

/// Nanoseconds since the epoch, now.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(cache: &HashCache, path: &str, stamp: &Stamp) -> Option<[u8; 32]> {
        cache.hints().get(path)?.hash_for(stamp)
    }

    #[test]
    fn remembers_only_unchanged_settled_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tree");
        std::fs::create_dir(&root).unwrap();
        let file = root.join("a");
        std::fs::write(&file, b"one").unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&file).unwrap());
        let sha: [u8; 32] = Sha256::digest(b"one").into();
        let later = now_ns() + 10 * RACY_NS;

        let racy_file = root.join("racy");
        std::fs::write(&racy_file, b"one").unwrap();
        let racy = Stamp::of(&std::fs::metadata(&racy_file).unwrap());

        let cache = HashCache::open(&dir.path().join("cache"), &root);
        assert_eq!(lookup(&cache, "a", &stamp), None, "nothing remembered yet");
        cache.save([("a", stamp, sha, later), ("racy", racy, sha, now_ns())]);
        let cache = HashCache::open(&dir.path().join("cache"), &root);
        assert_eq!(lookup(&cache, "a", &stamp), Some(sha));
        assert_eq!(
            lookup(&cache, "racy", &racy),
            None,
            "seen too soon after a write"
        );

        // Any write moves the change time (and here the size): the hash is not reused.
        std::fs::write(&file, b"two!").unwrap();
        let changed = Stamp::of(&std::fs::metadata(&file).unwrap());
        assert_ne!(changed, stamp);
        assert_eq!(lookup(&cache, "a", &changed), None);

        // Another directory has its own cache; a disabled one remembers nothing.
        let other = HashCache::open(&dir.path().join("cache"), dir.path());
        assert_eq!(lookup(&other, "a", &stamp), None);
        HashCache::disabled().save([("a", stamp, sha, later)]);
        assert_eq!(lookup(&HashCache::disabled(), "a", &stamp), None);
    }

    #[test]
    fn stamps_round_trip_through_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let stamp = Stamp::of(&std::fs::metadata(dir.path()).unwrap());
        assert_eq!(Stamp::from_bytes(&stamp.to_bytes()), stamp);
    }

    #[test]
    fn hints_move_forward_in_tree_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let stamp = Stamp::of(&std::fs::metadata(&file).unwrap());
        let later = now_ns() + 10 * RACY_NS;
        let cache = HashCache::open(&dir.path().join("cache"), dir.path());
        let kept = ["a", "a/b", "a/c", "a-z", "b"];
        cache.save(kept.map(|p| (p, stamp, [p.len() as u8; 32], later)));
        let mut hints = cache.hints();
        // Asked in tree order, skipping some and asking for some never kept.
        assert_eq!(hints.get("a").map(|r| r.sha256.0[0]), Some(1));
        assert!(hints.get("a/a").is_none());
        assert_eq!(hints.get("a/c").map(|r| r.sha256.0[0]), Some(3));
        assert!(hints.get("a.b").is_none(), "past a-z, before b");
        assert_eq!(hints.get("b").map(|r| r.sha256.0[0]), Some(1));
        assert!(hints.get("c").is_none());
    }
}
