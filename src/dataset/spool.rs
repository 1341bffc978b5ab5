//! A version's entries on disk: written once, in [`tree_order`], and read as often as a push,
//! pull or cache fill needs, so that no list of a tree's files is held in memory whatever
//! the tree's size.
//!
//! A spool is a temporary file of one JSON entry a line, exactly the lines a format 2
//! manifest holds after its head; it is counted and hashed as it is written. Rule: a checked
//! spool holds only entries that passed [`Checker`], in order; [`Spool::sorted`] reorders a
//! spool's entries by any key within [`RUN_BYTES`] of memory (sorted runs, merged).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::manifest::{Checker, Entry, EntryKind};

/// Entries sorted in memory at once by [`Spool::sorted`] (estimated bytes) before a run of
/// them goes to disk.
pub const RUN_BYTES: usize = 4 << 20;

/// Why entries could not be spooled: one that breaks a manifest rule, or the disk.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("{0}")]
    Invalid(String),
    #[error("spool the entries on disk: {0}")]
    Io(#[from] std::io::Error),
}

/// Entries on disk, in the order they were written (see the module docs).
#[derive(Debug)]
pub struct Spool {
    file: tempfile::NamedTempFile,
    /// Entries, regular files among them, and the files' bytes.
    pub count: u64,
    pub files: u64,
    pub bytes: u64,
    /// SHA-256 of the lines: equal for equal lists of entries.
    pub sha256: [u8; 32],
}

/// Writes a [`Spool`], an entry at a time.
pub struct SpoolWriter {
    out: BufWriter<tempfile::NamedTempFile>,
    /// `None`: the entries are not checked (a walk's, before their bodies are hashed).
    checker: Option<Checker>,
    line: Vec<u8>,
    hasher: Sha256,
    count: u64,
    files: u64,
    bytes: u64,
}

impl SpoolWriter {
    /// A writer whose entries must pass [`Checker`], spooled in `dir`.
    pub fn checked(dir: &Path) -> std::io::Result<SpoolWriter> {
        Self::new(dir, Some(Checker::default()))
    }

    /// A writer of entries the caller vouches for (made from a walk in tree order).
    pub fn unchecked(dir: &Path) -> std::io::Result<SpoolWriter> {
        Self::new(dir, None)
    }

    fn new(dir: &Path, checker: Option<Checker>) -> std::io::Result<SpoolWriter> {
        let file = tempfile::Builder::new()
            .prefix(".lanes-entries-")
            .tempfile_in(dir)?;
        Ok(SpoolWriter {
            out: BufWriter::with_capacity(1 << 16, file),
            checker,
            line: Vec::with_capacity(256),
            hasher: Sha256::new(),
            count: 0,
            files: 0,
            bytes: 0,
        })
    }

    /// Appends `entry` (after checking it, for a checked writer).
    pub fn push(&mut self, entry: &Entry) -> Result<(), Problem> {
        if let Some(checker) = &mut self.checker {
            checker.check(entry).map_err(Problem::Invalid)?;
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, entry).map_err(std::io::Error::other)?;
        self.line.push(b'\n');
        self.hasher.update(&self.line);
        self.out.write_all(&self.line)?;
        self.count += 1;
        if entry.kind == EntryKind::File {
            self.files += 1;
            self.bytes += entry.size;
        }
        Ok(())
    }

    /// The spool, flushed to its file.
    pub fn finish(self) -> std::io::Result<Spool> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(Spool {
            file,
            count: self.count,
            files: self.files,
            bytes: self.bytes,
            sha256: self.hasher.finalize().into(),
        })
    }
}

impl Spool {
    /// Spools `entries` (checked) in `dir`; a read error is named by `failed`.
    pub fn collect<E: std::fmt::Display>(
        dir: &Path,
        entries: impl IntoIterator<Item = Result<Entry, E>>,
    ) -> Result<Spool, Problem> {
        let mut writer = SpoolWriter::checked(dir)?;
        for entry in entries {
            writer.push(&entry.map_err(|e| Problem::Invalid(e.to_string()))?)?;
        }
        Ok(writer.finish()?)
    }

