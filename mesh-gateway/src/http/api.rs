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
use crate::policy::{MAX_BUNDLE_BYTES, Origin, Revocation};
use mesh_node::state::hex;
use mesh_proto::control::MAX_CONTROL_FRAME;

pub(super) async fn handle(
    api: Api,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let state = &*api.plane;
    // The dashboard's page holds no data: a browser loads it without the token, and its requests
    // for data carry it.
    if req.method() == Method::GET {
        use super::dashboard;
        let asset = match req.uri().path() {
            "/" => Some(("text/html; charset=utf-8", dashboard::HTML)),
            "/dashboard.js" => Some(("text/javascript; charset=utf-8", dashboard::SCRIPT)),
            "/dashboard.css" => Some(("text/css; charset=utf-8", dashboard::STYLE)),
            _ => None,
        };
        if let Some((content_type, body)) = asset {
            let mut resp = respond(200, content_type, body.to_owned());
            let headers = resp.headers_mut();
            headers.insert(
                hyper::header::CONTENT_SECURITY_POLICY,
                hyper::header::HeaderValue::from_static(dashboard::CSP),
            );
            headers.insert(
                hyper::header::X_CONTENT_TYPE_OPTIONS,
                hyper::header::HeaderValue::from_static("nosniff"),
            );
            return Ok(resp);
        }
    }
    if api.reads_need_token && !authorized(&api, &req) {
        return Ok(json_response(
            401,
            json!({ "error": "this admin API listens off loopback: every request needs Authorization: Bearer <admin token>" }),
        ));
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    Ok(match (req.method().clone(), path.as_str()) {
        (Method::GET, "/metrics") => {
            let latest = state.policies.current().map(|b| b.id);
            let nodes = state.registry().snapshot();
            let mut text = state.metrics().render(&nodes, latest.as_ref());
            text.push_str(&format!(
                "# HELP starling_audit_lost_total Audit events the gateway could not write.\n\
                 # TYPE starling_audit_lost_total counter\nstarling_audit_lost_total {}\n",
                state.audit.lost()
            ));
            if let Some(cloud) = state.cloud() {
                crate::cloud::render_metrics(&cloud.status(), &mut text);
            }
            if let Some(otlp) = state.otlp() {
                crate::otlp::render_metrics(&otlp.status(), &mut text);
            }
            respond(200, "text/plain; version=0.0.4", text)
        }
        (Method::GET, "/v1/nodes") => json_response(200, nodes(state)),
        (Method::GET, "/v1/overview") => {
            json_response(200, super::dashboard::overview(state, &api.snapshots))
        }
        (Method::GET, "/v1/services") => json_response(200, services(state)),
        (Method::GET, "/v1/cloud") => match state.cloud() {
            Some(cloud) => json_response(200, json!(cloud.status())),
            None => json_response(
                404,
                json!({ "error": "this gateway has no [cloud] section: it bridges to no broker" }),
            ),
        },
        (Method::GET, "/v1/policy") => {
            let current = state.policies.current();
            json_response(
                200,
                json!({
                    "version": current.as_ref().map_or(0, |b| b.id.version),
                    "epoch": current.as_ref().map_or(0, |b| b.id.epoch),
                    "hash": current.as_ref().map(|b| hex(&b.id.hash)),
                    // The operator's part: what a PUT takes back. The deny list the gateway adds
                    // to it is at /v1/revocations.
                    "toml": current.as_ref().map_or("", |b| b.operator.as_str()),
                }),
            )
        }
        (Method::PUT, "/v1/policy") => put_policy(&api, req, &query).await,
        (Method::GET, "/v1/policy/status") => policy_status(state),
        (Method::GET, "/v1/policy/history") => {
            // Newest first, without the texts (GET /v1/policy/history/<version> has one).
            let entries: Vec<serde_json::Value> = state
                .policies
                .history()
                .iter()
                .map(|e| {
                    json!({
                        "version": e.version, "epoch": e.epoch, "hash": e.hash,
                        "at_unix": e.at_unix, "source": e.source, "author": e.author,
                        "bytes": e.policy.len(),
                    })
                })
                .collect();
            json_response(200, json!({ "entries": entries }))
        }
        (Method::GET, p) if p.starts_with("/v1/policy/history/") => {
            let wanted = p["/v1/policy/history/".len()..].parse::<u64>().ok();
            match wanted.and_then(|v| {
                state
                    .policies
                    .history()
                    .into_iter()
                    .find(|e| e.version == v)
            }) {
                Some(e) => json_response(200, json!(e)),
                None => json_response(
                    404,
                    json!({ "error": format!("no version {} in the policy history (GET /v1/policy/history lists them)", &p["/v1/policy/history/".len()..]) }),
                ),
            }
        }
        (Method::GET, "/v1/revocations") => json_response(200, revocations(state)),
        (Method::POST, "/v1/tokens") => post_token(&api, req).await,
        (Method::GET, "/v1/admin-tokens") => local_only(&api, &req, "GET /v1/admin-tokens")
            .unwrap_or_else(|| json_response(200, api.tokens.list())),
        (Method::POST, "/v1/admin-tokens") => post_admin_token(&api, req).await,
        (Method::DELETE, p) if p.starts_with("/v1/admin-tokens/") => {
            delete_admin_token(&api, &req, &p["/v1/admin-tokens/".len()..])
        }
        (Method::POST, "/v1/revocations") => post_revocation(&api, req).await,
        (Method::DELETE, p) if p.starts_with("/v1/revocations/") => {
            delete_revocation(&api, &req, &p["/v1/revocations/".len()..]).await
        }
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
            | "/v1/policy/history" | "/v1/traces" | "/v1/revocations" | "/v1/tokens" | "/v1/cloud"
            | "/v1/admin-tokens",
        ) => json_response(405, json!({ "error": "method not allowed" })),
        _ => json_response(404, json!({ "error": "no such path" })),
    })
}

