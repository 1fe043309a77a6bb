//! The command lines: exit codes and messages a user sees.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use starling_tests::{NodeProc, Pki, bin};

fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name)).args(args).output().expect("spawn")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn check(config: &Path) -> Output {
    run(
        "mesh-node",
        &["check-config", config.to_str().expect("utf-8 path")],
    )
}

#[test]
fn check_config_accepts_a_good_file() {
    let pki = Pki::new();
    let conf = pki.config("node-a", "");
    let out = check(&conf);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn config_errors_name_file_line_and_key_and_exit_2() {
    let pki = Pki::new();
    let conf = pki.config("node-a", "");
    let file = conf.display().to_string();
    let src = std::fs::read_to_string(&conf).expect("read");

    // Unknown key.
    let bad = src.replace("[identity]\n", "[identity]\npassword = \"x\"\n");
    std::fs::write(&conf, &bad).expect("write");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let line = line_of(&bad, "password =");
    assert!(
        err.contains(&format!(
            "{file}:{line}: identity.password: unknown field `password`"
        )),
        "{err}"
    );

    // Wrong type.
    let bad = format!("{src}[limits]\ncall_timeout_ms = \"soon\"\n");
    std::fs::write(&conf, &bad).expect("write");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let line = line_of(&bad, "call_timeout_ms =");
    assert!(
        err.contains(&format!(
            "{file}:{line}: limits.call_timeout_ms: invalid type"
        )),
        "{err}"
    );

    // `run` refuses the same file the same way, before touching the network.
    let out = run("mesh-node", &["run", "--config", &file]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("limits.call_timeout_ms"),
        "{}",
        stderr(&out)
    );

    // Missing file.
    let out = check(Path::new("/nonexistent/node.toml"));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("/nonexistent/node.toml: cannot read"),
        "{}",
        stderr(&out)
    );
}

/// The 1-based line of the first line of `src` that starts with `start`.
fn line_of(src: &str, start: &str) -> usize {
    src.lines()
        .position(|l| l.starts_with(start))
        .expect("line")
        + 1
}

#[test]
fn key_file_problems_are_named() {
    let pki = Pki::new();
    let conf = pki.config("node-a", "");
    let key = conf.parent().expect("dir").join("certs/node.key");
    let file = conf.display().to_string();

    // Readable by others: refused, like ssh does.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let line = line_of(&std::fs::read_to_string(&conf).expect("read"), "key =");
    assert!(
        err.contains(&format!("{file}:{line}: identity.key:")) && err.contains("mode 0644"),
        "{err}"
    );

    // Not a key at all.
    std::fs::remove_file(&key).expect("rm");
    std::fs::write(&key, "this is not a key\n").expect("write");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("identity.key") && err.contains("no PEM private key"),
        "{err}"
    );

    // A folder where the key should be: unreadable as a file.
    std::fs::remove_file(&key).expect("rm");
    std::fs::create_dir(&key).expect("mkdir");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("identity.key") && err.contains("is not a file"),
        "{err}"
    );

    // Gone.
    std::fs::remove_dir(&key).expect("rmdir");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("identity.key: cannot read") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn certificate_of_another_node_is_refused() {
    let pki = Pki::new();
    let conf = pki.config("node-a", "");
    let src = std::fs::read_to_string(&conf).expect("read");
    std::fs::write(&conf, src.replace("name = \"node-a\"", "name = \"node-z\"")).expect("write");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("identity.cert")
            && err.contains("certificate is for spiffe://starling.local/node/node-a"),
        "{err}"
    );
}

