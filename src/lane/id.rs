//! Volume IDs and on-disk names.
//!
//! A volume ID is `<lane>/<dir>`, or `<lane>/<fs>/<dir>` on a lane with several file systems
//! (`shared-rwx`, `legacy-rwx`: `<fs>` is the profile naming the file system or export): self-describing, so no database is needed to find a volume,
//! and parsed strictly before it ever becomes a path. `<dir>` is the CO's volume name when that
//! name is already a safe directory name, and otherwise `_` plus a SHA-256 prefix of the name,
//! so any name the CSI spec allows maps to one safe directory and back (via the metadata).

use std::fmt;

use sha2::{Digest, Sha256};

use super::Error;

/// The CSI spec's limit for string fields, volume IDs and names included.
pub const MAX_FIELD_BYTES: usize = 128;
/// The longest directory name a volume may have.
const MAX_DIR_BYTES: usize = 100;
/// Lanes known to this build.
pub const LANES: &[&str] = &["local", "fast-rwo", "shared-rwx", "legacy-rwx"];
/// Lanes whose IDs name a file system (a profile) before the directory.
const FS_LANES: &[&str] = &["shared-rwx", "legacy-rwx"];

/// A parsed, validated volume ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct VolumeId {
    lane: String,
    fs: Option<String>,
    dir: String,
}

impl VolumeId {
    /// The ID for a new volume created from the CO's `name` on `lane`.
    pub fn for_name(lane: &str, name: &str) -> Result<VolumeId, Error> {
        validate_name(name)?;
        let dir = if is_safe_dir(name) {
            name.to_owned()
        } else {
            hashed(name)
        };
        Ok(VolumeId {
            lane: lane.to_owned(),
            fs: None,
            dir,
        })
    }

    /// The ID for a new volume `name` in file system (profile) `fs` of `lane`; a name that
    /// would make the ID longer than the spec allows gets the hashed directory form.
    pub fn in_fs(lane: &str, fs: &str, name: &str) -> Result<VolumeId, Error> {
        let mut id = VolumeId::for_name(lane, name)?;
        if !is_dns_label(fs) {
            return Err(Error::InvalidParameter {
                key: "profile".into(),
                reason: format!("{} is not a DNS label", printable(fs)),
            });
        }
        if lane.len() + fs.len() + id.dir.len() + 2 > MAX_FIELD_BYTES {
            id.dir = hashed(name);
        }
        id.fs = Some(fs.to_owned());
        Ok(id)
    }

    /// Parses an ID from a request. Malformed IDs are `InvalidVolumeId`; well-formed IDs of a
    /// lane this build does not know are `UnknownVolume` (they cannot name one of our volumes).
    pub fn parse(id: &str) -> Result<VolumeId, Error> {
        let invalid = |reason: &str| Error::InvalidVolumeId {
            id: printable(id),
            reason: reason.to_owned(),
        };
        if id.is_empty() {
            return Err(Error::Missing("volume_id"));
        }
        if id.len() > MAX_FIELD_BYTES {
            return Err(invalid("it is longer than 128 bytes"));
        }
        if id.chars().any(char::is_control) {
            return Err(invalid("it contains control characters"));
        }
        let Some((lane, dir)) = id.split_once('/') else {
            return Err(Error::UnknownVolume(id.to_owned()));
        };
        if !LANES.contains(&lane) {
            return Err(Error::UnknownVolume(id.to_owned()));
        }
        let (fs, dir) = match dir.split_once('/') {
            Some((fs, dir)) if FS_LANES.contains(&lane) => {
                if !is_dns_label(fs) {
                    return Err(invalid("the file system part must be a profile name"));
                }
                (Some(fs.to_owned()), dir)
            }
            None if FS_LANES.contains(&lane) => {
                return Err(invalid(&format!(
                    "a {lane} ID is {lane}/<profile>/<directory>"
                )));
            }
            _ => (None, dir),
        };
        if !is_volume_dir(dir) {
            return Err(invalid(
                "the part after the lane must be 1-100 of [A-Za-z0-9._-], not starting with '.' or '-'",
            ));
        }
        Ok(VolumeId {
            lane: lane.to_owned(),
            fs,
            dir: dir.to_owned(),
        })
    }

    pub fn lane(&self) -> &str {
        &self.lane
    }

    /// The file system (profile) the volume is in, on lanes that have several.
    pub fn fs(&self) -> Option<&str> {
        self.fs.as_deref()
    }

