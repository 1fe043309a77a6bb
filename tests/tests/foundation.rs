//! Two or more `mesh-node` processes on loopback making calls over mutually authenticated QUIC.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_node::bind_endpoint;
use mesh_node::config::Limits;
use mesh_node::wire::{FrameReader, write_message};
use mesh_proto::limits::MAX_HEAD_BYTES;
use mesh_proto::{RequestHead, ResponseHead, Status, decode_head};
use starling_tests::{HttpUpstream, NodeProc, Pki, closed_tcp_port, post, random_bytes};

const UP: Duration = Duration::from_secs(10);

/// B hosts `services` (TOML), A dials B; returns both once A has B's hello.
fn pair(pki: &Pki, services_b: &str) -> (NodeProc, NodeProc) {
    let b = NodeProc::start("node-b", &pki.config("node-b", services_b));
    let a_conf = pki.config("node-a", &format!("[[peers]]\naddr = \"{}\"\n", b.quic));
    let a = NodeProc::start("node-a", &a_conf);
    a.wait_peer("node-b", UP);
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_call_reaches_http_upstream_with_identical_bytes() {
    let upstream = HttpUpstream::start(Duration::ZERO).await;
    let pki = Pki::new();
    let (a, _b) = pair(
        &pki,
        &format!(
            "[[services]]\nname = \"store\"\nupstream = \"http://{}\"\n",
            upstream.addr
        ),
    );
    for (i, size) in [0usize, 1, 64 * 1024, 1024 * 1024].into_iter().enumerate() {
        let body = random_bytes(size, i as u64 + 7);
        let (code, status, answer) = post(a.ingress(), "store", "put", body.clone(), None)
            .await
            .expect("ingress reachable");
        assert_eq!((code, status.as_deref()), (200, Some("ok")), "size {size}");
        assert_eq!(answer.len(), size);
        assert!(answer == body, "answer bytes differ for size {size}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_eq!(s.path, "/put");
        assert_eq!(
            s.caller.as_deref(),
            Some("spiffe://starling.local/node/node-a")
        );
    }
    assert_eq!(
        seen.iter().map(|s| s.body_len).collect::<Vec<_>>(),
        [0, 1, 64 * 1024, 1024 * 1024]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_from_another_ca_is_refused_and_its_caller_told_why() {
    let pki = Pki::new();
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
        ),
    );
    // Same trust domain, another CA: only the chain tells them apart.
    let other = Pki::new();
    let rogue = NodeProc::start(
        "rogue",
        &other.config("rogue", &format!("[[peers]]\naddr = \"{}\"\n", b.quic)),
    );
    rogue.wait_status("failing to dial", UP, |s| {
        s["dial_errors"].as_array().is_some_and(|e| !e.is_empty())
    });
    b.wait_status("refusing a handshake", UP, |s| s["refused_handshakes"] != 0);
    let (code, status, body) = post(
        rogue.ingress(),
        "echo",
        "say",
        Bytes::from_static(b"hi"),
        None,
    )
    .await
    .expect("ingress");
    let body = String::from_utf8_lossy(&body);
    assert_eq!(
        (code, status.as_deref()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(body.contains("not trusted"), "{body}");
    assert_eq!(
        b.status()["connections_admitted"],
        0,
        "the rogue was admitted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_for_another_trust_domain_is_refused() {
    let pki = Pki::new();
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
        ),
    );
    // Signed by the mesh CA itself, but for spiffe://elsewhere.example/...: a raw client that
    // presents it must still be refused by the node.
    let id = mesh_core::SpiffeId::node("elsewhere.example", "intruder".parse().expect("name"))
        .expect("id");
    let issued = pki.ca.issue(id, 1).expect("issue");
    let (endpoint, client) = starling_tests::raw_client(&[&issued.cert_pem], &issued.key_pem);
    let result = tokio::time::timeout(
        UP,
        endpoint
            .connect_with(client, b.quic, "starling.mesh")
            .expect("connect")
            .into_future(),
    )
    .await
    .expect("handshake ends");
    // The client may finish its half before the server's verdict arrives; the connection must
    // then die without ever serving a call.
    if let Ok(conn) = result {
        let call = tokio::time::timeout(UP, conn.open_bi())
            .await
            .expect("bounded");
        if let Ok((mut send, recv)) = call {
            let _ = write_message(
                &mut send,
                &RequestHead::new("echo", "say", 1000),
                Bytes::new(),
            )
            .await;
            let mut r = FrameReader::new(recv);
            assert!(
                tokio::time::timeout(UP, r.frame(MAX_HEAD_BYTES))
                    .await
                    .expect("bounded")
                    .is_err(),
                "a foreign trust domain got an answer"
            );
        }
    }
    let status = b.wait_status("refusing a handshake", UP, |s| s["refused_handshakes"] != 0);
    let why = status["last_refusal"].as_str().expect("a reason");
    assert!(
        why.contains(
            "certificate is for trust domain \"elsewhere.example\", this mesh is \"starling.local\""
        ),
        "{why}"
    );
    assert_eq!(
        status["connections_admitted"], 0,
        "the intruder was admitted"
    );
}

/// Both ends of a connection run its cipher over every byte; each machine offers first the one
/// it runs fastest, and a connection runs AES only when both ends have AES instructions (a
/// Raspberry Pi 4 has none).
#[test]
fn a_connection_runs_aes_only_when_both_ends_have_aes_instructions() {
    use mesh_node::identity::Cipher::{Aes, ChaCha};
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_CHACHA20_POLY1305_SHA256};
    let pki = Pki::new();
    let (a, b) = (pki.identity("node-a"), pki.identity("node-b"));
    for (client, server, expected) in [
        (Aes, Aes, TLS13_AES_128_GCM_SHA256),
        (ChaCha, Aes, TLS13_CHACHA20_POLY1305_SHA256),
        (Aes, ChaCha, TLS13_CHACHA20_POLY1305_SHA256),
        (ChaCha, ChaCha, TLS13_CHACHA20_POLY1305_SHA256),
    ] {
        let suite =
            mesh_node::testing::negotiated_cipher((&a, client), (&b, server)).expect("handshake");
        assert_eq!(suite, expected, "client {client:?}, server {server:?}");
    }
}

/// A machine without AES instructions (ChaCha20 first, on both ends) still makes real QUIC
/// connections: quinn takes the configurations, and a stream carries bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_runs_with_chacha20_first_on_both_ends() {
    use mesh_node::identity::Cipher::ChaCha;
    use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
    let pki = Pki::new();
    let (a, b) = (pki.identity("node-a"), pki.identity("node-b"));
    let server_tls = b
        .server_config_preferring(false, ChaCha)
        .expect("server config");
    let server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).expect("quinn takes the server config"),
    ));
    let listen = quinn::Endpoint::server(server, "127.0.0.1:0".parse().expect("addr"))
        .expect("server endpoint");
    let addr = listen.local_addr().expect("addr");
    let echo = tokio::spawn(async move {
        let conn = listen
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let got = recv.read_to_end(1024).await.expect("read");
        send.write_all(&got).await.expect("write");
        send.finish().expect("finish");
        conn.closed().await;
    });
    let client_tls = a.client_config_preferring(ChaCha).expect("client config");
    let client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).expect("quinn takes the client config"),
    ));
    let mut dialer =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client endpoint");
    dialer.set_default_client_config(client);
    let conn = tokio::time::timeout(UP, dialer.connect(addr, "starling.mesh").expect("connect"))
        .await
        .expect("handshake in time")
        .expect("handshake");
    let (mut send, mut recv) = conn.open_bi().await.expect("stream");
    send.write_all(b"over chacha20").await.expect("write");
    send.finish().expect("finish");
    let back = tokio::time::timeout(UP, recv.read_to_end(1024))
        .await
        .expect("answer in time")
        .expect("read");
    assert_eq!(back, b"over chacha20");
    conn.close(0u32.into(), b"done");
    let _ = tokio::time::timeout(UP, echo).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_service_down_upstream_and_deadline_get_their_statuses() {
    let slow = HttpUpstream::start(Duration::from_secs(3)).await;
    let pki = Pki::new();
    let (a, _b) = pair(
        &pki,
        &format!(
            "[[services]]\nname = \"down\"\nupstream = \"http://127.0.0.1:{}\"\n\
             [[services]]\nname = \"slow\"\nupstream = \"http://{}\"\n",
            closed_tcp_port(),
            slow.addr
        ),
    );
    let t = Instant::now();
    let (code, status, body) = post(a.ingress(), "nosuch", "x", Bytes::new(), None)
        .await
        .expect("ingress");
    assert_eq!(
        (code, status.as_deref()),
        (404, Some("not_found")),
        "{body:?}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "NotFound took {:?}",
        t.elapsed()
    );

    let (code, status, body) = post(a.ingress(), "down", "x", Bytes::new(), None)
        .await
        .expect("ingress");
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(
        (code, status.as_deref()),
        (503, Some("unavailable")),
        "{body}"
    );
    assert!(body.contains("unreachable"), "{body}");

    let t = Instant::now();
    let (code, status, _) = post(a.ingress(), "slow", "x", Bytes::new(), Some(300))
        .await
        .expect("ingress");
    assert_eq!((code, status.as_deref()), (504, Some("deadline_exceeded")));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "deadline ignored: {:?}",
        t.elapsed()
    );
}

