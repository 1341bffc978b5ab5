//! The `legacy-rwx` lane against a real NFS server (nfs-ganesha in a network namespace),
//! through the real binary over its socket, as root. The controller is exercised for real:
//! every directory is made and removed over NFS by the userspace client. The node's kernel
//! mount cannot be (this kernel has no NFS client): its exact command line is checked, and
//! the flow after it runs for real on a stand-in serving the export's directory (see
//! tests/common/nfs.rs).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::nfs::{Ganesha, kill_standins};
use common::*;
use lanes::cli::csi::mount_capability;
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// A profile `nfs` on `server`, its node mounts made by `helper`; more profiles may follow.
fn config(server: &Ganesha, helper: &Path, extra: &str) -> String {
    format!(
        "mount_timeout_seconds: 4\nprofiles:\n  nfs:\n    lane: legacy-rwx\n    default: true\n    \
         nfs:\n      server: {addr}\n      export: {export}\n      prefix: teams/ml\n      \
         mount_options: [hard, timeo=600]\n      mount_command: [{helper}]\n{extra}",
        addr = server.addr(),
        export = server.export().display(),
        helper = helper.display(),
    )
}

fn create(name: &str, on_delete: &str) -> CreateVolumeRequest {
    let mut request = create_request(name, 100 * MIB);
    request.volume_capabilities = vec![mount_capability(Mode::MultiNodeMultiWriter, &[])];
    request.parameters = HashMap::from([("onDelete".into(), on_delete.into())]);
    request
}

/// The names in `dir` (sorted), or none when it is missing.
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

/// Asserts a call failed UNAVAILABLE, naming the server, within `limit` of `started`.
#[track_caller]
fn unavailable_naming(status: &tonic::Status, server: &Ganesha, started: Instant, limit: u64) {
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
    assert!(
        status.message().contains(server.addr()),
        "{}",
        status.message()
    );
    let took = started.elapsed();
    assert!(took < Duration::from_secs(limit), "{took:?}");
}

/// Waits (10 s at most) until `dir` holds exactly `expected`: deleted volumes' trash is
/// emptied after DeleteVolume answers.
fn wait_for_names(dir: &Path, expected: &[&str]) {
    let started = Instant::now();
    while names(dir) != expected {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}: {:?}, expected {expected:?}",
            dir.display(),
            names(dir)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A snapshot of every path under `dir`, to show a refused call changed nothing.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut all = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            all.push(entry.path());
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            }
        }
    }
    all.sort();
    all
}

