//! The identity lifecycle: revocation, enrolment, renewal. Real `mesh-gateway` and `mesh-node`
//! processes on loopback, real certificates.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rustls_pki_types::pem::PemObject;
use starling_tests::{NodeProc, Pki, bin, free_udp_port, has_peer, http, post, prepend, run_bin};

const UP: Duration = Duration::from_secs(10);
const FAST: &str = "[telemetry]\ninterval_ms = 100\n";
const ECHO: &str = "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n";

fn node_conf(pki: &Pki, name: &str, gw: std::net::SocketAddr, extra: &str) -> std::path::PathBuf {
    let path = pki.config(name, &format!("{extra}{FAST}"));
    prepend(&path, &format!("gateway = \"{gw}\"\n"));
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
    let c_conf = node_conf(&pki, "node-c", gw.quic, "");
    let c = NodeProc::start("node-c", &c_conf);
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
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    gw.wait_peer("node-a", UP);
    assert!(!has_peer(&gw.status(), "node-c"));

    // Lifted: the identity may come back, with a new certificate only.
    let (ok, out, err) = gateway_cli(&["revoke", "--lift", "node-c"], &gw_conf);
    assert!(
        ok && out.contains("stay revoked by serial"),
        "lift failed: {out}{err}"
    );
    let (_, policy) = http("GET", admin, "/v1/policy", None, "").await;
    let policy: serde_json::Value = serde_json::from_str(&policy).expect("json");
    a.wait_policy(policy["version"].as_u64().expect("version"), UP);
    assert!(
        !has_peer(&a.status(), "node-c"),
        "the revoked certificate came back"
    );
    drop(c);
    std::fs::remove_dir_all(pki.dir.path().join("node-c/certs")).expect("old certs");
    pki.node_dir("node-c");
    let _c = NodeProc::start("node-c", &c_conf);
    a.wait_peer("node-c", Duration::from_secs(15));
}

#[test]
fn a_site_issuer_signs_nodes_under_the_offline_root() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let run = |args: &[&str]| run_bin("mesh-gateway", args);
    let path = |p: &str| dir.join(p).display().to_string();
    let (ok, out) = run(&[
        "ca",
        "init",
        "--trust-domain",
        "site.test",
        "--out",
        &path("root"),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[
        "ca",
        "issuer",
        "--ca",
        &path("root"),
        "--name",
        "gw",
        "--out",
        &path("gw/issuer"),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("site issuer gw of spiffe://site.test"),
        "{out}"
    );
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(dir.join(p))
            .expect(p)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("gw/issuer/issuer.key"), 0o600);
    // A node issued by the site issuer, one issued by the root: they trust each other.
    let (ok, out) = run(&[
        "ca",
        "issue",
        "--issuer",
        &path("gw/issuer"),
        "--name",
        "node-a",
        "--out",
        &path("node-a/certs"),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = run(&[
        "ca",
        "issue",
        "--ca",
        &path("root"),
        "--name",
        "node-b",
        "--out",
        &path("node-b/certs"),
    ]);
    assert!(ok, "{out}");
    let chain = std::fs::read_to_string(dir.join("node-a/certs/node.crt")).expect("chain");
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf and issuer"
    );
    let a = NodeProc::start(
        "node-a",
        &pki.write_config(dir.join("node-a"), "node-a", ""),
    );
    let b_conf = pki.write_config(
        dir.join("node-b"),
        "node-b",
        &format!("[[peers]]\naddr = \"{}\"\n", a.quic),
    );
    let b = NodeProc::start("node-b", &b_conf);
    b.wait_peer("node-a", UP);
    a.wait_peer("node-b", UP);

    // An issuer makes no issuer; a root made with path length 0 (before issuers) makes none
    // either, and says why.
    let (ok, out) = run(&[
        "ca",
        "issuer",
        "--ca",
        &path("gw/issuer"),
        "--name",
        "x",
        "--out",
        &path("x"),
    ]);
    assert!(!ok, "{out}");
    let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://old.test".try_into().expect("uri"),
    )];
    let cert = params.self_signed(&old).expect("root");
    std::fs::create_dir_all(dir.join("old")).expect("dir");
    std::fs::write(dir.join("old/ca.crt"), cert.pem()).expect("write");
    std::fs::write(dir.join("old/ca.key"), old.serialize_pem()).expect("write");
    let (ok, out) = run(&[
        "ca",
        "issuer",
        "--ca",
        &path("old"),
        "--name",
        "gw",
        "--out",
        &path("old-issuer"),
    ]);
    assert!(!ok && out.contains("path length 0"), "{out}");
}

