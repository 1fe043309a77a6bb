//! Any TCP protocol through the mesh, and bodies that stream (issue 15): real `mesh-node` and
//! `mesh-gateway` processes on loopback, a real mosquitto with `mosquitto_pub`/`mosquitto_sub`
//! through a forward, TCP upstreams of the test's own, and a streamed gigabyte through the
//! ingress to an HTTP upstream, with the nodes' memory watched.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use starling_tests::{
    KillOnDrop, NodeProc, Pki, RssWatch, closed_tcp_port, eventually, metrics, prepend,
    random_bytes, rss_kib,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const UP: Duration = Duration::from_secs(10);
const FAST: &str = "[telemetry]\ninterval_ms = 100\n";
const ALLOW: &str = "[authorization]\ndefault = \"allow\"\n";

/// A node config that reports to gateway `gw` every 100 ms.
fn node_conf(pki: &Pki, name: &str, gw: SocketAddr, extra: &str) -> PathBuf {
    let path = pki.config(name, &format!("{extra}{FAST}"));
    prepend(&path, &format!("gateway = \"{gw}\"\n"));
    path
}

/// A gateway with `policy` as its policy file.
fn gateway(pki: &Pki, policy: &str) -> (NodeProc, SocketAddr) {
    let file = pki.dir.path().join("policy.toml");
    std::fs::write(&file, policy).expect("policy");
    let conf = pki.gateway_config("gw", "127.0.0.1:0", FAST);
    prepend(&conf, &format!("policy = \"{}\"\n", file.display()));
    NodeProc::start_gateway("gw", &conf)
}

fn tcp_service(name: &str, upstream: SocketAddr) -> String {
    format!("[[services]]\nname = \"{name}\"\nupstream = \"tcp://{upstream}\"\n")
}

fn forward_to(service: &str, peers: &[&NodeProc]) -> String {
    let mut s = format!("[[forwards]]\nlisten = \"127.0.0.1:0\"\nservice = \"{service}\"\n");
    for p in peers {
        s.push_str(&format!("[[peers]]\naddr = \"{}\"\n", p.quic));
    }
    s
}

/// The address a node's forward to `service` listens on (port 0 in the config).
fn forward_addr(node: &NodeProc, service: &str) -> SocketAddr {
    let lock = mesh_node::state::read_lock_file(&node.state_dir).expect("lock file");
    lock.get(&format!("forward.{service}"))
        .expect("the forward's address")
        .parse()
        .expect("address")
}

/// Waits until `node` sees `service` hosted by `n` peers.
fn wait_endpoints(node: &NodeProc, service: &str, n: usize) {
    node.wait_status(
        &format!("{service} on {n} peers"),
        UP,
        |s: &serde_json::Value| {
            s["peers"].as_array().is_some_and(|peers| {
                peers
                    .iter()
                    .filter(|p| {
                        p["services"]
                            .as_array()
                            .is_some_and(|ss| ss.iter().any(|x| x == service))
                    })
                    .count()
                    >= n
            })
        },
    );
}

/// A TCP echo server: every connection's bytes back as they come, half-close carried.
async fn echo_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = stream.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// node-b hosting `plc` (a TCP echo server) and node-a forwarding a loopback port to it, both
/// reporting to gateway `gw`.
async fn plc_pair(pki: &Pki, gw: &NodeProc) -> (NodeProc, NodeProc) {
    let echo = echo_upstream().await;
    let b = NodeProc::start(
        "node-b",
        &node_conf(pki, "node-b", gw.quic, &tcp_service("plc", echo)),
    );
    let a = NodeProc::start(
        "node-a",
        &node_conf(pki, "node-a", gw.quic, &forward_to("plc", &[&b])),
    );
    (b, a)
}

/// A server that reads a whole request up to the client's half-close, then answers with its
/// length and the bytes reversed, and closes: it only answers if the half-close crossed.
async fn reverse_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_err() {
                    return;
                }
                let mut answer = format!("{}\n", request.len()).into_bytes();
                answer.extend(request.iter().rev());
                let _ = stream.write_all(&answer).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    addr
}

/// The value of the first `/metrics` line that starts with `prefix`.
fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
}

fn rss_now(node: &NodeProc) -> u64 {
    rss_kib(node.pid()).expect("rss").0
}

