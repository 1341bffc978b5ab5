//! `lanes storage`: personal and group volumes for admins — who may do what, granting and
//! revoking. It talks to the API with the caller's own kubeconfig, so Kubernetes RBAC decides
//! who may change which StorageGroup (a group's admins get a Role for their own group).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::Serialize;

use crate::access::{Level, Member, Owner, Ownership, StorageGroup, StorageGroupSpec};

#[derive(Debug, Args)]
pub struct StorageArgs {
    /// The namespace of the claims and groups (default: the kubeconfig's).
    #[arg(long, short = 'n', global = true)]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: StorageCommand,
}

#[derive(Debug, Subcommand)]
pub enum StorageCommand {
    /// Personal and group volumes: capacity, status, and who may do what.
    Ls {
        /// Only the volumes this user may mount, with their level.
        #[arg(long)]
        user: Option<String>,
        /// Every namespace (needs cluster-wide list rights).
        #[arg(long, short = 'A')]
        all_namespaces: bool,
        /// Print JSON: an array with one object per volume.
        #[arg(long)]
        json: bool,
    },
    /// Give USER a level (read, write or admin) in GROUP, or many from `--from FILE`
    /// (lines `user,level`); makes the StorageGroup if it does not exist.
    Grant {
        /// The StorageGroup (in the namespace).
        group: String,
        /// The user, as Kubernetes authenticates them.
        user: Option<String>,
        /// read, write or admin.
        level: Option<String>,
        /// A CSV file of `user,level` lines (`#` comments and a `user,level` header allowed).
        #[arg(long = "from", conflicts_with_all = ["user", "level"])]
        from: Option<PathBuf>,
    },
    /// Take USER out of GROUP, or many from `--from FILE` (the first column of each line).
    Revoke {
        /// The StorageGroup (in the namespace).
        group: String,
        /// The user to take out.
        user: Option<String>,
        /// A CSV file whose lines' first column names the users to take out.
        #[arg(long = "from", conflicts_with = "user")]
        from: Option<PathBuf>,
        /// Allow leaving the group with no admin.
        #[arg(long)]
        force: bool,
    },
}

/// One owned volume as `storage ls` shows it.
#[derive(Debug, Serialize)]
struct Row {
    claim: String,
    kind: &'static str,
    owner: String,
    capacity: String,
    status: String,
    /// Who may do what: `user: level`.
    access: BTreeMap<String, &'static str>,
}

pub async fn run(args: StorageArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes API reachable (in-cluster or kubeconfig)")?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    match args.command {
        StorageCommand::Ls {
            user,
            all_namespaces,
            json,
        } => {
            let scope = (!all_namespaces).then_some(namespace.as_str());
            let rows = list(client, scope, user.as_deref()).await?;
            print_rows(&rows, json)
        }
        StorageCommand::Grant {
            group,
            user,
            level,
            from,
        } => {
            let grants = match (from, user, level) {
                (Some(file), _, _) => read_grants(&file)?,
                (None, Some(user), Some(level)) => vec![(user, parse_level(&level)?)],
                _ => bail!("name USER and LEVEL (read, write or admin), or give --from FILE"),
            };
            let groups: Api<StorageGroup> = Api::namespaced(client, &namespace);
            change(&groups, &group, |members| {
                let mut said = Vec::new();
                for (user, level) in &grants {
                    match members.iter_mut().find(|m| &m.user == user) {
                        Some(member) if member.level == *level => {
                            said.push(format!("{user}: already {}", level.as_str()))
                        }
                        Some(member) => {
                            said.push(format!(
                                "{user}: {} (was {})",
                                level.as_str(),
                                member.level.as_str()
                            ));
                            member.level = *level;
                        }
                        None => {
                            said.push(format!("{user}: {}", level.as_str()));
                            members.push(Member {
                                user: user.clone(),
                                level: *level,
                            });
                        }
                    }
                }
                Ok(said)
            })
            .await?;
            Ok(())
        }
        StorageCommand::Revoke {
            group,
            user,
            from,
            force,
        } => {
            let users = match (from, user) {
                (Some(file), _) => read_grants_loose(&file)?,
                (None, Some(user)) => vec![user],
                (None, None) => bail!("name USER, or give --from FILE"),
            };
            let groups: Api<StorageGroup> = Api::namespaced(client, &namespace);
            change(&groups, &group, |members| {
                let had_admin = members.iter().any(|m| m.level == Level::Admin);
                let mut said = Vec::new();
                for user in &users {
                    let before = members.len();
                    members.retain(|m| &m.user != user);
                    said.push(if members.len() < before {
                        format!("{user}: revoked")
                    } else {
                        format!("{user}: was not a member")
                    });
                }
                if had_admin && !force && !members.iter().any(|m| m.level == Level::Admin) {
                    bail!(
                        "this would leave group {group} with no admin, and nobody could manage \
                         it but a cluster admin: grant another admin first, or pass --force"
                    );
                }
                Ok(said)
            })
            .await?;
            Ok(())
        }
    }
}

fn parse_level(text: &str) -> anyhow::Result<Level> {
    Level::parse(text.trim()).map_err(anyhow::Error::msg)
}

/// The meaningful lines of a CSV file, split on commas, with their line numbers.
fn csv_lines(file: &Path) -> anyhow::Result<Vec<(usize, Vec<String>)>> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(n, line)| (n + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .map(|(n, line)| (n, line.split(',').map(|f| f.trim().to_owned()).collect()))
        .filter(|(_, fields): &(usize, Vec<String>)| fields[0] != "user")
        .collect())
}

