//! Git datasets: a reference's branch, tag or commit is resolved to a commit SHA (the
//! version), and exactly that commit is fetched shallowly into a clean tree without `.git`.
//!
//! Rules: only the transports the reference parser allows can be used (`GIT_ALLOW_PROTOCOL`
//! also tells git itself, so `ext::` stays closed even through redirects or submodules); git
//! never prompts; refs are validated before they reach git and always follow a `--`;
//! credentials for private repositories come from `LANES_GIT_USERNAME` / `LANES_GIT_TOKEN`
//! through a fixed credential helper, never from a URL.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::gitpolicy::Admitted;
use super::reference::check_git_ref;
use super::repo::Error;

const ALLOWED_PROTOCOLS: &str = "file:git:http:https:ssh";

/// A `git` command with the safety settings above, and the settings `admitted` asks for
/// (see [`super::gitpolicy`]).
fn git_with(admitted: &Admitted) -> Command {
    let mut command = git();
    for setting in &admitted.git_config {
        command.args(["-c", setting]);
    }
    command
}

/// A `git` command with the safety settings above.
fn git() -> Command {
    let mut command = Command::new("git");
    command
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", ALLOWED_PROTOCOLS)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .args([
            "-c",
            "protocol.ext.allow=never",
            "-c",
            "core.hooksPath=/dev/null",
        ]);
    if std::env::var_os("LANES_GIT_TOKEN").is_some() {
        // A fixed helper: the credentials stay in the environment, out of argv and logs.
        command.args([
            "-c",
            "credential.helper=!f() { echo username=${LANES_GIT_USERNAME:-git}; echo password=$LANES_GIT_TOKEN; }; f",
        ]);
    }
    command
}

fn run(mut command: Command, what: &str) -> Result<Output, Error> {
    let output = command.output().map_err(|source| Error::Io {
        context: format!("run git ({what})"),
        source,
    })?;
    if output.status.success() {
        Ok(output)
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = format!("git {what} failed: {}", stderr.trim());
        if stderr.contains("not found")
            || stderr.contains("does not appear to be a git repository")
            || stderr.contains("couldn't find remote ref")
        {
            Err(Error::NotFound(message))
        } else {
            Err(Error::Invalid(message))
        }
    }
}

fn is_sha(text: &str) -> bool {
    text.len() == 40 && text.chars().all(|c| c.is_ascii_hexdigit())
}

/// Resolves `git_ref` (a branch, tag, `HEAD` or a full commit SHA) in the repository at
/// `url` to a commit SHA.
pub fn resolve(url: &str, git_ref: &str, admitted: &Admitted) -> Result<String, Error> {
    check_git_ref(git_ref).map_err(Error::Invalid)?;
    if is_sha(git_ref) {
        return Ok(git_ref.to_ascii_lowercase());
    }
    let mut command = git_with(admitted);
    command.args(["ls-remote", "--", url]);
    let output = run(command, "ls-remote")?;
    let listing = String::from_utf8_lossy(&output.stdout);
    let refs: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| line.split_once('\t'))
        .collect();
    // A peeled tag names the commit; then tags, branches, and other full ref names.
    let candidates = [
        format!("refs/tags/{git_ref}^{{}}"),
        format!("refs/tags/{git_ref}"),
        format!("refs/heads/{git_ref}"),
        git_ref.to_owned(),
    ];
    candidates
        .iter()
        .find_map(|wanted| {
            refs.iter()
                .find(|(_, name)| name == wanted)
                .map(|(sha, _)| sha.to_string())
        })
        .ok_or_else(|| Error::NotFound(format!("{url} has no branch, tag or ref {git_ref:?}")))
}

/// Fetches commit `sha` of `url` into `dest` (which must not exist) as a plain tree without
/// `.git`. The tree appears whole or not at all.
pub fn fetch(
    url: &str,
    sha: &str,
    git_ref: &str,
    dest: &Path,
    admitted: &Admitted,
) -> Result<(), Error> {
    if !is_sha(sha) {
        return Err(Error::Invalid(format!("{sha:?} is not a full commit SHA")));
    }
    check_git_ref(git_ref).map_err(Error::Invalid)?;
    if dest.exists() {
        return Err(Error::AlreadyExists(format!(
            "{} already exists",
            dest.display()
        )));
    }
    let parent = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|source| Error::Io {
        context: format!("create {}", parent.display()),
        source,
    })?;
    let work: PathBuf = parent.join(format!(".lanes-git-{}-{sha}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let result = (|| {
        let mut init = git();
        init.args(["init", "-q", "--"]).arg(&work);
        run(init, "init")?;
        let shallow_fetch = |what: &str| {
            let mut fetch = git_with(admitted);
            fetch.arg("-C").arg(&work).args([
                "fetch",
                "-q",
                "--depth",
                "1",
                "--no-tags",
                "--",
                url,
                what,
            ]);
            run(fetch, "fetch")
        };
        if shallow_fetch(sha).is_err() {
            // Servers that refuse to serve a commit by SHA: fetch the ref and check it.
            shallow_fetch(git_ref)?;
        }
        let mut head = git();
        head.arg("-C")
            .arg(&work)
            .args(["rev-parse", "FETCH_HEAD^{commit}"]);
        let fetched = String::from_utf8_lossy(&run(head, "rev-parse")?.stdout)
            .trim()
            .to_owned();
        if fetched != sha {
            return Err(Error::Invalid(format!(
                "{url} {git_ref} is now {fetched}, not the pinned {sha}"
            )));
        }
        let mut checkout = git();
        checkout.arg("-C").arg(&work).args([
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "--detach",
            "FETCH_HEAD",
        ]);
        run(checkout, "checkout")?;
        std::fs::remove_dir_all(work.join(".git")).map_err(|source| Error::Io {
            context: "remove .git".into(),
            source,
        })?;
        std::fs::rename(&work, dest).map_err(|source| Error::Io {
            context: format!("place {}", dest.display()),
            source,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}
