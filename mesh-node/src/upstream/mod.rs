//! Upstreams: where a node sends the calls for a service it hosts.
//!
//! - `builtin:echo` answers with the request body; `builtin:health` answers
//!   `{"status":"ok","node":"<node name>"}`.
//! - `http://host:port[/prefix]` gets `POST <prefix>/<method>` with the body, the caller's SPIFFE
//!   ID in `x-starling-caller` and the call's metadata as headers. A 2xx answer is `Ok`; any other
//!   is `Upstream(code)` with the upstream's body.
//!
//! - `serial:///dev/ttyUSB0?baud=115200`: a microcontroller running `firmware-shim` on a serial
//!   line ([`serial`]); the service is hosted while the microcontroller announces it.
//! - `tcp://host:port`: a service that speaks its own protocol over TCP, reached through TCP
//!   forwards on the calling nodes, one tunnel per connection (`tcp`).

mod builtin;
mod http;
pub mod serial;
pub(crate) mod tcp;

use bytes::Bytes;
use mesh_proto::{ResponseHead, Status};

use crate::call::{CallContext, Reply, StreamTime};
use crate::wire::{FrameReader, MAX_CHUNK_BYTES, write_chunk, write_head};

pub(crate) use builtin::Builtin;
use http::HttpUpstream;

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
    /// `serial:///dev/ttyUSB0?baud=115200`.
    Serial {
        /// The device.
        path: std::path::PathBuf,
        /// Its rate.
        baud: u32,
        /// The file of the key shared with the microcontroller, if frames are authenticated.
        key: Option<std::path::PathBuf>,
    },
    /// `tcp://host:port`.
    Tcp {
        /// `host:port`.
        authority: String,
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
        if s.starts_with("serial://") {
            let (path, baud, key) = serial::parse(s)?;
            return Ok(UpstreamSpec::Serial { path, baud, key });
        }
        if s.starts_with("tcp://") {
            return tcp::parse(s).map(|authority| UpstreamSpec::Tcp { authority });
        }
        Err(format!(
            "{s:?} is not an upstream; use http://host:port, tcp://host:port, \
             serial:///dev/<tty>, builtin:echo or builtin:health"
        ))
    }
}

/// A live upstream.
pub struct Upstream {
    spec: UpstreamSpec,
    kind: Kind,
}

enum Kind {
    Builtin(Builtin),
    Http(HttpUpstream),
    Serial(std::sync::Arc<serial::SerialLink>),
    /// A serial upstream made without its link (a node hosts those through their link only).
    Unlinked,
    /// A TCP service: reached through tunnels, never by calls.
    Tcp(String),
}

impl Upstream {
    /// An upstream for `spec` on node `node`; HTTP connections are opened on first use.
    pub fn new(spec: UpstreamSpec, node: &str) -> Self {
        let kind = match &spec {
            UpstreamSpec::Echo => Kind::Builtin(Builtin::Echo),
            UpstreamSpec::Health => Kind::Builtin(Builtin::health(node)),
            UpstreamSpec::Http { authority, prefix } => {
                Kind::Http(HttpUpstream::new(authority.clone(), prefix.clone()))
            }
            UpstreamSpec::Serial { .. } => Kind::Unlinked,
            UpstreamSpec::Tcp { authority } => Kind::Tcp(authority.clone()),
        };
        Upstream { spec, kind }
    }

    /// A service of the microcontroller on `link`.
    pub(crate) fn serial(link: std::sync::Arc<serial::SerialLink>, spec: UpstreamSpec) -> Self {
        Upstream {
            spec,
            kind: Kind::Serial(link),
        }
    }

    /// What this upstream is.
    pub fn spec(&self) -> &UpstreamSpec {
        &self.spec
    }

    /// The answer of an upstream that answers at once, without I/O (the builtins): no deadline
    /// timer and no future are needed. The others give the body back.
    pub(crate) fn serve_now(&self, body: Bytes) -> Result<Reply, Bytes> {
        match &self.kind {
            Kind::Builtin(b) => Ok(b.serve(body)),
            _ => Err(body),
        }
    }

