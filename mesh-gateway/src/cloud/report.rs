//! The bodies of the messages the site sends up (their schemas are in docs/CLOUD.md). The
//! bridge adds `seq`, `at_ms`, `gateway` and `gaps` to each.

use std::collections::BTreeMap;

use mesh_proto::control::{BundleRef, LATENCY_BUCKETS_US, TelemetryBatch};
use serde_json::{Map, Value, json};

use crate::registry::Registry;

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
/// acknowledging, and a consumer counts it once by that key.
pub fn telemetry(node: &str, boot_id: u64, batch: &TelemetryBatch) -> Map<String, Value> {
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
    /// The registry now.
    pub fn of(registry: &Registry) -> RegistryView {
        let mut view = RegistryView::default();
        for n in registry.nodes() {
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
    /// changed.
    pub fn changes_to(&self, next: &RegistryView) -> Vec<(&'static str, Map<String, Value>)> {
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
            out.push(("registry", object(json!({ "nodes": nodes }))));
        }
        out
    }
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
}
