//! The policy bundle the gateway serves: validated, identified by the gateway's epoch, a version
//! and the SHA-256 of its text, kept in the state folder, pushed to every node by the control
//! sessions (which watch it).
//!
//! One source of truth: the last accepted bundle, in the state folder. The policy file is read at
//! start and whenever it changes; a changed file becomes the next version. A bundle `PUT` over the
//! API stays in force across restarts until the file changes again or another `PUT` replaces it;
//! replacing one is always logged and audited, never silent.
//!
//! The epoch is a random number made with the state: a gateway whose state is lost or damaged
//! starts a new epoch, and its nodes take its bundles as a reset instead of comparing versions
//! from two different histories.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::policy::Policy;
use mesh_core::source::ConfigError;
use mesh_node::state::{PolicyStore, SavedBundle, bundle_hash, write_atomic};
use mesh_proto::control::{BundleRef, MAX_CONTROL_FRAME};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::audit::AuditLog;
use crate::policy_history::{Entry, History};

/// Largest bundle the gateway accepts: well under a control frame, so every node can take it.
pub const MAX_BUNDLE_BYTES: usize = 512 * 1024;

/// Where the bundle in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// The policy file.
    File,
    /// `PUT /v1/policy`.
    Api,
    /// A signed bundle from the cloud bridge.
    Cloud,
}

/// The bundle in force.
#[derive(Debug, Clone)]
pub(crate) struct Bundle {
    pub(crate) id: BundleRef,
    /// What nodes get: the operator's text, then the deny list.
    pub(crate) toml: Arc<String>,
    /// The operator's part (the policy file or the API's bundle), without the deny list.
    pub(crate) operator: Arc<String>,
}

/// The line between the operator's part of a bundle and the deny list the gateway writes after
/// it.
const REVOKED_MARKER: &str =
    "# ---- revoked identities: written by `mesh-gateway revoke`; not part of the policy file ----";

/// One revocation, as the gateway keeps it (`revoked.json` in its state folder) and writes it
/// into every bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Revocation {
    /// The SPIFFE ID revoked (every certificate naming it); none once the identity's revocation
    /// is lifted, when its old certificates stay revoked by serial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) id: Option<String>,
    /// Serial numbers of its certificates the gateway had seen, hex.
    #[serde(default)]
    pub(crate) serials: Vec<String>,
    /// Why.
    pub(crate) reason: String,
    /// When, seconds since the Unix epoch.
    pub(crate) at_unix: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedFile {
    #[serde(default)]
    revoked: Vec<Revocation>,
}

/// The bundle nodes get: the operator's text, and the deny list after the marker.
fn compose(operator: &str, revoked: &[Revocation]) -> Result<String, String> {
    if revoked.is_empty() {
        if operator.is_empty() {
            // The last revocation lifted, and no policy: the bundle says so (it allows as much
            // as no bundle).
            return Ok("# no policy; the deny list is empty\n".to_owned());
        }
        return Ok(operator.to_owned());
    }
    // A list that cannot be written is an error, never an empty list.
    let list = toml::to_string(&RevokedFile {
        revoked: revoked.to_vec(),
    })
    .map_err(|e| format!("the deny list cannot be written into the bundle: {e}"))?;
    Ok(format!("{operator}\n{REVOKED_MARKER}\n{list}"))
}

/// What the operator's part of a bundle must be: a valid bundle without the gateway's marker
/// line (a bundle copied from `GET /v1/policy` with its deny list would carry the marker).
fn check_operator(toml: &str, source: &str) -> Result<(), ConfigError> {
    if toml.lines().any(|l| l.trim_end() == REVOKED_MARKER) {
        return Err(ConfigError::unplaced(
            source,
            "(bundle)",
            "the bundle holds the gateway's deny-list marker line: send the operator's part \
             only (the `toml` of GET /v1/policy), the gateway adds the deny list itself",
        ));
    }
    check_bundle(toml, source)
}

