//! Export of the spans nodes send the gateway to an OpenTelemetry collector over OTLP
//! (HTTP/protobuf or gRPC), so Jaeger, Tempo or any collector shows a call across nodes.
//!
//! The messages are the official `opentelemetry-proto` definitions. Each node is its own
//! resource (`service.name` = the node's name as its certificate says), as a collector relaying
//! for many processes forwards them: one export carries the spans of many nodes. W3C trace and
//! span ids go out as the nodes recorded them.
//!
//! Spans wait in a bounded queue (`max_queue_spans`; past it the oldest go, counted) and leave in
//! batches (`max_batch_spans`, or `batch_interval` after the first). A batch the collector cannot
//! take now (connection refused, HTTP 429/502/503/504, gRPC UNAVAILABLE and the other retryable
//! codes) is retried with exponential backoff and jitter, honouring `Retry-After`, until it is
//! accepted; a batch it refuses for good (HTTP 400, gRPC INVALID_ARGUMENT, ...) is dropped and
//! counted, as are spans its partial success rejects. Memory is bounded by the queue plus one
//! batch. Nothing of this is on a call's path: nodes send spans in their telemetry batches.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::lock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mesh_proto::control::Span;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span as OtlpSpan, Status as SpanStatus, span::SpanKind,
    status::StatusCode,
};
use prost::Message;
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::config::{OtlpConfig, OtlpProtocol};

/// The first wait after a failed export; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two attempts (a `Retry-After` is honoured up to this too).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The most of a collector's answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// A span's service, method and node names at most: with `max_batch_spans` at most 4096, a
/// request stays under the 4 MiB a gRPC collector takes by default.
const MAX_NAME_BYTES: usize = 256;
/// What of a collector's message goes into a log line.
const MAX_LOGGED_CHARS: usize = 200;

/// The exporter: a bounded queue in front of one task that batches and sends.
#[derive(Clone)]
pub struct Exporter {
    shared: Arc<Shared>,
}

struct Shared {
    config: OtlpConfig,
    /// The gateway's name and the trust domain, on every resource.
    gateway: String,
    trust_domain: String,
    queue: Mutex<VecDeque<Span>>,
    wake: Notify,
    stats: Stats,
    /// The transport, taken by the task when it starts.
    transport: Mutex<Option<Transport>>,
}

#[derive(Default)]
struct Stats {
    exported: AtomicU64,
    rejected: AtomicU64,
    dropped: AtomicU64,
    requests_ok: AtomicU64,
    requests_retried: AtomicU64,
    requests_failed: AtomicU64,
}

/// What `/metrics` shows of the exporter.
#[derive(Debug, Clone, Serialize)]
pub struct OtlpStatus {
    /// The collector, as configured.
    pub endpoint: String,
    /// Spans waiting.
    pub queued: u64,
    /// Spans the collector accepted.
    pub exported: u64,
    /// Spans the collector refused (or that were invalid: an all-zero id).
    pub rejected: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Export requests answered with success.
    pub requests_ok: u64,
    /// Export attempts to be retried (the collector away or busy).
    pub requests_retried: u64,
    /// Export requests refused for good.
    pub requests_failed: u64,
}

impl Exporter {
    /// What `check-config` checks beyond the file: the TLS config and the authorization file
    /// load. Errors name the file and the section.
    pub fn check(config: &OtlpConfig, file: &str) -> Result<(), String> {
        // What Transport::new reads, without making a client (a gRPC channel needs a runtime).
        Target::new(config, b"h2")
            .and_then(|_| headers(config))
            .map(drop)
            .map_err(|e| format!("{file}:{}: [otlp]: {e}", config.line))
    }

    /// An exporter for `config`, not yet sending (see [`Exporter::start`]).
    pub fn new(config: &OtlpConfig, gateway: &str, trust_domain: &str) -> Result<Self, String> {
        let transport = Transport::new(config)?;
        Ok(Exporter {
            shared: Arc::new(Shared {
                config: config.clone(),
                gateway: gateway.to_owned(),
                trust_domain: trust_domain.to_owned(),
                queue: Mutex::new(VecDeque::new()),
                wake: Notify::new(),
                stats: Stats::default(),
                transport: Mutex::new(Some(transport)),
            }),
        })
    }

