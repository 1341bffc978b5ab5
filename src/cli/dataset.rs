//! `lanes dataset …`: the command-line face of the dataset store.
//!
//! Every listing prints a table for people and JSON with `--json`. A reference names the
//! bucket (default: the configured default bucket) and the dataset; versions come after ':'.

use std::path::Path;

use anyhow::{Context, bail};
use serde_json::json;

use crate::dataset::bucket::{Bucket, Buckets, Mode};
use crate::dataset::reference::{Reference, Selector};
use crate::dataset::repo::Repo;
use crate::dataset::store::BucketStore;
use crate::units::human;

/// What a command printed: JSON for `--json`, text otherwise.
pub struct Output {
    pub json: serde_json::Value,
    pub text: String,
}

/// A dataset command, parsed by the CLI.
#[derive(Debug, Clone)]
pub enum Command {
    Buckets,
    Create {
        name: String,
        description: String,
    },
    Push {
        dir: std::path::PathBuf,
        reference: String,
        message: String,
        tag: Option<String>,
        commit: bool,
        /// Where file hashes are remembered between pushes (none: hash every file).
        hash_cache: Option<std::path::PathBuf>,
        /// Paths left out of the version.
        exclude: crate::copy::exclude::Exclude,
    },
    Commit {
        reference: String,
    },
    Versions {
        reference: String,
    },
    Tag {
        reference: String,
        tag: String,
    },
    Ls {
        reference: String,
    },
    Pull {
        reference: String,
        dir: std::path::PathBuf,
        delete: bool,
    },
    Rm {
        reference: String,
    },
    Resolve {
        reference: String,
    },
    Gc {
        bucket: Option<String>,
        dry_run: bool,
        min_age: std::time::Duration,
    },
}

async fn repo_for(bucket: &Bucket, jobs: usize) -> anyhow::Result<Repo<BucketStore>> {
    Ok(crate::dataset::pin::open(bucket, jobs, &crate::kubeapi::Kube::default()).await?)
}

/// Splits a stored-dataset reference into its bucket, name and selector.
fn stored(reference: &str) -> anyhow::Result<(Option<String>, String, Selector)> {
    match Reference::parse(reference)? {
        Reference::Stored {
            bucket,
            name,
            selector,
        } => Ok((bucket, name, selector)),
        Reference::Git { .. } => {
            bail!("{reference:?} is a Git source; this command works on stored datasets")
        }
    }
}

/// A Unix time as `YYYY-MM-DD HH:MM` (UTC).
pub fn time(unix: u64) -> String {
    let days = unix / 86_400;
    let (h, m) = ((unix % 86_400) / 3600, (unix % 3600) / 60);
    // Civil date from days since the epoch (proleptic Gregorian).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}")
}