/// The operator's part of a composed bundle, and the deny list written after it.
fn split(composed: &str) -> Result<(String, Vec<Revocation>), String> {
    let marker = format!("\n{REVOKED_MARKER}\n");
    match composed.find(&marker) {
        None => Ok((composed.to_owned(), Vec::new())),
        Some(at) => {
            let list: RevokedFile = toml::from_str(&composed[at + marker.len()..])
                .map_err(|e| format!("the deny list in the saved bundle: {e}"))?;
            Ok((composed[..at].to_owned(), list.revoked))
        }
    }
}

/// What a dry run would do.
#[derive(Debug, Clone)]
pub(crate) struct DryRun {
    /// The version the bundle would get (the current one if it is unchanged).
    pub(crate) version: u64,
    /// Whether it differs from the bundle in force.
    pub(crate) changed: bool,
    /// Lines the bundle adds, and removes, against the one in force.
    pub(crate) added: Vec<String>,
    pub(crate) removed: Vec<String>,
    /// The change as an ordered line diff (`  ` kept, `- ` removed, `+ ` added).
    pub(crate) diff: Vec<String>,
}

/// The gateway's policy versions.
pub(crate) struct Policies {
    current: watch::Sender<Option<Bundle>>,
    /// The deny list: kept in `revoked.json`, written into every bundle.
    revoked: std::sync::Mutex<Vec<Revocation>>,
    /// The deny list of the bundle in force, parsed (by the bundle's hash).
    enforced: std::sync::Mutex<([u8; 32], Vec<mesh_core::policy::Revoked>)>,
    store: PolicyStore,
    epoch: u64,
    audit: Arc<AuditLog>,
    /// One change at a time, saved in version order.
    changing: tokio::sync::Mutex<()>,
    /// Every accepted bundle, bounded.
    history: std::sync::Mutex<History>,
}

