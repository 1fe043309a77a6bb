//! The Starling node: one per device. It proves who it is with a certificate from the mesh CA,
//! connects to its peers over mutually authenticated QUIC, serves the services it hosts by
//! forwarding calls to their upstreams, and lets apps on the device call the mesh through a
//! loopback HTTP ingress or, from Rust, through [`Node::call`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use mesh_node::{Node, NodeConfig};
//! let config = NodeConfig::load(std::path::Path::new("/etc/starling/node.toml"))?;
//! let identity = config.load_identity()?;
//! let node = Node::start(config, identity).await?;
//! let answer = node.call("echo", "say", bytes::Bytes::from_static(b"hi")).await?;
//! # Ok(()) }
//! ```
//!
//! The decisions (which endpoint, back-off) live in `mesh-core`; this crate is the shell that does
//! the I/O around them.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod call;
pub mod cli;
pub mod config;
pub mod control;
pub mod discovery;
pub mod identity;
pub mod ingress;
pub mod node;
pub mod policy;
mod traffic;
pub mod upstream;
pub mod wire;

pub use call::{CallError, Reply};
pub use config::{ConfigError, NodeConfig};
pub use identity::Identity;
pub use node::{CallOptions, Node, PeerInfo, StartError};
