//! The call path on the in-memory network (`mesh_node::testing`): real QUIC, real certificates,
//! no sockets; under tokio's paused clock where a test waits on timers. What these check runs over
//! real sockets too, in the other test files.

use std::time::Duration;

use bytes::Bytes;
use mesh_node::testing::MemoryNetwork;
use mesh_node::upstream::UpstreamSpec;
use mesh_node::{CallOptions, Identity, Node};
use mesh_proto::Status;
use starling_tests::Pki;

const UP: Duration = Duration::from_secs(10);

/// A node on `net`, configured with `extra` TOML (services, peers, limits).
fn node(net: &MemoryNetwork, pki: &Pki, name: &str, extra: &str) -> Node {
    pki.memory_node(net, name, extra, Default::default())
}

fn peer(of: &Node) -> String {
    format!("[[peers]]\naddr = \"{}\"\n", of.local_addr())
}

const ECHO: &str = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";

/// `node-a` with `node-b` as its peer, which hosts echo; `a` has seen echo.
async fn echo_pair() -> (MemoryNetwork, Pki, Node, Node) {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let b = node(&net, &pki, "node-b", ECHO);
    let a = node(&net, &pki, "node-a", &peer(&b));
    assert!(a.wait_for_service("echo", UP).await);
    (net, pki, a, b)
}

/// `node-b`, hosting echo, allowing each peer `calls` streams at once.
fn echo_node_allowing(net: &MemoryNetwork, pki: &Pki, calls: u32) -> Node {
    let limits = format!("{ECHO}[limits]\nmax_concurrent_calls = {calls}\n");
    node(net, pki, "node-b", &limits)
}

/// A raw endpoint on `net` with the identity `name`, for sending what a node never would.
fn raw_endpoint(net: &MemoryNetwork, pki: &Pki, name: &str) -> quinn::Endpoint {
    net.endpoint(&pki.identity(name), &Default::default())
        .expect("endpoint")
}

