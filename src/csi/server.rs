//! Serving the CSI services on a unix socket, with graceful shutdown on SIGTERM / SIGINT.
//!
//! The socket is created with mode 0660. A stale socket left by a killed plugin is replaced;
//! any other file at the endpoint is left alone and reported.

use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use super::controller::ControllerService;
use super::identity::IdentityService;
use super::node::NodeService;
use super::{Failpoint, Plugin, Roles};
use crate::cache::Cache;
use crate::config::Config;
use crate::dataset::pin::Sources;
use crate::lane::LocalLane;
use crate::metrics::Metrics;
use crate::mount::linux::LinuxMounter;
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
}

/// Why the plugin could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("endpoint {0:?} is not a unix socket (use unix:///path/csi.sock or a plain path)")]
    Endpoint(String),
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("cannot open the local lane: {0}")]
    Lane(#[from] crate::lane::Error),
    #[error("cannot open the dataset cache: {0}")]
    Cache(#[from] crate::cache::Error),
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

fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let io = |context: String| move |source| ServeError::Io { context, source };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path)
                .map_err(io(format!("remove stale socket {}", path.display())))?;
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
    Ok(listener)
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

/// Opens the lane and serves the requested roles until a shutdown signal.
pub async fn run(options: ServeOptions) -> Result<(), ServeError> {
    let socket = socket_path(&options.endpoint)?;
    std::fs::create_dir_all(&options.data_dir).map_err(|source| ServeError::Io {
        context: format!("create data dir {}", options.data_dir.display()),
        source,
    })?;
    let lane = LocalLane::open(
        &options.data_dir,
        &options.node_id,
        options.config.local.clone(),
    )?;
    if let Some(gap) = lane.enforcement_gap() {
        tracing::warn!("{gap}");
    }
    let metrics = Arc::new(Metrics::new());
    let sources = Arc::new(Sources::new(
        options.config.datasets.clone(),
        options.config.cache.jobs,
    ));
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
    let plugin = Arc::new(Plugin {
        driver_name: options.driver_name.clone(),
        node_id: options.node_id.clone(),
        roles: options.roles,
        lane,
        mounter: Arc::new(LinuxMounter),
        inflight: Default::default(),
        metrics: metrics.clone(),
        mount_timeout: options.config.mount_timeout,
        failpoint: Failpoint::from_env(),
        data_dir: options.data_dir.clone(),
        sources,
        cache,
        kube: Default::default(),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(address) = options.metrics_address {
        let mut stop = stop_rx.clone();
        let metrics = metrics.clone();
        let listener = tokio::spawn(async move {
            crate::metrics::serve(address, metrics, async move {
                let _ = stop.changed().await;
            })
            .await
        });
        tokio::spawn(async move {
            if let Ok(Err(e)) = listener.await {
                tracing::error!(%address, "metrics endpoint failed: {e}");
            }
        });
    }

    let listener = bind(&socket)?;
    tracing::info!(
        endpoint = %socket.display(),
        driver = %options.driver_name,
        node = %options.node_id,
        controller = options.roles.controller,
        node_service = options.roles.node,
        "serving CSI"
    );
    let controller = options
        .roles
        .controller
        .then(|| ControllerServer::new(ControllerService(plugin.clone())));
    let node = options
        .roles
        .node
        .then(|| NodeServer::new(NodeService(plugin.clone())));
    // After the signal, calls in flight get a grace period; idle client connections (kubelet
    // and the sidecars keep theirs open) must not hold the shutdown up.
    let (signaled_tx, mut signaled) = tokio::sync::watch::channel(false);
    let serve = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService(plugin.clone())))
        .add_optional_service(controller)
        .add_optional_service(node)
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
            shutdown_signal().await;
            let _ = signaled_tx.send(true);
        });
    let served = tokio::select! {
        served = serve => served,
        _ = async {
            let _ = signaled.wait_for(|s| *s).await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("calls still open after {}s; stopping anyway", SHUTDOWN_GRACE.as_secs());
            Ok(())
        }
    };
    let _ = stop_tx.send(true);
    let _ = std::fs::remove_file(&socket);
    served?;
    tracing::info!("stopped");
    Ok(())
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
