//! Hellos: each side of a new connection opens a unidirectional stream and sends a [`Hello`] (its
//! name, role, protocol version, labels and services). The name must match the SPIFFE ID its
//! certificate proved. From protocol 2 on, a node sends a new hello on a new unidirectional stream
//! whenever its hosted services change, and its peers update their tables.
//!
//! The role a peer plays (node or gateway) and the labels that authorization and routing match are
//! read from its certificate, not from its hello; the hello's labels are for display.
//!
//! Versions: both sides speak the lower of their two versions on a connection; a peer below
//! [`MIN_PROTOCOL_VERSION`] is refused with a reason that says so. A hello from a newer peer may
//! carry fields this node does not know at its end; they are ignored.

use std::collections::BTreeMap;

use mesh_core::{ServiceName, SpiffeId};
use mesh_proto::limits::MAX_HELLO_BYTES;
use mesh_proto::{Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Role, decode_extensible};
use tracing::{debug, info, warn};

use super::Transport;
use crate::identity::CertificateClaims;
use crate::peers::PeerInfo;
use crate::wire::FrameReader;

/// Who this node is, as its hellos say.
#[derive(Debug, Clone)]
pub(crate) struct Me {
    pub(crate) id: SpiffeId,
    pub(crate) role: Role,
    pub(crate) labels: BTreeMap<String, String>,
}

/// Why a peer's hello was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HelloError {
    #[error("hello stream failed: {0}")]
    Stream(String),
    /// The connection ended (the peer may have said why: see `Served`).
    #[error("hello stream failed: {0}")]
    Lost(quinn::ConnectionError),
    #[error("bad hello: {0}")]
    Malformed(String),
    #[error("hello names {claimed:?} but the certificate proves {proven}")]
    NameMismatch { claimed: String, proven: SpiffeId },
    #[error("peer speaks protocol {peer}; this node needs at least {MIN_PROTOCOL_VERSION}")]
    TooOld { peer: u16 },
    #[error("bad service name {0:?} in hello")]
    BadService(String),
    #[error("no hello in time")]
    Timeout,
}

impl Transport {
    /// Sends our hello and reads the peer's, within the connect timeout.
    pub(super) async fn exchange_hellos(
        &self,
        conn: &quinn::Connection,
        certified: &CertificateClaims,
    ) -> Result<PeerInfo, HelloError> {
        let ours = self.encode_hello();
        let send_ours = async {
            let mut uni = conn.open_uni().await.map_err(HelloError::Lost)?;
            uni.write_all(&ours).await.map_err(|e| match e {
                quinn::WriteError::ConnectionLost(e) => HelloError::Lost(e),
                e => HelloError::Stream(e.to_string()),
            })?;
            let _ = uni.finish();
            Ok::<_, HelloError>(())
        };
        let read_theirs = async {
            let recv = conn.accept_uni().await.map_err(HelloError::Lost)?;
            read_hello(recv, certified, conn.remote_address()).await
        };
        let both = async { tokio::try_join!(send_ours, read_theirs).map(|(_, info)| info) };
        tokio::time::timeout(self.inner.limits.connect_timeout, both)
            .await
            .map_err(|_| HelloError::Timeout)?
    }

    /// Takes the later hellos of a peer (protocol 2: its services changed) until the connection
    /// ends; a bad one closes the connection.
    pub(super) async fn follow_hellos(
        &self,
        conn: &quinn::Connection,
        certified: &CertificateClaims,
        protocol: u16,
    ) {
        let id = &certified.id;
        if protocol < 2 {
            return std::future::pending().await;
        }
        while let Ok(recv) = conn.accept_uni().await {
            // Boxed: the wait for a hello lasts as long as the connection, a read is rare.
            match Box::pin(read_hello(recv, certified, conn.remote_address())).await {
                Ok(info) => {
                    debug!("{} now hosts {:?}", id.node_name(), info.services);
                    // The connection is registered already: an update is never refused.
                    let _ = self.inner.peers.register(info, conn);
                }
                Err(why) => {
                    warn!("closing connection to {id}: {why}");
                    conn.close(super::CLOSE_BAD_HELLO.into(), why.to_string().as_bytes());
                    return;
                }
            }
        }
    }

