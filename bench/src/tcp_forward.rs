//! TCP through the mesh: a forward on node A carrying connections to a `tcp://` service on node B,
//! next to a direct TCP connection to the same server and to raw quinn (mutual TLS, one stream)
//! between the same two threads, in interleaved rounds.
//!
//! The server (on the server thread, beside node B) reads a mode byte: `S` counts what it gets up
//! to the client's half-close and answers the count (throughput), `E` echoes (latency). Raw quinn's
//! server does the same on each stream. Figures: MB/s of a 64 MiB upload (timed from the first
//! byte to the count's arrival), the round trip of 64 B on an open connection (p50, p99), and a new
//! connection's first round trip (for the forward: the tunnel's opening through both nodes).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_gateway::ca::Ca;
use mesh_node::config::{ForwardConfig, Limits, ServiceConfig};
use mesh_node::{Node, bind_endpoint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::paths::{node_config, server_thread};

/// Bytes of the throughput transfer.
pub const BULK: usize = 64 * 1024 * 1024;

/// One path's figures.
pub struct PathFigures {
    pub name: &'static str,
    /// MB/s of each bulk transfer.
    pub bulk_mbs: Vec<f64>,
    /// Round trips of 64 B on an open connection.
    pub rtt: Vec<Duration>,
    /// A new connection's first round trip of 64 B.
    pub first: Vec<Duration>,
}

pub struct TcpFigures {
    pub paths: Vec<PathFigures>,
    /// MB/s of a 64 MiB body echoed on one raw quinn stream, sent and read back at once.
    pub quinn_echo_mbs: Vec<f64>,
    /// MB/s of the same through a Starling streamed call (`Node::call_stream`) to node B's
    /// `builtin:echo`.
    pub streamed_echo_mbs: Vec<f64>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Forward,
    Quinn,
}

const PATHS: [(Path, &str); 3] = [
    (Path::Direct, "direct TCP"),
    (Path::Forward, "Starling TCP forward"),
    (Path::Quinn, "raw quinn mTLS stream"),
];

/// The server side of a connection or stream: `S` counts to EOF and answers the count, `E` echoes.
async fn serve<R, W>(mut r: R, mut w: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut mode = [0u8; 1];
    if r.read_exact(&mut mode).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    match mode[0] {
        b'S' => {
            let mut total = 0u64;
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(_) => return,
                }
            }
            let _ = w.write_all(&total.to_le_bytes()).await;
            let _ = w.shutdown().await;
        }
        _ => {
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        }
    }
}

/// Everything up: the TCP server, the quinn server, node B hosting the server as `sink`, node A
/// forwarding a loopback port to it.
struct Setup {
    _dir: tempfile::TempDir,
    server: tokio::runtime::Handle,
    /// Where the TCP clients run.
    app: tokio::runtime::Handle,
    tcp: SocketAddr,
    forward: SocketAddr,
    quinn_client: quinn::Endpoint,
    quinn_conn: quinn::Connection,
    node_a: Node,
    node_b: Node,
}

