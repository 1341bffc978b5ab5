//! Disk images: made thick or thin, grown, and copied for snapshots and clones.
//!
//! A copy is a reflink (FICLONE: O(1), blocks shared until either side writes) where the
//! filesystem under the data directory supports it (xfs with reflink, btrfs), and otherwise a
//! copy of the data extents only (holes and unallocated ranges stay holes), so a copy costs
//! what the image holds, not its size.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use crate::lane::{Error, Provisioning, Result};

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copied {
    /// Shares its blocks with the source.
    Reflink,
    /// Holds its own copy of every data extent.
    Copy,
}

impl Copied {
    pub fn as_str(self) -> &'static str {
        match self {
            Copied::Reflink => "reflink",
            Copied::Copy => "copy",
        }
    }
}

fn create(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)
        .map_err(Error::io(format!("create {}", path.display())))
}

/// Creates the image file of `bytes`: allocated whole (thick) or sparse (thin).
pub fn make(path: &Path, bytes: u64, provisioning: Provisioning) -> Result<()> {
    size(&create(path)?, path, bytes, provisioning)
}

/// Grows an existing image to `bytes`.
pub fn grow(path: &Path, bytes: u64, provisioning: Provisioning) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(Error::io(format!("open {}", path.display())))?;
    size(&file, path, bytes, provisioning)
}

/// Gives `file` `bytes`, allocated or sparse, and syncs it.
fn size(file: &File, path: &Path, bytes: u64, provisioning: Provisioning) -> Result<()> {
    match provisioning {
        Provisioning::Thick => nix::fcntl::fallocate(
            file,
            nix::fcntl::FallocateFlags::empty(),
            0,
            bytes as nix::libc::off_t,
        )
        .map_err(|e| Error::io(format!("allocate {bytes} bytes for {}", path.display()))(e.into())),
        Provisioning::Thin => file
            .set_len(bytes)
            .map_err(Error::io(format!("size {}", path.display()))),
    }?;
    file.sync_all()
        .map_err(Error::io(format!("sync {}", path.display())))
}

/// Copies image `from` to a new file `to` (reflink where possible), synced.
pub fn copy(from: &Path, to: &Path) -> Result<Copied> {
    let source = File::open(from).map_err(Error::io(format!("open {}", from.display())))?;
    let target = create(to)?;
    // SAFETY: FICLONE takes the source descriptor as its argument; both are open files.
    let how = match unsafe { ficlone(target.as_raw_fd(), source.as_raw_fd() as _) } {
        Ok(_) => Copied::Reflink,
        Err(_) => {
            copy_extents(&source, &target).map_err(Error::io(format!(
                "copy {} to {}",
                from.display(),
                to.display()
            )))?;
            Copied::Copy
        }
    };
    target
        .sync_all()
        .map_err(Error::io(format!("sync {}", to.display())))?;
    Ok(how)
}

/// Copies the data extents of `source` into `target` and gives it the same length. Reads go
/// without readahead: pages read ahead into an allocated-but-unwritten range would make the
/// kernel report that range as data, and the copy would cascade through the whole image.
/// Zero chunks are not written (they stay holes in the copy).
fn copy_extents(source: &File, target: &File) -> std::io::Result<()> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    use nix::unistd::{Whence, lseek};
    let len = source.metadata()?.len();
    posix_fadvise(source, 0, 0, PosixFadviseAdvice::POSIX_FADV_RANDOM)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut at: u64 = 0;
    while at < len {
        let data = match lseek(source, at as i64, Whence::SeekData) {
            Ok(offset) => offset as u64,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = lseek(source, data as i64, Whence::SeekHole).map(|o| o as u64)?;
        let mut offset = data;
        while offset < hole {
            let want = buffer.len().min((hole - offset) as usize);
            let read = source.read_at(&mut buffer[..want], offset)?;
            if read == 0 {
                break;
            }
            if buffer[..read].iter().any(|&b| b != 0) {
                target.write_all_at(&buffer[..read], offset)?;
            }
            offset += read as u64;
        }
        at = hole;
    }
    // What was read is not worth keeping in memory.
    posix_fadvise(source, 0, 0, PosixFadviseAdvice::POSIX_FADV_DONTNEED)?;
    target.set_len(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_keeps_data_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("a.img");
        make(&from, 64 << 20, Provisioning::Thin).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&from).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(b"middle", 32 << 20).unwrap();
        drop(file);
        let to = dir.path().join("b.img");
        copy(&from, &to).unwrap();
        let copied = std::fs::read(&to).unwrap();
        assert_eq!(copied.len(), 64 << 20);
        assert_eq!(&copied[..4], b"head");
        assert_eq!(&copied[32 << 20..(32 << 20) + 6], b"middle");
        assert!(copied[4..32 << 20].iter().all(|&b| b == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(
            std::fs::metadata(&to).unwrap().blocks() * 512 < 8 << 20,
            "holes stay holes"
        );
        assert!(copy(&from, &to).is_err(), "never over an existing file");
    }
}