/// A raw connection from `name` to `to`, its hello (`protocol`, `extra` bytes after it) sent.
async fn raw_member(
    net: &MemoryNetwork,
    pki: &Pki,
    to: &Node,
    name: &str,
    protocol: u16,
    extra: &[u8],
) -> (quinn::Connection, quinn::Endpoint) {
    let endpoint = raw_endpoint(net, pki, name);
    let conn = endpoint
        .connect(to.local_addr(), "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    starling_tests::send_hello(&conn, &starling_tests::hello_frame(name, protocol, extra)).await;
    (conn, endpoint)
}

#[tokio::test]
async fn calls_cross_the_memory_network() {
    let (_net, _pki, a, _b) = echo_pair().await;
    let answer = a
        .call("echo", "say", Bytes::from_static(b"no sockets"))
        .await
        .expect("call");
    assert_eq!(answer, Bytes::from_static(b"no sockets"));
    assert_eq!(a.peers()[0].protocol, mesh_proto::PROTOCOL_VERSION);
}

/// A streamed call carries 16 MiB, four times the default body bound: nothing is buffered whole,
/// chunk by chunk both ways (and no deadline ends it while it makes progress).
#[tokio::test]
async fn a_streamed_call_carries_more_than_the_body_bound_chunk_by_chunk() {
    let (_net, _pki, a, _b) = echo_pair().await;

    // The unary shape refuses it: the bound holds.
    let too_big = starling_tests::random_bytes(5 * 1024 * 1024, 1);
    let refused = a.call("echo", "say", too_big).await.expect_err("bound");
    assert_eq!(refused.status, Status::InvalidArgument);

    let call = a
        .call_stream("echo", "say", &CallOptions::default())
        .await
        .expect("open");
    let (mut up, mut down) = call.split();
    let total = 16 * 1024 * 1024;
    let chunk = starling_tests::random_bytes(256 * 1024, 7);
    // Send and receive at once: the echo answers as the body arrives, and neither side holds
    // more than a window of it.
    let sender = async {
        let mut sent = 0;
        while sent < total {
            up.send(chunk.clone()).await.expect("send");
            sent += chunk.len();
        }
        up.finish();
    };
    let receiver = async {
        let (status, why) = down.status().await.expect("head");
        assert_eq!(status, Status::Ok, "{why}");
        let mut received = 0;
        while let Some(part) = down.recv().await.expect("chunk") {
            for (i, byte) in part.iter().enumerate() {
                let at = received + i;
                assert_eq!(*byte, chunk[at % chunk.len()], "byte {at}");
            }
            received += part.len();
        }
        received
    };
    let ((), received) = tokio::join!(sender, receiver);
    assert_eq!(received, total);
    // The streamed call is counted like any other, with its callee and status.
    let counted: u64 = a
        .telemetry_now()
        .iter()
        .flat_map(|b| &b.calls)
        .filter(|c| {
            (
                c.service.as_str(),
                c.method.as_str(),
                c.callee.as_str(),
                c.status,
            ) == ("echo", "say", "node-b", Status::Ok)
        })
        .map(|c| c.count)
        .sum();
    assert_eq!(counted, 1, "the streamed call was not counted");
}

/// `limits.max_body_bytes`, when a config sets it, bounds a streamed body's total too: on the
/// caller (its send past the bound fails, and the callee sees a reset, not a shorter body) and on
/// the callee (it resets a stream that brings more, whatever the caller allows).
#[tokio::test]
async fn a_set_body_bound_bounds_streamed_totals_on_both_sides() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let small = "[limits]\nmax_body_bytes = 1048576\n";
    let b = node(&net, &pki, "node-b", &format!("{ECHO}{small}"));
    let a = node(&net, &pki, "node-a", &format!("{}{small}", peer(&b)));
    let c = node(&net, &pki, "node-c", &peer(&b));
    assert!(a.wait_for_service("echo", UP).await);
    assert!(c.wait_for_service("echo", UP).await);
    let chunk = starling_tests::random_bytes(256 * 1024, 9);

    let call = a
        .call_stream("echo", "say", &CallOptions::default())
        .await
        .expect("open");
    let (mut up, mut down) = call.split();
    let drain = tokio::spawn(async move { while let Ok(Some(_)) = down.recv().await {} });
    let mut refused = None;
    for _ in 0..8 {
        if let Err(e) = up.send(chunk.clone()).await {
            refused = Some(e);
            break;
        }
    }
    let refused = refused.expect("the caller's bound held");
    assert_eq!(refused.status, Status::ResourceExhausted);
    assert!(
        refused.message.contains("max_body_bytes"),
        "{}",
        refused.message
    );
    let _ = drain.await;

    // node-c sets no bound; node-b does, and cuts the stream past it.
    let call = c
        .call_stream("echo", "say", &CallOptions::default())
        .await
        .expect("open");
    let (mut up, mut down) = call.split();
    let sender = async {
        for _ in 0..8 {
            if up.send(chunk.clone()).await.is_err() {
                return;
            }
        }
        up.finish();
    };
    let receiver = async {
        let mut received = 0;
        loop {
            match down.recv().await {
                Ok(Some(part)) => received += part.len(),
                Ok(None) => return Ok(received),
                Err(e) => return Err((received, e)),
            }
        }
    };
    let ((), answer) = tokio::join!(sender, receiver);
    let (received, _) = answer.expect_err("the callee's bound cut the stream");
    assert!(
        received <= 1024 * 1024,
        "{received} bytes echoed past the bound"
    );
}

/// Hosted services are one value that changes at runtime: peers learn of a new service and of
/// one that left, without reconnecting.
#[tokio::test]
async fn hosted_services_change_at_runtime_and_peers_follow() {
    let (_net, _pki, a, b) = echo_pair().await;
    b.host("late".parse().expect("name"), UpstreamSpec::Echo);
    assert!(
        a.wait_for_service("late", UP).await,
        "the new service never showed"
    );
    let answer = a.call("late", "x", Bytes::from_static(b"hi")).await;
    assert_eq!(answer, Ok(Bytes::from_static(b"hi")));
    b.unhost("echo");
    assert!(
        a.wait_until(UP, |n| n.peers()[0]
            .services
            .iter()
            .all(|s| s.as_str() != "echo"))
            .await
    );
    let gone = a.call("echo", "say", Bytes::new()).await.expect_err("gone");
    assert_eq!(gone.status, Status::Unavailable, "{}", gone.message);
    assert_eq!(b.status().connections_admitted, 1, "it reconnected");
}

/// A burst of changes, faster than a peer frees its two hello streams: the hellos wait for
/// streams, and the peer ends with the newest services, not an older snapshot sent last.
#[tokio::test]
async fn a_burst_of_service_changes_leaves_peers_with_the_newest() {
    let (_net, _pki, a, b) = echo_pair().await;
    for i in 0..12 {
        b.host(
            format!("burst-{i}").parse().expect("name"),
            UpstreamSpec::Echo,
        );
        if i % 3 == 0 {
            b.unhost("echo");
        } else {
            b.host("echo".parse().expect("name"), UpstreamSpec::Echo);
        }
        // The announcer runs between changes: each change is a hello of its own.
        tokio::task::yield_now().await;
    }
    let mut want: Vec<String> = b.hosted().iter().map(|s| s.to_string()).collect();
    want.sort();
    assert!(want.iter().any(|s| s == "burst-11") && want.iter().any(|s| s == "echo"));
    assert!(
        a.wait_until(UP, |n| {
            let mut got: Vec<String> = n.peers()[0]
                .services
                .iter()
                .map(|s| s.to_string())
                .collect();
            got.sort();
            got == want
        })
        .await,
        "node-a holds {:?}, node-b hosts {want:?}",
        a.peers()[0].services
    );
}

