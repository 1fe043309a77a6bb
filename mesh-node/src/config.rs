//! The node's on-device config file (TOML), parsed once into typed values.
//!
//! Every key is documented in `configs/node.example.toml`. Unknown keys, wrong types and bad values
//! are errors that name the file, the line and the key. Relative paths are relative to the config
//! file's folder, so a device bundle can be moved as a whole.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use mesh_core::source::ConfigError;
use mesh_core::source::{SourceMap, check_top_level_keys};
use mesh_core::{NodeName, ServiceName};
use serde::Deserialize;
use toml::Spanned;

use crate::identity::Identity;
use crate::identity::renew::{CredentialFiles, RenewKey};
use crate::upstream::UpstreamSpec;

/// The top-level keys of a node's config file.
pub const NODE_KEYS: &[&str] = &[
    "name",
    "listen",
    "ingress",
    "identity",
    "labels",
    "services",
    "peers",
    "limits",
    "log",
    "log_format",
    "discovery",
    "gateway",
    "gateway_name",
    "state_dir",
    "telemetry",
    "forwards",
];

/// A node's configuration, validated.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The node's name; must match the name in its certificate.
    pub name: NodeName,
    /// The QUIC listen address.
    pub listen: SocketAddr,
    /// The local HTTP ingress address (loopback only), or `None` when disabled.
    pub ingress: Option<SocketAddr>,
    /// Where the certificate, key and CA live.
    pub identity: IdentityPaths,
    /// Labels announced to peers (`zone`, `version`, ...).
    pub labels: BTreeMap<String, String>,
    /// The services this node hosts.
    pub services: Vec<ServiceConfig>,
    /// Peers to dial at start and keep connected.
    pub peers: Vec<SocketAddr>,
    /// Find peers by mDNS (and announce this node) besides the static peers.
    pub mdns: bool,
    /// Bounds and timers.
    pub limits: Limits,
    /// The log filter (`info`, `debug`, `mesh_node=debug,quinn=warn`).
    pub log: String,
    /// How log lines are written: plain text (the default) or JSON.
    pub log_format: crate::process::LogFormat,
    /// The gateway to keep a control stream to (also dialled as a peer); else one found by mDNS.
    pub gateway: Option<SocketAddr>,
    /// The certified node name the gateway must have; any name when `None`.
    pub gateway_name: Option<NodeName>,
    /// Where the node keeps state (the last good policy bundle).
    pub state_dir: PathBuf,
    /// Telemetry timers and bounds.
    pub telemetry: TelemetrySettings,
    /// Local TCP ports whose connections are carried to a service (`[[forwards]]`).
    pub forwards: Vec<ForwardConfig>,
    /// The file this came from, for error messages.
    pub file: String,
}

/// A TCP forward: connections accepted on `listen` are carried to an endpoint of `service` (a
/// `tcp://` service on another node), one QUIC stream each.
#[derive(Debug, Clone)]
pub struct ForwardConfig {
    /// Where to accept connections; loopback unless `allow_remote`.
    pub listen: SocketAddr,
    /// The service to reach.
    pub service: ServiceName,
    /// Accept connections from other hosts (plain TCP on the site's network: the mesh protects
    /// the hop between nodes, not this one).
    pub allow_remote: bool,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    /// Connections open at once; more are refused (and counted).
    pub max_connections: usize,
    /// The line of its `listen` key, 0 when it did not come from a file.
    pub line: usize,
}

impl ForwardConfig {
    /// A loopback forward with the default bounds.
    pub fn new(listen: SocketAddr, service: ServiceName) -> Self {
        ForwardConfig {
            listen,
            service,
            allow_remote: false,
            idle_timeout: Duration::from_secs(3600),
            max_connections: 256,
            line: 0,
        }
    }
}

/// Telemetry timers and bounds.
#[derive(Debug, Clone)]
pub struct TelemetrySettings {
    /// How often a batch is cut and sent.
    pub interval: Duration,
    /// Batches kept while the gateway is away; past this the oldest are dropped and counted.
    pub backlog: usize,
    /// Share of calls traced, 0.0 to 1.0.
    pub trace_sample: f64,
    /// Bytes of unacknowledged batches kept; past this, spans go first, then the oldest batches
    /// (all counted).
    pub max_backlog_bytes: usize,
    /// Distinct (service, method) pairs counted; calls to more are counted as method `_other`.
    pub max_series: usize,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            interval: Duration::from_secs(5),
            backlog: 720,
            trace_sample: 0.01,
            max_backlog_bytes: 1024 * 1024,
            max_series: 512,
        }
    }
}

