//! Frames on QUIC streams: read them with bounds, write them in one go.
//!
//! A call stream carries a head frame, then the body. A unary body is one frame, then the end of
//! the stream (anything after it is refused); a streamed body (protocol 2, flagged in the head's
//! metadata) is any number of frames of at most [`MAX_CHUNK_BYTES`] until the stream ends.
//! Reading never copies a frame more than once: a frame that arrives in one QUIC chunk is handed on
//! as it came, and one that spans chunks is gathered into a buffer of its announced length.

use bytes::{Bytes, BytesMut};
use mesh_proto::heads::{CallHead, encode_call_head};
use mesh_proto::{FrameError, encode_body_prefix, encode_frame_vec, frame_len};
use serde::Serialize;

/// Largest frame of a streamed body.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// Why a frame could not be read from a stream.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes broke the framing rules or a bound.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The stream ended inside a frame.
    #[error("truncated frame: the stream ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes announced (or at least needed).
        want: usize,
    },
    /// The stream failed (reset, connection lost).
    #[error("stream failed: {0}")]
    Stream(#[from] quinn::ReadError),
    /// Bytes followed the last frame.
    #[error("{0} unexpected bytes after the last frame")]
    Trailing(usize),
    /// A body's frames together exceed the bound.
    #[error("body exceeds the bound of {max} bytes")]
    BodyTooLarge {
        /// The bound.
        max: usize,
    },
}

/// Reads length-prefixed frames from a receive stream, never buffering more than the frame it
/// needs (plus what one QUIC chunk brings).
pub struct FrameReader {
    recv: quinn::RecvStream,
    /// Received and not yet consumed, as QUIC handed it over.
    buf: Bytes,
    /// A frame that spans chunks, gathered so far, and its announced length. Kept here rather
    /// than in a local so that a read cancelled mid-frame (a `select!` on a control stream) resumes
    /// where it stopped.
    partial: Option<(BytesMut, usize)>,
}

