//! The peer table: who is connected now, on which connections, hosting what. One shared handle,
//! written by the transport (a hello arrived, a connection closed) and read by the client (where
//! can this call go), the server (the caller's labels) and the control session (which peer is the
//! gateway). Every change bumps a counter that waiters watch.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_core::route::{Subset, in_subset};
use mesh_core::{NodeName, ServiceName, ServiceTable, SpiffeId};
use mesh_proto::{Role, Status};
use tokio::sync::watch;

use crate::call::Reply;
use crate::kept::KeptStreams;

/// Service names remembered after their hosts left, at most.
const MAX_KNOWN_SERVICES: usize = 4096;

/// What a node knows of a connected peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// Verified identity.
    pub id: SpiffeId,
    /// Role its certificate proves (a hello's claim plays no part).
    pub role: Role,
    /// Labels from its hello: display only.
    pub labels: BTreeMap<String, String>,
    /// Labels its certificate certifies: the ones authorization and routing match.
    pub certified: BTreeMap<String, String>,
    /// Services from its hello.
    pub services: Vec<ServiceName>,
    /// Where it is.
    pub addr: SocketAddr,
    /// The protocol version both sides speak on this connection (the lower of the two).
    pub protocol: u16,
}

/// The shared peer table.
pub(crate) struct PeerSet {
    inner: Mutex<Peers>,
    changed: watch::Sender<u64>,
    /// Bumped whenever a peer's labels may have changed: admission caches keyed on labels drop
    /// what they remember.
    labels_generation: AtomicU64,
    /// Connections whose hello was checked, since start.
    admitted: AtomicU64,
    /// Peers that went down (their last connection closed), since start.
    lost: AtomicU64,
}

#[derive(Default)]
struct Peers {
    by_id: mesh_core::FastMap<SpiffeId, PeerEntry>,
    table: ServiceTable<SpiffeId>,
    /// The last failure of each static peer that is not connected.
    dial_errors: BTreeMap<SocketAddr, String>,
    /// Every service some peer ever hosted: one with no endpoint now is Unavailable, not NotFound.
    known: HashSet<ServiceName>,
}

struct PeerEntry {
    /// A cheap stable key for the balancer (a hash of the identity).
    key: u64,
    info: PeerInfo,
    /// Live connections to this peer, oldest first; calls use the newest.
    conns: Vec<PeerConn>,
}

/// A connection to a peer, and the call streams kept on it.
struct PeerConn {
    conn: quinn::Connection,
    kept: Arc<KeptStreams>,
}

/// An endpoint chosen for a call.
pub(crate) struct Picked {
    pub(crate) conn: quinn::Connection,
    /// The connection's kept call streams.
    pub(crate) kept: Arc<KeptStreams>,
    pub(crate) key: u64,
    pub(crate) callee: NodeName,
    pub(crate) protocol: u16,
}

/// Connections one identity may hold with a node at once: one each way while both dial, and as
/// many again while a renewed certificate's connections replace the old ones. Each costs the node
/// tens of KB (quinn's and rustls's state: about 34 KiB idle in a release build, 57 KiB in the
/// debug build's `abuse.rs` case), so a peer may not open them without end.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// A candidate endpoint for the balancer: its key and its zone.
pub(crate) type Candidate<'a> = (u64, Option<&'a str>);

