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
  local:
    lane: local
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

    // Unstaged while still published (a CO out of order): the device stays attached for the
    // publication, and goes with it.
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    assert_eq!(loops_under(&plugin.data_dir).len(), 1);
    assert!(target.join("weights.bin").exists());
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    assert!(!target.exists(), "the target Lanes made is removed");
    assert!(
        loops_under(&plugin.data_dir).is_empty(),
        "detached with the last user"
    );
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
    device.write_all(b"a raw header").unwrap();
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
    // Raw data is never formatted over.
    assert_code(
        stage(&mut c, &id, &staging, rwo()).await,
        tonic::Code::FailedPrecondition,
        "a volume used raw is not formatted",
    );
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    assert!(loops_under(&plugin.data_dir).is_empty());
    let mut head = vec![0u8; 12];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    assert_eq!(&head, b"a raw header");
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

async fn snapshot(
    c: &mut lanes::cli::csi::Clients,
    name: &str,
    source: &str,
) -> Result<Snapshot, tonic::Status> {
    c.controller
        .create_snapshot(CreateSnapshotRequest {
            name: name.to_owned(),
            source_volume_id: source.to_owned(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().snapshot.unwrap())
}

async fn create_from(
    c: &mut lanes::cli::csi::Clients,
    name: &str,
    bytes: i64,
    source: volume_content_source::Type,
) -> Result<Volume, tonic::Status> {
    let mut request = create_request(name, bytes);
    request.parameters = params("fast");
    request.volume_content_source = Some(VolumeContentSource {
        r#type: Some(source),
    });
    c.controller
        .create_volume(request)
        .await
        .map(|r| r.into_inner().volume.unwrap())
}

fn from_snapshot(id: &str) -> volume_content_source::Type {
    volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
        snapshot_id: id.to_owned(),
    })
}

