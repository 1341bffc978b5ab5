//! The gRPC edge: CSI Identity, Controller and Node services over a unix socket.
//!
//! Only this module knows tonic. Handlers read as: validate the request, take the volume's
//! in-flight guard, call the lane or the mounter, map the result.

mod authority;
pub mod caps;
pub mod controller;
pub mod guard;
pub mod identity;
pub mod node;
mod redact;
pub mod server;
pub mod status;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::failpoint::Failpoint;

use tonic::{Code, Response, Status};

use crate::metrics::Metrics;
use crate::mount::Mounter;
pub use crate::proto;
use crate::text::{MAX_MESSAGE_BYTES, bounded};

pub use crate::lane::local::TOPOLOGY_KEY;
/// The driver name used when `--driver-name` is not given.
pub const DEFAULT_DRIVER_NAME: &str = "lanes.csi.dev";

/// Which CSI services a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub controller: bool,
    pub node: bool,
}

/// The driver name a node plugin's node-local lanes answer to (see `lanes node
/// --local-endpoint`).
pub const DEFAULT_LOCAL_DRIVER_NAME: &str = "local.lanes.csi.dev";

/// State shared by the services of one plugin socket. Built once at start-up; a node plugin
/// that also provisions its node-local lanes serves a second socket from a copy that shares
/// every lane, guard and cache, and differs in name, roles and controller lanes.
#[derive(Clone)]
pub struct Plugin {
    pub driver_name: String,
    pub node_id: String,
    pub roles: Roles,
    /// NodeExpandVolume grows the volume itself (the controller half runs on the node, and
    /// ControllerExpandVolume is not offered): the node-local driver's socket.
    pub expand_at_node: bool,
    /// The controller lanes (controller role).
    pub controllers: crate::lane::ControllerLanes,
    pub mounter: Arc<dyn Mounter>,
    pub inflight: guard::InFlight,
    /// Which request paths are refused (inside or above what Lanes owns).
    pub confinement: crate::mount::safe::Confinement,
    /// The storage profiles StorageClasses pick from.
    pub profiles: crate::lane::Profiles,
    /// The node lanes (node role), with what they share.
    pub lanes: crate::lane::NodeLanes,
    pub metrics: Arc<Metrics>,
    pub mount_timeout: Duration,
    pub failpoint: Failpoint,
    /// `--data-dir`: everything Lanes keeps on this node lives under it.
    pub data_dir: std::path::PathBuf,
    /// The configured dataset buckets (controller: pins references at CreateVolume).
    pub sources: Arc<crate::dataset::pin::Sources>,
    /// The Kubernetes API, found on first use (in-cluster or a kubeconfig); `None` when
    /// there is none (standalone use), which turns off what needs it.
    pub kube: Arc<crate::kubeapi::Kube>,
    /// Who is asking and what they may do (personal and group volumes, node role).
    pub access: Arc<crate::access::directory::Directory>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("driver_name", &self.driver_name)
            .field("node_id", &self.node_id)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl Plugin {
    /// The topology segment of this node.
    pub fn topology(&self) -> proto::Topology {
        proto::Topology {
            segments: [(TOPOLOGY_KEY.to_owned(), self.node_id.clone())].into(),
        }
    }

    /// Runs one RPC body: records its metrics, logs its failure, wraps its answer.
    pub async fn call<T>(
        &self,
        rpc: &'static str,
        body: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        // Messages may echo request values: escaped and bounded before they are logged or
        // sent (see crate::text).
        let result = body.await.map_err(|status| {
            Status::new(status.code(), bounded(status.message(), MAX_MESSAGE_BYTES))
        });
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.record(rpc, &format!("{code:?}"), started);
        match &result {
            Ok(_) => tracing::debug!(rpc, elapsed_ms = started.elapsed().as_millis() as u64, "ok"),
            Err(status) => {
                tracing::warn!(rpc, code = ?status.code(), message = status.message(), "failed")
            }
        }
        result.map(Response::new)
    }

    /// Holds `volume_id` for this call: a concurrent call on the same volume is ABORTED.
    pub fn guard(&self, volume_id: &str) -> Result<guard::Guard, Status> {
        self.inflight
            .try_lock(volume_id)
            .ok_or_else(|| status::busy(volume_id))
    }

    /// The Kubernetes API client, if one can be made here.
    pub async fn kube(&self) -> Option<kube::Client> {
        self.kube
            .client()
            .await
            .inspect_err(|e| tracing::debug!(error = %e, "PVC annotations are not read"))
            .ok()
    }
}
