//! What each fuzz target checks, as plain functions: the targets (`fuzz_targets/`) call them
//! under libFuzzer, and the stable test `tests/replay.rs` runs the seeds, the kept corpus and
//! every past crash through them.
//!
//! Every check: any bytes are decoded or refused, never a panic, never an unbounded allocation
//! (libFuzzer's `-rss_limit_mb` and `-malloc_limit_mb` catch those); what decodes re-encodes to
//! bytes that decode to the same value; text refused as config names the file in its error.

use std::path::Path;

use mesh_proto::control::{decode_down, decode_up};
use mesh_proto::enroll::{EnrollDown, EnrollUp};
use mesh_proto::heads::{CallHead, RequestView, ResponseView, encode_call_head};
use mesh_proto::serial::{self, Decoder};
use mesh_proto::{Hello, RequestHead, ResponseHead, decode_head, encode_frame_vec};

/// The file name config errors must carry.
const FILE: &str = "fuzz.toml";

/// A head type decodes, or is refused; what decodes re-encodes as a frame that decodes equal.
/// (A macro: the heads borrow from the bytes they are decoded from.)
macro_rules! head_round_trip {
    ($t:ty, $data:expr) => {
        if let Ok(head) = decode_head::<$t>($data) {
            let mut out = Vec::new();
            encode_frame_vec(&head, &mut out);
            let (len, prefix) = mesh_proto::frame_len(&out, usize::MAX)
                .expect("own frame")
                .expect("complete");
            let again: $t = decode_head(&out[prefix..prefix + len]).expect("own encoding decodes");
            assert_eq!(head, again);
        }
    };
}

/// A call's request head (the first frame of every call stream). The view a node reads it
/// with accepts exactly what serde does, with the same fields, and the node's own encoder writes
/// serde's bytes.
pub fn request_head(data: &[u8]) {
    head_round_trip!(RequestHead, data);
    let view = RequestView::decode(data);
    match decode_head::<RequestHead>(data) {
        Ok(head) => {
            let view = view.expect("the view takes what serde takes");
            assert_eq!(
                (view.service, view.method, view.deadline_ms, view.trace),
                (head.service, head.method, head.deadline_ms, head.trace)
            );
            assert!(view.metadata.iter().eq(head.metadata.iter().copied()));
            same_encoding(&head);
        }
        Err(_) => assert!(view.is_err(), "the view took what serde refuses"),
    }
}

/// A call's response head; as [`request_head`].
pub fn response_head(data: &[u8]) {
    head_round_trip!(ResponseHead, data);
    let view = ResponseView::decode(data);
    match decode_head::<ResponseHead>(data) {
        Ok(head) => {
            let view = view.expect("the view takes what serde takes");
            assert_eq!((view.status, view.message), (head.status, head.message));
            assert!(view.metadata.iter().eq(head.metadata.iter().copied()));
            same_encoding(&head);
        }
        Err(_) => assert!(view.is_err(), "the view took what serde refuses"),
    }
}

/// The node's encoder writes the frame serde writes.
fn same_encoding<'a, H: CallHead<'a> + serde::Serialize>(head: &H) {
    let (mut ours, mut serde) = (Vec::new(), Vec::new());
    encode_call_head(head, head.encoded_len(), &mut ours, 0);
    encode_frame_vec(head, &mut serde);
    assert_eq!(ours, serde);
}

/// The connection hello.
pub fn hello(data: &[u8]) {
    head_round_trip!(Hello, data);
}

/// A length prefix is read or refused, and never exceeds its bound.
pub fn frame_len(data: &[u8]) {
    if let Ok(Some((len, prefix))) = mesh_proto::frame_len(data, 8192) {
        assert!(len <= 8192);
        assert!((1..=5).contains(&prefix));
    }
}

/// A frame a node sends its gateway on the control stream (every protocol's shape).
pub fn control_up(data: &[u8]) {
    if let Ok(up) = decode_up(data) {
        let bytes = postcard::to_allocvec(&up).expect("encodes");
        assert_eq!(decode_up(&bytes).expect("own encoding decodes"), up);
    }
}

