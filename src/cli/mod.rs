//! The command line: one subcommand per role, plus the `csi` client.
//!
//! `--data-dir` and `--config` are global: accepted before or after the subcommand. The
//! command groups live beside this file: `csi` (a client of a running plugin), `bench`,
//! `dataset`. Only this module reads the config for a command and speaks anyhow.

pub mod bench;
pub mod csi;
pub mod dataset;
pub mod storage;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::csi::server::LocalSocket;
use crate::csi::server::{self, ServeOptions};
use crate::csi::{DEFAULT_DRIVER_NAME, DEFAULT_LOCAL_DRIVER_NAME, Roles};
use crate::lane::profile::LaneScope;
use crate::units::parse_bytes;
use bench::BenchOptions;
use csi::{Clients, Report};

#[derive(Debug, Parser)]
#[command(
    name = "lanes",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("LANES_COMMIT"), ")"),
    about = "Kubernetes CSI storage for ML platforms"
)]
pub struct Cli {
    /// Where Lanes keeps volumes and state (every command but copy and completion).
    #[arg(
        long,
        global = true,
        env = "LANES_DATA_DIR",
        default_value = "/var/lib/lanes"
    )]
    pub data_dir: PathBuf,
    /// YAML configuration file; every setting has an embedded default (every command but
    /// copy and completion).
    #[arg(long, global = true, env = "LANES_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log lines as text (colours only on a terminal) or as one JSON object each (clusters'
    /// log pipelines); the level comes from LANES_LOG (error, warn, info, debug, trace).
    #[arg(
        long,
        global = true,
        value_enum,
        env = "LANES_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// Parses the process's arguments. `--data-dir` and `--config` are global (before or
    /// after the subcommand) but mean nothing to `copy` and `completion`: given there, they
    /// are refused rather than silently ignored.
    pub fn parse_args() -> Cli {
        use clap::{CommandFactory, FromArgMatches};
        let mut command = Cli::command();
        let matches = command.get_matches_mut();
        if let Some((name @ ("copy" | "completion"), sub)) = matches.subcommand() {
            for (id, flag) in [("data_dir", "--data-dir"), ("config", "--config")] {
                if sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
                    command
                        .error(
                            clap::error::ErrorKind::ArgumentConflict,
                            format!(
                                "`lanes {name}` takes no {flag}: it uses no data directory or \
                                 config"
                            ),
                        )
                        .exit();
                }
            }
        }
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the CSI Identity and Controller services.
    Controller(ControllerArgs),
    /// Serve the CSI Identity and Node services.
    Node(NodeArgs),
    /// Kubernetes-side work (a Deployment): FastStage copy Jobs, and RBAC for each
    /// StorageGroup's admins. Of several replicas, the one holding the Lease acts.
    Operator(OperatorArgs),
    /// Serve Identity, Controller and Node on one socket (single machine; tests).
    Standalone(ServeArgs),
    /// Talk to a running plugin over its socket.
    Csi(CsiArgs),
    /// Copy a directory tree (the fast-stage engine): parallel, resumable, verified.
    Copy(CopyArgs),
    /// Versioned datasets in dataset buckets.
    Dataset(DatasetArgs),
    /// The node's dataset cache (`<data-dir>/cache`): what it holds, and pruning it.
    Cache(CacheArgs),
    /// The storage profiles StorageClasses pick from: lane, backend, availability here and
    /// now, whether capacity is enforced, what each is best for.
    Profiles(ProfilesArgs),
    /// Personal and group storage (admins): who may do what; grant and revoke levels.
    Storage(storage::StorageArgs),
    /// Print the CustomResourceDefinitions Lanes serves (YAML), as deploy/ holds them.
    Crds,
    /// Print a shell completion script: `lanes completion bash > /etc/bash_completion.d/lanes`.
    Completion {
        /// bash, zsh, fish, elvish or powershell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The image the FastStage copy Jobs run (the operator's own).
    #[arg(long, env = "LANES_IMAGE", default_value = concat!("ghcr.io/lanes-csi/lanes:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// The driver of the volumes a FastStage may view from another namespace.
    #[arg(long, default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// The namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "lanes-system")]
    pub lease_namespace: String,
    /// This replica's name in the Lease [default: host name and process ID].
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// How long the leader's Lease lasts unrenewed: a new leader takes over at most this
    /// long after the old one is gone.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub lease_seconds: u64,
}

