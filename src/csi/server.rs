//! Serving the CSI services on a unix socket, with graceful shutdown on SIGTERM / SIGINT.
//!
//! Rules: a plugin holds its data directory for each role it serves (an exclusive `flock` on
//! `<data-dir>/.lock-<role>`), so two plugins of one role never share a data directory — a
//! DaemonSet rollout's second pod waits its turn instead of working beside the first. The
//! socket is created with mode 0660. A socket left by a killed plugin is replaced only when
//! nothing answers on it; a live one is refused, as is any other file at the endpoint. At exit
//! the socket is removed only if it is still the one this process created.

use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::authority::AnyAuthority;
use super::controller::ControllerService;
use super::guard::InFlight;
use super::identity::IdentityService;
use super::node::NodeService;
use super::{Failpoint, Plugin, Roles};
use crate::cache::Cache;
use crate::config::Config;
use crate::dataset::pin::Sources;
use crate::lane::LocalLane;
use crate::lane::block::BlockLane;
use crate::lane::block::controller::BlockController;
use crate::lane::block::node::BlockNode;
use crate::lane::controller::ControllerLane;
use crate::lane::dataset::DatasetNode;
use crate::lane::juicefs::JuiceFsLane;
use crate::lane::juicefs::controller::JuiceFsController;
use crate::lane::juicefs::node::JuiceFsNode;
use crate::lane::ledger::Ledger;
use crate::lane::local::controller::LocalController;
use crate::lane::local::node::LocalNode;
use crate::lane::nfs::NfsLane;
use crate::lane::nfs::controller::NfsController;
use crate::lane::nfs::node::NfsNode;
use crate::lane::node::{NodeContext, NodeLane};
use crate::lane::profile::{LaneKind, LaneScope};
use crate::lane::{ControllerLanes, NodeLanes};
use crate::metrics::Metrics;
use crate::mount::linux::LinuxMounter;
use crate::mount::safe::Confinement;
use crate::proto::controller_server::ControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;

/// Everything a serving process is started with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub endpoint: String,
    pub roles: Roles,
    pub driver_name: String,
    pub node_id: String,
    pub data_dir: PathBuf,
    pub config: Config,
    pub metrics_address: Option<SocketAddr>,
    /// Which lanes the controller role provisions.
    pub lanes: LaneScope,
    /// A node plugin's second socket, for its node-local lanes.
    pub local: Option<LocalSocket>,
}

impl ServeOptions {
    /// The roles this process holds the data directory for: a node plugin provisioning its
    /// node-local lanes is their controller too.
    fn held(&self) -> Roles {
        Roles {
            controller: self.roles.controller || self.local.is_some(),
            node: self.roles.node,
        }
    }
}

/// The socket on which a node plugin provisions and serves its node-local lanes (local,
/// fast-rwo) under a driver name of their own: a csi-provisioner with `--node-deployment`
/// beside it sends the CreateVolume calls of its node here, so quotas, loop devices and mkfs
/// happen in the privileged node plugin, on the disk they are about.
#[derive(Debug, Clone)]
pub struct LocalSocket {
    pub endpoint: String,
    pub driver_name: String,
}

