//! Every manifest under deploy/ parses into its Kubernetes type, and nothing in it is lost on
//! the way: an unknown (misspelt) field fails the test instead of being silently ignored.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use serde_json::Value;
use std::path::Path;

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<Value, String> {
    let parsed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(parsed).map_err(|e| e.to_string())
}

/// Checks that everything in `original` is also in `round_trip`; returns the first path that is not.
/// A manifest under deploy/, parsed into its type.
fn manifest<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(name);
    serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lost(original: &Value, round_trip: &Value, path: &str) -> Option<String> {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            a.iter().find_map(|(key, value)| match b.get(key) {
                Some(other) => lost(value, other, &format!("{path}.{key}")),
                None => Some(format!("{path}.{key}")),
            })
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| lost(x, y, &format!("{path}[{i}]"))),
        (a, b) if a == b => None,
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        _ => Some(path.to_owned()),
    }
}

#[test]
fn manifests_parse_into_kubernetes_types_without_losing_fields() {
    let mut kinds = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    // The one example that is Kubernetes objects (the others are Lanes configs).
    files.push(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/examples/dataset-pods.yaml"
        )
        .into(),
    );
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (index, doc) in text.split("\n---").enumerate() {
            let value: Value = serde_yaml_ng::from_str(doc)
                .unwrap_or_else(|e| panic!("{}#{index}: {e}", file.display()));
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let round_trip = match kind.as_str() {
                "Namespace" => typed::<Namespace>(&value),
                "ServiceAccount" => typed::<ServiceAccount>(&value),
                "ClusterRole" => typed::<ClusterRole>(&value),
                "ClusterRoleBinding" => typed::<ClusterRoleBinding>(&value),
                "Role" => typed::<Role>(&value),
                "RoleBinding" => typed::<RoleBinding>(&value),
                "Deployment" => typed::<Deployment>(&value),
                "DaemonSet" => typed::<DaemonSet>(&value),
                "CSIDriver" => typed::<CSIDriver>(&value),
                "StorageClass" => typed::<StorageClass>(&value),
                "ConfigMap" => typed::<ConfigMap>(&value),
                "Secret" => typed::<Secret>(&value),
                "Pod" => typed::<Pod>(&value),
                // No Rust type in k8s-openapi (a CRD of external-snapshotter): its fields.
                "VolumeSnapshotClass" => volume_snapshot_class(&value),
                other => Err(format!("no type for kind {other:?}")),
            }
            .unwrap_or_else(|e| panic!("{}#{index} ({kind}): {e}", file.display()));
            if let Some(path) = lost(&value, &round_trip, "") {
                panic!(
                    "{}#{index} ({kind}): field {path} is not part of the type (typo?)",
                    file.display()
                );
            }
            kinds.push(kind);
        }
    }
    for wanted in [
        "CSIDriver",
        "Deployment",
        "DaemonSet",
        "StorageClass",
        "ClusterRole",
    ] {
        assert!(
            kinds.iter().any(|k| k == wanted),
            "{wanted} manifest missing"
        );
    }
}

/// The shipped config, parsed by the binary's own parser.
fn shipped_config() -> lanes::config::Config {
    let map: ConfigMap = manifest("config.yaml");
    let text = &map.data.unwrap()["config.yaml"];
    lanes::config::Config::parse(
        text,
        "deploy/config.yaml",
        std::path::Path::new("/var/lib/lanes"),
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_profile_has_a_storage_class_and_every_class_a_profile() {
    let driver: CSIDriver = manifest("csidriver.yaml");
    assert_eq!(
        driver.metadata.name.as_deref(),
        Some(lanes::csi::DEFAULT_DRIVER_NAME)
    );
    let profiles = shipped_config().profiles;
    let mut classes = Vec::new();
    for file in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy")).unwrap() {
        let name = file.unwrap().file_name().to_string_lossy().into_owned();
        if name.starts_with("storageclass-") {
            classes.push(manifest::<StorageClass>(&name));
        }
    }
    for profile in profiles.iter() {
        let class = classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(&format!("lanes-{}", profile.name)))
            .unwrap_or_else(|| {
                panic!(
                    "no StorageClass lanes-{} for profile {}",
                    profile.name, profile.name
                )
            });
        assert_eq!(class.provisioner, lanes::csi::DEFAULT_DRIVER_NAME);
        let params: std::collections::HashMap<String, String> = class
            .parameters
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let parsed = lanes::lane::CreateParams::parse(&params, &profiles)
            .expect("the StorageClass parameters are accepted");
        assert_eq!(parsed.profile, profile.name);
    }
    assert_eq!(
        classes.len(),
        profiles.iter().count(),
        "a StorageClass for a profile that is gone"
    );
}

