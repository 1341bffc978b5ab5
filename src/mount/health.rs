//! Whether a mount answers: a stat and a statfs under a deadline, so a dead FUSE process
//! (ENOTCONN), a restarted NFS server (ESTALE) or a hung one is told apart from a live mount
//! without blocking the caller; and the lazy detach that takes such a mount away.

use std::path::Path;
use std::time::Duration;

/// How long a probe waits for the filesystem to answer.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// The FUSE filesystems' statfs magic.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// What a stat and a statfs of a path found.
#[derive(Debug)]
pub struct Probed {
    /// A FUSE filesystem answers there.
    pub fuse: bool,
    pub dev: u64,
}

/// Why a path could not be probed.
#[derive(Debug)]
pub enum Probe {
    /// It does not exist.
    Missing,
    /// The filesystem there failed (ENOTCONN: its FUSE process is gone) or hung.
    Failed(String),
}

/// A stat and a statfs of `path` that answer within [`PROBE_DEADLINE`].
pub fn probe(path: &Path) -> std::result::Result<Probed, Probe> {
    let path = path.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let probed = nix::sys::stat::stat(&path).and_then(|st| {
            let fs = nix::sys::statfs::statfs(&path)?;
            Ok(Probed {
                fuse: fs.filesystem_type().0 as i64 == FUSE_SUPER_MAGIC,
                dev: st.st_dev,
            })
        });
        let _ = tx.send(probed);
    });
    match rx.recv_timeout(PROBE_DEADLINE) {
        Ok(Ok(probed)) => Ok(probed),
        Ok(Err(nix::errno::Errno::ENOENT)) => Err(Probe::Missing),
        Ok(Err(e)) => Err(Probe::Failed(format!("stat: {e}"))),
        Err(_) => Err(Probe::Failed(format!(
            "stat did not answer within {}s",
            PROBE_DEADLINE.as_secs()
        ))),
    }
}

/// A device number as (major, minor), as the mount table shows it.
pub fn split(dev: u64) -> (u32, u32) {
    (nix::libc::major(dev), nix::libc::minor(dev))
}

/// Detaches the top mount at `path` lazily (a dead FUSE or NFS mount cannot be unmounted
/// otherwise).
pub fn detach(path: &Path) -> std::io::Result<()> {
    match nix::mount::umount2(
        path,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    ) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => Ok(()),
        Err(e) => Err(std::io::Error::other(format!(
            "detach {}: {e}",
            path.display()
        ))),
    }
}
