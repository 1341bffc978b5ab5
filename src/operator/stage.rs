//! The FastStage reconciler: checks the request, makes the fast PVC, the source view (across
//! namespaces), the reporting identity and the copy Job, follows the Job to Succeeded or
//! Failed, and removes all of it when the FastStage is deleted (finalizer).
//!
//! Rules: bad input gets a Failed status that says what is wrong, and nothing is created;
//! every step is a lookup before a create, so a repeat (or a restarted operator) makes no
//! second Job or PVC; the copy reports its own progress, the operator writes only phases,
//! names and conditions.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Namespace, PersistentVolume, PersistentVolumeClaim, ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::faststage::{Direction, FINALIZER, FastStage, MADE_FOR, Plan};
use crate::lane::LaneKind;

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    /// The Lanes image the copy Job runs.
    pub image: String,
    pub profiles: crate::lane::Profiles,
    /// The CSI driver whose volumes may be viewed across namespaces.
    pub driver_name: String,
    pub recorder: Recorder,
}

/// Why a reconcile could not finish (it is retried).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Error {
    what: String,
    #[source]
    source: kube::Error,
}

fn failed(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error { what, source }
}

/// A request that cannot be carried out: its reason (a condition reason) and message.
struct Refusal(&'static str, String);

/// What the checks found: the plan's inputs that come from the API.
struct Checked {
    storage_class: String,
    fast_bytes: u64,
    source_pv: Option<PersistentVolume>,
}

pub async fn reconcile(stage: Arc<FastStage>, ctx: Arc<Context>) -> Result<Action, Error> {
    let plan = Plan::of(&stage);
    let stages: Api<FastStage> = Api::namespaced(ctx.client.clone(), &plan.namespace);
    if stage.metadata.deletion_timestamp.is_some() {
        cleanup(&plan, &ctx).await?;
        let kept: Vec<String> = stage
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        let patch =
            json!({"metadata": {"finalizers": kept, "resourceVersion": stage.resource_version()}});
        match stages
            .patch(&plan.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            // Gone already: an earlier pass released it.
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(failed("removing the finalizer")(e)),
        }
        return Ok(Action::await_change());
    }
    if !stage.finalizers().iter().any(|f| f == FINALIZER) {
        let mut finalizers = stage.finalizers().to_vec();
        finalizers.push(FINALIZER.to_owned());
        let patch = json!({"metadata": {"finalizers": finalizers, "resourceVersion": stage.resource_version()}});
        stages
            .patch(&plan.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(failed("adding the finalizer"))?;
        // The change brings us back.
        return Ok(Action::await_change());
    }
    let status = stage.status.clone().unwrap_or_default();
    let phase = status.phase.clone().unwrap_or_default();
    if matches!(phase.as_str(), "Succeeded" | "Failed")
        && status.observed_generation.is_some()
        && status.observed_generation == stage.metadata.generation
    {
        return Ok(Action::await_change());
    }
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &plan.target_namespace);
    let job = jobs
        .get_opt(&plan.job)
        .await
        .map_err(failed("reading the Job"))?;
    let job = match job {
        Some(job) if !is_ours(&job.metadata, &plan) => {
            return refuse(&stage, &ctx, Refusal("NameTaken", format!(
                "a Job {}/{} exists that this FastStage did not make; delete it or rename the FastStage",
                plan.target_namespace, plan.job
            ))).await;
        }
        Some(job) => job,
        None => {
            // Nothing runs yet: check everything before making anything.
            let checked = match check(&plan, &ctx).await? {
                Ok(checked) => checked,
                Err(refusal) => return refuse(&stage, &ctx, refusal).await,
            };
            set_phase(
                &stage,
                &ctx,
                &plan,
                "Provisioning",
                "making the fast PVC and the copy Job",
            )
            .await?;
            make(&plan, &ctx, &checked).await?;
            let job = plan.job(&ctx.image);
            match jobs.create(&PostParams::default(), &job).await {
                Ok(job) => job,
                // Made by a previous run of this reconcile: use it.
                Err(kube::Error::Api(s)) if s.code == 409 => jobs
                    .get(&plan.job)
                    .await
                    .map_err(failed("reading the Job"))?,
                Err(e) => return Err(failed("creating the Job")(e)),
            }
        }
    };
    let job_status = job.status.clone().unwrap_or_default();
    let condition = |kind: &str| {
        job_status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == kind && c.status == "True")
            .cloned()
    };
    if job_status.succeeded.unwrap_or(0) > 0 || condition("Complete").is_some() {
        finish(
            &stage,
            &ctx,
            "Succeeded",
            "Copied",
            "the copy finished",
            true,
        )
        .await?;
        return Ok(Action::await_change());
    }
    if let Some(failure) = condition("Failed") {
        let message = format!(
            "the copy Job {} failed: {} ({}); the data copied so far stays on the fast PVC, \
             and a new FastStage resumes from it",
            plan.job,
            failure.message.unwrap_or_default(),
            failure.reason.unwrap_or_default()
        );
        finish(&stage, &ctx, "Failed", "CopyFailed", &message, true).await?;
        return Ok(Action::await_change());
    }
    if matches!(phase.as_str(), "" | "Pending" | "Provisioning") {
        set_phase(
            &stage,
            &ctx,
            &plan,
            "Copying",
            &format!("Job {} is copying", plan.job),
        )
        .await?;
    }
    Ok(Action::requeue(Duration::from_secs(10)))
}

