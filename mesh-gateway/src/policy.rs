//! The policy bundle the gateway serves: validated, versioned, kept in its state folder, pushed to
//! every node by the control sessions (which watch it). It changes by file reload or by the API.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::policy::Policy;
use mesh_core::source::ConfigError;
use mesh_node::state::PolicyStore;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::audit::AuditLog;

/// The current bundle, `(version, TOML)`; version 0 means none.
pub(crate) type Bundle = (u64, Arc<String>);

/// The gateway's policy versions.
pub(crate) struct Policies {
    current: watch::Sender<Bundle>,
    store: PolicyStore,
    audit: Arc<AuditLog>,
    /// One change at a time, saved in version order.
    changing: tokio::sync::Mutex<()>,
}

impl Policies {
    /// Loads the last bundle from `store`, and makes the policy file's content the next version
    /// if it differs.
    pub(crate) fn load(
        store: PolicyStore,
        file: Option<(&std::path::Path, String)>,
        audit: Arc<AuditLog>,
    ) -> Result<Self, ConfigError> {
        let (mut version, mut toml) = store.load().unwrap_or((0, String::new()));
        if let Some((path, text)) = file {
            Policy::parse(&text, &path.display().to_string())?;
            if text != toml || version == 0 {
                version += 1;
                toml = text;
                save(&store, version, &toml);
            }
        }
        Ok(Policies {
            current: watch::Sender::new((version, Arc::new(toml))),
            store,
            audit,
            changing: tokio::sync::Mutex::new(()),
        })
    }

    /// The bundle now.
    pub(crate) fn current(&self) -> Bundle {
        self.current.borrow().clone()
    }

    /// Watches every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Bundle> {
        self.current.subscribe()
    }

    /// Validates `toml` and, if it differs from the current bundle, makes it the next version.
    /// `source` names it in errors. The copy on disk is written on the blocking pool.
    pub(crate) async fn set(&self, toml: &str, source: &str) -> Result<u64, ConfigError> {
        Policy::parse(toml, source)?;
        let _one_at_a_time = self.changing.lock().await;
        let mut version = 0;
        self.current.send_if_modified(|(v, current)| {
            if current.as_str() == toml && *v > 0 {
                version = *v;
                return false;
            }
            *v += 1;
            *current = Arc::new(toml.to_owned());
            version = *v;
            true
        });
        if let Err(e) = self.store.save_async(version, toml.to_owned()).await {
            warn!(
                "cannot save policy version {version} in {}: {e}",
                self.store.dir().display()
            );
        }
        self.audit.record(
            "gateway",
            "policy_accepted",
            vec![("version".into(), version.to_string())],
        );
        Ok(version)
    }

    /// Reloads the policy file when it changes (checked every second) until `stop` changes.
    pub(crate) async fn watch_file(&self, path: PathBuf, mut stop: watch::Receiver<bool>) {
        let mut last = std::fs::read_to_string(&path).ok();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            let Ok(text) = tokio::fs::read_to_string(&path).await else {
                continue;
            };
            if last.as_deref() == Some(text.as_str()) {
                continue;
            }
            last = Some(text.clone());
            match self.set(&text, &path.display().to_string()).await {
                Ok(v) => info!("policy file changed: version {v}"),
                Err(e) => {
                    warn!("policy file changed but is invalid, keeping the current bundle: {e}");
                    self.audit.record(
                        "gateway",
                        "policy_rejected",
                        vec![("reason".into(), e.to_string())],
                    );
                }
            }
        }
    }
}

fn save(store: &PolicyStore, version: u64, toml: &str) {
    if let Err(e) = store.save(version, toml) {
        warn!(
            "cannot save policy version {version} in {}: {e}",
            store.dir().display()
        );
    }
}