#[derive(Debug, Args)]
pub struct ProfilesArgs {
    /// Print JSON: an array with one object per profile.
    #[arg(long)]
    pub json: bool,
    /// Recommend profiles for this workload (recommended, available ones first).
    #[arg(long = "for", value_enum)]
    pub workload: Option<crate::lane::profile::Workload>,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// List the cached dataset versions: size, last use, mounts using them now.
    Ls,
    /// Remove cached versions no mount uses (least recently used first) until the cache is
    /// within `cache.max_bytes`, then every body no version links.
    Prune {
        /// Remove every version no mount uses, whatever the limit.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
pub struct DatasetArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Parallel uploads / downloads.
    #[arg(long, global = true, default_value_t = 64)]
    pub jobs: usize,
    #[command(subcommand)]
    pub command: DatasetCommand,
}

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// List the configured buckets.
    Buckets,
    /// Create a dataset: [bucket/]name.
    Create {
        /// The dataset: NAME, or BUCKET/NAME (default: the default bucket).
        name: String,
        /// One line saying what the dataset holds.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Push DIR as the next version of a dataset, uploading only new bodies.
    Push {
        /// The directory whose tree becomes the new version.
        dir: PathBuf,
        /// The dataset: [BUCKET/]NAME.
        reference: String,
        /// What changed in this version.
        #[arg(short, long, default_value = "")]
        message: String,
        /// Also point this tag at the new version (a name, not a version like v3).
        #[arg(long)]
        tag: Option<String>,
        /// Leave the version uncommitted (files may still change until `commit`).
        #[arg(long)]
        no_commit: bool,
        /// Read and hash every file, even those unchanged since the last push (by default a
        /// file whose inode, size, mtime and ctime are unchanged keeps its remembered hash).
        #[arg(long)]
        rehash: bool,
        /// Leave out paths matching PATTERN (repeatable): a name anywhere (`*.tmp`, `.git`)
        /// or, with a `/`, a path from the root (`logs/*.txt`, `/build`); `**` crosses
        /// directories.
        #[arg(long, value_name = "PATTERN")]
        exclude: Vec<String>,
    },
    /// Commit an uncommitted version: [bucket/]name:version.
    Commit {
        /// The version: [BUCKET/]NAME:vN.
        reference: String,
    },
    /// List a dataset's versions.
    Versions {
        /// The dataset: [BUCKET/]NAME.
        reference: String,
    },
    /// Tag a committed version.
    Tag {
        /// The version: [BUCKET/]NAME:vN, or [BUCKET/]NAME:TAG (what that tag names now).
        reference: String,
        /// The tag to point at it: letters, digits, '.', '_', '-', starting with a letter or
        /// digit; not `latest` nor of the form vN.
        tag: String,
    },
    /// List the files of a version, or (BUCKET/) the datasets of a bucket.
    Ls {
        /// [BUCKET/]NAME[:vN|:TAG] (default: the latest version); or BUCKET/ (`/` alone: the
        /// default bucket) to list its datasets.
        reference: String,
    },
    /// Download a version into DIR, verifying every body (a Git reference: fetch its commit
    /// into DIR, which must not exist).
    Pull {
        /// [BUCKET/]NAME[:vN|:TAG], or git+https://HOST/REPO[@REF].
        reference: String,
        /// Where the files go (made if missing).
        dir: PathBuf,
        /// Remove what DIR holds beyond the version (by default it is left, and listed).
        #[arg(long)]
        delete: bool,
    },
    /// Remove an uncommitted version.
    Rm {
        /// The version: [BUCKET/]NAME:vN.
        reference: String,
    },
    /// Print the version a reference names now (a Git reference: its commit SHA).
    Resolve {
        /// [BUCKET/]NAME[:vN|:TAG], or git+https://HOST/REPO[@REF].
        reference: String,
    },
    /// Remove the bucket's bodies that no version (committed or not) names.
    Gc {
        /// The bucket (default: the default bucket).
        bucket: Option<String>,
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keep unnamed bodies younger than this (`90s`, `30m`, `12h`, `7d`): a push names
        /// its bodies only when it ends, so this must exceed your longest push.
        #[arg(long, default_value = "7d", value_parser = parse_age)]
        min_age: std::time::Duration,
    },
}

/// `90s`, `30m`, `12h`, `7d` (a bare number: seconds).
fn parse_age(text: &str) -> Result<std::time::Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not an age like 90s, 30m, 12h or 7d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(number.saturating_mul(scale)))
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// The directory to copy from.
    pub src: PathBuf,
    /// The directory to copy into (made if missing); SRC's contents land in it.
    pub dst: PathBuf,
    /// What counts as already copied, and how copies are verified.
    #[arg(long, value_enum, default_value = "size-mtime")]
    pub checksum: crate::copy::Checksum,
    /// Remove destination entries that the source does not have.
    #[arg(long)]
    pub delete: bool,
    /// Parallel workers [default: 4 per core, 4..64]
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// Say what would be copied and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Leave out paths matching PATTERN (repeatable), on both sides: not copied, never
    /// deleted. A name anywhere (`*.tmp`, `.git`) or, with a `/`, a path from the root
    /// (`logs/*.txt`, `/build`); `**` crosses directories.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Report progress to the status of this FastStage (NAMESPACE/NAME) every second, as
    /// the copy Job of `lanes operator` does (in-cluster credentials or the kubeconfig).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub report_to: Option<String>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// unix:///path/csi.sock or a plain path [default: <data-dir>/csi.sock]
    #[arg(long)]
    pub endpoint: Option<String>,
    /// This node's ID [default: the host name]
    #[arg(long, env = "LANES_NODE_ID")]
    pub node_id: Option<String>,
    /// The CSI driver name the plugin answers to (the CSIDriver object's name).
    #[arg(long, default_value = DEFAULT_DRIVER_NAME)]
    pub driver_name: String,
    /// Serve /metrics and /healthz here, e.g. 127.0.0.1:9808 (off by default).
    #[arg(long)]
    pub metrics_address: Option<SocketAddr>,
}

