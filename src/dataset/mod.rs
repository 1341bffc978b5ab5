//! Versioned datasets: references, manifests and (to come) the bucket stores and the CLI.
//!
//! Nothing here knows gRPC. Rules: a reference or manifest is validated before any of it
//! becomes a path or an object key; committed versions are immutable.

pub mod bodies;
pub mod bucket;
pub mod budget;
pub mod git;
pub mod gitpolicy;
pub mod hashcache;
pub mod manifest;
pub mod pin;
pub mod reference;
pub mod repo;
pub mod scan;
pub mod secret;
pub mod spool;
pub mod store;

pub use manifest::{Entry, EntryKind, Head};
pub use reference::{Reference, Selector};
pub use repo::Version;
