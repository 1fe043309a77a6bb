//! Traffic policy in the data plane: routing and splits, mirroring, authorization, retries,
//! circuit breaking, balancing, rate limits. Nodes run in this process on the in-memory network
//! (real QUIC, real mTLS, no sockets between nodes; HTTP upstreams are real), so a test can set a
//! policy and count where every call went; the end-to-end push of a policy through the gateway,
//! with real processes and sockets, is in the last test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::policy::Policy;
use mesh_node::testing::MemoryNetwork;
use mesh_node::{CallOptions, Node};
use mesh_proto::Status;
use starling_tests::{HttpUpstream, Pki};

const UP: Duration = Duration::from_secs(10);

async fn node(
    pki: &Pki,
    name: &str,
    labels: &[(&str, &str)],
    services: &str,
    peers: &[&Node],
) -> Node {
    let mut extra = String::from("[labels]\n");
    for (k, v) in labels {
        extra.push_str(&format!("{k} = \"{v}\"\n"));
    }
    extra.push_str(services);
    for p in peers {
        extra.push_str(&format!("[[peers]]\naddr = \"{}\"\n", p.local_addr()));
    }
    pki.labeled_memory_node(network(), name, labels, &extra, Default::default())
}

/// The in-memory network every node of these tests is on.
fn network() -> &'static MemoryNetwork {
    static NET: std::sync::OnceLock<MemoryNetwork> = std::sync::OnceLock::new();
    NET.get_or_init(MemoryNetwork::new)
}

fn health(service: &str) -> String {
    format!("[[services]]\nname = \"{service}\"\nupstream = \"builtin:health\"\n")
}

fn http(service: &str, up: &HttpUpstream) -> String {
    format!(
        "[[services]]\nname = \"{service}\"\nupstream = \"http://{}\"\n",
        up.addr
    )
}

fn policy(toml: &str) -> Policy {
    Policy::parse(toml, "test policy").unwrap_or_else(|e| panic!("{e}"))
}

