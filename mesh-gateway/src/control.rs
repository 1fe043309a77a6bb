//! The gateway's side of the control streams: one per node, opened as a call to the reserved
//! service `_control`. A node says hello, then sends heartbeats, policy acks and nacks, and
//! telemetry batches; the gateway pushes the current policy bundle, the registry (at most every
//! [`REGISTRY_PUSH_EVERY`], encoded once for all nodes) and telemetry acks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
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
    registry_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// The cloud bridge, if the gateway has one: telemetry, node events, policy status.
    cloud: std::sync::OnceLock<Bridge>,
    /// The OTLP exporter, if the gateway has one: every span nodes send.
    otlp: std::sync::OnceLock<crate::otlp::Exporter>,
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
            registry_cache: Mutex::new(None),
            cloud: std::sync::OnceLock::new(),
            otlp: std::sync::OnceLock::new(),
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

    /// Marks down and removes silent nodes, every 250 ms until `stop` changes.
    pub(crate) async fn sweep_loop(&self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if self.registry().sweep(Instant::now()) {
                self.registry_changed.send_modify(|v| *v += 1);
            }
        }
    }

    async fn session(
        self: Arc<Self>,
        claims: Arc<CertificateClaims>,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        mut reader: FrameReader,
    ) {
        let caller = &claims.id;
        let name = caller.node_name().as_str().to_owned();
        let hello = match tokio::time::timeout(Duration::from_secs(5), read_up(&mut reader)).await {
            Ok(Ok(Up::Hello(h))) => h,
            _ => {
                warn!("control stream from {caller} at {remote} sent no hello");
                return;
            }
        };
        self.registry()
            .handle_hello(&name, &caller.to_string(), &hello, Instant::now());
        self.registry().set_certificate(
            &name,
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
            .handle_hello(&name, hello.boot_id, hello.lost_at_restart);
        self.registry_changed.send_modify(|v| *v += 1);
        if hello.policy_damaged {
            warn!(
                "node {name} found its saved policy damaged and refuses every call until it gets a good bundle"
            );
            self.audit.record(
                &name,
                "policy_damaged",
                vec![("reported_by".into(), name.clone())],
            );
        }
        info!(
            "node {name} joined the control plane (policy version {})",
            hello.policy_version
        );

        // The trust bundle first: during a CA rotation it brings the new root before anything
        // issued under it arrives.
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
        if let Err(e) = send.write_all(&first).await.map_err(|e| e.to_string()) {
            info!("control stream of {name} ended: {e}");
            self.registry().handle_closed(&name, Instant::now());
            return;
        }
        let mut policy_rx = self.policies.subscribe();
        policy_rx.mark_changed();
        let mut registry_rx = self.registry_changed.subscribe();
        let mut registry_dirty = true;
        let mut registry_tick = tokio::time::interval(REGISTRY_PUSH_EVERY);
        // What the node holds: a bundle is sent when it is not that one.
        let mut sent = hello.policy;
        // Telemetry acks waiting for the cloud queue, in order.
        let mut held_acks: HeldAcks = std::collections::VecDeque::new();
        let result: Result<(), String> = async {
            loop {
                tokio::select! {
                    up = read_up(&mut reader) => {
                        match self.handle_up(&name, &claims, up?, sent) {
                            // The node's batch is acknowledged once the cloud's copy is on
                            // disk (or could not be written: that loss is counted and told to
                            // the cloud); meanwhile the session goes on. Acks are cumulative
                            // for the node: a later one waits behind a held one.
                            (Some(down), Some(committed)) => {
                                held_acks.push_back((down, Some(committed)));
                            }
                            (Some(down @ Down::TelemetryAck { .. }), None)
                                if !held_acks.is_empty() =>
                            {
                                held_acks.push_back((down, None));
                            }
                            (Some(down), None) => write_down(&mut send, &down).await?,
                            (None, _) => {}
                        }
                    }
                    () = first_committed(&mut held_acks), if !held_acks.is_empty() => {
                        if let Some((down, _)) = held_acks.pop_front() {
                            write_down(&mut send, &down).await?;
                        }
                    }
                    r = policy_rx.changed() => {
                        r.map_err(|e| e.to_string())?;
                        let bundle = policy_rx.borrow_and_update().clone();
                        if let Some(b) = bundle
                            && sent != Some(b.id)
                        {
                            sent = Some(b.id);
                            let down = Down::Policy {
                                version: b.id.version,
                                toml: b.toml.to_string(),
                                epoch: b.id.epoch,
                                hash: b.id.hash,
                            };
                            write_down(&mut send, &down).await?;
                        }
                    }
                    r = registry_rx.changed() => {
                        r.map_err(|e| e.to_string())?;
                        registry_dirty = true;
                    }
                    _ = registry_tick.tick(), if registry_dirty => {
                        // At most one registry push per node per period, however busy the fleet,
                        // encoded once for all nodes.
                        registry_dirty = false;
                        let frame = self.registry_frame();
                        send.write_all(&frame).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        .await;
        if let Err(e) = result {
            info!("control stream of {name} ended: {e}");
        }
        self.registry().handle_closed(&name, Instant::now());
        self.registry_changed.send_modify(|v| *v += 1);
    }

    /// The registry as one encoded `Down::Registry` frame, re-encoded only after a change.
    fn registry_frame(&self) -> Arc<Vec<u8>> {
        let epoch = *self.registry_changed.borrow();
        let mut cached = lock(&self.registry_cache);
        if let Some((e, frame)) = cached.as_ref()
            && *e == epoch
        {
            return frame.clone();
        }
        let mut out = Vec::new();
        mesh_proto::encode_frame_vec(&Down::Registry(self.registry().entries()), &mut out);
        let frame = Arc::new(out);
        *cached = Some((epoch, frame.clone()));
        frame
    }

    /// Handles one frame from node `name`, which was last sent bundle `sent`.
    fn handle_up(
        &self,
        name: &str,
        claims: &CertificateClaims,
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
            Up::Renew { csr_der } => Some(self.renew(claims, &csr_der)),
            Up::Telemetry(batch) => {
                let seq = batch.seq;
                let (stored, boot) = {
                    let mut metrics = self.metrics();
                    (metrics.handle_batch(name, &batch), metrics.boot_id(name))
                };
                if stored {
                    // The audit events first: the writer takes items in order, so once the
                    // batch's telemetry is on disk, so are they, and the ack waits for it.
                    for event in &batch.audit {
                        self.audit.write(name, event);
                    }
                    let news =
                        !batch.calls.is_empty() || batch.dropped > 0 || !batch.audit.is_empty();
                    let cloud = self.cloud().filter(|c| c.telemetry_due(name, news));
                    let committed = cloud.map(|cloud| {
                        cloud.send_telemetry(crate::cloud::report::telemetry(name, boot, &batch))
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
                    let view = crate::cloud::report::RegistryView::of(&self.registry());
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

/// Telemetry acks waiting for the cloud queue (`Some`), or behind one that does (`None`).
type HeldAcks = std::collections::VecDeque<(Down, Option<oneshot::Receiver<bool>>)>;

/// Waits until the first held ack may go: its batch is on disk (or could not be written).
async fn first_committed(held: &mut HeldAcks) {
    if let Some((_, Some(committed))) = held.front_mut() {
        let _ = committed.await;
    }
}

async fn read_up(reader: &mut FrameReader) -> Result<Up, String> {
    let frame = reader
        .frame(MAX_CONTROL_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    mesh_proto::control::decode_up(&frame).map_err(|e| format!("bad control frame: {e}"))
}

async fn write_down(send: &mut quinn::SendStream, down: &Down) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(down, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}

/// Locks a mutex; a panic while it was held (a bug) does not stop the gateway from serving.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
