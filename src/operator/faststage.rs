//! The `FastStage` custom resource (`lanes.csi.dev/v1alpha1`) and the objects a FastStage
//! makes: the fast PVC, the copy Job, the identity the Job reports progress with, and — when
//! the fast PVC lives in another namespace — a read-only view of the source there.
//!
//! A FastStage lives beside its source PVC. Everything here is a pure function of the
//! FastStage and what the API holds; the reconciler (`stage.rs`) does the I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, PersistentVolumeSpec, PodSecurityContext, PodSpec,
    PodTemplateSpec, ResourceRequirements, SecurityContext, ServiceAccount, Volume, VolumeMount,
    VolumeResourceRequirements,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{CustomResource, ResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Copies a bound RWX volume onto a node-local fast PVC (or the fast PVC's results back).
#[derive(CustomResource, Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "lanes.csi.dev",
    version = "v1alpha1",
    kind = "FastStage",
    namespaced,
    status = "FastStageStatus",
    shortname = "fst",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#,
    printcolumn = r#"{"name":"Fast PVC","type":"string","jsonPath":".status.fastPvc"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"ETA","type":"integer","jsonPath":".status.etaSeconds"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.fastPvcName) || (size(self.fastPvcName) <= 63 && self.fastPvcName.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))",
        "message": "fastPvcName must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters"
    },
    {
        "rule": "!has(self.targetNamespace) || (size(self.targetNamespace) <= 63 && self.targetNamespace.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))",
        "message": "targetNamespace must be a namespace name (DNS-1123 label)"
    },
    {
        "rule": "!has(self.deleteAtSource) || !self.deleteAtSource || (has(self.direction) && self.direction == 'syncBack')",
        "message": "deleteAtSource applies to direction syncBack only"
    },
    {
        "rule": "!has(self.fastCapacity) || self.fastCapacity.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$')",
        "message": "fastCapacity must be a quantity such as 100Gi"
    }
]))]
pub struct FastStageSpec {
    /// The RWX PVC, in this namespace, whose data is staged (or synced back to).
    #[schemars(length(min = 1, max = 253))]
    pub source: String,
    /// Where the fast PVC and the copy Job go (default: this namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_namespace: Option<String>,
    /// The fast PVC's name (default `fast-<source>`, shortened with a hash when too long).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_pvc_name: Option<String>,
    /// The fast PVC's size, at least the source's (default: the source's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_capacity: Option<String>,
    /// What counts as already copied, and how copies are verified.
    #[serde(default)]
    pub checksum: ChecksumMode,
    /// The storage profile of the fast PVC (default: the first fast-rwo profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// `stage` (source to fast PVC) or `syncBack` (fast PVC to source).
    #[serde(default)]
    pub direction: Direction,
    /// syncBack only: remove what the fast PVC does not have from the source.
    #[serde(default)]
    pub delete_at_source: bool,
    /// The Job's deadline, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_deadline_seconds: Option<i64>,
    /// How many times a failed copy pod is retried (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_limit: Option<i32>,
    /// How long a finished Job is kept (default 3600 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<i32>,
}

/// `lanes copy --checksum`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ChecksumMode {
    /// Size and modification time decide what is already there.
    #[default]
    SizeMtime,
    /// Content hashes decide, and every copied file is verified against its source.
    Sha256,
    /// Copy everything, verify nothing.
    None,
}

impl ChecksumMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChecksumMode::SizeMtime => "size-mtime",
            ChecksumMode::Sha256 => "sha256",
            ChecksumMode::None => "none",
        }
    }
}

/// Which way the data goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Direction {
    #[default]
    Stage,
    SyncBack,
}

/// What a FastStage has come to. The copy writes the counters while it runs; the operator
/// writes the phase, names and conditions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FastStageStatus {
    /// Pending, Provisioning, Copying, Verifying, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// What is happening, or what went wrong and what to do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fast_pvc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_per_second: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u64>,
    /// `files/total files, bytes/total` for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// The copy's verification: `passed (N files)`, `failed: ...`, or `not asked (none)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A condition in the Kubernetes convention.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: String,
}

