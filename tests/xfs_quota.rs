//! Capacity enforcement with XFS project quotas, on an XFS filesystem the test makes itself
//! (a loop-mounted image mounted with `prjquota`).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lanes::proto::*;

/// An XFS image mounted with project quotas; unmounted on drop.
struct XfsMount {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl XfsMount {
    /// Makes and mounts the filesystem; `Err` says why that is impossible here.
    fn new() -> Result<XfsMount, String> {
        let dir = tempfile::Builder::new()
            .prefix("lanes-xfs-")
            .tempdir()
            .unwrap();
        let image = dir.path().join("xfs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(320 << 20)
            .unwrap();
        let mkfs = Command::new("mkfs.xfs").arg("-q").arg(&image).status();
        if !mkfs.map(|s| s.success()).unwrap_or(false) {
            panic!("mkfs.xfs failed or is missing: install xfsprogs (scripts/test.sh does)");
        }
        let mounted = Command::new("mount")
            .args(["-o", "loop,prjquota"])
            .arg(&image)
            .arg(&mount)
            .output()
            .unwrap();
        if !mounted.status.success() {
            return Err(format!(
                "this kernel cannot mount XFS with prjquota ({}); it was probably built without \
                 CONFIG_QUOTA, so project quotas cannot be exercised on this machine",
                String::from_utf8_lossy(&mounted.stderr).trim()
            ));
        }
        Ok(XfsMount { _dir: dir, mount })
    }
}

impl Drop for XfsMount {
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

#[tokio::test]
async fn a_write_past_capacity_fails_and_expansion_lifts_the_limit() {
    if !privileged("xfs_quota") {
        return;
    }
    let xfs = match XfsMount::new() {
        Ok(xfs) => xfs,
        Err(why) => {
            eprintln!("SKIPPED xfs_quota: {why}");
            return;
        }
    };
    let plugin = Plugin::start_with(None, Some(&xfs.mount.join("lanes")));
    let mut c = plugin.clients().await;
    let id = c
        .controller
        .create_volume(create_request("pvc-quota", 20 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
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

    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
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
        20 << 20,
        "statfs inside the volume reports its quota"
    );

    let err = write_mib(&target.join("big"), 30)
        .expect_err("writing 30 MiB into a 20 MiB volume must fail");
    let code = err.raw_os_error();
    assert!(
        code == Some(nix::libc::EDQUOT) || code == Some(nix::libc::ENOSPC),
        "{err}"
    );
    std::fs::remove_file(target.join("big")).unwrap();

    let grown = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 60 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 60 << 20);
    write_mib(&target.join("big"), 30).expect("the expanded volume takes 30 MiB");

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
    drop(plugin);
}
