//! `mesh-gateway demo`: a throw-away mesh on loopback, for a newcomer's first five minutes.
//!
//! It makes a CA in a temporary folder, issues certificates, writes a config file per node, starts
//! a gateway and three nodes (real QUIC, real mutual TLS, each with its own endpoint and HTTP
//! ingress), makes calls the way an app would, shows a stranger being refused, and prints what
//! happened. With `--keep-running` it stays up so you can `curl` the ingresses yourself.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use mesh_node::cli::post;
use mesh_node::{Node, NodeConfig};

use crate::ca::Ca;

const TRUST_DOMAIN: &str = "starling.local";

/// A node of the demo: name, hosted `(service, upstream)` pairs, zone.
type Plan = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Runs the demo; prints to stdout. `keep_running` waits for Ctrl-C before tearing down.
pub async fn run(keep_running: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("starling-demo-")
        .tempdir()?;
    let root = dir.path();
    let ca = Ca::generate(TRUST_DOMAIN)?;
    ca.save(&root.join("ca"))?;
    println!(
        "Starling demo: a throw-away mesh on loopback, in {}",
        root.display()
    );
    println!("  CA         spiffe://{TRUST_DOMAIN}   (ca/ca.crt, key mode 0600)");

    // The gateway first, then each node dials the ones before it: one connection per pair.
    let mut nodes: Vec<Node> = Vec::new();
    let plan: [Plan; 4] = [
        ("gateway", &[("health", "builtin:health")], "hall-0"),
        (
            "node-a",
            &[("echo", "builtin:echo"), ("health", "builtin:health")],
            "hall-1",
        ),
        (
            "node-b",
            &[("echo", "builtin:echo"), ("health", "builtin:health")],
            "hall-2",
        ),
        ("node-c", &[], "hall-1"),
    ];
    for (name, services, zone) in plan {
        let peers: Vec<SocketAddr> = nodes.iter().map(Node::local_addr).collect();
        let node = start_node(root, &ca, name, services, zone, &peers).await?;
        println!(
            "  {name:<10} {}  quic {}  ingress http://{}  hosts [{}]",
            node.id(),
            node.local_addr(),
            node.ingress_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            services
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        );
        nodes.push(node);
    }
    let caller = nodes.last().context("no nodes")?.clone();
    let ready = caller
        .wait_until(Duration::from_secs(5), |n| n.peers().len() == 3)
        .await;
    anyhow::ensure!(
        ready,
        "node-c did not connect to its three peers within 5 s"
    );
    let ingress = caller.ingress_addr().context("node-c has no ingress")?;

    println!(
        "\nCalls from node-c through its HTTP ingress, as an app on the device would make them:"
    );
    let (code, status, body, took) = timed_post(ingress, "echo", "say", "hello, starling").await?;
    println!(
        "  POST /v1/call/echo/say  \"hello, starling\"  -> {code} {}  {:?}  ({took:.2?})",
        status.as_deref().unwrap_or("?"),
        String::from_utf8_lossy(&body)
    );
    let mut answered = Vec::new();
    for _ in 0..4 {
        let (_, _, body, _) = timed_post(ingress, "health", "check", "").await?;
        answered.push(node_of(&body));
    }
    println!(
        "  POST /v1/call/health/check  x4  -> answered by {}  (three hosts share the calls)",
        answered.join(", ")
    );
    let (code, status, body, _) = timed_post(ingress, "inventory", "list", "").await?;
    println!(
        "  POST /v1/call/inventory/list  -> {code} {}: {}",
        status.as_deref().unwrap_or("?"),
        String::from_utf8_lossy(&body)
    );

    println!("\nThe same from Rust, in process (Node::call), 1000 sequential 64-byte echo calls:");
    let payload = Bytes::from(vec![0x5a; 64]);
    let mut lat = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let t = Instant::now();
        let answer = caller.call("echo", "say", payload.clone()).await?;
        lat.push(t.elapsed());
        anyhow::ensure!(answer == payload, "echo answered different bytes");
    }
    lat.sort();
    println!(
        "  p50 {:.1?}  p99 {:.1?}  (mutual TLS 1.3 over QUIC, one stream per call)",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    println!("\nA stranger with a certificate from another CA tries to join:");
    let rogue_ca = Ca::generate(TRUST_DOMAIN)?;
    rogue_ca.save(&root.join("rogue-ca"))?;
    let rogue = start_node(
        root,
        &rogue_ca,
        "rogue",
        &[],
        "hall-1",
        &[nodes[1].local_addr()],
    )
    .await?;
    let refused = rogue
        .wait_until(Duration::from_secs(5), |n| {
            n.peers().is_empty() && !n.dial_errors().is_empty()
        })
        .await;
    anyhow::ensure!(refused, "the stranger's dial neither failed nor succeeded");
    let rogue_ingress = rogue.ingress_addr().context("rogue has no ingress")?;
    let (code, status, body, _) = timed_post(rogue_ingress, "echo", "say", "let me in").await?;
    println!(
        "  its call  -> {code} {}: {}",
        status.as_deref().unwrap_or("?"),
        String::from_utf8_lossy(&body)
    );

    println!("\nPeers as node-c sees them (GET http://{ingress}/v1/peers):");
    for p in caller.peers() {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let services: Vec<&str> = p.services.iter().map(|s| s.as_str()).collect();
        println!(
            "  {:<8} {:<8} {}  [{}]  {}",
            p.id.node_name().as_str(),
            p.role.as_str(),
            p.addr,
            services.join(", "),
            labels.join(" ")
        );
    }

    if keep_running {
        println!("\nThe mesh stays up. Try:");
        println!("  curl -s --data hi http://{ingress}/v1/call/echo/say");
        println!("  mesh-node call health check --ingress {ingress}");
        println!("Ctrl-C ends it and deletes {}.", root.display());
        mesh_node::cli::wait_for_signal().await;
    }
    rogue.shutdown().await;
    for node in nodes.iter().rev() {
        node.shutdown().await;
    }
    println!("\nDone: every node shut down, the temporary CA and keys are deleted.");
    Ok(())
}

