//! The fleet dashboard at `/`: one page (HTML, CSS and script embedded in the binary: no build
//! step, no CDN, no request outside the gateway, which its Content-Security-Policy enforces) that
//! polls `GET /v1/overview` every two seconds.
//!
//! The overview is computed from the gateway's own data: the registry, the policy rollout, the
//! call counters, the latest audit events and traces. Rates, error shares and latency quantiles
//! are over the last minutes: each overview request may keep a snapshot of the call counters
//! (at most one every ten seconds, five minutes of them), and the window runs from the oldest
//! snapshot kept to now; a series with no call in the window shows its error share and latency over
//! every call so far instead (marked). Nobody watching costs nothing.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::control::ControlPlane;
use crate::metrics::{Agg, Aggregates};

/// The page.
pub(super) const HTML: &str = include_str!("dashboard/index.html");
/// Its script.
pub(super) const SCRIPT: &str = include_str!("dashboard/dashboard.js");
/// Its style.
pub(super) const STYLE: &str = include_str!("dashboard/dashboard.css");

/// Only the gateway itself: the page may load its own script and style and talk to its own API.
pub(super) const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// How often a snapshot is kept, and for how long.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
const WINDOW: Duration = Duration::from_secs(300);

/// Snapshots of the call counters, oldest first.
#[derive(Default)]
pub(super) struct Snapshots(Mutex<VecDeque<(Instant, Aggregates)>>);

impl Snapshots {
    /// Keeps `now`'s counters if the last snapshot is old enough; returns the oldest one in the
    /// window (the base of rates) and how long ago it was taken.
    fn base(&self, now: Instant, current: &Aggregates) -> Option<(Duration, Aggregates)> {
        let mut snaps = self.0.lock().unwrap_or_else(|p| p.into_inner());
        while snaps
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            snaps.pop_front();
        }
        let due = snaps
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= SNAPSHOT_EVERY);
        let base = snaps
            .front()
            .map(|(t, a)| (now.duration_since(*t), a.clone()));
        if due {
            snaps.push_back((now, current.clone()));
        }
        base
    }
}

/// Rate, errors and latency over the window; when the window saw no call, the error share and
/// latency of every call so far (`recent` says which).
fn red(now: &Agg, before: Option<&Agg>, window_s: f64) -> Value {
    let d = now.since(before);
    let over = if d.count > 0 { &d } else { now };
    json!({
        "calls": now.count,
        "failed": now.failed,
        "recent": d.count > 0,
        "rate": if window_s > 0.0 { d.count as f64 / window_s } else { 0.0 },
        "error_share": if over.count > 0 { over.failed as f64 / over.count as f64 } else { 0.0 },
        "p50_ms": over.quantile(0.5).map(|s| s * 1e3),
        "p99_ms": over.quantile(0.99).map(|s| s * 1e3),
    })
}

/// Nodes and edges an overview lists at most: a page stays light and drawable with 10,000 nodes
/// (the whole list was 3.5 MB a poll); the summary counts them all.
const MAX_SHOWN: usize = 300;

