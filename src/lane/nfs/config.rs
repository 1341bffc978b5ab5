//! The `nfs:` settings of a `legacy-rwx` profile: which export, which protocol version, how
//! the node mounts it and where on it the volumes live.
//!
//! Rules: the server, export and prefix are checked at start-up so that nothing a request
//! says can steer a path; the protocol version has its own field (a `vers=` in
//! `mount_options` is refused rather than silently overriding it).

use serde::{Deserialize, Serialize};

use crate::text::Shown;

/// The settings as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNfs {
    /// The server's host name or IP address.
    pub server: String,
    /// The exported path (`/srv/share`).
    pub export: String,
    /// `4.1` (default), `4.0` or `3`.
    #[serde(default)]
    pub version: Option<String>,
    /// More options for the node's mount (`hard`, `timeo=600`, `nconnect=4`, ...).
    #[serde(default)]
    pub mount_options: Vec<String>,
    /// The directory of the export that holds the volumes (default `volumes`; may be nested,
    /// `teams/ml`).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Whether the controller's userspace client binds a port below 1024 (default false: the
    /// export must accept other ports — `insecure` on Linux knfsd; ganesha does by default).
    #[serde(default)]
    pub reserved_port: bool,
    /// What each node mounts: `export` (default: the export once, volumes are binds of it)
    /// or `volume` (each volume's directory on its own, for exports that do not let clients
    /// mount their root).
    #[serde(default)]
    pub mount: Scope,
    /// The program (and leading arguments) the node runs to mount, called as
    /// `<command...> -t nfs -o <options> <server>:<export> <path>` (default `mount`).
    #[serde(default)]
    pub mount_command: Option<Vec<String>>,
}

/// What a node mounts of an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// The export, once per node; each volume is a bind of its directory in that mount.
    #[default]
    Export,
    /// Each volume's `data` directory, once per volume per node.
    Volume,
}

/// An NFS protocol version Lanes mounts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Version {
    #[serde(rename = "3")]
    V3,
    #[serde(rename = "4.0")]
    V40,
    #[serde(rename = "4.1")]
    V41,
}

impl Version {
    /// As the kernel's `vers=` option and nfs-rs's `version=` argument spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V3 => "3",
            Version::V40 => "4.0",
            Version::V41 => "4.1",
        }
    }
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nfs {
    pub server: String,
    pub export: String,
    pub version: Version,
    pub mount_options: Vec<String>,
    /// The volumes' directory, relative to the export, `/`-separated safe names.
    pub prefix: String,
    pub reserved_port: bool,
    pub mount: Scope,
    pub mount_command: Vec<String>,
}

impl Nfs {
    pub fn from_raw(raw: RawNfs) -> Result<Nfs, String> {
        let server = raw.server.trim().to_owned();
        let host = server
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(&server);
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'))
            && (host == server || host.contains(':'));
        if !host_ok {
            return Err(format!(
                "server {} must be a host name or an IP address (IPv6 in brackets)",
                Shown(&raw.server)
            ));
        }
        let export = raw.export.trim_end_matches('/');
        let export = if export.is_empty() { "/" } else { export };
        let export_ok = export == "/"
            || (export.starts_with('/') && export[1..].split('/').all(path_component_ok));
        if !export_ok {
            return Err(format!(
                "export {} must be an absolute path of plain names (no `.`, `..`, empty parts \
                 or control characters)",
                Shown(&raw.export)
            ));
        }
        let version = match raw.version.as_deref().map(str::trim) {
            None | Some("4.1") => Version::V41,
            Some("4.0") | Some("4") => Version::V40,
            Some("3") => Version::V3,
            Some(other) => {
                return Err(format!(
                    "version {} is not one Lanes mounts (4.1, 4.0 or 3)",
                    Shown(other)
                ));
            }
        };
        for option in &raw.mount_options {
            let key = option.split('=').next().unwrap_or_default();
            if option.is_empty() || option.contains(',') || option.chars().any(char::is_whitespace)
            {
                return Err(format!(
                    "mount option {} must be one option (no commas or spaces)",
                    Shown(option)
                ));
            }
            if matches!(key, "vers" | "nfsvers" | "minorversion") {
                return Err(format!(
                    "mount option {} sets the protocol version; use `version:` instead",
                    Shown(option)
                ));
            }
        }
        let prefix = raw.prefix.unwrap_or_else(|| "volumes".into());
        let prefix = prefix.trim_matches('/').to_owned();
        if prefix.is_empty() || prefix.split('/').any(|c| !prefix_component_ok(c)) {
            return Err(format!(
                "prefix {} must be a relative directory of the export (like `volumes` or \
                 `teams/ml`): names of letters, digits, '.', '_' and '-', not starting with '.'",
                Shown(&prefix)
            ));
        }
        let mount_command = raw.mount_command.unwrap_or_else(|| vec!["mount".into()]);
        if mount_command.first().is_none_or(|p| p.is_empty()) {
            return Err("mount_command must name a program".into());
        }
        Ok(Nfs {
            server,
            export: export.to_owned(),
            version,
            mount_options: raw.mount_options,
            prefix,
            reserved_port: raw.reserved_port,
            mount: raw.mount,
            mount_command,
        })
    }

