//! Storage profiles: what an admin offers and a StorageClass picks (`profile: NAME`).
//!
//! A profile names a lane (where and how volumes live), says what it is for, and may be the
//! default for StorageClasses that name none. The table comes from the config's `profiles:`
//! section; the embedded default is one profile, `local`. Rules: names are DNS labels; a lane
//! this build does not have is refused at start-up; at most one profile is the default; a
//! StorageClass naming an unknown profile gets INVALID_ARGUMENT listing the known ones.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The lanes this build serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LaneKind {
    /// A directory (or btrfs subvolume) per volume on the node's own disk.
    Local,
    /// A disk image per volume on the node's own disk, attached as a loop device.
    FastRwo,
    /// A subdirectory per volume of a shared JuiceFS file system, with a quota.
    SharedRwx,
    /// A subdirectory per volume of an NFS export; capacity recorded, not enforced.
    LegacyRwx,
}

impl LaneKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LaneKind::Local => "local",
            LaneKind::FastRwo => "fast-rwo",
            LaneKind::SharedRwx => "shared-rwx",
            LaneKind::LegacyRwx => "legacy-rwx",
        }
    }

    /// Every lane, in the order they are documented.
    pub const ALL: [LaneKind; 4] = [
        LaneKind::Local,
        LaneKind::FastRwo,
        LaneKind::SharedRwx,
        LaneKind::LegacyRwx,
    ];

    /// The lane called `name`.
    pub fn from_name(name: &str) -> Option<LaneKind> {
        LaneKind::ALL.into_iter().find(|lane| lane.as_str() == name)
    }

    /// Whether a volume lives on one node's own disk, so that it is provisioned there, by
    /// that node's plugin (a cluster's node DaemonSet), never by a central controller.
    pub fn node_local(self) -> bool {
        matches!(self, LaneKind::Local | LaneKind::FastRwo)
    }
}

/// Which lanes a controller provisions: a cluster splits them between the controller
/// Deployment (`shared`) and each node's plugin (`node-local`); one machine serves `all`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LaneScope {
    /// Every lane (one machine, tests).
    #[default]
    All,
    /// Lanes whose volumes any node reaches: shared-rwx, legacy-rwx.
    Shared,
    /// Lanes whose volumes live on one node: local, fast-rwo.
    NodeLocal,
}

impl LaneScope {
    /// Whether this scope provisions `lane`.
    pub fn serves(self, lane: LaneKind) -> bool {
        match self {
            LaneScope::All => true,
            LaneScope::Shared => !lane.node_local(),
            LaneScope::NodeLocal => lane.node_local(),
        }
    }
}

/// Filesystems a block volume can be formatted with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    #[default]
    Xfs,
    Ext4,
}

impl FsType {
    /// Parses a CSI `fs_type` (empty: none asked).
    pub fn parse(text: &str) -> Option<FsType> {
        match text {
            "xfs" => Some(FsType::Xfs),
            "ext4" => Some(FsType::Ext4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Xfs => "xfs",
            FsType::Ext4 => "ext4",
        }
    }
}

/// How a block volume's image takes its space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provisioning {
    /// Allocated whole at creation (fallocate): the space is guaranteed.
    #[default]
    Thick,
    /// Sparse: space is taken as it is written, and may run out under the volume.
    Thin,
}

/// The `block:` settings of a `fast-rwo` profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockBackend {
    /// The filesystem a volume gets when the request names none.
    #[serde(default)]
    pub fs_type: FsType,
    #[serde(default)]
    pub provisioning: Provisioning,
}

/// Workloads a profile can be recommended for (`lanes profiles --for`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Datasets read by many pods, often on many nodes.
    SharedDataset,
    /// Checkpoints written by training jobs and read back after a restart.
    Checkpoints,
    /// Fast scratch space for one pod.
    Scratch,
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Workload::SharedDataset => "shared-dataset",
            Workload::Checkpoints => "checkpoints",
            Workload::Scratch => "scratch",
        })
    }
}

