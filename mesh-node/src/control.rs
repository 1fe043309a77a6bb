//! The node's side of the control stream to its gateway: hello, heartbeats, policy bundles (applied,
//! saved, acknowledged or refused), telemetry batches (kept until acknowledged), the registry.
//!
//! The gateway is found as a connected peer whose hello says `gateway` (by mDNS, or by the
//! `gateway = "addr"` config key, which also makes it a static peer). The stream reconnects with
//! back-off and jitter, so a restarted gateway is not hit by every node at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::Backoff;
use mesh_core::discovery::{Record, Update};
use mesh_proto::control::{
    AuditEvent, CONTROL_SERVICE, Down, MAX_CONTROL_FRAME, NodeHello, Resources, Up,
};
use mesh_proto::{RequestHead, Role};
use tracing::{debug, info, warn};

use crate::node::{Node, lock, random};
use crate::policy::Policy;
use crate::wire::FrameReader;

impl crate::node::Inner {
    /// Records an audit event for the gateway.
    pub(crate) fn audit_event(&self, kind: &str, fields: Vec<(String, String)>) {
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        lock(&self.telemetry).record_audit(AuditEvent {
            unix_ms,
            kind: kind.to_owned(),
            fields,
        });
    }
}

/// How often a node says it is still there.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The node software version, as hellos and policy checks use it.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

impl Node {
    /// Applies the last good bundle saved on disk, if any: the node serves under it until a gateway
    /// says otherwise.
    pub(crate) fn apply_saved_policy(&self) {
        let Some((version, toml)) = self.inner.store.load() else {
            return;
        };
        match Policy::parse(&toml, "saved policy") {
            Ok(policy) => {
                info!(
                    "booted under policy version {version} from {}",
                    self.inner.store.dir().display()
                );
                *lock(&self.inner.policy) = Some((version, Arc::new(policy)));
            }
            Err(e) => warn!("ignoring the saved policy: {e}"),
        }
    }

    /// The policy version this node holds (0: none).
    pub fn policy_version(&self) -> u64 {
        lock(&self.inner.policy).as_ref().map_or(0, |(v, _)| *v)
    }

    /// Cuts a telemetry batch every interval, whether or not a gateway listens.
    pub(crate) async fn telemetry_ticker(self) {
        let mut stop = self.inner.shutdown.subscribe();
        let mut tick = tokio::time::interval(self.inner.telemetry_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let resources = self.resources();
            let mut telemetry = lock(&self.inner.telemetry);
            let dropped = telemetry.dropped();
            telemetry.cut(resources);
            if telemetry.dropped() > dropped {
                warn!(
                    "telemetry backlog full: dropped the oldest batch ({} dropped so far; the gateway will see the gap)",
                    telemetry.dropped()
                );
            }
            drop(telemetry);
            self.inner.batches.notify_waiters();
        }
    }

    fn resources(&self) -> Resources {
        let connections = lock(&self.inner.peers)
            .by_id
            .values()
            .map(|p| p.conns.len() as u32)
            .sum();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let rss_kib: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // utime and stime, fields 14 and 15 of /proc/self/stat, in clock ticks (100 a second on
        // Linux); the command name (field 2) may hold spaces, so count from its closing paren.
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let ticks: u64 = stat
            .rsplit_once(')')
            .map(|(_, rest)| {
                rest.split_whitespace()
                    .skip(11)
                    .take(2)
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum()
            })
            .unwrap_or(0);
        Resources {
            rss_bytes: rss_kib * 1024,
            cpu_ms: ticks * 10,
            connections,
        }
    }

    /// Records an audit event for the gateway.
    pub(crate) fn audit(&self, kind: &str, fields: Vec<(String, String)>) {
        self.inner.audit_event(kind, fields);
    }

    /// Cuts a telemetry batch now and returns every batch the gateway has not acknowledged yet:
    /// what this node would report (for tests and debugging).
    pub fn telemetry_now(&self) -> Vec<mesh_proto::control::TelemetryBatch> {
        let resources = self.resources();
        let mut telemetry = lock(&self.inner.telemetry);
        telemetry.cut(resources);
        telemetry.pending().cloned().collect()
    }

