//! The node: a QUIC endpoint that is client and server at once, its peers, and the call path.
//!
//! Connections: one per peer, reused by every call, re-dialled with back-off when it drops, kept
//! alive by QUIC keep-alives. Each side opens a unidirectional stream and sends a [`Hello`] (its
//! name, role, labels and services); the name must match the SPIFFE ID its certificate proved.
//! Each call is one bidirectional stream (see `mesh-proto`).
//!
//! Bad bytes on a call stream end that stream with `InvalidArgument`; they never end the
//! connection, other calls, or the process.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::Telemetry;
use mesh_core::discovery::{Action, Directory, Update};
use mesh_core::{Backoff, MethodName, NodeName, ServiceName, ServiceTable, SpiffeId};
use mesh_proto::control::{CONTROL_SERVICE, Span};
use mesh_proto::limits::{MAX_HEAD_BYTES, MAX_HELLO_BYTES};
use mesh_proto::{Hello, RequestHead, ResponseHead, Role, Status, TraceContext, decode_head};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::call::{CallContext, CallError, Reply};
use crate::config::{Limits, NodeConfig};
use crate::discovery::{Announcement, Discovery, MdnsDiscovery};
use crate::identity::{Identity, TlsError, peer_id};
use crate::policy::{Policy, PolicyStore};
use crate::upstream::Upstream;
use crate::wire::{FrameReader, ReadError, write_message, write_reply};

/// The QUIC application error code a node closes a connection with on shutdown.
const CLOSE_SHUTDOWN: u32 = 0;
/// The code for a peer whose hello contradicts its certificate or is malformed.
const CLOSE_BAD_HELLO: u32 = 1;
/// The code for a connection to a peer that discovery says has left.
const CLOSE_GONE: u32 = 2;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS configuration failed.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The QUIC or ingress socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node's config cannot be expressed as a hello.
    #[error("{0}")]
    Config(String),
}

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// How long the caller waits; the node's `call_timeout` when `None`.
    pub timeout: Option<Duration>,
    /// Request metadata (`x-canary = 1`).
    pub metadata: Vec<(String, String)>,
    /// The trace this call continues (from a `traceparent` header); a new one when `None`.
    pub trace: Option<TraceContext>,
}

/// What a node knows of a connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Verified identity.
    pub id: SpiffeId,
    /// Role from its hello.
    pub role: Role,
    /// Labels from its hello.
    pub labels: BTreeMap<String, String>,
    /// Services from its hello.
    pub services: Vec<ServiceName>,
    /// Where it is.
    pub addr: SocketAddr,
}

/// A running node. Cheap to clone; all clones are the same node.
#[derive(Clone)]
pub struct Node {
    pub(crate) inner: Arc<Inner>,
}

/// Serves control streams (`_control` calls); the gateway plugs one in.
pub trait ControlHandler: Send + Sync + 'static {
    /// Runs one control stream from `caller` until it ends. The request head was read already.
    fn serve(
        &self,
        caller: SpiffeId,
        remote: SocketAddr,
        send: quinn::SendStream,
        reader: FrameReader,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
}

/// How a node is started beyond its config.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// The discovery source; `None` uses mDNS if the config enables it.
    pub discovery: Option<Arc<dyn Discovery>>,
    /// Announce as a gateway rather than a node.
    pub gateway: bool,
    /// Serves control streams (gateways only).
    pub control: Option<Arc<dyn ControlHandler>>,
}

pub(crate) struct Inner {
    pub(crate) id: SpiffeId,
    /// `id` as text, made once.
    pub(crate) id_text: String,
    pub(crate) name: NodeName,
    limits: Limits,
    endpoint: quinn::Endpoint,
    pub(crate) local: HashMap<ServiceName, Upstream>,
    pub(crate) labels: BTreeMap<String, String>,
    hello: Vec<u8>,
    pub(crate) peers: Mutex<Peers>,
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) shutdown: watch::Sender<bool>,
    ingress: Mutex<Option<SocketAddr>>,
    discovery: Option<Arc<dyn Discovery>>,
    directory: Mutex<Directory>,
    control: Option<Arc<dyn ControlHandler>>,
    pub(crate) telemetry: Mutex<Telemetry>,
    pub(crate) telemetry_interval: Duration,
    trace_sample: f64,
    /// A new telemetry batch was cut.
    pub(crate) batches: tokio::sync::Notify,
    pub(crate) policy: Mutex<Option<(u64, Arc<Policy>)>>,
    pub(crate) store: PolicyStore,
    pub(crate) traffic: Mutex<crate::traffic::Traffic>,
    /// Which peer may act as this node's gateway.
    pub(crate) gateway_pin: GatewayPin,
}

