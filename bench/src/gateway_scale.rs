//! Gateway scale: one real `mesh-gateway` process, and N simulated nodes in this process, each
//! with its own certificate and its own mutual-TLS QUIC connection, each holding a control stream
//! and sending a telemetry batch every [`TELEMETRY_EVERY`] (a device's default). When not every
//! node joins in time, the figures say how many did and how long it took, and the rest is skipped. Measured: the gateway's CPU and RSS in steady state,
//! how long a policy change takes to be acknowledged by every node, and what renewing every
//! node's certificate costs the gateway (each node renews once over its control stream: the CPU
//! the burst took above the steady state, per renewal, and spread over a certificate lifetime).
//!
//! The simulated nodes speak the real protocol (peer hello, control hello, telemetry, policy acks)
//! through the real transport; what they skip is serving calls.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_gateway::ca::Ca;
use mesh_node::config::Limits;
use mesh_node::identity::Identity;
use mesh_node::wire::FrameReader;
use mesh_proto::Status;
use mesh_proto::control::{
    CONTROL_SERVICE, CallStats, Down, LATENCY_BUCKETS_US, MAX_CONTROL_FRAME, NodeHello, Resources,
    TelemetryBatch, Up,
};
use mesh_proto::{Hello, RequestHead, Role};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The lifetime renewals are spread over in the figure: the issuer's default, 7 days.
const LIFETIME: Duration = Duration::from_secs(7 * 86_400);
/// Simulated nodes that start connecting each second (a site whose devices boot together).
const JOINS_PER_SECOND: u64 = 200;
/// How often each simulated node sends telemetry: `[telemetry] interval_ms` on a device.
const TELEMETRY_EVERY: Duration = Duration::from_secs(5);

pub struct ScaleFigures {
    /// The gateway was bridged to a local mosquitto (every batch went up to the cloud).
    pub cloud: bool,
    /// Nodes that joined (up, with the policy) within the bound; the rest is measured only when
    /// all did.
    pub joined: usize,
    /// From the first connection until the last node joined (or the bound).
    pub join_time: Duration,
    /// Nodes that acknowledged the policy change within a minute.
    pub acked: usize,
    /// Nodes whose renewal came back within two minutes.
    pub renewed: usize,
    pub renew_cpu_ms: f64,
    pub renew_all: Duration,
    pub nodes: usize,
    pub cpu_percent: f64,
    pub rss_kib: u64,
    pub policy_p50: Duration,
    pub policy_p99: Duration,
    pub policy_all: Duration,
    pub dashboard: Dashboard,
}