    /// Starts the task that sends, until `stop` changes.
    pub fn start(&self, stop: watch::Receiver<bool>) {
        let Some(transport) = lock(&self.shared.transport).take() else {
            return;
        };
        info!(
            "exporting spans over OTLP ({}) to {}",
            match self.shared.config.protocol {
                OtlpProtocol::HttpProtobuf => "http/protobuf",
                OtlpProtocol::Grpc => "grpc",
            },
            self.shared.config.endpoint
        );
        tokio::spawn(run(self.shared.clone(), transport, stop));
    }

    /// Queues a span; the oldest goes (counted) when the queue is full.
    pub fn push(&self, mut span: Span) {
        // W3C: all-zero ids are invalid, and a collector may refuse the whole batch for one. Names
        // are bounded so that the queue and a request are bounded in bytes too, whatever a node
        // sends.
        if span.trace_id == [0; 16]
            || span.span_id == [0; 8]
            || span.service.len() > MAX_NAME_BYTES
            || span.method.len() > MAX_NAME_BYTES
            || span.node.len() > MAX_NAME_BYTES
        {
            self.shared.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if span.parent_span_id == Some([0; 8]) {
            span.parent_span_id = None;
        }
        let len = {
            let mut queue = lock(&self.shared.queue);
            if queue.len() >= self.shared.config.max_queue_spans {
                queue.pop_front();
                self.shared.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(span);
            queue.len()
        };
        if len == 1 || len >= self.shared.config.max_batch_spans {
            self.shared.wake.notify_one();
        }
    }

    /// The counters.
    pub fn status(&self) -> OtlpStatus {
        let s = &self.shared.stats;
        OtlpStatus {
            endpoint: self.shared.config.endpoint.clone(),
            queued: lock(&self.shared.queue).len() as u64,
            exported: s.exported.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            requests_ok: s.requests_ok.load(Ordering::Relaxed),
            requests_retried: s.requests_retried.load(Ordering::Relaxed),
            requests_failed: s.requests_failed.load(Ordering::Relaxed),
        }
    }
}

/// Batches and sends until `stop` changes.
async fn run(shared: Arc<Shared>, mut transport: Transport, mut stop: watch::Receiver<bool>) {
    let config = &shared.config;
    let mut failing = false;
    loop {
        // A first span.
        while lock(&shared.queue).is_empty() {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
        // More, until the batch is full or its time is up.
        let deadline = tokio::time::Instant::now() + config.batch_interval;
        while lock(&shared.queue).len() < config.max_batch_spans {
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => return,
            }
        }
        let batch: Vec<Span> = {
            let mut queue = lock(&shared.queue);
            let n = queue.len().min(config.max_batch_spans);
            queue.drain(..n).collect()
        };
        let request = request(&batch, &shared.gateway, &shared.trust_domain);
        let n = batch.len() as u64;
        drop(batch);
        let mut backoff = FIRST_BACKOFF;
        loop {
            match transport.send(&request, config).await {
                Attempt::Done { rejected, message } => {
                    let stats = &shared.stats;
                    stats.requests_ok.fetch_add(1, Ordering::Relaxed);
                    let rejected = rejected.min(n);
                    stats.exported.fetch_add(n - rejected, Ordering::Relaxed);
                    stats.rejected.fetch_add(rejected, Ordering::Relaxed);
                    if rejected > 0 || !message.is_empty() {
                        warn!(
                            "the collector at {} rejected {rejected} of {n} spans: {}",
                            config.endpoint,
                            short(&message)
                        );
                    }
                    if failing {
                        info!("spans reach the collector at {} again", config.endpoint);
                        failing = false;
                    }
                    break;
                }
                Attempt::Failed(reason) => {
                    shared.stats.requests_failed.fetch_add(1, Ordering::Relaxed);
                    shared.stats.rejected.fetch_add(n, Ordering::Relaxed);
                    warn!(
                        "the collector at {} refused {n} spans: {reason} (dropped, counted in \
                         starling_otlp_spans_total)",
                        config.endpoint
                    );
                    break;
                }
                Attempt::Retry { after, reason } => {
                    shared
                        .stats
                        .requests_retried
                        .fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        warn!(
                            "cannot export spans to {}: {reason}; retrying (spans wait, at most \
                             {} of them)",
                            config.endpoint, config.max_queue_spans
                        );
                        failing = true;
                    }
                    // What the collector asked, but never less than the backoff (a hostile or
                    // confused `Retry-After: 0` does not make a busy loop).
                    let wait = after
                        .unwrap_or_default()
                        .max(jitter(backoff))
                        .min(MAX_BACKOFF);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }
}

/// What a collector said, for a log line: printable, and not too long.
fn short(message: &str) -> String {
    let text = mesh_node::process::printable(message);
    match text.char_indices().nth(MAX_LOGGED_CHARS) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text,
    }
}

/// `d` scaled by a random factor in [0.5, 1.5), so sites whose collector came back do not all
/// retry at once.
fn jitter(d: Duration) -> Duration {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 1];
    let r = ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_or(128, |()| b[0]);
    d.mul_f64(0.5 + f64::from(r) / 256.0)
}

/// One export request: the batch's spans grouped by node, each node a resource.
pub fn request(batch: &[Span], gateway: &str, trust_domain: &str) -> ExportTraceServiceRequest {
    let mut by_node: BTreeMap<&str, Vec<OtlpSpan>> = BTreeMap::new();
    for span in batch {
        by_node.entry(&span.node).or_default().push(convert(span));
    }
    let scope = InstrumentationScope {
        name: "starling".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    ExportTraceServiceRequest {
        resource_spans: by_node
            .into_iter()
            .map(|(node, spans)| ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", node),
                        kv("service.namespace", trust_domain),
                        kv("starling.node", node),
                        kv("starling.gateway", gateway),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(scope.clone()),
                    spans,
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            })
            .collect(),
    }
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// A node's span as OTLP has it: named `service/method` (the RPC convention), the RPC
/// attributes, sampled, its parent marked remote (a caller's span is always in another process).
fn convert(s: &Span) -> OtlpSpan {
    const SAMPLED: u32 = 0x01;
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    let start = s.start_unix_us.saturating_mul(1000);
    OtlpSpan {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: SAMPLED
            | HAS_IS_REMOTE
            | if s.parent_span_id.is_some() {
                IS_REMOTE
            } else {
                0
            },
        name: format!("{}/{}", s.service, s.method),
        kind: if s.client {
            SpanKind::Client
        } else {
            SpanKind::Server
        } as i32,
        start_time_unix_nano: start,
        end_time_unix_nano: start.saturating_add(s.duration_us.saturating_mul(1000)),
        attributes: vec![
            kv("rpc.system", "starling"),
            kv("rpc.service", &s.service),
            kv("rpc.method", &s.method),
            kv("starling.status", s.status.as_str()),
        ],
        status: Some(if s.status == mesh_proto::Status::Ok {
            SpanStatus::default()
        } else {
            SpanStatus {
                message: s.status.as_str().into(),
                code: StatusCode::Error as i32,
            }
        }),
        ..Default::default()
    }
}

/// How one attempt ended.
enum Attempt {
    /// Accepted; `rejected` spans of it refused (partial success) with `message`.
    Done { rejected: u64, message: String },
    /// Not now: try again (after what the collector asked, if it did).
    Retry {
        after: Option<Duration>,
        reason: String,
    },
    /// Refused for good.
    Failed(String),
}

/// A byte stream to the collector: TCP, or TLS over it.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// Where and how to connect.
#[derive(Clone)]
struct Target {
    host: String,
    port: u16,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

impl Target {
    fn new(config: &OtlpConfig, alpn: &[u8]) -> Result<Self, String> {
        let tls = if config.tls {
            let mut tls =
                crate::tls::client_config(config.ca.as_deref(), config.cert_key.as_ref())?;
            tls.alpn_protocols = vec![alpn.to_vec()];
            let name = ServerName::try_from(config.host.clone())
                .map_err(|e| format!("endpoint host {:?}: {e}", config.host))?;
            Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name))
        } else {
            None
        };
        Ok(Target {
            host: config.host.clone(),
            port: config.port,
            tls,
            timeout: config.timeout,
        })
    }

    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
        let tcp = tokio::time::timeout(
            self.timeout,
            TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| timed_out())??;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| timed_out())??;
                Ok(Box::new(tls))
            }
        }
    }
}

