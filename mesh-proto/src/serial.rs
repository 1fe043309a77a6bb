//! The serial link between a node and a microcontroller wired to it (UART, USB CDC): frames, their
//! checksum and their delimiting. No allocator; the frames borrow from the buffer they were read
//! into.
//!
//! On the line, every frame is `COBS(postcard(Envelope { content, crc }))` followed by a zero
//! byte, where `content` is the postcard encoding of a [`Frame`] and `crc` its CRC-32
//! (ISO-HDLC) in little-endian bytes. COBS (postcard's) makes the zero byte a delimiter that
//! appears nowhere else, so a reader that lost bytes, heard line noise or started in the middle of
//! a frame drops what it has at the next zero and starts clean; the CRC drops a frame whose bits
//! flipped. [`Decoder`] does both.
//!
//! With a pre-shared key (feature `psk`), the content is the frame followed by the first 16 bytes
//! of HMAC-SHA256(key, frame): a device plugged into another's port cannot speak in its name. A
//! side with a key drops frames without a good tag; a side without one drops tagged frames; both
//! count them as [`Dropped::Unauthenticated`].
//!
//! The exchange: the microcontroller sends [`Frame::Announce`] when it starts and whenever asked
//! ([`Frame::Discover`]); the node sends [`Frame::Call`]s, each with a request id, and the
//! microcontroller answers each with a [`Frame::Reply`] of the same id; both send
//! [`Frame::Heartbeat`]s. Services and methods in a call are indexes into the announce, so a call
//! costs a few bytes beyond its body. Like every wire enum, these only grow at the end.

use heapless::Vec;
use postcard::accumulator::{CobsAccumulator, FeedResult};
use serde::{Deserialize, Serialize};

use crate::Status;

/// The link version an announce carries; a node refuses a microcontroller of another version
/// (and says so in a [`Frame::Refuse`]).
pub const SERIAL_VERSION: u8 = 1;

/// Services one microcontroller announces, at most.
pub const MAX_SERVICES: usize = 4;
/// Methods of one service, at most.
pub const MAX_METHODS: usize = 4;

/// The checksum of a frame's content.
pub const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

/// One service of a microcontroller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDecl<'a> {
    /// Its name (a service name of the mesh).
    pub name: &'a str,
    /// Its methods.
    #[serde(borrow)]
    pub methods: Vec<&'a str, MAX_METHODS>,
}

/// What crosses the serial link.
// The announce is the large variant (about 200 bytes on a 32-bit microcontroller, with the
// bounds above): no allocator to box it, and a frame is decoded one at a time.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame<'a> {
    /// Microcontroller to node: who it is and what it serves. Sent at start and when asked.
    Announce {
        /// [`SERIAL_VERSION`].
        version: u8,
        /// Its name: its identity is `spiffe://<td>/node/<node>/leaf/<name>`.
        name: &'a str,
        /// Its firmware version.
        firmware: &'a str,
        /// Its services.
        #[serde(borrow)]
        services: Vec<ServiceDecl<'a>, MAX_SERVICES>,
        /// Calls it takes at once (the node keeps at most this many in flight).
        max_in_flight: u8,
        /// How often it sends a heartbeat: the node takes it for gone after three missed.
        heartbeat_ms: u32,
    },
    /// Node to microcontroller: announce yourself (the node restarted).
    Discover,
    /// Node to microcontroller: a call.
    Call {
        /// Matches the reply to the call; a repeated id is a retry.
        id: u16,
        /// Index of the service in the announce.
        service: u8,
        /// Index of the method in the service.
        method: u8,
        /// The request body.
        body: &'a [u8],
    },
    /// Microcontroller to node: the answer to call `id`.
    Reply {
        /// The call's id.
        id: u16,
        /// The outcome.
        status: Status,
        /// The response body (or the error message).
        body: &'a [u8],
    },
    /// Either side: still here.
    Heartbeat {
        /// Milliseconds since the sender started.
        uptime_ms: u32,
    },
    /// Either side: the other is not understood (another version): why.
    Refuse {
        /// In words.
        reason: &'a str,
    },
}

#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    content: &'a [u8],
    crc: [u8; 4],
}

/// Why a frame could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeError {
    /// It does not fit the buffer.
    TooBig,
    /// A key was given and this build has no `psk` feature.
    NoKeySupport,
}

/// The first [`TAG_BYTES`] of HMAC-SHA256(`key`, `content`).
#[cfg(feature = "psk")]
fn tag(key: &Key, content: &[u8]) -> Option<[u8; TAG_BYTES]> {
    use hmac::{Mac, SimpleHmac};
    let mut mac = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(key).ok()?;
    mac.update(content);
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; TAG_BYTES];
    out.copy_from_slice(&full[..TAG_BYTES]);
    Some(out)
}

#[cfg(not(feature = "psk"))]
fn tag(_key: &Key, _content: &[u8]) -> Option<[u8; TAG_BYTES]> {
    None
}

/// Compares in constant time.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Bytes of the authentication tag a keyed frame carries.
pub const TAG_BYTES: usize = 16;

/// A pre-shared key of a serial link (32 bytes).
pub type Key = [u8; 32];

