//! Starling's wire types and framing.
//!
//! Every other crate speaks through this one: the node, the gateway and the `no_std` firmware shim.
//! It is pure data and codec (no I/O, no clock), `no_std` by default; the `alloc` feature adds
//! owned encoders, `std` adds `std::error::Error`, `defmt` adds `defmt::Format`.
//!
//! # Frames
//!
//! Every part of a stream is a *frame*: a LEB128 varint length, then that many bytes. Heads
//! ([`RequestHead`], [`ResponseHead`], [`Hello`]) are postcard inside the frame; a body is raw bytes
//! inside its frame. A call is one bidirectional QUIC stream:
//!
//! ```text
//! caller -> callee:  frame(RequestHead)  frame(body)  FIN
//! callee -> caller:  frame(ResponseHead) frame(body)  FIN
//! ```
//!
//! The types borrow from the buffer they were decoded from, so a microcontroller decodes a head
//! without an allocator. Every length read from the network is checked against a bound in
//! [`limits`] before anything is allocated or copied.
//!
//! ```
//! use mesh_proto::{RequestHead, decode_head, encode_frame, frame_len};
//! let head = RequestHead::new("echo", "say", 1_000);
//! let mut buf = [0u8; 64];
//! let frame = encode_frame(&head, &mut buf).unwrap();
//! let (len, prefix) = frame_len(frame, 64).unwrap().unwrap();
//! let back: RequestHead = decode_head(&frame[prefix..prefix + len]).unwrap();
//! assert_eq!(back, head);
//! ```
//!
//! Enums on the wire only grow at the end, and the [`Hello`] carries [`PROTOCOL_VERSION`].
#![no_std]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(any(feature = "std", test))]
extern crate std;

#[cfg(feature = "alloc")]
pub mod control;
#[cfg(feature = "alloc")]
pub mod enroll;
mod frame;
pub mod heads;
mod name;
pub mod serial;
mod types;

pub use frame::{FrameError, decode_extensible, decode_head, encode_frame, frame_len, varint};
#[cfg(feature = "alloc")]
pub use frame::{encode_body_prefix, encode_frame_vec};
pub use name::{NameError, validate_name};
pub use types::{
    Hello, Labels, Metadata, RequestHead, ResponseHead, Role, Services, Status, TraceContext,
};

/// The protocol version a node speaks; carried in every [`Hello`]. Two peers speak the lower of
/// their versions on a connection.
///
/// - 1: unary calls, one hello per connection.
/// - 2: streamed calls (a request flagged with [`STREAM_METADATA`] carries its body as any number
///   of frames until the stream ends, and is answered the same way); a node sends a new hello on a
///   new unidirectional stream when its hosted services change.
/// - 3: TCP tunnels (a request flagged with [`TUNNEL_METADATA`], method [`TUNNEL_METHOD`]: after
///   the answer's head, the stream carries the connection's raw bytes both ways, and each side's
///   end of stream is that side's half-close); telemetry batches carry TCP forward counters.
/// - 4: kept call streams (a unary request flagged with [`KEEP_METADATA`] does not end its stream
///   after its body; a callee that will read another call on the stream flags its answer the same
///   way and does not end its side either).
pub const PROTOCOL_VERSION: u16 = 4;

/// The oldest protocol version a node still speaks; a peer below it is refused with a reason.
pub const MIN_PROTOCOL_VERSION: u16 = 1;

/// The metadata entry that marks a streamed call (protocol 2). Metadata keys starting with `:` are
/// the mesh's own: a node refuses them from apps and never passes them to an upstream.
pub const STREAM_METADATA: &str = ":stream";

/// The metadata entry that keeps a unary call's stream for the next call (protocol 4). On a
/// request: the caller will not end the stream after the body, and asks the callee to keep it.
/// On an answer: the callee will read the stream's next call. A stream kept by both carries one
/// call after another, never two at once; either side ends it by ending its half.
pub const KEEP_METADATA: &str = ":keep";

/// The code a callee resets (and stops) a kept stream with when it ends it idle, before any next
/// call was read: a caller whose next call met that reset sends the call again on a new stream. A
/// kept stream ended any other way may have carried its call to the callee, and the call is not
/// sent again.
pub const KEPT_IDLE_CODE: u32 = 0x6b65_6570;

/// The metadata entry that marks a TCP tunnel (protocol 3): one TCP connection carried on the
/// stream, as raw bytes after the heads.
pub const TUNNEL_METADATA: &str = ":tunnel";

/// The method a TCP tunnel is opened with: what authorization rules and rate limits name.
pub const TUNNEL_METHOD: &str = "connect";

/// The ALPN every Starling QUIC connection negotiates.
pub const ALPN: &[u8] = b"starling/1";

/// Hard bounds on everything read from the network.
pub mod limits {
    /// Largest encoded [`RequestHead`](crate::RequestHead) or [`ResponseHead`](crate::ResponseHead).
    pub const MAX_HEAD_BYTES: usize = 8 * 1024;
    /// Largest encoded [`Hello`](crate::Hello).
    pub const MAX_HELLO_BYTES: usize = 16 * 1024;
    /// Most metadata entries in one head.
    pub const MAX_METADATA: usize = 16;
    /// Most labels a node announces.
    pub const MAX_LABELS: usize = 16;
    /// Most services one node hosts.
    pub const MAX_SERVICES: usize = 64;
    /// Longest node, service or method name, in bytes.
    pub const MAX_NAME_LEN: usize = 63;
    /// The default bound on a call body; nodes may configure a smaller or larger one.
    pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
}