    /// The entries, from the first.
    pub fn read(&self) -> std::io::Result<Reader> {
        Ok(Reader {
            lines: BufReader::with_capacity(1 << 16, self.file.reopen()?),
            line: Vec::with_capacity(256),
        })
    }

    /// The raw lines, to copy into a manifest or a cache record.
    pub fn lines(&self) -> std::io::Result<std::fs::File> {
        self.file.reopen()
    }

    /// The entries `keep` selects, ordered by `key`, in [`RUN_BYTES`] of memory: sorted runs
    /// are spooled in `dir` and merged as they are read.
    pub fn sorted<K: Ord>(
        &self,
        keep: fn(&Entry) -> bool,
        key: fn(&Entry) -> K,
        dir: &Path,
    ) -> std::io::Result<Sorted<K>> {
        let mut runs = Vec::new();
        let mut held: Vec<Entry> = Vec::new();
        let mut held_bytes = 0;
        for entry in self.read()? {
            let entry = entry?;
            if !keep(&entry) {
                continue;
            }
            held_bytes += estimated_size(&entry);
            held.push(entry);
            if held_bytes >= RUN_BYTES {
                runs.push(run_of(std::mem::take(&mut held), key, dir)?);
                held_bytes = 0;
            }
        }
        if runs.is_empty() {
            held.sort_by_key(key);
            return Ok(Sorted::Held(held.into_iter()));
        }
        if !held.is_empty() {
            runs.push(run_of(held, key, dir)?);
        }
        let mut readers = Vec::with_capacity(runs.len());
        let mut heads = BinaryHeap::new();
        let mut next = Vec::with_capacity(runs.len());
        for (at, run) in runs.iter().enumerate() {
            let mut reader = run.read()?;
            let first = reader.next().transpose()?;
            if let Some(first) = &first {
                heads.push(Reverse((key(first), at)));
            }
            next.push(first);
            readers.push(reader);
        }
        Ok(Sorted::Merged(Merge {
            _runs: runs,
            readers,
            next,
            heads,
            key,
        }))
    }
}

/// Memory an entry takes, roughly: a run holds [`RUN_BYTES`] of these.
fn estimated_size(entry: &Entry) -> usize {
    std::mem::size_of::<Entry>()
        + entry.path.len()
        + entry.target.as_ref().map_or(0, String::len)
        + 32
}

/// Sorts `entries` by `key` and spools them, unchecked (they were checked once already).
fn run_of<K: Ord>(
    mut entries: Vec<Entry>,
    key: fn(&Entry) -> K,
    dir: &Path,
) -> std::io::Result<Spool> {
    entries.sort_by_key(key);
    let mut writer = SpoolWriter::unchecked(dir)?;
    for entry in &entries {
        writer.push(entry).map_err(|e| match e {
            Problem::Io(e) => e,
            Problem::Invalid(reason) => std::io::Error::other(reason),
        })?;
    }
    writer.finish()
}

/// Hands the items of `items` (entries read from a spool, say) to async code `size` at a
/// time, read on a blocking thread at most two batches ahead; reading stops when the receiver
/// is dropped.
pub fn batches<T: Send + 'static>(
    items: impl Iterator<Item = std::io::Result<T>> + Send + 'static,
    size: usize,
) -> tokio::sync::mpsc::Receiver<std::io::Result<Vec<T>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tokio::task::spawn_blocking(move || {
        let mut items = items.peekable();
        while items.peek().is_some() {
            let batch: std::io::Result<Vec<T>> = items.by_ref().take(size).collect();
            let failed = batch.is_err();
            if tx.blocking_send(batch).is_err() || failed {
                break;
            }
        }
    });
    rx
}

/// Reads a spool's entries in order.
pub struct Reader {
    lines: BufReader<std::fs::File>,
    line: Vec<u8>,
}

impl Reader {
    /// Up to `n` more entries (none at the end).
    pub fn batch(&mut self, n: usize) -> std::io::Result<Vec<Entry>> {
        self.by_ref().take(n).collect()
    }
}