/// `user,level` lines; every line is checked before anything changes.
fn read_grants(file: &Path) -> anyhow::Result<Vec<(String, Level)>> {
    let mut grants = Vec::new();
    for (n, fields) in csv_lines(file)? {
        let at = || format!("{} line {n}", file.display());
        let [user, level] = fields.as_slice() else {
            bail!("{}: expected `user,level`", at());
        };
        crate::access::check_user(user).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let level = parse_level(level).with_context(at)?;
        grants.push((user.clone(), level));
    }
    if grants.is_empty() {
        bail!("{} names nobody (lines `user,level`)", file.display());
    }
    Ok(grants)
}

/// The first column of each line (a grants file can be reused to revoke).
fn read_grants_loose(file: &Path) -> anyhow::Result<Vec<String>> {
    let mut users = Vec::new();
    for (n, fields) in csv_lines(file)? {
        crate::access::check_user(&fields[0])
            .map_err(|e| anyhow::anyhow!("{} line {n}: {e}", file.display()))?;
        users.push(fields[0].clone());
    }
    if users.is_empty() {
        bail!("{} names nobody", file.display());
    }
    Ok(users)
}

/// Reads `group`, lets `edit` change its members, and writes it back; a write that lost a
/// race with another admin's is read and edited again.
async fn change(
    groups: &Api<StorageGroup>,
    group: &str,
    edit: impl Fn(&mut Vec<Member>) -> anyhow::Result<Vec<String>>,
) -> anyhow::Result<()> {
    crate::access::check_group(group).map_err(anyhow::Error::msg)?;
    for _ in 0..5 {
        let existing = groups
            .get_opt(group)
            .await
            .with_context(|| format!("reading StorageGroup {group}"))?;
        let mut object = existing
            .clone()
            .unwrap_or_else(|| StorageGroup::new(group, StorageGroupSpec::default()));
        let said = edit(&mut object.spec.members)?;
        let written = match &existing {
            Some(before) if before.spec == object.spec => Ok(object),
            Some(_) => groups.replace(group, &PostParams::default(), &object).await,
            None => groups.create(&PostParams::default(), &object).await,
        };
        match written {
            Ok(_) => {
                for line in &said {
                    println!("{group}: {line}");
                }
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("writing StorageGroup {group}")),
        }
    }
    bail!("StorageGroup {group} kept changing under this edit; try again")
}

/// Owned claims in `namespace` (None: all), with who may do what; `user` keeps those that
/// user may mount.
async fn list(
    client: kube::Client,
    namespace: Option<&str>,
    user: Option<&str>,
) -> anyhow::Result<Vec<Row>> {
    let (claims, groups): (Api<PersistentVolumeClaim>, Api<StorageGroup>) = match namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client, ns),
        ),
        None => (Api::all(client.clone()), Api::all(client)),
    };
    let claims = claims
        .list(&ListParams::default())
        .await
        .context("listing PVCs")?;
    let groups = groups
        .list(&ListParams::default())
        .await
        .context("listing StorageGroups")?;
    let group_of = |namespace: &str, name: &str| {
        groups.items.iter().find(|g| {
            g.metadata.namespace.as_deref() == Some(namespace)
                && g.metadata.name.as_deref() == Some(name)
        })
    };
    let mut rows = Vec::new();
    for pvc in &claims.items {
        let namespace = pvc.metadata.namespace.clone().unwrap_or_default();
        let name = pvc.metadata.name.clone().unwrap_or_default();
        let annotations = pvc.metadata.annotations.clone().unwrap_or_default();
        let Ok(Some(ownership)) =
            Ownership::from_annotations(&annotations, format!("{namespace}/{name}"))
        else {
            continue;
        };
        let (kind, owner, access) = match &ownership.owner {
            Owner::User(owner) => (
                "personal",
                owner.clone(),
                BTreeMap::from([(owner.clone(), "owner")]),
            ),
            Owner::Group(group) => (
                "group",
                group.clone(),
                group_of(&namespace, group)
                    .map(|g| {
                        g.spec
                            .members
                            .iter()
                            .map(|m| (m.user.clone(), m.level.as_str()))
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
        };
        if let Some(user) = user
            && !access.contains_key(user)
        {
            continue;
        }
        let access = match user {
            Some(user) => access.into_iter().filter(|(u, _)| u == user).collect(),
            None => access,
        };
        let status = pvc.status.as_ref();
        rows.push(Row {
            claim: format!("{namespace}/{name}"),
            kind,
            owner,
            capacity: status
                .and_then(|s| s.capacity.as_ref())
                .and_then(|c| c.get("storage"))
                .map(|q| q.0.clone())
                .unwrap_or_else(|| "-".into()),
            status: status
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Pending".into()),
            access,
        });
    }
    Ok(rows)
}

fn print_rows(rows: &[Row], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(rows)?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no personal or group volumes");
        return Ok(());
    }
    let access = |row: &Row| {
        if row.access.is_empty() {
            return "nobody (no StorageGroup)".to_owned();
        }
        row.access
            .iter()
            .map(|(user, level)| format!("{user}={level}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let table: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.claim.clone(),
                r.kind.to_owned(),
                r.owner.clone(),
                r.capacity.clone(),
                r.status.clone(),
                access(r),
            ]
        })
        .collect();
    let header = ["CLAIM", "KIND", "OWNER", "CAPACITY", "STATUS", "ACCESS"].map(str::to_owned);
    let widths: Vec<usize> = (0..5)
        .map(|i| {
            std::iter::once(&header)
                .chain(&table)
                .map(|r| r[i].len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(&table) {
        let mut line = String::new();
        for (i, width) in widths.iter().enumerate() {
            line.push_str(&format!("{:<width$}  ", row[i]));
        }
        line.push_str(&row[5]);
        println!("{line}");
    }
    Ok(())
}
