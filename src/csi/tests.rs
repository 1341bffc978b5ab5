//! The gRPC handlers without root: table-driven tests with fake lanes (and the fake mounter
//! under the local lane's node half). They check what the edge owns — required fields first,
//! confined paths, the lane's capability rules, routing to the right lane, one call per
//! volume, and the mapping of every lane error to its code — and that a refused request never
//! reaches a lane.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Code, Request};

use super::controller::ControllerService;
use super::node::NodeService;
use super::{Plugin, Roles};
use crate::lane::capability::{Access, AccessType, Capability};
use crate::lane::controller::{ControllerLane, Segments};
use crate::lane::ledger::{Ledger, VolumeRecord};
use crate::lane::local::{CreateRequest, Space};
use crate::lane::node::{NodeContext, NodeError, NodeLane, Publish, Stage, Stats, Unpublished};
use crate::lane::{ControllerLanes, NodeLanes, Range, VolumeId, VolumeMeta};
use crate::mount::fake::FakeMounter;
use crate::mount::safe::{Confinement, RequestPath};
use crate::proto::controller_server::Controller;
use crate::proto::node_server::Node;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::*;

/// What a fake node lane answers, and what it was asked.
#[derive(Default)]
struct FakeNode {
    kind: &'static str,
    calls: Mutex<Vec<String>>,
    fail: Mutex<Option<fn() -> NodeError>>,
    /// Held by publish until released (to make calls overlap).
    hold: Option<Arc<tokio::sync::Notify>>,
}

impl FakeNode {
    fn new(kind: &'static str) -> Arc<FakeNode> {
        Arc::new(FakeNode {
            kind,
            ..Default::default()
        })
    }

