//! The bridge from the site to the cloud over MQTT (issue 14).
//!
//! Up (site to cloud): every message goes first into the on-disk [`queue`] and leaves it only
//! when the broker acknowledged it (QoS 1), so an uplink down for hours, a gateway restart or a
//! power cut loses nothing; past the queue's bounds the least important messages are dropped,
//! counted and announced as gaps. Each message is a JSON object with the gateway's sequence
//! number (`seq`, one counter for every topic), its time (`at_ms`), the gateway (`gateway`) and,
//! when messages were dropped before it, their ranges (`gaps`). The topics, under the prefix:
//!
//! | topic | class | what |
//! |---|---|---|
//! | `status` | (retained, not queued) | `online` / `offline` (the MQTT will) |
//! | `telemetry` | telemetry | one node's calls since its last batch |
//! | `nodes` | registry | a node came up, went down, was removed |
//! | `registry` | registry | every node, on change |
//! | `audit` | audit | an audit event |
//! | `policy/status` | status | bundles accepted and refused, each node's ack or nack |
//! | `refused` | status | a message from the cloud the gateway refused, and why |
//!
//! Down (cloud to site), see [`link`]: `policy/set` takes a bundle signed by an operator key
//! ([`signing`]); `call/<service>/<method>` makes a call into the mesh as
//! `spiffe://<td>/cloud/<client-id>` and publishes the answer to the MQTT 5 response topic.

pub mod local;
pub mod queue;
pub mod report;
pub mod signing;
pub mod topics;

mod link;
pub mod mqtt;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio::sync::{Notify, oneshot, watch};
use tracing::warn;

pub use queue::Class;
use queue::{Bounds, Pending, Queue};

use crate::config::CloudConfig;

/// Messages waiting for the queue's writer, at most; past it they are counted as lost.
const WRITER_BACKLOG: usize = 65_536;
/// How often messages past their time to live are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(10);
/// Messages the writer puts in one transaction (one write to disk), at most.
const WRITE_BATCH: usize = 1024;

/// What the bridge asks of the rest of the gateway for messages from the cloud.
pub trait Downlink: Send + Sync + 'static {
    /// Validates and applies a policy bundle, as `PUT /v1/policy` does; its version.
    fn set_policy(&self, toml: String) -> BoxFuture<'_, Result<u64, String>>;
    /// Makes a call into the mesh (as the cloud: `options.on_behalf_of`); its status, message
    /// and body.
    fn call(
        &self,
        service: String,
        method: String,
        body: bytes::Bytes,
        options: mesh_node::CallOptions,
    ) -> BoxFuture<'_, (mesh_proto::Status, String, bytes::Bytes)>;
    /// Records an audit event.
    fn audit(&self, kind: &str, fields: Vec<(String, String)>);
}

/// A boxed future, as [`Downlink`] returns them.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How the link is doing, for `/metrics` and `/v1/cloud`.
#[derive(Debug, Default)]
pub(crate) struct LinkStats {
    pub(crate) connected: AtomicBool,
    pub(crate) published: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) unqueued: AtomicU64,
    pub(crate) receive_max: AtomicU64,
    pub(crate) inflight: AtomicU64,
    /// The MQTT version of the session (5, or 4 for 3.1.1; 0: none yet).
    pub(crate) protocol: AtomicU64,
    pub(crate) last_error: Mutex<Option<String>>,
}

