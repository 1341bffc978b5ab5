//! The `legacy-rwx` lane: each volume is a subdirectory of an NFS export,
//! `<export>/<prefix>/<dir>/data`, beside its `volume.json`.
//!
//! Rules this lane enforces:
//! - the controller never mounts: it makes and removes volume directories through a userspace
//!   NFS client ([`client::Client`]), so it needs no privilege and no kernel NFS module;
//! - a volume appears whole or not at all: it is built as `<prefix>/.tmp-<dir>` and renamed
//!   into place; a killed create leaves only a `.tmp-*` that the retry (or the next start)
//!   removes;
//! - a delete touches that one directory only: renamed out of the volumes (to `.trash-*`, or
//!   aside for `retain` / `archive`), then emptied without following a symbolic link;
//! - a volume staged on any node (its marker in `<dir>/staged/`) is not deleted;
//! - NFS does not enforce capacity: it is recorded, reported and said to be unenforced.

pub mod client;
pub mod config;
pub mod controller;
pub mod mount;
pub mod node;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use config::{Nfs, RawNfs};

use self::client::Client;
use super::local::{CreateRequest, LocalSettings, Space};
use super::params::OnDelete;
use super::volumes::check_compatible;
use super::{Error, Profiles, Range, Result, VolumeId, VolumeMeta};

/// The lane's name in volume IDs and profiles.
pub const LANE: &str = "legacy-rwx";
/// The directory inside a volume's directory that pods see.
const DATA: &str = "data";
/// Where a create builds a volume before it is renamed into place.
const TMP_PREFIX: &str = ".tmp-";
/// Where a delete moves a volume before emptying it.
const TRASH_PREFIX: &str = ".trash-";
/// The directory of a volume's directory where each node that stages it keeps a marker (so
/// the controller, which mounts nothing, can refuse to delete a volume in use).
pub const STAGED: &str = "staged";
/// The most a `volume.json` may hold.
const META_LIMIT: u32 = 64 * 1024;

/// One profile's export, as the controller (and a node, for what it keeps on the export)
/// reaches it over the userspace client.
#[derive(Debug)]
pub struct Export {
    pub profile: String,
    pub config: Nfs,
    pub client: Client,
    /// Set once the prefix exists and leftovers of killed calls are gone.
    ready: tokio::sync::OnceCell<()>,
}

impl Export {
    /// Profile `profile`'s export; nothing is contacted until a call needs it.
    pub fn new(profile: &str, config: Nfs, deadline: Duration) -> Export {
        let what = format!("NFS server {} (profile {profile})", config.source());
        let client = Client::new(config.url(), what, deadline);
        Export {
            profile: profile.to_owned(),
            config,
            client,
            ready: tokio::sync::OnceCell::new(),
        }
    }

    /// The volume's directory, relative to the export.
    pub fn volume(&self, id: &VolumeId) -> String {
        format!("{}/{}", self.config.prefix, id.dir())
    }

    /// Where nodes that stage the volume keep their markers.
    pub fn staged(&self, id: &VolumeId) -> String {
        format!("{}/{STAGED}", self.volume(id))
    }

    /// The marker of node `node` (a safe name) for the volume.
    pub fn marker(&self, id: &VolumeId, node: &str) -> String {
        format!("{}/{node}", self.staged(id))
    }

    fn meta_path(&self, id: &VolumeId) -> String {
        format!("{}/{}", self.volume(id), super::meta::FILE)
    }

    /// Makes the prefix, and removes what killed creates and deletes left, once per process.
    async fn prepare(&self) -> Result<()> {
        self.ready
            .get_or_try_init(|| async {
                self.client.mkdir_all(&self.config.prefix).await?;
                for entry in self.client.list(&self.config.prefix).await?.unwrap_or_default() {
                    if entry.name.starts_with(TMP_PREFIX) || entry.name.starts_with(TRASH_PREFIX) {
                        let path = format!("{}/{}", self.config.prefix, entry.name);
                        tracing::info!(path, server = %self.client.what(), "removing leftover of an interrupted call");
                        self.client.remove_tree(&path).await?;
                    }
                }
                Ok(())
            })
            .await
            .map(|_| ())
    }

    /// The volume's record, or `None` when there is no such volume.
    pub async fn load(&self, id: &VolumeId) -> Result<Option<VolumeMeta>> {
        let path = self.meta_path(id);
        let Some(body) = self.client.read(&path, META_LIMIT).await? else {
            return Ok(None);
        };
        let meta: VolumeMeta = serde_json::from_slice(&body).map_err(|e| Error::Io {
            context: format!("parse {path} on {}", self.client.what()),
            source: std::io::Error::other(e),
        })?;
        Ok(Some(meta))
    }

