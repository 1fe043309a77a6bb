//! What a call is inside the node: its options at the caller, its context at the callee, its
//! reply, the error a caller sees, and the shape of a streamed call.

use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::{MethodName, ServiceName, SpiffeId};
use mesh_proto::heads::ResponseView;
use mesh_proto::limits::MAX_HEAD_BYTES;
use mesh_proto::{Status, TraceContext};

use crate::wire::{FrameReader, MAX_CHUNK_BYTES, ReadError, write_chunk};

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// How long the caller waits; the node's `call_timeout` when `None`.
    pub timeout: Option<Duration>,
    /// Request metadata (`x-canary = 1`). Keys starting with `:` are the mesh's own and refused.
    pub metadata: Vec<(String, String)>,
    /// The trace this call continues (from a `traceparent` header); a new one when `None`.
    pub trace: Option<TraceContext>,
    /// Make the call as the site's cloud (`spiffe://<td>/cloud/<client-id>`): only a gateway's
    /// node may, and the callee's policy then decides by that identity, not the gateway's.
    pub on_behalf_of: Option<SpiffeId>,
}

/// The request metadata that names the cloud identity a gateway calls for.
pub(crate) const ON_BEHALF_OF_METADATA: &str = ":on-behalf-of";

/// Whether a metadata key is the mesh's own, never taken from a peer or an app: `:`-names, and
/// `x-starling-*` in any case and with any other punctuation for `-`. An HTTP upstream behind CGI,
/// WSGI or PHP reads `x_starling_caller` and `X-Starling-Caller` as one variable
/// (`HTTP_X_STARLING_CALLER`; some servers map every character that is not a letter or a digit
/// so), and a peer's `x_starling_caller` would otherwise pass as the caller the node vouches for.
pub(crate) fn is_mesh_key(key: &str) -> bool {
    const PREFIX: &[u8] = b"x-starling-";
    key.starts_with(':')
        || key.len() >= PREFIX.len()
            && key.as_bytes()[..PREFIX.len()]
                .iter()
                .zip(PREFIX)
                .all(|(k, p)| {
                    k.to_ascii_lowercase() == *p || (*p == b'-' && !k.is_ascii_alphanumeric())
                })
}

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
    /// The caller streams its body (and takes a streamed answer).
    pub streaming: bool,
    /// The policy marks the method idempotent: an upstream may send it again when a request or
    /// answer is lost (a serial line).
    pub idempotent: bool,
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
    /// The leaf that served it (a microcontroller behind the callee node), when one did: calls
    /// are counted under `<node>/leaf/<name>`.
    pub leaf: Option<std::sync::Arc<str>>,
}

/// The response metadata that names the leaf that served a call.
pub(crate) const LEAF_METADATA: &str = ":leaf";

impl Reply {
    /// The same reply, served by leaf `name`.
    pub(crate) fn served_by_leaf(mut self, name: &std::sync::Arc<str>) -> Self {
        self.leaf = Some(name.clone());
        self
    }

    /// A successful reply.
    pub fn ok(body: Bytes) -> Self {
        Reply {
            status: Status::Ok,
            message: String::new(),
            body,
            leaf: None,
        }
    }

    /// A failed reply with no body.
    pub fn error(status: Status, message: impl Into<String>) -> Self {
        Reply {
            status,
            message: message.into(),
            body: Bytes::new(),
            leaf: None,
        }
    }