/// Discovery's in-memory twin on the in-memory network: nodes find each other with no config,
/// and one that says goodbye leaves the others' tables.
#[tokio::test]
async fn nodes_find_each_other_through_memory_discovery() {
    use mesh_node::discovery::{MemoryBus, MemoryDiscovery};
    let (net, pki, bus) = (MemoryNetwork::new(), Pki::new(), MemoryBus::new());
    let start = |name: &str, extra: &str| {
        let options = mesh_node::NodeOptions {
            discovery: Some(std::sync::Arc::new(MemoryDiscovery::new(&bus))),
            ..Default::default()
        };
        pki.memory_node(&net, name, extra, options)
    };
    let b = start("node-b", ECHO);
    let c = start("node-c", ECHO);
    let a = start("node-a", "");
    assert!(
        a.wait_until(UP, |n| n.peers().len() == 2).await,
        "{:?}",
        a.peers()
    );
    assert_eq!(
        a.call("echo", "say", Bytes::from_static(b"found")).await,
        Ok(Bytes::from_static(b"found"))
    );
    c.shutdown().await;
    assert!(a.wait_until(UP, |n| n.peers().len() == 1).await);
    drop(b);
}

/// A peer below the oldest protocol this node speaks is refused with a reason that says so.
#[tokio::test]
async fn a_peer_speaking_a_protocol_too_old_is_refused_with_a_reason() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let b = node(&net, &pki, "node-b", ECHO);
    let (conn, _endpoint) = raw_member(&net, &pki, &b, "old", 0, &[]).await;
    let reason = tokio::time::timeout(UP, conn.closed())
        .await
        .expect("closed");
    assert!(
        reason
            .to_string()
            .contains("peer speaks protocol 0; this node needs at least 1"),
        "{reason}"
    );
}

/// A newer peer's hello, with fields this version does not know at its end, is accepted; the
/// connection speaks this node's version.
#[tokio::test]
async fn a_newer_peer_is_accepted_and_spoken_to_in_this_nodes_version() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let b = node(&net, &pki, "node-b", ECHO);
    let (_conn, _endpoint) = raw_member(&net, &pki, &b, "newer", 9, &[0x02, 0xaa, 0xbb]).await;
    assert!(
        b.wait_until(UP, |n| n
            .peers()
            .iter()
            .any(|p| p.id.node_name().as_str() == "newer"))
            .await,
        "the newer peer was not admitted"
    );
    assert_eq!(b.peers()[0].protocol, mesh_proto::PROTOCOL_VERSION);
}

/// A renewed certificate is used for new handshakes at once; the connection already up and the
/// calls on it go on.
#[tokio::test]
async fn a_swapped_identity_serves_new_handshakes_and_keeps_calls_going() {
    let (net, pki, a, b) = echo_pair().await;
    let caller = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut ok = 0;
            for i in 0..300u32 {
                let body = Bytes::from(i.to_le_bytes().to_vec());
                if a.call("echo", "say", body.clone()).await == Ok(body) {
                    ok += 1;
                }
            }
            ok
        })
    };
    let renewed_dir = pki.dir.path().join("node-b-renewed");
    let renewed = pki.ca.issue_node("node-b", 1).expect("issue");
    renewed.save(&renewed_dir, pki.ca.cert_pem()).expect("save");
    let identity = Identity::load(
        &renewed_dir.join("node.crt"),
        &renewed_dir.join("node.key"),
        &renewed_dir.join("ca.crt"),
    )
    .expect("renewed identity");
    b.set_identity(&identity).expect("swap");
    assert_eq!(
        caller.await.expect("caller"),
        300,
        "calls failed across the swap"
    );

    // A new handshake sees the renewed certificate.
    let probe = raw_endpoint(&net, &pki, "probe");
    let conn = probe
        .connect(b.local_addr(), "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    let certs = conn
        .peer_identity()
        .and_then(|c| {
            c.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .expect("certificates");
    let expected = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes()).expect("pem")
    };
    assert_eq!(certs[0], expected);
}

