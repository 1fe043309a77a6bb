//! The policy bundle: TOML written by the operator, validated and versioned by the gateway, pushed to
//! every node, applied and saved by each (see `configs/policy.example.toml`).
//!
//! The same parser runs at both ends: the gateway refuses an invalid bundle before anything ships,
//! and a node refuses (nacks) one it cannot apply, e.g. one that needs a newer node.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_core::ServiceName;
use serde::Deserialize;
use toml::Spanned;

use crate::config::{ConfigError, SourceMap};

/// A validated policy bundle.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// The oldest node software that can apply this bundle.
    pub min_node_version: Option<(u32, u32, u32)>,
    /// Mesh-wide defaults.
    pub defaults: Defaults,
    /// Per-service settings.
    pub services: Vec<ServicePolicy>,
}

/// Mesh-wide defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Defaults {
    /// Deadline of a call that sets none (overrides the node's `limits.call_timeout_ms`).
    pub call_timeout: Option<Duration>,
}

/// Settings of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePolicy {
    /// The service.
    pub name: ServiceName,
    /// Deadline of its calls that set none.
    pub timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    min_node_version: Option<Spanned<String>>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDefaults {
    call_timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Spanned<String>,
    timeout_ms: Option<Spanned<u64>>,
}

impl Policy {
    /// Parses and validates bundle text; `file` names it in errors (`PUT /v1/policy` for a bundle
    /// that came over the API).
    pub fn parse(src: &str, file: &str) -> Result<Policy, ConfigError> {
        let at = SourceMap { src, file };
        let raw: RawPolicy = toml::from_str(src).map_err(|e| at.toml_error(&e))?;
        let min_node_version = raw
            .min_node_version
            .as_ref()
            .map(|v| {
                parse_version(v.get_ref())
                    .ok_or_else(|| at.invalid(v, "min_node_version", "not a version like 0.1.0"))
            })
            .transpose()?;
        let positive = |v: &Option<Spanned<u64>>,
                        key: &str|
         -> Result<Option<Duration>, ConfigError> {
            match v {
                Some(s) if *s.get_ref() == 0 => Err(at.invalid(s, key, "must be greater than 0")),
                Some(s) => Ok(Some(Duration::from_millis(*s.get_ref()))),
                None => Ok(None),
            }
        };
        let defaults = Defaults {
            call_timeout: positive(&raw.defaults.call_timeout_ms, "defaults.call_timeout_ms")?,
        };
        let mut services: Vec<ServicePolicy> = Vec::new();
        for (i, s) in raw.services.iter().enumerate() {
            let key = format!("services[{i}].name");
            let name = ServiceName::try_from(s.name.get_ref().as_str())
                .map_err(|e| at.invalid(&s.name, &key, e))?;
            if services.iter().any(|o| o.name == name) {
                return Err(at.invalid(&s.name, &key, format!("service {name} is listed twice")));
            }
            services.push(ServicePolicy {
                name,
                timeout: positive(&s.timeout_ms, &format!("services[{i}].timeout_ms"))?,
            });
        }
        Ok(Policy {
            min_node_version,
            defaults,
            services,
        })
    }

    /// Whether a node running `version` (this crate's, normally) can apply this bundle.
    pub fn check_applicable(&self, version: &str) -> Result<(), String> {
        let Some(min) = self.min_node_version else {
            return Ok(());
        };
        let have = parse_version(version)
            .ok_or_else(|| format!("cannot read this node's version {version:?}"))?;
        if have < min {
            return Err(format!(
                "bundle needs mesh-node >= {}.{}.{}, this node runs {version}",
                min.0, min.1, min.2
            ));
        }
        Ok(())
    }

    /// The deadline for a call to `service` that sets none, if the policy says one.
    pub fn timeout_for(&self, service: &str) -> Option<Duration> {
        self.services
            .iter()
            .find(|s| s.name.as_str() == service)
            .and_then(|s| s.timeout)
            .or(self.defaults.call_timeout)
    }
}

fn parse_version(s: &str) -> Option<(u32, u32, u32)> {
    let mut parts = s.trim().splitn(3, '.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().unwrap_or(Some(0))?,
    ))
}

/// The last good bundle a node keeps on disk, so it boots and serves under it while the gateway is
/// away: `<state_dir>/policy.toml`, written atomically (temp file, fsync, rename, fsync the folder),
/// with its version in the first line as a comment.
#[derive(Debug, Clone)]
pub struct PolicyStore {
    dir: PathBuf,
}

impl PolicyStore {
    /// A store in `dir` (created when first written).
    pub fn new(dir: &Path) -> Self {
        PolicyStore {
            dir: dir.to_owned(),
        }
    }

    /// The folder it writes into.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self) -> PathBuf {
        self.dir.join("policy.toml")
    }

    /// Saves bundle `version` atomically.
    pub fn save(&self, version: u64, toml: &str) -> std::io::Result<()> {
        use std::io::Write;
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(".policy.toml.tmp");
        {
            let mut f = std::fs::File::create(&tmp)?;
            writeln!(f, "# starling policy version {version}")?;
            f.write_all(toml.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path())?;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// The saved bundle, `(version, toml)`, if there is a readable one.
    pub fn load(&self) -> Option<(u64, String)> {
        let text = std::fs::read_to_string(self.path()).ok()?;
        let (first, rest) = text.split_once('\n')?;
        let version = first
            .strip_prefix("# starling policy version ")?
            .trim()
            .parse()
            .ok()?;
        Some((version, rest.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_answers_timeouts() {
        let p = Policy::parse(
            "min_node_version = \"0.1.0\"\n[defaults]\ncall_timeout_ms = 500\n[[services]]\nname = \"slow\"\ntimeout_ms = 9000\n",
            "policy.toml",
        )
        .expect("valid");
        assert_eq!(p.timeout_for("slow"), Some(Duration::from_secs(9)));
        assert_eq!(p.timeout_for("other"), Some(Duration::from_millis(500)));
        assert_eq!(p.check_applicable("0.1.0"), Ok(()));
    }

    #[test]
    fn errors_name_line_and_key() {
        let e =
            Policy::parse("[defaults]\ncall_timeout_ms = 0\n", "PUT /v1/policy").expect_err("zero");
        assert_eq!(
            e.to_string(),
            "PUT /v1/policy:2: defaults.call_timeout_ms: must be greater than 0"
        );
        let e = Policy::parse("[defaults]\ncolour = 1\n", "p.toml").expect_err("unknown");
        assert!(
            e.to_string()
                .starts_with("p.toml:2: defaults.colour: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn a_newer_bundle_is_refused_by_an_older_node() {
        let p = Policy::parse("min_node_version = \"99.0\"\n", "p").expect("valid");
        let e = p.check_applicable("0.1.0").expect_err("too old");
        assert_eq!(e, "bundle needs mesh-node >= 99.0.0, this node runs 0.1.0");
    }

    #[test]
    fn store_round_trips_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = PolicyStore::new(&dir.path().join("state"));
        assert_eq!(store.load(), None);
        store.save(3, "[defaults]\n").expect("save");
        assert_eq!(store.load(), Some((3, "[defaults]\n".to_owned())));
        store.save(4, "").expect("save");
        assert_eq!(store.load(), Some((4, String::new())));
        assert!(!dir.path().join("state/.policy.toml.tmp").exists());
    }
}
