//! The Kubernetes API stand-in the tests use in place of a kube-apiserver, exercised with the
//! real kube-rs client over HTTP: what a controller does (list, watch from a resourceVersion,
//! create, merge and apply patches, status patches, delete) behaves as the API server does.

mod common;

use common::kube::{KubeStandIn, Objects};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    WatchEvent, WatchParams,
};
use serde_json::json;
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread")]
async fn kube_rs_clients_list_watch_create_patch_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let api = KubeStandIn::start(dir.path(), Objects::default()).await;
    api.empty("/api/v1/namespaces/team-a/configmaps");
    let maps: Api<ConfigMap> = Api::namespaced(api.client(), "team-a");

    let listed = maps.list(&ListParams::default()).await.unwrap();
    assert!(listed.items.is_empty());
    let since = listed.metadata.resource_version.unwrap();
    let mut events = Box::pin(maps.watch(&WatchParams::default(), &since).await.unwrap());

    let made: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "settings", "namespace": "team-a"},
        "data": {"a": "1"}
    }))
    .unwrap();
    maps.create(&PostParams::default(), &made).await.unwrap();
    let again = maps
        .create(&PostParams::default(), &made)
        .await
        .unwrap_err();
    assert!(again.to_string().contains("AlreadyExists"), "{again}");
    maps.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"b": "2"}})),
    )
    .await
    .unwrap();
    let applied = maps
        .patch(
            "other",
            &PatchParams::apply("lanes-test"),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": "other"}, "data": {"c": "3"}})),
        )
        .await
        .unwrap();
    assert_eq!(applied.data.unwrap()["c"], "3");
    let got = maps.get("settings").await.unwrap();
    assert_eq!(got.data.clone().unwrap().len(), 2);
    maps.delete("settings", &DeleteParams::default())
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(std::time::Duration::from_secs(5), events.next())
            .await
            .expect("a watch event")
            .unwrap()
            .unwrap();
        seen.push(match event {
            WatchEvent::Added(o) => format!("added {}", o.metadata.name.unwrap()),
            WatchEvent::Modified(o) => format!("modified {}", o.metadata.name.unwrap()),
            WatchEvent::Deleted(o) => format!("deleted {}", o.metadata.name.unwrap()),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        seen,
        [
            "added settings",
            "modified settings",
            "added other",
            "deleted settings"
        ]
    );

    // A custom resource's status goes through its subresource only.
    let resource = ApiResource {
        group: "lanes.csi.dev".into(),
        version: "v1alpha1".into(),
        api_version: "lanes.csi.dev/v1alpha1".into(),
        kind: "FastStage".into(),
        plural: "faststages".into(),
    };
    let stages: Api<DynamicObject> = Api::namespaced_with(api.client(), "team-a", &resource);
    let mut stage = DynamicObject::new("stage-1", &resource);
    stage.data = json!({"spec": {"sourcePvc": "data"}});
    stages.create(&PostParams::default(), &stage).await.unwrap();
    stages
        .patch_status(
            "stage-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Copying"}})),
        )
        .await
        .unwrap();
    stages
        .patch(
            "stage-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Ignored"}, "spec": {"checksum": "sha256"}})),
        )
        .await
        .unwrap();
    let now = stages.get("stage-1").await.unwrap();
    assert_eq!(now.data["status"]["phase"], "Copying");
    assert_eq!(now.data["spec"]["checksum"], "sha256");
    assert_eq!(now.data["spec"]["sourcePvc"], "data");
}
