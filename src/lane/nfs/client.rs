//! The controller's userspace NFS client (nfs-rs): one connection per export, made on first
//! use and made again after the server went away, every RPC under a deadline.
//!
//! Errors split in two: what the server answered about a path (no such file, exists, access
//! denied) is the caller's to handle ([`Status`]); a server that does not answer, drops the
//! connection or says a handle is stale (it restarted) is [`Error::Backend`] naming the
//! server — UNAVAILABLE to the CO, which retries.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use nfs_rs::{Mount, Nfs3ErrorCode, Nfs4ErrorCode, NfsError};

use crate::lane::{Error, Result};

/// NFS file types as nfs-rs reports them (`ftype3` / `nfs_ftype4`).
const DIRECTORY: u32 = 2;

/// What the server answered about a path.
#[derive(Debug)]
pub struct Status(NfsError);

impl Status {
    pub fn is_not_found(&self) -> bool {
        self.0.is_not_found()
    }

    pub fn is_exist(&self) -> bool {
        self.0.is_exist()
    }

    /// As a lane error: what was being done and what the server said.
    pub fn into_error(self, context: String) -> Error {
        Error::Io {
            context,
            source: std::io::Error::new(self.0.kind(), self.0.to_string()),
        }
    }
}

/// An entry of a directory.
#[derive(Debug)]
pub struct Entry {
    pub name: String,
    pub is_dir: bool,
}

/// Total and available bytes of the export (FSSTAT).
#[derive(Debug, Clone, Copy)]
pub struct FsStat {
    pub total: u64,
    pub available: u64,
}

/// One export, as the controller reaches it.
pub struct Client {
    url: String,
    /// How errors name the server: `NFS server h:/export (profile p)`.
    what: String,
    deadline: Duration,
    conn: tokio::sync::Mutex<Option<Arc<dyn Mount>>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("what", &self.what).finish()
    }
}

/// Whether the server is gone or restarted rather than answering about a path.
fn transport_failure(e: &NfsError) -> bool {
    match e {
        NfsError::Nfs3(code) => matches!(code, Nfs3ErrorCode::NFS3ERR_STALE),
        NfsError::Nfs4(code) => matches!(
            code,
            Nfs4ErrorCode::NFS4ERR_STALE
                | Nfs4ErrorCode::NFS4ERR_FHEXPIRED
                | Nfs4ErrorCode::NFS4ERR_BADSESSION
                | Nfs4ErrorCode::NFS4ERR_STALE_CLIENTID
                | Nfs4ErrorCode::NFS4ERR_DEADSESSION
                | Nfs4ErrorCode::NFS4ERR_EXPIRED
        ),
        _ => true,
    }
}