/// In simulated time: a peer whose link is cut leaves the table after the keep-alive gives up
/// (three intervals, here 3 s), and the test takes no such time.
#[tokio::test(start_paused = true)]
async fn a_silent_peer_leaves_after_the_keep_alive_gives_up_in_simulated_time() {
    let (net, _pki, a, b) = echo_pair().await;
    let wall = std::time::Instant::now();
    let cut = tokio::time::Instant::now();
    net.cut(b.local_addr());
    assert!(
        a.wait_until(Duration::from_secs(60), |n| n.peers().is_empty())
            .await
    );
    let simulated = cut.elapsed();
    assert!(
        simulated >= Duration::from_secs(2) && simulated <= Duration::from_secs(4),
        "left after {simulated:?} of simulated time"
    );
    let unavailable = a.call("echo", "say", Bytes::new()).await.expect_err("gone");
    assert_eq!(unavailable.status, Status::Unavailable);
    assert!(wall.elapsed() < Duration::from_secs(2), "took real time");
    net.restore(b.local_addr());
}

/// A certificate is trusted until it expires, not for as long as its connection lasts: a peer
/// whose certificate expires mid-connection is disconnected, and its next handshake refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_expires_is_disconnected() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let b = node(&net, &pki, "node-b", ECHO);
    let name = mesh_core::NodeName::try_from("node-a").expect("name");
    let lifetime = Duration::from_secs(3);
    let short = pki
        .ca
        .issue_for(
            mesh_core::SpiffeId::node(starling_tests::TD, name).expect("id"),
            lifetime,
            &Default::default(),
        )
        .expect("issue");
    // X.509 times are whole seconds: the certificate says exactly when it ends.
    let not_after = {
        let (_, pem) = x509_parser::pem::parse_x509_pem(short.cert_pem.as_bytes()).expect("pem");
        let cert = pem.parse_x509().expect("x509");
        std::time::UNIX_EPOCH
            + Duration::from_secs(
                cert.validity()
                    .not_after
                    .timestamp()
                    .try_into()
                    .expect("time"),
            )
    };
    let a = pki.memory_node_as(&net, &short, &peer(&b));
    assert!(a.wait_for_service("echo", UP).await);
    a.call("echo", "say", Bytes::from_static(b"still valid"))
        .await
        .expect("a call while the certificate is valid");
    let left = a.status().certificate_expires_in_s;
    assert!((0..=3).contains(&left), "status says {left}s left");
    assert!(
        b.wait_until(UP, |b| !b.peers().iter().any(|p| &p.id == a.id()))
            .await,
        "the connection outlived the certificate"
    );
    let early = not_after
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        early < Duration::from_millis(100),
        "disconnected {early:?} before the certificate expired"
    );
    assert!(a.status().certificate_expires_in_s <= 0, "{:?}", a.status());
    // Its redials are refused by the verifier: the certificate is expired now.
    assert!(
        b.wait_until(UP, |b| b.status().refused_handshakes >= 1)
            .await,
        "no redial was refused: b {:?}, a {:?}",
        b.status(),
        a.status()
    );
    assert_eq!(
        a.call("echo", "say", Bytes::new())
            .await
            .map_err(|e| e.status),
        Err(Status::Unavailable)
    );
}

