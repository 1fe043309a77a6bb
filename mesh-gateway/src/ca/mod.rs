//! The mesh CA: one per trust domain. It makes the CA (ECDSA P-256) and issues node certificates
//! whose URI SAN is the node's SPIFFE ID.
//!
//! The CA certificate carries `spiffe://<trust-domain>` as its own URI SAN, so every node learns
//! the trust domain from the CA file it is given. Private keys are written mode 0600 and never
//! overwritten; nothing here logs them.

pub(crate) mod issuing;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use mesh_core::labels::{LABELS_OID, Labels};
use mesh_core::{NodeName, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// A bad name or trust domain.
    #[error("{0}")]
    Name(String),
    /// The CA certificate names no trust domain.
    #[error("{0}: the CA certificate has no spiffe://<trust-domain> URI SAN")]
    NoTrustDomain(PathBuf),
}

/// A loaded or new CA: the offline root (`ca init`), or a site issuer under it (`ca issuer`),
/// which a gateway holds to issue node certificates online.
pub struct Ca {
    /// The signing certificate.
    cert_pem: String,
    key: KeyPair,
    trust_domain: String,
    /// The certificates an issued leaf is presented with after it: empty under the root, the
    /// issuer's certificate under an issuer.
    chain_pem: String,
    /// The roots nodes trust (`ca.crt`).
    bundle_pem: String,
}

/// A freshly issued node certificate and its key, both PEM.
pub struct Issued {
    /// The identity the certificate proves.
    pub id: SpiffeId,
    /// The certificate.
    pub cert_pem: String,
    /// The private key: write it 0600, never log it.
    pub key_pem: String,
}

/// A site issuer's certificate and key, both PEM.
pub struct IssuerCert {
    /// The certificate.
    pub cert_pem: String,
    /// The private key: write it 0600, never log it.
    pub key_pem: String,
}

