//! A real MQTT broker for the cloud bridge's tests: mosquitto (Debian package `mosquitto`) with
//! TLS on a free loopback port, client certificates required (the certificate's CN is the user
//! name), an ACL that lets the site publish only under its prefix, and persistence (a restarted
//! broker still has the test subscriber's session). And the cloud side: an MQTT 5 client that
//! records every message under the site's prefix.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use rumqttc::{TlsConfiguration, Transport};

/// The site's MQTT client id, CN and topic prefix in these tests.
pub const SITE: &str = "site-7";
/// The prefix the site publishes under.
pub const PREFIX: &str = "starling/site-7";
/// The CN of the cloud application's certificate.
pub const CLOUD_APP: &str = "cloud-app";

/// A CA, and certificates it issued, as PEM files in a folder.
pub struct BrokerPki {
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl BrokerPki {
    /// A new CA in `dir` (`ca.crt`).
    pub fn new(dir: &Path, name: &str) -> BrokerPki {
        std::fs::create_dir_all(dir).expect("dir");
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).expect("ca");
        std::fs::write(dir.join("ca.crt"), cert.pem()).expect("ca.crt");
        BrokerPki {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate's path.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issues `<name>.crt` and `<name>.key` (mode 0600) with CN `name`; a server certificate
    /// for `127.0.0.1` and `localhost` when `server`.
    pub fn issue(&self, name: &str, server: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        if server {
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().expect("dns")),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
        }
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (crt, keyfile) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&crt, cert.pem()).expect("crt");
        let _ = std::fs::remove_file(&keyfile);
        mesh_gateway::ca::write_new(&keyfile, key.serialize_pem().as_bytes(), 0o600).expect("key");
        (crt, keyfile)
    }
}

/// A mosquitto process; killed when dropped.
pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    pub pki: BrokerPki,
    child: Option<Child>,
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Broker {
    /// Writes the broker's config, certificates and ACL into `dir` and starts it.
    pub fn start(dir: &Path) -> Broker {
        let pki = BrokerPki::new(&dir.join("pki"), "broker-ca");
        let (crt, key) = pki.issue("broker", true);
        let port = free_tcp_port();
        let acl = dir.join("acl");
        std::fs::write(
            &acl,
            format!(
                "user {SITE}\ntopic write {PREFIX}/#\ntopic read {PREFIX}/policy/set\n\
                 topic read {PREFIX}/call/#\n\nuser {CLOUD_APP}\ntopic readwrite #\n"
            ),
        )
        .expect("acl");
        std::fs::create_dir_all(dir.join("data")).expect("data");
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "user root\npersistence true\npersistence_location {data}/\nautosave_interval 1\n\
                 max_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\n\
                 listener {port} 127.0.0.1\nallow_anonymous false\nrequire_certificate true\n\
                 use_identity_as_username true\ncafile {ca}\ncertfile {crt}\nkeyfile {key}\n\
                 acl_file {acl}\n",
                data = dir.join("data").display(),
                ca = pki.ca().display(),
                crt = crt.display(),
                key = key.display(),
                acl = acl.display(),
            ),
        )
        .expect("conf");
        let mut broker = Broker {
            port,
            dir: dir.to_owned(),
            pki,
            child: None,
        };
        broker.restart();
        broker
    }

    /// `mqtts://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Starts it again (after [`Broker::stop`]) and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the broker runs already");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .expect("log");
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto (Debian package mosquitto; scripts/setup.sh installs it)");
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("mosquitto exited: {status}; log: {}", self.log());
            }
            assert!(Instant::now() < deadline, "mosquitto never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGTERM: it saves its sessions) and waits for the exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(child.try_wait(), Ok(Some(_))) {
                if Instant::now() > deadline {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The broker binary: on PATH, or where Debian puts it.
fn mosquitto() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("mosquitto");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("/usr/sbin/mosquitto")
}

/// A message the cloud received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub retain: bool,
    pub properties: Option<PublishProperties>,
}

impl Received {
    /// The payload as JSON (`Null` if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }

    /// A user property.
    pub fn user_property(&self, key: &str) -> Option<String> {
        self.properties.as_ref().and_then(|p| {
            p.user_properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        })
    }
}

