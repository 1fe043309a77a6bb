//! A node's telemetry, sans-I/O: calls counted per (service, method, caller, callee, status) with
//! latency histograms, cut into numbered batches, kept until the gateway acknowledges them.
//!
//! While the gateway is away, batches wait in a backlog bounded by `max_backlog`; past the bound
//! the oldest batch is dropped and counted, and every later batch carries the count, so a gap is
//! reported, never hidden. After a reconnect every unacknowledged batch is sent again; the gateway
//! ignores sequence numbers it has already stored.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use mesh_proto::Status;
use mesh_proto::control::{
    AuditEvent, CallStats, LATENCY_BUCKETS_US, Resources, RuleCount, Span, TelemetryBatch,
};

type Key = (String, String, String, String, Status);

/// FNV-1a over the parts of a key, so counting a call allocates nothing once its key exists.
fn key_hash(service: &str, method: &str, caller: &str, callee: &str, status: Status) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [service, method, caller, callee, status.as_str()] {
        for b in part.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    if let Status::Upstream(code) = status {
        h ^= u64::from(code);
    }
    h
}

#[derive(Debug, Clone, Default)]
struct Acc {
    count: u64,
    sum_us: u64,
    buckets: Vec<u64>,
}

/// Counters since the last batch, and the batches not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Telemetry {
    counters: std::collections::HashMap<u64, Vec<(Key, Acc)>>,
    spans: Vec<Span>,
    audit: Vec<AuditEvent>,
    backlog: VecDeque<TelemetryBatch>,
    max_backlog: usize,
    next_seq: u64,
    dropped: u64,
    max_items: usize,
    lost_items: u64,
    rules: BTreeMap<String, BTreeMap<&'static str, u64>>,
}

impl Telemetry {
    /// Telemetry keeping at most `max_backlog` unacknowledged batches.
    pub fn new(max_backlog: usize) -> Self {
        Telemetry {
            counters: std::collections::HashMap::new(),
            spans: Vec::new(),
            audit: Vec::new(),
            backlog: VecDeque::new(),
            max_backlog: max_backlog.max(1),
            next_seq: 1,
            dropped: 0,
            max_items: 1000,
            lost_items: 0,
            rules: BTreeMap::new(),
        }
    }

    /// Counts one finished call.
    pub fn record_call(
        &mut self,
        service: &str,
        method: &str,
        caller: &str,
        callee: &str,
        status: Status,
        latency: Duration,
    ) {
        let slot = self
            .counters
            .entry(key_hash(service, method, caller, callee, status))
            .or_default();
        let index = match slot.iter().position(|((s, m, cr, ce, st), _)| {
            s == service && m == method && cr == caller && ce == callee && *st == status
        }) {
            Some(i) => i,
            None => {
                let key = (
                    service.to_owned(),
                    method.to_owned(),
                    caller.to_owned(),
                    callee.to_owned(),
                    status,
                );
                slot.push((
                    key,
                    Acc {
                        buckets: vec![0; LATENCY_BUCKETS_US.len() + 1],
                        ..Acc::default()
                    },
                ));
                slot.len() - 1
            }
        };
        let acc = &mut slot[index].1;
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        acc.count += 1;
        acc.sum_us = acc.sum_us.saturating_add(us);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        acc.buckets[bucket] += 1;
    }

    /// Counts one decision of a policy rule (`allowed`, `denied`, `retried`, ...).
    pub fn record_rule(&mut self, rule: &str, action: &'static str) {
        match self.rules.get_mut(rule) {
            Some(actions) => *actions.entry(action).or_default() += 1,
            None => {
                self.rules
                    .insert(rule.to_owned(), [(action, 1)].into_iter().collect());
            }
        }
    }

    /// Keeps a sampled span for the next batch (at most 1000 a batch; more are counted as lost).
    pub fn record_span(&mut self, span: Span) {
        if self.spans.len() < self.max_items {
            self.spans.push(span);
        } else {
            self.lost_items += 1;
        }
    }

    /// Keeps an audit event for the next batch (at most 1000 a batch; more are counted as lost).
    pub fn record_audit(&mut self, event: AuditEvent) {
        if self.audit.len() < self.max_items {
            self.audit.push(event);
        } else {
            self.lost_items += 1;
        }
    }