impl std::fmt::Debug for IssuerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuerCert").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Makes a new CA for `trust_domain`, valid for ten years.
    pub fn generate(trust_domain: &str) -> Result<Ca, CaError> {
        mesh_core::identity::check_trust_domain(trust_domain)
            .map_err(|e| CaError::Name(e.to_string()))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        // One issuer may stand between the root and a node: the site issuer a gateway holds.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        // A name of its own, so two roots of one trust domain (a rotation) read apart.
        params.distinguished_name.push(
            DnType::CommonName,
            format!(
                "Starling mesh CA {trust_domain} {}",
                mesh_core::token::hex(&random_serial().to_bytes()[..4])
            ),
        );
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(|_| CaError::Name(format!("bad trust domain {trust_domain:?}")))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key,
            trust_domain: trust_domain.to_owned(),
            chain_pem: String::new(),
            bundle_pem: cert.pem(),
        })
    }

    /// Loads `dir/ca.crt` and `dir/ca.key`.
    pub fn load(dir: &Path) -> Result<Ca, CaError> {
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let cert_pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        let der = rustls_pem_to_der(&cert_pem)
            .ok_or_else(|| CaError::NoTrustDomain(cert_path.clone()))?;
        let trust_domain = mesh_node::identity::trust_domain_of_ca(&der.into())
            .map_err(|e| CaError::Name(e.to_string()))?
            .ok_or(CaError::NoTrustDomain(cert_path))?;
        Ok(Ca {
            bundle_pem: cert_pem.clone(),
            cert_pem,
            key,
            trust_domain,
            chain_pem: String::new(),
        })
    }

    /// Loads a site issuer: its certificate and key (`issuer.crt`, `issuer.key` as `ca issuer`
    /// writes them) and the roots it chains to (`bundle`, the mesh's `ca.crt`). The issuer must
    /// be signed by one of those roots and name the same trust domain.
    pub fn load_issuer(cert: &Path, key_path: &Path, bundle: &Path) -> Result<Ca, CaError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key_path)?;
        check_private(key_path)?;
        let key = KeyPair::from_pem(&key_pem)?;
        let bundle_pem = read(bundle)?;
        let der =
            rustls_pem_to_der(&cert_pem).ok_or_else(|| CaError::NoTrustDomain(cert.to_owned()))?;
        let trust_domain = mesh_node::identity::trust_domain_of_ca(&der.clone().into())
            .map_err(|e| CaError::Name(e.to_string()))?
            .ok_or_else(|| CaError::NoTrustDomain(cert.to_owned()))?;
        let roots = rustls_pem_all(&bundle_pem);
        let root_td = roots
            .first()
            .map(|r| mesh_node::identity::trust_domain_of_ca(&r.clone().into()))
            .transpose()
            .map_err(|e| CaError::Name(e.to_string()))?
            .flatten();
        if root_td.as_deref() != Some(trust_domain.as_str()) {
            return Err(CaError::Name(format!(
                "{}: the issuer is for trust domain {trust_domain:?}, the roots in {} are for \
                 {root_td:?}",
                cert.display(),
                bundle.display()
            )));
        }
        if !signed_by_one_of(&der, &roots) {
            return Err(CaError::Name(format!(
                "{}: the issuer is not signed by a root in {}",
                cert.display(),
                bundle.display()
            )));
        }
        if rcgen::PublicKeyData::subject_public_key_info(&key) != public_key_of(&der) {
            return Err(CaError::Name(format!(
                "{}: this key is not the one of the issuer certificate {}",
                key_path.display(),
                cert.display()
            )));
        }
        Ok(Ca {
            chain_pem: cert_pem.clone(),
            cert_pem,
            key,
            trust_domain,
            bundle_pem,
        })
    }

    /// Makes a site issuer under this root for gateway `name`, valid for `days`: a CA that may
    /// sign node certificates and no further CA (path length 0). Its certificate's PEM is in
    /// `cert_pem`, and the roots nodes trust are this root.
    pub fn issue_issuer(&self, name: &str, days: u32) -> Result<IssuerCert, CaError> {
        if !self.chain_pem.is_empty() {
            return Err(CaError::Name(
                "an issuer cannot make another issuer: use the root CA (ca init)".into(),
            ));
        }
        let der = rustls_pem_to_der(&self.cert_pem)
            .ok_or_else(|| CaError::Name("the CA certificate does not parse".into()))?;
        if path_len_of(&der) == Some(0) {
            return Err(CaError::Name(
                "this CA was made with path length 0 (before site issuers): it can sign nodes \
                 but no issuer; make a new root with `ca init` and move to it with `ca rotate`"
                    .into(),
            ));
        }
        let name = NodeName::try_from(name)
            .map_err(|e| CaError::Name(format!("issuer name {name:?}: {e}")))?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.distinguished_name.push(
            DnType::CommonName,
            format!("Starling site issuer {name} of {}", self.trust_domain),
        );
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{}", self.trust_domain)
                .try_into()
                .map_err(|_| CaError::Name("bad trust domain".into()))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(i64::from(days.max(1)));
        let cert = params.signed_by(&key, &issuer)?;
        Ok(IssuerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The roots nodes trust, PEM (what `ca.crt` holds).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// Whether this is a site issuer rather than the root.
    pub fn is_issuer(&self) -> bool {
        !self.chain_pem.is_empty()
    }

    /// Writes `dir/ca.crt` (0644) and `dir/ca.key` (0600); refuses to overwrite either.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_new(
            &dir.join("ca.key"),
            self.key.serialize_pem().as_bytes(),
            0o600,
        )?;
        write_new(&dir.join("ca.crt"), self.cert_pem.as_bytes(), 0o644)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a certificate for node `name` of this CA's trust domain, valid for `days`.
    pub fn issue_node(&self, name: &str, days: u32) -> Result<Issued, CaError> {
        self.issue_node_labeled(name, days, &Labels::new())
    }

    /// Issues node `name` with certified `labels`: the labels authorization and routing use.
    pub fn issue_node_labeled(
        &self,
        name: &str,
        days: u32,
        labels: &Labels,
    ) -> Result<Issued, CaError> {
        let name = NodeName::try_from(name)
            .map_err(|e| CaError::Name(format!("node name {name:?}: {e}")))?;
        let id =
            SpiffeId::node(&self.trust_domain, name).map_err(|e| CaError::Name(e.to_string()))?;
        self.issue_labeled(id, days, labels)
    }

    /// Issues a certificate for gateway `name` of this CA's trust domain
    /// (`spiffe://<td>/gateway/<name>`), valid for `days`: the only identity nodes take policy from.
    pub fn issue_gateway(&self, name: &str, days: u32) -> Result<Issued, CaError> {
        let name = NodeName::try_from(name)
            .map_err(|e| CaError::Name(format!("gateway name {name:?}: {e}")))?;
        let id = SpiffeId::gateway(&self.trust_domain, name)
            .map_err(|e| CaError::Name(e.to_string()))?;
        self.issue(id, days)
    }

    /// Issues a certificate for any identity, even one outside this CA's trust domain (tests use
    /// that to prove such certificates are refused).
    pub fn issue(&self, id: SpiffeId, days: u32) -> Result<Issued, CaError> {
        self.issue_labeled(id, days, &Labels::new())
    }

    /// [`Ca::issue`] with certified labels (none: no label extension at all).
    pub fn issue_labeled(
        &self,
        id: SpiffeId,
        days: u32,
        labels: &Labels,
    ) -> Result<Issued, CaError> {
        self.issue_for(
            id,
            std::time::Duration::from_secs(86_400 * u64::from(days.max(1))),
            labels,
        )
    }

    /// Issues `id` with `labels`, valid from a little before now (for clocks a little behind)
    /// until `lifetime` from now.
    pub fn issue_for(
        &self,
        id: SpiffeId,
        lifetime: std::time::Duration,
        labels: &Labels,
    ) -> Result<Issued, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert_pem = self.certify(&id, lifetime, labels, &key)?;
        Ok(Issued {
            id,
            cert_pem,
            key_pem: key.serialize_pem(),
        })
    }

    /// Certifies `public_key` (from a signing request: the key stays where it was made) as `id`
    /// with `labels` for `lifetime`; returns the chain to present, PEM, leaf first.
    pub fn certify(
        &self,
        id: &SpiffeId,
        lifetime: std::time::Duration,
        labels: &Labels,
        public_key: &impl rcgen::PublicKeyData,
    ) -> Result<String, CaError> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, id.node_name().as_str());
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|_| CaError::Name(format!("bad identity {id}")))?,
        )];
        // An X509-SVID leaf: basic constraints present with cA false, digitalSignature only (no
        // keyCertSign, no cRLSign), so SPIFFE tooling (SPIRE, go-spiffe, Envoy) takes it.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        if !labels.is_empty() {
            // Non-critical: tooling that does not know it still takes the certificate.
            let value =
                mesh_core::labels::encode(labels).map_err(|e| CaError::Name(e.to_string()))?;
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(LABELS_OID, value));
        }
        params.serial_number = Some(random_serial());
        let now = OffsetDateTime::now_utc();
        // Backdated a little for clocks a little behind: an hour, or a tenth of a short
        // lifetime (nodes renew at two thirds of the validity, which must stay mostly ahead).
        let backdate = std::time::Duration::from_secs(3600).min(lifetime / 10);
        params.not_before = now - backdate;
        params.not_after = now + lifetime;
        let cert = params.signed_by(public_key, &issuer)?;
        Ok(format!("{}{}", cert.pem(), self.chain_pem))
    }
}