enum Transport {
    Http(HttpLink),
    Grpc {
        client: TraceServiceClient<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
}

struct HttpLink {
    target: Target,
    authority: String,
    headers: hyper::HeaderMap,
    sender: Option<SendRequest<Full<Bytes>>>,
}

/// The headers of every export: the configured ones and the authorization file's value.
fn headers(config: &OtlpConfig) -> Result<hyper::HeaderMap, String> {
    use hyper::header::{HeaderName, HeaderValue};
    let mut map = hyper::HeaderMap::new();
    let mut add = |name: &str, value: &str, from: &str| -> Result<(), String> {
        let name = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
            .map_err(|e| format!("{from}: header {name:?}: {e}"))?;
        let mut value = HeaderValue::from_str(value)
            .map_err(|_| format!("{from}: header {name}: not a valid header value"))?;
        // Values may be API keys: never shown in a debug print.
        value.set_sensitive(true);
        map.append(name, value);
        Ok(())
    };
    for (name, value) in &config.headers {
        add(name, value, "headers")?;
    }
    if let Some(file) = &config.headers_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("headers_file {}: {e}", file.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let from = format!("headers_file {}:{}", file.display(), i + 1);
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("{from}: expected `name: value`"))?;
            let name = name.trim();
            if let Err(e) = crate::config::check_otlp_header(name) {
                return Err(format!("{from}: {e}"));
            }
            add(name, value.trim(), &from)?;
        }
    }
    if let Some(file) = &config.authorization_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| format!("authorization_file {}: {e}", file.display()))?;
        let mut value = HeaderValue::from_str(text.trim()).map_err(|_| {
            format!(
                "authorization_file {}: not a valid header value",
                file.display()
            )
        })?;
        value.set_sensitive(true);
        map.insert(hyper::header::AUTHORIZATION, value);
    }
    Ok(map)
}

