//! Discovery in the lab: N real `mesh-node` processes in network namespaces find each other by
//! mDNS; the time from the last start until every node has every other as a peer, and the RSS of
//! each node then (N - 1 peers). Needs root (namespaces).

use std::time::{Duration, Instant};

use starling_tests::lab::Lab;
use starling_tests::{NodeProc, Pki};

pub struct DiscoveryFigures {
    pub nodes: usize,
    pub all_connected: Duration,
    pub rss_max_kib: u64,
    pub rss_median_kib: u64,
}

pub fn measure(n: usize) -> anyhow::Result<DiscoveryFigures> {
    let lab = Lab::new(n);
    let pki = Pki::new();
    let mut nodes = Vec::new();
    for i in 0..n {
        let name = format!("n{i}");
        let path = starling_tests::lab::config(
            &pki,
            &name,
            "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
        );
        let mut cmd = lab.exec_prefix(i);
        cmd.push(crate::footprint::native_node().display().to_string());
        nodes.push(NodeProc::start_cmd(&name, &cmd, &path));
    }
    let last_start = Instant::now();
    for node in &nodes {
        node.wait_peers(n - 1, Duration::from_secs(60));
    }
    let all_connected = last_start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let mut rss: Vec<u64> = nodes
        .iter()
        .map(|node| crate::footprint::rss_of(node.pid()).map_or(0, |(rss, _)| rss))
        .collect();
    rss.sort_unstable();
    Ok(DiscoveryFigures {
        nodes: n,
        all_connected,
        rss_max_kib: rss.last().copied().unwrap_or(0),
        rss_median_kib: rss[rss.len() / 2],
    })
}

impl DiscoveryFigures {
    pub fn print(&self) {
        println!(
            "\ndiscovery ({} lab nodes, mDNS only): all see each other {:.2} s after the last start; \
             RSS with {} peers: median {:.1} MiB, max {:.1} MiB",
            self.nodes,
            self.all_connected.as_secs_f64(),
            self.nodes - 1,
            self.rss_median_kib as f64 / 1024.0,
            self.rss_max_kib as f64 / 1024.0
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "nodes": self.nodes,
            "all_connected_s": self.all_connected.as_secs_f64(),
            "rss_median_kib": self.rss_median_kib,
            "rss_max_kib": self.rss_max_kib,
        })
    }
}
