//! Identity and TLS: a node's certificate and key, the mesh CA, and the verifiers that admit only
//! peers whose certificate chains to that CA and names a SPIFFE ID in its trust domain.
//!
//! Both sides of every connection verify the other (mutual TLS 1.3). Host names play no part: the
//! identity the rest of the code sees is the SPIFFE ID read from the verified certificate, never a
//! name the peer claims.

use std::path::Path;
use std::sync::Arc;

pub mod enroll;
pub mod renew;
mod verify;

use mesh_core::labels::Labels;
use mesh_core::{IdentityError, SpiffeId};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use verify::{MeshClientVerifier, MeshServerVerifier};

/// Why an identity could not be loaded or a certificate was refused. Its `Debug` is its message:
/// rustls carries a refusal as `Other(OtherError(..))` and shows it with `Debug`, so a refused
/// peer's reason reads the same in a log, an audit event and `/v1/status`.
#[derive(thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A certificate names no usable SPIFFE ID.
    #[error("certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    /// A certificate names more than one URI.
    #[error("certificate has {0} URI SANs; a mesh identity has exactly one")]
    ManyUris(usize),
    /// A chain holds more issuers than a CA above them allows.
    #[error("certificate chain too long: {0}")]
    PathTooLong(String),
    /// A certificate claims a leaf identity, which only a host node vouches for.
    #[error(
        "certificate claims the leaf identity {0}; a leaf is vouched for by its host node, never presented as a certificate"
    )]
    LeafCertificate(SpiffeId),
    /// The SPIFFE ID in a certificate is malformed.
    #[error("certificate identity: {0}")]
    BadSpiffeId(#[from] IdentityError),
    /// A certificate is for another trust domain.
    #[error("certificate is for trust domain {found:?}, this mesh is {expected:?}")]
    WrongTrustDomain {
        /// The mesh's trust domain.
        expected: String,
        /// The certificate's.
        found: String,
    },
    /// The certificate's label extension is malformed.
    #[error("certificate labels: {0}")]
    BadLabels(#[from] mesh_core::labels::LabelError),
    /// The certificate could not be parsed.
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    /// The node's certificate is not signed by the CA named beside it (one of the two files is
    /// not what it should be).
    #[error(
        "the node certificate is not signed by this CA ({0}): is this the mesh's CA, and the certificate this node's?"
    )]
    NotSignedByCa(String),
    /// The private key is not the one the certificate certifies.
    #[error("the private key does not belong to the certificate ({0})")]
    KeyMismatch(String),
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
}

