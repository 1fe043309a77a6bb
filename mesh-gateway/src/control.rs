//! The gateway's side of the control streams: one per node, opened as a call to the reserved
//! service `_control`. A node says hello, then sends heartbeats, policy acks and nacks, and
//! telemetry batches; the gateway pushes the current policy bundle, the registry (at most every
//! [`REGISTRY_PUSH_EVERY`], encoded once for all nodes) and telemetry acks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::lock;
use std::time::{Duration, Instant};

use mesh_node::ReservedService;
use mesh_node::identity::CertificateClaims;
use mesh_node::wire::FrameReader;
use mesh_proto::control::{BundleRef, Down, MAX_CONTROL_FRAME, Up};
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::audit::AuditLog;
use crate::ca::issuing::Issuing;
use crate::cloud::{Bridge, Class};
use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::registry::{CertificateInfo, Registry};
use crate::traces::Traces;

/// How often, at most, each node is sent the registry when it changed.
const REGISTRY_PUSH_EVERY: Duration = Duration::from_secs(2);
/// Encoded frames, shared by the sessions that send them: QUIC holds the same bytes for every
/// node until each acknowledges them, not a copy per node.
type Frame = bytes::Bytes;
/// A registry frame's size, about, at most (a quarter of what a control frame may be).
const REGISTRY_FRAME_BYTES: usize = MAX_CONTROL_FRAME / 4;

/// What the control plane holds: registry, aggregated telemetry, traces; and the policy it pushes.
pub(crate) struct ControlPlane {
    pub(crate) registry: Mutex<Registry>,
    pub(crate) metrics: Mutex<Metrics>,
    pub(crate) traces: Mutex<Traces>,
    pub(crate) policies: Arc<Policies>,
    pub(crate) audit: Arc<AuditLog>,
    /// The mesh's trust domain (names on the command line become SPIFFE IDs in it).
    pub(crate) trust_domain: String,
    /// The site issuer (enrolment, renewal), if the gateway has one.
    pub(crate) issuing: Option<Arc<Issuing>>,
    /// The trust bundle every node is sent (the gateway's own CA file), PEM.
    pub(crate) roots_pem: String,
    registry_changed: watch::Sender<u64>,
    /// The registry revision every session is to catch up with: set at most every
    /// [`REGISTRY_PUSH_EVERY`], so that sessions send the same delta, encoded once.
    registry_push: watch::Sender<u64>,
    /// The whole registry as a frame: its revision, when it was made, the frame.
    registry_full: Mutex<Option<(u64, Instant, Frame)>>,
    /// Deltas to the current revision, by the revision they start from.
    registry_deltas: Mutex<(u64, std::collections::HashMap<u64, Frame>)>,
    /// The cloud bridge, if the gateway has one: telemetry, node events, policy status.
    cloud: std::sync::OnceLock<Bridge>,
    /// The OTLP exporter, if the gateway has one: every span nodes send.
    otlp: std::sync::OnceLock<crate::otlp::Exporter>,
    /// Renewals sign one at a time.
    signing: tokio::sync::Semaphore,
}

impl ControlPlane {
    pub(crate) fn new(
        registry: Registry,
        traces: Traces,
        policies: Arc<Policies>,
        audit: Arc<AuditLog>,
        trust_domain: String,
        issuing: Option<Arc<Issuing>>,
        roots_pem: String,
    ) -> Self {
        ControlPlane {
            roots_pem,
            trust_domain,
            issuing,
            registry: Mutex::new(registry),
            metrics: Mutex::new(Metrics::new()),
            traces: Mutex::new(traces),
            policies,
            audit,
            registry_changed: watch::Sender::new(0),
            registry_push: watch::Sender::new(0),
            registry_full: Mutex::new(None),
            registry_deltas: Mutex::default(),
            cloud: std::sync::OnceLock::new(),
            otlp: std::sync::OnceLock::new(),
            signing: tokio::sync::Semaphore::new(1),
        }
    }

