//! The MQTT link (MQTT 5, rumqttc): one session at a time, a fresh client for each, started
//! again after any failure with a backoff (0.5 s doubling to 15 s), for as long as the gateway
//! runs.
//!
//! Each session: connect with the `offline` status as the will (retained), publish `online`
//! (retained), subscribe to `policy/set` and `call/#`, then drain the queue: up to the
//! window (`max_inflight`, lowered to the broker's Receive Maximum) publishes in flight, in the
//! queue's order, each deleted from the queue only when its PUBACK came. What was in flight when
//! a session ended goes again in the next one (at least once; `seq` lets a consumer drop
//! duplicates). The optional bandwidth cap is a token bucket in front of the publishes.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use mesh_core::{NodeName, SpiffeId};
use mesh_node::CallOptions;
use mesh_proto::Status;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::{Map, Value, json};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tracing::{info, warn};

use super::mqtt::{self, Failure, LinkEvent, Protocol, Refusal};
use super::topics::{Reply, Route};
use super::{Bridge, Class, Downlink, Shared, signing, unix_ms};
use crate::config::CloudConfig;

/// The longest wait between attempts to reach the broker: a broker back from an outage is
/// used again within this long.
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Calls from the cloud served at once, at most; more are answered ResourceExhausted.
const MAX_CLOUD_CALLS: usize = 64;
/// Refusals of messages from the cloud reported (queued, audited, logged) a second, at most.
pub(crate) const REFUSALS_PER_SECOND: u64 = 10;
/// Bundles from the cloud being checked or waiting to be applied, at most; more are refused.
pub(crate) const POLICY_BACKLOG: usize = 8;

/// The TLS client config of the link (`None` for `mqtt://`): the broker checked against `ca`
/// (or the system's roots), the client certificate presented when one is configured.
pub(crate) fn tls_config(c: &CloudConfig) -> Result<Option<Arc<rustls::ClientConfig>>, String> {
    if !c.tls {
        return Ok(None);
    }
    crate::tls::client_config(c.ca.as_deref(), c.cert_key.as_ref()).map(|c| Some(Arc::new(c)))
}

