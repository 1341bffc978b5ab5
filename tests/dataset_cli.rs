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