#[derive(Debug, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Which lanes to provision: `shared` in a cluster's controller Deployment (node-local
    /// lanes are provisioned by each node's plugin, see `node --local-endpoint`).
    #[arg(long, value_enum, default_value = "all")]
    pub lanes: LaneScope,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Also serve this socket (unix:///path/csi.sock) as the controller and node of this
    /// node's node-local lanes (local, fast-rwo), under --local-driver-name: what a
    /// csi-provisioner with --node-deployment beside the plugin talks to.
    #[arg(long)]
    pub local_endpoint: Option<String>,
    /// The driver name of the node-local lanes (their StorageClasses' provisioner).
    #[arg(long, default_value = DEFAULT_LOCAL_DRIVER_NAME, requires = "local_endpoint")]
    pub local_driver_name: String,
}

#[derive(Debug, Args)]
pub struct CsiArgs {
    /// The plugin's socket [default: <data-dir>/csi.sock]
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: CsiCommand,
}

#[derive(Debug, Subcommand)]
pub enum CsiCommand {
    /// Driver name, version, readiness and node ID.
    Info,
    /// Create a volume.
    CreateVolume {
        /// The volume's name (as a PVC's would be: pvc-<uid>); creates are idempotent by it.
        name: String,
        /// Size such as 10Gi [default: the lane's default]
        #[arg(long)]
        capacity: Option<String>,
        /// StorageClass-style parameter KEY=VALUE (repeatable).
        #[arg(long = "param")]
        params: Vec<String>,
        /// Start as a copy of this snapshot (a fast-rwo snapshot ID).
        #[arg(long, conflicts_with = "from_volume")]
        from_snapshot: Option<String>,
        /// Start as a copy (clone) of this volume.
        #[arg(long)]
        from_volume: Option<String>,
    },
    /// Delete a volume.
    DeleteVolume {
        /// The volume ID, as create-volume printed it (e.g. local/scratch).
        volume_id: String,
    },
    /// Take a snapshot NAME of a volume.
    Snapshot {
        /// The volume ID.
        volume_id: String,
        /// The snapshot's name; its ID is <lane>@NAME.
        name: String,
    },
    /// Delete a snapshot.
    DeleteSnapshot {
        /// The snapshot ID (e.g. fast-rwo@before-run).
        snapshot_id: String,
    },
    /// List snapshots (of one volume with --volume).
    Snapshots {
        /// Only the snapshots of this volume ID.
        #[arg(long)]
        volume: Option<String>,
    },
    /// Grow a volume.
    ExpandVolume {
        /// The volume ID.
        volume_id: String,
        /// The new size, e.g. 20Gi (never shrinks).
        capacity: String,
        /// Where the volume is published: when the lane says the node must finish the job
        /// (a filesystem to grow), call NodeExpandVolume there, as a CO would.
        #[arg(long)]
        path: Option<PathBuf>,
    },
    /// List volumes.
    List,
    /// Stage a volume and publish it at TARGET.
    Publish {
        /// The volume ID (with --dataset: any name for the inline volume).
        volume_id: String,
        /// Where the volume appears, as a pod's volume would (made if missing).
        target: PathBuf,
        /// Mount it read-only.
        #[arg(long)]
        readonly: bool,
        /// Staging directory [default: <data-dir>-staging/<id>]
        #[arg(long)]
        staging: Option<PathBuf>,
        /// Mount flag such as noexec (repeatable).
        #[arg(long = "mount-flag")]
        flags: Vec<String>,
        /// Filesystem to ask for (fast-rwo volumes: xfs or ext4; default: the profile's).
        #[arg(long)]
        fs_type: Option<String>,
        /// Publish as a raw block device: TARGET becomes a device file (fast-rwo volumes).
        #[arg(long, conflicts_with_all = ["flags", "fs_type", "dataset"])]
        block: bool,
        /// The access mode, as a PVC names it (rwx and rox: shared-rwx volumes).
        #[arg(long, value_enum, default_value = "rwo")]
        access: AccessArg,
        /// Publish an inline (ephemeral) volume of this dataset instead of a created volume
        /// (VOLUME_ID is then any name for it).
        #[arg(long)]
        dataset: Option<String>,
    },
    /// Unpublish a volume from TARGET and unstage it.
    Unpublish {
        /// The volume ID.
        volume_id: String,
        /// Where it was published.
        target: PathBuf,
        /// The staging directory publish used [default: <data-dir>-staging/<id>]
        #[arg(long)]
        staging: Option<PathBuf>,
    },
    /// Usage and condition of a volume published at PATH.
    Stats {
        /// The volume ID.
        volume_id: String,
        /// Where it is published (or staged).
        path: PathBuf,
    },
    /// Latency and memory benchmark against a running plugin (see README).
    Bench {
        /// Volumes per round (each created, staged, published, unpublished, unstaged,
        /// deleted).
        #[arg(long, default_value_t = 1000)]
        ops: usize,
        /// Concurrent clients per round (repeatable).
        #[arg(long = "concurrency", default_values_t = [1, 16])]
        concurrency: Vec<usize>,
        /// Where staging and target directories are made.
        #[arg(long)]
        workdir: PathBuf,
        /// The plugin's PID, to measure its resident memory.
        #[arg(long)]
        server_pid: Option<u32>,
        /// The profile to create the volumes with (default: the default profile).
        #[arg(long)]
        profile: Option<String>,
    },
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let default_endpoint = format!("unix://{}", cli.data_dir.join("csi.sock").display());
    let roles = |controller, node| Roles { controller, node };
    let (args, roles, lanes, local) = match cli.command {
        Command::Controller(args) => (args.serve, roles(true, false), args.lanes, None),
        Command::Node(args) => {
            let local = args.local_endpoint.map(|endpoint| LocalSocket {
                endpoint,
                driver_name: args.local_driver_name,
            });
            (args.serve, roles(false, true), LaneScope::All, local)
        }
        Command::Standalone(args) => (args, roles(true, true), LaneScope::All, None),
        Command::Csi(args) => return run_client(args, &cli.data_dir, default_endpoint).await,
        Command::Copy(args) => return run_copy(args).await,
        Command::Dataset(args) => {
            return run_dataset(args, cli.config.as_deref(), &cli.data_dir).await;
        }
        Command::Cache(args) => return run_cache(args, cli.config.as_deref(), &cli.data_dir),
        Command::Profiles(args) => {
            return run_profiles(args, cli.config.as_deref(), &cli.data_dir).await;
        }
        Command::Storage(args) => return storage::run(args).await,
        Command::Operator(args) => {
            let config = Config::load(cli.config.as_deref(), &cli.data_dir)?;
            let client = kube::Client::try_default()
                .await
                .context("no Kubernetes API reachable (in-cluster or kubeconfig)")?;
            let identity = args.identity.unwrap_or_else(|| {
                let host = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{host}-{}", std::process::id())
            });
            tracing::info!(%identity, "operator started");
            crate::operator::run(
                client,
                crate::operator::Options {
                    image: args.image,
                    profiles: config.profiles,
                    driver_name: args.driver_name,
                    lease_namespace: args.lease_namespace,
                    identity,
                    lease: std::time::Duration::from_secs(args.lease_seconds),
                },
            )
            .await;
            return Ok(());
        }
        Command::Crds => {
            print!("{}", crate::access::group::crd_yaml());
            print!("---\n{}", crate::operator::faststage::crd_yaml());
            return Ok(());
        }
        Command::Completion { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "lanes", &mut script);
            use std::io::Write;
            return match std::io::stdout().write_all(&script) {
                // A reader that stopped early (`| head`) is not an error of ours.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(()),
            };
        }
    };
    let config = Config::load(cli.config.as_deref(), &cli.data_dir)?;
    let node_id = match args.node_id {
        Some(id) if !id.is_empty() => id,
        _ => nix::unistd::gethostname()
            .context("reading the host name for --node-id")?
            .to_string_lossy()
            .into_owned(),
    };
    server::run(ServeOptions {
        endpoint: args.endpoint.unwrap_or(default_endpoint),
        roles,
        driver_name: args.driver_name,
        node_id,
        data_dir: cli.data_dir,
        config,
        metrics_address: args.metrics_address,
        lanes,
        local,
    })
    .await?;
    Ok(())
}

