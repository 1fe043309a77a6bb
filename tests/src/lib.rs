//! The end-to-end harness: real `mesh-node` processes on loopback, a real CA, a real HTTP
//! upstream, and a raw QUIC client for sending what a well-behaved node never would.
//!
//! Binaries are the ones `cargo build --workspace --bins` put beside this test's executable;
//! `scripts/test.sh` builds them first. Every wait here is for state (a node's lock file, its
//! `/v1/status`, a connection) and has a bound; logs are only echoed, for reading a failure.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_gateway::ca::{Ca, Issued};

pub use mesh_node::http::post;

pub mod lab;
pub mod mqtt;

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
        self.labeled_node_dir(name, &[])
    }

    /// [`Pki::node_dir`] with certified `labels`.
    pub fn labeled_node_dir(&self, name: &str, labels: &[(&str, &str)]) -> PathBuf {
        let dir = self.dir.path().join(name);
        let labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.ca
            .issue_node_labeled(name, 1, &labels)
            .expect("issue")
            .save(&dir.join("certs"), self.ca.cert_pem())
            .expect("save");
        dir
    }

    /// Issues gateway `name` into `<dir>/<name>/certs` for a year (as `mesh-gateway issue
    /// --gateway` does by default; nodes get a day), returns its folder.
    pub fn gateway_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        self.ca
            .issue_gateway(name, 365)
            .expect("issue")
            .save(&dir.join("certs"), self.ca.cert_pem())
            .expect("save");
        dir
    }

    /// Makes a site issuer for gateway `name` in `<dir>/<name>/issuer` (issuer.crt, issuer.key,
    /// ca.crt) and returns it loaded.
    pub fn issuer(&self, name: &str) -> Ca {
        let dir = self.dir.path().join(name).join("issuer");
        std::fs::create_dir_all(&dir).expect("issuer dir");
        let made = self.ca.issue_issuer(name, 1).expect("issuer");
        mesh_gateway::ca::write_new(&dir.join("issuer.key"), made.key_pem.as_bytes(), 0o600)
            .expect("key");
        mesh_gateway::ca::write_new(&dir.join("issuer.crt"), made.cert_pem.as_bytes(), 0o644)
            .expect("cert");
        mesh_gateway::ca::write_new(&dir.join("ca.crt"), self.ca.cert_pem().as_bytes(), 0o644)
            .expect("ca");
        Ca::load_issuer(
            &dir.join("issuer.crt"),
            &dir.join("issuer.key"),
            &dir.join("ca.crt"),
        )
        .expect("load issuer")
    }

    /// Issues node `name` with `issuer` for `lifetime` into `<dir>/<name>/certs`; returns the
    /// node's folder.
    pub fn node_dir_from(&self, issuer: &Ca, name: &str, lifetime: Duration) -> PathBuf {
        let dir = self.dir.path().join(name);
        let id =
            mesh_core::SpiffeId::node(issuer.trust_domain(), name.try_into().expect("node name"))
                .expect("id");
        issuer
            .issue_for(id, lifetime, &Default::default())
            .expect("issue")
            .save(&dir.join("certs"), issuer.bundle_pem())
            .expect("save");
        dir
    }

    /// Writes a node config into its folder and returns its path. `extra` is appended verbatim.
    pub fn config(&self, name: &str, extra: &str) -> PathBuf {
        self.write_config(self.node_dir(name), name, extra)
    }

    /// [`Pki::config`] for a node whose certificate certifies `labels`.
    pub fn labeled_config(&self, name: &str, labels: &[(&str, &str)], extra: &str) -> PathBuf {
        self.write_config(self.labeled_node_dir(name, labels), name, extra)
    }

    /// Writes a node config into `dir`, whose `certs/` holds its credentials.
    pub fn write_config(&self, dir: PathBuf, name: &str, extra: &str) -> PathBuf {
        let path = dir.join("node.toml");
        let toml = format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"info\"\n\
             state_dir = \"state\"\n[identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n\
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
        let path = self.write_config(self.gateway_dir(name), name, extra);
        let src = std::fs::read_to_string(&path).expect("config");
        let src = src.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"{listen}\""),
        );
        let src = src.replacen(
            "log = \"info\"\n",
            "log = \"info\"\nadmin = \"127.0.0.1:0\"\nadmin_token_file = \"admin.token\"\n",
            1,
        );
        std::fs::write(&path, src).expect("config");
        path
    }

    /// Issues `name` and loads it as an identity.
    pub fn identity(&self, name: &str) -> mesh_node::Identity {
        let certs = self.node_dir(name).join("certs");
        mesh_node::Identity::load(
            &certs.join("node.crt"),
            &certs.join("node.key"),
            &certs.join("ca.crt"),
        )
        .expect("identity")
    }

    /// Issues `name`: `(certificate PEM, key PEM)`.
    pub fn cert_and_key(&self, name: &str) -> (String, String) {
        let certs = self.node_dir(name).join("certs");
        Self::read_cert_and_key(&certs)
    }

    /// `name`'s `(certificate PEM, key PEM)`: issued the first time, the same ones after (a peer
    /// opening several connections as one identity).
    pub fn same_cert_and_key(&self, name: &str) -> (String, String) {
        let certs = self.dir.path().join(name).join("certs");
        if certs.join("node.key").exists() {
            Self::read_cert_and_key(&certs)
        } else {
            self.cert_and_key(name)
        }
    }

    fn read_cert_and_key(certs: &Path) -> (String, String) {
        (
            std::fs::read_to_string(certs.join("node.crt")).expect("cert"),
            std::fs::read_to_string(certs.join("node.key")).expect("key"),
        )
    }

    /// A node of this mesh on the in-memory network `net` (no ingress), configured with `extra`.
    pub fn memory_node(
        &self,
        net: &mesh_node::testing::MemoryNetwork,
        name: &str,
        extra: &str,
        options: mesh_node::NodeOptions,
    ) -> mesh_node::Node {
        self.labeled_memory_node(net, name, &[], extra, options)
    }

    /// [`Pki::memory_node`] whose certificate certifies `labels`.
    pub fn labeled_memory_node(
        &self,
        net: &mesh_node::testing::MemoryNetwork,
        name: &str,
        labels: &[(&str, &str)],
        extra: &str,
        options: mesh_node::NodeOptions,
    ) -> mesh_node::Node {
        let path = self.labeled_config(name, labels, extra);
        let config = Self::memory_config(&path);
        let identity = config.load_identity().expect("identity");
        net.start_node(config, identity, options).expect("start")
    }

    /// A node of this mesh on `net` that presents `issued` (say a certificate about to expire).
    pub fn memory_node_as(
        &self,
        net: &mesh_node::testing::MemoryNetwork,
        issued: &Issued,
        extra: &str,
    ) -> mesh_node::Node {
        self.memory_node_as_with(net, issued, extra, Default::default())
    }

    /// [`Pki::memory_node_as`] with `options` (`gateway: true` for a gateway's certificate).
    pub fn memory_node_as_with(
        &self,
        net: &mesh_node::testing::MemoryNetwork,
        issued: &Issued,
        extra: &str,
        options: mesh_node::NodeOptions,
    ) -> mesh_node::Node {
        let name = issued.id.node_name().as_str();
        let path = self.config(name, extra);
        let certs = path.parent().expect("dir").join("certs");
        std::fs::write(certs.join("node.crt"), &issued.cert_pem).expect("cert");
        std::fs::write(certs.join("node.key"), &issued.key_pem).expect("key");
        let config = Self::memory_config(&path);
        let identity = config.load_identity().expect("identity");
        net.start_node(config, identity, options).expect("start")
    }

    fn memory_config(path: &Path) -> mesh_node::NodeConfig {
        let src = std::fs::read_to_string(path)
            .expect("conf")
            .replace("ingress = \"127.0.0.1:0\"", "ingress = \"off\"");
        std::fs::write(path, src).expect("conf");
        mesh_node::NodeConfig::load(path).expect("config")
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

/// A running `mesh-node` (or `mesh-gateway`) process; killed when dropped.
pub struct NodeProc {
    pub name: String,
    child: Child,
    /// The command that runs `mesh-node` where the node runs (`ip netns exec <ns> [qemu] mesh-node`
    /// in the lab); empty on this host, where its status is read over HTTP.
    prefix: Vec<String>,
    pub quic: SocketAddr,
    pub ingress: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub state_dir: PathBuf,
}

impl NodeProc {
    /// Starts `mesh-node run --config <config>` and waits until it listens.
    pub fn start(name: &str, config: &Path) -> NodeProc {
        Self::start_cmd(name, &[bin("mesh-node").display().to_string()], config)
    }

    /// Starts `<prefix...> run --config <config>` (the prefix ends with the binary: e.g. `ip netns
    /// exec h0 qemu-aarch64-static path/mesh-node`) and waits until its lock file says where it
    /// listens.
    pub fn start_cmd(name: &str, prefix: &[String], config: &Path) -> NodeProc {
        let settings: toml::Table =
            toml::from_str(&std::fs::read_to_string(config).expect("config"))
                .expect("config is TOML");
        let base = config.parent().expect("config dir");
        let state_dir = base.join(
            settings
                .get("state_dir")
                .and_then(|v| v.as_str())
                .expect("test configs name a state_dir"),
        );
        let gateway = prefix.last().is_some_and(|b| b.ends_with("mesh-gateway"));
        // A node runs an ingress unless told "off"; a gateway only when its file names one.
        let wants_ingress = match settings.get("ingress").and_then(|v| v.as_str()) {
            Some(v) => v != "off",
            None => !gateway,
        };
        let mut child = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["run", "--config"])
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("STARLING_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mesh-node");
        let stderr = child.stderr.take().expect("stderr");
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[{tag}] {line}");
            }
        });
        // The lock file is the node's own record of where it listens, written once bound.
        let pid = child.id().to_string();
        let deadline = Instant::now() + Duration::from_secs(20);
        let entries = loop {
            if let Some(e) = mesh_node::state::read_lock_file(&state_dir)
                && e.get("pid") == Some(&pid)
                && e.contains_key("quic")
                && (!wants_ingress || e.contains_key("ingress"))
                && (!gateway || e.contains_key("admin"))
            {
                break e;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{name} exited before it listened: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{name}: its lock file in {} never said where it listens",
                state_dir.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let addr = |key: &str| entries.get(key).map(|a| a.parse().expect("address"));
        // Inside a namespace the status is asked of the node by its own binary (under qemu, if
        // it runs under qemu); a gateway's sibling mesh-node binary asks for a gateway.
        let exec_prefix = if prefix.len() > 4 && prefix[0] == "ip" {
            // Without an `env` the node runs under (a fake clock): the status needs none.
            let mut cmd: Vec<String> = Vec::new();
            let mut in_env = false;
            for (i, arg) in prefix.iter().enumerate() {
                if i == 4 && arg == "env" {
                    in_env = true;
                    continue;
                }
                if in_env && arg.contains('=') {
                    continue;
                }
                in_env = false;
                cmd.push(arg.clone());
            }
            if gateway && let Some(last) = cmd.last_mut() {
                *last = Path::new(last.as_str())
                    .with_file_name("mesh-node")
                    .display()
                    .to_string();
            }
            cmd
        } else {
            Vec::new()
        };
        NodeProc {
            name: name.to_owned(),
            child,
            prefix: exec_prefix,
            quic: addr("quic").expect("quic"),
            ingress: addr("ingress"),
            admin: addr("admin"),
            state_dir,
        }
    }

    /// Starts `mesh-gateway run --config <config>` and waits until its admin API listens;
    /// returns the process and the admin address.
    pub fn start_gateway(name: &str, config: &Path) -> (NodeProc, SocketAddr) {
        let node = Self::start_cmd(name, &[bin("mesh-gateway").display().to_string()], config);
        let admin = node.admin.expect("admin address");
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

    /// The node's `GET /v1/status`, or why it could not be read.
    pub fn try_status(&self) -> Result<serde_json::Value, String> {
        let ingress = self.ingress.ok_or("the node runs no ingress")?;
        let text = if self.prefix.is_empty() {
            http_get_blocking(ingress, "/v1/status")?
        } else {
            let out = Command::new(&self.prefix[0])
                .args(&self.prefix[1..])
                .args(["status", "--json", "--ingress", &ingress.to_string()])
                .output()
                .map_err(|e| e.to_string())?;
            // Exit 1 is a status with problems (printed all the same); others are failures.
            if !out.status.success() && out.status.code() != Some(1) {
                return Err(format!(
                    "mesh-node status: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))
    }

    /// The node's status; panics if it cannot be read.
    pub fn status(&self) -> serde_json::Value {
        self.try_status()
            .unwrap_or_else(|e| panic!("{}: no status: {e}", self.name))
    }

    /// Waits until the node's status satisfies `ready` (checked every 25 ms); panics after
    /// `timeout`, naming `what` and the last status seen.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.try_status();
            if let Ok(s) = &status
                && ready(s)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{}: not {what} within {timeout:?}; last status: {status:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until peer `name` is connected.
    pub fn wait_peer(&self, name: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(&format!("connected to {name}"), timeout, |s| {
            has_peer(s, name)
        })
    }

    /// Waits until peer `name` is not connected.
    pub fn wait_peer_gone(&self, name: &str, timeout: Duration) -> serde_json::Value {
        self.wait_status(&format!("rid of {name}"), timeout, |s| !has_peer(s, name))
    }

    /// Waits until `n` peers are connected.
    pub fn wait_peers(&self, n: usize, timeout: Duration) -> serde_json::Value {
        self.wait_status(&format!("connected to {n} peers"), timeout, |s| {
            s["peers"].as_array().is_some_and(|p| p.len() == n)
        })
    }

    /// Waits until the control stream to the gateway is up.
    pub fn wait_gateway(&self, timeout: Duration) -> serde_json::Value {
        self.wait_status("linked to its gateway", timeout, |s| {
            !s["gateway"].is_null()
        })
    }

    /// Waits until the node runs under policy `version`.
    pub fn wait_policy(&self, version: u64, timeout: Duration) -> serde_json::Value {
        self.wait_status(&format!("under policy {version}"), timeout, |s| {
            s["policy"]["version"] == version
        })
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

/// Whether a status lists peer `name` as connected.
pub fn has_peer(status: &serde_json::Value, name: &str) -> bool {
    status["peers"]
        .as_array()
        .is_some_and(|peers| peers.iter().any(|p| p["name"] == name))
}

/// A blocking `GET` on a loopback HTTP server: the body of a 200 answer.
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_owned());
    }
    Ok(body.to_owned())
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

/// Samples a process's resident memory every 20 ms until stopped: the highest seen, in KiB.
pub struct RssWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssWatch {
    /// Starts sampling process `pid`.
    pub fn start(pid: u32) -> RssWatch {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (stop, peak) = (stop.clone(), peak.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Some((rss, _)) = rss_kib(pid) {
                        peak.fetch_max(rss, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        RssWatch {
            stop,
            peak,
            thread: Some(thread),
        }
    }

    /// Stops sampling: the peak, in KiB.
    pub fn peak_kib(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// libfaketime, for starting a process with a wall clock of the test's choosing (Debian package
/// faketime; scripts/setup.sh installs it).
pub fn libfaketime() -> PathBuf {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib",
    ]
    .iter()
    .map(|d| Path::new(d).join("faketime/libfaketime.so.1"))
    .find(|p| p.exists())
    .expect("libfaketime (Debian package faketime; scripts/setup.sh installs it)")
}

/// `env` arguments that run a program under libfaketime with its wall clock offset by what
/// `clock_file` says (`+0`, `-2h`, `+2d`; read at most once a second), its monotonic clock left
/// alone, as an NTP step leaves it. The program's path follows.
pub fn stepped_clock_env(clock_file: &Path) -> Vec<String> {
    vec![
        "env".to_owned(),
        format!("LD_PRELOAD={}", libfaketime().display()),
        format!("FAKETIME_TIMESTAMP_FILE={}", clock_file.display()),
        "FAKETIME_CACHE_DURATION=1".to_owned(),
        "DONT_FAKE_MONOTONIC=1".to_owned(),
    ]
}

/// `VmRSS` and `RssAnon` of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((field("VmRSS:")?, field("RssAnon:")?))
}

/// A server verifier that accepts anything: for a raw client that must reach a node whatever it
/// presents, to see what the node does with the client's own certificate.
#[derive(Debug)]
pub struct AcceptAnyServer;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        mesh_node::identity::provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A QUIC client endpoint that presents `chain` and `key` (PEM) to whatever it dials.
pub fn raw_client(chain_pem: &[&str], key_pem: &str) -> (quinn::Endpoint, quinn::ClientConfig) {
    use rustls::pki_types::pem::PemObject;
    let chain = chain_pem
        .iter()
        .map(|p| rustls::pki_types::CertificateDer::from_pem_slice(p.as_bytes()).expect("pem"))
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
    let mut tls = rustls::ClientConfig::builder_with_provider(mesh_node::identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyServer))
        .with_client_auth_cert(chain, key)
        .expect("client auth");
    tls.alpn_protocols = vec![mesh_proto::ALPN.to_vec()];
    let config = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("quic tls"),
    ));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
    (endpoint, config)
}

/// A hello frame: `name`, `protocol`, no labels or services, and `trailing` bytes inside the frame
/// after the fields (what a newer peer may add).
pub fn hello_frame(name: &str, protocol: u16, trailing: &[u8]) -> Vec<u8> {
    hello_frame_as(name, protocol, mesh_proto::Role::Node, trailing)
}

/// A hello frame that claims `role`.
pub fn hello_frame_as(
    name: &str,
    protocol: u16,
    role: mesh_proto::Role,
    trailing: &[u8],
) -> Vec<u8> {
    let hello = mesh_proto::Hello {
        protocol_version: protocol,
        name,
        role,
        labels: Default::default(),
        services: Default::default(),
    };
    let mut body = postcard::to_allocvec(&hello).expect("encode");
    body.extend_from_slice(trailing);
    let mut frame = Vec::new();
    mesh_proto::encode_body_prefix(body.len(), &mut frame);
    frame.extend_from_slice(&body);
    frame
}

/// Sends a hello frame on a new unidirectional stream of `conn`, as a node does first.
pub async fn send_hello(conn: &quinn::Connection, frame: &[u8]) {
    let mut uni = conn.open_uni().await.expect("uni");
    uni.write_all(frame).await.expect("hello");
    uni.finish().expect("finish");
}

/// Puts top-level `keys` (lines ending in `\n`) before the first table of a test config.
pub fn prepend(path: &Path, keys: &str) {
    let src = std::fs::read_to_string(path).expect("config");
    std::fs::write(
        path,
        src.replacen("[identity]", &format!("{keys}[identity]"), 1),
    )
    .expect("config");
}

/// Runs a workspace binary with `args`: whether it succeeded, and its stdout then stderr.
pub fn run_bin(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(bin(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Whether a node's status says it hosts `service`.
pub fn hosts(status: &serde_json::Value, service: &str) -> bool {
    status["hosted"]
        .as_array()
        .is_some_and(|h| h.iter().any(|s| s == service))
}

/// A call through a node's ingress with a 5 s deadline: its HTTP status and body.
pub async fn call_ingress(
    ingress: SocketAddr,
    service: &str,
    method: &str,
    body: &'static [u8],
) -> (u16, Bytes) {
    let (code, _, body) = post(
        ingress,
        service,
        method,
        Bytes::from_static(body),
        Some(5000),
    )
    .await
    .expect("the ingress answers");
    (code, body)
}

/// A child process killed (and reaped) when dropped: an unplugged device, a stopped broker.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sums `starling_requests_total` by (service, method, status).
pub fn request_counts(metrics: &str) -> std::collections::BTreeMap<(String, String, String), u64> {
    let mut out = std::collections::BTreeMap::new();
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("starling_requests_total{"))
    {
        let (labels, value) = line.rsplit_once(' ').expect("value");
        let label = |k: &str| {
            labels
                .split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("label")
                .to_owned()
        };
        *out.entry((label("service"), label("method"), label("status")))
            .or_default() += value.parse::<u64>().expect("count");
    }
    out
}

/// A (service, method, status) key of [`request_counts`].
pub fn key(s: &str, m: &str, st: &str) -> (String, String, String) {
    (s.into(), m.into(), st.into())
}

/// A gateway's `/metrics` text (status 200 asserted).
pub async fn metrics(admin: SocketAddr) -> String {
    let (code, text) = http("GET", admin, "/metrics", None, "").await;
    assert_eq!(code, 200);
    text
}

/// A gateway that hears telemetry every 100 ms and calls a node down 500 ms after its control
/// stream ends (`extra` appended); its process and admin address.
pub fn quick_gateway(pki: &Pki, extra: &str) -> (NodeProc, SocketAddr) {
    let conf = pki.gateway_config(
        "gw",
        "127.0.0.1:0",
        &format!("{extra}[telemetry]\ninterval_ms = 100\n[registry]\ndown_after_ms = 500\n"),
    );
    NodeProc::start_gateway("gw", &conf)
}

/// Node `name` of gateway `gw`, reporting every 100 ms, configured with `extra`.
pub fn gateway_node(pki: &Pki, gw: &NodeProc, name: &str, extra: &str) -> NodeProc {
    let path = pki.config(name, &format!("{extra}[telemetry]\ninterval_ms = 100\n"));
    prepend(&path, &format!("gateway = \"{}\"\n", gw.quic));
    NodeProc::start(name, &path)
}