impl std::fmt::Debug for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A node's credentials: its certificate chain, its private key, the mesh CA, and what they say.
pub struct Identity {
    /// The node's own SPIFFE ID, read from its certificate.
    pub id: SpiffeId,
    /// The labels its certificate certifies: what authorization and routing see of this node.
    pub labels: Labels,
    /// When its certificate chain stops being valid (the earliest notAfter in it).
    pub not_after: std::time::SystemTime,
    /// When its certificate became valid.
    pub not_before: std::time::SystemTime,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    ca_certs: Arc<Vec<CertificateDer<'static>>>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key is never printed.
        f.debug_struct("Identity")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads the node certificate, key and mesh CA from PEM files. The node's certificate must
    /// chain to the CA and carry a SPIFFE ID in the CA's trust domain.
    pub fn load(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        let chain = read_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Read {
            path: key.display().to_string(),
            reason: pem_reason(e, "private key"),
        })?;
        let ca_certs = read_certs(ca)?;
        Self::from_parts(chain, key, ca_certs)
    }

    /// Builds an identity from DER certificates and key already in memory.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca_certs: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in &ca_certs {
            roots.add(ca.clone())?;
        }
        let trust_domain = ca_certs
            .first()
            .map(|ca| trust_domain_of_ca(ca))
            .transpose()?
            .flatten();
        // Several roots (a CA rotation) are of one trust domain.
        for ca in ca_certs.iter().skip(1) {
            if let Some(other) = trust_domain_of_ca(ca)?
                && Some(&other) != trust_domain.as_ref()
            {
                return Err(TlsError::WrongTrustDomain {
                    expected: trust_domain.clone().unwrap_or_default(),
                    found: other,
                });
            }
        }
        let leaf = chain.first().ok_or(TlsError::NoSpiffeId)?;
        let CertificateClaims {
            id,
            labels,
            not_after,
            not_before,
            ..
        } = CertificateClaims::of_chain(&chain)?;
        if let Some(td) = &trust_domain
            && td != id.trust_domain()
        {
            return Err(TlsError::WrongTrustDomain {
                expected: td.clone(),
                found: id.trust_domain().to_owned(),
            });
        }
        let provider = provider();
        let parsed = ParsedCertificate::try_from(leaf)?;
        // Checked at a time the chain was valid: an expired certificate still loads (the node
        // warns, peers refuse it, and it is recovered through the gateway), but one the CA never
        // signed does not.
        // A clock in 1970 (a device without a real-time clock) is not the certificate's fault:
        // the node's wall clock sorts that out (see `wallclock`).
        let now = crate::wallclock::time();
        let at = if now >= not_after {
            not_after
                .checked_sub(std::time::Duration::from_secs(1))
                .unwrap_or(not_after)
        } else if now < not_before {
            not_before
        } else {
            now
        };
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            &chain[1..],
            UnixTime::since_unix_epoch(
                at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default(),
            ),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| TlsError::NotSignedByCa(format!("{e}")))?;
        // The key must be the one the certificate certifies (a key file left from another
        // certificate is named here, not at the first handshake).
        rustls::sign::CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider)
            .map_err(|e| TlsError::KeyMismatch(e.to_string()))?;
        Ok(Identity {
            id,
            labels,
            not_after,
            not_before,
            chain,
            key,
            roots: Arc::new(roots),
            ca_certs: Arc::new(ca_certs),
        })
    }

    /// The certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The mesh's roots.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.ca_certs
    }

    /// The private key (never log it).
    pub(crate) fn key(&self) -> &PrivateKeyDer<'static> {
        &self.key
    }

    /// The trust domain of this mesh.
    pub fn trust_domain(&self) -> &str {
        self.id.trust_domain()
    }

    /// The rustls server configuration: TLS 1.3 only, ALPN `starling/1`, client certificates
    /// required and checked against the mesh CA and trust domain.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        self.server_config_with(false)
    }

    /// [`Identity::server_config`]; with `enrolment`, a client may also come without a
    /// certificate, and with ALPN `starling-enroll/1` as well as `starling/1` (a gateway with an
    /// issuer: such a connection is served enrolment only, and a mesh connection without a
    /// certificate is closed at once).
    pub fn server_config_with(&self, enrolment: bool) -> Result<rustls::ServerConfig, TlsError> {
        self.server_config_preferring(enrolment, Cipher::of_this_cpu())
    }

    /// [`Identity::server_config_with`], for a machine whose fastest cipher is `cipher`: with
    /// [`Cipher::ChaCha`], the server picks ChaCha20-Poly1305 whatever the client prefers;
    /// with [`Cipher::Aes`], it takes the client's preference (so a client without AES
    /// instructions gets ChaCha20 too).
    pub fn server_config_preferring(
        &self,
        enrolment: bool,
        cipher: Cipher,
    ) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider_preferring(cipher);
        let builder =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone());
        let builder = if enrolment {
            builder.allow_unauthenticated()
        } else {
            builder
        };
        let inner = builder
            .build()
            .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
        let verifier = Arc::new(MeshClientVerifier {
            inner,
            ca_certs: self.ca_certs.clone(),
            trust_domain: self.trust_domain().to_owned(),
        });
        let mut config = rustls::ServerConfig::builder_with_details(
            provider,
            Arc::new(crate::wallclock::MeshTime),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![mesh_proto::ALPN.to_vec()];
        if enrolment {
            config
                .alpn_protocols
                .push(mesh_proto::enroll::ENROLL_ALPN.to_vec());
        }
        // No resumption: a resumed session skips the client certificate check, so a certificate
        // that expired (or is revoked) since the first handshake would be let in again. Every
        // connection verifies the peer's certificate in full.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        config.ignore_client_order = cipher == Cipher::ChaCha;
        Ok(config)
    }

    /// The rustls client configuration: TLS 1.3 only, ALPN `starling/1`, our certificate offered,
    /// the server's checked against the mesh CA and trust domain.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        self.client_config_preferring(Cipher::of_this_cpu())
    }

    /// [`Identity::client_config`], for a machine whose fastest cipher is `cipher` (offered
    /// first).
    pub fn client_config_preferring(
        &self,
        cipher: Cipher,
    ) -> Result<rustls::ClientConfig, TlsError> {
        let provider = provider_preferring(cipher);
        let verifier = Arc::new(MeshServerVerifier {
            roots: self.roots.clone(),
            ca_certs: self.ca_certs.clone(),
            provider: provider.clone(),
            trust_domain: self.trust_domain().to_owned(),
        });
        let mut config = rustls::ClientConfig::builder_with_details(
            provider,
            Arc::new(crate::wallclock::MeshTime),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![mesh_proto::ALPN.to_vec()];
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }
}

