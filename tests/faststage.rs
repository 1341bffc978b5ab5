//! FastStage end to end: the real `lanes operator` against the Kubernetes API stand-in over
//! HTTP. The test plays the Job controller and the provisioner: when a copy Job appears it
//! runs the Job's own `lanes copy` command line (the real binary, reporting progress to the
//! stand-in) over real directories standing for the Job's claims, then writes the Job's
//! status as the Job controller would.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::kube::{KubeStandIn, Objects};
use serde_json::{Value, json};

const NS: &str = "vision";

fn pvcs(ns: &str) -> String {
    format!("/api/v1/namespaces/{ns}/persistentvolumeclaims")
}
fn jobs(ns: &str) -> String {
    format!("/apis/batch/v1/namespaces/{ns}/jobs")
}
fn stages(ns: &str) -> String {
    format!("/apis/lanes.csi.dev/v1alpha1/namespaces/{ns}/faststages")
}
const PVS: &str = "/api/v1/persistentvolumes";
const SOURCE_HANDLE: &str = "shared-rwx/jfs/pvc-imagenet";

fn pvc(name: &str, modes: &[&str], phase: &str, capacity: &str, volume: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
           "metadata": {"name": name, "namespace": NS},
           "spec": {"accessModes": modes, "volumeName": volume},
           "status": {"phase": phase, "capacity": {"storage": capacity}}})
}

/// A tree of `files` files (a few KiB each) in nested directories.
fn tree(root: &Path, files: usize) -> u64 {
    let mut bytes = 0;
    for i in 0..files {
        let dir = root.join(format!("d{}/e{}", i % 7, i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        let body = format!("file {i} ").repeat(100 + i % 50);
        bytes += body.len() as u64;
        std::fs::write(dir.join(format!("f{i}.txt")), body).unwrap();
    }
    bytes
}

/// Every file under `root` with its contents, by relative path.
fn contents(root: &Path) -> HashMap<PathBuf, Vec<u8>> {
    let mut found = HashMap::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_owned();
                found.insert(relative, std::fs::read(&path).unwrap());
            }
        }
    }
    found
}

/// The API, the directories standing for claims, and the Job controller.
struct World {
    api: KubeStandIn,
    dir: tempfile::TempDir,
    source: PathBuf,
    source_bytes: u64,
    config: PathBuf,
    /// `namespace/claim` → the directory the claim's volume is.
    claims: Arc<Mutex<HashMap<String, PathBuf>>>,
    /// While set, Jobs are seen but not run (a copy "in flight").
    hold: Arc<AtomicBool>,
}

async fn world() -> World {
    world_with(|source| tree(source, 300)).await
}

/// A world whose source volume `fill` makes (returning its bytes).
async fn world_with(fill: impl FnOnce(&Path) -> u64) -> World {
    let dir = tempfile::Builder::new()
        .prefix("lanes-faststage-")
        .tempdir_in(std::env::var("LANES_BENCH_DIR").unwrap_or_else(|_| "/tmp".into()))
        .unwrap();
    let objects = Objects::default();
    for ns in [NS, "project", "lanes-system", "closed"] {
        // `project` accepts FastStages from `vision`; `closed` from nobody.
        let annotations = if ns == "project" {
            json!({"lanes.csi.dev/accept-faststages-from": "other, vision"})
        } else {
            json!({})
        };
        objects.put(
            "/api/v1/namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace",
                   "metadata": {"name": ns, "annotations": annotations}}),
        );
    }
    objects.put(
        "/apis/storage.k8s.io/v1/storageclasses",
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "lanes-fast"}, "provisioner": "local.lanes.csi.dev"}),
    );
    objects.put(
        &pvcs(NS),
        pvc(
            "imagenet",
            &["ReadWriteMany"],
            "Bound",
            "1Gi",
            "pv-imagenet",
        ),
    );
    objects.put(
        PVS,
        json!({"apiVersion": "v1", "kind": "PersistentVolume",
               "metadata": {"name": "pv-imagenet"},
               "spec": {"accessModes": ["ReadWriteMany"], "capacity": {"storage": "1Gi"},
                        "csi": {"driver": "lanes.csi.dev", "volumeHandle": SOURCE_HANDLE}}}),
    );
    for ns in [NS, "project"] {
        objects.empty(&jobs(ns));
        objects.empty(&pvcs(ns));
    }
    objects.empty(&stages(NS));
    let api = KubeStandIn::start(dir.path(), objects).await;
    let source = dir.path().join("volumes/imagenet");
    std::fs::create_dir_all(&source).unwrap();
    let source_bytes = fill(&source);
    let config = dir.path().join("lanes.yaml");
    std::fs::write(
        &config,
        "profiles:\n  fast:\n    lane: fast-rwo\n    default: true\n  shared:\n    lane: local\n",
    )
    .unwrap();
    let claims = Arc::new(Mutex::new(HashMap::from([(
        format!("{NS}/imagenet"),
        source.clone(),
    )])));
    let world = World {
        api,
        dir,
        source,
        source_bytes,
        config,
        claims,
        hold: Arc::default(),
    };
    world.run_jobs();
    world
}

