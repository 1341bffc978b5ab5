//! Personal and group storage: whom a volume belongs to, who is asking, and what they may do.
//!
//! A volume is personal (one user owns it), group (a [`StorageGroup`] in the claim's namespace
//! lists members with read, write or admin) or unowned (everyone who can name the PVC gets it,
//! as before). Ownership comes from the PVC's annotations at CreateVolume and travels in the
//! volume context, so the node decides at NodePublishVolume with no lookup of the volume: the
//! owner or a writer gets what the pod asked for, a reader gets a read-only mount, anyone else
//! is refused. The rule: when the node cannot know who is asking or what they hold, it refuses
//! (fails closed); it never widens access.

pub mod directory;
pub mod group;

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

pub use group::{Level, Member, StorageGroup, StorageGroupSpec};

/// PVC annotation (and volume context key) naming the user a personal volume belongs to.
pub const OWNER_KEY: &str = "lanes.csi.dev/owner";
/// PVC annotation (and volume context key) naming the StorageGroup a group volume belongs to.
pub const GROUP_KEY: &str = "lanes.csi.dev/group";
/// Volume context key: the claim (`namespace/name`) the volume was made for.
pub const CLAIM_KEY: &str = "lanes.csi.dev/claim";
/// The pod label (or annotation) that names the user a pod runs for, by default.
pub const DEFAULT_USER_KEY: &str = "lanes.csi.dev/user";

/// Whom a volume belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// Personal storage: this user only.
    User(String),
    /// Group storage: the members of the StorageGroup of this name in the claim's namespace.
    Group(String),
}

/// Who owns a volume and the claim it was made for (`namespace/name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    pub owner: Owner,
    pub claim: String,
}

/// A user name as Kubernetes authenticates it (`alice`, `alice@example.com`,
/// `system:serviceaccount:ns:sa`): 1–253 characters, no spaces or control characters.
pub fn check_user(user: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || "._@:+-".contains(c);
    if user.is_empty() || user.len() > 253 || !user.chars().all(allowed) {
        return Err(format!(
            "{} is not a user name (1-253 characters: letters, digits, . _ @ : + -)",
            crate::text::shown(user)
        ));
    }
    Ok(())
}

/// A StorageGroup name: a DNS-1123 subdomain (it names a Kubernetes object).
pub fn check_group(group: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if group.is_empty()
        || group.len() > 253
        || !group.chars().all(allowed)
        || !edge(group.chars().next())
        || !edge(group.chars().last())
    {
        return Err(format!(
            "{} is not a StorageGroup name (lowercase letters, digits, '-' and '.', starting \
             and ending with a letter or digit, at most 253)",
            crate::text::shown(group)
        ));
    }
    Ok(())
}

impl Ownership {
    /// Reads the owner from a PVC's annotations: at most one of `lanes.csi.dev/owner` and
    /// `lanes.csi.dev/group`; neither is an unowned volume.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        claim: String,
    ) -> Result<Option<Ownership>, String> {
        let owner = match (annotations.get(OWNER_KEY), annotations.get(GROUP_KEY)) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "a volume is personal ({OWNER_KEY}) or group ({GROUP_KEY}) storage, not \
                     both: remove one of the annotations"
                ));
            }
            (Some(user), None) => {
                check_user(user).map_err(|e| format!("annotation {OWNER_KEY}: {e}"))?;
                Owner::User(user.clone())
            }
            (None, Some(group)) => {
                check_group(group).map_err(|e| format!("annotation {GROUP_KEY}: {e}"))?;
                Owner::Group(group.clone())
            }
        };
        Ok(Some(Ownership { owner, claim }))
    }

    /// The volume context entries that carry the ownership to the node.
    pub fn context(&self) -> [(String, String); 2] {
        let (key, value) = match &self.owner {
            Owner::User(user) => (OWNER_KEY, user),
            Owner::Group(group) => (GROUP_KEY, group),
        };
        [
            (key.to_owned(), value.clone()),
            (CLAIM_KEY.to_owned(), self.claim.clone()),
        ]
    }

    /// Reads the ownership back from a volume context (NodePublishVolume).
    pub fn from_context(context: &HashMap<String, String>) -> Result<Option<Ownership>, String> {
        let annotations: BTreeMap<String, String> = [OWNER_KEY, GROUP_KEY]
            .into_iter()
            .filter_map(|key| Some((key.to_owned(), context.get(key)?.clone())))
            .collect();
        let claim = context.get(CLAIM_KEY).cloned().unwrap_or_default();
        Ownership::from_annotations(&annotations, claim)
            .map_err(|e| e.replace("annotation", "volume context key"))
    }

    /// How the volume is named to users: `personal storage of alice (PVC ns/name)`.
    pub fn describe(&self) -> String {
        let claim = match self.claim.as_str() {
            "" => String::new(),
            claim => format!(" (PVC {claim})"),
        };
        match &self.owner {
            Owner::User(user) => format!("personal storage of {user}{claim}"),
            Owner::Group(group) => format!("group storage {group}{claim}"),
        }
    }

    /// The namespace of the claim, where the group's StorageGroup lives.
    pub fn namespace(&self) -> Option<&str> {
        self.claim.split_once('/').map(|(namespace, _)| namespace)
    }
}

