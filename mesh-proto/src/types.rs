//! The heads that travel on the wire. Field order is wire order: add fields only at the end of a
//! struct that is itself last in its frame, and variants only at the end of an enum.

use serde::{Deserialize, Serialize};

use crate::limits::{MAX_LABELS, MAX_METADATA, MAX_SERVICES};

/// Request or response metadata: small `key = value` pairs, at most [`MAX_METADATA`].
pub type Metadata<'a> = heapless::Vec<(&'a str, &'a str), MAX_METADATA>;
/// A node's labels (`zone = "hall-1"`), at most [`MAX_LABELS`].
pub type Labels<'a> = heapless::Vec<(&'a str, &'a str), MAX_LABELS>;
/// The services a node hosts, at most [`MAX_SERVICES`].
pub type Services<'a> = heapless::Vec<&'a str, MAX_SERVICES>;

/// The outcome of a call. A closed set: every side maps it the same way, and it only grows at the
/// end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Status {
    /// The call succeeded; the body is the answer.
    Ok,
    /// No such service or method.
    NotFound,
    /// The caller may not make this call.
    PermissionDenied,
    /// No endpoint can take the call now (none alive, upstream down, connection lost).
    Unavailable,
    /// The call's deadline passed before an answer came.
    DeadlineExceeded,
    /// A bound was hit: rate limit, body size, streams in flight.
    ResourceExhausted,
    /// The request was malformed: bad frame, bad head, body over its bound.
    InvalidArgument,
    /// A bug or an unexpected failure inside the mesh.
    Internal,
    /// The upstream answered with its own error; the number is its code (an HTTP status for
    /// HTTP upstreams).
    Upstream(u16),
}

/// Every status that carries no value, in wire order (for tests).
#[cfg(test)]
pub(crate) const UNIT_STATUSES: [Status; 8] = [
    Status::Ok,
    Status::NotFound,
    Status::PermissionDenied,
    Status::Unavailable,
    Status::DeadlineExceeded,
    Status::ResourceExhausted,
    Status::InvalidArgument,
    Status::Internal,
];

impl Status {
    /// A stable lowercase name, used in logs, metrics labels and the `x-starling-status` header.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::NotFound => "not_found",
            Status::PermissionDenied => "permission_denied",
            Status::Unavailable => "unavailable",
            Status::DeadlineExceeded => "deadline_exceeded",
            Status::ResourceExhausted => "resource_exhausted",
            Status::InvalidArgument => "invalid_argument",
            Status::Internal => "internal",
            Status::Upstream(_) => "upstream",
        }
    }

    /// Whether a failed call with this status may be tried again (on another endpoint, for a
    /// method the policy marks idempotent): no endpoint could take it, or the upstream said it is
    /// unavailable or overloaded (502, 503, 504). A rate limit (`ResourceExhausted`) is not
    /// retried: retrying would only add load where the limit says there is too much.
    pub fn is_retryable(&self) -> bool {
        match self {
            Status::Unavailable => true,
            Status::Upstream(code) => matches!(code, 502..=504),
            _ => false,
        }
    }

    /// Whether this outcome counts against the endpoint's health (the circuit breaker): it was
    /// unreachable, too slow, broken, or its upstream failed (5xx).
    pub fn is_failure(&self) -> bool {
        match self {
            Status::Unavailable | Status::Internal | Status::DeadlineExceeded => true,
            Status::Upstream(code) => *code >= 500,
            _ => false,
        }
    }
}

/// W3C trace-context identifiers carried with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct TraceContext {
    /// The trace this call belongs to.
    pub trace_id: [u8; 16],
    /// The caller's span.
    pub span_id: [u8; 8],
    /// W3C trace flags; bit 0 = sampled.
    pub flags: u8,
}

/// What a caller sends first on a call stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RequestHead<'a> {
    /// The service to call.
    pub service: &'a str,
    /// The method of that service.
    pub method: &'a str,
    /// Milliseconds left until the caller gives up; 0 means none was set.
    pub deadline_ms: u32,
    /// The caller's trace context, if it traces.
    pub trace: Option<TraceContext>,
    /// Request metadata (`x-canary = 1`, ...).
    #[serde(borrow)]
    pub metadata: Metadata<'a>,
}

impl<'a> RequestHead<'a> {
    /// A head with no trace context and no metadata.
    pub fn new(service: &'a str, method: &'a str, deadline_ms: u32) -> Self {
        RequestHead {
            service,
            method,
            deadline_ms,
            trace: None,
            metadata: Metadata::new(),
        }
    }
}

/// What a callee sends first on a call stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ResponseHead<'a> {
    /// The outcome.
    pub status: Status,
    /// A human-readable reason for a failure; empty on success.
    pub message: &'a str,
    /// Response metadata.
    #[serde(borrow)]
    pub metadata: Metadata<'a>,
}

impl<'a> ResponseHead<'a> {
    /// A head with this status and message, and no metadata.
    pub fn new(status: Status, message: &'a str) -> Self {
        ResponseHead {
            status,
            message,
            metadata: Metadata::new(),
        }
    }
}

/// What a node is in the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Role {
    /// A plain node.
    Node,
    /// A node that is also the site's control plane.
    Gateway,
}

impl Role {
    /// `node` or `gateway`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Gateway => "gateway",
        }
    }
}

/// What each side of a new connection says first, on a unidirectional stream of its own.
///
/// The name must match the SPIFFE ID of the certificate the peer presented; the receiver checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Hello<'a> {
    /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of the sender.
    pub protocol_version: u16,
    /// The sender's node name.
    pub name: &'a str,
    /// Node or gateway.
    pub role: Role,
    /// The sender's labels.
    #[serde(borrow)]
    pub labels: Labels<'a>,
    /// The services the sender hosts.
    #[serde(borrow)]
    pub services: Services<'a>,
}
