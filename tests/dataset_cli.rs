//! `lanes dataset …` through the real binary, on file:// buckets from a real config file.

use std::path::Path;
use std::process::{Command, Output};

fn lanes(data_dir: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lanes"))
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--config")
        .arg(config)
        .arg("dataset")
        .args(args)
        .output()
        .unwrap()
}

fn ok_json(output: Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn push_versions_pull_and_a_read_only_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = root.join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  default_bucket: team\n  buckets:\n    team: {{dataset_path: \"file://{0}/team\", mode: read-write}}\n    archive: {{dataset_path: \"file://{0}/team\", mode: read-only}}\n",
            root.display()
        ),
    )
    .unwrap();
    let src = root.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/weights.bin"), vec![9u8; 100_000]).unwrap();
    std::fs::write(src.join("README"), b"hello").unwrap();
    let data = root.join("data");

    let buckets = ok_json(lanes(&data, &config, &["--json", "buckets"]));
    assert_eq!(buckets.as_array().unwrap().len(), 2);
    assert!(
        buckets
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["name"] == "team" && b["default"] == true)
    );

    ok_json(lanes(&data, &config, &["--json", "create", "resnet"]));
    let pushed = ok_json(lanes(
        &data,
        &config,
        &[
            "--json",
            "push",
            src.to_str().unwrap(),
            "resnet",
            "-m",
            "first",
            "--tag",
            "gold",
        ],
    ));
    assert_eq!(pushed["version"], "v1");
    let versions = ok_json(lanes(
        &data,
        &config,
        &["--json", "versions", "team/resnet"],
    ));
    assert_eq!(versions[0]["tags"][0], "gold");
    let out = root.join("out");
    let pulled = ok_json(lanes(
        &data,
        &config,
        &[
            "--json",
            "pull",
            "archive/resnet:gold",
            out.to_str().unwrap(),
        ],
    ));
    assert_eq!(pulled["downloaded"], 2);
    assert_eq!(
        std::fs::read(out.join("sub/weights.bin")).unwrap(),
        vec![9u8; 100_000]
    );
    let listed = ok_json(lanes(&data, &config, &["--json", "ls", "resnet:v1"]));
    assert_eq!(listed.as_array().unwrap().len(), 3);

    let refused = lanes(
        &data,
        &config,
        &["push", src.to_str().unwrap(), "archive/resnet"],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("read-only"));
    let missing = lanes(
        &data,
        &config,
        &["pull", "resnet:v7", out.to_str().unwrap()],
    );
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no version or tag \"v7\""));
    let git = lanes(&data, &config, &["ls", "git+ext::sh"]);
    assert!(String::from_utf8_lossy(&git.stderr).contains("unsupported Git transport"));
}

/// Pushes `src` as `name`, returning the JSON report.
fn push(data: &Path, config: &Path, src: &Path, name: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json", "push", src.to_str().unwrap(), name];
    args.extend_from_slice(extra);
    ok_json(lanes(data, config, &args))
}

#[test]
fn a_re_push_trusts_remembered_hashes_only_for_untouched_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = root.join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  buckets:\n    team: {{dataset_path: \"file://{}/team\"}}\n",
            root.display()
        ),
    )
    .unwrap();
    let (src, data) = (root.join("src"), root.join("data"));
    std::fs::create_dir(&src).unwrap();
    for i in 0..20 {
        std::fs::write(src.join(format!("f{i}")), vec![i as u8; 4096]).unwrap();
    }
    // Files written within 2 s of a push are never remembered (racy): let the tree settle.
    std::thread::sleep(std::time::Duration::from_millis(2200));
    ok_json(lanes(&data, &config, &["--json", "create", "ds"]));
    let first = push(&data, &config, &src, "ds", &[]);
    assert_eq!(
        (first["version"].as_str(), first["bodies_uploaded"].as_u64()),
        (Some("v1"), Some(20))
    );
    let remembered = std::fs::read_dir(data.join("push-cache")).unwrap().count();
    assert_eq!(remembered, 1, "one cache file for the pushed directory");

    // Unchanged: the latest version is the answer.
    let again = push(&data, &config, &src, "ds", &[]);
    assert_eq!(
        (again["version"].as_str(), again["bodies_uploaded"].as_u64()),
        (Some("v1"), Some(0))
    );

    // Same size, mtime put back: only the change time moved. The new bytes are pushed.
    let target = src.join("f3");
    let mtime = std::fs::metadata(&target).unwrap().modified().unwrap();
    std::fs::write(&target, vec![0xEEu8; 4096]).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&target)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let changed = push(&data, &config, &src, "ds", &[]);
    assert_eq!(
        (
            changed["version"].as_str(),
            changed["bodies_uploaded"].as_u64()
        ),
        (Some("v2"), Some(1))
    );
    let out = root.join("out");
    ok_json(lanes(
        &data,
        &config,
        &["--json", "pull", "ds:v2", out.to_str().unwrap()],
    ));
    assert_eq!(std::fs::read(out.join("f3")).unwrap(), vec![0xEEu8; 4096]);

    // A remembered hash is used only when the version's bodies include it: a cache that lies
    // makes the file be read, not the lie be recorded. --rehash ignores the cache altogether.
    for cache in std::fs::read_dir(data.join("push-cache")).unwrap() {
        let path = cache.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let wrong = "0".repeat(64);
        let lying = regex_free_replace_sha(&text, &wrong);
        std::fs::write(&path, lying).unwrap();
    }
    let lied_to = push(&data, &config, &src, "ds", &[]);
    assert_eq!(
        (
            lied_to["version"].as_str(),
            lied_to["bodies_uploaded"].as_u64()
        ),
        (Some("v2"), Some(0))
    );
    let rehashed = push(&data, &config, &src, "ds", &["--rehash"]);
    assert_eq!(
        (
            rehashed["version"].as_str(),
            rehashed["bodies_uploaded"].as_u64()
        ),
        (Some("v2"), Some(0))
    );
}

