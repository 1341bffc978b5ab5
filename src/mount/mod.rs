//! Mounting: the [`Mounter`] trait, the per-mount flags Lanes honours, and the mount table.
//!
//! Rules this module enforces:
//! - mount state is read back from `/proc/self/mountinfo` on every call, never remembered;
//! - a mount flag Lanes does not understand is an error, never silently dropped;
//! - blocking syscalls run off the async runtime with a deadline ([`blocking`]).

pub mod fake;
pub mod health;
pub mod linux;
pub mod mountinfo;
pub mod safe;

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mountinfo::MountEntry;

use crate::error::Kind;

/// Failures of mount operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} {path} did not finish within {seconds}s; the backing storage may be hung")]
    Timeout {
        op: &'static str,
        path: PathBuf,
        seconds: u64,
    },
    #[error(
        "mount flag {flag:?} is not supported here (supported: ro, rw, nosuid, suid, nodev, dev, \
         noexec, exec, noatime, atime, nodiratime, diratime, relatime, norelatime, strictatime, \
         defaults)"
    )]
    UnsupportedFlag { flag: String },
}

impl Error {
    /// The CSI-level kind of this failure.
    pub fn kind(&self) -> Kind {
        match self {
            Error::Io { source, .. } => crate::error::io_kind(source),
            Error::Timeout { .. } => Kind::DeadlineExceeded,
            Error::UnsupportedFlag { .. } => Kind::InvalidArgument,
        }
    }

    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Per-mount flags that a bind mount can carry. Parsed from a volume capability's
/// `mount_flags`; `read_only` is also set by the request's `readonly` field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MountFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub atime: Atime,
}

/// How access times are updated; `Inherit` leaves the source mount's choice alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Atime {
    #[default]
    Inherit,
    NoAtime,
    NoDirAtime,
    Relatime,
    Strict,
}