async fn run_dataset(
    args: DatasetArgs,
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use dataset::Command as C;
    let (buckets, budget) = dataset::load_buckets(config, data_dir)?;
    let command = match args.command {
        DatasetCommand::Buckets => C::Buckets,
        DatasetCommand::Create { name, description } => C::Create { name, description },
        DatasetCommand::Push {
            dir,
            reference,
            message,
            tag,
            no_commit,
            rehash,
            exclude,
        } => C::Push {
            dir,
            reference,
            message,
            tag,
            commit: !no_commit,
            hash_cache: (!rehash).then(|| data_dir.join("push-cache")),
            exclude: crate::copy::exclude::Exclude::new(&exclude).map_err(anyhow::Error::msg)?,
        },
        DatasetCommand::Commit { reference } => C::Commit { reference },
        DatasetCommand::Versions { reference } => C::Versions { reference },
        DatasetCommand::Tag { reference, tag } => C::Tag { reference, tag },
        DatasetCommand::Ls { reference } => C::Ls { reference },
        DatasetCommand::Pull {
            reference,
            dir,
            delete,
        } => C::Pull {
            reference,
            dir,
            delete,
        },
        DatasetCommand::Rm { reference } => C::Rm { reference },
        DatasetCommand::Resolve { reference } => C::Resolve { reference },
        DatasetCommand::Gc {
            bucket,
            dry_run,
            min_age,
        } => C::Gc {
            bucket,
            dry_run,
            min_age,
        },
    };
    let output = dataset::run(command, &buckets, &budget, args.jobs.max(1), args.json).await?;
    if args.json {
        println!("{}", output.json);
    } else {
        print!("{}", output.text);
    }
    Ok(())
}

