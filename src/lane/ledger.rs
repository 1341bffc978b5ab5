//! The node's ledger: what this node has staged and published, per volume, in
//! `<data-dir>/node/<volume key>.json`.
//!
//! An entry is written before its mount is made and removed after the mount is gone, so:
//! - a retry after a crash knows what was asked and repairs a half-made mount, while a
//!   different request at the same path is told apart (ALREADY_EXISTS, CSI spec);
//! - single-writer access modes are enforced across targets (CSI: SINGLE_NODE_SINGLE_WRITER
//!   and SINGLE_NODE_WRITER are published once as read/write, reader-only modes never beside
//!   a writer);
//! - unpublish removes a target directory only when a publish of that volume recorded it, and
//!   per-volume state goes only when no publication of the volume remains.
//!
//! Entries describe mounts, which a reboot clears, so records only need to survive `kill -9`,
//! which is what a retry needs: a record is rewritten in place with one write of less than a
//! page (which a fatal signal cannot tear) and then truncated; the reader takes the first JSON
//! value, so a kill between the two still leaves the new record. A larger record is replaced
//! through a temporary and a rename. Rewriting in place keeps a stage or publish from
//! allocating a new inode each time, which on ext4 costs more than the call itself. An entry
//! whose path no longer carries the volume's mount is stale and is dropped when next seen.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::capability::{AccessMode, Asked};
use crate::error::Kind;
use crate::fsutil::{Durability, atomic_write};

/// One publication of a volume at a target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    pub target: PathBuf,
    /// The staging path it was bound from (none for inline volumes).
    pub staging: Option<PathBuf>,
    pub asked: Asked,
    /// True when the publication can write (not read-only by flag, field or mode).
    pub writer: bool,
    /// True when Lanes created the target directory (so unpublish removes it).
    pub created_target: bool,
}

/// One staging of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    pub path: PathBuf,
    pub asked: Asked,
}

/// The dataset of an inline volume: the reference asked for and the version it was pinned to
/// (recorded before the first mount, so every retry mounts the same version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineDataset {
    pub reference: String,
    pub pin: String,
}

/// Everything the node knows about one volume.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume_id: String,
    #[serde(default)]
    pub staged: Vec<Staging>,
    #[serde(default)]
    pub published: Vec<Publication>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<InlineDataset>,
}

impl VolumeRecord {
    /// The publication at `target`, if one is recorded.
    pub fn publication(&self, target: &Path) -> Option<&Publication> {
        self.published.iter().find(|p| p.target == target)
    }

    /// The staging at `path`, if one is recorded.
    pub fn staging(&self, path: &Path) -> Option<&Staging> {
        self.staged.iter().find(|s| s.path == path)
    }

    /// Records `publication`, replacing any entry at its target.
    pub fn set_publication(&mut self, publication: Publication) {
        self.published.retain(|p| p.target != publication.target);
        self.published.push(publication);
    }

    /// Records `staging`, replacing any entry at its path.
    pub fn set_staging(&mut self, staging: Staging) {
        self.staged.retain(|s| s.path != staging.path);
        self.staged.push(staging);
    }

    /// True when nothing is staged or published any more.
    pub fn is_idle(&self) -> bool {
        self.staged.is_empty() && self.published.is_empty()
    }
}

/// Why publication `new` may not coexist with the live publication `existing` of the same
/// volume at another target, or `None` when it may.
pub fn conflict(existing: &Publication, new: &Publication) -> Option<String> {
    let (a, b) = (existing.asked.mode, new.asked.mode);
    let at = existing.target.display();
    if a == AccessMode::SingleNodeSingleWriter || b == AccessMode::SingleNodeSingleWriter {
        return Some(format!(
            "the volume is single-writer (SINGLE_NODE_SINGLE_WRITER, ReadWriteOncePod) and is \
             already published at {at}; unpublish it there first"
        ));
    }
    if existing.writer && new.writer && (a.single_writer() || b.single_writer()) {
        return Some(format!(
            "the access mode allows one writer and the volume is already published read/write \
             at {at}"
        ));
    }
    if (existing.writer && b.reader_only()) || (new.writer && a.reader_only()) {
        return Some(format!(
            "a reader-only access mode cannot share the volume with a writer (published at {at})"
        ));
    }
    None
}

