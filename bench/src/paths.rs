//! The paths measured, each with its server on the server thread and its client here.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use mesh_gateway::ca::Ca;
use mesh_node::bind_endpoint;
use mesh_node::config::Limits;
use mesh_node::identity::Identity;
use mesh_node::{Node, NodeConfig};
use tokio::net::UdpSocket;

/// One path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Udp,
    Quinn,
    /// Raw quinn with a stream per client task, kept for its calls one after another.
    QuinnKept,
    Starling,
    StarlingPolicy,
    Ingress,
    #[cfg(feature = "zenoh")]
    Zenoh,
}

impl Kind {
    pub fn all() -> Vec<Kind> {
        vec![
            Kind::Udp,
            Kind::Quinn,
            Kind::QuinnKept,
            Kind::Starling,
            Kind::StarlingPolicy,
            Kind::Ingress,
            #[cfg(feature = "zenoh")]
            Kind::Zenoh,
        ]
    }

    pub fn name(&self) -> &'static str {
        match self {
            Kind::Udp => "raw UDP echo",
            Kind::Quinn => "raw quinn mTLS",
            Kind::QuinnKept => "raw quinn, kept streams",
            Kind::Starling => "Starling Rust API",
            Kind::StarlingPolicy => "Starling API, 50 rules",
            Kind::Ingress => "Starling HTTP ingress",
            #[cfg(feature = "zenoh")]
            Kind::Zenoh => "zenoh get/queryable",
        }
    }
}

/// The latencies of one run and its wall time.
pub struct Run {
    pub latencies: Vec<Duration>,
    pub wall: Duration,
}

/// Everything the paths need, up and connected.
pub struct Fixture {
    _dir: tempfile::TempDir,
    server: tokio::runtime::Handle,
    udp: SocketAddr,
    quinn_client: quinn::Endpoint,
    quinn_conn: quinn::Connection,
    quinn_addr: SocketAddr,
    kept_conn: quinn::Connection,
    node_a: Node,
    node_b: Node,
    policy: mesh_node::policy::Policy,
    ingress: SocketAddr,
    /// The HTTP echo server node B's `hecho` forwards to.
    http_upstream: SocketAddr,
    #[cfg(feature = "zenoh")]
    zenoh: crate::paths::zenoh_path::Zenoh,
}

