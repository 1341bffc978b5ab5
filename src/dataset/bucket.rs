//! Dataset buckets: named locations that hold datasets (`production` → `s3://bucket/prefix`),
//! each read-write or read-only, one of them the default.
//!
//! Rules: locations are `s3://bucket[/prefix]` or `file:///absolute/dir`; `gs://` and
//! `azure://` are refused as "not supported yet" rather than misread; keys and secrets never
//! sit in the configuration — only a reference to where they are (a Kubernetes Secret, or the
//! standard AWS credential chain when none is named).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::reference::check_part;

/// Whether a bucket takes writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    #[default]
    ReadWrite,
    ReadOnly,
}

/// Where a bucket's objects live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A directory on this machine.
    File(PathBuf),
    /// An S3 (or S3-compatible) bucket and a key prefix (no leading or trailing '/').
    S3 { bucket: String, prefix: String },
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(dir) => write!(f, "file://{}", dir.display()),
            Location::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl Location {
    /// Parses a `dataset_path`.
    pub fn parse(text: &str) -> Result<Location, String> {
        if let Some(path) = text.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{text:?}: file:// locations need an absolute path (file:///dir)"
                ));
            }
            if path.split('/').any(|part| part == "..") {
                return Err(format!("{text:?}: the path contains '..'"));
            }
            return Ok(Location::File(PathBuf::from(path)));
        }
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid_bucket = (3..=63).contains(&bucket.len())
                && bucket
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.');
            if !valid_bucket {
                return Err(format!(
                    "{text:?}: {bucket:?} is not a valid S3 bucket name"
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == ".." || part == ".") {
                return Err(format!("{text:?}: the prefix contains '.' or '..'"));
            }
            return Ok(Location::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        for scheme in ["gs://", "azure://"] {
            if text.starts_with(scheme) {
                return Err(format!(
                    "{text:?}: {scheme} buckets are not supported yet (use s3:// or file://)"
                ));
            }
        }
        Err(format!(
            "{text:?}: a dataset_path is s3://bucket[/prefix] or file:///dir"
        ))
    }
}

/// Where a bucket's credentials come from. Never the credentials themselves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsRef {
    /// A Kubernetes Secret with `access_key_id` and `access_key` fields (or the AWS names
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; optional `session_token`).
    #[serde(rename = "secretName")]
    pub secret_name: String,
    /// The Secret's namespace; default: the namespace the plugin runs in.
    #[serde(default)]
    pub namespace: Option<String>,
}

/// A configured bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    pub name: String,
    pub location: Location,
    pub region: Option<String>,
    /// An S3-compatible endpoint (MinIO, Ceph); path-style addressing is used with it.
    pub endpoint: Option<String>,
    pub mode: Mode,
    pub credentials: Option<CredentialsRef>,
}

/// The `datasets:` section as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatasets {
    #[serde(default)]
    pub default_bucket: Option<String>,
    #[serde(default)]
    pub buckets: BTreeMap<String, RawBucket>,
    /// Which Git sources volumes may use (see [`super::gitpolicy`]).
    #[serde(default)]
    pub git: super::gitpolicy::RawGitPolicy,
}

/// One bucket as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBucket {
    pub dataset_path: String,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub credentials: Option<CredentialsRef>,
}

/// The validated bucket table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Buckets {
    buckets: BTreeMap<String, Bucket>,
    default: String,
}

/// The embedded default bucket's name.
pub const LOCAL: &str = "local";

impl Buckets {
    /// Validates the section. With no buckets configured, the table is one read-write bucket
    /// `local` at `file://<data-dir>/datasets`, which is also the default.
    pub fn from_raw(raw: RawDatasets, data_dir: &std::path::Path) -> Result<Buckets, String> {
        if raw.buckets.is_empty() {
            if let Some(default) = raw.default_bucket.filter(|d| d != LOCAL) {
                return Err(format!(
                    "datasets.default_bucket {default:?} is not a configured bucket"
                ));
            }
            let local = Bucket {
                name: LOCAL.into(),
                location: Location::File(data_dir.join("datasets")),
                region: None,
                endpoint: None,
                mode: Mode::ReadWrite,
                credentials: None,
            };
            return Ok(Buckets {
                buckets: BTreeMap::from([(LOCAL.into(), local)]),
                default: LOCAL.into(),
            });
        }
        let mut buckets = BTreeMap::new();
        for (name, raw) in raw.buckets {
            check_part(&name, "the bucket name").map_err(|e| format!("datasets.buckets: {e}"))?;
            let location = Location::parse(&raw.dataset_path)
                .map_err(|e| format!("datasets.buckets.{name}.dataset_path: {e}"))?;
            if let Some(endpoint) = &raw.endpoint
                && !(endpoint.starts_with("https://") || endpoint.starts_with("http://"))
            {
                return Err(format!(
                    "datasets.buckets.{name}.endpoint {endpoint:?} must be an http(s) URL"
                ));
            }
            if matches!(location, Location::File(_))
                && (raw.endpoint.is_some() || raw.credentials.is_some())
            {
                return Err(format!(
                    "datasets.buckets.{name}: endpoint and credentials apply to s3:// buckets only"
                ));
            }
            buckets.insert(
                name.clone(),
                Bucket {
                    name,
                    location,
                    region: raw.region,
                    endpoint: raw.endpoint,
                    mode: raw.mode,
                    credentials: raw.credentials,
                },
            );
        }
        let default =
            match raw.default_bucket {
                Some(default) if buckets.contains_key(&default) => default,
                Some(default) => {
                    return Err(format!(
                        "datasets.default_bucket {default:?} is not a configured bucket"
                    ));
                }
                None if buckets.len() == 1 => buckets.keys().next().cloned().unwrap_or_default(),
                None => return Err(
                    "datasets.default_bucket is required when more than one bucket is configured"
                        .into(),
                ),
            };
        Ok(Buckets { buckets, default })
    }