#[test]
fn a_misspelt_field_is_caught() {
    let doc: Value = serde_yaml_ng::from_str("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: x}\nprovisioner: p\nallowVolumeExpanson: true\n").unwrap();
    let round_trip = typed::<StorageClass>(&doc).unwrap();
    assert_eq!(
        lost(&doc, &round_trip, "").as_deref(),
        Some(".allowVolumeExpanson")
    );
}

#[test]
fn the_shipped_config_is_one_the_binary_accepts() {
    let config = shipped_config();
    assert_eq!(config.datasets.default_name(), "production");
    assert_eq!(config.cache.max_bytes, 200 << 30);
    let driver: CSIDriver = manifest("csidriver.yaml");
    let modes = driver.spec.volume_lifecycle_modes.unwrap_or_default();
    assert_eq!(
        modes,
        ["Persistent", "Ephemeral"],
        "inline dataset volumes need Ephemeral"
    );
}

/// A VolumeSnapshotClass as the snapshot CRD defines it: every field known, the required ones
/// present, and the driver ours.
fn volume_snapshot_class(doc: &Value) -> Result<Value, String> {
    let known = [
        "apiVersion",
        "kind",
        "metadata",
        "driver",
        "deletionPolicy",
        "parameters",
    ];
    let object = doc.as_object().ok_or("not an object")?;
    if let Some(unknown) = object.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown}"));
    }
    if doc["apiVersion"] != "snapshot.storage.k8s.io/v1" || doc["driver"] != "lanes.csi.dev" {
        return Err("apiVersion must be snapshot.storage.k8s.io/v1, driver lanes.csi.dev".into());
    }
    match doc["deletionPolicy"].as_str() {
        Some("Delete" | "Retain") => Ok(doc.clone()),
        other => Err(format!("deletionPolicy {other:?} is not Delete or Retain")),
    }
}

/// Every external program the code runs, found in the source as `Command::new("…")` or as the
/// program a helper is given (`run("…", …)`), with the Debian package that has it.
fn programs_run_by_the_code() -> Vec<(String, &'static str)> {
    let package = |program: &str| match program {
        "xfs_quota" | "mkfs.xfs" | "xfs_growfs" => "xfsprogs",
        "mkfs.ext4" | "e2fsck" | "resize2fs" => "e2fsprogs",
        "git" => "git",
        other => panic!("add {other:?} and its Debian package to this test and the Dockerfile"),
    };
    let mut found = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            // `run("…")` names a program only where `run` is the helper that executes one.
            let runs_programs = text.contains("fn run(program: &'static str");
            for marker in ["Command::new(\"", "run(\"", "run(\n            \""] {
                if marker != "Command::new(\"" && !runs_programs {
                    continue;
                }
                for (at, _) in text.match_indices(marker) {
                    let rest = &text[at + marker.len()..];
                    let name = &rest[..rest.find('"').unwrap()];
                    if !found.iter().any(|(n, _)| n == name) {
                        found.push((name.to_owned(), package(name)));
                    }
                }
            }
        }
    }
    found
}

