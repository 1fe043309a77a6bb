//! `serial:///dev/ttyUSB0?baud=115200`: a microcontroller on a serial line, running
//! `firmware-shim`. One [`SerialLink`] per line: it opens the line (and opens it again when it
//! comes back), asks the microcontroller to announce itself, matches replies to calls by request
//! id, keeps at most as many calls in flight as the microcontroller takes, and notices when it is
//! gone (no frame for three heartbeats, or the line closed): then every call waiting on it answers
//! Unavailable at once, and what it announced is withdrawn (the node stops hosting it).
//!
//! A call whose frame or answer was lost is sent again, with the same request id, only when the
//! policy marks its method idempotent; the microcontroller answers a repeated id from its replay
//! cache.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use mesh_proto::Status;
use mesh_proto::serial::{Decoder, Dropped, Frame, Key, SERIAL_VERSION, encode_keyed, max_encoded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, oneshot, watch};
use tracing::{info, warn};

use crate::call::{CallContext, Reply};

/// The longest frame on the line, either way.
pub const MAX_LINE_FRAME: usize = 1024;
/// The largest body a call to a microcontroller carries.
pub const MAX_SERIAL_BODY: usize = 900;
/// The microcontroller is gone when nothing came for three of its heartbeats, within these
/// bounds (and this long before it first announced).
const SILENCE_MIN: Duration = Duration::from_millis(300);
const SILENCE_MAX: Duration = Duration::from_secs(10);
const SILENCE_UNANNOUNCED: Duration = Duration::from_secs(1);
/// A call's frame is sent again after this long without an answer (idempotent methods only).
const RESEND_AFTER: Duration = Duration::from_millis(300);

/// What a microcontroller announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announced {
    /// Its name (a leaf of the node).
    pub name: String,
    /// Its firmware version.
    pub firmware: String,
    /// Its services and their methods, in the announce's order (calls name them by index).
    pub services: Vec<(String, Vec<String>)>,
    /// Calls it takes at once.
    pub max_in_flight: u8,
    /// Its heartbeat period.
    pub heartbeat: Duration,
}

/// One serial line and the microcontroller on it.
pub struct SerialLink {
    path: PathBuf,
    baud: u32,
    /// The key shared with the microcontroller: frames are tagged with it, and taken only with
    /// its tag.
    key: Option<Key>,
    /// What the microcontroller on the line announced, while it is there.
    announced: watch::Sender<Option<Arc<Announced>>>,
    inner: Mutex<Inner>,
    /// Frames dropped since start: too long, garbled, bad checksum, unknown, unauthenticated.
    dropped: Mutex<[u32; 5]>,
}

struct Inner {
    /// The writing half of the open line.
    writer: Option<Arc<tokio::sync::Mutex<tokio::io::WriteHalf<tokio_serial::SerialStream>>>>,
    /// Calls waiting for their reply, by request id.
    pending: HashMap<u16, oneshot::Sender<(Status, Bytes)>>,
    next_id: u16,
    /// Calls in flight, bounded by what the microcontroller takes.
    slots: Arc<Semaphore>,
}

impl SerialLink {
    /// A link for the line at `path`; [`SerialLink::run`] opens it.
    pub fn new(path: PathBuf, baud: u32, key: Option<Key>) -> Arc<Self> {
        Arc::new(SerialLink {
            path,
            baud,
            key,
            announced: watch::Sender::new(None),
            inner: Mutex::new(Inner {
                writer: None,
                pending: HashMap::new(),
                next_id: 1,
                slots: Arc::new(Semaphore::new(1)),
            }),
            dropped: Mutex::new([0; 5]),
        })
    }