/// Writes `frame` as it goes on the line (delimiter included) into `out`, using `scratch` (at
/// least the frame's postcard size); returns the bytes written.
pub fn encode(frame: &Frame<'_>, scratch: &mut [u8], out: &mut [u8]) -> Result<usize, EncodeError> {
    encode_keyed(frame, None, scratch, out)
}

/// [`encode`], with the frame's authentication tag when `key` is given (feature `psk`).
pub fn encode_keyed(
    frame: &Frame<'_>,
    key: Option<&Key>,
    scratch: &mut [u8],
    out: &mut [u8],
) -> Result<usize, EncodeError> {
    let len = postcard::to_slice(frame, scratch)
        .map_err(|_| EncodeError::TooBig)?
        .len();
    let len = match key {
        None => len,
        Some(key) => {
            let tag = tag(key, &scratch[..len]).ok_or(EncodeError::NoKeySupport)?;
            scratch
                .get_mut(len..len + TAG_BYTES)
                .ok_or(EncodeError::TooBig)?
                .copy_from_slice(&tag);
            len + TAG_BYTES
        }
    };
    let content = &scratch[..len];
    let envelope = Envelope {
        crc: CRC.checksum(content).to_le_bytes(),
        content,
    };
    postcard::to_slice_cobs(&envelope, out)
        .map(|written| written.len())
        .map_err(|_| EncodeError::TooBig)
}

/// Why bytes read were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Dropped {
    /// More bytes than the buffer holds before a delimiter.
    TooLong,
    /// Not a frame (noise, a half frame, a cut envelope).
    Garbled,
    /// The checksum does not match (bits flipped).
    BadChecksum,
    /// The checksum matches but the content is no frame this side knows.
    Unknown,
    /// Without the tag this side's key expects, or tagged when this side has no key.
    Unauthenticated,
}

/// Reads frames out of a byte stream: `N` is the longest encoded frame it takes.
pub struct Decoder<const N: usize> {
    acc: CobsAccumulator<N>,
    key: Option<Key>,
    /// The checked content of the last frame, kept so the frame can borrow from it.
    content: [u8; N],
    content_len: usize,
    /// Frames dropped since start, by reason: too long, garbled, bad checksum, unknown,
    /// unauthenticated.
    pub dropped: [u32; 5],
}

impl<const N: usize> Default for Decoder<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Decoder<N> {
    /// An empty decoder.
    pub const fn new() -> Self {
        Decoder {
            acc: CobsAccumulator::new(),
            key: None,
            content: [0; N],
            content_len: 0,
            dropped: [0; 5],
        }
    }

    /// A decoder that takes only frames tagged with `key` (feature `psk`).
    pub const fn with_key(key: Key) -> Self {
        let mut d = Self::new();
        d.key = Some(key);
        d
    }

    /// Feeds `input`; calls `on_frame` with each good frame, in order, and `on_drop` with the
    /// reason for each bad one. Never fails: what is not a frame is dropped, and the next
    /// delimiter starts clean.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        mut on_frame: impl FnMut(Frame<'_>),
        mut on_drop: impl FnMut(Dropped),
    ) {
        while !input.is_empty() {
            let (checked, rest) = match self.acc.feed_ref::<Envelope<'_>>(input) {
                FeedResult::Consumed => return,
                FeedResult::OverFull(rest) => (Err(Dropped::TooLong), rest),
                FeedResult::DeserError(rest) => (Err(Dropped::Garbled), rest),
                FeedResult::Success { data, remaining } => {
                    let ok = CRC.checksum(data.content).to_le_bytes() == data.crc;
                    if ok {
                        let n = data.content.len().min(N);
                        self.content[..n].copy_from_slice(&data.content[..n]);
                        self.content_len = n;
                        (Ok(()), remaining)
                    } else {
                        (Err(Dropped::BadChecksum), remaining)
                    }
                }
            };
            input = rest;
            let dropped = match checked {
                Ok(()) => {
                    let content = &self.content[..self.content_len];
                    match postcard::take_from_bytes::<Frame<'_>>(content) {
                        Ok((frame, rest)) => {
                            let body = &content[..content.len() - rest.len()];
                            let genuine = match &self.key {
                                None => rest.is_empty(),
                                Some(key) => {
                                    rest.len() == TAG_BYTES
                                        && tag(key, body).is_some_and(|t| same(&t, rest))
                                }
                            };
                            if genuine {
                                on_frame(frame);
                                None
                            } else {
                                Some(Dropped::Unauthenticated)
                            }
                        }
                        Err(_) => Some(Dropped::Unknown),
                    }
                }
                Err(why) => Some(why),
            };
            if let Some(why) = dropped {
                self.dropped[why as usize] = self.dropped[why as usize].saturating_add(1);
                on_drop(why);
            }
        }
    }
}

