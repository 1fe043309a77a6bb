//! One MQTT session with either protocol version, behind one face: rumqttc's MQTT 5 client
//! (response topics, Receive Maximum, reason codes) or its 3.1.1 client, for brokers that do not
//! speak 5. The event loop runs on a task of its own and hands its events over a channel, so the
//! link may wait on several things at once without cancelling it halfway.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, LastWill, Packet, PubAckReason, PublishProperties, SubscribeReasonCode,
};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tokio::sync::mpsc;

use super::Shared;

pub use crate::config::MqttVersion as Protocol;

/// What the session reports, the same for both versions.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The broker took the connection: how many QoS 1 publishes it takes unacknowledged, and
    /// the largest packet it takes (MQTT 5 says; 3.1.1 does not).
    Connected {
        receive_max: u16,
        max_packet: Option<u32>,
    },
    /// A publish went out with this packet id.
    Sent(u16),
    /// The broker acknowledged packet `pkid`, or refused it (MQTT 5 only).
    Acked { pkid: u16, refused: Option<Refusal> },
    /// The broker refused a subscription.
    SubscriptionRefused(String),
    /// A message for the site.
    Message {
        topic: String,
        payload: Bytes,
        properties: Option<PublishProperties>,
        /// It came with the retain flag (a retained message, sent on subscribing).
        retained: bool,
    },
    /// The broker ended the session.
    Disconnected(String),
    /// Anything else (pings, the acks of subscriptions).
    Other,
}

/// Why the broker refused a publish.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Something about this message (its payload, its size).
    Message(String),
    /// Something about the session or the broker's rules (not authorised, over quota).
    Session(String),
}

/// Why the session failed, and whether an MQTT 3.1.1 broker could be why.
pub(crate) struct Failure {
    pub(crate) reason: String,
    pub(crate) try_311: bool,
}

/// The client of one session.
pub(crate) enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

impl Client {
    /// Publishes QoS 1 without waiting; false if the client's queue is full.
    pub(crate) fn publish(
        &self,
        topic: String,
        payload: Bytes,
        retain: bool,
        properties: Option<PublishProperties>,
    ) -> bool {
        match self {
            Client::V5(c) => match properties {
                Some(p) => c
                    .try_publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, p)
                    .is_ok(),
                None => c
                    .try_publish(topic, QoS::AtLeastOnce, retain, payload)
                    .is_ok(),
            },
            Client::V311(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .is_ok(),
        }
    }

