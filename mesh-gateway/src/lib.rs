//! The Starling gateway: the control plane of one site. Today it is the mesh CA (`ca init`,
//! `ca issue`) and the demo; the registry, policy distribution, telemetry and metrics build on
//! the node it also is (see DESIGN.md).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod ca;
pub mod cli;
pub mod demo;
