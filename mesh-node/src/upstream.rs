//! Upstreams: where a node sends the calls for a service it hosts.
//!
//! - `builtin:echo` answers with the request body; `builtin:health` answers
//!   `{"status":"ok","node":"<node name>"}`.
//! - `http://host:port[/prefix]` gets `POST <prefix>/<method>` with the body, the caller's SPIFFE
//!   ID in `x-starling-caller` and the call's metadata as headers. A 2xx answer is `Ok`; any other
//!   is `Upstream(code)` with the upstream's body.
//!
//! `tcp://` and `serial://` upstreams are named in the design and refused by this build with a
//! clear error until they land.

use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mesh_proto::Status;

use crate::call::{CallContext, Reply};

/// A parsed upstream URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamSpec {
    /// `builtin:echo`.
    Echo,
    /// `builtin:health`.
    Health,
    /// `http://authority[/prefix]`.
    Http {
        /// `host:port`.
        authority: String,
        /// Path prefix without a trailing slash, possibly empty.
        prefix: String,
    },
}

impl std::str::FromStr for UpstreamSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "builtin:echo" => return Ok(UpstreamSpec::Echo),
            "builtin:health" => return Ok(UpstreamSpec::Health),
            _ => {}
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, prefix) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
            let port_ok = authority
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok {
                return Err(format!(
                    "{s:?}: an http upstream needs a host and a port, like http://127.0.0.1:8081"
                ));
            }
            let prefix = prefix.trim_end_matches('/');
            return Ok(UpstreamSpec::Http {
                authority: authority.to_owned(),
                prefix: if prefix.is_empty() {
                    String::new()
                } else {
                    format!("/{prefix}")
                },
            });
        }
        if s.starts_with("tcp://") || s.starts_with("serial://") {
            return Err(format!(
                "{s:?}: tcp:// and serial:// upstreams are not supported by this build yet"
            ));
        }
        Err(format!(
            "{s:?} is not an upstream; use http://host:port, builtin:echo or builtin:health"
        ))
    }
}

/// A live upstream, with its pool of idle HTTP connections.
pub struct Upstream {
    spec: UpstreamSpec,
    health: Bytes,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

/// Idle HTTP connections kept per upstream.
const MAX_IDLE: usize = 64;

impl Upstream {
    /// An upstream for `spec` on node `node`; HTTP connections are opened on first use.
    pub fn new(spec: UpstreamSpec, node: &str) -> Self {
        Upstream {
            spec,
            health: Bytes::from(format!(
                "{{\"status\":\"ok\",\"node\":{}}}",
                crate::ingress::json_str(node)
            )),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// What this upstream is.
    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    /// Whether it answers at once, without I/O (the builtins).
    pub fn is_instant(&self) -> bool {
        matches!(self.spec, UpstreamSpec::Echo | UpstreamSpec::Health)
    }

    /// Serves one call. The caller applies the deadline.
    pub async fn serve(&self, ctx: &CallContext, body: Bytes, max_body: usize) -> Reply {
        match &self.spec {
            UpstreamSpec::Echo => Reply::ok(body),
            UpstreamSpec::Health => Reply::ok(self.health.clone()),
            UpstreamSpec::Http { authority, prefix } => {
                match self.http(authority, prefix, ctx, body, max_body).await {
                    Ok(reply) => reply,
                    Err(reply) => reply,
                }
            }
        }
    }

    async fn http(
        &self,
        authority: &str,
        prefix: &str,
        ctx: &CallContext,
        body: Bytes,
        max_body: usize,
    ) -> Result<Reply, Reply> {
        let mut sender = self.sender(authority).await?;
        let mut req = hyper::Request::post(format!("{prefix}/{}", ctx.method))
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/octet-stream")
            .header("x-starling-caller", ctx.caller.to_string())
            .header("x-starling-service", ctx.service.as_str());
        for (k, v) in &ctx.metadata {
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
            })
        }
    }

    async fn sender(&self, authority: &str) -> Result<SendRequest<Full<Bytes>>, Reply> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstreams() {
        assert_eq!("builtin:echo".parse(), Ok(UpstreamSpec::Echo));
        assert_eq!(
            "http://127.0.0.1:8081".parse(),
            Ok(UpstreamSpec::Http {
                authority: "127.0.0.1:8081".into(),
                prefix: String::new()
            })
        );
        assert_eq!(
            "http://localhost:80/api/".parse(),
            Ok(UpstreamSpec::Http {
                authority: "localhost:80".into(),
                prefix: "/api".into()
            })
        );
        assert!("http://nohost".parse::<UpstreamSpec>().is_err());
        let e = "tcp://127.0.0.1:502"
            .parse::<UpstreamSpec>()
            .expect_err("later");
        assert!(e.contains("not supported"), "{e}");
    }
}
