//! One JuiceFS file system as this process sees it: its `juicefs` commands (format, quota,
//! rmr), and its one FUSE mount at `<data-dir>/juicefs/<profile>/mnt`.
//!
//! Rules: every `juicefs` run has a deadline and is killed past it; secrets go to it through
//! its environment only; the FUSE process is started in its own cgroup
//! (`<cgroup2>/lanes.fuse/<profile>-<id>`), so killing the plugin's cgroup (a container
//! restart) leaves every mount working; a mount whose FUSE process died (ENOTCONN) is
//! detached and mounted again.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::config::JuiceFs;
use crate::lane::{Error, Result};
use crate::mount::health::{Probe, Probed, detach, probe, split};

/// How long one `juicefs` admin command may take.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// The state of a file system's mount in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountState {
    /// Answering; the device numbers of the FUSE connection.
    Alive((u32, u32)),
    /// Nothing mounted at the mount point.
    Missing,
    /// Mounted, but the FUSE process is gone or hung.
    Dead(String),
}

/// One `shared-rwx` profile's file system.
#[derive(Debug)]
pub struct FileSystem {
    pub profile: String,
    pub config: JuiceFs,
    root: PathBuf,
    cgroup: String,
    mounting: Mutex<()>,
    formatted: AtomicBool,
    recovered: AtomicBool,
    /// The volume directories in the mount (the path never changes across remounts).
    dirs: std::sync::OnceLock<crate::lane::volumes::VolumeDirs>,
}

/// The cgroups of the FUSE processes the plugin on `data_dir` started (for clean-up).
pub fn fuse_cgroups(data_dir: &Path) -> Vec<PathBuf> {
    let id = format!("-{}", data_dir_id(data_dir));
    let Some(parent) = cgroup::path("") else {
        return Vec::new();
    };
    std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&id))
        .map(|e| e.path())
        .collect()
}

