//! Large bodies as S3 multipart uploads, and the pinned source files every upload streams from.
//!
//! Rules: an upload is completed only when the bytes sent hash to the body's content address;
//! otherwise (the file changed while it was pushed, a part failed) it is aborted, so no body is
//! ever stored under a hash it does not have. Each part is signed with its own SHA-256, which
//! S3 checks. Sources are opened once without following symlinks and re-read only through that
//! open file, so a link swapped in mid-push can never make Lanes send another file.

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::{MAX_PARTS, READ_BUFFER, S3Store, SignedPayload, remote, status};
use crate::dataset::scan::hex;
use crate::dataset::store::{Digest, Error, Result};

/// S3's smallest part (all but the last).
const MIN_PART: u64 = 5 << 20;

/// A source file opened without following symlinks. The SDK reopens it for each attempt
/// through `/proc/self/fd`, which names this open file, not a path that could change.
pub(super) struct Pinned {
    file: std::fs::File,
    pub(super) size: u64,
}

impl Pinned {
    pub(super) async fn open(path: &Path) -> Result<Pinned> {
        let owned = path.to_owned();
        let opened = tokio::task::spawn_blocking(move || {
            let file = crate::copy::file::open_source(&owned)?;
            let size = file.metadata()?.len();
            Ok::<_, std::io::Error>(Pinned { file, size })
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        opened.map_err(|source| Error::Io {
            what: "read",
            key: path.display().to_string(),
            source,
        })
    }

    fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }

    /// `length` bytes from `offset` as a retryable body. The caller keeps `self` alive until
    /// the request is done.
    pub(super) async fn range(&self, offset: u64, length: u64) -> Result<ByteStream> {
        ByteStream::read_from()
            .path(self.proc_path())
            .offset(offset)
            .length(Length::Exact(length))
            .buffer_size(READ_BUFFER)
            .build()
            .await
            .map_err(|e| Error::Io {
                what: "read",
                key: self.proc_path().display().to_string(),
                source: std::io::Error::other(e),
            })
    }

    /// Hashes `length` bytes from `offset` into `whole` and on their own: the part's SHA-256.
    async fn hash_range(
        self: &Arc<Self>,
        mut whole: Sha256,
        offset: u64,
        length: u64,
    ) -> std::io::Result<(Sha256, Digest)> {
        let source = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut part = Sha256::new();
            let mut buffer = vec![0u8; READ_BUFFER.min(length as usize)];
            let mut done = 0;
            while done < length {
                let n = buffer.len().min((length - done) as usize);
                source.file.read_exact_at(&mut buffer[..n], offset + done)?;
                whole.update(&buffer[..n]);
                part.update(&buffer[..n]);
                done += n as u64;
            }
            Ok((whole, part.finalize().into()))
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

impl S3Store {
    /// Uploads a pinned file of more than the multipart threshold in parts, `parallel` at a
    /// time. With `if_absent`, completion is conditional (`If-None-Match: *`).
    pub(super) async fn upload_parts(
        &self,
        key: &str,
        source: Pinned,
        sha256: &Digest,
        if_absent: bool,
    ) -> Result<bool> {
        let full = self.key(key)?;
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| remote("upload", key, e))?;
        let Some(upload_id) = started.upload_id().map(str::to_owned) else {
            return Err(Error::Remote {
                what: "upload",
                key: key.to_owned(),
                message: "the server started a multipart upload without an upload ID".into(),
                unavailable: false,
            });
        };
        let parts = match self
            .send_parts(key, &full, &upload_id, Arc::new(source), sha256)
            .await
        {
            Ok(parts) => parts,
            Err(e) => {
                self.abort(&full, &upload_id).await;
                return Err(e);
            }
        };
        let mut complete = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&full)
            .upload_id(&upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            );
        if if_absent {
            complete = complete.if_none_match("*");
        }
        match complete.send().await {
            Ok(_) => Ok(true),
            Err(e) => {
                self.abort(&full, &upload_id).await;
                match status(&e) {
                    Some(412) | Some(409) if if_absent => Ok(false),
                    _ => Err(remote("upload", key, e)),
                }
            }
        }
    }

    /// Reads the parts in order (hashing each, and the whole) and sends them in parallel.
    async fn send_parts(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        source: Arc<Pinned>,
        sha256: &Digest,
    ) -> Result<Vec<CompletedPart>> {
        let size = source.size;
        let part_size = part_size(self.multipart.part_size, size);
        let limit = Arc::new(Semaphore::new(self.multipart.parallel.max(1)));
        let mut whole = Sha256::new();
        let mut tasks = tokio::task::JoinSet::new();
        let mut parts = Vec::new();
        let read_error = |source: std::io::Error| Error::Io {
            what: "read",
            key: key.to_owned(),
            source,
        };
        let (mut offset, mut number) = (0u64, 1i32);
        while offset < size {
            let length = part_size.min(size - offset);
            let permit = limit.clone().acquire_owned().await;
            let (hasher, part_sha256) = source
                .hash_range(whole, offset, length)
                .await
                .map_err(read_error)?;
            whole = hasher;
            let body = source.range(offset, length).await?;
            let request = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full)
                .upload_id(upload_id)
                .part_number(number)
                .body(body)
                .customize()
                .interceptor(SignedPayload(hex(&part_sha256)));
            let (pinned, what) = (source.clone(), key.to_owned());
            tasks.spawn(async move {
                let _permit = permit;
                let sent = request.send().await.map_err(|e| remote("upload", &what, e));
                drop(pinned);
                sent.map(|out| {
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(out.e_tag)
                        .build()
                })
            });
            // Collect what is done; stop early when a part failed.
            while let Some(done) = tasks.try_join_next() {
                parts.push(done.map_err(|e| read_error(std::io::Error::other(e)))??);
            }
            offset += length;
            number += 1;
        }
        while let Some(done) = tasks.join_next().await {
            parts.push(done.map_err(|e| read_error(std::io::Error::other(e)))??);
        }
        if <[u8; 32]>::from(whole.finalize()) != *sha256 {
            return Err(read_error(std::io::Error::other(
                "the file changed while it was being pushed; push again",
            )));
        }
        parts.sort_by_key(|p| p.part_number());
        Ok(parts)
    }

    /// Best effort: an upload left behind only costs storage until the bucket's lifecycle
    /// rule removes it.
    async fn abort(&self, full: &str, upload_id: &str) {
        let aborted = self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(full)
            .upload_id(upload_id)
            .send()
            .await;
        if let Err(e) = aborted {
            tracing::warn!(key = full, error = %aws_sdk_s3::error::DisplayErrorContext(&e), "could not abort a multipart upload");
        }
    }
}

/// The part size for a body of `size` bytes: `wanted`, raised to fit S3's limits (at least
/// 5 MiB, at most 10,000 parts).
fn part_size(wanted: u64, size: u64) -> u64 {
    wanted.max(size.div_ceil(MAX_PARTS)).max(MIN_PART)
}

#[cfg(test)]
mod tests {
    #[test]
    fn part_sizes_respect_s3_limits() {
        for (wanted, size, expected) in [
            (64 << 20, 10 << 30, 64 << 20),
            (1 << 20, 100 << 20, 5 << 20),
            (64 << 20, 1 << 40, (1u64 << 40).div_ceil(10_000)),
        ] {
            assert_eq!(super::part_size(wanted, size), expected, "{wanted} {size}");
        }
    }
}