/// The one crypto provider of the mesh: ring, with its TLS 1.3 ciphers in the order that costs
/// this machine least ([`Cipher::of_this_cpu`]).
pub fn provider() -> Arc<CryptoProvider> {
    provider_preferring(Cipher::of_this_cpu())
}

/// ring, with `cipher` offered first.
fn provider_preferring(cipher: Cipher) -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    let first = cipher.suites();
    // A stable sort: the suites named come first, in their order; the others keep theirs.
    provider.cipher_suites.sort_by_key(|s| {
        first
            .iter()
            .position(|f| *f == s.suite())
            .unwrap_or(first.len())
    });
    Arc::new(provider)
}

/// The cipher a machine runs fastest, and so offers first. Both ends of a connection run the
/// cipher over every byte of every call.
///
/// - With AES and carry-less multiply instructions (x86-64 with AES-NI, ARMv8 with its crypto
///   extension: a Raspberry Pi 5), AES-128-GCM. rustls's first choice is
///   AES-256-GCM, which runs 14 AES rounds to its 10; QUIC's initial packets are AES-128 in any
///   case. On this project's x86-64 machine AES-GCM was about a tenth of a 16 KiB call's cycles
///   (`perf`), and AES-128 ran 4.4% fewer instructions a 16 KiB call, 0.7% a 64 B call
///   (callgrind; docs/PERFORMANCE.md, ninth slice).
/// - Without them (a Raspberry Pi 3 or 4, whose SoCs lack the extension; 32-bit ARM, where Rust
///   cannot yet ask), ChaCha20-Poly1305, which needs no special instructions to be fast, where
///   AES must run in constant-time software (not measured here: this machine has the
///   instructions).
///
/// All three TLS 1.3 suites stay allowed; only the order changes. A server that prefers ChaCha20
/// picks it whatever the client offers first, so a connection runs ChaCha20 unless both ends
/// have AES instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cipher {
    /// AES-128-GCM first.
    Aes,
    /// ChaCha20-Poly1305 first.
    ChaCha,
}

impl Cipher {
    /// The cipher this CPU runs fastest.
    pub fn of_this_cpu() -> Cipher {
        if aes_instructions() {
            Cipher::Aes
        } else {
            Cipher::ChaCha
        }
    }

    /// The TLS 1.3 suites, in this preference's order.
    fn suites(self) -> [rustls::CipherSuite; 3] {
        use rustls::CipherSuite::{
            TLS13_AES_128_GCM_SHA256 as AES_128, TLS13_AES_256_GCM_SHA384 as AES_256,
            TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
        };
        match self {
            Cipher::Aes => [AES_128, AES_256, CHACHA],
            Cipher::ChaCha => [CHACHA, AES_128, AES_256],
        }
    }
}

/// Whether this CPU has instructions for AES and for GCM's carry-less multiply.
fn aes_instructions() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |reason: String| TlsError::Read {
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(pem_reason(e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(pem_reason(e, "certificate")))?;
    if certs.is_empty() {
        return Err(err("no PEM certificate in file".into()));
    }
    Ok(certs)
}

fn pem_reason(e: rustls_pki_types::pem::Error, what: &str) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => format!("no PEM {what} in file"),
        other => format!("not a PEM {what}: {other:?}"),
    }
}

/// What a verified certificate (or the chain a peer presented) certifies: the identity, the
/// labels, and until when. Each certificate is parsed once.
#[derive(Debug, Clone)]
pub struct CertificateClaims {
    /// The SPIFFE ID in the leaf.
    pub id: SpiffeId,
    /// The leaf's certified labels.
    pub labels: Labels,
    /// The earliest notAfter of the chain.
    pub not_after: std::time::SystemTime,
    /// The leaf's notBefore.
    pub not_before: std::time::SystemTime,
    /// The leaf's serial number, hex (as the deny list writes it).
    pub serial: String,
    /// The key identifier of the root the chain leads to (the authority key identifier of its
    /// topmost certificate), hex: which root a node's certificate is under, during a CA rotation.
    pub root_key_id: Option<String>,
}