impl Policies {
    /// Loads the bundle kept in `dir`, then the policy file's content (`file`, with its text) if
    /// it changed since the gateway last read it.
    pub(crate) fn load(
        dir: &Path,
        file: Option<(&Path, String)>,
        audit: Arc<AuditLog>,
    ) -> Result<Self, ConfigError> {
        let store = PolicyStore::new(dir);
        let file_path = file.as_ref().map(|(p, _)| p.display().to_string());
        let saved = match store.load() {
            Ok(saved) => saved,
            Err(damaged) => {
                error!(
                    "the gateway's saved policy is damaged ({damaged}): starting a new epoch; \
                     nodes will take this gateway's next bundle as a reset"
                );
                audit.record(
                    "gateway",
                    "policy_state_damaged",
                    vec![("reason".into(), damaged.to_string())],
                );
                None
            }
        };
        let epoch = saved.as_ref().map_or_else(new_epoch, |s| s.id.epoch);
        // The deny list: its own file, and whatever the saved bundle carries (neither one alone
        // can lift a revocation). Damage is an error: the gateway does not start with a list it
        // cannot read.
        let revoked_path = dir.join("revoked.json");
        let mut revoked: Vec<Revocation> = match std::fs::read(&revoked_path) {
            Ok(bytes) => serde_json::from_slice::<RevokedFile>(&bytes)
                .map_err(|e| {
                    ConfigError::unplaced(
                        &revoked_path.display().to_string(),
                        "revoked",
                        format!(
                            "the deny list is damaged ({e}); the gateway refuses to start rather \
                             than lift revocations: restore the file from a backup"
                        ),
                    )
                })?
                .revoked,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(ConfigError::unplaced(
                    &revoked_path.display().to_string(),
                    "revoked",
                    e,
                ));
            }
        };
        let mut current = match saved {
            None => None,
            Some(s) => {
                let (operator, carried) = split(&s.toml).map_err(|e| {
                    ConfigError::unplaced(&store.path().display().to_string(), "revoked", e)
                })?;
                for r in carried {
                    merge(&mut revoked, r);
                }
                Some(Bundle {
                    id: s.id,
                    toml: Arc::new(s.toml),
                    operator: Arc::new(operator),
                })
            }
        };
        let marker = dir.join("policy-file.sha256");
        if let Some((path, text)) = file {
            check_operator(&text, &path.display().to_string())?;
            let file_hash = mesh_node::state::hex(&bundle_hash(&text));
            let seen = std::fs::read_to_string(&marker).ok();
            let unchanged = seen.as_deref().map(str::trim) == Some(file_hash.as_str());
            let same_text = current.as_ref().is_some_and(|c| *c.operator == text);
            // The file is adopted when it changed since it was last read, and also when the
            // gateway holds no bundle at all (its state was lost or damaged): never serve nothing
            // while a policy file is configured.
            if (!unchanged || current.is_none()) && !same_text {
                let version = current.as_ref().map_or(0, |c| c.id.version) + 1;
                if let Some(c) = &current {
                    warn!(
                        "the policy file {} changed since the gateway last read it: it replaces \
                         version {} as version {version}",
                        path.display(),
                        c.id.version
                    );
                }
                let composed = compose(&text, &revoked).map_err(|e| {
                    ConfigError::unplaced(&path.display().to_string(), "revoked", e)
                })?;
                check_bundle(&composed, &path.display().to_string())?;
                let bundle = Bundle {
                    id: BundleRef {
                        epoch,
                        version,
                        hash: bundle_hash(&composed),
                    },
                    toml: Arc::new(composed),
                    operator: Arc::new(text),
                };
                save(&store, &bundle).map_err(|e| {
                    ConfigError::unplaced(&store.path().display().to_string(), "state_dir", e)
                })?;
                audit.record(
                    "gateway",
                    "policy_accepted",
                    vec![
                        ("version".into(), version.to_string()),
                        ("source".into(), "file".into()),
                    ],
                );
                current = Some(bundle);
            } else if unchanged
                && let Some(c) = &current
                && !same_text
            {
                info!(
                    "serving policy version {} (set over the API; the policy file is unchanged \
                     since it was last read, so it does not replace it)",
                    c.id.version
                );
            }
            if !unchanged {
                write_atomic(&marker, file_hash.as_bytes(), 0o600).map_err(|e| {
                    ConfigError::unplaced(&marker.display().to_string(), "state_dir", e)
                })?;
            }
        }
        // The deny list changed since the bundle was saved (a revocation was kept but the gateway
        // stopped before its bundle was): the next version carries it.
        let operator = current.as_ref().map(|c| c.operator.clone());
        let composed =
            compose(operator.as_deref().map_or("", |o| o.as_str()), &revoked).map_err(|e| {
                ConfigError::unplaced(&revoked_path.display().to_string(), "revoked", e)
            })?;
        if current
            .as_ref()
            .map_or(!revoked.is_empty(), |c| *c.toml != composed)
        {
            let version = current.as_ref().map_or(0, |c| c.id.version) + 1;
            let bundle = Bundle {
                id: BundleRef {
                    epoch,
                    version,
                    hash: bundle_hash(&composed),
                },
                toml: Arc::new(composed),
                operator: operator.unwrap_or_default(),
            };
            save(&store, &bundle).map_err(|e| {
                ConfigError::unplaced(&store.path().display().to_string(), "state_dir", e)
            })?;
            current = Some(bundle);
        }
        let history = match History::load(dir) {
            Ok(h) => h,
            Err((h, why)) => {
                warn!("the policy history: {why}");
                audit.record(
                    "gateway",
                    "policy_history_damaged",
                    vec![("reason".into(), why)],
                );
                h
            }
        };
        let policies = Policies {
            current: watch::Sender::new(current),
            revoked: std::sync::Mutex::new(revoked),
            enforced: std::sync::Mutex::new(([0; 32], Vec::new())),
            store,
            epoch,
            audit,
            changing: tokio::sync::Mutex::new(()),
            history: std::sync::Mutex::new(history),
        };
        // A bundle made at start (the file changed while the gateway was down), or kept from
        // before the history existed.
        if let Some(bundle) = policies.current()
            && !policies
                .history_lock()
                .has(bundle.id.epoch, bundle.id.version)
        {
            let author = file_path.unwrap_or_else(|| "policy kept in the state folder".into());
            let bytes = policies
                .history_lock()
                .record(entry_of(&bundle, "file", &author));
            let path = policies.history_lock().path().to_owned();
            if let Err(e) = History::save(&path, &bytes) {
                warn!("cannot keep the policy history in {}: {e}", path.display());
            }
        }
        Ok(policies)
    }

    fn history_lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The accepted bundles kept, newest first.
    pub(crate) fn history(&self) -> Vec<Entry> {
        self.history_lock().entries().cloned().collect()
    }

    /// Keeps `bundle` in the history (written on the blocking pool; a failure is logged, never a
    /// refusal: the history informs, it does not decide).
    async fn remember(&self, bundle: &Bundle, source: &str, author: &str) {
        let (path, bytes) = {
            let mut history = self.history_lock();
            let bytes = history.record(entry_of(bundle, source, author));
            (history.path().to_owned(), bytes)
        };
        let shown = path.display().to_string();
        let saved = tokio::task::spawn_blocking(move || History::save(&path, &bytes)).await;
        if let Err(e) = saved.map_err(std::io::Error::other).and_then(|r| r) {
            warn!("cannot keep the policy history in {shown}: {e}");
        }
    }

    /// The bundle now.
    pub(crate) fn current(&self) -> Option<Bundle> {
        self.current.borrow().clone()
    }

    /// The version now (0: none).
    pub(crate) fn version(&self) -> u64 {
        self.current.borrow().as_ref().map_or(0, |b| b.id.version)
    }

    /// Watches every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Bundle>> {
        self.current.subscribe()
    }

    /// What setting `toml` would do, without doing it.
    pub(crate) fn dry_run(&self, toml: &str, source: &str) -> Result<DryRun, ConfigError> {
        check_operator(toml, source)?;
        let current = self.current();
        let old = current.as_ref().map_or("", |c| c.operator.as_str());
        let changed = old != toml;
        let version = current.as_ref().map_or(0, |c| c.id.version) + u64::from(changed);
        let (added, removed) = line_diff(old, toml);
        Ok(DryRun {
            version,
            changed,
            added,
            removed,
            diff: crate::policy_history::diff(old, toml),
        })
    }

    /// Validates `toml` and, if it differs from the bundle in force, makes it the next version.
    /// `source` names it in errors. The copy in the state folder is written (on the blocking pool)
    /// before the bundle is served: a change that cannot be kept is refused.
    pub(crate) async fn set(
        &self,
        toml: &str,
        source: &str,
        origin: Origin,
    ) -> Result<u64, ConfigError> {
        let author = match origin {
            Origin::File => source.to_owned(),
            Origin::Api => crate::admin_tokens::LOCAL.to_owned(),
            Origin::Cloud => "cloud (signed by an operator key)".to_owned(),
        };
        self.set_by(toml, source, origin, &author).await
    }

    /// [`Policies::set`], saying who sent it (for the history).
    pub(crate) async fn set_by(
        &self,
        toml: &str,
        source: &str,
        origin: Origin,
        author: &str,
    ) -> Result<u64, ConfigError> {
        check_operator(toml, source)?;
        let _one_at_a_time = self.changing.lock().await;
        let current = self.current();
        if let Some(c) = &current
            && *c.operator == toml
        {
            return Ok(c.id.version);
        }
        let revoked = self.revoked_list();
        let origin = match origin {
            Origin::File => "file",
            Origin::Api => "api",
            Origin::Cloud => "cloud",
        };
        let version = self
            .publish(
                Arc::new(toml.to_owned()),
                &revoked,
                source,
                (origin, author),
            )
            .await?;
        self.audit.record(
            "gateway",
            "policy_accepted",
            vec![
                ("version".into(), version.to_string()),
                ("source".into(), origin.into()),
                ("author".into(), author.to_owned()),
            ],
        );
        Ok(version)
    }

    /// The deny list now.
    pub(crate) fn revoked_list(&self) -> Vec<Revocation> {
        self.revoked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts `entry` on the deny list (merged with an entry for the same identity) and ships it
    /// in the next bundle version; the list is saved first.
    pub(crate) async fn revoke(&self, entry: Revocation, by: &str) -> Result<u64, ConfigError> {
        let _one_at_a_time = self.changing.lock().await;
        let mut list = self.revoked_list();
        merge(&mut list, entry.clone());
        let version = self.keep_and_publish(list, "revoke", by).await?;
        self.audit.record(
            "gateway",
            "revoked",
            vec![
                ("id".into(), entry.id.unwrap_or_default()),
                ("serials".into(), entry.serials.join(",")),
                ("reason".into(), entry.reason),
                ("version".into(), version.to_string()),
                ("by".into(), by.to_owned()),
            ],
        );
        Ok(version)
    }

    /// Lifts the revocation of identity `id`; `Ok(None)` when it was not revoked. The serials of
    /// the certificates it had stay revoked: the node comes back with a new certificate (enrolled
    /// or issued again), never with the one that was revoked.
    pub(crate) async fn unrevoke(&self, id: &str, by: &str) -> Result<Option<u64>, ConfigError> {
        let _one_at_a_time = self.changing.lock().await;
        let mut list = self.revoked_list();
        let Some(at) = list.iter().position(|r| r.id.as_deref() == Some(id)) else {
            return Ok(None);
        };
        if list[at].serials.is_empty() {
            list.remove(at);
        } else {
            list[at].id = None;
        }
        let version = self.keep_and_publish(list, "unrevoke", by).await?;
        self.audit.record(
            "gateway",
            "revocation_lifted",
            vec![
                ("id".into(), id.to_owned()),
                ("version".into(), version.to_string()),
                ("by".into(), by.to_owned()),
            ],
        );
        Ok(Some(version))
    }

    /// The deny list the bundle in force carries, as every node enforces it: the gateway's own
    /// list and any `[[revoked]]` the operator wrote.
    pub(crate) fn enforced(&self) -> Vec<mesh_core::policy::Revoked> {
        let Some(bundle) = self.current() else {
            return Vec::new();
        };
        let mut cache = self.enforced.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != bundle.id.hash {
            let list = match Policy::parse(&bundle.toml, "bundle") {
                Ok(p) => p.revoked,
                // Served bundles were checked; should one not parse, fall back on the gateway's
                // own list rather than on nothing.
                Err(_) => enforced(&self.revoked_list()),
            };
            *cache = (bundle.id.hash, list);
        }
        cache.1.clone()
    }

    /// Saves the deny list `list`, then ships it in the next version (`by` its author).
    async fn keep_and_publish(
        &self,
        list: Vec<Revocation>,
        source: &str,
        by: &str,
    ) -> Result<u64, ConfigError> {
        let path = self.store.dir().join("revoked.json");
        let bytes = serde_json::to_vec_pretty(&RevokedFile {
            revoked: list.clone(),
        })
        .map_err(|e| ConfigError::unplaced(source, "revoked", e))?;
        let saved = tokio::task::spawn_blocking(move || write_atomic(&path, &bytes, 0o600)).await;
        if let Err(e) = saved.map_err(std::io::Error::other).and_then(|r| r) {
            return Err(ConfigError::unplaced(
                source,
                "revoked",
                format!(
                    "the gateway cannot keep the deny list in {}: {e}; nothing changed",
                    self.store.dir().display()
                ),
            ));
        }
        *self.revoked.lock().unwrap_or_else(|p| p.into_inner()) = list.clone();
        let operator = self
            .current()
            .map_or_else(|| Arc::new(String::new()), |c| c.operator);
        self.publish(operator, &list, source, ("revocation", by))
            .await
    }

    /// Makes `operator` with `revoked` the next version: saved (on the blocking pool), then
    /// served.
    async fn publish(
        &self,
        operator: Arc<String>,
        revoked: &[Revocation],
        source: &str,
        (kind, author): (&str, &str),
    ) -> Result<u64, ConfigError> {
        let composed =
            compose(&operator, revoked).map_err(|e| ConfigError::unplaced(source, "revoked", e))?;
        check_bundle(&composed, source)?;
        let current = self.current();
        if let Some(c) = &current
            && *c.toml == composed
        {
            return Ok(c.id.version);
        }
        let version = current.as_ref().map_or(0, |c| c.id.version) + 1;
        let bundle = Bundle {
            id: BundleRef {
                epoch: self.epoch,
                version,
                hash: bundle_hash(&composed),
            },
            toml: Arc::new(composed),
            operator,
        };
        let store = self.store.clone();
        let to_save = bundle.clone();
        let saved = tokio::task::spawn_blocking(move || save(&store, &to_save))
            .await
            .map_err(std::io::Error::other)
            .and_then(|r| r);
        if let Err(e) = saved {
            return Err(ConfigError::unplaced(
                source,
                "(bundle)",
                format!(
                    "the gateway cannot keep it in {}: {e}; the bundle in force stays",
                    self.store.dir().display()
                ),
            ));
        }
        self.remember(&bundle, kind, author).await;
        self.current.send_replace(Some(bundle));
        Ok(version)
    }

    /// Reloads the policy file when it changes (checked every second) until `stop` changes.
    pub(crate) async fn watch_file(&self, path: PathBuf, mut stop: watch::Receiver<bool>) {
        let mut last = tokio::fs::read_to_string(&path).await.ok();
        let marker = self.store.dir().join("policy-file.sha256");
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
            match self
                .set(&text, &path.display().to_string(), Origin::File)
                .await
            {
                Ok(v) => {
                    info!("policy file changed: version {v}");
                    let hash = mesh_node::state::hex(&bundle_hash(&text));
                    let marker = marker.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        write_atomic(&marker, hash.as_bytes(), 0o600)
                    })
                    .await;
                }
                Err(e) => {
                    warn!("policy file changed but is refused, keeping the current bundle: {e}");
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

/// What a bundle must be before it is versioned: not empty, deliverable, valid.
fn check_bundle(toml: &str, source: &str) -> Result<(), ConfigError> {
    if toml.trim().is_empty() {
        return Err(ConfigError::unplaced(
            source,
            "(bundle)",
            "an empty bundle is refused (it would lift every rule); to allow every call, say so: \
             [authorization] default = \"allow\"",
        ));
    }
    if toml.len() > MAX_BUNDLE_BYTES {
        return Err(ConfigError::unplaced(
            source,
            "(bundle)",
            format!(
                "the bundle is {} bytes; the bound is {MAX_BUNDLE_BYTES} bytes (a control frame \
                 carries at most {MAX_CONTROL_FRAME})",
                toml.len()
            ),
        ));
    }
    Policy::parse(toml, source).map(|_| ())
}

fn save(store: &PolicyStore, bundle: &Bundle) -> std::io::Result<()> {
    store.save(&SavedBundle {
        id: bundle.id,
        toml: bundle.toml.to_string(),
    })
}

/// The deny list as a node enforces it.
fn enforced(list: &[Revocation]) -> Vec<mesh_core::policy::Revoked> {
    list.iter()
        .map(|r| mesh_core::policy::Revoked {
            id: r.id.clone(),
            serials: r.serials.clone(),
            reason: Some(r.reason.clone()),
        })
        .collect()
}

/// Adds `entry` to `list`, merged with an entry for the same identity.
fn merge(list: &mut Vec<Revocation>, entry: Revocation) {
    let same = |r: &&mut Revocation| {
        r.id.is_some() && r.id == entry.id
            || r.id.is_none() && entry.id.is_none() && r.serials == entry.serials
    };
    match list.iter_mut().find(same) {
        Some(held) => {
            for serial in entry.serials {
                if !held.serials.contains(&serial) {
                    held.serials.push(serial);
                }
            }
        }
        None => list.push(entry),
    }
}

/// A new epoch: 64 random bits.
fn new_epoch() -> u64 {
    let mut bytes = [0u8; 8];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
    if random.is_err() {
        // No /dev/urandom: the clock still separates one epoch from the next.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = now.to_le_bytes();
    }
    u64::from_le_bytes(bytes).max(1)
}

/// The history's entry of `bundle`, accepted now.
fn entry_of(bundle: &Bundle, source: &str, author: &str) -> Entry {
    Entry {
        version: bundle.id.version,
        epoch: bundle.id.epoch,
        hash: mesh_node::state::hex(&bundle.id.hash),
        at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        source: source.to_owned(),
        author: author.to_owned(),
        policy: bundle.operator.as_str().to_owned(),
    }
}

/// Lines of `new` not in `old`, and of `old` not in `new` (a summary, not a patch).
fn line_diff(old: &str, new: &str) -> (Vec<String>, Vec<String>) {
    let old_lines: Vec<&str> = old.lines().collect();
    let new_lines: Vec<&str> = new.lines().collect();
    let added = new_lines
        .iter()
        .filter(|l| !old_lines.contains(l))
        .map(|l| (*l).to_owned())
        .collect();
    let removed = old_lines
        .iter()
        .filter(|l| !new_lines.contains(l))
        .map(|l| (*l).to_owned())
        .collect();
    (added, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(dir: &Path) -> Arc<AuditLog> {
        Arc::new(AuditLog::open(&dir.join("audit.jsonl")))
    }

    #[test]
    fn empty_oversized_and_invalid_bundles_are_refused_with_the_reason() {
        let e = check_bundle("  \n", "PUT /v1/policy").expect_err("empty");
        assert!(e.to_string().contains("an empty bundle is refused"), "{e}");
        let big = format!("# {}\n", "x".repeat(MAX_BUNDLE_BYTES));
        let e = check_bundle(&big, "p.toml").expect_err("big");
        assert!(e.to_string().contains("the bound is 524288 bytes"), "{e}");
        assert!(check_bundle("[defaults]\ncolour = 1\n", "p").is_err());
        assert!(check_bundle("[defaults]\ncall_timeout_ms = 5\n", "p").is_ok());
    }

    #[tokio::test]
    async fn an_api_bundle_outlives_a_restart_while_the_file_is_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let file = dir.path().join("policy.toml");
        let v1 = "[defaults]\ncall_timeout_ms = 100\n";
        let p = Policies::load(&state, Some((&file, v1.into())), audit(dir.path())).expect("load");
        assert_eq!(p.version(), 1);
        let epoch = p.current().expect("bundle").id.epoch;
        let api = "[defaults]\ncall_timeout_ms = 200\n";
        assert_eq!(p.set(api, "PUT", Origin::Api).await, Ok(2));
        drop(p);
        // Restart with the same file: the API's bundle stays, same epoch.
        let p = Policies::load(&state, Some((&file, v1.into())), audit(dir.path())).expect("load");
        let b = p.current().expect("bundle");
        assert_eq!((b.id.version, b.id.epoch, b.toml.as_str()), (2, epoch, api));
        // The file changes: it becomes the next version.
        let v3 = "[defaults]\ncall_timeout_ms = 300\n";
        let p = Policies::load(&state, Some((&file, v3.into())), audit(dir.path())).expect("load");
        let b = p.current().expect("bundle");
        assert_eq!((b.id.version, b.toml.as_str()), (3, v3));
    }

    #[tokio::test]
    async fn lost_state_starts_a_new_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let text = "[defaults]\ncall_timeout_ms = 100\n";
        let p = Policies::load(&state, None, audit(dir.path())).expect("load");
        p.set(text, "PUT", Origin::Api).await.expect("set");
        let first = p.current().expect("bundle").id;
        drop(p);
        std::fs::write(state.join("policy.toml"), b"garbage").expect("damage");
        let p = Policies::load(&state, None, audit(dir.path())).expect("load");
        assert!(p.current().is_none());
        p.set(text, "PUT", Origin::Api).await.expect("set");
        let second = p.current().expect("bundle").id;
        assert_eq!(second.version, 1);
        assert_ne!(second.epoch, first.epoch, "the same epoch, two histories");
    }

    #[test]
    fn a_damaged_state_with_an_unchanged_file_still_serves_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let file = dir.path().join("p.toml");
        let text = "[defaults]\ncall_timeout_ms = 100\n";
        let p =
            Policies::load(&state, Some((&file, text.into())), audit(dir.path())).expect("load");
        assert_eq!(p.version(), 1);
        drop(p);
        std::fs::write(state.join("policy.toml"), b"damaged").expect("damage");
        let p =
            Policies::load(&state, Some((&file, text.into())), audit(dir.path())).expect("load");
        let b = p.current().expect("a bundle is served");
        assert_eq!((b.id.version, b.toml.as_str()), (1, text));
    }

    #[test]
    fn a_dry_run_shows_the_change() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Policies::load(
            &dir.path().join("state"),
            Some((
                &dir.path().join("p.toml"),
                "[defaults]\ncall_timeout_ms = 100\n".into(),
            )),
            audit(dir.path()),
        )
        .expect("load");
        let run = p
            .dry_run("[defaults]\ncall_timeout_ms = 250\n", "PUT")
            .expect("valid");
        assert_eq!((run.version, run.changed), (2, true));
        assert_eq!(run.added, ["call_timeout_ms = 250"]);
        assert_eq!(run.removed, ["call_timeout_ms = 100"]);
        assert_eq!(p.version(), 1, "a dry run changed the bundle");
    }

    fn revocation(name: &str) -> Revocation {
        Revocation {
            id: Some(format!("spiffe://td/node/{name}")),
            serials: vec!["ab".into()],
            reason: "test".into(),
            at_unix: 1,
        }
    }

    #[tokio::test]
    async fn the_deny_list_rides_every_bundle_and_outlives_restarts_and_policy_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let file = dir.path().join("p.toml");
        let v1 = "[defaults]\ncall_timeout_ms = 100\n";
        let p = Policies::load(&state, Some((&file, v1.into())), audit(dir.path())).expect("load");
        assert_eq!(p.revoke(revocation("n7"), "local").await, Ok(2));
        let b = p.current().expect("bundle");
        assert_eq!(*b.operator, v1);
        let parsed = Policy::parse(&b.toml, "bundle").expect("valid");
        assert!(parsed.revocation("spiffe://td/node/n7", "").is_some());
        // The operator's file changes: the deny list stays in the new version.
        let v3 = "[defaults]\ncall_timeout_ms = 300\n";
        assert_eq!(p.set(v3, "p.toml", Origin::File).await, Ok(3));
        let parsed = Policy::parse(&p.current().expect("bundle").toml, "b").expect("valid");
        assert!(parsed.revocation("spiffe://td/node/n7", "").is_some());
        drop(p);
        // A restart keeps both, and the file unchanged changes nothing.
        let p = Policies::load(&state, Some((&file, v3.into())), audit(dir.path())).expect("load");
        assert_eq!(p.version(), 3);
        assert_eq!(p.revoked_list(), vec![revocation("n7")]);
        // Lifted: the identity may come back, its revoked certificate may not.
        assert_eq!(
            p.unrevoke("spiffe://td/node/n7", "local").await,
            Ok(Some(4))
        );
        let parsed = Policy::parse(&p.current().expect("bundle").toml, "b").expect("valid");
        assert!(parsed.revocation("spiffe://td/node/n7", "cd").is_none());
        assert!(parsed.revocation("spiffe://td/node/n7", "ab").is_some());
        assert_eq!(p.unrevoke("spiffe://td/node/n7", "local").await, Ok(None));
        // An operator's own entry is enforced too, and the marker line is refused in their text.
        let own = format!("{v3}[[revoked]]\nid = \"spiffe://td/node/n9\"\n");
        p.set(&own, "p.toml", Origin::File).await.expect("set");
        assert!(
            p.enforced()
                .iter()
                .any(|r| r.matches("spiffe://td/node/n9", ""))
        );
        let copied = p.current().expect("bundle").toml.to_string();
        let e = p
            .set(&copied, "PUT", Origin::Api)
            .await
            .expect_err("marker");
        assert!(e.to_string().contains("deny-list marker"), "{e}");
    }

    #[tokio::test]
    async fn a_damaged_deny_list_stops_the_gateway_and_a_lost_one_is_read_back_from_the_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let p = Policies::load(&state, None, audit(dir.path())).expect("load");
        p.revoke(revocation("n7"), "local").await.expect("revoke");
        drop(p);
        std::fs::write(state.join("revoked.json"), b"{ damaged").expect("damage");
        let e = Policies::load(&state, None, audit(dir.path()))
            .err()
            .expect("refused");
        assert!(e.to_string().contains("the deny list is damaged"), "{e}");
        std::fs::remove_file(state.join("revoked.json")).expect("lose");
        let p = Policies::load(&state, None, audit(dir.path())).expect("load");
        assert_eq!(p.revoked_list(), vec![revocation("n7")]);
    }
}
