//! The registry: every node the gateway has heard from, what it hosts, where it is, whether it is
//! up, and which policy version it holds. Sans-I/O: time comes in as `now`.
//!
//! A node is up while its control stream is open. When the stream closes the node is marked down
//! after `down_after` without a new stream, and removed after `remove_after`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use mesh_proto::control::{BundleRef, NodeHello, RegistryEntry};

/// What the gateway knows of one node.
#[derive(Debug, Clone)]
pub struct NodeRecord {
    /// Its name.
    pub name: String,
    /// Its verified identity.
    pub id: String,
    /// Its software version.
    pub version: String,
    /// Node or gateway.
    pub role: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// What it hosts.
    pub services: Vec<String>,
    /// Where it can be reached.
    pub addrs: Vec<String>,
    /// Policy version it acknowledged last (0: none).
    pub policy_version: u64,
    /// The bundle it holds, as it said in its hello or its last ack.
    pub policy: Option<BundleRef>,
    /// It found its saved bundle damaged and refuses every call.
    pub policy_damaged: bool,
    /// Why it refused the latest bundle, if it did.
    pub policy_error: Option<String>,
    /// Whether its control stream is open, or closed for less than `down_after`.
    pub up: bool,
    /// Open control streams.
    pub sessions: u32,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// The same, as wall-clock time, for the API.
    pub last_seen_wall: SystemTime,
    /// What its certificate (as verified on its control stream) says.
    pub certificate: Option<CertificateInfo>,
}

/// What a node's verified certificate says, as the registry shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    /// Its serial number, hex.
    pub serial: String,
    /// When it (or its chain) expires.
    pub not_after: SystemTime,
    /// The labels its issuer certified: the ones authorization and routing use.
    pub labels: Vec<(String, String)>,
    /// The key identifier of the root it is under, hex.
    pub root: Option<String>,
}

/// Every node the gateway knows.
#[derive(Debug)]
pub struct Registry {
    nodes: BTreeMap<String, NodeRecord>,
    down_after: Duration,
    remove_after: Duration,
}

impl Registry {
    /// An empty registry with these timers.
    pub fn new(down_after: Duration, remove_after: Duration) -> Self {
        Registry {
            nodes: BTreeMap::new(),
            down_after,
            remove_after: remove_after.max(down_after),
        }
    }

    /// A node opened its control stream and said hello.
    pub fn handle_hello(&mut self, name: &str, id: &str, hello: &NodeHello, now: Instant) {
        let sessions = self.nodes.get(name).map_or(0, |n| n.sessions);
        self.nodes.insert(
            name.to_owned(),
            NodeRecord {
                name: name.to_owned(),
                id: id.to_owned(),
                version: hello.software_version.clone(),
                role: "node".to_owned(),
                labels: hello.labels.clone(),
                services: hello.services.clone(),
                addrs: hello.addrs.clone(),
                policy_version: hello.policy_version,
                policy: hello.policy,
                policy_damaged: hello.policy_damaged,
                policy_error: None,
                up: true,
                sessions: sessions + 1,
                last_seen: now,
                last_seen_wall: SystemTime::now(),
                certificate: None,
            },
        );
    }

