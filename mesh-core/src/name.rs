//! Names parsed once at the edge; after that, functions take these types, not `&str`.

use std::fmt;

pub use mesh_proto::NameError;
use mesh_proto::validate_name;

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident($text:ty)) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name($text);

        impl $name {
            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<&str> for $name {
            type Error = NameError;
            fn try_from(s: &str) -> Result<Self, NameError> {
                validate_name(s)?;
                Ok($name(s.into()))
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::try_from(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
    };
}

name_type!(
    /// A node's name: the last segment of its SPIFFE ID and its mDNS instance name.
    ///
    /// Shared, not copied: a clone is a reference count. A caller's node names the callee of
    /// every call it makes (its telemetry, its logs).
    NodeName(std::sync::Arc<str>)
);
name_type!(
    /// A service's name, as hosts announce it and callers address it.
    ///
    /// Shared, not copied: a clone is a reference count. A callee names every call's service
    /// with the name of the hosted service it found, not a copy of the caller's text.
    ServiceName(std::sync::Arc<str>)
);
name_type!(
    /// A method of a service. Owned text: a call's method is whatever its caller sent, and a
    /// `String` is made with fewer instructions than a shared string.
    MethodName(String)
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_once() {
        let n = NodeName::try_from("node-a").expect("valid");
        assert_eq!(n.as_str(), "node-a");
        assert_eq!(ServiceName::try_from("a/b"), Err(NameError::BadChar('/')));
        assert!("".parse::<MethodName>().is_err());
    }
}
