//! The control stream between a node and its gateway (feature `alloc`).
//!
//! A node opens it as a call to the reserved service [`CONTROL_SERVICE`] (real service names cannot
//! start with `_`) and, after the [`RequestHead`](crate::RequestHead), both sides exchange frames
//! until the stream ends: [`Up`] from the node, [`Down`] from the gateway. Each frame is bounded by
//! [`MAX_CONTROL_FRAME`]. Like every wire enum, these only grow at the end.

use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::Status;

/// The reserved service name of the control stream.
pub const CONTROL_SERVICE: &str = "_control";

/// Largest control frame (a policy bundle, a telemetry batch).
pub const MAX_CONTROL_FRAME: usize = 1024 * 1024;

/// Upper bounds (microseconds) of the latency histogram buckets; a last, implicit bucket holds
/// everything slower. Prometheus `le` labels are these in seconds.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// Node to gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Up {
    /// The first frame: who the node is and what it holds.
    Hello(NodeHello),
    /// Still here.
    Heartbeat,
    /// Policy bundle `version` is applied and saved.
    PolicyAck {
        /// The bundle's version.
        version: u64,
        /// The gateway epoch it came with.
        epoch: u64,
        /// SHA-256 of the bundle text the node holds.
        hash: [u8; 32],
    },
    /// Policy bundle `version` could not be applied, or was applied but not saved (the node
    /// enforces it until it restarts; the reason says which).
    PolicyNack {
        /// The bundle's version.
        version: u64,
        /// Why, in words.
        reason: String,
        /// The gateway epoch it came with.
        epoch: u64,
        /// SHA-256 of the bundle text refused.
        hash: [u8; 32],
    },
    /// Counters, resource use, spans and audit events since the previous batch.
    Telemetry(TelemetryBatch),
    /// A certificate signing request (PKCS#10 DER) for this node's identity: its certificate is
    /// due for renewal.
    Renew {
        /// The request, signed by the key the renewed certificate will certify.
        csr_der: Vec<u8>,
    },
}

/// Gateway to node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Down {
    /// Apply this policy bundle.
    Policy {
        /// Its version; versions only grow within an epoch.
        version: u64,
        /// The bundle, as TOML.
        toml: String,
        /// The gateway's epoch: a random number made with its state. A node takes a bundle of a
        /// higher version in the epoch it holds, or any bundle of another epoch (the gateway was
        /// rebuilt) from its certified gateway.
        epoch: u64,
        /// SHA-256 of `toml`: what identifies the bundle.
        hash: [u8; 32],
    },
    /// Every node the gateway knows, so a node can reach services beyond its own link.
    Registry(Vec<RegistryEntry>),
    /// Telemetry batches up to and including `seq` are stored; the node may forget them.
    TelemetryAck {
        /// The highest stored sequence number.
        seq: u64,
    },
    /// The renewed certificate (PEM chain, leaf first).
    Renewed {
        /// `node.crt`.
        chain_pem: String,
    },
    /// The renewal was refused.
    RenewRefused {
        /// Why, in words.
        reason: String,
        /// The node is revoked: no renewal will come.
        revoked: bool,
    },
    /// The mesh's trust bundle: the roots every node trusts (several during a CA rotation). Sent
    /// when a control stream opens; a node takes it only if its own certificate still chains to
    /// it.
    TrustBundle {
        /// The roots, PEM.
        roots_pem: String,
    },
    /// The gateway's wall-clock time, sent first on every control stream: a node whose clock is
    /// obviously wrong (a device without a real-time clock) takes it.
    Time {
        /// Milliseconds since the Unix epoch.
        unix_ms: u64,
    },
}

/// What a node says when its control stream opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHello {
    /// [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION) of the node.
    pub protocol_version: u16,
    /// The node's software version (`0.1.0`).
    pub software_version: String,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Its hosted services.
    pub services: Vec<String>,
    /// Addresses it can be reached at (`198.18.0.2:7400`).
    pub addrs: Vec<String>,
    /// The policy version it holds (0: none).
    pub policy_version: u64,
    /// The telemetry sequence number it will send next, so the gateway can see a gap at once.
    pub next_seq: u64,
    /// A random number made at each start of the node process: sequence numbers count within one
    /// incarnation.
    pub boot_id: u64,
    /// Telemetry batches the previous incarnation cut and never had acknowledged (it crashed or
    /// was killed): a gap the gateway counts.
    pub lost_at_restart: u64,
    /// The bundle the node holds, if any.
    pub policy: Option<BundleRef>,
    /// The node found its saved bundle damaged and refuses calls until a good one arrives.
    pub policy_damaged: bool,
}

