//! The gateway: a node that is also the site's control plane.
//!
//! It serves control streams from nodes (hello, heartbeats, policy acks and nacks, telemetry),
//! keeps the registry, versions the policy bundle and pushes it to every node, aggregates
//! telemetry for `/metrics`, keeps recent traces, and appends audit events to a JSON-lines file.
//! The HTTP API is in [`crate::admin`].

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mesh_core::SpiffeId;
use mesh_node::config::{ConfigError, NodeConfig};
use mesh_node::node::{ControlHandler, NodeOptions};
use mesh_node::policy::{Policy, PolicyStore};
use mesh_node::wire::FrameReader;
use mesh_node::{Identity, Node, StartError};
use mesh_proto::control::{AuditEvent, Down, MAX_CONTROL_FRAME, Up};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::traces::Traces;

/// How often, at most, each node is sent the registry when it changed.
const REGISTRY_PUSH_EVERY: Duration = Duration::from_secs(2);

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The file is not a gateway config.
    #[error("{0}: not a gateway config")]
    NotGateway(String),
    /// The node underneath could not start.
    #[error("{0}")]
    Start(#[from] StartError),
    /// The policy file is invalid.
    #[error("{0}")]
    Policy(#[from] ConfigError),
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// A running gateway.
#[derive(Clone)]
pub struct Gateway {
    node: Node,
    state: Arc<State>,
    admin: SocketAddr,
}

/// Everything the control plane holds.
pub(crate) struct State {
    pub(crate) registry: Mutex<Registry>,
    pub(crate) metrics: Mutex<Metrics>,
    pub(crate) traces: Mutex<Traces>,
    /// The current bundle: (version, TOML); version 0 means none.
    pub(crate) policy: watch::Sender<(u64, Arc<String>)>,
    store: PolicyStore,
    registry_changed: watch::Sender<u64>,
    registry_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    audit: Mutex<Option<std::fs::File>>,
    pub(crate) token: String,
}

impl Gateway {
    /// Starts the gateway described by `config` (loaded with `Kind::Gateway`).
    pub async fn start(config: NodeConfig, identity: Identity) -> Result<Gateway, GatewayError> {
        let settings = config
            .gateway_role
            .clone()
            .ok_or_else(|| GatewayError::NotGateway(config.file.clone()))?;
        let token = admin_token(&settings.admin_token_file)?;
        let store = PolicyStore::new(&config.state_dir.join("gateway"));
        let (mut version, mut toml) = store.load().unwrap_or((0, String::new()));
        if let Some(file) = &settings.policy {
            let text = std::fs::read_to_string(&file.value).map_err(|e| GatewayError::Io {
                path: file.value.display().to_string(),
                reason: e.to_string(),
            })?;
            Policy::parse(&text, &file.value.display().to_string())?;
            if text != toml || version == 0 {
                version += 1;
                toml = text;
                save_policy(&store, version, &toml);
            }
        }
        let audit = open_audit(&settings.audit_log);
        let state = Arc::new(State {
            registry: Mutex::new(Registry::new(settings.down_after, settings.remove_after)),
            metrics: Mutex::new(Metrics::new()),
            traces: Mutex::new(Traces::new(settings.max_traces)),
            policy: watch::Sender::new((version, Arc::new(toml))),
            store,
            registry_changed: watch::Sender::new(0),
            registry_cache: Mutex::new(None),
            audit: Mutex::new(audit),
            token,
        });
        let options = NodeOptions {
            gateway: true,
            control: Some(Arc::new(Handler(state.clone()))),
            ..NodeOptions::default()
        };
        let node = Node::start_with(config, identity, options).await?;
        let admin =
            crate::admin::serve(state.clone(), settings.admin, node.shutdown_signal()).await?;
        info!("admin API and /metrics on http://{admin}");
        if version > 0 {
            info!("serving policy version {version}");
        }
        let gateway = Gateway { node, state, admin };
        tokio::spawn(gateway.clone().sweep_loop());
        if let Some(file) = settings.policy.clone() {
            tokio::spawn(gateway.clone().watch_policy(file.value));
        }
        Ok(gateway)
    }

    /// The node underneath.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The current policy version (0: none).
    pub fn policy_version(&self) -> u64 {
        self.state.policy.borrow().0
    }

    /// Total calls the gateway has counted.
    pub fn total_calls(&self) -> u64 {
        lock(&self.state.metrics).total_calls()
    }

    /// Validates `toml` and, if it differs from the current bundle, makes it the next version and
    /// pushes it to every node. `source` names it in errors.
    pub fn set_policy(&self, toml: &str, source: &str) -> Result<u64, ConfigError> {
        self.state.set_policy(toml, source)
    }

    /// Stops serving.
    pub async fn shutdown(&self) {
        self.node.shutdown().await;
    }

    async fn sweep_loop(self) {
        let mut stop = self.node.shutdown_signal();
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            if lock(&self.state.registry).sweep(Instant::now()) {
                self.state.registry_changed.send_modify(|v| *v += 1);
            }
        }
    }

    /// Reloads the policy file when it changes (checked every second).
    async fn watch_policy(self, path: PathBuf) {
        let mut stop = self.node.shutdown_signal();
        let mut last = std::fs::read_to_string(&path).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if last.as_deref() == Some(text.as_str()) {
                continue;
            }
            last = Some(text.clone());
            match self.state.set_policy(&text, &path.display().to_string()) {
                Ok(v) => info!("policy file changed: version {v}"),
                Err(e) => {
                    warn!("policy file changed but is invalid, keeping the current bundle: {e}");
                    self.state.audit(
                        "gateway",
                        "policy_rejected",
                        vec![("reason".into(), e.to_string())],
                    );
                }
            }
        }
    }
}