/// The bridge's state as `/v1/cloud` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct CloudStatus {
    /// The broker, `host:port`.
    pub broker: String,
    /// The topic prefix.
    pub topic_prefix: String,
    /// The MQTT client id.
    pub client_id: String,
    /// Whether a session with the broker is up.
    pub connected: bool,
    /// Messages the broker acknowledged, since start.
    pub published: u64,
    /// Sessions started after the first, since start.
    pub reconnects: u64,
    /// Messages from the cloud refused, since start.
    pub refused: u64,
    /// Messages held in the queue.
    pub queue_messages: u64,
    /// Their bytes.
    pub queue_bytes: u64,
    /// Age of the oldest, seconds.
    pub queue_oldest_seconds: f64,
    /// The newest sequence number given to a message: a consumer that has it and every one
    /// before it (or their announced gaps) has everything queued so far.
    pub last_seq: u64,
    /// Messages dropped from the queue (bounds, age), by class.
    pub dropped: Vec<(String, u64)>,
    /// Messages lost before they reached the queue (it could not be written).
    pub dropped_unqueued: u64,
    /// The broker's Receive Maximum (0: not connected yet).
    pub receive_maximum: u64,
    /// Publishes waiting for the broker's acknowledgement.
    pub inflight: u64,
    /// The MQTT version of the last session: `5` or `3.1.1` (empty: none yet).
    pub protocol: String,
    /// Why the last session failed or ended, if it did.
    pub last_error: Option<String>,
}

struct Item {
    class: Class,
    topic: String,
    body: Map<String, Value>,
    at_ms: u64,
    /// Told when it is on disk (`true`) or could not be written.
    committed: Vec<oneshot::Sender<bool>>,
    /// A node's telemetry batch: it goes up in a `telemetry` message's `batches`, with the
    /// others of the batch interval.
    telemetry: bool,
}

/// The program that checks the cloud queue in a child process before it is opened (the
/// gateway's own binary; unset in tests that run a gateway in-process).
static QUEUE_CHECKER: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Sets the program [`Bridge::open`] checks the queue with (`<program> check-queue <dir>`).
pub fn set_queue_checker(program: std::path::PathBuf) {
    let _ = QUEUE_CHECKER.set(program);
}

/// Telemetry batches that go up in one message, at most (and within `max_publish_bytes`).
const MAX_BATCHES_PER_MESSAGE: usize = 1000;

/// Shared by the handle, the writer thread and the link.
pub(crate) struct Shared {
    pub(crate) config: CloudConfig,
    pub(crate) prefix: String,
    pub(crate) gateway: String,
    pub(crate) trust_domain: String,
    pub(crate) signers: Vec<signing::Signer>,
    queue: Mutex<Queue>,
    /// A message was queued: the link looks for work.
    pub(crate) wake: Notify,
    /// Signed bundles are handled one at a time.
    pub(crate) policy_lock: tokio::sync::Mutex<()>,
    /// The newest signing time applied (replays are refused).
    pub(crate) floor: signing::ReplayFloor,
    /// Bundles being checked or waiting for the lock.
    pub(crate) policy_backlog: Arc<tokio::sync::Semaphore>,
    /// Refusals reported in the current second (`(second, reported, not reported)`).
    refusals: Mutex<(u64, u64, u64)>,
    pub(crate) stats: LinkStats,
    /// When each node's telemetry last went up (ms): a batch without calls goes at most once
    /// a minute, for its resource figures.
    last_telemetry: Mutex<std::collections::HashMap<String, u64>>,
}

impl Shared {
    pub(crate) fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn topic(&self, suffix: &str) -> String {
        format!("{}/{suffix}", self.prefix)
    }

    /// Whether a refusal may be reported now (at most `REFUSALS_PER_SECOND` a second): if so,
    /// how many were not reported since the last one that was.
    pub(crate) fn refusal_budget(&self) -> Option<u64> {
        let second = unix_ms() / 1000;
        let mut r = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if r.0 != second {
            r.0 = second;
            r.1 = 0;
        }
        if r.1 >= link::REFUSALS_PER_SECOND {
            r.2 += 1;
            return None;
        }
        r.1 += 1;
        Some(std::mem::take(&mut r.2))
    }

    pub(crate) fn set_error(&self, e: Option<String>) {
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = e;
    }
}

/// The bridge: a cheap handle, cloned into whatever reports to the cloud.
#[derive(Clone)]
pub struct Bridge {
    shared: Arc<Shared>,
    writer: SyncSender<Item>,
}