async fn start_node(
    root: &Path,
    ca: &Ca,
    name: &str,
    services: &[(&str, &str)],
    zone: &str,
    peers: &[SocketAddr],
) -> anyhow::Result<Node> {
    let dir = root.join(name);
    ca.issue_node(name, 1)?
        .save(&dir.join("certs"), ca.cert_pem())?;
    let mut toml = format!(
        "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"warn\"\n\
         [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
         [discovery]\nmdns = false\n[labels]\nzone = \"{zone}\"\n"
    );
    for (service, upstream) in services {
        let _ = write!(
            toml,
            "[[services]]\nname = \"{service}\"\nupstream = \"{upstream}\"\n"
        );
    }
    for peer in peers {
        let _ = write!(toml, "[[peers]]\naddr = \"{peer}\"\n");
    }
    let path = dir.join("node.toml");
    std::fs::write(&path, toml)?;
    let config = NodeConfig::load(&path)?;
    let identity = config.load_identity()?;
    Ok(Node::start(config, identity).await?)
}

async fn timed_post(
    ingress: SocketAddr,
    service: &str,
    method: &str,
    body: &str,
) -> anyhow::Result<(u16, Option<String>, Bytes, Duration)> {
    let t = Instant::now();
    let (code, status, body) = post(ingress, service, method, Bytes::from(body.to_owned()), None)
        .await
        .map_err(anyhow::Error::msg)?;
    Ok((code, status, body, t.elapsed()))
}

fn node_of(health: &[u8]) -> String {
    let text = String::from_utf8_lossy(health);
    text.split("\"node\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or("?")
        .to_owned()
}
