//! A gateway's config file: a node's keys (the gateway is a node too, see `mesh_node::config`)
//! plus its own, documented in `configs/gateway.example.toml`. Errors name the file, the line and
//! the key, as a node's do.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::source::{ConfigError, SourceMap};
use mesh_node::NodeConfig;
use mesh_node::config::{parse_addr, read_config};
use serde::Deserialize;
use toml::Spanned;

/// The top-level keys only a gateway's file has.
pub const GATEWAY_KEYS: &[&str] = &[
    "admin",
    "admin_token_file",
    "policy",
    "registry",
    "traces",
    "audit_log",
    "issuer",
    "cloud",
    "otlp",
];

/// Calls at once from one node to a gateway, unless its file sets `limits.max_concurrent_calls`.
pub const GATEWAY_CONCURRENT_CALLS: u32 = 32;

/// A gateway's configuration, validated.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The node underneath.
    pub node: NodeConfig,
    /// The HTTP API and `/metrics`; loopback unless configured otherwise.
    pub admin: SocketAddr,
    /// The bearer token that guards every change (created, mode 0600, if missing).
    pub admin_token_file: PathBuf,
    /// The policy bundle file, reloaded when it changes.
    pub policy: Option<Located<PathBuf>>,
    /// A node whose control stream closed is shown down after this long.
    pub down_after: Duration,
    /// ... and removed after this long.
    pub remove_after: Duration,
    /// Traces kept for `GET /v1/traces`.
    pub max_traces: usize,
    /// Where audit events are appended as JSON lines.
    pub audit_log: PathBuf,
    /// The site issuer the gateway signs node certificates with (enrolment, renewal), if any.
    pub issuer: Option<IssuerConfig>,
    /// The bridge to the cloud's MQTT broker, if any.
    pub cloud: Option<CloudConfig>,
    /// The OpenTelemetry collector the gateway exports spans to, if any.
    pub otlp: Option<OtlpConfig>,
}

/// How spans reach the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies (`POST <endpoint>/v1/traces`), the OTLP default.
    HttpProtobuf,
    /// OTLP/gRPC (`TraceService/Export`).
    Grpc,
}

/// The `[otlp]` section: the collector that gets the spans nodes send the gateway.
#[derive(Debug, Clone)]
pub struct OtlpConfig {
    /// HTTP/protobuf or gRPC.
    pub protocol: OtlpProtocol,
    /// `https://` (true) or `http://`.
    pub tls: bool,
    /// The collector's host (a name or an address; brackets removed from IPv6).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The HTTP path spans are posted to (`/v1/traces` unless the endpoint names one).
    pub path: String,
    /// The endpoint as written, for messages.
    pub endpoint: String,
    /// The collector's CA certificate (PEM), if not one of the system's.
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM; the key mode 0600), if the collector takes those.
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// Headers added to every export (lower-case names).
    pub headers: Vec<(String, String)>,
    /// A file (mode 0600) whose content is the `Authorization` header's value.
    pub authorization_file: Option<PathBuf>,
    /// A file (mode 0600) of `name: value` lines: headers that carry secrets (API keys).
    pub headers_file: Option<PathBuf>,
    /// A batch goes out this long after its first span at the latest.
    pub batch_interval: Duration,
    /// Spans in one export at most.
    pub max_batch_spans: usize,
    /// Spans waiting at most; past it the oldest are dropped (counted).
    pub max_queue_spans: usize,
    /// One export attempt's bound.
    pub timeout: Duration,
    /// The section's line.
    pub line: usize,
}

/// The `[cloud]` section: the MQTT broker the site reports to, and the on-disk queue in front
/// of it.
#[derive(Debug, Clone)]
pub struct CloudConfig {
    /// `host:port` of the broker.
    pub broker: String,
    /// TLS (`mqtts://`) or not (`mqtt://`, only with `insecure = true`).
    pub tls: bool,
    /// The MQTT client id (default: the gateway's name).
    pub client_id: String,
    /// Topics go under this (default: `starling/<trust-domain>/<gateway-name>`, set at start).
    pub topic_prefix: Option<String>,
    /// The broker's CA certificate (PEM), if not a public one.
    pub ca: Option<PathBuf>,
    /// The client certificate and key (PEM; the key mode 0600), if the broker takes those.
    pub cert_key: Option<(PathBuf, PathBuf)>,
    /// A user name and the file of its password (mode 0600), if the broker takes those.
    pub user_password: Option<(String, PathBuf)>,
    /// Where the store-and-forward queue lives.
    pub queue_dir: PathBuf,
    /// The queue's bound in bytes.
    pub queue_max_bytes: u64,
    /// The queue's bound in messages.
    pub queue_max_messages: u64,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// How long a message of each class may wait in the queue (audit, status, registry,
    /// telemetry; zero: no limit).
    pub ttl: [Duration; 4],
    /// Publishes in flight at once, at most (the broker's Receive Maximum lowers it).
    pub max_inflight: u16,
    /// Bytes per second the bridge may publish, at most (a metered uplink); `None`: no cap.
    pub bandwidth: Option<u64>,
    /// Down messages (policy, calls) larger than this are refused.
    pub max_message_bytes: usize,
    /// What one message up may take, at most (AWS IoT Core takes 128 KiB): telemetry and the
    /// registry are split to fit, anything else larger is dropped as a counted gap.
    pub max_publish_bytes: usize,
    /// The operator keys (Ed25519, `PUBLIC KEY` PEM) that may sign a policy sent from the cloud;
    /// none: policy from the cloud is refused.
    pub policy_signers: Vec<Located<PathBuf>>,
    /// Telemetry batches of this long go up as one message (zero: each as it comes).
    pub batch_interval: Duration,
    /// The MQTT version: `None` tries 5 and falls back to 3.1.1 when the broker does not speak
    /// it.
    pub protocol: Option<MqttVersion>,
    /// The line of the section, for errors found later.
    pub line: usize,
}

