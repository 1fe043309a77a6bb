//! A microcontroller on a serial line, on the mesh: a node with a `serial://` upstream on one end
//! of a pty pair (made by socat, as a USB serial adapter would appear), `firmware-shim` on the
//! other (the `fake-mcu` test binary: the shim's core on the host; the emulated Cortex-M firmware
//! comes next).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use starling_tests::{KillOnDrop, NodeProc, Pki, bin, call_ingress, hosts, post, prepend};

const UP: Duration = Duration::from_secs(10);

/// Two ptys wired to each other by socat; killed on drop.
struct PtyPair {
    _socat: KillOnDrop,
    node_end: PathBuf,
    mcu_end: PathBuf,
}

impl PtyPair {
    fn new(dir: &Path) -> PtyPair {
        let (node_end, mcu_end) = (dir.join("tty-node"), dir.join("tty-mcu"));
        let socat = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", node_end.display()))
            .arg(format!("pty,raw,echo=0,link={}", mcu_end.display()))
            .stderr(Stdio::null())
            .spawn()
            .expect("socat (Debian package socat; scripts/setup.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !(node_end.exists() && mcu_end.exists()) {
            assert!(Instant::now() < deadline, "socat made no pty pair");
            std::thread::sleep(Duration::from_millis(10));
        }
        PtyPair {
            _socat: KillOnDrop(socat),
            node_end,
            mcu_end,
        }
    }
}

