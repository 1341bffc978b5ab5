//! `lanes operator`: the Kubernetes-side work that is not a CSI call. Two reconcilers, run
//! only by the replica that holds the `lanes-operator` Lease:
//! - FastStage (`stage.rs`): the fast PVC, the copy Job, live status, cleanup.
//! - StorageGroup: each group's admins get a Role (and RoleBinding) that lets them, and only
//!   them, edit that one StorageGroup — so `lanes storage grant` run by a group admin works
//!   with the admin's own credentials while Kubernetes RBAC refuses everyone else. A
//!   server-side apply of the whole state with owner references: repeating it changes
//!   nothing, and deleting the group lets the garbage collector remove what it made.

pub mod faststage;
pub mod groups;
pub mod lease;
pub mod report;
pub mod stage;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::access::StorageGroup;

/// Why a reconcile failed (it is retried).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("StorageGroup {0} has no namespace")]
    NoNamespace(String),
    #[error("applying {what}: {source}")]
    Apply {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// What every reconcile shares.
struct Context {
    client: kube::Client,
}

/// The field manager of everything the operator applies.
pub const MANAGER: &str = "lanes-operator";

async fn reconcile(group: Arc<StorageGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = group
        .namespace()
        .ok_or_else(|| Error::NoNamespace(group.name_any()))?;
    let (role, binding) = groups::admin_rbac(&group);
    let params = kube::api::PatchParams::apply(MANAGER).force();
    let roles: Api<Role> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = role.name_any();
    roles
        .patch(&name, &params, &kube::api::Patch::Apply(&role))
        .await
        .map_err(|source| Error::Apply {
            what: format!("Role {namespace}/{name}"),
            source,
        })?;
    let bindings: Api<RoleBinding> = Api::namespaced(ctx.client.clone(), &namespace);
    bindings
        .patch(&name, &params, &kube::api::Patch::Apply(&binding))
        .await
        .map_err(|source| Error::Apply {
            what: format!("RoleBinding {namespace}/{name}"),
            source,
        })?;
    tracing::info!(group = %group.name_any(), namespace, admins = binding.subjects.as_ref().map_or(0, Vec::len), "admin access applied");
    Ok(Action::requeue(Duration::from_secs(3600)))
}

fn error_policy(group: Arc<StorageGroup>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(group = %group.name_any(), %error, "reconcile failed; retrying in 10 s");
    Action::requeue(Duration::from_secs(10))
}

/// How the operator runs.
pub struct Options {
    /// The Lanes image the copy Jobs run.
    pub image: String,
    pub profiles: crate::lane::Profiles,
    pub driver_name: String,
    /// Where the Lease lives (the operator's own namespace).
    pub lease_namespace: String,
    /// This replica's name in the Lease (its pod name).
    pub identity: String,
    /// How long a leader's Lease lasts without renewal.
    pub lease: Duration,
}

/// Runs the operator until the process is stopped: waits to lead, then reconciles.
pub async fn run(client: kube::Client, options: Options) {
    lease::Election::new(
        client.clone(),
        &options.lease_namespace,
        "lanes-operator",
        &options.identity,
        options.lease,
    )
    .lead()
    .await;
    let reporter = kube::runtime::events::Reporter {
        controller: MANAGER.to_owned(),
        instance: Some(options.identity.clone()),
    };
    let stages = Arc::new(stage::Context {
        recorder: kube::runtime::events::Recorder::new(client.clone(), reporter),
        client: client.clone(),
        image: options.image,
        profiles: options.profiles,
        driver_name: options.driver_name,
    });
    let by_label = |job: k8s_openapi::api::batch::v1::Job| {
        let made_for = job.labels().get(faststage::MADE_FOR)?.clone();
        let (namespace, name) = made_for.split_once('.')?;
        Some(kube::runtime::reflector::ObjectRef::new(name).within(namespace))
    };
    let faststages = Controller::new(
        Api::<faststage::FastStage>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<k8s_openapi::api::batch::v1::Job>::all(client.clone()),
        watcher::Config::default().labels(faststage::MADE_FOR),
        by_label,
    )
    .shutdown_on_signal()
    .run(stage::reconcile, stage_error, stages)
    .for_each(|_| async {});
    let context = Arc::new(Context {
        client: client.clone(),
    });
    let groups = Controller::new(
        Api::<StorageGroup>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(
        Api::<RoleBinding>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Role>::all(client), watcher::Config::default())
    .shutdown_on_signal()
    .run(reconcile, error_policy, context)
    .for_each(|_| async {});
    tokio::join!(faststages, groups);
}

fn stage_error(
    stage: Arc<faststage::FastStage>,
    error: &stage::Error,
    _ctx: Arc<stage::Context>,
) -> Action {
    tracing::warn!(faststage = %stage.name_any(), %error, "reconcile failed; retrying in 5 s");
    Action::requeue(Duration::from_secs(5))
}
