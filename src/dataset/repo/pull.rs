//! Pulling a version into a directory: every body verified against its SHA-256 before it is
//! placed, files already present and identical skipped.
//!
//! Rule: a body whose hash does not match is never placed (its temporary is removed), and
//! symlinks are recreated as they are, never followed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{Advance, Error, Finish, PullReport, Repo, Result, blob_key, io};
use crate::dataset::manifest::EntryKind;
use crate::dataset::reference::Selector;
use crate::dataset::scan::hex;
use crate::dataset::store::ObjectStore;

impl<S: ObjectStore + Clone + 'static> Repo<S> {
    /// Downloads a version into `dir`, verifying every body; identical files already there
    /// are skipped. A body whose hash does not match is never placed.
    pub async fn pull(&self, name: &str, selector: &Selector, dir: &Path) -> Result<PullReport> {
        let manifest = self.resolve(name, selector).await?;
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
        let root = dir
            .canonicalize()
            .map_err(io(format!("resolve {}", dir.display())))?;
        for entry in manifest.entries.iter().filter(|e| e.kind == EntryKind::Dir) {
            let path = root.join(&entry.path);
            crate::copy::file::real_dir(&path).map_err(io(format!("create {}", path.display())))?;
        }
        let mut report = PullReport {
            version: manifest.version.clone(),
            files: manifest.files(),
            ..Default::default()
        };
        let limit = Arc::new(Semaphore::new(self.jobs));
        let mut tasks = tokio::task::JoinSet::new();
        let progress = self.progress.clone();
        progress.start(manifest.files() as u64, manifest.size());
        let _finish = Finish(&progress);
        for entry in manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .cloned()
        {
            let (store, limit, target, progress) = (
                self.store.clone(),
                limit.clone(),
                root.join(&entry.path),
                progress.clone(),
            );
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let _advance = Advance(&progress, entry.size);
                let expected = entry.sha256.clone().unwrap_or_default();
                let check = target.clone();
                let expected_for_check = expected.clone();
                let identical =
                    tokio::task::spawn_blocking(move || same_body(&check, &expected_for_check))
                        .await
                        .unwrap_or(false);
                if identical {
                    return Ok::<_, Error>(None);
                }
                let temp = temp_beside(&target);
                let Some(digest) = store.get_to_file(&blob_key(&expected), &temp).await? else {
                    return Err(Error::Corrupt(format!(
                        "body {expected} of {} is missing from the bucket",
                        entry.path
                    )));
                };
                if hex(&digest) != expected {
                    let _ = std::fs::remove_file(&temp);
                    return Err(Error::Corrupt(format!(
                        "body of {} does not match its SHA-256 ({} != {expected}); not placed",
                        entry.path,
                        hex(&digest)
                    )));
                }
                let (place_temp, place_target, mode) = (temp.clone(), target.clone(), entry.mode);
                tokio::task::spawn_blocking(move || place(&place_temp, &place_target, mode))
                    .await
                    .map_err(|e| Error::Invalid(e.to_string()))?
                    .inspect_err(|_| {
                        let _ = std::fs::remove_file(&temp);
                    })?;
                Ok(Some(entry.size))
            });
        }
        while let Some(done) = tasks.join_next().await {
            match done.map_err(|e| Error::Invalid(e.to_string()))?? {
                Some(bytes) => {
                    report.downloaded += 1;
                    report.bytes_downloaded += bytes;
                }
                None => report.skipped += 1,
            }
        }
        for entry in manifest
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Symlink)
        {
            let target = entry.target.as_deref().unwrap_or_default();
            let path = root.join(&entry.path);
            if std::fs::read_link(&path).is_ok_and(|t| t == Path::new(target)) {
                continue;
            }
            let temp = temp_beside(&path);
            std::os::unix::fs::symlink(target, &temp)
                .map_err(io(format!("link {}", path.display())))?;
            std::fs::rename(&temp, &path).map_err(io(format!("place {}", path.display())))?;
        }
        Ok(report)
    }
}

fn temp_beside(path: &Path) -> PathBuf {
    crate::copy::file::temp_path(path.parent().unwrap_or(Path::new(".")))
}

/// True when `path` is a regular file whose SHA-256 is `sha256`.
fn same_body(path: &Path, sha256: &str) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file())
        && std::fs::File::open(path)
            .and_then(crate::copy::file::sha256)
            .is_ok_and(|d| hex(&d) == sha256)
}

/// Sets the mode of a verified temporary and renames it into place.
fn place(temp: &Path, target: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(temp, std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(io(format!("chmod {}", temp.display())))?;
    if std::fs::symlink_metadata(target).is_ok_and(|m| m.is_dir()) {
        std::fs::remove_dir_all(target).map_err(io(format!("replace {}", target.display())))?;
    }
    std::fs::rename(temp, target).map_err(io(format!("place {}", target.display())))
}
