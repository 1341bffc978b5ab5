//! Personal and group storage, end to end: the real plugin (controller and node, as root, real
//! bind mounts) against the Kubernetes API stand-in over HTTP. The owner comes from the PVC at
//! CreateVolume; at NodePublishVolume the node reads the pod's user label and the group's
//! StorageGroup and mounts read-write, read-only, or refuses — and fails closed when the API
//! is gone, without touching what is already mounted.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::kube::{KubeStandIn, Objects};
use common::{Plugin, assert_code, mounts_at, privileged, publish_request, stage_request};
use lanes::cli::csi::Clients;
use lanes::proto::*;
use serde_json::{Value, json};
use tonic::Code;

const PVCS: &str = "/api/v1/namespaces/vision/persistentvolumeclaims";
const PODS: &str = "/api/v1/namespaces/vision/pods";
const GROUPS: &str = "/apis/lanes.csi.dev/v1alpha1/namespaces/vision/storagegroups";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/vision/events";

fn pvc(name: &str, annotations: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": name, "namespace": "vision", "annotations": annotations},
           "spec": {"accessModes": ["ReadWriteOnce"]},
           "status": {"phase": "Bound", "capacity": {"storage": "1Mi"}}})
}

fn pod(name: &str, user: Option<&str>) -> Value {
    let labels = match user {
        Some(user) => json!({"lanes.csi.dev/user": user}),
        None => json!({"app": "notebook"}),
    };
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "vision", "uid": format!("uid-{name}"),
                        "labels": labels},
           "spec": {"nodeName": "test-node", "containers": [{"name": "c", "image": "i"}]}})
}

fn group(members: &[(&str, &str)]) -> Value {
    let members: Vec<Value> = members
        .iter()
        .map(|(user, level)| json!({"user": user, "level": level}))
        .collect();
    json!({"apiVersion": "lanes.csi.dev/v1alpha1", "kind": "StorageGroup",
           "metadata": {"name": "vision", "namespace": "vision"},
           "spec": {"members": members}})
}

/// The API as the test starts it: three claims (personal, group, unowned), pods for each user
/// and the group with a reader, a writer and an admin.
fn cluster() -> Objects {
    let objects = Objects::default();
    objects.put(
        PVCS,
        pvc("alice-home", json!({"lanes.csi.dev/owner": "alice"})),
    );
    objects.put(
        PVCS,
        pvc("datasets", json!({"lanes.csi.dev/group": "vision"})),
    );
    objects.put(PVCS, pvc("scratch", json!({})));
    objects.put(
        PVCS,
        pvc(
            "both",
            json!({"lanes.csi.dev/owner": "alice", "lanes.csi.dev/group": "vision"}),
        ),
    );
    for (name, user) in [
        ("alice", Some("alice")),
        ("bob", Some("bob")),
        ("carol", Some("carol")),
        ("dave", Some("dave")),
        ("nolabel", None),
    ] {
        objects.put(PODS, pod(name, user));
    }
    objects.put(
        GROUPS,
        group(&[("carol", "read"), ("dave", "write"), ("erin", "admin")]),
    );
    objects.empty(EVENTS);
    objects
}

/// Several pods of the node mount each volume at once (SINGLE_NODE_MULTI_WRITER).
fn shared() -> VolumeCapability {
    lanes::cli::csi::mount_capability(
        volume_capability::access_mode::Mode::SingleNodeMultiWriter,
        &[],
    )
}

async fn create(c: &mut Clients, claim: &str) -> Result<Volume, tonic::Status> {
    let mut request = common::create_request(&format!("pvc-{claim}"), 1 << 20);
    request.volume_capabilities = vec![shared()];
    for (key, value) in [
        ("csi.storage.k8s.io/pvc/name", claim),
        ("csi.storage.k8s.io/pvc/namespace", "vision"),
    ] {
        request.parameters.insert(key.into(), value.into());
    }
    let volume = c.controller.create_volume(request).await?.into_inner();
    Ok(volume.volume.unwrap())
}

/// A staged volume that pods publish.
struct Staged {
    volume: Volume,
    staging: std::path::PathBuf,
}

