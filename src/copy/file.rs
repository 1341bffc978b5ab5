//! Copying one regular file between two open directories: to a temporary name in the
//! destination directory, verified as the checksum mode asks, then renamed into place so no
//! reader ever sees half a file. Both ends are reached through their directories'
//! descriptors, never by following a link.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::fsutil::{Dir, Kind};

/// The prefix of temporary files; leftovers of a killed run are removed by the next run.
pub const TEMP_PREFIX: &str = ".lanes-tmp-";
const BUFFER: usize = 1 << 20;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A fresh temporary name.
pub fn temp_name() -> OsString {
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = PID.get_or_init(std::process::id);
    OsString::from(format!("{TEMP_PREFIX}{pid}-{n}"))
}

/// Files up to this size are copied with one read and one write through a per-thread
/// buffer: cheaper than the kernel-copy probing of `std::io::copy` for a few KiB.
const SMALL_FILE: u64 = 32 << 10;

/// The process's umask, read once from /proc (reading it with umask(2) would change it
/// for every thread for a moment). `None` when it cannot be read.
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("Umask:"))?;
        u32::from_str_radix(line.split_whitespace().nth(1)?, 8).ok()
    })
}

/// True for the names of temporaries.
pub fn is_temp(name: &OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with(TEMP_PREFIX))
}

/// Opens a source file for reading without following a symlink put in its place.
pub fn open_source(path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("no longer a regular file"));
    }
    Ok(file)
}

/// SHA-256 of everything readable from `reader`.
pub fn sha256(mut reader: impl Read) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finalize().into());
        }
        hasher.update(&buffer[..n]);
    }
}

/// Files of at least this size have their two SHA-256s (source and copy) computed on two
/// cores at once.
pub const PARALLEL_HASH: u64 = 64 << 20;

/// An open file read by positional reads from the start, leaving its offset alone (so
/// another reader of the same descriptor is not disturbed).
struct ReadAt<'a> {
    file: &'a File,
    offset: u64,
}

impl ReadAt<'_> {
    /// `file` read from its first byte.
    fn start(file: &File) -> ReadAt<'_> {
        ReadAt { file, offset: 0 }
    }
}

impl Read for ReadAt<'_> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = self.file.read_at(buffer, self.offset)?;
        self.offset += n as u64;
        Ok(n)
    }
}

/// How a copy is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Only that the written size equals the source's.
    Size,
    /// That the SHA-256 of what was written equals the source's.
    Sha256,
    Nothing,
}

/// What a file copy needs to know about its source entry.
#[derive(Debug, Clone, Copy)]
pub struct Attributes {
    pub mode: u32,
    pub mtime: (i64, i64),
}

/// Copies file `name` of `src` to `name` in `dst` through a temporary, sets mode and times,
/// and renames it into place (replacing a file or link there; a directory in the way is
/// removed first, unless `fresh` says the plan found nothing at the name). Returns the bytes
/// written. `before_rename` runs between the two (a test
/// hook for killing the process there).
pub fn copy(
    src: &Dir,
    dst: &Dir,
    name: &OsStr,
    attributes: Attributes,
    verify: Verify,
    fresh: bool,
    before_rename: &dyn Fn(),
) -> std::io::Result<u64> {
    if !fresh && dst.stat(name)?.is_some_and(|s| Kind::of(&s) == Kind::Dir) {
        dst.remove_tree(name)?;
    }
    let temp = temp_name();
    let result = write_temp(src, dst, name, &temp, attributes, verify).and_then(|bytes| {
        before_rename();
        dst.rename(&temp, dst, name).map(|()| bytes)
    });
    if result.is_err() {
        let _ = dst.remove_file(&temp);
    }
    result
}

fn write_temp(
    src: &Dir,
    dst: &Dir,
    name: &OsStr,
    temp: &OsStr,
    attributes: Attributes,
    verify: Verify,
) -> std::io::Result<u64> {
    let (mut input, expected) = src.open_file_sized(name)?;
    // Made with its final permissions when the umask leaves them whole (no chmod then);
    // otherwise private until the chmod below.
    let direct =
        umask().is_some_and(|mask| attributes.mode & !0o777 == 0 && attributes.mode & mask == 0);
    let mut output = dst.create_file(temp, if direct { attributes.mode } else { 0o600 })?;
    // The Sha256 arms give the source's hash and the written copy's, checked once below.
    let (written, hashes) = match verify {
        Verify::Size | Verify::Nothing if expected <= SMALL_FILE => {
            (copy_small(&mut input, &mut output, expected)?, None)
        }
        // std::io::copy uses copy_file_range (reflink / in-kernel copy) between files.
        Verify::Size | Verify::Nothing => (std::io::copy(&mut input, &mut output)?, None),
        Verify::Sha256 if expected >= PARALLEL_HASH => {
            // One core hashes the source (positional reads of the same open file); the other
            // copies it in the kernel and hashes what was written.
            let (source_hash, copied) = std::thread::scope(|scope| {
                let source = scope.spawn(|| sha256(ReadAt::start(&input)));
                let copied = std::io::copy(&mut &input, &mut output)
                    .and_then(|written| Ok((written, sha256(ReadAt::start(&output))?)));
                let source = source
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("the hashing thread failed")));
                (source, copied)
            });
            let (written, written_hash) = copied?;
            (written, Some((source_hash?, written_hash)))
        }
        Verify::Sha256 if expected <= SMALL_FILE => {
            let (written, source_hash, written_hash) =
                copy_small_verified(&mut input, &mut output, expected)?;
            (written, Some((source_hash, written_hash)))
        }
        Verify::Sha256 => {
            let (written, source_hash) = copy_hashing(&mut input, &mut output)?;
            (
                written,
                Some((source_hash, sha256(ReadAt::start(&output))?)),
            )
        }
    };
    if hashes.is_some_and(|(source, copy)| source != copy) {
        return Err(std::io::Error::other(
            "SHA-256 of the written copy differs from the source",
        ));
    }
    if verify == Verify::Size && written != expected {
        return Err(std::io::Error::other(format!(
            "wrote {written} bytes, the source has {expected}"
        )));
    }
    if !direct {
        output.set_permissions(std::fs::Permissions::from_mode(attributes.mode))?;
    }
    let time = to_system_time(attributes.mtime);
    output.set_times(
        std::fs::FileTimes::new()
            .set_modified(time)
            .set_accessed(time),
    )?;
    Ok(written)
}

