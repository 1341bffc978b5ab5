//! A Kubernetes API stand-in for tests (no kube-apiserver can be installed here): real HTTP on
//! loopback, serving GET and LIST of the objects a test puts in it, each with a
//! resourceVersion, and 404 Status for anything else; plus a kubeconfig that points at it.
//! Watches, writes and status updates are added when a test needs them.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

/// Objects by collection path (`/apis/<group>/<version>/namespaces/<ns>/<plural>`).
#[derive(Default, Clone)]
pub struct Objects(Arc<Mutex<BTreeMap<String, Vec<Value>>>>);

impl Objects {
    /// Adds `object` (with `metadata.name`) to the collection at `collection`.
    pub fn put(&self, collection: &str, mut object: Value) {
        let mut all = self.0.lock().unwrap();
        let version = all.values().map(Vec::len).sum::<usize>() + 1;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let items = all.entry(collection.to_owned()).or_default();
        let name = object["metadata"]["name"].clone();
        items.retain(|o| o["metadata"]["name"] != name);
        items.push(object);
    }

    fn answer(&self, path: &str) -> (u16, Value) {
        let all = self.0.lock().unwrap();
        if let Some(items) = all.get(path) {
            let kind = items
                .first()
                .and_then(|o| o["kind"].as_str())
                .unwrap_or("Object");
            return (
                200,
                json!({"apiVersion": "v1", "kind": format!("{kind}List"),
                       "metadata": {"resourceVersion": all.values().map(Vec::len).sum::<usize>().to_string()},
                       "items": items}),
            );
        }
        if let Some((collection, name)) = path.rsplit_once('/')
            && let Some(found) = all
                .get(collection)
                .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == name))
        {
            return (200, found.clone());
        }
        (
            404,
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "reason": "NotFound", "code": 404, "message": format!("{path} not found")}),
        )
    }
}

/// A running stand-in and the kubeconfig that reaches it.
pub struct KubeStandIn {
    pub objects: Objects,
    pub kubeconfig: PathBuf,
}

impl KubeStandIn {
    /// Serves `objects` on a free loopback port; the kubeconfig goes into `dir`. Lists of a
    /// collection with nothing in it are 404 unless the test puts an empty list there with
    /// [`KubeStandIn::empty`].
    pub async fn start(dir: &Path, objects: Objects) -> KubeStandIn {
        let served = objects.clone();
        let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
            let served = served.clone();
            async move {
                let (status, body) = served.answer(uri.path());
                (
                    axum::http::StatusCode::from_u16(status).unwrap(),
                    [("content-type", "application/json")],
                    body.to_string(),
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: standin, user: u}}\ncurrent-context: c\n"
            ),
        )
        .unwrap();
        KubeStandIn {
            objects,
            kubeconfig,
        }
    }

    /// Makes `collection` exist with no items.
    pub fn empty(&self, collection: &str) {
        self.objects
            .0
            .lock()
            .unwrap()
            .entry(collection.to_owned())
            .or_default();
    }
}
