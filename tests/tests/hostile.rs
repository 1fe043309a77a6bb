//! What a hostile peer or a hostile local app can send a node, with real processes and sockets:
//! forged headers, certificates of shapes the mesh never issues, calls before the hello, and the
//! local ingress under connection, slow-sender and memory abuse.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_node::wire::{FrameReader, write_message};
use mesh_proto::limits::MAX_HEAD_BYTES;
use mesh_proto::{RequestHead, ResponseHead, Status, decode_head};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use starling_tests::{HttpUpstream, NodeProc, Pki, hello_frame, post, raw_client, send_hello};

const UP: Duration = Duration::from_secs(10);

/// The mesh CA of `pki`, as an rcgen issuer, to sign what `ca issue` never would.
fn mesh_issuer(pki: &Pki) -> Issuer<'static, KeyPair> {
    let key = std::fs::read_to_string(pki.dir.path().join("ca/ca.key")).expect("ca key");
    Issuer::from_ca_cert_pem(pki.ca.cert_pem(), KeyPair::from_pem(&key).expect("key"))
        .expect("issuer")
}

/// A leaf certificate with `uris` as its URI SANs, signed by `issuer`: `(cert PEM, key PEM)`.
fn leaf(issuer: &Issuer<'_, KeyPair>, uris: &[&str]) -> (String, String) {
    leaf_with(issuer, uris, Vec::new())
}

/// [`leaf`] with extra extensions.
fn leaf_with(
    issuer: &Issuer<'_, KeyPair>,
    uris: &[&str],
    extensions: Vec<rcgen::CustomExtension>,
) -> (String, String) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "odd");
    params.subject_alt_names = uris
        .iter()
        .map(|u| SanType::URI((*u).try_into().expect("uri")))
        .collect();
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.custom_extensions = extensions;
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

