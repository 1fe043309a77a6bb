//! Properties of the sans-I/O decisions, over generated inputs (proptest): authorization, globs,
//! routing splits, the balancer's breaker, the retry budget, and the policy's version and epoch
//! rules. Each property is checked against an independent statement of the rule, not against
//! the code's own arithmetic.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mesh_core::authz::{Authz, Effect, Mode, Rule, glob};
use mesh_core::balance::{BalanceConfig, Balancer, Outcome};
use mesh_core::limits::RetryBudget;
use mesh_core::policy::{Offer, judge_offer};
use mesh_core::route::{Route, Subset, decide};
use mesh_proto::control::BundleRef;
use proptest::prelude::*;

/// The glob rule, stated by backtracking: `**` takes any run, `*` any run without `/`, a pattern
/// of just `*` anything. (Exponential in the stars: fine for these small inputs, and independent
/// of the table the code uses for patterns with several stars.)
fn glob_oracle(pattern: &str, text: &str) -> bool {
    fn at(p: &[u8], t: &[u8]) -> bool {
        match p {
            [] => t.is_empty(),
            [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| at(rest, &t[i..])),
            [b'*', rest @ ..] => {
                let segment = t.iter().position(|&c| c == b'/').unwrap_or(t.len());
                (0..=segment).any(|i| at(rest, &t[i..]))
            }
            [c, rest @ ..] => t.first() == Some(c) && at(rest, &t[1..]),
        }
    }
    pattern == "*" || at(pattern.as_bytes(), text.as_bytes())
}

/// The same rule stated a second way, as a table over (pattern position, text position): two
/// statements that agree with each other and with the code on every input.
fn glob_table_oracle(pattern: &str, text: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    // ok[i][j]: p[i..] matches t[j..].
    let mut ok = vec![vec![false; t.len() + 1]; p.len() + 2];
    ok[p.len()][t.len()] = true;
    for i in (0..p.len()).rev() {
        for j in (0..=t.len()).rev() {
            ok[i][j] = match (p[i], p.get(i + 1)) {
                (b'*', Some(b'*')) => (j..=t.len()).any(|k| ok[i + 2][k]),
                (b'*', _) => {
                    let end = t[j..]
                        .iter()
                        .position(|&c| c == b'/')
                        .map_or(t.len(), |e| j + e);
                    (j..=end).any(|k| ok[i + 1][k])
                }
                (c, _) => t.get(j) == Some(&c) && ok[i + 1][j + 1],
            };
        }
    }
    ok[0][0]
}

fn small_text() -> impl Strategy<Value = String> {
    "[ab/]{0,8}"
}

fn small_pattern() -> impl Strategy<Value = String> {
    "[ab/*]{0,6}"
}

