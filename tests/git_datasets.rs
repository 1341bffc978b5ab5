//! Git datasets against real repositories made by the test, over file:// and over
//! `git daemon` on loopback.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lanes::dataset::git;
use lanes::error::Kind;

fn sh(dir: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
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

/// A repository with two commits on main, a tag on the first, and a feature branch.
fn repository(root: &Path) -> (std::path::PathBuf, String, String) {
    let repo = root.join("data.git");
    std::fs::create_dir_all(&repo).unwrap();
    sh(&repo, &["init", "-q", "-b", "main"]);
    std::fs::create_dir_all(repo.join("images")).unwrap();
    std::fs::write(repo.join("images/a.txt"), b"first").unwrap();
    sh(&repo, &["add", "."]);
    sh(&repo, &["commit", "-q", "-m", "one"]);
    let first = sh(&repo, &["rev-parse", "HEAD"]);
    sh(&repo, &["tag", "-a", "v1", "-m", "release one"]);
    std::fs::write(repo.join("images/b.txt"), b"second").unwrap();
    sh(&repo, &["add", "."]);
    sh(&repo, &["commit", "-q", "-m", "two"]);
    let second = sh(&repo, &["rev-parse", "HEAD"]);
    sh(&repo, &["branch", "feature/x", &first]);
    (repo, first, second)
}

#[test]
fn resolves_and_fetches_pinned_commits_over_file() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, first, second) = repository(dir.path());
    let url = format!("file://{}", repo.display());
    assert_eq!(
        git::resolve(&url, "v1", &Default::default()).unwrap(),
        first,
        "annotated tag peels to its commit"
    );
    assert_eq!(
        git::resolve(&url, "main", &Default::default()).unwrap(),
        second
    );
    assert_eq!(
        git::resolve(&url, "feature/x", &Default::default()).unwrap(),
        first
    );
    assert_eq!(
        git::resolve(&url, "HEAD", &Default::default()).unwrap(),
        second
    );
    assert_eq!(
        git::resolve(&url, &first, &Default::default()).unwrap(),
        first
    );
    assert_eq!(
        git::resolve(&url, "v9", &Default::default())
            .unwrap_err()
            .kind(),
        Kind::NotFound
    );
    assert_eq!(
        git::resolve(&url, "-u", &Default::default())
            .unwrap_err()
            .kind(),
        Kind::InvalidArgument
    );

    let out = dir.path().join("out");
    git::fetch(&url, &first, "v1", &out, &Default::default()).unwrap();
    assert_eq!(std::fs::read(out.join("images/a.txt")).unwrap(), b"first");
    assert!(
        !out.join("images/b.txt").exists(),
        "exactly the tagged commit"
    );
    assert!(!out.join(".git").exists(), "a clean tree");
    let again = git::fetch(&url, &first, "v1", &out, &Default::default()).unwrap_err();
    assert_eq!(again.kind(), Kind::AlreadyExists);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no work directories left: {leftovers:?}"
    );
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn fetches_over_git_daemon_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, first, _) = repository(dir.path());
    std::fs::write(repo.join(".git/git-daemon-export-ok"), b"").unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _daemon = Daemon(
        Command::new("git")
            .args([
                "daemon",
                "--reuseaddr",
                "--export-all",
                "--listen=127.0.0.1",
            ])
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", dir.path().display()))
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("git daemon"),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "git daemon did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("git://127.0.0.1:{port}/data.git");
    let sha = git::resolve(&url, "v1", &Default::default()).unwrap();
    assert_eq!(sha, first);
    let out = dir.path().join("served");
    git::fetch(&url, &sha, "v1", &out, &Default::default()).unwrap();
    assert_eq!(std::fs::read(out.join("images/a.txt")).unwrap(), b"first");
    assert!(!out.join(".git").exists());
}

#[test]
fn cli_resolves_and_pulls_a_git_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (repo, first, _) = repository(dir.path());
    let reference = format!("git+file://{}@v1", repo.display());
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_lanes"))
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("dataset")
            .args(args)
            .output()
            .unwrap()
    };
    let resolved = run(&["resolve", &reference]);
    assert_eq!(String::from_utf8_lossy(&resolved.stdout).trim(), first);
    let out = dir.path().join("tree");
    let pulled = run(&["pull", &reference, out.to_str().unwrap()]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    assert_eq!(std::fs::read(out.join("images/a.txt")).unwrap(), b"first");
    let refused = run(&["pull", "git+ext::sh -c id", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unsupported Git transport"));
}