    /// Reports to `cloud` from now on.
    pub(crate) fn set_cloud(&self, cloud: Bridge) {
        let _ = self.cloud.set(cloud);
    }

    /// The cloud bridge, if any.
    pub(crate) fn cloud(&self) -> Option<&Bridge> {
        self.cloud.get()
    }

    /// Exports spans through `exporter` from now on.
    pub(crate) fn set_otlp(&self, exporter: crate::otlp::Exporter) {
        let _ = self.otlp.set(exporter);
    }

    /// The OTLP exporter, if any.
    pub(crate) fn otlp(&self) -> Option<&crate::otlp::Exporter> {
        self.otlp.get()
    }

    pub(crate) fn registry(&self) -> MutexGuard<'_, Registry> {
        lock(&self.registry)
    }

    pub(crate) fn metrics(&self) -> MutexGuard<'_, Metrics> {
        lock(&self.metrics)
    }

    pub(crate) fn traces(&self) -> MutexGuard<'_, Traces> {
        lock(&self.traces)
    }

    /// Marks down and removes silent nodes, every 250 ms until `stop` changes; and at most every
    /// [`REGISTRY_PUSH_EVERY`], has every session send what changed in the registry.
    pub(crate) async fn sweep_loop(&self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut pushed = Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let (changed, revision) = {
                let mut registry = self.registry();
                (registry.sweep(Instant::now()), registry.revision())
            };
            if changed {
                self.registry_changed.send_modify(|v| *v += 1);
            }
            if pushed.elapsed() >= REGISTRY_PUSH_EVERY && *self.registry_push.borrow() != revision {
                pushed = Instant::now();
                self.registry_push.send_replace(revision);
            }
        }
    }

    /// A node's control stream, from its hello to its end.
    ///
    /// An `async` block rather than an `async fn`: an `async fn` keeps its arguments twice in
    /// its state (as taken, and as moved into its body), and a session lives as long as its node.
    /// With [`ControlPlane::follow`]'s own care, a session's state is 880 bytes instead of 1,368
    /// (`cargo +nightly rustc --release -p mesh-gateway --lib -- -Zprint-type-sizes`): about
    /// 7 MiB less at 10,000 nodes.
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    fn session(
        self: Arc<Self>,
        claims: Arc<CertificateClaims>,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        mut reader: FrameReader,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let name = claims.id.node_name().as_str().to_owned();
            // Boxed, and a step of its own: the session lives as long as its node, and would
            // otherwise keep room for the hello it no longer needs.
            let joined = Box::pin(self.join(&claims, remote, &mut send, &mut reader, &name)).await;
            let Some(sent) = joined else {
                return;
            };
            let result = self
                .follow(&name, &claims, &mut send, &mut reader, sent)
                .await;
            if let Err(e) = result {
                info!("control stream of {name} ended: {e}");
            }
            self.registry().handle_closed(&name, Instant::now());
            self.registry_changed.send_modify(|v| *v += 1);
        }
    }

    /// A node's hello read and checked, the node recorded, and the first frames sent: the clock,
    /// the trust bundle. Returns the policy bundle the node holds; `None` if the session is over.
    async fn join(
        &self,
        claims: &CertificateClaims,
        remote: SocketAddr,
        send: &mut quinn::SendStream,
        reader: &mut FrameReader,
        name: &str,
    ) -> Option<Option<BundleRef>> {
        let caller = &claims.id;
        let hello = match tokio::time::timeout(Duration::from_secs(5), read_up(reader)).await {
            Ok(Ok(Up::Hello(h))) => h,
            _ => {
                warn!("control stream from {caller} at {remote} sent no hello");
                return None;
            }
        };
        if let Err(over) = crate::registry::check_hello(&hello) {
            warn!(
                "control stream from {caller} at {remote} refused: its hello says too much: {over}"
            );
            self.audit
                .record(name, "hello_refused", vec![("reason".into(), over)]);
            return None;
        }
        self.registry()
            .handle_hello(name, &caller.to_string(), &hello, Instant::now());
        self.registry().set_certificate(
            name,
            CertificateInfo {
                serial: claims.serial.clone(),
                not_after: claims.not_after,
                labels: claims
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                root: claims.root_key_id.clone(),
            },
        );
        self.metrics()
            .handle_hello(name, hello.boot_id, hello.lost_at_restart);
        self.registry_changed.send_modify(|v| *v += 1);
        if hello.policy_damaged {
            warn!(
                "node {name} found its saved policy damaged and refuses every call until it gets a good bundle"
            );
            self.audit.record(
                name,
                "policy_damaged",
                vec![("reported_by".into(), name.to_owned())],
            );
        }
        info!(
            "node {name} joined the control plane (policy version {})",
            hello.policy_version
        );

        // The trust bundle first: during a CA rotation it brings the new root before anything
        // issued under it arrives.
        let first = {
            let time = Down::Time {
                unix_ms: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            };
            let bundle = Down::TrustBundle {
                roots_pem: self.roots_pem.clone(),
            };
            let mut first = Vec::new();
            mesh_proto::encode_frame_vec(&time, &mut first);
            mesh_proto::encode_frame_vec(&bundle, &mut first);
            first
        };
        if let Err(e) = send.write_all(&first).await {
            info!("control stream of {name} ended: {e}");
            self.registry().handle_closed(name, Instant::now());
            return None;
        }
        // What the node holds: a bundle is sent when it is not that one.
        Some(hello.policy)
    }

    /// A joined node's session: its reports read and answered, policies and registry changes
    /// sent, until the stream ends. A session lives as long as its node (10,000 of them on one
    /// gateway), so its state stays small: what a wake asks for is decided without awaiting, and
    /// the one write it makes, if any, comes after (a wait holds no frame, a write no wake).
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn's state holds its arguments twice"
    )]
    fn follow<'a>(
        self: &'a Arc<Self>,
        name: &'a str,
        claims: &'a Arc<CertificateClaims>,
        send: &'a mut quinn::SendStream,
        reader: &'a mut FrameReader,
        mut sent: Option<BundleRef>,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'a {
        async move {
            let mut policy_rx = self.policies.subscribe();
            policy_rx.mark_changed();
            // The whole registry first, then what changed, as the pushes come.
            let mut registry_rx = self.registry_push.subscribe();
            let (frame, mut registry_sent) = self.registry_frame();
            // The whole frame may be up to a push period old: catch up at once, not at the next
            // change (there may be none for a long time).
            registry_rx.mark_changed();
            send.write_chunk(frame).await.map_err(|e| e.to_string())?;
            // Telemetry acks waiting for the cloud queue, in order.
            let mut held_acks: HeldAcks = std::collections::VecDeque::new();
            loop {
                // In a block of its own: the wake (a report can be large) is gone before any
                // write is awaited.
                let next = {
                    let wake = tokio::select! {
                        up = read_up(reader) => Wake::Up(up?),
                        () = first_committed(&mut held_acks), if !held_acks.is_empty() => Wake::Committed,
                        r = policy_rx.changed() => r.map(|()| Wake::Policy).map_err(|e| e.to_string())?,
                        r = registry_rx.changed() => r.map(|()| Wake::Registry).map_err(|e| e.to_string())?,
                    };
                    match wake {
                        Wake::Up(Up::Renew { csr_der }) => {
                            self.registry().handle_seen(name, Instant::now());
                            Next::Renew(csr_der)
                        }
                        Wake::Up(up) => match self.handle_up(name, up, sent) {
                            // The node's batch is acknowledged once the cloud's copy is on disk
                            // (or could not be written: that loss is counted and told to the
                            // cloud); meanwhile the session goes on. Acks are cumulative for the
                            // node: a later one waits behind a held one.
                            (Some(down), Some(committed)) => {
                                held_acks.push_back((down, Some(committed)));
                                Next::Nothing
                            }
                            (Some(down @ Down::TelemetryAck { .. }), None)
                                if !held_acks.is_empty() =>
                            {
                                held_acks.push_back((down, None));
                                Next::Nothing
                            }
                            (Some(down), None) => Next::Write(encode_down(&down)),
                            (None, _) => Next::Nothing,
                        },
                        Wake::Committed => match held_acks.pop_front() {
                            Some((down, _)) => Next::Write(encode_down(&down)),
                            None => Next::Nothing,
                        },
                        Wake::Policy => {
                            let bundle = policy_rx.borrow_and_update().clone();
                            match bundle {
                                Some(b) if sent != Some(b.id) => {
                                    sent = Some(b.id);
                                    Next::Write(encode_down(&Down::Policy {
                                        version: b.id.version,
                                        toml: b.toml.to_string(),
                                        epoch: b.id.epoch,
                                        hash: b.id.hash,
                                    }))
                                }
                                _ => Next::Nothing,
                            }
                        }
                        // At most one registry push per node per period, however busy the fleet:
                        // the entries that changed since this node's last one, encoded once for
                        // every node that had the same.
                        Wake::Registry => {
                            let (frame, revision) = self.registry_delta(registry_sent);
                            registry_sent = revision;
                            frame.map_or(Next::Nothing, Next::Write)
                        }
                    }
                };
                let out = match next {
                    Next::Nothing => continue,
                    Next::Write(out) => out,
                    // Signing takes a fraction of a millisecond of CPU: done on a blocking
                    // thread, one at a time, so that a burst of renewals never holds up the
                    // runtime that keeps every node's connection alive. Boxed: rare.
                    Next::Renew(csr) => encode_down(
                        &Box::pin(self.clone().renew_off_thread(claims.clone(), csr)).await,
                    ),
                };
                send.write_chunk(out).await.map_err(|e| e.to_string())?;
            }
        }
    }

    /// The whole registry as one `Down::Registry` frame, and its revision. The frame is made
    /// again at most every [`REGISTRY_PUSH_EVERY`] (a fleet joining changes it all the time): a
    /// session that gets an older one catches up with the next delta.
    fn registry_frame(&self) -> (Frame, u64) {
        let mut cached = lock(&self.registry_full);
        if let Some((revision, made, frame)) = cached.as_ref()
            && (made.elapsed() < REGISTRY_PUSH_EVERY || *revision == self.registry().revision())
        {
            return (frame.clone(), *revision);
        }
        let (entries, revision) = {
            let registry = self.registry();
            (registry.entries(), registry.revision())
        };
        let frame = Frame::from(registry_frames(entries));
        *cached = Some((revision, Instant::now(), frame.clone()));
        (frame, revision)
    }

    /// What changed since revision `from`, as a `Down::Registry` frame of those entries only
    /// (nodes add what they are sent), and the revision it brings a node to; `None` when
    /// nothing changed. The whole registry when the changes since `from` are not all
    /// remembered.
    fn registry_delta(&self, from: u64) -> (Option<Frame>, u64) {
        let mut deltas = lock(&self.registry_deltas);
        let (changed, revision) = {
            let registry = self.registry();
            let revision = registry.revision();
            if revision == from {
                return (None, from);
            }
            if deltas.0 == revision
                && let Some(frame) = deltas.1.get(&from)
            {
                return (Some(frame.clone()), revision);
            }
            (registry.changed_since(from), revision)
        };
        let Some(entries) = changed else {
            drop(deltas);
            let (frame, revision) = self.registry_frame();
            return (Some(frame), revision);
        };
        let frame = Frame::from(registry_frames(entries));
        if deltas.0 != revision {
            *deltas = (revision, std::collections::HashMap::new());
        }
        // Bounded: sessions share a few starting points (the last push, the last whole frame).
        if deltas.1.len() < 64 {
            deltas.1.insert(from, frame.clone());
        }
        (Some(frame), revision)
    }

    /// Handles one frame from node `name`, which was last sent bundle `sent`.
    fn handle_up(
        &self,
        name: &str,
        up: Up,
        sent: Option<BundleRef>,
    ) -> (Option<Down>, Option<oneshot::Receiver<bool>>) {
        // A protocol 1 node answers with the version only: it means the bundle it was sent.
        let named = |version: u64, epoch: u64, hash: [u8; 32]| match sent {
            Some(s) if epoch == 0 && hash == [0; 32] && s.version == version => s,
            _ => BundleRef {
                epoch,
                version,
                hash,
            },
        };
        self.registry().handle_seen(name, Instant::now());
        let down = match up {
            Up::Heartbeat => None,
            Up::Hello(hello) => {
                if let Err(over) = crate::registry::check_hello(&hello) {
                    warn!("node {name} said hello again with too much, ignored: {over}");
                    self.audit
                        .record(name, "hello_refused", vec![("reason".into(), over)]);
                    return (None, None);
                }
                self.registry().handle_rehello(name, &hello, Instant::now());
                self.registry_changed.send_modify(|v| *v += 1);
                None
            }
            Up::PolicyAck {
                version,
                epoch,
                hash,
            } => {
                let bundle = named(version, epoch, hash);
                self.registry().handle_policy_answer(name, bundle, Ok(()));
                self.policy_answer_to_cloud(name, bundle, None);
                None
            }
            Up::PolicyNack {
                version,
                reason,
                epoch,
                hash,
            } => {
                warn!("node {name} refused policy version {version}: {reason}");
                let bundle = named(version, epoch, hash);
                self.policy_answer_to_cloud(name, bundle, Some(&reason));
                self.registry()
                    .handle_policy_answer(name, bundle, Err(reason));
                None
            }
            // The session signs renewals off the runtime thread before frames reach here.
            Up::Renew { .. } => None,
            Up::Telemetry(batch) => {
                let seq = batch.seq;
                let (stored, boot, lost_before, first) = {
                    let mut metrics = self.metrics();
                    let first = metrics.last_seq(name) == 0;
                    (
                        metrics.handle_batch(name, &batch),
                        metrics.boot_id(name),
                        metrics.lost_at_restart(name),
                        first,
                    )
                };
                if stored {
                    // The audit events first: the writer takes items in order, so once the
                    // batch's telemetry is on disk, so are they, and the ack waits for it.
                    for event in &batch.audit {
                        self.audit.write(name, event);
                    }
                    // The first batch of an incarnation carries what the one before it lost.
                    let news = !batch.calls.is_empty()
                        || batch.dropped > 0
                        || !batch.audit.is_empty()
                        || (first && lost_before > 0);
                    let cloud = self.cloud().filter(|c| c.telemetry_due(name, news));
                    let committed = cloud.map(|cloud| {
                        cloud.send_telemetry(crate::cloud::report::telemetry(
                            name,
                            boot,
                            lost_before,
                            &batch,
                        ))
                    });
                    let otlp = self.otlp();
                    let mut traces = self.traces();
                    for mut span in batch.spans {
                        // Which node recorded a span is what its certificate says.
                        if span.node != name {
                            span.node = name.to_owned();
                        }
                        if let Some(otlp) = otlp {
                            otlp.push(span.clone());
                        }
                        traces.add(span);
                    }
                    drop(traces);
                    return (Some(Down::TelemetryAck { seq }), committed);
                }
                Some(Down::TelemetryAck { seq })
            }
        };
        (down, None)
    }

    /// A node's ack (`reason` none) or nack of `bundle`, to the cloud's `policy/status`.
    fn policy_answer_to_cloud(&self, name: &str, bundle: BundleRef, reason: Option<&str>) {
        if let Some(cloud) = self.cloud() {
            cloud.send(
                Class::Status,
                "policy/status",
                crate::cloud::report::policy_answer(name, &bundle, reason),
            );
        }
    }

    /// Reports node events, the registry and policy rollouts to `cloud` until `stop` changes:
    /// the registry at most once a second, and only when what it says changed.
    pub(crate) async fn report_to_cloud(&self, cloud: Bridge, mut stop: watch::Receiver<bool>) {
        let mut registry_rx = self.registry_changed.subscribe();
        registry_rx.mark_changed();
        let mut policy_rx = self.policies.subscribe();
        policy_rx.mark_changed();
        let mut last = crate::cloud::report::RegistryView::default();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut dirty = false;
        loop {
            tokio::select! {
                r = registry_rx.changed() => { if r.is_err() { return } dirty = true; }
                r = policy_rx.changed() => {
                    if r.is_err() { return }
                    let bundle = policy_rx.borrow_and_update().clone();
                    if let Some(b) = bundle {
                        cloud.send(Class::Status, "policy/status", crate::cloud::report::rollout(&b.id));
                    }
                }
                _ = tick.tick(), if dirty => {
                    dirty = false;
                    let nodes = self.registry().snapshot();
                    let view = crate::cloud::report::RegistryView::of(&nodes);
                    for (suffix, body) in last.changes_to(&view, cloud.max_publish_bytes()) {
                        cloud.send(Class::Registry, suffix, body);
                    }
                    last = view;
                }
                _ = stop.changed() => return,
            }
        }
    }
}

