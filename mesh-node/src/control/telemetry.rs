//! What this node reports to its gateway: call counters and histograms, rule decisions, sampled
//! spans, audit events and resource use, cut into numbered batches every interval whether or not a
//! gateway listens, and kept (bounded) until it acknowledges them. The counting itself is
//! `mesh_core::Telemetry`; this is the shared handle the call path records into.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::Telemetry;
use mesh_core::telemetry::Bounds;
use mesh_proto::Status;
use mesh_proto::control::{AuditEvent, Resources, Span, TelemetryBatch};
use tokio::sync::{Notify, watch};
use tracing::warn;

/// The shared telemetry of one node.
pub(crate) struct TelemetrySink {
    inner: Mutex<Telemetry>,
    /// A new batch was cut.
    batches: Notify,
    /// The gateway acknowledged batches.
    acked: Notify,
    interval: Duration,
    /// This incarnation of the node: sequence numbers count within it.
    boot_id: u64,
    /// Batches the previous incarnation cut and never had acknowledged.
    lost_at_restart: u64,
    /// Where the progress of this incarnation is kept (`boot B cut C acked A running|stopped`),
    /// so the next one can count what this one loses if it dies.
    progress: Option<PathBuf>,
    /// The node stopped on purpose: nothing more is recorded after its last cut.
    stopped: std::sync::atomic::AtomicBool,
    /// The newest progress line; held while it is written.
    progress_text: std::sync::Arc<Mutex<String>>,
}

impl TelemetrySink {
    /// Telemetry within `bounds`; `progress` is the file in the state folder that carries the
    /// count of unacknowledged batches across a crash.
    pub(crate) fn new(bounds: Bounds, interval: Duration, progress: Option<PathBuf>) -> Self {
        let lost_at_restart = progress.as_deref().map_or(0, lost_by_previous);
        let boot_id = crate::rng::random() ^ unix_us().rotate_left(17);
        let sink = TelemetrySink {
            inner: Mutex::new(Telemetry::with_bounds(bounds)),
            batches: Notify::new(),
            acked: Notify::new(),
            interval,
            boot_id,
            lost_at_restart,
            progress,
            stopped: std::sync::atomic::AtomicBool::new(false),
            progress_text: std::sync::Arc::default(),
        };
        // Before any call is recorded: should this incarnation die before its first cut, the
        // next one counts that interval as lost.
        sink.write_progress_now();
        sink
    }

    pub(crate) fn boot_id(&self) -> u64 {
        self.boot_id
    }

    pub(crate) fn lost_at_restart(&self) -> u64 {
        self.lost_at_restart
    }

    /// The gateway stored every batch up to `seq`.
    pub(crate) fn ack(&self, seq: u64) {
        self.lock().ack(seq);
        self.save_progress();
        self.acked.notify_waiters();
    }

    /// Writes `boot cut acked` to the progress file, on the blocking pool (no fsync: it only has
    /// to survive the process, and a power cut loses the batches anyway). `acked` is the
    /// gateway's own watermark: batches dropped from the backlog are not taken for acknowledged.
    /// Writers take turns and each writes the newest figures, so an older one never wins.
    fn save_progress(&self) {
        let Some(path) = self.progress.clone() else {
            return;
        };
        self.update_progress_text();
        let latest = self.progress_text.clone();
        tokio::task::spawn_blocking(move || {
            let text = latest.lock().unwrap_or_else(|p| p.into_inner());
            write_progress(&path, &text);
        });
    }

