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
use mesh_node::http::post;
use mesh_node::{Node, NodeConfig};

use crate::ca::Ca;
use crate::cloud::local::{Broker, Received, Subscriber};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

const TRUST_DOMAIN: &str = "starling.local";

/// A node of the demo: name, hosted `(service, upstream)` pairs, zone.
type Plan = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Runs the demo; prints to stdout. `keep_running` waits for Ctrl-C before tearing down.
/// With `cloud`, the gateway is bridged to a local mosquitto and the demo shows the cloud's side.
pub async fn run(keep_running: bool, cloud: bool) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("starling-demo-")
        .tempdir()?;
    let root = dir.path();
    let cloud = if cloud {
        Some(CloudSide::start(root).await?)
    } else {
        None
    };
    let ca = Ca::generate(TRUST_DOMAIN)?;
    ca.save(&root.join("ca"))?;
    println!(
        "Starling demo: a throw-away mesh on loopback, in {}",
        root.display()
    );
    println!("  CA         spiffe://{TRUST_DOMAIN}   (ca/ca.crt, key mode 0600)");
    if let Some(cloud) = &cloud {
        println!(
            "  broker     mosquitto {}  (TLS, client certificates, an ACL: the site may publish only under {PREFIX})",
            cloud.broker.url()
        );
    }

    let gateway = start_gateway(root, &ca, cloud.as_ref()).await?;
    let gw = gateway.node().clone();
    println!(
        "  gateway    {}  quic {}  admin http://{}  policy version {}",
        gw.id(),
        gw.local_addr(),
        gateway.admin_addr(),
        gateway.policy_version()
    );

    // Each node dials the gateway and the nodes before it: one connection per pair.
    let mut nodes: Vec<Node> = Vec::new();
    let mut ingresses: Vec<SocketAddr> = Vec::new();
    let plan: [Plan; 3] = [
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
        let (node, ingress) = start_node(
            root,
            &ca,
            name,
            services,
            zone,
            &peers,
            Some(gw.local_addr()),
        )
        .await?;
        println!(
            "  {name:<10} {}  quic {}  ingress http://{ingress}  hosts [{}]",
            node.id(),
            node.local_addr(),
            services
                .iter()
                .map(|(s, _)| *s)
                .collect::<Vec<_>>()
                .join(", ")
        );
        nodes.push(node);
        ingresses.push(ingress);
    }
    let caller = nodes.last().context("no nodes")?.clone();
    let ready = caller
        .wait_until(Duration::from_secs(5), |n| n.peers().len() == 3)
        .await;
    anyhow::ensure!(
        ready,
        "node-c did not connect to its three peers within 5 s"
    );
    let ingress = *ingresses.last().context("no nodes")?;

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
        "  POST /v1/call/health/check  x4  -> answered by {}  (node-a shares node-c's zone, hall-1: calls stay in the zone while it is healthy)",
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
        "  p50 {:.1?}  p99 {:.1?}  (mutual TLS 1.3 over QUIC, a stream kept for each call in flight)",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );

    println!("\nA stranger with a certificate from another CA tries to join:");
    let rogue_ca = Ca::generate(TRUST_DOMAIN)?;
    rogue_ca.save(&root.join("rogue-ca"))?;
    let (rogue, rogue_ingress) = start_node(
        root,
        &rogue_ca,
        "rogue",
        &[],
        "hall-1",
        &[nodes[0].local_addr()],
        None,
    )
    .await?;
    let refused = rogue
        .wait_until(Duration::from_secs(5), |n| {
            n.peers().is_empty() && !n.dial_errors().is_empty()
        })
        .await;
    anyhow::ensure!(refused, "the stranger's dial neither failed nor succeeded");
    let (code, status, body, _) = timed_post(rogue_ingress, "echo", "say", "let me in").await?;
    println!(
        "  its call  -> {code} {}: {}",
        status.as_deref().unwrap_or("?"),
        String::from_utf8_lossy(&body)
    );

    // The nodes send telemetry every 200 ms here; wait (bounded) until the gateway has it all.
    let made = 1 + 4 + 1 + 1000 + 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    while gateway.total_calls() < made && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = gateway.admin_addr();
    println!("\nThe gateway's registry (GET http://{admin}/v1/nodes):");
    let nodes_json: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/v1/nodes").await?)?;
    for n in nodes_json["nodes"].as_array().into_iter().flatten() {
        println!(
            "  {:<8} up={:<5} policy v{}  services {}  labels {}",
            n["name"].as_str().unwrap_or("?"),
            n["up"],
            n["policy_version"],
            n["services"],
            n["labels"]
        );
    }
    println!("\nIts metrics (GET http://{admin}/metrics), the request counters:");
    for line in admin_get(admin, "/metrics")
        .await?
        .lines()
        .filter(|l| l.starts_with("starling_requests_total{") || l.starts_with("starling_node_up{"))
    {
        println!("  {line}");
    }

    if let Some(cloud) = &cloud {
        cloud.show(gateway.total_calls()).await?;
    }

    if keep_running {
        println!("\nThe mesh stays up. Try:");
        println!("  curl -s --data hi http://{ingress}/v1/call/echo/say");
        println!("  mesh-node call health check --ingress {ingress}");
        println!("  curl -s http://{admin}/metrics");
        println!("  curl -s http://{admin}/v1/policy/status");
        println!("Ctrl-C ends it and deletes {}.", root.display());
        mesh_node::process::stop_signal().await;
    }
    rogue.shutdown().await;
    for node in nodes.iter().rev() {
        node.shutdown().await;
    }
    gateway.shutdown().await;
    println!("\nDone: every node shut down, the temporary CA and keys are deleted.");
    Ok(())
}