    /// The failure as the caller's error (whatever the status).
    pub(crate) fn into_error(self) -> CallError {
        CallError {
            status: self.status,
            message: self.message,
            body: self.body,
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

/// A streamed call in progress, on the caller's side: send the body in chunks, then read the
/// answer's head and its body in chunks. Memory stays bounded by one chunk each way, whatever the
/// size of what crosses. Made by [`Node::call_stream`](crate::Node::call_stream); never retried.
/// To send and receive at once (an echo, a tunnel), [`CallStream::split`] it.
///
/// Time: with a timeout in its [`CallOptions`], the whole call must end within it (a deadline, as
/// in gRPC), however long each step takes; without one, there is no total deadline, and each step
/// (a chunk sent, the answer's head, a chunk received) must make progress within the node's
/// `call_timeout`, so a transfer takes as long as its size needs and a stalled one ends.
pub struct CallStream {
    sender: CallSender,
    receiver: CallReceiver,
}

/// How long a streamed call may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamTime {
    /// The whole call, when the caller set a timeout.
    pub(crate) deadline: Option<tokio::time::Instant>,
    /// Each step.
    pub(crate) step: Duration,
}

impl StreamTime {
    /// Runs one step within the time left.
    pub(crate) async fn step<T>(
        &self,
        f: impl std::future::Future<Output = T>,
    ) -> Result<T, CallError> {
        match self.deadline {
            // The caller's deadline bounds the whole call, and nothing else does.
            Some(deadline) => tokio::time::timeout_at(deadline, f)
                .await
                .map_err(|_| deadline_passed()),
            None => tokio::time::timeout(self.step, f).await.map_err(|_| {
                CallError::new(
                    Status::DeadlineExceeded,
                    format!("the streamed call made no progress for {:?}", self.step),
                )
            }),
        }
    }
}

/// The sending half of a [`CallStream`]. Dropped without [`CallSender::finish`], it resets the
/// stream: the callee never takes a body cut short for a whole one.
pub struct CallSender {
    send: Option<quinn::SendStream>,
    time: StreamTime,
    /// Bytes sent so far, and the bound on them (`max_body_bytes`, when set).
    sent: u64,
    max: Option<u64>,
}

/// The receiving half of a [`CallStream`].
pub struct CallReceiver {
    reader: FrameReader,
    head: Option<(Status, String)>,
    time: StreamTime,
    received: u64,
    max: Option<u64>,
    /// Told once how the call went: the answer's status when its head arrives, or `None` when the
    /// receiver is dropped before it (the call is counted, and its endpoint's slot given back).
    on_head: Option<HeadHook>,
}

/// What a streamed call reports when its answer's head arrives (or never does).
pub(crate) type HeadHook = Box<dyn FnOnce(Option<Status>) + Send>;

impl Drop for CallReceiver {
    fn drop(&mut self) {
        if let Some(hook) = self.on_head.take() {
            hook(None);
        }
    }
}

impl CallStream {
    pub(crate) fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        time: StreamTime,
        max: Option<u64>,
        on_head: Option<HeadHook>,
    ) -> Self {
        CallStream {
            sender: CallSender {
                send: Some(send),
                time,
                sent: 0,
                max,
            },
            receiver: CallReceiver {
                reader: FrameReader::new(recv),
                head: None,
                time,
                received: 0,
                max,
                on_head,
            },
        }
    }

    /// The two halves, to drive from two tasks (or one `join`).
    pub fn split(self) -> (CallSender, CallReceiver) {
        (self.sender, self.receiver)
    }

    /// Sends the next chunk of the request body.
    pub async fn send(&mut self, chunk: Bytes) -> Result<(), CallError> {
        self.sender.send(chunk).await
    }

    /// Ends the request body.
    pub fn finish(&mut self) {
        self.sender.finish();
    }

    /// Waits for the answer's head: its status and, for a failure, the reason.
    pub async fn status(&mut self) -> Result<(Status, String), CallError> {
        self.receiver.status().await
    }

    /// The next chunk of the answer's body, or `None` at its end.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, CallError> {
        self.receiver.recv().await
    }
}

