//! Memory under abuse (issue 18): a real `mesh-node` process, a peer or a local app doing what
//! costs it memory, and its RSS (sampled every 20 ms) held to the bound its config documents
//! (configs/node.example.toml). The ingress's own cases (slow senders, a hundred near-limit
//! bodies) are in hostile.rs; the figures of every case are in docs/RELIABILITY.md.

use std::time::Duration;

use bytes::Bytes;
use mesh_node::wire::{FrameReader, encode_head, write_message};
use mesh_proto::limits::MAX_HEAD_BYTES;
use mesh_proto::{RequestHead, ResponseHead, Status, decode_head, encode_body_prefix};
use starling_tests::{NodeProc, Pki, RssWatch, hello_frame, post, raw_client, rss_kib, send_hello};

const MIB: u64 = 1024;
/// `limits.max_buffered_bytes` by default, in KiB.
const BUFFERED: u64 = 32 * MIB;
/// QUIC's connection receive window (mesh_node::transport::CONNECTION_RECEIVE_WINDOW), in KiB:
/// what a peer may send that the node has not read yet.
const WINDOW: u64 = 8 * MIB;
/// quinn's send window (its default, 10 MB), in KiB: what the node may have sent a peer and not
/// yet had acknowledged.
const SEND: u64 = 10 * MIB;

/// The bound configs/node.example.toml states: the idle RSS plus three times what the node
/// holds (`held` KiB of bodies, and QUIC's windows for each of `peers`): the buffers, and what
/// the allocator keeps of them.
fn bound(before: u64, held: u64, peers: u64) -> u64 {
    before + 3 * (held + peers * (WINDOW + SEND))
}

const ECHO: &str = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";

/// A raw connection to `node` as mesh member `name`, hello sent.
async fn member(pki: &Pki, node: &NodeProc, name: &str) -> (quinn::Connection, quinn::Endpoint) {
    let (cert, key) = pki.same_cert_and_key(name);
    let (endpoint, config) = raw_client(&[&cert], &key);
    let conn = endpoint
        .connect_with(config, node.quic, "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    send_hello(&conn, &hello_frame(name, mesh_proto::PROTOCOL_VERSION, &[])).await;
    (conn, endpoint)
}

/// A peer that opens `streams` calls and sends each a body of `body` bytes but its last KiB,
/// then holds them open.
async fn half_sent_bodies(
    pki: &Pki,
    node: &NodeProc,
    name: &str,
    streams: usize,
    body: usize,
) -> (quinn::Connection, quinn::Endpoint) {
    let (conn, endpoint) = member(pki, node, name).await;
    let chunk = Bytes::from(vec![0x5a; 64 * 1024]);
    let mut senders = tokio::task::JoinSet::new();
    for _ in 0..streams {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        let chunk = chunk.clone();
        senders.spawn(async move {
            let mut head = encode_head(&RequestHead::new("echo", "say", 60_000));
            encode_body_prefix(body, &mut head);
            send.write_all(&head).await?;
            let mut left = body - 1024;
            while left > 0 {
                let n = left.min(chunk.len());
                send.write_chunk(chunk.slice(..n)).await?;
                left -= n;
            }
            // Held open, neither finished nor reset, for as long as the test runs.
            Ok::<_, quinn::WriteError>((send, recv))
        });
    }
    let mut held = Vec::new();
    // What the node lets through within 10 s: flow control may hold the rest back.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(done) = senders.join_next().await {
            if let Ok(Ok(s)) = done {
                held.push(s);
            }
        }
    })
    .await;
    std::mem::forget(held);
    std::mem::forget(senders);
    (conn, endpoint)
}

/// One row of the table: the case, the RSS before and at its peak, the bound; asserted.
fn row(case: &str, before: u64, peak: u64, bound: u64) {
    eprintln!(
        "abuse | {case} | idle {} MiB | peak {} MiB (+{} MiB) | bound {} MiB",
        before / MIB,
        peak / MIB,
        peak.saturating_sub(before) / MIB,
        bound / MIB
    );
    assert!(
        peak <= bound,
        "{case}: peak RSS {peak} KiB over the bound {bound} KiB"
    );
}

/// A node hosting echo (`extra` appended to its config), and its RSS once it has served a first
/// call (code and buffers paged in).
async fn echo_node_with(pki: &Pki, extra: &str) -> (NodeProc, u64) {
    let node = NodeProc::start("node-a", &pki.config("node-a", &format!("{ECHO}{extra}")));
    let (code, _, _) = post(
        node.ingress(),
        "echo",
        "say",
        Bytes::from_static(b"hi"),
        Some(5000),
    )
    .await
    .expect("call");
    assert_eq!(code, 200);
    let before = rss_kib(node.pid()).expect("rss").0;
    (node, before)
}

async fn echo_node(pki: &Pki) -> (NodeProc, u64) {
    echo_node_with(pki, "").await
}