/// A plain mosquitto on a free loopback port, for the forward to reach.
fn plain_mosquitto(dir: &Path) -> (KillOnDrop, SocketAddr) {
    let port = closed_tcp_port();
    let conf = dir.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"),
    )
    .expect("conf");
    let child = std::process::Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mosquitto runs (scripts/setup.sh installs it)");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = std::time::Instant::now() + UP;
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (KillOnDrop(child), addr)
}

/// Runs `mosquitto_pub` or `mosquitto_sub` (QoS 1, topic plant/line1/image) against the broker
/// behind `port`; asserts it succeeded and returns what it printed.
async fn mosquitto_client(bin: &str, port: &str, args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(bin)
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            port,
            "-q",
            "1",
            "-t",
            "plant/line1/image",
        ])
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| {
            panic!("{bin} runs (scripts/setup.sh installs mosquitto-clients): {e}")
        });
    assert!(
        out.status.success(),
        "{bin} through the forward: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// MQTT through the mesh: `mosquitto_pub` publishes a retained binary message through node-a's
/// forward, node-b's tunnel and a real mosquitto, and `mosquitto_sub` reads it back the same way;
/// the bytes arrive intact. Then a half-close crosses both ways: a server that answers only after
/// the client's end of request gets it, and the client reads the whole answer to the server's end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_through_a_forward_and_half_close_both_ways() {
    let pki = Pki::new();
    let (broker, broker_addr) = plain_mosquitto(pki.dir.path());
    let reverse = reverse_upstream().await;
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            &format!(
                "{}{}",
                tcp_service("mqtt", broker_addr),
                tcp_service("reverse", reverse)
            ),
        ),
    );
    let a_conf = pki.config(
        "node-a",
        &format!(
            "{}{}",
            forward_to("mqtt", &[&b]),
            forward_to("reverse", &[])
        ),
    );
    let a = NodeProc::start("node-a", &a_conf);
    wait_endpoints(&a, "mqtt", 1);
    let fwd = forward_addr(&a, "mqtt");

    let payload = random_bytes(100 * 1024, 15);
    let file = pki.dir.path().join("payload.bin");
    std::fs::write(&file, &payload).expect("payload");
    let port = fwd.port().to_string();
    let file = file.display().to_string();
    mosquitto_client("mosquitto_pub", &port, &["-r", "-f", &file]).await;
    let received = mosquitto_client("mosquitto_sub", &port, &["-C", "1", "-N", "-W", "10"]).await;
    assert_eq!(received.stdout.len(), payload.len());
    assert!(
        received.stdout == payload[..],
        "the message changed on its way"
    );
    drop(broker);

    // Half-close: the request ends with the client's FIN; the answer follows it.
    let request = random_bytes(300 * 1024, 16);
    let mut conn = TcpStream::connect(forward_addr(&a, "reverse"))
        .await
        .expect("connect");
    conn.write_all(&request).await.expect("write");
    conn.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    tokio::time::timeout(UP, conn.read_to_end(&mut answer))
        .await
        .expect("the answer came, and its end")
        .expect("read");
    let header = format!("{}\n", request.len());
    assert!(
        answer.starts_with(header.as_bytes()),
        "answer starts {:?}",
        &answer[..16.min(answer.len())]
    );
    let body = &answer[header.len()..];
    assert_eq!(body.len(), request.len());
    assert!(
        body.iter().eq(request.iter().rev()),
        "the bytes changed on their way"
    );
}

