//! The SHA-256s of files pushed before, so that a re-push of an unchanged tree reads nothing.
//!
//! Rule: a remembered hash is reused only while the kernel's record of the file is unchanged —
//! device, inode, size, modification time and change time. The change time moves with every
//! write and no ordinary process can set it back. A file whose times were within [`RACY_NS`]
//! of the moment it was looked at is not remembered at all: a write in the same clock tick would
//! not have moved them (the rule git applies to its index). The cache is best effort: one that
//! cannot be read is empty, one that cannot be written is skipped, and neither fails a push.

use std::fs::Metadata;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::manifest::Digest;
use super::scan::hex;

/// Times closer than this to when a file was looked at make its entry untrustworthy.
const RACY_NS: i64 = 2_000_000_000;
const FORMAT: u32 = 1;

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

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Remembered {
    stamp: Stamp,
    sha256: Digest,
}

/// The kept document as read: `{"format": 1, "files": {PATH: {stamp, sha256}, ...}}`. The
/// paths are skipped as they are read: a stamp names its file (device and inode) and its
/// state, so it alone is the key (a million paths are never held).
#[derive(Debug, Default, Deserialize)]
struct Stored {
    format: u32,
    #[serde(deserialize_with = "by_stamp")]
    files: Vec<(Stamp, Digest)>,
}

/// The kept files as (stamp, hash) pairs sorted by stamp: 72 bytes a file, found by binary
/// search.
fn by_stamp<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<(Stamp, Digest)>, D::Error> {
    struct Files;
    impl<'de> serde::de::Visitor<'de> for Files {
        type Value = Vec<(Stamp, Digest)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map of paths to stamps and hashes")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut files = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some((serde::de::IgnoredAny, remembered)) =
                map.next_entry::<serde::de::IgnoredAny, Remembered>()?
            {
                files.push((remembered.stamp, remembered.sha256));
            }
            files.sort_unstable_by_key(|(stamp, _)| *stamp);
            Ok(files)
        }
    }
    deserializer.deserialize_map(Files)
}

/// The remembered hashes of one pushed directory.
#[derive(Debug, Default)]
pub struct HashCache {
    /// Where it is kept; `None`: nothing is remembered or kept.
    path: Option<PathBuf>,
    files: Vec<(Stamp, Digest)>,
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
        let path = dir.join(format!("{}.json", &name[..32]));
        let files = std::fs::File::open(&path)
            .ok()
            .map(|file| std::io::BufReader::with_capacity(1 << 16, file))
            .and_then(|text| serde_json::from_reader::<_, Stored>(text).ok())
            .filter(|stored| stored.format == FORMAT)
            .map(|stored| stored.files)
            .unwrap_or_default();
        HashCache {
            path: Some(path),
            files,
        }
    }

    /// The hash remembered for the file of `stamp` when it is still as it was then.
    pub fn lookup(&self, stamp: &Stamp) -> Option<[u8; 32]> {
        let at = self.files.binary_search_by_key(stamp, |(s, _)| *s).ok()?;
        Some(self.files[at].1.0)
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

    /// A writer of the replacement for what is kept, fed a file at a time as a push hashes
    /// them (nothing per file is held until the end); `None` when nothing is kept.
    pub fn writer(&self) -> Option<CacheWriter> {
        let path = self.path.as_ref()?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let opened = std::fs::create_dir_all(dir)
            .and_then(|()| tempfile::Builder::new().prefix(".hashes-").tempfile_in(dir))
            .and_then(|file| {
                let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
                write!(out, "{{\"format\":{FORMAT},\"files\":{{")?;
                Ok(out)
            });
        match opened {
            Ok(out) => Some(CacheWriter {
                path: path.clone(),
                out: Some(out),
                first: true,
            }),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "push hash cache not written");
                None
            }
        }
    }
}

/// The next cache of a directory being written (see [`HashCache::writer`]). Best effort: the
/// first failure drops it, and it replaces the old cache only at [`CacheWriter::finish`].
pub struct CacheWriter {
    path: PathBuf,
    out: Option<std::io::BufWriter<tempfile::NamedTempFile>>,
    first: bool,
}

impl CacheWriter {
    /// Remembers `rel`'s hash, unless its stamp was taken too soon after a write to it.
    pub fn remember(&mut self, rel: &str, stamp: Stamp, sha256: [u8; 32], seen: i64) {
        if stamp.mtime_ns.max(stamp.ctime_ns) >= seen - RACY_NS {
            return;
        }
        let Some(out) = self.out.as_mut() else { return };
        let remembered = Remembered {
            stamp,
            sha256: Digest(sha256),
        };
        let comma = if std::mem::take(&mut self.first) {
            ""
        } else {
            ","
        };
        let written = out
            .write_all(comma.as_bytes())
            .and_then(|()| serde_json::to_writer(&mut *out, rel).map_err(Into::into))
            .and_then(|()| out.write_all(b":"))
            .and_then(|()| serde_json::to_writer(&mut *out, &remembered).map_err(Into::into));
        if let Err(e) = written {
            self.fail(e);
        }
    }

    /// Puts the new cache in place of the old one.
    pub fn finish(mut self) {
        let Some(mut out) = self.out.take() else {
            return;
        };
        let placed = out
            .write_all(b"}}")
            .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
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
        assert_eq!(cache.lookup(&stamp), None, "nothing remembered yet");
        cache.save([("a", stamp, sha, later), ("racy", racy, sha, now_ns())]);
        let cache = HashCache::open(&dir.path().join("cache"), &root);
        assert_eq!(cache.lookup(&stamp), Some(sha));
        assert_eq!(cache.lookup(&racy), None, "seen too soon after a write");

        // Any write moves the change time (and here the size): the hash is not reused.
        std::fs::write(&file, b"two!").unwrap();
        let changed = Stamp::of(&std::fs::metadata(&file).unwrap());
        assert_ne!(changed, stamp);
        assert_eq!(cache.lookup(&changed), None);

        // Another directory has its own cache; a disabled one remembers nothing.
        assert_eq!(
            HashCache::open(&dir.path().join("cache"), dir.path()).lookup(&stamp),
            None
        );
        HashCache::disabled().save([("a", stamp, sha, later)]);
        assert_eq!(HashCache::disabled().lookup(&stamp), None);
    }
}
