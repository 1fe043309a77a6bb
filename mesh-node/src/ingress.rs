//! The local ingress: plain HTTP/1.1 on loopback, so an app in any language can call the mesh.
//!
//! - `POST /v1/call/<service>/<method>`: the request body is the call's body; the answer's body
//!   is the reply's. Statuses map to HTTP (see [`http_status`]); every answer carries
//!   `x-starling-status`, and a failure's body is its reason. A body sent chunked, or longer than
//!   [`STREAM_THRESHOLD`], or any request with `x-starling-stream: 1`, is a streamed call: the
//!   body goes through the node chunk by chunk as it arrives and the answer comes back chunked as
//!   the callee sends it, so neither is held whole (`limits.max_body_bytes` bounds such a body's
//!   total only when the config sets it). A service this node hosts itself is called with the
//!   body buffered, within `limits.max_body_bytes`. An answer that fails after its head was sent is cut
//!   off (no final chunk), never ended as if whole. Optional request headers:
//!   `x-starling-timeout-ms` (the call's deadline), `traceparent` (W3C trace context: the call
//!   joins that trace, sampled as its flags say) and any other `x-...` header, passed on as call
//!   metadata.
//! - `GET /v1/health`: `ok` while the node runs.
//! - `GET /v1/peers`: the connected peers, as JSON.
//! - `GET /v1/status`: the node's own view: peers, dial errors, refused handshakes, its gateway
//!   connection, the policy version it runs under, its telemetry backlog.
//!
//! The ingress is plain text by design and therefore listens on loopback only (the config refuses
//! anything else).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use mesh_proto::Status;

use crate::call::{CallOptions, Reply, http_status};
use crate::http::{
    BudgetGuard, ByteBudget, ChannelBody, GuardedBody, json, json_str, plain, serve_http,
};
use crate::node::Node;

/// A request body longer than this (by its `content-length`) is streamed, not buffered.
pub const STREAM_THRESHOLD: usize = 1024 * 1024;

/// Bytes of a streamed call's failure body shown to the client.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Binds the ingress of `node` on `addr` and serves it in the background until the node shuts
/// down, within the node's `[limits]` for the ingress; returns the bound address.
pub async fn serve(node: Node, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let stop = node.shutdown_signal();
    let limits = node.config().limits.ingress.clone();
    let ingress = Ingress {
        budget: ByteBudget::new(limits.max_buffered_bytes),
        body_timeout: limits.body_timeout,
        node,
    };
    serve_http(addr, &limits, stop, move |req| handle(ingress.clone(), req)).await
}

/// What each request of the ingress reaches.
#[derive(Clone)]
struct Ingress {
    node: Node,
    /// Bytes of request and reply bodies held now, across every request.
    budget: std::sync::Arc<ByteBudget>,
    body_timeout: Duration,
}

async fn handle(
    ingress: Ingress,
    req: Request<Incoming>,
) -> Result<Response<GuardedBody>, Infallible> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let node = &ingress.node;
    let plain_body = |r: Response<Full<Bytes>>| r.map(|_| GuardedBody::new(Bytes::new(), None));
    let (reply, guard) = match (req.method(), parts.as_slice()) {
        (&Method::POST, ["v1", "call", service, method]) => {
            let (service, method) = ((*service).to_owned(), (*method).to_owned());
            // A service this node hosts itself takes the buffered path (within the body bound).
            if streamed(&req) && !node.hosts(&service) {
                return Ok(call_streamed(&ingress, req, &service, &method).await);
            }
            call(&ingress, req, &service, &method).await
        }
        (&Method::GET, ["v1", "health"]) => return Ok(text(200, "ok")),
        (&Method::GET, ["v1", "peers"]) => return Ok(json_body(peers_json(node))),
        (&Method::GET, ["v1", "status"]) => return Ok(json_body(status_json(node))),
        (_, ["v1", "call", _, _]) => return Ok(plain_body(plain(405, "use POST for calls"))),
        _ => {
            return Ok(text(
                404,
                "no such path; calls go to POST /v1/call/<service>/<method>",
            ));
        }
    };
    Ok(reply_response(reply, guard))
}

fn text(code: u16, body: &'static str) -> Response<GuardedBody> {
    plain(code, body).map(|_| GuardedBody::new(Bytes::from_static(body.as_bytes()), None))
}

fn json_body(body: String) -> Response<GuardedBody> {
    json(200, String::new()).map(|_| GuardedBody::new(Bytes::from(body), None))
}