impl FrameReader {
    /// A reader over `recv`.
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: Bytes::new(),
            partial: None,
        }
    }

    /// Reads the next frame, refusing one longer than `max` before reading it.
    pub async fn frame(&mut self, max: usize) -> Result<Bytes, ReadError> {
        self.next_frame(max)
            .await?
            .ok_or(ReadError::Truncated { got: 0, want: 1 })
    }

    /// Reads the next frame, or `None` if the stream ended cleanly before one began. Safe to
    /// cancel: a frame half read is resumed by the next call.
    pub async fn next_frame(&mut self, max: usize) -> Result<Option<Bytes>, ReadError> {
        loop {
            if let Some((out, len)) = &mut self.partial {
                if out.len() >= *len {
                    let (out, _) = self.partial.take().unwrap_or_default();
                    return Ok(Some(out.freeze()));
                }
                // Read no further than the frame's end; memory grows with what arrives, not with
                // what the peer announced.
                match self.recv.read_chunk(*len - out.len(), true).await? {
                    Some(chunk) => out.extend_from_slice(&chunk.bytes),
                    None => {
                        return Err(ReadError::Truncated {
                            got: out.len(),
                            want: *len,
                        });
                    }
                }
                continue;
            }
            if let Some((len, prefix)) = frame_len(&self.buf, max)? {
                if self.buf.len() >= prefix + len {
                    let _ = self.buf.split_to(prefix);
                    return Ok(Some(self.buf.split_to(len)));
                }
                // The frame spans chunks: gather it, starting small.
                let mut out = BytesMut::with_capacity(len.min(64 * 1024));
                out.extend_from_slice(&self.buf[prefix..]);
                self.buf = Bytes::new();
                self.partial = Some((out, len));
                continue;
            }
            if !self.read_more().await? {
                return Ok(None);
            }
        }
    }

    /// The length the next frame announces (refused past `max`), without taking the frame:
    /// what a caller reserves memory for before reading it. `None` if the stream ended cleanly
    /// before a frame began. Between frames only.
    pub async fn next_len(&mut self, max: usize) -> Result<Option<usize>, ReadError> {
        debug_assert!(self.partial.is_none(), "next_len inside a frame");
        loop {
            if let Some((len, _)) = frame_len(&self.buf, max)? {
                return Ok(Some(len));
            }
            if !self.read_more().await? {
                return Ok(None);
            }
        }
    }

    /// Too few bytes for a length prefix (at most five): joins the next chunk to them. False if
    /// the stream ended cleanly with nothing left.
    async fn read_more(&mut self) -> Result<bool, ReadError> {
        match self.recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) if self.buf.is_empty() => self.buf = chunk.bytes,
            Some(chunk) => {
                let mut joined = BytesMut::with_capacity(self.buf.len() + chunk.bytes.len());
                joined.extend_from_slice(&self.buf);
                joined.extend_from_slice(&chunk.bytes);
                self.buf = joined.freeze();
            }
            None if self.buf.is_empty() => return Ok(false),
            None => {
                return Err(ReadError::Truncated {
                    got: self.buf.len(),
                    want: self.buf.len() + 1,
                });
            }
        }
        Ok(true)
    }

    /// Waits until the stream has more bytes: true then, false if it ended cleanly. Between
    /// frames: what a kept call stream waits on for its next call.
    pub async fn more(&mut self) -> Result<bool, ReadError> {
        if self.has_buffered() {
            return Ok(true);
        }
        self.read_more().await
    }

    /// Reads a unary body: one frame of at most `max` bytes, then the end of the stream.
    pub async fn unary_body(&mut self, max: usize) -> Result<Bytes, ReadError> {
        let body = self.frame(max).await?;
        self.end().await?;
        Ok(body)
    }

    /// Reads the end of the stream: nothing may follow the last frame. Reading to the end (rather
    /// than dropping the stream early) also spares a STOP_SENDING frame per call.
    pub async fn end(&mut self) -> Result<(), ReadError> {
        loop {
            if !self.buf.is_empty() {
                return Err(ReadError::Trailing(self.buf.len()));
            }
            match self.recv.read_chunk(usize::MAX, true).await? {
                None => return Ok(()),
                Some(chunk) => self.buf = chunk.bytes,
            }
        }
    }

    /// Asks the peer to send no more on this stream (what it sent is dropped, and its flow
    /// control credit given back).
    pub fn stop(&mut self) {
        let _ = self.recv.stop(0u32.into());
    }

    /// Asks the peer to send no more on this stream, with `code`.
    pub fn stop_with(&mut self, code: u32) {
        let _ = self.recv.stop(code.into());
    }

    /// Whether bytes past the last whole frame are buffered (or a frame is half read).
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty() || self.partial.is_some()
    }

    /// Gives back the stream, e.g. to stop it.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }

    /// Gives back the stream and the bytes already read past the last whole frame: after a
    /// tunnel's heads, the stream's raw bytes start with those. Called between frames (after
    /// [`FrameReader::frame`] returned), never inside one.
    pub fn into_raw(self) -> (quinn::RecvStream, Bytes) {
        debug_assert!(self.partial.is_none(), "into_raw inside a frame");
        (self.recv, self.buf)
    }
}

/// Encodes `head` and `body` as two frames and writes them, then ends the stream.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    head: &T,
    body: Bytes,
) -> Result<(), quinn::WriteError> {
    write_encoded(send, Framed::encode(head, body)).await
}

/// `head` encoded as one frame.
pub fn encode_head<T: Serialize>(head: &T) -> Vec<u8> {
    encode_head_with_room(head, 0)
}

/// `head` encoded as one frame, in a buffer with `room` bytes to spare after a head of a usual
/// size (for the body that [`Framed`] appends).
fn encode_head_with_room<T: Serialize>(head: &T, room: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + room);
    encode_frame_vec(head, &mut out);
    out
}

/// Bodies up to this size share their head's buffer: one write of one buffer.
const SMALL_BODY: usize = 1024;

/// A head frame and a body frame, encoded and ready to write, and to write again: clones share
/// the bytes (a call sent again on another stream writes the same frames). A small body goes in
/// the head's buffer; quinn takes the buffers as they are, without copying them.
#[derive(Clone, Debug)]
pub struct Framed {
    /// The head frame, the body's prefix, and a small body.
    first: Bytes,
    /// A body that is not small; empty otherwise.
    body: Bytes,
}

impl Framed {
    /// Frames `body` after `head` (a head frame from [`encode_head`] or
    /// [`encode_call_head`]).
    pub fn new(mut head: Vec<u8>, body: Bytes) -> Framed {
        head.reserve(Self::room(&body));
        encode_body_prefix(body.len(), &mut head);
        let body = if body.len() <= SMALL_BODY {
            head.extend_from_slice(&body);
            Bytes::new()
        } else {
            body
        };
        Framed {
            first: head.into(),
            body,
        }
    }

    /// `head` encoded and framed with `body`, in one buffer sized for both.
    fn encode<T: Serialize>(head: &T, body: Bytes) -> Framed {
        Framed::new(encode_head_with_room(head, Self::room(&body)), body)
    }