/// The node still answers a call of another peer (through its ingress).
async fn still_serves(node: &NodeProc) {
    let (code, _, _) = post(
        node.ingress(),
        "echo",
        "say",
        Bytes::from_static(b"hi"),
        Some(5000),
    )
    .await
    .expect("call");
    assert_eq!(code, 200, "the node stopped serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_256_half_sent_bodies_stays_within_the_memory_bound() {
    let pki = Pki::new();
    // Calls wait a minute for their bodies: the abuser's keep what they took all along.
    let (node, before) = echo_node_with(&pki, "[limits]\ncall_timeout_ms = 60000\n").await;
    let peak = RssWatch::start(node.pid());
    let (conn, _endpoint) =
        half_sent_bodies(&pki, &node, "abuser", 256, 4 * 1024 * 1024 - 4096).await;
    still_serves(&node).await;
    // One more body from it is refused at once, and says why.
    let (mut send, recv) = conn.open_bi().await.expect("stream");
    let mut head = encode_head(&RequestHead::new("echo", "say", 60_000));
    encode_body_prefix(1024 * 1024, &mut head);
    send.write_all(&head).await.expect("head");
    let mut reader = FrameReader::new(recv);
    let answer = tokio::time::timeout(Duration::from_secs(5), reader.frame(MAX_HEAD_BYTES))
        .await
        .expect("answered at once")
        .expect("a head");
    let answer: ResponseHead = decode_head(&answer).expect("response head");
    assert_eq!(answer.status, Status::Unavailable);
    assert!(
        answer.message.contains("busy") && answer.message.contains("limits.max_buffered_bytes"),
        "{}",
        answer.message
    );
    // Its bodies wait for memory beyond its connection's share (a quarter of the budget), and
    // what it sent past that waits in QUIC's window. Before the budget: 1 GiB.
    row(
        "one peer, 256 half-sent bodies of 4 MiB",
        before,
        peak.peak_kib(),
        bound(before, BUFFERED / 4, 1),
    );
}

/// One peer's share of the body budget (a quarter) is over all its connections: four
/// connections of the same identity holding half-sent bodies leave room for another peer's call.
/// Before, each connection had a quarter of its own, and four took the whole budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_over_several_connections_holds_one_share_of_the_body_budget() {
    let pki = Pki::new();
    let (node, _) = echo_node_with(&pki, "[limits]\ncall_timeout_ms = 60000\n").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(half_sent_bodies(&pki, &node, "abuser", 16, 1024 * 1024).await);
    }
    // Another peer's call with a body is served.
    let (conn, _endpoint) = member(&pki, &node, "honest").await;
    let (mut send, recv) = tokio::time::timeout(Duration::from_secs(5), async {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        write_message(
            &mut send,
            &RequestHead::new("echo", "say", 5_000),
            Bytes::from(vec![7u8; 64 * 1024]),
        )
        .await
        .expect("call");
        (send, recv)
    })
    .await
    .expect("sent in time");
    let _ = send.finish();
    let mut reader = FrameReader::new(recv);
    let answer = tokio::time::timeout(Duration::from_secs(5), reader.frame(MAX_HEAD_BYTES))
        .await
        .expect("answered")
        .expect("a head");
    let answer: ResponseHead = decode_head(&answer).expect("response head");
    assert_eq!(answer.status, Status::Ok, "{}", answer.message);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_peers_holding_half_sent_bodies_stay_within_the_memory_bound() {
    let pki = Pki::new();
    let (node, before) = echo_node(&pki).await;
    let peak = RssWatch::start(node.pid());
    let mut held = Vec::new();
    for i in 0..6 {
        held.push(half_sent_bodies(&pki, &node, &format!("abuser-{i}"), 64, 1024 * 1024).await);
    }
    // The budget binds over every connection; each peer's unread bytes are its window.
    row(
        "six peers, 64 half-sent bodies of 1 MiB each",
        before,
        peak.peak_kib(),
        bound(before, BUFFERED, 6),
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_its_replies_stays_within_the_memory_bound() {
    let pki = Pki::new();
    // Replies not read within 2 s are given up on.
    let (node, before) = echo_node_with(&pki, "[limits]\ncall_timeout_ms = 2000\n").await;
    let peak = RssWatch::start(node.pid());
    let (conn, _endpoint) = member(&pki, &node, "slow-reader").await;
    // Larger than the client's stream window (1.25 MB): a reply the client does not read stays
    // on the node's side until the node gives up on it.
    let body = Bytes::from(vec![0x33; 2 * 1024 * 1024]);
    let mut streams = Vec::new();
    for _ in 0..256 {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        let body = body.clone();
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            write_message(&mut send, &RequestHead::new("echo", "say", 60_000), body),
        )
        .await;
        // Replies never read: the node holds them, and past its budget stops reading bodies.
        streams.push((send, recv, sent.is_ok()));
    }
    let sent = streams.iter().filter(|s| s.2).count();
    // Its sending halves go (a body refused as busy is reset, as a caller does); what it keeps
    // is the replies, unread.
    let streams: Vec<quinn::RecvStream> = streams.into_iter().map(|(_, recv, _)| recv).collect();
    still_serves(&node).await;
    row(
        &format!("one peer, 256 echo calls of 2 MiB, replies never read ({sent} bodies sent)"),
        before,
        peak.peak_kib(),
        bound(before, BUFFERED / 4, 1),
    );
    // The unread replies are given up on (their streams reset), and what they held is free
    // again: a call on the same connection, read this time, goes through.
    let answered = starling_tests::eventually(Duration::from_secs(15), async || {
        let attempt = async {
            let (mut send, recv) = conn.open_bi().await.ok()?;
            let mut reader = FrameReader::new(recv);
            // An answer may come before the whole body went (busy): read it either way.
            let head = RequestHead::new("echo", "say", 5_000);
            let _ = write_message(&mut send, &head, body.clone()).await;
            let head = reader.frame(MAX_HEAD_BYTES).await.ok()?;
            let head: ResponseHead = decode_head(&head).ok()?;
            eprintln!(
                "after the unread replies: {:?} {}",
                head.status, head.message
            );
            (head.status == Status::Ok).then_some(())
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .ok()
            .flatten()
    })
    .await;
    assert!(
        answered.is_some(),
        "the unread replies kept the connection's share"
    );
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_method_names_stay_within_the_memory_bound() {
    let pki = Pki::new();
    let b = NodeProc::start("node-b", &pki.config("node-b", ECHO));
    let a = NodeProc::start(
        "node-a",
        &pki.config("node-a", &format!("[[peers]]\naddr = \"{}\"\n", b.quic)),
    );
    a.wait_peer("node-b", Duration::from_secs(10));
    let (code, _, _) = post(a.ingress(), "echo", "warm", Bytes::new(), Some(5000))
        .await
        .expect("call");
    assert_eq!(code, 200);
    let (before_a, before_b) = (
        rss_kib(a.pid()).expect("rss").0,
        rss_kib(b.pid()).expect("rss").0,
    );
    let (peak_a, peak_b) = (RssWatch::start(a.pid()), RssWatch::start(b.pid()));
    let ingress = a.ingress();
    let mut calls = tokio::task::JoinSet::new();
    for worker in 0..8 {
        calls.spawn(async move {
            for i in (worker..10_000).step_by(8) {
                let method = format!("m{i:05}-{}", "x".repeat(40));
                let (code, _, _) = post(ingress, "echo", &method, Bytes::new(), Some(5000))
                    .await
                    .expect("call");
                assert_eq!(code, 200);
            }
        });
    }
    while let Some(done) = calls.join_next().await {
        done.expect("calls");
    }
    // Telemetry keeps telemetry.max_series (service, method) pairs and folds the rest into
    // method "_other"; remembered authorization verdicts are capped at 4,096.
    row(
        "10,000 distinct method names, caller",
        before_a,
        peak_a.peak_kib(),
        bound(before_a, 0, 1),
    );
    row(
        "10,000 distinct method names, callee",
        before_b,
        peak_b.peak_kib(),
        bound(before_b, 0, 1),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_past_their_bound_cost_nothing() {
    let pki = Pki::new();
    let (node, before) = echo_node(&pki).await;
    let peak = RssWatch::start(node.pid());
    let (conn, _endpoint) = member(&pki, &node, "big-heads").await;
    let junk = Bytes::from(vec![0x41; 256 * 1024]);
    let mut refused = 0;
    for _ in 0..512 {
        let (mut send, recv) = conn.open_bi().await.expect("stream");
        // A head frame announcing 256 KiB: past MAX_HEAD_BYTES, refused from its prefix.
        let mut frame = Vec::new();
        encode_body_prefix(junk.len(), &mut frame);
        let _ = send.write_all(&frame).await;
        let _ =
            tokio::time::timeout(Duration::from_millis(200), send.write_chunk(junk.clone())).await;
        let mut reader = FrameReader::new(recv);
        if tokio::time::timeout(Duration::from_secs(5), reader.frame(MAX_HEAD_BYTES))
            .await
            .is_ok()
        {
            refused += 1;
        }
    }
    assert_eq!(refused, 512, "every oversized head is answered");
    still_serves(&node).await;
    row(
        "512 heads of 256 KiB (a head is at most 16 KiB)",
        before,
        peak.peak_kib(),
        bound(before, 0, 1),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_connections_stay_within_the_memory_bound() {
    let pki = Pki::new();
    let (node, before) = echo_node(&pki).await;
    let peak = RssWatch::start(node.pid());
    let mut held = Vec::new();
    for i in 0..200 {
        held.push(member(&pki, &node, &format!("peer-{i}")).await);
    }
    node.wait_peers(200, Duration::from_secs(30));
    still_serves(&node).await;
    let peak = peak.peak_kib();
    eprintln!(
        "200 connections: {} KiB each",
        peak.saturating_sub(before) / 200
    );
    // Two hundred identities: one alone holds at most mesh_node::MAX_CONNECTIONS_PER_PEER.
    row("200 idle connections", before, peak, before + 200 * 128);
    drop(held);
}
