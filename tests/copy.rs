//! `lanes copy` on real trees generated from a seeded RNG, through the real binary.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Everything about a tree that a correct copy must preserve.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir {
        mode: u32,
    },
    File {
        mode: u32,
        mtime: (i64, i64),
        bytes: Vec<u8>,
        link_group: Option<PathBuf>,
    },
    Symlink(PathBuf),
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut first_path_of_inode: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = std::fs::read_dir(root.join(&dir))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        names.sort();
        for name in names {
            let rel = dir.join(name);
            let meta = std::fs::symlink_metadata(root.join(&rel)).unwrap();
            let node = if meta.file_type().is_symlink() {
                Node::Symlink(std::fs::read_link(root.join(&rel)).unwrap())
            } else if meta.is_dir() {
                stack.push(rel.clone());
                Node::Dir {
                    mode: meta.mode() & 0o7777,
                }
            } else {
                let link_group = (meta.nlink() > 1).then(|| {
                    first_path_of_inode
                        .entry((meta.dev(), meta.ino()))
                        .or_insert_with(|| rel.clone())
                        .clone()
                });
                Node::File {
                    mode: meta.mode() & 0o7777,
                    mtime: (meta.mtime(), meta.mtime_nsec()),
                    bytes: std::fs::read(root.join(&rel)).unwrap(),
                    link_group,
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// A deterministic tree: nested dirs, empty files and dirs, odd names, symlinks (one pointing
/// outside the tree), hard links, and a sparse file.
fn generate(root: &Path, seed: u64, files: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let names = ["a", "b b", "ünï", "deep", "x.y", "-dash", "日本"];
    let mut dirs = vec![root.to_path_buf()];
    for i in 0..files / 5 + 1 {
        let parent = dirs[rng.random_range(0..dirs.len())].clone();
        let dir = parent.join(format!("{} {i}", names[rng.random_range(0..names.len())]));
        std::fs::create_dir_all(&dir).unwrap();
        dirs.push(dir);
    }
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    for i in 0..files {
        let dir = &dirs[rng.random_range(0..dirs.len())];
        let path = dir.join(format!(
            "file {i} {}",
            names[rng.random_range(0..names.len())]
        ));
        let size = match rng.random_range(0..10) {
            0 => 0,
            1..=7 => rng.random_range(1..8192),
            _ => rng.random_range(8192..300_000),
        };
        let mut bytes = vec![0u8; size];
        rng.fill(&mut bytes[..]);
        std::fs::write(&path, &bytes).unwrap();
        std::fs::set_permissions(
            &path,
            std::fs::Permissions::from_mode([0o644, 0o600, 0o755, 0o640][i % 4]),
        )
        .unwrap();
    }
    let sparse = std::fs::File::create(root.join("sparse")).unwrap();
    sparse.set_len(32 << 20).unwrap();
    let mut sparse = sparse;
    use std::io::Seek;
    sparse.seek(std::io::SeekFrom::Start(16 << 20)).unwrap();
    sparse.write_all(b"middle").unwrap();
    std::fs::write(root.join("linked"), b"one inode, two names").unwrap();
    std::fs::hard_link(root.join("linked"), dirs[1].join("linked again")).unwrap();
    std::os::unix::fs::symlink("linked", root.join("relative link")).unwrap();
    std::os::unix::fs::symlink("../outside-sentinel", root.join("escaping link")).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", root.join("absolute link")).unwrap();
    std::os::unix::fs::symlink("does/not/exist", root.join("dangling link")).unwrap();
}

fn lanes_copy(src: &Path, dst: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanes"))
        .arg("copy")
        .arg(src)
        .arg(dst)
        .arg("--json")
        .args(extra)
        .env_remove("LANES_FAILPOINT")
        .output()
        .unwrap()
}

fn summary(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "lanes copy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

struct Trees {
    _root: tempfile::TempDir,
    base: PathBuf,
    src: PathBuf,
    dst: PathBuf,
}

fn trees(seed: u64, files: usize) -> Trees {
    let root = tempfile::Builder::new()
        .prefix("lanes-copy-")
        .tempdir()
        .unwrap();
    let base = root.path().to_path_buf();
    let src = base.join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(base.join("outside-sentinel"), b"must stay untouched").unwrap();
    generate(&src, seed, files);
    Trees {
        dst: base.join("dst"),
        src,
        base,
        _root: root,
    }
}

fn no_temporaries(root: &Path) {
    let leftovers: Vec<_> = snapshot(root)
        .into_keys()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(".lanes-tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporaries left: {leftovers:?}");
}

#[test]
fn every_mode_copies_the_tree_exactly_and_a_second_run_copies_nothing() {
    for mode in ["size-mtime", "sha256", "none"] {
        let t = trees(7, 120);
        let first = summary(&lanes_copy(&t.src, &t.dst, &["--checksum", mode]));
        assert_eq!(snapshot(&t.src), snapshot(&t.dst), "{mode}: trees differ");
        assert_eq!(first["failed"], 0, "{mode}");
        assert!(
            first["files_copied"].as_u64().unwrap() > 100,
            "{mode}: {first}"
        );
        if mode == "sha256" {
            assert_eq!(
                first["verified"],
                first["files_copied"].as_u64().unwrap() - 1,
                "{mode}: every body verified (the hard link is a link)"
            );
        }
        let second = summary(&lanes_copy(&t.src, &t.dst, &["--checksum", mode]));
        if mode == "none" {
            assert!(
                second["files_copied"].as_u64().unwrap() > 0,
                "none copies everything again"
            );
        } else {
            assert_eq!(
                second["files_copied"], 0,
                "{mode}: second run copies nothing: {second}"
            );
            assert_eq!(second["links_copied"], 0, "{mode}");
        }
        assert_eq!(
            snapshot(&t.src),
            snapshot(&t.dst),
            "{mode}: trees differ after second run"
        );
        assert_eq!(
            std::fs::read(t.base.join("outside-sentinel")).unwrap(),
            b"must stay untouched"
        );
        assert_eq!(
            std::fs::read_link(t.dst.join("escaping link")).unwrap(),
            PathBuf::from("../outside-sentinel")
        );
        no_temporaries(&t.dst);
    }
}

#[test]
fn sha256_catches_a_same_size_same_mtime_change_that_size_mtime_cannot() {
    let t = trees(11, 30);
    summary(&lanes_copy(&t.src, &t.dst, &[]));
    let victim = t.dst.join("linked");
    let meta = std::fs::metadata(&victim).unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&victim, &bytes).unwrap();
    let mtime = std::fs::FileTimes::new().set_modified(meta.modified().unwrap());
    std::fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_times(mtime)
        .unwrap();

    let quick = summary(&lanes_copy(&t.src, &t.dst, &["--checksum", "size-mtime"]));
    assert_eq!(
        quick["files_copied"], 0,
        "size-mtime cannot see the change: {quick}"
    );
    assert_ne!(
        std::fs::read(&victim).unwrap(),
        std::fs::read(t.src.join("linked")).unwrap()
    );

    let strict = summary(&lanes_copy(&t.src, &t.dst, &["--checksum", "sha256"]));
    assert!(strict["files_copied"].as_u64().unwrap() >= 1, "{strict}");
    assert_eq!(snapshot(&t.src), snapshot(&t.dst));
}

#[test]
fn a_killed_copy_resumes_and_leaves_no_temporaries() {
    let t = trees(13, 200);
    let killed = Command::new(env!("CARGO_BIN_EXE_lanes"))
        .arg("copy")
        .arg(&t.src)
        .arg(&t.dst)
        .args(["--jobs", "4", "--json"])
        .env("LANES_FAILPOINT", "copy.before-rename:60")
        .output()
        .unwrap();
    assert!(!killed.status.success(), "the failpoint kills the copy");
    let partial = snapshot(&t.dst);
    assert!(
        partial.keys().any(|p| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".lanes-tmp-")),
        "a temporary was in flight"
    );
    for (path, node) in &partial {
        if let (Node::File { bytes, .. }, Some(Node::File { bytes: want, .. })) =
            (node, snapshot(&t.src).get(path))
        {
            assert_eq!(bytes, want, "{path:?}: a file in place is always complete");
        }
    }
    let resumed = summary(&lanes_copy(&t.src, &t.dst, &[]));
    let files_total = resumed["files_total"].as_u64().unwrap();
    assert!(
        resumed["files_skipped"].as_u64().unwrap() >= 50,
        "already copied files are skipped: {resumed}"
    );
    assert!(
        resumed["files_copied"].as_u64().unwrap() < files_total,
        "{resumed}"
    );
    assert_eq!(snapshot(&t.src), snapshot(&t.dst));
    no_temporaries(&t.dst);
}

#[test]
fn delete_removes_exactly_the_extra_entries() {
    let t = trees(17, 40);
    summary(&lanes_copy(&t.src, &t.dst, &[]));
    std::fs::write(t.dst.join("extra file"), b"x").unwrap();
    std::fs::create_dir_all(t.dst.join("extra dir/nested")).unwrap();
    std::fs::write(t.dst.join("extra dir/nested/f"), b"y").unwrap();
    std::os::unix::fs::symlink(t.base.join("outside-sentinel"), t.dst.join("extra link")).unwrap();
    let without = summary(&lanes_copy(&t.src, &t.dst, &[]));
    assert_eq!(without["deleted"], 0);
    assert!(t.dst.join("extra file").exists());
    let dry = summary(&lanes_copy(&t.src, &t.dst, &["--delete", "--dry-run"]));
    assert_eq!(dry["deleted"], 3, "{dry}");
    assert!(t.dst.join("extra file").exists(), "dry run changes nothing");
    let with = summary(&lanes_copy(&t.src, &t.dst, &["--delete"]));
    assert_eq!(with["deleted"], 3, "{with}");
    assert_eq!(snapshot(&t.src), snapshot(&t.dst));
    assert_eq!(
        std::fs::read(t.base.join("outside-sentinel")).unwrap(),
        b"must stay untouched"
    );
}

#[test]
fn a_symlink_in_the_destination_is_never_written_through() {
    let t = trees(19, 10);
    let elsewhere = t.base.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::create_dir_all(&t.dst).unwrap();
    // Where the source has a directory, the destination has a link out of the tree.
    let dir_name = snapshot(&t.src)
        .into_iter()
        .find(|(p, n)| {
            matches!(n, Node::Dir { .. })
                && p.components().count() == 1
                && !p.ends_with("empty dir")
        })
        .map(|(p, _)| p)
        .unwrap();
    std::os::unix::fs::symlink(&elsewhere, t.dst.join(&dir_name)).unwrap();
    summary(&lanes_copy(&t.src, &t.dst, &[]));
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "nothing written through the link"
    );
    assert_eq!(snapshot(&t.src), snapshot(&t.dst));
}

#[test]
fn bad_input_is_refused_before_anything_is_written() {
    let t = trees(23, 5);
    struct Case {
        desc: &'static str,
        src: PathBuf,
        dst: PathBuf,
        message: &'static str,
    }
    let file = t.base.join("outside-sentinel");
    let cases = [
        Case {
            desc: "missing source",
            src: t.base.join("nope"),
            dst: t.dst.clone(),
            message: "does not exist",
        },
        Case {
            desc: "source is a file",
            src: file.clone(),
            dst: t.dst.clone(),
            message: "not a directory",
        },
        Case {
            desc: "dst inside src",
            src: t.src.clone(),
            dst: t.src.join("inside"),
            message: "overlap",
        },
        Case {
            desc: "src inside dst",
            src: t.src.clone(),
            dst: t.base.clone(),
            message: "overlap",
        },
    ];
    for case in cases {
        let output = lanes_copy(&case.src, &case.dst, &[]);
        assert!(!output.status.success(), "{}", case.desc);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(case.message), "{}: {stderr}", case.desc);
    }
    assert!(!t.dst.exists(), "nothing was created");
    assert!(!t.src.join("inside").exists());
}

