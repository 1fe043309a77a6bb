//! Kept call streams (protocol 4): a unary call's stream, once its answer is read, carries the
//! next call to the same connection instead of a new stream being opened.
//!
//! A stream carries one call after another, never two at once, so calls still never wait behind
//! each other. The caller asks with [`KEEP_METADATA`](mesh_proto::KEEP_METADATA) on the request,
//! and keeps the stream only when the callee's answer says it will read the next call. The
//! callee ends a kept stream that stays idle for [`IDLE_BOUND`], resetting it with
//! [`KEPT_IDLE_CODE`](mesh_proto::KEPT_IDLE_CODE); the caller reuses one only within
//! [`REUSE_WITHIN`] of its last answer, so a call is never sent on a stream the callee is ending
//! (and should the two meet anyway, the callee has not read the call, and the caller sends it
//! again on a new stream).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::wire::FrameReader;

/// A caller reuses a stream only within this long of its last answer.
pub(crate) const REUSE_WITHIN: Duration = Duration::from_secs(10);

/// A callee ends a kept stream on which no next call began within this long.
pub(crate) const IDLE_BOUND: Duration = Duration::from_secs(60);

/// One idle kept stream.
struct Idle {
    send: quinn::SendStream,
    reader: FrameReader,
    since: Instant,
}

/// The idle kept streams of one connection, newest last.
#[derive(Default)]
pub(crate) struct KeptStreams {
    idle: Mutex<Vec<Idle>>,
    /// A stream was kept: a caller waiting to open one takes it instead.
    kept: tokio::sync::Notify,
}

impl KeptStreams {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest idle stream, if it is recent enough at `at` (now, or a moment ago) to reuse.
    /// Stale ones are ended (a dropped send stream is finished, and its callee's task ends): an
    /// idle stream holds one of the streams its peer allows at once.
    pub(crate) fn take(&self, at: Instant) -> Option<(quinn::SendStream, FrameReader)> {
        let mut idle = self.lock();
        let stale = Self::stale(&mut idle, at);
        let newest = idle.pop();
        drop(idle);
        drop(stale);
        newest.map(|n| (n.send, n.reader))
    }

    /// Keeps a stream whose call ended cleanly at `at` (now), unless `max` are idle already.
    pub(crate) fn put(
        &self,
        send: quinn::SendStream,
        reader: FrameReader,
        max: usize,
        at: Instant,
    ) {
        let mut idle = self.lock();
        let stale = Self::stale(&mut idle, at);
        let kept = idle.len() < max;
        if kept {
            idle.push(Idle {
                send,
                reader,
                since: at,
            });
        }
        drop(idle);
        drop(stale);
        if kept {
            self.kept.notify_one();
        }
    }

    /// Takes out the streams idle at `at` for longer than [`REUSE_WITHIN`] (the oldest, at the
    /// front), to be dropped once the lock is let go.
    fn stale(idle: &mut Vec<Idle>, at: Instant) -> Vec<Idle> {
        let fresh = idle
            .iter()
            .position(|i| at.saturating_duration_since(i.since) <= REUSE_WITHIN)
            .unwrap_or(idle.len());
        idle.drain(..fresh).collect()
    }

    /// Opens a stream that will not be kept (a streamed call, a tunnel, a control session).
    /// Should the peer allow no more streams now, the idle kept ones are ended first: each holds
    /// a stream the peer would allow.
    pub(crate) async fn open_unkept(
        &self,
        conn: &quinn::Connection,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError> {
        let mut open = std::pin::pin!(conn.open_bi());
        if let std::task::Poll::Ready(opened) = crate::clock::poll_once(open.as_mut()).await {
            return opened;
        }
        loop {
            let idle = std::mem::take(&mut *self.lock());
            drop(idle);
            // Streams kept while this waits are ended too.
            tokio::select! {
                biased;
                opened = &mut open => return opened,
                () = self.kept.notified() => {}
            }
        }
    }

    /// Opens a new stream on `conn`; or `None` when a stream is kept first. Kept streams count
    /// against the streams the peer allows at once, so a caller waiting for it to allow another
    /// must take the next kept one instead (or, with every stream kept or busy, it would wait
    /// forever).
    pub(crate) async fn open(
        &self,
        conn: &quinn::Connection,
    ) -> Option<Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>> {
        tokio::select! {
            biased;
            opened = conn.open_bi() => Some(opened),
            () = self.kept.notified() => None,
        }
    }
}

/// A callee's bound on a kept stream's idle time, with one timer for the stream's life rather
/// than one per call: the timer fires at most about once per [`IDLE_BOUND`], and ends the stream
/// only if it has been idle that long.
#[derive(Default)]
pub(crate) struct IdleBound {
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl IdleBound {
    /// `next` (the stream's next bytes), unless the stream, idle since `since`, stays idle for
    /// [`IDLE_BOUND`] first (`None`).
    pub(crate) async fn wait<F: std::future::Future>(
        &mut self,
        since: tokio::time::Instant,
        next: F,
    ) -> Option<F::Output> {
        let until = since + IDLE_BOUND;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        let mut next = std::pin::pin!(next);
        loop {
            tokio::select! {
                biased;
                out = &mut next => return Some(out),
                () = timer.as_mut() => {
                    if tokio::time::Instant::now() >= until {
                        return None;
                    }
                    // Armed for an earlier idle time: calls came since.
                    timer.as_mut().reset(until);
                }
            }
        }
    }
}
