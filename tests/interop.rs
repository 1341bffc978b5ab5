//! Any gRPC client must work over the unix socket, not only kubelet's Go client: a real
//! Python `grpcio` client (≥ 1.57 sends the percent-encoded socket path as `:authority`), at
//! its default settings, calls the real plugin.

mod common;

use std::path::Path;
use std::process::Command;

use common::Plugin;

/// The client: raw-bytes unary calls, so no generated Python code is needed. Each line of
/// output is `<method> <status code> <hex of the response or the details>`.
const CLIENT: &str = r#"
import sys, grpc
channel = grpc.insecure_channel("unix:" + sys.argv[1])
def call(method, request):
    stub = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        print(method, "OK", stub(request, timeout=20).hex())
    except grpc.RpcError as e:
        print(method, e.code().name, e.details())
call("/csi.v1.Identity/GetPluginInfo", b"")
call("/csi.v1.Identity/Probe", b"")
call("/csi.v1.Node/NodeGetInfo", b"")
call("/csi.v1.Controller/ControllerGetCapabilities", b"")
# CreateVolumeRequest{name: "pvc-py"} without capabilities: the plugin's own error must come back.
call("/csi.v1.Controller/CreateVolume", b"\x0a\x06pvc-py")
print("grpcio", grpc.__version__)
"#;

fn python() -> Option<std::path::PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    let has_grpc = |python: &Path| {
        Command::new(python)
            .args(["-c", "import grpc"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if venv.exists() && has_grpc(&venv) {
        return Some(venv);
    }
    if std::env::var("LANES_REQUIRE_PRIVILEGED").as_deref() == Ok("1") {
        panic!("grpcio is not installed in .venv; scripts/test.sh installs it");
    }
    eprintln!("SKIPPED python grpcio interop: grpcio not installed in .venv (run scripts/test.sh)");
    None
}

#[test]
fn a_python_grpcio_client_at_default_settings_is_served() {
    let Some(python) = python() else {
        return;
    };
    let plugin = Plugin::start();
    let output = Command::new(python)
        .args(["-c", CLIENT])
        .arg(&plugin.socket)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "python failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = |method: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(method))
            .unwrap_or_else(|| panic!("no answer for {method}: {stdout}"))
            .to_owned()
    };
    let info = line("/csi.v1.Identity/GetPluginInfo ");
    assert!(info.contains(" OK "), "{info}");
    // The driver name, hex-encoded, is in the response.
    let name_hex: String = b"lanes.csi.dev"
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(info.contains(&name_hex), "{info}");
    assert!(line("/csi.v1.Identity/Probe ").contains(" OK"), "{stdout}");
    let node = line("/csi.v1.Node/NodeGetInfo ");
    let node_hex: String = b"test-node".iter().map(|b| format!("{b:02x}")).collect();
    assert!(node.contains(" OK ") && node.contains(&node_hex), "{node}");
    assert!(
        line("/csi.v1.Controller/ControllerGetCapabilities ").contains(" OK "),
        "{stdout}"
    );
    let create = line("/csi.v1.Controller/CreateVolume ");
    assert!(
        create.contains("INVALID_ARGUMENT") && create.contains("volume_capabilities"),
        "{create}"
    );
    let version = line("grpcio ");
    eprintln!("served {version}");
}
