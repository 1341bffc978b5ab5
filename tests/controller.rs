//! The Identity and Controller services of the real binary, over its unix socket.

mod common;

use common::*;
use lanes::cli::csi::mount_capability;
use lanes::proto::plugin_capability::{self, service, volume_expansion};
use lanes::proto::volume_capability::access_mode::Mode;
use lanes::proto::*;
use tonic::Code;

#[tokio::test]
async fn identity_reports_name_version_capabilities_and_readiness() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let info = c
        .identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "lanes.csi.dev");
    // Semver with the commit as build metadata: 0.1.0+<commit>.
    let (version, commit) = info.vendor_version.split_once('+').unwrap();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert!(!commit.is_empty());
    let caps = c
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(plugin_capability::Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&(service::Type::ControllerService as i32)));
    assert!(services.contains(&(service::Type::VolumeAccessibilityConstraints as i32)));
    assert!(caps.capabilities.iter().any(|c| matches!(&c.r#type,
        Some(plugin_capability::Type::VolumeExpansion(e)) if e.r#type == volume_expansion::Type::Online as i32)));
    let probe = c
        .identity
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let mode = std::fs::metadata(&plugin.socket).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o660, "socket mode");
}

#[tokio::test]
async fn controller_capabilities_include_snapshots_and_clones() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let caps = c
        .controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let kinds: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use controller_service_capability::rpc::Type;
    for wanted in [
        Type::CreateDeleteVolume,
        Type::ListVolumes,
        Type::GetCapacity,
        Type::ExpandVolume,
        Type::GetVolume,
        Type::VolumeCondition,
        Type::CreateDeleteSnapshot,
        Type::ListSnapshots,
        Type::CloneVolume,
    ] {
        assert!(kinds.contains(&(wanted as i32)), "{wanted:?} missing");
    }
    assert!(!kinds.contains(&(Type::PublishUnpublishVolume as i32)));
    // Bad snapshot requests say what is wrong.
    for (request, code) in [
        (CreateSnapshotRequest::default(), Code::InvalidArgument),
        (
            CreateSnapshotRequest {
                name: "snap".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
        ),
        (
            CreateSnapshotRequest {
                name: "snap".into(),
                source_volume_id: "local/missing".into(),
                ..Default::default()
            },
            Code::NotFound,
        ),
    ] {
        assert_code(
            c.controller.create_snapshot(request).await,
            code,
            "snapshot",
        );
    }
    c.controller
        .delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "local@never-was".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_code(
        c.controller
            .delete_snapshot(DeleteSnapshotRequest::default())
            .await,
        Code::InvalidArgument,
        "no snapshot ID",
    );
}

#[tokio::test]
async fn create_and_delete_are_idempotent() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let first = c
        .controller
        .create_volume(create_request("pvc-idem", 10 << 20))
        .await
        .unwrap()
        .into_inner();
    let volume = first.volume.clone().unwrap();
    assert_eq!(volume.volume_id, "local/pvc-idem");
    assert_eq!(volume.capacity_bytes, 10 << 20);
    assert_eq!(
        volume.accessible_topology[0].segments["topology.lanes.csi.dev/node"],
        "test-node"
    );
    for _ in 0..10 {
        let again = c
            .controller
            .create_volume(create_request("pvc-idem", 10 << 20))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(again, first);
    }
    let data = plugin.data_dir.join("volumes/pvc-idem/data");
    assert!(data.is_dir());
    for _ in 0..10 {
        c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: volume.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!plugin.data_dir.join("volumes/pvc-idem").exists());
    // Deleting something that never existed, or an ID of another driver, succeeds.
    for id in ["local/never-was", "reallyfakevolumeid"] {
        c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn names_with_any_allowed_characters_get_safe_ids() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let name = "sanity Controller [Service] ../../etc/passwd";
    let volume = c
        .controller
        .create_volume(create_request(name, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert!(
        volume.volume_id.starts_with("local/_"),
        "{}",
        volume.volume_id
    );
    let again = c
        .controller
        .create_volume(create_request(name, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again.volume_id, volume.volume_id);
    let entries: Vec<_> = std::fs::read_dir(plugin.data_dir.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        entries.len(),
        1,
        "exactly one volume directory: {entries:?}"
    );
    assert!(!plugin.root.path().join("etc").exists());
}

#[tokio::test]
async fn create_volume_errors_use_the_codes_the_spec_names_and_change_nothing() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    c.controller
        .create_volume(create_request("pvc-taken", 1 << 20))
        .await
        .unwrap();
    let with = |f: &dyn Fn(&mut CreateVolumeRequest)| {
        let mut request = create_request("pvc-new", 1 << 20);
        f(&mut request);
        request
    };
    struct Case {
        desc: &'static str,
        request: CreateVolumeRequest,
        code: Code,
    }
    let cases = vec![
        Case {
            desc: "missing name",
            request: with(&|r| r.name.clear()),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "NUL in name",
            request: with(&|r| r.name = "bad\0name".into()),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "very long name",
            request: with(&|r| r.name = "n".repeat(300)),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "missing capabilities",
            request: with(&|r| r.volume_capabilities.clear()),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "block access",
            request: with(&|r| {
                r.volume_capabilities[0].access_type =
                    Some(volume_capability::AccessType::Block(Default::default()))
            }),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "multi-node mode",
            request: with(&|r| {
                r.volume_capabilities = vec![mount_capability(Mode::MultiNodeMultiWriter, &[])]
            }),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "unknown parameter",
            request: with(&|r| {
                r.parameters.insert("replicas".into(), "3".into());
            }),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "negative capacity",
            request: with(&|r| {
                r.capacity_range = Some(CapacityRange {
                    required_bytes: -1,
                    limit_bytes: 0,
                })
            }),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "limit below required",
            request: with(&|r| {
                r.capacity_range = Some(CapacityRange {
                    required_bytes: 10,
                    limit_bytes: 5,
                })
            }),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "absurd capacity",
            request: with(&|r| {
                r.capacity_range = Some(CapacityRange {
                    required_bytes: i64::MAX,
                    limit_bytes: 0,
                })
            }),
            code: Code::OutOfRange,
        },
        Case {
            desc: "same name, other size",
            request: {
                let mut r = create_request("pvc-taken", 5 << 20);
                r.capacity_range.as_mut().unwrap().limit_bytes = 5 << 20;
                r
            },
            code: Code::AlreadyExists,
        },
        Case {
            desc: "same name, other params",
            request: {
                let mut r = create_request("pvc-taken", 1 << 20);
                r.parameters.insert("onDelete".into(), "retain".into());
                r
            },
            code: Code::AlreadyExists,
        },
        Case {
            desc: "clone source",
            request: with(&|r| {
                r.volume_content_source = Some(VolumeContentSource {
                    r#type: Some(volume_content_source::Type::Volume(
                        volume_content_source::VolumeSource {
                            volume_id: "local/pvc-taken".into(),
                        },
                    )),
                })
            }),
            code: Code::InvalidArgument,
        },
        Case {
            desc: "other node's topology",
            request: with(&|r| {
                r.accessibility_requirements = Some(TopologyRequirement {
                    requisite: vec![Topology {
                        segments: [(
                            "topology.lanes.csi.dev/node".to_string(),
                            "elsewhere".to_string(),
                        )]
                        .into(),
                    }],
                    preferred: vec![],
                })
            }),
            code: Code::ResourceExhausted,
        },
    ];
    for case in cases {
        assert_code(
            c.controller.create_volume(case.request).await,
            case.code,
            case.desc,
        );
    }
    let names: Vec<_> = std::fs::read_dir(plugin.data_dir.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["pvc-taken".to_string()],
        "bad requests created nothing"
    );
    let unknown = c
        .controller
        .create_volume(with(&|r| {
            r.parameters.insert("replicas".into(), "3".into());
        }))
        .await
        .unwrap_err();
    assert!(
        unknown.message().contains("replicas"),
        "{}",
        unknown.message()
    );
    // Sidecar-added keys are accepted.
    let mut sidecar = create_request("pvc-sidecar", 0);
    sidecar
        .parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "claim".into());
    c.controller.create_volume(sidecar).await.unwrap();
}