    /// The room to leave after a head for the frames of `body`: exactly what they take. A call
    /// head's buffer ([`encode_head_keeping`]) is then full, and becomes `Bytes` as it is: one
    /// with room to spare costs `Bytes` an allocation of its own. A reply, written once, needs
    /// none; a call, whose frames are kept to be sent again, pays it once, when they are cloned.
    fn room(body: &Bytes) -> usize {
        let prefix = mesh_proto::varint::len(u32::try_from(body.len()).unwrap_or(u32::MAX));
        prefix
            + if body.len() <= SMALL_BODY {
                body.len()
            } else {
                0
            }
    }

    /// Writes both frames, and leaves the stream open. The frames are given to quinn as they
    /// are: a caller that may send them again writes a clone (whose first copy of a buffer
    /// costs `Bytes` an allocation; a reply, written once, spares it).
    pub async fn write(self, send: &mut quinn::SendStream) -> Result<(), quinn::WriteError> {
        if self.body.is_empty() {
            send.write_chunk(self.first).await
        } else {
            send.write_all_chunks(&mut [self.first, self.body]).await
        }
    }
}

/// `head` encoded as one frame, asking to keep its stream for the next call when `keep`
/// ([`mesh_proto::KEEP_METADATA`] added to its metadata): not when its metadata is full, nor at
/// the cost of a head longer than the bound, which the other side would refuse. Returns the head
/// and `body` framed, and whether it asks.
pub fn encode_head_keeping<'a, T: CallHead<'a>>(
    head: &mut T,
    keep: bool,
    body: Bytes,
) -> (Framed, bool) {
    let mut keep = keep
        && head
            .metadata_mut()
            .push((mesh_proto::KEEP_METADATA, ""))
            .is_ok();
    let mut len = head.encoded_len();
    // The frame, prefix included, within the bound the other side reads heads with.
    let prefix = mesh_proto::varint::len(u32::try_from(len).unwrap_or(u32::MAX));
    if keep && len + prefix > mesh_proto::limits::MAX_HEAD_BYTES {
        head.metadata_mut().pop();
        keep = false;
        len = head.encoded_len();
    }
    let mut first = Vec::new();
    encode_call_head(head, len, &mut first, Framed::room(&body));
    (Framed::new(first, body), keep)
}

/// Writes framed head and body, then ends the stream.
pub async fn write_encoded(
    send: &mut quinn::SendStream,
    framed: Framed,
) -> Result<(), quinn::WriteError> {
    framed.write(send).await?;
    // The stream may already be reset by the peer; nothing more to do then.
    let _ = send.finish();
    Ok(())
}

/// Writes a head frame and leaves the stream open for body chunks.
pub async fn write_head<T: Serialize>(
    send: &mut quinn::SendStream,
    head: &T,
) -> Result<(), quinn::WriteError> {
    send.write_all(&encode_head(head)).await
}

/// Writes one body chunk as a frame (split into frames of at most [`MAX_CHUNK_BYTES`]).
pub async fn write_chunk(
    send: &mut quinn::SendStream,
    mut chunk: Bytes,
) -> Result<(), quinn::WriteError> {
    while !chunk.is_empty() {
        let part = chunk.split_to(chunk.len().min(MAX_CHUNK_BYTES));
        let mut prefix = Vec::with_capacity(5);
        encode_body_prefix(part.len(), &mut prefix);
        send.write_all_chunks(&mut [Bytes::from(prefix), part])
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The room left after a head is exactly what the body's frames take: a buffer with room to
    /// spare would cost `Bytes` an allocation of its own when it takes the buffer.
    #[test]
    fn the_room_after_a_head_is_what_the_body_takes() {
        for n in [0, 1, 127, 128, SMALL_BODY, SMALL_BODY + 1, 20_000] {
            let body = Bytes::from(vec![7u8; n]);
            let mut frames = Vec::new();
            mesh_proto::encode_body_prefix(n, &mut frames);
            if n <= SMALL_BODY {
                frames.extend_from_slice(&body);
            }
            assert_eq!(Framed::room(&body), frames.len(), "a body of {n} bytes");
            let framed = Framed::new(b"head".to_vec(), body.clone());
            let mut written = framed.first.to_vec();
            written.extend_from_slice(&framed.body);
            let mut expected = b"head".to_vec();
            mesh_proto::encode_body_prefix(n, &mut expected);
            expected.extend_from_slice(&body);
            assert_eq!(written, expected, "a body of {n} bytes");
        }
    }
}