/// Kubernetes' access modes, for `lanes csi publish --access`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AccessArg {
    /// ReadWriteOnce (SINGLE_NODE_WRITER).
    Rwo,
    /// ReadWriteOncePod (SINGLE_NODE_SINGLE_WRITER).
    Rwop,
    /// ReadWriteMany (MULTI_NODE_MULTI_WRITER).
    Rwx,
    /// ReadOnlyMany (MULTI_NODE_READER_ONLY).
    Rox,
}

impl AccessArg {
    pub fn mode(self) -> crate::proto::volume_capability::access_mode::Mode {
        use crate::proto::volume_capability::access_mode::Mode;
        match self {
            AccessArg::Rwo => Mode::SingleNodeWriter,
            AccessArg::Rwop => Mode::SingleNodeSingleWriter,
            AccessArg::Rwx => Mode::MultiNodeMultiWriter,
            AccessArg::Rox => Mode::MultiNodeReaderOnly,
        }
    }
}

/// One row of `lanes profiles`.
#[derive(Debug, serde::Serialize)]
struct ProfileRow<'a> {
    name: &'a str,
    lane: &'static str,
    description: &'a str,
    default: bool,
    backend: String,
    available: bool,
    reason: Option<String>,
    capacity_enforced: bool,
    enforcement: String,
    free_bytes: Option<u64>,
    recommended_for: Vec<String>,
    /// With `--for`: whether this profile is recommended for that workload.
    #[serde(skip_serializing_if = "Option::is_none")]
    recommended: Option<bool>,
}