    /// Writes the volume's record into `dir`: straight into a volume being built (its
    /// directory is renamed into place afterwards), through a temporary name and a rename
    /// into a live one.
    async fn store(&self, dir: &str, meta: &VolumeMeta, live: bool) -> Result<()> {
        let body = serde_json::to_vec_pretty(meta).map_err(|e| Error::Io {
            context: "encode volume metadata".into(),
            source: std::io::Error::other(e),
        })?;
        let path = format!("{dir}/{}", super::meta::FILE);
        if !live {
            return self.client.write(&path, &body).await;
        }
        let temp = format!("{path}.new");
        self.client.write(&temp, &body).await?;
        self.client.rename(&temp, &path).await?;
        Ok(())
    }
}

/// The `legacy-rwx` lane as the controller runs it: one [`Export`] per profile.
#[derive(Debug)]
pub struct NfsLane {
    exports: BTreeMap<String, Arc<Export>>,
    settings: LocalSettings,
    failpoint: crate::failpoint::Failpoint,
}

impl NfsLane {
    /// The lane for every `legacy-rwx` profile; nothing is contacted until a call needs it.
    pub fn new(profiles: &Profiles, settings: LocalSettings, deadline: Duration) -> NfsLane {
        let exports = profiles
            .iter()
            .filter_map(|p| {
                let export = Export::new(&p.name, p.nfs.clone()?, deadline);
                Some((p.name.clone(), Arc::new(export)))
            })
            .collect();
        NfsLane {
            exports,
            settings,
            failpoint: crate::failpoint::Failpoint::from_env(),
        }
    }

    /// Whether any profile uses this lane.
    pub fn is_empty(&self) -> bool {
        self.exports.is_empty()
    }

    /// The export of `profile`.
    pub fn export(&self, profile: &str) -> Result<&Arc<Export>> {
        self.exports.get(profile).ok_or_else(|| {
            Error::UnknownVolume(format!(
                "{LANE}/{profile}: no legacy-rwx profile of that name here"
            ))
        })
    }

    fn export_of(&self, id: &VolumeId) -> Result<&Arc<Export>> {
        self.export(id.fs().unwrap_or_default())
    }

    /// Creates the volume's directory, or returns the existing one of that name if it is
    /// compatible.
    pub async fn create(&self, request: &CreateRequest) -> Result<VolumeMeta> {
        let export = self.export(&request.params.profile)?;
        if request.source.is_some() {
            return Err(Error::Unsupported(
                "legacy-rwx volumes cannot be made from snapshots or volumes".into(),
            ));
        }
        if request.dataset.is_some() {
            return Err(Error::InvalidParameter {
                key: "dataset".into(),
                reason: "legacy-rwx volumes cannot start with a dataset; use a local or dataset \
                         volume"
                    .into(),
            });
        }
        let id = VolumeId::in_fs(LANE, &export.profile, &request.name)?;
        export.prepare().await?;
        if let Some(existing) = export.load(&id).await? {
            return check_compatible(existing, &request.name, request.range, &request.params);
        }
        let max = self.max_capacity(export).await?;
        let capacity = request.range.resolve(self.settings.default_capacity, max)?;
        let temp = format!("{}/{TMP_PREFIX}{}", export.config.prefix, id.dir());
        // A killed create of this name left its half-made directory: start again.
        export.client.remove_tree(&temp).await?;
        export.client.mkdir(&temp, 0o755).await?;
        export
            .client
            .mkdir(&format!("{temp}/{DATA}"), 0o777)
            .await?;
        self.failpoint.hit("create.after-mkdir");
        let meta = VolumeMeta::plain(
            &request.name,
            id.to_string(),
            capacity,
            request.params.clone(),
        );
        export.store(&temp, &meta, false).await?;
        if !export.client.rename(&temp, &export.volume(&id)).await? {
            return Err(Error::Backend {
                what: export.client.what().to_owned(),
                said: format!(
                    "{temp} vanished while volume {} was made; retry",
                    request.name
                ),
            });
        }
        Ok(meta)
    }

    /// The volume with this ID, or `UnknownVolume`.
    pub async fn get(&self, id: &VolumeId) -> Result<VolumeMeta> {
        self.export_of(id)?
            .load(id)
            .await?
            .ok_or_else(|| Error::UnknownVolume(id.to_string()))
    }