/// Which node answered a `builtin:health` call.
fn answered_by(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.split("\"node\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_owned()
}

async fn wait_peers(caller: &Node, n: usize) {
    assert!(
        caller.wait_until(UP, |c| c.peers().len() == n).await,
        "peers never connected"
    );
}

fn with_metadata(k: &str, v: &str) -> CallOptions {
    CallOptions {
        metadata: vec![(k.into(), v.into())],
        ..CallOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_a_canary_header_and_zone_preference() {
    let pki = Pki::new();
    let v1 = node(
        &pki,
        "v1",
        &[("version", "v1"), ("zone", "A")],
        &health("shop"),
        &[],
    )
    .await;
    let v2 = node(
        &pki,
        "v2",
        &[("version", "v2"), ("zone", "B")],
        &health("shop"),
        &[],
    )
    .await;
    let caller = node(&pki, "caller", &[("zone", "A")], "", &[&v1, &v2]).await;
    wait_peers(&caller, 2).await;
    caller.set_policy(
        1,
        policy(
            r#"
[[services]]
name = "shop"
balance = { prefer_zone = false }
[[services.routes]]
name = "canary-header"
metadata = { "x-canary" = "1" }
split = [ { subset = { version = "v2" }, weight = 1 } ]
[[services.routes]]
name = "rollout"
split = [ { subset = { version = "v1" }, weight = 90 }, { subset = { version = "v2" }, weight = 10 } ]
"#,
        ),
    );
    let mut to_v2 = 0;
    for _ in 0..2000 {
        let answer = caller
            .call("shop", "list", Bytes::new())
            .await
            .expect("call");
        to_v2 += usize::from(answered_by(&answer) == "v2");
    }
    let share = to_v2 as f64 / 2000.0 * 100.0;
    eprintln!("90/10 split: {share:.1}% of 2000 calls reached v2");
    assert!((7.0..=13.0).contains(&share), "{share:.1}% to v2");
    for _ in 0..100 {
        let reply = caller
            .call_with(
                "shop",
                "list",
                Bytes::new(),
                &with_metadata("x-canary", "1"),
            )
            .await;
        assert_eq!(
            answered_by(&reply.body),
            "v2",
            "x-canary: 1 must always reach v2"
        );
    }

    // Geography: with no routes, a caller in zone A stays in zone A while it has an endpoint.
    caller.set_policy(2, policy("[[services]]\nname = \"shop\"\n"));
    for _ in 0..200 {
        let answer = caller
            .call("shop", "list", Bytes::new())
            .await
            .expect("call");
        assert_eq!(
            answered_by(&answer),
            "v1",
            "left its zone while it had an endpoint"
        );
    }
    v1.shutdown().await;
    assert!(caller.wait_until(UP, |c| c.peers().len() == 1).await);
    for _ in 0..50 {
        let answer = caller
            .call("shop", "list", Bytes::new())
            .await
            .expect("failover call");
        assert_eq!(answered_by(&answer), "v2");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_gets_its_share_and_never_slows_or_answers_the_caller() {
    let pki = Pki::new();
    // The mirror's upstream hangs for 5 s on every call.
    let hanging = HttpUpstream::start(Duration::from_secs(5)).await;
    let primary = node(&pki, "primary", &[("version", "v1")], &health("shop"), &[]).await;
    let shadow = node(
        &pki,
        "shadow",
        &[("version", "shadow")],
        &http("shop", &hanging),
        &[],
    )
    .await;
    let caller = node(&pki, "caller", &[], "", &[&primary, &shadow]).await;
    wait_peers(&caller, 2).await;
    caller.set_policy(
        1,
        policy(
            r#"
[[services]]
name = "shop"
[[services.routes]]
name = "mirrored"
split = [ { subset = { version = "v1" }, weight = 1 } ]
mirror = { subset = { version = "shadow" }, percent = 20 }
"#,
        ),
    );
    let mut slowest = Duration::ZERO;
    for _ in 0..500 {
        let t = Instant::now();
        let answer = caller
            .call("shop", "list", Bytes::new())
            .await
            .expect("call");
        slowest = slowest.max(t.elapsed());
        assert_eq!(
            answered_by(&answer),
            "primary",
            "an answer came from the mirror"
        );
    }
    assert!(
        slowest < Duration::from_secs(1),
        "the hanging mirror slowed a call to {slowest:?}"
    );
    let mirrored = starling_tests::eventually(UP, async || {
        let n = hanging.seen().len();
        (n >= 70).then_some(n)
    })
    .await
    .unwrap_or_else(|| hanging.seen().len());
    eprintln!("mirror at 20%: {mirrored} of 500 calls copied");
    assert!((70..=130).contains(&mirrored), "{mirrored} of 500 mirrored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_refuses_and_audits_and_audit_mode_lets_through() {
    let pki = Pki::new();
    let server = node(&pki, "server", &[], &health("vault"), &[]).await;
    let friend = node(&pki, "friend", &[], "", &[&server]).await;
    let stranger = node(&pki, "stranger", &[], "", &[&server]).await;
    wait_peers(&friend, 1).await;
    wait_peers(&stranger, 1).await;
    let deny = r#"
[authorization]
default = "deny"
[[authorization.rules]]
name = "friends-may-read"
effect = "allow"
callers = ["spiffe://starling.local/node/friend"]
services = ["vault"]
methods = ["get*"]
"#;
    server.set_policy(1, policy(deny));
    assert!(friend.call("vault", "get_key", Bytes::new()).await.is_ok());
    let err = friend
        .call("vault", "delete", Bytes::new())
        .await
        .expect_err("no rule allows delete");
    assert_eq!(err.status, Status::PermissionDenied);
    let err = stranger
        .call("vault", "get_key", Bytes::new())
        .await
        .expect_err("stranger");
    assert_eq!(err.status, Status::PermissionDenied);
    assert!(err.message.contains("(rule default)"), "{}", err.message);

    let audit: Vec<_> = server
        .telemetry_now()
        .into_iter()
        .flat_map(|b| b.audit)
        .collect();
    let denied: Vec<_> = audit.iter().filter(|e| e.kind == "denied").collect();
    assert_eq!(denied.len(), 2, "{audit:?}");
    let field = |e: &mesh_proto::control::AuditEvent, k: &str| {
        e.fields
            .iter()
            .find(|(fk, _)| fk == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    assert!(
        denied
            .iter()
            .any(|e| field(e, "caller").ends_with("/node/stranger")
                && field(e, "service") == "vault"
                && field(e, "method") == "get_key"
                && field(e, "rule") == "default")
    );

    // Audit mode: the same policy lets the stranger through, and still records it.
    server.set_policy(
        2,
        policy(&deny.replace("default = \"deny\"", "default = \"deny\"\nmode = \"audit\"")),
    );
    assert!(
        stranger
            .call("vault", "get_key", Bytes::new())
            .await
            .is_ok()
    );
    let audited: Vec<_> = server
        .telemetry_now()
        .into_iter()
        .flat_map(|b| b.audit)
        .filter(|e| e.kind == "audited")
        .collect();
    assert_eq!(audited.len(), 1);
    assert_eq!(field(&audited[0], "rule"), "default");
    let rules: Vec<_> = server
        .telemetry_now()
        .into_iter()
        .flat_map(|b| b.rules)
        .collect();
    assert!(
        rules
            .iter()
            .any(|r| r.rule == "default" && r.action == "denied" && r.count == 2),
        "{rules:?}"
    );
    assert!(
        rules
            .iter()
            .any(|r| r.rule == "friends-may-read" && r.action == "allowed"),
        "{rules:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_within_budget_lift_a_flaky_endpoint_and_never_repeat_unsafe_calls() {
    let pki = Pki::new();
    // Three requests in every ten fail with 503.
    let flaky = HttpUpstream::start_with(Duration::ZERO, Arc::new(|i| i % 10 < 3)).await;
    let server = node(&pki, "server", &[], &http("store", &flaky), &[]).await;
    let caller = node(&pki, "caller", &[], "", &[&server]).await;
    wait_peers(&caller, 1).await;
    caller.set_policy(
        1,
        policy(
            r#"
[[services]]
name = "store"
idempotent = ["get*"]
retry = { attempts = 4, budget_percent = 50, backoff_ms = 1 }
breaker = { failures = 50 }
"#,
        ),
    );
    let mut ok = 0;
    for _ in 0..1000 {
        ok += usize::from(caller.call("store", "get", Bytes::new()).await.is_ok());
    }
    let (calls, retries) = caller.retry_totals("store");
    eprintln!(
        "30% failing endpoint: {ok} of 1000 idempotent calls succeeded with {retries} retries"
    );
    assert!(ok >= 990, "{ok} of 1000 succeeded");
    assert_eq!(calls, 1000);
    assert!(
        retries as f64 <= 0.5 * 1000.0 + 10.0,
        "{retries} retries broke the 50% budget"
    );
    assert_eq!(
        flaky.seen().len() as u64,
        1000 + retries,
        "upstream load = calls + retries"
    );

    let before = flaky.seen().len();
    let mut failed = 0;
    for _ in 0..200 {
        failed += usize::from(caller.call("store", "put", Bytes::new()).await.is_err());
    }
    assert_eq!(
        flaky.seen().len() - before,
        200,
        "a non-idempotent call was retried"
    );
    assert!(
        failed > 30,
        "only {failed} of 200 unsafe calls failed: were they retried?"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_and_returns_when_it_recovers() {
    let pki = Pki::new();
    let failing = Arc::new(AtomicBool::new(true));
    let flag = failing.clone();
    let sick = HttpUpstream::start_with(
        Duration::ZERO,
        Arc::new(move |_| flag.load(Ordering::SeqCst)),
    )
    .await;
    let well = HttpUpstream::start(Duration::ZERO).await;
    let a = node(&pki, "sick", &[], &http("store", &sick), &[]).await;
    let b = node(&pki, "well", &[], &http("store", &well), &[]).await;
    let caller = node(&pki, "caller", &[], "", &[&a, &b]).await;
    wait_peers(&caller, 2).await;
    caller.set_policy(
        1,
        policy("[[services]]\nname = \"store\"\nbreaker = { failures = 3, eject_ms = 3000, max_eject_ms = 3000 }\n"),
    );
    // Three failures in a row eject it: call until it has failed three times.
    let mut made = 0;
    while sick.seen().len() < 3 {
        let _ = caller.call("store", "put", Bytes::new()).await;
        made += 1;
        assert!(made < 1000, "the failing endpoint was never tried");
    }
    let sick_before = sick.seen().len();
    for _ in 0..100 {
        if let Err(e) = caller.call("store", "put", Bytes::new()).await {
            panic!("a call failed after the ejection: {e}");
        }
    }
    assert!(
        sick.seen().len() <= sick_before + 1,
        "traffic did not move to the healthy replica"
    );

    failing.store(false, Ordering::SeqCst);
    // After its ejection (3 s) runs out, a probe succeeds and it takes calls again. The breaker's
    // timer is what is tested here, so the test waits it out.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let before = sick.seen().len();
    for _ in 0..400 {
        assert!(caller.call("store", "put", Bytes::new()).await.is_ok());
    }
    let back = sick.seen().len() - before;
    eprintln!("recovered endpoint took {back} of 400 calls");
    assert!(
        back >= 10,
        "the recovered endpoint took only {back} of 400 calls"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ten_times_slower_replica_gets_under_a_fifth_of_the_calls() {
    let pki = Pki::new();
    let slow = HttpUpstream::start(Duration::from_millis(20)).await;
    let fast = HttpUpstream::start(Duration::from_millis(2)).await;
    let a = node(&pki, "slow", &[], &http("store", &slow), &[]).await;
    let b = node(&pki, "fast", &[], &http("store", &fast), &[]).await;
    let caller = node(&pki, "caller", &[], "", &[&a, &b]).await;
    wait_peers(&caller, 2).await;
    for _ in 0..1000 {
        caller
            .call("store", "get", Bytes::new())
            .await
            .expect("call");
    }
    let share = slow.seen().len() as f64 / 1000.0 * 100.0;
    eprintln!("slow replica took {share:.1}% of 1000 calls");
    assert!(share < 20.0, "slow replica took {share:.1}%");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_rate_limit_is_refused_and_others_are_not() {
    let pki = Pki::new();
    let server = node(&pki, "server", &[], &health("api"), &[]).await;
    let greedy = node(&pki, "greedy", &[], "", &[&server]).await;
    let polite = node(&pki, "polite", &[], "", &[&server]).await;
    wait_peers(&greedy, 1).await;
    wait_peers(&polite, 1).await;
    server.set_policy(
        1,
        policy("[[rate_limits]]\nname = \"per-caller\"\nservice = \"api\"\nper_second = 5\nburst = 5\n"),
    );
    let mut refused = 0;
    for _ in 0..30 {
        if let Err(e) = greedy.call("api", "get", Bytes::new()).await {
            assert_eq!(e.status, Status::ResourceExhausted, "{e}");
            refused += 1;
        }
    }
    assert!(
        refused >= 20,
        "only {refused} of 30 rapid calls were refused"
    );
    for _ in 0..5 {
        assert!(
            polite.call("api", "get", Bytes::new()).await.is_ok(),
            "another caller was limited"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_pushed_by_the_gateway_takes_effect_without_restarts() {
    use starling_tests::{NodeProc, http as admin_http, post};
    let pki = Pki::new();
    let (gw, admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let token = pki.admin_token("gw");
    let conf = |name: &str, extra: &str| {
        let p = pki.config(name, extra);
        let src = std::fs::read_to_string(&p).expect("conf");
        std::fs::write(
            &p,
            src.replacen(
                "[identity]",
                &format!("gateway = \"{}\"\n[identity]", gw.quic),
                1,
            ),
        )
        .expect("conf");
        p
    };
    let server = NodeProc::start("server", &conf("server", &health("vault")));
    let caller = NodeProc::start(
        "caller",
        &conf(
            "caller",
            &format!("[[peers]]\naddr = \"{}\"\n", server.quic),
        ),
    );
    caller.wait_peer("server", UP);
    server.wait_gateway(UP);
    let (code, _, _) = post(caller.ingress(), "vault", "get", Bytes::new(), None)
        .await
        .expect("call");
    assert_eq!(code, 200);

    let (code, _) = admin_http(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "[authorization]\ndefault = \"deny\"\n",
    )
    .await;
    assert_eq!(code, 200);
    server.wait_policy(1, UP);
    let (code, status, _) = post(caller.ingress(), "vault", "get", Bytes::new(), None)
        .await
        .expect("call");
    assert_eq!((code, status.as_deref()), (403, Some("permission_denied")));

    let (code, _) = admin_http(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "[authorization]\ndefault = \"allow\"\n",
    )
    .await;
    assert_eq!(code, 200);
    server.wait_policy(2, UP);
    let (code, _, _) = post(caller.ingress(), "vault", "get", Bytes::new(), None)
        .await
        .expect("call");
    assert_eq!(code, 200);
}

/// A policy that lets in only callers whose certificate says `zone = "secure"`, to `service`.
fn secure_zone_only(service: &str) -> Policy {
    policy(&format!(
        r#"
[authorization]
default = "deny"
[[authorization.rules]]
name = "secure-zone"
effect = "allow"
caller_labels = {{ zone = "secure" }}
services = ["{service}"]
"#
    ))
}

/// Labels decide access and routing only when the CA certified them: a node that merely announces
/// `zone = "secure"` (its config, its hello) gets nothing a `zone = "secure"` rule gives, and an
/// endpoint that announces `version = "v2"` draws no canary traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_labels_decide_nothing_certified_ones_do() {
    let pki = Pki::new();
    let vault = node(&pki, "vault", &[], &health("vault"), &[]).await;
    vault.set_policy(1, secure_zone_only("vault"));
    // `boaster` announces zone = secure; its certificate certifies nothing.
    let mut extra = String::from("[labels]\nzone = \"secure\"\n");
    extra.push_str(&format!("[[peers]]\naddr = \"{}\"\n", vault.local_addr()));
    let boaster = pki.memory_node(network(), "boaster", &extra, Default::default());
    let trusted = node(&pki, "trusted", &[("zone", "secure")], "", &[&vault]).await;
    wait_peers(&boaster, 1).await;
    wait_peers(&trusted, 1).await;
    let seen = boaster.peers();
    assert!(seen[0].certified.is_empty(), "{seen:?}");

    let refused = boaster.call("vault", "check", Bytes::new()).await;
    assert_eq!(
        refused.as_ref().map_err(|e| e.status),
        Err(Status::PermissionDenied),
        "an announced label opened the vault: {refused:?}"
    );
    trusted
        .call("vault", "check", Bytes::new())
        .await
        .expect("a certified zone = secure is let in");
    // The vault sees both as they are: announced labels for display, certified ones apart.
    let callers = vault.peers();
    let boaster_seen = callers
        .iter()
        .find(|p| p.id.node_name().as_str() == "boaster")
        .expect("boaster");
    assert_eq!(
        boaster_seen.labels.get("zone").map(String::as_str),
        Some("secure")
    );
    assert!(boaster_seen.certified.is_empty());

    // Routing: a `version = v2` subset takes only the endpoint certified v2, whatever the other
    // endpoint announces.
    let real = node(&pki, "real-v2", &[("version", "v2")], &health("shop2"), &[]).await;
    let mut extra = String::from("[labels]\nversion = \"v2\"\n");
    extra.push_str(&health("shop2"));
    let fake = pki.memory_node(network(), "fake-v2", &extra, Default::default());
    let caller = node(&pki, "shopper", &[], "", &[&real, &fake]).await;
    wait_peers(&caller, 2).await;
    caller.set_policy(
        1,
        policy(
            r#"
[[services]]
name = "shop2"
[[services.routes]]
name = "v2-only"
split = [ { subset = { version = "v2" }, weight = 1 } ]
"#,
        ),
    );
    for _ in 0..50 {
        let answer = caller
            .call("shop2", "list", Bytes::new())
            .await
            .expect("call");
        assert_eq!(answered_by(&answer), "real-v2");
    }
}

/// A gateway's call for its cloud is judged as the cloud: the gateway's own certified labels do
/// not come with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_for_the_cloud_carries_none_of_the_gateways_labels() {
    let pki = Pki::new();
    let strongbox = node(&pki, "strongbox", &[], &health("strongbox"), &[]).await;
    strongbox.set_policy(1, secure_zone_only("strongbox"));
    let name = mesh_core::NodeName::try_from("gw-labeled").expect("name");
    let labels = [("zone".to_owned(), "secure".to_owned())].into();
    let issued = pki
        .ca
        .issue_labeled(
            mesh_core::SpiffeId::gateway(starling_tests::TD, name).expect("id"),
            1,
            &labels,
        )
        .expect("issue");
    // The gateway's node also hosts a service of its own, under the same rule.
    let extra = format!(
        "{}[[peers]]\naddr = \"{}\"\n",
        health("coffer"),
        strongbox.local_addr()
    );
    let options = mesh_node::NodeOptions {
        gateway: true,
        ..Default::default()
    };
    let gateway = pki.memory_node_as_with(network(), &issued, &extra, options);
    gateway.set_policy(1, secure_zone_only("coffer"));
    wait_peers(&gateway, 1).await;
    let cloud = mesh_core::SpiffeId::cloud(
        starling_tests::TD,
        mesh_core::NodeName::try_from("site-7").expect("name"),
    )
    .expect("id");
    let options = CallOptions {
        on_behalf_of: Some(cloud),
        ..CallOptions::default()
    };
    // Across the network, and on the gateway's own node (the call never leaves it).
    for service in ["strongbox", "coffer"] {
        gateway
            .call(service, "check", Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("{service}: the gateway's own zone lets it in: {e:?}"));
        let refused = gateway
            .call_with(service, "check", Bytes::new(), &options)
            .await;
        assert_eq!(
            refused.status,
            Status::PermissionDenied,
            "{service}: the cloud came in with the gateway's zone: {}",
            refused.message
        );
    }
}