/// The paths of a node's credentials, with the lines that named them.
#[derive(Debug, Clone)]
pub struct IdentityPaths {
    /// PEM certificate chain of the node.
    pub cert: Located<PathBuf>,
    /// PEM private key of the node; must be mode 0600.
    pub key: Located<PathBuf>,
    /// PEM certificate of the mesh CA.
    pub ca: Located<PathBuf>,
    /// Whether a renewal makes a new key.
    pub renew_key: RenewKey,
}

impl IdentityPaths {
    /// The three files.
    pub fn files(&self) -> CredentialFiles {
        CredentialFiles {
            cert: self.cert.value.clone(),
            key: self.key.value.clone(),
            ca: self.ca.value.clone(),
        }
    }
}

/// A value and the config line it came from.
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Its 1-based line, 0 when it did not come from a file.
    pub line: usize,
}

/// One hosted service.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Its name.
    pub name: ServiceName,
    /// Where its calls go.
    pub upstream: UpstreamSpec,
    /// The line of its `upstream` key.
    pub line: usize,
}

/// Bounds and timers; the defaults suit a small device.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request or response body of a call (held whole in memory).
    pub max_body_bytes: usize,
    /// Largest total of a streamed body (never held whole): `max_body_bytes` when the config sets
    /// it, else none.
    pub max_stream_bytes: Option<u64>,
    /// Calls in flight on one connection from one peer.
    pub max_concurrent_calls: u32,
    /// Bytes of request bodies from peers held at once, over every connection; one peer holds at
    /// most a quarter, over all its connections. A body past them is refused at once (`Unavailable`, "busy"), its
    /// stream stopped.
    pub max_buffered_bytes: usize,
    /// Deadline of a call that names none.
    pub call_timeout: Duration,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// QUIC keep-alive interval.
    pub keep_alive: Duration,
    /// A connection with nothing heard for this long is dead. QUIC restarts the timer when it
    /// sends its own keep-alive, so a silent peer is noticed within `idle_timeout + keep_alive`:
    /// with the defaults (1 s, 2 s), three keep-alive intervals.
    pub idle_timeout: Duration,
    /// Bounds of the local HTTP servers (the ingress, and a gateway's admin API).
    pub ingress: crate::http::HttpLimits,
    /// A tunnel to a TCP service this node hosts is closed after this long with no bytes either
    /// way.
    pub tcp_idle_timeout: Duration,
    /// Send several datagrams in one system call (UDP GSO), where the kernel can. Faster for
    /// bulk, but each connection keeps a send buffer of about ten datagrams (15 KB): a gateway,
    /// which holds a connection to every node and sends them little, turns it off (not a key of
    /// the config file).
    pub segmentation_offload: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: mesh_proto::limits::DEFAULT_MAX_BODY_BYTES,
            max_stream_bytes: None,
            max_concurrent_calls: 256,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            call_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            keep_alive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(2),
            ingress: crate::http::HttpLimits::default(),
            tcp_idle_timeout: Duration::from_secs(3600),
            segmentation_offload: true,
        }
    }
}

// The file as written: every field optional or spanned, unknown keys refused (at the top level by
// `check_top_level_keys`, since a gateway's file adds keys of its own).

#[derive(Deserialize)]
struct RawConfig {
    name: Spanned<String>,
    #[serde(default)]
    listen: Option<Spanned<String>>,
    #[serde(default)]
    ingress: Option<Spanned<String>>,
    identity: RawIdentity,
    #[serde(default)]
    labels: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    log: Option<Spanned<String>>,
    #[serde(default)]
    log_format: Option<Spanned<String>>,
    #[serde(default)]
    discovery: RawDiscovery,
    gateway: Option<Spanned<String>>,
    gateway_name: Option<Spanned<String>>,
    state_dir: Option<String>,
    #[serde(default)]
    telemetry: RawTelemetry,
    #[serde(default)]
    forwards: Vec<RawForward>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    listen: Spanned<String>,
    service: Spanned<String>,
    allow_remote: Option<bool>,
    idle_timeout_ms: Option<Spanned<u64>>,
    max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    interval_ms: Option<Spanned<u64>>,
    backlog_batches: Option<Spanned<u64>>,
    trace_sample: Option<Spanned<f64>>,
    max_backlog_bytes: Option<Spanned<u64>>,
    max_series: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    mdns: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIdentity {
    cert: Spanned<String>,
    key: Spanned<String>,
    ca: Spanned<String>,
    renew_key: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    addr: Spanned<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<Spanned<u64>>,
    max_concurrent_calls: Option<Spanned<u32>>,
    max_buffered_bytes: Option<Spanned<u64>>,
    call_timeout_ms: Option<Spanned<u64>>,
    connect_timeout_ms: Option<Spanned<u64>>,
    keep_alive_ms: Option<Spanned<u64>>,
    idle_timeout_ms: Option<Spanned<u64>>,
    ingress_max_connections: Option<Spanned<u64>>,
    ingress_header_timeout_ms: Option<Spanned<u64>>,
    ingress_body_timeout_ms: Option<Spanned<u64>>,
    ingress_max_buffered_bytes: Option<Spanned<u64>>,
    tcp_idle_timeout_ms: Option<Spanned<u64>>,
}

impl NodeConfig {
    /// Reads and validates a config file. Credentials are not opened here; see
    /// [`NodeConfig::load_identity`].
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (src, file, base) = read_config(path)?;
        Self::parse(&src, &file, &base)
    }

