//! The `mesh-node` command line. Exit codes: 0 success, 1 a failed call or runtime error, 2 a bad
//! config or bad arguments.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use clap::{Parser, Subcommand};

use crate::config::NodeConfig;
use crate::http::post;
use crate::node::Node;
use crate::process::{init_logging, runtime, stop_signal};

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
    /// Carry connections to a local TCP port to a `tcp://` service of the mesh, until Ctrl-C: a
    /// node of its own (identity, peers, gateway and discovery from --config) that hosts nothing,
    /// runs no ingress and serves only this forward.
    Forward {
        /// The config file of the node to run (its services, ingress and forwards are ignored).
        #[arg(long, short)]
        config: PathBuf,
        /// The service to reach.
        #[arg(long)]
        service: String,
        /// Where to accept connections (loopback unless --allow-remote).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Accept connections from other hosts (plain TCP on the local network).
        #[arg(long)]
        allow_remote: bool,
        /// Close a connection idle for this many seconds.
        #[arg(long, default_value_t = 3600)]
        idle_timeout_s: u64,
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
    /// Enrol this device: make its key here, send a certificate signing request to the gateway
    /// with a one-time join token, and write OUT/node.crt, OUT/node.key (0600) and OUT/ca.crt.
    Enroll {
        /// The gateway's QUIC address.
        #[arg(long)]
        gateway: SocketAddr,
        /// The join token (`mesh-gateway token create` prints it on its last line).
        #[arg(long)]
        token: String,
        /// The folder to write into (a key already there is never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The name this device expects; the gateway refuses a token made for another.
        #[arg(long)]
        name: Option<String>,
    },
    /// Show a running node's own view (what is wrong first; its gateway link, policy, certificate,
    /// services and peers), read from its ingress. Exit 0 nothing wrong, 1 something wrong, 3 the
    /// node cannot be reached.
    Status {
        /// The node's ingress.
        #[arg(long, default_value = "127.0.0.1:7480")]
        ingress: SocketAddr,
        /// Print the JSON the node answers, as it is.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(&config),
        Command::Forward {
            config,
            service,
            listen,
            allow_remote,
            idle_timeout_s,
        } => {
            let service = match mesh_core::ServiceName::try_from(service.as_str()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: --service: {e}");
                    return ExitCode::from(2);
                }
            };
            if !listen.ip().is_loopback() && !allow_remote {
                eprintln!(
                    "error: --listen {listen}: a forward listens on loopback; the hop to it is \
                     plain TCP. Add --allow-remote to accept other hosts"
                );
                return ExitCode::from(2);
            }
            if idle_timeout_s == 0 {
                eprintln!("error: --idle-timeout-s must be greater than 0");
                return ExitCode::from(2);
            }
            let mut forward = crate::config::ForwardConfig::new(listen, service);
            forward.allow_remote = allow_remote;
            forward.idle_timeout = std::time::Duration::from_secs(idle_timeout_s);
            run_with(&config, Some(forward))
        }
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
        Command::Status { ingress, json } => runtime().block_on(status(ingress, json)),
        Command::Enroll {
            gateway,
            token,
            out,
            name,
        } => runtime().block_on(enroll(gateway, &token, &out, name.as_deref())),
        Command::CheckConfig { config } => {
            match NodeConfig::load(&config)
                .and_then(|c| c.check_devices().map(|()| c))
                .and_then(|c| c.load_identity().map(|_| c))
            {
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

async fn enroll(gateway: SocketAddr, token: &str, out: &Path, name: Option<&str>) -> ExitCode {
    use crate::identity::enroll;
    let token: mesh_core::token::JoinToken = match token.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --token: {e}");
            return ExitCode::from(2);
        }
    };
    if out.join("node.key").exists() {
        eprintln!(
            "error: {} exists: this device has a key already (remove it to enrol again)",
            out.join("node.key").display()
        );
        return ExitCode::from(2);
    }
    let request = match enroll::Request::new(name) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = std::time::Instant::now();
    let issued = match enroll::join(gateway, &token, &request).await {
        Ok(issued) => issued,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The name the device expects, if it said one (the gateway refuses a token for another, and
    // this checks what came back).
    let issued_id = rustls_pki_types::pem::PemObject::from_pem_slice(issued.chain_pem.as_bytes())
        .ok()
        .and_then(|c: rustls_pki_types::CertificateDer<'static>| {
            crate::identity::spiffe_id_of(&c).ok()
        });
    if let Some(name) = name
        && issued_id.as_ref().map(|id| id.node_name().as_str()) != Some(name)
    {
        eprintln!(
            "error: the gateway issued a certificate for another name ({issued_id:?}); nothing written"
        );
        return ExitCode::FAILURE;
    }
    match enroll::save(out, &request.key_pem, &issued) {
        Ok(_) => {
            let id = issued_id.map_or_else(|| "?".to_owned(), |id| id.to_string());
            println!(
                "enrolled as {id} in {} ms: {}/node.crt, node.key (0600), ca.crt",
                started.elapsed().as_millis(),
                out.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn status(ingress: SocketAddr, json: bool) -> ExitCode {
    let answer = crate::http::request("GET", ingress, "/v1/status", &[], Bytes::new()).await;
    let body = match answer {
        Ok((200, _, body)) => body,
        Ok((code, _, body)) => {
            eprintln!(
                "error: the node at {ingress} answered HTTP {code}: {}",
                String::from_utf8_lossy(&body)
            );
            return ExitCode::from(3);
        }
        Err(e) => {
            eprintln!("error: cannot reach the node's ingress at {ingress}: {e}");
            return ExitCode::from(3);
        }
    };
    let Ok(status) = serde_json::from_slice::<serde_json::Value>(&body) else {
        eprintln!("error: the node at {ingress} answered something that is not its status");
        return ExitCode::from(3);
    };
    let problems = status_problems(&status);
    if json {
        use std::io::Write;
        let _ = std::io::stdout().write_all(&body);
        println!();
    } else {
        print!("{}", render_status(&status, &problems));
    }
    if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What is wrong with a node, from its `/v1/status`.
fn status_problems(s: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    if s["policy"]["source"] == "damaged" {
        out.push(format!(
            "its saved policy is damaged ({}): it refuses every call until its gateway sends a good one",
            s["policy"]["problem"].as_str().unwrap_or("?")
        ));
    }
    if let Some(why) = s["revoked"].as_str() {
        out.push(format!("a peer says its certificate is revoked: {why}"));
    }
    match s["certificate_expires_in_s"].as_i64() {
        Some(e) if e <= 0 => out.push(format!(
            "its certificate expired {} h ago: every peer refuses it",
            -e / 3600
        )),
        Some(e) if e < 12 * 3600 => out.push(format!(
            "its certificate expires in {} h: renewal is failing ({})",
            e / 3600,
            s["renewal"]["problem"]
                .as_str()
                .unwrap_or("no reason given")
        )),
        _ => {}
    }
    if let Some(why) = s["renewal"]["problem"].as_str() {
        out.push(format!("its last certificate renewal failed: {why}"));
    }
    if s["gateway"].is_null() && s["gateway_sessions"].as_u64().unwrap_or(0) > 0 {
        out.push("it lost its gateway (it keeps serving under its saved policy)".into());
    }
    if let Some(errors) = s["dial_errors"].as_array() {
        for e in errors.iter().filter_map(|e| e.as_str()) {
            out.push(format!("a configured peer cannot be reached: {e}"));
        }
    }
    out
}

/// A node's status as one screen of text, what is wrong first.
fn render_status(s: &serde_json::Value, problems: &[String]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if problems.is_empty() {
        out.push_str("OK: nothing wrong\n");
    } else {
        let _ = writeln!(out, "WRONG: {} problem(s)", problems.len());
        for p in problems {
            let _ = writeln!(out, "  x {}", crate::process::printable(p));
        }
    }
    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(
        out,
        "\nnode {} ({}), QUIC on {}",
        text(&s["name"]),
        text(&s["id"]),
        text(&s["quic"])
    );
    let _ = writeln!(
        out,
        "gateway: {}",
        s["gateway"]
            .as_str()
            .map_or("not connected".to_owned(), |g| format!("connected to {g}"))
    );
    let _ = writeln!(
        out,
        "policy: version {} ({}){}",
        s["policy"]["version"],
        text(&s["policy"]["source"]),
        s["policy"]["problem"]
            .as_str()
            .map_or(String::new(), |p| format!(": {p}"))
    );
    let _ = writeln!(
        out,
        "certificate: expires in {} h, renewed {} times",
        s["certificate_expires_in_s"].as_i64().unwrap_or(0) / 3600,
        s["renewal"]["renewals"]
    );
    let hosted: Vec<String> = s["hosted"]
        .as_array()
        .map(|h| h.iter().map(text).collect())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "hosts: {}",
        if hosted.is_empty() {
            "-".into()
        } else {
            hosted.join(", ")
        }
    );
    let peers = s["peers"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "peers: {}", peers.len());
    for p in &peers {
        let services: Vec<String> = p["services"]
            .as_array()
            .map(|v| v.iter().map(text).collect())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<20} {:<8} {:<22} {}",
            text(&p["name"]),
            text(&p["role"]),
            text(&p["addr"]),
            services.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "telemetry: {} batches waiting for the gateway, {} dropped",
        s["telemetry"]["pending"], s["telemetry"]["dropped"]
    );
    out
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

fn run(path: &Path) -> ExitCode {
    run_with(path, None)
}

/// Runs the node of `path` until a signal; with `only_forward`, as `mesh-node forward` does.
fn run_with(path: &Path, only_forward: Option<crate::config::ForwardConfig>) -> ExitCode {
    let mut config = match NodeConfig::load(path) {
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
    if let Some(forward) = only_forward {
        config.services.clear();
        config.ingress = None;
        config.forwards = vec![forward];
    }
    init_logging(&config.log, config.log_format);
    runtime().block_on(async move {
        let stop = stop_signal();
        let ingress = config.ingress;
        let forwards = config.forwards.clone();
        let node = match Node::start(config, identity).await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(addr) = ingress {
            match crate::ingress::serve(node.clone(), addr).await {
                Ok(bound) => {
                    tracing::info!("ingress listening on http://{bound}");
                    node.record_address("ingress", bound);
                }
                Err(e) => {
                    tracing::error!("cannot start: ingress: cannot listen on {addr}: {e}");
                    node.shutdown().await;
                    return ExitCode::FAILURE;
                }
            }
        }
        for forward in forwards {
            let (listen, line) = (forward.listen, forward.line);
            match crate::forward::serve(node.clone(), forward).await {
                // Where a technician's client connects (the port may have been picked).
                Ok(bound) if line == 0 => println!("forwarding {bound}"),
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(
                        "cannot start: the forward on {listen} (line {line}) cannot listen: {e}"
                    );
                    node.shutdown().await;
                    return ExitCode::FAILURE;
                }
            }
        }
        crate::process::notify_ready_and_watch();
        stop.await;
        tracing::info!("shutting down");
        crate::process::notify("STOPPING=1");
        node.shutdown().await;
        ExitCode::SUCCESS
    })
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
