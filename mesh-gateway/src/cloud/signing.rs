//! Policy bundles signed by an operator key, the only kind the gateway takes from the cloud: the
//! broker is shared infrastructure, not an authority, so whoever can publish on the policy topic
//! still cannot change the site's policy without the key.
//!
//! Keys are Ed25519: the private key a PKCS#8 `PRIVATE KEY` PEM (what `openssl genpkey -algorithm
//! ed25519` writes), the public key a `PUBLIC KEY` (SPKI) PEM. A signed bundle is one JSON object:
//!
//! ```json
//! {"format": "starling-signed-policy/1", "signed_at_ms": 1790000000000,
//!  "policy": "<the policy TOML>", "key": "<key id>", "signature": "<hex>"}
//! ```
//!
//! The signature covers the format, the time and the policy text; the time orders bundles, so an
//! older bundle replayed by anyone who saw it is refused.

use std::path::{Path, PathBuf};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use serde::{Deserialize, Serialize};

/// The envelope's format name.
pub const FORMAT: &str = "starling-signed-policy/1";

/// The DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): the key's 32 bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Why a key or a bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SigningError(pub String);

fn err(e: impl std::fmt::Display) -> SigningError {
    SigningError(e.to_string())
}

/// An operator key that may sign policy.
#[derive(Debug, Clone)]
pub struct Signer {
    /// Its id: the first 8 bytes of the SHA-256 of the public key, hex.
    pub id: String,
    /// Where it was read from.
    pub path: PathBuf,
    key: [u8; 32],
}

fn key_id(public: &[u8]) -> String {
    mesh_core::token::hex(&ring::digest::digest(&ring::digest::SHA256, public).as_ref()[..8])
}

/// Reads an Ed25519 public key (`PUBLIC KEY` PEM).
pub fn load_public(path: &Path) -> Result<Signer, SigningError> {
    let der = SubjectPublicKeyInfoDer::from_pem_file(path)
        .map_err(|e| err(format!("{}: not a PUBLIC KEY PEM: {e}", path.display())))?;
    let key = der
        .as_ref()
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| err(format!("{}: not an Ed25519 public key", path.display())))?;
    Ok(Signer {
        id: key_id(&key),
        path: path.to_owned(),
        key,
    })
}

/// Makes a key pair: `<out>.key` (PKCS#8 PEM, mode 0600) and `<out>.pub` (SPKI PEM). Returns
/// the key id.
pub fn generate(out: &Path) -> Result<String, SigningError> {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).map_err(err)?;
    let key = out.with_extension("key");
    let public = out.with_extension("pub");
    for path in [&key, &public] {
        if path.exists() {
            return Err(err(format!(
                "{} exists: an operator key is never overwritten",
                path.display()
            )));
        }
    }
    let write = |path: &Path, pem: String, mode| {
        mesh_node::state::write_atomic(path, pem.as_bytes(), mode)
            .map_err(|e| err(format!("{}: {e}", path.display())))
    };
    write(&key, pair.serialize_pem(), 0o600)?;
    write(&public, pair.public_key_pem(), 0o644)?;
    Ok(load_public(&public)?.id)
}

/// A signed bundle, as published to `<prefix>/policy/set`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedPolicy {
    /// [`FORMAT`].
    pub format: String,
    /// The site it is for: the site's topic prefix, or `*` for every site (then whoever can
    /// publish to another site's `policy/set` may bring it there too: that is what it is for).
    pub site: String,
    /// When it was signed (ms since the Unix epoch): a bundle signed no later than the newest
    /// one applied is a replay.
    pub signed_at_ms: u64,
    /// The policy TOML.
    pub policy: String,
    /// The signer's key id.
    pub key: String,
    /// Ed25519 over the format, the site, the time and the policy, hex.
    pub signature: String,
}

/// What the signature covers.
fn signed_bytes(site: &str, signed_at_ms: u64, policy: &str) -> Vec<u8> {
    format!("{FORMAT}\n{site}\n{signed_at_ms}\n{policy}").into_bytes()
}