/// What identifies a policy bundle: the gateway epoch, the version in it, and the hash of its
/// text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleRef {
    /// The gateway's epoch.
    pub epoch: u64,
    /// The version within the epoch.
    pub version: u64,
    /// SHA-256 of the bundle text.
    pub hash: [u8; 32],
}

/// One node in the gateway's registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Its name.
    pub name: String,
    /// Where it can be reached.
    pub addrs: Vec<String>,
    /// What it hosts.
    pub services: Vec<String>,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Whether its control stream is up.
    pub up: bool,
}

/// A node's telemetry since its previous batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// Sequence number, one more than the previous batch's.
    pub seq: u64,
    /// Batches this node dropped (its backlog was full) since it started: a gap, not hidden.
    pub dropped: u64,
    /// Call counters, as deltas.
    pub calls: Vec<CallStats>,
    /// Resource use at the time of the batch.
    pub resources: Resources,
    /// Sampled spans.
    pub spans: Vec<Span>,
    /// Audit events.
    pub audit: Vec<AuditEvent>,
    /// Policy rule decisions, as deltas.
    pub rules: Vec<RuleCount>,
    /// Calls counted under method `_other` because the node's series bound was reached, since
    /// start.
    pub folded: u64,
    /// Sampled spans and audit events dropped (a batch was full, or the backlog's byte bound was
    /// reached), since start.
    pub lost_items: u64,
    /// TCP forward counters, as deltas (protocol 3; empty from older nodes).
    pub tcp: Vec<TcpStats>,
}

/// Upper bounds (seconds) of the TCP connection duration buckets; a last, implicit bucket holds
/// everything longer.
pub const TCP_DURATION_BUCKETS_S: [u64; 8] = [1, 10, 60, 300, 900, 3600, 14_400, 86_400];

/// The connections of one TCP forward (a listen address and the service it reaches), as deltas.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TcpStats {
    /// The forward's listen address.
    pub listen: String,
    /// The service it forwards to.
    pub service: String,
    /// Connections carried (a tunnel opened to an endpoint).
    pub opened: u64,
    /// Connections that ended (opened ones only).
    pub closed: u64,
    /// Connections refused: no endpoint, denied, over a rate limit, the upstream unreachable.
    pub refused: u64,
    /// Bytes from the local client to the service.
    pub bytes_to_service: u64,
    /// Bytes from the service to the local client.
    pub bytes_from_service: u64,
    /// Summed duration of the connections that ended, milliseconds.
    pub duration_ms: u64,
    /// Ended connections per duration bucket ([`TCP_DURATION_BUCKETS_S`], then one for longer),
    /// not cumulative.
    pub buckets: Vec<u64>,
}

/// How often a policy rule decided one way since the previous batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    /// The rule (an authorization rule, a route, a rate limit, or a service name).
    pub rule: String,
    /// `allowed`, `denied`, `audited`, `mirrored`, `retried`, `ejected`, `rate_limited`.
    pub action: String,
    /// How many times.
    pub count: u64,
}

/// Calls of one (service, method, caller, callee, status), as deltas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallStats {
    /// The service called.
    pub service: String,
    /// Its method.
    pub method: String,
    /// The calling node.
    pub caller: String,
    /// The node that served it; empty when none did (no endpoint).
    pub callee: String,
    /// The outcome.
    pub status: Status,
    /// How many calls.
    pub count: u64,
    /// Their summed latency, microseconds.
    pub sum_us: u64,
    /// Calls per latency bucket ([`LATENCY_BUCKETS_US`], then one for slower), not cumulative.
    pub buckets: Vec<u64>,
}

/// A node's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Resources {
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// CPU time used since start, milliseconds.
    pub cpu_ms: u64,
    /// Open QUIC connections.
    pub connections: u32,
}

/// One side of a sampled call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The trace.
    pub trace_id: [u8; 16],
    /// This span.
    pub span_id: [u8; 8],
    /// The caller's span, for a server span.
    pub parent_span_id: Option<[u8; 8]>,
    /// True for the caller's side, false for the callee's.
    pub client: bool,
    /// The node that recorded it.
    pub node: String,
    /// The service.
    pub service: String,
    /// The method.
    pub method: String,
    /// Start, microseconds since the Unix epoch.
    pub start_unix_us: u64,
    /// Duration, microseconds.
    pub duration_us: u64,
    /// The outcome.
    pub status: Status,
}