/// Copies the `expected` bytes of a small file (its size when opened) through a per-thread
/// buffer: reads until it has them or the file ends, then one write. No read to find the end:
/// a file that grew after it was opened is copied as it was then (with the walk's time, so
/// the next run sees it changed); one that shrank fails the size check.
fn copy_small(input: &mut File, output: &mut File, expected: u64) -> std::io::Result<u64> {
    with_small_buffer(expected, |buffer| {
        let len = read_up_to(input, buffer)?;
        output.write_all(&buffer[..len])?;
        Ok(len as u64)
    })
}

/// [`copy_small`], verified: the bytes read are hashed, written, read back from the copy
/// (positional reads of the same descriptor, no second open) and hashed again. Returns the
/// bytes written and the two SHA-256s.
fn copy_small_verified(
    input: &mut File,
    output: &mut File,
    expected: u64,
) -> std::io::Result<(u64, [u8; 32], [u8; 32])> {
    use std::os::unix::fs::FileExt;
    with_small_buffer(expected, |buffer| {
        let len = read_up_to(input, buffer)?;
        let source: [u8; 32] = Sha256::digest(&buffer[..len]).into();
        output.write_all(&buffer[..len])?;
        output.read_exact_at(&mut buffer[..len], 0)?;
        Ok((len as u64, source, Sha256::digest(&buffer[..len]).into()))
    })
}

/// Runs `work` with this thread's buffer for small files, `size` bytes long. The buffer is
/// kept between files while it is small.
fn with_small_buffer<T>(size: u64, work: impl FnOnce(&mut [u8]) -> T) -> T {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUFFER.with_borrow_mut(|buffer| {
        buffer.resize(size as usize, 0);
        let result = work(buffer);
        if buffer.capacity() > 2 * SMALL_FILE as usize {
            *buffer = Vec::new();
        }
        result
    })
}

/// Fills `buffer` from `input` until it is full or the file ends; returns the bytes read.
/// Not read_to_end: it asks the file for its size and position again, and reads once more to
/// find the end (three syscalls a file, most of the cost of a tiny one).
fn read_up_to(input: &mut File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut len = 0;
    while len < buffer.len() {
        match input.read(&mut buffer[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(len)
}

fn copy_hashing(input: &mut File, output: &mut File) -> std::io::Result<(u64, [u8; 32])> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            return Ok((total, hasher.finalize().into()));
        }
        hasher.update(&buffer[..n]);
        output.write_all(&buffer[..n])?;
        total += n as u64;
    }
}

/// A (seconds, nanoseconds) pair as a `SystemTime`.
pub fn to_system_time((secs, nanos): (i64, i64)) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.clamp(0, 999_999_999) as u64);
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copied(body: &[u8], expected: u64) -> (u64, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("in"), body).unwrap();
        let mut input = File::open(dir.path().join("in")).unwrap();
        let mut output = File::create(dir.path().join("out")).unwrap();
        let written = copy_small(&mut input, &mut output, expected).unwrap();
        (written, std::fs::read(dir.path().join("out")).unwrap())
    }

    #[test]
    fn a_small_copy_takes_the_size_the_file_had_when_opened() {
        let body: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        assert_eq!(copied(&body, 5000), (5000, body.clone()));
        // Grown since: the bytes it had then.
        assert_eq!(copied(&body, 3000), (3000, body[..3000].to_vec()));
        // Shrunk since: what is there (the caller's size check reports it).
        assert_eq!(copied(&body, 8000), (5000, body.clone()));
        assert_eq!(copied(b"", 0), (0, Vec::new()));
    }

    #[test]
    fn a_verified_small_copy_hashes_what_it_read_and_what_it_wrote() {
        let dir = tempfile::tempdir().unwrap();
        let body = vec![7u8; 6000];
        std::fs::write(dir.path().join("in"), &body).unwrap();
        let mut input = File::open(dir.path().join("in")).unwrap();
        let made = Dir::open(dir.path()).unwrap();
        let mut output = made.create_file(OsStr::new("out"), 0o644).unwrap();
        let (written, source, copy) = copy_small_verified(&mut input, &mut output, 6000).unwrap();
        let expected: [u8; 32] = Sha256::digest(&body).into();
        assert_eq!((written, source, copy), (6000, expected, expected));
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), body);
    }
}