impl Fixture {
    pub async fn start() -> anyhow::Result<Fixture> {
        let server = server_thread()?;
        let dir = tempfile::tempdir()?;
        let ca = Ca::generate("bench.local")?;
        let identity = |name: &str| node_config(dir.path(), &ca, name);

        // Raw UDP echo server.
        let udp_sock = server
            .spawn(async { UdpSocket::bind("127.0.0.1:0").await })
            .await??;
        let udp = udp_sock.local_addr()?;
        server.spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp_sock.recv_from(&mut buf).await {
                let _ = udp_sock.send_to(&buf[..n], from).await;
            }
        });

        // Raw quinn echo server, with the same kind of certificates the mesh uses.
        let (_, qs_id) = identity("quinn-server")?;
        let (_, qc_id) = identity("quinn-client")?;
        let limits = Limits::default();
        let quinn_addr =
            raw_quinn_server(&server, qs_id, &limits, |mut send, mut recv| async move {
                let Ok(body) = recv.read_to_end(MAX_PAYLOAD).await else {
                    return;
                };
                let _ = send.write_all(&body).await;
                let _ = send.finish();
            })
            .await?;
        // Raw quinn with kept streams, on an endpoint of its own: each client task keeps one
        // stream and sends its calls on it one after another, length-prefixed. It is what
        // Starling's kept streams do with nothing else: how much of the transport Starling keeps
        // once both spare a stream per call.
        let (_, qk_id) = identity("quinn-kept")?;
        let kept_addr =
            raw_quinn_server(&server, qk_id, &limits, |mut send, mut recv| async move {
                let mut len = [0u8; 4];
                while recv.read_exact(&mut len).await.is_ok() {
                    let n = u32::from_le_bytes(len) as usize;
                    if n > MAX_PAYLOAD {
                        return;
                    }
                    let mut body = vec![0u8; n];
                    if recv.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let mut parts = [Bytes::copy_from_slice(&len), Bytes::from(body)];
                    if send.write_all_chunks(&mut parts).await.is_err() {
                        return;
                    }
                }
            })
            .await?;
        let quinn_client = bind_endpoint(&qc_id, &limits, "127.0.0.1:0".parse()?)?;
        let quinn_conn = quinn_client.connect(quinn_addr, "starling.mesh")?.await?;
        let kept_conn = quinn_client.connect(kept_addr, "starling.mesh")?.await?;

        // HTTP upstream for the ingress path.
        let http_up = server
            .spawn(async { tokio::net::TcpListener::bind("127.0.0.1:0").await })
            .await??;
        let http_addr = http_up.local_addr()?;
        server.spawn(async move {
            while let Ok((stream, _)) = http_up.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            Ok::<_, hyper::Error>(hyper::Response::new(Full::new(body)))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });

        // Starling: B hosts echo (builtin) and hecho (HTTP upstream), A calls.
        let (mut b_conf, b_id) = identity("node-b")?;
        b_conf.services = vec![
            mesh_node::config::ServiceConfig {
                name: "echo".parse().map_err(anyhow::Error::msg)?,
                upstream: mesh_node::upstream::UpstreamSpec::Echo,
                line: 0,
            },
            mesh_node::config::ServiceConfig {
                name: "hecho".parse().map_err(anyhow::Error::msg)?,
                upstream: format!("http://{http_addr}")
                    .parse()
                    .map_err(anyhow::Error::msg)?,
                line: 0,
            },
        ];
        b_conf.ingress = None;
        let node_b = server.spawn(Node::start(b_conf, b_id)).await??;
        let (mut a_conf, a_id) = identity("node-a")?;
        a_conf.peers = vec![node_b.local_addr()];
        let a_ingress = a_conf.ingress.context("ingress")?;
        let node_a = Node::start(a_conf, a_id).await?;
        anyhow::ensure!(
            node_a
                .wait_for_service("echo", Duration::from_secs(5))
                .await,
            "node-a did not see node-b"
        );
        let ingress = mesh_node::ingress::serve(node_a.clone(), a_ingress).await?;

        // The same nodes run the "50 rules" path with this policy set on both, and the plain path
        // without it, so the two differ by the policy alone.
        let policy = mesh_node::policy::Policy::parse(&fifty_rules(), "bench policy")?;

        #[cfg(feature = "zenoh")]
        let zenoh = zenoh_path::Zenoh::start().await?;

        Ok(Fixture {
            _dir: dir,
            server,
            udp,
            quinn_client,
            quinn_conn,
            quinn_addr,
            kept_conn,
            node_a,
            node_b,
            policy,
            ingress,
            http_upstream: http_addr,
            #[cfg(feature = "zenoh")]
            zenoh,
        })
    }

    /// Node A's HTTP ingress, and the HTTP echo server behind node B's `hecho`.
    pub fn http_addrs(&self) -> (SocketAddr, SocketAddr) {
        (self.ingress, self.http_upstream)
    }

    /// `calls` calls of `payload` bytes over `kind`, `inflight` at a time.
    pub async fn run(
        &self,
        kind: Kind,
        payload: usize,
        inflight: usize,
        calls: usize,
    ) -> anyhow::Result<Run> {
        let body = Bytes::from(vec![0xa5u8; payload]);
        let per_task = calls.div_ceil(inflight);
        // The policy is on both nodes for the "50 rules" path and on neither otherwise.
        for node in [&self.node_a, &self.node_b] {
            if kind == Kind::StarlingPolicy {
                node.set_policy(1, self.policy.clone());
            } else {
                node.clear_policy();
            }
        }
        // zenoh needs a multi-thread runtime: its clients run on one of their own (one worker).
        let runtime = match kind {
            #[cfg(feature = "zenoh")]
            Kind::Zenoh => self.zenoh.client_rt.clone(),
            _ => tokio::runtime::Handle::current(),
        };
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..inflight {
            let client = self.client(kind).await?;
            let body = body.clone();
            tasks.spawn_on(
                async move {
                    let mut lat = Vec::with_capacity(per_task);
                    let mut client = client;
                    for _ in 0..per_task {
                        let t = Instant::now();
                        let answer = client.call(body.clone()).await?;
                        lat.push(t.elapsed());
                        anyhow::ensure!(
                            answer == body.len(),
                            "short answer: {answer} of {} bytes",
                            body.len()
                        );
                    }
                    Ok::<_, anyhow::Error>(lat)
                },
                &runtime,
            );
        }
        let mut latencies = Vec::with_capacity(calls);
        while let Some(r) = tasks.join_next().await {
            latencies.extend(r??);
        }
        Ok(Run {
            latencies,
            wall: start.elapsed(),
        })
    }

    async fn client(&self, kind: Kind) -> anyhow::Result<Client> {
        Ok(match kind {
            Kind::Udp => {
                let sock = UdpSocket::bind("127.0.0.1:0").await?;
                sock.connect(self.udp).await?;
                Client::Udp(sock, vec![0u8; 65536])
            }
            Kind::Quinn => Client::Quinn(self.quinn_conn.clone()),
            Kind::QuinnKept => Client::QuinnKept(self.kept_conn.clone(), None),
            Kind::Starling => Client::Starling(self.node_a.clone()),
            Kind::StarlingPolicy => Client::Starling(self.node_a.clone()),
            Kind::Ingress => {
                let stream = tokio::net::TcpStream::connect(self.ingress).await?;
                stream.set_nodelay(true)?;
                let (sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                Client::Ingress(sender)
            }
            #[cfg(feature = "zenoh")]
            Kind::Zenoh => Client::Zenoh(self.zenoh.session.clone()),
        })
    }

    /// Time and CPU of `n` new mutual-TLS QUIC handshakes, one after another.
    pub async fn handshakes(&self, n: usize) -> anyhow::Result<crate::stats::Handshake> {
        let mut times = Vec::with_capacity(n);
        let cpu0 = crate::stats::cpu_time();
        for _ in 0..n {
            let t = Instant::now();
            let conn = self
                .quinn_client
                .connect(self.quinn_addr, "starling.mesh")?
                .await?;
            times.push(t.elapsed());
            conn.close(0u32.into(), b"");
        }
        let cpu = crate::stats::cpu_time() - cpu0;
        times.sort();
        Ok(crate::stats::Handshake {
            count: n,
            p50: times[n / 2],
            cpu_per: cpu / n as u32,
        })
    }

    pub async fn shutdown(self) {
        #[cfg(feature = "zenoh")]
        {
            // zenoh sessions close on a runtime of zenoh's liking.
            let handle = self.zenoh.client_rt.clone();
            let zenoh = self.zenoh;
            let _ = handle.spawn(async move { drop(zenoh) }).await;
        }
        self.node_a.shutdown().await;
        let b = self.node_b.clone();
        let _ = self.server.spawn(async move { b.shutdown().await }).await;
        self.quinn_client.close(0u32.into(), b"");
    }
}

