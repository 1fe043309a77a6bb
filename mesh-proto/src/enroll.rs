//! Enrolment (feature `alloc`): how a device with no certificate yet gets one from its gateway.
//!
//! The device dials the gateway's QUIC port with ALPN [`ENROLL_ALPN`] and no client certificate.
//! The gateway answers only this exchange on such a connection. The device sends
//! [`EnrollUp::Hello`]; the gateway answers [`EnrollDown::Roots`] (the mesh's CA bundle); the
//! device checks that one of those roots has the fingerprint its join token pins and that the
//! gateway's TLS certificate chains to it and names a gateway, and only then sends its token and
//! a certificate signing request ([`EnrollUp::Join`]). The private key never leaves the device.
//!
//! A node whose certificate expired while it was offline recovers the same way, proving who it
//! was with its expired chain and a request signed by the same key ([`EnrollUp::Recover`]).
//!
//! Frames are length-prefixed postcard like every Starling frame, each at most
//! [`MAX_ENROLL_FRAME`] bytes. Like every wire enum, these only grow at the end.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

/// The ALPN of an enrolment connection.
pub const ENROLL_ALPN: &[u8] = b"starling-enroll/1";

/// Largest enrolment frame.
pub const MAX_ENROLL_FRAME: usize = 64 * 1024;

/// The version of this exchange.
pub const ENROLL_VERSION: u16 = 1;

/// Device to gateway. Its `Debug` names the variant only: a token's secret is never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollUp {
    /// The first frame: nothing secret.
    Hello {
        /// [`ENROLL_VERSION`].
        version: u16,
    },
    /// A join token's secret and a certificate signing request (DER).
    Join {
        /// The token's secret part.
        secret: Vec<u8>,
        /// PKCS#10, signed by the key the device made.
        csr_der: Vec<u8>,
    },
    /// An expired certificate chain (DER, leaf first) and a request signed by its key: renewal
    /// within the gateway's grace window.
    Recover {
        /// The expired chain.
        chain_der: Vec<Vec<u8>>,
        /// PKCS#10, signed by the expired certificate's key.
        csr_der: Vec<u8>,
    },
}

impl core::fmt::Debug for EnrollUp {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            EnrollUp::Hello { .. } => "Hello",
            EnrollUp::Join { .. } => "Join",
            EnrollUp::Recover { .. } => "Recover",
        })
    }
}

/// Gateway to device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollDown {
    /// The mesh's CA bundle, PEM.
    Roots {
        /// The roots.
        pem: String,
    },
    /// The certificate (PEM chain, leaf first) and the CA bundle to write beside it.
    Issued {
        /// `node.crt`.
        chain_pem: String,
        /// `ca.crt`.
        roots_pem: String,
    },
    /// Refused, and why.
    Refused {
        /// In words.
        reason: String,
        /// The identity is revoked: re-enrolment needs the operator.
        revoked: bool,
    },
}
