//! Telemetry aggregated from every node, rendered as Prometheus text on `/metrics`.
//!
//! Counts are the callers' (every call is counted once, by the node that made it). Batches carry
//! sequence numbers within one incarnation of a node (its boot id): one already stored is
//! acknowledged again and ignored, so a node that resends its backlog after a reconnect is never
//! counted twice, and a restarted node's numbers start afresh instead of being taken for resends.
//! What a node lost (its backlog overflowed, a previous incarnation died with batches unsent) is a
//! counted gap.
//!
//! Series are bounded per node ([`MAX_SERIES_PER_NODE`] (service, method) pairs): a node that
//! reports more (a caller inventing method names) has the rest folded into `method="_other"`, and
//! the folding is counted. What a node says of callers and callees is bounded too
//! ([`MAX_CALL_SERIES_PER_NODE`] series of its making): past it, a new series is `_other` in all
//! but its status.
//!
//! Label values are kept once, shared by every series that has them: with 10,000 nodes calling
//! the same services, a series costs its map entry and counts, not five strings of its own.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use mesh_proto::control::{
    BundleRef, LATENCY_BUCKETS_US, Resources, TCP_DURATION_BUCKETS_S, TcpStats, TelemetryBatch,
};

use crate::registry::NodeRecord;
use std::sync::Arc;

/// A label value, shared by every series that has it.
type Name = Arc<str>;

/// (service, method, caller, callee, status).
type Key = (Name, Name, Name, Name, Name);

#[derive(Debug, Clone, Default)]
struct Acc {
    count: u64,
    sum_us: u64,
    buckets: Vec<u64>,
}

/// (service, method) pairs kept per node; more are folded into `_other`.
pub const MAX_SERIES_PER_NODE: usize = 1024;

/// Call series (a pair with a caller, a callee and a status) a node may add; past them a call
/// in a new series is counted under `_other` for all four, with its status only. A node reports
/// what it likes there: without a bound, one inventing a caller name a call would grow the
/// gateway's memory without end.
pub const MAX_CALL_SERIES_PER_NODE: usize = 4 * MAX_SERIES_PER_NODE;

#[derive(Debug, Clone, Default)]
struct PerNode {
    /// The incarnation batches are counted for now.
    boot_id: u64,
    last_seq: u64,
    /// Batches lost by incarnations before this one.
    gap_before: u64,
    /// What this incarnation said the one before it lost.
    lost_at_restart: u64,
    /// Batches this incarnation dropped (its backlog overflowed).
    gap_now: u64,
    /// Calls the node folded into `_other`, as it last reported.
    folded_by_node: u64,
    /// Calls the gateway folded into `_other`.
    folded_here: u64,
    /// Spans and audit events the node lost, as it last reported.
    lost_items: u64,
    /// Its (service, method) pairs, sorted (a node has a few: a vector is a tenth of a tree's
    /// first node).
    series: Vec<(Name, Name)>,
    /// Call series it added.
    call_series: usize,
    resources: Resources,
}

/// Aggregated telemetry.
#[derive(Debug, Default)]
pub struct Metrics {
    calls: BTreeMap<Key, Acc>,
    nodes: BTreeMap<String, PerNode>,
    rules: BTreeMap<(String, String, String), u64>,
    /// TCP forwards, by (node, listen, service): the sums of their deltas.
    tcp: BTreeMap<(String, String, String), TcpStats>,
    /// Every label value of `calls` and `nodes[_].series`, once. Only values a kept series has
    /// are added.
    names: std::collections::HashSet<Name>,
}

/// The shared copy of `value`, added if there is none.
fn intern(names: &mut std::collections::HashSet<Name>, value: &str) -> Name {
    if let Some(name) = names.get(value) {
        return name.clone();
    }
    let name: Name = Arc::from(value);
    names.insert(name.clone());
    name
}

impl Metrics {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A node's control stream opened: incarnation `boot_id`, which says its previous one lost
    /// `lost_at_restart` batches.
    pub fn handle_hello(&mut self, node: &str, boot_id: u64, lost_at_restart: u64) {
        let per = self.nodes.entry(node.to_owned()).or_default();
        if per.boot_id == boot_id {
            return;
        }
        // A new incarnation: its numbers start afresh; what the last one lost stays counted.
        per.gap_before += per.gap_now + lost_at_restart;
        per.gap_now = 0;
        per.lost_at_restart = lost_at_restart;
        per.boot_id = boot_id;
        per.last_seq = 0;
    }

