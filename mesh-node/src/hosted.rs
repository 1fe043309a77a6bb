//! The services this node hosts: one owned value that can change while the node runs (a
//! microcontroller on a serial line comes and goes, an operator adds a service). The server reads
//! it per call; the transport re-sends its hello to every peer, and discovery re-announces, when it
//! changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_core::ServiceName;
use tokio::sync::watch;

use crate::upstream::Upstream;

/// Hosted services by name.
pub(crate) type Services = BTreeMap<ServiceName, Arc<Upstream>>;

/// The shared, changeable set of hosted services.
pub(crate) struct Hosted {
    services: watch::Sender<Arc<Services>>,
    /// Services hosted only while a device offers them (a microcontroller's): while it does not,
    /// a call for one is Unavailable, not NotFound.
    intermittent: std::sync::RwLock<std::collections::BTreeSet<ServiceName>>,
}

impl Hosted {
    pub(crate) fn new(services: Services) -> Self {
        Hosted {
            services: watch::Sender::new(Arc::new(services)),
            intermittent: Default::default(),
        }
    }

    /// `service` is hosted only while a device offers it.
    pub(crate) fn mark_intermittent(&self, service: ServiceName) {
        self.intermittent
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(service);
    }

    /// Whether `service` is hosted only while a device offers it.
    pub(crate) fn is_intermittent(&self, service: &str) -> bool {
        self.intermittent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(service)
    }

    /// The upstream of `service`, if this node hosts it.
    pub(crate) fn get(&self, service: &str) -> Option<Arc<Upstream>> {
        self.services.borrow().get(service).cloned()
    }

    /// The name of the hosted service `service`, shared with it (not copied).
    pub(crate) fn name_of(&self, service: &str) -> Option<ServiceName> {
        self.services
            .borrow()
            .get_key_value(service)
            .map(|(name, _)| name.clone())
    }

    pub(crate) fn contains(&self, service: &str) -> bool {
        self.services.borrow().contains_key(service)
    }

    /// The names, sorted.
    pub(crate) fn names(&self) -> Vec<ServiceName> {
        self.services.borrow().keys().cloned().collect()
    }

    /// Adds or replaces `service`; false if nothing changed.
    pub(crate) fn insert(&self, service: ServiceName, upstream: Upstream) -> bool {
        self.services.send_if_modified(|current| {
            if current
                .get(&service)
                .is_some_and(|u| u.spec() == upstream.spec())
            {
                return false;
            }
            let mut next = Services::clone(current);
            next.insert(service, Arc::new(upstream));
            *current = Arc::new(next);
            true
        })
    }

    /// Removes `service`; false if it was not hosted.
    pub(crate) fn remove(&self, service: &str) -> bool {
        self.services.send_if_modified(|current| {
            if !current.contains_key(service) {
                return false;
            }
            let mut next = Services::clone(current);
            next.remove(service);
            *current = Arc::new(next);
            true
        })
    }

    /// A receiver that sees every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Services>> {
        self.services.subscribe()
    }
}
