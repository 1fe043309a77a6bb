//! `mesh-gateway status` and `mesh-gateway nodes`: the state of a site on one screen, read from a
//! running gateway's admin API, with what is wrong first (as `linkerd check` does).
//!
//! Exit codes a script can use: 0 nothing wrong, 1 something wrong (each listed), 2 bad arguments
//! or config, 3 the gateway cannot be reached.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

use serde_json::{Value, json};

use crate::config::GatewayConfig;

/// Something wrong: exit 1.
pub const EXIT_WRONG: u8 = 1;
/// Bad arguments or config: exit 2.
pub const EXIT_USAGE: u8 = 2;
/// The gateway cannot be reached: exit 3.
pub const EXIT_UNREACHABLE: u8 = 3;

/// A certificate that expires sooner than this is a problem: nodes renew theirs at two thirds of
/// its life (a week-long one with two days left), so twelve hours left means renewals fail.
const EXPIRY_WARNING_S: i64 = 12 * 3600;

/// Where a gateway's admin API is, and its token if known.
pub struct Admin {
    /// The admin address.
    pub addr: SocketAddr,
    /// The bearer token (needed off loopback, and for changes).
    pub token: Option<String>,
}

impl Admin {
    /// From a gateway's config: the address its running process recorded (else the configured
    /// one), the token from its token file when readable.
    pub fn from_config(path: &Path) -> Result<Admin, String> {
        let config = GatewayConfig::load(path).map_err(|e| e.to_string())?;
        let addr = mesh_node::state::read_lock_file(&config.node.state_dir)
            .and_then(|entries| entries.get("admin").and_then(|a| a.parse().ok()))
            .unwrap_or(config.admin);
        let token = std::fs::read_to_string(&config.admin_token_file)
            .ok()
            .map(|t| t.trim().to_owned());
        Ok(Admin { addr, token })
    }

    /// From `http://host:port` and an optional token file.
    pub fn from_url(url: &str, token_file: Option<&Path>) -> Result<Admin, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("--admin {url:?}: the admin API is http://<address>:<port>"))?;
        let addr = rest
            .trim_end_matches('/')
            .parse()
            .map_err(|e| format!("--admin {url:?}: {e}"))?;
        let token = match token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| format!("--token-file {}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Admin { addr, token })
    }

    /// `method path` with `body`, the token when known: the answer's status and body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: bytes::Bytes,
    ) -> Result<(u16, bytes::Bytes), String> {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("authorization", a)])
            .unwrap_or_default();
        let (code, _, body) = mesh_node::http::request(method, self.addr, path, &headers, body)
            .await
            .map_err(|e| format!("cannot reach the gateway's admin API at {}: {e}", self.addr))?;
        Ok((code, body))
    }

    async fn get(&self, path: &str) -> Result<(u16, bytes::Bytes), String> {
        self.request("GET", path, bytes::Bytes::new()).await
    }

    /// `GET path`, whose answer must be a 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value, String> {
        let (code, body) = self.get(path).await?;
        if code != 200 {
            return Err(format!(
                "GET {path}: the gateway answered HTTP {code}: {}",
                String::from_utf8_lossy(&body)
            ));
        }
        serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))
    }
}

/// `at_unix` as `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn utc(at_unix: u64) -> String {
    let (days, secs) = (at_unix / 86_400, at_unix % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// What `status` reports: read once from the API.
pub async fn collect(admin: &Admin) -> Result<Value, String> {
    let nodes = admin.get_json("/v1/nodes").await?;
    let policy = admin.get_json("/v1/policy/status").await?;
    let services = admin.get_json("/v1/services").await?;
    let (code, metrics) = admin.get("/metrics").await?;
    let metrics = if code == 200 {
        String::from_utf8_lossy(&metrics).into_owned()
    } else {
        String::new()
    };
    let cloud = match admin.get("/v1/cloud").await? {
        (200, body) => serde_json::from_slice::<Value>(&body).ok(),
        _ => None,
    };
    Ok(report(&nodes, &policy, &services, &metrics, cloud.as_ref()))
}

/// Sums of a counter's lines by one label.
fn sums_by(metrics: &str, name: &str, label: &str) -> BTreeMap<String, Vec<(String, f64)>> {
    let mut out: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    let prefix = format!("{name}{{");
    for line in metrics.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let get = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        out.entry(get(label))
            .or_default()
            .push((get("status"), value));
    }
    out
}

use crate::metrics::failed_status as failed;

