//! Length-prefixed frames: a LEB128 varint length, then the bytes.

use serde::{Deserialize, Serialize};

/// Why a frame could not be read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// A length prefix longer than five bytes, or one that overflows `u32`.
    BadLength,
    /// A frame announced more bytes than its bound allows.
    TooLarge {
        /// The announced length.
        len: usize,
        /// The bound it broke.
        max: usize,
    },
    /// The bytes are not a valid encoding of the expected head.
    Malformed,
    /// The output buffer is too small for the encoded frame.
    BufferTooSmall,
}

impl core::fmt::Display for FrameError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FrameError::BadLength => f.write_str("bad frame length prefix"),
            FrameError::TooLarge { len, max } => {
                write!(f, "frame of {len} bytes exceeds the bound of {max} bytes")
            }
            FrameError::Malformed => f.write_str("malformed head"),
            FrameError::BufferTooSmall => f.write_str("output buffer too small"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FrameError {}

/// LEB128 varints for `u32`, as postcard encodes them.
pub mod varint {
    use super::FrameError;

    /// The longest encoding of a `u32`.
    pub const MAX_LEN: usize = 5;

    /// The bytes `value` takes encoded.
    #[inline]
    pub fn len(value: u32) -> usize {
        // 7 bits a byte; 0 takes one.
        (u32::BITS - (value | 1).leading_zeros()).div_ceil(7) as usize
    }

    /// Writes `value` into `out`, returning the bytes used.
    #[inline]
    pub fn encode(mut value: u32, out: &mut [u8; MAX_LEN]) -> &[u8] {
        let mut i = 0;
        loop {
            let byte = (value & 0x7f) as u8;
            value >>= 7;
            if value == 0 {
                out[i] = byte;
                return &out[..=i];
            }
            out[i] = byte | 0x80;
            i += 1;
        }
    }

    /// Reads a varint from the start of `buf`: `Ok(None)` if more bytes are needed, else the
    /// value and how many bytes it took.
    pub fn decode(buf: &[u8]) -> Result<Option<(u32, usize)>, FrameError> {
        let mut value: u32 = 0;
        for (i, &byte) in buf.iter().enumerate().take(MAX_LEN) {
            let bits = u32::from(byte & 0x7f);
            if i == MAX_LEN - 1 && bits > 0x0f {
                return Err(FrameError::BadLength);
            }
            value |= bits << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(Some((value, i + 1)));
            }
        }
        if buf.len() >= MAX_LEN {
            Err(FrameError::BadLength)
        } else {
            Ok(None)
        }
    }
}

/// Reads the length prefix at the start of `buf` and checks it against `max`: `Ok(None)` if more
/// bytes are needed, else `(frame length, prefix length)`.
pub fn frame_len(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, FrameError> {
    match varint::decode(buf)? {
        None => Ok(None),
        Some((len, prefix)) => {
            let len = len as usize;
            if len > max {
                Err(FrameError::TooLarge { len, max })
            } else {
                Ok(Some((len, prefix)))
            }
        }
    }
}

/// Encodes `value` as a frame into `buf`, returning the frame (prefix included).
pub fn encode_frame<'b, T: Serialize>(
    value: &T,
    buf: &'b mut [u8],
) -> Result<&'b [u8], FrameError> {
    if buf.len() < varint::MAX_LEN {
        return Err(FrameError::BufferTooSmall);
    }
    let body_len = postcard::to_slice(value, &mut buf[varint::MAX_LEN..])
        .map_err(|_| FrameError::BufferTooSmall)?
        .len();
    let len = u32::try_from(body_len).map_err(|_| FrameError::BufferTooSmall)?;
    let mut prefix = [0u8; varint::MAX_LEN];
    let prefix = varint::encode(len, &mut prefix);
    let start = varint::MAX_LEN - prefix.len();
    buf[start..varint::MAX_LEN].copy_from_slice(prefix);
    Ok(&buf[start..varint::MAX_LEN + body_len])
}

/// Encodes `value` as a frame appended to `out`.
#[cfg(feature = "alloc")]
pub fn encode_frame_vec<T: Serialize>(value: &T, out: &mut alloc::vec::Vec<u8>) {
    /// Appends to a borrowed Vec (postcard's `to_extend` takes its writer by value).
    struct Append<'a>(&'a mut alloc::vec::Vec<u8>);
    impl Extend<u8> for Append<'_> {
        fn extend<I: IntoIterator<Item = u8>>(&mut self, bytes: I) {
            self.0.extend(bytes);
        }
    }
    // Serialised in place after room for a one-byte prefix (heads are small), then prefixed;
    // a longer prefix moves the frame. postcard cannot fail writing into a Vec for the types of
    // this crate, which have no maps of unknown length; should it, the frame is empty.
    let start = out.len();
    out.push(0);
    if postcard::to_extend(value, Append(out)).is_err() {
        out.truncate(start + 1);
    }
    let len = u32::try_from(out.len() - start - 1).unwrap_or(u32::MAX);
    let mut prefix = [0u8; varint::MAX_LEN];
    let prefix = varint::encode(len, &mut prefix);
    match prefix {
        [one] => out[start] = *one,
        _ => drop(out.splice(start..=start, prefix.iter().copied())),
    }
}

