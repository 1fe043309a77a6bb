//! The cloud bridge: the on-disk queue's write rate on this disk, and how fast a backlog drains
//! to a real broker (mosquitto on loopback, TLS with client certificates) once it is back.
//!
//! The backlog is the issue's case: one hour of telemetry from 100 nodes at the device default
//! (a batch per node every 5 s: 72,000 messages of five call series each), queued while the
//! broker is down, then drained. The bridge runs in this process (the queue's writer thread and
//! the MQTT link on a runtime of their own); its CPU is this process's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_gateway::cloud::local::Broker;
use mesh_gateway::cloud::queue::{Bounds, Class, Pending, Queue};
use mesh_gateway::cloud::{BoxFuture, Bridge, Downlink, report};
use mesh_gateway::config::CloudConfig;
use mesh_proto::Status;
use mesh_proto::control::{CallStats, LATENCY_BUCKETS_US, Resources, TelemetryBatch};

use crate::stats::cpu_time;

pub struct CloudFigures {
    pub message_bytes: usize,
    pub write_one_per_s: f64,
    pub write_batched_per_s: f64,
    pub backlog: usize,
    pub queue_fill: Duration,
    pub drain: Duration,
    pub drain_cpu_ms: f64,
}

/// Refuses everything: the benchmark sends nothing down.
struct NoDownlink;

impl Downlink for NoDownlink {
    fn set_policy(&self, _: String) -> BoxFuture<'_, Result<u64, String>> {
        Box::pin(async { Err("benchmark".into()) })
    }
    fn call(
        &self,
        _: String,
        _: String,
        _: bytes::Bytes,
        _: mesh_node::CallOptions,
    ) -> BoxFuture<'_, (Status, String, bytes::Bytes)> {
        Box::pin(async { (Status::Unavailable, "benchmark".into(), bytes::Bytes::new()) })
    }
    fn audit(&self, _: &str, _: Vec<(String, String)>) {}
}

/// A node's telemetry batch as the gateway sends it up: five call series.
fn telemetry(node: usize, seq: u64) -> serde_json::Map<String, serde_json::Value> {
    let batch = TelemetryBatch {
        seq,
        dropped: 0,
        calls: (0..5)
            .map(|i| CallStats {
                service: format!("svc-{i}"),
                method: "get".into(),
                caller: format!("sim-{node}"),
                callee: format!("sim-{}", (node + 1) % 100),
                status: Status::Ok,
                count: 50,
                sum_us: 50 * 900,
                buckets: {
                    let mut b = vec![0; LATENCY_BUCKETS_US.len() + 1];
                    b[3] = 50;
                    b
                },
            })
            .collect(),
        resources: Resources {
            rss_bytes: 6 << 20,
            cpu_ms: 1234,
            connections: 4,
        },
        spans: Vec::new(),
        audit: Vec::new(),
        rules: Vec::new(),
        folded: 0,
        lost_items: 0,
        tcp: vec![],
    };
    report::telemetry(&format!("sim-{node}"), 7, 0, &batch)
}

