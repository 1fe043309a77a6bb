//! The cloud side of the bridge's tests: a real mosquitto (mesh_gateway::cloud::local) with TLS,
//! client certificates and an ACL for the site [`SITE`], and a cloud application that records
//! every message under [`PREFIX`].

use std::path::Path;
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;

pub use mesh_gateway::cloud::local::{Broker, BrokerPki, Received, Subscriber};

/// The site's MQTT client id, CN and topic prefix in these tests.
pub const SITE: &str = "site-7";
/// The prefix the site publishes under.
pub const PREFIX: &str = "starling/site-7";
/// The CN of the cloud application's certificate.
pub const CLOUD_APP: &str = "cloud-app";

/// Starts a broker in `dir` for [`SITE`] and [`CLOUD_APP`].
pub fn broker(dir: &Path) -> Broker {
    Broker::start(dir, SITE, PREFIX, CLOUD_APP).expect("mosquitto (scripts/setup.sh installs it)")
}

/// The cloud application: subscribed to everything under [`PREFIX`], with a persistent session.
pub struct CloudApp(pub Subscriber);

impl CloudApp {
    /// Connects to `broker` as `client_id` and subscribes; returns once subscribed.
    pub async fn connect(broker: &Broker, client_id: &str) -> CloudApp {
        let (crt, key) = broker.pki.issue(CLOUD_APP, false).expect("issue");
        let sub = Subscriber::connect(broker, client_id, (&crt, &key), &format!("{PREFIX}/#"))
            .await
            .expect("the cloud app subscribes");
        CloudApp(sub)
    }

    /// Every message received so far.
    pub fn seen(&self) -> Vec<Received> {
        self.0.seen()
    }

    /// Messages on `<PREFIX>/<suffix>`.
    pub fn on(&self, suffix: &str) -> Vec<Received> {
        let topic = format!("{PREFIX}/{suffix}");
        self.seen()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Waits (polling every 50 ms, at most `timeout`) until `ready` holds for what was received;
    /// panics naming `what` otherwise.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen();
            if ready(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "the cloud never saw {what} within {timeout:?}; last messages: {:?}",
                seen.iter()
                    .rev()
                    .take(5)
                    .map(|m| (&m.topic, String::from_utf8_lossy(&m.payload)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes `payload` on `<PREFIX>/<suffix>` with `properties` (QoS 1).
    pub async fn publish(&self, suffix: &str, payload: Vec<u8>, properties: PublishProperties) {
        self.0
            .client
            .publish_with_properties(
                format!("{PREFIX}/{suffix}"),
                QoS::AtLeastOnce,
                false,
                payload,
                properties,
            )
            .await
            .expect("publish");
    }
}

/// Every `seq` the cloud received (duplicates removed) and the gap ranges it was told of: what
/// is missing from 1 to the highest seq seen, after both.
pub fn missing_seqs(seen: &[Received]) -> (u64, Vec<u64>) {
    let mut have = std::collections::BTreeSet::new();
    for m in seen {
        let v = m.json();
        if let Some(seq) = v["seq"].as_u64() {
            have.insert(seq);
        }
        if let Some(gaps) = v["gaps"].as_array() {
            for g in gaps {
                let (a, b) = (g[0].as_u64().expect("gap"), g[1].as_u64().expect("gap"));
                have.extend(a..=b);
            }
        }
    }
    let max = have.iter().next_back().copied().unwrap_or(0);
    (max, (1..=max).filter(|s| !have.contains(s)).collect())
}

/// Calls the cloud's telemetry counted, by (service, method, status).
pub fn telemetry_counts(
    seen: &[Received],
) -> std::collections::BTreeMap<(String, String, String), u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut counted = std::collections::BTreeSet::new();
    let batches = seen
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/telemetry"))
        .flat_map(|m| m.json()["batches"].as_array().cloned().expect("batches"));
    for v in batches {
        // At least once: a batch seen twice (the same message again, or the node's resend of a
        // batch a gateway took but died before acknowledging) is counted once.
        let batch = (
            v["node"].as_str().expect("node").to_owned(),
            v["node_boot"].as_u64().expect("node_boot"),
            v["node_seq"].as_u64().expect("node_seq"),
            v["part"].as_u64().unwrap_or(1),
        );
        if !counted.insert(batch) {
            continue;
        }
        for c in v["calls"].as_array().expect("calls") {
            let key = (
                c["service"].as_str().expect("service").to_owned(),
                c["method"].as_str().expect("method").to_owned(),
                c["status"].as_str().expect("status").to_owned(),
            );
            *out.entry(key).or_default() += c["count"].as_u64().expect("count");
        }
    }
    out
}
