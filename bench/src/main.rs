//! `mesh-bench`: what a Starling call costs, next to its baselines, measured in one run.
//!
//! The machine's speed drifts, so only ratios from one run compare. Every path runs in the same
//! process, in interleaved rounds: the "server" side of each path on one thread with its own
//! single-threaded runtime (as on a device), the "client" side on another. Latency is per call;
//! CPU per call is the whole process's user+system time (both sides) divided by the calls.
//!
//! Paths: raw UDP echo (the floor), raw quinn with mutual TLS and one bidirectional stream per call
//! (the transport's own cost), raw quinn with a stream kept per task for its calls one after
//! another (what Starling's kept streams do, with nothing else), a Starling call through the Rust API, a Starling call through the
//! local HTTP ingress to an HTTP upstream, and (feature `zenoh`) zenoh get/queryable. TCP through a
//! forward next to direct TCP and raw quinn (`tcp_forward`).
//!
//! `scripts/bench.sh` runs it; results go to `bench-results/` as JSON and to stdout as a table.

mod cloud_bridge;
mod discovery;
mod footprint;
mod gateway_scale;
mod loss;
mod paths;
mod serial_line;
mod stats;
mod tcp_forward;
mod wrk;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

use crate::paths::{Fixture, Kind};
use crate::stats::{Row, cpu_time};

/// Measures Starling against its baselines.
#[derive(Parser, Debug)]
#[command(name = "mesh-bench")]
struct Args {
    /// Interleaved rounds per path.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Calls per path per round, sequential.
    #[arg(long, default_value_t = 2000)]
    calls: usize,
    /// Calls per path per round with 64 in flight.
    #[arg(long, default_value_t = 20000)]
    concurrent_calls: usize,
    /// Calls per path per round of 1 MiB (half that of 4 MiB), sequential.
    #[arg(long, default_value_t = 40)]
    big_calls: usize,
    /// New mTLS handshakes to time.
    #[arg(long, default_value_t = 50)]
    handshakes: usize,
    /// Where JSON results go.
    #[arg(long, default_value = "bench-results")]
    out: PathBuf,
    /// Skip the footprint section (sizes, idle RSS of real node processes).
    #[arg(long)]
    no_footprint: bool,
    /// Only the paths whose names contain one of these words (e.g. `quinn,starling`); all by default.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Lab nodes for the discovery figure (network namespaces: needs root); 0 skips it.
    #[arg(long, default_value_t = 10)]
    lab_nodes: usize,
    /// Calls over a serial line at 115200 baud to firmware-shim (0 skips it; needs socat).
    #[arg(long, default_value_t = 300)]
    serial_calls: usize,
    /// Simulated node counts for the gateway-scale figures (comma-separated; empty skips them).
    #[arg(long, default_value = "100,1000", value_delimiter = ',')]
    gateway_nodes: Vec<usize>,
    /// Messages of the cloud bridge's backlog figure (one hour of 100 nodes: 72000); 0 skips
    /// the cloud figures, which need mosquitto.
    #[arg(long, default_value_t = 72_000)]
    cloud_backlog: usize,
    /// Payload sizes of the path figures, in bytes (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64usize, 16 * 1024, 1024 * 1024, 4 * 1024 * 1024])]
    payloads: Vec<usize>,
    /// Calls through 10% UDP loss in the lab (needs root; 0 skips them).
    #[arg(long, default_value_t = 1000)]
    loss_calls: u32,
    /// Interleaved rounds of the TCP forward figures (64 MiB upload, round trips); 0 skips them.
    #[arg(long, default_value_t = 3)]
    tcp_rounds: usize,
}

