//! The node: composition and public API. It builds the parts, wires their handles together, and
//! lets a Rust program call the mesh, host services and watch its peers.
//!
//! ```text
//!            +------------------------- Node ---------------------------+
//!  calls --> | client -> peers (pick) -> QUIC stream -----------------+  |
//!            |                                                       |  |
//!  QUIC  --> | transport -> server -> admit -> hosted -> upstream     |  |
//!            |     |           ^                                     |  |
//!            |  discovery      policy <- control session <- gateway  |  |
//!            |                 telemetry -> control session -> gateway  |
//!            +----------------------------------------------------------+
//! ```
//!
//! Each part owns its state and holds handles to the shared ones (peer table, policy, telemetry,
//! hosted services); none reaches into another. A connection is one per peer, reused by every
//! call; each call is one bidirectional stream (see `mesh-proto`). Bad bytes on a call stream end
//! that stream with `InvalidArgument`; they never end the connection, other calls, or the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_core::{ServiceName, SpiffeId};
use mesh_proto::Role;
use mesh_proto::control::BundleRef;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::call::{CallError, CallOptions, CallStream, Reply};
use crate::client::Client;
use crate::config::NodeConfig;
use crate::control::telemetry::TelemetrySink;
use crate::control::{ControlClient, GatewayPin, apply_saved_policy, resources};
use crate::discovery::{Announcement, Discovery, MdnsDiscovery};
use crate::hosted::{Hosted, Services};
use crate::identity::renew::{RenewalStatus, Renewer};
use crate::identity::{CertificateClaims, Identity};
use crate::peers::{PeerInfo, PeerSet};
use crate::policy::{Policy, PolicyCell, PolicySource, PolicyState};
use crate::server::{ReservedService, Server};
use crate::state::{PolicyStore, StateError, StateLock};
use crate::transport::{self, BindError, EnrollService, Me, Transport};
use crate::upstream::{Upstream, UpstreamSpec};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The QUIC endpoint could not be set up.
    #[error("{0}")]
    Bind(#[from] BindError),
    /// The state folder is held by another node, or cannot be made.
    #[error("{0}")]
    State(#[from] StateError),
    /// The certificate is not for the role this program plays.
    #[error("{0}")]
    Role(String),
    /// The time floor cannot be read.
    #[error("{0}")]
    Clock(String),
}

/// What a node knows of itself now: [`Node::status`], and `GET /v1/status` on its ingress.
#[derive(Debug, Clone)]
pub struct NodeStatus {
    /// Its identity.
    pub id: SpiffeId,
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// The services it hosts.
    pub hosted: Vec<ServiceName>,
    /// The peers connected now.
    pub peers: Vec<PeerInfo>,
    /// Why configured peers cannot be reached.
    pub dial_errors: Vec<String>,
    /// Connections refused because of a certificate, or because their identity held
    /// [`crate::MAX_CONNECTIONS_PER_PEER`] others already, since start.
    pub refused_handshakes: u64,
    /// Why the last one was refused.
    pub last_refusal: Option<String>,
    /// Connections whose hello was checked, since start.
    pub connections_admitted: u64,
    /// Peers that went down (their last connection closed), since start.
    pub peers_lost: u64,
    /// The gateway its control stream is up to, if it is.
    pub gateway: Option<SocketAddr>,
    /// Control streams opened since start.
    pub gateway_sessions: u64,
    /// The policy bundle it runs under, if any.
    pub policy: Option<BundleRef>,
    /// `saved`, `gateway`, `local`, `none`, or `damaged` (every call refused).
    pub policy_source: &'static str,
    /// Why the policy in force is not saved, or why the saved one is damaged.
    pub policy_problem: Option<String>,
    /// Telemetry batches waiting for the gateway's acknowledgement.
    pub telemetry_pending: usize,
    /// Telemetry batches dropped because the backlog was full, since start.
    pub telemetry_dropped: u64,
    /// Bytes of the batches waiting.
    pub telemetry_pending_bytes: usize,
    /// Spans and audit events dropped (a batch full, or the backlog's byte bound), since start.
    pub telemetry_lost_items: u64,
    /// Seconds until this node's certificate expires (negative: expired that long ago; peers
    /// refuse it and close its connections).
    pub certificate_expires_in_s: i64,
    /// Set when a peer closed a connection saying this node's certificate is revoked.
    pub revoked: Option<String>,
    /// Certificates renewed, and why the last renewal failed.
    pub renewal: RenewalStatus,
    /// Where its wall-clock time comes from: `system`, `floor`, `gateway` or `unknown`.
    pub clock: &'static str,
    /// Its serial lines: the path, the microcontroller on it (if one announced), and the frames
    /// dropped (too long, garbled, bad checksum, unknown, unauthenticated).
    pub serial: Vec<(std::path::PathBuf, Option<String>, [u32; 5])>,
}

/// How a node is started beyond its config.
#[derive(Default, Clone)]
pub struct NodeOptions {
    /// The discovery source; `None` uses mDNS if the config enables it.
    pub discovery: Option<Arc<dyn Discovery>>,
    /// Announce as a gateway rather than a node.
    pub gateway: bool,
    /// Handlers of reserved services (a gateway plugs in `_control`).
    pub reserved: Vec<(&'static str, Arc<dyn ReservedService>)>,
    /// Serves enrolment connections (a gateway with an issuer); none: the ALPN is not offered
    /// and every client must present a certificate.
    pub enrolment: Option<Arc<dyn EnrollService>>,
    /// A deny list in force from the first connection (a gateway's; nodes take theirs from their
    /// policy bundle).
    pub revoked: Vec<mesh_core::policy::Revoked>,
}

/// A running node. Cheap to clone; all clones are the same node.
#[derive(Clone)]
pub struct Node {
    parts: Arc<Parts>,
}

struct Parts {
    id: SpiffeId,
    config: NodeConfig,
    transport: Transport,
    client: Arc<Client>,
    peers: Arc<PeerSet>,
    policy: Arc<PolicyCell>,
    telemetry: Arc<TelemetrySink>,
    hosted: Arc<Hosted>,
    discovery: Option<Arc<dyn Discovery>>,
    shutdown: watch::Sender<bool>,
    gateway_up: Arc<watch::Sender<(Option<SocketAddr>, u64)>>,
    lock: std::sync::Mutex<StateLock>,
    /// When the certificate in use expires.
    not_after: Arc<std::sync::Mutex<std::time::SystemTime>>,
    renewer: Option<Arc<Renewer>>,
    serial_lines: Vec<Arc<crate::upstream::serial::SerialLink>>,
}

impl Node {
    /// Binds the QUIC endpoint, starts dialling the configured peers, and serves until
    /// [`Node::shutdown`]. The local HTTP ingress is separate: [`crate::ingress::serve`].
    pub async fn start(config: NodeConfig, identity: Identity) -> Result<Node, StartError> {
        Self::start_with(config, identity, NodeOptions::default()).await
    }

    /// Like [`Node::start`], with options: a discovery source (e.g. an in-memory one in tests),
    /// the gateway role and its reserved services.
    pub async fn start_with(
        config: NodeConfig,
        identity: Identity,
        options: NodeOptions,
    ) -> Result<Node, StartError> {
        let endpoint = transport::bind_endpoint(&identity, &config.limits, config.listen)?;
        Self::start_on(config, identity, options, endpoint)
    }

    /// Starts a node on an endpoint made elsewhere (an in-memory network in tests).
    pub fn start_on(
        config: NodeConfig,
        identity: Identity,
        options: NodeOptions,
        endpoint: quinn::Endpoint,
    ) -> Result<Node, StartError> {
        let id = identity.id.clone();
        if options.gateway && !id.is_gateway() {
            return Err(StartError::Role(format!(
                "a gateway needs a gateway certificate, and {id} is a node's: make one with \
                 `mesh-gateway ca issue --gateway --name {}`",
                id.node_name()
            )));
        }
        if !options.gateway && id.is_gateway() {
            return Err(StartError::Role(format!(
                "{id} is a gateway's certificate: run it with mesh-gateway, or give this node a \
                 node certificate"
            )));
        }
        match crate::wallclock::init(&config.state_dir, identity.not_before) {
            Ok(crate::wallclock::Basis::System) => {}
            Ok(crate::wallclock::Basis::Unknown) => warn!(
                "this device's clock is before its certificate was issued, and it has no time \
                 floor: it refuses every peer but its gateway until the gateway gives it the time"
            ),
            Ok(basis) => warn!(
                "this device's clock is before its time floor or its certificate's issue: it runs \
                 on its {} until its gateway gives it the time",
                basis.as_str()
            ),
            Err(e) => return Err(StartError::Clock(e)),
        }
        let expires_in = seconds_until(identity.not_after);
        if expires_in <= 0 {
            warn!(
                "{id}'s certificate expired {}s ago: every peer will refuse it; issue a new one",
                -expires_in
            );
        } else if expires_in < 86_400 {
            warn!("{id}'s certificate expires in {expires_in}s");
        }
        // Labels in the config that the certificate does not certify are shown, never matched.
        for (k, v) in &config.labels {
            if identity.labels.get(k) != Some(v) {
                warn!(
                    "label {k}={v} is in the config but not in {id}'s certificate: it is shown to \
                     peers, and no authorization rule or traffic subset matches it (certify it \
                     with `mesh-gateway ca issue --labels {k}={v}`)"
                );
            }
        }
        let mut lock = StateLock::acquire(&config.state_dir, config.name.as_str())?;
        let (server_config, client_config) =
            transport::quic_configs_with(&identity, &config.limits, options.enrolment.is_some())?;
        if options.enrolment.is_some() {
            endpoint.set_server_config(Some(server_config));
        }
        let role = if options.gateway {
            Role::Gateway
        } else {
            Role::Node
        };
        let discovery_given = options.discovery.is_some();
        let discovery: Option<Arc<dyn Discovery>> = match options.discovery {
            Some(d) => Some(d),
            None if config.mdns => Some(Arc::new(MdnsDiscovery::new())),
            None => None,
        };
        let shutdown = watch::Sender::new(false);
        let peers = Arc::new(PeerSet::new());
        let policy = Arc::new(PolicyCell::default());
        policy.set_revoked(options.revoked.clone());
        let telemetry = Arc::new(TelemetrySink::new(
            mesh_core::telemetry::Bounds {
                max_batches: config.telemetry.backlog,
                max_bytes: config.telemetry.max_backlog_bytes,
                max_series: config.telemetry.max_series,
                ..Default::default()
            },
            config.telemetry.interval,
            Some(config.state_dir.join("telemetry.state")),
        ));
        // Spans are kept only where a gateway could take them: one configured, found by mDNS, or
        // this node is the gateway.
        let gateway_possible = options.gateway
            || config.gateway.is_some()
            || config.gateway_name.is_some()
            || config.mdns
            || discovery_given;
        telemetry.lock().keep_spans(gateway_possible);
        let hosted = Arc::new(Hosted::new(
            config
                .services
                .iter()
                // A microcontroller's services are hosted while it announces them (below).
                .filter(|s| !matches!(s.upstream, UpstreamSpec::Serial { .. }))
                .map(|s| {
                    let upstream = Upstream::new(s.upstream.clone(), config.name.as_str());
                    (s.name.clone(), Arc::new(upstream))
                })
                .collect::<Services>(),
        ));
        // The saved policy is in force before anything is served.
        let store = PolicyStore::new(&config.state_dir);
        apply_saved_policy(&store, &policy, &telemetry);
        let gateway_up = Arc::new(watch::Sender::new((None, 0)));
        let mut reserved = options.reserved.into_iter().collect::<HashMap<_, _>>();
        if !options.gateway {
            // Renewals of peers that reach the gateway only through this node.
            reserved.insert(
                crate::identity::enroll::RELAY_SERVICE,
                Arc::new(crate::relay::EnrollRelay::new(gateway_up.subscribe()))
                    as Arc<dyn ReservedService>,
            );
        }
        let server = Arc::new(Server::new(
            config.name.clone(),
            config.limits.clone(),
            hosted.clone(),
            policy.clone(),
            telemetry.clone(),
            peers.clone(),
            reserved,
        ));
        let client = Arc::new(Client::new(
            id.clone(),
            identity.labels.clone(),
            config.limits.clone(),
            config.telemetry.trace_sample,
            peers.clone(),
            policy.clone(),
            telemetry.clone(),
            hosted.clone(),
            server.clone(),
        ));
        let serve = {
            let server = server.clone();
            Arc::new(
                move |conn: quinn::Connection, caller: Arc<CertificateClaims>| {
                    Box::pin(server.clone().serve_connection(conn, caller))
                        as std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
                },
            )
        };
        let mut static_peers = config.peers.clone();
        if let Some(gw) = config.gateway
            && !static_peers.contains(&gw)
        {
            static_peers.push(gw);
        }
        let transport = Transport::start(
            transport::Parts {
                endpoint,
                client_config,
                limits: config.limits.clone(),
                me: Me {
                    id: id.clone(),
                    role,
                    labels: config.labels.clone(),
                },
                hosted: hosted.clone(),
                peers: peers.clone(),
                telemetry: telemetry.clone(),
                serve,
                shutdown: shutdown.subscribe(),
                revoked: policy.watch_revoked(),
                enrolment: options.enrolment.clone(),
            },
            static_peers,
        );
        info!("quic listening on {} as {id}", transport.local_addr());
        lock.set("quic", &transport.local_addr().to_string());

        let (updates_tx, updates_rx) = mpsc::unbounded_channel();
        transport.follow(updates_rx);
        let not_after = Arc::new(std::sync::Mutex::new(identity.not_after));
        let renewer = if options.gateway {
            None
        } else {
            let (transport, not_after) = (transport.clone(), not_after.clone());
            let apply: crate::identity::renew::Apply = Box::new(move |id: &Identity| {
                transport.set_identity(id).map_err(|e| e.to_string())?;
                *not_after.lock().unwrap_or_else(|p| p.into_inner()) = id.not_after;
                transport.refresh_connections();
                Ok(())
            });
            match Renewer::new(
                config.name.as_str(),
                &identity,
                config.identity.files(),
                config.identity.renew_key,
                apply,
            ) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    warn!("this node's certificate will not be renewed: {e}");
                    None
                }
            }
        };
        {
            // The time floor: saved every ten minutes (and at shutdown).
            let mut stop = shutdown.subscribe();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(600));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            let _ = tokio::task::spawn_blocking(crate::wallclock::save_floor).await;
                        }
                        _ = stop.changed() => return,
                    }
                }
            });
        }
        let serial_lines = serve_serial_lines(&config, &hosted, &shutdown);
        if let Some(renewer) = &renewer {
            tokio::spawn(crate::identity::renew::watch(
                renewer.clone(),
                gateway_up.subscribe(),
                config.gateway,
                peers.clone(),
                shutdown.subscribe(),
            ));
        }
        let control = ControlClient {
            renewer: renewer.clone(),
            name: config.name.clone(),
            labels: config.labels.clone(),
            local_addr: transport.local_addr(),
            pin: GatewayPin {
                addr: config.gateway,
                name: config.gateway_name.clone(),
            },
            peers: peers.clone(),
            policy: policy.clone(),
            store,
            telemetry: telemetry.clone(),
            hosted: hosted.clone(),
            updates: updates_tx.clone(),
            gateway_up: gateway_up.clone(),
            shutdown: shutdown.subscribe(),
        };
        if !options.gateway {
            if config.gateway.is_none() && config.gateway_name.is_none() {
                warn!(
                    "no gateway or gateway_name configured: any gateway the mesh CA certified may \
                     send this node policy; name yours (gateway_name) if the site has several"
                );
            }
            tokio::spawn(control.run());
        }
        {
            let telemetry = telemetry.clone();
            let peers = peers.clone();
            let stop = shutdown.subscribe();
            tokio::spawn(async move { telemetry.run_ticker(stop, || resources(&peers)).await });
        }
        if let Some(discovery) = &discovery {
            let updates = discovery.start(Announcement {
                id: id.clone(),
                addr: transport.local_addr(),
                role,
                labels: config.labels.clone(),
                services: hosted.names(),
            });
            tokio::spawn(forward(updates, updates_tx, shutdown.subscribe()));
        }
        Ok(Node {
            parts: Arc::new(Parts {
                id,
                config,
                transport,
                client,
                peers,
                policy,
                telemetry,
                hosted,
                discovery,
                shutdown,
                gateway_up,
                lock: std::sync::Mutex::new(lock),
                not_after,
                renewer,
                serial_lines,
            }),
        })
    }

    /// Records where something of this node listens (`ingress`, `admin`) in its state folder's
    /// lock file, for operators, status commands and tests.
    pub fn record_address(&self, key: &str, addr: SocketAddr) {
        self.parts
            .lock
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(key, &addr.to_string());
    }

    /// What this node knows of itself now.
    pub fn status(&self) -> NodeStatus {
        let telemetry = self.parts.telemetry.lock();
        let (pending, dropped) = (telemetry.pending().count(), telemetry.dropped());
        let (pending_bytes, lost_items) = (telemetry.pending_bytes(), telemetry.lost_items());
        drop(telemetry);
        let (refused_handshakes, last_refusal) = self.parts.transport.refused_handshakes();
        let (connections_admitted, peers_lost) = self.parts.peers.churn();
        let policy = self.parts.policy.state();
        NodeStatus {
            id: self.parts.id.clone(),
            quic: self.local_addr(),
            hosted: self.parts.hosted.names(),
            peers: self.peers(),
            dial_errors: self.dial_errors(),
            refused_handshakes,
            last_refusal,
            connections_admitted,
            peers_lost,
            gateway: self.parts.gateway_up.borrow().0,
            gateway_sessions: self.parts.gateway_up.borrow().1,
            policy: self.parts.policy.held(),
            policy_source: match &policy {
                PolicyState::None => "none",
                PolicyState::Held { source, .. } => source.as_str(),
                PolicyState::Damaged(_) => "damaged",
            },
            policy_problem: match policy {
                PolicyState::Held { unsaved, .. } => unsaved,
                PolicyState::Damaged(why) => Some(why),
                PolicyState::None => None,
            },
            telemetry_pending: pending,
            telemetry_dropped: dropped,
            telemetry_pending_bytes: pending_bytes,
            telemetry_lost_items: lost_items,
            certificate_expires_in_s: seconds_until(
                *self
                    .parts
                    .not_after
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            ),
            revoked: self.parts.transport.revoked_here(),
            renewal: self
                .parts
                .renewer
                .as_ref()
                .map(|r| r.status())
                .unwrap_or_default(),
            clock: crate::wallclock::now().1.as_str(),
            serial: self.parts.serial_lines.iter().map(|l| l.status()).collect(),
        }
    }

    /// Replaces the deny list this node enforces (a gateway feeds its node the list it serves;
    /// other nodes take it from their policy bundle). Connections with a peer on it close.
    pub fn set_revoked(&self, list: Vec<mesh_core::policy::Revoked>) {
        self.parts.policy.set_revoked(list);
    }

    /// This node's identity.
    pub fn id(&self) -> &SpiffeId {
        &self.parts.id
    }

    /// The config it runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.parts.config
    }

    /// The bound QUIC address.
    pub fn local_addr(&self) -> SocketAddr {
        self.parts.transport.local_addr()
    }

    /// The largest body a call may carry.
    pub fn max_body_bytes(&self) -> usize {
        self.parts.config.limits.max_body_bytes
    }

    /// Changes to `true` when the node shuts down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.parts.shutdown.subscribe()
    }

    /// The last failure of each configured peer that is not connected now.
    pub fn dial_errors(&self) -> Vec<String> {
        self.parts.peers.dial_errors()
    }

    /// The peers connected now.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.parts.peers.snapshot()
    }

    /// Waits until some peer hosting `service` is connected, or `timeout` passes; true if it is.
    pub async fn wait_for_service(&self, service: &str, timeout: Duration) -> bool {
        self.wait_until(timeout, |node| node.parts.peers.has_endpoint(service))
            .await
    }

    /// Waits until `ready(self)` holds, re-checking whenever the peer table changes, or until
    /// `timeout` passes; returns whether it holds.
    pub async fn wait_until(&self, timeout: Duration, ready: impl Fn(&Node) -> bool) -> bool {
        let mut rx = self.parts.peers.subscribe();
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
        self.parts.client.call(service, method, body, options).await
    }

    /// Opens a streamed call to `service.method`: the body goes up in chunks and the answer comes
    /// back in chunks, so its size is not bounded by memory. Not retried, not mirrored.
    pub async fn call_stream(
        &self,
        service: &str,
        method: &str,
        options: &CallOptions,
    ) -> Result<CallStream, CallError> {
        self.parts
            .client
            .call_stream(service, method, options)
            .await
    }

    /// Whether this node hosts `service` now.
    pub fn hosts(&self, service: &str) -> bool {
        self.parts.hosted.contains(service)
    }

    /// The caller side of this node's calls.
    pub(crate) fn client(&self) -> &Client {
        &self.parts.client
    }

    /// This node's telemetry.
    pub(crate) fn telemetry(&self) -> &TelemetrySink {
        &self.parts.telemetry
    }

    /// Hosts `service` on this node from now on (or replaces its upstream); peers learn of it at
    /// once.
    pub fn host(&self, service: ServiceName, upstream: UpstreamSpec) {
        let upstream = Upstream::new(upstream, self.parts.config.name.as_str());
        self.parts.hosted.insert(service, upstream);
    }

    /// Stops hosting `service`; peers learn of it at once.
    pub fn unhost(&self, service: &str) {
        self.parts.hosted.remove(service);
    }

    /// The services this node hosts now.
    pub fn hosted(&self) -> Vec<ServiceName> {
        self.parts.hosted.names()
    }

    /// Uses `identity` for every new handshake from now on (a renewed certificate); connections
    /// already up keep theirs.
    pub fn set_identity(&self, identity: &Identity) -> Result<(), StartError> {
        self.parts.transport.set_identity(identity)?;
        *self
            .parts
            .not_after
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = identity.not_after;
        if let Some(renewer) = &self.parts.renewer
            && let Err(e) = renewer.replaced(identity)
        {
            warn!("the new certificate will not be renewed: {e}");
        }
        Ok(())
    }

    /// The policy version this node holds (0: none).
    pub fn policy_version(&self) -> u64 {
        self.parts.policy.version()
    }

    /// Replaces the policy this node runs under (normally done by the gateway's control stream).
    pub fn set_policy(&self, version: u64, policy: Policy) {
        let id = BundleRef {
            epoch: 0,
            version,
            hash: [0; 32],
        };
        self.parts.policy.set(id, policy, PolicySource::Local);
    }

    /// Drops the policy: the node runs as if it never had one.
    pub fn clear_policy(&self) {
        self.parts.policy.clear();
    }

    /// Calls made and retries spent under the retry budget of `service`: `(calls, retries)`.
    pub fn retry_totals(&self, service: &str) -> (u64, u64) {
        self.parts.client.retry_totals(service)
    }

    /// Cuts a telemetry batch now and returns every batch the gateway has not acknowledged yet:
    /// what this node would report (for tests and debugging).
    pub fn telemetry_now(&self) -> Vec<mesh_proto::control::TelemetryBatch> {
        self.parts.telemetry.cut_now(resources(&self.parts.peers))
    }

    /// Hands the gateway what telemetry is left (bounded: 2 s), closes every connection (peers see
    /// the node leave at once) and stops serving.
    pub async fn shutdown(&self) {
        let _ = tokio::task::spawn_blocking(crate::wallclock::save_floor).await;
        if self.parts.gateway_up.borrow().0.is_some() {
            let flushed = self
                .parts
                .telemetry
                .flush(resources(&self.parts.peers), Duration::from_secs(2))
                .await;
            if !flushed {
                warn!(
                    "stopping with telemetry the gateway has not acknowledged: it will count a gap"
                );
            }
        } else {
            // No gateway to hand it to now: the interval in progress becomes a batch, kept
            // unacknowledged, so the next start counts it as lost.
            self.parts.telemetry.cut_now(resources(&self.parts.peers));
        }
        let _ = self.parts.shutdown.send(true);
        // Connected peers learn at once from the close; the mDNS goodbye tells everyone else.
        let transport = self.parts.transport.clone();
        let close = async move { transport.close().await };
        if let Some(discovery) = self.parts.discovery.clone() {
            let goodbye = tokio::task::spawn_blocking(move || discovery.stop());
            let (_, _) = tokio::join!(close, goodbye);
        } else {
            close.await;
        }
        // Calls answered during the flush, after its cut: a last batch, never acknowledged, so
        // the next start counts it as lost rather than nobody counting them.
        if self.parts.telemetry.lock().has_uncut_calls() {
            self.parts.telemetry.cut_now(resources(&self.parts.peers));
        }
        let telemetry = self.parts.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || telemetry.mark_stopped()).await;
    }
}

