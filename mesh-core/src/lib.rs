//! The sans-I/O heart of a Starling node: the decisions, as plain functions of state, input and
//! `now`. Nothing here reads a socket or a clock, so a test can replay a day of traffic in a
//! millisecond. The node (`mesh-node`) is a thin shell that feeds this crate events and carries
//! out what it decides.
//!
//! - [`name`]: names parsed once at the edge (`NodeName`, `ServiceName`, `MethodName`).
//! - [`identity`]: SPIFFE IDs, the only caller identity the mesh trusts.
//! - [`table`]: which endpoints serve which service.
//! - [`authz`]: who may call what.
//! - [`route`]: routes, weighted splits, mirrors.
//! - [`balance`]: power of two choices over peak-EWMA, locality, circuit breaking.
//! - [`limits`]: token buckets for rate limits and the retry budget.
//! - [`backoff`]: re-dial delays with jitter.
//! - [`telemetry`]: call counters and histograms, cut into batches kept until acknowledged.
//! - [`discovery`]: the peers discovery reports, and when to dial them.
//! - [`policy`]: the policy bundle (authorization, routes, retries, breakers, rate limits), parsed
//!   and validated the same way at the gateway and at every node.
//! - [`source`]: config and policy errors as `file:line: key: message`.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod authz;
pub mod backoff;
pub mod balance;
pub mod discovery;
pub mod identity;
pub mod labels;
pub mod limits;
pub mod name;
pub mod policy;
pub mod route;
pub mod source;
pub mod table;
pub mod telemetry;
pub mod token;

pub use backoff::Backoff;
pub use identity::{Certified, IdentityError, SpiffeId};
pub use name::{MethodName, NodeName, ServiceName};
pub use table::ServiceTable;
pub use telemetry::Telemetry;

/// A hash map for what a call looks up (services, endpoints, series): foldhash, seeded once per
/// process, instead of std's SipHash, which was 6% of a small call's instructions. Keys come
/// from config, policy, certificates and services that exist, never from an unauthenticated
/// peer.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// The set of [`FastMap`].
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