#[tokio::test]
async fn snapshots_restore_and_clones_copy_and_outlive_their_source() {
    let Some((plugin, _sweep)) = start("block snapshots") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-src", 320 * MIB, "fast").await;
    let staging = plugin.dir("staging-src");
    let target = plugin.dir("pod").join("src");
    stage(&mut c, &id, &staging, rwo()).await.unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    std::fs::write(target.join("before"), b"in the snapshot").unwrap();

    // Taken while mounted and written to: crash-consistent, with what was written flushed.
    let snap = snapshot(&mut c, "snap-1", &id).await.unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 320 * MIB);
    assert_eq!(snap.source_volume_id, id);
    assert!(snap.snapshot_id.starts_with("fast-rwo@"), "{snap:?}");
    assert!(snap.creation_time.is_some());
    let again = snapshot(&mut c, "snap-1", &id).await.unwrap();
    assert_eq!(again, snap, "a repeat returns the same snapshot");
    std::fs::write(target.join("after"), b"not in the snapshot").unwrap();
    let other = create(&mut c, "pvc-other", 320 * MIB, "fast").await;
    assert_code(
        snapshot(&mut c, "snap-1", &other).await,
        tonic::Code::AlreadyExists,
        "the same name for another source",
    );
    assert_code(
        snapshot(&mut c, "snap-x", "fast-rwo/missing").await,
        tonic::Code::NotFound,
        "a snapshot of a missing volume",
    );

    // Restore: the snapshot's data, not what came after; both mounted at once (xfs nouuid).
    let restored = create_from(&mut c, "pvc-restored", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    assert_eq!(restored.capacity_bytes, 320 * MIB);
    assert_eq!(
        restored.content_source,
        Some(VolumeContentSource {
            r#type: Some(from_snapshot(&snap.snapshot_id))
        })
    );
    assert_code(
        create_from(
            &mut c,
            "pvc-small",
            100 * MIB,
            from_snapshot(&snap.snapshot_id),
        )
        .await,
        tonic::Code::OutOfRange,
        "smaller than the snapshot",
    );
    assert_code(
        create_from(&mut c, "pvc-none", 0, from_snapshot("fast-rwo@nothing")).await,
        tonic::Code::NotFound,
        "an unknown snapshot",
    );
    let r_staging = plugin.dir("staging-restored");
    let r_target = plugin.dir("pod").join("restored");
    stage(&mut c, &restored.volume_id, &r_staging, rwo())
        .await
        .unwrap();
    publish(&mut c, &restored.volume_id, &r_staging, &r_target, rwo())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(r_target.join("before")).unwrap(),
        b"in the snapshot"
    );
    assert!(!r_target.join("after").exists());

    // Clone of the live volume, larger: everything so far, and the filesystem grows to it.
    let clone = create_from(
        &mut c,
        "pvc-clone",
        400 * MIB,
        volume_content_source::Type::Volume(volume_content_source::VolumeSource {
            volume_id: id.clone(),
        }),
    )
    .await
    .unwrap();
    assert_eq!(clone.capacity_bytes, 400 * MIB);
    let c_staging = plugin.dir("staging-clone");
    let c_target = plugin.dir("pod").join("clone");
    stage(&mut c, &clone.volume_id, &c_staging, rwo())
        .await
        .unwrap();
    publish(&mut c, &clone.volume_id, &c_staging, &c_target, rwo())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(c_target.join("after")).unwrap(),
        b"not in the snapshot"
    );
    let total = total_bytes(&mut c, &clone.volume_id, &c_target).await;
    assert!(total > 330 * MIB, "grown to the clone's capacity: {total}");

    // Listing: by ID, by source, and in pages.
    let second = snapshot(&mut c, "snap-2", &id).await.unwrap();
    let list = |snapshot_id: &str, source: &str, max: i32, token: &str| ListSnapshotsRequest {
        snapshot_id: snapshot_id.to_owned(),
        source_volume_id: source.to_owned(),
        max_entries: max,
        starting_token: token.to_owned(),
        ..Default::default()
    };
    let page = c
        .controller
        .list_snapshots(list("", &id, 1, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.entries.len(), 1);
    let rest = c
        .controller
        .list_snapshots(list("", &id, 0, &page.next_token))
        .await
        .unwrap()
        .into_inner();
    let mut seen: Vec<String> = page
        .entries
        .iter()
        .chain(&rest.entries)
        .map(|e| e.snapshot.as_ref().unwrap().snapshot_id.clone())
        .collect();
    seen.sort();
    let mut want = vec![snap.snapshot_id.clone(), second.snapshot_id.clone()];
    want.sort();
    assert_eq!(seen, want);
    assert!(rest.next_token.is_empty());
    let one = c
        .controller
        .list_snapshots(list(&second.snapshot_id, "", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.entries.len(), 1);

    // The source goes; its snapshots stay valid.
    for (vol, stg, tgt) in [
        (&id, &staging, &target),
        (&restored.volume_id, &r_staging, &r_target),
        (&clone.volume_id, &c_staging, &c_target),
    ] {
        c.node
            .node_unpublish_volume(unpublish_request(vol, tgt))
            .await
            .unwrap();
        c.node
            .node_unstage_volume(unstage_request(vol, stg))
            .await
            .unwrap();
        c.controller
            .delete_volume(delete_request(vol))
            .await
            .unwrap();
    }
    c.controller
        .delete_volume(delete_request(&other))
        .await
        .unwrap();
    let again = create_from(&mut c, "pvc-again", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    stage(&mut c, &again.volume_id, &r_staging, rwo())
        .await
        .unwrap();
    publish(&mut c, &again.volume_id, &r_staging, &r_target, rwo())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(r_target.join("before")).unwrap(),
        b"in the snapshot"
    );
    c.node
        .node_unpublish_volume(unpublish_request(&again.volume_id, &r_target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&again.volume_id, &r_staging))
        .await
        .unwrap();
    c.controller
        .delete_volume(delete_request(&again.volume_id))
        .await
        .unwrap();
    for snapshot_id in [&snap.snapshot_id, &second.snapshot_id] {
        for _ in 0..2 {
            c.controller
                .delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    let none = c
        .controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(none.entries.is_empty());
    assert!(loops_under(&plugin.data_dir).is_empty());
    let local = create(&mut c, "pvc-local", MIB, "local").await;
    assert_code(
        snapshot(&mut c, "snap-local", &local).await,
        tonic::Code::InvalidArgument,
        "the local lane has no snapshots",
    );
}

#[test]
fn a_copy_on_xfs_with_reflink_shares_blocks() {
    if !privileged("block reflink") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("lanes-reflink-")
        .tempdir()
        .unwrap();
    let image = dir.path().join("xfs.img");
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    std::fs::File::create(&image)
        .unwrap()
        .set_len(400 << 20)
        .unwrap();
    let run = |program: &str, args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new(program)
            .args(args)
            .status()
            .unwrap();
        assert!(status.success(), "{program} {args:?}");
    };
    run(
        "mkfs.xfs",
        &[
            "-q".as_ref(),
            "-m".as_ref(),
            "reflink=1".as_ref(),
            image.as_os_str(),
        ],
    );
    run(
        "mount",
        &[
            "-o".as_ref(),
            "loop".as_ref(),
            image.as_os_str(),
            mount.as_os_str(),
        ],
    );
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mount.clone());
    let from = mount.join("a.img");
    std::fs::write(&from, vec![9u8; 64 << 20]).unwrap();
    let free = |path: &Path| {
        let stat = nix::sys::statvfs::statvfs(path).unwrap();
        stat.blocks_free() * stat.fragment_size()
    };
    nix::unistd::sync();
    let before = free(&mount);
    let to = mount.join("b.img");
    let how = lanes::lane::block::image::copy(&from, &to).unwrap();
    nix::unistd::sync();
    assert_eq!(how, lanes::lane::block::image::Copied::Reflink);
    assert_eq!(std::fs::read(&to).unwrap(), vec![9u8; 64 << 20]);
    let used = before - free(&mount);
    assert!(
        used < 8 << 20,
        "a reflink shares its blocks: {used} bytes used"
    );
}

#[tokio::test]
async fn a_kill_while_copying_leaves_nothing_and_the_retry_succeeds() {
    let Some((mut plugin, _sweep)) = start("block kill copy") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-copied", 320 * MIB, "fast").await;
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("v");
    stage(&mut c, &id, &staging, rwo()).await.unwrap();
    publish(&mut c, &id, &staging, &target, rwo())
        .await
        .unwrap();
    std::fs::write(target.join("kept"), b"copied").unwrap();
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    let leftovers = |dir: &Path| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    };
    let snapshots = plugin.data_dir.join("snapshots/fast-rwo");
    let volumes = plugin.data_dir.join("block");

    plugin.restart_with(Some("snapshot.after-copy"));
    let mut c = plugin.clients().await;
    assert!(
        snapshot(&mut c, "snap-k", &id).await.is_err(),
        "killed mid-copy"
    );
    plugin.wait_dead();
    plugin.restart();
    let mut c = plugin.clients().await;
    assert!(
        leftovers(&snapshots).is_empty(),
        "{:?}",
        leftovers(&snapshots)
    );
    let listed = c
        .controller
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "no half-made snapshot is listed");
    let snap = snapshot(&mut c, "snap-k", &id).await.unwrap();

    plugin.restart_with(Some("create.after-copy"));
    let mut c = plugin.clients().await;
    assert!(
        create_from(&mut c, "pvc-k", 0, from_snapshot(&snap.snapshot_id))
            .await
            .is_err()
    );
    plugin.wait_dead();
    plugin.restart();
    let mut c = plugin.clients().await;
    assert!(leftovers(&volumes).is_empty(), "{:?}", leftovers(&volumes));
    let restored = create_from(&mut c, "pvc-k", 0, from_snapshot(&snap.snapshot_id))
        .await
        .unwrap();
    stage(&mut c, &restored.volume_id, &staging, rwo())
        .await
        .unwrap();
    publish(&mut c, &restored.volume_id, &staging, &target, rwo())
        .await
        .unwrap();
    assert_eq!(std::fs::read(target.join("kept")).unwrap(), b"copied");
    c.node
        .node_unpublish_volume(unpublish_request(&restored.volume_id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&restored.volume_id, &staging))
        .await
        .unwrap();
    assert!(loops_under(&plugin.data_dir).is_empty());
}