/// Records up to this size are rewritten in place (one write within the first page).
const IN_PLACE_BYTES: usize = 3584;

/// Overwrites the start of `path` with `bytes` in one write, then cuts what is left of a longer
/// old record (see the module docs for why a kill cannot leave a broken record).
fn rewrite_in_place(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    file.write_all_at(bytes, 0)?;
    file.set_len(bytes.len() as u64)
}

/// Failures of the ledger (its files are Lanes' own, so every failure is internal).
#[derive(Debug, thiserror::Error)]
#[error("node ledger {path}: {source}")]
pub struct Error {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl Error {
    pub fn kind(&self) -> Kind {
        crate::error::io_kind(&self.source)
    }
}

/// The ledger of one node.
#[derive(Debug, Clone)]
pub struct Ledger {
    dir: PathBuf,
}

impl Ledger {
    /// Opens (creating) `<data_dir>/node`.
    pub fn open(data_dir: &Path) -> Result<Ledger, Error> {
        let dir = data_dir.join("node");
        std::fs::create_dir_all(&dir).map_err(|source| Error {
            path: dir.clone(),
            source,
        })?;
        Ok(Ledger { dir })
    }

    fn path(&self, volume_id: &str) -> PathBuf {
        let digest = Sha256::digest(volume_id.as_bytes());
        let key: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{key}.json"))
    }