async fn put_policy(api: &Api, req: Request<Incoming>, query: &str) -> Response<Full<Bytes>> {
    let token = bearer(&req);
    let Some(who) = caller(api, &req) else {
        return json_response(
            401,
            json!({ "error": "PUT /v1/policy needs Authorization: Bearer <admin token>" }),
        );
    };
    let body = match read_body(api, req, MAX_BUNDLE_BYTES, "the bundle").await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if let Some(refused) = still(api, token.as_deref(), &who) {
        return refused;
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return json_response(
            400,
            json!({ "error": "the policy bundle is not UTF-8 text" }),
        );
    };
    let dry_run = query
        .split('&')
        .any(|kv| kv == "dry_run=1" || kv == "dry_run=true");
    if dry_run {
        return match api.plane.policies.dry_run(text, "PUT /v1/policy") {
            Ok(run) => json_response(
                200,
                json!({
                    "dry_run": true,
                    "valid": true,
                    "changed": run.changed,
                    "version": run.version,
                    "added": run.added,
                    "removed": run.removed,
                    "diff": run.diff,
                }),
            ),
            Err(e) => json_response(400, json!({ "dry_run": true, "error": e.to_string() })),
        };
    }
    match api
        .plane
        .policies
        .set_by(text, "PUT /v1/policy", Origin::Api, &who)
        .await
    {
        Ok(version) => json_response(200, json!({ "version": version })),
        Err(e) => json_response(400, json!({ "error": e.to_string() })),
    }
}

/// Reads a request body of at most `max` bytes within the body timeout, or answers why not.
async fn read_body(
    api: &Api,
    req: Request<Incoming>,
    max: usize,
    what: &str,
) -> Result<Bytes, Response<Full<Bytes>>> {
    let read = Limited::new(req.into_body(), max).collect();
    let Ok(read) = tokio::time::timeout(api.body_timeout, read).await else {
        return Err(json_response(
            408,
            json!({ "error": format!("{what} did not arrive in time (limits.ingress_body_timeout_ms)") }),
        ));
    };
    read.map(|b| b.to_bytes()).map_err(|e| {
        let error = if e.is::<http_body_util::LengthLimitError>() {
            format!(
                "{what} exceeds the bound of {max} bytes (a control frame carries at most \
                 {MAX_CONTROL_FRAME}); it is refused"
            )
        } else {
            format!("{what}: {e}")
        };
        json_response(413, json!({ "error": error }))
    })
}