    /// Adds `batch` from `node`; false if it was already stored (a resend).
    pub fn handle_batch(&mut self, node: &str, batch: &TelemetryBatch) -> bool {
        let per = self.nodes.entry(node.to_owned()).or_default();
        if batch.seq <= per.last_seq {
            return false;
        }
        per.last_seq = batch.seq;
        per.gap_now = per.gap_now.max(batch.dropped);
        per.folded_by_node = per.folded_by_node.max(batch.folded);
        per.lost_items = per.lost_items.max(batch.lost_items);
        per.resources = batch.resources;
        for r in &batch.rules {
            // Rule names come from the policy; a node that reports others gets a bounded count.
            let key = (node.to_owned(), r.rule.clone(), r.action.clone());
            let known = self.rules.contains_key(&key);
            let per_node = self
                .rules
                .range((node.to_owned(), String::new(), String::new())..)
                .take_while(|((n, _, _), _)| n == node)
                .count();
            let key = if known || per_node < MAX_SERIES_PER_NODE {
                key
            } else {
                let other = mesh_core::telemetry::OTHER_METHOD.to_owned();
                (node.to_owned(), other.clone(), other)
            };
            let count = self.rules.entry(key).or_default();
            *count = count.saturating_add(r.count);
        }
        for t in &batch.tcp {
            let key = (node.to_owned(), t.listen.clone(), t.service.clone());
            // Forwards come from a node's config; one that reports more gets a bounded count.
            let per_node = self
                .tcp
                .range((node.to_owned(), String::new(), String::new())..)
                .take_while(|((n, _, _), _)| n == node)
                .count();
            let key = if self.tcp.contains_key(&key) || per_node < MAX_SERIES_PER_NODE {
                key
            } else {
                let other = mesh_core::telemetry::OTHER_METHOD.to_owned();
                (node.to_owned(), other.clone(), other)
            };
            let acc = self.tcp.entry(key).or_insert_with(|| TcpStats {
                buckets: vec![0; TCP_DURATION_BUCKETS_S.len() + 1],
                ..TcpStats::default()
            });
            // A node's numbers are input: sums saturate rather than overflow.
            acc.opened = acc.opened.saturating_add(t.opened);
            acc.closed = acc.closed.saturating_add(t.closed);
            acc.refused = acc.refused.saturating_add(t.refused);
            acc.bytes_to_service = acc.bytes_to_service.saturating_add(t.bytes_to_service);
            acc.bytes_from_service = acc.bytes_from_service.saturating_add(t.bytes_from_service);
            acc.duration_ms = acc.duration_ms.saturating_add(t.duration_ms);
            for (a, b) in acc.buckets.iter_mut().zip(&t.buckets) {
                *a = a.saturating_add(*b);
            }
        }
        let names = &mut self.names;
        for c in &batch.calls {
            let other = mesh_core::telemetry::OTHER_METHOD;
            // Counts are a node's word: sums saturate rather than overflow, and a call folded
            // by both bounds is counted as folded once.
            let mut folded = false;
            let wanted = (c.service.as_str(), c.method.as_str());
            let (service, method) = match per
                .series
                .binary_search_by(|(s, m)| (&**s, &**m).cmp(&wanted))
            {
                Ok(at) => per.series[at].clone(),
                Err(at) if per.series.len() < MAX_SERIES_PER_NODE => {
                    let pair = (intern(names, &c.service), intern(names, &c.method));
                    per.series.insert(at, pair.clone());
                    pair
                }
                Err(_) => {
                    folded = true;
                    match per.series.iter().find(|(s, _)| **s == *c.service) {
                        Some((service, _)) => (service.clone(), intern(names, other)),
                        None => (intern(names, other), intern(names, other)),
                    }
                }
            };
            let status = intern(names, c.status.as_str());
            // A series that exists has every name shared already; one that does not is added
            // while the node is within its bound, and named `_other` past it.
            let existing = match (names.get(c.caller.as_str()), names.get(c.callee.as_str())) {
                (Some(caller), Some(callee)) => Some((
                    service.clone(),
                    method.clone(),
                    caller.clone(),
                    callee.clone(),
                    status.clone(),
                ))
                .filter(|key| self.calls.contains_key(key)),
                _ => None,
            };
            let key = match existing {
                Some(key) => key,
                None if per.call_series < MAX_CALL_SERIES_PER_NODE => {
                    per.call_series += 1;
                    let (caller, callee) = (intern(names, &c.caller), intern(names, &c.callee));
                    (service, method, caller, callee, status)
                }
                // Past the bound, the call keeps only its status: a node adds at most a series
                // per status more, whatever it names.
                None => {
                    folded = true;
                    let other = intern(names, other);
                    (other.clone(), other.clone(), other.clone(), other, status)
                }
            };
            if folded {
                per.folded_here = per.folded_here.saturating_add(c.count);
            }
            let acc = self.calls.entry(key).or_insert_with(|| Acc {
                buckets: vec![0; LATENCY_BUCKETS_US.len() + 1],
                ..Acc::default()
            });
            acc.count = acc.count.saturating_add(c.count);
            acc.sum_us = acc.sum_us.saturating_add(c.sum_us);
            for (a, b) in acc.buckets.iter_mut().zip(&c.buckets) {
                *a = a.saturating_add(*b);
            }
        }
        true
    }