async fn stage(c: &mut Clients, plugin: &Plugin, claim: &str) -> Staged {
    let volume = create(c, claim).await.unwrap();
    let staging = plugin.dir(&format!("staging-{claim}"));
    let mut request = stage_request(&volume.volume_id, &staging);
    request.volume_context = volume.volume_context.clone();
    request.volume_capability = Some(shared());
    c.node.node_stage_volume(request).await.unwrap();
    Staged { volume, staging }
}

/// Publishes `staged` for pod `pod` at a fresh target, read-write as asked.
async fn publish(
    c: &mut Clients,
    plugin: &Plugin,
    staged: &Staged,
    pod: &str,
    target: &str,
) -> Result<std::path::PathBuf, tonic::Status> {
    let target = plugin.dir(&format!("pods/{pod}")).join(target);
    let mut request = publish_request(&staged.volume.volume_id, &staged.staging, &target, false);
    let mut context: HashMap<String, String> = staged.volume.volume_context.clone();
    context.extend([
        ("csi.storage.k8s.io/pod.name".into(), pod.into()),
        ("csi.storage.k8s.io/pod.namespace".into(), "vision".into()),
        ("csi.storage.k8s.io/pod.uid".into(), format!("uid-{pod}")),
        (
            "csi.storage.k8s.io/serviceAccount.name".into(),
            "default".into(),
        ),
    ]);
    request.volume_context = context;
    request.volume_capability = Some(shared());
    c.node.node_publish_volume(request).await?;
    Ok(target)
}

fn writable(target: &Path) -> std::io::Result<()> {
    std::fs::write(target.join("probe"), "written by the pod")
}

