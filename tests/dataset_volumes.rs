//! Dataset volumes end to end: the real plugin on a unix socket, a real S3 server (moto) on
//! loopback holding the datasets, real bind and overlay mounts of the node cache.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::moto::Moto;
use common::{Plugin, assert_code, create_request, mounts_at, privileged, rwo, unpublish_request};
use lanes::dataset::repo::Repo;
use lanes::dataset::store::s3::S3Store;
use lanes::proto::{CreateVolumeRequest, NodePublishVolumeRequest};
use rand::{Rng, SeedableRng};
use tonic::Code;

/// Moto with bucket `ds`, a repository on it, and the config that names it `prod`.
struct Bucket {
    moto: Moto,
    repo: Repo<S3Store>,
}

impl Bucket {
    async fn start() -> Option<Bucket> {
        let moto = Moto::start()?;
        let store = moto.store("datasets", "lanes").await;
        let repo = Repo::new(store, "prod", true, 8);
        Some(Bucket { moto, repo })
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "datasets:\n  default_bucket: prod\n  buckets:\n    prod: {{dataset_path: \"s3://datasets/lanes\", region: us-east-1, endpoint: \"{}\"}}\n{extra}",
            self.moto.endpoint
        )
    }

    /// Pushes `dir` as the next committed version of `name` (creating the dataset).
    async fn push(&self, dir: &Path, name: &str, tag: Option<&str>) -> String {
        let _ = self.repo.create(name, "").await;
        self.repo
            .push(dir, name, "test", tag, true)
            .await
            .unwrap()
            .version
    }
}

/// A tree of `files` files of about `size` bytes each, nested two levels, with a symlink.
fn tree(root: &Path, seed: u64, files: usize, size: usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for i in 0..files {
        let path = root.join(format!("d{}/e{}/f{i}.bin", i % 3, i % 2));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body: Vec<u8> = (0..size).map(|_| rng.random()).collect();
        std::fs::write(&path, body).unwrap();
    }
    std::fs::write(root.join("README"), format!("seed {seed}\n")).unwrap();
    std::os::unix::fs::symlink("README", root.join("link")).unwrap();
}

