//! A volume's state, kept in `volume.json` beside its data and replaced atomically, so a
//! restarted plugin loses nothing and needs no database.

use crate::fsutil::{Durability, atomic_write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{CreateParams, Error, Result};

/// Everything Lanes knows about a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// The CO's name for the volume (CreateVolume's idempotency key).
    pub name: String,
    /// The volume ID handed to the CO.
    pub id: String,
    pub capacity_bytes: u64,
    pub params: CreateParams,
    /// The node whose disk holds the volume.
    pub node_id: String,
    /// Seconds since the epoch.
    pub created_unix: u64,
    /// The XFS project whose quota enforces `capacity_bytes`, when enforced.
    pub project_id: Option<u32>,
    /// The pinned dataset (`bucket/name:v<N>` or `git+URL@<sha>`) the volume's data is an
    /// overlay on; `None` for a plain directory volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// How a `fast-rwo` volume's image was made and what filesystem it gets by default
    /// (the profile's settings when the volume was created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<super::BlockBackend>,
    /// What the volume was made from: `snapshot:<snapshot id>` or `volume:<volume id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_source: Option<String>,
}

pub const FILE: &str = "volume.json";

impl VolumeMeta {
    /// The record of a new plain volume (no node, dataset, block settings or source), made now.
    pub fn plain(name: &str, id: String, capacity_bytes: u64, params: CreateParams) -> Self {
        VolumeMeta {
            name: name.to_owned(),
            id,
            capacity_bytes,
            params,
            node_id: String::new(),
            created_unix: super::volumes::now_unix(),
            project_id: None,
            dataset: None,
            block: None,
            content_source: None,
        }
    }

    /// Reads the metadata in volume directory `dir`.
    pub fn load(dir: &Path) -> Result<VolumeMeta> {
        let path = dir.join(FILE);
        let bytes = std::fs::read(&path).map_err(Error::io(format!("read {}", path.display())))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io {
            context: format!("parse {}", path.display()),
            source: std::io::Error::other(e),
        })
    }

    /// Writes the metadata into `dir` atomically and durably (synced, renamed, directory
    /// synced).
    pub fn store(&self, dir: &Path) -> Result<()> {
        let path = dir.join(FILE);
        let body = serde_json::to_vec_pretty(self).map_err(|e| Error::Io {
            context: "encode volume metadata".into(),
            source: std::io::Error::other(e),
        })?;
        atomic_write(&path, &body, Durability::Synced)
            .map_err(Error::io(format!("write {}", path.display())))
    }
}