impl ControlPlane {
    /// A node's renewal request: a new certificate, or why not.
    /// [`ControlPlane::renew`] on a blocking thread, one renewal at a time.
    async fn renew_off_thread(
        self: Arc<Self>,
        claims: Arc<CertificateClaims>,
        csr: Vec<u8>,
    ) -> Down {
        let Ok(_one_at_a_time) = self.signing.acquire().await else {
            return Down::RenewRefused {
                reason: "the gateway is stopping".into(),
                revoked: false,
            };
        };
        let plane = self.clone();
        tokio::task::spawn_blocking(move || plane.renew(&claims, &csr))
            .await
            .unwrap_or_else(|e| Down::RenewRefused {
                reason: format!("the gateway could not sign: {e}"),
                revoked: false,
            })
    }

    fn renew(&self, claims: &CertificateClaims, csr_der: &[u8]) -> Down {
        let Some(issuing) = &self.issuing else {
            return Down::RenewRefused {
                reason: "this gateway has no [issuer] section: it issues no certificates".into(),
                revoked: false,
            };
        };
        let id = claims.id.to_string();
        match issuing.renew(claims, csr_der) {
            Ok(chain_pem) => {
                info!("renewed the certificate of {id}");
                self.audit.record(
                    claims.id.node_name().as_str(),
                    "renewed",
                    vec![
                        ("id".into(), id),
                        ("old_serial".into(), claims.serial.clone()),
                    ],
                );
                Down::Renewed { chain_pem }
            }
            Err(refusal) => {
                warn!("refused to renew {id}: {}", refusal.reason);
                self.audit.record(
                    claims.id.node_name().as_str(),
                    "renewal_refused",
                    vec![("id".into(), id), ("reason".into(), refusal.reason.clone())],
                );
                Down::RenewRefused {
                    reason: refusal.reason,
                    revoked: refusal.revoked,
                }
            }
        }
    }
}