/// Runs one command against the configured buckets.
/// Push and pull show progress on stderr unless `quiet`.
pub async fn run(
    command: Command,
    buckets: &Buckets,
    budget: &crate::dataset::budget::Budget,
    jobs: usize,
    quiet: bool,
) -> anyhow::Result<Output> {
    let open = async |bucket: Option<&str>| -> anyhow::Result<Repo<BucketStore>> {
        let repo = repo_for(buckets.get(bucket).map_err(anyhow::Error::msg)?, jobs).await?;
        Ok(repo
            .with_progress(crate::copy::progress::Progress::new(quiet))
            .with_budget(budget.clone()))
    };
    Ok(match command {
        Command::Buckets => buckets_table(buckets),
        Command::Gc {
            bucket,
            dry_run,
            min_age,
        } => {
            let report = open(bucket.as_deref()).await?.gc(min_age, dry_run).await?;
            let verb = if dry_run { "would remove" } else { "removed" };
            let mut text = String::new();
            if dry_run {
                for key in &report.unreferenced {
                    text.push_str(&format!("would remove {key}\n"));
                }
            }
            text.push_str(&format!(
                "{verb} {} bodies no version names; kept {} named and {} unnamed but younger \
                 than {}s\n",
                report.unreferenced.len(),
                report.referenced,
                report.too_young,
                min_age.as_secs()
            ));
            Output {
                json: json!(report),
                text,
            }
        }
        Command::Create { name, description } => {
            let (bucket, name, selector) = stored(&name)?;
            if selector != Selector::Latest {
                bail!("create takes a dataset name, not a version");
            }
            let info = open(bucket.as_deref())
                .await?
                .create(&name, &description)
                .await?;
            Output {
                json: json!(info),
                text: format!("created dataset {name}\n"),
            }
        }
        Command::Push {
            dir,
            reference,
            message,
            tag,
            commit,
            hash_cache,
            exclude,
        } => {
            let (bucket, name, selector) = stored(&reference)?;
            if selector != Selector::Latest {
                bail!("push creates the next version itself; give the dataset without ':version'");
            }
            let report = open(bucket.as_deref())
                .await?
                .with_hash_cache(hash_cache)
                .with_exclude(exclude)
                .push(&dir, &name, &message, tag.as_deref(), commit)
                .await?;
            let text = push_summary(&name, &report);
            Output {
                json: json!(report),
                text,
            }
        }
        Command::Commit { reference } => {
            let (bucket, name, selector) = stored(&reference)?;
            let manifest = open(bucket.as_deref())
                .await?
                .commit(&name, &selector)
                .await?;
            Output {
                json: json!({"version": manifest.version}),
                text: format!("committed {name}:{}\n", manifest.version),
            }
        }
        Command::Versions { reference } => {
            let (bucket, name, _) = stored(&reference)?;
            let rows = open(bucket.as_deref()).await?.versions(&name).await?;
            let text = versions_table(&rows);
            Output {
                json: json!(rows),
                text,
            }
        }
        Command::Tag { reference, tag } => {
            let (bucket, name, selector) = stored(&reference)?;
            let version = open(bucket.as_deref())
                .await?
                .tag(&name, &selector, &tag)
                .await?;
            Output {
                json: json!({"tag": tag, "version": version}),
                text: format!("tagged {name}:{version} as {tag}\n"),
            }
        }
        Command::Ls { reference } if reference.ends_with('/') => {
            let bucket = reference.trim_end_matches('/');
            let bucket = buckets
                .get((!bucket.is_empty()).then_some(bucket))
                .map_err(anyhow::Error::msg)?
                .name
                .clone();
            let datasets = open(Some(&bucket)).await?.datasets().await?;
            let mut text = format!("{:<32} {:<17} {}\n", "DATASET", "CREATED", "DESCRIPTION");
            for info in &datasets {
                text.push_str(&format!(
                    "{:<32} {:<17} {}\n",
                    format!("{bucket}/{}", info.name),
                    time(info.created_unix),
                    info.description
                ));
            }
            if datasets.is_empty() {
                text = format!("bucket {bucket} has no datasets yet (`lanes dataset create`)\n");
            }
            Output {
                json: json!(datasets),
                text,
            }
        }
        Command::Ls { reference } => {
            let (bucket, name, selector) = stored(&reference)?;
            let version = open(bucket.as_deref())
                .await?
                .resolve(&name, &selector)
                .await?;
            let entries = tokio::task::spawn_blocking(move || {
                version.entries.read()?.collect::<std::io::Result<Vec<_>>>()
            })
            .await??;
            Output {
                text: listing(&entries),
                json: json!(entries),
            }
        }
        Command::Pull { reference, dir, .. } if reference.starts_with("git+") => {
            pull_git(&reference, dir).await?
        }
        Command::Resolve { reference } => match Reference::parse(&reference)? {
            Reference::Git { url, git_ref } => {
                let sha = tokio::task::spawn_blocking(move || {
                    crate::dataset::git::resolve(&url, &git_ref, &Default::default())
                })
                .await??;
                Output {
                    json: json!({"version": sha}),
                    text: format!("{sha}\n"),
                }
            }
            Reference::Stored {
                bucket,
                name,
                selector,
            } => {
                let manifest = open(bucket.as_deref())
                    .await?
                    .resolve_head(&name, &selector)
                    .await?;
                Output {
                    json: json!({"version": manifest.version}),
                    text: format!("{}\n", manifest.version),
                }
            }
        },
        Command::Pull {
            reference,
            dir,
            delete,
        } => {
            let (bucket, name, selector) = stored(&reference)?;
            let report = open(bucket.as_deref())
                .await?
                .pull_with(&name, &selector, &dir, delete)
                .await?;
            let mut text = format!(
                "pulled {name}:{} into {} — {} files, {} downloaded ({}), {} already present\n",
                report.version,
                dir.display(),
                report.files,
                report.downloaded,
                human(report.bytes_downloaded),
                report.skipped
            );
            let few = |paths: &[String]| {
                let shown: Vec<String> = paths
                    .iter()
                    .take(5)
                    .map(|p| crate::text::shown(p))
                    .collect();
                let more = paths.len().saturating_sub(5);
                match more {
                    0 => shown.join(", "),
                    n => format!("{}, and {n} more", shown.join(", ")),
                }
            };
            if !report.extra.is_empty() {
                text.push_str(&format!(
                    "left {} path(s) the version does not have: {} (--delete removes them)\n",
                    report.extra.len(),
                    few(&report.extra)
                ));
            }
            if !report.deleted.is_empty() {
                text.push_str(&format!(
                    "removed {} path(s) the version does not have: {}\n",
                    report.deleted.len(),
                    few(&report.deleted)
                ));
            }
            Output {
                json: json!(report),
                text,
            }
        }
        Command::Rm { reference } => {
            let (bucket, name, selector) = stored(&reference)?;
            if selector == Selector::Latest {
                bail!("rm needs an explicit version (name:v<N>)");
            }
            let version = open(bucket.as_deref())
                .await?
                .remove(&name, &selector)
                .await?;
            Output {
                json: json!({"removed": version}),
                text: format!("removed {name}:{version}\n"),
            }
        }
    })
}

