//! The node's side of the control stream to its gateway: hello, heartbeats, policy bundles
//! (applied, saved, acknowledged or refused), telemetry batches (kept until acknowledged), the
//! registry (fed to the dialer, so a node reaches services beyond its own link).
//!
//! The gateway is a connected peer whose hello says `gateway` (found by mDNS, or by the
//! `gateway = "addr"` config key, which also makes it a static peer) and that matches the pin. The
//! stream reconnects with back-off and jitter, so a restarted gateway is not hit by every node at
//! once.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mesh_core::discovery::{Record, Update};
use mesh_core::policy::{Offer, judge_offer};
use mesh_core::{Backoff, NodeName};
use mesh_proto::RequestHead;
use mesh_proto::control::{BundleRef, CONTROL_SERVICE, Down, MAX_CONTROL_FRAME, NodeHello, Up};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::telemetry::{TelemetrySink, process_resources};
use crate::hosted::Hosted;
use crate::identity::renew::Renewer;
use crate::peers::PeerSet;
use crate::policy::{Policy, PolicyCell, PolicySource};
use crate::state::{PolicyStore, SavedBundle, bundle_hash};
use crate::wire::FrameReader;

/// How often a node says it is still there.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The node software version, as hellos and policy checks use it.
pub const SOFTWARE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Which peer a node accepts as its gateway: its certificate must certify the gateway role
/// (`spiffe://<td>/gateway/<name>`), and, when configured, it must be the peer at the `gateway`
/// address and carry the certified name `gateway_name`. Without either, any certified gateway of
/// the mesh would do (the node says so at start).
#[derive(Debug, Clone, Default)]
pub(crate) struct GatewayPin {
    pub(crate) addr: Option<SocketAddr>,
    pub(crate) name: Option<NodeName>,
}

/// The control session and what it reads and writes.
pub(crate) struct ControlClient {
    pub(crate) name: NodeName,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) local_addr: SocketAddr,
    pub(crate) pin: GatewayPin,
    pub(crate) peers: Arc<PeerSet>,
    pub(crate) policy: Arc<PolicyCell>,
    pub(crate) store: PolicyStore,
    pub(crate) telemetry: Arc<TelemetrySink>,
    pub(crate) hosted: Arc<Hosted>,
    /// Registry entries go to the dialer as discovery updates.
    pub(crate) updates: mpsc::UnboundedSender<Update>,
    /// Where the control stream is up to now, if it is, and how many it opened since start.
    pub(crate) gateway_up: Arc<watch::Sender<(Option<SocketAddr>, u64)>>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Renews this node's certificate over the control stream (none: it is not renewed).
    pub(crate) renewer: Option<Arc<Renewer>>,
}

impl ControlClient {
    /// Keeps a control stream to the gateway open for as long as the node runs.
    pub(crate) async fn run(self) {
        let mut stop = self.shutdown.clone();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let Some(conn) = self.gateway_connection().await else {
                return;
            };
            let ended = self.session(conn).await;
            self.gateway_up.send_modify(|(up, _)| *up = None);
            match ended {
                Ok(()) => backoff.reset(),
                Err(e) => debug!("control stream ended: {e}"),
            }
            let delay = backoff.next_delay(crate::rng::random());
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Waits for a connection to the pinned gateway; `None` on shutdown.
    async fn gateway_connection(&self) -> Option<quinn::Connection> {
        let mut changed = self.peers.subscribe();
        let mut stop = self.shutdown.clone();
        let pin = &self.pin;
        loop {
            let conn = self.peers.gateway_connection(|info, conn| {
                pin.name.as_ref().is_none_or(|n| info.id.node_name() == n)
                    && pin.addr.is_none_or(|a| conn.remote_address() == a)
            });
            if conn.is_some() {
                return conn;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return None },
                _ = stop.changed() => return None,
            }
        }
    }