    /// Calls so far by service and by (caller, callee): counts, failures and latency buckets.
    pub fn aggregates(&self) -> Aggregates {
        let mut out = Aggregates::default();
        for ((service, _, caller, callee, status), acc) in &self.calls {
            let failed = if failed_status(status) { acc.count } else { 0 };
            for agg in [
                out.services.entry(service.clone()).or_default(),
                out.edges
                    .entry((caller.clone(), callee.clone()))
                    .or_default(),
            ] {
                agg.add(acc.count, failed, &acc.buckets);
            }
        }
        out
    }

    /// What `node` last said of its resource use.
    pub fn resources(&self, node: &str) -> Option<Resources> {
        self.nodes.get(node).map(|n| n.resources)
    }

    /// Total calls stored, for tests and the demo.
    pub fn total_calls(&self) -> u64 {
        self.calls.values().map(|a| a.count).sum()
    }

    /// The incarnation of `node` whose batches are counted now (0: none yet).
    pub fn boot_id(&self, node: &str) -> u64 {
        self.nodes.get(node).map_or(0, |n| n.boot_id)
    }

    /// What the incarnation of `node` counted now said its previous one lost, in batches.
    pub fn lost_at_restart(&self, node: &str) -> u64 {
        self.nodes.get(node).map_or(0, |n| n.lost_at_restart)
    }

    /// The newest batch stored from the incarnation of `node` counted now (0: none yet).
    pub fn last_seq(&self, node: &str) -> u64 {
        self.nodes.get(node).map_or(0, |n| n.last_seq)
    }

    /// Telemetry batches `node` lost, over all its incarnations.
    pub fn gap(&self, node: &str) -> u64 {
        self.nodes.get(node).map_or(0, |n| n.gap_before + n.gap_now)
    }

