//! Capacity enforcement with btrfs quota groups, on a btrfs filesystem the test makes itself
//! (a loop-mounted image with quotas enabled). This kernel has no XFS/ext4 quota support but
//! btrfs qgroups do enforce, so this test must run here: without root it says so loudly, and
//! with LANES_REQUIRE_PRIVILEGED=1 (CI) any reason not to run is a failure.

mod common;

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lanes::proto::*;

/// A btrfs image with quotas enabled, mounted; unmounted on drop.
struct BtrfsMount {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

fn run(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e} (scripts/test.sh installs btrfs-progs)"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

impl BtrfsMount {
    fn new() -> Result<BtrfsMount, String> {
        let dir = tempfile::Builder::new()
            .prefix("lanes-btrfs-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("btrfs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(768 << 20)
            .unwrap();
        run("mkfs.btrfs", &["-q".as_ref(), image.as_os_str()])?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount.as_os_str(),
            ],
        )?;
        let mounted = BtrfsMount { _dir: dir, mount };
        run(
            "btrfs",
            &[
                "quota".as_ref(),
                "enable".as_ref(),
                mounted.mount.as_os_str(),
            ],
        )?;
        Ok(mounted)
    }
}

impl Drop for BtrfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
    }
}

fn write_mib(path: &Path, mib: usize) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![7u8; 1 << 20];
    for _ in 0..mib {
        file.write_all(&chunk)?;
    }
    file.sync_all()
}

async fn bytes_used(c: &mut lanes::cli::csi::Clients, id: &str, path: &Path) -> (i64, i64) {
    nix::unistd::sync();
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
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
    assert_eq!(bytes.available, bytes.total - bytes.used);
    (bytes.used, bytes.total)
}

#[tokio::test]
async fn a_write_past_capacity_fails_and_expansion_lifts_the_limit() {
    if !privileged("btrfs_quota") {
        return;
    }
    let btrfs = match BtrfsMount::new() {
        Ok(btrfs) => btrfs,
        Err(why) if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") => {
            panic!("btrfs quota test cannot run here: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED btrfs_quota: {why}");
            return;
        }
    };
    let data_dir = btrfs.mount.join("lanes");
    let listed = Command::new(env!("CARGO_BIN_EXE_lanes"))
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["profiles", "--json"])
        .output()
        .unwrap();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["capacity_enforced"], true, "{listed}");
    assert!(
        listed[0]["enforcement"]
            .as_str()
            .unwrap()
            .contains("btrfs quota group")
    );
    let mut plugin = Plugin::start_with(None, Some(&data_dir));
    let mut c = plugin.clients().await;
    const MIB: i64 = 1 << 20;
    let id = c
        .controller
        .create_volume(create_request("pvc-btrfs", 40 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let data = data_dir.join("volumes/pvc-btrfs/data");
    assert_eq!(
        std::fs::metadata(&data).unwrap().ino(),
        256,
        "the volume is a subvolume"
    );
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("v");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_request(&id, &staging, &target, false))
        .await
        .unwrap();

    let err =
        write_mib(&target.join("big"), 60).expect_err("60 MiB into a 40 MiB volume must fail");
    let code = err.raw_os_error();
    assert!(
        code == Some(nix::libc::EDQUOT) || code == Some(nix::libc::ENOSPC),
        "{err}"
    );
    std::fs::remove_file(target.join("big")).unwrap();
    write_mib(&target.join("ten"), 10).unwrap();
    let (used, total) = bytes_used(&mut c, &id, &target).await;
    assert_eq!(
        total,
        40 * MIB,
        "the volume's own limit, not the filesystem's size"
    );
    assert!(
        (10 * MIB..12 * MIB).contains(&used),
        "the volume's own usage: {used}"
    );

    let grown = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 100 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 100 * MIB);
    write_mib(&target.join("big"), 60).expect("the expanded volume takes 60 MiB more");
    assert_eq!(bytes_used(&mut c, &id, &target).await.1, 100 * MIB);
    let err = write_mib(&target.join("more"), 40).expect_err("and still stops at its limit");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(nix::libc::EDQUOT | nix::libc::ENOSPC)
        ),
        "{err}"
    );
    std::fs::remove_file(target.join("more")).unwrap();

    // The limit lives in the filesystem: a restarted plugin still enforces it.
    plugin.restart();
    let mut c = plugin.clients().await;
    let (used, total) = bytes_used(&mut c, &id, &target).await;
    assert_eq!(total, 100 * MIB);
    assert!(used >= 70 * MIB, "{used}");

    // Snapshots are read-only btrfs snapshots (O(1)); restores and clones are writable ones
    // with their own quota group.
    let snapshot = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            name: "snap-b".into(),
            source_volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snapshot.snapshot_id.starts_with("local@"), "{snapshot:?}");
    std::fs::write(target.join("later"), "after the snapshot").unwrap();
    let from = |name: &str, source: volume_content_source::Type| {
        let mut request = create_request(name, 0);
        request.capacity_range = None;
        request.volume_content_source = Some(VolumeContentSource {
            r#type: Some(source),
        });
        request
    };
    let restored = c
        .controller
        .create_volume(from(
            "pvc-restored",
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: snapshot.snapshot_id.clone(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(restored.capacity_bytes, 100 * MIB);
    let restored_data = data_dir.join("volumes/pvc-restored/data");
    assert!(restored_data.join("ten").exists());
    assert!(!restored_data.join("later").exists());
    let err = write_mib(&restored_data.join("big2"), 120).expect_err("the copy has its own limit");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(nix::libc::EDQUOT | nix::libc::ENOSPC)
        ),
        "{err}"
    );
    let clone = c
        .controller
        .create_volume(from(
            "pvc-clone",
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: id.clone(),
            }),
        ))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(data_dir.join("volumes/pvc-clone/data/later").exists());
    for volume in [&restored.volume_id, &clone.volume_id] {
        c.controller
            .delete_volume(delete_request(volume))
            .await
            .unwrap();
    }
    c.controller
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!data_dir.join("snapshots/local/snap-b").exists());

    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    c.controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
    assert!(
        !data_dir.join("volumes/pvc-btrfs").exists(),
        "the subvolume is destroyed"
    );
    drop(c);
    drop(plugin);
}