/// The report, from the API's answers: problems first, then the fleet.
pub fn report(
    nodes: &Value,
    policy: &Value,
    services: &Value,
    metrics: &str,
    cloud: Option<&Value>,
) -> Value {
    let mut problems: Vec<String> = Vec::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let empty = Vec::new();
    let node_list = nodes["nodes"].as_array().unwrap_or(&empty);
    let policies: BTreeMap<&str, &Value> = policy["nodes"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?, n)))
        .collect();
    let latest = policy["latest"].as_u64().unwrap_or(0);
    let mut holding = 0;
    let mut lines = Vec::new();
    for n in node_list {
        let name = n["name"].as_str().unwrap_or("?");
        let up = n["up"].as_bool().unwrap_or(false);
        let seen_s = now_ms.saturating_sub(n["last_seen_unix_ms"].as_u64().unwrap_or(0)) / 1000;
        if !up {
            problems.push(format!("node {name} is down (last seen {seen_s} s ago)"));
        }
        if n["revoked"].as_bool().unwrap_or(false) && up {
            problems.push(format!("node {name} is revoked and still connected"));
        }
        let expires = n["certificate"]["expires_in_s"].as_i64();
        match expires {
            Some(s) if s <= 0 => problems.push(format!(
                "node {name}'s certificate expired {} h ago: every peer refuses it",
                -s / 3600
            )),
            Some(s) if s < EXPIRY_WARNING_S => problems.push(format!(
                "node {name}'s certificate expires in {} h and was not renewed",
                s / 3600
            )),
            _ => {}
        }
        let p = policies.get(name);
        let current = p.is_some_and(|p| p["current"].as_bool().unwrap_or(false));
        if current {
            holding += 1;
        }
        if let Some(error) = p.and_then(|p| p["error"].as_str()) {
            problems.push(format!("node {name} refused the policy: {error}"));
        }
        if p.is_some_and(|p| p["damaged"].as_bool().unwrap_or(false)) {
            problems.push(format!(
                "node {name}'s saved policy is damaged: it refuses every call until it gets a good bundle"
            ));
        }
        lines.push(json!({
            "name": name,
            "up": up,
            "version": n["version"],
            "policy_version": n["policy_version"],
            "policy_current": current,
            "certificate_expires_in_s": expires,
            "last_seen_s": seen_s,
            "services": n["services"],
        }));
    }
    let calls = sums_by(metrics, "starling_requests_total", "service");
    let mut service_lines = Vec::new();
    if let Some(map) = services["services"].as_object() {
        for (service, endpoints) in map {
            let endpoints = endpoints.as_array().unwrap_or(&empty);
            let up = endpoints.iter().filter(|e| e["up"] == true).count();
            if up == 0 {
                problems.push(format!("service {service} has no endpoint up"));
            }
            let counts = calls.get(service).map_or(&[][..], Vec::as_slice);
            let total: f64 = counts.iter().map(|(_, v)| v).sum();
            let failures: f64 = counts
                .iter()
                .filter(|(s, _)| failed(s))
                .map(|(_, v)| v)
                .sum();
            service_lines.push(json!({
                "name": service,
                "endpoints": endpoints.len(),
                "endpoints_up": up,
                "calls": total as u64,
                "failed": failures as u64,
                "error_share": if total > 0.0 { failures / total } else { 0.0 },
            }));
        }
    }
    let gaps: BTreeMap<String, u64> = sums_by(metrics, "starling_telemetry_gap_total", "node")
        .into_iter()
        .map(|(node, v)| (node, v.iter().map(|(_, n)| *n as u64).sum()))
        .filter(|(_, n)| *n > 0)
        .collect();
    if let Some(cloud) = cloud
        && cloud["connected"] == false
    {
        problems.push(format!(
            "the cloud bridge is not connected to its broker ({} messages queued)",
            cloud["queue"]["messages"]
        ));
    }
    json!({
        "healthy": problems.is_empty(),
        "problems": problems,
        "nodes": lines,
        "nodes_up": node_list.iter().filter(|n| n["up"] == true).count(),
        "policy": { "latest": latest, "holding": holding, "nodes": node_list.len() },
        "services": service_lines,
        "telemetry_gaps": gaps,
        "cloud": cloud.cloned(),
    })
}

pub use mesh_node::process::printable;