/// One profile as written in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub lane: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub best_for: Vec<Workload>,
    #[serde(default)]
    pub default: bool,
    /// What deleting a volume does when its StorageClass does not say (`onDelete`).
    #[serde(default)]
    pub on_delete: super::params::OnDelete,
    /// Settings of a `fast-rwo` profile's local block backend.
    #[serde(default)]
    pub block: Option<BlockBackend>,
    /// A `fast-rwo` profile served by Longhorn's own driver instead.
    #[serde(default)]
    pub longhorn: Option<super::longhorn::LonghornBackend>,
    /// The JuiceFS file system of a `shared-rwx` profile.
    #[serde(default)]
    pub juicefs: Option<super::juicefs::RawJuiceFs>,
    /// The NFS export of a `legacy-rwx` profile.
    #[serde(default)]
    pub nfs: Option<super::nfs::RawNfs>,
}

/// A validated profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Profile {
    pub name: String,
    pub lane: LaneKind,
    pub description: String,
    pub best_for: Vec<Workload>,
    pub default: bool,
    /// What deleting a volume does when its StorageClass does not say.
    pub on_delete: super::params::OnDelete,
    /// The block backend's settings (`fast-rwo` profiles on the local block backend).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block: Option<BlockBackend>,
    /// Longhorn's StorageClass, for a `fast-rwo` profile Longhorn serves.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub longhorn: Option<super::longhorn::LonghornBackend>,
    /// The JuiceFS file system of a `shared-rwx` profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub juicefs: Option<super::juicefs::JuiceFs>,
    /// The NFS export of a `legacy-rwx` profile.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nfs: Option<super::nfs::Nfs>,
}

/// The profile table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profiles {
    profiles: Vec<Profile>,
}

/// The embedded default profile's name.
pub const LOCAL: &str = "local";

impl Default for Profiles {
    fn default() -> Self {
        Profiles {
            profiles: vec![Profile {
                name: LOCAL.into(),
                lane: LaneKind::Local,
                description: "a directory on the node's own disk, for one pod or one node".into(),
                best_for: vec![Workload::Scratch],
                default: true,
                on_delete: Default::default(),
                block: None,
                longhorn: None,
                juicefs: None,
                nfs: None,
            }],
        }
    }
}

impl Profiles {
    /// Validates the `profiles:` section; an empty section is the embedded default.
    pub fn from_raw(raw: BTreeMap<String, RawProfile>) -> Result<Profiles, String> {
        if raw.is_empty() {
            return Ok(Profiles::default());
        }
        let mut profiles = Vec::new();
        for (name, raw) in raw {
            if !is_dns_label(&name) {
                return Err(format!(
                    "profiles: {name:?} is not a valid name (1-63 of a-z, 0-9 and '-', starting \
                     and ending with a letter or digit)"
                ));
            }
            let lane = match raw.lane.as_str() {
                "local" => LaneKind::Local,
                "fast-rwo" => LaneKind::FastRwo,
                "shared-rwx" => LaneKind::SharedRwx,
                "legacy-rwx" => LaneKind::LegacyRwx,
                other => {
                    return Err(format!(
                        "profiles.{name}: {other:?} is not a lane (lanes: local, shared-rwx, \
                         legacy-rwx, fast-rwo)"
                    ));
                }
            };
            let (block, longhorn) = match (lane, raw.block, raw.longhorn) {
                (LaneKind::FastRwo, Some(_), Some(_)) => {
                    return Err(format!(
                        "profiles.{name}: a profile is either `block` (Lanes' own disk images) \
                         or `longhorn`, not both"
                    ));
                }
                (LaneKind::FastRwo, None, Some(longhorn)) => (None, Some(longhorn)),
                (LaneKind::FastRwo, block, None) => (Some(block.unwrap_or_default()), None),
                (_, None, None) => (None, None),
                (_, _, _) => {
                    return Err(format!(
                        "profiles.{name}: `block` and `longhorn` settings belong to fast-rwo \
                         profiles, not {}",
                        lane.as_str()
                    ));
                }
            };
            let juicefs = match (lane, raw.juicefs) {
                (LaneKind::SharedRwx, Some(raw)) => Some(
                    super::juicefs::JuiceFs::from_raw(raw)
                        .map_err(|e| format!("profiles.{name}.juicefs: {e}"))?,
                ),
                (LaneKind::SharedRwx, None) => {
                    return Err(format!(
                        "profiles.{name}: a shared-rwx profile needs `juicefs:` (its file \
                         system's meta_url, storage and bucket)"
                    ));
                }
                (_, None) => None,
                (_, Some(_)) => {
                    return Err(format!(
                        "profiles.{name}: `juicefs` settings belong to shared-rwx profiles, not {}",
                        lane.as_str()
                    ));
                }
            };
            let nfs = match (lane, raw.nfs) {
                (LaneKind::LegacyRwx, Some(raw)) => Some(
                    super::nfs::Nfs::from_raw(raw)
                        .map_err(|e| format!("profiles.{name}.nfs: {e}"))?,
                ),
                (LaneKind::LegacyRwx, None) => {
                    return Err(format!(
                        "profiles.{name}: a legacy-rwx profile needs `nfs:` (its server and \
                         export)"
                    ));
                }
                (_, None) => None,
                (_, Some(_)) => {
                    return Err(format!(
                        "profiles.{name}: `nfs` settings belong to legacy-rwx profiles, not {}",
                        lane.as_str()
                    ));
                }
            };
            profiles.push(Profile {
                name,
                lane,
                description: raw.description,
                best_for: raw.best_for,
                default: raw.default,
                on_delete: raw.on_delete,
                block,
                longhorn,
                juicefs,
                nfs,
            });
        }
        let defaults: Vec<&str> = profiles
            .iter()
            .filter(|p| p.default)
            .map(|p| p.name.as_str())
            .collect();
        if defaults.len() > 1 {
            return Err(format!(
                "profiles: only one profile can be the default ({} are)",
                defaults.join(", ")
            ));
        }
        Ok(Profiles { profiles })
    }

