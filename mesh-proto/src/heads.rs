//! Call heads on a call's path: decoded into views that borrow their metadata from the frame, and
//! (with `alloc`) encoded straight into a frame sized once.
//!
//! [`RequestHead`](crate::RequestHead) and [`ResponseHead`](crate::ResponseHead) keep room for
//! every metadata entry inline (16 pairs of `&str`: 512 bytes on a 64-bit target), which each
//! decode fills and each move copies, and serde's writer into a `Vec` appends byte by byte. The bytes here are postcard's, exactly: the serde forms in `types` stay the definition
//! of the wire, and the tests (and the fuzz targets) hold the two to each other.

use crate::limits::MAX_METADATA;
use crate::{FrameError, Status, TraceContext};

/// The bytes of a head not yet read. Every read checks what postcard checks, so a view accepts
/// exactly the bytes serde would.
#[derive(Clone)]
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    #[inline(always)]
    fn byte(&mut self) -> Result<u8, FrameError> {
        let (&first, rest) = self.0.split_first().ok_or(FrameError::Malformed)?;
        self.0 = rest;
        Ok(first)
    }

    #[inline(always)]
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        let (taken, rest) = self.0.split_first_chunk().ok_or(FrameError::Malformed)?;
        self.0 = rest;
        Ok(*taken)
    }

    /// A varint of at most `BITS` bits, as postcard reads one: at most `ceil(BITS / 7)` bytes,
    /// the last of them with no bits past `BITS`.
    #[inline(always)]
    fn varint<const BITS: u32>(&mut self) -> Result<u64, FrameError> {
        let max_bytes = BITS.div_ceil(7);
        let last_max = (1u8 << (BITS % 7)) - 1;
        let mut value = 0u64;
        for i in 0..max_bytes {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i == max_bytes - 1 && byte > last_max {
                    return Err(FrameError::Malformed);
                }
                return Ok(value);
            }
        }
        Err(FrameError::Malformed)
    }

    /// A length: a `usize` varint, as long as the platform's `usize` needs.
    #[inline(always)]
    fn len(&mut self) -> Result<usize, FrameError> {
        // No wider than usize::BITS, so it fits.
        usize::try_from(self.varint::<{ usize::BITS }>()?).map_err(|_| FrameError::Malformed)
    }

    /// A length, then that many bytes.
    #[inline(always)]
    fn sized(&mut self) -> Result<&'a [u8], FrameError> {
        let len = self.len()?;
        if len > self.0.len() {
            return Err(FrameError::Malformed);
        }
        let (taken, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(taken)
    }

    #[inline(always)]
    fn str(&mut self) -> Result<&'a str, FrameError> {
        core::str::from_utf8(self.sized()?).map_err(|_| FrameError::Malformed)
    }

    #[inline(always)]
    fn u32(&mut self) -> Result<u32, FrameError> {
        // At most 32 bits, so it fits.
        u32::try_from(self.varint::<32>()?).map_err(|_| FrameError::Malformed)
    }

    #[inline(always)]
    fn trace(&mut self) -> Result<Option<TraceContext>, FrameError> {
        match self.byte()? {
            0 => Ok(None),
            1 => Ok(Some(TraceContext {
                trace_id: self.bytes()?,
                span_id: self.bytes()?,
                flags: self.byte()?,
            })),
            _ => Err(FrameError::Malformed),
        }
    }
}

/// A head's metadata as it arrived: checked once (at most [`MAX_METADATA`] entries, each a key
/// and a value in UTF-8, nothing after them) and read from the frame on each walk, never copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetadataView<'a> {
    /// The entries' bytes, after their count.
    entries: &'a [u8],
    /// How many entries.
    len: usize,
}

impl<'a> MetadataView<'a> {
    /// Checks the metadata list that ends a head: `input` must hold it and nothing else.
    #[inline]
    fn parse(mut input: Input<'a>) -> Result<Self, FrameError> {
        let len = input.len()?;
        if len > MAX_METADATA {
            return Err(FrameError::Malformed);
        }
        let entries = input.0;
        for _ in 0..2 * len {
            input.str()?;
        }
        if !input.0.is_empty() {
            return Err(FrameError::Malformed);
        }
        Ok(MetadataView { entries, len })
    }