/// The most bytes a frame of `body` bytes and short names takes on the line (for buffer sizes).
pub const fn max_encoded(content: usize) -> usize {
    // Envelope: length prefix (up to 3 bytes below 2 MiB) and CRC; COBS: one byte per 254 and one
    // more; the delimiter.
    let envelope = content + 3 + 4;
    envelope + envelope / 254 + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(id: u16, body: &[u8]) -> Frame<'_> {
        Frame::Call {
            id,
            service: 0,
            method: 1,
            body,
        }
    }

    fn line(frame: &Frame<'_>) -> std::vec::Vec<u8> {
        let (mut scratch, mut out) = ([0u8; 512], [0u8; 600]);
        let n = encode(frame, &mut scratch, &mut out).expect("encode");
        out[..n].to_vec()
    }

    #[test]
    fn frames_survive_noise_cuts_and_flipped_bits() {
        let good = line(&call(7, b"hello"));
        assert_eq!(good.last(), Some(&0));
        assert!(
            !good[..good.len() - 1].contains(&0),
            "only the delimiter is zero"
        );
        let mut stream = std::vec::Vec::new();
        stream.extend_from_slice(&[0x13, 0x37, 0xff, 0x00]); // noise
        stream.extend_from_slice(&good[..good.len() / 2]); // half a frame, then a zero
        stream.push(0);
        let mut flipped = good.clone();
        flipped[3] ^= 0x10;
        stream.extend_from_slice(&flipped);
        stream.extend_from_slice(&line(&call(8, b"world")));
        let mut d = Decoder::<128>::new();
        let (mut frames, mut drops) = (std::vec::Vec::new(), std::vec::Vec::new());
        // Byte by byte, as a UART hands them over.
        for b in &stream {
            d.feed(
                core::slice::from_ref(b),
                |f| {
                    if let Frame::Call { id, body, .. } = f {
                        frames.push((id, body.to_vec()))
                    }
                },
                |why| drops.push(why),
            );
        }
        assert_eq!(frames, [(8, b"world".to_vec())]);
        assert_eq!(drops.len(), 3, "{drops:?}");
        assert!(drops.contains(&Dropped::BadChecksum), "{drops:?}");
    }

    #[test]
    fn a_frame_longer_than_the_buffer_is_dropped_and_the_next_is_read() {
        let big = [0x55u8; 300];
        let mut stream = line(&call(1, &big));
        stream.extend_from_slice(&line(&call(2, b"ok")));
        let mut d = Decoder::<64>::new();
        let mut ids = std::vec::Vec::new();
        let mut drops = std::vec::Vec::new();
        d.feed(
            &stream,
            |f| {
                if let Frame::Call { id, .. } = f {
                    ids.push(id)
                }
            },
            |why| drops.push(why),
        );
        assert_eq!(ids, [2]);
        assert_eq!(drops.first(), Some(&Dropped::TooLong));
    }

    #[test]
    fn an_announce_round_trips() {
        let mut services = Vec::new();
        let mut methods = Vec::new();
        methods.push("read").expect("room");
        methods.push("info").expect("room");
        services
            .push(ServiceDecl {
                name: "sensor",
                methods,
            })
            .expect("room");
        let announce = Frame::Announce {
            version: SERIAL_VERSION,
            name: "mcu-1",
            firmware: "0.1.0",
            services,
            max_in_flight: 2,
            heartbeat_ms: 1000,
        };
        let mut d = Decoder::<256>::new();
        let mut got = None;
        d.feed(
            &line(&announce),
            |f| got = Some(std::format!("{f:?}")),
            |why| panic!("{why:?}"),
        );
        assert_eq!(got, Some(std::format!("{announce:?}")));
    }

    #[test]
    fn a_64_byte_call_costs_few_bytes_on_the_line() {
        let n = line(&call(300, &[1u8; 64])).len();
        std::eprintln!("a call with a 64-byte body is {n} bytes on the line");
        assert!(n <= 64 + 14, "{n} bytes on the line");
    }

    #[cfg(feature = "psk")]
    #[test]
    fn keyed_frames_pass_only_with_the_same_key() {
        let key = [7u8; 32];
        let (mut scratch, mut out) = ([0u8; 512], [0u8; 600]);
        let n = encode_keyed(&call(5, b"hi"), Some(&key), &mut scratch, &mut out).expect("encode");
        let keyed = out[..n].to_vec();
        let plain = line(&call(6, b"hi"));
        let ids = |d: &mut Decoder<256>, bytes: &[u8]| {
            let (mut ids, mut drops) = (std::vec::Vec::new(), std::vec::Vec::new());
            d.feed(
                bytes,
                |f| {
                    if let Frame::Call { id, .. } = f {
                        ids.push(id)
                    }
                },
                |why| drops.push(why),
            );
            (ids, drops)
        };
        let mut with_key = Decoder::<256>::with_key(key);
        assert_eq!(ids(&mut with_key, &keyed).0, [5]);
        assert_eq!(ids(&mut with_key, &plain).1, [Dropped::Unauthenticated]);
        let mut other_key = Decoder::<256>::with_key([8u8; 32]);
        assert_eq!(ids(&mut other_key, &keyed).1, [Dropped::Unauthenticated]);
        let mut no_key = Decoder::<256>::new();
        assert_eq!(ids(&mut no_key, &keyed).1, [Dropped::Unauthenticated]);
        assert_eq!(ids(&mut no_key, &plain).0, [6]);
    }
}