/// A random positive serial number of 16 bytes: every certificate has its own, so one can be
/// revoked without its renewal.
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from_slice(&bytes)
}

fn path_len_of(der: &[u8]) -> Option<u32> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let constraints = cert.basic_constraints().ok().flatten()?;
    constraints.value.path_len_constraint
}

fn public_key_of(der: &[u8]) -> Vec<u8> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    X509Certificate::from_der(der)
        .map(|(_, c)| c.public_key().raw.to_vec())
        .unwrap_or_default()
}

/// Whether `cert` is signed by one of `roots`.
pub(crate) fn signed_by_one_of(cert: &[u8], roots: &[Vec<u8>]) -> bool {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return false;
    };
    roots.iter().any(|r| {
        X509Certificate::from_der(r)
            .is_ok_and(|(_, root)| cert.verify_signature(Some(root.public_key())).is_ok())
    })
}

/// Refuses a private key readable by others.
fn check_private(path: &Path) -> Result<(), CaError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| CaError::Io {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(CaError::Name(format!(
                "{}: the issuer's key has mode {:04o}: it must be readable by its owner only \
                 (chmod 600)",
                path.display(),
                mode & 0o777
            )));
        }
    }
    Ok(())
}

impl Issued {
    /// Writes `dir/node.crt`, `dir/node.key` (0600) and `dir/ca.crt`; refuses to overwrite.
    pub fn save(&self, dir: &Path, ca_pem: &str) -> Result<(), CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
            path: dir.to_owned(),
            source,
        })?;
        write_new(&dir.join("node.key"), self.key_pem.as_bytes(), 0o600)?;
        write_new(&dir.join("node.crt"), self.cert_pem.as_bytes(), 0o644)?;
        write_new(&dir.join("ca.crt"), ca_pem.as_bytes(), 0o644)
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Creates `path` with `mode` and `contents`; an existing file is an error, never overwritten.
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = options.open(path).map_err(io)?;
    f.write_all(contents).map_err(io)?;
    f.sync_all().map_err(io)
}

fn rustls_pem_all(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.to_vec())
        .collect()
}

fn rustls_pem_to_der(pem: &str) -> Option<Vec<u8>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .map(|c| c.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_node_certificate_that_names_its_identity() {
        let ca = Ca::generate("starling.local").expect("ca");
        let issued = ca.issue_node("node-a", 30).expect("issue");
        assert_eq!(issued.id.to_string(), "spiffe://starling.local/node/node-a");
        let der = rustls_pem_to_der(&issued.cert_pem).expect("pem");
        let id = mesh_node::identity::spiffe_id_of(&der.into()).expect("spiffe id");
        assert_eq!(id, issued.id);
        assert!(!format!("{issued:?}").contains("PRIVATE"));
    }

    #[test]
    fn refuses_bad_names() {
        let ca = Ca::generate("starling.local").expect("ca");
        let e = ca.issue_node("a/b", 1).expect_err("slash");
        assert!(e.to_string().contains("'/'"), "{e}");
        let e = ca.issue_node(&"x".repeat(64), 1).expect_err("long");
        assert!(e.to_string().contains("at most 63"), "{e}");
        assert!(Ca::generate("Bad Domain").is_err());
    }

    #[test]
    fn saves_keys_private_and_never_overwrites() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate("td.example").expect("ca");
        ca.save(dir.path()).expect("save");
        let mode = std::fs::metadata(dir.path().join("ca.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(ca.save(dir.path()).is_err(), "overwrote an existing CA");
        let loaded = Ca::load(dir.path()).expect("load");
        assert_eq!(loaded.trust_domain(), "td.example");
    }
}
