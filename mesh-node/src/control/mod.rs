//! The node's link to its gateway, and what travels on it.
//!
//! - `session`: the control stream (hello, heartbeats, policy bundles, telemetry, the registry).
//! - `telemetry`: what the node records for the gateway, cut into batches kept until acknowledged.
//!
//! The policy the session applies lives in [`crate::policy`]; the copy it keeps on disk in
//! [`crate::state`].

mod session;
pub(crate) mod telemetry;

pub use session::SOFTWARE_VERSION;
pub(crate) use session::{ControlClient, GatewayPin, apply_saved_policy, resources};
