//! TLS client configs for the gateway's links out of the site (the cloud's broker, the OTLP
//! collector): rustls with the ring provider, the server checked against a configured CA or the
//! system's roots, a client certificate when one is configured.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The server checked against `ca` (PEM; the system's roots without it), `cert_key` presented
/// when given. Errors name the file.
pub(crate) fn client_config(
    ca: Option<&Path>,
    cert_key: Option<&(PathBuf, PathBuf)>,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(ca) => {
            for cert in CertificateDer::pem_file_iter(ca)
                .map_err(|e| format!("ca {}: {e}", ca.display()))?
            {
                let cert = cert.map_err(|e| format!("ca {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("ca {}: no certificate in it", ca.display()));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no ca is set and the system has no CA certificates".into());
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    match cert_key {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cert {}: {e}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| format!("key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("cert and key: {e}"))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}
