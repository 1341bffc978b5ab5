//! Filesystems on block volumes: made once, grown when the volume grows.
//!
//! Rules: a volume is formatted only while `formatted.json` is absent from its directory, and
//! that record is written only after mkfs has finished, so a formatted volume is never
//! formatted again. A device whose first MiB holds anything is not formatted either (a volume
//! used as a raw block device, or restored from one), unless `formatting` says a killed mkfs
//! of Lanes' own wrote it: then the retry formats again, which loses nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::fsutil::{Durability, atomic_write};
use crate::lane::FsType;

const RECORD: &str = "formatted.json";
/// Written before mkfs starts, removed after the record: a crash in between is ours.
const INTENT: &str = "formatting";
/// How much of the device's head is looked at for earlier contents.
const HEAD_BYTES: usize = 1 << 20;

/// The filesystem a volume carries, and the size it was last grown to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formatted {
    pub fs_type: FsType,
    /// Bytes of the device the filesystem spans.
    pub bytes: u64,
}

/// Failures of formatting and growing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{program} failed on {device}: {output}")]
    Tool {
        program: &'static str,
        device: String,
        output: String,
    },
    #[error(
        "the volume holds data Lanes did not format (it was used as a raw block device); \
         Lanes will not format it: publish it with volumeMode Block, or wipe it first"
    )]
    HasData,
    #[error(
        "the volume is already formatted as {has}; it cannot be staged as {asked} (ask for \
         {has}, or leave fsType unset)"
    )]
    OtherFs {
        has: &'static str,
        asked: &'static str,
    },
}

fn record_path(volume_dir: &Path) -> PathBuf {
    volume_dir.join(RECORD)
}

/// The volume's filesystem record, if it was formatted.
pub fn formatted(volume_dir: &Path) -> Result<Option<Formatted>, Error> {
    match std::fs::read(record_path(volume_dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::Io(std::io::Error::other(format!("{RECORD}: {e}")))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Writes the record durably.
pub fn record(volume_dir: &Path, formatted: Formatted) -> Result<(), Error> {
    let body = serde_json::to_vec(&formatted).map_err(std::io::Error::other)?;
    atomic_write(&record_path(volume_dir), &body, Durability::Synced)?;
    Ok(())
}

/// The filesystem on `device`: the recorded one (which must be `asked` when a type is asked),
/// or a new one of `asked` made now.
pub fn ensure(
    volume_dir: &Path,
    device: &Path,
    device_bytes: u64,
    asked: FsType,
    explicit: bool,
) -> Result<Formatted, Error> {
    if let Some(done) = formatted(volume_dir)? {
        if explicit && done.fs_type != asked {
            return Err(Error::OtherFs {
                has: done.fs_type.as_str(),
                asked: asked.as_str(),
            });
        }
        return Ok(done);
    }
    let intent = volume_dir.join(INTENT);
    if !intent.exists() && !head_is_empty(device)? {
        return Err(Error::HasData);
    }
    atomic_write(&intent, asked.as_str().as_bytes(), Durability::Synced)?;
    // No discard: it would punch holes into a thick image and make it thin.
    match asked {
        FsType::Xfs => run("mkfs.xfs", &["-f", "-q", "-K"], device)?,
        FsType::Ext4 => run(
            "mkfs.ext4",
            &["-F", "-q", "-E", "nodiscard,lazy_itable_init=1"],
            device,
        )?,
    }
    let done = Formatted {
        fs_type: asked,
        bytes: device_bytes,
    };
    record(volume_dir, done)?;
    std::fs::remove_file(&intent)?;
    Ok(done)
}

/// True when the first MiB of `device` is all zeros (nothing was ever written there).
fn head_is_empty(device: &Path) -> Result<bool, Error> {
    use std::io::Read;
    let mut head = Vec::with_capacity(HEAD_BYTES);
    std::fs::File::open(device)?
        .take(HEAD_BYTES as u64)
        .read_to_end(&mut head)?;
    Ok(head.iter().all(|&b| b == 0))
}

/// Mount options a filesystem of `fs_type` gets: xfs volumes restored from a snapshot share
/// their UUID, so xfs mounts never check it.
pub fn mount_data(fs_type: FsType) -> &'static str {
    match fs_type {
        FsType::Xfs => "nouuid",
        FsType::Ext4 => "",
    }
}

/// Grows a mounted xfs at `mount_point` to its device's size.
pub fn grow_xfs(mount_point: &Path) -> Result<(), Error> {
    run("xfs_growfs", &["-d"], mount_point)
}

/// Grows an unmounted ext4 on `device` (checked first, as resize2fs requires).
pub fn grow_ext4_offline(device: &Path) -> Result<(), Error> {
    run("e2fsck", &["-f", "-p"], device)?;
    run("resize2fs", &[], device)
}

/// Grows a mounted ext4 on `device` online (needs CAP_SYS_RESOURCE).
pub fn grow_ext4_online(device: &Path) -> Result<(), Error> {
    run("resize2fs", &[], device)
}

fn run(program: &'static str, args: &[&str], target: &Path) -> Result<(), Error> {
    let output = Command::new(program)
        .args(args)
        .arg(target)
        .output()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("run {program}: {e} (is it installed on this node?)"),
            )
        })?;
    // e2fsck exits 1 when it corrected something: the filesystem is then fine to grow.
    if output.status.success() || (program == "e2fsck" && output.status.code() == Some(1)) {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
    if text.trim().is_empty() {
        text = String::from_utf8_lossy(&output.stdout).into_owned();
    }
    Err(Error::Tool {
        program,
        device: target.display().to_string(),
        output: crate::text::Shown(text.trim()).to_string(),
    })
}
