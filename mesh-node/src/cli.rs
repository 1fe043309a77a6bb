//! The `mesh-node` command line. Exit codes: 0 success, 1 a failed call or runtime error, 2 a bad
//! config or bad arguments.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::config::NodeConfig;
use crate::node::Node;

/// A Starling mesh node.
#[derive(Parser, Debug)]
#[command(name = "mesh-node", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node until SIGINT or SIGTERM.
    Run {
        /// The node's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Call SERVICE METHOD through a node's local ingress and print the answer's body.
    Call {
        /// The service.
        service: String,
        /// The method.
        method: String,
        /// The request body, as text.
        #[arg(long, conflicts_with = "data_file")]
        data: Option<String>,
        /// Read the request body from this file (`-` for stdin).
        #[arg(long)]
        data_file: Option<PathBuf>,
        /// The node's ingress.
        #[arg(long, default_value = "127.0.0.1:7480")]
        ingress: SocketAddr,
        /// The call's deadline in milliseconds.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Make the call this many times, one after another, and print latency figures
        /// (p50, p99, failures) on stderr; the body printed is the last answer.
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Check a config file and the credentials it names; exit 0 if good, 2 with the errors.
    CheckConfig {
        /// The config file.
        config: PathBuf,
    },
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Call {
            service,
            method,
            data,
            data_file,
            ingress,
            timeout_ms,
            repeat,
        } => {
            let body = match (data, data_file) {
                (Some(d), _) => Bytes::from(d),
                (None, Some(f)) => match read_body(&f) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("error: {}: {e}", f.display());
                        return ExitCode::from(2);
                    }
                },
                (None, None) => Bytes::new(),
            };
            runtime().block_on(call(
                ingress,
                &service,
                &method,
                body,
                timeout_ms,
                repeat.max(1),
            ))
        }
        Command::CheckConfig { config } => {
            match NodeConfig::load(&config).and_then(|c| c.load_identity().map(|_| c)) {
                Ok(c) => {
                    println!(
                        "{}: ok (node {}, {} services, {} peers)",
                        config.display(),
                        c.name,
                        c.services.len(),
                        c.peers.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn read_body(path: &Path) -> std::io::Result<Bytes> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
        Ok(buf.into())
    } else {
        std::fs::read(path).map(Bytes::from)
    }
}

/// The node's runtime: one thread, as on a device.
pub fn runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            std::process::exit(1)
        }
    }
}

/// Installs the log subscriber: `RUST_LOG` if set, else `filter`; logs go to stderr.
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

fn run(path: &Path) -> ExitCode {
    let config = match NodeConfig::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let identity = match config.load_identity() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.log);
    runtime().block_on(async move {
        let node = match Node::start(config, identity).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        node.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Waits for SIGINT or SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn call(
    ingress: SocketAddr,
    service: &str,
    method: &str,
    body: Bytes,
    timeout_ms: Option<u64>,
    repeat: u32,
) -> ExitCode {
    let mut latencies = Vec::with_capacity(repeat as usize);
    let mut failures = 0u32;
    let mut last = None;
    for _ in 0..repeat {
        let t = std::time::Instant::now();
        let result = post(ingress, service, method, body.clone(), timeout_ms).await;
        latencies.push(t.elapsed());
        if !matches!(result, Ok((200, _, _))) {
            failures += 1;
        }
        last = Some(result);
    }
    if repeat > 1 {
        latencies.sort();
        let pct =
            |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
        eprintln!(
            "{repeat} calls: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, failures {failures}",
            pct(0.5).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            pct(1.0).as_secs_f64() * 1e3,
        );
    }
    let Some(last) = last else {
        return ExitCode::FAILURE;
    };
    if failures > 0 && repeat > 1 {
        return ExitCode::FAILURE;
    }
    match last {
        Ok((200, _, body)) => {
            use std::io::Write;
            let _ = std::io::stdout().write_all(&body);
            let _ = std::io::stdout().flush();
            ExitCode::SUCCESS
        }
        Ok((code, status, body)) => {
            eprintln!(
                "error: {} (HTTP {code}): {}",
                status.as_deref().unwrap_or("unknown"),
                String::from_utf8_lossy(&body)
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: cannot reach the ingress at {ingress}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Posts one call to an ingress: `(HTTP status, x-starling-status, body)`.
pub async fn post(
    ingress: SocketAddr,
    service: &str,
    method: &str,
    body: Bytes,
    timeout_ms: Option<u64>,
) -> Result<(u16, Option<String>, Bytes), String> {
    let timeout = timeout_ms.map(|ms| ms.to_string());
    let headers: Vec<(&str, &str)> = timeout
        .iter()
        .map(|t| ("x-starling-timeout-ms", t.as_str()))
        .collect();
    let (code, head, body) = request(
        "POST",
        ingress,
        &format!("/v1/call/{service}/{method}"),
        &headers,
        body,
    )
    .await?;
    let status = head
        .get("x-starling-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    Ok((code, status, body))
}

/// One HTTP/1.1 request on a new connection: `(status, headers, body)`. The small client the CLI,
/// the demo and the tests share to talk to an ingress or a gateway's API.
pub async fn request(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let code = resp.status().as_u16();
    let head = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((code, head, body))
}