fn is_ours(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta, plan: &Plan) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MADE_FOR))
        .is_some_and(|v| *v == plan.made_for())
}

/// The annotation with which a namespace accepts FastStages from other namespaces.
pub const ACCEPT_FROM: &str = "lanes.csi.dev/accept-faststages-from";

/// True when `target` lists `source` (or `*`) in its [`ACCEPT_FROM`] annotation.
fn accepts(target: &Namespace, source: &str) -> bool {
    target
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ACCEPT_FROM))
        .is_some_and(|list| {
            list.split(',')
                .map(str::trim)
                .any(|n| n == source || n == "*")
        })
}

/// True when a FastStage of the plan's namespace made the object.
fn made_here(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    plan: &Plan,
) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MADE_FOR))
        .and_then(|v| v.split_once('.'))
        .is_some_and(|(namespace, _)| namespace == plan.namespace)
}

/// Checks the request against the API: every refusal names what is wrong.
async fn check(plan: &Plan, ctx: &Context) -> Result<Result<Checked, Refusal>, Error> {
    let client = &ctx.client;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let Some(target) = namespaces
        .get_opt(&plan.target_namespace)
        .await
        .map_err(failed("reading the target namespace"))?
    else {
        return Ok(Err(Refusal(
            "TargetNamespaceMissing",
            format!("target namespace {} does not exist", plan.target_namespace),
        )));
    };
    // Whoever may create a FastStage here must not be able to put Jobs and PVCs into (or,
    // with syncBack, read claims of) a namespace that did not agree to it.
    if plan.cross_namespace && !accepts(&target, &plan.namespace) {
        return Ok(Err(Refusal(
            "TargetNamespaceClosed",
            format!(
                "namespace {} does not accept FastStages from {}: its admin must annotate it \
                 {ACCEPT_FROM}={} (a comma-separated list)",
                plan.target_namespace, plan.namespace, plan.namespace
            ),
        )));
    }
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &plan.namespace);
    let Some(source) = claims
        .get_opt(&plan.spec.source)
        .await
        .map_err(failed("reading the source PVC"))?
    else {
        return Ok(Err(Refusal(
            "SourceMissing",
            format!(
                "source PVC {}/{} does not exist",
                plan.namespace, plan.spec.source
            ),
        )));
    };
    let source_status = source.status.clone().unwrap_or_default();
    if source_status.phase.as_deref() != Some("Bound") {
        return Ok(Err(Refusal(
            "SourceNotBound",
            format!(
                "source PVC {}/{} is {}, not Bound; wait until it is bound",
                plan.namespace,
                plan.spec.source,
                source_status.phase.as_deref().unwrap_or("Pending")
            ),
        )));
    }
    let spec = source.spec.clone().unwrap_or_default();
    if !spec
        .access_modes
        .iter()
        .flatten()
        .any(|m| m == "ReadWriteMany")
    {
        return Ok(Err(Refusal(
            "SourceNotRWX",
            format!(
                "source PVC {}/{} is not ReadWriteMany: fast-stage copies from a shared volume",
                plan.namespace, plan.spec.source
            ),
        )));
    }
    let source_bytes = source_status
        .capacity
        .as_ref()
        .and_then(|c| c.get("storage"))
        .and_then(|q| crate::units::parse_bytes(&q.0).ok())
        .unwrap_or(0);
    let fast_bytes = match &plan.spec.fast_capacity {
        Some(text) => match crate::units::parse_bytes(text) {
            Ok(bytes) => bytes,
            Err(e) => {
                return Ok(Err(Refusal(
                    "BadCapacity",
                    format!("fastCapacity {text:?}: {e}"),
                )));
            }
        },
        None => source_bytes,
    };
    if plan.spec.direction == Direction::Stage && fast_bytes < source_bytes {
        return Ok(Err(Refusal(
            "CapacityTooSmall",
            format!(
                "fastCapacity {} is smaller than the source's {}; ask for at least that",
                crate::units::human(fast_bytes),
                crate::units::human(source_bytes)
            ),
        )));
    }
    let storage_class = match storage_class(plan, ctx).await? {
        Ok(class) => class,
        Err(refusal) => return Ok(Err(refusal)),
    };
    let fast_claims: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &plan.target_namespace);
    let fast = fast_claims
        .get_opt(&plan.fast_pvc)
        .await
        .map_err(failed("reading the fast PVC"))?;
    match (plan.spec.direction, &fast) {
        (Direction::Stage, Some(pvc)) if !is_ours(&pvc.metadata, plan) => {
            return Ok(Err(Refusal(
                "NameTaken",
                format!(
                    "PVC {}/{} exists and was not made by this FastStage; choose another fastPvcName",
                    plan.target_namespace, plan.fast_pvc
                ),
            )));
        }
        (Direction::SyncBack, None) => {
            return Ok(Err(Refusal(
                "FastPVCMissing",
                format!(
                    "syncBack copies from PVC {}/{}, which does not exist",
                    plan.target_namespace, plan.fast_pvc
                ),
            )));
        }
        // Only a fast PVC a FastStage of this namespace made can be copied back here: any
        // other claim of the target namespace is not this namespace's to read.
        (Direction::SyncBack, Some(pvc)) if !made_here(&pvc.metadata, plan) => {
            return Ok(Err(Refusal(
                "NotAFastPVC",
                format!(
                    "PVC {}/{} was not made by a FastStage of namespace {}; syncBack copies \
                     only from fast PVCs staged from here",
                    plan.target_namespace, plan.fast_pvc, plan.namespace
                ),
            )));
        }
        _ => {}
    }
    let source_pv = if plan.cross_namespace {
        let volume = spec.volume_name.clone().unwrap_or_default();
        let pvs: Api<PersistentVolume> = Api::all(client.clone());
        let pv = pvs
            .get_opt(&volume)
            .await
            .map_err(failed("reading the source PV"))?;
        let on_subdirectory_lane = pv
            .as_ref()
            .and_then(|pv| pv.spec.as_ref()?.csi.clone())
            .filter(|csi| csi.driver == ctx.driver_name)
            .and_then(|csi| crate::lane::VolumeId::parse(&csi.volume_handle).ok())
            .is_some_and(|id| matches!(id.lane(), "shared-rwx" | "legacy-rwx"));
        if !on_subdirectory_lane {
            return Ok(Err(Refusal(
                "CrossNamespaceUnsupported",
                format!(
                    "source PVC {}/{} is not on a Lanes shared-rwx or legacy-rwx volume, so it \
                 cannot be seen from namespace {}; set targetNamespace to {} (the Job can \
                 only mount claims of its own namespace)",
                    plan.namespace, plan.spec.source, plan.target_namespace, plan.namespace
                ),
            )));
        }
        pv
    } else {
        None
    };
    Ok(Ok(Checked {
        storage_class,
        fast_bytes,
        source_pv,
    }))
}

