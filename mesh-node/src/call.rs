//! What a call is inside the node: its context at the callee, its reply, and the error a caller
//! sees.

use std::time::Instant;

use bytes::Bytes;
use mesh_core::{MethodName, ServiceName, SpiffeId};
use mesh_proto::{Status, TraceContext};

/// A call as the callee sees it, after its head was parsed and checked.
#[derive(Debug, Clone)]
pub struct CallContext {
    /// The caller's verified identity.
    pub caller: SpiffeId,
    /// The service called.
    pub service: ServiceName,
    /// The method called.
    pub method: MethodName,
    /// Request metadata.
    pub metadata: Vec<(String, String)>,
    /// When the caller gives up.
    pub deadline: Instant,
    /// The caller's trace context.
    pub trace: Option<TraceContext>,
}

/// A callee's answer: a status, a reason for failures, and a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The outcome.
    pub status: Status,
    /// Why it failed; empty on success.
    pub message: String,
    /// The answer's body (for `Upstream` errors, the upstream's own body).
    pub body: Bytes,
}

impl Reply {
    /// A successful reply.
    pub fn ok(body: Bytes) -> Self {
        Reply {
            status: Status::Ok,
            message: String::new(),
            body,
        }
    }

    /// A failed reply with no body.
    pub fn error(status: Status, message: impl Into<String>) -> Self {
        Reply {
            status,
            message: message.into(),
            body: Bytes::new(),
        }
    }

    /// `Ok(body)` for a success, the error otherwise.
    pub fn into_result(self) -> Result<Bytes, CallError> {
        if self.status == Status::Ok {
            Ok(self.body)
        } else {
            Err(CallError {
                status: self.status,
                message: self.message,
                body: self.body,
            })
        }
    }
}

/// A failed call, as the caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", status.as_str())]
pub struct CallError {
    /// Why it failed, as a status.
    pub status: Status,
    /// Why it failed, in words.
    pub message: String,
    /// The body that came with the failure, if any.
    pub body: Bytes,
}

impl CallError {
    /// A failure with no body.
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        CallError {
            status,
            message: message.into(),
            body: Bytes::new(),
        }
    }
}

/// The HTTP status the local ingress answers for a call status.
pub fn http_status(status: Status) -> u16 {
    match status {
        Status::Ok => 200,
        Status::NotFound => 404,
        Status::PermissionDenied => 403,
        Status::Unavailable => 503,
        Status::DeadlineExceeded => 504,
        Status::ResourceExhausted => 429,
        Status::InvalidArgument => 400,
        Status::Internal => 500,
        Status::Upstream(_) => 502,
    }
}
