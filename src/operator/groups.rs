//! What a StorageGroup's admins may do, as RBAC objects: a Role allowing get, update and
//! patch of that one StorageGroup (by resourceNames), bound to the admin members.

use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::access::{Level, StorageGroup};

/// The Role and RoleBinding that let `group`'s admins manage it.
pub fn admin_rbac(group: &StorageGroup) -> (Role, RoleBinding) {
    let name = format!("lanes-storagegroup-{}-admin", group.name_any());
    let metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: group.namespace(),
        owner_references: group.controller_owner_ref(&()).map(|r| vec![r]),
        labels: Some(
            [
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    super::MANAGER.to_owned(),
                ),
                ("lanes.csi.dev/storagegroup".to_owned(), group.name_any()),
            ]
            .into(),
        ),
        ..Default::default()
    };
    let role = Role {
        metadata: metadata.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["lanes.csi.dev".into()]),
            resources: Some(vec!["storagegroups".into()]),
            resource_names: Some(vec![group.name_any()]),
            verbs: ["get", "update", "patch"].map(String::from).to_vec(),
            ..Default::default()
        }]),
    };
    let subjects: Vec<Subject> = group
        .spec
        .members
        .iter()
        .filter(|m| m.level == Level::Admin)
        .map(|m| Subject {
            kind: "User".into(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            name: m.user.clone(),
            namespace: None,
        })
        .collect();
    let binding = RoleBinding {
        metadata,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name,
        },
        subjects: Some(subjects),
    };
    (role, binding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::{Member, StorageGroupSpec};

    #[test]
    fn only_admins_are_bound_and_only_to_their_group() {
        let mut group = StorageGroup::new(
            "vision",
            StorageGroupSpec {
                members: vec![
                    Member {
                        user: "erin".into(),
                        level: Level::Admin,
                    },
                    Member {
                        user: "dave".into(),
                        level: Level::Write,
                    },
                ],
            },
        );
        group.metadata.namespace = Some("team".into());
        group.metadata.uid = Some("u1".into());
        let (role, binding) = admin_rbac(&group);
        let rule = &role.rules.unwrap()[0];
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["vision".to_owned()][..])
        );
        assert!(
            !rule
                .verbs
                .iter()
                .any(|v| v == "delete" || v == "create" || v == "*")
        );
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].name, "erin");
        let owner = &binding.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("StorageGroup", "u1")
        );
        assert_eq!(binding.metadata.namespace.as_deref(), Some("team"));
    }
}