/// The StorageClass of the fast PVC's profile, which must be node-local and exist.
async fn storage_class(plan: &Plan, ctx: &Context) -> Result<Result<String, Refusal>, Error> {
    let profile = match &plan.spec.profile {
        Some(name) => ctx.profiles.get(name).ok(),
        None => ctx.profiles.iter().find(|p| p.lane == LaneKind::FastRwo),
    };
    let Some(profile) = profile else {
        return Ok(Err(Refusal(
            "ProfileUnavailable",
            match &plan.spec.profile {
                Some(name) => format!(
                    "profile {name} is not configured (profiles: {})",
                    ctx.profiles.names().join(", ")
                ),
                None => "no fast-rwo profile is configured; name a node-local profile".to_owned(),
            },
        )));
    };
    if !profile.lane.node_local() {
        return Ok(Err(Refusal(
            "ProfileUnavailable",
            format!(
                "profile {} is on lane {}; the fast PVC needs a node-local profile (fast-rwo or local)",
                profile.name,
                profile.lane.as_str()
            ),
        )));
    }
    let class = match &profile.longhorn {
        Some(longhorn) => longhorn.storage_class.clone(),
        None => format!("lanes-{}", profile.name),
    };
    let classes: Api<StorageClass> = Api::all(ctx.client.clone());
    if classes
        .get_opt(&class)
        .await
        .map_err(failed("reading the StorageClass"))?
        .is_none()
    {
        return Ok(Err(Refusal(
            "ProfileUnavailable",
            format!(
                "profile {} is unavailable: StorageClass {class} does not exist",
                profile.name
            ),
        )));
    }
    Ok(Ok(class))
}

