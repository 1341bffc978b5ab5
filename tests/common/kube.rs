//! A Kubernetes API stand-in for tests (no kube-apiserver can be installed here): real HTTP on
//! loopback that kube-rs clients and controllers talk to through an ordinary kubeconfig.
//!
//! It keeps objects by collection path (`/api/v1/namespaces/<ns>/<plural>` or
//! `/apis/<group>/<version>/namespaces/<ns>/<plural>`) and serves what clients do with them:
//! GET one, LIST (with the collection's resourceVersion), WATCH (`?watch=true`: every event
//! after the given resourceVersion, then new ones as they happen, one JSON line each), POST
//! (create; 409 if it exists), PATCH (merge or apply: the body is merged in; apply creates),
//! PATCH of the `status` subresource (only `status` changes), and DELETE. Every change bumps
//! one resourceVersion counter, as the API server's etcd revision does. A list or watch of
//! `/api/v1/<plural>` or `/apis/<group>/<version>/<plural>` spans every namespace. `set_down`
//! makes it answer 503 and end its watches, as an unreachable API server would look. Objects
//! get `metadata.generation` (1, then one more for each change of `spec`), and a DELETE of
//! an object with finalizers only marks it (`deletionTimestamp`) until a patch empties them.
//! Not modelled: label/field selectors, optimistic concurrency on writes, admission,
//! garbage collection by owner.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Method, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One change: its resourceVersion, collection, kind of event and the object after it.
#[derive(Clone, Debug)]
struct Event {
    version: u64,
    collection: String,
    kind: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    version: u64,
    collections: BTreeMap<String, Vec<Value>>,
    events: Vec<Event>,
}

/// The objects the stand-in serves.
#[derive(Clone)]
pub struct Objects {
    state: Arc<Mutex<State>>,
    changes: broadcast::Sender<Event>,
    down: Arc<tokio::sync::watch::Sender<bool>>,
}

impl Default for Objects {
    fn default() -> Self {
        Objects {
            state: Arc::default(),
            changes: broadcast::channel(1024).0,
            down: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }
}

/// True for a path that lists a kind in every namespace: `/api/v1/pods`, `/apis/g/v/plural`.
fn all_namespaces(path: &str) -> bool {
    let segments = path.trim_start_matches('/').split('/').count();
    (path.starts_with("/api/") && segments == 3) || (path.starts_with("/apis/") && segments == 4)
}

/// True when `stored` is a collection a list of `asked` includes: itself, or, for an
/// all-namespaces path (`/api/v1/pods`, `/apis/g/v/plural`), its namespaced collections.
fn includes(asked: &str, stored: &str) -> bool {
    if asked == stored {
        return true;
    }
    let Some((prefix, plural)) = asked.rsplit_once('/') else {
        return false;
    };
    all_namespaces(asked)
        && stored
            .strip_prefix(&format!("{prefix}/namespaces/"))
            .and_then(|rest| rest.strip_suffix(&format!("/{plural}")))
            .is_some_and(|namespace| !namespace.is_empty() && !namespace.contains('/'))
}

fn status(code: u16, reason: &str, message: String) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
               "reason": reason, "code": code, "message": message}),
    )
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

impl Objects {
    /// Adds or replaces `object` (by `metadata.name`) in `collection`.
    pub fn put(&self, collection: &str, object: Value) {
        let mut state = self.state.lock().unwrap();
        let name = object["metadata"]["name"].clone();
        let existed = state
            .collections
            .get(collection)
            .is_some_and(|items| items.iter().any(|o| o["metadata"]["name"] == name));
        self.record(
            &mut state,
            collection,
            if existed { "MODIFIED" } else { "ADDED" },
            object,
        );
    }