impl Bridge {
    /// The operator keys `[cloud] policy_signers` names; errors name the config file.
    pub fn load_signers(config: &CloudConfig, file: &str) -> Result<Vec<signing::Signer>, String> {
        config
            .policy_signers
            .iter()
            .map(|p| {
                signing::load_public(&p.value)
                    .map_err(|e| format!("{file}:{}: cloud.policy_signers: {e}", p.line))
            })
            .collect()
    }

    /// What `check-config` checks of the section: the signers' keys and the TLS files read.
    pub fn check(config: &CloudConfig, file: &str) -> Result<(), String> {
        Self::load_signers(config, file)?;
        link::tls_config(config).map_err(|e| format!("{file}:{}: [cloud]: {e}", config.line))?;
        Ok(())
    }

    /// Opens the queue and starts its writer; the link starts with [`Bridge::start`]. A queue
    /// that cannot be read, or a key file that cannot, is an error.
    /// `state_dir` is the gateway's policy state folder: the replay floor of signed bundles is
    /// kept there, with the policy it guards.
    pub fn open(
        config: &CloudConfig,
        file: &str,
        gateway: &str,
        trust_domain: &str,
        state_dir: &std::path::Path,
    ) -> Result<Bridge, String> {
        let signers = Self::load_signers(config, file)?;
        // The TLS files are read now: a missing or unreadable one is a config error at start,
        // not a link that never comes up.
        link::tls_config(config).map_err(|e| format!("{file}:{}: [cloud]: {e}", config.line))?;
        let secs = |d: Duration| d.as_millis() as u64;
        if let Some(program) = QUEUE_CHECKER.get() {
            queue::check_in_child(program, &config.queue_dir).map_err(|e| e.to_string())?;
        }
        let queue = Queue::open(
            &config.queue_dir,
            Bounds {
                max_bytes: config.queue_max_bytes,
                max_messages: config.queue_max_messages,
                ttl_ms: config.ttl.map(secs),
            },
        )
        .map_err(|e| e.to_string())?;
        let prefix = config
            .topic_prefix
            .clone()
            .unwrap_or_else(|| format!("starling/{trust_domain}/{gateway}"));
        let unqueued_before = queue.unqueued();
        let shared = Arc::new(Shared {
            config: config.clone(),
            prefix,
            gateway: gateway.to_owned(),
            trust_domain: trust_domain.to_owned(),
            signers,
            queue: Mutex::new(queue),
            wake: Notify::new(),
            policy_lock: tokio::sync::Mutex::new(()),
            floor: signing::ReplayFloor::new(state_dir.join("cloud-policy-floor")),
            policy_backlog: Arc::new(tokio::sync::Semaphore::new(link::POLICY_BACKLOG)),
            refusals: Mutex::new((0, 0, 0)),
            last_telemetry: Mutex::new(std::collections::HashMap::new()),
            stats: LinkStats {
                unqueued: AtomicU64::new(unqueued_before),
                ..LinkStats::default()
            },
        });
        let (writer, items) = sync_channel(WRITER_BACKLOG);
        let for_writer = shared.clone();
        std::thread::Builder::new()
            .name("cloud-queue".into())
            .spawn(move || write_loop(&for_writer, &items))
            .map_err(|e| format!("cannot start the cloud queue's writer: {e}"))?;
        Ok(Bridge { shared, writer })
    }

