//! The registry: every node the gateway has heard from, what it hosts, where it is, whether it is
//! up, and which policy version it holds. Sans-I/O: time comes in as `now`.
//!
//! A node is up while its control stream is open. When the stream closes the node is marked down
//! after `down_after` without a new stream, and removed after `remove_after`.

use std::collections::BTreeMap;
use std::sync::Arc;
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

/// What a node's hello may say of itself, at most: its entry goes to every node, so one node
/// must not be able to make the registry too large for the others' frames.
pub const MAX_HELLO_ADDRS: usize = 16;
/// Services a node may say it hosts.
pub const MAX_HELLO_SERVICES: usize = 256;
/// Labels a node may say it has.
pub const MAX_HELLO_LABELS: usize = 32;
/// Bytes of any one string of a hello (a name, an address, a label key or value, the version).
pub const MAX_HELLO_STRING: usize = 128;

/// Whether a hello stays within the bounds above; if not, what is over.
pub fn check_hello(hello: &NodeHello) -> Result<(), String> {
    let over = |what: &str, n: usize, max: usize| {
        if n > max {
            Err(format!("{n} {what} (at most {max})"))
        } else {
            Ok(())
        }
    };
    over("addresses", hello.addrs.len(), MAX_HELLO_ADDRS)?;
    over("services", hello.services.len(), MAX_HELLO_SERVICES)?;
    over("labels", hello.labels.len(), MAX_HELLO_LABELS)?;
    let longest = hello
        .addrs
        .iter()
        .chain(&hello.services)
        .chain(hello.labels.iter().flat_map(|(k, v)| [k, v]))
        .chain(std::iter::once(&hello.software_version))
        .map(String::len)
        .max()
        .unwrap_or(0);
    over("bytes in one string", longest, MAX_HELLO_STRING)
}

/// Changes remembered for deltas; a node further behind is sent the whole registry.
const MAX_CHANGES: usize = 65_536;

/// Every node the gateway knows.
#[derive(Debug)]
pub struct Registry {
    /// Shared, so that a reader (the admin API, on its own thread) copies the list under the
    /// lock in microseconds and builds its document after; a record a reader still holds is
    /// copied when it changes.
    nodes: BTreeMap<String, Arc<NodeRecord>>,
    down_after: Duration,
    remove_after: Duration,
    /// One more at each change of what nodes are sent (an entry added, changed or removed).
    revision: u64,
    /// The node each revision changed, oldest first, at most [`MAX_CHANGES`].
    changes: std::collections::VecDeque<(u64, String)>,
}

impl Registry {
    /// An empty registry with these timers.
    pub fn new(down_after: Duration, remove_after: Duration) -> Self {
        Registry {
            nodes: BTreeMap::new(),
            down_after,
            remove_after: remove_after.max(down_after),
            revision: 0,
            changes: std::collections::VecDeque::new(),
        }
    }

    /// Notes that what nodes are sent of `name` changed.
    fn touch(&mut self, name: &str) {
        self.revision += 1;
        if self.changes.len() == MAX_CHANGES {
            self.changes.pop_front();
        }
        self.changes.push_back((self.revision, name.to_owned()));
    }

    /// The revision of what nodes are sent: it grows with every change.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The entries that changed after revision `rev` (a removed node as down, with nothing
    /// else), or `None` when the changes since then are no longer all remembered (send
    /// [`Registry::entries`]).
    pub fn changed_since(&self, rev: u64) -> Option<Vec<RegistryEntry>> {
        if rev >= self.revision {
            return Some(Vec::new());
        }
        let oldest = self.changes.front()?.0;
        if rev + 1 < oldest {
            return None;
        }
        let start = self.changes.partition_point(|(r, _)| *r <= rev);
        let names: std::collections::BTreeSet<&str> = self
            .changes
            .range(start..)
            .map(|(_, n)| n.as_str())
            .collect();
        Some(
            names
                .into_iter()
                .map(|name| match self.nodes.get(name) {
                    Some(n) => entry(n),
                    None => RegistryEntry {
                        name: name.to_owned(),
                        addrs: Vec::new(),
                        services: Vec::new(),
                        labels: Vec::new(),
                        up: false,
                    },
                })
                .collect(),
        )
    }

    /// A node opened its control stream and said hello.
    pub fn handle_hello(&mut self, name: &str, id: &str, hello: &NodeHello, now: Instant) {
        let sessions = self.nodes.get(name).map_or(0, |n| n.sessions);
        self.nodes.insert(
            name.to_owned(),
            Arc::new(NodeRecord {
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
            }),
        );
        self.touch(name);
    }

    /// `name` said hello again on its open control stream: what it hosts, where and with which
    /// labels changed (a microcontroller came or went).
    pub fn handle_rehello(&mut self, name: &str, hello: &NodeHello, now: Instant) {
        if let Some(n) = self.record_mut(name) {
            n.services = hello.services.clone();
            n.labels = hello.labels.clone();
            n.addrs = hello.addrs.clone();
            n.last_seen = now;
            n.last_seen_wall = SystemTime::now();
            self.touch(name);
        }
    }

    /// What the certificate of `name`'s control stream says.
    pub fn set_certificate(&mut self, name: &str, certificate: CertificateInfo) {
        if let Some(n) = self.record_mut(name) {
            n.certificate = Some(certificate);
        }
    }