async fn run_profiles(
    args: ProfilesArgs,
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let config = Config::load(config, data_dir)?;
    let kube = crate::kubeapi::Kube::default();
    let mut probes = Vec::new();
    for profile in config.profiles.iter() {
        probes.push(match (&profile.longhorn, profile.lane) {
            (Some(longhorn), _) => crate::lane::longhorn::probe(&kube, longhorn).await,
            (None, crate::lane::LaneKind::Local) => crate::lane::local::probe(data_dir),
            (None, crate::lane::LaneKind::FastRwo) => crate::lane::block::probe(data_dir),
            (None, crate::lane::LaneKind::SharedRwx) => match &profile.juicefs {
                Some(juicefs) => crate::lane::juicefs::probe(data_dir, &profile.name, juicefs),
                None => crate::lane::local::probe(data_dir),
            },
            (None, crate::lane::LaneKind::LegacyRwx) => match &profile.nfs {
                Some(nfs) => crate::lane::nfs::probe(&profile.name, nfs).await,
                None => crate::lane::local::probe(data_dir),
            },
        });
    }
    let mut rows: Vec<ProfileRow> = config
        .profiles
        .iter()
        .zip(probes)
        .map(|(profile, probe)| ProfileRow {
            name: &profile.name,
            lane: profile.lane.as_str(),
            description: &profile.description,
            default: profile.default,
            backend: probe.backend,
            available: probe.available,
            reason: probe.reason,
            capacity_enforced: probe.capacity_enforced,
            enforcement: probe.enforcement,
            free_bytes: probe.free_bytes,
            recommended_for: profile.best_for.iter().map(|w| w.to_string()).collect(),
            recommended: args
                .workload
                .map(|w| profile.best_for.contains(&w) && probe.available),
        })
        .collect();
    if args.workload.is_some() {
        rows.sort_by_key(|r| std::cmp::Reverse((r.recommended, r.available)));
    }
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<8} {:<10} {:<12} BACKEND",
        "PROFILE", "LANE", "AVAILABLE", "CAPACITY"
    );
    for row in &rows {
        let name = format!("{}{}", row.name, if row.default { " *" } else { "" });
        let available = if row.available { "yes" } else { "no" };
        let capacity = if row.capacity_enforced {
            "enforced"
        } else {
            "recorded"
        };
        println!(
            "{:<16} {:<8} {:<10} {:<12} {}",
            name, row.lane, available, capacity, row.backend
        );
        if let Some(reason) = &row.reason {
            println!("{:<16} unavailable: {reason}", "");
        }
        if !row.capacity_enforced {
            println!("{:<16} capacity not enforced: {}", "", row.enforcement);
        }
    }
    println!("* the default profile (StorageClasses that name none)");
    if let Some(workload) = args.workload {
        let picks: Vec<&str> = rows
            .iter()
            .filter(|r| r.recommended == Some(true))
            .map(|r| r.name)
            .collect();
        match picks.as_slice() {
            [] => println!("no available profile is meant for {workload}"),
            picks => println!("recommended for {workload}: {}", picks.join(", ")),
        }
    }
    Ok(())
}