#[test]
fn the_image_has_every_program_the_code_runs() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let runtime = dockerfile
        .split("FROM debian:")
        .nth(1)
        .expect("a debian runtime stage");
    let programs = programs_run_by_the_code();
    for wanted in ["git", "mkfs.xfs", "mkfs.ext4", "resize2fs", "xfs_quota"] {
        assert!(
            programs.iter().any(|(p, _)| p == wanted),
            "the scan missed {wanted}: {programs:?}"
        );
    }
    for (program, package) in &programs {
        assert!(
            runtime.split_whitespace().any(|word| word == *package),
            "the runtime image runs {program} but does not install {package}"
        );
    }
    // git+ssh:// sources need ssh beside git.
    assert!(runtime.split_whitespace().any(|w| w == "openssh-client"));
    // shared-rwx profiles run `juicefs` (their `binary:`, `juicefs` on PATH by default);
    // legacy-rwx profiles mount with `mount -t nfs`, which needs mount.nfs (nfs-common).
    for profile in shipped_config().profiles.iter() {
        if let Some(nfs) = &profile.nfs {
            assert_eq!(nfs.mount_command, ["mount"], "profile {}", profile.name);
            assert!(
                runtime.split_whitespace().any(|w| w == "nfs-common"),
                "profile {} mounts NFS but the image lacks nfs-common",
                profile.name
            );
        }
        if let Some(juicefs) = &profile.juicefs {
            let binary = juicefs.binary.display().to_string();
            assert!(
                runtime.contains(&format!("/usr/local/bin/{binary}")),
                "profile {} runs {binary}, which the image does not hold",
                profile.name
            );
        }
    }
}

#[test]
fn the_license_file_is_the_one_cargo_toml_names() {
    let root = env!("CARGO_MANIFEST_DIR");
    let manifest = std::fs::read_to_string(format!("{root}/Cargo.toml")).unwrap();
    assert!(
        manifest.contains("license = \"Apache-2.0\""),
        "Cargo.toml's license changed"
    );
    let license = std::fs::read_to_string(format!("{root}/LICENSE")).unwrap();
    assert!(
        license.contains("Apache License") && license.contains("Version 2.0, January 2004"),
        "LICENSE is not the Apache License 2.0"
    );
}

#[test]
fn one_apply_of_the_directory_creates_the_namespace_first() {
    let mut files: Vec<_> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    // kubectl applies a directory's files in name order, each file's objects in order.
    files.sort();
    let mut namespace_made = false;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for doc in text.split("\n---") {
            let value: Value = serde_yaml_ng::from_str(doc).unwrap();
            if value["kind"] == "Namespace" {
                namespace_made = true;
            }
            if value["metadata"]["namespace"].is_string() {
                assert!(
                    namespace_made,
                    "{} applies a {} before the namespace exists",
                    file.display(),
                    value["kind"]
                );
            }
            assert_ne!(
                value["kind"],
                "Pod",
                "{}: examples belong in deploy/examples/",
                file.display()
            );
        }
    }
}

#[test]
fn the_node_plugin_runs_on_every_node_with_what_it_needs() {
    let node: DaemonSet = manifest("node.yaml");
    let pod = node.spec.unwrap().template.spec.unwrap();
    let tolerations = pod.tolerations.unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tainted nodes (GPU nodes) must get the node plugin: {tolerations:?}"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(
        pod.host_pid,
        Some(true),
        "JuiceFS mounts must outlive the container"
    );
    for container in &pod.containers {
        let requests = container
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref());
        assert!(
            requests.is_some(),
            "{} has no resource requests",
            container.name
        );
    }
    let lanes = pod.containers.iter().find(|c| c.name == "lanes").unwrap();
    let mounts = lanes.volume_mounts.as_deref().unwrap_or_default();
    for path in ["/var/lib/kubelet", "/var/lib/lanes"] {
        let mount = mounts.iter().find(|m| m.mount_path == path).unwrap();
        assert_eq!(
            mount.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{path}"
        );
    }
}
