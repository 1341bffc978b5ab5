//! The `fast-rwo` lane against the real binary, as root: disk images on loop devices, xfs and
//! ext4 filesystems, raw block publishes, online growth, and kill -9 at each stage step. Every
//! test counts the loop devices bound to its images and the mounts under its directories at
//! the end: nothing may leak.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use lanes::cli::csi::mount_capability_of;
use lanes::proto::*;
use volume_capability::access_mode::Mode;

const MIB: i64 = 1 << 20;

const CONFIG: &str = "\
profiles:
  fast:
    lane: fast-rwo
    description: node-local disk image, xfs
    default: true
    block: {fs_type: xfs, provisioning: thick}
  fast-ext4:
    lane: fast-rwo
    block: {fs_type: ext4, provisioning: thin}
";

/// Loop devices bound to a file under `root`, from sysfs.
fn loops_under(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let backing = entry.path().join("loop/backing_file");
        if let Ok(text) = std::fs::read_to_string(&backing)
            && Path::new(text.trim()).starts_with(root)
        {
            found.push(PathBuf::from("/dev").join(entry.file_name()));
        }
    }
    found
}

/// Detaches whatever a failed test left bound under its directory.
struct LoopSweep(PathBuf);

impl Drop for LoopSweep {
    fn drop(&mut self) {
        for device in loops_under(&self.0) {
            let _ = std::process::Command::new("losetup")
                .arg("-d")
                .arg(&device)
                .status();
        }
    }
}

fn start(test: &str) -> Option<(Plugin, LoopSweep)> {
    if !privileged(test) {
        return None;
    }
    let plugin = Plugin::with_config(CONFIG, None);
    let sweep = LoopSweep(plugin.data_dir.clone());
    Some((plugin, sweep))
}

fn params(profile: &str) -> std::collections::HashMap<String, String> {
    [("profile".to_owned(), profile.to_owned())].into()
}

fn fs_capability(fs_type: &str) -> VolumeCapability {
    mount_capability_of(Mode::SingleNodeWriter, fs_type, &[])
}

fn block_capability() -> VolumeCapability {
    lanes::cli::csi::block_capability(Mode::SingleNodeWriter)
}

async fn create(c: &mut lanes::cli::csi::Clients, name: &str, bytes: i64, profile: &str) -> String {
    let mut request = create_request(name, bytes);
    request.parameters = params(profile);
    let volume = c
        .controller
        .create_volume(request)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume.capacity_bytes, bytes);
    assert_eq!(
        volume.accessible_topology[0].segments["topology.lanes.csi.dev/node"],
        "test-node"
    );
    volume.volume_id
}

async fn stage(
    c: &mut lanes::cli::csi::Clients,
    id: &str,
    staging: &Path,
    capability: VolumeCapability,
) -> Result<(), tonic::Status> {
    let mut request = stage_request(id, staging);
    request.volume_capability = Some(capability);
    c.node.node_stage_volume(request).await.map(drop)
}

async fn publish(
    c: &mut lanes::cli::csi::Clients,
    id: &str,
    staging: &Path,
    target: &Path,
    capability: VolumeCapability,
) -> Result<(), tonic::Status> {
    let mut request = publish_request(id, staging, target, false);
    request.volume_capability = Some(capability);
    c.node.node_publish_volume(request).await.map(drop)
}

async fn total_bytes(c: &mut lanes::cli::csi::Clients, id: &str, path: &Path) -> i64 {
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
    stats
        .usage
        .iter()
        .find(|u| u.unit == volume_usage::Unit::Bytes as i32)
        .unwrap()
        .total
}

async fn expand(c: &mut lanes::cli::csi::Clients, id: &str, bytes: i64) -> bool {
    let grown = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.to_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, bytes);
    grown.node_expansion_required
}

async fn node_expand(
    c: &mut lanes::cli::csi::Clients,
    id: &str,
    path: &Path,
) -> Result<NodeExpandVolumeResponse, tonic::Status> {
    c.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test]