/// What a publish may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Mount as the pod asked (owner, writer, admin, or an unowned volume).
    AsAsked,
    /// Mount read-only whatever the pod asked (a reader).
    ReadOnly,
    /// Refuse, for this reason (said to the user).
    Denied(String),
}

impl Decision {
    /// The outcome label of the decisions metric.
    pub fn outcome(&self) -> &'static str {
        match self {
            Decision::AsAsked => "allowed",
            Decision::ReadOnly => "read-only",
            Decision::Denied(_) => "denied",
        }
    }
}

/// Decides for `user` (None: the pod names no user) on a volume with `ownership`; `members`
/// is the group's member list when the volume is group storage and the group exists.
pub fn decide(ownership: &Ownership, user: Option<&str>, members: Option<&[Member]>) -> Decision {
    let Some(user) = user else {
        return Decision::Denied(format!(
            "{} is owned, and the pod names no user: set the pod label {DEFAULT_USER_KEY} (or \
             the label the cluster's Lanes is configured to read)",
            ownership.describe()
        ));
    };
    match &ownership.owner {
        Owner::User(owner) if owner == user => Decision::AsAsked,
        Owner::User(_) => Decision::Denied(format!(
            "user {user} has no access to {}: only its owner may mount it",
            ownership.describe()
        )),
        Owner::Group(group) => {
            let Some(members) = members else {
                return Decision::Denied(format!(
                    "user {user} has no access to {}: StorageGroup {group} does not exist in \
                     namespace {}; ask a platform admin to create it",
                    ownership.describe(),
                    ownership.namespace().unwrap_or("?")
                ));
            };
            match members.iter().find(|m| m.user == user).map(|m| m.level) {
                Some(Level::Write | Level::Admin) => Decision::AsAsked,
                Some(Level::Read) => Decision::ReadOnly,
                None => Decision::Denied(format!(
                    "user {user} has no access to {}; ask a group admin",
                    ownership.describe()
                )),
            }
        }
    }
}

/// Where the node reads a pod's user from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserSource {
    Label(String),
    Annotation(String),
}

impl Default for UserSource {
    fn default() -> Self {
        UserSource::Label(DEFAULT_USER_KEY.to_owned())
    }
}

impl UserSource {
    /// Parses `label:<key>` or `annotation:<key>` (config `access.user_from`).
    pub fn parse(text: &str) -> Result<UserSource, String> {
        let bad = || {
            format!(
                "{} is not label:<key> or annotation:<key>",
                crate::text::shown(text)
            )
        };
        let (kind, key) = text.split_once(':').ok_or_else(bad)?;
        if key.is_empty() || key.chars().any(|c| c.is_whitespace()) {
            return Err(bad());
        }
        match kind {
            "label" => Ok(UserSource::Label(key.to_owned())),
            "annotation" => Ok(UserSource::Annotation(key.to_owned())),
            _ => Err(bad()),
        }
    }

