//! A set of body digests (the bodies a version names): sorted, held in memory up to
//! [`HELD`] digests and on disk beyond, so a set of millions costs kilobytes of memory.
//!
//! On disk the digests are one sorted file of 32-byte records; memory keeps the first digest
//! of every block of [`BLOCK`] records, so a lookup is a binary search there, one read of a
//! block, and a binary search in it. Rule: a lookup that cannot read answers "absent", which
//! callers treat as "the bucket may lack it" — they read or upload, never skip.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::manifest::Digest;

/// Digests held in memory before they go to disk (1 MiB).
pub const HELD: usize = 32 << 10;
/// Records per block of the file on disk (4 KiB).
const BLOCK: usize = 128;

/// See the module docs.
#[derive(Debug, Default)]
pub struct Bodies {
    held: Vec<Digest>,
    disk: Option<OnDisk>,
}

#[derive(Debug)]
struct OnDisk {
    file: tempfile::NamedTempFile,
    count: usize,
    /// The first digest of each block.
    index: Vec<Digest>,
}

impl Bodies {
    /// The set of `digests` (any order, repeats allowed), spilled under `dir` when large.
    pub fn collect(
        digests: impl IntoIterator<Item = std::io::Result<Digest>>,
        dir: &Path,
    ) -> std::io::Result<Bodies> {
        let mut runs = Vec::new();
        let mut held = Vec::new();
        for digest in digests {
            held.push(digest?);
            if held.len() >= HELD {
                runs.push(write_run(std::mem::take(&mut held), dir)?);
            }
        }
        if runs.is_empty() {
            held.sort_unstable();
            held.dedup();
            return Ok(Bodies { held, disk: None });
        }
        if !held.is_empty() {
            runs.push(write_run(held, dir)?);
        }
        Ok(Bodies {
            held: Vec::new(),
            disk: Some(merge(runs, dir)?),
        })
    }

    /// How many distinct bodies.
    pub fn len(&self) -> usize {
        self.disk.as_ref().map_or(self.held.len(), |d| d.count)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True when `digest` is in the set (false when the disk cannot be read).
    pub fn contains(&self, digest: &Digest) -> bool {
        let Some(disk) = &self.disk else {
            return self.held.binary_search(digest).is_ok();
        };
        let block = disk.index.partition_point(|first| first <= digest);
        if block == 0 {
            return false;
        }
        let block = block - 1;
        let records = BLOCK.min(disk.count - block * BLOCK);
        let mut bytes = [0u8; BLOCK * 32];
        let bytes = &mut bytes[..records * 32];
        if disk
            .file
            .as_file()
            .read_exact_at(bytes, (block * BLOCK * 32) as u64)
            .is_err()
        {
            return false;
        }
        let (mut low, mut high) = (0, records);
        while low < high {
            let middle = (low + high) / 2;
            match bytes[middle * 32..][..32].cmp(&digest.0[..]) {
                std::cmp::Ordering::Less => low = middle + 1,
                std::cmp::Ordering::Greater => high = middle,
                std::cmp::Ordering::Equal => return true,
            }
        }
        false
    }
}

/// Sorts and writes one run of digests (repeats removed).
fn write_run(mut digests: Vec<Digest>, dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    digests.sort_unstable();
    digests.dedup();
    let mut out = BufWriter::with_capacity(1 << 16, temporary(dir)?);
    for digest in &digests {
        out.write_all(&digest.0)?;
    }
    out.into_inner().map_err(|e| e.into_error())
}

/// Merges sorted runs into one file without repeats, indexing its blocks.
fn merge(runs: Vec<tempfile::NamedTempFile>, dir: &Path) -> std::io::Result<OnDisk> {
    let mut readers = runs
        .iter()
        .map(|run| run.reopen().map(|f| BufReader::with_capacity(1 << 16, f)))
        .collect::<std::io::Result<Vec<_>>>()?;
    let next = |reader: &mut BufReader<std::fs::File>| -> std::io::Result<Option<Digest>> {
        let mut record = [0u8; 32];
        match reader.read_exact(&mut record) {
            Ok(()) => Ok(Some(Digest(record))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    };
    let mut heads = BinaryHeap::new();
    for (at, reader) in readers.iter_mut().enumerate() {
        if let Some(first) = next(reader)? {
            heads.push(Reverse((first, at)));
        }
    }
    let file = temporary(dir)?;
    let mut out = BufWriter::with_capacity(1 << 16, file.reopen()?);
    let (mut count, mut index, mut last) = (0, Vec::new(), None);
    while let Some(Reverse((digest, at))) = heads.pop() {
        if let Some(following) = next(&mut readers[at])? {
            heads.push(Reverse((following, at)));
        }
        if last == Some(digest) {
            continue;
        }
        if count % BLOCK == 0 {
            index.push(digest);
        }
        out.write_all(&digest.0)?;
        (count, last) = (count + 1, Some(digest));
    }
    out.flush()?;
    Ok(OnDisk { file, count, index })
}

/// A temporary file in `dir` (named, so it can be reopened).
fn temporary(dir: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix(".lanes-bodies-")
        .tempfile_in(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u64) -> Digest {
        use sha2::Digest as _;
        Digest(sha2::Sha256::digest(n.to_le_bytes()).into())
    }

    #[test]
    fn small_sets_stay_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let set = Bodies::collect([1, 2, 2, 3].map(|n| Ok(digest(n))), dir.path()).unwrap();
        assert!(set.disk.is_none());
        assert_eq!(set.len(), 3);
        assert!(set.contains(&digest(2)) && !set.contains(&digest(4)));
    }

    #[test]
    fn large_sets_go_to_disk_and_answer_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let total = 2 * HELD as u64 + 1000;
        // Every number twice, across runs.
        let all = (0..total).chain(0..total).map(|n| Ok(digest(n)));
        let set = Bodies::collect(all, dir.path()).unwrap();
        let disk = set.disk.as_ref().expect("spilled");
        assert_eq!(set.len(), total as usize, "repeats removed");
        assert!(disk.index.len() * BLOCK >= disk.count);
        for n in (0..total).step_by(97).chain([0, total - 1]) {
            assert!(set.contains(&digest(n)), "{n}");
        }
        for n in total..total + 500 {
            assert!(!set.contains(&digest(n)), "{n}");
        }
        assert!(!set.contains(&Digest([0; 32])) && !set.contains(&Digest([0xff; 32])));
    }
}
