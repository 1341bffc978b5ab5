//! The Node service of the real binary with real bind mounts (needs root; CI runs as root).

mod common;

use std::io::Write;

use common::*;
use lanes::cli::csi::mount_capability;
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;
use tonic::Code;

async fn create(c: &mut lanes::cli::csi::Clients, name: &str) -> String {
    c.controller
        .create_volume(create_request(name, 8 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

#[tokio::test]
async fn stage_publish_unpublish_unstage_with_real_mounts_ten_times_each() {
    if !privileged("stage_publish_unpublish_unstage") {
        return;
    }
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-node").await;
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("volume");
    for _ in 0..10 {
        c.node
            .node_stage_volume(stage_request(&id, &staging))
            .await
            .unwrap();
    }
    assert_eq!(mounts_at(&staging).len(), 1, "exactly one staging mount");
    for _ in 0..10 {
        c.node
            .node_publish_volume(publish_request(&id, &staging, &target, false))
            .await
            .unwrap();
    }
    let published = mounts_at(&target);
    assert_eq!(published.len(), 1, "exactly one publish mount");
    assert!(!published[0].read_only());
    std::fs::write(target.join("hello"), "from the pod").unwrap();
    let on_disk = plugin.data_dir.join("volumes/pvc-node/data/hello");
    assert_eq!(std::fs::read_to_string(on_disk).unwrap(), "from the pod");

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
    assert_eq!(stats.usage.len(), 2);
    assert!(
        stats
            .usage
            .iter()
            .all(|u| u.total > 0 && u.available >= 0 && u.used >= 0)
    );
    assert!(
        stats
            .usage
            .iter()
            .any(|u| u.unit == volume_usage::Unit::Inodes as i32)
    );
    assert!(!stats.volume_condition.unwrap().abnormal);

    for _ in 0..10 {
        c.node
            .node_unpublish_volume(unpublish_request(&id, &target))
            .await
            .unwrap();
    }
    assert!(mounts_at(&target).is_empty());
    assert!(
        !target.exists(),
        "unpublish removes the target directory it created"
    );
    // Still staged: the volume cannot be deleted yet.
    assert_code(
        c.controller.delete_volume(delete_request(&id)).await,
        Code::FailedPrecondition,
        "delete while staged",
    );
    for _ in 0..10 {
        c.node
            .node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
    }
    assert!(mounts_at(&staging).is_empty());
    c.controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
}

#[tokio::test]
async fn readonly_and_mount_flags_are_honoured_and_fixed_in_place() {
    if !privileged("readonly_and_mount_flags") {
        return;
    }
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-ro").await;
    let staging = plugin.dir("staging");
    let pod = plugin.dir("pod");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();

    let ro = pod.join("ro");
    c.node
        .node_publish_volume(publish_request(&id, &staging, &ro, true))
        .await
        .unwrap();
    assert!(mounts_at(&ro)[0].read_only());
    let err = std::fs::File::create(ro.join("nope")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS));
    // The staging mount stays writable: read-only is per publish.
    assert!(!mounts_at(&staging)[0].read_only());

    let reader = pod.join("reader");
    let mut request = publish_request(&id, &staging, &reader, false);
    request.volume_capability = Some(mount_capability(Mode::SingleNodeReaderOnly, &[]));
    c.node.node_publish_volume(request).await.unwrap();
    assert!(
        mounts_at(&reader)[0].read_only(),
        "reader-only access mode mounts read-only"
    );
    // A reader-only publication never shares the volume with a writer.
    let mut writer = publish_request(&id, &staging, &pod.join("writer"), false);
    writer.volume_capability = Some(mount_capability(Mode::SingleNodeMultiWriter, &[]));
    assert_code(
        c.node.node_publish_volume(writer).await,
        Code::FailedPrecondition,
        "writer beside a reader-only publication",
    );
    assert!(
        !pod.join("writer").exists(),
        "a refused publish creates nothing"
    );
    c.node
        .node_unpublish_volume(unpublish_request(&id, &reader))
        .await
        .unwrap();

    let flagged = pod.join("flagged");
    let mut request = publish_request(&id, &staging, &flagged, false);
    request.volume_capability = Some(mount_capability(
        Mode::SingleNodeWriter,
        &["noexec".into(), "nosuid".into()],
    ));
    c.node.node_publish_volume(request.clone()).await.unwrap();
    let entry = &mounts_at(&flagged)[0];
    assert!(
        entry.has_option("noexec") && entry.has_option("nosuid"),
        "{:?}",
        entry.options
    );

    // A mount whose flags drifted (here: remounted rw by hand) is fixed by a repeat, not doubled.
    nix::mount::mount(
        None::<&str>,
        &ro,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND | nix::mount::MsFlags::MS_REMOUNT,
        None::<&str>,
    )
    .unwrap();
    assert!(!mounts_at(&ro)[0].read_only());
    c.node
        .node_publish_volume(publish_request(&id, &staging, &ro, true))
        .await
        .unwrap();
    let now = mounts_at(&ro);
    assert_eq!(now.len(), 1);
    assert!(now[0].read_only());

    let mut bad = publish_request(&id, &staging, &pod.join("bad"), false);
    bad.volume_capability = Some(mount_capability(
        Mode::SingleNodeWriter,
        &["uid=1000".into()],
    ));
    let err = c.node.node_publish_volume(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("uid"), "{}", err.message());
    assert!(
        !pod.join("bad").exists(),
        "a refused publish creates nothing"
    );
}

#[tokio::test]
async fn volume_mount_group_gives_the_volume_to_the_group() {
    if !privileged("volume_mount_group") {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-group").await;
    let staging = plugin.dir("staging");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    let target = plugin.dir("pod").join("v");
    let mut request = publish_request(&id, &staging, &target, false);
    if let Some(volume_capability::AccessType::Mount(mount)) = request
        .volume_capability
        .as_mut()
        .unwrap()
        .access_type
        .as_mut()
    {
        mount.volume_mount_group = "4242".into();
    }
    c.node.node_publish_volume(request).await.unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert_eq!(meta.gid(), 4242);
    assert_eq!(
        meta.mode() & 0o2000,
        0o2000,
        "setgid so new files inherit the group"
    );
}

#[tokio::test]
async fn node_errors_use_the_codes_the_spec_names_and_change_nothing() {
    if !privileged("node_errors") {
        return;
    }
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-err").await;
    let staging = plugin.dir("staging");
    let pod = plugin.dir("pod");
    let file_target = pod.join("a-file");
    std::fs::File::create(&file_target)
        .unwrap()
        .write_all(b"x")
        .unwrap();

    // Not staged yet.
    assert_code(
        c.node
            .node_publish_volume(publish_request(&id, &staging, &pod.join("t"), false))
            .await,
        Code::FailedPrecondition,
        "publish before stage",
    );
    assert!(!pod.join("t").exists());
    assert_code(
        c.node
            .node_stage_volume(stage_request(&id, &plugin.root.path().join("no-such-dir")))
            .await,
        Code::InvalidArgument,
        "missing staging dir",
    );
    assert_code(
        c.node
            .node_stage_volume(stage_request("local/missing", &staging))
            .await,
        Code::NotFound,
        "stage unknown volume",
    );
    assert_code(
        c.node.node_stage_volume(stage_request("", &staging)).await,
        Code::InvalidArgument,
        "stage without id",
    );
    let mut no_cap = stage_request(&id, &staging);
    no_cap.volume_capability = None;
    assert_code(
        c.node.node_stage_volume(no_cap).await,
        Code::InvalidArgument,
        "stage without capability",
    );
    assert_code(
        c.node
            .node_stage_volume(stage_request("local/../../etc", &staging))
            .await,
        Code::InvalidArgument,
        "traversal id",
    );
    assert!(mounts_at(&staging).is_empty());

    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    assert_code(
        c.node
            .node_publish_volume(publish_request(&id, &staging, &file_target, false))
            .await,
        Code::InvalidArgument,
        "target is a file",
    );
    assert_eq!(std::fs::read_to_string(&file_target).unwrap(), "x");
    let mut no_target = publish_request(&id, &staging, &pod.join("t"), false);
    no_target.target_path.clear();
    assert_code(
        c.node.node_publish_volume(no_target).await,
        Code::InvalidArgument,
        "no target",
    );
    let mut no_cap = publish_request(&id, &staging, &pod.join("t"), false);
    no_cap.volume_capability = None;
    assert_code(
        c.node.node_publish_volume(no_cap).await,
        Code::InvalidArgument,
        "publish without capability",
    );
    assert_code(
        c.node
            .node_publish_volume(publish_request(
                "local/missing",
                &staging,
                &pod.join("t"),
                false,
            ))
            .await,
        Code::NotFound,
        "publish unknown volume",
    );
    assert_code(
        c.node
            .node_publish_volume(publish_request(
                &id,
                &staging,
                &pod.join("no-parent/t"),
                false,
            ))
            .await,
        Code::InvalidArgument,
        "target parent missing",
    );

    // Something else mounted at the target is reported, not covered.
    let other = plugin.dir("other");
    let busy = pod.join("busy");
    std::fs::create_dir(&busy).unwrap();
    nix::mount::mount(
        Some(&other),
        &busy,
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .unwrap();
    assert_code(
        c.node
            .node_publish_volume(publish_request(&id, &staging, &busy, false))
            .await,
        Code::AlreadyExists,
        "foreign mount at target",
    );
    assert_code(
        c.node
            .node_unpublish_volume(unpublish_request(&id, &busy))
            .await,
        Code::FailedPrecondition,
        "unpublish of a foreign mount",
    );
    assert_eq!(mounts_at(&busy).len(), 1, "the foreign mount is untouched");
    nix::mount::umount(&busy).unwrap();

    // Unpublish / unstage of paths with nothing there succeed.
    c.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: pod.join("never").display().to_string(),
        })
        .await
        .unwrap();
    assert_code(
        c.node
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "unpublish without target",
    );
    assert_code(
        c.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: String::new(),
                staging_target_path: staging.display().to_string(),
            })
            .await,
        Code::InvalidArgument,
        "unstage without id",
    );

    // Stats errors.
    assert_code(
        c.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: pod.join("nowhere").display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "stats of missing path",
    );
    assert_code(
        c.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: "local/missing".into(),
                volume_path: staging.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "stats of missing volume",
    );
    assert_code(
        c.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: String::new(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "stats without path",
    );
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
}

#[tokio::test]
async fn node_info_capabilities_and_expand() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let info = c
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "test-node");
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.lanes.csi.dev/node"],
        "test-node"
    );
    let caps = c
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    use node_service_capability::rpc::Type;
    let kinds: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for wanted in [
        Type::StageUnstageVolume,
        Type::GetVolumeStats,
        Type::ExpandVolume,
        Type::VolumeCondition,
    ] {
        assert!(kinds.contains(&(wanted as i32)), "{wanted:?}");
    }
    let id = create(&mut c, "pvc-nexp").await;
    let path = plugin.dir("somewhere");
    // NodeExpandVolume needs the volume mounted at volume_path.
    assert_code(
        c.node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: path.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "expand where the volume is not mounted",
    );
    if privileged("node_expand_at_the_staging_path") {
        c.node
            .node_stage_volume(stage_request(&id, &path))
            .await
            .unwrap();
        let grown = c
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: path.display().to_string(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grown.capacity_bytes, 8 << 20);
        c.node
            .node_unstage_volume(unstage_request(&id, &path))
            .await
            .unwrap();
    }
    assert_code(
        c.node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: "local/missing".into(),
                volume_path: path.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "expand missing",
    );
    assert_code(
        c.node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id,
                volume_path: String::new(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "expand no path",
    );
}