    /// Whether it may send a call again when a frame or its answer is lost (a serial line): it
    /// needs [`CallContext::idempotent`].
    pub(crate) fn resends(&self) -> bool {
        matches!(self.kind, Kind::Serial(_))
    }

    /// Whether it can take a streamed body chunk by chunk (else the body is gathered first).
    pub(crate) fn streams(&self) -> bool {
        matches!(self.kind, Kind::Builtin(Builtin::Echo) | Kind::Http(_))
    }

    /// Serves a streamed call chunk by chunk (an upstream that [`streams`](Self::streams)); `Err`
    /// is the reply to write when nothing was written yet.
    pub(crate) async fn serve_streamed(
        &self,
        ctx: &CallContext,
        time: StreamTime,
        send: &mut quinn::SendStream,
        reader: &mut FrameReader,
        max: Option<u64>,
    ) -> Result<(), Reply> {
        match &self.kind {
            Kind::Http(h) => h.serve_streamed(ctx, time, send, reader, max).await,
            // The echo answers each chunk as it comes.
            _ => {
                let write = |e: quinn::WriteError| {
                    Reply::error(Status::Unavailable, format!("the caller left: {e}"))
                };
                write_head(send, &ResponseHead::new(Status::Ok, ""))
                    .await
                    .map_err(write)?;
                let mut total = 0u64;
                loop {
                    let chunk = match time.step(reader.next_frame(MAX_CHUNK_BYTES)).await {
                        Ok(Ok(Some(chunk))) => chunk,
                        Ok(Ok(None)) => break,
                        Ok(Err(e)) => {
                            tracing::debug!("streamed call to {} ended: {e}", ctx.service);
                            let _ = send.reset(0u32.into());
                            return Ok(());
                        }
                        Err(e) => {
                            tracing::debug!(
                                "streamed call to {} ended: {}",
                                ctx.service,
                                e.message
                            );
                            let _ = send.reset(0u32.into());
                            return Ok(());
                        }
                    };
                    total += chunk.len() as u64;
                    if max.is_some_and(|max| total > max) {
                        let _ = send.reset(0u32.into());
                        return Ok(());
                    }
                    match time.step(write_chunk(send, chunk)).await {
                        Ok(Ok(())) => {}
                        // The caller left.
                        Ok(Err(_)) => return Ok(()),
                        // The caller stopped reading.
                        Err(_) => {
                            let _ = send.reset(0u32.into());
                            return Ok(());
                        }
                    }
                }
                let _ = send.finish();
                Ok(())
            }
        }
    }

    /// The `host:port` of a TCP service.
    pub(crate) fn tcp_authority(&self) -> Option<&str> {
        match &self.kind {
            Kind::Tcp(authority) => Some(authority),
            _ => None,
        }
    }

    /// Serves one call. The caller applies the deadline.
    pub async fn serve(&self, ctx: &CallContext, body: Bytes, max_body: usize) -> Reply {
        match &self.kind {
            Kind::Builtin(b) => b.serve(body),
            Kind::Http(h) => h.serve(ctx, body, max_body).await,
            Kind::Serial(link) => link.call(ctx, body).await,
            Kind::Unlinked => Reply::error(
                mesh_proto::Status::Unavailable,
                "a serial upstream is hosted through its line's link",
            ),
            Kind::Tcp(authority) => Reply::error(
                mesh_proto::Status::InvalidArgument,
                format!(
                    "{} is a TCP service (tcp://{authority}): reach it through a TCP forward \
                     ([[forwards]] in the node's config, or `mesh-node forward`), not by calls",
                    ctx.service
                ),
            ),
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
        assert_eq!(
            "tcp://127.0.0.1:502".parse(),
            Ok(UpstreamSpec::Tcp {
                authority: "127.0.0.1:502".into()
            })
        );
    }
}