    /// Sets the newest progress line from the counters.
    fn update_progress_text(&self) {
        // Built under the text's lock: a writer that read `stopped` before `mark_stopped` cannot
        // replace its line with an older one.
        let mut text = self.progress_text.lock().unwrap_or_else(|p| p.into_inner());
        let telemetry = self.lock();
        let cut = telemetry.next_seq().saturating_sub(1);
        let acked = telemetry.acked();
        drop(telemetry);
        let state = if self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
            "stopped"
        } else {
            "running"
        };
        // What the previous incarnation lost is carried until a batch of this one is
        // acknowledged: the gateway has then heard it (the hello and the batch's telemetry say
        // it), and a death before that must not forget it.
        let carried = if acked == 0 { self.lost_at_restart } else { 0 };
        *text = format!(
            "boot {} cut {cut} acked {acked} {state} carried {carried}\n",
            self.boot_id
        );
    }

    /// Writes the progress line on this thread.
    fn write_progress_now(&self) {
        if let Some(path) = &self.progress {
            self.update_progress_text();
            let text = self.progress_text.lock().unwrap_or_else(|p| p.into_inner());
            write_progress(path, &text);
        }
    }

    /// The node stops on purpose, after its last cut ([`TelemetrySink::flush`]): the next start
    /// counts only the batches left unacknowledged, not an interval in progress.
    pub(crate) fn mark_stopped(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.write_progress_now();
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
            self.save_progress();
            self.batches.notify_waiters();
        }
    }

    /// Cuts a batch now and waits (up to `limit`) until the gateway has acknowledged every batch:
    /// a node that stops on purpose loses no telemetry.
    pub(crate) async fn flush(&self, resources: Resources, limit: Duration) -> bool {
        self.lock().cut(resources);
        self.batches.notify_waiters();
        let deadline = tokio::time::Instant::now() + limit;
        let all_acked = loop {
            let acked = self.acked.notified();
            if self.lock().pending().next().is_none() {
                break true;
            }
            if tokio::time::timeout_at(deadline, acked).await.is_err() {
                break false;
            }
        };
        self.save_progress();
        all_acked
    }
}

/// Replaces the progress file (no fsync: see [`TelemetrySink::save_progress`]).
fn write_progress(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, text.as_bytes()).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = written {
        tracing::debug!("cannot write {}: {e}", path.display());
    }
}

/// What the previous incarnation's progress file says it lost: batches cut and not
/// acknowledged, and, if it did not stop on purpose, the interval it was recording when it died
/// (counted as one batch: its calls were never cut). A file of the older form (no state) counts
/// only the batches.
fn lost_by_previous(path: &std::path::Path) -> u64 {
    let Ok(text) = std::fs::read_to_string(path) else {
        return 0;
    };
    let fields: Vec<&str> = text.split_whitespace().collect();
    let (cut, acked, died, carried) = match fields.as_slice() {
        ["boot", _, "cut", cut, "acked", acked] => (cut, acked, 0, &"0"),
        ["boot", _, "cut", cut, "acked", acked, "running"] => (cut, acked, 1, &"0"),
        ["boot", _, "cut", cut, "acked", acked, "stopped"] => (cut, acked, 0, &"0"),
        [
            "boot",
            _,
            "cut",
            cut,
            "acked",
            acked,
            "running",
            "carried",
            carried,
        ] => (cut, acked, 1, carried),
        [
            "boot",
            _,
            "cut",
            cut,
            "acked",
            acked,
            "stopped",
            "carried",
            carried,
        ] => (cut, acked, 0, carried),
        _ => {
            warn!(
                "{}: unreadable, the previous run's losses are unknown",
                path.display()
            );
            return 0;
        }
    };
    match (
        cut.parse::<u64>(),
        acked.parse::<u64>(),
        carried.parse::<u64>(),
    ) {
        (Ok(cut), Ok(acked), Ok(carried)) => cut
            .saturating_sub(acked)
            .saturating_add(died)
            .saturating_add(carried),
        _ => {
            warn!(
                "{}: unreadable, the previous run's losses are unknown",
                path.display()
            );
            0
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_file_says_what_the_previous_run_lost() {
        let dir = std::env::temp_dir().join(format!("starling-progress-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("telemetry.progress");
        for (line, lost) in [
            ("boot 7 cut 5 acked 3\n", 2),
            ("boot 7 cut 5 acked 3 stopped\n", 2),
            // Killed: the interval it was recording is lost too.
            ("boot 7 cut 5 acked 3 running\n", 3),
            ("boot 7 cut 0 acked 0 running carried 0\n", 1),
            // Killed before a batch told the gateway what the run before it lost: that is
            // carried on, not forgotten.
            ("boot 7 cut 2 acked 0 running carried 4\n", 7),
            ("boot 7 cut 2 acked 0 stopped carried 4\n", 6),
            ("garbage\n", 0),
            ("boot 7 cut x acked 0 running carried 4\n", 0),
        ] {
            std::fs::write(&path, line).expect("write");
            assert_eq!(lost_by_previous(&path), lost, "{line}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