#[test]
fn not_enough_space_is_refused_before_copying() {
    if !nix::unistd::geteuid().is_root() {
        if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
            panic!("needs root to mount a small tmpfs");
        }
        eprintln!("SKIPPED not_enough_space: needs root to mount a small tmpfs");
        return;
    }
    let t = trees(29, 60);
    let small = t.base.join("small");
    std::fs::create_dir(&small).unwrap();
    nix::mount::mount(
        Some("tmpfs"),
        &small,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .unwrap();
    let output = lanes_copy(&t.src, &small.join("dst"), &[]);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let leftover = small.join("dst").exists();
    nix::mount::umount(&small).unwrap();
    assert!(!output.status.success());
    assert!(stderr.contains("not enough space"), "{stderr}");
    assert!(!leftover, "nothing was written");
}

#[test]
fn excluded_paths_are_neither_copied_nor_deleted_and_a_dry_run_lists_paths() {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
    for (path, body) in [
        ("keep/a.bin", "a"),
        ("keep/b.tmp", "tmp"),
        (".git/HEAD", "ref"),
        ("logs/run.txt", "log"),
        ("logs/deep/run.txt", "deep log"),
    ] {
        std::fs::create_dir_all(src.join(path).parent().unwrap()).unwrap();
        std::fs::write(src.join(path), body).unwrap();
    }
    std::fs::create_dir_all(dst.join("keep")).unwrap();
    std::fs::write(dst.join("keep/local.tmp"), "mine").unwrap();
    std::fs::write(dst.join("stale"), "old").unwrap();
    let exclude = [
        "--exclude",
        "*.tmp",
        "--exclude",
        ".git",
        "--exclude",
        "/logs/*.txt",
        "--delete",
    ];

    let mut args = exclude.to_vec();
    args.push("--dry-run");
    let planned = summary(&lanes_copy(&src, &dst, &args));
    assert_eq!(
        planned["would_copy"],
        serde_json::json!(["keep/a.bin", "logs/deep/run.txt"])
    );
    assert_eq!(planned["would_delete"], serde_json::json!(["stale"]));
    assert!(
        !dst.join("keep/a.bin").exists(),
        "a dry run changes nothing"
    );

    let done = summary(&lanes_copy(&src, &dst, &exclude));
    assert_eq!(done["files_copied"], 2);
    assert_eq!(done["deleted"], 1);
    assert_eq!(std::fs::read(dst.join("keep/a.bin")).unwrap(), b"a");
    assert_eq!(
        std::fs::read(dst.join("logs/deep/run.txt")).unwrap(),
        b"deep log"
    );
    assert!(!dst.join("keep/b.tmp").exists() && !dst.join(".git").exists());
    assert!(!dst.join("logs/run.txt").exists() && !dst.join("stale").exists());
    assert_eq!(
        std::fs::read(dst.join("keep/local.tmp")).unwrap(),
        b"mine",
        "an excluded destination file is never deleted"
    );

    let bad = lanes_copy(&src, &dst, &["--exclude", "a["]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--exclude \"a[\""));
}

