//! Small filesystem helpers every module shares: the one way Lanes writes a record.

use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

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
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(
        ".{name}.{}-{}.tmp",
        std::process::id(),
        TEMP.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(bytes)?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