impl Client {
    pub fn new(url: String, what: String, deadline: Duration) -> Client {
        Client {
            url,
            what,
            deadline,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    /// The server as errors name it.
    pub fn what(&self) -> &str {
        &self.what
    }

    fn unavailable(&self, said: impl std::fmt::Display) -> Error {
        Error::Backend {
            what: self.what.clone(),
            said: format!("{said}; check that the server is up and exports this path"),
        }
    }

    async fn connection(&self) -> Result<Arc<dyn Mount>> {
        let mut conn = self.conn.lock().await;
        if let Some(mount) = conn.as_ref() {
            return Ok(mount.clone());
        }
        let mount = tokio::time::timeout(self.deadline, nfs_rs::parse_url_and_mount(&self.url))
            .await
            .map_err(|_| {
                self.unavailable(format!(
                    "did not answer within {}s",
                    self.deadline.as_secs()
                ))
            })?
            .map_err(|e| self.unavailable(e))?;
        let mount: Arc<dyn Mount> = Arc::from(mount);
        *conn = Some(mount.clone());
        Ok(mount)
    }

    /// Forgets the connection (the next call makes a new one), unmounting it in the
    /// background.
    async fn reset(&self, used: &Arc<dyn Mount>) {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_some_and(|c| Arc::ptr_eq(c, used)) {
            *conn = None;
            let old = used.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), old.umount()).await;
            });
        }
    }

    /// Runs one RPC under the deadline; on a lost connection or a stale handle, reconnects
    /// and tries once more (every call here is safe to repeat).
    async fn call<T, F, Fut>(&self, f: F) -> Result<std::result::Result<T, Status>>
    where
        F: Fn(Arc<dyn Mount>) -> Fut,
        Fut: Future<Output = nfs_rs::Result<T>>,
    {
        let mut last = None;
        for _ in 0..2 {
            let mount = self.connection().await?;
            match tokio::time::timeout(self.deadline, f(mount.clone())).await {
                Ok(Ok(value)) => return Ok(Ok(value)),
                Ok(Err(e)) if !transport_failure(&e) => return Ok(Err(Status(e))),
                Ok(Err(e)) => {
                    self.reset(&mount).await;
                    last = Some(e.to_string());
                }
                Err(_) => {
                    self.reset(&mount).await;
                    return Err(self.unavailable(format!(
                        "did not answer within {}s",
                        self.deadline.as_secs()
                    )));
                }
            }
        }
        Err(self.unavailable(last.unwrap_or_default()))
    }

    /// Whether `path` exists, and whether it is a directory.
    pub async fn stat(&self, path: &str) -> Result<Option<bool>> {
        let path = path.to_owned();
        match self
            .call(|m| {
                let path = path.clone();
                async move { m.getattr_path(&path).await }
            })
            .await?
        {
            Ok(attr) => Ok(Some(attr.type_ == DIRECTORY)),
            Err(s) if s.is_not_found() => Ok(None),
            Err(s) => Err(s.into_error(format!("stat {path} on {}", self.what))),
        }
    }

    /// Makes the directory `path`; false when it was there already.
    pub async fn mkdir(&self, path: &str, mode: u32) -> Result<bool> {
        match self
            .call(|m| {
                let path = path.to_owned();
                async move { m.mkdir_path(&path, mode).await }
            })
            .await?
        {
            Ok(_) => Ok(true),
            Err(s) if s.is_exist() => Ok(false),
            Err(s) => Err(s.into_error(format!("mkdir {path} on {}", self.what))),
        }
    }

    /// Makes `path` and every missing parent.
    pub async fn mkdir_all(&self, path: &str) -> Result<()> {
        let mut at = String::new();
        for part in path.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            self.mkdir(&at, 0o755).await?;
        }
        Ok(())
    }

    /// The whole of a small file, or `None` when there is none.
    pub async fn read(&self, path: &str, limit: u32) -> Result<Option<Vec<u8>>> {
        let answer = self
            .call(|m| {
                let path = path.to_owned();
                async move {
                    let mut body = Vec::new();
                    loop {
                        let chunk = m
                            .read_path(&path, body.len() as u64, m.get_max_read_size())
                            .await?;
                        if chunk.is_empty() || body.len() + chunk.len() > limit as usize {
                            body.extend_from_slice(&chunk);
                            return Ok(body);
                        }
                        body.extend_from_slice(&chunk);
                    }
                }
            })
            .await?;
        match answer {
            Ok(body) if body.len() > limit as usize => Err(Error::Backend {
                what: self.what.clone(),
                said: format!("{path} is larger than {limit} bytes"),
            }),
            Ok(body) => Ok(Some(body)),
            Err(s) if s.is_not_found() => Ok(None),
            Err(s) => Err(s.into_error(format!("read {path} on {}", self.what))),
        }
    }

    /// Writes `body` as the new file `path` (replacing one there) and commits it to the
    /// server's stable storage.
    pub async fn write(&self, path: &str, body: &[u8]) -> Result<()> {
        let body = Bytes::copy_from_slice(body);
        let answer = self
            .call(|m| {
                let (path, body) = (path.to_owned(), body.clone());
                async move {
                    match m.remove_path(&path).await {
                        Err(e) if !e.is_not_found() => return Err(e),
                        _ => {}
                    }
                    let created = m.create_path(&path, Some(0o644)).await?;
                    let len = body.len() as u32;
                    nfs_rs::write_all(&*m, created.fh.clone(), 0, body).await?;
                    m.commit(created.fh.clone(), 0, len).await?;
                    m.close(created.fh).await
                }
            })
            .await?;
        answer.map_err(|s| s.into_error(format!("write {path} on {}", self.what)))
    }

    /// Renames `from` to `to`; a missing `from` is `Ok(false)`.
    pub async fn rename(&self, from: &str, to: &str) -> Result<bool> {
        match self
            .call(|m| {
                let (from, to) = (from.to_owned(), to.to_owned());
                async move { m.rename_path(&from, &to).await }
            })
            .await?
        {
            Ok(()) => Ok(true),
            Err(s) if s.is_not_found() => Ok(false),
            Err(s) => Err(s.into_error(format!("rename {from} to {to} on {}", self.what))),
        }
    }

    /// The entries of directory `path` (without `.` and `..`); `None` when it is missing.
    pub async fn list(&self, path: &str) -> Result<Option<Vec<Entry>>> {
        let answer = self
            .call(|m| {
                let path = path.to_owned();
                async move {
                    let mut stream = m.readdirplus_path(&path).await?;
                    let mut entries = Vec::new();
                    while let Some(entry) = stream.next().await {
                        let entry = entry?;
                        if entry.file_name == "." || entry.file_name == ".." {
                            continue;
                        }
                        let is_dir = entry.attr.as_ref().is_some_and(|a| a.type_ == DIRECTORY);
                        entries.push(Entry {
                            name: entry.file_name,
                            is_dir,
                        });
                    }
                    Ok(entries)
                }
            })
            .await?;
        match answer {
            Ok(entries) => Ok(Some(entries)),
            Err(s) if s.is_not_found() => Ok(None),
            Err(s) => Err(s.into_error(format!("list {path} on {}", self.what))),
        }
    }

    /// Removes `path` and everything under it. Symbolic links are removed, never followed;
    /// a missing `path` is fine.
    pub async fn remove_tree(&self, path: &str) -> Result<()> {
        // Depth-first without recursion: a directory is removed once its entries are.
        let mut pending = vec![(path.to_owned(), false)];
        while let Some((dir, emptied)) = pending.pop() {
            if emptied {
                self.remove(&dir, true).await?;
                continue;
            }
            match self.stat(&dir).await? {
                None => continue,
                Some(false) => {
                    self.remove(&dir, false).await?;
                    continue;
                }
                Some(true) => {}
            }
            pending.push((dir.clone(), true));
            for entry in self.list(&dir).await?.unwrap_or_default() {
                let child = format!("{dir}/{}", entry.name);
                match entry.is_dir {
                    true => pending.push((child, false)),
                    false => self.remove(&child, false).await?,
                }
            }
        }
        Ok(())
    }

    /// Removes the file (or, with `dir`, the empty directory) `path`; a missing one is fine.
    pub async fn remove(&self, path: &str, dir: bool) -> Result<()> {
        let answer = self
            .call(|m| {
                let path = path.to_owned();
                async move {
                    match dir {
                        true => m.rmdir_path(&path).await,
                        false => m.remove_path(&path).await,
                    }
                }
            })
            .await?;
        match answer {
            Ok(()) => Ok(()),
            Err(s) if s.is_not_found() => Ok(()),
            Err(s) => Err(s.into_error(format!("remove {path} on {}", self.what))),
        }
    }

    /// The export's size and free space.
    pub async fn fsstat(&self) -> Result<FsStat> {
        let answer = self
            .call(|m| async move { m.fsstat().await })
            .await?
            .map_err(|s| s.into_error(format!("FSSTAT on {}", self.what)))?;
        Ok(FsStat {
            total: answer.tbytes,
            available: answer.abytes,
        })
    }
}
