//! Calls through packet loss in the lab: two `mesh-node` processes in network namespaces, one in
//! ten UDP packets dropped in and out of the callee's host (nftables, random), and `mesh-node
//! call --repeat N` (64 B bodies' size class: a health answer) made one after another from the
//! caller's host. Figures: p50, p99 and max of a call, and failures (the goal allows none).
//! Needs root (namespaces).

use std::process::Command;
use std::time::Duration;

use starling_tests::lab::Lab;
use starling_tests::{NodeProc, Pki};

pub struct LossFigures {
    pub calls: u32,
    pub one_in: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub failures: u64,
    /// QUIC packets per second on the idle link between the two nodes (both ways), before the
    /// loss: the keep-alives and their acknowledgements.
    pub idle_packets_per_s: f64,
}

/// Counts the QUIC packets (port 7400) in and out of lab host `ns`.
fn count_quic(ns: &str) -> anyhow::Result<()> {
    let rules = "table inet starling_count {\n\
           chain in { type filter hook input priority -10; udp dport 7400 counter; }\n\
           chain out { type filter hook output priority -10; udp sport 7400 counter; }\n\
         }\n";
    let file = tempfile::NamedTempFile::new()?;
    std::fs::write(file.path(), rules)?;
    let path = file.path().display().to_string();
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", &path])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "nft: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The QUIC packets counted so far in host `ns`.
fn quic_packets(ns: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "list",
            "table",
            "inet",
            "starling_count",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .split("packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .sum())
}

/// The number after `key` in `text` ("p99 12.34 ms" -> 12.34).
fn figure(text: &str, key: &str) -> Option<f64> {
    text.split(key)
        .nth(1)?
        .split_whitespace()
        .next()?
        .trim_end_matches(',')
        .parse()
        .ok()
}

/// How long the idle link is watched.
const IDLE: Duration = Duration::from_secs(10);

pub fn measure(calls: u32, one_in: u32) -> anyhow::Result<LossFigures> {
    let lab = Lab::new(2);
    let pki = Pki::new();
    let node = crate::footprint::native_node().display().to_string();
    let start = |i: usize, name: &str, extra: &str| -> anyhow::Result<NodeProc> {
        let mut cmd = lab.exec_prefix(i);
        cmd.push(node.clone());
        Ok(NodeProc::start_cmd(
            name,
            &cmd,
            &starling_tests::lab::config(&pki, name, extra),
        ))
    };
    let h0 = start(0, "h0", "")?;
    let _h1 = start(
        1,
        "h1",
        "[[services]]\nname = \"lossy\"\nupstream = \"builtin:health\"\n",
    )?;
    h0.wait_peer("h1", Duration::from_secs(30));
    let ns = lab.hosts[1].ns.clone();
    count_quic(&ns)?;
    let (before, since) = (quic_packets(&ns)?, std::time::Instant::now());
    std::thread::sleep(IDLE);
    let idle_packets_per_s = (quic_packets(&ns)? - before) as f64 / since.elapsed().as_secs_f64();
    lab.drop_udp(1, one_in);
    let mut cmd = lab.exec_prefix(0);
    cmd.push(node.clone());
    let out = Command::new(&cmd[0])
        .args(&cmd[1..])
        .args(["call", "lossy", "check", "--ingress", "127.0.0.1:7480"])
        .args(["--timeout-ms", "5000", "--repeat", &calls.to_string()])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // What `mesh-node call --repeat` prints: "N calls: p50 .. ms, p99 .. ms, max .. ms, ...".
    let summary = stderr
        .lines()
        .find(|l| l.contains(" calls: p50 "))
        .ok_or_else(|| anyhow::anyhow!("no summary from mesh-node call: {stderr}"))?
        .trim()
        .to_owned();
    let num =
        |key: &str| figure(&summary, key).ok_or_else(|| anyhow::anyhow!("no {key} in {summary:?}"));
    Ok(LossFigures {
        calls,
        one_in,
        p50_ms: num("p50 ")?,
        p99_ms: num("p99 ")?,
        max_ms: num("max ")?,
        failures: num("failures ")? as u64,
        idle_packets_per_s,
    })
}

impl LossFigures {
    pub fn print(&self) {
        println!(
            "\n{} calls one after another through 1 in {} UDP packets lost each way (lab): \
             p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, failures {}",
            self.calls, self.one_in, self.p50_ms, self.p99_ms, self.max_ms, self.failures
        );
        println!(
            "  the idle link between the two nodes before the loss: {:.1} QUIC packets/s (both ways)",
            self.idle_packets_per_s
        );
        let met = self.p99_ms < 150.0 && self.failures == 0;
        println!(
            "  [{}] p99 under 150 ms through 10% loss, no failures: p99 {:.1} ms",
            if met { "met" } else { "MISSED" },
            self.p99_ms
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls,
            "one_in": self.one_in,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
            "failures": self.failures,
            "idle_packets_per_s": self.idle_packets_per_s,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_summary() {
        let s = "1000 calls: p50 0.41 ms, p99 52.10 ms, max 210.00 ms, failures 0";
        assert_eq!(super::figure(s, "p99 "), Some(52.10));
        assert_eq!(super::figure(s, "failures "), Some(0.0));
    }
}