/// What one browser watching the dashboard costs.
pub struct Dashboard {
    /// Gateway CPU added while the overview is polled every 2 s, % of a core.
    pub cpu_percent: f64,
    /// The page, its script and style.
    pub page_bytes: usize,
    /// One overview answer.
    pub overview_bytes: usize,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Policy arrivals: (version, when) per simulated node.
type Arrivals = Arc<Mutex<Vec<(u64, Instant)>>>;

/// What makes every simulated node renew once, and how many got their certificate.
struct Renewals {
    go: tokio::sync::watch::Sender<bool>,
    done: std::sync::atomic::AtomicUsize,
}

impl Default for Renewals {
    fn default() -> Self {
        Renewals {
            go: tokio::sync::watch::Sender::new(false),
            done: Default::default(),
        }
    }
}

/// With `cloud`, the gateway is bridged to that broker (as the site `gw`).
pub fn measure(
    gateway_bin: &std::path::Path,
    nodes: usize,
    cloud: Option<&mesh_gateway::cloud::local::Broker>,
) -> anyhow::Result<ScaleFigures> {
    let dir = tempfile::tempdir()?;
    let ca = Ca::generate("scale.local")?;
    let gw_dir = dir.path().join("gw");
    ca.issue_gateway("gw", 1)?
        .save(&gw_dir.join("certs"), ca.cert_pem())?;
    let issuer = ca.issue_issuer("gw", 1)?;
    std::fs::create_dir_all(gw_dir.join("issuer"))?;
    mesh_gateway::ca::write_new(
        &gw_dir.join("issuer/issuer.key"),
        issuer.key_pem.as_bytes(),
        0o600,
    )?;
    std::fs::write(gw_dir.join("issuer/issuer.crt"), &issuer.cert_pem)?;
    std::fs::write(
        gw_dir.join("policy.toml"),
        "[defaults]\ncall_timeout_ms = 5000\n",
    )?;
    let mut toml = "name = \"gw\"\nlisten = \"127.0.0.1:0\"\ningress = \"off\"\nlog = \"warn,mesh_gateway=info\"\n\
         admin = \"127.0.0.1:0\"\npolicy = \"policy.toml\"\nstate_dir = \"state\"\n\
         [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
         [discovery]\nmdns = false\n\
         [issuer]\ncert = \"issuer/issuer.crt\"\nkey = \"issuer/issuer.key\"\n"
        .to_owned();
    if let Some(broker) = cloud {
        let (crt, key) = broker.pki.issue("gw", false).map_err(anyhow::Error::msg)?;
        toml.push_str(&format!(
            "[cloud]\nbroker = \"{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            broker.url(),
            broker.pki.ca().display(),
            crt.display(),
            key.display()
        ));
    }
    std::fs::write(gw_dir.join("gateway.toml"), toml)?;
    // STARLING_BENCH_GATEWAY_WRAP="heaptrack -o /tmp/gw" runs the gateway under a profiler
    // (the figures then follow the process its lock file names).
    let (mut command, wrapped) =
        crate::footprint::wrapped_command("STARLING_BENCH_GATEWAY_WRAP", gateway_bin);
    let mut child = command
        .args(["run", "--config"])
        .arg(gw_dir.join("gateway.toml"))
        .env("RUST_LOG", "warn,mesh_gateway=info,mesh_node=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("mesh-gateway")?;
    let stderr = child.stderr.take().context("stderr")?;
    let pid = child.id();
    let _gw = Proc(child);
    // Drain the gateway's log so it never blocks on a full pipe; its last lines are kept for
    // an error.
    let log: Arc<Mutex<std::collections::VecDeque<String>>> = Arc::default();
    let tail = log.clone();
    // STARLING_BENCH_GATEWAY_LOG=<file> keeps the whole log (to see why nodes did not join).
    let mut keep =
        std::env::var_os("STARLING_BENCH_GATEWAY_LOG").and_then(|f| std::fs::File::create(f).ok());
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = keep.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{line}");
            }
            if let Ok(mut t) = tail.lock() {
                if t.len() == 20 {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
    let result = run(
        if wrapped { 0 } else { pid },
        &gw_dir,
        &ca,
        nodes,
        cloud.is_some(),
    );
    result.map_err(|e| {
        let lines = log
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"));
        e.context(format!(
            "the gateway's last log lines:\n{}",
            lines.unwrap_or_default()
        ))
    })
}

/// The measurement, with the gateway `pid` running in `gw_dir`.
fn run(
    pid: u32,
    gw_dir: &std::path::Path,
    ca: &Ca,
    nodes: usize,
    cloud: bool,
) -> anyhow::Result<ScaleFigures> {
    // Where it listens: its lock file says, once bound (and which process it is, when it runs
    // under a wrapper: `pid` 0).
    let deadline = Instant::now() + Duration::from_secs(20);
    let (quic, admin, pid) = loop {
        if let Some(e) = mesh_node::state::read_lock_file(&gw_dir.join("state"))
            && let Some(p) = e.get("pid").and_then(|p| p.parse::<u32>().ok())
            && (pid == 0 || p == pid)
            && let (Some(q), Some(a)) = (e.get("quic"), e.get("admin"))
        {
            break (q.parse::<SocketAddr>()?, a.parse::<SocketAddr>()?, p);
        }
        anyhow::ensure!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let token = std::fs::read_to_string(gw_dir.join("admin.token"))?
        .trim()
        .to_owned();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let arrivals: Arrivals = Arc::default();
    let renewals: Arc<Renewals> = Arc::default();
    let ca_der = CertificateDer::from_pem_slice(ca.cert_pem().as_bytes())?;
    // One socket for every simulated node, with the buffers a node's own socket has.
    let socket = mesh_node::udp_socket("127.0.0.1:0".parse()?)?;
    let endpoint = rt.block_on(async {
        quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            None,
            socket,
            quinn::default_runtime().context("runtime")?,
        )
        .context("endpoint")
    })?;
    // Connect every node, 50 at a time. Why a simulated node stopped, if one did.
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    rt.block_on(async {
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..nodes {
            let name = format!("sim-{i}");
            let issued = ca.issue_node(&name, 1)?;
            let chain = vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes())?];
            let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes())?;
            let identity = Identity::from_parts(chain, key, vec![ca_der.clone()])?;
            let client = quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(identity.client_config()?)?,
            ));
            let mut client = client;
            let mut transport = quinn::TransportConfig::default();
            transport.keep_alive_interval(Some(Limits::default().keep_alive));
            client.transport_config(Arc::new(transport));
            let endpoint = endpoint.clone();
            let arrivals = arrivals.clone();
            let renewals = renewals.clone();
            // Made now, so that the renewal burst measures the gateway alone.
            let csr = mesh_node::identity::enroll::Request::new(Some(&name))
                .map_err(anyhow::Error::msg)?
                .csr_der;
            let failures = failures.clone();
            pending.spawn(async move {
                let result = sim_node(endpoint, client, quic, name, arrivals, renewals, csr).await;
                if let Err(e) = &result
                    && let Ok(mut f) = failures.lock()
                {
                    f.push(format!("{e:#}"));
                }
                result
            });
            if i % 50 == 49 {
                // Pace the handshakes: fifty, then a breath ([`JOINS_PER_SECOND`] in all). Each
                // newcomer is sent the whole registry, and the simulated nodes share one thread.
                tokio::time::sleep(Duration::from_millis(50_000 / JOINS_PER_SECOND)).await;
            }
        }
        // The tasks run until the runtime shuts down (dropping the set would abort them).
        std::mem::forget(pending);
        Ok::<_, anyhow::Error>(())
    })?;
    // Every node registered? A minute, and 10 ms more a node.
    let deadline = started + Duration::from_secs(60) + Duration::from_millis(10 * nodes as u64);
    let joined = loop {
        let (_, body) = rt.block_on(admin_call("GET", admin, "/v1/policy/status", None, ""))?;
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let current = json["nodes"].as_array().map_or(0, |n| {
            n.iter()
                .filter(|x| x["current"] == true && x["up"] == true)
                .count()
        });
        if current == nodes || Instant::now() >= deadline {
            break current;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let join_time = started.elapsed();
    // Steady state: CPU and RSS of the gateway over two telemetry periods.
    std::thread::sleep(Duration::from_secs(3));
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    std::thread::sleep(TELEMETRY_EVERY * 2);
    let cpu_percent = (cpu_ticks(pid)? - cpu0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
    let rss_kib = crate::footprint::rss_of(pid).map_or(0, |(rss, _)| rss);
    if joined < nodes {
        say_why_stopped(&failures);
        rt.shutdown_background();
        return Ok(ScaleFigures {
            cloud,
            joined,
            join_time,
            acked: 0,
            renewed: 0,
            renew_cpu_ms: 0.0,
            renew_all: Duration::ZERO,
            nodes,
            cpu_percent,
            rss_kib,
            policy_p50: Duration::ZERO,
            policy_p99: Duration::ZERO,
            policy_all: Duration::ZERO,
            dashboard: Dashboard {
                cpu_percent: 0.0,
                page_bytes: 0,
                overview_bytes: 0,
            },
        });
    }

    // One browser watching the dashboard: its page once, then the overview every 2 s.
    let mut page_bytes = 0;
    for path in ["/", "/dashboard.js", "/dashboard.css"] {
        let (_, body) = rt.block_on(admin_call("GET", admin, path, None, ""))?;
        page_bytes += body.len();
    }
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    let mut overview_bytes = 0;
    for _ in 0..5 {
        let (code, body) = rt.block_on(admin_call("GET", admin, "/v1/overview", None, ""))?;
        anyhow::ensure!(code == 200, "the overview answered {code}");
        overview_bytes = body.len();
        std::thread::sleep(Duration::from_secs(2));
    }
    let watched_percent =
        (cpu_ticks(pid)? - cpu0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
    let dashboard = Dashboard {
        cpu_percent: (watched_percent - cpu_percent).max(0.0),
        page_bytes,
        overview_bytes,
    };

    // A policy change: time until each node has it, and until the gateway sees every ack.
    arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clear();
    let put_at = Instant::now();
    let (code, body) = rt.block_on(admin_call(
        "PUT",
        admin,
        "/v1/policy",
        Some(&token),
        "[defaults]\ncall_timeout_ms = 4000\n",
    ))?;
    anyhow::ensure!(code == 200, "PUT /v1/policy: {code} {body}");
    let version: u64 = serde_json::from_str::<serde_json::Value>(&body)?["version"]
        .as_u64()
        .context("version")?;
    // The status lists every node: polled more slowly the more there are, so that this process
    // parsing it does not take the cores the gateway and the simulated nodes need.
    let poll = Duration::from_micros(10 * nodes as u64).max(Duration::from_millis(5));
    let deadline = Instant::now() + Duration::from_secs(60);
    let (acked, policy_all) = loop {
        let (_, body) = rt.block_on(admin_call("GET", admin, "/v1/policy/status", None, ""))?;
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let acked = json["nodes"]
            .as_array()
            .map_or(0, |n| n.iter().filter(|x| x["version"] == version).count());
        if acked == nodes || Instant::now() >= deadline {
            break (acked, put_at.elapsed());
        }
        std::thread::sleep(poll);
    };
    if acked < nodes {
        // A node that lost its session after joining: why, rather than only how many.
        say_why_stopped(&failures);
    }
    let mut lat: Vec<Duration> = arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .iter()
        .filter(|(v, _)| *v == version)
        .map(|(_, at)| at.saturating_duration_since(put_at))
        .collect();
    lat.sort();
    // Over the nodes that saw it (all of them unless `acked` says otherwise).
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };

    // Every node renews once: the gateway's CPU over the burst, less its steady rate.
    std::thread::sleep(Duration::from_secs(2));
    let (cpu0, t0) = (cpu_ticks(pid)?, Instant::now());
    renewals.go.send_replace(true);
    let deadline = Instant::now() + Duration::from_secs(120);
    let renewed = loop {
        let done = renewals.done.load(std::sync::atomic::Ordering::Relaxed);
        if done >= acked || Instant::now() >= deadline {
            break done;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let renew_all = t0.elapsed();
    // Whole ticks: at least the burst's own length at the steady rate is taken off.
    std::thread::sleep(Duration::from_millis(50));
    let burst_ms = (cpu_ticks(pid)? - cpu0) as f64 * 10.0;
    let steady_ms = cpu_percent / 100.0 * t0.elapsed().as_secs_f64() * 1e3;
    let renew_cpu_ms = ((burst_ms - steady_ms) / renewed.max(1) as f64).max(0.0);

    let figures = ScaleFigures {
        cloud,
        joined,
        join_time,
        acked,
        renewed,
        renew_cpu_ms,
        renew_all,
        nodes,
        cpu_percent,
        rss_kib,
        policy_p50: pct(0.5),
        policy_p99: pct(0.99),
        policy_all,
        dashboard,
    };
    rt.shutdown_background();
    Ok(figures)
}

/// Prints why simulated nodes stopped, each reason once with how many stopped for it.
fn say_why_stopped(failures: &Mutex<Vec<String>>) {
    if let Ok(f) = failures.lock() {
        let mut kinds: std::collections::BTreeMap<&str, usize> = Default::default();
        for e in f.iter() {
            *kinds.entry(e.as_str()).or_default() += 1;
        }
        for (e, n) in kinds {
            eprintln!("  {n} simulated node(s) stopped: {e}");
        }
    }
}

/// One simulated node: peer hello, control stream, a telemetry batch a second, policy acks.
async fn sim_node(
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    gateway: SocketAddr,
    name: String,
    arrivals: Arrivals,
    renewals: Arc<Renewals>,
    csr_der: Vec<u8>,
) -> anyhow::Result<()> {
    let conn = endpoint
        .connect_with(client, gateway, "starling.mesh")?
        .await?;
    let hello = Hello {
        protocol_version: mesh_proto::PROTOCOL_VERSION,
        name: &name,
        role: Role::Node,
        labels: Default::default(),
        services: Default::default(),
    };
    let mut frame = Vec::new();
    mesh_proto::encode_frame_vec(&hello, &mut frame);
    let mut uni = conn.open_uni().await?;
    uni.write_all(&frame).await?;
    uni.finish()?;

    let (mut send, recv) = conn.open_bi().await?;
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(&RequestHead::new(CONTROL_SERVICE, "session", 0), &mut out);
    mesh_proto::encode_frame_vec(
        &Up::Hello(NodeHello {
            protocol_version: mesh_proto::PROTOCOL_VERSION,
            software_version: env!("CARGO_PKG_VERSION").into(),
            labels: vec![],
            services: vec!["echo".into()],
            addrs: vec![],
            policy_version: 0,
            next_seq: 1,
            boot_id: rand_boot_id(&name),
            lost_at_restart: 0,
            policy: None,
            policy_damaged: false,
        }),
        &mut out,
    );
    send.write_all(&out).await?;
    let mut reader = FrameReader::new(recv);
    let mut tick = tokio::time::interval(TELEMETRY_EVERY);
    let mut seq = 0;
    let mut csr = Some(csr_der);
    let mut go = renewals.go.subscribe();
    loop {
        tokio::select! {
            r = go.changed(), if csr.is_some() => {
                r?;
                let mut out = Vec::new();
                let csr_der = csr.take().unwrap_or_default();
                mesh_proto::encode_frame_vec(&Up::Renew { csr_der }, &mut out);
                send.write_all(&out).await?;
            }
            frame = reader.frame(MAX_CONTROL_FRAME) => {
                let frame = frame?;
                // Registry frames (variant 1) are not decoded: a real node takes them on its own
                // core, and thousands of simulated ones share one thread here.
                if frame.first() == Some(&1) {
                    continue;
                }
                let down: Down = postcard::from_bytes(&frame)?;
                if let Down::Renewed { .. } = down {
                    renewals.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Down::Policy { version, epoch, hash, .. } = down {
                    if let Ok(mut a) = arrivals.lock() {
                        a.push((version, Instant::now()));
                    }
                    let mut out = Vec::new();
                    mesh_proto::encode_frame_vec(&Up::PolicyAck { version, epoch, hash }, &mut out);
                    send.write_all(&out).await?;
                }
            }
            _ = tick.tick() => {
                seq += 1;
                let batch = Up::Telemetry(TelemetryBatch {
                    seq,
                    dropped: 0,
                    calls: (0..5)
                        .map(|i| CallStats {
                            service: format!("svc-{i}"),
                            method: "get".into(),
                            caller: name.clone(),
                            callee: "sim-0".into(),
                            status: Status::Ok,
                            count: 10,
                            sum_us: 10_000,
                            buckets: vec![1; LATENCY_BUCKETS_US.len() + 1],
                        })
                        .collect(),
                    resources: Resources { rss_bytes: 4 << 20, cpu_ms: seq * 3, connections: 3 },
                    spans: vec![],
                    audit: vec![],
                    rules: vec![],
                    folded: 0,
                    lost_items: 0,
                    tcp: vec![],
                });
                let mut out = Vec::new();
                mesh_proto::encode_frame_vec(&batch, &mut out);
                send.write_all(&out).await?;
            }
        }
    }
}

async fn admin_call(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    starling_tests::try_http(method, addr, path, token, body)
        .await
        .map_err(anyhow::Error::msg)
}

/// utime + stime of a process, in clock ticks (1/100 s).
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    Ok(rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum())
}

impl ScaleFigures {
    pub fn print(&self) {
        println!(
            "\ngateway with {} simulated nodes{} ({} joining a second, telemetry every {} s each, real mTLS QUIC, simulated in one process):",
            self.nodes,
            if self.cloud {
                ", bridged to a local mosquitto"
            } else {
                ""
            },
            JOINS_PER_SECOND,
            TELEMETRY_EVERY.as_secs(),
        );
        if self.joined < self.nodes {
            println!(
                "  ONLY {} of {} nodes joined within {:.0} s; gateway CPU {:.1}% of one core, RSS {:.1} MiB \
                 with them (nothing else measured)",
                self.joined,
                self.nodes,
                self.join_time.as_secs_f64(),
                self.cpu_percent,
                self.rss_kib as f64 / 1024.0,
            );
            return;
        }
        if self.acked < self.nodes || self.renewed < self.nodes {
            println!(
                "  ONLY {} of {} nodes acked the policy change within 60 s, {} renewed (the figures below \
                 are over those)",
                self.acked, self.nodes, self.renewed
            );
        }
        println!(
            "  all joined in {:.1} s; gateway CPU {:.1}% of one core, RSS {:.1} MiB; policy change: p50 {:.0} ms, \
             p99 {:.0} ms to reach a node, {:.0} ms until the gateway saw every ack",
            self.join_time.as_secs_f64(),
            self.cpu_percent,
            self.rss_kib as f64 / 1024.0,
            self.policy_p50.as_secs_f64() * 1e3,
            self.policy_p99.as_secs_f64() * 1e3,
            self.policy_all.as_secs_f64() * 1e3,
        );
        println!(
            "  dashboard watched by one browser: +{:.2}% of a core; page {:.1} KB, each 2 s poll {:.1} KB",
            self.dashboard.cpu_percent,
            self.dashboard.page_bytes as f64 / 1e3,
            self.dashboard.overview_bytes as f64 / 1e3,
        );
        println!(
            "  renewals: every node renewed once in {:.0} ms, {:.2} ms of gateway CPU each; over a \
             {}-day lifetime that is {:.5}% of one core on average",
            self.renew_all.as_secs_f64() * 1e3,
            self.renew_cpu_ms,
            LIFETIME.as_secs() / 86_400,
            self.renew_cpu_ms * self.nodes as f64 / LIFETIME.as_secs_f64() / 10.0,
        );
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "nodes": self.nodes,
            "joined": self.joined,
            "acked": self.acked,
            "renewed": self.renewed,
            "join_s": self.join_time.as_secs_f64(),
            "telemetry_every_s": TELEMETRY_EVERY.as_secs(),
            "cloud": self.cloud,
            "gateway_cpu_percent": self.cpu_percent,
            "gateway_rss_kib": self.rss_kib,
            "policy_p50_ms": self.policy_p50.as_secs_f64() * 1e3,
            "policy_p99_ms": self.policy_p99.as_secs_f64() * 1e3,
            "policy_all_acked_ms": self.policy_all.as_secs_f64() * 1e3,
            "dashboard_cpu_percent": self.dashboard.cpu_percent,
            "dashboard_page_bytes": self.dashboard.page_bytes,
            "dashboard_overview_bytes": self.dashboard.overview_bytes,
            "renewal_gateway_cpu_ms": self.renew_cpu_ms,
            "renewal_all_ms": self.renew_all.as_secs_f64() * 1e3,
            "renewal_core_percent_over_7_days":
                self.renew_cpu_ms * self.nodes as f64 / LIFETIME.as_secs_f64() / 10.0,
        })
    }
}

/// A boot id per simulated node (stable for its name within a run).
fn rand_boot_id(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