    /// The bucket `name`, or the default one for `None`.
    pub fn get(&self, name: Option<&str>) -> Result<&Bucket, String> {
        let name = name.unwrap_or(&self.default);
        self.buckets.get(name).ok_or_else(|| {
            format!(
                "bucket {name:?} is not configured (configured: {})",
                self.buckets.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }

    pub fn default_name(&self) -> &str {
        &self.default
    }

    pub fn iter(&self) -> impl Iterator<Item = &Bucket> {
        self.buckets.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(yaml: &str) -> Result<Buckets, String> {
        let raw: RawDatasets = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        Buckets::from_raw(raw, Path::new("/var/lib/lanes"))
    }

    #[test]
    fn embedded_default_is_a_local_bucket() {
        let buckets = parse("{}").unwrap();
        assert_eq!(buckets.default_name(), "local");
        let local = buckets.get(None).unwrap();
        assert_eq!(
            local.location,
            Location::File("/var/lib/lanes/datasets".into())
        );
        assert_eq!(local.mode, Mode::ReadWrite);
    }

    #[test]
    fn parses_the_documented_example() {
        let buckets = parse(
            "default_bucket: production\nbuckets:\n  production: {dataset_path: \"s3://prod-datasets/lanes\", region: us-east-1, mode: read-write}\n  archive: {dataset_path: \"s3://cold/ds\", region: eu-west-1, endpoint: \"https://s3.example.internal\", mode: read-only, credentials: {secretName: cold-cred}}\n",
        )
        .unwrap();
        assert_eq!(buckets.get(None).unwrap().name, "production");
        let archive = buckets.get(Some("archive")).unwrap();
        assert_eq!(archive.mode, Mode::ReadOnly);
        assert_eq!(
            archive.location,
            Location::S3 {
                bucket: "cold".into(),
                prefix: "ds".into()
            }
        );
        assert_eq!(archive.location.to_string(), "s3://cold/ds");
        assert_eq!(
            archive.credentials.as_ref().unwrap().secret_name,
            "cold-cred"
        );
        assert!(
            buckets
                .get(Some("nope"))
                .unwrap_err()
                .contains("archive, production")
        );
    }

    #[test]
    fn refuses_bad_tables_with_the_reason() {
        let cases = [
            (
                "buckets: {a: {dataset_path: \"gs://x/y\"}}",
                "not supported yet",
            ),
            (
                "buckets: {a: {dataset_path: \"azure://x\"}}",
                "not supported yet",
            ),
            (
                "buckets: {a: {dataset_path: \"file://relative\"}}",
                "absolute",
            ),
            (
                "buckets: {a: {dataset_path: \"s3://UPPER\"}}",
                "not a valid S3 bucket",
            ),
            (
                "buckets: {a: {dataset_path: \"s3://ok-bucket/../x\"}}",
                "'..'",
            ),
            (
                "buckets: {a: {dataset_path: \"s3://aaa\"}, b: {dataset_path: \"s3://bbb\"}}",
                "default_bucket is required",
            ),
            (
                "default_bucket: c\nbuckets: {a: {dataset_path: \"s3://aaa\"}}",
                "not a configured bucket",
            ),
            (
                "buckets: {a: {dataset_path: \"s3://aaa\", secret_key: x}}",
                "secret_key",
            ),
            (
                "buckets: {a: {dataset_path: \"s3://aaa\", endpoint: \"ftp://x\"}}",
                "http(s)",
            ),
            (
                "buckets: {\"../x\": {dataset_path: \"s3://aaa\"}}",
                "bucket name",
            ),
        ];
        for (yaml, reason) in cases {
            let err = parse(yaml).unwrap_err();
            assert!(err.contains(reason), "{yaml}: {err}");
        }
    }
}
