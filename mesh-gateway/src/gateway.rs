//! The gateway: a node that is also the site's control plane. This module builds the parts and
//! starts them; each lives in its own module:
//!
//! - [`crate::control`]: the control streams of the nodes, the registry and telemetry they feed.
//! - [`crate::policy`]: the versioned policy bundle, reloaded from its file or set by the API.
//! - [`crate::audit`]: the JSON-lines audit log.
//! - [`crate::http`]: the admin API and `/metrics`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mesh_node::{Identity, Node, NodeOptions, StartError};
use tracing::info;

use crate::audit::AuditLog;
use crate::ca::issuing::Issuing;
use crate::cloud::{BoxFuture, Bridge, Downlink};
use crate::config::GatewayConfig;
use crate::control::{ControlPlane, ControlService};
use crate::policy::Policies;
use crate::registry::Registry;
use crate::traces::Traces;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The node underneath could not start.
    #[error("{0}")]
    Start(#[from] StartError),
    /// The policy file, the deny list or the issuer is invalid.
    #[error("{0}")]
    Config(#[from] mesh_core::source::ConfigError),
    /// A file could not be read or written, or a socket bound.
    #[error("{path}: {reason}")]
    Io {
        /// The file, or the config key of the address.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// A running gateway.
#[derive(Clone)]
pub struct Gateway {
    node: Node,
    plane: Arc<ControlPlane>,
    admin: SocketAddr,
    /// The admin API's own thread.
    admin_thread: crate::http::Running,
}

impl Gateway {
    /// Starts the gateway described by `config`.
    pub async fn start(config: GatewayConfig, identity: Identity) -> Result<Gateway, GatewayError> {
        let token = admin_token(&config.admin_token_file)?;
        let issuer = config.load_issuer()?;
        let cloud = match &config.cloud {
            Some(c) => Some(
                Bridge::open(
                    c,
                    &config.node.file,
                    config.node.name.as_str(),
                    identity.trust_domain(),
                    &config.node.state_dir.join("gateway"),
                )
                .map_err(|reason| GatewayError::Io {
                    path: format!("{}: [cloud]", config.node.file),
                    reason,
                })?,
            ),
            None => None,
        };
        config.check_otlp_files()?;
        let otlp = match &config.otlp {
            Some(o) => Some(
                crate::otlp::Exporter::new(o, config.node.name.as_str(), identity.trust_domain())
                    .map_err(|reason| GatewayError::Io {
                    path: format!("{}:{}: [otlp]", config.node.file, o.line),
                    reason,
                })?,
            ),
            None => None,
        };
        let mut audit = AuditLog::open(&config.audit_log);
        if let Some(cloud) = cloud.clone() {
            audit.forward_to(Box::new(move |event| {
                let event = crate::cloud::report::audit_for_cloud(event);
                cloud.send(crate::cloud::Class::Audit, "audit", event);
            }));
        }
        let audit = Arc::new(audit);
        let policy_file = match &config.policy {
            Some(file) => {
                let text = mesh_node::config::read_regular_file(&file.value).map_err(|reason| {
                    GatewayError::Io {
                        path: format!(
                            "{}:{}: policy: {}",
                            config.node.file,
                            file.line,
                            file.value.display()
                        ),
                        reason,
                    }
                })?;
                Some((file.value.as_path(), text))
            }
            None => None,
        };
        let policies = Arc::new(Policies::load(
            &config.node.state_dir.join("gateway"),
            policy_file,
            audit.clone(),
        )?);
        let issuing = match (issuer, &config.issuer) {
            (Some(ca), Some(section)) => Some(Arc::new(
                Issuing::new(
                    ca,
                    section.lifetime,
                    section.grace,
                    identity.chain(),
                    &config.node.state_dir.join("gateway"),
                    policies.clone(),
                    audit.clone(),
                )
                .map_err(|reason| GatewayError::Io {
                    path: format!("{}: [issuer]", config.node.file),
                    reason,
                })?,
            )),
            _ => None,
        };
        let plane = Arc::new(ControlPlane::new(
            Registry::new(config.down_after, config.remove_after),
            Traces::new(config.max_traces),
            policies.clone(),
            audit.clone(),
            identity.trust_domain().to_owned(),
            issuing.clone(),
            std::fs::read_to_string(&config.node.identity.ca.value).map_err(|e| {
                GatewayError::Io {
                    path: config.node.identity.ca.value.display().to_string(),
                    reason: e.to_string(),
                }
            })?,
        ));
        let options = NodeOptions {
            gateway: true,
            reserved: vec![(
                mesh_proto::control::CONTROL_SERVICE,
                Arc::new(ControlService(plane.clone())),
            )],
            revoked: policies.enforced(),
            enrolment: issuing.map(|i| {
                Arc::new(crate::ca::issuing::EnrollService(i)) as Arc<dyn mesh_node::EnrollService>
            }),
            ..NodeOptions::default()
        };
        let node = Node::start_with(config.node.clone(), identity, options).await?;
        if let Some(addr) = config.node.ingress {
            let bound = mesh_node::ingress::serve(node.clone(), addr)
                .await
                .map_err(|e| GatewayError::Io {
                    path: format!("{}: ingress = \"{addr}\"", config.node.file),
                    reason: format!("cannot listen: {e}"),
                })?;
            info!("ingress listening on http://{bound}");
            node.record_address("ingress", bound);
        }
        for forward in &config.node.forwards {
            let listen = forward.listen;
            mesh_node::forward::serve(node.clone(), forward.clone())
                .await
                .map_err(|e| GatewayError::Io {
                    path: format!(
                        "{}: line {}: forward on {listen}",
                        config.node.file, forward.line
                    ),
                    reason: format!("cannot listen: {e}"),
                })?;
        }
        let tokens = Arc::new(crate::admin_tokens::AdminTokens::open(
            token,
            &config
                .node
                .state_dir
                .join("gateway")
                .join("admin-tokens.json"),
        ));
        if let Some(why) = tokens.damaged() {
            tracing::error!(
                "named admin tokens are off: {why} (the gateway's own token still works; fix or \
                 remove the file)"
            );
            audit.record(
                "gateway",
                "admin_tokens_damaged",
                vec![("reason".into(), why)],
            );
        }
        let (admin, admin_thread) = crate::http::serve(
            plane.clone(),
            tokens,
            config.admin,
            &config.node.limits.ingress,
            node.shutdown_signal(),
        )
        .await
        .map_err(|e| GatewayError::Io {
            path: format!("admin {}", config.admin),
            reason: e.to_string(),
        })?;
        info!("admin API and /metrics on http://{admin}");
        node.record_address("admin", admin);
        if let Some(b) = policies.current() {
            info!(
                "serving policy version {} (epoch {})",
                b.id.version, b.id.epoch
            );
        }
        {
            let plane = plane.clone();
            let stop = node.shutdown_signal();
            tokio::spawn(async move { plane.sweep_loop(stop).await });
        }
        if let Some(otlp) = otlp {
            otlp.start(node.shutdown_signal());
            plane.set_otlp(otlp);
        }
        if let Some(cloud) = &cloud {
            plane.set_cloud(cloud.clone());
            let downlink = Arc::new(GatewayDownlink {
                policies: policies.clone(),
                audit: audit.clone(),
                node: node.clone(),
                cloud_named: std::sync::Mutex::new(None),
            });
            cloud.start(downlink, node.shutdown_signal());
            let (plane, cloud, stop) = (plane.clone(), cloud.clone(), node.shutdown_signal());
            tokio::spawn(async move { plane.report_to_cloud(cloud, stop).await });
        }
        // The gateway's own node enforces the deny list it serves.
        {
            let (node, policies) = (node.clone(), policies.clone());
            let mut changes = policies.subscribe();
            let mut stop = node.shutdown_signal();
            node.set_revoked(policies.enforced());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return },
                        _ = stop.changed() => return,
                    }
                    node.set_revoked(policies.enforced());
                }
            });
        }
        if let Some(file) = config.policy.clone() {
            let stop = node.shutdown_signal();
            tokio::spawn(async move { policies.watch_file(file.value, stop).await });
        }
        Ok(Gateway {
            node,
            plane,
            admin,
            admin_thread,
        })
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
        self.plane.policies.version()
    }

    /// Total calls the gateway has counted.
    pub fn total_calls(&self) -> u64 {
        self.plane.metrics().total_calls()
    }

    /// Validates `toml` and, if it differs from the current bundle, makes it the next version and
    /// pushes it to every node. `source` names it in errors.
    pub async fn set_policy(
        &self,
        toml: &str,
        source: &str,
    ) -> Result<u64, mesh_core::source::ConfigError> {
        self.plane
            .policies
            .set(toml, source, crate::policy::Origin::Api)
            .await
    }

    /// Stops serving.
    ///
    /// Returns once the admin API has stopped too (it runs on a thread of its own), or after
    /// 5 s.
    pub async fn shutdown(&self) {
        self.node.shutdown().await;
        self.admin_thread
            .stopped(std::time::Duration::from_secs(5))
            .await;
    }
}

