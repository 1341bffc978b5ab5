//! Volume capabilities off the wire: a CSI `VolumeCapability` becomes a lane
//! [`Capability`], or an INVALID_ARGUMENT that says what is missing. Which capabilities a
//! lane serves is the lane's rule, not this module's.

use tonic::Status;

use crate::lane::capability::{Access, AccessMode, AccessType, Capability};
use crate::proto::VolumeCapability;
use crate::proto::volume_capability::access_mode::Mode;

/// Converts one capability; the error names what is missing or invalid.
pub fn capability(capability: &VolumeCapability) -> Result<Capability, String> {
    let access_type = match &capability.access_type {
        Some(crate::proto::volume_capability::AccessType::Mount(mount)) => AccessType::Mount {
            fs_type: mount.fs_type.clone(),
            flags: mount.mount_flags.clone(),
            mount_group: mount.volume_mount_group.clone(),
        },
        Some(crate::proto::volume_capability::AccessType::Block(_)) => AccessType::Block,
        None => return Err("volume_capability.access_type (mount or block) is required".into()),
    };
    let Some(access_mode) = &capability.access_mode else {
        return Err("volume_capability.access_mode is required".into());
    };
    let mode = match Mode::try_from(access_mode.mode) {
        Ok(Mode::SingleNodeWriter) => AccessMode::SingleNodeWriter,
        Ok(Mode::SingleNodeReaderOnly) => AccessMode::SingleNodeReaderOnly,
        Ok(Mode::MultiNodeReaderOnly) => AccessMode::MultiNodeReaderOnly,
        Ok(Mode::MultiNodeSingleWriter) => AccessMode::MultiNodeSingleWriter,
        Ok(Mode::MultiNodeMultiWriter) => AccessMode::MultiNodeMultiWriter,
        Ok(Mode::SingleNodeSingleWriter) => AccessMode::SingleNodeSingleWriter,
        Ok(Mode::SingleNodeMultiWriter) => AccessMode::SingleNodeMultiWriter,
        Ok(Mode::Unknown) | Err(_) => {
            return Err(format!("access mode {} is not valid", access_mode.mode));
        }
    };
    Ok(Capability { access_type, mode })
}

/// The required capability of a node request, converted.
pub fn required(capability: Option<&VolumeCapability>) -> Result<Capability, Status> {
    let capability = capability.ok_or_else(|| super::status::missing("volume_capability"))?;
    self::capability(capability).map_err(Status::invalid_argument)
}

/// Checks one capability against the local lane's rules (the controller's lane until the
/// controller side has its own lane trait).
pub fn check(capability: &VolumeCapability) -> Result<Access, String> {
    crate::lane::local::access::access(&self::capability(capability)?)
}

/// Checks every capability of a request; the first unsupported one's reason is returned.
pub fn check_all(capabilities: &[VolumeCapability]) -> Result<(), String> {
    if capabilities.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    capabilities.iter().try_for_each(|c| check(c).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::{AccessMode as WireMode, MountVolume};

    #[test]
    fn converts_or_names_what_is_missing() {
        let mount = Some(crate::proto::volume_capability::AccessType::Mount(
            MountVolume::default(),
        ));
        let good = VolumeCapability {
            access_type: mount.clone(),
            access_mode: Some(WireMode {
                mode: Mode::SingleNodeSingleWriter as i32,
            }),
        };
        assert_eq!(
            capability(&good).unwrap().mode,
            AccessMode::SingleNodeSingleWriter
        );
        let no_type = VolumeCapability {
            access_type: None,
            ..good.clone()
        };
        assert!(capability(&no_type).unwrap_err().contains("access_type"));
        let no_mode = VolumeCapability {
            access_mode: None,
            ..good.clone()
        };
        assert!(capability(&no_mode).unwrap_err().contains("access_mode"));
        let unknown = VolumeCapability {
            access_mode: Some(WireMode { mode: 0 }),
            ..good.clone()
        };
        assert!(capability(&unknown).is_err());
        let bogus = VolumeCapability {
            access_mode: Some(WireMode { mode: 99 }),
            ..good
        };
        assert!(capability(&bogus).is_err());
        assert!(check_all(&[]).is_err());
    }
}
