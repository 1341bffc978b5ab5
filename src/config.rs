//! The Lanes configuration file (YAML, `--config` / `LANES_CONFIG`).
//!
//! Every setting has an embedded default, so no file is needed. Unknown keys are an error
//! that names them: a typo must not silently fall back to a default. The file is validated
//! once at start-up into an immutable [`Config`] that is passed down, never global.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::cache::Settings as CacheSettings;
use crate::dataset::bucket::{Buckets, RawDatasets};
use crate::dataset::gitpolicy::GitPolicy;
use crate::lane::local::LocalSettings;
use crate::units::parse_bytes;

/// The file as written.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    local: RawLocal,
    mount_timeout_seconds: Option<u64>,
    datasets: RawDatasets,
    cache: RawCache,
    access: RawAccess,
    profiles: std::collections::BTreeMap<String, crate::lane::profile::RawProfile>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawAccess {
    user_from: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawCache {
    max_bytes: Option<String>,
    publish_timeout_seconds: Option<u64>,
    download_jobs: Option<usize>,
    max_memory: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLocal {
    default_capacity: Option<String>,
    max_capacity: Option<String>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub local: LocalSettings,
    /// Deadline for one mount or unmount syscall.
    pub mount_timeout: Duration,
    /// Dataset buckets; the embedded default is `local` at `file://<data-dir>/datasets`.
    pub datasets: Buckets,
    /// Which Git sources volumes may use (`datasets.git`).
    pub git: GitPolicy,
    /// The node's dataset cache.
    pub cache: CacheSettings,
    /// The storage profiles StorageClasses pick from.
    pub profiles: crate::lane::Profiles,
    /// Where the node reads the user a pod runs for (`access.user_from`).
    pub user_from: crate::access::UserSource,
}

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// The embedded defaults for a plugin whose data lives in `data_dir`.
    pub fn embedded(data_dir: &Path) -> Config {
        Config::from_raw(RawConfig::default(), "<embedded>", data_dir)
            .expect("embedded defaults are valid")
    }

    /// Loads `path`, or the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>, data_dir: &Path) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            return Ok(Config::embedded(data_dir));
        };
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown, data_dir)
    }

    /// Parses configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, data_dir: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Invalid {
                path: origin.to_owned(),
                message: e.to_string(),
            })?
        };
        Config::from_raw(raw, origin, data_dir)
    }

    fn from_raw(raw: RawConfig, origin: &str, data_dir: &Path) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        };
        let size = |key: &str, text: Option<&String>| -> Result<Option<u64>, ConfigError> {
            text.map(|t| parse_bytes(t).map_err(|e| invalid(format!("{key}: {e}"))))
                .transpose()
        };
        let default_capacity = size(
            "local.default_capacity",
            raw.local.default_capacity.as_ref(),
        )?
        .unwrap_or(1 << 30);
        if default_capacity == 0 {
            return Err(invalid("local.default_capacity must be above zero".into()));
        }
        let timeout = raw.mount_timeout_seconds.unwrap_or(30);
        if timeout == 0 {
            return Err(invalid("mount_timeout_seconds must be above zero".into()));
        }
        let defaults = CacheSettings::default();
        let cache = CacheSettings {
            max_bytes: size("cache.max_bytes", raw.cache.max_bytes.as_ref())?
                .unwrap_or(defaults.max_bytes),
            publish_timeout: match raw.cache.publish_timeout_seconds {
                Some(0) => {
                    return Err(invalid(
                        "cache.publish_timeout_seconds must be above zero".into(),
                    ));
                }
                Some(seconds) => Duration::from_secs(seconds),
                None => defaults.publish_timeout,
            },
            jobs: match raw.cache.download_jobs {
                Some(jobs @ 1..=256) => jobs,
                Some(_) => return Err(invalid("cache.download_jobs must be 1..256".into())),
                None => defaults.jobs,
            },
            max_memory: match size("cache.max_memory", raw.cache.max_memory.as_ref())? {
                Some(bytes) if bytes < 1 << 20 => {
                    return Err(invalid("cache.max_memory must be at least 1Mi".into()));
                }
                Some(bytes) => bytes,
                None => defaults.max_memory,
            },
        };
        if cache.max_bytes == 0 {
            return Err(invalid("cache.max_bytes must be above zero".into()));
        }
        Ok(Config {
            cache,
            local: LocalSettings {
                default_capacity,
                max_capacity: size("local.max_capacity", raw.local.max_capacity.as_ref())?,
            },
            mount_timeout: Duration::from_secs(timeout),
            git: GitPolicy::from_raw(raw.datasets.git.clone()).map_err(invalid)?,
            profiles: crate::lane::Profiles::from_raw(raw.profiles).map_err(invalid)?,
            datasets: Buckets::from_raw(raw.datasets, data_dir).map_err(invalid)?,
            user_from: match raw.access.user_from {
                Some(text) => crate::access::UserSource::parse(&text)
                    .map_err(|e| invalid(format!("access.user_from: {e}")))?,
                None => Default::default(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_defaults() {
        let config = Config::parse("", "t", Path::new("/d")).unwrap();
        assert_eq!(config.local.default_capacity, 1 << 30);
        assert_eq!(config.local.max_capacity, None);
        assert_eq!(config.mount_timeout, Duration::from_secs(30));
        assert_eq!(config.datasets.default_name(), "local");
        assert_eq!(config.cache.publish_timeout, Duration::from_secs(60));
    }

    #[test]
    fn parses_and_rejects() {
        let config = Config::parse(
            "local:\n  default_capacity: 5Gi\n  max_capacity: 1Ti\nmount_timeout_seconds: 5\n",
            "t",
            Path::new("/d"),
        )
        .unwrap();
        assert_eq!(config.local.default_capacity, 5 << 30);
        assert_eq!(config.local.max_capacity, Some(1 << 40));
        for bad in [
            "locl: {}\n",
            "local:\n  default_capacity: lots\n",
            "local:\n  default_capacity: 0\n",
            "mount_timeout_seconds: 0\n",
            "cache:\n  max_bytes: 0\n",
            "cache:\n  publish_timeout_seconds: 0\n",
            "cache:\n  max_byte: 1Gi\n",
            "cache:\n  max_memory: 64Ki\n",
            "access:\n  user_from: field:x\n",
            "datasets:\n  buckets: {a: {dataset_path: \"gs://x\"}}\n",
        ] {
            let err = Config::parse(bad, "t", Path::new("/d"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("config t:"), "{bad:?}: {err}");
        }
        let typo = Config::parse("locl: {}\n", "t", Path::new("/d"))
            .unwrap_err()
            .to_string();
        assert!(typo.contains("locl"), "{typo}");
    }
}