    /// Keeps a control stream to the gateway open for as long as the node runs.
    pub(crate) async fn control_loop(self) {
        let mut stop = self.inner.shutdown.subscribe();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let Some(conn) = self.gateway_connection().await else {
                return;
            };
            match self.control_session(conn).await {
                Ok(()) => backoff.reset(),
                Err(e) => debug!("control stream ended: {e}"),
            }
            let delay = backoff.next_delay(random());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Waits for a connection to a peer that says it is a gateway; `None` on shutdown.
    async fn gateway_connection(&self) -> Option<quinn::Connection> {
        let mut changed = self.inner.changed.subscribe();
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            let pin = &self.inner.gateway_pin;
            let conn = lock(&self.inner.peers)
                .by_id
                .values()
                .filter(|p| p.info.role == Role::Gateway)
                .filter(|p| pin.name.as_ref().is_none_or(|n| p.info.id.node_name() == n))
                .flat_map(|p| p.conns.iter())
                .find(|c| pin.addr.is_none_or(|a| c.remote_address() == a))
                .cloned();
            if conn.is_some() {
                return conn;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return None },
                _ = stop.changed() => return None,
            }
        }
    }

    async fn control_session(&self, conn: quinn::Connection) -> Result<(), String> {
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        mesh_proto::encode_frame_vec(&RequestHead::new(CONTROL_SERVICE, "session", 0), &mut out);
        let hello = Up::Hello(self.control_hello());
        mesh_proto::encode_frame_vec(&hello, &mut out);
        send.write_all(&out).await.map_err(|e| e.to_string())?;
        info!(
            "control stream to the gateway at {} is up",
            conn.remote_address()
        );

        let mut reader = FrameReader::new(recv);
        let mut sent_up_to = 0u64;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut stop = self.inner.shutdown.subscribe();
        loop {
            // Send every batch not yet sent on this stream (all unacknowledged ones at first).
            let batches: Vec<Up> = lock(&self.inner.telemetry)
                .pending()
                .filter(|b| b.seq > sent_up_to)
                .map(|b| Up::Telemetry(b.clone()))
                .collect();
            for up in batches {
                if let Up::Telemetry(b) = &up {
                    sent_up_to = b.seq;
                }
                write_up(&mut send, &up).await?;
            }
            let new_batch = self.inner.batches.notified();
            tokio::select! {
                frame = reader.frame(MAX_CONTROL_FRAME) => {
                    let frame = frame.map_err(|e| e.to_string())?;
                    let down: Down = postcard::from_bytes(&frame).map_err(|e| format!("bad control frame: {e}"))?;
                    if let Some(answer) = self.handle_down(down) {
                        write_up(&mut send, &answer).await?;
                    }
                }
                _ = new_batch => {}
                _ = heartbeat.tick() => write_up(&mut send, &Up::Heartbeat).await?,
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    fn control_hello(&self) -> NodeHello {
        let telemetry = lock(&self.inner.telemetry);
        NodeHello {
            protocol_version: mesh_proto::PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_owned(),
            labels: self
                .inner
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: self
                .inner
                .local
                .keys()
                .map(|s| s.as_str().to_owned())
                .collect(),
            addrs: self.advertised_addrs(),
            policy_version: self.policy_version(),
            next_seq: telemetry.next_seq(),
        }
    }

    fn advertised_addrs(&self) -> Vec<String> {
        let local = self.local_addr();
        if !local.ip().is_unspecified() {
            return vec![local.to_string()];
        }
        // Bound to every interface: name the addresses this host has, from its routes.
        let mut addrs = Vec::new();
        if let Ok(text) = std::fs::read_to_string("/proc/net/fib_trie") {
            let mut last = None;
            for line in text.lines() {
                let line = line.trim();
                if let Some(ip) = line.strip_prefix("|-- ") {
                    last = Some(ip.to_owned());
                } else if line.contains("/32 host LOCAL")
                    && let Some(ip) = last.take()
                    && !ip.starts_with("127.")
                {
                    let addr = format!("{ip}:{}", local.port());
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
        }
        addrs
    }

    /// Handles one frame from the gateway; returns the answer to send, if any.
    fn handle_down(&self, down: Down) -> Option<Up> {
        match down {
            Down::Policy { version, toml } => Some(self.handle_policy(version, &toml)),
            Down::TelemetryAck { seq } => {
                lock(&self.inner.telemetry).ack(seq);
                None
            }
            Down::Registry(entries) => {
                let me = self.inner.name.as_str();
                let records: Vec<Record> = entries
                    .into_iter()
                    .filter(|e| e.up && e.name != me)
                    .filter_map(|e| {
                        Some(Record {
                            name: e.name.parse().ok()?,
                            addrs: e.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                            role: "node".into(),
                            labels: e.labels.into_iter().collect(),
                            services_digest: String::new(),
                        })
                    })
                    .collect();
                for record in records {
                    self.handle_discovery(Update::Add(record));
                }
                None
            }
        }
    }

    fn handle_policy(&self, version: u64, toml: &str) -> Up {
        if version <= self.policy_version() {
            return Up::PolicyAck {
                version: self.policy_version(),
            };
        }
        let checked = Policy::parse(toml, &format!("policy version {version}"))
            .map_err(|e| e.to_string())
            .and_then(|p| p.check_applicable(SOFTWARE_VERSION).map(|()| p));
        match checked {
            Ok(policy) => {
                *lock(&self.inner.policy) = Some((version, Arc::new(policy)));
                if let Err(e) = self.inner.store.save(version, toml) {
                    warn!(
                        "applied policy version {version} but could not save it in {}: {e}",
                        self.inner.store.dir().display()
                    );
                }
                info!("applied policy version {version}");
                self.audit(
                    "policy_applied",
                    vec![("version".into(), version.to_string())],
                );
                Up::PolicyAck { version }
            }
            Err(reason) => {
                warn!("refused policy version {version}: {reason}");
                self.audit(
                    "policy_refused",
                    vec![
                        ("version".into(), version.to_string()),
                        ("reason".into(), reason.clone()),
                    ],
                );
                Up::PolicyNack { version, reason }
            }
        }
    }
}

async fn write_up(send: &mut quinn::SendStream, up: &Up) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(up, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}