impl State {
    pub(crate) fn set_policy(&self, toml: &str, source: &str) -> Result<u64, ConfigError> {
        Policy::parse(toml, source)?;
        let mut version = 0;
        self.policy.send_if_modified(|(v, current)| {
            if current.as_str() == toml && *v > 0 {
                version = *v;
                return false;
            }
            *v += 1;
            *current = Arc::new(toml.to_owned());
            version = *v;
            true
        });
        save_policy(&self.store, version, toml);
        self.audit(
            "gateway",
            "policy_accepted",
            vec![("version".into(), version.to_string())],
        );
        Ok(version)
    }

    /// Appends an audit event to the JSON-lines file.
    pub(crate) fn audit(&self, node: &str, kind: &str, fields: Vec<(String, String)>) {
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.write_audit(
            node,
            &AuditEvent {
                unix_ms,
                kind: kind.to_owned(),
                fields,
            },
        );
    }

    fn write_audit(&self, node: &str, event: &AuditEvent) {
        let mut line = serde_json::Map::new();
        line.insert("unix_ms".into(), event.unix_ms.into());
        line.insert("node".into(), node.into());
        line.insert("kind".into(), event.kind.clone().into());
        for (k, v) in &event.fields {
            line.insert(k.clone(), v.clone().into());
        }
        if let Some(file) = lock(&self.audit).as_mut() {
            let _ = writeln!(file, "{}", serde_json::Value::Object(line));
        }
    }