    /// Sends a new hello on every connection that speaks protocol 2 whenever the hosted services
    /// change.
    pub(super) async fn announce_loop(self) {
        let mut changes = self.inner.hosted.subscribe();
        let mut stop = self.inner.shutdown.clone();
        // The newest hello, encoded once a change: a send takes it once its stream is open.
        let latest = tokio::sync::watch::Sender::new(std::sync::Arc::<[u8]>::from(&[][..]));
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
            latest.send_replace(self.encode_hello().into());
            let names: Vec<String> = self
                .inner
                .hosted
                .names()
                .iter()
                .map(|s| s.to_string())
                .collect();
            info!("hosted services changed: now [{}]", names.join(", "));
            for (info, conn) in self.inner.peers.all_connections() {
                if info.protocol < 2 {
                    continue;
                }
                let latest = latest.subscribe();
                tokio::spawn(async move {
                    // The newest hello, taken once its stream is open, in the same poll: a peer
                    // applies hellos in the order of their streams, and sends waiting for a
                    // stream (a peer allows two at once) may get them in any order. So the last
                    // stream carries the newest services, never an older snapshot.
                    let Ok(mut uni) = conn.open_uni().await else {
                        return;
                    };
                    let hello = latest.borrow().clone();
                    if uni.write_all(&hello).await.is_ok() {
                        let _ = uni.finish();
                    }
                });
            }
        }
    }

    /// Our hello as it stands now.
    pub(super) fn encode_hello(&self) -> Vec<u8> {
        let me = &self.inner.me;
        let services = self.inner.hosted.names();
        let mut hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            name: me.id.node_name().as_str(),
            role: me.role,
            labels: Default::default(),
            services: Default::default(),
        };
        // The config bounds labels and services to what a hello holds.
        for (k, v) in &me.labels {
            let _ = hello.labels.push((k, v));
        }
        for s in &services {
            let _ = hello.services.push(s.as_str());
        }
        let mut out = Vec::new();
        mesh_proto::encode_frame_vec(&hello, &mut out);
        out
    }
}

async fn read_hello(
    recv: quinn::RecvStream,
    certified: &CertificateClaims,
    addr: std::net::SocketAddr,
) -> Result<PeerInfo, HelloError> {
    let id = &certified.id;
    let frame = FrameReader::new(recv)
        .frame(MAX_HELLO_BYTES)
        .await
        .map_err(|e| HelloError::Malformed(e.to_string()))?;
    let hello: Hello =
        decode_extensible(&frame).map_err(|e| HelloError::Malformed(e.to_string()))?;
    if hello.name != id.node_name().as_str() {
        return Err(HelloError::NameMismatch {
            claimed: hello.name.to_owned(),
            proven: id.clone(),
        });
    }
    if hello.protocol_version < MIN_PROTOCOL_VERSION {
        return Err(HelloError::TooOld {
            peer: hello.protocol_version,
        });
    }
    let services = hello
        .services
        .iter()
        .map(|s| ServiceName::try_from(*s).map_err(|_| HelloError::BadService((*s).to_owned())))
        .collect::<Result<Vec<_>, _>>()?;
    // The role is what the CA certified: a hello that claims more is only a claim.
    let role = if id.is_gateway() {
        Role::Gateway
    } else {
        Role::Node
    };
    if hello.role != role {
        debug!(
            "{id} announces the role {}, its certificate says {}: the certificate wins",
            hello.role.as_str(),
            role.as_str()
        );
    }
    Ok(PeerInfo {
        id: id.clone(),
        role,
        labels: hello
            .labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        // Labels that decide anything are the ones the CA certified; the hello's are display.
        certified: certified.labels.clone(),
        services,
        addr,
        protocol: hello.protocol_version.min(PROTOCOL_VERSION),
    })
}
