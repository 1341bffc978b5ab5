//! Which Git sources a volume may use.
//!
//! Whoever can create a pod writes an inline volume's `dataset: git+URL`, and whoever can
//! create a PVC writes its annotation; the node plugin would fetch that URL as root, from
//! inside the cluster. So Git sources for volumes obey the admin's policy
//! (`datasets.git` in the config): transports (default `https` only: no `file://` reading the
//! node's disk, no `ssh://` with the node's keys), hosts (default any), and no loopback,
//! link-local, private or otherwise internal address unless allowed. The check runs when a
//! reference is pinned and again before every fetch; for HTTP(S) the address checked is the
//! one git connects to (curl's resolve list), and redirects are not followed.
//! `lanes dataset` on a workstation is not a volume and is not limited.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, ToSocketAddrs};

use serde::Deserialize;

use crate::error::Kind;

/// Git transports a reference may name.
pub const TRANSPORTS: &[&str] = &["https", "http", "git", "ssh", "file"];

/// `datasets.git` as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawGitPolicy {
    pub transports: Option<Vec<String>>,
    pub hosts: Vec<String>,
    pub allow_private_networks: bool,
}

/// The validated policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitPolicy {
    transports: Vec<String>,
    /// Exact host names, or `*.suffix`; empty means any host.
    hosts: Vec<String>,
    allow_private_networks: bool,
}

impl Default for GitPolicy {
    fn default() -> Self {
        GitPolicy {
            transports: vec!["https".into()],
            hosts: Vec::new(),
            allow_private_networks: false,
        }
    }
}

/// A source the policy refused, or whose host could not be checked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    Policy(String),
    #[error("{0}")]
    Lookup(String),
}

impl Refused {
    pub fn kind(&self) -> Kind {
        match self {
            Refused::Policy(_) => Kind::InvalidArgument,
            Refused::Lookup(_) => Kind::Unavailable,
        }
    }
}

/// What git must be told to reach an admitted source the way it was checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Admitted {
    /// `-c` settings for git (the checked address for curl, no redirects).
    pub git_config: Vec<String>,
}

impl GitPolicy {
    /// Validates the section.
    pub fn from_raw(raw: RawGitPolicy) -> Result<GitPolicy, String> {
        let mut policy = GitPolicy {
            allow_private_networks: raw.allow_private_networks,
            ..GitPolicy::default()
        };
        if let Some(transports) = raw.transports {
            if let Some(bad) = transports
                .iter()
                .find(|t| !TRANSPORTS.contains(&t.as_str()))
            {
                return Err(format!(
                    "datasets.git.transports: {bad:?} is not a Git transport (use {})",
                    TRANSPORTS.join(", ")
                ));
            }
            policy.transports = transports;
        }
        for host in &raw.hosts {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            if bare.is_empty()
                || !bare
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
            {
                return Err(format!(
                    "datasets.git.hosts: {host:?} is not a host name or *.domain"
                ));
            }
        }
        policy.hosts = raw.hosts.iter().map(|h| h.to_ascii_lowercase()).collect();
        Ok(policy)
    }

    /// Any source the reference parser allows (for `lanes dataset` on a workstation).
    pub fn unrestricted() -> GitPolicy {
        GitPolicy {
            transports: TRANSPORTS.iter().map(|t| t.to_string()).collect(),
            hosts: Vec::new(),
            allow_private_networks: true,
        }
    }

    /// Checks `url` (a Git URL without `git+`), resolving its host. Blocking (DNS).
    pub fn check(&self, url: &str) -> Result<Admitted, Refused> {
        let refuse = |why: String| {
            Refused::Policy(format!(
                "Git source {url:?} is not allowed for volumes: {why}"
            ))
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| refuse("it has no transport".into()))?;
        if !self.transports.iter().any(|t| t == scheme) {
            return Err(refuse(format!(
                "transport {scheme} is off (allowed: {}; an admin can change datasets.git.transports)",
                self.transports.join(", ")
            )));
        }
        if scheme == "file" {
            return Ok(Admitted::default());
        }
        let authority = rest.split('/').next().unwrap_or_default();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let (host, port) = split_host_port(host_port, default_port(scheme))
            .ok_or_else(|| refuse(format!("{host_port:?} is not host[:port]")))?;
        let host = host.to_ascii_lowercase();
        if !self.hosts.is_empty()
            && !self
                .hosts
                .iter()
                .any(|allowed| host_matches(allowed, &host))
        {
            return Err(refuse(format!(
                "host {host} is not in datasets.git.hosts ({})",
                self.hosts.join(", ")
            )));
        }
        let addresses: Vec<IpAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => (host.as_str(), port)
                .to_socket_addrs()
                .map_err(|e| {
                    Refused::Lookup(format!("Git source {url:?}: cannot resolve {host}: {e}"))
                })?
                .map(|a| a.ip())
                .collect(),
        };
        let Some(&first) = addresses.first() else {
            return Err(Refused::Lookup(format!(
                "Git source {url:?}: {host} has no address"
            )));
        };
        if !self.allow_private_networks
            && let Some(internal) = addresses.iter().find(|ip| !is_public(ip))
        {
            return Err(refuse(format!(
                "{host} is at {internal}, an internal address (loopback, private, link-local or \
                 reserved); an admin can set datasets.git.allow_private_networks"
            )));
        }
        let mut git_config = vec!["http.followRedirects=false".to_owned()];
        if matches!(scheme, "http" | "https") && host.parse::<IpAddr>().is_err() {
            let shown = match first {
                IpAddr::V6(v6) => format!("[{v6}]"),
                IpAddr::V4(v4) => v4.to_string(),
            };
            git_config.push(format!("http.curloptResolve={host}:{port}:{shown}"));
        }
        Ok(Admitted { git_config })
    }
}

