//! The `s3://` store on aws-sdk-s3, for AWS and S3-compatible servers (MinIO, Ceph, moto).
//!
//! With an explicit endpoint, path-style addressing is used. Credentials come from the
//! standard AWS chain (environment, profile, workload identity) unless the caller passes them;
//! they are never logged. `put_if_absent` is a conditional PUT (`If-None-Match: *`), which the
//! server refuses with 412 when the key exists.
//!
//! Integrity without hashing twice: a body is uploaded under its SHA-256, which Lanes has
//! already computed, so the request is signed with that digest as its payload hash
//! (`x-amz-content-sha256`); S3 recomputes it and refuses a body that does not match. The
//! SDK's own request checksums (a CRC32 trailer in aws-chunked framing) would only hash every
//! byte again, so they are turned off. Downloads are hashed as they are written, which is
//! stronger than the SDK's CRC check of responses, so that is off too.

use std::path::Path;

use std::io::Write;

use aws_runtime::auth::PayloadSigningOverride;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_s3::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_s3::error::{BoxError, DisplayErrorContext, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use sha2::{Digest as _, Sha256};

use super::{Blob, Digest, Error, ObjectStore, Reader, Result, check_key};
use crate::dataset::scan::hex;

mod multipart;
use multipart::Pinned;

/// Downloaded bytes are handed to a blocking writer in batches of about this size.
const WRITE_BATCH: usize = super::DOWNLOAD_BATCH;

/// Objects under `prefix` in one S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
    multipart: Multipart,
}

/// How large bodies are split into a multipart upload: a single PUT stops at 5 GiB, and parts
/// in parallel move one big body faster than one stream.
#[derive(Debug, Clone, Copy)]
pub struct Multipart {
    /// Bodies larger than this go up in parts.
    pub threshold: u64,
    /// The size of each part but the last; raised when a body would need more than 10,000.
    pub part_size: u64,
    /// Parts of one body sent at once.
    pub parallel: usize,
}

impl Default for Multipart {
    fn default() -> Multipart {
        Multipart {
            threshold: 1 << 30,
            part_size: 64 << 20,
            parallel: 4,
        }
    }
}

/// S3 allows at most this many parts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Files are streamed to the SDK in reads of this size.
const READ_BUFFER: usize = 1 << 20;

/// How to reach an S3 bucket.
#[derive(Clone, Default)]
pub struct S3Settings {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    /// Static credentials (access key ID, secret); with neither this nor `secret`, the
    /// standard AWS chain is used.
    pub credentials: Option<(String, String)>,
    /// Credentials read from a Kubernetes Secret.
    pub secret: Option<crate::dataset::secret::SecretCredentials>,
    pub multipart: Multipart,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field(
                "credentials",
                &self.credentials.as_ref().map(|_| "<redacted>"),
            )
            .field("secret", &self.secret)
            .field("multipart", &self.multipart)
            .finish()
    }
}

impl S3Store {
    /// A store on `bucket` under `prefix` (no leading or trailing '/').
    pub async fn connect(bucket: &str, prefix: &str, settings: &S3Settings) -> S3Store {
        let region = aws_config::Region::new(
            settings
                .region
                .clone()
                .unwrap_or_else(|| "us-east-1".into()),
        );
        let mut config = aws_sdk_s3::config::Builder::new().region(region.clone());
        match (&settings.credentials, &settings.secret) {
            (Some((id, secret)), _) => {
                config = config.credentials_provider(aws_sdk_s3::config::Credentials::new(
                    id, secret, None, None, "lanes",
                ));
            }
            (None, Some(secret)) => {
                config = config.credentials_provider(secret.clone());
            }
            (None, None) => {
                // With the bucket's region given, the chain never asks instance metadata for
                // one (it still tries instance credentials last, as on EC2 nodes it should).
                let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
                    .region(region.clone())
                    .load()
                    .await;
                if let Some(provider) = shared.credentials_provider() {
                    config = config.credentials_provider(provider);
                }
            }
        }
        if let Some(endpoint) = &settings.endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        // Bodies are verified by their SHA-256 both ways (see the module docs); the SDK's
        // CRCs would only cost a second pass over every byte.
        let client = Client::from_conf(
            config
                .response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                )
                .request_checksum_calculation(
                    aws_sdk_s3::config::RequestChecksumCalculation::WhenRequired,
                )
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .build(),
        );
        S3Store {
            client,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            multipart: settings.multipart,
        }
    }

    /// PUTs `body` at `key`; with `if_absent`, as `If-None-Match: *`, answering `false` when
    /// the server refuses because the key exists. With `sha256`, the request is signed with
    /// that payload hash instead of one the SDK computes.
    async fn upload(
        &self,
        key: &str,
        body: ByteStream,
        sha256: Option<&Digest>,
        if_absent: bool,
    ) -> Result<bool> {
        let full = self.key(key)?;
        let mut request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(body);
        if if_absent {
            request = request.if_none_match("*");
        }
        let sent = match sha256 {
            Some(digest) => {
                request
                    .customize()
                    .interceptor(SignedPayload(hex(digest)))
                    .send()
                    .await
            }
            None => request.send().await,
        };
        match sent {
            Ok(_) => Ok(true),
            Err(e) if if_absent && matches!(status(&e), Some(412) | Some(409)) => Ok(false),
            Err(e) => Err(remote("upload", key, e)),
        }
    }

    /// Starts a GET of `key`; `None` when the object does not exist.
    async fn fetch(&self, key: &str, what: &'static str) -> Result<Option<GetObjectOutput>> {
        let full = self.key(key)?;
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(object) => Ok(Some(object)),
            Err(e) if status(&e) == Some(404) => Ok(None),
            Err(e) => Err(remote(what, key, e)),
        }
    }

    fn key(&self, key: &str) -> Result<String> {
        check_key(key)?;
        Ok(if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        })
    }
}

