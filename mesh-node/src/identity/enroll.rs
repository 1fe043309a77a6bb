//! The device's side of enrolment (`mesh-node enroll`) and of recovery after an expired
//! certificate: a QUIC connection to the gateway with ALPN `starling-enroll/1` and no client
//! certificate, the exchange of `mesh_proto::enroll`, and the files written at the end.
//!
//! The gateway's certificate is checked before anything secret is sent: its chain must lead to a
//! root the caller trusts (the one a join token pins by fingerprint, or the node's own CA bundle
//! when it recovers) and name a gateway of that root's trust domain. The key is made here and
//! never leaves the device.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::token::JoinToken;
use mesh_proto::enroll::{ENROLL_ALPN, ENROLL_VERSION, EnrollDown, EnrollUp, MAX_ENROLL_FRAME};
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{CertificateClaims, provider, trust_domain_of_ca};
use crate::wire::FrameReader;

/// Why enrolment (or recovery) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    /// The gateway could not be reached, or the connection broke.
    #[error("cannot reach the gateway at {addr}: {reason}")]
    Unreachable {
        /// The gateway's address.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The gateway is not the one the token (or the node's CA bundle) trusts.
    #[error("the gateway at {addr} is not trusted: {reason}; nothing secret was sent")]
    Untrusted {
        /// The gateway's address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The gateway refused.
    #[error("the gateway refused: {reason}")]
    Refused {
        /// Its reason.
        reason: String,
        /// The identity is revoked.
        revoked: bool,
    },
    /// What the gateway sent is not what was asked for.
    #[error("the gateway's answer is wrong: {0}")]
    BadAnswer(String),
    /// The files could not be written.
    #[error("{path}: {reason}")]
    Write {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// Which roots the gateway must chain to.
pub enum Trust {
    /// The root whose SHA-256 a join token pins (the device has nothing else).
    Pinned([u8; 32]),
    /// These roots (a node that had a certificate).
    Roots(Vec<CertificateDer<'static>>),
}

/// What the gateway issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate chain, PEM, leaf first (`node.crt`).
    pub chain_pem: String,
    /// The CA bundle, PEM (`ca.crt`).
    pub roots_pem: String,
}

/// A key made on this device and a certificate signing request for it.
pub struct Request {
    /// The key, PKCS#8 PEM: written 0600 and never sent or logged.
    pub key_pem: String,
    /// The request, DER.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request").finish_non_exhaustive()
    }
}

impl Request {
    /// A new P-256 key and a request naming node `name` (if given) as its common name.
    pub fn new(name: Option<&str>) -> Result<Request, String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| format!("cannot make a key: {e}"))?;
        Self::for_key(key, name)
    }

    /// A request for an existing key (PKCS#8 PEM).
    pub fn with_key_pem(key_pem: &str, name: Option<&str>) -> Result<Request, String> {
        let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| format!("the key: {e}"))?;
        Self::for_key(key, name)
    }

    fn for_key(key: rcgen::KeyPair, name: Option<&str>) -> Result<Request, String> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(name) = name {
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
        }
        let csr = params
            .serialize_request(&key)
            .map_err(|e| format!("cannot make the request: {e}"))?;
        Ok(Request {
            key_pem: key.serialize_pem(),
            csr_der: csr.der().to_vec(),
        })
    }
}

/// Enrols with a join token: checks the gateway against the token's fingerprint, sends the
/// token's secret and `request`, and returns what the gateway issued (checked: it certifies the
/// request's key and chains to the pinned root).
pub async fn join(
    gateway: SocketAddr,
    token: &JoinToken,
    request: &Request,
) -> Result<Issued, EnrollError> {
    exchange(
        gateway,
        Trust::Pinned(token.fingerprint),
        EnrollUp::Join {
            secret: token.secret.to_vec(),
            csr_der: request.csr_der.clone(),
        },
        &request.key_pem,
    )
    .await
}