/// `POST /v1/revocations` `{"name": "node-7", "reason": "..."}`: revokes the node's identity
/// (and the serial of the certificate the gateway saw it use).
async fn post_revocation(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let token = bearer(&req);
    let Some(who) = caller(api, &req) else {
        return json_response(
            401,
            json!({ "error": "POST /v1/revocations needs Authorization: Bearer <admin token>" }),
        );
    };
    let body = match read_body(api, req, 4096, "the revocation").await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if let Some(refused) = still(api, token.as_deref(), &who) {
        return refused;
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Asked {
        name: String,
        #[serde(default)]
        reason: String,
    }
    let asked: Asked = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return json_response(
                400,
                json!({ "error": format!("expected {{\"name\": \"node-7\", \"reason\": \"...\"}}: {e}") }),
            );
        }
    };
    let id = match node_id(&api.plane, &asked.name) {
        Ok(id) => id,
        Err(e) => return json_response(400, json!({ "error": e })),
    };
    let serials = api
        .plane
        .registry()
        .nodes()
        .find(|n| n.id == id)
        .and_then(|n| n.certificate.as_ref().map(|c| vec![c.serial.clone()]))
        .unwrap_or_default();
    let entry = Revocation {
        id: Some(id.clone()),
        serials: serials.clone(),
        reason: if asked.reason.is_empty() {
            "revoked by the operator".to_owned()
        } else {
            asked.reason
        },
        at_unix: std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    match api.plane.policies.revoke(entry, &who).await {
        Ok(version) => json_response(
            200,
            json!({ "revoked": id, "serials": serials, "version": version }),
        ),
        Err(e) => json_response(500, json!({ "error": e.to_string() })),
    }
}

/// `POST /v1/tokens` `{"name": "node-7", "labels": "zone=hall-1", "ttl_s": 3600}`: a one-time
/// join token for the node.
async fn post_token(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let token = bearer(&req);
    let Some(who) = caller(api, &req) else {
        return json_response(
            401,
            json!({ "error": "POST /v1/tokens needs Authorization: Bearer <admin token>" }),
        );
    };
    let Some(issuing) = api.plane.issuing.clone() else {
        return json_response(
            409,
            json!({ "error": "this gateway has no [issuer] section: it issues no certificates (make one with `mesh-gateway ca issuer`)" }),
        );
    };
    let body = match read_body(api, req, 4096, "the token request").await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    if let Some(refused) = still(api, token.as_deref(), &who) {
        return refused;
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Asked {
        name: String,
        #[serde(default)]
        labels: String,
        #[serde(default = "an_hour")]
        ttl_s: u64,
    }
    fn an_hour() -> u64 {
        3600
    }
    let asked: Asked = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return json_response(
                400,
                json!({ "error": format!("expected {{\"name\": \"node-7\", \"labels\": \"k=v,...\", \"ttl_s\": 3600}}: {e}") }),
            );
        }
    };
    let labels = match mesh_core::labels::parse_list(&asked.labels) {
        Ok(l) => l,
        Err(e) => return json_response(400, json!({ "error": format!("labels: {e}") })),
    };
    let ttl = std::time::Duration::from_secs(asked.ttl_s.clamp(1, 30 * 86_400));
    match issuing.create_token(&asked.name, labels, ttl, &who) {
        Ok(t) => json_response(
            200,
            json!({ "token": t.token.to_string(), "id": t.id.to_string(), "expires_unix": t.expires_unix }),
        ),
        Err(e) => json_response(400, json!({ "error": e })),
    }
}