impl World {
    /// Starts a `lanes operator` replica.
    fn operator(&self, identity: &str) -> tokio::process::Child {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
            .args(["operator", "--image", "lanes:test", "--identity", identity])
            .args([
                "--lease-namespace",
                "lanes-system",
                "--lease-seconds",
                "2",
                "--config",
            ])
            .arg(&self.config)
            .env("KUBECONFIG", &self.api.kubeconfig)
            .env("LANES_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// The Job controller: runs each new Job's command over the claims' directories.
    fn run_jobs(&self) {
        let objects = self.api.objects.clone();
        let claims = self.claims.clone();
        let hold = self.hold.clone();
        let kubeconfig = self.api.kubeconfig.clone();
        let volumes = self.dir.path().join("volumes");
        tokio::spawn(async move {
            let mut done = HashSet::new();
            loop {
                tokio::time::sleep(Duration::from_millis(30)).await;
                if hold.load(Ordering::Relaxed) {
                    continue;
                }
                for ns in [NS, "project"] {
                    for job in objects.get_all(&jobs(ns)) {
                        let key = format!("{ns}/{}", job["metadata"]["uid"]);
                        if !done.insert(key) {
                            continue;
                        }
                        let status =
                            run_job(&objects, &claims, &volumes, &kubeconfig, ns, &job).await;
                        let mut job = objects
                            .get(&jobs(ns), job["metadata"]["name"].as_str().unwrap())
                            .unwrap();
                        job["status"] = status;
                        objects.put(&jobs(ns), job);
                    }
                }
            }
        });
    }

    fn stage(&self, name: &str, spec: Value) {
        self.api.objects.put(
            &stages(NS),
            json!({"apiVersion": "lanes.csi.dev/v1alpha1", "kind": "FastStage",
                   "metadata": {"name": name, "namespace": NS}, "spec": spec}),
        );
    }

    fn status(&self, name: &str) -> Value {
        self.api
            .objects
            .get(&stages(NS), name)
            .map(|s| s["status"].clone())
            .unwrap_or(Value::Null)
    }

    async fn phase(&self, name: &str, phase: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let status = self.status(name);
            if status["phase"] == phase {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: no phase {phase} within 20 s; status: {status}"
            );
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    fn dir_of(&self, ns: &str, claim: &str) -> PathBuf {
        self.claims.lock().unwrap()[&format!("{ns}/{claim}")].clone()
    }

    fn names(&self, collection: &str) -> Vec<String> {
        self.api
            .objects
            .get_all(collection)
            .iter()
            .map(|o| o["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    }
}

/// Runs one Job the way its pod would and answers the Job's status.
async fn run_job(
    objects: &Objects,
    claims: &Mutex<HashMap<String, PathBuf>>,
    volumes: &Path,
    kubeconfig: &Path,
    ns: &str,
    job: &Value,
) -> Value {
    let pod = &job["spec"]["template"]["spec"];
    let mut mounts = HashMap::new();
    for volume in pod["volumes"].as_array().unwrap() {
        let claim = volume["persistentVolumeClaim"]["claimName"]
            .as_str()
            .unwrap();
        let key = format!("{ns}/{claim}");
        let mut claims = claims.lock().unwrap();
        let dir = match claims.get(&key) {
            Some(dir) => dir.clone(),
            None => {
                // A claim the test did not make: a view of a PV (same directory as its
                // volume), or a new volume (an empty directory, as a provisioner makes).
                let pvc = objects
                    .get(&pvcs(ns), claim)
                    .expect("the Job's claim exists");
                let handle = pvc["spec"]["volumeName"]
                    .as_str()
                    .and_then(|pv| objects.get(PVS, pv))
                    .map(|pv| pv["spec"]["csi"]["volumeHandle"].clone());
                let dir = match handle {
                    Some(h) if h == SOURCE_HANDLE => claims[&format!("{NS}/imagenet")].clone(),
                    _ => volumes.join(format!("{ns}-{claim}")),
                };
                std::fs::create_dir_all(&dir).unwrap();
                claims.insert(key, dir.clone());
                dir
            }
        };
        mounts.insert(format!("/{}", volume["name"].as_str().unwrap()), dir);
    }
    let args: Vec<String> = pod["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
            mounts
                .get(a)
                .map_or(a.to_owned(), |d| d.display().to_string())
        })
        .collect();
    // The sha256 copies keep reporting for two seconds after copying, so that a report made
    // while the copy process runs is seen even for a tree copied in milliseconds.
    let failpoint = if args.iter().any(|a| a == "sha256") {
        "delay:copy.report"
    } else {
        ""
    };
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
        .args(&args)
        .env("KUBECONFIG", kubeconfig)
        .env("LANES_FAILPOINT", failpoint)
        .output()
        .await
        .unwrap();
    if out.status.success() {
        json!({"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]})
    } else {
        json!({"failed": 1, "conditions": [{"type": "Failed", "status": "True",
               "reason": "BackoffLimitExceeded",
               "message": String::from_utf8_lossy(&out.stderr)}]})
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stages_with_each_checksum_mode_and_syncs_back() {
    let world = world().await;
    let _operator = world.operator("op-a");
    let want = contents(&world.source);
    for mode in ["size-mtime", "sha256", "none"] {
        let name = format!("stage-{mode}");
        world.stage(
            &name,
            json!({"source": "imagenet", "checksum": mode,
                                  "fastPvcName": format!("fast-{mode}")}),
        );
        let status = world.phase(&name, "Succeeded").await;
        assert_eq!(status["checksum"], mode, "{status}");
        assert_eq!(status["filesTotal"], 300, "{status}");
        assert_eq!(status["filesDone"], 300, "{status}");
        assert_eq!(status["bytesTotal"], world.source_bytes, "{status}");
        assert_eq!(status["fastPvc"], format!("fast-{mode}"));
        let verification = status["verification"].as_str().unwrap();
        match mode {
            "sha256" => {
                assert!(verification.starts_with("passed") && verification.contains("SHA-256"))
            }
            "none" => assert!(verification.starts_with("not asked")),
            _ => assert!(verification.starts_with("passed")),
        }
        // The copy reported while it ran (rate, ETA), before the operator saw the Job end.
        if mode == "sha256" {
            let history = world.api.objects.history(&stages(NS), &name);
            let live = history.iter().position(|s| {
                s["status"]["phase"] == "Copying"
                    && s["status"]["filesTotal"] == 300
                    && s["status"]["bytesPerSecond"].as_u64() > Some(0)
                    && s["status"]["etaSeconds"].is_u64()
            });
            let ended = history
                .iter()
                .position(|s| s["status"]["phase"] == "Succeeded");
            assert!(
                live.is_some() && live < ended,
                "no live progress: {history:?}"
            );
        }
        assert_eq!(status["conditions"][0]["type"], "Ready");
        assert_eq!(status["conditions"][0]["status"], "True");
        assert_eq!(
            contents(&world.dir_of(NS, &format!("fast-{mode}"))),
            want,
            "{mode}"
        );
        // The fast PVC asked for: node-local profile's class, at least the source's size.
        let fast = world
            .api
            .objects
            .get(&pvcs(NS), &format!("fast-{mode}"))
            .unwrap();
        assert_eq!(fast["spec"]["storageClassName"], "lanes-fast");
        assert_eq!(
            fast["spec"]["resources"]["requests"]["storage"],
            (1u64 << 30).to_string()
        );
    }
    assert_eq!(world.names(&jobs(NS)).len(), 3, "one Job per FastStage");
    // Events tell the story.
    let reasons: Vec<String> = world
        .api
        .objects
        .get_all(&format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"))
        .iter()
        .filter(|e| e["regarding"]["name"] == "stage-sha256")
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    for reason in ["Provisioning", "Copying", "Copied"] {
        assert!(reasons.iter().any(|r| r == reason), "{reasons:?}");
    }

    // Results go back with each mode, without deleting at the source unless asked.
    for mode in ["size-mtime", "sha256", "none"] {
        let fast = world.dir_of(NS, &format!("fast-{mode}"));
        std::fs::write(fast.join(format!("results-{mode}.txt")), mode).unwrap();
        std::fs::remove_file(fast.join("d0/e0/f0.txt")).unwrap();
        let name = format!("back-{mode}");
        world.stage(
            &name,
            json!({"source": "imagenet", "direction": "syncBack",
                   "fastPvcName": format!("fast-{mode}"), "checksum": mode}),
        );
        let status = world.phase(&name, "Succeeded").await;
        assert_eq!(status["checksum"], mode);
        let back = std::fs::read_to_string(world.source.join(format!("results-{mode}.txt")));
        assert_eq!(back.unwrap(), mode);
        assert!(
            world.source.join("d0/e0/f0.txt").exists(),
            "nothing deleted at the source"
        );
    }
    // Asked to delete at the source: what the fast PVC lacks goes.
    world.stage(
        "back-delete",
        json!({"source": "imagenet", "direction": "syncBack", "fastPvcName": "fast-none",
               "deleteAtSource": true}),
    );
    world.phase("back-delete", "Succeeded").await;
    assert!(!world.source.join("d0/e0/f0.txt").exists());
    assert!(!world.source.join("results-sha256.txt").exists());
    assert!(world.source.join("results-none.txt").exists());
    // No syncBack made a PVC of its own.
    assert_eq!(
        world.names(&pvcs(NS)).len(),
        4,
        "the source and three fast PVCs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_a_clear_status_and_nothing_is_made() {
    let world = world().await;
    let objects = &world.api.objects;
    objects.put(
        &pvcs(NS),
        pvc("pending", &["ReadWriteMany"], "Pending", "1Gi", ""),
    );
    objects.put(
        &pvcs(NS),
        pvc("single", &["ReadWriteOnce"], "Bound", "1Gi", "pv-x"),
    );
    objects.put(
        &pvcs(NS),
        pvc("someones", &["ReadWriteOnce"], "Bound", "1Gi", "pv-y"),
    );
    objects.put(
        &pvcs(NS),
        pvc(
            "elsewhere",
            &["ReadWriteMany"],
            "Bound",
            "1Gi",
            "pv-nfs-other",
        ),
    );
    objects.put(
        PVS,
        json!({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": "pv-nfs-other"},
               "spec": {"csi": {"driver": "nfs.csi.k8s.io", "volumeHandle": "server#export"}}}),
    );
    let _operator = world.operator("op-a");
    let cases = [
        (
            "missing",
            json!({"source": "nope"}),
            "SourceMissing",
            "source PVC vision/nope does not exist",
        ),
        (
            "unbound",
            json!({"source": "pending"}),
            "SourceNotBound",
            "is Pending, not Bound",
        ),
        (
            "rwo",
            json!({"source": "single"}),
            "SourceNotRWX",
            "is not ReadWriteMany",
        ),
        (
            "small",
            json!({"source": "imagenet", "fastCapacity": "512Mi"}),
            "CapacityTooSmall",
            "fastCapacity 512.0 MiB is smaller than the source's 1.0 GiB",
        ),
        (
            "taken",
            json!({"source": "imagenet", "fastPvcName": "someones"}),
            "NameTaken",
            "PVC vision/someones exists and was not made by this FastStage",
        ),
        (
            "closed",
            json!({"source": "imagenet", "targetNamespace": "closed"}),
            "TargetNamespaceClosed",
            "namespace closed does not accept FastStages from vision",
        ),
        (
            "foreign-back",
            json!({"source": "imagenet", "direction": "syncBack", "fastPvcName": "someones"}),
            "NotAFastPVC",
            "PVC vision/someones was not made by a FastStage of namespace vision",
        ),
        (
            "nowhere",
            json!({"source": "imagenet", "targetNamespace": "ghost"}),
            "TargetNamespaceMissing",
            "target namespace ghost does not exist",
        ),
        (
            "noprofile",
            json!({"source": "imagenet", "profile": "warp"}),
            "ProfileUnavailable",
            "profile warp is not configured",
        ),
        (
            "shared",
            json!({"source": "imagenet", "profile": "shared"}),
            "ProfileUnavailable",
            "StorageClass lanes-shared does not exist",
        ),
        (
            "foreign",
            json!({"source": "elsewhere", "targetNamespace": "project"}),
            "CrossNamespaceUnsupported",
            "is not on a Lanes shared-rwx or legacy-rwx volume",
        ),
    ];
    let claims_before = world.names(&pvcs(NS));
    for (name, spec, reason, message) in &cases {
        world.stage(name, spec.clone());
        let status = world.phase(name, "Failed").await;
        assert_eq!(
            status["conditions"][0]["reason"], *reason,
            "{name}: {status}"
        );
        let said = status["message"].as_str().unwrap();
        assert!(said.contains(message), "{name}: {said}");
    }
    assert!(world.names(&jobs(NS)).is_empty() && world.names(&jobs("project")).is_empty());
    assert_eq!(world.names(&pvcs(NS)), claims_before, "no PVC made");
    assert!(world.names(&pvcs("project")).is_empty());
    assert_eq!(world.names(PVS).len(), 2, "no PV made");
    // A refusal the world can lift is looked at again: bind the claim and it proceeds.
    world.api.objects.put(
        &pvcs(NS),
        pvc("pending", &["ReadWriteMany"], "Bound", "1Gi", "pv-imagenet"),
    );
    world
        .claims
        .lock()
        .unwrap()
        .insert(format!("{NS}/pending"), world.source.clone());
    let deadline = Instant::now() + Duration::from_secs(45);
    while world.status("unbound")["phase"] != "Succeeded" {
        assert!(Instant::now() < deadline, "{}", world.status("unbound"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn across_namespaces_through_a_read_only_view_cleaned_up_on_delete() {
    let world = world().await;
    let _operator = world.operator("op-a");
    world.hold.store(true, Ordering::Relaxed);
    world.stage(
        "to-project",
        json!({"source": "imagenet", "targetNamespace": "project"}),
    );
    world.phase("to-project", "Copying").await;
    let view = world
        .api
        .objects
        .get(&pvcs("project"), "fast-imagenet-source")
        .expect("the source's view in the target namespace");
    assert_eq!(view["spec"]["accessModes"], json!(["ReadOnlyMany"]));
    let pv_name = view["spec"]["volumeName"].as_str().unwrap().to_owned();
    let pv = world.api.objects.get(PVS, &pv_name).unwrap();
    assert_eq!(pv["spec"]["csi"]["volumeHandle"], SOURCE_HANDLE);
    assert_eq!(pv["spec"]["csi"]["readOnly"], true);
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Retain");
    assert_eq!(pv["spec"]["claimRef"]["namespace"], "project");
    let job = world
        .api
        .objects
        .get(&jobs("project"), "lanes-copy-to-project")
        .unwrap();
    let volumes = &job["spec"]["template"]["spec"]["volumes"];
    assert_eq!(
        volumes[0]["persistentVolumeClaim"]["claimName"],
        "fast-imagenet-source"
    );
    assert_eq!(volumes[0]["persistentVolumeClaim"]["readOnly"], true);

    // An operator killed mid-copy and started again makes no second Job; the copy finishes.
    drop(_operator);
    let _operator = world.operator("op-b");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(world.names(&jobs("project")), ["lanes-copy-to-project"]);
    world.hold.store(false, Ordering::Relaxed);
    world.phase("to-project", "Succeeded").await;
    assert_eq!(
        contents(&world.dir_of("project", "fast-imagenet")),
        contents(&world.source)
    );

    // Deleted mid-copy: the finalizer removes the Job, both claims, the view PV and the
    // reporter's identity — and never the source, nor what another FastStage made.
    world.hold.store(true, Ordering::Relaxed);
    world.stage(
        "mid",
        json!({"source": "imagenet", "targetNamespace": "project", "fastPvcName": "fast-mid"}),
    );
    world.phase("mid", "Copying").await;
    let made = |names: Vec<String>| names.into_iter().filter(|n| n.contains("mid")).count();
    assert_eq!(made(world.names(&jobs("project"))), 1);
    assert_eq!(
        made(world.names(&pvcs("project"))),
        2,
        "fast-mid and its source view"
    );
    assert_eq!(world.names(PVS).len(), 3, "the source, and one view each");
    let api: kube::Api<kube::api::DynamicObject> = kube::Api::namespaced_with(
        world.api.client(),
        NS,
        &kube::api::ApiResource {
            group: "lanes.csi.dev".into(),
            version: "v1alpha1".into(),
            api_version: "lanes.csi.dev/v1alpha1".into(),
            kind: "FastStage".into(),
            plural: "faststages".into(),
        },
    );
    api.delete("mid", &Default::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while world.api.objects.get(&stages(NS), "mid").is_some() {
        assert!(
            Instant::now() < deadline,
            "the FastStage was never released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(world.names(&jobs("project")), ["lanes-copy-to-project"]);
    let mut claims = world.names(&pvcs("project"));
    claims.sort();
    assert_eq!(claims, ["fast-imagenet", "fast-imagenet-source"]);
    assert_eq!(
        world.names(PVS).len(),
        2,
        "the source and to-project's view"
    );
    assert_eq!(
        world.names("/api/v1/namespaces/project/serviceaccounts"),
        ["lanes-report-to-project"]
    );
    assert_eq!(contents(&world.source).len(), 300);
}

#[tokio::test(flavor = "multi_thread")]
async fn of_two_replicas_only_the_leader_acts() {
    let world = world().await;
    let _a = world.operator("op-a");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _b = world.operator("op-b");
    world.stage("once", json!({"source": "imagenet"}));
    world.phase("once", "Succeeded").await;
    let lease = world
        .api
        .objects
        .get(
            "/apis/coordination.k8s.io/v1/namespaces/lanes-system/leases",
            "lanes-operator",
        )
        .unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "op-a");
    let instances: HashSet<String> = world
        .api
        .objects
        .get_all(&format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"))
        .iter()
        .map(|e| {
            e["reportingInstance"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(instances, HashSet::from(["op-a".to_owned()]));
    assert_eq!(world.names(&jobs(NS)), ["lanes-copy-once"]);
}

/// The benchmark behind bench/faststage.sh (it reports, it does not judge): the time from a
/// FastStage's creation to Succeeded against a bare `lanes copy` of the same tree, alternating,
/// and the operator's resident memory idle and with 50 FastStages copying.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run bench/faststage.sh"]
async fn faststage_overhead_and_operator_memory() {
    let files: usize = std::env::var("LANES_BENCH_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let runs: usize = std::env::var("LANES_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let size = (1usize << 30) / files;
    let world = world_with(|source| {
        let body: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        for i in 0..files {
            let dir = source.join(format!("shard{:02}/{:03}", i % 16, i % 250));
            std::fs::create_dir_all(&dir).unwrap();
            let mut body = body.clone();
            body[..8].copy_from_slice(&(i as u64).to_le_bytes());
            std::fs::write(dir.join(format!("sample{i}.bin")), body).unwrap();
        }
        (files * size) as u64
    })
    .await;
    let mut operator = world.operator("op-bench");
    let pid = operator.id().unwrap();
    let rss = || lanes::cli::bench::rss_kib(pid).unwrap_or(0) as f64 / 1024.0;
    let volumes = world.dir.path().join("volumes");
    let (mut bare, mut staged) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let dst = volumes.join(format!("bare-{run}"));
        // Each timed copy starts with no dirty pages left by the one before.
        let settle = || {
            assert!(
                std::process::Command::new("sync")
                    .status()
                    .unwrap()
                    .success()
            )
        };
        settle();
        let started = Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
            .args(["copy", "--json", "--checksum", "size-mtime"])
            .arg(&world.source)
            .arg(&dst)
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        bare.push(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(&dst).unwrap();

        let name = format!("bench-{run}");
        settle();
        let started = Instant::now();
        world.stage(
            &name,
            json!({"source": "imagenet", "fastPvcName": format!("fast-{name}")}),
        );
        let deadline = Instant::now() + Duration::from_secs(600);
        while world.status(&name)["phase"] != "Succeeded" {
            assert!(Instant::now() < deadline, "{}", world.status(&name));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        staged.push(started.elapsed().as_secs_f64());
        std::fs::remove_dir_all(world.dir_of(NS, &format!("fast-{name}"))).unwrap();
    }
    let idle = rss();
    world.hold.store(true, Ordering::Relaxed);
    for i in 0..50 {
        world.stage(
            &format!("many-{i}"),
            json!({"source": "imagenet", "fastPvcName": format!("fast-many-{i}")}),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while (0..50).any(|i| world.status(&format!("many-{i}"))["phase"] != "Copying") {
        assert!(Instant::now() < deadline, "50 FastStages never all copying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let busy = rss();
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut paired: Vec<f64> = staged.iter().zip(&bare).map(|(s, b)| s - b).collect();
    let overhead = median(&mut paired);
    let (b, s) = (median(&mut bare), median(&mut staged));
    println!(
        "FastStage {files} files / {} MiB, {runs} runs: bare lanes copy median {b:.3} s {bare:?}; \
         created-to-Succeeded median {s:.3} s {staged:?}; overhead (median of per-run \
         differences) {overhead:.3} s",
        (files * size) >> 20,
    );
    println!("operator RSS: idle {idle:.1} MiB; 50 FastStages copying {busy:.1} MiB");
    operator.kill().await.unwrap();
}