/// Something an operator may need to account for later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// What: `denied`, `policy_applied`, `policy_refused`, `identity_refused`, ...
    pub kind: String,
    /// Details as key/value pairs (caller, service, method, rule, version, reason...).
    pub fields: Vec<(String, String)>,
}

/// Decodes a frame a node sent: the current shape, the telemetry batch of protocol 2 nodes (no
/// TCP counters), or the shape protocol 1 nodes send (their missing fields read as unknown: boot
/// id 0, no bundle reference, zero counts).
pub fn decode_up(bytes: &[u8]) -> Result<Up, postcard::Error> {
    postcard::from_bytes::<Up>(bytes).or_else(|e| {
        if bytes.first() == Some(&TELEMETRY_TAG)
            && let Ok(b) = postcard::from_bytes::<(u8, v2::TelemetryBatch)>(bytes)
        {
            return Ok(Up::Telemetry(b.1.into()));
        }
        postcard::from_bytes::<v1::Up>(bytes)
            .map(Up::from)
            .map_err(|_| e)
    })
}

/// The postcard tag of [`Up::Telemetry`].
const TELEMETRY_TAG: u8 = 4;

/// The telemetry batch of protocol 2, before TCP counters.
pub mod v2 {
    use alloc::vec::Vec;

    use serde::{Deserialize, Serialize};

    use super::{AuditEvent, CallStats, Resources, RuleCount, Span};

    /// A batch, protocol 2.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TelemetryBatch {
        /// Its number.
        pub seq: u64,
        /// Batches dropped.
        pub dropped: u64,
        /// Counters.
        pub calls: Vec<CallStats>,
        /// Resource use.
        pub resources: Resources,
        /// Spans.
        pub spans: Vec<Span>,
        /// Audit events.
        pub audit: Vec<AuditEvent>,
        /// Rule counts.
        pub rules: Vec<RuleCount>,
        /// Calls folded.
        pub folded: u64,
        /// Items lost.
        pub lost_items: u64,
    }

    impl From<TelemetryBatch> for super::TelemetryBatch {
        fn from(b: TelemetryBatch) -> Self {
            super::TelemetryBatch {
                seq: b.seq,
                dropped: b.dropped,
                calls: b.calls,
                resources: b.resources,
                spans: b.spans,
                audit: b.audit,
                rules: b.rules,
                folded: b.folded,
                lost_items: b.lost_items,
                tcp: Vec::new(),
            }
        }
    }
}

/// Decodes a frame a gateway sent: the current shape, or the shape a protocol 1 gateway sends (a
/// bundle from it has epoch 0 and a zero hash: the node computes the hash itself).
pub fn decode_down(bytes: &[u8]) -> Result<Down, postcard::Error> {
    postcard::from_bytes::<Down>(bytes).or_else(|e| {
        postcard::from_bytes::<v1::Down>(bytes)
            .map(Down::from)
            .map_err(|_| e)
    })
}

/// The control frames of protocol 1, as older nodes and gateways send them. Every frame of the
/// current protocol has more bytes than its protocol 1 form, so the current shape is tried first.
pub mod v1 {
    use alloc::string::String;
    use alloc::vec::Vec;

    use serde::{Deserialize, Serialize};

    use super::{AuditEvent, CallStats, RegistryEntry, Resources, RuleCount, Span};

    /// Node to gateway, protocol 1.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Up {
        /// The first frame.
        Hello(NodeHello),
        /// Still here.
        Heartbeat,
        /// Applied and saved.
        PolicyAck {
            /// The bundle's version.
            version: u64,
        },
        /// Could not be applied.
        PolicyNack {
            /// The bundle's version.
            version: u64,
            /// Why.
            reason: String,
        },
        /// Counters and the rest.
        Telemetry(TelemetryBatch),
    }

    /// Gateway to node, protocol 1.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub enum Down {
        /// A bundle.
        Policy {
            /// Its version.
            version: u64,
            /// Its text.
            toml: String,
        },
        /// The registry.
        Registry(Vec<RegistryEntry>),
        /// Batches stored.
        TelemetryAck {
            /// The highest stored.
            seq: u64,
        },
    }

    /// A node's hello, protocol 1.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct NodeHello {
        /// Its protocol.
        pub protocol_version: u16,
        /// Its software version.
        pub software_version: String,
        /// Its labels.
        pub labels: Vec<(String, String)>,
        /// Its services.
        pub services: Vec<String>,
        /// Its addresses.
        pub addrs: Vec<String>,
        /// The version it holds.
        pub policy_version: u64,
        /// The next sequence number.
        pub next_seq: u64,
    }

    /// A batch, protocol 1.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    pub struct TelemetryBatch {
        /// Its number.
        pub seq: u64,
        /// Batches dropped.
        pub dropped: u64,
        /// Counters.
        pub calls: Vec<CallStats>,
        /// Resource use.
        pub resources: Resources,
        /// Spans.
        pub spans: Vec<Span>,
        /// Audit events.
        pub audit: Vec<AuditEvent>,
        /// Rule counts.
        pub rules: Vec<RuleCount>,
    }
}

