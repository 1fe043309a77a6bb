//! The gateway's online issuing: join tokens, enrolment, renewal over the control stream, and
//! recovery of certificates that expired while their node was away.
//!
//! Every certificate is issued by the site issuer for the name the gateway decides (the token's,
//! or the one the node's verified certificate names), with the labels the gateway decides (the
//! token's, or the ones the old certificate certified); a request contributes its public key and
//! nothing else, and one that names another node is refused. Revoked identities get nothing.
//! Tokens are kept as the SHA-256 of their secret, in `tokens.json` (0600) in the gateway's
//! state folder; one is marked used on disk before its certificate is sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_core::labels::Labels;
use mesh_core::token::{JoinToken, hex};
use mesh_core::{NodeName, SpiffeId};
use mesh_node::identity::CertificateClaims;
use mesh_node::wire::FrameReader;
use mesh_proto::enroll::{ENROLL_VERSION, EnrollDown, EnrollUp, MAX_ENROLL_FRAME};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Ca;
use crate::audit::AuditLog;
use crate::policy::Policies;

/// A refusal: its reason, and whether the identity is revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) reason: String,
    pub(crate) revoked: bool,
}

fn refuse(reason: impl Into<String>) -> Refusal {
    Refusal {
        reason: reason.into(),
        revoked: false,
    }
}

/// One join token, as kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    /// SHA-256 of the secret, hex.
    hash: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    expires_unix: u64,
    #[serde(default)]
    used_unix: Option<u64>,
    #[serde(default)]
    used_from: Option<String>,
}

#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFile {
    #[serde(default)]
    tokens: Vec<TokenRecord>,
}

/// A token just made: print `token` once, it is not kept.
#[derive(Debug)]
pub(crate) struct NewToken {
    pub(crate) token: JoinToken,
    pub(crate) id: SpiffeId,
    pub(crate) expires_unix: u64,
}

/// The site issuer and what it issues.
pub(crate) struct Issuing {
    ca: Ca,
    lifetime: Duration,
    grace: Duration,
    /// The mesh's roots, DER and PEM.
    roots: Vec<CertificateDer<'static>>,
    /// SHA-256 of the root the gateway's own certificate chains to: what tokens pin.
    fingerprint: [u8; 32],
    tokens_path: PathBuf,
    tokens: Mutex<TokenFile>,
    policies: Arc<Policies>,
    audit: Arc<AuditLog>,
    /// Enrolment connections served at once; more are closed at once (no certificate is needed
    /// to open one).
    slots: Arc<tokio::sync::Semaphore>,
    /// Refusals audited in the current second, and that second: anyone can be refused, so the
    /// audit log is not theirs to fill.
    refusals: Mutex<(u64, u32)>,
}

/// Enrolment connections served at once.
const MAX_ENROLMENTS: usize = 16;
/// Time an enrolment connection may take in all.
const ENROLMENT_DEADLINE: Duration = Duration::from_secs(30);
/// Refusals written to the audit log per second, at most (the rest are counted in the log).
const AUDITED_REFUSALS_PER_SECOND: u32 = 10;