#[test]
fn a_large_file_is_hashed_on_both_sides_at_once_and_still_checked() {
    // Above the size where the source and the copy are hashed in parallel.
    let root = tempfile::tempdir().unwrap();
    let (src, dst) = (root.path().join("src"), root.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    let mut body: Vec<u8> = (0..(80u32 << 20) / 4)
        .flat_map(|i| i.to_le_bytes())
        .collect();
    std::fs::write(src.join("shard"), &body).unwrap();

    let first = summary(&lanes_copy(&src, &dst, &["--checksum", "sha256"]));
    assert_eq!(first["files_copied"], 1, "{first}");
    assert_eq!(std::fs::read(dst.join("shard")).unwrap(), body);
    let again = summary(&lanes_copy(&src, &dst, &["--checksum", "sha256"]));
    assert_eq!(again["files_copied"], 0, "identical: skipped {again}");

    // One byte in the middle of the copy changes, size and time kept: found and copied again.
    let meta = std::fs::metadata(dst.join("shard")).unwrap();
    body[40 << 20] ^= 1;
    std::fs::write(dst.join("shard"), &body).unwrap();
    std::fs::File::options()
        .write(true)
        .open(dst.join("shard"))
        .unwrap()
        .set_times(std::fs::FileTimes::new().set_modified(meta.modified().unwrap()))
        .unwrap();
    let repaired = summary(&lanes_copy(&src, &dst, &["--checksum", "sha256"]));
    assert_eq!(repaired["files_copied"], 1, "{repaired}");
    assert_eq!(
        std::fs::read(dst.join("shard")).unwrap(),
        std::fs::read(src.join("shard")).unwrap()
    );
    no_temporaries(&dst);
}