/// Reads a call's body within the byte budget and the body deadline, makes the call, and holds
/// the budget for the body and the reply until the reply is written.
async fn call(
    ingress: &Ingress,
    req: Request<Incoming>,
    service: &str,
    method: &str,
) -> (Reply, Option<BudgetGuard>) {
    let node = &ingress.node;
    let max = node.max_body_bytes();
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(len) = declared
        && len > max
    {
        let why = format!("request body of {len} bytes exceeds the bound of {max} bytes");
        return (Reply::error(Status::ResourceExhausted, why), None);
    }
    let busy = || {
        Reply::error(
            Status::Unavailable,
            format!(
                "the ingress is busy: {} bytes of bodies in flight, the bound is {} \
                 (limits.ingress_max_buffered_bytes); try again",
                ingress.budget.used(),
                ingress.budget.max()
            ),
        )
    };
    // Replies that arrived count too (they may overshoot the bound by one body per call in
    // flight): while the budget is spent, new calls wait their turn.
    let spent = ingress.budget.used() >= ingress.budget.max();
    let Some(mut guard) = ingress
        .budget
        .take(declared.unwrap_or(0))
        .filter(|_| !spent)
    else {
        // Read and drop the body (holding nothing), so the client hears the answer instead of a
        // broken pipe.
        let _ = tokio::time::timeout(ingress.body_timeout, drain(req.into_body())).await;
        return (busy(), None);
    };
    let options = match call_options(&req) {
        Ok(o) => o,
        Err(reply) => return (reply, None),
    };
    let reserved = declared.unwrap_or(0);
    let read = read_body(req.into_body(), max, reserved, &mut guard);
    let body = match tokio::time::timeout(ingress.body_timeout, read).await {
        Ok(Ok(body)) => body,
        Ok(Err(BodyError::TooLarge)) => {
            let why = format!("request body exceeds the bound of {max} bytes");
            return (Reply::error(Status::ResourceExhausted, why), None);
        }
        Ok(Err(BodyError::Busy(rest))) => {
            drop(guard);
            let _ = tokio::time::timeout(ingress.body_timeout, drain(rest)).await;
            return (busy(), None);
        }
        Ok(Err(BodyError::Read(e))) => {
            return (
                Reply::error(Status::InvalidArgument, format!("request body: {e}")),
                None,
            );
        }
        Err(_) => {
            let why = format!(
                "the request body did not arrive within {} ms (limits.ingress_body_timeout_ms)",
                ingress.body_timeout.as_millis()
            );
            return (Reply::error(Status::DeadlineExceeded, why), None);
        }
    };
    let reply = node.call_with(service, method, body, &options).await;
    guard.hold(reply.body.len());
    (reply, Some(guard))
}

