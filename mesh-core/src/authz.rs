//! Authorization at the callee: who may call which service and method.
//!
//! Rules are checked in order; the first whose caller, caller labels, service and method all match
//! decides. No match: the mesh-wide default. In `audit` mode a deny is recorded but the call goes
//! through, so a policy can be tried on live traffic before it is enforced.

use std::collections::BTreeMap;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Let the call through.
    Allow,
    /// Refuse it with PermissionDenied.
    Deny,
}

/// Enforce the decisions, or only record what would have been denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Denials refuse calls.
    Enforce,
    /// Denials are recorded; calls go through.
    Audit,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Its name, in audit events and metrics.
    pub name: String,
    /// What it decides.
    pub effect: Effect,
    /// Globs on the caller's SPIFFE ID; empty matches any caller.
    pub callers: Vec<String>,
    /// Labels the caller must carry (all of them); empty matches any.
    pub caller_labels: BTreeMap<String, String>,
    /// Globs on the service; empty matches any.
    pub services: Vec<String>,
    /// Globs on the method; empty matches any.
    pub methods: Vec<String>,
}

/// The authorization part of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authz {
    /// What happens when no rule matches.
    pub default: Effect,
    /// Enforce or audit.
    pub mode: Mode,
    /// Rules, first match wins.
    pub rules: Vec<Rule>,
}

impl Default for Authz {
    fn default() -> Self {
        Authz {
            default: Effect::Allow,
            mode: Mode::Enforce,
            rules: Vec::new(),
        }
    }
}

/// What the callee does with a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the call goes through.
    pub allow: bool,
    /// The decision was a deny (enforced, or let through in audit mode): record it.
    pub denied: bool,
    /// The rule that decided, or `default`.
    pub rule: String,
}

impl Authz {
    /// Decides a call from `caller` (with its `labels`) to `service.method`.
    pub fn decide(
        &self,
        caller: &str,
        labels: &BTreeMap<String, String>,
        service: &str,
        method: &str,
    ) -> Verdict {
        let found = self.rules.iter().find(|r| {
            any_glob(&r.callers, caller)
                && r.caller_labels
                    .iter()
                    .all(|(k, v)| labels.get(k) == Some(v))
                && any_glob(&r.services, service)
                && any_glob(&r.methods, method)
        });
        let (effect, rule) = match found {
            Some(r) => (r.effect, r.name.clone()),
            None => (self.default, "default".to_owned()),
        };
        let denied = effect == Effect::Deny;
        Verdict {
            allow: !denied || self.mode == Mode::Audit,
            denied,
            rule,
        }
    }
}

fn any_glob(patterns: &[String], text: &str) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| glob(p, text))
}

/// A glob, matched per path segment: `*` matches any run of characters within one segment (never
/// a `/`), `**` matches any run including `/`, everything else matches itself; a pattern of just
/// `*` matches anything. So `spiffe://td/node/gw*` matches `spiffe://td/node/gw-2`, never
/// `spiffe://td/node/gw/leaf/x`; `spiffe://td/**` matches every identity of the trust domain.
pub fn glob(pattern: &str, text: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // Two stars at most (the usual `gw-*`, `spiffe://td/**`, `a*b*`): backtracking, at most
    // quadratic. More: a table, linear in pattern times text. Backtracking over several stars is
    // exponential, and the text (a method name, a caller's identity) is the caller's to choose.
    if p.iter().filter(|&&c| c == b'*').count() <= 2 {
        glob_at(p, t)
    } else {
        glob_table(p, t)
    }
}

/// [`glob`] as a table: `rows[i][j]` says whether the pattern from position `i` matches the text
/// from `j`, filled from the ends. A star either stops matching here or takes one more character
/// (`*` never a `/`), so each cell reads two others.
fn glob_table(p: &[u8], t: &[u8]) -> bool {
    let width = t.len() + 1;
    let mut rows = vec![false; (p.len() + 2) * width];
    let at = |i: usize, j: usize| i * width + j;
    rows[at(p.len(), t.len())] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            let here = if p[i] == b'*' && p.get(i + 1) == Some(&b'*') {
                rows[at(i + 2, j)] || (j < t.len() && rows[at(i, j + 1)])
            } else if p[i] == b'*' {
                rows[at(i + 1, j)] || (j < t.len() && t[j] != b'/' && rows[at(i, j + 1)])
            } else {
                t.get(j) == Some(&p[i]) && rows[at(i + 1, j + 1)]
            };
            rows[at(i, j)] = here;
        }
    }
    rows[0]
}