/// A gateway with a site issuer issuing certificates of `lifetime_s`, on a fixed port; its
/// config's path.
fn issuing_gateway(pki: &Pki, lifetime_s: u64) -> std::path::PathBuf {
    issuing_gateway_and_issuer(pki, lifetime_s).0
}

fn issuing_gateway_and_issuer(
    pki: &Pki,
    lifetime_s: u64,
) -> (std::path::PathBuf, mesh_gateway::ca::Ca) {
    let issuer = pki.issuer("gw");
    let conf = pki.gateway_config(
        "gw",
        &format!("127.0.0.1:{}", free_udp_port()),
        &format!(
            "[issuer]\ncert = \"issuer/issuer.crt\"\nkey = \"issuer/issuer.key\"\n\
             lifetime_s = {lifetime_s}\n"
        ),
    );
    (conf, issuer)
}

/// Node `name` with a certificate of `lifetime` from `issuer`, linked to the gateway at `gw`.
fn short_lived_node(
    pki: &Pki,
    issuer: &mesh_gateway::ca::Ca,
    name: &str,
    lifetime: Duration,
    gw: std::net::SocketAddr,
    extra: &str,
) -> NodeProc {
    let dir = pki.node_dir_from(issuer, name, lifetime);
    let conf = pki.write_config(dir, name, &format!("{extra}{FAST}"));
    prepend(&conf, &format!("gateway = \"{gw}\"\n"));
    NodeProc::start(name, &conf)
}

fn token(gw_conf: &Path, name: &str, more: &[&str]) -> String {
    let mut args = vec!["token", "create", "--name", name];
    args.extend_from_slice(more);
    let (ok, out, err) = gateway_cli(&args, gw_conf);
    assert!(ok, "token create: {out}{err}");
    out.lines().last().expect("token line").trim().to_owned()
}

fn enroll(gw: std::net::SocketAddr, token: &str, out: &Path, name: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(bin("mesh-node"));
    cmd.args([
        "enroll",
        "--gateway",
        &gw.to_string(),
        "--token",
        token,
        "--out",
    ])
    .arg(out);
    if let Some(name) = name {
        cmd.args(["--name", name]);
    }
    let out = cmd.output().expect("mesh-node runs");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrols_with_a_one_time_token_and_joins() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let gw_conf = issuing_gateway(&pki, 7 * 86_400);
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let dir = pki.dir.path();

    let t = token(
        &gw_conf,
        "node-7",
        &["--labels", "zone=hall-1", "--ttl", "1h"],
    );
    let certs = dir.join("node-7/certs");
    let (ok, out) = enroll(gw.quic, &t, &certs, Some("node-7"));
    assert!(ok, "{out}");
    assert!(
        out.contains("enrolled as spiffe://starling.local/node/node-7"),
        "{out}"
    );
    let mode = |f: &str| {
        std::fs::metadata(certs.join(f))
            .expect(f)
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("node.key"), 0o600);
    // The certificate certifies the key made on the device, the token's labels, and chains
    // through the site issuer to the root.
    let identity = mesh_node::Identity::load(
        &certs.join("node.crt"),
        &certs.join("node.key"),
        &certs.join("ca.crt"),
    )
    .expect("the enrolled files make an identity");
    assert_eq!(
        identity.labels.get("zone").map(String::as_str),
        Some("hall-1")
    );
    assert_eq!(identity.chain().len(), 2, "leaf and site issuer");
    // It joins.
    let conf = pki.write_config(
        dir.join("node-7"),
        "node-7",
        &format!("{FAST}[labels]\nzone = \"hall-1\"\n"),
    );
    prepend(&conf, &format!("gateway = \"{}\"\n", gw.quic));
    let node = NodeProc::start("node-7", &conf);
    node.wait_gateway(UP);

    // The same token again, an unknown one, a token for another name, a wrong fingerprint.
    let (ok, out) = enroll(gw.quic, &t, &dir.join("again"), None);
    assert!(!ok && out.contains("used already"), "{out}");
    let unknown = format!(
        "{}{}",
        &t[..t.len() - 4],
        if t.ends_with("0000") { "1111" } else { "0000" }
    );
    let (ok, out) = enroll(gw.quic, &unknown, &dir.join("unknown"), None);
    assert!(!ok && out.contains("unknown join token"), "{out}");
    let other = token(&gw_conf, "node-8", &[]);
    let (ok, out) = enroll(gw.quic, &other, &dir.join("other"), Some("node-9"));
    assert!(
        !ok && out.contains("the request is for \"node-9\""),
        "{out}"
    );
    let fresh = token(&gw_conf, "node-10", &[]);
    let mut forged = fresh.clone().into_bytes();
    forged[4] = if forged[4] == b'0' { b'1' } else { b'0' };
    let forged = String::from_utf8(forged).expect("utf-8");
    let (ok, out) = enroll(gw.quic, &forged, &dir.join("forged"), None);
    assert!(
        !ok && out.contains("wrong CA fingerprint") && out.contains("nothing secret was sent"),
        "{out}"
    );
    // The fingerprint check sent nothing: the token is still good.
    let (ok, out) = enroll(gw.quic, &fresh, &dir.join("node-10"), None);
    assert!(ok, "{out}");
    // An expired token.
    let short = token(&gw_conf, "node-11", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1100)); // the token's lifetime itself
    let (ok, out) = enroll(gw.quic, &short, &dir.join("node-11"), None);
    assert!(!ok && out.contains("expired"), "{out}");
    for refused in ["again", "unknown", "other", "forged", "node-11"] {
        assert!(
            !dir.join(refused).join("node.key").exists(),
            "{refused}: a key was kept"
        );
    }
    // Every enrolment and refusal is an audit event.
    let audit = std::fs::read_to_string(dir.join("gw/audit.jsonl")).expect("audit log");
    assert_eq!(audit.matches("\"enrolled\"").count(), 2, "{audit}");
    assert_eq!(audit.matches("\"enrolment_refused\"").count(), 4, "{audit}");
    // The registry shows its certified labels.
    let (_, nodes) = http("GET", admin, "/v1/nodes", None, "").await;
    assert!(
        nodes.contains("\"labels\":{\"zone\":\"hall-1\"}"),
        "{nodes}"
    );
}