    /// Starts the link to the broker; it reconnects on its own until `stop` changes.
    pub fn start(&self, downlink: Arc<dyn Downlink>, stop: watch::Receiver<bool>) {
        let bridge = self.clone();
        tokio::spawn(link::run(bridge, downlink, stop));
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Queues `body` for `<prefix>/<suffix>`.
    pub fn send(&self, class: Class, suffix: &str, body: Map<String, Value>) {
        self.enqueue(class, suffix, body, None, false);
    }

    /// Queues a node's telemetry batch (see [`report::telemetry`]); it goes up in a `telemetry`
    /// message with the other batches of the batch interval. The answer says when it is on
    /// disk (`true`) or could not be written (`false`).
    pub fn send_telemetry(&self, batch: Map<String, Value>) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Class::Telemetry, "telemetry", batch, Some(tx), true);
        rx
    }

    fn enqueue(
        &self,
        class: Class,
        suffix: &str,
        body: Map<String, Value>,
        committed: Option<oneshot::Sender<bool>>,
        telemetry: bool,
    ) {
        let item = Item {
            class,
            topic: self.shared.topic(suffix),
            body,
            at_ms: unix_ms(),
            committed: committed.into_iter().collect(),
            telemetry,
        };
        match self.writer.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(item) | TrySendError::Disconnected(item)) => {
                if self.shared.stats.unqueued.fetch_add(1, Ordering::Relaxed) == 0 {
                    warn!("the cloud queue's writer is behind: messages are lost (counted)");
                }
                for tx in item.committed {
                    let _ = tx.send(false);
                }
            }
        }
    }

    /// Whether a telemetry batch of `node` goes up: one with calls (or news of lost batches)
    /// always, one without at most once a minute (its resource figures).
    pub fn telemetry_due(&self, node: &str, has_news: bool) -> bool {
        let now = unix_ms();
        let mut last = self
            .shared
            .last_telemetry
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due = has_news
            || last
                .get(node)
                .is_none_or(|at| now.saturating_sub(*at) >= 60_000);
        if due {
            last.insert(node.to_owned(), now);
        }
        due
    }

    /// What one message up may take, at most.
    pub fn max_publish_bytes(&self) -> usize {
        self.shared.config.max_publish_bytes
    }

    /// The bridge's state now.
    pub fn status(&self) -> CloudStatus {
        let s = &self.shared;
        let q = s.queue().stats();
        let now = unix_ms();
        CloudStatus {
            broker: s.config.broker.clone(),
            topic_prefix: s.prefix.clone(),
            client_id: s.config.client_id.clone(),
            connected: s.stats.connected.load(Ordering::Relaxed),
            published: s.stats.published.load(Ordering::Relaxed),
            reconnects: s.stats.reconnects.load(Ordering::Relaxed),
            refused: s.stats.refused.load(Ordering::Relaxed),
            queue_messages: q.messages,
            queue_bytes: q.bytes,
            queue_oldest_seconds: q
                .oldest_at_ms
                .map_or(0.0, |at| now.saturating_sub(at) as f64 / 1000.0),
            last_seq: q.last_seq,
            dropped: Class::ALL
                .iter()
                .map(|c| (c.as_str().to_owned(), q.dropped[*c as usize]))
                .collect(),
            dropped_unqueued: s.stats.unqueued.load(Ordering::Relaxed),
            receive_maximum: s.stats.receive_max.load(Ordering::Relaxed),
            inflight: s.stats.inflight.load(Ordering::Relaxed),
            protocol: match s.stats.protocol.load(Ordering::Relaxed) {
                5 => "5".into(),
                4 => "3.1.1".into(),
                _ => String::new(),
            },
            last_error: s
                .stats
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }

    /// Where the queue lives.
    pub fn queue_dir(&self) -> PathBuf {
        self.shared.config.queue_dir.clone()
    }
}

/// Telemetry batches held for the batch interval.
#[derive(Default)]
struct Held {
    items: Vec<Item>,
    since: Option<std::time::Instant>,
    bytes: usize,
}

impl Held {
    /// Holds `item` (`size` bytes of JSON); if it would not fit with what is held, what is held
    /// comes back first, as one message.
    fn add(&mut self, item: Item, size: usize, limit: usize) -> Option<Item> {
        let full = !self.items.is_empty()
            && (self.bytes + size + 2048 > limit || self.items.len() >= MAX_BATCHES_PER_MESSAGE);
        let out = if full { self.take() } else { None };
        self.bytes += size + 1;
        self.since.get_or_insert_with(std::time::Instant::now);
        self.items.push(item);
        out
    }