    /// Prometheus text exposition (version 0.0.4), with `nodes` from [`crate::registry::Registry::snapshot`].
    pub fn render(&self, nodes: &[Arc<NodeRecord>], latest: Option<&BundleRef>) -> String {
        let latest_policy = latest.map_or(0, |b| b.version);
        let mut out = String::with_capacity(4096);
        let _ = writeln!(
            out,
            "# HELP starling_requests_total Calls made through the mesh, counted by the calling node.\n\
             # TYPE starling_requests_total counter"
        );
        for ((service, method, caller, callee, status), acc) in &self.calls {
            let labels = call_labels(service, method, caller, callee, status);
            let _ = writeln!(out, "starling_requests_total{{{labels}}} {}", acc.count);
        }
        let _ = writeln!(
            out,
            "# HELP starling_request_duration_seconds Call latency as the caller saw it.\n\
             # TYPE starling_request_duration_seconds histogram"
        );
        for ((service, method, caller, callee, status), acc) in &self.calls {
            let labels = call_labels(service, method, caller, callee, status);
            let mut cumulative = 0;
            for (i, bound) in LATENCY_BUCKETS_US.iter().enumerate() {
                cumulative += acc.buckets.get(i).copied().unwrap_or(0);
                let le = *bound as f64 / 1e6;
                let _ = writeln!(
                    out,
                    "starling_request_duration_seconds_bucket{{{labels},le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "starling_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}\n\
                 starling_request_duration_seconds_sum{{{labels}}} {}\n\
                 starling_request_duration_seconds_count{{{labels}}} {}",
                acc.count,
                acc.sum_us as f64 / 1e6,
                acc.count
            );
        }
        let gauge = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        gauge(
            &mut out,
            "starling_node_up",
            "gauge",
            "1 while the node's control stream is up.",
        );
        for n in nodes {
            let _ = writeln!(
                out,
                "starling_node_up{{node=\"{}\"}} {}",
                esc(&n.name),
                u8::from(n.up)
            );
        }
        gauge(
            &mut out,
            "starling_node_info",
            "gauge",
            "Constant 1, labelled with what a node is.",
        );
        for n in nodes {
            let _ = writeln!(
                out,
                "starling_node_info{{node=\"{}\",id=\"{}\",version=\"{}\",role=\"{}\"}} 1",
                esc(&n.name),
                esc(&n.id),
                esc(&n.version),
                esc(&n.role)
            );
        }
        gauge(
            &mut out,
            "starling_cert_expiry_seconds",
            "gauge",
            "Seconds until a node's certificate expires, as verified on its control stream (negative: expired).",
        );
        let now = std::time::SystemTime::now();
        for n in nodes {
            if let Some(cert) = &n.certificate {
                let left = match cert.not_after.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                };
                let _ = writeln!(
                    out,
                    "starling_cert_expiry_seconds{{node=\"{}\"}} {left}",
                    esc(&n.name)
                );
            }
        }
        gauge(
            &mut out,
            "starling_policy_version",
            "gauge",
            "Policy bundle version a node applied.",
        );
        for n in nodes {
            let _ = writeln!(
                out,
                "starling_policy_version{{node=\"{}\"}} {}",
                esc(&n.name),
                n.policy_version
            );
        }
        gauge(
            &mut out,
            "starling_policy_latest_version",
            "gauge",
            "Newest policy bundle version the gateway holds.",
        );
        let _ = writeln!(out, "starling_policy_latest_version {latest_policy}");
        gauge(
            &mut out,
            "starling_policy_current",
            "gauge",
            "1 when a node holds exactly the gateway's bundle (same epoch and hash).",
        );
        for n in nodes {
            let current = latest.is_some_and(|l| n.policy.as_ref() == Some(l));
            let _ = writeln!(
                out,
                "starling_policy_current{{node=\"{}\"}} {}",
                esc(&n.name),
                u8::from(current)
            );
        }
        gauge(
            &mut out,
            "starling_policy_error",
            "gauge",
            "1 when a node refused the latest bundle, or applied it without saving it (see /v1/policy/status).",
        );
        for n in nodes {
            let _ = writeln!(
                out,
                "starling_policy_error{{node=\"{}\"}} {}",
                esc(&n.name),
                u8::from(n.policy_error.is_some())
            );
        }
        gauge(
            &mut out,
            "starling_policy_damaged",
            "gauge",
            "1 when a node found its saved bundle damaged and refuses every call until it gets a good one.",
        );
        for n in nodes {
            let _ = writeln!(
                out,
                "starling_policy_damaged{{node=\"{}\"}} {}",
                esc(&n.name),
                u8::from(n.policy_damaged)
            );
        }
        gauge(
            &mut out,
            "starling_node_resident_memory_bytes",
            "gauge",
            "Resident memory of a node.",
        );
        for (node, p) in &self.nodes {
            let _ = writeln!(
                out,
                "starling_node_resident_memory_bytes{{node=\"{}\"}} {}",
                esc(node),
                p.resources.rss_bytes
            );
        }
        gauge(
            &mut out,
            "starling_node_cpu_seconds_total",
            "counter",
            "CPU time a node used.",
        );
        for (node, p) in &self.nodes {
            let _ = writeln!(
                out,
                "starling_node_cpu_seconds_total{{node=\"{}\"}} {}",
                esc(node),
                p.resources.cpu_ms as f64 / 1e3
            );
        }
        gauge(
            &mut out,
            "starling_node_connections",
            "gauge",
            "Open QUIC connections of a node.",
        );
        for (node, p) in &self.nodes {
            let _ = writeln!(
                out,
                "starling_node_connections{{node=\"{}\"}} {}",
                esc(node),
                p.resources.connections
            );
        }
        gauge(
            &mut out,
            "starling_policy_rule_total",
            "counter",
            "Decisions of policy rules: allowed, denied, audited, mirrored, retried, ejected, rate_limited.",
        );
        for ((node, rule, action), count) in &self.rules {
            let _ = writeln!(
                out,
                "starling_policy_rule_total{{node=\"{}\",rule=\"{}\",action=\"{}\"}} {count}",
                esc(node),
                esc(rule),
                esc(action)
            );
        }
        self.render_tcp(&mut out);
        gauge(
            &mut out,
            "starling_telemetry_gap_total",
            "counter",
            "Telemetry batches a node lost: its backlog was full while the gateway was away, or it died with batches unsent.",
        );
        for (node, p) in &self.nodes {
            let _ = writeln!(
                out,
                "starling_telemetry_gap_total{{node=\"{}\"}} {}",
                esc(node),
                p.gap_before + p.gap_now
            );
        }
        gauge(
            &mut out,
            "starling_telemetry_folded_total",
            "counter",
            "Calls counted under \"_other\" (as method, or as caller and callee) because a node's series bound was reached.",
        );
        for (node, p) in &self.nodes {
            let _ = writeln!(
                out,
                "starling_telemetry_folded_total{{node=\"{}\"}} {}",
                esc(node),
                p.folded_by_node + p.folded_here
            );
        }
        gauge(
            &mut out,
            "starling_telemetry_lost_items_total",
            "counter",
            "Sampled spans and audit events a node dropped (a batch was full, or its backlog reached its byte bound).",
        );
        for (node, p) in &self.nodes {
            let _ = writeln!(
                out,
                "starling_telemetry_lost_items_total{{node=\"{}\"}} {}",
                esc(node),
                p.lost_items
            );
        }
        out
    }
}

