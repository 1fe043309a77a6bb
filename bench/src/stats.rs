//! Percentiles, CPU time, the table and the JSON.

use std::path::Path;
use std::time::Duration;

use crate::footprint::Footprint;
use crate::paths::Run;

/// The process's user + system CPU time so far (all threads).
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes into the struct we hand it.
    #[allow(unsafe_code)]
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// One path at one payload and concurrency, over all rounds.
pub struct Row {
    pub path: &'static str,
    pub payload: usize,
    pub inflight: usize,
    latencies: Vec<Duration>,
    wall: Duration,
    cpu: Duration,
}

impl Row {
    pub fn new(path: &'static str, payload: usize, inflight: usize) -> Row {
        Row {
            path,
            payload,
            inflight,
            latencies: Vec::new(),
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
        }
    }

    pub fn add(&mut self, run: Run, cpu: Duration) {
        self.latencies.extend(run.latencies);
        self.wall += run.wall;
        self.cpu += cpu;
    }

    fn pct(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    pub fn p50(&self) -> Duration {
        self.pct(0.50)
    }
    pub fn p99(&self) -> Duration {
        self.pct(0.99)
    }
    pub fn calls_per_sec(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64().max(1e-9)
    }
    pub fn cpu_per_call(&self) -> Duration {
        self.cpu / (self.latencies.len().max(1) as u32)
    }
}

/// New-handshake cost.
pub struct Handshake {
    pub count: usize,
    pub p50: Duration,
    pub cpu_per: Duration,
}

pub struct Report {
    pub rows: Vec<Row>,
    pub handshake: Handshake,
    pub footprint: Option<Footprint>,
    pub discovery: Option<crate::discovery::DiscoveryFigures>,
    pub loss: Option<crate::loss::LossFigures>,
    pub wrk: Option<crate::wrk::WrkFigures>,
    pub scale: Vec<crate::gateway_scale::ScaleFigures>,
    pub cloud: Option<crate::cloud_bridge::CloudFigures>,
    pub tcp: Option<crate::tcp_forward::TcpFigures>,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl Report {
    fn find(&self, path: &str, payload: usize, inflight: usize) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.path == path && r.payload == payload && r.inflight == inflight)
    }

    /// Throughput of the 1 MiB and 4 MiB rows, and whether time grows linearly with size.
    fn print_big_bodies(&self) {
        const MIB: usize = 1024 * 1024;
        let big: Vec<&Row> = self.rows.iter().filter(|r| r.payload >= MIB).collect();
        if big.is_empty() {
            return;
        }
        println!("\nbig bodies (sequential; MB/s counts the body once, each way):");
        for r in &big {
            let mbs = r.calls_per_sec() * r.payload as f64 / 1e6;
            let quinn = self
                .find("raw quinn mTLS", r.payload, r.inflight)
                .map(|q| q.calls_per_sec() * q.payload as f64 / 1e6);
            println!(
                "  {:<24} {:>4} MiB  {:>8.1} MB/s{}",
                r.path,
                r.payload / MIB,
                mbs,
                quinn
                    .map(|q| format!("  ({:.2}x raw quinn)", mbs / q))
                    .unwrap_or_default()
            );
        }
        for path in big
            .iter()
            .map(|r| r.path)
            .collect::<std::collections::BTreeSet<_>>()
        {
            if let (Some(one), Some(four)) = (self.find(path, MIB, 1), self.find(path, 4 * MIB, 1))
            {
                let per_mib_4 = us(four.p50()) / 4.0;
                println!(
                    "  {path:<24} time per MiB at 4 MiB / at 1 MiB: {:.2} (1.00 is linear)",
                    per_mib_4 / us(one.p50())
                );
            }
        }
    }

    pub fn print(&self) {
        println!(
            "{:<24} {:>7} {:>8} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
            "path",
            "payload",
            "inflight",
            "p50 us",
            "p99 us",
            "calls/s",
            "cpu us",
            "p50/quinn",
            "cpu/quinn"
        );
        for r in &self.rows {
            let q = self.find("raw quinn mTLS", r.payload, r.inflight);
            let ratio =
                |a: f64, b: Option<f64>| b.map(|b| format!("{:.2}x", a / b)).unwrap_or_default();
            println!(
                "{:<24} {:>7} {:>8} {:>9.1} {:>9.1} {:>10.0} {:>9.1} {:>9} {:>9}",
                r.path,
                r.payload,
                r.inflight,
                us(r.p50()),
                us(r.p99()),
                r.calls_per_sec(),
                us(r.cpu_per_call()),
                ratio(us(r.p50()), q.map(|q| us(q.p50()))),
                ratio(us(r.cpu_per_call()), q.map(|q| us(q.cpu_per_call()))),
            );
        }
        self.print_big_bodies();
        println!(
            "\nnew mTLS QUIC handshake: p50 {:.0} us, CPU {:.0} us (both sides), {} handshakes",
            us(self.handshake.p50),
            us(self.handshake.cpu_per),
            self.handshake.count
        );
        if let Some(f) = &self.footprint {
            f.print();
        }
        if let Some(d) = &self.discovery {
            d.print();
        }
        if let Some(l) = &self.loss {
            l.print();
        }
        if let Some(w) = &self.wrk {
            w.print();
        }
        for s in &self.scale {
            s.print();
        }
        if let Some(c) = &self.cloud {
            c.print();
        }
        if let Some(t) = &self.tcp {
            t.print();
        }
        println!("\ngoals (ratios from this run):");
        for (goal, ok, detail) in self.goals() {
            println!("  [{}] {goal}: {detail}", if ok { "met" } else { "MISSED" });
        }
    }