fn glob_at(p: &[u8], t: &[u8]) -> bool {
    match p {
        [] => t.is_empty(),
        [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| glob_at(rest, &t[i..])),
        [b'*', rest @ ..] => {
            // Within the segment: as many characters as come before the next `/`.
            let segment = t.iter().position(|&c| c == b'/').unwrap_or(t.len());
            (0..=segment).any(|i| glob_at(rest, &t[i..]))
        }
        [c, rest @ ..] => t.first() == Some(c) && glob_at(rest, &t[1..]),
    }
}

/// Why a caller pattern can match no identity the mesh issues, if it cannot: `*` stops at `/`,
/// so `spiffe://td/*` (one segment) matches nothing; say `spiffe://td/node/*`, or `**`.
pub fn caller_pattern_problem(pattern: &str) -> Option<String> {
    let path = pattern
        .strip_prefix("spiffe://")?
        .split_once('/')
        .map(|(_, p)| p)?;
    if path.contains("**") {
        return None;
    }
    let segments = path.split('/').count();
    (segments != 2 && segments != 4).then(|| {
        format!(
            "{pattern:?} matches no identity: `*` stops at `/` and identities are \
             spiffe://<td>/node/<name> (or .../node/<host>/leaf/<name>); write \
             spiffe://<td>/node/* for every node, or use ** to cross segments"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        name: &str,
        effect: Effect,
        callers: &[&str],
        services: &[&str],
        methods: &[&str],
    ) -> Rule {
        Rule {
            name: name.into(),
            effect,
            callers: callers.iter().map(|s| s.to_string()).collect(),
            caller_labels: BTreeMap::new(),
            services: services.iter().map(|s| s.to_string()).collect(),
            methods: methods.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn globs() {
        assert!(glob("spiffe://td/node/ops-*", "spiffe://td/node/ops-1"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*b", "axxbc"));
        assert!(glob("get*", "get"));
        assert!(!glob("get", "gets"));
    }

    #[test]
    fn globs_match_within_a_path_segment() {
        let gw = "spiffe://td/node/gw*";
        assert!(glob(gw, "spiffe://td/node/gw"));
        assert!(glob(gw, "spiffe://td/node/gw-2"));
        assert!(!glob(gw, "spiffe://td/node/gw/leaf/x"), "crossed a segment");
        assert!(!glob("spiffe://td/*", "spiffe://td/node/a"));
        assert!(glob("spiffe://td/node/*", "spiffe://td/node/a"));
        assert!(glob(
            "spiffe://td/node/*/leaf/*",
            "spiffe://td/node/a/leaf/m"
        ));
        assert!(
            glob("*", "spiffe://td/node/a"),
            "a lone star matches anything"
        );
    }

    #[test]
    fn first_match_wins_and_default_applies() {
        let authz = Authz {
            default: Effect::Deny,
            mode: Mode::Enforce,
            rules: vec![
                rule("no-writes", Effect::Deny, &[], &["sensors"], &["write*"]),
                rule("ops", Effect::Allow, &["spiffe://td/node/ops-*"], &[], &[]),
            ],
        };
        let none = BTreeMap::new();
        let v = authz.decide("spiffe://td/node/ops-1", &none, "sensors", "read");
        assert_eq!((v.allow, v.denied, v.rule.as_str()), (true, false, "ops"));
        let v = authz.decide("spiffe://td/node/ops-1", &none, "sensors", "write_all");
        assert_eq!((v.allow, v.rule.as_str()), (false, "no-writes"));
        let v = authz.decide("spiffe://td/node/cam-1", &none, "sensors", "read");
        assert_eq!(
            (v.allow, v.denied, v.rule.as_str()),
            (false, true, "default")
        );
    }

    #[test]
    fn audit_mode_lets_denials_through_but_marks_them() {
        let authz = Authz {
            default: Effect::Deny,
            mode: Mode::Audit,
            rules: vec![],
        };
        let v = authz.decide("x", &BTreeMap::new(), "s", "m");
        assert_eq!((v.allow, v.denied), (true, true));
    }

    #[test]
    fn caller_labels_must_all_match() {
        let mut r = rule("hall-1", Effect::Allow, &[], &[], &[]);
        r.caller_labels.insert("zone".into(), "hall-1".into());
        let authz = Authz {
            default: Effect::Deny,
            mode: Mode::Enforce,
            rules: vec![r],
        };
        let mut labels = BTreeMap::new();
        assert!(!authz.decide("x", &labels, "s", "m").allow);
        labels.insert("zone".into(), "hall-1".into());
        assert!(authz.decide("x", &labels, "s", "m").allow);
    }
}