    async fn session(
        self: Arc<Self>,
        caller: SpiffeId,
        remote: SocketAddr,
        mut send: quinn::SendStream,
        mut reader: FrameReader,
    ) {
        let name = caller.node_name().as_str().to_owned();
        let hello = match tokio::time::timeout(Duration::from_secs(5), read_up(&mut reader)).await {
            Ok(Ok(Up::Hello(h))) => h,
            _ => {
                warn!("control stream from {caller} at {remote} sent no hello");
                return;
            }
        };
        lock(&self.registry).handle_hello(&name, &caller.to_string(), &hello, Instant::now());
        self.registry_changed.send_modify(|v| *v += 1);
        info!(
            "node {name} joined the control plane (policy version {})",
            hello.policy_version
        );

        let mut policy_rx = self.policy.subscribe();
        policy_rx.mark_changed();
        let mut registry_rx = self.registry_changed.subscribe();
        let mut registry_dirty = true;
        let mut registry_tick = tokio::time::interval(REGISTRY_PUSH_EVERY);
        let mut sent_version = hello.policy_version;
        let result: Result<(), String> = async {
            loop {
                tokio::select! {
                    up = read_up(&mut reader) => {
                        if let Some(down) = self.handle_up(&name, up?) {
                            write_down(&mut send, &down).await?;
                        }
                    }
                    r = policy_rx.changed() => {
                        r.map_err(|e| e.to_string())?;
                        let (version, toml) = policy_rx.borrow_and_update().clone();
                        if version > sent_version {
                            sent_version = version;
                            write_down(&mut send, &Down::Policy { version, toml: toml.to_string() }).await?;
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
        lock(&self.registry).handle_closed(&name, Instant::now());
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
        mesh_proto::encode_frame_vec(&Down::Registry(lock(&self.registry).entries()), &mut out);
        let frame = Arc::new(out);
        *cached = Some((epoch, frame.clone()));
        frame
    }

    fn handle_up(&self, name: &str, up: Up) -> Option<Down> {
        lock(&self.registry).handle_seen(name, Instant::now());
        match up {
            Up::Hello(_) | Up::Heartbeat => None,
            Up::PolicyAck { version } => {
                lock(&self.registry).handle_policy_answer(name, version, Ok(()));
                None
            }
            Up::PolicyNack { version, reason } => {
                warn!("node {name} refused policy version {version}: {reason}");
                lock(&self.registry).handle_policy_answer(name, version, Err(reason));
                None
            }
            Up::Telemetry(batch) => {
                let seq = batch.seq;
                if lock(&self.metrics).handle_batch(name, &batch) {
                    let mut traces = lock(&self.traces);
                    for span in batch.spans {
                        traces.add(span);
                    }
                    drop(traces);
                    for event in &batch.audit {
                        self.write_audit(name, event);
                    }
                }
                Some(Down::TelemetryAck { seq })
            }
        }
    }
}

struct Handler(Arc<State>);

impl ControlHandler for Handler {
    fn serve(
        &self,
        caller: SpiffeId,
        remote: SocketAddr,
        send: quinn::SendStream,
        reader: FrameReader,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().session(caller, remote, send, reader))
    }
}

async fn read_up(reader: &mut FrameReader) -> Result<Up, String> {
    let frame = reader
        .frame(MAX_CONTROL_FRAME)
        .await
        .map_err(|e| e.to_string())?;
    postcard::from_bytes(&frame).map_err(|e| format!("bad control frame: {e}"))
}

async fn write_down(send: &mut quinn::SendStream, down: &Down) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(down, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}

fn save_policy(store: &PolicyStore, version: u64, toml: &str) {
    if let Err(e) = store.save(version, toml) {
        warn!(
            "cannot save policy version {version} in {}: {e}",
            store.dir().display()
        );
    }
}

fn open_audit(path: &Path) -> Option<std::fs::File> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(
                "cannot open the audit log {}: {e}; audit events are not kept",
                path.display()
            );
            None
        }
    }
}

/// The admin token: read from `path`, or made (32 random bytes, hex) and written there mode 0600.
/// Never logged.
fn admin_token(path: &Path) -> Result<String, GatewayError> {
    let io = |e: std::io::Error| GatewayError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_owned()),
        Ok(_) => {
            return Err(GatewayError::Io {
                path: path.display().to_string(),
                reason: "the admin token file is empty".into(),
            });
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        Err(_) => {}
    }
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(io)?,
        &mut bytes,
    )
    .map_err(io)?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    crate::ca::write_new(path, token.as_bytes(), 0o600).map_err(|e| GatewayError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    info!("made a new admin token in {} (mode 0600)", path.display());
    Ok(token)
}

pub(crate) use mesh_node::node::lock;