    fn answer(&self, call: String) -> Result<(), NodeError> {
        self.calls.lock().unwrap().push(call);
        match *self.fail.lock().unwrap() {
            Some(error) => Err(error()),
            None => Ok(()),
        }
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl NodeLane for FakeNode {
    fn kind(&self) -> &'static str {
        self.kind
    }
    fn access(&self, capability: &Capability) -> Result<Access, String> {
        crate::lane::local::access::access(capability)
    }
    async fn stage(&self, request: Stage<'_>) -> Result<(), NodeError> {
        self.answer(format!("stage {}", request.volume_id))
    }
    async fn unstage(&self, volume_id: &str, _staging: &RequestPath) -> Result<(), NodeError> {
        self.answer(format!("unstage {volume_id}"))
    }
    async fn publish(&self, request: Publish<'_>) -> Result<(), NodeError> {
        if let Some(hold) = &self.hold {
            hold.notified().await;
        }
        self.answer(format!("publish {}", request.volume_id))
    }
    async fn unpublish(
        &self,
        record: VolumeRecord,
        _target: &RequestPath,
    ) -> Result<Unpublished, NodeError> {
        self.answer(format!("unpublish {}", record.volume_id))
            .map(|()| Unpublished::Kept)
    }
    async fn stats(&self, record: &VolumeRecord, _path: &RequestPath) -> Result<Stats, NodeError> {
        self.answer(format!("stats {}", record.volume_id))?;
        Ok(Stats {
            usage: vec![],
            abnormal: None,
            message: "fine".into(),
        })
    }
    async fn expand(&self, volume_id: &str, _path: &RequestPath) -> Result<u64, NodeError> {
        self.answer(format!("expand {volume_id}")).map(|()| 42)
    }
}

/// An in-memory controller lane on node `node-a`.
#[derive(Default)]
struct FakeController {
    volumes: Mutex<BTreeMap<String, VolumeMeta>>,
    fail: Mutex<Option<fn() -> crate::lane::Error>>,
}

impl FakeController {
    fn failing(&self) -> crate::lane::Result<()> {
        match *self.fail.lock().unwrap() {
            Some(error) => Err(error()),
            None => Ok(()),
        }
    }
}

fn node_a() -> Segments {
    [(
        crate::lane::local::TOPOLOGY_KEY.to_owned(),
        "node-a".to_owned(),
    )]
    .into()
}

#[async_trait::async_trait]
impl ControllerLane for FakeController {
    fn kind(&self) -> &'static str {
        "local"
    }
    fn access(&self, capability: &Capability) -> Result<Access, String> {
        crate::lane::local::access::access(capability)
    }
    fn place(&self, requisite: &[Segments]) -> Option<Segments> {
        (requisite.is_empty() || requisite.contains(&node_a())).then(node_a)
    }
    fn topology(&self, _meta: &VolumeMeta) -> Segments {
        node_a()
    }
    async fn create(&self, request: CreateRequest) -> crate::lane::Result<VolumeMeta> {
        self.failing()?;
        let id = VolumeId::for_name("local", &request.name)?;
        let meta = VolumeMeta {
            name: request.name.clone(),
            id: id.to_string(),
            capacity_bytes: request.range.resolve(1 << 20, 1 << 40)?,
            params: request.params,
            node_id: "node-a".into(),
            created_unix: 0,
            project_id: None,
            dataset: request.dataset,
            block: None,
            content_source: None,
        };
        Ok(self
            .volumes
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_insert(meta)
            .clone())
    }
    async fn get(&self, id: &VolumeId) -> crate::lane::Result<VolumeMeta> {
        self.failing()?;
        self.volumes
            .lock()
            .unwrap()
            .get(&id.to_string())
            .cloned()
            .ok_or_else(|| crate::lane::Error::UnknownVolume(id.to_string()))
    }
    async fn list(&self) -> crate::lane::Result<Vec<VolumeMeta>> {
        Ok(self.volumes.lock().unwrap().values().cloned().collect())
    }
    async fn delete(&self, id: &VolumeId) -> crate::lane::Result<()> {
        self.failing()?;
        self.volumes.lock().unwrap().remove(&id.to_string());
        Ok(())
    }
    async fn expand(&self, _id: &VolumeId, range: Range) -> crate::lane::Result<(u64, bool)> {
        self.failing()?;
        Ok((range.required as u64, false))
    }
    async fn capacity(
        &self,
        _profile: &str,
        _segments: Option<&Segments>,
    ) -> crate::lane::Result<Option<Space>> {
        Ok(Some(Space {
            total_bytes: 100,
            available_bytes: 60,
        }))
    }
    async fn condition(&self, _id: &VolumeId) -> crate::lane::Result<Option<String>> {
        Ok(None)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    root: PathBuf,
    plugin: Arc<Plugin>,
    local: Arc<FakeNode>,
    inline: Arc<FakeNode>,
    controller: Arc<FakeController>,
}

fn harness(local: Arc<FakeNode>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let data_dir = root.join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    let config = crate::config::Config::embedded(&data_dir);
    let mounter: Arc<dyn crate::mount::Mounter> = Arc::new(FakeMounter::default());
    let ctx = Arc::new(NodeContext {
        mounter: mounter.clone(),
        ledger: Ledger::open(&data_dir).unwrap(),
        mount_timeout: Duration::from_secs(5),
        failpoint: Default::default(),
        data_dir: data_dir.clone(),
        cache: None,
    });
    let inline = FakeNode::new(crate::lane::dataset::LANE);
    let controller = Arc::new(FakeController::default());
    let plugin = Arc::new(Plugin {
        driver_name: "lanes.csi.dev".into(),
        node_id: "node-a".into(),
        roles: Roles {
            controller: true,
            node: true,
        },
        expand_at_node: false,
        controllers: ControllerLanes::new([controller.clone() as Arc<dyn ControllerLane>]),
        mounter,
        inflight: Default::default(),
        confinement: Confinement::new([data_dir.clone()], [root.clone()]),
        lanes: NodeLanes::new(ctx, [local.clone() as Arc<dyn NodeLane>, inline.clone()]),
        profiles: config.profiles.clone(),
        metrics: Arc::new(crate::metrics::Metrics::new()),
        mount_timeout: Duration::from_secs(5),
        failpoint: Default::default(),
        data_dir,
        sources: Arc::new(crate::dataset::pin::Sources::new(
            config.datasets.clone(),
            1,
        )),
        access: Arc::new(crate::access::directory::Directory::new(
            Arc::new(crate::kubeapi::Kube::none(
                "no Kubernetes API in handler tests",
            )),
            "node",
            "lanes.csi.dev",
            Default::default(),
        )),
        kube: Arc::new(crate::kubeapi::Kube::none(
            "no Kubernetes API in handler tests",
        )),
    });
    std::fs::create_dir_all(root.join("pods")).unwrap();
    Harness {
        _dir: dir,
        root,
        plugin,
        local,
        inline,
        controller,
    }
}

fn capability(mode: Mode) -> Option<VolumeCapability> {
    Some(crate::cli::csi::mount_capability(mode, &[]))
}

fn block() -> Option<VolumeCapability> {
    Some(VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        access_mode: Some(volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    })
}

fn path(root: &Path, rel: &str) -> String {
    root.join(rel).display().to_string()
}

#[tokio::test]
async fn refused_node_requests_never_reach_a_lane() {
    let h = harness(FakeNode::new("local"));
    let node = NodeService(h.plugin.clone());
    let pods = path(&h.root, "pods");
    let stage = |id: &str, staging: &str, cap| NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.into(),
        volume_capability: cap,
        ..Default::default()
    };
    let publish = |id: &str, target: &str, cap| NodePublishVolumeRequest {
        volume_id: id.into(),
        target_path: target.into(),
        staging_target_path: pods.clone(),
        volume_capability: cap,
        ..Default::default()
    };
    let rwo = || capability(Mode::SingleNodeWriter);
    let cases: Vec<(&str, Result<(), tonic::Status>, Code)> = vec![
        (
            "stage: no id",
            node.node_stage_volume(Request::new(stage("", &pods, rwo())))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stage: relative path",
            node.node_stage_volume(Request::new(stage("local/a", "pods", rwo())))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stage: no capability",
            node.node_stage_volume(Request::new(stage("local/a", &pods, None)))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stage: block",
            node.node_stage_volume(Request::new(stage("local/a", &pods, block())))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stage: multi-node",
            node.node_stage_volume(Request::new(stage(
                "local/a",
                &pods,
                capability(Mode::MultiNodeMultiWriter),
            )))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stage: bad id",
            node.node_stage_volume(Request::new(stage("local/../x", &pods, rwo())))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stage: other driver",
            node.node_stage_volume(Request::new(stage("nfs/x", &pods, rwo())))
                .await
                .map(drop),
            Code::NotFound,
        ),
        (
            "stage: data dir",
            node.node_stage_volume(Request::new(stage(
                "local/a",
                &path(&h.root, "data/x"),
                rwo(),
            )))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
        (
            "publish: no target",
            node.node_publish_volume(Request::new(publish("local/a", "", rwo())))
                .await
                .map(drop),
            Code::InvalidArgument,
        ),
        (
            "publish: dot-dot",
            node.node_publish_volume(Request::new(publish(
                "local/a",
                &path(&h.root, "pods/../x"),
                rwo(),
            )))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
        (
            "publish: unknown mode",
            node.node_publish_volume(Request::new(publish(
                "local/a",
                &path(&h.root, "pods/t"),
                Some(VolumeCapability {
                    access_mode: Some(volume_capability::AccessMode { mode: 99 }),
                    ..capability(Mode::SingleNodeWriter).unwrap()
                }),
            )))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
        (
            "stats: no id",
            node.node_get_volume_stats(Request::new(NodeGetVolumeStatsRequest {
                volume_path: pods.clone(),
                ..Default::default()
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
        (
            "expand: no path",
            node.node_expand_volume(Request::new(NodeExpandVolumeRequest {
                volume_id: "local/a".into(),
                ..Default::default()
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
        (
            "unstage: no path",
            node.node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
                volume_id: "local/a".into(),
                ..Default::default()
            }))
            .await
            .map(drop),
            Code::InvalidArgument,
        ),
    ];
    for (desc, result, code) in cases {
        let status = result.expect_err(desc);
        assert_eq!(status.code(), code, "{desc}: {}", status.message());
    }
    assert!(h.local.calls().is_empty(), "{:?}", h.local.calls());
    assert!(h.inline.calls().is_empty());
    // A volume of another driver: unpublish is a no-op that reaches no lane.
    node.node_unpublish_volume(Request::new(NodeUnpublishVolumeRequest {
        volume_id: "nfs/x".into(),
        target_path: path(&h.root, "pods/t"),
    }))
    .await
    .unwrap();
    assert!(h.local.calls().is_empty());
}

#[tokio::test]
async fn node_requests_go_to_the_right_lane_and_lane_errors_map_to_their_codes() {
    let h = harness(FakeNode::new("local"));
    let node = NodeService(h.plugin.clone());
    let target = path(&h.root, "pods/t");
    let inline = NodePublishVolumeRequest {
        volume_id: "csi-1234".into(),
        target_path: target.clone(),
        volume_capability: capability(Mode::SingleNodeWriter),
        volume_context: HashMap::from([
            ("dataset".into(), "imagenet:v1".into()),
            ("csi.storage.k8s.io/ephemeral".into(), "true".into()),
        ]),
        ..Default::default()
    };
    node.node_publish_volume(Request::new(inline))
        .await
        .unwrap();
    assert_eq!(h.inline.calls(), vec!["publish csi-1234"]);
    let stage = NodeStageVolumeRequest {
        volume_id: "local/pvc".into(),
        staging_target_path: path(&h.root, "pods"),
        volume_capability: capability(Mode::SingleNodeWriter),
        ..Default::default()
    };
    node.node_stage_volume(Request::new(stage.clone()))
        .await
        .unwrap();
    assert_eq!(h.local.calls(), vec!["stage local/pvc"]);

    let errors: [(fn() -> NodeError, Code); 8] = [
        (
            || NodeError::NotStaged {
                volume: "v".into(),
                staging: "s".into(),
            },
            Code::FailedPrecondition,
        ),
        (
            || NodeError::Conflict {
                volume: "v".into(),
                target: "t".into(),
                why: "w".into(),
            },
            Code::FailedPrecondition,
        ),
        (
            || NodeError::Repeated {
                volume: "v".into(),
                how: "published",
                path: "p".into(),
            },
            Code::AlreadyExists,
        ),
        (
            || NodeError::Occupied {
                path: "p".into(),
                fs_type: "f".into(),
                mounted: "m".into(),
            },
            Code::AlreadyExists,
        ),
        (
            || NodeError::NotMounted {
                volume: "v".into(),
                path: "p".into(),
            },
            Code::NotFound,
        ),
        (
            || {
                crate::mount::Error::Timeout {
                    op: "mount",
                    path: "/x".into(),
                    seconds: 1,
                }
                .into()
            },
            Code::DeadlineExceeded,
        ),
        (
            || crate::lane::Error::UnknownVolume("v".into()).into(),
            Code::NotFound,
        ),
        (
            || crate::cache::Error::new(crate::error::Kind::DataLoss, "damaged").into(),
            Code::DataLoss,
        ),
    ];
    for (error, code) in errors {
        *h.local.fail.lock().unwrap() = Some(error);
        let status = node
            .node_stage_volume(Request::new(stage.clone()))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
    }
}

#[tokio::test]
async fn one_call_per_volume_at_the_edge() {
    let hold = Arc::new(tokio::sync::Notify::new());
    let local = Arc::new(FakeNode {
        kind: "local",
        hold: Some(hold.clone()),
        ..Default::default()
    });
    let h = harness(local);
    let node = NodeService(h.plugin.clone());
    let publish = NodePublishVolumeRequest {
        volume_id: "local/pvc".into(),
        target_path: path(&h.root, "pods/t"),
        staging_target_path: path(&h.root, "pods"),
        volume_capability: capability(Mode::SingleNodeWriter),
        ..Default::default()
    };
    let first = {
        let (node, publish) = (node.clone(), publish.clone());
        tokio::spawn(async move { node.node_publish_volume(Request::new(publish)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let status = node
        .node_unstage_volume(Request::new(NodeUnstageVolumeRequest {
            volume_id: "local/pvc".into(),
            staging_target_path: path(&h.root, "pods"),
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted);
    let controller = ControllerService(h.plugin.clone());
    let status = controller
        .delete_volume(Request::new(DeleteVolumeRequest {
            volume_id: "local/pvc".into(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "delete racing publish");
    hold.notify_one();
    first.await.unwrap().unwrap();
    assert_eq!(
        h.local.calls(),
        vec!["publish local/pvc"],
        "the refused calls reached no lane"
    );
}

fn create(name: &str, parameters: &[(&str, &str)]) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![capability(Mode::SingleNodeWriter).unwrap()],
        parameters: parameters
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn controller_handlers_check_route_page_and_map() {
    let h = harness(FakeNode::new("local"));
    let c = ControllerService(h.plugin.clone());
    let made = c
        .create_volume(Request::new(create("pvc-1", &[])))
        .await
        .unwrap()
        .into_inner();
    let volume = made.volume.unwrap();
    assert_eq!(volume.volume_id, "local/pvc-1");
    assert_eq!(
        volume.accessible_topology[0].segments,
        node_a().into_iter().collect()
    );

    let elsewhere = CreateVolumeRequest {
        accessibility_requirements: Some(TopologyRequirement {
            requisite: vec![Topology {
                segments: [(
                    crate::lane::local::TOPOLOGY_KEY.to_owned(),
                    "node-b".to_owned(),
                )]
                .into(),
            }],
            preferred: vec![],
        }),
        ..create("pvc-2", &[])
    };
    let multi = CreateVolumeRequest {
        volume_capabilities: vec![capability(Mode::MultiNodeMultiWriter).unwrap()],
        ..create("pvc-3", &[])
    };
    let cases: Vec<(&str, CreateVolumeRequest, Code)> = vec![
        (
            "unknown profile",
            create("pvc-4", &[("profile", "gold")]),
            Code::InvalidArgument,
        ),
        (
            "unknown parameter",
            create("pvc-5", &[("replicas", "3")]),
            Code::InvalidArgument,
        ),
        ("topology elsewhere", elsewhere, Code::ResourceExhausted),
        (
            "capability the lane does not serve",
            multi,
            Code::InvalidArgument,
        ),
        ("no name", create("", &[]), Code::InvalidArgument),
    ];
    for (desc, request, code) in cases {
        let status = c.create_volume(Request::new(request)).await.unwrap_err();
        assert_eq!(status.code(), code, "{desc}: {}", status.message());
    }
    assert_eq!(
        h.controller.volumes.lock().unwrap().len(),
        1,
        "refused creates made nothing"
    );

    // Paging over the lane's volumes, with cursor tokens.
    for i in 2..6 {
        c.create_volume(Request::new(create(&format!("pvc-{i}"), &[])))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_volumes(Request::new(ListVolumesRequest {
                max_entries: 2,
                starting_token: token.clone(),
            }))
            .await
            .unwrap()
            .into_inner();
        seen.extend(
            page.entries
                .iter()
                .map(|e| e.volume.as_ref().unwrap().volume_id.clone()),
        );
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert_eq!(seen.len(), 5);
    let foreign = c
        .list_volumes(Request::new(ListVolumesRequest {
            max_entries: 2,
            starting_token: "page-7".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), Code::Aborted);

    // Lane errors map to their codes; other drivers' volumes delete as OK.
    c.delete_volume(Request::new(DeleteVolumeRequest {
        volume_id: "nfs/elsewhere".into(),
        ..Default::default()
    }))
    .await
    .unwrap();
    let errors: [(fn() -> crate::lane::Error, Code); 3] = [
        (
            || crate::lane::Error::InUse {
                id: "local/pvc-1".into(),
                path: "/p".into(),
            },
            Code::FailedPrecondition,
        ),
        (
            || crate::lane::Error::Timeout {
                op: "delete",
                seconds: 30,
            },
            Code::DeadlineExceeded,
        ),
        (
            || crate::lane::Error::CapacityOutOfRange {
                requested: 2,
                max: 1,
            },
            Code::OutOfRange,
        ),
    ];
    for (error, code) in errors {
        *h.controller.fail.lock().unwrap() = Some(error);
        let status = c
            .delete_volume(Request::new(DeleteVolumeRequest {
                volume_id: "local/pvc-1".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(status.code(), code, "{}", status.message());
    }
    *h.controller.fail.lock().unwrap() = None;

    // Capabilities the lane cannot serve are "not confirmed", not an error.
    let validated = c
        .validate_volume_capabilities(Request::new(ValidateVolumeCapabilitiesRequest {
            volume_id: "local/pvc-1".into(),
            volume_capabilities: vec![block().unwrap()],
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(
        validated.confirmed.is_none() && validated.message.contains("block"),
        "{}",
        validated.message
    );
    let capacity = c
        .get_capacity(Request::new(GetCapacityRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(capacity.available_capacity, 60);
}

/// The local lane's node half over the fake mounter, without root: the ledger and the mount
/// table stay in step through a whole publication cycle.
#[tokio::test]
async fn the_local_node_lane_over_the_fake_mounter() {
    use crate::lane::local::node::LocalNode;
    use crate::lane::local::{LocalLane, LocalSettings};
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let data_dir = root.join("data");
    let settings = LocalSettings {
        default_capacity: 1 << 20,
        max_capacity: Some(1 << 30),
    };
    let lane = Arc::new(LocalLane::open(&data_dir, "node-a", settings).unwrap());
    let meta = lane
        .create(&CreateRequest {
            name: "pvc-f".into(),
            range: Range::default(),
            params: Default::default(),
            dataset: None,
            source: None,
        })
        .unwrap();
    let fake = Arc::new(FakeMounter::default());
    let ctx = Arc::new(NodeContext {
        mounter: fake.clone(),
        ledger: Ledger::open(&data_dir).unwrap(),
        mount_timeout: Duration::from_secs(5),
        failpoint: Default::default(),
        data_dir: data_dir.clone(),
        cache: None,
    });
    let node = LocalNode::new(ctx.clone(), lane);
    let confinement = Confinement::new([data_dir.clone()], []);
    std::fs::create_dir_all(root.join("staging")).unwrap();
    std::fs::create_dir_all(root.join("pods")).unwrap();
    let staging = confinement
        .check("staging_target_path", &path(&root, "staging"))
        .unwrap();
    let target = confinement
        .check("target_path", &path(&root, "pods/t"))
        .unwrap();
    let rwo = Capability {
        access_type: AccessType::Mount {
            fs_type: String::new(),
            flags: vec![],
            mount_group: String::new(),
        },
        mode: crate::lane::capability::AccessMode::SingleNodeWriter,
    };
    let context = HashMap::new();
    for _ in 0..2 {
        node.stage(Stage {
            volume_id: &meta.id,
            staging: &staging,
            capability: &rwo,
        })
        .await
        .unwrap();
        node.publish(Publish {
            volume_id: &meta.id,
            target: &target,
            staging: Some(&staging),
            capability: &rwo,
            readonly: true,
            context: &context,
        })
        .await
        .unwrap();
    }
    assert_eq!(
        fake.mount_points(),
        vec![root.join("staging"), root.join("pods/t")]
    );
    let record = ctx.ledger.load(&meta.id).unwrap();
    assert_eq!(record.staged.len(), 1);
    assert!(
        record
            .publication(&root.join("pods/t"))
            .unwrap()
            .created_target
    );
    let other = Publish {
        volume_id: &meta.id,
        target: &target,
        staging: Some(&staging),
        capability: &rwo,
        readonly: false,
        context: &context,
    };
    assert_eq!(
        node.publish(other).await.unwrap_err().kind(),
        crate::error::Kind::AlreadyExists
    );
    node.unpublish(record, &target).await.unwrap();
    node.unstage(&meta.id, &staging).await.unwrap();
    assert!(fake.mount_points().is_empty());
    assert!(
        !root.join("pods/t").exists(),
        "the target it made is removed"
    );
    assert!(ctx.ledger.load(&meta.id).unwrap().is_idle());
}