impl PeerSet {
    pub(crate) fn new() -> Self {
        PeerSet {
            inner: Mutex::new(Peers::default()),
            changed: watch::Sender::new(0),
            labels_generation: AtomicU64::new(0),
            admitted: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Peers> {
        // A panic while holding the lock is a bug; keep serving with the table as it is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// A receiver that sees every change.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// `(connections admitted, peers lost)` since start.
    pub(crate) fn churn(&self) -> (u64, u64) {
        (
            self.admitted.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
        )
    }

    pub(crate) fn labels_generation(&self) -> u64 {
        self.labels_generation.load(Ordering::Relaxed)
    }

    /// A peer's hello was checked on `conn`: records `conn` as a connection of the peer `info`
    /// describes, up and hosting what it says (or updates the peer's entry
    /// from a later hello); false, changing nothing, when the peer already holds
    /// [`MAX_CONNECTIONS_PER_PEER`] others.
    #[must_use]
    pub(crate) fn register(&self, info: PeerInfo, conn: &quinn::Connection) -> bool {
        let mut peers = self.lock();
        if let Some(entry) = peers.by_id.get(&info.id)
            && entry.conns.len() >= MAX_CONNECTIONS_PER_PEER
            && !entry
                .conns
                .iter()
                .any(|c| c.conn.stable_id() == conn.stable_id())
        {
            return false;
        }
        peers
            .table
            .set_endpoint(&info.id, info.services.iter().cloned());
        // Remembered so a service whose hosts all left answers Unavailable, not NotFound; bounded,
        // since a peer may announce new names with every hello.
        for service in &info.services {
            if peers.known.len() >= MAX_KNOWN_SERVICES {
                break;
            }
            peers.known.insert(service.clone());
        }
        let entry = peers
            .by_id
            .entry(info.id.clone())
            .or_insert_with(|| PeerEntry {
                key: endpoint_key(&info.id),
                info: info.clone(),
                conns: Vec::new(),
            });
        entry.info = info;
        if !entry
            .conns
            .iter()
            .any(|c| c.conn.stable_id() == conn.stable_id())
        {
            entry.conns.push(PeerConn {
                conn: conn.clone(),
                kept: Arc::default(),
            });
            self.admitted.fetch_add(1, Ordering::Relaxed);
        }
        drop(peers);
        self.labels_generation.fetch_add(1, Ordering::Relaxed);
        self.bump();
        true
    }

    /// A connection closed; returns true if it was the peer's last one (the peer is down).
    pub(crate) fn unregister(&self, id: &SpiffeId, conn: &quinn::Connection) -> bool {
        let mut peers = self.lock();
        let Some(entry) = peers.by_id.get_mut(id) else {
            return false;
        };
        entry
            .conns
            .retain(|c| c.conn.stable_id() != conn.stable_id());
        let gone = entry.conns.is_empty();
        if gone {
            peers.by_id.remove(id);
            peers.table.remove_endpoint(id);
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        drop(peers);
        self.bump();
        gone
    }

    /// Records why a static peer cannot be reached (`None`: it can).
    pub(crate) fn set_dial_error(&self, addr: SocketAddr, why: Option<String>) {
        let mut peers = self.lock();
        let changed = match why {
            Some(why) => peers.dial_errors.insert(addr, why).is_none(),
            None => peers.dial_errors.remove(&addr).is_some(),
        };
        drop(peers);
        if changed {
            self.bump();
        }
    }

    pub(crate) fn dial_errors(&self) -> Vec<String> {
        self.lock().dial_errors.values().cloned().collect()
    }

    /// The peers connected now, by identity.
    pub(crate) fn snapshot(&self) -> Vec<PeerInfo> {
        let peers = self.lock();
        let mut out: Vec<PeerInfo> = peers.by_id.values().map(|p| p.info.clone()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    /// The certified labels of a connected peer, if it is connected.
    pub(crate) fn labels_of(&self, id: &SpiffeId) -> Option<BTreeMap<String, String>> {
        self.lock().by_id.get(id).map(|p| p.info.certified.clone())
    }

    pub(crate) fn has_endpoint(&self, service: &str) -> bool {
        !self.lock().table.endpoints(service).is_empty()
    }

    pub(crate) fn connection_count(&self) -> u32 {
        self.lock()
            .by_id
            .values()
            .map(|p| p.conns.len() as u32)
            .sum()
    }

    /// Whether a connection to node `name` is up.
    pub(crate) fn connected_to(&self, name: &NodeName) -> bool {
        self.lock()
            .by_id
            .keys()
            .any(|id| id.node_name() == name && id.leaf().is_none())
    }

    /// Every connection to node `name`.
    pub(crate) fn connections_of(&self, name: &NodeName) -> Vec<quinn::Connection> {
        self.lock()
            .by_id
            .iter()
            .filter(|(id, _)| id.node_name() == name)
            .flat_map(|(_, p)| p.conns.iter().map(|c| c.conn.clone()))
            .collect()
    }

    /// The call streams kept on `conn`, if it is a peer's live connection.
    pub(crate) fn kept_on(&self, conn: &quinn::Connection) -> Option<Arc<KeptStreams>> {
        self.lock()
            .by_id
            .values()
            .flat_map(|p| &p.conns)
            .find(|c| c.conn.stable_id() == conn.stable_id())
            .map(|c| c.kept.clone())
    }

    /// Every live connection, to every peer.
    pub(crate) fn all_connections(&self) -> Vec<(PeerInfo, quinn::Connection)> {
        self.lock()
            .by_id
            .values()
            .flat_map(|p| p.conns.iter().map(|c| (p.info.clone(), c.conn.clone())))
            .collect()
    }

    /// A connection to a peer that says it is a gateway and matches `accept`.
    pub(crate) fn gateway_connection(
        &self,
        accept: impl Fn(&PeerInfo, &quinn::Connection) -> bool,
    ) -> Option<quinn::Connection> {
        self.lock()
            .by_id
            .values()
            .filter(|p| p.info.role == Role::Gateway)
            .flat_map(|p| p.conns.iter().map(move |c| (&p.info, &c.conn)))
            .find(|(info, c)| accept(info, c))
            .map(|(_, c)| c.clone())
    }

    /// Picks an endpoint of `service` in `subset`: `choose` gets the candidates (all of them, or
    /// those not in `tried` while any remain) and returns the key of the one to use.
    pub(crate) fn pick(
        &self,
        service: &str,
        subset: &Subset,
        tried: &[u64],
        choose: impl FnOnce(&[Candidate<'_>]) -> Result<u64, Reply>,
    ) -> Result<Picked, Reply> {
        let peers = self.lock();
        let endpoints = peers.table.endpoints(service);
        // One endpoint (the common case on a small site): looked up once, nothing allocated.
        if let [id] = endpoints
            && let Some(entry) = peers.by_id.get(id)
            && in_subset(subset, &entry.info.certified)
        {
            let zone = entry.info.certified.get("zone").map(String::as_str);
            let chosen = choose(&[(entry.key, zone)])?;
            debug_assert_eq!(chosen, entry.key);
            return picked(entry, service);
        }
        let all: Vec<Candidate<'_>> = endpoints
            .iter()
            .filter_map(|id| {
                let entry = peers.by_id.get(id)?;
                in_subset(subset, &entry.info.certified).then(|| {
                    (
                        entry.key,
                        entry.info.certified.get("zone").map(String::as_str),
                    )
                })
            })
            .collect();
        if all.is_empty() {
            return Err(if endpoints.is_empty() {
                peers.no_endpoint(service)
            } else {
                Reply::error(
                    Status::Unavailable,
                    format!(
                        "no live endpoint of service {service} matches the route's subset {subset:?}"
                    ),
                )
            });
        }
        // A first attempt (every call but retries) skips the filtering and its allocation.
        let fresh: Vec<Candidate<'_>> = if tried.is_empty() {
            Vec::new()
        } else {
            all.iter()
                .copied()
                .filter(|(k, _)| !tried.contains(k))
                .collect()
        };
        let chosen = choose(if fresh.is_empty() { &all } else { &fresh })?;
        let gone = || {
            Reply::error(
                Status::Unavailable,
                format!("an endpoint of {service} just left"),
            )
        };
        let entry = endpoints
            .iter()
            .filter_map(|id| peers.by_id.get(id))
            .find(|e| e.key == chosen)
            .ok_or_else(gone)?;
        picked(entry, service)
    }
}

/// A call's way to `entry`: its newest connection. After a renewal the node dials its peers again
/// with its new certificate, and the old connections (closed when the old certificate expires)
/// carry no new call.
fn picked(entry: &PeerEntry, service: &str) -> Result<Picked, Reply> {
    let newest = entry.conns.last().ok_or_else(|| {
        Reply::error(
            Status::Unavailable,
            format!("an endpoint of {service} just left"),
        )
    })?;
    Ok(Picked {
        conn: newest.conn.clone(),
        kept: newest.kept.clone(),
        key: entry.key,
        callee: entry.info.id.node_name().clone(),
        protocol: entry.info.protocol,
    })
}

impl Peers {
    /// Unavailable for a service some peer hosted (or when configured peers cannot be reached),
    /// NotFound otherwise.
    fn no_endpoint(&self, service: &str) -> Reply {
        if self.known.contains(service) {
            Reply::error(
                Status::Unavailable,
                format!(
                    "no live endpoint for service {service}: every node that hosted it has left"
                ),
            )
        } else if self.dial_errors.is_empty() {
            Reply::error(
                Status::NotFound,
                format!("no connected peer hosts service {service}"),
            )
        } else {
            let why: Vec<String> = self.dial_errors.values().cloned().collect();
            Reply::error(
                Status::Unavailable,
                format!(
                    "no reachable peer hosts service {service}; {}",
                    why.join("; ")
                ),
            )
        }
    }
}

/// FNV-1a of an identity: the balancer's key for an endpoint.
fn endpoint_key(id: &SpiffeId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.to_string().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