/// Replaces every `"sha256":"<64 hex>"` value in `text` with `with`.
fn regex_free_replace_sha(text: &str, with: &str) -> String {
    let key = "\"sha256\":\"";
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(key) {
        out.push_str(&rest[..at + key.len()]);
        out.push_str(with);
        rest = &rest[at + key.len() + 64..];
    }
    out.push_str(rest);
    out
}

#[test]
fn a_bucket_lists_its_datasets_and_a_pull_says_what_it_left_or_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = root.join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  default_bucket: team\n  buckets:\n    team: {{dataset_path: \"file://{}/team\"}}\n",
            root.display()
        ),
    )
    .unwrap();
    let data = root.join("data");
    let src = root.join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/a"), b"a").unwrap();
    for name in ["texts", "images"] {
        ok_json(lanes(&data, &config, &["--json", "create", name]));
    }
    push(&data, &config, &src, "images", &[]);

    // BUCKET/ (and `/`, the default bucket) lists the datasets.
    for reference in ["team/", "/"] {
        let listed = ok_json(lanes(&data, &config, &["--json", "ls", reference]));
        let names: Vec<&str> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["images", "texts"], "{reference}");
    }
    let text = lanes(&data, &config, &["ls", "team/"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("team/images"));
    let missing = lanes(&data, &config, &["ls", "nosuch/"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nosuch"));

    // A pull into a directory with more in it says what it left; --delete removes that, a
    // link to outside included, without following it.
    let out = root.join("out");
    let outside = root.join("outside");
    std::fs::create_dir_all(out.join("old/deeper")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"keep").unwrap();
    std::fs::write(out.join("stray"), b"x").unwrap();
    std::os::unix::fs::symlink(&outside, out.join("sub-link")).unwrap();
    let left = lanes(&data, &config, &["pull", "images", out.to_str().unwrap()]);
    assert!(left.status.success());
    let said = String::from_utf8_lossy(&left.stdout);
    assert!(
        said.contains("left 3 path(s)") && said.contains("--delete"),
        "{said}"
    );
    assert!(out.join("stray").exists());
    let pulled = ok_json(lanes(
        &data,
        &config,
        &[
            "--json",
            "pull",
            "images",
            out.to_str().unwrap(),
            "--delete",
        ],
    ));
    assert_eq!(
        pulled["deleted"],
        serde_json::json!(["old", "stray", "sub-link"])
    );
    let mut now: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    now.sort();
    assert_eq!(now, ["sub"]);
    assert_eq!(std::fs::read(out.join("sub/a")).unwrap(), b"a");
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");

    // A push leaves out what --exclude names.
    std::fs::create_dir_all(src.join(".git")).unwrap();
    std::fs::write(src.join(".git/HEAD"), b"ref").unwrap();
    std::fs::write(src.join("sub/scratch.tmp"), b"t").unwrap();
    push(
        &data,
        &config,
        &src,
        "texts",
        &["--exclude", ".git", "--exclude", "*.tmp"],
    );
    let files = ok_json(lanes(&data, &config, &["--json", "ls", "texts"]));
    let paths: Vec<&str> = files
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["sub", "sub/a"]);

    // A re-push of the same tree makes no version and says its message was not recorded.
    let again = push(
        &data,
        &config,
        &src,
        "texts",
        &["--exclude", ".git", "--exclude", "*.tmp", "-m", "retrained"],
    );
    assert_eq!(again["unchanged"], true);
    assert_eq!(again["version"], "v1");
    assert_eq!(again["message_not_recorded"], "retrained");
    let text = lanes(
        &data,
        &config,
        &[
            "push",
            src.to_str().unwrap(),
            "texts",
            "--exclude",
            ".git",
            "--exclude",
            "*.tmp",
            "-m",
            "x",
        ],
    );
    let said = String::from_utf8_lossy(&text.stdout);
    assert!(
        said.contains("unchanged") && said.contains("NOT recorded"),
        "{said}"
    );
}

/// A stand-in for the EC2 instance metadata service: records each request line, hands out a
/// session token, and answers 404 to everything else (no region, no role).
fn fake_imds() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() {
                record.lock().unwrap().push(line.trim().to_owned());
            }
            // The rest of the headers, then the answer.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|n| n > 2) {
                header.clear();
            }
            let answer: &[u8] = if line.starts_with("PUT /latest/api/token") {
                b"HTTP/1.1 200 OK\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600\r\n\
                  content-length: 5\r\n\r\ntoken"
            } else {
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"
            };
            let _ = (&stream).write_all(answer);
        }
    });
    (address, seen)
}