impl Setup {
    async fn start() -> anyhow::Result<Setup> {
        let server = server_thread()?;
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate("bench.local")?;
        let listener = server
            .spawn(async { TcpListener::bind("127.0.0.1:0").await })
            .await??;
        let tcp = listener.local_addr()?;
        server.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                let (r, w) = stream.into_split();
                tokio::spawn(serve(r, w));
            }
        });
        let (_, qs_id) = node_config(dir.path(), &ca, "quinn-server")?;
        let (_, qc_id) = node_config(dir.path(), &ca, "quinn-client")?;
        let qs = server
            .spawn(async move {
                bind_endpoint(
                    &qs_id,
                    &Limits::default(),
                    "127.0.0.1:0".parse().expect("addr"),
                )
            })
            .await??;
        let quinn_addr = qs.local_addr()?;
        server.spawn(async move {
            while let Some(incoming) = qs.accept().await {
                tokio::spawn(async move {
                    let Ok(conn) = incoming.await else { return };
                    while let Ok((send, recv)) = conn.accept_bi().await {
                        tokio::spawn(serve(recv, send));
                    }
                });
            }
        });
        let quinn_client = bind_endpoint(&qc_id, &Limits::default(), "127.0.0.1:0".parse()?)?;
        let quinn_conn = quinn_client.connect(quinn_addr, "starling.mesh")?.await?;

        let (mut b_conf, b_id) = node_config(dir.path(), &ca, "node-b")?;
        b_conf.services = vec![
            ServiceConfig {
                name: "sink".parse().map_err(anyhow::Error::msg)?,
                upstream: format!("tcp://{tcp}").parse().map_err(anyhow::Error::msg)?,
                line: 0,
            },
            ServiceConfig {
                name: "echo".parse().map_err(anyhow::Error::msg)?,
                upstream: "builtin:echo".parse().map_err(anyhow::Error::msg)?,
                line: 0,
            },
        ];
        b_conf.ingress = None;
        let node_b = server.spawn(Node::start(b_conf, b_id)).await??;
        let (mut a_conf, a_id) = node_config(dir.path(), &ca, "node-a")?;
        a_conf.peers = vec![node_b.local_addr()];
        a_conf.ingress = None;
        let node_a = Node::start(a_conf, a_id).await?;
        anyhow::ensure!(
            node_a
                .wait_for_service("sink", Duration::from_secs(5))
                .await,
            "node-a did not see node-b"
        );
        let forward = mesh_node::forward::serve(
            node_a.clone(),
            ForwardConfig::new(
                "127.0.0.1:0".parse()?,
                "sink".parse().map_err(anyhow::Error::msg)?,
            ),
        )
        .await?;
        Ok(Setup {
            _dir: dir,
            server,
            // The client thread: on a two-core machine a third busy thread would make the
            // forward's figures a measure of the scheduler.
            app: tokio::runtime::Handle::current(),
            tcp,
            forward,
            quinn_client,
            quinn_conn,
            node_a,
            node_b,
        })
    }

    /// Where `path` goes.
    fn target(&self, path: Path) -> Target {
        match path {
            Path::Direct => Target::Tcp(self.tcp),
            Path::Forward => Target::Tcp(self.forward),
            Path::Quinn => Target::Quinn(self.quinn_conn.clone()),
        }
    }

    /// Runs `f` on `path`'s target.
    async fn on<T: Send + 'static, F>(
        &self,
        path: Path,
        f: impl FnOnce(Target) -> F,
    ) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = anyhow::Result<T>> + Send + 'static,
    {
        let target = self.target(path);
        match target {
            Target::Tcp(_) => self.app.spawn(f(target)).await?,
            Target::Quinn(_) => f(target).await,
        }
    }

    async fn shutdown(self) {
        self.node_a.shutdown().await;
        let b = self.node_b.clone();
        let _ = self.server.spawn(async move { b.shutdown().await }).await;
        self.quinn_client.close(0u32.into(), b"");
    }
}

#[derive(Clone)]
enum Target {
    Tcp(SocketAddr),
    Quinn(quinn::Connection),
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// A new connection (or stream) to `target`, as a reader and a writer, with its mode sent.
async fn open(target: &Target, mode: u8) -> anyhow::Result<(Reader, Writer)> {
    let (r, mut w): (Reader, Writer) = match target {
        Target::Tcp(addr) => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            let (r, w) = stream.into_split();
            (Box::new(r), Box::new(w))
        }
        Target::Quinn(conn) => {
            let (send, recv) = conn.open_bi().await?;
            (Box::new(recv), Box::new(send))
        }
    };
    w.write_all(&[mode]).await?;
    Ok((r, w))
}

