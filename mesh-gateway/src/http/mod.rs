//! The gateway's HTTP side, on loopback unless configured otherwise:
//!
//! | method and path | what |
//! |---|---|
//! | `GET /` | the fleet dashboard (its page, script and style need no token; its data does off loopback) |
//! | `GET /v1/overview` | what the dashboard shows: nodes, calls between them, services, rollout, audit, traces |
//! | `GET /v1/policy/history` | accepted bundles, newest first (`/v1/policy/history/<version>`: one, with its text) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /v1/nodes` | the registry |
//! | `GET /v1/services` | each service and the nodes hosting it |
//! | `GET /v1/policy` | the current bundle and its version |
//! | `PUT /v1/policy` | a new bundle (bearer token): 200 with its version, 400 with the error, 401 |
//! | `GET /v1/policy/status` | which node holds which version, and refusals |
//! | `GET /v1/traces?limit=N` | recent traces, newest first |
//! | `GET /v1/revocations` | the deny list |
//! | `POST /v1/revocations` | `{"name": "node-7", "reason": "..."}` (bearer token): revoke a node |
//! | `DELETE /v1/revocations/<name>` | lift a revocation (bearer token) |
//!
//! On loopback, reads are open (to whoever can reach the address); every change needs
//! `Authorization: Bearer <token>`. On any other address, every request needs it.

mod api;
mod dashboard;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::control::ControlPlane;

/// What the handlers reach: the control plane and the admin token.
#[derive(Clone)]
struct Api {
    plane: Arc<ControlPlane>,
    tokens: Arc<crate::admin_tokens::AdminTokens>,
    /// Off loopback, reads need the token too.
    reads_need_token: bool,
    /// Time a client has to send a bundle.
    body_timeout: std::time::Duration,
    /// The dashboard's snapshots of the call counters.
    snapshots: Arc<dashboard::Snapshots>,
}

/// The admin API's thread.
#[derive(Clone)]
pub(crate) struct Running {
    /// Closed when the thread ends.
    alive: watch::Receiver<()>,
}

impl Running {
    /// Waits, at most `bound`, until the thread has stopped serving (after `stop` changed).
    pub(crate) async fn stopped(&self, bound: std::time::Duration) {
        let mut alive = self.alive.clone();
        let _ = tokio::time::timeout(bound, async { while alive.changed().await.is_ok() {} }).await;
    }
}

/// Binds the admin API on `addr` and serves it until `stop` changes; returns the bound address.
///
/// It runs on a thread of its own, with a runtime of its own: the gateway's runtime thread reads
/// the QUIC socket of every node's session, and a document about 10,000 nodes takes milliseconds
/// to build. Built there, an admin client polling often (a script, a dashboard) delayed every
/// session's packets until sessions timed out. The handlers share the control plane's state
/// through its locks: the registry's is held only to copy its list; `/metrics` and the overview
/// hold the metrics lock while they read the call series (about 20 ms for `/metrics` at 10,000
/// nodes, native).
pub(crate) async fn serve(
    plane: Arc<ControlPlane>,
    tokens: Arc<crate::admin_tokens::AdminTokens>,
    addr: SocketAddr,
    limits: &mesh_node::http::HttpLimits,
    stop: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, Running)> {
    let limits = limits.clone();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let (alive_tx, alive) = watch::channel(());
    std::thread::Builder::new()
        .name("admin-api".into())
        .spawn(move || {
            // Dropped last: `Running::stopped` returns once the runtime and what ran on it
            // are gone.
            let _alive = alive_tx;
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let mut until = stop.clone();
                let bound = serve_here(plane, tokens, addr, &limits, stop).await;
                let serving = bound.is_ok();
                if bound_tx.send(bound).is_err() || !serving {
                    return;
                }
                // Serve until the gateway stops (or is gone).
                let _ = until.wait_for(|stopping| *stopping).await;
            });
        })?;
    let bound = bound_rx
        .await
        .map_err(|_| std::io::Error::other("the admin API's thread ended before it bound"))??;
    Ok((bound, Running { alive }))
}

/// [`serve`], on the runtime of the caller.
async fn serve_here(
    plane: Arc<ControlPlane>,
    tokens: Arc<crate::admin_tokens::AdminTokens>,
    addr: SocketAddr,
    limits: &mesh_node::http::HttpLimits,
    stop: watch::Receiver<bool>,
) -> std::io::Result<SocketAddr> {
    let api = Api {
        plane,
        tokens,
        reads_need_token: !addr.ip().is_loopback(),
        body_timeout: limits.body_timeout,
        snapshots: Arc::default(),
    };
    mesh_node::http::serve_http(addr, limits, stop, move |req| api::handle(api.clone(), req)).await
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::time::Duration;

    /// The admin API answers while the gateway's runtime thread is busy: that thread reads every
    /// node's packets, and an admin client must not be able to hold it up (nor be held up by it).
    #[test]
    fn the_admin_api_answers_while_the_gateways_runtime_is_busy() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = crate::ca::Ca::generate("starling.local").expect("ca");
        let rt = mesh_node::process::runtime();
        let gateway = rt
            .block_on(crate::demo::start_gateway(dir.path(), &ca, None))
            .expect("gateway");
        let admin = gateway.admin_addr();
        let (answered, answer) = std::sync::mpsc::channel();
        let asker = std::thread::spawn(move || {
            let got = (|| -> std::io::Result<String> {
                let mut s = std::net::TcpStream::connect(admin)?;
                s.set_read_timeout(Some(Duration::from_secs(20)))?;
                s.write_all(
                    b"GET /v1/policy/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )?;
                let mut text = String::new();
                s.read_to_string(&mut text)?;
                Ok(text)
            })();
            let _ = answered.send(got);
        });
        // This thread runs the gateway's runtime, and polls nothing until the answer is in.
        let got = answer.recv_timeout(Duration::from_secs(10));
        asker.join().expect("asker");
        rt.block_on(gateway.shutdown());
        // Its thread is gone once the gateway has shut down: nothing listens any more.
        assert!(
            std::net::TcpStream::connect(admin).is_err(),
            "the admin API still listens after shutdown"
        );
        let text = got
            .expect("the admin API answered within 10 s while the gateway's runtime was busy")
            .expect("read the answer");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let body = &text[text.find("\r\n\r\n").expect("a body") + 4..];
        let status: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(status["latest"], 1, "{status}");
        assert!(status["nodes"].is_array(), "{status}");
    }
}
