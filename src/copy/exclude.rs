//! `--exclude PATTERN`: paths a copy or a push leaves out, as rsync users expect.
//!
//! A pattern without a `/` matches a name anywhere in the tree (`*.tmp`, `.git`,
//! `__pycache__`); one with a `/` matches the path from the tree's root (`logs/*.txt`,
//! `/build`; a leading `/` is only an anchor). `*` and `?` never cross a `/`; `**` does. An
//! excluded directory is not entered. Excluded destination paths are never deleted.

use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// A set of exclusion patterns; the default excludes nothing.
#[derive(Debug, Clone, Default)]
pub struct Exclude {
    /// Patterns matched against an entry's own name.
    names: Option<GlobSet>,
    /// Patterns matched against its path from the root.
    paths: Option<GlobSet>,
}

impl Exclude {
    /// Compiles `patterns`; a malformed one is an error naming it.
    pub fn new(patterns: &[String]) -> Result<Exclude, String> {
        let (mut names, mut paths) = (GlobSetBuilder::new(), GlobSetBuilder::new());
        let (mut any_name, mut any_path) = (false, false);
        for pattern in patterns {
            let trimmed = pattern.trim_end_matches('/');
            let anchored = trimmed.strip_prefix('/').unwrap_or(trimmed);
            if anchored.is_empty() {
                return Err(format!("--exclude {pattern:?}: the pattern is empty"));
            }
            let glob = GlobBuilder::new(anchored)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("--exclude {pattern:?}: {e}"))?;
            if trimmed.contains('/') {
                paths.add(glob);
                any_path = true;
            } else {
                names.add(glob);
                any_name = true;
            }
        }
        let build = |builder: GlobSetBuilder, any: bool| -> Result<Option<GlobSet>, String> {
            match any {
                true => builder.build().map(Some).map_err(|e| e.to_string()),
                false => Ok(None),
            }
        };
        Ok(Exclude {
            names: build(names, any_name)?,
            paths: build(paths, any_path)?,
        })
    }

    /// Whether the entry at `rel` (relative to the root) is left out.
    pub fn excludes(&self, rel: &Path) -> bool {
        let by_name = self
            .names
            .as_ref()
            .zip(rel.file_name())
            .is_some_and(|(set, name)| set.is_match(name));
        by_name || self.paths.as_ref().is_some_and(|set| set.is_match(rel))
    }

    /// Whether any pattern is set.
    pub fn is_empty(&self) -> bool {
        self.names.is_none() && self.paths.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exclude(patterns: &[&str]) -> Exclude {
        Exclude::new(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn names_match_anywhere_and_paths_from_the_root() {
        let e = exclude(&["*.tmp", ".git", "logs/*.txt", "/build/", "data/**/cache"]);
        for hit in [
            "a.tmp",
            "deep/er/b.tmp",
            ".git",
            "sub/.git",
            "logs/x.txt",
            "build",
            "data/cache",
            "data/a/b/cache",
        ] {
            assert!(e.excludes(Path::new(hit)), "{hit}");
        }
        for miss in [
            "a.tmp.keep",
            "logs/sub/x.txt",
            "other/logs/x.txt",
            "sub/build",
            "git",
            "data/cachex",
        ] {
            assert!(!e.excludes(Path::new(miss)), "{miss}");
        }
        assert!(!Exclude::default().excludes(Path::new("anything")));
    }

    #[test]
    fn a_malformed_or_empty_pattern_is_named() {
        for bad in ["a[", "/", ""] {
            let err = Exclude::new(&[bad.to_string()]).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
        }
    }
}
