//! Frames on QUIC streams: read them with bounds, write them in one go.

use bytes::{Bytes, BytesMut};
use mesh_proto::{FrameError, ResponseHead, encode_body_prefix, encode_frame_vec, frame_len};
use serde::Serialize;

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
}

/// Reads length-prefixed frames from a receive stream, never buffering more than the frame it
/// needs (plus what one QUIC chunk brings).
pub struct FrameReader {
    recv: quinn::RecvStream,
    /// Received and not yet consumed. A chunk is kept as QUIC handed it over (no copy); bytes are
    /// copied only when a frame spans chunks.
    buf: Bytes,
}

impl FrameReader {
    /// A reader over `recv`.
    pub fn new(recv: quinn::RecvStream) -> Self {
        FrameReader {
            recv,
            buf: Bytes::new(),
        }
    }

    /// Reads the next frame, refusing one longer than `max` before reading it.
    pub async fn frame(&mut self, max: usize) -> Result<Bytes, ReadError> {
        loop {
            if let Some((len, prefix)) = frame_len(&self.buf, max)? {
                if self.buf.len() >= prefix + len {
                    let _ = self.buf.split_to(prefix);
                    return Ok(self.buf.split_to(len));
                }
                self.fill(prefix + len).await?;
            } else {
                self.fill(self.buf.len() + 1).await?;
            }
        }
    }

    async fn fill(&mut self, want: usize) -> Result<(), ReadError> {
        match self.recv.read_chunk(usize::MAX, true).await? {
            Some(chunk) => {
                if self.buf.is_empty() {
                    self.buf = chunk.bytes;
                } else {
                    let mut joined = BytesMut::with_capacity(self.buf.len() + chunk.bytes.len());
                    joined.extend_from_slice(&self.buf);
                    joined.extend_from_slice(&chunk.bytes);
                    self.buf = joined.freeze();
                }
                Ok(())
            }
            None => Err(ReadError::Truncated {
                got: self.buf.len(),
                want,
            }),
        }
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

    /// Gives back the stream, e.g. to stop it.
    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }
}

/// Encodes `head` and `body` as two frames and writes them, then ends the stream.
pub async fn write_message<T: Serialize>(
    send: &mut quinn::SendStream,
    head: &T,
    body: Bytes,
) -> Result<(), quinn::WriteError> {
    let mut out = Vec::with_capacity(64);
    encode_frame_vec(head, &mut out);
    encode_body_prefix(body.len(), &mut out);
    if body.len() <= 1024 {
        out.extend_from_slice(&body);
        send.write_all(&out).await?;
    } else {
        send.write_all_chunks(&mut [Bytes::from(out), body]).await?;
    }
    // The stream may already be reset by the peer; nothing more to do then.
    let _ = send.finish();
    Ok(())
}

/// Writes a reply on a call stream.
pub async fn write_reply(
    send: &mut quinn::SendStream,
    reply: crate::call::Reply,
) -> Result<(), quinn::WriteError> {
    let head = ResponseHead::new(reply.status, &reply.message);
    write_message(send, &head, reply.body).await
}
