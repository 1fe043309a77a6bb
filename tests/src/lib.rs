//! The end-to-end harness: real `mesh-node` processes on loopback, a real CA, a real HTTP
//! upstream, and a raw QUIC client for sending what a well-behaved node never would.
//!
//! Binaries are the ones `cargo build --workspace --bins` put beside this test's executable;
//! `scripts/test.sh` builds them first. Every wait here is for an event (a log line, a connection)
//! and has a bound.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_gateway::ca::Ca;

pub use mesh_node::http::post;

pub mod lab;

/// The trust domain the tests use.
pub const TD: &str = "starling.local";

/// The path of a workspace binary built beside the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> (a test) or target/<profile>/<bin> -> target/<profile>/<name>
    let mut dir = exe.parent().expect("target dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A CA in a temporary folder, and certificates issued by it.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    /// A new CA for [`TD`].
    pub fn new() -> Pki {
        Self::with_trust_domain(TD)
    }

    /// A new CA for `td`.
    pub fn with_trust_domain(td: &str) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = Ca::generate(td).expect("ca");
        ca.save(&dir.path().join("ca")).expect("save ca");
        Pki { dir, ca }
    }

    /// Issues `name` into `<dir>/<name>/certs`, returns the node's folder.
    pub fn node_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        self.ca
            .issue_node(name, 1)
            .expect("issue")
            .save(&dir.join("certs"), self.ca.cert_pem())
            .expect("save");
        dir
    }

    /// Writes a node config into its folder and returns its path. `extra` is appended verbatim.
    pub fn config(&self, name: &str, extra: &str) -> PathBuf {
        let dir = self.node_dir(name);
        let path = dir.join("node.toml");
        let toml = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"info\"\n\
             [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
             [discovery]\nmdns = false\n{extra}"
        );
        std::fs::write(&path, toml).expect("write config");
        path
    }
}

impl Pki {
    /// Writes a gateway config (admin API on a free loopback port, state and token in its folder,
    /// QUIC on `listen`) and returns its path. `extra` is appended verbatim.
    pub fn gateway_config(&self, name: &str, listen: &str, extra: &str) -> PathBuf {
        let path = self.config(name, extra);
        let src = std::fs::read_to_string(&path).expect("config");
        let src = src.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\""),
        );
        let src = src.replacen(
            "log = \"info\"\n",
            "log = \"info\"\nadmin = \"127.0.0.1:0\"\nadmin_token_file = \"admin.token\"\nstate_dir = \"state\"\n",
            1,
        );
        std::fs::write(&path, src).expect("config");
        path
    }

    /// The admin token a gateway in `<dir>/<name>` made.
    pub fn admin_token(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name).join("admin.token"))
            .expect("admin token")
            .trim()
            .to_owned()
    }
}

/// A free UDP port on loopback (bound, then released), for a gateway that must come back on the
/// same address.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A running `mesh-node` process; killed when dropped.
pub struct NodeProc {
    pub name: String,
    child: Child,
    log: Arc<(Mutex<VecDeque<String>>, Condvar)>,
    pub quic: SocketAddr,
    pub ingress: Option<SocketAddr>,
}

impl NodeProc {
    /// Starts `mesh-node run --config <config>` and waits until it listens.
    pub fn start(name: &str, config: &Path) -> NodeProc {
        Self::start_cmd(name, &[bin("mesh-node").display().to_string()], config)
    }