/// How far ahead of the gateway's clock a bundle's signing time may be: more, and one bundle
/// would block every later one until that time.
pub const MAX_CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;

/// Signs `policy` for `site` (a topic prefix, or `*`) with the private key in `key_path` at
/// `signed_at_ms`.
pub fn sign(
    key_path: &Path,
    site: &str,
    policy: &str,
    signed_at_ms: u64,
) -> Result<SignedPolicy, SigningError> {
    if site.is_empty() || site.contains(['\n', '+', '#']) {
        return Err(err(format!(
            "site {site:?}: the site's topic prefix, or * for every site"
        )));
    }
    let der = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        err(format!(
            "{}: not a PRIVATE KEY PEM: {e}",
            key_path.display()
        ))
    })?;
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_der())
        .map_err(|e| err(format!("{}: not an Ed25519 key: {e}", key_path.display())))?;
    let signature = pair.sign(&signed_bytes(site, signed_at_ms, policy));
    Ok(SignedPolicy {
        format: FORMAT.into(),
        site: site.to_owned(),
        signed_at_ms,
        policy: policy.to_owned(),
        key: key_id(pair.public_key().as_ref()),
        signature: mesh_core::token::hex(signature.as_ref()),
    })
}

/// Checks a signed bundle (the JSON bytes) against the operator keys, for site `site` (its
/// topic prefix) at `now_ms`; returns it and the signer.
pub fn verify<'s>(
    bytes: &[u8],
    signers: &'s [Signer],
    site: &str,
    now_ms: u64,
) -> Result<(SignedPolicy, &'s Signer), SigningError> {
    let signed: SignedPolicy = serde_json::from_slice(bytes)
        .map_err(|e| err(format!("not a signed policy bundle: {e}")))?;
    if signed.format != FORMAT {
        return Err(err(format!(
            "format {:?}: this gateway reads {FORMAT:?}",
            signed.format
        )));
    }
    if signers.is_empty() {
        return Err(err(
            "this gateway names no policy_signers in [cloud]: it takes no policy from the cloud",
        ));
    }
    let signer = signers.iter().find(|s| s.id == signed.key).ok_or_else(|| {
        err(format!(
            "key {:?} is not one of the gateway's policy_signers",
            signed.key
        ))
    })?;
    let signature = mesh_core::token::unhex_vec(&signed.signature)
        .ok_or_else(|| err("the signature is not hex"))?;
    UnparsedPublicKey::new(&ED25519, signer.key)
        .verify(
            &signed_bytes(&signed.site, signed.signed_at_ms, &signed.policy),
            &signature,
        )
        .map_err(|_| {
            err(format!(
                "the signature does not verify with key {}",
                signer.id
            ))
        })?;
    if signed.site != site && signed.site != "*" {
        return Err(err(format!(
            "signed for site {:?}, not this one ({site:?})",
            signed.site
        )));
    }
    if signed.signed_at_ms > now_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
        return Err(err(format!(
            "signed at {} ms, more than five minutes after this gateway's clock ({now_ms} ms)",
            signed.signed_at_ms
        )));
    }
    Ok((signed, signer))
}

/// The newest `signed_at_ms` applied from the cloud, kept with the gateway's policy state: a
/// bundle signed no later is a replay. A floor file that cannot be read is an error (every
/// bundle is refused, with the reason), never a floor of zero.
pub struct ReplayFloor {
    path: PathBuf,
}

const FLOOR_FORMAT: &str = "starling-policy-floor/1";

impl ReplayFloor {
    /// The floor kept at `path`.
    pub fn new(path: PathBuf) -> ReplayFloor {
        ReplayFloor { path }
    }

