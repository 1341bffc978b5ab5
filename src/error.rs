//! The one vocabulary of failure that every module maps its own errors onto.
//!
//! Modules below `csi/` never see `tonic::Status`; each has its own `thiserror` enum with a
//! `kind()` that names every variant. `csi::status` turns a [`Kind`] into a gRPC code, once.

/// What sort of failure an error is, in the terms the CSI spec uses for its codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed or asks for something unsupported.
    InvalidArgument,
    /// The volume (or path) the request names does not exist.
    NotFound,
    /// Something with that name or at that path exists and is incompatible.
    AlreadyExists,
    /// The capacity asked for cannot be satisfied.
    OutOfRange,
    /// The system is not in the state the call needs (e.g. not staged, still in use).
    FailedPrecondition,
    /// Another call on the same volume is in flight.
    Aborted,
    /// A backend could not be reached; retrying later may work.
    Unavailable,
    /// A blocking operation did not finish in time.
    DeadlineExceeded,
    /// Out of space or another finite resource.
    ResourceExhausted,
    /// Stored data is damaged (a body or manifest that fails its checks); retrying will not
    /// help until the data is repaired.
    DataLoss,
    /// Anything else; the message says what to look at.
    Internal,
}

/// The kind for an I/O error: out-of-space errors are `ResourceExhausted`, the rest `Internal`.
pub fn io_kind(err: &std::io::Error) -> Kind {
    match err.raw_os_error() {
        Some(code) if code == nix::libc::ENOSPC || code == nix::libc::EDQUOT => {
            Kind::ResourceExhausted
        }
        _ => Kind::Internal,
    }
}