/// The fake microcontroller on `device`, heartbeats every 200 ms; killed on drop.
struct Mcu(#[allow(dead_code)] KillOnDrop);

impl Mcu {
    fn start(device: &Path) -> Mcu {
        Self::start_keyed(device, None)
    }

    /// With a key shared with its node (64 hex digits).
    fn start_keyed(device: &Path, key: Option<&str>) -> Mcu {
        Mcu(KillOnDrop(
            Command::new(bin("fake-mcu"))
                .arg(device)
                .args(["mcu-1", "200"])
                .args(key)
                .spawn()
                .expect("fake-mcu"),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microcontroller_on_a_serial_line_serves_the_mesh_and_comes_and_goes() {
    let pki = Pki::new();
    let pty = PtyPair::new(pki.dir.path());
    let line = format!("serial://{}?baud=115200", pty.node_end.display());
    let b_conf = pki.config(
        "node-b",
        &format!(
            "[[services]]\nname = \"sensor\"\nupstream = \"{line}\"\n\
             [[services]]\nname = \"actuator\"\nupstream = \"{line}\"\n"
        ),
    );
    let b = NodeProc::start("node-b", &b_conf);
    assert!(
        !hosts(&b.status(), "sensor"),
        "hosted before the microcontroller announced"
    );
    let mut mcu = Mcu::start(&pty.mcu_end);
    b.wait_status("hosting the microcontroller's services", UP, |s| {
        hosts(s, "sensor") && hosts(s, "actuator")
    });
    let a = NodeProc::start(
        "node-a",
        &pki.config("node-a", &format!("[[peers]]\naddr = \"{}\"\n", b.quic)),
    );
    a.wait_status("seeing node-b host sensor", UP, |s| {
        s["peers"].as_array().is_some_and(|p| {
            p.iter().any(|p| {
                p["services"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s == "sensor"))
            })
        })
    });

    // From another node, through the mesh, answered by the microcontroller's handler.
    let started = Instant::now();
    for _ in 0..1000 {
        let (code, body) = call_ingress(a.ingress(), "sensor", "read", b"").await;
        assert_eq!((code, &body[..]), (200, &b"21.5"[..]));
    }
    eprintln!(
        "1000 calls through the serial line in {:?}",
        started.elapsed()
    );
    let (code, body) = call_ingress(a.ingress(), "actuator", "set", b"on").await;
    assert_eq!((code, &body[..]), (200, &b"1:on"[..]));
    let (code, _) = call_ingress(a.ingress(), "sensor", "calibrate", b"").await;
    assert_eq!(code, 404, "a method the microcontroller does not have");

    // Unplugged: calls answer Unavailable within a second, not at their deadline; its services
    // leave.
    drop(mcu);
    let unplugged = Instant::now();
    let (code, _) = call_ingress(b.ingress(), "sensor", "read", b"").await;
    assert_eq!(code, 503, "a call to an unplugged microcontroller");
    assert!(
        unplugged.elapsed() < Duration::from_secs(1),
        "Unavailable came after {:?}",
        unplugged.elapsed()
    );
    b.wait_status("withdrawing the services", UP, |s| !hosts(s, "sensor"));

    // Plugged back (a reset microcontroller announces unasked): back, with no node restart.
    mcu = Mcu::start(&pty.mcu_end);
    b.wait_status("hosting again", UP, |s| hosts(s, "sensor"));
    let (code, body) = call_ingress(b.ingress(), "sensor", "read", b"").await;
    assert_eq!((code, &body[..]), (200, &b"21.5"[..]));

    // The node restarted while the microcontroller runs: it asks, and the services are back
    // within a second.
    drop(b);
    let b = NodeProc::start("node-b", &b_conf);
    let restarted = Instant::now();
    b.wait_status("hosting after its restart", UP, |s| hosts(s, "sensor"));
    assert!(
        restarted.elapsed() < Duration::from_secs(1),
        "the services came back after {:?}",
        restarted.elapsed()
    );
    let (code, body) = call_ingress(b.ingress(), "sensor", "info", b"").await;
    assert_eq!((code, &body[..]), (200, &b"fake-mcu 0.1.0"[..]));
    drop(mcu);
}

#[test]
fn check_config_names_a_missing_device_and_a_bad_rate() {
    let pki = Pki::new();
    let check = |upstream: &str| {
        let conf = pki.config(
            &format!("node-{}", upstream.len()),
            &format!("[[services]]\nname = \"sensor\"\nupstream = \"{upstream}\"\n"),
        );
        let src = std::fs::read_to_string(&conf).expect("config");
        let line = src
            .lines()
            .position(|l| l.starts_with("upstream = \"serial"))
            .expect("line")
            + 1;
        let out = Command::new(bin("mesh-node"))
            .args(["check-config"])
            .arg(&conf)
            .output()
            .expect("mesh-node");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            format!("{}:{line}: services[0].upstream: ", conf.display()),
        )
    };
    let (code, err, at) = check("serial:///dev/does-not-exist?baud=115200");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&at) && err.contains("does not exist"), "{err}");
    let (code, err, at) = check("serial:///dev/null?baud=12");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&at) && err.contains("baud \"12\""), "{err}");
    let (code, err, _) = check("serial:///dev/null?baud=9600");
    assert_eq!(code, Some(0), "{err}");
}