fn default_port(scheme: &str) -> u16 {
    match scheme {
        "http" => 80,
        "git" => 9418,
        "ssh" => 22,
        _ => 443,
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host_port(text: &str, default: u16) -> Option<(String, u16)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => port.parse().ok()?,
            None if after.is_empty() => default,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match text.rsplit_once(':') {
        Some((host, port)) => Some((host.to_owned(), port.parse().ok()?)),
        None if !text.is_empty() => Some((text.to_owned(), default)),
        None => None,
    }
}

fn host_matches(allowed: &str, host: &str) -> bool {
    match allowed.strip_prefix("*.") {
        Some(suffix) => host.ends_with(&format!(".{suffix}")),
        None => allowed == host,
    }
}

/// True for addresses on the public internet (not loopback, private, link-local, shared,
/// documentation, multicast, unspecified or otherwise reserved).
fn is_public(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(&v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: &Ipv4Addr) -> bool {
    let [a, b, _, _] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // shared address space (CGNAT)
        || (a == 192 && b == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240)
}

fn is_public_v6(ip: &Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link local
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x64 && ip.segments()[1] == 0xff9b) // NAT64 (maps to IPv4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_admits_public_https_only() {
        let policy = GitPolicy::default();
        struct Case {
            url: &'static str,
            refused: Option<&'static str>,
        }
        let cases = [
            Case {
                url: "https://93.184.216.34/org/repo.git",
                refused: None,
            },
            Case {
                url: "https://[2606:4700::6810:84e5]:8443/r.git",
                refused: None,
            },
            Case {
                url: "file:///var/lib/lanes/volumes/x/data/repo",
                refused: Some("transport file"),
            },
            Case {
                url: "ssh://git@93.184.216.34/org/repo.git",
                refused: Some("transport ssh"),
            },
            Case {
                url: "http://93.184.216.34/r.git",
                refused: Some("transport http"),
            },
            Case {
                url: "https://127.0.0.1/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://[::1]/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://10.1.2.3/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://172.16.0.9/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://192.168.1.1/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://169.254.169.254/latest/meta-data",
                refused: Some("internal"),
            },
            Case {
                url: "https://100.64.0.1/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://0.0.0.0/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://[fd00::1]/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://[fe80::1]/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://[::ffff:127.0.0.1]/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://user@10.0.0.1:443/r.git",
                refused: Some("internal"),
            },
            Case {
                url: "https://localhost/r.git",
                refused: Some("internal"),
            },
        ];
        for case in cases {
            match (policy.check(case.url), case.refused) {
                (Ok(_), None) => {}
                (Err(e), Some(why)) => {
                    assert!(e.to_string().contains(why), "{}: {e}", case.url);
                    assert_eq!(e.kind(), Kind::InvalidArgument, "{}", case.url);
                }
                (got, want) => panic!("{}: got {got:?}, want refusal {want:?}", case.url),
            }
        }
    }

    #[test]
    fn admins_can_widen_and_narrow_the_policy() {
        let raw = |transports: &[&str], hosts: &[&str], private: bool| RawGitPolicy {
            transports: Some(transports.iter().map(|s| s.to_string()).collect()),
            hosts: hosts.iter().map(|s| s.to_string()).collect(),
            allow_private_networks: private,
        };
        let lab = GitPolicy::from_raw(raw(&["https", "http", "file"], &[], true)).unwrap();
        assert!(lab.check("http://127.0.0.1:8080/r.git").is_ok());
        assert!(lab.check("file:///srv/repo").is_ok());
        let narrow =
            GitPolicy::from_raw(raw(&["https"], &["github.com", "*.corp.example"], false)).unwrap();
        let err = narrow.check("https://93.184.216.34/r.git").unwrap_err();
        assert!(
            err.to_string().contains("not in datasets.git.hosts"),
            "{err}"
        );
        assert!(GitPolicy::from_raw(raw(&["ext"], &[], false)).is_err());
        assert!(GitPolicy::from_raw(raw(&["https"], &["bad host"], false)).is_err());
        assert!(host_matches("*.corp.example", "git.corp.example"));
        assert!(!host_matches("*.corp.example", "corp.example.evil"));
        assert!(GitPolicy::unrestricted().check("file:///anything").is_ok());
    }

    #[test]
    fn names_are_pinned_to_the_checked_address_for_http() {
        let policy = GitPolicy::from_raw(RawGitPolicy {
            transports: Some(vec!["https".into()]),
            hosts: vec![],
            allow_private_networks: true,
        })
        .unwrap();
        let admitted = policy.check("https://localhost:8443/r.git").unwrap();
        assert!(
            admitted
                .git_config
                .iter()
                .any(|c| c.starts_with("http.curloptResolve=localhost:8443:")),
            "{admitted:?}"
        );
        assert!(
            admitted
                .git_config
                .contains(&"http.followRedirects=false".to_owned())
        );
    }
}
