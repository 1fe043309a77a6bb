//! The example firmware (`firmware/qemu-mps2`: firmware-shim on an emulated Cortex-M4, QEMU
//! machine mps2-an386) on the mesh: its UART is a pty QEMU makes, named to the node through a
//! symlink the test points at each new QEMU's pty. scripts/test.sh builds the firmware first.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use starling_tests::{
    KillOnDrop, NodeProc, Pki, call_ingress, eventually, free_udp_port, hosts, http, prepend,
};

const UP: Duration = Duration::from_secs(10);
const FAST: &str = "[telemetry]\ninterval_ms = 100\n";

fn firmware() -> PathBuf {
    let elf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../firmware/qemu-mps2/target/thumbv7em-none-eabihf/release/qemu-mps2");
    assert!(
        elf.exists(),
        "{} is missing: scripts/test.sh builds it (cd firmware/qemu-mps2 && cargo build --release)",
        elf.display()
    );
    elf
}

/// QEMU running the firmware, its UART on a pty that `link` points at; killed on drop.
struct Qemu(#[allow(dead_code)] KillOnDrop);

impl Qemu {
    fn start(link: &Path) -> Qemu {
        let mut child = Command::new("qemu-system-arm")
            .args([
                "-M",
                "mps2-an386",
                "-nographic",
                "-monitor",
                "none",
                "-serial",
                "pty",
            ])
            .arg("-kernel")
            .arg(firmware())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect(
                "qemu-system-arm (Debian package qemu-system-arm; scripts/setup.sh installs it)",
            );
        let (tx, rx) = std::sync::mpsc::channel();
        for out in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(at) = line.find("/dev/pts/") {
                        let pts: String = line[at..]
                            .chars()
                            .take_while(|c| !c.is_whitespace())
                            .collect();
                        let _ = tx.send(pts);
                    }
                }
            });
        }
        let pts = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("QEMU said which pty its UART is on");
        // Pointed at atomically: a node reopening the line finds the old pty or the new one.
        let tmp = link.with_extension("new");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&pts, &tmp).expect("symlink");
        std::fs::rename(&tmp, link).expect("rename");
        Qemu(KillOnDrop(child))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emulated_cortex_m_firmware_serves_the_mesh_through_its_node() {
    let pki = Pki::new();
    let link = pki.dir.path().join("mcu-uart");
    let mut qemu = Qemu::start(&link);
    // Only node-a may call the microcontroller's services.
    let policy = pki.dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[authorization]\ndefault = \"deny\"\n[[authorization.rules]]\nname = \"a-drives-the-mcu\"\n\
         effect = \"allow\"\ncallers = [\"spiffe://starling.local/node/node-a\"]\n\
         services = [\"sensor\", \"actuator\"]\n[[services]]\nname = \"sensor\"\nidempotent = [\"read\", \"info\"]\n",
    )
    .expect("policy");
    let gw_conf = pki.gateway_config("gw", "127.0.0.1:0", "");
    prepend(&gw_conf, &format!("policy = \"{}\"\n", policy.display()));
    let (gw, admin) = NodeProc::start_gateway("gw", &gw_conf);
    let with_gateway = |conf: PathBuf| {
        prepend(&conf, &format!("gateway = \"{}\"\n", gw.quic));
        conf
    };
    let line = format!("serial://{}?baud=115200", link.display());
    let b_conf = with_gateway(pki.config(
        "node-b",
        &format!(
            "[[services]]\nname = \"sensor\"\nupstream = \"{line}\"\n\
             [[services]]\nname = \"actuator\"\nupstream = \"{line}\"\n{FAST}"
        ),
    ));
    // A fixed port: node-a finds node-b again after node-b restarts.
    let src = std::fs::read_to_string(&b_conf).expect("config");
    std::fs::write(
        &b_conf,
        src.replace(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{}\"", free_udp_port()),
        ),
    )
    .expect("config");
    let b = NodeProc::start("node-b", &b_conf);
    b.wait_policy(1, UP);
    b.wait_status("hosting the firmware's services", UP, |s| {
        hosts(s, "sensor") && hosts(s, "actuator")
    });
    let peer_b = format!("[[peers]]\naddr = \"{}\"\n{FAST}", b.quic);
    let a = NodeProc::start("node-a", &with_gateway(pki.config("node-a", &peer_b)));
    let c = NodeProc::start("node-c", &with_gateway(pki.config("node-c", &peer_b)));
    for n in [&a, &c] {
        n.wait_policy(1, UP);
        n.wait_status("seeing node-b host sensor", UP, |s| {
            s["peers"].as_array().is_some_and(|p| {
                p.iter().any(|p| {
                    p["services"]
                        .as_array()
                        .is_some_and(|s| s.iter().any(|s| s == "sensor"))
                })
            })
        });
    }

    // node-a calls node-b: the answer comes from the firmware.
    let (code, body) = call_ingress(a.ingress(), "sensor", "info", b"").await;
    assert_eq!((code, &body[..]), (200, &b"qemu-mps2 cortex-m4 0.1.0"[..]));
    let started = Instant::now();
    for i in 0..1000 {
        let (code, body) = call_ingress(a.ingress(), "sensor", "read", b"").await;
        assert_eq!(code, 200, "call {i}: {body:?}");
        assert!(
            body.starts_with(b"2") && body.len() == 4,
            "call {i}: {body:?}"
        );
    }
    eprintln!(
        "1000 calls to the emulated microcontroller in {:?}",
        started.elapsed()
    );
    let (code, body) = call_ingress(a.ingress(), "actuator", "set", b"42").await;
    assert_eq!((code, &body[..]), (200, &b"42"[..]));
    let (code, _) = call_ingress(a.ingress(), "actuator", "set", b"420").await;
    assert_eq!(code, 400, "the firmware refuses a level over 100");
    // node-c: no rule allows it.
    let (code, _) = call_ingress(c.ingress(), "sensor", "read", b"").await;
    assert_eq!(code, 403, "a caller no rule allows");
    // The gateway counts the calls under the microcontroller's leaf name, and lists its
    // services as hosted by node-b.
    let series = "starling_requests_total{service=\"sensor\",method=\"read\",caller=\"node-a\",\
                  callee=\"node-b/leaf/qemu-mcu\",status=\"ok\"}";
    let counted = eventually(UP, async || {
        let (_, text) = http("GET", admin, "/metrics", None, "").await;
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .filter(|n| *n >= 1000)
    })
    .await;
    assert!(
        counted.is_some(),
        "the gateway never counted 1000 calls as {series}"
    );
    let services = async || http("GET", admin, "/v1/services", None, "").await.1;
    assert!(
        services()
            .await
            .contains("\"sensor\":[{\"node\":\"node-b\""),
        "{}",
        services().await
    );

    // QEMU killed: Unavailable within a second, the services leave.
    drop(qemu);
    let killed = Instant::now();
    let (code, _) = call_ingress(a.ingress(), "sensor", "read", b"").await;
    assert_eq!(code, 503);
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "after {:?}",
        killed.elapsed()
    );
    b.wait_status("withdrawing the services", UP, |s| !hosts(s, "sensor"));
    let gone = eventually(UP, async || {
        (!services().await.contains("\"sensor\"")).then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "the gateway still lists sensor: {}",
        services().await
    );

    // QEMU again (a new pty behind the same name): back, with no node restart.
    qemu = Qemu::start(&link);
    b.wait_status("hosting again", UP, |s| hosts(s, "sensor"));
    let (code, _) = call_ingress(a.ingress(), "sensor", "read", b"").await;
    assert_eq!(code, 200);

    // node-b restarted while the firmware runs: back without a reset of the MCU. Within two
    // seconds here: QEMU's pty looks for its other end once a second and drops what it gets
    // until then (a real UART does not; tests/tests/serial.rs holds the node to one second).
    drop(b);
    let b = NodeProc::start("node-b", &b_conf);
    let restarted = Instant::now();
    b.wait_status("hosting after its restart", UP, |s| hosts(s, "sensor"));
    assert!(
        restarted.elapsed() < Duration::from_secs(2),
        "after {:?}",
        restarted.elapsed()
    );
    a.wait_peer("node-b", UP);
    let (code, body) = call_ingress(a.ingress(), "actuator", "set", b"7").await;
    assert_eq!((code, &body[..]), (200, &b"7"[..]));
    drop(qemu);
}
