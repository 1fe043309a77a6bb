//! The `mesh-gateway` command line. Exit codes: 0 success, 1 failure (for `status` and `nodes`:
//! something wrong), 2 bad input, 3 (`status`, `nodes`) the gateway cannot be reached.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mesh_node::process::{init_logging, runtime, stop_signal};

use crate::config::GatewayConfig;

use crate::ca::Ca;

/// Which gateway a read-only command asks: its config file, or its admin address.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct AdminArgs {
    /// The gateway's config file (its admin address and token file).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The gateway's admin API, `http://127.0.0.1:9480`.
    #[arg(long)]
    admin: Option<String>,
    /// The admin token's file, with --admin (needed when the admin API is not on loopback).
    #[arg(long, requires = "admin")]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    fn admin(&self) -> Result<crate::status::Admin, String> {
        match (&self.config, &self.admin) {
            (Some(config), _) => crate::status::Admin::from_config(config),
            (None, Some(url)) => crate::status::Admin::from_url(url, self.token_file.as_deref()),
            (None, None) => {
                Err("name the gateway: --config <gateway.toml> or --admin <url>".into())
            }
        }
    }
}

/// The Starling gateway: mesh CA, control plane, demo.
#[derive(Parser, Debug)]
#[command(name = "mesh-gateway", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Manage the mesh CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run the gateway until SIGINT or SIGTERM.
    Run {
        /// The gateway's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The site on one screen, what is wrong first: nodes down, policy refused, certificates
    /// about to expire, services without an endpoint, the cloud link; then nodes, the policy's
    /// rollout, services with their calls and failures. Exit 0 nothing wrong, 1 something wrong,
    /// 2 bad arguments, 3 the gateway cannot be reached.
    Status {
        #[command(flatten)]
        target: AdminArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The nodes: up or down, version, policy, certificate expiry, last seen. Exit 1 if one is
    /// down (2 bad arguments, 3 the gateway cannot be reached).
    Nodes {
        #[command(flatten)]
        target: AdminArgs,
        /// Print them as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a gateway config file, the credentials and the policy it names; exit 0 or 2.
    CheckConfig {
        /// The config file.
        config: PathBuf,
    },
    /// Revoke a node: every node refuses it and closes its connections within seconds (the
    /// deny list travels in the policy bundle). Asks the running gateway over its admin API.
    Revoke {
        /// The node's name.
        name: String,
        /// The running gateway's config file (for its admin address and token).
        #[arg(long, short)]
        config: PathBuf,
        /// Why, for the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Lift the revocation instead.
        #[arg(long)]
        lift: bool,
    },
    /// One-time join tokens for new devices (`mesh-node enroll --token`).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Named admin tokens for people and tools, so the policy history and audit log say who
    /// changed what (managed with the gateway's own token, from its config).
    AdminToken {
        #[command(subcommand)]
        command: AdminTokenCommand,
    },
    /// Operator keys for policy sent from the cloud, and bundles signed with them.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Read the cloud queue in a folder and exit 0 if it can be read (the gateway runs this in a
    /// child process before it opens its queue).
    #[command(hide = true)]
    CheckQueue {
        /// The queue's folder.
        dir: PathBuf,
    },
    /// Start a throw-away CA, gateway and three nodes on loopback, make calls, print what happened.
    Demo {
        /// Keep the mesh up after the calls, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
        /// Bridge the site to a local mosquitto (TLS, client certificates, an ACL) and show
        /// what the cloud receives, a signed policy sent down and a call from the cloud.
        #[arg(long)]
        cloud: bool,
    },
}

#[derive(Subcommand, Debug)]
enum PolicyCommand {
    /// The bundles the running gateway accepted, newest first: version, when, from where, by
    /// whom, hash.
    History {
        #[command(flatten)]
        target: AdminArgs,
    },
    /// What changed from version A to version B (lines removed `-`, added `+`), from the
    /// gateway's policy history.
    Diff {
        /// The older version.
        a: u64,
        /// The newer version.
        b: u64,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// What FILE would change if the running gateway took it (a dry run: nothing changes): the
    /// version it would get and the diff against the policy in force; exit 1 if it is refused.
    DryRun {
        /// The policy TOML.
        file: PathBuf,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Make the policy of VERSION (from the history) the one in force again: it becomes the next
    /// version, pushed to every node like any change. Needs the admin token.
    Rollback {
        /// The version to go back to.
        version: u64,
        #[command(flatten)]
        target: AdminArgs,
    },
    /// Make an Ed25519 operator key: `<out>.key` (mode 0600, keep it off the site) and
    /// `<out>.pub` (name it in the gateway's `[cloud] policy_signers`).
    Keygen {
        /// The path of the pair, without extension.
        #[arg(long)]
        out: PathBuf,
    },
    /// Sign a policy file for `<prefix>/policy/set`; prints the signed bundle (JSON). It is
    /// stamped with the time now: a gateway refuses one older than the newest it applied.
    Sign {
        /// The operator's private key (`policy keygen`, or `openssl genpkey -algorithm ed25519`).
        #[arg(long)]
        key: PathBuf,
        /// The site it is for: its `[cloud] topic_prefix` (default `starling/<td>/<gateway>`),
        /// or `*` for every site (then it can be brought to any of them).
        #[arg(long)]
        site: String,
        /// The policy TOML.
        policy: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Make a one-time join token for node NAME and print it (last line). It pins the mesh CA's
    /// fingerprint, so the device checks the gateway before it sends anything secret.
    Create {
        /// The node's name.
        #[arg(long)]
        name: String,
        /// Certified labels its certificate will carry, `key=value,...`.
        #[arg(long, default_value = "")]
        labels: String,
        /// How long the token may be used: `90s`, `30m`, `1h`, `2d`.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// The running gateway's config file (for its admin address and token).
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AdminTokenCommand {
    /// Make an admin token named NAME and print it (last line, shown once: only its hash is kept).
    Create {
        /// Who will use it: `alice`, `ci` (a-z, 0-9, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// The running gateway's config file (for its admin address and own token).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// List the named admin tokens.
    List {
        /// The running gateway's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Revoke the admin token named NAME: it stops working at once.
    Revoke {
        /// Its name.
        #[arg(long)]
        name: String,
        /// The running gateway's config file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum RotateCommand {
    /// Step 1: write a trust bundle with the old root and the new one (`ca init` made it), and
    /// print the steps that follow.
    Bundle {
        /// The old root's certificate (or the bundle in use).
        #[arg(long)]
        old: PathBuf,
        /// The new root's certificate.
        #[arg(long)]
        new: PathBuf,
        /// Where to write the bundle (the gateway's `[identity] ca` file, typically).
        #[arg(long)]
        out: PathBuf,
    },
    /// Step 3: which nodes are under the new root yet (exit 0 when all are).
    Status {
        /// The running gateway's config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The new root's certificate.
        #[arg(long)]
        new: PathBuf,
    },
    /// Step 4: write a trust bundle of the new root only.
    Finish {
        /// The new root's certificate.
        #[arg(long)]
        new: PathBuf,
        /// Where to write the bundle.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CaCommand {
    /// Move the mesh to a new root CA without a failed call: `bundle`, then `status`, then
    /// `finish` (each prints what to do next).
    Rotate {
        #[command(subcommand)]
        command: RotateCommand,
    },
    /// Make a site issuer for gateway NAME under the root CA: writes OUT/issuer.crt,
    /// OUT/issuer.key (0600) and OUT/ca.crt (the roots), named in the gateway's `[issuer]`
    /// section. The gateway issues node certificates with it (enrolment, renewal); the root's
    /// key stays offline.
    Issuer {
        /// The root CA folder (with ca.crt and ca.key).
        #[arg(long)]
        ca: PathBuf,
        /// The gateway's name.
        #[arg(long)]
        name: String,
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Days the issuer is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Make a new CA: writes OUT/ca.crt and OUT/ca.key (mode 0600).
    Init {
        /// The mesh's trust domain.
        #[arg(long, default_value = "starling.local")]
        trust_domain: String,
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Issue a node's (or with --gateway a gateway's) certificate: writes OUT/node.crt,
    /// OUT/node.key (0600) and OUT/ca.crt.
    Issue {
        /// The CA folder (with ca.crt and ca.key).
        #[arg(long, required_unless_present = "issuer", conflicts_with = "issuer")]
        ca: Option<PathBuf>,
        /// Issue with a site issuer instead: the folder `ca issuer` wrote (issuer.crt,
        /// issuer.key, ca.crt). The node's certificate file then holds its chain.
        #[arg(long)]
        issuer: Option<PathBuf>,
        /// The node's name: 1-63 letters, digits, '-', '_' or '.'.
        #[arg(long)]
        name: String,
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Make a gateway's certificate (`spiffe://<td>/gateway/<name>`): the only identity
        /// nodes take policy, the registry and renewals from.
        #[arg(long)]
        gateway: bool,
        /// Certified labels, `key=value,...` (e.g. `zone=hall-1,version=v1`): the labels
        /// authorization rules and traffic subsets match. A node's `[labels]` config is display.
        #[arg(long, default_value = "")]
        labels: String,
    },
}

/// Parses the arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Ca { command } => ca(command),
        Command::Run { config } => {
            // The cloud queue is read first in a child process of this binary.
            if let Ok(exe) = std::env::current_exe() {
                crate::cloud::set_queue_checker(exe);
            }
            run(&config)
        }
        Command::CheckQueue { dir } => match crate::cloud::queue::Queue::check(&dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Status { target, json } => {
            runtime().block_on(crate::status::run(target.admin(), json, false))
        }
        Command::Nodes { target, json } => {
            runtime().block_on(crate::status::run(target.admin(), json, true))
        }
        Command::CheckConfig { config } => match check(&config) {
            Ok(summary) => {
                println!("{}: ok ({summary})", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Revoke {
            name,
            config,
            reason,
            lift,
        } => {
            let (method, path, body) = if lift {
                ("DELETE", format!("/v1/revocations/{name}"), String::new())
            } else {
                (
                    "POST",
                    "/v1/revocations".to_owned(),
                    serde_json::json!({ "name": name, "reason": reason }).to_string(),
                )
            };
            match runtime().block_on(admin_request(&config, method, &path, body)) {
                Ok(answer) => {
                    if lift {
                        println!(
                            "revocation of {} lifted: policy version {}; the certificates it had \
                             stay revoked by serial, so the node comes back with a new one \
                             (mesh-node enroll, or ca issue)",
                            answer["lifted"].as_str().unwrap_or(&name),
                            answer["version"]
                        );
                    } else {
                        println!(
                            "{} revoked (serials {}): policy version {} carries it to every node",
                            answer["revoked"].as_str().unwrap_or(&name),
                            answer["serials"],
                            answer["version"]
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token {
            command:
                TokenCommand::Create {
                    name,
                    labels,
                    ttl,
                    config,
                },
        } => {
            let Some(ttl_s) = parse_duration(&ttl) else {
                eprintln!("error: --ttl {ttl:?}: expected a duration such as 90s, 30m, 1h or 2d");
                return ExitCode::from(2);
            };
            let body = serde_json::json!({ "name": name, "labels": labels, "ttl_s": ttl_s });
            match runtime().block_on(admin_request(
                &config,
                "POST",
                "/v1/tokens",
                body.to_string(),
            )) {
                Ok(answer) => {
                    println!(
                        "join token for {}, valid until unix time {} (once):",
                        answer["id"].as_str().unwrap_or(&name),
                        answer["expires_unix"]
                    );
                    println!("{}", answer["token"].as_str().unwrap_or(""));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::AdminToken { command } => {
            let (config, method, uri, body) = match &command {
                AdminTokenCommand::Create { name, config } => (
                    config,
                    "POST",
                    "/v1/admin-tokens".to_owned(),
                    serde_json::json!({ "name": name }).to_string(),
                ),
                AdminTokenCommand::List { config } => {
                    (config, "GET", "/v1/admin-tokens".to_owned(), String::new())
                }
                AdminTokenCommand::Revoke { name, config } => (
                    config,
                    "DELETE",
                    format!("/v1/admin-tokens/{name}"),
                    String::new(),
                ),
            };
            match runtime().block_on(admin_request(config, method, &uri, body)) {
                Ok(answer) => {
                    match command {
                        AdminTokenCommand::Create { name, .. } => {
                            println!("admin token for {name} (shown once):");
                            println!("{}", answer["token"].as_str().unwrap_or(""));
                        }
                        AdminTokenCommand::List { .. } => {
                            if let Some(why) = answer["damaged"].as_str() {
                                println!("named tokens are off: {}", crate::status::printable(why));
                            }
                            for t in answer["tokens"].as_array().into_iter().flatten() {
                                let text = |v: &serde_json::Value| {
                                    crate::status::printable(v.as_str().unwrap_or(""))
                                };
                                println!(
                                    "{:<24} created {} by {}",
                                    text(&t["name"]),
                                    crate::status::utc(t["created_unix"].as_u64().unwrap_or(0)),
                                    text(&t["created_by"])
                                );
                            }
                        }
                        AdminTokenCommand::Revoke { name, .. } => println!("revoked {name}"),
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Policy { command } => match policy(command) {
            Ok(out) => {
                println!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo {
            keep_running,
            cloud,
        } => {
            init_logging("error", mesh_node::process::LogFormat::Text);
            match runtime().block_on(crate::demo::run(keep_running, cloud)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

const ROTATION_STEPS: &str = "\
The steps of a root rotation (nodes keep serving throughout):
  1. mesh-gateway ca rotate bundle --old OLD/ca.crt --new NEW/ca.crt --out BUNDLE
     Point the gateway's [identity] ca at BUNDLE and restart it: every node takes the bundle on
     its control stream (and trusts both roots).
  2. mesh-gateway ca issuer --ca NEW --name GW --out GW/issuer-new
     mesh-gateway ca issue --ca NEW --gateway --name GW --out GW/certs-new
     Point [issuer] and [identity] cert/key at them (keep ca = BUNDLE) and restart the gateway:
     renewals now come from the new root; nodes move within one certificate lifetime.
  3. mesh-gateway ca rotate status --config GW/gateway.toml --new NEW/ca.crt
     until every node is under the new root (nodes issued by hand: re-issue or enrol them).
  4. mesh-gateway ca rotate finish --new NEW/ca.crt --out BUNDLE, and restart the gateway: the
     old root is gone from every node (a node still under it refuses the bundle and says why).
";

fn read_roots(path: &Path) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let roots: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not PEM: {e:?}", path.display()))?;
    if roots.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    for r in &roots {
        mesh_node::identity::trust_domain_of_ca(r)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .ok_or_else(|| format!("{}: a root without spiffe://<trust-domain>", path.display()))?;
    }
    Ok(roots)
}

fn rotate(command: RotateCommand) -> ExitCode {
    let result: Result<bool, String> = (|| match command {
        RotateCommand::Bundle { old, new, out } => {
            let mut roots = read_roots(&old)?;
            let fresh = read_roots(&new)?;
            let td = |r: &rustls_pki_types::CertificateDer<'static>| {
                mesh_node::identity::trust_domain_of_ca(r).ok().flatten()
            };
            if td(&roots[0]) != td(&fresh[0]) {
                return Err(format!(
                    "the new root is for {:?}, the old one for {:?}: a rotation keeps the trust domain",
                    td(&fresh[0]),
                    td(&roots[0])
                ));
            }
            let mut text = std::fs::read_to_string(&old).map_err(|e| e.to_string())?;
            if fresh.iter().any(|r| !roots.contains(r)) {
                if !text.ends_with('\n') {
                    text.push('\n');
                }
                text += &std::fs::read_to_string(&new).map_err(|e| e.to_string())?;
                roots.extend(fresh);
            }
            mesh_node::state::write_atomic(&out, text.as_bytes(), 0o644)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "{}: a trust bundle of {} roots\n\n{ROTATION_STEPS}",
                out.display(),
                roots.len()
            );
            Ok(true)
        }
        RotateCommand::Finish { new, out } => {
            let roots = read_roots(&new)?;
            let text = std::fs::read_to_string(&new).map_err(|e| e.to_string())?;
            mesh_node::state::write_atomic(&out, text.as_bytes(), 0o644)
                .map_err(|e| format!("{}: {e}", out.display()))?;
            println!(
                "{}: a trust bundle of the new root only ({} certificate); restart the gateway",
                out.display(),
                roots.len()
            );
            Ok(true)
        }
        RotateCommand::Status { config, new } => {
            let roots = read_roots(&new)?;
            let key_id = mesh_node::identity::subject_key_id(&roots[0])
                .ok_or("the new root has no subject key identifier")?;
            let nodes =
                runtime().block_on(admin_request(&config, "GET", "/v1/nodes", String::new()))?;
            let mut behind = Vec::new();
            for n in nodes["nodes"].as_array().into_iter().flatten() {
                let name = n["name"].as_str().unwrap_or("?");
                let root = n["certificate"]["root"].as_str();
                let under = root == Some(key_id.as_str());
                println!("{name:<24} {}", if under { "new root" } else { "old root" });
                if !under {
                    behind.push(name.to_owned());
                }
            }
            if behind.is_empty() {
                println!("every node is under the new root: step 4 (ca rotate finish) is safe");
                Ok(true)
            } else {
                println!(
                    "{} node(s) not under the new root yet: {}",
                    behind.len(),
                    behind.join(", ")
                );
                Ok(false)
            }
        }
    })();
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `90s`, `30m`, `1h`, `2d` (or plain seconds) in seconds.
fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(scale).filter(|s| *s > 0)
}

/// One request to the admin API of the gateway running with config `path` (found as
/// [`crate::status::Admin::from_config`] finds it), with its token. Answers the JSON body of a 200,
/// or the error.
async fn admin_request(
    path: &Path,
    method: &str,
    uri: &str,
    body: String,
) -> Result<serde_json::Value, String> {
    let admin = crate::status::Admin::from_config(path)?;
    if admin.token.is_none() {
        let config = GatewayConfig::load(path).map_err(|e| e.to_string())?;
        return Err(format!(
            "{}: the admin token cannot be read",
            config.admin_token_file.display()
        ));
    }
    let (code, answer) = admin.request(method, uri, bytes::Bytes::from(body)).await?;
    let value: serde_json::Value = serde_json::from_slice(&answer)
        .unwrap_or_else(|_| serde_json::json!({ "error": String::from_utf8_lossy(&answer) }));
    if code != 200 {
        return Err(format!(
            "the gateway answered HTTP {code}: {}",
            value["error"].as_str().unwrap_or("")
        ));
    }
    Ok(value)
}

fn policy(command: PolicyCommand) -> Result<String, String> {
    use crate::cloud::signing;
    match command {
        PolicyCommand::History { target } => {
            let admin = target.admin()?;
            let history = runtime().block_on(admin.get_json("/v1/policy/history"))?;
            let mut out = format!(
                "{:>8}  {:<20}  {:<10}  {:<30}  {:<16}  epoch",
                "version", "accepted (UTC)", "source", "author", "hash"
            );
            for e in history["entries"].as_array().into_iter().flatten() {
                let hash: String = e["hash"].as_str().unwrap_or("?").chars().take(16).collect();
                out.push_str(&format!(
                    "\n{:>8}  {:<20}  {:<10}  {:<30}  {:<16}  {}",
                    e["version"].as_u64().unwrap_or(0),
                    crate::status::utc(e["at_unix"].as_u64().unwrap_or(0)),
                    crate::status::printable(e["source"].as_str().unwrap_or("?")),
                    crate::status::printable(e["author"].as_str().unwrap_or("?")),
                    hash,
                    e["epoch"].as_u64().unwrap_or(0),
                ));
            }
            Ok(out)
        }
        PolicyCommand::Diff { a, b, target } => {
            let admin = target.admin()?;
            let text = |v: u64| -> Result<String, String> {
                let entry =
                    runtime().block_on(admin.get_json(&format!("/v1/policy/history/{v}")))?;
                Ok(entry["policy"].as_str().unwrap_or("").to_owned())
            };
            let (old, new) = (text(a)?, text(b)?);
            let mut out = format!("--- version {a}\n+++ version {b}");
            for line in crate::policy_history::diff(&old, &new) {
                out.push('\n');
                out.push_str(&line);
            }
            Ok(out)
        }
        PolicyCommand::DryRun { file, target } => {
            let admin = target.admin()?;
            let text = mesh_node::config::read_regular_file(&file)
                .map_err(|e| format!("{}: {e}", file.display()))?;
            let (code, body) = runtime().block_on(admin.request(
                "PUT",
                "/v1/policy?dry_run=1",
                bytes::Bytes::from(text),
            ))?;
            let run: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if code != 200 {
                return Err(format!(
                    "the gateway would refuse it: {}",
                    run["error"].as_str().unwrap_or("")
                ));
            }
            if run["changed"] != true {
                return Ok(format!(
                    "no change: it is the policy in force (version {})",
                    run["version"]
                ));
            }
            let mut out = format!("it would be version {}:", run["version"]);
            for line in run["diff"].as_array().into_iter().flatten() {
                out.push('\n');
                out.push_str(line.as_str().unwrap_or(""));
            }
            Ok(out)
        }
        PolicyCommand::Rollback { version, target } => {
            let admin = target.admin()?;
            let rt = runtime();
            let entry = rt.block_on(admin.get_json(&format!("/v1/policy/history/{version}")))?;
            let text = entry["policy"].as_str().unwrap_or("").to_owned();
            let (code, body) =
                rt.block_on(admin.request("PUT", "/v1/policy", bytes::Bytes::from(text)))?;
            let answer: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if code != 200 {
                return Err(format!(
                    "the gateway refused the rollback (HTTP {code}): {}",
                    answer["error"].as_str().unwrap_or("")
                ));
            }
            Ok(format!(
                "the policy of version {version} is in force again as version {}",
                answer["version"]
            ))
        }
        PolicyCommand::Keygen { out } => {
            let id = signing::generate(&out).map_err(|e| e.to_string())?;
            Ok(format!(
                "key {id}: private {} (mode 0600), public {}",
                out.with_extension("key").display(),
                out.with_extension("pub").display()
            ))
        }
        PolicyCommand::Sign { key, site, policy } => {
            let text = mesh_node::config::read_regular_file(&policy)
                .map_err(|e| format!("{}: {e}", policy.display()))?;
            mesh_core::policy::Policy::parse(&text, &policy.display().to_string())
                .map_err(|e| e.to_string())?;
            let signed = signing::sign(&key, &site, &text, crate::cloud::unix_ms())
                .map_err(|e| e.to_string())?;
            serde_json::to_string(&signed).map_err(|e| e.to_string())
        }
    }
}

fn load(path: &Path) -> Result<(GatewayConfig, mesh_node::Identity), String> {
    let config = GatewayConfig::load(path).map_err(|e| e.to_string())?;
    let identity = config.node.load_identity().map_err(|e| e.to_string())?;
    Ok((config, identity))
}

fn check(path: &Path) -> Result<String, String> {
    let (config, _) = load(path)?;
    config.load_issuer().map_err(|e| e.to_string())?;
    config.check_cloud_files().map_err(|e| e.to_string())?;
    if let Some(cloud) = &config.cloud {
        crate::cloud::Bridge::check(cloud, &config.node.file)?;
    }
    config.check_otlp_files().map_err(|e| e.to_string())?;
    if let Some(otlp) = &config.otlp {
        crate::otlp::Exporter::check(otlp, &config.node.file)?;
    }
    if let Some(policy) = &config.policy {
        let text = mesh_node::config::read_regular_file(&policy.value).map_err(|e| {
            format!(
                "{}:{}: policy: cannot read {}: {e}",
                config.node.file,
                policy.line,
                policy.value.display()
            )
        })?;
        mesh_core::policy::Policy::parse(&text, &policy.value.display().to_string())
            .map_err(|e| e.to_string())?;
    }
    if let Some(warning) = config.admin_warning() {
        eprintln!("warning: {warning}");
    }
    Ok(format!(
        "gateway {}, admin on {}",
        config.node.name, config.admin
    ))
}

fn run(path: &Path) -> ExitCode {
    let (config, identity) = match load(path) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(&config.node.log, config.node.log_format);
    runtime().block_on(async move {
        let stop = stop_signal();
        let gateway = match crate::Gateway::start(config, identity).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        mesh_node::process::notify_ready_and_watch();
        stop.await;
        tracing::info!("shutting down");
        mesh_node::process::notify("STOPPING=1");
        gateway.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn ca(command: CaCommand) -> ExitCode {
    let result = match command {
        CaCommand::Rotate { command } => return rotate(command),
        CaCommand::Init { trust_domain, out } => Ca::generate(&trust_domain).and_then(|ca| {
            ca.save(&out)?;
            println!(
                "CA for spiffe://{trust_domain} written to {}/ca.crt and ca.key (0600)",
                out.display()
            );
            Ok(())
        }),
        CaCommand::Issuer {
            ca,
            name,
            out,
            days,
        } => Ca::load(&ca).and_then(|ca| {
            let issued = ca.issue_issuer(&name, days)?;
            std::fs::create_dir_all(&out).map_err(|source| crate::ca::CaError::Io {
                path: out.clone(),
                source,
            })?;
            crate::ca::write_new(&out.join("issuer.key"), issued.key_pem.as_bytes(), 0o600)?;
            crate::ca::write_new(&out.join("issuer.crt"), issued.cert_pem.as_bytes(), 0o644)?;
            crate::ca::write_new(&out.join("ca.crt"), ca.bundle_pem().as_bytes(), 0o644)?;
            println!(
                "site issuer {name} of spiffe://{} for {days} days: {}/issuer.crt, issuer.key \
                 (0600), ca.crt; name them in the gateway's [issuer] section",
                ca.trust_domain(),
                out.display()
            );
            Ok(())
        }),
        CaCommand::Issue {
            ca,
            issuer,
            name,
            out,
            days,
            gateway,
            labels,
        } => match (ca, issuer) {
            (Some(ca), _) => Ca::load(&ca),
            (None, Some(dir)) => Ca::load_issuer(
                &dir.join("issuer.crt"),
                &dir.join("issuer.key"),
                &dir.join("ca.crt"),
            ),
            (None, None) => Err(crate::ca::CaError::Name("--ca or --issuer".into())),
        }
        .and_then(|ca| {
            let labels = mesh_core::labels::parse_list(&labels)
                .map_err(|e| crate::ca::CaError::Name(format!("--labels: {e}")))?;
            let issued = if gateway {
                if !labels.is_empty() {
                    return Err(crate::ca::CaError::Name(
                        "--labels: a gateway's certificate carries no labels".into(),
                    ));
                }
                ca.issue_gateway(&name, days)?
            } else {
                ca.issue_node_labeled(&name, days, &labels)?
            };
            issued.save(&out, ca.bundle_pem())?;
            let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!(
                "{} issued for {days} days{}: {}/node.crt, node.key (0600), ca.crt",
                issued.id,
                if shown.is_empty() {
                    String::new()
                } else {
                    format!(" with certified labels {}", shown.join(","))
                },
                out.display()
            );
            Ok(())
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
