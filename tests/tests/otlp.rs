//! Spans to the tools people use (issue 16): the gateway exports the spans nodes send over OTLP,
//! HTTP/protobuf and gRPC, to a collector built here from the official `opentelemetry-proto`
//! definitions (no collector is packaged for Debian). The tests check the spans of traced calls
//! across two nodes (ids, parent links, service and node names), the batching, the headers, and
//! that a collector away or busy at first gets the spans once it takes them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use starling_tests::{NodeProc, Pki, eventually, metrics, prepend, quick_gateway};

const UP: Duration = Duration::from_secs(20);

/// What the collector received, and how many answers it still refuses.
#[derive(Default)]
struct Collector {
    requests: Mutex<Vec<ExportTraceServiceRequest>>,
    /// Headers of the last request: authorization, x-scope-orgid.
    headers: Mutex<Vec<(String, String)>>,
    refuse: AtomicU32,
    refused: AtomicU32,
}

impl Collector {
    fn record(&self, req: ExportTraceServiceRequest, headers: Vec<(String, String)>) -> bool {
        if self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return false;
        }
        *self.headers.lock().expect("lock") = headers;
        self.requests.lock().expect("lock").push(req);
        true
    }

    /// Every span received, with the `service.name` of its resource.
    fn spans(&self) -> Vec<(String, Span)> {
        let requests = self.requests.lock().expect("lock");
        requests
            .iter()
            .flat_map(|r| &r.resource_spans)
            .flat_map(|rs| {
                let node = rs
                    .resource
                    .as_ref()
                    .and_then(|r| attr(&r.attributes, "service.name"))
                    .unwrap_or_default()
                    .to_owned();
                rs.scope_spans
                    .iter()
                    .flat_map(|s| &s.spans)
                    .map(move |s| (node.clone(), s.clone()))
            })
            .collect()
    }
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attrs
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

/// The headers a test looks for.
fn wanted(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    ["authorization", "x-scope-orgid", "x-api-key"]
        .iter()
        .filter_map(|k| {
            let v = headers.get(*k)?.to_str().ok()?;
            Some(((*k).to_owned(), v.to_owned()))
        })
        .collect()
}

/// A byte stream from the exporter: TCP, or TLS over it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Serves `collector` on `listener` (behind `tls` if given): OTLP/HTTP (`POST /v1/traces` with a
/// protobuf body; 503 while refusing) and OTLP/gRPC (`TraceService/Export`; UNAVAILABLE while
/// refusing), told apart by the request's content type.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    collector: Arc<Collector>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (tls, collector) = (tls.clone(), collector.clone());
        tokio::spawn(async move {
            let io: Box<dyn Io> = match tls {
                None => Box::new(tcp),
                Some(tls) => match tls.accept(tcp).await {
                    Ok(s) => Box::new(s),
                    Err(_) => return,
                },
            };
            let grpc = <_ as tower::ServiceExt<hyper::Request<Incoming>>>::map_response(
                TraceServiceServer::new(Grpc(collector.clone())),
                |r| r.map(http_body_util::BodyExt::boxed_unsync),
            );
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let (collector, mut grpc) = (collector.clone(), grpc.clone());
                async move {
                    let is_grpc = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("application/grpc"));
                    if is_grpc {
                        return tower::Service::call(&mut grpc, req).await;
                    }
                    Ok::<_, Infallible>(http_export(req, &collector).await)
                }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                    .await;
        });
    }
}

type Reply = hyper::Response<http_body_util::combinators::UnsyncBoxBody<Bytes, tonic::Status>>;

