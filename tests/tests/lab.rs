//! The multi-host lab: real `mesh-node` processes in network namespaces on a bridge, finding each
//! other by mDNS, dying, losing their links and packets. Needs root (CI runs as root).
//!
//! Each test makes its own lab (namespaces named with a per-run tag) and deletes it on drop, also
//! when it fails. Calls are made with `mesh-node call` inside the caller's namespace, since an
//! ingress listens on its host's loopback.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use starling_tests::lab::Lab;
use starling_tests::{NodeProc, Pki, bin};

const UP: Duration = Duration::from_secs(10);

use starling_tests::lab::config as lab_config;

fn start(lab: &Lab, i: usize, name: &str, config: &Path) -> NodeProc {
    let mut cmd = lab.exec_prefix(i);
    cmd.push(bin("mesh-node").display().to_string());
    NodeProc::start_cmd(name, &cmd, config)
}

/// `mesh-node call` inside host `i`, against that host's ingress.
fn call(lab: &Lab, i: usize, service: &str, extra: &[&str]) -> Output {
    let mut cmd = lab.exec_prefix(i);
    cmd.push(bin("mesh-node").display().to_string());
    Command::new(&cmd[0])
        .args(&cmd[1..])
        .args([
            "call",
            service,
            "check",
            "--ingress",
            "127.0.0.1:7480",
            "--timeout-ms",
            "3000",
        ])
        .args(extra)
        .output()
        .expect("mesh-node call")
}