    /// Parses a node's config text; `file` names it in errors, `base` anchors relative paths.
    pub fn parse(src: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(
            src,
            file,
            base,
            &[],
            "not a key of a node's config (a gateway's key? run this file with mesh-gateway)",
        )
    }

    /// Parses the node's part of a file that holds more: a program that reads the same file with
    /// keys of its own (the gateway) names them in `also`; any other top-level key is refused with
    /// `unknown` as the message.
    pub fn parse_with(
        src: &str,
        file: &str,
        base: &Path,
        also: &[&str],
        unknown: &str,
    ) -> Result<Self, ConfigError> {
        let at = SourceMap { src, file };
        let known: Vec<&str> = NODE_KEYS.iter().chain(also).copied().collect();
        check_top_level_keys(&at, &known, unknown)?;
        let raw: RawConfig = toml::from_str(src).map_err(|e| at.toml_error(&e))?;

        let name = NodeName::try_from(raw.name.get_ref().as_str())
            .map_err(|e| at.invalid(&raw.name, "name", e))?;
        let listen = match &raw.listen {
            Some(s) => parse_addr(s, &at, "listen")?,
            None => SocketAddr::from(([0, 0, 0, 0], 7400)),
        };
        let ingress = match &raw.ingress {
            Some(s) if s.get_ref() == "off" => None,
            Some(s) => {
                let addr = parse_addr(s, &at, "ingress")?;
                if !addr.ip().is_loopback() {
                    return Err(at.invalid(
                        s,
                        "ingress",
                        "the ingress is plain HTTP and must listen on a loopback address (127.0.0.1 or ::1)",
                    ));
                }
                Some(addr)
            }
            None => Some(SocketAddr::from(([127, 0, 0, 1], 7480))),
        };
        let path = |s: &Spanned<String>| Located {
            value: base.join(s.get_ref()),
            line: at.line(s.span().start),
        };
        let renew_key = match &raw.identity.renew_key {
            None => RenewKey::default(),
            Some(v) => match v.get_ref().as_str() {
                "rotate" => RenewKey::Rotate,
                "keep" => RenewKey::Keep,
                _ => {
                    return Err(at.invalid(
                        v,
                        "identity.renew_key",
                        "must be \"rotate\" (a new key at each renewal) or \"keep\"",
                    ));
                }
            },
        };
        let identity = IdentityPaths {
            cert: path(&raw.identity.cert),
            key: path(&raw.identity.key),
            ca: path(&raw.identity.ca),
            renew_key,
        };
        let mut labels = BTreeMap::new();
        for (k, v) in &raw.labels {
            let key = format!("labels.{k}");
            mesh_proto::validate_name(k).map_err(|e| at.invalid(v, &key, e))?;
            if v.get_ref().len() > mesh_proto::limits::MAX_NAME_LEN {
                return Err(at.invalid(v, &key, "label value is longer than 63 bytes"));
            }
            labels.insert(k.clone(), v.get_ref().clone());
        }
        if labels.len() > mesh_proto::limits::MAX_LABELS {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line: 0,
                key: "labels".into(),
                message: format!("at most {} labels", mesh_proto::limits::MAX_LABELS),
            });
        }
        let mut services: Vec<ServiceConfig> = Vec::new();
        for (i, s) in raw.services.iter().enumerate() {
            let key = format!("services[{i}].name");
            let name = ServiceName::try_from(s.name.get_ref().as_str())
                .map_err(|e| at.invalid(&s.name, &key, e))?;
            if services.iter().any(|other| other.name == name) {
                return Err(at.invalid(&s.name, &key, format!("service {name} is listed twice")));
            }
            let upstream = s
                .upstream
                .get_ref()
                .parse::<UpstreamSpec>()
                .map_err(|e| at.invalid(&s.upstream, &format!("services[{i}].upstream"), e))?;
            services.push(ServiceConfig {
                name,
                upstream,
                line: at.line(s.upstream.span().start),
            });
        }
        if services.len() > mesh_proto::limits::MAX_SERVICES {
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line: 0,
                key: "services".into(),
                message: format!(
                    "at most {} services per node",
                    mesh_proto::limits::MAX_SERVICES
                ),
            });
        }
        let peers = raw
            .peers
            .iter()
            .enumerate()
            .map(|(i, p)| parse_addr(&p.addr, &at, &format!("peers[{i}].addr")))
            .collect::<Result<Vec<_>, _>>()?;
        let limits = raw.limits.validate(&at)?;
        let forwards = parse_forwards(&raw.forwards, &at)?;
        Ok(NodeConfig {
            name,
            listen,
            ingress,
            identity,
            labels,
            services,
            peers,
            mdns: raw.discovery.mdns.unwrap_or(true),
            limits,
            log: match &raw.log {
                Some(log) => {
                    crate::process::log_filter(log.get_ref())
                        .map_err(|e| at.invalid(log, "log", e))?;
                    log.get_ref().clone()
                }
                None => "info".into(),
            },
            log_format: raw
                .log_format
                .as_ref()
                .map(|f| {
                    f.get_ref()
                        .parse()
                        .map_err(|e| at.invalid(f, "log_format", e))
                })
                .transpose()?
                .unwrap_or_default(),
            gateway: raw
                .gateway
                .as_ref()
                .map(|g| parse_addr(g, &at, "gateway"))
                .transpose()?,
            gateway_name: raw
                .gateway_name
                .as_ref()
                .map(|n| {
                    NodeName::try_from(n.get_ref().as_str())
                        .map_err(|e| at.invalid(n, "gateway_name", e))
                })
                .transpose()?,
            state_dir: match &raw.state_dir {
                Some(d) => base.join(d),
                None => std::env::var_os("STATE_DIRECTORY")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("/var/lib/starling")),
            },
            telemetry: raw.telemetry.validate(&at)?,
            forwards,
            file: file.to_owned(),
        })
    }

    /// What `check-config` checks beyond the file: the devices of serial upstreams exist (a node
    /// that runs waits for a device plugged in later; a check says it is missing).
    pub fn check_devices(&self) -> Result<(), ConfigError> {
        for (i, s) in self.services.iter().enumerate() {
            let UpstreamSpec::Serial { path, key, .. } = &s.upstream else {
                continue;
            };
            let err = |message: String| ConfigError::Invalid {
                file: self.file.clone(),
                line: s.line,
                key: format!("services[{i}].upstream"),
                message,
            };
            if !path.exists() {
                return Err(err(format!(
                    "{} does not exist: is the microcontroller plugged in? (the node waits for it)",
                    path.display()
                )));
            }
            if let Some(key) = key {
                crate::upstream::serial::read_key(key).map_err(err)?;
            }
        }
        Ok(())
    }

    /// Opens the certificate, key and CA this config names and checks them: readable, the key
    /// private to its owner (mode 0600), the certificate chained to the CA and naming this node.
    pub fn load_identity(&self) -> Result<Identity, ConfigError> {
        let err = |loc: &Located<PathBuf>, key: &str, message: String| ConfigError::Invalid {
            file: self.file.clone(),
            line: loc.line,
            key: key.into(),
            message,
        };
        let ids = &self.identity;
        for (loc, key) in [
            (&ids.cert, "identity.cert"),
            (&ids.key, "identity.key"),
            (&ids.ca, "identity.ca"),
        ] {
            let meta = std::fs::metadata(&loc.value).map_err(|e| {
                err(
                    loc,
                    key,
                    format!("cannot read {}: {e}", loc.value.display()),
                )
            })?;
            if !meta.is_file() {
                return Err(err(
                    loc,
                    key,
                    format!("{} is not a file", loc.value.display()),
                ));
            }
        }
        crate::identity::renew::finish_interrupted_rotation(&ids.files());
        check_key_mode(&ids.key.value).map_err(|m| err(&ids.key, "identity.key", m))?;
        let identity =
            Identity::load(&ids.cert.value, &ids.key.value, &ids.ca.value).map_err(|e| {
                let (loc, key) = match &e {
                    crate::identity::TlsError::Read { path, .. }
                        if Path::new(path) == ids.key.value =>
                    {
                        (&ids.key, "identity.key")
                    }
                    crate::identity::TlsError::Read { path, .. }
                        if Path::new(path) == ids.ca.value =>
                    {
                        (&ids.ca, "identity.ca")
                    }
                    // The chain check failed: the CA file is the first suspect (a wrong CA is the
                    // common mistake), and the message names both.
                    crate::identity::TlsError::NotSignedByCa(_)
                    | crate::identity::TlsError::WrongTrustDomain { .. } => {
                        (&ids.ca, "identity.ca")
                    }
                    crate::identity::TlsError::KeyMismatch(_) => (&ids.key, "identity.key"),
                    _ => (&ids.cert, "identity.cert"),
                };
                err(loc, key, e.to_string())
            })?;
        if identity.id.node_name() != &self.name || identity.id.leaf().is_some() {
            return Err(err(
                &ids.cert,
                "identity.cert",
                format!(
                    "certificate is for {}, but this node is named {:?}",
                    identity.id,
                    self.name.as_str()
                ),
            ));
        }
        Ok(identity)
    }
}