/// More large bodies at once than a connection's share of the node's body budget
/// (`limits.max_buffered_bytes`, a quarter each): those past it are refused at once as busy, the
/// others served, and none waits for its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_past_a_connections_share_are_refused_at_once_and_the_rest_served() {
    let (_net, _pki, a, _b) = echo_pair().await;
    let body = starling_tests::random_bytes(1024 * 1024, 3);
    let started = std::time::Instant::now();
    let calls: Vec<_> = (0..64)
        .map(|_| {
            let (a, body) = (a.clone(), body.clone());
            tokio::spawn(async move {
                a.call_with("echo", "say", body, &CallOptions::default())
                    .await
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for c in calls {
        let reply = c.await.expect("task");
        match reply.status {
            Status::Ok => {
                assert_eq!(reply.body, body);
                ok += 1;
            }
            Status::Unavailable if reply.message.contains("limits.max_buffered_bytes") => busy += 1,
            other => panic!("{other:?}: {}", reply.message),
        }
    }
    let took = started.elapsed();
    eprintln!("64 bodies of 1 MiB at once on one connection: {ok} served, {busy} busy in {took:?}");
    assert!(ok >= 7, "the share admitted too little: {ok}");
    assert!(busy > 0, "nothing was refused: the share did not bind");
    assert!(took < Duration::from_secs(8), "took {took:?}");
    // And its share is whole again: as many bodies as it holds are all served at once.
    let again: Vec<_> = (0..7)
        .map(|_| {
            let (a, body) = (a.clone(), body.clone());
            tokio::spawn(async move { a.call("echo", "say", body).await })
        })
        .collect();
    for c in again {
        assert_eq!(c.await.expect("task").expect("served"), body);
    }
}

/// A connection starts with a few streams and grows to `limits.max_concurrent_calls` as its peer
/// uses them (quinn sets room aside for every stream a peer may open, which an idle peer never
/// uses): a peer holding calls open gets all 100 it may have, through MAX_STREAMS frames sent as
/// it went, and no 101st.
#[tokio::test]
async fn a_peers_streams_grow_to_max_concurrent_calls_as_it_uses_them() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let b = echo_node_allowing(&net, &pki, 100);
    let (conn, _endpoint) =
        raw_member(&net, &pki, &b, "node-r", mesh_proto::PROTOCOL_VERSION, &[]).await;
    let mut held = Vec::new();
    for i in 0..100 {
        let (mut send, recv) = tokio::time::timeout(UP, conn.open_bi())
            .await
            .unwrap_or_else(|_| panic!("stream {i} was never allowed"))
            .expect("stream");
        // A call whose body never comes: the stream stays open.
        let mut head =
            mesh_node::wire::encode_head(&mesh_proto::RequestHead::new("echo", "say", 60_000));
        mesh_proto::encode_body_prefix(10, &mut head);
        send.write_all(&head).await.expect("head");
        held.push((send, recv));
    }
    let raised = conn.stats().frame_rx.max_streams_bidi;
    assert!(
        raised >= 1,
        "all 100 streams were allowed at the handshake: the connection did not start small"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), conn.open_bi())
            .await
            .is_err(),
        "a 101st stream was allowed"
    );
}

/// One unary call on `send`/`reader`, asking to keep the stream when `keep`: the answer's status,
/// whether the callee keeps the stream, and the body.
async fn raw_call(
    send: &mut quinn::SendStream,
    reader: &mut mesh_node::wire::FrameReader,
    body: &[u8],
    keep: bool,
) -> (Status, bool, Bytes) {
    let mut head = mesh_proto::RequestHead::new("echo", "say", 60_000);
    if keep {
        head.metadata
            .push((mesh_proto::KEEP_METADATA, ""))
            .expect("room");
    }
    let framed = mesh_node::wire::Framed::new(
        mesh_node::wire::encode_head(&head),
        Bytes::copy_from_slice(body),
    );
    if keep {
        framed.write(send).await.expect("request");
    } else {
        mesh_node::wire::write_encoded(send, framed)
            .await
            .expect("request");
    }
    let answer = tokio::time::timeout(UP, reader.frame(8192))
        .await
        .expect("an answer in time")
        .expect("answer head");
    let answer: mesh_proto::ResponseHead = mesh_proto::decode_head(&answer).expect("head");
    let kept = answer
        .metadata
        .iter()
        .any(|(k, _)| *k == mesh_proto::KEEP_METADATA);
    let body = tokio::time::timeout(UP, reader.frame(1 << 20))
        .await
        .expect("a body in time")
        .expect("answer body");
    (answer.status, kept, body)
}

/// `node-b` hosting echo, and a raw member's connection to it (protocol this node's).
async fn raw_member_of_echo(
    net: &MemoryNetwork,
    pki: &Pki,
) -> (Node, quinn::Connection, quinn::Endpoint) {
    let b = node(net, pki, "node-b", ECHO);
    let (conn, endpoint) =
        raw_member(net, pki, &b, "node-r", mesh_proto::PROTOCOL_VERSION, &[]).await;
    (b, conn, endpoint)
}

/// A new call stream on `conn`, its receiving side framed.
async fn raw_stream(conn: &quinn::Connection) -> (quinn::SendStream, mesh_node::wire::FrameReader) {
    let (send, recv) = conn.open_bi().await.expect("stream");
    (send, mesh_node::wire::FrameReader::new(recv))
}

