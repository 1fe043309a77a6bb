//! The operator's view (issue 16): what an operator reads of a running mesh, tested on the real
//! binaries.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use starling_tests::{Pki, bin, prepend};

/// Runs `program run --config <config>` until its state folder's lock file says it listens, then
/// stops it with SIGTERM; returns what it wrote on stderr.
fn run_until_listening(program: &str, config: &std::path::Path, state: &std::path::Path) -> String {
    let child = Command::new(bin(program))
        .args(["run", "--config"])
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !mesh_node::state::read_lock_file(state).is_some_and(|l| l.contains_key("quic")) {
        assert!(Instant::now() < deadline, "{program} never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{program} exited with {}", out.status);
    String::from_utf8(out.stderr).expect("utf-8 logs")
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
