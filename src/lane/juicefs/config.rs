//! The `juicefs:` settings of a `shared-rwx` profile: which file system, how to mount it, and
//! where its secrets come from.
//!
//! Rules: a password written into `meta_url` (or credentials into `bucket`) is refused at
//! start-up — secrets are named by environment variable (filled from a Kubernetes Secret) and
//! never appear in the config, argv or errors; options Lanes sets itself cannot be overridden.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::units::parse_bytes;

/// The settings as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJuiceFs {
    /// Metadata engine URL, without its password (`redis://host:6379/1`, `sqlite3:///path`).
    pub meta_url: String,
    /// The environment variable holding the metadata password (JuiceFS's `META_PASSWORD`).
    #[serde(default)]
    pub meta_password_env: Option<String>,
    /// The file system's name, for `juicefs format` (default `lanes`).
    #[serde(default)]
    pub name: Option<String>,
    /// Object storage type and bucket, for `juicefs format` (`file` + a directory, `s3` + a
    /// URL).
    #[serde(default)]
    pub storage: Option<String>,
    #[serde(default)]
    pub bucket: Option<String>,
    /// Environment variables holding the object storage keys, for `juicefs format`.
    #[serde(default)]
    pub access_key_env: Option<String>,
    #[serde(default)]
    pub secret_key_env: Option<String>,
    /// Whether Lanes may `juicefs format` the file system when it is new.
    #[serde(default)]
    pub format: bool,
    /// The directory of the file system that holds the volumes (default `volumes`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Size of the node-local read cache (default 10Gi).
    #[serde(default)]
    pub cache_size: Option<String>,
    /// Read/write buffer of the mount (default 300Mi).
    #[serde(default)]
    pub buffer_size: Option<String>,
    /// How often a mount reloads settings and quotas (default 3: a new volume's quota holds
    /// on a node's running mount, and a publish waits, at most this long; JuiceFS's own
    /// default is 12).
    #[serde(default)]
    pub heartbeat_seconds: Option<u64>,
    /// More `juicefs mount` options (`--writeback`, `--max-uploads=40`, ...).
    #[serde(default)]
    pub mount_options: Vec<String>,
    /// The `juicefs` program (default: `juicefs` on PATH).
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct JuiceFs {
    pub meta_url: String,
    pub meta_password_env: Option<String>,
    pub name: String,
    pub storage: Option<String>,
    pub bucket: Option<String>,
    pub access_key_env: Option<String>,
    pub secret_key_env: Option<String>,
    pub format: bool,
    pub prefix: String,
    pub cache_bytes: u64,
    pub buffer_bytes: u64,
    pub heartbeat_seconds: u64,
    pub mount_options: Vec<String>,
    pub binary: PathBuf,
}

/// Metadata engines JuiceFS 1.x speaks.
const SCHEMES: &[&str] = &[
    "redis", "rediss", "unix", "sqlite3", "postgres", "mysql", "tikv", "etcd", "badger",
];

/// Mount options Lanes sets itself.
const OWN_OPTIONS: &[&str] = &[
    "-d",
    "--background",
    "--cache-dir",
    "--cache-size",
    "--buffer-size",
    "--heartbeat",
    "--log",
    "--update-fstab",
    "--subdir",
];

