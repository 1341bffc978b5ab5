//! The node plugin under attack and under a conformance reading of the CSI spec, against the
//! real binary over its socket as root (real mounts). One table per rule; every case checks
//! the gRPC code, that a sentinel tree outside the plugin's directories is unchanged (and
//! never mounted over), and that no stray mount remains.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use lanes::cli::csi::{Clients, mount_capability};
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;
use tonic::Code;

/// A tree outside every directory the plugin owns, standing in for `/etc` or `/root`: links
/// in the tests point here, and nothing here may ever change or be mounted over.
struct Sentinel {
    dir: tempfile::TempDir,
}

impl Sentinel {
    fn new() -> Sentinel {
        let dir = tempfile::Builder::new()
            .prefix("lanes-sentinel-")
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("ssl/certs")).unwrap();
        std::fs::write(dir.path().join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        std::fs::write(dir.path().join("ssl/certs/ca.pem"), "-----BEGIN-----\n").unwrap();
        std::fs::create_dir(dir.path().join("empty")).unwrap();
        Sentinel { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    /// Path → (kind, mode, size, mtime, content) of every entry.
    fn fingerprint(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.path()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                let content = if meta.is_file() {
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()
                } else {
                    String::new()
                };
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                out.insert(
                    path.display().to_string(),
                    format!(
                        "{:o} {} {} {content}",
                        meta.mode(),
                        meta.len(),
                        meta.mtime()
                    ),
                );
            }
        }
        out
    }

    /// Panics when anything is mounted at or under the sentinel.
    fn assert_unmounted(&self, what: &str) {
        let root = self.path();
        let mounted: Vec<_> = lanes::mount::mountinfo::read()
            .unwrap()
            .into_iter()
            .filter(|e| e.mount_point.starts_with(&root))
            .collect();
        assert!(
            mounted.is_empty(),
            "{what}: mounted over the sentinel: {mounted:?}"
        );
    }
}