/// Whether a call request is streamed: chunked, longer than [`STREAM_THRESHOLD`], or asked for.
fn streamed(req: &Request<Incoming>) -> bool {
    let headers = req.headers();
    let asked = headers
        .get("x-starling-stream")
        .is_some_and(|v| v.as_bytes() == b"1");
    let declared = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let chunked = headers
        .get(hyper::header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    asked || chunked || declared.is_some_and(|len| len > STREAM_THRESHOLD)
}

/// A streamed call: the request body goes up as it arrives, the answer comes back as it comes,
/// each through a channel of a few chunks (a client that stops reading stops the callee, through
/// QUIC's flow control, and is cut off after `limits.ingress_body_timeout_ms`).
async fn call_streamed(
    ingress: &Ingress,
    req: Request<Incoming>,
    service: &str,
    method: &str,
) -> Response<GuardedBody> {
    let node = &ingress.node;
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let (Some(max), Some(len)) = (node.config().limits.max_stream_bytes, declared)
        && len > max
    {
        let why = format!(
            "request body of {len} bytes exceeds the bound of {max} bytes (limits.max_body_bytes)"
        );
        return reply_response(Reply::error(Status::ResourceExhausted, why), None);
    }
    let options = match call_options(&req) {
        Ok(o) => o,
        Err(reply) => return reply_response(reply, None),
    };
    let stream = match node.call_stream(service, method, &options).await {
        Ok(s) => s,
        Err(e) => return reply_response(error_reply(e), None),
    };
    let (mut up, mut down) = stream.split();
    let mut body = req.into_body();
    let body_timeout = ingress.body_timeout;
    let upload = tokio::spawn(async move {
        loop {
            let frame = match tokio::time::timeout(body_timeout, body.frame()).await {
                Ok(None) => {
                    up.finish();
                    return Ok(());
                }
                Ok(Some(Ok(frame))) => frame,
                Ok(Some(Err(e))) => {
                    return Err(Reply::error(
                        Status::InvalidArgument,
                        format!("request body: {e}"),
                    ));
                }
                Err(_) => {
                    return Err(Reply::error(
                        Status::DeadlineExceeded,
                        format!(
                            "the request body stalled for {} ms (limits.ingress_body_timeout_ms)",
                            body_timeout.as_millis()
                        ),
                    ));
                }
            };
            if let Ok(data) = frame.into_data() {
                up.send(data).await.map_err(error_reply)?;
            }
        }
        // `up` dropped unfinished on every error: the callee sees the stream reset.
    });
    let head = down.status().await;
    match head {
        Ok((Status::Ok, _)) => {
            let (tx, rx) = ChannelBody::channel();
            tokio::spawn(async move {
                loop {
                    match down.recv().await {
                        Ok(Some(chunk)) => {
                            if tx.send(Ok(Some(chunk))).await.is_err() {
                                // The client left: dropping `down` stops the callee.
                                return;
                            }
                        }
                        Ok(None) => {
                            let _ = tx.send(Ok(None)).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                            return;
                        }
                    }
                }
            });
            Response::builder()
                .status(200)
                .header("x-starling-status", Status::Ok.as_str())
                .body(GuardedBody::streamed(rx))
                .unwrap_or_else(|_| text(500, "could not build the answer"))
        }
        other => {
            // When the upload failed, its reason is the answer (the callee only saw a reset).
            if upload.is_finished() {
                if let Ok(Err(reply)) = upload.await {
                    return reply_response(reply, None);
                }
            } else {
                upload.abort();
            }
            let reply = match other {
                Ok((status, message)) => {
                    // A failure's body (an upstream's error page), up to a bound.
                    let mut body = bytes::BytesMut::new();
                    while body.len() < MAX_ERROR_BODY {
                        match down.recv().await {
                            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
                            _ => break,
                        }
                    }
                    body.truncate(MAX_ERROR_BODY);
                    Reply {
                        status,
                        message,
                        body: body.freeze(),
                        leaf: None,
                    }
                }
                Err(e) => error_reply(e),
            };
            reply_response(reply, None)
        }
    }
}

fn error_reply(e: crate::CallError) -> Reply {
    Reply {
        status: e.status,
        message: e.message,
        body: e.body,
        leaf: None,
    }
}

enum BodyError {
    TooLarge,
    /// The budget ran out; the rest of the body is still to be read.
    Busy(Incoming),
    Read(hyper::Error),
}

/// Reads a body to its end, keeping nothing.
async fn drain(mut body: Incoming) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// Collects a request body of at most `max` bytes, taking from the budget what it did not reserve.
async fn read_body(
    mut body: Incoming,
    max: usize,
    reserved: usize,
    guard: &mut BudgetGuard,
) -> Result<Bytes, BodyError> {
    let mut out = bytes::BytesMut::with_capacity(reserved.min(max));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(BodyError::Read)?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if out.len() + data.len() > max {
            return Err(BodyError::TooLarge);
        }
        let beyond = (out.len() + data.len()).saturating_sub(reserved.max(out.len()));
        if beyond > 0 && !guard.grow(beyond) {
            return Err(BodyError::Busy(body));
        }
        out.extend_from_slice(&data);
    }
    Ok(out.freeze())
}

fn call_options(req: &Request<Incoming>) -> Result<CallOptions, Reply> {
    let mut options = CallOptions::default();
    for (name, value) in req.headers() {
        let name = name.as_str();
        let Ok(value) = value.to_str() else { continue };
        if name == "x-starling-timeout-ms" {
            match value.parse::<u64>() {
                Ok(ms) if ms > 0 => options.timeout = Some(Duration::from_millis(ms)),
                _ => {
                    return Err(Reply::error(
                        Status::InvalidArgument,
                        format!(
                            "x-starling-timeout-ms: {value:?} is not a positive number of milliseconds"
                        ),
                    ));
                }
            }
        } else if name == "traceparent" {
            options.trace = parse_traceparent(value);
        } else if name.starts_with("x-") && !crate::call::is_mesh_key(name) {
            options.metadata.push((name.to_owned(), value.to_owned()));
        }
    }
    Ok(options)
}

fn reply_response(reply: Reply, guard: Option<BudgetGuard>) -> Response<GuardedBody> {
    let mut builder = Response::builder()
        .status(http_status(reply.status))
        .header("x-starling-status", reply.status.as_str());
    if let Status::Upstream(code) = reply.status {
        builder = builder.header("x-starling-upstream-status", code);
    }
    if reply.status != Status::Ok && !reply.body.is_empty() {
        // Keep the reason too when the body is the upstream's.
        builder = builder.header("x-starling-message", sanitize_header(&reply.message));
    }
    let body = if reply.status == Status::Ok || !reply.body.is_empty() {
        reply.body
    } else {
        Bytes::from(reply.message)
    };
    builder
        .body(GuardedBody::new(body, guard))
        .unwrap_or_else(|_| text(500, "could not build the answer"))
}

fn sanitize_header(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .take(512)
        .collect()
}

fn peers_json(node: &Node) -> String {
    format!(
        "{{\"node\":{},\"peers\":{}}}",
        json_str(&node.id().to_string()),
        peer_list(&node.peers())
    )
}

