//! Renewal: a node asks its gateway for a new certificate at about two thirds of the current
//! one's lifetime (with jitter, so a fleet issued at once does not renew at once), over the
//! control stream, keeping its key or rotating it. The new files are written atomically and the
//! new certificate is used for new handshakes; connections already up go on (calls in flight are
//! not dropped).
//!
//! A node whose certificate expired while it was cut off from its gateway can no longer open a
//! control stream (every peer refuses an expired certificate), so it recovers over the enrolment
//! channel instead: its expired chain and a request signed by the same key, which the gateway
//! takes within its grace window unless the identity is revoked.
//!
//! A rotated key is written as `node.key.next` first, then the certificate, then the key is
//! renamed into place: a crash between the two leaves a certificate and a `.next` key that match,
//! and [`finish_interrupted_rotation`] completes the rename at the next start.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;
use super::enroll::Request;

/// Whether a renewal keeps the node's key or makes a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RenewKey {
    /// A new key at each renewal (the default): a key stolen once is useless after the next.
    #[default]
    Rotate,
    /// The same key (a key kept in a secure element that cannot make another).
    Keep,
}

/// The files a node's credentials live in.
#[derive(Debug, Clone)]
pub struct CredentialFiles {
    /// `node.crt`.
    pub cert: PathBuf,
    /// `node.key`.
    pub key: PathBuf,
    /// `ca.crt`.
    pub ca: PathBuf,
}

/// What applies a renewed identity to the running node.
pub(crate) type Apply = Box<dyn Fn(&Identity) -> Result<(), String> + Send + Sync>;

/// The renewal state of a node's certificate.
pub(crate) struct Renewer {
    name: String,
    files: CredentialFiles,
    mode: RenewKey,
    apply: Apply,
    state: Mutex<State>,
}

struct State {
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    key_pem: String,
    not_before: SystemTime,
    not_after: SystemTime,
    /// Where in the lifetime this certificate is renewed: about two thirds, with jitter.
    at_fraction: f64,
    /// A request sent and not answered yet: its key, and when it was sent.
    pending: Option<(String, Instant)>,
    /// Why the last renewal failed, and whether the identity is revoked.
    problem: Option<(String, bool)>,
    renewals: u64,
}

/// What a node says of its renewals in its status.
#[derive(Debug, Clone, Default)]
pub struct RenewalStatus {
    /// Certificates renewed since start.
    pub renewals: u64,
    /// Why the last attempt failed, if it did.
    pub problem: Option<String>,
    /// The gateway said this identity is revoked.
    pub revoked: bool,
    /// Roots in the trust bundle (two during a CA rotation).
    pub roots: usize,
}

