//! Snapshots as lanes see them: self-describing IDs and the record kept beside each one.
//!
//! A snapshot ID is `<lane>@<dir>` (a volume ID has a `/` where this has `@`, so neither can
//! be taken for the other), parsed strictly before it becomes a path; `<dir>` maps from the
//! CO's snapshot name exactly as a volume's directory does.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Error, VolumeId};

/// A parsed, validated snapshot ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SnapshotId {
    lane: String,
    dir: String,
}

impl SnapshotId {
    /// The ID of a new snapshot called `name` on `lane`.
    pub fn for_name(lane: &str, name: &str) -> Result<SnapshotId, Error> {
        let as_volume = VolumeId::for_name(lane, name)?;
        Ok(SnapshotId {
            lane: lane.to_owned(),
            dir: as_volume.dir().to_owned(),
        })
    }

    /// Parses an ID from a request: malformed is `InvalidVolumeId`-like INVALID_ARGUMENT; a
    /// well-formed ID that cannot be ours is `UnknownVolume` (NOT_FOUND).
    pub fn parse(id: &str) -> Result<SnapshotId, Error> {
        if id.is_empty() {
            return Err(Error::Missing("snapshot_id"));
        }
        let Some((lane, dir)) = id.split_once('@') else {
            return Err(Error::UnknownVolume(id.to_owned()));
        };
        // The same rules as a volume ID's parts.
        let volume = VolumeId::parse(&format!("{lane}/{dir}")).map_err(|e| match e {
            Error::InvalidVolumeId { reason, .. } => Error::InvalidVolumeId {
                id: super::id::printable(id),
                reason,
            },
            _ => Error::UnknownVolume(id.to_owned()),
        })?;
        Ok(SnapshotId {
            lane: volume.lane().to_owned(),
            dir: volume.dir().to_owned(),
        })
    }

    pub fn lane(&self) -> &str {
        &self.lane
    }

    /// The directory name of the snapshot; always a single safe component.
    pub fn dir(&self) -> &str {
        &self.dir
    }

    /// The same name as a volume-style ID, for the directory store.
    pub fn as_volume_id(&self) -> VolumeId {
        VolumeId::parse(&format!("{}/{}", self.lane, self.dir)).expect("checked at parse")
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.lane, self.dir)
    }
}

/// What a new volume starts as a copy of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Snapshot(SnapshotId),
    Volume(VolumeId),
}

impl Source {
    /// The lane the source lives on.
    pub fn lane(&self) -> &str {
        match self {
            Source::Snapshot(id) => id.lane(),
            Source::Volume(id) => id.lane(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Snapshot(id) => write!(f, "snapshot:{id}"),
            Source::Volume(id) => write!(f, "volume:{id}"),
        }
    }
}

/// Everything Lanes knows about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The CO's name (CreateSnapshot's idempotency key).
    pub name: String,
    pub id: String,
    pub source_volume_id: String,
    /// The size of the source volume when the snapshot was taken.
    pub size_bytes: u64,
    pub created_unix: u64,
    /// How the copy was made: `reflink` (shares blocks with its source) or `copy`.
    pub method: String,
}

/// The rule for a repeated CreateSnapshot: the same name must name the same source.
pub fn same_source(
    name: &str,
    source: &VolumeId,
) -> impl Fn(SnapshotMeta) -> Result<SnapshotMeta, Error> {
    let (name, source) = (name.to_owned(), source.to_string());
    move |existing| {
        if existing.source_volume_id != source {
            return Err(Error::SnapshotExists {
                name: super::id::printable(&name),
                reason: format!("it is a snapshot of {}", existing.source_volume_id),
            });
        }
        Ok(existing)
    }
}

/// The capacity of a volume made from a source of `size` bytes: the source's size when the
/// request names none, else the request's, which must hold the source.
pub fn capacity_from(range: super::Range, size: u64, max: u64) -> Result<u64, Error> {
    let capacity = if range.required <= 0 && range.limit <= 0 {
        size
    } else {
        range.resolve(size, max)?
    };
    if capacity < size {
        return Err(Error::SmallerThanSource {
            requested: capacity,
            source_bytes: size,
        });
    }
    Ok(capacity)
}

/// Writes a snapshot's record into its directory, durably.
pub fn store(meta: &SnapshotMeta, dir: &std::path::Path) -> Result<(), Error> {
    let body = serde_json::to_vec_pretty(meta).map_err(|e| Error::Io {
        context: "encode the snapshot record".into(),
        source: std::io::Error::other(e),
    })?;
    let path = dir.join(<SnapshotMeta as super::volumes::Record>::FILE);
    crate::fsutil::atomic_write(&path, &body, crate::fsutil::Durability::Synced)
        .map_err(Error::io(format!("write {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn ids() {
        let id = SnapshotId::for_name("fast-rwo", "snapshot-1").unwrap();
        assert_eq!(id.to_string(), "fast-rwo@snapshot-1");
        assert_eq!(SnapshotId::parse("fast-rwo@snapshot-1").unwrap(), id);
        for (text, kind) in [
            ("", Kind::InvalidArgument),
            ("fast-rwo/snapshot-1", Kind::NotFound),
            ("nolane@x", Kind::NotFound),
            ("fast-rwo@../etc", Kind::InvalidArgument),
            ("fast-rwo@a/b", Kind::InvalidArgument),
        ] {
            assert_eq!(SnapshotId::parse(text).unwrap_err().kind(), kind, "{text}");
        }
    }
}
