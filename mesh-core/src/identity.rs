//! SPIFFE IDs: `spiffe://<trust-domain>/node/<name>`, a gateway's
//! `spiffe://<trust-domain>/gateway/<name>`, and for a microcontroller behind a node
//! `spiffe://<trust-domain>/node/<host>/leaf/<name>`. They are read from verified certificates
//! only; a name a peer claims is never an identity, and a role (gateway) is what the CA certified,
//! never what a hello says.

use std::fmt;
use std::sync::Arc;

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
    /// The path is not `/node/<name>`, `/gateway/<name>` or `/node/<host>/leaf/<name>`.
    #[error("{0:?} is not a mesh identity (want /node/<name> or /gateway/<name>)")]
    BadPath(String),
}

/// What an identity is certified to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Certified {
    /// A node (`/node/<name>`).
    Node,
    /// A site's gateway (`/gateway/<name>`): the only identity a node takes policy from.
    Gateway,
    /// The site's cloud, through the gateway's bridge (`/cloud/<client-id>`). Never a
    /// certificate's: only a certified gateway may make a call as this identity, and the callee's
    /// policy decides what it may call.
    Cloud,
}

/// A verified workload identity. Shared, not copied: a callee hands its caller's identity to
/// every call it serves.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId(Arc<Parts>);

#[derive(Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct Parts {
    trust_domain: String,
    role: Certified,
    node: NodeName,
    leaf: Option<NodeName>,
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SpiffeId")
            .field("trust_domain", &self.0.trust_domain)
            .field("role", &self.0.role)
            .field("node", &self.0.node)
            .field("leaf", &self.0.leaf)
            .finish()
    }
}

impl SpiffeId {
    /// `role` `node` (behind which `leaf` sits) in `trust_domain`, checked.
    fn made(
        trust_domain: &str,
        role: Certified,
        node: NodeName,
        leaf: Option<NodeName>,
    ) -> Result<Self, IdentityError> {
        check_trust_domain(trust_domain)?;
        Ok(SpiffeId(Arc::new(Parts {
            trust_domain: trust_domain.to_owned(),
            role,
            node,
            leaf,
        })))
    }

    /// The identity of node `node` in `trust_domain`.
    pub fn node(trust_domain: &str, node: NodeName) -> Result<Self, IdentityError> {
        Self::made(trust_domain, Certified::Node, node, None)
    }

    /// The identity of gateway `name` in `trust_domain`.
    pub fn gateway(trust_domain: &str, name: NodeName) -> Result<Self, IdentityError> {
        Self::made(trust_domain, Certified::Gateway, name, None)
    }

    /// The cloud's identity `spiffe://<trust_domain>/cloud/<client_id>` (see [`Certified::Cloud`]).
    pub fn cloud(trust_domain: &str, client_id: NodeName) -> Result<Self, IdentityError> {
        Self::made(trust_domain, Certified::Cloud, client_id, None)
    }

    /// Parses a cloud identity (`spiffe://td/cloud/<client-id>`), as a gateway names it when it
    /// calls on the cloud's behalf; [`SpiffeId::parse`] (certificates) never yields one.
    pub fn parse_cloud(uri: &str) -> Result<Self, IdentityError> {
        let bad = || IdentityError::BadPath(uri.to_owned());
        let rest = uri
            .strip_prefix("spiffe://")
            .ok_or_else(|| IdentityError::NotSpiffe(uri.to_owned()))?;
        let (td, path) = rest.split_once('/').ok_or_else(bad)?;
        let name = path.strip_prefix("cloud/").ok_or_else(bad)?;
        SpiffeId::cloud(td, NodeName::try_from(name).map_err(|_| bad())?)
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
        let (role, node, leaf) = match parts.as_slice() {
            ["node", n] => (Certified::Node, *n, None),
            ["gateway", n] => (Certified::Gateway, *n, None),
            ["node", n, "leaf", l] => (Certified::Node, *n, Some(*l)),
            _ => return Err(bad()),
        };
        Ok(SpiffeId(Arc::new(Parts {
            trust_domain: td.to_owned(),
            role,
            node: NodeName::try_from(node).map_err(|_| bad())?,
            leaf: leaf
                .map(NodeName::try_from)
                .transpose()
                .map_err(|_| bad())?,
        })))
    }

    /// The trust domain, e.g. `starling.local`.
    pub fn trust_domain(&self) -> &str {
        &self.0.trust_domain
    }

    /// The node this identity is, or sits behind (a gateway's name, for a gateway).
    pub fn node_name(&self) -> &NodeName {
        &self.0.node
    }

    /// What the CA certified this identity to be.
    pub fn role(&self) -> Certified {
        self.0.role
    }

    /// Whether the CA certified a gateway.
    pub fn is_gateway(&self) -> bool {
        self.0.role == Certified::Gateway
    }

    /// The microcontroller behind the node, if this is a leaf identity.
    pub fn leaf(&self) -> Option<&NodeName> {
        self.0.leaf.as_ref()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.0.role {
            Certified::Node => "node",
            Certified::Gateway => "gateway",
            Certified::Cloud => "cloud",
        };
        write!(f, "spiffe://{}/{kind}/{}", self.0.trust_domain, self.0.node)?;
        if let Some(leaf) = &self.0.leaf {
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
    fn a_gateway_is_its_own_shape() {
        let gw = SpiffeId::parse("spiffe://td/gateway/gw").expect("valid");
        assert!(gw.is_gateway());
        assert_eq!(gw.node_name().as_str(), "gw");
        assert_eq!(gw.to_string(), "spiffe://td/gateway/gw");
        let node = SpiffeId::parse("spiffe://td/node/gw").expect("valid");
        assert!(!node.is_gateway());
        assert_ne!(gw, node);
        assert!(SpiffeId::parse("spiffe://td/gateway/gw/leaf/x").is_err());
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

    #[test]
    fn a_cloud_identity_never_comes_from_a_certificate() {
        let cloud = SpiffeId::parse_cloud("spiffe://td/cloud/site-7").expect("valid");
        assert_eq!(cloud.role(), Certified::Cloud);
        assert_eq!(cloud.to_string(), "spiffe://td/cloud/site-7");
        assert!(!cloud.is_gateway());
        // What a certificate names is parsed by `parse`, which has no cloud shape.
        assert!(SpiffeId::parse("spiffe://td/cloud/site-7").is_err());
        assert!(SpiffeId::parse_cloud("spiffe://td/node/a").is_err());
        assert!(SpiffeId::parse_cloud("spiffe://td/cloud/a/b").is_err());
    }
}