impl Issuing {
    /// The issuer `ca`, issuing for `lifetime` and renewing up to `grace` after expiry; tokens
    /// kept in `state_dir/tokens.json` (damaged: an error, the gateway does not start).
    pub(crate) fn new(
        ca: Ca,
        lifetime: Duration,
        grace: Duration,
        own_chain: &[CertificateDer<'static>],
        state_dir: &Path,
        policies: Arc<Policies>,
        audit: Arc<AuditLog>,
    ) -> Result<Issuing, String> {
        let roots: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(ca.bundle_pem().as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("the CA bundle: {e:?}"))?;
        // The root this gateway's certificate chains to (the last of its chain's issuers).
        let top = own_chain.last().ok_or("the gateway has no certificate")?;
        let fingerprint = roots
            .iter()
            .find(|r| super::signed_by_one_of(top, &[r.to_vec()]))
            .map(mesh_node::identity::enroll::sha256)
            .ok_or("the gateway's certificate does not chain to a root of its CA bundle")?;
        let tokens_path = state_dir.join("tokens.json");
        let tokens = match std::fs::read(&tokens_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "{}: the join tokens are damaged ({e}); restore the file or remove it (every \
                     unused token is then void)",
                    tokens_path.display()
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
            Err(e) => return Err(format!("{}: {e}", tokens_path.display())),
        };
        Ok(Issuing {
            ca,
            lifetime,
            grace,
            roots,
            fingerprint,
            tokens_path,
            tokens: Mutex::new(tokens),
            policies,
            audit,
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_ENROLMENTS)),
            refusals: Mutex::new((0, 0)),
        })
    }

    fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, TokenFile> {
        self.tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save_tokens(&self, file: &TokenFile) -> Result<(), String> {
        let bytes = serde_json::to_vec_pretty(file).map_err(|e| e.to_string())?;
        mesh_node::state::write_atomic(&self.tokens_path, &bytes, 0o600)
            .map_err(|e| format!("{}: {e}", self.tokens_path.display()))
    }

    /// Makes a one-time join token for node `name` with certified `labels`, valid for `ttl`, at
    /// the request of admin token `by`.
    pub(crate) fn create_token(
        &self,
        name: &str,
        labels: Labels,
        ttl: Duration,
        by: &str,
    ) -> Result<NewToken, String> {
        let node = NodeName::try_from(name).map_err(|e| format!("node name {name:?}: {e}"))?;
        let id = SpiffeId::node(self.trust_domain(), node).map_err(|e| e.to_string())?;
        let mut secret = [0u8; 32];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| "no randomness".to_owned())?;
        let expires_unix = unix_now() + ttl.as_secs().max(1);
        // Certified labels are an operator's decision: the audit log says which.
        let shown = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",");
        let record = TokenRecord {
            hash: hex(&sha256(&secret)),
            name: name.to_owned(),
            labels: labels.into_iter().collect(),
            expires_unix,
            used_unix: None,
            used_from: None,
        };
        {
            let mut tokens = self.tokens();
            let now = unix_now();
            // Spent and expired tokens are forgotten after a day.
            tokens
                .tokens
                .retain(|t| t.used_unix.unwrap_or(t.expires_unix).saturating_add(86_400) > now);
            tokens.tokens.push(record);
            self.save_tokens(&tokens)?;
        }
        self.audit.record(
            "gateway",
            "token_created",
            vec![
                ("id".into(), id.to_string()),
                ("labels".into(), shown),
                ("expires_unix".into(), expires_unix.to_string()),
                ("by".into(), by.to_owned()),
            ],
        );
        Ok(NewToken {
            token: JoinToken {
                fingerprint: self.fingerprint,
                secret,
            },
            id,
            expires_unix,
        })
    }

    /// Enrolment: the token's secret and a request from `remote`.
    fn join(&self, secret: &[u8], csr_der: &[u8], remote: SocketAddr) -> Result<String, Refusal> {
        let hash = hex(&sha256(secret));
        let mut tokens = self.tokens();
        let now = unix_now();
        let Some(record) = tokens.tokens.iter_mut().find(|t| t.hash == hash) else {
            return Err(refuse("unknown join token"));
        };
        if let Some(used) = record.used_unix {
            return Err(refuse(format!(
                "this join token was used already (at unix time {used}, from {}): make a new one \
                 with `mesh-gateway token create`",
                record.used_from.as_deref().unwrap_or("?")
            )));
        }
        if now >= record.expires_unix {
            return Err(refuse(format!(
                "this join token expired at unix time {}: make a new one",
                record.expires_unix
            )));
        }
        let node = NodeName::try_from(record.name.as_str()).map_err(|e| refuse(e.to_string()))?;
        let id = SpiffeId::node(self.trust_domain(), node).map_err(|e| refuse(e.to_string()))?;
        if let Some(r) = self.revocation_of(&id, None) {
            return Err(r);
        }
        let csr = check_request(csr_der, &id)?;
        let labels: Labels = record.labels.clone();
        let chain = self
            .ca
            .certify(&id, self.lifetime, &labels, &csr.public_key)
            .map_err(|e| refuse(format!("cannot issue: {e}")))?;
        // Spent on disk before the certificate leaves: a crash never lets it be used twice.
        record.used_unix = Some(now);
        record.used_from = Some(remote.to_string());
        let saved = self.save_tokens(&tokens);
        drop(tokens);
        saved.map_err(|e| refuse(format!("the gateway cannot record the token as used: {e}")))?;
        Ok(chain)
    }

    /// Renewal over the control stream of a node whose valid certificate says `claims`.
    pub(crate) fn renew(
        &self,
        claims: &CertificateClaims,
        csr_der: &[u8],
    ) -> Result<String, Refusal> {
        if let Some(r) = self.revocation_of(&claims.id, Some(&claims.serial)) {
            return Err(r);
        }
        let csr = check_request(csr_der, &claims.id)?;
        self.ca
            .certify(&claims.id, self.lifetime, &claims.labels, &csr.public_key)
            .map_err(|e| refuse(format!("cannot issue: {e}")))
    }

    /// Recovery: an expired chain, within the grace window, and a request signed by its key.
    fn recover(
        &self,
        chain_der: &[Vec<u8>],
        csr_der: &[u8],
    ) -> Result<(String, SpiffeId), Refusal> {
        let chain: Vec<CertificateDer<'static>> = chain_der
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let claims = CertificateClaims::of_chain(&chain).map_err(|e| refuse(e.to_string()))?;
        if claims.id.trust_domain() != self.trust_domain() || claims.id.is_gateway() {
            return Err(refuse(format!("{} is not a node of this mesh", claims.id)));
        }
        // Signed by the mesh CA: checked at a time the chain was valid.
        let (leaf, intermediates) = chain
            .split_first()
            .ok_or_else(|| refuse("no certificate"))?;
        let at = claims
            .not_after
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(claims.not_after);
        verify_at(leaf, intermediates, &self.roots, at)
            .map_err(|e| refuse(format!("the expired certificate is not the mesh's: {e}")))?;
        let expired_for = SystemTime::now()
            .duration_since(claims.not_after)
            .unwrap_or_default();
        if expired_for > self.grace {
            return Err(refuse(format!(
                "the certificate expired {}s ago, past the grace window of {}s: re-enrol the node \
                 with a join token (mesh-node enroll)",
                expired_for.as_secs(),
                self.grace.as_secs()
            )));
        }
        if let Some(r) = self.revocation_of(&claims.id, Some(&claims.serial)) {
            return Err(r);
        }
        let csr = check_request(csr_der, &claims.id)?;
        // The request must be signed by the expired certificate's key: that is the proof.
        if public_key_der(leaf)
            != Some(rcgen::PublicKeyData::subject_public_key_info(
                &csr.public_key,
            ))
        {
            return Err(refuse(
                "the request is not signed by the expired certificate's key",
            ));
        }
        let chain = self
            .ca
            .certify(&claims.id, self.lifetime, &claims.labels, &csr.public_key)
            .map_err(|e| refuse(format!("cannot issue: {e}")))?;
        Ok((chain, claims.id))
    }

    /// The refusal for a revoked identity or certificate.
    fn revocation_of(&self, id: &SpiffeId, serial: Option<&str>) -> Option<Refusal> {
        let id = id.to_string();
        // The deny list of the bundle in force: the gateway's own and the operator's entries.
        self.policies
            .enforced()
            .into_iter()
            .find(|r| r.matches(&id, serial.unwrap_or("")))
            .map(|r| Refusal {
                reason: format!(
                    "{id} is revoked ({})",
                    r.reason.as_deref().unwrap_or("no reason given")
                ),
                revoked: true,
            })
    }

    /// Serves one enrolment connection, within a deadline and a bound on how many at once.
    async fn serve_bounded(self: Arc<Self>, conn: quinn::Connection) {
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            conn.close(1u32.into(), b"busy: try again later");
            return;
        };
        let remote = conn.remote_address();
        if tokio::time::timeout(ENROLMENT_DEADLINE, self.serve_connection(conn.clone()))
            .await
            .is_err()
        {
            warn!("enrolment connection from {remote} took too long: closed");
            conn.close(1u32.into(), b"too slow");
        }
    }

    /// Serves one enrolment connection.
    async fn serve_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        let Ok(Ok((mut send, recv))) =
            tokio::time::timeout(Duration::from_secs(10), conn.accept_bi()).await
        else {
            conn.close(1u32.into(), b"no enrolment request");
            return;
        };
        let mut reader = FrameReader::new(recv);
        let result: Result<(), String> = async {
            match read(&mut reader).await? {
                EnrollUp::Hello { version } if version == ENROLL_VERSION => {}
                other => {
                    let why =
                        format!("expected a hello of version {ENROLL_VERSION}, got {other:?}");
                    write(
                        &mut send,
                        &EnrollDown::Refused {
                            reason: why.clone(),
                            revoked: false,
                        },
                    )
                    .await?;
                    return Err(why);
                }
            }
            write(
                &mut send,
                &EnrollDown::Roots {
                    pem: self.ca.bundle_pem().to_owned(),
                },
            )
            .await?;
            let (answer, what, id) = match read(&mut reader).await? {
                EnrollUp::Join { secret, csr_der } => {
                    let id = self.token_id(&secret);
                    (self.join(&secret, &csr_der, remote), "enrolled", id)
                }
                EnrollUp::Recover { chain_der, csr_der } => {
                    match self.recover(&chain_der, &csr_der) {
                        Ok((chain, id)) => (Ok(chain), "recovered", Some(id.to_string())),
                        Err(r) => (Err(r), "recovered", None),
                    }
                }
                EnrollUp::Hello { .. } => (Err(refuse("a second hello")), "enrolled", None),
            };
            let id = id.unwrap_or_else(|| "?".to_owned());
            match answer {
                Ok(chain_pem) => {
                    info!("{what}: {id} from {remote}");
                    self.audit.record(
                        "gateway",
                        what,
                        vec![("id".into(), id), ("remote".into(), remote.to_string())],
                    );
                    write(
                        &mut send,
                        &EnrollDown::Issued {
                            chain_pem,
                            roots_pem: self.ca.bundle_pem().to_owned(),
                        },
                    )
                    .await
                }
                Err(refusal) => {
                    warn!("refused enrolment from {remote} ({id}): {}", refusal.reason);
                    if self.audit_refusal() {
                        self.audit.record(
                            "gateway",
                            if what == "enrolled" {
                                "enrolment_refused"
                            } else {
                                "recovery_refused"
                            },
                            vec![
                                ("id".into(), id),
                                ("remote".into(), remote.to_string()),
                                ("reason".into(), refusal.reason.clone()),
                            ],
                        );
                    }
                    write(
                        &mut send,
                        &EnrollDown::Refused {
                            reason: refusal.reason,
                            revoked: refusal.revoked,
                        },
                    )
                    .await
                }
            }
        }
        .await;
        if let Err(e) = result {
            warn!("enrolment connection from {remote}: {e}");
        }
        let _ = send.finish();
        // The device closes once it has read the answer; bounded either way.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }

    /// Whether this refusal goes to the audit log (at most so many a second; the first one left
    /// out of a second says so).
    fn audit_refusal(&self) -> bool {
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        let now = unix_now();
        if r.0 != now {
            *r = (now, 0);
        }
        r.1 += 1;
        if r.1 == AUDITED_REFUSALS_PER_SECOND + 1 {
            self.audit.record(
                "gateway",
                "enrolment_refusals_not_audited",
                vec![(
                    "why".into(),
                    format!("more than {AUDITED_REFUSALS_PER_SECOND} refusals in a second"),
                )],
            );
        }
        r.1 <= AUDITED_REFUSALS_PER_SECOND
    }

    /// The identity a token's secret was made for, for the audit trail.
    fn token_id(&self, secret: &[u8]) -> Option<String> {
        let hash = hex(&sha256(secret));
        self.tokens()
            .tokens
            .iter()
            .find(|t| t.hash == hash)
            .map(|t| format!("spiffe://{}/node/{}", self.trust_domain(), t.name))
    }
}