impl RawTelemetry {
    fn validate(&self, at: &SourceMap<'_>) -> Result<TelemetrySettings, ConfigError> {
        let d = TelemetrySettings::default();
        Ok(TelemetrySettings {
            interval: match &self.interval_ms {
                Some(s) if *s.get_ref() == 0 => {
                    return Err(at.invalid(s, "telemetry.interval_ms", "must be greater than 0"));
                }
                Some(s) => Duration::from_millis(*s.get_ref()),
                None => d.interval,
            },
            backlog: match &self.backlog_batches {
                Some(s) if *s.get_ref() == 0 || *s.get_ref() > 100_000 => {
                    return Err(at.invalid(
                        s,
                        "telemetry.backlog_batches",
                        "must be between 1 and 100000",
                    ));
                }
                Some(s) => *s.get_ref() as usize,
                None => d.backlog,
            },
            trace_sample: match &self.trace_sample {
                Some(s) if !(0.0..=1.0).contains(s.get_ref()) => {
                    return Err(at.invalid(
                        s,
                        "telemetry.trace_sample",
                        "must be between 0.0 and 1.0",
                    ));
                }
                Some(s) => *s.get_ref(),
                None => d.trace_sample,
            },
            max_backlog_bytes: match &self.max_backlog_bytes {
                Some(s) if *s.get_ref() < 16 * 1024 || *s.get_ref() > 256 * 1024 * 1024 => {
                    return Err(at.invalid(
                        s,
                        "telemetry.max_backlog_bytes",
                        "must be between 16384 and 268435456",
                    ));
                }
                Some(s) => *s.get_ref() as usize,
                None => d.max_backlog_bytes,
            },
            max_series: match &self.max_series {
                Some(s) if *s.get_ref() == 0 || *s.get_ref() > 100_000 => {
                    return Err(at.invalid(
                        s,
                        "telemetry.max_series",
                        "must be between 1 and 100000",
                    ));
                }
                Some(s) => *s.get_ref() as usize,
                None => d.max_series,
            },
        })
    }
}

