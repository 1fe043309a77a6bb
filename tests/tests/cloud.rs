//! The cloud bridge against a real broker: mosquitto with TLS, client certificates and an ACL
//! (tests/src/mqtt.rs), real `mesh-gateway` and `mesh-node` processes on loopback, and a cloud
//! application (an MQTT 5 client) that records everything the site sends.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use starling_tests::mqtt::{
    Broker, CloudApp, PREFIX, Received, SITE, broker, missing_seqs, telemetry_counts,
};
use starling_tests::{
    NodeProc, Pki, call_ingress, eventually, http, key, metrics, prepend, request_counts, run_bin,
};

const UP: Duration = Duration::from_secs(10);
const FAST: &str = "[telemetry]\ninterval_ms = 100\n";
const ECHO: &str = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";

/// The cloud may call echo.say and nothing else; nodes may call anything.
const POLICY: &str = "[authorization]\ndefault = \"allow\"\n\
    [[authorization.rules]]\nname = \"cloud-says\"\neffect = \"allow\"\n\
    callers = [\"spiffe://starling.local/cloud/site-7\"]\nservices = [\"echo\"]\nmethods = [\"say\"]\n\
    [[authorization.rules]]\nname = \"cloud-nothing-else\"\neffect = \"deny\"\n\
    callers = [\"spiffe://starling.local/cloud/*\"]\n";

fn node_conf(pki: &Pki, name: &str, gw: SocketAddr, extra: &str) -> PathBuf {
    let path = pki.config(name, &format!("{extra}{FAST}"));
    prepend(&path, &format!("gateway = \"{gw}\"\n"));
    path
}

/// Gateway `name` bridged to `broker` as [`SITE`] (its client certificate issued by the
/// broker's CA), serving [`POLICY`]; `cloud_extra` goes into its `[cloud]` section.
fn cloud_gateway(pki: &Pki, broker: &Broker, name: &str, cloud_extra: &str) -> PathBuf {
    let (crt, key) = broker.pki.issue(SITE, false).expect("issue");
    let policy = pki.dir.path().join(format!("{name}-policy.toml"));
    std::fs::write(&policy, POLICY).expect("policy");
    let conf = pki.gateway_config(
        name,
        "127.0.0.1:0",
        &format!(
            "[cloud]\nbroker = \"{}\"\nclient_id = \"{SITE}\"\ntopic_prefix = \"{PREFIX}\"\n\
             ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n{cloud_extra}",
            broker.url(),
            broker.pki.ca().display(),
            crt.display(),
            key.display()
        ),
    );
    prepend(&conf, &format!("policy = \"{}\"\n", policy.display()));
    conf
}

/// The value of an unlabeled (or fully labeled) series in Prometheus text.
fn metric(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.parse().ok())
    })
}

async fn cloud_status(admin: SocketAddr) -> serde_json::Value {
    let (code, text) = http("GET", admin, "/v1/cloud", None, "").await;
    assert_eq!(code, 200, "{text}");
    serde_json::from_str(&text).expect("json")
}

/// Each topic's messages arrive in sequence order (first arrivals; resends may repeat one).
fn assert_in_order(seen: &[Received]) {
    let mut last: BTreeMap<&str, u64> = BTreeMap::new();
    let mut firsts = std::collections::BTreeSet::new();
    for m in seen {
        let Some(seq) = m.json()["seq"].as_u64() else {
            continue;
        };
        if !firsts.insert(seq) {
            continue;
        }
        let before = last.insert(&m.topic, seq).unwrap_or(0);
        assert!(
            seq > before,
            "{}: seq {seq} arrived after {before}",
            m.topic
        );
    }
}

fn call_properties(correlation: &str) -> PublishProperties {
    PublishProperties {
        response_topic: Some(format!("{PREFIX}/reply/app")),
        correlation_data: Some(Bytes::copy_from_slice(correlation.as_bytes())),
        ..PublishProperties::default()
    }
}

/// An answer with `status`, its message saying `words`.
fn assert_refused(answer: &Received, status: &str, words: &str) {
    assert_eq!(answer.user_property("status").as_deref(), Some(status));
    let message = answer.user_property("message");
    assert!(
        message.as_deref().is_some_and(|m| m.contains(words)),
        "{message:?}"
    );
}

