//! The lane contract: one test body that every lane must pass, through the real binary over
//! its socket with real mounts (like tests/stores.rs for object stores). Each lane supplies a
//! [`Setup`] (config, data directory, profile, what it promises); this file runs the contract
//! against the local lane on a plain directory and on btrfs with quotas, and the fast-rwo
//! lane (ext4 on a loop device), the shared-rwx lane (JuiceFS) and the legacy-rwx lane (a
//! real NFS server for the controller; the node's mounts on a stand-in, see
//! tests/common/nfs.rs). The next lanes add a setup here.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lanes::cli::csi::{Clients, mount_capability};
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;
use tonic::Code;

/// How a lane is brought up for the contract.
struct Setup {
    name: &'static str,
    /// The plugin's config (YAML).
    config: String,
    /// Where the plugin keeps its data (`None`: a fresh temporary directory).
    data_dir: Option<PathBuf>,
    profile: &'static str,
    /// The lane enforces capacity: a write past it fails.
    enforces_capacity: bool,
    /// The size of the contract's volume, in bytes.
    unit: i64,
    /// Volumes live on one node and say which (shared lanes' volumes are reachable anywhere).
    node_local: bool,
}

const MIB: i64 = 1 << 20;

fn with_profile(mut request: CreateVolumeRequest, profile: &str) -> CreateVolumeRequest {
    request.parameters.insert("profile".into(), profile.into());
    request
}

fn write_mib(path: &Path, mib: usize) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    for _ in 0..mib {
        file.write_all(&[3u8; 1 << 20])?;
    }
    file.sync_all()
}

async fn bytes(c: &mut Clients, id: &str, path: &Path) -> VolumeUsage {
    nix::unistd::sync();
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    stats
        .usage
        .into_iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap()
}