/// Waits until `check` holds (the node's caches follow the API by watch).
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn owners_readers_writers_and_strangers_get_what_their_level_allows() {
    if !privileged("owners_readers_writers_and_strangers") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let api = KubeStandIn::start(dir.path(), cluster()).await;
    let kubeconfig = api.kubeconfig.to_str().unwrap().to_owned();
    let plugin = Plugin::with_config_env("", None, &[("KUBECONFIG", &kubeconfig)]);
    let mut c = plugin.clients().await;

    // CreateVolume records the owner from the PVC, in the volume context; a repeat agrees.
    let home = create(&mut c, "alice-home").await.unwrap();
    assert_eq!(
        home.volume_context
            .get("lanes.csi.dev/owner")
            .map(String::as_str),
        Some("alice")
    );
    assert_eq!(
        home.volume_context
            .get("lanes.csi.dev/claim")
            .map(String::as_str),
        Some("vision/alice-home")
    );
    assert_eq!(create(&mut c, "alice-home").await.unwrap(), home);
    let refused = create(&mut c, "both").await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(
        refused.message().contains("vision/both") && refused.message().contains("not both"),
        "{}",
        refused.message()
    );
    let scratch = create(&mut c, "scratch").await.unwrap();
    assert!(
        scratch.volume_context.is_empty(),
        "an unowned volume: {scratch:?}"
    );

    let home = stage(&mut c, &plugin, "alice-home").await;
    let datasets = stage(&mut c, &plugin, "datasets").await;
    let scratch = stage(&mut c, &plugin, "scratch").await;

    // The owner gets read-write; a repeat of the same publish is still fine.
    let alice = publish(&mut c, &plugin, &home, "alice", "home")
        .await
        .unwrap();
    writable(&alice).unwrap();
    publish(&mut c, &plugin, &home, "alice", "home")
        .await
        .unwrap();
    assert_eq!(mounts_at(&alice).len(), 1);

    // Another user is refused, told why, and the pod gets a Warning event saying so.
    let bob = publish(&mut c, &plugin, &home, "bob", "home")
        .await
        .unwrap_err();
    assert_eq!(bob.code(), Code::PermissionDenied);
    assert_eq!(
        bob.message(),
        "user bob has no access to personal storage of alice (PVC vision/alice-home): only its \
         owner may mount it"
    );
    assert!(mounts_at(&plugin.dir("pods/bob").join("home")).is_empty());
    let event_about_bob = || -> bool {
        api.objects.get_all(EVENTS).iter().any(|e| {
            e["regarding"]["name"] == "bob"
                && e["type"] == "Warning"
                && e["reason"] == "VolumeAccessDenied"
                && e["note"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("user bob has no access")
        })
    };
    eventually("the refusal event on pod bob", event_about_bob).await;

    // A pod that names no user is refused on an owned volume.
    let nolabel = publish(&mut c, &plugin, &home, "nolabel", "home")
        .await
        .unwrap_err();
    assert_eq!(nolabel.code(), Code::PermissionDenied);
    assert!(
        nolabel.message().contains("lanes.csi.dev/user"),
        "{}",
        nolabel.message()
    );

    // Group storage: a reader gets a read-only mount although the pod asked read-write.
    let carol = publish(&mut c, &plugin, &datasets, "carol", "data")
        .await
        .unwrap();
    let mount = mounts_at(&carol);
    assert_eq!(mount.len(), 1);
    assert!(mount[0].read_only(), "a reader's mount is read-only");
    let denied = writable(&carol).unwrap_err();
    assert_eq!(denied.raw_os_error(), Some(nix::libc::EROFS), "{denied}");
    // A writer gets read-write, a non-member nothing.
    let dave = publish(&mut c, &plugin, &datasets, "dave", "data")
        .await
        .unwrap();
    writable(&dave).unwrap();
    assert_eq!(
        std::fs::read_to_string(carol.join("probe")).unwrap(),
        "written by the pod",
        "the reader sees the writer's data"
    );
    let stranger = publish(&mut c, &plugin, &datasets, "bob", "data")
        .await
        .unwrap_err();
    assert_eq!(stranger.code(), Code::PermissionDenied);
    assert_eq!(
        stranger.message(),
        "user bob has no access to group storage vision (PVC vision/datasets); ask a group admin"
    );
    // Unowned volumes behave as before: any pod, as asked.
    let anyone = publish(&mut c, &plugin, &scratch, "nolabel", "scratch")
        .await
        .unwrap();
    writable(&anyone).unwrap();

    // Revoking takes effect at the next mount; the mount already made stays.
    api.objects
        .put(GROUPS, group(&[("carol", "read"), ("erin", "admin")]));
    let deadline = Instant::now() + Duration::from_secs(10);
    let revoked = loop {
        match publish(&mut c, &plugin, &datasets, "dave", "again").await {
            Err(status) => break status,
            Ok(target) => {
                c.node
                    .node_unpublish_volume(common::unpublish_request(
                        &datasets.volume.volume_id,
                        &target,
                    ))
                    .await
                    .unwrap();
                assert!(
                    Instant::now() < deadline,
                    "the revocation never took effect"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(
        revoked.code(),
        Code::PermissionDenied,
        "{}",
        revoked.message()
    );
    assert!(revoked.message().contains("user dave has no access"));
    writable(&dave).unwrap();

    // The API goes away: no new decision is made on a guess (UNAVAILABLE, saying why), the
    // pods already running keep their mounts, and unowned volumes are not held up.
    api.objects.set_down(true);
    let started = Instant::now();
    let unknown = loop {
        // Until the node sees its watches fail, it decides from what they last said.
        match publish(&mut c, &plugin, &datasets, "carol", "while-down").await {
            Err(status) => break status,
            Ok(target) => {
                c.node
                    .node_unpublish_volume(common::unpublish_request(
                        &datasets.volume.volume_id,
                        &target,
                    ))
                    .await
                    .unwrap();
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the API's absence went unnoticed"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(unknown.code(), Code::Unavailable, "{}", unknown.message());
    let message = unknown.message();
    assert!(
        message.contains("cannot decide access to group storage vision") && message.contains("503"),
        "{message}"
    );
    let unknown = publish(&mut c, &plugin, &home, "alice", "while-down").await;
    assert_code(
        unknown,
        Code::Unavailable,
        "owner's publish while the API is down",
    );
    writable(&alice).unwrap();
    writable(&dave).unwrap();
    let unowned = publish(&mut c, &plugin, &scratch, "bob", "while-down")
        .await
        .unwrap();
    writable(&unowned).unwrap();
    c.node
        .node_unpublish_volume(common::unpublish_request(&home.volume.volume_id, &alice))
        .await
        .unwrap();
    assert!(mounts_at(&alice).is_empty());

    // Back: decisions resume.
    api.objects.set_down(false);
    let again = publish(&mut c, &plugin, &home, "alice", "after")
        .await
        .unwrap();
    writable(&again).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn admins_grant_and_revoke_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let api = KubeStandIn::start(dir.path(), cluster()).await;
    let lanes = |args: &[&str]| {
        let kubeconfig = api.kubeconfig.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        async move {
            let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
                .args(&args)
                .env("KUBECONFIG", kubeconfig)
                .output()
                .await
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let members = || -> Vec<(String, String)> {
        let group = api.objects.get(GROUPS, "vision").unwrap();
        group["spec"]["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["user"].as_str().unwrap().to_owned(),
                    m["level"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let pair = |u: &str, l: &str| (u.to_owned(), l.to_owned());

    let (ok, out, err) =
        lanes(&["storage", "-n", "vision", "grant", "vision", "bob", "write"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "vision: bob: write");
    let (ok, out, _) = lanes(&[
        "storage", "-n", "vision", "grant", "vision", "carol", "admin",
    ])
    .await;
    assert!(ok);
    assert_eq!(out.trim(), "vision: carol: admin (was read)");
    assert_eq!(
        members(),
        [
            pair("carol", "admin"),
            pair("dave", "write"),
            pair("erin", "admin"),
            pair("bob", "write")
        ]
    );
    // Bad input changes nothing.
    let before = members();
    let (ok, _, err) = lanes(&["storage", "-n", "vision", "grant", "vision", "bob", "owner"]).await;
    assert!(!ok && err.contains("\"owner\" is not a level"), "{err}");
    let csv = dir.path().join("members.csv");
    std::fs::write(&csv, "user,level\nfrank,read\n# a comment\ngrace,sudo\n").unwrap();
    let (ok, _, err) = lanes(&[
        "storage",
        "-n",
        "vision",
        "grant",
        "vision",
        "--from",
        csv.to_str().unwrap(),
    ])
    .await;
    assert!(!ok && err.contains("members.csv line 4"), "{err}");
    assert_eq!(members(), before);
    // In bulk from a file, into a group that does not exist yet.
    std::fs::write(&csv, "user,level\nfrank,read\n\ngrace,admin\n").unwrap();
    let (ok, out, err) = lanes(&[
        "storage",
        "-n",
        "vision",
        "grant",
        "audio",
        "--from",
        csv.to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "audio: frank: read\naudio: grace: admin\n");
    let audio = api.objects.get(GROUPS, "audio").unwrap();
    assert_eq!(audio["spec"]["members"].as_array().unwrap().len(), 2);
    // Revoking the last admin is refused unless forced.
    let (ok, _, err) = lanes(&["storage", "-n", "vision", "revoke", "audio", "grace"]).await;
    assert!(!ok && err.contains("no admin"), "{err}");
    let (ok, out, _) = lanes(&["storage", "-n", "vision", "revoke", "vision", "dave"]).await;
    assert!(ok);
    assert_eq!(out.trim(), "vision: dave: revoked");
    assert!(!members().iter().any(|(u, _)| u == "dave"));

    // Who may do what, for everyone or for one user.
    let (ok, out, err) = lanes(&["storage", "-n", "vision", "ls", "--json"]).await;
    assert!(ok, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    let claims: Vec<&str> = rows.iter().map(|r| r["claim"].as_str().unwrap()).collect();
    assert!(claims.contains(&"vision/alice-home") && claims.contains(&"vision/datasets"));
    assert!(
        !claims.contains(&"vision/scratch"),
        "unowned claims are not listed"
    );
    let datasets = rows
        .iter()
        .find(|r| r["claim"] == "vision/datasets")
        .unwrap();
    assert_eq!(datasets["access"]["bob"], "write");
    assert_eq!(datasets["capacity"], "1Mi");
    let (ok, out, _) = lanes(&["storage", "-n", "vision", "ls", "--user", "alice"]).await;
    assert!(ok);
    assert!(
        out.contains("vision/alice-home") && out.contains("alice=owner"),
        "{out}"
    );
    assert!(!out.contains("vision/datasets"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_lets_each_groups_admins_manage_that_group_only() {
    const ROLES: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/vision/roles";
    const BINDINGS: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/vision/rolebindings";
    const NAME: &str = "lanes-storagegroup-vision-admin";
    let dir = tempfile::tempdir().unwrap();
    let api = KubeStandIn::start(dir.path(), cluster()).await;
    let _operator = tokio::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
        .arg("operator")
        .env("KUBECONFIG", &api.kubeconfig)
        .env("LANES_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let admins = || -> Option<Vec<String>> {
        let binding = api.objects.get(BINDINGS, NAME)?;
        Some(
            binding["subjects"]
                .as_array()?
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect(),
        )
    };
    eventually("the admins' RoleBinding", || admins().is_some()).await;
    assert_eq!(admins().unwrap(), ["erin"]);
    let role = api.objects.get(ROLES, NAME).unwrap();
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": ["lanes.csi.dev"], "resources": ["storagegroups"],
                "resourceNames": ["vision"], "verbs": ["get", "update", "patch"]}])
    );
    let binding = api.objects.get(BINDINGS, NAME).unwrap();
    assert_eq!(binding["roleRef"]["name"], NAME);
    assert_eq!(
        binding["metadata"]["ownerReferences"][0]["kind"],
        "StorageGroup"
    );
    // A new admin is bound, a demoted one is not.
    api.objects
        .put(GROUPS, group(&[("carol", "admin"), ("erin", "write")]));
    eventually("the new admin bound", || {
        admins().is_some_and(|a| a == ["carol"])
    })
    .await;
}

/// The benchmark behind bench/access.sh (not a timed test: it reports, it does not judge):
/// NodePublishVolume latency on an owned volume (permission checks on, caches warm) against
/// an unowned one (no checks), alternating rounds in the same run.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run bench/access.sh"]
async fn publish_latency_with_and_without_permission_checks() {
    if !privileged("publish_latency") {
        return;
    }
    let rounds: usize = std::env::var("LANES_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let per_round: usize = std::env::var("LANES_BENCH_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().unwrap();
    let api = KubeStandIn::start(dir.path(), cluster()).await;
    let kubeconfig = api.kubeconfig.to_str().unwrap().to_owned();
    let plugin = Plugin::with_config_env("", None, &[("KUBECONFIG", &kubeconfig)]);
    let mut c = plugin.clients().await;
    let owned = stage(&mut c, &plugin, "alice-home").await;
    let unowned = stage(&mut c, &plugin, "scratch").await;
    // Warm: the first owned publish starts the watches.
    let warm = publish(&mut c, &plugin, &owned, "alice", "warm")
        .await
        .unwrap();
    c.node
        .node_unpublish_volume(common::unpublish_request(&owned.volume.volume_id, &warm))
        .await
        .unwrap();
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds {
        for (which, staged) in [(0, &unowned), (1, &owned)] {
            for i in 0..per_round {
                let name = format!("t{round}-{i}");
                let started = Instant::now();
                let target = publish(&mut c, &plugin, staged, "alice", &name)
                    .await
                    .unwrap();
                times[which].push(started.elapsed());
                c.node
                    .node_unpublish_volume(common::unpublish_request(
                        &staged.volume.volume_id,
                        &target,
                    ))
                    .await
                    .unwrap();
            }
        }
    }
    let quantile = |times: &mut Vec<Duration>, q: f64| {
        times.sort();
        times[((times.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1000.0
    };
    let [mut off, mut on] = times;
    let (off50, on50) = (quantile(&mut off, 0.5), quantile(&mut on, 0.5));
    println!(
        "NodePublishVolume, {} calls each: unowned (no checks) p50 {off50:.3} ms p99 {:.3} ms; \
         owned (checks, warm) p50 {on50:.3} ms p99 {:.3} ms; ratio p50 {:.3}",
        rounds * per_round,
        quantile(&mut off, 0.99),
        quantile(&mut on, 0.99),
        on50 / off50
    );
}