/// `DELETE /v1/revocations/<name>`: lifts a revocation.
async fn delete_revocation(
    api: &Api,
    req: &Request<Incoming>,
    name: &str,
) -> Response<Full<Bytes>> {
    let Some(who) = caller(api, req) else {
        return json_response(
            401,
            json!({ "error": "DELETE /v1/revocations needs Authorization: Bearer <admin token>" }),
        );
    };
    let id = match node_id(&api.plane, name) {
        Ok(id) => id,
        Err(e) => return json_response(400, json!({ "error": e })),
    };
    match api.plane.policies.unrevoke(&id, &who).await {
        Ok(Some(version)) => json_response(200, json!({ "lifted": id, "version": version })),
        Ok(None) => json_response(404, json!({ "error": format!("{id} is not revoked") })),
        Err(e) => json_response(500, json!({ "error": e.to_string() })),
    }
}

/// Admin tokens are managed with the gateway's own token only (its `admin_token_file`, on its
/// disk): a named token cannot make more tokens, nor outlive its own revocation through them.
fn local_only(api: &Api, req: &Request<Incoming>, what: &str) -> Option<Response<Full<Bytes>>> {
    match caller(api, req).as_deref() {
        Some(crate::admin_tokens::LOCAL) => None,
        Some(_) => Some(json_response(
            403,
            json!({ "error": format!("{what} takes the gateway's own token (its admin_token_file), not a named one") }),
        )),
        None => Some(json_response(
            401,
            json!({ "error": format!("{what} needs Authorization: Bearer <the gateway's own admin token>") }),
        )),
    }
}

/// `POST /v1/admin-tokens` `{"name": "alice"}`: a named admin token, answered once.
async fn post_admin_token(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(refused) = local_only(api, &req, "POST /v1/admin-tokens") {
        return refused;
    }
    let body = match read_body(api, req, 1024, "the token request").await {
        Ok(body) => body,
        Err(refused) => return refused,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Asked {
        name: String,
    }
    let asked: Asked = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => {
            return json_response(
                400,
                json!({ "error": format!("expected {{\"name\": \"alice\"}}: {e}") }),
            );
        }
    };
    match api.tokens.create(&asked.name, crate::admin_tokens::LOCAL) {
        Ok(token) => {
            api.plane.audit.record(
                "gateway",
                "admin_token_created",
                vec![
                    ("name".into(), asked.name.clone()),
                    ("by".into(), crate::admin_tokens::LOCAL.into()),
                ],
            );
            json_response(200, json!({ "name": asked.name, "token": token }))
        }
        Err(e) => json_response(400, json!({ "error": e })),
    }
}

/// `DELETE /v1/admin-tokens/<name>`: the named token stops working at once.
fn delete_admin_token(api: &Api, req: &Request<Incoming>, name: &str) -> Response<Full<Bytes>> {
    if let Some(refused) = local_only(api, req, "DELETE /v1/admin-tokens") {
        return refused;
    }
    match api.tokens.revoke(name) {
        Ok(true) => {
            api.plane.audit.record(
                "gateway",
                "admin_token_revoked",
                vec![
                    ("name".into(), name.to_owned()),
                    ("by".into(), crate::admin_tokens::LOCAL.into()),
                ],
            );
            json_response(200, json!({ "revoked": name }))
        }
        Ok(false) => json_response(
            404,
            json!({ "error": format!("no admin token named {:?}", mesh_node::process::printable(name)) }),
        ),
        Err(e) => json_response(500, json!({ "error": e })),
    }
}

/// The SPIFFE ID of node `name` in this mesh's trust domain.
fn node_id(plane: &ControlPlane, name: &str) -> Result<String, String> {
    let node =
        mesh_core::NodeName::try_from(name).map_err(|e| format!("node name {name:?}: {e}"))?;
    mesh_core::SpiffeId::node(&plane.trust_domain, node)
        .map(|id| id.to_string())
        .map_err(|e| e.to_string())
}

fn revocations(state: &ControlPlane) -> serde_json::Value {
    // What every node enforces: the gateway's list and the operator's own entries.
    let list: Vec<serde_json::Value> = state
        .policies
        .enforced()
        .into_iter()
        .map(|r| json!({ "id": r.id, "serials": r.serials, "reason": r.reason }))
        .collect();
    json!({ "revoked": list })
}

