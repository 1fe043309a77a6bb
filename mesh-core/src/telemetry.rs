//! A node's telemetry, sans-I/O: calls counted per (service, method, caller, callee, status) with
//! latency histograms, cut into numbered batches, kept until the gateway acknowledges them.
//!
//! While the gateway is away, batches wait in a backlog bounded in batches and in bytes: past the
//! byte bound the sampled spans of the oldest batches go first (counted), then whole batches
//! (counted); every later batch carries the counts, so a gap is reported, never hidden. After a
//! reconnect every unacknowledged batch is sent again; the gateway ignores sequence numbers it has
//! already stored.
//!
//! The (service, method) pairs a node counts are bounded too: past [`Bounds::max_series`] a new
//! method is counted as `_other`, and the folding is counted, so a caller that invents method
//! names cannot grow the node's memory or the gateway's series without bound.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use mesh_proto::Status;
use mesh_proto::control::{
    AuditEvent, CallStats, LATENCY_BUCKETS_US, Resources, RuleCount, Span, TCP_DURATION_BUCKETS_S,
    TcpStats, TelemetryBatch,
};

type Key = (String, String, String, String, Status);

/// A hash of a key's parts, so counting a call allocates nothing once its key exists. Keyed with
/// a seed of this process's (foldhash): the names come from peers, and a peer that cannot know
/// the seed cannot choose names whose hashes collide (and so count past the series bound). It was
/// FNV-1a, whose collisions anyone can compute, and which read a byte at a time.
fn parts_hash(keys: &foldhash::fast::RandomState, parts: &[&str], code: Option<u64>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = keys.build_hasher();
    for part in parts {
        h.write(part.as_bytes());
        h.write_u8(0xff);
    }
    if let Some(code) = code {
        h.write_u64(code);
    }
    h.finish()
}

/// Who an audit event is about, for its bound per source: its caller, its peer, or the host of
/// its remote address (any port); `None` for the node's own events (a policy applied).
fn audit_source(event: &AuditEvent) -> Option<&str> {
    let (key, value) = event
        .fields
        .iter()
        .find(|(k, _)| matches!(k.as_str(), "caller" | "peer" | "remote"))?;
    Some(match key.as_str() {
        "remote" => value
            .rsplit_once(':')
            .map_or(value.as_str(), |(host, _)| host),
        _ => value.as_str(),
    })
}

#[derive(Debug, Clone, Default)]
struct Acc {
    count: u64,
    sum_us: u64,
    buckets: Vec<u64>,
}

impl Acc {
    /// Counts a call of `us` microseconds.
    fn add(&mut self, us: u64) {
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        if let Some(b) = self.buckets.get_mut(bucket) {
            *b += 1;
        }
    }
}

/// The method name calls are counted under once a node's series bound is reached.
pub const OTHER_METHOD: &str = "_other";

/// Call series (service, method, caller, callee, status) a batch holds, per (service, method)
/// pair of [`Bounds::max_series`]: past them, a call in a new series is counted with caller and
/// callee `_other`. A callee names itself (`<node>/leaf/<leaf>`, the leaf its own word), so a
/// callee inventing a leaf name per answer would otherwise grow its caller's memory per call.
pub const CALL_SERIES_PER_PAIR: usize = 8;

/// How much telemetry a node keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Unacknowledged batches kept.
    pub max_batches: usize,
    /// Bytes (encoded) of unacknowledged batches kept.
    pub max_bytes: usize,
    /// Distinct (service, method) pairs counted; more are folded into `_other`.
    pub max_series: usize,
    /// Spans or audit events kept per batch.
    pub max_items: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_batches: 720,
            max_bytes: 1024 * 1024,
            max_series: 512,
            max_items: 1000,
        }
    }
}

