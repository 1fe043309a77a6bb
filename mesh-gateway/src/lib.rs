//! The Starling gateway: the control plane of one site. It is a node too (it dials, serves, is
//! found by mDNS as role `gateway`), and on top: the mesh CA (`ca init`, `ca issue`), the registry,
//! versioned policy pushed to every node, telemetry aggregated into Prometheus metrics, recent
//! traces, an audit log, the HTTP API, and the demo.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod admin;
pub mod ca;
pub mod cli;
pub mod demo;
pub mod gateway;
pub mod metrics;
pub mod registry;
pub mod traces;

pub use gateway::{Gateway, GatewayError};