    /// Starts `<prefix...> run --config <config>` (the prefix ends with the binary: e.g. `ip netns
    /// exec h0 qemu-aarch64-static path/mesh-node`) and waits until it listens.
    pub fn start_cmd(name: &str, prefix: &[String], config: &Path) -> NodeProc {
        let mut child = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mesh-node");
        let stderr = child.stderr.take().expect("stderr");
        let log: Arc<(Mutex<VecDeque<String>>, Condvar)> = Arc::default();
        let sink = log.clone();
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
                let (lines, cv) = &*sink;
                lines.lock().expect("log").push_back(line);
                cv.notify_all();
            }
        });
        let mut node = NodeProc {
            name: name.to_owned(),
            child,
            log,
            quic: SocketAddr::from(([0, 0, 0, 0], 0)),
            ingress: None,
        };
        let line = node.wait_for("quic listening on ", Duration::from_secs(10));
        node.quic = addr_after(&line, "quic listening on ");
        if let Some(line) =
            node.try_wait_for("ingress listening on http://", Duration::from_secs(5))
        {
            node.ingress = Some(addr_after(&line, "ingress listening on http://"));
        }
        node
    }

    /// Starts `mesh-gateway run --config <config>` and waits until its admin API listens;
    /// returns the process and the admin address.
    pub fn start_gateway(name: &str, config: &Path) -> (NodeProc, SocketAddr) {
        let node = Self::start_cmd(name, &[bin("mesh-gateway").display().to_string()], config);
        let line = node.wait_for("admin API and /metrics on http://", Duration::from_secs(10));
        let admin = addr_after(&line, "admin API and /metrics on http://");
        (node, admin)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The ingress address; panics if the node runs none.
    pub fn ingress(&self) -> SocketAddr {
        self.ingress.expect("node has an ingress")
    }

    /// Waits for a log line containing `needle`; panics after `timeout`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.try_wait_for(needle, timeout).unwrap_or_else(|| {
            panic!(
                "{}: no log line with {needle:?} within {timeout:?}",
                self.name
            )
        })
    }

    /// Waits for a log line containing `needle`, or `None` after `timeout`.
    pub fn try_wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_nth(needle, 1, timeout)
    }

    /// Waits until `n` log lines contain `needle`; panics after `timeout`.
    pub fn wait_for_count(&self, needle: &str, n: usize, timeout: Duration) -> String {
        self.wait_for_nth(needle, n, timeout).unwrap_or_else(|| {
            panic!(
                "{}: {} of {n} log lines with {needle:?} within {timeout:?}",
                self.name,
                self.count(needle)
            )
        })
    }

    fn wait_for_nth(&self, needle: &str, n: usize, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (lines, cv) = &*self.log;
        let mut guard = lines.lock().expect("log");
        loop {
            if let Some(line) = guard.iter().filter(|l| l.contains(needle)).nth(n - 1) {
                return Some(line.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            guard = cv.wait_timeout(guard, left).expect("log").0;
        }
    }

    /// How many log lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log
            .0
            .lock()
            .expect("log")
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Sends SIGKILL: the node dies without a word.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and returns at once.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit after SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addr_after(line: &str, prefix: &str) -> SocketAddr {
    let rest = &line[line.find(prefix).expect("prefix") + prefix.len()..];
    rest.split_whitespace()
        .next()
        .expect("addr")
        .parse()
        .expect("socket addr")
}

/// One request an [`HttpUpstream`] saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub caller: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
}

/// Decides, from a request's index (0, 1, 2, ...), whether the upstream answers 503 to it.
pub type FailPlan = Arc<dyn Fn(usize) -> bool + Send + Sync>;

/// A real HTTP/1.1 upstream on loopback: answers every POST with its body, after `delay`, and
/// records what it saw.
pub struct HttpUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
}

impl HttpUpstream {
    /// Starts the upstream on the current tokio runtime.
    pub async fn start(delay: Duration) -> HttpUpstream {
        Self::start_with(delay, Arc::new(|_| false)).await
    }

    /// Starts an upstream that answers 503 to the requests `fail` picks.
    pub async fn start_with(delay: Duration, fail: FailPlan) -> HttpUpstream {
        use http_body_util::{BodyExt, Full};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let record = record.clone();
                let fail = fail.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let record = record.clone();
                            let fail = fail.clone();
                            async move {
                                let path = req.uri().path().to_owned();
                                let headers: Vec<(String, String)> = req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                    })
                                    .collect();
                                let caller = headers
                                    .iter()
                                    .find(|(k, _)| k == "x-starling-caller")
                                    .map(|(_, v)| v.clone());
                                let body =
                                    req.into_body().collect().await.expect("body").to_bytes();
                                let index = {
                                    let mut seen = record.lock().expect("seen");
                                    seen.push(Seen {
                                        path,
                                        caller,
                                        headers,
                                        body_len: body.len(),
                                    });
                                    seen.len() - 1
                                };
                                tokio::time::sleep(delay).await;
                                let mut resp = hyper::Response::new(Full::new(body));
                                if fail(index) {
                                    *resp.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        HttpUpstream { addr, seen }
    }

    /// What it saw so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

/// A small HTTP/1.1 client for the gateway's API: `(status, body)`; panics if unreachable.
pub async fn http(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    try_http(method, addr, path, token, body)
        .await
        .unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// Like [`http`], with the failure returned (for a server that may not listen yet).
pub async fn try_http(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> Result<(u16, String), String> {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("authorization", b.as_str()))
        .collect();
    let (code, _, body) =
        mesh_node::http::request(method, addr, path, &headers, Bytes::from(body.to_owned()))
            .await?;
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`: for state that only
/// shows through another process's API (a gateway's counters), where no event can be awaited.
pub async fn eventually<T>(
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` pseudo-random bytes from `seed` (xorshift), the same every run.
pub fn random_bytes(n: usize, seed: u64) -> Bytes {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// A loopback UDP port nobody listens on (bound, then released).
pub fn closed_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}
