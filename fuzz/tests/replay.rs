//! Runs every input kept for a fuzz target through its check, on the stable toolchain, in
//! every test run: its seeds (`seeds/<target>/`), what runs found and kept (`corpus/<target>/`)
//! and every crash found so far (`regressions/<target>/`). A fixed crash stays fixed.

use std::path::Path;

#[test]
fn every_kept_input_passes_its_check() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut ran = 0;
    for (name, check) in starling_fuzz::TARGETS {
        for dir in ["seeds", "corpus", "regressions"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                continue;
            };
            for entry in entries {
                let path = entry.expect("a directory entry").path();
                let data = std::fs::read(&path).expect("a kept input");
                eprintln!("{name}: {}", path.display());
                check(&data);
                ran += 1;
            }
        }
    }
    // The seeds are in the repository: an empty run means they were lost, not that all is well.
    assert!(
        ran >= starling_fuzz::TARGETS.len(),
        "only {ran} kept inputs found"
    );
}

/// The kept signed bundle verifies with the kept key: the fuzzer starts from one that passes, so
/// it explores the checks after the signature's too.
#[test]
fn the_seed_bundle_verifies() {
    use mesh_gateway::cloud::signing;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let signer = signing::load_public(&root.join("keys/operator.pub")).expect("key");
    let bundle = std::fs::read(root.join("seeds/signed_policy/example")).expect("seed");
    let (signed, _) = signing::verify(&bundle, &[signer], "starling/fuzz.local/gw", u64::MAX / 2)
        .expect("the seed verifies");
    assert!(mesh_core::policy::Policy::parse(&signed.policy, "seed").is_ok());
}