/// Whether a call status (as the metrics name it) is a failure: `mesh_proto::Status::is_failure`,
/// with every upstream error (the series do not keep the upstream's code).
pub fn failed_status(status: &str) -> bool {
    matches!(
        status,
        "unavailable" | "internal" | "deadline_exceeded" | "upstream"
    )
}

/// Calls added up: how many, how many failed, per latency bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Agg {
    /// Calls.
    pub count: u64,
    /// Failed calls.
    pub failed: u64,
    /// Calls per latency bucket ([`LATENCY_BUCKETS_US`], then one for slower).
    pub buckets: Vec<u64>,
}

impl Agg {
    fn add(&mut self, count: u64, failed: u64, buckets: &[u64]) {
        self.count = self.count.saturating_add(count);
        self.failed = self.failed.saturating_add(failed);
        if self.buckets.len() < buckets.len() {
            self.buckets.resize(buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(buckets) {
            *a = a.saturating_add(*b);
        }
    }

    /// What was added since `earlier` (the same series, counted before).
    pub fn since(&self, earlier: Option<&Agg>) -> Agg {
        let Some(e) = earlier else {
            return self.clone();
        };
        Agg {
            count: self.count.saturating_sub(e.count),
            failed: self.failed.saturating_sub(e.failed),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, b)| b.saturating_sub(e.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }

    /// The latency quantile `q` (0..1) in seconds: the upper bound of the bucket it falls in
    /// (the slowest bucket's lower bound when it falls past the last bound); none without calls.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
        if total == 0 {
            return None;
        }
        let wanted = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen: u64 = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen = seen.saturating_add(*b);
            if seen >= wanted {
                let bound = LATENCY_BUCKETS_US
                    .get(i)
                    .or(LATENCY_BUCKETS_US.last())
                    .copied()
                    .unwrap_or(0);
                return Some(bound as f64 / 1e6);
            }
        }
        None
    }
}

/// Calls by service and by (caller, callee).
#[derive(Debug, Clone, Default)]
pub struct Aggregates {
    /// By service.
    pub services: BTreeMap<Arc<str>, Agg>,
    /// By (caller, callee); the callee is empty when no endpoint took the call.
    pub edges: BTreeMap<(Arc<str>, Arc<str>), Agg>,
}

impl Metrics {
    /// The TCP forward series: connections by event, bytes by direction, durations.
    fn render_tcp(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP starling_tcp_connections_total Connections of a node's TCP forwards: opened (a tunnel to an endpoint), closed, refused (no endpoint, denied, rate limited, upstream unreachable).\n\
             # TYPE starling_tcp_connections_total counter"
        );
        let labels = |(node, listen, service): &(String, String, String)| {
            format!(
                "node=\"{}\",listen=\"{}\",service=\"{}\"",
                esc(node),
                esc(listen),
                esc(service)
            )
        };
        for (key, t) in &self.tcp {
            let l = labels(key);
            for (event, n) in [
                ("opened", t.opened),
                ("closed", t.closed),
                ("refused", t.refused),
            ] {
                let _ = writeln!(
                    out,
                    "starling_tcp_connections_total{{{l},event=\"{event}\"}} {n}"
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP starling_tcp_bytes_total Bytes carried by a node's TCP forwards: to_service (from the local client) and from_service.\n\
             # TYPE starling_tcp_bytes_total counter"
        );
        for (key, t) in &self.tcp {
            let l = labels(key);
            let _ = writeln!(
                out,
                "starling_tcp_bytes_total{{{l},direction=\"to_service\"}} {}\n\
                 starling_tcp_bytes_total{{{l},direction=\"from_service\"}} {}",
                t.bytes_to_service, t.bytes_from_service
            );
        }
        let _ = writeln!(
            out,
            "# HELP starling_tcp_connection_duration_seconds How long the connections of a node's TCP forwards lasted.\n\
             # TYPE starling_tcp_connection_duration_seconds histogram"
        );
        for (key, t) in &self.tcp {
            let l = labels(key);
            // The histogram's total is its buckets' (the last one included), so it is monotonic
            // whatever a node reports.
            let all = t.buckets.iter().fold(0u64, |a, b| a.saturating_add(*b));
            let mut cumulative: u64 = 0;
            for (i, bound) in TCP_DURATION_BUCKETS_S.iter().enumerate() {
                cumulative = cumulative.saturating_add(t.buckets.get(i).copied().unwrap_or(0));
                let _ = writeln!(
                    out,
                    "starling_tcp_connection_duration_seconds_bucket{{{l},le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "starling_tcp_connection_duration_seconds_bucket{{{l},le=\"+Inf\"}} {all}\n\
                 starling_tcp_connection_duration_seconds_sum{{{l}}} {}\n\
                 starling_tcp_connection_duration_seconds_count{{{l}}} {all}",
                t.duration_ms as f64 / 1e3,
            );
        }
    }
}

fn call_labels(service: &str, method: &str, caller: &str, callee: &str, status: &str) -> String {
    format!(
        "service=\"{}\",method=\"{}\",caller=\"{}\",callee=\"{}\",status=\"{}\"",
        esc(service),
        esc(method),
        esc(caller),
        esc(callee),
        esc(status)
    )
}

/// Escapes a Prometheus label value.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;
    use mesh_proto::Status;
    use mesh_proto::control::CallStats;

    fn batch(seq: u64, count: u64) -> TelemetryBatch {
        let mut buckets = vec![0; LATENCY_BUCKETS_US.len() + 1];
        buckets[3] = count;
        TelemetryBatch {
            seq,
            dropped: 0,
            calls: vec![CallStats {
                service: "echo".into(),
                method: "say".into(),
                caller: "a".into(),
                callee: "b".into(),
                status: Status::Ok,
                count,
                sum_us: count * 800,
                buckets,
            }],
            resources: Resources::default(),
            spans: vec![],
            audit: vec![],
            rules: vec![],
            folded: 0,
            lost_items: 0,
            tcp: vec![],
        }
    }

    #[test]
    fn a_restarted_node_is_counted_afresh_and_its_losses_are_a_gap() {
        let mut m = Metrics::new();
        m.handle_hello("a", 11, 0);
        assert!(m.handle_batch("a", &batch(1, 5)));
        assert!(m.handle_batch("a", &batch(2, 5)));
        // The node restarts: its numbers start at 1 again, and its previous life lost 2 batches.
        m.handle_hello("a", 22, 2);
        assert!(m.handle_batch("a", &batch(1, 40)), "taken for a resend");
        assert_eq!(m.total_calls(), 50);
        assert_eq!(m.gap("a"), 2);
        // A reconnect of the same incarnation still deduplicates.
        m.handle_hello("a", 22, 0);
        assert!(!m.handle_batch("a", &batch(1, 40)));
        assert_eq!(m.gap("a"), 2);
    }

    #[test]
    fn series_past_the_bound_fold_into_other() {
        let mut m = Metrics::new();
        let mut b = batch(1, 1);
        b.calls = (0..MAX_SERIES_PER_NODE + 10)
            .map(|i| CallStats {
                method: format!("m{i}"),
                ..b.calls[0].clone()
            })
            .collect();
        m.handle_batch("a", &b);
        let reg = Registry::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(2),
        );
        let text = m.render(&reg.snapshot(), None);
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("starling_requests_total{"))
                .count(),
            MAX_SERIES_PER_NODE + 1
        );
        assert!(text.contains("method=\"_other\""), "{text}");
        assert!(text.contains("starling_telemetry_folded_total{node=\"a\"} 10\n"));
    }