fn run_cache(
    args: CacheArgs,
    config: Option<&std::path::Path>,
    data_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use crate::units::human;
    let config = Config::load(config, data_dir)?;
    let sources = crate::dataset::pin::Sources::new(config.datasets.clone(), 1);
    let cache = crate::cache::Cache::open(
        data_dir,
        config.cache.clone(),
        std::sync::Arc::new(sources),
        std::sync::Arc::new(crate::metrics::Metrics::new()),
    )?;
    match args.command {
        CacheCommand::Ls => {
            let rows = cache.list()?;
            if args.json {
                println!("{}", serde_json::to_string(&rows)?);
                return Ok(());
            }
            println!(
                "{:<40} {:>7} {:>10} {:>6}  {:<17} KEY",
                "DATASET", "FILES", "SIZE", "MOUNTS", "LAST USED (UTC)"
            );
            for row in &rows {
                println!(
                    "{:<40} {:>7} {:>10} {:>6}  {:<17} {}",
                    row.dataset,
                    row.files,
                    human(row.bytes),
                    row.mounts,
                    dataset::time(row.last_used_unix),
                    row.key
                );
            }
            let total: u64 = rows.iter().map(|r| r.bytes).sum();
            println!(
                "{} versions, {} (limit {})",
                rows.len(),
                human(total),
                human(config.cache.max_bytes)
            );
        }
        CacheCommand::Prune { all } => {
            let limit = if all { 0 } else { config.cache.max_bytes };
            let pruned = cache.prune(limit, None)?;
            if args.json {
                println!("{}", serde_json::to_string(&pruned)?);
            } else {
                println!(
                    "removed {} versions and {} bodies ({})",
                    pruned.trees.len(),
                    pruned.blobs,
                    human(pruned.bytes)
                );
            }
        }
    }
    Ok(())
}

async fn run_copy(args: CopyArgs) -> anyhow::Result<()> {
    let options = crate::copy::Options {
        checksum: args.checksum,
        delete: args.delete,
        jobs: args.jobs.unwrap_or_else(crate::copy::default_jobs).max(1),
        dry_run: args.dry_run,
        exclude: crate::copy::exclude::Exclude::new(&args.exclude).map_err(anyhow::Error::msg)?,
    };
    let progress = crate::copy::Progress::new(args.json);
    let reporter = match &args.report_to {
        Some(target) => Some(
            crate::operator::report::Reporter::connect(target, args.checksum)
                .await
                .map_err(anyhow::Error::msg)?,
        ),
        None => None,
    };
    let following = reporter
        .clone()
        .map(|r| tokio::spawn(r.follow(progress.clone())));
    let (src, dst) = (args.src.clone(), args.dst.clone());
    let copying = progress.clone();
    let summary =
        tokio::task::spawn_blocking(move || crate::copy::run(&src, &dst, &options, &copying))
            .await??;
    // Test hook: keep reporting a while after the copy (a copy too quick to be seen live).
    crate::failpoint::Failpoint::from_env()
        .delay("copy.report")
        .await;
    if let Some(following) = following {
        following.abort();
    }
    if let Some(reporter) = &reporter {
        reporter.finish(&summary).await;
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        for failure in &summary.failures {
            eprintln!("failed: {}: {}", failure.path.display(), failure.error);
        }
        for path in &summary.would_copy {
            println!(
                "would copy   {}",
                crate::text::Shown(&path.to_string_lossy())
            );
        }
        for path in &summary.would_delete {
            println!(
                "would delete {}",
                crate::text::Shown(&path.to_string_lossy())
            );
        }
        println!(
            "{} files ({}): {} copied ({}), {} skipped, {} links, {} deleted, {} failed, {} verified in {:.2}s ({}/s){}",
            summary.files_total,
            crate::units::human(summary.bytes_total),
            summary.files_copied,
            crate::units::human(summary.bytes_copied),
            summary.files_skipped,
            summary.links_copied,
            summary.deleted,
            summary.failed,
            summary.verified,
            summary.seconds,
            crate::units::human(summary.bytes_per_second as u64),
            if summary.dry_run {
                " [dry run: nothing changed]"
            } else {
                ""
            }
        );
    }
    if summary.failed > 0 {
        bail!("{} entries could not be copied", summary.failed);
    }
    Ok(())
}

/// A size for a volume: a Kubernetes quantity, more than zero.
fn positive_bytes(text: &str) -> anyhow::Result<u64> {
    match parse_bytes(text).map_err(anyhow::Error::msg)? {
        0 => bail!("capacity {text:?} is zero; give a size such as 10Gi"),
        bytes => Ok(bytes),
    }
}