pub fn measure(backlog: usize) -> anyhow::Result<CloudFigures> {
    let dir = tempfile::tempdir()?;
    let sample = serde_json::to_vec(&telemetry(0, 1))?;
    let bounds = Bounds {
        max_bytes: 4 << 30,
        max_messages: 10_000_000,
        ttl_ms: [0; 4],
    };

    // The queue alone: one message per transaction (each on disk before the next), and
    // batches of 256 (what the writer does under load).
    let mut q = Queue::open(&dir.path().join("q"), bounds.clone())?;
    let rate = |q: &mut Queue, batch: usize| -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut n = 0;
        while t.elapsed() < Duration::from_secs(2) {
            let items = (0..batch)
                .map(|_| {
                    let payload = sample.clone();
                    Pending {
                        class: Class::Telemetry,
                        topic: "starling/bench/telemetry".into(),
                        now_ms: 0,
                        payload: Box::new(move |_, _| payload),
                    }
                })
                .collect();
            q.push_many(items)?;
            n += batch;
        }
        Ok(n as f64 / t.elapsed().as_secs_f64())
    };
    let write_one_per_s = rate(&mut q, 1)?;
    let write_batched_per_s = rate(&mut q, 256)?;
    drop(q);

    // The backlog: queued through the bridge while the broker is down, then drained.
    let site = "bench-site";
    let prefix = "starling/bench";
    let mut broker = Broker::start(&dir.path().join("broker"), site, prefix, "cloud-app")
        .map_err(anyhow::Error::msg)?;
    let (crt, key) = broker.pki.issue(site, false).map_err(anyhow::Error::msg)?;
    broker.stop();
    let config = CloudConfig {
        broker: format!("127.0.0.1:{}", broker.port),
        tls: true,
        client_id: site.into(),
        topic_prefix: Some(prefix.into()),
        ca: Some(broker.pki.ca()),
        cert_key: Some((crt, key)),
        user_password: None,
        queue_dir: dir.path().join("bridge"),
        queue_max_bytes: 4 << 30,
        queue_max_messages: 10_000_000,
        keep_alive: Duration::from_secs(30),
        ttl: [Duration::ZERO; 4],
        max_inflight: 64,
        bandwidth: None,
        max_message_bytes: 1 << 20,
        max_publish_bytes: 128 * 1024,
        policy_signers: Vec::new(),
        protocol: None,
        batch_interval: Duration::ZERO,
        line: 0,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let _guard = rt.enter();
    let bridge = Bridge::open(&config, "bench.toml", "gw", "bench.local", dir.path())
        .map_err(anyhow::Error::msg)?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    bridge.start(Arc::new(NoDownlink), stop);
    let t = Instant::now();
    for i in 0..backlog {
        // Committed one by one would take the queue's single-write rate; the bridge takes what
        // is waiting in one transaction.
        let node = i % 100;
        let body = telemetry(node, (i / 100) as u64 + 1);
        let committed = bridge.send_telemetry(body);
        if i % 1000 == 999 {
            rt.block_on(committed).context("queued")?;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while (bridge.status().queue_messages as usize) < backlog {
        anyhow::ensure!(Instant::now() < deadline, "the backlog was not queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    let queue_fill = t.elapsed();
    broker.restart().map_err(anyhow::Error::msg)?;
    let (cpu0, t) = (cpu_time(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(600);
    while bridge.status().queue_messages > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the backlog did not drain in 10 minutes ({} left)",
            bridge.status().queue_messages
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let drain = t.elapsed();
    let drain_cpu_ms = (cpu_time() - cpu0).as_secs_f64() * 1e3;
    let published = bridge.status().published;
    anyhow::ensure!(
        published as usize >= backlog,
        "{published} of {backlog} acknowledged"
    );
    let _ = stop_tx.send(true);
    drop(_guard);
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(CloudFigures {
        message_bytes: sample.len(),
        write_one_per_s,
        write_batched_per_s,
        backlog,
        queue_fill,
        drain,
        drain_cpu_ms,
    })
}

impl CloudFigures {
    /// The hour the backlog stands for, over the time it took to drain.
    pub fn drain_ratio(&self) -> f64 {
        let built = self.backlog as f64 / 100.0 * 5.0;
        built / self.drain.as_secs_f64()
    }

    pub fn print(&self) {
        println!(
            "\ncloud bridge (mosquitto on loopback, TLS with client certificates, QoS 1, {} B telemetry messages):",
            self.message_bytes
        );
        println!(
            "  queue writes on this disk: {:.0} messages/s one per transaction (each on disk before the next), \
             {:.0} messages/s in batches of 256",
            self.write_one_per_s, self.write_batched_per_s
        );
        println!(
            "  backlog of {} messages (100 nodes, one batch each per 5 s, for {:.0} min): queued in {:.1} s; \
             drained in {:.1} s = {:.0} messages/s, {:.0}x faster than it built up; bridge CPU {:.2} ms per 1000 messages",
            self.backlog,
            self.backlog as f64 / 100.0 * 5.0 / 60.0,
            self.queue_fill.as_secs_f64(),
            self.drain.as_secs_f64(),
            self.backlog as f64 / self.drain.as_secs_f64(),
            self.drain_ratio(),
            self.drain_cpu_ms / self.backlog as f64 * 1000.0,
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "message_bytes": self.message_bytes,
            "queue_writes_one_per_s": self.write_one_per_s,
            "queue_writes_batched_per_s": self.write_batched_per_s,
            "backlog_messages": self.backlog,
            "backlog_queued_s": self.queue_fill.as_secs_f64(),
            "backlog_drain_s": self.drain.as_secs_f64(),
            "backlog_drain_ratio": self.drain_ratio(),
            "bridge_cpu_ms_per_1000": self.drain_cpu_ms / self.backlog as f64 * 1000.0,
        })
    }
}