/// One contract at a time (each test takes its turn before its setup): a lane's setup (a
/// server in a private mount namespace, a loop device) must not see another lane's volumes
/// mid-test.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The contract itself.
async fn contract(setup: Setup) {
    let plugin = match &setup.data_dir {
        Some(dir) => Plugin::with_config_at(&setup.config, dir),
        None => Plugin::with_config(&setup.config, None),
    };
    let name = setup.name;
    // Sizes are in units of the lane's smallest comfortable volume (32 MiB; xfs needs 300).
    let unit = setup.unit;
    let mut c = plugin.clients().await;
    let request = with_profile(create_request("pvc-contract", unit), setup.profile);

    // Create: idempotent by name; an incompatible repeat is ALREADY_EXISTS.
    let volume = c
        .controller
        .create_volume(request.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let again = c
        .controller
        .create_volume(request.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume, again, "{name}: a repeat returns the same volume");
    assert!(volume.capacity_bytes >= unit, "{name}");
    assert_eq!(
        !volume.accessible_topology.is_empty(),
        setup.node_local,
        "{name}: a node-local volume says where it lives"
    );
    let bigger = with_profile(create_request("pvc-contract", 2 * unit), setup.profile);
    assert_code(
        c.controller.create_volume(bigger).await,
        Code::AlreadyExists,
        name,
    );
    let id = volume.volume_id;
    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        listed
            .entries
            .iter()
            .any(|e| e.volume.as_ref().unwrap().volume_id == id),
        "{name}"
    );

    // Stage and publish read-write and read-only; data goes where it should.
    let staging = plugin.dir("contract-staging");
    let rw = plugin.dir("contract-pods").join("rw");
    let ro = plugin.dir("contract-pods").join("ro");
    for _ in 0..2 {
        c.node
            .node_stage_volume(stage_request(&id, &staging))
            .await
            .unwrap();
        c.node
            .node_publish_volume(publish_request(&id, &staging, &rw, false))
            .await
            .unwrap();
        c.node
            .node_publish_volume(publish_request(&id, &staging, &ro, true))
            .await
            .unwrap();
    }
    assert_eq!(mounts_at(&rw).len(), 1, "{name}: one mount per target");
    std::fs::write(rw.join("hello"), "from the pod").unwrap();
    assert_eq!(
        std::fs::read_to_string(ro.join("hello")).unwrap(),
        "from the pod"
    );
    let denied = std::fs::write(ro.join("nope"), "x").unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(nix::libc::EROFS), "{name}");

    // A single-writer mode holds across targets.
    let rwop = plugin.dir("contract-pods").join("rwop");
    let mut single = publish_request(&id, &staging, &rwop, false);
    single.volume_capability = Some(mount_capability(Mode::SingleNodeSingleWriter, &[]));
    assert_code(
        c.node.node_publish_volume(single).await,
        Code::FailedPrecondition,
        name,
    );

    // Capacity: enforced where the lane says so, reported either way.
    let usage = bytes(&mut c, &id, &rw).await;
    assert!(
        usage.total > 0 && usage.used >= 0 && usage.available >= 0,
        "{name}: {usage:?}"
    );
    if setup.enforces_capacity {
        // The volume's own limit: exactly it, or what a filesystem of that size offers.
        assert!(
            (unit * 8 / 10..=unit).contains(&usage.total),
            "{name}: the volume's own limit, not its host's: {usage:?}"
        );
        let err = write_mib(&rw.join("big"), (unit * 3 / 2 / MIB) as usize)
            .expect_err("a write past the capacity fails");
        assert!(
            matches!(
                err.raw_os_error(),
                Some(nix::libc::EDQUOT | nix::libc::ENOSPC)
            ),
            "{name}: {err}"
        );
        std::fs::remove_file(rw.join("big")).unwrap();
    }

    // Expansion never shrinks and, where enforced, lifts the limit.
    let expand = |bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let grown = c
        .controller
        .controller_expand_volume(expand(3 * unit))
        .await
        .unwrap()
        .into_inner();
    assert!(grown.capacity_bytes >= 3 * unit, "{name}");
    let same = c
        .controller
        .controller_expand_volume(expand(unit / 4))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        same.capacity_bytes, grown.capacity_bytes,
        "{name}: never shrinks"
    );
    // The CO finishes an expansion on the node (a lane with nothing to grow there says so).
    let node_grown = c
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: rw.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node_grown.capacity_bytes, grown.capacity_bytes, "{name}");
    if setup.enforces_capacity {
        write_mib(&rw.join("big"), (unit * 3 / 2 / MIB) as usize)
            .expect("the expanded volume takes it");
        let total = bytes(&mut c, &id, &rw).await.total;
        assert!(
            (3 * unit * 8 / 10..=3 * unit).contains(&total),
            "{name}: {total}"
        );
    }

    // Delete refuses while mounted; unpublish/unstage are idempotent; delete then works twice.
    assert_code(
        c.controller.delete_volume(delete_request(&id)).await,
        Code::FailedPrecondition,
        name,
    );
    for _ in 0..2 {
        for target in [&rw, &ro] {
            c.node
                .node_unpublish_volume(unpublish_request(&id, target))
                .await
                .unwrap();
        }
        c.node
            .node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
    }
    assert!(!rw.exists() && !ro.exists(), "{name}: targets removed");
    for _ in 0..2 {
        c.controller
            .delete_volume(delete_request(&id))
            .await
            .unwrap();
    }
    assert_code(
        c.node.node_stage_volume(stage_request(&id, &staging)).await,
        Code::NotFound,
        name,
    );
    let root = plugin.root.path().canonicalize().unwrap();
    // A shared file system's (or export's) one mount per node stays: it serves every volume.
    let lasting = [plugin.data_dir.join("juicefs"), plugin.data_dir.join("nfs")];
    let stray: Vec<_> = lanes::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.mount_point.starts_with(&root)
                && !lasting.iter().any(|l| e.mount_point.starts_with(l))
        })
        .collect();
    assert!(stray.is_empty(), "{name}: stray mounts {stray:?}");
}

#[tokio::test]
async fn the_local_lane_on_a_plain_directory() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !privileged("lane contract: local") {
        return;
    }
    contract(Setup {
        name: "local (plain directory)",
        config: "profiles:\n  scratch:\n    lane: local\n    default: true\n".into(),
        data_dir: None,
        profile: "scratch",
        enforces_capacity: false,
        unit: 32 * MIB,
        node_local: true,
    })
    .await;
}

/// A btrfs image with quotas on, mounted for the test; unmounted on drop.
struct Btrfs {
    dir: tempfile::TempDir,
}