/// Renews an expired certificate (within the gateway's grace window): proves the old identity
/// with its chain and a request signed by the same key.
pub async fn recover(
    gateway: SocketAddr,
    roots: Vec<CertificateDer<'static>>,
    chain: &[CertificateDer<'static>],
    request: &Request,
) -> Result<Issued, EnrollError> {
    exchange(
        gateway,
        Trust::Roots(roots),
        EnrollUp::Recover {
            chain_der: chain.iter().map(|c| c.to_vec()).collect(),
            csr_der: request.csr_der.clone(),
        },
        &request.key_pem,
    )
    .await
}

/// An enrolment connection to the gateway at `addr` (ALPN `starling-enroll/1`, no client
/// certificate; the gateway's chain is checked afterwards, before anything secret is sent), on
/// an endpoint of its own.
pub(crate) async fn connect(
    addr: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), EnrollError> {
    let unreachable = |reason: String| EnrollError::Unreachable { addr, reason };
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| unreachable(e.to_string()))?;
    let provider = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| unreachable(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(CheckedAfterwards { provider }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| unreachable(e.to_string()))?;
    let config = quinn::ClientConfig::new(Arc::new(quic));
    let connecting = endpoint
        .connect_with(config, addr, "starling.mesh")
        .map_err(|e| unreachable(e.to_string()))?;
    let conn = tokio::time::timeout(Duration::from_secs(10), connecting)
        .await
        .map_err(|_| unreachable("no handshake within 10 s".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    Ok((endpoint, conn))
}

async fn exchange(
    addr: SocketAddr,
    trust: Trust,
    up: EnrollUp,
    key_pem: &str,
) -> Result<Issued, EnrollError> {
    let unreachable = |reason: String| EnrollError::Unreachable { addr, reason };
    let untrusted = |reason: String| EnrollError::Untrusted { addr, reason };
    let (endpoint, conn) = connect(addr).await?;
    let result = async {
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let gateway_chain = peer_chain(&conn);
        run(
            send,
            FrameReader::new(recv),
            addr,
            up,
            key_pem,
            |roots_pem| {
                let chain = gateway_chain
                    .as_deref()
                    .ok_or_else(|| untrusted("no certificate".into()))?;
                let anchors = trusted_roots(&trust, roots_pem).map_err(untrusted)?;
                check_gateway(chain, &anchors).map_err(untrusted)?;
                Ok(anchors)
            },
        )
        .await
    }
    .await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    result
}

/// Renews through a peer that relays to the gateway (`_relay_enroll` on an established mesh
/// connection): the node's gateway is not reachable directly. The peer sees the exchange, so it
/// carries no secret: the chain and a request signed by the certificate's own key, and what comes
/// back is checked against the node's roots and key.
pub(crate) async fn recover_via(
    peer: &quinn::Connection,
    roots: Vec<CertificateDer<'static>>,
    chain: &[CertificateDer<'static>],
    request: &Request,
) -> Result<Issued, EnrollError> {
    let addr = peer.remote_address();
    let unreachable = |reason: String| EnrollError::Unreachable { addr, reason };
    let (mut send, recv) = peer
        .open_bi()
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let mut head = Vec::new();
    mesh_proto::encode_frame_vec(
        &mesh_proto::RequestHead::new(RELAY_SERVICE, "recover", 0),
        &mut head,
    );
    send.write_all(&head)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let up = EnrollUp::Recover {
        chain_der: chain.iter().map(|c| c.to_vec()).collect(),
        csr_der: request.csr_der.clone(),
    };
    run(
        send,
        FrameReader::new(recv),
        addr,
        up,
        &request.key_pem,
        |_| Ok(roots.clone()),
    )
    .await
}

/// The reserved service a node relays renewals through.
pub const RELAY_SERVICE: &str = "_relay_enroll";

/// The exchange after the connection: hello, the roots (checked by `trust`, which answers the
/// roots to check the answer against), the request, the answer.
async fn run(
    mut send: quinn::SendStream,
    mut reader: FrameReader,
    addr: SocketAddr,
    up: EnrollUp,
    key_pem: &str,
    trust: impl FnOnce(&str) -> Result<Vec<CertificateDer<'static>>, EnrollError>,
) -> Result<Issued, EnrollError> {
    let unreachable = |reason: String| EnrollError::Unreachable { addr, reason };
    write(
        &mut send,
        &EnrollUp::Hello {
            version: ENROLL_VERSION,
        },
    )
    .await
    .map_err(unreachable)?;
    let roots_pem = match read(&mut reader).await.map_err(unreachable)? {
        EnrollDown::Roots { pem } => pem,
        EnrollDown::Refused { reason, revoked } => {
            return Err(EnrollError::Refused { reason, revoked });
        }
        other => return Err(EnrollError::BadAnswer(format!("{other:?}"))),
    };
    let anchors = trust(&roots_pem)?;
    write(&mut send, &up).await.map_err(unreachable)?;
    let answer = match read(&mut reader).await.map_err(unreachable)? {
        EnrollDown::Issued {
            chain_pem,
            roots_pem,
        } => {
            check_issued(&chain_pem, key_pem, &anchors).map_err(EnrollError::BadAnswer)?;
            check_roots(&roots_pem, &anchors).map_err(EnrollError::BadAnswer)?;
            Ok(Issued {
                chain_pem,
                roots_pem,
            })
        }
        EnrollDown::Refused { reason, revoked } => Err(EnrollError::Refused { reason, revoked }),
        other => Err(EnrollError::BadAnswer(format!("{other:?}"))),
    };
    let _ = send.finish();
    answer
}

async fn write(send: &mut quinn::SendStream, up: &EnrollUp) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(up, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}

async fn read(reader: &mut FrameReader) -> Result<EnrollDown, String> {
    let frame = tokio::time::timeout(Duration::from_secs(15), reader.frame(MAX_ENROLL_FRAME))
        .await
        .map_err(|_| "no answer within 15 s".to_owned())?
        .map_err(|e| e.to_string())?;
    postcard::from_bytes(&frame).map_err(|e| format!("unreadable answer: {e}"))
}

fn peer_chain(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
}

/// The roots to check the gateway against: the pinned one among those it sent, or the node's.
fn trusted_roots(trust: &Trust, roots_pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    match trust {
        Trust::Roots(roots) => Ok(roots.clone()),
        Trust::Pinned(fingerprint) => {
            let sent: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(roots_pem.as_bytes())
                    .filter_map(Result::ok)
                    .collect();
            sent.into_iter()
                .find(|r| &sha256(r) == fingerprint)
                .map(|r| vec![r])
                .ok_or_else(|| {
                    format!(
                        "wrong CA fingerprint: the token pins {}, and the gateway's CA is not that one",
                        mesh_core::token::hex(fingerprint)
                    )
                })
        }
    }
}

/// The gateway's TLS chain leads to one of `roots` and names a gateway of their trust domain.
fn check_gateway(
    chain: &[CertificateDer<'static>],
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    verify_chain(leaf, intermediates, roots)?;
    let claims = CertificateClaims::of_chain(chain).map_err(|e| e.to_string())?;
    let td = roots
        .first()
        .and_then(|r| trust_domain_of_ca(r).ok().flatten())
        .ok_or("the root names no trust domain")?;
    if !claims.id.is_gateway() || claims.id.trust_domain() != td {
        return Err(format!("{} is not a gateway of {td}", claims.id));
    }
    Ok(())
}

fn verify_chain(
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).map_err(|e| e.to_string())?;
    }
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| e.to_string())?;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &store,
        intermediates,
        UnixTime::now(),
        provider().signature_verification_algorithms.all,
    )
    .map_err(|e| e.to_string())
}

/// What the gateway issued chains to `roots` and certifies the key made here.
fn check_issued(
    chain_pem: &str,
    key_pem: &str,
    roots: &[CertificateDer<'static>],
) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e:?}"))?;
    let (leaf, intermediates) = chain.split_first().ok_or("no certificate")?;
    verify_chain(leaf, intermediates, roots)?;
    let claims = CertificateClaims::of_chain(&chain).map_err(|e| e.to_string())?;
    if claims.id.is_gateway() {
        return Err(format!("the certificate is a gateway's ({})", claims.id));
    }
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| format!("{e:?}"))?;
    rustls::sign::CertifiedKey::from_der(chain, key, &provider())
        .map(|_| ())
        .map_err(|e| format!("the certificate is not for the key made here: {e}"))
}