/// 100 connections at once, each moving 1 MiB each way through the same two nodes: every byte
/// arrives intact, the hosting node's memory stays bounded, and the gateway's metrics count the
/// connections and bytes exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_connections_move_a_mebibyte_each_way_in_bounded_memory() {
    const CONNS: usize = 100;
    const SIZE: usize = 1024 * 1024;
    let pki = Pki::new();
    let (gw, admin) = gateway(&pki, ALLOW);
    let (b, a) = plc_pair(&pki, &gw).await;
    wait_endpoints(&a, "plc", 1);
    let fwd = forward_addr(&a, "plc");
    // Warm up (the connection between the nodes, first allocations), then measure from there.
    let mut c = TcpStream::connect(fwd).await.expect("connect");
    c.write_all(b"warm").await.expect("write");
    let mut four = [0u8; 4];
    c.read_exact(&mut four).await.expect("echo");
    drop(c);
    let before = rss_now(&b);
    let watch = RssWatch::start(b.pid());

    let tasks: Vec<_> = (0..CONNS)
        .map(|i| {
            tokio::spawn(async move {
                let data = random_bytes(SIZE, 100 + i as u64);
                let conn = TcpStream::connect(fwd).await.expect("connect");
                let (mut r, mut w) = conn.into_split();
                let sent = data.clone();
                let writer = tokio::spawn(async move {
                    w.write_all(&sent).await.expect("write");
                    w.shutdown().await.expect("half-close");
                });
                let mut back = Vec::with_capacity(SIZE);
                r.read_to_end(&mut back).await.expect("read");
                writer.await.expect("writer");
                back == data[..]
            })
        })
        .collect();
    let mut intact = 0;
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("every connection ends")
            .expect("task")
        {
            intact += 1;
        }
    }
    let peak = watch.peak_kib();
    assert_eq!(intact, CONNS, "connections whose bytes came back changed");
    let growth_mib = peak.saturating_sub(before) / 1024;
    println!(
        "hosting node: RSS {} MiB before, peak {} MiB",
        before / 1024,
        peak / 1024
    );
    assert!(
        growth_mib < 32,
        "the hosting node grew by {growth_mib} MiB carrying 100 connections"
    );

    // The gateway counts them: 101 opened and closed (with the warm-up), every byte each way.
    let l = "node=\"node-a\",listen=\"127.0.0.1:0\",service=\"plc\"";
    let bytes = (CONNS * SIZE + 4) as f64;
    let counted = eventually(UP, async || {
        let text = metrics(admin).await;
        let closed = metric(
            &text,
            &format!("starling_tcp_connections_total{{{l},event=\"closed\"}}"),
        )?;
        let to = metric(
            &text,
            &format!("starling_tcp_bytes_total{{{l},direction=\"to_service\"}}"),
        )?;
        let from = metric(
            &text,
            &format!("starling_tcp_bytes_total{{{l},direction=\"from_service\"}}"),
        )?;
        (closed == (CONNS + 1) as f64 && to == bytes && from == bytes).then_some(text)
    })
    .await;
    let text = counted.unwrap_or_else(|| {
        let text = tcp_metrics_text(admin);
        panic!("the gateway's counts never matched:\n{text}")
    });
    assert_eq!(
        metric(
            &text,
            &format!("starling_tcp_connections_total{{{l},event=\"opened\"}}")
        ),
        Some((CONNS + 1) as f64)
    );
    assert_eq!(
        metric(
            &text,
            &format!("starling_tcp_connection_duration_seconds_count{{{l}}}")
        ),
        Some((CONNS + 1) as f64)
    );
    assert!(text.contains(
        "service=\"plc\",method=\"connect\",caller=\"node-a\",callee=\"node-b\",status=\"ok\""
    ));
}

/// The gateway's metrics, for a failure message.
fn tcp_metrics_text(admin: SocketAddr) -> String {
    starling_tests::http_get_blocking(admin, "/metrics")
        .unwrap_or_else(|e| e)
        .lines()
        .filter(|l| l.contains("tcp") || l.contains("connect") || l.contains("rule_total"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A caller the service's policy refuses has its connection closed at once, without a byte, and
/// the denial with its rule is in the gateway's audit log; the forward counts the refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_caller_is_cut_off_at_once_and_audited() {
    let pki = Pki::new();
    let (gw, admin) = gateway(
        &pki,
        "[authorization]\ndefault = \"allow\"\n\
         [[authorization.rules]]\nname = \"no-plc-for-node-a\"\neffect = \"deny\"\n\
         callers = [\"spiffe://starling.local/node/node-a\"]\nservices = [\"plc\"]\n",
    );
    let (b, a) = plc_pair(&pki, &gw).await;
    b.wait_policy(1, UP);
    wait_endpoints(&a, "plc", 1);

    let mut conn = TcpStream::connect(forward_addr(&a, "plc"))
        .await
        .expect("connect");
    let _ = conn.write_all(b"read coils 1..8").await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("the connection was closed at once");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the denied caller got bytes: {read:?}"
    );

    let audit = pki.dir.path().join("gw/audit.jsonl");
    let denied = eventually(UP, async || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["kind"] == "denied" && e["service"] == "plc")
    })
    .await
    .expect("the denial is in the gateway's audit log");
    assert_eq!(denied["method"], "connect");
    assert_eq!(denied["rule"], "no-plc-for-node-a");
    assert_eq!(denied["caller"], "spiffe://starling.local/node/node-a");
    assert_eq!(denied["node"], "node-b");

    let l = "node=\"node-a\",listen=\"127.0.0.1:0\",service=\"plc\"";
    let refused = eventually(UP, async || {
        let text = metrics(admin).await;
        metric(
            &text,
            &format!("starling_tcp_connections_total{{{l},event=\"refused\"}}"),
        )
        .filter(|n| *n == 1.0)
        .map(|_| text)
    })
    .await
    .expect("the refusal is counted");
    assert_eq!(
        metric(
            &refused,
            &format!("starling_tcp_connections_total{{{l},event=\"opened\"}}")
        ),
        Some(0.0)
    );
    assert!(refused.contains("service=\"plc\",method=\"connect\",caller=\"node-a\",callee=\"node-b\",status=\"permission_denied\""));
}