async fn create(c: &mut Clients, name: &str) -> String {
    c.controller
        .create_volume(create_request(name, 4 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

fn with_mode(mut request: NodePublishVolumeRequest, mode: Mode) -> NodePublishVolumeRequest {
    request.volume_capability = Some(mount_capability(mode, &[]));
    request
}

/// Every mount under the plugin's test root, for "no stray mount" checks.
fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let root = root.canonicalize().unwrap();
    lanes::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|e| e.mount_point.starts_with(&root))
        .map(|e| e.mount_point)
        .collect()
}

/// Rule: a path named by a request is absolute, has no `..`, no symlink component (a
/// trailing slash after a link included), and lies neither inside nor above the data
/// directory. Every node RPC that takes a path refuses such paths with INVALID_ARGUMENT,
/// before anything is created, mounted or removed.
#[tokio::test]
async fn request_paths_are_confined() {
    if !privileged("request_paths_are_confined") {
        return;
    }
    let sentinel = Sentinel::new();
    let before = sentinel.fingerprint();
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-paths").await;
    let other = create(&mut c, "pvc-other").await;
    let staging = plugin.dir("staging");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    let root = plugin.root.path().canonicalize().unwrap();
    let links = plugin.dir("links");
    std::os::unix::fs::symlink(sentinel.path(), links.join("to-sentinel")).unwrap();
    std::os::unix::fs::symlink(plugin.dir("pods"), links.join("to-pods")).unwrap();
    std::os::unix::fs::symlink("../pods", links.join("relative")).unwrap();
    let data = plugin.data_dir.canonicalize().unwrap();
    let bad: Vec<(&str, String, &str)> = vec![
        ("relative", "pods/t".into(), "absolute"),
        (
            "dot-dot",
            format!("{}/pods/../staging", root.display()),
            "`..`",
        ),
        ("dot", format!("{}/pods/./t", root.display()), "`..`"),
        (
            "link to the sentinel",
            format!("{}/to-sentinel", links.display()),
            "symbolic link",
        ),
        (
            "link with trailing slash",
            format!("{}/to-sentinel/", links.display()),
            "symbolic link",
        ),
        (
            "below a link",
            format!("{}/to-sentinel/empty", links.display()),
            "symbolic link",
        ),
        (
            "new dir below a link",
            format!("{}/to-pods/new", links.display()),
            "symbolic link",
        ),
        (
            "relative link",
            format!("{}/relative/t", links.display()),
            "symbolic link",
        ),
        (
            "the data dir",
            data.display().to_string(),
            "inside or above",
        ),
        (
            "volumes",
            format!("{}/volumes", data.display()),
            "inside or above",
        ),
        (
            "cache tmp",
            format!("{}/cache/tmp/x", data.display()),
            "inside or above",
        ),
        (
            "a volume's data",
            format!("{}/volumes/pvc-other/data", data.display()),
            "inside or above",
        ),
        (
            "above the data dir",
            root.display().to_string(),
            "inside or above",
        ),
        ("the root", "/".into(), "inside or above"),
        ("NUL", format!("{}/pods/a\0b", root.display()), "NUL"),
    ];
    for (desc, path, why) in &bad {
        let target = PathBuf::from(path);
        let calls: Vec<(&str, Result<(), tonic::Status>)> = vec![
            (
                "stage",
                c.node
                    .node_stage_volume(stage_request(&other, &target))
                    .await
                    .map(drop),
            ),
            (
                "publish target",
                c.node
                    .node_publish_volume(publish_request(&id, &staging, &target, false))
                    .await
                    .map(drop),
            ),
            (
                "publish staging",
                c.node
                    .node_publish_volume(publish_request(
                        &id,
                        &target,
                        &plugin.dir("pods").join("t"),
                        false,
                    ))
                    .await
                    .map(drop),
            ),
            (
                "unpublish",
                c.node
                    .node_unpublish_volume(unpublish_request(&id, &target))
                    .await
                    .map(drop),
            ),
            (
                "unstage",
                c.node
                    .node_unstage_volume(unstage_request(&id, &target))
                    .await
                    .map(drop),
            ),
            (
                "stats",
                c.node
                    .node_get_volume_stats(NodeGetVolumeStatsRequest {
                        volume_id: id.clone(),
                        volume_path: path.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
            (
                "expand",
                c.node
                    .node_expand_volume(NodeExpandVolumeRequest {
                        volume_id: id.clone(),
                        volume_path: path.clone(),
                        ..Default::default()
                    })
                    .await
                    .map(drop),
            ),
        ];
        for (rpc, result) in calls {
            let status = result.expect_err(&format!("{desc} / {rpc}: must be refused"));
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{desc} / {rpc}: {}",
                status.message()
            );
            assert!(
                status.message().contains(why),
                "{desc} / {rpc}: {}",
                status.message()
            );
            if why == &"symbolic link" {
                assert!(
                    status.message().contains("links/"),
                    "{desc} / {rpc}: names the link: {}",
                    status.message()
                );
            }
        }
        sentinel.assert_unmounted(desc);
    }
    assert!(
        !plugin.dir("pods").join("t").exists(),
        "nothing was created"
    );
    assert!(
        !plugin.dir("pods").join("new").exists(),
        "nothing was created through the link"
    );
    assert!(
        data.join("volumes/pvc-other/data").is_dir(),
        "the other volume is untouched"
    );
    assert_eq!(
        mounts_under(plugin.root.path()),
        vec![staging.canonicalize().unwrap()],
        "only the staging mount"
    );
    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 2, "every volume still listed");
    assert_eq!(sentinel.fingerprint(), before, "the sentinel is unchanged");
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
}

/// Rule: required fields are checked first, whatever else the request holds; nothing on disk
/// is looked at for a request that lacks one.
#[tokio::test]
async fn required_fields_come_first() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let nowhere = plugin.root.path().join("does/not/exist");
    let n = nowhere.display().to_string();
    let cap = Some(rwo());
    let cases: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "stats without volume_id",
            c.node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: String::new(),
                    volume_path: n.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "stats without volume_path",
            c.node
                .node_get_volume_stats(NodeGetVolumeStatsRequest {
                    volume_id: "local/x".into(),
                    volume_path: String::new(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "expand without volume_id",
            c.node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: String::new(),
                    volume_path: n.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "expand without volume_path",
            c.node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: "local/x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "stage without volume_id",
            c.node
                .node_stage_volume(NodeStageVolumeRequest {
                    staging_target_path: n.clone(),
                    volume_capability: cap.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "stage without staging path",
            c.node
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: "local/x".into(),
                    volume_capability: cap.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "stage without capability",
            c.node
                .node_stage_volume(NodeStageVolumeRequest {
                    volume_id: "local/x".into(),
                    staging_target_path: n.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "publish without volume_id",
            c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    target_path: n.clone(),
                    staging_target_path: n.clone(),
                    volume_capability: cap.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "publish without target",
            c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: "local/x".into(),
                    staging_target_path: n.clone(),
                    volume_capability: cap.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "publish without capability",
            c.node
                .node_publish_volume(NodePublishVolumeRequest {
                    volume_id: "local/x".into(),
                    target_path: n.clone(),
                    staging_target_path: n.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "unpublish without volume_id",
            c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    target_path: n.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "unpublish without target",
            c.node
                .node_unpublish_volume(NodeUnpublishVolumeRequest {
                    volume_id: "local/x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "unstage without volume_id",
            c.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    staging_target_path: n.clone(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
        (
            "unstage without staging path",
            c.node
                .node_unstage_volume(NodeUnstageVolumeRequest {
                    volume_id: "local/x".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    ];
    for (desc, result) in cases {
        assert_code(result, Code::InvalidArgument, desc);
    }
    assert!(!nowhere.exists());
}

/// Rule: NodeUnpublishVolume removes only what a publish of that volume made, and a volume's
/// own state goes only when none of its mounts remains.
#[tokio::test]
async fn unpublish_removes_only_what_this_volume_published() {
    if !privileged("unpublish_removes_only_what_this_volume_published") {
        return;
    }
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let a = create(&mut c, "pvc-a").await;
    let b = create(&mut c, "pvc-b").await;
    let (stage_a, stage_b) = (plugin.dir("stage-a"), plugin.dir("stage-b"));
    c.node
        .node_stage_volume(stage_request(&a, &stage_a))
        .await
        .unwrap();
    c.node
        .node_stage_volume(stage_request(&b, &stage_b))
        .await
        .unwrap();
    let target_a = plugin.dir("pods").join("a");
    c.node
        .node_publish_volume(publish_request(&a, &stage_a, &target_a, false))
        .await
        .unwrap();
    std::fs::write(target_a.join("work"), "pod a's file").unwrap();

    // An empty directory this volume never published, and a volume's staging directory
    // while another is staged there: left alone.
    let empty = plugin.dir("empty");
    c.node
        .node_unpublish_volume(unpublish_request(&b, &empty))
        .await
        .unwrap();
    assert!(empty.is_dir(), "an empty directory no publish made is kept");
    let unmounted_stage = plugin.dir("stage-c");
    c.node
        .node_unpublish_volume(unpublish_request(&b, &unmounted_stage))
        .await
        .unwrap();
    assert!(unmounted_stage.is_dir());
    c.node
        .node_unpublish_volume(unpublish_request(&b, &stage_a))
        .await
        .unwrap_err();
    assert_eq!(mounts_at(&stage_a).len(), 1, "volume a stays staged");
    // Volume b's unpublish of volume a's target: a's mount is not b's.
    assert_code(
        c.node
            .node_unpublish_volume(unpublish_request(&b, &target_a))
            .await,
        Code::FailedPrecondition,
        "unpublish of another volume's target",
    );
    assert_eq!(
        std::fs::read_to_string(target_a.join("work")).unwrap(),
        "pod a's file"
    );

    // The real unpublish: unmounted, and the target it created removed.
    c.node
        .node_unpublish_volume(unpublish_request(&a, &target_a))
        .await
        .unwrap();
    assert!(!target_a.exists());
    for (id, stage) in [(&a, &stage_a), (&b, &stage_b)] {
        c.node
            .node_unstage_volume(unstage_request(id, stage))
            .await
            .unwrap();
    }
    assert!(
        stage_a.is_dir() && stage_b.is_dir(),
        "staging directories belong to the CO"
    );
    assert!(mounts_under(plugin.root.path()).is_empty());
}

/// Rule (CSI access modes): SINGLE_NODE_SINGLE_WRITER is published once; single-writer modes
/// have one writer; reader-only modes never sit beside a writer; a repeat at the same target
/// with another readonly flag or capability is ALREADY_EXISTS, an identical repeat is OK.
#[tokio::test]
async fn access_modes_hold_across_targets() {
    if !privileged("access_modes_hold_across_targets") {
        return;
    }
    use Mode::*;
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    // (first mode, first readonly, second mode, second readonly, expected code of the second)
    let cases = [
        (
            SingleNodeSingleWriter,
            false,
            SingleNodeSingleWriter,
            false,
            Code::FailedPrecondition,
        ),
        (
            SingleNodeSingleWriter,
            false,
            SingleNodeSingleWriter,
            true,
            Code::FailedPrecondition,
        ),
        (
            SingleNodeSingleWriter,
            true,
            SingleNodeMultiWriter,
            true,
            Code::FailedPrecondition,
        ),
        (
            SingleNodeMultiWriter,
            false,
            SingleNodeSingleWriter,
            false,
            Code::FailedPrecondition,
        ),
        (
            SingleNodeWriter,
            false,
            SingleNodeWriter,
            false,
            Code::FailedPrecondition,
        ),
        (SingleNodeWriter, false, SingleNodeWriter, true, Code::Ok),
        (
            SingleNodeReaderOnly,
            false,
            SingleNodeMultiWriter,
            false,
            Code::FailedPrecondition,
        ),
        (
            SingleNodeMultiWriter,
            false,
            SingleNodeReaderOnly,
            false,
            Code::FailedPrecondition,
        ),
        (
            SingleNodeReaderOnly,
            false,
            SingleNodeReaderOnly,
            false,
            Code::Ok,
        ),
        (
            SingleNodeMultiWriter,
            false,
            SingleNodeMultiWriter,
            false,
            Code::Ok,
        ),
    ];
    for (index, (first, first_ro, second, second_ro, want)) in cases.into_iter().enumerate() {
        let desc = format!("{first:?}/{first_ro} then {second:?}/{second_ro}");
        let id = create(&mut c, &format!("pvc-mode-{index}")).await;
        let staging = plugin.dir(&format!("mode-stage-{index}"));
        let mut stage = stage_request(&id, &staging);
        stage.volume_capability = Some(mount_capability(first, &[]));
        c.node.node_stage_volume(stage).await.unwrap();
        let one = plugin.dir("mode-pods").join(format!("{index}-one"));
        let two = plugin.dir("mode-pods").join(format!("{index}-two"));
        c.node
            .node_publish_volume(with_mode(
                publish_request(&id, &staging, &one, first_ro),
                first,
            ))
            .await
            .unwrap_or_else(|e| panic!("{desc}: first publish: {}", e.message()));
        let got = c
            .node
            .node_publish_volume(with_mode(
                publish_request(&id, &staging, &two, second_ro),
                second,
            ))
            .await;
        match (&got, want) {
            (Ok(_), Code::Ok) => assert_eq!(mounts_at(&two).len(), 1, "{desc}"),
            (Err(status), code) => {
                assert_eq!(status.code(), code, "{desc}: {}", status.message());
                assert!(
                    mounts_at(&two).is_empty() && !two.exists(),
                    "{desc}: nothing made"
                );
            }
            (Ok(_), code) => panic!("{desc}: expected {code:?}, got OK"),
        }
        // Once the first is gone, the second may go where it was refused.
        c.node
            .node_unpublish_volume(unpublish_request(&id, &one))
            .await
            .unwrap();
        c.node
            .node_publish_volume(with_mode(
                publish_request(&id, &staging, &two, second_ro),
                second,
            ))
            .await
            .unwrap_or_else(|e| panic!("{desc}: after unpublish: {}", e.message()));
        c.node
            .node_unpublish_volume(unpublish_request(&id, &two))
            .await
            .unwrap();
        c.node
            .node_unstage_volume(unstage_request(&id, &staging))
            .await
            .unwrap();
    }

    // Same target, other flags: ALREADY_EXISTS; an identical repeat: OK (x3).
    let id = create(&mut c, "pvc-repeat").await;
    let staging = plugin.dir("repeat-stage");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    let target = plugin.dir("repeat-pods").join("t");
    let request = publish_request(&id, &staging, &target, true);
    for _ in 0..3 {
        c.node.node_publish_volume(request.clone()).await.unwrap();
    }
    let variants = [
        (
            "readonly flag",
            publish_request(&id, &staging, &target, false),
        ),
        (
            "access mode",
            with_mode(request.clone(), Mode::SingleNodeSingleWriter),
        ),
        ("mount flags", {
            let mut r = request.clone();
            r.volume_capability =
                Some(mount_capability(Mode::SingleNodeWriter, &["noexec".into()]));
            r
        }),
    ];
    for (desc, variant) in variants {
        assert_code(
            c.node.node_publish_volume(variant).await,
            Code::AlreadyExists,
            desc,
        );
    }
    let mounts = mounts_at(&target);
    assert_eq!(mounts.len(), 1);
    assert!(mounts[0].read_only(), "the first publish's flags are kept");
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    assert!(mounts_under(plugin.root.path()).is_empty());
}

/// Rule (CSI concurrency): one call per volume at a time; the loser is ABORTED, whatever the
/// two RPCs are, and no mixture of them survives.
#[tokio::test]
async fn one_call_per_volume() {
    if !privileged("one_call_per_volume") {
        return;
    }
    let plugin = Plugin::start_with(Some("delay:publish"), None);
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-race").await;
    let staging = plugin.dir("staging");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .unwrap();
    let target = plugin.dir("pods").join("t");
    let mut slow = c.node.clone();
    let request = publish_request(&id, &staging, &target, false);
    let running = tokio::spawn(async move { slow.node_publish_volume(request).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // While the publish holds the volume, every other call on it is ABORTED.
    assert_code(
        c.node
            .node_unstage_volume(unstage_request(&id, &staging))
            .await,
        Code::Aborted,
        "unstage racing publish",
    );
    assert_code(
        c.controller.delete_volume(delete_request(&id)).await,
        Code::Aborted,
        "delete racing publish",
    );
    assert_code(
        c.node
            .node_stage_volume(stage_request(&id, &plugin.dir("elsewhere")))
            .await,
        Code::Aborted,
        "stage racing publish",
    );
    assert_code(
        c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 8 << 20,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::Aborted,
        "expand racing publish",
    );
    // Another volume is not held up.
    let free = create(&mut c, "pvc-free").await;
    c.node
        .node_stage_volume(stage_request(&free, &plugin.dir("free-stage")))
        .await
        .unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(mounts_at(&target).len(), 1);
    assert_eq!(
        mounts_at(&staging).len(),
        1,
        "the unstage that lost changed nothing"
    );
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_request(&free, &plugin.dir("free-stage")))
        .await
        .unwrap();
}

/// Rule: whatever order concurrent calls land in, no mount of deleted data survives and the
/// volume can always be cleaned up. Eight clients hammer one volume with stage, publish,
/// unpublish, unstage and delete for a few seconds (loopback only).
#[tokio::test]
async fn racing_calls_never_leave_mounts_of_deleted_data() {
    if !privileged("racing_calls_never_leave_mounts_of_deleted_data") {
        return;
    }
    let plugin = Plugin::start();
    let c = plugin.clients().await;
    let staging = plugin.dir("staging");
    let targets: Vec<PathBuf> = (0..2)
        .map(|i| plugin.dir("pods").join(format!("t{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for worker in 0..8u64 {
        let (mut c, staging, targets) = (c.clone(), staging.clone(), targets.clone());
        tasks.push(tokio::spawn(async move {
            let mut step = worker;
            let mut outcomes = BTreeMap::<String, usize>::new();
            while Instant::now() < deadline {
                step = step
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let target = &targets[(step >> 33) as usize % targets.len()];
                let id = "local/pvc-storm".to_owned();
                let result = match (step >> 40) % 6 {
                    0 => c
                        .controller
                        .create_volume(create_request("pvc-storm", 1 << 20))
                        .await
                        .map(drop),
                    1 => c
                        .node
                        .node_stage_volume(stage_request(&id, &staging))
                        .await
                        .map(drop),
                    2 => c
                        .node
                        .node_publish_volume(publish_request(&id, &staging, target, false))
                        .await
                        .map(drop),
                    3 => c
                        .node
                        .node_unpublish_volume(unpublish_request(&id, target))
                        .await
                        .map(drop),
                    4 => c
                        .node
                        .node_unstage_volume(unstage_request(&id, &staging))
                        .await
                        .map(drop),
                    _ => c
                        .controller
                        .delete_volume(delete_request(&id))
                        .await
                        .map(drop),
                };
                let code = result.err().map_or(Code::Ok, |s| s.code());
                *outcomes.entry(format!("{code:?}")).or_default() += 1;
                assert!(
                    matches!(
                        code,
                        Code::Ok | Code::Aborted | Code::FailedPrecondition | Code::NotFound
                    ),
                    "unexpected {code:?}"
                );
            }
            outcomes
        }));
    }
    let mut total = BTreeMap::<String, usize>::new();
    for task in tasks {
        for (code, n) in task.await.unwrap() {
            *total.entry(code).or_default() += n;
        }
    }
    eprintln!("storm outcomes: {total:?}");
    assert!(total.get("Ok").copied().unwrap_or(0) > 10, "{total:?}");
    let trash: Vec<_> = lanes::mount::mountinfo::read()
        .unwrap()
        .into_iter()
        .filter(|e| {
            e.root.to_string_lossy().contains(".trash-")
                || e.root.to_string_lossy().contains("(deleted)")
        })
        .collect();
    assert!(trash.is_empty(), "mounts of deleted data: {trash:?}");
    // Everything can be cleaned up by ordinary calls.
    let mut c = c;
    let id = "local/pvc-storm";
    for target in &targets {
        c.node
            .node_unpublish_volume(unpublish_request(id, target))
            .await
            .unwrap();
    }
    c.node
        .node_unstage_volume(unstage_request(id, &staging))
        .await
        .unwrap();
    c.controller
        .delete_volume(delete_request(id))
        .await
        .unwrap();
    assert!(mounts_under(plugin.root.path()).is_empty());
    let left: Vec<_> = std::fs::read_dir(plugin.data_dir.join("volumes"))
        .unwrap()
        .flatten()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Rule: a plugin never takes over a live endpoint or a data directory in use, and removes
/// only its own socket when it exits.
#[tokio::test]
async fn a_second_plugin_never_displaces_the_first() {
    let plugin = Plugin::start();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
            .args(args)
            .env_remove("LANES_FAILPOINT")
            .output()
            .unwrap()
    };
    let other_data = plugin.root.path().join("other-data");
    let socket = plugin.socket.display().to_string();
    let same_socket = run(&[
        "standalone",
        "--endpoint",
        &socket,
        "--data-dir",
        other_data.to_str().unwrap(),
    ]);
    assert!(!same_socket.status.success());
    let stderr = String::from_utf8_lossy(&same_socket.stderr);
    assert!(stderr.contains("another plugin is serving"), "{stderr}");
    let other_socket = plugin.root.path().join("other.sock");
    let data = plugin.data_dir.display().to_string();
    for role in ["node", "controller", "standalone"] {
        let same_data = run(&[
            role,
            "--endpoint",
            other_socket.to_str().unwrap(),
            "--data-dir",
            &data,
        ]);
        assert!(!same_data.status.success(), "{role}");
        let stderr = String::from_utf8_lossy(&same_data.stderr);
        assert!(
            stderr.contains("is in use by another `lanes`"),
            "{role}: {stderr}"
        );
        assert!(
            !other_socket.exists(),
            "{role}: refused before creating a socket"
        );
    }
    assert!(
        plugin.socket.exists(),
        "the first plugin's socket is still there"
    );
    let mut c = plugin.clients().await;
    c.identity
        .probe(ProbeRequest {})
        .await
        .expect("the first plugin still answers");
}

/// Rule: the metrics listener cannot exhaust the plugin's descriptors, and a metrics address
/// that cannot be bound stops the start.
#[tokio::test]
async fn idle_metrics_connections_cannot_starve_the_plugin() {
    if !privileged("idle_metrics_connections_cannot_starve_the_plugin") {
        return;
    }
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(8192), hard).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let plugin = Plugin::start_logged(&["--metrics-address", &address]);
    let idle: Vec<_> = (0..1100)
        .filter_map(|_| std::net::TcpStream::connect(&address).ok())
        .collect();
    assert!(idle.len() > 1000, "opened {} connections", idle.len());
    std::thread::sleep(Duration::from_millis(300));
    let fds = std::fs::read_dir(format!("/proc/{}/fd", plugin.pid()))
        .unwrap()
        .count();
    assert!(fds < 200, "the plugin holds {fds} descriptors");
    let mut c = plugin.clients().await;
    let id = create(&mut c, "pvc-metrics").await;
    let staging = plugin.dir("staging");
    c.node
        .node_stage_volume(stage_request(&id, &staging))
        .await
        .expect("stage works under the flood");
    c.node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    drop(idle);
    // The same address again: the second plugin must refuse to start.
    let busy = std::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
        .args(["standalone", "--metrics-address", &address, "--endpoint"])
        .arg(plugin.root.path().join("b.sock"))
        .arg("--data-dir")
        .arg(plugin.root.path().join("b-data"))
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("cannot listen for metrics"));
}

/// Rule: request values reach logs and errors escaped and bounded: a newline cannot forge a
/// log line, and a huge value is an INVALID_ARGUMENT with a short message.
#[tokio::test]
async fn request_values_are_escaped_and_bounded() {
    let plugin = Plugin::start_logged(&[]);
    let mut c = plugin.clients().await;
    let forged = "local/x\nINFO forged: all volumes deleted\u{1b}[2J";
    let status = c
        .node
        .node_stage_volume(stage_request(forged, &plugin.dir("s")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let huge = format!("local/{}", "v".repeat(1 << 20));
    for (desc, result) in [
        (
            "huge volume id",
            c.node
                .node_stage_volume(stage_request(&huge, &plugin.dir("s")))
                .await
                .map(drop),
        ),
        (
            "huge path",
            c.node
                .node_unpublish_volume(unpublish_request(
                    "local/x",
                    &PathBuf::from(format!("/{}", "p".repeat(1 << 20))),
                ))
                .await
                .map(drop),
        ),
        (
            "huge name",
            c.controller
                .create_volume(create_request(&"n".repeat(1 << 20), 1))
                .await
                .map(drop),
        ),
    ] {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{desc}");
        assert!(
            status.message().len() < 3000,
            "{desc}: {} bytes",
            status.message().len()
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let log = plugin.log();
    assert!(log.contains("NodeStageVolume"), "the log has the calls");
    assert!(
        !log.lines().any(|l| l.starts_with("INFO forged")),
        "no forged line:\n{log}"
    );
    assert!(!log.contains('\u{1b}'), "no raw escape sequences");
    let longest = log.lines().max_by_key(|l| l.len()).unwrap_or_default();
    assert!(
        log.len() < 200_000,
        "the log stays small: {} bytes; longest line: {}",
        log.len(),
        &longest[..longest.len().min(400)]
    );
}

/// Rule: capacity arithmetic never overflows: requests near 2^63 get OUT_OF_RANGE or a valid
/// size, never a negative one.
#[tokio::test]
async fn capacities_near_the_int64_limit() {
    let plugin = Plugin::with_config("local:\n  max_capacity: 9000000Ti\n", None);
    let mut c = plugin.clients().await;
    for (name, required, limit) in [
        ("near-max", i64::MAX - 10, 0),
        ("max", i64::MAX, 0),
        ("limit-only", 0, i64::MAX),
        ("both", i64::MAX - 4095, i64::MAX),
    ] {
        let request = CreateVolumeRequest {
            capacity_range: Some(CapacityRange {
                required_bytes: required,
                limit_bytes: limit,
            }),
            ..create_request(name, 0)
        };
        match c.controller.create_volume(request).await {
            Ok(response) => {
                let capacity = response.into_inner().volume.unwrap().capacity_bytes;
                assert!(capacity > 0 && capacity >= required, "{name}: {capacity}");
            }
            Err(status) => assert_eq!(
                status.code(),
                Code::OutOfRange,
                "{name}: {}",
                status.message()
            ),
        }
    }
    let capacity = c
        .controller
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(capacity.available_capacity >= 0);
    assert!(capacity.maximum_volume_size.unwrap_or(0) >= 0);
    let id = create(&mut c, "pvc-grow").await;
    let grown = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id,
            capacity_range: Some(CapacityRange {
                required_bytes: i64::MAX,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    match grown {
        Ok(response) => assert!(response.into_inner().capacity_bytes > 0),
        Err(status) => assert_eq!(status.code(), Code::OutOfRange),
    }
}

/// Rule: an unpublish that names an inline volume's ID with a target it never published (or
/// that does not exist) changes nothing: the pod's overlay and its writes stay.
#[tokio::test]
async fn a_bogus_unpublish_never_touches_an_inline_volume() {
    if !privileged("a_bogus_unpublish_never_touches_an_inline_volume") {
        return;
    }
    let plugin = Plugin::start();
    // A dataset in the plugin's embedded bucket (file://<data-dir>/datasets).
    let src = plugin.dir("dataset-src");
    std::fs::write(src.join("labels.txt"), "cat\ndog\n").unwrap();
    for args in [
        vec!["create", "pets"],
        vec!["push", src.to_str().unwrap(), "pets"],
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
            .arg("--data-dir")
            .arg(&plugin.data_dir)
            .arg("dataset")
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut c = plugin.clients().await;
    let target = plugin.dir("pods").join("inline");
    let publish = NodePublishVolumeRequest {
        volume_id: "csi-inline-1".into(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwo()),
        volume_context: [
            ("dataset".to_owned(), "pets:v1".to_owned()),
            ("csi.storage.k8s.io/ephemeral".to_owned(), "true".to_owned()),
        ]
        .into(),
        ..Default::default()
    };
    c.node.node_publish_volume(publish.clone()).await.unwrap();
    std::fs::write(target.join("scratch"), "pod's own work").unwrap();
    let upper = plugin.data_dir.join("ephemeral/csi-inline-1/upper");
    assert!(upper.join("scratch").is_file());
    let elsewhere = plugin.dir("pods").join("never-published");
    let empty = plugin.dir("pods").join("empty-dir");
    std::fs::create_dir_all(&empty).unwrap();
    for bogus in [&elsewhere, &empty] {
        c.node
            .node_unpublish_volume(unpublish_request("csi-inline-1", bogus))
            .await
            .unwrap();
    }
    assert!(
        empty.is_dir(),
        "a directory this volume never published is kept"
    );
    assert_eq!(
        std::fs::read_to_string(target.join("scratch")).unwrap(),
        "pod's own work"
    );
    assert!(
        upper.join("scratch").is_file(),
        "the upper layer is kept while mounted"
    );
    assert_eq!(mounts_at(&target).len(), 1);
    // A repeat of the same publish is fine; one with another readonly flag is not.
    c.node.node_publish_volume(publish.clone()).await.unwrap();
    let mut readonly = publish.clone();
    readonly.readonly = true;
    assert_code(
        c.node.node_publish_volume(readonly).await,
        Code::AlreadyExists,
        "inline readonly changed",
    );
    // The real unpublish removes the mount, the target and the volume's own state.
    c.node
        .node_unpublish_volume(unpublish_request("csi-inline-1", &target))
        .await
        .unwrap();
    assert!(!target.exists() && !upper.exists());
    assert!(mounts_under(plugin.root.path()).is_empty());
    c.node
        .node_unpublish_volume(unpublish_request("csi-inline-1", &target))
        .await
        .unwrap();
}