fn answered_by(out: &Output) -> String {
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    body.split("\"node\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
        .to_owned()
}

fn health(name: &str) -> String {
    format!("[[services]]\nname = \"{name}\"\nupstream = \"builtin:health\"\n")
}

#[test]
fn five_hosts_find_each_other_by_mdns_and_call_everyone() {
    let lab = Lab::new(5);
    let pki = Pki::new();
    let mut nodes = Vec::new();
    for i in 0..5 {
        let name = format!("h{i}");
        let conf = lab_config(&pki, &name, &health(&format!("svc-{name}")));
        nodes.push(start(&lab, i, &name, &conf));
    }
    let last_start = Instant::now();
    for n in &nodes {
        n.wait_peers(4, Duration::from_secs(3));
    }
    let took = last_start.elapsed();
    eprintln!("five lab nodes all connected {took:?} after the last start");
    for i in 0..5 {
        for j in 0..5 {
            if i != j {
                let out = call(&lab, i, &format!("svc-h{j}"), &[]);
                assert_eq!(answered_by(&out), format!("h{j}"));
            }
        }
    }
    assert!(took <= Duration::from_secs(3), "took {took:?}");
}

#[test]
fn dead_nodes_leave_the_tables_and_calls_go_to_the_living() {
    let lab = Lab::new(3);
    let pki = Pki::new();
    let fast = "[limits]\nkeep_alive_ms = 500\nidle_timeout_ms = 1000\n";
    let conf = |name: &str, svc: &str| lab_config(&pki, name, &format!("{svc}{fast}"));
    let h0 = start(&lab, 0, "h0", &conf("h0", ""));
    let h1 = start(&lab, 1, "h1", &conf("h1", &health("shared")));
    let h2 = start(&lab, 2, "h2", &conf("h2", &health("shared")));
    h0.wait_peer("h1", UP);
    h0.wait_peer("h2", UP);

    // SIGKILL: no goodbye, no close; the keep-alive notices within three intervals (idle timeout of
    // two intervals, restarted by QUIC at its own keep-alive: at most three). Measured from the
    // kill until h0's status no longer lists it (polled every 25 ms).
    let killed = Instant::now();
    h1.kill();
    h0.wait_peer_gone("h1", UP);
    let took = killed.elapsed();
    eprintln!("SIGKILLed node left h0's table after {took:?} (keep-alive 500 ms)");
    // Three intervals, plus slack for scheduling on a loaded 2-core machine.
    assert!(took <= Duration::from_millis(1500 + 250), "took {took:?}");
    let out = call(&lab, 0, "shared", &["--repeat", "20"]);
    assert_eq!(
        answered_by(&out),
        "h2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // It comes back and is used again, without restarting anyone.
    let h1 = start(&lab, 1, "h1", &pki.dir.path().join("h1/node.toml"));
    h0.wait_peer("h1", UP);

    // SIGTERM: a close and a goodbye; gone at once.
    let terminated = Instant::now();
    h2.terminate();
    h0.wait_peer_gone("h2", UP);
    let took = terminated.elapsed();
    assert!(h2.stop().success());
    eprintln!("SIGTERMed node left h0's table after {took:?}");
    assert!(took <= Duration::from_secs(1), "took {took:?}");
    let out = call(&lab, 0, "shared", &["--repeat", "20"]);
    assert_eq!(
        answered_by(&out),
        "h1",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(h1);
}

#[test]
fn a_cut_link_removes_the_host_and_its_return_brings_it_back() {
    let lab = Lab::new(2);
    let pki = Pki::new();
    let fast = "[limits]\nkeep_alive_ms = 500\nidle_timeout_ms = 1000\n";
    let h0 = start(&lab, 0, "h0", &lab_config(&pki, "h0", fast));
    let _h1 = start(
        &lab,
        1,
        "h1",
        &lab_config(&pki, "h1", &format!("{}{fast}", health("far"))),
    );
    h0.wait_peer("h1", UP);
    lab.set_link(1, false);
    h0.wait_peer_gone("h1", UP);
    let out = call(&lab, 0, "far", &[]);
    assert!(!out.status.success(), "called a host whose link is cut");
    lab.set_link(1, true);
    h0.wait_peer("h1", Duration::from_secs(15));
    assert_eq!(answered_by(&call(&lab, 0, "far", &[])), "h1");
}

#[test]
fn calls_complete_through_ten_percent_packet_loss() {
    let lab = Lab::new(2);
    let pki = Pki::new();
    let h0 = start(&lab, 0, "h0", &lab_config(&pki, "h0", ""));
    let _h1 = start(&lab, 1, "h1", &lab_config(&pki, "h1", &health("lossy")));
    h0.wait_peer("h1", UP);
    lab.drop_udp(1, 10);
    let out = call(&lab, 0, "lossy", &["--repeat", "200"]);
    let stats = String::from_utf8_lossy(&out.stderr);
    eprintln!("through 10% loss: {stats}");
    assert!(out.status.success(), "{stats}");
    assert!(
        stats.contains("200 calls") && stats.contains("failures 0"),
        "{stats}"
    );
}

/// An ARM build, under qemu-user in a lab host, joins a native node, by mDNS alone or by a
/// static peer, and calls go both ways.
fn arm_node_joins(target: &str, qemu: &str, static_peer: bool) {
    let device_bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target")
        .join(target)
        .join("device/mesh-node");
    assert!(
        device_bin.exists(),
        "{} is missing: run cross/build.sh first (scripts/test.sh does)",
        device_bin.display()
    );
    let lab = Lab::new(2);
    let pki = Pki::new();
    let native = start(
        &lab,
        0,
        "native",
        &lab_config(&pki, "native", &health("on-x86")),
    );
    let peer = if static_peer {
        format!("[[peers]]\naddr = \"{}:7400\"\n", lab.hosts[0].ip)
    } else {
        String::new()
    };
    let arm_conf = lab_config(&pki, "arm", &format!("{}{peer}", health("on-arm")));
    let mut cmd = lab.exec_prefix(1);
    cmd.push(qemu.to_owned());
    cmd.push(device_bin.display().to_string());
    let arm = NodeProc::start_cmd("arm", &cmd, &arm_conf);
    arm.wait_peer("native", Duration::from_secs(30));
    native.wait_peer("arm", Duration::from_secs(30));
    // arm -> native (through the ARM node's ingress) and native -> arm.
    assert_eq!(answered_by(&call(&lab, 1, "on-x86", &[])), "native");
    assert_eq!(answered_by(&call(&lab, 0, "on-arm", &[])), "arm");
}

#[test]
fn aarch64_build_under_qemu_joins_the_mesh_by_mdns() {
    arm_node_joins("aarch64-unknown-linux-musl", "qemu-aarch64-static", false);
}

#[test]
fn armv7_build_under_qemu_joins_the_mesh_by_static_peer() {
    arm_node_joins("armv7-unknown-linux-gnueabihf", "qemu-arm-static", true);
}

#[test]
fn a_node_started_without_network_joins_when_the_link_comes_up() {
    let lab = Lab::new(2);
    let pki = Pki::new();
    let h0 = start(&lab, 0, "h0", &lab_config(&pki, "h0", ""));
    lab.set_link(1, false);
    let h1 = start(&lab, 1, "h1", &lab_config(&pki, "h1", &health("late")));
    lab.set_link(1, true);
    h0.wait_peer("h1", Duration::from_secs(20));
    h1.wait_peer("h0", Duration::from_secs(20));
    assert_eq!(answered_by(&call(&lab, 0, "late", &[])), "h1");
}

/// Whether a TCP connection from host `from` to `addr` succeeds (bash's /dev/tcp, 2 s bound).
fn tcp_reachable(lab: &Lab, from: usize, addr: &str) -> bool {
    let (ip, port) = addr.rsplit_once(':').expect("addr");
    let mut cmd = lab.exec_prefix(from);
    cmd.extend(["timeout", "2", "bash", "-c"].map(String::from));
    cmd.push(format!("exec 3<>/dev/tcp/{ip}/{port}"));
    Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .expect("bash")
        .success()
}

#[test]
fn the_gateway_admin_api_is_reachable_from_elsewhere_only_when_configured() {
    let lab = Lab::new(2);
    let pki = Pki::new();
    let gw_ip = lab.hosts[0].ip;
    let conf = pki.gateway_config("gw", "0.0.0.0:7400", "");
    let src = std::fs::read_to_string(&conf)
        .expect("conf")
        .replace("admin = \"127.0.0.1:0\"\n", "");
    std::fs::write(&conf, &src).expect("conf");
    let mut cmd = lab.exec_prefix(0);
    cmd.push(bin("mesh-gateway").display().to_string());
    let gw = NodeProc::start_cmd("gw", &cmd, &conf);
    // The default admin address, in the gateway's own namespace (no other process there).
    assert_eq!(gw.admin, Some("127.0.0.1:9480".parse().expect("addr")));
    assert!(
        tcp_reachable(&lab, 0, "127.0.0.1:9480"),
        "not reachable on its own loopback"
    );
    assert!(
        !tcp_reachable(&lab, 1, &format!("{gw_ip}:9480")),
        "reachable from another host by default"
    );
    drop(gw);

    // Configured to listen on every address: now it is.
    std::fs::write(
        &conf,
        src.replacen("[identity]", "admin = \"0.0.0.0:9480\"\n[identity]", 1),
    )
    .expect("conf");
    let gw = NodeProc::start_cmd("gw", &cmd, &conf);
    assert_eq!(gw.admin, Some("0.0.0.0:9480".parse().expect("addr")));
    assert!(tcp_reachable(&lab, 1, &format!("{gw_ip}:9480")));
}

#[test]
fn devices_on_other_hosts_enrol_with_join_tokens_and_join() {
    let lab = Lab::new(3);
    let pki = Pki::new();
    pki.issuer("gw");
    let gw_conf = pki.gateway_config(
        "gw",
        "0.0.0.0:7400",
        "[issuer]\ncert = \"issuer/issuer.crt\"\nkey = \"issuer/issuer.key\"\n",
    );
    let mut cmd = lab.exec_prefix(0);
    cmd.push(bin("mesh-gateway").display().to_string());
    let _gw = NodeProc::start_cmd("gw", &cmd, &gw_conf);
    let gateway = format!("{}:7400", lab.hosts[0].ip);
    let in_host = |i: usize, program: &str, args: &[&str]| {
        let mut cmd = lab.exec_prefix(i);
        cmd.push(bin(program).display().to_string());
        let out = Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(args)
            .output()
            .expect(program);
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (i, name) in [(1, "dev-1"), (2, "dev-2")] {
        let printed = in_host(
            0,
            "mesh-gateway",
            &[
                "token",
                "create",
                "--name",
                name,
                "--config",
                gw_conf.to_str().expect("path"),
            ],
        );
        let token = printed.lines().last().expect("token").trim().to_owned();
        let dir = pki.dir.path().join(name);
        let certs = dir.join("certs");
        let said = in_host(
            i,
            "mesh-node",
            &[
                "enroll",
                "--gateway",
                &gateway,
                "--token",
                &token,
                "--out",
                certs.to_str().expect("path"),
            ],
        );
        assert!(
            said.contains(&format!("enrolled as spiffe://starling.local/node/{name}")),
            "{said}"
        );
        eprintln!("{name} on host {i}: {}", said.trim());
        // It joins its gateway with what it wrote.
        let conf = pki.write_config(dir, name, &format!("gateway = \"{gateway}\"\n"));
        let src = std::fs::read_to_string(&conf).expect("config");
        let (top, rest) = src.split_once("[identity]").expect("identity");
        let gw_line = format!("gateway = \"{gateway}\"\n");
        let src = format!("{top}{gw_line}[identity]{}", rest.replace(&gw_line, ""))
            .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:7400\"");
        std::fs::write(&conf, src).expect("config");
        let node = start(&lab, i, name, &conf);
        node.wait_gateway(UP);
    }
}
