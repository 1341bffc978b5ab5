//! Dataset references, parsed once: `[bucket/]name[:version|:tag]` for stored datasets and
//! `git+<transport>://…[@ref]` for Git sources.
//!
//! Rules: every part has a strict character set (so it is safe as an object key and a path
//! component); Git transports are an allow-list (`ext::` and friends are refused); Git refs
//! that could be read as options or carry shell metacharacters are refused; passwords in URLs
//! are refused (credentials come from a Secret or the environment, never from a URL in a log).

use std::fmt;

/// What a stored-dataset reference asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// The newest committed version.
    Latest,
    /// A version ID or a tag; which one is decided by the store.
    Named(String),
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Stored {
        /// `None` means the default bucket.
        bucket: Option<String>,
        name: String,
        selector: Selector,
    },
    Git {
        /// The URL without the `git+` prefix and without the `@ref` suffix.
        url: String,
        /// Branch, tag or commit; `HEAD` when none was given.
        git_ref: String,
    },
}

/// A reference that could not be parsed, with what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("dataset reference {reference:?}: {reason}")]
pub struct ParseError {
    pub reference: String,
    pub reason: String,
}

const MAX_PART: usize = 128;
const GIT_TRANSPORTS: &[&str] = &["https://", "http://", "git://", "ssh://", "file://"];

impl Reference {
    /// Parses a reference; the error names the reference and what is wrong with it.
    pub fn parse(text: &str) -> Result<Reference, ParseError> {
        let fail = |reason: &str| ParseError {
            reference: shown(text),
            reason: reason.to_owned(),
        };
        if text.is_empty() {
            return Err(fail("it is empty"));
        }
        if text.chars().any(char::is_control) {
            return Err(fail("it contains control characters"));
        }
        if let Some(rest) = text.strip_prefix("git+") {
            return parse_git(rest).map_err(|reason| fail(&reason));
        }
        if text.contains("://") {
            return Err(fail(
                "only git+<transport>:// URLs are references; a stored dataset is [bucket/]name[:version]",
            ));
        }
        let (path, selector) = match text.split_once(':') {
            Some((path, selector)) => (path, Some(selector)),
            None => (text, None),
        };
        let (bucket, name) = match path.split_once('/') {
            Some((bucket, name)) => (Some(bucket), name),
            None => (None, path),
        };
        if let Some(bucket) = bucket {
            check_part(bucket, "the bucket").map_err(|r| fail(&r))?;
        }
        check_part(name, "the dataset name").map_err(|r| fail(&r))?;
        let selector = match selector {
            None | Some("latest") => Selector::Latest,
            Some(selector) => {
                check_part(selector, "the version or tag").map_err(|r| fail(&r))?;
                Selector::Named(selector.to_owned())
            }
        };
        Ok(Reference::Stored {
            bucket: bucket.map(str::to_owned),
            name: name.to_owned(),
            selector,
        })
    }
}

/// Checks one part: 1-128 of `[A-Za-z0-9._-]`, starting with a letter or digit.
pub fn check_part(part: &str, what: &str) -> Result<(), String> {
    if part.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if part.len() > MAX_PART {
        return Err(format!("{what} is longer than {MAX_PART} characters"));
    }
    if !part.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(format!("{what} {part:?} must start with a letter or digit"));
    }
    if let Some(bad) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{what} {part:?} contains {bad:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    if part.contains("..") {
        return Err(format!("{what} {part:?} contains '..'"));
    }
    Ok(())
}

