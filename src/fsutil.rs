//! Small filesystem helpers every module shares: the one way Lanes writes a record, and
//! directories worked on through descriptors.
//!
//! [`Dir`] is a directory held open: everything under it is reached relative to that
//! descriptor (`openat`, `mkdirat`, `renameat`, `unlinkat`) without following a symlink, so no
//! concurrent rename, and no link planted in the tree, can move a read or a write outside it.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Whether a record must survive a power cut, or only a crash of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced to disk, and so is the rename into place: the record survives power loss.
    Synced,
    /// Left in the page cache: survives `kill -9`, not a power cut. For records of state that
    /// a reboot clears anyway (mounts).
    Process,
}

static TEMP: AtomicU64 = AtomicU64::new(0);

/// Replaces `path` with `bytes` atomically: readers see the old record or the new one, never
/// a mix. The temporary lives beside `path` (same directory, same filesystem).
pub fn atomic_write(path: &Path, bytes: &[u8], durability: Durability) -> std::io::Result<()> {
    atomic_write_with(path, durability, |file| file.write_all(bytes))
}

/// [`atomic_write`] of what `write` writes (streamed: a large record is never held whole).
pub fn atomic_write_with(
    path: &Path,
    durability: Durability,
    write: impl FnOnce(&mut std::io::BufWriter<&std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let file = std::fs::File::create(&temp)?;
        let mut buffered = std::io::BufWriter::with_capacity(1 << 16, &file);
        write(&mut buffered)?;
        buffered.flush()?;
        drop(buffered);
        if durability == Durability::Synced {
            file.sync_all()?;
        }
        std::fs::rename(&temp, path)?;
        if durability == Durability::Synced {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Makes renames and creations in one directory durable, one `fsync` for many callers: a
/// caller that arrives while a sync runs waits for the next one (which covers its change),
/// and every caller that arrived before a sync started is covered by it. Concurrent creates
/// thus share a directory sync instead of queueing one each.
#[derive(Debug, Default)]
pub struct DirSyncer {
    state: std::sync::Mutex<SyncState>,
    done: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Changes asked to be made durable, counted.
    requested: u64,
    /// Requests covered by a finished sync.
    synced: u64,
    running: bool,
    /// The error of the last sync, handed to the callers it covered.
    failed: Option<(u64, std::io::ErrorKind, String)>,
}

impl DirSyncer {
    /// Returns once a sync of `dir` that began after this call has finished.
    pub fn sync(&self, dir: &Path) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.synced >= ticket {
                return match &state.failed {
                    Some((upto, kind, message)) if *upto >= ticket => {
                        Err(std::io::Error::new(*kind, message.clone()))
                    }
                    _ => Ok(()),
                };
            }
            if !state.running {
                state.running = true;
                let covers = state.requested;
                drop(state);
                let result = File::open(dir).and_then(|d| d.sync_all());
                state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state.running = false;
                state.synced = covers;
                state.failed = result.err().map(|e| (covers, e.kind(), e.to_string()));
                self.done.notify_all();
                continue;
            }
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Creates `path` for writing, mode 0600; fails when anything (a link included) is there.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// What a directory entry is, seen without following links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

impl Kind {
    pub fn of(stat: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Other,
        }
    }
}

fn io(errno: Errno) -> std::io::Error {
    errno.into()
}

/// A directory held open (see the module docs).
#[derive(Debug)]
pub struct Dir(OwnedFd);

impl Dir {
    /// Opens a directory named by the user (links in `path` itself are the user's choice; from
    /// here on nothing is followed).
    pub fn open(path: &Path) -> std::io::Result<Dir> {
        nix::fcntl::open(path, dir_flags(), Mode::empty())
            .map(Dir)
            .map_err(io)
    }

    /// The magic link through which the kernel reaches exactly this directory, for calls that
    /// only take paths (`join` a plain name to it; the last component is then the caller's).
    pub fn proc_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.0.as_raw_fd()))
    }

    /// The child directory `name`, never through a link.
    pub fn sub(&self, name: &OsStr) -> std::io::Result<Dir> {
        nix::fcntl::openat(self, name, dir_flags() | OFlag::O_NOFOLLOW, Mode::empty())
            .map(Dir)
            .map_err(io)
    }

    /// The directory `rel` (plain components) beneath this one, never through a link and never
    /// outside: `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, or one `openat` per component
    /// where the kernel lacks openat2.
    pub fn walk(&self, rel: &Path) -> std::io::Result<Dir> {
        if rel.as_os_str().is_empty() {
            return self.sub(OsStr::new("."));
        }
        let how = OpenHow::new()
            .flags(dir_flags() | OFlag::O_NOFOLLOW)
            .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_SYMLINKS);
        match nix::fcntl::openat2(self, rel, how) {
            Ok(fd) => Ok(Dir(fd)),
            Err(Errno::ENOSYS) => {
                let mut current = self.sub(OsStr::new("."))?;
                for component in rel.components() {
                    let Component::Normal(name) = component else {
                        return Err(std::io::Error::other("not a plain relative path"));
                    };
                    current = current.sub(name)?;
                }
                Ok(current)
            }
            Err(errno) => Err(io(errno)),
        }
    }

    /// The real directory `name` here, created with `mode` when missing; a link or file in the
    /// way is removed first (never followed). Returns it and whether it was created.
    pub fn make_dir(&self, name: &OsStr, mode: u32) -> std::io::Result<(Dir, bool)> {
        match self.stat(name)? {
            Some(stat) if Kind::of(&stat) == Kind::Dir => return Ok((self.sub(name)?, false)),
            Some(_) => self.remove_file(name)?,
            None => {}
        }
        match nix::sys::stat::mkdirat(self, name, Mode::from_bits_truncate(mode)) {
            Ok(()) => Ok((self.sub(name)?, true)),
            Err(Errno::EEXIST) => Ok((self.sub(name)?, false)),
            Err(errno) => Err(io(errno)),
        }
    }

    /// `rel`'s directories made real one by one beneath this directory (see [`Dir::make_dir`]).
    pub fn make_dirs(&self, rel: &Path, mode: u32) -> std::io::Result<Dir> {
        let mut current = self.sub(OsStr::new("."))?;
        for component in rel.components() {
            let Component::Normal(name) = component else {
                return Err(std::io::Error::other("not a plain relative path"));
            };
            current = current.make_dir(name, mode)?.0;
        }
        Ok(current)
    }

    /// Opens the regular file `name` for reading, never through a link.
    pub fn open_file(&self, name: &OsStr) -> std::io::Result<File> {
        self.open_file_sized(name).map(|(file, _)| file)
    }

    /// [`Dir::open_file`], with the size of what was opened (from the one stat that checks
    /// it is a regular file).
    pub fn open_file_sized(&self, name: &OsStr) -> std::io::Result<(File, u64)> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let file = File::from(nix::fcntl::openat(self, name, flags, Mode::empty()).map_err(io)?);
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok((file, meta.len()))
    }

    /// Creates the file `name` for writing (and reading back what was written); fails when
    /// anything is there already.
    pub fn create_file(&self, name: &OsStr, mode: u32) -> std::io::Result<File> {
        let flags =
            OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        nix::fcntl::openat(self, name, flags, Mode::from_bits_truncate(mode))
            .map(File::from)
            .map_err(io)
    }

    /// What `name` is, without following a link; `None` when nothing is there.
    pub fn stat(&self, name: &OsStr) -> std::io::Result<Option<FileStat>> {
        match nix::sys::stat::fstatat(self, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(stat)),
            Err(Errno::ENOENT) => Ok(None),
            Err(errno) => Err(io(errno)),
        }
    }

    /// Renames `from` here to `to` in `target` (atomically replacing a file there).
    pub fn rename(&self, from: &OsStr, target: &Dir, to: &OsStr) -> std::io::Result<()> {
        nix::fcntl::renameat(self, from, target, to).map_err(io)
    }

    /// Removes the non-directory `name` (a link itself, never its target).
    pub fn remove_file(&self, name: &OsStr) -> std::io::Result<()> {
        nix::unistd::unlinkat(self, name, nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(io)
    }

    /// Removes whatever `name` is, a whole directory tree included, never following a link.
    pub fn remove_tree(&self, name: &OsStr) -> std::io::Result<()> {
        match self.stat(name)? {
            None => Ok(()),
            Some(stat) if Kind::of(&stat) == Kind::Dir => {
                let dir = self.sub(name)?;
                for (child, _) in dir.entries()? {
                    dir.remove_tree(&child)?;
                }
                nix::unistd::unlinkat(self, name, nix::unistd::UnlinkatFlags::RemoveDir).map_err(io)
            }
            Some(_) => self.remove_file(name),
        }
    }

    /// The entries of this directory (without `.` and `..`), with their kinds as the
    /// directory reports them (`None`: unknown, stat it).
    pub fn entries(&self) -> std::io::Result<Vec<(OsString, Option<Kind>)>> {
        use rustix::fs::{FileType, RawDir, SeekFrom};
        // Read through this descriptor itself, from its start: no second descriptor per
        // listing (one directory read at a time per `Dir`: the offset is the descriptor's).
        rustix::fs::seek(&self.0, SeekFrom::Start(0))?;
        let mut buffer = vec![std::mem::MaybeUninit::<u8>::uninit(); 32 << 10];
        let mut listing = RawDir::new(&self.0, &mut buffer);
        let mut out = Vec::new();
        while let Some(entry) = listing.next() {
            let entry = entry?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes());
            if name == "." || name == ".." {
                continue;
            }
            let kind = match entry.file_type() {
                FileType::Directory => Some(Kind::Dir),
                FileType::RegularFile => Some(Kind::File),
                FileType::Symlink => Some(Kind::Symlink),
                FileType::Unknown => None,
                _ => Some(Kind::Other),
            };
            out.push((name.to_owned(), kind));
        }
        Ok(out)
    }

    /// Makes `name` a symlink holding `target` (the link is written, never followed).
    pub fn symlink(&self, target: &Path, name: &OsStr) -> std::io::Result<()> {
        nix::unistd::symlinkat(target, self, name).map_err(io)
    }

    /// The text of the link `name`.
    pub fn read_link(&self, name: &OsStr) -> std::io::Result<PathBuf> {
        nix::fcntl::readlinkat(self, name)
            .map(PathBuf::from)
            .map_err(io)
    }

    /// Hard-links `name` here as `to` in `target`.
    pub fn hard_link(&self, name: &OsStr, target: &Dir, to: &OsStr) -> std::io::Result<()> {
        nix::unistd::linkat(self, name, target, to, AtFlags::empty()).map_err(io)
    }

    /// This directory's own metadata.
    pub fn metadata(&self) -> std::io::Result<FileStat> {
        nix::sys::stat::fstat(self).map_err(io)
    }

    /// Sets this directory's permission bits.
    pub fn set_mode(&self, mode: u32) -> std::io::Result<()> {
        nix::sys::stat::fchmod(self, Mode::from_bits_truncate(mode)).map_err(io)
    }

    /// Sets this directory's access and modification times.
    pub fn set_times(&self, times: std::fs::FileTimes) -> std::io::Result<()> {
        let fd = self.0.try_clone()?;
        File::from(fd).set_times(times)
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_directory_syncs_are_shared() {
        let tmp = tempfile::tempdir().unwrap();
        let syncer = std::sync::Arc::new(DirSyncer::default());
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let (syncer, dir) = (syncer.clone(), tmp.path().to_owned());
                std::thread::spawn(move || {
                    std::fs::write(dir.join(format!("f{i}")), b"x").unwrap();
                    syncer.sync(&dir)
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap().unwrap();
        }
        let synced = syncer.state.lock().unwrap().synced;
        assert_eq!(synced, 16, "every request is covered");
        assert!(syncer.sync(&tmp.path().join("missing")).is_err());
    }

    #[test]
    fn dirs_never_follow_links_and_stay_beneath_their_root() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("real/inner")).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        std::os::unix::fs::symlink(".", root.join("dot")).unwrap();
        let dir = Dir::open(&root).unwrap();
        assert!(dir.walk(Path::new("real/inner")).is_ok());
        for through in ["escape", "escape/x", "dot/real", "real/../../x"] {
            assert!(dir.walk(Path::new(through)).is_err(), "{through}");
        }
        assert!(dir.sub(OsStr::new("escape")).is_err());
        assert!(dir.open_file(OsStr::new("escape")).is_err());
        // make_dirs replaces a link in the way with a real directory, and writes inside it.
        let made = dir.make_dirs(Path::new("escape/child"), 0o755).unwrap();
        made.create_file(OsStr::new("f"), 0o644)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        assert!(root.join("escape/child/f").is_file());
        assert!(
            std::fs::symlink_metadata(root.join("escape"))
                .unwrap()
                .is_dir()
        );
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing outside"
        );
        // create_file never writes through a planted link.
        std::os::unix::fs::symlink(outside.path().join("planted"), root.join("tmp")).unwrap();
        assert!(dir.create_file(OsStr::new("tmp"), 0o600).is_err());
        assert!(!outside.path().join("planted").exists());
        assert!(create_new(&root.join("tmp")).is_err());
        dir.remove_tree(OsStr::new("real")).unwrap();
        dir.remove_tree(OsStr::new("dot")).unwrap();
        assert!(!root.join("real").exists() && !root.join("dot").exists());
        let names: Vec<_> = dir.entries().unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn replaces_whole_records_and_leaves_no_temporaries() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("record.json");
        atomic_write(&path, b"one", Durability::Synced).unwrap();
        atomic_write(&path, b"two", Durability::Process).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().flatten().collect();
        assert_eq!(names.len(), 1);
        let missing_dir = tmp.path().join("no/such/dir/record.json");
        assert!(atomic_write(&missing_dir, b"x", Durability::Process).is_err());
    }
}