async fn an_xfs_volume_keeps_its_data_grows_online_and_leaks_nothing() {
    let Some((plugin, _sweep)) = start("block xfs") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-xfs", 320 * MIB, "fast").await;
    assert!(id.starts_with("fast-rwo/"), "{id}");
    let image = plugin.data_dir.join("block/pvc-xfs/disk.img");
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(
        allocated >= 320 * MIB as u64,
        "thick: allocated whole ({allocated})"
    );
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("scratch");
    stage(&mut c, &id, &staging, rwo()).await.unwrap();
    stage(&mut c, &id, &staging, rwo()).await.unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    assert_eq!(loops_under(&plugin.data_dir).len(), 1);
    let mounted = mounts_at(&staging);
    assert_eq!(mounted.len(), 1);
    assert_eq!(mounted[0].fs_type, "xfs");
    assert_eq!(mounts_at(&target).len(), 1);
    std::fs::write(target.join("weights.bin"), vec![42u8; 1 << 20]).unwrap();

    assert_code(
        c.controller.delete_volume(delete_request(&id)).await,
        tonic::Code::FailedPrecondition,
        "still attached",
    );
    assert_code(
        stage(&mut c, &id, &staging, fs_capability("ext4")).await,
        tonic::Code::AlreadyExists,
        "staged with another capability",
    );

    // Grow while a writer runs.
    let before = total_bytes(&mut c, &id, &target).await;
    assert!(before < 320 * MIB && before > 250 * MIB, "{before}");
    let writer_path = target.join("stream.bin");
    let writer = std::thread::spawn(move || {
        let mut file = std::fs::File::create(writer_path).unwrap();
        for _ in 0..64 {
            file.write_all(&[7u8; 1 << 20]).unwrap();
        }
        file.sync_all().unwrap();
    });
    assert!(
        expand(&mut c, &id, 512 * MIB).await,
        "the node must grow it"
    );
    let grown = node_expand(&mut c, &id, &target).await.unwrap();
    assert_eq!(grown.capacity_bytes, 512 * MIB);
    writer.join().unwrap();
    let after = total_bytes(&mut c, &id, &target).await;
    assert!(
        after > before + 150 * MIB,
        "the filesystem grew online: {before} -> {after}"
    );
    node_expand(&mut c, &id, &target).await.unwrap();

    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    assert!(!target.exists(), "the target Lanes made is removed");
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    assert!(mounts_at(&staging).is_empty());
    assert!(loops_under(&plugin.data_dir).is_empty(), "device detached");

    // The data is still there at the next stage; the filesystem is not made again.
    stage(&mut c, &id, &staging, fs_capability("xfs"))
        .await
        .unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("weights.bin")).unwrap(),
        vec![42u8; 1 << 20]
    );
    assert_eq!(
        std::fs::metadata(target.join("stream.bin")).unwrap().len(),
        64 << 20
    );
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
    assert!(!image.exists());
    assert!(loops_under(&plugin.data_dir).is_empty());
}

#[tokio::test]
async fn a_raw_block_volume_is_a_device_at_the_target() {
    let Some((plugin, _sweep)) = start("block raw") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-raw", 16 * MIB, "fast-ext4").await;
    let image = plugin.data_dir.join("block/pvc-raw/disk.img");
    assert_eq!(
        std::fs::metadata(&image).unwrap().blocks(),
        0,
        "thin: sparse"
    );
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("dev");
    stage(&mut c, &id, &staging, block_capability())
        .await
        .unwrap();
    assert!(
        mounts_at(&staging).is_empty(),
        "nothing is mounted at staging"
    );
    assert_code(
        publish(&mut c, &id, &staging, &target, rwo()).await,
        tonic::Code::FailedPrecondition,
        "a raw stage is not a filesystem",
    );
    publish(&mut c, &id, &staging, &target, block_capability())
        .await
        .unwrap();
    publish(&mut c, &id, &staging, &target, block_capability())
        .await
        .unwrap();
    assert!(
        std::fs::metadata(&target)
            .unwrap()
            .file_type()
            .is_block_device()
    );
    let mut device = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&target)
        .unwrap();
    device.seek(SeekFrom::Start(4 << 20)).unwrap();
    device.write_all(b"raw bytes on a fast-rwo volume").unwrap();
    device.sync_all().unwrap();
    drop(device);
    assert_eq!(total_bytes(&mut c, &id, &target).await, 16 * MIB);

    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    assert!(!target.exists(), "the target file Lanes made is removed");
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    assert!(loops_under(&plugin.data_dir).is_empty());
    let mut bytes = vec![0u8; 30];
    let mut file = std::fs::File::open(&image).unwrap();
    file.seek(SeekFrom::Start(4 << 20)).unwrap();
    file.read_exact(&mut bytes).unwrap();
    assert_eq!(&bytes, b"raw bytes on a fast-rwo volume");
    c.controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
}