/// Makes what the Job needs, each only if missing.
async fn make(plan: &Plan, ctx: &Context, checked: &Checked) -> Result<(), Error> {
    let client = &ctx.client;
    let (account, role, binding) = plan.reporter_rbac();
    create(
        Api::namespaced(client.clone(), &plan.target_namespace),
        account,
    )
    .await?;
    create(
        Api::<Role>::namespaced(client.clone(), &plan.namespace),
        role,
    )
    .await?;
    create(
        Api::<RoleBinding>::namespaced(client.clone(), &plan.namespace),
        binding,
    )
    .await?;
    if let Some(source_pv) = &checked.source_pv {
        let (pv, pvc) = plan.source_view(source_pv);
        create(Api::<PersistentVolume>::all(client.clone()), pv).await?;
        create(Api::namespaced(client.clone(), &plan.target_namespace), pvc).await?;
    }
    if plan.spec.direction == Direction::Stage {
        let claim = plan.fast_claim(&checked.storage_class, checked.fast_bytes);
        create(
            Api::namespaced(client.clone(), &plan.target_namespace),
            claim,
        )
        .await?;
    }
    Ok(())
}

/// Creates `object` unless it exists.
async fn create<K>(api: Api<K>, object: K) -> Result<(), Error>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(failed(format!("creating {}", object.name_any()))(e)),
    }
}

/// Deletes `name` if it exists and is ours.
async fn delete<K>(api: Api<K>, name: &str, plan: &Plan) -> Result<(), Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(object) = api
        .get_opt(name)
        .await
        .map_err(failed(format!("reading {name}")))?
    else {
        return Ok(());
    };
    if !is_ours(object.meta(), plan) {
        return Ok(());
    }
    match api.delete(name, &DeleteParams::background()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(failed(format!("deleting {name}"))(e)),
    }
}

/// Removes everything the FastStage made (its Job first, so nothing writes while the rest
/// goes); what others made is never touched.
async fn cleanup(plan: &Plan, ctx: &Context) -> Result<(), Error> {
    let client = &ctx.client;
    let target = &plan.target_namespace;
    delete(
        Api::<Job>::namespaced(client.clone(), target),
        &plan.job,
        plan,
    )
    .await?;
    delete(
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), target),
        &plan.fast_pvc,
        plan,
    )
    .await?;
    if let Some(pv) = plan.view_pv_name() {
        delete(
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), target),
            &plan.source_claim,
            plan,
        )
        .await?;
        delete(Api::<PersistentVolume>::all(client.clone()), &pv, plan).await?;
    }
    delete(
        Api::<ServiceAccount>::namespaced(client.clone(), target),
        &plan.reporter,
        plan,
    )
    .await?;
    delete(
        Api::<RoleBinding>::namespaced(client.clone(), &plan.namespace),
        &plan.reporter,
        plan,
    )
    .await?;
    delete(
        Api::<Role>::namespaced(client.clone(), &plan.namespace),
        &plan.reporter,
        plan,
    )
    .await?;
    Ok(())
}

