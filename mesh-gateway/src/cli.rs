//! The `mesh-gateway` command line. Exit codes: 0 success, 1 failure, 2 bad input.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use mesh_node::process::{init_logging, runtime, wait_for_signal};

use crate::config::GatewayConfig;

use crate::ca::Ca;

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
    /// Start a throw-away CA, gateway and three nodes on loopback, make calls, print what happened.
    Demo {
        /// Keep the mesh up after the calls, until Ctrl-C.
        #[arg(long)]
        keep_running: bool,
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
enum CaCommand {
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
        Command::Run { config } => run(&config),
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
                            "revocation of {} lifted: policy version {}",
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
        Command::Demo { keep_running } => {
            init_logging("error");
            match runtime().block_on(crate::demo::run(keep_running)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
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

/// One request to the admin API of the gateway running with config `path`: its bound address
/// from the lock file in its state folder (the configured one if it is not running), its token
/// from the token file. Answers the JSON body of a 200, or the error.
async fn admin_request(
    path: &Path,
    method: &str,
    uri: &str,
    body: String,
) -> Result<serde_json::Value, String> {
    let config = GatewayConfig::load(path).map_err(|e| e.to_string())?;
    let addr = mesh_node::state::read_lock_file(&config.node.state_dir)
        .and_then(|entries| entries.get("admin").and_then(|a| a.parse().ok()))
        .unwrap_or(config.admin);
    let token = std::fs::read_to_string(&config.admin_token_file).map_err(|e| {
        format!(
            "{}: the admin token: {e}",
            config.admin_token_file.display()
        )
    })?;
    let auth = format!("Bearer {}", token.trim());
    let (code, _, answer) = mesh_node::http::request(
        method,
        addr,
        uri,
        &[
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ],
        bytes::Bytes::from(body),
    )
    .await
    .map_err(|e| format!("cannot reach the gateway's admin API at {addr}: {e}"))?;
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

fn load(path: &Path) -> Result<(GatewayConfig, mesh_node::Identity), String> {
    let config = GatewayConfig::load(path).map_err(|e| e.to_string())?;
    let identity = config.node.load_identity().map_err(|e| e.to_string())?;
    Ok((config, identity))
}

fn check(path: &Path) -> Result<String, String> {
    let (config, _) = load(path)?;
    config.load_issuer().map_err(|e| e.to_string())?;
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
    init_logging(&config.node.log);
    runtime().block_on(async move {
        let gateway = match crate::Gateway::start(config, identity).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("cannot start: {e}");
                return ExitCode::FAILURE;
            }
        };
        wait_for_signal().await;
        tracing::info!("shutting down");
        gateway.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn ca(command: CaCommand) -> ExitCode {
    let result = match command {
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
