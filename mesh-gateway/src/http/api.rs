//! The handlers of the gateway's HTTP API and `/metrics` (the table of paths is in `http`).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use serde_json::json;

use super::Api;
use crate::control::ControlPlane;

/// Largest policy bundle accepted over the API.
const MAX_POLICY_BYTES: usize = 512 * 1024;

pub(super) async fn handle(
    api: Api,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let state = &*api.plane;
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    Ok(match (req.method().clone(), path.as_str()) {
        (Method::GET, "/metrics") => {
            let latest = state.policies.current().0;
            let text = state.metrics().render(&state.registry(), latest);
            respond(200, "text/plain; version=0.0.4", text)
        }
        (Method::GET, "/v1/nodes") => json_response(200, nodes(state)),
        (Method::GET, "/v1/services") => json_response(200, services(state)),
        (Method::GET, "/v1/policy") => {
            let (version, toml) = state.policies.current();
            json_response(200, json!({ "version": version, "toml": toml.as_str() }))
        }
        (Method::PUT, "/v1/policy") => put_policy(&api, req).await,
        (Method::GET, "/v1/policy/status") => json_response(200, policy_status(state)),
        (Method::GET, "/v1/traces") => {
            let limit = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("limit="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(100);
            json_response(200, state.traces().json(limit))
        }
        (
            _,
            "/metrics" | "/v1/nodes" | "/v1/services" | "/v1/policy" | "/v1/policy/status"
            | "/v1/traces",
        ) => json_response(405, json!({ "error": "method not allowed" })),
        _ => json_response(404, json!({ "error": "no such path" })),
    })
}

async fn put_policy(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.trim().as_bytes(), api.token.as_bytes()));
    if !authorized {
        return json_response(
            401,
            json!({ "error": "PUT /v1/policy needs Authorization: Bearer <admin token>" }),
        );
    }
    let body = match Limited::new(req.into_body(), MAX_POLICY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return json_response(413, json!({ "error": format!("policy body: {e}") })),
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return json_response(
            400,
            json!({ "error": "the policy bundle is not UTF-8 text" }),
        );
    };
    match api.plane.policies.set(text, "PUT /v1/policy").await {
        Ok(version) => json_response(200, json!({ "version": version })),
        Err(e) => json_response(400, json!({ "error": e.to_string() })),
    }
}

fn nodes(state: &ControlPlane) -> serde_json::Value {
    let registry = state.registry();
    let nodes: Vec<serde_json::Value> = registry
        .nodes()
        .map(|n| {
            json!({
                "name": n.name,
                "id": n.id,
                "version": n.version,
                "role": n.role,
                "up": n.up,
                "labels": n.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
                "services": n.services,
                "addrs": n.addrs,
                "policy_version": n.policy_version,
                "last_seen_unix_ms": n.last_seen_wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    json!({ "nodes": nodes })
}

fn services(state: &ControlPlane) -> serde_json::Value {
    let registry = state.registry();
    let mut map: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for n in registry.nodes() {
        for s in &n.services {
            map.entry(s.clone())
                .or_default()
                .push(json!({ "node": n.name, "up": n.up }));
        }
    }
    json!({ "services": map })
}

fn policy_status(state: &ControlPlane) -> serde_json::Value {
    let latest = state.policies.current().0;
    let registry = state.registry();
    let nodes: Vec<serde_json::Value> = registry
        .nodes()
        .map(|n| {
            json!({
                "name": n.name,
                "version": n.policy_version,
                "current": n.policy_version == latest,
                "up": n.up,
                "error": n.policy_error,
            })
        })
        .collect();
    json!({ "latest": latest, "nodes": nodes })
}

fn respond(code: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    mesh_node::http::respond(code, content_type, Bytes::from(body))
}

fn json_response(code: u16, value: serde_json::Value) -> Response<Full<Bytes>> {
    respond(code, "application/json", value.to_string())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