fn parse_git(rest: &str) -> Result<Reference, String> {
    let Some(transport) = GIT_TRANSPORTS.iter().find(|t| rest.starts_with(*t)) else {
        return Err(format!(
            "unsupported Git transport; use one of {}",
            GIT_TRANSPORTS
                .iter()
                .map(|t| format!("git+{t}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    };
    let after_scheme = &rest[transport.len()..];
    // The ref follows the first '@' in the path part, so `user@host` stays part of the URL
    // and refs may contain '/' (`feature/x`).
    let path_start = after_scheme.find('/').unwrap_or(after_scheme.len());
    let (location, git_ref) = match after_scheme[path_start..].find('@') {
        Some(at) => {
            let at = path_start + at;
            (&after_scheme[..at], &after_scheme[at + 1..])
        }
        None => (after_scheme, "HEAD"),
    };
    if location.is_empty() || (*transport != "file://" && !location.contains('/')) {
        return Err("the URL has no repository path".into());
    }
    let host = location.split('/').next().unwrap_or("");
    if let Some((userinfo, _)) = host.split_once('@')
        && userinfo.contains(':')
    {
        return Err(
            "the URL contains a password; give credentials through a Secret or the environment"
                .into(),
        );
    }
    if location.chars().any(|c| {
        c.is_whitespace()
            || matches!(
                c,
                '`' | '$' | ';' | '|' | '&' | '<' | '>' | '\\' | '"' | '\''
            )
    }) {
        return Err("the URL contains whitespace or shell metacharacters".into());
    }
    check_git_ref(git_ref)?;
    Ok(Reference::Git {
        url: format!("{transport}{location}"),
        git_ref: git_ref.to_owned(),
    })
}

/// A Git ref that is safe to hand to `git`: no leading '-', only `[A-Za-z0-9._/-]`, none of
/// the sequences Git itself forbids.
pub fn check_git_ref(git_ref: &str) -> Result<(), String> {
    if git_ref.is_empty() {
        return Err("the Git ref after '@' is empty".into());
    }
    if git_ref.starts_with('-') {
        return Err(format!("the Git ref {git_ref:?} starts with '-'"));
    }
    if git_ref.len() > 255 {
        return Err("the Git ref is longer than 255 characters".into());
    }
    if let Some(bad) = git_ref
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/')))
    {
        return Err(format!("the Git ref {git_ref:?} contains {bad:?}"));
    }
    if git_ref.contains("..")
        || git_ref.contains("//")
        || git_ref.ends_with('/')
        || git_ref.ends_with(".lock")
        || git_ref.starts_with('/')
    {
        return Err(format!("the Git ref {git_ref:?} is not a valid ref name"));
    }
    Ok(())
}

fn shown(text: &str) -> String {
    // Never echo a password back, even in an error.
    match text.find("://") {
        Some(scheme_end) => {
            let after = &text[scheme_end + 3..];
            let host_end = after.find('/').unwrap_or(after.len());
            match after[..host_end].rfind('@') {
                Some(at) => format!("{}://<redacted>@{}", &text[..scheme_end], &after[at + 1..]),
                None => text.to_owned(),
            }
        }
        None => text.chars().take(200).collect(),
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Stored {
                bucket,
                name,
                selector,
            } => {
                if let Some(bucket) = bucket {
                    write!(f, "{bucket}/")?;
                }
                write!(f, "{name}")?;
                match selector {
                    Selector::Latest => write!(f, ":latest"),
                    Selector::Named(named) => write!(f, ":{named}"),
                }
            }
            Reference::Git { url, git_ref } => write!(f, "git+{url}@{git_ref}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(bucket: Option<&str>, name: &str, selector: Selector) -> Reference {
        Reference::Stored {
            bucket: bucket.map(str::to_owned),
            name: name.into(),
            selector,
        }
    }

    #[test]
    fn parses_valid_references() {
        let named = |s: &str| Selector::Named(s.into());
        let cases = [
            ("imagenet", stored(None, "imagenet", Selector::Latest)),
            (
                "imagenet:latest",
                stored(None, "imagenet", Selector::Latest),
            ),
            ("imagenet:v3", stored(None, "imagenet", named("v3"))),
            (
                "production/imagenet:v3",
                stored(Some("production"), "imagenet", named("v3")),
            ),
            (
                "production/resnet50",
                stored(Some("production"), "resnet50", Selector::Latest),
            ),
            (
                "a/b.c_d-e:release-1.2",
                stored(Some("a"), "b.c_d-e", named("release-1.2")),
            ),
            (
                "git+https://github.com/org/repo.git@v1.0",
                Reference::Git {
                    url: "https://github.com/org/repo.git".into(),
                    git_ref: "v1.0".into(),
                },
            ),
            (
                "git+https://github.com/org/repo.git",
                Reference::Git {
                    url: "https://github.com/org/repo.git".into(),
                    git_ref: "HEAD".into(),
                },
            ),
            (
                "git+ssh://git@host/org/repo.git@feature/x",
                Reference::Git {
                    url: "ssh://git@host/org/repo.git".into(),
                    git_ref: "feature/x".into(),
                },
            ),
            (
                "git+file:///srv/repos/data@0123abcd",
                Reference::Git {
                    url: "file:///srv/repos/data".into(),
                    git_ref: "0123abcd".into(),
                },
            ),
            (
                "git+git://127.0.0.1:9418/data.git@main",
                Reference::Git {
                    url: "git://127.0.0.1:9418/data.git".into(),
                    git_ref: "main".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Reference::parse(text).as_ref(), Ok(&want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_references_with_a_reason() {
        let cases = [
            ("", "empty"),
            ("a/b/c", "contains '/'"),
            ("/imagenet", "bucket is empty"),
            ("imagenet:", "version or tag is empty"),
            ("../etc", "bucket"),
            ("imagenet:../../x", "must start"),
            ("image net", "contains ' '"),
            ("-flag", "must start"),
            ("nul\0", "control"),
            ("s3://bucket/x", "only git+"),
            (
                "git+ext::sh -c touch% /tmp/pwned",
                "unsupported Git transport",
            ),
            (
                "git+https://host/repo.git@-upload-pack=x",
                "starts with '-'",
            ),
            ("git+https://host/repo.git@main;rm -rf /", "contains ';'"),
            ("git+https://host/repo.git@$(id)", "contains '$'"),
            ("git+https://host/repo.git@a..b", "not a valid ref"),
            ("git+https://host/repo.git@", "empty"),
            ("git+https://user:hunter2@host/repo.git@main", "password"),
            ("git+https://host", "no repository path"),
        ];
        for (text, reason) in cases {
            let err = Reference::parse(text).expect_err(text);
            assert!(err.reason.contains(reason), "{text:?}: {}", err.reason);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn displays_canonically() {
        assert_eq!(
            Reference::parse("imagenet").unwrap().to_string(),
            "imagenet:latest"
        );
        assert_eq!(Reference::parse("p/x:v1").unwrap().to_string(), "p/x:v1");
    }
}