    /// The goals of the benchmark issue, judged on this run.
    pub fn goals(&self) -> Vec<(&'static str, bool, String)> {
        let mut out = Vec::new();
        if let (Some(q), Some(s), Some(i)) = (
            self.find("raw quinn mTLS", 64, 1),
            self.find("Starling Rust API", 64, 1),
            self.find("Starling HTTP ingress", 64, 1),
        ) {
            self.path_goals(q, s, i, &mut out);
        }
        let plain = self.scale.iter().find(|s| s.nodes == 100 && !s.cloud);
        let bridged = self.scale.iter().find(|s| s.nodes == 100 && s.cloud);
        if let (Some(p), Some(b)) = (plain, bridged) {
            let added = b.cpu_percent - p.cpu_percent;
            out.push((
                "the cloud bridge adds under 5% CPU to the gateway at 100 nodes",
                added < 5.0,
                format!(
                    "{:+.1} points ({:.1}% bridged, {:.1}% not; telemetry every 5 s per node, the device default)",
                    added, b.cpu_percent, p.cpu_percent
                ),
            ));
        }
        if let Some(c) = &self.cloud {
            let r = c.drain_ratio();
            out.push((
                "a one-hour backlog of 100 nodes drains at least 20x faster than it built up",
                r >= 20.0,
                format!("{r:.0}x ({:.1} s)", c.drain.as_secs_f64()),
            ));
        }
        if let Some(s) = self.scale.iter().find(|s| s.nodes >= 10_000) {
            let all = s.joined == s.nodes && s.acked == s.nodes;
            out.push((
                "10,000 nodes on one gateway: all join, under one core and 500 MB",
                // 500 MB as the footprint's 4 MB: decimal (476.8 MiB).
                s.joined == s.nodes && s.cpu_percent < 100.0 && s.rss_kib * 1024 < 500_000_000,
                format!(
                    "{} of {} joined in {:.0} s; CPU {:.1}% of a core, RSS {:.1} MiB ({:.1} MB)",
                    s.joined,
                    s.nodes,
                    s.join_time.as_secs_f64(),
                    s.cpu_percent,
                    s.rss_kib as f64 / 1024.0,
                    s.rss_kib as f64 * 1024.0 / 1e6
                ),
            ));
            out.push((
                "policy change acked by 10,000 nodes: p99 under 2 s",
                all && s.policy_p99.as_secs_f64() < 2.0,
                if all {
                    format!(
                        "p99 {:.0} ms to reach a node, all acked in {:.0} ms",
                        s.policy_p99.as_secs_f64() * 1e3,
                        s.policy_all.as_secs_f64() * 1e3
                    )
                } else {
                    format!(
                        "{} of {} acked within 60 s (p99 over those {:.0} ms)",
                        s.acked,
                        s.nodes,
                        s.policy_p99.as_secs_f64() * 1e3
                    )
                },
            ));
        }
        if let Some(s) = self
            .scale
            .iter()
            .find(|s| s.nodes >= 1000 && s.acked == s.nodes)
        {
            let p99 = s.policy_p99.as_secs_f64();
            out.push((
                "policy change acked by 1,000 nodes: p99 under 1 s",
                p99 < 1.0,
                format!(
                    "p99 {:.0} ms to reach a node, all acked in {:.0} ms",
                    p99 * 1e3,
                    s.policy_all.as_secs_f64() * 1e3
                ),
            ));
        }
        if let Some(f) = &self.footprint {
            if let Some(size) = f.size("aarch64-unknown-linux-musl", "mesh-node") {
                out.push((
                    "mesh-node aarch64 stripped <= 4 MB",
                    size <= 4_000_000,
                    format!("{:.2} MB", size as f64 / 1e6),
                ));
            }
            if let Some(rss) = f.rss_10_peers_kib {
                out.push((
                    "idle RSS with 10 peers <= 8 MB (native)",
                    rss <= 8 * 1024,
                    format!("{:.1} MiB", rss as f64 / 1024.0),
                ));
            }
            // Judged on the build the devices run (musl, with mimalloc) when it was measured.
            let judged = match (f.anon_100_peers_musl_kib, f.anon_100_peers_kib) {
                (Some(musl), _) => Some((musl, "the musl build, as on the devices")),
                (None, Some(glibc)) => Some((glibc, "glibc's allocator; no musl build")),
                (None, None) => None,
            };
            if let Some((kib, which)) = judged {
                out.push((
                    "RssAnon with 100 peers <= 4 MB",
                    kib * 1024 <= 4_000_000,
                    format!("{:.2} MB ({which})", (kib * 1024) as f64 / 1e6),
                ));
            }
        }
        out
    }

