//! Relaying a peer's renewal to the gateway: the reserved service `_relay_enroll`. A node whose
//! gateway is reachable only through its peers asks one of them; the peer opens an enrolment
//! connection to its own gateway and passes the frames of the exchange both ways, parsed and
//! bounded. It sees nothing secret (the request is a certificate chain and a CSR signed by the
//! certificate's key) and vouches for nothing: the gateway checks the proof, the node checks the
//! answer.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::enroll::{EnrollDown, EnrollUp, MAX_ENROLL_FRAME};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::CertificateClaims;
use crate::server::ReservedService;
use crate::wire::FrameReader;

/// Time a relayed exchange may take in all.
const RELAY_DEADLINE: Duration = Duration::from_secs(30);

/// The `_relay_enroll` reserved service of a node.
pub(crate) struct EnrollRelay {
    /// Where this node's control stream is up to, if it is.
    pub(crate) gateway_up: watch::Receiver<(Option<SocketAddr>, u64)>,
    /// Relays at once, at most.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
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
        let slot = self.slots.clone().try_acquire_owned();
        Box::pin(async move {
            let mut send = send;
            let refuse = |reason: String| EnrollDown::Refused {
                reason,
                revoked: false,
            };
            let (Some(gateway), Ok(_slot)) = (gateway, slot) else {
                let _ = write(
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
            if let Err(e) = relayed {
                warn!("relaying a renewal of {}: {e}", caller.id);
                let _ = write(&mut send, &refuse(format!("relay: {e}"))).await;
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

async fn write<T: serde::Serialize>(send: &mut quinn::SendStream, value: &T) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(value, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}