/// Built for musl, the bench measures the calls with the allocator the devices' nodes have.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fixture = client_rt.block_on(Fixture::start())?;

    let kinds: Vec<Kind> = Kind::all()
        .into_iter()
        .filter(|k| {
            args.paths.is_empty()
                || args
                    .paths
                    .iter()
                    .any(|p| k.name().to_lowercase().contains(&p.to_lowercase()))
        })
        .collect();
    let mut rows: Vec<Row> = Vec::new();
    for &payload in &args.payloads {
        // Big bodies: sequential only (throughput and linearity, not concurrency).
        let concurrency: &[usize] = if payload > 64 * 1024 { &[1] } else { &[1, 64] };
        // Raw UDP carries one datagram: it has no row for bigger payloads.
        let kinds: Vec<Kind> = kinds
            .iter()
            .copied()
            .filter(|k| *k != Kind::Udp || payload <= paths::MAX_UDP_PAYLOAD)
            .collect();
        for &inflight in concurrency {
            let calls = match (payload, inflight) {
                (p, _) if p > 1024 * 1024 => (args.big_calls / 2).max(2),
                (p, _) if p > 64 * 1024 => args.big_calls.max(2),
                (p, 1) if p > 1024 => args.calls / 2,
                (_, 1) => args.calls,
                (p, _) if p > 1024 => args.concurrent_calls / 2,
                _ => args.concurrent_calls,
            };
            eprintln!("measuring {payload} B payloads, {inflight} in flight");
            let mut acc: Vec<Row> = kinds
                .iter()
                .map(|k| Row::new(k.name(), payload, inflight))
                .collect();
            // Warm every path once, then interleave rounds so drift hits them alike.
            for kind in &kinds {
                let warm = (calls / 10 + 64).min(calls);
                client_rt.block_on(fixture.run(*kind, payload, inflight, warm))?;
            }
            for round in 0..args.rounds {
                // Odd rounds run the paths in reverse, so no path always follows the same one.
                let order: Vec<usize> = if round % 2 == 0 {
                    (0..kinds.len()).collect()
                } else {
                    (0..kinds.len()).rev().collect()
                };
                for i in order {
                    let kind = &kinds[i];
                    let cpu0 = cpu_time();
                    let run = client_rt.block_on(fixture.run(*kind, payload, inflight, calls))?;
                    acc[i].add(run, cpu_time() - cpu0);
                }
            }
            rows.extend(acc);
        }
    }
    let wrk = if kinds.contains(&Kind::Ingress) {
        eprintln!("measuring the ingress with wrk");
        let (ingress, upstream) = fixture.http_addrs();
        client_rt.block_on(wrk::measure(ingress, upstream, args.rounds.min(3)))?
    } else {
        None
    };
    eprintln!("measuring handshakes");
    let handshake = client_rt.block_on(fixture.handshakes(args.handshakes))?;
    let tcp = if args.tcp_rounds == 0 {
        None
    } else {
        eprintln!("measuring TCP through a forward, directly and over raw quinn");
        Some(
            client_rt
                .block_on(tcp_forward::measure(args.tcp_rounds))
                .context("tcp forward")?,
        )
    };
    let footprint = if args.no_footprint {
        None
    } else {
        eprintln!("measuring footprint");
        Some(footprint::measure().context("footprint")?)
    };
    let discovery = if args.lab_nodes >= 2 {
        eprintln!("measuring discovery with {} lab nodes", args.lab_nodes);
        Some(discovery::measure(args.lab_nodes).context("discovery")?)
    } else {
        None
    };
    let loss = if args.loss_calls > 0 && args.lab_nodes > 0 {
        eprintln!(
            "measuring {} calls through 10% loss in the lab",
            args.loss_calls
        );
        Some(loss::measure(args.loss_calls, 10).context("loss")?)
    } else {
        None
    };
    let mut scale = Vec::new();
    let gateway_bin = footprint::native_node().with_file_name("mesh-gateway");
    for n in args.gateway_nodes.iter().copied().filter(|n| *n > 0) {
        eprintln!("measuring a gateway with {n} simulated nodes");
        scale.push(gateway_scale::measure(&gateway_bin, n, None).context("gateway scale")?);
    }
    let mosquitto = mesh_gateway::cloud::local::mosquitto().is_some();
    let cloud = if args.cloud_backlog == 0 {
        None
    } else if !mosquitto {
        eprintln!("skipping the cloud bridge figures: mosquitto is not installed");
        None
    } else {
        eprintln!("measuring a gateway with 100 simulated nodes bridged to a local mosquitto");
        let dir = tempfile::tempdir()?;
        let broker = mesh_gateway::cloud::local::Broker::start(
            dir.path(),
            "gw",
            "starling/scale.local/gw",
            "cloud-app",
        )
        .map_err(anyhow::Error::msg)?;
        scale.push(gateway_scale::measure(&gateway_bin, 100, Some(&broker)).context("bridged")?);
        drop(broker);
        eprintln!(
            "measuring the cloud bridge's queue and a backlog of {}",
            args.cloud_backlog
        );
        Some(cloud_bridge::measure(args.cloud_backlog).context("cloud bridge")?)
    };
    let report = stats::Report {
        rows,
        handshake,
        footprint,
        discovery,
        loss,
        wrk,
        scale,
        cloud,
        tcp,
    };
    let serial = if args.serial_calls > 0 {
        eprintln!("measuring calls over a serial line");
        Some(serial_line::measure(115_200, args.serial_calls).context("serial line")?)
    } else {
        None
    };
    report.print();
    if let Some(serial) = &serial {
        serial.print();
    }
    report.save(&args.out)?;
    client_rt.block_on(fixture.shutdown());
    Ok(())
}