/// Why the plugin could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?} is not a unix socket (use unix:///path/csi.sock or a plain path)")]
    Endpoint(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error(
        "another plugin is serving on {0}; stop it first or choose another --endpoint (a socket \
         is replaced only when nothing answers on it)"
    )]
    SocketInUse(PathBuf),
    #[error(
        "data directory {dir} is in use by another `lanes` serving the {role} role{holder}; two \
         plugins must not share a data directory"
    )]
    DataDirInUse {
        dir: PathBuf,
        role: &'static str,
        holder: String,
    },
    #[error("cannot listen for metrics on {address}: {source}")]
    Metrics {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("cannot open the local lane: {0}")]
    Lane(#[from] crate::lane::Error),
    #[error("cannot open the dataset cache: {0}")]
    Cache(#[from] crate::cache::Error),
    #[error("cannot open the node ledger: {0}")]
    Ledger(#[from] crate::lane::ledger::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The socket path of an endpoint: `unix:///p`, `unix:/p` or a plain path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if path.is_empty() || path.contains("://") {
        return Err(ServeError::Endpoint(endpoint.to_owned()));
    }
    Ok(PathBuf::from(path))
}

/// The identity of the socket this process created: removed at exit only if unchanged.
type SocketId = (u64, u64);

fn bind(path: &Path) -> Result<(UnixListener, SocketId), ServeError> {
    use std::os::unix::fs::MetadataExt;
    let io = |context: String| move |source| ServeError::Io { context, source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServeError::SocketInUse(path.to_owned())),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    tracing::info!(socket = %path.display(), "replacing the socket of a plugin that is gone");
                    std::fs::remove_file(path)
                        .map_err(io(format!("remove stale socket {}", path.display())))?;
                }
                Err(e) => return Err(io(format!("probe socket {}", path.display()))(e)),
            }
        }
        Ok(_) => return Err(ServeError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(format!("create {}", parent.display())))?;
    }
    let listener = UnixListener::bind(path).map_err(io(format!("listen on {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("chmod {}", path.display())))?;
    let meta = std::fs::symlink_metadata(path).map_err(io(format!("stat {}", path.display())))?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Removes the socket at `path` if it is still the one this process created.
fn remove_own_socket(path: &Path, id: SocketId) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == id => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            tracing::info!(socket = %path.display(), "the socket was replaced by another plugin; leaving it")
        }
        Err(_) => {}
    }
}

/// Takes the data directory for each role served; held until the process exits.
fn lock_data_dir(dir: &Path, roles: Roles) -> Result<Vec<Flock<File>>, ServeError> {
    let mut held = Vec::new();
    let wanted = [("controller", roles.controller), ("node", roles.node)];
    for (role, _) in wanted.into_iter().filter(|(_, serves)| *serves) {
        let path = dir.join(format!(".lock-{role}"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| ServeError::Io {
                context: format!("open {}", path.display()),
                source,
            })?;
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, _)) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let holder = match pid.trim() {
                    "" => String::new(),
                    pid => format!(" (pid {})", crate::text::Shown(pid)),
                };
                return Err(ServeError::DataDirInUse {
                    dir: dir.to_owned(),
                    role,
                    holder,
                });
            }
        };
        let _ = locked.set_len(0);
        let _ = write!(locked, "{}", std::process::id());
        held.push(locked);
    }
    Ok(held)
}