#[tokio::test]
async fn the_controller_answers_for_fast_rwo_volumes() {
    let Some((plugin, _sweep)) = start("block controller") else {
        return;
    };
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-ctl", 64 * MIB, "fast-ext4").await;
    let validate = |capability: VolumeCapability| ValidateVolumeCapabilitiesRequest {
        volume_id: id.clone(),
        volume_capabilities: vec![capability],
        ..Default::default()
    };
    for (capability, confirmed) in [
        (block_capability(), true),
        (fs_capability("ext4"), true),
        (fs_capability("btrfs"), false),
        (
            mount_capability_of(Mode::MultiNodeMultiWriter, "", &[]),
            false,
        ),
    ] {
        let answer = c
            .controller
            .validate_volume_capabilities(validate(capability.clone()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            answer.confirmed.is_some(),
            confirmed,
            "{capability:?}: {answer:?}"
        );
    }
    let capacity = |node: &str| GetCapacityRequest {
        parameters: params("fast"),
        accessible_topology: Some(Topology {
            segments: [("topology.lanes.csi.dev/node".to_owned(), node.to_owned())].into(),
        }),
        ..Default::default()
    };
    let here = c
        .controller
        .get_capacity(capacity("test-node"))
        .await
        .unwrap()
        .into_inner();
    assert!(here.available_capacity > 0);
    let elsewhere = c
        .controller
        .get_capacity(capacity("other-node"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        elsewhere.available_capacity, 0,
        "node-local: nothing on another node"
    );
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
            .any(|e| e.volume.as_ref().unwrap().volume_id == id)
    );
    c.controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
}
