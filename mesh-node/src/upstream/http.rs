//! `http://host:port[/prefix]`: each call is `POST <prefix>/<method>` with the body, the caller's
//! verified SPIFFE ID in `x-starling-caller` and the call's metadata as headers, over a pool of
//! kept-alive HTTP/1.1 connections. A 2xx answer is `Ok`; any other is `Upstream(code)` with the
//! upstream's body.
//!
//! Metadata comes from a remote peer: names that would let it speak for the mesh or for the HTTP
//! exchange itself (`x-starling-*`, `host`, hop-by-hop names, `content-*`, `transfer-encoding`) are
//! never passed on; the node sets `x-starling-caller` itself, once, from the verified certificate.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mesh_proto::Status;

use crate::call::{CallContext, Reply};

/// Idle HTTP connections kept per upstream.
const MAX_IDLE: usize = 64;

/// An HTTP upstream and its pool of idle connections.
pub(crate) struct HttpUpstream {
    authority: String,
    prefix: String,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl HttpUpstream {
    pub(crate) fn new(authority: String, prefix: String) -> Self {
        HttpUpstream {
            authority,
            prefix,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) async fn serve(&self, ctx: &CallContext, body: Bytes, max_body: usize) -> Reply {
        match self.call(ctx, body, max_body).await {
            Ok(reply) | Err(reply) => reply,
        }
    }

    async fn call(&self, ctx: &CallContext, body: Bytes, max_body: usize) -> Result<Reply, Reply> {
        let (authority, prefix) = (self.authority.as_str(), self.prefix.as_str());
        let mut sender = self.sender().await?;
        let mut req = hyper::Request::post(format!("{prefix}/{}", ctx.method))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header("x-starling-caller", ctx.caller.to_string())
            .header("x-starling-service", ctx.service.as_str());
        for (k, v) in ctx.metadata.iter().filter(|(k, _)| forwardable(k)) {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(body)).map_err(|e| {
            Reply::error(
                Status::InvalidArgument,
                format!("metadata is not valid HTTP: {e}"),
            )
        })?;
        let resp = sender.send_request(req).await.map_err(|e| {
            Reply::error(
                Status::Unavailable,
                format!("upstream http://{authority} failed: {e}"),
            )
        })?;
        let code = resp.status();
        let body = Limited::new(resp.into_body(), max_body)
            .collect()
            .await
            .map_err(|e| {
                Reply::error(
                    Status::Internal,
                    format!("reading the answer of upstream http://{authority}: {e} (bound {max_body} bytes)"),
                )
            })?
            .to_bytes();
        self.give_back(sender);
        if code.is_success() {
            Ok(Reply::ok(body))
        } else {
            Ok(Reply {
                status: Status::Upstream(code.as_u16()),
                message: format!("upstream answered HTTP {}", code.as_u16()),
                body,
                leaf: None,
            })
        }
    }

    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, Reply> {
        // A pooled connection may still be finishing its last exchange: wait for it rather than
        // dropping it; one that closed meanwhile fails `ready` and is dropped.
        loop {
            let pooled = self.idle.lock().map(|mut idle| idle.pop()).unwrap_or(None);
            match pooled {
                Some(mut s) => {
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                None => break,
            }
        }
        let authority = self.authority.as_str();
        let unavailable = |e: String| {
            Reply::error(
                Status::Unavailable,
                format!("upstream http://{authority} unreachable: {e}"),
            )
        };
        let stream = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(authority),
        )
        .await
        .map_err(|_| unavailable("connect timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    fn give_back(&self, sender: SendRequest<Full<Bytes>>) {
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(sender);
        }
    }
}

/// Whether a metadata entry named `name` may reach the upstream as a header.
fn forwardable(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    !(name.starts_with("x-starling-")
        || name.starts_with("content-")
        || name.starts_with("proxy-")
        || matches!(
            name.as_str(),
            "host"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "trailers"
                | "transfer-encoding"
                | "upgrade"
                | "expect"
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_cannot_speak_for_the_mesh_or_the_http_exchange() {
        for name in [
            "x-starling-caller",
            "X-Starling-Caller",
            "x-starling-service",
            "Host",
            "connection",
            "Transfer-Encoding",
            "content-length",
            "Content-Type",
            "proxy-authorization",
            "upgrade",
            "te",
        ] {
            assert!(!forwardable(name), "{name} passed");
        }
        for name in ["x-canary", "x-request-id", "traceparent-ish"] {
            assert!(forwardable(name), "{name} was dropped");
        }
    }
}