impl Iterator for Reader {
    type Item = std::io::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.line.clear();
        match self.lines.read_until(b'\n', &mut self.line) {
            Ok(0) => None,
            Ok(_) => Some(serde_json::from_slice(&self.line).map_err(std::io::Error::other)),
            Err(e) => Some(Err(e)),
        }
    }
}

/// A spool's entries in another order ([`Spool::sorted`]).
pub enum Sorted<K> {
    /// Few enough to sort in memory.
    Held(std::vec::IntoIter<Entry>),
    /// Sorted runs on disk, merged.
    Merged(Merge<K>),
}

/// The k-way merge of sorted runs.
pub struct Merge<K> {
    _runs: Vec<Spool>,
    readers: Vec<Reader>,
    next: Vec<Option<Entry>>,
    heads: BinaryHeap<Reverse<(K, usize)>>,
    key: fn(&Entry) -> K,
}

impl<K: Ord> Iterator for Sorted<K> {
    type Item = std::io::Result<Entry>;

    fn next(&mut self) -> Option<Self::Item> {
        let merge = match self {
            Sorted::Held(held) => return held.next().map(Ok),
            Sorted::Merged(merge) => merge,
        };
        let Reverse((_, at)) = merge.heads.pop()?;
        let entry = merge.next[at].take()?;
        match merge.readers[at].next().transpose() {
            Ok(Some(following)) => {
                merge.heads.push(Reverse(((merge.key)(&following), at)));
                merge.next[at] = Some(following);
            }
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
        Some(Ok(entry))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::manifest::Digest;

    fn file(path: String, body: u8) -> Entry {
        Entry {
            path,
            kind: EntryKind::File,
            size: u64::from(body),
            mode: 0o644,
            sha256: Some(Digest([body; 32])),
            target: None,
        }
    }

    #[test]
    fn spools_count_hash_and_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let entries = vec![file("a".into(), 1), file("b".into(), 2)];
        let spool =
            Spool::collect(dir.path(), entries.iter().cloned().map(Ok::<_, String>)).unwrap();
        assert_eq!((spool.count, spool.files, spool.bytes), (2, 2, 3));
        let back: Vec<Entry> = spool.read().unwrap().map(Result::unwrap).collect();
        assert_eq!(back, entries);
        let again = Spool::collect(dir.path(), entries.into_iter().map(Ok::<_, String>)).unwrap();
        assert_eq!(again.sha256, spool.sha256, "equal entries, equal digest");

        let refused = Spool::collect(
            dir.path(),
            [file("b".into(), 1), file("a".into(), 1)].map(Ok::<_, String>),
        );
        assert!(matches!(refused, Err(Problem::Invalid(r)) if r.contains("out of order")));
    }

    #[test]
    fn sorts_beyond_memory_through_merged_runs() {
        let dir = tempfile::tempdir().unwrap();
        // Enough entries for several runs, with bodies in a scrambled order.
        let count = 3 * RUN_BYTES / estimated_size(&file("d/f000000".into(), 0)) + 17;
        let mut writer = SpoolWriter::checked(dir.path()).unwrap();
        writer
            .push(&Entry {
                path: "d".into(),
                kind: EntryKind::Dir,
                size: 0,
                mode: 0o755,
                sha256: None,
                target: None,
            })
            .unwrap();
        for i in 0..count {
            writer
                .push(&file(format!("d/f{i:06}"), (i * 7919 % 251) as u8))
                .unwrap();
        }
        let spool = writer.finish().unwrap();
        let sorted = spool
            .sorted(
                |e| e.kind == EntryKind::File,
                |e| (e.sha256, e.path.clone()),
                dir.path(),
            )
            .unwrap();
        assert!(matches!(sorted, Sorted::Merged(_)), "spilled to runs");
        let keys: Vec<(Option<Digest>, String)> = sorted
            .map(|e| e.map(|e| (e.sha256, e.path)).unwrap())
            .collect();
        assert_eq!(keys.len(), count);
        assert!(keys.windows(2).all(|w| w[0] <= w[1]));
    }
}
