//! Routing, sans-I/O: which subset of a service's endpoints takes a call.
//!
//! A service's routes are tried in order; the first whose method, metadata and caller labels match
//! sends the call to a weighted split over subsets of endpoints, each subset chosen by endpoint
//! labels (`version = "v2"`, `zone = "hall-1"`). That is canary release, feature rollout and
//! geographic routing. A split is random per call, or sticky per caller when asked (the same caller
//! always lands in the same subset). A route may mirror a share of its calls to another subset.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::time::Duration;

use crate::authz::glob;

/// Labels an endpoint must carry to be in a subset (all of them); empty = every endpoint.
pub type Subset = BTreeMap<String, String>;

/// One route of a service.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Its name, in metrics.
    pub name: String,
    /// Globs on the method; empty matches any.
    pub methods: Vec<String>,
    /// Metadata the call must carry (exact values).
    pub metadata: BTreeMap<String, String>,
    /// Labels the caller must carry.
    pub caller_labels: BTreeMap<String, String>,
    /// Weighted subsets; empty sends to every endpoint.
    pub split: Vec<(Subset, u32)>,
    /// The same caller always lands in the same subset.
    pub sticky: bool,
    /// A share (percent) of calls copied to another subset; its answers are discarded.
    pub mirror: Option<(Subset, f64)>,
    /// Deadline of the route's calls that set none.
    pub timeout: Option<Duration>,
}

/// Where a call goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision<'a> {
    /// The route that matched, if any.
    pub route: Option<&'a Route>,
    /// The subset to pick an endpoint from.
    pub subset: Subset,
    /// Whether to copy this call to the route's mirror subset.
    pub mirror: Option<&'a Subset>,
}

/// Picks the route and subset for a call. `r1`, `r2` are random numbers (split, mirror).
pub fn decide<'a>(
    routes: &'a [Route],
    method: &str,
    metadata: &[(String, String)],
    caller: &str,
    caller_labels: &BTreeMap<String, String>,
    r1: u64,
    r2: u64,
) -> Decision<'a> {
    let Some(route) = routes.iter().find(|r| {
        (r.methods.is_empty() || r.methods.iter().any(|m| glob(m, method)))
            && r.metadata.iter().all(|(k, v)| {
                metadata
                    .iter()
                    .any(|(mk, mv)| mk.eq_ignore_ascii_case(k) && mv == v)
            })
            && r.caller_labels
                .iter()
                .all(|(k, v)| caller_labels.get(k) == Some(v))
    }) else {
        return Decision {
            route: None,
            subset: Subset::new(),
            mirror: None,
        };
    };
    let total: u64 = route.split.iter().map(|(_, w)| u64::from(*w)).sum();
    let subset = if total == 0 {
        Subset::new()
    } else {
        let roll = if route.sticky {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (caller, &route.name).hash(&mut h);
            h.finish() % total
        } else {
            r1 % total
        };
        let mut acc = 0;
        route
            .split
            .iter()
            .find(|(_, w)| {
                acc += u64::from(*w);
                roll < acc
            })
            .map(|(s, _)| s.clone())
            .unwrap_or_default()
    };
    let mirror = route
        .mirror
        .as_ref()
        .filter(|(_, pct)| (r2 % 10_000) as f64 / 100.0 < *pct)
        .map(|(s, _)| s);
    Decision {
        route: Some(route),
        subset,
        mirror,
    }
}

/// Whether an endpoint with `labels` is in `subset`.
pub fn in_subset(subset: &Subset, labels: &BTreeMap<String, String>) -> bool {
    subset.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sub(k: &str, v: &str) -> Subset {
        [(k.to_owned(), v.to_owned())].into_iter().collect()
    }

    fn canary() -> Vec<Route> {
        vec![
            Route {
                name: "header".into(),
                methods: vec![],
                metadata: [("x-canary".to_owned(), "1".to_owned())]
                    .into_iter()
                    .collect(),
                caller_labels: BTreeMap::new(),
                split: vec![(sub("version", "v2"), 1)],
                sticky: false,
                mirror: None,
                timeout: None,
            },
            Route {
                name: "split".into(),
                methods: vec![],
                metadata: BTreeMap::new(),
                caller_labels: BTreeMap::new(),
                split: vec![(sub("version", "v1"), 90), (sub("version", "v2"), 10)],
                sticky: false,
                mirror: Some((sub("version", "shadow"), 20.0)),
                timeout: None,
            },
        ]
    }

    #[test]
    fn a_90_10_split_is_exact_over_many_calls() {
        let routes = canary();
        let none = BTreeMap::new();
        let (mut v2, mut mirrored) = (0, 0);
        let mut seed = 1u64;
        for _ in 0..10_000 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            let d = decide(&routes, "get", &[], "c", &none, seed >> 20, seed >> 7);
            v2 += usize::from(d.subset == sub("version", "v2"));
            mirrored += usize::from(d.mirror.is_some());
        }
        assert!((900..1100).contains(&v2), "{v2} of 10000 to v2");
        assert!(
            (1800..2200).contains(&mirrored),
            "{mirrored} of 10000 mirrored"
        );
    }

    #[test]
    fn the_canary_header_always_reaches_v2() {
        let routes = canary();
        let md = vec![("X-Canary".to_owned(), "1".to_owned())];
        for r in 0..100 {
            let d = decide(&routes, "get", &md, "c", &BTreeMap::new(), r, r);
            assert_eq!(d.subset, sub("version", "v2"));
            assert_eq!(d.route.map(|r| r.name.as_str()), Some("header"));
        }
    }

    #[test]
    fn sticky_splits_keep_a_caller_in_its_subset() {
        let mut routes = canary();
        routes[1].sticky = true;
        let first = decide(&routes, "get", &[], "caller-7", &BTreeMap::new(), 1, 1).subset;
        for r in 0..100 {
            assert_eq!(
                decide(&routes, "get", &[], "caller-7", &BTreeMap::new(), r, r).subset,
                first
            );
        }
    }

    #[test]
    fn no_route_means_every_endpoint() {
        let d = decide(&[], "get", &[], "c", &BTreeMap::new(), 0, 0);
        assert!(d.route.is_none() && d.subset.is_empty());
        assert!(in_subset(&d.subset, &sub("version", "v1")));
        assert!(!in_subset(&sub("version", "v2"), &sub("version", "v1")));
    }
}