/// The report as one screen of text.
pub fn render(r: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let problems = r["problems"].as_array().cloned().unwrap_or_default();
    if problems.is_empty() {
        out.push_str("OK: nothing wrong\n");
    } else {
        let _ = writeln!(out, "WRONG: {} problem(s)", problems.len());
        for p in &problems {
            let _ = writeln!(out, "  x {}", printable(p.as_str().unwrap_or("")));
        }
    }
    let nodes = r["nodes"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nnodes: {} of {} up; policy version {}: held by {} of {}",
        r["nodes_up"],
        nodes.len(),
        r["policy"]["latest"],
        r["policy"]["holding"],
        r["policy"]["nodes"]
    );
    for n in &nodes {
        let expires = n["certificate_expires_in_s"]
            .as_i64()
            .map_or("-".to_owned(), |s| format!("{}h", s / 3600));
        let _ = writeln!(
            out,
            "  {:<20} {:<5} v{:<8} policy {:<4}{} cert {:>6}  seen {}s ago",
            n["name"].as_str().unwrap_or("?"),
            if n["up"] == true { "up" } else { "DOWN" },
            n["version"].as_str().unwrap_or("?"),
            n["policy_version"],
            if n["policy_current"] == true {
                " "
            } else {
                "*"
            },
            expires,
            n["last_seen_s"]
        );
    }
    let services = r["services"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "\nservices (calls since the gateway started):");
    for s in &services {
        let _ = writeln!(
            out,
            "  {:<20} endpoints {}/{}  calls {:>8}  failed {:>6} ({:.1}%)",
            s["name"].as_str().unwrap_or("?"),
            s["endpoints_up"],
            s["endpoints"],
            s["calls"],
            s["failed"],
            s["error_share"].as_f64().unwrap_or(0.0) * 100.0
        );
    }
    if let Some(gaps) = r["telemetry_gaps"].as_object()
        && !gaps.is_empty()
    {
        let _ = writeln!(out, "\ntelemetry gaps (batches lost, counted):");
        for (node, n) in gaps {
            let _ = writeln!(out, "  {node}: {n}");
        }
    }
    if let Some(cloud) = r["cloud"].as_object() {
        let _ = writeln!(
            out,
            "\ncloud bridge: {}, {} messages queued",
            if cloud.get("connected") == Some(&Value::Bool(true)) {
                "connected"
            } else {
                "NOT connected"
            },
            cloud
                .get("queue")
                .map_or(Value::Null, |q| q["messages"].clone())
        );
    }
    out
}

/// Runs `status` (or `nodes` when `nodes_only`) against `admin`; prints text or JSON.
pub async fn run(admin: Result<Admin, String>, json_out: bool, nodes_only: bool) -> ExitCode {
    let admin = match admin {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let report = match collect(&admin).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let wrong = if nodes_only {
        report["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["up"] != true))
    } else {
        report["healthy"] != true
    };
    match (json_out, nodes_only) {
        (true, true) => println!("{}", json!({ "nodes": report["nodes"] })),
        (true, false) => println!("{report}"),
        (false, true) => {
            let text = render(&report);
            let nodes: String = text
                .split("\nservices")
                .next()
                .unwrap_or("")
                .split_once("\nnodes:")
                .map_or(String::new(), |(_, rest)| format!("nodes:{rest}"));
            print!("{nodes}");
        }
        (false, false) => print!("{}", render(&report)),
    }
    if wrong {
        ExitCode::from(EXIT_WRONG)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_795_737_600), "2026-11-27 00:00:00");
        assert_eq!(utc(951_782_400 + 86_399), "2000-02-29 23:59:59");
    }

    #[test]
    fn a_down_node_a_nack_and_a_service_without_endpoints_come_first() {
        let nodes = json!({"nodes": [
            {"name": "a", "up": true, "version": "0.1.0", "policy_version": 3,
             "certificate": {"expires_in_s": 86_400 * 7}, "services": ["echo"], "last_seen_unix_ms": 0},
            {"name": "b", "up": false, "version": "0.1.0", "policy_version": 2,
             "certificate": {"expires_in_s": 3600}, "services": ["plc"], "last_seen_unix_ms": 0},
        ]});
        let policy = json!({"latest": 3, "nodes": [
            {"name": "a", "current": true, "error": null, "damaged": false},
            {"name": "b", "current": false, "error": "version 3: bundle needs mesh-node >= 99", "damaged": false},
        ]});
        let services = json!({"services": {"echo": [{"node": "a", "up": true}], "plc": [{"node": "b", "up": false}]}});
        let metrics = "starling_requests_total{service=\"echo\",method=\"say\",caller=\"c\",callee=\"a\",status=\"ok\"} 9\n\
                       starling_requests_total{service=\"echo\",method=\"say\",caller=\"c\",callee=\"a\",status=\"unavailable\"} 1\n\
                       starling_telemetry_gap_total{node=\"b\"} 2\n";
        let r = report(&nodes, &policy, &services, metrics, None);
        assert_eq!(r["healthy"], false);
        let problems: Vec<&str> = r["problems"]
            .as_array()
            .expect("problems")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(
            problems.iter().any(|p| p.starts_with("node b is down")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("node b refused the policy: version 3")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("node b's certificate expires in 1 h")),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"service plc has no endpoint up"),
            "{problems:?}"
        );
        assert_eq!(problems.len(), 4, "{problems:?}");
        let echo = &r["services"][0];
        assert_eq!(
            (echo["calls"].as_u64(), echo["failed"].as_u64()),
            (Some(10), Some(1))
        );
        assert_eq!(r["telemetry_gaps"]["b"], 2);
        let text = render(&r);
        assert!(
            text.starts_with("WRONG: 4 problem(s)\n  x node b is down"),
            "{text}"
        );
        assert!(text.contains("held by 1 of 2"), "{text}");
    }
}
