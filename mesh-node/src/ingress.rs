//! The local ingress: plain HTTP/1.1 on loopback, so an app in any language can call the mesh.
//!
//! - `POST /v1/call/<service>/<method>`: the request body is the call's body; the answer's body
//!   is the reply's. Statuses map to HTTP (see [`http_status`]); every answer carries
//!   `x-starling-status`, and a failure's body is its reason. Optional request headers:
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
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use mesh_proto::Status;

use crate::call::{CallOptions, Reply, http_status};
use crate::http::{json, json_str, plain, serve_http};
use crate::node::Node;

/// Binds the ingress of `node` on `addr` and serves it in the background until the node shuts
/// down; returns the bound address.
pub async fn serve(node: Node, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let stop = node.shutdown_signal();
    serve_http(addr, stop, move |req| handle(node.clone(), req)).await
}

async fn handle(node: Node, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let reply = match (req.method(), parts.as_slice()) {
        (&Method::POST, ["v1", "call", service, method]) => {
            let (service, method) = ((*service).to_owned(), (*method).to_owned());
            call(node, req, &service, &method).await
        }
        (&Method::GET, ["v1", "health"]) => return Ok(plain(200, "ok")),
        (&Method::GET, ["v1", "peers"]) => return Ok(json(200, peers_json(&node))),
        (&Method::GET, ["v1", "status"]) => return Ok(json(200, status_json(&node))),
        (_, ["v1", "call", _, _]) => return Ok(plain(405, "use POST for calls")),
        _ => {
            return Ok(plain(
                404,
                "no such path; calls go to POST /v1/call/<service>/<method>",
            ));
        }
    };
    Ok(reply_response(reply))
}

async fn call(node: Node, req: Request<Incoming>, service: &str, method: &str) -> Reply {
    let mut options = CallOptions::default();
    for (name, value) in req.headers() {
        let name = name.as_str();
        let Ok(value) = value.to_str() else { continue };
        if name == "x-starling-timeout-ms" {
            match value.parse::<u64>() {
                Ok(ms) if ms > 0 => options.timeout = Some(Duration::from_millis(ms)),
                _ => {
                    return Reply::error(
                        Status::InvalidArgument,
                        format!(
                            "x-starling-timeout-ms: {value:?} is not a positive number of milliseconds"
                        ),
                    );
                }
            }
        } else if name == "traceparent" {
            options.trace = parse_traceparent(value);
        } else if name.starts_with("x-") && !name.starts_with("x-starling-") {
            options.metadata.push((name.to_owned(), value.to_owned()));
        }
    }
    let max = node.max_body_bytes();
    let body = match Limited::new(req.into_body(), max).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let status = if e.is::<http_body_util::LengthLimitError>() {
                Status::ResourceExhausted
            } else {
                Status::InvalidArgument
            };
            return Reply::error(status, format!("request body: {e} (bound {max} bytes)"));
        }
    };
    node.call_with(service, method, body, &options).await
}

fn reply_response(reply: Reply) -> Response<Full<Bytes>> {
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
        .body(Full::new(body))
        .unwrap_or_else(|_| plain(500, "could not build the answer"))
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
         \"telemetry\":{{\"pending\":{},\"dropped\":{}}}}}",
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
    )
}

fn peer_list(peers: &[crate::PeerInfo]) -> String {
    let peers: Vec<String> = peers
        .iter()
        .map(|p| {
            let labels: Vec<String> = p
                .labels
                .iter()
                .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
                .collect();
            let services: Vec<String> = p.services.iter().map(|s| json_str(s.as_str())).collect();
            format!(
                "{{\"id\":{},\"name\":{},\"role\":{},\"addr\":{},\"labels\":{{{}}},\"services\":[{}],\"protocol\":{}}}",
                json_str(&p.id.to_string()),
                json_str(p.id.node_name().as_str()),
                json_str(p.role.as_str()),
                json_str(&p.addr.to_string()),
                labels.join(","),
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
