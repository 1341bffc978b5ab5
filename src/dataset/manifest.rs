//! A dataset version's manifest: every entry's relative path, kind, size, mode and SHA-256,
//! plus the version's message, creation time, parent and committed flag.
//!
//! Rules enforced by [`Manifest::validate`], before any entry becomes a path: paths are
//! relative, made of normal components only (no `..`, `.`, empty parts, NUL), unique, and
//! every parent is a directory of the manifest; files carry a 64-digit lowercase SHA-256;
//! symlinks are relative and, resolved from where they sit, stay inside the tree.

use std::collections::HashSet;
use std::fmt;
use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// The manifest format this build writes and reads.
pub const FORMAT: u32 = 1;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
}

/// A body's SHA-256, held as its 32 bytes (64 lowercase hex digits in a manifest, a key or a
/// path): a manifest of a million files keeps a million of these, so no heap string each.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// Reads 64 lowercase hex digits; `None` for anything else.
    pub fn parse(text: &str) -> Option<Digest> {
        let text = text.as_bytes();
        if text.len() != 64 {
            return None;
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Some(Digest(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 64];
        for (pair, byte) in text.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 15)];
        }
        f.write_str(std::str::from_utf8(&text).expect("hex is ASCII"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a SHA-256 as 64 lowercase hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Digest, E> {
                Digest::parse(text).ok_or_else(|| {
                    E::custom(format_args!(
                        "{:?} is not a valid SHA-256 (64 lowercase hex digits)",
                        crate::text::Shown(text)
                    ))
                })
            }
        }
        deserializer.deserialize_str(Hex)
    }
}

/// One entry of a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path, `/`-separated.
    pub path: String,
    pub kind: EntryKind,
    /// Bytes (files only; 0 otherwise).
    #[serde(default)]
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    /// Lowercase hex SHA-256 of the body (files only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<Digest>,
    /// The link text (symlinks only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// A version of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub dataset: String,
    pub version: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub message: String,
    pub created_unix: u64,
    pub committed: bool,
    pub entries: Vec<Entry>,
}

/// A manifest that must not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest of {dataset}:{version}: {reason}")]
pub struct InvalidManifest {
    pub dataset: String,
    pub version: String,
    pub reason: String,
}

impl Manifest {
    /// Total bytes of the version's files.
    pub fn size(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }

    /// Number of regular files.
    pub fn files(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.kind == EntryKind::File)
            .count()
    }

    /// Checks every rule of the module docs.
    pub fn validate(&self) -> Result<(), InvalidManifest> {
        let fail = |reason: String| InvalidManifest {
            dataset: self.dataset.clone(),
            version: self.version.clone(),
            reason,
        };
        if self.format != FORMAT {
            return Err(fail(format!(
                "format {} is not supported (this build reads {FORMAT})",
                self.format
            )));
        }
        let dirs: HashSet<&str> = self
            .entries
            .iter()
            .filter(|e| e.kind == EntryKind::Dir)
            .map(|e| e.path.as_str())
            .collect();
        let mut seen = HashSet::new();
        for entry in &self.entries {
            check_path(&entry.path).map_err(|r| fail(format!("path {:?}: {r}", entry.path)))?;
            if !seen.insert(entry.path.as_str()) {
                return Err(fail(format!("path {:?} appears twice", entry.path)));
            }
            if let Some((parent, _)) = entry.path.rsplit_once('/')
                && !dirs.contains(parent)
            {
                return Err(fail(format!(
                    "{:?} has no directory entry for its parent",
                    entry.path
                )));
            }
            match entry.kind {
                EntryKind::File => {
                    if entry.sha256.is_none() {
                        return Err(fail(format!("file {:?} has no valid SHA-256", entry.path)));
                    }
                }
                EntryKind::Symlink => {
                    let target = entry.target.as_deref().unwrap_or("");
                    if !link_stays_inside(&entry.path, target) {
                        return Err(fail(format!(
                            "symlink {:?} -> {target:?} points outside the dataset",
                            entry.path
                        )));
                    }
                }
                EntryKind::Dir => {}
            }
        }
        Ok(())
    }
}