    /// Subscribes (QoS 1) without waiting.
    pub(crate) fn subscribe(&self, filter: String) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_subscribe(filter, QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    /// Says goodbye without waiting.
    pub(crate) fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

/// The event loop's task; stopped when dropped.
pub(crate) struct Pump(tokio::task::JoinHandle<()>);

impl Drop for Pump {
    fn drop(&mut self) {
        self.0.abort();
    }
}

type Events = mpsc::Receiver<Result<LinkEvent, Failure>>;

/// Connects with `protocol`; returns the client, its events (the first is
/// [`LinkEvent::Connected`] or a failure) and the task that runs it.
pub(crate) fn connect(
    shared: &Shared,
    protocol: Protocol,
    will: Vec<u8>,
) -> Result<(Client, Events, Pump), String> {
    let c = &shared.config;
    let (host, port) = super::link::host_port(&c.broker)?;
    let status_topic = shared.topic("status");
    let credentials = match &c.user_password {
        Some((user, file)) => {
            let password = std::fs::read_to_string(file)
                .map_err(|e| format!("password_file {}: {e}", file.display()))?;
            Some((user.clone(), password.trim_end().to_owned()))
        }
        None => None,
    };
    let transport = super::link::tls_config(c)?
        .map(|tls| Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    // Down messages up to twice the bound are read and refused with a reason; larger ones the
    // broker does not deliver.
    let max_packet = c.max_message_bytes * 2 + 65_536;
    let capacity = usize::from(c.max_inflight) + 64;
    let (tx, events) = mpsc::channel(256);
    // No Nagle: a PUBACK held back 40 ms by it (and the broker's delayed ACK) would cap the
    // drain at a window per 40 ms.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    network.set_connection_timeout(10);
    match protocol {
        Protocol::V5 => {
            let mut options =
                rumqttc::v5::MqttOptions::new(c.client_id.clone(), host.clone(), port);
            options
                .set_keep_alive(c.keep_alive)
                .set_clean_start(true)
                .set_network_options(network)
                .set_outgoing_inflight_upper_limit(c.max_inflight)
                .set_max_packet_size(Some(u32::try_from(max_packet).unwrap_or(u32::MAX)))
                .set_last_will(LastWill::new(
                    status_topic,
                    will,
                    QoS::AtLeastOnce,
                    true,
                    None,
                ));
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            if let Some(t) = transport {
                options.set_transport(t);
            }
            let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
            let pump = tokio::spawn(async move {
                loop {
                    let event = eventloop.poll().await.map(v5_event).map_err(v5_failure);
                    let failed = event.is_err();
                    if tx.send(event).await.is_err() || failed {
                        return;
                    }
                }
            });
            Ok((Client::V5(client), events, Pump(pump)))
        }
        Protocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(c.client_id.clone(), host, port);
            options
                .set_keep_alive(c.keep_alive)
                .set_clean_session(true)
                .set_inflight(c.max_inflight)
                // In: down messages (see above); out: what the site publishes, at most.
                .set_max_packet_size(max_packet, c.max_publish_bytes + 65_536)
                .set_last_will(rumqttc::LastWill::new(
                    status_topic,
                    will,
                    rumqttc::QoS::AtLeastOnce,
                    true,
                ));
            if let Some((user, password)) = credentials {
                options.set_credentials(user, password);
            }
            if let Some(t) = transport {
                options.set_transport(t);
            }
            let (client, mut eventloop) = rumqttc::AsyncClient::new(options, capacity);
            eventloop.set_network_options(network);
            let pump = tokio::spawn(async move {
                loop {
                    let event = eventloop.poll().await.map(v311_event).map_err(|e| Failure {
                        reason: describe_311(&e),
                        try_311: false,
                    });
                    let failed = event.is_err();
                    if tx.send(event).await.is_err() || failed {
                        return;
                    }
                }
            });
            Ok((Client::V311(client), events, Pump(pump)))
        }
    }
}

fn v5_event(event: rumqttc::v5::Event) -> LinkEvent {
    use rumqttc::v5::Event;
    match event {
        Event::Incoming(Packet::ConnAck(ack)) => LinkEvent::Connected {
            receive_max: ack
                .properties
                .as_ref()
                .and_then(|p| p.receive_max)
                .unwrap_or(u16::MAX),
            max_packet: ack.properties.as_ref().and_then(|p| p.max_packet_size),
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
            pkid: ack.pkid,
            refused: match ack.reason {
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                // About this message, not the session: it is dropped (a counted gap), so it
                // cannot hold up everything behind it.
                reason @ (PubAckReason::PayloadFormatInvalid
                | PubAckReason::ImplementationSpecificError
                | PubAckReason::UnspecifiedError) => Some(Refusal::Message(format!("{reason:?}"))),
                // About the session or the broker's rules: the messages stay, the link backs off.
                reason => Some(Refusal::Session(format!("{reason:?}"))),
            },
        },
        Event::Incoming(Packet::SubAck(ack)) => match ack
            .return_codes
            .iter()
            .find(|r| !matches!(r, SubscribeReasonCode::Success(_)))
        {
            Some(bad) => LinkEvent::SubscriptionRefused(format!("{bad:?}")),
            None => LinkEvent::Other,
        },
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
            properties: p.properties,
            retained: p.retain,
        },
        Event::Incoming(Packet::Disconnect(d)) => {
            LinkEvent::Disconnected(format!("{:?}", d.reason_code))
        }
        _ => LinkEvent::Other,
    }
}

fn v311_event(event: rumqttc::Event) -> LinkEvent {
    use rumqttc::{Event, Packet};
    match event {
        Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected {
            receive_max: u16::MAX,
            max_packet: None,
        },
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Sent(pkid),
        Event::Incoming(Packet::PubAck(ack)) => LinkEvent::Acked {
            pkid: ack.pkid,
            refused: None,
        },
        Event::Incoming(Packet::SubAck(ack)) => {
            if ack
                .return_codes
                .iter()
                .any(|r| matches!(r, rumqttc::SubscribeReasonCode::Failure))
            {
                LinkEvent::SubscriptionRefused("Failure".into())
            } else {
                LinkEvent::Other
            }
        }
        Event::Incoming(Packet::Publish(p)) => LinkEvent::Message {
            topic: p.topic,
            payload: p.payload,
            properties: None,
            retained: p.retain,
        },
        Event::Incoming(Packet::Disconnect) => LinkEvent::Disconnected("DISCONNECT".into()),
        _ => LinkEvent::Other,
    }
}

/// A failure of the MQTT 5 client, in words an operator can act on; a broker that refused
/// the protocol version, or answered in a way MQTT 5 cannot read, may speak 3.1.1 only.
fn v5_failure(e: rumqttc::v5::ConnectionError) -> Failure {
    use rumqttc::v5::ConnectionError as E;
    // A 3.1.1 broker answers an MQTT 5 CONNECT with "unacceptable protocol version" in the
    // 3.1.1 format, which MQTT 5 cannot read, and closes the connection.
    let try_311 = matches!(
        e,
        E::ConnectionRefused(ConnectReturnCode::UnsupportedProtocolVersion)
            | E::NotConnAck(_)
            | E::MqttState(
                rumqttc::v5::StateError::Deserialization(_)
                    | rumqttc::v5::StateError::ConnectionAborted
            )
    );
    let reason = match &e {
        E::Tls(t) => format!("TLS with the broker failed: {t}"),
        E::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        E::Io(io) => format!("cannot reach the broker: {io}"),
        E::Timeout(_) => "the broker did not answer in time".into(),
        other => other.to_string(),
    };
    Failure { reason, try_311 }
}

fn describe_311(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::ConnectionError as E;
    match e {
        E::Tls(t) => format!("TLS with the broker failed: {t}"),
        E::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
        E::Io(io) => format!("cannot reach the broker: {io}"),
        E::NetworkTimeout | E::FlushTimeout => "the broker did not answer in time".into(),
        other => other.to_string(),
    }
}

/// How long the first event (CONNACK) may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
