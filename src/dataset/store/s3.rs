//! The `s3://` store on aws-sdk-s3, for AWS and S3-compatible servers (MinIO, Ceph, moto).
//!
//! With an explicit endpoint, path-style addressing is used. Credentials come from the
//! standard AWS chain (environment, profile, workload identity) unless the caller passes them;
//! they are never logged. `put_if_absent` is a conditional PUT (`If-None-Match: *`), which the
//! server refuses with 412 when the key exists.

use std::path::Path;

use aws_sdk_s3::Client;
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::primitives::ByteStream;
use tokio::io::AsyncWriteExt;

use sha2::{Digest as _, Sha256};

use super::{Digest, Error, ObjectStore, Result, check_key};

/// Objects under `prefix` in one S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
}

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
        let mut config = aws_sdk_s3::config::Builder::new().region(region);
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
                let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
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
        // Every body is verified against its SHA-256 as it is written, which is stronger than
        // the SDK's CRC check of responses; skipping the latter saves a pass over each body.
        let client = Client::from_conf(
            config
                .response_checksum_validation(
                    aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                )
                .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
                .build(),
        );
        S3Store {
            client,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
        }
    }

    /// PUTs `body` at `key`; with `if_absent`, as `If-None-Match: *`, answering `false` when
    /// the server refuses because the key exists.
    async fn upload(&self, key: &str, body: ByteStream, if_absent: bool) -> Result<bool> {
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
        match request.send().await {
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

fn remote<E: std::error::Error + Send + Sync + 'static>(
    what: &'static str,
    key: &str,
    err: SdkError<E>,
) -> Error {
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

    async fn put(&self, key: &str, body: Vec<u8>) -> Result<()> {
        self.upload(key, ByteStream::from(body), false)
            .await
            .map(drop)
    }

    async fn put_if_absent(&self, key: &str, body: Vec<u8>) -> Result<bool> {
        self.upload(key, ByteStream::from(body), true).await
    }

    async fn put_file(&self, key: &str, path: &Path, if_absent: bool) -> Result<bool> {
        let body = ByteStream::from_path(path).await.map_err(|e| Error::Io {
            what: "read",
            key: path.display().to_string(),
            source: std::io::Error::other(e),
        })?;
        self.upload(key, body, if_absent).await
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
        let mut file = tokio::fs::File::create(path).await.map_err(io)?;
        let mut hasher = Sha256::new();
        let mut body = object.body;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
        {
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        Ok(Some(hasher.finalize().into()))
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
                    keys.push(key.to_owned());
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