impl CallSender {
    /// Sends the next chunk of the request body.
    pub async fn send(&mut self, chunk: Bytes) -> Result<(), CallError> {
        self.sent += chunk.len() as u64;
        if let Some(max) = self.max
            && self.sent > max
        {
            self.reset();
            return Err(CallError::new(
                Status::ResourceExhausted,
                format!(
                    "the request body exceeds the bound of {max} bytes (limits.max_body_bytes)"
                ),
            ));
        }
        let Some(send) = self.send.as_mut() else {
            return Err(CallError::new(
                Status::InvalidArgument,
                "the request body was ended already",
            ));
        };
        match self.time.step(write_chunk(send, chunk)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CallError::new(
                Status::Unavailable,
                format!("the callee stopped reading: {e}"),
            )),
            Err(e) => {
                self.reset();
                Err(e)
            }
        }
    }

    /// Ends the request body.
    pub fn finish(&mut self) {
        // Already finished or reset by the callee: the answer says why.
        if let Some(mut send) = self.send.take() {
            let _ = send.finish();
        }
    }

    /// Abandons the request body: the callee sees the stream reset, not a shorter body.
    pub fn reset(&mut self) {
        if let Some(mut send) = self.send.take() {
            let _ = send.reset(0u32.into());
        }
    }
}

impl Drop for CallSender {
    fn drop(&mut self) {
        self.reset();
    }
}

impl CallReceiver {
    /// Waits for the answer's head: its status and, for a failure, the reason.
    pub async fn status(&mut self) -> Result<(Status, String), CallError> {
        if let Some(head) = &self.head {
            return Ok(head.clone());
        }
        let head = match self.time.step(self.reader.frame(MAX_HEAD_BYTES)).await {
            Ok(Ok(bytes)) => ResponseView::decode(&bytes)
                .map(|h| (h.status, h.message.to_owned()))
                .map_err(|e| {
                    CallError::new(Status::Internal, format!("bad answer head from peer: {e}"))
                }),
            Ok(Err(e)) => Err(read_failed(&e)),
            Err(e) => Err(e),
        };
        if let Some(hook) = self.on_head.take() {
            hook(Some(head.as_ref().map_or_else(|e| e.status, |h| h.0)));
        }
        let head = head?;
        self.head = Some(head.clone());
        Ok(head)
    }

    /// The next chunk of the answer's body, or `None` at its end.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, CallError> {
        self.status().await?;
        let chunk = match self
            .time
            .step(self.reader.next_frame(MAX_CHUNK_BYTES))
            .await?
        {
            Ok(chunk) => chunk,
            Err(e) => return Err(read_failed(&e)),
        };
        if let Some(c) = &chunk {
            self.received += c.len() as u64;
            if let Some(max) = self.max
                && self.received > max
            {
                return Err(CallError::new(
                    Status::Internal,
                    format!("the answer exceeds the bound of {max} bytes (limits.max_body_bytes)"),
                ));
            }
        }
        Ok(chunk)
    }
}

fn deadline_passed() -> CallError {
    CallError::new(
        Status::DeadlineExceeded,
        "the streamed call passed its deadline",
    )
}

fn read_failed(e: &ReadError) -> CallError {
    match e {
        ReadError::Stream(e) => {
            CallError::new(Status::Unavailable, format!("connection to peer lost: {e}"))
        }
        e => CallError::new(Status::Internal, format!("bad answer from peer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::is_mesh_key;

    #[test]
    fn the_meshs_keys_are_known_in_every_spelling() {
        for key in [
            ":keep",
            ":on-behalf-of",
            "x-starling-caller",
            "X-Starling-Caller",
            "x_starling_caller",
            "X_STARLING_SERVICE",
            "x-starling_caller",
            "x_starling-",
            "x.starling.caller",
            "X~Starling~Caller",
        ] {
            assert!(is_mesh_key(key), "{key} passed as an app's key");
        }
        for key in [
            "x-canary",
            "x_request_id",
            "x-starlingcaller",
            "x-starlin",
            "",
        ] {
            assert!(!is_mesh_key(key), "{key} was taken for the mesh's");
        }
    }
}