/// The cloud application: an MQTT 5 client (certificate CN [`CLOUD_APP`]) with a persistent
/// session, subscribed to everything under [`PREFIX`], recording what arrives.
pub struct CloudApp {
    pub client: AsyncClient,
    pub seen: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CloudApp {
    /// Connects to `broker` as `client_id` and subscribes; returns once subscribed.
    pub async fn connect(broker: &Broker, client_id: &str) -> CloudApp {
        let (crt, key) = broker.pki.issue(CLOUD_APP, false);
        let read = |p: &Path| std::fs::read(p).expect("read");
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(client_tls(
                    &read(&broker.pki.ca()),
                    &read(&crt),
                    &read(&key),
                )),
            )));
        let (client, mut events) = AsyncClient::new(options, 256);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let record = seen.clone();
        let sub = client.clone();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = sub.subscribe(format!("{PREFIX}/#"), QoS::AtLeastOnce).await;
                        } else if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        record.lock().expect("seen").push(Received {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            payload: p.payload.clone(),
                            retain: p.retain,
                            properties: p.properties.clone(),
                        });
                    }
                    Ok(_) => {}
                    // The broker is away (a test stopped it): try again shortly.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), subscribed)
            .await
            .expect("the cloud app subscribes within 10 s")
            .expect("subscribed");
        CloudApp { client, seen, task }
    }

    /// Every message received so far.
    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().expect("seen").clone()
    }

    /// Messages on `<PREFIX>/<suffix>`.
    pub fn on(&self, suffix: &str) -> Vec<Received> {
        let topic = format!("{PREFIX}/{suffix}");
        self.seen()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Waits (polling every 50 ms, at most `timeout`) until `ready` holds for what was received;
    /// panics naming `what` otherwise.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        ready: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen();
            if ready(&seen) {
                return seen;
            }
            assert!(
                Instant::now() < deadline,
                "the cloud never saw {what} within {timeout:?}; last messages: {:?}",
                seen.iter()
                    .rev()
                    .take(5)
                    .map(|m| (&m.topic, String::from_utf8_lossy(&m.payload)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Publishes `payload` on `<PREFIX>/<suffix>` with `properties` (QoS 1).
    pub async fn publish(&self, suffix: &str, payload: Vec<u8>, properties: PublishProperties) {
        self.client
            .publish_with_properties(
                format!("{PREFIX}/{suffix}"),
                QoS::AtLeastOnce,
                false,
                payload,
                properties,
            )
            .await
            .expect("publish");
    }
}

impl Drop for CloudApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rustls client config (ring) trusting `ca_pem`, presenting `cert_pem` and `key_pem`.
pub fn client_tls(ca_pem: &[u8], cert_pem: &[u8], key_pem: &[u8]) -> rustls::ClientConfig {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.expect("ca")).expect("root");
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem).expect("key");
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client auth")
}

/// Every `seq` the cloud received (duplicates removed) and the gap ranges it was told of: what
/// is missing from 1 to the highest seq seen, after both.
pub fn missing_seqs(seen: &[Received]) -> (u64, Vec<u64>) {
    let mut have = std::collections::BTreeSet::new();
    for m in seen {
        let v = m.json();
        if let Some(seq) = v["seq"].as_u64() {
            have.insert(seq);
        }
        if let Some(gaps) = v["gaps"].as_array() {
            for g in gaps {
                let (a, b) = (g[0].as_u64().expect("gap"), g[1].as_u64().expect("gap"));
                have.extend(a..=b);
            }
        }
    }
    let max = have.iter().next_back().copied().unwrap_or(0);
    (max, (1..=max).filter(|s| !have.contains(s)).collect())
}

/// Calls the cloud's telemetry counted, by (service, method, status).
pub fn telemetry_counts(
    seen: &[Received],
) -> std::collections::BTreeMap<(String, String, String), u64> {
    let mut out = std::collections::BTreeMap::new();
    let mut counted = std::collections::BTreeSet::new();
    for m in seen
        .iter()
        .filter(|m| m.topic == format!("{PREFIX}/telemetry"))
    {
        let v = m.json();
        // At least once: a batch seen twice (the same message again, or the node's resend of a
        // batch a gateway took but died before acknowledging) is counted once.
        let batch = (
            v["node"].as_str().expect("node").to_owned(),
            v["node_boot"].as_u64().expect("node_boot"),
            v["node_seq"].as_u64().expect("node_seq"),
        );
        if !counted.insert(batch) {
            continue;
        }
        for c in v["calls"].as_array().expect("calls") {
            let key = (
                c["service"].as_str().expect("service").to_owned(),
                c["method"].as_str().expect("method").to_owned(),
                c["status"].as_str().expect("status").to_owned(),
            );
            *out.entry(key).or_default() += c["count"].as_u64().expect("count");
        }
    }
    out
}