/// Which MQTT the cloud bridge speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MqttVersion {
    /// MQTT 5.
    V5,
    /// MQTT 3.1.1.
    V311,
}

impl MqttVersion {
    /// `5` or `3.1.1`.
    pub fn as_str(self) -> &'static str {
        match self {
            MqttVersion::V5 => "5",
            MqttVersion::V311 => "3.1.1",
        }
    }
}

/// The `[issuer]` section: the site issuer `mesh-gateway ca issuer` made, and how long what it
/// issues lasts.
#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// `issuer.crt`.
    pub cert: Located<PathBuf>,
    /// `issuer.key` (mode 0600).
    pub key: Located<PathBuf>,
    /// Lifetime of the node certificates it issues.
    pub lifetime: Duration,
    /// How long after its expiry a certificate may still be renewed (a device back from a long
    /// outage recovers without re-enrolling).
    pub grace: Duration,
}

/// Node certificates last a week by default: a device may be offline for days and still renew
/// before its certificate runs out.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// ... and one that ran out may still be renewed for 30 days.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30 * 86_400);

/// A value and the config line it came from.
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Its 1-based line.
    pub line: usize,
}

// The gateway's keys as written; the node's keys in the same file are the node parser's.
#[derive(Deserialize)]
struct RawGateway {
    /// The node's `[limits]`, read here only to know which keys the file sets.
    limits: Option<toml::Table>,
    /// A node key, read here only to know whether it was given: a gateway runs no ingress unless
    /// its file asks for one.
    ingress: Option<Spanned<String>>,
    admin: Option<Spanned<String>>,
    admin_token_file: Option<Spanned<String>>,
    policy: Option<Spanned<String>>,
    registry: Option<Spanned<RawRegistry>>,
    traces: Option<Spanned<RawTraces>>,
    audit_log: Option<Spanned<String>>,
    issuer: Option<Spanned<RawIssuer>>,
    cloud: Option<Spanned<RawCloud>>,
    otlp: Option<Spanned<RawOtlp>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOtlp {
    endpoint: Spanned<String>,
    protocol: Option<Spanned<String>>,
    #[serde(default)]
    insecure: bool,
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, Spanned<String>>,
    authorization_file: Option<Spanned<String>>,
    headers_file: Option<Spanned<String>>,
    batch_interval_ms: Option<Spanned<u64>>,
    max_batch_spans: Option<Spanned<u64>>,
    max_queue_spans: Option<Spanned<u64>>,
    timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloud {
    broker: Spanned<String>,
    #[serde(default)]
    insecure: bool,
    client_id: Option<Spanned<String>>,
    topic_prefix: Option<Spanned<String>>,
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
    username: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    queue_dir: Option<Spanned<String>>,
    queue_max_bytes: Option<Spanned<u64>>,
    queue_max_messages: Option<Spanned<u64>>,
    keep_alive_s: Option<Spanned<u64>>,
    ttl_audit_s: Option<Spanned<u64>>,
    ttl_status_s: Option<Spanned<u64>>,
    ttl_registry_s: Option<Spanned<u64>>,
    ttl_telemetry_s: Option<Spanned<u64>>,
    max_inflight: Option<Spanned<u64>>,
    bandwidth_bytes_per_s: Option<Spanned<u64>>,
    max_message_bytes: Option<Spanned<u64>>,
    max_publish_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    policy_signers: Vec<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    batch_interval_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIssuer {
    cert: Spanned<String>,
    key: Spanned<String>,
    lifetime_s: Option<Spanned<u64>>,
    grace_s: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    down_after_ms: Option<u64>,
    remove_after_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTraces {
    max_traces: Option<u64>,
}

impl GatewayConfig {
    /// What `check-config` checks of the `[cloud]` section beyond the file: the certificates it
    /// names exist, and its secrets (client key, password file) are readable by their owner only.
    pub fn check_cloud_files(&self) -> Result<(), ConfigError> {
        let Some(cloud) = &self.cloud else {
            return Ok(());
        };
        let password = cloud.user_password.as_ref().map(|(_, f)| f.as_path());
        self.check_files(
            "cloud",
            cloud.line,
            cloud.ca.as_deref(),
            cloud.cert_key.as_ref(),
            &[("password_file", password)],
        )?;
        for signer in &cloud.policy_signers {
            std::fs::metadata(&signer.value).map_err(|e| ConfigError::Invalid {
                file: self.node.file.clone(),
                line: signer.line,
                key: "cloud.policy_signers".into(),
                message: format!("{}: {e}", signer.value.display()),
            })?;
        }
        Ok(())
    }

    /// The same of the `[otlp]` section (its CA, client certificate and key, authorization and
    /// headers files); the gateway checks it at start too.
    pub fn check_otlp_files(&self) -> Result<(), ConfigError> {
        let Some(otlp) = &self.otlp else {
            return Ok(());
        };
        self.check_files(
            "otlp",
            otlp.line,
            otlp.ca.as_deref(),
            otlp.cert_key.as_ref(),
            &[
                ("authorization_file", otlp.authorization_file.as_deref()),
                ("headers_file", otlp.headers_file.as_deref()),
            ],
        )
    }

    /// A section's files: `ca` and `cert` exist, `key` and the secrets are their owner's only.
    fn check_files(
        &self,
        section: &str,
        line: usize,
        ca: Option<&Path>,
        cert_key: Option<&(PathBuf, PathBuf)>,
        secrets: &[(&str, Option<&Path>)],
    ) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| ConfigError::Invalid {
            file: self.node.file.clone(),
            line,
            key: format!("{section}.{key}"),
            message,
        };
        let exists = |key: &str, p: &Path| {
            std::fs::metadata(p)
                .map(|_| ())
                .map_err(|e| err(key, format!("{}: {e}", p.display())))
        };
        let private = |key: &str, p: &Path| -> Result<(), ConfigError> {
            exists(key, p)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(p)
                    .map_err(|e| err(key, e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(err(
                        key,
                        format!(
                            "{} has mode {:04o}: it must be readable by its owner only (chmod 600)",
                            p.display(),
                            mode & 0o777
                        ),
                    ));
                }
            }
            Ok(())
        };
        if let Some(ca) = ca {
            exists("ca", ca)?;
        }
        if let Some((cert, key)) = cert_key {
            exists("cert", cert)?;
            private("key", key)?;
        }
        for (key, file) in secrets {
            if let Some(file) = file {
                private(key, file)?;
            }
        }
        Ok(())
    }

    /// Loads the site issuer the `[issuer]` section names, if it names one; errors name the file,
    /// line and key.
    pub fn load_issuer(&self) -> Result<Option<crate::ca::Ca>, ConfigError> {
        let Some(issuer) = &self.issuer else {
            return Ok(None);
        };
        crate::ca::Ca::load_issuer(
            &issuer.cert.value,
            &issuer.key.value,
            &self.node.identity.ca.value,
        )
        .map(Some)
        .map_err(|e| ConfigError::Invalid {
            file: self.node.file.clone(),
            line: issuer.cert.line,
            key: "issuer".into(),
            message: e.to_string(),
        })
    }

    /// What an operator must hear when the admin API is reachable from the network.
    pub fn admin_warning(&self) -> Option<String> {
        (!self.admin.ip().is_loopback()).then(|| {
            format!(
                "the admin API listens on {}, reachable from the network: every request, reads \
                 included, needs the bearer token, which travels in clear text (no TLS). Keep it \
                 on loopback, or reach it through a VPN or an SSH tunnel",
                self.admin
            )
        })
    }

    /// Reads and validates a gateway's config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let (src, file, base) = read_config(path)?;
        Self::parse(&src, &file, &base)
    }

    /// Parses a gateway's config text; `file` names it in errors, `base` anchors relative paths.
    pub fn parse(src: &str, file: &str, base: &Path) -> Result<Self, ConfigError> {
        let mut node = NodeConfig::parse_with(
            src,
            file,
            base,
            GATEWAY_KEYS,
            "not a key of a gateway's config",
        )?;
        let at = SourceMap { src, file };
        let raw: RawGateway = toml::from_str(src).map_err(|e| at.toml_error(&e))?;
        if raw.ingress.is_none() {
            node.ingress = None;
        }
        // A connection to every node, little sent on each: no GSO send buffer per connection
        // (15 KB each, 150 MB at 10,000 nodes).
        node.limits.segmentation_offload = false;
        // Nodes call a gateway little (its own services, the control stream): unless the file
        // says otherwise, 32 streams at once per node, not a node's 256. QUIC sets aside room for
        // every stream a peer may open, so this is 20 KB less per node connection.
        let set_in_file = raw
            .limits
            .as_ref()
            .is_some_and(|l| l.contains_key("max_concurrent_calls"));
        if !set_in_file {
            node.limits.max_concurrent_calls = GATEWAY_CONCURRENT_CALLS;
        }
        let admin = match &raw.admin {
            Some(s) => parse_addr(s, &at, "admin")?,
            None => SocketAddr::from(([127, 0, 0, 1], 9480)),
        };
        let registry = raw.registry.as_ref().map(|r| r.get_ref());
        let down_after =
            Duration::from_millis(registry.and_then(|r| r.down_after_ms).unwrap_or(5_000));
        let remove_after =
            Duration::from_millis(registry.and_then(|r| r.remove_after_ms).unwrap_or(300_000));
        if remove_after < down_after {
            let line = raw.registry.as_ref().map_or(0, |r| at.line(r.span().start));
            return Err(ConfigError::Invalid {
                file: file.to_owned(),
                line,
                key: "registry.remove_after_ms".into(),
                message: "must not be shorter than registry.down_after_ms".into(),
            });
        }
        let issuer = match &raw.issuer {
            None => None,
            Some(section) => {
                let i = section.get_ref();
                let lifetime = i
                    .lifetime_s
                    .as_ref()
                    .map_or(Ok(DEFAULT_LIFETIME), |v| match *v.get_ref() {
                        10..=31_536_000 => Ok(Duration::from_secs(*v.get_ref())),
                        _ => Err(at.invalid(
                            v,
                            "issuer.lifetime_s",
                            "must be between 10 s and a year",
                        )),
                    })?;
                let grace =
                    i.grace_s
                        .as_ref()
                        .map_or(Ok(DEFAULT_GRACE), |v| match *v.get_ref() {
                            0..=31_536_000 => Ok(Duration::from_secs(*v.get_ref())),
                            _ => Err(at.invalid(v, "issuer.grace_s", "must be at most a year")),
                        })?;
                let located = |s: &Spanned<String>| Located {
                    value: base.join(s.get_ref()),
                    line: at.line(s.span().start),
                };
                Some(IssuerConfig {
                    cert: located(&i.cert),
                    key: located(&i.key),
                    lifetime,
                    grace,
                })
            }
        };
        let cloud = match &raw.cloud {
            None => None,
            Some(section) => Some(parse_cloud(section, &at, base, &node)?),
        };
        let otlp = match &raw.otlp {
            None => None,
            Some(section) => Some(parse_otlp(section, &at, base)?),
        };
        Ok(GatewayConfig {
            cloud,
            otlp,
            issuer,
            node,
            admin,
            admin_token_file: base.join(
                raw.admin_token_file
                    .as_ref()
                    .map_or("admin.token", |s| s.get_ref().as_str()),
            ),
            policy: raw.policy.as_ref().map(|s| Located {
                value: base.join(s.get_ref()),
                line: at.line(s.span().start),
            }),
            down_after,
            remove_after,
            max_traces: raw
                .traces
                .as_ref()
                .and_then(|t| t.get_ref().max_traces)
                .unwrap_or(1000)
                .clamp(1, 1_000_000) as usize,
            audit_log: base.join(
                raw.audit_log
                    .as_ref()
                    .map_or("audit.jsonl", |s| s.get_ref().as_str()),
            ),
        })
    }
}

/// Whether `name` may be set by an operator on every OTLP export: a valid header name that the
/// exporter or HTTP itself does not own (an `Authorization` value goes in `authorization_file`).
pub fn check_otlp_header(name: &str) -> Result<(), String> {
    let lower = name.to_ascii_lowercase();
    if hyper::header::HeaderName::from_bytes(lower.as_bytes()).is_err() {
        return Err("not a valid header name".into());
    }
    let owned = [
        "authorization",
        "content-type",
        "content-length",
        "content-encoding",
        "host",
        "te",
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ];
    if owned.contains(&lower.as_str()) || lower.starts_with("grpc-") {
        return Err(
            "set by the exporter or HTTP itself (an Authorization value goes in authorization_file)"
                .into(),
        );
    }
    Ok(())
}

/// The `[otlp]` section, checked: every error names the file, the line and the key.
fn parse_otlp(
    section: &Spanned<RawOtlp>,
    at: &SourceMap<'_>,
    base: &Path,
) -> Result<OtlpConfig, ConfigError> {
    let o = section.get_ref();
    let endpoint = o.endpoint.get_ref();
    let bad = |message: &str| at.invalid(&o.endpoint, "otlp.endpoint", message);
    let (tls, rest) = if let Some(rest) = endpoint.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(bad("expected https://host:port (or http://host:port)"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    if authority.contains('@') || path.contains(['?', '#']) {
        return Err(bad(
            "expected scheme://host[:port][/path] only (credentials go in authorization_file, \
             never in the address: it is shown and logged)",
        ));
    }
    let default_port = if tls { 443 } else { 80 };
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("bad port"))
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("no closing ]"))?;
        match after {
            "" => (host, default_port),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, port_of(p)?),
                None => return Err(bad("expected :port after the ]")),
            },
        }
    } else {
        match authority.split_once(':') {
            None => (authority, default_port),
            Some((_, p)) if p.contains(':') => {
                return Err(bad("an IPv6 address goes in brackets: [::1]:4318"));
            }
            Some((host, p)) => (host, port_of(p)?),
        }
    };
    if hyper::http::uri::Authority::try_from(authority).is_err()
        || (!path.is_empty() && hyper::http::uri::PathAndQuery::try_from(path).is_err())
    {
        return Err(bad(
            "not a valid URL (a host, a port, a path without spaces)",
        ));
    }
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !tls && !loopback && !o.insecure {
        return Err(bad(
            "http:// sends spans in clear text off this machine: use https://, or say \
             insecure = true",
        ));
    }
    let protocol = match o.protocol.as_ref().map(|p| p.get_ref().as_str()) {
        None | Some("http/protobuf") => OtlpProtocol::HttpProtobuf,
        Some("grpc") => OtlpProtocol::Grpc,
        Some(_) => {
            let p = o.protocol.as_ref().expect("matched Some");
            return Err(at.invalid(p, "otlp.protocol", "\"http/protobuf\" or \"grpc\""));
        }
    };
    if protocol == OtlpProtocol::Grpc && !path.is_empty() && path != "/" {
        return Err(bad("a gRPC endpoint has no path: scheme://host:port"));
    }
    let path = match path {
        "" | "/" => "/v1/traces".to_owned(),
        p => p.to_owned(),
    };
    let file = |s: &Spanned<String>| base.join(s.get_ref());
    let cert_key = match (&o.cert, &o.key) {
        (Some(cert), Some(key)) => Some((file(cert), file(key))),
        (None, None) => None,
        (Some(cert), None) => {
            return Err(at.invalid(cert, "otlp.key", "a client certificate needs its key"));
        }
        (None, Some(key)) => {
            return Err(at.invalid(key, "otlp.cert", "a client key needs its certificate"));
        }
    };
    if !tls && let Some(s) = o.ca.as_ref().or(o.cert.as_ref()) {
        return Err(at.invalid(
            s,
            "otlp.endpoint",
            "ca, cert and key need an https:// endpoint",
        ));
    }
    let mut headers = Vec::new();
    for (name, value) in &o.headers {
        let key = format!("otlp.headers.{name}");
        check_otlp_header(name).map_err(|e| at.invalid(value, &key, e))?;
        if hyper::header::HeaderValue::from_str(value.get_ref()).is_err() {
            return Err(at.invalid(value, &key, "not a valid header value"));
        }
        headers.push((name.to_ascii_lowercase(), value.get_ref().clone()));
    }
    let within = |v: &Option<Spanned<u64>>,
                  key: &str,
                  range: std::ops::RangeInclusive<u64>,
                  default: u64| match v {
        Some(n) if !range.contains(n.get_ref()) => {
            Err(at.invalid(n, key, format!("{} to {}", range.start(), range.end())))
        }
        Some(n) => Ok(*n.get_ref()),
        None => Ok(default),
    };
    // At most 4096: with a span's names bounded, a request stays under the 4 MiB a gRPC collector
    // takes by default.
    let max_batch_spans = within(&o.max_batch_spans, "otlp.max_batch_spans", 1..=4096, 512)?;
    let max_queue_spans = within(
        &o.max_queue_spans,
        "otlp.max_queue_spans",
        1..=1_000_000,
        4096,
    )?;
    if max_queue_spans < max_batch_spans {
        let at_key = o.max_queue_spans.as_ref().or(o.max_batch_spans.as_ref());
        if let Some(n) = at_key {
            return Err(at.invalid(
                n,
                "otlp.max_queue_spans",
                "must be at least max_batch_spans",
            ));
        }
    }
    Ok(OtlpConfig {
        protocol,
        tls,
        host: host.to_owned(),
        port,
        path,
        endpoint: endpoint.clone(),
        ca: o.ca.as_ref().map(file),
        cert_key,
        headers,
        authorization_file: o.authorization_file.as_ref().map(file),
        headers_file: o.headers_file.as_ref().map(file),
        batch_interval: Duration::from_millis(within(
            &o.batch_interval_ms,
            "otlp.batch_interval_ms",
            1..=600_000,
            5000,
        )?),
        max_batch_spans: max_batch_spans as usize,
        max_queue_spans: max_queue_spans as usize,
        timeout: Duration::from_millis(within(
            &o.timeout_ms,
            "otlp.timeout_ms",
            100..=600_000,
            10_000,
        )?),
        line: at.line(section.span().start),
    })
}