/// A raw connection to `to` as a node of `pki` named `name` (no hello sent yet).
async fn connect_as(pki: &Pki, name: &str, to: SocketAddr) -> (quinn::Connection, quinn::Endpoint) {
    let (cert, key) = pki.same_cert_and_key(name);
    let (endpoint, config) = raw_client(&[&cert], &key);
    let conn = endpoint
        .connect_with(config, to, "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    (conn, endpoint)
}

/// Presents `chain` to `to` and reports whether the node let the connection live long enough to
/// answer a call.
async fn answered(chain: &[&str], key: &str, to: SocketAddr, name: &str) -> bool {
    let (endpoint, config) = raw_client(chain, key);
    let connecting = endpoint
        .connect_with(config, to, "starling.mesh")
        .expect("connect");
    let Ok(Ok(conn)) = tokio::time::timeout(UP, connecting).await else {
        return false;
    };
    let frame = hello_frame(name, mesh_proto::PROTOCOL_VERSION, &[]);
    if let Ok(mut uni) = conn.open_uni().await {
        let _ = uni.write_all(&frame).await;
        let _ = uni.finish();
    }
    let Ok(Ok((mut send, recv))) = tokio::time::timeout(UP, conn.open_bi()).await else {
        return false;
    };
    let _ = write_message(
        &mut send,
        &RequestHead::new("echo", "say", 2000),
        Bytes::new(),
    )
    .await;
    let mut reader = FrameReader::new(recv);
    matches!(
        tokio::time::timeout(UP, reader.frame(MAX_HEAD_BYTES)).await,
        Ok(Ok(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_identity_shapes_the_mesh_issues_are_accepted() {
    let pki = Pki::new();
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let b = NodeProc::start("node-b", &pki.config("node-b", echo));
    let issuer = mesh_issuer(&pki);
    let td = starling_tests::TD;

    // The baseline: a certificate of the right shape from the same CA is served.
    let (cert, key) = leaf(&issuer, &[&format!("spiffe://{td}/node/fine")]);
    assert!(
        answered(&[&cert], &key, b.quic, "fine").await,
        "the baseline failed"
    );

    // A leaf identity (an MCU's) presented as a certificate: a leaf is vouched for by its host.
    let (cert, key) = leaf(&issuer, &[&format!("spiffe://{td}/node/gw/leaf/x")]);
    assert!(
        !answered(&[&cert], &key, b.quic, "gw").await,
        "a leaf certificate was served"
    );
    let status = b.wait_status("refusing", UP, |s| s["refused_handshakes"] == 1);
    assert!(
        status["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("leaf identity")),
        "{status}"
    );

    // Two URIs: one certificate read as two identities.
    let (cert, key) = leaf(
        &issuer,
        &[
            &format!("spiffe://{td}/node/two"),
            &format!("spiffe://{td}/node/gw"),
        ],
    );
    assert!(
        !answered(&[&cert], &key, b.quic, "two").await,
        "two URIs were served"
    );
    let status = b.wait_status("refusing", UP, |s| s["refused_handshakes"] == 2);
    assert!(
        status["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("2 URI SANs")),
        "{status}"
    );

    // Two CAs between the mesh CA (whose path length is 1: one site issuer) and a node.
    let ca_params = |cn: &str| {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{td}").try_into().expect("uri"),
        )];
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params
    };
    let inter_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = ca_params("rogue intermediate");
    let inter = params.signed_by(&inter_key, &issuer).expect("sign");
    let inter_issuer = Issuer::new(params, inter_key);
    let deeper_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = ca_params("deeper intermediate");
    let deeper = params.signed_by(&deeper_key, &inter_issuer).expect("sign");
    let deeper_issuer = Issuer::new(params, deeper_key);
    let (cert, key) = leaf(&deeper_issuer, &[&format!("spiffe://{td}/node/deep")]);
    let (deeper, inter) = (deeper.pem(), inter.pem());
    assert!(
        !answered(&[&cert, &deeper, &inter], &key, b.quic, "deep").await,
        "a certificate two CAs below the mesh CA was served"
    );
    b.wait_status("refusing", UP, |s| s["refused_handshakes"] == 3);
    // The same, with an unrelated certificate appended to hide where the chain ends.
    let junk_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut junk = CertificateParams::default();
    junk.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    junk.distinguished_name.push(DnType::CommonName, "junk");
    let junk = junk.self_signed(&junk_key).expect("junk");
    assert!(
        !answered(&[&cert, &deeper, &inter, &junk.pem()], &key, b.quic, "deep").await,
        "an appended certificate hid the path length"
    );
    b.wait_status("refusing", UP, |s| s["refused_handshakes"] == 4);
    // Its own certificate (a day long) is in its status.
    let left = b.status()["certificate_expires_in_s"]
        .as_i64()
        .expect("expiry");
    assert!((86_000..=86_400).contains(&left), "{left}");

    // A certified-labels extension that does not parse is refused, not read as "no labels" (a
    // deny rule on a label must not be escaped by garbling it).
    let garbled = rcgen::CustomExtension::from_oid_content(
        mesh_core::labels::LABELS_OID,
        vec![0x30, 0x05, 0x0c, 0x03, b'z', b'=', b' '],
    );
    let (cert, key) = leaf_with(
        &issuer,
        &[&format!("spiffe://{td}/node/garbled")],
        vec![garbled],
    );
    assert!(
        !answered(&[&cert], &key, b.quic, "garbled").await,
        "a certificate with malformed labels was served"
    );
    let status = b.wait_status("refusing", UP, |s| s["refused_handshakes"] == 5);
    assert!(
        status["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("certificate labels")),
        "{status}"
    );
    assert_eq!(b.status()["connections_admitted"], 1, "only the baseline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_before_the_hello_is_never_served() {
    let upstream = HttpUpstream::start(Duration::ZERO).await;
    let pki = Pki::new();
    let svc = format!(
        "[[services]]\nname = \"api\"\nupstream = \"http://{}\"\n[limits]\nconnect_timeout_ms = 1000\n",
        upstream.addr
    );
    let b = NodeProc::start("node-b", &pki.config("node-b", &svc));
    let (conn, _endpoint) = connect_as(&pki, "silent", b.quic).await;
    // No hello: straight to a call.
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    write_message(
        &mut send,
        &RequestHead::new("api", "steal", 5000),
        Bytes::new(),
    )
    .await
    .expect("write");
    let mut reader = FrameReader::new(recv);
    let answer = tokio::time::timeout(UP, reader.frame(MAX_HEAD_BYTES))
        .await
        .expect("bounded");
    assert!(answer.is_err(), "a call without a hello was answered");
    let closed = tokio::time::timeout(UP, conn.closed())
        .await
        .expect("closed");
    assert!(closed.to_string().contains("no hello in time"), "{closed}");
    assert!(upstream.seen().is_empty(), "the upstream was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_caller_header_never_reaches_an_upstream() {
    let upstream = HttpUpstream::start(Duration::ZERO).await;
    let pki = Pki::new();
    let svc = format!(
        "[[services]]\nname = \"api\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let b = NodeProc::start("node-b", &pki.config("node-b", &svc));
    let (conn, _endpoint) = connect_as(&pki, "forger", b.quic).await;
    send_hello(
        &conn,
        &hello_frame("forger", mesh_proto::PROTOCOL_VERSION, &[]),
    )
    .await;
    b.wait_peer("forger", UP);

    let gw = format!("spiffe://{}/node/gw", starling_tests::TD);
    let mut head = RequestHead::new("api", "read", 5000);
    for entry in [
        ("x-starling-caller", gw.as_str()),
        ("X-Starling-Caller", gw.as_str()),
        ("x-starling-service", "vault"),
        ("host", "evil.example"),
        ("transfer-encoding", "chunked"),
        ("content-length", "0"),
        ("connection", "close"),
        // Spelled as CGI-style servers read them: `_` for `-`.
        ("x_starling_caller", gw.as_str()),
        ("X_Starling-Service", "vault"),
        ("transfer_encoding", "chunked"),
        ("content_length", "0"),
        ("x-request-id", "42"),
    ] {
        head.metadata.push(entry).expect("room");
    }
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    write_message(&mut send, &head, Bytes::from_static(b"body"))
        .await
        .expect("write");
    let mut reader = FrameReader::new(recv);
    let head_bytes = reader.frame(MAX_HEAD_BYTES).await.expect("answer");
    let answer: ResponseHead = decode_head(&head_bytes).expect("head");
    assert_eq!(answer.status, Status::Ok, "{}", answer.message);

    let seen = upstream.seen();
    let headers = &seen[0].headers;
    // Names as a CGI-style upstream reads them: any case, `_` for `-`.
    let values = |name: &str| -> Vec<&str> {
        headers
            .iter()
            .filter(|(k, _)| k.replace('_', "-").eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let me = format!("spiffe://{}/node/forger", starling_tests::TD);
    assert_eq!(values("x-starling-caller"), [me.as_str()], "{headers:?}");
    assert_eq!(values("x-starling-service"), ["api"], "{headers:?}");
    assert_eq!(
        values("host"),
        [upstream.addr.to_string().as_str()],
        "{headers:?}"
    );
    assert!(values("transfer-encoding").is_empty(), "{headers:?}");
    assert_eq!(values("content-length"), ["4"], "{headers:?}");
    assert_eq!(
        values("x-request-id"),
        ["42"],
        "ordinary metadata still passes"
    );
    assert_eq!(seen[0].body_len, 4);
}

/// `MAX_CONNECTIONS_PER_PEER` connections with `node` as `name`, hellos sent, once the node
/// holds them all.
async fn hoard(
    pki: &Pki,
    name: &str,
    node: &NodeProc,
) -> Vec<(quinn::Connection, quinn::Endpoint)> {
    let max = mesh_node::MAX_CONNECTIONS_PER_PEER;
    let mut held = Vec::new();
    for _ in 0..max {
        let (conn, endpoint) = connect_as(pki, name, node.quic).await;
        send_hello(&conn, &hello_frame(name, mesh_proto::PROTOCOL_VERSION, &[])).await;
        held.push((conn, endpoint));
    }
    node.wait_status("holding the hoarded connections", UP, |s| {
        s["connections_admitted"].as_u64() >= Some(max as u64)
    });
    held
}

/// One identity holds at most `MAX_CONNECTIONS_PER_PEER` connections with a node: the next is
/// closed, saying why, and those it holds still serve. Before, a peer could open them without end
/// (tens of KB of the node's memory each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holds_a_bounded_number_of_connections() {
    let pki = Pki::new();
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let b = NodeProc::start("node-b", &pki.config("node-b", echo));
    let held = hoard(&pki, "hoarder", &b).await;
    let (conn, _endpoint) = connect_as(&pki, "hoarder", b.quic).await;
    send_hello(
        &conn,
        &hello_frame("hoarder", mesh_proto::PROTOCOL_VERSION, &[]),
    )
    .await;
    let closed = tokio::time::timeout(UP, conn.closed())
        .await
        .expect("closed");
    assert!(
        closed.to_string().contains("too many connections"),
        "{closed}"
    );
    for (conn, _) in &held {
        let answered = tokio::time::timeout(UP, async {
            let (mut send, recv) = conn.open_bi().await.expect("stream");
            write_message(
                &mut send,
                &RequestHead::new("echo", "say", 5000),
                Bytes::from_static(b"hi"),
            )
            .await
            .expect("write");
            let mut reader = FrameReader::new(recv);
            reader.frame(MAX_HEAD_BYTES).await.expect("answer")
        })
        .await
        .expect("answered in time");
        let answer: ResponseHead = decode_head(&answered).expect("head");
        assert_eq!(answer.status, Status::Ok, "{}", answer.message);
    }
}

/// A node whose connections a peer refuses as one too many dials it again with a growing
/// back-off, not every 100 ms: someone holding eight connections with node-a under node-b's
/// identity makes node-b, which dials node-a, retry a few times in three seconds, not thirty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dial_refused_as_one_too_many_backs_off() {
    let pki = Pki::new();
    let a = NodeProc::start("node-a", &pki.config("node-a", ""));
    let b_conf = pki.config("node-b", &format!("[[peers]]\naddr = \"{}\"\n", a.quic));
    let held = hoard(&pki, "node-b", &a).await;
    let _b = NodeProc::start("node-b", &b_conf);
    let first = a.wait_status("refusing node-b's dial", UP, |s| {
        s["refused_handshakes"].as_u64() >= Some(1)
    });
    let first = first["refused_handshakes"].as_u64().unwrap_or_default();
    // The window the back-off is measured over (50-100 ms between dials without it).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let status = a.wait_status("status", UP, |_| true);
    let refused = status["refused_handshakes"].as_u64().unwrap_or_default() - first;
    assert!(
        refused <= 8,
        "node-b dialled {refused} more times in 3 s: {}",
        status["last_refusal"]
    );
    assert!(
        status["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("holds 8 connections")),
        "{}",
        status["last_refusal"]
    );
    drop(held);
}

/// Calls `api.read` on `conn` with `:on-behalf-of = claimed`; the answer's status and message.
async fn call_on_behalf_of(conn: &quinn::Connection, claimed: &str) -> (Status, String) {
    let mut head = RequestHead::new("api", "read", 5000);
    head.metadata
        .push((":on-behalf-of", claimed))
        .expect("room");
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    write_message(&mut send, &head, Bytes::from_static(b"body"))
        .await
        .expect("write");
    let mut reader = FrameReader::new(recv);
    let head_bytes = reader.frame(MAX_HEAD_BYTES).await.expect("answer");
    let answer: ResponseHead = decode_head(&head_bytes).expect("head");
    (answer.status, answer.message.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_certified_gateway_may_call_on_behalf_of_its_cloud() {
    let upstream = HttpUpstream::start(Duration::ZERO).await;
    let pki = Pki::new();
    let svc = format!(
        "[[services]]\nname = \"api\"\nupstream = \"http://{}\"\n",
        upstream.addr
    );
    let b = NodeProc::start("node-b", &pki.config("node-b", &svc));
    let cloud = format!("spiffe://{}/cloud/site-7", starling_tests::TD);

    // A node claims to speak for the cloud: refused, and the upstream never hears of it.
    let (conn, _endpoint) = connect_as(&pki, "forger", b.quic).await;
    send_hello(
        &conn,
        &hello_frame("forger", mesh_proto::PROTOCOL_VERSION, &[]),
    )
    .await;
    b.wait_peer("forger", UP);
    let (status, message) = call_on_behalf_of(&conn, &cloud).await;
    assert_eq!(status, Status::PermissionDenied, "{message}");
    assert!(message.contains("not a gateway"), "{message}");
    assert!(upstream.seen().is_empty());

    // The gateway may, for its own trust domain's cloud only; the upstream sees the cloud.
    let certs = pki.gateway_dir("gw").join("certs");
    let read = |f: &str| std::fs::read_to_string(certs.join(f)).expect("cert");
    let (endpoint, config) = raw_client(&[&read("node.crt")], &read("node.key"));
    let conn = endpoint
        .connect_with(config, b.quic, "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    send_hello(&conn, &hello_frame("gw", mesh_proto::PROTOCOL_VERSION, &[])).await;
    let (status, message) = call_on_behalf_of(&conn, "spiffe://other.domain/cloud/site-7").await;
    assert_eq!(status, Status::PermissionDenied, "{message}");
    let (status, message) = call_on_behalf_of(
        &conn,
        &format!("spiffe://{}/node/node-a", starling_tests::TD),
    )
    .await;
    assert_eq!(
        status,
        Status::InvalidArgument,
        "a node is not the cloud: {message}"
    );
    let (status, message) = call_on_behalf_of(&conn, &cloud).await;
    assert_eq!(status, Status::Ok, "{message}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let caller: Vec<&str> = seen[0]
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-starling-caller"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(caller, [cloud.as_str()]);
}

/// `n` connections to `addr` that each send half a request line and then nothing.
fn slowloris(addr: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.write_all(b"POST /v1/call/echo/say HTTP/1.1\r\nHost: x\r\n")
                .expect("write");
            s
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_senders_are_cut_off_and_connections_past_the_cap_are_refused() {
    let pki = Pki::new();
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n\
                [limits]\ningress_max_connections = 64\ningress_header_timeout_ms = 1000\n";
    let a = NodeProc::start("node-a", &pki.config("node-a", echo));
    let ingress = a.ingress();
    let started = Instant::now();
    let mut held = slowloris(ingress, 64);
    // Past the cap: answered 503 at once, and closed.
    let mut extra = std::net::TcpStream::connect(ingress).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut answer = String::new();
    extra.read_to_string(&mut answer).expect("read");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    // The slow ones are closed once the header timeout passes: each read ends.
    for s in &mut held {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "slow senders held for {took:?}"
    );
    // And the ingress serves again.
    let (code, _, _) = post(ingress, "echo", "say", Bytes::from_static(b"hi"), None)
        .await
        .expect("call");
    assert_eq!(code, 200);
}

/// A hundred apps each sending a body just under the bound at once: the ingress takes what its
/// byte budget holds, answers the rest 503 at once, and the node stays within its stated bound
/// (`limits.ingress_max_buffered_bytes`, 32 MiB by default, plus the replies it holds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_near_limit_bodies_keep_the_node_within_its_memory_bound() {
    let pki = Pki::new();
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let a = NodeProc::start("node-a", &pki.config("node-a", echo));
    let ingress = a.ingress();
    let before = starling_tests::rss_kib(a.pid()).expect("rss").0;
    let body = Bytes::from(vec![0x5a; 4 * 1024 * 1024 - 1024]);
    let watch = starling_tests::RssWatch::start(a.pid());
    let calls: Vec<_> = (0..100)
        .map(|_| {
            let body = body.clone();
            tokio::spawn(async move {
                post(ingress, "echo", "say", body, None)
                    .await
                    .map(|(code, _, _)| code)
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for c in calls {
        match c.await.expect("task") {
            Ok(200) => ok += 1,
            Ok(503) => busy += 1,
            other => panic!("unexpected answer: {other:?}"),
        }
    }
    let peak = watch.peak_kib().max(before);
    let after = starling_tests::rss_kib(a.pid()).expect("rss").0;
    eprintln!(
        "100 bodies of 4 MiB: {ok} served, {busy} told busy; RSS {before} KiB before, peak {peak}, after {after}"
    );
    assert_eq!(ok + busy, 100);
    assert!(ok >= 4, "the budget admitted almost nothing: {ok}");
    assert!(busy > 0, "nothing was refused: the budget did not bind");
    // The stated bound (configs/node.example.toml): the idle RSS plus three times
    // limits.ingress_max_buffered_bytes (bodies in flight, the replies they wait for, and what
    // the allocator keeps of both). Before the budget, this took a node to 427 MB.
    let bound = before + 3 * 32 * 1024;
    assert!(
        peak <= bound,
        "peak RSS {peak} KiB over the bound {bound} KiB"
    );
    let (code, _, _) = post(ingress, "echo", "say", Bytes::from_static(b"hi"), None)
        .await
        .expect("call");
    assert_eq!(code, 200, "the ingress did not recover");
}

/// The gateway role is what the CA certified: a member with a node's certificate that says
/// "gateway" in its hello is never sent a control stream (the node would take policy from it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_claiming_the_gateway_role_gets_no_control_stream() {
    let pki = Pki::new();
    // No gateway pinned: before, any member claiming the role would do.
    let a = NodeProc::start("node-a", &pki.config("node-a", ""));
    let (conn, _endpoint) = connect_as(&pki, "pretender", a.quic).await;
    send_hello(
        &conn,
        &starling_tests::hello_frame_as(
            "pretender",
            mesh_proto::PROTOCOL_VERSION,
            mesh_proto::Role::Gateway,
            &[],
        ),
    )
    .await;
    let status = a.wait_peer("pretender", UP);
    assert_eq!(status["peers"][0]["role"], "node", "{status}");
    // The node's control loop acts at once on a new gateway peer; give it two seconds.
    let opened = tokio::time::timeout(Duration::from_secs(2), conn.accept_bi()).await;
    assert!(
        opened.is_err(),
        "the node opened a control stream to a pretender"
    );
    assert!(a.status()["gateway"].is_null());
}

/// A gateway's certificate cannot run a plain node, nor a node's certificate a gateway.
#[test]
fn each_program_runs_only_with_a_certificate_of_its_role() {
    let pki = Pki::new();
    // A node's config whose certificate is a gateway's.
    let template = std::fs::read_to_string(pki.config("template", "")).expect("conf");
    let gw_dir = pki.gateway_dir("gw");
    let conf = gw_dir.join("node.toml");
    std::fs::write(&conf, template.replace("\"template\"", "\"gw\"")).expect("conf");
    let out = std::process::Command::new(starling_tests::bin("mesh-node"))
        .args(["run", "--config"])
        .arg(&conf)
        .output()
        .expect("mesh-node");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is a gateway's certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node_conf = pki.config("plain", "");
    let src = std::fs::read_to_string(&node_conf).expect("conf");
    std::fs::write(
        &node_conf,
        src.replace("log = \"info\"", "log = \"info\"\nadmin = \"127.0.0.1:0\""),
    )
    .expect("conf");
    let out = std::process::Command::new(starling_tests::bin("mesh-gateway"))
        .args(["run", "--config"])
        .arg(&node_conf)
        .output()
        .expect("mesh-gateway");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a gateway needs a gateway certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One member cannot make the registry too large for every other node's frames: a hello that
/// lists more than the gateway takes (here 300 services) ends that control stream with an audit
/// event, the member is not listed, and the other nodes keep their control streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_too_large_for_the_registry_is_refused() {
    use mesh_proto::control::{CONTROL_SERVICE, NodeHello, Up};
    let pki = Pki::new();
    let (gw, admin) = starling_tests::quick_gateway(&pki, "");
    let a = starling_tests::gateway_node(&pki, &gw, "node-a", "");
    a.wait_gateway(UP);

    let (conn, _endpoint) = connect_as(&pki, "bloat", gw.quic).await;
    send_hello(
        &conn,
        &hello_frame("bloat", mesh_proto::PROTOCOL_VERSION, &[]),
    )
    .await;
    let (mut send, mut recv) = conn.open_bi().await.expect("control stream");
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(&RequestHead::new(CONTROL_SERVICE, "session", 0), &mut out);
    mesh_proto::encode_frame_vec(
        &Up::Hello(NodeHello {
            protocol_version: mesh_proto::PROTOCOL_VERSION,
            software_version: "0.1.0".into(),
            labels: vec![],
            services: (0..300).map(|i| format!("{i:0>100}")).collect(),
            addrs: vec![],
            policy_version: 0,
            next_seq: 1,
            boot_id: 7,
            lost_at_restart: 0,
            policy: None,
            policy_damaged: false,
        }),
        &mut out,
    );
    send.write_all(&out).await.expect("hello");
    // The gateway ends the stream (a finish or a reset, either ends the read).
    let ended = tokio::time::timeout(UP, recv.read_to_end(4 << 20)).await;
    assert!(
        ended.is_ok(),
        "the gateway kept the oversized hello's stream open"
    );

    let audit = pki.dir.path().join("gw/audit.jsonl");
    let refused = starling_tests::eventually(UP, async || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.lines()
            .find(|l| l.contains("hello_refused") && l.contains("bloat"))
            .map(str::to_owned)
    })
    .await;
    let refused = refused.expect("an audit event for the refused hello");
    assert!(refused.contains("300 services"), "{refused}");
    let (_, nodes) = starling_tests::http("GET", admin, "/v1/nodes", None, "").await;
    assert!(!nodes.contains("bloat"), "{nodes}");
    assert!(nodes.contains("node-a"), "{nodes}");
    assert!(!a.status()["gateway"].is_null(), "{}", a.status());
}
