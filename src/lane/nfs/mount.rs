//! The node's one kernel mount of each export, at `<data-dir>/nfs/<profile>`; volumes are
//! binds of their directory in it.
//!
//! Rules: the mount helper runs in a process group of its own under the mount deadline and is
//! killed past it, so a dead server cannot hang the plugin nor hold up mounts of other
//! servers; a mount that no longer answers (ESTALE after a server restart, ENOTCONN, EIO, or
//! no answer within the probe deadline) is detached and made again.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use super::DATA;
use super::config::Nfs;
use crate::lane::{Error, Result, VolumeId};
use crate::mount::health::{Probe, detach, probe, split};
use crate::mount::mountinfo;

/// One export on this node.
#[derive(Debug)]
pub struct NodeExport {
    pub profile: String,
    pub config: Nfs,
    point: PathBuf,
    /// Serializes mounting (not the volumes' calls, which only read the mount).
    mounting: Mutex<()>,
}

impl NodeExport {
    pub fn new(data_dir: &Path, profile: &str, config: Nfs) -> NodeExport {
        NodeExport {
            profile: profile.to_owned(),
            config,
            point: data_dir.join("nfs").join(profile),
            mounting: Mutex::new(()),
        }
    }

    /// How errors name the server.
    pub fn what(&self) -> String {
        format!(
            "NFS server {} (profile {})",
            self.config.source(),
            self.profile
        )
    }

    /// Where the export is mounted on this node.
    pub fn mount_point(&self) -> &Path {
        &self.point
    }

    /// The directory pods see of volume `id`, in this node's mount.
    pub fn data_path(&self, id: &VolumeId) -> PathBuf {
        self.point
            .join(&self.config.prefix)
            .join(id.dir())
            .join(DATA)
    }

    /// The marker saying node `node` has volume `id` staged.
    pub fn marker(&self, id: &VolumeId, node: &str) -> PathBuf {
        self.point
            .join(&self.config.prefix)
            .join(id.dir())
            .join(super::STAGED)
            .join(node)
    }

    /// Makes sure the export is mounted here and answers: its device, and whether it was
    /// mounted just now (every bind of an earlier mount may then be stale).
    pub fn ensure_mounted(&self, deadline: Duration) -> Result<((u32, u32), bool)> {
        let _mounting = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        let point = self.point.as_path();
        let table = mountinfo::read_for(&[point]).map_err(Error::io("read the mount table"))?;
        let stacked = mountinfo::at(&table, point).len();
        if stacked > 0 {
            let why = match probe(point) {
                Ok(probed) => return Ok((split(probed.dev), false)),
                Err(Probe::Missing) => "its mount point is gone".to_owned(),
                Err(Probe::Failed(why)) => why,
            };
            tracing::warn!(server = %self.what(), %why, "the export's mount does not answer; mounting it again");
            for _ in 0..stacked {
                detach(point).map_err(Error::io("detach the dead NFS mount"))?;
            }
        }
        std::fs::create_dir_all(point).map_err(Error::io(format!("create {}", point.display())))?;
        self.run_mount(deadline)?;
        match probe(point) {
            Ok(probed) => {
                tracing::info!(server = %self.what(), point = %point.display(), "export mounted");
                Ok((split(probed.dev), true))
            }
            Err(Probe::Missing) => Err(self.unavailable("the mount point vanished".into())),
            Err(Probe::Failed(why)) => {
                Err(self.unavailable(format!("mounted, but the mount does not answer: {why}")))
            }
        }
    }

    fn unavailable(&self, said: String) -> Error {
        Error::Backend {
            what: self.what(),
            said,
        }
    }

    /// The mount command's argument list, after the program.
    pub fn mount_args(&self) -> Vec<String> {
        let mut args: Vec<String> = self.config.mount_command[1..].to_vec();
        args.extend([
            "-t".into(),
            "nfs".into(),
            "-o".into(),
            self.config.options(),
            self.config.source(),
            self.point.display().to_string(),
        ]);
        args
    }

    /// Runs the mount helper, killing its process group past `deadline`.
    fn run_mount(&self, deadline: Duration) -> Result<()> {
        let program = &self.config.mount_command[0];
        let child = Command::new(program)
            .args(self.mount_args())
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
                let _ = detach(&self.point);
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