    /// How many entries.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The entries, in wire order: `(key, value)`.
    #[inline]
    pub fn iter(&self) -> MetadataIter<'a> {
        MetadataIter(self.raw())
    }

    /// The entries as bytes (their UTF-8 was checked when the view was made).
    #[inline]
    fn raw(&self) -> RawEntries<'a> {
        RawEntries {
            input: Input(self.entries),
            left: self.len,
        }
    }

    /// The value of the first entry named `key`.
    #[inline]
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let (_, value) = self.raw().find(|(k, _)| *k == key.as_bytes())?;
        core::str::from_utf8(value).ok()
    }

    /// Whether an entry is named `key`.
    #[inline]
    pub fn contains_key(&self, key: &str) -> bool {
        self.raw().any(|(k, _)| k == key.as_bytes())
    }
}

/// A view's entries as bytes.
#[derive(Clone)]
struct RawEntries<'a> {
    input: Input<'a>,
    left: usize,
}

impl<'a> Iterator for RawEntries<'a> {
    type Item = (&'a [u8], &'a [u8]);

    #[inline]
    fn next(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        if self.left == 0 {
            return None;
        }
        // Checked when the view was made: these cannot fail.
        let key = self.input.sized().ok()?;
        let value = self.input.sized().ok()?;
        self.left -= 1;
        Some((key, value))
    }
}

/// The entries of a [`MetadataView`].
#[derive(Clone)]
pub struct MetadataIter<'a>(RawEntries<'a>);

impl core::fmt::Debug for MetadataIter<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_list().entries(self.clone()).finish()
    }
}

impl<'a> Iterator for MetadataIter<'a> {
    type Item = (&'a str, &'a str);

    #[inline]
    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        let (key, value) = self.0.next()?;
        Some((
            core::str::from_utf8(key).ok()?,
            core::str::from_utf8(value).ok()?,
        ))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.0.left, Some(self.0.left))
    }
}

impl ExactSizeIterator for MetadataIter<'_> {}

/// A [`RequestHead`](crate::RequestHead) decoded from its frame, its metadata left in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestView<'a> {
    /// The service to call.
    pub service: &'a str,
    /// The method of that service.
    pub method: &'a str,
    /// Milliseconds left until the caller gives up; 0 means none was set.
    pub deadline_ms: u32,
    /// The caller's trace context, if it traces.
    pub trace: Option<TraceContext>,
    /// Request metadata.
    pub metadata: MetadataView<'a>,
}

impl<'a> RequestView<'a> {
    /// Decodes the bytes of one frame (prefix removed): exactly what
    /// [`decode_head`](crate::decode_head) accepts as a [`RequestHead`](crate::RequestHead).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, FrameError> {
        let mut input = Input(bytes);
        Ok(RequestView {
            service: input.str()?,
            method: input.str()?,
            deadline_ms: input.u32()?,
            trace: input.trace()?,
            metadata: MetadataView::parse(input)?,
        })
    }
}

/// A [`ResponseHead`](crate::ResponseHead) decoded from its frame, its metadata left in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseView<'a> {
    /// The outcome.
    pub status: Status,
    /// A human-readable reason for a failure; empty on success.
    pub message: &'a str,
    /// Response metadata.
    pub metadata: MetadataView<'a>,
}

impl<'a> ResponseView<'a> {
    /// Decodes the bytes of one frame (prefix removed): exactly what
    /// [`decode_head`](crate::decode_head) accepts as a [`ResponseHead`](crate::ResponseHead).
    pub fn decode(bytes: &'a [u8]) -> Result<Self, FrameError> {
        // The status with serde: its variants' numbers are the enum's to say.
        let (status, rest) =
            postcard::take_from_bytes::<Status>(bytes).map_err(|_| FrameError::Malformed)?;
        let mut input = Input(rest);
        Ok(ResponseView {
            status,
            message: input.str()?,
            metadata: MetadataView::parse(input)?,
        })
    }
}

#[cfg(feature = "alloc")]
pub use encode::{CallHead, encode_call_head};

#[cfg(feature = "alloc")]
mod encode {
    use alloc::vec::Vec;

    use crate::frame::varint;
    use crate::{Metadata, RequestHead, ResponseHead, Status, TraceContext};

    /// The bytes of postcard's varint for `len` (as a `usize`).
    #[inline]
    fn len_size(len: usize) -> usize {
        // 7 bits a byte; 0 takes one.
        (usize::BITS - (len | 1).leading_zeros()).div_ceil(7) as usize
    }

    #[inline]
    fn put_len(out: &mut Vec<u8>, mut len: usize) {
        while len >= 0x80 {
            out.push((len as u8) | 0x80);
            len >>= 7;
        }
        out.push(len as u8);
    }

    #[inline]
    fn str_size(s: &str) -> usize {
        len_size(s.len()) + s.len()
    }

