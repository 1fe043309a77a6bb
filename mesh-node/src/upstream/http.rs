//! `http://host:port[/prefix]`: each call is `POST <prefix>/<method>` with the body, the caller's
//! verified SPIFFE ID in `x-starling-caller` and the call's metadata as headers, over a pool of
//! kept-alive HTTP/1.1 connections. A 2xx answer is `Ok`; any other is `Upstream(code)` with the
//! upstream's body. A streamed call goes to the upstream as a chunked request on a connection of
//! its own, and its answer comes back chunk by chunk: neither is held whole.
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

use crate::call::{CallContext, Reply, StreamTime};
use crate::http::ChannelBody;
use crate::wire::{FrameReader, MAX_CHUNK_BYTES, write_chunk, write_head};
use mesh_proto::ResponseHead;

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
        let authority = self.authority.as_str();
        let mut sender = self.sender().await?;
        let req = self.request(ctx, Full::new(body))?;
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

    /// `POST <prefix>/<method>` with the caller, the service and the forwardable metadata.
    fn request<B>(&self, ctx: &CallContext, body: B) -> Result<hyper::Request<B>, Reply> {
        let mut req = hyper::Request::post(format!("{}/{}", self.prefix, ctx.method))
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header("x-starling-caller", ctx.caller.to_string())
            .header("x-starling-service", ctx.service.as_str());
        for (k, v) in ctx.metadata.iter().filter(|(k, _)| forwardable(k)) {
            req = req.header(k.as_str(), v.as_str());
        }
        req.body(body).map_err(|e| {
            Reply::error(
                Status::InvalidArgument,
                format!("metadata is not valid HTTP: {e}"),
            )
        })
    }

    /// Serves a streamed call: the body goes to the upstream chunk by chunk as it arrives
    /// (HTTP chunked), and the answer comes back the same way; neither is held whole. Each step
    /// must make progress within `time`; the body's total is bounded by `max` when set.
    /// `Err` is the reply to write when nothing was written yet; once the answer's head is out, a
    /// failure resets the stream, so the caller never takes a cut answer for a whole one.
    pub(crate) async fn serve_streamed(
        &self,
        ctx: &CallContext,
        time: StreamTime,
        send: &mut quinn::SendStream,
        reader: &mut FrameReader,
        max: Option<u64>,
    ) -> Result<(), Reply> {
        let authority = self.authority.as_str();
        let mut sender = self.connect::<ChannelBody>().await?;
        let (tx, body) = ChannelBody::channel();
        let req = self.request(ctx, body)?;
        let written = std::sync::atomic::AtomicBool::new(false);
        let abort = |why: &str| Err(std::io::Error::other(why.to_owned()));
        let upload = async {
            // Owned here, so that the end of the caller's body ends the upstream's.
            let tx = tx;
            let mut total = 0u64;
            loop {
                let frame = match time.step(reader.next_frame(MAX_CHUNK_BYTES)).await {
                    Ok(Ok(frame)) => frame,
                    Ok(Err(e)) => {
                        let why = format!("request: {e}");
                        let _ = tx.send(abort(&why)).await;
                        return Err(why);
                    }
                    Err(e) => {
                        let _ = tx.send(abort(&e.message)).await;
                        return Err(e.message);
                    }
                };
                let Some(chunk) = frame else {
                    // The body ended, and so does the upstream's (only when told: a sender
                    // dropped before this cuts it).
                    let _ = time.step(tx.send(Ok(None))).await;
                    return Ok(());
                };
                total += chunk.len() as u64;
                if let Some(max) = max
                    && total > max
                {
                    let why = format!(
                        "the request body exceeds the bound of {max} bytes (limits.max_body_bytes)"
                    );
                    let _ = tx.send(abort(&why)).await;
                    return Err(why);
                }
                match time.step(tx.send(Ok(Some(chunk)))).await {
                    Ok(Ok(())) => {}
                    // The upstream answered without reading the rest.
                    Ok(Err(_)) => return Ok(()),
                    Err(e) => return Err(e.message),
                }
            }
        };
        let exchange = async {
            let resp = time
                .step(sender.send_request(req))
                .await
                .map_err(|e| {
                    Reply::error(
                        Status::DeadlineExceeded,
                        format!("upstream http://{authority}: {}", e.message),
                    )
                })?
                .map_err(|e| {
                    Reply::error(
                        Status::Unavailable,
                        format!("upstream http://{authority} failed: {e}"),
                    )
                })?;
            let code = resp.status();
            let head = if code.is_success() {
                ResponseHead::new(Status::Ok, "")
            } else {
                ResponseHead::new(Status::Upstream(code.as_u16()), "upstream answered")
            };
            written.store(true, std::sync::atomic::Ordering::Relaxed);
            let lost = |e: &dyn std::fmt::Display| {
                Reply::error(Status::Unavailable, format!("the caller left: {e}"))
            };
            write_head(send, &head).await.map_err(|e| lost(&e))?;
            let mut body = resp.into_body();
            loop {
                let frame = time
                    .step(body.frame())
                    .await
                    .map_err(|e| Reply::error(Status::DeadlineExceeded, e.message))?;
                match frame {
                    None => break,
                    Some(Err(e)) => {
                        return Err(Reply::error(
                            Status::Unavailable,
                            format!("reading the answer of upstream http://{authority}: {e}"),
                        ));
                    }
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            time.step(write_chunk(send, data))
                                .await
                                .map_err(|e| Reply::error(Status::DeadlineExceeded, e.message))?
                                .map_err(|e| lost(&e))?;
                        }
                    }
                }
            }
            let _ = send.finish();
            Ok::<_, Reply>(())
        };
        let failed = {
            let mut upload = std::pin::pin!(upload);
            let mut exchange = std::pin::pin!(exchange);
            let mut uploaded = false;
            loop {
                tokio::select! {
                    r = &mut upload, if !uploaded => match r {
                        Ok(()) => uploaded = true,
                        Err(why) => break Some(Reply::error(Status::InvalidArgument, why)),
                    },
                    r = &mut exchange => break r.err(),
                }
            }
        };
        match failed {
            None => Ok(()),
            Some(reply) if !written.load(std::sync::atomic::Ordering::Relaxed) => Err(reply),
            Some(reply) => {
                tracing::debug!("streamed call to {} ended: {}", ctx.service, reply.message);
                let _ = send.reset(0u32.into());
                Ok(())
            }
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
        self.connect().await
    }

    /// A new connection to the upstream.
    async fn connect<B>(&self) -> Result<SendRequest<B>, Reply>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
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

/// Whether a metadata entry named `name` may reach the upstream as a header: not the mesh's own
/// (`call::is_mesh_key`), nor one of HTTP's own. Names are compared with any character that is
/// not a letter or a digit read as `-`, as CGI-style servers read them (`content_length` is
/// `CONTENT_LENGTH`).
fn forwardable(name: &str) -> bool {
    if crate::call::is_mesh_key(name) {
        return false;
    }
    let name: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    !(name.starts_with("content-")
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
            "x_starling_caller",
            "X_Starling-Caller",
            "transfer_encoding",
            "content_length",
            "x.starling.caller",
        ] {
            assert!(!forwardable(name), "{name} passed");
        }
        for name in ["x-canary", "x-request-id", "traceparent-ish"] {
            assert!(forwardable(name), "{name} was dropped");
        }
    }
}