/// A raw client with a valid mesh identity: it can send bytes no node would.
struct Prober {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
}

impl Prober {
    async fn connect(pki: &Pki, name: &str, to: SocketAddr) -> Prober {
        let endpoint = bind_endpoint(
            &pki.identity(name),
            &Limits::default(),
            "127.0.0.1:0".parse().expect("addr"),
        )
        .expect("endpoint");
        let conn =
            tokio::time::timeout(UP, endpoint.connect(to, "starling.mesh").expect("connect"))
                .await
                .expect("bounded")
                .expect("handshake");
        starling_tests::send_hello(
            &conn,
            &starling_tests::hello_frame(name, mesh_proto::PROTOCOL_VERSION, &[]),
        )
        .await;
        Prober {
            conn,
            _endpoint: endpoint,
        }
    }

    async fn call(&self, service: &str, body: Bytes) -> (Status, Bytes) {
        let (mut send, recv) = self.conn.open_bi().await.expect("stream");
        write_message(&mut send, &RequestHead::new(service, "say", 10_000), body)
            .await
            .expect("write");
        read_reply(recv).await
    }

    /// Writes `bytes` raw on a new stream, ends it, and returns the status of the reply.
    async fn raw(&self, bytes: &[u8]) -> (Status, String) {
        let (mut send, recv) = self.conn.open_bi().await.expect("stream");
        // The node may stop reading as soon as it has seen enough; a failed write is fine.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let mut reader = FrameReader::new(recv);
        let head = tokio::time::timeout(UP, reader.frame(MAX_HEAD_BYTES))
            .await
            .expect("a reply within the bound")
            .expect("reply head");
        let head: ResponseHead = decode_head(&head).expect("decode");
        (head.status, head.message.to_owned())
    }
}

