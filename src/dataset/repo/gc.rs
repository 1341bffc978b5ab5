//! `lanes dataset gc`: removing bodies no version names.
//!
//! Rules: a body is removed only when no version of any dataset in the bucket names it —
//! uncommitted versions included — and it is older than the minimum age, so the bodies a
//! push is uploading right now (named by no version until the push claims one) are never
//! taken. A dry run removes nothing and lists what would go.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::{Repo, Result};
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
        let mut named = HashSet::new();
        for dataset in self.datasets().await? {
            for version in self.version_ids(&dataset.name).await? {
                if let Some(manifest) = self.manifest(&dataset.name, &version).await? {
                    named.extend(manifest.entries.into_iter().filter_map(|e| e.sha256));
                }
            }
        }
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