    /// Cuts a batch of everything recorded since the last one and queues it; returns its number.
    pub fn cut(&mut self, resources: Resources) -> u64 {
        let mut counted: Vec<(Key, Acc)> = std::mem::take(&mut self.counters)
            .into_values()
            .flatten()
            .collect();
        counted.sort_by(|a, b| a.0.cmp(&b.0));
        let calls = counted
            .into_iter()
            .map(
                |((service, method, caller, callee, status), acc)| CallStats {
                    service,
                    method,
                    caller,
                    callee,
                    status,
                    count: acc.count,
                    sum_us: acc.sum_us,
                    buckets: acc.buckets,
                },
            )
            .collect();
        if self.backlog.len() == self.max_backlog {
            self.backlog.pop_front();
            self.dropped += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.backlog.push_back(TelemetryBatch {
            seq,
            dropped: self.dropped,
            calls,
            resources,
            spans: std::mem::take(&mut self.spans),
            audit: std::mem::take(&mut self.audit),
            rules: std::mem::take(&mut self.rules)
                .into_iter()
                .flat_map(|(rule, actions)| {
                    actions.into_iter().map(move |(action, count)| RuleCount {
                        rule: rule.clone(),
                        action: action.to_owned(),
                        count,
                    })
                })
                .collect(),
        });
        seq
    }

    /// Batches not yet acknowledged, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &TelemetryBatch> {
        self.backlog.iter()
    }

    /// The gateway stored every batch up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        while self.backlog.front().is_some_and(|b| b.seq <= seq) {
            self.backlog.pop_front();
        }
    }

    /// The number the next batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Batches dropped because the backlog was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Spans and audit events dropped because a batch was full.
    pub fn lost_items(&self) -> u64 {
        self.lost_items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn counts_and_histograms_per_key() {
        let mut t = Telemetry::new(10);
        for _ in 0..3 {
            t.record_call("echo", "say", "a", "b", Status::Ok, ms(2));
        }
        t.record_call(
            "echo",
            "say",
            "a",
            "",
            Status::NotFound,
            Duration::from_micros(50),
        );
        t.record_call("echo", "say", "a", "b", Status::Ok, ms(20_000));
        let seq = t.cut(Resources::default());
        let batch = t.pending().next().expect("batch");
        assert_eq!((seq, batch.seq), (1, 1));
        let ok = batch
            .calls
            .iter()
            .find(|c| c.status == Status::Ok)
            .expect("ok");
        assert_eq!(ok.count, 4);
        assert_eq!(ok.buckets[4], 3, "2 ms lands in the <= 2.5 ms bucket");
        assert_eq!(
            ok.buckets[LATENCY_BUCKETS_US.len()],
            1,
            "20 s lands in +Inf"
        );
        assert_eq!(ok.sum_us, 3 * 2000 + 20_000_000);
        let nf = batch
            .calls
            .iter()
            .find(|c| c.status == Status::NotFound)
            .expect("nf");
        assert_eq!((nf.count, nf.buckets[0], nf.callee.as_str()), (1, 1, ""));
    }

    #[test]
    fn batches_wait_for_their_ack() {
        let mut t = Telemetry::new(10);
        t.record_call("s", "m", "a", "b", Status::Ok, ms(1));
        t.cut(Resources::default());
        t.cut(Resources::default());
        t.cut(Resources::default());
        assert_eq!(t.pending().map(|b| b.seq).collect::<Vec<_>>(), [1, 2, 3]);
        t.ack(2);
        assert_eq!(t.pending().map(|b| b.seq).collect::<Vec<_>>(), [3]);
        assert_eq!(t.next_seq(), 4);
        assert!(t.pending().all(|b| b.calls.is_empty()), "counts are deltas");
    }

    #[test]
    fn a_full_backlog_drops_the_oldest_and_says_so() {
        let mut t = Telemetry::new(2);
        for i in 0..5 {
            t.record_call("s", "m", "a", "b", Status::Ok, ms(i));
            t.cut(Resources::default());
        }
        assert_eq!(t.pending().map(|b| b.seq).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(t.dropped(), 3);
        assert!(t.pending().all(|b| b.dropped == 3 || b.dropped == 2));
        assert_eq!(t.pending().last().map(|b| b.dropped), Some(3));
    }
}
