//! A small CSI client over the plugin's unix socket: the `lanes csi …` commands an admin uses
//! to poke a node, and the connection helper the tests and the benchmark use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::controller_client::ControllerClient;
use crate::proto::identity_client::IdentityClient;
use crate::proto::node_client::NodeClient;
use crate::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode,
};
use crate::proto::*;
use crate::units::human;

/// Opens a gRPC channel to the CSI socket at `path`.
pub async fn connect(path: impl AsRef<Path>) -> Result<Channel, tonic::transport::Error> {
    let path = path.as_ref().to_owned();
    // The URI is required by the API but unused: every connection goes to the socket.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        }))
        .await
}

/// A mount capability with the given access mode and flags.
pub fn mount_capability(mode: Mode, flags: &[String]) -> VolumeCapability {
    mount_capability_of(mode, "", flags)
}

/// A mount capability asking for filesystem `fs_type` (empty: the lane's choice).
pub fn mount_capability_of(mode: Mode, fs_type: &str, flags: &[String]) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            mount_flags: flags.to_vec(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// A raw block capability with the given access mode.
pub fn block_capability(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

/// The three service clients on one channel.
#[derive(Debug, Clone)]
pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Clients {
    pub async fn connect(path: impl AsRef<Path>) -> Result<Clients, tonic::transport::Error> {
        let channel = connect(path).await?;
        Ok(Clients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}

/// Where `lanes csi publish` stages a volume unless told otherwise: beside the data
/// directory (`<data-dir>-staging/<id>`), never inside it, where the plugin refuses to mount.
pub fn default_staging(data_dir: &Path, volume_id: &str) -> PathBuf {
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lanes".into());
    data_dir
        .with_file_name(format!("{name}-staging"))
        .join(volume_id.replace('/', "_"))
}

/// Output of a client command: JSON, and the same for people.
#[derive(Debug)]
pub struct Report {
    pub json: Value,
    pub text: String,
}

type CallResult = Result<Report, tonic::Status>;

pub async fn info(c: &mut Clients) -> CallResult {
    let info = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await?
        .into_inner();
    let probe = c.identity.probe(ProbeRequest {}).await?.into_inner();
    let node = c
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .ok()
        .map(|r| r.into_inner());
    let node_id = node.as_ref().map(|n| n.node_id.clone()).unwrap_or_default();
    let ready = probe.ready.unwrap_or(true);
    Ok(Report {
        json: json!({"name": info.name, "version": info.vendor_version, "ready": ready, "node_id": node_id}),
        text: format!(
            "driver   {}\nversion  {}\nready    {ready}\nnode     {}\n",
            info.name,
            info.vendor_version,
            if node_id.is_empty() { "-" } else { &node_id }
        ),
    })
}

pub async fn create_volume(
    c: &mut Clients,
    name: &str,
    capacity: Option<u64>,
    parameters: HashMap<String, String>,
    source: Option<VolumeContentSource>,
) -> CallResult {
    let request = CreateVolumeRequest {
        volume_content_source: source,
        name: name.to_owned(),
        capacity_range: capacity.map(|bytes| CapacityRange {
            required_bytes: bytes as i64,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_capability(Mode::SingleNodeWriter, &[])],
        parameters,
        ..Default::default()
    };
    let volume = c
        .controller
        .create_volume(request)
        .await?
        .into_inner()
        .volume
        .unwrap_or_default();
    Ok(Report {
        json: json!({"volume_id": volume.volume_id, "capacity_bytes": volume.capacity_bytes}),
        text: format!(
            "created {} ({})\n",
            volume.volume_id,
            human(volume.capacity_bytes.max(0) as u64)
        ),
    })
}

/// A content source naming a snapshot or a volume (at most one is given).
pub fn content_source(snapshot: Option<&str>, volume: Option<&str>) -> Option<VolumeContentSource> {
    use volume_content_source::{SnapshotSource, Type, VolumeSource};
    let r#type = match (snapshot, volume) {
        (Some(id), _) => Type::Snapshot(SnapshotSource {
            snapshot_id: id.to_owned(),
        }),
        (None, Some(id)) => Type::Volume(VolumeSource {
            volume_id: id.to_owned(),
        }),
        (None, None) => return None,
    };
    Some(VolumeContentSource {
        r#type: Some(r#type),
    })
}

/// Takes snapshot `name` of a volume.
pub async fn snapshot(c: &mut Clients, volume_id: &str, name: &str) -> CallResult {
    let snapshot = c
        .controller
        .create_snapshot(CreateSnapshotRequest {
            name: name.to_owned(),
            source_volume_id: volume_id.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .snapshot
        .unwrap_or_default();
    Ok(Report {
        json: snapshot_json(&snapshot),
        text: format!(
            "snapshot {} of {} ({})\n",
            snapshot.snapshot_id,
            snapshot.source_volume_id,
            human(snapshot.size_bytes.max(0) as u64)
        ),
    })
}

fn snapshot_json(snapshot: &Snapshot) -> Value {
    json!({
        "snapshot_id": snapshot.snapshot_id,
        "source_volume_id": snapshot.source_volume_id,
        "size_bytes": snapshot.size_bytes,
        "created_unix": snapshot.creation_time.as_ref().map(|t| t.seconds),
        "ready_to_use": snapshot.ready_to_use,
    })
}

pub async fn delete_snapshot(c: &mut Clients, snapshot_id: &str) -> CallResult {
    c.controller
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: snapshot_id.to_owned(),
            ..Default::default()
        })
        .await?;
    Ok(Report {
        json: json!({"deleted": snapshot_id}),
        text: format!("deleted snapshot {snapshot_id}\n"),
    })
}

/// Every snapshot (of `volume`, when given), following the pages.
pub async fn snapshots(c: &mut Clients, volume: Option<&str>) -> CallResult {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .controller
            .list_snapshots(ListSnapshotsRequest {
                max_entries: 100,
                starting_token: token.clone(),
                source_volume_id: volume.unwrap_or_default().to_owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        entries.extend(page.entries.into_iter().filter_map(|e| e.snapshot));
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut text = format!("{:<40} {:<40} {:>10}\n", "SNAPSHOT", "SOURCE", "SIZE");
    for s in &entries {
        text.push_str(&format!(
            "{:<40} {:<40} {:>10}\n",
            s.snapshot_id,
            s.source_volume_id,
            human(s.size_bytes.max(0) as u64)
        ));
    }
    Ok(Report {
        json: Value::Array(entries.iter().map(snapshot_json).collect()),
        text,
    })
}

/// DeleteVolume; a volume that does not exist is said so (the CSI answer is still OK).
pub async fn delete_volume(c: &mut Clients, volume_id: &str) -> CallResult {
    let existed = match c
        .controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: volume_id.to_owned(),
        })
        .await
    {
        Ok(_) => true,
        Err(status) if status.code() == tonic::Code::NotFound => false,
        // Let DeleteVolume say what is wrong with the ID.
        Err(_) => true,
    };
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: volume_id.to_owned(),
            ..Default::default()
        })
        .await?;
    Ok(Report {
        json: json!({"deleted": volume_id, "existed": existed}),
        text: match existed {
            true => format!("deleted {volume_id}\n"),
            false => format!("{volume_id} does not exist; nothing to delete\n"),
        },
    })
}

/// ControllerExpandVolume, then NodeExpandVolume at `path` when the lane asks for it.
pub async fn expand_volume(
    c: &mut Clients,
    volume_id: &str,
    bytes: u64,
    path: Option<&Path>,
) -> CallResult {
    let mut response = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: volume_id.to_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes: bytes as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut node_expanded = false;
    if let (true, Some(path)) = (response.node_expansion_required, path) {
        let grown = c
            .node
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: volume_id.to_owned(),
                volume_path: path.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: bytes as i64,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await?
            .into_inner();
        response.capacity_bytes = grown.capacity_bytes;
        node_expanded = true;
    }
    Ok(Report {
        json: json!({
            "volume_id": volume_id,
            "capacity_bytes": response.capacity_bytes,
            "node_expansion_required": response.node_expansion_required && !node_expanded,
        }),
        text: format!(
            "{volume_id} is now {}{}\n",
            human(response.capacity_bytes.max(0) as u64),
            match (response.node_expansion_required, node_expanded) {
                (true, false) => "; its filesystem grows when the node expands it (--path)",
                _ => "",
            }
        ),
    })
}

pub async fn list(c: &mut Clients) -> CallResult {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .controller
            .list_volumes(ListVolumesRequest {
                max_entries: 100,
                starting_token: token.clone(),
            })
            .await?
            .into_inner();
        entries.extend(page.entries);
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let mut text = format!("{:<50} {:>12}  {}\n", "VOLUME", "CAPACITY", "CONDITION");
    let mut rows = Vec::new();
    for entry in entries {
        let volume = entry.volume.unwrap_or_default();
        let condition = entry.status.and_then(|s| s.volume_condition);
        let healthy = condition.as_ref().is_none_or(|c| !c.abnormal);
        text.push_str(&format!(
            "{:<50} {:>12}  {}\n",
            volume.volume_id,
            human(volume.capacity_bytes.max(0) as u64),
            if healthy {
                "ok".to_owned()
            } else {
                condition.map(|c| c.message).unwrap_or_default()
            }
        ));
        rows.push(json!({"volume_id": volume.volume_id, "capacity_bytes": volume.capacity_bytes, "healthy": healthy}));
    }
    Ok(Report {
        json: Value::Array(rows),
        text,
    })
}

/// Stages (at `staging`, created if missing) and publishes a volume at `target`.
/// Publishes an inline (ephemeral) dataset volume at `target`, as kubelet does for a pod's
/// `csi:` volume.
pub async fn publish_inline(
    c: &mut Clients,
    volume_id: &str,
    target: &Path,
    dataset: &str,
    readonly: bool,
    flags: &[String],
) -> CallResult {
    let context = [
        ("dataset", dataset),
        ("csi.storage.k8s.io/ephemeral", "true"),
    ];
    c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_capability(Mode::SingleNodeWriter, flags)),
            readonly,
            volume_context: context
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
        .await?;
    Ok(Report {
        json: json!({"volume_id": volume_id, "target_path": target, "dataset": dataset, "readonly": readonly}),
        text: format!("published dataset {dataset} at {}\n", target.display()),
    })
}

pub async fn publish(
    c: &mut Clients,
    volume_id: &str,
    target: &Path,
    staging: &Path,
    readonly: bool,
    capability: VolumeCapability,
) -> CallResult {
    std::fs::create_dir_all(staging)
        .map_err(|e| tonic::Status::internal(format!("create {}: {e}", staging.display())))?;
    c.node
        .node_stage_volume(NodeStageVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability.clone()),
            ..Default::default()
        })
        .await?;
    c.node
        .node_publish_volume(NodePublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability),
            readonly,
            ..Default::default()
        })
        .await?;
    Ok(Report {
        json: json!({"volume_id": volume_id, "target_path": target, "staging_path": staging, "readonly": readonly}),
        text: format!(
            "published {volume_id} at {}{}\n",
            target.display(),
            if readonly { " (read-only)" } else { "" }
        ),
    })
}