    /// Anything heard from `name`.
    pub fn handle_seen(&mut self, name: &str, now: Instant) {
        if let Some(n) = self.record_mut(name) {
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
        if let Some(n) = self.record_mut(name) {
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
        if let Some(n) = self.record_mut(name) {
            n.sessions = n.sessions.saturating_sub(1);
            n.last_seen = now;
        }
    }

    /// Marks down and removes nodes by their timers; returns whether anything changed.
    pub fn sweep(&mut self, now: Instant) -> bool {
        let mut changed = Vec::new();
        let (down_after, remove_after) = (self.down_after, self.remove_after);
        self.nodes.retain(|name, n| {
            if n.sessions > 0 {
                return true;
            }
            let idle = now.saturating_duration_since(n.last_seen);
            if idle >= remove_after {
                changed.push(name.clone());
                return false;
            }
            if n.up && idle >= down_after {
                Arc::make_mut(n).up = false;
                changed.push(name.clone());
            }
            true
        });
        for name in &changed {
            self.touch(name);
        }
        !changed.is_empty()
    }

    /// `name`'s record, to change: copied first if a reader holds it.
    fn record_mut(&mut self, name: &str) -> Option<&mut NodeRecord> {
        self.nodes.get_mut(name).map(Arc::make_mut)
    }

    /// Every node, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().map(|n| &**n)
    }

    /// Every node, by name, as it is now: for a reader that must not hold the lock while it works.
    pub fn snapshot(&self) -> Vec<Arc<NodeRecord>> {
        self.nodes.values().cloned().collect()
    }

    /// One node.
    pub fn get(&self, name: &str) -> Option<&NodeRecord> {
        self.nodes.get(name).map(|n| &**n)
    }

    /// The registry as nodes receive it.
    pub fn entries(&self) -> Vec<RegistryEntry> {
        self.nodes.values().map(|n| entry(n)).collect()
    }
}

fn entry(n: &NodeRecord) -> RegistryEntry {
    RegistryEntry {
        name: n.name.clone(),
        addrs: n.addrs.clone(),
        services: n.services.clone(),
        labels: n.labels.clone(),
        up: n.up,
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
    fn a_snapshot_keeps_what_it_copied_while_the_registry_changes() {
        let mut r = Registry::new(Duration::from_secs(5), Duration::from_secs(60));
        let t0 = Instant::now();
        r.handle_hello("a", "spiffe://t/node/a", &hello(), t0);
        let before = r.snapshot();
        let bundle = BundleRef {
            epoch: 1,
            version: 2,
            hash: [7; 32],
        };
        r.handle_policy_answer("a", bundle, Ok(()));
        r.handle_closed("a", t0);
        r.sweep(t0 + Duration::from_secs(6));
        assert_eq!(before.len(), 1);
        assert_eq!(
            (before[0].policy_version, before[0].up, before[0].sessions),
            (0, true, 1),
            "the copy is what the registry held when it was taken"
        );
        let now = r.get("a").expect("still listed");
        assert_eq!((now.policy, now.up, now.sessions), (Some(bundle), false, 0));
        assert_eq!(r.snapshot()[0].policy, Some(bundle));
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

    #[test]
    fn deltas_carry_what_changed_since_a_revision() {
        let mut r = Registry::new(Duration::from_secs(5), Duration::from_secs(60));
        let t0 = Instant::now();
        r.handle_hello("a", "id-a", &hello(), t0);
        let after_a = r.revision();
        r.handle_hello("b", "id-b", &hello(), t0);
        r.handle_hello("c", "id-c", &hello(), t0);
        let names =
            |v: Vec<RegistryEntry>| v.into_iter().map(|e| (e.name, e.up)).collect::<Vec<_>>();
        assert_eq!(
            names(r.changed_since(after_a).expect("remembered")),
            [("b".to_owned(), true), ("c".to_owned(), true)]
        );
        assert_eq!(r.changed_since(r.revision()), Some(vec![]));
        // Closing a stream changes nothing nodes see; going down and away does.
        let now = r.revision();
        r.handle_closed("b", t0);
        assert_eq!(r.revision(), now);
        r.sweep(t0 + Duration::from_secs(6));
        assert_eq!(
            names(r.changed_since(now).expect("remembered")),
            [("b".to_owned(), false)]
        );
        let down = r.revision();
        r.sweep(t0 + Duration::from_secs(61));
        assert!(r.get("b").is_none());
        assert_eq!(
            names(r.changed_since(down).expect("remembered")),
            [("b".to_owned(), false)]
        );
        // A revision older than what is remembered: the whole registry instead.
        for i in 0..MAX_CHANGES {
            r.handle_rehello("a", &hello(), t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(r.changed_since(after_a), None);
        assert_eq!(r.changed_since(r.revision() - 1).map(|v| v.len()), Some(1));
    }

    #[test]
    fn a_hello_beyond_its_bounds_is_named() {
        assert_eq!(check_hello(&hello()), Ok(()));
        let mut h = hello();
        h.services = (0..=MAX_HELLO_SERVICES).map(|i| format!("s{i}")).collect();
        assert_eq!(check_hello(&h), Err("257 services (at most 256)".into()));
        let mut h = hello();
        h.labels = vec![("zone".into(), "x".repeat(129))];
        assert_eq!(
            check_hello(&h),
            Err("129 bytes in one string (at most 128)".into())
        );
    }
}