/// The `[cloud]` section, checked: every error names the file, the line and the key.
fn parse_cloud(
    section: &Spanned<RawCloud>,
    at: &SourceMap<'_>,
    base: &Path,
    node: &NodeConfig,
) -> Result<CloudConfig, ConfigError> {
    let c = section.get_ref();
    let (tls, rest) = if let Some(rest) = c.broker.get_ref().strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = c.broker.get_ref().strip_prefix("mqtt://") {
        if !c.insecure {
            return Err(at.invalid(
                &c.broker,
                "cloud.broker",
                "mqtt:// sends everything in clear text: use mqtts://, or say insecure = true",
            ));
        }
        (false, rest)
    } else {
        return Err(at.invalid(
            &c.broker,
            "cloud.broker",
            "expected mqtts://host:port (or mqtt://host:port with insecure = true)",
        ));
    };
    if rest.contains(['@', '/', '?']) {
        return Err(at.invalid(
            &c.broker,
            "cloud.broker",
            "expected scheme://host:port only (a user and password go in username and \
             password_file, never in the address: it is shown and logged)",
        ));
    }
    let port_ok = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok {
        return Err(at.invalid(
            &c.broker,
            "cloud.broker",
            "expected host:port after the scheme",
        ));
    }
    let path = |s: &Spanned<String>| base.join(s.get_ref());
    let cert_key = match (&c.cert, &c.key) {
        (Some(cert), Some(key)) => Some((path(cert), path(key))),
        (None, None) => None,
        (Some(cert), None) => {
            return Err(at.invalid(cert, "cloud.key", "a client certificate needs its key"));
        }
        (None, Some(key)) => {
            return Err(at.invalid(key, "cloud.cert", "a client key needs its certificate"));
        }
    };
    let user_password = match (&c.username, &c.password_file) {
        (Some(user), Some(file)) => Some((user.get_ref().clone(), path(file))),
        (None, None) => None,
        (Some(user), None) => {
            return Err(at.invalid(
                user,
                "cloud.password_file",
                "a user name needs a password_file",
            ));
        }
        (None, Some(file)) => {
            return Err(at.invalid(file, "cloud.username", "a password_file needs a user name"));
        }
    };
    let client_id = match &c.client_id {
        Some(id) => {
            // It names the cloud in the mesh too: spiffe://<td>/cloud/<client_id>.
            mesh_core::NodeName::try_from(id.get_ref().as_str()).map_err(|e| {
                at.invalid(
                    id,
                    "cloud.client_id",
                    format!("{e} (it is the cloud's name in the mesh as well)"),
                )
            })?;
            id.get_ref().clone()
        }
        None => node.name.as_str().to_owned(),
    };
    if let Some(prefix) = &c.topic_prefix {
        let p = prefix.get_ref();
        if p.is_empty() || p.contains(['+', '#']) || p.starts_with('/') || p.ends_with('/') {
            return Err(at.invalid(
                prefix,
                "cloud.topic_prefix",
                "a topic without wildcards (+, #) and without a leading or trailing /",
            ));
        }
    }
    let positive = |v: &Option<Spanned<u64>>, key: &str, default: u64| match v {
        Some(n) if *n.get_ref() == 0 => Err(at.invalid(n, key, "must be greater than 0")),
        Some(n) => Ok(*n.get_ref()),
        None => Ok(default),
    };
    // Zero: no limit.
    let ttl = |v: &Option<Spanned<u64>>, key: &str, default: u64| match v {
        Some(n) if *n.get_ref() > 10 * 365 * 86_400 => {
            Err(at.invalid(n, key, "at most 315360000 (ten years; 0 is no limit)"))
        }
        Some(n) => Ok(Duration::from_secs(*n.get_ref())),
        None => Ok(Duration::from_secs(default)),
    };
    Ok(CloudConfig {
        broker: rest.to_owned(),
        tls,
        client_id,
        topic_prefix: c.topic_prefix.as_ref().map(|p| p.get_ref().clone()),
        ca: c.ca.as_ref().map(path),
        cert_key,
        user_password,
        queue_dir: c
            .queue_dir
            .as_ref()
            .map_or_else(|| node.state_dir.join("cloud"), path),
        queue_max_bytes: positive(&c.queue_max_bytes, "cloud.queue_max_bytes", 256 << 20)?,
        queue_max_messages: positive(&c.queue_max_messages, "cloud.queue_max_messages", 1_000_000)?,
        keep_alive: Duration::from_secs(positive(&c.keep_alive_s, "cloud.keep_alive_s", 30)?),
        ttl: [
            ttl(&c.ttl_audit_s, "cloud.ttl_audit_s", 0)?,
            ttl(&c.ttl_status_s, "cloud.ttl_status_s", 0)?,
            ttl(&c.ttl_registry_s, "cloud.ttl_registry_s", 0)?,
            ttl(&c.ttl_telemetry_s, "cloud.ttl_telemetry_s", 7 * 86_400)?,
        ],
        max_inflight: match &c.max_inflight {
            Some(n) if *n.get_ref() == 0 || *n.get_ref() > 1024 => {
                return Err(at.invalid(n, "cloud.max_inflight", "1 to 1024"));
            }
            Some(n) => *n.get_ref() as u16,
            None => 64,
        },
        bandwidth: match &c.bandwidth_bytes_per_s {
            Some(n) if *n.get_ref() < 1024 => {
                return Err(at.invalid(
                    n,
                    "cloud.bandwidth_bytes_per_s",
                    "at least 1024 (a message must fit in a few seconds)",
                ));
            }
            other => other.as_ref().map(|n| *n.get_ref()),
        },
        max_message_bytes: match &c.max_message_bytes {
            Some(n) if *n.get_ref() < 1024 || *n.get_ref() > 64 << 20 => {
                return Err(at.invalid(n, "cloud.max_message_bytes", "1024 to 67108864"));
            }
            Some(n) => *n.get_ref() as usize,
            None => 1 << 20,
        },
        max_publish_bytes: match &c.max_publish_bytes {
            Some(n) if *n.get_ref() < 16_384 || *n.get_ref() > 256 << 20 => {
                return Err(at.invalid(n, "cloud.max_publish_bytes", "16384 to 268435456"));
            }
            Some(n) => *n.get_ref() as usize,
            None => 128 * 1024,
        },
        policy_signers: c
            .policy_signers
            .iter()
            .map(|p| Located {
                value: path(p),
                line: at.line(p.span().start),
            })
            .collect(),
        batch_interval: match &c.batch_interval_ms {
            Some(n) if *n.get_ref() > 600_000 => {
                return Err(at.invalid(n, "cloud.batch_interval_ms", "0 to 600000 (ten minutes)"));
            }
            Some(n) => Duration::from_millis(*n.get_ref()),
            None => Duration::ZERO,
        },
        protocol: match &c.protocol {
            None => None,
            Some(p) => match p.get_ref().as_str() {
                "auto" => None,
                "5" => Some(MqttVersion::V5),
                "3.1.1" => Some(MqttVersion::V311),
                _ => {
                    return Err(at.invalid(p, "cloud.protocol", "\"auto\", \"5\" or \"3.1.1\""));
                }
            },
        },
        line: at.line(section.span().start),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "name = \"gw\"\nadmin = \"127.0.0.1:9999\"\n[identity]\ncert = \"c\"\nkey = \"k\"\nca = \"a\"\n[registry]\ndown_after_ms = 100\n";

    #[test]
    fn parses_node_and_gateway_keys() {
        let c = GatewayConfig::parse(GOOD, "gw.toml", Path::new("/etc/starling")).expect("valid");
        assert_eq!(c.node.name.as_str(), "gw");
        assert_eq!(c.admin, "127.0.0.1:9999".parse().expect("addr"));
        assert_eq!(c.down_after, Duration::from_millis(100));
        assert_eq!(c.audit_log, Path::new("/etc/starling/audit.jsonl"));
        assert_eq!(
            c.node.ingress, None,
            "a gateway runs no ingress unless asked"
        );
        assert!(c.admin_warning().is_none());
        let open = GOOD.replace("127.0.0.1:9999", "0.0.0.0:9480");
        let c = GatewayConfig::parse(&open, "gw.toml", Path::new(".")).expect("valid");
        assert!(
            c.admin_warning()
                .expect("warns")
                .contains("reachable from the network")
        );
        let with_ingress = GOOD.replace("admin =", "ingress = \"127.0.0.1:7480\"\nadmin =");
        let c = GatewayConfig::parse(&with_ingress, "gw.toml", Path::new(".")).expect("valid");
        assert_eq!(
            c.node.ingress,
            Some("127.0.0.1:7480".parse().expect("addr"))
        );
    }

    #[test]
    fn a_gateway_holds_its_many_connections_lightly() {
        let c = GatewayConfig::parse(GOOD, "gw.toml", Path::new(".")).expect("valid");
        assert!(!c.node.limits.segmentation_offload);
        assert_eq!(c.node.limits.max_concurrent_calls, GATEWAY_CONCURRENT_CALLS);
        let set = format!("{GOOD}[limits]\nmax_concurrent_calls = 200\n");
        let c = GatewayConfig::parse(&set, "gw.toml", Path::new(".")).expect("valid");
        assert_eq!(c.node.limits.max_concurrent_calls, 200);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let src = GOOD.replace("admin =", "colour = 1\nadmin =");
        let e = GatewayConfig::parse(&src, "gw.toml", Path::new(".")).expect_err("colour");
        assert_eq!(
            e.to_string(),
            "gw.toml:2: colour: not a key of a gateway's config"
        );
        let src = GOOD.replace("down_after_ms", "up_after_ms");
        let e = GatewayConfig::parse(&src, "gw.toml", Path::new(".")).expect_err("nested");
        assert!(
            e.to_string().starts_with("gw.toml:8: registry.up_after_ms"),
            "{e}"
        );
        // A node reading a gateway's file names the first gateway key.
        let e = NodeConfig::parse(GOOD, "gw.toml", Path::new(".")).expect_err("admin");
        assert!(
            e.to_string()
                .starts_with("gw.toml:2: admin: not a key of a node's config")
        );
    }

    #[test]
    fn an_otlp_section_is_checked_key_by_key() {
        let with = |otlp: &str| format!("{GOOD}[otlp]\n{otlp}");
        let parse = |otlp: &str| GatewayConfig::parse(&with(otlp), "gw.toml", Path::new("/etc/s"));
        let c = parse("endpoint = \"http://127.0.0.1:4318\"\n").expect("valid");
        let o = c.otlp.expect("otlp");
        assert_eq!(
            (o.protocol, o.tls, o.host.as_str(), o.port, o.path.as_str()),
            (
                OtlpProtocol::HttpProtobuf,
                false,
                "127.0.0.1",
                4318,
                "/v1/traces"
            )
        );
        assert_eq!((o.max_batch_spans, o.max_queue_spans), (512, 4096));
        let o = parse(
            "endpoint = \"https://[2001:db8::1]\"\nprotocol = \"grpc\"\nca = \"ca.crt\"\n\
             headers = { X-Scope-OrgID = \"site-7\" }\nauthorization_file = \"otlp.token\"\n",
        )
        .expect("valid")
        .otlp
        .expect("otlp");
        assert_eq!((o.host.as_str(), o.port), ("2001:db8::1", 443));
        assert_eq!(
            o.headers,
            [("x-scope-orgid".to_owned(), "site-7".to_owned())]
        );
        assert_eq!(o.ca.as_deref(), Some(Path::new("/etc/s/ca.crt")));
        let o = parse("endpoint = \"https://tempo.example/otlp/v1/traces\"\n")
            .expect("valid")
            .otlp
            .expect("otlp");
        assert_eq!(o.path, "/otlp/v1/traces");

        let error = |otlp: &str| parse(otlp).expect_err(otlp).to_string();
        let e = error("endpoint = \"http://collector.example:4318\"\n");
        assert!(
            e.starts_with("gw.toml:10: otlp.endpoint: http:// sends spans in clear text"),
            "{e}"
        );
        assert!(parse("endpoint = \"http://collector.example:4318\"\ninsecure = true\n").is_ok());
        let e = error("endpoint = \"https://user:pw@collector.example\"\n");
        assert!(e.contains("credentials go in authorization_file"), "{e}");
        let e = error("endpoint = \"grpc://127.0.0.1:4317\"\n");
        assert!(
            e.contains("otlp.endpoint: expected https://host:port"),
            "{e}"
        );
        let e = error("endpoint = \"http://127.0.0.1:4317/x\"\nprotocol = \"grpc\"\n");
        assert!(e.contains("a gRPC endpoint has no path"), "{e}");
        let e = error("endpoint = \"http://127.0.0.1:0\"\n");
        assert!(e.contains("otlp.endpoint: bad port"), "{e}");
        let e = error("endpoint = \"http://::1:4318\"\n");
        assert!(e.contains("goes in brackets"), "{e}");
        let e = error("endpoint = \"http://127.0.0.1:4318\"\nprotocol = \"json\"\n");
        assert!(e.starts_with("gw.toml:11: otlp.protocol"), "{e}");
        let e =
            error("endpoint = \"http://127.0.0.1:4318\"\nheaders = { Authorization = \"x\" }\n");
        assert!(
            e.contains("otlp.headers.Authorization: set by the exporter"),
            "{e}"
        );
        let e = error("endpoint = \"http://127.0.0.1:4318\"\nca = \"ca.crt\"\n");
        assert!(e.contains("need an https:// endpoint"), "{e}");
        let e = error("endpoint = \"https://127.0.0.1:4318\"\ncert = \"c.crt\"\n");
        assert!(
            e.contains("otlp.key: a client certificate needs its key"),
            "{e}"
        );
        let e = error("endpoint = \"http://127.0.0.1:4318\"\nmax_batch_spans = 0\n");
        assert!(e.contains("otlp.max_batch_spans: 1 to 4096"), "{e}");
        let e = error(
            "endpoint = \"http://127.0.0.1:4318\"\nmax_batch_spans = 100\nmax_queue_spans = 10\n",
        );
        assert!(
            e.contains("otlp.max_queue_spans: must be at least max_batch_spans"),
            "{e}"
        );
        let e = error("endpoint = \"https://c.example/v1/my traces\"\n");
        assert!(e.contains("otlp.endpoint: not a valid URL"), "{e}");
        let e = error("endpoint = \"https://c.example/\"\nheaders = { Keep-Alive = \"1\" }\n");
        assert!(e.contains("set by the exporter or HTTP itself"), "{e}");
        let e = error("endpoint = \"http://127.0.0.1:4318\"\ncolour = 1\n");
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn a_cloud_section_is_checked_key_by_key() {
        let with = |cloud: &str| format!("{GOOD}[cloud]\n{cloud}");
        let c = GatewayConfig::parse(
            &with("broker = \"mqtts://broker.example:8883\"\ncert = \"c.crt\"\nkey = \"c.key\"\n"),
            "gw.toml",
            Path::new("/etc/starling"),
        )
        .expect("valid");
        let cloud = c.cloud.expect("cloud");
        assert_eq!(
            (cloud.broker.as_str(), cloud.tls),
            ("broker.example:8883", true)
        );
        assert_eq!(cloud.client_id, "gw");
        assert_eq!(cloud.queue_dir, Path::new("/var/lib/starling/cloud"));
        let error = |cloud: &str| {
            GatewayConfig::parse(&with(cloud), "gw.toml", Path::new("."))
                .expect_err(cloud)
                .to_string()
        };
        let e = error("broker = \"mqtt://b:1883\"\n");
        assert!(
            e.starts_with("gw.toml:10: cloud.broker: mqtt:// sends everything in clear text"),
            "{e}"
        );
        assert!(
            GatewayConfig::parse(
                &with("broker = \"mqtt://b:1883\"\ninsecure = true\n"),
                "gw.toml",
                Path::new(".")
            )
            .is_ok()
        );
        let e = error("broker = \"mqtts://b\"\n");
        assert!(e.contains("cloud.broker: expected host:port"), "{e}");
        let e = error("broker = \"mqtts://b:8883\"\ncert = \"c\"\n");
        assert!(
            e.contains("cloud.key: a client certificate needs its key"),
            "{e}"
        );
        let e = error("broker = \"mqtts://b:8883\"\ntopic_prefix = \"site/#\"\n");
        assert!(e.starts_with("gw.toml:11: cloud.topic_prefix"), "{e}");
        let e = error("broker = \"mqtts://b:8883\"\nprotocol = \"4\"\n");
        assert!(
            e.starts_with("gw.toml:11: cloud.protocol: \"auto\", \"5\" or \"3.1.1\""),
            "{e}"
        );
        let e = error("broker = \"mqtts://b:8883\"\nmax_inflight = 0\n");
        assert!(
            e.starts_with("gw.toml:11: cloud.max_inflight: 1 to 1024"),
            "{e}"
        );
        let e = error("broker = \"mqtts://b:8883\"\nbandwidth_bytes_per_s = 10\n");
        assert!(
            e.contains("cloud.bandwidth_bytes_per_s: at least 1024"),
            "{e}"
        );
        let e = error("broker = \"mqtts://b:8883\"\nclient_id = \"a/b\"\n");
        assert!(e.starts_with("gw.toml:11: cloud.client_id"), "{e}");
        let c = GatewayConfig::parse(
            &with("broker = \"mqtts://b:8883\"\nprotocol = \"3.1.1\"\nttl_audit_s = 60\n"),
            "gw.toml",
            Path::new("."),
        )
        .expect("valid");
        let cloud = c.cloud.expect("cloud");
        assert_eq!(cloud.protocol, Some(MqttVersion::V311));
        assert_eq!(cloud.ttl[0], Duration::from_secs(60));
        let e = error("broker = \"mqtts://b:8883\"\nqueue_max_bytes = 0\n");
        assert!(
            e.contains("cloud.queue_max_bytes: must be greater than 0"),
            "{e}"
        );
        let e = error("broker = \"mqtts://b:8883\"\ncolour = 1\n");
        assert!(e.contains("colour"), "{e}");
    }
}