#[test]
fn an_s3_bucket_without_credentials_says_what_to_set_and_never_asks_metadata_for_its_region() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanes.yaml");
    std::fs::write(
        &config,
        "datasets:\n  default_bucket: cold\n  buckets:\n    cold: {dataset_path: \"s3://bkt/p\", \
         region: eu-west-1, endpoint: \"http://127.0.0.1:1\"}\n",
    )
    .unwrap();
    let (imds, seen) = fake_imds();
    let output = Command::new(env!("CARGO_BIN_EXE_lanes"))
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args([
            "--config",
            config.to_str().unwrap(),
            "dataset",
            "ls",
            "cold/",
        ])
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap())
        .env("HOME", dir.path())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", &imds)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains("no S3 credentials were found"), "{said}");
    assert!(said.contains("credentials: {secretName"), "{said}");
    assert!(
        !said.contains("WARN") && !said.contains("DispatchFailure"),
        "{said}"
    );
    let requests = seen.lock().unwrap().clone();
    assert!(
        !requests.is_empty(),
        "the credential chain did not reach the stand-in metadata service"
    );
    assert!(
        !requests.iter().any(|r| r.contains("placement/region")),
        "asked instance metadata for a region the bucket names: {requests:?}"
    );
}

#[test]
fn gc_removes_only_bodies_no_version_names_and_only_old_enough_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config = root.join("lanes.yaml");
    std::fs::write(
        &config,
        format!(
            "datasets:\n  default_bucket: team\n  buckets:\n    team: {{dataset_path: \"file://{}/team\"}}\n",
            root.display()
        ),
    )
    .unwrap();
    let data = root.join("data");
    let src = root.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("kept"), b"in v1").unwrap();
    ok_json(lanes(&data, &config, &["--json", "create", "ds"]));
    push(&data, &config, &src, "ds", &[]);
    // An open version with a body of its own, then removed: that body is named by nothing.
    std::fs::write(src.join("dropped"), b"only in v2").unwrap();
    push(&data, &config, &src, "ds", &["--no-commit"]);
    ok_json(lanes(&data, &config, &["--json", "rm", "ds:v2"]));
    let bodies = || {
        let mut all = Vec::new();
        let mut pending = vec![root.join("team/blobs")];
        while let Some(d) = pending.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                match e.file_type().unwrap().is_dir() {
                    true => pending.push(e.path()),
                    false => all.push(e.path()),
                }
            }
        }
        all.len()
    };
    assert_eq!(bodies(), 2);

    // Young bodies stay by default (a push may still be uploading them).
    let young = ok_json(lanes(&data, &config, &["--json", "gc"]));
    assert_eq!(young["too_young"], 1);
    assert_eq!(young["unreferenced"], serde_json::json!([]));
    // A dry run lists and keeps; a run removes exactly that body.
    let planned = ok_json(lanes(
        &data,
        &config,
        &["--json", "gc", "--min-age", "0s", "--dry-run"],
    ));
    assert_eq!(planned["unreferenced"].as_array().unwrap().len(), 1);
    assert_eq!(planned["referenced"], 1);
    assert_eq!(bodies(), 2);
    let text = lanes(&data, &config, &["gc", "team", "--min-age", "0s"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("removed 1 bodies"));
    assert_eq!(bodies(), 1);
    let out = root.join("out");
    ok_json(lanes(
        &data,
        &config,
        &["--json", "pull", "ds", out.to_str().unwrap()],
    ));
    assert_eq!(std::fs::read(out.join("kept")).unwrap(), b"in v1");
    let bad = lanes(&data, &config, &["gc", "--min-age", "5w"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("s, m, h or d"));

    // A missing directory says so; a file where a directory belongs says that.
    let missing = lanes(&data, &config, &["push", "/nonexistent/tree", "ds"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/tree: it does not exist")
    );
    let file = root.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let not_dir = lanes(&data, &config, &["pull", "ds", file.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&not_dir.stderr).contains("is not a directory"));
}
