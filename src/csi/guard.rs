//! The per-volume in-flight guard.
//!
//! Rule (CSI "Concurrency"): while one call on a volume is in flight, a second call on the
//! same volume (any RPC: CreateVolume racing DeleteVolume, NodeUnstageVolume racing
//! NodePublishVolume) is answered ABORTED, so the CO retries later; calls on other volumes run
//! freely. The key is the volume ID alone, never the path.
//!
//! The guard holds the key in memory (calls in this process) and, when another Lanes process
//! may share the data directory (the controller and node roles of one node run apart), an
//! exclusive `flock` on `<data-dir>/locks/<key hash>`. Lock files stay between calls (creating
//! and removing a file per call costs more than the call's own work on ext4); one is removed
//! when its volume is gone ([`Guard::retire`]). A holder checks after locking that its file is
//! still the one at the path, so a removal never lets two holders in.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

/// The set of operations in flight.
#[derive(Debug, Default, Clone)]
pub struct InFlight {
    keys: Arc<Mutex<HashSet<String>>>,
    /// Where lock files live; `None`: in-process only.
    lock_dir: Option<PathBuf>,
}

/// Holds a key while an operation runs.
#[derive(Debug)]
pub struct Guard {
    keys: Arc<Mutex<HashSet<String>>>,
    key: String,
    file: Option<(Flock<File>, PathBuf)>,
}

impl InFlight {
    /// Guards keys in this process and, with `lock_dir`, across processes sharing it.
    pub fn new(lock_dir: Option<PathBuf>) -> InFlight {
        InFlight {
            keys: Arc::default(),
            lock_dir,
        }
    }

    /// Takes `key`, or returns `None` when another operation (here or in another process)
    /// holds it.
    pub fn try_lock(&self, key: &str) -> Option<Guard> {
        {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if !keys.insert(key.to_owned()) {
                return None;
            }
        }
        let mut guard = Guard {
            keys: self.keys.clone(),
            key: key.to_owned(),
            file: None,
        };
        if let Some(dir) = &self.lock_dir {
            let digest = Sha256::digest(key.as_bytes());
            let name: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
            guard.file = Some((lock_file(&dir.join(&name))?, dir.join(name)));
        }
        Some(guard)
    }
}

/// Locks the file at `path` (creating it), or `None` when another process holds it.
fn lock_file(path: &std::path::Path) -> Option<Flock<File>> {
    for _ in 0..3 {
        let file = match File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
        {
            Ok(file) => file,
            Err(e) => {
                // The lock directory is Lanes' own; failing to use it must not stop calls,
                // but it does lose the cross-process half of the rule: say so.
                tracing::warn!(path = %path.display(), error = %e, "cannot use a volume lock file");
                return None;
            }
        };
        let locked = Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()?;
        // A holder that was just finishing removed the file after we opened it: ours is then
        // an orphan nobody else can see; start again with the file now at the path.
        let same = match (locked.metadata(), std::fs::metadata(path)) {
            (Ok(ours), Ok(now)) => ours.ino() == now.ino() && ours.dev() == now.dev(),
            _ => false,
        };
        if same {
            return Some(locked);
        }
    }
    None
}

impl Guard {
    /// Releases the key and removes its lock file: the volume is gone for good.
    pub fn retire(mut self) {
        if let Some((file, path)) = self.file.take() {
            // Removed while still locked, so nobody locks a file about to vanish.
            let _ = std::fs::remove_file(&path);
            drop(file);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        drop(self.file.take());
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_until_the_first_drops() {
        let inflight = InFlight::default();
        let first = inflight.try_lock("local/a").unwrap();
        assert!(inflight.try_lock("local/a").is_none());
        assert!(inflight.try_lock("local/b").is_some());
        drop(first);
        assert!(inflight.try_lock("local/a").is_some());
    }

    #[test]
    fn lock_files_exclude_other_processes_and_are_retired() {
        let tmp = tempfile::tempdir().unwrap();
        // Two InFlight sets stand for two processes: they share only the lock directory.
        let one = InFlight::new(Some(tmp.path().to_owned()));
        let other = InFlight::new(Some(tmp.path().to_owned()));
        let held = one.try_lock("local/a").unwrap();
        assert!(
            other.try_lock("local/a").is_none(),
            "the other process is refused"
        );
        assert!(other.try_lock("local/b").is_some());
        drop(held);
        let again = other.try_lock("local/a").unwrap();
        assert!(one.try_lock("local/a").is_none());
        drop(again);
        let count = || std::fs::read_dir(tmp.path()).unwrap().count();
        assert_eq!(count(), 2, "lock files stay between calls");
        one.try_lock("local/a").unwrap().retire();
        one.try_lock("local/b").unwrap().retire();
        assert_eq!(count(), 0, "retired lock files go");
        assert!(
            other.try_lock("local/a").is_some(),
            "and are made again when needed"
        );
    }
}