    /// The goals of the call paths (64 B, sequential; zenoh's when it was measured).
    fn path_goals(&self, q: &Row, s: &Row, i: &Row, out: &mut Vec<(&'static str, bool, String)>) {
        let p = us(s.p50()) / us(q.p50());
        out.push((
            "Rust API p50 <= 1.3x raw quinn (64 B, sequential)",
            p <= 1.3,
            format!("{p:.2}x"),
        ));
        let c = us(s.cpu_per_call()) / us(q.cpu_per_call());
        out.push((
            "Rust API CPU/call <= 1.5x raw quinn",
            c <= 1.5,
            format!("{c:.2}x"),
        ));
        let g = us(i.p50()) / us(s.p50());
        out.push(("ingress p50 <= 2x Rust API", g <= 2.0, format!("{g:.2}x")));
        if let Some(pol) = self.find("Starling API, 50 rules", 64, 1) {
            let p = us(pol.p50()) / us(s.p50()) - 1.0;
            let c = us(pol.cpu_per_call()) / us(s.cpu_per_call()) - 1.0;
            out.push((
                "a 50-rule policy adds under 5% (p50 and CPU per call)",
                p < 0.05 && c < 0.05,
                format!("p50 {:+.1}%, CPU {:+.1}%", p * 100.0, c * 100.0),
            ));
        }
        if let (Some(z), Some(z64), Some(s64)) = (
            self.find("zenoh get/queryable", 64, 1),
            self.find("zenoh get/queryable", 64, 64),
            self.find("Starling Rust API", 64, 64),
        ) {
            let r = us(z.p50()) / us(s.p50());
            out.push((
                "p50 at least 2x lower than zenoh",
                r >= 2.0,
                format!("{r:.2}x lower"),
            ));
            let t = s64.calls_per_sec() / z64.calls_per_sec();
            out.push((
                "calls/s at 64 in flight at least 3x zenoh",
                t >= 3.0,
                format!("{t:.2}x"),
            ));
        }
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let rows: Vec<serde_json::Value> = self
            .rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "path": r.path, "payload": r.payload, "inflight": r.inflight,
                    "p50_us": us(r.p50()), "p99_us": us(r.p99()),
                    "calls_per_sec": r.calls_per_sec(), "cpu_us_per_call": us(r.cpu_per_call()),
                    "calls": r.latencies.len(),
                })
            })
            .collect();
        let goals: Vec<serde_json::Value> = self
            .goals()
            .into_iter()
            .map(|(g, ok, d)| serde_json::json!({"goal": g, "met": ok, "value": d}))
            .collect();
        let json = serde_json::json!({
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
            "machine": machine(),
            "rows": rows,
            "handshake": {"p50_us": us(self.handshake.p50), "cpu_us": us(self.handshake.cpu_per), "count": self.handshake.count},
            "footprint": self.footprint.as_ref().map(Footprint::json),
            "discovery": self.discovery.as_ref().map(crate::discovery::DiscoveryFigures::json),
            "loss": self.loss.as_ref().map(crate::loss::LossFigures::json),
            "wrk": self.wrk.as_ref().map(crate::wrk::WrkFigures::json),
            "gateway_scale": self.scale.iter().map(crate::gateway_scale::ScaleFigures::json).collect::<Vec<_>>(),
            "cloud_bridge": self.cloud.as_ref().map(crate::cloud_bridge::CloudFigures::json),
            "tcp_forward": self.tcp.as_ref().map(crate::tcp_forward::TcpFigures::json),
            "goals": goals,
        });
        let latest = dir.join("latest.json");
        if let Ok(prev) = std::fs::read_to_string(&latest) {
            compare(&prev, &json);
            std::fs::write(dir.join("previous.json"), prev)?;
        }
        std::fs::write(&latest, serde_json::to_string_pretty(&json)?)?;
        println!("\nresults written to {}", latest.display());
        Ok(())
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    format!(
        "{cpu}, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    )
}

/// Prints how this run's ratios to raw quinn moved against the last run's.
fn compare(prev: &str, now: &serde_json::Value) {
    let Ok(prev) = serde_json::from_str::<serde_json::Value>(prev) else {
        return;
    };
    let ratio = |v: &serde_json::Value, path: &str| -> Option<f64> {
        let rows = v["rows"].as_array()?;
        let p = |name: &str| {
            rows.iter()
                .find(|r| r["path"] == name && r["payload"] == 64 && r["inflight"] == 1)
                .and_then(|r| r["p50_us"].as_f64())
        };
        Some(p(path)? / p("raw quinn mTLS")?)
    };
    println!("\nagainst the previous run (p50 / raw quinn, 64 B sequential):");
    for path in ["Starling Rust API", "Starling HTTP ingress"] {
        if let (Some(a), Some(b)) = (ratio(&prev, path), ratio(now, path)) {
            println!("  {path:<24} {a:.2}x -> {b:.2}x");
        }
    }
}
