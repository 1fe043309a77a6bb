//! An in-memory network for tests: QUIC endpoints whose datagrams travel through a queue in this
//! process instead of sockets, so whole call paths (handshakes with real certificates, hellos,
//! calls, policy) run in one test without touching the machine's network, and under tokio's paused
//! clock when a test waits on timers (`#[tokio::test(start_paused = true)]`).
//!
//! Like quinn's own test `Pair`, it is a twin of the real thing, used in addition to the tests on
//! real sockets, never instead. A datagram to an address nobody holds is dropped, as UDP would;
//! [`MemoryNetwork::cut`] drops everything to and from one address until
//! [`MemoryNetwork::restore`].
//!
//! ```no_run
//! # async fn demo(config: mesh_node::NodeConfig, identity: mesh_node::Identity) {
//! use mesh_node::testing::MemoryNetwork;
//! let net = MemoryNetwork::new();
//! let node = net.start_node(config, identity, Default::default()).expect("start");
//! # }
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::io;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::config::NodeConfig;
use crate::identity::Identity;
use crate::node::{Node, NodeOptions, StartError};
use crate::transport::quic_configs;

/// Datagrams a socket holds before it drops more (a full receive buffer).
const QUEUE: usize = 4096;

/// A network inside the process. Cheap to clone; clones are the same network.
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    inner: Arc<Mutex<Net>>,
}

#[derive(Default)]
struct Net {
    sockets: HashMap<SocketAddr, Weak<MemorySocket>>,
    cut: HashSet<SocketAddr>,
    next_host: u32,
}

impl MemoryNetwork {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Net> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A QUIC endpoint on a fresh address of this network that serves and dials as `identity`.
    pub fn endpoint(
        &self,
        identity: &Identity,
        limits: &crate::config::Limits,
    ) -> Result<quinn::Endpoint, StartError> {
        let (server, client) = quic_configs(identity, limits)?;
        let addr = {
            let mut net = self.lock();
            net.next_host += 1;
            let host = net.next_host;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(
                    10,
                    (host >> 16) as u8,
                    (host >> 8) as u8,
                    host as u8,
                )),
                7400,
            )
        };
        let socket = Arc::new(MemorySocket {
            addr,
            net: self.clone(),
            inbox: Mutex::new(Inbox::default()),
        });
        self.lock().sockets.insert(addr, Arc::downgrade(&socket));
        let mut endpoint = quinn::Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| crate::transport::BindError::Bind { addr, source })?;
        endpoint.set_default_client_config(client);
        Ok(endpoint)
    }

    /// Starts a node on a fresh address of this network (its `listen` is ignored).
    pub fn start_node(
        &self,
        config: NodeConfig,
        identity: Identity,
        options: NodeOptions,
    ) -> Result<Node, StartError> {
        let endpoint = self.endpoint(&identity, &config.limits)?;
        Node::start_on(config, identity, options, endpoint)
    }

    /// Drops every datagram to or from `addr` from now on.
    pub fn cut(&self, addr: SocketAddr) {
        self.lock().cut.insert(addr);
    }

    /// Carries datagrams to and from `addr` again.
    pub fn restore(&self, addr: SocketAddr) {
        self.lock().cut.remove(&addr);
    }

    fn deliver(&self, from: SocketAddr, to: SocketAddr, datagram: &[u8]) {
        let target = {
            let net = self.lock();
            if net.cut.contains(&from) || net.cut.contains(&to) {
                return;
            }
            net.sockets.get(&to).and_then(Weak::upgrade)
        };
        let Some(target) = target else { return };
        let mut inbox = target.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if inbox.queue.len() >= QUEUE {
            return;
        }
        inbox.queue.push_back((from, datagram.to_vec()));
        let waker = inbox.waker.take();
        drop(inbox);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One endpoint's socket on a [`MemoryNetwork`].
struct MemorySocket {
    addr: SocketAddr,
    net: MemoryNetwork,
    inbox: Mutex<Inbox>,
}

/// Datagrams received and not yet read, and the task to wake when one arrives.
#[derive(Default)]
struct Inbox {
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

impl fmt::Debug for MemorySocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemorySocket")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl AsyncUdpSocket for MemorySocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        let size = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for datagram in transmit.contents.chunks(size) {
            self.net.deliver(self.addr, transmit.destination, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let Some((from, datagram)) = inbox.queue.pop_front() else {
                break;
            };
            let len = datagram.len().min(bufs[n].len());
            bufs[n][..len].copy_from_slice(&datagram[..len]);
            meta[n] = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: Some(self.addr.ip()),
            };
            n += 1;
        }
        if n > 0 {
            return Poll::Ready(Ok(n));
        }
        inbox.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The cipher suite a TLS 1.3 handshake between `client` and `server` settles on, each end
/// configured as a machine whose fastest cipher is the one given. The handshake runs in memory;
/// QUIC's handshake picks the suite the same way.
pub fn negotiated_cipher(
    client: (&Identity, crate::identity::Cipher),
    server: (&Identity, crate::identity::Cipher),
) -> Result<rustls::CipherSuite, String> {
    let client_config = client
        .0
        .client_config_preferring(client.1)
        .map_err(|e| format!("client: {e}"))?;
    let server_config = server
        .0
        .server_config_preferring(false, server.1)
        .map_err(|e| format!("server: {e}"))?;
    let name =
        rustls_pki_types::ServerName::try_from("starling.mesh").map_err(|e| e.to_string())?;
    let mut c = rustls::Connection::from(
        rustls::ClientConnection::new(Arc::new(client_config), name)
            .map_err(|e| format!("client: {e}"))?,
    );
    let mut s = rustls::Connection::from(
        rustls::ServerConnection::new(Arc::new(server_config))
            .map_err(|e| format!("server: {e}"))?,
    );
    // A TLS 1.3 handshake with client certificates takes two round trips.
    for _ in 0..4 {
        if !c.is_handshaking() && !s.is_handshaking() {
            break;
        }
        pass_records(&mut c, &mut s)?;
        pass_records(&mut s, &mut c)?;
    }
    if c.is_handshaking() || s.is_handshaking() {
        return Err("the handshake did not finish".into());
    }
    c.negotiated_cipher_suite()
        .map(|suite| suite.suite())
        .ok_or_else(|| "no cipher suite".into())
}

/// Moves every TLS record `from` has to send into `to`, and has `to` process them.
fn pass_records(from: &mut rustls::Connection, to: &mut rustls::Connection) -> Result<(), String> {
    let mut records = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut records).map_err(|e| e.to_string())?;
    }
    let mut rest = &records[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).map_err(|e| e.to_string())?;
        to.process_new_packets().map_err(|e| e.to_string())?;
    }
    Ok(())
}