fn data_dir_id(data_dir: &Path) -> String {
    let digest = Sha256::digest(data_dir.as_os_str().as_encoded_bytes());
    digest.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

impl FileSystem {
    /// The file system of `profile` for a process serving the node role (or both roles) on
    /// `data_dir`.
    pub fn new(data_dir: &Path, profile: &str, config: JuiceFs) -> FileSystem {
        Self::for_role(data_dir, profile, config, false)
    }

    /// A controller-only process mounts apart from a node plugin sharing its data dir (its
    /// mounts are in its own container, and nothing of a pod's depends on them).
    pub fn for_role(
        data_dir: &Path,
        profile: &str,
        config: JuiceFs,
        controller_only: bool,
    ) -> FileSystem {
        let (dir, role) = match controller_only {
            true => ("juicefs-controller", "-controller"),
            false => ("juicefs", ""),
        };
        FileSystem {
            profile: profile.to_owned(),
            config,
            root: data_dir.join(dir).join(profile),
            cgroup: format!("{profile}-{}{role}", data_dir_id(data_dir)),
            mounting: Mutex::new(()),
            formatted: AtomicBool::new(false),
            recovered: AtomicBool::new(false),
            dirs: std::sync::OnceLock::new(),
        }
    }

    /// Where this process mounts the file system.
    pub fn mount_point(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// The directory of the volumes, in the mount.
    pub fn volumes_dir(&self) -> PathBuf {
        self.mount_point().join(&self.config.prefix)
    }

    /// Where retained and archived volumes go, in the mount (beside the volumes).
    pub fn retained_dir(&self) -> PathBuf {
        self.mount_point()
            .join(format!("{}-retained", self.config.prefix))
    }

    /// The FUSE process's log.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("mount.log")
    }

    /// The volume directories, opened by `open` the first time.
    pub fn volume_dirs(
        &self,
        open: impl FnOnce() -> Result<crate::lane::volumes::VolumeDirs>,
    ) -> Result<&crate::lane::volumes::VolumeDirs> {
        if let Some(dirs) = self.dirs.get() {
            return Ok(dirs);
        }
        let dirs = open()?;
        Ok(self.dirs.get_or_init(|| dirs))
    }

    /// Runs `f` once per process after the first successful mount (leftover clean-up).
    pub fn recover_once(&self, f: impl FnOnce() -> Result<()>) -> Result<()> {
        if self.recovered.load(Ordering::Acquire) {
            return Ok(());
        }
        f()?;
        self.recovered.store(true, Ordering::Release);
        Ok(())
    }

    /// A `juicefs` command with the secrets it needs in its environment.
    fn command(&self) -> Command {
        let mut command = Command::new(&self.config.binary);
        command.args(["--no-agent", "--no-color"]);
        for (name, var) in [
            ("META_PASSWORD", &self.config.meta_password_env),
            ("ACCESS_KEY", &self.config.access_key_env),
            ("SECRET_KEY", &self.config.secret_key_env),
        ] {
            command.env_remove(name);
            if let Some(value) = var.as_ref().and_then(std::env::var_os) {
                command.env(name, value);
            }
        }
        command.stdin(Stdio::null());
        command
    }

    /// Runs `juicefs <args>` under the deadline; its stdout, or an error with what it said.
    fn run(&self, what: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
        let mut command = self.command();
        command.args(args);
        let output = run_within(command).map_err(|e| self.failure(what, &e.to_string()))?;
        if !output.status.success() {
            return Err(self.failure(what, &said(&output.stderr)));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn failure(&self, what: &str, said: &str) -> Error {
        Error::Backend {
            what: format!("JuiceFS file system of profile {}: {what}", self.profile),
            said: said.to_owned(),
        }
    }

    /// Formats the file system when it is new and the profile allows it (once per process).
    pub fn ensure_formatted(&self) -> Result<()> {
        if self.formatted.load(Ordering::Acquire) {
            return Ok(());
        }
        let meta = self.config.meta_url.as_str();
        if self.config.format
            && let Some(db) = meta.strip_prefix("sqlite3://")
            && let Some(dir) = Path::new(db.split('?').next().unwrap_or(db)).parent()
        {
            // A new sqlite3 file system: its database's directory may not exist yet.
            std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
        }
        match self.run("read its status", &[os("status"), os(meta)]) {
            Ok(_) => {}
            Err(Error::Backend { said, .. })
                if self.config.format && said.contains("not formatted") =>
            {
                let (Some(storage), Some(bucket)) = (&self.config.storage, &self.config.bucket)
                else {
                    unreachable!("validated: format needs storage and bucket");
                };
                tracing::info!(profile = %self.profile, "formatting the new JuiceFS file system");
                self.run(
                    "format it",
                    &[
                        os("format"),
                        os("--storage"),
                        os(storage),
                        os("--bucket"),
                        os(bucket),
                        os(meta),
                        os(&self.config.name),
                    ],
                )?;
            }
            Err(Error::Backend { said, .. }) if said.contains("not formatted") => {
                return Err(self.failure(
                    "use it",
                    "it is not formatted; run `juicefs format` or set `format: true` in the profile",
                ));
            }
            Err(e) => return Err(e),
        }
        self.formatted.store(true, Ordering::Release);
        Ok(())
    }

    /// Used and available bytes, from the metadata engine (`juicefs status`).
    pub fn status(&self) -> Result<(u64, u64)> {
        let out = self.run(
            "read its status",
            &[os("status"), os(&self.config.meta_url)],
        )?;
        let value: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| self.failure("read its status", &e.to_string()))?;
        let stat = &value["Stat"];
        Ok((
            stat["UsedSpace"].as_u64().unwrap_or(0),
            stat["AvailableSpace"].as_u64().unwrap_or(0),
        ))
    }

    /// The path of `dir` (in this process's mount) inside the file system.
    pub fn inside(&self, dir: &Path) -> Result<PathBuf> {
        dir.strip_prefix(self.mount_point())
            .map(|rest| Path::new("/").join(rest))
            .map_err(|_| {
                Error::Unsupported(format!(
                    "{} is not in the mount of profile {}",
                    dir.display(),
                    self.profile
                ))
            })
    }

    /// Sets the quota of `dir` to `bytes` (a whole number of MiB).
    pub fn set_quota(&self, dir: &Path, bytes: u64) -> Result<()> {
        let path = self.inside(dir)?;
        let capacity = format!("{}M", bytes >> 20);
        self.run(
            "set a quota",
            &[
                os("quota"),
                os("set"),
                os(&self.config.meta_url),
                os("--path"),
                path.as_os_str(),
                os("--capacity"),
                os(&capacity),
            ],
        )
        .map(drop)
    }

    /// Removes the quota of `dir` (none is fine).
    pub fn delete_quota(&self, dir: &Path) -> Result<()> {
        let path = self.inside(dir)?;
        match self.run(
            "remove a quota",
            &[
                os("quota"),
                os("delete"),
                os(&self.config.meta_url),
                os("--path"),
                path.as_os_str(),
            ],
        ) {
            // Gone already: no directory, no quota.
            Err(Error::Backend { said, .. }) if said.contains("no such file or directory") => {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// Removes `dir`, a directory of this mount, and everything in it (`juicefs rmr`).
    pub fn remove_tree(&self, dir: &Path) -> Result<()> {
        self.inside(dir)?;
        match std::fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Ok(meta) if !meta.is_dir() => {
                return Err(Error::Unsupported(format!(
                    "{} is not a directory; refusing to remove it",
                    dir.display()
                )));
            }
            _ => {}
        }
        self.run("remove a volume", &[os("rmr"), dir.as_os_str()])
            .map(drop)
    }

    /// What is mounted at the mount point, probed with a stat and a statfs under a deadline
    /// (no mount-table read: this runs on every call).
    pub fn state(&self) -> Result<MountState> {
        let point = self.mount_point();
        let parent = std::fs::metadata(&self.root).map(|m| m.dev()).ok();
        Ok(match probe(&point) {
            Ok(Probed { dev, .. }) if Some(dev) == parent => MountState::Missing,
            Ok(Probed { fuse: true, dev }) => MountState::Alive(split(dev)),
            Ok(Probed { fuse: false, .. }) => {
                return Err(Error::Unsupported(format!(
                    "{} holds a mount that is not Lanes' JuiceFS mount; unmount it",
                    point.display()
                )));
            }
            Err(Probe::Missing) => MountState::Missing,
            Err(Probe::Failed(why)) => MountState::Dead(why),
        })
    }

    /// Mounts the file system unless it is mounted and answering; a dead mount is detached
    /// first. The device of the live mount, and whether this call mounted it.
    pub fn ensure_mounted(&self) -> Result<((u32, u32), bool)> {
        let _one = self.mounting.lock().unwrap_or_else(|e| e.into_inner());
        match self.state()? {
            MountState::Alive(device) => return Ok((device, false)),
            MountState::Dead(why) => {
                tracing::warn!(profile = %self.profile, %why, "JuiceFS mount is dead; mounting it again");
                detach(&self.mount_point()).map_err(Error::io("detach the dead JuiceFS mount"))?;
            }
            MountState::Missing => {}
        }
        self.ensure_formatted()?;
        self.mount()?;
        match self.state()? {
            MountState::Alive(device) => Ok((device, true)),
            other => Err(self.failure(
                "mount it",
                &format!(
                    "juicefs mount returned but the mount is {other:?}; see {}",
                    self.log_path().display()
                ),
            )),
        }
    }

    /// Starts `juicefs mount -d` in the file system's own cgroup and waits until it is ready.
    fn mount(&self) -> Result<()> {
        let point = self.mount_point();
        let cache = self.root.join("cache");
        for dir in [&point, &cache] {
            std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
        }
        let cache_mib = (self.config.cache_bytes >> 20).max(1).to_string();
        let buffer_mib = (self.config.buffer_bytes >> 20).max(1).to_string();
        let heartbeat = format!("{}s", self.config.heartbeat_seconds);
        let log = self.log_path();
        let mut command = self.command();
        command
            .arg("mount")
            .arg(&self.config.meta_url)
            .arg(&point)
            .args(["-d", "--no-usage-report", "--cache-dir"])
            .arg(&cache)
            .args(["--cache-size", &cache_mib, "--buffer-size", &buffer_mib])
            .args(["--heartbeat", &heartbeat, "--log"])
            .arg(&log)
            .args(&self.config.mount_options);
        let cgroup = cgroup::Placement::prepare(&self.cgroup);
        if let Err(why) = &cgroup {
            tracing::warn!(profile = %self.profile, %why, "the JuiceFS mount runs in the plugin's own cgroup: a restart of the plugin's container will stop it");
        }
        let cgroup = cgroup.ok();
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setsid, setns, write) on descriptors opened before
        // the fork.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid().map_err(std::io::Error::from)?;
                if let Some(cgroup) = &cgroup {
                    cgroup.enter()?;
                }
                Ok(())
            });
        }
        // The daemon keeps what it inherits open: its first words go to a file, not a pipe.
        let errors = self.root.join("mount.err");
        let file = std::fs::File::create(&errors)
            .map_err(Error::io(format!("create {}", errors.display())))?;
        command.stdout(Stdio::null()).stderr(file);
        let status = wait_within(command.spawn().map_err(Error::io("start juicefs mount"))?)
            .map_err(|e| self.failure("mount it", &e.to_string()))?;
        if !status.success() {
            let stderr = std::fs::read(&errors).unwrap_or_default();
            return Err(self.failure(
                "mount it",
                &format!("{} (log: {})", said(&stderr), log.display()),
            ));
        }
        Ok(())
    }

    /// The cgroup the FUSE process runs in, when it has one of its own.
    pub fn cgroup_path(&self) -> Option<PathBuf> {
        cgroup::path(&self.cgroup)
    }
}

