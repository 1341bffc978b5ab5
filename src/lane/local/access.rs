//! Which volume capabilities the local lane serves, and what they ask of a mount.
//!
//! A local volume is a directory on one node: mount access only (no block), single-node access
//! modes only, no filesystem type of its own to choose. Anything else is refused with a reason,
//! never silently ignored.

use crate::lane::capability::{Access, AccessType, Capability};

/// Checks one capability against the local lane's rules; the error says why it cannot be
/// served.
pub fn access(capability: &Capability) -> Result<Access, String> {
    let AccessType::Mount {
        fs_type,
        flags,
        mount_group,
    } = &capability.access_type
    else {
        return Err("block access is not supported: local volumes are directories".into());
    };
    if capability.mode.multi_node() {
        return Err(format!(
            "access mode {} is not supported: local volumes live on one node",
            capability.mode.spec_name()
        ));
    }
    if !fs_type.is_empty() {
        return Err(format!(
            "fs_type {} cannot be honoured: local volumes are directories on the node's \
             filesystem; leave fsType unset",
            crate::text::Shown(fs_type)
        ));
    }
    Access::for_mount(capability.mode, flags, mount_group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lane::capability::AccessMode;
    use AccessMode::*;

    fn mount(mode: AccessMode, flags: &[&str], fs: &str, group: &str) -> Capability {
        Capability {
            access_type: AccessType::Mount {
                fs_type: fs.into(),
                flags: flags.iter().map(|f| f.to_string()).collect(),
                mount_group: group.into(),
            },
            mode,
        }
    }

    #[test]
    fn table() {
        let cases = [
            ("rwo", mount(SingleNodeWriter, &[], "", ""), Some(false)),
            (
                "rwop",
                mount(SingleNodeSingleWriter, &[], "", ""),
                Some(false),
            ),
            (
                "rwo multi",
                mount(SingleNodeMultiWriter, &[], "", ""),
                Some(false),
            ),
            (
                "reader",
                mount(SingleNodeReaderOnly, &[], "", ""),
                Some(true),
            ),
            (
                "ro flag",
                mount(SingleNodeWriter, &["ro"], "", ""),
                Some(true),
            ),
            (
                "group",
                mount(SingleNodeWriter, &[], "", "2000"),
                Some(false),
            ),
            ("rwx", mount(MultiNodeMultiWriter, &[], "", ""), None),
            ("rox", mount(MultiNodeReaderOnly, &[], "", ""), None),
            ("fs type", mount(SingleNodeWriter, &[], "ext4", ""), None),
            (
                "bad flag",
                mount(SingleNodeWriter, &["sync=1"], "", ""),
                None,
            ),
            ("bad group", mount(SingleNodeWriter, &[], "", "staff"), None),
            (
                "block",
                Capability {
                    access_type: AccessType::Block,
                    mode: SingleNodeWriter,
                },
                None,
            ),
        ];
        for (desc, capability, want) in cases {
            assert_eq!(
                access(&capability).ok().map(|a| a.read_only),
                want,
                "{desc}"
            );
        }
        let group = access(&mount(SingleNodeWriter, &[], "", "2000")).unwrap();
        assert_eq!(group.mount_group, Some(2000));
    }
}
