//! Debug output for CSI messages that carry secrets.
//!
//! Rule: no secret reaches a log. prost's derived `Debug` is switched off (see build.rs) for
//! every message with a `secrets` map and for `MountVolume` (mount flags may hold credentials);
//! these impls print the other fields and only the number of redacted entries.

use std::fmt;

use super::proto::{self, volume_capability::MountVolume};

/// Stands in for a redacted collection: shows how many entries, never what they are.
struct Redacted(usize);

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} redacted>", self.0)
    }
}

macro_rules! redacted_debug {
    ($($ty:ident { $($field:ident),* } hides $secret:ident;)*) => {$(
        impl fmt::Debug for proto::$ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_struct(stringify!($ty))
                    $(.field(stringify!($field), &self.$field))*
                    .field(stringify!($secret), &Redacted(self.$secret.len()))
                    .finish()
            }
        }
    )*};
}

redacted_debug! {
    CreateVolumeRequest {
        name, capacity_range, volume_capabilities, parameters, volume_content_source,
        accessibility_requirements, mutable_parameters
    } hides secrets;
    DeleteVolumeRequest { volume_id } hides secrets;
    ControllerPublishVolumeRequest {
        volume_id, node_id, volume_capability, readonly, volume_context
    } hides secrets;
    ControllerUnpublishVolumeRequest { volume_id, node_id } hides secrets;
    ValidateVolumeCapabilitiesRequest {
        volume_id, volume_context, volume_capabilities, parameters, mutable_parameters
    } hides secrets;
    ControllerModifyVolumeRequest { volume_id, mutable_parameters } hides secrets;
    CreateSnapshotRequest { source_volume_id, name, parameters } hides secrets;
    DeleteSnapshotRequest { snapshot_id } hides secrets;
    ListSnapshotsRequest {
        max_entries, starting_token, source_volume_id, snapshot_id
    } hides secrets;
    ControllerExpandVolumeRequest { volume_id, capacity_range, volume_capability } hides secrets;
    NodeStageVolumeRequest {
        volume_id, publish_context, staging_target_path, volume_capability, volume_context
    } hides secrets;
    NodePublishVolumeRequest {
        volume_id, publish_context, staging_target_path, target_path, volume_capability,
        readonly, volume_context
    } hides secrets;
    NodeExpandVolumeRequest {
        volume_id, volume_path, capacity_range, staging_target_path, volume_capability
    } hides secrets;
}

impl fmt::Debug for MountVolume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MountVolume")
            .field("fs_type", &self.fs_type)
            .field("mount_flags", &Redacted(self.mount_flags.len()))
            .field("volume_mount_group", &self.volume_mount_group)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_mount_flags_never_print() {
        let request = proto::NodePublishVolumeRequest {
            volume_id: "local/pvc-1".into(),
            target_path: "/target".into(),
            secrets: [("password".to_string(), "hunter2".to_string())].into(),
            volume_capability: Some(proto::VolumeCapability {
                access_type: Some(proto::volume_capability::AccessType::Mount(MountVolume {
                    mount_flags: vec!["token=s3cr3t".into()],
                    ..Default::default()
                })),
                access_mode: None,
            }),
            ..Default::default()
        };
        let text = format!("{request:?}");
        assert!(text.contains("local/pvc-1"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("password"),
            "{text}"
        );
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains("<1 redacted>"), "{text}");
    }
}