async fn patch_status(
    stage: &FastStage,
    ctx: &Context,
    status: serde_json::Value,
) -> Result<(), Error> {
    let stages: Api<FastStage> =
        Api::namespaced(ctx.client.clone(), &stage.namespace().unwrap_or_default());
    stages
        .patch_status(
            &stage.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .map_err(failed("writing the FastStage status"))?;
    Ok(())
}

fn condition(kind: &str, ok: bool, reason: &str, message: &str) -> serde_json::Value {
    json!([{
        "type": kind,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": k8s_openapi::jiff::Timestamp::now().to_string(),
    }])
}

async fn event(stage: &FastStage, ctx: &Context, warning: bool, reason: &str, note: &str) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "FastStage".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &stage.object_ref(&())).await {
        tracing::debug!(error = %e, "could not record an event");
    }
}

async fn set_phase(
    stage: &FastStage,
    ctx: &Context,
    plan: &Plan,
    phase: &str,
    message: &str,
) -> Result<(), Error> {
    patch_status(
        stage,
        ctx,
        json!({
            "phase": phase,
            "message": message,
            "fastPvc": plan.fast_pvc,
            "jobName": plan.job,
            "checksum": plan.spec.checksum.as_str(),
            "conditions": condition("Ready", false, phase, message),
        }),
    )
    .await?;
    event(stage, ctx, false, phase, message).await;
    Ok(())
}

/// Ends in `phase`; `terminal` ends it for this generation of the spec, otherwise the
/// request is looked at again (a refusal the world may lift: a PVC that gets bound).
async fn finish(
    stage: &FastStage,
    ctx: &Context,
    phase: &str,
    reason: &str,
    message: &str,
    terminal: bool,
) -> Result<(), Error> {
    let ok = phase == "Succeeded";
    patch_status(
        stage,
        ctx,
        json!({
            "phase": phase,
            "message": message,
            "observedGeneration": if terminal { stage.metadata.generation } else { None },
            "etaSeconds": 0,
            "conditions": condition("Ready", ok, reason, message),
        }),
    )
    .await?;
    event(stage, ctx, !ok, reason, message).await;
    Ok(())
}

async fn refuse(stage: &FastStage, ctx: &Context, refusal: Refusal) -> Result<Action, Error> {
    let Refusal(reason, message) = refusal;
    let status = stage.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Failed") || status.message.as_deref() != Some(&message) {
        finish(stage, ctx, "Failed", reason, &message, false).await?;
    }
    Ok(Action::requeue(Duration::from_secs(10)))
}

#[cfg(test)]
mod tests {
    //! Reconcile decisions against a scripted API (tower-test): each test answers the
    //! requests the reconciler makes, in order, and checks what it asked for.
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock::{self, Handle};

    type Api = Handle<Request<Body>, Response<Body>>;

    fn context(client: kube::Client) -> Arc<Context> {
        let config = crate::config::Config::parse(
            "profiles:\n  fast:\n    lane: fast-rwo\n    default: true\n",
            "test",
            std::path::Path::new("/d"),
        )
        .unwrap();
        Arc::new(Context {
            recorder: Recorder::new(client.clone(), "lanes-operator".into()),
            client,
            image: "lanes:test".into(),
            profiles: config.profiles,
            driver_name: "lanes.csi.dev".into(),
        })
    }