/// Counters since the last batch, and the batches not yet acknowledged.
#[derive(Debug, Clone)]
pub struct Telemetry {
    counters: crate::FastMap<u64, Vec<(Key, Acc)>>,
    spans: Vec<Span>,
    audit: Vec<AuditEvent>,
    /// The batches waiting for an ack, each with its encoded size.
    backlog: VecDeque<(TelemetryBatch, usize)>,
    backlog_bytes: usize,
    bounds: Bounds,
    next_seq: u64,
    acked: u64,
    dropped: u64,
    lost_items: u64,
    keep_spans: bool,
    series: crate::FastSet<u64>,
    /// Services that have a series of their own.
    services: crate::FastSet<u64>,
    /// The seed of the keys' hashes.
    keys: foldhash::fast::RandomState,
    folded: u64,
    /// Call series in `counters`.
    call_series: usize,
    /// Audit events in this batch by source (see [`audit_source`]), by the hash of its name.
    audit_sources: crate::FastMap<u64, usize>,
    rules: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// TCP forward counters since the last batch, by (listen, service).
    tcp: BTreeMap<(String, String), TcpStats>,
}

/// Something that happened to a connection of a TCP forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpEvent {
    /// A tunnel was opened for it.
    Opened,
    /// It was refused (no endpoint, denied, rate limited, the upstream unreachable).
    Refused,
    /// Bytes crossed since the last report.
    Bytes {
        /// From the local client to the service.
        to_service: u64,
        /// From the service to the local client.
        from_service: u64,
    },
    /// It ended after this long.
    Closed(Duration),
}

impl Telemetry {
    /// Telemetry keeping at most `max_backlog` unacknowledged batches (other bounds default).
    pub fn new(max_backlog: usize) -> Self {
        Self::with_bounds(Bounds {
            max_batches: max_backlog,
            ..Bounds::default()
        })
    }

    /// Telemetry within `bounds`.
    pub fn with_bounds(bounds: Bounds) -> Self {
        Telemetry {
            counters: crate::FastMap::default(),
            spans: Vec::new(),
            audit: Vec::new(),
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            bounds: Bounds {
                max_batches: bounds.max_batches.max(1),
                max_series: bounds.max_series.max(1),
                ..bounds
            },
            next_seq: 1,
            acked: 0,
            dropped: 0,
            lost_items: 0,
            keep_spans: true,
            series: crate::FastSet::default(),
            services: crate::FastSet::default(),
            keys: foldhash::fast::RandomState::default(),
            folded: 0,
            call_series: 0,
            audit_sources: crate::FastMap::default(),
            rules: BTreeMap::new(),
            tcp: BTreeMap::new(),
        }
    }

    /// Counts `event` for the TCP forward on `listen` to `service`. Forwards come from the
    /// config, so their number is small; past the series bound they are counted as one.
    pub fn record_tcp(&mut self, listen: &str, service: &str, event: TcpEvent) {
        let stats = match self.tcp.get_mut(&(listen.to_owned(), service.to_owned())) {
            Some(stats) => stats,
            None => {
                let key = if self.tcp.len() < self.bounds.max_series {
                    (listen.to_owned(), service.to_owned())
                } else {
                    (OTHER_METHOD.to_owned(), OTHER_METHOD.to_owned())
                };
                self.tcp.entry(key.clone()).or_insert_with(|| TcpStats {
                    listen: key.0,
                    service: key.1,
                    buckets: vec![0; TCP_DURATION_BUCKETS_S.len() + 1],
                    ..TcpStats::default()
                })
            }
        };
        match event {
            TcpEvent::Opened => stats.opened += 1,
            TcpEvent::Refused => stats.refused += 1,
            TcpEvent::Bytes {
                to_service,
                from_service,
            } => {
                stats.bytes_to_service += to_service;
                stats.bytes_from_service += from_service;
            }
            TcpEvent::Closed(duration) => {
                stats.closed += 1;
                stats.duration_ms = stats
                    .duration_ms
                    .saturating_add(duration.as_millis().try_into().unwrap_or(u64::MAX));
                let bucket = TCP_DURATION_BUCKETS_S
                    .iter()
                    .position(|&b| duration <= Duration::from_secs(b))
                    .unwrap_or(TCP_DURATION_BUCKETS_S.len());
                if let Some(b) = stats.buckets.get_mut(bucket) {
                    *b += 1;
                }
            }
        }
    }