impl Renewer {
    pub(crate) fn new(
        name: &str,
        identity: &Identity,
        files: CredentialFiles,
        mode: RenewKey,
        apply: Apply,
    ) -> Result<Renewer, String> {
        let key_pem = key_pem(identity.key())?;
        let renewer = Renewer {
            name: name.to_owned(),
            files,
            mode,
            apply,
            state: Mutex::new(State {
                chain: Vec::new(),
                roots: Vec::new(),
                key_pem: String::new(),
                not_before: SystemTime::UNIX_EPOCH,
                not_after: SystemTime::UNIX_EPOCH,
                at_fraction: 2.0 / 3.0,
                pending: None,
                problem: None,
                renewals: 0,
            }),
        };
        renewer.hold(identity, key_pem)?;
        Ok(renewer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `identity` (with its key, PEM) the one renewed from now on.
    fn hold(&self, identity: &Identity, key_pem: String) -> Result<(), String> {
        let leaf = identity.chain().first().ok_or("no certificate")?;
        let not_before = not_before(leaf)?;
        // 2/3 of the lifetime, +/- 5%: spread over the fleet.
        let jitter = (crate::rng::random() as f64 / u64::MAX as f64 - 0.5) * 0.1;
        let mut state = self.lock();
        state.chain = identity.chain().to_vec();
        state.roots = identity.roots().to_vec();
        state.key_pem = key_pem;
        state.not_before = not_before;
        state.not_after = identity.not_after;
        state.at_fraction = 2.0 / 3.0 + jitter;
        state.pending = None;
        Ok(())
    }

    /// How long until a renewal is due (zero: now). A request sent and unanswered is sent again
    /// after a twentieth of the lifetime (between 1 s and 5 min).
    pub(crate) fn due_in(&self, now: SystemTime) -> Duration {
        let state = self.lock();
        let lifetime = state
            .not_after
            .duration_since(state.not_before)
            .unwrap_or_default();
        if let Some((_, sent)) = &state.pending {
            let retry = (lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(300));
            return retry.saturating_sub(sent.elapsed());
        }
        let at = state.not_before + lifetime.mul_f64(state.at_fraction);
        at.duration_since(now).unwrap_or_default()
    }

    /// Whether the certificate has expired.
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        now >= self.lock().not_after
    }

    /// The identity was replaced from outside ([`crate::Node::set_identity`]).
    pub(crate) fn replaced(&self, identity: &Identity) -> Result<(), String> {
        self.hold(identity, key_pem(identity.key())?)
    }

    /// A certificate signing request for this node, with a new key or the current one; the key
    /// is kept until the answer comes.
    pub(crate) fn request(&self) -> Result<Vec<u8>, String> {
        let request = match self.mode {
            RenewKey::Rotate => Request::new(Some(&self.name))?,
            RenewKey::Keep => Request::with_key_pem(&self.lock().key_pem, Some(&self.name))?,
        };
        self.lock().pending = Some((request.key_pem.clone(), Instant::now()));
        Ok(request.csr_der)
    }

    /// A request signed by the current key (recovery proves the old identity with it), with the
    /// current chain and roots.
    pub(crate) fn recovery_request(
        &self,
    ) -> Result<
        (
            Request,
            Vec<CertificateDer<'static>>,
            Vec<CertificateDer<'static>>,
        ),
        String,
    > {
        let state = self.lock();
        let request = Request::with_key_pem(&state.key_pem, Some(&self.name))?;
        Ok((request, state.chain.clone(), state.roots.clone()))
    }

    /// Installs the certificate the gateway issued for the pending request (`key_pem`: the key
    /// of a recovery request): checks it, writes the files, applies it. Blocking (fsync).
    pub(crate) fn install(&self, chain_pem: &str, key_pem: Option<String>) -> Result<(), String> {
        let (key_pem, roots, old_key) = {
            let state = self.lock();
            let key = match key_pem {
                Some(k) => k,
                None => state
                    .pending
                    .as_ref()
                    .map(|(k, _)| k.clone())
                    .ok_or("a certificate came that was not asked for")?,
            };
            (key, state.roots.clone(), state.key_pem.clone())
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the renewed certificate is not PEM: {e:?}"))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("{e:?}"))?;
        let identity = Identity::from_parts(chain, key, roots).map_err(|e| e.to_string())?;
        let current = self
            .lock()
            .chain
            .first()
            .and_then(|c| super::spiffe_id_of(c).ok());
        if current.as_ref() != Some(&identity.id) {
            return Err(format!(
                "the renewed certificate is for {}, this node is {}",
                identity.id,
                current.map_or_else(|| "?".to_owned(), |c| c.to_string())
            ));
        }
        self.write_files(chain_pem, (key_pem != old_key).then_some(&key_pem))?;
        (self.apply)(&identity)?;
        self.hold(&identity, key_pem)?;
        let mut state = self.lock();
        state.renewals += 1;
        state.problem = None;
        Ok(())
    }

    /// Takes the trust bundle the gateway sent (a CA rotation adds or drops a root): only when
    /// this node's own certificate chains to it and every root is of the mesh's trust domain.
    /// Writes `ca.crt` and applies it. Returns whether anything changed. Blocking (fsync).
    pub(crate) fn set_roots(&self, roots_pem: &str) -> Result<bool, String> {
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(roots_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the trust bundle is not PEM: {e:?}"))?;
        let (chain, key_pem, held) = {
            let state = self.lock();
            (
                state.chain.clone(),
                state.key_pem.clone(),
                state.roots.clone(),
            )
        };
        if roots.is_empty() || roots == held {
            return Ok(false);
        }
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("{e:?}"))?;
        let identity = Identity::from_parts(chain, key, roots).map_err(|e| {
            format!("refused a trust bundle this node's own certificate does not chain to: {e}")
        })?;
        crate::state::write_atomic(&self.files.ca, roots_pem.as_bytes(), 0o644)
            .map_err(|e| format!("{}: {e}", self.files.ca.display()))?;
        (self.apply)(&identity)?;
        self.hold(&identity, key_pem)?;
        Ok(true)
    }

    /// The gateway refused (or the attempt failed): remembered for the status.
    pub(crate) fn failed(&self, reason: String, revoked: bool) {
        let mut state = self.lock();
        state.problem = Some((reason, revoked));
    }

    /// What the status shows.
    pub(crate) fn status(&self) -> RenewalStatus {
        let state = self.lock();
        RenewalStatus {
            renewals: state.renewals,
            problem: state.problem.as_ref().map(|(p, _)| p.clone()),
            revoked: state.problem.as_ref().is_some_and(|(_, r)| *r),
            roots: state.roots.len(),
        }
    }

    /// Writes the certificate, and the new key if there is one (see [`write_credentials`]).
    fn write_files(&self, chain_pem: &str, new_key: Option<&String>) -> Result<(), String> {
        write_credentials(&self.files, chain_pem, new_key.map(String::as_str))
    }
}

/// Writes a renewed certificate chain, and its new key if it has one, so that a crash at any
/// point leaves a pair that matches (see the module's notes): the key goes to `<key>.next`, then
/// the certificate replaces `<cert>`, then the key is renamed into place.
/// [`finish_interrupted_rotation`] completes what a crash cut short. Blocking (fsyncs).
pub fn write_credentials(
    files: &CredentialFiles,
    chain_pem: &str,
    new_key: Option<&str>,
) -> Result<(), String> {
    let io = |path: &Path, e: std::io::Error| format!("{}: {e}", path.display());
    let next = next_key_path(&files.key);
    if let Some(key) = new_key {
        crate::state::write_atomic(&next, key.as_bytes(), 0o600).map_err(|e| io(&next, e))?;
    }
    crate::state::write_atomic(&files.cert, chain_pem.as_bytes(), 0o644)
        .map_err(|e| io(&files.cert, e))?;
    if new_key.is_some() {
        std::fs::rename(&next, &files.key).map_err(|e| io(&files.key, e))?;
        if let Some(dir) = files.key.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
    }
    Ok(())
}

fn next_key_path(key: &Path) -> PathBuf {
    let mut name = key.file_name().unwrap_or_default().to_os_string();
    name.push(".next");
    key.with_file_name(name)
}

/// Completes a key rotation a crash interrupted: when `<key>.next` exists and is the key the
/// certificate certifies, it replaces `<key>`; when it is not, it is a rotation that never got
/// its certificate, and is removed.
pub fn finish_interrupted_rotation(files: &CredentialFiles) {
    let next = next_key_path(&files.key);
    if !next.exists() {
        return;
    }
    // The public keys are compared, nothing else: an expired certificate or an unreadable CA
    // file must not cost the only key that matches the certificate.
    let matches = (|| {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
            .ok()?
            .collect::<Result<_, _>>()
            .ok()?;
        let key = PrivateKeyDer::from_pem_file(&next).ok()?;
        Some(
            match rustls::sign::CertifiedKey::from_der(chain, key, &super::provider()) {
                Ok(_) => true,
                Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                    false
                }
                Err(_) => return None,
            },
        )
    })();
    match matches {
        Some(true) => match std::fs::rename(&next, &files.key) {
            Ok(()) => tracing::warn!(
                "finished a key rotation a stop interrupted: {} is the renewed certificate's key",
                files.key.display()
            ),
            Err(e) => tracing::error!("cannot finish a key rotation: {}: {e}", next.display()),
        },
        // A rotation that never got its certificate.
        Some(false) => {
            let _ = std::fs::remove_file(&next);
        }
        None => tracing::warn!(
            "{} is left alone: it could not be compared with {}",
            next.display(),
            files.cert.display()
        ),
    }
}

fn key_pem(key: &PrivateKeyDer<'static>) -> Result<String, String> {
    rcgen::KeyPair::try_from(key)
        .map(|k| k.serialize_pem())
        .map_err(|e| format!("the node's key cannot sign a renewal request: {e}"))
}

fn not_before(cert: &CertificateDer<'_>) -> Result<SystemTime, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).map_err(|e| e.to_string())?;
    let secs = parsed.validity().not_before.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

/// Watches the certificate while the node runs: says loudly when it nears its expiry without a
/// renewal, and once it has expired, recovers it through the gateway's enrolment channel (at the
/// pinned gateway address, or the last one the control stream used).
pub(crate) async fn watch(
    renewer: std::sync::Arc<Renewer>,
    mut gateway_up: tokio::sync::watch::Receiver<(Option<std::net::SocketAddr>, u64)>,
    pinned: Option<std::net::SocketAddr>,
    peers: std::sync::Arc<crate::peers::PeerSet>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_gateway = pinned;
    let mut backoff = mesh_core::Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        let now = crate::wallclock::time();
        let (not_before, not_after) = {
            let state = renewer.lock();
            (state.not_before, state.not_after)
        };
        let lifetime = not_after.duration_since(not_before).unwrap_or_default();
        let check = (lifetime / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let left = not_after.duration_since(now).unwrap_or_default();
        let mut delay = check;
        if left.is_zero() {
            if renewer.status().revoked {
                tracing::error!(
                    "this node's certificate expired and its identity is revoked: re-enrol it \
                     (mesh-node enroll) once the operator lifts the revocation"
                );
                delay = Duration::from_secs(300);
            } else if let Some(addr) = last_gateway {
                delay = backoff.next_delay(crate::rng::random());
                recover(&renewer, addr).await;
                if !renewer.expired(crate::wallclock::time()) {
                    backoff.reset();
                    delay = check;
                }
            } else {
                tracing::error!(
                    "this node's certificate expired and no gateway address is known to renew \
                     it through: set `gateway = \"addr:port\"` in its config"
                );
            }
        } else if renewer.due_in(now).is_zero() && gateway_up.borrow().0.is_none() {
            // Due, and no control stream: through a peer that reaches the gateway.
            relay(&renewer, &peers).await;
        } else if left < lifetime / 3 {
            let why = renewer
                .status()
                .problem
                .unwrap_or_else(|| "the gateway has not been reachable".to_owned());
            tracing::warn!(
                "this node's certificate expires in {}s and is not renewed yet: {why}",
                left.as_secs()
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            r = gateway_up.changed() => {
                if r.is_err() {
                    return;
                }
                if let Some(addr) = gateway_up.borrow_and_update().0 {
                    last_gateway = Some(addr);
                }
            }
            _ = stop.changed() => return,
        }
    }
}

/// One renewal through a connected peer (`_relay_enroll`), with the current key.
async fn relay(renewer: &std::sync::Arc<Renewer>, peers: &crate::peers::PeerSet) {
    let candidates: Vec<quinn::Connection> = peers
        .all_connections()
        .into_iter()
        .filter(|(info, _)| !info.id.is_gateway())
        .map(|(_, c)| c)
        .collect();
    if candidates.is_empty() {
        return;
    }
    let (request, chain, roots) = match renewer.recovery_request() {
        Ok(r) => r,
        Err(e) => {
            renewer.failed(e, false);
            return;
        }
    };
    for peer in candidates {
        let via = peer.remote_address();
        match super::enroll::recover_via(&peer, roots.clone(), &chain, &request).await {
            Ok(issued) => {
                let renewer = renewer.clone();
                let key = request.key_pem.clone();
                let installed = tokio::task::spawn_blocking(move || {
                    renewer.install(&issued.chain_pem, Some(key))
                })
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
                match installed {
                    Ok(()) => tracing::info!("certificate renewed through the peer at {via}"),
                    Err(e) => {
                        tracing::error!("the certificate renewed through {via} cannot be used: {e}")
                    }
                }
                return;
            }
            Err(super::enroll::EnrollError::Refused { reason, revoked }) if revoked => {
                tracing::error!("the gateway refused to renew this node's certificate: {reason}");
                renewer.failed(reason, true);
                return;
            }
            Err(e) => tracing::debug!("no renewal through {via}: {e}"),
        }
    }
    renewer.failed(
        "no control stream to the gateway, and no peer could relay the renewal".into(),
        false,
    );
}

/// One recovery attempt through the gateway at `addr`.
async fn recover(renewer: &std::sync::Arc<Renewer>, addr: std::net::SocketAddr) {
    let (request, chain, roots) = match renewer.recovery_request() {
        Ok(r) => r,
        Err(e) => {
            renewer.failed(e, false);
            return;
        }
    };
    tracing::warn!("this node's certificate expired: asking the gateway at {addr} to renew it");
    match super::enroll::recover(addr, roots, &chain, &request).await {
        Ok(issued) => {
            let renewer = renewer.clone();
            let key = request.key_pem.clone();
            let installed =
                tokio::task::spawn_blocking(move || renewer.install(&issued.chain_pem, Some(key)))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
            match installed {
                Ok(()) => tracing::info!("certificate recovered after its expiry"),
                Err(e) => tracing::error!("the recovered certificate cannot be used: {e}"),
            }
        }
        Err(super::enroll::EnrollError::Refused { reason, revoked }) => {
            tracing::error!(
                "the gateway refused to renew this node's expired certificate: {reason}"
            );
            renewer.failed(reason, revoked);
        }
        Err(e) => {
            tracing::warn!("cannot renew the expired certificate yet: {e}");
            renewer.failed(e.to_string(), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA and two certificates for one node, each with its own key: as before and after a
    /// rotation. Returns the files (cert holds the new certificate) and the two keys' PEM.
    fn rotated(dir: &Path) -> (CredentialFiles, String, String) {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut ca = rcgen::CertificateParams::default();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
        ca.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://t.test".try_into().expect("uri"),
        )];
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let leaf = |key: &rcgen::KeyPair| {
            let mut p = rcgen::CertificateParams::default();
            p.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://t.test/node/n1".try_into().expect("uri"),
            )];
            p.signed_by(key, &issuer).expect("leaf").pem()
        };
        let old = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let new = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let files = CredentialFiles {
            cert: dir.join("node.crt"),
            key: dir.join("node.key"),
            ca: dir.join("ca.crt"),
        };
        std::fs::write(&files.ca, ca_cert.pem()).expect("ca");
        // The crash came after the certificate was written and before the key was renamed.
        std::fs::write(&files.cert, leaf(&new)).expect("cert");
        std::fs::write(&files.key, old.serialize_pem()).expect("key");
        (files, old.serialize_pem(), new.serialize_pem())
    }

    #[test]
    fn a_rotation_cut_by_a_crash_is_finished_at_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (files, _, new) = rotated(dir.path());
        std::fs::write(next_key_path(&files.key), &new).expect("next");
        finish_interrupted_rotation(&files);
        assert_eq!(std::fs::read_to_string(&files.key).expect("key"), new);
        assert!(!next_key_path(&files.key).exists());
        assert!(Identity::load(&files.cert, &files.key, &files.ca).is_ok());
    }

    #[test]
    fn a_rotation_that_never_got_its_certificate_is_undone_and_doubt_keeps_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (files, old, new) = rotated(dir.path());
        // A .next key no certificate certifies: a rotation that never got its certificate.
        std::fs::write(&files.key, &new).expect("key");
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        std::fs::write(next_key_path(&files.key), other.serialize_pem()).expect("next");
        finish_interrupted_rotation(&files);
        assert!(
            !next_key_path(&files.key).exists(),
            "a key that matches nothing stayed"
        );
        assert_eq!(std::fs::read_to_string(&files.key).expect("key"), new);
        // A certificate that cannot be read: nothing is removed.
        std::fs::write(next_key_path(&files.key), &old).expect("next");
        std::fs::write(&files.cert, b"damaged").expect("cert");
        finish_interrupted_rotation(&files);
        assert_eq!(
            std::fs::read_to_string(next_key_path(&files.key)).expect("kept"),
            old
        );
    }
}
