//! Which endpoints serve which service, and which one takes the next call.
//!
//! The table is fed by events (a peer said hello with its services, a peer left) and answers
//! `pick(service)`. Endpoints of one service share its calls in turn; the traffic-policy layer
//! will put routing, splits and latency-aware balancing in front of this.

use std::collections::HashMap;
use std::hash::Hash;

use crate::name::ServiceName;

/// A map from service to the endpoints (of key type `K`, e.g. a peer's identity) that host it.
#[derive(Debug, Clone)]
pub struct ServiceTable<K> {
    services: HashMap<ServiceName, Entry<K>>,
}

#[derive(Debug, Clone)]
struct Entry<K> {
    endpoints: Vec<K>,
    next: usize,
}

impl<K: Clone + Eq + Hash> Default for ServiceTable<K> {
    fn default() -> Self {
        ServiceTable {
            services: HashMap::new(),
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
            let entry = self.services.entry(service).or_insert_with(|| Entry {
                endpoints: Vec::new(),
                next: 0,
            });
            if !entry.endpoints.contains(endpoint) {
                entry.endpoints.push(endpoint.clone());
            }
        }
    }

    /// Forgets `endpoint` for every service; a service left without endpoints is forgotten too.
    pub fn remove_endpoint(&mut self, endpoint: &K) {
        self.services.retain(|_, entry| {
            entry.endpoints.retain(|e| e != endpoint);
            !entry.endpoints.is_empty()
        });
    }

    /// The endpoints of `service`, in the order they arrived.
    pub fn endpoints(&self, service: &str) -> &[K] {
        self.services
            .get(service)
            .map(|e| e.endpoints.as_slice())
            .unwrap_or(&[])
    }

    /// The endpoint that takes the next call to `service`, in turn; `None` if no endpoint hosts it.
    pub fn pick(&mut self, service: &str) -> Option<K> {
        let entry = self.services.get_mut(service)?;
        let i = entry.next % entry.endpoints.len();
        entry.next = entry.next.wrapping_add(1);
        entry.endpoints.get(i).cloned()
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
    fn shares_calls_in_turn_and_forgets_leavers() {
        let mut t = ServiceTable::new();
        t.set_endpoint(&"a", [svc("echo"), svc("temp")]);
        t.set_endpoint(&"b", [svc("echo")]);
        let picks: Vec<_> = (0..4).filter_map(|_| t.pick("echo")).collect();
        assert_eq!(picks, ["a", "b", "a", "b"]);
        assert_eq!(t.pick("temp"), Some("a"));
        assert_eq!(t.pick("nope"), None);

        t.remove_endpoint(&"a");
        assert_eq!(t.endpoints("echo"), ["b"]);
        assert_eq!(t.pick("temp"), None);
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