    /// The mount source, `server:/export`.
    pub fn source(&self) -> String {
        format!("{}:{}", self.server, self.export)
    }

    /// The mount source of `path` (relative to the export), `server:/export/path`.
    pub fn source_of(&self, path: &str) -> String {
        format!(
            "{}:{}/{path}",
            self.server,
            self.export.trim_end_matches('/')
        )
    }

    /// The node's mount options: the version first, then the profile's.
    pub fn options(&self) -> String {
        let mut options = vec![format!("vers={}", self.version.as_str())];
        options.extend(self.mount_options.iter().cloned());
        options.join(",")
    }

    /// The userspace client's URL (no secrets: NFS with AUTH_SYS has none).
    pub fn url(&self) -> String {
        let export: String = self
            .export
            .split('/')
            .map(percent_encode)
            .collect::<Vec<_>>()
            .join("/");
        format!(
            "nfs://{}{export}?version={}&noresvport={}",
            self.server,
            self.version.as_str(),
            !self.reserved_port
        )
    }

    /// The volumes' retained and archived directory, beside the volumes.
    pub fn retained(&self) -> String {
        format!("{}-retained", self.prefix)
    }
}

fn path_component_ok(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && !c.chars().any(char::is_control)
}

fn prefix_component_ok(c: &str) -> bool {
    c.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && c.len() <= 100
        && c.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Percent-encodes what nfs-rs would otherwise read as URL syntax in an export path part.
fn percent_encode(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for byte in part.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> RawNfs {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn defaults_and_the_mount_line() {
        let nfs = Nfs::from_raw(raw("{server: 10.0.0.5, export: /srv/share/}")).unwrap();
        assert_eq!(nfs.version, Version::V41);
        assert_eq!(nfs.prefix, "volumes");
        assert_eq!(nfs.source(), "10.0.0.5:/srv/share");
        assert_eq!(nfs.options(), "vers=4.1");
        assert_eq!(nfs.mount_command, ["mount"]);
        assert_eq!(nfs.mount, Scope::Export);
        assert_eq!(
            nfs.source_of("volumes/a/data"),
            "10.0.0.5:/srv/share/volumes/a/data"
        );
        let root = Nfs::from_raw(raw("{server: h, export: /, mount: volume}")).unwrap();
        assert_eq!(root.source_of("v/a/data"), "h:/v/a/data");
        assert_eq!(root.mount, Scope::Volume);
        assert_eq!(
            nfs.url(),
            "nfs://10.0.0.5/srv/share?version=4.1&noresvport=true"
        );
        let nfs = Nfs::from_raw(raw(
            "{server: '[fd00::5]', export: '/a b', version: '3', prefix: teams/ml, \
             mount_options: [hard, timeo=600]}",
        ))
        .unwrap();
        assert_eq!(nfs.source(), "[fd00::5]:/a b");
        assert_eq!(nfs.options(), "vers=3,hard,timeo=600");
        assert_eq!(nfs.prefix, "teams/ml");
        assert_eq!(nfs.url(), "nfs://[fd00::5]/a%20b?version=3&noresvport=true");
    }

    #[test]
    fn what_could_steer_a_path_or_hide_the_version_is_refused() {
        for (yaml, said) in [
            ("{server: 'a/b', export: /x}", "host name"),
            ("{server: '', export: /x}", "host name"),
            ("{server: h, export: x}", "absolute path"),
            ("{server: h, export: /x/../etc}", "absolute path"),
            (
                "{server: h, export: /x, prefix: ../up}",
                "relative directory",
            ),
            (
                "{server: h, export: /x, prefix: a//b}",
                "relative directory",
            ),
            (
                "{server: h, export: /x, prefix: .hidden}",
                "relative directory",
            ),
            ("{server: h, export: /x, prefix: /}", "relative directory"),
            ("{server: h, export: /x, version: '2'}", "4.1, 4.0 or 3"),
            (
                "{server: h, export: /x, mount_options: [vers=3]}",
                "use `version:`",
            ),
            (
                "{server: h, export: /x, mount_options: ['a,b']}",
                "one option",
            ),
            (
                "{server: h, export: /x, mount_command: []}",
                "name a program",
            ),
        ] {
            let err = Nfs::from_raw(raw(yaml)).unwrap_err();
            assert!(err.contains(said), "{yaml}: {err}");
        }
    }
}
