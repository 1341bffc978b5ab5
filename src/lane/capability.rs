//! Volume capabilities as lanes see them: parsed from the wire at the gRPC edge, judged by
//! each lane's rules ([`Access`] is what a lane makes of one it serves), and compared by the
//! node ledger when a call is repeated ([`Asked`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::mount::MountFlags;

/// A CSI access mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccessMode {
    SingleNodeWriter,
    SingleNodeReaderOnly,
    MultiNodeReaderOnly,
    MultiNodeSingleWriter,
    MultiNodeMultiWriter,
    SingleNodeSingleWriter,
    SingleNodeMultiWriter,
}

impl AccessMode {
    /// Modes that only ever read.
    pub fn reader_only(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeReaderOnly | AccessMode::MultiNodeReaderOnly
        )
    }

    /// Modes under which at most one publication may write.
    pub fn single_writer(self) -> bool {
        matches!(
            self,
            AccessMode::SingleNodeWriter | AccessMode::MultiNodeSingleWriter
        )
    }

    /// Modes that let more than one node use the volume.
    pub fn multi_node(self) -> bool {
        matches!(
            self,
            AccessMode::MultiNodeReaderOnly
                | AccessMode::MultiNodeSingleWriter
                | AccessMode::MultiNodeMultiWriter
        )
    }

    /// The mode's name in the CSI spec.
    pub fn spec_name(self) -> &'static str {
        match self {
            AccessMode::SingleNodeWriter => "SINGLE_NODE_WRITER",
            AccessMode::SingleNodeReaderOnly => "SINGLE_NODE_READER_ONLY",
            AccessMode::MultiNodeReaderOnly => "MULTI_NODE_READER_ONLY",
            AccessMode::MultiNodeSingleWriter => "MULTI_NODE_SINGLE_WRITER",
            AccessMode::MultiNodeMultiWriter => "MULTI_NODE_MULTI_WRITER",
            AccessMode::SingleNodeSingleWriter => "SINGLE_NODE_SINGLE_WRITER",
            AccessMode::SingleNodeMultiWriter => "SINGLE_NODE_MULTI_WRITER",
        }
    }
}

/// How a volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessType {
    /// A mounted filesystem. Mount flags may carry secrets: never logged.
    Mount {
        fs_type: String,
        flags: Vec<String>,
        mount_group: String,
    },
    /// A raw block device.
    Block,
}

/// One volume capability of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access_type: AccessType,
    pub mode: AccessMode,
}

/// What a lane makes of a capability it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub mode: AccessMode,
    /// The mode or a mount flag only allows reading.
    pub read_only: bool,
    /// Flags for the mount, from the capability's mount flags.
    pub flags: MountFlags,
    /// Group that should own the volume's root (`volume_mount_group`).
    pub mount_group: Option<u32>,
}

impl Access {
    /// What a mount with `flags` and `mount_group` under `mode` asks; the error says which
    /// flag or group cannot be honoured.
    pub fn for_mount(
        mode: AccessMode,
        flags: &[String],
        mount_group: &str,
    ) -> Result<Access, String> {
        let flags = MountFlags::parse(flags).map_err(|e| e.to_string())?;
        let mount_group = match mount_group {
            "" => None,
            text => Some(text.parse::<u32>().map_err(|_| {
                format!(
                    "volume_mount_group {} is not a numeric group ID",
                    crate::text::Shown(text)
                )
            })?),
        };
        let read_only = mode == AccessMode::SingleNodeReaderOnly || flags.read_only;
        Ok(Access {
            mode,
            read_only,
            flags,
            mount_group,
        })
    }

    /// The flags a publish mounts with: the request's `readonly` or a read-only mode or flag
    /// make it read-only.
    pub fn publish_flags(&self, readonly: bool) -> MountFlags {
        MountFlags {
            read_only: readonly || self.read_only,
            ..self.flags
        }
    }
}

impl Capability {
    /// What a stage or publish with this capability and the request's `readonly` asks for,
    /// as the node ledger compares repeats.
    pub fn asked(&self, readonly: bool) -> Asked {
        let (block, fs_type, flags, mount_group) = match &self.access_type {
            AccessType::Mount {
                fs_type,
                flags,
                mount_group,
            } => (
                false,
                fs_type.clone(),
                flags.as_slice(),
                mount_group.clone(),
            ),
            AccessType::Block => (true, String::new(), &[][..], String::new()),
        };
        Asked {
            mode: self.mode,
            block,
            fs_type,
            flags_sha256: Asked::digest_flags(flags),
            mount_group,
            readonly,
        }
    }
}

/// What a stage or publish asked for; a repeat at the same path must ask the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asked {
    pub mode: AccessMode,
    pub block: bool,
    pub fs_type: String,
    /// SHA-256 of the mount flags (flags may carry secrets; the ledger never holds them).
    pub flags_sha256: String,
    pub mount_group: String,
    /// The publish request's `readonly` field (false for a stage).
    pub readonly: bool,
}

impl Asked {
    /// Digest of mount flags for [`Asked::flags_sha256`], independent of their order.
    pub fn digest_flags(flags: &[String]) -> String {
        let mut sorted: Vec<&str> = flags.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        let digest = Sha256::digest(sorted.join("\n").as_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}