    /// The record of `volume_id` (empty when none is kept).
    pub fn load(&self, volume_id: &str) -> Result<VolumeRecord, Error> {
        let path = self.path(volume_id);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(VolumeRecord {
                    volume_id: volume_id.to_owned(),
                    ..Default::default()
                });
            }
            Err(source) => return Err(Error { path, source }),
        };
        let first = serde_json::Deserializer::from_slice(&bytes)
            .into_iter::<VolumeRecord>()
            .next();
        match first {
            Some(Ok(record)) if record.volume_id == volume_id => Ok(record),
            _ => Err(Error {
                path,
                source: std::io::Error::other(
                    "the record is damaged or belongs to another volume; remove it once nothing \
                     of the volume is mounted",
                ),
            }),
        }
    }

    /// Stores `record`; an idle record without a dataset is removed instead.
    pub fn store(&self, record: &VolumeRecord) -> Result<(), Error> {
        let path = self.path(&record.volume_id);
        let result = if record.is_idle() && record.dataset.is_none() {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        } else {
            let bytes = serde_json::to_vec(record).map_err(std::io::Error::other);
            bytes.and_then(|bytes| {
                if bytes.len() <= IN_PLACE_BYTES {
                    rewrite_in_place(&path, &bytes)
                } else {
                    atomic_write(&path, &bytes, Durability::Process)
                }
            })
        };
        result.map_err(|source| Error { path, source })
    }

    /// Every record kept (damaged ones are skipped).
    pub fn all(&self) -> Result<Vec<VolumeRecord>, Error> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| Error {
            path: self.dir.clone(),
            source,
        })?;
        let mut records = Vec::new();
        for entry in entries.flatten() {
            if entry.path().extension().is_none_or(|e| e != "json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            let first = serde_json::Deserializer::from_slice(&bytes)
                .into_iter::<VolumeRecord>()
                .next();
            if let Some(Ok(record)) = first {
                records.push(record);
            }
        }
        Ok(records)
    }

    /// Forgets `volume_id` entirely.
    pub fn remove(&self, volume_id: &str) -> Result<(), Error> {
        let path = self.path(volume_id);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(Error { path, source })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AccessMode::*;

    fn publication(target: &str, mode: AccessMode, writer: bool) -> Publication {
        Publication {
            target: target.into(),
            staging: None,
            asked: Asked {
                mode,
                block: false,
                fs_type: String::new(),
                flags_sha256: Asked::digest_flags(&[]),
                mount_group: String::new(),
                readonly: !writer,
            },
            writer,
            created_target: true,
        }
    }

    #[test]
    fn access_mode_pairs() {
        // (existing mode, existing writes, new mode, new writes, allowed)
        let cases = [
            (
                SingleNodeMultiWriter,
                true,
                SingleNodeMultiWriter,
                true,
                true,
            ),
            (
                SingleNodeMultiWriter,
                true,
                SingleNodeMultiWriter,
                false,
                true,
            ),
            (
                SingleNodeSingleWriter,
                true,
                SingleNodeSingleWriter,
                true,
                false,
            ),
            (
                SingleNodeSingleWriter,
                false,
                SingleNodeSingleWriter,
                false,
                false,
            ),
            (
                SingleNodeSingleWriter,
                true,
                SingleNodeMultiWriter,
                false,
                false,
            ),
            (
                SingleNodeMultiWriter,
                false,
                SingleNodeSingleWriter,
                true,
                false,
            ),
            (SingleNodeWriter, true, SingleNodeWriter, true, false),
            (SingleNodeWriter, true, SingleNodeWriter, false, true),
            (SingleNodeWriter, false, SingleNodeWriter, true, true),
            (SingleNodeWriter, true, SingleNodeMultiWriter, true, false),
            (SingleNodeMultiWriter, true, SingleNodeWriter, true, false),
            (
                SingleNodeReaderOnly,
                false,
                SingleNodeMultiWriter,
                true,
                false,
            ),
            (
                SingleNodeMultiWriter,
                true,
                SingleNodeReaderOnly,
                false,
                false,
            ),
            (
                SingleNodeReaderOnly,
                false,
                SingleNodeReaderOnly,
                false,
                true,
            ),
            (
                SingleNodeReaderOnly,
                false,
                SingleNodeMultiWriter,
                false,
                true,
            ),
            (MultiNodeMultiWriter, true, MultiNodeMultiWriter, true, true),
            (
                MultiNodeSingleWriter,
                true,
                MultiNodeSingleWriter,
                true,
                false,
            ),
            (
                MultiNodeSingleWriter,
                true,
                MultiNodeSingleWriter,
                false,
                true,
            ),
            (
                MultiNodeReaderOnly,
                false,
                MultiNodeMultiWriter,
                true,
                false,
            ),
            (MultiNodeReaderOnly, false, MultiNodeReaderOnly, false, true),
        ];
        for (a, a_writes, b, b_writes, allowed) in cases {
            let verdict = conflict(
                &publication("/a", a, a_writes),
                &publication("/b", b, b_writes),
            );
            assert_eq!(
                verdict.is_none(),
                allowed,
                "{a:?}/{a_writes} then {b:?}/{b_writes}: {verdict:?}"
            );
        }
    }

    #[test]
    fn records_round_trip_and_idle_records_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(tmp.path()).unwrap();
        let mut record = ledger.load("local/pvc-1").unwrap();
        assert!(record.is_idle());
        record.set_publication(publication("/t", SingleNodeMultiWriter, true));
        record.set_publication(publication("/t", SingleNodeMultiWriter, false));
        assert_eq!(record.published.len(), 1, "one entry per target");
        ledger.store(&record).unwrap();
        assert_eq!(ledger.load("local/pvc-1").unwrap(), record);
        assert!(ledger.load("local/pvc-2").unwrap().is_idle());
        // A kill between the write and the truncation leaves the new record, then the old
        // record's tail: the reader takes the first value.
        let path = ledger.path("local/pvc-1");
        let mut torn = serde_json::to_vec(&record).unwrap();
        torn.extend_from_slice(b"{\"volume_id\":\"leftover of a longer old record\"}");
        std::fs::write(&path, &torn).unwrap();
        assert_eq!(ledger.load("local/pvc-1").unwrap(), record);
        // Large records go through a rename.
        for i in 0..40 {
            record.set_publication(publication(
                &format!("/targets/{i:03}"),
                SingleNodeMultiWriter,
                true,
            ));
        }
        ledger.store(&record).unwrap();
        assert_eq!(ledger.load("local/pvc-1").unwrap(), record);
        record.published.clear();
        ledger.store(&record).unwrap();
        assert_eq!(
            std::fs::read_dir(tmp.path().join("node")).unwrap().count(),
            0
        );
        assert_ne!(
            Asked::digest_flags(&["ro".into()]),
            Asked::digest_flags(&["rw".into()])
        );
        assert_eq!(
            Asked::digest_flags(&["a".into(), "b".into()]),
            Asked::digest_flags(&["b".into(), "a".into()])
        );
    }
}
