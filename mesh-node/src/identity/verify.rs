//! The verifiers both sides of every connection run: the certificate must chain to the mesh CA
//! and name a SPIFFE ID in its trust domain. Host names play no part.

use std::sync::Arc;

use mesh_core::SpiffeId;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{CertificateClaims, TlsError};

/// Checks that a verified end-entity certificate names a node of `trust_domain`.
fn check_identity(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<SpiffeId, rustls::Error> {
    let refuse = |e: TlsError| {
        tracing::warn!("refusing a peer certificate: {e}");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    };
    // The identity and the labels, read as the node will read them once the handshake is done:
    // a certificate whose labels do not parse is refused here.
    let id = CertificateClaims::of_chain(std::slice::from_ref(cert))
        .map_err(refuse)?
        .id;
    if id.trust_domain() != trust_domain {
        return Err(refuse(TlsError::WrongTrustDomain {
            expected: trust_domain.to_owned(),
            found: id.trust_domain().to_owned(),
        }));
    }
    Ok(id)
}

/// With a clock that dates nothing (see `wallclock`), only a certified gateway is checked, as of
/// its certificate's notBefore, so that the node can take the time from it; every other peer is
/// refused. Returns the time to check the chain at.
fn dated(end_entity: &CertificateDer<'_>, now: UnixTime) -> Result<UnixTime, rustls::Error> {
    if crate::wallclock::now().1 != crate::wallclock::Basis::Unknown {
        return Ok(now);
    }
    let refuse = |why: String| {
        tracing::warn!("refusing a peer certificate: {why}");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            TlsError::BadCertificate(why),
        ))))
    };
    let claims = CertificateClaims::of_chain(std::slice::from_ref(end_entity))
        .map_err(|e| refuse(e.to_string()))?;
    if !claims.id.is_gateway() {
        return Err(refuse(format!(
            "this node's clock is before its own certificate's notBefore and it has no time \
             floor nor its gateway's time yet: it cannot tell whether {}'s certificate is valid, \
             and refuses it rather than trust a certificate it cannot date",
            claims.id
        )));
    }
    let at = claims
        .not_before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        + std::time::Duration::from_secs(1);
    Ok(UnixTime::since_unix_epoch(at))
}

/// Enforces the path length constraints webpki leaves unchecked: the mesh CA (and any issuer
/// under it) says how many CAs may stand between it and a node; a path with more is refused. The
/// path is followed from the leaf, issuer to subject, through the presented certificates (extra
/// ones that are not on it change nothing), up to a mesh CA.
fn check_path_length(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    ca_certs: &[CertificateDer<'static>],
) -> Result<(), rustls::Error> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    fn parse(der: &[u8]) -> Option<X509Certificate<'_>> {
        X509Certificate::from_der(der).map(|(_, c)| c).ok()
    }
    fn path_len(cert: &X509Certificate<'_>) -> Option<u32> {
        cert.basic_constraints()
            .ok()
            .flatten()
            .and_then(|bc| bc.value.path_len_constraint)
    }
    let refuse = |why: String| {
        let e = TlsError::PathTooLong(why);
        tracing::warn!("refusing a peer certificate: {e}");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    };
    let roots: Vec<X509Certificate<'_>> =
        ca_certs.iter().filter_map(|c| parse(c.as_ref())).collect();
    let presented: Vec<X509Certificate<'_>> = intermediates
        .iter()
        .filter_map(|c| parse(c.as_ref()))
        .collect();
    let Some(mut current) = parse(end_entity.as_ref()) else {
        return Err(refuse("the certificate does not parse".into()));
    };
    // `below`: CAs met so far between the leaf and where the walk stands.
    for below in 0..=presented.len() {
        if let Some(root) = roots
            .iter()
            .find(|r| r.subject().as_raw() == current.issuer().as_raw())
        {
            if let Some(max) = path_len(root)
                && below > max as usize
            {
                return Err(refuse(format!(
                    "{below} issuers under a mesh CA that allows {max}"
                )));
            }
            return Ok(());
        }
        let Some(issuer) = presented
            .iter()
            .find(|c| c.subject().as_raw() == current.issuer().as_raw())
        else {
            return Err(refuse("the chain does not lead to a mesh CA".into()));
        };
        if let Some(max) = path_len(issuer)
            && below > max as usize
        {
            return Err(refuse(format!(
                "{below} CAs below an issuer that allows {max}"
            )));
        }
        current = issuer.clone();
    }
    Err(refuse("the chain loops".into()))
}

/// The client side's check of a server: chain to the mesh CA, then the trust domain. The TLS server
/// name is not checked: peers are found by address, and who they are is their SPIFFE ID.
#[derive(Debug)]
pub(super) struct MeshServerVerifier {
    pub(super) roots: Arc<RootCertStore>,
    pub(super) ca_certs: Arc<Vec<CertificateDer<'static>>>,
    pub(super) provider: Arc<CryptoProvider>,
    pub(super) trust_domain: String,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now = dated(end_entity, now)?;
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        check_path_length(end_entity, intermediates, &self.ca_certs)?;
        check_identity(end_entity, &self.trust_domain)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
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

/// The server side's check of a client: webpki's chain check, then the trust domain.
#[derive(Debug)]
pub(super) struct MeshClientVerifier {
    pub(super) inner: Arc<dyn ClientCertVerifier>,
    pub(super) ca_certs: Arc<Vec<CertificateDer<'static>>>,
    pub(super) trust_domain: String,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let now = dated(end_entity, now)?;
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_path_length(end_entity, intermediates, &self.ca_certs)?;
        check_identity(end_entity, &self.trust_domain)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