async fn read_reply(recv: quinn::RecvStream) -> (Status, Bytes) {
    let mut reader = FrameReader::new(recv);
    let head = reader.frame(MAX_HEAD_BYTES).await.expect("head");
    let head: ResponseHead = decode_head(&head).expect("decode");
    let body = reader.frame(16 * 1024 * 1024).await.expect("body");
    (head.status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bytes_end_only_their_own_stream() {
    let pki = Pki::new();
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
        ),
    );
    let prober = Arc::new(Prober::connect(&pki, "prober", b.quic).await);
    b.wait_peer("prober", UP);

    let good = (0..100u64)
        .map(|i| {
            let p = prober.clone();
            tokio::spawn(async move {
                let body = random_bytes(64 + i as usize, i);
                let (status, answer) = p.call("echo", body.clone()).await;
                (status, answer == body)
            })
        })
        .collect::<Vec<_>>();

    // Random bytes.
    let (status, why) = prober.raw(&random_bytes(512, 99)).await;
    assert_eq!(status, Status::InvalidArgument, "{why}");
    // A head ten times over the bound: refused from its length prefix alone.
    let mut over = Vec::new();
    let len = (MAX_HEAD_BYTES * 10) as u32;
    let mut prefix = [0u8; 5];
    over.extend_from_slice(mesh_proto::varint::encode(len, &mut prefix));
    over.extend_from_slice(&vec![0u8; MAX_HEAD_BYTES * 10]);
    let (status, why) = prober.raw(&over).await;
    assert_eq!(status, Status::InvalidArgument, "{why}");
    assert!(why.contains("exceeds the bound"), "{why}");
    // A truncated frame: 100 bytes announced, 10 sent, then the end of the stream.
    let mut truncated = vec![100u8];
    truncated.extend_from_slice(&[1; 10]);
    let (status, why) = prober.raw(&truncated).await;
    assert_eq!(status, Status::InvalidArgument, "{why}");
    assert!(why.contains("truncated"), "{why}");
    // Well framed heads that lie in their metadata: 17 entries (the bound is 16), and a key that
    // is not UTF-8. Each is refused as a head, and the calls beside it are served.
    let lying_head = |count: u8, key: &[u8]| {
        let mut payload = vec![
            4, b'e', b'c', b'h', b'o', 3, b's', b'a', b'y', 0xe8, 0x07, 0,
        ];
        payload.push(count);
        for _ in 0..count {
            payload.push(key.len() as u8);
            payload.extend_from_slice(key);
            payload.push(0);
        }
        let (mut frame, mut prefix) = (Vec::new(), [0u8; 5]);
        frame.extend_from_slice(mesh_proto::varint::encode(
            payload.len() as u32,
            &mut prefix,
        ));
        frame.extend_from_slice(&payload);
        mesh_proto::encode_body_prefix(2, &mut frame);
        frame.extend_from_slice(b"hi");
        frame
    };
    for (case, bytes) in [
        ("17 metadata entries", lying_head(17, b"k")),
        ("a key that is not UTF-8", lying_head(1, &[0xc3, 0x28])),
    ] {
        let (status, why) = prober.raw(&bytes).await;
        assert_eq!(status, Status::InvalidArgument, "{case}: {why}");
        assert!(why.contains("request head"), "{case}: {why}");
    }
    // The same head with 16 entries is one the node takes.
    let (status, why) = prober.raw(&lying_head(16, b"k")).await;
    assert_eq!(status, Status::Ok, "16 metadata entries: {why}");
    // A valid head for a body over the node's bound (4 MiB by default).
    let mut big = Vec::new();
    mesh_proto::encode_frame_vec(&RequestHead::new("echo", "say", 1000), &mut big);
    big.extend_from_slice(mesh_proto::varint::encode(64 * 1024 * 1024, &mut prefix));
    let (status, why) = prober.raw(&big).await;
    assert_eq!(status, Status::InvalidArgument, "{why}");
    // A complete call followed by junk: refused, not half-served.
    let mut trailing = Vec::new();
    mesh_proto::encode_frame_vec(&RequestHead::new("echo", "say", 1000), &mut trailing);
    mesh_proto::encode_body_prefix(2, &mut trailing);
    trailing.extend_from_slice(b"hi");
    trailing.extend_from_slice(b"junk");
    let (status, why) = prober.raw(&trailing).await;
    assert_eq!(status, Status::InvalidArgument, "{why}");
    assert!(
        why.contains("4 unexpected bytes after the last frame"),
        "{why}"
    );

    for task in good {
        let (status, same) = task.await.expect("task");
        assert_eq!(status, Status::Ok);
        assert!(same, "echo changed the bytes");
    }
    // The connection survived all of it.
    let (status, _) = prober.call("echo", Bytes::from_static(b"still here")).await;
    assert_eq!(status, Status::Ok);
    assert!(prober.conn.close_reason().is_none());
    assert_eq!(b.status()["peers_lost"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_calls_share_one_connection() {
    let pki = Pki::new();
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
        ),
    );
    // The caller is a node in this process, so the test can see its connections.
    let conf = pki.config("node-a", &format!("[[peers]]\naddr = \"{}\"\n", b.quic));
    let config = mesh_node::NodeConfig::load(&conf).expect("config");
    let identity = config.load_identity().expect("identity");
    let a = mesh_node::Node::start(config, identity)
        .await
        .expect("start");
    assert!(a.wait_for_service("echo", UP).await);

    let calls = (0..1000u64)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move {
                let body = Bytes::from(i.to_le_bytes().to_vec());
                a.call("echo", "say", body.clone())
                    .await
                    .map(|answer| answer == body)
            })
        })
        .collect::<Vec<_>>();
    let mut ok = 0;
    for c in calls {
        if c.await.expect("task") == Ok(true) {
            ok += 1;
        }
    }
    assert_eq!(ok, 1000);
    assert_eq!(a.peers().len(), 1);
    assert_eq!(
        b.status()["connections_admitted"],
        1,
        "more than one connection was made"
    );
    a.shutdown().await;
    b.wait_peer_gone("node-a", UP);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_of_a_service_share_its_calls() {
    let pki = Pki::new();
    let health = "[[services]]\nname = \"health\"\nupstream = \"builtin:health\"\n";
    let b = NodeProc::start("node-b", &pki.config("node-b", health));
    let c = NodeProc::start("node-c", &pki.config("node-c", health));
    let a = NodeProc::start(
        "node-a",
        &pki.config(
            "node-a",
            &format!(
                "[[peers]]\naddr = \"{}\"\n[[peers]]\naddr = \"{}\"\n",
                b.quic, c.quic
            ),
        ),
    );
    a.wait_peer("node-b", UP);
    a.wait_peer("node-c", UP);
    // 400 calls, 20 at a time: the balancer (power of two choices over latency x calls in
    // flight) spreads concurrent load over both hosts.
    let ingress = a.ingress();
    let workers: Vec<_> = (0..20)
        .map(|_| {
            tokio::spawn(async move {
                let (mut b, mut c) = (0, 0);
                for _ in 0..20 {
                    let (code, _, body) = post(ingress, "health", "check", Bytes::new(), None)
                        .await
                        .expect("ingress");
                    assert_eq!(code, 200);
                    let body = String::from_utf8_lossy(&body);
                    b += usize::from(body.contains("\"node-b\""));
                    c += usize::from(body.contains("\"node-c\""));
                }
                (b, c)
            })
        })
        .collect();
    let (mut by_b, mut by_c) = (0, 0);
    for w in workers {
        let (b, c) = w.await.expect("worker");
        by_b += b;
        by_c += c;
    }
    eprintln!("two hosts shared 400 calls: {by_b} and {by_c}");
    assert_eq!(by_b + by_c, 400);
    assert!(
        by_b >= 80 && by_c >= 80,
        "one host took almost all: {by_b} / {by_c}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_peer_is_redialled() {
    let pki = Pki::new();
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let b_conf = pki.config("node-b", echo);
    let b = NodeProc::start("node-b", &b_conf);
    let port = b.quic.port();
    let a = NodeProc::start(
        "node-a",
        &pki.config("node-a", &format!("[[peers]]\naddr = \"{}\"\n", b.quic)),
    );
    a.wait_peer("node-b", UP);
    b.stop();
    a.wait_peer_gone("node-b", UP);
    // The same node comes back on the same port.
    let src = std::fs::read_to_string(&b_conf).expect("conf");
    std::fs::write(
        &b_conf,
        src.replace(
            "127.0.0.1:0\"\ningress",
            &format!("127.0.0.1:{port}\"\ningress"),
        ),
    )
    .expect("conf");
    let _b = NodeProc::start("node-b", &b_conf);
    a.wait_peer("node-b", UP);
    let (code, _, body) = post(
        a.ingress(),
        "echo",
        "say",
        Bytes::from_static(b"back"),
        None,
    )
    .await
    .expect("ingress");
    assert_eq!((code, &body[..]), (200, &b"back"[..]));
}

/// A node runs at most `MAX_CONCURRENT_DIALS` handshakes at once as the one that dials. Twenty
/// peers that never answer: the first handshakes start together, and the next peer hears its
/// first packet only once one of them has held its place for `DIAL_HOLD` and given it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_dials_a_bounded_number_of_peers_at_once() {
    const PEERS: usize = 20;
    let (bound, hold) = (mesh_node::MAX_CONCURRENT_DIALS, mesh_node::DIAL_HOLD);
    // How late a packet may be heard on a loaded machine.
    let margin = Duration::from_millis(400);
    assert!(bound < PEERS);
    let (heard, mut first) = tokio::sync::mpsc::unbounded_channel();
    let mut peers = String::new();
    let mut listeners = Vec::new();
    for _ in 0..PEERS {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        peers.push_str(&format!(
            "[[peers]]\naddr = \"{}\"\n",
            socket.local_addr().expect("addr")
        ));
        let heard = heard.clone();
        // Hears the first packet of a handshake, and answers nothing.
        listeners.push(tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            if socket.recv_from(&mut buf).await.is_ok() {
                let _ = heard.send(Instant::now());
            }
            std::future::pending::<()>().await;
        }));
    }
    let pki = Pki::new();
    // The connect timeout outlasts the hold: the places are given up by the hold.
    let config = pki.config(
        "node-a",
        &format!("{peers}[limits]\nconnect_timeout_ms = 10000\nidle_timeout_ms = 10000\n"),
    );
    let _a = NodeProc::start("node-a", &config);
    let mut times = Vec::new();
    while times.len() <= bound {
        let at = tokio::time::timeout(Duration::from_secs(20), first.recv())
            .await
            .expect("a peer heard nothing within 20 s")
            .expect("listeners live");
        times.push(at);
    }
    times.sort();
    let (first_places, next) = (times[bound - 1] - times[0], times[bound] - times[0]);
    assert!(
        first_places < hold - margin,
        "the first {bound} handshakes did not start together: the last {first_places:?} after the first"
    );
    assert!(
        next >= hold - margin,
        "peer {} heard its first packet {next:?} after the first: more than {bound} handshakes at once",
        bound + 1
    );
    for l in listeners {
        l.abort();
    }
}