/// A raw quinn endpoint on the `server` thread with identity `id` and the mesh's transport
/// settings, with every stream allowed at once (a node starts a connection with a few and grows
/// as its peer uses them); each stream goes to `serve`. Returns its address.
async fn raw_quinn_server<F, Fut>(
    server: &tokio::runtime::Handle,
    id: Identity,
    limits: &Limits,
    serve: F,
) -> anyhow::Result<SocketAddr>
where
    F: Fn(quinn::SendStream, quinn::RecvStream) -> Fut + Send + Copy + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let for_bind = limits.clone();
    let endpoint = server
        .spawn(async move { bind_endpoint(&id, &for_bind, "127.0.0.1:0".parse().expect("addr")) })
        .await??;
    let addr = endpoint.local_addr()?;
    let streams = limits.max_concurrent_calls;
    server.spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                conn.set_max_concurrent_bi_streams(streams.into());
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(serve(send, recv));
                }
            });
        }
    });
    Ok(addr)
}

/// A thread with a single-threaded runtime of its own (the "server" side of every path, as on a
/// device); returns its handle.
pub fn server_thread() -> anyhow::Result<tokio::runtime::Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("server".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("server runtime");
            tx.send(rt.handle().clone()).expect("handle");
            rt.block_on(std::future::pending::<()>());
        })?;
    Ok(rx.recv()?)
}

