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

/// `GET /v1/overview`.
pub(super) fn overview(state: &ControlPlane, snapshots: &Snapshots) -> Value {
    let now = Instant::now();
    let (current, resources) = {
        let metrics = state.metrics();
        let registry = state.registry();
        let resources: std::collections::HashMap<String, mesh_proto::control::Resources> = registry
            .nodes()
            .filter_map(|n| Some((n.name.clone(), metrics.resources(&n.name)?)))
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
            v["name"] = name.clone().into();
            v
        })
        .collect();
    let edges: Vec<Value> = current
        .edges
        .iter()
        .map(|((caller, callee), agg)| {
            let key = (caller.clone(), callee.clone());
            let mut v = red(agg, before.and_then(|b| b.edges.get(&key)), window_s);
            v["caller"] = caller.clone().into();
            v["callee"] = callee.clone().into();
            v
        })
        .collect();
    let current_bundle = state.policies.current().map(|b| b.id);
    let wall_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let registry = state.registry();
    let nodes: Vec<Value> = registry
        .nodes()
        .map(|n| {
            let res = resources.get(&n.name);
            let expires = n.certificate.as_ref().map(|c| {
                match c.not_after.duration_since(std::time::SystemTime::now()) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                }
            });
            let seen = n
                .last_seen_wall
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            json!({
                "name": n.name,
                "up": n.up,
                "version": n.version,
                "policy_version": n.policy_version,
                "policy_current": current_bundle.is_some() && n.policy == current_bundle,
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
        "nodes": nodes,
        "services": services,
        "edges": edges,
        "audit": state.audit.recent(20),
        "traces": state.traces().json(10)["traces"].clone(),
    })
}