    fn due(&self, interval: Duration) -> bool {
        self.since.is_some_and(|s| s.elapsed() >= interval)
    }

    /// One `telemetry` message with every batch held.
    fn take(&mut self) -> Option<Item> {
        let items = std::mem::take(&mut self.items);
        self.since = None;
        self.bytes = 0;
        merge(items)
    }
}

/// A telemetry item in parts that each fit a publish (the waiters go with the last part).
fn split_telemetry(item: Item, limit: usize) -> Vec<Item> {
    let Item {
        class,
        topic,
        body,
        at_ms,
        committed,
        telemetry,
    } = item;
    let parts = report::split_batch(body, limit);
    let n = parts.len();
    let mut committed = Some(committed);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, body)| Item {
            class,
            topic: topic.clone(),
            body,
            at_ms,
            committed: if i + 1 == n {
                committed.take().unwrap_or_default()
            } else {
                Vec::new()
            },
            telemetry,
        })
        .collect()
}

/// Telemetry batches as one `telemetry` message: `{"batches": [...]}`.
fn merge(items: Vec<Item>) -> Option<Item> {
    let first = items.first()?;
    let (class, topic, at_ms) = (first.class, first.topic.clone(), first.at_ms);
    let mut batches = Vec::with_capacity(items.len());
    let mut committed = Vec::with_capacity(items.len());
    for item in items {
        batches.push(Value::Object(item.body));
        committed.extend(item.committed);
    }
    let mut body = Map::new();
    body.insert("batches".into(), Value::Array(batches));
    Some(Item {
        class,
        topic,
        body,
        at_ms,
        committed,
        telemetry: true,
    })
}

/// The writer thread: takes what is waiting (up to [`WRITE_BATCH`]) and writes it in one
/// transaction, until every handle is gone. Telemetry batches wait for the batch interval (if
/// any) and go up together.
fn write_loop(shared: &Shared, items: &Receiver<Item>) {
    let interval = shared.config.batch_interval;
    let limit = shared.config.max_publish_bytes;
    let mut failing = false;
    let mut held = Held::default();
    // Messages past their time to live go here too, broker or no broker, off the runtime.
    let mut next_expiry = std::time::Instant::now() + EXPIRE_EVERY;
    loop {
        let until = match held.since {
            Some(since) => (since + interval).min(next_expiry),
            None => next_expiry,
        };
        let wait = until.saturating_duration_since(std::time::Instant::now());
        let first = match items.recv_timeout(wait) {
            Ok(item) => Some(item),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                write(shared, held.take().into_iter().collect(), &mut failing);
                return;
            }
        };
        if std::time::Instant::now() >= next_expiry {
            next_expiry = std::time::Instant::now() + EXPIRE_EVERY;
            if let Err(e) = shared.queue().expire(unix_ms()) {
                warn!("{e}");
            }
        }
        let mut batch = Vec::new();
        let more = std::iter::from_fn(|| items.try_recv().ok()).take(WRITE_BATCH);
        for item in first.into_iter().chain(more) {
            if !item.telemetry {
                batch.push(item);
                continue;
            }
            // A batch too large for one publish goes in parts; each part waits for the
            // interval with the others, or goes on its own.
            for part in split_telemetry(item, limit) {
                if interval.is_zero() {
                    batch.extend(merge(vec![part]));
                } else {
                    let size = report::json_len(&part.body);
                    batch.extend(held.add(part, size, limit));
                }
            }
        }
        if held.due(interval) {
            batch.extend(held.take());
        }
        if !batch.is_empty() {
            write(shared, batch, &mut failing);
        }
    }
}

