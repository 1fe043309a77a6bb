//! The Starling gateway: the control plane of one site. It is a node too (it dials, serves, is
//! found by mDNS as role `gateway`), and on top: the mesh CA (`ca init`, `ca issue`), the registry,
//! versioned policy pushed to every node, telemetry aggregated into Prometheus metrics, recent
//! traces, an audit log, the HTTP API, and the demo.
//!
//! Where things live (see docs/ARCHITECTURE.md): [`config`] the gateway's own config keys;
//! [`gateway`] composes the parts; `control` the nodes' control streams; `policy` the versioned
//! bundle; `audit` the audit log; `http` the admin API; [`registry`], [`metrics`] and [`traces`]
//! what the control plane keeps; [`ca`] certificates.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin_tokens;
mod audit;
pub mod ca;
pub mod cli;
pub mod cloud;
pub mod config;
mod control;
pub mod demo;
pub mod gateway;
mod http;
pub mod metrics;
pub mod otlp;
mod policy;
pub mod policy_history;
pub mod registry;
pub mod status;
mod tls;
pub mod traces;

pub use config::GatewayConfig;

/// Locks a mutex; a panic while it was held (a bug) does not stop the gateway from serving.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
pub use gateway::{Gateway, GatewayError};