/// Writes the seeds: a few valid inputs per target, so the fuzzer starts from the shapes that
/// matter. `cargo test --test replay -- --ignored write_seeds` (the files are kept in git;
/// `scripts/fuzz.sh` reads them and never changes them).
#[test]
#[ignore]
fn write_seeds() {
    use mesh_proto::control::{Down, RegistryEntry, Up};
    use mesh_proto::enroll::{EnrollDown, EnrollUp};
    use mesh_proto::serial::{Frame, encode_keyed};
    use mesh_proto::{Hello, RequestHead, ResponseHead, Role, Status, TraceContext};

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("seed");
    };
    let frame_content = |value: &dyn Fn(&mut Vec<u8>)| {
        let mut out = Vec::new();
        value(&mut out);
        let (len, prefix) = mesh_proto::frame_len(&out, usize::MAX)
            .expect("frame")
            .expect("complete");
        out[prefix..prefix + len].to_vec()
    };

    let mut head = RequestHead::new("echo", "say", 1000);
    head.trace = Some(TraceContext {
        trace_id: [1; 16],
        span_id: [2; 8],
        flags: 1,
    });
    head.metadata.push(("x-canary", "1")).expect("room");
    let bytes = frame_content(&|o| mesh_proto::encode_frame_vec(&head, o));
    write("request_head", "traced", &bytes);
    let bytes = frame_content(&|o| mesh_proto::encode_frame_vec(&RequestHead::new("a", "b", 0), o));
    write("request_head", "minimal", &bytes);
    let mut head = RequestHead::new("echo", "say", 1000);
    head.metadata.push((":keep", "")).expect("room");
    head.metadata.push(("x-canary", "1")).expect("room");
    let bytes = frame_content(&|o| mesh_proto::encode_frame_vec(&head, o));
    write("request_head", "metadata", &bytes);
    let mut head = ResponseHead::new(Status::Ok, "");
    head.metadata.push((":keep", "")).expect("room");
    head.metadata.push(("leaf", "n1")).expect("room");
    let bytes = frame_content(&|o| mesh_proto::encode_frame_vec(&head, o));
    write("response_head", "metadata", &bytes);
    for (name, head) in [
        ("ok", ResponseHead::new(Status::Ok, "")),
        ("upstream", ResponseHead::new(Status::Upstream(503), "no")),
    ] {
        let bytes = frame_content(&|o| mesh_proto::encode_frame_vec(&head, o));
        write("response_head", name, &bytes);
    }
    let hello = Hello {
        protocol_version: 2,
        name: "n1",
        role: Role::Node,
        labels: Default::default(),
        services: Default::default(),
    };
    let bytes = frame_content(&|o| mesh_proto::encode_frame_vec(&hello, o));
    write("hello", "node", &bytes);
    write("frame_len", "one", &[0x01, 0x00]);
    write("frame_len", "long", &[0xe8, 0x07]);

    let enc = |v: &dyn erased::Encode| v.encode();
    write("control_up", "heartbeat", &enc(&Up::Heartbeat));
    write(
        "control_up",
        "ack",
        &enc(&Up::PolicyAck {
            version: 300,
            epoch: 9,
            hash: [7; 32],
        }),
    );
    write(
        "control_down",
        "telemetry_ack",
        &enc(&Down::TelemetryAck { seq: 5 }),
    );
    write(
        "control_down",
        "policy",
        &enc(&Down::Policy {
            version: 1,
            toml: "a=1".into(),
            epoch: 4,
            hash: [2; 32],
        }),
    );
    write(
        "control_down",
        "registry",
        &enc(&Down::Registry(vec![RegistryEntry {
            name: "n".into(),
            addrs: vec!["x".into()],
            services: vec![],
            labels: vec![],
            up: true,
        }])),
    );

    let key = [7u8; 32];
    let mut line = Vec::new();
    for (i, frame) in [
        Frame::Discover,
        Frame::Heartbeat { uptime_ms: 5 },
        Frame::Call {
            id: 1,
            service: 0,
            method: 0,
            body: b"hi",
        },
        Frame::Reply {
            id: 1,
            status: Status::Ok,
            body: b"ok",
        },
    ]
    .iter()
    .enumerate()
    {
        for keyed in [false, true] {
            let (mut scratch, mut out) = ([0u8; 1024], [0u8; 2048]);
            let n =
                encode_keyed(frame, keyed.then_some(&key), &mut scratch, &mut out).expect("encode");
            write(
                "serial_frames",
                &format!("frame{i}{}", if keyed { "-keyed" } else { "" }),
                &out[..n],
            );
            line.extend_from_slice(&out[..n]);
        }
    }
    write("serial_frames", "line", &line);

    write("enroll_up", "hello", &enc(&EnrollUp::Hello { version: 1 }));
    write(
        "enroll_up",
        "join",
        &enc(&EnrollUp::Join {
            secret: vec![1, 2, 3],
            csr_der: vec![0x30, 0x00],
        }),
    );
    write(
        "enroll_down",
        "refused",
        &enc(&EnrollDown::Refused {
            reason: "used".into(),
            revoked: false,
        }),
    );

    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let text = |name: &str| std::fs::read(configs.join(name)).expect("config");
    write("policy", "example", &text("policy.example.toml"));
    write("node_config", "example", &text("node.example.toml"));
    write("node_config", "minimal", &text("node.minimal.toml"));
    write("gateway_config", "example", &text("gateway.example.toml"));
    // signed_policy/example was made once with `mesh-gateway policy sign` and a key whose
    // private half was then thrown away (keys/operator.pub is its public half): it stays.

    write("cloud_topic", "call-id", b"\x01call/echo/say/42");
    write(
        "cloud_topic",
        "call-response-topic",
        b"\x01call/echo/say\x00starling/fuzz/reply/app",
    );
    write("cloud_topic", "policy", b"\x01policy/set");
    write("cloud_topic", "elsewhere", b"\x00other/call/echo/say/1");

    // The state files as the programs write them.
    let scratch = std::env::temp_dir().join(format!("starling-seeds-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).expect("scratch");
    let tokens = scratch.join("admin-tokens.json");
    let t = mesh_gateway::admin_tokens::AdminTokens::open("local".into(), &tokens);
    t.create("ops", "seed").expect("token");
    write(
        "state_files",
        "admin-tokens",
        &prefixed(0, &std::fs::read(&tokens).expect("read")),
    );
    let store = mesh_node::state::PolicyStore::new(&scratch);
    let toml = text("policy.example.toml");
    let toml = String::from_utf8(toml).expect("utf-8");
    store
        .save(&mesh_node::state::SavedBundle {
            id: mesh_proto::control::BundleRef {
                epoch: 1,
                version: 3,
                hash: mesh_node::state::bundle_hash(&toml),
            },
            toml,
        })
        .expect("save");
    write(
        "state_files",
        "saved-policy",
        &prefixed(1, &std::fs::read(store.path()).expect("read")),
    );
    let _ = std::fs::remove_dir_all(&scratch);
}

/// `which` then `bytes`.
fn prefixed(which: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![which];
    out.extend_from_slice(bytes);
    out
}

/// postcard encoding behind a trait object, so one closure takes every message type.
mod erased {
    pub trait Encode {
        fn encode(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn encode(&self) -> Vec<u8> {
            postcard::to_allocvec(self).expect("encode")
        }
    }
}