    /// Takes the API server away (every request 503, watches end) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    fn is_down(&self) -> bool {
        *self.down.borrow()
    }

    /// Makes `collection` exist with no items.
    pub fn empty(&self, collection: &str) {
        self.state
            .lock()
            .unwrap()
            .collections
            .entry(collection.to_owned())
            .or_default();
    }

    /// The object `name` in `collection`, as stored now.
    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .collections
            .get(collection)?
            .iter()
            .find(|o| o["metadata"]["name"] == name)
            .cloned()
    }

    /// Every version `name` in `collection` has had, oldest first (deletions included).
    pub fn history(&self, collection: &str, name: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .events
            .iter()
            .filter(|e| e.collection == collection && e.object["metadata"]["name"] == name)
            .map(|e| e.object.clone())
            .collect()
    }

    /// Every object in `collection`, as stored now.
    pub fn get_all(&self, collection: &str) -> Vec<Value> {
        let state = self.state.lock().unwrap();
        state
            .collections
            .get(collection)
            .cloned()
            .unwrap_or_default()
    }

    /// Stores `object` with a new resourceVersion and tells watchers.
    fn record(&self, state: &mut State, collection: &str, kind: &'static str, mut object: Value) {
        state.version += 1;
        let version = state.version;
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] = json!(format!("uid-{version}"));
        }
        let items = state.collections.entry(collection.to_owned()).or_default();
        let name = object["metadata"]["name"].clone();
        let before = items.iter().find(|o| o["metadata"]["name"] == name);
        let generation = match before {
            Some(old) if old["spec"] == object["spec"] => old["metadata"]["generation"].clone(),
            Some(old) => json!(old["metadata"]["generation"].as_i64().unwrap_or(0) + 1),
            None => json!(1),
        };
        object["metadata"]["generation"] = generation;
        items.retain(|o| o["metadata"]["name"] != name);
        if kind != "DELETED" {
            items.push(object.clone());
        }
        let event = Event {
            version,
            collection: collection.to_owned(),
            kind,
            object,
        };
        state.events.push(event.clone());
        let _ = self.changes.send(event);
    }

    fn list(&self, collection: &str) -> (u16, Value) {
        let state = self.state.lock().unwrap();
        let mut found = false;
        let mut items = Vec::new();
        for (stored, objects) in &state.collections {
            if includes(collection, stored) {
                found = true;
                items.extend(objects.iter().cloned());
            }
        }
        if !found && !all_namespaces(collection) {
            return status(404, "NotFound", format!("{collection} not found"));
        }
        (
            200,
            json!({"apiVersion": "v1", "kind": "List",
                   "metadata": {"resourceVersion": state.version.to_string()},
                   "items": items}),
        )
    }

    /// Answers one request: `path` split into collection and name, `subresource` if any.
    fn answer(&self, method: &Method, path: &str, body: &[u8], apply: bool) -> (u16, Value) {
        let parsed: Value = serde_json::from_slice(body)
            .or_else(|_| serde_yaml_ng::from_slice(body))
            .unwrap_or(Value::Null);
        if self.is_down() {
            return status(503, "ServiceUnavailable", "the API server is down".into());
        }
        let collection_exists = self.state.lock().unwrap().collections.contains_key(path);
        let listed = collection_exists || (all_namespaces(path) && *method == Method::GET);
        if listed || *method == Method::POST {
            return match *method {
                Method::GET => self.list(path),
                Method::POST => self.create(path, parsed),
                _ => status(405, "MethodNotAllowed", format!("{method} {path}")),
            };
        }
        let (rest, subresource) = match path.strip_suffix("/status") {
            Some(rest) => (rest, Some("status")),
            None => (path, None),
        };
        let Some((collection, name)) = rest.rsplit_once('/') else {
            return status(404, "NotFound", format!("{path} not found"));
        };
        match *method {
            Method::GET => match self.get(collection, name) {
                Some(object) => (200, object),
                None => status(404, "NotFound", format!("{path} not found")),
            },
            Method::PATCH | Method::PUT => self.patch(collection, name, subresource, parsed, apply),
            Method::DELETE => {
                let mut state = self.state.lock().unwrap();
                let found = state
                    .collections
                    .get(collection)
                    .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == name))
                    .cloned();
                match found {
                    Some(mut object)
                        if object["metadata"]["finalizers"]
                            .as_array()
                            .is_some_and(|f| !f.is_empty()) =>
                    {
                        if object["metadata"]["deletionTimestamp"].is_null() {
                            object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                            self.record(&mut state, collection, "MODIFIED", object.clone());
                        }
                        (200, object)
                    }
                    Some(object) => {
                        self.record(&mut state, collection, "DELETED", object.clone());
                        (200, object)
                    }
                    None => status(404, "NotFound", format!("{path} not found")),
                }
            }
            _ => status(405, "MethodNotAllowed", format!("{method} {path}")),
        }
    }

    fn create(&self, collection: &str, object: Value) -> (u16, Value) {
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty() {
            return status(422, "Invalid", "metadata.name is required".into());
        }
        if self.get(collection, &name).is_some() {
            return status(409, "AlreadyExists", format!("{name} already exists"));
        }
        let mut state = self.state.lock().unwrap();
        self.record(&mut state, collection, "ADDED", object);
        (201, self.get_locked(&state, collection, &name))
    }

    fn patch(
        &self,
        collection: &str,
        name: &str,
        subresource: Option<&str>,
        patch: Value,
        apply: bool,
    ) -> (u16, Value) {
        let mut state = self.state.lock().unwrap();
        let existing = state
            .collections
            .get(collection)
            .and_then(|items| items.iter().find(|o| o["metadata"]["name"] == name))
            .cloned();
        let (mut object, kind) = match existing {
            Some(object) => (object, "MODIFIED"),
            // Server-side apply creates what is not there; other patches cannot.
            None if subresource.is_none() && apply => {
                (json!({"metadata": {"name": name}}), "ADDED")
            }
            None => return status(404, "NotFound", format!("{collection}/{name} not found")),
        };
        match subresource {
            Some("status") => merge(&mut object["status"], &patch["status"]),
            _ => {
                let mut patch = patch;
                // Status is only written through its subresource, as the API server does for
                // types that have one.
                if let Some(map) = patch.as_object_mut() {
                    map.remove("status");
                }
                merge(&mut object, &patch);
            }
        }
        let released = !object["metadata"]["deletionTimestamp"].is_null()
            && object["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        if released {
            self.record(&mut state, collection, "DELETED", object.clone());
            return (200, object);
        }
        self.record(&mut state, collection, kind, object);
        (200, self.get_locked(&state, collection, name))
    }

    fn get_locked(&self, state: &State, collection: &str, name: &str) -> Value {
        state.collections[collection]
            .iter()
            .find(|o| o["metadata"]["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// A watch of `collection` from after `since`: the backlog, then live events.
    fn watch(&self, collection: String, since: u64) -> Body {
        let mut live = self.changes.subscribe();
        let backlog: Vec<Event> = self
            .state
            .lock()
            .unwrap()
            .events
            .iter()
            .filter(|e| e.version > since && includes(&collection, &e.collection))
            .cloned()
            .collect();
        let (lines, out) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
        let mut down = self.down.subscribe();
        tokio::spawn(async move {
            let line = |e: &Event| format!("{}\n", json!({"type": e.kind, "object": e.object}));
            let mut last = since;
            for event in &backlog {
                last = event.version;
                if lines.send(Ok(line(event))).await.is_err() {
                    return;
                }
            }
            loop {
                let event = tokio::select! {
                    event = live.recv() => match event {
                        Ok(event) => event,
                        Err(_) => return,
                    },
                    _ = down.wait_for(|down| *down) => return,
                };
                if includes(&collection, &event.collection)
                    && event.version > last
                    && lines.send(Ok(line(&event))).await.is_err()
                {
                    return;
                }
            }
        });
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(out))
    }
}

/// A running stand-in and the kubeconfig that reaches it.
pub struct KubeStandIn {
    pub objects: Objects,
    pub kubeconfig: PathBuf,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
}

impl KubeStandIn {
    /// Serves `objects` on a free loopback port; the kubeconfig goes into `dir`.
    pub async fn start(dir: &Path, objects: Objects) -> KubeStandIn {
        let served = objects.clone();
        let app = axum::Router::new().fallback(
            move |method: Method,
                  uri: Uri,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let served = served.clone();
                async move {
                    // Server-side apply (and only it) creates what a patch names.
                    let apply = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.contains("apply-patch"));
                    let query = uri.query().unwrap_or_default();
                    let param = |key: &str| {
                        query
                            .split('&')
                            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                            .map(str::to_owned)
                    };
                    if served.is_down() {
                        let (code, value) = served.answer(&method, uri.path(), &body, apply);
                        return (
                            StatusCode::from_u16(code).unwrap(),
                            [("content-type", "application/json")],
                            Body::from(value.to_string()),
                        );
                    }
                    if method == Method::GET && param("watch").as_deref() == Some("true") {
                        let since = param("resourceVersion")
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(0);
                        let body = served.watch(uri.path().to_owned(), since);
                        return (StatusCode::OK, [("content-type", "application/json")], body);
                    }
                    let (code, value) = served.answer(&method, uri.path(), &body, apply);
                    (
                        StatusCode::from_u16(code).unwrap(),
                        [("content-type", "application/json")],
                        Body::from(value.to_string()),
                    )
                }
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let url = format!("http://127.0.0.1:{port}");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster: {{server: \"{url}\"}}\nusers:\n- name: u\n  user: {{}}\ncontexts:\n- name: c\n  context: {{cluster: standin, user: u, namespace: default}}\ncurrent-context: c\n"
            ),
        )
        .unwrap();
        KubeStandIn {
            objects,
            kubeconfig,
            url,
        }
    }

    /// Makes `collection` exist with no items.
    pub fn empty(&self, collection: &str) {
        self.objects.empty(collection);
    }

    /// A kube-rs client for this stand-in.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url.parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }
}