#[tokio::test]
async fn concurrent_publish_to_the_same_target_is_aborted() {
    if !privileged("concurrent_publish") {
        return;
    }
    let plugin = Plugin::start_with(Some("delay:publish"), None);
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-conc").await;
    let staging = plugin.dir("staging");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    let target = plugin.dir("pod").join("t");
    let mut first = c.node.clone();
    let request = publish_request(&id, &staging, &target, false);
    let again = request.clone();
    let running = tokio::spawn(async move { first.node_publish_volume(request).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_code(
        c.node.node_publish_volume(again).await,
        Code::Aborted,
        "overlapping publish",
    );
    running.await.unwrap().unwrap();
    assert_eq!(mounts_at(&target).len(), 1);
}

/// kill -9 between any two steps of stage / publish / unpublish, restart, retry:
/// exactly one correct mount (or none after unpublish), no stray directories.
#[tokio::test]
async fn kill_between_steps_then_retry_ends_in_the_right_state() {
    if !privileged("kill_between_steps") {
        return;
    }
    for point in [
        "stage.after-bind",
        "publish.after-mkdir",
        "publish.after-bind",
        "unpublish.after-unmount",
    ] {
        let mut plugin = Plugin::start_with(Some(point), None);
        let mut c = plugin.clients().await;
        let id = create(&mut c, "pvc-crash").await;
        let staging = plugin.dir("staging");
        let target = plugin.dir("pod").join("t");

        let mut step = 0;
        // Run the lifecycle up to the step that crashes.
        let steps = ["stage", "publish", "unpublish"];
        let crashed_in = point.split('.').next().unwrap();
        for (index, name) in steps.iter().enumerate() {
            let result = match *name {
                "stage" => c
                    .node
                    .node_stage_volume(stage_request(&id, &staging))
                    .await
                    .map(drop),
                "publish" => c
                    .node
                    .node_publish_volume(publish_request(&id, &staging, &target, true))
                    .await
                    .map(drop),
                _ => c
                    .node
                    .node_unpublish_volume(unpublish_request(&id, &target))
                    .await
                    .map(drop),
            };
            if *name == crashed_in {
                assert!(
                    result.is_err(),
                    "{point}: the call must die with the plugin"
                );
                step = index;
                break;
            }
            result.unwrap();
        }
        let status = plugin.wait_dead();
        assert!(!status.success(), "{point}: killed");
        plugin.restart();
        let mut c = plugin.clients().await;
        // Retry the interrupted call, then check the state it must leave.
        match steps[step] {
            "stage" => {
                c.node
                    .node_stage_volume(stage_request(&id, &staging))
                    .await
                    .unwrap();
                assert_eq!(mounts_at(&staging).len(), 1, "{point}");
            }
            "publish" => {
                c.node
                    .node_publish_volume(publish_request(&id, &staging, &target, true))
                    .await
                    .unwrap();
                let mounts = mounts_at(&target);
                assert_eq!(mounts.len(), 1, "{point}: exactly one publish mount");
                assert!(
                    mounts[0].read_only(),
                    "{point}: the read-only flag is applied by the retry"
                );
            }
            _ => {
                c.node
                    .node_unpublish_volume(unpublish_request(&id, &target))
                    .await
                    .unwrap();
                assert!(mounts_at(&target).is_empty(), "{point}");
                assert!(!target.exists(), "{point}: no stray target directory");
            }
        }
        assert_eq!(mounts_at(&staging).len(), 1, "{point}: one staging mount");
        // Clean up fully and prove nothing is left.
        let _ = c
            .node
            .node_unpublish_volume(unpublish_request(&id, &target))
            .await;
        c.node
            .node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
        c.controller
            .delete_volume(delete_request(&id))
            .await
            .unwrap();
        let root = plugin.root.path().canonicalize().unwrap();
        let stray: Vec<_> = lanes::mount::mountinfo::read()
            .unwrap()
            .into_iter()
            .filter(|e| e.mount_point.starts_with(&root))
            .collect();
        assert!(stray.is_empty(), "{point}: stray mounts {stray:?}");
        let leftovers: Vec<_> = std::fs::read_dir(plugin.data_dir.join("volumes"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert!(leftovers.is_empty(), "{point}: leftovers {leftovers:?}");
    }
}