/// OTLP/HTTP's answer.
async fn http_export(req: hyper::Request<Incoming>, collector: &Collector) -> Reply {
    let ok = req.method() == hyper::Method::POST
        && req.uri().path() == "/v1/traces"
        && req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            == Some("application/x-protobuf");
    let headers = wanted(req.headers());
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let decoded = body
        .ok()
        .filter(|_| ok)
        .and_then(|b| ExportTraceServiceRequest::decode(b).ok());
    let (code, answer) = match decoded.map(|req| collector.record(req, headers)) {
        None => (400, Bytes::from_static(b"not an OTLP trace export")),
        Some(true) => (
            200,
            ExportTraceServiceResponse::default().encode_to_vec().into(),
        ),
        Some(false) => (503, Bytes::from_static(b"busy")),
    };
    hyper::Response::builder()
        .status(code)
        .header("content-type", "application/x-protobuf")
        .body(
            Full::new(answer)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .expect("response")
}

/// A collector on a port of its own, plain or behind TLS that asks the exporter for a client
/// certificate of `pki`'s CA; it refuses its first `refuse` exports.
async fn collector_on(
    listener: tokio::net::TcpListener,
    pki: Option<&mesh_gateway::cloud::local::BrokerPki>,
    refuse: u32,
) -> Arc<Collector> {
    let tls = pki.map(|pki| {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = pki.issue("collector", true).expect("issue");
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(pki.ca()).expect("ca") {
            roots.add(c.expect("ca")).expect("ca");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            provider.clone(),
        )
        .build()
        .expect("verifier");
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("cert")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert"),
                PrivateKeyDer::from_pem_file(key).expect("key"),
            )
            .expect("server config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    let collector = Arc::new(Collector::default());
    collector.refuse.store(refuse, Ordering::SeqCst);
    tokio::spawn(serve(listener, tls, collector.clone()));
    collector
}

/// OTLP/gRPC: `TraceService/Export`; UNAVAILABLE while refusing.
struct Grpc(Arc<Collector>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = wanted(&request.metadata().clone().into_headers());
        if self.0.record(request.into_inner(), headers) {
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        } else {
            Err(tonic::Status::unavailable("busy"))
        }
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The `/metrics` value of `series`, if shown.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

/// Gateway `gw` exporting to `endpoint` with `protocol` (and `extra` keys of `[otlp]`), node-a hosting echo and node-c calling
/// it, neither sampling by itself; three calls traced by the caller's `traceparent`. Returns
/// the gateway's admin address and the traces' (trace id, caller's parent span id), in hex.
async fn mesh_with_traced_calls(
    pki: &Pki,
    endpoint: &str,
    protocol: &str,
    extra: &str,
) -> (Vec<NodeProc>, SocketAddr, Vec<(String, String)>) {
    use std::os::unix::fs::PermissionsExt;
    let token = pki.dir.path().join("otlp.token");
    std::fs::write(&token, "Bearer s3cret\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("mode");
    let secret_headers = pki.dir.path().join("otlp.headers");
    std::fs::write(&secret_headers, "# an API key\nX-Api-Key: k3y\n").expect("headers");
    std::fs::set_permissions(&secret_headers, std::fs::Permissions::from_mode(0o600))
        .expect("mode");
    let (gw, admin) = quick_gateway(
        pki,
        &format!(
            "[otlp]\nendpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\n\
             batch_interval_ms = 2000\nauthorization_file = \"{}\"\nheaders_file = \"{}\"\n\
             headers = {{ X-Scope-OrgID = \"site-7\" }}\n{extra}",
            token.display(),
            secret_headers.display()
        ),
    );
    let node = |name: &str, extra: &str| {
        let path = pki.config(
            name,
            &format!("{extra}[telemetry]\ninterval_ms = 100\ntrace_sample = 0.0\n"),
        );
        prepend(&path, &format!("gateway = \"{}\"\n", gw.quic));
        NodeProc::start(name, &path)
    };
    let a = node(
        "node-a",
        "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
    );
    let c = node("node-c", &format!("[[peers]]\naddr = \"{}\"\n", a.quic));
    c.wait_peer("node-a", UP);
    let mut traces = Vec::new();
    for i in 0..3u8 {
        let trace = format!("4bf92f3577b34da6a3ce929d0e0e47{i:02x}");
        let parent = format!("00f067aa0ba902{i:02x}");
        let traceparent = format!("00-{trace}-{parent}-01");
        let (code, _, _) = mesh_node::http::request(
            "POST",
            c.ingress(),
            "/v1/call/echo/say",
            &[("traceparent", traceparent.as_str())],
            Bytes::from_static(b"hi"),
        )
        .await
        .expect("call");
        assert_eq!(code, 200);
        traces.push((trace, parent));
    }
    (vec![gw, a, c], admin, traces)
}

/// Each traced call arrived as two spans: the caller's (node-c, client, child of the app's span)
/// and the callee's (node-a, server, child of the caller's), with the W3C ids intact.
async fn check_spans(collector: &Collector, traces: &[(String, String)]) {
    let all = eventually(Duration::from_secs(30), async || {
        let spans = collector.spans();
        let complete = traces.iter().all(|(t, _)| {
            let id = unhex(t);
            spans.iter().filter(|(_, s)| s.trace_id == id).count() >= 2
        });
        complete.then_some(spans)
    })
    .await
    .expect("the spans of the three traced calls reached the collector");
    for (trace, parent) in traces {
        let id = unhex(trace);
        let spans: Vec<&(String, Span)> = all.iter().filter(|(_, s)| s.trace_id == id).collect();
        assert_eq!(spans.len(), 2, "trace {trace}: {spans:?}");
        let (client_node, client) = spans
            .iter()
            .find(|(_, s)| s.kind == 3)
            .map(|(n, s)| (n, s))
            .expect("a client span");
        let (server_node, server) = spans
            .iter()
            .find(|(_, s)| s.kind == 2)
            .map(|(n, s)| (n, s))
            .expect("a server span");
        assert_eq!(client_node, "node-c");
        assert_eq!(server_node, "node-a");
        assert_eq!(client.parent_span_id, unhex(parent), "the app's span");
        assert_eq!(client.span_id.len(), 8);
        assert_eq!(server.parent_span_id, client.span_id, "the caller's span");
        assert_ne!(server.span_id, client.span_id);
        for s in [client, server] {
            assert_eq!(s.name, "echo/say");
            assert_eq!(attr(&s.attributes, "rpc.service"), Some("echo"));
            assert_eq!(attr(&s.attributes, "rpc.method"), Some("say"));
            assert_eq!(attr(&s.attributes, "starling.status"), Some("ok"));
            assert!(s.start_time_unix_nano > 0 && s.end_time_unix_nano >= s.start_time_unix_nano);
            assert_eq!(s.flags & 0x1, 1, "sampled");
        }
    }
    let headers = collector.headers.lock().expect("lock").clone();
    assert!(
        headers.contains(&("authorization".into(), "Bearer s3cret".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-scope-orgid".into(), "site-7".into())),
        "{headers:?}"
    );
    assert!(
        headers.contains(&("x-api-key".into(), "k3y".into())),
        "{headers:?}"
    );
}

/// The six spans left in at most two exports (made within 2 s of the first): they are batched,
/// not sent one by one.
fn check_batched(collector: &Collector, traces: &[(String, String)]) {
    let ids: Vec<Vec<u8>> = traces.iter().map(|(t, _)| unhex(t)).collect();
    let requests = collector.requests.lock().expect("lock");
    let carrying = requests
        .iter()
        .filter(|r| {
            r.resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .flat_map(|s| &s.spans)
                .any(|s| ids.contains(&s.trace_id))
        })
        .count();
    assert!(
        (1..=2).contains(&carrying),
        "{carrying} exports carried six spans"
    );
}

/// OTLP/HTTP with the collector down when the spans are made: the exporter retries, and once
/// the collector listens (and answers 503 once more) the spans arrive, counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_http_collector_that_was_down_at_first() {
    let pki = Pki::new();
    let port = starling_tests::closed_tcp_port();
    let (_procs, admin, traces) = mesh_with_traced_calls(
        &pki,
        &format!("http://127.0.0.1:{port}"),
        "http/protobuf",
        "",
    )
    .await;
    let retried = eventually(Duration::from_secs(20), async || {
        let text = metrics(admin).await;
        value(&text, "starling_otlp_requests_total{result=\"retry\"}").filter(|n| *n >= 1.0)
    })
    .await;
    assert!(retried.is_some(), "the exporter never retried");

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the collector's port");
    let collector = collector_on(listener, None, 1).await;
    check_spans(&collector, &traces).await;
    check_batched(&collector, &traces);
    assert_eq!(collector.refused.load(Ordering::SeqCst), 1);
    check_counted(admin).await;
}

/// The exporter's counters: six spans exported (once the collector's answer is back), none
/// dropped or rejected.
async fn check_counted(admin: SocketAddr) {
    let series = |outcome: &str| format!("starling_otlp_spans_total{{outcome=\"{outcome}\"}}");
    let text = eventually(Duration::from_secs(10), async || {
        let text = metrics(admin).await;
        (value(&text, &series("exported")) == Some(6.0)).then_some(text)
    })
    .await
    .expect("the gateway counted six spans exported");
    for outcome in ["dropped", "rejected"] {
        assert_eq!(
            value(&text, &series(outcome)),
            Some(0.0),
            "{outcome}: {text}"
        );
    }
}

/// OTLP/gRPC with a collector that answers UNAVAILABLE once: the batch is retried, and the
/// spans arrive with their links.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_grpc_collector_that_was_busy_at_first() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let collector = collector_on(listener, None, 1).await;
    let (_procs, admin, traces) =
        mesh_with_traced_calls(&pki, &format!("http://{addr}"), "grpc", "").await;
    check_spans(&collector, &traces).await;
    check_batched(&collector, &traces);
    assert_eq!(collector.refused.load(Ordering::SeqCst), 1);
    check_counted(admin).await;
    let text = metrics(admin).await;
    assert!(
        value(&text, "starling_otlp_requests_total{result=\"retry\"}").is_some_and(|n| n >= 1.0)
    );
}

/// Both protocols over TLS to a collector that checks the server name against its own CA and
/// asks for a client certificate: the spans arrive (a collector off loopback takes https only).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_over_tls_with_a_client_certificate() {
    for protocol in ["http/protobuf", "grpc"] {
        let pki = Pki::new();
        let tls =
            mesh_gateway::cloud::local::BrokerPki::new(&pki.dir.path().join("otlp-ca"), "otlp")
                .expect("ca");
        let (cert, key) = tls.issue("gw-client", false).expect("client");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let collector = collector_on(listener, Some(&tls), 0).await;
        let (_procs, admin, traces) = mesh_with_traced_calls(
            &pki,
            &format!("https://{addr}"),
            protocol,
            &format!(
                "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                tls.ca().display(),
                cert.display(),
                key.display()
            ),
        )
        .await;
        check_spans(&collector, &traces).await;
        check_counted(admin).await;
    }
}

/// `check-config` checks the `[otlp]` section's files (the CA holds a certificate, the
/// authorization file is its owner's only) with the file, line and key, and a gateway whose
/// section is bad does not start.
#[test]
fn a_bad_otlp_section_is_named_by_check_config_and_stops_the_gateway() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let token = pki.dir.path().join("otlp.token");
    std::fs::write(&token, "Bearer s3cret\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("mode");
    let ca = pki.dir.path().join("gw/certs/ca.crt");
    let conf = pki.gateway_config(
        "gw",
        "127.0.0.1:0",
        &format!(
            "[otlp]\nendpoint = \"https://127.0.0.1:4318\"\nca = \"{}\"\nauthorization_file = \"{}\"\n",
            ca.display(),
            token.display()
        ),
    );
    let conf_s = conf.display().to_string();
    let (ok, out) = starling_tests::run_bin("mesh-gateway", &["check-config", &conf_s]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("otlp.authorization_file") && out.contains("chmod 600"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "the token was shown: {out}");

    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("mode");
    let (ok, out) = starling_tests::run_bin("mesh-gateway", &["check-config", &conf_s]);
    assert!(ok, "{out}");
    // The same section for gRPC checks as well (check-config makes no client).
    let src = std::fs::read_to_string(&conf).expect("conf");
    let grpc = conf.with_file_name("grpc.toml");
    std::fs::write(
        &grpc,
        src.replace("[otlp]\n", "[otlp]\nprotocol = \"grpc\"\n"),
    )
    .expect("conf");
    let (ok, out) = starling_tests::run_bin(
        "mesh-gateway",
        &["check-config", &grpc.display().to_string()],
    );
    assert!(ok, "{out}");

    // A CA file with no certificate in it: check-config says so, and the gateway stops at start.
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(
        &conf,
        src.replace(&ca.display().to_string(), &token.display().to_string()),
    )
    .expect("conf");
    let (ok, out) = starling_tests::run_bin("mesh-gateway", &["check-config", &conf_s]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("[otlp]") && out.contains("no certificate"),
        "{out}"
    );
    let child = std::process::Command::new(starling_tests::bin("mesh-gateway"))
        .args(["run", "--config", &conf_s])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("mesh-gateway");
    let pid = child.id();
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let Ok(out) = exited.recv_timeout(Duration::from_secs(20)) else {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
        panic!("the gateway started with a CA file holding no certificate");
    };
    let out = out.expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("[otlp]") && err.contains("no certificate"),
        "{err}"
    );
}