/// Passes discovery updates on to the dialer until the node stops.
async fn forward(
    mut from: mpsc::UnboundedReceiver<mesh_core::discovery::Update>,
    to: mpsc::UnboundedSender<mesh_core::discovery::Update>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            u = from.recv() => match u {
                Some(u) => if to.send(u).is_err() { return },
                None => return,
            },
            _ = stop.changed() => return,
        }
    }
}

/// Opens every serial line the config names, and hosts the services configured on it while the
/// microcontroller there announces them (a service it announces that the config does not name is
/// not hosted: the operator decides what a line may serve).
fn serve_serial_lines(
    config: &NodeConfig,
    hosted: &Arc<Hosted>,
    shutdown: &watch::Sender<bool>,
) -> Vec<Arc<crate::upstream::serial::SerialLink>> {
    let mut links = Vec::new();
    type Line = (u32, Option<std::path::PathBuf>, Vec<ServiceName>);
    let mut lines: HashMap<std::path::PathBuf, Line> = HashMap::new();
    for s in &config.services {
        if let UpstreamSpec::Serial { path, baud, key } = &s.upstream {
            lines
                .entry(path.clone())
                .or_insert_with(|| (*baud, key.clone(), Vec::new()))
                .2
                .push(s.name.clone());
        }
    }
    for (path, (baud, key_file, names)) in lines {
        for name in &names {
            hosted.mark_intermittent(name.clone());
        }
        let key = match key_file.as_deref().map(crate::upstream::serial::read_key) {
            None => None,
            Some(Ok(key)) => Some(key),
            Some(Err(e)) => {
                // Fail closed: a line whose key cannot be read is not opened.
                tracing::error!("serial line {} is not opened: {e}", path.display());
                continue;
            }
        };
        let link = crate::upstream::serial::SerialLink::new(path.clone(), baud, key);
        links.push(link.clone());
        tokio::spawn(link.clone().run(shutdown.subscribe()));
        let (hosted, mut announced, mut stop) =
            (hosted.clone(), link.subscribe(), shutdown.subscribe());
        tokio::spawn(async move {
            loop {
                let now = announced.borrow_and_update().clone();
                for name in &names {
                    let offered = now
                        .as_ref()
                        .is_some_and(|a| a.services.iter().any(|(s, _)| s == name.as_str()));
                    if offered {
                        let spec = UpstreamSpec::Serial {
                            path: path.clone(),
                            baud,
                            key: key_file.clone(),
                        };
                        hosted.insert(name.clone(), Upstream::serial(link.clone(), spec));
                    } else {
                        hosted.remove(name.as_str());
                    }
                }
                if let Some(a) = &now {
                    for (service, _) in &a.services {
                        if !names.iter().any(|n| n.as_str() == service) {
                            warn!(
                                "{} on {} offers {service}, which the config does not host on this \
                                 line: ignored",
                                a.name,
                                path.display()
                            );
                        }
                    }
                }
                tokio::select! {
                    r = announced.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            }
        });
    }
    links
}

/// Whole seconds from now until `at`; negative when `at` has passed.
fn seconds_until(at: std::time::SystemTime) -> i64 {
    match at.duration_since(crate::wallclock::time()) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs()).unwrap_or(i64::MAX),
    }
}
