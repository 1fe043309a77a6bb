//! The QUIC endpoint, client and server at once: one connection per peer, reused by every call,
//! re-dialled with back-off when it drops, kept alive by QUIC keep-alives.
//!
//! - [`hello`]: what each side says first on a new connection, and again when its services change.
//! - [`dial`]: the peers discovery reports (mDNS, the gateway's registry), dialled and forgotten.
//!
//! Once a connection's hello is checked, it is entered into the peer table and handed to the server
//! (which serves the calls it carries); no call is served before. Who a peer is comes from its verified certificate only.

mod dial;
mod hello;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::discovery::{Directory, Update};
use mesh_core::{Backoff, NodeName, SpiffeId};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::Limits;
use crate::control::telemetry::TelemetrySink;
use crate::hosted::Hosted;
use crate::identity::{CertificateClaims, Identity, TlsError};
use crate::peers::{PeerInfo, PeerSet};
use crate::policy::RevokedList;

pub(crate) use hello::Me;

/// The QUIC application error code a node closes a connection with on shutdown.
const CLOSE_SHUTDOWN: u32 = 0;
/// The code for a peer whose hello contradicts its certificate or is malformed.
const CLOSE_BAD_HELLO: u32 = 1;
/// The code for a connection to a peer that discovery says has left.
const CLOSE_GONE: u32 = 2;
/// Closing: the peer's certificate (or one above it in the chain it presented) expired.
const CLOSE_EXPIRED: u32 = 3;
/// Closing: the peer's identity or certificate is on the deny list of the policy in force.
pub(crate) const CLOSE_REVOKED: u32 = 4;
/// Closing: the peer's identity holds [`crate::peers::MAX_CONNECTIONS_PER_PEER`] connections with
/// this node already.
const CLOSE_TOO_MANY: u32 = 5;

/// How a connection ended, for the dialler's back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    /// Served (or refused for a reason a new dial may not meet again).
    Yes,
    /// Refused by either side: the peer holds too many connections with the other.
    TooMany,
}

impl Served {
    /// How `conn` ended, once it has.
    fn of(conn: &quinn::Connection) -> Served {
        conn.close_reason()
            .as_ref()
            .map_or(Served::Yes, Served::of_error)
    }

    /// How a connection that ended with `error` ended.
    fn of_error(error: &quinn::ConnectionError) -> Served {
        match error {
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == CLOSE_TOO_MANY.into() =>
            {
                Served::TooMany
            }
            _ => Served::Yes,
        }
    }
}

/// Why the QUIC endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// TLS configuration failed.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// quinn refused the TLS configuration.
    #[error("quic config: {0}")]
    Quic(String),
}

/// Why a dial failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    /// The peer's certificate was refused here (not chained to the mesh CA, wrong trust domain).
    #[error("peer not trusted: handshake refused ({0})")]
    Untrusted(String),
    /// The peer refused this node's certificate.
    #[error("peer not trusted: the peer refused our certificate ({0})")]
    RefusedUs(String),
    /// No handshake in time.
    #[error("no handshake within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// Anything else (unreachable, refused, closed).
    #[error("{0}")]
    Other(String),
}

impl ConnectError {
    fn of(e: &quinn::ConnectionError) -> Self {
        let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
        match e {
            quinn::ConnectionError::TransportError(t) if crypto(t.code) => {
                ConnectError::Untrusted(e.to_string())
            }
            quinn::ConnectionError::ConnectionClosed(c) if crypto(c.error_code) => {
                ConnectError::RefusedUs(e.to_string())
            }
            _ => ConnectError::Other(e.to_string()),
        }
    }
}