    /// The user `metadata` names, if any.
    pub fn user_of<'a>(
        &self,
        metadata: &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Option<&'a str> {
        let (map, key) = match self {
            UserSource::Label(key) => (&metadata.labels, key),
            UserSource::Annotation(key) => (&metadata.annotations, key),
        };
        map.as_ref()?
            .get(key)
            .map(String::as_str)
            .filter(|u| !u.is_empty())
    }
}

impl std::fmt::Display for UserSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserSource::Label(key) => write!(f, "label {key}"),
            UserSource::Annotation(key) => write!(f, "annotation {key}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(members: &[(&str, Level)]) -> Vec<Member> {
        members
            .iter()
            .map(|(user, level)| Member {
                user: user.to_string(),
                level: *level,
            })
            .collect()
    }

    fn owned(owner: Owner) -> Ownership {
        Ownership {
            owner,
            claim: "vision/datasets".into(),
        }
    }

    #[test]
    fn decides_by_owner_and_level() {
        let personal = owned(Owner::User("alice".into()));
        assert_eq!(decide(&personal, Some("alice"), None), Decision::AsAsked);
        let Decision::Denied(why) = decide(&personal, Some("bob"), None) else {
            panic!("bob must be refused")
        };
        assert!(why.contains("user bob has no access to personal storage of alice"));
        assert!(
            matches!(decide(&personal, None, None), Decision::Denied(m) if m.contains(DEFAULT_USER_KEY))
        );

        let shared = owned(Owner::Group("vision".into()));
        let members = group(&[
            ("reader", Level::Read),
            ("writer", Level::Write),
            ("admin", Level::Admin),
        ]);
        let at = |user| decide(&shared, Some(user), Some(&members));
        assert_eq!(at("reader"), Decision::ReadOnly);
        assert_eq!(at("writer"), Decision::AsAsked);
        assert_eq!(at("admin"), Decision::AsAsked);
        let Decision::Denied(why) = at("mallory") else {
            panic!("a non-member must be refused")
        };
        assert_eq!(
            why,
            "user mallory has no access to group storage vision (PVC vision/datasets); ask a \
             group admin"
        );
        assert!(
            matches!(decide(&shared, Some("writer"), None), Decision::Denied(m) if m.contains("does not exist in namespace vision"))
        );
    }

    #[test]
    fn reads_ownership_from_annotations_and_context() {
        let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let claim = || "ns/pvc".to_owned();
        assert_eq!(Ownership::from_annotations(&map(&[]), claim()), Ok(None));
        let alice = Ownership::from_annotations(&map(&[(OWNER_KEY, "alice@example.com")]), claim())
            .unwrap()
            .unwrap();
        assert_eq!(alice.owner, Owner::User("alice@example.com".into()));
        let context: HashMap<String, String> = alice.context().into_iter().collect();
        assert_eq!(Ownership::from_context(&context), Ok(Some(alice)));
        for bad in [
            map(&[(OWNER_KEY, "a"), (GROUP_KEY, "g")]),
            map(&[(OWNER_KEY, "")]),
            map(&[(OWNER_KEY, "a b")]),
            map(&[(GROUP_KEY, "Vision")]),
            map(&[(GROUP_KEY, "-x")]),
            map(&[(GROUP_KEY, "../x")]),
        ] {
            assert!(
                Ownership::from_annotations(&bad, claim()).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn parses_the_user_source() {
        assert_eq!(
            UserSource::parse("annotation:example.com/user"),
            Ok(UserSource::Annotation("example.com/user".into()))
        );
        assert_eq!(
            UserSource::parse("label:lanes.csi.dev/user"),
            Ok(UserSource::default())
        );
        for bad in ["", "label", "label:", "field:x", "label:a b"] {
            assert!(UserSource::parse(bad).is_err(), "{bad}");
        }
    }
}
