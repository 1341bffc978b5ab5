//! Lanes: a Kubernetes CSI storage plugin for ML platforms.
//!
//! Layers run one way: `csi` (the gRPC edge) → `lane` (where volumes live) → `mount`.
//! Only `csi` knows tonic; the rest return their own errors with a [`error::Kind`].

// Deeply nested async handlers (gRPC call → dataset pinning → S3 client) need more room
// than the default when their future types are laid out.
#![recursion_limit = "256"]

pub mod access;
pub mod cache;
pub mod cli;
pub mod config;
pub mod copy;
pub mod csi;
pub mod dataset;
pub mod error;
pub mod failpoint;
pub mod fsutil;
pub mod kubeapi;
pub mod lane;
pub mod metrics;
pub mod mount;
pub mod operator;
pub mod text;
pub mod units;

/// Code generated from `proto/csi.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}
