//! The node's answer to "who is this pod's user, and what does the group grant them": the pods
//! of this node and every StorageGroup, each kept by a watch and read with no API round trip
//! once warm.
//!
//! Fail-closed rule: a cache is used only while its watch is healthy. Before the first full
//! list, and from a watch error until the next full list, each decision reads the object it
//! needs from the API instead; when that read fails too, the publish is refused as
//! UNAVAILABLE (kubelet retries) — never allowed on a guess. Mounts already made are not
//! touched by any of this.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::events;
use kube::runtime::watcher::{self, Event};
use tokio::sync::OnceCell;

use super::{Decision, Ownership, StorageGroup, UserSource, decide};
use crate::kubeapi::Kube;

/// How long the first publish of an owned volume waits for the caches' first full list.
const WARM_UP: Duration = Duration::from_secs(5);
/// The pause before listing again after a watch failed, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The pod a NodePublishVolume is for, as kubelet names it (`podInfoOnMount`).
#[derive(Debug, Clone)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl PodRef {
    /// Reads the pod from a NodePublishVolume volume context.
    pub fn from_context(context: &HashMap<String, String>) -> Option<PodRef> {
        let get = |key: &str| context.get(key).filter(|v| !v.is_empty()).cloned();
        Some(PodRef {
            namespace: get("csi.storage.k8s.io/pod.namespace")?,
            name: get("csi.storage.k8s.io/pod.name")?,
            uid: get("csi.storage.k8s.io/pod.uid").unwrap_or_default(),
        })
    }
}

/// Why a decision could not be made (the publish is refused as UNAVAILABLE).
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot decide access to {volume}: {reason}; refusing until it can (mounts already made are untouched)"
)]
pub struct Unknown {
    volume: String,
    reason: String,
}

/// An API error as a person reads it: the server's message and code, or the transport's.
fn shown(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}

/// Objects of one kind kept by a watch, by `namespace/name`.
struct Watched<K> {
    state: RwLock<Cached<K>>,
    synced: tokio::sync::Notify,
}

struct Cached<K> {
    objects: HashMap<String, K>,
    /// True from a full list until the next watch error.
    healthy: bool,
}

fn key_of<K: kube::Resource>(object: &K) -> String {
    let meta = object.meta();
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

impl<K> Watched<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    fn start(kind: &'static str, api: Api<K>, config: watcher::Config) -> Arc<Watched<K>> {
        let watched = Arc::new(Watched {
            state: RwLock::new(Cached {
                objects: HashMap::new(),
                healthy: false,
            }),
            synced: tokio::sync::Notify::new(),
        });
        let feed = Arc::downgrade(&watched);
        tokio::spawn(async move {
            let mut pause = RETRY_FIRST;
            // Each round lists everything afresh, then follows the watch until it fails; the
            // cache counts as healthy only between a full list and the next failure.
            loop {
                let mut stream = std::pin::pin!(watcher::watcher(api.clone(), config.clone()));
                let mut listing = HashMap::new();
                while let Some(event) = stream.next().await {
                    let Some(watched) = feed.upgrade() else {
                        return;
                    };
                    let mut state = watched.state.write().unwrap_or_else(|e| e.into_inner());
                    match event {
                        Ok(Event::Init) => listing.clear(),
                        Ok(Event::InitApply(object)) => {
                            listing.insert(key_of(&object), object);
                        }
                        Ok(Event::InitDone) => {
                            state.objects = std::mem::take(&mut listing);
                            state.healthy = true;
                            pause = RETRY_FIRST;
                            watched.synced.notify_waiters();
                        }
                        Ok(Event::Apply(object)) => {
                            state.objects.insert(key_of(&object), object);
                        }
                        Ok(Event::Delete(object)) => {
                            state.objects.remove(&key_of(&object));
                        }
                        Err(e) => {
                            if state.healthy {
                                tracing::warn!(
                                    kind,
                                    error = %e,
                                    "watch failed: access decisions read from the API until it is listed again"
                                );
                            }
                            state.healthy = false;
                            break;
                        }
                    }
                }
                if feed.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RETRY_MAX);
            }
        });
        watched
    }

    /// The cached object, if the cache is healthy: `Some(None)` is "healthy and not there".
    fn get(&self, key: &str) -> Option<Option<K>> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state.healthy.then(|| state.objects.get(key).cloned())
    }

    async fn wait_synced(&self, limit: Duration) {
        let synced = self.synced.notified();
        if self.state.read().unwrap_or_else(|e| e.into_inner()).healthy {
            return;
        }
        let _ = tokio::time::timeout(limit, synced).await;
    }
}