#[tokio::test]
async fn ext4_grows_at_the_next_stage_when_it_cannot_grow_online() {
    let Some((plugin, _sweep)) = start("block ext4") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-ext4", 64 * MIB, "fast-ext4").await;
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("v");
    stage(&mut c, &id, &staging, rwo()).await.unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    assert_eq!(mounts_at(&staging)[0].fs_type, "ext4");
    std::fs::write(target.join("kept"), b"ext4 data").unwrap();
    assert!(expand(&mut c, &id, 128 * MIB).await);
    match node_expand(&mut c, &id, &target).await {
        // Online ext4 growth needs CAP_SYS_RESOURCE, which this machine does not give root.
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            assert!(status.message().contains("next stage"), "{status:?}");
            assert!(total_bytes(&mut c, &id, &target).await < 70 * MIB);
        }
        Ok(grown) => assert_eq!(grown.capacity_bytes, 128 * MIB),
    }
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    stage(&mut c, &id, &staging, fs_capability("ext4"))
        .await
        .unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    let total = total_bytes(&mut c, &id, &target).await;
    assert!(total > 110 * MIB, "grown at the stage: {total}");
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"ext4 data");
    assert_code(
        stage(&mut c, &id, &plugin.dir("other"), fs_capability("xfs")).await,
        tonic::Code::InvalidArgument,
        "an ext4 volume cannot be staged as xfs",
    );
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    assert!(loops_under(&plugin.data_dir).is_empty());
}

#[tokio::test]
async fn a_kill_at_any_stage_step_then_a_retry_ends_with_one_device_and_one_mount() {
    let Some((mut plugin, _sweep)) = start("block kill") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-kill", 320 * MIB, "fast").await;
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("v");
    for point in [
        "stage.after-attach",
        "stage.after-format",
        "stage.after-mount",
        "publish.after-bind",
        "unpublish.after-unmount",
        "unstage.after-unmount",
    ] {
        plugin.restart_with(Some(point));
        let mut c = plugin.clients().await;
        let mut died = stage(&mut c, &id, &staging, rwo()).await.is_err();
        if !died {
            died = publish(&mut c, &id, &staging, &target, rwo())
                .await
                .is_err();
        }
        if !died && point.starts_with("un") {
            died = c
                .node
                .node_unpublish_volume(unpublish_request(&id, &target))
                .await
                .is_err()
                || c.node
                    .node_unstage_volume(unstage_request(&id, &staging))
                    .await
                    .is_err();
        }
        assert!(died, "{point}: the failpoint must kill the plugin");
        plugin.wait_dead();
        plugin.restart();
        let mut c = plugin.clients().await;
        stage(&mut c, &id, &staging, rwo()).await.unwrap();
        publish(&mut c, &id, &staging, &target, rwo())
            .await
            .unwrap();
        assert_eq!(loops_under(&plugin.data_dir).len(), 1, "{point}");
        assert_eq!(mounts_at(&staging).len(), 1, "{point}");
        assert_eq!(mounts_at(&target).len(), 1, "{point}");
        std::fs::write(target.join(point), point).unwrap();
        c.node
            .node_unpublish_volume(unpublish_request(&id, &target))
            .await
            .unwrap();
        c.node
            .node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
        assert!(loops_under(&plugin.data_dir).is_empty(), "{point}");
    }
    let mut c = plugin.clients().await;
    stage(&mut c, &id, &staging, rwo()).await.unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    let written = std::fs::read_dir(&target).unwrap().count();
    assert!(written >= 6, "every round's file is there: {written}");
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
}