impl MountFlags {
    /// Parses CSI mount flags. Unknown flags are an error naming the flag (its key only, as
    /// `key=value` flags may carry secrets).
    pub fn parse<S: AsRef<str>>(flags: &[S]) -> Result<Self> {
        let mut out = MountFlags::default();
        for flag in flags {
            match flag.as_ref().trim() {
                "" | "defaults" | "rw" | "suid" | "dev" | "exec" | "atime" | "diratime"
                | "norelatime" | "bind" => {}
                "ro" => out.read_only = true,
                "nosuid" => out.nosuid = true,
                "nodev" => out.nodev = true,
                "noexec" => out.noexec = true,
                "noatime" => out.atime = Atime::NoAtime,
                "nodiratime" => out.atime = Atime::NoDirAtime,
                "relatime" => out.atime = Atime::Relatime,
                "strictatime" => out.atime = Atime::Strict,
                other => {
                    let key = other.split('=').next().unwrap_or(other);
                    return Err(Error::UnsupportedFlag {
                        flag: key.to_owned(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// True when a plain bind mount already has these flags (nothing to remount).
    pub fn is_plain(&self) -> bool {
        *self == MountFlags::default()
    }

    /// True when the mount described by `entry` carries every flag asked for.
    pub fn satisfied_by(&self, entry: &MountEntry) -> bool {
        let atime_ok = match self.atime {
            Atime::Inherit => true,
            Atime::NoAtime => entry.has_option("noatime"),
            Atime::NoDirAtime => entry.has_option("nodiratime"),
            Atime::Relatime => entry.has_option("relatime"),
            Atime::Strict => !entry.has_option("noatime") && !entry.has_option("relatime"),
        };
        entry.read_only() == self.read_only
            && (!self.nosuid || entry.has_option("nosuid"))
            && (!self.nodev || entry.has_option("nodev"))
            && (!self.noexec || entry.has_option("noexec"))
            && atime_ok
    }
}

/// The mount operations the node service needs. The real implementation is
/// [`linux::LinuxMounter`]; [`fake::FakeMounter`] serves unit tests only.
///
/// Methods block; callers run them through [`blocking`].
pub trait Mounter: Send + Sync + 'static {
    /// Bind-mounts `source` at `target` with the source's flags.
    fn bind(&self, source: &Path, target: &Path) -> Result<()>;
    /// Re-applies `flags` to the bind mount at `target` (fixes ro/rw and friends in place).
    fn remount(&self, target: &Path, flags: MountFlags) -> Result<()>;
    /// Mounts an overlay of `layers.lower` (read-only) and `layers.upper` (the volume's own
    /// changes) at `target`, with `flags`.
    fn overlay(&self, layers: &Overlay, target: &Path, flags: MountFlags) -> Result<()>;
    /// Mounts the filesystem on block device `device` (of type `fs_type`, with filesystem
    /// options `data`) at `target`.
    fn mount_device(
        &self,
        device: &Path,
        target: &Path,
        fs_type: &str,
        flags: MountFlags,
        data: &str,
    ) -> Result<()>;
    /// Unmounts the top mount at `target`; a symlink as the last component is never followed.
    fn unmount(&self, target: &Path) -> Result<()>;
    /// The current mount table.
    fn table(&self) -> Result<Vec<MountEntry>>;
    /// The entries that could be bind mounts of directory `dir` (their root ends with the
    /// last component of `dir`), and the entries at or above `dir`: enough to find every mount
    /// of `dir` with [`Origin`].
    fn binds_of(&self, dir: &Path) -> Result<Vec<MountEntry>> {
        let keep = bind_filter(dir);
        Ok(self
            .table()?
            .into_iter()
            .filter(|e| keep(&e.root, &e.mount_point) || upper_of(e) == Some(dir))
            .collect())
    }
    /// The entries mounted at one of `paths` or at an ancestor of one.
    fn table_for(&self, paths: &[&Path]) -> Result<Vec<MountEntry>> {
        Ok(self
            .table()?
            .into_iter()
            .filter(|e| paths.iter().any(|p| p.starts_with(&e.mount_point)))
            .collect())
    }
}

/// Which (root, mount point) pairs can matter for finding the bind mounts of `dir`: those whose
/// root ends like `dir` (its last two components), and those at or above `dir`.
pub fn bind_filter(dir: &Path) -> impl Fn(&Path, &Path) -> bool + '_ {
    let tail = dir.file_name().map(PathBuf::from).unwrap_or_default();
    let parent = dir.parent().and_then(Path::file_name).map(PathBuf::from);
    let suffix = parent.unwrap_or_default().join(tail);
    move |root, point| root.ends_with(&suffix) || dir.starts_with(point)
}

/// Runs a blocking mount operation on the blocking pool with a deadline. A syscall stuck on a
/// dead server keeps its thread, but the caller gets `Timeout` instead of hanging.
pub async fn blocking<T, F>(op: &'static str, path: &Path, deadline: Duration, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(deadline, task).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(Error::io(op, path, std::io::Error::other(join.to_string()))),
        Err(_) => Err(Error::Timeout {
            op,
            path: path.to_owned(),
            seconds: deadline.as_secs(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_flags_and_rejects_unknown_ones() {
        struct Case {
            desc: &'static str,
            flags: &'static [&'static str],
            want: Option<MountFlags>,
        }
        let cases = [
            Case {
                desc: "empty",
                flags: &[],
                want: Some(MountFlags::default()),
            },
            Case {
                desc: "ro and noexec",
                flags: &["ro", "noexec"],
                want: Some(MountFlags {
                    read_only: true,
                    noexec: true,
                    ..Default::default()
                }),
            },
            Case {
                desc: "atime choice",
                flags: &["noatime"],
                want: Some(MountFlags {
                    atime: Atime::NoAtime,
                    ..Default::default()
                }),
            },
            Case {
                desc: "unknown",
                flags: &["vers=4.1"],
                want: None,
            },
        ];
        for case in cases {
            let got = MountFlags::parse(case.flags).ok();
            assert_eq!(got, case.want, "{}", case.desc);
        }
    }

    #[test]
    fn unknown_flag_error_hides_the_value() {
        let err = MountFlags::parse(&["password=hunter2"]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("\"password\""), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert_eq!(err.kind(), Kind::InvalidArgument);
    }
}

/// The directories of an overlay mount: a read-only lower layer, a private upper layer and
/// the work directory overlayfs needs on the upper layer's filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overlay {
    pub lower: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

impl Overlay {
    /// The mount data overlayfs takes. Paths with `,` `:` or `\\` would be read as separators,
    /// so they are refused (Lanes chooses these paths; a data dir with them is rejected).
    pub fn data(&self) -> std::io::Result<String> {
        for path in [&self.lower, &self.upper, &self.work] {
            let text = path.to_str().unwrap_or(",");
            if text.contains([',', ':', '\\']) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "{} cannot be an overlay layer: it contains ',', ':' or '\\'",
                        path.display()
                    ),
                ));
            }
        }
        Ok(format!(
            "lowerdir={},upperdir={},workdir={}",
            self.lower.display(),
            self.upper.display(),
            self.work.display()
        ))
    }

    /// True when `entry` is this overlay (or a bind of it).
    pub fn matches(&self, entry: &MountEntry) -> bool {
        upper_of(entry) == Some(self.upper.as_path())
    }
}

/// Where a directory lives in the mount table: the device, and the path inside that device's
/// filesystem that a bind mount of the directory shows as its `root`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub device: Option<(u32, u32)>,
    pub root: PathBuf,
    /// The directory itself: an overlay with it as the upper layer shows it too.
    pub path: PathBuf,
}

impl Origin {
    /// Locates `dir` (an absolute, canonical path) in `table`.
    pub fn of(table: &[MountEntry], dir: &Path) -> Origin {
        match mountinfo::containing(table, dir) {
            Some(owner) => {
                let rest = dir.strip_prefix(&owner.mount_point).unwrap_or(dir);
                Origin {
                    device: Some((owner.major, owner.minor)),
                    root: owner.root.join(rest),
                    path: dir.to_owned(),
                }
            }
            None => Origin {
                device: None,
                root: dir.to_owned(),
                path: dir.to_owned(),
            },
        }
    }

    /// True when `entry` is a bind mount (direct or through another bind) of this directory,
    /// or an overlay (or a bind of one) whose upper layer it is.
    pub fn matches(&self, entry: &MountEntry) -> bool {
        let bind = entry.fs_type != "overlay"
            && entry.root == self.root
            && self
                .device
                .is_none_or(|device| device == (entry.major, entry.minor));
        bind || upper_of(entry) == Some(self.path.as_path())
    }
}

/// The upper layer of an overlay mount entry.
pub fn upper_of(entry: &MountEntry) -> Option<&Path> {
    if entry.fs_type != "overlay" {
        return None;
    }
    entry
        .super_options
        .iter()
        .find_map(|o| o.strip_prefix("upperdir="))
        .map(Path::new)
}
