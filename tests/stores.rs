//! One set of behaviours, run against every object store: the file:// store, and the S3
//! store talking real HTTP to a real S3 server (moto) on loopback that this test starts.

use std::path::{Path, PathBuf};
use std::process::Command;

use lanes::dataset::reference::Selector;
use lanes::dataset::repo::Repo;
use lanes::dataset::store::fs::FsStore;
use lanes::dataset::store::s3::{Multipart, S3Settings, S3Store};
use lanes::dataset::store::{Blob, ObjectStore};
use lanes::error::Kind;

mod common;
use common::moto::Moto;

/// The behaviours every store must show.
async fn contract<S: ObjectStore>(store: &S, scratch: &Path) {
    assert_eq!(store.get("a/missing").await.unwrap(), None);
    assert!(!store.exists("a/missing").await.unwrap());

    store.put("a/one", b"first".to_vec()).await.unwrap();
    store.put("a/one", b"second".to_vec()).await.unwrap();
    assert_eq!(
        store.get("a/one").await.unwrap().as_deref(),
        Some(&b"second"[..])
    );
    assert!(store.exists("a/one").await.unwrap());

    assert!(
        store
            .put_if_absent("m/v1", b"winner".to_vec())
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_if_absent("m/v1", b"loser".to_vec())
            .await
            .unwrap()
    );
    assert_eq!(
        store.get("m/v1").await.unwrap().as_deref(),
        Some(&b"winner"[..])
    );

    let source = scratch.join("upload");
    std::fs::write(&source, vec![42u8; 3 << 20]).unwrap();
    use sha2::Digest as _;
    let digest: [u8; 32] = sha2::Sha256::digest(vec![42u8; 3 << 20]).into();
    assert!(
        store
            .put_blob("blobs/big", Blob::File(source.clone()), &digest, false)
            .await
            .unwrap()
    );
    assert!(
        !store
            .put_blob("blobs/big", Blob::File(source), &digest, true)
            .await
            .unwrap(),
        "if_absent leaves an existing body alone"
    );
    let small: [u8; 32] = sha2::Sha256::digest(b"small body").into();
    assert!(
        store
            .put_blob(
                "blobs/small",
                Blob::Memory(b"small body".to_vec()),
                &small,
                true
            )
            .await
            .unwrap()
    );
    assert_eq!(
        store.get("blobs/small").await.unwrap().as_deref(),
        Some(&b"small body"[..])
    );
    let target = scratch.join("download");
    let fetched = store
        .get_to_file("blobs/big", &target)
        .await
        .unwrap()
        .expect("present");
    assert_eq!(fetched, digest);
    assert_eq!(std::fs::read(&target).unwrap(), vec![42u8; 3 << 20]);
    assert!(
        store
            .get_to_file("blobs/none", &scratch.join("none"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(!scratch.join("none").exists());
    // A download never writes through something already at its path (a planted link).
    let victim = scratch.join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, scratch.join("planted")).unwrap();
    assert!(
        store
            .get_to_file("blobs/big", &scratch.join("planted"))
            .await
            .is_err()
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");

    store.put("a/two", vec![]).await.unwrap();
    store.put("a/sub/three", vec![1]).await.unwrap();
    assert_eq!(
        store.list("a/").await.unwrap(),
        vec!["a/one", "a/sub/three", "a/two"]
    );
    assert_eq!(store.list("nothing/").await.unwrap(), Vec::<String>::new());

    store.delete("a/two").await.unwrap();
    store.delete("a/two").await.unwrap();
    assert!(!store.exists("a/two").await.unwrap());

    for bad in [
        "../x",
        "a/../../x",
        "/abs",
        "a//b",
        "a/./b",
        "nul\0",
        "sp ace",
    ] {
        let err = store.get(bad).await.unwrap_err();
        assert_eq!(err.kind(), Kind::InvalidArgument, "{bad:?}");
        assert!(store.put(bad, vec![]).await.is_err(), "{bad:?}");
    }
}

/// Push / pull round trip and dedup through the repository on a store.
async fn round_trip<S: ObjectStore + Clone + 'static>(store: S, scratch: &Path) {
    let repo = Repo::new(store, "test", true, 8);
    let src = scratch.join("src");
    std::fs::create_dir_all(src.join("nested/deeper")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    for i in 0..100u32 {
        std::fs::write(
            src.join(format!("nested/f{i}")),
            i.to_le_bytes().repeat(100 + i as usize),
        )
        .unwrap();
    }
    std::fs::write(src.join("nested/deeper/zero"), b"").unwrap();
    std::os::unix::fs::symlink("nested/f1", src.join("link")).unwrap();
    // One large body (100 MiB of seeded bytes).
    let mut big = vec![0u8; 100 << 20];
    rand::Rng::fill(
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5),
        &mut big[..],
    );
    std::fs::write(src.join("big.bin"), &big).unwrap();
    repo.create("ds", "").await.unwrap();
    let first = repo
        .push(&src, "ds", "first", Some("gold"), true)
        .await
        .unwrap();
    assert_eq!(first.bodies_uploaded, 102);
    std::fs::write(src.join("nested/f7"), b"changed").unwrap();
    let second = repo.push(&src, "ds", "second", None, true).await.unwrap();
    assert_eq!(
        second.bodies_uploaded, 1,
        "only the changed body is uploaded"
    );
    let out = scratch.join("out");
    let pulled = repo.pull("ds", &Selector::Latest, &out).await.unwrap();
    assert_eq!(pulled.downloaded, 102);
    assert_eq!(std::fs::read(out.join("nested/f7")).unwrap(), b"changed");
    assert!(
        std::fs::read(out.join("big.bin")).unwrap() == big,
        "the 100 MiB body round-trips"
    );
    assert_eq!(
        std::fs::read_link(out.join("link")).unwrap(),
        PathBuf::from("nested/f1")
    );
    assert!(out.join("empty").is_dir());
    let gold = repo
        .resolve("ds", &Selector::Named("gold".into()))
        .await
        .unwrap();
    assert_eq!(gold.head.version, "v1");
}

#[tokio::test]
async fn file_store() {
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    contract(&FsStore::new(dir.path().join("bucket")), &scratch).await;
    round_trip(FsStore::new(dir.path().join("bucket2")), &scratch).await;
}

#[tokio::test]
async fn s3_store_against_a_real_server() {
    let Some(moto) = Moto::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let scratch = dir.path().join("scratch");
    std::fs::create_dir(&scratch).unwrap();
    contract(&moto.store("contract", "some/prefix").await, &scratch).await;
    round_trip(moto.store("datasets", "").await, &scratch).await;
    // An unreachable server is UNAVAILABLE, not an internal error.
    let dead = S3Store::connect(
        "x",
        "",
        &S3Settings {
            endpoint: Some("http://127.0.0.1:9".into()),
            ..moto.settings()
        },
    )
    .await;
    assert_eq!(
        dead.exists("k").await.unwrap_err().kind(),
        Kind::Unavailable
    );
}

#[tokio::test]
async fn large_bodies_go_up_in_parts_checked_against_their_hash() {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest as _;
    let Some(moto) = Moto::start() else { return };
    moto.store("parts", "").await;
    let settings = S3Settings {
        multipart: Multipart {
            threshold: 8 << 20,
            part_size: 5 << 20,
            parallel: 3,
        },
        ..moto.settings()
    };
    let store = S3Store::connect("parts", "", &settings).await;
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("big");
    let mut bytes = vec![0u8; (23 << 20) + 12345];
    rand_chacha::ChaCha8Rng::seed_from_u64(23).fill_bytes(&mut bytes);
    std::fs::write(&source, &bytes).unwrap();
    let digest: [u8; 32] = sha2::Sha256::digest(&bytes).into();

    assert!(
        store
            .put_blob("blobs/big", Blob::File(source.clone()), &digest, false)
            .await
            .unwrap()
    );
    let head = moto
        .client()
        .head_object()
        .bucket("parts")
        .key("blobs/big")
        .send()
        .await
        .unwrap();
    assert!(
        head.e_tag().unwrap_or_default().ends_with("-5\""),
        "five parts: {:?}",
        head.e_tag()
    );
    let target = dir.path().join("back");
    assert_eq!(
        store.get_to_file("blobs/big", &target).await.unwrap(),
        Some(digest)
    );
    assert!(std::fs::read(&target).unwrap() == bytes, "same bytes back");

    // A file that is not what its hash says (changed since it was hashed) is never
    // completed: no object, and no upload left open.
    let err = store
        .put_blob("blobs/wrong", Blob::File(source.clone()), &[0u8; 32], false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("changed while"), "{err}");
    assert!(!store.exists("blobs/wrong").await.unwrap());
    let open = moto
        .client()
        .list_multipart_uploads()
        .bucket("parts")
        .send()
        .await
        .unwrap();
    assert!(open.uploads().is_empty(), "{:?}", open.uploads());

    // Conditional completion leaves an existing body alone.
    assert!(
        !store
            .put_blob("blobs/big", Blob::File(source), &digest, true)
            .await
            .unwrap()
    );
}

#[tokio::test]
async fn dataset_cli_on_an_s3_bucket() {
    let Some(moto) = Moto::start() else { return };
    moto.store("cli-bucket", "").await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  default_bucket: prod\n  buckets:\n    prod: {{dataset_path: \"s3://cli-bucket/lanes\", region: us-east-1, endpoint: \"{}\"}}\n",
            moto.endpoint
        ),
    )
    .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("train.csv"), b"a,b\n1,2\n").unwrap();
    let run = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lanes"));
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .arg("dataset")
            .args(args);
        // Only what the test gives: no ambient AWS settings.
        for (key, _) in std::env::vars() {
            if key.starts_with("AWS_") {
                command.env_remove(key);
            }
        }
        command
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing");
        command
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
        command.output().unwrap()
    };
    let ok = |output: std::process::Output| {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    ok(run(&["create", "iris"]));
    let pushed = ok(run(&[
        "push",
        src.to_str().unwrap(),
        "iris",
        "-m",
        "v1 data",
    ]));
    assert!(pushed.contains("iris:v1 committed"), "{pushed}");
    let out = dir.path().join("out");
    ok(run(&["pull", "prod/iris:v1", out.to_str().unwrap()]));
    assert_eq!(std::fs::read(out.join("train.csv")).unwrap(), b"a,b\n1,2\n");
    let versions = ok(run(&["versions", "iris"]));
    assert!(versions.contains("v1 data"), "{versions}");
}

#[tokio::test]
async fn an_interrupted_push_leaves_no_version_and_a_rerun_completes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  buckets:\n    b: {{dataset_path: \"file://{}/bucket\"}}\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..200u32 {
        std::fs::write(src.join(format!("f{i}")), i.to_le_bytes().repeat(5000)).unwrap();
    }
    let run = |args: &[&str], failpoint: Option<&str>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_lanes"));
        command
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .arg("dataset")
            .args(args);
        match failpoint {
            Some(point) => command.env("LANES_FAILPOINT", point),
            None => command.env_remove("LANES_FAILPOINT"),
        };
        command.output().unwrap()
    };
    assert!(run(&["create", "ds"], None).status.success());
    let killed = run(
        &["--jobs", "4", "push", src.to_str().unwrap(), "ds"],
        Some("dataset.push.uploaded:50"),
    );
    assert!(!killed.status.success(), "the failpoint kills the push");
    let versions = run(&["--json", "versions", "ds"], None);
    assert_eq!(
        String::from_utf8_lossy(&versions.stdout).trim(),
        "[]",
        "no version after an interrupted push"
    );
    let rerun = run(&["--json", "push", src.to_str().unwrap(), "ds"], None);
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(report["version"], "v1");
    let uploaded = report["bodies_uploaded"].as_u64().unwrap();
    assert!(
        uploaded <= 150,
        "bodies uploaded before the kill are not uploaded again: {uploaded}"
    );
    let out = dir.path().join("out");
    assert!(
        run(&["pull", "ds", out.to_str().unwrap()], None)
            .status
            .success()
    );
    assert_eq!(
        std::fs::read(out.join("f199")).unwrap(),
        199u32.to_le_bytes().repeat(5000)
    );
}
