//! A dataset version's manifest: every entry's relative path, kind, size, mode and SHA-256,
//! plus the version's message, creation time, parent and committed flag.
//!
//! Rules enforced by [`Checker`], entry by entry, before any entry becomes a path: paths are
//! relative, made of normal components only (no `..`, `.`, empty parts, NUL), unique, and
//! every parent is a directory of the manifest; files carry a 64-digit lowercase SHA-256;
//! symlinks are relative and, resolved from where they sit, stay inside the tree.
//!
//! Entries are kept in [`tree_order`], a line each after the head, so a version of millions
//! of files is written, read and checked as a stream, never held (format 2). Format 1
//! manifests (one JSON document, entries in any order) are still read.

use std::cmp::Ordering;
use std::fmt;
use std::path::{Component, Path};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The manifest format this build writes: a [`Head`] line, then one entry a line in
/// [`tree_order`].
pub const FORMAT: u32 = 2;
/// The first format, still read: one document holding every entry, in any order.
pub const FORMAT_1: u32 = 1;

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

/// What a version says of itself: the first line of its manifest (format 2), ahead of its
/// entries. `files` and `bytes` let a listing answer without reading the entries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    pub format: u32,
    pub dataset: String,
    pub version: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(default)]
    pub message: String,
    pub created_unix: u64,
    pub committed: bool,
    /// Regular files of the version (format 1 manifests: counted as they are read).
    #[serde(default)]
    pub files: u64,
    /// Their bytes.
    #[serde(default)]
    pub bytes: u64,
}

/// A manifest that must not be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("manifest of {dataset}:{version}: {reason}")]
pub struct InvalidManifest {
    pub dataset: String,
    pub version: String,
    pub reason: String,
}

/// The order entries are kept in: path components compared one by one, byte by byte. It is
/// a depth-first walk with each directory's names sorted, so every directory comes right
/// before its own subtree (what lets [`Checker`] and every reader work in one pass).
pub fn tree_order(a: &str, b: &str) -> Ordering {
    // With '/' below every other byte (a checked path holds no NUL), comparing bytes
    // compares components.
    let key = |c: u8| if c == b'/' { 0 } else { c };
    a.bytes().map(key).cmp(b.bytes().map(key))
}

/// Checks a version's entries one at a time, in the order they are stored, against every
/// rule of the module docs, in memory bounded by the tree's depth (not its size): paths must
/// rise strictly in [`tree_order`] (so none appears twice), and each entry's parent must be
/// the directory most recently opened on its way down.
#[derive(Debug, Default)]
pub struct Checker {
    last: Option<String>,
    /// The deepest directory open on the way down, and the lengths of it and its ancestors.
    open: String,
    depths: Vec<usize>,
}

impl Checker {
    /// Checks the next entry; the error is the reason, naming the path.
    pub fn check(&mut self, entry: &Entry) -> Result<(), String> {
        let path = entry.path.as_str();
        check_path(path).map_err(|r| format!("path {path:?}: {r}"))?;
        if let Some(last) = &self.last {
            match tree_order(last, path) {
                Ordering::Less => {}
                Ordering::Equal => return Err(format!("path {path:?} appears twice")),
                Ordering::Greater => {
                    return Err(format!("path {path:?} is out of order (after {last:?})"));
                }
            }
        }
        let parent = path.rsplit_once('/').map_or("", |(parent, _)| parent);
        while let Some(&depth) = self.depths.last() {
            let dir = &self.open[..depth];
            let inside = parent == dir
                || (parent.starts_with(dir) && parent.as_bytes().get(depth) == Some(&b'/'));
            if inside {
                break;
            }
            self.depths.pop();
        }
        self.open.truncate(self.depths.last().copied().unwrap_or(0));
        if !parent.is_empty() && self.open != parent {
            return Err(format!("{path:?} has no directory entry for its parent"));
        }
        match entry.kind {
            EntryKind::File if entry.sha256.is_none() => {
                return Err(format!("file {path:?} has no valid SHA-256"));
            }
            EntryKind::Symlink => {
                let target = entry.target.as_deref().unwrap_or("");
                if !link_stays_inside(path, target) {
                    return Err(format!(
                        "symlink {path:?} -> {target:?} points outside the dataset"
                    ));
                }
            }
            EntryKind::Dir => {
                self.open.clear();
                self.open.push_str(path);
                self.depths.push(path.len());
            }
            EntryKind::File => {}
        }
        let last = self.last.get_or_insert_with(String::new);
        last.clear();
        last.push_str(path);
        Ok(())
    }
}

/// The first document of a file of entries, whichever format: format 1 holds its entries in
/// it; format 2 has them on the lines that follow.
#[derive(Deserialize)]
struct First<H> {
    #[serde(flatten)]
    head: H,
    #[serde(default)]
    entries: Option<Vec<Entry>>,
}

