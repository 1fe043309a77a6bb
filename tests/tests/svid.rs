//! Certificates the mesh issues are valid X509-SVIDs, as the SPIFFE project's own library (PyPI
//! `spiffe`, installed by scripts/setup.sh) judges them: SPIFFE tooling (SPIRE, go-spiffe, Envoy)
//! takes Starling identities.

use std::process::Command;

use starling_tests::Pki;

/// Runs a Python snippet with the `spiffe` library; returns its stdout, or panics with stderr.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 (scripts/setup.sh installs the spiffe package)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn issued_node_certificates_are_valid_x509_svids() {
    let pki = Pki::new();
    let certs = pki.node_dir("node-a").join("certs");
    let script = r#"
import sys
from spiffe import X509Svid, X509Bundle, TrustDomain
cert, key, ca = (open(p, 'rb').read() for p in sys.argv[1:4])
svid = X509Svid.parse(cert, key)
bundle = X509Bundle.parse(TrustDomain("starling.local"), ca)
print(svid.spiffe_id, len(bundle.x509_authorities))
"#;
    let out = python(
        script,
        &[
            certs.join("node.crt").to_str().expect("path"),
            certs.join("node.key").to_str().expect("path"),
            certs.join("ca.crt").to_str().expect("path"),
        ],
    );
    assert_eq!(out, "spiffe://starling.local/node/node-a 1");
}

#[test]
fn certificates_under_a_site_issuer_and_a_two_root_bundle_are_valid_x509_svids() {
    let pki = Pki::new();
    let issuer = pki.issuer("gw");
    let certs = pki
        .node_dir_from(&issuer, "node-b", std::time::Duration::from_secs(3600))
        .join("certs");
    // A bundle of two roots, as during a rotation.
    let other = mesh_gateway::ca::Ca::generate("starling.local").expect("second root");
    let bundle = pki.dir.path().join("bundle.crt");
    std::fs::write(
        &bundle,
        format!("{}{}", pki.ca.cert_pem(), other.cert_pem()),
    )
    .expect("bundle");
    let script = r#"
import sys
from spiffe import X509Svid, X509Bundle, TrustDomain
cert, key, ca = (open(p, 'rb').read() for p in sys.argv[1:4])
svid = X509Svid.parse(cert, key)
bundle = X509Bundle.parse(TrustDomain("starling.local"), ca)
print(svid.spiffe_id, len(svid.cert_chain), len(bundle.x509_authorities))
"#;
    let out = python(
        script,
        &[
            certs.join("node.crt").to_str().expect("path"),
            certs.join("node.key").to_str().expect("path"),
            bundle.to_str().expect("path"),
        ],
    );
    assert_eq!(out, "spiffe://starling.local/node/node-b 2 2");
}
