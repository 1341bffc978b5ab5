//! Longhorn as a `fast-rwo` profile: Longhorn's own CSI driver (`driver.longhorn.io`) makes
//! and mounts the volumes; Lanes reports whether the profile can take a volume now and how much
//! room it has, from Longhorn's `nodes.longhorn.io` and `volumes.longhorn.io` (v1beta2).
//!
//! Rule: a Longhorn node counts only when it is Ready and Schedulable (and scheduling is
//! allowed on it), and a disk only when it is Ready and Schedulable too; the room a new volume
//! can get is the most any one such disk has (a replica lives on one disk).

use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The `longhorn:` settings of a `fast-rwo` profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LonghornBackend {
    /// The Longhorn StorageClass PVCs of this profile use.
    pub storage_class: String,
    /// Where Longhorn runs.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "longhorn-system".into()
}

/// What Longhorn offers now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub available: bool,
    pub reason: Option<String>,
    /// The most one schedulable disk can take now.
    pub largest_free: u64,
    /// Free bytes over every schedulable disk.
    pub free: u64,
    /// Bytes of every schedulable disk.
    pub total: u64,
    pub schedulable_nodes: usize,
    pub nodes: usize,
    /// Volumes whose robustness is not `healthy` (degraded, faulted, unknown), by name.
    pub unhealthy_volumes: Vec<String>,
    pub volumes: usize,
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "longhorn.io".into(),
        version: "v1beta2".into(),
        api_version: "longhorn.io/v1beta2".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// True when `conditions` (a Longhorn list of `{type, status}`) has `kind` with status True.
fn condition(conditions: &Value, kind: &str) -> bool {
    conditions.as_array().is_some_and(|list| {
        list.iter()
            .any(|c| c["type"] == kind && c["status"] == "True")
    })
}

fn bytes(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

/// The profile's availability for `lanes profiles`: Longhorn's health read through the API.
pub async fn probe(kube: &crate::kubeapi::Kube, backend: &LonghornBackend) -> super::local::Probe {
    let health = match kube.client().await {
        Ok(client) => health(client, backend).await,
        Err(e) => Err(e),
    };
    let what = format!(
        "Longhorn (StorageClass {}, driver.longhorn.io)",
        backend.storage_class
    );
    match health {
        Ok(health) => super::local::Probe {
            available: health.available,
            reason: health.reason.clone(),
            backend: format!(
                "{what}: {}/{} nodes schedulable, {} volumes{}",
                health.schedulable_nodes,
                health.nodes,
                health.volumes,
                match health.unhealthy_volumes.as_slice() {
                    [] => String::new(),
                    some => format!(" (not healthy: {})", some.join(", ")),
                }
            ),
            capacity_enforced: true,
            enforcement: "Longhorn volumes are block devices of their size".into(),
            free_bytes: Some(health.largest_free),
        },
        Err(reason) => super::local::Probe {
            available: false,
            reason: Some(reason),
            backend: what,
            capacity_enforced: true,
            enforcement: "Longhorn volumes are block devices of their size".into(),
            free_bytes: None,
        },
    }
}

/// Reads Longhorn's nodes and volumes through `client`.
pub async fn health(client: kube::Client, backend: &LonghornBackend) -> Result<Health, String> {
    let nodes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        &backend.namespace,
        &resource("Node", "nodes"),
    );
    let volumes: Api<DynamicObject> =
        Api::namespaced_with(client, &backend.namespace, &resource("Volume", "volumes"));
    let nodes = nodes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list nodes.longhorn.io in {}: {e}", backend.namespace))?;
    let volumes = volumes
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("list volumes.longhorn.io in {}: {e}", backend.namespace))?;
    Ok(judge(
        nodes.items.iter().map(|o| &o.data),
        volumes
            .items
            .iter()
            .map(|o| (o.metadata.name.as_deref().unwrap_or(""), &o.data)),
    ))
}