/// The connections accepted on the socket, each letting any `:authority` through (see
/// [`super::authority`]).
fn incoming(
    listener: UnixListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<AnyAuthority<tokio::net::UnixStream>>> {
    use tokio_stream::StreamExt;
    UnixListenerStream::new(listener).map(|accepted| accepted.map(AnyAuthority::new))
}

/// How long calls in flight may run on after SIGTERM / SIGINT.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Resolves when SIGTERM or SIGINT arrives.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Opens the lanes and serves the requested roles until a shutdown signal.
pub async fn run(options: ServeOptions) -> Result<(), ServeError> {
    let socket = socket_path(&options.endpoint)?;
    let local_socket = match &options.local {
        Some(local) => Some(socket_path(&local.endpoint)?),
        None => None,
    };
    std::fs::create_dir_all(&options.data_dir).map_err(|source| ServeError::Io {
        context: format!("create data dir {}", options.data_dir.display()),
        source,
    })?;
    let _held = lock_data_dir(&options.data_dir, options.held())?;
    let uncovered = [Some(&socket), local_socket.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|path| path.parent().map(Path::to_owned));
    let plugin = Arc::new(build(&options, uncovered.collect())?);
    let local_plugin = options.local.as_ref().map(|local| {
        Arc::new(Plugin {
            driver_name: local.driver_name.clone(),
            roles: Roles {
                controller: true,
                node: true,
            },
            expand_at_node: true,
            controllers: plugin.controllers.clone().only(LaneScope::NodeLocal),
            ..Plugin::clone(&plugin)
        })
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(address) = options.metrics_address {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|source| ServeError::Metrics { address, source })?;
        tracing::info!(%address, "metrics endpoint listening");
        let mut stop = stop_rx.clone();
        tokio::spawn(crate::metrics::serve(
            listener,
            plugin.metrics.clone(),
            async move {
                let _ = stop.changed().await;
            },
        ));
    }
    if options.roles.node && !nix::unistd::geteuid().is_root() {
        tracing::warn!(
            uid = nix::unistd::geteuid().as_raw(),
            "not running as root: staging and publishing mount, which needs root \
             (CAP_SYS_ADMIN); those calls will fail"
        );
    }
    let (listener, socket_id) = bind(&socket)?;
    announce(&socket, &plugin);
    let served = match (local_plugin, &local_socket) {
        (Some(local_plugin), Some(local_socket)) => {
            let (local_listener, local_id) = match bind(local_socket) {
                Ok(bound) => bound,
                Err(e) => {
                    remove_own_socket(&socket, socket_id);
                    return Err(e);
                }
            };
            announce(local_socket, &local_plugin);
            let (main, local) =
                tokio::join!(serve(plugin, listener), serve(local_plugin, local_listener));
            remove_own_socket(local_socket, local_id);
            main.and(local)
        }
        _ => serve(plugin, listener).await,
    };
    let _ = stop_tx.send(true);
    remove_own_socket(&socket, socket_id);
    served?;
    tracing::info!("stopped");
    Ok(())
}

/// Logs what one socket serves.
fn announce(socket: &Path, plugin: &Plugin) {
    tracing::info!(
        endpoint = %socket.display(),
        driver = %plugin.driver_name,
        node = %plugin.node_id,
        controller = plugin.roles.controller,
        node_service = plugin.roles.node,
        lanes = ?plugin.controllers,
        "serving CSI"
    );
}

/// How often the node checks that the JuiceFS mounts its volumes use still answer.
const JUICEFS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);
/// How often the node checks that each NFS export it uses still answers.
const NFS_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// The plugin's shared state: the lanes (controller and node halves), the dataset cache (node
/// role), and what the edge needs.
fn build(options: &ServeOptions, uncovered: Vec<PathBuf>) -> Result<Plugin, ServeError> {
    let lane = LocalLane::open(
        &options.data_dir,
        &options.node_id,
        options.config.local.clone(),
    )?;
    let block = BlockLane::open(
        &options.data_dir,
        &options.node_id,
        options.config.local.clone(),
        options.config.profiles.clone(),
    )?;
    let provisions_here = (options.roles.controller && options.lanes.serves(LaneKind::Local))
        || options.local.is_some();
    if provisions_here {
        // Leftovers of creates and deletes are the controller's to finish or undo.
        lane.recover()?;
        block.recover()?;
    }
    let block = Arc::new(block);
    let juicefs = Arc::new(JuiceFsLane::new(
        &options.data_dir,
        &options.config.profiles,
        options.config.local.clone(),
        !options.roles.node,
    ));
    match lane.enforcement_gap() {
        _ if !provisions_here => {}
        Some(gap) => tracing::warn!("{gap}"),
        None => tracing::info!(
            enforcement = lane.enforcement(),
            "volume capacity is enforced"
        ),
    }
    let locks = options.data_dir.join("locks");
    std::fs::create_dir_all(&locks).map_err(|source| ServeError::Io {
        context: format!("create {}", locks.display()),
        source,
    })?;
    let metrics = Arc::new(Metrics::new());
    let kube = Arc::new(crate::kubeapi::Kube::default());
    let sources = Arc::new(
        Sources::new(options.config.datasets.clone(), options.config.cache.jobs)
            .with_budget(crate::dataset::budget::Budget::new(
                options.config.cache.max_memory,
            ))
            .with_git_policy(options.config.git.clone())
            .with_kube_factory(kube.clone()),
    );
    let cache = if options.roles.node {
        Some(Arc::new(Cache::open(
            &options.data_dir,
            options.config.cache.clone(),
            sources.clone(),
            metrics.clone(),
        )?))
    } else {
        None
    };
    let lane = Arc::new(lane);
    let mounter: Arc<dyn crate::mount::Mounter> = Arc::new(LinuxMounter);
    let failpoint = Failpoint::from_env();
    let ctx = Arc::new(NodeContext {
        mounter: mounter.clone(),
        ledger: Ledger::open(&options.data_dir)?,
        mount_timeout: options.config.mount_timeout,
        failpoint: failpoint.clone(),
        data_dir: options.data_dir.clone(),
        cache,
    });
    let juicefs_node = Arc::new(JuiceFsNode::new(ctx.clone(), juicefs.clone()));
    if options.roles.node && !juicefs.is_empty() {
        tokio::spawn(juicefs_node.clone().watch(JUICEFS_CHECK));
    }
    let nfs_node = Arc::new(NfsNode::new(
        ctx.clone(),
        &options.config.profiles,
        &options.node_id,
    ));
    if options.roles.node && !nfs_node.is_empty() {
        tokio::spawn(nfs_node.clone().watch(NFS_CHECK));
    }
    let lanes = NodeLanes::new(
        ctx.clone(),
        [
            Arc::new(LocalNode::new(ctx.clone(), lane.clone())) as Arc<dyn NodeLane>,
            Arc::new(BlockNode::new(ctx.clone(), block.clone())),
            juicefs_node,
            nfs_node,
            Arc::new(DatasetNode::new(ctx)),
        ],
    );
    let controllers = ControllerLanes::new([
        Arc::new(LocalController::new(
            lane.clone(),
            mounter.clone(),
            options.config.mount_timeout,
        )) as Arc<dyn ControllerLane>,
        Arc::new(BlockController::new(block, options.config.mount_timeout)),
        Arc::new(JuiceFsController::new(
            juicefs,
            options.config.mount_timeout,
        )),
        Arc::new(NfsController::new(
            Arc::new(NfsLane::new(
                &options.config.profiles,
                options.config.local.clone(),
                options.config.mount_timeout,
            )),
            options.config.mount_timeout,
        )),
    ]);
    Ok(Plugin {
        driver_name: options.driver_name.clone(),
        node_id: options.node_id.clone(),
        roles: options.roles,
        expand_at_node: false,
        controllers: controllers.only(options.lanes),
        mounter,
        // Serving both roles, this process holds both data-dir locks: no other Lanes process
        // can share the directory, so the in-memory guard is enough.
        inflight: InFlight::new({
            let held = options.held();
            (!(held.controller && held.node)).then_some(locks)
        }),
        confinement: Confinement::new([options.data_dir.clone()], uncovered),
        lanes,
        profiles: options.config.profiles.clone(),
        metrics: metrics.clone(),
        mount_timeout: options.config.mount_timeout,
        failpoint,
        data_dir: options.data_dir.clone(),
        sources,
        access: Arc::new(crate::access::directory::Directory::new(
            kube.clone(),
            &options.node_id,
            &options.driver_name,
            options.config.user_from.clone(),
        )),
        kube,
    })
}

/// Serves the plugin's roles on `listener` until a shutdown signal. After the signal, calls in
/// flight get a grace period; idle client connections (kubelet and the sidecars keep theirs
/// open) must not hold the shutdown up.
async fn serve(plugin: Arc<Plugin>, listener: UnixListener) -> Result<(), ServeError> {
    let controller = plugin
        .roles
        .controller
        .then(|| ControllerServer::new(ControllerService(plugin.clone())));
    let node = plugin
        .roles
        .node
        .then(|| NodeServer::new(NodeService(plugin.clone())));
    let (signaled_tx, mut signaled) = tokio::sync::watch::channel(false);
    let serve = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService(plugin.clone())))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            shutdown_signal().await;
            let _ = signaled_tx.send(true);
        });
    tokio::select! {
        served = serve => Ok(served?),
        _ = async {
            let _ = signaled.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("calls still open after {}s; stopping anyway", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("unix:/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert_eq!(
            socket_path("/run/csi.sock").unwrap(),
            PathBuf::from("/run/csi.sock")
        );
        assert!(socket_path("tcp://127.0.0.1:10000").is_err());
        assert!(socket_path("").is_err());
    }
}