    /// Whether sampled spans are kept at all (not when no gateway could ever take them).
    pub fn keep_spans(&mut self, keep: bool) {
        self.keep_spans = keep;
        if !keep {
            self.spans = Vec::new();
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
        let folded = self.folded;
        let (service, method) = self.bounded(service, method);
        let keys = &self.keys;
        let series = |caller: &str, callee: &str, status: Status| {
            let code = match status {
                Status::Upstream(code) => Some(u64::from(code)),
                _ => None,
            };
            parts_hash(
                keys,
                &[service, method, caller, callee, status.as_str()],
                code,
            )
        };
        let same = |((s, m, cr, ce, st), _): &(Key, Acc), caller: &str, callee: &str, status| {
            s == service && m == method && cr == caller && ce == callee && *st == status
        };
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let hash = series(caller, callee, status);
        // A series counted already (every call but a series' first): one lookup.
        if let Some(acc) = self.counters.get_mut(&hash).and_then(|slot| {
            slot.iter_mut()
                .find(|e| same(e, caller, callee, status))
                .map(|(_, acc)| acc)
        }) {
            acc.add(us);
            return;
        }
        let (caller, callee, status, hash) =
            if self.call_series < self.bounds.max_series * CALL_SERIES_PER_PAIR {
                (caller, callee, status, hash)
            } else {
                // Counted as folded once, whether or not its method was. An upstream's code is a
                // callee's word too: any code folds to one.
                self.folded = folded + 1;
                let status = match status {
                    Status::Upstream(_) => Status::Upstream(0),
                    other => other,
                };
                let hash = series(OTHER_METHOD, OTHER_METHOD, status);
                (OTHER_METHOD, OTHER_METHOD, status, hash)
            };
        let slot = self.counters.entry(hash).or_default();
        match slot.iter_mut().find(|e| same(e, caller, callee, status)) {
            Some((_, acc)) => acc.add(us),
            None => {
                self.call_series += 1;
                let key = (
                    service.to_owned(),
                    method.to_owned(),
                    caller.to_owned(),
                    callee.to_owned(),
                    status,
                );
                let mut acc = Acc {
                    buckets: vec![0; LATENCY_BUCKETS_US.len() + 1],
                    ..Acc::default()
                };
                acc.add(us);
                slot.push((key, acc));
            }
        }
    }

    /// `(service, method)`, or, once the series bound is reached for a pair not seen before, the
    /// service with method `_other` (a service already counted) or `_other` for both. Pairs are
    /// remembered by a hash, so counting allocates nothing.
    fn bounded<'a>(&mut self, service: &'a str, method: &'a str) -> (&'a str, &'a str) {
        let hash = |parts: &[&str]| parts_hash(&self.keys, parts, None);
        let pair = hash(&[service, method]);
        if self.series.contains(&pair) {
            return (service, method);
        }
        let svc = hash(&[service]);
        if self.series.len() < self.bounds.max_series {
            self.series.insert(pair);
            self.services.insert(svc);
            return (service, method);
        }
        self.folded += 1;
        if self.services.contains(&svc) {
            (service, OTHER_METHOD)
        } else {
            (OTHER_METHOD, OTHER_METHOD)
        }
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

    /// Keeps a sampled span for the next batch (at most `max_items` a batch; more are counted as
    /// lost).
    pub fn record_span(&mut self, span: Span) {
        if !self.keep_spans {
            return;
        }
        if self.spans.len() < self.bounds.max_items {
            self.spans.push(span);
        } else {
            self.lost_items += 1;
        }
    }

    /// Keeps an audit event for the next batch (at most `max_items` a batch, and a tenth of that
    /// from one source: a caller, a peer, a remote host; more are counted as lost). A peer making
    /// denied calls, or a host failing handshakes, as fast as it can would otherwise fill every
    /// batch and leave no room for the events of others.
    pub fn record_audit(&mut self, event: AuditEvent) {
        if self.audit.len() >= self.bounds.max_items {
            self.lost_items += 1;
            return;
        }
        if let Some(source) = audit_source(&event) {
            let held = self
                .audit_sources
                .entry(parts_hash(&self.keys, &[source], None))
                .or_default();
            if *held >= (self.bounds.max_items / 10).max(1) {
                self.lost_items += 1;
                return;
            }
            *held += 1;
        }
        self.audit.push(event);
    }

    /// Cuts a batch of everything recorded since the last one and queues it; returns its number.
    pub fn cut(&mut self, resources: Resources) -> u64 {
        self.call_series = 0;
        self.audit_sources.clear();
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
        if self.backlog.len() == self.bounds.max_batches {
            self.drop_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let batch = TelemetryBatch {
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
            folded: self.folded,
            lost_items: self.lost_items,
            tcp: std::mem::take(&mut self.tcp).into_values().collect(),
        };
        let size = encoded_size(&batch);
        self.backlog_bytes += size;
        self.backlog.push_back((batch, size));
        self.enforce_byte_bound();
        seq
    }

    /// Past the byte bound: spans go first (oldest batches first), then whole batches, oldest
    /// first; the newest batch is never dropped, and always carries the counts of what went.
    fn enforce_byte_bound(&mut self) {
        loop {
            self.sync_newest();
            if self.backlog_bytes <= self.bounds.max_bytes {
                return;
            }
            let with_spans = self.backlog.iter().position(|(b, _)| !b.spans.is_empty());
            match with_spans {
                Some(i) => self.strip_spans(i),
                None if self.backlog.len() > 1 => self.drop_oldest(),
                None => return,
            }
        }
    }

    fn strip_spans(&mut self, i: usize) {
        let Some((batch, size)) = self.backlog.get_mut(i) else {
            return;
        };
        self.lost_items += batch.spans.len() as u64;
        batch.spans = Vec::new();
        let smaller = encoded_size(batch);
        self.backlog_bytes = self.backlog_bytes - *size + smaller;
        *size = smaller;
    }

    /// The newest batch says what was lost so far.
    fn sync_newest(&mut self) {
        let (dropped, lost) = (self.dropped, self.lost_items);
        if let Some((last, size)) = self.backlog.back_mut()
            && (last.dropped != dropped || last.lost_items != lost)
        {
            last.dropped = dropped;
            last.lost_items = lost;
            let resized = encoded_size(last);
            self.backlog_bytes = self.backlog_bytes - *size + resized;
            *size = resized;
        }
    }

    fn drop_oldest(&mut self) {
        if let Some((_, size)) = self.backlog.pop_front() {
            self.backlog_bytes -= size;
            self.dropped += 1;
        }
    }

    /// Batches not yet acknowledged, oldest first.
    pub fn pending(&self) -> impl Iterator<Item = &TelemetryBatch> {
        self.backlog.iter().map(|(b, _)| b)
    }

    /// The encoded size of the batches not yet acknowledged.
    pub fn pending_bytes(&self) -> usize {
        self.backlog_bytes
    }

    /// The gateway stored every batch up to `seq`.
    pub fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.backlog.front().is_some_and(|(b, _)| b.seq <= seq) {
            self.drop_acked();
        }
    }

    /// The highest batch number the gateway acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    fn drop_acked(&mut self) {
        if let Some((_, size)) = self.backlog.pop_front() {
            self.backlog_bytes -= size;
        }
    }