/// Appends the length prefix of a body of `len` bytes to `out`.
#[cfg(feature = "alloc")]
#[inline]
pub fn encode_body_prefix(len: usize, out: &mut alloc::vec::Vec<u8>) {
    let mut prefix = [0u8; varint::MAX_LEN];
    // Bodies are bounded far below 4 GiB by every configuration.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(varint::encode(len, &mut prefix));
}

/// Decodes a head from the bytes of one frame (prefix already removed). Trailing bytes are an
/// error: a frame holds exactly one head.
pub fn decode_head<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(bytes) {
        Ok((value, [])) => Ok(value),
        _ => Err(FrameError::Malformed),
    }
}

/// Decodes a value that a newer peer may have extended with fields at its end (a
/// [`Hello`](crate::Hello), a control message): bytes after the fields this version knows are ignored.
/// Use it only for types whose added fields are safe to ignore; call heads are decoded strictly
/// with [`decode_head`], and a peer speaks an older peer's protocol version to it.
pub fn decode_extensible<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    postcard::take_from_bytes(bytes)
        .map(|(value, _)| value)
        .map_err(|_| FrameError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Hello, RequestHead, ResponseHead, Role, Status, TraceContext};

    fn roundtrip_frame<'b, T: Serialize>(value: &T, buf: &'b mut [u8]) -> &'b [u8] {
        encode_frame(value, buf).expect("encode")
    }

    #[test]
    fn varint_edges() {
        let mut out = [0u8; varint::MAX_LEN];
        assert_eq!(varint::encode(0, &mut out), &[0x00]);
        assert_eq!(varint::encode(127, &mut out), &[0x7f]);
        assert_eq!(varint::encode(128, &mut out), &[0x80, 0x01]);
        assert_eq!(
            varint::encode(u32::MAX, &mut out),
            &[0xff, 0xff, 0xff, 0xff, 0x0f]
        );
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            (1 << 21) - 1,
            1 << 21,
            u32::MAX,
        ] {
            assert_eq!(
                varint::len(value),
                varint::encode(value, &mut out).len(),
                "{value}"
            );
        }
        assert_eq!(varint::decode(&[0x80, 0x01]), Ok(Some((128, 2))));
        assert_eq!(varint::decode(&[0x80]), Ok(None));
        assert_eq!(varint::decode(&[]), Ok(None));
        assert_eq!(
            varint::decode(&[0xff, 0xff, 0xff, 0xff, 0x0f]),
            Ok(Some((u32::MAX, 5)))
        );
        assert_eq!(
            varint::decode(&[0xff, 0xff, 0xff, 0xff, 0x10]),
            Err(FrameError::BadLength)
        );
        assert_eq!(
            varint::decode(&[0xff, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::BadLength)
        );
    }

    #[test]
    fn frame_len_enforces_bound() {
        assert_eq!(frame_len(&[0x05, 1, 2], 8), Ok(Some((5, 1))));
        assert_eq!(
            frame_len(&[0x80, 0x01], 100),
            Err(FrameError::TooLarge { len: 128, max: 100 })
        );
    }

    /// The Vec encoder writes the same frame as the slice encoder, after what `out` held: for a
    /// one-byte length prefix and for a longer one (the frame moves).
    #[cfg(feature = "alloc")]
    #[test]
    fn vec_frames_match_slice_frames() {
        for message in [
            "",
            "short",
            &"x".repeat(126),
            &"y".repeat(127),
            &"z".repeat(300),
        ] {
            let head = ResponseHead::new(Status::Ok, message);
            let mut buf = [0u8; 512];
            let want = roundtrip_frame(&head, &mut buf);
            let mut out = std::vec![7u8, 8];
            encode_frame_vec(&head, &mut out);
            assert_eq!(&out[..2], &[7, 8], "{message:?}");
            assert_eq!(&out[2..], want, "{message:?}");
        }
    }

    // Golden bytes: these are the wire. A change here is a protocol change.

    #[test]
    fn golden_request_head() {
        let mut head = RequestHead::new("echo", "say", 1000);
        head.trace = Some(TraceContext {
            trace_id: [1; 16],
            span_id: [2; 8],
            flags: 1,
        });
        head.metadata.push(("k", "v")).expect("room");
        let mut buf = [0u8; 128];
        let frame = roundtrip_frame(&head, &mut buf);
        let mut expected = std::vec::Vec::new();
        expected.extend_from_slice(&[42]); // frame length
        expected.extend_from_slice(&[4, b'e', b'c', b'h', b'o']);
        expected.extend_from_slice(&[3, b's', b'a', b'y']);
        expected.extend_from_slice(&[0xe8, 0x07]); // 1000
        expected.push(1); // Some
        expected.extend_from_slice(&[1; 16]);
        expected.extend_from_slice(&[2; 8]);
        expected.push(1); // flags
        expected.extend_from_slice(&[1, 1, b'k', 1, b'v']); // one metadata pair
        assert_eq!(frame, expected.as_slice());
        let back: RequestHead = decode_head(&frame[1..]).expect("decode");
        assert_eq!(back, head);
    }

    #[test]
    fn golden_request_head_minimal() {
        let head = RequestHead::new("a", "b", 0);
        let mut buf = [0u8; 32];
        assert_eq!(
            roundtrip_frame(&head, &mut buf),
            &[7, 1, b'a', 1, b'b', 0, 0, 0]
        );
    }

    #[test]
    fn golden_response_head() {
        let head = ResponseHead::new(Status::Ok, "");
        let mut buf = [0u8; 32];
        assert_eq!(roundtrip_frame(&head, &mut buf), &[3, 0, 0, 0]);

        let head = ResponseHead::new(Status::Upstream(503), "no");
        let frame = roundtrip_frame(&head, &mut buf);
        assert_eq!(frame, &[7, 8, 0xf7, 0x03, 2, b'n', b'o', 0]);
        let back: ResponseHead = decode_head(&frame[1..]).expect("decode");
        assert_eq!(back, head);
    }

    #[test]
    fn golden_status_discriminants() {
        // Each status is its variant index: the order is the wire.
        for (i, status) in crate::types::UNIT_STATUSES.iter().enumerate() {
            let mut buf = [0u8; 4];
            let bytes = postcard::to_slice(status, &mut buf).expect("encode");
            assert_eq!(bytes, &[i as u8], "{status:?}");
        }
    }

    #[test]
    fn a_hello_from_a_newer_peer_with_fields_we_do_not_know_still_decodes() {
        let hello = Hello {
            protocol_version: 9,
            name: "b",
            role: Role::Node,
            labels: Default::default(),
            services: Default::default(),
        };
        let mut buf = [0u8; 64];
        let len = postcard::to_slice(&hello, &mut buf).expect("encode").len();
        buf[len..len + 4].copy_from_slice(&[0x03, 0x01, 0x02, 0x03]);
        let bytes = &buf[..len + 4];
        assert_eq!(decode_head::<Hello>(bytes), Err(FrameError::Malformed));
        assert_eq!(decode_extensible::<Hello>(bytes), Ok(hello));
        assert_eq!(
            decode_extensible::<Hello>(&bytes[..3]),
            Err(FrameError::Malformed)
        );
    }

    #[test]
    fn golden_hello() {
        let mut hello = Hello {
            protocol_version: 1,
            name: "n1",
            role: Role::Gateway,
            labels: Default::default(),
            services: Default::default(),
        };
        hello.labels.push(("zone", "a")).expect("room");
        hello.services.push("echo").expect("room");
        let mut buf = [0u8; 64];
        let frame = roundtrip_frame(&hello, &mut buf);
        assert_eq!(
            frame,
            &[
                19, // frame length
                1,  // protocol version
                2, b'n', b'1', // name
                1,    // Role::Gateway
                1, 4, b'z', b'o', b'n', b'e', 1, b'a', // labels
                1, 4, b'e', b'c', b'h', b'o', // services
            ]
        );
        let back: Hello = decode_head(&frame[1..]).expect("decode");
        assert_eq!(back, hello);
    }

    #[test]
    fn decode_refuses_trailing_bytes_and_truncation() {
        let head = RequestHead::new("echo", "say", 5);
        let mut buf = [0u8; 32];
        let frame = roundtrip_frame(&head, &mut buf);
        let body = &frame[1..];
        assert!(decode_head::<RequestHead>(&body[..body.len() - 1]).is_err());
        let mut longer = std::vec::Vec::from(body);
        longer.push(0);
        assert_eq!(
            decode_head::<RequestHead>(&longer),
            Err(FrameError::Malformed)
        );
    }

    #[test]
    fn decode_refuses_too_much_metadata() {
        // 17 metadata entries: one past the bound, refused by the type itself.
        let mut bytes = std::vec![1, b'a', 1, b'b', 0, 0, 17];
        for _ in 0..17 {
            bytes.extend_from_slice(&[1, b'k', 1, b'v']);
        }
        assert_eq!(
            decode_head::<RequestHead>(&bytes),
            Err(FrameError::Malformed)
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        // A deterministic xorshift stream: the stable-toolchain twin of the fuzz targets.
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = [0u8; 256];
        for round in 0..20_000 {
            for b in buf.iter_mut() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *b = state as u8;
            }
            let len = round % buf.len();
            let _ = decode_head::<RequestHead>(&buf[..len]);
            let _ = decode_head::<ResponseHead>(&buf[..len]);
            let _ = decode_head::<Hello>(&buf[..len]);
            let _ = frame_len(&buf[..len], 1024);
        }
    }
}
