//! A local MQTT broker for the demo, the tests and the benchmark: mosquitto (Debian package
//! `mosquitto`) on a free loopback port with TLS, client certificates required (a certificate's
//! CN is its user name), an ACL that lets the site publish only under its prefix, and
//! persistence (a restarted broker still has its subscribers' sessions). And a subscriber that
//! records what arrives, as a cloud application would.

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

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A CA, and certificates it issued, as PEM files in a folder.
pub struct BrokerPki {
    /// The folder.
    pub dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl BrokerPki {
    /// A new CA named `name` in `dir` (`ca.crt`).
    pub fn new(dir: &Path, name: &str) -> Result<BrokerPki, String> {
        std::fs::create_dir_all(dir).map_err(err)?;
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).map_err(err)?;
        std::fs::write(dir.join("ca.crt"), cert.pem()).map_err(err)?;
        Ok(BrokerPki {
            dir: dir.to_owned(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate's path.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issues `<name>.crt` and `<name>.key` (mode 0600) with CN `name` (again if they exist);
    /// a server certificate for `127.0.0.1` and `localhost` when `server`.
    pub fn issue(&self, name: &str, server: bool) -> Result<(PathBuf, PathBuf), String> {
        let key = KeyPair::generate().map_err(err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        if server {
            params.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().map_err(err)?),
                SanType::IpAddress([127, 0, 0, 1].into()),
            ];
        }
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        let crt = self.dir.join(format!("{name}.crt"));
        let keyfile = self.dir.join(format!("{name}.key"));
        std::fs::write(&crt, cert.pem()).map_err(err)?;
        mesh_node::state::write_atomic(&keyfile, key.serialize_pem().as_bytes(), 0o600)
            .map_err(err)?;
        Ok((crt, keyfile))
    }
}

/// A mosquitto process; killed when dropped.
pub struct Broker {
    /// Its TLS port on 127.0.0.1.
    pub port: u16,
    /// Its folder: config, ACL, data, log.
    pub dir: PathBuf,
    /// Its CA, which issues the clients' certificates too.
    pub pki: BrokerPki,
    child: Option<Child>,
}

/// The broker binary: on PATH, or where Debian puts it; `None` if it is not installed.
pub fn mosquitto() -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("mosquitto"))
        .chain([PathBuf::from("/usr/sbin/mosquitto")])
        .find(|p| p.exists())
}

impl Broker {
    /// Writes the broker's config, certificates and ACL into `dir` and starts it. The ACL:
    /// `site` may publish only under `prefix` and read its `policy/set` and `call/#`; `app` may
    /// do anything.
    pub fn start(dir: &Path, site: &str, prefix: &str, app: &str) -> Result<Broker, String> {
        let pki = BrokerPki::new(&dir.join("pki"), "broker-ca")?;
        let (crt, key) = pki.issue("broker", true)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(err)?
            .port();
        let acl = dir.join("acl");
        std::fs::write(
            &acl,
            format!(
                "user {site}\ntopic write {prefix}/#\ntopic read {prefix}/policy/set\n\
                 topic read {prefix}/call/#\n\nuser {app}\ntopic readwrite #\n"
            ),
        )
        .map_err(err)?;
        std::fs::create_dir_all(dir.join("data")).map_err(err)?;
        std::fs::write(
            dir.join("mosquitto.conf"),
            format!(
                "user root\npersistence true\npersistence_location {data}/\nautosave_interval 1\n\
                 max_queued_messages 0\nmax_inflight_messages 0\nlog_dest stderr\nset_tcp_nodelay true\n\
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
        .map_err(err)?;
        let mut broker = Broker {
            port,
            dir: dir.to_owned(),
            pki,
            child: None,
        };
        broker.restart()?;
        Ok(broker)
    }

    /// `mqtts://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("mqtts://127.0.0.1:{}", self.port)
    }

    /// Starts it (again, after [`Broker::stop`]) and waits (10 s at most) until it accepts
    /// connections.
    pub fn restart(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Err("the broker runs already".into());
        }
        let binary = mosquitto().ok_or("mosquitto is not installed (scripts/setup.sh does it)")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("mosquitto.log"))
            .map_err(err)?;
        let child = Command::new(binary)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("mosquitto: {e}"))?;
        self.child = Some(child);
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(format!("mosquitto exited: {status}; log: {}", self.log()));
            }
            if Instant::now() > deadline {
                return Err("mosquitto did not listen within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops it (SIGTERM: it saves its sessions) and waits (10 s, then SIGKILL) for the exit.
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

/// A message a subscriber received.
#[derive(Debug, Clone)]
pub struct Received {
    /// Its topic.
    pub topic: String,
    /// Its payload.
    pub payload: Bytes,
    /// Whether it came with the retain flag.
    pub retain: bool,
    /// Its MQTT 5 properties.
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

/// A cloud application: an MQTT 5 client of `broker` with a persistent session (it outlives
/// a broker restart), subscribed to `filter`, recording every message.
pub struct Subscriber {
    /// Its client, to publish with.
    pub client: AsyncClient,
    seen: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    /// Connects as `client_id` with certificate `cert`/`key` and subscribes to `filter`;
    /// returns once subscribed (10 s at most).
    pub async fn connect(
        broker: &Broker,
        client_id: &str,
        (cert, key): (&Path, &Path),
        filter: &str,
    ) -> Result<Subscriber, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let tls = client_tls(&read(&broker.pki.ca())?, &read(cert)?, &read(key)?)?;
        let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port);
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(3600))
            // rumqttc takes 10 KiB by default; a site's registry can be larger.
            .set_max_packet_size(Some(64 << 20))
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut events) = AsyncClient::new(options, 256);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let record = seen.clone();
        let sub = client.clone();
        let filter = filter.to_owned();
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        if !ack.session_present {
                            let _ = sub.subscribe(filter.clone(), QoS::AtLeastOnce).await;
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
                        record
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Received {
                                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                                payload: p.payload.clone(),
                                retain: p.retain,
                                properties: p.properties.clone(),
                            });
                    }
                    Ok(_) => {}
                    // The broker is away: try again shortly.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), subscribed).await {
            Ok(Ok(())) => Ok(Subscriber { client, seen, task }),
            _ => {
                task.abort();
                Err("the subscriber was not subscribed within 10 s".into())
            }
        }
    }

    /// Every message received so far.
    pub fn seen(&self) -> Vec<Received> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A rustls client config (ring) trusting `ca_pem`, presenting `cert_pem` and `key_pem`.
pub fn client_tls(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.map_err(err)?).map_err(err)?;
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(err)?;
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(err)
}

#[cfg(test)]
mod tests {
    #[test]
    fn issues_twice() {
        let dir = tempfile::tempdir().expect("dir");
        let pki = super::BrokerPki::new(&dir.path().join("pki"), "x").expect("ca");
        pki.issue("gw", false).expect("once");
        pki.issue("gw", false).expect("twice");
    }
}