/// The `_control` reserved service of the gateway's node.
pub(crate) struct ControlService(pub(crate) Arc<ControlPlane>);

impl ReservedService for ControlService {
    fn serve(
        &self,
        caller: Arc<CertificateClaims>,
        remote: SocketAddr,
        send: quinn::SendStream,
        reader: FrameReader,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().session(caller, remote, send, reader))
    }
}

/// What a waiting session woke for.
enum Wake {
    Up(Up),
    /// The first held ack may go.
    Committed,
    /// A new policy bundle may be in force.
    Policy,
    /// The registry's entries changed.
    Registry,
}

/// What a session does after a wake, decided without awaiting.
enum Next {
    Nothing,
    /// Send these frames.
    Write(Frame),
    /// Sign this certificate request, and send what comes of it.
    Renew(Vec<u8>),
}

/// Telemetry acks waiting for the cloud queue (`Some`), or behind one that does (`None`).
type HeldAcks = std::collections::VecDeque<(Down, Option<oneshot::Receiver<bool>>)>;

/// Waits until the first held ack may go: its batch is on disk (or could not be written).
async fn first_committed(held: &mut HeldAcks) {
    if let Some((_, Some(committed))) = held.front_mut() {
        let _ = committed.await;
    }
}

/// Registry entries as `Down::Registry` frames of at most about [`REGISTRY_FRAME_BYTES`]
/// each (nodes add what each frame says), so that no frame nears [`MAX_CONTROL_FRAME`] however
/// large the fleet.
fn registry_frames(entries: Vec<mesh_proto::control::RegistryEntry>) -> Vec<u8> {
    // An entry's encoding is its strings plus a length byte or two for each, a few more bytes.
    fn size(e: &mesh_proto::control::RegistryEntry) -> usize {
        let strings = e
            .addrs
            .iter()
            .chain(&e.services)
            .chain(std::iter::once(&e.name));
        let labels = e.labels.iter().flat_map(|(k, v)| [k, v]);
        strings.chain(labels).map(|s| s.len() + 3).sum::<usize>() + 16
    }
    let mut out = Vec::new();
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for e in entries {
        let n = size(&e);
        if bytes + n > REGISTRY_FRAME_BYTES && !chunk.is_empty() {
            mesh_proto::encode_frame_vec(&Down::Registry(std::mem::take(&mut chunk)), &mut out);
            bytes = 0;
        }
        bytes += n;
        chunk.push(e);
    }
    if !chunk.is_empty() || out.is_empty() {
        mesh_proto::encode_frame_vec(&Down::Registry(chunk), &mut out);
    }
    out
}

