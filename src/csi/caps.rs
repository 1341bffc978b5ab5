//! Which volume capabilities the local lane can serve, and what they ask of a mount.
//!
//! The local lane keeps a volume on one node as a directory: mount access only (no block),
//! single-node access modes only, no filesystem type of its own to choose. Anything else is
//! refused with a reason, never silently ignored.

use crate::mount::MountFlags;
use crate::mount::ledger::{AccessMode, Asked};
use crate::proto::VolumeCapability;
use crate::proto::volume_capability::access_mode::Mode;
use crate::proto::volume_capability::{AccessType, MountVolume};

/// What a supported capability asks of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The access mode asked for.
    pub mode: AccessMode,
    /// The access mode only allows reading.
    pub read_only: bool,
    /// Flags for the mount, from `mount_flags`.
    pub flags: MountFlags,
    /// Group that should own the volume's root (`volume_mount_group`).
    pub mount_group: Option<u32>,
}

/// Checks one capability; the error says why it cannot be served.
pub fn check(capability: &VolumeCapability) -> Result<Access, String> {
    let mount = match &capability.access_type {
        Some(AccessType::Mount(mount)) => mount,
        Some(AccessType::Block(_)) => {
            return Err("block access is not supported: local volumes are directories".into());
        }
        None => return Err("volume_capability.access_type (mount or block) is required".into()),
    };
    let Some(access_mode) = &capability.access_mode else {
        return Err("volume_capability.access_mode is required".into());
    };
    let (mode, read_only) = match Mode::try_from(access_mode.mode) {
        Ok(Mode::SingleNodeWriter) => (AccessMode::SingleNodeWriter, false),
        Ok(Mode::SingleNodeSingleWriter) => (AccessMode::SingleNodeSingleWriter, false),
        Ok(Mode::SingleNodeMultiWriter) => (AccessMode::SingleNodeMultiWriter, false),
        Ok(Mode::SingleNodeReaderOnly) => (AccessMode::SingleNodeReaderOnly, true),
        Ok(
            mode @ (Mode::MultiNodeReaderOnly
            | Mode::MultiNodeSingleWriter
            | Mode::MultiNodeMultiWriter),
        ) => {
            return Err(format!(
                "access mode {} is not supported: local volumes live on one node",
                mode.as_str_name()
            ));
        }
        Ok(Mode::Unknown) | Err(_) => {
            return Err(format!("access mode {} is not valid", access_mode.mode));
        }
    };
    check_mount(mount).map(|(flags, mount_group)| Access {
        mode,
        read_only: read_only || flags.read_only,
        flags,
        mount_group,
    })
}

fn check_mount(mount: &MountVolume) -> Result<(MountFlags, Option<u32>), String> {
    if !mount.fs_type.is_empty() {
        return Err(format!(
            "fs_type {:?} cannot be honoured: local volumes are directories on the node's \
             filesystem; leave fsType unset",
            mount.fs_type
        ));
    }
    let flags = MountFlags::parse(&mount.mount_flags).map_err(|e| e.to_string())?;
    let group = match mount.volume_mount_group.as_str() {
        "" => None,
        text => Some(
            text.parse::<u32>()
                .map_err(|_| format!("volume_mount_group {text:?} is not a numeric group ID"))?,
        ),
    };
    Ok((flags, group))
}

/// What a stage or publish with `capability` (already checked) and the request's `readonly`
/// asks for, as the node ledger compares repeats.
pub fn asked(capability: &VolumeCapability, access: &Access, readonly: bool) -> Asked {
    let (block, fs_type, flags, mount_group) = match &capability.access_type {
        Some(AccessType::Mount(mount)) => (
            false,
            mount.fs_type.clone(),
            mount.mount_flags.as_slice(),
            mount.volume_mount_group.clone(),
        ),
        _ => (true, String::new(), &[][..], String::new()),
    };
    Asked {
        mode: access.mode,
        block,
        fs_type,
        flags_sha256: Asked::digest_flags(flags),
        mount_group,
        readonly,
    }
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
    use crate::proto::volume_capability::{AccessMode, BlockVolume};

    fn capability(mode: Mode, mount: Option<MountVolume>) -> VolumeCapability {
        VolumeCapability {
            access_type: Some(match mount {
                Some(mount) => AccessType::Mount(mount),
                None => AccessType::Block(BlockVolume {}),
            }),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    #[test]
    fn table() {
        let plain = || Some(MountVolume::default());
        let with = |flags: &[&str], fs: &str, group: &str| {
            Some(MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: group.into(),
            })
        };
        struct Case {
            desc: &'static str,
            cap: VolumeCapability,
            read_only: Option<bool>,
        }
        let cases = [
            Case {
                desc: "rwo",
                cap: capability(Mode::SingleNodeWriter, plain()),
                read_only: Some(false),
            },
            Case {
                desc: "rwop",
                cap: capability(Mode::SingleNodeSingleWriter, plain()),
                read_only: Some(false),
            },
            Case {
                desc: "reader",
                cap: capability(Mode::SingleNodeReaderOnly, plain()),
                read_only: Some(true),
            },
            Case {
                desc: "ro flag",
                cap: capability(Mode::SingleNodeWriter, with(&["ro"], "", "")),
                read_only: Some(true),
            },
            Case {
                desc: "group",
                cap: capability(Mode::SingleNodeWriter, with(&[], "", "2000")),
                read_only: Some(false),
            },
            Case {
                desc: "rwx",
                cap: capability(Mode::MultiNodeMultiWriter, plain()),
                read_only: None,
            },
            Case {
                desc: "unknown mode",
                cap: capability(Mode::Unknown, plain()),
                read_only: None,
            },
            Case {
                desc: "block",
                cap: capability(Mode::SingleNodeWriter, None),
                read_only: None,
            },
            Case {
                desc: "fs type",
                cap: capability(Mode::SingleNodeWriter, with(&[], "ext4", "")),
                read_only: None,
            },
            Case {
                desc: "bad flag",
                cap: capability(Mode::SingleNodeWriter, with(&["sync=1"], "", "")),
                read_only: None,
            },
            Case {
                desc: "bad group",
                cap: capability(Mode::SingleNodeWriter, with(&[], "", "staff")),
                read_only: None,
            },
            Case {
                desc: "no access type",
                cap: VolumeCapability {
                    access_type: None,
                    access_mode: Some(AccessMode { mode: 1 }),
                },
                read_only: None,
            },
            Case {
                desc: "no access mode",
                cap: VolumeCapability {
                    access_type: plain().map(AccessType::Mount),
                    access_mode: None,
                },
                read_only: None,
            },
        ];
        for case in cases {
            assert_eq!(
                check(&case.cap).ok().map(|a| a.read_only),
                case.read_only,
                "{}",
                case.desc
            );
        }
        assert!(check_all(&[]).is_err());
    }
}