#[test]
fn ca_init_and_issue_write_private_keys_and_check_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = dir.path().join("ca");
    let out = run(
        "mesh-gateway",
        &[
            "ca",
            "init",
            "--trust-domain",
            "fleet.example",
            "--out",
            ca.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
    assert_eq!(mode(&ca.join("ca.key")), 0o600);

    let node = dir.path().join("n1");
    let out = run(
        "mesh-gateway",
        &[
            "ca",
            "issue",
            "--ca",
            ca.to_str().expect("utf-8"),
            "--name",
            "pump-3",
            "--out",
            node.to_str().expect("utf-8"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("spiffe://fleet.example/node/pump-3"));
    assert_eq!(mode(&node.join("node.key")), 0o600);
    assert!(node.join("node.crt").exists() && node.join("ca.crt").exists());
    let identity = mesh_node::Identity::load(
        &node.join("node.crt"),
        &node.join("node.key"),
        &node.join("ca.crt"),
    )
    .expect("identity");
    assert_eq!(
        identity.id.to_string(),
        "spiffe://fleet.example/node/pump-3"
    );

    let out = run(
        "mesh-gateway",
        &[
            "ca",
            "issue",
            "--ca",
            ca.to_str().expect("utf-8"),
            "--name",
            "a/b",
            "--out",
            dir.path().join("x").to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("name \"a/b\": name holds '/'"),
        "{}",
        stderr(&out)
    );

    // Certified labels: written into the certificate, read back by the node; bad ones refused.
    let labeled = dir.path().join("n2");
    let issue = |labels: &str, out: &Path| {
        run(
            "mesh-gateway",
            &[
                "ca",
                "issue",
                "--ca",
                ca.to_str().expect("utf-8"),
                "--name",
                "pump-4",
                "--out",
                out.to_str().expect("utf-8"),
                "--labels",
                labels,
            ],
        )
    };
    let out = issue("zone=hall-1,version=v1", &labeled);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("certified labels version=v1,zone=hall-1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let identity = mesh_node::Identity::load(
        &labeled.join("node.crt"),
        &labeled.join("node.key"),
        &labeled.join("ca.crt"),
    )
    .expect("identity");
    assert_eq!(
        identity.labels,
        [
            ("version".to_owned(), "v1".to_owned()),
            ("zone".to_owned(), "hall-1".to_owned())
        ]
        .into()
    );
    for (bad, says) in [
        ("zone", "\"zone\" is not key=value"),
        ("zone=a,zone=b", "label \"zone\" given twice"),
        ("zone=a b", "label \"zone\": value \"a b\""),
    ] {
        let out = issue(bad, &dir.path().join("bad"));
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(stderr(&out).contains(says), "{bad}: {}", stderr(&out));
        assert!(!dir.path().join("bad").exists(), "{bad} wrote files");
    }

    // The CA is never overwritten.
    let out = run(
        "mesh-gateway",
        &["ca", "init", "--out", ca.to_str().expect("utf-8")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("exists"), "{}", stderr(&out));
}

#[test]
fn mesh_node_call_prints_the_body_or_the_status() {
    let pki = Pki::new();
    let b = NodeProc::start(
        "node-b",
        &pki.config(
            "node-b",
            "[[services]]\nname = \"echo\"\nupstream = \"builtin:echo\"\n",
        ),
    );
    let a = NodeProc::start(
        "node-a",
        &pki.config("node-a", &format!("[[peers]]\naddr = \"{}\"\n", b.quic)),
    );
    a.wait_peer("node-b", Duration::from_secs(10));
    let ingress = a.ingress().to_string();

    let out = run(
        "mesh-node",
        &[
            "call",
            "echo",
            "say",
            "--data",
            "hello mesh",
            "--ingress",
            &ingress,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(out.stdout, b"hello mesh");

    let body = pki.dir.path().join("body.bin");
    std::fs::write(&body, [0u8, 1, 2, 255]).expect("write");
    let out = run(
        "mesh-node",
        &[
            "call",
            "echo",
            "say",
            "--data-file",
            body.to_str().expect("utf-8"),
            "--ingress",
            &ingress,
        ],
    );
    assert_eq!(out.stdout, [0u8, 1, 2, 255]);

    let out = run("mesh-node", &["call", "nosuch", "x", "--ingress", &ingress]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not_found (HTTP 404)"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_demo_runs_and_shows_what_happened() {
    let out = run("mesh-gateway", &["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", stderr(&out));
    assert!(
        stdout.contains("-> 200 ok  \"hello, starling\""),
        "{stdout}"
    );
    assert!(stdout.contains("404 not_found"), "{stdout}");
    assert!(
        stdout.contains("503 unavailable") && stdout.contains("not trusted"),
        "{stdout}"
    );
    assert!(
        stdout.contains("starling_requests_total{service=\"inventory\",method=\"list\",caller=\"node-c\",callee=\"\",status=\"not_found\"} 1"),
        "{stdout}"
    );
    assert!(stdout.contains("node-c   up=true policy v1"), "{stdout}");
    assert!(stdout.contains("Done: every node shut down"), "{stdout}");
}

#[test]
fn version_and_help() {
    for bin_name in ["mesh-node", "mesh-gateway"] {
        let out = run(bin_name, &["--version"]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(bin_name));
        let out = run(bin_name, &["--help"]);
        assert!(out.status.success());
    }
}

#[test]
fn a_fifo_as_a_config_file_is_refused_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("node.toml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let started = std::time::Instant::now();
    let out = check(&fifo);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("not a regular file"),
        "{}",
        stderr(&out)
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "it hung"
    );
}

#[test]
fn a_wrong_ca_file_is_reported_under_identity_ca() {
    let pki = Pki::new();
    let conf = pki.config("node-a", "");
    // Another mesh's CA beside this node's certificate.
    let other = Pki::new();
    std::fs::copy(
        other.dir.path().join("ca/ca.crt"),
        conf.parent().expect("dir").join("certs/ca.crt"),
    )
    .expect("copy");
    let out = check(&conf);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let line = line_of(&std::fs::read_to_string(&conf).expect("read"), "ca =");
    assert!(
        err.contains(&format!(
            ":{line}: identity.ca: the node certificate is not signed by this CA"
        )),
        "{err}"
    );
}

/// A gateway config from `configs/gateway.example.toml`, in `dir`, with the paths it names
/// made real (certificates from `ca issue`, the example policy beside it).
fn example_gateway(pki: &Pki, dir: &Path) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = run(
        "mesh-gateway",
        &[
            "ca",
            "issue",
            "--ca",
            pki.dir.path().join("ca").to_str().expect("path"),
            "--name",
            "gw",
            "--gateway",
            "--out",
            dir.join("certs").to_str().expect("path"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(
        "mesh-gateway",
        &[
            "ca",
            "issuer",
            "--ca",
            pki.dir.path().join("ca").to_str().expect("path"),
            "--name",
            "gw",
            "--out",
            dir.join("issuer").to_str().expect("path"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::copy(
        repo.join("configs/policy.example.toml"),
        dir.join("policy.example.toml"),
    )
    .expect("policy");
    let conf = dir.join("gateway.toml");
    let example =
        std::fs::read_to_string(repo.join("configs/gateway.example.toml")).expect("example");
    std::fs::write(
        &conf,
        example
            .replace("/var/lib/starling/audit.jsonl", "audit.jsonl")
            .replace("state_dir = \"/var/lib/starling\"", "state_dir = \"state\""),
    )
    .expect("conf");
    conf
}

/// The README's gateway section, step by step: `ca issue` writes what the example config names.
#[test]
fn the_readme_gateway_section_passes_its_first_check_config() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("gw");
    let conf = example_gateway(&pki, &dir);
    let out = run(
        "mesh-gateway",
        &["check-config", conf.to_str().expect("path")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).is_empty(),
        "a warning on loopback: {}",
        stderr(&out)
    );
    // The issuer's key readable by others: refused, with the line of the [issuer] section.
    let key = dir.join("issuer/issuer.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(
        "mesh-gateway",
        &["check-config", conf.to_str().expect("path")],
    );
    let src = std::fs::read_to_string(&conf).expect("conf");
    let line = line_of(&src, "cert = \"issuer/issuer.crt\"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(&format!("gateway.toml:{line}: issuer: "))
            && stderr(&out).contains("must be readable by its owner only"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_admin_address_off_loopback_warns_and_a_shared_token_file_is_refused() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("gw");
    let conf = example_gateway(&pki, &dir);
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(
        &conf,
        src.replace("admin = \"127.0.0.1:9480\"", "admin = \"0.0.0.0:0\"")
            .replace("listen = \"0.0.0.0:7400\"", "listen = \"127.0.0.1:0\""),
    )
    .expect("conf");
    let out = run(
        "mesh-gateway",
        &["check-config", conf.to_str().expect("path")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out)
            .contains("warning: the admin API listens on 0.0.0.0:0, reachable from the network"),
        "{}",
        stderr(&out)
    );
    // A token file others can read: the gateway refuses to start.
    let token = dir.join("admin.token");
    std::fs::write(&token, "0123456789abcdef\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(
        "mesh-gateway",
        &["run", "--config", conf.to_str().expect("path")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the admin token file has mode 0644"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn check_config_checks_the_cloud_section_and_its_secrets() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("gw");
    let conf = example_gateway(&pki, &dir);
    let src = std::fs::read_to_string(&conf).expect("conf");
    std::fs::write(dir.join("cloud.crt"), "cert").expect("cert");
    std::fs::write(dir.join("cloud.key"), "key").expect("key");
    std::fs::set_permissions(
        dir.join("cloud.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    std::fs::write(
        &conf,
        format!(
            "{src}\n[cloud]\nbroker = \"mqtts://broker.example:8883\"\ncert = \"cloud.crt\"\nkey = \"cloud.key\"\n"
        ),
    )
    .expect("conf");
    let out = run(
        "mesh-gateway",
        &["check-config", conf.to_str().expect("path")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(": cloud.key: ") && stderr(&out).contains("chmod 600"),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(
        dir.join("cloud.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    // Private now, but not a key: said with the file.
    let out = run(
        "mesh-gateway",
        &["check-config", conf.to_str().expect("path")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("[cloud]: key ") && stderr(&out).contains("cloud.key"),
        "{}",
        stderr(&out)
    );
    // A real certificate and key (and the broker's CA): good.
    let broker_ca =
        mesh_gateway::cloud::local::BrokerPki::new(&dir.join("broker-ca"), "ca").expect("ca");
    let (crt, key) = broker_ca.issue("gw", false).expect("issue");
    std::fs::copy(&crt, dir.join("cloud.crt")).expect("cert");
    std::fs::write(dir.join("cloud.key"), std::fs::read(&key).expect("key")).expect("key");
    let src = std::fs::read_to_string(&conf).expect("conf").replace(
        "key = \"cloud.key\"\n",
        &format!(
            "key = \"cloud.key\"\nca = \"{}\"\n",
            broker_ca.ca().display()
        ),
    );
    std::fs::write(&conf, src).expect("conf");
    let out = run(
        "mesh-gateway",
        &["check-config", conf.to_str().expect("path")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}