    /// The floor: 0 when no bundle came from the cloud yet.
    pub fn read(&self) -> Result<u64, SigningError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(err(format!("{}: {e}", self.path.display()))),
        };
        text.strip_prefix(FLOOR_FORMAT)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|rest| rest.strip_suffix('\n'))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| {
                err(format!(
                    "{} is damaged: bundles from the cloud are refused until it is repaired \
                     (it holds the newest signing time applied, which stops replays)",
                    self.path.display()
                ))
            })
    }

    /// Raises the floor to `signed_at_ms`, on disk before it returns.
    pub fn raise(&self, signed_at_ms: u64) -> Result<(), SigningError> {
        mesh_node::state::write_atomic(
            &self.path,
            format!("{FLOOR_FORMAT} {signed_at_ms}\n").as_bytes(),
            0o600,
        )
        .map_err(|e| err(format!("{}: {e}", self.path.display())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_verifies_only_unchanged_and_with_a_named_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let id = generate(&dir.path().join("op")).expect("generate");
        let other = generate(&dir.path().join("other")).expect("generate");
        assert_ne!(id, other);
        let signers = [load_public(&dir.path().join("op.pub")).expect("load")];
        let signed = sign(&dir.path().join("op.key"), "s/7", "[authz]\n", 5).expect("sign");
        let bytes = serde_json::to_vec(&signed).expect("json");
        let (ok, by) = verify(&bytes, &signers, "s/7", 10).expect("verifies");
        assert_eq!(ok.policy, "[authz]\n");
        assert_eq!(ok.signed_at_ms, 5);
        assert_eq!(by.id, id);

        let json = |s: &SignedPolicy| serde_json::to_vec(s).expect("json");
        let mut changed = signed.clone();
        changed.policy.push_str("default = \"allow\"\n");
        let e = verify(&json(&changed), &signers, "s/7", 10).expect_err("changed");
        assert!(e.0.contains("does not verify"), "{e}");
        let mut later = signed.clone();
        later.signed_at_ms += 1;
        assert!(
            verify(&json(&later), &signers, "s/7", 10).is_err(),
            "the time is signed"
        );
        let mut moved = signed.clone();
        moved.site = "s/8".into();
        assert!(
            verify(&json(&moved), &signers, "s/8", 10).is_err(),
            "the site is signed"
        );
        let e = verify(&bytes, &signers, "s/8", 10).expect_err("another site");
        assert!(e.0.contains("signed for site"), "{e}");
        let everywhere = sign(&dir.path().join("op.key"), "*", "[authz]\n", 5).expect("sign");
        assert!(verify(&json(&everywhere), &signers, "s/8", 10).is_ok());
        let ahead = sign(
            &dir.path().join("op.key"),
            "s/7",
            "[authz]\n",
            10 + MAX_CLOCK_AHEAD_MS + 1,
        )
        .expect("sign");
        let e = verify(&json(&ahead), &signers, "s/7", 10).expect_err("ahead");
        assert!(e.0.contains("five minutes"), "{e}");

        let stranger = sign(&dir.path().join("other.key"), "s/7", "[authz]\n", 5).expect("sign");
        let e = verify(&json(&stranger), &signers, "s/7", 10).expect_err("key");
        assert!(e.0.contains("not one of"), "{e}");
        let e = verify(b"{", &signers, "s/7", 10).expect_err("json");
        assert!(e.0.contains("not a signed"), "{e}");
        let e = verify(&bytes, &[], "s/7", 10).expect_err("none");
        assert!(e.0.contains("no policy_signers"), "{e}");
        // The private key is its owner's only.
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("op.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn the_replay_floor_survives_a_restart_and_a_damaged_one_refuses() {
        let dir = tempfile::tempdir().expect("tempdir");
        let floor = ReplayFloor::new(dir.path().join("floor"));
        assert_eq!(floor.read(), Ok(0));
        floor.raise(42).expect("raise");
        assert_eq!(ReplayFloor::new(dir.path().join("floor")).read(), Ok(42));
        std::fs::write(dir.path().join("floor"), "starling-policy-floor/1 4x\n").expect("damage");
        let e = floor.read().expect_err("damaged");
        assert!(e.0.contains("is damaged"), "{e}");
        std::fs::write(dir.path().join("floor"), "").expect("empty");
        assert!(floor.read().is_err(), "an empty floor is not zero");
    }
}