/// A path from the command line made absolute against the working directory (the plugin
/// takes absolute paths only).
fn absolute(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("make {} absolute", path.display()))
}

fn parse_params(pairs: &[String]) -> anyhow::Result<HashMap<String, String>> {
    pairs
        .iter()
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
            _ => bail!("--param {pair:?} is not KEY=VALUE"),
        })
        .collect()
}

async fn run_client(
    args: CsiArgs,
    data_dir: &std::path::Path,
    default: String,
) -> anyhow::Result<()> {
    let socket = server::socket_path(args.endpoint.as_deref().unwrap_or(&default))?;
    if let CsiCommand::Bench {
        ops,
        concurrency,
        workdir,
        server_pid,
        profile,
    } = &args.command
    {
        let options = BenchOptions {
            ops: *ops,
            concurrency: concurrency.clone(),
            workdir: workdir.clone(),
            server_pid: *server_pid,
            profile: profile.clone(),
        };
        let (json, text) = bench::run(&socket, &options).await?;
        print_report(args.json, Report { json, text });
        return Ok(());
    }
    let mut c = Clients::connect(&socket).await.with_context(|| {
        format!(
            "cannot connect to {}; is the plugin running?",
            socket.display()
        )
    })?;
    let staging_for = |staging: &Option<PathBuf>, id: &str| {
        staging
            .clone()
            .unwrap_or_else(|| csi::default_staging(data_dir, id))
    };
    let report = match &args.command {
        CsiCommand::Info => csi::info(&mut c).await,
        CsiCommand::CreateVolume {
            name,
            capacity,
            params,
            from_snapshot,
            from_volume,
        } => {
            let capacity = capacity.as_deref().map(positive_bytes).transpose()?;
            let source = csi::content_source(from_snapshot.as_deref(), from_volume.as_deref());
            csi::create_volume(&mut c, name, capacity, parse_params(params)?, source).await
        }
        CsiCommand::DeleteVolume { volume_id } => csi::delete_volume(&mut c, volume_id).await,
        CsiCommand::Snapshot { volume_id, name } => csi::snapshot(&mut c, volume_id, name).await,
        CsiCommand::DeleteSnapshot { snapshot_id } => {
            csi::delete_snapshot(&mut c, snapshot_id).await
        }
        CsiCommand::Snapshots { volume } => csi::snapshots(&mut c, volume.as_deref()).await,
        CsiCommand::ExpandVolume {
            volume_id,
            capacity,
            path,
        } => {
            let bytes = positive_bytes(capacity)?;
            let path = path.as_deref().map(absolute).transpose()?;
            csi::expand_volume(&mut c, volume_id, bytes, path.as_deref()).await
        }
        CsiCommand::List => csi::list(&mut c).await,
        CsiCommand::Publish {
            volume_id,
            target,
            readonly,
            staging,
            flags,
            fs_type,
            block,
            access,
            dataset,
        } => match dataset {
            Some(dataset) => {
                let target = absolute(target)?;
                csi::publish_inline(&mut c, volume_id, &target, dataset, *readonly, flags).await
            }
            None => {
                let staging = staging_for(staging, volume_id);
                let capability = match block {
                    true => csi::block_capability(access.mode()),
                    false => csi::mount_capability_of(
                        access.mode(),
                        fs_type.as_deref().unwrap_or_default(),
                        flags,
                    ),
                };
                let (target, staging) = (absolute(target)?, absolute(&staging)?);
                csi::publish(&mut c, volume_id, &target, &staging, *readonly, capability).await
            }
        },
        CsiCommand::Unpublish {
            volume_id,
            target,
            staging,
        } => {
            let staging = absolute(&staging_for(staging, volume_id))?;
            csi::unpublish(&mut c, volume_id, &absolute(target)?, &staging).await
        }
        CsiCommand::Stats { volume_id, path } => {
            csi::stats(&mut c, volume_id, &absolute(path)?).await
        }
        CsiCommand::Bench { .. } => unreachable!("handled above"),
    };
    match report {
        Ok(report) => {
            print_report(args.json, report);
            Ok(())
        }
        Err(status) => bail!("{:?}: {}", status.code(), status.message()),
    }
}

fn print_report(json: bool, report: Report) {
    if json {
        println!("{}", report.json);
    } else {
        print!("{}", report.text);
    }
}
