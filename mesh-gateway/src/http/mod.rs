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

/// Binds the admin API on `addr` and serves it until `stop` changes; returns the bound address.
pub(crate) async fn serve(
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