/// Serves the calls a connection carries, until it closes; the node plugs the server in. Run
/// by the connection's own task, not one more (a gateway keeps 10,000 connections).
pub(crate) type ServeConnection = Arc<
    dyn Fn(
            quinn::Connection,
            Arc<CertificateClaims>,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
        + Send
        + Sync,
>;

/// The transport: endpoint, connections, dialling. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Transport {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: quinn::Endpoint,
    /// The configuration new dials use; replaced when the identity changes.
    client_config: std::sync::RwLock<quinn::ClientConfig>,
    limits: Limits,
    me: Me,
    hosted: Arc<Hosted>,
    peers: Arc<PeerSet>,
    telemetry: Arc<TelemetrySink>,
    serve: ServeConnection,
    shutdown: watch::Receiver<bool>,
    revoked: watch::Receiver<RevokedList>,
    /// Serves enrolment connections (a gateway with an issuer).
    enrolment: Option<Arc<dyn EnrollService>>,
    /// Set when a peer closed a connection saying this node is revoked (why, from whom).
    revoked_here: Mutex<Option<String>>,
    directory: Mutex<Directory>,
    /// Discovered peers with a dial loop running.
    dialing: Mutex<HashSet<NodeName>>,
    /// Dials in their handshake (at most [`MAX_CONCURRENT_DIALS`]).
    dials: tokio::sync::Semaphore,
    /// Handshakes refused because of a certificate (either side's).
    refused: std::sync::atomic::AtomicU64,
    /// Why the last one was refused.
    last_refusal: Mutex<Option<String>>,
}

/// What the transport is built from.
pub(crate) struct Parts {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) client_config: quinn::ClientConfig,
    pub(crate) limits: Limits,
    pub(crate) me: Me,
    pub(crate) hosted: Arc<Hosted>,
    pub(crate) peers: Arc<PeerSet>,
    pub(crate) telemetry: Arc<TelemetrySink>,
    pub(crate) serve: ServeConnection,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) revoked: watch::Receiver<RevokedList>,
    pub(crate) enrolment: Option<Arc<dyn EnrollService>>,
}

