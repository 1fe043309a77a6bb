//! The policy this node runs under now: one shared cell, written by the control session (a bundle
//! from the gateway, or the one saved on disk at boot) and read once per call by the client
//! (routes, retries, timeouts) and the server (authorization, rate limits).
//!
//! The cell fails closed: when the saved bundle is damaged the node cannot know what its policy
//! denies, so the server refuses every call (reserved services such as the control stream go on)
//! until the gateway delivers a good bundle.
//!
//! The policy model and its parser live in `mesh-core` ([`mesh_core::policy`]).

use std::sync::{Arc, RwLock};

pub use mesh_core::policy::Policy;
use mesh_proto::control::BundleRef;

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

/// What the cell holds.
#[derive(Clone, Default)]
pub(crate) enum PolicyState {
    /// No bundle ever: no policy, every call admitted.
    #[default]
    None,
    /// A bundle in force.
    Held {
        id: BundleRef,
        policy: Arc<Policy>,
        source: PolicySource,
        /// It is enforced but could not be saved (the reason): a restart would lose it.
        unsaved: Option<String>,
    },
    /// The saved bundle is damaged (the reason): every call is refused until a good one arrives.
    Damaged(String),
}

/// The deny list in force: certificates no connection is kept with.
pub(crate) type RevokedList = Arc<Vec<mesh_core::policy::Revoked>>;

/// The current bundle, shared.
#[derive(Default)]
pub(crate) struct PolicyCell {
    state: RwLock<PolicyState>,
    /// The deny list of the bundle in force (the transport watches it). A damaged bundle keeps
    /// the last list: what cannot be read never lifts a revocation.
    revoked: tokio::sync::watch::Sender<RevokedList>,
    /// Bumped at every change: what caches of decisions made under a policy are keyed on (a
    /// version number alone repeats across epochs).
    generation: std::sync::atomic::AtomicU64,
}

impl PolicyCell {
    pub(crate) fn state(&self) -> PolicyState {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The policy in force, if one is.
    pub(crate) fn policy(&self) -> Option<Arc<Policy>> {
        match &*self.state.read().unwrap_or_else(|p| p.into_inner()) {
            PolicyState::Held { policy, .. } => Some(policy.clone()),
            _ => None,
        }
    }

    /// What is in force, for admission: `Ok(None)` no policy, `Ok(Some)` a policy and the cell's
    /// generation (a key for decisions made under it), `Err(reason)` fail closed.
    pub(crate) fn for_admission(&self) -> Result<Option<(u64, Arc<Policy>)>, String> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let generation = self.generation.load(std::sync::atomic::Ordering::Acquire);
        match &*state {
            PolicyState::None => Ok(None),
            PolicyState::Held { policy, .. } => Ok(Some((generation, policy.clone()))),
            PolicyState::Damaged(why) => Err(why.clone()),
        }
    }

    fn replace(&self, next: PolicyState) {
        match &next {
            PolicyState::Held { policy, .. } => {
                self.set_revoked(policy.revoked.clone());
            }
            PolicyState::None => self.set_revoked(Vec::new()),
            PolicyState::Damaged(_) => {}
        }
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        *state = next;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The bundle held, if any.
    pub(crate) fn held(&self) -> Option<BundleRef> {
        match &*self.state.read().unwrap_or_else(|p| p.into_inner()) {
            PolicyState::Held { id, .. } => Some(*id),
            _ => None,
        }
    }

    /// The version held (0: none).
    pub(crate) fn version(&self) -> u64 {
        self.held().map_or(0, |id| id.version)
    }

    pub(crate) fn is_damaged(&self) -> bool {
        matches!(
            &*self.state.read().unwrap_or_else(|p| p.into_inner()),
            PolicyState::Damaged(_)
        )
    }

    pub(crate) fn set(&self, id: BundleRef, policy: Policy, source: PolicySource) {
        self.replace(PolicyState::Held {
            id,
            policy: Arc::new(policy),
            source,
            unsaved: None,
        });
    }

    /// Why the bundle in force is not saved, if it is not.
    pub(crate) fn unsaved(&self) -> Option<String> {
        match &*self.state.read().unwrap_or_else(|p| p.into_inner()) {
            PolicyState::Held { unsaved, .. } => unsaved.clone(),
            _ => None,
        }
    }

    /// The bundle in force is saved now.
    pub(crate) fn mark_saved(&self) {
        if let PolicyState::Held { unsaved, .. } =
            &mut *self.state.write().unwrap_or_else(|p| p.into_inner())
        {
            *unsaved = None;
        }
    }

    /// The bundle in force could not be saved.
    pub(crate) fn mark_unsaved(&self, why: String) {
        if let PolicyState::Held { unsaved, .. } =
            &mut *self.state.write().unwrap_or_else(|p| p.into_inner())
        {
            *unsaved = Some(why);
        }
    }

    /// Replaces the deny list (a gateway feeds its node the list it serves).
    pub(crate) fn set_revoked(&self, list: Vec<mesh_core::policy::Revoked>) {
        self.revoked.send_if_modified(|held| {
            let changed = **held != list;
            if changed {
                *held = Arc::new(list);
            }
            changed
        });
    }

    /// Watches the deny list.
    pub(crate) fn watch_revoked(&self) -> tokio::sync::watch::Receiver<RevokedList> {
        self.revoked.subscribe()
    }

    pub(crate) fn set_damaged(&self, why: String) {
        self.replace(PolicyState::Damaged(why));
    }

    pub(crate) fn clear(&self) {
        self.replace(PolicyState::None);
    }
}