impl Transport {
    fn new(config: &OtlpConfig) -> Result<Self, String> {
        let headers = headers(config)?;
        let authority = if config.host.contains(':') {
            format!("[{}]:{}", config.host, config.port)
        } else {
            format!("{}:{}", config.host, config.port)
        };
        match config.protocol {
            OtlpProtocol::HttpProtobuf => Ok(Transport::Http(HttpLink {
                target: Target::new(config, b"http/1.1")?,
                authority,
                headers,
                sender: None,
            })),
            OtlpProtocol::Grpc => {
                let target = Target::new(config, b"h2")?;
                let scheme = if config.tls { "https" } else { "http" };
                let endpoint =
                    tonic::transport::Endpoint::from_shared(format!("{scheme}://{authority}"))
                        .map_err(|e| format!("endpoint: {e}"))?
                        .connect_timeout(config.timeout)
                        .timeout(config.timeout);
                let connector = tower::service_fn(move |_: hyper::Uri| {
                    let target = target.clone();
                    async move { target.connect().await.map(TokioIo::new) }
                });
                let channel = endpoint.connect_with_connector_lazy(connector);
                Ok(Transport::Grpc {
                    client: TraceServiceClient::new(channel),
                    metadata: tonic::metadata::MetadataMap::from_headers(headers),
                })
            }
        }
    }

