//! The `StorageGroup` custom resource (`lanes.csi.dev/v1alpha1`): who holds which level on a
//! group's storage.
//!
//! Namespaced, in the namespace of the group's PVCs: a pod can only mount PVCs of its own
//! namespace, so the group that governs a claim sits beside it, and Kubernetes RBAC can then
//! let a group's admins (and only them) edit their own StorageGroup with a Role naming it.
//! A cluster-scoped group would need a ClusterRole per group and would let one namespace's
//! group name govern claims in every namespace.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Members of a group and their levels.
#[derive(CustomResource, Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lanes.csi.dev",
    version = "v1alpha1",
    kind = "StorageGroup",
    namespaced,
    shortname = "sg",
    printcolumn = r#"{"name":"Members","type":"string","jsonPath":".spec.members[*].user"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct StorageGroupSpec {
    /// The members, at most one entry per user.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["user"]))]
    pub members: Vec<Member>,
}

/// One member of a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Member {
    /// The user as Kubernetes authenticates them (the pod's user label must equal it).
    #[schemars(length(min = 1, max = 253))]
    pub user: String,
    pub level: Level,
}

/// What a member may do with the group's storage.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Mount and read; every mount is read-only.
    Read,
    /// Mount, read and write.
    Write,
    /// Write, and manage the group's members.
    Admin,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Read => "read",
            Level::Write => "write",
            Level::Admin => "admin",
        }
    }

    /// Parses `read`, `write` or `admin`.
    pub fn parse(text: &str) -> Result<Level, String> {
        match text {
            "read" => Ok(Level::Read),
            "write" => Ok(Level::Write),
            "admin" => Ok(Level::Admin),
            other => Err(format!(
                "{} is not a level: read, write or admin",
                crate::text::shown(other)
            )),
        }
    }
}

/// The CRD as YAML, as deploy/ holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = serde_yaml_ng::to_string(&StorageGroup::crd()).expect("a CRD serializes");
    format!("# Generated from src/access/group.rs by `lanes crds`: do not edit.\n{crd}")
}
