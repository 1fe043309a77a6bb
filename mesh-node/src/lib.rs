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
//! Where things live (see docs/ARCHITECTURE.md): [`node`] composes the parts; `transport` owns
//! the QUIC endpoint and connections; `client` is the caller's side of a call, `server` the
//! callee's; [`upstream`] is where a hosted service's calls go; [`ingress`] is the loopback HTTP
//! door for apps; [`forward`] carries local TCP connections to `tcp://` services; [`control`] is the link to the gateway; [`identity`] the certificate and its
//! checks. The decisions (which endpoint, may this caller call, back-off) live in `mesh-core`; this
//! crate is the shell that does the I/O around them.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod call;
pub mod cli;
mod client;
mod clock;
pub mod config;
pub mod control;
pub mod discovery;
pub mod forward;
mod hosted;
pub mod http;
pub mod identity;
pub mod ingress;
mod kept;
pub mod node;
mod peers;
pub mod policy;
pub mod process;
mod relay;
mod rng;
mod server;
pub mod state;
pub mod testing;
mod transport;
pub mod upstream;
pub mod wallclock;
pub mod wire;

pub use call::{CallError, CallOptions, CallReceiver, CallSender, CallStream, Reply};
pub use config::{ConfigError, NodeConfig};
pub use identity::Identity;
pub use node::{Node, NodeOptions, StartError};
pub use peers::{MAX_CONNECTIONS_PER_PEER, PeerInfo};
pub use server::ReservedService;
pub use transport::{
    BindError, ConnectError, DIAL_HOLD, EnrollService, MAX_CONCURRENT_DIALS, bind_endpoint,
    udp_socket,
};
