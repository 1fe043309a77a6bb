//! The operator's view (issue 16): what an operator reads of a running mesh, tested on the real
//! binaries.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use starling_tests::{Pki, bin, prepend};

/// Runs `program run --config <config>` until its state folder's lock file says it listens, then
/// stops it with SIGTERM; returns what it wrote on stderr.
fn run_until_listening(program: &str, config: &std::path::Path, state: &std::path::Path) -> String {
    run_until_listening_with(program, config, state, None)
}

/// [`run_until_listening`], with `RUST_LOG` set to `rust_log` (else unset).
fn run_until_listening_with(
    program: &str,
    config: &std::path::Path,
    state: &std::path::Path,
    rust_log: Option<&str>,
) -> String {
    let mut command = Command::new(bin(program));
    match rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = command
        .args(["run", "--config"])
        .arg(config)
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    // The lock file of this process: an earlier run's stays behind.
    let pid = child.id().to_string();
    while !mesh_node::state::read_lock_file(state)
        .is_some_and(|l| l.get("pid") == Some(&pid) && l.contains_key("quic"))
    {
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("{program} never listened");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{program} exited with {}", out.status);
    String::from_utf8(out.stderr).expect("utf-8 logs")
}

/// The log filter sets levels by module, from the config or from `RUST_LOG`; an invalid
/// `RUST_LOG` is said in the log and the config's filter holds. (Log lines are what this feature
/// makes, so the test reads them.)
#[test]
fn the_log_filter_sets_levels_by_module() {
    let pki = Pki::new();
    let config = pki.config("node-a", "");
    let state = pki.dir.path().join("node-a/state");
    let src = std::fs::read_to_string(&config).expect("config");
    assert!(src.contains("log = \"info\""), "{src}");
    let with_filter = |filter: &str| {
        std::fs::write(
            &config,
            src.replace(
                "log = \"info\"",
                &format!("log = \"{filter}\"\nlog_format = \"json\""),
            ),
        )
        .expect("config");
    };
    let levels = |logs: &str| -> Vec<(String, String)> {
        logs.lines()
            .map(|l| {
                let e: serde_json::Value =
                    serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
                let field = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
                (field(&e["level"]), field(&e["fields"]["message"]))
            })
            .collect()
    };

    // Warnings only: the node's start (logged at info) is not shown.
    with_filter("warn");
    let logs = levels(&run_until_listening("mesh-node", &config, &state));
    assert!(
        logs.iter().all(|(l, _)| l == "WARN" || l == "ERROR"),
        "{logs:?}"
    );

    // Info for mesh-node's own modules.
    with_filter("warn,mesh_node=info");
    let logs = levels(&run_until_listening("mesh-node", &config, &state));
    assert!(
        logs.iter()
            .any(|(l, m)| l == "INFO" && m.contains("quic listening on")),
        "{logs:?}"
    );

    // RUST_LOG overrides the config's filter.
    let logs = levels(&run_until_listening_with(
        "mesh-node",
        &config,
        &state,
        Some("error"),
    ));
    assert!(logs.iter().all(|(l, _)| l == "ERROR"), "{logs:?}");

    // An invalid RUST_LOG (a word that is not a level) is said, and the config's filter holds.
    let logs = levels(&run_until_listening_with(
        "mesh-node",
        &config,
        &state,
        Some("warning"),
    ));
    assert!(
        logs.iter().any(|(l, m)| l == "ERROR"
            && m.contains("RUST_LOG ignored")
            && m.contains("\"warning\"")),
        "{logs:?}"
    );
    assert!(
        logs.iter()
            .any(|(l, m)| l == "INFO" && m.contains("quic listening on")),
        "{logs:?}"
    );
}

/// `log_format = "json"`: every line a node and a gateway write is one JSON object with the same
/// keys (a timestamp, a level, the message), from the first line to the last.
#[test]
fn json_logs_are_one_object_a_line_with_stable_keys() {
    let pki = Pki::new();
    let node = pki.config("node-a", "");
    prepend(&node, "log_format = \"json\"\n");
    let gateway = pki.gateway_config("gw", "127.0.0.1:0", "");
    prepend(&gateway, "log_format = \"json\"\n");
    for (program, config, state) in [
        ("mesh-node", &node, pki.dir.path().join("node-a/state")),
        ("mesh-gateway", &gateway, pki.dir.path().join("gw/state")),
    ] {
        let logs = run_until_listening(program, config, &state);
        let lines: Vec<&str> = logs.lines().collect();
        assert!(lines.len() >= 3, "{program} wrote {logs:?}");
        for line in &lines {
            let event: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{program}: not JSON ({e}): {line}"));
            assert!(event["timestamp"].is_string(), "{program}: {line}");
            assert!(
                ["ERROR", "WARN", "INFO", "DEBUG", "TRACE"]
                    .contains(&event["level"].as_str().unwrap_or("")),
                "{program}: {line}"
            );
            assert!(event["fields"]["message"].is_string(), "{program}: {line}");
        }
        assert!(
            lines.iter().any(|l| l.contains("quic listening on")),
            "{program}: {logs}"
        );
    }

    // A bad value names the file, the line and the key.
    let bad = pki.config("node-b", "");
    prepend(&bad, "log_format = \"yaml\"\n");
    let (ok, out) =
        starling_tests::run_bin("mesh-node", &["check-config", &bad.display().to_string()]);
    assert!(!ok);
    assert!(
        out.contains("node.toml:6: log_format: \"yaml\": the log format is \"text\" or \"json\""),
        "{out}"
    );
}

/// Runs `mesh-gateway <args>`: its exit code and stdout (stderr after it).
fn gateway_cli(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin("mesh-gateway"))
        .args(args)
        .output()
        .expect("mesh-gateway");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `mesh-gateway status` and `nodes`: exit 0 with every node listed while all is well; exit 1
/// naming the node when one is down, and naming the node and its reason when a policy is refused;
/// exit 3 when the gateway cannot be reached. `--config` and `--admin` find the same gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_what_is_wrong_first_and_exits_accordingly() {
    use starling_tests::{eventually, http};
    const UP: Duration = Duration::from_secs(10);
    let pki = Pki::new();
    let (gw, admin) = starling_tests::quick_gateway(&pki, "");
    let gw_conf = pki.dir.path().join("gw/node.toml");
    let node = |name: &str, extra: &str| starling_tests::gateway_node(&pki, &gw, name, extra);
    let _a = node(
        "node-a",
        "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
    );
    let b = node("node-b", "");
    let all_up = eventually(UP, async || {
        let (_, body) = http("GET", admin, "/v1/nodes", None, "").await;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let nodes = json["nodes"].as_array()?;
        (nodes.len() == 2 && nodes.iter().all(|n| n["up"] == true)).then_some(())
    })
    .await;
    assert!(all_up.is_some(), "the nodes never joined");
    let config = gw_conf.display().to_string();
    let url = format!("http://{admin}");

    let (code, out) = gateway_cli(&["status", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK: nothing wrong"), "{out}");
    assert!(
        out.contains("node-a") && out.contains("node-b") && out.contains("echo"),
        "{out}"
    );
    let (code, out) = gateway_cli(&["nodes", "--admin", &url, "--json"]);
    assert_eq!(code, 0, "{out}");
    let listed: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(listed["nodes"].as_array().map(Vec::len), Some(2), "{out}");

    // node-b dies: status says so first, and fails.
    b.kill();
    let down = eventually(UP, async || {
        let (code, out) = gateway_cli(&["status", "--admin", &url]);
        (code == 1).then_some(out)
    })
    .await
    .expect("status never saw node-b down");
    assert!(
        down.starts_with("WRONG: 1 problem(s)\n  x node node-b is down"),
        "{down}"
    );
    let (code, out) = gateway_cli(&["nodes", "--config", &config]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("DOWN"), "{out}");

    // A bundle node-a cannot apply: status names it and the reason.
    let token = pki.admin_token("gw");
    let (code, _) = http(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "min_node_version = \"99.0.0\"\n",
    )
    .await;
    assert_eq!(code, 200);
    let nack = eventually(UP, async || {
        let (code, out) = gateway_cli(&["status", "--config", &config, "--json"]);
        let report: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
        let said = report["problems"].as_array()?.iter().any(|p| {
            p.as_str()
                .is_some_and(|p| p.contains("node node-a refused the policy"))
        });
        (code == 1 && said).then_some(report)
    })
    .await
    .expect("status never named the refused policy");
    assert_eq!(nack["healthy"], false);

    // No gateway there: exit 3.
    let (code, out) = gateway_cli(&[
        "status",
        "--admin",
        &format!("http://127.0.0.1:{}", starling_tests::closed_tcp_port()),
    ]);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("cannot reach"), "{out}");
    drop(gw);
}

/// `mesh-node status`: a node's own view on one screen, what is wrong first: exit 0 while it has
/// its gateway, 1 once it lost it (saying so), 3 when the node cannot be reached; `--json` is the
/// node's status as it answers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_node_status_says_what_is_wrong_first() {
    use starling_tests::NodeProc;
    const UP: Duration = Duration::from_secs(10);
    let pki = Pki::new();
    let (gw, _admin) = NodeProc::start_gateway("gw", &pki.gateway_config("gw", "127.0.0.1:0", ""));
    let path = pki.config(
        "node-a",
        "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
    );
    prepend(&path, &format!("gateway = \"{}\"\n", gw.quic));
    let a = NodeProc::start("node-a", &path);
    a.wait_gateway(UP);
    let ingress = a.ingress().to_string();
    let node_status = |extra: &[&str]| {
        let out = Command::new(bin("mesh-node"))
            .args(["status", "--ingress", &ingress])
            .args(extra)
            .output()
            .expect("mesh-node status");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = node_status(&[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("OK: nothing wrong"), "{out}");
    assert!(
        out.contains("gateway: connected to") && out.contains("hosts: echo"),
        "{out}"
    );
    let (code, out) = node_status(&["--json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(json["name"], "node-a");

    gw.kill();
    let deadline = Instant::now() + UP;
    let lost = loop {
        let (code, out) = node_status(&[]);
        if code == 1 {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "status never saw the gateway go: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        lost.starts_with("WRONG: 1 problem(s)\n  x it lost its gateway"),
        "{lost}"
    );

    let (code, _) = Command::new(bin("mesh-node"))
        .args([
            "status",
            "--ingress",
            &format!("127.0.0.1:{}", starling_tests::closed_tcp_port()),
        ])
        .output()
        .map(|o| (o.status.code().unwrap_or(-1), ()))
        .expect("mesh-node status");
    assert_eq!(code, 3);
}

/// Under systemd (`Type=notify`, `WatchdogSec`): a node says READY=1 once it serves, WATCHDOG=1
/// every half of the watchdog interval while its runtime runs, and STOPPING=1 when told to stop.
/// The test plays systemd's part on a Unix datagram socket of its own.
#[test]
fn a_node_speaks_systemds_notification_protocol() {
    use std::os::unix::net::UnixDatagram;
    let pki = Pki::new();
    let config = pki.config("node-a", "");
    let socket_path = pki.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let child = Command::new(bin("mesh-node"))
        .args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mesh-node");
    let mut child = starling_tests::KillOnDrop(child);
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), "READY=1");
    // It was ready only once it listened.
    let lock =
        mesh_node::state::read_lock_file(&pki.dir.path().join("node-a/state")).expect("lock file");
    assert!(
        lock.contains_key("quic") && lock.contains_key("ingress"),
        "{lock:?}"
    );
    let started = Instant::now();
    for _ in 0..3 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "three pings took {:?} (every 100 ms asked)",
        started.elapsed()
    );
    let _ = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status();
    let stopping = loop {
        let msg = next();
        if msg != "WATCHDOG=1" {
            break msg;
        }
    };
    assert_eq!(stopping, "STOPPING=1");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status}");
}

/// Policy history: every accepted bundle is kept with its source and author, across restarts;
/// `policy diff` shows what changed between two versions and `policy rollback` puts an old one in
/// force again as the next version, which the nodes take.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_history_diff_and_rollback() {
    use starling_tests::{NodeProc, http};
    const UP: Duration = Duration::from_secs(10);
    let pki = Pki::new();
    let file = pki.dir.path().join("policy.toml");
    let v1 = "[authorization]\ndefault = \"allow\"\n";
    std::fs::write(&file, v1).expect("policy");
    let conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    prepend(&conf, &format!("policy = \"{}\"\n", file.display()));
    let (gw, admin) = NodeProc::start_gateway("gw", &conf);
    let node = pki.config("node-a", "");
    prepend(&node, &format!("gateway = \"{}\"\n", gw.quic));
    let a = NodeProc::start("node-a", &node);
    a.wait_policy(1, UP);
    // A named admin token for Alice: the history and the audit log say it was her.
    let config = conf.display().to_string();
    let (code, out) = gateway_cli(&[
        "admin-token",
        "create",
        "--name",
        "alice",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{out}");
    let alice = out.lines().last().expect("token").trim().to_owned();
    assert!(alice.starts_with("sgt_"), "{out}");
    let v2 = "[authorization]\ndefault = \"deny\"\n";
    let (code, _) = http("PUT", admin, "/v1/policy", Some(&alice), v2).await;
    assert_eq!(code, 200);
    a.wait_policy(2, UP);
    // A named token manages no tokens: it cannot make itself a successor.
    let (code, _) = http(
        "POST",
        admin,
        "/v1/admin-tokens",
        Some(&alice),
        r#"{"name":"mallory"}"#,
    )
    .await;
    assert_eq!(code, 403);

    let (code, out) = gateway_cli(&["policy", "history", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    let rows: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(
        rows[0].trim_start().starts_with("2 ")
            && rows[0].contains("api")
            && rows[0].contains("alice"),
        "{out}"
    );
    // The audit log is written by its own thread: wait for both events.
    let audit_file = pki.dir.path().join("gw/audit.jsonl");
    let audit = starling_tests::eventually(UP, async || {
        let audit = std::fs::read_to_string(&audit_file).ok()?;
        let has = |kind: &str| {
            audit
                .lines()
                .any(|l| l.contains(kind) && l.contains("\"alice\""))
        };
        (has("policy_accepted") && has("admin_token_created")).then_some(())
    })
    .await;
    assert!(
        audit.is_some(),
        "{}",
        std::fs::read_to_string(&audit_file).unwrap_or_default()
    );
    assert!(
        rows[1].trim_start().starts_with("1 ")
            && rows[1].contains("file")
            && rows[1].contains("policy.toml"),
        "{out}"
    );

    let (code, out) = gateway_cli(&["policy", "diff", "1", "2", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim_end(),
        "--- version 1\n+++ version 2\n  [authorization]\n- default = \"allow\"\n+ default = \"deny\""
    );

    // A dry run of a file against the policy in force: the diff, and nothing changes.
    let candidate = pki.dir.path().join("candidate.toml");
    std::fs::write(&candidate, "[authorization]\ndefault = \"allow\"\n").expect("candidate");
    let candidate = candidate.display().to_string();
    let (code, out) = gateway_cli(&["policy", "dry-run", &candidate, "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        out.trim_end(),
        "it would be version 3:\n  [authorization]\n- default = \"deny\"\n+ default = \"allow\""
    );
    let (code, out) = gateway_cli(&["policy", "rollback", "1", "--config", &config]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("in force again as version 3"), "{out}");
    a.wait_policy(3, UP);
    let (_, body) = http("GET", admin, "/v1/policy", None, "").await;
    let current: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(current["toml"], v1);

    // Kept across a restart of the gateway.
    let state = pki.dir.path().join("gw/state/gateway");
    drop(gw);
    let (_gw, admin) = NodeProc::start_gateway("gw", &conf);
    let (_, body) = http("GET", admin, "/v1/policy/history", None, "").await;
    let history: serde_json::Value = serde_json::from_str(&body).expect("json");
    let versions: Vec<u64> = history["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["version"].as_u64())
        .collect();
    assert_eq!(versions, [3, 2, 1]);
    assert!(state.join("policy-history.json").exists());
    let (code, _) = http("GET", admin, "/v1/policy/history/9", None, "").await;
    assert_eq!(code, 404);

    // Alice's token survived the restart (as a hash: the file does not hold it); once revoked it
    // stops working at once.
    let kept = std::fs::read_to_string(state.join("admin-tokens.json")).expect("tokens file");
    assert!(kept.contains("alice") && !kept.contains(&alice), "{kept}");
    let dry_run = async || {
        http("PUT", admin, "/v1/policy?dry_run=1", Some(&alice), v1)
            .await
            .0
    };
    assert_eq!(dry_run().await, 200);
    let (code, out) = gateway_cli(&["admin-token", "list", "--config", &config]);
    assert!(code == 0 && out.contains("alice"), "{out}");
    // A change under way with alice's token when she is revoked: its body arrives after the
    // revocation, and nothing changes.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let bundle = "[authorization]\ndefault = \"deny\"\n# late\n";
    let mut slow = tokio::net::TcpStream::connect(admin).await.expect("admin");
    slow.write_all(
        format!(
            "PUT /v1/policy HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            bundle.len()
        )
        .as_bytes(),
    )
    .await
    .expect("head");
    let (_, before) = http("GET", admin, "/v1/policy", None, "").await;
    let (code, out) = gateway_cli(&[
        "admin-token",
        "revoke",
        "--name",
        "alice",
        "--config",
        &config,
    ]);
    assert_eq!(code, 0, "{out}");
    slow.write_all(bundle.as_bytes()).await.expect("body");
    let mut answer = String::new();
    slow.read_to_string(&mut answer).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let (_, after) = http("GET", admin, "/v1/policy", None, "").await;
    assert_eq!(after, before, "a revoked token changed the policy");
    assert_eq!(dry_run().await, 401);
    let (code, out) = gateway_cli(&["admin-token", "list", "--config", &config]);
    assert!(code == 0 && !out.contains("alice"), "{out}");
}