pub(crate) async fn start_gateway(
    root: &Path,
    ca: &Ca,
    cloud: Option<&CloudSide>,
) -> anyhow::Result<crate::Gateway> {
    let dir = root.join("gateway");
    ca.issue_gateway("gateway", 1)?
        .save(&dir.join("certs"), ca.cert_pem())?;
    std::fs::write(
        dir.join("policy.toml"),
        "[defaults]\ncall_timeout_ms = 5000\n",
    )?;
    let toml = "name = \"gateway\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"warn\"\n\
                admin = \"127.0.0.1:0\"\npolicy = \"policy.toml\"\nstate_dir = \"state\"\n\
                [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
                [discovery]\nmdns = false\n[labels]\nzone = \"hall-0\"\n";
    let mut toml = toml.to_owned();
    if let Some(cloud) = cloud {
        toml.push_str(&cloud.section()?);
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml)?;
    let config = crate::GatewayConfig::load(&path)?;
    let identity = config.node.load_identity()?;
    Ok(crate::Gateway::start(config, identity).await?)
}

async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (_, _, body) = mesh_node::http::request("GET", admin, path, &[], Bytes::new())
        .await
        .map_err(anyhow::Error::msg)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn start_node(
    root: &Path,
    ca: &Ca,
    name: &str,
    services: &[(&str, &str)],
    zone: &str,
    peers: &[SocketAddr],
    gateway: Option<SocketAddr>,
) -> anyhow::Result<(Node, SocketAddr)> {
    let dir = root.join(name);
    let gateway_key = gateway
        .map(|g| format!("gateway = \"{g}\"\n"))
        .unwrap_or_default();
    // The zone is certified: zone preference and label rules match certificates, not configs.
    let labels = [("zone".to_owned(), zone.to_owned())].into();
    ca.issue_node_labeled(name, 1, &labels)?
        .save(&dir.join("certs"), ca.cert_pem())?;
    let mut toml = format!(
        "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"warn\"\n\
         state_dir = \"state\"\n{gateway_key}\
         [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
         [discovery]\nmdns = false\n[telemetry]\ninterval_ms = 200\n[labels]\nzone = \"{zone}\"\n"
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
    let ingress = config.ingress.context("the demo's nodes have an ingress")?;
    let node = Node::start(config, identity).await?;
    let ingress = mesh_node::ingress::serve(node.clone(), ingress).await?;
    Ok((node, ingress))
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

/// The cloud's side of `demo --cloud`: a local mosquitto and an application subscribed to
/// everything the site sends, holding the operator key that signs policy.
pub(crate) struct CloudSide {
    broker: Broker,
    app: Subscriber,
    root: std::path::PathBuf,
}

/// The gateway's MQTT client id: its name, so also its CN and ACL user.
const SITE: &str = "gateway";
const PREFIX: &str = "starling/starling.local/gateway";

impl CloudSide {
    async fn start(root: &Path) -> anyhow::Result<CloudSide> {
        anyhow::ensure!(
            crate::cloud::local::mosquitto().is_some(),
            "--cloud needs mosquitto (apt-get install mosquitto, or scripts/setup.sh)"
        );
        let broker = Broker::start(&root.join("broker"), SITE, PREFIX, "cloud-app")
            .map_err(anyhow::Error::msg)?;
        let (crt, key) = broker
            .pki
            .issue("cloud-app", false)
            .map_err(anyhow::Error::msg)?;
        let app = Subscriber::connect(&broker, "cloud-app", (&crt, &key), &format!("{PREFIX}/#"))
            .await
            .map_err(anyhow::Error::msg)?;
        crate::cloud::signing::generate(&root.join("operator")).map_err(anyhow::Error::msg)?;
        Ok(CloudSide {
            broker,
            app,
            root: root.to_owned(),
        })
    }

    /// The gateway's `[cloud]` section.
    fn section(&self) -> anyhow::Result<String> {
        let (crt, key) = self
            .broker
            .pki
            .issue(SITE, false)
            .map_err(anyhow::Error::msg)?;
        Ok(format!(
            "[cloud]\nbroker = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             policy_signers = [\"{}\"]\n",
            self.broker.url(),
            self.broker.pki.ca().display(),
            crt.display(),
            key.display(),
            self.root.join("operator.pub").display()
        ))
    }

    /// Waits until `pred` holds for what the cloud received (10 s at most).
    async fn wait(&self, pred: impl Fn(&[Received]) -> bool) -> anyhow::Result<Vec<Received>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let seen = self.app.seen();
            if pred(&seen) {
                return Ok(seen);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the cloud did not see it within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Prints what the cloud received, sends a signed policy down and makes a call from the
    /// cloud.
    async fn show(&self, made: u64) -> anyhow::Result<()> {
        let calls = |seen: &[Received]| -> u64 {
            seen.iter()
                .filter(|m| m.topic.ends_with("/telemetry"))
                .flat_map(|m| m.json()["batches"].as_array().cloned().unwrap_or_default())
                .flat_map(|b| b["calls"].as_array().cloned().unwrap_or_default())
                .filter_map(|c| c["count"].as_u64())
                .sum()
        };
        let seen = self.wait(|s| calls(s) >= made).await?;
        println!(
            "\nThe cloud's side (subscribed to {PREFIX}/#), every message with its sequence number:"
        );
        let mut topics: std::collections::BTreeMap<&str, usize> = Default::default();
        for m in &seen {
            *topics.entry(m.topic.as_str()).or_default() += 1;
        }
        for (topic, n) in topics {
            println!("  {topic:<48} {n} messages");
        }
        println!(
            "  calls counted in the cloud's telemetry: {} (the gateway counted {made})",
            calls(&seen)
        );

        // Calls from the cloud stay off until a rule names the cloud.
        let policy = "[defaults]\ncall_timeout_ms = 4000\n\
                      [[authorization.rules]]\nname = \"the-cloud-may-echo\"\neffect = \"allow\"\n\
                      callers = [\"spiffe://starling.local/cloud/gateway\"]\nservices = [\"echo\"]\n";
        let signed = crate::cloud::signing::sign(
            &self.root.join("operator.key"),
            PREFIX,
            policy,
            crate::cloud::unix_ms(),
        )
        .map_err(anyhow::Error::msg)?;
        self.app
            .client
            .publish(
                format!("{PREFIX}/policy/set"),
                QoS::AtLeastOnce,
                false,
                serde_json::to_vec(&signed)?,
            )
            .await?;
        let acked = |s: &[Received]| {
            s.iter()
                .filter(|m| m.topic.ends_with("/policy/status") && m.json()["kind"] == "ack")
                .filter(|m| m.json()["version"] == 2)
                .count()
        };
        let seen = self.wait(|s| acked(s) >= 3).await?;
        println!(
            "  a policy signed by the operator key, published on {PREFIX}/policy/set: version 2, acked by {} nodes",
            acked(&seen)
        );
        let mut properties = PublishProperties {
            response_topic: Some(format!("{PREFIX}/reply/demo")),
            correlation_data: Some(Bytes::from_static(b"demo-1")),
            ..PublishProperties::default()
        };
        properties
            .user_properties
            .push(("timeout_ms".into(), "2000".into()));
        self.app
            .client
            .publish_with_properties(
                format!("{PREFIX}/call/echo/say"),
                QoS::AtLeastOnce,
                false,
                &b"hello from the cloud"[..],
                properties,
            )
            .await?;
        let seen = self
            .wait(|s| s.iter().any(|m| m.topic.ends_with("/reply/demo")))
            .await?;
        if let Some(answer) = seen.iter().find(|m| m.topic.ends_with("/reply/demo")) {
            println!(
                "  a call from the cloud to echo.say, as spiffe://{TRUST_DOMAIN}/cloud/{SITE}: {} {:?}",
                answer.user_property("status").unwrap_or_default(),
                String::from_utf8_lossy(&answer.payload)
            );
        }
        Ok(())
    }
}