    /// Calls counted under `_other` since start.
    pub fn folded(&self) -> u64 {
        self.folded
    }

    /// The number the next batch will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Whether calls were counted since the last cut.
    pub fn has_uncut_calls(&self) -> bool {
        !self.counters.is_empty()
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

/// The size of `batch` on the wire.
fn encoded_size(batch: &TelemetryBatch) -> usize {
    postcard::experimental::serialized_size(batch).unwrap_or(usize::MAX / 4)
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
    fn tcp_forwards_are_counted_per_listen_and_service_and_cut_as_deltas() {
        let mut t = Telemetry::new(10);
        t.record_tcp("127.0.0.1:1502", "plc", TcpEvent::Opened);
        t.record_tcp("127.0.0.1:1502", "plc", TcpEvent::Refused);
        t.record_tcp(
            "127.0.0.1:1502",
            "plc",
            TcpEvent::Bytes {
                to_service: 10,
                from_service: 20,
            },
        );
        t.record_tcp("127.0.0.1:1502", "plc", TcpEvent::Closed(ms(1500)));
        t.cut(Resources::default());
        let batch = t.pending().next().expect("a batch");
        assert_eq!(batch.tcp.len(), 1);
        let s = &batch.tcp[0];
        assert_eq!((s.opened, s.refused, s.closed), (1, 1, 1));
        assert_eq!((s.bytes_to_service, s.bytes_from_service), (10, 20));
        assert_eq!(s.duration_ms, 1500);
        // 1.5 s falls in the second bucket (<= 10 s).
        assert_eq!(s.buckets[..3], [0, 1, 0]);
        t.cut(Resources::default());
        assert!(t.pending().nth(1).expect("a second batch").tcp.is_empty());
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

    fn span(i: u64) -> Span {
        Span {
            trace_id: [1; 16],
            span_id: i.to_le_bytes(),
            parent_span_id: None,
            client: true,
            node: "a".into(),
            service: "s".into(),
            method: "m".into(),
            start_unix_us: i,
            duration_us: 1,
            status: Status::Ok,
        }
    }

    #[test]
    fn the_backlog_is_bounded_in_bytes_spans_first_then_batches_all_counted() {
        let mut t = Telemetry::with_bounds(Bounds {
            max_batches: 10_000,
            max_bytes: 20_000,
            max_series: 10,
            max_items: 1000,
        });
        // An hour of a busy node with no gateway: 100 spans and a call a batch.
        for i in 0..720 {
            t.record_call("s", "m", "a", "b", Status::Ok, ms(1));
            for j in 0..100 {
                t.record_span(span(i * 100 + j));
            }
            t.cut(Resources::default());
            assert!(t.pending_bytes() <= 20_000, "{} bytes", t.pending_bytes());
        }
        let last = t.pending().last().expect("newest");
        assert!(last.lost_items > 0, "the dropped spans were not counted");
        assert!(t.dropped() > 0, "batches had to go too");
        assert_eq!(last.dropped, t.dropped());
        // Spans went before counters: every kept batch has its calls and no spans.
        let kept: Vec<&TelemetryBatch> = t.pending().collect();
        assert!(kept.len() > 1);
        assert!(
            kept.iter()
                .all(|b| b.spans.is_empty() && b.calls.len() == 1)
        );
        // Every call is accounted for: counted in a kept batch, or in a dropped one.
        let counted: u64 = kept.iter().flat_map(|b| &b.calls).map(|c| c.count).sum();
        assert_eq!(counted + t.dropped(), 720);
    }

    #[test]
    fn key_hashes_are_seeded_so_a_peer_cannot_choose_colliding_names() {
        // The same names hash differently in two telemetries (FNV-1a, before, gave every node
        // the same hashes, and names colliding under it could be computed ahead).
        let (a, b) = (Telemetry::new(1), Telemetry::new(1));
        let parts = [
            "echo",
            "say",
            "spiffe://starling.local/node/a",
            "node-b",
            "ok",
        ];
        assert_ne!(
            parts_hash(&a.keys, &parts, None),
            parts_hash(&b.keys, &parts, None)
        );
        // Within one, a key hashes the same every time (counting finds its slot).
        assert_eq!(
            parts_hash(&a.keys, &parts, None),
            parts_hash(&a.keys, &parts, None)
        );
    }

    #[test]
    fn methods_past_the_series_bound_fold_into_other_and_are_counted() {
        let mut t = Telemetry::with_bounds(Bounds {
            max_series: 3,
            ..Bounds::default()
        });
        for i in 0..3000 {
            t.record_call("s", &format!("m{i}"), "a", "b", Status::Ok, ms(1));
        }
        t.record_call("s", "m0", "a", "b", Status::Ok, ms(1));
        t.cut(Resources::default());
        let batch = t.pending().next().expect("batch");
        assert_eq!(batch.calls.len(), 4, "three methods and _other");
        let other = batch
            .calls
            .iter()
            .find(|c| c.method == OTHER_METHOD)
            .expect("_other");
        assert_eq!(other.count, 2997);
        assert_eq!(batch.folded, 2997);
        assert_eq!(
            batch
                .calls
                .iter()
                .find(|c| c.method == "m0")
                .map(|c| c.count),
            Some(2)
        );
    }

    #[test]
    fn callees_naming_new_leaves_past_the_bound_are_other() {
        let mut t = Telemetry::with_bounds(Bounds {
            max_series: 2,
            ..Bounds::default()
        });
        let bound = 2 * CALL_SERIES_PER_PAIR;
        // A callee that names a new leaf in every answer.
        for i in 0..10_000 {
            t.record_call("s", "m", "a", &format!("b/leaf/x{i}"), Status::Ok, ms(1));
        }
        // A series counted before the bound is still its own.
        t.record_call("s", "m", "a", "b/leaf/x0", Status::Ok, ms(1));
        t.cut(Resources::default());
        let batch = t.pending().next().expect("batch");
        assert_eq!(batch.calls.len(), bound + 1, "the bound, and _other");
        let other = batch
            .calls
            .iter()
            .find(|c| c.callee == OTHER_METHOD)
            .expect("_other");
        assert_eq!(
            (other.caller.as_str(), other.method.as_str()),
            ("_other", "m")
        );
        assert_eq!(other.count, 10_000 - bound as u64);
        assert_eq!(batch.folded, 10_000 - bound as u64);
        let first = batch.calls.iter().find(|c| c.callee == "b/leaf/x0");
        assert_eq!(first.map(|c| c.count), Some(2));
        // Nor can it with upstream codes: past the bound, any code is one series.
        for code in 0..5_000u16 {
            t.record_call("s", "m", "a", "b/leaf/z", Status::Upstream(code), ms(1));
        }
        t.cut(Resources::default());
        let batch = t.pending().last().expect("batch");
        assert_eq!(
            batch.calls.len(),
            bound + 1,
            "the bound, and one folded code"
        );
        // The bound is per batch: the next one counts new series again.
        t.record_call("s", "m", "a", "b/leaf/y", Status::Ok, ms(1));
        t.cut(Resources::default());
        let next = t.pending().last().expect("batch");
        assert_eq!(next.calls[0].callee, "b/leaf/y");
    }

    #[test]
    fn one_source_takes_a_tenth_of_a_batchs_audit_events() {
        let mut t = Telemetry::with_bounds(Bounds {
            max_items: 100,
            ..Bounds::default()
        });
        let event = |kind: &str, fields: &[(&str, &str)]| AuditEvent {
            unix_ms: 0,
            kind: kind.into(),
            fields: fields
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
        };
        // A peer making denied calls as fast as it can, and a host failing handshakes from ever
        // new ports.
        for i in 0..1000 {
            t.record_audit(event("denied", &[("caller", "spiffe://td/node/noisy")]));
            let remote = format!("198.18.0.9:{}", 1000 + i);
            t.record_audit(event("identity_refused", &[("remote", &remote)]));
        }
        t.record_audit(event("denied", &[("caller", "spiffe://td/node/other")]));
        t.record_audit(event("policy_applied", &[("version", "7")]));
        t.cut(Resources::default());
        let batch = t.pending().next().expect("batch");
        let kinds = |kind: &str| batch.audit.iter().filter(|e| e.kind == kind).count();
        assert_eq!(
            kinds("denied"),
            11,
            "ten of the noisy peer's, and the other's"
        );
        assert_eq!(kinds("identity_refused"), 10);
        assert_eq!(kinds("policy_applied"), 1);
        assert_eq!(batch.lost_items, 1980);
        // Per batch: the next one takes the noisy peer's events again.
        t.record_audit(event("denied", &[("caller", "spiffe://td/node/noisy")]));
        t.cut(Resources::default());
        assert_eq!(t.pending().last().map(|b| b.audit.len()), Some(1));
    }

    #[test]
    fn no_spans_are_kept_when_no_gateway_could_take_them() {
        let mut t = Telemetry::new(10);
        t.keep_spans(false);
        t.record_span(span(1));
        t.cut(Resources::default());
        assert!(t.pending().all(|b| b.spans.is_empty()));
        assert_eq!(t.pending().last().map(|b| b.lost_items), Some(0));
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