/// A node keeps a call stream its caller asks it to keep, and reads one call after another on
/// it; a call that does not ask ends its stream as before.
#[tokio::test]
async fn a_kept_stream_carries_one_call_after_another() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let (_b, conn, _endpoint) = raw_member_of_echo(&net, &pki).await;
    let (mut send, mut reader) = raw_stream(&conn).await;
    for i in 0..5u8 {
        let (status, kept, body) = raw_call(&mut send, &mut reader, &[i; 3], true).await;
        assert_eq!(status, Status::Ok, "call {i}");
        assert!(kept, "call {i}: the callee did not keep the stream");
        assert_eq!(&body[..], &[i; 3], "call {i}");
    }
    // The caller ends the stream: so does the callee.
    send.finish().expect("finish");
    let end = tokio::time::timeout(UP, reader.end())
        .await
        .expect("an end in time");
    assert!(end.is_ok(), "the kept stream did not end cleanly: {end:?}");

    // Not asked: the stream ends after the answer.
    let (mut send, mut reader) = raw_stream(&conn).await;
    let (status, kept, _) = raw_call(&mut send, &mut reader, b"once", false).await;
    assert_eq!(status, Status::Ok);
    assert!(
        !kept,
        "a stream was kept that its caller did not ask to keep"
    );
    let end = tokio::time::timeout(UP, reader.end())
        .await
        .expect("an end in time");
    assert!(
        end.is_ok(),
        "the stream did not end after its answer: {end:?}"
    );
}

/// A kept stream on which no next call comes is ended by the callee after `kept::IDLE_BOUND`
/// (a minute), in simulated time.
#[tokio::test(start_paused = true)]
async fn an_idle_kept_stream_is_ended_by_its_callee() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let (_b, conn, _endpoint) = raw_member_of_echo(&net, &pki).await;
    let (mut send, mut reader) = raw_stream(&conn).await;
    let (status, kept, _) = raw_call(&mut send, &mut reader, b"one", true).await;
    assert_eq!((status, kept), (Status::Ok, true));
    let idle = tokio::time::Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(600), reader.end())
        .await
        .expect("the idle kept stream was never ended");
    // Reset with the code that tells a caller its next call was not read.
    match end {
        Err(mesh_node::wire::ReadError::Stream(quinn::ReadError::Reset(code))) => {
            assert_eq!(code, mesh_proto::KEPT_IDLE_CODE.into());
        }
        other => panic!("the idle kept stream ended with {other:?}, not reset as idle"),
    }
    let waited = idle.elapsed();
    assert!(
        (Duration::from_secs(59)..Duration::from_secs(120)).contains(&waited),
        "ended after {waited:?}, not after about a minute idle"
    );
}

/// How [`raw_echo_host`] treats a kept stream after an answer.
#[derive(Clone, Copy, PartialEq)]
enum Kept {
    /// Reads the next call on it.
    Keep,
    /// Ends it as the next call comes, unread, as a callee whose idle bound ran out just then:
    /// reset and stopped with `KEPT_IDLE_CODE`.
    EndIdle,
    /// Reads the next call on it, then ends the stream cleanly without answering, as a callee
    /// whose task died after serving it.
    Vanish,
}

/// What [`raw_echo_host`] saw.
#[derive(Default)]
struct Seen {
    streams: std::sync::atomic::AtomicUsize,
    calls: std::sync::atomic::AtomicUsize,
    asked_to_keep: std::sync::atomic::AtomicUsize,
}

impl Seen {
    fn get(&self) -> (usize, usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (
            self.streams.load(SeqCst),
            self.calls.load(SeqCst),
            self.asked_to_keep.load(SeqCst),
        )
    }
}

/// A peer speaking `protocol` that serves `echo` from a raw endpoint, counting what its caller
/// sends. It keeps a stream when asked, and treats it after the answer as `mode` says.
async fn raw_echo_host(
    net: &MemoryNetwork,
    pki: &Pki,
    caller: &Node,
    protocol: u16,
    mode: Kept,
) -> (std::sync::Arc<Seen>, quinn::Endpoint) {
    use std::sync::atomic::Ordering::SeqCst;
    let endpoint = raw_endpoint(net, pki, "node-h");
    let conn = endpoint
        .connect(caller.local_addr(), "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    let mut services = mesh_proto::Services::new();
    services.push("echo").expect("room");
    let hello = mesh_proto::Hello {
        protocol_version: protocol,
        name: "node-h",
        role: mesh_proto::Role::Node,
        labels: Default::default(),
        services,
    };
    let mut frame = Vec::new();
    let body = postcard::to_allocvec(&hello).expect("hello");
    mesh_proto::encode_body_prefix(body.len(), &mut frame);
    frame.extend_from_slice(&body);
    starling_tests::send_hello(&conn, &frame).await;
    let seen = std::sync::Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut send, recv)) = conn.accept_bi().await {
            counts.streams.fetch_add(1, SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut reader = mesh_node::wire::FrameReader::new(recv);
                let mut answered = 0;
                while let Ok(Some(head)) = reader.next_frame(8192).await {
                    let head: mesh_proto::RequestHead =
                        mesh_proto::decode_head(&head).expect("request head");
                    let keep = head
                        .metadata
                        .iter()
                        .any(|(k, _)| *k == mesh_proto::KEEP_METADATA);
                    let body = reader.frame(1 << 20).await.expect("body");
                    counts.calls.fetch_add(1, SeqCst);
                    counts.asked_to_keep.fetch_add(usize::from(keep), SeqCst);
                    if mode == Kept::Vanish && answered == 1 {
                        let _ = send.finish();
                        reader.stop();
                        return;
                    }
                    let mut answer = mesh_proto::ResponseHead::new(Status::Ok, "");
                    if keep {
                        answer
                            .metadata
                            .push((mesh_proto::KEEP_METADATA, ""))
                            .expect("room");
                    }
                    let answer =
                        mesh_node::wire::Framed::new(mesh_node::wire::encode_head(&answer), body);
                    if !keep {
                        let _ = mesh_node::wire::write_encoded(&mut send, answer).await;
                        return;
                    }
                    let _ = answer.write(&mut send).await;
                    answered += 1;
                    if mode == Kept::EndIdle {
                        // The next call has come, and is not read.
                        let _ = reader.more().await;
                        reader.stop_with(mesh_proto::KEPT_IDLE_CODE);
                        let _ = send.reset(mesh_proto::KEPT_IDLE_CODE.into());
                        return;
                    }
                }
            });
        }
    });
    (seen, endpoint)
}

