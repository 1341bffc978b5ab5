//! What a node mounts of an export, under `<data-dir>/nfs/<profile>`: the export once
//! (`mount: export`, the default; volumes are binds of their directory in it), or each
//! volume's `data` directory at `volumes/<dir>` (`mount: volume`).
//!
//! Rules: the mount helper runs in a process group of its own under the mount deadline and is
//! killed past it, so a dead server cannot hang the plugin nor hold up mounts of other
//! servers; a mount that no longer answers (ESTALE after a server restart, ENOTCONN, EIO, or
//! no answer within the probe deadline) is detached and made again.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::config::Scope;
use super::{DATA, Export};
use crate::lane::{Error, Result, VolumeId};
use crate::mount::health::{PROBE_DEADLINE, Probe, detach, probe};
use crate::mount::mountinfo;

/// One export on this node.
#[derive(Debug)]
pub struct NodeExport {
    /// The export as the userspace client reaches it (volume records, staged markers).
    pub export: Arc<Export>,
    /// `<data-dir>/nfs/<profile>`.
    base: PathBuf,
    /// Serializes mounting (not the volumes' calls, which only read the mounts).
    mounting: Mutex<()>,
}

/// One kernel mount: what is mounted, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub source: String,
    pub point: PathBuf,
}

impl NodeExport {
    pub fn new(data_dir: &Path, export: Arc<Export>) -> NodeExport {
        NodeExport {
            base: data_dir.join("nfs").join(&export.profile),
            export,
            mounting: Mutex::new(()),
        }
    }

    pub fn profile(&self) -> &str {
        &self.export.profile
    }

    pub fn scope(&self) -> Scope {
        self.export.config.mount
    }

    /// How errors name the server.
    pub fn what(&self) -> &str {
        self.export.client.what()
    }

    /// The mount that serves volume `id` on this node.
    pub fn unit(&self, id: &VolumeId) -> Unit {
        let config = &self.export.config;
        match config.mount {
            Scope::Export => Unit {
                source: config.source(),
                point: self.base.clone(),
            },
            Scope::Volume => Unit {
                source: config.source_of(&format!("{}/{DATA}", self.export.volume(id))),
                point: self.base.join("volumes").join(id.dir()),
            },
        }
    }

    /// The directory pods see of volume `id`, in this node's mount.
    pub fn data_path(&self, id: &VolumeId) -> PathBuf {
        match self.scope() {
            Scope::Export => self.base.join(self.export.volume(id)).join(DATA),
            Scope::Volume => self.unit(id).point,
        }
    }

    /// Makes sure the mount serving `id` answers, mounting it again when it does not, and
    /// when it is missing too if `make` (a stage; a volume's own mount is otherwise made only
    /// by staging it). Whether it was mounted just now (every bind of an earlier mount may
    /// then be stale).
    pub fn ensure_mounted(&self, id: &VolumeId, make: bool, deadline: Duration) -> Result<bool> {
        let _mounting = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        let unit = self.unit(id);
        let point = unit.point.as_path();
        let table = mountinfo::read_for(&[point]).map_err(Error::io("read the mount table"))?;
        let stacked = mountinfo::at(&table, point).len();
        if stacked == 0 && !make {
            return Ok(false);
        }
        if stacked > 0 {
            let why = match probe(point) {
                Ok(_) => return Ok(false),
                Err(Probe::Missing) => "its mount point is gone".to_owned(),
                Err(Probe::Failed(why)) => why,
            };
            tracing::warn!(server = %self.what(), point = %point.display(), %why, "an NFS mount does not answer; mounting it again");
            for _ in 0..stacked {
                detach(point).map_err(Error::io("detach the dead NFS mount"))?;
            }
        }
        std::fs::create_dir_all(point).map_err(Error::io(format!("create {}", point.display())))?;
        self.run_mount(&unit, deadline)?;
        match probe(point) {
            Ok(_) => {
                tracing::info!(server = %self.what(), source = unit.source, point = %point.display(), "mounted");
                Ok(true)
            }
            Err(Probe::Missing) => Err(self.unavailable("the mount point vanished".into())),
            Err(Probe::Failed(why)) => {
                Err(self.unavailable(format!("mounted, but the mount does not answer: {why}")))
            }
        }
    }

    /// Takes away the mount of a volume no longer staged here (`mount: volume`; the export's
    /// one mount stays). An unmount that does not finish within the probe deadline (a dead
    /// server) becomes a lazy detach.
    pub fn release(&self, id: &VolumeId) -> Result<()> {
        if self.scope() != Scope::Volume {
            return Ok(());
        }
        let _mounting = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        let point = self.unit(id).point;
        let table = mountinfo::read_for(&[&point]).map_err(Error::io("read the mount table"))?;
        for _ in mountinfo::at(&table, &point) {
            let (tx, rx) = std::sync::mpsc::channel();
            let target = point.clone();
            std::thread::spawn(move || {
                let _ = tx.send(nix::mount::umount2(
                    &target,
                    nix::mount::MntFlags::UMOUNT_NOFOLLOW,
                ));
            });
            match rx.recv_timeout(PROBE_DEADLINE) {
                Ok(Ok(())) => {}
                _ => detach(&point).map_err(Error::io("detach the volume's NFS mount"))?,
            }
        }
        match std::fs::remove_dir(&point) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::io(format!("remove {}", point.display()))(e))
            }
            _ => Ok(()),
        }
    }

    fn unavailable(&self, said: String) -> Error {
        Error::Backend {
            what: self.what().to_owned(),
            said,
        }
    }

    /// The mount command's argument list for `unit`, after the program.
    pub fn mount_args(&self, unit: &Unit) -> Vec<String> {
        let config = &self.export.config;
        let mut args: Vec<String> = config.mount_command[1..].to_vec();
        args.extend([
            "-t".into(),
            "nfs".into(),
            "-o".into(),
            config.options(),
            unit.source.clone(),
            unit.point.display().to_string(),
        ]);
        args
    }

    /// Runs the mount helper for `unit`, killing its process group past `deadline`.
    fn run_mount(&self, unit: &Unit, deadline: Duration) -> Result<()> {
        let program = &self.export.config.mount_command[0];
        let child = Command::new(program)
            .args(self.mount_args(unit))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(|e| self.unavailable(format!("cannot run {program}: {e}")))?;
        let group = nix::unistd::Pid::from_raw(child.id() as i32);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let output = match rx.recv_timeout(deadline) {
            Ok(output) => output.map_err(|e| self.unavailable(format!("{program}: {e}")))?,
            Err(_) => {
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                // Reaped by the waiting thread once the kernel lets it go.
                let _ = rx.recv_timeout(Duration::from_secs(2));
                // A mount that completed as it was killed must not linger half-checked.
                let _ = detach(&unit.point);
                return Err(self.unavailable(format!(
                    "mount did not finish within {}s and was killed; the server may be down \
                     or unreachable from this node",
                    deadline.as_secs()
                )));
            }
        };
        if !output.status.success() {
            let said = String::from_utf8_lossy(&output.stderr);
            let said: String = said.trim().chars().take(500).collect();
            return Err(self.unavailable(format!("mount failed ({}): {said}", output.status)));
        }
        Ok(())
    }
}