/// Writes `batch` to the queue in one transaction and tells each item's waiters.
fn write(shared: &Shared, batch: Vec<Item>, failing: &mut bool) {
    let lost = shared.stats.unqueued.load(Ordering::Relaxed);
    let mut queue = shared.queue();
    let stream = format!("{:016x}", queue.stream());
    let mut done = Vec::with_capacity(batch.len());
    let pending: Vec<Pending<'_>> = batch
        .into_iter()
        .map(|item| {
            done.push(item.committed);
            let gateway = shared.gateway.clone();
            let stream = stream.clone();
            let mut body = item.body;
            Pending {
                class: item.class,
                topic: item.topic,
                now_ms: item.at_ms,
                payload: Box::new(move |seq, gaps| {
                    // The gateway's own keys last: nothing in the body overwrites them.
                    body.insert("stream".into(), stream.into());
                    body.insert("seq".into(), seq.into());
                    body.insert("at_ms".into(), item.at_ms.into());
                    body.insert("gateway".into(), gateway.into());
                    // Always written: a node's audit fields cannot stand in for them.
                    body.insert("gaps".into(), json!(gaps));
                    body.insert("lost_unqueued".into(), lost.into());
                    serde_json::to_vec(&Value::Object(body)).unwrap_or_default()
                }),
            }
        })
        .collect();
    let n = pending.len() as u64;
    queue.set_unqueued(lost);
    let written = queue.push_many(pending);
    drop(queue);
    let ok = match written {
        Ok(_) => {
            if *failing {
                warn!("the cloud queue is written again");
                *failing = false;
            }
            shared.wake.notify_one();
            true
        }
        Err(e) => {
            shared.stats.unqueued.fetch_add(n, Ordering::Relaxed);
            if !*failing {
                warn!("{e}: messages for the cloud are lost (counted)");
                *failing = true;
            }
            false
        }
    };
    for tx in done.into_iter().flatten() {
        let _ = tx.send(ok);
    }
}

/// The `/metrics` lines of the bridge.
pub fn render_metrics(status: &CloudStatus, out: &mut String) {
    use std::fmt::Write as _;
    let gauge = |out: &mut String, name: &str, help: &str, kind: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    gauge(
        out,
        "starling_cloud_connected",
        "Whether the bridge has a session with the cloud's broker.",
        "gauge",
        if status.connected { 1.0 } else { 0.0 },
    );
    gauge(
        out,
        "starling_cloud_queue_messages",
        "Messages waiting in the bridge's on-disk queue.",
        "gauge",
        status.queue_messages as f64,
    );
    gauge(
        out,
        "starling_cloud_queue_bytes",
        "Bytes waiting in the bridge's on-disk queue.",
        "gauge",
        status.queue_bytes as f64,
    );
    gauge(
        out,
        "starling_cloud_queue_oldest_seconds",
        "Age of the oldest message in the bridge's queue.",
        "gauge",
        status.queue_oldest_seconds,
    );
    gauge(
        out,
        "starling_cloud_published_total",
        "Messages the broker acknowledged.",
        "counter",
        status.published as f64,
    );
    gauge(
        out,
        "starling_cloud_reconnects_total",
        "Sessions with the broker started after the first.",
        "counter",
        status.reconnects as f64,
    );
    gauge(
        out,
        "starling_cloud_refused_total",
        "Messages from the cloud the gateway refused.",
        "counter",
        status.refused as f64,
    );
    let _ = writeln!(
        out,
        "# HELP starling_cloud_dropped_total Messages for the cloud dropped, by class (bounds or \
         age; announced as gaps) or unqueued (the queue could not be written).\n\
         # TYPE starling_cloud_dropped_total counter"
    );
    for (kind, n) in &status.dropped {
        let _ = writeln!(out, "starling_cloud_dropped_total{{kind=\"{kind}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "starling_cloud_dropped_total{{kind=\"unqueued\"}} {}",
        status.dropped_unqueued
    );
}