/// The finalizer that removes what a FastStage made.
pub const FINALIZER: &str = "lanes.csi.dev/faststage-cleanup";
/// The label on everything a FastStage made: `<namespace>.<name>` of the FastStage.
pub const MADE_FOR: &str = "lanes.csi.dev/faststage";

/// The default fast PVC name: `fast-<source>`, shortened to 63 characters with a hash of the
/// full name so that two long sources never share one.
pub fn default_fast_name(source: &str) -> String {
    let name = format!("fast-{source}");
    if name.len() <= 63 {
        return name;
    }
    use sha2::Digest;
    let hash = sha2::Sha256::digest(source.as_bytes());
    let suffix: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
    let keep = name[..63 - 9].trim_end_matches(['-', '.']);
    format!("{keep}-{suffix}")
}

/// A FastStage with its defaults applied: what every decision works from.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub namespace: String,
    pub name: String,
    pub target_namespace: String,
    pub fast_pvc: String,
    pub job: String,
    /// The service account the copy reports progress as.
    pub reporter: String,
    /// The claim the Job mounts as the source: the source itself, or its read-only view in
    /// the target namespace.
    pub source_claim: String,
    pub cross_namespace: bool,
    pub spec: FastStageSpec,
}

impl Plan {
    pub fn of(stage: &FastStage) -> Plan {
        let namespace = stage.namespace().unwrap_or_default();
        let name = stage.name_any();
        let target_namespace = stage
            .spec
            .target_namespace
            .clone()
            .unwrap_or_else(|| namespace.clone());
        let fast_pvc = stage
            .spec
            .fast_pvc_name
            .clone()
            .unwrap_or_else(|| default_fast_name(&stage.spec.source));
        let cross_namespace = target_namespace != namespace;
        // Object names derived from the FastStage's: short and unique per namespace pair.
        let short = crate::operator::faststage::default_fast_name(&name)
            .trim_start_matches("fast-")
            .to_owned();
        Plan {
            job: format!("lanes-copy-{short}"),
            reporter: format!("lanes-report-{short}"),
            source_claim: if cross_namespace {
                format!("{fast_pvc}-source")
            } else {
                stage.spec.source.clone()
            },
            namespace,
            name,
            target_namespace,
            fast_pvc,
            cross_namespace,
            spec: stage.spec.clone(),
        }
    }

    /// The label value tying an object to this FastStage.
    pub fn made_for(&self) -> String {
        format!("{}.{}", self.namespace, self.name)
    }

