//! The identity lifecycle: revocation, enrolment, renewal. Real `mesh-gateway` and `mesh-node`
//! processes on loopback, real certificates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_tests::{NodeProc, Pki, bin, free_udp_port, has_peer, http, post};

const UP: Duration = Duration::from_secs(10);
const FAST: &str = "[telemetry]\ninterval_ms = 100\n";
const ECHO: &str = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";

fn node_conf(pki: &Pki, name: &str, gw: std::net::SocketAddr, extra: &str) -> std::path::PathBuf {
    let path = pki.config(name, &format!("{extra}{FAST}"));
    let src = std::fs::read_to_string(&path).expect("config");
    std::fs::write(
        &path,
        src.replacen("[identity]", &format!("gateway = \"{gw}\"\n[identity]"), 1),
    )
    .expect("config");
    path
}

fn gateway_cli(args: &[&str], config: &Path) -> (bool, String, String) {
    let out = Command::new(bin("mesh-gateway"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("mesh-gateway runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_is_cut_off_by_every_node_within_two_seconds_until_lifted() {
    let pki = Pki::new();
    // A fixed port: the restarted gateway is found where it was.
    let gw_conf = pki.gateway_config("gw", &format!("127.0.0.1:{}", free_udp_port()), "");
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let a = NodeProc::start("node-a", &node_conf(&pki, "node-a", gw.quic, ECHO));
    let b = NodeProc::start("node-b", &node_conf(&pki, "node-b", gw.quic, ""));
    let c = NodeProc::start("node-c", &node_conf(&pki, "node-c", gw.quic, ""));
    // Everyone reaches everyone (the gateway is a static peer; the registry brings the rest).
    for n in [&a, &b, &c] {
        n.wait_peers(3, UP);
    }
    let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"hi"), None)
        .await
        .expect("call");
    assert_eq!(code, 200, "node-c calls before it is revoked");

    let (ok, out, err) = gateway_cli(&["revoke", "node-c", "--reason", "stolen"], &gw_conf);
    assert!(ok, "revoke failed: {out}{err}");
    let revoked_at = Instant::now();
    assert!(
        out.contains("spiffe://starling.local/node/node-c revoked"),
        "{out}"
    );
    // Every node, and the gateway, closes its connections to node-c.
    for n in [&a, &b] {
        n.wait_peer_gone("node-c", UP);
    }
    let gw_nodes = async || http("GET", admin, "/v1/nodes", None, "").await.1;
    gw.wait_peer_gone("node-c", UP);
    let took = revoked_at.elapsed();
    eprintln!("revoke to the last connection closed: {took:?}");
    assert!(
        took < Duration::from_secs(2),
        "the last connection to the revoked node closed after {took:?}"
    );
    // Its calls are refused: no node keeps a connection with it.
    let (code, _, _) = post(c.ingress(), "echo", "say", Bytes::from_static(b"hi"), None)
        .await
        .expect("call");
    assert_ne!(code, 200, "a revoked node's call went through");
    let status = c.wait_status("told it is revoked", UP, |s| !s["revoked"].is_null());
    assert_eq!(
        status["peers"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    // The registry says so, with the serial of the certificate it was seen with.
    let nodes: serde_json::Value = serde_json::from_str(&gw_nodes().await).expect("json");
    let entry = nodes["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "node-c"))
        .cloned()
        .expect("node-c in the registry");
    assert_eq!(entry["revoked"], true, "{entry}");
    let serial = entry["certificate"]["serial"].as_str().expect("serial");
    let (_, list) = http("GET", admin, "/v1/revocations", None, "").await;
    assert!(list.contains(serial) && list.contains("stolen"), "{list}");
    // Others are not touched.
    assert!(has_peer(&a.status(), "node-b") && has_peer(&b.status(), "node-a"));

    // The gateway restarted keeps the deny list.
    drop(gw);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    gw.wait_peer("node-a", UP);
    assert!(!has_peer(&gw.status(), "node-c"));

    // Lifted: node-c is back.
    let (ok, out, err) = gateway_cli(&["revoke", "--lift", "node-c"], &gw_conf);
    assert!(ok, "lift failed: {out}{err}");
    a.wait_peer("node-c", Duration::from_secs(15));
}