/// The `[[forwards]]`: addresses valid, loopback unless `allow_remote`, no address twice.
fn parse_forwards(
    raw: &[RawForward],
    at: &SourceMap<'_>,
) -> Result<Vec<ForwardConfig>, ConfigError> {
    let mut forwards: Vec<ForwardConfig> = Vec::new();
    for (i, f) in raw.iter().enumerate() {
        let key = |k: &str| format!("forwards[{i}].{k}");
        let listen = parse_addr(&f.listen, at, &key("listen"))?;
        let allow_remote = f.allow_remote.unwrap_or(false);
        if !listen.ip().is_loopback() && !allow_remote {
            return Err(at.invalid(
                &f.listen,
                &key("listen"),
                "a forward listens on loopback (127.0.0.1 or ::1): the connection to it is plain \
                 TCP. To accept other hosts, set allow_remote = true",
            ));
        }
        if listen.port() != 0 && forwards.iter().any(|o| o.listen == listen) {
            return Err(at.invalid(
                &f.listen,
                &key("listen"),
                format!("{listen} is the listen address of another forward"),
            ));
        }
        let service = ServiceName::try_from(f.service.get_ref().as_str())
            .map_err(|e| at.invalid(&f.service, &key("service"), e))?;
        let mut forward = ForwardConfig::new(listen, service);
        forward.allow_remote = allow_remote;
        forward.line = at.line(f.listen.span().start);
        if let Some(v) = &f.idle_timeout_ms {
            if *v.get_ref() == 0 {
                return Err(at.invalid(v, &key("idle_timeout_ms"), "must be greater than 0"));
            }
            forward.idle_timeout = Duration::from_millis(*v.get_ref());
        }
        if let Some(v) = &f.max_connections {
            if *v.get_ref() == 0 || *v.get_ref() > 65_536 {
                return Err(at.invalid(v, &key("max_connections"), "must be between 1 and 65536"));
            }
            forward.max_connections = *v.get_ref() as usize;
        }
        forwards.push(forward);
    }
    Ok(forwards)
}

#[cfg(unix)]
fn check_key_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:04o}: a private key must be readable by its owner only (chmod 600)",
            path.display(),
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_mode(_path: &Path) -> Result<(), String> {
    Ok(())
}