    /// Every profile, ordered by name.
    pub fn iter(&self) -> impl Iterator<Item = &Profile> {
        self.profiles.iter()
    }

    /// The profile a StorageClass gets when it names none.
    pub fn default_profile(&self) -> Option<&Profile> {
        self.profiles.iter().find(|p| p.default)
    }

    /// The profile called `name`; the error lists the known ones.
    pub fn get(&self, name: &str) -> Result<&Profile, String> {
        self.profiles
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| {
                format!(
                    "profile {} does not exist (profiles: {})",
                    crate::text::Shown(name),
                    self.names().join(", ")
                )
            })
    }

    /// The names of every profile.
    pub fn names(&self) -> Vec<&str> {
        self.profiles.iter().map(|p| p.name.as_str()).collect()
    }
}

use super::id::is_dns_label;

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(yaml: &str) -> Result<Profiles, String> {
        let table: BTreeMap<String, RawProfile> =
            serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        Profiles::from_raw(table)
    }

    #[test]
    fn profile_tables() {
        let embedded = Profiles::default();
        assert_eq!(embedded.default_profile().unwrap().name, "local");
        let two = raw(
            "scratch: {lane: local, best_for: [scratch], default: true}\nspare: {lane: local}\n",
        )
        .unwrap();
        assert_eq!(two.names(), vec!["scratch", "spare"]);
        assert_eq!(two.default_profile().unwrap().name, "scratch");
        let err = two.get("fast").unwrap_err();
        assert!(
            err.contains("\"fast\"") && err.contains("scratch, spare"),
            "{err}"
        );
        for (yaml, want) in [
            (
                "a: {lane: local, default: true}\nb: {lane: local, default: true}\n",
                "only one",
            ),
            ("Bad_Name: {lane: local}\n", "not a valid name"),
            ("nfs: {lane: legacy-rwx}\n", "needs `nfs:`"),
            (
                "x: {lane: local, nfs: {server: h, export: /x}}\n",
                "belong to legacy-rwx",
            ),
            ("juice: {lane: shared-rwx}\n", "needs `juicefs:`"),
            (
                "x: {lane: local, juicefs: {meta_url: 'redis://h/1'}}\n",
                "belong to shared-rwx",
            ),
            ("x: {lane: ramdisk}\n", "not a lane"),
            (
                "x: {lane: local, best_for: [everything]}\n",
                "unknown variant",
            ),
            ("x: {lane: local, speed: fast}\n", "unknown field"),
            ("x: {lane: local, block: {}}\n", "belong to fast-rwo"),
            (
                "x: {lane: fast-rwo, block: {fs_type: zfs}}\n",
                "unknown variant",
            ),
            (
                "x: {lane: fast-rwo, block: {}, longhorn: {storage_class: longhorn}}\n",
                "not both",
            ),
            (
                "x: {lane: local, longhorn: {storage_class: l}}\n",
                "belong to fast-rwo",
            ),
        ] {
            let err = raw(yaml).unwrap_err();
            assert!(err.contains(want), "{yaml}: {err}");
        }
        assert!(
            raw("none: {lane: local}\n")
                .unwrap()
                .default_profile()
                .is_none()
        );
    }
}