    fn meta(&self, name: &str, namespace: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([
                (MADE_FOR.to_owned(), self.made_for()),
                (
                    "app.kubernetes.io/managed-by".to_owned(),
                    super::MANAGER.to_owned(),
                ),
            ])),
            ..Default::default()
        }
    }

    /// The fast PVC: node-local, RWO, on the profile's StorageClass.
    pub fn fast_claim(&self, storage_class: &str, bytes: u64) -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: self.meta(&self.fast_pvc, &self.target_namespace),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                storage_class_name: Some(storage_class.to_owned()),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(bytes.to_string()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// The source as a PV in the target namespace's reach: the same CSI volume, bound only to
    /// our claim, retained (deleting it never deletes the data), read-only for `stage`.
    pub fn source_view(
        &self,
        source_pv: &PersistentVolume,
    ) -> (PersistentVolume, PersistentVolumeClaim) {
        let read_only = self.spec.direction == Direction::Stage;
        let modes = vec![
            if read_only {
                "ReadOnlyMany"
            } else {
                "ReadWriteMany"
            }
            .to_owned(),
        ];
        let spec = source_pv.spec.clone().unwrap_or_default();
        let mut csi = spec.csi.clone();
        if let Some(csi) = &mut csi {
            csi.read_only = Some(read_only);
        }
        let pv_name = format!("lanes-view-{}", self.claim_uid_free_name());
        let mut pv_meta = self.meta(&pv_name, "");
        pv_meta.namespace = None;
        let pv = PersistentVolume {
            metadata: pv_meta,
            spec: Some(PersistentVolumeSpec {
                access_modes: Some(modes.clone()),
                capacity: spec.capacity.clone(),
                csi,
                persistent_volume_reclaim_policy: Some("Retain".into()),
                storage_class_name: Some(String::new()),
                volume_mode: spec.volume_mode.clone(),
                claim_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                    namespace: Some(self.target_namespace.clone()),
                    name: Some(self.source_claim.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        };
        let pvc = PersistentVolumeClaim {
            metadata: self.meta(&self.source_claim, &self.target_namespace),
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(modes),
                storage_class_name: Some(String::new()),
                volume_name: Some(pv_name),
                resources: Some(VolumeResourceRequirements {
                    requests: spec.capacity,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        };
        (pv, pvc)
    }

    /// A cluster-unique name for the view PV: namespace and name of the FastStage, shortened.
    fn claim_uid_free_name(&self) -> String {
        default_fast_name(&format!("{}-{}", self.namespace, self.name))
            .trim_start_matches("fast-")
            .to_owned()
    }

    /// The PV name of the source view, if this plan makes one.
    pub fn view_pv_name(&self) -> Option<String> {
        self.cross_namespace
            .then(|| format!("lanes-view-{}", self.claim_uid_free_name()))
    }

    /// The copy's identity: a service account in the target namespace that may patch this
    /// FastStage's status and nothing else.
    pub fn reporter_rbac(&self) -> (ServiceAccount, Role, RoleBinding) {
        let account = ServiceAccount {
            metadata: self.meta(&self.reporter, &self.target_namespace),
            automount_service_account_token: Some(true),
            ..Default::default()
        };
        let role = Role {
            metadata: self.meta(&self.reporter, &self.namespace),
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec!["lanes.csi.dev".into()]),
                resources: Some(vec!["faststages/status".into()]),
                resource_names: Some(vec![self.name.clone()]),
                verbs: vec!["get".into(), "patch".into()],
                ..Default::default()
            }]),
        };
        let binding = RoleBinding {
            metadata: self.meta(&self.reporter, &self.namespace),
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name: self.reporter.clone(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: self.reporter.clone(),
                namespace: Some(self.target_namespace.clone()),
                api_group: None,
            }]),
        };
        (account, role, binding)
    }

    /// The one-off Job that runs `lanes copy`, as a non-root user whose group owns the fast
    /// PVC's files.
    pub fn job(&self, image: &str) -> Job {
        let (from, to) = match self.spec.direction {
            Direction::Stage => ("/source", "/fast"),
            Direction::SyncBack => ("/fast", "/source"),
        };
        let mut args: Vec<String> = [
            "copy",
            from,
            to,
            "--checksum",
            self.spec.checksum.as_str(),
            "--json",
        ]
        .map(String::from)
        .to_vec();
        if self.spec.direction == Direction::SyncBack && self.spec.delete_at_source {
            args.push("--delete".into());
        }
        args.extend([
            "--report-to".into(),
            format!("{}/{}", self.namespace, self.name),
        ]);
        let source_read_only = self.spec.direction == Direction::Stage;
        let claim = |name: &str, claim: &str, read_only: bool| Volume {
            name: name.to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_owned(),
                read_only: Some(read_only),
            }),
            ..Default::default()
        };
        let mount = |name: &str, read_only: bool| VolumeMount {
            name: name.to_owned(),
            mount_path: format!("/{name}"),
            read_only: Some(read_only),
            ..Default::default()
        };
        let requests = BTreeMap::from([
            ("cpu".to_owned(), Quantity("500m".into())),
            ("memory".to_owned(), Quantity("128Mi".into())),
        ]);
        let limits = BTreeMap::from([("memory".to_owned(), Quantity("512Mi".into()))]);
        Job {
            metadata: self.meta(&self.job, &self.target_namespace),
            spec: Some(JobSpec {
                backoff_limit: Some(self.spec.backoff_limit.unwrap_or(3)),
                ttl_seconds_after_finished: Some(
                    self.spec.ttl_seconds_after_finished.unwrap_or(3600),
                ),
                active_deadline_seconds: self.spec.active_deadline_seconds,
                template: PodTemplateSpec {
                    metadata: Some(self.meta(&self.job, &self.target_namespace)),
                    spec: Some(PodSpec {
                        restart_policy: Some("Never".into()),
                        service_account_name: Some(self.reporter.clone()),
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(65532),
                            run_as_group: Some(65532),
                            fs_group: Some(65532),
                            ..Default::default()
                        }),
                        containers: vec![Container {
                            name: "copy".into(),
                            image: Some(image.to_owned()),
                            args: Some(args),
                            security_context: Some(SecurityContext {
                                allow_privilege_escalation: Some(false),
                                read_only_root_filesystem: Some(true),
                                capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                                    drop: Some(vec!["ALL".into()]),
                                    ..Default::default()
                                }),
                                ..Default::default()
                            }),
                            resources: Some(ResourceRequirements {
                                requests: Some(requests),
                                limits: Some(limits),
                                ..Default::default()
                            }),
                            volume_mounts: Some(vec![
                                mount("source", source_read_only),
                                mount("fast", !source_read_only),
                            ]),
                            ..Default::default()
                        }],
                        volumes: Some(vec![
                            claim("source", &self.source_claim, source_read_only),
                            claim("fast", &self.fast_pvc, !source_read_only),
                        ]),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            status: None,
        }
    }
}

