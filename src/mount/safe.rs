//! Paths that requests name (staging and target paths, `volume_path`): checked before anything
//! touches them, and opened without ever following a symbolic link.
//!
//! Rules this module enforces (CSI: these paths are absolute; Lanes: nothing is mounted,
//! created or removed through a symlink, and nothing Lanes owns is ever a mount point):
//! - a path is absolute, at most 4096 bytes, with no `.` or `..` component and no NUL;
//! - no component is a symlink (a trailing `/` after a link counts too): the path is opened one
//!   component at a time with `O_PATH | O_NOFOLLOW`, and the first link found is named in the
//!   error. Mounts, `mkdir` and `rmdir` then go through the opened descriptors
//!   (`/proc/self/fd/N`, `mkdirat`, `unlinkat`), so a link swapped in after the check is never
//!   followed either;
//! - the path is neither inside nor above a directory Lanes owns (the data directory), and not
//!   the socket's directory or above it: mounting there would hide or expose what Lanes keeps.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};

use crate::error::Kind;
use crate::text::shown;

/// Longest path a request may name (Linux `PATH_MAX`).
const MAX_PATH_BYTES: usize = 4096;

/// Why a path from a request cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    #[error("{field} is required")]
    Missing { field: &'static str },
    #[error("{field} {path} is not usable: {reason}")]
    Malformed {
        field: &'static str,
        path: String,
        reason: &'static str,
    },
    #[error(
        "{field} {path}: {component} is a symbolic link; Lanes never mounts, creates or removes \
         anything through a symlink (give the real path)"
    )]
    Symlink {
        field: &'static str,
        path: String,
        component: String,
    },
    #[error(
        "{field} {path} lies inside or above {protected}, which the plugin owns; choose a path \
         outside it"
    )]
    Protected {
        field: &'static str,
        path: String,
        protected: String,
    },
    #[error("{field} {path}: {component} is not a directory")]
    NotADirectory {
        field: &'static str,
        path: String,
        component: String,
    },
    #[error("{field} {path} does not exist")]
    NotFound { field: &'static str, path: String },
    #[error("the parent directory of {field} {path} does not exist; the CO must create it")]
    ParentMissing { field: &'static str, path: String },
    #[error("{field} {path} was moved or replaced while it was being opened; retry")]
    Moved { field: &'static str, path: String },
    #[error("{field} {path}: {op}: {source}")]
    Io {
        field: &'static str,
        path: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl PathError {
    /// The CSI-level kind of this failure.
    pub fn kind(&self) -> Kind {
        match self {
            PathError::NotFound { .. } => Kind::NotFound,
            PathError::Moved { .. } => Kind::Aborted,
            PathError::Io { source, .. } => crate::error::io_kind(source),
            _ => Kind::InvalidArgument,
        }
    }
}

type Result<T, E = PathError> = std::result::Result<T, E>;

/// The directories request paths must keep clear of.
#[derive(Debug, Clone, Default)]
pub struct Confinement {
    /// No path inside these or above them (what Lanes owns).
    owned: Vec<PathBuf>,
    /// No path at these or above them (what a mount must not cover: the socket's directory).
    uncovered: Vec<PathBuf>,
}

fn canonical(dirs: impl IntoIterator<Item = PathBuf>) -> Vec<PathBuf> {
    dirs.into_iter()
        .map(|dir| dir.canonicalize().unwrap_or(dir))
        .collect()
}

impl Confinement {
    /// Keeps request paths out of `owned` and its ancestors, and off `uncovered` and its
    /// ancestors (made canonical where they exist).
    pub fn new(
        owned: impl IntoIterator<Item = PathBuf>,
        uncovered: impl IntoIterator<Item = PathBuf>,
    ) -> Confinement {
        Confinement {
            owned: canonical(owned),
            uncovered: canonical(uncovered),
        }
    }

    /// Checks the text of request field `field` (see the module rules); touches nothing.
    pub fn check(&self, field: &'static str, text: &str) -> Result<RequestPath> {
        if text.is_empty() {
            return Err(PathError::Missing { field });
        }
        let malformed = |reason| PathError::Malformed {
            field,
            path: shown(text),
            reason,
        };
        if text.len() > MAX_PATH_BYTES {
            return Err(malformed("it is longer than 4096 bytes"));
        }
        if text.contains('\0') {
            return Err(malformed("it contains a NUL byte"));
        }
        if !text.starts_with('/') {
            return Err(malformed("it must be an absolute path"));
        }
        let mut path = PathBuf::from("/");
        for component in Path::new(text).components() {
            match component {
                Component::RootDir => {}
                Component::Normal(name) if name.len() <= 255 => path.push(name),
                Component::Normal(_) => return Err(malformed("a component is over 255 bytes")),
                Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                    return Err(malformed("it must not contain `.` or `..` components"));
                }
            }
        }
        // `a/./b` loses its `.` in components(); refuse it like `..`.
        if text.split('/').any(|part| part == "." || part == "..") {
            return Err(malformed("it must not contain `.` or `..` components"));
        }
        let inside_or_above = self
            .owned
            .iter()
            .find(|p| path.starts_with(p) || p.starts_with(&path));
        let covering = || self.uncovered.iter().find(|p| p.starts_with(&path));
        if let Some(protected) = inside_or_above.or_else(covering) {
            return Err(PathError::Protected {
                field,
                path: shown(text),
                protected: protected.display().to_string(),
            });
        }
        Ok(RequestPath {
            field,
            trailing_slash: text.len() > 1 && text.ends_with('/'),
            path,
        })
    }
}

/// A checked request path: absolute and normalized (see [`Confinement::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    field: &'static str,
    path: PathBuf,
    trailing_slash: bool,
}

/// A directory held open with `O_PATH`: mount onto it, or create and remove in it, without
/// resolving its path again.
#[derive(Debug)]
pub struct Pinned(OwnedFd);

impl Pinned {
    /// The magic link through which the kernel reaches exactly this directory.
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }
}

impl AsFd for Pinned {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// What [`RequestPath::remove_dir`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// The directory was removed.
    Removed,
    /// Nothing was there.
    Missing,
    /// Something is there that is not an empty directory; it was left alone.
    Kept,
}

impl RequestPath {
    /// The normalized path (what the mount table shows once something is mounted there).
    pub fn as_path(&self) -> &Path {
        &self.path
    }

    /// The request field this path came from.
    pub fn field(&self) -> &'static str {
        self.field
    }

    fn shown(&self) -> String {
        shown(&self.path.to_string_lossy())
    }

    fn io(&self, op: &'static str) -> impl FnOnce(Errno) -> PathError + '_ {
        move |errno| PathError::Io {
            field: self.field,
            path: self.shown(),
            op,
            source: errno.into(),
        }
    }

    /// Opens the directory at this path without following any symlink, or `None` when
    /// nothing is there. Something other than a directory there is an error.
    pub fn open_dir(&self) -> Result<Option<Pinned>> {
        let Some(parent) = self.open_parent_if_present()? else {
            return Ok(None);
        };
        match self.open_child(&parent)? {
            Some(dir) => self.confirm(dir).map(Some),
            None => Ok(None),
        }
    }

    /// Opens the parent directory (which must exist) without following any symlink.
    pub fn open_parent(&self) -> Result<Pinned> {
        self.open_parent_if_present()?
            .ok_or_else(|| PathError::ParentMissing {
                field: self.field,
                path: self.shown(),
            })
    }

    /// This path as seen through its pinned parent: `/proc/self/fd/P/<name>`, with the pin
    /// that keeps it valid. For calls that take a path and must not follow a link at the last
    /// component either (unmount with `UMOUNT_NOFOLLOW`); unlike a descriptor of the
    /// directory itself, it does not hold a mount there busy.
    pub fn through_parent(&self) -> Result<(Pinned, PathBuf)> {
        let parent = self.open_parent()?;
        let path = parent.proc_path().join(self.name());
        Ok((parent, path))
    }

    fn parent(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    fn name(&self) -> &OsStr {
        self.path.file_name().unwrap_or(OsStr::new("."))
    }

    /// Walks from `/` to the parent, one component at a time, refusing links.
    fn open_parent_if_present(&self) -> Result<Option<Pinned>> {
        let mut current = Pinned(
            nix::fcntl::open(
                "/",
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(self.io("open /"))?,
        );
        let mut walked = PathBuf::from("/");
        for name in self.parent().components().skip(1) {
            walked.push(name);
            let fd =
                match nix::fcntl::openat(&current, name.as_os_str(), path_flags(), Mode::empty()) {
                    Ok(fd) => fd,
                    Err(Errno::ENOENT) => return Ok(None),
                    Err(errno) => return Err(self.io("open")(errno)),
                };
            let stat = nix::sys::stat::fstat(&fd).map_err(self.io("stat"))?;
            match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFDIR => current = Pinned(fd),
                SFlag::S_IFLNK => return Err(self.symlink(&walked)),
                _ => return Err(self.not_a_directory(&walked)),
            }
        }
        Ok(Some(current))
    }

    /// Opens the last component in `parent`: `None` when missing.
    fn open_child(&self, parent: &Pinned) -> Result<Option<Pinned>> {
        let fd = match nix::fcntl::openat(parent, self.name(), path_flags(), Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Ok(None),
            Err(errno) => return Err(self.io("open")(errno)),
        };
        let stat = nix::sys::stat::fstat(&fd).map_err(self.io("stat"))?;
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => Ok(Some(Pinned(fd))),
            SFlag::S_IFLNK => Err(self.symlink(&self.path)),
            _ if self.trailing_slash => Err(self.not_a_directory(&self.path)),
            _ => Err(PathError::Malformed {
                field: self.field,
                path: self.shown(),
                reason: "it exists and is not a directory",
            }),
        }
    }

    /// Confirms that the opened directory is still reached by this path (it was not renamed
    /// or replaced in between).
    fn confirm(&self, dir: Pinned) -> Result<Pinned> {
        match std::fs::read_link(dir.proc_path()) {
            Ok(real) if real == self.path => Ok(dir),
            Ok(_) => Err(PathError::Moved {
                field: self.field,
                path: self.shown(),
            }),
            Err(e) => Err(PathError::Io {
                field: self.field,
                path: self.shown(),
                op: "resolve",
                source: e,
            }),
        }
    }

    /// The directory at this path, created (mode 0750) in its pinned parent when missing.
    /// Returns it and whether it was created.
    pub fn make_dir(&self) -> Result<(Pinned, bool)> {
        let parent = self.open_parent()?;
        if let Some(dir) = self.open_child(&parent)? {
            return self.confirm(dir).map(|dir| (dir, false));
        }
        match nix::sys::stat::mkdirat(&parent, self.name(), Mode::from_bits_truncate(0o750)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(errno) => return Err(self.io("create")(errno)),
        }
        let dir = self.open_child(&parent)?.ok_or_else(|| PathError::Moved {
            field: self.field,
            path: self.shown(),
        })?;
        self.confirm(dir).map(|dir| (dir, true))
    }

    /// Removes the directory at this path when it is empty, through its pinned parent; a
    /// symlink, a file, or a directory with something in it (or mounted on) is left alone.
    pub fn remove_dir(&self) -> Result<Removed> {
        let Some(parent) = self.open_parent_if_present()? else {
            return Ok(Removed::Missing);
        };
        match nix::unistd::unlinkat(&parent, self.name(), nix::unistd::UnlinkatFlags::RemoveDir) {
            Ok(()) => Ok(Removed::Removed),
            Err(Errno::ENOENT) => Ok(Removed::Missing),
            Err(Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR | Errno::EBUSY) => {
                Ok(Removed::Kept)
            }
            Err(errno) => Err(self.io("remove")(errno)),
        }
    }

    /// The regular file at this path (the target of a raw block publish), created empty
    /// (mode 0640) in its pinned parent when missing. Something already mounted there shows
    /// as the device it is. Returns it and whether it was created.
    pub fn make_file(&self) -> Result<(Pinned, bool)> {
        let parent = self.open_parent()?;
        let create = OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_WRONLY | OFlag::O_NOFOLLOW;
        let created = match nix::fcntl::openat(
            &parent,
            self.name(),
            create | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o640),
        ) {
            Ok(_) => true,
            Err(Errno::EEXIST) => false,
            Err(errno) => return Err(self.io("create")(errno)),
        };
        let fd = nix::fcntl::openat(&parent, self.name(), path_flags(), Mode::empty())
            .map_err(self.io("open"))?;
        let stat = nix::sys::stat::fstat(&fd).map_err(self.io("stat"))?;
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFREG | SFlag::S_IFBLK => self.confirm(Pinned(fd)).map(|f| (f, created)),
            SFlag::S_IFLNK => Err(self.symlink(&self.path)),
            _ => Err(PathError::Malformed {
                field: self.field,
                path: self.shown(),
                reason: "it exists and is neither a file nor a block device",
            }),
        }
    }

    /// Removes what a publish created at this path once nothing is mounted there: an empty
    /// directory or an empty regular file (a raw block target). Anything else is left alone.
    pub fn remove_created(&self) -> Result<Removed> {
        let Some(parent) = self.open_parent_if_present()? else {
            return Ok(Removed::Missing);
        };
        let stat = match nix::sys::stat::fstatat(&parent, self.name(), AtFlags::AT_SYMLINK_NOFOLLOW)
        {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => return Ok(Removed::Missing),
            Err(errno) => return Err(self.io("stat")(errno)),
        };
        let how = match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => nix::unistd::UnlinkatFlags::RemoveDir,
            SFlag::S_IFREG if stat.st_size == 0 => nix::unistd::UnlinkatFlags::NoRemoveDir,
            _ => return Ok(Removed::Kept),
        };
        match nix::unistd::unlinkat(&parent, self.name(), how) {
            Ok(()) => Ok(Removed::Removed),
            Err(Errno::ENOENT) => Ok(Removed::Missing),
            Err(
                Errno::ENOTEMPTY | Errno::EEXIST | Errno::ENOTDIR | Errno::EISDIR | Errno::EBUSY,
            ) => Ok(Removed::Kept),
            Err(errno) => Err(self.io("remove")(errno)),
        }
    }

    /// Refuses the path when any component of it is a symbolic link, whether or not the rest
    /// exists (every call checks this up front, even those that would not open the path).
    pub fn refuse_links(&self) -> Result<()> {
        let Some(parent) = self.open_parent_if_present()? else {
            return Ok(());
        };
        match nix::sys::stat::fstatat(&parent, self.name(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat)
                if SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT == SFlag::S_IFLNK =>
            {
                Err(self.symlink(&self.path))
            }
            Ok(_) | Err(Errno::ENOENT) => Ok(()),
            // A mount point whose filesystem is dead: not a link (nothing is mounted on one).
            Err(errno) if dead_mount(errno) => Ok(()),
            Err(errno) => Err(self.io("stat")(errno)),
        }
    }

    /// True when something (anything: a file, a link, a directory) exists at this path,
    /// found without following links.
    pub fn exists(&self) -> Result<bool> {
        let Some(parent) = self.open_parent_if_present()? else {
            return Ok(false);
        };
        match nix::sys::stat::fstatat(&parent, self.name(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(Errno::ENOENT) => Ok(false),
            Err(errno) if dead_mount(errno) => Ok(true),
            Err(errno) => Err(self.io("stat")(errno)),
        }
    }

    fn symlink(&self, component: &Path) -> PathError {
        PathError::Symlink {
            field: self.field,
            path: self.shown(),
            component: shown(&component.to_string_lossy()),
        }
    }

    fn not_a_directory(&self, component: &Path) -> PathError {
        PathError::NotADirectory {
            field: self.field,
            path: self.shown(),
            component: shown(&component.to_string_lossy()),
        }
    }
}

