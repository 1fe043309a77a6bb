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

use super::{TlsError, spiffe_id_of};

/// Checks that a verified end-entity certificate names a node of `trust_domain`.
fn check_identity(
    cert: &CertificateDer<'_>,
    trust_domain: &str,
) -> Result<SpiffeId, rustls::Error> {
    let refuse = |e: TlsError| {
        tracing::warn!("refusing a peer certificate: {e}");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    };
    let id = spiffe_id_of(cert).map_err(refuse)?;
    if id.trust_domain() != trust_domain {
        return Err(refuse(TlsError::WrongTrustDomain {
            expected: trust_domain.to_owned(),
            found: id.trust_domain().to_owned(),
        }));
    }
    Ok(id)
}

/// Enforces the path length constraints webpki leaves unchecked: the mesh CA (and any issuer
/// under it) says how many CAs may stand between it and a node; a chain with more is refused. The
/// presented chain is read as the path: the leaf's issuer first.
fn check_path_length(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    ca_certs: &[CertificateDer<'static>],
) -> Result<(), rustls::Error> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let refuse = |why: String| {
        let e = TlsError::PathTooLong(why);
        tracing::warn!("refusing a peer certificate: {e}");
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
    };
    fn parse(der: &[u8]) -> Option<X509Certificate<'_>> {
        X509Certificate::from_der(der).map(|(_, c)| c).ok()
    }
    // Each intermediate may have at most its own path length of CAs below it.
    for (below, der) in intermediates.iter().enumerate() {
        let Some(cert) = parse(der.as_ref()) else {
            return Err(refuse("an intermediate certificate does not parse".into()));
        };
        if let Ok(Some(bc)) = cert.basic_constraints()
            && let Some(max) = bc.value.path_len_constraint
            && below > max as usize
        {
            return Err(refuse(format!(
                "{below} CAs below an issuer that allows {max}"
            )));
        }
    }
    // The mesh CA at the top of the chain allows at most its path length of issuers under it.
    let top = intermediates.last().unwrap_or(end_entity);
    let Some(top) = parse(top.as_ref()) else {
        return Err(refuse("the chain does not parse".into()));
    };
    for ca in ca_certs {
        let Some(ca) = parse(ca.as_ref()) else {
            continue;
        };
        if ca.subject().as_raw() != top.issuer().as_raw() {
            continue;
        }
        if let Ok(Some(bc)) = ca.basic_constraints()
            && let Some(max) = bc.value.path_len_constraint
            && intermediates.len() > max as usize
        {
            return Err(refuse(format!(
                "{} issuers under a mesh CA that allows {max}",
                intermediates.len()
            )));
        }
    }
    Ok(())
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

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
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