/// Of two endpoints of a TCP service, one's upstream refuses every connection: each connection
/// fails over to the other and is carried, and the caller's breaker ejects the bad endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_refuses_trips_the_breaker_and_the_forward_fails_over() {
    let pki = Pki::new();
    let (gw, admin) = gateway(&pki, ALLOW);
    let echo = echo_upstream().await;
    let dead = SocketAddr::from(([127, 0, 0, 1], closed_tcp_port()));
    let zoned = |name: &str, zone: &str, extra: &str| {
        let path = pki.labeled_config(name, &[("zone", zone)], &format!("{extra}{FAST}"));
        prepend(&path, &format!("gateway = \"{}\"\n", gw.quic));
        path
    };
    let good = NodeProc::start("good", &zoned("good", "hall-2", &tcp_service("plc", echo)));
    let bad = NodeProc::start("bad", &zoned("bad", "hall-1", &tcp_service("plc", dead)));
    let a = NodeProc::start(
        "node-a",
        &zoned("node-a", "hall-1", &forward_to("plc", &[&good, &bad])),
    );
    wait_endpoints(&a, "plc", 2);
    let fwd = forward_addr(&a, "plc");
    for i in 0..30u32 {
        let mut conn = TcpStream::connect(fwd).await.expect("connect");
        let msg = format!("request {i}");
        conn.write_all(msg.as_bytes()).await.expect("write");
        conn.shutdown().await.expect("half-close");
        let mut back = Vec::new();
        tokio::time::timeout(UP, conn.read_to_end(&mut back))
            .await
            .expect("answered")
            .expect("read");
        assert_eq!(back, msg.as_bytes(), "connection {i} was not carried");
    }
    let text = eventually(UP, async || {
        let text = metrics(admin).await;
        let ejected = metric(
            &text,
            "starling_policy_rule_total{node=\"node-a\",rule=\"plc\",action=\"ejected\"}",
        )?;
        (ejected >= 1.0).then_some(text)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "the bad endpoint was never ejected:\n{}",
            tcp_metrics_text(admin)
        )
    });
    // Every failed opening was counted against the bad endpoint, and retried elsewhere.
    let retried = metric(
        &text,
        "starling_policy_rule_total{node=\"node-a\",rule=\"plc\",action=\"retried\"}",
    )
    .expect("retries counted");
    assert!(retried >= 5.0, "{retried} failovers");
    let l = "node=\"node-a\",listen=\"127.0.0.1:0\",service=\"plc\"";
    assert_eq!(
        metric(
            &text,
            &format!("starling_tcp_connections_total{{{l},event=\"refused\"}}")
        ),
        Some(0.0),
        "a connection was refused though another endpoint could carry it"
    );
    drop(bad);
}