    async fn send(&mut self, request: &ExportTraceServiceRequest, config: &OtlpConfig) -> Attempt {
        match self {
            Transport::Http(link) => link.send(request.encode_to_vec().into(), config).await,
            Transport::Grpc { client, metadata } => {
                let mut req = tonic::Request::new(request.clone());
                *req.metadata_mut() = metadata.clone();
                // tonic bounds the call with the endpoint's timeout; this bounds the wait for a
                // connection too.
                match tokio::time::timeout(config.timeout * 2, client.export(req)).await {
                    Err(_) => Attempt::Retry {
                        after: None,
                        reason: "timed out".into(),
                    },
                    Ok(Ok(answer)) => partial(answer.into_inner()),
                    Ok(Err(status)) => {
                        use tonic::Code;
                        let reason =
                            format!("gRPC {:?}: {}", status.code(), short(status.message()));
                        match status.code() {
                            Code::Cancelled
                            | Code::DeadlineExceeded
                            | Code::Aborted
                            | Code::OutOfRange
                            | Code::Unavailable
                            | Code::DataLoss => Attempt::Retry {
                                after: None,
                                reason,
                            },
                            // OTLP: retryable only when the collector says when (RetryInfo).
                            Code::ResourceExhausted => match retry_info(status.details()) {
                                Some(after) => Attempt::Retry {
                                    after: Some(after),
                                    reason,
                                },
                                None => Attempt::Failed(reason),
                            },
                            _ => Attempt::Failed(reason),
                        }
                    }
                }
            }
        }
    }
}

/// What a successful answer says of the spans it did not take.
fn partial(answer: ExportTraceServiceResponse) -> Attempt {
    match answer.partial_success {
        Some(p) => Attempt::Done {
            rejected: u64::try_from(p.rejected_spans).unwrap_or(0),
            message: p.error_message,
        },
        None => Attempt::Done {
            rejected: 0,
            message: String::new(),
        },
    }
}

/// The body of an OTLP/HTTP error, and a gRPC status's details: a `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<RpcAny>,
}

/// `google.protobuf.Any`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcAny {
    #[prost(string, tag = "1")]
    type_url: String,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// `google.rpc.RetryInfo`.
#[derive(Clone, PartialEq, prost::Message)]
struct RetryInfo {
    #[prost(message, optional, tag = "1")]
    retry_delay: Option<RpcDuration>,
}

/// `google.protobuf.Duration`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcDuration {
    #[prost(int64, tag = "1")]
    seconds: i64,
    #[prost(int32, tag = "2")]
    nanos: i32,
}

/// The delay a gRPC status's `RetryInfo` asks for, if it carries one.
fn retry_info(details: &[u8]) -> Option<Duration> {
    let status = RpcStatus::decode(details).ok()?;
    let info = status
        .details
        .iter()
        .find(|d| d.type_url.ends_with("/google.rpc.RetryInfo"))?;
    let delay = RetryInfo::decode(info.value.as_slice()).ok()?.retry_delay?;
    let secs = u64::try_from(delay.seconds).ok()?;
    let nanos = u32::try_from(delay.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)?;
    Some(Duration::new(secs.min(MAX_BACKOFF.as_secs()), nanos))
}