    fn stage(spec: serde_json::Value, finalizer: bool) -> Arc<FastStage> {
        let finalizers: Vec<&str> = if finalizer { vec![FINALIZER] } else { vec![] };
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "lanes.csi.dev/v1alpha1", "kind": "FastStage",
                "metadata": {"name": "s", "namespace": "vision", "uid": "u1",
                             "generation": 1, "finalizers": finalizers},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    /// Answers the next request: asserts its method and path, replies `status` with `body`.
    async fn answer(
        api: &mut Api,
        method: &str,
        path: &str,
        status: u16,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let (request, respond) = api.next_request().await.expect("a request");
        assert_eq!(request.method().as_str(), method, "{}", request.uri());
        assert_eq!(request.uri().path(), path);
        let sent = request.into_body().collect_bytes().await.unwrap();
        let sent = serde_json::from_slice(&sent).unwrap_or(serde_json::Value::Null);
        respond.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).unwrap()))
                .unwrap(),
        );
        sent
    }

    fn not_found() -> serde_json::Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
               "code": 404, "message": "not found"})
    }

    #[tokio::test]
    async fn the_first_reconcile_only_adds_the_finalizer() {
        let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(kube::Client::new(service, "default"));
        let run = tokio::spawn(reconcile(stage(json!({"source": "data"}), false), ctx));
        let sent = answer(
            &mut api,
            "PATCH",
            "/apis/lanes.csi.dev/v1alpha1/namespaces/vision/faststages/s",
            200,
            serde_json::to_value(&*stage(json!({"source": "data"}), true)).unwrap(),
        )
        .await;
        assert_eq!(sent["metadata"]["finalizers"], json!([FINALIZER]));
        assert!(matches!(run.await.unwrap(), Ok(action) if action == Action::await_change()));
    }

    #[tokio::test]
    async fn a_missing_source_fails_the_stage_and_creates_nothing() {
        let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(kube::Client::new(service, "default"));
        let run = tokio::spawn(reconcile(stage(json!({"source": "data"}), true), ctx));
        answer(
            &mut api,
            "GET",
            "/apis/batch/v1/namespaces/vision/jobs/lanes-copy-s",
            404,
            not_found(),
        )
        .await;
        answer(
            &mut api,
            "GET",
            "/api/v1/namespaces/vision",
            200,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "vision"}}),
        )
        .await;
        answer(
            &mut api,
            "GET",
            "/api/v1/namespaces/vision/persistentvolumeclaims/data",
            404,
            not_found(),
        )
        .await;
        let status = answer(
            &mut api,
            "PATCH",
            "/apis/lanes.csi.dev/v1alpha1/namespaces/vision/faststages/s/status",
            200,
            serde_json::to_value(&*stage(json!({"source": "data"}), true)).unwrap(),
        )
        .await;
        assert_eq!(status["status"]["phase"], "Failed");
        assert_eq!(status["status"]["conditions"][0]["reason"], "SourceMissing");
        assert!(
            status["status"]["observedGeneration"].is_null(),
            "looked at again later"
        );
        // The event, then nothing else: no PVC, no Job.
        answer(
            &mut api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/vision/events",
            201,
            json!({}),
        )
        .await;
        let action = run.await.unwrap().unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
    }

    #[tokio::test]
    async fn a_finished_job_ends_the_stage_without_touching_anything_else() {
        let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
        let ctx = context(kube::Client::new(service, "default"));
        let run = tokio::spawn(reconcile(stage(json!({"source": "data"}), true), ctx));
        let job = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "lanes-copy-s", "namespace": "vision",
                         "labels": {MADE_FOR: "vision.s"}},
            "status": {"succeeded": 1}});
        answer(
            &mut api,
            "GET",
            "/apis/batch/v1/namespaces/vision/jobs/lanes-copy-s",
            200,
            job,
        )
        .await;
        let status = answer(
            &mut api,
            "PATCH",
            "/apis/lanes.csi.dev/v1alpha1/namespaces/vision/faststages/s/status",
            200,
            serde_json::to_value(&*stage(json!({"source": "data"}), true)).unwrap(),
        )
        .await;
        assert_eq!(status["status"]["phase"], "Succeeded");
        assert_eq!(status["status"]["observedGeneration"], 1);
        answer(
            &mut api,
            "POST",
            "/apis/events.k8s.io/v1/namespaces/vision/events",
            201,
            json!({}),
        )
        .await;
        assert_eq!(run.await.unwrap().unwrap(), Action::await_change());
    }
}