/// An HTTP upstream that streams every request body back as its answer, as it reads it; and
/// counts what it wrote.
async fn streaming_echo_upstream(written: Arc<AtomicU64>, ended: Arc<AtomicBool>) -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (written, ended) = (written.clone(), ended.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (written, ended) = (written.clone(), ended.clone());
                        async move {
                            let endless = req.uri().path().ends_with("/endless");
                            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
                            let mut body = req.into_body();
                            tokio::spawn(async move {
                                if endless {
                                    let chunk = random_bytes(64 * 1024, 3);
                                    while tx.send(chunk.clone()).await.is_ok() {
                                        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                                    }
                                    // Its reader is gone: the call was torn down to here.
                                    ended.store(true, Ordering::Relaxed);
                                    return;
                                }
                                while let Some(Ok(frame)) = body.frame().await {
                                    if let Ok(data) = frame.into_data() {
                                        let n = data.len() as u64;
                                        if tx.send(data).await.is_err() {
                                            return;
                                        }
                                        written.fetch_add(n, Ordering::Relaxed);
                                    }
                                }
                            });
                            let stream = futures_body(rx);
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(stream))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A hyper body from a channel of chunks.
fn futures_body(rx: tokio::sync::mpsc::Receiver<Bytes>) -> ChannelBody {
    ChannelBody(rx)
}

struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.get_mut()
            .0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// The byte at `i` of the streamed gigabyte.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// A gigabyte goes up through the ingress chunked and comes back streamed, through two nodes to
/// an HTTP upstream and back, intact; neither node's memory grows by 32 MiB. Then a client that
/// stops reading an endless answer: the nodes stop the upstream through flow control instead of
/// buffering, and their memory stays where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gigabyte_streams_through_the_ingress_in_bounded_memory() {
    use http_body_util::BodyExt;
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    let pki = Pki::new();
    let written = Arc::new(AtomicU64::new(0));
    let ended = Arc::new(AtomicBool::new(false));
    let upstream = streaming_echo_upstream(written.clone(), ended.clone()).await;
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            &format!("[[services]]\nname = \"files\"\nupstream = \"http://{upstream}\"\n"),
        ),
    );
    let a = NodeProc::start(
        "node-a",
        &pki.config(
            "node-a",
            &format!(
                "[[peers]]\naddr = \"{}\"\n[limits]\ningress_body_timeout_ms = 3000\n",
                b.quic
            ),
        ),
    );
    wait_endpoints(&a, "files", 1);
    let (rss_a, rss_b) = (rss_now(&a), rss_now(&b));
    let (watch_a, watch_b) = (RssWatch::start(a.pid()), RssWatch::start(b.pid()));

    let stream = TcpStream::connect(a.ingress()).await.expect("ingress");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(2);
    let upload = tokio::spawn(async move {
        let mut at = 0u64;
        while at < TOTAL {
            let chunk: Bytes = (at..at + CHUNK as u64)
                .map(pattern)
                .collect::<Vec<u8>>()
                .into();
            at += CHUNK as u64;
            if tx.send(chunk).await.is_err() {
                return at;
            }
        }
        at
    });
    let req = hyper::Request::post("/v1/call/files/put")
        .header("host", "node-a")
        .body(futures_body(rx))
        .expect("request");
    let resp = tokio::time::timeout(UP, sender.send_request(req))
        .await
        .expect("the answer's head came")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-starling-status"], "ok");
    let mut body = resp.into_body();
    let mut received = 0u64;
    let mut intact = true;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(60), body.frame())
        .await
        .expect("the answer kept coming")
    {
        let data = frame
            .unwrap_or_else(|e| panic!("error after {received} bytes of the answer: {e}"))
            .into_data()
            .unwrap_or_default();
        if intact {
            intact = data
                .iter()
                .enumerate()
                .all(|(i, b)| *b == pattern(received + i as u64));
        }
        received += data.len() as u64;
    }
    assert_eq!(upload.await.expect("upload"), TOTAL);
    assert_eq!(received, TOTAL, "the answer was cut");
    assert!(intact, "the bytes changed on their way");
    let (peak_a, peak_b) = (watch_a.peak_kib(), watch_b.peak_kib());
    println!(
        "1 GiB each way: node-a RSS {} -> peak {} MiB, node-b {} -> {} MiB",
        rss_a / 1024,
        peak_a / 1024,
        rss_b / 1024,
        peak_b / 1024
    );
    assert!(
        peak_a.saturating_sub(rss_a) < 32 * 1024,
        "node-a grew by {} KiB",
        peak_a - rss_a
    );
    assert!(
        peak_b.saturating_sub(rss_b) < 32 * 1024,
        "node-b grew by {} KiB",
        peak_b - rss_b
    );

    // A client that asks for an endless answer and reads only its head.
    let before = (rss_now(&a), rss_now(&b));
    let written_before = written.load(Ordering::Relaxed);
    let mut slow = TcpStream::connect(a.ingress()).await.expect("ingress");
    slow.write_all(
        b"POST /v1/call/files/endless HTTP/1.1\r\nHost: x\r\nx-starling-stream: 1\r\nContent-Length: 0\r\n\r\n",
    )
    .await
    .expect("request");
    let mut head = [0u8; 12];
    slow.read_exact(&mut head).await.expect("head");
    assert_eq!(&head, b"HTTP/1.1 200");
    // The upstream writes until every window between it and the client is full, then stalls.
    let mut last = 0;
    let stalled = eventually(Duration::from_secs(20), async || {
        let now = written.load(Ordering::Relaxed) - written_before;
        let same = now == last && now > 0;
        last = now;
        tokio::time::sleep(Duration::from_millis(500)).await;
        same.then_some(now)
    })
    .await
    .expect("the upstream was stopped by flow control");
    let after = (rss_now(&a), rss_now(&b));
    println!(
        "a client that stopped reading: the upstream stalled after {} KiB; node-a {} -> {} MiB, node-b {} -> {} MiB",
        stalled / 1024,
        before.0 / 1024,
        after.0 / 1024,
        before.1 / 1024,
        after.1 / 1024
    );
    assert!(
        stalled < 64 * 1024 * 1024,
        "{stalled} bytes were taken in for a client that reads nothing"
    );
    assert!(after.0.saturating_sub(before.0) < 32 * 1024);
    assert!(after.1.saturating_sub(before.1) < 32 * 1024);
    // The ingress cuts the client off after its write deadline (3 s here), and the call is torn
    // down all the way to the upstream, whose writes fail.
    let torn_down = eventually(Duration::from_secs(30), async || {
        ended.load(Ordering::Relaxed).then_some(())
    })
    .await;
    assert!(
        torn_down.is_some(),
        "the stalled client's call was never torn down"
    );
    drop(slow);
}

