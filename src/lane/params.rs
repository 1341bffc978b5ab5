//! StorageClass parameters, parsed once into a typed struct.
//!
//! Rule: an unknown key is an `InvalidArgument` that names it. Keys under `csi.storage.k8s.io/`
//! are added by the Kubernetes sidecars and are accepted and ignored.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use super::Error;
use super::profile::Profiles;

/// What happens to a volume's data when the volume is deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDelete {
    /// Remove the data.
    #[default]
    Delete,
    /// Move the data aside under `<data-dir>/retained/` for an admin to deal with.
    Retain,
    /// Like retain, named `archived-<dir>-<time>` (on shared-rwx: beside the volumes, in the
    /// file system, where its users can still reach it).
    Archive,
}

/// Parameters a volume is created with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateParams {
    /// The storage profile (one of the config's `profiles:`).
    pub profile: String,
    #[serde(rename = "onDelete")]
    pub on_delete: OnDelete,
    /// A dataset reference whose data the volume starts with (pinned at creation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// Whom the volume belongs to (personal or group storage), from the PVC's annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ownership: Option<crate::access::Ownership>,
}

const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

impl CreateParams {
    /// Parses StorageClass parameters against the profile table: `profile` must name one of
    /// `profiles` (none named: the default profile, which must then exist).
    pub fn parse(raw: &HashMap<String, String>, profiles: &Profiles) -> Result<Self, Error> {
        let mut params = CreateParams::default();
        let mut named = None;
        let mut on_delete = None;
        for (key, value) in raw {
            match key.as_str() {
                "profile" => named = Some(value.as_str()),
                "onDelete" => {
                    on_delete = Some(match value.as_str() {
                        "delete" => OnDelete::Delete,
                        "retain" => OnDelete::Retain,
                        "archive" => OnDelete::Archive,
                        other => {
                            return Err(Error::InvalidParameter {
                                key: key.clone(),
                                reason: format!("{other:?} is not one of: delete, retain, archive"),
                            });
                        }
                    })
                }
                "dataset" => {
                    crate::dataset::Reference::parse(value).map_err(|e| {
                        Error::InvalidParameter {
                            key: key.clone(),
                            reason: e.reason,
                        }
                    })?;
                    params.dataset = Some(value.clone());
                }
                other if other.starts_with(SIDECAR_PREFIX) => {}
                other => return Err(Error::UnknownParameter(crate::text::shown(other))),
            }
        }
        let profile = match named {
            Some(name) => profiles.get(name),
            None => profiles.default_profile().ok_or_else(|| {
                format!(
                    "no profile is the default; the StorageClass must name one (profiles: {})",
                    profiles.names().join(", ")
                )
            }),
        };
        let profile = profile.map_err(|reason| Error::InvalidParameter {
            key: "profile".into(),
            reason,
        })?;
        params.profile = profile.name.clone();
        // The StorageClass's word, else the profile's default.
        params.on_delete = on_delete.unwrap_or(profile.on_delete);
        Ok(params)
    }

    /// The parameters as the CO would pass them, for ValidateVolumeCapabilities and listings.
    pub fn to_map(&self) -> BTreeMap<String, String> {
        let on_delete = match self.on_delete {
            OnDelete::Delete => "delete",
            OnDelete::Retain => "retain",
            OnDelete::Archive => "archive",
        };
        let mut map = BTreeMap::from([
            ("profile".to_owned(), self.profile.clone()),
            ("onDelete".to_owned(), on_delete.to_owned()),
        ]);
        if let Some(dataset) = &self.dataset {
            map.insert("dataset".to_owned(), dataset.clone());
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_parameters() {
        struct Case {
            desc: &'static str,
            raw: &'static [(&'static str, &'static str)],
            want: Result<OnDelete, Kind>,
        }
        let cases = [
            Case {
                desc: "empty",
                raw: &[],
                want: Ok(OnDelete::Delete),
            },
            Case {
                desc: "retain",
                raw: &[("onDelete", "retain")],
                want: Ok(OnDelete::Retain),
            },
            Case {
                desc: "profile",
                raw: &[("profile", "local")],
                want: Ok(OnDelete::Delete),
            },
            Case {
                desc: "sidecar keys",
                raw: &[
                    ("csi.storage.k8s.io/pvc/name", "x"),
                    ("csi.storage.k8s.io/pv/name", "y"),
                ],
                want: Ok(OnDelete::Delete),
            },
            Case {
                desc: "unknown key",
                raw: &[("fstype", "xfs")],
                want: Err(Kind::InvalidArgument),
            },
            Case {
                desc: "bad value",
                raw: &[("onDelete", "shred")],
                want: Err(Kind::InvalidArgument),
            },
            Case {
                desc: "unknown profile",
                raw: &[("profile", "gold")],
                want: Err(Kind::InvalidArgument),
            },
        ];
        for case in cases {
            let got = CreateParams::parse(&map(case.raw), &Profiles::default())
                .map(|p| p.on_delete)
                .map_err(|e| e.kind());
            assert_eq!(got, case.want, "{}", case.desc);
        }
    }

    #[test]
    fn profiles_come_from_the_table() {
        let table: std::collections::BTreeMap<String, super::super::profile::RawProfile> =
            serde_yaml_ng::from_str("fast: {lane: local}\nslow: {lane: local, default: true}\n")
                .unwrap();
        let profiles = Profiles::from_raw(table).unwrap();
        assert_eq!(
            CreateParams::parse(&map(&[]), &profiles).unwrap().profile,
            "slow"
        );
        let fast = CreateParams::parse(&map(&[("profile", "fast")]), &profiles).unwrap();
        assert_eq!(fast.profile, "fast");
        let err = CreateParams::parse(&map(&[("profile", "local")]), &profiles).unwrap_err();
        assert!(err.to_string().contains("fast, slow"), "{err}");
        let no_default =
            Profiles::from_raw(serde_yaml_ng::from_str("fast: {lane: local}\n").unwrap()).unwrap();
        let err = CreateParams::parse(&map(&[]), &no_default).unwrap_err();
        assert!(err.to_string().contains("must name one"), "{err}");
    }

    #[test]
    fn a_profile_sets_the_on_delete_a_storage_class_leaves_out() {
        let table = serde_yaml_ng::from_str(
            "share: {lane: local, default: true, on_delete: archive}\nscratch: {lane: local}\n",
        )
        .unwrap();
        let profiles = Profiles::from_raw(table).unwrap();
        let on_delete =
            |raw: &[(&str, &str)]| CreateParams::parse(&map(raw), &profiles).unwrap().on_delete;
        assert_eq!(on_delete(&[]), OnDelete::Archive);
        assert_eq!(on_delete(&[("onDelete", "delete")]), OnDelete::Delete);
        assert_eq!(on_delete(&[("profile", "scratch")]), OnDelete::Delete);
        let bad = serde_yaml_ng::from_str::<
            std::collections::BTreeMap<String, super::super::profile::RawProfile>,
        >("x: {lane: local, on_delete: shred}\n")
        .unwrap_err();
        assert!(bad.to_string().contains("delete"), "{bad}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            CreateParams::parse(&map(&[("replicas", "3")]), &Profiles::default()).unwrap_err();
        assert!(err.to_string().contains("\"replicas\""), "{err}");
    }
}
