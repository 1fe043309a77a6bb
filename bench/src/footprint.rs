//! Footprint: stripped device binary sizes (from `cross/build.sh`), and the idle RSS of real
//! `mesh-node` processes (native, size-tuned build) with 0, 10 and 100 peers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_gateway::ca::Ca;

const TARGETS: [&str; 2] = [
    "aarch64-unknown-linux-musl",
    "armv7-unknown-linux-gnueabihf",
];
const BINARIES: [&str; 2] = ["mesh-node", "mesh-gateway"];
/// A native build with the devices' C library (`scripts/bench.sh` makes it): the heap figures
/// of glibc's allocator, which the native build has, are not the devices'.
const MUSL: &str = "x86_64-unknown-linux-musl";

pub struct Footprint {
    /// (target, binary, bytes) of each device build found.
    pub sizes: Vec<(String, String, u64)>,
    pub rss_0_peers_kib: Option<u64>,
    pub rss_10_peers_kib: Option<u64>,
    /// The anonymous (heap and stacks) part of the 10-peer RSS; the rest is the binary's code.
    pub anon_10_peers_kib: Option<u64>,
    pub rss_100_peers_kib: Option<u64>,
    /// The anonymous part of the 100-peer RSS (issue 17: at most 4 MB).
    pub anon_100_peers_kib: Option<u64>,
    /// The same built as the aarch64 devices' node is, for musl, with its allocator (mimalloc):
    /// an x86_64 musl build of the same code, when there is one.
    pub anon_100_peers_musl_kib: Option<u64>,
    /// Which binary the RSS figures are of.
    pub binary: String,
}

impl Footprint {
    pub fn size(&self, target: &str, binary: &str) -> Option<u64> {
        self.sizes
            .iter()
            .find(|(t, b, _)| t == target && b == binary)
            .map(|(_, _, s)| *s)
    }

    pub fn print(&self) {
        println!("\nfootprint:");
        if self.sizes.is_empty() {
            println!("  no device builds found; run cross/build.sh first");
        }
        for (t, b, s) in &self.sizes {
            println!("  {b:<13} {t:<32} {:>6.2} MB stripped", *s as f64 / 1e6);
        }
        for (peers, rss) in [
            (0, self.rss_0_peers_kib),
            (10, self.rss_10_peers_kib),
            (100, self.rss_100_peers_kib),
        ] {
            match rss {
                Some(kib) => println!(
                    "  idle RSS, native mesh-node, {peers:>3} peers: {:.1} MiB",
                    kib as f64 / 1024.0
                ),
                None => {
                    println!("  idle RSS with {peers} peers: no native build of mesh-node found")
                }
            }
        }
        for (peers, anon) in [(10, self.anon_10_peers_kib), (100, self.anon_100_peers_kib)] {
            if let Some(anon) = anon {
                println!(
                    "    of which heap and stacks (RssAnon) with {peers:>3} peers: {:.1} MiB",
                    anon as f64 / 1024.0,
                );
            }
        }
        if let Some(anon) = self.anon_100_peers_musl_kib {
            println!(
                "    the same built for musl (mimalloc), as on the aarch64 devices: {:.1} MiB",
                anon as f64 / 1024.0,
            );
        }
        if self.rss_0_peers_kib.is_some() {
            println!("    binary {}", self.binary);
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "sizes": self.sizes.iter().map(|(t, b, s)| serde_json::json!({"target": t, "binary": b, "bytes": s})).collect::<Vec<_>>(),
            "rss_0_peers_kib": self.rss_0_peers_kib,
            "rss_10_peers_kib": self.rss_10_peers_kib,
            "anon_10_peers_kib": self.anon_10_peers_kib,
            "rss_100_peers_kib": self.rss_100_peers_kib,
            "anon_100_peers_kib": self.anon_100_peers_kib,
            "anon_100_peers_musl_kib": self.anon_100_peers_musl_kib,
            "binary": self.binary,
        })
    }
}

pub fn measure() -> anyhow::Result<Footprint> {
    let target = target_dir();
    let mut sizes = Vec::new();
    for t in TARGETS {
        for b in BINARIES {
            if let Ok(meta) = std::fs::metadata(target.join(t).join("device").join(b)) {
                sizes.push((t.to_owned(), b.to_owned(), meta.len()));
            }
        }
    }
    let node = native_node();
    let (rss0, rss10, rss100) = if node.exists() {
        (
            Some(idle_rss(&node, 0, false)?),
            Some(idle_rss(&node, 10, false)?),
            Some(idle_rss(&node, 100, true)?),
        )
    } else {
        (None, None, None)
    };
    let musl = target.join(MUSL).join("device").join("mesh-node");
    // Optional, as the build is: a failure is said, and the other figures stand.
    let musl100 = musl
        .exists()
        .then(|| idle_rss(&musl, 100, false))
        .and_then(|r| {
            r.map_err(|e| eprintln!("footprint: the musl node: {e:#}"))
                .ok()
        });
    Ok(Footprint {
        sizes,
        rss_0_peers_kib: rss0.map(|(rss, _)| rss),
        rss_10_peers_kib: rss10.map(|(rss, _)| rss),
        anon_10_peers_kib: rss10.map(|(_, anon)| anon),
        rss_100_peers_kib: rss100.map(|(rss, _)| rss),
        anon_100_peers_kib: rss100.map(|(_, anon)| anon),
        anon_100_peers_musl_kib: musl100.map(|(_, anon)| anon),
        binary: node.display().to_string(),
    })
}