/// What the cloud bridge may do to the gateway: apply a signed bundle (as `PUT /v1/policy`
/// does), make calls into the mesh as the cloud, record audit events.
struct GatewayDownlink {
    policies: Arc<Policies>,
    audit: Arc<AuditLog>,
    node: Node,
    /// For the bundle (by its hash): whether an allow rule names a cloud caller.
    cloud_named: std::sync::Mutex<Option<([u8; 32], bool)>>,
}

impl GatewayDownlink {
    /// Whether the policy in force has an allow rule that names the cloud as a caller
    /// (`spiffe://<td>/cloud/...`, not a glob that merely matches it). Until one does, calls
    /// from the cloud are off: turning on `[cloud]` on a site with a permissive policy does not
    /// open every service to whoever can publish on the broker.
    fn cloud_named(&self) -> bool {
        let Some(bundle) = self.policies.current() else {
            return false;
        };
        let mut cached = self.cloud_named.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((hash, named)) = *cached
            && hash == bundle.id.hash
        {
            return named;
        }
        {
            let named =
                mesh_core::policy::Policy::parse(&bundle.operator, "bundle").is_ok_and(|p| {
                    p.authz.rules.iter().any(|r| {
                        r.effect == mesh_core::authz::Effect::Allow
                            && r.callers.iter().any(|c| {
                                c.strip_prefix("spiffe://")
                                    .and_then(|rest| rest.split_once('/'))
                                    .is_some_and(|(_, path)| path.starts_with("cloud/"))
                            })
                    })
                });
            *cached = Some((bundle.id.hash, named));
            named
        }
    }
}