impl CertificateClaims {
    /// Reads `chain` (leaf first).
    pub fn of_chain(chain: &[CertificateDer<'_>]) -> Result<Self, TlsError> {
        let (leaf, rest) = chain.split_first().ok_or(TlsError::NoSpiffeId)?;
        let leaf = parse(leaf)?;
        let mut not_after = leaf.validity().not_after.timestamp();
        let mut root_key_id = authority_key_id(&leaf);
        for cert in rest {
            let cert = parse(cert)?;
            not_after = not_after.min(cert.validity().not_after.timestamp());
            root_key_id = authority_key_id(&cert);
        }
        let not_before = leaf.validity().not_before.timestamp();
        Ok(CertificateClaims {
            not_before: std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(not_before).unwrap_or(0)),
            id: spiffe_id_in(&leaf)?,
            labels: labels_in(&leaf)?,
            serial: mesh_core::policy::serial_hex(leaf.raw_serial()),
            root_key_id,
            not_after: std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(u64::try_from(not_after).unwrap_or(0)),
        })
    }

    /// What the verified certificate of an established connection's peer certifies.
    pub fn of_peer(conn: &quinn::Connection) -> Result<Self, TlsError> {
        Self::of_chain(&peer_certs(conn)?)
    }
}

fn authority_key_id(cert: &x509_parser::prelude::X509Certificate<'_>) -> Option<String> {
    use x509_parser::prelude::ParsedExtension;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki
                .key_identifier
                .as_ref()
                .map(|k| mesh_core::token::hex(k.0)),
            _ => None,
        })
}

/// The subject key identifier of a CA certificate, hex.
pub fn subject_key_id(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::ParsedExtension;
    let cert = parse(cert).ok()?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(mesh_core::token::hex(k.0)),
            _ => None,
        })
}

fn parse<'a>(
    cert: &'a CertificateDer<'_>,
) -> Result<x509_parser::prelude::X509Certificate<'a>, TlsError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(cert.as_ref())
        .map(|(_, parsed)| parsed)
        .map_err(|e| TlsError::BadCertificate(e.to_string()))
}

/// The SPIFFE ID in a certificate's URI SAN.
///
/// Only the shape the mesh issues is accepted: exactly one URI SAN, a SPIFFE ID of a node
/// (`spiffe://<td>/node/<name>`). A leaf ID (`.../node/<host>/leaf/<mcu>`) is vouched for by its
/// host node and never presented as a certificate; a second URI would let one certificate be read
/// as two identities.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    spiffe_id_in(&parse(cert)?)
}

fn spiffe_id_in(cert: &x509_parser::prelude::X509Certificate<'_>) -> Result<SpiffeId, TlsError> {
    let uris = uri_sans(cert)?;
    let uri = match uris.as_slice() {
        [] => return Err(TlsError::NoSpiffeId),
        [one] => one,
        _ => return Err(TlsError::ManyUris(uris.len())),
    };
    if !uri.starts_with("spiffe://") {
        return Err(TlsError::NoSpiffeId);
    }
    let id = SpiffeId::parse(uri)?;
    if id.leaf().is_some() {
        return Err(TlsError::LeafCertificate(id));
    }
    Ok(id)
}

/// The labels a certificate's issuer certified (none when it has no label extension). A
/// malformed extension is an error: such a certificate is refused, not read as unlabelled.
fn labels_in(cert: &x509_parser::prelude::X509Certificate<'_>) -> Result<Labels, TlsError> {
    // Compared as encoded bytes: x509-parser reads no arc wider than 63 bits, and ours is 64.
    let oid = mesh_core::labels::oid_der();
    let mut found = cert
        .extensions()
        .iter()
        .filter(|ext| ext.oid.as_bytes() == oid.as_slice());
    let Some(ext) = found.next() else {
        return Ok(Labels::new());
    };
    if found.next().is_some() {
        return Err(TlsError::BadCertificate("two label extensions".to_owned()));
    }
    Ok(mesh_core::labels::decode(ext.value)?)
}

/// The trust domain a CA certificate names in its `spiffe://<td>` URI SAN, if it names one.
pub fn trust_domain_of_ca(cert: &CertificateDer<'_>) -> Result<Option<String>, TlsError> {
    Ok(uri_sans(&parse(cert)?)?.into_iter().find_map(|u| {
        u.strip_prefix("spiffe://")
            .map(|td| td.trim_end_matches('/').to_owned())
            .filter(|td| !td.contains('/'))
    }))
}

fn uri_sans(cert: &x509_parser::prelude::X509Certificate<'_>) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::GeneralName;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    Ok(san
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The chain the peer of an established connection presented, which its handshake verified.
fn peer_certs(conn: &quinn::Connection) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|certs| *certs)
        .ok_or(TlsError::NoSpiffeId)
}

/// The SPIFFE ID of the peer of an established connection, from the certificate its handshake
/// verified.
pub fn peer_id(conn: &quinn::Connection) -> Result<SpiffeId, TlsError> {
    let certs = peer_certs(conn)?;
    spiffe_id_of(certs.first().ok_or(TlsError::NoSpiffeId)?)
}