/// The native `mesh-node` to measure: the size-tuned `device` profile build (stripped, as on a
/// device, so its code pages are what a device maps) when there is one, else the release build.
pub fn native_node() -> PathBuf {
    let target = target_dir();
    let device = target.join("device").join("mesh-node");
    if device.exists() {
        device
    } else {
        target.join("release").join("mesh-node")
    }
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A command that runs `bin`, under the profiler the environment variable `var` names (its
/// words, then `bin`) when it is set; and whether it is so wrapped.
pub fn wrapped_command(var: &str, bin: &Path) -> (Command, bool) {
    let wrap = if var.is_empty() {
        String::new()
    } else {
        std::env::var(var).unwrap_or_default()
    };
    let mut words = wrap.split_whitespace();
    match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(bin);
            (c, true)
        }
        None => (Command::new(bin), false),
    }
}

/// Starts `peers` nodes, then one that dials them all; returns its `(RSS, anonymous RSS)` in KiB
/// once it is connected and has idled for two seconds. With `profiled`, the last node runs under
/// the profiler `STARLING_BENCH_NODE_WRAP` names, if any.
fn idle_rss(bin: &Path, peers: usize, profiled: bool) -> anyhow::Result<(u64, u64)> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::generate("bench.local")?;
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..=peers {
        let name = format!("n{i}");
        let nd = dir.path().join(&name);
        ca.issue_node(&name, 1)?
            .save(&nd.join("certs"), ca.cert_pem())?;
        let mut toml = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"info\"\nstate_dir = \"state\"\n\
             [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
             [discovery]\nmdns = false\n[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n"
        );
        let last = i == peers;
        if last {
            for a in &addrs {
                toml.push_str(&format!("[[peers]]\naddr = \"{a}\"\n"));
            }
        }
        std::fs::write(nd.join("node.toml"), toml)?;
        // STARLING_BENCH_NODE_WRAP="heaptrack -o /tmp/node" runs the measured node of the
        // 100-peer run (the one that dials the others) under a profiler; its figures are then
        // the wrapper's. One run only: a profiler's output file would be overwritten.
        let wrap = if last && profiled {
            "STARLING_BENCH_NODE_WRAP"
        } else {
            ""
        };
        let (mut command, wrapped) = wrapped_command(wrap, bin);
        let child = command
            .args(["run", "--config"])
            .arg(nd.join("node.toml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let pid = child.id().to_string();
        procs.push(Proc(child));
        let state = nd.join("state");
        let deadline = Instant::now() + Duration::from_secs(60);
        let (quic, ingress) = loop {
            if let Some(e) = mesh_node::state::read_lock_file(&state)
                && (wrapped || e.get("pid") == Some(&pid))
                && let (Some(q), Some(i)) = (e.get("quic"), e.get("ingress"))
            {
                break (q.clone(), i.parse::<std::net::SocketAddr>()?);
            }
            anyhow::ensure!(Instant::now() < deadline, "node did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        if last {
            // Until its status lists every peer.
            loop {
                let status = starling_tests::http_get_blocking(ingress, "/v1/status")
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
                if status.is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.len() == peers)) {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "node did not connect");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        addrs.push(quic);
    }
    std::thread::sleep(Duration::from_secs(2));
    let pid = procs.last().context("node")?.0.id();
    let rss = rss_of(pid).context("reading RSS");
    if let Some(node_pid) =
        mesh_node::state::read_lock_file(&dir.path().join(format!("n{peers}/state")))
            .and_then(|e| e.get("pid").and_then(|p| p.parse::<i32>().ok()))
        && node_pid as u32 != pid
    {
        // A wrapped node: stopped cleanly, so that its profiler writes everything.
        let _ = Command::new("kill").arg(node_pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{node_pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    rss
}

/// `(VmRSS, RssAnon)` of a process, in KiB.
pub fn rss_of(pid: u32) -> Option<(u64, u64)> {
    starling_tests::rss_kib(pid)
}
