//! The policy this node runs under now: one shared cell, written by the control session (a bundle
//! from the gateway, or the one saved on disk at boot) and read once per call by the client
//! (routes, retries, timeouts) and the server (authorization, rate limits).
//!
//! The policy model and its parser live in `mesh-core` ([`mesh_core::policy`]).

use std::sync::{Arc, RwLock};

pub use mesh_core::policy::Policy;

/// Where the policy a node runs under came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySource {
    /// The copy saved on disk at boot (the gateway was not heard from yet).
    Saved,
    /// The gateway's control stream.
    Gateway,
    /// Set in process ([`crate::Node::set_policy`]).
    Local,
}

impl PolicySource {
    /// `saved`, `gateway` or `local`.
    pub fn as_str(&self) -> &'static str {
        match self {
            PolicySource::Saved => "saved",
            PolicySource::Gateway => "gateway",
            PolicySource::Local => "local",
        }
    }
}

/// The current bundle: its version and the parsed policy; `None` until one is applied.
#[derive(Default)]
pub(crate) struct PolicyCell {
    current: RwLock<Option<(u64, Arc<Policy>)>>,
    source: RwLock<Option<PolicySource>>,
}

impl PolicyCell {
    pub(crate) fn get(&self) -> Option<(u64, Arc<Policy>)> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn policy(&self) -> Option<Arc<Policy>> {
        self.get().map(|(_, p)| p)
    }

    /// The version held (0: none).
    pub(crate) fn version(&self) -> u64 {
        self.get().map_or(0, |(v, _)| v)
    }

    pub(crate) fn set(&self, version: u64, policy: Policy, source: PolicySource) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            Some((version, Arc::new(policy)));
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = Some(source);
    }

    /// Where the current policy came from; `None` when there is none.
    pub(crate) fn source(&self) -> Option<PolicySource> {
        *self.source.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn clear(&self) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = None;
        *self.source.write().unwrap_or_else(|p| p.into_inner()) = None;
    }
}
