//! `lanes dataset gc`: removing bodies no version names.
//!
//! Rules: a body is removed only when no version of any dataset in the bucket names it —
//! uncommitted versions included — and it is older than the minimum age, so the bodies a
//! push is uploading right now (named by no version until the push claims one) are never
//! taken. A dry run removes nothing and lists what would go.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Repo, Result};
use crate::dataset::bodies::Bodies;
use crate::dataset::manifest::Digest;
use crate::dataset::store::ObjectStore;

/// What a collection found and did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Bodies some version names.
    pub referenced: usize,
    /// Bodies no version names, old enough: removed (or, in a dry run, to be removed).
    pub unreferenced: Vec<String>,
    /// Bodies no version names but younger than the minimum age: kept.
    pub too_young: usize,
    pub dry_run: bool,
}

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    /// Removes the bucket's bodies that no version names and that are at least `min_age`
    /// old (see the module rules).
    pub async fn gc(&self, min_age: Duration, dry_run: bool) -> Result<GcReport> {
        if !dry_run {
            self.writable()?;
        }
        // Listed before the versions are read: a body uploaded after this is not a candidate,
        // and one a new version names has been in a version file since before it is looked
        // at, or is younger than any sensible minimum age.
        let bodies = self.store.list_modified("blobs/").await?;
        // Every version's bodies, as one sorted set (on disk when large).
        let mut versions = Vec::new();
        for dataset in self.datasets().await? {
            for version in self.version_ids(&dataset.name).await? {
                if let Some(read) = self
                    .manifest(&dataset.name, &version, &self.spool_dir)
                    .await?
                {
                    versions.push(read.entries);
                }
            }
        }
        let dir = self.spool_dir.clone();
        let named = tokio::task::spawn_blocking(move || {
            let mut digests = Vec::new();
            for entries in &versions {
                digests.push(entries.read()?);
            }
            let digests = digests
                .into_iter()
                .flatten()
                .filter_map(|entry| entry.map(|e| e.sha256).transpose());
            Bodies::collect(digests, &dir)
        })
        .await
        .map_err(|e| super::Error::Invalid(e.to_string()))?
        .map_err(|e| super::Error::Io {
            context: "gather the bodies the versions name".into(),
            source: e,
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut report = GcReport {
            dry_run,
            ..Default::default()
        };
        for (key, modified) in bodies {
            let digest = key.rsplit('/').next().and_then(Digest::parse);
            if digest.is_some_and(|d| named.contains(&d)) {
                report.referenced += 1;
            } else if now.saturating_sub(modified) < min_age.as_secs() {
                report.too_young += 1;
            } else {
                if !dry_run {
                    self.store.delete(&key).await?;
                }
                report.unreferenced.push(key);
            }
        }
        Ok(report)
    }
}