/// `lanes dataset buckets`: the configured buckets, the default marked.
fn buckets_table(buckets: &Buckets) -> Output {
    let mut text = format!("{:<16} {:<48} {}\n", "BUCKET", "LOCATION", "MODE");
    let mut rows = Vec::new();
    for bucket in buckets.iter() {
        let default = bucket.name == buckets.default_name();
        let mode = if bucket.mode == Mode::ReadWrite {
            "read-write"
        } else {
            "read-only"
        };
        let name = if default {
            format!("{} (default)", bucket.name)
        } else {
            bucket.name.clone()
        };
        let location = bucket.location.to_string();
        text.push_str(&format!("{name:<16} {location:<48} {mode}\n"));
        rows.push(
            json!({"name": bucket.name, "location": location, "mode": mode, "default": default}),
        );
    }
    Output {
        json: json!(rows),
        text,
    }
}

/// One line saying what a push made and what it uploaded.
fn push_summary(name: &str, report: &crate::dataset::repo::PushReport) -> String {
    if report.unchanged {
        let mut text = format!(
            "{name}:{} unchanged — the tree is that version's ({} files, {}); no new version\n",
            report.version,
            report.files,
            human(report.bytes)
        );
        if let Some(message) = &report.message_not_recorded {
            text.push_str(&format!(
                "the message {} was NOT recorded; {name}:{} keeps {}\n",
                crate::text::shown(message),
                report.version,
                crate::text::shown(report.kept_message.as_deref().unwrap_or_default())
            ));
        }
        return text;
    }
    format!(
        "{name}:{} {} — {} files, {}; uploaded {} new bodies ({})\n",
        report.version,
        if report.committed {
            "committed"
        } else {
            "uncommitted"
        },
        report.files,
        human(report.bytes),
        report.bodies_uploaded,
        human(report.bytes_uploaded)
    )
}

/// `lanes dataset versions`: one row per version, uncommitted ones starred.
fn versions_table(rows: &[crate::dataset::repo::VersionRow]) -> String {
    let mut text = format!(
        "{:<8} {:<17} {:>7} {:>11} {:<12} {}\n",
        "VERSION", "CREATED", "FILES", "SIZE", "TAGS", "MESSAGE"
    );
    for row in rows {
        let version = if row.committed {
            row.version.clone()
        } else {
            format!("{}*", row.version)
        };
        text.push_str(&format!(
            "{version:<8} {:<17} {:>7} {:>11} {:<12} {}\n",
            time(row.created_unix),
            row.files,
            human(row.bytes),
            row.tags.join(","),
            row.message
        ));
    }
    if rows.iter().any(|r| !r.committed) {
        text.push_str("* uncommitted\n");
    }
    text
}

/// `lanes dataset ls`: size and path of every entry, directories with `/`, links with target.
fn listing(entries: &[crate::dataset::Entry]) -> String {
    let mut text = String::new();
    for entry in entries {
        let shown = match (&entry.kind, &entry.target) {
            (crate::dataset::EntryKind::Dir, _) => format!("{}/", entry.path),
            (crate::dataset::EntryKind::Symlink, Some(target)) => {
                format!("{} -> {target}", entry.path)
            }
            _ => entry.path.clone(),
        };
        text.push_str(&format!("{:>11}  {shown}\n", human(entry.size)));
    }
    text
}

/// `lanes dataset pull git+…`: resolve the ref and fetch that commit's tree into `dir`.
async fn pull_git(reference: &str, dir: std::path::PathBuf) -> anyhow::Result<Output> {
    let Reference::Git { url, git_ref } = Reference::parse(reference)? else {
        bail!("{reference:?} is not a Git reference");
    };
    let target = dir.clone();
    let sha = tokio::task::spawn_blocking(move || {
        let sha = crate::dataset::git::resolve(&url, &git_ref, &Default::default())?;
        crate::dataset::git::fetch(&url, &sha, &git_ref, &target, &Default::default()).map(|()| sha)
    })
    .await??;
    Ok(Output {
        json: json!({"commit": sha, "dir": dir}),
        text: format!("fetched commit {sha} into {}\n", dir.display()),
    })
}

/// The data directory's config, loaded for a dataset command.
/// The configured buckets, and the budget their transfers hold bodies within.
pub fn load_buckets(
    config: Option<&Path>,
    data_dir: &Path,
) -> anyhow::Result<(Buckets, crate::dataset::budget::Budget)> {
    let config =
        crate::config::Config::load(config, data_dir).context("loading the configuration")?;
    let budget = crate::dataset::budget::Budget::new(config.cache.max_memory);
    Ok((config.datasets, budget))
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_times_as_utc_dates() {
        assert_eq!(super::time(0), "1970-01-01 00:00");
        assert_eq!(super::time(1_795_305_600), "2026-11-22 00:00");
        assert_eq!(super::time(951_782_400 + 3_723), "2000-02-29 01:02");
    }
}
