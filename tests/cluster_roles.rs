//! How the roles split in a cluster, against the real binary: the controller Deployment
//! provisions only the shared lanes; each node plugin provisions its own node-local lanes on a
//! second socket under a driver name of their own (for a csi-provisioner with
//! `--node-deployment`), reports their capacity for its node only, and grows them itself at
//! NodeExpandVolume.

mod common;

use common::*;
use lanes::cli::csi::{Clients, mount_capability_of};
use lanes::proto::controller_service_capability::rpc::Type as Rpc;
use lanes::proto::plugin_capability::service::Type as Service;
use lanes::proto::*;
use volume_capability::access_mode::Mode;

const MIB: i64 = 1 << 20;
const TOPOLOGY_KEY: &str = "topology.lanes.csi.dev/node";

const CONFIG: &str = "\
profiles:
  local:
    lane: local
    default: true
  fast:
    lane: fast-rwo
    block: {fs_type: xfs, provisioning: thin}
";

fn on(node: &str) -> Topology {
    Topology {
        segments: [(TOPOLOGY_KEY.to_owned(), node.to_owned())].into(),
    }
}

fn profile(name: &str) -> std::collections::HashMap<String, String> {
    [("profile".to_owned(), name.to_owned())].into()
}

async fn plugin_name(c: &mut Clients) -> String {
    c.identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .name
}

async fn serves_controller(c: &mut Clients) -> bool {
    c.identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .iter()
        .any(|cap| {
            matches!(&cap.r#type, Some(plugin_capability::Type::Service(s))
                if s.r#type == Service::ControllerService as i32)
        })
}

async fn controller_rpcs(c: &mut Clients) -> Vec<i32> {
    c.controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|cap| match cap.r#type {
            Some(controller_service_capability::Type::Rpc(rpc)) => Some(rpc.r#type),
            _ => None,
        })
        .collect()
}

async fn capacity_on(c: &mut Clients, node: &str) -> i64 {
    c.controller
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![rwo()],
            parameters: profile("local"),
            accessible_topology: Some(on(node)),
        })
        .await
        .unwrap()
        .into_inner()
        .available_capacity
}

#[tokio::test]
async fn the_controller_deployment_provisions_only_shared_lanes() {
    let plugin = Plugin::role(&["controller", "--lanes", "shared"], CONFIG);
    let mut c = plugin.clients().await;
    for (name, lane) in [("local", "local"), ("fast", "fast-rwo")] {
        let mut request = create_request(&format!("pvc-{name}"), 16 * MIB);
        request.parameters = profile(name);
        let refused = c.controller.create_volume(request).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        let message = refused.message();
        assert!(
            message.contains(&format!("lane {lane}")) && message.contains("local.lanes.csi.dev"),
            "{message}"
        );
    }
    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.entries.is_empty(), "{listed:?}");
    assert!(
        !plugin.data_dir.join("volumes/pvc-local").exists(),
        "a refused create leaves nothing"
    );
}

#[tokio::test]
async fn a_node_plugin_provisions_its_node_local_lanes_on_a_socket_of_their_own() {
    if !privileged("node-local provisioning (loop devices, xfs)") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let local_socket = root.path().join("local/csi.sock");
    let local_endpoint = format!("unix://{}", local_socket.display());
    let plugin = Plugin::role(&["node", "--local-endpoint", &local_endpoint], CONFIG);
    let mut shared = plugin.clients().await;
    let mut local = Clients::connect(&local_socket).await.unwrap();

    // Two drivers: the node plugin of lanes.csi.dev, and the controller + node of
    // local.lanes.csi.dev for this node.
    assert_eq!(plugin_name(&mut shared).await, "lanes.csi.dev");
    assert!(!serves_controller(&mut shared).await);
    assert_eq!(plugin_name(&mut local).await, "local.lanes.csi.dev");
    assert!(serves_controller(&mut local).await);
    let rpcs = controller_rpcs(&mut local).await;
    assert!(rpcs.contains(&(Rpc::CreateDeleteVolume as i32)));
    assert!(rpcs.contains(&(Rpc::GetCapacity as i32)));
    assert!(
        !rpcs.contains(&(Rpc::ExpandVolume as i32)),
        "the node grows its volumes at NodeExpandVolume: no controller step"
    );
    let info = local
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.accessible_topology, Some(on("test-node")));

    // Capacity, as csi-provisioner --enable-capacity asks for it: this node's only.
    assert!(capacity_on(&mut local, "test-node").await > 0);
    assert_eq!(capacity_on(&mut local, "another-node").await, 0);

    // The selected node's provisioner creates a volume there.
    let mut request = create_request("pvc-scratch", 320 * MIB);
    request.parameters = profile("fast");
    request.volume_capabilities = vec![mount_capability_of(Mode::SingleNodeWriter, "xfs", &[])];
    request.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![on("test-node")],
        preferred: vec![on("test-node")],
    });
    let volume = local
        .controller
        .create_volume(request.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(volume.accessible_topology, vec![on("test-node")]);
    let id = volume.volume_id;
    request.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![on("another-node")],
        preferred: vec![],
    });
    request.name = "pvc-elsewhere".into();
    assert_code(
        local.controller.create_volume(request).await,
        tonic::Code::ResourceExhausted,
        "a volume for another node is not made here",
    );

    // Staged and published through the local driver's node service, then grown online by
    // NodeExpandVolume alone: the disk image, the loop device and xfs.
    let staging = plugin.dir("staging");
    let target = plugin.dir("pod").join("scratch");
    let capability = mount_capability_of(Mode::SingleNodeWriter, "xfs", &[]);
    local
        .node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_capability: Some(capability.clone()),
            ..stage_request(&id, &staging)
        })
        .await
        .unwrap();
    local
        .node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_capability: Some(capability.clone()),
            ..publish_request(&id, &staging, &target, false)
        })
        .await
        .unwrap();
    let before = total_bytes(&mut local, &id, &target).await;
    assert!(before < 320 * MIB, "{before}");
    for _ in 0..2 {
        let grown = local
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 512 * MIB,
                    limit_bytes: 0,
                }),
                volume_capability: Some(capability.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            grown.capacity_bytes,
            512 * MIB,
            "grown, and a repeat is a no-op"
        );
    }
    let after = total_bytes(&mut local, &id, &target).await;
    assert!(after > before + 150 * MIB, "{before} -> {after}");

    // The shared driver's socket has no controller: nothing is provisioned through it.
    assert_code(
        shared
            .controller
            .create_volume(create_request("pvc-nope", MIB))
            .await,
        tonic::Code::Unimplemented,
        "no controller on the shared driver's node socket",
    );

    local
        .node
        .node_unpublish_volume(unpublish_request(&id, &target))
        .await
        .unwrap();
    local
        .node
        .node_unstage_volume(unstage_request(&id, &staging))
        .await
        .unwrap();
    local
        .controller
        .delete_volume(delete_request(&id))
        .await
        .unwrap();
    assert!(!plugin.data_dir.join("block/pvc-scratch").exists());
}