fn path_flags() -> OFlag {
    OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

/// Whether a stat failed because the path is the mount point of a filesystem that no longer
/// answers (a dead FUSE process, a restarted or gone NFS server): such a path exists, and
/// unmounting it is how it is cleaned up.
pub fn dead_mount(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ENOTCONN | Errno::ECONNABORTED | Errno::ESTALE | Errno::EIO
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn confinement() -> Confinement {
        Confinement::new(
            [PathBuf::from("/var/lib/lanes")],
            [PathBuf::from("/run/lanes")],
        )
    }

    #[test]
    fn checks_the_text_of_paths() {
        struct Case {
            text: &'static str,
            want: std::result::Result<&'static str, &'static str>,
        }
        let cases = [
            Case {
                text: "/var/lib/kubelet/pods/x/mount",
                want: Ok("/var/lib/kubelet/pods/x/mount"),
            },
            Case {
                text: "/mnt//a/",
                want: Ok("/mnt/a"),
            },
            Case {
                text: "",
                want: Err("is required"),
            },
            Case {
                text: "relative/path",
                want: Err("absolute"),
            },
            Case {
                text: "./x",
                want: Err("absolute"),
            },
            Case {
                text: "/a/../etc",
                want: Err("`..`"),
            },
            Case {
                text: "/a/./b",
                want: Err("`..`"),
            },
            Case {
                text: "/a/..",
                want: Err("`..`"),
            },
            Case {
                text: "/a\0b",
                want: Err("NUL"),
            },
            Case {
                text: "/var/lib/lanes",
                want: Err("inside or above"),
            },
            Case {
                text: "/var/lib/lanes/cache/tmp/x",
                want: Err("inside or above"),
            },
            Case {
                text: "/var/lib",
                want: Err("inside or above"),
            },
            Case {
                text: "/",
                want: Err("inside or above"),
            },
            Case {
                text: "/run/lanes/",
                want: Err("inside or above"),
            },
            Case {
                text: "/var/lib/lanes-other",
                want: Ok("/var/lib/lanes-other"),
            },
        ];
        for case in cases {
            let got = confinement().check("target_path", case.text);
            match (got, case.want) {
                (Ok(path), Ok(want)) => {
                    assert_eq!(path.as_path(), Path::new(want), "{:?}", case.text)
                }
                (Err(e), Err(want)) => {
                    assert!(e.to_string().contains(want), "{:?}: {e}", case.text);
                    assert_eq!(e.kind(), Kind::InvalidArgument, "{:?}", case.text);
                }
                (got, want) => panic!("{:?}: got {got:?}, want {want:?}", case.text),
            }
        }
        let long = format!("/{}", "a/".repeat(2100));
        assert!(confinement().check("target_path", &long).is_err());
        let huge_component = format!("/{}", "b".repeat(300));
        assert!(confinement().check("target_path", &huge_component).is_err());
    }

    #[test]
    fn refuses_every_symlink_component_and_pins_real_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("real/inner")).unwrap();
        std::os::unix::fs::symlink(root.join("real"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        std::fs::write(root.join("file"), "x").unwrap();
        let check = |rel: &str| {
            Confinement::default()
                .check("staging_target_path", &format!("{}/{rel}", root.display()))
                .unwrap()
        };
        for rel in [
            "link",
            "link/",
            "link/inner",
            "etc-link",
            "etc-link/ssl",
            "link/new",
        ] {
            let err = check(rel).open_dir().unwrap_err();
            assert!(matches!(err, PathError::Symlink { .. }), "{rel}: {err}");
            assert!(err.to_string().contains("link"), "{rel}: {err}");
            let err = check(rel).make_dir().unwrap_err();
            assert!(matches!(err, PathError::Symlink { .. }), "{rel}: {err}");
        }
        assert_eq!(check("link").remove_dir().unwrap(), Removed::Kept);
        assert!(root.join("real").is_dir(), "rmdir never follows the link");
        assert!(matches!(
            check("file").open_dir(),
            Err(PathError::Malformed { .. })
        ));
        assert!(matches!(
            check("file/x").open_dir(),
            Err(PathError::NotADirectory { .. })
        ));
        assert!(check("missing").open_dir().unwrap().is_none());
        let pinned = check("real/inner").open_dir().unwrap().unwrap();
        assert_eq!(
            std::fs::read_link(pinned.proc_path()).unwrap(),
            root.join("real/inner")
        );
        let (made, created) = check("real/new").make_dir().unwrap();
        assert!(created && root.join("real/new").is_dir());
        drop(made);
        assert!(
            !check("real/new").make_dir().unwrap().1,
            "second make_dir finds it"
        );
        assert_eq!(check("real/new").remove_dir().unwrap(), Removed::Removed);
        assert_eq!(check("real/new").remove_dir().unwrap(), Removed::Missing);
        assert_eq!(
            check("real").remove_dir().unwrap(),
            Removed::Kept,
            "not empty"
        );
    }
}
