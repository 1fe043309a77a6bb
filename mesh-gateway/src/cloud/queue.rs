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

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
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
    const ALL: [Class; 4] = [
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
}

/// The on-disk queue.
pub struct Queue {
    db: Database,
    path: PathBuf,
    bounds: Bounds,
    /// What is held, by (class, sequence): its size and when it was queued.
    index: BTreeMap<(Class, u64), (u64, u64)>,
    bytes: u64,
    next_seq: u64,
    dropped: [u64; 4],
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
            db,
            path: path.clone(),
            bounds,
            index: BTreeMap::new(),
            bytes: 0,
            next_seq: 1,
            dropped: [0; 4],
        };
        {
            // The tables exist from the first open on.
            let tx = queue.db.begin_write().map_err(|e| fail(e.to_string()))?;
            tx.open_table(MESSAGES).map_err(|e| fail(e.to_string()))?;
            tx.open_table(GAPS).map_err(|e| fail(e.to_string()))?;
            tx.open_table(META).map_err(|e| fail(e.to_string()))?;
            tx.commit().map_err(|e| fail(e.to_string()))?;
        }
        let rx = queue.db.begin_read().map_err(|e| fail(e.to_string()))?;
        let messages = rx.open_table(MESSAGES).map_err(|e| fail(e.to_string()))?;
        for item in messages.iter().map_err(|e| fail(e.to_string()))? {
            let (seq, bytes) = item.map_err(|e| fail(e.to_string()))?;
            let m: Message = postcard::from_bytes(bytes.value())
                .map_err(|e| fail(format!("message {} is damaged: {e}", seq.value())))?;
            queue.bytes += m.size();
            queue
                .index
                .insert((m.class, seq.value()), (m.size(), m.at_ms));
        }
        let meta = rx.open_table(META).map_err(|e| fail(e.to_string()))?;
        let get = |key: &str| -> Result<Option<u64>, QueueError> {
            Ok(meta
                .get(key)
                .map_err(|e| fail(e.to_string()))?
                .map(|v| v.value()))
        };
        queue.next_seq = get("next_seq")?.unwrap_or(1);
        for class in Class::ALL {
            queue.dropped[class as usize] = get(dropped_key(class))?.unwrap_or(0);
        }
        Ok(queue)
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
        payload: impl FnOnce(u64, &[(u64, u64)]) -> Vec<u8>,
    ) -> Result<u64, QueueError> {
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        let seq = self.next_seq;
        let mut dropped_now: Vec<(Class, u64)> = Vec::new();
        let message;
        {
            let mut gaps = tx.open_table(GAPS).map_err(|e| self.fail(e))?;
            let held: Vec<(u64, u64)> = gaps
                .iter()
                .map_err(|e| self.fail(e))?
                .filter_map(Result::ok)
                .map(|(a, b)| (a.value(), b.value()))
                .collect();
            message = Message {
                class,
                at_ms: now_ms,
                topic: topic.to_owned(),
                payload: payload(seq, &held),
            };
            for (start, _) in &held {
                gaps.remove(*start).map_err(|e| self.fail(e))?;
            }
            let mut messages = tx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            let bytes = postcard::to_allocvec(&message).map_err(|e| self.fail(e))?;
            messages
                .insert(seq, bytes.as_slice())
                .map_err(|e| self.fail(e))?;
            // Over a bound: the oldest of the least important class goes.
            let mut count = self.index.len() as u64 + 1;
            let mut total = self.bytes + message.size();
            let mut order = self.index.keys().copied().collect::<Vec<_>>();
            order.push((class, seq));
            order.sort_by_key(|(c, s)| (std::cmp::Reverse(*c), *s));
            let mut victims = order.into_iter();
            while count > self.bounds.max_messages || total > self.bounds.max_bytes {
                let Some((c, s)) = victims.next() else { break };
                let size = if s == seq {
                    message.size()
                } else {
                    self.index.get(&(c, s)).map_or(0, |(size, _)| *size)
                };
                messages.remove(s).map_err(|e| self.fail(e))?;
                count -= 1;
                total -= size;
                dropped_now.push((c, s));
            }
            let mut meta = tx.open_table(META).map_err(|e| self.fail(e))?;
            meta.insert("next_seq", seq + 1).map_err(|e| self.fail(e))?;
            if !dropped_now.is_empty() {
                for (c, s) in &dropped_now {
                    add_gap(&mut gaps, *s).map_err(|e| self.fail(e))?;
                    let key = dropped_key(*c);
                    let before = meta
                        .get(key)
                        .map_err(|e| self.fail(e))?
                        .map_or(0, |v| v.value());
                    meta.insert(key, before + 1).map_err(|e| self.fail(e))?;
                }
            }
        }
        tx.commit().map_err(|e| self.fail(e))?;
        self.next_seq = seq + 1;
        self.bytes += message.size();
        self.index
            .insert((class, seq), (message.size(), message.at_ms));
        for (c, s) in dropped_now {
            if let Some((size, _)) = self.index.remove(&(c, s)) {
                self.bytes -= size;
            }
            self.dropped[c as usize] += 1;
        }
        Ok(seq)
    }

    /// Drops what waited longer than its class may (counted, and kept as gaps).
    pub fn expire(&mut self, now_ms: u64) -> Result<u64, QueueError> {
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
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut messages = tx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
            let mut gaps = tx.open_table(GAPS).map_err(|e| self.fail(e))?;
            let mut meta = tx.open_table(META).map_err(|e| self.fail(e))?;
            for (c, s) in &old {
                messages.remove(*s).map_err(|e| self.fail(e))?;
                add_gap(&mut gaps, *s).map_err(|e| self.fail(e))?;
                let key = dropped_key(*c);
                let before = meta
                    .get(key)
                    .map_err(|e| self.fail(e))?
                    .map_or(0, |v| v.value());
                meta.insert(key, before + 1).map_err(|e| self.fail(e))?;
            }
        }
        tx.commit().map_err(|e| self.fail(e))?;
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
        let rx = self.db.begin_read().map_err(|e| self.fail(e))?;
        let messages = rx.open_table(MESSAGES).map_err(|e| self.fail(e))?;
        let mut out = Vec::new();
        for (_, seq) in self.index.keys().take(n) {
            if let Some(bytes) = messages.get(*seq).map_err(|e| self.fail(e))? {
                let m: Message = postcard::from_bytes(bytes.value()).map_err(|e| self.fail(e))?;
                out.push((*seq, m));
            }
        }
        Ok(out)
    }

    /// The broker acknowledged `seq`: it leaves the queue.
    pub fn ack(&mut self, seq: u64) -> Result<(), QueueError> {
        let Some(key) = self.index.keys().find(|(_, s)| *s == seq).copied() else {
            return Ok(());
        };
        let tx = self.db.begin_write().map_err(|e| self.fail(e))?;
        tx.open_table(MESSAGES)
            .map_err(|e| self.fail(e))?
            .remove(seq)
            .map_err(|e| self.fail(e))?;
        tx.commit().map_err(|e| self.fail(e))?;
        if let Some((size, _)) = self.index.remove(&key) {
            self.bytes -= size;
        }
        Ok(())
    }

    /// What it holds and what it dropped.
    pub fn stats(&self) -> QueueStats {
        QueueStats {
            messages: self.index.len() as u64,
            bytes: self.bytes,
            oldest_at_ms: self.index.values().map(|(_, at)| *at).min(),
            dropped: self.dropped,
        }
    }
}

/// Adds `seq` to the gap ranges (start -> end, inclusive), merging with a range it touches.
fn add_gap(gaps: &mut redb::Table<u64, u64>, seq: u64) -> Result<(), redb::StorageError> {
    let mut start = seq;
    let mut end = seq;
    // A range ending just before: extend it.
    let before = gaps
        .range(..=seq)?
        .next_back()
        .transpose()?
        .map(|(a, b)| (a.value(), b.value()));
    if let Some((a, b)) = before
        && b + 1 >= seq
    {
        start = a;
        end = end.max(b);
        gaps.remove(a)?;
    }
    // A range starting just after: take it in.
    let after = gaps
        .range(seq + 1..=seq + 1)?
        .next()
        .transpose()?
        .map(|(a, b)| (a.value(), b.value()));
    if let Some((a, b)) = after {
        end = end.max(b);
        gaps.remove(a)?;
    }
    gaps.insert(start, end)?;
    Ok(())
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
}