impl From<v1::Up> for Up {
    fn from(up: v1::Up) -> Up {
        match up {
            v1::Up::Hello(h) => Up::Hello(NodeHello {
                protocol_version: h.protocol_version,
                software_version: h.software_version,
                labels: h.labels,
                services: h.services,
                addrs: h.addrs,
                policy_version: h.policy_version,
                next_seq: h.next_seq,
                boot_id: 0,
                lost_at_restart: 0,
                policy: None,
                policy_damaged: false,
            }),
            v1::Up::Heartbeat => Up::Heartbeat,
            v1::Up::PolicyAck { version } => Up::PolicyAck {
                version,
                epoch: 0,
                hash: [0; 32],
            },
            v1::Up::PolicyNack { version, reason } => Up::PolicyNack {
                version,
                reason,
                epoch: 0,
                hash: [0; 32],
            },
            v1::Up::Telemetry(b) => Up::Telemetry(TelemetryBatch {
                seq: b.seq,
                dropped: b.dropped,
                calls: b.calls,
                resources: b.resources,
                spans: b.spans,
                audit: b.audit,
                rules: b.rules,
                folded: 0,
                lost_items: 0,
                tcp: Vec::new(),
            }),
        }
    }
}

impl From<v1::Down> for Down {
    fn from(down: v1::Down) -> Down {
        match down {
            v1::Down::Policy { version, toml } => Down::Policy {
                version,
                toml,
                epoch: 0,
                hash: [0; 32],
            },
            v1::Down::Registry(entries) => Down::Registry(entries),
            v1::Down::TelemetryAck { seq } => Down::TelemetryAck { seq },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn bytes<T: Serialize>(v: &T) -> Vec<u8> {
        postcard::to_allocvec(v).expect("encode")
    }

    #[test]
    fn golden_up_frames() {
        assert_eq!(bytes(&Up::Heartbeat), [1]);
        let mut ack = vec![2, 0xac, 0x02, 9];
        ack.extend_from_slice(&[7; 32]);
        assert_eq!(
            bytes(&Up::PolicyAck {
                version: 300,
                epoch: 9,
                hash: [7; 32]
            }),
            ack
        );
        let mut nack = vec![3, 2, 2, b'n', b'o', 1];
        nack.extend_from_slice(&[0; 32]);
        assert_eq!(
            bytes(&Up::PolicyNack {
                version: 2,
                reason: "no".into(),
                epoch: 1,
                hash: [0; 32]
            }),
            nack
        );
        let hello = Up::Hello(NodeHello {
            protocol_version: 1,
            software_version: "0.1".into(),
            labels: vec![("z".into(), "a".into())],
            services: vec!["s".into()],
            addrs: vec![],
            policy_version: 7,
            next_seq: 1,
            boot_id: 5,
            lost_at_restart: 2,
            policy: Some(BundleRef {
                epoch: 3,
                version: 7,
                hash: [1; 32],
            }),
            policy_damaged: false,
        });
        let mut expected = vec![
            0, 1, 3, b'0', b'.', b'1', 1, 1, b'z', 1, b'a', 1, 1, b's', 0, 7, 1, // as in v1
            5, 2, // boot id, lost at restart
            1, 3, 7, // Some(epoch 3, version 7, ...
        ];
        expected.extend_from_slice(&[1; 32]); // ... hash)
        expected.push(0); // not damaged
        assert_eq!(bytes(&hello), expected);
    }

    #[test]
    fn protocol_1_frames_still_decode() {
        let hello = v1::Up::Hello(v1::NodeHello {
            protocol_version: 1,
            software_version: "0.1".into(),
            labels: vec![],
            services: vec!["s".into()],
            addrs: vec![],
            policy_version: 7,
            next_seq: 3,
        });
        match decode_up(&bytes(&hello)).expect("v1 hello") {
            Up::Hello(h) => assert_eq!((h.policy_version, h.boot_id, h.policy), (7, 0, None)),
            other => panic!("{other:?}"),
        }
        let ack = decode_up(&bytes(&v1::Up::PolicyAck { version: 4 })).expect("v1 ack");
        assert_eq!(
            ack,
            Up::PolicyAck {
                version: 4,
                epoch: 0,
                hash: [0; 32]
            }
        );
        let policy = v1::Down::Policy {
            version: 2,
            toml: "a=1".into(),
        };
        assert!(matches!(
            decode_down(&bytes(&policy)).expect("v1 policy"),
            Down::Policy {
                version: 2,
                epoch: 0,
                ..
            }
        ));
        // Current frames decode as themselves, and an old decoder reads their prefix.
        let current = Down::Policy {
            version: 2,
            toml: "a=1".into(),
            epoch: 9,
            hash: [1; 32],
        };
        assert_eq!(decode_down(&bytes(&current)).expect("current"), current);
        assert_eq!(
            postcard::from_bytes::<v1::Down>(&bytes(&current)).expect("prefix"),
            policy
        );
    }

    #[test]
    fn golden_down_frames() {
        let mut policy = vec![0, 1, 3, b'a', b'=', b'1', 4];
        policy.extend_from_slice(&[2; 32]);
        assert_eq!(
            bytes(&Down::Policy {
                version: 1,
                toml: "a=1".into(),
                epoch: 4,
                hash: [2; 32]
            }),
            policy
        );
        assert_eq!(bytes(&Down::TelemetryAck { seq: 5 }), [2, 5]);
        let reg = Down::Registry(vec![RegistryEntry {
            name: "n".into(),
            addrs: vec!["x".into()],
            services: vec![],
            labels: vec![],
            up: true,
        }]);
        assert_eq!(bytes(&reg), [1, 1, 1, b'n', 1, 1, b'x', 0, 0, 1]);
    }

    #[test]
    fn golden_telemetry_batch() {
        let batch = Up::Telemetry(TelemetryBatch {
            seq: 1,
            dropped: 0,
            calls: vec![CallStats {
                service: "e".into(),
                method: "m".into(),
                caller: "a".into(),
                callee: "b".into(),
                status: Status::NotFound,
                count: 2,
                sum_us: 3,
                buckets: vec![2],
            }],
            resources: Resources {
                rss_bytes: 1,
                cpu_ms: 2,
                connections: 3,
            },
            spans: vec![],
            audit: vec![AuditEvent {
                unix_ms: 9,
                kind: "k".into(),
                fields: vec![],
            }],
            rules: vec![RuleCount {
                rule: "r".into(),
                action: "a".into(),
                count: 4,
            }],
            folded: 6,
            lost_items: 8,
            tcp: vec![TcpStats {
                listen: "l".into(),
                service: "s".into(),
                opened: 1,
                closed: 2,
                refused: 3,
                bytes_to_service: 4,
                bytes_from_service: 5,
                duration_ms: 6,
                buckets: vec![7],
            }],
        });
        assert_eq!(
            bytes(&batch),
            [
                4, 1, 0, // Telemetry, seq, dropped
                1, 1, b'e', 1, b'm', 1, b'a', 1, b'b', 1, 2, 3, 1, 2, // one CallStats
                1, 2, 3, // resources
                0, // spans
                1, 9, 1, b'k', 0, // one audit event
                1, 1, b'r', 1, b'a', 4, // one rule count
                6, 8, // folded, lost items
                1, 1, b'l', 1, b's', 1, 2, 3, 4, 5, 6, 1, 7, // one TCP forward
            ]
        );
        let back: Up = postcard::from_bytes(&bytes(&batch)).expect("decode");
        assert_eq!(back, batch);
    }

    #[test]
    fn a_protocol_2_batch_reads_with_no_tcp_counters_and_keeps_its_other_fields() {
        let Up::Telemetry(mut current) = decode_up(&[
            4, 1, 0, 0, 1, 2, 3, 0, 0, 0, 6, 8, // seq 1 .. folded 6, lost items 8, no TCP
        ])
        .expect("a protocol 2 batch decodes") else {
            panic!("not telemetry")
        };
        assert_eq!((current.folded, current.lost_items), (6, 8));
        assert!(current.tcp.is_empty());
        // The current shape round-trips, TCP counters included.
        current.tcp.push(TcpStats::default());
        let encoded = bytes(&Up::Telemetry(current.clone()));
        assert_eq!(decode_up(&encoded).expect("decode"), Up::Telemetry(current));
    }
}
