//! Join tokens: what `mesh-gateway token create` prints and `mesh-node enroll --token` reads.
//!
//! `sj1.<64 hex: SHA-256 of the mesh root the gateway chains to>.<64 hex: the secret>`. The
//! fingerprint lets a device with nothing else check that it talks to its mesh's gateway before
//! it sends the secret; the gateway keeps only the SHA-256 of the secret, and accepts it once.

use core::fmt;
use core::str::FromStr;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// SHA-256 of the DER of the mesh root the gateway's certificate chains to.
    pub fingerprint: [u8; 32],
    /// The one-time secret.
    pub secret: [u8; 32],
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret is never printed.
        f.debug_struct("JoinToken")
            .field("fingerprint", &hex(&self.fingerprint))
            .finish_non_exhaustive()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sj1.{}.{}", hex(&self.fingerprint), hex(&self.secret))
    }
}

/// Why a token does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a join token (expected sj1.<64 hex digits>.<64 hex digits>, as `mesh-gateway token create` prints on its last line)"
)]
pub struct BadToken;

impl FromStr for JoinToken {
    type Err = BadToken;

    fn from_str(s: &str) -> Result<Self, BadToken> {
        let mut parts = s.trim().split('.');
        let (Some("sj1"), Some(fp), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BadToken);
        };
        Ok(JoinToken {
            fingerprint: unhex(fp).ok_or(BadToken)?,
            secret: unhex(secret).ok_or(BadToken)?,
        })
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from lowercase or uppercase hex; `None` if it is not hex of whole bytes.
pub fn unhex_vec(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_and_never_shows_its_secret() {
        let t = JoinToken {
            fingerprint: [0xab; 32],
            secret: [0x01; 32],
        };
        let text = t.to_string();
        assert_eq!(text.parse::<JoinToken>(), Ok(t.clone()));
        assert!(!format!("{t:?}").contains("0101"));
        for bad in [
            "",
            "sj1.ab",
            "sj2.x.y",
            &text[..text.len() - 1],
            &format!("{text}.x"),
        ] {
            assert_eq!(bad.parse::<JoinToken>(), Err(BadToken), "{bad}");
        }
    }
}