impl RawLimits {
    fn validate(&self, at: &SourceMap<'_>) -> Result<Limits, ConfigError> {
        let d = Limits::default();
        let ms = |v: &Option<Spanned<u64>>,
                  key: &str,
                  default: Duration|
         -> Result<Duration, ConfigError> {
            match v {
                None => Ok(default),
                Some(s) if *s.get_ref() == 0 => Err(at.invalid(s, key, "must be greater than 0")),
                Some(s) => Ok(Duration::from_millis(*s.get_ref())),
            }
        };
        let mut limits = Limits {
            max_stream_bytes: self.max_body_bytes.as_ref().map(|s| *s.get_ref()),
            max_body_bytes: match &self.max_body_bytes {
                None => d.max_body_bytes,
                Some(s) if *s.get_ref() == 0 || *s.get_ref() > 256 * 1024 * 1024 => {
                    return Err(at.invalid(
                        s,
                        "limits.max_body_bytes",
                        "must be between 1 and 268435456",
                    ));
                }
                Some(s) => *s.get_ref() as usize,
            },
            max_concurrent_calls: match &self.max_concurrent_calls {
                None => d.max_concurrent_calls,
                Some(s) if *s.get_ref() == 0 => {
                    return Err(at.invalid(
                        s,
                        "limits.max_concurrent_calls",
                        "must be greater than 0",
                    ));
                }
                Some(s) => *s.get_ref(),
            },
            // Filled in below, once max_body_bytes is known.
            max_buffered_bytes: 0,
            call_timeout: ms(
                &self.call_timeout_ms,
                "limits.call_timeout_ms",
                d.call_timeout,
            )?,
            connect_timeout: ms(
                &self.connect_timeout_ms,
                "limits.connect_timeout_ms",
                d.connect_timeout,
            )?,
            keep_alive: ms(&self.keep_alive_ms, "limits.keep_alive_ms", d.keep_alive)?,
            idle_timeout: ms(
                &self.idle_timeout_ms,
                "limits.idle_timeout_ms",
                d.idle_timeout,
            )?,
            ingress: crate::http::HttpLimits {
                max_connections: match &self.ingress_max_connections {
                    Some(s) if *s.get_ref() == 0 || *s.get_ref() > 65_536 => {
                        return Err(at.invalid(
                            s,
                            "limits.ingress_max_connections",
                            "must be between 1 and 65536",
                        ));
                    }
                    Some(s) => *s.get_ref() as usize,
                    None => d.ingress.max_connections,
                },
                header_timeout: ms(
                    &self.ingress_header_timeout_ms,
                    "limits.ingress_header_timeout_ms",
                    d.ingress.header_timeout,
                )?,
                body_timeout: ms(
                    &self.ingress_body_timeout_ms,
                    "limits.ingress_body_timeout_ms",
                    d.ingress.body_timeout,
                )?,
                max_buffered_bytes: match &self.ingress_max_buffered_bytes {
                    Some(s) if *s.get_ref() < 65_536 || *s.get_ref() > 4 * 1024 * 1024 * 1024 => {
                        return Err(at.invalid(
                            s,
                            "limits.ingress_max_buffered_bytes",
                            "must be between 65536 and 4294967296",
                        ));
                    }
                    Some(s) => *s.get_ref() as usize,
                    None => d.ingress.max_buffered_bytes,
                },
            },
            tcp_idle_timeout: ms(
                &self.tcp_idle_timeout_ms,
                "limits.tcp_idle_timeout_ms",
                d.tcp_idle_timeout,
            )?,
            segmentation_offload: d.segmentation_offload,
        };
        if limits.idle_timeout <= limits.keep_alive {
            let span = self
                .idle_timeout_ms
                .as_ref()
                .or(self.keep_alive_ms.as_ref());
            return Err(ConfigError::Invalid {
                file: at.file.to_owned(),
                line: span.map(|s| at.line(s.span().start)).unwrap_or(0),
                key: "limits.idle_timeout_ms".into(),
                message: "must be longer than limits.keep_alive_ms".into(),
            });
        }
        // A peer holds at most a quarter of the budget, and a body must fit in it.
        let least = 4 * limits.max_body_bytes;
        limits.max_buffered_bytes = match &self.max_buffered_bytes {
            None => d.max_buffered_bytes.max(least),
            Some(s) if *s.get_ref() < 65_536 || *s.get_ref() > 4 * 1024 * 1024 * 1024 => {
                return Err(at.invalid(
                    s,
                    "limits.max_buffered_bytes",
                    "must be between 65536 and 4294967296",
                ));
            }
            Some(s) if (*s.get_ref() as usize) < least => {
                return Err(at.invalid(
                    s,
                    "limits.max_buffered_bytes",
                    format!(
                        "must be at least four times limits.max_body_bytes ({least}): one \
                         peer holds at most a quarter of it, and a body must fit"
                    ),
                ));
            }
            Some(s) => *s.get_ref() as usize,
        };
        Ok(limits)
    }
}

/// Default of `limits.max_buffered_bytes` (raised to four times `limits.max_body_bytes`).
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 32 * 1024 * 1024;