    /// `name` said hello again on its open control stream: what it hosts, where and with which
    /// labels changed (a microcontroller came or went).
    pub fn handle_rehello(&mut self, name: &str, hello: &NodeHello, now: Instant) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.services = hello.services.clone();
            n.labels = hello.labels.clone();
            n.addrs = hello.addrs.clone();
            n.last_seen = now;
            n.last_seen_wall = SystemTime::now();
        }
    }

    /// What the certificate of `name`'s control stream says.
    pub fn set_certificate(&mut self, name: &str, certificate: CertificateInfo) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.certificate = Some(certificate);
        }
    }

    /// Anything heard from `name`.
    pub fn handle_seen(&mut self, name: &str, now: Instant) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.last_seen = now;
            n.last_seen_wall = SystemTime::now();
        }
    }

    /// `name` acknowledged (`Ok`) or refused (`Err`) bundle `bundle`.
    pub fn handle_policy_answer(
        &mut self,
        name: &str,
        bundle: BundleRef,
        answer: Result<(), String>,
    ) {
        if let Some(n) = self.nodes.get_mut(name) {
            match answer {
                Ok(()) => {
                    n.policy_version = bundle.version;
                    n.policy = Some(bundle);
                    n.policy_error = None;
                    n.policy_damaged = false;
                }
                Err(reason) => {
                    n.policy_error = Some(format!("version {}: {reason}", bundle.version))
                }
            }
        }
    }

    /// A control stream of `name` closed.
    pub fn handle_closed(&mut self, name: &str, now: Instant) {
        if let Some(n) = self.nodes.get_mut(name) {
            n.sessions = n.sessions.saturating_sub(1);
            n.last_seen = now;
        }
    }

    /// Marks down and removes nodes by their timers; returns whether anything changed.
    pub fn sweep(&mut self, now: Instant) -> bool {
        let mut changed = false;
        let (down_after, remove_after) = (self.down_after, self.remove_after);
        self.nodes.retain(|_, n| {
            if n.sessions > 0 {
                return true;
            }
            let idle = now.saturating_duration_since(n.last_seen);
            if idle >= remove_after {
                changed = true;
                return false;
            }
            if n.up && idle >= down_after {
                n.up = false;
                changed = true;
            }
            true
        });
        changed
    }

    /// Every node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    /// One node.
    pub fn get(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name)
    }

    /// The registry as nodes receive it.
    pub fn entries(&self) -> Vec<RegistryEntry> {
        self.nodes
            .values()
            .map(|n| RegistryEntry {
                name: n.name.clone(),
                addrs: n.addrs.clone(),
                services: n.services.clone(),
                labels: n.labels.clone(),
                up: n.up,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> NodeHello {
        NodeHello {
            protocol_version: 1,
            software_version: "0.1.0".into(),
            labels: vec![],
            services: vec!["echo".into()],
            addrs: vec!["198.18.0.2:7400".into()],
            policy_version: 0,
            next_seq: 1,
            boot_id: 1,
            lost_at_restart: 0,
            policy: None,
            policy_damaged: false,
        }
    }

    #[test]
    fn a_silent_node_goes_down_then_away() {
        let mut r = Registry::new(Duration::from_secs(5), Duration::from_secs(60));
        let t0 = Instant::now();
        r.handle_hello("a", "spiffe://t/node/a", &hello(), t0);
        assert!(
            !r.sweep(t0 + Duration::from_secs(100)),
            "an open stream keeps it up"
        );
        r.handle_closed("a", t0 + Duration::from_secs(1));
        assert!(!r.sweep(t0 + Duration::from_secs(5)));
        assert!(r.get("a").is_some_and(|n| n.up));
        assert!(r.sweep(t0 + Duration::from_secs(6)));
        assert!(r.get("a").is_some_and(|n| !n.up));
        assert!(r.sweep(t0 + Duration::from_secs(61)));
        assert!(r.get("a").is_none());
    }

    #[test]
    fn policy_answers_are_kept() {
        let mut r = Registry::new(Duration::from_secs(5), Duration::from_secs(60));
        r.handle_hello("a", "id", &hello(), Instant::now());
        let b = |version| BundleRef {
            epoch: 1,
            version,
            hash: [version as u8; 32],
        };
        r.handle_policy_answer("a", b(3), Ok(()));
        r.handle_policy_answer("a", b(4), Err("too old".into()));
        let n = r.get("a").expect("a");
        assert_eq!(n.policy_version, 3);
        assert_eq!(n.policy_error.as_deref(), Some("version 4: too old"));
        assert_eq!(r.entries()[0].services, ["echo"]);
    }
}
