//! The bodies of the messages the site sends up (their schemas are in docs/CLOUD.md). The
//! bridge adds `seq`, `at_ms`, `gateway` and `gaps` to each.

use std::collections::BTreeMap;

use mesh_proto::control::{BundleRef, LATENCY_BUCKETS_US, TelemetryBatch};
use serde_json::{Map, Value, json};

use crate::registry::NodeRecord;

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}

/// The latency under which a `q` share of the calls of a histogram finished (the upper bound of
/// the bucket the quantile falls in), µs; `None` when it falls past the last bound or there are
/// no calls.
pub fn quantile_us(buckets: &[u64], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return LATENCY_BUCKETS_US.get(i).copied();
        }
    }
    None
}

/// `telemetry`: one node's batch, as deltas since its previous one. `(node, node_boot,
/// node_seq)` names the batch: a node resends a batch the gateway took but died before
/// acknowledging, and a consumer counts it once by that key. What the node lost is a counted
/// gap, in batches: `node_dropped_batches` (this incarnation's backlog overflowed, a running
/// total) and `node_lost_at_restart` (what the incarnation before `node_boot` cut and never had
/// acknowledged, plus the interval it was recording if it died).
pub fn telemetry(
    node: &str,
    boot_id: u64,
    lost_at_restart: u64,
    batch: &TelemetryBatch,
) -> Map<String, Value> {
    let calls: Vec<Value> = batch
        .calls
        .iter()
        .map(|c| {
            json!({
                "service": c.service,
                "method": c.method,
                "caller": c.caller,
                "callee": c.callee,
                "status": c.status.as_str(),
                "count": c.count,
                "sum_us": c.sum_us,
                "p50_us": quantile_us(&c.buckets, 0.5),
                "p90_us": quantile_us(&c.buckets, 0.9),
                "p99_us": quantile_us(&c.buckets, 0.99),
            })
        })
        .collect();
    object(json!({
        "node": node,
        "node_boot": boot_id,
        "node_seq": batch.seq,
        "node_dropped_batches": batch.dropped,
        "node_lost_at_restart": lost_at_restart,
        "calls": calls,
        "resources": {
            "rss_bytes": batch.resources.rss_bytes,
            "cpu_ms": batch.resources.cpu_ms,
            "connections": batch.resources.connections,
        },
    }))
}

/// `policy/status`: node `node` acknowledged (`reason` none) or refused `bundle`.
pub fn policy_answer(node: &str, bundle: &BundleRef, reason: Option<&str>) -> Map<String, Value> {
    object(json!({
        "kind": if reason.is_some() { "nack" } else { "ack" },
        "node": node,
        "version": bundle.version,
        "epoch": bundle.epoch,
        "hash": mesh_core::token::hex(&bundle.hash),
        "reason": reason,
    }))
}

/// `policy/status`: the gateway serves `bundle` from now on.
pub fn rollout(bundle: &BundleRef) -> Map<String, Value> {
    object(json!({
        "kind": "rollout",
        "version": bundle.version,
        "epoch": bundle.epoch,
        "hash": mesh_core::token::hex(&bundle.hash),
    }))
}

/// What the cloud is told of the registry: every node, without what changes on every
/// heartbeat.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RegistryView {
    nodes: BTreeMap<String, Value>,
    up: BTreeMap<String, bool>,
}

impl RegistryView {
    /// The registry now, from a [`crate::registry::Registry::snapshot`].
    pub fn of(nodes: &[std::sync::Arc<NodeRecord>]) -> RegistryView {
        let mut view = RegistryView::default();
        for n in nodes {
            view.up.insert(n.name.clone(), n.up);
            view.nodes.insert(
                n.name.clone(),
                json!({
                    "name": n.name,
                    "id": n.id,
                    "role": n.role,
                    "up": n.up,
                    "version": n.version,
                    "labels": n.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
                    "services": n.services,
                    "policy_version": n.policy_version,
                    "policy_error": n.policy_error,
                }),
            );
        }
        view
    }

    /// The messages that tell the cloud how `self` became `next`: a `nodes` event for each
    /// node that came up, went down or was removed, then the whole `registry` if anything in it
    /// changed, in pages (`page`, `pages`) of at most about `max_bytes`.
    pub fn changes_to(
        &self,
        next: &RegistryView,
        max_bytes: usize,
    ) -> Vec<(&'static str, Map<String, Value>)> {
        let mut out = Vec::new();
        for (name, up) in &next.up {
            if self.up.get(name) != Some(up) {
                let event = if *up { "up" } else { "down" };
                out.push(("nodes", object(json!({ "node": name, "event": event }))));
            }
        }
        for name in self.up.keys().filter(|n| !next.up.contains_key(*n)) {
            out.push(("nodes", object(json!({ "node": name, "event": "removed" }))));
        }
        if self.nodes != next.nodes {
            let nodes: Vec<Value> = next.nodes.values().cloned().collect();
            let pages = split(nodes, max_bytes);
            let n = pages.len();
            for (i, page) in pages.into_iter().enumerate() {
                out.push((
                    "registry",
                    object(json!({ "nodes": page, "page": i + 1, "pages": n })),
                ));
            }
        }
        out
    }
}