fn reply<'a>(seen: &'a [Received], correlation: &str) -> Option<&'a Received> {
    seen.iter().find(|m| {
        m.topic == format!("{PREFIX}/reply/app")
            && m.properties
                .as_ref()
                .and_then(|p| p.correlation_data.as_deref())
                == Some(correlation.as_bytes())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_gets_exact_telemetry_over_tls_and_calls_in_as_the_policy_allows() {
    let pki = Pki::new();
    let broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    let (gw, admin) = NodeProc::start_gateway("gw", &cloud_gateway(&pki, &broker, "gw", ""));
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    b.wait_peer("node-a", UP);

    // The site says it is online, retained: a subscriber that comes later is told at once.
    app.wait_until("the site online", UP, |s| {
        s.iter()
            .any(|m| m.topic == format!("{PREFIX}/status") && m.json()["state"] == "online")
    })
    .await;
    let late = CloudApp::connect(&broker, "app-late").await;
    let status = late
        .wait_until("the retained status", UP, |s| {
            s.iter().any(|m| m.topic == format!("{PREFIX}/status"))
        })
        .await;
    let status = status
        .iter()
        .find(|m| m.topic == format!("{PREFIX}/status"))
        .expect("status");
    assert!(status.retain, "the status is retained");
    assert_eq!(status.json()["state"], "online");
    assert_eq!(status.json()["gateway"], "gw");

    for _ in 0..40 {
        let (code, body) = call_ingress(b.ingress(), "echo", "say", b"hi").await;
        assert_eq!((code, &body[..]), (200, &b"hi"[..]));
    }
    // Exact: what the cloud counted is what the gateway's /metrics counts.
    let counts = eventually(UP, || async {
        let m = request_counts(&metrics(admin).await);
        (m.get(&key("echo", "say", "ok")) == Some(&40)).then_some(m)
    })
    .await
    .expect("the gateway counted 40 calls");
    app.wait_until("telemetry equal to /metrics", UP, |s| {
        telemetry_counts(s) == counts
    })
    .await;
    // The registry and node events arrived too.
    let seen = app
        .wait_until("node-a up and the registry", UP, |s| {
            s.iter().any(|m| {
                m.topic == format!("{PREFIX}/nodes")
                    && m.json()["node"] == "node-a"
                    && m.json()["event"] == "up"
            }) && s.iter().any(|m| {
                m.topic == format!("{PREFIX}/registry")
                    && m.json()["nodes"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|n| n["services"][0] == "echo"))
            })
        })
        .await;
    for m in seen
        .iter()
        .filter(|m| m.topic != format!("{PREFIX}/status"))
    {
        let v = m.json();
        assert!(
            v["seq"].as_u64().is_some() && v["at_ms"].as_u64().is_some(),
            "{v}"
        );
    }

    // A call from the cloud that the policy allows is answered on the response topic.
    app.publish(
        "call/echo/say",
        b"from the cloud".to_vec(),
        call_properties("c1"),
    )
    .await;
    let seen = app
        .wait_until("the answer to c1", UP, |s| reply(s, "c1").is_some())
        .await;
    let answer = reply(&seen, "c1").expect("answer");
    assert_eq!(answer.user_property("status").as_deref(), Some("ok"));
    assert_eq!(&answer.payload[..], b"from the cloud");

    // One it does not allow is refused, and the callee's audit event reaches the cloud.
    app.publish("call/echo/secret", b"x".to_vec(), call_properties("c2"))
        .await;
    let seen = app
        .wait_until("the answer to c2 and its audit event", UP, |s| {
            reply(s, "c2").is_some()
                && s.iter().any(|m| {
                    let v = m.json();
                    m.topic == format!("{PREFIX}/audit")
                        && v["kind"] == "denied"
                        && v["caller"] == "spiffe://starling.local/cloud/site-7"
                        && v["method"] == "secret"
                })
        })
        .await;
    let answer = reply(&seen, "c2").expect("answer");
    assert_eq!(
        answer.user_property("status").as_deref(),
        Some("permission_denied"),
        "{:?}",
        answer.user_property("message")
    );

    // The site publishes under its prefix only (the broker's ACL says so too): an answer asked
    // for elsewhere is refused, and the session goes on.
    let mut outside = call_properties("c5");
    outside.response_topic = Some("elsewhere/reply".into());
    app.publish("call/echo/say", b"leak".to_vec(), outside)
        .await;
    app.publish("call/echo/say", b"in".to_vec(), call_properties("c6"))
        .await;
    app.wait_until("the answer to c6 and the refusal of c5", UP, |s| {
        reply(s, "c6").is_some()
            && s.iter().any(|m| {
                m.topic == format!("{PREFIX}/refused")
                    && m.json()["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("\"elsewhere/reply\""))
            })
    })
    .await;
    assert_eq!(cloud_status(admin).await["reconnects"], 0);

    // Malformed calls are refused with a reason; nothing else breaks.
    app.publish("call/echo", b"x".to_vec(), call_properties("c3"))
        .await;
    app.publish("call/echo/say", b"x".to_vec(), PublishProperties::default())
        .await;
    app.wait_until("both refusals", UP, |s| {
        let refused: Vec<String> = s
            .iter()
            .filter(|m| m.topic == format!("{PREFIX}/refused"))
            .map(|m| m.json()["reason"].as_str().unwrap_or("").to_owned())
            .collect();
        refused.iter().any(|r| r.contains("not a topic"))
            && refused
                .iter()
                .any(|r| r.contains("response topic or an id"))
    })
    .await;
    // An oversized one is refused with the reason, on its response topic too.
    app.publish(
        "call/echo/say",
        vec![b'x'; 1536 * 1024],
        call_properties("c4"),
    )
    .await;
    let seen = app
        .wait_until("the oversized call refused", UP, |s| {
            reply(s, "c4").is_some()
        })
        .await;
    assert_refused(
        reply(&seen, "c4").expect("answer"),
        "invalid_argument",
        "max_message_bytes",
    );
    let (code, _) = call_ingress(b.ingress(), "echo", "say", b"still").await;
    assert_eq!(code, 200);

    // Still exact after all that, and nothing is missing.
    let counts = eventually(UP, || async {
        let m = request_counts(&metrics(admin).await);
        (m.get(&key("echo", "say", "ok")) >= Some(&41)).then_some(m)
    })
    .await
    .expect("counted");
    let seen = app
        .wait_until("telemetry equal to /metrics", UP, |s| {
            telemetry_counts(s) == counts
        })
        .await;
    assert_eq!(missing_seqs(&seen).1, Vec::<u64>::new());
    let status = cloud_status(admin).await;
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["refused"], 4, "{status}");

    // A flood of junk is counted, but reported (queue, audit, log) only ten times a second:
    // it cannot push the site's telemetry out of the queue.
    for i in 0..200 {
        app.publish(
            &format!("call/junk{i}"),
            b"x".to_vec(),
            PublishProperties::default(),
        )
        .await;
    }
    let status = eventually(UP, || async {
        let s = cloud_status(admin).await;
        (s["refused"] == 204).then_some(s)
    })
    .await
    .expect("every refusal counted");
    let reported = app
        .seen()
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/refused"))
        .count();
    assert!(reported < 100, "{reported} of 200 reported: {status}");
    // A policy that names no cloud caller turns calls from the cloud off, though its default
    // allows every caller: the broker is not an authority.
    let policy = pki.dir.path().join("gw-policy.toml");
    std::fs::write(&policy, "[authorization]\ndefault = \"allow\"\n").expect("policy");
    eventually(UP, || async {
        let (_, text) = http("GET", admin, "/v1/policy", None, "").await;
        (!text.contains("cloud-says")).then_some(())
    })
    .await
    .expect("the new policy in force");
    app.publish("call/echo/say", b"x".to_vec(), call_properties("c7"))
        .await;
    let seen = app
        .wait_until("the answer to c7", UP, |s| reply(s, "c7").is_some())
        .await;
    assert_refused(
        reply(&seen, "c7").expect("answer"),
        "permission_denied",
        "calls from the cloud are off",
    );

    let text = metrics(admin).await;
    assert_eq!(metric(&text, "starling_cloud_connected"), Some(1.0));
    assert!(metric(&text, "starling_cloud_published_total") > Some(5.0));
    drop((a, gw));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_30_seconds_during_1000_calls_loses_nothing() {
    let pki = Pki::new();
    let mut broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    let (gw, admin) = NodeProc::start_gateway("gw", &cloud_gateway(&pki, &broker, "gw", ""));
    let _a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    b.wait_peer("node-a", UP);

    let done = Arc::new(AtomicU64::new(0));
    let ingress = b.ingress();
    let calls = {
        let done = done.clone();
        tokio::spawn(async move {
            for _ in 0..1000 {
                let (code, _) = call_ingress(ingress, "echo", "say", b"x").await;
                assert_eq!(code, 200);
                done.fetch_add(1, Ordering::Relaxed);
                // About 40 s for the lot: the outage falls in the middle.
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    eventually(UP, || async {
        (done.load(Ordering::Relaxed) >= 200).then_some(())
    })
    .await
    .expect("200 calls");
    broker.stop();
    let status = eventually(UP, || async {
        let s = cloud_status(admin).await;
        (s["connected"] == false).then_some(s)
    })
    .await
    .expect("the gateway sees the broker gone");
    assert!(status["last_error"].is_string(), "{status}");
    // The outage itself: the site goes on calling while the cloud is away.
    tokio::time::sleep(Duration::from_secs(30)).await;
    let held = cloud_status(admin).await;
    assert!(held["queue_messages"].as_u64() > Some(0), "{held}");
    broker.restart().expect("the broker restarts");
    calls.await.expect("the calls");
    assert_eq!(done.load(Ordering::Relaxed), 1000);

    let counts = eventually(UP, || async {
        let m = request_counts(&metrics(admin).await);
        (m.get(&key("echo", "say", "ok")) == Some(&1000)).then_some(m)
    })
    .await
    .expect("the gateway counted 1000 calls");
    // The link tries again within its longest backoff (15 s, with jitter) of the broker's
    // return, then drains.
    let seen = app
        .wait_until(
            "every call in the cloud's telemetry",
            Duration::from_secs(60),
            |s| telemetry_counts(s) == counts,
        )
        .await;
    let (max, missing) = missing_seqs(&seen);
    assert!(max > 100, "{max}");
    assert_eq!(missing, Vec::<u64>::new(), "sequence numbers without holes");
    assert_in_order(&seen);
    let status = cloud_status(admin).await;
    assert!(status["reconnects"].as_u64() >= Some(1), "{status}");
    assert_eq!(
        status["dropped"],
        serde_json::json!([
            ["audit", 0],
            ["status", 0],
            ["registry", 0],
            ["telemetry", 0]
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_with_messages_queued_delivers_them_after_its_restart() {
    let pki = Pki::new();
    let mut broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    broker.stop();
    let listen = format!("127.0.0.1:{}", starling_tests::free_udp_port());
    let conf = cloud_gateway(&pki, &broker, "gw", "");
    let src = std::fs::read_to_string(&conf).expect("conf").replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"{listen}\""),
    );
    std::fs::write(&conf, src).expect("conf");
    let (gw, admin) = NodeProc::start_gateway("gw", &conf);
    let _a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    b.wait_peer("node-a", UP);
    for _ in 0..100 {
        let (code, _) = call_ingress(b.ingress(), "echo", "say", b"x").await;
        assert_eq!(code, 200);
    }
    eventually(UP, || async {
        let m = request_counts(&metrics(admin).await);
        (m.get(&key("echo", "say", "ok")) == Some(&100)).then_some(())
    })
    .await
    .expect("counted");
    let queued = cloud_status(admin).await;
    assert!(queued["queue_messages"].as_u64() > Some(3), "{queued}");
    // A power cut: no goodbye, nothing flushed but what was committed.
    gw.kill();
    broker.restart().expect("the broker restarts");
    let (_gw, _) = NodeProc::start_gateway("gw", &conf);
    let seen = app
        .wait_until(
            "all 100 calls in the telemetry",
            Duration::from_secs(30),
            |s| telemetry_counts(s).get(&key("echo", "say", "ok")) == Some(&100),
        )
        .await;
    let (max, missing) = missing_seqs(&seen);
    assert!(
        max >= queued["queue_messages"].as_u64().unwrap_or(0),
        "{max}"
    );
    assert_eq!(missing, Vec::<u64>::new(), "nothing queued was lost");
    // The site came back online after it was cut off.
    let states: Vec<String> = seen
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/status"))
        .map(|m| m.json()["state"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        states.last().map(String::as_str),
        Some("online"),
        "{states:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_bound_the_queue_drops_telemetry_and_the_cloud_is_told_the_gap() {
    let pki = Pki::new();
    let mut broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    broker.stop();
    let conf = cloud_gateway(&pki, &broker, "gw", "queue_max_messages = 10\n");
    let (gw, admin) = NodeProc::start_gateway("gw", &conf);
    let _a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    b.wait_peer("node-a", UP);
    let dropped = eventually(Duration::from_secs(20), async || {
        let (code, _) = call_ingress(b.ingress(), "echo", "say", b"x").await;
        assert_eq!(code, 200);
        let text = metrics(admin).await;
        metric(&text, "starling_cloud_dropped_total{kind=\"telemetry\"}").filter(|n| *n >= 5.0)
    })
    .await
    .expect("telemetry dropped past the bound");
    let status = cloud_status(admin).await;
    assert!(status["queue_messages"].as_u64() <= Some(10), "{status}");
    broker.restart().expect("the broker restarts");
    let seen = app
        .wait_until("a gap announced", Duration::from_secs(20), |s| {
            s.iter()
                .any(|m| m.json()["gaps"].as_array().is_some_and(|g| !g.is_empty()))
        })
        .await;
    let seen = app
        .wait_until("the queue drained", Duration::from_secs(20), |s| {
            missing_seqs(s).1.is_empty() && s.len() >= seen.len()
        })
        .await;
    // Every drop announced, as many as /metrics counted at least (more may go while it drains).
    let announced: u64 = seen
        .iter()
        .filter_map(|m| m.json()["gaps"].as_array().cloned())
        .flatten()
        .map(|g| g[1].as_u64().unwrap_or(0) - g[0].as_u64().unwrap_or(0) + 1)
        .sum();
    assert!(
        announced as f64 >= dropped,
        "{announced} announced, {dropped} dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_policy_from_the_cloud_reaches_every_node_and_bad_ones_are_refused() {
    let pki = Pki::new();
    let broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    let keys = pki.dir.path().join("keys");
    std::fs::create_dir_all(&keys).expect("keys");
    let (ok, out) = run_bin(
        "mesh-gateway",
        &["policy", "keygen", "--out", &path(&keys.join("op"))],
    );
    assert!(ok, "{out}");
    let (ok, out) = run_bin(
        "mesh-gateway",
        &["policy", "keygen", "--out", &path(&keys.join("other"))],
    );
    assert!(ok, "{out}");
    let conf = cloud_gateway(
        &pki,
        &broker,
        "gw",
        &format!("policy_signers = [\"{}\"]\n", path(&keys.join("op.pub"))),
    );
    let (ok, out) = run_bin("mesh-gateway", &["check-config", &path(&conf)]);
    assert!(ok, "{out}");
    // A signer that is not an Ed25519 public key is a config error, with its line.
    let bad = conf.with_file_name("bad-signer.toml");
    let src = std::fs::read_to_string(&conf)
        .expect("conf")
        .replace(&path(&keys.join("op.pub")), &path(&broker.pki.ca()));
    std::fs::write(&bad, src).expect("conf");
    let (ok, out) = run_bin("mesh-gateway", &["check-config", &path(&bad)]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("cloud.policy_signers") && out.contains("PUBLIC KEY"),
        "{out}"
    );
    let (gw, _admin) = NodeProc::start_gateway("gw", &conf);
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    a.wait_policy(1, UP);
    b.wait_policy(1, UP);

    let sign = |key: &str, policy: &str| -> Vec<u8> {
        let file = pki.dir.path().join("signed.toml");
        std::fs::write(&file, policy).expect("policy");
        let (ok, out) = run_bin(
            "mesh-gateway",
            &[
                "policy",
                "sign",
                "--key",
                &path(&keys.join(key)),
                "--site",
                PREFIX,
                &path(&file),
            ],
        );
        assert!(ok, "{out}");
        out.trim().as_bytes().to_vec()
    };
    let v2 = format!("{POLICY}[defaults]\ncall_timeout_ms = 4000\n");
    let signed = sign("op.key", &v2);
    app.publish("policy/set", signed.clone(), PublishProperties::default())
        .await;
    let status = |s: &[Received], kind: &str| -> Vec<serde_json::Value> {
        s.iter()
            .filter(|m| m.topic == format!("{PREFIX}/policy/status"))
            .map(Received::json)
            .filter(|v| v["kind"] == kind)
            .collect()
    };
    let seen = app
        .wait_until("the bundle accepted and acked by both nodes", UP, |s| {
            let acks = status(s, "ack");
            !status(s, "accepted").is_empty()
                && ["node-a", "node-b"]
                    .iter()
                    .all(|n| acks.iter().any(|v| v["node"] == *n && v["version"] == 2))
        })
        .await;
    assert_eq!(status(&seen, "accepted")[0]["version"], 2);
    a.wait_policy(2, UP);
    b.wait_policy(2, UP);

    // Refused, each with its reason: not a bundle, unsigned, signed by a stranger, replayed.
    let replayed = signed.clone();
    let mut unsigned: serde_json::Value =
        serde_json::from_slice(&sign("op.key", &v2)).expect("json");
    unsigned["signature"] = "".into();
    let stranger = sign("other.key", &format!("{v2}# v3\n"));
    let elsewhere = {
        let file = pki.dir.path().join("elsewhere.toml");
        std::fs::write(&file, format!("{v2}# v4\n")).expect("policy");
        let (ok, out) = run_bin(
            "mesh-gateway",
            &[
                "policy",
                "sign",
                "--key",
                &path(&keys.join("op.key")),
                "--site",
                "starling/site-8",
                &path(&file),
            ],
        );
        assert!(ok, "{out}");
        out.trim().as_bytes().to_vec()
    };
    for bad in [
        b"{ not json".to_vec(),
        serde_json::to_vec(&unsigned).expect("json"),
        stranger,
        elsewhere,
        signed.clone(),
    ] {
        app.publish("policy/set", bad, PublishProperties::default())
            .await;
    }
    let seen = app
        .wait_until("five refusals", UP, |s| status(s, "refused").len() == 5)
        .await;
    let reasons: Vec<String> = status(&seen, "refused")
        .iter()
        .map(|v| v["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    // Each with its own reason (they are checked concurrently: in any order).
    for want in [
        "not a signed policy bundle",
        "does not verify",
        "not one of the gateway's policy_signers",
        "signed for site \"starling/site-8\"",
        "replayed",
    ] {
        assert_eq!(
            reasons.iter().filter(|r| r.contains(want)).count(),
            1,
            "{want}: {reasons:?}"
        );
    }
    // None of them changed anything.
    assert_eq!(a.status()["policy"]["version"], 2);

    // The floor outlives the gateway: after a restart the bundle is still a replay.
    drop((a, b));
    gw.stop();
    let onlines = |s: &[Received]| {
        s.iter()
            .filter(|m| m.topic == format!("{PREFIX}/status") && m.json()["state"] == "online")
            .count()
    };
    let before = onlines(&app.seen());
    let (_gw, _) = NodeProc::start_gateway("gw", &conf);
    // Once it says it is online, it takes commands.
    app.wait_until("the restarted gateway online", UP, |s| onlines(s) > before)
        .await;
    app.publish("policy/set", replayed, PublishProperties::default())
        .await;
    app.wait_until("the replay refused after a restart", UP, |s| {
        status(s, "refused")
            .iter()
            .filter(|v| v["reason"].as_str().is_some_and(|r| r.contains("replayed")))
            .count()
            == 2
    })
    .await;
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_broker_certificate_a_wrong_client_key_or_no_broker_leave_the_mesh_working() {
    let pki = Pki::new();
    let broker = broker(&pki.dir.path().join("broker"));
    let stranger = starling_tests::mqtt::BrokerPki::new(&pki.dir.path().join("stranger"), "x")
        .expect("a stranger CA");

    // The gateway trusts another CA than the broker's.
    let wrong_ca = cloud_gateway(&pki, &broker, "gw1", "");
    let src = std::fs::read_to_string(&wrong_ca)
        .expect("conf")
        .replace(&path(&broker.pki.ca()), &path(&stranger.ca()));
    std::fs::write(&wrong_ca, src).expect("conf");
    // The gateway's client certificate is not one the broker's CA issued.
    let wrong_key = cloud_gateway(&pki, &broker, "gw2", "");
    stranger.issue(SITE, false).expect("issue");
    let src = std::fs::read_to_string(&wrong_key)
        .expect("conf")
        .replace(&path(&broker.pki.dir), &path(&stranger.dir))
        .replace(&path(&stranger.ca()), &path(&broker.pki.ca()));
    std::fs::write(&wrong_key, src).expect("conf");
    // Nothing listens where the broker should be.
    let nowhere = cloud_gateway(&pki, &broker, "gw3", "");
    let src = std::fs::read_to_string(&nowhere).expect("conf").replace(
        &broker.url(),
        &format!("mqtts://127.0.0.1:{}", starling_tests::closed_tcp_port()),
    );
    std::fs::write(&nowhere, src).expect("conf");

    for (name, conf, want) in [
        ("gw1", &wrong_ca, "TLS"),
        ("gw2", &wrong_key, ""),
        ("gw3", &nowhere, "cannot reach the broker"),
    ] {
        let (gw, admin) = NodeProc::start_gateway(name, conf);
        let status = eventually(UP, || async {
            let s = cloud_status(admin).await;
            s["last_error"].as_str().is_some().then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("{name}: no error shown"));
        assert_eq!(status["connected"], false, "{name}: {status}");
        let error = status["last_error"].as_str().unwrap_or("");
        assert!(error.contains(want), "{name}: {error}");
        // The mesh does not depend on the cloud.
        let (an, bn) = (format!("{name}-a"), format!("{name}-b"));
        let a = NodeProc::start(&an, &node_conf(&pki, &an, gw.quic, ECHO));
        let b = NodeProc::start(&bn, &node_conf(&pki, &bn, gw.quic, ""));
        b.wait_peer(&an, UP);
        let (code, body) = call_ingress(b.ingress(), "echo", "say", b"ok").await;
        assert_eq!((code, &body[..]), (200, &b"ok"[..]), "{name}");
        drop((a, b, gw));
    }
    // The broker saw the bad client and refused it.
    assert!(!broker.log().is_empty());
}

/// Reads an MQTT CONNECT from `s` and returns its protocol level (4: 3.1.1, 5: MQTT 5).
async fn connect_level(s: &mut tokio::net::TcpStream) -> u8 {
    use tokio::io::AsyncReadExt;
    let first = s.read_u8().await.expect("fixed header");
    assert_eq!(first >> 4, 1, "a CONNECT first");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let b = s.read_u8().await.expect("length");
        len |= usize::from(b & 0x7f) << shift;
        shift += 7;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.expect("body");
    assert_eq!(&body[..6], b"\x00\x04MQTT");
    body[6]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_speaks_only_3_1_1_is_answered_in_3_1_1() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A broker of the MQTT 3.1.1 era: an MQTT 5 CONNECT gets "unacceptable protocol version".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let pki = Pki::new();
    let conf = pki.gateway_config(
        "gw",
        "127.0.0.1:0",
        &format!(
            "[cloud]\nbroker = \"mqtt://127.0.0.1:{port}\"\ninsecure = true\nclient_id = \"{SITE}\"\n"
        ),
    );
    let (_gw, admin) = NodeProc::start_gateway("gw", &conf);
    let accept = async {
        let (s, _) = tokio::time::timeout(UP, listener.accept())
            .await
            .expect("the gateway connects")
            .expect("accept");
        s
    };
    let mut first = accept.await;
    assert_eq!(connect_level(&mut first).await, 5, "MQTT 5 first");
    first
        .write_all(&[0x20, 0x02, 0x00, 0x01])
        .await
        .expect("refuse");
    drop(first);
    let (mut second, _) = tokio::time::timeout(UP, listener.accept())
        .await
        .expect("the gateway tries again")
        .expect("accept");
    assert_eq!(connect_level(&mut second).await, 4, "then 3.1.1");
    second
        .write_all(&[0x20, 0x02, 0x00, 0x00])
        .await
        .expect("accept");
    // Whatever it sends now is taken and dropped.
    let drain = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while matches!(second.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    let status = eventually(UP, || async {
        let s = cloud_status(admin).await;
        (s["connected"] == true).then_some(s)
    })
    .await
    .expect("connected");
    assert_eq!(status["protocol"], "3.1.1", "{status}");
    drain.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtt_3_1_1_calls_from_the_cloud_are_answered_by_their_id() {
    let pki = Pki::new();
    let broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    let conf = cloud_gateway(&pki, &broker, "gw", "protocol = \"3.1.1\"\n");
    let (gw, admin) = NodeProc::start_gateway("gw", &conf);
    let _a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    b.wait_peer("node-a", UP);
    for _ in 0..20 {
        let (code, _) = call_ingress(b.ingress(), "echo", "say", b"x").await;
        assert_eq!(code, 200);
    }
    app.wait_until("the 20 calls", UP, |s| {
        telemetry_counts(s).get(&key("echo", "say", "ok")) == Some(&20)
    })
    .await;
    assert_eq!(cloud_status(admin).await["protocol"], "3.1.1");
    app.publish(
        "call/echo/say/r-1",
        b"by id".to_vec(),
        PublishProperties::default(),
    )
    .await;
    app.publish(
        "call/echo/secret/r-2",
        b"x".to_vec(),
        PublishProperties::default(),
    )
    .await;
    let seen = app
        .wait_until("both answers", UP, |s| {
            s.iter()
                .any(|m| m.topic == format!("{PREFIX}/reply/r-1/ok"))
                && s.iter()
                    .any(|m| m.topic == format!("{PREFIX}/reply/r-2/permission_denied"))
        })
        .await;
    let ok = seen
        .iter()
        .find(|m| m.topic == format!("{PREFIX}/reply/r-1/ok"))
        .expect("answer");
    assert_eq!(&ok.payload[..], b"by id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_batch_interval_the_nodes_batches_go_up_together_and_still_exactly() {
    let pki = Pki::new();
    let broker = broker(&pki.dir.path().join("broker"));
    let app = CloudApp::connect(&broker, "app-1").await;
    let conf = cloud_gateway(&pki, &broker, "gw", "batch_interval_ms = 1000\n");
    let (gw, admin) = NodeProc::start_gateway("gw", &conf);
    let _a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ECHO));
    b.wait_peer("node-a", UP);
    for _ in 0..30 {
        let (code, _) = call_ingress(b.ingress(), "echo", "say", b"x").await;
        assert_eq!(code, 200);
    }
    let counts = eventually(UP, || async {
        let m = request_counts(&metrics(admin).await);
        (m.get(&key("echo", "say", "ok")) == Some(&30)).then_some(m)
    })
    .await
    .expect("counted");
    let seen = app
        .wait_until("telemetry equal to /metrics", UP, |s| {
            telemetry_counts(s) == counts
        })
        .await;
    // Both nodes send a batch every 100 ms: a second's worth goes up as one message.
    let sizes: Vec<usize> = seen
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/telemetry"))
        .map(|m| m.json()["batches"].as_array().map_or(0, Vec::len))
        .collect();
    assert!(sizes.iter().any(|n| *n >= 2), "{sizes:?}");
    let nodes: std::collections::BTreeSet<String> = seen
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/telemetry"))
        .flat_map(|m| m.json()["batches"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["node"].as_str().map(str::to_owned))
        .collect();
    assert!(nodes.contains("node-b"), "{nodes:?}");
}

/// A queue file damaged so that redb, reading it, panics (found by the `state_files` fuzz
/// target; the file is kept as tests/fixtures/damaged-cloud-queue.redb): the gateway reads its
/// queue in a child process first, and refuses to start with a reason that names the file,
/// instead of aborting at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_file_that_crashes_its_reader_stops_the_gateway_with_a_reason() {
    let pki = Pki::new();
    let broker = broker(&pki.dir.path().join("broker"));
    let conf = cloud_gateway(&pki, &broker, "gw", "");
    let queue_dir = pki.dir.path().join("gw/state/cloud");
    std::fs::create_dir_all(&queue_dir).expect("queue dir");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/damaged-cloud-queue.redb");
    std::fs::copy(&fixture, queue_dir.join("cloud-queue.redb")).expect("fixture");
    let out = tokio::time::timeout(
        UP,
        tokio::process::Command::new(starling_tests::bin("mesh-gateway"))
            .args(["run", "--config"])
            .arg(&conf)
            .output(),
    )
    .await
    .expect("it stops at once")
    .expect("runs");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {said}");
    assert!(
        said.contains("cloud-queue.redb") && said.contains("damaged") && !said.contains("panicked"),
        "{said}"
    );
    eprintln!("{said}");
    // The file is left for the operator.
    assert_eq!(
        std::fs::read(queue_dir.join("cloud-queue.redb"))
            .expect("kept")
            .len(),
        std::fs::read(&fixture).expect("fixture").len()
    );
}