    /// The directory name of the volume under its lane's base; always a single safe component.
    pub fn dir(&self) -> &str {
        &self.dir
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.fs {
            Some(fs) => write!(f, "{}/{fs}/{}", self.lane, self.dir),
            None => write!(f, "{}/{}", self.lane, self.dir),
        }
    }
}

/// Checks a CO volume name against the spec: non-empty, at most 128 bytes, and none of the
/// control characters the spec bans.
pub fn validate_name(name: &str) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::Missing("name"));
    }
    let invalid = |reason: &str| Error::InvalidName {
        name: printable(name),
        reason: reason.to_owned(),
    };
    if name.len() > MAX_FIELD_BYTES {
        return Err(invalid("it is longer than 128 bytes"));
    }
    let banned = |c: char| matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}'..='\u{9f}');
    if name.chars().any(banned) {
        return Err(invalid("it contains control characters"));
    }
    Ok(())
}

/// `_` and the first 40 hex digits of the name's SHA-256.
fn hashed(name: &str) -> String {
    let digest = Sha256::digest(name.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("_{hex}")
}

/// A DNS label (profile names are): 1-63 of a-z, 0-9 and '-', not starting or ending in '-'.
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// A name usable as-is: `[A-Za-z0-9][A-Za-z0-9._-]*`, no `..`, at most 100 bytes.
fn is_safe_dir(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    first_ok
        && name.len() <= MAX_DIR_BYTES
        && !name.contains("..")
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A directory part of a volume ID: a safe name, or `_` and 40 hex digits.
fn is_volume_dir(dir: &str) -> bool {
    match dir.strip_prefix('_') {
        Some(hex) => hex.len() == 40 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        None => is_safe_dir(dir),
    }
}

/// A short, log-safe rendering of untrusted text for error messages.
pub fn printable(text: &str) -> String {
    let mut out: String = text.chars().take(64).collect();
    if text.chars().count() > 64 {
        out.push('…');
    }
    format!("{out:?}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    #[test]
    fn names_map_to_safe_dirs() {
        let cases = [
            ("pvc-0b6c5f1e-1", "pvc-0b6c5f1e-1"),
            ("Data.set_1", "Data.set_1"),
        ];
        for (name, dir) in cases {
            assert_eq!(VolumeId::for_name("local", name).unwrap().dir(), dir);
        }
        for name in [
            "../etc",
            "a/b",
            "with space",
            ".hidden",
            "-flag",
            "a..b",
            "ü",
        ] {
            let id = VolumeId::for_name("local", name).unwrap();
            assert!(id.dir().starts_with('_') && id.dir().len() == 41, "{name}");
            assert_eq!(VolumeId::parse(&id.to_string()).unwrap(), id, "{name}");
        }
        let long = "x".repeat(101);
        assert!(
            VolumeId::for_name("local", &long)
                .unwrap()
                .dir()
                .starts_with('_')
        );
    }

    #[test]
    fn bad_names_are_invalid_arguments() {
        for name in ["", "nul\0byte", "bell\u{7}", &"y".repeat(129)] {
            let err = VolumeId::for_name("local", name).unwrap_err();
            assert_eq!(err.kind(), Kind::InvalidArgument, "{name:?}");
        }
    }

    #[test]
    fn parses_ids_strictly() {
        struct Case {
            id: &'static str,
            want: Result<&'static str, Kind>,
        }
        let cases = [
            Case {
                id: "local/pvc-1",
                want: Ok("pvc-1"),
            },
            Case {
                id: "local/_0123456789abcdef0123456789abcdef01234567",
                want: Ok("_0123456789abcdef0123456789abcdef01234567"),
            },
            Case {
                id: "",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/../../etc",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/..",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/a/b",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/.tmp-x",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/_nothex",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "local/nul\0",
                want: Err(Kind::InvalidArgument),
            },
            Case {
                id: "reallyfakevolumeid",
                want: Err(Kind::NotFound),
            },
            Case {
                id: "nfs/pvc-1",
                want: Err(Kind::NotFound),
            },
        ];
        for case in cases {
            let got = VolumeId::parse(case.id).map_err(|e| e.kind());
            let got = got.as_ref().map(|id| id.dir()).map_err(|k| *k);
            assert_eq!(got, case.want, "{:?}", case.id);
        }
        let long = format!("local/{}", "z".repeat(200));
        assert_eq!(
            VolumeId::parse(&long).unwrap_err().kind(),
            Kind::InvalidArgument
        );
    }
}