/// Passes bytes between two pty ends, spoiling one frame in a hundred each way (a byte dropped,
/// or three random bytes thrown in); stops when either end closes.
fn noisy_proxy(a: &Path, b: &Path) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use std::io::{Read, Write};
    let spoiled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let open = |p: &Path| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .expect("pty")
    };
    let (a, b) = (open(a), open(b));
    for (mut from, mut to, seed) in [
        (
            a.try_clone().expect("clone"),
            b.try_clone().expect("clone"),
            0x2545_f491_4f6c_dd1du64,
        ),
        (b, a, 0x9e37_79b9_7f4a_7c15u64),
    ] {
        let spoiled = spoiled.clone();
        std::thread::spawn(move || {
            let mut state = seed;
            let mut random = move || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state
            };
            let mut frame = Vec::new();
            let mut buf = [0u8; 256];
            loop {
                let n = match from.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                for &byte in &buf[..n] {
                    frame.push(byte);
                    if byte != 0 {
                        continue;
                    }
                    if random() % 100 == 0 {
                        spoiled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if random() % 2 == 0 && frame.len() > 1 {
                            let at = (random() as usize) % (frame.len() - 1);
                            frame.remove(at);
                        } else {
                            let at = (random() as usize) % frame.len();
                            for _ in 0..3 {
                                frame.insert(at, random() as u8);
                            }
                        }
                    }
                    if to.write_all(&frame).is_err() {
                        return;
                    }
                    frame.clear();
                }
            }
        });
    }
    spoiled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_noisy_line_idempotent_calls_all_succeed_and_none_hangs() {
    let pki = Pki::new();
    let node_side = PtyPair::new(&pki.dir.path().join("."));
    let mcu_dir = pki.dir.path().join("mcu");
    std::fs::create_dir_all(&mcu_dir).expect("dir");
    let mcu_side = PtyPair::new(&mcu_dir);
    let spoiled = noisy_proxy(&node_side.mcu_end, &mcu_side.node_end);
    let _mcu = Mcu::start(&mcu_side.mcu_end);
    // The policy marks sensor/read idempotent, actuator/set not.
    let policy = pki.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[authorization]\ndefault = \"allow\"\n[[services]]\nname = \"sensor\"\nidempotent = [\"read\"]\n",
    )
    .expect("policy");
    let gw_conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    prepend(&gw_conf, &format!("policy = \"{}\"\n", policy.display()));
    let (gw, _) = NodeProc::start_gateway("gw", &gw_conf);
    let line = format!("serial://{}", node_side.node_end.display());
    let b_conf = pki.config(
        "node-b",
        &format!(
            "[[services]]\nname = \"sensor\"\nupstream = \"{line}\"\n\
             [[services]]\nname = \"actuator\"\nupstream = \"{line}\"\n"
        ),
    );
    prepend(&b_conf, &format!("gateway = \"{}\"\n", gw.quic));
    let b = NodeProc::start("node-b", &b_conf);
    b.wait_policy(1, UP);
    b.wait_status("hosting sensor", UP, |s| hosts(s, "sensor"));

    let mut slowest = Duration::ZERO;
    for i in 0..1000 {
        let started = Instant::now();
        let (code, body) = call_ingress(b.ingress(), "sensor", "read", b"").await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(
            (code, &body[..]),
            (200, &b"21.5"[..]),
            "idempotent call {i}"
        );
    }
    // Not idempotent: never sent twice, so a lost frame costs the call, with a clear status at
    // its deadline, never later.
    let (mut ok, mut failed) = (0, 0);
    for _ in 0..300 {
        let started = Instant::now();
        let (code, _, _) = post(
            b.ingress(),
            "actuator",
            "set",
            Bytes::from_static(b"x"),
            Some(500),
        )
        .await
        .expect("the ingress answers");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(1500),
            "a call hung for {took:?}"
        );
        match code {
            200 => ok += 1,
            504 | 503 => failed += 1,
            other => panic!("unexpected status {other}"),
        }
    }
    let spoiled = spoiled.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "noisy line: {spoiled} frames spoiled; 1000 idempotent calls all ok (slowest {slowest:?}); \
         300 others: {ok} ok, {failed} failed clearly"
    );
    assert!(
        spoiled > 0,
        "the proxy spoiled nothing: the test tested nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_microcontroller_of_another_link_version_is_refused_with_the_reason() {
    use mesh_proto::serial::{Decoder, Frame, ServiceDecl, encode};
    use std::io::{Read, Write};
    let pki = Pki::new();
    let pty = PtyPair::new(pki.dir.path());
    let line = format!("serial://{}", pty.node_end.display());
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            &format!("[[services]]\nname = \"sensor\"\nupstream = \"{line}\"\n"),
        ),
    );
    // A microcontroller from the future: it announces link version 99.
    let mut mcu = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty.mcu_end)
        .expect("pty");
    let mut services = heapless::Vec::new();
    let mut methods = heapless::Vec::new();
    methods.push("read").expect("room");
    services
        .push(ServiceDecl {
            name: "sensor",
            methods,
        })
        .expect("room");
    let (mut scratch, mut out) = ([0u8; 512], [0u8; 600]);
    let n = encode(
        &Frame::Announce {
            version: 99,
            name: "future-mcu",
            firmware: "9.0",
            services,
            max_in_flight: 1,
            heartbeat_ms: 200,
        },
        &mut scratch,
        &mut out,
    )
    .expect("encode");
    mcu.write_all(&out[..n]).expect("write");
    // The node answers with a refusal that says why; it hosts nothing from it.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = mcu.try_clone().expect("clone");
    std::thread::spawn(move || {
        let mut decoder = Decoder::<1024>::new();
        let mut buf = [0u8; 256];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                return;
            }
            decoder.feed(
                &buf[..n],
                |f| {
                    if let Frame::Refuse { reason } = f {
                        let _ = tx.send(reason.to_owned());
                    }
                },
                |_| {},
            );
        }
    });
    let reason = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the node refused the announce");
    assert!(reason.contains("version 1, not 99"), "{reason}");
    assert!(!hosts(&b.status(), "sensor"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_key_only_the_device_that_holds_it_is_heard() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::new();
    let key = "7f".repeat(32);
    let key_file = pki.dir.path().join("line.key");
    std::fs::write(&key_file, &key).expect("key");
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let node_with_line = |name: &str, dir: &Path| {
        let pty = PtyPair::new(dir);
        let conf = pki.config(
            name,
            &format!(
                "[[services]]\nname = \"sensor\"\nupstream = \"serial://{}?key={}\"\n",
                pty.node_end.display(),
                key_file.display()
            ),
        );
        (pty, conf)
    };
    let b_dir = pki.dir.path().join("b-line");
    let c_dir = pki.dir.path().join("c-line");
    std::fs::create_dir_all(&b_dir).expect("dir");
    std::fs::create_dir_all(&c_dir).expect("dir");
    let (b_pty, b_conf) = node_with_line("node-b", &b_dir);
    let (c_pty, c_conf) = node_with_line("node-c", &c_dir);
    let b = NodeProc::start("node-b", &b_conf);
    let c = NodeProc::start("node-c", &c_conf);
    // The right key on node-b's line; on node-c's, a device with another key, then one with none.
    let _good = Mcu::start_keyed(&b_pty.mcu_end, Some(&key));
    let impostor = Mcu::start_keyed(&c_pty.mcu_end, Some(&"01".repeat(32)));
    b.wait_status("hosting the keyed device's sensor", UP, |s| {
        hosts(s, "sensor")
    });
    let (code, body) = call_ingress(b.ingress(), "sensor", "read", b"").await;
    assert_eq!((code, &body[..]), (200, &b"21.5"[..]));
    // node-c hears the impostor's announce and heartbeats, drops every one as unauthenticated,
    // and hosts nothing.
    let unauthenticated = |s: &serde_json::Value| {
        s["serial"][0]["dropped"]["unauthenticated"]
            .as_u64()
            .unwrap_or(0)
    };
    let s = c.wait_status("dropping the impostor's frames", UP, |s| {
        unauthenticated(s) >= 5
    });
    assert!(
        !hosts(&s, "sensor") && s["serial"][0]["device"].is_null(),
        "{s}"
    );
    drop(impostor);
    let before = unauthenticated(&c.status());
    let _unkeyed = Mcu::start(&c_pty.mcu_end);
    let s = c.wait_status("dropping an unkeyed device's frames", UP, |s| {
        unauthenticated(s) >= before + 5
    });
    assert!(
        !hosts(&s, "sensor") && s["serial"][0]["device"].is_null(),
        "{s}"
    );
    let s = b.status();
    assert_eq!(s["serial"][0]["device"], "mcu-1", "{s}");
    let (code, _) = call_ingress(c.ingress(), "sensor", "read", b"").await;
    assert_eq!(code, 503);

    // check-config refuses a key file others can read.
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = Command::new(bin("mesh-node"))
        .arg("check-config")
        .arg(&b_conf)
        .output()
        .expect("mesh-node");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must be readable by its owner only"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
