//! A real HTTP load generator against the ingress: `wrk` (one thread, 64 connections, 64-byte
//! POST bodies) through node A's ingress to node B's HTTP upstream, next to `wrk` straight at
//! that upstream (the same echo server, no mesh), in interleaved rounds. The bench's own client
//! measures the same path in the table; this figure is not only our client's. Skipped when `wrk`
//! is not installed (`scripts/setup.sh` installs it).

use std::net::SocketAddr;

use tokio::process::Command;

pub struct WrkFigures {
    pub connections: u32,
    pub seconds: u32,
    /// Requests per second of each round, through the mesh.
    pub ingress_rps: Vec<f64>,
    /// The same straight at the upstream.
    pub upstream_rps: Vec<f64>,
    /// Latency percentiles through the mesh (last round): p50, p99 in ms.
    pub ingress_p50_ms: f64,
    pub ingress_p99_ms: f64,
}

/// A figure wrk prints after `key` ("Requests/sec:   1234.5"; "99%    1.23ms").
fn figure(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(key))?;
    let value = line.trim_start()[key.len()..].split_whitespace().next()?;
    let (number, scale) = if let Some(v) = value.strip_suffix("us") {
        (v, 1e-3)
    } else if let Some(v) = value.strip_suffix("ms") {
        (v, 1.0)
    } else if let Some(v) = value.strip_suffix('s') {
        (v, 1e3)
    } else {
        (value, 1.0)
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

async fn run(url: &str, script: &str, connections: u32, seconds: u32) -> anyhow::Result<String> {
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--latency", "-s", script, url])
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    anyhow::ensure!(out.status.success(), "wrk failed: {text}");
    // wrk counts answers that are not 2xx/3xx; every one must be.
    anyhow::ensure!(!text.contains("Non-2xx"), "wrk saw failed answers: {text}");
    // And every request answered: no connection errors or timeouts.
    anyhow::ensure!(
        !text.contains("Socket errors"),
        "wrk saw socket errors: {text}"
    );
    Ok(text)
}

/// Runs on the runtime that drives node A (its ingress answers only while it is polled).
pub async fn measure(
    ingress: SocketAddr,
    upstream: SocketAddr,
    rounds: usize,
) -> anyhow::Result<Option<WrkFigures>> {
    if Command::new("wrk").arg("-v").output().await.is_err() {
        eprintln!("skipping the wrk figures: wrk is not installed (scripts/setup.sh installs it)");
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", 64)\n\
         wrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n",
    )?;
    let script = script.display().to_string();
    let (connections, seconds) = (64, 3);
    let through = format!("http://{ingress}/v1/call/hecho/say");
    let direct = format!("http://{upstream}/say");
    let mut figures = WrkFigures {
        connections,
        seconds,
        ingress_rps: Vec::new(),
        upstream_rps: Vec::new(),
        ingress_p50_ms: 0.0,
        ingress_p99_ms: 0.0,
    };
    let rps = |text: &str| {
        figure(text, "Requests/sec:").ok_or_else(|| anyhow::anyhow!("no Requests/sec in {text}"))
    };
    for round in 0..rounds.max(1) {
        let mut mesh = None;
        for first in [round % 2 == 0, round % 2 == 1] {
            if first {
                mesh = Some(run(&through, &script, connections, seconds).await?);
            } else {
                let text = run(&direct, &script, connections, seconds).await?;
                figures.upstream_rps.push(rps(&text)?);
            }
        }
        let mesh = mesh.ok_or_else(|| anyhow::anyhow!("no run through the mesh"))?;
        figures.ingress_rps.push(rps(&mesh)?);
        figures.ingress_p50_ms = figure(&mesh, "50%").unwrap_or(0.0);
        figures.ingress_p99_ms = figure(&mesh, "99%").unwrap_or(0.0);
    }
    Ok(Some(figures))
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl WrkFigures {
    pub fn print(&self) {
        println!(
            "\nwrk (1 thread, {} connections, 64 B POST bodies, {} s a round; median of {} rounds):",
            self.connections,
            self.seconds,
            self.ingress_rps.len()
        );
        println!(
            "  through the HTTP ingress to the HTTP upstream  {:>9.0} requests/s  (p50 {:.2} ms, p99 {:.2} ms)",
            median(&self.ingress_rps),
            self.ingress_p50_ms,
            self.ingress_p99_ms
        );
        println!(
            "  straight at the HTTP upstream (no mesh)       {:>9.0} requests/s",
            median(&self.upstream_rps)
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "connections": self.connections,
            "ingress_requests_per_s": median(&self.ingress_rps),
            "upstream_requests_per_s": median(&self.upstream_rps),
            "ingress_p50_ms": self.ingress_p50_ms,
            "ingress_p99_ms": self.ingress_p99_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_wrks_figures() {
        let text = "  Latency Distribution\n     50%    1.02ms\n     99%  850.00us\n\
                    Requests/sec:  51234.56\nTransfer/sec:      4.56MB\n";
        assert_eq!(super::figure(text, "Requests/sec:"), Some(51234.56));
        assert_eq!(super::figure(text, "50%"), Some(1.02));
        assert_eq!(super::figure(text, "99%"), Some(0.85));
    }
}
