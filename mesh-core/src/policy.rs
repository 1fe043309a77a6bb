//! The policy bundle: TOML written by the operator, validated and versioned by the gateway, pushed to
//! every node, applied and saved by each (see `configs/policy.example.toml`).
//!
//! The same parser runs at both ends: the gateway refuses an invalid bundle before anything ships,
//! and a node refuses (nacks) one it cannot apply, e.g. one that needs a newer node.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::ServiceName;
use crate::authz::{Authz, Effect, Mode, Rule, caller_pattern_problem};
use crate::balance::BalanceConfig;
use crate::route::Route;
use crate::source::{ConfigError, SourceMap};

/// A validated policy bundle.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Policy {
    /// The oldest node software that can apply this bundle.
    pub min_node_version: Option<(u32, u32, u32)>,
    /// Mesh-wide defaults.
    pub defaults: Defaults,
    /// Who may call what, checked at the callee.
    pub authz: Authz,
    /// Per-service settings.
    pub services: Vec<ServicePolicy>,
    /// Per-caller rate limits, checked at the callee.
    pub rate_limits: Vec<RateLimit>,
    /// Identities and certificates no node accepts, whatever their CA says (`mesh-gateway
    /// revoke` writes them; an operator may too).
    pub revoked: Vec<Revoked>,
}

/// One entry of the deny list: an identity (every certificate naming it), a certificate (by
/// serial number), or both (either matches).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// A SPIFFE ID, as text (`spiffe://td/node/node-7`).
    pub id: Option<String>,
    /// Certificate serial numbers, lowercase hex without leading zero bytes.
    pub serials: Vec<String>,
    /// Why, for the audit trail.
    pub reason: Option<String>,
}

impl Revoked {
    /// Whether this entry denies the certificate naming `id` with serial `serial` (hex).
    pub fn matches(&self, id: &str, serial: &str) -> bool {
        self.id.as_deref() == Some(id) || self.serials.iter().any(|s| s == serial)
    }
}

impl Policy {
    /// Whether `method` of `service` is marked idempotent (safe to repeat: a lost request or
    /// answer may be sent again).
    pub fn is_idempotent(&self, service: &str, method: &str) -> bool {
        self.services
            .iter()
            .find(|s| s.name.as_str() == service)
            .is_some_and(|s| s.idempotent.iter().any(|g| crate::authz::glob(g, method)))
    }

    /// The entry that revokes the certificate naming `id` with serial `serial` (hex), if any.
    pub fn revocation(&self, id: &str, serial: &str) -> Option<&Revoked> {
        self.revoked.iter().find(|r| r.matches(id, serial))
    }
}

/// A serial number as the deny list writes it: lowercase hex of its bytes, leading zero bytes
/// dropped (DER adds one to keep a number positive).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes[start..].iter().map(|b| format!("{b:02x}")).collect()
}

/// A token bucket per caller and service.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    /// Its name, in metrics.
    pub name: String,
    /// Glob on the service.
    pub service: String,
    /// Globs on the caller's SPIFFE ID; empty = every caller (each with its own bucket).
    pub callers: Vec<String>,
    /// Calls a second.
    pub per_second: f64,
    /// Calls saved up.
    pub burst: f64,
}

/// Retries of idempotent methods.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Extra load retries may add, as a share of calls (0.2 = 20%).
    pub budget: f64,
    /// Pause before a retry (doubled each time).
    pub backoff: Duration,
}

/// Mesh-wide defaults.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Defaults {
    /// Deadline of a call that sets none (overrides the node's `limits.call_timeout_ms`).
    pub call_timeout: Option<Duration>,
}