fn nodes(state: &ControlPlane) -> serde_json::Value {
    let revoked = state.policies.enforced();
    let registry = state.registry().snapshot();
    let now = std::time::SystemTime::now();
    let nodes: Vec<serde_json::Value> = registry
        .iter()
        .map(|n| {
            let certificate = n.certificate.as_ref().map(|c| {
                let expires_in_s = match c.not_after.duration_since(now) {
                    Ok(d) => d.as_secs() as i64,
                    Err(e) => -(e.duration().as_secs() as i64),
                };
                json!({
                    "serial": c.serial,
                    "expires_in_s": expires_in_s,
                    "labels": c.labels.iter().cloned().collect::<BTreeMap<_, _>>(),
                    "root": c.root,
                })
            });
            let serial = n.certificate.as_ref().map_or("", |c| c.serial.as_str());
            let revoked = revoked.iter().any(|r| r.matches(&n.id, serial));
            json!({
                "revoked": revoked,
                "certificate": certificate,
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
    let registry = state.registry().snapshot();
    let mut map: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for n in &registry {
        for s in &n.services {
            map.entry(s.clone())
                .or_default()
                .push(json!({ "node": n.name, "up": n.up }));
        }
    }
    json!({ "services": map })
}

/// `GET /v1/policy/status`, written straight from typed rows (keys in the order `json!` gives
/// them): about a megabyte at 10,000 nodes, which a script may ask for every 100 ms.
fn policy_status(state: &ControlPlane) -> Response<Full<Bytes>> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        // Current means the same bundle: same epoch and hash, not only the same number.
        current: bool,
        damaged: bool,
        epoch: Option<u64>,
        error: Option<&'a str>,
        hash: Option<String>,
        name: &'a str,
        up: bool,
        version: u64,
    }
    #[derive(serde::Serialize)]
    struct Status<'a> {
        epoch: Option<u64>,
        hash: Option<String>,
        latest: u64,
        nodes: Vec<Row<'a>>,
    }
    let current = state.policies.current().map(|b| b.id);
    let registry = state.registry().snapshot();
    let status = Status {
        epoch: current.map(|b| b.epoch),
        hash: current.map(|b| hex(&b.hash)),
        latest: current.map_or(0, |b| b.version),
        nodes: registry
            .iter()
            .map(|n| Row {
                current: current.is_some() && n.policy == current,
                damaged: n.policy_damaged,
                epoch: n.policy.map(|b| b.epoch),
                error: n.policy_error.as_deref(),
                hash: n.policy.map(|b| hex(&b.hash)),
                name: &n.name,
                up: n.up,
                version: n.policy_version,
            })
            .collect(),
    };
    match serde_json::to_string(&status) {
        Ok(text) => respond(200, "application/json", text),
        Err(e) => json_response(500, json!({ "error": e.to_string() })),
    }
}

fn respond(code: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    mesh_node::http::respond(code, content_type, Bytes::from(body))
}

fn json_response(code: u16, value: serde_json::Value) -> Response<Full<Bytes>> {
    respond(code, "application/json", value.to_string())
}

/// The bearer token the request carries, if any.
fn bearer(req: &Request<Incoming>) -> Option<String> {
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
}

/// Who the request's admin token names (`local`, or a named token's name), if it carries one.
fn caller(api: &Api, req: &Request<Incoming>) -> Option<String> {
    bearer(req).and_then(|t| api.tokens.who(&t))
}

/// For a change whose body took a while to arrive: whether the token that sent it still names
/// `who` (it may have been revoked meanwhile; a revoked token changes nothing).
fn still(api: &Api, token: Option<&str>, who: &str) -> Option<Response<Full<Bytes>>> {
    if token.and_then(|t| api.tokens.who(t)).as_deref() == Some(who) {
        return None;
    }
    Some(json_response(
        401,
        json!({ "error": "the admin token was revoked while the request arrived; nothing changed" }),
    ))
}

/// Whether the request carries an admin token.
fn authorized(api: &Api, req: &Request<Incoming>) -> bool {
    caller(api, req).is_some()
}