    async fn session(&self, conn: quinn::Connection) -> Result<(), String> {
        // Through the connection's kept call streams, which give way to it.
        let opened = match self.peers.kept_on(&conn) {
            Some(kept) => kept.open_unkept(&conn).await,
            None => conn.open_bi().await,
        };
        let (mut send, recv) = opened.map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        mesh_proto::encode_frame_vec(&RequestHead::new(CONTROL_SERVICE, "session", 0), &mut out);
        mesh_proto::encode_frame_vec(&Up::Hello(self.hello()), &mut out);
        let hello_sent = std::time::Instant::now();
        send.write_all(&out).await.map_err(|e| e.to_string())?;
        info!(
            "control stream to the gateway at {} is up",
            conn.remote_address()
        );
        self.gateway_up.send_modify(|(up, opened)| {
            *up = Some(conn.remote_address());
            *opened += 1;
        });

        let mut reader = FrameReader::new(recv);
        let mut sent_up_to = 0u64;
        // The hosted services change (a microcontroller comes or goes): the gateway hears again.
        let mut hosted_changes = self.hosted.subscribe();
        hosted_changes.mark_unchanged();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        let mut stop = self.shutdown.clone();
        loop {
            // Send every batch not yet sent on this stream (all unacknowledged ones at first).
            let batches: Vec<Up> = self
                .telemetry
                .lock()
                .pending()
                .filter(|b| b.seq > sent_up_to)
                .map(|b| Up::Telemetry(b.clone()))
                .collect();
            for up in batches {
                if let Up::Telemetry(b) = &up {
                    sent_up_to = b.seq;
                }
                write_up(&mut send, &up).await?;
            }
            let new_batch = self.telemetry.batch_cut();
            let renew_in = self
                .renewer
                .as_ref()
                .map_or(Duration::MAX, |r| r.due_in(crate::wallclock::time()));
            tokio::select! {
                _ = tokio::time::sleep(renew_in.min(Duration::from_secs(3600))), if renew_in != Duration::MAX => {
                    if let Some(renewer) = &self.renewer
                        && renewer.due_in(crate::wallclock::time()).is_zero()
                    {
                        match renewer.request() {
                            Ok(csr_der) => {
                                info!("asking the gateway to renew this node's certificate");
                                write_up(&mut send, &Up::Renew { csr_der }).await?;
                            }
                            Err(e) => warn!("cannot make a renewal request: {e}"),
                        }
                    }
                }
                frame = reader.frame(MAX_CONTROL_FRAME) => {
                    let frame = frame.map_err(|e| e.to_string())?;
                    match mesh_proto::control::decode_down(&frame) {
                        Ok(Down::Time { unix_ms }) => {
                            if let Some(what) =
                                crate::wallclock::adopt_gateway_time(unix_ms, hello_sent.elapsed())
                            {
                                warn!("{what}");
                            }
                        }
                        Ok(down) => {
                            if let Some(answer) = self.handle_down(down).await {
                                write_up(&mut send, &answer).await?;
                            }
                        }
                        // A newer gateway may send frames this node does not know: skip them.
                        Err(e) => debug!("skipped a control frame this node cannot read: {e}"),
                    }
                }
                _ = new_batch => {}
                _ = heartbeat.tick() => {
                    // The gateway gives the time first when a stream opens (and it is taken
                    // only within 2 s of the hello).
                    if hello_sent.elapsed() > Duration::from_secs(3)
                        && crate::wallclock::wants_gateway_time()
                    {
                        warn!(
                            "this node's clock is before its time floor or its certificate's \
                             issue: a new control stream brings its gateway's time"
                        );
                        return Err("a new stream for the gateway's time".into());
                    }
                    write_up(&mut send, &Up::Heartbeat).await?
                }
                r = hosted_changes.changed() => {
                    if r.is_ok() {
                        write_up(&mut send, &Up::Hello(self.hello())).await?;
                    }
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }

    fn hello(&self) -> NodeHello {
        NodeHello {
            protocol_version: mesh_proto::PROTOCOL_VERSION,
            software_version: SOFTWARE_VERSION.to_owned(),
            labels: self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            services: self
                .hosted
                .names()
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
            addrs: self.advertised_addrs(),
            policy_version: self.policy.version(),
            next_seq: self.telemetry.lock().next_seq(),
            boot_id: self.telemetry.boot_id(),
            lost_at_restart: self.telemetry.lost_at_restart(),
            // A bundle held but not saved is not reported as held: the gateway sends it again,
            // and the node tries to save it again.
            policy: self
                .policy
                .held()
                .filter(|_| self.policy.unsaved().is_none()),
            policy_damaged: self.policy.is_damaged(),
        }
    }

    fn advertised_addrs(&self) -> Vec<String> {
        let local = self.local_addr;
        if !local.ip().is_unspecified() {
            return vec![local.to_string()];
        }
        // Bound to every interface: name the addresses this host has, from its routes.
        let mut addrs = Vec::new();
        if let Ok(text) = std::fs::read_to_string("/proc/self/net/fib_trie") {
            let mut last = None;
            for line in text.lines() {
                let line = line.trim();
                if let Some(ip) = line.strip_prefix("|-- ") {
                    last = Some(ip.to_owned());
                } else if line.contains("/32 host LOCAL")
                    && let Some(ip) = last.take()
                    && !ip.starts_with("127.")
                {
                    let addr = format!("{ip}:{}", local.port());
                    if !addrs.contains(&addr) {
                        addrs.push(addr);
                    }
                }
            }
        }
        addrs
    }

    /// Handles one frame from the gateway; returns the answer to send, if any.
    async fn handle_down(&self, down: Down) -> Option<Up> {
        match down {
            Down::Policy {
                version,
                toml,
                epoch,
                hash,
            } => {
                // A protocol 1 gateway sends no hash: the node computes it.
                let hash = if epoch == 0 && hash == [0; 32] {
                    bundle_hash(&toml)
                } else {
                    hash
                };
                let offered = BundleRef {
                    epoch,
                    version,
                    hash,
                };
                Some(self.handle_policy(offered, toml).await)
            }
            Down::TelemetryAck { seq } => {
                self.telemetry.ack(seq);
                None
            }
            Down::Renewed { chain_pem } => {
                let renewer = self.renewer.clone()?;
                let installed =
                    tokio::task::spawn_blocking(move || renewer.install(&chain_pem, None)).await;
                match installed {
                    Ok(Ok(())) => info!("certificate renewed"),
                    Ok(Err(e)) => {
                        warn!("the renewed certificate cannot be used: {e}");
                        if let Some(r) = &self.renewer {
                            r.failed(e, false);
                        }
                    }
                    Err(e) => warn!("renewal: {e}"),
                }
                None
            }
            // Taken in the session loop, where the round trip is known.
            Down::Time { .. } => None,
            Down::TrustBundle { roots_pem } => {
                let renewer = self.renewer.clone()?;
                let taken = tokio::task::spawn_blocking(move || renewer.set_roots(&roots_pem))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                match taken {
                    Ok(true) => info!("took the gateway's new trust bundle"),
                    Ok(false) => {}
                    Err(e) => warn!("{e}"),
                }
                None
            }
            Down::RenewRefused { reason, revoked } => {
                if revoked {
                    tracing::error!(
                        "the gateway refused to renew this node's certificate: it is revoked \
                         ({reason}); the node must be re-enrolled once the operator lifts the \
                         revocation"
                    );
                } else {
                    tracing::error!(
                        "the gateway refused to renew this node's certificate: {reason}"
                    );
                }
                if let Some(r) = &self.renewer {
                    r.failed(reason, revoked);
                }
                None
            }
            Down::Registry(entries) => {
                let me = self.name.as_str();
                for e in entries.into_iter().filter(|e| e.up && e.name != me) {
                    let Ok(name) = e.name.parse() else { continue };
                    let record = Record {
                        name,
                        addrs: e.addrs.iter().filter_map(|a| a.parse().ok()).collect(),
                        role: "node".into(),
                        labels: e.labels.into_iter().collect(),
                        services_digest: String::new(),
                    };
                    let _ = self.updates.send(Update::Add(record));
                }
                None
            }
        }
    }

    /// Applies an offered bundle if it is the gateway's newer word, saves it, and answers: an ack
    /// only for what is saved; a nack (with the reason) for what cannot be applied, or is applied
    /// but could not be saved (the node then enforces it until it restarts).
    async fn handle_policy(&self, offered: BundleRef, toml: String) -> Up {
        let nack = |reason: String| {
            warn!("refused policy version {}: {reason}", offered.version);
            self.telemetry.audit(
                "policy_refused",
                vec![
                    ("version".into(), offered.version.to_string()),
                    ("reason".into(), reason.clone()),
                ],
            );
            Up::PolicyNack {
                version: offered.version,
                reason,
                epoch: offered.epoch,
                hash: offered.hash,
            }
        };
        if bundle_hash(&toml) != offered.hash {
            return nack("the bundle does not match its hash".into());
        }
        match judge_offer(self.policy.held().as_ref(), &offered) {
            // Held already: acked only once it is saved too (a save that failed is tried again).
            Offer::Held if self.policy.unsaved().is_none() => {
                return Up::PolicyAck {
                    version: offered.version,
                    epoch: offered.epoch,
                    hash: offered.hash,
                };
            }
            Offer::Held => return self.save_and_answer(offered, toml, nack).await,
            Offer::Older => {
                let held = self.policy.version();
                return nack(format!(
                    "this node holds version {held} of epoch {}, newer than {}",
                    offered.epoch, offered.version
                ));
            }
            Offer::Apply => {}
        }
        let checked = Policy::parse(&toml, &format!("policy version {}", offered.version))
            .map_err(|e| e.to_string())
            .and_then(|p| p.check_applicable(SOFTWARE_VERSION).map(|()| p));
        let policy = match checked {
            Ok(policy) => policy,
            Err(reason) => return nack(reason),
        };
        self.policy.set(offered, policy, PolicySource::Gateway);
        info!(
            "applied policy version {} (epoch {})",
            offered.version, offered.epoch
        );
        self.telemetry.audit(
            "policy_applied",
            vec![("version".into(), offered.version.to_string())],
        );
        self.save_and_answer(offered, toml, nack).await
    }

    /// Saves the bundle in force (fsync on the blocking pool: an SD card never stalls the calls on
    /// this thread) and acks it, or nacks it saying it is enforced but not saved.
    async fn save_and_answer(
        &self,
        offered: BundleRef,
        toml: String,
        nack: impl Fn(String) -> Up,
    ) -> Up {
        let saved = self
            .store
            .save_async(SavedBundle { id: offered, toml })
            .await;
        if let Err(e) = saved {
            let why = format!(
                "applied in memory but not saved in {}: {e}; a restart without the gateway would \
                 lose it",
                self.store.dir().display()
            );
            self.policy.mark_unsaved(why.clone());
            return nack(why);
        }
        self.policy.mark_saved();
        Up::PolicyAck {
            version: offered.version,
            epoch: offered.epoch,
            hash: offered.hash,
        }
    }
}

/// Applies the last good bundle saved on disk, if any: the node serves under it until a gateway
/// says otherwise. A damaged one, or one this node cannot apply, fails closed: every call is
/// refused until the gateway sends a good bundle. Runs before the node serves anything.
pub(crate) fn apply_saved_policy(
    store: &PolicyStore,
    policy: &PolicyCell,
    telemetry: &TelemetrySink,
) {
    let damaged = |reason: String| crate::state::Damaged {
        path: store.path().display().to_string(),
        reason,
    };
    let saved = store.load().and_then(|saved| match saved {
        None => Ok(None),
        Some(s) => Policy::parse(&s.toml, "saved policy")
            .map_err(|e| damaged(e.to_string()))
            .and_then(|p| {
                p.check_applicable(SOFTWARE_VERSION)
                    .map_err(damaged)
                    .map(|()| Some((s.id, p)))
            }),
    });
    match saved {
        Ok(None) => {}
        Ok(Some((id, p))) => {
            info!(
                "booted under policy version {} (epoch {}) from {}",
                id.version,
                id.epoch,
                store.dir().display()
            );
            policy.set(id, p, PolicySource::Saved);
        }
        Err(damaged) => {
            tracing::error!(
                "the saved policy is damaged ({damaged}): refusing every call until the gateway \
                 sends a good bundle"
            );
            telemetry.audit(
                "policy_damaged",
                vec![("reason".into(), damaged.to_string())],
            );
            policy.set_damaged(damaged.to_string());
        }
    }
}

/// Resource use with this node's connection count.
pub(crate) fn resources(peers: &PeerSet) -> mesh_proto::control::Resources {
    process_resources(peers.connection_count())
}

async fn write_up(send: &mut quinn::SendStream, up: &Up) -> Result<(), String> {
    let mut out = Vec::new();
    mesh_proto::encode_frame_vec(up, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())
}