/// Settings of one service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServicePolicy {
    /// The service.
    pub name: ServiceName,
    /// Deadline of its calls that set none.
    pub timeout: Option<Duration>,
    /// Globs on the methods that may be retried (safe to repeat).
    pub idempotent: Vec<String>,
    /// Retries, if any.
    pub retry: Option<RetryPolicy>,
    /// Balancing and circuit breaking.
    pub balance: BalanceConfig,
    /// Routes, first match wins.
    pub routes: Vec<Route>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    min_node_version: Option<Spanned<String>>,
    #[serde(default)]
    defaults: RawDefaults,
    #[serde(default)]
    authorization: RawAuthz,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    rate_limits: Vec<RawRateLimit>,
    #[serde(default)]
    revoked: Vec<RawRevoked>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevoked {
    id: Option<Spanned<String>>,
    #[serde(default)]
    serials: Vec<Spanned<String>>,
    reason: Option<String>,
    /// When, seconds since the Unix epoch (information only).
    #[allow(dead_code)]
    at_unix: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawAuthz {
    default: Option<RawEffect>,
    mode: Option<RawMode>,
    #[serde(default)]
    rules: Vec<RawRule>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawEffect {
    Allow,
    Deny,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawMode {
    Enforce,
    Audit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Spanned<String>,
    effect: RawEffect,
    #[serde(default)]
    callers: Vec<String>,
    #[serde(default)]
    caller_labels: BTreeMap<String, String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    name: Spanned<String>,
    service: String,
    #[serde(default)]
    callers: Vec<String>,
    per_second: Spanned<f64>,
    burst: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Option<Spanned<u32>>,
    budget_percent: Option<Spanned<f64>>,
    backoff_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBreaker {
    failures: Option<Spanned<u32>>,
    eject_ms: Option<u64>,
    max_eject_ms: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBalance {
    prefer_zone: Option<bool>,
    max_in_flight: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Spanned<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    caller_labels: BTreeMap<String, String>,
    #[serde(default)]
    split: Vec<RawSplit>,
    #[serde(default)]
    sticky: bool,
    mirror: Option<RawMirror>,
    timeout_ms: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    #[serde(default)]
    subset: BTreeMap<String, String>,
    weight: Spanned<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirror {
    subset: BTreeMap<String, String>,
    percent: Spanned<f64>,
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
    #[serde(default)]
    idempotent: Vec<String>,
    retry: Option<RawRetry>,
    #[serde(default)]
    breaker: RawBreaker,
    #[serde(default)]
    balance: RawBalance,
    #[serde(default)]
    routes: Vec<RawRoute>,
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
            let retry = match &s.retry {
                None => None,
                Some(r) => Some(RetryPolicy {
                    attempts: match &r.attempts {
                        Some(a) if *a.get_ref() == 0 || *a.get_ref() > 10 => {
                            return Err(at.invalid(
                                a,
                                &format!("services[{i}].retry.attempts"),
                                "must be between 1 and 10",
                            ));
                        }
                        Some(a) => *a.get_ref(),
                        None => 3,
                    },
                    budget: match &r.budget_percent {
                        Some(b) if !(0.0..=100.0).contains(b.get_ref()) => {
                            return Err(at.invalid(
                                b,
                                &format!("services[{i}].retry.budget_percent"),
                                "must be between 0 and 100",
                            ));
                        }
                        Some(b) => *b.get_ref() / 100.0,
                        None => 0.2,
                    },
                    backoff: Duration::from_millis(r.backoff_ms.unwrap_or(5)),
                }),
            };
            let d = BalanceConfig::default();
            let balance = BalanceConfig {
                failures: match &s.breaker.failures {
                    Some(f) if *f.get_ref() == 0 => {
                        return Err(at.invalid(
                            f,
                            &format!("services[{i}].breaker.failures"),
                            "must be greater than 0",
                        ));
                    }
                    Some(f) => *f.get_ref(),
                    None => d.failures,
                },
                base_eject: s
                    .breaker
                    .eject_ms
                    .map_or(d.base_eject, Duration::from_millis),
                max_eject: s
                    .breaker
                    .max_eject_ms
                    .map_or(d.max_eject, Duration::from_millis),
                decay: d.decay,
                max_in_flight: match &s.balance.max_in_flight {
                    Some(m) if *m.get_ref() == 0 => {
                        return Err(at.invalid(
                            m,
                            &format!("services[{i}].balance.max_in_flight"),
                            "must be greater than 0",
                        ));
                    }
                    Some(m) => *m.get_ref(),
                    None => d.max_in_flight,
                },
                prefer_zone: s.balance.prefer_zone.unwrap_or(d.prefer_zone),
            };
            let mut routes: Vec<Route> = Vec::new();
            for (j, r) in s.routes.iter().enumerate() {
                let key = format!("services[{i}].routes[{j}]");
                if routes.iter().any(|o| &o.name == r.name.get_ref()) {
                    return Err(at.invalid(
                        &r.name,
                        &format!("{key}.name"),
                        "route names must be unique in a service",
                    ));
                }
                let total: u64 = r.split.iter().map(|s| u64::from(*s.weight.get_ref())).sum();
                if !r.split.is_empty() && total == 0 {
                    return Err(at.invalid(
                        &r.name,
                        &format!("{key}.split"),
                        "the weights add up to 0",
                    ));
                }
                let mirror = match &r.mirror {
                    Some(m) if !(0.0..=100.0).contains(m.percent.get_ref()) => {
                        return Err(at.invalid(
                            &m.percent,
                            &format!("{key}.mirror.percent"),
                            "must be between 0 and 100",
                        ));
                    }
                    Some(m) => Some((m.subset.clone(), *m.percent.get_ref())),
                    None => None,
                };
                routes.push(Route {
                    name: r.name.get_ref().clone(),
                    methods: r.methods.clone(),
                    metadata: r
                        .metadata
                        .iter()
                        .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                        .collect(),
                    caller_labels: r.caller_labels.clone(),
                    split: r
                        .split
                        .iter()
                        .map(|s| (s.subset.clone(), *s.weight.get_ref()))
                        .collect(),
                    sticky: r.sticky,
                    mirror,
                    timeout: positive(&r.timeout_ms, &format!("{key}.timeout_ms"))?,
                });
            }
            services.push(ServicePolicy {
                name,
                timeout: positive(&s.timeout_ms, &format!("services[{i}].timeout_ms"))?,
                idempotent: s.idempotent.clone(),
                retry,
                balance,
                routes,
            });
        }
        let mut rules: Vec<Rule> = Vec::new();
        for (i, r) in raw.authorization.rules.iter().enumerate() {
            if rules.iter().any(|o| &o.name == r.name.get_ref()) || r.name.get_ref() == "default" {
                return Err(at.invalid(
                    &r.name,
                    &format!("authorization.rules[{i}].name"),
                    "rule names must be unique and not \"default\"",
                ));
            }
            if let Some(problem) = r.callers.iter().find_map(|c| caller_pattern_problem(c)) {
                return Err(at.invalid(
                    &r.name,
                    &format!("authorization.rules[{i}].callers"),
                    problem,
                ));
            }
            rules.push(Rule {
                name: r.name.get_ref().clone(),
                effect: effect(r.effect),
                callers: r.callers.clone(),
                caller_labels: r.caller_labels.clone(),
                services: r.services.clone(),
                methods: r.methods.clone(),
            });
        }
        let authz = Authz {
            default: raw.authorization.default.map_or(Effect::Allow, effect),
            mode: match raw.authorization.mode {
                Some(RawMode::Audit) => Mode::Audit,
                _ => Mode::Enforce,
            },
            rules,
        };
        let mut rate_limits = Vec::new();
        for (i, r) in raw.rate_limits.iter().enumerate() {
            let per_second = *r.per_second.get_ref();
            if !(per_second > 0.0 && per_second.is_finite()) {
                return Err(at.invalid(
                    &r.per_second,
                    &format!("rate_limits[{i}].per_second"),
                    "must be a number greater than 0",
                ));
            }
            if let Some(burst) = r.burst
                && !(burst.is_finite() && burst >= 0.0)
            {
                return Err(at.invalid(
                    &r.per_second,
                    &format!("rate_limits[{i}].burst"),
                    "must be a finite number, 0 or more",
                ));
            }
            if let Some(problem) = r.callers.iter().find_map(|c| caller_pattern_problem(c)) {
                return Err(at.invalid(
                    &r.per_second,
                    &format!("rate_limits[{i}].callers"),
                    problem,
                ));
            }
            rate_limits.push(RateLimit {
                name: r.name.get_ref().clone(),
                service: r.service.clone(),
                callers: r.callers.clone(),
                per_second: *r.per_second.get_ref(),
                burst: r.burst.unwrap_or(*r.per_second.get_ref()).max(1.0),
            });
        }
        let mut revoked = Vec::new();
        for (i, r) in raw.revoked.iter().enumerate() {
            let key = format!("revoked[{i}]");
            let id = match &r.id {
                Some(id) => {
                    let parsed = crate::SpiffeId::parse(id.get_ref())
                        .map_err(|e| at.invalid(id, &format!("{key}.id"), e))?;
                    Some(parsed.to_string())
                }
                None => None,
            };
            let mut serials = Vec::new();
            for s in &r.serials {
                let text = s.get_ref().trim_start_matches("0x").to_ascii_lowercase();
                let hex_ok = !text.is_empty()
                    && text.len() <= 80
                    && text.len() % 2 == 0
                    && text.bytes().all(|b| b.is_ascii_hexdigit());
                if !hex_ok {
                    return Err(at.invalid(
                        s,
                        &format!("{key}.serials"),
                        "a serial number is an even number of hex digits (at most 40 bytes)",
                    ));
                }
                serials.push(text.trim_start_matches("00").to_owned());
            }
            if id.is_none() && serials.is_empty() {
                return Err(ConfigError::unplaced(
                    file,
                    &key,
                    "a revocation names an id, serials, or both",
                ));
            }
            revoked.push(Revoked {
                id,
                serials,
                reason: r.reason.clone(),
            });
        }
        Ok(Policy {
            min_node_version,
            defaults,
            authz,
            services,
            rate_limits,
            revoked,
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

    /// The settings of `service`, if the policy has any.
    pub fn service(&self, service: &str) -> Option<&ServicePolicy> {
        self.services.iter().find(|s| s.name.as_str() == service)
    }

    /// The index in `rate_limits` of the limit that applies to `caller` calling `service`, if any.
    pub fn rate_limit(&self, caller: &str, service: &str) -> Option<usize> {
        self.rate_limits.iter().position(|r| {
            crate::authz::glob(&r.service, service)
                && (r.callers.is_empty() || r.callers.iter().any(|c| crate::authz::glob(c, caller)))
        })
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

/// What a node does with a bundle its (certified, pinned) gateway offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// Take it: the node holds none, or an older version of the same epoch, or a bundle of
    /// another epoch (the gateway's state was rebuilt: its word resets the node).
    Apply,
    /// The node holds exactly this bundle already.
    Held,
    /// The node holds a newer version of the same epoch: keep it, say which.
    Older,
}

/// Decides an offer against what the node holds. Versions compare only within an epoch, so a
/// number alone never locks a node: a bundle of version 2^64-1 from elsewhere is replaced by the
/// gateway's next bundle of its own epoch.
pub fn judge_offer(
    held: Option<&mesh_proto::control::BundleRef>,
    offered: &mesh_proto::control::BundleRef,
) -> Offer {
    let Some(held) = held else {
        return Offer::Apply;
    };
    if held.epoch != offered.epoch {
        return Offer::Apply;
    }
    match offered.version.cmp(&held.version) {
        std::cmp::Ordering::Greater => Offer::Apply,
        std::cmp::Ordering::Equal if offered.hash == held.hash => Offer::Held,
        // Same number, other content: the gateway's word wins.
        std::cmp::Ordering::Equal => Offer::Apply,
        std::cmp::Ordering::Less => Offer::Older,
    }
}

fn effect(e: RawEffect) -> Effect {
    match e {
        RawEffect::Allow => Effect::Allow,
        RawEffect::Deny => Effect::Deny,
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
    fn offers_are_judged_by_epoch_then_version_then_hash() {
        use mesh_proto::control::BundleRef;
        let b = |epoch, version, h| BundleRef {
            epoch,
            version,
            hash: [h; 32],
        };
        assert_eq!(judge_offer(None, &b(1, 1, 0)), Offer::Apply);
        assert_eq!(judge_offer(Some(&b(1, 2, 0)), &b(1, 3, 1)), Offer::Apply);
        assert_eq!(judge_offer(Some(&b(1, 2, 0)), &b(1, 2, 0)), Offer::Held);
        assert_eq!(judge_offer(Some(&b(1, 2, 0)), &b(1, 2, 9)), Offer::Apply);
        assert_eq!(judge_offer(Some(&b(1, 5, 0)), &b(1, 4, 1)), Offer::Older);
        // A rogue's huge version in another epoch never locks the node out of its gateway's.
        assert_eq!(
            judge_offer(Some(&b(66, u64::MAX, 0)), &b(1, 1, 1)),
            Offer::Apply
        );
    }

    #[test]
    fn a_rate_that_is_not_a_number_is_refused() {
        for bad in ["nan", "inf", "-1.0", "0.0"] {
            let src =
                format!("[[rate_limits]]\nname = \"r\"\nservice = \"*\"\nper_second = {bad}\n");
            let e = Policy::parse(&src, "p.toml").expect_err(bad);
            assert!(
                e.to_string()
                    .starts_with("p.toml:4: rate_limits[0].per_second: must be a number"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_newer_bundle_is_refused_by_an_older_node() {
        let p = Policy::parse("min_node_version = \"99.0\"\n", "p").expect("valid");
        let e = p.check_applicable("0.1.0").expect_err("too old");
        assert_eq!(e, "bundle needs mesh-node >= 99.0.0, this node runs 0.1.0");
    }

    #[test]
    fn the_deny_list_matches_by_identity_or_serial_and_refuses_what_it_cannot_read() {
        let p = Policy::parse(
            "[authorization]\ndefault = \"allow\"\n[[revoked]]\nid = \"spiffe://td/node/n7\"\n\
             reason = \"stolen\"\n[[revoked]]\nserials = [\"00AB12\"]\n",
            "p.toml",
        )
        .expect("valid");
        assert!(p.revocation("spiffe://td/node/n7", "99").is_some());
        assert!(p.revocation("spiffe://td/node/n8", "ab12").is_some());
        assert!(p.revocation("spiffe://td/node/n8", "ab13").is_none());
        assert_eq!(serial_hex(&[0, 0xab, 0x12]), "ab12");
        let e = Policy::parse("[[revoked]]\nid = \"node-7\"\n", "p.toml").expect_err("id");
        assert!(e.to_string().starts_with("p.toml:2: revoked[0].id"), "{e}");
        let e = Policy::parse("[[revoked]]\nserials = [\"xyz\"]\n", "p.toml").expect_err("hex");
        assert!(e.to_string().contains("revoked[0].serials"), "{e}");
        let e = Policy::parse("[[revoked]]\nreason = \"x\"\n", "p.toml").expect_err("empty");
        assert!(
            e.to_string().contains("names an id, serials, or both"),
            "{e}"
        );
    }
}