impl HttpLink {
    async fn send(&mut self, body: Bytes, config: &OtlpConfig) -> Attempt {
        let retry = |reason: String| Attempt::Retry {
            after: None,
            reason,
        };
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => match self.connect().await {
                Ok(s) => s,
                Err(e) => return retry(format!("cannot connect: {e}")),
            },
        };
        let mut req = match hyper::Request::post(config.path.as_str())
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(body))
        {
            Ok(req) => req,
            // The config's checks make this unreachable; should it happen, the batch is refused
            // (counted) rather than the task stopped.
            Err(e) => return Attempt::Failed(format!("the request cannot be made: {e}")),
        };
        req.headers_mut().extend(self.headers.clone());
        let answer = match tokio::time::timeout(config.timeout, sender.send_request(req)).await {
            Err(_) => return retry("timed out".into()),
            Ok(Err(e)) => return retry(e.to_string()),
            Ok(Ok(answer)) => answer,
        };
        let status = answer.status();
        let after = answer
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = match tokio::time::timeout(
            config.timeout,
            Limited::new(answer.into_body(), MAX_ANSWER_BYTES).collect(),
        )
        .await
        {
            Ok(Ok(body)) => body.to_bytes(),
            // An answer cut short or too long: the connection is not reused.
            _ => {
                return if status.is_success() {
                    Attempt::Done {
                        rejected: 0,
                        message: String::new(),
                    }
                } else {
                    retry(format!("HTTP {status}"))
                };
            }
        };
        self.sender = Some(sender);
        if status.is_success() {
            return match ExportTraceServiceResponse::decode(bytes) {
                Ok(answer) => partial(answer),
                Err(_) => Attempt::Done {
                    rejected: 0,
                    message: String::new(),
                },
            };
        }
        let detail = RpcStatus::decode(bytes.clone())
            .ok()
            .filter(|s| !s.message.is_empty())
            .map(|s| s.message)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into());
        let reason = format!("HTTP {status}: {}", short(detail.trim()));
        match status.as_u16() {
            429 | 502 | 503 | 504 => Attempt::Retry { after, reason },
            _ => Attempt::Failed(reason),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, String> {
        let io = self.target.connect().await.map_err(|e| e.to_string())?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

/// The `/metrics` lines of the exporter.
pub fn render_metrics(status: &OtlpStatus, out: &mut String) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "# HELP starling_otlp_spans_total Spans for the OTLP collector, by outcome: exported, \
         rejected (refused by the collector, or invalid), dropped (the queue was full).\n\
         # TYPE starling_otlp_spans_total counter\n\
         starling_otlp_spans_total{{outcome=\"exported\"}} {}\n\
         starling_otlp_spans_total{{outcome=\"rejected\"}} {}\n\
         starling_otlp_spans_total{{outcome=\"dropped\"}} {}\n\
         # HELP starling_otlp_queue_spans Spans waiting for export to the OTLP collector.\n\
         # TYPE starling_otlp_queue_spans gauge\n\
         starling_otlp_queue_spans {}\n\
         # HELP starling_otlp_requests_total Export attempts to the OTLP collector, by result: \
         ok, retry (the collector away or busy), failed (refused for good).\n\
         # TYPE starling_otlp_requests_total counter\n\
         starling_otlp_requests_total{{result=\"ok\"}} {}\n\
         starling_otlp_requests_total{{result=\"retry\"}} {}\n\
         starling_otlp_requests_total{{result=\"failed\"}} {}",
        status.exported,
        status.rejected,
        status.dropped,
        status.queued,
        status.requests_ok,
        status.requests_retried,
        status.requests_failed,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::Status;

    fn span(node: &str, id: u8, parent: Option<u8>, client: bool, status: Status) -> Span {
        Span {
            trace_id: [7; 16],
            span_id: [id; 8],
            parent_span_id: parent.map(|p| [p; 8]),
            client,
            node: node.into(),
            service: "echo".into(),
            method: "say".into(),
            start_unix_us: 1_000_000,
            duration_us: 250,
            status,
        }
    }

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
        attrs.iter().find(|a| a.key == key).and_then(|a| {
            match a.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.as_str()),
                _ => None,
            }
        })
    }

    #[test]
    fn one_request_carries_each_node_as_its_own_resource() {
        let batch = [
            span("node-c", 1, Some(9), true, Status::Ok),
            span("node-b", 2, Some(1), false, Status::Unavailable),
            span("node-c", 3, None, true, Status::Ok),
        ];
        let req = request(&batch, "gw", "starling.local");
        let nodes: Vec<_> = req
            .resource_spans
            .iter()
            .map(|r| {
                let attrs = &r.resource.as_ref().expect("resource").attributes;
                (
                    attr(attrs, "service.name").expect("service.name"),
                    r.scope_spans[0].spans.len(),
                )
            })
            .collect();
        assert_eq!(nodes, [("node-b", 1), ("node-c", 2)]);
        let server = &req.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(server.trace_id, [7; 16]);
        assert_eq!(server.span_id, [2; 8]);
        assert_eq!(server.parent_span_id, [1; 8]);
        assert_eq!(server.kind, SpanKind::Server as i32);
        assert_eq!(server.name, "echo/say");
        assert_eq!(server.flags, 0x301);
        assert_eq!(server.start_time_unix_nano, 1_000_000_000);
        assert_eq!(server.end_time_unix_nano, 1_000_250_000);
        let status = server.status.as_ref().expect("status");
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(attr(&server.attributes, "rpc.service"), Some("echo"));
        let root = &req.resource_spans[1].scope_spans[0].spans[1];
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.flags, 0x101);
        assert_eq!(
            root.status.as_ref().expect("status").code,
            StatusCode::Unset as i32
        );
    }

    fn config(max_queue: usize, max_batch: usize) -> OtlpConfig {
        OtlpConfig {
            protocol: OtlpProtocol::HttpProtobuf,
            tls: false,
            host: "127.0.0.1".into(),
            port: 9,
            path: "/v1/traces".into(),
            endpoint: "http://127.0.0.1:9".into(),
            ca: None,
            cert_key: None,
            headers: Vec::new(),
            authorization_file: None,
            headers_file: None,
            batch_interval: Duration::from_secs(1),
            max_batch_spans: max_batch,
            max_queue_spans: max_queue,
            timeout: Duration::from_secs(1),
            line: 1,
        }
    }

    #[test]
    fn the_queue_is_bounded_and_drops_the_oldest_counted() {
        let e = Exporter::new(&config(3, 2), "gw", "td").expect("exporter");
        for id in 1..=5 {
            e.push(span("a", id, None, true, Status::Ok));
        }
        e.push(Span {
            trace_id: [0; 16],
            ..span("a", 6, None, true, Status::Ok)
        });
        let s = e.status();
        assert_eq!((s.queued, s.dropped, s.rejected), (3, 2, 1));
        let kept: Vec<u8> = lock(&e.shared.queue).iter().map(|s| s.span_id[0]).collect();
        assert_eq!(kept, [3, 4, 5]);
    }

    #[test]
    fn names_past_their_bound_are_rejected_and_a_zero_parent_is_none() {
        let e = Exporter::new(&config(10, 10), "gw", "td").expect("exporter");
        e.push(Span {
            method: "m".repeat(MAX_NAME_BYTES + 1),
            ..span("a", 1, None, true, Status::Ok)
        });
        e.push(span("a", 2, Some(0), false, Status::Ok));
        let s = e.status();
        assert_eq!((s.queued, s.rejected), (1, 1));
        assert_eq!(lock(&e.shared.queue)[0].parent_span_id, None);
    }

    #[test]
    fn a_resource_exhausted_status_is_retried_only_when_it_says_when() {
        let info = RetryInfo {
            retry_delay: Some(RpcDuration {
                seconds: 3,
                nanos: 500_000_000,
            }),
        };
        let status = RpcStatus {
            code: 8,
            message: "slow down".into(),
            details: vec![RpcAny {
                type_url: "type.googleapis.com/google.rpc.RetryInfo".into(),
                value: info.encode_to_vec(),
            }],
        };
        assert_eq!(
            retry_info(&status.encode_to_vec()),
            Some(Duration::from_millis(3500))
        );
        assert_eq!(retry_info(&[]), None);
        assert_eq!(retry_info(b"\xff\xff garbage"), None);
        let long = "x".repeat(1000);
        assert_eq!(short(&long).len(), MAX_LOGGED_CHARS + 3);
    }
}