#[tokio::test]
async fn the_controller_makes_and_removes_exactly_one_directory_over_nfs() {
    let Some(server) = Ganesha::start("legacy-rwx controller") else {
        return;
    };
    let plugin = Plugin::with_config(&config(&server, &server.standin(false), ""), None);
    let mut c = plugin.clients().await;
    let volumes = server.export().join("teams/ml");

    // Create makes <prefix>/<dir>/{volume.json,data} on the server; a repeat returns it; a
    // different size under the same name is ALREADY_EXISTS.
    let started = Instant::now();
    let volume = c
        .controller
        .create_volume(create("pvc-one", "delete"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let first_create = started.elapsed();
    assert_eq!(volume.volume_id, "legacy-rwx/nfs/pvc-one");
    assert_eq!(volume.capacity_bytes, 100 * MIB);
    assert!(
        volume.accessible_topology.is_empty(),
        "reachable from every node"
    );
    assert_eq!(names(&volumes.join("pvc-one")), ["data", "volume.json"]);
    let again = c
        .controller
        .create_volume(create("pvc-one", "delete"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, volume);
    let mut bigger = create("pvc-one", "delete");
    bigger.capacity_range.as_mut().unwrap().required_bytes = 200 * MIB;
    assert_code(
        c.controller.create_volume(bigger).await,
        Code::AlreadyExists,
        "same name, other size",
    );
    eprintln!("first create (connect included): {first_create:?}");

    // Odd names map to one safe directory and back.
    let odd = "PVC with spaces/and:colons, ünïcode";
    let odd_volume = c
        .controller
        .create_volume(create(odd, "delete"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let odd_dir = odd_volume.volume_id.rsplit('/').next().unwrap().to_owned();
    assert!(odd_dir.starts_with('_'), "{odd_dir}");
    assert!(volumes.join(&odd_dir).join("data").is_dir());
    let listed: Vec<String> = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    assert!(listed.contains(&volume.volume_id) && listed.contains(&odd_volume.volume_id));

    // Capacity is recorded and reported, not enforced: the export's FSSTAT.
    let capacity = c
        .controller
        .get_capacity(GetCapacityRequest {
            parameters: HashMap::from([("profile".into(), "nfs".into())]),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(capacity.available_capacity > 0);
    let grown = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: volume.volume_id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 300 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.capacity_bytes, 300 * MIB);
    assert!(!grown.node_expansion_required, "nothing to grow on a node");
    let recorded = std::fs::read_to_string(volumes.join("pvc-one/volume.json")).unwrap();
    assert!(recorded.contains(&(300 * MIB).to_string()), "{recorded}");

    // IDs that would reach outside a volume's directory are refused; nothing changes.
    let before = tree(&server.export());
    for bad in [
        "legacy-rwx/nfs/..",
        "legacy-rwx/nfs/.",
        "legacy-rwx/nfs/",
        "legacy-rwx/nfs//",
        "legacy-rwx/nfs/../../etc",
        "legacy-rwx/nfs/a/b",
        "legacy-rwx/../teams",
        "legacy-rwx/nfs/.trash-x",
    ] {
        assert_code(
            c.controller.delete_volume(delete_request(bad)).await,
            Code::InvalidArgument,
            bad,
        );
    }
    // A well-formed ID of no volume is fine (idempotent delete), and touches nothing.
    c.controller
        .delete_volume(delete_request("legacy-rwx/nfs/never-made"))
        .await
        .unwrap();
    assert_eq!(
        tree(&server.export()),
        before,
        "refused deletes changed nothing"
    );

    // delete removes that directory only (with what a pod wrote, symlinks not followed);
    // retain and archive move it beside the volumes.
    let data = volumes.join("pvc-one/data");
    std::fs::create_dir_all(data.join("deep/er")).unwrap();
    std::fs::write(data.join("deep/er/file"), "x").unwrap();
    let outside = server.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "keep").unwrap();
    std::os::unix::fs::symlink(&outside, data.join("link")).unwrap();
    for _ in 0..2 {
        c.controller
            .delete_volume(delete_request(&volume.volume_id))
            .await
            .unwrap();
    }
    assert!(!volumes.join("pvc-one").exists());
    assert_eq!(
        std::fs::read_to_string(outside.join("keep")).unwrap(),
        "keep"
    );
    // The trash is emptied after the answer; nothing else is left.
    wait_for_names(&volumes, &[odd_dir.as_str()]);

    for (name, kind) in [("pvc-kept", "retain"), ("pvc-archived", "archive")] {
        let id = c
            .controller
            .create_volume(create(name, kind))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        std::fs::write(volumes.join(name).join("data/result"), kind).unwrap();
        c.controller
            .delete_volume(delete_request(&id))
            .await
            .unwrap();
        assert!(!volumes.join(name).exists());
    }
    let retained = names(&server.export().join("teams/ml-retained"));
    assert_eq!(retained.len(), 2, "{retained:?}");
    assert!(
        retained[0].starts_with("archived-pvc-archived-"),
        "{retained:?}"
    );
    assert!(retained[1].starts_with("pvc-kept-"), "{retained:?}");
    let kept = server.export().join("teams/ml-retained").join(&retained[1]);
    assert_eq!(
        std::fs::read_to_string(kept.join("data/result")).unwrap(),
        "retain"
    );
}

#[tokio::test]
async fn a_server_that_is_down_is_unavailable_and_a_killed_create_leaves_nothing() {
    let Some(mut server) = Ganesha::start("legacy-rwx server down") else {
        return;
    };
    let helper = server.standin(false);
    let mut plugin = Plugin::with_config(&config(&server, &helper, ""), Some("create.after-mkdir"));
    let volumes = server.export().join("teams/ml");

    // kill -9 after the volume's directory was made on the server, before its record.
    let mut c = plugin.clients().await;
    assert!(
        c.controller
            .create_volume(create("pvc-killed", "delete"))
            .await
            .is_err()
    );
    plugin.wait_dead();
    assert_eq!(
        names(&volumes),
        [".tmp-pvc-killed"],
        "half-made, under a temporary name"
    );
    plugin.restart_with(None);
    let mut c = plugin.clients().await;
    let volume = c
        .controller
        .create_volume(create("pvc-killed", "delete"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(names(&volumes), ["pvc-killed"], "one volume, no leftovers");

    // The server goes away: UNAVAILABLE, naming it.
    server.stop();
    let started = Instant::now();
    let status = c
        .controller
        .create_volume(create("pvc-while-down", "delete"))
        .await
        .unwrap_err();
    unavailable_naming(&status, &server, started, 10);
    let status = c
        .controller
        .delete_volume(delete_request(&volume.volume_id))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{}", status.message());

    // It comes back (a restart: every handle the client held is stale): calls work again.
    server.resume();
    c.controller
        .delete_volume(delete_request(&volume.volume_id))
        .await
        .unwrap();
    c.controller
        .create_volume(create("pvc-after", "delete"))
        .await
        .unwrap();
    wait_for_names(&volumes, &["pvc-after"]);
}

#[tokio::test]
async fn the_node_mounts_the_export_once_recovers_stale_mounts_and_kills_hung_helpers() {
    let Some(server) = Ganesha::start("legacy-rwx node") else {
        return;
    };
    let helper = server.standin(false);
    let hung = format!(
        "  stuck:\n    lane: legacy-rwx\n    nfs:\n      server: {addr}\n      export: {export}\n      \
         prefix: stuck\n      mount_command: [{hung}]\n",
        addr = server.addr(),
        export = server.export().display(),
        hung = server.standin(true).display(),
    );
    let plugin = Plugin::with_config(&config(&server, &helper, &hung), None);
    let mut c = plugin.clients().await;
    let mut ids = Vec::new();
    for name in ["pvc-a", "pvc-b"] {
        ids.push(
            c.controller
                .create_volume(create(name, "delete"))
                .await
                .unwrap()
                .into_inner()
                .volume
                .unwrap()
                .volume_id,
        );
    }
    let rwx = mount_capability(Mode::MultiNodeMultiWriter, &[]);
    let mut targets = Vec::new();
    for id in &ids {
        let dir = id.rsplit('/').next().unwrap();
        let staging = plugin.dir("staging").join(dir);
        let target = plugin.dir("pods").join(dir);
        std::fs::create_dir_all(&staging).unwrap();
        let mut stage = stage_request(id, &staging);
        stage.volume_capability = Some(rwx.clone());
        c.node.node_stage_volume(stage).await.unwrap();
        let mut publish = publish_request(id, &staging, &target, false);
        // pvc-b's pod runs with an fsGroup: the volume's root gets that group (no walk).
        let mut capability = rwx.clone();
        if dir == "pvc-b"
            && let Some(volume_capability::AccessType::Mount(mount)) =
                capability.access_type.as_mut()
        {
            mount.volume_mount_group = "4321".into();
        }
        publish.volume_capability = Some(capability);
        c.node.node_publish_volume(publish).await.unwrap();
        targets.push(target);
    }
    // One mount of the export for both volumes, made with exactly this command line.
    let log = std::fs::read_to_string(server.mount_log()).unwrap();
    let point = plugin.data_dir.join("nfs/nfs");
    assert_eq!(
        log.lines().collect::<Vec<_>>(),
        [format!(
            "-t nfs -o vers=4.1,hard,timeo=600 {}:{} {}",
            server.addr(),
            server.export().display(),
            point.display()
        )],
    );
    // What a pod writes is on the server, in that volume's directory only.
    std::fs::write(targets[0].join("checkpoint"), "step 1").unwrap();
    assert_eq!(
        std::fs::read_to_string(server.export().join("teams/ml/pvc-a/data/checkpoint")).unwrap(),
        "step 1"
    );
    assert!(!targets[1].join("checkpoint").exists());
    let group = |name: &str| {
        std::os::unix::fs::MetadataExt::gid(
            &std::fs::metadata(server.export().join("teams/ml").join(name).join("data")).unwrap(),
        )
    };
    assert_eq!((group("pvc-a"), group("pvc-b")), (0, 4321));

    // The export's mount dies (ENOTCONN or ECONNABORTED everywhere): the next call mounts it
    // again and re-binds both volumes' staging and target paths.
    assert_eq!(kill_standins(&server.export()), 1);
    let dead = std::fs::read_dir(&targets[0]).unwrap_err();
    assert!(
        matches!(
            dead.raw_os_error(),
            Some(nix::libc::ENOTCONN | nix::libc::ECONNABORTED)
        ),
        "{dead}"
    );
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: ids[1].clone(),
            volume_path: targets[1].display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.usage.iter().any(|u| u.total > 0), "{stats:?}");
    for target in &targets {
        assert_eq!(mounts_at(target).len(), 1, "{}", target.display());
    }
    assert_eq!(
        std::fs::read_to_string(targets[0].join("checkpoint")).unwrap(),
        "step 1",
        "the other volume recovered too"
    );

    // With no call at all, the periodic check does the same.
    assert_eq!(kill_standins(&server.export()), 1);
    let started = Instant::now();
    while std::fs::read_dir(&targets[1]).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not recovered by the check"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(targets[0].join("checkpoint").exists());

    // A mount helper that never returns (a server that does not answer) is killed at the
    // deadline, and meanwhile calls for the healthy export go through.
    let stuck = c
        .controller
        .create_volume({
            let mut r = create("pvc-stuck", "delete");
            r.parameters.insert("profile".into(), "stuck".into());
            r
        })
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let stuck_staging = plugin.dir("staging").join("stuck");
    std::fs::create_dir_all(&stuck_staging).unwrap();
    let mut stage = stage_request(&stuck, &stuck_staging);
    stage.volume_capability = Some(rwx.clone());
    let mut hung_client = c.clone();
    let started = Instant::now();
    let pending = tokio::spawn(async move { hung_client.node.node_stage_volume(stage).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let healthy = Instant::now();
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: ids[0].clone(),
            volume_path: targets[0].display().to_string(),
            ..Default::default()
        })
        .await;
    assert!(stats.is_ok(), "{stats:?}");
    // Well inside the hung mount's 4 s deadline: it did not wait for it.
    assert!(
        healthy.elapsed() < Duration::from_secs(3),
        "{:?}",
        healthy.elapsed()
    );
    let status = pending.await.unwrap().unwrap_err();
    unavailable_naming(&status, &server, started, 8);
    assert!(status.message().contains("killed"), "{}", status.message());
    let helpers_left = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("6017"))
        })
        .count();
    assert_eq!(helpers_left, 0, "the hung helper was killed");
    assert!(mounts_at(&stuck_staging).is_empty());

    // Unpublish and unstage work while the export is dead (nothing waits on the server).
    assert_eq!(kill_standins(&server.export()), 1);
    for (id, target) in ids.iter().zip(&targets) {
        let dir = id.rsplit('/').next().unwrap();
        let staging = plugin.dir("staging").join(dir);
        c.node
            .node_unpublish_volume(unpublish_request(id, target))
            .await
            .unwrap();
        c.node
            .node_unstage_volume(unstage_request(id, &staging))
            .await
            .unwrap();
        assert!(!target.exists());
        assert!(mounts_at(&staging).is_empty());
    }
}

#[tokio::test]
async fn with_mount_volume_each_volume_is_its_own_mount_released_at_the_last_unstage() {
    let Some(server) = Ganesha::start("legacy-rwx mount: volume") else {
        return;
    };
    let helper = server.standin(false);
    let config = config(&server, &helper, "").replace(
        "      mount_command:",
        "      mount: volume\n      mount_command:",
    );
    let plugin = Plugin::with_config(&config, None);
    let mut c = plugin.clients().await;
    let rwx = mount_capability(Mode::MultiNodeMultiWriter, &[]);
    let mut volumes = Vec::new();
    for name in ["pvc-a", "pvc-b"] {
        let id = c
            .controller
            .create_volume(create(name, "delete"))
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap()
            .volume_id;
        let staging = plugin.dir("staging").join(name);
        let target = plugin.dir("pods").join(name);
        std::fs::create_dir_all(&staging).unwrap();
        let mut stage = stage_request(&id, &staging);
        stage.volume_capability = Some(rwx.clone());
        c.node.node_stage_volume(stage).await.unwrap();
        let mut publish = publish_request(&id, &staging, &target, false);
        publish.volume_capability = Some(rwx.clone());
        c.node.node_publish_volume(publish).await.unwrap();
        volumes.push((id, staging, target));
    }
    // One mount per volume, of that volume's directory only.
    let log = std::fs::read_to_string(server.mount_log()).unwrap();
    let expected: Vec<String> = ["pvc-a", "pvc-b"]
        .iter()
        .map(|name| {
            format!(
                "-t nfs -o vers=4.1,hard,timeo=600 {}:{}/teams/ml/{name}/data {}",
                server.addr(),
                server.export().display(),
                plugin.data_dir.join("nfs/nfs/volumes").join(name).display()
            )
        })
        .collect();
    assert_eq!(log.lines().collect::<Vec<_>>(), expected);
    std::fs::write(volumes[0].2.join("out"), "a").unwrap();
    assert_eq!(
        std::fs::read_to_string(server.export().join("teams/ml/pvc-a/data/out")).unwrap(),
        "a"
    );
    // Staged on this node: the controller will not delete it, and says where.
    let status = c
        .controller
        .delete_volume(delete_request(&volumes[0].0))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("test-node"),
        "{}",
        status.message()
    );

    // Both volumes' mounts die; a call for one brings back that one's.
    assert_eq!(
        kill_standins(&server.export().join("teams/ml/pvc-a/data")),
        1
    );
    assert!(std::fs::read_dir(&volumes[0].2).is_err());
    assert!(
        std::fs::read_dir(&volumes[1].2).is_ok(),
        "the other volume's mount is its own"
    );
    c.node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: volumes[0].0.clone(),
            volume_path: volumes[0].2.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(volumes[0].2.join("out")).unwrap(),
        "a"
    );

    // The last unstage takes the volume's mount away (and its marker: delete works).
    for (id, staging, target) in &volumes {
        c.node
            .node_unpublish_volume(unpublish_request(id, target))
            .await
            .unwrap();
        c.node
            .node_unstage_volume(unstage_request(id, staging))
            .await
            .unwrap();
        let point = plugin
            .data_dir
            .join("nfs/nfs/volumes")
            .join(id.rsplit('/').next().unwrap());
        assert!(mounts_at(&point).is_empty(), "{}", point.display());
        assert!(!point.exists());
        // A publish of a volume not staged here is refused and mounts nothing.
        let mut publish = publish_request(id, staging, target, false);
        publish.volume_capability = Some(rwx.clone());
        assert_code(
            c.node.node_publish_volume(publish).await,
            Code::FailedPrecondition,
            "publish without a stage",
        );
        assert!(mounts_at(&point).is_empty(), "{}", point.display());
        c.controller
            .delete_volume(delete_request(id))
            .await
            .unwrap();
    }
    wait_for_names(&server.export().join("teams/ml"), &[]);
}