struct Caches {
    client: kube::Client,
    pods: Arc<Watched<Pod>>,
    groups: Arc<Watched<StorageGroup>>,
    recorder: events::Recorder,
}

/// Pods and StorageGroups as this node sees them; started at the first owned publish.
pub struct Directory {
    kube: Arc<Kube>,
    node_name: String,
    driver_name: String,
    user_from: UserSource,
    caches: OnceCell<Caches>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("user_from", &self.user_from)
            .field("started", &self.caches.initialized())
            .finish()
    }
}

impl Directory {
    pub fn new(
        kube: Arc<Kube>,
        node_name: &str,
        driver_name: &str,
        user_from: UserSource,
    ) -> Directory {
        Directory {
            kube,
            node_name: node_name.to_owned(),
            driver_name: driver_name.to_owned(),
            user_from,
            caches: OnceCell::new(),
        }
    }

    async fn caches(&self, volume: &str) -> Result<&Caches, Unknown> {
        let client = self.kube.fail_fast().await.map_err(|reason| Unknown {
            volume: volume.to_owned(),
            reason,
        })?;
        let caches = self
            .caches
            .get_or_init(|| async {
                let pods = Watched::start(
                    "Pod",
                    Api::all(client.clone()),
                    watcher::Config::default().fields(&format!("spec.nodeName={}", self.node_name)),
                );
                let groups = Watched::start(
                    "StorageGroup",
                    Api::all(client.clone()),
                    watcher::Config::default(),
                );
                let reporter = events::Reporter {
                    controller: self.driver_name.clone(),
                    instance: Some(self.node_name.clone()),
                };
                // The first decision waits (a little) for the first full lists; later ones
                // never wait on a watch.
                tokio::join!(pods.wait_synced(WARM_UP), groups.wait_synced(WARM_UP));
                Caches {
                    recorder: events::Recorder::new(client.clone(), reporter),
                    client,
                    pods,
                    groups,
                }
            })
            .await;
        Ok(caches)
    }

    /// Decides what `pod` may do with the volume `ownership` describes.
    pub async fn decide(&self, ownership: &Ownership, pod: &PodRef) -> Result<Decision, Unknown> {
        let volume = ownership.describe();
        let caches = self.caches(&volume).await?;
        let unknown = |what: &str, e: kube::Error| Unknown {
            volume: volume.clone(),
            reason: format!("reading {what} from the Kubernetes API: {}", shown(&e)),
        };
        let pod_key = format!("{}/{}", pod.namespace, pod.name);
        let cached =
            caches.pods.get(&pod_key).flatten().filter(|p| {
                pod.uid.is_empty() || p.metadata.uid.as_deref() == Some(pod.uid.as_str())
            });
        let found = match cached {
            Some(found) => found,
            // Not seen yet (a pod just scheduled) or the watch is down: ask the API.
            None => Api::<Pod>::namespaced(caches.client.clone(), &pod.namespace)
                .get(&pod.name)
                .await
                .map_err(|e| unknown(&format!("pod {pod_key}"), e))?,
        };
        if !pod.uid.is_empty() && found.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            return Err(Unknown {
                volume,
                reason: format!("pod {pod_key} is not the pod kubelet named (UID differs)"),
            });
        }
        let user = self.user_from.user_of(&found.metadata);
        let group = match &ownership.owner {
            super::Owner::User(_) => None,
            super::Owner::Group(name) => {
                // The group governing a claim lives in the claim's namespace, which is the
                // pod's (a pod mounts only its own namespace's claims).
                let namespace = ownership.namespace().unwrap_or(&pod.namespace);
                match caches.groups.get(&format!("{namespace}/{name}")) {
                    Some(cached) => cached,
                    None => Api::<StorageGroup>::namespaced(caches.client.clone(), namespace)
                        .get_opt(name)
                        .await
                        .map_err(|e| unknown(&format!("StorageGroup {namespace}/{name}"), e))?,
                }
            }
        };
        let members = group.as_ref().map(|g| g.spec.members.as_slice());
        let decision = decide(ownership, user, members);
        if let Decision::Denied(message) = &decision {
            self.tell(caches, &found, message);
        }
        Ok(decision)
    }

    /// Records a refusal as a Warning Event on the pod (in the background: the answer to
    /// kubelet does not wait for it).
    fn tell(&self, caches: &Caches, pod: &Pod, message: &str) {
        use kube::Resource;
        let recorder = caches.recorder.clone();
        let reference = pod.object_ref(&());
        let event = events::Event {
            type_: events::EventType::Warning,
            reason: "VolumeAccessDenied".into(),
            note: Some(message.to_owned()),
            action: "NodePublishVolume".into(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(error = %e, "could not record the refusal as a pod event");
            }
        });
    }
}
