//! The `file://` store: objects are files under a root directory.
//!
//! Writes go to a temporary file in the target directory and are renamed into place, so a
//! reader never sees half an object. `put_if_absent` hard-links the finished temporary to the
//! key, which the kernel refuses atomically when the key exists: the "checked rename" that
//! keeps a second writer from overwriting a manifest.

use std::io::{Read, Write};

use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::{Blob, Digest, Error, ObjectStore, Reader, Result, check_key};

const TEMP_PREFIX: &str = ".lanes-tmp-";
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Objects under `root`.
#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    pub fn new(root: impl Into<PathBuf>) -> FsStore {
        FsStore { root: root.into() }
    }

    fn path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        Ok(self.root.join(key))
    }

    /// Writes `fill`'s output to a synced temporary beside `path`; returns the temporary.
    fn temp_beside(
        path: &Path,
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
    ) -> std::io::Result<PathBuf> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let temp = dir.join(format!(
            "{TEMP_PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        let written = fill(&mut file).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok(temp)
    }
}

/// Copies `reader` into `writer`, returning the SHA-256 of the bytes.
fn copy_hashing(mut reader: impl Read, writer: &mut impl Write) -> std::io::Result<Digest> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buffer[..n]);
        writer.write_all(&buffer[..n])?;
    }
}

async fn blocking<T: Send + 'static>(
    what: &'static str,
    key: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let key = key.to_owned();
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|source| Error::Io { what, key, source }),
        Err(join) => Err(Error::Io {
            what,
            key,
            source: std::io::Error::other(join.to_string()),
        }),
    }
}

fn not_found_as_none<T>(result: std::io::Result<T>) -> std::io::Result<Option<T>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl ObjectStore for FsStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key)?;
        blocking("read", key, move || not_found_as_none(std::fs::read(path))).await
    }

    async fn reader(&self, key: &str) -> Result<Option<Reader>> {
        let path = self.path(key)?;
        match tokio::fs::File::open(&path).await {
            Ok(file) => Ok(Some(Box::new(file))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io {
                what: "read",
                key: key.to_owned(),
                source,
            }),
        }
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> Result<()> {
        let path = self.path(key)?;
        blocking("write", key, move || {
            let temp = Self::temp_beside(&path, |f| f.write_all(&body))?;
            std::fs::rename(&temp, &path).inspect_err(|_| {
                let _ = std::fs::remove_file(&temp);
            })
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        let path = self.path(key)?;
        blocking("create", key, move || {
            let temp = Self::temp_beside(&path, |f| f.write_all(&body))?;
            let linked = std::fs::hard_link(&temp, &path);
            let _ = std::fs::remove_file(&temp);
            match linked {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }

    async fn put_blob(
        &self,
        key: &str,
        body: Blob,
        _sha256: &Digest,
        if_absent: bool,
    ) -> Result<bool> {
        let path = self.path(key)?;
        blocking("upload", key, move || {
            let temp = Self::temp_beside(&path, |f| match &body {
                Blob::Memory(bytes) => f.write_all(bytes),
                Blob::File(source) => std::io::copy(&mut std::fs::File::open(source)?, f).map(drop),
            })?;
            let placed = if if_absent {
                match std::fs::hard_link(&temp, &path) {
                    Ok(()) => Ok(true),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                    Err(e) => Err(e),
                }
            } else {
                std::fs::rename(&temp, &path).map(|()| true)
            };
            let _ = std::fs::remove_file(&temp);
            placed
        })
        .await
    }

    async fn get_to_file(&self, key: &str, target: &Path) -> Result<Option<Digest>> {
        let path = self.path(key)?;
        let target = target.to_owned();
        blocking("download", key, move || {
            let Some(source) = not_found_as_none(std::fs::File::open(&path))? else {
                return Ok(None);
            };
            let mut out = crate::fsutil::create_new(&target)?;
            copy_hashing(source, &mut out).map(Some)
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key)?;
        blocking("stat", key, move || Ok(path.is_file())).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let keys = self.list_modified(prefix).await?;
        Ok(keys.into_iter().map(|(key, _)| key).collect())
    }

    async fn list_modified(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let dir = self.path(prefix)?;
        let prefix = prefix.trim_end_matches('/').to_owned();
        blocking("list", &prefix.clone(), move || {
            let mut keys = Vec::new();
            let mut pending = vec![(dir, prefix)];
            while let Some((dir, key)) = pending.pop() {
                let Some(entries) = not_found_as_none(std::fs::read_dir(&dir))? else {
                    continue;
                };
                for entry in entries {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(TEMP_PREFIX) {
                        continue;
                    }
                    let child = format!("{key}/{name}");
                    let kind = entry.file_type()?;
                    if kind.is_dir() {
                        pending.push((entry.path(), child));
                    } else if kind.is_file() {
                        let modified = entry
                            .metadata()?
                            .modified()?
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap_or_default()
                            .as_secs();
                        keys.push((child, modified));
                    }
                }
            }
            keys.sort();
            Ok(keys)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key)?;
        blocking("delete", key, move || {
            not_found_as_none(std::fs::remove_file(path)).map(drop)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reader_streams_the_object_and_a_missing_one_is_none() {
        use tokio::io::AsyncReadExt;
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path());
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        store.put("d/doc.json", body.clone()).await.unwrap();
        let mut read = Vec::new();
        let mut reader = store.reader("d/doc.json").await.unwrap().expect("exists");
        reader.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, body);
        assert!(store.reader("d/missing.json").await.unwrap().is_none());
        assert!(store.reader("../escape").await.is_err(), "keys are checked");
    }

    #[tokio::test]
    async fn concurrent_creators_of_one_key_have_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(FsStore::new(dir.path()));
        let mut tasks = Vec::new();
        for i in 0..16u8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.put_if_absent("v/1", vec![i]).await.unwrap()
            }));
        }
        let mut winners = 0;
        for task in tasks {
            winners += usize::from(task.await.unwrap());
        }
        assert_eq!(winners, 1);
        assert_eq!(
            store.list("v/").await.unwrap(),
            vec!["v/1"],
            "no temporaries left"
        );
    }
}