impl JuiceFs {
    pub fn from_raw(raw: RawJuiceFs) -> Result<JuiceFs, String> {
        let scheme = raw.meta_url.split_once("://").map(|(s, _)| s);
        if !scheme.is_some_and(|s| SCHEMES.contains(&s)) {
            return Err(format!(
                "meta_url must start with one of {}:// (the URL is not shown: it may hold a \
                 password)",
                SCHEMES.join("://, ")
            ));
        }
        if holds_password(&raw.meta_url) {
            return Err(
                "meta_url holds a password: remove it and name the environment variable \
                        that holds it in meta_password_env (filled from a Kubernetes Secret)"
                    .into(),
            );
        }
        if raw.bucket.as_deref().is_some_and(holds_password) {
            return Err(
                "bucket holds credentials: name the environment variables that hold \
                        them in access_key_env and secret_key_env"
                    .into(),
            );
        }
        if raw.format && (raw.storage.is_none() || raw.bucket.is_none()) {
            return Err("format: true needs storage and bucket".into());
        }
        for env in [
            &raw.meta_password_env,
            &raw.access_key_env,
            &raw.secret_key_env,
        ]
        .into_iter()
        .flatten()
        {
            if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "{} is not an environment variable name",
                    crate::text::Shown(env)
                ));
            }
        }
        let name = raw.name.unwrap_or_else(|| "lanes".into());
        if !(3..=63).contains(&name.len())
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(format!(
                "name {} must be 3-63 of letters, digits and '-' (JuiceFS's rule)",
                crate::text::Shown(&name)
            ));
        }
        let prefix = raw.prefix.unwrap_or_else(|| "volumes".into());
        let prefix = prefix.trim_matches('/').to_owned();
        if prefix.is_empty()
            || prefix
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".." || c.starts_with('.'))
        {
            return Err(format!(
                "prefix {} must be a relative directory of the file system (like `volumes` or \
                 `k8s/volumes`), without '.', '..' or hidden components",
                crate::text::Shown(&prefix)
            ));
        }
        for option in &raw.mount_options {
            let key = option.split('=').next().unwrap_or_default();
            if !option.starts_with("--") {
                return Err(format!(
                    "mount_options: {} is not a --option",
                    crate::text::Shown(option)
                ));
            }
            if OWN_OPTIONS.contains(&key) {
                return Err(format!(
                    "mount_options: {key} is set by Lanes (use the profile's cache_size, \
                     buffer_size, heartbeat_seconds)"
                ));
            }
        }
        let size = |field: &str, text: Option<String>, default: u64| match text {
            None => Ok(default),
            Some(text) => parse_bytes(&text).map_err(|e| format!("{field}: {e}")),
        };
        let heartbeat_seconds = raw.heartbeat_seconds.unwrap_or(3);
        if !(1..=600).contains(&heartbeat_seconds) {
            return Err("heartbeat_seconds must be 1-600".into());
        }
        Ok(JuiceFs {
            meta_url: raw.meta_url,
            meta_password_env: raw.meta_password_env,
            name,
            storage: raw.storage,
            bucket: raw.bucket,
            access_key_env: raw.access_key_env,
            secret_key_env: raw.secret_key_env,
            format: raw.format,
            prefix,
            cache_bytes: size("cache_size", raw.cache_size, 10 << 30)?,
            buffer_bytes: size("buffer_size", raw.buffer_size, 300 << 20)?,
            heartbeat_seconds,
            mount_options: raw.mount_options,
            binary: raw.binary.unwrap_or_else(|| "juicefs".into()),
        })
    }
}

/// True when a URL's user part carries a password (`scheme://user:pass@host`).
fn holds_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    match authority.rsplit_once('@') {
        Some((user, _)) => user
            .split_once(':')
            .is_some_and(|(_, pass)| !pass.is_empty()),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<JuiceFs, String> {
        let raw: RawJuiceFs = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        JuiceFs::from_raw(raw)
    }

    #[test]
    fn settings() {
        let fs = parse("meta_url: redis://db:6379/1\nmeta_password_env: JFS_META\n").unwrap();
        assert_eq!(fs.prefix, "volumes");
        assert_eq!(fs.heartbeat_seconds, 3);
        assert_eq!(fs.cache_bytes, 10 << 30);
        for (yaml, want) in [
            (
                "meta_url: 'redis://:s3cret@db:6379/1'\n",
                "holds a password",
            ),
            (
                "meta_url: 'mysql://u:s3cret@(db:3306)/jfs'\n",
                "holds a password",
            ),
            ("meta_url: 'ftp://db'\n", "must start with"),
            (
                "meta_url: 'sqlite3:///m.db'\nformat: true\n",
                "needs storage",
            ),
            (
                "meta_url: 'sqlite3:///m.db'\nprefix: ../x\n",
                "relative directory",
            ),
            (
                "meta_url: 'sqlite3:///m.db'\nprefix: /\n",
                "relative directory",
            ),
            (
                "meta_url: 'sqlite3:///m.db'\nmount_options: ['--cache-dir=/x']\n",
                "set by Lanes",
            ),
            (
                "meta_url: 'sqlite3:///m.db'\nmeta_password_env: 'A B'\n",
                "not an environment variable",
            ),
            (
                "meta_url: 'sqlite3:///m.db'\nbucket: 'https://k:v@s3/b'\n",
                "holds credentials",
            ),
        ] {
            let err = parse(yaml).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        assert!(!holds_password("redis://user@db/1"));
        assert!(!holds_password("sqlite3:///var/a@b.db"));
    }
}
