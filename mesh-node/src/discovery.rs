//! Discovery sources: how a node learns which peers exist, as a stream of [`Update`]s.
//!
//! - [`MdnsDiscovery`]: announces `_starling._udp.local.` (instance = node name, port = QUIC port,
//!   TXT = identity, protocol version, role, labels, a digest of the hosted services) on every
//!   interface, IPv4 and IPv6, and browses for the same. A node with no network yet keeps trying.
//! - [`MemoryDiscovery`]: the in-memory twin, for tests in one process: every node sharing a
//!   [`MemoryBus`] sees every other.
//!
//! Static peers from the config do not go through here; the node dials them directly.
//! An announcement proves nothing: the node trusts only what the mTLS handshake proves.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::discovery::{Record, Update};
use mesh_core::{NodeName, ServiceName, SpiffeId};
use mesh_proto::Role;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The DNS-SD service type of Starling nodes.
pub const SERVICE_TYPE: &str = "_starling._udp.local.";

/// What a node announces about itself.
#[derive(Debug, Clone)]
pub struct Announcement {
    /// Its verified identity (announced, and checked again by every peer's handshake).
    pub id: SpiffeId,
    /// Its bound QUIC address (mDNS announces the port on every interface; the in-memory twin
    /// announces the address itself, or 127.0.0.1 with the port when it is unspecified).
    pub addr: SocketAddr,
    /// Node or gateway.
    pub role: Role,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its hosted services.
    pub services: Vec<ServiceName>,
}

impl Announcement {
    /// A short, stable digest of the hosted services (8 hex digits).
    pub fn services_digest(&self) -> String {
        let mut names: Vec<&str> = self.services.iter().map(ServiceName::as_str).collect();
        names.sort_unstable();
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u32 = 0x811c_9dc5;
        for b in names.join(",").bytes() {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{h:08x}")
    }

    fn record(&self, addrs: Vec<SocketAddr>) -> Record {
        Record {
            name: self.id.node_name().clone(),
            addrs,
            role: self.role.as_str().to_owned(),
            labels: self.labels.clone(),
            services_digest: self.services_digest(),
        }
    }
}

/// A source of peer updates.
pub trait Discovery: Send + Sync + 'static {
    /// Starts announcing `me` and looking for peers; updates arrive on the returned channel.
    fn start(&self, me: Announcement) -> mpsc::UnboundedReceiver<Update>;
    /// Says goodbye (best effort, bounded in time) and stops.
    fn stop(&self);
}

/// Discovery by multicast DNS (mdns-sd).
#[derive(Default)]
pub struct MdnsDiscovery {
    state: Arc<Mutex<Option<MdnsState>>>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

struct MdnsState {
    daemon: mdns_sd::ServiceDaemon,
    fullname: String,
}

impl MdnsDiscovery {
    /// A source that starts nothing until [`Discovery::start`].
    pub fn new() -> Self {
        Self::default()
    }
}

impl Discovery for MdnsDiscovery {
    fn start(&self, me: Announcement) -> mpsc::UnboundedReceiver<Update> {
        let (tx, rx) = mpsc::unbounded_channel();
        let state = self.state.clone();
        let stopped = self.stopped.clone();
        // mdns-sd runs its own thread; this task only (re)starts it and translates its events.
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(500);
            loop {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                match start_mdns(&me) {
                    Ok((daemon, fullname, browse)) => {
                        *state.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(MdnsState { daemon, fullname });
                        translate(browse, &me, &tx).await;
                        return;
                    }
                    Err(e) => {
                        warn!("mDNS not available yet ({e}); trying again in {delay:?}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(10));
                    }
                }
            }
        });
        rx
    }

    fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let Some(state) = self.state.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        // The goodbye (TTL 0) goes out before the daemon stops; wait for it, bounded.
        if let Ok(status) = state.daemon.unregister(&state.fullname) {
            let _ = status.recv_timeout(Duration::from_millis(500));
        }
        if let Ok(done) = state.daemon.shutdown() {
            let _ = done.recv_timeout(Duration::from_millis(500));
        }
    }
}

type Started = (
    mdns_sd::ServiceDaemon,
    String,
    mdns_sd::Receiver<mdns_sd::ServiceEvent>,
);

fn start_mdns(me: &Announcement) -> Result<Started, mdns_sd::Error> {
    let daemon = mdns_sd::ServiceDaemon::new()?;
    let name = me.id.node_name().as_str();
    let mut props: Vec<(String, String)> = vec![
        ("id".into(), me.id.to_string()),
        ("proto".into(), mesh_proto::PROTOCOL_VERSION.to_string()),
        ("role".into(), me.role.as_str().into()),
        ("svc".into(), me.services_digest()),
    ];
    props.extend(me.labels.iter().map(|(k, v)| (format!("l.{k}"), v.clone())));
    let props: HashMap<String, String> = props.into_iter().collect();
    let info = mdns_sd::ServiceInfo::new(
        SERVICE_TYPE,
        name,
        &format!("{name}.local."),
        (),
        me.addr.port(),
        props,
    )?
    .enable_addr_auto();
    let fullname = info.get_fullname().to_owned();
    let browse = daemon.browse(SERVICE_TYPE)?;
    // Announcing can fail where browsing works (qemu-user refuses IP_MULTICAST_IF): keep browsing.
    if let Err(e) = daemon.register(info) {
        warn!("cannot announce on mDNS ({e}); browsing only");
    }
    Ok((daemon, fullname, browse))
}

