//! The store-and-forward queue of the cloud bridge: every message bound for the broker is written
//! here first (redb: crash-safe, each change one committed transaction) and deleted only when the
//! broker acknowledged it, so a broker outage, a gateway restart or a power cut loses nothing.
//!
//! Bounded in messages, bytes and age per class. Past a bound the oldest message of the least
//! important class goes first (telemetry, then the registry, then policy status, audit last);
//! every drop is counted and its sequence number kept in a gap list, which the next message the
//! bridge writes carries (in the same transaction), so a consumer learns exactly what is missing.
//! Messages leave in priority order (audit and policy status before the registry, the registry
//! before telemetry), and in sequence order within a class.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");
const GAPS: TableDefinition<u64, u64> = TableDefinition::new("gaps");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// What a message is, most important first: the order they leave in, and the reverse of the
/// order they are dropped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Class {
    /// Audit events: dropped last.
    Audit = 0,
    /// Policy status (acks, nacks, rollouts).
    Status = 1,
    /// Node up/down and the registry.
    Registry = 2,
    /// Telemetry: dropped first.
    Telemetry = 3,
}

impl Class {
    /// Every class, most important first.
    pub const ALL: [Class; 4] = [
        Class::Audit,
        Class::Status,
        Class::Registry,
        Class::Telemetry,
    ];

    /// `audit`, `status`, `registry`, `telemetry`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Class::Audit => "audit",
            Class::Status => "status",
            Class::Registry => "registry",
            Class::Telemetry => "telemetry",
        }
    }
}

/// The queue's bounds.
#[derive(Debug, Clone)]
pub struct Bounds {
    /// Bytes of payload and topic held, at most.
    pub max_bytes: u64,
    /// Messages held, at most.
    pub max_messages: u64,
    /// Milliseconds a message of each class may wait (by [`Class`] index; 0: no limit).
    pub ttl_ms: [u64; 4],
}

/// One message as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Its class.
    pub class: Class,
    /// When it was queued, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The MQTT topic.
    pub topic: String,
    /// The payload (JSON).
    pub payload: Vec<u8>,
    /// The gap ranges it announces: if it is dropped too, they go back to the gap list.
    pub carries: Vec<(u64, u64)>,
}

impl Message {
    fn size(&self) -> u64 {
        (self.topic.len() + self.payload.len()) as u64
    }
}

/// Why the queue failed.
#[derive(Debug, thiserror::Error)]
#[error("the cloud queue at {path}: {reason}")]
pub struct QueueError {
    path: PathBuf,
    reason: String,
}

/// What the queue holds, and what it dropped since it was made.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages held.
    pub messages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// When the oldest was queued (ms since the epoch), if any.
    pub oldest_at_ms: Option<u64>,
    /// Messages dropped, by class (bound or age).
    pub dropped: [u64; 4],
    /// The newest sequence number given to a message (0: none yet).
    pub last_seq: u64,
}

/// Makes a payload from its sequence number and the gap ranges it announces.
pub type MakePayload<'a> = Box<dyn FnOnce(u64, &[(u64, u64)]) -> Vec<u8> + Send + 'a>;

/// A message to queue: its class, topic and time, and how its payload is made from its sequence
/// number and the gaps it announces.
pub struct Pending<'a> {
    /// Its class.
    pub class: Class,
    /// The MQTT topic.
    pub topic: String,
    /// When it was made, ms since the Unix epoch.
    pub now_ms: u64,
    /// Makes the payload.
    pub payload: MakePayload<'a>,
}

/// The on-disk queue.
pub struct Queue {
    /// `None` only while it is reopened.
    db: Option<Database>,
    /// A write failed: redb refuses everything after an I/O error until the file is opened
    /// again, so the next operation reopens it (and reloads what it holds) first.
    broken: bool,
    path: PathBuf,
    bounds: Bounds,
    /// What is held, by (class, sequence): its size and when it was queued.
    index: BTreeMap<(Class, u64), (u64, u64)>,
    bytes: u64,
    next_seq: u64,
    dropped: [u64; 4],
    /// Drops no message has announced yet.
    gaps_pending: bool,
    /// This queue's stream: its sequence numbers are this stream's.
    stream: u64,
    /// Messages lost before they reached the queue (it could not be written), since it was
    /// made: kept with the next write, so a restart does not forget them.
    unqueued: u64,
}

