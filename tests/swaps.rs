//! Trees that change while `lanes copy` and `lanes dataset pull` work on them: a background
//! thread flips a directory for a symlink to a sentinel and back, in a loop, for a few
//! seconds. The sentinel lies outside every tree; an inotify watch proves that nothing in it
//! is ever opened, read, written, created or removed, and its contents never show up in the
//! destination.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

const SECRET: &[u8] = b"sentinel secret: never copied";

/// A directory outside the trees, watched for any access.
struct Sentinel {
    dir: tempfile::TempDir,
    watch: Inotify,
}

impl Sentinel {
    fn new() -> Sentinel {
        let dir = tempfile::Builder::new()
            .prefix("lanes-sentinel-")
            .tempdir()
            .unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        for path in ["f0", "b/f1", "evil-child"] {
            std::fs::write(dir.path().join(path), SECRET).unwrap();
        }
        let watch = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let everything = AddWatchFlags::IN_ACCESS
            | AddWatchFlags::IN_OPEN
            | AddWatchFlags::IN_MODIFY
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_MOVED_TO;
        for sub in ["", "b"] {
            watch.add_watch(&dir.path().join(sub), everything).unwrap();
        }
        Sentinel { dir, watch }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fails when anything touched the sentinel since it was made.
    fn assert_untouched(&self, what: &str) {
        let events = self.watch.read_events().unwrap_or_default();
        let touched: Vec<_> = events
            .iter()
            .map(|e| {
                format!(
                    "{:?} {:?}",
                    e.mask,
                    e.name.as_deref().unwrap_or(OsStr::new(""))
                )
            })
            .collect();
        assert!(
            touched.is_empty(),
            "{what}: the sentinel was touched: {touched:?}"
        );
    }
}

/// Flips `victim` between the real directory and a symlink to `sentinel` until stopped
/// (atomic exchanges with `renameat2(RENAME_EXCHANGE)`); counts its flips in `count`.
fn flipper(
    victim: PathBuf,
    sentinel: PathBuf,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<u64> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    std::thread::spawn(move || {
        let link = victim.with_file_name(".link");
        let exchange = || {
            renameat2(
                AT_FDCWD,
                &victim,
                AT_FDCWD,
                &link,
                RenameFlags::RENAME_EXCHANGE,
            )
            .is_ok()
        };
        let mut flips = 0;
        while !stop.load(Ordering::Relaxed) {
            // The tool may have replaced the link with a real directory of its own.
            if !std::fs::symlink_metadata(&link).is_ok_and(|m| m.is_symlink()) {
                let _ = std::fs::remove_dir_all(&link);
                let _ = std::fs::remove_file(&link);
                let _ = std::os::unix::fs::symlink(&sentinel, &link);
            }
            if exchange() {
                std::thread::sleep(Duration::from_micros(300));
                exchange();
                flips += 1;
                count.fetch_add(1, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        let _ = std::fs::remove_file(&link);
        flips
    })
}

/// Keeps going until at least 3 s have passed and `count` shows `flips` flips (at most 15 s:
/// a loaded machine flips slowly).
fn keep_going(started: Instant, count: &AtomicU64, flips: u64) -> bool {
    let elapsed = started.elapsed();
    elapsed < Duration::from_secs(15)
        && (elapsed < Duration::from_secs(3) || count.load(Ordering::Relaxed) < flips)
}

/// Files anywhere under `root` (links not followed) whose content is the sentinel's.
fn leaked(root: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() && std::fs::read(&path).is_ok_and(|b| b == SECRET) {
                found.push(path);
            }
        }
    }
    found
}

fn tree(root: &Path, dirs: usize, files: usize) {
    for d in 0..dirs {
        let dir = root.join(format!("a/b{d}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..files {
            std::fs::write(dir.join(format!("f{f}")), format!("{d}/{f}")).unwrap();
        }
    }
    std::fs::write(root.join("a/top"), "top").unwrap();
}

#[test]
fn copy_never_leaves_its_trees_while_they_change() {
    let sentinel = Sentinel::new();
    let work = tempfile::tempdir().unwrap();
    let (src, dst) = (work.path().join("src"), work.path().join("dst"));
    tree(&src, 20, 30);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let source_flips = flipper(
        src.join("a"),
        sentinel.path().to_owned(),
        stop.clone(),
        count.clone(),
    );
    let started = Instant::now();
    let mut runs = 0;
    while keep_going(started, &count, 100) {
        // Every other run into a destination whose directory flips too.
        let target = dst.join(format!("run{}", runs % 2));
        let dest_flips = (runs % 2 == 1 && target.join("a").is_dir()).then(|| {
            let extra = Arc::new(AtomicU64::new(0));
            flipper(
                target.join("a"),
                sentinel.path().to_owned(),
                stop.clone(),
                extra,
            )
        });
        let _ = Command::new(env!("CARGO_BIN_EXE_lanes"))
            .args(["copy", "--json", "--delete"])
            .arg(&src)
            .arg(&target)
            .output()
            .unwrap();
        if let Some(handle) = dest_flips {
            stop.store(true, Ordering::Relaxed);
            handle.join().unwrap();
            stop.store(false, Ordering::Relaxed);
        }
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let flips = source_flips.join().unwrap();
    eprintln!(
        "copy: {runs} runs, {flips} flips in {:?}",
        started.elapsed()
    );
    assert!(runs >= 3 && flips >= 20, "{runs} runs, {flips} flips");
    sentinel.assert_untouched("lanes copy");
    assert!(
        leaked(&dst).is_empty(),
        "sentinel content copied: {:?}",
        leaked(&dst)
    );
    // Once the trees hold still, a run completes the copy.
    let done = Command::new(env!("CARGO_BIN_EXE_lanes"))
        .args(["copy", "--json"])
        .arg(&src)
        .arg(dst.join("run0"))
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert_eq!(std::fs::read(dst.join("run0/a/b3/f7")).unwrap(), b"3/7");
}

#[test]
fn pull_never_leaves_its_directory_while_it_changes() {
    let sentinel = Sentinel::new();
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  default_bucket: team\n  buckets:\n    team: {{dataset_path: \"file://{}/bucket\", mode: read-write}}\n",
            work.path().display()
        ),
    )
    .unwrap();
    let lanes = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lanes"))
            .arg("--data-dir")
            .arg(work.path().join("data"))
            .arg("--config")
            .arg(&config)
            .arg("dataset")
            .args(args)
            .output()
            .unwrap()
    };
    let src = work.path().join("src");
    tree(&src, 10, 20);
    assert!(lanes(&["create", "flip"]).status.success());
    let pushed = lanes(&["push", src.to_str().unwrap(), "flip"]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let dir = work.path().join("pulled");
    assert!(
        lanes(&["pull", "flip:v1", dir.to_str().unwrap()])
            .status
            .success()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let flips = flipper(
        dir.join("a"),
        sentinel.path().to_owned(),
        stop.clone(),
        count.clone(),
    );
    let started = Instant::now();
    let mut runs = 0;
    while keep_going(started, &count, 30) {
        // Remove a few files each round so the pull has bodies to write.
        for d in 0..10 {
            let _ = std::fs::remove_file(dir.join(format!("a/b{d}/f{}", runs % 20)));
        }
        let _ = lanes(&["pull", "flip:v1", dir.to_str().unwrap()]);
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flips.join().unwrap();
    eprintln!(
        "pull: {runs} runs, {flips} flips in {:?}",
        started.elapsed()
    );
    assert!(runs >= 3 && flips >= 20, "{runs} runs, {flips} flips");
    sentinel.assert_untouched("lanes dataset pull");
    assert!(leaked(&dir).is_empty());
    let last = lanes(&["pull", "flip:v1", dir.to_str().unwrap()]);
    assert!(
        last.status.success(),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );
    assert_eq!(std::fs::read(dir.join("a/b3/f7")).unwrap(), b"3/7");
}

/// Directories are created only beneath DIR whatever order the manifest lists them in and
/// whatever DIR already holds: links in the way are replaced, never followed (a link chain
/// `b -> .`, `x -> b/..` left by one version cannot send the next one's `x/evil-child` out).
#[test]
fn pull_makes_directories_only_beneath_its_directory() {
    let sentinel = Sentinel::new();
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("lanes.yaml");
    let bucket = work.path().join("bucket");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  default_bucket: team\n  buckets:\n    team: {{dataset_path: \"file://{}\", mode: read-write}}\n",
            bucket.display()
        ),
    )
    .unwrap();
    let lanes = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_lanes"))
            .arg("--data-dir")
            .arg(work.path().join("data"))
            .arg("--config")
            .arg(&config)
            .arg("dataset")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let v1 = work.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    std::os::unix::fs::symlink(".", v1.join("b")).unwrap();
    std::os::unix::fs::symlink("b/..", v1.join("x")).unwrap();
    let v2 = work.path().join("v2");
    std::fs::create_dir_all(v2.join("x/evil-child")).unwrap();
    std::fs::write(v2.join("x/evil-child/f"), "inside").unwrap();
    lanes(&["create", "chain"]);
    lanes(&["push", v1.to_str().unwrap(), "chain"]);
    lanes(&["push", v2.to_str().unwrap(), "chain"]);
    let outer = work.path().join("outer");
    let dir = outer.join("dir");
    lanes(&["pull", "chain:v1", dir.to_str().unwrap()]);
    lanes(&["pull", "chain:v2", dir.to_str().unwrap()]);
    assert!(!outer.join("evil-child").exists(), "nothing above DIR");
    assert_eq!(
        std::fs::read(dir.join("x/evil-child/f")).unwrap(),
        b"inside"
    );

    // A format 1 manifest (one document, entries in any order) listing children before their
    // parents, pulled where `x` links elsewhere.
    let manifest = bucket.join("datasets/chain/versions/v2.json");
    let text = std::fs::read(&manifest).unwrap();
    let mut lines = serde_json::Deserializer::from_slice(&text).into_iter::<serde_json::Value>();
    let mut value = lines.next().unwrap().unwrap();
    let mut entries: Vec<serde_json::Value> = lines.map(Result::unwrap).collect();
    entries.reverse();
    value["format"] = serde_json::json!(1);
    value["entries"] = serde_json::json!(entries);
    std::fs::write(&manifest, serde_json::to_vec(&value).unwrap()).unwrap();
    let fresh = work.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    std::os::unix::fs::symlink(sentinel.path(), fresh.join("x")).unwrap();
    lanes(&["pull", "chain:v2", fresh.to_str().unwrap()]);
    assert!(
        std::fs::symlink_metadata(fresh.join("x")).unwrap().is_dir(),
        "the link was replaced"
    );
    assert_eq!(
        std::fs::read(fresh.join("x/evil-child/f")).unwrap(),
        b"inside"
    );
    sentinel.assert_untouched("pull over links");
}