fn rule() -> impl Strategy<Value = Rule> {
    (
        any::<bool>(),
        prop::collection::vec(small_pattern(), 0..2),
        prop::collection::vec(small_pattern(), 0..2),
        prop::collection::vec(small_pattern(), 0..2),
        prop::collection::btree_map("[xy]", "[12]", 0..2),
    )
        .prop_map(|(allow, callers, services, methods, caller_labels)| Rule {
            name: String::new(),
            effect: if allow { Effect::Allow } else { Effect::Deny },
            callers,
            caller_labels,
            services,
            methods,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn glob_is_the_stated_rule(pattern in small_pattern(), text in small_text()) {
        let stated = glob_oracle(&pattern, &text);
        prop_assert_eq!(stated, glob_table_oracle(&pattern, &text));
        prop_assert_eq!(glob(&pattern, &text), stated);
    }

    /// Many stars and a long text: answered at once (backtracking would take hours).
    #[test]
    fn a_glob_with_many_stars_is_not_exponential(n in 100usize..128) {
        let text = "a".repeat(n);
        prop_assert!(!glob("*a*a*a*a*a*a*a*a*a*a*b", &text));
        prop_assert!(!glob("**a**a**a**a**a**a**a**a**b", &text));
        prop_assert!(glob("*a*a*a*a*a*a*a*a*a*a*", &text));
    }

    #[test]
    fn a_glob_without_stars_matches_only_itself(pattern in "[ab/]{0,8}", text in small_text()) {
        prop_assert_eq!(glob(&pattern, &text), pattern == text);
    }

    /// The first rule whose every part matches decides; none: the default. Audit mode lets
    /// everything through and still says what was denied.
    #[test]
    fn authorization_is_first_match_and_audit_never_refuses(
        rules in prop::collection::vec(rule(), 0..6),
        default_allow in any::<bool>(),
        caller in small_text(),
        service in small_text(),
        method in small_text(),
        labels in prop::collection::btree_map("[xy]", "[12]", 0..2),
    ) {
        let mut rules = rules;
        for (i, r) in rules.iter_mut().enumerate() {
            r.name = format!("r{i}");
        }
        let matches = |r: &Rule| {
            let any = |ps: &[String], t: &str| ps.is_empty() || ps.iter().any(|p| glob_oracle(p, t));
            any(&r.callers, &caller)
                && any(&r.services, &service)
                && any(&r.methods, &method)
                && r.caller_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
        };
        let default = if default_allow { Effect::Allow } else { Effect::Deny };
        let (want_effect, want_rule) = rules
            .iter()
            .find(|r| matches(r))
            .map_or((default, "default".to_owned()), |r| (r.effect, r.name.clone()));
        let mut authz = Authz { default, mode: Mode::Enforce, rules };
        let enforced = authz.decide(&caller, &labels, &service, &method);
        prop_assert_eq!(&enforced.rule, &want_rule);
        prop_assert_eq!(enforced.allow, want_effect == Effect::Allow);
        prop_assert_eq!(enforced.denied, want_effect == Effect::Deny);
        authz.mode = Mode::Audit;
        let audited = authz.decide(&caller, &labels, &service, &method);
        prop_assert!(audited.allow);
        prop_assert_eq!(audited.denied, enforced.denied);
        prop_assert_eq!(audited.rule, enforced.rule);
    }

    /// Over every roll of a split, each subset takes exactly its weight's share; a weight of 0
    /// is never chosen; a sticky split sends one caller to one subset whatever the roll.
    #[test]
    fn a_split_gives_each_subset_exactly_its_weight(
        weights in prop::collection::vec(0u32..6, 1..5),
        sticky in any::<bool>(),
        caller in "[a-z]{1,6}",
        r2 in any::<u64>(),
        pct in prop::sample::select(vec![0.0f64, 100.0]),
    ) {
        let subset = |i: usize| Subset::from([("v".to_owned(), i.to_string())]);
        let route = Route {
            name: "r".into(),
            methods: vec![],
            metadata: BTreeMap::new(),
            caller_labels: BTreeMap::new(),
            split: weights.iter().enumerate().map(|(i, w)| (subset(i), *w)).collect(),
            sticky,
            mirror: Some((subset(99), pct)),
            timeout: None,
        };
        let routes = [route];
        let total: u64 = weights.iter().map(|w| u64::from(*w)).sum();
        let mut seen = vec![0u64; weights.len()];
        let mut first = None;
        for roll in 0..total.max(1) {
            let d = decide(&routes, "m", &[], &caller, &BTreeMap::new(), roll, r2);
            // A mirror share of 0% never copies, of 100% always does.
            prop_assert_eq!(d.mirror.is_some(), pct == 100.0);
            if total == 0 {
                prop_assert!(d.subset.is_empty());
                continue;
            }
            let i: usize = d.subset["v"].parse().expect("a subset this test made");
            seen[i] += 1;
            if sticky {
                prop_assert_eq!(*first.get_or_insert(i), i);
            }
        }
        if total > 0 && !sticky {
            for (i, w) in weights.iter().enumerate() {
                prop_assert_eq!(seen[i], u64::from(*w));
            }
        }
        for (i, w) in weights.iter().enumerate() {
            if *w == 0 {
                prop_assert_eq!(seen[i], 0);
            }
        }
    }

    /// The breaker: an endpoint is ejected exactly when it has failed `failures` times in a row
    /// (a success starts the count again; a failed probe after an ejection ejects again), for at
    /// most `max_eject`; while it is ejected and another endpoint is healthy, it is never picked.
    #[test]
    fn the_breaker_ejects_after_exactly_n_failures_in_a_row(
        outcomes in prop::collection::vec(any::<bool>(), 1..40),
        failures in 1u32..5,
        seed in any::<u64>(),
    ) {
        let config = BalanceConfig {
            failures,
            base_eject: Duration::from_secs(1),
            max_eject: Duration::from_secs(8),
            ..BalanceConfig::default()
        };
        let mut b: Balancer<u8> = Balancer::new(config.clone());
        let start = Instant::now();
        let candidates = [(1u8, None), (2u8, None)];
        let mut run = 0u32;
        let mut probing = false;
        for (i, ok) in outcomes.iter().enumerate() {
            // Time moves on by 10 s per call: any ejection has ended, the probe is due.
            let now = start + Duration::from_secs(10 * i as u64);
            let picked = b.pick(&candidates[..1], None, now, seed, seed.rotate_left(7));
            prop_assert_eq!(picked, Some(1));
            let outcome = b.finish(&1, Duration::from_millis(1), *ok, now);
            run = if *ok { 0 } else { run + 1 };
            let want_ejected = !ok && (run >= failures || probing);
            prop_assert_eq!(matches!(outcome, Outcome::Ejected(_)), want_ejected);
            if *ok {
                probing = false;
            }
            if let Outcome::Ejected(until) = outcome {
                prop_assert!(until > now && until <= now + config.max_eject);
                prop_assert!(b.is_ejected(&1, now));
                // Ejected and another endpoint healthy: never picked.
                for r in 0..8u64 {
                    let other = b.pick(&candidates, None, now, seed ^ r, r);
                    prop_assert_eq!(other, Some(2));
                    b.cancel(&2);
                }
                run = 0;
                probing = true;
            }
        }
    }

    /// Retries never exceed the reserve plus `ratio` of the calls made, and the budget counts
    /// exactly the retries it allowed.
    #[test]
    fn retries_stay_within_the_budget(
        ratio in 0.0f64..1.0,
        reserve in 0.0f64..20.0,
        ops in prop::collection::vec(any::<bool>(), 0..300),
    ) {
        let mut budget = RetryBudget::new(ratio, reserve);
        let (mut calls, mut allowed) = (0u64, 0u64);
        for call in ops {
            if call {
                budget.deposit();
                calls += 1;
            } else if budget.withdraw() {
                allowed += 1;
            }
            prop_assert!(allowed as f64 <= reserve + ratio * calls as f64 + 1e-9);
        }
        prop_assert_eq!(budget.totals(), (calls, allowed));
    }

    /// A node takes any bundle of another epoch or a newer version of its own, keeps what it
    /// holds for the same bundle, and refuses only an older version of the same epoch: a
    /// version number alone never locks a node.
    #[test]
    fn bundles_are_judged_by_epoch_then_version(
        held in proptest::option::of((0u64..3, 0u64..4, 0u8..2)),
        offered in (0u64..3, 0u64..4, 0u8..2),
    ) {
        let bundle = |(epoch, version, h): (u64, u64, u8)| BundleRef { epoch, version, hash: [h; 32] };
        let held = held.map(bundle);
        let offered = bundle(offered);
        let got = judge_offer(held.as_ref(), &offered);
        let want = match &held {
            None => Offer::Apply,
            Some(h) if h.epoch != offered.epoch => Offer::Apply,
            Some(h) if offered.version < h.version => Offer::Older,
            Some(h) if offered.version == h.version && offered.hash == h.hash => Offer::Held,
            Some(_) => Offer::Apply,
        };
        prop_assert_eq!(got, want);
    }
}