    /// What the line's status shows: its path, the device on it, and the frames dropped.
    pub fn status(&self) -> (PathBuf, Option<String>, [u32; 5]) {
        (
            self.path.clone(),
            self.announced.borrow().as_ref().map(|a| a.name.clone()),
            *self.dropped.lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches what the microcontroller announced (none: it is not there).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Announced>>> {
        self.announced.subscribe()
    }

    /// The line's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Keeps the line open, read and answered until `stop` changes.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backoff =
            mesh_core::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let mut said_missing = false;
        loop {
            let opened = tokio_serial::SerialStream::open(&tokio_serial::new(
                self.path.to_string_lossy(),
                self.baud,
            ));
            match opened {
                Ok(stream) => {
                    said_missing = false;
                    backoff.reset();
                    info!("serial line {} open", self.path.display());
                    tokio::select! {
                        why = self.clone().serve(stream) => {
                            warn!("serial line {}: {why}", self.path.display());
                        }
                        _ = stop.changed() => return,
                    }
                    self.gone("the line closed");
                }
                Err(e) => {
                    if !said_missing {
                        warn!(
                            "cannot open serial line {}: {e}; trying again while the node runs",
                            self.path.display()
                        );
                        said_missing = true;
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff.next_delay(crate::rng::random())) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Serves an open line until it fails or the microcontroller falls silent; says why.
    async fn serve(self: Arc<Self>, stream: tokio_serial::SerialStream) -> String {
        let (mut reader, writer) = tokio::io::split(stream);
        let writer = Arc::new(tokio::sync::Mutex::new(writer));
        self.lock().writer = Some(writer.clone());
        // A node that (re)starts asks; a microcontroller that resets announces unasked.
        if let Err(e) = self.send(&Frame::Discover).await {
            return e;
        }
        let mut decoder = match self.key {
            Some(key) => Decoder::<MAX_LINE_FRAME>::with_key(key),
            None => Decoder::<MAX_LINE_FRAME>::new(),
        };
        let mut said_unauthenticated = false;
        // The counts before this opening of the line; the decoder counts from zero.
        let base = *self.dropped.lock().unwrap_or_else(|p| p.into_inner());
        let mut buf = [0u8; 256];
        let mut heard = false;
        loop {
            let silence = self
                .announced
                .borrow()
                .as_ref()
                .map_or(SILENCE_UNANNOUNCED, |a| {
                    (a.heartbeat * 3).clamp(SILENCE_MIN, SILENCE_MAX)
                });
            let read = tokio::time::timeout(silence, reader.read(&mut buf)).await;
            let n = match read {
                Ok(Ok(0)) => return "the line closed".into(),
                Ok(Ok(n)) => n,
                Ok(Err(e)) => return format!("read: {e}"),
                Err(_) => {
                    if heard {
                        self.gone("the microcontroller fell silent");
                        heard = false;
                    }
                    // Ask again: a microcontroller plugged in later announces on Discover too.
                    if let Err(e) = self.send(&Frame::Discover).await {
                        return e;
                    }
                    continue;
                }
            };
            let mut refuse = None;
            decoder.feed(
                &buf[..n],
                |frame| {
                    heard = true;
                    match frame {
                        Frame::Announce {
                            version,
                            name,
                            firmware,
                            services,
                            max_in_flight,
                            heartbeat_ms,
                        } => {
                            if version != SERIAL_VERSION {
                                warn!(
                                    "serial line {}: {name} speaks link version {version}, this \
                                     node {SERIAL_VERSION}: refused",
                                    self.path.display()
                                );
                                refuse = Some(format!(
                                    "this node speaks serial link version {SERIAL_VERSION}, not {version}"
                                ));
                                return;
                            }
                            let announced = Announced {
                                name: name.to_owned(),
                                firmware: firmware.to_owned(),
                                services: services
                                    .iter()
                                    .map(|s| {
                                        (
                                            s.name.to_owned(),
                                            s.methods.iter().map(|m| (*m).to_owned()).collect(),
                                        )
                                    })
                                    .collect(),
                                max_in_flight: max_in_flight.max(1),
                                heartbeat: Duration::from_millis(heartbeat_ms.into()),
                            };
                            self.announce(announced);
                        }
                        Frame::Reply { id, status, body } => {
                            if let Some(waiting) = self.lock().pending.remove(&id) {
                                let _ = waiting.send((status, Bytes::copy_from_slice(body)));
                            }
                        }
                        Frame::Refuse { reason } => {
                            warn!("serial line {}: refused by the microcontroller: {reason}", self.path.display());
                        }
                        _ => {}
                    }
                },
                |why| {
                    if why == Dropped::Unauthenticated && !said_unauthenticated {
                        said_unauthenticated = true;
                        warn!(
                            "serial line {}: frames fail authentication ({}): the device on this \
                             line does not hold this line's key; nothing it says is taken",
                            self.path.display(),
                            if self.key.is_some() { "untagged or another key" } else { "tagged, and this line has no key" }
                        );
                    }
                },
            );
            {
                let mut dropped = self.dropped.lock().unwrap_or_else(|p| p.into_inner());
                for ((total, before), now) in dropped.iter_mut().zip(base).zip(decoder.dropped) {
                    *total = before.saturating_add(now);
                }
            }
            if let Some(reason) = refuse
                && let Err(e) = self.send(&Frame::Refuse { reason: &reason }).await
            {
                return e;
            }
        }
    }

    fn announce(&self, announced: Announced) {
        let slots = usize::from(announced.max_in_flight);
        let changed = self.announced.borrow().as_deref() != Some(&announced);
        if changed {
            info!(
                "serial line {}: {} (firmware {}) hosts {}",
                self.path.display(),
                announced.name,
                announced.firmware,
                announced
                    .services
                    .iter()
                    .map(|(s, _)| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.lock().slots = Arc::new(Semaphore::new(slots));
            self.announced.send_replace(Some(Arc::new(announced)));
        }
    }

    /// The microcontroller is gone: calls waiting answer Unavailable at once, its services leave.
    fn gone(&self, why: &str) {
        let pending: Vec<_> = self.lock().pending.drain().map(|(_, w)| w).collect();
        for waiting in pending {
            let _ = waiting.send((Status::Unavailable, Bytes::from(why.to_owned())));
        }
        if self.announced.send_replace(None).is_some() {
            warn!("serial line {}: {why}", self.path.display());
        }
    }

    async fn send(&self, frame: &Frame<'_>) -> Result<(), String> {
        let mut scratch = vec![0u8; MAX_LINE_FRAME];
        let mut line = vec![0u8; max_encoded(MAX_LINE_FRAME)];
        let n = encode_keyed(frame, self.key.as_ref(), &mut scratch, &mut line)
            .map_err(|e| format!("{e:?}"))?;
        let writer = self.lock().writer.clone().ok_or("the line is not open")?;
        let mut w = writer.lock().await;
        w.write_all(&line[..n])
            .await
            .map_err(|e| format!("write: {e}"))?;
        w.flush().await.map_err(|e| format!("write: {e}"))
    }

    /// Calls `method` of `service` on the microcontroller.
    pub async fn call(&self, ctx: &CallContext, body: Bytes) -> Reply {
        let Some(announced) = self.announced.borrow().clone() else {
            return Reply::error(
                Status::Unavailable,
                format!("no microcontroller on {}", self.path.display()),
            );
        };
        let Some((s, methods)) = announced
            .services
            .iter()
            .enumerate()
            .find(|(_, (name, _))| name == ctx.service.as_str())
            .map(|(i, (_, m))| (i, m))
        else {
            return Reply::error(
                Status::Unavailable,
                format!("{} does not host {}", announced.name, ctx.service),
            );
        };
        let Some(m) = methods.iter().position(|m| m == ctx.method.as_str()) else {
            return Reply::error(
                Status::NotFound,
                format!(
                    "{} has no method {} in {}",
                    announced.name, ctx.method, ctx.service
                ),
            );
        };
        if body.len() > MAX_SERIAL_BODY {
            return Reply::error(
                Status::InvalidArgument,
                format!("a call to a microcontroller carries at most {MAX_SERIAL_BODY} bytes"),
            );
        }
        let slots = self.lock().slots.clone();
        let deadline = tokio::time::Instant::from_std(ctx.deadline);
        let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, slots.acquire_owned()).await else {
            return Reply::error(
                Status::DeadlineExceeded,
                "the microcontroller was busy until the deadline",
            );
        };
        let (id, mut answer) = {
            let mut inner = self.lock();
            let id = inner.next_id;
            inner.next_id = inner.next_id.wrapping_add(1).max(1);
            let (tx, rx) = oneshot::channel();
            inner.pending.insert(id, tx);
            (id, rx)
        };
        let frame = Frame::Call {
            id,
            service: s as u8,
            method: m as u8,
            body: &body,
        };
        let result = async {
            loop {
                self.send(&frame)
                    .await
                    .map_err(|e| Reply::error(Status::Unavailable, e))?;
                let wait = if ctx.idempotent {
                    (tokio::time::Instant::now() + RESEND_AFTER).min(deadline)
                } else {
                    deadline
                };
                match tokio::time::timeout_at(wait, &mut answer).await {
                    Ok(Ok((status, body))) => return Ok((status, body)),
                    Ok(Err(_)) => {
                        return Err(Reply::error(
                            Status::Unavailable,
                            "the microcontroller left",
                        ));
                    }
                    Err(_) if tokio::time::Instant::now() >= deadline => {
                        return Err(Reply::error(
                            Status::DeadlineExceeded,
                            "no answer from the microcontroller before the deadline",
                        ));
                    }
                    // Idempotent: the frame or its answer may be lost; the same id again.
                    Err(_) => continue,
                }
            }
        }
        .await;
        self.lock().pending.remove(&id);
        let leaf: Arc<str> = Arc::from(announced.name.as_str());
        match result {
            Ok((Status::Ok, body)) => Reply::ok(body).served_by_leaf(&leaf),
            Ok((status, body)) => Reply::error(status, String::from_utf8_lossy(&body).into_owned())
                .served_by_leaf(&leaf),
            Err(reply) => reply,
        }
    }
}

/// Reads a line's key file: 64 hex digits (32 bytes), readable by its owner only.
pub fn read_key(path: &std::path::Path) -> Result<Key, String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: the line's key has mode {:04o}: it must be readable by its owner only (chmod 600)",
                path.display(),
                mode & 0o777
            ));
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let text = text.trim();
    let mut key = [0u8; 32];
    if text.len() != 64 {
        return Err(format!("{}: a key is 64 hex digits", path.display()));
    }
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| format!("{}: a key is 64 hex digits", path.display()))?;
    }
    Ok(key)
}

/// Parses `serial:///dev/ttyUSB0?baud=115200&key=/etc/starling/mcu.key` (baud 115200 when not
/// given; no key: frames are not authenticated).
pub(crate) fn parse(s: &str) -> Result<(PathBuf, u32, Option<PathBuf>), String> {
    let rest = s.strip_prefix("serial://").ok_or("not serial://")?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if !path.starts_with('/') {
        return Err(format!(
            "{s:?}: a serial upstream names an absolute device path, like serial:///dev/ttyUSB0?baud=115200"
        ));
    }
    let mut baud = 115_200;
    let mut key = None;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        match kv.split_once('=') {
            Some(("baud", v)) => {
                baud = v
                    .parse::<u32>()
                    .ok()
                    .filter(|b| (300..=4_000_000).contains(b))
                    .ok_or_else(|| {
                        format!("{s:?}: baud {v:?} is not a rate between 300 and 4000000")
                    })?;
            }
            Some(("key", v)) if v.starts_with('/') => key = Some(PathBuf::from(v)),
            Some(("key", v)) => {
                return Err(format!("{s:?}: key {v:?}: the key file's absolute path"));
            }
            _ => return Err(format!("{s:?}: unknown option {kv:?} (baud=N, key=/path)")),
        }
    }
    Ok((PathBuf::from(path), baud, key))
}
