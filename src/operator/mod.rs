//! `lanes operator`: the Kubernetes-side work that is not a CSI call. Today one reconciler:
//! each StorageGroup's admins get a Role (and RoleBinding) that lets them, and only them,
//! edit that one StorageGroup — so `lanes storage grant` run by a group admin works with the
//! admin's own credentials while Kubernetes RBAC refuses everyone else.
//!
//! Every reconcile is a server-side apply of the whole desired state with owner references
//! to the StorageGroup: repeating it changes nothing, and deleting the group lets Kubernetes'
//! garbage collector remove what it made. Two replicas applying the same state agree, so the
//! Deployment runs one replica without leader election for now.

pub mod groups;

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

/// Runs the operator until the process is stopped.
pub async fn run(client: kube::Client) {
    let context = Arc::new(Context {
        client: client.clone(),
    });
    Controller::new(
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
    .for_each(|_| async {})
    .await;
}