/// The CRD as YAML, as deploy/ holds it.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    let crd = serde_yaml_ng::to_string(&FastStage::crd()).expect("a CRD serializes");
    format!("# Generated from src/operator/faststage.rs by `lanes crds`: do not edit.\n{crd}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(spec: FastStageSpec) -> FastStage {
        let mut stage = FastStage::new("imagenet-stage", spec);
        stage.metadata.namespace = Some("vision".into());
        stage
    }

    fn spec(source: &str) -> FastStageSpec {
        serde_json::from_value(serde_json::json!({"source": source})).unwrap()
    }

    #[test]
    fn default_fast_names_are_dns_labels_and_distinct() {
        assert_eq!(default_fast_name("imagenet"), "fast-imagenet");
        let long_a = "a".repeat(70);
        let long_b = format!("{}b", "a".repeat(69));
        let (a, b) = (default_fast_name(&long_a), default_fast_name(&long_b));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        let dashes = format!("{}-{}", "x".repeat(48), "y".repeat(30));
        let c = default_fast_name(&dashes);
        assert!(!c.contains("--") && c.len() <= 63, "{c}");
    }

    #[test]
    fn a_stage_job_reads_the_source_read_only_and_reports_its_own_progress() {
        let plan = Plan::of(&stage(spec("imagenet")));
        assert_eq!(plan.fast_pvc, "fast-imagenet");
        assert_eq!(plan.target_namespace, "vision");
        assert_eq!(plan.source_claim, "imagenet");
        let job = plan.job("lanes:1");
        let pod = job.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(
            args,
            [
                "copy",
                "/source",
                "/fast",
                "--checksum",
                "size-mtime",
                "--json",
                "--report-to",
                "vision/imagenet-stage"
            ]
        );
        let volumes = pod.volumes.unwrap();
        let source = volumes[0].persistent_volume_claim.as_ref().unwrap();
        assert_eq!(
            (source.claim_name.as_str(), source.read_only),
            ("imagenet", Some(true))
        );
        assert_eq!(pod.security_context.unwrap().run_as_non_root, Some(true));
        let (_, role, binding) = plan.reporter_rbac();
        let rule = &role.rules.unwrap()[0];
        assert_eq!(
            rule.resources.as_deref(),
            Some(&["faststages/status".to_owned()][..])
        );
        assert_eq!(
            rule.resource_names.as_deref(),
            Some(&["imagenet-stage".to_owned()][..])
        );
        assert_eq!(
            binding.subjects.unwrap()[0].namespace.as_deref(),
            Some("vision")
        );
    }

    #[test]
    fn sync_back_writes_the_source_and_deletes_only_when_asked() {
        let mut s = spec("imagenet");
        s.direction = Direction::SyncBack;
        s.target_namespace = Some("project".into());
        s.delete_at_source = true;
        let plan = Plan::of(&stage(s));
        assert!(plan.cross_namespace);
        assert_eq!(plan.source_claim, "fast-imagenet-source");
        let pod = plan.job("lanes:1").spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.clone().unwrap();
        assert_eq!(&args[..3], ["copy", "/fast", "/source"]);
        assert!(args.contains(&"--delete".to_owned()));
        let source = pod.volumes.unwrap()[0]
            .persistent_volume_claim
            .clone()
            .unwrap();
        assert_eq!(source.read_only, Some(false));
    }
}