impl Btrfs {
    fn mount() -> Result<Btrfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("lanes-contract-btrfs-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(768 << 20)
            .unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| -> Result<(), String> {
            let out = Command::new(program)
                .args(args)
                .output()
                .map_err(|e| format!("{program}: {e}"))?;
            out.status
                .success()
                .then_some(())
                .ok_or_else(|| format!("{program}: {}", String::from_utf8_lossy(&out.stderr)))
        };
        let mnt = dir.path().join("mnt");
        run("mkfs.btrfs", &["-q".as_ref(), image.as_os_str()])?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mnt.as_os_str(),
            ],
        )?;
        run(
            "btrfs",
            &["quota".as_ref(), "enable".as_ref(), mnt.as_os_str()],
        )?;
        Ok(Btrfs { dir })
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path().join("mnt"))
            .status();
    }
}

#[tokio::test]
async fn the_local_lane_on_btrfs_with_quotas() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !privileged("lane contract: local on btrfs") {
        return;
    }
    let btrfs = match Btrfs::mount() {
        Ok(btrfs) => btrfs,
        Err(why) if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("the btrfs lane contract cannot run here: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED lane contract on btrfs: {why}");
            return;
        }
    };
    contract(Setup {
        name: "local (btrfs)",
        config: String::new(),
        data_dir: Some(btrfs.dir.path().join("mnt/lanes")),
        profile: "local",
        enforces_capacity: true,
        unit: 32 * MIB,
        node_local: true,
    })
    .await;
}

#[tokio::test]
async fn the_fast_rwo_lane_with_xfs() {
    let _turn = ONE_AT_A_TIME.lock().await;
    if !privileged("lane contract: fast-rwo") {
        return;
    }
    contract(Setup {
        name: "fast-rwo (xfs disk image)",
        config: "profiles:\n  fast:\n    lane: fast-rwo\n    default: true\n    block: {fs_type: xfs, provisioning: thin}\n"
            .into(),
        data_dir: None,
        profile: "fast",
        enforces_capacity: true,
        unit: 320 * MIB,
        node_local: true,
    })
    .await;
}

#[tokio::test]
async fn the_shared_rwx_lane_on_juicefs() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let test = "lane contract: shared-rwx";
    if !privileged(test) {
        return;
    }
    let Some(juicefs) = juicefs_binary(test) else {
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("lanes-jfs-")
        .tempdir()
        .unwrap();
    let config = format!(
        "profiles:\n  shared:\n    lane: shared-rwx\n    default: true\n    juicefs:\n      \
         meta_url: sqlite3://{meta}\n      storage: file\n      bucket: {bucket}/\n      \
         format: true\n      heartbeat_seconds: 2\n      binary: {juicefs}\n",
        meta = dir.path().join("meta.db").display(),
        bucket = dir.path().join("objects").display(),
        juicefs = juicefs.display(),
    );
    contract(Setup {
        name: "shared-rwx (JuiceFS, sqlite3 + local objects)",
        config,
        data_dir: None,
        profile: "shared",
        enforces_capacity: true,
        unit: 64 * MIB,
        node_local: false,
    })
    .await;
}

/// The legacy-rwx contract, the node mounting the export (`export`) or each volume (`volume`).
async fn legacy_rwx(mount: &str) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let test = format!("lane contract: legacy-rwx, mount: {mount}");
    let Some(server) = common::nfs::Ganesha::start(&test) else {
        return;
    };
    let config = format!(
        "profiles:\n  legacy:\n    lane: legacy-rwx\n    default: true\n    nfs:\n      \
         server: {addr}\n      export: {export}\n      mount: {mount}\n      \
         mount_command: [{helper}]\n",
        addr = server.addr(),
        export = server.export().display(),
        helper = server.standin(false).display(),
    );
    contract(Setup {
        name: if mount == "export" {
            "legacy-rwx (nfs-ganesha; the export mounted on a stand-in)"
        } else {
            "legacy-rwx (nfs-ganesha; each volume mounted on a stand-in)"
        },
        config,
        data_dir: None,
        profile: "legacy",
        enforces_capacity: false,
        unit: 32 * MIB,
        node_local: false,
    })
    .await;
}

#[tokio::test]
async fn the_legacy_rwx_lane_on_nfs() {
    legacy_rwx("export").await;
}

#[tokio::test]
async fn the_legacy_rwx_lane_on_nfs_mounting_each_volume() {
    legacy_rwx("volume").await;
}