/// The health of Longhorn nodes and volumes given as their JSON (`spec`, `status`).
pub fn judge<'a>(
    nodes: impl Iterator<Item = &'a Value>,
    volumes: impl Iterator<Item = (&'a str, &'a Value)>,
) -> Health {
    let mut health = Health {
        available: false,
        reason: None,
        largest_free: 0,
        free: 0,
        total: 0,
        schedulable_nodes: 0,
        nodes: 0,
        unhealthy_volumes: Vec::new(),
        volumes: 0,
    };
    for node in nodes {
        health.nodes += 1;
        let status = &node["status"];
        if !condition(&status["conditions"], "Ready")
            || !condition(&status["conditions"], "Schedulable")
            || node["spec"]["allowScheduling"] == false
        {
            continue;
        }
        health.schedulable_nodes += 1;
        let Some(disks) = status["diskStatus"].as_object() else {
            continue;
        };
        for (name, disk) in disks {
            let allowed = node["spec"]["disks"][name]["allowScheduling"] != false;
            if !allowed
                || !condition(&disk["conditions"], "Ready")
                || !condition(&disk["conditions"], "Schedulable")
            {
                continue;
            }
            let free = bytes(&disk["storageAvailable"]);
            health.free += free;
            health.total += bytes(&disk["storageMaximum"]);
            health.largest_free = health.largest_free.max(free);
        }
    }
    for (name, volume) in volumes {
        health.volumes += 1;
        let robustness = volume["status"]["robustness"].as_str().unwrap_or("unknown");
        if robustness != "healthy" && volume["status"]["state"] == "attached" {
            health
                .unhealthy_volumes
                .push(format!("{name} ({robustness})"));
        }
    }
    health.reason = if health.nodes == 0 {
        Some("Longhorn reports no nodes".into())
    } else if health.schedulable_nodes == 0 {
        Some(format!(
            "none of Longhorn's {} nodes is Ready and Schedulable",
            health.nodes
        ))
    } else if health.largest_free == 0 {
        Some("no Ready, Schedulable Longhorn disk has space left".into())
    } else {
        None
    };
    health.available = health.reason.is_none();
    health
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ready: bool, disks: Value) -> Value {
        let state = |b: bool| if b { "True" } else { "False" };
        json!({
            "spec": {"allowScheduling": true},
            "status": {
                "conditions": [{"type": "Ready", "status": state(ready)},
                               {"type": "Schedulable", "status": "True"}],
                "diskStatus": disks,
            }
        })
    }

    fn disk(free: u64, max: u64, ok: bool) -> Value {
        let state = if ok { "True" } else { "False" };
        json!({"storageAvailable": free, "storageMaximum": max, "storageScheduled": 0,
               "conditions": [{"type": "Ready", "status": state},
                              {"type": "Schedulable", "status": state}]})
    }

    #[test]
    fn only_ready_schedulable_disks_count() {
        let nodes = [
            node(
                true,
                json!({"a": disk(50, 100, true), "b": disk(70, 100, false)}),
            ),
            node(true, json!({"c": disk(30, 100, true)})),
            node(false, json!({"d": disk(90, 100, true)})),
        ];
        let volume = json!({"status": {"state": "attached", "robustness": "degraded"}});
        let health = judge(nodes.iter(), [("pvc-1", &volume)].into_iter());
        assert!(health.available);
        assert_eq!(
            (health.largest_free, health.free, health.total),
            (50, 80, 200)
        );
        assert_eq!((health.schedulable_nodes, health.nodes), (2, 3));
        assert_eq!(health.unhealthy_volumes, vec!["pvc-1 (degraded)"]);
        let none = judge([node(false, json!({}))].iter(), std::iter::empty());
        assert!(!none.available);
        assert!(none.reason.unwrap().contains("Ready and Schedulable"));
        let full = judge(
            [node(true, json!({"a": disk(0, 100, true)}))].iter(),
            std::iter::empty(),
        );
        assert!(full.reason.unwrap().contains("space"));
    }
}