fn os(text: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(text)
}

/// The last error JuiceFS printed, without its timestamp and source location.
fn said(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains("<FATAL>") || l.contains("<ERROR>"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or("no output");
    let message = line.split_once(">: ").map_or(line, |(_, m)| m);
    let message = message.rsplit_once(" [").map_or(message, |(m, _)| m).trim();
    crate::text::bounded(message, 512)
}

/// Runs `command` to completion, killing it past [`COMMAND_DEADLINE`].
fn run_within(mut command: Command) -> std::io::Result<std::process::Output> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn()?;
    let (mut out, mut err) = (child.stdout.take(), child.stderr.take());
    let readers = std::thread::spawn(move || {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        if let Some(out) = out.as_mut() {
            let _ = out.read_to_end(&mut stdout);
        }
        if let Some(err) = err.as_mut() {
            let _ = err.read_to_end(&mut stderr);
        }
        (stdout, stderr)
    });
    let status = wait_within(child)?;
    let (stdout, stderr) = readers.join().unwrap_or_default();
    Ok(std::process::Output {
        status,
        stdout,
        stderr,
    })
}

/// Waits for `child` under [`COMMAND_DEADLINE`], killing it past that.
fn wait_within(mut child: std::process::Child) -> std::io::Result<std::process::ExitStatus> {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if started.elapsed() > COMMAND_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            return Err(std::io::Error::other(format!(
                "juicefs did not finish within {}s and was killed",
                COMMAND_DEADLINE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cgroup (v2) each FUSE process is started in.
mod cgroup {
    use std::fs::File;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::path::PathBuf;

    const PARENT: &str = "lanes.fuse";

    /// The cgroup2 hierarchy to use: `LANES_HOST_CGROUP` (the host's, mounted into the node
    /// plugin's container), else the first cgroup2 mount in the mount table.
    fn root() -> Option<PathBuf> {
        if let Some(host) = std::env::var_os("LANES_HOST_CGROUP") {
            return Some(PathBuf::from(host));
        }
        let table = crate::mount::mountinfo::read().ok()?;
        table
            .into_iter()
            .find(|e| e.fs_type == "cgroup2")
            .map(|e| e.mount_point)
    }

    /// The cgroup called `name` under `lanes.fuse`.
    pub fn path(name: &str) -> Option<PathBuf> {
        root().map(|root| root.join(PARENT).join(name))
    }

    /// Descriptors, opened before the fork, that move the child into its cgroup.
    #[derive(Debug)]
    pub struct Placement {
        procs: File,
        /// The host's cgroup namespace, when the plugin runs in another one.
        namespace: Option<File>,
    }

    impl Placement {
        pub fn prepare(name: &str) -> Result<Placement, String> {
            let dir = path(name).ok_or("no cgroup2 hierarchy is mounted")?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("create cgroup {}: {e}", dir.display()))?;
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| format!("open {}/cgroup.procs: {e}", dir.display()))?;
            let ours = std::fs::metadata("/proc/self/ns/cgroup");
            let hosts = std::fs::metadata("/proc/1/ns/cgroup");
            use std::os::unix::fs::MetadataExt;
            let namespace = match (ours, hosts) {
                (Ok(a), Ok(b)) if a.ino() != b.ino() => File::open("/proc/1/ns/cgroup").ok(),
                _ => None,
            };
            Ok(Placement { procs, namespace })
        }

        /// In the child: joins the host's cgroup namespace if needed, then the cgroup.
        pub fn enter(&self) -> std::io::Result<()> {
            if let Some(ns) = &self.namespace {
                nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWCGROUP)?;
            }
            (&self.procs).write_all(b"0")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn juicefs_errors_are_cut_to_their_message() {
        let stderr = b"2026/11/23 20:12:47.028287 juicefs[7428] <INFO>: Meta address: sqlite3:///x [NewClient@interface.go:645]\n\
2026/11/23 20:12:47.030266 juicefs[7428] <FATAL>: get status: load setting: database is not formatted, please run `juicefs format ...` first [status@status.go:84]\n";
        assert_eq!(
            said(stderr),
            "get status: load setting: database is not formatted, please run `juicefs format ...` first"
        );
        assert_eq!(said(b""), "no output");
    }
}