async fn translate(
    browse: mdns_sd::Receiver<mdns_sd::ServiceEvent>,
    me: &Announcement,
    tx: &mpsc::UnboundedSender<Update>,
) {
    let mut names: HashMap<String, NodeName> = HashMap::new();
    while let Ok(event) = browse.recv_async().await {
        let update = match event {
            mdns_sd::ServiceEvent::ServiceResolved(resolved) => {
                let Some(record) = record_of(&resolved) else {
                    continue;
                };
                if record.name == *me.id.node_name() {
                    continue;
                }
                debug!("mDNS: {} at {:?}", record.name, record.addrs);
                names.insert(resolved.get_fullname().to_owned(), record.name.clone());
                Update::Add(record)
            }
            mdns_sd::ServiceEvent::ServiceRemoved(_, fullname) => match names.remove(&fullname) {
                Some(name) => {
                    info!("mDNS: {name} said goodbye or expired");
                    Update::Remove(name)
                }
                None => continue,
            },
            _ => continue,
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

/// A record from a resolved mDNS service; `None` if it is not a well-formed Starling record.
fn record_of(resolved: &mdns_sd::ResolvedService) -> Option<Record> {
    let id = SpiffeId::parse(resolved.get_property_val_str("id")?).ok()?;
    let port = resolved.get_port();
    let mut addrs: Vec<SocketAddr> = resolved
        .get_addresses()
        .iter()
        .map(|ip| ip.to_ip_addr())
        .filter(|ip| match ip {
            IpAddr::V4(_) => true,
            // Link-local IPv6 needs a scope to dial; global IPv6 is fine.
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
        })
        .map(|ip| SocketAddr::new(ip, port))
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    let labels = resolved
        .get_properties()
        .iter()
        .filter_map(|p| {
            p.key()
                .strip_prefix("l.")
                .map(|k| (k.to_owned(), p.val_str().to_owned()))
        })
        .collect();
    Some(Record {
        name: id.node_name().clone(),
        addrs,
        role: resolved
            .get_property_val_str("role")
            .unwrap_or("node")
            .to_owned(),
        labels,
        services_digest: resolved
            .get_property_val_str("svc")
            .unwrap_or("")
            .to_owned(),
    })
}

/// The shared medium of [`MemoryDiscovery`]s in one process.
#[derive(Clone, Default)]
pub struct MemoryBus {
    inner: Arc<Mutex<BusInner>>,
}

#[derive(Default)]
struct BusInner {
    records: BTreeMap<NodeName, Record>,
    listeners: Vec<mpsc::UnboundedSender<Update>>,
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn publish(&self, update: Update) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &update {
            Update::Add(r) => {
                inner.records.insert(r.name.clone(), r.clone());
            }
            Update::Remove(n) => {
                inner.records.remove(n);
            }
            Update::Reset(_) => {}
        }
        inner.listeners.retain(|l| l.send(update.clone()).is_ok());
    }
}

/// In-memory discovery: every node on the same [`MemoryBus`] sees the others, on 127.0.0.1.
pub struct MemoryDiscovery {
    bus: MemoryBus,
    me: Mutex<Option<NodeName>>,
}

impl MemoryDiscovery {
    /// A source on `bus`.
    pub fn new(bus: &MemoryBus) -> Self {
        MemoryDiscovery {
            bus: bus.clone(),
            me: Mutex::new(None),
        }
    }
}

impl Discovery for MemoryDiscovery {
    fn start(&self, me: Announcement) -> mpsc::UnboundedReceiver<Update> {
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut inner = self.bus.inner.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(Update::Reset(inner.records.values().cloned().collect()));
            inner.listeners.push(tx);
        }
        let addr = if me.addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], me.addr.port()))
        } else {
            me.addr
        };
        let record = me.record(vec![addr]);
        *self.me.lock().unwrap_or_else(|p| p.into_inner()) = Some(record.name.clone());
        self.bus.publish(Update::Add(record));
        rx
    }

    fn stop(&self) {
        if let Some(name) = self.me.lock().unwrap_or_else(|p| p.into_inner()).take() {
            self.bus.publish(Update::Remove(name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(name: &str, services: &[&str]) -> Announcement {
        Announcement {
            id: SpiffeId::node("t.local", name.parse().expect("name")).expect("id"),
            addr: SocketAddr::from(([0, 0, 0, 0], 7400)),
            role: Role::Node,
            labels: BTreeMap::new(),
            services: services.iter().map(|s| s.parse().expect("svc")).collect(),
        }
    }

    #[test]
    fn digest_ignores_order_and_sees_changes() {
        assert_eq!(
            ann("a", &["x", "y"]).services_digest(),
            ann("a", &["y", "x"]).services_digest()
        );
        assert_ne!(
            ann("a", &["x"]).services_digest(),
            ann("a", &["x", "y"]).services_digest()
        );
        assert_eq!(ann("a", &[]).services_digest().len(), 8);
    }

    #[tokio::test]
    async fn memory_bus_shows_each_node_the_others() {
        let bus = MemoryBus::new();
        let a = MemoryDiscovery::new(&bus);
        let b = MemoryDiscovery::new(&bus);
        let mut ra = a.start(ann("a", &[]));
        let mut rb = b.start(ann("b", &[]));
        assert_eq!(ra.recv().await, Some(Update::Reset(vec![])));
        assert!(matches!(ra.recv().await, Some(Update::Add(r)) if r.name.as_str() == "a"));
        assert!(matches!(ra.recv().await, Some(Update::Add(r)) if r.name.as_str() == "b"));
        assert!(matches!(rb.recv().await, Some(Update::Reset(rs)) if rs.len() == 1));
        b.stop();
        assert_eq!(
            ra.recv().await,
            Some(Update::Remove("b".parse().expect("name")))
        );
    }
}