/// `GET /v1/status`: what [`Node::status`] says, as JSON.
fn status_json(node: &Node) -> String {
    let s = node.status();
    let strings = |items: &mut dyn Iterator<Item = String>| {
        items.map(|i| json_str(&i)).collect::<Vec<_>>().join(",")
    };
    format!(
        "{{\"name\":{},\"id\":{},\"quic\":{},\"hosted\":[{}],\"peers\":{},\"dial_errors\":[{}],\
         \"refused_handshakes\":{},\"last_refusal\":{},\"connections_admitted\":{},\"peers_lost\":{},\"gateway\":{},\"gateway_sessions\":{},\"policy\":{{\"version\":{},\"epoch\":{},\"hash\":{},\"source\":{},\"problem\":{}}},\
         \"telemetry\":{{\"pending\":{},\"dropped\":{},\"pending_bytes\":{},\"lost_items\":{}}},\"certificate_expires_in_s\":{},\"revoked\":{},\"renewal\":{{\"renewals\":{},\"problem\":{},\"revoked\":{},\"roots\":{}}},\"clock\":{},\"serial\":[{}]}}",
        json_str(s.id.node_name().as_str()),
        json_str(&s.id.to_string()),
        json_str(&s.quic.to_string()),
        strings(&mut s.hosted.iter().map(|h| h.to_string())),
        peer_list(&s.peers),
        strings(&mut s.dial_errors.iter().cloned()),
        s.refused_handshakes,
        s.last_refusal
            .as_deref()
            .map_or("null".to_owned(), json_str),
        s.connections_admitted,
        s.peers_lost,
        s.gateway
            .map_or("null".to_owned(), |g| json_str(&g.to_string())),
        s.gateway_sessions,
        s.policy.map_or(0, |p| p.version),
        s.policy.map_or(0, |p| p.epoch),
        s.policy
            .map_or("null".to_owned(), |p| json_str(&crate::state::hex(&p.hash))),
        json_str(s.policy_source),
        s.policy_problem
            .as_deref()
            .map_or("null".to_owned(), json_str),
        s.telemetry_pending,
        s.telemetry_dropped,
        s.telemetry_pending_bytes,
        s.telemetry_lost_items,
        s.certificate_expires_in_s,
        s.revoked.as_deref().map_or("null".to_owned(), json_str),
        s.renewal.renewals,
        s.renewal
            .problem
            .as_deref()
            .map_or("null".to_owned(), json_str),
        s.renewal.revoked,
        s.renewal.roots,
        json_str(s.clock),
        s.serial
            .iter()
            .map(|(path, device, d)| format!(
                "{{\"path\":{},\"device\":{},\"dropped\":{{\"too_long\":{},\"garbled\":{},\"bad_checksum\":{},\"unknown\":{},\"unauthenticated\":{}}}}}",
                json_str(&path.display().to_string()),
                device.as_deref().map_or("null".to_owned(), json_str),
                d[0], d[1], d[2], d[3], d[4]
            ))
            .collect::<Vec<_>>()
            .join(","),
    )
}

fn peer_list(peers: &[crate::PeerInfo]) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| {
            let map = |m: &std::collections::BTreeMap<String, String>| {
                m.iter()
                    .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let services: Vec<String> = p.services.iter().map(|s| json_str(s.as_str())).collect();
            format!(
                "{{\"id\":{},\"name\":{},\"role\":{},\"addr\":{},\"labels\":{{{}}},\"certified_labels\":{{{}}},\"services\":[{}],\"protocol\":{}}}",
                json_str(&p.id.to_string()),
                json_str(p.id.node_name().as_str()),
                json_str(p.role.as_str()),
                json_str(&p.addr.to_string()),
                map(&p.labels),
                map(&p.certified),
                services.join(","),
                p.protocol
            )
        })
        .collect();
    format!("[{}]", peers.join(","))
}

/// A W3C `traceparent` (`00-<trace id>-<parent span id>-<flags>`), if well formed.
fn parse_traceparent(value: &str) -> Option<mesh_proto::TraceContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let mut trace_id = [0u8; 16];
    let mut span_id = [0u8; 8];
    for (i, b) in trace_id.iter_mut().enumerate() {
        *b = u8::from_str_radix(trace.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    for (i, b) in span_id.iter_mut().enumerate() {
        *b = u8::from_str_radix(span.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(mesh_proto::TraceContext {
        trace_id,
        span_id,
        flags: u8::from_str_radix(flags, 16).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_w3c_traceparent() {
        let t = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(t.trace_id[0], 0x4b);
        assert_eq!(t.span_id[7], 0xb7);
        assert_eq!(t.flags, 1);
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none()
        );
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none()
        );
        assert!(parse_traceparent("garbage").is_none());
    }
}