/// `host:port` (the host may be `[v6]`).
pub(crate) fn host_port(broker: &str) -> Result<(String, u16), String> {
    let (host, port) = broker
        .rsplit_once(':')
        .ok_or_else(|| format!("broker {broker:?}: expected host:port"))?;
    let port = port
        .parse()
        .map_err(|_| format!("broker {broker:?}: bad port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok((host.to_owned(), port))
}

fn status_payload(shared: &Shared, state: &str) -> Vec<u8> {
    json!({
        "state": state,
        "gateway": shared.gateway,
        "at_ms": unix_ms(),
        "version": env!("CARGO_PKG_VERSION"),
    })
    .to_string()
    .into_bytes()
}

/// Runs sessions until `stop` changes.
pub(crate) async fn run(
    bridge: Bridge,
    downlink: Arc<dyn Downlink>,
    mut stop: watch::Receiver<bool>,
) {
    let shared = bridge.shared().clone();
    let calls = Arc::new(Semaphore::new(MAX_CLOUD_CALLS));
    let mut backoff = Duration::from_millis(500);
    let mut sessions = 0u64;
    let mut last_logged = String::new();
    // MQTT 5 unless the config says otherwise, or the broker turns out not to speak it. In
    // "auto", 3.1.1 is kept once a session with it came up; until then a 3.1.1 attempt that
    // fails sends the next one back to 5 (the failure may have been something else).
    let auto = shared.config.protocol.is_none();
    let mut protocol = shared.config.protocol.unwrap_or(Protocol::V5);
    let mut settled = !auto;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let ended = session(
            &bridge,
            &downlink,
            &calls,
            &mut stop,
            &mut sessions,
            protocol,
        )
        .await;
        let came_up = shared.stats.connected.swap(false, Ordering::Relaxed);
        shared.stats.inflight.store(0, Ordering::Relaxed);
        if came_up {
            settled = true;
        }
        if !settled && protocol == Protocol::V311 && ended.is_err() {
            protocol = Protocol::V5;
        }
        let e = match ended {
            Ok(()) => return,
            Err(Failure { reason, try_311 }) if try_311 && protocol == Protocol::V5 && !settled => {
                warn!(
                    "cloud link to {}: {reason}; the broker may not speak MQTT 5: trying 3.1.1 \
                     (set protocol = \"5\" or \"3.1.1\" in [cloud] to choose)",
                    shared.config.broker
                );
                protocol = Protocol::V311;
                continue;
            }
            Err(e) => e.reason,
        };
        // Said once per kind of failure, not once per attempt.
        if e != last_logged {
            warn!(
                "cloud link to {}: {e}; trying again (the mesh goes on without it)",
                shared.config.broker
            );
            last_logged = e.clone();
        }
        shared.set_error(Some(e));
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(500);
        }
        let jitter = backoff.mul_f64(0.8 + 0.4 * (unix_ms() % 1000) as f64 / 1000.0);
        tokio::select! {
            _ = tokio::time::sleep(jitter) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// A publish the link makes outside the queue (a call's answer).
pub(crate) struct Direct {
    topic: String,
    payload: Bytes,
    properties: PublishProperties,
}

/// A token bucket: `rate` bytes a second, a burst of one second.
struct Bucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes `n` bytes at `now`, or says how long until they may go.
    fn take(&mut self, n: usize, now: Instant) -> Option<Duration> {
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.rate);
        self.last = now;
        let need = (n as f64).min(self.rate);
        if self.tokens >= need {
            self.tokens -= n as f64;
            None
        } else {
            Some(Duration::from_secs_f64((need - self.tokens) / self.rate))
        }
    }
}

#[allow(clippy::too_many_lines)]
async fn session(
    bridge: &Bridge,
    downlink: &Arc<dyn Downlink>,
    calls: &Arc<Semaphore>,
    stop: &mut watch::Receiver<bool>,
    sessions: &mut u64,
    protocol: Protocol,
) -> Result<(), Failure> {
    let shared = bridge.shared().clone();
    let c = &shared.config;
    let status_topic = shared.topic("status");
    let (client, mut events, _pump) =
        mqtt::connect(&shared, protocol, status_payload(&shared, "offline")).map_err(plain)?;
    let (receive_max, publish_limit) =
        match tokio::time::timeout(mqtt::CONNECT_TIMEOUT, events.recv()).await {
            Ok(Some(Ok(LinkEvent::Connected {
                receive_max,
                max_packet,
            }))) => {
                // What one publish may take: our bound, and the broker's when it says one.
                let limit =
                    max_packet.map_or(c.max_publish_bytes, |m| c.max_publish_bytes.min(m as usize));
                (receive_max, limit)
            }
            Ok(Some(Ok(other))) => return Err(plain(format!("expected CONNACK, got {other:?}"))),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Err(plain("the MQTT event loop ended")),
            Err(_) => return Err(plain("no CONNACK from the broker within 15 s")),
        };
    let window = usize::from(c.max_inflight.min(receive_max));
    let stats = &shared.stats;
    stats.connected.store(true, Ordering::Relaxed);
    stats
        .receive_max
        .store(u64::from(receive_max), Ordering::Relaxed);
    stats.protocol.store(
        match protocol {
            Protocol::V5 => 5,
            Protocol::V311 => 4,
        },
        Ordering::Relaxed,
    );
    if *sessions > 0 {
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
    }
    *sessions += 1;
    shared.set_error(None);
    info!(
        "cloud link up: {} as {} over MQTT {} (window {window}, {} queued)",
        c.broker,
        c.client_id,
        protocol.as_str(),
        shared.queue().len()
    );

    // What each publish is: Some(seq) for a queued message, None for one that is not.
    let mut fifo: VecDeque<Option<u64>> = VecDeque::new();
    let mut by_pkid: HashMap<u16, u64> = HashMap::new();
    // Sent, no PUBACK yet: what the window counts.
    let mut inflight: BTreeSet<u64> = BTreeSet::new();
    // Acknowledged, not yet deleted from the queue (deleted in batches): never sent again.
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    let mut bucket = c.bandwidth.map(|rate| Bucket {
        rate: rate as f64,
        tokens: rate as f64,
        last: Instant::now(),
    });
    let mut bandwidth_wait: Option<Instant> = None;
    let mut gaps_note_sent = false;

    let publish = |fifo: &mut VecDeque<Option<u64>>,
                   topic: String,
                   payload: Bytes,
                   retain: bool,
                   properties: Option<PublishProperties>,
                   seq: Option<u64>|
     -> bool {
        let sent = client.publish(topic, payload, retain, properties);
        if sent {
            fifo.push_back(seq);
        }
        sent
    };
    // `call/#`, not `call/+/+`: a malformed call topic is seen, and refused with a reason.
    for topic in [shared.topic("policy/set"), shared.topic("call/#")] {
        client.subscribe(topic).map_err(plain)?;
    }
    // After the subscriptions: the broker takes a client's packets in order, so once the cloud
    // sees `online`, the site takes commands.
    publish(
        &mut fifo,
        status_topic.clone(),
        status_payload(&shared, "online").into(),
        true,
        None,
        None,
    );

    let (direct_tx, mut direct_rx) = mpsc::channel::<Direct>(256);
    let mut flush_tick = tokio::time::interval(Duration::from_millis(50));
    let outcome = async {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Ok(LinkEvent::Sent(pkid))) => {
                        if let Some(Some(seq)) = fifo.pop_front() {
                            by_pkid.insert(pkid, seq);
                        }
                    }
                    Some(Ok(LinkEvent::Acked { pkid, refused })) => {
                        match (by_pkid.remove(&pkid), refused) {
                            (Some(seq), None) => {
                                inflight.remove(&seq);
                                acked.insert(seq);
                            }
                            (Some(seq), Some(Refusal::Message(reason))) => {
                                inflight.remove(&seq);
                                warn!(
                                    "the broker refused message {seq} ({reason}): dropped, \
                                     counted and announced as a gap"
                                );
                                shared
                                    .queue()
                                    .drop_unsendable(seq)
                                    .map_err(|e| e.to_string())?;
                            }
                            (Some(seq), Some(Refusal::Session(reason))) => {
                                return Err(format!(
                                    "the broker refused message {seq}: {reason} (is the \
                                     gateway allowed to publish under {}?)",
                                    shared.prefix
                                ));
                            }
                            (None, Some(reason)) => {
                                warn!("the broker refused a reply or status message: {reason:?}");
                            }
                            (None, None) => {}
                        }
                    }
                    Some(Ok(LinkEvent::SubscriptionRefused(why))) => {
                        let e = format!(
                            "the broker refused a subscription under {}: {why}; nothing \
                             from the cloud reaches the site",
                            shared.prefix
                        );
                        warn!("{e}");
                        shared.set_error(Some(e));
                    }
                    Some(Ok(LinkEvent::Message { topic, payload, properties, retained })) => {
                        let down = DownContext {
                            bridge: bridge.clone(),
                            downlink: downlink.clone(),
                            direct: direct_tx.clone(),
                            calls: calls.clone(),
                        };
                        tokio::spawn(down.handle(
                            topic,
                            payload,
                            properties.unwrap_or_default(),
                            retained,
                        ));
                    }
                    Some(Ok(LinkEvent::Disconnected(why))) => {
                        return Err(format!("the broker ended the session: {why}"));
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.reason),
                    None => return Err("the MQTT event loop ended".into()),
                },
                Some(d) = direct_rx.recv() => {
                    if !publish(&mut fifo, d.topic, d.payload, false, Some(d.properties), None) {
                        warn!("a reply to the cloud could not be sent: the link is saturated");
                    }
                }
                () = shared.wake.notified() => {}
                _ = flush_tick.tick() => {
                    flush(&shared, &mut acked)?;
                    let (gaps_pending, held) = {
                        let q = shared.queue();
                        (q.gaps_pending(), q.len())
                    };
                    if held > 0 || !gaps_pending {
                        gaps_note_sent = false;
                    } else if inflight.is_empty() && !gaps_note_sent {
                        // Drops no message announced, and nothing left to carry them: say it alone.
                        bridge.send(Class::Status, "gaps", Map::new());
                        gaps_note_sent = true;
                    }
                }
                () = sleep_until(bandwidth_wait), if bandwidth_wait.is_some() => {
                    bandwidth_wait = None;
                }
                _ = stop.changed() => {
                    // A clean goodbye: the broker does not send the will, so say it ourselves.
                    publish(
                        &mut fifo,
                        status_topic,
                        status_payload(&shared, "offline").into(),
                        true,
                        None,
                        None,
                    );
                    client.disconnect();
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        while let Some(Ok(_)) = events.recv().await {}
                    })
                    .await;
                    return Ok(());
                }
            }
            if acked.len() >= 256 {
                flush(&shared, &mut acked)?;
            }
            if bandwidth_wait.is_none() {
                // Fill the window from the queue, in its order.
                // In bites of a quarter window: one read of the queue for several publishes.
                let free = window.saturating_sub(inflight.len());
                if free > 0 && (free >= (window / 4).max(1) || inflight.is_empty()) {
                    let next = shared
                        .queue()
                        .next_except(free, |s| inflight.contains(&s) || acked.contains(&s))
                        .map_err(|e| e.to_string())?;
                    for (seq, m) in next {
                        // Larger than a publish may be: it would never go, and would hold up
                        // everything behind it.
                        if m.payload.len() + m.topic.len() + 16 > publish_limit {
                            warn!(
                                "message {seq} on {} is {} bytes, over what a publish may \
                                 take ({publish_limit}): dropped, counted and announced as a gap",
                                m.topic,
                                m.payload.len()
                            );
                            shared
                                .queue()
                                .drop_unsendable(seq)
                                .map_err(|e| e.to_string())?;
                            continue;
                        }
                        if let Some(wait) = bucket
                            .as_mut()
                            .and_then(|b| b.take(m.payload.len(), Instant::now()))
                        {
                            bandwidth_wait = Some(Instant::now() + wait);
                            break;
                        }
                        if !publish(&mut fifo, m.topic, m.payload.into(), false, None, Some(seq)) {
                            break;
                        }
                        inflight.insert(seq);
                    }
                }
            }
            stats
                .inflight
                .store(inflight.len() as u64, Ordering::Relaxed);
        }
    }
    .await;
    // Whatever ended the session, what the broker acknowledged leaves the queue.
    flush(&shared, &mut acked).map_err(plain)?;
    outcome.map_err(plain)
}

