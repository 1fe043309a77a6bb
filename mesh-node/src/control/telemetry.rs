//! What this node reports to its gateway: call counters and histograms, rule decisions, sampled
//! spans, audit events and resource use, cut into numbered batches every interval whether or not a
//! gateway listens, and kept (bounded) until it acknowledges them. The counting itself is
//! `mesh_core::Telemetry`; this is the shared handle the call path records into.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::Telemetry;
use mesh_proto::Status;
use mesh_proto::control::{AuditEvent, Resources, Span, TelemetryBatch};
use tokio::sync::{Notify, watch};
use tracing::warn;

/// The shared telemetry of one node.
pub(crate) struct TelemetrySink {
    inner: Mutex<Telemetry>,
    /// A new batch was cut.
    batches: Notify,
    interval: Duration,
}

impl TelemetrySink {
    pub(crate) fn new(backlog: usize, interval: Duration) -> Self {
        TelemetrySink {
            inner: Mutex::new(Telemetry::new(backlog)),
            batches: Notify::new(),
            interval,
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Telemetry> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_call(
        &self,
        service: &str,
        method: &str,
        caller: &str,
        callee: &str,
        status: Status,
        latency: Duration,
    ) {
        self.lock()
            .record_call(service, method, caller, callee, status, latency);
    }

    pub(crate) fn record_span(&self, span: Span) {
        self.lock().record_span(span);
    }

    pub(crate) fn record_rule(&self, rule: &str, action: &'static str) {
        self.lock().record_rule(rule, action);
    }

    /// Records an audit event for the gateway.
    pub(crate) fn audit(&self, kind: &str, fields: Vec<(String, String)>) {
        self.lock().record_audit(AuditEvent {
            unix_ms: unix_ms(),
            kind: kind.to_owned(),
            fields,
        });
    }

    /// Resolves when the next batch is cut.
    pub(crate) fn batch_cut(&self) -> tokio::sync::futures::Notified<'_> {
        self.batches.notified()
    }

    /// Cuts a batch now and returns every batch not yet acknowledged.
    pub(crate) fn cut_now(&self, resources: Resources) -> Vec<TelemetryBatch> {
        let mut telemetry = self.lock();
        telemetry.cut(resources);
        telemetry.pending().cloned().collect()
    }

    /// Cuts a batch every interval until `stop` changes; `resources` reads the node's resource
    /// use at each cut.
    pub(crate) async fn run_ticker(
        &self,
        mut stop: watch::Receiver<bool>,
        resources: impl Fn() -> Resources,
    ) {
        let mut tick = tokio::time::interval(self.interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let resources = resources();
            let mut telemetry = self.lock();
            let dropped = telemetry.dropped();
            telemetry.cut(resources);
            if telemetry.dropped() > dropped {
                warn!(
                    "telemetry backlog full: dropped the oldest batch ({} dropped so far; the gateway will see the gap)",
                    telemetry.dropped()
                );
            }
            drop(telemetry);
            self.batches.notify_waiters();
        }
    }
}

/// This process's resource use, from `/proc`.
pub(crate) fn process_resources(connections: u32) -> Resources {
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

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