    #[test]
    fn callers_a_node_invents_past_the_bound_are_other() {
        let mut m = Metrics::new();
        let mut b = batch(1, 1);
        b.calls = (0..MAX_CALL_SERIES_PER_NODE + 10)
            .map(|i| CallStats {
                caller: format!("invented-{i}"),
                ..b.calls[0].clone()
            })
            .collect();
        m.handle_batch("a", &b);
        // Again, with others: nothing more is kept, and no name is.
        b.seq = 2;
        for c in &mut b.calls {
            c.callee = format!("{}-callee", c.caller);
        }
        m.handle_batch("a", &b);
        assert_eq!(m.calls.len(), MAX_CALL_SERIES_PER_NODE + 1);
        assert!(
            m.names.len() <= MAX_CALL_SERIES_PER_NODE + 6,
            "{} names kept",
            m.names.len()
        );
        // 10 past the bound the first time, every one the second (their callees are new).
        let folded = 10 + MAX_CALL_SERIES_PER_NODE + 10;
        let other = format!("caller=\"_other\",callee=\"_other\",status=\"ok\"}} {folded}\n");
        let text = m.render(&[], None);
        assert!(text.contains(&other), "no {other}");
        assert!(text.contains(&format!(
            "starling_telemetry_folded_total{{node=\"a\"}} {folded}\n"
        )));
        // A series the node has is still counted as itself.
        b.seq = 3;
        b.calls.truncate(1);
        b.calls[0].callee = "b".into();
        m.handle_batch("a", &b);
        assert!(
            m.render(&[], None)
                .contains("caller=\"invented-0\",callee=\"b\",status=\"ok\"} 2\n")
        );
    }