/// `mesh-node forward`: a technician's one-off node that carries a local port to a service until
/// Ctrl-C; it refuses to listen beyond loopback unless told to, with a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_node_forward_carries_a_technicians_connection_until_ctrl_c() {
    let pki = Pki::new();
    let echo = echo_upstream().await;
    let b = NodeProc::start("node-b", &pki.config("node-b", &tcp_service("plc", echo)));
    let tech = pki.config("tech", &format!("[[peers]]\naddr = \"{}\"\n", b.quic));
    let tech = tech.display().to_string();

    let (ok, out) = starling_tests::run_bin(
        "mesh-node",
        &[
            "forward",
            "--config",
            &tech,
            "--service",
            "plc",
            "--listen",
            "0.0.0.0:0",
        ],
    );
    assert!(!ok);
    assert!(out.contains("--allow-remote"), "{out}");

    let mut child = tokio::process::Command::new(starling_tests::bin("mesh-node"))
        .args(["forward", "--config", &tech, "--service", "plc"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("mesh-node forward");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    tokio::time::timeout(
        UP,
        tokio::io::AsyncBufReadExt::read_line(&mut lines, &mut line),
    )
    .await
    .expect("it says where it listens")
    .expect("read");
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("forwarding ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .parse()
        .expect("address");
    // Once the technician's node has found node-b, a connection goes through.
    let echoed = eventually(UP, async || {
        let mut conn = TcpStream::connect(addr).await.ok()?;
        conn.write_all(b"status?").await.ok()?;
        conn.shutdown().await.ok()?;
        let mut back = Vec::new();
        conn.read_to_end(&mut back).await.ok()?;
        (back == b"status?").then_some(())
    })
    .await;
    assert!(echoed.is_some(), "the forward never carried a connection");
    let pid = child.id().expect("pid").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status();
    let status = tokio::time::timeout(UP, child.wait())
        .await
        .expect("it stops on Ctrl-C")
        .expect("wait");
    assert!(status.success(), "{status}");
}

/// A rate limit on the service counts connections: past its burst, a caller's next connection is
/// closed at once and counted as refused, and the limit's rule counts it as rate limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_a_rate_limit_are_refused() {
    let pki = Pki::new();
    let (gw, admin) = gateway(
        &pki,
        &format!(
            "{ALLOW}[[rate_limits]]\nname = \"plc-connections\"\nservice = \"plc\"\n\
             per_second = 0.01\nburst = 2\n"
        ),
    );
    let (b, a) = plc_pair(&pki, &gw).await;
    b.wait_policy(1, UP);
    wait_endpoints(&a, "plc", 1);
    let fwd = forward_addr(&a, "plc");
    let mut carried = 0;
    for _ in 0..3 {
        let mut conn = TcpStream::connect(fwd).await.expect("connect");
        conn.write_all(b"x").await.expect("write");
        let _ = conn.shutdown().await;
        let mut back = Vec::new();
        let _ = tokio::time::timeout(UP, conn.read_to_end(&mut back))
            .await
            .expect("closed or answered at once");
        if back == b"x" {
            carried += 1;
        }
    }
    assert_eq!(carried, 2, "the burst is two connections");
    let l = "node=\"node-a\",listen=\"127.0.0.1:0\",service=\"plc\"";
    let rule = "starling_policy_rule_total{node=\"node-b\",rule=\"plc-connections\",action=\"rate_limited\"}";
    // Each node's telemetry reaches the gateway in its own batches: node-a's count of the refusal
    // and node-b's count of the rule may come in either order.
    let text = eventually(UP, async || {
        let text = metrics(admin).await;
        let refused = metric(
            &text,
            &format!("starling_tcp_connections_total{{{l},event=\"refused\"}}"),
        )?;
        (refused == 1.0 && metric(&text, rule).is_some()).then_some(text)
    })
    .await
    .expect("the third connection is counted as refused, and the rule as rate limited");
    assert_eq!(metric(&text, rule), Some(1.0));
    assert!(text.contains("service=\"plc\",method=\"connect\",caller=\"node-a\",callee=\"node-b\",status=\"resource_exhausted\""));
}

/// An upstream that aborts its connection (a TCP reset mid-answer) resets the client's too: the
/// client never takes the cut answer for a whole one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_upstream_connection_resets_the_client() {
    let pki = Pki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let upstream = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut byte = [0u8; 1];
            let _ = stream.read_exact(&mut byte).await;
            let _ = stream.write_all(b"half an answ").await;
            let _ = stream.set_zero_linger();
            drop(stream);
        }
    });
    let b = NodeProc::start(
        "node-b",
        &pki.config("node-b", &tcp_service("plc", upstream)),
    );
    let a = NodeProc::start("node-a", &pki.config("node-a", &forward_to("plc", &[&b])));
    wait_endpoints(&a, "plc", 1);
    let mut conn = TcpStream::connect(forward_addr(&a, "plc"))
        .await
        .expect("connect");
    conn.write_all(b"?").await.expect("write");
    let mut got = Vec::new();
    let end = tokio::time::timeout(UP, conn.read_to_end(&mut got))
        .await
        .expect("the connection ended");
    assert!(
        end.is_err(),
        "the cut answer ended like a whole one ({} bytes, then a clean end)",
        got.len()
    );
}