fn dropped_key(class: Class) -> &'static str {
    match class {
        Class::Audit => "dropped_audit",
        Class::Status => "dropped_status",
        Class::Registry => "dropped_registry",
        Class::Telemetry => "dropped_telemetry",
    }
}

impl Queue {
    /// Reads every table of the queue file in `dir` (if there is one), changing nothing it need
    /// not (redb may finish a write a crash cut short): what a child process does before the
    /// gateway opens its queue, since redb can panic on a damaged file (found by fuzzing), and a
    /// device build aborts on a panic. See [`check_in_child`].
    pub fn check(dir: &Path) -> Result<(), QueueError> {
        let path = dir.join("cloud-queue.redb");
        if !path.exists() {
            return Ok(());
        }
        let fail = |reason: String| QueueError {
            path: path.clone(),
            reason: format!("damaged or unreadable: {reason}"),
        };
        let db = Database::open(&path).map_err(|e| fail(e.to_string()))?;
        let rx = db.begin_read().map_err(|e| fail(e.to_string()))?;
        if let Ok(messages) = rx.open_table(MESSAGES) {
            for item in messages.iter().map_err(|e| fail(e.to_string()))? {
                item.map_err(|e| fail(e.to_string()))?;
            }
        }
        if let Ok(gaps) = rx.open_table(GAPS) {
            for item in gaps.iter().map_err(|e| fail(e.to_string()))? {
                item.map_err(|e| fail(e.to_string()))?;
            }
        }
        if let Ok(meta) = rx.open_table(META) {
            for item in meta.iter().map_err(|e| fail(e.to_string()))? {
                item.map_err(|e| fail(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Opens (or makes) the queue in `dir`. A queue that cannot be read is an error, never an
    /// empty queue: what it held would be lost in silence.
    pub fn open(dir: &Path, bounds: Bounds) -> Result<Queue, QueueError> {
        let path = dir.join("cloud-queue.redb");
        let fail = |reason: String| QueueError {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        let db =
            Database::create(&path).map_err(|e| fail(format!("damaged or unreadable: {e}")))?;
        let mut queue = Queue {
            db: Some(db),
            broken: false,
            path: path.clone(),
            bounds,
            index: BTreeMap::new(),
            bytes: 0,
            next_seq: 1,
            dropped: [0; 4],
            gaps_pending: false,
            stream: 0,
            unqueued: 0,
        };
        {
            // The tables exist from the first open on.
            let tx = queue.db()?.begin_write().map_err(|e| fail(e.to_string()))?;
            tx.open_table(MESSAGES).map_err(|e| fail(e.to_string()))?;
            tx.open_table(GAPS).map_err(|e| fail(e.to_string()))?;
            {
                // The stream: made once with the queue, so a consumer tells a new queue's
                // sequence numbers (from 1 again) from the old one's.
                let mut meta = tx.open_table(META).map_err(|e| fail(e.to_string()))?;
                if meta
                    .get("stream")
                    .map_err(|e| fail(e.to_string()))?
                    .is_none()
                {
                    let mut bytes = [0u8; 8];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                        .map_err(|_| fail("no randomness for the stream id".into()))?;
                    meta.insert("stream", u64::from_le_bytes(bytes) >> 1)
                        .map_err(|e| fail(e.to_string()))?;
                }
            }
            tx.commit().map_err(|e| fail(e.to_string()))?;
        }
        queue.load()?;
        Ok(queue)
    }

    /// Reads what the file holds: the index of messages, their bytes, the counters.
    fn load(&mut self) -> Result<(), QueueError> {
        let path = self.path.clone();
        let fail = |reason: String| QueueError {
            path: path.clone(),
            reason,
        };
        self.index.clear();
        self.bytes = 0;
        let db = self
            .db
            .as_ref()
            .ok_or_else(|| fail("the queue is closed".into()))?;
        let rx = db.begin_read().map_err(|e| fail(e.to_string()))?;
        let messages = rx.open_table(MESSAGES).map_err(|e| fail(e.to_string()))?;
        for item in messages.iter().map_err(|e| fail(e.to_string()))? {
            let (seq, bytes) = item.map_err(|e| fail(e.to_string()))?;
            let m: Message = postcard::from_bytes(bytes.value())
                .map_err(|e| fail(format!("message {} is damaged: {e}", seq.value())))?;
            self.bytes += m.size();
            self.index
                .insert((m.class, seq.value()), (m.size(), m.at_ms));
        }
        let meta = rx.open_table(META).map_err(|e| fail(e.to_string()))?;
        let get = |key: &str| -> Result<Option<u64>, QueueError> {
            Ok(meta
                .get(key)
                .map_err(|e| fail(e.to_string()))?
                .map(|v| v.value()))
        };
        self.next_seq = get("next_seq")?.unwrap_or(1);
        self.stream = get("stream")?.ok_or_else(|| fail("no stream id".into()))?;
        self.unqueued = get("unqueued")?.unwrap_or(0);
        let gaps = rx.open_table(GAPS).map_err(|e| fail(e.to_string()))?;
        self.gaps_pending = !gaps.is_empty().map_err(|e| fail(e.to_string()))?;
        for class in Class::ALL {
            self.dropped[class as usize] = get(dropped_key(class))?.unwrap_or(0);
        }
        Ok(())
    }

    fn db(&self) -> Result<&Database, QueueError> {
        self.db
            .as_ref()
            .ok_or_else(|| self.fail("the queue is closed"))
    }

    /// Opens the file again after a failed write (and reloads), if one failed.
    fn ready(&mut self) -> Result<(), QueueError> {
        if !self.broken {
            return Ok(());
        }
        self.db = None;
        let db = Database::create(&self.path).map_err(|e| self.fail(e))?;
        self.db = Some(db);
        self.load()?;
        self.broken = false;
        tracing::warn!("the cloud queue {} is open again", self.path.display());
        Ok(())
    }

    /// Marks the queue broken when `r` failed: the next operation reopens it.
    fn watch<T>(&mut self, r: Result<T, QueueError>) -> Result<T, QueueError> {
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    fn fail(&self, e: impl std::fmt::Display) -> QueueError {
        QueueError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Queues a message of `class` on `topic` at `now_ms`; `payload` is made from the gaps not
    /// announced yet (sequence ranges, inclusive), which it then carries: they are cleared in the
    /// same transaction. Returns the message's sequence number. Drops what the bounds require.
    pub fn push(
        &mut self,
        class: Class,
        topic: &str,
        now_ms: u64,
        payload: impl FnOnce(u64, &[(u64, u64)]) -> Vec<u8> + Send,
    ) -> Result<u64, QueueError> {
        let mut seqs = self.push_many(vec![Pending {
            class,
            topic: topic.to_owned(),
            now_ms,
            payload: Box::new(payload),
        }])?;
        Ok(seqs.pop().unwrap_or_default())
    }

    /// Queues several messages in one transaction (one write to disk), in order; each carries
    /// the gaps made before it. Returns their sequence numbers.
    pub fn push_many(&mut self, items: Vec<Pending<'_>>) -> Result<Vec<u64>, QueueError> {
        self.ready()?;
        let r = self.push_in_place(items);
        self.watch(r)
    }

    /// [`Queue::push_many`] on the index in place: if it fails, the queue is marked broken and
    /// the next operation reloads the index from the file (the transaction never committed).
    fn push_in_place(&mut self, items: Vec<Pending<'_>>) -> Result<Vec<u64>, QueueError> {
        let path = self.path.clone();
        let fail = |e: String| QueueError {
            path: path.clone(),
            reason: e,
        };
        let db = match &self.db {
            Some(db) => db,
            None => return Err(fail("the queue is closed".into())),
        };
        let tx = db.begin_write().map_err(|e| fail(e.to_string()))?;
        let mut out = Vec::with_capacity(items.len());
        let mut dropped_now: Vec<(Class, u64)> = Vec::new();
        let index = &mut self.index;
        let mut bytes_held = self.bytes;
        let mut seq = self.next_seq;
        // Whether drops wait for a message to announce them.
        let mut pending = self.gaps_pending;
        {
            let mut gaps = tx.open_table(GAPS).map_err(|e| fail(e.to_string()))?;
            let mut messages = tx.open_table(MESSAGES).map_err(|e| fail(e.to_string()))?;
            let mut meta = tx.open_table(META).map_err(|e| fail(e.to_string()))?;
            for item in items {
                let held: Vec<(u64, u64)> = gaps
                    .iter()
                    .map_err(|e| fail(e.to_string()))?
                    .filter_map(Result::ok)
                    .map(|(a, b)| (a.value(), b.value()))
                    .collect();
                let message = Message {
                    class: item.class,
                    at_ms: item.now_ms,
                    topic: item.topic,
                    payload: (item.payload)(seq, &held),
                    carries: held.clone(),
                };
                for (start, _) in &held {
                    gaps.remove(*start).map_err(|e| fail(e.to_string()))?;
                }
                pending = false;
                let encoded = postcard::to_allocvec(&message).map_err(|e| fail(e.to_string()))?;
                messages
                    .insert(seq, encoded.as_slice())
                    .map_err(|e| fail(e.to_string()))?;
                index.insert((message.class, seq), (message.size(), message.at_ms));
                bytes_held += message.size();
                // Over a bound: the oldest of the least important class goes.
                while index.len() as u64 > self.bounds.max_messages
                    || bytes_held > self.bounds.max_bytes
                {
                    // The least important class held, its oldest message.
                    let Some(&(least, _)) = index.keys().next_back() else {
                        break;
                    };
                    let Some((&(c, s), _)) = index.range((least, 0)..).next() else {
                        break;
                    };
                    let (size, _) = index.remove(&(c, s)).unwrap_or_default();
                    bytes_held -= size;
                    drop_message(&mut messages, &mut gaps, &mut meta, c, s)
                        .map_err(|e| fail(e.to_string()))?;
                    dropped_now.push((c, s));
                    pending = true;
                }
                out.push(seq);
                seq += 1;
            }
            meta.insert("next_seq", seq)
                .map_err(|e| fail(e.to_string()))?;
            meta.insert("unqueued", self.unqueued)
                .map_err(|e| fail(e.to_string()))?;
        }
        tx.commit().map_err(|e| fail(e.to_string()))?;
        self.next_seq = seq;
        self.bytes = bytes_held;
        self.gaps_pending = pending;
        for (c, _) in dropped_now {
            self.dropped[c as usize] += 1;
        }
        Ok(out)
    }

    /// Drops message `seq`, which can never be sent (too large, or its payload refused by the
    /// broker): counted with its class and announced as a gap, like any drop.
    pub fn drop_unsendable(&mut self, seq: u64) -> Result<(), QueueError> {
        self.ready()?;
        let r = self.drop_unsendable_in(seq);
        self.watch(r)
    }

    fn drop_unsendable_in(&mut self, seq: u64) -> Result<(), QueueError> {
        let Some(class) = self.class_of(seq) else {
            return Ok(());
        };
        let tx = self.db()?.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            let mut gaps = tx.open_table(GAPS).map_err(|e| self.fail(e))?;
            let mut meta = tx.open_table(META).map_err(|e| self.fail(e))?;
            drop_message(&mut messages, &mut gaps, &mut meta, class, seq)
                .map_err(|e| self.fail(e))?;
        }
        tx.commit().map_err(|e| self.fail(e))?;
        self.gaps_pending = true;
        if let Some((size, _)) = self.index.remove(&(class, seq)) {
            self.bytes -= size;
        }
        self.dropped[class as usize] += 1;
        Ok(())
    }

    /// Drops what waited longer than its class may (counted, and kept as gaps).
    pub fn expire(&mut self, now_ms: u64) -> Result<u64, QueueError> {
        self.ready()?;
        let r = self.expire_in(now_ms);
        self.watch(r)
    }

    fn expire_in(&mut self, now_ms: u64) -> Result<u64, QueueError> {
        let old: Vec<(Class, u64)> = self
            .index
            .iter()
            .filter(|((c, _), (_, at))| {
                let ttl = self.bounds.ttl_ms[*c as usize];
                ttl > 0 && now_ms.saturating_sub(*at) > ttl
            })
            .map(|(k, _)| *k)
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let tx = self.db()?.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            let mut gaps = tx.open_table(GAPS).map_err(|e| self.fail(e))?;
            let mut meta = tx.open_table(META).map_err(|e| self.fail(e))?;
            for (c, s) in &old {
                drop_message(&mut messages, &mut gaps, &mut meta, *c, *s)
                    .map_err(|e| self.fail(e))?;
            }
        }
        tx.commit().map_err(|e| self.fail(e))?;
        self.gaps_pending = true;
        for (c, s) in &old {
            if let Some((size, _)) = self.index.remove(&(*c, *s)) {
                self.bytes -= size;
            }
            self.dropped[*c as usize] += 1;
        }
        Ok(old.len() as u64)
    }

    /// Up to `n` messages to send, in priority order.
    pub fn next(&self, n: usize) -> Result<Vec<(u64, Message)>, QueueError> {
        self.next_except(n, |_| false)
    }

    /// Up to `n` messages to send, in priority order, leaving out those `skip` says (the ones
    /// in flight).
    pub fn next_except(
        &self,
        n: usize,
        skip: impl Fn(u64) -> bool,
    ) -> Result<Vec<(u64, Message)>, QueueError> {
        let rx = self.db()?.begin_read().map_err(|e| self.fail(e))?;
        let messages = rx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for (_, seq) in self.index.keys().filter(|(_, s)| !skip(*s)).take(n) {
            if let Some(bytes) = messages.get(*seq).map_err(|e| self.fail(e))? {
                let m: Message = postcard::from_bytes(bytes.value()).map_err(|e| self.fail(e))?;
                out.push((*seq, m));
            }
        }
        Ok(out)
    }

    /// The broker acknowledged `seq`: it leaves the queue.
    pub fn ack(&mut self, seq: u64) -> Result<(), QueueError> {
        self.ack_many(&[seq])
    }

    /// The broker acknowledged these: they leave the queue, in one transaction. It is not
    /// flushed to disk on its own (the next push flushes it): an acknowledgement lost to a power
    /// cut only makes the message go again, which sequence numbers let a consumer see.
    pub fn ack_many(&mut self, seqs: &[u64]) -> Result<(), QueueError> {
        self.ready()?;
        let r = self.ack_many_in(seqs);
        self.watch(r)
    }

    fn ack_many_in(&mut self, seqs: &[u64]) -> Result<(), QueueError> {
        let keys: Vec<(Class, u64)> = seqs
            .iter()
            .filter_map(|seq| self.class_of(*seq).map(|c| (c, *seq)))
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut tx = self.db()?.begin_write().map_err(|e| self.fail(e))?;
        tx.set_durability(redb::Durability::None)
            .map_err(|e| self.fail(e))?;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            for (_, seq) in &keys {
                messages.remove(*seq).map_err(|e| self.fail(e))?;
            }
        }
        tx.commit().map_err(|e| self.fail(e))?;
        for key in keys {
            if let Some((size, _)) = self.index.remove(&key) {
                self.bytes -= size;
            }
        }
        Ok(())
    }

    fn class_of(&self, seq: u64) -> Option<Class> {
        Class::ALL
            .into_iter()
            .find(|c| self.index.contains_key(&(*c, seq)))
    }

    /// Messages lost before they reached the queue, since it was made.
    pub fn unqueued(&self) -> u64 {
        self.unqueued
    }

    /// Raises that count to `n` (kept with the next write).
    pub fn set_unqueued(&mut self, n: u64) {
        self.unqueued = self.unqueued.max(n);
    }

    /// The stream id, made with the queue: sequence numbers are unique within it.
    pub fn stream(&self) -> u64 {
        self.stream
    }

    /// Messages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Whether drops wait to be announced (by the next message).
    pub fn gaps_pending(&self) -> bool {
        self.gaps_pending
    }

    /// What it holds and what it dropped.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            messages: self.index.len() as u64,
            bytes: self.bytes,
            // Within a class, the lowest sequence number is the oldest.
            oldest_at_ms: Class::ALL
                .iter()
                .filter_map(|c| self.index.range((*c, 0)..=(*c, u64::MAX)).next())
                .map(|(_, (_, at))| *at)
                .min(),
            dropped: self.dropped,
            last_seq: self.next_seq.saturating_sub(1),
        }
    }
}

/// Drops message `seq` of `class`: its number, and the gaps it was to announce, go back to the
/// gap list; the drop is counted.
fn drop_message(
    messages: &mut redb::Table<u64, &[u8]>,
    gaps: &mut redb::Table<u64, u64>,
    meta: &mut redb::Table<&str, u64>,
    class: Class,
    seq: u64,
) -> Result<(), String> {
    let carried = match messages.remove(seq).map_err(|e| e.to_string())? {
        Some(bytes) => {
            postcard::from_bytes::<Message>(bytes.value())
                .map_err(|e| format!("message {seq} is damaged: {e}"))?
                .carries
        }
        None => Vec::new(),
    };
    for (start, end) in carried {
        add_range(gaps, start, end).map_err(|e| e.to_string())?;
    }
    add_range(gaps, seq, seq).map_err(|e| e.to_string())?;
    let key = dropped_key(class);
    let before = meta
        .get(key)
        .map_err(|e| e.to_string())?
        .map_or(0, |v| v.value());
    meta.insert(key, before + 1).map_err(|e| e.to_string())?;
    Ok(())
}

/// Adds `start..=end` to the gap ranges (start -> end, inclusive), merged with the ranges it
/// overlaps or touches.
fn add_range(
    gaps: &mut redb::Table<u64, u64>,
    mut start: u64,
    mut end: u64,
) -> Result<(), redb::StorageError> {
    // A range starting before that reaches it: take it in.
    let before = gaps
        .range(..start)?
        .next_back()
        .transpose()?
        .map(|(a, b)| (a.value(), b.value()));
    if let Some((a, b)) = before
        && b.saturating_add(1) >= start
    {
        start = a;
        end = end.max(b);
        gaps.remove(a)?;
    }
    // Ranges starting inside it or just after: take them in.
    loop {
        let next = gaps
            .range(start..=end.saturating_add(1))?
            .next()
            .transpose()?
            .map(|(a, b)| (a.value(), b.value()));
        let Some((a, b)) = next else { break };
        end = end.max(b);
        gaps.remove(a)?;
    }
    gaps.insert(start, end)?;
    Ok(())
}

/// Runs [`Queue::check`] on `dir` in a child process, `program check-queue <dir>` (the
/// gateway's own binary): a file that makes the reader crash is then an error that names it,
/// not a gateway that aborts at every start.
pub fn check_in_child(program: &Path, dir: &Path) -> Result<(), QueueError> {
    use std::io::Read as _;
    let path = dir.join("cloud-queue.redb");
    if !path.exists() {
        return Ok(());
    }
    let fail = |reason: String| QueueError {
        path: path.clone(),
        reason,
    };
    let mut child = std::process::Command::new(program)
        .arg("check-queue")
        .arg(dir)
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail(format!("cannot check it ({}: {e})", program.display())))?;
    // A reader that loops on a damaged file must not hold the start forever.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(
                    "damaged: reading it did not end within 120 s; move it away to start with an \
                     empty queue (what it held is lost) or restore it"
                        .into(),
                ));
            }
            Err(e) => return Err(fail(format!("cannot check it: {e}"))),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut said = String::new();
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut said);
    }
    let said = said
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.starts_with("note:"))
        .unwrap_or("")
        .trim()
        .trim_start_matches("error: ")
        .to_owned();
    // Exit 2 is the reader's own refusal (redb's error, a permission, a lock): said as it is.
    // Anything else (a panic, a signal) is a file that crashes its reader.
    if status.code() == Some(2) {
        return Err(fail(format!("unreadable: {said}")));
    }
    Err(fail(format!(
        "damaged: reading it crashed the reader ({status}{}{said}); move it away to start with \
         an empty queue (what it held is lost) or restore it",
        if said.is_empty() { "" } else { ": " }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max_messages: u64) -> Bounds {
        Bounds {
            max_bytes: 1 << 30,
            max_messages,
            ttl_ms: [0, 0, 0, 60_000],
        }
    }

    fn push(q: &mut Queue, class: Class, now: u64) -> (u64, Vec<(u64, u64)>) {
        let mut seen = Vec::new();
        let seq = q
            .push(class, "t", now, |seq, gaps| {
                seen = gaps.to_vec();
                format!("{seq}").into_bytes()
            })
            .expect("push");
        (seq, seen)
    }

    #[test]
    fn messages_outlive_a_reopen_and_leave_in_priority_then_sequence_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(100)).expect("open");
        push(&mut q, Class::Telemetry, 1);
        push(&mut q, Class::Audit, 2);
        push(&mut q, Class::Registry, 3);
        push(&mut q, Class::Audit, 4);
        drop(q);
        let mut q = Queue::open(dir.path(), bounds(100)).expect("reopen");
        let order: Vec<u64> = q.next(10).expect("next").iter().map(|(s, _)| *s).collect();
        assert_eq!(order, [2, 4, 3, 1]);
        q.ack(2).expect("ack");
        drop(q);
        let q = Queue::open(dir.path(), bounds(100)).expect("reopen");
        let order: Vec<u64> = q.next(10).expect("next").iter().map(|(s, _)| *s).collect();
        assert_eq!(order, [4, 3, 1]);
        // Sequence numbers go on growing across reopens.
        let mut q = q;
        assert_eq!(push(&mut q, Class::Telemetry, 5).0, 5);
    }

    #[test]
    fn over_its_bound_it_drops_the_oldest_telemetry_first_and_announces_the_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(3)).expect("open");
        push(&mut q, Class::Telemetry, 1); // 1
        push(&mut q, Class::Audit, 2); // 2
        push(&mut q, Class::Telemetry, 3); // 3
        push(&mut q, Class::Telemetry, 4); // 4: drops 1
        // Each message carries the gaps made before it (once); the drops it causes go with the next.
        let (_, gaps) = push(&mut q, Class::Audit, 5); // 5: drops 3
        assert_eq!(gaps, [(1, 1)]);
        let held: Vec<u64> = q.next(10).expect("next").iter().map(|(s, _)| *s).collect();
        assert_eq!(held, [2, 5, 4], "audit kept, oldest telemetry dropped");
        assert_eq!(q.stats().dropped, [0, 0, 0, 2]);
        let (_, gaps) = push(&mut q, Class::Status, 6); // 6: drops 4
        assert_eq!(gaps, [(3, 3)]);
        let (_, gaps) = push(&mut q, Class::Status, 7); // 7: drops 6, the oldest status
        assert_eq!(gaps, [(4, 4)]);
        drop(q);
        // Counts survive a restart.
        let q = Queue::open(dir.path(), bounds(3)).expect("reopen");
        assert_eq!(q.stats().dropped.iter().sum::<u64>(), 4);
    }

    #[test]
    fn old_telemetry_expires_and_is_counted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(100)).expect("open");
        push(&mut q, Class::Telemetry, 1_000);
        push(&mut q, Class::Telemetry, 1_000);
        push(&mut q, Class::Audit, 1_000);
        assert_eq!(q.expire(70_000).expect("expire"), 2);
        assert_eq!(q.stats().messages, 1);
        assert_eq!(q.stats().dropped[Class::Telemetry as usize], 2);
        // Consecutive gaps are one range.
        let (_, gaps) = push(&mut q, Class::Audit, 70_000);
        assert_eq!(gaps, [(1, 2)]);
    }

    #[test]
    fn a_damaged_queue_is_an_error_not_an_empty_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(100)).expect("open");
        push(&mut q, Class::Audit, 1);
        drop(q);
        let file = dir.path().join("cloud-queue.redb");
        let mut bytes = std::fs::read(&file).expect("read");
        for b in bytes.iter_mut().take(64) {
            *b ^= 0xff;
        }
        std::fs::write(&file, bytes).expect("damage");
        let e = Queue::open(dir.path(), bounds(100)).err().expect("refused");
        assert!(e.to_string().contains("cloud-queue.redb"), "{e}");
    }

    #[test]
    fn a_dropped_message_gives_back_the_gaps_it_was_to_announce() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(2)).expect("open");
        push(&mut q, Class::Telemetry, 1); // 1
        push(&mut q, Class::Telemetry, 2); // 2
        push(&mut q, Class::Telemetry, 3); // 3: drops 1
        let (_, gaps) = push(&mut q, Class::Telemetry, 4); // 4: carries 1, drops 2
        assert_eq!(gaps, [(1, 1)]);
        push(&mut q, Class::Telemetry, 5); // 5: carries 2, drops 3
        push(&mut q, Class::Telemetry, 6); // 6: carries 3, drops 4, which carried 1
        // Message 4 announced gap 1 and was dropped: 1 is announced again, with 4.
        let (_, gaps) = push(&mut q, Class::Audit, 7); // 7: drops 5, which carried 2
        assert_eq!(gaps, [(1, 1), (4, 4)]);
        let (_, gaps) = push(&mut q, Class::Audit, 8); // 8: drops 6, which carried 3
        assert_eq!(gaps, [(2, 2), (5, 5)]);
        assert!(q.gaps_pending(), "3 and 6 wait for the next message");
        drop(q);
        let q = Queue::open(dir.path(), bounds(2)).expect("reopen");
        assert!(q.gaps_pending(), "known after a restart");
    }

    #[test]
    fn a_message_that_can_never_go_is_dropped_as_a_counted_gap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(100)).expect("open");
        push(&mut q, Class::Audit, 1); // 1
        push(&mut q, Class::Audit, 2); // 2
        q.drop_unsendable(1).expect("drop");
        assert_eq!(q.stats().dropped[Class::Audit as usize], 1);
        assert!(q.gaps_pending());
        let (_, gaps) = push(&mut q, Class::Audit, 3);
        assert_eq!(gaps, [(1, 1)]);
        let held: Vec<u64> = q.next(10).expect("next").iter().map(|(s, _)| *s).collect();
        assert_eq!(held, [2, 3]);
    }

    #[test]
    fn after_a_failed_write_the_file_is_opened_again_and_what_it_holds_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), bounds(100)).expect("open");
        push(&mut q, Class::Audit, 1);
        let stream = q.stream();
        // As after an I/O error (redb then refuses everything until the file is reopened).
        q.broken = true;
        q.index.clear();
        let (seq, _) = push(&mut q, Class::Audit, 2);
        assert_eq!(seq, 2);
        assert!(!q.broken);
        assert_eq!(q.len(), 2, "the index came back from the file");
        // The stream and the count of messages lost before the queue outlive a reopen.
        q.set_unqueued(5);
        push(&mut q, Class::Audit, 3);
        drop(q);
        let q = Queue::open(dir.path(), bounds(100)).expect("reopen");
        assert_eq!(q.stream(), stream);
        assert_eq!(q.unqueued(), 5);
        // A new queue is a new stream.
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(
            Queue::open(other.path(), bounds(100))
                .expect("open")
                .stream(),
            stream
        );
    }
}
