//! Which volume capabilities the `fast-rwo` lane serves.
//!
//! A block volume is one filesystem (or one raw device) on one node: mount and block access,
//! single-node access modes only, xfs or ext4 (or none asked: the profile's). Anything else is
//! refused with a reason.

use crate::lane::FsType;
use crate::lane::capability::{Access, AccessType, Capability};
use crate::mount::MountFlags;

/// Checks one capability against the lane's rules.
pub fn access(capability: &Capability) -> Result<Access, String> {
    if capability.mode.multi_node() {
        return Err(format!(
            "access mode {} is not supported: fast-rwo volumes live on one node",
            capability.mode.spec_name()
        ));
    }
    match &capability.access_type {
        AccessType::Block => Ok(Access {
            mode: capability.mode,
            read_only: capability.mode.reader_only(),
            flags: MountFlags::default(),
            mount_group: None,
        }),
        AccessType::Mount {
            fs_type,
            flags,
            mount_group,
        } => {
            if !fs_type.is_empty() && FsType::parse(fs_type).is_none() {
                return Err(format!(
                    "fs_type {} is not supported: fast-rwo volumes are xfs or ext4",
                    crate::text::Shown(fs_type)
                ));
            }
            Access::for_mount(capability.mode, flags, mount_group)
        }
    }
}

/// The filesystem a mount capability asks for, if it names one.
pub fn asked_fs(capability: &Capability) -> Option<FsType> {
    match &capability.access_type {
        AccessType::Mount { fs_type, .. } => FsType::parse(fs_type),
        AccessType::Block => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lane::capability::AccessMode::{self, *};

    fn mount(mode: AccessMode, fs: &str) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: fs.into(),
                flags: vec![],
                mount_group: String::new(),
            },
            mode,
        }
    }

    #[test]
    fn table() {
        let block = |mode| Capability {
            access_type: AccessType::Block,
            mode,
        };
        let cases = [
            ("rwo", mount(SingleNodeWriter, ""), true),
            ("rwop xfs", mount(SingleNodeSingleWriter, "xfs"), true),
            ("ext4", mount(SingleNodeWriter, "ext4"), true),
            ("btrfs", mount(SingleNodeWriter, "btrfs"), false),
            ("rwx", mount(MultiNodeMultiWriter, ""), false),
            ("block rwo", block(SingleNodeWriter), true),
            ("block rox", block(MultiNodeReaderOnly), false),
        ];
        for (desc, capability, ok) in cases {
            assert_eq!(access(&capability).is_ok(), ok, "{desc}");
        }
        assert_eq!(
            asked_fs(&mount(SingleNodeWriter, "ext4")),
            Some(FsType::Ext4)
        );
        assert_eq!(asked_fs(&mount(SingleNodeWriter, "")), None);
    }
}