/// MB/s of one 64 MiB upload, to the count's arrival.
async fn bulk(target: Target) -> anyhow::Result<f64> {
    let chunk = Bytes::from(vec![0x5au8; 256 * 1024]);
    let started = Instant::now();
    let (mut r, mut w) = open(&target, b'S').await?;
    let mut sent = 0;
    while sent < BULK {
        w.write_all(&chunk).await?;
        sent += chunk.len();
    }
    w.shutdown().await?;
    let mut count = [0u8; 8];
    r.read_exact(&mut count).await?;
    anyhow::ensure!(
        u64::from_le_bytes(count) == BULK as u64,
        "the server counted {} of {BULK} bytes",
        u64::from_le_bytes(count)
    );
    Ok(BULK as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// MB/s of 64 MiB echoed on one raw quinn stream: written in 256 KiB chunks while the echo is
/// read back, timed to the echo's end.
async fn quinn_echo(conn: quinn::Connection) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (mut r, mut w) = open(&Target::Quinn(conn), b'E').await?;
    let reading = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0usize;
        loop {
            match r.read(&mut buf).await? {
                0 => return Ok::<_, std::io::Error>(total),
                n => total += n,
            }
        }
    });
    let chunk = Bytes::from(vec![0x5au8; 256 * 1024]);
    let mut sent = 0;
    while sent < BULK {
        w.write_all(&chunk).await?;
        sent += chunk.len();
    }
    w.shutdown().await?;
    let total = reading.await??;
    anyhow::ensure!(total == BULK, "raw quinn echoed {total} of {BULK} bytes");
    Ok(BULK as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// MB/s of 64 MiB echoed through a Starling streamed call to node B's `builtin:echo`: sent in
/// 256 KiB chunks while the answer is read back, timed to the answer's end.
async fn streamed_echo(node: Node) -> anyhow::Result<f64> {
    let started = Instant::now();
    let stream = node
        .call_stream("echo", "say", &mesh_node::CallOptions::default())
        .await?;
    let (mut tx, mut rx) = stream.split();
    let reading = tokio::spawn(async move {
        let mut total = 0usize;
        while let Some(chunk) = rx.recv().await? {
            total += chunk.len();
        }
        let (status, message) = rx.status().await?;
        anyhow::ensure!(
            status == mesh_proto::Status::Ok,
            "echo answered {status:?}: {message}"
        );
        Ok::<_, anyhow::Error>(total)
    });
    let chunk = Bytes::from(vec![0x5au8; 256 * 1024]);
    let mut sent = 0;
    while sent < BULK {
        tx.send(chunk.clone()).await?;
        sent += chunk.len();
    }
    tx.finish();
    let total = reading.await??;
    anyhow::ensure!(
        total == BULK,
        "the streamed call echoed {total} of {BULK} bytes"
    );
    Ok(BULK as f64 / started.elapsed().as_secs_f64() / 1e6)
}

/// `n` round trips of 64 B on one open connection.
async fn round_trips(target: Target, n: usize) -> anyhow::Result<Vec<Duration>> {
    let (mut r, mut w) = open(&target, b'E').await?;
    let ping = [0x42u8; 64];
    let mut pong = [0u8; 64];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(&ping).await?;
        r.read_exact(&mut pong).await?;
        out.push(t.elapsed());
    }
    w.shutdown().await?;
    Ok(out)
}

/// `n` new connections' first round trips of 64 B (the mode byte rides with each).
async fn first_round_trips(target: Target, n: usize) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let (mut r, mut w) = open(&target, b'E').await?;
        w.write_all(&[0x42u8; 64]).await?;
        let mut pong = [0u8; 64];
        r.read_exact(&mut pong).await?;
        out.push(t.elapsed());
        w.shutdown().await?;
    }
    Ok(out)
}