/// The enrolment connections of the gateway's node.
pub(crate) struct EnrollService(pub(crate) Arc<Issuing>);

impl mesh_node::EnrollService for EnrollService {
    fn serve(
        &self,
        conn: quinn::Connection,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(self.0.clone().serve_bounded(conn))
    }
}

/// Parses and checks a request: signed by its key, and naming nobody but `id` (a common name
/// other than the node's, or any SAN other than its SPIFFE ID, is a request for another name).
fn check_request(
    csr_der: &[u8],
    id: &SpiffeId,
) -> Result<rcgen::CertificateSigningRequestParams, Refusal> {
    let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
    let csr = rcgen::CertificateSigningRequestParams::from_der(&der)
        .map_err(|e| refuse(format!("the certificate signing request is invalid: {e}")))?;
    for (kind, value) in csr.params.distinguished_name.iter() {
        if *kind == rcgen::DnType::CommonName {
            let name = match value {
                rcgen::DnValue::Utf8String(s) => s.clone(),
                rcgen::DnValue::PrintableString(s) => s.as_str().to_owned(),
                rcgen::DnValue::Ia5String(s) => s.as_str().to_owned(),
                other => format!("{other:?}"),
            };
            if name != id.node_name().as_str() {
                return Err(refuse(format!(
                    "the request is for {name:?}, and this enrolment is for {}",
                    id.node_name()
                )));
            }
        }
    }
    for san in &csr.params.subject_alt_names {
        let ok = matches!(san, rcgen::SanType::URI(uri) if uri.as_str() == id.to_string());
        if !ok {
            return Err(refuse(format!(
                "the request names {san:?}, and this enrolment is for {id}"
            )));
        }
    }
    Ok(csr)
}

fn verify_at(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
    at: SystemTime,
) -> Result<(), String> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let parsed = rustls::server::ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        intermediates,
        rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(secs)),
        mesh_node::identity::provider()
            .signature_verification_algorithms
            .all,
    )
    .map_err(|e| e.to_string())
}

fn public_key_der(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(cert.as_ref())
        .ok()
        .map(|(_, c)| c.public_key().raw.to_vec())
}

async fn read(reader: &mut FrameReader) -> Result<EnrollUp, String> {
    let frame = tokio::time::timeout(Duration::from_secs(10), reader.frame(MAX_ENROLL_FRAME))
        .await
        .map_err(|_| "nothing came within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    postcard::from_bytes(&frame).map_err(|e| format!("bad enrolment frame: {e}"))
}

async fn write(send: &mut quinn::SendStream, down: &EnrollDown) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(down, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