/// How many bytes `map` takes as JSON.
pub fn json_len(map: &Map<String, Value>) -> usize {
    serde_json::to_vec(map).map_or(0, |v| v.len())
}

/// `items` in runs whose JSON takes at most about `max_bytes` each (at least one item a run).
pub fn split(items: Vec<Value>, max_bytes: usize) -> Vec<Vec<Value>> {
    let budget = max_bytes.saturating_sub(2048).max(1024);
    let mut out: Vec<Vec<Value>> = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let size = item.to_string().len() + 1;
        if used + size > budget && out.last().is_some_and(|run| !run.is_empty()) {
            out.push(Vec::new());
            used = 0;
        }
        used += size;
        if let Some(run) = out.last_mut() {
            run.push(item);
        }
    }
    out
}

/// A telemetry batch in parts (`part`, `parts`, the calls split between them) whose JSON takes
/// at most about `max_bytes` each; one part when it fits.
pub fn split_batch(batch: Map<String, Value>, max_bytes: usize) -> Vec<Map<String, Value>> {
    if json_len(&batch) + 2048 <= max_bytes {
        return vec![batch];
    }
    let mut head = batch;
    let calls = match head.remove("calls") {
        Some(Value::Array(calls)) => calls,
        _ => Vec::new(),
    };
    let runs = split(calls, max_bytes);
    let n = runs.len();
    runs.into_iter()
        .enumerate()
        .map(|(i, run)| {
            let mut part = head.clone();
            part.insert("calls".into(), Value::Array(run));
            part.insert("part".into(), (i + 1).into());
            part.insert("parts".into(), n.into());
            part
        })
        .collect()
}

/// An audit event as the cloud gets it: at most 64 fields of at most 1 KiB each (a node's
/// event may be larger; the audit log keeps it whole).
pub fn audit_for_cloud(event: &Map<String, Value>) -> Map<String, Value> {
    event
        .iter()
        .take(64)
        .map(|(k, v)| {
            let v = match v {
                Value::String(text) if text.len() > 1024 => {
                    let mut end = 1024;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    Value::String(format!("{}...", &text[..end]))
                }
                other => other.clone(),
            };
            (k.chars().take(128).collect(), v)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_bucket_the_rank_falls_in() {
        let mut buckets = vec![0; LATENCY_BUCKETS_US.len() + 1];
        assert_eq!(quantile_us(&buckets, 0.5), None);
        buckets[0] = 90;
        buckets[2] = 10;
        assert_eq!(quantile_us(&buckets, 0.5), Some(LATENCY_BUCKETS_US[0]));
        assert_eq!(quantile_us(&buckets, 0.9), Some(LATENCY_BUCKETS_US[0]));
        assert_eq!(quantile_us(&buckets, 0.99), Some(LATENCY_BUCKETS_US[2]));
        let last = buckets.len() - 1;
        buckets[last] = 1000;
        assert_eq!(quantile_us(&buckets, 0.99), None, "past the last bound");
    }

    #[test]
    fn big_batches_and_registries_are_split_to_fit_a_publish() {
        let calls: Vec<Value> = (0..2000)
            .map(|i| json!({"service": format!("svc-{i}"), "count": 1}))
            .collect();
        let mut batch = Map::new();
        batch.insert("node".into(), "n".into());
        batch.insert("calls".into(), Value::Array(calls));
        let parts = split_batch(batch.clone(), 16 * 1024);
        assert!(parts.len() > 1);
        let total: usize = parts
            .iter()
            .map(|p| p["calls"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!(total, 2000, "no call lost in the split");
        for p in &parts {
            assert!(json_len(p) <= 16 * 1024);
            assert_eq!(p["node"], "n");
            assert_eq!(p["parts"], parts.len());
        }
        assert_eq!(split_batch(batch, 1 << 20).len(), 1, "fits: one part");
        let event: Map<String, Value> = (0..100)
            .map(|i| (format!("k{i}"), Value::String("x".repeat(5000))))
            .collect();
        let cut = audit_for_cloud(&event);
        assert_eq!(cut.len(), 64);
        assert!(
            cut.values()
                .all(|v| v.as_str().is_some_and(|s| s.len() <= 1027))
        );
    }
}
