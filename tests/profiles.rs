//! Storage profiles through the real binary: `lanes profiles` (text and JSON, `--for`), a
//! config the binary refuses, and StorageClass `profile:` at CreateVolume.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;
use lanes::proto::CreateVolumeRequest;
use tonic::Code;

fn profiles(data_dir: &Path, config: Option<&Path>, args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_lanes"));
    command.arg("--data-dir").arg(data_dir);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.arg("profiles").args(args).output().unwrap()
}

fn json(output: Output) -> Vec<serde_json::Value> {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

const TWO: &str = "profiles:\n  scratch:\n    lane: local\n    description: node-local scratch\n    best_for: [scratch]\n    default: true\n  keep:\n    lane: local\n    best_for: [checkpoints]\n";

#[test]
fn profiles_are_listed_with_their_lane_availability_and_use() {
    let dir = tempfile::tempdir().unwrap();
    let embedded = json(profiles(dir.path(), None, &["--json"]));
    assert_eq!(embedded.len(), 1);
    let local = &embedded[0];
    for key in [
        "name",
        "lane",
        "backend",
        "available",
        "reason",
        "capacity_enforced",
        "recommended_for",
    ] {
        assert!(local.get(key).is_some(), "{key} missing: {local}");
    }
    assert_eq!(local["name"], "local");
    assert_eq!(local["lane"], "local");
    assert_eq!(local["available"], true);
    assert!(local["reason"].is_null());
    assert!(local["capacity_enforced"].is_boolean());
    assert_eq!(local["recommended_for"], serde_json::json!(["scratch"]));
    assert!(
        !dir.path().join("volumes").exists(),
        "listing creates nothing"
    );

    let config = dir.path().join("lanes.yaml");
    std::fs::write(&config, TWO).unwrap();
    let for_checkpoints = json(profiles(
        dir.path(),
        Some(&config),
        &["--json", "--for", "checkpoints"],
    ));
    let names: Vec<&str> = for_checkpoints
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["keep", "scratch"],
        "the recommended profile first"
    );
    assert_eq!(for_checkpoints[0]["recommended"], true);
    assert_eq!(for_checkpoints[1]["recommended"], false);
    let text = profiles(dir.path(), Some(&config), &["--for", "scratch"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("scratch *"), "the default is marked: {text}");
    assert!(text.contains("recommended for scratch: scratch"), "{text}");

    // An unavailable backend says why (no space as root, not writable otherwise).
    let missing = profiles(Path::new("/proc/no/such/dir"), None, &["--json"]);
    let missing = json(missing);
    assert_eq!(missing[0]["available"], false);
    assert!(
        missing[0]["reason"].as_str().unwrap().contains("/proc"),
        "{}",
        missing[0]
    );

    std::fs::write(&config, "profiles:\n  nfs:\n    lane: legacy-rwx\n").unwrap();
    let refused = profiles(dir.path(), Some(&config), &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("needs `nfs:`"));
    // A legacy-rwx profile whose server is not there: listed, unavailable, the server named,
    // and capacity said plainly not to be enforced.
    std::fs::write(
        &config,
        "profiles:\n  nfs:\n    lane: legacy-rwx\n    nfs:\n      server: 127.0.0.1\n      \
         export: /srv/nowhere\n",
    )
    .unwrap();
    let down = json(profiles(dir.path(), Some(&config), &["--json"]));
    assert_eq!(down[0]["lane"], "legacy-rwx");
    assert_eq!(down[0]["available"], false);
    assert_eq!(down[0]["capacity_enforced"], false);
    let reason = down[0]["reason"].as_str().unwrap();
    assert!(reason.contains("127.0.0.1:/srv/nowhere"), "{reason}");
    assert!(
        down[0]["enforcement"]
            .as_str()
            .unwrap()
            .contains("NFS does not enforce"),
        "{}",
        down[0]
    );
    // A shared-rwx profile whose metadata engine is not there: listed, unavailable, and why.
    std::fs::write(
        &config,
        "profiles:\n  juice:\n    lane: shared-rwx\n    juicefs:\n      \
         meta_url: redis://127.0.0.1:1/1\n      binary: /bin/false\n",
    )
    .unwrap();
    let down = json(profiles(dir.path(), Some(&config), &["--json"]));
    assert_eq!(down[0]["lane"], "shared-rwx");
    assert_eq!(down[0]["available"], false);
    assert!(
        down[0]["reason"]
            .as_str()
            .unwrap()
            .contains("metadata engine unreachable"),
        "{}",
        down[0]
    );
}

#[tokio::test]
async fn a_storage_class_picks_a_profile_from_the_table() {
    let plugin = Plugin::with_config(TWO, None);
    let mut c = plugin.clients().await;
    let with = |profile: Option<&str>, name: &str| CreateVolumeRequest {
        parameters: profile
            .map(|p| [("profile".to_owned(), p.to_owned())].into())
            .unwrap_or_default(),
        ..create_request(name, 1 << 20)
    };
    c.controller
        .create_volume(with(Some("keep"), "pvc-keep"))
        .await
        .unwrap();
    c.controller
        .create_volume(with(None, "pvc-default"))
        .await
        .unwrap();
    let err = c
        .controller
        .create_volume(with(Some("local"), "pvc-x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("keep, scratch"), "{}", err.message());
    let listed = c
        .controller
        .list_volumes(lanes::proto::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 2, "the refused volume was not made");
    let record = |name: &str| -> serde_json::Value {
        let path = plugin.data_dir.join(format!("volumes/{name}/volume.json"));
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    };
    assert_eq!(record("pvc-keep")["params"]["profile"], "keep");
    assert_eq!(record("pvc-default")["params"]["profile"], "scratch");
    // Capacity per profile: a known one answers, an unknown one is refused.
    let capacity = |profile: &str| lanes::proto::GetCapacityRequest {
        parameters: [("profile".to_owned(), profile.to_owned())].into(),
        ..Default::default()
    };
    let space = c
        .controller
        .get_capacity(capacity("keep"))
        .await
        .unwrap()
        .into_inner();
    assert!(space.available_capacity > 0);
    assert_code(
        c.controller.get_capacity(capacity("gold")).await,
        Code::InvalidArgument,
        "unknown profile",
    );
}
