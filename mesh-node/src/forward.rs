//! TCP forwards: a local port whose connections are carried to a `tcp://` service on another node,
//! one QUIC stream (a tunnel, method `connect`) per connection. See `upstream::tcp` for what
//! crosses the stream.
//!
//! Each connection accepted opens a tunnel before a byte of it is read: a caller the service's
//! policy refuses (authorization, a rate limit of connections per second), or a service with no
//! endpoint that can open it, gets its connection closed at once, the refusal logged and counted
//! (`starling_tcp_connections_total{event="refused"}`; the callee's audit log has the denial
//! and its rule). Connections, bytes each way and durations are counted per forward in the
//! node's telemetry, and shown by the gateway's `/metrics` as `starling_tcp_*`.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::telemetry::TcpEvent;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::clock::{now, since};
use crate::config::ForwardConfig;
use crate::node::Node;
use crate::upstream::tcp::{self, End};

/// Binds `forward.listen` and serves its connections in the background until the node shuts
/// down; returns the bound address.
pub async fn serve(node: Node, forward: ForwardConfig) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(forward.listen).await?;
    let bound = listener.local_addr()?;
    if forward.allow_remote && !bound.ip().is_loopback() {
        warn!(
            "the forward on {bound} to {} accepts connections from other hosts: the hop to it is \
             plain TCP, outside the mesh's mTLS",
            forward.service
        );
    }
    info!("forwarding tcp://{bound} to service {}", forward.service);
    node.record_address(&format!("forward.{}", forward.service), bound);
    let mut stop = node.shutdown_signal();
    let forward = Arc::new(Forwarding {
        listen: forward.listen.to_string(),
        slots: Arc::new(Semaphore::new(forward.max_connections)),
        config: forward,
        node,
    });
    tokio::spawn(async move {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let forward = forward.clone();
                        tokio::spawn(async move { forward.carry(stream, peer).await });
                    }
                    // Out of file descriptors, say: wait a little rather than spin.
                    Err(e) => {
                        warn!("forward on {bound}: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    });
    Ok(bound)
}

struct Forwarding {
    config: ForwardConfig,
    /// The listen address as configured: what its counters are kept under.
    listen: String,
    slots: Arc<Semaphore>,
    node: Node,
}

impl Forwarding {
    fn record(&self, event: TcpEvent) {
        self.node
            .telemetry()
            .lock()
            .record_tcp(&self.listen, self.config.service.as_str(), event);
    }

    /// Carries one accepted connection to the service, or closes it saying why in the log.
    async fn carry(&self, stream: TcpStream, peer: SocketAddr) {
        let service = self.config.service.as_str();
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            warn!(
                "forward {} to {service}: refused a connection from {peer}: {} connections are \
                 open (max_connections)",
                self.listen, self.config.max_connections
            );
            self.record(TcpEvent::Refused);
            return;
        };
        let _ = stream.set_nodelay(true);
        let tunnel = match self.node.client().open_tunnel(service).await {
            Ok(t) => t,
            Err(reply) => {
                warn!(
                    "forward {} to {service}: closed the connection from {peer}: {}: {}",
                    self.listen,
                    reply.status.as_str(),
                    reply.message
                );
                self.record(TcpEvent::Refused);
                return;
            }
        };
        self.record(TcpEvent::Opened);
        let started = now();
        let ended = tcp::pump(
            stream,
            tunnel.send,
            tunnel.recv,
            tunnel.leftover,
            self.config.idle_timeout,
            End::Forward,
            |to_service, from_service| {
                self.record(TcpEvent::Bytes {
                    to_service,
                    from_service,
                })
            },
        )
        .await;
        self.record(TcpEvent::Closed(since(started)));
        debug!(
            "forward {} to {service}: the connection from {peer} ended: {ended:?}",
            self.listen
        );
    }
}
