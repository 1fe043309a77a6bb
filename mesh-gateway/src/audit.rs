//! The audit log (mode 0600): one JSON object a line, appended, for every event an operator may
//! need to account for later (identities refused, calls denied, policies accepted, applied or
//! refused). Events come from the gateway itself and from every node's telemetry.
//!
//! Lines are written by a thread of their own, never on the runtime thread that serves the
//! control streams. The fields `unix_ms`, `node` and `kind` are the gateway's: a node's event cannot
//! overwrite them to speak for another node. Lines that could not be written are counted
//! (`starling_audit_lost_total`), never silently dropped.

use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::SystemTime;

use mesh_proto::control::AuditEvent;
use tracing::warn;

/// Lines waiting for the writer at most.
const QUEUE: usize = 4096;

/// The append-only audit log.
pub(crate) struct AuditLog {
    lines: Option<SyncSender<String>>,
    writer: Option<std::thread::JoinHandle<()>>,
    lost: Arc<AtomicU64>,
    /// Where every event also goes (the cloud bridge), if anywhere.
    also: Option<Forward>,
    /// The latest events, newest last (for the dashboard).
    recent: std::sync::Mutex<std::collections::VecDeque<serde_json::Value>>,
}

/// Events kept in memory for the dashboard.
const RECENT: usize = 100;

/// Largest event kept whole for the dashboard (as JSON); a longer one is kept as a short form.
const RECENT_EVENT_BYTES: usize = 2048;

/// Takes a copy of every audit event, as the JSON object the log line holds.
pub(crate) type Forward = Box<dyn Fn(&serde_json::Map<String, serde_json::Value>) + Send + Sync>;

impl AuditLog {
    /// Hands every event to `also` as well (the cloud bridge's `audit` topic).
    pub(crate) fn forward_to(&mut self, also: Forward) {
        self.also = Some(also);
    }

    /// Opens (or creates) the log at `path` and starts its writer; without it, events are counted
    /// as lost (said once).
    pub(crate) fn open(path: &Path) -> Self {
        let lost = Arc::new(AtomicU64::new(0));
        let Some(mut file) = open_private(path) else {
            return AuditLog {
                lines: None,
                writer: None,
                lost,
                also: None,
                recent: Default::default(),
            };
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let counted = lost.clone();
        let shown = path.display().to_string();
        let spawned = std::thread::Builder::new()
            .name("audit".into())
            .spawn(move || {
                for line in rx {
                    if let Err(e) = writeln!(file, "{line}")
                        && counted.fetch_add(1, Ordering::Relaxed) == 0
                    {
                        warn!("cannot write the audit log {shown}: {e}; lost lines are counted");
                    }
                }
            });
        match spawned {
            Ok(writer) => AuditLog {
                lines: Some(tx),
                writer: Some(writer),
                lost,
                also: None,
                recent: Default::default(),
            },
            Err(e) => {
                warn!("cannot start the audit writer: {e}; audit events are not kept");
                AuditLog {
                    lines: None,
                    writer: None,
                    lost,
                    also: None,
                    recent: Default::default(),
                }
            }
        }
    }

    /// Records an event of the gateway's own (`node` is the gateway's name or `gateway`).
    pub(crate) fn record(&self, node: &str, kind: &str, fields: Vec<(String, String)>) {
        let unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.write(
            node,
            &AuditEvent {
                unix_ms,
                kind: kind.to_owned(),
                fields,
            },
        );
    }

    /// Appends an event a node reported.
    pub(crate) fn write(&self, node: &str, event: &AuditEvent) {
        let mut line = serde_json::Map::new();
        for (k, v) in &event.fields {
            line.insert(k.clone(), v.clone().into());
        }
        // The gateway's own keys last: a node's fields never overwrite them.
        line.insert("unix_ms".into(), event.unix_ms.into());
        line.insert("node".into(), node.into());
        line.insert("kind".into(), event.kind.clone().into());
        if let Some(also) = &self.also {
            also(&line);
        }
        let value = serde_json::Value::Object(line);
        let text = value.to_string();
        {
            // A node's event can be large: the dashboard keeps a short form of a long one.
            let kept = if text.len() <= RECENT_EVENT_BYTES {
                value
            } else {
                serde_json::json!({
                    "unix_ms": value["unix_ms"], "node": value["node"], "kind": value["kind"],
                    "truncated": format!("{} bytes, in the audit log", text.len()),
                })
            };
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(kept);
        }
        let sent = match &self.lines {
            Some(tx) => match tx.try_send(text) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The latest `limit` events (at most 100), newest first.
    pub(crate) fn recent(&self, limit: usize) -> Vec<serde_json::Value> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().rev().take(limit).cloned().collect()
    }

    /// Lines that could not be written, since start.
    pub(crate) fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}

impl Drop for AuditLog {
    /// Writes what is queued before going.
    fn drop(&mut self) {
        self.lines = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// Opens `path` for appending, mode 0600 (a log made readable by others earlier is made private).
fn open_private(path: &Path) -> Option<std::fs::File> {
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(0o600);
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o077 != 0
        {
            let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
        }
    }
    match options.open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            warn!(
                "cannot open the audit log {}: {e}; audit events are not kept (counted as lost)",
                path.display()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_cannot_speak_for_another_in_the_audit_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path);
        log.write(
            "node-a",
            &AuditEvent {
                unix_ms: 5,
                kind: "denied".into(),
                fields: vec![
                    ("node".into(), "gw".into()),
                    ("kind".into(), "policy_accepted".into()),
                    ("caller".into(), "x".into()),
                ],
            },
        );
        // Dropping the log writes what is queued.
        drop(log);
        let text = std::fs::read_to_string(&path).expect("log");
        let line: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
        assert_eq!(line["node"], "node-a");
        assert_eq!(line["kind"], "denied");
        assert_eq!(line["caller"], "x");
    }

    #[test]
    fn the_dashboards_ring_is_bounded_in_events_and_bytes_the_log_keeps_everything() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path);
        let huge = AuditEvent {
            unix_ms: 1,
            kind: "denied".into(),
            fields: vec![("reason".into(), "x".repeat(100_000))],
        };
        log.write("node-a", &huge);
        for i in 0..150 {
            log.record(
                "gw",
                "policy_accepted",
                vec![("version".into(), i.to_string())],
            );
        }
        let recent = log.recent(1000);
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent[0]["version"], "149");
        let log2 = AuditLog::open(&dir.path().join("other.jsonl"));
        log2.write("node-a", &huge);
        let kept = &log2.recent(1)[0];
        assert!(kept["truncated"].is_string(), "{kept}");
        assert!(kept.to_string().len() < RECENT_EVENT_BYTES);
        drop((log, log2));
        let text = std::fs::read_to_string(&path).expect("log");
        assert!(
            text.lines().next().is_some_and(|l| l.len() > 100_000),
            "the log keeps it whole"
        );
    }
}