/// A node `name` of the mesh of `ca`, its folder under `dir`: its config (loopback, no mDNS) and
/// its identity.
pub fn node_config(
    dir: &std::path::Path,
    ca: &Ca,
    name: &str,
) -> anyhow::Result<(NodeConfig, Identity)> {
    let nd = dir.join(name);
    ca.issue_node(name, 1)?
        .save(&nd.join("certs"), ca.cert_pem())?;
    let path = nd.join("node.toml");
    std::fs::write(
        &path,
        format!(
            "name = \"{name}\"\nlisten = \"127.0.0.1:0\"\ningress = \"127.0.0.1:0\"\nlog = \"warn\"\nstate_dir = \"state\"\n\
             [identity]\ncert = \"certs/node.crt\"\nkey = \"certs/node.key\"\nca = \"certs/ca.crt\"\n[discovery]\nmdns = false\n"
        ),
    )?;
    let config = NodeConfig::load(&path)?;
    let id = config.load_identity()?;
    Ok((config, id))
}

/// The largest payload a path carries: 4 MiB, the node's default body bound.
pub const MAX_PAYLOAD: usize = 4 * 1024 * 1024;

/// The largest datagram raw UDP can echo on loopback.
pub const MAX_UDP_PAYLOAD: usize = 65_507;

enum Client {
    Udp(UdpSocket, Vec<u8>),
    Quinn(quinn::Connection),
    /// The connection, and this task's stream once opened.
    QuinnKept(
        quinn::Connection,
        Option<(quinn::SendStream, quinn::RecvStream)>,
    ),
    Starling(Node),
    Ingress(SendRequest<Full<Bytes>>),
    #[cfg(feature = "zenoh")]
    Zenoh(zenoh::Session),
}

impl Client {
    /// One call; returns the answer's length.
    async fn call(&mut self, body: Bytes) -> anyhow::Result<usize> {
        match self {
            Client::Udp(sock, buf) => {
                // Loopback can drop datagrams when 64 are in flight: resend after a bound.
                for _ in 0..100 {
                    sock.send(&body).await?;
                    if let Ok(n) =
                        tokio::time::timeout(Duration::from_millis(200), sock.recv(buf)).await
                    {
                        return Ok(n?);
                    }
                }
                anyhow::bail!("raw UDP: no echo after 100 tries")
            }
            Client::Quinn(conn) => {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(&body).await?;
                send.finish()?;
                Ok(recv.read_to_end(MAX_PAYLOAD).await?.len())
            }
            Client::QuinnKept(conn, stream) => {
                if stream.is_none() {
                    *stream = Some(conn.open_bi().await?);
                }
                let (send, recv) = stream.as_mut().context("stream")?;
                let len = u32::try_from(body.len())?.to_le_bytes();
                send.write_all_chunks(&mut [Bytes::copy_from_slice(&len), body])
                    .await?;
                let mut got = [0u8; 4];
                recv.read_exact(&mut got).await?;
                let n = u32::from_le_bytes(got) as usize;
                anyhow::ensure!(n <= MAX_PAYLOAD, "raw quinn answered {n} bytes");
                let mut answer = vec![0u8; n];
                recv.read_exact(&mut answer).await?;
                Ok(n)
            }
            Client::Starling(node) => Ok(node.call("echo", "say", body).await?.len()),
            Client::Ingress(sender) => {
                let req = hyper::Request::post("/v1/call/hecho/say")
                    .header(hyper::header::HOST, "127.0.0.1")
                    .body(Full::new(body))?;
                let resp = sender.send_request(req).await?;
                anyhow::ensure!(resp.status() == 200, "ingress answered {}", resp.status());
                Ok(resp.into_body().collect().await?.to_bytes().len())
            }
            #[cfg(feature = "zenoh")]
            Client::Zenoh(session) => zenoh_path::get(session, body).await,
        }
    }
}

#[cfg(feature = "zenoh")]
pub mod zenoh_path {
    //! zenoh get/queryable over TCP on loopback, peer to peer, no router.
    use bytes::Bytes;

    pub struct Zenoh {
        pub session: zenoh::Session,
        pub client_rt: tokio::runtime::Handle,
        _server: zenoh::Session,
    }