/// Path → (kind, bytes or link text) of a tree, for equality checks.
fn listing(root: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_symlink() {
                let target = std::fs::read_link(&path).unwrap();
                out.insert(rel, format!("link:{}", target.display()).into_bytes());
            } else if meta.is_dir() {
                out.insert(rel, b"dir".to_vec());
                stack.push(path);
            } else {
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    out
}

fn inline(
    volume_id: &str,
    target: &Path,
    reference: &str,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.to_owned(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwo()),
        readonly,
        volume_context: [
            ("dataset", reference),
            ("csi.storage.k8s.io/ephemeral", "true"),
            ("csi.storage.k8s.io/pod.name", "trainer-0"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        ..Default::default()
    }
}

fn cache_dir(plugin: &Plugin, sub: &str) -> PathBuf {
    plugin.data_dir.join("cache").join(sub)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn blobs(plugin: &Plugin) -> usize {
    entries(&cache_dir(plugin, "blobs"))
        .iter()
        .map(|shard| entries(&cache_dir(plugin, "blobs").join(shard)).len())
        .sum()
}

#[tokio::test]
async fn read_only_and_writable_inline_volumes() {
    if !privileged("read_only_and_writable_inline_volumes") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 1, 24, 3000);
    assert_eq!(bucket.push(src.path(), "iris", Some("best")).await, "v1");
    let plugin = Plugin::with_config(&bucket.config(""), None);
    let mut c = plugin.clients().await;
    let pods = plugin.dir("pods");

    // Read-only: exactly the version's files, on a read-only mount.
    let ro = pods.join("ro");
    let request = inline("csi-ro", &ro, "prod/iris:best", true);
    c.node.node_publish_volume(request.clone()).await.unwrap();
    assert_eq!(listing(&ro), listing(src.path()));
    let mount = mounts_at(&ro);
    assert_eq!(mount.len(), 1);
    assert!(mount[0].read_only() && mount[0].has_option("nosuid") && mount[0].has_option("nodev"));
    let err = std::fs::write(ro.join("README"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EROFS), "{err}");
    for _ in 0..3 {
        c.node.node_publish_volume(request.clone()).await.unwrap();
    }
    let stats = c
        .node
        .node_get_volume_stats(lanes::proto::NodeGetVolumeStatsRequest {
            volume_id: "csi-ro".into(),
            volume_path: ro.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.usage[0].total > 0 && !stats.volume_condition.unwrap().abnormal);
    assert_eq!(mounts_at(&ro).len(), 1, "repeats mount nothing more");

    // Writable: an overlay; the pod's writes stay in its volume.
    let rw = pods.join("rw");
    c.node
        .node_publish_volume(inline("csi-rw", &rw, "iris", false))
        .await
        .unwrap();
    assert_eq!(mounts_at(&rw)[0].fs_type, "overlay");
    std::fs::write(rw.join("README"), b"changed by the pod").unwrap();
    std::fs::write(rw.join("d0/new.txt"), b"new").unwrap();
    std::fs::remove_file(rw.join("d1/e1/f1.bin")).unwrap();
    assert_eq!(
        std::fs::read(ro.join("README")).unwrap(),
        b"seed 1\n",
        "the cached tree is untouched"
    );

    for (id, target) in [("csi-ro", &ro), ("csi-rw", &rw)] {
        for _ in 0..2 {
            c.node
                .node_unpublish_volume(unpublish_request(id, target))
                .await
                .unwrap();
        }
        assert!(!target.exists(), "unpublish removes the target");
    }
    assert!(
        entries(&plugin.data_dir.join("ephemeral")).is_empty(),
        "per-volume dirs removed"
    );

    // The next writable volume of the same version sees the original.
    let again = pods.join("again");
    c.node
        .node_publish_volume(inline("csi-again", &again, "prod/iris:v1", false))
        .await
        .unwrap();
    assert_eq!(listing(&again), listing(src.path()));
    c.node
        .node_unpublish_volume(unpublish_request("csi-again", &again))
        .await
        .unwrap();
    assert_eq!(
        entries(&cache_dir(&plugin, "trees")).len(),
        2,
        "one tree and its record"
    );

    // With the bucket gone, an explicit version this node holds still publishes (committed
    // versions never change); a tag still needs the bucket and says so.
    drop(bucket);
    let offline = pods.join("offline");
    c.node
        .node_publish_volume(inline("csi-offline", &offline, "prod/iris:v1", true))
        .await
        .unwrap();
    assert_eq!(listing(&offline), listing(src.path()));
    c.node
        .node_unpublish_volume(unpublish_request("csi-offline", &offline))
        .await
        .unwrap();
    let tagged = pods.join("tagged");
    let err = c
        .node
        .node_publish_volume(inline("csi-tagged", &tagged, "prod/iris:best", true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(mounts_at(&tagged).is_empty());
}

#[tokio::test]
async fn two_versions_store_shared_bodies_once() {
    if !privileged("two_versions_store_shared_bodies_once") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 2, 30, 2000);
    bucket.push(src.path(), "mnist", None).await;
    std::fs::write(src.path().join("d0/e0/f0.bin"), b"retrained").unwrap();
    std::fs::write(src.path().join("extra.txt"), b"more").unwrap();
    bucket.push(src.path(), "mnist", None).await;
    let plugin = Plugin::with_config(&bucket.config(""), None);
    let mut c = plugin.clients().await;
    let pods = plugin.dir("pods");
    let (one, two) = (pods.join("one"), pods.join("two"));
    c.node
        .node_publish_volume(inline("v1", &one, "mnist:v1", true))
        .await
        .unwrap();
    c.node
        .node_publish_volume(inline("v2", &two, "mnist:v2", true))
        .await
        .unwrap();
    assert_eq!(listing(&two), listing(src.path()));
    let same = std::fs::metadata(one.join("d2/e1/f5.bin")).unwrap();
    let shared = std::fs::metadata(two.join("d2/e1/f5.bin")).unwrap();
    assert_eq!(
        (same.dev(), same.ino()),
        (shared.dev(), shared.ino()),
        "one body on disk"
    );
    // 30 files + README in v1 (README is shared), one changed and one new body in v2.
    assert_eq!(blobs(&plugin), 31 + 2);
    for (id, target) in [("v1", &one), ("v2", &two)] {
        c.node
            .node_unpublish_volume(unpublish_request(id, target))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn eviction_never_removes_a_tree_in_use() {
    if !privileged("eviction_never_removes_a_tree_in_use") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    for (seed, name) in [(3, "a"), (4, "b")] {
        let src = tempfile::tempdir().unwrap();
        tree(src.path(), seed, 8, 256 << 10);
        bucket.push(src.path(), name, None).await;
    }
    let plugin = Plugin::with_config(&bucket.config("cache:\n  max_bytes: 3Mi\n"), None);
    let mut c = plugin.clients().await;
    let pods = plugin.dir("pods");
    let (a, b) = (pods.join("a"), pods.join("b"));
    c.node
        .node_publish_volume(inline("a", &a, "a", true))
        .await
        .unwrap();
    let full = c.node.node_publish_volume(inline("b", &b, "b", true)).await;
    let message = full
        .as_ref()
        .map_err(|s| s.message().to_owned())
        .unwrap_err();
    assert_code(full, Code::ResourceExhausted, "cache full of a tree in use");
    assert!(message.contains("cache.max_bytes"), "{message}");
    assert_eq!(listing(&a).len(), 8 + 3 + 6 + 2, "the tree in use is whole");

    c.node
        .node_unpublish_volume(unpublish_request("a", &a))
        .await
        .unwrap();
    c.node
        .node_publish_volume(inline("b", &b, "b", true))
        .await
        .unwrap();
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
        .arg("--data-dir")
        .arg(&plugin.data_dir)
        .args(["cache", "ls"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    assert!(
        text.contains("prod/b:v1") && !text.contains("prod/a:v1"),
        "a was evicted:\n{text}"
    );
    assert_eq!(blobs(&plugin), 9, "a's bodies went with its tree");
    c.node
        .node_unpublish_volume(unpublish_request("b", &b))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_kill_during_download_leaves_no_partial_tree() {
    if !privileged("a_kill_during_download_leaves_no_partial_tree") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 5, 40, 1000);
    bucket.push(src.path(), "big", None).await;
    let mut plugin = Plugin::with_config(&bucket.config(""), Some("cache.fill.downloaded:10"));
    let target = plugin.dir("pods").join("t");
    {
        let mut c = plugin.clients().await;
        assert!(
            c.node
                .node_publish_volume(inline("k", &target, "big", true))
                .await
                .is_err()
        );
    }
    plugin.wait_dead();
    assert!(
        entries(&cache_dir(&plugin, "trees")).is_empty(),
        "no tree looks ready"
    );
    assert!(mounts_at(&target).is_empty());
    plugin.restart_with(None);
    assert!(
        entries(&cache_dir(&plugin, "tmp")).is_empty(),
        "scratch cleared at start"
    );
    let mut c = plugin.clients().await;
    c.node
        .node_publish_volume(inline("k", &target, "big", true))
        .await
        .unwrap();
    assert_eq!(listing(&target), listing(src.path()));
    c.node
        .node_unpublish_volume(unpublish_request("k", &target))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_corrupted_cached_body_is_fetched_again() {
    if !privileged("a_corrupted_cached_body_is_fetched_again") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 6, 6, 5000);
    bucket.push(src.path(), "c", None).await;
    let plugin = Plugin::with_config(&bucket.config(""), None);
    let mut c = plugin.clients().await;
    let target = plugin.dir("pods").join("t");
    c.node
        .node_publish_volume(inline("c1", &target, "c", true))
        .await
        .unwrap();
    c.node
        .node_unpublish_volume(unpublish_request("c1", &target))
        .await
        .unwrap();
    // Flip a byte of every cached body, keeping sizes.
    let root = cache_dir(&plugin, "blobs");
    for shard in entries(&root) {
        for blob in entries(&root.join(&shard)) {
            let path = root.join(&shard).join(blob);
            let mut body = std::fs::read(&path).unwrap();
            body[0] ^= 0xff;
            std::fs::write(&path, body).unwrap();
        }
    }
    c.node
        .node_publish_volume(inline("c2", &target, "c", true))
        .await
        .unwrap();
    assert_eq!(
        listing(&target),
        listing(src.path()),
        "damaged bodies were never mounted"
    );
    c.node
        .node_unpublish_volume(unpublish_request("c2", &target))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_slow_download_answers_unavailable_and_goes_on() {
    if !privileged("a_slow_download_answers_unavailable_and_goes_on") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 7, 5, 100);
    bucket.push(src.path(), "slow", None).await;
    let plugin = Plugin::with_config(
        &bucket.config("cache:\n  publish_timeout_seconds: 1\n"),
        Some("delay:cache.fill"),
    );
    let mut c = plugin.clients().await;
    let pods = plugin.dir("pods");
    let (one, two) = (pods.join("one"), pods.join("two"));
    let (mut n1, mut n2) = (c.node.clone(), c.node.clone());
    let (first, second) = tokio::join!(
        n1.node_publish_volume(inline("s1", &one, "slow", true)),
        n2.node_publish_volume(inline("s2", &two, "slow", false)),
    );
    for answer in [first, second] {
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{}", status.message());
        assert!(
            status.message().contains("still downloading"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("prod/slow:v1"),
            "{}",
            status.message()
        );
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match c
            .node
            .node_publish_volume(inline("s1", &one, "slow", true))
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "download never finished"
                );
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    }
    c.node
        .node_publish_volume(inline("s2", &two, "slow", false))
        .await
        .unwrap();
    assert_eq!(listing(&one), listing(src.path()));
    assert_eq!(listing(&two), listing(src.path()));
    assert_eq!(
        entries(&cache_dir(&plugin, "trees")).len(),
        2,
        "downloaded once: one tree"
    );
    for (id, target) in [("s1", &one), ("s2", &two)] {
        c.node
            .node_unpublish_volume(unpublish_request(id, target))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn bad_references_get_clear_errors_and_mount_nothing() {
    if !privileged("bad_references_get_clear_errors_and_mount_nothing") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let config = format!(
        "{}    gone: {{dataset_path: \"s3://datasets/x\", region: us-east-1, endpoint: \"http://127.0.0.1:9\"}}\n",
        bucket.config("")
    );
    let plugin = Plugin::with_config(&config, None);
    let mut c = plugin.clients().await;
    let pods = plugin.dir("pods");
    let target = pods.join("t");
    let missing = c
        .node
        .node_publish_volume(inline("n1", &target, "prod/nope:v9", true))
        .await;
    let text = missing.as_ref().unwrap_err().message().to_owned();
    assert_code(missing, Code::NotFound, "missing dataset");
    assert!(text.contains("prod/nope:v9"), "{text}");
    assert_code(
        c.node
            .node_publish_volume(inline("n2", &target, "gone/x", true))
            .await,
        Code::Unavailable,
        "unreachable bucket",
    );
    let mut unknown = inline("n3", &target, "x", true);
    unknown.volume_context.insert("size".into(), "1Gi".into());
    assert_code(
        c.node.node_publish_volume(unknown).await,
        Code::InvalidArgument,
        "unknown attribute",
    );
    assert_code(
        c.node
            .node_publish_volume(inline("n4", &target, "../../etc", true))
            .await,
        Code::InvalidArgument,
        "bad reference",
    );
    assert!(mounts_at(&target).is_empty());
    for id in ["n1", "n2", "n3", "n4"] {
        c.node
            .node_unpublish_volume(unpublish_request(id, &target))
            .await
            .unwrap();
    }
    assert!(!target.exists());
}

#[tokio::test]
async fn a_persistent_volume_keeps_the_version_pinned_at_creation() {
    if !privileged("a_persistent_volume_keeps_the_version_pinned_at_creation") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 8, 6, 700);
    bucket.push(src.path(), "coco", None).await;
    let plugin = Plugin::with_config(&bucket.config(""), None);
    let mut c = plugin.clients().await;
    let mut create = common::create_request("pvc-coco", 1 << 20);
    create.parameters.insert("dataset".into(), "coco".into());
    let volume = c
        .controller
        .create_volume(create.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        volume.volume_context.get("dataset").map(String::as_str),
        Some("prod/coco:v1")
    );

    // A newer version does not change the volume, not even through a repeated create.
    std::fs::write(src.path().join("README"), b"v2").unwrap();
    bucket.push(src.path(), "coco", None).await;
    let again = c
        .controller
        .create_volume(create)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_context, volume.volume_context);

    let id = volume.volume_id.clone();
    let staging = plugin.dir("staging");
    let target = plugin.dir("pods").join("t");
    let stage = common::stage_request(&id, &staging);
    c.node.node_stage_volume(stage.clone()).await.unwrap();
    c.node.node_stage_volume(stage.clone()).await.unwrap();
    c.node
        .node_publish_volume(common::publish_request(&id, &staging, &target, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(target.join("README")).unwrap(), b"seed 8\n");
    std::fs::write(target.join("checkpoint.pt"), b"weights").unwrap();
    assert_code(
        c.controller
            .delete_volume(common::delete_request(&id))
            .await,
        Code::FailedPrecondition,
        "delete while staged",
    );
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(common::unstage_request(&id, &staging))
        .await
        .unwrap();
    assert!(mounts_at(&staging).is_empty());

    // Writes persist with the volume; the data under it is still v1.
    c.node.node_stage_volume(stage).await.unwrap();
    c.node
        .node_publish_volume(common::publish_request(&id, &staging, &target, true))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("checkpoint.pt")).unwrap(),
        b"weights"
    );
    assert_eq!(std::fs::read(target.join("README")).unwrap(), b"seed 8\n");
    c.node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(common::unstage_request(&id, &staging))
        .await
        .unwrap();
    c.controller
        .delete_volume(common::delete_request(&id))
        .await
        .unwrap();

    let mut missing = common::create_request("pvc-none", 1 << 20);
    missing
        .parameters
        .insert("dataset".into(), "nothing-here".into());
    assert_code(
        c.controller.create_volume(missing).await,
        Code::NotFound,
        "missing dataset",
    );
}

fn git(dir: &Path, args: &[&str]) -> String {
    let output = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["-c", "user.name=t", "-c", "user.email=t@example.invalid"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

#[tokio::test]
async fn a_git_dataset_at_a_tag_publishes_the_tagged_commit() {
    if !privileged("a_git_dataset_at_a_tag_publishes_the_tagged_commit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("data.git");
    std::fs::create_dir_all(repo.join("labels")).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    std::fs::write(repo.join("labels/a.txt"), b"tagged").unwrap();
    std::fs::write(repo.join("run.sh"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        repo.join("run.sh"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "one"]);
    git(&repo, &["tag", "-a", "v1", "-m", "release"]);
    std::fs::write(repo.join("labels/a.txt"), b"later").unwrap();
    std::fs::write(repo.join("labels/b.txt"), b"later").unwrap();
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "two"]);

    let reference = format!("git+file://{}@v1", repo.display());
    // By default a volume may not name a file:// (or any non-https, or internal) Git source:
    // refused before anything is fetched or mounted.
    let strict = Plugin::with_config("", None);
    let mut c = strict.clients().await;
    let target = strict.dir("pods").join("g");
    for refused in [
        reference.clone(),
        "git+http://127.0.0.1:9/repo.git@main".to_owned(),
        "git+https://127.0.0.1:9/repo.git@main".to_owned(),
        "git+https://169.254.169.254/repo.git@main".to_owned(),
        "git+ssh://git@10.0.0.1/repo.git@main".to_owned(),
    ] {
        let err = c
            .node
            .node_publish_volume(inline("g0", &target, &refused, true))
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{refused}: {}",
            err.message()
        );
        assert!(
            err.message().contains("not allowed for volumes"),
            "{}",
            err.message()
        );
        assert!(!target.exists(), "{refused}: nothing created");
    }
    let pvc = c
        .controller
        .create_volume(CreateVolumeRequest {
            parameters: [("dataset".to_owned(), reference.clone())].into(),
            ..create_request("pvc-git", 1 << 20)
        })
        .await
        .unwrap_err();
    assert_eq!(
        pvc.code(),
        tonic::Code::InvalidArgument,
        "{}",
        pvc.message()
    );
    drop(strict);

    let plugin = Plugin::with_config("datasets:\n  git:\n    transports: [file]\n", None);
    let mut c = plugin.clients().await;
    let target = plugin.dir("pods").join("g");
    c.node
        .node_publish_volume(inline("g1", &target, &reference, true))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("labels/a.txt")).unwrap(),
        b"tagged"
    );
    assert!(!target.join("labels/b.txt").exists());
    assert!(!target.join(".git").exists());
    let mode = std::fs::metadata(target.join("run.sh")).unwrap().mode();
    assert_eq!(mode & 0o777, 0o755);
    c.node
        .node_unpublish_volume(unpublish_request("g1", &target))
        .await
        .unwrap();
}

/// A Kubernetes API on loopback (real HTTP, served by the test) that knows one PVC with a
/// dataset annotation; returns a kubeconfig file naming it.
async fn kube_api_with_pvc(dir: &Path, annotation: &str) -> PathBuf {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    let pvc = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("claim-1".into()),
            namespace: Some("team-a".into()),
            annotations: Some([("lanes.csi.dev/dataset".to_owned(), annotation.to_owned())].into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let objects = common::kube::Objects::default();
    objects.put(
        "/api/v1/namespaces/team-a/persistentvolumeclaims",
        serde_json::to_value(&pvc).unwrap(),
    );
    // The stand-in serves until the test's runtime ends; its kubeconfig lives in `dir`.
    common::kube::KubeStandIn::start(dir, objects)
        .await
        .kubeconfig
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pvc_annotation_asks_for_a_dataset() {
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 9, 3, 100);
    bucket.push(src.path(), "voc", Some("gold")).await;
    let kubeconfig = kube_api_with_pvc(src.path(), "voc:gold").await;
    let plugin = Plugin::with_config_env(
        &bucket.config(""),
        None,
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    );
    let mut c = plugin.clients().await;
    let mut create = common::create_request("pvc-annotated", 1 << 20);
    for (key, value) in [
        ("csi.storage.k8s.io/pvc/name", "claim-1"),
        ("csi.storage.k8s.io/pvc/namespace", "team-a"),
    ] {
        create.parameters.insert(key.into(), value.into());
    }
    let volume = c
        .controller
        .create_volume(create.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(
        volume.volume_context.get("dataset").map(String::as_str),
        Some("prod/voc:v1")
    );
    // A PVC without the annotation (unknown to the API) is a plain volume.
    create.name = "pvc-plain".into();
    create
        .parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "other".into());
    let plain = c
        .controller
        .create_volume(create)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(plain.volume_context.is_empty());
}

/// Damaged dataset content is DATA_LOSS (retrying will not help) and never strands a pod: a
/// tree set aside as damaged while mounted can still be unpublished, and a manifest that lies
/// about a file's size never becomes a tree.
#[tokio::test]
async fn damaged_datasets_are_data_loss_and_never_strand_a_pod() {
    use lanes::dataset::store::ObjectStore;
    if !privileged("damaged_datasets_are_data_loss_and_never_strand_a_pod") {
        return;
    }
    let Some(bucket) = Bucket::start().await else {
        return;
    };
    let src = tempfile::tempdir().unwrap();
    tree(src.path(), 8, 6, 4000);
    bucket.push(src.path(), "d", None).await;
    let plugin = Plugin::with_config(&bucket.config(""), None);
    let mut c = plugin.clients().await;
    let first = plugin.dir("pods").join("first");
    c.node
        .node_publish_volume(inline("d1", &first, "d:v1", true))
        .await
        .unwrap();
    // Damage the cached tree under the running pod: one file grows by a byte.
    let trees = cache_dir(&plugin, "trees");
    let key = entries(&trees)
        .into_iter()
        .find(|n| !n.ends_with(".json"))
        .unwrap();
    let victim = trees.join(&key).join("README");
    let mut body = std::fs::read(&victim).unwrap();
    body.push(b'!');
    std::fs::write(&victim, body).unwrap();
    // The next publish sets the damaged tree aside (still mounted for the first pod) and
    // builds a good one.
    let second = plugin.dir("pods").join("second");
    c.node
        .node_publish_volume(inline("d2", &second, "d:v1", true))
        .await
        .unwrap();
    assert_eq!(
        listing(&second),
        listing(src.path()),
        "the rebuilt tree is intact"
    );
    assert!(
        entries(&cache_dir(&plugin, "tmp"))
            .iter()
            .any(|n| n.starts_with("damaged-")),
        "the damaged tree is kept while mounted"
    );
    c.node
        .node_unpublish_volume(unpublish_request("d1", &first))
        .await
        .expect("a pod on a set-aside tree can still be unpublished");
    assert!(mounts_at(&first).is_empty() && !first.exists());
    assert!(
        !entries(&cache_dir(&plugin, "tmp"))
            .iter()
            .any(|n| n.starts_with("damaged-")),
        "the set-aside tree goes once nothing uses it"
    );
    c.node
        .node_unpublish_volume(unpublish_request("d2", &second))
        .await
        .unwrap();

    // A manifest that claims 1 GiB for a 4-byte body.
    let small = tempfile::tempdir().unwrap();
    std::fs::write(small.path().join("tiny"), b"four").unwrap();
    bucket.push(small.path(), "liar", None).await;
    let key = "datasets/liar/versions/v1.json";
    let store = bucket.repo.store();
    let (mut head, mut entries) = common::manifest_lines(&store.get(key).await.unwrap().unwrap());
    for entry in &mut entries {
        if entry["path"] == "tiny" {
            entry["size"] = serde_json::json!(1u64 << 30);
        }
    }
    // The head counts the same lie, so it is the body's size that gives it away.
    head["bytes"] = serde_json::json!(1u64 << 30);
    store
        .put(key, common::manifest_bytes(&head, &entries))
        .await
        .unwrap();
    let target = plugin.dir("pods").join("liar");
    let err = c
        .node
        .node_publish_volume(inline("l1", &target, "liar:v1", true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{}", err.message());
    assert!(err.message().contains("damaged"), "{}", err.message());
    assert!(mounts_at(&target).is_empty());
    c.node
        .node_unpublish_volume(unpublish_request("l1", &target))
        .await
        .unwrap();
    assert!(!target.exists());
}
