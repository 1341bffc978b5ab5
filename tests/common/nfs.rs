//! A real NFS server for tests: nfs-ganesha (VFS) with its rpcbind, in a network namespace of
//! the test's own (a veth pair with addresses of its own, rpcbind's /run private), so runs
//! never collide. The host reaches it at [`Ganesha::addr`].
//!
//! This kernel has no NFS client, so the node's mount helper is a stand-in
//! ([`Ganesha::standin`]): it logs the exact arguments the node passed and serves the
//! export's directory — the very bytes ganesha serves — through bindfs, a FUSE mount that
//! stops answering (ENOTCONN) when its process dies, as a dead NFS mount does.

use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A running (or stopped) ganesha serving one export.
pub struct Ganesha {
    pub dir: tempfile::TempDir,
    netns: String,
    host_if: String,
    addr: String,
    server: Option<Child>,
}

/// Whether the programs are here; `None` after saying so (a failure in CI).
fn programs(test: &str) -> bool {
    let missing: Vec<&str> = ["ganesha.nfsd", "rpcbind", "bindfs", "ip"]
        .into_iter()
        .filter(|p| {
            !["/usr/bin", "/usr/sbin", "/bin", "/sbin"]
                .iter()
                .any(|d| Path::new(d).join(p).exists())
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("{test}: {missing:?} not installed; scripts/test.sh installs them");
    }
    eprintln!("SKIPPED {test}: {missing:?} not installed (run scripts/test.sh)");
    false
}

fn run(args: &[&str]) {
    let status = Command::new(args[0]).args(&args[1..]).status().unwrap();
    assert!(status.success(), "{args:?}: {status}");
}

impl Ganesha {
    /// A server in a fresh namespace, ready to answer; `None` when it cannot run here.
    pub fn start(test: &str) -> Option<Ganesha> {
        if !super::privileged(test) || !programs(test) {
            return None;
        }
        // Names and a /30 unique to this process and call.
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let unique = (std::process::id() % 10_000) * 16 + n % 16;
        let netns = format!("lanes-nfs-{unique}");
        let host_if = format!("lnfs{unique}a");
        let peer_if = format!("lnfs{unique}b");
        let block = unique % (64 * 256);
        let (b, c) = (block / 64, (block % 64) * 4);
        let host_ip = format!("10.{}.{b}.{}", 200 + (unique / (64 * 256)) % 50, c + 1);
        let addr = format!("10.{}.{b}.{}", 200 + (unique / (64 * 256)) % 50, c + 2);
        let _ = Command::new("ip")
            .args(["netns", "del", &netns])
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &host_if])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &netns]);
        run(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        run(&["ip", "link", "set", &peer_if, "netns", &netns]);
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ]);
        run(&["ip", "link", "set", &host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &netns];
            all.extend_from_slice(args);
            run(&all);
        };
        inside(&["ip", "addr", "add", &format!("{addr}/30"), "dev", &peer_if]);
        inside(&["ip", "link", "set", &peer_if, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        let dir = tempfile::Builder::new()
            .prefix("lanes-nfs-")
            .tempdir()
            .unwrap();
        let export = dir.path().join("export");
        std::fs::create_dir_all(&export).unwrap();
        std::fs::create_dir_all(dir.path().join("recovery")).unwrap();
        std::fs::write(
            dir.path().join("ganesha.conf"),
            format!(
                "NFS_CORE_PARAM {{ Protocols = 3, 4; }}\n\
                 NFSV4 {{ RecoveryBackend = fs; RecoveryRoot = {recovery}; Graceless = true; }}\n\
                 EXPORT {{ Export_Id = 1; Path = {export}; Pseudo = {export}; \
                 Access_Type = RW; Squash = No_Root_Squash; SecType = sys; \
                 Protocols = 3, 4; Transports = TCP; FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = WARN; }}\n",
                recovery = dir.path().join("recovery").display(),
                export = export.display(),
            ),
        )
        .unwrap();
        let mut ganesha = Ganesha {
            dir,
            netns,
            host_if,
            addr,
            server: None,
        };
        ganesha.resume();
        Some(ganesha)
    }

    /// The server's address, as a profile names it.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The exported directory, as the server sees it (and the host: same files).
    pub fn export(&self) -> PathBuf {
        self.dir.path().join("export")
    }

    /// Starts the server (again) and waits until it answers on port 2049.
    pub fn resume(&mut self) {
        assert!(self.server.is_none(), "ganesha is running already");
        let dir = self.dir.path();
        // The private mount namespace (for rpcbind's own /run) starts as a copy of every mount
        // there is, other tests' volumes included; copies the server does not need are let
        // go at once, or they would keep those volumes' filesystems (and loop devices) busy
        // after the tests unmount them.
        let script = format!(
            "awk '$5 ~ \"^/tmp/\" {{print $5}}' /proc/self/mountinfo | sort -r | \
             xargs -r -n1 umount -l 2>/dev/null; \
             mount -t tmpfs tmpfs /run && mkdir -p /run/rpcbind && rpcbind -w -f & \
             sleep 0.2; exec ganesha.nfsd -F -f {conf} -L {log} -p {pid} -N NIV_WARN",
            conf = dir.join("ganesha.conf").display(),
            log = dir.join("ganesha.log").display(),
            pid = dir.join("ganesha.pid").display(),
        );
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "unshare",
                "-m",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        self.server = Some(child);
        let target: SocketAddr = format!("{}:2049", self.addr).parse().unwrap();
        let started = Instant::now();
        while TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "ganesha did not answer on {target}: {}",
                std::fs::read_to_string(dir.join("ganesha.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (and its rpcbind): the export stops answering.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
        // Whatever else runs in the namespace (rpcbind forked away) goes too.
        if let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.netns])
            .output()
        {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    /// A mount helper for the node (see the module's doc); `hang` makes one that never
    /// finishes, as `mount.nfs` does against a server that does not answer. The exact
    /// arguments of each call are appended to [`Ganesha::mount_log`].
    pub fn standin(&self, hang: bool) -> PathBuf {
        let name = if hang {
            "mount-hung.sh"
        } else {
            "mount-standin.sh"
        };
        let path = self.dir.path().join(name);
        let body = if hang {
            "exec sleep 6017\n".to_owned()
        } else {
            "while [ $# -gt 2 ]; do shift; done\nexec bindfs \"${1#*:}\" \"$2\"\n".to_owned()
        };
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho \"$*\" >> {log}\n{body}",
                log = self.mount_log().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        path
    }

    /// Where the stand-ins log their arguments, a call per line.
    pub fn mount_log(&self) -> PathBuf {
        self.dir.path().join("mounts.log")
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(Stdio::null())
            .status();
    }
}

/// Kills every stand-in (bindfs) serving `export`, as a crash of the NFS client's
/// connection would: their mounts then answer ENOTCONN. How many were killed.
pub fn kill_standins(export: &Path) -> usize {
    let mut killed = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("bindfs"))
            && args.iter().any(|a| Path::new(a) == export)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed += 1;
        }
    }
    killed
}