async fn read_up(reader: &mut FrameReader) -> Result<Up, String> {
    let frame = reader
        .frame(MAX_CONTROL_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    mesh_proto::control::decode_up(&frame).map_err(|e| format!("bad control frame: {e}"))
}

fn encode_down(down: &Down) -> Frame {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(down, &mut out);
    Frame::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::control::RegistryEntry;

    #[test]
    fn a_large_registry_goes_in_frames_a_node_takes() {
        let entries: Vec<RegistryEntry> = (0..20_000)
            .map(|i| RegistryEntry {
                name: format!("node-{i:05}"),
                addrs: vec!["198.18.0.2:7400".into(), "[fd00::2]:7400".into()],
                services: vec!["plc".into(), "modbus".into(), "health".into()],
                labels: vec![("zone".into(), "hall-1".into())],
                up: true,
            })
            .collect();
        let bytes = registry_frames(entries.clone());
        let mut rest = &bytes[..];
        let mut got = Vec::new();
        let mut frames = 0;
        while !rest.is_empty() {
            let (len, header) = mesh_proto::frame_len(rest, MAX_CONTROL_FRAME)
                .expect("a frame within the bound")
                .expect("a whole frame");
            assert!(len <= REGISTRY_FRAME_BYTES + 4096, "a frame of {len} bytes");
            let Down::Registry(part) =
                postcard::from_bytes(&rest[header..header + len]).expect("decodes")
            else {
                panic!("not a registry frame");
            };
            got.extend(part);
            rest = &rest[header + len..];
            frames += 1;
        }
        assert!(frames > 1);
        assert_eq!(got, entries);
        // Nothing to say is still one (empty) frame.
        assert!(!registry_frames(Vec::new()).is_empty());
    }
}