/// Measures every path in `rounds` interleaved rounds.
pub async fn measure(rounds: usize) -> anyhow::Result<TcpFigures> {
    let setup = Setup::start().await?;
    let mut paths: Vec<PathFigures> = PATHS
        .iter()
        .map(|(_, name)| PathFigures {
            name,
            bulk_mbs: Vec::new(),
            rtt: Vec::new(),
            first: Vec::new(),
        })
        .collect();
    let (mut quinn_echo_mbs, mut streamed_echo_mbs) = (Vec::new(), Vec::new());
    // Warm each path once.
    for (path, _) in PATHS {
        setup.on(path, |t| round_trips(t, 100)).await?;
    }
    for round in 0..rounds.max(1) {
        let order: Vec<usize> = if round % 2 == 0 {
            (0..PATHS.len()).collect()
        } else {
            (0..PATHS.len()).rev().collect()
        };
        for i in order {
            let path = PATHS[i].0;
            let figures = &mut paths[i];
            figures.bulk_mbs.push(setup.on(path, bulk).await?);
            figures
                .rtt
                .extend(setup.on(path, |t| round_trips(t, 1000)).await?);
            figures
                .first
                .extend(setup.on(path, |t| first_round_trips(t, 50)).await?);
        }
        // A 64 MiB body each way on one stream: raw quinn, then a Starling streamed call (in
        // the other order every other round).
        let (quinn, starling) = (setup.quinn_conn.clone(), setup.node_a.clone());
        if round % 2 == 0 {
            quinn_echo_mbs.push(quinn_echo(quinn).await?);
            streamed_echo_mbs.push(streamed_echo(starling).await?);
        } else {
            streamed_echo_mbs.push(streamed_echo(starling).await?);
            quinn_echo_mbs.push(quinn_echo(quinn).await?);
        }
    }
    setup.shutdown().await;
    Ok(TcpFigures {
        paths,
        quinn_echo_mbs,
        streamed_echo_mbs,
    })
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

impl TcpFigures {
    fn find(&self, name: &str) -> Option<&PathFigures> {
        self.paths.iter().find(|p| p.name == name)
    }

    pub fn print(&self) {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        println!("\nTCP through the mesh (64 MiB upload to a half-close; 64 B round trips):");
        println!(
            "  {:<24} {:>9} {:>12} {:>12} {:>16}",
            "path", "MB/s", "rtt p50 us", "rtt p99 us", "new conn p50 us"
        );
        for p in &self.paths {
            println!(
                "  {:<24} {:>9.0} {:>12.1} {:>12.1} {:>16.1}",
                p.name,
                median(&p.bulk_mbs),
                us(quantile(&p.rtt, 0.5)),
                us(quantile(&p.rtt, 0.99)),
                us(quantile(&p.first, 0.5)),
            );
        }
        if let (Some(f), Some(q)) = (
            self.find("Starling TCP forward"),
            self.find("raw quinn mTLS stream"),
        ) {
            let throughput = median(&f.bulk_mbs) / median(&q.bulk_mbs);
            let latency = us(quantile(&f.rtt, 0.5)) / us(quantile(&q.rtt, 0.5));
            println!(
                "  [{}] forward throughput at least 0.8x raw quinn's: {throughput:.2}x",
                if throughput >= 0.8 { "met" } else { "MISSED" }
            );
            println!(
                "  [{}] forward round trip p50 under 1.5x raw quinn's: {latency:.2}x",
                if latency < 1.5 { "met" } else { "MISSED" }
            );
        }
        let (quinn, streamed) = (
            median(&self.quinn_echo_mbs),
            median(&self.streamed_echo_mbs),
        );
        println!("\n64 MiB each way on one stream (sent and echoed at once; MB/s counts it once):");
        println!("  raw quinn mTLS stream        {quinn:>7.0} MB/s");
        println!("  Starling streamed call       {streamed:>7.0} MB/s");
        let ratio = streamed / quinn;
        println!(
            "  [{}] 64 MiB streamed call at least 0.9x raw quinn's: {ratio:.2}x",
            if ratio >= 0.9 { "met" } else { "MISSED" }
        );
    }

    pub fn json(&self) -> serde_json::Value {
        let paths = serde_json::Value::Array(
            self.paths
                .iter()
                .map(|p| {
                    serde_json::json!({
                        "path": p.name,
                        "bulk_mb_per_s": median(&p.bulk_mbs),
                        "rtt_p50_us": quantile(&p.rtt, 0.5).as_secs_f64() * 1e6,
                        "rtt_p99_us": quantile(&p.rtt, 0.99).as_secs_f64() * 1e6,
                        "new_connection_p50_us": quantile(&p.first, 0.5).as_secs_f64() * 1e6,
                    })
                })
                .collect(),
        );
        serde_json::json!({
            "paths": paths,
            "echo_64mib_mb_per_s": {
                "raw_quinn": median(&self.quinn_echo_mbs),
                "starling_streamed_call": median(&self.streamed_echo_mbs),
            },
        })
    }
}