/// The entries that follow a head, in [`tree_order`]: read a line at a time (format 2), or,
/// for a format 1 document, sorted after it was read whole (its entries were in any order).
pub enum Entries<R: std::io::Read> {
    Lines(serde_json::StreamDeserializer<'static, serde_json::de::IoRead<R>, Entry>),
    Held(std::vec::IntoIter<Entry>),
}

impl<R: std::io::Read> Iterator for Entries<R> {
    type Item = Result<Entry, serde_json::Error>;

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Entries::Lines(lines) => lines.next(),
            Entries::Held(held) => held.next().map(Ok),
        }
    }
}

/// Reads the head of a file of entries (a manifest, a cache record) and hands back its
/// entries to stream. Checking them is the caller's ([`Checker`]).
pub fn read_framed<H: DeserializeOwned, R: std::io::Read>(
    reader: R,
) -> Result<(H, Entries<R>), serde_json::Error> {
    let mut document = serde_json::Deserializer::from_reader(reader);
    let first = First::<H>::deserialize(&mut document)?;
    let entries = match first.entries {
        Some(mut held) => {
            held.sort_by(|a, b| tree_order(&a.path, &b.path));
            Entries::Held(held.into_iter())
        }
        None => Entries::Lines(document.into_iter()),
    };
    Ok((first.head, entries))
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
    /// Checks `entries` as a format 1 manifest is checked: sorted into tree order first.
    fn check_all(mut entries: Vec<Entry>) -> Result<(), String> {
        entries.sort_by(|a, b| tree_order(&a.path, &b.path));
        let mut checker = Checker::default();
        entries.iter().try_for_each(|e| checker.check(e))
    }

    fn head() -> Head {
        Head {
            format: FORMAT,
            dataset: "ds".into(),
            version: "v1".into(),
            parent: None,
            message: String::new(),
            created_unix: 0,
            committed: true,
            files: 1,
            bytes: 4,
        }
    }

    #[test]
    fn valid_entries_pass_in_either_format() {
        let entries = vec![
            dir("a"),
            file("a/x"),
            link("a/l", "x"),
            link("top", "a/x"),
            dir("a/b"),
            link("a/b/up", "../x"),
        ];
        check_all(entries.clone()).unwrap();

        // Format 2: a head line, then the entries a line each, already in tree order.
        let mut sorted = entries.clone();
        sorted.sort_by(|a, b| tree_order(&a.path, &b.path));
        let mut text = serde_json::to_string(&head()).unwrap();
        for entry in &sorted {
            text.push('\n');
            text.push_str(&serde_json::to_string(entry).unwrap());
        }
        let (read, lines) = read_framed::<Head, _>(text.as_bytes()).unwrap();
        assert_eq!(read, head());
        let lines: Vec<Entry> = lines.map(Result::unwrap).collect();
        assert_eq!(lines, sorted);

        // Format 1: one document, entries in any order; read back sorted.
        let old = serde_json::json!({
            "format": FORMAT_1, "dataset": "ds", "version": "v1", "message": "",
            "created_unix": 0, "committed": true, "entries": entries,
        });
        let old = old.to_string();
        let (read, held) = read_framed::<Head, _>(old.as_bytes()).unwrap();
        assert_eq!(
            (read.format, read.files),
            (FORMAT_1, 0),
            "counted by the reader"
        );
        let held: Vec<Entry> = held.map(Result::unwrap).collect();
        assert_eq!(held, sorted);
    }

    #[test]
    fn tree_order_puts_every_directory_right_before_its_subtree() {
        let mut paths = vec!["a.b", "a/b", "a", "a-c/x", "a-c", "a/b/c", "b", "a/a"];
        paths.sort_by(|a, b| tree_order(a, b));
        assert_eq!(
            paths,
            vec!["a", "a/a", "a/b", "a/b/c", "a-c", "a-c/x", "a.b", "b"]
        );
    }

    #[test]
    fn bad_entries_are_refused_with_the_reason() {
        let cases: Vec<(Vec<Entry>, &str)> = vec![
            (vec![file("../escape")], "'..'"),
            (vec![file("/etc/passwd")], "absolute"),
            (vec![dir("a"), file("a/./x")], "'.'"),
            (vec![file("a//x")], "empty component"),
            (vec![file("nul\0")], "NUL"),
            (vec![file("x"), file("x")], "twice"),
            (vec![file("missing/parent")], "parent"),
            (vec![file("f"), file("f/under-a-file")], "parent"),
            (vec![dir("a"), dir("a/b"), file("a/c/x")], "parent"),
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
            let err = check_all(entries).unwrap_err();
            assert!(err.contains(reason), "{reason}: {err}");
        }
        // Stored entries must already be in tree order: a child before its parent is refused.
        let mut checker = Checker::default();
        checker.check(&file("b")).unwrap();
        let err = checker.check(&dir("a")).unwrap_err();
        assert!(err.contains("out of order"), "{err}");
        // Deep trees are checked with their depth, and leave a subtree cleanly.
        let mut checker = Checker::default();
        for entry in [
            dir("a"),
            dir("a/b"),
            dir("a/b/c"),
            file("a/b/c/x"),
            file("a/y"),
            dir("z"),
            file("z/w"),
        ] {
            checker.check(&entry).unwrap();
        }
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
