//! The gateway as control plane: registry, versioned policy, telemetry, Prometheus metrics, the
//! API. Real `mesh-gateway` and `mesh-node` processes on loopback.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_tests::{
    HttpUpstream, NodeProc, Pki, closed_tcp_port, eventually, free_udp_port, http, key, metrics,
    post, prepend, request_counts, try_http,
};

const UP: Duration = Duration::from_secs(10);
const FAST: &str = "[telemetry]\ninterval_ms = 100\n";

fn node_conf(pki: &Pki, name: &str, gw: SocketAddr, extra: &str) -> std::path::PathBuf {
    let path = pki.config(name, &format!("{extra}{FAST}"));
    prepend(&path, &format!("gateway = \"{gw}\"\n"));
    path
}

/// Starts gateway `gw` (QUIC on a free loopback port) serving the policy file `policy`.
fn gateway_with_policy(pki: &Pki, policy: &Path) -> (NodeProc, SocketAddr) {
    let conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    prepend(&conf, &format!("policy = \"{}\"\n", policy.display()));
    NodeProc::start_gateway("gw", &conf)
}

/// A gateway config on a fixed loopback port (so a restarted gateway is found where it was), with
/// `policy` as its policy file if given.
fn fixed_gateway_conf(pki: &Pki, policy: Option<&Path>) -> std::path::PathBuf {
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let conf = pki.gateway_config("gw", &listen, "");
    if let Some(policy) = policy {
        prepend(&conf, &format!("policy = \"{}\"\n", policy.display()));
    }
    conf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_hold_exact_counts_and_prometheus_agrees() {
    let pki = Pki::new();
    let (gw, admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let broken = format!(
        "[[services]]\nname = \"broken\"\nupstream = \"http://127.0.0.1:{}\"\n",
        closed_tcp_port()
    );
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let a = NodeProc::start(
        "node-a",
        &node_conf(&pki, "node-a", gw.quic, &format!("{echo}{broken}")),
    );
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, echo));
    let peers = format!(
        "[[peers]]\naddr = \"{}\"\n[[peers]]\naddr = \"{}\"\n",
        a.quic, b.quic
    );
    let c = NodeProc::start("node-c", &node_conf(&pki, "node-c", gw.quic, &peers));
    c.wait_peer("node-a", UP);
    c.wait_peer("node-b", UP);
    for n in [&a, &b, &c] {
        n.wait_gateway(UP);
    }

    for _ in 0..30 {
        let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
            .await
            .expect("call");
        assert_eq!(code, 200);
    }
    for _ in 0..7 {
        let (code, _, _) = post(c.ingress(), "nosuch", "x", Bytes::new(), None)
            .await
            .expect("call");
        assert_eq!(code, 404);
    }
    for _ in 0..5 {
        let (code, _, _) = post(c.ingress(), "broken", "get", Bytes::new(), None)
            .await
            .expect("call");
        assert_eq!(code, 503);
    }
    let expected: BTreeMap<_, _> = [
        (key("echo", "say", "ok"), 30),
        (key("nosuch", "x", "not_found"), 7),
        (key("broken", "get", "unavailable"), 5),
    ]
    .into_iter()
    .collect();
    let counts = eventually(UP, async || {
        let counts = request_counts(&metrics(admin).await);
        (counts == expected).then_some(counts)
    })
    .await;
    assert_eq!(
        counts,
        Some(expected.clone()),
        "gateway counts never matched"
    );

    let text = metrics(admin).await;
    for name in [
        "starling_request_duration_seconds_bucket",
        "starling_node_up{node=\"node-c\"} 1",
        "starling_node_info{node=\"node-a\"",
        "starling_policy_version{node=\"node-b\"}",
        "starling_node_resident_memory_bytes{node=\"node-c\"}",
        "starling_telemetry_gap_total{node=\"node-c\"} 0",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }

    // promtool, from Debian's prometheus package, checks the exposition format.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (scripts/setup.sh installs prometheus)");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A real Prometheus scrapes the gateway; PromQL returns the same count.
    let prom = Prometheus::start(&pki, admin);
    let query = "sum(starling_requests_total{service=\"echo\",status=\"ok\"})";
    let value = eventually(Duration::from_secs(30), async || {
        let path = format!("/api/v1/query?query={}", urlencode(query));
        let (code, body) = try_http("GET", prom.addr, &path, None, "").await.ok()?;
        if code != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"][0]["value"][1]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert_eq!(value.as_deref(), Some("30"), "PromQL {query}");

    // The rules in configs/prometheus evaluate against the gateway's real series without error.
    let rules = eventually(Duration::from_secs(30), async || {
        let (code, body) = try_http("GET", prom.addr, "/api/v1/rules", None, "")
            .await
            .ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let rules: Vec<serde_json::Value> = json["data"]["groups"]
            .as_array()?
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let evaluated = rules.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        (code == 200 && !rules.is_empty() && evaluated).then_some(rules)
    })
    .await
    .expect("Prometheus loaded and evaluated the rules");
    for r in &rules {
        assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
    }
    assert!(
        rules
            .iter()
            .any(|r| r["name"] == "starling:requests:rate1m"),
        "{rules:?}"
    );

    // Every PromQL expression of the Grafana dashboard is accepted by this Prometheus.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("configs/grafana/starling.json")).expect("dashboard"),
    )
    .expect("the Grafana dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    assert!(exprs.len() >= 20, "only {} expressions", exprs.len());
    for expr in &exprs {
        let query = expr
            .replace("$__rate_interval", "1m")
            .replace("$job", "starling")
            .replace("$instance", ".*")
            .replace("$node", ".*")
            .replace("$service", ".*");
        let path = format!("/api/v1/query?query={}", urlencode(&query));
        let (code, body) = try_http("GET", prom.addr, &path, None, "")
            .await
            .expect("Prometheus answers");
        assert_eq!(code, 200, "{query}: {body}");
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(json["status"], "success", "{query}: {body}");
    }
}

/// The repository's root.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Every `expr` string under `value`.
fn collect_exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(serde_json::Value::String(e)) = map.get("expr") {
                out.push(e.clone());
            }
            map.values().for_each(|v| collect_exprs(v, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect_exprs(v, out)),
        _ => {}
    }
}

/// The alert and recording rules pass `promtool check rules` and their unit tests (`promtool test
/// rules`: every alert firing and not firing on made-up series).
#[test]
fn the_prometheus_rules_check_and_pass_their_unit_tests() {
    let dir = repo().join("configs/prometheus");
    for args in [
        ["check", "rules", "starling-rules.yml"],
        ["test", "rules", "starling-rules.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool (scripts/setup.sh installs prometheus)");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

struct Prometheus {
    addr: SocketAddr,
    child: std::process::Child,
}

impl Prometheus {
    fn start(pki: &Pki, target: SocketAddr) -> Prometheus {
        let dir = pki.dir.path().join("prometheus");
        std::fs::create_dir_all(&dir).expect("dir");
        // The recording group evaluates once a minute; Prometheus starts each group at an offset
        // hashed from its name and file path, so the first evaluation may come a minute after
        // start. The test evaluates the same rules every second instead.
        let shipped = std::fs::read_to_string(repo().join("configs/prometheus/starling-rules.yml"))
            .expect("rules");
        assert!(
            shipped.contains("interval: 1m"),
            "the rules' group interval moved"
        );
        let rules = dir.join("starling-rules.yml");
        std::fs::write(&rules, shipped.replace("interval: 1m", "interval: 1s")).expect("rules");
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - '{}'\n\
                 scrape_configs:\n  - job_name: starling\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .expect("config");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus (scripts/setup.sh installs it)");
        Prometheus { addr, child }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn policy_status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http("GET", admin, "/v1/policy/status", None, "").await;
    assert_eq!(code, 200);
    serde_json::from_str(&body).expect("json")
}

/// Waits until every node in `names` holds `version` (or reports `error_part` for it).
async fn all_at(admin: SocketAddr, names: &[&str], version: u64) -> bool {
    eventually(UP, async || {
        let status = policy_status(admin).await;
        let nodes = status["nodes"].as_array()?;
        let ok = names.iter().all(|n| {
            nodes
                .iter()
                .any(|x| x["name"] == *n && x["version"] == version && x["error"].is_null())
        });
        ok.then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_reach_every_node_and_bad_bundles_are_refused() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 4000\n").expect("policy");
    let (gw, admin) = gateway_with_policy(&pki, &policy_file);
    let token = pki.admin_token("gw");
    let names = ["node-a", "node-b", "node-c"];
    let _nodes: Vec<NodeProc> = names
        .iter()
        .map(|n| NodeProc::start(n, &node_conf(&pki, n, gw.quic, "")))
        .collect();
    assert!(
        all_at(admin, &names, 1).await,
        "version 1 never reached every node"
    );

    // A change over the API, with the token.
    let (code, body) = http(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "[defaults]\ncall_timeout_ms = 2000\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "{\"version\":2}"));
    assert!(
        all_at(admin, &names, 2).await,
        "version 2 never reached every node"
    );
    let (_, body) = http("GET", admin, "/v1/policy", None, "").await;
    assert!(body.contains("call_timeout_ms = 2000"), "{body}");

    // Without the token, or with a wrong one: 401, and nothing changes.
    let (code, _) = http("PUT", admin, "/v1/policy", None, "[defaults]\n").await;
    assert_eq!(code, 401);
    let (code, _) = http(
        "PUT",
        admin,
        "/v1/policy",
        Some("not-the-token"),
        "[defaults]\n",
    )
    .await;
    assert_eq!(code, 401);

    // An invalid bundle is refused at the gateway, precisely.
    let (code, body) = http(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "[defaults]\ncolour = \"red\"\n",
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body.contains("PUT /v1/policy:2: defaults.colour: unknown field `colour`"),
        "{body}"
    );
    assert_eq!(policy_status(admin).await["latest"], 2);

    // A valid bundle the nodes cannot apply: each nacks, with its reason shown.
    let (code, body) = http(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "min_node_version = \"99.0.0\"\n",
    )
    .await;
    assert_eq!((code, body.as_str()), (200, "{\"version\":3}"));
    let refused = eventually(UP, async || {
        let status = policy_status(admin).await;
        let nodes = status["nodes"].as_array()?.clone();
        nodes
            .iter()
            .all(|n| {
                n["version"] == 2
                    && n["error"].as_str().is_some_and(|e| {
                        e.contains("version 3: bundle needs mesh-node >= 99.0.0, this node runs")
                    })
            })
            .then_some(nodes)
    })
    .await;
    assert!(
        refused.is_some(),
        "nodes did not nack version 3: {}",
        policy_status(admin).await
    );

    // The file changed on disk: the gateway reloads it as the next version.
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 3000\n").expect("policy");
    assert!(
        all_at(admin, &names, 4).await,
        "the reloaded file never reached every node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_made_while_the_gateway_is_away_arrive_when_it_returns() {
    let pki = Pki::new();
    let gw_conf = fixed_gateway_conf(&pki, None);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, echo));
    let c = NodeProc::start(
        "node-c",
        &node_conf(
            &pki,
            "node-c",
            gw.quic,
            &format!("[[peers]]\naddr = \"{}\"\n", a.quic),
        ),
    );
    c.wait_peer("node-a", UP);
    c.wait_gateway(UP);
    assert!(gw.stop().success());

    for _ in 0..500 {
        let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
            .await
            .expect("call");
        assert_eq!(code, 200);
    }
    let (_gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    assert_eq!(counted(admin, 500).await, 500);
    assert!(
        metrics(admin)
            .await
            .contains("starling_telemetry_gap_total{node=\"node-c\"} 0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_backlog_reports_its_gap() {
    let pki = Pki::new();
    let gw_conf = fixed_gateway_conf(&pki, None);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    // Two batches of backlog, one every 100 ms: the gateway's absence overflows it.
    let conf = node_conf(&pki, "node-c", gw.quic, echo);
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(
        &conf,
        src.replace(
            "interval_ms = 100",
            "interval_ms = 100\nbacklog_batches = 2",
        ),
    )
    .expect("conf");
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    assert!(gw.stop().success());
    for _ in 0..50 {
        let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
            .await
            .expect("call");
        assert_eq!(code, 200);
    }
    // Let the node cut batches into its full backlog: the gap is what this test is about.
    c.wait_status("dropping telemetry", UP, |s| {
        s["telemetry"]["dropped"].as_u64() >= Some(3)
    });
    let (_gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let gap = eventually(Duration::from_secs(20), async || {
        let text = metrics(admin).await;
        let line = text
            .lines()
            .find(|l| l.starts_with("starling_telemetry_gap_total{node=\"node-c\"}"))?;
        let gap: u64 = line.rsplit_once(' ')?.1.parse().ok()?;
        (gap >= 3).then_some(gap)
    })
    .await;
    assert!(gap.is_some(), "no gap reported:\n{}", metrics(admin).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_while_the_gateway_is_away_boots_under_its_last_policy() {
    let slow = HttpUpstream::start(Duration::from_secs(3)).await;
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    // Calls that set no deadline get 300 ms: visible as DeadlineExceeded from a slow upstream.
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 300\n").expect("policy");
    let (gw, admin) = gateway_with_policy(&pki, &policy_file);
    let svc = format!(
        "[[services]]\nname = \"slow\"\nupstream = \"http://{}\"\n",
        slow.addr
    );
    let conf = node_conf(&pki, "node-a", gw.quic, &svc);
    let a = NodeProc::start("node-a", &conf);
    assert!(all_at(admin, &["node-a"], 1).await);
    assert!(gw.stop().success());
    assert!(a.stop().success());

    let a = NodeProc::start("node-a", &conf);
    let booted = a.status();
    assert_eq!(
        (&booted["policy"]["version"], &booted["policy"]["source"]),
        (&serde_json::json!(1), &serde_json::json!("saved")),
        "{booted}"
    );
    let t = Instant::now();
    let (code, status, _) = post(a.ingress(), "slow", "x", Bytes::new(), None)
        .await
        .expect("call");
    assert_eq!((code, status.as_deref()), (504, Some("deadline_exceeded")));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the saved policy's timeout was not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_shown_down_then_removed() {
    let pki = Pki::new();
    let gw_conf = pki.gateway_config(
        "gw",
        "127.0.0.1:0",
        "[registry]\ndown_after_ms = 300\nremove_after_ms = 1500\n",
    );
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let a = NodeProc::start(
        "node-a",
        &node_conf(
            &pki,
            "node-a",
            gw.quic,
            "[limits]\nkeep_alive_ms = 200\nidle_timeout_ms = 600\n",
        ),
    );
    a.wait_gateway(UP);
    let node = |up: Option<bool>| async move {
        let (_, body) = http("GET", admin, "/v1/nodes", None, "").await;
        let json: serde_json::Value = serde_json::from_str(&body).expect("json");
        let found = json["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "node-a")
            .cloned();
        match (up, found) {
            (None, None) => Some(serde_json::Value::Null),
            (Some(u), Some(n)) if n["up"] == u => Some(n),
            _ => None,
        }
    };
    let shown = eventually(UP, async || node(Some(true)).await)
        .await
        .expect("node-a listed up");
    assert_eq!(shown["services"], serde_json::json!([]));
    assert!(
        shown["id"]
            .as_str()
            .is_some_and(|id| id.ends_with("/node/node-a"))
    );
    a.kill();
    assert!(
        eventually(UP, async || node(Some(false)).await)
            .await
            .is_some(),
        "never shown down"
    );
    assert!(
        eventually(UP, async || node(None).await).await.is_some(),
        "never removed"
    );
    assert!(
        metrics(admin).await.contains("starling_node_up")
            && !metrics(admin).await.contains("node=\"node-a\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_is_on_loopback_and_guards_changes() {
    let pki = Pki::new();
    let gw_conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    // The default admin address, read from a file that names none: loopback. (Parsed, not bound:
    // the machine's port 9480 may be anyone's.)
    let src = std::fs::read_to_string(&gw_conf).expect("conf");
    let defaults = mesh_gateway::GatewayConfig::parse(
        &src.replace("admin = \"127.0.0.1:0\"\n", ""),
        "gw.toml",
        &pki.dir.path().join("gw"),
    )
    .expect("config");
    assert_eq!(
        defaults.admin,
        "127.0.0.1:9480".parse::<SocketAddr>().expect("addr")
    );
    assert!(defaults.admin_warning().is_none());
    // The process, on a port of its own.
    let (_gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    assert!(admin.ip().is_loopback());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pki.dir.path().join("gw/admin.token"))
            .expect("token")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let (code, _) = http("PUT", admin, "/v1/policy", None, "").await;
    assert_eq!(code, 401);
    let (code, _) = http("GET", admin, "/v1/nodes", None, "").await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_calls_leave_traces_and_nodes_leave_audit_events() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 4000\n").expect("policy");
    let (gw, admin) = gateway_with_policy(&pki, &policy_file);
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, echo));
    // node-c samples nothing by itself: only the caller's traceparent makes this call traced.
    let conf = node_conf(
        &pki,
        "node-c",
        gw.quic,
        &format!("[[peers]]\naddr = \"{}\"\n", a.quic),
    );
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(
        &conf,
        src.replace("interval_ms = 100", "interval_ms = 100\ntrace_sample = 0.0"),
    )
    .expect("conf");
    let c = NodeProc::start("node-c", &conf);
    c.wait_peer("node-a", UP);
    assert!(all_at(admin, &["node-a", "node-c"], 1).await);

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let request = format!(
        "POST /v1/call/echo/say HTTP/1.1\r\nHost: x\r\ntraceparent: 00-{trace_id}-{parent}-01\r\n\
         Content-Length: 2\r\nConnection: close\r\n\r\nhi"
    );
    let mut stream = tokio::net::TcpStream::connect(c.ingress())
        .await
        .expect("ingress");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // An unsampled call leaves no trace.
    let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
        .await
        .expect("call");
    assert_eq!(code, 200);

    let trace = eventually(UP, async || {
        let (_, body) = http("GET", admin, "/v1/traces", None, "").await;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let t = json["traces"]
            .as_array()?
            .iter()
            .find(|t| t["trace_id"] == trace_id)?
            .clone();
        (t["spans"].as_array()?.len() == 2).then_some((t, json["traces"].as_array()?.len()))
    })
    .await;
    let (trace, count) = trace.expect("the traced call's two spans reached the gateway");
    assert_eq!(count, 1, "an unsampled call was traced");
    let spans = trace["spans"].as_array().expect("spans");
    let client = spans
        .iter()
        .find(|s| s["kind"] == "client")
        .expect("client span");
    let server = spans
        .iter()
        .find(|s| s["kind"] == "server")
        .expect("server span");
    assert_eq!(
        (client["node"].as_str(), server["node"].as_str()),
        (Some("node-c"), Some("node-a"))
    );
    assert_eq!(
        client["parent_span_id"], parent,
        "the caller's span continues the traceparent"
    );
    assert_eq!(server["parent_span_id"], client["span_id"]);
    assert_eq!(server["service"], "echo");

    // Each node's policy_applied event, as a JSON line in the gateway's audit log.
    let audit = pki.dir.path().join("gw/audit.jsonl");
    let lines = eventually(UP, async || {
        let text = std::fs::read_to_string(&audit).ok()?;
        let applied: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["kind"] == "policy_applied" && e["version"] == "1")
            .collect();
        (applied.len() >= 2).then_some(applied)
    })
    .await
    .expect("policy_applied audit events from both nodes");
    let nodes: std::collections::BTreeSet<&str> =
        lines.iter().filter_map(|e| e["node"].as_str()).collect();
    assert!(
        nodes.contains("node-a") && nodes.contains("node-c"),
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_identity_is_an_audit_event() {
    let pki = Pki::new();
    let (gw, _) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ""));
    a.wait_gateway(UP);
    let other = Pki::new();
    let _rogue = NodeProc::start(
        "rogue",
        &other.config("rogue", &format!("[[peers]]\naddr = \"{}\"\n", a.quic)),
    );
    a.wait_status("refusing a handshake", UP, |s| s["refused_handshakes"] != 0);
    let audit = pki.dir.path().join("gw/audit.jsonl");
    let event = eventually(UP, async || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["kind"] == "identity_refused")
    })
    .await
    .expect("an identity_refused audit event");
    assert_eq!(event["node"], "node-a");
    assert!(
        event["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not trusted")),
        "{event}"
    );
    assert!(
        event["remote"]
            .as_str()
            .is_some_and(|r| r.starts_with("127.0.0.1:")),
        "{event}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_lets_a_node_reach_services_beyond_its_link() {
    // node-a and node-c know only the gateway (no mDNS, no static peers between them): the
    // registry the gateway pushes is how node-c finds node-a.
    let pki = Pki::new();
    let (gw, admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let echo = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, echo));
    a.wait_gateway(UP);
    let c = NodeProc::start("node-c", &node_conf(&pki, "node-c", gw.quic, ""));
    c.wait_peer("node-a", UP);
    let (code, _, body) = post(c.ingress(), "echo", "say", Bytes::from_static(b"far"), None)
        .await
        .expect("call");
    assert_eq!((code, &body[..]), (200, &b"far"[..]));
    let (_, services) = http("GET", admin, "/v1/services", None, "").await;
    assert!(
        services.contains("\"echo\":[{\"node\":\"node-a\",\"up\":true}]"),
        "{services}"
    );
}

#[test]
fn gateway_check_config_checks_the_policy_too() {
    let pki = Pki::new();
    let conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    let policy = pki.dir.path().join("policy.toml");
    std::fs::write(&policy, "[defaults]\ncall_timeout_ms = 0\n").expect("policy");
    prepend(&conf, &format!("policy = \"{}\"\n", policy.display()));
    let out = Command::new(starling_tests::bin("mesh-gateway"))
        .arg("check-config")
        .arg(&conf)
        .output()
        .expect("mesh-gateway");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.toml:2: defaults.call_timeout_ms: must be greater than 0"),
        "{err}"
    );
    std::fs::write(&policy, "[defaults]\ncall_timeout_ms = 100\n").expect("policy");
    let out = Command::new(starling_tests::bin("mesh-gateway"))
        .arg("check-config")
        .arg(&conf)
        .output()
        .expect("mesh-gateway");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // mesh-node refuses the gateway's keys.
    let out = Command::new(starling_tests::bin("mesh-node"))
        .arg("check-config")
        .arg(&conf)
        .output()
        .expect("mesh-node");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("admin: not a key of a node's config (a gateway's key?")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_policy_only_from_its_pinned_gateway() {
    // Another mesh member claims the gateway role (it runs mesh-gateway, with a valid certificate
    // from the mesh CA) and is the node's only peer at first. The node is pinned to `gw`, which
    // starts later: only gw's control plane ever hears from the node.
    let pki = Pki::new();
    let (evil, evil_admin) =
        NodeProc::start_gateway("evil", &pki.gateway_config("evil", "127.0.0.1:0", ""));
    let gw_listen: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("addr");
    let gw_conf = pki.gateway_config("gw", &gw_listen.to_string(), "");
    let conf = node_conf(
        &pki,
        "node-a",
        gw_listen,
        &format!("[[peers]]\naddr = \"{}\"\n", evil.quic),
    );
    prepend(&conf, "gateway_name = \"gw\"\n");
    let a = NodeProc::start("node-a", &conf);
    a.wait_peer("evil", UP);
    let (_gw, gw_admin) = NodeProc::start_gateway("gw", &gw_conf);
    a.wait_peer("gw", UP);
    let status = a.wait_gateway(UP);
    assert_eq!(status["gateway"], gw_listen.to_string(), "{status}");
    let listed = |admin: SocketAddr| async move {
        let (_, body) = http("GET", admin, "/v1/nodes", None, "").await;
        body.contains("\"name\":\"node-a\"")
    };
    assert!(
        eventually(UP, async || listed(gw_admin).await.then_some(()))
            .await
            .is_some()
    );
    assert!(
        !listed(evil_admin).await,
        "the node opened a control stream to an unpinned gateway"
    );
    assert_eq!(a.status()["gateway_sessions"], 1);
}

// ---- Fail closed, lose nothing (issue 11) ----

const ECHO: &str = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";

/// The gateway's count of one node's telemetry gap.
fn gap_of(metrics: &str, node: &str) -> Option<u64> {
    metrics
        .lines()
        .find(|l| l.starts_with(&format!("starling_telemetry_gap_total{{node=\"{node}\"}}")))?
        .rsplit_once(' ')?
        .1
        .parse()
        .ok()
}

async fn calls(ingress: SocketAddr, service: &str, n: usize) {
    for _ in 0..n {
        let (code, _, _) = post(ingress, service, "say", Bytes::from_static(b"x"), None)
            .await
            .expect("call");
        assert_eq!(code, 200);
    }
}

/// The ok echo calls the gateway counts once it counts at least `n` (or after 20 s, whatever it
/// counts then).
async fn counted(admin: SocketAddr, n: u64) -> u64 {
    let count = async || {
        request_counts(&metrics(admin).await)
            .get(&key("echo", "say", "ok"))
            .copied()
            .unwrap_or(0)
    };
    match eventually(Duration::from_secs(20), async || {
        let c = count().await;
        (c >= n).then_some(c)
    })
    .await
    {
        Some(c) => c,
        None => count().await,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_across_a_node_restart_are_all_counted_at_the_gateway() {
    let pki = Pki::new();
    let (gw, admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let conf = node_conf(&pki, "node-c", gw.quic, ECHO);
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    calls(c.ingress(), "echo", 20).await;
    // A restart: the next process numbers its batches from 1 again.
    assert!(c.stop().success());
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    calls(c.ingress(), "echo", 40).await;
    assert_eq!(
        counted(admin, 60).await,
        60,
        "calls were lost across the restart"
    );
    assert_eq!(gap_of(&metrics(admin).await, "node-c"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_with_batches_unsent_is_a_counted_gap() {
    let pki = Pki::new();
    let gw_conf = fixed_gateway_conf(&pki, None);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let conf = node_conf(&pki, "node-c", gw.quic, ECHO);
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    assert!(gw.stop().success());
    calls(c.ingress(), "echo", 30).await;
    let status = c.wait_status("holding unsent batches", UP, |s| {
        s["telemetry"]["pending"].as_u64() >= Some(3)
    });
    let pending = status["telemetry"]["pending"].as_u64().expect("pending");
    c.kill();
    let (_gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    let gap = eventually(Duration::from_secs(20), async || {
        gap_of(&metrics(admin).await, "node-c").filter(|g| *g > 0)
    })
    .await
    .expect("the killed process's batches went missing without a gap");
    // At least what it held when killed (the progress file may trail by a cut or two).
    assert!(
        gap + 2 >= pending && gap <= pending + 40,
        "gap {gap}, pending {pending}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_save_a_policy_nacks_it_and_still_enforces_it() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    std::fs::write(&policy_file, "[authorization]\ndefault = \"deny\"\n").expect("policy");
    let (gw, admin) = gateway_with_policy(&pki, &policy_file);
    let conf = node_conf(&pki, "node-a", gw.quic, ECHO);
    // A folder where the node writes its temporary copy: every save fails, even as root.
    std::fs::create_dir_all(pki.dir.path().join("node-a/state/.policy.toml.tmp")).expect("mkdir");
    let a = NodeProc::start("node-a", &conf);
    let status = a.wait_status("holding version 1 unsaved", UP, |s| {
        s["policy"]["version"] == 1 && !s["policy"]["problem"].is_null()
    });
    let problem = status["policy"]["problem"].as_str().expect("problem");
    assert!(problem.contains("not saved"), "{problem}");
    // Enforced in memory all the same.
    let (code, _, _) = post(a.ingress(), "echo", "say", Bytes::new(), None)
        .await
        .expect("call");
    assert_eq!(code, 403);
    // The gateway does not show it current, and says why.
    let node = eventually(UP, async || {
        let status = policy_status(admin).await;
        status["nodes"]
            .as_array()?
            .iter()
            .find(|n| n["name"] == "node-a" && !n["error"].is_null())
            .cloned()
    })
    .await
    .expect("no refusal shown");
    assert_eq!(node["current"], false, "{node}");
    assert!(
        node["error"].as_str().expect("error").contains("not saved"),
        "{node}"
    );
    assert!(
        metrics(admin)
            .await
            .contains("starling_policy_error{node=\"node-a\"} 1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_saved_policy_never_lets_a_denied_call_through() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    // Deny by default, with a rule that lets the test's own probe through once fixed.
    std::fs::write(
        &policy_file,
        "[authorization]\ndefault = \"deny\"\n[[authorization.rules]]\nname = \"health\"\n\
         effect = \"allow\"\nservices = [\"health\"]\n",
    )
    .expect("policy");
    let gw_conf = fixed_gateway_conf(&pki, None);
    prepend(
        &gw_conf,
        &format!("policy = \"{}\"\n", policy_file.display()),
    );
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let conf = node_conf(&pki, "node-a", gw.quic, ECHO);
    let a = NodeProc::start("node-a", &conf);
    assert!(all_at(admin, &["node-a"], 1).await);
    assert!(a.stop().success());
    assert!(gw.stop().success());
    let saved = pki.dir.path().join("node-a/state/policy.toml");
    let good = std::fs::read(&saved).expect("saved");
    let header = good.iter().position(|b| *b == b'\n').expect("header") + 1;
    let second_line = header
        + good[header..]
            .iter()
            .position(|b| *b == b'\n')
            .expect("line")
        + 1;
    let damage: Vec<(&str, Vec<u8>)> = vec![
        ("cut at a line boundary", good[..second_line].to_vec()),
        (
            "random bytes",
            (0..300u32).map(|i| (i * 53 % 256) as u8).collect(),
        ),
        ("a flipped bit", {
            let mut b = good.clone();
            b[header + 3] ^= 0x20;
            b
        }),
    ];
    for (what, bytes) in damage {
        std::fs::write(&saved, bytes).expect("damage");
        let a = NodeProc::start("node-a", &conf);
        let status = a.status();
        assert_eq!(status["policy"]["source"], "damaged", "{what}: {status}");
        let (code, _, body) = post(a.ingress(), "echo", "say", Bytes::new(), None)
            .await
            .expect("call");
        let body = String::from_utf8_lossy(&body);
        assert_eq!(code, 403, "{what}: a denied call went through: {body}");
        assert!(body.contains("damaged"), "{body}");
        assert!(a.stop().success());
    }
    // The gateway returns: a good bundle, and the node serves under it again.
    let (_gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let a = NodeProc::start("node-a", &conf);
    let status = a.wait_status("under a good bundle", UP, |s| {
        s["policy"]["source"] == "gateway"
    });
    assert_eq!(status["policy"]["version"], 1);
    let (code, _, _) = post(a.ingress(), "echo", "say", Bytes::new(), None)
        .await
        .expect("call");
    assert_eq!(code, 403, "the policy itself denies echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rogue_version_number_never_locks_a_node_out_of_its_gateway() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 4000\n").expect("policy");
    let (gw, admin) = gateway_with_policy(&pki, &policy_file);
    let conf = node_conf(&pki, "node-a", gw.quic, ECHO);
    // The node holds a bundle numbered 2^64-1 from another epoch (a rogue's, or a lost gateway's).
    let rogue = "[authorization]\ndefault = \"deny\"\n";
    mesh_node::state::PolicyStore::new(&pki.dir.path().join("node-a/state"))
        .save(&mesh_node::state::SavedBundle {
            id: mesh_proto::control::BundleRef {
                epoch: 42,
                version: u64::MAX,
                hash: mesh_node::state::bundle_hash(rogue),
            },
            toml: rogue.into(),
        })
        .expect("save");
    let a = NodeProc::start("node-a", &conf);
    let status = a.wait_status("under the gateway's bundle", UP, |s| {
        s["policy"]["source"] == "gateway"
    });
    assert_eq!(status["policy"]["version"], 1);
    assert_ne!(status["policy"]["epoch"], 42);
    let gw_status = policy_status(admin).await;
    assert_eq!(status["policy"]["epoch"], gw_status["epoch"]);
    assert!(all_at(admin, &["node-a"], 1).await);
    let node = &policy_status(admin).await["nodes"][0];
    assert_eq!(node["current"], true, "{node}");
    drop(gw);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_lost_its_state_resets_its_nodes_to_a_new_epoch() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 4000\n").expect("policy");
    let gw_conf = fixed_gateway_conf(&pki, None);
    prepend(
        &gw_conf,
        &format!("policy = \"{}\"\n", policy_file.display()),
    );
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    assert!(all_at(admin, &["node-a"], 1).await);
    let first = policy_status(admin).await["epoch"].clone();
    assert!(gw.stop().success());
    std::fs::remove_dir_all(pki.dir.path().join("gw/state/gateway")).expect("lose the state");
    let (_gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let second = policy_status(admin).await["epoch"].clone();
    assert_ne!(first, second, "a rebuilt gateway kept the old epoch");
    let status = a.wait_status("in the new epoch", UP, |s| s["policy"]["epoch"] == second);
    assert_eq!(status["policy"]["version"], 1);
    let node = eventually(UP, async || {
        let s = policy_status(admin).await;
        let n = s["nodes"][0].clone();
        (n["current"] == true).then_some(n)
    })
    .await;
    assert!(node.is_some(), "{}", policy_status(admin).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_and_oversized_bundles_are_refused_and_a_dry_run_changes_nothing() {
    let pki = Pki::new();
    let policy_file = pki.dir.path().join("policy.toml");
    std::fs::write(&policy_file, "[defaults]\ncall_timeout_ms = 4000\n").expect("policy");
    let (_gw, admin) = gateway_with_policy(&pki, &policy_file);
    let token = pki.admin_token("gw");
    // `curl --data-binary @missing-file` sends nothing: refused, not "lift every rule".
    let (code, body) = http("PUT", admin, "/v1/policy", Some(&token), "").await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("an empty bundle is refused"), "{body}");
    // Over the bound: refused, naming it.
    let big = format!(
        "[defaults]\ncall_timeout_ms = 5\n# {}\n",
        "x".repeat(600 * 1024)
    );
    let (code, body) = http("PUT", admin, "/v1/policy", Some(&token), &big).await;
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("524288"), "{body}");
    // The file, too: a reload that is too big keeps the bundle in force.
    std::fs::write(&policy_file, &big).expect("policy");
    let audit = pki.dir.path().join("gw/audit.jsonl");
    let rejected = eventually(UP, async || {
        let text = std::fs::read_to_string(&audit).ok()?;
        text.lines()
            .find(|l| l.contains("policy_rejected") && l.contains("524288"))
            .map(str::to_owned)
    })
    .await;
    assert!(rejected.is_some(), "the oversized file was not refused");
    // A dry run shows the change and makes no version.
    let (code, body) = http(
        "PUT",
        admin,
        "/v1/policy?dry_run=1",
        Some(&token),
        "[defaults]\ncall_timeout_ms = 250\n",
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let run: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(
        (&run["changed"], &run["version"]),
        (&serde_json::json!(true), &serde_json::json!(2))
    );
    assert_eq!(run["added"][0], "call_timeout_ms = 250");
    assert_eq!(run["removed"][0], "call_timeout_ms = 4000");
    assert_eq!(
        run["diff"],
        serde_json::json!([
            "  [defaults]",
            "- call_timeout_ms = 4000",
            "+ call_timeout_ms = 250"
        ])
    );
    let (_, body) = http("GET", admin, "/v1/policy", None, "").await;
    let current: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(current["version"], 1);
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&audit).expect("audit").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the audit log is readable by others");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_method_names_fold_into_other_at_a_bounded_count_of_series() {
    let pki = Pki::new();
    let (gw, admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let conf = node_conf(&pki, "node-c", gw.quic, ECHO);
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(
        &conf,
        src.replace("interval_ms = 100", "interval_ms = 100\nmax_series = 20"),
    )
    .expect("conf");
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    for i in 0..300 {
        let (code, _, _) = post(c.ingress(), "echo", &format!("m{i}"), Bytes::new(), None)
            .await
            .expect("call");
        assert_eq!(code, 200);
    }
    let folded = eventually(Duration::from_secs(20), async || {
        let text = metrics(admin).await;
        text.contains("starling_telemetry_folded_total{node=\"node-c\"} 280\n")
            .then_some(text)
    })
    .await
    .expect("the folding was not counted");
    let series = folded
        .lines()
        .filter(|l| l.starts_with("starling_requests_total{") && l.contains("caller=\"node-c\""))
        .count();
    assert_eq!(series, 21, "20 methods and _other");
    assert!(folded.contains("method=\"_other\""));
    let other: u64 = folded
        .lines()
        .find(|l| l.starts_with("starling_requests_total{") && l.contains("method=\"_other\""))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .expect("_other count");
    assert_eq!(other, 280);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_runs_no_ingress_unless_its_file_asks() {
    let pki = Pki::new();
    let conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(&conf, src.replace("ingress = \"127.0.0.1:0\"\n", "")).expect("conf");
    let (gw, _) = NodeProc::start_gateway("gw", &conf);
    assert_eq!(gw.ingress, None);
    let lock = mesh_node::state::read_lock_file(&gw.state_dir).expect("lock");
    assert!(!lock.contains_key("ingress"), "{lock:?}");
}

#[test]
fn two_nodes_cannot_share_a_state_folder() {
    let pki = Pki::new();
    let a = NodeProc::start("node-a", &pki.config("node-a", ""));
    let conf_b = pki.config("node-b", "");
    let src = std::fs::read_to_string(&conf_b).expect("conf");
    let shared = a.state_dir.display().to_string();
    std::fs::write(
        &conf_b,
        src.replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{shared}\""),
        ),
    )
    .expect("conf");
    let out = Command::new(starling_tests::bin("mesh-node"))
        .args(["run", "--config"])
        .arg(&conf_b)
        .output()
        .expect("mesh-node");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "state dir {shared} is in use by node node-a (pid {})",
            a.pid()
        )),
        "{err}"
    );
}

/// A node under steady load whose gateway never answers keeps a flat heap: its telemetry backlog
/// is bounded in bytes (spans go first), whatever the sampling. Measured on both the caller and
/// the callee (which records the server side of sampled calls).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_under_steady_load_without_its_gateway_keeps_a_flat_heap() {
    let pki = Pki::new();
    // A gateway address nobody answers at.
    let nowhere: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("addr");
    let sampled = |conf: &Path| {
        let src = std::fs::read_to_string(conf).expect("conf");
        std::fs::write(
            conf,
            src.replace(
                "interval_ms = 100",
                "interval_ms = 50\ntrace_sample = 1.0\nmax_backlog_bytes = 262144",
            ),
        )
        .expect("conf");
    };
    let b_conf = node_conf(&pki, "node-b", nowhere, ECHO);
    sampled(&b_conf);
    let b = NodeProc::start("node-b", &b_conf);
    let a_conf = node_conf(
        &pki,
        "node-a",
        nowhere,
        &format!("[[peers]]\naddr = \"{}\"\n", b.quic),
    );
    sampled(&a_conf);
    let a = NodeProc::start("node-a", &a_conf);
    a.wait_peer("node-b", UP);
    let ingress = a.ingress();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (code, _, _) =
                        post(ingress, "echo", "say", Bytes::from_static(b"load"), None)
                            .await
                            .expect("call");
                    assert_eq!(code, 200);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let rss = |p: &NodeProc| starling_tests::rss_kib(p.pid()).expect("rss").1;
    // Let the backlog reach its bound, then watch the heap for 20 s.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let (a0, b0) = (rss(&a), rss(&b));
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (a1, b1) = (rss(&a), rss(&b));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut made = 0;
    for l in load {
        made += l.await.expect("load");
    }
    let status = a.status();
    eprintln!(
        "{made} calls; node-a RssAnon {a0} -> {a1} KiB, node-b {b0} -> {b1} KiB; backlog {status}"
    );
    assert!(
        made > 2000,
        "too little load to mean anything: {made} calls"
    );
    assert!(a1 <= a0 + 1536, "node-a grew from {a0} to {a1} KiB");
    assert!(b1 <= b0 + 1536, "node-b grew from {b0} to {b1} KiB");
    let telemetry = &status["telemetry"];
    assert!(
        telemetry["pending_bytes"].as_u64() <= Some(262_144),
        "{telemetry}"
    );
    assert!(
        telemetry["lost_items"].as_u64() > Some(0),
        "no span was dropped: {telemetry}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_before_its_first_cut_is_a_counted_gap() {
    let pki = Pki::new();
    let (gw, admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    // A batch a minute: the calls below are still in the interval being recorded when it dies.
    let conf = pki.config(
        "node-c",
        &format!("{ECHO}[telemetry]\ninterval_ms = 60000\n"),
    );
    prepend(&conf, &format!("gateway = \"{}\"\n", gw.quic));
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    calls(c.ingress(), "echo", 10).await;
    c.kill();
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    let gap = eventually(Duration::from_secs(20), async || {
        gap_of(&metrics(admin).await, "node-c").filter(|g| *g > 0)
    })
    .await;
    assert_eq!(
        gap,
        Some(1),
        "the interval the killed process was recording went missing without a gap"
    );
    // A stop on purpose hands its interval over: no gap.
    calls(c.ingress(), "echo", 5).await;
    assert!(c.stop().success());
    let c = NodeProc::start("node-c", &conf);
    c.wait_gateway(UP);
    assert_eq!(counted(admin, 5).await, 5);
    assert_eq!(gap_of(&metrics(admin).await, "node-c"), Some(1));
    drop(gw);
}