    #[inline]
    fn put_str(out: &mut Vec<u8>, s: &str) {
        put_len(out, s.len());
        out.extend_from_slice(s.as_bytes());
    }

    #[inline]
    fn metadata_size(metadata: &Metadata<'_>) -> usize {
        len_size(metadata.len())
            + metadata
                .iter()
                .map(|(k, v)| str_size(k) + str_size(v))
                .sum::<usize>()
    }

    #[inline]
    fn put_metadata(out: &mut Vec<u8>, metadata: &Metadata<'_>) {
        put_len(out, metadata.len());
        for (k, v) in metadata {
            put_str(out, k);
            put_str(out, v);
        }
    }

    /// A status as postcard writes it (an enum's index, then its value, as varints).
    #[inline]
    fn status_bytes(status: Status) -> ([u8; 8], usize) {
        let mut buf = [0u8; 8];
        // Eight bytes hold the longest: an index under 128 and a u16.
        let len = postcard::to_slice(&status, &mut buf).map_or(0, |b| b.len());
        (buf, len)
    }

    /// A call head that writes its own postcard bytes: the same as serde's, written in one pass
    /// into a buffer sized for them.
    pub trait CallHead<'a> {
        /// The length of the encoded head, without its frame's prefix.
        fn encoded_len(&self) -> usize;
        /// Appends the encoded head (`encoded_len` bytes).
        fn encode_to(&self, out: &mut Vec<u8>);
        /// The head's metadata.
        fn metadata_mut(&mut self) -> &mut Metadata<'a>;
    }

    impl<'a> CallHead<'a> for RequestHead<'a> {
        fn encoded_len(&self) -> usize {
            str_size(self.service)
                + str_size(self.method)
                + varint::len(self.deadline_ms)
                + 1
                + self.trace.map_or(0, |_| 16 + 8 + 1)
                + metadata_size(&self.metadata)
        }

        fn encode_to(&self, out: &mut Vec<u8>) {
            put_str(out, self.service);
            put_str(out, self.method);
            let mut deadline = [0u8; varint::MAX_LEN];
            out.extend_from_slice(varint::encode(self.deadline_ms, &mut deadline));
            match &self.trace {
                None => out.push(0),
                Some(TraceContext {
                    trace_id,
                    span_id,
                    flags,
                }) => {
                    out.push(1);
                    out.extend_from_slice(trace_id);
                    out.extend_from_slice(span_id);
                    out.push(*flags);
                }
            }
            put_metadata(out, &self.metadata);
        }

        fn metadata_mut(&mut self) -> &mut Metadata<'a> {
            &mut self.metadata
        }
    }

    impl<'a> CallHead<'a> for ResponseHead<'a> {
        fn encoded_len(&self) -> usize {
            status_bytes(self.status).1 + str_size(self.message) + metadata_size(&self.metadata)
        }

        fn encode_to(&self, out: &mut Vec<u8>) {
            let (status, len) = status_bytes(self.status);
            out.extend_from_slice(&status[..len]);
            put_str(out, self.message);
            put_metadata(out, &self.metadata);
        }

        fn metadata_mut(&mut self) -> &mut Metadata<'a> {
            &mut self.metadata
        }
    }

    /// Appends `head`, of `len` bytes (its [`CallHead::encoded_len`]), as a frame to `out`,
    /// reserving `room` bytes more for what follows it: the bytes
    /// [`encode_frame_vec`](crate::encode_frame_vec) writes, in one allocation at most.
    pub fn encode_call_head<'a, H: CallHead<'a>>(
        head: &H,
        len: usize,
        out: &mut Vec<u8>,
        room: usize,
    ) {
        // Heads are bounded far below 4 GiB (a head's metadata is at most 16 entries).
        let mut prefix = [0u8; varint::MAX_LEN];
        let prefix = varint::encode(u32::try_from(len).unwrap_or(u32::MAX), &mut prefix);
        out.reserve(prefix.len() + len + room);
        out.extend_from_slice(prefix);
        let start = out.len();
        head.encode_to(out);
        debug_assert_eq!(
            out.len() - start,
            len,
            "encoded_len disagrees with encode_to"
        );
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use alloc::string::String;
    use alloc::vec;
    use alloc::vec::Vec;

    use super::*;
    use crate::{Metadata, RequestHead, ResponseHead, decode_head, encode_frame_vec};

    fn long(n: usize) -> String {
        "k".repeat(n)
    }

    fn traces() -> [Option<TraceContext>; 2] {
        [
            None,
            Some(TraceContext {
                trace_id: [0xab; 16],
                span_id: [0x80; 8],
                flags: 1,
            }),
        ]
    }

    fn statuses() -> Vec<Status> {
        let mut all = crate::types::UNIT_STATUSES.to_vec();
        all.extend([
            Status::Upstream(0),
            Status::Upstream(127),
            Status::Upstream(128),
            Status::Upstream(u16::MAX),
        ]);
        all
    }

    /// Metadata of 0, 1 and 16 entries, with lengths across varint boundaries.
    fn metadata_sets(strings: &[String]) -> Vec<Metadata<'_>> {
        let mut sets = vec![Metadata::new()];
        let mut one = Metadata::new();
        one.push((":keep", "")).expect("room");
        sets.push(one);
        let mut full = Metadata::new();
        for (i, s) in strings
            .iter()
            .cycle()
            .take(crate::limits::MAX_METADATA)
            .enumerate()
        {
            full.push((if i % 2 == 0 { s } else { "x-canary" }, s))
                .expect("room for 16");
        }
        sets.push(full);
        sets
    }

    fn strings() -> Vec<String> {
        [0, 1, 127, 128, 300, 16_383, 16_384]
            .into_iter()
            .map(long)
            .chain([String::from("échos ✓")])
            .collect()
    }

    fn request_heads<'a>(strings: &'a [String], sets: &'a [Metadata<'a>]) -> Vec<RequestHead<'a>> {
        let mut heads = Vec::new();
        for s in strings {
            for deadline_ms in [0, 1, 127, 128, 16_384, u32::MAX] {
                for trace in traces() {
                    for metadata in sets {
                        heads.push(RequestHead {
                            service: s,
                            method: "say",
                            deadline_ms,
                            trace,
                            metadata: metadata.clone(),
                        });
                    }
                }
            }
            heads.push(RequestHead::new("echo", s, 5));
        }
        heads
    }

    fn response_heads<'a>(
        strings: &'a [String],
        sets: &'a [Metadata<'a>],
    ) -> Vec<ResponseHead<'a>> {
        let mut heads = Vec::new();
        for status in statuses() {
            for s in strings {
                for metadata in sets {
                    heads.push(ResponseHead {
                        status,
                        message: s,
                        metadata: metadata.clone(),
                    });
                }
            }
        }
        heads
    }

    /// The frame's payload (prefix removed).
    fn payload(frame: &[u8]) -> &[u8] {
        let (len, prefix) = crate::frame_len(frame, usize::MAX)
            .expect("own frame")
            .expect("whole");
        assert_eq!(prefix + len, frame.len());
        &frame[prefix..]
    }

    #[test]
    fn call_heads_encode_to_the_bytes_serde_writes() {
        let strings = strings();
        let sets = metadata_sets(&strings);
        for head in request_heads(&strings, &sets) {
            let (mut ours, mut serde) = (vec![7], vec![7]);
            encode_call_head(&head, head.encoded_len(), &mut ours, 0);
            encode_frame_vec(&head, &mut serde);
            assert_eq!(ours, serde, "{head:?}");
        }
        for head in response_heads(&strings, &sets) {
            let (mut ours, mut serde) = (Vec::new(), Vec::new());
            encode_call_head(&head, head.encoded_len(), &mut ours, 0);
            encode_frame_vec(&head, &mut serde);
            assert_eq!(ours, serde, "{head:?}");
        }
    }

    fn same_request(bytes: &[u8]) {
        let view = RequestView::decode(bytes);
        let head = decode_head::<RequestHead>(bytes);
        match (view, head) {
            (Ok(view), Ok(head)) => {
                assert_eq!(
                    (view.service, view.method, view.deadline_ms, view.trace),
                    (head.service, head.method, head.deadline_ms, head.trace)
                );
                assert!(view.metadata.iter().eq(head.metadata.iter().copied()));
                assert_eq!(view.metadata.len(), head.metadata.len());
            }
            (Err(_), Err(_)) => {}
            (view, head) => panic!("view {view:?} but serde {head:?} for {bytes:?}"),
        }
    }

    fn same_response(bytes: &[u8]) {
        let view = ResponseView::decode(bytes);
        let head = decode_head::<ResponseHead>(bytes);
        match (view, head) {
            (Ok(view), Ok(head)) => {
                assert_eq!((view.status, view.message), (head.status, head.message));
                assert!(view.metadata.iter().eq(head.metadata.iter().copied()));
            }
            (Err(_), Err(_)) => {}
            (view, head) => panic!("view {view:?} but serde {head:?} for {bytes:?}"),
        }
    }

    /// Every prefix of `bytes`, and `bytes` with one byte changed to each of a few values or one
    /// byte added.
    fn variants(bytes: &[u8], mut check: impl FnMut(&[u8])) {
        check(bytes);
        for end in 0..bytes.len() {
            check(&bytes[..end]);
        }
        let mut changed = bytes.to_vec();
        for i in 0..bytes.len() {
            for value in [0x00, 0x01, 0x02, 0x0f, 0x10, 0x11, 0x7f, 0x80, 0xc3, 0xff] {
                changed[i] = value;
                check(&changed);
            }
            changed[i] = bytes[i];
        }
        for extra in [0x00, 0x80] {
            let mut longer = bytes.to_vec();
            longer.push(extra);
            check(&longer);
        }
    }

    #[test]
    fn views_accept_and_refuse_exactly_what_serde_does() {
        let strings: Vec<String> = [0, 1, 128].into_iter().map(long).collect();
        // Every byte of each head is changed ten ways: short entries keep it quick.
        let sets = metadata_sets(&strings[..2]);
        for head in request_heads(&strings, &sets) {
            let mut frame = Vec::new();
            encode_frame_vec(&head, &mut frame);
            variants(payload(&frame), same_request);
        }
        for head in response_heads(&strings, &sets) {
            let mut frame = Vec::new();
            encode_frame_vec(&head, &mut frame);
            variants(payload(&frame), same_response);
        }
    }

    #[test]
    fn metadata_past_its_bound_or_in_overlong_varints_is_refused_as_serde_does() {
        // A head of `count` empty entries, the count written as given.
        let with_count = |count: &[u8], entries: usize| {
            let mut bytes = vec![4, b'e', b'c', b'h', b'o', 3, b's', b'a', b'y', 5, 0];
            bytes.extend_from_slice(count);
            bytes.extend(core::iter::repeat_n(0u8, 2 * entries));
            bytes
        };
        for (count, entries) in [
            (&[16u8][..], 16),
            (&[17][..], 17),
            (&[0x90, 0x00][..], 16),
            (
                &[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00][..],
                1,
            ),
            (
                &[0x81, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x02][..],
                1,
            ),
            (&[0x81, 0x80, 0x80, 0x80, 0x10][..], 1),
            (&[0xff; 11][..], 1),
        ] {
            same_request(&with_count(count, entries));
        }
        assert_eq!(
            RequestView::decode(&with_count(&[16], 16))
                .expect("16 entries decode")
                .metadata
                .len(),
            16
        );
        assert!(RequestView::decode(&with_count(&[17], 17)).is_err());
    }

    /// The varint reader on the host reads as postcard does on targets of either width: a
    /// `usize` is a `u32` on the 32-bit devices (at most 5 bytes, the last under 0x10) and a `u64`
    /// here (at most 10 bytes, the last under 0x02).
    #[test]
    fn varints_of_32_and_64_bits_are_read_as_postcard_reads_them() {
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for len in 1..=11 {
            for last in [0x00, 0x01, 0x02, 0x0f, 0x10, 0x7f, 0x80] {
                let mut bytes = vec![0xff; len - 1];
                bytes.push(last);
                inputs.push(bytes.clone());
                bytes[0] = 0x80;
                inputs.push(bytes);
            }
        }
        for bytes in &inputs {
            let ours = Input(bytes).varint::<32>().ok();
            let theirs = postcard::take_from_bytes::<u32>(bytes).ok();
            assert_eq!(ours, theirs.map(|(v, _)| u64::from(v)), "{bytes:x?}");
            let ours = Input(bytes).varint::<64>().ok();
            let theirs = postcard::take_from_bytes::<u64>(bytes).ok();
            assert_eq!(ours, theirs.map(|(v, _)| v), "{bytes:x?}");
        }
    }

    #[test]
    fn a_view_finds_entries_by_key() {
        let mut head = ResponseHead::new(Status::Ok, "");
        head.metadata.push(("leaf", "n1")).expect("room");
        head.metadata.push((":keep", "")).expect("room");
        head.metadata.push(("leaf", "n2")).expect("room");
        let mut frame = Vec::new();
        encode_call_head(&head, head.encoded_len(), &mut frame, 0);
        let view = ResponseView::decode(payload(&frame)).expect("decodes");
        assert_eq!(view.metadata.get("leaf"), Some("n1"));
        assert!(view.metadata.contains_key(":keep"));
        assert!(!view.metadata.contains_key("keep"));
        assert_eq!(view.metadata.iter().len(), 3);
    }
}