/// A failure that says nothing of the protocol version.
fn plain(reason: impl Into<String>) -> Failure {
    Failure {
        reason: reason.into(),
        try_311: false,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Deletes what the broker acknowledged from the queue.
fn flush(shared: &Shared, acked: &mut BTreeSet<u64>) -> Result<(), String> {
    if acked.is_empty() {
        return Ok(());
    }
    let seqs: Vec<u64> = std::mem::take(acked).into_iter().collect();
    shared.queue().ack_many(&seqs).map_err(|e| e.to_string())?;
    shared
        .stats
        .published
        .fetch_add(seqs.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// What a message from the cloud is handled with.
struct DownContext {
    bridge: Bridge,
    downlink: Arc<dyn Downlink>,
    direct: mpsc::Sender<Direct>,
    calls: Arc<Semaphore>,
}

impl DownContext {
    async fn handle(
        self,
        topic: String,
        payload: Bytes,
        properties: PublishProperties,
        retained: bool,
    ) {
        let shared = self.bridge.shared().clone();
        if retained {
            // A retained command would run again at every reconnect.
            self.refuse(
                &topic,
                "a retained message: commands are taken only as they are sent, never retained"
                    .into(),
            );
            return;
        }
        let max = shared.config.max_message_bytes;
        let oversized = (payload.len() > max).then(|| {
            format!(
                "{} bytes: larger than the gateway's max_message_bytes ({max})",
                payload.len()
            )
        });
        let route =
            super::topics::route(&shared.prefix, &topic, properties.response_topic.as_deref());
        let (service, method, reply_to) = match route {
            Ok(Route::Policy) => {
                let permit = shared.policy_backlog.clone().try_acquire_owned();
                let result = match (oversized, permit) {
                    (Some(reason), _) => Err(reason),
                    (None, Err(_)) => Err(format!(
                        "{POLICY_BACKLOG} bundles are waiting already: send it again later"
                    )),
                    (None, Ok(_permit)) => self.policy(&payload).await,
                };
                let mut status = Map::new();
                status.insert("source".into(), "cloud".into());
                match result {
                    Ok(fields) => {
                        status.insert("kind".into(), "accepted".into());
                        status.extend(fields);
                        self.bridge.send(Class::Status, "policy/status", status);
                    }
                    Err(reason) => {
                        status.insert("kind".into(), "refused".into());
                        self.report_refusal("policy/status", status, &topic, reason);
                    }
                }
                return;
            }
            Ok(Route::Call {
                service,
                method,
                reply,
            }) => (service, method, reply),
            Err(reason) => {
                self.refuse(&topic, reason);
                return;
            }
        };
        let (status, message, body) = match oversized {
            Some(reason) => {
                self.refuse(&topic, reason.clone());
                (Status::InvalidArgument, reason, Bytes::new())
            }
            None => self.call(service, method, payload, &properties).await,
        };
        let direct = match reply_to {
            Reply::Topic(topic) => {
                let mut answer = PublishProperties {
                    correlation_data: properties.correlation_data.clone(),
                    ..PublishProperties::default()
                };
                answer
                    .user_properties
                    .push(("status".into(), status.as_str().into()));
                if !message.is_empty() {
                    answer.user_properties.push(("message".into(), message));
                }
                Direct {
                    topic,
                    payload: body,
                    properties: answer,
                }
            }
            // The status in the topic; the body, or the error's message, as the payload.
            Reply::Id(id) => Direct {
                topic: shared.topic(&format!("reply/{id}/{}", status.as_str())),
                payload: if status == Status::Ok {
                    body
                } else {
                    Bytes::from(message)
                },
                properties: PublishProperties::default(),
            },
        };
        if self.direct.send(direct).await.is_err() {
            warn!("the answer to a cloud call to {service}.{method} was lost: the link went down");
        }
    }

    /// A message refused: counted; said on `refused` and in the audit log at most
    /// [`REFUSALS_PER_SECOND`] times a second (a flood of junk on the broker must not push the
    /// site's telemetry out of the queue), with how many were not said since.
    fn refuse(&self, topic: &str, reason: String) {
        let mut body = Map::new();
        body.insert("topic".into(), topic.into());
        self.report_refusal("refused", body, topic, reason);
    }

    /// Counts a refusal of a message on `topic` and, within the budget, logs and audits it and
    /// queues `body` with the reason on `<prefix>/<suffix>`.
    fn report_refusal(
        &self,
        suffix: &str,
        mut body: Map<String, Value>,
        topic: &str,
        reason: String,
    ) {
        let shared = self.bridge.shared();
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        let Some(unsaid) = shared.refusal_budget() else {
            return;
        };
        warn!("refused a message from the cloud on {topic}: {reason}");
        self.downlink.audit(
            "cloud_refused",
            vec![
                ("topic".into(), topic.to_owned()),
                ("reason".into(), reason.clone()),
            ],
        );
        body.insert("reason".into(), reason.into());
        if unsaid > 0 {
            body.insert("not_reported_before".into(), unsaid.into());
        }
        self.bridge.send(Class::Status, suffix, body);
    }

    /// A signed bundle: verified, checked against replays, applied.
    async fn policy(&self, payload: &[u8]) -> Result<Map<String, Value>, String> {
        let shared = self.bridge.shared();
        // JSON and Ed25519 over up to max_message_bytes: off the runtime thread.
        let (bytes, signers, site) = (
            payload.to_vec(),
            shared.signers.clone(),
            shared.prefix.clone(),
        );
        let (signed, signer) = tokio::task::spawn_blocking(move || {
            signing::verify(&bytes, &signers, &site, unix_ms())
                .map(|(signed, signer)| (signed, signer.clone()))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        // One bundle at a time: the replay check and the apply are one step.
        let _one = shared.policy_lock.lock().await;
        let newest = shared.floor.read().map_err(|e| e.to_string())?;
        if signed.signed_at_ms <= newest {
            return Err(format!(
                "replayed or out of order: signed at {} ms, not after the newest bundle applied \
                 from the cloud (signed at {newest} ms)",
                signed.signed_at_ms
            ));
        }
        // The floor first: a crash after it cannot let this bundle be replayed later.
        let floor_to = signed.signed_at_ms;
        let floor = shared.clone();
        tokio::task::spawn_blocking(move || floor.floor.raise(floor_to))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let version = self.downlink.set_policy(signed.policy).await?;
        info!(
            "applied policy version {version} from the cloud, signed by key {}",
            signer.id
        );
        let mut fields = Map::new();
        fields.insert("version".into(), version.into());
        fields.insert("signed_at_ms".into(), signed.signed_at_ms.into());
        fields.insert("key".into(), signer.id.clone().into());
        Ok(fields)
    }

    /// A call into the mesh as the cloud's identity.
    async fn call(
        &self,
        service: &str,
        method: &str,
        body: Bytes,
        properties: &PublishProperties,
    ) -> (Status, String, Bytes) {
        let shared = self.bridge.shared();
        let Ok(_permit) = self.calls.clone().try_acquire_owned() else {
            return (
                Status::ResourceExhausted,
                format!("more than {MAX_CLOUD_CALLS} calls from the cloud at once"),
                Bytes::new(),
            );
        };
        let id = NodeName::try_from(shared.config.client_id.as_str())
            .map_err(|e| e.to_string())
            .and_then(|n| SpiffeId::cloud(&shared.trust_domain, n).map_err(|e| e.to_string()));
        let id = match id {
            Ok(id) => id,
            Err(e) => return (Status::Internal, e, Bytes::new()),
        };
        let timeout = properties
            .user_properties
            .iter()
            .find(|(k, _)| k == "timeout_ms")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .map(|ms| Duration::from_millis(ms.clamp(1, 300_000)));
        let options = CallOptions {
            timeout,
            on_behalf_of: Some(id),
            ..CallOptions::default()
        };
        self.downlink
            .call(service.to_owned(), method.to_owned(), body, options)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bandwidth_cap_lets_a_second_of_bytes_through_then_paces() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 1000.0,
            tokens: 1000.0,
            last: t0,
        };
        assert_eq!(b.take(600, t0), None);
        let wait = b.take(600, t0).expect("over the rate");
        assert!((wait.as_secs_f64() - 0.2).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.take(600, t0 + Duration::from_millis(200)), None);
        // A message bigger than a second's worth waits for a full bucket, then goes.
        let wait = b.take(5000, t0 + Duration::from_millis(200)).expect("wait");
        assert!((wait.as_secs_f64() - 1.0).abs() < 1e-6, "{wait:?}");
        assert_eq!(b.take(5000, t0 + Duration::from_millis(1200)), None);
        // ... and the bytes over it are paid back before the next.
        assert!(b.take(1, t0 + Duration::from_millis(5000)).is_some());
        assert_eq!(b.take(1, t0 + Duration::from_millis(5201)), None);
    }

    #[test]
    fn a_broker_address_may_be_a_name_or_an_address() {
        assert_eq!(
            host_port("broker.example:8883"),
            Ok(("broker.example".into(), 8883))
        );
        assert_eq!(host_port("[::1]:1883"), Ok(("::1".into(), 1883)));
        assert!(host_port("nope").is_err());
    }
}