/// Signs a request with a payload SHA-256 the caller already knows (lowercase hex), so the
/// SDK does not read the body to compute it and the server checks the body against it.
#[derive(Debug)]
struct SignedPayload(String);

impl Intercept for SignedPayload {
    fn name(&self) -> &'static str {
        "SignedPayload"
    }

    fn modify_before_signing(
        &self,
        _context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// Writes downloaded chunks to a file off the async runtime, hashing them on the way. The
/// file is created by the first batch, so a small body costs one blocking call.
struct HashingWriter {
    path: std::path::PathBuf,
    file: Option<std::fs::File>,
    hasher: Sha256,
}

impl HashingWriter {
    fn write(&mut self, batch: &[u8]) -> std::io::Result<()> {
        self.hasher.update(batch);
        let file = match &mut self.file {
            Some(file) => file,
            None => self.file.insert(crate::fsutil::create_new(&self.path)?),
        };
        file.write_all(batch)
    }

    /// Writes `batch` in a blocking task; gives the writer and the emptied buffer back.
    async fn write_batch(mut self, mut batch: Vec<u8>) -> std::io::Result<(Self, Vec<u8>)> {
        tokio::task::spawn_blocking(move || {
            self.write(&batch)?;
            batch.clear();
            Ok((self, batch))
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

fn remote<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
    key: &str,
    err: SdkError<E>,
) -> Error {
    if lacks_credentials(&err) {
        return Error::Remote {
            what,
            key: key.to_owned(),
            message: "no S3 credentials were found (tried AWS_ACCESS_KEY_ID / \
                      AWS_SECRET_ACCESS_KEY, AWS profiles, web identity, container and instance \
                      credentials): give the bucket `credentials: {secretName: NAME}` (a Secret \
                      holding access_key_id and access_key), or set AWS_ACCESS_KEY_ID and \
                      AWS_SECRET_ACCESS_KEY"
                .into(),
            unavailable: false,
        };
    }
    let unavailable = matches!(
        err,
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)
    );
    Error::Remote {
        what,
        key: key.to_owned(),
        message: DisplayErrorContext(&err).to_string(),
        unavailable,
    }
}

/// Whether the request failed because no credential provider had any.
fn lacks_credentials<E: std::error::Error + 'static>(err: &SdkError<E>) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cause {
        if let Some(credentials) =
            e.downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
        {
            return matches!(
                credentials,
                aws_credential_types::provider::error::CredentialsError::CredentialsNotLoaded(_)
                    | aws_credential_types::provider::error::CredentialsError::ProviderError(_)
            );
        }
        cause = e.source();
    }
    false
}

fn status<E>(err: &SdkError<E>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

impl ObjectStore for S3Store {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(object) = self.fetch(key, "get").await? else {
            return Ok(None);
        };
        let bytes = object.body.collect().await.map_err(|e| Error::Io {
            what: "read",
            key: key.to_owned(),
            source: std::io::Error::other(e),
        })?;
        Ok(Some(bytes.into_bytes().to_vec()))
    }

    async fn reader(&self, key: &str) -> Result<Option<Reader>> {
        let object = self.fetch(key, "read").await?;
        Ok(object.map(|o| Box::new(o.body.into_async_read()) as Reader))
    }

    async fn put(&self, key: &str, body: Vec<u8>) -> Result<()> {
        self.upload(key, ByteStream::from(body), None, false)
            .await
            .map(drop)
    }

    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        self.upload(key, ByteStream::from(body), None, true).await
    }

    async fn put_blob(
        &self,
        key: &str,
        body: Blob,
        sha256: &Digest,
        if_absent: bool,
    ) -> Result<bool> {
        match body {
            Blob::Memory(bytes) => {
                let stream = ByteStream::from(bytes);
                self.upload(key, stream, Some(sha256), if_absent).await
            }
            Blob::File(path) => {
                let source = Pinned::open(&path).await?;
                if source.size > self.multipart.threshold {
                    return self.upload_parts(key, source, sha256, if_absent).await;
                }
                // `source` stays open until the upload is done: the SDK reads through it.
                let stream = source.range(0, source.size).await?;
                self.upload(key, stream, Some(sha256), if_absent).await
            }
        }
    }

    async fn get_to_file(&self, key: &str, path: &Path) -> Result<Option<Digest>> {
        let Some(object) = self.fetch(key, "download").await? else {
            return Ok(None);
        };
        let io = |source: std::io::Error| Error::Io {
            what: "download",
            key: key.to_owned(),
            source,
        };
        let mut writer = HashingWriter {
            path: path.to_owned(),
            file: None,
            hasher: Sha256::new(),
        };
        let expected = object.content_length().unwrap_or(0).max(0) as usize;
        let mut batch = Vec::with_capacity(expected.min(WRITE_BATCH));
        let mut body = object.body;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
        {
            batch.extend_from_slice(&chunk);
            if batch.len() >= WRITE_BATCH {
                (writer, batch) = writer.write_batch(batch).await.map_err(io)?;
            }
        }
        // The last batch, even an empty one: it creates the file of an empty body.
        (writer, _) = writer.write_batch(batch).await.map_err(io)?;
        Ok(Some(writer.hasher.finalize().into()))
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let full = self.key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if status(&e) == Some(404) => Ok(false),
            Err(e) => Err(remote("stat", key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let keys = self.list_modified(prefix).await?;
        Ok(keys.into_iter().map(|(key, _)| key).collect())
    }

    async fn list_modified(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let full = self.key(prefix)?;
        let strip = if self.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.prefix)
        };
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| remote("list", prefix, e))?;
            for object in page.contents() {
                if let Some(key) = object.key().and_then(|k| k.strip_prefix(&strip)) {
                    let modified = object.last_modified().map_or(0, |t| t.secs().max(0) as u64);
                    keys.push((key.to_owned(), modified));
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let full = self.key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map(drop)
            .map_err(|e| remote("delete", key, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What a PUT carried: its payload-hash header, its content encoding, and whether the
    /// body matched the payload hash it claimed.
    type Seen = Arc<Mutex<Vec<(String, Option<String>, bool)>>>;

    /// An HTTP server on loopback that records each PUT and answers 200.
    async fn recording_server() -> (String, Seen) {
        let seen: Seen = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |request: axum::extract::Request| {
            let record = record.clone();
            async move {
                let (parts, body) = request.into_parts();
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned)
                };
                let claimed = header("x-amz-content-sha256").unwrap_or_default();
                let encoding = header("content-encoding");
                drop(parts);
                let body = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let matches = hex(&Sha256::digest(&body)) == claimed;
                record.lock().unwrap().push((claimed, encoding, matches));
                ""
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (format!("http://{address}"), seen)
    }

    #[tokio::test]
    async fn blobs_are_signed_with_their_known_sha256_in_plain_framing() {
        let (endpoint, seen) = recording_server().await;
        let settings = S3Settings {
            endpoint: Some(endpoint),
            credentials: Some(("test-id".into(), "test-secret".into())),
            ..Default::default()
        };
        let store = S3Store::connect("bucket", "prefix", &settings).await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("body");
        std::fs::write(&file, vec![7u8; 300_000]).unwrap();
        let on_disk: Digest = Sha256::digest(vec![7u8; 300_000]).into();
        let in_memory: Digest = Sha256::digest(b"in memory").into();

        let memory = Blob::Memory(b"in memory".to_vec());
        assert!(
            store
                .put_blob("k/a", memory, &in_memory, true)
                .await
                .unwrap()
        );
        let streamed = Blob::File(file);
        assert!(
            store
                .put_blob("k/b", streamed, &on_disk, false)
                .await
                .unwrap()
        );
        store.put("k/c", b"manifest".to_vec()).await.unwrap();

        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
            vec![
                hex(&in_memory).as_str(),
                hex(&on_disk).as_str(),
                hex(&Sha256::digest(b"manifest")).as_str(),
            ],
            "each PUT is signed with its body's SHA-256"
        );
        for (claimed, encoding, matches) in &seen {
            assert!(matches, "the body sent under {claimed} has that hash");
            assert_eq!(encoding, &None, "no aws-chunked framing");
        }
    }
}