/// `GET /v1/overview`.
pub(super) fn overview(state: &ControlPlane, snapshots: &Snapshots) -> Value {
    let now = Instant::now();
    // A copy of the list: the registry's lock is held for microseconds, not for the document
    // (the runtime thread takes it for every report a node sends).
    let registry = state.registry().snapshot();
    let (current, resources) = {
        let metrics = state.metrics();
        let resources: std::collections::HashMap<&str, mesh_proto::control::Resources> = registry
            .iter()
            .filter_map(|n| Some((n.name.as_str(), metrics.resources(&n.name)?)))
            .collect();
        (metrics.aggregates(), resources)
    };
    let base = snapshots.base(now, &current);
    let window_s = base.as_ref().map_or(0.0, |(d, _)| d.as_secs_f64());
    let before = base.as_ref().map(|(_, a)| a);
    let services: Vec<Value> = current
        .services
        .iter()
        .map(|(name, agg)| {
            let mut v = red(agg, before.and_then(|b| b.services.get(name)), window_s);
            v["name"] = (**name).into();
            v
        })
        .collect();
    let edges_total = current.edges.len();
    let mut edges: Vec<_> = current.edges.iter().collect();
    // The busiest first, as many as a page can draw.
    edges.sort_by_key(|(_, agg)| std::cmp::Reverse(agg.count));
    edges.truncate(MAX_SHOWN);
    let edges: Vec<Value> = edges
        .into_iter()
        .map(|((caller, callee), agg)| {
            let key = (caller.clone(), callee.clone());
            let mut v = red(agg, before.and_then(|b| b.edges.get(&key)), window_s);
            v["caller"] = (**caller).into();
            v["callee"] = (**callee).into();
            v
        })
        .collect();
    let current_bundle = state.policies.current().map(|b| b.id);
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let now_wall = std::time::SystemTime::now();
    let expiry = |n: &crate::registry::NodeRecord| {
        n.certificate
            .as_ref()
            .map(|c| match c.not_after.duration_since(now_wall) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            })
    };
    let current_of =
        |n: &crate::registry::NodeRecord| current_bundle.is_some() && n.policy == current_bundle;
    let summary = json!({
        "nodes": registry.len(),
        "up": registry.iter().filter(|n| n.up).count(),
        "policy_current": registry.iter().filter(|n| current_of(n)).count(),
        "edges": edges_total,
    });
    // What is wrong first (down, a refused policy, behind, a certificate near its end), then by
    // name; as many as a page can show. `mesh-gateway nodes` lists every one.
    let mut listed: Vec<&crate::registry::NodeRecord> = registry.iter().map(|n| &**n).collect();
    listed.sort_by_key(|n| {
        let wrong = !n.up
            || n.policy_error.is_some()
            || (current_bundle.is_some() && !current_of(n))
            || expiry(n).is_some_and(|s| s < 43_200);
        !wrong
    });
    listed.truncate(MAX_SHOWN);
    let nodes: Vec<Value> = listed
        .into_iter()
        .map(|n| {
            let res = resources.get(n.name.as_str());
            let expires = expiry(n);
            let seen = n
                .last_seen_wall
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            json!({
                "name": n.name,
                "up": n.up,
                "version": n.version,
                "policy_version": n.policy_version,
                "policy_current": current_of(n),
                "policy_error": n.policy_error,
                "certificate_expires_in_s": expires,
                "rss_bytes": res.map(|r| r.rss_bytes),
                "cpu_seconds": res.map(|r| r.cpu_ms as f64 / 1e3),
                "last_seen_s": wall_ms.saturating_sub(seen) / 1000,
            })
        })
        .collect();
    drop(registry);
    json!({
        "window_s": window_s,
        "policy": {
            "version": current_bundle.map_or(0, |b| b.version),
            "hash": current_bundle.map(|b| mesh_node::state::hex(&b.hash)),
        },
        "summary": summary,
        "nodes": nodes,
        "services": services,
        "edges": edges,
        "audit": state.audit.recent(20),
        "traces": state.traces().json(10)["traces"].clone(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::audit::AuditLog;
    use crate::policy::Policies;
    use crate::registry::Registry;
    use crate::traces::Traces;

    #[test]
    fn an_overview_of_many_nodes_lists_what_is_wrong_first_and_counts_them_all() {
        let dir = tempfile::tempdir().expect("dir");
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.jsonl")));
        let policies = Arc::new(
            Policies::load(&dir.path().join("state"), None, audit.clone()).expect("policies"),
        );
        let plane = ControlPlane::new(
            Registry::new(Duration::from_secs(5), Duration::from_secs(600)),
            Traces::new(10),
            policies,
            audit,
            "td".into(),
            None,
            String::new(),
        );
        let t0 = Instant::now();
        {
            let mut registry = plane.registry();
            for i in 0..1000 {
                let hello = mesh_proto::control::NodeHello {
                    protocol_version: mesh_proto::PROTOCOL_VERSION,
                    software_version: "0.1.0".into(),
                    labels: vec![],
                    services: vec![],
                    addrs: vec![],
                    policy_version: 0,
                    next_seq: 1,
                    boot_id: i,
                    lost_at_restart: 0,
                    policy: None,
                    policy_damaged: false,
                };
                registry.handle_hello(&format!("n{i:04}"), "id", &hello, t0);
            }
            // The last one by name goes down.
            registry.handle_closed("n0999", t0);
            registry.sweep(t0 + Duration::from_secs(6));
        }
        let o = overview(&plane, &Snapshots::default());
        assert_eq!(o["summary"]["nodes"], 1000);
        assert_eq!(o["summary"]["up"], 999);
        let nodes = o["nodes"].as_array().expect("nodes");
        assert_eq!(nodes.len(), MAX_SHOWN);
        assert_eq!(
            nodes[0]["name"], "n0999",
            "the node that is down comes first"
        );
        assert_eq!(nodes[1]["name"], "n0000");
    }
}