    /// A multi-thread runtime with one worker, kept for the life of the process (zenoh refuses
    /// current-thread runtimes, and a runtime cannot be dropped inside another).
    fn one_worker(name: &str) -> anyhow::Result<tokio::runtime::Handle> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Box::leak(Box::new(rt)).handle().clone())
    }

    fn config(key: &str, endpoint: &str) -> anyhow::Result<zenoh::Config> {
        let mut config = zenoh::Config::default();
        config
            .insert_json5("mode", "\"peer\"")
            .map_err(anyhow::Error::msg)?;
        config
            .insert_json5(key, &format!("[\"{endpoint}\"]"))
            .map_err(anyhow::Error::msg)?;
        config
            .insert_json5("scouting/multicast/enabled", "false")
            .map_err(anyhow::Error::msg)?;
        Ok(config)
    }

    impl Zenoh {
        pub async fn start() -> anyhow::Result<Zenoh> {
            let server_rt = one_worker("zenoh-server")?;
            let client_rt = one_worker("zenoh-client")?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let endpoint = format!("tcp/127.0.0.1:{port}");
            let listen = config("listen/endpoints", &endpoint)?;
            let server_session = server_rt
                .spawn(async move {
                    let session = zenoh::open(listen).await.map_err(anyhow::Error::msg)?;
                    let queryable = session
                        .declare_queryable("bench/echo")
                        .await
                        .map_err(anyhow::Error::msg)?;
                    tokio::spawn(async move {
                        while let Ok(query) = queryable.recv_async().await {
                            let payload = query
                                .payload()
                                .map(|p| p.to_bytes().to_vec())
                                .unwrap_or_default();
                            let _ = query.reply("bench/echo", payload).await;
                        }
                    });
                    Ok::<_, anyhow::Error>(session)
                })
                .await??;
            let mut connect = config("connect/endpoints", &endpoint)?;
            // A peer listens too, on every interface unless told: loopback only, as the rest of
            // the bench.
            connect
                .insert_json5("listen/endpoints", "[\"tcp/127.0.0.1:0\"]")
                .map_err(anyhow::Error::msg)?;
            let session = client_rt
                .spawn(async move {
                    let session = zenoh::open(connect).await.map_err(anyhow::Error::msg)?;
                    // Wait until the queryable answers (bounded).
                    for _ in 0..100 {
                        if get(&session, Bytes::from_static(b"x")).await.is_ok() {
                            return Ok::<_, anyhow::Error>(session);
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    anyhow::bail!("zenoh queryable never answered")
                })
                .await??;
            Ok(Zenoh {
                session,
                client_rt,
                _server: server_session,
            })
        }
    }

    pub async fn get(session: &zenoh::Session, body: Bytes) -> anyhow::Result<usize> {
        let replies = session
            .get("bench/echo")
            .payload(body.to_vec())
            .await
            .map_err(anyhow::Error::msg)?;
        let reply = replies.recv_async().await.map_err(anyhow::Error::msg)?;
        let sample = reply
            .result()
            .map_err(|e| anyhow::anyhow!("zenoh error reply: {e:?}"))?;
        Ok(sample.payload().len())
    }
}

/// A policy of 50 rules, the matching ones last: 44 authorization rules that do not match, the
/// one that allows, 3 routes that do not match and the one that does, a retry policy and a rate
/// limit far above the load.
fn fifty_rules() -> String {
    let mut p = String::from("[authorization]\ndefault = \"deny\"\n");
    for i in 0..44 {
        p.push_str(&format!(
            "[[authorization.rules]]\nname = \"other-{i}\"\neffect = \"allow\"\ncallers = [\"spiffe://bench.local/node/other-{i}-*\"]\n"
        ));
    }
    p.push_str("[[authorization.rules]]\nname = \"bench\"\neffect = \"allow\"\ncallers = [\"spiffe://bench.local/node/node-*\"]\nservices = [\"echo\"]\n");
    p.push_str("[[services]]\nname = \"echo\"\nidempotent = [\"say\"]\nretry = { attempts = 2, budget_percent = 10 }\n");
    for i in 0..3 {
        p.push_str(&format!(
            "[[services.routes]]\nname = \"canary-{i}\"\nmetadata = {{ \"x-canary-{i}\" = \"1\" }}\nsplit = [ {{ subset = {{ version = \"v{i}\" }}, weight = 1 }} ]\n"
        ));
    }
    p.push_str("[[services.routes]]\nname = \"all\"\nsplit = [ { subset = {}, weight = 1 } ]\n");
    p.push_str("[[rate_limits]]\nname = \"generous\"\nservice = \"echo\"\nper_second = 10000000\nburst = 10000000\n");
    p
}
