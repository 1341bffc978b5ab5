//! The one place where Lanes errors become gRPC statuses.

use tonic::{Code, Status};

use crate::error::Kind;

/// The gRPC code the CSI spec names for a kind of failure.
pub fn code(kind: Kind) -> Code {
    match kind {
        Kind::InvalidArgument => Code::InvalidArgument,
        Kind::NotFound => Code::NotFound,
        Kind::AlreadyExists => Code::AlreadyExists,
        Kind::OutOfRange => Code::OutOfRange,
        Kind::FailedPrecondition => Code::FailedPrecondition,
        Kind::Aborted => Code::Aborted,
        Kind::Unavailable => Code::Unavailable,
        Kind::DeadlineExceeded => Code::DeadlineExceeded,
        Kind::ResourceExhausted => Code::ResourceExhausted,
        Kind::DataLoss => Code::DataLoss,
        Kind::Internal => Code::Internal,
    }
}

impl From<crate::lane::Error> for Status {
    fn from(err: crate::lane::Error) -> Status {
        Status::new(code(err.kind()), err.to_string())
    }
}

impl From<crate::mount::Error> for Status {
    fn from(err: crate::mount::Error) -> Status {
        Status::new(code(err.kind()), err.to_string())
    }
}

impl From<crate::mount::safe::PathError> for Status {
    fn from(err: crate::mount::safe::PathError) -> Status {
        Status::new(code(err.kind()), err.to_string())
    }
}

impl From<crate::lane::ledger::Error> for Status {
    fn from(err: crate::lane::ledger::Error) -> Status {
        Status::new(code(err.kind()), err.to_string())
    }
}

impl From<crate::lane::node::NodeError> for Status {
    fn from(err: crate::lane::node::NodeError) -> Status {
        Status::new(code(err.kind()), err.to_string())
    }
}

impl From<crate::cache::Error> for Status {
    fn from(err: crate::cache::Error) -> Status {
        Status::new(code(err.kind), err.message)
    }
}

/// A required field the request left empty.
pub fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("{field} is required"))
}

/// Another call holds the volume.
pub fn busy(volume_id: &str) -> Status {
    Status::aborted(format!(
        "an operation on volume {} is already in progress; retry when it has finished",
        crate::text::Shown(volume_id)
    ))
}

/// Fails with a missing-field error when `value` is empty.
pub fn require(value: &str, field: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(missing(field));
    }
    Ok(())
}