/// A frame a gateway sends a node on the control stream.
pub fn control_down(data: &[u8]) {
    if let Ok(down) = decode_down(data) {
        let bytes = postcard::to_allocvec(&down).expect("encodes");
        assert_eq!(decode_down(&bytes).expect("own encoding decodes"), down);
    }
}

/// Bytes on a serial line, to a node's decoder with and without a key: every frame it hands on
/// re-encodes to bytes that decode to the same frame; what it drops is counted, one per reason.
pub fn serial_frames(data: &[u8]) {
    const N: usize = 1024;
    let key = [7u8; 32];
    for keyed in [false, true] {
        let mut decoder = if keyed {
            Decoder::<N>::with_key(key)
        } else {
            Decoder::<N>::new()
        };
        let mut dropped = 0u32;
        decoder.feed(
            data,
            |frame| {
                let (mut scratch, mut out) = ([0u8; N], [0u8; 2 * N]);
                let n = serial::encode_keyed(&frame, keyed.then_some(&key), &mut scratch, &mut out)
                    .expect("a decoded frame encodes");
                let mut again = if keyed {
                    Decoder::<N>::with_key(key)
                } else {
                    Decoder::<N>::new()
                };
                let mut seen = 0;
                again.feed(
                    &out[..n],
                    |f| {
                        assert_eq!(f, frame);
                        seen += 1;
                    },
                    |why| panic!("own encoding dropped: {why:?}"),
                );
                assert_eq!(seen, 1);
            },
            |_| dropped += 1,
        );
        assert_eq!(decoder.dropped.iter().sum::<u32>(), dropped);
    }
}

/// What a device sends a gateway over an enrolment connection.
pub fn enroll_up(data: &[u8]) {
    if let Ok(up) = postcard::from_bytes::<EnrollUp>(data) {
        let bytes = postcard::to_allocvec(&up).expect("encodes");
        assert!(postcard::from_bytes::<EnrollUp>(&bytes).expect("decodes") == up);
    }
}

/// What a gateway answers a device over an enrolment connection.
pub fn enroll_down(data: &[u8]) {
    if let Ok(down) = postcard::from_bytes::<EnrollDown>(data) {
        let bytes = postcard::to_allocvec(&down).expect("encodes");
        assert!(postcard::from_bytes::<EnrollDown>(&bytes).expect("decodes") == down);
    }
}

/// A policy bundle's text (from `PUT /v1/policy`, the cloud, a saved file): parsed or refused
/// with an error that names the file.
pub fn policy(data: &[u8]) {
    parsed_or_named(data, |text| mesh_core::policy::Policy::parse(text, FILE));
}

/// A node's config file: parsed or refused with an error that names the file.
pub fn node_config(data: &[u8]) {
    parsed_or_named(data, |text| {
        mesh_node::config::NodeConfig::parse(text, FILE, Path::new(BASE))
    });
}

/// Where relative paths in a fuzzed config point: nowhere.
const BASE: &str = "/nonexistent-starling-fuzz";

/// Text (UTF-8; other bytes are not text) parsed by `parse`, or refused with an error that
/// starts with the file's name.
fn parsed_or_named<T, E: std::fmt::Display>(data: &[u8], parse: impl Fn(&str) -> Result<T, E>) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = parse(text) {
        assert!(e.to_string().starts_with(FILE), "{e}");
    }
}

