//! Which endpoints serve which service.
//!
//! The table is fed by events (a peer said hello with its services, a peer left) and answers
//! `endpoints(service)`. Which of them takes a call is the balancer's choice (`crate::balance`),
//! after routing (`crate::route`) has narrowed them to a subset.

use std::hash::Hash;

use crate::name::ServiceName;

/// A map from service to the endpoints (of key type `K`, e.g. a peer's identity) that host it.
#[derive(Debug, Clone)]
pub struct ServiceTable<K> {
    services: crate::FastMap<ServiceName, Vec<K>>,
}

impl<K: Clone + Eq + Hash> Default for ServiceTable<K> {
    fn default() -> Self {
        ServiceTable {
            services: crate::FastMap::default(),
        }
    }
}

impl<K: Clone + Eq + Hash> ServiceTable<K> {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `endpoint` hosts exactly `services`, replacing what it hosted before.
    pub fn set_endpoint(&mut self, endpoint: &K, services: impl IntoIterator<Item = ServiceName>) {
        self.remove_endpoint(endpoint);
        for service in services {
            let endpoints = self.services.entry(service).or_default();
            if !endpoints.contains(endpoint) {
                endpoints.push(endpoint.clone());
            }
        }
    }

    /// Forgets `endpoint` for every service; a service left without endpoints is forgotten too.
    pub fn remove_endpoint(&mut self, endpoint: &K) {
        self.services.retain(|_, endpoints| {
            endpoints.retain(|e| e != endpoint);
            !endpoints.is_empty()
        });
    }

    /// The endpoints of `service`, in the order they arrived.
    pub fn endpoints(&self, service: &str) -> &[K] {
        self.services.get(service).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Every service with at least one endpoint.
    pub fn services(&self) -> impl Iterator<Item = &ServiceName> {
        self.services.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::try_from(s).expect("valid")
    }

    #[test]
    fn lists_endpoints_and_forgets_leavers() {
        let mut t = ServiceTable::new();
        t.set_endpoint(&"a", [svc("echo"), svc("temp")]);
        t.set_endpoint(&"b", [svc("echo")]);
        assert_eq!(t.endpoints("echo"), ["a", "b"]);
        assert_eq!(t.endpoints("temp"), ["a"]);
        assert!(t.endpoints("nope").is_empty());

        t.remove_endpoint(&"a");
        assert_eq!(t.endpoints("echo"), ["b"]);
        assert!(t.endpoints("temp").is_empty());
        assert_eq!(t.services().count(), 1);
    }

    #[test]
    fn set_replaces_previous_services() {
        let mut t = ServiceTable::new();
        t.set_endpoint(&1, [svc("x")]);
        t.set_endpoint(&1, [svc("y")]);
        assert!(t.endpoints("x").is_empty());
        assert_eq!(t.endpoints("y"), [1]);
    }
}