/// A relative path of normal components only.
pub fn check_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.contains('\0') {
        return Err("contains NUL");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    for part in path.split('/') {
        match part {
            "" => return Err("has an empty component"),
            "." | ".." => return Err("contains '.' or '..'"),
            _ => {}
        }
    }
    Ok(())
}

/// True when a link at `path` holding `target` resolves, lexically, inside the tree.
pub fn link_stays_inside(path: &str, target: &str) -> bool {
    if target.is_empty() || target.contains('\0') || Path::new(target).is_absolute() {
        return false;
    }
    let mut depth: i64 = path.matches('/').count() as i64;
    for component in Path::new(target).components() {
        match component {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn file(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::File,
            size: 4,
            mode: 0o644,
            sha256: Digest::parse(HASH),
            target: None,
        }
    }
    fn dir(path: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Dir,
            size: 0,
            mode: 0o755,
            sha256: None,
            target: None,
        }
    }
    fn link(path: &str, target: &str) -> Entry {
        Entry {
            path: path.into(),
            kind: EntryKind::Symlink,
            size: 0,
            mode: 0o777,
            sha256: None,
            target: Some(target.into()),
        }
    }
    fn manifest(entries: Vec<Entry>) -> Manifest {
        Manifest {
            format: FORMAT,
            dataset: "ds".into(),
            version: "v1".into(),
            parent: None,
            message: String::new(),
            created_unix: 0,
            committed: true,
            entries,
        }
    }

    #[test]
    fn valid_manifest_passes_and_round_trips() {
        let m = manifest(vec![
            dir("a"),
            file("a/x"),
            link("a/l", "x"),
            link("top", "a/x"),
            dir("a/b"),
            link("a/b/up", "../x"),
        ]);
        m.validate().unwrap();
        let text = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<Manifest>(&text).unwrap(), m);
        assert_eq!(m.files(), 1);
        assert_eq!(m.size(), 4);
    }

    #[test]
    fn bad_manifests_are_refused_with_the_reason() {
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![file("../escape")], "'..'"),
            (vec![file("/etc/passwd")], "absolute"),
            (vec![dir("a"), file("a/./x")], "'.'"),
            (vec![file("a//x")], "empty component"),
            (vec![file("nul\0")], "NUL"),
            (vec![file("x"), file("x")], "twice"),
            (vec![file("missing/parent")], "parent"),
            (
                vec![Entry {
                    sha256: None,
                    ..file("x")
                }],
                "SHA-256",
            ),
            (vec![link("l", "../outside")], "outside"),
            (vec![link("l", "/etc/shadow")], "outside"),
            (vec![dir("a"), link("a/l", "../../x")], "outside"),
        ];
        for (entries, reason) in cases {
            let err = manifest(entries).validate().unwrap_err();
            assert!(err.reason.contains(reason), "{reason}: {}", err.reason);
        }
        let mut future = manifest(vec![]);
        future.format = 99;
        assert!(future.validate().unwrap_err().reason.contains("format"));
    }

    #[test]
    fn digests_are_hex_on_the_wire_and_bytes_in_memory() {
        let digest = Digest::parse(HASH).unwrap();
        assert_eq!(digest.to_string(), HASH);
        assert_eq!(
            serde_json::to_string(&digest).unwrap(),
            format!("\"{HASH}\"")
        );
        for bad in [
            "abc",
            &HASH.to_uppercase(),
            &format!("{}g", &HASH[..63]),
            &format!("{HASH}0"),
        ] {
            assert_eq!(Digest::parse(bad), None, "{bad}");
            let err = serde_json::from_str::<Digest>(&format!("\"{bad}\"")).unwrap_err();
            assert!(err.to_string().contains("not a valid SHA-256"), "{err}");
        }
    }

    #[test]
    fn link_containment_is_lexical_from_the_links_directory() {
        assert!(link_stays_inside("a/b/l", "../../x"));
        assert!(!link_stays_inside("a/b/l", "../../../x"));
        assert!(link_stays_inside("l", "./x"));
        assert!(!link_stays_inside("l", ""));
        assert!(!link_stays_inside("a/l", "x/../../.."));
    }
}
