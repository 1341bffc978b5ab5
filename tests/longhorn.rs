//! Longhorn as a fast-rwo profile: availability and capacity read from Longhorn's
//! nodes.longhorn.io and volumes.longhorn.io (v1beta2) through a Kubernetes API stand-in on
//! loopback (JSON shaped like Longhorn's Go types). Not run against a real Longhorn.

mod common;

use common::kube::{KubeStandIn, Objects};
use common::*;
use lanes::proto::*;
use serde_json::{Value, json};

const NODES: &str = "/apis/longhorn.io/v1beta2/namespaces/longhorn-system/nodes";
const VOLUMES: &str = "/apis/longhorn.io/v1beta2/namespaces/longhorn-system/volumes";
const GIB: u64 = 1 << 30;

const CONFIG: &str = "\
profiles:
  fast:
    lane: fast-rwo
    default: true
  replicated:
    lane: fast-rwo
    description: Longhorn block volumes, replicated across nodes
    longhorn: {storage_class: longhorn}
";

fn node(name: &str, ready: bool, disks: Value) -> Value {
    let state = if ready { "True" } else { "False" };
    json!({
        "apiVersion": "longhorn.io/v1beta2", "kind": "Node",
        "metadata": {"name": name, "namespace": "longhorn-system"},
        "spec": {"allowScheduling": true, "disks": {}},
        "status": {
            "conditions": [{"type": "Ready", "status": state, "reason": ""},
                           {"type": "Schedulable", "status": "True", "reason": ""}],
            "diskStatus": disks,
        }
    })
}

fn disk(available: u64, maximum: u64) -> Value {
    json!({"storageAvailable": available, "storageMaximum": maximum, "storageScheduled": 0,
           "conditions": [{"type": "Ready", "status": "True"},
                          {"type": "Schedulable", "status": "True"}]})
}

fn volume(name: &str, robustness: &str) -> Value {
    json!({
        "apiVersion": "longhorn.io/v1beta2", "kind": "Volume",
        "metadata": {"name": name, "namespace": "longhorn-system"},
        "spec": {"size": "10737418240", "numberOfReplicas": 3},
        "status": {"state": "attached", "robustness": robustness},
    })
}

fn profiles(plugin_config: &std::path::Path, kubeconfig: Option<&std::path::Path>) -> Vec<Value> {
    let data = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_lanes"));
    command
        .arg("--data-dir")
        .arg(data.path())
        .arg("--config")
        .arg(plugin_config)
        .args(["profiles", "--json"]);
    match kubeconfig {
        Some(path) => command.env("KUBECONFIG", path),
        None => command.env("KUBECONFIG", "/nonexistent/kubeconfig"),
    };
    let output = command
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_longhorn_profile_reports_what_longhorn_can_take() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanes.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let objects = Objects::default();
    objects.put(
        NODES,
        node("gpu-1", true, json!({"nvme": disk(50 * GIB, 100 * GIB)})),
    );
    objects.put(
        NODES,
        node("gpu-2", false, json!({"nvme": disk(90 * GIB, 100 * GIB)})),
    );
    objects.put(VOLUMES, volume("pvc-a", "healthy"));
    objects.put(VOLUMES, volume("pvc-b", "degraded"));
    let api = KubeStandIn::start(dir.path(), objects).await;

    let rows = profiles(&config, Some(&api.kubeconfig));
    let row = rows.iter().find(|r| r["name"] == "replicated").unwrap();
    assert_eq!(row["lane"], "fast-rwo");
    assert_eq!(row["available"], true, "{row}");
    assert_eq!(
        row["free_bytes"],
        50 * GIB,
        "the most one schedulable disk can take"
    );
    let backend = row["backend"].as_str().unwrap();
    assert!(backend.contains("StorageClass longhorn"), "{backend}");
    assert!(backend.contains("1/2 nodes schedulable"), "{backend}");
    assert!(backend.contains("pvc-b (degraded)"), "{backend}");

    // GetCapacity of the profile comes from Longhorn; creating on it is Longhorn's job.
    let plugin = Plugin::with_config_env(
        CONFIG,
        None,
        &[("KUBECONFIG", api.kubeconfig.to_str().unwrap())],
    );
    let mut c = plugin.clients().await;
    let capacity = c
        .controller
        .get_capacity(GetCapacityRequest {
            parameters: [("profile".to_owned(), "replicated".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capacity.available_capacity, (50 * GIB) as i64);
    let mut create = create_request("pvc-longhorn", 1 << 30);
    create.parameters = [("profile".to_owned(), "replicated".to_owned())].into();
    let err = c.controller.create_volume(create).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("StorageClass longhorn"), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_longhorn_profile_says_why_it_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("lanes.yaml");
    std::fs::write(&config, CONFIG).unwrap();
    let objects = Objects::default();
    objects.put(
        NODES,
        node("gpu-1", false, json!({"nvme": disk(50 * GIB, 100 * GIB)})),
    );
    let api = KubeStandIn::start(dir.path(), objects).await;
    api.empty(VOLUMES);
    let rows = profiles(&config, Some(&api.kubeconfig));
    let row = rows.iter().find(|r| r["name"] == "replicated").unwrap();
    assert_eq!(row["available"], false);
    assert!(
        row["reason"]
            .as_str()
            .unwrap()
            .contains("Ready and Schedulable"),
        "{row}"
    );

    let rows = profiles(&config, None);
    let row = rows.iter().find(|r| r["name"] == "replicated").unwrap();
    assert_eq!(row["available"], false);
    assert!(
        row["reason"].as_str().unwrap().contains("Kubernetes"),
        "{row}"
    );
    let local = rows.iter().find(|r| r["name"] == "fast").unwrap();
    assert!(local["backend"].as_str().unwrap().contains("disk image"));
}
