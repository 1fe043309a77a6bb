//! The audit log (mode 0600): one JSON object a line, appended, for every event an operator may
//! need to account for later (identities refused, calls denied, policies accepted, applied or refused).
//! Events come from the gateway itself and from every node's telemetry.

use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use mesh_proto::control::AuditEvent;
use tracing::warn;

/// The append-only audit log.
pub(crate) struct AuditLog {
    file: Mutex<Option<std::fs::File>>,
}

impl AuditLog {
    /// Opens (or creates) the log at `path`; without it, events are not kept (said once).
    pub(crate) fn open(path: &Path) -> Self {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let mut options = std::fs::OpenOptions::new();
        options.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            options.mode(0o600);
            // A log made readable by others earlier is made private.
            if let Ok(meta) = std::fs::metadata(path)
                && meta.permissions().mode() & 0o077 != 0
            {
                let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
            }
        }
        let file = match options.open(path) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!(
                    "cannot open the audit log {}: {e}; audit events are not kept",
                    path.display()
                );
                None
            }
        };
        AuditLog {
            file: Mutex::new(file),
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
        line.insert("unix_ms".into(), event.unix_ms.into());
        line.insert("node".into(), node.into());
        line.insert("kind".into(), event.kind.clone().into());
        for (k, v) in &event.fields {
            line.insert(k.clone(), v.clone().into());
        }
        if let Some(file) = self.file.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            let _ = writeln!(file, "{}", serde_json::Value::Object(line));
        }
    }
}