/// Tunnels take at most half of a peer connection's streams: past that, a connection is refused
/// at once and calls between the same two nodes still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_leave_half_the_streams_to_calls() {
    let pki = Pki::new();
    let echo = echo_upstream().await;
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            &format!(
                "{}[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n\
                 [limits]\nmax_concurrent_calls = 4\n",
                tcp_service("plc", echo)
            ),
        ),
    );
    let a = NodeProc::start("node-a", &pki.config("node-a", &forward_to("plc", &[&b])));
    wait_endpoints(&a, "plc", 1);
    let fwd = forward_addr(&a, "plc");
    // Two tunnels held open (half of 4), each shown to work.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = TcpStream::connect(fwd).await.expect("connect");
        conn.write_all(b"ping").await.expect("write");
        let mut back = [0u8; 4];
        tokio::time::timeout(UP, conn.read_exact(&mut back))
            .await
            .expect("echoed")
            .expect("read");
        held.push(conn);
    }
    let mut third = TcpStream::connect(fwd).await.expect("connect");
    let _ = third.write_all(b"ping").await;
    let mut buf = [0u8; 4];
    let read = tokio::time::timeout(UP, third.read(&mut buf))
        .await
        .expect("closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "a third tunnel: {read:?}");
    let (code, body) =
        starling_tests::call_ingress(a.ingress(), "echo", "say", b"still here").await;
    assert_eq!((code, &body[..]), (200, &b"still here"[..]));
    drop(held);
}