/// Unpublishes a volume from `target` and unstages it from `staging`.
pub async fn unpublish(
    c: &mut Clients,
    volume_id: &str,
    target: &Path,
    staging: &Path,
) -> CallResult {
    let mounted = crate::mount::mountinfo::read()
        .map(|table| table.iter().any(|e| e.mount_point == target))
        .unwrap_or(true);
    c.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            target_path: target.display().to_string(),
        })
        .await?;
    // Inline dataset volumes were never staged.
    if crate::lane::VolumeId::parse(volume_id).is_ok() {
        c.node
            .node_unstage_volume(NodeUnstageVolumeRequest {
                volume_id: volume_id.to_owned(),
                staging_target_path: staging.display().to_string(),
            })
            .await?;
    }
    Ok(Report {
        json: json!({"volume_id": volume_id, "target_path": target, "was_published": mounted}),
        text: match mounted {
            true => format!("unpublished {volume_id} from {}\n", target.display()),
            false => format!(
                "nothing was mounted at {}; {volume_id} is not published there (unstaged)\n",
                target.display()
            ),
        },
    })
}

pub async fn stats(c: &mut Clients, volume_id: &str, path: &Path) -> CallResult {
    let response = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: volume_id.to_owned(),
            volume_path: path.display().to_string(),
            staging_target_path: String::new(),
        })
        .await?
        .into_inner();
    let find = |unit: volume_usage::Unit| {
        response
            .usage
            .iter()
            .find(|u| u.unit == unit as i32)
            .cloned()
            .unwrap_or_default()
    };
    let (bytes, inodes) = (
        find(volume_usage::Unit::Bytes),
        find(volume_usage::Unit::Inodes),
    );
    let condition = response.volume_condition.unwrap_or_default();
    Ok(Report {
        json: json!({
            "bytes": {"total": bytes.total, "used": bytes.used, "available": bytes.available},
            "inodes": {"total": inodes.total, "used": inodes.used, "available": inodes.available},
            "abnormal": condition.abnormal,
            "message": condition.message,
        }),
        text: format!(
            "bytes    {} used of {} ({} available)\ninodes   {} used of {} ({} available)\ncondition {}\n",
            human(bytes.used.max(0) as u64),
            human(bytes.total.max(0) as u64),
            human(bytes.available.max(0) as u64),
            inodes.used,
            inodes.total,
            inodes.available,
            if condition.abnormal {
                condition.message
            } else {
                "ok".into()
            }
        ),
    })
}