#[test]
fn the_private_key_never_leaves_the_device() {
    use mesh_proto::enroll::EnrollUp;
    let request = mesh_node::identity::enroll::Request::new(Some("node-7")).expect("request");
    let key =
        rustls_pki_types::PrivateKeyDer::from_pem_slice(request.key_pem.as_bytes()).expect("key");
    let der = key.secret_der().to_vec();
    // What the device sends: the token's secret and the request.
    let mut frame = Vec::new();
    mesh_proto::encode_frame_vec(
        &EnrollUp::Join {
            secret: vec![7; 32],
            csr_der: request.csr_der.clone(),
        },
        &mut frame,
    );
    // The P-256 private scalar: the OCTET STRING after ECPrivateKey's version (02 01 01 04 20).
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key")
        + 5;
    let scalar = &der[at..at + 32];
    assert!(
        !frame.windows(8).any(|w| scalar.windows(8).any(|k| k == w)),
        "bytes of the private key are in what the device sends"
    );
    // The request is for the key made here.
    let csr = rcgen::CertificateSigningRequestParams::from_der(&request.csr_der.clone().into())
        .expect("csr");
    let pair = rcgen::KeyPair::from_pem(&request.key_pem).expect("key");
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&csr.public_key),
        rcgen::PublicKeyData::subject_public_key_info(&pair)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_renew_in_place_under_continuous_calls() {
    let pki = Pki::new();
    let (gw_conf, issuer) = issuing_gateway_and_issuer(&pki, 20);
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let lifetime = Duration::from_secs(20);
    let names = ["node-1", "node-2", "node-3", "node-4", "node-5"];
    let nodes: Vec<NodeProc> = names
        .iter()
        .map(|n| short_lived_node(&pki, &issuer, n, lifetime, gw.quic, ECHO))
        .collect();
    for n in &nodes {
        n.wait_peers(names.len(), UP);
    }
    // 60 s of calls from every node, three lifetimes: without renewal every one would fail
    // after 20 s.
    let until = Instant::now() + Duration::from_secs(60);
    let mut callers = Vec::new();
    for n in &nodes {
        let ingress = n.ingress();
        callers.push(tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while Instant::now() < until {
                match post(ingress, "echo", "say", Bytes::from_static(b"x"), None).await {
                    Ok((200, _, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    let mut total = 0;
    for c in callers {
        let (ok, failed) = c.await.expect("caller");
        assert!(
            failed.is_empty(),
            "{} calls failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        total += ok;
    }
    eprintln!("{total} calls in 60 s, none failed");
    for n in &nodes {
        let s = n.status();
        let renewals = s["renewal"]["renewals"].as_u64().unwrap_or(0);
        assert!(renewals >= 2, "{}: {renewals} renewals: {s}", n.name);
        assert!(
            s["certificate_expires_in_s"].as_i64().unwrap_or(0) > 0,
            "{s}"
        );
    }
    // The gateway sees the current certificates: each expires in under a lifetime.
    let (_, metrics) = http("GET", admin, "/metrics", None, "").await;
    for name in names {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(&format!("starling_cert_expiry_seconds{{node=\"{name}\"}}")))
            .unwrap_or_else(|| panic!("no expiry for {name}: {metrics}"));
        let left: i64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .expect("value");
        assert!((0..=20).contains(&left), "{line}");
    }
    let audit = std::fs::read_to_string(pki.dir.path().join("gw/audit.jsonl")).expect("audit");
    assert!(audit.matches("\"renewed\"").count() >= 10, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expired_while_the_gateway_was_away_recovers_without_a_restart() {
    let pki = Pki::new();
    let (gw_conf, issuer) = issuing_gateway_and_issuer(&pki, 20);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let lifetime = Duration::from_secs(12);
    let a = short_lived_node(&pki, &issuer, "node-a", lifetime, gw.quic, ECHO);
    let b = short_lived_node(
        &pki,
        &issuer,
        "node-b",
        Duration::from_secs(3600),
        gw.quic,
        "",
    );
    let c = short_lived_node(&pki, &issuer, "node-c", lifetime, gw.quic, "");
    c.wait_gateway(UP);
    a.wait_gateway(UP);
    b.wait_peer("node-a", UP);
    let pid = a.pid();
    // The gateway goes away for longer than node-a's certificate lasts.
    drop(gw);
    // Its coming expiry shows in its status, then the expiry itself: node-b closes on it.
    a.wait_status("near its expiry", Duration::from_secs(20), |s| {
        s["certificate_expires_in_s"]
            .as_i64()
            .is_some_and(|l| l < 4)
    });
    b.wait_peer_gone("node-a", Duration::from_secs(20));
    a.wait_status("expired", UP, |s| {
        s["certificate_expires_in_s"]
            .as_i64()
            .is_some_and(|l| l <= 0)
    });
    // node-c is restarted with its expired certificate: it starts, says so, and waits.
    c.wait_status("expired", UP, |s| {
        s["certificate_expires_in_s"]
            .as_i64()
            .is_some_and(|l| l <= 0)
    });
    let c_conf = pki.dir.path().join("node-c/node.toml");
    drop(c);
    let c = NodeProc::start("node-c", &c_conf);
    // The gateway returns: node-a recovers by itself, same process; node-c too.
    let (_gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    c.wait_status("recovered after a restart", Duration::from_secs(30), |s| {
        s["certificate_expires_in_s"]
            .as_i64()
            .is_some_and(|l| l > 0)
    });
    let s = a.wait_status("renewed", Duration::from_secs(30), |s| {
        s["certificate_expires_in_s"]
            .as_i64()
            .is_some_and(|l| l > 0)
    });
    assert_eq!(a.pid(), pid);
    assert!(s["renewal"]["renewals"].as_u64() >= Some(1), "{s}");
    b.wait_peer("node-a", UP);
    let (code, _, _) = post(b.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
        .await
        .expect("call");
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_rotation_across_five_nodes_fails_no_call() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let pki = Pki::new();
    let dir = pki.dir.path().to_owned();
    let (gw_conf, issuer) = issuing_gateway_and_issuer(&pki, 20);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let names = ["node-1", "node-2", "node-3", "node-4", "node-5"];
    let nodes: Vec<NodeProc> = names
        .iter()
        .map(|n| short_lived_node(&pki, &issuer, n, Duration::from_secs(20), gw.quic, ECHO))
        .collect();
    for n in &nodes {
        n.wait_peers(names.len(), UP);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (ingress, stop) = (n.ingress(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match post(ingress, "echo", "say", Bytes::from_static(b"x"), None).await {
                        Ok((200, _, _)) => ok += 1,
                        other => failed.push(format!("{other:?}")),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let cli = |args: &[&str]| run_bin("mesh-gateway", args);
    let p = |rel: &str| dir.join(rel).display().to_string();
    let edit = |from: &str, to: &str| {
        let src = std::fs::read_to_string(&gw_conf).expect("config");
        assert!(src.contains(from), "{from} not in {src}");
        std::fs::write(&gw_conf, src.replace(from, to)).expect("config");
    };
    let roots_everywhere = |n: u64| {
        for node in &nodes {
            node.wait_status(&format!("trusting {n} roots"), UP, |s| {
                s["renewal"]["roots"] == n
            });
        }
    };
    let (ok, out) = cli(&["ca", "init", "--out", &p("new")]);
    assert!(ok, "{out}");

    // 1. Both roots, everywhere.
    let (ok, out) = cli(&[
        "ca",
        "rotate",
        "bundle",
        "--old",
        &p("gw/certs/ca.crt"),
        "--new",
        &p("new/ca.crt"),
        "--out",
        &p("gw/bundle.crt"),
    ]);
    assert!(ok && out.contains("a trust bundle of 2 roots"), "{out}");
    edit("ca = \"certs/ca.crt\"", "ca = \"bundle.crt\"");
    drop(gw);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    roots_everywhere(2);

    // 2. The gateway issues from the new root; nodes move as they renew.
    let (ok, out) = cli(&[
        "ca",
        "issuer",
        "--ca",
        &p("new"),
        "--name",
        "gw",
        "--out",
        &p("gw/issuer-new"),
    ]);
    assert!(ok, "{out}");
    let (ok, out) = cli(&[
        "ca",
        "issue",
        "--ca",
        &p("new"),
        "--gateway",
        "--name",
        "gw",
        "--out",
        &p("gw/certs-new"),
    ]);
    assert!(ok, "{out}");
    edit("cert = \"certs/node.crt\"", "cert = \"certs-new/node.crt\"");
    edit("key = \"certs/node.key\"", "key = \"certs-new/node.key\"");
    edit("issuer/issuer.", "issuer-new/issuer.");
    drop(gw);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let status = || {
        let out = Command::new(bin("mesh-gateway"))
            .args(["ca", "rotate", "status", "--config"])
            .arg(&gw_conf)
            .args(["--new", &p("new/ca.crt")])
            .output()
            .expect("runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (done, out) = status();
        let moved = out
            .lines()
            .filter(|l| l.starts_with("node-") && l.ends_with("new root"))
            .count();
        if done && moved == names.len() {
            break;
        }
        assert!(Instant::now() < deadline, "not every node moved: {out}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // 3. The old root goes.
    let (ok, out) = cli(&[
        "ca",
        "rotate",
        "finish",
        "--new",
        &p("new/ca.crt"),
        "--out",
        &p("gw/bundle.crt"),
    ]);
    assert!(ok, "{out}");
    drop(gw);
    let (_gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    roots_everywhere(1);

    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for c in callers {
        let (ok, failed) = c.await.expect("caller");
        assert!(
            failed.is_empty(),
            "{} calls failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        total += ok;
    }
    eprintln!("{total} calls during the rotation, none failed");
    for n in &nodes {
        n.wait_peers(names.len(), UP);
    }
}

/// `env` with libfaketime preloaded: the node's wall clock starts on 2 January 1970 and runs on
/// (its monotonic clock is left alone); the process keeps its pid.
fn in_1970() -> Vec<String> {
    let lib = starling_tests::libfaketime();
    vec![
        "env".into(),
        format!("LD_PRELOAD={}", lib.display()),
        "FAKETIME=@1970-01-02 00:00:00".into(),
        "DONT_FAKE_MONOTONIC=1".into(),
        bin("mesh-node").display().to_string(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_says_1970_joins_on_its_floor_or_its_gateways_time_and_dates_nothing_without()
 {
    let pki = Pki::new();
    let gw_conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let peer = NodeProc::start("node-p", &node_conf(&pki, "node-p", gw.quic, ECHO));
    peer.wait_gateway(UP);
    let static_peer = format!("[[peers]]\naddr = \"{}\"\n", peer.quic);

    // No floor, its gateway reachable: it checks the gateway as of its certificate, takes its
    // time, then dates everyone else.
    let f = NodeProc::start_cmd(
        "node-f",
        &in_1970(),
        &node_conf(&pki, "node-f", gw.quic, ""),
    );
    f.wait_status("on its gateway's time", UP, |s| s["clock"] == "gateway");
    f.wait_peer("node-p", UP);
    let (code, _, _) = post(f.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
        .await
        .expect("call");
    assert_eq!(code, 200);

    // A floor saved by an earlier run, no gateway: it runs on its floor.
    let g_conf = pki.config("node-g", &static_peer);
    let state = pki.dir.path().join("node-g/state");
    std::fs::create_dir_all(&state).expect("state");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("now")
        .as_secs();
    std::fs::write(state.join("time.floor"), format!("{now}\n")).expect("floor");
    let g = NodeProc::start_cmd("node-g", &in_1970(), &g_conf);
    g.wait_peer("node-p", UP);
    assert_eq!(g.status()["clock"], "floor");

    // Neither: it refuses its peer, and says why, rather than trust what it cannot date.
    let h = NodeProc::start_cmd("node-h", &in_1970(), &pki.config("node-h", &static_peer));
    let s = h.wait_status("refusing a peer it cannot date", UP, |s| {
        s["clock"] == "unknown"
            && s["dial_errors"].as_array().is_some_and(|e| {
                e.iter().any(|e| {
                    e.as_str()
                        .is_some_and(|e| e.contains("cannot tell whether"))
                })
            })
    });
    assert!(!has_peer(&s, "node-p"), "{s}");

    // A damaged floor: the node does not start.
    let d_conf = pki.config("node-d", "");
    let d_state = pki.dir.path().join("node-d/state");
    std::fs::create_dir_all(&d_state).expect("state");
    std::fs::write(d_state.join("time.floor"), b"yesterday").expect("floor");
    let out = Command::new(bin("mesh-node"))
        .args(["run", "--config"])
        .arg(&d_conf)
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the time floor is damaged"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A node whose clock ran two days ahead saved its time floor there; then its clock is set
/// right, while its control stream is up. On its floor it would date every node's certificate
/// (a day) as expired until the true time caught up: it opens a new control stream for its
/// gateway's time (its gateway's certificate, a year, is valid at the floor), lowers the floor
/// to it, and dates its peers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_floor_saved_while_the_clock_ran_ahead_is_lowered_by_the_gateways_time() {
    let pki = Pki::new();
    let gw_conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let peer = NodeProc::start("node-p", &node_conf(&pki, "node-p", gw.quic, ECHO));
    peer.wait_gateway(UP);
    let unix_now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("now")
            .as_secs()
    };

    let clock = pki.dir.path().join("node-f-clock");
    std::fs::write(&clock, "+2d\n").expect("clock");
    let mut cmd = starling_tests::stepped_clock_env(&clock);
    cmd.push(bin("mesh-node").display().to_string());
    let f = NodeProc::start_cmd("node-f", &cmd, &node_conf(&pki, "node-f", gw.quic, ""));
    f.wait_gateway(UP);
    // Two days ahead: its floor is saved there, and its peer's certificate has expired.
    let floor_file = pki.dir.path().join("node-f/state/time.floor");
    let read_floor = || -> u64 {
        std::fs::read_to_string(&floor_file)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + UP;
    while read_floor() < unix_now() + 86_400 {
        assert!(Instant::now() < deadline, "no floor two days ahead saved");
        std::thread::sleep(Duration::from_millis(25));
    }
    let s = f.wait_status("refusing its peer's certificate as expired", UP, |s| {
        s["last_refusal"]
            .as_str()
            .is_some_and(|r| r.contains("expired"))
    });
    assert_eq!(s["clock"], "system", "{s}");
    assert!(!has_peer(&s, "node-p"), "{s}");

    // The clock is set right: the system clock is now two days before the floor.
    std::fs::write(&clock, "+0\n").expect("clock");
    // On its gateway's time, or on its system clock again once that is not behind it (the two
    // agree to a few milliseconds here).
    f.wait_status("off its floor", UP, |s| {
        s["clock"] == "gateway" || s["clock"] == "system"
    });
    f.wait_peer("node-p", UP);
    let deadline = Instant::now() + UP;
    while read_floor() > unix_now() + 60 {
        assert!(
            Instant::now() < deadline,
            "the floor {} was not lowered to the gateway's time (now {})",
            read_floor(),
            unix_now()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let (code, _, body) = post(f.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
        .await
        .expect("call");
    assert_eq!(code, 200, "{body:?}");
}

/// A gateway with an issuer, and node-p linked to it: the peer other nodes renew through.
fn relaying_node(pki: &Pki) -> (NodeProc, mesh_gateway::ca::Ca, NodeProc) {
    let (gw_conf, issuer) = issuing_gateway_and_issuer(pki, 3600);
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let p = short_lived_node(
        pki,
        &issuer,
        "node-p",
        Duration::from_secs(3600),
        gw.quic,
        ECHO,
    );
    p.wait_gateway(UP);
    (gw, issuer, p)
}

/// node-n, with a certificate of 15 s, that knows node-p only (no gateway address, no
/// discovery), once it has renewed through it; and its status then.
fn renewed_through(
    pki: &Pki,
    issuer: &mesh_gateway::ca::Ca,
    p: &NodeProc,
) -> (NodeProc, serde_json::Value) {
    let dir = pki.node_dir_from(issuer, "node-n", Duration::from_secs(15));
    let n = NodeProc::start(
        "node-n",
        &pki.write_config(
            dir,
            "node-n",
            &format!("{FAST}[[peers]]\naddr = \"{}\"\n", p.quic),
        ),
    );
    n.wait_peer("node-p", UP);
    let s = n.wait_status("renewed through node-p", Duration::from_secs(30), |s| {
        s["renewal"]["renewals"].as_u64() >= Some(1)
    });
    (n, s)
}

/// A peer that asks for relays and never reads the answers (its streams grant almost no credit)
/// takes one of the relay's places at most: node-n still renews through node-p. Before, one peer
/// could take all four, and each kept its place while its refusal waited to be written: for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_takes_one_relay_place_at_most() {
    let pki = Pki::new();
    let (_gw, issuer, p) = relaying_node(&pki);

    // The staller: 300 bytes of credit a stream, room for node-p's hello but not for the
    // gateway's roots, so a relayed answer (and anything after it) waits.
    let (cert, key) = pki.cert_and_key("staller");
    let (endpoint, mut config) = starling_tests::raw_client(&[&cert], &key);
    let mut transport = quinn::TransportConfig::default();
    transport.stream_receive_window(300u32.into());
    config.transport_config(std::sync::Arc::new(transport));
    let conn = endpoint
        .connect_with(config, p.quic, "starling.mesh")
        .expect("connect")
        .await
        .expect("handshake");
    starling_tests::send_hello(
        &conn,
        &starling_tests::hello_frame("staller", mesh_proto::PROTOCOL_VERSION, &[]),
    )
    .await;
    p.wait_peer("staller", UP);
    // Eight asks, each an enrolment hello that node-p relays to the gateway.
    let mut asks = Vec::new();
    for _ in 0..8 {
        let (mut send, recv) = tokio::time::timeout(UP, conn.open_bi())
            .await
            .expect("a stream in time")
            .expect("stream");
        let mut frames = Vec::new();
        mesh_proto::encode_frame_vec(
            &mesh_proto::RequestHead::new("_relay_enroll", "recover", 0),
            &mut frames,
        );
        mesh_proto::encode_frame_vec(
            &mesh_proto::enroll::EnrollUp::Hello {
                version: mesh_proto::enroll::ENROLL_VERSION,
            },
            &mut frames,
        );
        tokio::time::timeout(UP, send.write_all(&frames))
            .await
            .expect("asked in time")
            .expect("ask");
        asks.push((send, recv));
    }

    // node-n renews through node-p all the same.
    renewed_through(&pki, &issuer, &p);
    drop(asks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_reaches_its_gateway_only_through_a_peer_renews_through_it() {
    let pki = Pki::new();
    let (_gw, issuer, p) = relaying_node(&pki);
    let (n, s) = renewed_through(&pki, &issuer, &p);
    assert!(s["gateway"].is_null(), "it had a control stream: {s}");
    assert!(
        s["certificate_expires_in_s"].as_i64() > Some(15),
        "the renewed certificate is the gateway's lifetime: {s}"
    );
    // It keeps calling through the renewal and past the old certificate's expiry.
    let (code, _, _) = post(n.ingress(), "echo", "say", Bytes::from_static(b"x"), None)
        .await
        .expect("call");
    assert_eq!(code, 200);
}
