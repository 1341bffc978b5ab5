//! The object stores behind dataset buckets, behind one narrow trait.
//!
//! Keys are `/`-separated paths of `[A-Za-z0-9._-]` components (never `.` or `..`), checked by
//! [`check_key`] before any store sees them. `put_if_absent` is the one primitive that makes
//! manifests immutable and a second writer unable to overwrite the first.

pub mod fs;
pub mod s3;

use std::future::Future;
use std::path::{Path, PathBuf};

use crate::error::Kind;

/// Failures of object-store operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("object key {key:?} is invalid: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("{what} {key}: {message}")]
    Remote {
        what: &'static str,
        key: String,
        message: String,
        /// The server could not be reached (as opposed to answering with an error).
        unavailable: bool,
    },
    #[error("{what} {key}: {source}")]
    Io {
        what: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The CSI-level kind of this failure.
    pub fn kind(&self) -> Kind {
        match self {
            Error::InvalidKey { .. } => Kind::InvalidArgument,
            Error::Remote {
                unavailable: true, ..
            } => Kind::Unavailable,
            Error::Remote { .. } => Kind::Internal,
            Error::Io { source, .. } => crate::error::io_kind(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// What Lanes needs of a bucket's storage.
pub trait ObjectStore: Send + Sync {
    /// The object's bytes, or `None` when it does not exist.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
    /// The object's bytes as a stream, or `None` when it does not exist: for documents too
    /// large to hold twice (a manifest of a million files), parsed as they arrive.
    fn reader(&self, key: &str) -> impl Future<Output = Result<Option<Reader>>> + Send;
    /// Writes (or replaces) an object atomically: readers see the old or the new body.
    fn put(&self, key: &str, body: Vec<u8>) -> impl Future<Output = Result<()>> + Send;
    /// Creates the object only if it does not exist. `Ok(false)`: it existed, nothing written.
    fn put_if_absent(&self, key: &str, body: Vec<u8>) -> impl Future<Output = Result<bool>> + Send;
    /// Uploads a body whose SHA-256 the caller has computed: the store hands the digest to
    /// the server where it can (S3 signs the request with it, so the server refuses a body
    /// that does not match) instead of hashing the bytes again. With `if_absent`, an existing
    /// object is left alone and `Ok(false)` returned.
    fn put_blob(
        &self,
        key: &str,
        body: Blob,
        sha256: &Digest,
        if_absent: bool,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Downloads an object into a new file at `path` and returns the SHA-256 of the bytes
    /// written, so the caller can verify without reading the file again; `Ok(None)` when it
    /// does not exist. `path` must not exist: a file or link already there is an error, never
    /// written through.
    fn get_to_file(
        &self,
        key: &str,
        path: &Path,
    ) -> impl Future<Output = Result<Option<Digest>>> + Send;
    fn exists(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Keys under `prefix` (a directory-like prefix ending in '/'), in ascending order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// [`ObjectStore::list`] with each object's last modification (seconds since the epoch).
    fn list_modified(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<(String, u64)>>> + Send;
    /// Removes an object; removing a missing object succeeds.
    fn delete(&self, key: &str) -> impl Future<Output = Result<()>> + Send;
}

/// An object being read.
pub type Reader = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// Bytes a download buffers before it writes them (what a download holds of
/// [`super::budget::Budget`]).
pub const DOWNLOAD_BATCH: usize = 4 << 20;

/// Where the bytes of an upload come from.
#[derive(Debug)]
pub enum Blob {
    /// Already read (small bodies are read once: hashed, then sent from memory).
    Memory(Vec<u8>),
    /// Streamed from a file.
    File(PathBuf),
}

/// The store of a configured bucket, whichever kind it is.
#[derive(Debug, Clone)]
pub enum BucketStore {
    Fs(fs::FsStore),
    S3(s3::S3Store),
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            BucketStore::Fs($store) => $call.await,
            BucketStore::S3($store) => $call.await,
        }
    };
}

impl ObjectStore for BucketStore {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        delegate!(self, s => s.get(key))
    }
    async fn reader(&self, key: &str) -> Result<Option<Reader>> {
        delegate!(self, s => s.reader(key))
    }
    async fn put(&self, key: &str, body: Vec<u8>) -> Result<()> {
        delegate!(self, s => s.put(key, body))
    }
    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        delegate!(self, s => s.put_if_absent(key, body))
    }
    async fn put_blob(
        &self,
        key: &str,
        body: Blob,
        sha256: &Digest,
        if_absent: bool,
    ) -> Result<bool> {
        delegate!(self, s => s.put_blob(key, body, sha256, if_absent))
    }
    async fn get_to_file(&self, key: &str, path: &Path) -> Result<Option<Digest>> {
        delegate!(self, s => s.get_to_file(key, path))
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        delegate!(self, s => s.exists(key))
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        delegate!(self, s => s.list(prefix))
    }
    async fn list_modified(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        delegate!(self, s => s.list_modified(prefix))
    }
    async fn delete(&self, key: &str) -> Result<()> {
        delegate!(self, s => s.delete(key))
    }
}

/// Checks a key (or, with a trailing '/', a prefix).
pub fn check_key(key: &str) -> Result<()> {
    let invalid = |reason| {
        Err(Error::InvalidKey {
            key: key.chars().take(200).collect(),
            reason,
        })
    };
    let body = key.strip_suffix('/').unwrap_or(key);
    if body.is_empty() {
        return invalid("it is empty");
    }
    if key.len() > 1024 {
        return invalid("it is longer than 1024 bytes");
    }
    for part in body.split('/') {
        if part.is_empty() {
            return invalid("it has an empty component");
        }
        if part == "." || part == ".." {
            return invalid("it has a '.' or '..' component");
        }
        if !part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return invalid("it has characters other than [A-Za-z0-9._-]");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for good in ["a", "a/b", "blobs/sha256/ab/abcdef", "x-1.json", "prefix/"] {
            check_key(good).unwrap();
        }
        for bad in [
            "", "/", "/a", "a//b", "a/../b", "..", "a/.", "a b", "a\0", "ü",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }
}