/// The bundle to write as `ca.crt` holds the roots checked against, all of one trust domain.
fn check_roots(roots_pem: &str, anchors: &[CertificateDer<'static>]) -> Result<(), String> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(roots_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the CA bundle is not PEM: {e:?}"))?;
    if !anchors.iter().all(|a| roots.contains(a)) {
        return Err(
            "the CA bundle sent does not hold the root the gateway was checked against".into(),
        );
    }
    let domains: Vec<Option<String>> = roots
        .iter()
        .map(|r| trust_domain_of_ca(r).ok().flatten())
        .collect();
    if domains.iter().any(|d| d.is_none() || *d != domains[0]) {
        return Err("the CA bundle mixes trust domains, or holds a root that names none".into());
    }
    Ok(())
}

/// SHA-256 of a certificate's DER: what a join token pins.
pub fn sha256(cert: &CertificateDer<'_>) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// Writes `node.key` (0600), `node.crt` and `ca.crt` into `dir`; refuses to overwrite a key.
pub fn save(dir: &Path, key_pem: &str, issued: &Issued) -> Result<PathBuf, EnrollError> {
    let fail = |path: &Path, e: std::io::Error| EnrollError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(dir, e))?;
    let key = dir.join("node.key");
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&key).map_err(|e| fail(&key, e))?;
        f.write_all(key_pem.as_bytes()).map_err(|e| fail(&key, e))?;
        f.sync_all().map_err(|e| fail(&key, e))?;
    }
    for (name, pem) in [
        ("node.crt", &issued.chain_pem),
        ("ca.crt", &issued.roots_pem),
    ] {
        let path = dir.join(name);
        crate::state::write_atomic(&path, pem.as_bytes(), 0o644).map_err(|e| fail(&path, e))?;
    }
    Ok(key)
}

/// Accepts the gateway's chain during the handshake (its signature over the handshake is checked
/// as always): the chain itself is checked once the roots arrive, before anything secret is sent.
#[derive(Debug)]
struct CheckedAfterwards {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for CheckedAfterwards {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
