//! The README's examples, run as written: the quick start (a plugin on embedded defaults,
//! then a volume created, published, used and removed) and the `lanes dataset` examples on
//! the embedded `local` bucket. Only the paths change: the binary under test for
//! `target/release/lanes` (or `lanes`), and a temporary directory for `/tmp/lanes` and
//! `/tmp/pod`, so runs never collide.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The `sh` blocks of the README section that starts with `heading`, up to the next heading
/// of any level.
fn blocks(heading: &str) -> Vec<String> {
    let readme = include_str!("../README.md");
    let start = readme
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README has no {heading:?}"));
    let rest = &readme[start + heading.len() + 2..];
    let end = rest.find("\n#").unwrap_or(rest.len());
    let mut found = Vec::new();
    let mut section = &rest[..end];
    while let Some(open) = section.find("```sh\n") {
        let body = &section[open + 6..];
        let close = body.find("\n```").expect("a closed block");
        found.push(body[..close].to_owned());
        section = &body[close + 4..];
    }
    found
}

/// `text` with the README's paths pointed at this run's.
fn localize(text: &str, root: &Path) -> String {
    let lanes = env!("CARGO_BIN_EXE_lanes");
    text.replace("target/release/lanes", lanes)
        .replace("/tmp/lanes", &root.join("lanes").display().to_string())
        .replace("/tmp/pod", &root.join("pod").display().to_string())
}

fn bash(script: &str, dir: &Path, env: &[(&str, &str)]) -> String {
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(dir)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    );
    assert!(
        output.status.success(),
        "README block failed:\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    stdout.into_owned()
}

#[test]
fn the_quick_start_runs_as_written() {
    if !common::privileged("README quick start") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let blocks = blocks("## Quick start");
    assert!(blocks.len() >= 2, "{blocks:?}");
    // The first block builds and starts the plugin: start the binary under test as it says.
    let start = blocks[0]
        .lines()
        .find(|l| l.contains("lanes standalone"))
        .expect("the quick start starts the plugin");
    let start = localize(start, root.path());
    let mut words = start.split_whitespace();
    let mut plugin = Command::new(words.next().unwrap())
        .args(words)
        .env("LANES_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let socket = root.path().join("lanes/csi.sock");
    let started = Instant::now();
    while !socket.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the plugin did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let said = bash(&localize(&blocks[1], root.path()), root.path(), &[]);
    let _ = plugin.kill();
    let _ = plugin.wait();
    assert!(said.contains("created local/scratch (5.0 GiB)"), "{said}");
    assert!(said.contains("deleted local/scratch"), "{said}");
    assert!(
        common::mounts_at(&root.path().join("pod/data")).is_empty(),
        "the quick start leaves nothing mounted"
    );
}

#[test]
fn the_dataset_examples_run_as_written_on_the_embedded_defaults() {
    let root = tempfile::tempdir().unwrap();
    let examples = &blocks("## `lanes dataset`: versioned datasets")[0];
    std::fs::create_dir_all(root.path().join("imagenet/train")).unwrap();
    std::fs::write(root.path().join("imagenet/train/0001.jpeg"), b"jpeg").unwrap();
    let script = examples.replace("lanes ", &format!("{} ", env!("CARGO_BIN_EXE_lanes")));
    let data = root.path().join("data");
    let said = bash(
        &script,
        root.path(),
        &[
            ("LANES_DATA_DIR", data.to_str().unwrap()),
            ("LANES_LOG", "warn"),
        ],
    );
    assert!(said.contains("imagenet:v1 committed"), "{said}");
    assert!(
        root.path().join("imagenet-v1/train/0001.jpeg").exists(),
        "{said}"
    );
}
