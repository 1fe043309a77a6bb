//! SPIFFE IDs: `spiffe://<trust-domain>/node/<name>`, and for a microcontroller behind a node
//! `spiffe://<trust-domain>/node/<host>/leaf/<name>`. They are read from verified certificates
//! only; a name a peer claims is never an identity.

use std::fmt;

use crate::name::NodeName;

/// Why a URI is not a Starling SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("{0:?} is not a spiffe:// URI")]
    NotSpiffe(String),
    /// The trust domain is empty or holds characters a DNS-like name may not.
    #[error("bad trust domain {0:?}")]
    BadTrustDomain(String),
    /// The path is not `/node/<name>` or `/node/<host>/leaf/<name>`.
    #[error("{0:?} is not a node identity (want /node/<name>)")]
    BadPath(String),
}

/// A verified workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    node: NodeName,
    leaf: Option<NodeName>,
}

impl SpiffeId {
    /// The identity of node `node` in `trust_domain`.
    pub fn node(trust_domain: &str, node: NodeName) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_owned(),
            node,
            leaf: None,
        })
    }

    /// Parses `spiffe://td/node/name` or `spiffe://td/node/host/leaf/name`.
    pub fn parse(uri: &str) -> Result<Self, IdentityError> {
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        check_trust_domain(td)?;
        let bad = || IdentityError::BadPath(uri.to_owned());
        let parts: Vec<&str> = path.split('/').collect();
        let (node, leaf) = match parts.as_slice() {
            ["node", n] => (*n, None),
            ["node", n, "leaf", l] => (*n, Some(*l)),
            _ => return Err(bad()),
        };
        Ok(SpiffeId {
            trust_domain: td.to_owned(),
            node: NodeName::try_from(node).map_err(|_| bad())?,
            leaf: leaf
                .map(NodeName::try_from)
                .transpose()
                .map_err(|_| bad())?,
        })
    }

    /// The trust domain, e.g. `starling.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The node this identity is, or sits behind.
    pub fn node_name(&self) -> &NodeName {
        &self.node
    }

    /// The microcontroller behind the node, if this is a leaf identity.
    pub fn leaf(&self) -> Option<&NodeName> {
        self.leaf.as_ref()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}/node/{}", self.trust_domain, self.node)?;
        if let Some(leaf) = &self.leaf {
            write!(f, "/leaf/{leaf}")?;
        }
        Ok(())
    }
}

/// Checks a trust domain: lowercase letters, digits, `-`, `.` and `_`, 1 to 255 bytes.
pub fn check_trust_domain(td: &str) -> Result<(), IdentityError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_')
        });
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadTrustDomain(td.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_node_and_leaf() {
        let id = SpiffeId::parse("spiffe://starling.local/node/node-a").expect("valid");
        assert_eq!(id.trust_domain(), "starling.local");
        assert_eq!(id.node_name().as_str(), "node-a");
        assert_eq!(id.to_string(), "spiffe://starling.local/node/node-a");
        let leaf = SpiffeId::parse("spiffe://td/node/gw/leaf/mcu1").expect("valid");
        assert_eq!(leaf.leaf().map(NodeName::as_str), Some("mcu1"));
        assert_eq!(leaf.to_string(), "spiffe://td/node/gw/leaf/mcu1");
    }

    #[test]
    fn refuses_other_shapes() {
        assert!(matches!(
            SpiffeId::parse("https://x/node/a"),
            Err(IdentityError::NotSpiffe(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://td/svc/a"),
            Err(IdentityError::BadPath(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://td/node/a/b"),
            Err(IdentityError::BadPath(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://TD/node/a"),
            Err(IdentityError::BadTrustDomain(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe:///node/a"),
            Err(IdentityError::BadTrustDomain(_))
        ));
    }
}