/// `calls` echo calls, one after another, from a node to [`raw_echo_host`]; returns their
/// answers and what the host saw.
async fn calls_to_raw_host(
    calls: u8,
    protocol: u16,
    mode: Kept,
) -> (
    Vec<Result<Bytes, mesh_node::CallError>>,
    (usize, usize, usize),
) {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let a = node(&net, &pki, "node-a", "");
    let (seen, _host) = raw_echo_host(&net, &pki, &a, protocol, mode).await;
    assert!(a.wait_for_service("echo", UP).await);
    let mut answers = Vec::new();
    for i in 0..calls {
        answers.push(a.call("echo", "say", Bytes::from(vec![i; 8])).await);
    }
    (answers, seen.get())
}

fn all_echoed(answers: &[Result<Bytes, mesh_node::CallError>]) {
    for (i, answer) in answers.iter().enumerate() {
        assert_eq!(
            answer.as_ref().expect("call"),
            &Bytes::from(vec![i as u8; 8]),
            "call {i}"
        );
    }
}

/// A node sends its calls to a peer one after another on one kept stream, not a stream each.
#[tokio::test]
async fn sequential_calls_to_a_peer_share_one_kept_stream() {
    let (answers, (streams, calls, asked)) =
        calls_to_raw_host(20, mesh_proto::PROTOCOL_VERSION, Kept::Keep).await;
    all_echoed(&answers);
    assert_eq!((calls, asked), (20, 20));
    assert_eq!(
        streams, 1,
        "20 calls one after another should share one kept stream"
    );
}

/// A peer speaking protocol 3 is never asked to keep a stream: a stream per call, as before.
#[tokio::test]
async fn a_protocol_3_peer_is_never_asked_to_keep_a_stream() {
    let (answers, seen) = calls_to_raw_host(5, 3, Kept::Keep).await;
    all_echoed(&answers);
    assert_eq!(seen, (5, 5, 0), "(streams, calls, asked to keep)");
}

/// A call sent on a kept stream that its callee ended idle before reading it (the callee's idle
/// bound and the call crossed) is sent again on a new stream, and served.
#[tokio::test]
async fn a_call_on_a_kept_stream_its_callee_ended_idle_goes_on_a_new_stream() {
    let (answers, seen) = calls_to_raw_host(5, mesh_proto::PROTOCOL_VERSION, Kept::EndIdle).await;
    all_echoed(&answers);
    // Each call asked to keep its stream; each after the first found the kept one ended and
    // went on a new stream; the host read each call once.
    assert_eq!(seen, (5, 5, 5), "(streams, calls, asked to keep)");
}

/// A kept stream that its callee ends without an answer, other than idle, may have carried its
/// call to the callee: the call fails and is not sent again.
#[tokio::test]
async fn a_call_whose_kept_stream_ends_without_an_answer_is_not_sent_again() {
    let (answers, seen) = calls_to_raw_host(2, mesh_proto::PROTOCOL_VERSION, Kept::Vanish).await;
    assert!(answers[0].is_ok(), "{:?}", answers[0]);
    let failed = answers[1]
        .as_ref()
        .expect_err("the second call has no answer");
    // A bad answer, counted against the endpoint.
    assert_eq!(failed.status, Status::Internal, "{failed:?}");
    assert_eq!(seen.1, 2, "the host read the second call again");
}