/// Which peer a node accepts as its gateway: it must say `gateway` in its hello, and, when
/// configured, be the peer at the `gateway` address and carry the certified name `gateway_name`.
/// Without either, any mesh member claiming the role would do (the node warns at start).
#[derive(Debug, Clone, Default)]
pub(crate) struct GatewayPin {
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) name: Option<NodeName>,
}

#[derive(Default)]
pub(crate) struct Peers {
    pub(crate) by_id: HashMap<SpiffeId, PeerEntry>,
    pub(crate) table: ServiceTable<SpiffeId>,
    /// The last failure of each static peer that is not connected.
    dial_errors: BTreeMap<SocketAddr, String>,
    /// Discovered peers with a dial loop running.
    pub(crate) dialing: std::collections::HashSet<NodeName>,
    /// Every service some peer ever hosted: one with no endpoint now is Unavailable, not NotFound.
    known: std::collections::HashSet<ServiceName>,
}

pub(crate) struct PeerEntry {
    /// A cheap stable key for the balancer (a hash of the identity).
    pub(crate) key: u64,
    pub(crate) info: PeerInfo,
    /// Live connections to this peer, oldest first; calls use the first.
    pub(crate) conns: Vec<quinn::Connection>,
}

impl Node {
    /// Binds the QUIC endpoint (and the ingress, if configured), starts dialling the configured
    /// peers, and serves until [`Node::shutdown`].
    pub async fn start(config: NodeConfig, identity: Identity) -> Result<Node, StartError> {
        Self::start_with(config, identity, NodeOptions::default()).await
    }

