//! The object stores behind dataset buckets, behind one narrow trait.
//!
//! Keys are `/`-separated paths of `[A-Za-z0-9._-]` components (never `.` or `..`), checked by
//! [`check_key`] before any store sees them. `put_if_absent` is the one primitive that makes
//! manifests immutable and a second writer unable to overwrite the first.

pub mod fs;

use std::future::Future;
use std::path::Path;

use crate::error::Kind;

/// Failures of object-store operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("object key {key:?} is invalid: {reason}")]
    InvalidKey { key: String, reason: &'static str },
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
            Error::Io { source, .. } => crate::error::io_kind(source),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What Lanes needs of a bucket's storage.
pub trait ObjectStore: Send + Sync {
    /// The object's bytes, or `None` when it does not exist.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>>> + Send;
    /// Writes (or replaces) an object atomically: readers see the old or the new body.
    fn put(&self, key: &str, body: Vec<u8>) -> impl Future<Output = Result<()>> + Send;
    /// Creates the object only if it does not exist. `Ok(false)`: it existed, nothing written.
    fn put_if_absent(&self, key: &str, body: Vec<u8>) -> impl Future<Output = Result<bool>> + Send;
    /// Uploads a file's contents as an object (large bodies are streamed).
    fn put_file(&self, key: &str, path: &Path) -> impl Future<Output = Result<()>> + Send;
    /// Downloads an object into a file; `Ok(false)` when the object does not exist.
    fn get_to_file(&self, key: &str, path: &Path) -> impl Future<Output = Result<bool>> + Send;
    fn exists(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Keys under `prefix` (a directory-like prefix ending in '/'), in ascending order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// Removes an object; removing a missing object succeeds.
    fn delete(&self, key: &str) -> impl Future<Output = Result<()>> + Send;
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
pub(crate) mod contract {
    //! One set of behaviours every store must show; each store's tests run it.
    use super::*;

    pub async fn run<S: ObjectStore>(store: &S, scratch: &Path) {
        assert_eq!(store.get("a/missing").await.unwrap(), None);
        assert!(!store.exists("a/missing").await.unwrap());

        store.put("a/one", b"first".to_vec()).await.unwrap();
        store.put("a/one", b"second".to_vec()).await.unwrap();
        assert_eq!(
            store.get("a/one").await.unwrap().as_deref(),
            Some(&b"second"[..])
        );
        assert!(store.exists("a/one").await.unwrap());

        assert!(
            store
                .put_if_absent("m/v1", b"winner".to_vec())
                .await
                .unwrap()
        );
        assert!(
            !store
                .put_if_absent("m/v1", b"loser".to_vec())
                .await
                .unwrap()
        );
        assert_eq!(
            store.get("m/v1").await.unwrap().as_deref(),
            Some(&b"winner"[..])
        );

        let source = scratch.join("upload");
        std::fs::write(&source, vec![42u8; 3 << 20]).unwrap();
        store.put_file("blobs/big", &source).await.unwrap();
        let target = scratch.join("download");
        assert!(store.get_to_file("blobs/big", &target).await.unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), vec![42u8; 3 << 20]);
        assert!(
            !store
                .get_to_file("blobs/none", &scratch.join("none"))
                .await
                .unwrap()
        );
        assert!(!scratch.join("none").exists());

        store.put("a/two", vec![]).await.unwrap();
        store.put("a/sub/three", vec![1]).await.unwrap();
        assert_eq!(
            store.list("a/").await.unwrap(),
            vec!["a/one", "a/sub/three", "a/two"]
        );
        assert_eq!(store.list("nothing/").await.unwrap(), Vec::<String>::new());

        store.delete("a/two").await.unwrap();
        store.delete("a/two").await.unwrap();
        assert!(!store.exists("a/two").await.unwrap());

        for bad in [
            "../x",
            "a/../../x",
            "/abs",
            "a//b",
            "a/./b",
            "nul\0",
            "sp ace",
        ] {
            let err = store.get(bad).await.unwrap_err();
            assert_eq!(err.kind(), Kind::InvalidArgument, "{bad:?}");
            assert!(store.put(bad, vec![]).await.is_err(), "{bad:?}");
        }
    }
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
