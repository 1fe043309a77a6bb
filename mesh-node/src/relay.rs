//! Relaying a peer's renewal to the gateway: the reserved service `_relay_enroll`. A node whose
//! gateway is reachable only through its peers asks one of them; the peer opens an enrolment
//! connection to its own gateway and passes the frames of the exchange both ways, parsed and
//! bounded. It sees nothing secret (the request is a certificate chain and a CSR signed by the
//! certificate's key) and vouches for nothing: the gateway checks the proof, the node checks the
//! answer.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::SpiffeId;

use mesh_proto::enroll::{EnrollDown, EnrollUp, MAX_ENROLL_FRAME};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::CertificateClaims;
use crate::server::ReservedService;
use crate::wire::FrameReader;

/// Time a relayed exchange may take in all.
const RELAY_DEADLINE: Duration = Duration::from_secs(30);

/// Time a refusal may take to write: a peer that grants the stream no credit does not keep the
/// task (and its stream) past it.
const REFUSAL_WRITE: Duration = Duration::from_secs(5);

/// The `_relay_enroll` reserved service of a node.
pub(crate) struct EnrollRelay {
    /// Where this node's control stream is up to, if it is.
    pub(crate) gateway_up: watch::Receiver<(Option<SocketAddr>, u64)>,
    /// Relays at once, at most.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
    /// The peers with a relay in flight: one each, so that one peer cannot hold every slot.
    pub(crate) relaying: Arc<Mutex<HashSet<SpiffeId>>>,
}

impl EnrollRelay {
    pub(crate) fn new(gateway_up: watch::Receiver<(Option<SocketAddr>, u64)>) -> EnrollRelay {
        EnrollRelay {
            gateway_up,
            slots: Arc::new(tokio::sync::Semaphore::new(4)),
            relaying: Arc::default(),
        }
    }
}

/// A peer's relay in flight, forgotten when dropped.
struct Relaying {
    set: Arc<Mutex<HashSet<SpiffeId>>>,
    id: SpiffeId,
}

impl Relaying {
    fn start(set: &Arc<Mutex<HashSet<SpiffeId>>>, id: &SpiffeId) -> Option<Relaying> {
        let mut peers = set.lock().unwrap_or_else(|p| p.into_inner());
        peers.insert(id.clone()).then(|| Relaying {
            set: set.clone(),
            id: id.clone(),
        })
    }
}

impl Drop for Relaying {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl ReservedService for EnrollRelay {
    fn serve(
        &self,
        caller: Arc<CertificateClaims>,
        _remote: SocketAddr,
        send: quinn::SendStream,
        reader: FrameReader,
    ) -> Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let gateway = self.gateway_up.borrow().0;
        // One relay per peer at a time, then a place among the node's.
        let mine = Relaying::start(&self.relaying, &caller.id);
        let slot = mine
            .is_some()
            .then(|| self.slots.clone().try_acquire_owned().ok())
            .flatten();
        Box::pin(async move {
            let mut send = send;
            let refuse = |reason: String| EnrollDown::Refused {
                reason,
                revoked: false,
            };
            let (Some(gateway), Some(slot), Some(mine)) = (gateway, slot, mine) else {
                // Given back before the refusal is written (dropped here): a peer that does not
                // read it keeps nothing of the relay's.
                let _ = refusal(
                    &mut send,
                    &refuse("this peer has no gateway to relay to, or is busy".into()),
                )
                .await;
                let _ = send.finish();
                return;
            };
            info!(
                "relaying a renewal of {} to the gateway at {gateway}",
                caller.id
            );
            let relayed = tokio::time::timeout(RELAY_DEADLINE, relay(&mut send, reader, gateway))
                .await
                .unwrap_or_else(|_| Err("the relay took too long".into()));
            drop((slot, mine));
            if let Err(e) = relayed {
                warn!("relaying a renewal of {}: {e}", caller.id);
                let _ = refusal(&mut send, &refuse(format!("relay: {e}"))).await;
            }
            let _ = send.finish();
        })
    }
}

/// Passes the exchange (hello, roots, request, answer) between the node's stream and a new
/// enrolment connection to `gateway`.
async fn relay(
    send: &mut quinn::SendStream,
    mut reader: FrameReader,
    gateway: SocketAddr,
) -> Result<(), String> {
    let (endpoint, conn) = crate::identity::enroll::connect(gateway)
        .await
        .map_err(|e| e.to_string())?;
    let result = async {
        let (mut up, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut down = FrameReader::new(recv);
        // Two rounds: hello and roots, then the request and its answer.
        for _ in 0..2 {
            let from_node: EnrollUp = read(&mut reader).await?;
            if matches!(from_node, EnrollUp::Join { .. }) {
                return Err("a join token is never relayed".into());
            }
            write(&mut up, &from_node).await?;
            let from_gateway: EnrollDown = read(&mut down).await?;
            let last = !matches!(from_gateway, EnrollDown::Roots { .. });
            write(send, &from_gateway).await?;
            if last {
                break;
            }
        }
        let _ = up.finish();
        Ok(())
    }
    .await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    result
}

async fn read<T: serde::de::DeserializeOwned>(reader: &mut FrameReader) -> Result<T, String> {
    let frame = tokio::time::timeout(Duration::from_secs(10), reader.frame(MAX_ENROLL_FRAME))
        .await
        .map_err(|_| "nothing came within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    postcard::from_bytes(&frame).map_err(|e| format!("bad enrolment frame: {e}"))
}

/// Writes a refusal, within [`REFUSAL_WRITE`].
async fn refusal(send: &mut quinn::SendStream, refused: &EnrollDown) -> Result<(), String> {
    tokio::time::timeout(REFUSAL_WRITE, write(send, refused))
        .await
        .unwrap_or_else(|_| Err("the peer took no refusal".into()))
}

async fn write<T: serde::Serialize>(send: &mut quinn::SendStream, value: &T) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(value, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}