/// A policy bundle from the cloud (`<prefix>/policy/set`), checked against an operator key: any
/// bytes are refused with a reason or verified; one that verifies is for this site and carries
/// the text that was signed. The key's public half is `keys/operator.pub`; its private half was
/// used once for the seed (`seeds/signed_policy/example`) and thrown away.
pub fn signed_policy(data: &[u8]) {
    use mesh_gateway::cloud::signing;
    static SIGNER: std::sync::OnceLock<signing::Signer> = std::sync::OnceLock::new();
    let signer = SIGNER.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("keys/operator.pub");
        signing::load_public(&path).expect("the fuzz operator key")
    });
    const SITE: &str = "starling/fuzz.local/gw";
    let signers = std::slice::from_ref(signer);
    match signing::verify(data, signers, SITE, u64::MAX / 2) {
        Ok((signed, by)) => {
            assert!(signed.site == SITE || signed.site == "*");
            assert_eq!(by.id, signer.id);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// A gateway's config file: parsed or refused with an error that names the file.
pub fn gateway_config(data: &[u8]) {
    parsed_or_named(data, |text| {
        mesh_gateway::config::GatewayConfig::parse(text, FILE, Path::new(BASE))
    });
}

/// A message from the cloud: its topic and MQTT 5 response topic (`topic`, a zero byte, the
/// response topic; none without a zero byte), both chosen by whoever may publish on the broker.
/// Routed or refused with a reason; a call routed names a service and a method without a `/`,
/// and is answered under the site's `reply/` topics, never on a wildcard. An odd first byte puts
/// the topic under the site's prefix, so the fuzzer need not find it.
pub fn cloud_topic(data: &[u8]) {
    use mesh_gateway::cloud::topics::{Reply, Route, route};
    const PREFIX: &str = "starling/fuzz";
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (topic, response) = match text.split_once('\0') {
        Some((t, r)) => (t, Some(r)),
        None => (text, None),
    };
    let topic = if first & 1 == 1 {
        format!("{PREFIX}/{topic}")
    } else {
        topic.to_owned()
    };
    match route(PREFIX, &topic, response) {
        Ok(Route::Policy) => assert_eq!(topic, format!("{PREFIX}/policy/set")),
        Ok(Route::Call {
            service,
            method,
            reply,
        }) => {
            assert!(topic.starts_with(&format!("{PREFIX}/call/")));
            for name in [service, method] {
                assert!(!name.is_empty() && !name.contains('/'), "{name:?}");
            }
            match reply {
                Reply::Topic(t) => {
                    assert!(t.starts_with(&format!("{PREFIX}/reply/")), "{t:?}");
                    assert!(!t.contains(['+', '#']), "{t:?}");
                }
                Reply::Id(id) => assert!(!id.is_empty() && !id.contains(['/', '+', '#'])),
            }
        }
        Err(e) => assert!(!e.is_empty()),
    }
}

/// A state file read at start, chosen by the first byte: a gateway's admin tokens (JSON) or a
/// node's saved policy (a checksum header and TOML). Loaded or refused with a reason, never a
/// panic; a damaged tokens file turns the named tokens off and leaves the local one working.
///
/// The cloud queue (a redb database) was fuzzed here too, and a damaged file made redb panic
/// (`unreachable!` in its B-tree; the file is tests/fixtures/damaged-cloud-queue.redb). A
/// library's panic is not ours to catch in a device build (it aborts), so the gateway reads its
/// queue in a child process before it opens it, and refuses to start naming the file
/// (tests/tests/cloud.rs). The queue is not fuzzed here any more: every run would stop on
/// redb's panic.
pub fn state_files(data: &[u8]) {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("starling-fuzz-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    if which % 2 == 0 {
        let path = dir.join("admin-tokens.json");
        std::fs::write(&path, bytes).expect("write");
        let tokens = mesh_gateway::admin_tokens::AdminTokens::open("the-local".into(), &path);
        assert_eq!(tokens.who("the-local").as_deref(), Some("local"));
        if tokens.damaged().is_some() {
            assert_eq!(tokens.list()["tokens"].as_array().map(Vec::len), Some(0));
        }
    } else {
        let store = mesh_node::state::PolicyStore::new(&dir);
        std::fs::write(store.path(), bytes).expect("write");
        if let Ok(Some(saved)) = store.load() {
            assert_eq!(saved.id.hash, mesh_node::state::bundle_hash(&saved.toml));
        }
    }
}

/// A target's check.
pub type Check = fn(&[u8]);

/// Every target by name, for the replay test.
pub const TARGETS: &[(&str, Check)] = &[
    ("request_head", request_head),
    ("response_head", response_head),
    ("hello", hello),
    ("frame_len", frame_len),
    ("control_up", control_up),
    ("control_down", control_down),
    ("serial_frames", serial_frames),
    ("enroll_up", enroll_up),
    ("enroll_down", enroll_down),
    ("policy", policy),
    ("node_config", node_config),
    ("signed_policy", signed_policy),
    ("gateway_config", gateway_config),
    ("cloud_topic", cloud_topic),
    ("state_files", state_files),
];