    /// Like [`Node::start`], with options: a discovery source (e.g. an in-memory one in tests),
    /// the gateway role and its control handler.
    pub async fn start_with(
        config: NodeConfig,
        identity: Identity,
        options: NodeOptions,
    ) -> Result<Node, StartError> {
        let discovery: Option<Arc<dyn Discovery>> = match options.discovery {
            Some(d) => Some(d),
            None if config.mdns => Some(Arc::new(MdnsDiscovery::new())),
            None => None,
        };
        let role = if options.gateway {
            Role::Gateway
        } else {
            Role::Node
        };
        let endpoint = bind_endpoint(&identity, &config.limits, config.listen)?;
        let local = config
            .services
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    Upstream::new(s.upstream.clone(), config.name.as_str()),
                )
            })
            .collect::<HashMap<_, _>>();
        let hello = encode_hello(&config, role)?;
        let inner = Arc::new(Inner {
            id_text: identity.id.to_string(),
            id: identity.id.clone(),
            name: config.name.clone(),
            limits: config.limits.clone(),
            endpoint,
            local,
            hello,
            peers: Mutex::new(Peers::default()),
            changed: watch::Sender::new(0),
            shutdown: watch::Sender::new(false),
            ingress: Mutex::new(None),
            discovery,
            directory: Mutex::new(Directory::new(config.name.clone())),
            labels: config.labels.clone(),
            control: options.control,
            telemetry: Mutex::new(Telemetry::new(config.telemetry.backlog)),
            telemetry_interval: config.telemetry.interval,
            trace_sample: config.telemetry.trace_sample,
            batches: tokio::sync::Notify::new(),
            policy: Mutex::new(None),
            store: PolicyStore::new(&config.state_dir),
            traffic: Mutex::new(crate::traffic::Traffic::default()),
            gateway_pin: GatewayPin {
                addr: config.gateway,
                name: config.gateway_name.clone(),
            },
        });
        if !options.gateway && config.gateway.is_none() && config.gateway_name.is_none() {
            warn!(
                "no gateway or gateway_name configured: any mesh member that claims the gateway role \
                 may send this node policy; pin the gateway in production"
            );
        }
        let node = Node { inner };
        node.apply_saved_policy();
        info!(
            "quic listening on {} as {}",
            node.local_addr(),
            node.inner.id
        );
        tokio::spawn(node.clone().accept_loop());
        let mut static_peers = config.peers.clone();
        if let Some(gw) = config.gateway
            && !static_peers.contains(&gw)
        {
            static_peers.push(gw);
        }
        for addr in static_peers {
            tokio::spawn(node.clone().dial_loop(addr));
        }
        tokio::spawn(node.clone().telemetry_ticker());
        if !options.gateway {
            tokio::spawn(node.clone().control_loop());
        }
        if let Some(discovery) = &node.inner.discovery {
            let updates = discovery.start(Announcement {
                id: node.inner.id.clone(),
                port: node.local_addr().port(),
                role,
                labels: config.labels.clone(),
                services: config.services.iter().map(|s| s.name.clone()).collect(),
            });
            tokio::spawn(node.clone().discovery_loop(updates));
        }
        if let Some(addr) = config.ingress {
            let bound = crate::ingress::serve(node.clone(), addr).await?;
            *lock(&node.inner.ingress) = Some(bound);
            info!("ingress listening on http://{bound}");
        }
        Ok(node)
    }

    /// This node's identity.
    pub fn id(&self) -> &SpiffeId {
        &self.inner.id
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner
            .endpoint
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound ingress address, if the ingress runs.
    pub fn ingress_addr(&self) -> Option<SocketAddr> {
        *lock(&self.inner.ingress)
    }

    /// The largest body a call may carry.
    pub fn max_body_bytes(&self) -> usize {
        self.inner.limits.max_body_bytes
    }

    /// Changes to `true` when the node shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.subscribe()
    }

    /// The last failure of each configured peer that is not connected now.
    pub fn dial_errors(&self) -> Vec<String> {
        lock(&self.inner.peers)
            .dial_errors
            .values()
            .cloned()
            .collect()
    }

    /// The peers connected now.
    pub fn peers(&self) -> Vec<PeerInfo> {
        let peers = lock(&self.inner.peers);
        let mut out: Vec<PeerInfo> = peers.by_id.values().map(|p| p.info.clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// Waits until some peer hosting `service` is connected, or `timeout` passes; true if it is.
    pub async fn wait_for_service(&self, service: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |node| {
            !lock(&node.inner.peers).table.endpoints(service).is_empty()
        })
        .await
    }

    /// Waits until `ready(self)` holds, re-checking whenever the peer table changes, or until
    /// `timeout` passes; returns whether it holds.
    pub async fn wait_until(&self, timeout: Duration, ready: impl Fn(&Node) -> bool) -> bool {
        let mut rx = self.inner.changed.subscribe();
        let wait = async {
            loop {
                if ready(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        ready(self)
    }

    /// Calls `service.method` with `body`, with the default timeout and no metadata.
    pub async fn call(&self, service: &str, method: &str, body: Bytes) -> Result<Bytes, CallError> {
        self.call_with(service, method, body, &CallOptions::default())
            .await
            .into_result()
    }

    /// Calls `service.method` with `body` and `options`, returning the whole reply.
    pub async fn call_with(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        options: &CallOptions,
    ) -> Reply {
        let started = Instant::now();
        let started_wall = unix_us();
        let trace = match options.trace {
            Some(parent) => TraceContext {
                trace_id: parent.trace_id,
                span_id: random().to_le_bytes(),
                flags: parent.flags,
            },
            None => TraceContext {
                trace_id: random_trace_id(),
                span_id: random().to_le_bytes(),
                flags: u8::from((random() % 1_000_000) as f64 / 1e6 < self.inner.trace_sample),
            },
        };
        let (reply, callee) = self.call_inner(service, method, body, options, trace).await;
        let latency = started.elapsed();
        let mut telemetry = lock(&self.inner.telemetry);
        telemetry.record_call(
            service,
            method,
            self.inner.name.as_str(),
            &callee,
            reply.status,
            latency,
        );
        if trace.flags & 1 == 1 {
            telemetry.record_span(Span {
                trace_id: trace.trace_id,
                span_id: trace.span_id,
                parent_span_id: options.trace.map(|p| p.span_id),
                client: true,
                node: self.inner.name.as_str().to_owned(),
                service: service.to_owned(),
                method: method.to_owned(),
                start_unix_us: started_wall,
                duration_us: latency.as_micros() as u64,
                status: reply.status,
            });
        }
        reply
    }

    /// The call itself; returns the reply and the name of the node that served it ("" if none).
    async fn call_inner(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        options: &CallOptions,
        trace: TraceContext,
    ) -> (Reply, String) {
        let policy = self.current_policy();
        let policy_timeout = policy.as_ref().and_then(|p| p.timeout_for(service));
        let timeout = options
            .timeout
            .or(policy_timeout)
            .unwrap_or(self.inner.limits.call_timeout);
        let deadline = Instant::now() + timeout;
        let me = self.inner.name.as_str().to_owned();
        if let Err(e) = mesh_proto::validate_name(service).and(mesh_proto::validate_name(method)) {
            let reply = Reply::error(
                Status::InvalidArgument,
                format!("bad service or method name: {e}"),
            );
            return (reply, String::new());
        }
        if body.len() > self.inner.limits.max_body_bytes {
            let reply = Reply::error(
                Status::InvalidArgument,
                format!(
                    "request body of {} bytes exceeds the bound of {} bytes",
                    body.len(),
                    self.inner.limits.max_body_bytes
                ),
            );
            return (reply, String::new());
        }
        if self.inner.local.contains_key(service) {
            let (Ok(service), Ok(method)) =
                (ServiceName::try_from(service), MethodName::try_from(method))
            else {
                return (
                    Reply::error(Status::InvalidArgument, "bad service or method name"),
                    String::new(),
                );
            };
            let ctx = CallContext {
                caller: self.inner.id.clone(),
                service,
                method,
                metadata: options.metadata.clone(),
                deadline,
                trace: Some(trace),
            };
            if let Err(refused) = self.inner.admit(&ctx, || self.inner.labels.clone()) {
                return (refused, me);
            }
            return (self.inner.dispatch(ctx, body).await, me);
        }
        self.call_remote(service, method, body, options, trace, deadline, policy)
            .await
    }

    /// The answer when no connected peer hosts `service`: Unavailable for a service some peer
    /// hosted (or when configured peers cannot be reached), NotFound otherwise.
    pub(crate) fn no_endpoint(&self, peers: &Peers, service: &str) -> Reply {
        if peers.known.contains(service) {
            Reply::error(
                Status::Unavailable,
                format!(
                    "no live endpoint for service {service}: every node that hosted it has left"
                ),
            )
        } else if peers.dial_errors.is_empty() {
            Reply::error(
                Status::NotFound,
                format!("no connected peer hosts service {service}"),
            )
        } else {
            let why: Vec<String> = peers.dial_errors.values().cloned().collect();
            Reply::error(
                Status::Unavailable,
                format!(
                    "no reachable peer hosts service {service}; {}",
                    why.join("; ")
                ),
            )
        }
    }

    pub(crate) async fn remote_call(
        &self,
        conn: quinn::Connection,
        head: RequestHead<'_>,
        body: Bytes,
    ) -> Reply {
        let lost = |e: &dyn std::fmt::Display| {
            Reply::error(Status::Unavailable, format!("connection to peer lost: {e}"))
        };
        let (mut send, recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return lost(&e),
        };
        if let Err(e) = write_message(&mut send, &head, body).await {
            return lost(&e);
        }
        let mut reader = FrameReader::new(recv);
        let head_bytes = match reader.frame(MAX_HEAD_BYTES).await {
            Ok(b) => b,
            Err(ReadError::Stream(e)) => return lost(&e),
            Err(e) => return Reply::error(Status::Internal, format!("bad answer from peer: {e}")),
        };
        let head: ResponseHead = match decode_head(&head_bytes) {
            Ok(h) => h,
            Err(e) => {
                return Reply::error(Status::Internal, format!("bad answer head from peer: {e}"));
            }
        };
        let body = match reader.frame(self.inner.limits.max_body_bytes).await {
            Ok(b) => b,
            Err(ReadError::Stream(e)) => return lost(&e),
            Err(e) => {
                return Reply::error(Status::Internal, format!("bad answer body from peer: {e}"));
            }
        };
        match reader.end().await {
            Ok(()) => {}
            Err(ReadError::Stream(e)) => return lost(&e),
            Err(e) => return Reply::error(Status::Internal, format!("bad answer from peer: {e}")),
        }
        Reply {
            status: head.status,
            message: head.message.to_owned(),
            body,
        }
    }

    /// Closes every connection (peers see the node leave at once) and stops serving.
    pub async fn shutdown(&self) {
        let _ = self.inner.shutdown.send(true);
        // Connected peers learn at once from the close; the mDNS goodbye tells everyone else.
        self.inner
            .endpoint
            .close(CLOSE_SHUTDOWN.into(), b"shutdown");
        if let Some(discovery) = self.inner.discovery.clone() {
            let _ = tokio::task::spawn_blocking(move || discovery.stop()).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.inner.endpoint.wait_idle()).await;
    }

    async fn discovery_loop(self, mut updates: tokio::sync::mpsc::UnboundedReceiver<Update>) {
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            let update = tokio::select! {
                u = updates.recv() => u,
                _ = stop.changed() => return,
            };
            let Some(update) = update else { return };
            self.handle_discovery(update);
        }
    }

    /// Acts on one discovery update (from mDNS, or the gateway's registry).
    pub(crate) fn handle_discovery(&self, update: Update) {
        let actions = lock(&self.inner.directory).handle_update(update);
        for action in actions {
            match action {
                Action::Dial(name) => {
                    if lock(&self.inner.peers).dialing.insert(name.clone()) {
                        tokio::spawn(self.clone().dial_discovered(name));
                    }
                }
                Action::Forget(name) => self.forget(&name),
            }
        }
    }

    /// Keeps a discovered peer connected for as long as discovery knows it.
    async fn dial_discovered(self, name: NodeName) {
        let mut stop = self.inner.shutdown.subscribe();
        let mut changed = self.inner.changed.subscribe();
        let first = lock(&self.inner.directory).first_dial_at(&name, Instant::now());
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep_until(first.into()) => {}
            _ = stop.changed() => return,
        }
        loop {
            let Some(record) = lock(&self.inner.directory).get(&name).cloned() else {
                break;
            };
            if self.connected_to(&name) {
                // The peer dialled us, or a connection is up: wait until that changes.
                tokio::select! {
                    r = changed.changed() => if r.is_err() { break },
                    _ = stop.changed() => break,
                }
                continue;
            }
            let mut last = String::from("no address");
            for addr in &record.addrs {
                match self.connect(*addr).await {
                    Ok(conn) => {
                        match peer_id(&conn) {
                            Ok(id) if id.node_name() == &name => {
                                backoff.reset();
                                self.run_connection(conn).await;
                                last.clear();
                            }
                            Ok(id) => {
                                warn!(
                                    "mDNS names {name} at {addr}, but the certificate there proves {id}: ignoring that record"
                                );
                                conn.close(CLOSE_BAD_HELLO.into(), b"not the announced node");
                                lock(&self.inner.peers).dialing.remove(&name);
                                return;
                            }
                            Err(e) => last = e.to_string(),
                        }
                        break;
                    }
                    Err(why) => last = format!("{addr}: {why}"),
                }
            }
            if !last.is_empty() {
                debug!("cannot reach discovered peer {name}: {last}");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay(random())) => {}
                _ = stop.changed() => break,
            }
        }
        lock(&self.inner.peers).dialing.remove(&name);
    }

    fn connected_to(&self, name: &NodeName) -> bool {
        lock(&self.inner.peers)
            .by_id
            .keys()
            .any(|id| id.node_name() == name && id.leaf().is_none())
    }

    /// Closes every connection to `name`: discovery says it left.
    fn forget(&self, name: &NodeName) {
        let conns: Vec<quinn::Connection> = lock(&self.inner.peers)
            .by_id
            .iter()
            .filter(|(id, _)| id.node_name() == name)
            .flat_map(|(_, p)| p.conns.clone())
            .collect();
        for conn in conns {
            conn.close(CLOSE_GONE.into(), b"left the mesh");
        }
    }

    async fn accept_loop(self) {
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            let incoming = tokio::select! {
                i = self.inner.endpoint.accept() => i,
                _ = stop.changed() => return,
            };
            let Some(incoming) = incoming else { return };
            let node = self.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                match incoming.await {
                    Ok(conn) => node.run_connection(conn).await,
                    Err(e) => {
                        let why = describe_connect_error(&e);
                        warn!("refused connection from {remote}: {why}");
                        if why.starts_with("peer not trusted") {
                            node.audit(
                                "identity_refused",
                                vec![
                                    ("remote".into(), remote.to_string()),
                                    ("reason".into(), why),
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
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            match self.connect(addr).await {
                Ok(conn) => {
                    lock(&self.inner.peers).dial_errors.remove(&addr);
                    backoff.reset();
                    self.run_connection(conn).await;
                }
                Err(why) => {
                    warn!("cannot connect to peer {addr}: {why}");
                    lock(&self.inner.peers)
                        .dial_errors
                        .insert(addr, format!("{addr}: {why}"));
                    self.inner.changed.send_modify(|v| *v += 1);
                }
            }
            let delay = backoff.next_delay(random());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Dials `addr` and completes the mutual TLS handshake.
    pub async fn connect(&self, addr: SocketAddr) -> Result<quinn::Connection, String> {
        let connecting = self
            .inner
            .endpoint
            .connect(addr, "starling.mesh")
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(self.inner.limits.connect_timeout, connecting).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(describe_connect_error(&e)),
            Err(_) => Err(format!(
                "no handshake within {} ms",
                self.inner.limits.connect_timeout.as_millis()
            )),
        }
    }

    /// Serves a connection until it closes: hellos both ways, then calls.
    async fn run_connection(&self, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let id = match peer_id(&conn) {
            Ok(id) => id,
            Err(e) => {
                warn!("closing connection from {remote}: {e}");
                conn.close(CLOSE_BAD_HELLO.into(), b"no identity");
                return;
            }
        };
        tokio::spawn(self.clone().serve_calls(conn.clone(), id.clone()));
        let hello = match self.exchange_hellos(&conn, &id).await {
            Ok(info) => info,
            Err(why) => {
                warn!("closing connection to {id} at {remote}: {why}");
                conn.close(CLOSE_BAD_HELLO.into(), why.as_bytes());
                return;
            }
        };
        self.register(hello, &conn);
        let reason = conn.closed().await;
        self.unregister(&id, &conn, &reason);
    }

    async fn exchange_hellos(
        &self,
        conn: &quinn::Connection,
        id: &SpiffeId,
    ) -> Result<PeerInfo, String> {
        let send_ours = async {
            let mut uni = conn.open_uni().await.map_err(|e| e.to_string())?;
            uni.write_all(&self.inner.hello)
                .await
                .map_err(|e| e.to_string())?;
            let _ = uni.finish();
            Ok::<_, String>(())
        };
        let read_theirs = async {
            let recv = conn.accept_uni().await.map_err(|e| e.to_string())?;
            let frame = FrameReader::new(recv)
                .frame(MAX_HELLO_BYTES)
                .await
                .map_err(|e| format!("bad hello: {e}"))?;
            let hello: Hello = decode_head(&frame).map_err(|e| format!("bad hello: {e}"))?;
            if hello.name != id.node_name().as_str() {
                return Err(format!(
                    "hello names {:?} but the certificate proves {id}",
                    hello.name
                ));
            }
            if hello.protocol_version != mesh_proto::PROTOCOL_VERSION {
                debug!("peer {id} speaks protocol {}", hello.protocol_version);
            }
            let services = hello
                .services
                .iter()
                .map(|s| {
                    ServiceName::try_from(*s)
                        .map_err(|e| format!("bad service name {s:?} in hello: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(PeerInfo {
                id: id.clone(),
                role: hello.role,
                labels: hello
                    .labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                services,
                addr: conn.remote_address(),
            })
        };
        let both = async { tokio::try_join!(send_ours, read_theirs).map(|(_, info)| info) };
        tokio::time::timeout(self.inner.limits.connect_timeout, both)
            .await
            .map_err(|_| "no hello in time".to_owned())?
    }

    fn register(&self, info: PeerInfo, conn: &quinn::Connection) {
        let names: Vec<&str> = info.services.iter().map(ServiceName::as_str).collect();
        info!(
            "peer up: {} ({}) at {} hosting [{}]",
            info.id.node_name(),
            info.id,
            info.addr,
            names.join(", ")
        );
        let mut peers = lock(&self.inner.peers);
        peers
            .table
            .set_endpoint(&info.id, info.services.iter().cloned());
        peers.known.extend(info.services.iter().cloned());
        drop(peers);
        self.inner.forget_verdicts();
        let mut peers = lock(&self.inner.peers);
        let entry = peers
            .by_id
            .entry(info.id.clone())
            .or_insert_with(|| PeerEntry {
                key: endpoint_key(&info.id),
                info: info.clone(),
                conns: Vec::new(),
            });
        entry.info = info;
        entry.conns.push(conn.clone());
        drop(peers);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    fn unregister(&self, id: &SpiffeId, conn: &quinn::Connection, reason: &quinn::ConnectionError) {
        let mut peers = lock(&self.inner.peers);
        let Some(entry) = peers.by_id.get_mut(id) else {
            return;
        };
        entry.conns.retain(|c| c.stable_id() != conn.stable_id());
        if entry.conns.is_empty() {
            peers.by_id.remove(id);
            peers.table.remove_endpoint(id);
            info!("peer down: {} ({id}): {reason}", id.node_name());
        }
        drop(peers);
        self.inner.changed.send_modify(|v| *v += 1);
    }

    async fn serve_calls(self, conn: quinn::Connection, caller: SpiffeId) {
        let remote = conn.remote_address();
        while let Ok((send, recv)) = conn.accept_bi().await {
            let inner = self.inner.clone();
            let caller = caller.clone();
            tokio::spawn(async move { inner.serve_stream(caller, remote, send, recv).await });
        }
    }
}

impl Inner {
    /// Reads one call from a stream, serves it, writes the reply.
    async fn serve_stream(
        &self,
        caller: SpiffeId,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) {
        let mut reader = FrameReader::new(recv);
        let read = tokio::time::timeout(
            self.limits.call_timeout,
            self.read_request(caller.clone(), &mut reader),
        )
        .await;
        let reply = match read {
            Ok(Ok(Incoming::Call(ctx, body))) => {
                let labels = || {
                    lock(&self.peers)
                        .by_id
                        .get(&caller)
                        .map(|p| p.info.labels.clone())
                        .unwrap_or_default()
                };
                match self.admit(&ctx, labels) {
                    Ok(()) => self.dispatch_traced(*ctx, body).await,
                    Err(refused) => refused,
                }
            }
            Ok(Ok(Incoming::Control)) => match &self.control {
                Some(handler) => return handler.serve(caller, remote, send, reader).await,
                None => Reply::error(
                    Status::NotFound,
                    format!("node {} is not a gateway: no control plane here", self.name),
                ),
            },
            Ok(Err(reply)) => reply,
            Err(_) => Reply::error(Status::InvalidArgument, "request not received in time"),
        };
        if reply.status == Status::InvalidArgument {
            warn!(
                "refused a call from {}: {}",
                reader_peer(&send),
                reply.message
            );
            // Nothing more of this request is wanted.
            let _ = reader.into_inner().stop(0u32.into());
        }
        if let Err(e) = write_reply(&mut send, reply).await {
            debug!("could not write a reply: {e}");
        }
    }

    async fn read_request(
        &self,
        caller: SpiffeId,
        reader: &mut FrameReader,
    ) -> Result<Incoming, Reply> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            Reply::error(Status::InvalidArgument, format!("{what}: {e}"))
        };
        let head_bytes = reader
            .frame(MAX_HEAD_BYTES)
            .await
            .map_err(|e| bad("request head", &e))?;
        let head: RequestHead = decode_head(&head_bytes).map_err(|e| bad("request head", &e))?;
        if head.service == CONTROL_SERVICE {
            return Ok(Incoming::Control);
        }
        let service = ServiceName::try_from(head.service).map_err(|e| bad("service name", &e))?;
        let method = MethodName::try_from(head.method).map_err(|e| bad("method name", &e))?;
        let timeout = if head.deadline_ms == 0 {
            self.limits.call_timeout
        } else {
            Duration::from_millis(head.deadline_ms.into())
                .min(self.limits.call_timeout.max(Duration::from_secs(3600)))
        };
        let ctx = CallContext {
            caller,
            service,
            method,
            metadata: head
                .metadata
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            deadline: Instant::now() + timeout,
            trace: head.trace,
        };
        let body = reader
            .frame(self.limits.max_body_bytes)
            .await
            .map_err(|e| bad("request body", &e))?;
        reader.end().await.map_err(|e| bad("request", &e))?;
        Ok(Incoming::Call(Box::new(ctx), body))
    }

    /// Serves a call and records the callee's span when the caller sampled it.
    async fn dispatch_traced(&self, ctx: CallContext, body: Bytes) -> Reply {
        let Some(trace) = ctx.trace.filter(|t| t.flags & 1 == 1) else {
            return self.dispatch(ctx, body).await;
        };
        let (service, method) = (
            ctx.service.as_str().to_owned(),
            ctx.method.as_str().to_owned(),
        );
        let started = Instant::now();
        let started_wall = unix_us();
        let reply = self.dispatch(ctx, body).await;
        lock(&self.telemetry).record_span(Span {
            trace_id: trace.trace_id,
            span_id: random().to_le_bytes(),
            parent_span_id: Some(trace.span_id),
            client: false,
            node: self.name.as_str().to_owned(),
            service,
            method,
            start_unix_us: started_wall,
            duration_us: started.elapsed().as_micros() as u64,
            status: reply.status,
        });
        reply
    }

    /// Serves a call for a service this node hosts.
    async fn dispatch(&self, ctx: CallContext, body: Bytes) -> Reply {
        let Some(upstream) = self.local.get(&ctx.service) else {
            return Reply::error(
                Status::NotFound,
                format!(
                    "service {} is not hosted on node {}",
                    ctx.service, self.name
                ),
            );
        };
        if upstream.is_instant() {
            // Builtins answer without waiting on anything: no deadline timer to arm.
            return upstream.serve(&ctx, body, self.limits.max_body_bytes).await;
        }
        let left = ctx.deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, upstream.serve(&ctx, body, self.limits.max_body_bytes))
            .await
        {
            Ok(reply) => reply,
            Err(_) => Reply::error(
                Status::DeadlineExceeded,
                format!(
                    "upstream of {} on node {} did not answer within the deadline",
                    ctx.service, self.name
                ),
            ),
        }
    }
}

fn reader_peer(send: &quinn::SendStream) -> String {
    format!("stream {}", send.id())
}

/// A QUIC endpoint that serves and dials with `identity`, under `limits`.
pub fn bind_endpoint(
    identity: &Identity,
    limits: &Limits,
    listen: SocketAddr,
) -> Result<quinn::Endpoint, StartError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(limits.keep_alive))
        .max_idle_timeout(limits.idle_timeout.try_into().ok())
        .max_concurrent_bidi_streams(limits.max_concurrent_calls.into())
        .max_concurrent_uni_streams(8u32.into());
    let transport = Arc::new(transport);

    let server_tls = QuicServerConfig::try_from(identity.server_config()?)
        .map_err(|e| StartError::Config(format!("quic server config: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_tls));
    server.transport_config(transport.clone());

    let client_tls = QuicClientConfig::try_from(identity.client_config()?)
        .map_err(|e| StartError::Config(format!("quic client config: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(client_tls));
    client.transport_config(transport);

    let mut endpoint =
        quinn::Endpoint::server(server, listen).map_err(|source| StartError::Bind {
            addr: listen,
            source,
        })?;
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// The hello frame a node with `config` sends on each new connection.
pub fn encode_hello(config: &NodeConfig, role: Role) -> Result<Vec<u8>, StartError> {
    let mut hello = Hello {
        protocol_version: mesh_proto::PROTOCOL_VERSION,
        name: config.name.as_str(),
        role,
        labels: Default::default(),
        services: Default::default(),
    };
    for (k, v) in &config.labels {
        hello
            .labels
            .push((k, v))
            .map_err(|_| StartError::Config("too many labels".into()))?;
    }
    for s in &config.services {
        hello
            .services
            .push(s.name.as_str())
            .map_err(|_| StartError::Config("too many services".into()))?;
    }
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(&hello, &mut out);
    Ok(out)
}

/// Words for a failed handshake; a certificate problem says the peer was not trusted.
fn describe_connect_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    if text.contains("certificate")
        || text.contains("UnknownIssuer")
        || text.contains("trust domain")
    {
        format!("peer not trusted: handshake refused ({text})")
    } else if text.contains("alert") || text.contains("crypto") {
        format!("peer not trusted: the peer refused our certificate ({text})")
    } else {
        text
    }
}

/// What a stream carries: a call, or a control stream for the gateway.
enum Incoming {
    Call(Box<CallContext>, Bytes),
    Control,
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn random_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random().to_le_bytes());
    id[8..].copy_from_slice(&random().to_le_bytes());
    id
}

/// Locks a mutex; a panic while it was held (a bug) does not stop the node from serving.
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks is a bug; keep serving with the data as it is.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fast per-thread pseudo-random number (xorshift64*, seeded from the OS-seeded hasher):
/// for jitter, sampling and balancing, never for secrets.
pub(crate) fn random() -> u64 {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new(
            std::collections::hash_map::RandomState::new().build_hasher().finish() | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// FNV-1a of an identity: the balancer's key for an endpoint.
fn endpoint_key(id: &SpiffeId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