/// Idle kept streams hold streams the peer allows at once: a streamed call that needs one
/// ends them rather than wait.
#[tokio::test]
async fn a_streamed_call_is_not_kept_waiting_by_idle_kept_streams() {
    let (net, pki) = (MemoryNetwork::new(), Pki::new());
    let b = echo_node_allowing(&net, &pki, 4);
    let a = node(&net, &pki, "node-a", &peer(&b));
    assert!(a.wait_for_service("echo", UP).await);
    // Four calls at once: four streams, all of node-b's allowance, kept idle after.
    let call = |i: u8| a.call("echo", "say", Bytes::from(vec![i; 8]));
    let answers = tokio::join!(call(0), call(1), call(2), call(3));
    for answer in [answers.0, answers.1, answers.2, answers.3] {
        answer.expect("call");
    }
    let streamed = async {
        let call = a
            .call_stream("echo", "say", &CallOptions::default())
            .await
            .expect("open");
        let (mut up, mut down) = call.split();
        up.send(Bytes::from_static(b"streamed"))
            .await
            .expect("send");
        up.finish();
        let (status, why) = down.status().await.expect("head");
        assert_eq!(status, Status::Ok, "{why}");
        down.recv().await.expect("chunk").expect("a chunk")
    };
    let echoed = tokio::time::timeout(UP, streamed)
        .await
        .expect("the streamed call waited for a stream the kept ones held");
    assert_eq!(echoed, Bytes::from_static(b"streamed"));
}

/// Nothing on a connection is held back by a transfer that never runs dry: while two streamed
/// calls keep both directions full (their senders never pause), both go on, and unary calls
/// between the same two nodes are answered. Streams with data to send take turns, a packet each
/// (quinn's `send_fairness`). With it off, 16 KiB calls at 64 in flight ran 1.4x faster, but a
/// stream once started is sent until it runs dry, whatever the priorities: here every small call
/// waited out its deadline (docs/PERFORMANCE.md, twelfth slice).
#[tokio::test]
async fn small_calls_and_transfers_pass_a_transfer_that_never_ends() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (_net, _pki, a, _b) = echo_pair().await;
    let chunk = starling_tests::random_bytes(256 * 1024, 3);
    let done = AtomicBool::new(false);
    // One transfer: sends until `done`, counting the bytes echoed back in `echoed`.
    let transfer = |echoed: tokio::sync::watch::Sender<usize>| {
        let (a, chunk, done) = (&a, &chunk, &done);
        async move {
            let call = a
                .call_stream("echo", "say", &CallOptions::default())
                .await
                .expect("open");
            let (mut up, mut down) = call.split();
            let sender = async {
                while !done.load(Ordering::Relaxed) {
                    up.send(chunk.clone()).await.expect("send");
                }
                up.finish();
            };
            let receiver = async {
                let (status, why) = down.status().await.expect("head");
                assert_eq!(status, Status::Ok, "{why}");
                while let Some(part) = down.recv().await.expect("chunk") {
                    echoed.send_modify(|n| *n += part.len());
                }
            };
            tokio::join!(sender, receiver);
        }
    };
    let (first, mut first_seen) = tokio::sync::watch::channel(0usize);
    let mut first_started = first.subscribe();
    let (second, mut second_seen) = tokio::sync::watch::channel(0usize);
    let small = async {
        // Both transfers are under way first: the second started while the first ran.
        let started = |n: &usize| *n >= 4 * chunk.len();
        let first_before = *first_seen.wait_for(started).await.expect("echoed");
        let second_before = *second_seen.wait_for(started).await.expect("echoed");
        for i in 0..20u8 {
            let body = Bytes::from(vec![i; 64]);
            let answer = a.call("echo", "say", body.clone()).await;
            assert_eq!(answer, Ok(body), "small call {i}");
        }
        // And both went on while the small calls did.
        first_seen
            .wait_for(|n| *n > first_before)
            .await
            .expect("echoed");
        second_seen
            .wait_for(|n| *n > second_before)
            .await
            .expect("echoed");
        done.store(true, Ordering::Relaxed);
    };
    let second_transfer = async {
        first_started
            .wait_for(|n| *n >= chunk.len())
            .await
            .expect("echoed");
        transfer(second).await;
    };
    let all = async { tokio::join!(transfer(first), second_transfer, small) };
    // Bounded: a small call held back fails at its own deadline (UP) first.
    tokio::time::timeout(3 * UP, all)
        .await
        .expect("the transfers and the small calls ended");
}