impl Downlink for GatewayDownlink {
    fn set_policy(&self, toml: String) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async move {
            self.policies
                .set(&toml, "policy from the cloud", crate::policy::Origin::Cloud)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn call(
        &self,
        service: String,
        method: String,
        body: bytes::Bytes,
        options: mesh_node::CallOptions,
    ) -> BoxFuture<'_, (mesh_proto::Status, String, bytes::Bytes)> {
        Box::pin(async move {
            if !self.cloud_named() {
                return (
                    mesh_proto::Status::PermissionDenied,
                    "calls from the cloud are off: no allow rule of the policy names the cloud \
                     as a caller (callers = [\"spiffe://<trust-domain>/cloud/<client_id>\"])"
                        .into(),
                    bytes::Bytes::new(),
                );
            }
            let reply = self.node.call_with(&service, &method, body, &options).await;
            (reply.status, reply.message, reply.body)
        })
    }

    fn audit(&self, kind: &str, fields: Vec<(String, String)>) {
        self.audit.record("gateway", kind, fields);
    }
}

/// Refuses a secret readable by others, as ssh does with keys.
fn check_private(path: &Path) -> Result<(), GatewayError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| GatewayError::Io {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(GatewayError::Io {
                path: path.display().to_string(),
                reason: format!(
                    "the admin token file has mode {:04o}: it must be readable by its owner only \
                     (chmod 600)",
                    mode & 0o777
                ),
            });
        }
    }
    Ok(())
}

/// The admin token: read from `path`, or made (32 random bytes, hex) and written there mode 0600.
/// Never logged.
fn admin_token(path: &Path) -> Result<String, GatewayError> {
    let io = |e: std::io::Error| GatewayError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => {
            check_private(path)?;
            return Ok(t.trim().to_owned());
        }
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