#[tokio::test]
async fn volume_ids_cannot_reach_outside_the_data_dir() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let outside = plugin.dir("outside");
    std::fs::write(outside.join("keep"), "x").unwrap();
    for id in [
        "local/../outside",
        "local/../../",
        "local/a/../../outside",
        "local/..",
        "local/\0",
        &format!("local/{}", "x".repeat(200)),
    ] {
        assert_code(
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            id,
        );
        assert_code(
            c.controller
                .controller_get_volume(ControllerGetVolumeRequest {
                    volume_id: id.into(),
                })
                .await,
            Code::InvalidArgument,
            id,
        );
    }
    assert!(outside.join("keep").exists());
    assert_code(
        c.controller
            .delete_volume(DeleteVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "empty id",
    );
}

#[tokio::test]
async fn list_volumes_pages_with_tokens() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    for i in 0..7 {
        c.controller
            .create_volume(create_request(&format!("pvc-list-{i}"), 0))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .controller
            .list_volumes(ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.entries.len() <= 3);
        for entry in &page.entries {
            let status = entry.status.as_ref().unwrap();
            assert!(!status.volume_condition.as_ref().unwrap().abnormal);
            seen.push(entry.volume.as_ref().unwrap().volume_id.clone());
        }
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    let expected: Vec<_> = (0..7).map(|i| format!("local/pvc-list-{i}")).collect();
    assert_eq!(seen, expected);
    let all = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.entries.len(), 7);
    assert!(all.next_token.is_empty());
    assert_code(
        c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: "not-a-token".into(),
            })
            .await,
        Code::Aborted,
        "bad token",
    );
    assert_code(
        c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "negative max",
    );
    // A page boundary survives the deletion of the page's last volume and new volumes.
    let first = c
        .controller
        .list_volumes(ListVolumesRequest {
            max_entries: 3,
            starting_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let last = first
        .entries
        .last()
        .unwrap()
        .volume
        .as_ref()
        .unwrap()
        .volume_id
        .clone();
    c.controller
        .delete_volume(delete_request(&last))
        .await
        .unwrap();
    c.controller
        .create_volume(create_request("pvc-list-9", 0))
        .await
        .unwrap();
    let rest = c
        .controller
        .list_volumes(ListVolumesRequest {
            max_entries: 0,
            starting_token: first.next_token,
        })
        .await
        .unwrap()
        .into_inner();
    let rest: Vec<_> = rest
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(
        rest,
        vec![
            "local/pvc-list-3",
            "local/pvc-list-4",
            "local/pvc-list-5",
            "local/pvc-list-6",
            "local/pvc-list-9"
        ]
    );
}

#[tokio::test]
async fn capacity_validate_get_and_expand() {
    let plugin = Plugin::start();
    let mut c = plugin.clients().await;
    let capacity = c
        .controller
        .get_capacity(GetCapacityRequest {
            volume_capabilities: vec![rwo()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(capacity.available_capacity > 0);
    assert!(capacity.maximum_volume_size.unwrap() >= capacity.available_capacity);
    let elsewhere = c
        .controller
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(Topology {
                segments: [(
                    "topology.lanes.csi.dev/node".to_string(),
                    "other".to_string(),
                )]
                .into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(elsewhere.available_capacity, 0);

    let id = c
        .controller
        .create_volume(create_request("pvc-grow", 1 << 20))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let validate = |caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.clone(),
        volume_capabilities: caps,
        ..Default::default()
    };
    let ok = c
        .controller
        .validate_volume_capabilities(validate(vec![rwo()]))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.confirmed.is_some());
    let rwx = c
        .controller
        .validate_volume_capabilities(validate(vec![mount_capability(
            Mode::MultiNodeMultiWriter,
            &[],
        )]))
        .await
        .unwrap()
        .into_inner();
    assert!(
        rwx.confirmed.is_none() && rwx.message.contains("MULTI_NODE"),
        "{}",
        rwx.message
    );
    assert_code(
        c.controller
            .validate_volume_capabilities(validate(vec![]))
            .await,
        Code::InvalidArgument,
        "no caps",
    );
    assert_code(
        c.controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "local/missing".into(),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "missing volume",
    );

    let got = c
        .controller
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.volume.unwrap().capacity_bytes, 1 << 20);
    assert!(!got.status.unwrap().volume_condition.unwrap().abnormal);
    assert_code(
        c.controller
            .controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "local/missing".into(),
            })
            .await,
        Code::NotFound,
        "get missing",
    );

    let expand = |bytes: i64| ControllerExpandVolumeRequest {
        volume_id: id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    for _ in 0..10 {
        let grown = c
            .controller
            .controller_expand_volume(expand(4 << 20))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(grown.capacity_bytes, 4 << 20);
        assert!(!grown.node_expansion_required);
    }
    let smaller = c
        .controller
        .controller_expand_volume(expand(2 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(smaller.capacity_bytes, 4 << 20, "never shrinks");
    assert_code(
        c.controller
            .controller_expand_volume(expand(i64::MAX))
            .await,
        Code::OutOfRange,
        "absurd expand",
    );
    assert_code(
        c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "no range",
    );
    assert_code(
        c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: "local/missing".into(),
                capacity_range: Some(CapacityRange {
                    required_bytes: 1,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "expand missing",
    );
}

#[tokio::test]
async fn state_survives_a_restart() {
    let mut plugin = Plugin::start();
    let mut c = plugin.clients().await;
    c.controller
        .create_volume(create_request("pvc-persist", 3 << 20))
        .await
        .unwrap();
    plugin.restart();
    let mut c = plugin.clients().await;
    let again = c
        .controller
        .create_volume(create_request("pvc-persist", 3 << 20))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.volume.unwrap().capacity_bytes, 3 << 20);
    let listed = c
        .controller
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
}

#[tokio::test]
async fn concurrent_create_of_the_same_name_is_aborted() {
    let plugin = Plugin::start_with(Some("delay:create"), None);
    let c = plugin.clients().await;
    let (mut a, mut b) = (c.controller.clone(), c.controller.clone());
    let first = tokio::spawn(async move { a.create_volume(create_request("pvc-race", 0)).await });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let second = b.create_volume(create_request("pvc-race", 0)).await;
    assert_code(second, Code::Aborted, "overlapping create");
    first.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_stale_socket_is_replaced_and_other_files_are_not() {
    let mut plugin = Plugin::start();
    // kill -9 leaves the socket file behind; the next start must replace it.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(plugin.pid() as i32),
        nix::sys::signal::SIGKILL,
    );
    plugin.wait_dead();
    assert!(plugin.socket.exists(), "socket left behind by kill -9");
    plugin.restart();
    let mut c = plugin.clients().await;
    c.identity.probe(ProbeRequest {}).await.unwrap();

    let file = plugin.root.path().join("not-a-socket");
    std::fs::write(&file, "precious").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
        .args(["standalone", "--node-id", "x", "--endpoint"])
        .arg(&file)
        .arg("--data-dir")
        .arg(plugin.root.path().join("other-data"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "precious");
}

/// `lanes csi …` against the plugin, run in `cwd`: (success, stdout, stderr).
fn cli(plugin: &Plugin, cwd: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_lanes"))
        .current_dir(cwd)
        .arg("--data-dir")
        .arg(&plugin.data_dir)
        .arg("csi")
        .arg("--endpoint")
        .arg(&plugin.socket)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_csi_client_says_what_happened_in_words() {
    if !privileged("csi client") {
        return;
    }
    let plugin = Plugin::start();
    let root = plugin.root.path();
    let (ok, _, err) = cli(&plugin, root, &["create-volume", "zero", "--capacity", "0"]);
    assert!(!ok && err.contains("is zero"), "{err}");
    let (ok, out, _) = cli(&plugin, root, &["delete-volume", "local/never-made"]);
    assert!(
        ok && out.contains("does not exist; nothing to delete"),
        "{out}"
    );
    let (ok, out, err) = cli(
        &plugin,
        root,
        &["create-volume", "words", "--capacity", "1Mi"],
    );
    assert!(ok, "{out}{err}");
    // A relative target is taken from the working directory.
    std::fs::create_dir_all(root.join("pod")).unwrap();
    let (ok, out, err) = cli(&plugin, root, &["publish", "local/words", "pod/v"]);
    assert!(ok, "{out}{err}");
    assert_eq!(mounts_at(&root.join("pod/v")).len(), 1);
    let (ok, out, _) = cli(&plugin, root, &["unpublish", "local/words", "pod/v"]);
    assert!(ok && out.starts_with("unpublished"), "{out}");
    let (ok, out, _) = cli(&plugin, root, &["unpublish", "local/words", "pod/v"]);
    assert!(ok && out.contains("nothing was mounted"), "{out}");
    let (ok, out, _) = cli(&plugin, root, &["delete-volume", "local/words"]);
    assert!(ok && out.starts_with("deleted"), "{out}");
}