/// Reads a config file: its text, its name for messages, and the folder relative paths start from.
pub fn read_config(path: &Path) -> Result<(String, String, PathBuf), ConfigError> {
    let file = path.display().to_string();
    let src = read_regular_file(path).map_err(|reason| ConfigError::Read {
        file: file.clone(),
        reason,
    })?;
    let base = path.parent().unwrap_or(Path::new(".")).to_owned();
    Ok((src, file, base))
}

/// Reads a file that must be a regular file: a FIFO, a device or a folder is refused at once
/// instead of blocking or reading forever; at most 16 MiB are read.
pub fn read_regular_file(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > 16 * 1024 * 1024 {
        return Err(format!(
            "{} bytes is too large for a config file",
            meta.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// Parses an address value.
pub fn parse_addr(
    s: &Spanned<String>,
    at: &SourceMap<'_>,
    key: &str,
) -> Result<SocketAddr, ConfigError> {
    s.get_ref().parse().map_err(|_| {
        at.invalid(
            s,
            key,
            format!("{:?} is not an address like 127.0.0.1:7400", s.get_ref()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "node-a"
listen = "0.0.0.0:7400"
ingress = "127.0.0.1:7480"
[identity]
cert = "certs/node.crt"
key = "certs/node.key"
ca = "certs/ca.crt"
[labels]
zone = "hall-1"
[[services]]
name = "echo"
upstream = "builtin:echo"
[[peers]]
addr = "127.0.0.1:7401"
"#;

    fn parse(src: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(src, "node.toml", Path::new("/etc/starling"))
    }

    fn invalid(src: &str) -> (usize, String, String) {
        match parse(src) {
            Err(ConfigError::Invalid {
                line, key, message, ..
            }) => (line, key, message),
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_contract() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.name.as_str(), "node-a");
        assert_eq!(c.listen, "0.0.0.0:7400".parse().expect("addr"));
        assert_eq!(
            c.identity.key.value,
            Path::new("/etc/starling/certs/node.key")
        );
        assert_eq!(c.identity.key.line, 7);
        assert_eq!(c.labels["zone"], "hall-1");
        assert_eq!(c.services[0].upstream, UpstreamSpec::Echo);
        assert_eq!(c.peers, vec!["127.0.0.1:7401".parse().expect("addr")]);
    }

    #[test]
    fn the_log_filter_is_checked_with_its_line() {
        let c = parse(&format!(
            "log = \"info, quinn=warn,mesh_node::server=debug\"\n{GOOD}"
        ))
        .expect("valid");
        assert_eq!(c.log, "info, quinn=warn,mesh_node::server=debug");
        assert_eq!(parse(GOOD).expect("valid").log, "info");
        for bad in [
            "warning",
            "info,",
            "",
            "info,quinn=loud",
            "mesh_node[call]=debug",
        ] {
            let (line, key, message) = invalid(&format!("log = \"{bad}\"\n{GOOD}"));
            assert_eq!((line, key.as_str()), (1, "log"), "{bad:?}: {message}");
            assert!(message.contains(&format!("{bad:?}")), "{bad:?}: {message}");
        }
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let src = GOOD.replace(
            "ca = \"certs/ca.crt\"",
            "ca = \"certs/ca.crt\"\npassword = \"x\"",
        );
        let (line, key, message) = invalid(&src);
        assert_eq!(line, 9);
        assert_eq!(key, "identity.password");
        assert!(message.contains("unknown field"), "{message}");
    }

    #[test]
    fn the_peer_body_budget_holds_four_bodies_and_names_its_key() {
        let c = parse(GOOD).expect("valid");
        assert_eq!(c.limits.max_buffered_bytes, DEFAULT_MAX_BUFFERED_BYTES);
        // Raised with the body bound when not set.
        let c = parse(&format!("{GOOD}[limits]\nmax_body_bytes = 16777216\n")).expect("valid");
        assert_eq!(c.limits.max_buffered_bytes, 64 * 1024 * 1024);
        let (line, key, m) = invalid(&format!(
            "{GOOD}[limits]\nmax_body_bytes = 16777216\nmax_buffered_bytes = 33554432\n"
        ));
        assert_eq!((line, key.as_str()), (18, "limits.max_buffered_bytes"));
        assert!(m.contains("four times limits.max_body_bytes"), "{m}");
        let (line, key, _) = invalid(&format!("{GOOD}[limits]\nmax_buffered_bytes = 1000\n"));
        assert_eq!((line, key.as_str()), (17, "limits.max_buffered_bytes"));
    }

    #[test]
    fn wrong_type_names_line_and_key() {
        let src = format!("{GOOD}[limits]\ncall_timeout_ms = \"soon\"\n");
        let (line, key, message) = invalid(&src);
        assert_eq!(line, 17);
        assert_eq!(key, "limits.call_timeout_ms");
        assert!(message.contains("invalid type"), "{message}");
    }

    #[test]
    fn bad_values_name_line_and_key() {
        let (line, key, _) = invalid(&GOOD.replace("\"node-a\"", "\"node/a\""));
        assert_eq!((line, key.as_str()), (2, "name"));
        let (line, key, m) = invalid(&GOOD.replace("builtin:echo", "ftp://x"));
        assert_eq!((line, key.as_str()), (13, "services[0].upstream"));
        assert!(m.contains("ftp://x"), "{m}");
        let (line, key, m) = invalid(&GOOD.replace("127.0.0.1:7480", "0.0.0.0:7480"));
        assert_eq!((line, key.as_str()), (4, "ingress"));
        assert!(m.contains("loopback"), "{m}");
        let (_, key, _) = invalid(&GOOD.replace("127.0.0.1:7401", "nowhere"));
        assert_eq!(key, "peers[0].addr");
    }

    #[test]
    fn forwards_parse_and_their_errors_name_line_and_key() {
        let forwards = "[[forwards]]\nlisten = \"127.0.0.1:1502\"\nservice = \"plc\"\n\
                        idle_timeout_ms = 60000\n\
                        [[forwards]]\nlisten = \"0.0.0.0:2222\"\nservice = \"ssh\"\nallow_remote = true\n";
        let c = parse(&format!("{GOOD}{forwards}")).expect("valid");
        assert_eq!(c.forwards.len(), 2);
        let (plc, ssh) = (&c.forwards[0], &c.forwards[1]);
        assert_eq!(plc.listen, "127.0.0.1:1502".parse().expect("addr"));
        assert_eq!(plc.service.as_str(), "plc");
        assert_eq!(plc.idle_timeout, Duration::from_secs(60));
        assert_eq!(
            (plc.line, plc.max_connections, plc.allow_remote),
            (17, 256, false)
        );
        assert!(ssh.allow_remote);

        // Another host's connections only when asked for.
        let remote = "[[forwards]]\nlisten = \"0.0.0.0:1502\"\nservice = \"plc\"\n";
        let (line, key, m) = invalid(&format!("{GOOD}{remote}"));
        assert_eq!((line, key.as_str()), (17, "forwards[0].listen"));
        assert!(m.contains("allow_remote"), "{m}");
        let twice = "[[forwards]]\nlisten = \"127.0.0.1:1502\"\nservice = \"a\"\n\
                     [[forwards]]\nlisten = \"127.0.0.1:1502\"\nservice = \"b\"\n";
        let (line, key, _) = invalid(&format!("{GOOD}{twice}"));
        assert_eq!((line, key.as_str()), (20, "forwards[1].listen"));
        let bad_name = "[[forwards]]\nlisten = \"127.0.0.1:1502\"\nservice = \"p l c\"\n";
        let (line, key, _) = invalid(&format!("{GOOD}{bad_name}"));
        assert_eq!((line, key.as_str()), (18, "forwards[0].service"));
        let zero =
            "[[forwards]]\nlisten = \"127.0.0.1:1502\"\nservice = \"plc\"\nidle_timeout_ms = 0\n";
        let (line, key, _) = invalid(&format!("{GOOD}{zero}"));
        assert_eq!((line, key.as_str()), (19, "forwards[0].idle_timeout_ms"));
        let unknown = "[[forwards]]\nlisten = \"127.0.0.1:1502\"\nservice = \"plc\"\nport = 1\n";
        let (line, key, _) = invalid(&format!("{GOOD}{unknown}"));
        assert_eq!((line, key.as_str()), (19, "forwards.port"));
    }

    #[test]
    fn a_tcp_upstream_names_line_and_key_when_bad() {
        let (line, key, m) = invalid(&GOOD.replace("builtin:echo", "tcp://127.0.0.1"));
        assert_eq!((line, key.as_str()), (13, "services[0].upstream"));
        assert!(m.contains("tcp://127.0.0.1:502"), "{m}");
        let c = parse(&GOOD.replace("builtin:echo", "tcp://127.0.0.1:502")).expect("valid");
        assert_eq!(
            c.services[0].upstream,
            UpstreamSpec::Tcp {
                authority: "127.0.0.1:502".into()
            }
        );
    }

    #[test]
    fn missing_key_is_named() {
        let (_, key, message) = invalid(&GOOD.replace("ca = \"certs/ca.crt\"\n", ""));
        assert_eq!(key, "identity.ca");
        assert!(message.contains("missing field"), "{message}");
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = NodeConfig::load(Path::new("/nonexistent/node.toml")).expect_err("missing");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/node.toml: cannot read"),
            "{e}"
        );
    }
}
