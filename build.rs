//! Compiles `proto/csi.proto` with protox (a pure-Rust protobuf compiler), so a build needs no
//! system `protoc`; and records the git commit being built (`LANES_COMMIT`, "unknown" outside
//! a checkout) for `lanes --version` and the CSI vendor version.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/csi.proto");
    commit();
    let descriptors = protox::compile(["proto/csi.proto"], ["proto"])?;
    tonic_prost_build::configure()
        // Requests that carry `secrets` get a hand-written Debug that redacts them.
        .skip_debug(REDACTED.iter().copied())
        .compile_fds(descriptors)?;
    Ok(())
}

/// Sets `LANES_COMMIT` to the checked-out commit, rebuilding when it moves.
fn commit() {
    for watched in [".git/HEAD", ".git/refs/heads"] {
        if std::path::Path::new(watched).exists() {
            println!("cargo:rerun-if-changed={watched}");
        }
    }
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=LANES_COMMIT={commit}");
}

/// Messages with a `secrets` map: prost's derived Debug would print it.
const REDACTED: &[&str] = &[
    ".csi.v1.CreateVolumeRequest",
    ".csi.v1.DeleteVolumeRequest",
    ".csi.v1.ControllerPublishVolumeRequest",
    ".csi.v1.ControllerUnpublishVolumeRequest",
    ".csi.v1.ValidateVolumeCapabilitiesRequest",
    ".csi.v1.ControllerModifyVolumeRequest",
    ".csi.v1.CreateSnapshotRequest",
    ".csi.v1.DeleteSnapshotRequest",
    ".csi.v1.ListSnapshotsRequest",
    ".csi.v1.ControllerExpandVolumeRequest",
    ".csi.v1.NodeStageVolumeRequest",
    ".csi.v1.NodePublishVolumeRequest",
    ".csi.v1.NodeExpandVolumeRequest",
    ".csi.v1.VolumeCapability.MountVolume",
];