    #[test]
    fn a_call_past_both_bounds_is_folded_once_and_counts_saturate() {
        let mut m = Metrics::new();
        let mut b = batch(1, 1);
        // Every pair the node may have, each with a caller of its own: both bounds are reached.
        b.calls = (0..MAX_CALL_SERIES_PER_NODE)
            .map(|i| CallStats {
                method: format!("m{}", i % MAX_SERIES_PER_NODE),
                caller: format!("c{i}"),
                ..b.calls[0].clone()
            })
            .collect();
        m.handle_batch("a", &b);
        assert_eq!(m.calls.len(), MAX_CALL_SERIES_PER_NODE);
        b.seq = 2;
        b.calls = vec![CallStats {
            method: "new".into(),
            caller: "new".into(),
            count: 5,
            ..b.calls[0].clone()
        }];
        m.handle_batch("a", &b);
        assert!(
            m.render(&[], None)
                .contains("starling_telemetry_folded_total{node=\"a\"} 5\n"),
            "folded once"
        );
        // A node's counts near the top: sums saturate, without a panic.
        for seq in [3, 4] {
            b.seq = seq;
            b.calls[0].count = u64::MAX - 1;
            m.handle_batch("a", &b);
        }
        let text = m.render(&[], None);
        let max = u64::MAX;
        assert!(
            text.contains(&format!(
                "starling_telemetry_folded_total{{node=\"a\"}} {max}\n"
            )),
            "saturating"
        );
        let other = "service=\"_other\",method=\"_other\",caller=\"_other\",callee=\"_other\"";
        assert!(
            text.contains(&format!(
                "starling_requests_total{{{other},status=\"ok\"}} {max}\n"
            )),
            "{}",
            text.lines()
                .filter(|l| l.contains("_other"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert_eq!(m.calls.len(), MAX_CALL_SERIES_PER_NODE + 1);
    }

    #[test]
    fn label_values_are_kept_once_for_every_series() {
        let mut m = Metrics::new();
        for (seq, node) in [(1, "a"), (1, "b")] {
            let mut b = batch(seq, 1);
            b.calls[0].caller = node.into();
            m.handle_batch(node, &b);
        }
        let keys: Vec<&Key> = m.calls.keys().collect();
        assert_eq!(keys.len(), 2);
        assert!(Arc::ptr_eq(&keys[0].0, &keys[1].0), "one \"echo\"");
        assert!(Arc::ptr_eq(&keys[0].3, &keys[1].3), "one \"b\"");
        assert!(Arc::ptr_eq(&keys[0].0, &m.nodes["b"].series[0].0));
        // echo, say, ok; the callers a and b; b is the callee too.
        assert_eq!(m.names.len(), 5, "{:?}", m.names);
    }

    #[test]
    fn tcp_forwards_are_summed_per_node_listen_and_service() {
        let mut m = Metrics::new();
        let mut b = batch(1, 1);
        let mut buckets = vec![0; TCP_DURATION_BUCKETS_S.len() + 1];
        buckets[1] = 2;
        b.tcp = vec![TcpStats {
            listen: "127.0.0.1:1502".into(),
            service: "plc".into(),
            opened: 2,
            closed: 2,
            refused: 1,
            bytes_to_service: 100,
            bytes_from_service: 300,
            duration_ms: 5000,
            buckets,
        }];
        m.handle_batch("a", &b);
        b.seq = 2;
        m.handle_batch("a", &b);
        let reg = Registry::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(2),
        );
        let text = m.render(&reg.snapshot(), None);
        let l = "node=\"a\",listen=\"127.0.0.1:1502\",service=\"plc\"";
        for line in [
            format!("starling_tcp_connections_total{{{l},event=\"opened\"}} 4\n"),
            format!("starling_tcp_connections_total{{{l},event=\"refused\"}} 2\n"),
            format!("starling_tcp_bytes_total{{{l},direction=\"to_service\"}} 200\n"),
            format!("starling_tcp_bytes_total{{{l},direction=\"from_service\"}} 600\n"),
            format!("starling_tcp_connection_duration_seconds_bucket{{{l},le=\"1\"}} 0\n"),
            format!("starling_tcp_connection_duration_seconds_bucket{{{l},le=\"10\"}} 4\n"),
            format!("starling_tcp_connection_duration_seconds_sum{{{l}}} 10\n"),
            format!("starling_tcp_connection_duration_seconds_count{{{l}}} 4\n"),
        ] {
            assert!(text.contains(&line), "no {line} in\n{text}");
        }
    }

    #[test]
    fn resends_are_not_counted_twice() {
        let mut m = Metrics::new();
        assert!(m.handle_batch("a", &batch(1, 5)));
        assert!(m.handle_batch("a", &batch(2, 3)));
        assert!(!m.handle_batch("a", &batch(2, 3)));
        assert!(!m.handle_batch("a", &batch(1, 5)));
        assert_eq!(m.total_calls(), 8);
    }

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let mut m = Metrics::new();
        m.handle_batch("a", &batch(1, 4));
        let reg = Registry::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(2),
        );
        let latest = BundleRef {
            epoch: 1,
            version: 7,
            hash: [0; 32],
        };
        let text = m.render(&reg.snapshot(), Some(&latest));
        let labels = "service=\"echo\",method=\"say\",caller=\"a\",callee=\"b\",status=\"ok\"";
        assert!(
            text.contains(&format!("starling_requests_total{{{labels}}} 4\n")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "starling_request_duration_seconds_bucket{{{labels},le=\"0.0005\"}} 0\n"
        )));
        assert!(text.contains(&format!(
            "starling_request_duration_seconds_bucket{{{labels},le=\"0.001\"}} 4\n"
        )));
        assert!(text.contains(&format!(
            "starling_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 4\n"
        )));
        assert!(text.contains("starling_policy_latest_version 7\n"));
        assert!(text.contains("starling_telemetry_gap_total{node=\"a\"} 0\n"));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