    /// Every volume of every export, ordered by ID.
    pub async fn list(&self) -> Result<Vec<VolumeMeta>> {
        let mut all = Vec::new();
        for export in self.exports.values() {
            let entries = export.client.list(&export.config.prefix).await?;
            for entry in entries.unwrap_or_default() {
                if !entry.is_dir || entry.name.starts_with('.') {
                    continue;
                }
                let id = VolumeId::parse(&format!("{LANE}/{}/{}", export.profile, entry.name));
                let Ok(id) = id else { continue };
                if let Some(meta) = export.load(&id).await? {
                    all.push(meta);
                }
            }
        }
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    /// Deletes the volume as its `onDelete` says; an unknown one is fine.
    pub async fn delete(&self, id: &VolumeId) -> Result<()> {
        let export = self.export_of(id)?;
        export.prepare().await?;
        let Some(meta) = export.load(id).await? else {
            // Not a volume (a record-less directory is not Lanes' to remove).
            return Ok(());
        };
        let markers = export.staged(id);
        let nodes: Vec<String> = (export.client.list(&markers).await?)
            .unwrap_or_default()
            .into_iter()
            .map(|e| e.name)
            .collect();
        if !nodes.is_empty() {
            return Err(Error::StagedOn {
                id: id.to_string(),
                nodes: nodes.join(", "),
                marker: format!(
                    "{}:{}/{markers}/<node>",
                    export.config.server, export.config.export
                ),
            });
        }
        let prefix = &export.config.prefix;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        match meta.params.on_delete {
            OnDelete::Retain | OnDelete::Archive => {
                let retained = export.config.retained();
                export.client.mkdir_all(&retained).await?;
                let kind = match meta.params.on_delete {
                    OnDelete::Archive => "archived-",
                    _ => "",
                };
                let kept = format!("{retained}/{kind}{}-{stamp}", id.dir());
                export.client.rename(&export.volume(id), &kept).await?;
                tracing::info!(volume = %id, kept, "volume kept on the export");
            }
            OnDelete::Delete => {
                // The rename is the delete; emptying the trash may take longer than a call
                // (a volume of many files), so it goes on after the answer. What a crash
                // leaves is removed at the next start.
                let trash = format!("{prefix}/{TRASH_PREFIX}{}-{stamp}", id.dir());
                if export.client.rename(&export.volume(id), &trash).await? {
                    self.failpoint.hit("delete.after-rename");
                    let export = export.clone();
                    tokio::spawn(async move {
                        if let Err(e) = export.client.remove_tree(&trash).await {
                            tracing::warn!(trash, error = %e, "emptying a deleted volume failed; the next start finishes it");
                        }
                    });
                }
            }
        }
        Ok(())
    }

    /// Records a larger capacity (never smaller); NFS enforces none, so no node work.
    pub async fn expand(&self, id: &VolumeId, range: Range) -> Result<u64> {
        let export = self.export_of(id)?;
        let mut meta = self.get(id).await?;
        let max = self.max_capacity(export).await?;
        let Some(grown) = range.grown(meta.capacity_bytes, || Ok(max))? else {
            return Ok(meta.capacity_bytes);
        };
        meta.capacity_bytes = grown;
        export.store(&export.volume(id), &meta, true).await?;
        Ok(grown)
    }

    /// The largest volume: the configured limit, else the export's size (not enforced either
    /// way; it keeps requests honest).
    async fn max_capacity(&self, export: &Export) -> Result<u64> {
        match self.settings.max_capacity {
            Some(max) => Ok(max),
            None => Ok(export.client.fsstat().await?.total),
        }
    }

    /// What the export of `profile` says it has (FSSTAT).
    pub async fn space(&self, profile: &str) -> Result<Option<Space>> {
        let Some(export) = self.exports.get(profile) else {
            return Ok(None);
        };
        let stat = export.client.fsstat().await?;
        Ok(Some(Space {
            total_bytes: stat.total,
            available_bytes: stat.available,
        }))
    }

    /// Why the volume is unhealthy, or `None`: its data directory must be there.
    pub async fn condition(&self, id: &VolumeId) -> Result<Option<String>> {
        let export = self.export_of(id)?;
        let data = format!("{}/{DATA}", export.volume(id));
        Ok(match export.client.stat(&data).await? {
            Some(true) => None,
            Some(false) => Some(format!("{data} on the export is not a directory")),
            None => Some(format!("{data} is missing on the export")),
        })
    }
}

/// What a `legacy-rwx` profile offers now: whether the export answers, and its free space.
pub async fn probe(profile: &str, config: &Nfs) -> super::local::Probe {
    let what = format!("NFS server {} (profile {profile})", config.source());
    let client = Client::new(config.url(), what, Duration::from_secs(5));
    let stat = client.fsstat().await;
    let (reason, free) = match &stat {
        Ok(stat) => (None, Some(stat.available)),
        Err(e) => (Some(format!("export unreachable: {e}")), None),
    };
    super::local::Probe {
        available: reason.is_none(),
        reason,
        backend: format!(
            "NFS {} v{} ({}, volumes under {})",
            config.source(),
            config.version.as_str(),
            match stat {
                Ok(_) => "reachable",
                Err(_) => "NOT reachable",
            },
            config.prefix
        ),
        capacity_enforced: false,
        enforcement: "none: NFS does not enforce a volume's capacity; it is recorded and \
                      reported only"
            .into(),
        free_bytes: free,
    }
}