/// Serves an enrolment connection: one without a client certificate, ALPN `starling-enroll/1`
/// (a gateway with an issuer plugs it in).
pub trait EnrollService: Send + Sync + 'static {
    /// Runs the connection until it ends.
    fn serve(
        &self,
        conn: quinn::Connection,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

impl Transport {
    /// Starts accepting connections, dialling `static_peers`, and re-sending the hello when the
    /// hosted services change.
    pub(crate) fn start(parts: Parts, static_peers: Vec<SocketAddr>) -> Transport {
        let transport = Transport {
            inner: Arc::new(Inner {
                directory: Mutex::new(Directory::new(parts.me.id.node_name().clone())),
                endpoint: parts.endpoint,
                client_config: std::sync::RwLock::new(parts.client_config),
                limits: parts.limits,
                me: parts.me,
                hosted: parts.hosted,
                peers: parts.peers,
                telemetry: parts.telemetry,
                serve: parts.serve,
                shutdown: parts.shutdown,
                revoked: parts.revoked,
                enrolment: parts.enrolment,
                revoked_here: Mutex::new(None),
                dialing: Mutex::new(HashSet::new()),
                dials: tokio::sync::Semaphore::new(MAX_CONCURRENT_DIALS),
                refused: std::sync::atomic::AtomicU64::new(0),
                last_refusal: Mutex::new(None),
            }),
        };
        tokio::spawn(transport.clone().accept_loop());
        for addr in static_peers {
            tokio::spawn(transport.clone().dial_loop(addr));
        }
        tokio::spawn(transport.clone().announce_loop());
        transport
    }

    /// The bound address.
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Incoming handshakes refused because of a certificate, and why the last one was.
    pub(crate) fn refused_handshakes(&self) -> (u64, Option<String>) {
        (
            self.inner
                .refused
                .load(std::sync::atomic::Ordering::Relaxed),
            self.inner
                .last_refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Counts a connection from `remote` refused for `why`, for the status's `refused_handshakes`
    /// and `last_refusal`.
    fn count_refusal(&self, remote: SocketAddr, why: &dyn std::fmt::Display) {
        self.inner
            .refused
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self
            .inner
            .last_refusal
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(format!("{remote}: {why}"));
    }

    /// Uses `identity` for every new handshake, both ways; connections already up keep theirs.
    pub(crate) fn set_identity(&self, identity: &Identity) -> Result<(), BindError> {
        let (server, client) =
            quic_configs_with(identity, &self.inner.limits, self.inner.enrolment.is_some())?;
        self.inner.endpoint.set_server_config(Some(server));
        *self
            .inner
            .client_config
            .write()
            .unwrap_or_else(|p| p.into_inner()) = client;
        Ok(())
    }

    /// After a renewal: dials every connected peer again, so that a connection with the new
    /// certificate is up (and chosen for new calls) well before the old one expires and its
    /// peer closes it.
    pub(crate) fn refresh_connections(&self) {
        let mut addrs: Vec<SocketAddr> = self
            .inner
            .peers
            .all_connections()
            .into_iter()
            .map(|(_, c)| c.remote_address())
            .collect();
        addrs.sort();
        addrs.dedup();
        for addr in addrs {
            let transport = self.clone();
            tokio::spawn(async move {
                match transport.connect(addr).await {
                    Ok(conn) => {
                        transport.run_connection(conn).await;
                    }
                    Err(e) => warn!("cannot reconnect to {addr} with the renewed certificate: {e}"),
                }
            });
        }
    }

    /// Closes every connection (peers see it at once) and waits, bounded, for them to go.
    pub(crate) async fn close(&self) {
        self.inner
            .endpoint
            .close(CLOSE_SHUTDOWN.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    /// Feeds discovery updates (from mDNS, or the gateway's registry) to the dialer until the node
    /// stops.
    pub(crate) fn follow(&self, mut updates: mpsc::UnboundedReceiver<Update>) {
        let transport = self.clone();
        tokio::spawn(async move {
            let mut stop = transport.inner.shutdown.clone();
            loop {
                let update = tokio::select! {
                    u = updates.recv() => u,
                    _ = stop.changed() => return,
                };
                let Some(update) = update else { return };
                transport.handle_discovery(update);
            }
        });
    }

    async fn accept_loop(self) {
        let mut stop = self.inner.shutdown.clone();
        loop {
            let incoming = tokio::select! {
                i = self.inner.endpoint.accept() => i,
                _ = stop.changed() => return,
            };
            let Some(incoming) = incoming else { return };
            let transport = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                // Boxed: the handshake's state would otherwise stay in the task for the
                // connection's life (10,000 of them on a gateway).
                match Box::pin(incoming.into_future()).await {
                    Ok(conn) => {
                        transport.run_connection(conn).await;
                    }
                    Err(e) => {
                        let why = ConnectError::of(&e);
                        warn!("refused connection from {remote}: {why}");
                        if matches!(why, ConnectError::Untrusted(_) | ConnectError::RefusedUs(_)) {
                            transport.count_refusal(remote, &why);
                            transport.inner.telemetry.audit(
                                "identity_refused",
                                vec![
                                    ("remote".into(), remote.to_string()),
                                    ("reason".into(), why.to_string()),
                                ],
                            );
                        }
                    }
                }
            });
        }
    }

    async fn dial_loop(self, addr: SocketAddr) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut stop = self.inner.shutdown.clone();
        loop {
            match self.connect(addr).await {
                Ok(conn) => {
                    self.inner.peers.set_dial_error(addr, None);
                    // A connection refused for the peer's number of them is no progress: the
                    // back-off goes on, or a peer holding its eight would keep this node
                    // dialling it without pause.
                    if self.run_connection(conn).await == Served::Yes {
                        backoff.reset();
                    }
                }
                Err(why) => {
                    warn!("cannot connect to peer {addr}: {why}");
                    self.inner
                        .peers
                        .set_dial_error(addr, Some(format!("{addr}: {why}")));
                }
            }
            let delay = backoff.next_delay(crate::rng::random());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Dials `addr` and completes the mutual TLS handshake, once fewer than
    /// [`MAX_CONCURRENT_DIALS`] other dials are in theirs (the wait is not part of the connect
    /// timeout).
    pub(crate) async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<quinn::Connection, ConnectError> {
        let place = self.dial_place().await;
        self.connect_in(addr, place).await
    }

    /// A place among the [`MAX_CONCURRENT_DIALS`] handshakes, when one is free (the semaphore is
    /// never closed; were it, the dial would go on without a place).
    pub(crate) async fn dial_place(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.inner.dials.acquire().await.ok()
    }

    /// [`Transport::connect`] in a place already taken. The place is given up when the
    /// handshake ends, or after [`DIAL_HOLD`] if it has not: a peer that does not answer costs
    /// nothing while it is waited for, and does not keep the others (the gateway among them)
    /// from being dialled.
    pub(crate) async fn connect_in(
        &self,
        addr: SocketAddr,
        place: Option<tokio::sync::SemaphorePermit<'_>>,
    ) -> Result<quinn::Connection, ConnectError> {
        let config = self
            .inner
            .client_config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let connecting = self
            .inner
            .endpoint
            .connect_with(config, addr, "starling.mesh")
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        let limit = self.inner.limits.connect_timeout;
        let handshake = tokio::time::timeout(limit, connecting);
        tokio::pin!(handshake);
        let done = tokio::select! {
            biased;
            done = &mut handshake => done,
            () = tokio::time::sleep(DIAL_HOLD) => {
                drop(place);
                handshake.await
            }
        };
        match done {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(ConnectError::of(&e)),
            Err(_) => Err(ConnectError::Timeout(limit)),
        }
    }

    /// Serves a connection until it closes: hellos both ways, then calls. Says whether it was
    /// refused, by either side, because the peer holds too many connections with the other.
    async fn run_connection(&self, conn: quinn::Connection) -> Served {
        let remote = conn.remote_address();
        let alpn = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
            .and_then(|d| d.protocol);
        if alpn.as_deref() == Some(mesh_proto::enroll::ENROLL_ALPN) {
            // Enrolment only, and only where it is served (the ALPN is offered nowhere else).
            match &self.inner.enrolment {
                Some(service) => service.serve(conn).await,
                None => conn.close(CLOSE_BAD_HELLO.into(), b"no enrolment here"),
            }
            return Served::Yes;
        }
        // Who the peer is, its labels, and until when: all from the certificate its handshake
        // verified.
        // Shared with the connection's server; one copy for the connection's life.
        let certified = match CertificateClaims::of_peer(&conn) {
            Ok(certified) => Arc::new(certified),
            Err(e) => {
                warn!("closing connection from {remote}: {e}");
                conn.close(CLOSE_BAD_HELLO.into(), b"no identity");
                return Served::Yes;
            }
        };
        let id = &certified.id;
        let mut revoked = self.inner.revoked.clone();
        if self.refuse_if_revoked(&conn, &certified, &revoked.borrow_and_update()) {
            return Served::Yes;
        }
        // Boxed: a connection's task lives as long as the connection, and its size is that of its
        // largest step, which the hellos were (1.3 KB, once).
        let info = match Box::pin(self.exchange_hellos(&conn, &certified)).await {
            Ok(info) => info,
            Err(why) => {
                warn!("closing connection to {id} at {remote}: {why}");
                // The peer may have closed first, refusing this connection as one too many.
                let served = match &why {
                    hello::HelloError::Lost(e) => Served::of_error(e),
                    _ => Served::Yes,
                };
                conn.close(CLOSE_BAD_HELLO.into(), why.to_string().as_bytes());
                return served;
            }
        };
        let protocol = info.protocol;
        let shown = info.clone();
        if !self.inner.peers.register(info, &conn) {
            let why = format!(
                "{id} holds {} connections with this node already",
                crate::peers::MAX_CONNECTIONS_PER_PEER
            );
            warn!("closing connection at {remote}: {why}");
            // Counted and shown with the node's other refusals (its status).
            self.count_refusal(remote, &why);
            conn.close(
                CLOSE_TOO_MANY.into(),
                b"too many connections from this identity",
            );
            return Served::TooMany;
        }
        log_up(&shown);
        // Calls are served only once the peer's hello is checked: a stream it opened earlier
        // waits (bounded by its stream credit) and is read now.
        let serving = (self.inner.serve)(conn.clone(), certified.clone());
        // Later hellos (the peer's services changed) update its entry while the connection lives.
        // A certificate is trusted until it expires, not for as long as a connection lasts.
        let until_expiry = certified
            .not_after
            .duration_since(crate::wallclock::time())
            .unwrap_or_default();
        // A revocation closes the connection as soon as the policy carrying it is in force.
        let revocation = async {
            while revoked.changed().await.is_ok() {
                let list = revoked.borrow_and_update().clone();
                if self.refuse_if_revoked(&conn, &certified, &list) {
                    return;
                }
            }
            std::future::pending::<()>().await;
        };
        let reason = tokio::select! {
            reason = conn.closed() => reason,
            // The peer can open no more streams: the connection is closing.
            () = serving => conn.closed().await,
            () = self.follow_hellos(&conn, &certified, protocol) => conn.closed().await,
            () = tokio::time::sleep(until_expiry) => {
                warn!("closing connection to {id}: its certificate expired");
                conn.close(CLOSE_EXPIRED.into(), b"certificate expired");
                conn.closed().await
            }
            () = revocation => conn.closed().await,
        };
        self.note_revoked_by_peer(id, &reason);
        if self.inner.peers.unregister(id, &conn) {
            info!("peer down: {} ({id}): {reason}", id.node_name());
        }
        Served::of(&conn)
    }

    /// Closes `conn` if the deny list names its peer's identity or certificate; says whether it
    /// did.
    fn refuse_if_revoked(
        &self,
        conn: &quinn::Connection,
        certified: &CertificateClaims,
        list: &RevokedList,
    ) -> bool {
        let id = certified.id.to_string();
        let Some(entry) = list.iter().find(|r| r.matches(&id, &certified.serial)) else {
            return false;
        };
        let why = entry.reason.as_deref().unwrap_or("no reason given");
        warn!(
            "closing connection to {id} at {}: revoked ({why}; serial {})",
            conn.remote_address(),
            certified.serial
        );
        self.inner.telemetry.audit(
            "revoked_peer_refused",
            vec![
                ("peer".into(), id),
                ("serial".into(), certified.serial.clone()),
                ("reason".into(), why.to_owned()),
            ],
        );
        conn.close(CLOSE_REVOKED.into(), b"revoked");
        true
    }

    /// A peer that closes saying this node is revoked is believed about one thing only: that it
    /// will not talk to this node. The node says so loudly; it does not stop on a peer's word.
    fn note_revoked_by_peer(&self, peer: &SpiffeId, reason: &quinn::ConnectionError) {
        if let quinn::ConnectionError::ApplicationClosed(close) = reason
            && close.error_code == CLOSE_REVOKED.into()
        {
            tracing::error!(
                "{peer} closed the connection: this node's certificate is revoked; it must be                  re-enrolled (mesh-node enroll) after the operator lifts the revocation"
            );
            *self
                .inner
                .revoked_here
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(format!("revoked, said {peer}"));
        }
    }

    /// Whether a peer said this node is revoked, and which.
    pub(crate) fn revoked_here(&self) -> Option<String> {
        self.inner
            .revoked_here
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn log_up(info: &PeerInfo) {
    let names: Vec<&str> = info.services.iter().map(|s| s.as_str()).collect();
    info!(
        "peer up: {} ({}) at {} hosting [{}]",
        info.id.node_name(),
        info.id,
        info.addr,
        names.join(", ")
    );
}

/// A QUIC endpoint that serves and dials with `identity`, under `limits` (its default client
/// configuration is set, for callers outside a node such as the benchmark).
pub fn bind_endpoint(
    identity: &Identity,
    limits: &Limits,
    listen: SocketAddr,
) -> Result<quinn::Endpoint, BindError> {
    let (server, client) = quic_configs(identity, limits)?;
    let bind_error = |source| BindError::Bind {
        addr: listen,
        source,
    };
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        udp_socket(listen).map_err(bind_error)?,
        runtime,
    )
    .map_err(bind_error)?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The kernel buffers a QUIC socket asks for, each way. The kernel caps them at
/// `net.core.rmem_max` / `wmem_max` (4 MiB on a stock Debian; raise them on a gateway that serves
/// thousands of nodes). With the default 208 KiB, a burst of handshakes or keep-alives from a few
/// thousand nodes overflowed a gateway's buffer: datagrams were lost and handshakes timed out.
/// Memory is only used while datagrams wait.
pub const UDP_BUFFER_BYTES: usize = 4 << 20;

/// A UDP socket bound to `addr` with [`UDP_BUFFER_BYTES`] of kernel buffer each way (as much as
/// the kernel grants).
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    // Smaller buffers still work: a refusal is not an error.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The QUIC server and client configurations for `identity` under `limits`.
pub(crate) fn quic_configs(
    identity: &Identity,
    limits: &Limits,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), BindError> {
    quic_configs_with(identity, limits, false)
}

/// How soon a peer is asked to acknowledge what it receives (QUIC's default is 25 ms).
pub const ACK_DELAY: Duration = Duration::from_millis(5);

/// Bytes a peer may send on one connection that this node has not read yet, over all its
/// streams.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 8 * 1024 * 1024;

/// Handshakes a node has in flight at once as the one that dials. A node that starts with many
/// peers, or gets back a network it lost, would otherwise start every handshake at once: a burst
/// of CPU on a small device, and a peak of short-lived memory whose fragments the heap keeps
/// afterwards (with 100 peers, RssAnon 4.0 MiB instead of 4.3-4.4 MiB). A handshake holds its
/// place for at most [`DIAL_HOLD`].
pub const MAX_CONCURRENT_DIALS: usize = 8;

/// How long a handshake keeps its place among the [`MAX_CONCURRENT_DIALS`]: one with a peer that
/// answers takes a few milliseconds on a site's network; one with a peer that is away gives its
/// place up after this, and goes on waiting (up to the connect timeout) without it.
pub const DIAL_HOLD: Duration = Duration::from_secs(1);

/// Hellos a peer may have in flight at once (each on a stream of its own).
const UNI_STREAMS: u32 = 2;

/// The QUIC transport settings of every connection under `limits`.
fn transport_config(limits: &Limits) -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    // Peers acknowledge within 5 ms instead of QUIC's 25 (the ACK frequency extension; a peer
    // without it keeps its own delay). A lost packet is resent after about srtt + 4 rttvar + the
    // peer's ack delay, so on a link losing 10% of packets a call's p99 went from 81 to 22 ms
    // (`mesh-bench`'s loss figure). An idle link sends no more: a keep-alive is acknowledged
    // once either way, only sooner.
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.max_ack_delay(Some(ACK_DELAY));
    transport.ack_frequency_config(Some(ack));
    transport
        // quinn bounds each stream's unread data (1.25 MB) but not a connection's: a peer with
        // 256 streams into a slow upstream (TCP tunnels) could make this node hold 320 MB. Bounded
        // per connection instead; one stream still gets its whole window.
        .receive_window(CONNECTION_RECEIVE_WINDOW.into())
        .keep_alive_interval(Some(limits.keep_alive))
        .max_idle_timeout(limits.idle_timeout.try_into().ok())
        // A connection starts with a few streams and grows to max_concurrent_calls as its peer
        // uses them (`Server::serve_connection`): quinn sets room aside for every stream a peer
        // may open.
        .max_concurrent_bidi_streams(crate::server::initial_streams(limits).into())
        // Unidirectional streams carry hellos only, read one after another.
        .max_concurrent_uni_streams(UNI_STREAMS.into())
        .enable_segmentation_offload(limits.segmentation_offload);
    transport
}

/// [`quic_configs`]; with `enrolment`, the server also takes enrolment connections.
pub(crate) fn quic_configs_with(
    identity: &Identity,
    limits: &Limits,
    enrolment: bool,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), BindError> {
    let transport = Arc::new(transport_config(limits));

    let server_tls = QuicServerConfig::try_from(identity.server_config_with(enrolment)?)
        .map_err(|e| BindError::Quic(format!("server: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
    server.transport_config(transport.clone());

    let client_tls = QuicClientConfig::try_from(identity.client_config()?)
        .map_err(|e| BindError::Quic(format!("client: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
    client.transport_config(transport);
    Ok((server, client))
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    #[test]
    fn peers_are_asked_to_acknowledge_within_the_ack_delay() {
        // quinn keeps its settings private; its Debug form shows what a connection will ask for.
        let shown = format!("{:?}", transport_config(&Limits::default()));
        assert!(
            shown.contains("ack_frequency_config: Some(AckFrequencyConfig")
                && shown.contains(&format!("max_ack_delay: Some({ACK_DELAY:?})")),
            "{shown}"
        );
    }
}
